//! CRAQ chain replication over the chunk engines of one storage node, and the
//! resync that brings a returning target up to date.
//!
//! Only the head of a chain takes client writes. It locks the chunk, assigns
//! `update_ver = commit_ver + 1`, stores the pending version, forwards it to
//! its successor and commits when the successor acknowledges; the tail
//! commits first, so a version is committed at a node only once every node
//! after it has committed it. Every hop checks the chain version against its
//! routing info and the CRC32C of the data.
//!
//! Reads go to any SERVING replica. A replica holding an uncommitted version
//! answers `NotCommitted` and the client reads elsewhere or retries: we follow
//! 3FS here rather than asking the tail (CRAQ's option), because the tail may
//! be the busiest node and a retry after a write's round trip is cheap.
//!
//! # Resync
//! A SYNCING target follows every SERVING target in its chain, so its
//! predecessor is the last SERVING target. Writes reach it as whole chunk
//! versions (it may lack the base a partial write builds on) and it installs
//! them committed at once, being the last target a write reaches. The
//! predecessor compares chunk summaries with it, sends every chunk that
//! differs or is missing and removes what it should not have, each under the
//! same per-chunk lock that forwarded writes take, so no write interleaves
//! with the copy of its chunk; then it declares the copy complete and the
//! target reports up to date, which makes mgmtd turn it SERVING.
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
use r3fs_net::{CallOptions, RetryPolicy, Router, RpcClient};
use r3fs_wire::mgmt::{Chain, ChainId, NodeId, PublicState, RoutingInfo, TargetId};
use r3fs_wire::storage::*;
use r3fs_wire::Method;
use tokio::sync::watch;

use crate::chunk::{ChunkEngine, ChunkError, ChunkId, ChunkMeta};

/// Locks serializing writes per chunk (a chunk maps to one by hash).
pub const CHUNK_LOCK_STRIPES: usize = 1024;
/// Client writes whose outcome the head remembers for retries.
pub const DEDUP_ENTRIES_MAX: usize = 65_536;
/// Deadline of one forwarded update or sync call.
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
    /// The client request behind each pending version on this node, so the
    /// request is remembered as done when the version is re-driven.
    origins: Mutex<HashMap<ChunkAddr, (u64, u64)>>,
    /// SYNCING targets whose copy a predecessor declared complete, with the
    /// chain version it was complete at.
    synced: Mutex<HashMap<TargetId, u64>>,
}

#[derive(Default)]
struct Dedup {
    done: HashMap<(u64, u64), ChunkVersion>,
    order: VecDeque<(u64, u64)>,
}

