//! `r3fs local-cluster`: a whole cluster in one process on 127.0.0.1 — the
//! embedded KV engine, one mgmtd, one meta server, three storage nodes of
//! four targets each in four chains of three replicas, and garbage
//! collection of removed files — with everything under one data directory.
//!
//! It is what `r3fs mount` starts when it is given no cluster file. The
//! servers are started by the same calls as `r3fs mgmtd`, `r3fs meta` and
//! `r3fs storage` ([`crate::mgmtd::start`], [`crate::meta::start`],
//! [`crate::storage::start`]).
//! It never listens beyond loopback.
//!
//! # Data directory
//! ```text
//! cluster.toml          the cluster file clients use (mgmtd, meta addresses)
//! ports.toml            ports chosen on first start, reused on every restart
//! local-cluster.pid     pid of the running cluster; flock-ed while it runs
//! local-cluster.ready   present while it is up and healthy
//! local-cluster.log     its log when started in the background
//! kv/                   the embedded KV engine (mgmtd and meta state)
//! storage/node-N/target-T/   chunk targets
//! mounts.toml, logs/    `r3fs mount`'s registry and daemon logs
//! ```
//!
//! # Limits
//! Startup waits at most [`READY_TIMEOUT`] for every target to be SERVING;
//! `stop` waits [`STOP_TIMEOUT`] for a graceful exit before SIGKILL.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use r3fs_client::{MetaClient, MetaClientConfig, MgmtClient};
use r3fs_kv::KvEngine;
use r3fs_meta::MetaConfig;
use r3fs_net::{RpcServer, ServerConfig};
use r3fs_wire::mgmt::{
    ChainId, CreateChainTableRequest, NodeId, PublicState, RoutingInfo, TargetId,
};
use serde::{Deserialize, Serialize};

use crate::cluster_file::{write_atomically, ClusterFile};
use crate::config::{KvConfig, MetaServerConfig, MgmtdServerConfig};
use crate::mount::daemon;
use crate::storage::{StorageConfig, StorageNode, TargetConfig};

/// Where the local cluster and the mount registry live unless told otherwise.
pub const DATA_DIR_DEFAULT: &str = "/var/lib/r3fs/local";
/// Storage nodes, targets per node and replicas per chain: 4 chains of 3.
const STORAGE_NODES: u32 = 3;
const TARGETS_PER_NODE: u32 = 4;
const REPLICAS: u32 = 3;
/// Chains a new file is striped over (at most the number of chains).
const STRIPE_MAX: u32 = 4;
/// Longest wait for a start (resync after an unclean stop included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for a graceful stop before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
const MGMTD_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(clap::Args, Clone)]
pub struct DataDirArg {
    /// Data directory of the local cluster and the mount registry.
    #[arg(long, env = "R3FS_DATA_DIR", default_value = DATA_DIR_DEFAULT)]
    pub data_dir: PathBuf,
}

#[derive(clap::Args)]
#[command(
    long_about = "Run a whole r3fs cluster in one process on 127.0.0.1: the embedded KV \
        engine, mgmtd, a meta server and three storage nodes (four chains of three \
        replicas), with garbage collection of removed files.\n\n\
        `start` (the default) runs it in the background and returns once mgmtd is primary, \
        every target is SERVING and meta answers; it writes DATA_DIR/cluster.toml for \
        clients (`r3fs mount --cluster`, `r3fs status --cluster`) and logs to \
        DATA_DIR/local-cluster.log. Ports are chosen on first start and kept in \
        DATA_DIR/ports.toml. `stop` shuts it down gracefully; data stays in DATA_DIR.\n\n\
        `r3fs mount` without --cluster starts it by itself, and `r3fs umount` stops such a \
        cluster once no mount uses it."
)]
pub struct LocalClusterArgs {
    /// What to do.
    #[arg(value_enum, default_value = "start")]
    action: Action,
    #[command(flatten)]
    dir: DataDirArg,
    /// start: stay attached and log to stderr until SIGINT or SIGTERM.
    #[arg(long)]
    foreground: bool,
    /// stop: stop even while mounts use the cluster.
    #[arg(long)]
    force: bool,
    /// Recorded so that `r3fs umount` stops the cluster with its last mount.
    #[arg(long, hide = true)]
    started_by_mount: bool,
    /// Set on the background child: report readiness on stdout, then detach it.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Action {
    /// Start the cluster (in the background unless --foreground).
    Start,
    /// Stop a running cluster (SIGTERM, then SIGKILL after 30 s).
    Stop,
}

