//! [`ProcessCluster`]: a whole cluster as operators run it, each server its
//! own `r3fs` process: `r3fs kv`, `r3fs mgmtd` with short leases and
//! heartbeat timeouts (a killed node goes offline in seconds), optionally
//! `r3fs meta`, storage node `n + 1` serving target `101 + n`, and a chain
//! table made by `r3fs admin create-chain-table`. Every process is killed by
//! pid when the cluster is dropped, pass or fail, and then its temporary
//! directory is removed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use r3fs_client::storage::StorageClientConfig;
use r3fs_client::StorageClient;
use r3fs_wire::mgmt::RoutingInfo;
use serde_json::Value;

use super::{eventually, free_addr, r3fs, ServerProcess};

/// Longest wait for the cluster to reach a state (serving, a target state).
pub const WAIT: Duration = Duration::from_secs(60);
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The chain the chain table makes first; meta's default layout uses it.
pub const CHAIN: u64 = 1;
/// Storage node `n + 1` serves target `FIRST_TARGET + n`.
pub const FIRST_TARGET: u64 = 101;

/// mgmtd's timings: a node without heartbeats for 1.5 s goes offline.
const MGMTD_ARGS: [&str; 8] = [
    "--lease-ms",
    "4000",
    "--extend-interval-ms",
    "500",
    "--check-interval-ms",
    "200",
    "--heartbeat-timeout-ms",
    "1500",
];
const HEARTBEAT_INTERVAL_MS: &str = "200";
const GC_INTERVAL_MS: &str = "200";

/// Which meta server a cluster runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Meta {
    None,
    /// `r3fs meta` on its own local engine, started before the storage
    /// nodes, which collect removed files' chunks from it
    /// (`--meta`, `--gc-interval-ms 200`).
    Collecting,
    /// `r3fs meta --engine remote` on mgmtd's kv server, started once the
    /// chain table serves.
    OnKv,
}

/// How to start a [`ProcessCluster`]: by default three storage nodes, one
/// chain of three, no meta.
pub struct Builder {
    meta: Meta,
    storage_nodes: usize,
    replicas: usize,
}

impl Builder {
    pub fn meta(mut self, meta: Meta) -> Builder {
        self.meta = meta;
        self
    }

    pub fn storage_nodes(mut self, n: usize) -> Builder {
        self.storage_nodes = n;
        self
    }

    pub fn replicas(mut self, n: usize) -> Builder {
        self.replicas = n;
        self
    }

    /// Starts every process and returns once every chain serves (and meta,
    /// if any, listens). With meta, `cluster.toml` names mgmtd and meta.
    #[track_caller]
    pub fn start(self) -> ProcessCluster {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let kv = ServerProcess::start(
            &["kv", "--data-dir", p("kv").to_str().unwrap()],
            &p("kv.log"),
        );
        let kv_addr = kv.addr.to_string();
        let mut mgmtd_args = vec!["mgmtd", "--node-id", "1", "--kv-remote", &kv_addr];
        mgmtd_args.extend(MGMTD_ARGS);
        let mgmtd = ServerProcess::start(&mgmtd_args, &p("mgmtd.log"));
        let mgmtd_addr = mgmtd.addr.to_string();
        let mut c = ProcessCluster {
            _kv: kv,
            kv_addr,
            _mgmtd: mgmtd,
            mgmtd_addr,
            meta_kind: self.meta,
            meta: None,
            meta_addr: free_addr(),
            storage: (0..self.storage_nodes).map(|_| None).collect(),
            replicas: self.replicas,
            dir,
        };
        if c.meta_kind == Meta::Collecting {
            c.start_meta();
        }
        for n in 0..self.storage_nodes {
            c.start_storage(n);
        }
        // A storage node listens before it registers: the table is planned
        // over the targets mgmtd knows, so wait for all of them.
        let nodes = self.storage_nodes;
        eventually(
            "every storage target is registered",
            WAIT,
            POLL_INTERVAL,
            || {
                let out = c.admin_cmd(&["list-targets", "--json"]);
                out.status.success()
                    && serde_json::from_slice::<Value>(&out.stdout)
                        .is_ok_and(|t| t.as_array().is_some_and(|t| t.len() >= nodes))
            },
        );
        let replicas = self.replicas.to_string();
        let out = c.admin_cmd(&["create-chain-table", "--replicas", &replicas]);
        assert!(
            out.status.success(),
            "create-chain-table: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_serving("the chain serves");
        let chains = c.admin("list-chains");
        assert_eq!(chains[0]["id"], CHAIN, "{chains}");
        if c.meta_kind == Meta::OnKv {
            c.start_meta();
        }
        if c.meta_kind != Meta::None {
            let text = format!(
                "mgmtd = [\"{}\"]\nmeta = [\"{}\"]\n",
                c.mgmtd_addr, c.meta_addr
            );
            std::fs::write(c.cluster_file(), text).unwrap();
        }
        c
    }
}

/// kv, mgmtd, maybe meta and storage nodes, each its own `r3fs` process.
pub struct ProcessCluster {
    _kv: ServerProcess,
    kv_addr: String,
    _mgmtd: ServerProcess,
    mgmtd_addr: String,
    meta_kind: Meta,
    meta: Option<ServerProcess>,
    /// Meta's address, the same across restarts.
    meta_addr: SocketAddr,
    storage: Vec<Option<ServerProcess>>,
    replicas: usize,
    /// Last: removed after every process is gone.
    dir: tempfile::TempDir,
}

impl ProcessCluster {
    pub fn builder() -> Builder {
        Builder {
            meta: Meta::None,
            storage_nodes: 3,
            replicas: 3,
        }
    }

