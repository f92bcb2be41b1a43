//! `r3fs-bench`: benchmarks that run the compared setups side by side in one
//! run, print a table, then one machine-readable line per figure:
//! `RESULT <suite> <metric> <value> <unit>` and `RATIO <suite> <name> <x>`.
//!
//! Never a test: nothing here asserts a speed. Nothing depends on this crate.

mod mounts;
mod report;
mod suites;

use clap::{Parser, Subcommand};

/// The allocator the `r3fs` binary uses, so in-process clusters here
/// allocate as the servers do (see `servers/cli/src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "r3fs-bench",
    version,
    about = "Side-by-side benchmarks of r3fs"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// Meta service through MetaClient on loopback: create, stat, readdir,
    /// rename, unlink with 1 and 8 concurrent clients.
    Meta(suites::meta::MetaArgs),
    /// Chunk storage through StorageClient on a chain of 3, side by side with
    /// direct file I/O on the same disk.
    Storage(suites::storage::StorageArgs),
    /// Through a mount, side by side: tmpfs (the limit), bindfs over tmpfs
    /// (FUSE alone) and r3fs on a fresh local cluster: create/stat/unlink,
    /// sequential 1 MiB write and read, random 4 KiB reads. Needs root.
    Fuse(suites::fuse::FuseArgs),
    /// The kernel round trip alone, per channel mode (fuse, xfuse with
    /// a = 0, 0.5, 1, uring) on an in-memory file system, side by side with
    /// tmpfs, bindfs and the real r3fs client: fstat, stat, 4 KiB pread,
    /// pinned and unpinned. Needs root.
    Channels(suites::channels::ChannelsArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().suite {
        Suite::Meta(args) => suites::meta::run(args),
        Suite::Storage(args) => suites::storage::run(args),
        Suite::Fuse(args) => suites::fuse::run(args),
        Suite::Channels(args) => suites::channels::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("r3fs-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