pub fn run(args: LocalClusterArgs) -> anyhow::Result<()> {
    let dir = DataDir::new(&args.dir.data_dir)?;
    match args.action {
        Action::Start if args.foreground => {
            serve_foreground(&dir, args.started_by_mount, args.daemon_child)
        }
        Action::Start => {
            if let Some(s) = state(&dir) {
                wait_ready(&dir, READY_TIMEOUT)?;
                println!("local cluster already running (pid {})", pid_text(s.pid));
            } else {
                println!("{}", start_detached(&dir, args.started_by_mount)?);
            }
            println!("cluster file: {}", dir.cluster_file().display());
            Ok(())
        }
        Action::Stop => {
            let users = crate::mount::registry::live_local_mounts(&dir)?;
            if !users.is_empty() && !args.force {
                let list: Vec<String> = users
                    .iter()
                    .map(|m| m.mountpoint.display().to_string())
                    .collect();
                bail!(
                    "the local cluster in {} is used by mounts {}; `r3fs umount` them first, or pass --force",
                    dir.root.display(),
                    list.join(", ")
                );
            }
            match stop(&dir)? {
                true => println!("local cluster in {} stopped", dir.root.display()),
                false => println!("no local cluster runs in {}", dir.root.display()),
            }
            Ok(())
        }
    }
}

/// The files of one data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    /// `root` made absolute (children and registries store absolute paths).
    pub fn new(root: &Path) -> anyhow::Result<DataDir> {
        let root = std::path::absolute(root)
            .with_context(|| format!("resolve data directory {}", root.display()))?;
        Ok(DataDir { root })
    }

    pub fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("create data directory {}", self.root.display()))
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.root.join("cluster.toml")
    }
    fn ports_file(&self) -> PathBuf {
        self.root.join("ports.toml")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("local-cluster.pid")
    }
    fn ready_file(&self) -> PathBuf {
        self.root.join("local-cluster.ready")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("local-cluster.log")
    }
    pub fn mounts_file(&self) -> PathBuf {
        self.root.join("mounts.toml")
    }
    pub fn mounts_lock(&self) -> PathBuf {
        self.root.join("mounts.lock")
    }
    /// The log of the background daemon of `mountpoint`.
    pub fn mount_log(&self, mountpoint: &Path) -> PathBuf {
        let name: String = mountpoint
            .to_string_lossy()
            .trim_matches('/')
            .chars()
            .map(|c| match c {
                '/' => '-',
                c if c.is_ascii_alphanumeric() || c == '.' || c == '_' => c,
                _ => '_',
            })
            .collect();
        self.root.join("logs").join(format!("mount-{name}.log"))
    }
    fn kv_dir(&self) -> PathBuf {
        self.root.join("kv")
    }
    fn target_dir(&self, node: NodeId, target: TargetId) -> PathBuf {
        self.root
            .join("storage")
            .join(format!("node-{node}"))
            .join(format!("target-{target}"))
    }
}

/// A running local cluster as its files show it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterState {
    /// None while the process has locked its pid file but not written it yet.
    pub pid: Option<i32>,
    /// Up and healthy (every target SERVING at start, meta answering).
    pub ready: bool,
    pub started_by_mount: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadyFile {
    pid: i32,
    started_by_mount: bool,
}