    /// The cluster's temporary directory: data, logs, `cluster.toml`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Names mgmtd and meta, for `r3fs mount --cluster`.
    pub fn cluster_file(&self) -> PathBuf {
        self.path("cluster.toml")
    }

    pub fn mgmtd_addr(&self) -> &str {
        &self.mgmtd_addr
    }

    pub fn meta_addr(&self) -> SocketAddr {
        self.meta_addr
    }

    /// Starts meta on its address (the same one after a restart).
    pub fn start_meta(&mut self) {
        let data = self.path("meta");
        let log = self.path(&format!("meta.{}.log", unique()));
        let mut args = vec!["meta"];
        match self.meta_kind {
            Meta::None => panic!("this cluster runs no meta"),
            Meta::Collecting => {}
            Meta::OnKv => args.extend(["--engine", "remote", "--kv-remote", &self.kv_addr]),
        }
        args.extend(["--data-dir", data.to_str().unwrap()]);
        self.meta = Some(ServerProcess::start_at(&args, &log, self.meta_addr));
    }

    pub fn kill_meta(&mut self) {
        if let Some(p) = self.meta.take() {
            p.signal(Signal::SIGKILL);
        }
    }

    /// Starts storage node `n + 1` on target `101 + n`, on the same
    /// directory every time.
    pub fn start_storage(&mut self, n: usize) {
        let id = (n + 1).to_string();
        let target = format!(
            "{}={}",
            FIRST_TARGET + n as u64,
            self.path(&format!("t{id}")).display()
        );
        let log = self.path(&format!("storage{id}.{}.log", unique()));
        let mut args = vec![
            "storage",
            "--node-id",
            &id,
            "--mgmtd",
            &self.mgmtd_addr,
            "--target",
            &target,
            "--heartbeat-interval-ms",
            HEARTBEAT_INTERVAL_MS,
        ];
        let meta = self.meta_addr.to_string();
        if self.meta_kind == Meta::Collecting {
            args.extend(["--meta", &meta, "--gc-interval-ms", GC_INTERVAL_MS]);
        }
        self.storage[n] = Some(ServerProcess::start(&args, &log));
    }

    pub fn kill_storage(&mut self, n: usize) {
        if let Some(p) = self.storage[n].take() {
            p.signal(Signal::SIGKILL);
        }
    }

    /// Runs `r3fs admin --mgmtd <mgmtd> <args>`.
    pub fn admin_cmd(&self, args: &[&str]) -> std::process::Output {
        r3fs(&[&["admin", "--mgmtd", &self.mgmtd_addr], args].concat())
    }

    /// `r3fs admin <cmd> --json`, which must succeed.
    #[track_caller]
    pub fn admin(&self, cmd: &str) -> Value {
        super::admin_json(&self.mgmtd_addr, cmd)
    }

    /// Every chain's targets, head first, with their public states.
    pub fn chains(&self) -> Vec<Vec<(u64, String)>> {
        let chains = self.admin("list-chains");
        let targets = |chain: &Value| {
            chain["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["target"].as_u64().unwrap(),
                        t["state"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        chains.as_array().unwrap().iter().map(targets).collect()
    }

    /// The first chain's targets ([`CHAIN`]), head first.
    pub fn chain(&self) -> Vec<(u64, String)> {
        self.chains().swap_remove(0)
    }

    /// Waits until every chain has all its replicas serving, at most
    /// [`WAIT`]; prints and returns how long it took.
    #[track_caller]
    pub fn wait_serving(&self, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            let chains = self.chains();
            let serving = |c: &Vec<(u64, String)>| {
                c.len() == self.replicas && c.iter().all(|(_, s)| s == "Serving")
            };
            if !chains.is_empty() && chains.iter().all(serving) {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out after {WAIT:?} waiting until {what}: chains {chains:?}, targets {}\n{}",
                self.admin("list-targets"),
                self.logs()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
        let took = start.elapsed();
        println!("{what}: {took:?}");
        took
    }

    /// Waits until `target` (in chain [`CHAIN`]) is in `state`.
    #[track_caller]
    pub fn wait_target_state(&self, target: u64, state: &str) -> Duration {
        eventually(
            &format!("target {target} is {state}"),
            WAIT,
            POLL_INTERVAL,
            || self.chain().iter().any(|(t, s)| *t == target && s == state),
        )
    }

    /// The last 4000 bytes of every process's log, restarted ones too.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let from = text.len().saturating_sub(4000);
                let tail = text.get(from..).unwrap_or(&text);
                out.push_str(&format!("--- {}\n{tail}\n", path.display()));
            }
        }
        out
    }
}

/// The index of the storage node that serves `target`.
pub fn storage_index(target: u64) -> usize {
    (target - FIRST_TARGET) as usize
}

/// A client that reaches `node`'s replicas alone: routing in which only
/// `node`'s targets are in the chains. None if `node` holds no target. The
/// routing stays put while the returned sender lives.
pub fn single_node_client(
    routing: &RoutingInfo,
    node: u32,
) -> Option<(
    tokio::sync::watch::Sender<Option<Arc<RoutingInfo>>>,
    StorageClient,
)> {
    let mut one = routing.clone();
    for chain in &mut one.chains {
        chain
            .targets
            .retain(|t| routing.target(t.target).is_some_and(|i| i.node == node));
    }
    if one.chains.iter().all(|c| c.targets.is_empty()) {
        return None;
    }
    let (tx, rx) = tokio::sync::watch::channel(Some(Arc::new(one)));
    Some((tx, StorageClient::new(rx, StorageClientConfig::default())))
}

/// A number no other log name of this run used.
fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
