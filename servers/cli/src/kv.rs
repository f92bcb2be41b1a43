//! `r3fs kv`: serve the embedded KV engine to other processes (several mgmtd
//! instances, several meta servers), as FoundationDB does for 3FS.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::config::{DurabilityKind, EngineKind, KvConfig};

#[derive(clap::Args)]
pub struct KvArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Data directory of the embedded engine (one kv server per directory).
    #[arg(long, default_value = "/var/lib/r3fs/kv")]
    data_dir: PathBuf,
    /// When a commit counts as done.
    #[arg(long, value_enum, default_value = "sync")]
    durability: DurabilityKind,
    /// With --durability periodic: fsync interval in milliseconds.
    #[arg(long, default_value_t = 20)]
    fsync_interval_ms: u64,
}

pub fn run(args: KvArgs) -> anyhow::Result<()> {
    let kv = KvConfig {
        engine: EngineKind::Embedded,
        durability: args.durability,
        fsync_interval_ms: args.fsync_interval_ms,
        ..KvConfig::default()
    };
    kv.validate()?;
    let engine = crate::engine::open(&kv, &args.data_dir)?;
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async move {
        let config = r3fs_kv_remote::KvServerConfig::default();
        let (server, _kv) = r3fs_kv_remote::serve(args.listen, engine, config)
            .await
            .with_context(|| format!("listen on {}", args.listen))?;
        tracing::info!(listen = %server.local_addr(), data_dir = %args.data_dir.display(), durability = ?args.durability, "kv server ready");
        crate::engine::wait_for_signal().await?;
        tracing::info!("shutting down: finishing in-flight requests");
        server.shutdown().await;
        tracing::info!("kv server stopped");
        Ok(())
    })
}
