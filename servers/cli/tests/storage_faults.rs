//! CRAQ under faults, as operators run it: an `r3fs kv`, an `r3fs mgmtd` and
//! three `r3fs storage` processes with one chain of three. Writers, a
//! truncater and readers work on a few chunks through StorageClient while
//! the head, the middle and the tail are each killed with SIGKILL and
//! restarted, twice. Afterwards every replica must hold the same bytes and
//! chunk lengths, no read may have seen a torn chunk, and each chunk's
//! history must be linearizable.
//!
//! Each chunk is a register: a write puts a whole value (its 4 KiB, then a
//! 4 KiB tail of the same value) at the chunk's start. A truncate to
//! `k * chunk + 4 KiB` cuts chunk `k`'s tail (a versioned truncate; the
//! register keeps its value) and removes every later chunk: for each of
//! those it is a write of value 0, the value of a missing chunk.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{single_node_client, storage_index, Meta, ProcessCluster};
use parking_lot::Mutex;
use r3fs_client::storage::StorageClientConfig;
use r3fs_client::{MgmtClient, RoutingWatcher, StorageClient};
use r3fs_tests::linearizability::{check_register, Event, Op};
use r3fs_wire::meta::Layout;
use r3fs_wire::mgmt::{PublicState, RoutingInfo};

const CHUNKS: u64 = 8;
/// Pause between a reader's reads, keeping each chunk's history within the
/// checker's limit over a run.
const READ_PAUSE: Duration = Duration::from_millis(2);
const INODE: u64 = 42;
const VALUE_BYTES: usize = 4096;
/// What a write puts in a chunk: the value, then a tail a truncate cuts off.
const WRITE_BYTES: usize = 2 * VALUE_BYTES;
const CHUNK_BYTES: u64 = 64 * 1024;
/// Pause between truncates.
const TRUNCATE_PAUSE: Duration = Duration::from_millis(20);
const WRITERS: u64 = 3;
const READERS: usize = 2;
const ROUNDS: usize = 2;
const WAIT: Duration = Duration::from_secs(30);

fn layout() -> Layout {
    Layout {
        chunk_size: CHUNK_BYTES as u32,
        stripe: 1,
        chains: vec![1],
    }
}

/// A whole write: the 8-byte number repeated, so a torn read shows.
fn encode(v: u64) -> Bytes {
    Bytes::from(v.to_le_bytes().repeat(WRITE_BYTES / 8))
}

/// The value of a chunk's first [`WRITE_BYTES`]: the value's 4 KiB, then
/// its tail or (truncated) zeros. A missing chunk reads as zeros: value 0.
fn decode(data: &[u8]) -> Result<u64, String> {
    let torn = || format!("torn read: {:02x?}...", &data[..32]);
    let (value, tail) = data.split_at(VALUE_BYTES);
    let first: [u8; 8] = value[..8].try_into().unwrap();
    if value.chunks(8).any(|w| w != first) {
        return Err(torn());
    }
    let zero = [0u8; 8];
    let whole = tail.chunks(8).all(|w| w == first);
    let cut = tail.chunks(8).all(|w| w == zero);
    if !whole && !cut {
        return Err(torn());
    }
    Ok(u64::from_le_bytes(first))
}

async fn wait_routing(
    watcher: &mut RoutingWatcher,
    what: &str,
    pred: impl FnMut(&RoutingInfo) -> bool,
) -> Arc<RoutingInfo> {
    watcher
        .wait_for(WAIT, pred)
        .await
        .unwrap_or_else(|| panic!("timed out waiting until {what}"))
}

