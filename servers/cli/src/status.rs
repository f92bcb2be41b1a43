//! `r3fs status`: the mounts of a data directory, its local cluster, and the
//! health of the cluster as mgmtd and meta report it. Read-only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use r3fs_wire::mgmt::{Chain, NodeInfo, PrimaryInfo, PublicState, TargetInfo};
use serde::Serialize;

use crate::admin::{chains_table, table};
use crate::cluster_file::ClusterFile;
use crate::local_cluster::{self, ClusterState, DataDir, DataDirArg};
use crate::mount::{self, daemon, registry};

/// How long status waits for mgmtd or meta before reporting them unreachable.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
#[command(
    long_about = "Show r3fs mounts (path, daemon pid, whether it runs and is mounted), the \
        local cluster of the data directory, and the cluster's health: the primary mgmtd, \
        nodes, chains and targets with their states, and whether meta answers.\n\n\
        The cluster shown is --cluster FILE, else DATA_DIR/cluster.toml."
)]
pub struct StatusArgs {
    #[command(flatten)]
    dir: DataDirArg,
    /// Cluster file of the cluster to check [default: DATA_DIR/cluster.toml].
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Status {
    data_dir: PathBuf,
    local_cluster: Option<ClusterState>,
    mounts: Vec<MountStatus>,
    cluster: Option<ClusterHealth>,
}

#[derive(Serialize)]
struct MountStatus {
    mountpoint: PathBuf,
    pid: i32,
    /// The daemon process runs.
    alive: bool,
    /// The kernel has an r3fs mount there.
    mounted: bool,
    cluster: PathBuf,
    local: bool,
    log: Option<PathBuf>,
    /// The daemon's channel mode and per-channel counters (rewritten by
    /// the daemon every second while it runs).
    channels: Option<r3fs_fuse::MountStats>,
}

#[derive(Serialize)]
struct ClusterHealth {
    cluster_file: PathBuf,
    mgmtd: Vec<SocketAddr>,
    meta: Vec<SocketAddr>,
    /// Why mgmtd could not be asked, if it could not.
    mgmtd_error: Option<String>,
    primary: Option<PrimaryInfo>,
    nodes: Vec<NodeInfo>,
    chains: Vec<Chain>,
    targets: Vec<TargetInfo>,
    /// Targets in chains that are SERVING, of all targets in chains.
    serving_targets: usize,
    chain_targets: usize,
    meta_ok: bool,
    meta_error: Option<String>,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let dir = DataDir::new(&args.dir.data_dir)?;
    let mounts = registry::read(&dir)?
        .into_iter()
        .map(|m| MountStatus {
            channels: read_channel_stats(&dir, &m.mountpoint),
            alive: daemon::alive(m.pid),
            mounted: mount::r3fs_mount_at(&m.mountpoint).is_some(),
            mountpoint: m.mountpoint,
            pid: m.pid,
            cluster: m.cluster,
            local: m.local,
            log: m.log,
        })
        .collect();
    let cluster_file = args.cluster.clone().unwrap_or_else(|| dir.cluster_file());
    let cluster = match (&args.cluster, cluster_file.exists()) {
        (Some(_), _) | (None, true) => Some(health(cluster_file)?),
        (None, false) => None,
    };
    let status = Status {
        data_dir: dir.root.clone(),
        local_cluster: local_cluster::state(&dir),
        mounts,
        cluster,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status, &dir);
    }
    Ok(())
}

fn health(cluster_file: PathBuf) -> anyhow::Result<ClusterHealth> {
    let file = ClusterFile::load(&cluster_file)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let mut h = ClusterHealth {
            cluster_file,
            mgmtd: file.mgmtd.clone(),
            meta: file.meta.clone(),
            mgmtd_error: None,
            primary: None,
            nodes: Vec::new(),
            chains: Vec::new(),
            targets: Vec::new(),
            serving_targets: 0,
            chain_targets: 0,
            meta_ok: false,
            meta_error: None,
        };
        let mgmt = r3fs_client::MgmtClient::new(file.mgmtd.clone())?;
        match tokio::time::timeout(QUERY_TIMEOUT, mgmt.primary()).await {
            Ok(Ok(p)) => h.primary = Some(p),
            Ok(Err(e)) => h.mgmtd_error = Some(e.to_string()),
            Err(_) => h.mgmtd_error = Some(format!("no answer within {QUERY_TIMEOUT:?}")),
        }
        if h.mgmtd_error.is_none() {
            let routing = mgmt.routing_info(0, Duration::ZERO);
            match tokio::time::timeout(QUERY_TIMEOUT, routing).await {
                Ok(Ok(Some(r))) => {
                    h.chain_targets = r.chains.iter().map(|c| c.targets.len()).sum();
                    h.serving_targets = r
                        .chains
                        .iter()
                        .flat_map(|c| &c.targets)
                        .filter(|t| t.state == PublicState::Serving)
                        .count();
                    h.nodes = r.nodes;
                    h.chains = r.chains;
                    h.targets = r.targets;
                }
                Ok(Ok(None)) => h.mgmtd_error = Some("no routing info yet".into()),
                Ok(Err(e)) => h.mgmtd_error = Some(e.to_string()),
                Err(_) => h.mgmtd_error = Some(format!("no answer within {QUERY_TIMEOUT:?}")),
            }
        }
        let meta =
            r3fs_client::MetaClient::new(r3fs_client::MetaClientConfig::new(file.meta.clone()))?;
        match tokio::time::timeout(QUERY_TIMEOUT, meta.statfs()).await {
            Ok(Ok(_)) => h.meta_ok = true,
            Ok(Err(e)) => h.meta_error = Some(e.to_string()),
            Err(_) => h.meta_error = Some(format!("no answer within {QUERY_TIMEOUT:?}")),
        }
        Ok(h)
    })
}