/// The running cluster of `dir`, or None when none runs: a running cluster
/// holds an exclusive lock on its pid file, which the kernel drops when the
/// process exits however it exits.
pub fn state(dir: &DataDir) -> Option<ClusterState> {
    let file = File::open(dir.pid_file()).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_unlocked_on_drop) => None,
        Err((_, _)) => {
            let pid = std::fs::read_to_string(dir.pid_file())
                .ok()
                .and_then(|s| s.trim().parse().ok());
            let ready = std::fs::read_to_string(dir.ready_file())
                .ok()
                .and_then(|s| toml::from_str::<ReadyFile>(&s).ok())
                .filter(|r| Some(r.pid) == pid);
            Some(ClusterState {
                pid,
                ready: ready.is_some(),
                started_by_mount: ready.is_some_and(|r| r.started_by_mount),
            })
        }
    }
}

fn pid_text(pid: Option<i32>) -> String {
    pid.map_or("?".into(), |p| p.to_string())
}

/// Makes sure the local cluster of `dir` runs and is ready; starts it in the
/// background when it does not run.
pub fn ensure_running(dir: &DataDir, started_by_mount: bool) -> anyhow::Result<()> {
    if state(dir).is_some() {
        return wait_ready(dir, READY_TIMEOUT);
    }
    let line = start_detached(dir, started_by_mount)?;
    eprintln!("r3fs: {line}");
    Ok(())
}

/// Waits until the running cluster reports ready.
fn wait_ready(dir: &DataDir, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match state(dir) {
            Some(s) if s.ready => return Ok(()),
            Some(_) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
            Some(s) => bail!(
                "the local cluster in {} (pid {}) is not ready after {timeout:?}; see {}",
                dir.root.display(),
                pid_text(s.pid),
                dir.log_file().display()
            ),
            None => bail!(
                "the local cluster in {} stopped while starting; see {}",
                dir.root.display(),
                dir.log_file().display()
            ),
        }
    }
}

/// Starts `r3fs local-cluster start --foreground` as a detached process and
/// returns its ready line.
fn start_detached(dir: &DataDir, started_by_mount: bool) -> anyhow::Result<String> {
    dir.create()?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "local-cluster".into(),
        "start".into(),
        "--foreground".into(),
        "--data-dir".into(),
        dir.root.clone().into(),
    ];
    if started_by_mount {
        args.push("--started-by-mount".into());
    }
    daemon::spawn_and_wait("local cluster", &args, &dir.log_file(), READY_TIMEOUT)
}

/// Stops the running cluster of `dir`: SIGTERM, a bounded wait, then
/// SIGKILL. Returns false when none was running.
pub fn stop(dir: &DataDir) -> anyhow::Result<bool> {
    let Some(s) = state(dir) else {
        return Ok(false);
    };
    let pid = match s.pid {
        Some(pid) if daemon::cmdline_contains(pid, "local-cluster") => pid,
        _ => bail!(
            "{} is locked but does not name an r3fs local cluster process",
            dir.pid_file().display()
        ),
    };
    daemon::signal(pid, nix::sys::signal::Signal::SIGTERM)?;
    if wait_stopped(dir, STOP_TIMEOUT) {
        return Ok(true);
    }
    tracing::warn!(
        pid,
        "local cluster did not stop within {STOP_TIMEOUT:?}; killing it"
    );
    daemon::signal(pid, nix::sys::signal::Signal::SIGKILL)?;
    if wait_stopped(dir, Duration::from_secs(10)) {
        return Ok(true);
    }
    bail!("local cluster pid {pid} survived SIGKILL")
}

fn wait_stopped(dir: &DataDir, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if state(dir).is_none() {
            return true;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    false
}

/// Ports on 127.0.0.1, chosen on first start and kept for every restart so
/// that cluster files and mgmtd's node records stay valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ports {
    mgmtd: u16,
    meta: u16,
    storage: Vec<u16>,
}

