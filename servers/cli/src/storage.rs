//! `r3fs storage`: run a storage node — its targets' chunk engines, CRAQ
//! replication, and the life with mgmtd (register, heartbeat, resync) — until
//! SIGINT or SIGTERM. [`start`] starts one for `r3fs local-cluster` too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use r3fs_client::{MgmtClient, RoutingWatcher};
use r3fs_net::{Router, RpcServer, ServerConfig};
use r3fs_storage::chunk::{ChunkEngine, CHUNK_BYTES_MAX};
use r3fs_storage::craq::StorageService;
use r3fs_storage::node::{self, NodeConfig, NodeTasks, Reporter};
use r3fs_wire::mgmt::{LocalState, NodeId, NodeType, RegisterNodeRequest, TargetId};
use serde::Deserialize;

use crate::config::set;

#[derive(clap::Args)]
pub struct StorageArgs {
    /// TOML config file; flags below override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This node's id, unique in the cluster.
    #[arg(long)]
    node_id: Option<u32>,
    /// Address to listen on [default: 127.0.0.1:9300].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// mgmtd addresses (any instance).
    #[arg(long = "mgmtd", value_delimiter = ',')]
    mgmtd: Vec<SocketAddr>,
    /// A target as ID=DIRECTORY; repeat for several.
    #[arg(long = "target", value_parser = parse_target)]
    targets: Vec<TargetConfig>,
    /// Heartbeat interval in milliseconds [default: 1000]; keep it well under
    /// mgmtd's heartbeat timeout.
    #[arg(long)]
    heartbeat_interval_ms: Option<u64>,
    /// Meta servers to take removed files from for garbage collection;
    /// without any, this node collects no garbage.
    #[arg(long = "meta", value_delimiter = ',')]
    meta: Vec<SocketAddr>,
    /// Pause between garbage collection rounds, in milliseconds [default: 5000].
    #[arg(long)]
    gc_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub id: TargetId,
    pub path: PathBuf,
}

fn parse_target(s: &str) -> Result<TargetConfig, String> {
    let (id, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=DIRECTORY"))?;
    let id = id.parse().map_err(|e| format!("{s:?}: target id: {e}"))?;
    Ok(TargetConfig {
        id,
        path: PathBuf::from(path),
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub mgmtd: Vec<SocketAddr>,
    pub targets: Vec<TargetConfig>,
    /// Largest chunk a target accepts, in bytes.
    pub chunk_size_max: u32,
    pub heartbeat_interval_ms: u64,
    /// Meta servers to collect removed files from (empty: no GC here).
    pub meta: Vec<SocketAddr>,
    pub gc_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            node_id: 0,
            listen: SocketAddr::from(([127, 0, 0, 1], 9300)),
            mgmtd: vec![SocketAddr::from(([127, 0, 0, 1], 9200))],
            targets: Vec::new(),
            chunk_size_max: CHUNK_BYTES_MAX,
            heartbeat_interval_ms: 1000,
            meta: Vec::new(),
            gc_interval_ms: 5000,
        }
    }
}

struct MgmtReporter(MgmtClient);

impl Reporter for MgmtReporter {
    async fn heartbeat(
        &self,
        node: NodeId,
        targets: Vec<(TargetId, LocalState)>,
    ) -> Result<u64, String> {
        let req = r3fs_wire::mgmt::HeartbeatRequest { node, targets };
        self.0
            .heartbeat(req)
            .await
            .map(|r| r.routing_version)
            .map_err(|e| e.to_string())
    }
}

pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    let mut cfg: StorageConfig = crate::config::load(args.config.as_deref())?;
    set(&mut cfg.node_id, args.node_id);
    set(&mut cfg.listen, args.listen);
    set(&mut cfg.mgmtd, args.mgmtd);
    set(&mut cfg.targets, args.targets);
    set(&mut cfg.heartbeat_interval_ms, args.heartbeat_interval_ms);
    set(&mut cfg.meta, args.meta);
    set(&mut cfg.gc_interval_ms, args.gc_interval_ms);
    if cfg.node_id == 0 {
        bail!("a storage node needs a node id: --node-id N or node_id = N");
    }
    if cfg.targets.is_empty() {
        bail!("a storage node needs at least one target: --target ID=DIRECTORY or [[targets]]");
    }
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: StorageConfig) -> anyhow::Result<()> {
    let node = start(cfg).await?;
    crate::engine::wait_for_signal().await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    tracing::info!("storage node stopped");
    Ok(())
}

