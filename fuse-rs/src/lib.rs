//! The r3fs FUSE daemon: answers kernel FUSE requests with the cluster
//! clients (meta for the namespace, storage for bytes, mgmtd for routing and
//! the client session).
//!
//! Layout: [`kernel`] owns the mount and the session fd; [`channel`] reads
//! requests from an fd and answers on the same fd; [`fs`] is the
//! `FileSystem` behind them; [`creds`], [`inodes`] and [`write_buffer`] are
//! the state it keeps. [`run`] wires them for one mount.
//!
//! Must not parse command lines or start servers: the `r3fs` binary does
//! that and hands a [`MountConfig`] to [`run`].
//!
//! # Limits
//! [`THREADS_MAX`] channel workers; waits for the cluster at most
//! [`CLUSTER_WAIT`] and for the kernel's INIT at most [`INIT_WAIT`].

pub mod channel;
pub mod creds;
pub mod fs;
pub mod inodes;
pub mod kernel;
pub mod memfs;
pub mod serve;
pub mod write_buffer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use r3fs_client::meta::{MetaClient, MetaClientConfig};
use r3fs_client::mgmt::{MgmtClient, RoutingWatcher};
use r3fs_client::storage::{StorageClient, StorageClientConfig};

use crate::channel::spin::SpinConfig;
use crate::channel::{ChannelMode, ChannelPlan, Interrupts, StatsHandle};
use crate::fs::{CacheTimeouts, R3fs};
use crate::kernel::{KernelSession, MountOptions};
pub use crate::serve::{resolve_mode, ChannelOptions, Served};

/// Most channel worker threads a mount runs.
pub const THREADS_MAX: usize = 1024;
/// Channel worker threads by default: each blocks on the network while it
/// serves a request, so a mount needs more of them than CPUs.
pub const THREADS_DEFAULT: usize = 8;
/// Kernel readahead by default, in KiB: four 1 MiB reads in flight.
pub const READAHEAD_KIB_DEFAULT: u32 = 4096;
/// Largest readahead window a mount asks for, in KiB.
pub const READAHEAD_KIB_MAX: u32 = 64 * 1024;
/// How long a mount waits for mgmtd routing info and a meta answer.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(30);
/// How long a mount waits for the kernel's INIT after mount(2).
pub const INIT_WAIT: Duration = Duration::from_secs(10);
/// How often the mount renews its client session with mgmtd.
pub const SESSION_RENEW_INTERVAL: Duration = Duration::from_secs(10);

/// Everything a mount needs to know.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// An existing empty directory to mount on.
    pub mountpoint: PathBuf,
    /// mgmtd addresses (routing info, client session).
    pub mgmtd: Vec<SocketAddr>,
    /// meta server addresses.
    pub meta: Vec<SocketAddr>,
    /// Shown as the source in /proc/mounts (`r3fs` by default).
    pub fsname: String,
    /// Worker threads reading the kernel channel.
    pub threads: usize,
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
    pub negative_timeout: Duration,
    /// Let the kernel cache writes (FUSE writeback cache).
    pub writeback_cache: bool,
    /// Let users other than the mounter use the mount (`allow_other`).
    pub allow_other: bool,
    /// The kernel's readahead window for this mount, in KiB.
    pub readahead_kib: u32,
    /// How worker threads wait for kernel requests.
    pub channel: ChannelMode,
    /// Share of the worker threads that wait the classic way (the
    /// feasibility report's `a`); None: 1 for `fuse`, 0 for `xfuse`.
    pub fuse_ratio: Option<f64>,
    /// The adaptive busy-wait of XFUSE channels.
    pub spin: SpinConfig,
    /// Where to write the channel counters (JSON) every second, for
    /// `r3fs status`.
    pub stats_path: Option<PathBuf>,
}

impl MountConfig {
    /// Defaults for everything but where to mount and which cluster.
    pub fn new(mountpoint: PathBuf, mgmtd: Vec<SocketAddr>, meta: Vec<SocketAddr>) -> MountConfig {
        MountConfig {
            mountpoint,
            mgmtd,
            meta,
            fsname: "r3fs".into(),
            threads: THREADS_DEFAULT,
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            negative_timeout: Duration::ZERO,
            writeback_cache: false,
            allow_other: true,
            readahead_kib: READAHEAD_KIB_DEFAULT,
            channel: ChannelMode::Auto,
            fuse_ratio: None,
            spin: SpinConfig::default(),
            stats_path: None,
        }
    }
}

