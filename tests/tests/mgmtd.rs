//! mgmtd over real RPC on loopback: primary failover, heartbeats taking
//! targets offline and a restarted node resyncing, sessions, bad input.

use std::time::{Duration, Instant};

use r3fs_client::{ClientError, MgmtClient, RoutingWatcher};
use r3fs_tests::MgmtdCluster;
use r3fs_wire::mgmt::*;

const WAIT: Duration = Duration::from_secs(10);

#[track_caller]
fn check_errno<T: std::fmt::Debug>(r: Result<T, ClientError>, errno: i32) {
    match r {
        Err(e) => assert_eq!(e.errno(), errno, "expected errno {errno}, got {e}"),
        Ok(v) => panic!("expected errno {errno}, got Ok({v:?})"),
    }
}

async fn register_storage(c: &MgmtClient, node: NodeId, targets: &[TargetId]) {
    c.register(RegisterNodeRequest {
        id: Some(node),
        node_type: NodeType::Storage,
        address: format!("127.0.0.1:{}", 30000 + node),
        hostname: format!("storage{node}"),
        targets: targets.to_vec(),
    })
    .await
    .unwrap();
}

async fn beat(c: &MgmtClient, node: NodeId, target: TargetId, state: LocalState) {
    c.heartbeat(HeartbeatRequest {
        node,
        targets: vec![(target, state)],
    })
    .await
    .unwrap();
}