impl Ports {
    fn load_or_choose(dir: &DataDir) -> anyhow::Result<Ports> {
        let path = dir.ports_file();
        if !path.exists() {
            let ports = Ports::choose()?;
            let text = format!(
                "# Ports of the local cluster on 127.0.0.1, chosen on first start.\n{}",
                toml::to_string(&ports)?
            );
            write_atomically(&path, &text)?;
            return Ok(ports);
        }
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let ports: Ports =
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        if ports.storage.len() != STORAGE_NODES as usize {
            bail!(
                "{} names {} storage ports, expected {STORAGE_NODES}",
                path.display(),
                ports.storage.len()
            );
        }
        for (what, port) in ports.named() {
            if let Err(e) = TcpListener::bind(loopback(port)) {
                bail!(
                    "port {} ({what}) recorded in {} is not free: {e}; stop whatever uses it \
                     (another local cluster on a different data directory?), or delete {} to \
                     choose new ports (clients must then reread {})",
                    loopback(port),
                    path.display(),
                    path.display(),
                    dir.cluster_file().display()
                );
            }
        }
        Ok(ports)
    }

    /// Free ports, all distinct (every probe is held until all are chosen),
    /// below the kernel's ephemeral range where it has room: a port from
    /// that range could be given to an outgoing connection (one node's to
    /// mgmtd, say) between this choice and the listen that uses it.
    fn choose() -> anyhow::Result<Ports> {
        let count = 2 + STORAGE_NODES as usize;
        let mut probes: Vec<TcpListener> = Vec::with_capacity(count);
        if let Some(below) = ephemeral_ports_start().filter(|&p| p > FIXED_PORTS_MIN + 1000) {
            let span = below - FIXED_PORTS_MIN;
            let start = FIXED_PORTS_MIN + rand::random_range(0..span);
            for i in 0..span {
                if probes.len() == count {
                    break;
                }
                let port = FIXED_PORTS_MIN + (start - FIXED_PORTS_MIN + i) % span;
                if let Ok(probe) = TcpListener::bind(loopback(port)) {
                    probes.push(probe);
                }
            }
        }
        while probes.len() < count {
            let probe = TcpListener::bind(loopback(0)).context("find free ports on 127.0.0.1")?;
            probes.push(probe);
        }
        let ports: Vec<u16> = probes
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        Ok(Ports {
            mgmtd: ports[0],
            meta: ports[1],
            storage: ports[2..].to_vec(),
        })
    }

    fn named(&self) -> Vec<(String, u16)> {
        let mut v = vec![
            ("mgmtd".to_string(), self.mgmtd),
            ("meta".into(), self.meta),
        ];
        for (i, p) in self.storage.iter().enumerate() {
            v.push((format!("storage node {}", storage_node_id(i as u32)), *p));
        }
        v
    }
}

/// The lowest port a fixed choice of the local cluster takes.
const FIXED_PORTS_MIN: u16 = 20_000;

/// The first port of the kernel's range for outgoing connections' local
/// ports, if it can be read.
fn ephemeral_ports_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn storage_node_id(index: u32) -> NodeId {
    11 + index
}

/// Runs the cluster in this process until SIGINT or SIGTERM.
fn serve_foreground(
    dir: &DataDir,
    started_by_mount: bool,
    daemon_child: bool,
) -> anyhow::Result<()> {
    dir.create()?;
    let _lock = lock_pid_file(dir)?;
    let ports = Ports::load_or_choose(dir)?;
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async {
        let cluster = LocalCluster::start(dir, &ports).await?;
        cluster.wait_healthy(READY_TIMEOUT).await?;
        cluster.file.save(&dir.cluster_file())?;
        let ready = ReadyFile {
            pid: std::process::id() as i32,
            started_by_mount,
        };
        write_atomically(&dir.ready_file(), &toml::to_string(&ready)?)?;
        tracing::info!(mgmtd = ?cluster.file.mgmtd, meta = ?cluster.file.meta, "local cluster ready");
        daemon::notify_ready(
            &format!(
                "local cluster ready in {} (pid {}): mgmtd {}, meta {}",
                dir.root.display(),
                std::process::id(),
                cluster.file.mgmtd[0],
                cluster.file.meta[0]
            ),
            daemon_child,
        );
        crate::engine::wait_for_signal().await?;
        let _ = std::fs::remove_file(dir.ready_file());
        tracing::info!("shutting down");
        cluster.shutdown().await;
        tracing::info!("local cluster stopped");
        Ok(())
    })
}