/// Why a mount failed to start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("invalid mount configuration: {0}")]
    Config(String),
    #[error("mountpoint {path:?}: {reason}")]
    Mountpoint { path: PathBuf, reason: String },
    #[error("cannot open /dev/fuse: {0} (is the fuse module loaded, and are you root?)")]
    Device(String),
    #[error("mount on {path:?} failed: {}", describe_errno(*.errno))]
    Mount { path: PathBuf, errno: i32 },
    #[error("unmount of {path:?} failed: {}", describe_errno(*.errno))]
    Unmount { path: PathBuf, errno: i32 },
    #[error("cluster not reachable: {0}")]
    Cluster(String),
    #[error("the kernel sent no INIT within {0:?} after mounting")]
    InitTimeout(Duration),
    #[error("kernel channel failed: {}", describe_errno(*.0))]
    Channel(i32),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

fn describe_errno(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    match e {
        nix::errno::Errno::EPERM => format!("{e} (mounting FUSE needs root)"),
        nix::errno::Errno::EBUSY => format!("{e} (files are open on the mount)"),
        _ => e.to_string(),
    }
}

impl MountConfig {
    fn channel_options(&self) -> ChannelOptions {
        ChannelOptions {
            mode: self.channel,
            threads: self.threads,
            fuse_ratio: self.fuse_ratio,
            spin: self.spin,
        }
    }

    fn validate(&self) -> Result<(), FuseError> {
        self.channel_options().validate()?;
        resolve_mode(self.channel)?;
        if self.mgmtd.is_empty() {
            return Err(FuseError::Config("no mgmtd address".into()));
        }
        if self.meta.is_empty() {
            return Err(FuseError::Config("no meta address".into()));
        }
        if !(4..=READAHEAD_KIB_MAX).contains(&self.readahead_kib) {
            return Err(FuseError::Config(format!(
                "readahead must be between 4 and {READAHEAD_KIB_MAX} KiB, not {}",
                self.readahead_kib
            )));
        }
        if self.fsname.is_empty() || self.fsname.contains([',', ' ', '\n']) {
            return Err(FuseError::Config(format!(
                "fsname {:?} must be non-empty without commas or spaces",
                self.fsname
            )));
        }
        Ok(())
    }
}

/// Mounts `config.mountpoint`, calls `ready` once the mount answers
/// requests, and serves until it is unmounted (`umount`) or the process gets
/// SIGTERM/SIGINT (then it detaches the mount and serves files still open
/// until they close). Blocks the calling thread.
pub fn run(config: MountConfig, ready: impl FnOnce()) -> Result<(), FuseError> {
    config.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("r3fs-client")
        .enable_all()
        .build()?;
    let clients = rt.block_on(connect(&config))?;
    let interrupts = Arc::new(Interrupts::default());
    let fs = Arc::new(R3fs::new(
        rt.handle().clone(),
        clients.meta.clone(),
        clients.storage.clone(),
        CacheTimeouts {
            attr: config.attr_timeout,
            entry: config.entry_timeout,
            negative: config.negative_timeout,
        },
        config.writeback_cache,
        interrupts.clone(),
        (config.threads / 2).max(1),
    ));
    let kernel = Arc::new(KernelSession::mount(
        &config.mountpoint,
        &MountOptions {
            fsname: &config.fsname,
            allow_other: config.allow_other,
        },
    )?);
    fs.attach_kernel(kernel.clone());
    tracing::info!(mountpoint = ?config.mountpoint, threads = config.threads, client = clients.meta.client_id(), "mounted");

    let served = Served::start(
        fs.clone(),
        kernel.clone(),
        &config.channel_options(),
        interrupts,
    )?;
    let (mode, plan) = (served.mode(), served.plan().clone());
    if let Err(e) = kernel::set_readahead(&config.mountpoint, config.readahead_kib) {
        // Reads still work with the kernel's default window, only slower.
        tracing::warn!(error = %e, kib = config.readahead_kib, "cannot set the mount's readahead");
    }
    ready();

    let mut background = spawn_background(&rt, &fs, &kernel, &clients, &config);
    if let Some(path) = config.stats_path.clone() {
        background.push(rt.spawn(write_stats_forever(path, mode, plan, served.stats())));
    }
    let failure = served.join();
    for task in background {
        task.abort();
    }
    fs.flush_all();
    rt.block_on(async {
        fs.report_lengths().await;
        fs.drop_locks().await;
        if let Err(e) = clients.mgmt.close_session(clients.meta.client_id()).await {
            tracing::debug!(error = %e, "closing the mgmtd session failed; it expires");
        }
    });
    tracing::info!(mountpoint = ?config.mountpoint, "unmounted; daemon exits");
    match failure {
        Some(e) => Err(FuseError::Channel(e)),
        None => Ok(()),
    }
}