/// What one resync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncStats {
    pub compared: usize,
    pub installed: usize,
    pub removed: usize,
    pub bytes: u64,
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
                origins: Mutex::new(HashMap::new()),
                synced: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    pub fn targets(&self) -> impl Iterator<Item = TargetId> + '_ {
        self.inner.targets.keys().copied()
    }

    /// The chain version at which a predecessor declared `target`'s copy complete.
    pub fn synced_at(&self, target: TargetId) -> Option<u64> {
        self.inner.synced.lock().get(&target).copied()
    }

    /// Forgets a completed sync (once the target serves, or when it must sync again).
    pub fn clear_synced(&self, target: TargetId) {
        self.inner.synced.lock().remove(&target);
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
        let s = self.clone();
        router.register::<SyncList, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.sync_list(req).await) }
        });
        let s = self.clone();
        router.register_with_payload::<SyncInstall, _, _>(move |req, ctx| {
            let s = s.clone();
            async move { Ok((s.sync_install(req, ctx.payload).await, Bytes::new())) }
        });
        let s = self.clone();
        router.register::<SyncRemove, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.sync_remove(req).await) }
        });
        let s = self.clone();
        router.register::<QueryLastChunk, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.last_chunk(req).await) }
        });
        let s = self.clone();
        router.register::<RemoveInode, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.remove_inode(req).await) }
        });
        let s = self.clone();
        router.register::<SyncDone, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.sync_done(req)) }
        });
    }

    fn routing(&self, chain: ChainId) -> StorageResult<Arc<RoutingInfo>> {
        self.inner
            .routing
            .borrow()
            .clone()
            .ok_or(StorageError::NotServing { chain })
    }

    /// The chain as routing info has it, and the position of this node's target in it.
    fn locate(&self, chain_id: ChainId) -> StorageResult<(Arc<RoutingInfo>, Chain, usize)> {
        let routing = self.routing(chain_id)?;
        let chain = routing
            .chain(chain_id)
            .cloned()
            .ok_or(StorageError::NotServing { chain: chain_id })?;
        let pos = chain
            .targets
            .iter()
            .position(|t| self.inner.targets.contains_key(&t.target))
            .ok_or(StorageError::NotServing { chain: chain_id })?;
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
        let (routing, chain, pos) = self.locate(req.addr.chain)?;
        let me = chain.targets[pos];
        if pos != 0 || me.state != PublicState::Serving {
            return Err(StorageError::NotHead {
                chain: chain.id,
                target: me.target,
            });
        }
        check_chain_version(&chain, req.chain_ver)?;
        let _guard = self.lock_for(req.addr).lock().await;
        // A pending version left by a write whose forward failed is never
        // dropped: a successor may have committed it and serve it. Drive it
        // down the current chain first, then check again whether this very
        // request was that write.
        let update_ver = self
            .recover_pending(&routing, &chain, pos, req.addr)
            .await?;
        if let Some(done) = self.inner.dedup.lock().done.get(&(req.client, req.request)) {
            return Ok(*done);
        }
        let update = UpdateRequest {
            addr: req.addr,
            chain_ver: chain.version,
            target: me.target,
            update_ver,
            offset: req.offset,
            chunk_size: req.chunk_size,
            crc: req.crc,
            full: false,
            client: req.client,
            request: req.request,
        };
        self.apply_and_forward(&routing, &chain, pos, update, data)
            .await
    }

    /// If this target holds a pending version of `addr`, forwards it whole down
    /// the chain and commits it; returns the version the next write gets.
    async fn recover_pending(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        pos: usize,
        addr: ChunkAddr,
    ) -> StorageResult<u64> {
        let me = chain.targets[pos].target;
        let engine = self.engine(me).clone();
        let id = chunk_id(addr);
        let (meta, pending) = {
            let engine = engine.clone();
            blocking(move || Ok((engine.meta(id)?, engine.read_pending(id)?)))
                .await
                .map_err(|e| storage_error(e, addr, me))?
        };
        let Some(meta) = meta else { return Ok(1) };
        let Some((bytes, pending_meta)) = pending else {
            return Ok(meta.commit_ver + 1);
        };
        let (client, request) = self
            .inner
            .origins
            .lock()
            .get(&addr)
            .copied()
            .unwrap_or((0, 0));
        tracing::info!(
            ?addr,
            update_ver = pending_meta.update_ver,
            "re-driving a pending version down the chain"
        );
        let redo = UpdateRequest {
            addr,
            chain_ver: chain.version,
            target: me,
            update_ver: pending_meta.update_ver,
            offset: 0,
            chunk_size: engine.chunk_size_max(),
            crc: crc32c::crc32c(&bytes),
            full: true,
            client,
            request,
        };
        let version = self
            .apply_and_forward(routing, chain, pos, redo, Bytes::from(bytes))
            .await?;
        Ok(version.commit_ver + 1)
    }

    fn remember(&self, client: u64, request: u64, version: ChunkVersion) {
        if (client, request) == (0, 0) {
            return;
        }
        let mut dedup = self.inner.dedup.lock();
        if dedup.done.insert((client, request), version).is_none() {
            dedup.order.push_back((client, request));
        }
        while dedup.order.len() > DEDUP_ENTRIES_MAX {
            if let Some(old) = dedup.order.pop_front() {
                dedup.done.remove(&old);
            }
        }
    }

    /// A forwarded update, at a middle, tail or SYNCING target.
    pub async fn update(&self, req: UpdateRequest, data: Bytes) -> StorageResult<ChunkVersion> {
        check_payload(req.crc, &data)?;
        let (routing, chain, pos) = self.locate(req.addr.chain)?;
        check_chain_version(&chain, req.chain_ver)?;
        let me = chain.targets[pos];
        if me.target != req.target {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        let _guard = self.lock_for(req.addr).lock().await;
        match (me.state, req.full) {
            (PublicState::Serving, _) => {
                self.apply_and_forward(&routing, &chain, pos, req, data)
                    .await
            }
            (PublicState::Syncing, true) => self.install_full(me.target, req, data).await,
            _ => Err(StorageError::NotServing { chain: chain.id }),
        }
    }

    /// A SYNCING target takes a whole chunk version and commits it at once:
    /// it is the last target a write reaches (what follows it in the chain is
    /// WAITING or OFFLINE and gets no writes).
    async fn install_full(
        &self,
        target: TargetId,
        req: UpdateRequest,
        data: Bytes,
    ) -> StorageResult<ChunkVersion> {
        let engine = self.engine(target).clone();
        let meta = installed_meta(req.update_ver, req.chain_ver, &data);
        let id = chunk_id(req.addr);
        let origin = (req.client, req.request);
        let meta = blocking(move || engine.install(id, meta, &data))
            .await
            .map_err(|e| storage_error(e, req.addr, target))?;
        let version = ChunkVersion {
            commit_ver: meta.commit_ver,
            length: meta.length,
        };
        self.remember(origin.0, origin.1, version);
        Ok(version)
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
        let req_origin = (req.client, req.request);
        self.inner.origins.lock().insert(addr, req_origin);
        let successor = chain.targets[pos + 1..]
            .iter()
            .find(|t| matches!(t.state, PublicState::Serving | PublicState::Syncing))
            .copied();
        let to_syncing = successor.is_some_and(|t| t.state == PublicState::Syncing);
        let full = {
            let engine = engine.clone();
            let data = data.clone();
            let (offset, chunk_size) = (req.offset, req.chunk_size);
            blocking(move || {
                // A SYNCING successor gets the whole new version: read the
                // base before staging the write on top of it.
                let base = if to_syncing {
                    Some(committed_bytes(&engine, id)?)
                } else {
                    None
                };
                let meta =
                    engine.write_pending(id, update_ver, chain_ver, offset, &data, chunk_size)?;
                Ok(base.map(|base| {
                    let full = patch(base, offset, &data);
                    assert_eq!(
                        crc32c::crc32c(&full),
                        meta.pending_crc,
                        "the whole version sent to a syncing target is the version staged here"
                    );
                    Bytes::from(full)
                }))
            })
            .await
            .map_err(|e| storage_error(e, addr, me))?
        };
        if let Some(next) = successor {
            let (payload, forwarded) = match full {
                Some(full) => {
                    let crc = crc32c::crc32c(&full);
                    (
                        full,
                        UpdateRequest {
                            target: next.target,
                            full: true,
                            offset: 0,
                            crc,
                            ..req
                        },
                    )
                }
                None => (
                    data,
                    UpdateRequest {
                        target: next.target,
                        ..req
                    },
                ),
            };
            let sent = self
                .call::<Update, _>(routing, chain.id, next.target, &forwarded, payload)
                .await
                .map(drop);
            // On failure the pending version stays: a successor may already
            // have committed it. The next write to this chunk re-drives it.
            sent?;
        }
        let meta = blocking(move || {
            engine.commit(id, update_ver)?;
            engine.meta(id)?.ok_or(ChunkError::NotFound { id })
        })
        .await
        .map_err(|e| storage_error(e, addr, me))?;
        assert!(
            meta.commit_ver >= update_ver,
            "a chunk just committed is at least at that version"
        );
        let version = ChunkVersion {
            commit_ver: meta.commit_ver,
            length: meta.length,
        };
        self.inner.origins.lock().remove(&addr);
        self.remember(req_origin.0, req_origin.1, version);
        Ok(version)
    }

    /// Calls `M` on the node serving `target`, mapping transport failures and
    /// refusals to `Forward` errors of `chain`.
    async fn call<M, T>(
        &self,
        routing: &RoutingInfo,
        chain: ChainId,
        target: TargetId,
        req: &M::Request,
        payload: Bytes,
    ) -> StorageResult<(T, Bytes)>
    where
        M: Method<Response = StorageResult<T>>,
    {
        let fail = |reason: String| StorageError::Forward { chain, reason };
        let info = routing
            .target(target)
            .ok_or_else(|| fail(format!("target {target} not in routing info")))?;
        let node = routing
            .node(info.node)
            .ok_or_else(|| fail(format!("node {} not in routing info", info.node)))?;
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
            .call_with_payload::<M>(addr, req, payload, opts)
            .await
        {
            Ok((Ok(value), data)) => Ok((value, data)),
            Ok((Err(e), _)) => Err(fail(format!("target {target} refused: {e}"))),
            Err(e) => Err(fail(format!("target {target} at {addr}: {e}"))),
        }
    }

    /// A client read, at any SERVING replica.
    pub async fn read(&self, req: ReadRequest) -> StorageResult<(ReadResponse, Bytes)> {
        let (_routing, chain, pos) = self.locate(req.addr.chain)?;
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

    /// The last committed chunk of a file on this node's SERVING target.
    /// A chunk whose newest version is still pending reports its committed
    /// length: the in-flight write settles later.
    pub async fn last_chunk(&self, req: LastChunkRequest) -> StorageResult<Option<LastChunk>> {
        let (_routing, chain, pos) = self.locate(req.chain)?;
        let me = chain.targets[pos];
        if me.state != PublicState::Serving {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        let engine = self.engine(me.target).clone();
        let inode = req.inode;
        let last = blocking(move || {
            // The highest chunk, unless its first version is still in flight:
            // then the highest one with something committed.
            match engine.last_chunk(inode)? {
                Some((id, m)) if m.commit_ver > 0 => Ok(Some((id, m))),
                Some(_) => {
                    let mut chunks = engine.list_inode(inode)?;
                    chunks.retain(|(_, m)| m.commit_ver > 0);
                    Ok(chunks.into_iter().max_by_key(|(id, _)| id.index))
                }
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| io_error(e, me.target))?;
        Ok(last.map(|(id, m)| LastChunk {
            index: id.index,
            length: m.length,
        }))
    }

    /// Removes every chunk of a deleted file on this node's target, after
    /// the rest of the chain has (the tail first, as for writes). Returns how
    /// many chunks this target dropped.
    pub async fn remove_inode(&self, req: RemoveInodeRequest) -> StorageResult<u64> {
        let (routing, chain, pos) = self.locate(req.chain)?;
        check_chain_version(&chain, req.chain_ver)?;
        let me = chain.targets[pos];
        if me.target != req.target
            || !matches!(me.state, PublicState::Serving | PublicState::Syncing)
        {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        if req.target == chain.targets[0].target && pos != 0 {
            return Err(StorageError::NotHead {
                chain: chain.id,
                target: me.target,
            });
        }
        let successor = chain.targets[pos + 1..]
            .iter()
            .find(|t| matches!(t.state, PublicState::Serving | PublicState::Syncing))
            .copied();
        if let Some(next) = successor {
            let forwarded = RemoveInodeRequest {
                target: next.target,
                ..req
            };
            self.call::<RemoveInode, _>(&routing, chain.id, next.target, &forwarded, Bytes::new())
                .await?;
        }
        let engine = self.engine(me.target).clone();
        let inode = req.inode;
        let removed = blocking(move || engine.remove_inode(inode))
            .await
            .map_err(|e| io_error(e, me.target))?;
        Ok(removed as u64)
    }

    /// The SYNCING target named by a sync request, if it is ours and the
    /// chain version matches.
    fn syncing_target(
        &self,
        chain_id: ChainId,
        target: TargetId,
        chain_ver: u64,
    ) -> StorageResult<Arc<ChunkEngine>> {
        let (_routing, chain, pos) = self.locate(chain_id)?;
        check_chain_version(&chain, chain_ver)?;
        let me = chain.targets[pos];
        if me.target != target || me.state != PublicState::Syncing {
            return Err(StorageError::NotServing { chain: chain_id });
        }
        Ok(self.engine(target).clone())
    }

    async fn sync_list(&self, req: SyncListRequest) -> StorageResult<Vec<ChunkSummary>> {
        let engine = self.syncing_target(req.chain, req.target, req.chain_ver)?;
        let target = req.target;
        let all = blocking(move || engine.list())
            .await
            .map_err(|e| io_error(e, target))?;
        Ok(all
            .into_iter()
            .filter(|(_, m)| m.commit_ver > 0)
            .map(|(id, m)| summary(id, &m))
            .collect())
    }

    async fn sync_install(&self, req: SyncInstallRequest, data: Bytes) -> StorageResult<()> {
        let engine = self.syncing_target(req.addr.chain, req.target, req.chain_ver)?;
        let _guard = self.lock_for(req.addr).lock().await;
        let meta = installed_meta(req.chunk.commit_ver, req.chain_ver, &data);
        if meta.crc != req.chunk.crc || meta.length != req.chunk.length {
            return Err(StorageError::PayloadChecksum {
                sent: req.chunk.crc,
                computed: meta.crc,
            });
        }
        let id = chunk_id(req.addr);
        blocking(move || engine.install(id, meta, &data).map(drop))
            .await
            .map_err(|e| storage_error(e, req.addr, req.target))
    }

    async fn sync_remove(&self, req: SyncRemoveRequest) -> StorageResult<()> {
        let engine = self.syncing_target(req.addr.chain, req.target, req.chain_ver)?;
        let _guard = self.lock_for(req.addr).lock().await;
        let id = chunk_id(req.addr);
        let chain_ver = req.chain_ver;
        blocking(move || {
            let Some(meta) = engine.meta(id)? else {
                return Ok(());
            };
            if meta.is_dirty() {
                engine.abort_pending(id)?;
            }
            let Some(meta) = engine.meta(id)? else {
                return Ok(());
            };
            let version = meta.commit_ver + 1;
            if engine.remove(id, version, chain_ver)?.is_some() {
                engine.commit(id, version)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| storage_error(e, req.addr, req.target))
    }

    fn sync_done(&self, req: SyncDoneRequest) -> StorageResult<()> {
        self.syncing_target(req.chain, req.target, req.chain_ver)?;
        tracing::info!(
            target = req.target,
            chain = req.chain,
            chain_ver = req.chain_ver,
            "resync complete"
        );
        self.inner.synced.lock().insert(req.target, req.chain_ver);
        Ok(())
    }

    /// If this node's target in `chain_id` is the predecessor of a SYNCING
    /// target, copies it everything it lacks and declares it complete.
    /// Returns `None` when there is nothing for this node to sync.
    pub async fn resync(&self, chain_id: ChainId) -> StorageResult<Option<ResyncStats>> {
        let (routing, chain, pos) = self.locate(chain_id)?;
        let me = chain.targets[pos];
        let Some(next) = chain.targets.get(pos + 1).copied() else {
            return Ok(None);
        };
        if me.state != PublicState::Serving || next.state != PublicState::Syncing {
            return Ok(None);
        }
        let list = SyncListRequest {
            target: next.target,
            chain: chain_id,
            chain_ver: chain.version,
        };
        let (theirs, _) = self
            .call::<SyncList, _>(&routing, chain_id, next.target, &list, Bytes::new())
            .await?;
        let theirs: HashMap<(u64, u64), ChunkSummary> = theirs
            .into_iter()
            .map(|c| ((c.inode, c.index), c))
            .collect();
        let engine = self.engine(me.target).clone();
        let mine = {
            let engine = engine.clone();
            blocking(move || engine.list())
                .await
                .map_err(|e| io_error(e, me.target))?
        };
        let mut stats = ResyncStats::default();
        let mut seen = std::collections::HashSet::new();
        for (id, _) in mine {
            seen.insert((id.inode, id.index));
            let addr = ChunkAddr {
                chain: chain_id,
                inode: id.inode,
                index: id.index,
            };
            let _guard = self.lock_for(addr).lock().await;
            let engine = engine.clone();
            let current = blocking(move || committed(&engine, id))
                .await
                .map_err(|e| io_error(e, me.target))?;
            let Some((meta, bytes)) = current else {
                continue;
            };
            stats.compared += 1;
            let ours = summary(id, &meta);
            if theirs.get(&(id.inode, id.index)) == Some(&ours) {
                continue;
            }
            stats.installed += 1;
            stats.bytes += bytes.len() as u64;
            let install = SyncInstallRequest {
                target: next.target,
                chain_ver: chain.version,
                chunk: ours,
                addr,
            };
            self.call::<SyncInstall, _>(
                &routing,
                chain_id,
                next.target,
                &install,
                Bytes::from(bytes),
            )
            .await?;
        }
        for (inode, index) in theirs.keys().filter(|k| !seen.contains(k)) {
            let addr = ChunkAddr {
                chain: chain_id,
                inode: *inode,
                index: *index,
            };
            let _guard = self.lock_for(addr).lock().await;
            stats.removed += 1;
            let remove = SyncRemoveRequest {
                target: next.target,
                chain_ver: chain.version,
                addr,
            };
            self.call::<SyncRemove, _>(&routing, chain_id, next.target, &remove, Bytes::new())
                .await?;
        }
        let done = SyncDoneRequest {
            target: next.target,
            chain: chain_id,
            chain_ver: chain.version,
        };
        self.call::<SyncDone, _>(&routing, chain_id, next.target, &done, Bytes::new())
            .await?;
        tracing::info!(chain = chain_id, to = next.target, ?stats, "resync sent");
        Ok(Some(stats))
    }
}

fn chunk_id(addr: ChunkAddr) -> ChunkId {
    ChunkId {
        inode: addr.inode,
        index: addr.index,
    }
}

fn summary(id: ChunkId, m: &ChunkMeta) -> ChunkSummary {
    ChunkSummary {
        inode: id.inode,
        index: id.index,
        commit_ver: m.commit_ver,
        length: m.length,
        crc: m.crc,
    }
}

/// The committed meta of a chunk installed whole at `version`.
fn installed_meta(version: u64, chain_ver: u64, data: &[u8]) -> ChunkMeta {
    let crc = crc32c::crc32c(data);
    let length = data.len() as u32;
    ChunkMeta {
        update_ver: version,
        commit_ver: version,
        chain_ver,
        length,
        crc,
        pending_length: length,
        pending_crc: crc,
        pending_remove: false,
    }
}

/// The committed version of a chunk and its bytes, `None` if nothing is committed.
fn committed(
    engine: &ChunkEngine,
    id: ChunkId,
) -> Result<Option<(ChunkMeta, Vec<u8>)>, ChunkError> {
    match engine.read_committed_even_if_dirty(id, 0, engine.chunk_size_max()) {
        Ok((bytes, meta)) => Ok(Some((meta, bytes))),
        Err(ChunkError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn committed_bytes(engine: &ChunkEngine, id: ChunkId) -> Result<Vec<u8>, ChunkError> {
    Ok(committed(engine, id)?.map(|(_, b)| b).unwrap_or_default())
}

/// `base` with `data` written at `offset`, zero-filling any gap.
fn patch(mut base: Vec<u8>, offset: u32, data: &[u8]) -> Vec<u8> {
    let start = offset as usize;
    let end = start + data.len();
    if base.len() < end {
        base.resize(end, 0);
    }
    base[start..end].copy_from_slice(data);
    base
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

fn io_error(e: ChunkError, target: TargetId) -> StorageError {
    StorageError::Io {
        target,
        reason: e.to_string(),
    }
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
        ChunkError::NotFound { .. } => StorageError::NotFound { addr },
        ChunkError::OutOfRange { end, limit, .. } => StorageError::OutOfRange { end, limit },
        ChunkError::NoSpace { .. } => StorageError::NoSpace { target },
        other => io_error(other, target),
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
