//! StorageClient against real storage nodes on loopback: three nodes, two
//! chains of three (each node holds one target of each chain), routing info
//! given directly through watch channels.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use r3fs_client::storage::StorageClientConfig;
use r3fs_client::{StorageClient, StorageClientError};
use r3fs_net::{Router, RpcServer, ServerConfig};
use r3fs_storage::chunk::{ChunkEngine, ChunkId};
use r3fs_storage::craq::StorageService;
use r3fs_wire::meta::Layout;
use r3fs_wire::mgmt::*;
use r3fs_wire::storage::StorageError;
use tokio::sync::watch;

/// The chunk size limit of every engine.
const CHUNK_MAX: u32 = 1024 * 1024;
/// The chunk size of most test layouts.
const CHUNK: u32 = 64 * 1024;
const CHAINS: [ChainId; 2] = [1, 2];
const NODES: usize = 3;
const INODE: u64 = 7;

type Routing = watch::Sender<Option<Arc<RoutingInfo>>>;

struct Node {
    addr: SocketAddr,
    /// By chain.
    engines: HashMap<ChainId, Arc<ChunkEngine>>,
    server: Option<RpcServer>,
    _dirs: Vec<tempfile::TempDir>,
}

struct Fixture {
    nodes: Vec<Node>,
    /// What the servers route by.
    routing: Routing,
}

fn target_of(chain: ChainId, node: usize) -> TargetId {
    u64::from(chain) * 100 + node as u64
}

/// Chain `c` starts at node `c - 1`, so the two chains have different heads.
fn routing(addrs: &[SocketAddr], version: u64) -> RoutingInfo {
    let order = |chain: ChainId| (0..NODES).map(move |i| (i + chain as usize - 1) % NODES);
    RoutingInfo {
        version,
        epoch: 1,
        nodes: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| NodeInfo {
                id: i as u32 + 1,
                node_type: NodeType::Storage,
                address: a.to_string(),
                hostname: format!("s{i}"),
                registered_at: 0,
                last_heartbeat: 0,
                alive: true,
            })
            .collect(),
        chain_tables: vec![],
        chains: CHAINS
            .iter()
            .map(|&c| Chain {
                id: c,
                version,
                targets: order(c)
                    .map(|i| ChainTarget {
                        target: target_of(c, i),
                        state: PublicState::Serving,
                    })
                    .collect(),
            })
            .collect(),
        targets: CHAINS
            .iter()
            .flat_map(|&c| {
                (0..NODES).map(move |i| TargetInfo {
                    id: target_of(c, i),
                    node: i as u32 + 1,
                    chain: Some(c),
                    public_state: PublicState::Serving,
                    local_state: LocalState::UpToDate,
                })
            })
            .collect(),
    }
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_with(|_, _| None).await
    }

    /// `dir_of(node, chain)` names a directory for that target instead of a
    /// fresh temporary one.
    async fn start_with(dir_of: impl Fn(usize, ChainId) -> Option<std::path::PathBuf>) -> Fixture {
        let (tx, rx) = watch::channel(None);
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let mut dirs = Vec::new();
            let mut engines = HashMap::new();
            for &c in &CHAINS {
                let dir = tempfile::tempdir().unwrap();
                let path = dir_of(i, c).unwrap_or_else(|| dir.path().to_path_buf());
                engines.insert(c, Arc::new(ChunkEngine::open(&path, CHUNK_MAX).unwrap()));
                dirs.push(dir);
            }
            let targets = engines
                .iter()
                .map(|(&c, e)| (target_of(c, i), e.clone()))
                .collect();
            let service = StorageService::new(i as u32 + 1, targets, rx.clone());
            let mut router = Router::new();
            service.register(&mut router);
            let server = RpcServer::bind(
                "127.0.0.1:0".parse().unwrap(),
                router,
                ServerConfig::default(),
            )
            .await
            .unwrap();
            nodes.push(Node {
                addr: server.local_addr(),
                engines,
                server: Some(server),
                _dirs: dirs,
            });
        }
        let f = Fixture { nodes, routing: tx };
        f.routing.send_replace(Some(Arc::new(f.routing_info(1))));
        f
    }

    fn routing_info(&self, version: u64) -> RoutingInfo {
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr).collect();
        routing(&addrs, version)
    }

    /// A client that routes by the servers' channel.
    fn client(&self) -> StorageClient {
        StorageClient::new(self.routing.subscribe(), StorageClientConfig::default())
    }

    /// A client with a channel of its own, and that channel.
    fn client_with_own_routing(
        &self,
        version: u64,
        config: StorageClientConfig,
    ) -> (StorageClient, Routing) {
        let (tx, rx) = watch::channel(Some(Arc::new(self.routing_info(version))));
        (StorageClient::new(rx, config), tx)
    }

    async fn stop(&mut self, node: usize) {
        self.nodes[node].server.take().unwrap().shutdown().await;
    }
}