struct Clients {
    mgmt: MgmtClient,
    meta: MetaClient,
    storage: StorageClient,
    _routing: RoutingWatcher,
}

/// Connects to the cluster: routing info from mgmtd and an answer from meta,
/// or an error naming the addresses that did not answer.
async fn connect(config: &MountConfig) -> Result<Clients, FuseError> {
    let mgmt =
        MgmtClient::new(config.mgmtd.clone()).map_err(|e| FuseError::Cluster(e.to_string()))?;
    let mut routing = RoutingWatcher::start(mgmt.clone());
    if routing.wait_for(CLUSTER_WAIT, |_| true).await.is_none() {
        return Err(FuseError::Cluster(format!(
            "no routing info from mgmtd {:?} within {CLUSTER_WAIT:?}",
            config.mgmtd
        )));
    }
    let meta = MetaClient::new(MetaClientConfig::new(config.meta.clone()))
        .map_err(|e| FuseError::Cluster(e.to_string()))?;
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        match meta.statfs().await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(FuseError::Cluster(format!("meta {:?}: {e}", config.meta)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let storage = StorageClient::new(routing.subscribe(), StorageClientConfig::default());
    Ok(Clients {
        mgmt,
        meta,
        storage,
        _routing: routing,
    })
}

/// What `r3fs status` reads about a running mount.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountStats {
    pub mode: ChannelMode,
    pub classic_threads: usize,
    pub xfuse_channels: usize,
    /// io_uring queues (0 unless the mode is uring).
    #[serde(default)]
    pub uring_queues: usize,
    pub channels: Vec<channel::ChannelReport>,
}

/// How often the stats file is rewritten.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

async fn write_stats_forever(
    path: PathBuf,
    mode: ChannelMode,
    plan: ChannelPlan,
    stats: StatsHandle,
) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    loop {
        tick.tick().await;
        let report = MountStats {
            mode,
            classic_threads: plan.classic_threads,
            xfuse_channels: plan.xfuse_channels.len(),
            uring_queues: plan.uring.map(|u| u.queues).unwrap_or(0),
            channels: stats.reports(),
        };
        let Ok(json) = serde_json::to_vec_pretty(&report) else {
            continue;
        };
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::debug!(error = %e, path = ?path, "cannot write channel stats");
        }
    }
}

/// The mount's periodic work (length reports, session and lock-lease
/// renewal) and its signal handler.
fn spawn_background(
    rt: &tokio::runtime::Runtime,
    fs: &Arc<R3fs>,
    kernel: &Arc<KernelSession>,
    clients: &Clients,
    config: &MountConfig,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let f = fs.clone();
    tasks.push(rt.spawn(async move {
        let mut tick = tokio::time::interval(fs::HINT_INTERVAL);
        loop {
            tick.tick().await;
            f.report_lengths().await;
        }
    }));
    let f = fs.clone();
    tasks.push(rt.spawn(async move { f.renew_locks_forever().await }));
    let mgmt = clients.mgmt.clone();
    let client = clients.meta.client_id();
    let description = format!(
        "fuse {}:{}",
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config.mountpoint.display()
    );
    tasks.push(rt.spawn(async move {
        let mut tick = tokio::time::interval(SESSION_RENEW_INTERVAL);
        loop {
            tick.tick().await;
            if let Err(e) = mgmt.extend_session(client, &description).await {
                tracing::warn!(error = %e, "renewing the client session with mgmtd failed");
            }
        }
    }));
    let k = kernel.clone();
    tasks.push(rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers; stop the mount with `r3fs umount`");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(mountpoint = ?k.mountpoint(), "signal received: detaching the mount; open files are served until closed");
        if let Err(e) = k.unmount_lazy() {
            tracing::error!(error = %e, "detaching the mount failed");
        }
    }));
    tasks
}
