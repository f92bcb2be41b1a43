//! `r3fs meta`: run a meta server until SIGINT or SIGTERM, then drain.
//! [`start`] starts one for `r3fs local-cluster` too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use r3fs_kv::KvEngine;
use r3fs_meta::MetaStore;
use r3fs_net::{Router, RpcServer, ServerConfig};

use crate::config::{set, DurabilityKind, EngineKind, MetaServerConfig};

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
    set(&mut cfg.listen, args.listen);
    set(&mut cfg.data_dir, args.data_dir);
    set(&mut cfg.kv.engine, args.engine);
    set(&mut cfg.kv.durability, args.durability);
    set(&mut cfg.kv.fsync_interval_ms, args.fsync_interval_ms);
    set(
        &mut cfg.kv.fdb_cluster_file,
        args.fdb_cluster_file.map(Some),
    );
    set(&mut cfg.kv.remote, args.kv_remote);
    cfg.validate()?;
    let engine = crate::engine::open(&cfg.kv, &cfg.data_dir)?;
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(serve(cfg, engine))
}

async fn serve(cfg: MetaServerConfig, engine: Arc<dyn KvEngine>) -> anyhow::Result<()> {
    let server = start(&cfg, engine).await?;
    crate::engine::wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight requests");
    server.shutdown().await;
    tracing::info!("meta server stopped");
    Ok(())
}

/// Starts a meta server on `engine` (`cfg` validated), serving until the
/// returned server is shut down.
pub(crate) async fn start(
    cfg: &MetaServerConfig,
    engine: Arc<dyn KvEngine>,
) -> anyhow::Result<RpcServer> {
    // Capacity is measured on the data directory only when the engine keeps
    // its files there; with a shared engine it comes from the config (storage
    // capacity arrives with the storage service).
    let capacity_dir = (cfg.kv.engine == EngineKind::Embedded).then(|| cfg.data_dir.clone());
    let store = MetaStore::new(engine, cfg.namespace.clone(), capacity_dir)
        .context("open the namespace")?;
    let mut router = Router::new();
    r3fs_meta::server::register(&mut router, Arc::new(store));
    let server = RpcServer::bind(cfg.listen, router, ServerConfig::default())
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    tracing::info!(
        listen = %server.local_addr(),
        data_dir = %cfg.data_dir.display(),
        engine = ?cfg.kv.engine,
        durability = ?cfg.kv.durability,
        chains = ?cfg.namespace.chains,
        stripe = cfg.namespace.stripe,
        "meta server ready"
    );
    Ok(server)
}
