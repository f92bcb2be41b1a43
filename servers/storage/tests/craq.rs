//! CRAQ over real RPC on loopback: three storage nodes, one chain of three,
//! routing info given directly (mgmtd's part is tested in mgmtd's tests).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use r3fs_net::{CallOptions, RetryPolicy, Router, RpcClient, RpcServer, ServerConfig};
use r3fs_storage::chunk::{ChunkEngine, ChunkId};
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
    _dir: tempfile::TempDir,
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
        let (tx, rx) = watch::channel(None);
        let mut nodes = Vec::new();
        for i in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let engine = Arc::new(ChunkEngine::open(dir.path(), CHUNK).unwrap());
            let service = StorageService::new(
                i as u32 + 1,
                HashMap::from([(target_of(i), engine.clone())]),
                rx.clone(),
            );
            let mut router = Router::new();
            service.register(&mut router);
            let registered = service.clone();
            let server = RpcServer::bind(
                "127.0.0.1:0".parse().unwrap(),
                router,
                ServerConfig::default(),
            )
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
            crc: crc32c::crc32c(data),
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
            (2, crc32c::crc32c(b"hello CRAQ!"))
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
    let path = f.nodes[1]
        .engine
        .data_path(id(0), 1)
        .unwrap()
        .expect("committed version file");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let err = f.read_from(1, 0).await.unwrap_err();
    assert!(
        matches!(err, StorageError::Checksum { target: 102, .. }),
        "{err}"
    );
    assert_eq!(&f.read_from(0, 0).await.unwrap().1[..], b"precious bytes");
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
