//! CRAQ chain replication over the chunk engines of one storage node.
//!
//! Only the head of a chain takes client writes. It locks the chunk, assigns
//! `update_ver = commit_ver + 1`, stores the pending version, forwards it to
//! its successor and commits when the successor acknowledges; the tail
//! commits first, so a version is committed at a node only once every node
//! after it has committed it. Every hop checks the chain version against its
//! routing info and the CRC32C of the data. Writes are forwarded to SERVING and
//! SYNCING successors alike, so a target being resynced misses nothing.
//!
//! Reads go to any SERVING replica. A replica holding an uncommitted version
//! answers `NotCommitted` and the client reads elsewhere or retries: we follow
//! 3FS here rather than asking the tail (CRAQ's option), because the tail may
//! be the busiest node and a retry after a write's round trip is cheap.
//!
//! Must not decide chain states (mgmtd does) or touch the namespace.
//!
//! # Limits
//! Writes to one chunk are serialized by one of [`CHUNK_LOCK_STRIPES`] locks;
//! the head remembers the outcome of the last [`DEDUP_ENTRIES_MAX`] client
//! writes so a retried write is applied once.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use r3fs_net::{CallOptions, RetryPolicy, Router, RpcClient, RpcError};
use r3fs_wire::mgmt::{Chain, NodeId, PublicState, RoutingInfo, TargetId};
use r3fs_wire::storage::*;
use tokio::sync::watch;

use crate::chunk::{ChunkEngine, ChunkError, ChunkId};

/// Locks serializing writes per chunk (a chunk maps to one by hash).
pub const CHUNK_LOCK_STRIPES: usize = 1024;
/// Client writes whose outcome the head remembers for retries.
pub const DEDUP_ENTRIES_MAX: usize = 65_536;
/// Deadline of one forwarded update.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The CRAQ service of one storage node. Cheap to clone.
#[derive(Clone)]
pub struct StorageService {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeId,
    targets: HashMap<TargetId, Arc<ChunkEngine>>,
    routing: watch::Receiver<Option<Arc<RoutingInfo>>>,
    rpc: RpcClient,
    locks: Vec<tokio::sync::Mutex<()>>,
    dedup: Mutex<Dedup>,
}

#[derive(Default)]
struct Dedup {
    done: HashMap<(u64, u64), ChunkVersion>,
    order: VecDeque<(u64, u64)>,
}