/// Takes the pid file's lock for the life of the process and writes our pid.
fn lock_pid_file(dir: &DataDir) -> anyhow::Result<Flock<File>> {
    use std::io::Write;
    let path = dir.pid_file();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "a local cluster already runs in {} (pid {}); `r3fs local-cluster stop --data-dir {}` stops it",
                dir.root.display(),
                pid.trim(),
                dir.root.display()
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("lock {}", path.display())),
    };
    lock.set_len(0)?;
    write!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// The servers of a running local cluster.
struct LocalCluster {
    file: ClusterFile,
    mgmtd: RpcServer,
    meta: RpcServer,
    storage: Vec<StorageNode>,
    client: MgmtClient,
    _engine: Arc<dyn KvEngine>,
}

impl LocalCluster {
    async fn start(dir: &DataDir, ports: &Ports) -> anyhow::Result<LocalCluster> {
        let kv = KvConfig::default();
        let engine = crate::engine::open(&kv, &dir.kv_dir())?;
        let mgmtd_cfg = MgmtdServerConfig {
            node_id: 1,
            listen: loopback(ports.mgmtd),
            data_dir: dir.kv_dir(),
            lease_ms: 10_000,
            extend_interval_ms: 2_000,
            check_interval_ms: 1_000,
            heartbeat_timeout_ms: 10_000,
            kv: kv.clone(),
            ..MgmtdServerConfig::default()
        };
        // mgmtd's in-flight calls at shutdown are routing long polls of the
        // storage nodes stopped just before it: no reason to wait for them.
        let mgmtd_server = ServerConfig {
            drain_timeout: MGMTD_DRAIN_TIMEOUT,
            ..ServerConfig::default()
        };
        let mgmtd = crate::mgmtd::start(&mgmtd_cfg, engine.clone(), mgmtd_server)
            .await
            .context("mgmtd")?;
        let client = MgmtClient::new(vec![mgmtd.local_addr()])?;
        wait_for_primary(&client, READY_TIMEOUT).await?;
        let meta_addr = loopback(ports.meta);
        let mut storage = Vec::new();
        for (i, port) in ports.storage.iter().enumerate() {
            let node = storage_node_id(i as u32);
            let targets = (1..=TARGETS_PER_NODE)
                .map(|t| {
                    let id = TargetId::from(node) * 100 + TargetId::from(t);
                    TargetConfig {
                        id,
                        path: dir.target_dir(node, id),
                    }
                })
                .collect();
            let cfg = StorageConfig {
                node_id: node,
                listen: loopback(*port),
                mgmtd: vec![mgmtd.local_addr()],
                targets,
                // One collector is enough for the cluster.
                meta: if i == 0 { vec![meta_addr] } else { Vec::new() },
                ..StorageConfig::default()
            };
            let started = crate::storage::start(cfg)
                .await
                .with_context(|| format!("storage node {node}"))?;
            storage.push(started);
        }
        let chains = ensure_chain_table(&client).await?;
        let meta_cfg = MetaServerConfig {
            listen: meta_addr,
            data_dir: dir.root.clone(),
            kv,
            namespace: MetaConfig {
                stripe: (chains.len() as u32).min(STRIPE_MAX),
                chains,
                ..MetaConfig::default()
            },
        };
        meta_cfg.validate()?;
        let meta = crate::meta::start(&meta_cfg, engine.clone())
            .await
            .context("meta")?;
        Ok(LocalCluster {
            file: ClusterFile {
                mgmtd: vec![mgmtd.local_addr()],
                meta: vec![meta.local_addr()],
            },
            mgmtd,
            meta,
            storage,
            client,
            _engine: engine,
        })
    }