fn read_channel_stats(
    dir: &DataDir,
    mountpoint: &std::path::Path,
) -> Option<r3fs_fuse::MountStats> {
    let bytes = std::fs::read(mount::stats_path(dir, mountpoint)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// One mount's channels: mode, and the counters of each channel.
fn print_channels(m: &MountStatus) {
    let Some(c) = &m.channels else {
        return;
    };
    println!();
    println!(
        "{}: channel mode {}, {} classic thread(s), {} XFUSE channel(s), {} io_uring queue(s)",
        m.mountpoint.display(),
        c.mode,
        c.classic_threads,
        c.xfuse_channels,
        c.uring_queues
    );
    let rows = c.channels.iter().map(|ch| {
        vec![
            ch.name.clone(),
            ch.kind.clone(),
            ch.threads.to_string(),
            ch.requests.to_string(),
            ch.spin_hits.to_string(),
            ch.spin_misses.to_string(),
            ch.blocking_waits.to_string(),
            format!("{:.1}", ch.spin_budget_ns as f64 / 1000.0),
        ]
    });
    table(
        &[
            "CHANNEL",
            "KIND",
            "THREADS",
            "REQUESTS",
            "SPIN HITS",
            "SPIN MISSES",
            "BLOCKING WAITS",
            "BUDGET µs",
        ],
        rows,
    );
}

fn print_status(s: &Status, dir: &DataDir) {
    println!("data dir: {}", s.data_dir.display());
    match &s.local_cluster {
        Some(c) => println!(
            "local cluster: running, pid {}, {}{}",
            c.pid.map_or("?".into(), |p| p.to_string()),
            if c.ready { "ready" } else { "starting" },
            if c.started_by_mount {
                " (started by r3fs mount; stops with its last mount)"
            } else {
                ""
            }
        ),
        None => println!("local cluster: not running"),
    }
    println!();
    if s.mounts.is_empty() {
        println!("mounts: none");
    } else {
        let rows = s.mounts.iter().map(|m| {
            vec![
                m.mountpoint.display().to_string(),
                m.pid.to_string(),
                if m.alive { "running" } else { "EXITED" }.into(),
                if m.mounted { "mounted" } else { "NOT MOUNTED" }.into(),
                if m.local {
                    "local".into()
                } else {
                    m.cluster.display().to_string()
                },
            ]
        });
        table(&["MOUNTPOINT", "PID", "DAEMON", "KERNEL", "CLUSTER"], rows);
        for m in s.mounts.iter().filter(|m| m.alive) {
            print_channels(m);
        }
    }
    println!();
    let Some(h) = &s.cluster else {
        println!(
            "cluster: no cluster file ({} does not exist; pass --cluster FILE)",
            dir.cluster_file().display()
        );
        return;
    };
    println!("cluster: {}", h.cluster_file.display());
    match (&h.primary, &h.mgmtd_error) {
        (_, Some(e)) => println!("  mgmtd {:?}: UNREACHABLE: {e}", h.mgmtd),
        (Some(p), None) => match (&p.primary, &p.primary_address) {
            (Some(id), Some(addr)) => {
                println!("  mgmtd: primary node {id} at {addr}, epoch {}", p.epoch)
            }
            _ => println!("  mgmtd {:?}: NO PRIMARY holds the lease", h.mgmtd),
        },
        (None, None) => {}
    }
    match &h.meta_error {
        None => println!("  meta {:?}: answering", h.meta),
        Some(e) => println!("  meta {:?}: UNREACHABLE: {e}", h.meta),
    }
    if h.mgmtd_error.is_some() {
        return;
    }
    println!(
        "  targets: {}/{} in chains SERVING",
        h.serving_targets, h.chain_targets
    );
    println!();
    let rows = h.nodes.iter().map(|n| {
        vec![
            n.id.to_string(),
            format!("{:?}", n.node_type),
            n.address.clone(),
            if n.alive { "alive" } else { "DOWN" }.into(),
        ]
    });
    table(&["NODE", "TYPE", "ADDRESS", "STATE"], rows);
    println!();
    chains_table(&h.chains);
}