fn layout(chunk_size: u32, stripe: u32) -> Layout {
    Layout {
        chunk_size,
        stripe,
        chains: CHAINS[..stripe as usize].to_vec(),
    }
}

/// Deterministic bytes that differ from chunk to chunk.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn id(index: u64) -> ChunkId {
    ChunkId {
        inode: INODE,
        index,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_unaligned_write_reads_back_byte_for_byte_across_chunks_and_chains() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    let offset = 3 * u64::from(CHUNK) + 4567;
    let data = pattern(1024 * 1024 + 123, 1);
    let written = c.write(&layout, INODE, offset, data.clone()).await.unwrap();
    assert_eq!(written, data.len() as u64);
    let back = c
        .read(&layout, INODE, offset, data.len() as u64)
        .await
        .unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(crc_fast::crc32_iscsi(&back), crc_fast::crc32_iscsi(&data));
    assert!(back == data, "bytes differ");
    // Placement: chunk i on chain CHAINS[i % 2], on every replica.
    let first = offset / u64::from(CHUNK);
    let last = (offset + data.len() as u64 - 1) / u64::from(CHUNK);
    for index in first..=last {
        let (on, off) = if index % 2 == 0 { (1, 2) } else { (2, 1) };
        for node in &f.nodes {
            assert!(node.engines[&on].meta(id(index)).unwrap().is_some());
            assert!(node.engines[&off].meta(id(index)).unwrap().is_none());
        }
    }
    // A read that starts and ends inside chunks.
    let sub = c
        .read(&layout, INODE, offset + 70_000, 200_000)
        .await
        .unwrap();
    assert!(sub == data.slice(70_000..270_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_and_bytes_past_a_chunk_end_read_as_zeros() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    let chunk = u64::from(CHUNK);
    c.write(&layout, INODE, 10, Bytes::from_static(b"head"))
        .await
        .unwrap();
    c.write(&layout, INODE, 3 * chunk, Bytes::from_static(b"tail"))
        .await
        .unwrap();
    let back = c.read(&layout, INODE, 0, 4 * chunk).await.unwrap();
    let mut expect = vec![0u8; 4 * chunk as usize];
    expect[10..14].copy_from_slice(b"head");
    expect[3 * chunk as usize..3 * chunk as usize + 4].copy_from_slice(b"tail");
    assert!(back == expect, "holes must be zeros");
    // Within one chunk, past its end (the one-piece path).
    let within = c.read(&layout, INODE, 8, 20).await.unwrap();
    assert!(within[..] == expect[8..28], "{within:?}");
    let whole = c.read(&layout, INODE, 10, 4).await.unwrap();
    assert_eq!(&whole[..], b"head");
    // An inode never written at all.
    let none = c.read(&layout, INODE + 1, 5, 100).await.unwrap();
    assert!(none == vec![0u8; 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_from_other_replicas_when_a_node_stops() {
    let mut f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    let data = pattern(8 * CHUNK as usize, 2);
    c.write(&layout, INODE, 0, data.clone()).await.unwrap();
    // Node 0 is the head of chain 1 and the tail of chain 2; routing still
    // calls it SERVING, so readers meet it and move on.
    f.stop(0).await;
    let start = Instant::now();
    for _ in 0..20 {
        let back = c.read(&layout, INODE, 0, data.len() as u64).await.unwrap();
        assert!(back == data);
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "no routing waits: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_a_stale_chain_version_succeeds_once_routing_catches_up() {
    let f = Fixture::start().await;
    f.routing.send_replace(Some(Arc::new(f.routing_info(2))));
    let (c, client_routing) = f.client_with_own_routing(1, StorageClientConfig::default());
    let layout = layout(CHUNK, 1);
    let data = pattern(100_000, 3);
    let write = {
        let (c, layout, data) = (c.clone(), layout.clone(), data.clone());
        tokio::spawn(async move { c.write(&layout, INODE, 0, data).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "the stale write waits for routing");
    client_routing.send_replace(Some(Arc::new(f.routing_info(2))));
    let written = tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(written, data.len() as u64);
    assert!(c.read(&layout, INODE, 0, 100_000).await.unwrap() == data);
    // Each chunk was applied once despite the retries.
    for index in 0..2 {
        let meta = f.nodes[2].engines[&1].meta(id(index)).unwrap().unwrap();
        assert_eq!(meta.commit_ver, 1, "chunk {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_gives_up_with_eio_when_routing_never_catches_up() {
    let f = Fixture::start().await;
    f.routing.send_replace(Some(Arc::new(f.routing_info(2))));
    let config = StorageClientConfig {
        attempts_max: 3,
        routing_wait: Duration::from_millis(100),
        ..StorageClientConfig::default()
    };
    let (c, _client_routing) = f.client_with_own_routing(1, config);
    let start = Instant::now();
    let err = c
        .write(&layout(CHUNK, 1), INODE, 0, Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageClientError::Exhausted {
                attempts: 3,
                last: r3fs_client::storage::AttemptError::Storage(
                    StorageError::ChainVersion { .. }
                ),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.errno(), libc::EIO);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_meets_a_dirty_replica_returns_the_committed_bytes() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 1);
    c.write(&layout, INODE, 0, Bytes::from_static(b"committed"))
        .await
        .unwrap();
    // A write in flight: two replicas hold a pending version.
    for node in [1, 2] {
        f.nodes[node].engines[&1]
            .write_pending(id(0), 2, 1, 0, b"PENDING!!", CHUNK)
            .unwrap();
    }
    for _ in 0..20 {
        let back = c.read(&layout, INODE, 0, 9).await.unwrap();
        assert_eq!(&back[..], b"committed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_replica_is_skipped() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 1);
    c.write(&layout, INODE, 0, Bytes::from_static(b"precious bytes"))
        .await
        .unwrap();
    for node in [0, 2] {
        let (path, pos) = f.nodes[node].engines[&1]
            .block_location(id(0), 1, 3)
            .unwrap()
            .expect("committed block");
        common::flip_bits(&path, pos, 0x40);
    }
    for _ in 0..20 {
        let back = c.read(&layout, INODE, 0, 14).await.unwrap();
        assert_eq!(&back[..], b"precious bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_no_retry_can_fix_fails_at_once() {
    let f = Fixture::start().await;
    let c = f.client();
    // The layout's chunks are larger than the engines allow.
    let big = layout(2 * CHUNK_MAX, 1);
    let start = Instant::now();
    let err = c
        .write(&big, INODE, 0, pattern(CHUNK_MAX as usize + 1, 4))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageClientError::Refused {
                error: r3fs_client::storage::AttemptError::Storage(StorageError::OutOfRange { .. }),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.errno(), libc::EINVAL);
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_layout_is_einval() {
    let f = Fixture::start().await;
    let c = f.client();
    for bad in [
        Layout {
            chunk_size: 0,
            stripe: 1,
            chains: vec![1],
        },
        Layout {
            chunk_size: CHUNK,
            stripe: 0,
            chains: vec![1],
        },
        Layout {
            chunk_size: CHUNK,
            stripe: 3,
            chains: vec![1, 2],
        },
    ] {
        let w = c
            .write(&bad, INODE, 0, Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(w, StorageClientError::BadLayout { .. }), "{w}");
        assert_eq!(w.errno(), libc::EINVAL);
        let r = c.read(&bad, INODE, 0, 1).await.unwrap_err();
        assert_eq!(r.errno(), libc::EINVAL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_one_mib_writes_and_reads_report_throughput() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK_MAX, 2);
    let block = pattern(1024 * 1024, 5);
    const BLOCKS: u64 = 32;
    let start = Instant::now();
    for i in 0..BLOCKS {
        c.write(&layout, INODE, i * 1024 * 1024, block.clone())
            .await
            .unwrap();
    }
    let write = start.elapsed();
    let start = Instant::now();
    for i in 0..BLOCKS {
        let back = c
            .read(&layout, INODE, i * 1024 * 1024, 1024 * 1024)
            .await
            .unwrap();
        assert_eq!(crc_fast::crc32_iscsi(&back), crc_fast::crc32_iscsi(&block));
    }
    let read = start.elapsed();
    let mib = BLOCKS as f64;
    println!(
        "sequential 1 MiB I/O, 3 replicas, loopback: write {:.0} MiB/s, read {:.0} MiB/s",
        mib / write.as_secs_f64(),
        mib / read.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_inode_drops_its_chunks_from_every_replica_of_every_chain() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    c.write(&layout, INODE, 0, pattern(5 * CHUNK as usize, 3))
        .await
        .unwrap();
    c.write(&layout, INODE + 1, 0, pattern(1000, 4))
        .await
        .unwrap();
    let removed = c.remove_inode(&layout, INODE).await.unwrap();
    assert_eq!(removed, 5, "the heads dropped all five chunks");
    for node in &f.nodes {
        for engine in node.engines.values() {
            assert!(engine.list_inode(INODE).unwrap().is_empty());
        }
    }
    let back = c
        .read(&layout, INODE, 0, 3 * u64::from(CHUNK))
        .await
        .unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "a removed file reads as a hole"
    );
    assert_eq!(
        c.read(&layout, INODE + 1, 0, 1000).await.unwrap(),
        pattern(1000, 4),
        "other files stay"
    );
    assert_eq!(
        c.remove_inode(&layout, INODE).await.unwrap(),
        0,
        "removing again is a no-op"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_length_storage_holds_is_the_end_of_the_last_chunk_over_all_chains() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    assert_eq!(
        c.query_length(&layout, INODE).await.unwrap(),
        0,
        "nothing written"
    );
    c.write(&layout, INODE, 0, pattern(100, 1)).await.unwrap();
    let end = 3 * u64::from(CHUNK) + 600;
    c.write(&layout, INODE, end - 500, pattern(500, 2))
        .await
        .unwrap();
    assert_eq!(c.query_length(&layout, INODE).await.unwrap(), end);
    // A later chunk on the other chain wins, whichever chain holds it.
    let further = 4 * u64::from(CHUNK) + 10;
    c.write(&layout, INODE, further - 10, pattern(10, 3))
        .await
        .unwrap();
    assert_eq!(c.query_length(&layout, INODE).await.unwrap(), further);
}

// ---- truncate, hole punching, listing, full disks ----

/// What `[0, len)` of a file reads as.
async fn read_all(c: &StorageClient, layout: &Layout, len: u64) -> Vec<u8> {
    c.read(layout, INODE, 0, len).await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_cuts_every_chain_and_regrown_bytes_read_as_zeros() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    let chunk = u64::from(CHUNK);
    let len = 7 * chunk / 2;
    let data = pattern(len as usize, 9);
    c.write(&layout, INODE, 0, data.clone()).await.unwrap();
    let cut = 3 * chunk / 2;
    c.truncate(&layout, INODE, cut).await.unwrap();
    c.truncate(&layout, INODE, cut).await.unwrap();
    assert_eq!(
        c.list_chunks(&layout, INODE).await.unwrap(),
        [(0, CHUNK), (1, CHUNK / 2)]
    );
    assert_eq!(c.query_length(&layout, INODE).await.unwrap(), cut);
    let mut model = data[..cut as usize].to_vec();
    model.resize(len as usize, 0);
    assert!(
        read_all(&c, &layout, len).await == model,
        "cut bytes read as zeros"
    );
    // Re-grow past the cut: the gap reads zeros, never the old bytes.
    let tail = pattern(100, 10);
    c.write(&layout, INODE, 3 * chunk, tail.clone())
        .await
        .unwrap();
    model[3 * chunk as usize..3 * chunk as usize + 100].copy_from_slice(&tail);
    assert!(read_all(&c, &layout, len).await == model);
    // A chunk-aligned cut removes the chunk at the cut.
    c.truncate(&layout, INODE, chunk).await.unwrap();
    assert_eq!(c.list_chunks(&layout, INODE).await.unwrap(), [(0, CHUNK)]);
    c.truncate(&layout, INODE, 0).await.unwrap();
    assert_eq!(c.list_chunks(&layout, INODE).await.unwrap(), []);
    for node in &f.nodes {
        for engine in node.engines.values() {
            assert!(engine.list_inode(INODE).unwrap().is_empty());
        }
    }
    assert_eq!(c.query_length(&layout, INODE).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn punched_holes_read_as_zeros_and_never_lengthen_a_chunk() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    let chunk = CHUNK as usize;
    let len = 5 * chunk + chunk / 2;
    let data = pattern(len, 11);
    c.write(&layout, INODE, 0, data.clone()).await.unwrap();
    let mut model = data.to_vec();
    let mut punch = async |offset: usize, n: usize| {
        c.punch_hole(&layout, INODE, offset as u64, n as u64)
            .await
            .unwrap();
        let end = (offset + n).min(len);
        model[offset.min(end)..end].fill(0);
        assert!(
            read_all(&c, &layout, len as u64).await == model,
            "after punching {offset}+{n}"
        );
    };
    // Inside one chunk, at a chunk's start, at a chunk's end.
    punch(100, 50).await;
    punch(chunk, 10).await;
    punch(2 * chunk - 10, 10).await;
    // Across whole chunks 2 and 3, with partial ends in chunks 1 and 4.
    punch(chunk + chunk / 2, 3 * chunk).await;
    // Past the end of the data: the last chunk keeps its length.
    punch(len - 10, 10 * chunk).await;
    let chunks = c.list_chunks(&layout, INODE).await.unwrap();
    assert_eq!(
        chunks,
        [(0, CHUNK), (1, CHUNK), (4, CHUNK), (5, CHUNK / 2)],
        "whole chunks are removed, partial ones keep their length"
    );
    assert_eq!(c.query_length(&layout, INODE).await.unwrap(), len as u64);
    // A hole over a missing chunk creates nothing.
    c.punch_hole(&layout, INODE, 2 * chunk as u64 + 5, 5)
        .await
        .unwrap();
    assert_eq!(c.list_chunks(&layout, INODE).await.unwrap(), chunks);
    let err = c.punch_hole(&layout, INODE, u64::MAX, 2).await.unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_listings_merge_chains_in_index_order_and_stop_at_a_limit() {
    let f = Fixture::start().await;
    let c = f.client();
    let layout = layout(CHUNK, 2);
    let chunk = u64::from(CHUNK);
    assert_eq!(c.list_chunks(&layout, INODE).await.unwrap(), []);
    for (index, len) in [(0u64, 10u64), (3, 20), (4, 30), (9, 40), (10, 50)] {
        c.write(&layout, INODE, index * chunk, pattern(len as usize, index))
            .await
            .unwrap();
    }
    let all = [(0, 10), (3, 20), (4, 30), (9, 40), (10, 50)];
    assert_eq!(c.list_chunks(&layout, INODE).await.unwrap(), all);
    let (first, complete) = c.list_chunks_from(&layout, INODE, 0, 3).await.unwrap();
    assert_eq!((first.as_slice(), complete), (&all[..3], false));
    let (rest, complete) = c.list_chunks_from(&layout, INODE, 4, 10).await.unwrap();
    assert_eq!((rest.as_slice(), complete), (&all[2..], true));
    // Read from any SERVING replica: with node 0 stopped, still complete.
    let mut f = f;
    f.stop(0).await;
    assert_eq!(c.list_chunks(&layout, INODE).await.unwrap(), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_a_middle_replica_is_enospc_and_loses_nothing_acknowledged() {
    const TMPFS_SIZE: &str = "16m";
    const WRITE_BYTES: usize = 512 * 1024;
    const WRITES_MAX: u64 = 64;
    // Declared first so it is dropped last, after every engine on it.
    let guard = match common::mount_tmpfs(TMPFS_SIZE) {
        Ok(guard) => guard,
        Err(reason) => {
            println!("skipped: cannot mount tmpfs ({reason})");
            return;
        }
    };
    // Node 1 is the middle of chain 1; its target of chain 1 sits on the tmpfs.
    let f = Fixture::start_with(|node, chain| {
        (node == 1 && chain == 1).then(|| guard.dir.path().join("t"))
    })
    .await;
    let c = f.client();
    let layout = layout(CHUNK_MAX, 1);
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..WRITES_MAX {
        let data = pattern(WRITE_BYTES, 100 + i);
        let offset = i * WRITE_BYTES as u64;
        let write = c.write(&layout, INODE, offset, data.clone());
        match tokio::time::timeout(Duration::from_secs(30), write).await {
            Ok(Ok(_)) => acked.push((offset, data)),
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(_) => panic!("write {i} hangs on a full disk"),
        }
    }
    let err = failure.expect("the tmpfs must fill up");
    println!("{} writes acknowledged before: {err}", acked.len());
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert!(!acked.is_empty());
    // Another write is refused the same way, at once.
    let again = c
        .write(&layout, INODE, 0, pattern(WRITE_BYTES, 1))
        .await
        .unwrap_err();
    assert_eq!(again.errno(), libc::ENOSPC, "{again}");
    // Nothing acknowledged is lost, on any replica, and the refused writes
    // left no pending version behind (each member dropped its own).
    for node in 0..NODES {
        let engine = &f.nodes[node].engines[&1];
        for (id, meta) in engine.list_inode(INODE).unwrap() {
            assert!(!meta.is_dirty(), "node {node}, {id}: {meta:?}");
        }
    }
    for _ in 0..3 {
        for (offset, data) in &acked {
            let back = c
                .read(&layout, INODE, *offset, data.len() as u64)
                .await
                .unwrap();
            assert!(back == *data, "acknowledged write at {offset}");
        }
    }
    // Freeing space lets writes go on.
    c.truncate(&layout, INODE, 0).await.unwrap();
    c.write(&layout, INODE, 0, pattern(WRITE_BYTES, 2))
        .await
        .unwrap();
    drop(c);
    drop(f);
}