fn states(r: &RoutingInfo, chain: ChainId) -> Vec<(TargetId, PublicState)> {
    r.chain(chain)
        .unwrap()
        .targets
        .iter()
        .map(|t| (t.target, t.state))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_after_the_primary_stops() {
    let mut cluster = MgmtdCluster::start(3).await;
    let first = cluster.wait_for_primary(WAIT).await.expect("a primary");
    let epoch = cluster.client().primary().await.unwrap().epoch;
    let stopped = Instant::now();
    cluster.stop(first).await;
    let next = cluster.wait_for_primary(WAIT).await.expect("a new primary");
    let took = stopped.elapsed();
    assert_ne!(next, first);
    let info = cluster.client().primary().await.unwrap();
    assert!(
        info.epoch > epoch,
        "takeover bumps the epoch: {} -> {}",
        epoch,
        info.epoch
    );
    println!("failover took {took:?} (lease 2 s, check 100 ms)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeout_takes_a_target_offline_and_the_restarted_node_resyncs() {
    let cluster = MgmtdCluster::start(2).await;
    cluster.wait_for_primary(WAIT).await.expect("a primary");
    let c = cluster.client();
    for n in 1..=3 {
        register_storage(&c, 100 + n, &[1000 + n as u64]).await;
    }
    let table = c
        .create_chain_table(CreateChainTableRequest {
            table: 1,
            replicas: 3,
            chains: None,
        })
        .await
        .unwrap();
    assert_eq!(table.chains.len(), 1);
    let chain = table.chains[0];
    let mut watcher = RoutingWatcher::start(c.clone());
    let start = watcher
        .wait_for(WAIT, |r| r.chain(chain).is_some())
        .await
        .unwrap();
    assert!(states(&start, chain)
        .iter()
        .all(|(_, s)| *s == PublicState::Serving));
    let v0 = start.chain(chain).unwrap().version;

    // Nodes 101 and 102 keep beating; 103 falls silent.
    let beater = {
        let c = c.clone();
        tokio::spawn(async move {
            loop {
                for n in [101, 102] {
                    if let Err(e) = c
                        .heartbeat(HeartbeatRequest {
                            node: n,
                            targets: vec![(900 + n as u64, LocalState::UpToDate)],
                        })
                        .await
                    {
                        eprintln!("heartbeat of node {n} failed: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let down = watcher
        .wait_for(WAIT, |r| {
            r.target(1003)
                .is_some_and(|t| t.public_state == PublicState::Offline)
        })
        .await
        .expect("the silent target goes offline");
    assert_eq!(
        states(&down, chain).last(),
        Some(&(1003, PublicState::Offline)),
        "offline targets go last"
    );
    assert!(
        down.chain(chain).unwrap().version > v0,
        "the chain version grows"
    );
    assert!(!down.node(103).unwrap().alive);

    // Node 103 restarts: registers again and reports its target online.
    register_storage(&c, 103, &[1003]).await;
    beat(&c, 103, 1003, LocalState::Online).await;
    let syncing = watcher
        .wait_for(WAIT, |r| {
            r.target(1003)
                .is_some_and(|t| t.public_state == PublicState::Syncing)
        })
        .await
        .expect("the returning target syncs");
    assert_eq!(states(&syncing, chain)[2], (1003, PublicState::Syncing));
    // Its sync finishes: it reports up to date and serves again.
    beat(&c, 103, 1003, LocalState::UpToDate).await;
    let healed = watcher
        .wait_for(WAIT, |r| {
            r.chain(chain)
                .is_some_and(|ch| ch.targets.iter().all(|t| t.state == PublicState::Serving))
        })
        .await
        .expect("the chain heals");
    let v = |r: &RoutingInfo| r.chain(chain).unwrap().version;
    assert!(v0 < v(&down) && v(&down) < v(&syncing) && v(&syncing) < v(&healed));
    assert!(
        healed.version > syncing.version && syncing.version > down.version,
        "routing versions grow"
    );
    beater.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_target_claiming_up_to_date_still_goes_through_syncing() {
    let cluster = MgmtdCluster::start(1).await;
    cluster.wait_for_primary(WAIT).await.unwrap();
    let c = cluster.client();
    for n in 1..=2 {
        register_storage(&c, 100 + n, &[1000 + n as u64]).await;
    }
    c.create_chain_table(CreateChainTableRequest {
        table: 1,
        replicas: 2,
        chains: None,
    })
    .await
    .unwrap();
    c.offline_target(1002).await.unwrap();
    // A stale or lying report: the offline target says it is up to date.
    beat(&c, 102, 1002, LocalState::UpToDate).await;
    let r = c.routing_info(0, Duration::ZERO).await.unwrap().unwrap();
    // It must earn SERVING through a sync: it may start syncing, never serve.
    assert_eq!(
        r.target(1002).unwrap().public_state,
        PublicState::Syncing,
        "never straight to SERVING"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_that_lost_every_target_heals_from_its_last_serving_target() {
    let cluster = MgmtdCluster::start(1).await;
    cluster.wait_for_primary(WAIT).await.unwrap();
    let c = cluster.client();
    for n in 1..=2 {
        register_storage(&c, 100 + n, &[1000 + n as u64]).await;
    }
    let table = c
        .create_chain_table(CreateChainTableRequest {
            table: 1,
            replicas: 2,
            chains: None,
        })
        .await
        .unwrap();
    let chain = table.chains[0];
    // 1001 fails first, then 1002, the last one serving: it becomes LASTSRV.
    c.offline_target(1001).await.unwrap();
    c.offline_target(1002).await.unwrap();
    let r = c.routing_info(0, Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        r.target(1002).unwrap().public_state,
        PublicState::LastSrv,
        "{:?}",
        states(&r, chain)
    );
    // Both come back. Restarted nodes report Online (they have not seen
    // themselves SERVING since the restart).
    beat(&c, 102, 1002, LocalState::Online).await;
    beat(&c, 101, 1001, LocalState::Online).await;
    let r = c.routing_info(0, Duration::ZERO).await.unwrap().unwrap();
    // FIXED: the LASTSRV target used to cycle LASTSRV -> SERVING -> LASTSRV
    // inside one settle and never serve again.
    assert_eq!(
        r.target(1002).unwrap().public_state,
        PublicState::Serving,
        "the last serving target serves again: {:?}",
        states(&r, chain)
    );
    assert_eq!(r.target(1001).unwrap().public_state, PublicState::Syncing);
    // The next heartbeats keep it serving (it now reports UpToDate).
    beat(&c, 102, 1002, LocalState::UpToDate).await;
    beat(&c, 101, 1001, LocalState::UpToDate).await;
    let r = c.routing_info(0, Duration::ZERO).await.unwrap().unwrap();
    assert!(
        states(&r, chain)
            .iter()
            .all(|(_, s)| *s == PublicState::Serving),
        "{:?}",
        states(&r, chain)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let cluster = MgmtdCluster::start(1).await;
    cluster.wait_for_primary(WAIT).await.unwrap();
    let c = cluster.client();
    check_errno(
        c.heartbeat(HeartbeatRequest {
            node: 77,
            targets: vec![],
        })
        .await,
        libc::ENOENT,
    );
    register_storage(&c, 101, &[1001]).await;
    let as_meta = RegisterNodeRequest {
        id: Some(101),
        node_type: NodeType::Meta,
        address: "127.0.0.1:1".into(),
        hostname: "h".into(),
        targets: vec![],
    };
    check_errno(c.register(as_meta).await, libc::EEXIST);
    let steal = RegisterNodeRequest {
        id: Some(102),
        node_type: NodeType::Storage,
        address: "127.0.0.1:2".into(),
        hostname: "h".into(),
        targets: vec![1001],
    };
    check_errno(c.register(steal).await, libc::EEXIST);
    let twice = RegisterNodeRequest {
        id: Some(103),
        node_type: NodeType::Storage,
        address: "127.0.0.1:3".into(),
        hostname: "h".into(),
        targets: vec![5, 5],
    };
    check_errno(c.register(twice).await, libc::EINVAL);
    let no_addr = RegisterNodeRequest {
        id: None,
        node_type: NodeType::Client,
        address: String::new(),
        hostname: "h".into(),
        targets: vec![],
    };
    check_errno(c.register(no_addr).await, libc::EINVAL);
    check_errno(
        c.heartbeat(HeartbeatRequest {
            node: 101,
            targets: vec![(9999, LocalState::Online)],
        })
        .await,
        libc::EINVAL,
    );
    check_errno(
        c.create_chain_table(CreateChainTableRequest {
            table: 1,
            replicas: 0,
            chains: None,
        })
        .await,
        libc::EINVAL,
    );
    check_errno(
        c.create_chain_table(CreateChainTableRequest {
            table: 1,
            replicas: 3,
            chains: None,
        })
        .await,
        libc::EINVAL,
    );
    c.create_chain_table(CreateChainTableRequest {
        table: 1,
        replicas: 1,
        chains: None,
    })
    .await
    .unwrap();
    check_errno(
        c.create_chain_table(CreateChainTableRequest {
            table: 1,
            replicas: 1,
            chains: None,
        })
        .await,
        libc::EEXIST,
    );
    check_errno(c.offline_target(424242).await, libc::ENOENT);
    check_errno(c.unregister_node(101).await, libc::EBUSY);
    check_errno(c.unregister_node(4242).await, libc::ENOENT);
    // A caller claiming a version from the future just gets nothing newer.
    assert_eq!(
        c.routing_info(u64::MAX, Duration::from_millis(50))
            .await
            .unwrap(),
        None
    );
    // Auto-assigned node ids do not collide with configured ones.
    let auto = RegisterNodeRequest {
        id: None,
        node_type: NodeType::Client,
        address: "127.0.0.1:9".into(),
        hostname: "h".into(),
        targets: vec![],
    };
    let id = c.register(auto).await.unwrap().id;
    assert!(id >= 10_000, "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_without_chained_targets_can_be_unregistered() {
    let cluster = MgmtdCluster::start(1).await;
    cluster.wait_for_primary(WAIT).await.unwrap();
    let c = cluster.client();
    register_storage(&c, 101, &[1001]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // past the heartbeat timeout
    c.unregister_node(101).await.unwrap();
    let r = c.routing_info(0, Duration::ZERO).await.unwrap().unwrap();
    assert!(r.node(101).is_none() && r.target(1001).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_extended_listed_closed_and_expire() {
    let cluster = MgmtdCluster::start(1).await;
    cluster.wait_for_primary(WAIT).await.unwrap();
    let c = cluster.client();
    let s = c.extend_session(7, "host-a:/mnt").await.unwrap();
    c.extend_session(8, "host-b:/mnt").await.unwrap();
    let again = c.extend_session(7, "ignored").await.unwrap();
    assert_eq!(
        (again.created, again.description.as_str()),
        (s.created, "host-a:/mnt")
    );
    let mut ids: Vec<u64> = c
        .list_sessions()
        .await
        .unwrap()
        .iter()
        .map(|s| s.client)
        .collect();
    ids.sort();
    assert_eq!(ids, vec![7, 8]);
    c.close_session(8).await.unwrap();
    // Session 7 is not extended: it expires (timeout 800 ms).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(c.list_sessions().await.unwrap().is_empty());
}
