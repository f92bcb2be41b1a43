//! `r3fs meta`: run a meta server until SIGINT or SIGTERM, then drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use r3fs_kv::KvEngine;
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
}

pub fn run(args: MetaArgs) -> anyhow::Result<()> {
    let mut cfg = MetaServerConfig::load(args.config.as_deref())?;
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
    cfg.validate()?;
    let engine = open_engine(&cfg)?;
    let store = MetaStore::new(engine, cfg.namespace.clone(), Some(cfg.data_dir.clone()))
        .context("open the namespace")?;
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(serve(cfg, Arc::new(store)))
}

fn open_engine(cfg: &MetaServerConfig) -> anyhow::Result<Arc<dyn KvEngine>> {
    match cfg.kv.engine {
        EngineKind::Embedded => {
            use r3fs_kv::embedded::{Durability, EmbeddedConfig, EmbeddedEngine};
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("create data directory {}", cfg.data_dir.display()))?;
            let mut ecfg = EmbeddedConfig::new(&cfg.data_dir);
            ecfg.durability = match cfg.kv.durability {
                DurabilityKind::Sync => Durability::Sync,
                DurabilityKind::Periodic => {
                    Durability::Periodic(Duration::from_millis(cfg.kv.fsync_interval_ms))
                }
            };
            let engine = EmbeddedEngine::open(ecfg).with_context(|| {
                format!(
                    "open the embedded KV engine in {} (is another r3fs process using it?)",
                    cfg.data_dir.display()
                )
            })?;
            Ok(Arc::new(engine))
        }
        EngineKind::Fdb => open_fdb(cfg),
    }
}

#[cfg(feature = "fdb")]
fn open_fdb(cfg: &MetaServerConfig) -> anyhow::Result<Arc<dyn KvEngine>> {
    let cluster_file =
        match &cfg.kv.fdb_cluster_file {
            Some(path) => Some(path.to_str().with_context(|| {
                format!("fdb_cluster_file {} is not valid UTF-8", path.display())
            })?),
            None => None,
        };
    let engine = r3fs_kv::fdb::FdbEngine::open(cluster_file).context("connect to FoundationDB")?;
    Ok(Arc::new(engine))
}

#[cfg(not(feature = "fdb"))]
fn open_fdb(_cfg: &MetaServerConfig) -> anyhow::Result<Arc<dyn KvEngine>> {
    anyhow::bail!("this r3fs was built without FoundationDB support; rebuild with `cargo build --release --features fdb` (needs libfdb_c)")
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
    wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight requests");
    server.shutdown().await;
    tracing::info!("meta server stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
