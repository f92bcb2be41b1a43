//! CRAQ over real RPC on loopback: three storage nodes, one chain of three,
//! routing info given directly (mgmtd's part is tested in mgmtd's tests).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use r3fs_net::{CallOptions, RetryPolicy, Router, RpcClient, RpcServer, ServerConfig};
use r3fs_storage::chunk::{ChunkEngine, ChunkError, ChunkId, ChunkUpdate, FaultPoint};
use r3fs_storage::craq::StorageService;
use r3fs_wire::mgmt::*;
use r3fs_wire::storage::*;
use tokio::sync::watch;

const CHUNK: u32 = 64 * 1024;
const CHAIN: ChainId = 1;

struct Node {
    addr: SocketAddr,
    service: StorageService,
    engine: Arc<ChunkEngine>,
    server: Option<RpcServer>,
    _dir: Option<tempfile::TempDir>,
}

struct Fixture {
    nodes: Vec<Node>,
    routing: watch::Sender<Option<Arc<RoutingInfo>>>,
    rpc: RpcClient,
    next_request: std::sync::atomic::AtomicU64,
}

fn target_of(i: usize) -> TargetId {
    101 + i as u64
}

fn routing(addrs: &[SocketAddr], version: u64, states: &[PublicState]) -> RoutingInfo {
    let mut order: Vec<usize> = (0..addrs.len()).collect();
    order.sort_by_key(|&i| states[i]);
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
        chains: vec![Chain {
            id: CHAIN,
            version,
            targets: order
                .iter()
                .map(|&i| ChainTarget {
                    target: target_of(i),
                    state: states[i],
                })
                .collect(),
        }],
        targets: (0..addrs.len())
            .map(|i| TargetInfo {
                id: target_of(i),
                node: i as u32 + 1,
                chain: Some(CHAIN),
                public_state: states[i],
                local_state: LocalState::UpToDate,
            })
            .collect(),
    }
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture::start_on([None, None, None]).await
    }

    /// Node `i`'s target lives in `dirs[i]`, or in a new temporary directory.
    async fn start_on(dirs: [Option<&std::path::Path>; 3]) -> Fixture {
        Fixture::start_with(dirs, ServerConfig::default()).await
    }

    /// [`Fixture::start_on`] with servers configured by `config`.
    async fn start_with(dirs: [Option<&std::path::Path>; 3], config: ServerConfig) -> Fixture {
        let (tx, rx) = watch::channel(None);
        let mut nodes = Vec::new();
        for (i, given) in dirs.into_iter().enumerate() {
            let dir = match given {
                Some(_) => None,
                None => Some(tempfile::tempdir().unwrap()),
            };
            let path = given.unwrap_or_else(|| dir.as_ref().unwrap().path());
            let engine = Arc::new(ChunkEngine::open(path, CHUNK).unwrap());
            let service = StorageService::new(
                i as u32 + 1,
                HashMap::from([(target_of(i), engine.clone())]),
                rx.clone(),
            );
            let mut router = Router::new();
            service.register(&mut router);
            let registered = service.clone();
            let server = RpcServer::bind("127.0.0.1:0".parse().unwrap(), router, config.clone())
                .await
                .unwrap();
            nodes.push(Node {
                addr: server.local_addr(),
                service: registered,
                engine,
                server: Some(server),
                _dir: dir,
            });
        }
        let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        tx.send_replace(Some(Arc::new(routing(
            &addrs,
            1,
            &[PublicState::Serving; 3],
        ))));
        Fixture {
            nodes,
            routing: tx,
            rpc: RpcClient::new(r3fs_net::ClientConfig::default()),
            next_request: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn set_states(&self, version: u64, states: &[PublicState]) {
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr).collect();
        self.routing
            .send_replace(Some(Arc::new(routing(&addrs, version, states))));
    }

    fn opts() -> CallOptions {
        CallOptions {
            retry: RetryPolicy::none(),
            ..CallOptions::default()
        }
    }

    async fn write_to(
        &self,
        node: usize,
        chain_ver: u64,
        index: u64,
        offset: u32,
        data: &[u8],
    ) -> StorageResult<ChunkVersion> {
        let request = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.write_req(node, chain_ver, index, offset, data, request)
            .await
    }

    async fn write_req(
        &self,
        node: usize,
        chain_ver: u64,
        index: u64,
        offset: u32,
        data: &[u8],
        request: u64,
    ) -> StorageResult<ChunkVersion> {
        let req = WriteRequest {
            addr: ChunkAddr {
                chain: CHAIN,
                inode: 7,
                index,
            },
            chain_ver,
            offset,
            chunk_size: CHUNK,
            crc: crc_fast::crc32_iscsi(data),
            client: 1,
            request,
        };
        let (resp, _) = self
            .rpc
            .call_with_payload::<Write>(
                self.nodes[node].addr,
                &req,
                Bytes::copy_from_slice(data),
                Self::opts(),
            )
            .await
            .unwrap();
        resp
    }

    async fn read_from(&self, node: usize, index: u64) -> StorageResult<(ReadResponse, Bytes)> {
        let req = ReadRequest {
            addr: ChunkAddr {
                chain: CHAIN,
                inode: 7,
                index,
            },
            offset: 0,
            length: CHUNK,
        };
        let (resp, data) = self
            .rpc
            .call_with_payload::<Read>(self.nodes[node].addr, &req, Bytes::new(), Self::opts())
            .await
            .unwrap();
        resp.map(|r| (r, data))
    }
}