    /// Waits until every target is SERVING and meta answers.
    async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let meta = MetaClient::new(MetaClientConfig::new(self.file.meta.clone()))?;
        let mut last_report = tokio::time::Instant::now();
        loop {
            let routing = self.client.routing_info(0, Duration::ZERO).await;
            let unhealthy = match &routing {
                Ok(Some(r)) => not_serving(r),
                Ok(None) => vec!["no routing info yet".into()],
                Err(e) => vec![format!("mgmtd: {e}")],
            };
            if unhealthy.is_empty() {
                let statfs = tokio::time::timeout(Duration::from_secs(5), meta.statfs()).await;
                if matches!(statfs, Ok(Ok(_))) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the cluster is not healthy after {timeout:?}: {}",
                    unhealthy.join(", ")
                );
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                tracing::info!(waiting_for = ?unhealthy, "waiting for every target to be SERVING");
                last_report = tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Meta first (it drains in-flight requests), then storage, then mgmtd.
    async fn shutdown(self) {
        self.meta.shutdown().await;
        for s in self.storage {
            s.shutdown().await;
        }
        self.mgmtd.shutdown().await;
    }
}

/// Targets that should be SERVING and are not, as "target N: STATE".
fn not_serving(r: &RoutingInfo) -> Vec<String> {
    let expected = (STORAGE_NODES * TARGETS_PER_NODE) as usize;
    let mut v: Vec<String> = r
        .targets
        .iter()
        .filter(|t| t.public_state != PublicState::Serving)
        .map(|t| format!("target {}: {:?}", t.id, t.public_state))
        .collect();
    if r.targets.len() < expected {
        v.push(format!(
            "{} of {expected} targets registered",
            r.targets.len()
        ));
    }
    v
}

async fn wait_for_primary(client: &MgmtClient, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match client.primary().await {
            Ok(p) if p.this_is_primary => return Ok(()),
            Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(POLL_INTERVAL).await
            }
            Ok(_) => bail!("mgmtd did not take the primary lease within {timeout:?}"),
            Err(e) => return Err(e).context("ask mgmtd for the primary"),
        }
    }
}

/// The chains of chain table 1, created over every registered target on the
/// first start.
async fn ensure_chain_table(client: &MgmtClient) -> anyhow::Result<Vec<ChainId>> {
    let routing = client
        .routing_info(0, Duration::ZERO)
        .await
        .context("get routing info from mgmtd")?
        .context("mgmtd returned no routing info")?;
    if let Some(t) = routing.chain_tables.first() {
        return Ok(t.chains.clone());
    }
    let table = client
        .create_chain_table(CreateChainTableRequest {
            table: 1,
            replicas: REPLICAS,
            chains: None,
        })
        .await
        .context("create the chain table")?;
    tracing::info!(chains = ?table.chains, replicas = table.replicas, "chain table created");
    Ok(table.chains)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_logs_are_named_after_the_mountpoint() {
        let dir = DataDir::new(Path::new("/d")).unwrap();
        assert_eq!(
            dir.mount_log(Path::new("/mnt/a b/c")),
            Path::new("/d/logs/mount-mnt-a_b-c.log")
        );
    }

    #[test]
    fn chosen_ports_are_distinct_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path()).unwrap();
        let first = Ports::load_or_choose(&dir).unwrap();
        let mut all: Vec<u16> = first.named().iter().map(|(_, p)| *p).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 + STORAGE_NODES as usize);
        // Below the range outgoing connections take their ports from.
        if let Some(ephemeral) = ephemeral_ports_start().filter(|&p| p > FIXED_PORTS_MIN + 1000) {
            assert!(
                all.iter()
                    .all(|&p| (FIXED_PORTS_MIN..ephemeral).contains(&p)),
                "{all:?} vs ephemeral ports from {ephemeral}"
            );
        }
        assert_eq!(Ports::load_or_choose(&dir).unwrap(), first);
        let _taken = TcpListener::bind(loopback(first.meta)).unwrap();
        let err = format!("{:#}", Ports::load_or_choose(&dir).unwrap_err());
        assert!(err.contains("(meta)") && err.contains("not free"), "{err}");
    }
}
