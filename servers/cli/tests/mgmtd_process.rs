//! mgmtd as operators run it: an `r3fs kv` server and three `r3fs mgmtd`
//! processes sharing it. The primary is killed with SIGKILL, or stopped with
//! SIGSTOP past its lease and resumed; the admin CLI reads a live cluster.

mod common;

use std::time::{Duration, Instant};

use common::{r3fs, ServerProcess};
use nix::sys::signal::Signal;
use r3fs_client::MgmtClient;
use r3fs_wire::mgmt::{NodeType, PrimaryInfo, RegisterNodeRequest};

const LEASE_MS: u64 = 2000;
const CHECK_MS: u64 = 100;
/// Failover must finish within lease + check interval; this much more is
/// allowed for process scheduling on a loaded 2-core CI machine.
const FAILOVER_SLACK: Duration = Duration::from_secs(5);

struct Cluster {
    mgmtd: Vec<Option<ServerProcess>>,
    _kv: ServerProcess,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let kv_data = dir.path().join("kv");
        let kv = ServerProcess::start(
            &["kv", "--data-dir", kv_data.to_str().unwrap()],
            &dir.path().join("kv.log"),
        );
        let kv_addr = kv.addr.to_string();
        let mgmtd = (1..=n)
            .map(|id| {
                let args = [
                    "mgmtd",
                    "--node-id",
                    &id.to_string(),
                    "--kv-remote",
                    &kv_addr,
                    "--lease-ms",
                    &LEASE_MS.to_string(),
                    "--extend-interval-ms",
                    "300",
                    "--check-interval-ms",
                    &CHECK_MS.to_string(),
                    "--heartbeat-timeout-ms",
                    "1000",
                ];
                Some(ServerProcess::start(
                    &args,
                    &dir.path().join(format!("mgmtd{id}.log")),
                ))
            })
            .collect();
        Cluster {
            mgmtd,
            _kv: kv,
            _dir: dir,
        }
    }

    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.mgmtd.iter().flatten().map(|p| p.addr).collect()
    }

    fn admin(&self, args: &[&str]) -> std::process::Output {
        let servers: Vec<String> = self.addrs().iter().map(|a| a.to_string()).collect();
        let joined = servers.join(",");
        let mut all = vec!["admin", "--mgmtd", &joined];
        all.extend_from_slice(args);
        r3fs(&all)
    }

    fn logs(&self) -> String {
        self.mgmtd
            .iter()
            .flatten()
            .map(|p| p.log_text())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

async fn ask(addr: std::net::SocketAddr) -> Option<PrimaryInfo> {
    MgmtClient::new(vec![addr]).ok()?.primary().await.ok()
}

/// Index of the instance that says it is primary, polled until `timeout`.
async fn wait_primary(
    cluster: &Cluster,
    skip: Option<usize>,
    timeout: Duration,
) -> Option<(usize, PrimaryInfo)> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for (i, p) in cluster.mgmtd.iter().enumerate() {
            let Some(p) = p else { continue };
            if Some(i) == skip {
                continue;
            }
            if let Some(info) = ask(p.addr).await {
                if info.this_is_primary {
                    return Some((i, info));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_hands_the_lease_to_a_standby() {
    let mut cluster = Cluster::start(3);
    let (first, info) = wait_primary(&cluster, None, Duration::from_secs(20))
        .await
        .expect("a primary");
    let killed = Instant::now();
    cluster.mgmtd[first]
        .as_ref()
        .unwrap()
        .signal(Signal::SIGKILL);
    cluster.mgmtd[first] = None;
    let limit = Duration::from_millis(LEASE_MS + CHECK_MS) + FAILOVER_SLACK;
    let (next, new) = wait_primary(&cluster, None, limit)
        .await
        .unwrap_or_else(|| panic!("no standby took over within {limit:?}:\n{}", cluster.logs()));
    let took = killed.elapsed();
    assert_ne!(next, first);
    assert!(
        new.epoch > info.epoch,
        "epoch {} -> {}",
        info.epoch,
        new.epoch
    );
    println!("failover after kill -9 took {took:?} (lease {LEASE_MS} ms, check {CHECK_MS} ms)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_paused_past_its_lease_does_not_act_as_primary_when_resumed() {
    let cluster = Cluster::start(3);
    let (old, before) = wait_primary(&cluster, None, Duration::from_secs(20))
        .await
        .expect("a primary");
    let old_addr = cluster.mgmtd[old].as_ref().unwrap().addr;
    cluster.mgmtd[old].as_ref().unwrap().signal(Signal::SIGSTOP);
    let limit = Duration::from_millis(LEASE_MS + CHECK_MS) + FAILOVER_SLACK;
    let (new, after) = wait_primary(&cluster, Some(old), limit)
        .await
        .unwrap_or_else(|| {
            panic!(
                "no standby took over from the paused primary:\n{}",
                cluster.logs()
            )
        });
    assert!(after.epoch > before.epoch);
    cluster.mgmtd[old].as_ref().unwrap().signal(Signal::SIGCONT);
    // For a while after resuming, the old primary must never claim the lease,
    // and a state change sent to it alone must be refused.
    let watch_until = Instant::now() + Duration::from_millis(1500);
    let mut answers = 0;
    while Instant::now() < watch_until {
        if let Some(info) = ask(old_addr).await {
            answers += 1;
            assert!(
                !info.this_is_primary,
                "resumed old primary claims to be primary: {info:?}"
            );
            assert_eq!(info.primary, Some(after.this_node));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answers > 0, "the resumed mgmtd answered at all");
    let only_old = MgmtClient::new(vec![old_addr]).unwrap();
    let refused = only_old.extend_session(1, "probe").await;
    assert!(
        refused.is_err(),
        "the old primary accepted a state change: {refused:?}"
    );
    let still = ask(cluster.mgmtd[new].as_ref().unwrap().addr)
        .await
        .unwrap();
    assert!(
        still.this_is_primary && still.epoch == after.epoch,
        "{still:?}"
    );
    assert!(
        cluster.mgmtd[old]
            .as_ref()
            .unwrap()
            .log_text()
            .contains("stepping down"),
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_show_a_live_cluster() {
    let cluster = Cluster::start(1);
    wait_primary(&cluster, None, Duration::from_secs(20))
        .await
        .expect("a primary");
    let client = MgmtClient::new(cluster.addrs()).unwrap();
    for node in 1..=3u32 {
        let req = RegisterNodeRequest {
            id: Some(100 + node),
            node_type: NodeType::Storage,
            address: format!("127.0.0.1:{}", 30000 + node),
            hostname: format!("storage{node}"),
            targets: vec![1000 + node as u64, 2000 + node as u64],
        };
        client.register(req).await.unwrap();
    }
    let ok = |args: &[&str]| {
        let out = cluster.admin(args);
        assert!(
            out.status.success(),
            "admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(ok(&["create-chain-table", "--replicas", "3"]).contains("2 chains of 3 replicas"));
    let chains = ok(&["list-chains"]);
    assert!(
        chains.contains("Serving") && chains.lines().count() == 3,
        "{chains}"
    );
    let nodes = ok(&["list-nodes"]);
    assert!(
        nodes.contains("storage2") && nodes.contains("alive"),
        "{nodes}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&["list-targets", "--json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 6);
    assert!(ok(&["list-chain-tables"]).contains("3"));
    assert!(ok(&["show-primary"]).contains("primary: node 1"));
    ok(&["offline-target", "1001"]);
    assert!(ok(&["list-targets"]).contains("Offline"));
    let refused = cluster.admin(&["create-chain-table", "--replicas", "3"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("exists"));
    // An unreachable mgmtd gives a clear error, not a hang.
    let dead = common::free_addr().to_string();
    let out = r3fs(&["admin", "--mgmtd", &dead, "list-nodes"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dead) && err.contains("error"), "{err}");
}