fn id(index: u64) -> ChunkId {
    ChunkId { inode: 7, index }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_head_commits_on_every_replica() {
    let f = Fixture::start().await;
    let v1 = f.write_to(0, 1, 0, 0, b"hello chain").await.unwrap();
    assert_eq!((v1.commit_ver, v1.length), (1, 11));
    let v2 = f.write_to(0, 1, 0, 6, b"CRAQ!").await.unwrap();
    assert_eq!(v2.commit_ver, 2);
    for node in 0..3 {
        let (resp, data) = f.read_from(node, 0).await.unwrap();
        assert_eq!(&data[..], b"hello CRAQ!", "node {node}");
        assert_eq!(
            (resp.commit_ver, resp.crc),
            (2, crc_fast::crc32_iscsi(b"hello CRAQ!"))
        );
        let meta = f.nodes[node].engine.meta(id(0)).unwrap().unwrap();
        assert_eq!(
            meta.update_ver, meta.commit_ver,
            "node {node} holds no pending version"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_off_the_head_with_a_stale_chain_version_or_a_bad_checksum() {
    let f = Fixture::start().await;
    assert!(matches!(
        f.write_to(1, 1, 0, 0, b"x").await,
        Err(StorageError::NotHead { .. })
    ));
    assert!(matches!(
        f.write_to(0, 0, 0, 0, b"x").await,
        Err(StorageError::ChainVersion {
            request: 0,
            node: 1,
            ..
        })
    ));
    let req = WriteRequest {
        addr: ChunkAddr {
            chain: CHAIN,
            inode: 7,
            index: 0,
        },
        chain_ver: 1,
        offset: 0,
        chunk_size: CHUNK,
        crc: 1,
        client: 1,
        request: 999,
    };
    let (resp, _) = f
        .rpc
        .call_with_payload::<Write>(
            f.nodes[0].addr,
            &req,
            Bytes::from_static(b"data"),
            Fixture::opts(),
        )
        .await
        .unwrap();
    assert!(matches!(resp, Err(StorageError::PayloadChecksum { .. })));
    assert!(matches!(
        f.write_to(0, 1, 0, CHUNK - 1, b"xy").await,
        Err(StorageError::OutOfRange { .. })
    ));
    let unknown = ReadRequest {
        addr: ChunkAddr {
            chain: 99,
            inode: 7,
            index: 0,
        },
        offset: 0,
        length: 1,
    };
    let (resp, _) = f
        .rpc
        .call_with_payload::<Read>(f.nodes[0].addr, &unknown, Bytes::new(), Fixture::opts())
        .await
        .unwrap();
    assert!(matches!(resp, Err(StorageError::NotServing { chain: 99 })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_client_write_is_applied_once() {
    let f = Fixture::start().await;
    let first = f.write_req(0, 1, 0, 0, b"once", 42).await.unwrap();
    let again = f.write_req(0, 1, 0, 0, b"once", 42).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        f.nodes[2].engine.meta(id(0)).unwrap().unwrap().commit_ver,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_doubt_is_never_dropped_but_re_driven_by_the_next_write() {
    let mut f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"old").await.unwrap();
    let tail = f.nodes[2].server.take().unwrap();
    tail.shutdown().await;
    let err = f.write_to(0, 1, 0, 0, b"new").await.unwrap_err();
    assert!(matches!(err, StorageError::Forward { .. }), "{err}");
    // The write is in doubt (a dead tail may have committed it): head and
    // middle keep it pending and serve neither version.
    for node in 0..2 {
        let err = f.read_from(node, 0).await.unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::NotCommitted {
                    committed: 1,
                    pending: 2,
                    ..
                }
            ),
            "node {node}: {err}"
        );
    }
    // mgmtd takes the tail out of the chain. The next write first commits
    // the version in doubt down the new chain, then applies itself on top.
    f.set_states(
        2,
        &[
            PublicState::Serving,
            PublicState::Serving,
            PublicState::Offline,
        ],
    );
    let v = f.write_to(0, 2, 0, 3, b"+more").await.unwrap();
    assert_eq!(v.commit_ver, 3);
    for node in 0..2 {
        assert_eq!(
            &f.read_from(node, 0).await.unwrap().1[..],
            b"new+more",
            "node {node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_an_uncommitted_version_refuses_to_read_it() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"committed").await.unwrap();
    // A write in flight: the tail has the pending version but has not committed it.
    f.nodes[2]
        .engine
        .write_pending(id(0), 2, 1, 0, b"PENDING!!", CHUNK)
        .unwrap();
    let err = f.read_from(2, 0).await.unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::NotCommitted {
                committed: 1,
                pending: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(&f.read_from(0, 0).await.unwrap().1[..], b"committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_replica_reports_a_checksum_error() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"precious bytes").await.unwrap();
    let (path, pos) = f.nodes[1]
        .engine
        .block_location(id(0), 1, 3)
        .unwrap()
        .expect("committed block");
    common::flip_bits(&path, pos, 0x40);
    let err = f.read_from(1, 0).await.unwrap_err();
    assert!(
        matches!(err, StorageError::Checksum { target: 102, .. }),
        "{err}"
    );
    assert_eq!(&f.read_from(0, 0).await.unwrap().1[..], b"precious bytes");
    // The damaged copy is mended from a peer behind the failed read.
    let repaired = async {
        loop {
            if let Ok((_, data)) = f.read_from(1, 0).await {
                return data;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let data = tokio::time::timeout(std::time::Duration::from_secs(10), repaired)
        .await
        .expect("repaired");
    assert_eq!(&data[..], b"precious bytes");
    let meta = f.nodes[1].engine.meta(id(0)).unwrap().unwrap();
    assert_eq!((meta.commit_ver, meta.update_ver), (1, 1), "{meta:?}");
}

/// A predecessor whose copy of a chunk fails its checksum repairs it from
/// another SERVING replica before sending it to a SYNCING target. A chunk
/// no replica can supply is never skipped: everything else is sent, and the
/// resync does not finish (the target stays SYNCING).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_a_damaged_chunk_from_a_peer_and_never_skips_one() {
    use PublicState::{Offline, Serving, Syncing};
    let f = Fixture::start().await;
    let flip = |node: usize, index: u64, ver: u64| {
        let (path, pos) = f.nodes[node]
            .engine
            .block_location(id(index), ver, 1)
            .unwrap()
            .expect("committed block");
        common::flip_bits(&path, pos, 0x08);
    };
    f.set_states(2, &[Serving, Serving, Offline]);
    for i in 0..4 {
        f.write_to(0, 2, i, 0, format!("chunk {i}").as_bytes())
            .await
            .unwrap();
    }
    flip(1, 1, 1);
    f.set_states(3, &[Serving, Serving, Syncing]);
    let stats = f.nodes[1].service.resync(CHAIN).await.unwrap().unwrap();
    assert_eq!((stats.installed, stats.repaired), (4, 1), "{stats:?}");
    assert_eq!(f.nodes[2].service.synced_at(103), Some(3));
    f.set_states(4, &[Serving, Serving, Serving]);
    // (The node forgets a finished sync once its target serves.)
    f.nodes[2].service.clear_synced(103);
    for node in 0..3 {
        assert_eq!(&f.read_from(node, 1).await.unwrap().1[..], b"chunk 1");
    }

    // Now chunk 2 is damaged on both SERVING replicas, and the tail missed
    // a write of chunk 3.
    f.set_states(5, &[Serving, Serving, Offline]);
    f.write_to(0, 5, 3, 0, b"chunk 3 again").await.unwrap();
    flip(0, 2, 1);
    flip(1, 2, 1);
    f.nodes[2]
        .engine
        .write_pending(id(2), 2, 5, 0, b"other", CHUNK)
        .unwrap();
    f.nodes[2].engine.commit(id(2), 2).unwrap();
    f.set_states(6, &[Serving, Serving, Syncing]);
    let err = f.nodes[1].service.resync(CHAIN).await.unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Checksum {
                addr: ChunkAddr { index: 2, .. },
                target: 102
            }
        ),
        "{err}"
    );
    assert_eq!(f.nodes[2].service.synced_at(103), None, "not finished");
    let sent = f.nodes[2].engine.meta(id(3)).unwrap().unwrap();
    assert_eq!(sent.commit_ver, 2, "the rest was sent: {sent:?}");
    let kept = f.nodes[2].engine.meta(id(2)).unwrap().unwrap();
    assert_eq!(kept.commit_ver, 2, "chunk 2 left as it was: {kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syncing_target_receives_writes_but_serves_no_reads() {
    let f = Fixture::start().await;
    f.set_states(
        2,
        &[
            PublicState::Serving,
            PublicState::Serving,
            PublicState::Syncing,
        ],
    );
    f.write_to(0, 2, 3, 0, b"during sync").await.unwrap();
    assert_eq!(
        f.nodes[2].engine.meta(id(3)).unwrap().unwrap().commit_ver,
        1,
        "the syncing tail got the write"
    );
    assert!(matches!(
        f.read_from(2, 3).await,
        Err(StorageError::NotServing { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_target_is_resynced_while_writes_go_on() {
    use PublicState::{Offline, Serving, Syncing};
    let f = Arc::new(Fixture::start().await);
    for i in 0..6 {
        f.write_to(0, 1, i, 0, format!("v1 of chunk {i}").as_bytes())
            .await
            .unwrap();
    }
    // The tail goes away; the chain writes on without it.
    f.set_states(2, &[Serving, Serving, Offline]);
    for i in 0..4 {
        f.write_to(0, 2, i, 3, b"v2").await.unwrap();
    }
    f.write_to(0, 2, 6, 0, b"new while the tail was away")
        .await
        .unwrap();
    // The tail also holds a chunk the others never had.
    let stray = ChunkId {
        inode: 7,
        index: 99,
    };
    f.nodes[2]
        .engine
        .write_pending(stray, 1, 1, 0, b"stray", CHUNK)
        .unwrap();
    f.nodes[2].engine.commit(stray, 1).unwrap();
    // It comes back: SYNCING, and writes keep coming while it is copied.
    f.set_states(3, &[Serving, Serving, Syncing]);
    let writer = {
        let f = f.clone();
        tokio::spawn(async move {
            for round in 0..20u64 {
                let i = round % 8;
                f.write_to(0, 3, i, 0, format!("during sync {round}").as_bytes())
                    .await
                    .unwrap();
            }
        })
    };
    let stats = f.nodes[1]
        .service
        .resync(CHAIN)
        .await
        .unwrap()
        .expect("node 2 is the predecessor");
    writer.await.unwrap();
    assert!(stats.installed >= 5 && stats.removed == 1, "{stats:?}");
    assert_eq!(f.nodes[2].service.synced_at(103), Some(3));
    assert_eq!(
        f.nodes[0].service.resync(CHAIN).await.unwrap(),
        None,
        "the head is not the predecessor"
    );
    // mgmtd turns it SERVING; every replica now holds the same chunks.
    f.set_states(4, &[Serving, Serving, Serving]);
    let summary = |n: usize| {
        let mut v: Vec<(ChunkId, u64, u32, u32)> = f.nodes[n]
            .engine
            .list()
            .unwrap()
            .into_iter()
            .map(|(id, m)| (id, m.commit_ver, m.length, m.crc))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        summary(2),
        summary(1),
        "the resynced tail matches its predecessor"
    );
    assert_eq!(summary(0), summary(1));
    for i in 0..8 {
        let (_, head) = f.read_from(0, i).await.unwrap();
        let (_, tail) = f.read_from(2, i).await.unwrap();
        assert_eq!(head, tail, "chunk {i}");
    }
    assert!(
        f.nodes[2].engine.meta(stray).unwrap().is_none(),
        "the stray chunk was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_chunk_skips_a_chunk_whose_first_version_is_in_flight() {
    let f = Fixture::start().await;
    let query = |chain| LastChunkRequest { chain, inode: 7 };
    let ask = |node: usize| {
        let rpc = f.rpc.clone();
        let addr = f.nodes[node].addr;
        async move {
            rpc.call::<QueryLastChunk>(addr, &query(CHAIN), Fixture::opts())
                .await
                .unwrap()
        }
    };
    assert_eq!(ask(1).await.unwrap(), None, "no chunks yet");
    f.write_to(0, 1, 2, 0, b"0123456789").await.unwrap();
    assert_eq!(
        ask(1).await.unwrap(),
        Some(LastChunk {
            index: 2,
            length: 10
        })
    );
    // A higher chunk whose first version is only pending does not count yet.
    f.nodes[1]
        .engine
        .write_pending(id(9), 1, 1, 0, b"in flight", CHUNK)
        .unwrap();
    assert_eq!(
        ask(1).await.unwrap(),
        Some(LastChunk {
            index: 2,
            length: 10
        })
    );
}

// ---- truncate, zeroing, chunk removal and listing ----

impl Fixture {
    async fn modify_req(
        &self,
        node: usize,
        chain_ver: u64,
        index: u64,
        op: ModifyOp,
        request: u64,
    ) -> StorageResult<ChunkVersion> {
        let req = ModifyRequest {
            addr: ChunkAddr {
                chain: CHAIN,
                inode: 7,
                index,
            },
            chain_ver,
            op,
            client: 1,
            request,
        };
        self.rpc
            .call::<Modify>(self.nodes[node].addr, &req, Self::opts())
            .await
            .unwrap()
    }

    async fn modify(&self, index: u64, op: ModifyOp) -> StorageResult<ChunkVersion> {
        let request = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.modify_req(0, self.chain_ver(), index, op, request)
            .await
    }

    /// A forwarded update of chunk 0 as a predecessor would send it.
    fn forwarded(
        &self,
        target: TargetId,
        update_ver: u64,
        op: UpdateOp,
        crc: u32,
    ) -> UpdateRequest {
        UpdateRequest {
            addr: ChunkAddr {
                chain: CHAIN,
                inode: 7,
                index: 0,
            },
            chain_ver: self.chain_ver(),
            target,
            update_ver,
            op,
            chunk_size: CHUNK,
            crc,
            client: 0,
            request: 0,
            pass: 0,
        }
    }

    fn chain_ver(&self) -> u64 {
        self.routing
            .borrow()
            .as_ref()
            .and_then(|r| r.chain(CHAIN).map(|c| c.version))
            .unwrap()
    }

    async fn remove_chunks_req(
        &self,
        node: usize,
        from: u64,
        to: u64,
        request: u64,
    ) -> StorageResult<RemoveChunksResponse> {
        let req = RemoveChunksRequest {
            chain: CHAIN,
            chain_ver: self.chain_ver(),
            inode: 7,
            from_index: from,
            to_index: to,
            client: 1,
            request,
        };
        self.rpc
            .call::<RemoveChunks>(self.nodes[node].addr, &req, Self::opts())
            .await
            .unwrap()
    }

    async fn list(&self, node: usize, from: u64, limit: u32) -> StorageResult<ChunkList> {
        let req = ListChunksRequest {
            chain: CHAIN,
            inode: 7,
            from_index: from,
            limit,
        };
        self.rpc
            .call::<ListChunks>(self.nodes[node].addr, &req, Self::opts())
            .await
            .unwrap()
    }

    /// `(commit_ver, length, crc)` of chunk `index` on every node; replicas
    /// must hold no pending version.
    fn replica_summaries(&self, index: u64) -> Vec<Option<(u64, u32, u32)>> {
        self.nodes
            .iter()
            .map(|n| {
                n.engine.meta(id(index)).unwrap().map(|m| {
                    assert!(!m.is_dirty(), "{m:?}");
                    (m.commit_ver, m.length, m.crc)
                })
            })
            .collect()
    }

    /// Asserts every replica holds `expect` (None: no such chunk) as chunk `index`.
    async fn check_replicas(&self, index: u64, expect: Option<&[u8]>) {
        let summaries = self.replica_summaries(index);
        assert!(
            summaries.iter().all(|s| *s == summaries[0]),
            "chunk {index}: replicas differ: {summaries:?}"
        );
        for node in 0..self.nodes.len() {
            match (self.read_from(node, index).await, expect) {
                (Ok((_, data)), Some(expect)) => {
                    assert!(&data[..] == expect, "chunk {index} on node {node}")
                }
                (Err(StorageError::NotFound { .. }), None) => {}
                (got, _) => panic!("chunk {index} on node {node}: {got:?}, expected {expect:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_shrinks_every_replica_and_a_regrown_region_reads_zeros() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"0123456789abcdefghij")
        .await
        .unwrap();
    let v = f.modify(0, ModifyOp::Truncate { length: 5 }).await.unwrap();
    assert_eq!((v.commit_ver, v.length), (2, 5));
    f.check_replicas(0, Some(b"01234")).await;
    // Writing past the cut re-grows the chunk with zeros, not the old bytes.
    f.write_to(0, 1, 0, 12, b"XY").await.unwrap();
    f.check_replicas(0, Some(b"01234\0\0\0\0\0\0\0XY")).await;
    // Truncating to a longer length, or a missing chunk, changes nothing.
    let same = f
        .modify(0, ModifyOp::Truncate { length: 100 })
        .await
        .unwrap();
    assert_eq!((same.commit_ver, same.length), (3, 14));
    let absent = f.modify(5, ModifyOp::Truncate { length: 3 }).await.unwrap();
    assert_eq!((absent.commit_ver, absent.length), (0, 0));
    f.check_replicas(5, None).await;
    // To length 0: the chunk stays, empty.
    f.modify(0, ModifyOp::Truncate { length: 0 }).await.unwrap();
    f.check_replicas(0, Some(b"")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroing_is_clipped_to_the_chunk_and_never_creates_one() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"0123456789").await.unwrap();
    f.modify(0, ModifyOp::Zero { offset: 2, len: 3 })
        .await
        .unwrap();
    f.check_replicas(0, Some(b"01\x00\x00\x0056789")).await;
    // Past the end: clipped, the chunk keeps its length.
    let v = f
        .modify(
            0,
            ModifyOp::Zero {
                offset: 8,
                len: 1000,
            },
        )
        .await
        .unwrap();
    assert_eq!((v.commit_ver, v.length), (3, 10));
    f.check_replicas(0, Some(b"01\x00\x00\x00567\0\0")).await;
    // Wholly past the end, or on a missing chunk: nothing changes.
    let v = f
        .modify(0, ModifyOp::Zero { offset: 10, len: 5 })
        .await
        .unwrap();
    assert_eq!(v.commit_ver, 3);
    let v = f
        .modify(4, ModifyOp::Zero { offset: 0, len: 5 })
        .await
        .unwrap();
    assert_eq!(v.commit_ver, 0);
    f.check_replicas(4, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_and_remove_chunks_are_refused_off_the_head_or_with_a_stale_chain_version() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"data").await.unwrap();
    let op = ModifyOp::Truncate { length: 1 };
    assert!(matches!(
        f.modify_req(1, 1, 0, op, 500).await,
        Err(StorageError::NotHead { .. })
    ));
    assert!(matches!(
        f.modify_req(0, 7, 0, op, 501).await,
        Err(StorageError::ChainVersion {
            request: 7,
            node: 1,
            ..
        })
    ));
    assert!(matches!(
        f.remove_chunks_req(2, 0, u64::MAX, 502).await,
        Err(StorageError::NotHead { .. })
    ));
    let stale = RemoveChunksRequest {
        chain: CHAIN,
        chain_ver: 0,
        inode: 7,
        from_index: 0,
        to_index: u64::MAX,
        client: 1,
        request: 503,
    };
    let resp = f
        .rpc
        .call::<RemoveChunks>(f.nodes[0].addr, &stale, Fixture::opts())
        .await
        .unwrap();
    assert!(matches!(resp, Err(StorageError::ChainVersion { .. })));
    let unknown = ListChunksRequest {
        chain: 99,
        inode: 7,
        from_index: 0,
        limit: 10,
    };
    let resp = f
        .rpc
        .call::<ListChunks>(f.nodes[1].addr, &unknown, Fixture::opts())
        .await
        .unwrap();
    assert!(matches!(resp, Err(StorageError::NotServing { chain: 99 })));
    f.check_replicas(0, Some(b"data")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_truncate_or_removal_is_applied_once_even_after_a_newer_write() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"long original").await.unwrap();
    f.write_to(0, 1, 1, 0, b"second chunk").await.unwrap();
    let cut = ModifyOp::Truncate { length: 4 };
    let first = f.modify_req(0, 1, 0, cut, 900).await.unwrap();
    // A write lands after the truncate; the truncate's retry must not cut it.
    f.write_to(0, 1, 0, 0, b"rewritten after").await.unwrap();
    let again = f.modify_req(0, 1, 0, cut, 900).await.unwrap();
    assert_eq!(first, again);
    f.check_replicas(0, Some(b"rewritten after")).await;
    // The same for a removal of a range of chunks.
    let removed = f.remove_chunks_req(0, 1, u64::MAX, 901).await.unwrap();
    assert_eq!(removed.removed, 1);
    f.check_replicas(1, None).await;
    f.write_to(0, 1, 1, 0, b"new second").await.unwrap();
    let again = f.remove_chunks_req(0, 1, u64::MAX, 901).await.unwrap();
    assert_eq!(again.removed, 0);
    f.check_replicas(1, Some(b"new second")).await;
    // The dedup also holds on a new head that was a member when it applied.
    f.set_states(
        2,
        &[
            PublicState::Offline,
            PublicState::Serving,
            PublicState::Serving,
        ],
    );
    let after_failover = f.modify_req(1, 2, 0, cut, 900).await.unwrap();
    assert_eq!(after_failover.commit_ver, first.commit_ver);
    assert_eq!(&f.read_from(2, 0).await.unwrap().1[..], b"rewritten after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_pending_on_the_head_alone_is_re_driven_and_shrinks_every_replica() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"a long committed chunk")
        .await
        .unwrap();
    // The head staged a truncate and crashed before forwarding it: the
    // pending version survives its restart; nobody else has it.
    f.nodes[0].engine.truncate(id(0), 6, 2, 1).unwrap();
    for node in 1..3 {
        assert_eq!(f.read_from(node, 0).await.unwrap().1.len(), 22);
    }
    // The next write re-drives the truncate whole before applying itself:
    // the successors' longer copies must shrink, not keep their tails.
    let v = f.write_to(0, 1, 0, 0, b"A").await.unwrap();
    assert_eq!((v.commit_ver, v.length), (3, 6));
    f.check_replicas(0, Some(b"A long")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_pending_on_head_and_middle_is_re_driven_by_the_next_truncate() {
    let mut f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"0123456789").await.unwrap();
    let tail = f.nodes[2].server.take().unwrap();
    tail.shutdown().await;
    let err = f
        .modify(0, ModifyOp::Truncate { length: 3 })
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Forward { .. }), "{err}");
    for node in 0..2 {
        assert!(f.nodes[node]
            .engine
            .meta(id(0))
            .unwrap()
            .unwrap()
            .is_dirty());
    }
    f.set_states(
        2,
        &[
            PublicState::Serving,
            PublicState::Serving,
            PublicState::Offline,
        ],
    );
    let v = f.modify(0, ModifyOp::Truncate { length: 5 }).await.unwrap();
    assert_eq!(
        (v.commit_ver, v.length),
        (2, 3),
        "the re-driven cut to 3 made the cut to 5 a no-op"
    );
    for node in 0..2 {
        assert_eq!(&f.read_from(node, 0).await.unwrap().1[..], b"012");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_pending_on_the_head_is_re_driven_by_the_next_write() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"doomed bytes").await.unwrap();
    f.nodes[0].engine.remove(id(0), 2, 1).unwrap();
    let v = f.write_to(0, 1, 0, 4, b"new").await.unwrap();
    assert_eq!(
        (v.commit_ver, v.length),
        (1, 7),
        "the chunk was removed everywhere, then written afresh"
    );
    f.check_replicas(0, Some(b"\0\0\0\0new")).await;
}

/// A tiny deterministic generator; the seed is printed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Debug, Clone)]
enum ChunkOp {
    Write(u32, Vec<u8>),
    Truncate(u32),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncates_racing_writes_on_one_chunk_commit_in_one_order_on_every_replica() {
    const TASKS: u64 = 4;
    const OPS_PER_TASK: u64 = 25;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let f = Arc::new(Fixture::start().await);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(t + 1) | 1);
            let mut done = Vec::new();
            for i in 0..OPS_PER_TASK {
                let op = if rng.below(3) == 0 {
                    ChunkOp::Truncate(rng.below(3000) as u32)
                } else {
                    let len = 1 + rng.below(1000) as usize;
                    let byte = (t * OPS_PER_TASK + i) as u8 | 1;
                    ChunkOp::Write(rng.below(3000) as u32, vec![byte; len])
                };
                let v = match &op {
                    ChunkOp::Write(off, data) => f.write_to(0, 1, 0, *off, data).await,
                    ChunkOp::Truncate(len) => {
                        f.modify(0, ModifyOp::Truncate { length: *len }).await
                    }
                };
                done.push((v.unwrap(), op));
            }
            done
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.extend(t.await.unwrap());
    }
    // Every op that changed the chunk got its own version; a truncate that
    // found the chunk short enough reports the version it saw. Replaying in
    // version order gives the chunk (ties are no-op truncates, which change
    // nothing wherever they go among their version's ops).
    done.sort_by_key(|(v, op)| (v.commit_ver, matches!(op, ChunkOp::Truncate(_))));
    let mut model: Vec<u8> = Vec::new();
    for (i, (v, op)) in done.iter().enumerate() {
        match op {
            ChunkOp::Write(off, data) => {
                let end = *off as usize + data.len();
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[*off as usize..end].copy_from_slice(data);
            }
            ChunkOp::Truncate(len) => model.truncate(*len as usize),
        }
        let group_ends = done
            .get(i + 1)
            .is_none_or(|(next, _)| next.commit_ver != v.commit_ver);
        if v.commit_ver > 0 && group_ends {
            assert_eq!(
                v.length as usize,
                model.len(),
                "length after version {}",
                v.commit_ver
            );
        }
    }
    f.check_replicas(0, Some(&model)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syncing_tail_takes_truncates_and_removals_whole() {
    use PublicState::{Serving, Syncing};
    let f = Fixture::start().await;
    f.set_states(2, &[Serving, Serving, Syncing]);
    f.write_to(0, 2, 0, 0, b"0123456789").await.unwrap();
    f.write_to(0, 2, 1, 0, b"gone soon").await.unwrap();
    f.modify(0, ModifyOp::Truncate { length: 4 }).await.unwrap();
    f.modify(0, ModifyOp::Zero { offset: 1, len: 2 })
        .await
        .unwrap();
    let removed = f.remove_chunks_req(0, 1, 2, 77).await.unwrap();
    assert_eq!(removed.removed, 1);
    let tail = f.nodes[2].engine.read(id(0), 0, CHUNK).unwrap();
    assert_eq!(&tail.0[..], b"0\0\x003");
    assert_eq!(tail.1.commit_ver, 3);
    assert!(f.nodes[2].engine.meta(id(1)).unwrap().is_none());
    f.set_states(3, &[Serving, Serving, Serving]);
    f.check_replicas(0, Some(b"0\0\x003")).await;
    f.check_replicas(1, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_and_removing_chunks_page_by_index() {
    const CHUNKS: u64 = r3fs_wire::storage::REMOVE_CHUNKS_MAX as u64 + 4;
    let f = Arc::new(Fixture::start().await);
    let mut writers = Vec::new();
    for w in 0..8 {
        let f = f.clone();
        writers.push(tokio::spawn(async move {
            for index in (w..CHUNKS).step_by(8) {
                let len = 1 + index as usize % 7;
                f.write_to(0, 1, index, 0, &vec![1u8; len]).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // A listing pages: `limit` entries, then a cursor.
    let page = f.list(1, 3, 2).await.unwrap();
    assert_eq!(
        page.chunks,
        [
            ChunkEntry {
                index: 3,
                length: 4
            },
            ChunkEntry {
                index: 4,
                length: 5
            }
        ]
    );
    assert_eq!(page.next_index, Some(5));
    let last = f.list(2, CHUNKS - 1, 10).await.unwrap();
    assert_eq!(last.chunks.len(), 1);
    assert_eq!(last.next_index, None);
    // A chunk whose first version is in flight is not listed.
    f.nodes[1]
        .engine
        .write_pending(id(CHUNKS + 10), 1, 1, 0, b"in flight", CHUNK)
        .unwrap();
    let tail = f.list(1, CHUNKS - 1, 10).await.unwrap();
    assert_eq!(tail.chunks.len(), 1);
    // Removal answers after REMOVE_CHUNKS_MAX chunks with a cursor.
    let first = f.remove_chunks_req(0, 2, CHUNKS, 4242).await.unwrap();
    assert_eq!(
        first.removed,
        u64::from(r3fs_wire::storage::REMOVE_CHUNKS_MAX)
    );
    let next = first.next_index.expect("more to remove");
    let second = f.remove_chunks_req(0, next, CHUNKS, 4242).await.unwrap();
    assert_eq!((second.removed, second.next_index), (2, None));
    let left = f.list(2, 0, 100).await.unwrap();
    let indices: Vec<u64> = left.chunks.iter().map(|c| c.index).collect();
    assert_eq!(indices, [0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_update_with_version_0_or_an_op_a_syncing_target_cannot_take_is_refused() {
    use PublicState::{Serving, Syncing};
    let f = Fixture::start().await;
    let update = |target, update_ver, op| f.forwarded(target, update_ver, op, 0);
    let send = |node: usize, req: UpdateRequest| {
        let rpc = f.rpc.clone();
        let addr = f.nodes[node].addr;
        async move {
            rpc.call_with_payload::<Update>(addr, &req, Bytes::new(), Fixture::opts())
                .await
                .unwrap()
                .0
        }
    };
    let zero = send(1, update(102, 0, UpdateOp::Truncate { length: 0 })).await;
    assert!(matches!(zero, Err(StorageError::Io { .. })), "{zero:?}");
    f.set_states(2, &[Serving, Serving, Syncing]);
    let partial = send(2, update(103, 1, UpdateOp::Write { offset: 0 })).await;
    assert!(
        matches!(partial, Err(StorageError::NotServing { .. })),
        "{partial:?}"
    );
    assert!(f.nodes[2].engine.meta(id(0)).unwrap().is_none());
}

/// Updates leave their payload's CRC to the handler (the frame layer checks
/// none): a payload that does not match the CRC in the body is refused by
/// the middle, the tail and a SYNCING tail alike, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_update_whose_payload_does_not_match_its_crc_is_refused_everywhere() {
    use PublicState::{Serving, Syncing};
    let f = Fixture::start().await;
    let payload = Bytes::from_static(b"bytes damaged on the way");
    let meant = crc_fast::crc32_iscsi(b"the bytes the sender meant");
    let update = |target, op| f.forwarded(target, 1, op, meant);
    let send = |node: usize, req: UpdateRequest| {
        let rpc = f.rpc.clone();
        let addr = f.nodes[node].addr;
        let payload = payload.clone();
        async move {
            rpc.call_with_payload::<Update>(addr, &req, payload, Fixture::opts())
                .await
                .unwrap()
                .0
        }
    };
    for (node, target) in [(1, 102), (2, 103)] {
        for op in [UpdateOp::Write { offset: 0 }, UpdateOp::Replace] {
            let got = send(node, update(target, op)).await;
            assert!(
                matches!(got, Err(StorageError::PayloadChecksum { .. })),
                "node {node} {op:?}: {got:?}"
            );
        }
    }
    f.set_states(2, &[Serving, Serving, Syncing]);
    let got = send(2, update(103, UpdateOp::Replace)).await;
    assert!(
        matches!(got, Err(StorageError::PayloadChecksum { .. })),
        "syncing: {got:?}"
    );
    for node in &f.nodes {
        assert!(node.engine.meta(id(0)).unwrap().is_none());
    }
}

/// A pending version nobody is updating (a failed forward, or an unsynced
/// commit a crash took back) is re-driven by the head when a read meets it,
/// so a chain that lost its other targets still serves the chunk; a middle
/// member keeps answering `NotCommitted` (the client reads elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_at_the_head_re_drives_a_leftover_pending_version() {
    use PublicState::{Offline, Serving};
    let f = Fixture::start().await;
    f.set_states(2, &[Serving, Serving, Serving]);
    for node in &f.nodes[..2] {
        node.engine
            .write_pending(id(0), 1, 2, 0, b"left pending", CHUNK)
            .unwrap();
    }
    assert!(matches!(
        f.read_from(1, 0).await,
        Err(StorageError::NotCommitted { .. })
    ));
    f.set_states(3, &[Serving, Offline, Offline]);
    let (resp, data) = f.read_from(0, 0).await.unwrap();
    assert_eq!((resp.commit_ver, &data[..]), (1, &b"left pending"[..]));
    assert!(!f.nodes[0].engine.meta(id(0)).unwrap().unwrap().is_dirty());
}

/// Listings and the last chunk (file lengths, SEEK_DATA) at a lone head
/// settle leftover pending versions first, as reads do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_head_lists_chunks_it_held_only_as_pending() {
    use PublicState::{Offline, Serving};
    let f = Fixture::start().await;
    f.nodes[0]
        .engine
        .write_pending(id(3), 1, 1, 0, b"pending only", CHUNK)
        .unwrap();
    f.set_states(2, &[Serving, Offline, Offline]);
    let list = f.list(0, 0, 10).await.unwrap();
    let listed: Vec<(u64, u32)> = list.chunks.iter().map(|c| (c.index, c.length)).collect();
    assert_eq!(listed, [(3, 12)]);
    f.nodes[0]
        .engine
        .write_pending(id(5), 1, 1, 0, b"also pending", CHUNK)
        .unwrap();
    let query = LastChunkRequest {
        chain: CHAIN,
        inode: 7,
    };
    let (last, _) = f
        .rpc
        .call_with_payload::<QueryLastChunk>(f.nodes[0].addr, &query, Bytes::new(), Fixture::opts())
        .await
        .unwrap();
    let last = last.unwrap().expect("a last chunk");
    assert_eq!((last.index, last.length), (5, 12));
}

/// After every target of a chain went down, the LASTSRV target serves at
/// once without a resync. If a crash took back its unsynced commits, it
/// holds acknowledged versions only as pending ones (the tail committed
/// them durably): resync must drive them down, never roll the returning
/// targets back to the older committed copy or remove the chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_from_a_returning_lastsrv_keeps_versions_it_holds_only_as_pending() {
    use PublicState::{Offline, Serving, Syncing};
    let f = Fixture::start().await;
    // Chunk 0: v1 acknowledged, its commit lost at head and middle.
    // Chunk 1: v1 committed everywhere, then v2 acknowledged the same way.
    let v1 = b"first version".as_slice();
    let v2 = b"second version, longer".as_slice();
    let write = |data: &'static [u8]| ChunkUpdate::Write {
        offset: 0,
        data,
        chunk_size: CHUNK,
        crc: crc_fast::crc32_iscsi(data),
    };
    for node in &f.nodes {
        node.engine.apply_committed(id(1), 1, 1, write(v1)).unwrap();
    }
    for node in &f.nodes[..2] {
        node.engine
            .write_pending(id(0), 1, 1, 0, v1, CHUNK)
            .unwrap();
        node.engine
            .write_pending(id(1), 2, 1, 0, v2, CHUNK)
            .unwrap();
    }
    f.nodes[2]
        .engine
        .apply_committed(id(0), 1, 1, write(v1))
        .unwrap();
    f.nodes[2]
        .engine
        .apply_committed(id(1), 2, 1, write(v2))
        .unwrap();

    // The head returned as LASTSRV and serves; the middle returns SYNCING.
    f.set_states(3, &[Serving, Syncing, Offline]);
    f.nodes[0].service.resync(CHAIN).await.unwrap();
    f.set_states(4, &[Serving, Serving, Syncing]);
    f.nodes[1].service.resync(CHAIN).await.unwrap();
    f.set_states(5, &[Serving, Serving, Serving]);
    // The returning targets first: a read at the head would re-drive.
    for (index, expect) in [(0, v1), (1, v2)] {
        for node in [2, 1, 0] {
            let (resp, data) = f.read_from(node, index).await.unwrap();
            assert_eq!(&data[..], expect, "chunk {index} at node {node}");
            assert_eq!(resp.commit_ver, index + 1);
        }
    }
}

/// A version the head re-drives may have been acknowledged through targets
/// that left the chain, so a successor's lack of space never makes the head
/// drop it (a first forward's `NoSpace` does: nothing after it committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_driven_version_a_successor_has_no_space_for_stays_pending() {
    use PublicState::{Offline, Serving, Syncing};
    let tmpfs = match common::mount_tmpfs("16m") {
        Ok(guard) => guard,
        Err(reason) => {
            println!("skipped: cannot mount tmpfs ({reason})");
            return;
        }
    };
    let f = Fixture::start_on([None, Some(tmpfs.dir.path()), None]).await;
    // The LASTSRV head holds v1 only as pending (the old tail, now
    // offline, committed it); the middle returns SYNCING with a full disk.
    let data = vec![5u8; CHUNK as usize];
    f.nodes[0]
        .engine
        .write_pending(id(0), 1, 1, 0, &data, CHUNK)
        .unwrap();
    let filler = common::fill_leaving(tmpfs.dir.path(), 1024 * 1024);
    f.set_states(3, &[Serving, Syncing, Offline]);
    let read = f.read_from(0, 0).await;
    assert!(
        matches!(read, Err(StorageError::NotCommitted { .. })),
        "{read:?}"
    );
    // A write meanwhile may be the pending version's own client retrying
    // (its origin is unknown here): in doubt, never refused for space.
    let err = f.write_to(0, 3, 0, 0, b"retry?").await.unwrap_err();
    assert!(matches!(err, StorageError::Io { .. }), "{err}");
    let meta = f.nodes[0].engine.meta(id(0)).unwrap().expect("kept");
    assert!(meta.is_dirty() && meta.update_ver == 1, "{meta:?}");
    // With space back, the next read settles it on both.
    std::fs::remove_file(filler).unwrap();
    let (resp, got) = f.read_from(0, 0).await.unwrap();
    assert_eq!((resp.commit_ver, &got[..]), (1, &data[..]));
    let synced = f.nodes[1].engine.read(id(0), 0, CHUNK).unwrap().0;
    assert_eq!(synced, data);
}

/// A member passes a version on as soon as it is checked and its slots are
/// taken, so its own disk work overlaps its successors'; they commit it
/// only after its stored notice. When the head's disk then fails a block
/// write, the successors hold the version pending and commit nothing: the
/// head leaves service (answering nothing, reporting OFFLINE) rather than
/// give the version's number to other bytes, and once mgmtd moves it out
/// the middle heads the chain and settles the version first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_whose_disk_fails_after_forwarding_leaves_service() {
    use PublicState::{Offline, Serving};
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"old").await.unwrap();
    f.nodes[0]
        .engine
        .inject_faults(FaultPoint::BlockWrite, Some(libc::EIO));
    let err = f.write_to(0, 1, 0, 0, b"new").await.unwrap_err();
    assert!(matches!(err, StorageError::Io { target: 101, .. }), "{err}");
    let reason = f.nodes[0].service.failure(target_of(0)).expect("failed");
    assert!(reason.contains("os error 5"), "{reason}");
    for node in 1..3 {
        let read = f.read_from(node, 0).await;
        assert!(
            matches!(read, Err(StorageError::NotCommitted { pending: 2, .. })),
            "node {node}: {read:?}"
        );
    }
    // Out of service even once the disk writes again, for reads too: its
    // copy lacks version 2.
    f.nodes[0]
        .engine
        .inject_faults(FaultPoint::BlockWrite, None);
    let read = f.read_from(0, 0).await;
    assert!(matches!(read, Err(StorageError::Io { .. })), "{read:?}");
    let write = f.write_to(0, 1, 0, 0, b"again").await;
    assert!(matches!(write, Err(StorageError::Io { .. })), "{write:?}");
    let meta = f.nodes[0].engine.meta(id(0));
    assert!(matches!(meta, Err(ChunkError::Failed { .. })), "{meta:?}");

    f.set_states(2, &[Offline, Serving, Serving]);
    let v = f.write_to(1, 2, 0, 3, b"+more").await.unwrap();
    assert_eq!(v.commit_ver, 3);
    for node in 1..3 {
        assert_eq!(&f.read_from(node, 0).await.unwrap().1[..], b"new+more");
    }
}

/// As above for the middle: it leaves service, the tail keeps the version
/// pending (its notice said the middle failed), and so does the head (its
/// forward failed) until the next write re-drives it down the new chain. A
/// full disk there is no different: after the forward, `NoSpace` would tell
/// the head nothing after it holds the version, which is not so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middle_whose_disk_fails_after_forwarding_leaves_service() {
    use PublicState::{Offline, Serving};
    for errno in [libc::EIO, libc::ENOSPC] {
        let f = Fixture::start().await;
        f.write_to(0, 1, 0, 0, b"old").await.unwrap();
        f.nodes[1]
            .engine
            .inject_faults(FaultPoint::BlockWrite, Some(errno));
        let err = f.write_to(0, 1, 0, 0, b"new").await.unwrap_err();
        assert!(
            matches!(err, StorageError::Forward { .. }),
            "{errno}: {err}"
        );
        assert!(f.nodes[1].service.failure(target_of(1)).is_some());
        assert!(f.nodes[0].service.failure(target_of(0)).is_none());
        for node in [0, 2] {
            let read = f.read_from(node, 0).await;
            assert!(
                matches!(read, Err(StorageError::NotCommitted { pending: 2, .. })),
                "{errno}: node {node}: {read:?}"
            );
        }

        f.set_states(2, &[Serving, Offline, Serving]);
        let v = f.write_to(0, 2, 0, 3, b"+more").await.unwrap();
        assert_eq!(v.commit_ver, 3);
        for node in [0, 2] {
            assert_eq!(&f.read_from(node, 0).await.unwrap().1[..], b"new+more");
        }
    }
}

/// Refusals come before a version goes on: a version a member refuses
/// reaches nothing after it, and no member leaves service for it. Here the
/// middle holds another version 2 pending (the tail, clean, would take it)
/// and the payload checks are the other refusal class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_a_member_refuses_goes_no_further() {
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"old").await.unwrap();
    f.nodes[1]
        .engine
        .write_pending(id(0), 2, 1, 0, b"other", CHUNK)
        .unwrap();
    let send = |crc: u32| {
        let req = f.forwarded(target_of(1), 2, UpdateOp::Write { offset: 0 }, crc);
        let (rpc, addr) = (f.rpc.clone(), f.nodes[1].addr);
        async move {
            rpc.call_with_payload::<Update>(addr, &req, Bytes::from_static(b"new"), Fixture::opts())
                .await
                .unwrap()
                .0
        }
    };
    let got = send(crc_fast::crc32_iscsi(b"new")).await;
    assert!(matches!(got, Err(StorageError::Io { .. })), "{got:?}");
    let text = got.unwrap_err().to_string();
    assert!(
        text.contains("already pending"),
        "a version conflict: {text}"
    );
    let got = send(crc_fast::crc32_iscsi(b"damaged")).await;
    assert!(
        matches!(got, Err(StorageError::PayloadChecksum { .. })),
        "{got:?}"
    );
    let tail = f.nodes[2].engine.meta(id(0)).unwrap().unwrap();
    assert_eq!(
        (tail.commit_ver, tail.update_ver),
        (1, 1),
        "the tail never saw it"
    );
    for (i, node) in f.nodes.iter().enumerate() {
        assert!(node.service.failure(target_of(i)).is_none(), "node {i}");
    }
}

/// A target that fails is reported OFFLINE at once, not at the next
/// heartbeat, so mgmtd moves it out of its chain before clients give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_target_is_reported_offline_at_once() {
    use r3fs_storage::node::{NodeConfig, Reporter};
    use std::time::Duration;
    type Beat = Vec<(TargetId, LocalState)>;
    struct Beats(tokio::sync::mpsc::UnboundedSender<Beat>);
    impl Reporter for Beats {
        fn heartbeat(
            &self,
            _node: NodeId,
            targets: Beat,
        ) -> impl std::future::Future<Output = Result<u64, String>> + Send {
            let sent = self.0.send(targets).map_err(|e| e.to_string());
            async move { sent.map(|()| 1) }
        }
    }
    // The head's block write fails after it forwarded (the chain layer
    // takes it out); the tail's fdatasync fails (the engine takes itself
    // out, and only its failure hook tells the node).
    for (node, point) in [(0, FaultPoint::BlockWrite), (2, FaultPoint::DataSync)] {
        let f = Fixture::start().await;
        let (tx, mut beats) = tokio::sync::mpsc::unbounded_channel();
        let hour = Duration::from_secs(3600);
        let config = NodeConfig {
            node_id: node as u32 + 1,
            heartbeat_interval: hour,
            resync_retry: hour,
        };
        let _tasks = r3fs_storage::node::spawn(
            f.nodes[node].service.clone(),
            Beats(tx),
            f.routing.subscribe(),
            config,
        );
        let first = beats.recv().await.unwrap();
        assert_eq!(first, vec![(target_of(node), LocalState::Online)]);
        f.nodes[node].engine.inject_faults(point, Some(libc::EIO));
        f.write_to(0, 1, 0, 0, b"x").await.unwrap_err();
        let next = tokio::time::timeout(Duration::from_secs(10), beats.recv())
            .await
            .expect("a beat at once, not after the interval")
            .unwrap();
        assert_eq!(
            next,
            vec![(target_of(node), LocalState::Offline)],
            "{point:?}"
        );
    }
}

/// The tail commits a forwarded version only once its predecessor's stored
/// notice says every member before it holds the version (chain
/// replication's update propagation, with members storing in parallel):
/// before that it holds it pending and serves neither; a notice that
/// a predecessor failed leaves it pending and fails the update; a notice
/// may also come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_commits_a_forwarded_version_only_after_its_stored_notice() {
    let f = Fixture::start().await;
    let tail = 2;
    let send_update = |ver: u64, pass: u64, data: &'static [u8]| {
        let op = UpdateOp::Write { offset: 0 };
        let req = UpdateRequest {
            pass,
            ..f.forwarded(target_of(tail), ver, op, crc_fast::crc32_iscsi(data))
        };
        let (rpc, addr) = (f.rpc.clone(), f.nodes[tail].addr);
        tokio::spawn(async move {
            let sent = rpc.call_with_payload::<Update>(
                addr,
                &req,
                Bytes::from_static(data),
                Fixture::opts(),
            );
            sent.await.unwrap().0
        })
    };
    let send_notice = |ver: u64, pass: u64, stored: bool| {
        let notice = StoredNotice {
            addr: ChunkAddr {
                chain: CHAIN,
                inode: 7,
                index: 0,
            },
            target: target_of(tail),
            update_ver: ver,
            pass,
            stored,
        };
        let (rpc, addr) = (f.rpc.clone(), f.nodes[tail].addr);
        async move {
            rpc.call::<Stored>(addr, &notice, Fixture::opts())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let settle = || tokio::time::sleep(std::time::Duration::from_millis(200));

    let update = send_update(1, 1, b"one");
    settle().await;
    let meta = f.nodes[tail].engine.meta(id(0)).unwrap().expect("stored");
    assert_eq!((meta.update_ver, meta.commit_ver), (1, 0), "pending only");
    assert!(!update.is_finished(), "waits for the notice");
    // Another pass's notice of the same version is not its own.
    send_notice(1, 9, true).await;
    settle().await;
    assert!(!update.is_finished(), "still waits");
    send_notice(1, 1, true).await;
    assert_eq!(update.await.unwrap().unwrap().commit_ver, 1);
    assert_eq!(&f.read_from(tail, 0).await.unwrap().1[..], b"one");
    // A retry of a version already committed here needs no notice (the one
    // for its pass was used): every member stored it.
    let retried = send_update(1, 5, b"one").await.unwrap().unwrap();
    assert_eq!(retried.commit_ver, 1);

    let update = send_update(2, 2, b"two");
    settle().await;
    let read = f.read_from(tail, 0).await;
    assert!(
        matches!(read, Err(StorageError::NotCommitted { pending: 2, .. })),
        "{read:?}"
    );
    send_notice(2, 2, false).await;
    let failed = update.await.unwrap();
    assert!(
        matches!(failed, Err(StorageError::Forward { .. })),
        "{failed:?}"
    );
    let meta = f.nodes[tail].engine.meta(id(0)).unwrap().unwrap();
    assert_eq!((meta.update_ver, meta.commit_ver), (2, 1), "kept pending");

    // The notice may come first (its update waits for the chunk's lock).
    send_notice(2, 3, true).await;
    let retried = send_update(2, 3, b"two").await.unwrap().unwrap();
    assert_eq!(retried.commit_ver, 2);
    assert_eq!(&f.read_from(tail, 0).await.unwrap().1[..], b"two");
}

/// More updates in flight between two members than a server runs at once
/// per connection (4 here): each waits for its stored notice, which must
/// not queue behind them (notices travel on connections of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_updates_in_flight_between_two_members_get_their_notices() {
    let config = ServerConfig {
        in_flight_max: 4,
        ..ServerConfig::default()
    };
    let f = Fixture::start_with([None, None, None], config).await;
    let writes = (0..64u64).map(|index| f.write_to(0, 1, index, 0, b"many"));
    let done = futures::future::join_all(writes).await;
    for (index, version) in done.into_iter().enumerate() {
        assert_eq!(version.unwrap().commit_ver, 1, "chunk {index}");
    }
    for index in [0, 31, 63] {
        f.check_replicas(index, Some(b"many")).await;
    }
    // A notice goes once its version is committed, not after minutes.
    for (i, node) in f.nodes.iter().enumerate() {
        assert_eq!(node.service.stored_notices_kept(), 0, "node {i}");
    }
}

/// A member sends a SYNCING successor, which commits at once, the whole
/// version only after its predecessor's stored notice: when the head's disk
/// fails the version, the SYNCING target never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syncing_target_gets_a_version_only_once_every_member_stored_it() {
    use PublicState::{Serving, Syncing};
    let f = Fixture::start().await;
    f.write_to(0, 1, 0, 0, b"old").await.unwrap();
    f.set_states(2, &[Serving, Serving, Syncing]);
    f.nodes[0]
        .engine
        .inject_faults(FaultPoint::BlockWrite, Some(libc::EIO));
    let err = f.write_to(0, 2, 0, 0, b"new").await.unwrap_err();
    assert!(matches!(err, StorageError::Io { target: 101, .. }), "{err}");
    let syncing = f.nodes[2].engine.meta(id(0)).unwrap().unwrap();
    assert_eq!(
        (syncing.commit_ver, syncing.update_ver),
        (1, 1),
        "{syncing:?}"
    );
    let middle = f.nodes[1].engine.meta(id(0)).unwrap().unwrap();
    assert_eq!(
        (middle.commit_ver, middle.update_ver),
        (1, 2),
        "kept pending"
    );
}

/// A late try of a committed version (its first try was slow, and the
/// predecessor retried) may reach a member after the next version of the
/// chunk became pending there: the member answers it as the committed retry
/// it is, and the newer version stays pending, at the middle and the tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_try_of_a_committed_version_is_answered_while_a_newer_one_is_pending() {
    let f = Fixture::start().await;
    for node in [1, 2] {
        let index = node as u64;
        let addr = ChunkAddr {
            chain: CHAIN,
            inode: 7,
            index,
        };
        let update = |ver: u64, pass: u64, data: &'static [u8]| {
            let req = UpdateRequest {
                addr,
                pass,
                client: 1,
                request: 100 + pass,
                ..f.forwarded(
                    target_of(node),
                    ver,
                    UpdateOp::Write { offset: 0 },
                    crc_fast::crc32_iscsi(data),
                )
            };
            let (rpc, to) = (f.rpc.clone(), f.nodes[node].addr);
            tokio::spawn(async move {
                let sent = rpc.call_with_payload::<Update>(
                    to,
                    &req,
                    Bytes::from_static(data),
                    Fixture::opts(),
                );
                sent.await.unwrap().0
            })
        };
        let notice = |ver: u64, pass: u64, stored: bool| {
            let notice = StoredNotice {
                addr,
                target: target_of(node),
                update_ver: ver,
                pass,
                stored,
            };
            let (rpc, to) = (f.rpc.clone(), f.nodes[node].addr);
            async move {
                rpc.call::<Stored>(to, &notice, Fixture::opts())
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        notice(1, 1, true).await;
        let first = update(1, 1, b"one").await.unwrap();
        assert_eq!(first.unwrap().commit_ver, 1, "node {node}");
        // The predecessor fails version 2: it stays pending from here on.
        notice(2, 2, false).await;
        let second = update(2, 2, b"two").await.unwrap();
        assert!(
            matches!(second, Err(StorageError::Forward { .. })),
            "node {node}: {second:?}"
        );
        let late = update(1, 3, b"one").await.unwrap();
        assert_eq!(
            late,
            Ok(ChunkVersion {
                commit_ver: 1,
                length: 3
            }),
            "node {node}"
        );
        // A try of version 2 with other bytes (another request's, delayed)
        // is refused, and must not take version 2's request either.
        let other = update(2, 4, b"TWO").await.unwrap();
        assert!(other.is_err(), "node {node}: {other:?}");
        for n in node..3 {
            let meta = f.nodes[n].engine.meta(id(index)).unwrap().unwrap();
            assert_eq!(
                (meta.commit_ver, meta.update_ver),
                (1, 2),
                "node {n} keeps version 2 pending"
            );
        }
    }
    // The late and the refused tries left version 2's request to it: when
    // the middle becomes head and that request is retried, version 2 is
    // re-driven and the retry answered by it, not applied again as
    // version 3.
    use PublicState::{Offline, Serving};
    f.set_states(2, &[Offline, Serving, Serving]);
    let retried = f.write_req(1, 2, 1, 0, b"two", 102).await.unwrap();
    assert_eq!(retried.commit_ver, 2);
    for n in 1..3 {
        let meta = f.nodes[n].engine.meta(id(1)).unwrap().unwrap();
        assert_eq!((meta.commit_ver, meta.update_ver), (2, 2), "node {n}");
    }
}

/// A late try of a version a member has committed goes no further: its
/// successor committed it before, and a SYNCING successor may hold a newer
/// version by now, which a whole copy of the old one would roll back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_try_never_rolls_a_syncing_successor_back() {
    use PublicState::{Serving, Syncing};
    let f = Fixture::start().await;
    f.set_states(2, &[Serving, Serving, Syncing]);
    f.write_to(0, 2, 0, 0, b"one").await.unwrap();
    // Version 2 reached the SYNCING tail, whose answer the middle never
    // got: pending there, committed at the tail.
    f.nodes[1]
        .engine
        .write_pending(id(0), 2, 2, 0, b"two", CHUNK)
        .unwrap();
    f.nodes[2]
        .engine
        .write_pending(id(0), 2, 2, 0, b"two", CHUNK)
        .unwrap();
    f.nodes[2].engine.commit(id(0), 2).unwrap();
    let late = UpdateRequest {
        pass: 7,
        ..f.forwarded(
            target_of(1),
            1,
            UpdateOp::Write { offset: 0 },
            crc_fast::crc32_iscsi(b"one"),
        )
    };
    let (answer, _) = f
        .rpc
        .call_with_payload::<Update>(
            f.nodes[1].addr,
            &late,
            Bytes::from_static(b"one"),
            Fixture::opts(),
        )
        .await
        .unwrap();
    assert_eq!(answer.unwrap().commit_ver, 1);
    let tail = f.nodes[2].engine.meta(id(0)).unwrap().unwrap();
    assert_eq!(tail.commit_ver, 2, "not rolled back: {tail:?}");
    let bytes = f.nodes[2].engine.read(id(0), 0, 3).unwrap().0;
    assert_eq!(bytes, b"two");
}

/// A notice whose forward never arrives is kept for 40 s (every try of
/// that forward may need it), then dropped when a later notice arrives; a
/// notice sent again is kept from its last arrival.
#[tokio::test(start_paused = true)]
async fn a_notice_nobody_uses_expires_after_forty_seconds() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(ChunkEngine::open(dir.path(), CHUNK).unwrap());
    let (_routing, rx) = watch::channel(None);
    let service = StorageService::new(1, HashMap::from([(target_of(0), engine)]), rx);
    let notice = |update_ver: u64| StoredNotice {
        addr: ChunkAddr {
            chain: CHAIN,
            inode: 7,
            index: 0,
        },
        target: target_of(0),
        update_ver,
        pass: 1,
        stored: true,
    };
    let after = |secs: u64| tokio::time::advance(Duration::from_secs(secs));
    service.stored(notice(1)).unwrap();
    after(20).await;
    service.stored(notice(2)).unwrap();
    service.stored(notice(1)).unwrap(); // sent again: kept from now
    after(21).await; // 41 s after the first notice of 1
    service.stored(notice(3)).unwrap();
    assert_eq!(
        service.stored_notices_kept(),
        3,
        "none is 40 s old by its last arrival"
    );
    after(20).await; // 2 and the resent 1 are 41 s old
    service.stored(notice(4)).unwrap();
    assert_eq!(service.stored_notices_kept(), 2, "3 and 4 are kept");
    after(41).await;
    service.stored(notice(5)).unwrap();
    assert_eq!(service.stored_notices_kept(), 1);
}

/// A member whose commit fails for lack of space after the version went on
/// (its successor committed it; at the tail, every member stored it) answers
/// in doubt, never `NoSpace`: a refusal would make every member before it
/// drop a version the tail serves or may commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_after_the_version_went_on_is_in_doubt() {
    for node in [1, 2] {
        let f = Fixture::start().await;
        f.write_to(0, 1, 0, 0, b"one").await.unwrap();
        f.nodes[node]
            .engine
            .inject_faults(FaultPoint::UnsyncedCommit, Some(libc::ENOSPC));
        let err = f.write_to(0, 1, 0, 0, b"two").await.unwrap_err();
        assert!(
            !matches!(err, StorageError::NoSpace { .. }),
            "node {node}: {err}"
        );
        let reason = f.nodes[node].engine.failure().expect("out of service");
        assert!(reason.contains("metadata store"), "{reason}");
        for other in (0..3).filter(|&n| n != node) {
            let meta = f.nodes[other].engine.meta(id(0)).unwrap().unwrap();
            // Before the failed member: kept pending, to re-drive; after
            // it: committed.
            let commit_ver = if other < node { 1 } else { 2 };
            assert_eq!(
                (meta.commit_ver, meta.update_ver),
                (commit_ver, 2),
                "node {other} when node {node} failed"
            );
        }
    }
}

/// A head's re-drive that the tail has no space for leaves the version
/// pending at every member it reached, the middle too: it may have been
/// acknowledged, and only a first forward's `NoSpace` lets a member drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_drive_the_tail_has_no_space_for_stays_pending_in_the_middle() {
    let tmpfs = match common::mount_tmpfs("16m") {
        Ok(guard) => guard,
        Err(reason) => {
            println!("skipped: cannot mount tmpfs ({reason})");
            return;
        }
    };
    let f = Fixture::start_on([None, None, Some(tmpfs.dir.path())]).await;
    // A write reached the head and the middle only (its forward to the
    // tail failed): pending on both.
    let data = vec![6u8; CHUNK as usize];
    for node in 0..2 {
        f.nodes[node]
            .engine
            .write_pending(id(0), 1, 1, 0, &data, CHUNK)
            .unwrap();
    }
    let filler = common::fill_leaving(tmpfs.dir.path(), 1024 * 1024);
    let err = f.write_to(0, 1, 0, 0, b"next").await.unwrap_err();
    assert!(!matches!(err, StorageError::NoSpace { .. }), "{err}");
    for node in 0..2 {
        let meta = f.nodes[node].engine.meta(id(0)).unwrap().expect("kept");
        assert!(
            meta.is_dirty() && meta.update_ver == 1,
            "node {node}: {meta:?}"
        );
    }
    // With space back, the next write settles version 1, then applies.
    std::fs::remove_file(filler).unwrap();
    let done = f.write_to(0, 1, 0, 0, b"next").await.unwrap();
    assert_eq!(done.commit_ver, 2);
    let mut expect = data.clone();
    expect[..4].copy_from_slice(b"next");
    f.check_replicas(0, Some(&expect)).await;
}
