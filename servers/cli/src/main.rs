//! `r3fs`: the one command users and operators run. Each subcommand is a thin
//! shell over a library crate: servers, clients and admin tools live there.
//!
//! This crate is the top of the dependency graph and nothing depends on it.
//! It owns argument parsing, config files, logging setup, signals and exit
//! codes; errors are printed once, with their whole chain of causes.

mod admin;
mod cluster_file;
mod config;
mod engine;
mod fs;
mod kv;
mod local_cluster;
mod meta;
mod mgmtd;
mod mount;
mod status;
mod storage;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: storage servers allocate and free a
/// 1 MiB buffer per chunk write and per hop, and glibc hands those pages
/// back to the kernel and faults them in again each time (with it, chain
/// writes in `r3fs-bench storage` ran at ~450 MiB/s; with mimalloc ~620;
/// jemalloc measured no better than glibc there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "r3fs",
    version,
    about = "r3fs: a distributed file system (a Rust rewrite of DeepSeek 3FS)",
    long_about = "r3fs: a distributed file system (a Rust rewrite of DeepSeek 3FS).\n\n\
        Mount it with `r3fs mount DIR` (starts a local cluster on 127.0.0.1 when given \
        no cluster file), unmount with `r3fs umount DIR`, and see mounts and cluster \
        health with `r3fs status`. Run servers with `r3fs kv`, `r3fs mgmtd`, `r3fs meta` \
        and `r3fs storage`, or all of them in one process with `r3fs local-cluster`; \
        operate the cluster with `r3fs admin` and the namespace with `r3fs fs`. Logs go to stderr; set RUST_LOG (or --log) to e.g. \
        `debug` or `r3fs_meta=debug,info` for more."
)]
struct Cli {
    /// Log filter, in RUST_LOG syntax.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount r3fs on a directory (starts a local cluster if given no --cluster).
    Mount(mount::MountArgs),
    /// Unmount an r3fs mount and stop its daemon (and an unused local cluster).
    Umount(mount::UmountArgs),
    /// Mounts, the local cluster, and cluster health.
    Status(status::StatusArgs),
    /// Run a whole cluster in one process on 127.0.0.1 (start, stop).
    LocalCluster(local_cluster::LocalClusterArgs),
    /// Run a meta server: the POSIX namespace over a transactional KV engine.
    Meta(meta::MetaArgs),
    /// Namespace operations through a meta server (ls, stat, mkdir, mv, ...).
    Fs(fs::FsArgs),
    /// Run a KV server: the embedded engine shared by several processes.
    Kv(kv::KvArgs),
    /// Run an mgmtd instance: membership, primary lease, routing, chain states.
    Mgmtd(mgmtd::MgmtdArgs),
    /// Run a storage node: chunk targets replicated in CRAQ chains.
    Storage(storage::StorageArgs),
    /// Operate the cluster through mgmtd (list-nodes, list-chains, ...).
    Admin(admin::AdminArgs),
}

fn main() -> std::process::ExitCode {
    unblock_stop_signals();
    let cli = Cli::parse();
    // Background children (`r3fs mount`'s daemon, the local cluster) inherit
    // the log filter. Still single-threaded here, so setting the environment is sound.
    std::env::set_var("RUST_LOG", &cli.log);
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Mount(args) => mount::run_mount(args),
        Command::Umount(args) => mount::run_umount(args),
        Command::Status(args) => status::run(args),
        Command::LocalCluster(args) => local_cluster::run(args),
        Command::Meta(args) => meta::run(args),
        Command::Fs(args) => fs::run(args),
        Command::Kv(args) => kv::run(args),
        Command::Mgmtd(args) => mgmtd::run(args),
        Command::Storage(args) => storage::run(args),
        Command::Admin(args) => admin::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("r3fs: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A signal mask is inherited across exec: a parent that blocked SIGTERM
/// (say, to wait for it with sigwait) would leave our servers and daemons
/// deaf to `r3fs umount` and `kill`. Every r3fs process unblocks the
/// signals it stops on before it starts any thread.
fn unblock_stop_signals() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    if let Err(e) = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None) {
        eprintln!("r3fs: warning: cannot unblock SIGTERM/SIGINT: {e}");
    }
}