fn all_serving(r: &RoutingInfo) -> bool {
    r.chain(1).is_some_and(|c| {
        c.targets.len() == 3 && c.targets.iter().all(|t| t.state == PublicState::Serving)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_killing_head_middle_and_tail() {
    let mut cluster = ProcessCluster::builder().start();
    let mgmt = MgmtClient::new(vec![cluster.mgmtd_addr().parse().unwrap()]).unwrap();
    let mut watcher = RoutingWatcher::start(mgmt.clone());
    wait_routing(&mut watcher, "the chain serves", all_serving).await;
    let client = StorageClient::new(watcher.subscribe(), StorageClientConfig::default());

    let epoch = Instant::now();
    let now = move || epoch.elapsed().as_nanos() as u64;
    let histories: Arc<Mutex<HashMap<u64, Vec<Event<u64>>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WRITERS {
        let (client, histories, stop) = (client.clone(), histories.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let chunk = rand::random_range(0..CHUNKS);
                let value = ((w + 1) << 32) | seq;
                let invoked = now();
                let ok = client
                    .write(&layout(), INODE, chunk * CHUNK_BYTES, encode(value))
                    .await
                    .is_ok();
                let completed = ok.then(now);
                histories.lock().entry(chunk).or_default().push(Event {
                    op: Op::Write(value),
                    invoked,
                    completed,
                });
            }
        }));
    }
    {
        let (client, histories, stop) = (client.clone(), histories.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let k = rand::random_range(0..CHUNKS);
                let invoked = now();
                let ok = client
                    .truncate(&layout(), INODE, k * CHUNK_BYTES + VALUE_BYTES as u64)
                    .await
                    .is_ok();
                let completed = ok.then(now);
                for chunk in k + 1..CHUNKS {
                    histories.lock().entry(chunk).or_default().push(Event {
                        op: Op::Write(0),
                        invoked,
                        completed,
                    });
                }
                tokio::time::sleep(TRUNCATE_PAUSE).await;
            }
        }));
    }
    let torn: Arc<Mutex<Vec<String>>> = Arc::default();
    for _ in 0..READERS {
        let (client, histories, stop, torn) = (
            client.clone(),
            histories.clone(),
            stop.clone(),
            torn.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let chunk = rand::random_range(0..CHUNKS);
                let invoked = now();
                if let Ok(data) = client
                    .read(&layout(), INODE, chunk * CHUNK_BYTES, WRITE_BYTES as u64)
                    .await
                {
                    let completed = Some(now());
                    match decode(&data) {
                        Ok(v) => histories.lock().entry(chunk).or_default().push(Event {
                            op: Op::Read(v),
                            invoked,
                            completed,
                        }),
                        Err(e) => torn.lock().push(e),
                    }
                }
                tokio::time::sleep(READ_PAUSE).await;
            }
        }));
    }

    for round in 0..ROUNDS {
        for position in 0..3 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let r = watcher.current().unwrap();
            let target = r.chain(1).unwrap().targets[position].target;
            let n = storage_index(target);
            cluster.kill_storage(n);
            wait_routing(
                &mut watcher,
                &format!("target {target} is offline (round {round})"),
                |r| {
                    r.target(target)
                        .is_some_and(|t| t.public_state == PublicState::Offline)
                },
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            cluster.start_storage(n);
            let healed = watcher.wait_for(WAIT, all_serving).await;
            assert!(
                healed.is_some(),
                "chain did not heal after restarting target {target}:\n{}",
                cluster.logs()
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(
        torn.lock().is_empty(),
        "reads saw torn chunks: {:?}",
        torn.lock()
    );

    // A final read of every chunk closes each history.
    let mut final_values = HashMap::new();
    for chunk in 0..CHUNKS {
        let invoked = now();
        let data = client
            .read(&layout(), INODE, chunk * CHUNK_BYTES, WRITE_BYTES as u64)
            .await
            .unwrap();
        let v = decode(&data).unwrap();
        final_values.insert(chunk, data);
        histories.lock().entry(chunk).or_default().push(Event {
            op: Op::Read(v),
            invoked,
            completed: Some(now()),
        });
    }
    // Every replica holds the same chunks, lengths and committed bytes.
    let routing = watcher.current().unwrap();
    let mut listings = Vec::new();
    for (i, node) in routing.nodes.iter().enumerate() {
        let addr: std::net::SocketAddr = node.address.parse().unwrap();
        let (tx, direct) = single_node_client(&routing, node.id)
            .unwrap_or_else(|| panic!("node {} holds no replica", node.id));
        for chunk in 0..CHUNKS {
            let data = direct
                .read(&layout(), INODE, chunk * CHUNK_BYTES, WRITE_BYTES as u64)
                .await
                .unwrap_or_else(|e| panic!("chunk {chunk} on node {} ({addr:?}): {e}", node.id));
            assert!(
                data == final_values[&chunk],
                "chunk {chunk} differs on replica {i}"
            );
        }
        listings.push(direct.list_chunks(&layout(), INODE).await.unwrap());
        drop(tx);
    }
    assert!(
        listings.iter().all(|l| *l == listings[0]),
        "replicas list different chunks: {listings:?}"
    );
    let histories = histories.lock();
    let mut ops = 0;
    for (chunk, history) in histories.iter() {
        ops += history.len();
        if let Err(e) = check_register(0u64, history) {
            panic!("chunk {chunk}: {e}");
        }
    }
    let acked = histories
        .values()
        .flatten()
        .filter(|e| matches!(e.op, Op::Write(v) if v != 0) && e.completed.is_some())
        .count();
    let removals = histories
        .values()
        .flatten()
        .filter(|e| matches!(e.op, Op::Write(0)) && e.completed.is_some())
        .count();
    println!(
        "{ops} operations checked, {acked} acknowledged writes, {removals} chunk removals by truncates, {} kills",
        ROUNDS * 3
    );
    assert!(removals > 0, "truncates made progress");
    assert!(acked > 20, "the workload made progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chunks_of_a_removed_file_are_garbage_collected() {
    use r3fs_client::{MetaClient, MetaClientConfig};
    use r3fs_wire::meta::{CreateRequest, OpenFlags, User, ROOT_INODE};
    let cluster = ProcessCluster::builder().meta(Meta::Collecting).start();
    let mgmt = MgmtClient::new(vec![cluster.mgmtd_addr().parse().unwrap()]).unwrap();
    let mut watcher = RoutingWatcher::start(mgmt);
    wait_routing(&mut watcher, "the chain serves", all_serving).await;
    let storage = StorageClient::new(watcher.subscribe(), StorageClientConfig::default());
    let meta = MetaClient::new(MetaClientConfig::new(vec![cluster.meta_addr()])).unwrap();
    // A file in the namespace, its data in the chain.
    let req = CreateRequest {
        user: User::root(),
        parent: ROOT_INODE,
        name: b"doomed".to_vec(),
        perm: 0o644,
        exclusive: true,
        flags: OpenFlags::default(),
        client: 0,
    };
    let attr = meta.create(req).await.unwrap().attr;
    let layout = attr.layout.clone().expect("files have a layout");
    let data = Bytes::from(vec![7u8; 3 * layout.chunk_size as usize / 2]);
    storage
        .write(&layout, attr.inode, 0, data.clone())
        .await
        .unwrap();
    assert_eq!(
        storage
            .read(&layout, attr.inode, 0, data.len() as u64)
            .await
            .unwrap(),
        data
    );
    // Unlinking it queues it; the storage nodes delete its chunks and take it off the queue.
    meta.unlink(&User::root(), ROOT_INODE, b"doomed")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let queued = meta.gc_list(10).await.unwrap();
        if queued.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "removed file still queued: {queued:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = storage
        .read(&layout, attr.inode, 0, data.len() as u64)
        .await
        .unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "the removed file's chunks are gone"
    );
}
