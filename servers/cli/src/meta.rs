//! `r3fs meta`: run a meta server until SIGINT or SIGTERM, then drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use r3fs_meta::MetaStore;
use r3fs_net::{Router, RpcServer, ServerConfig};

use crate::config::{DurabilityKind, EngineKind, MetaServerConfig};

#[derive(clap::Args)]
pub struct MetaArgs {
    /// TOML config file; flags below override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:9100].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory of the embedded KV engine [default: /var/lib/r3fs/meta].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// KV engine [default: embedded].
    #[arg(long, value_enum)]
    engine: Option<EngineKind>,
    /// When a commit counts as done [default: sync].
    #[arg(long, value_enum)]
    durability: Option<DurabilityKind>,
    /// With --durability periodic: fsync interval in milliseconds [default: 20].
    #[arg(long)]
    fsync_interval_ms: Option<u64>,
    /// FoundationDB cluster file (with --engine fdb).
    #[arg(long)]
    fdb_cluster_file: Option<PathBuf>,
    /// Address of an `r3fs kv` server (with --engine remote); repeatable.
    #[arg(long = "kv-remote", value_delimiter = ',')]
    kv_remote: Vec<SocketAddr>,
}

pub fn run(args: MetaArgs) -> anyhow::Result<()> {
    let mut cfg: MetaServerConfig = crate::config::load(args.config.as_deref())?;
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.engine {
        cfg.kv.engine = v;
    }
    if let Some(v) = args.durability {
        cfg.kv.durability = v;
    }
    if let Some(v) = args.fsync_interval_ms {
        cfg.kv.fsync_interval_ms = v;
    }
    if let Some(v) = args.fdb_cluster_file {
        cfg.kv.fdb_cluster_file = Some(v);
    }
    if !args.kv_remote.is_empty() {
        cfg.kv.remote = args.kv_remote;
    }
    cfg.validate()?;
    let engine = crate::engine::open(&cfg.kv, &cfg.data_dir)?;
    // Capacity is measured on the data directory only when the engine keeps
    // its files there; with a shared engine it comes from the config (storage
    // capacity arrives with the storage service).
    let capacity_dir = (cfg.kv.engine == EngineKind::Embedded).then(|| cfg.data_dir.clone());
    let store = MetaStore::new(engine, cfg.namespace.clone(), capacity_dir)
        .context("open the namespace")?;
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(serve(cfg, Arc::new(store)))
}

async fn serve(cfg: MetaServerConfig, store: Arc<MetaStore>) -> anyhow::Result<()> {
    let mut router = Router::new();
    r3fs_meta::server::register(&mut router, store);
    let server = RpcServer::bind(cfg.listen, router, ServerConfig::default())
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    tracing::info!(
        listen = %server.local_addr(),
        data_dir = %cfg.data_dir.display(),
        engine = ?cfg.kv.engine,
        durability = ?cfg.kv.durability,
        "meta server ready"
    );
    crate::engine::wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight requests");
    server.shutdown().await;
    tracing::info!("meta server stopped");
    Ok(())
}