impl StorageService {
    /// Serves `targets` (the chunk engines of this node) by the routing info
    /// `routing` publishes (from a `RoutingWatcher`, or a fixed one in tests).
    pub fn new(
        node: NodeId,
        targets: HashMap<TargetId, Arc<ChunkEngine>>,
        routing: watch::Receiver<Option<Arc<RoutingInfo>>>,
    ) -> StorageService {
        StorageService {
            inner: Arc::new(Inner {
                node,
                targets,
                routing,
                rpc: RpcClient::new(r3fs_net::ClientConfig::default()),
                locks: (0..CHUNK_LOCK_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                dedup: Mutex::new(Dedup::default()),
            }),
        }
    }

    /// Registers the storage methods on `router`.
    pub fn register(&self, router: &mut Router) {
        let s = self.clone();
        router.register_with_payload::<Write, _, _>(move |req, ctx| {
            let s = s.clone();
            async move { Ok((s.write(req, ctx.payload).await, Bytes::new())) }
        });
        let s = self.clone();
        router.register_with_payload::<Update, _, _>(move |req, ctx| {
            let s = s.clone();
            async move { Ok((s.update(req, ctx.payload).await, Bytes::new())) }
        });
        let s = self.clone();
        router.register_with_payload::<Read, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move {
                Ok(match s.read(req).await {
                    Ok((resp, data)) => (Ok(resp), data),
                    Err(e) => (Err(e), Bytes::new()),
                })
            }
        });
    }

    /// The chain as routing info has it, and this node's target in it.
    fn locate(&self, addr: ChunkAddr) -> StorageResult<(Arc<RoutingInfo>, Chain, usize)> {
        let routing = self
            .inner
            .routing
            .borrow()
            .clone()
            .ok_or(StorageError::NotServing { chain: addr.chain })?;
        let chain = routing
            .chain(addr.chain)
            .cloned()
            .ok_or(StorageError::NotServing { chain: addr.chain })?;
        let pos = chain
            .targets
            .iter()
            .position(|t| self.inner.targets.contains_key(&t.target))
            .ok_or(StorageError::NotServing { chain: addr.chain })?;
        Ok((routing, chain, pos))
    }

    fn engine(&self, target: TargetId) -> &Arc<ChunkEngine> {
        &self.inner.targets[&target]
    }

    fn lock_for(&self, addr: ChunkAddr) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        addr.hash(&mut h);
        &self.inner.locks[(h.finish() as usize) % CHUNK_LOCK_STRIPES]
    }

    /// A client write, at the head.
    pub async fn write(&self, req: WriteRequest, data: Bytes) -> StorageResult<ChunkVersion> {
        check_payload(req.crc, &data)?;
        if let Some(done) = self.inner.dedup.lock().done.get(&(req.client, req.request)) {
            return Ok(*done);
        }
        let (routing, chain, pos) = self.locate(req.addr)?;
        let me = chain.targets[pos];
        if pos != 0 || me.state != PublicState::Serving {
            return Err(StorageError::NotHead {
                chain: chain.id,
                target: me.target,
            });
        }
        check_chain_version(&chain, req.chain_ver)?;
        let _guard = self.lock_for(req.addr).lock().await;
        let engine = self.engine(me.target).clone();
        let id = chunk_id(req.addr);
        let update_ver = {
            let engine = engine.clone();
            blocking(move || {
                let meta = engine.meta(id)?;
                if meta.is_some_and(|m| m.update_ver > m.commit_ver) {
                    // A pending version left by a write that failed to forward.
                    engine.abort_pending(id)?;
                }
                Ok(meta.map_or(1, |m| m.commit_ver + 1))
            })
            .await
            .map_err(|e| storage_error(e, req.addr, me.target))?
        };
        let update = UpdateRequest {
            addr: req.addr,
            chain_ver: chain.version,
            target: me.target,
            update_ver,
            offset: req.offset,
            chunk_size: req.chunk_size,
            crc: req.crc,
        };
        let version = self
            .apply_and_forward(&routing, &chain, pos, update, data)
            .await?;
        let mut dedup = self.inner.dedup.lock();
        if dedup
            .done
            .insert((req.client, req.request), version)
            .is_none()
        {
            dedup.order.push_back((req.client, req.request));
        }
        while dedup.order.len() > DEDUP_ENTRIES_MAX {
            if let Some(old) = dedup.order.pop_front() {
                dedup.done.remove(&old);
            }
        }
        Ok(version)
    }

    /// A forwarded update, at a middle or tail target.
    pub async fn update(&self, req: UpdateRequest, data: Bytes) -> StorageResult<ChunkVersion> {
        check_payload(req.crc, &data)?;
        let (routing, chain, pos) = self.locate(req.addr)?;
        check_chain_version(&chain, req.chain_ver)?;
        let me = chain.targets[pos];
        if me.target != req.target
            || !matches!(me.state, PublicState::Serving | PublicState::Syncing)
        {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        let _guard = self.lock_for(req.addr).lock().await;
        self.apply_and_forward(&routing, &chain, pos, req, data)
            .await
    }

    /// Stores the pending version on this node's target, forwards it down the
    /// chain, and commits it once the successor has.
    async fn apply_and_forward(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        pos: usize,
        req: UpdateRequest,
        data: Bytes,
    ) -> StorageResult<ChunkVersion> {
        let me = chain.targets[pos].target;
        let engine = self.engine(me).clone();
        let id = chunk_id(req.addr);
        let (addr, update_ver, chain_ver) = (req.addr, req.update_ver, req.chain_ver);
        {
            let engine = engine.clone();
            let data = data.clone();
            let (offset, chunk_size) = (req.offset, req.chunk_size);
            blocking(move || {
                engine
                    .write_pending(id, update_ver, chain_ver, offset, &data, chunk_size)
                    .map(drop)
            })
            .await
            .map_err(|e| storage_error(e, addr, me))?;
        }
        let successor = chain.targets[pos + 1..]
            .iter()
            .find(|t| matches!(t.state, PublicState::Serving | PublicState::Syncing));
        if let Some(next) = successor {
            let forwarded = UpdateRequest {
                target: next.target,
                ..req
            };
            if let Err(e) = self.forward(routing, chain, forwarded, data).await {
                let engine = engine.clone();
                let _ = blocking(move || engine.abort_pending(id)).await;
                return Err(e);
            }
        }
        let meta = blocking(move || {
            engine.commit(id, update_ver)?;
            engine.meta(id)?.ok_or(ChunkError::NotFound { id })
        })
        .await
        .map_err(|e| storage_error(e, addr, me))?;
        assert!(
            meta.commit_ver >= update_ver,
            "a committed chunk is at least at the version just committed"
        );
        Ok(ChunkVersion {
            commit_ver: meta.commit_ver,
            length: meta.length,
        })
    }

    async fn forward(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        req: UpdateRequest,
        data: Bytes,
    ) -> StorageResult<()> {
        let fail = |reason: String| StorageError::Forward {
            chain: chain.id,
            reason,
        };
        let target = routing
            .target(req.target)
            .ok_or_else(|| fail(format!("target {} not in routing info", req.target)))?;
        let node = routing
            .node(target.node)
            .ok_or_else(|| fail(format!("node {} not in routing info", target.node)))?;
        let addr: SocketAddr = node
            .address
            .parse()
            .map_err(|e| fail(format!("node {} address {:?}: {e}", node.id, node.address)))?;
        let opts = CallOptions {
            timeout: FORWARD_TIMEOUT,
            retry: RetryPolicy::default(),
            idempotent: true,
        };
        match self
            .inner
            .rpc
            .call_with_payload::<Update>(addr, &req, data, opts)
            .await
        {
            Ok((Ok(_), _)) => Ok(()),
            Ok((Err(e), _)) => Err(fail(format!("target {} refused: {e}", req.target))),
            Err(e) => Err(fail(format!(
                "target {} at {addr}: {}",
                req.target,
                rpc_reason(&e)
            ))),
        }
    }

    /// A client read, at any SERVING replica.
    pub async fn read(&self, req: ReadRequest) -> StorageResult<(ReadResponse, Bytes)> {
        let (_routing, chain, pos) = self.locate(req.addr)?;
        let me = chain.targets[pos];
        if me.state != PublicState::Serving {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        let engine = self.engine(me.target).clone();
        let id = chunk_id(req.addr);
        let (offset, length) = (req.offset, req.length);
        let (data, meta) = blocking(move || engine.read(id, offset, length))
            .await
            .map_err(|e| storage_error(e, req.addr, me.target))?;
        let resp = ReadResponse {
            commit_ver: meta.commit_ver,
            chunk_length: meta.length,
            crc: crc32c::crc32c(&data),
        };
        Ok((resp, Bytes::from(data)))
    }

    pub fn node(&self) -> NodeId {
        self.inner.node
    }
}

fn chunk_id(addr: ChunkAddr) -> ChunkId {
    ChunkId {
        inode: addr.inode,
        index: addr.index,
    }
}

fn check_payload(sent: u32, data: &[u8]) -> StorageResult<()> {
    let computed = crc32c::crc32c(data);
    if computed != sent {
        return Err(StorageError::PayloadChecksum { sent, computed });
    }
    Ok(())
}

fn check_chain_version(chain: &Chain, request: u64) -> StorageResult<()> {
    if chain.version != request {
        return Err(StorageError::ChainVersion {
            chain: chain.id,
            request,
            node: chain.version,
        });
    }
    Ok(())
}

fn rpc_reason(e: &RpcError) -> String {
    e.to_string()
}

/// The storage error a client sees for a chunk engine error.
fn storage_error(e: ChunkError, addr: ChunkAddr, target: TargetId) -> StorageError {
    match e {
        ChunkError::NotCommitted {
            committed_ver,
            update_ver,
            ..
        } => StorageError::NotCommitted {
            addr,
            committed: committed_ver,
            pending: update_ver,
        },
        ChunkError::Corrupt { .. } => StorageError::Checksum { addr, target },
        ChunkError::OutOfRange { end, limit, .. } => StorageError::OutOfRange { end, limit },
        ChunkError::NoSpace { .. } => StorageError::NoSpace { target },
        other => StorageError::Io {
            target,
            reason: other.to_string(),
        },
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ChunkError> + Send + 'static,
) -> Result<T, ChunkError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(ChunkError::Io {
            id: None,
            path: std::path::PathBuf::new(),
            source: std::io::Error::other(format!("chunk task failed: {e}")),
        }),
    }
}
