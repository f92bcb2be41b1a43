//! `r3fs mgmtd`: run one mgmtd instance until SIGINT or SIGTERM. [`start`]
//! starts one for `r3fs local-cluster` too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use r3fs_kv::KvEngine;
use r3fs_mgmtd::Mgmtd;
use r3fs_net::{Router, RpcServer, ServerConfig};

use crate::config::{set, EngineKind, MgmtdServerConfig};

#[derive(clap::Args)]
pub struct MgmtdArgs {
    /// TOML config file; flags below override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This instance's node id, unique among mgmtd instances [default: 1].
    #[arg(long)]
    node_id: Option<u32>,
    /// Address to listen on [default: 127.0.0.1:9200].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of the shared `r3fs kv` server; repeatable. Sets engine = remote.
    #[arg(long = "kv-remote", value_delimiter = ',')]
    kv_remote: Vec<SocketAddr>,
    /// Data directory, for engine = embedded (a single mgmtd).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Primary lease length in milliseconds [default: 60000].
    #[arg(long)]
    lease_ms: Option<u64>,
    /// How often the primary extends its lease, in milliseconds [default: 10000].
    #[arg(long)]
    extend_interval_ms: Option<u64>,
    /// How often a standby checks the lease, in milliseconds [default: 10000].
    #[arg(long)]
    check_interval_ms: Option<u64>,
    /// Silence after which a node counts as down, in milliseconds [default: 60000].
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
}

pub fn run(args: MgmtdArgs) -> anyhow::Result<()> {
    let mut cfg: MgmtdServerConfig = crate::config::load(args.config.as_deref())?;
    set(&mut cfg.node_id, args.node_id);
    set(&mut cfg.listen, args.listen);
    set(&mut cfg.data_dir, args.data_dir);
    set(&mut cfg.lease_ms, args.lease_ms);
    set(&mut cfg.extend_interval_ms, args.extend_interval_ms);
    set(&mut cfg.check_interval_ms, args.check_interval_ms);
    set(&mut cfg.heartbeat_timeout_ms, args.heartbeat_timeout_ms);
    if !args.kv_remote.is_empty() {
        cfg.kv.engine = EngineKind::Remote;
        cfg.kv.remote = args.kv_remote;
    }
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: MgmtdServerConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    let engine = crate::engine::open(&cfg.kv, &cfg.data_dir)?;
    let server = start(&cfg, engine, ServerConfig::default()).await?;
    crate::engine::wait_for_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
    tracing::info!("mgmtd stopped");
    Ok(())
}

/// Starts an mgmtd instance on `engine`, serving until the returned server
/// is shut down.
pub(crate) async fn start(
    cfg: &MgmtdServerConfig,
    engine: Arc<dyn KvEngine>,
    server: ServerConfig,
) -> anyhow::Result<RpcServer> {
    // mgmtd tells clients its own address, so resolve `--listen ...:0` to a
    // real port first.
    let advertised = crate::engine::advertised(cfg.listen)?;
    let mgmtd =
        Mgmtd::start(engine, cfg.mgmtd_config(advertised)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut router = Router::new();
    r3fs_mgmtd::server::register(&mut router, mgmtd);
    let server = RpcServer::bind(advertised, router, server)
        .await
        .with_context(|| format!("listen on {advertised}"))?;
    tracing::info!(
        listen = %server.local_addr(),
        node_id = cfg.node_id,
        engine = ?cfg.kv.engine,
        lease_ms = cfg.lease_ms,
        "mgmtd ready (standby until it takes the primary lease)"
    );
    Ok(server)
}