/// A running storage node: serves until [`shutdown`](Self::shutdown), and
/// heartbeats, resyncs and collects garbage until dropped.
pub(crate) struct StorageNode {
    server: RpcServer,
    _tasks: NodeTasks,
    _gc: Option<AbortOnDrop>,
    _watcher: RoutingWatcher,
}

impl StorageNode {
    /// Stops serving (in-flight requests finish first), then the node's tasks.
    pub(crate) async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Starts a storage node: opens its targets, serves CRAQ, registers with
/// mgmtd, heartbeats, and collects garbage when `cfg.meta` names meta
/// servers.
pub(crate) async fn start(cfg: StorageConfig) -> anyhow::Result<StorageNode> {
    let mut engines = HashMap::new();
    for t in &cfg.targets {
        let engine = ChunkEngine::open(&t.path, cfg.chunk_size_max)
            .with_context(|| format!("open target {} in {}", t.id, t.path.display()))?;
        if engines.insert(t.id, Arc::new(engine)).is_some() {
            bail!("target {} is configured twice", t.id);
        }
    }
    let advertised = crate::engine::advertised(cfg.listen)?;
    let mgmt = MgmtClient::new(cfg.mgmtd.clone())?;
    let watcher = RoutingWatcher::start(mgmt.clone());
    let service = StorageService::new(cfg.node_id, engines, watcher.subscribe());
    let mut router = Router::new();
    service.register(&mut router);
    let server = RpcServer::bind(advertised, router, ServerConfig::default())
        .await
        .with_context(|| format!("listen on {advertised}"))?;
    let register = RegisterNodeRequest {
        id: Some(cfg.node_id),
        node_type: NodeType::Storage,
        address: advertised.to_string(),
        hostname: hostname(),
        targets: cfg.targets.iter().map(|t| t.id).collect(),
    };
    mgmt.register(register)
        .await
        .with_context(|| format!("register with mgmtd at {:?}", cfg.mgmtd))?;
    let node_config = NodeConfig {
        node_id: cfg.node_id,
        heartbeat_interval: Duration::from_millis(cfg.heartbeat_interval_ms.max(10)),
        resync_retry: Duration::from_secs(1),
    };
    let tasks = node::spawn(
        service,
        MgmtReporter(mgmt),
        watcher.subscribe(),
        node_config,
    );
    let gc = if cfg.meta.is_empty() {
        None
    } else {
        Some(spawn_gc(
            cfg.meta.clone(),
            watcher.subscribe(),
            cfg.gc_interval_ms,
        )?)
    };
    tracing::info!(listen = %server.local_addr(), node_id = cfg.node_id, targets = ?cfg.targets.iter().map(|t| t.id).collect::<Vec<_>>(), "storage node ready");
    Ok(StorageNode {
        server,
        _tasks: tasks,
        _gc: gc,
        _watcher: watcher,
    })
}

/// Collects removed files' chunks every `interval_ms` until dropped.
fn spawn_gc(
    meta: Vec<SocketAddr>,
    routing: tokio::sync::watch::Receiver<Option<Arc<r3fs_wire::mgmt::RoutingInfo>>>,
    interval_ms: u64,
) -> anyhow::Result<AbortOnDrop> {
    let meta = r3fs_client::MetaClient::new(r3fs_client::MetaClientConfig::new(meta))?;
    let storage = r3fs_client::StorageClient::new(routing, Default::default());
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(interval_ms.max(100))).await;
            match r3fs_client::gc::collect_garbage(&meta, &storage).await {
                Ok(round) if round.files > 0 || round.failed > 0 => {
                    tracing::info!(?round, "garbage collected");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "garbage collection round failed"),
            }
        }
    });
    Ok(AbortOnDrop(task))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}
