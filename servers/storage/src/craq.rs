//! CRAQ chain replication over the chunk engines of one storage node, and the
//! resync that brings a returning target up to date.
//!
//! Only the head of a chain takes client updates of a chunk: writes
//! (`Write`), truncates and zeroing (`Modify`) and removals of a range of
//! chunks (`RemoveChunks`, one versioned removal per chunk). For each chunk
//! it locks the chunk, assigns `update_ver = commit_ver + 1`, stores the
//! pending version, forwards it to its successor as an [`UpdateOp`] and
//! commits when the successor acknowledges; the tail commits first, so a
//! version is committed at a node only once every node after it has
//! committed it.
//!
//! A member forwards a version as soon as it has passed every check there
//! (versions, chain version, payload CRC) and its slots are taken, and
//! stores it (block writes, fsync, metadata commit) while its successors
//! do, so the members' disk work overlaps instead of adding up. Chain
//! replication's update propagation still holds — a version is committed
//! anywhere only once every member holds it durably — through stored
//! notices ([`StoredNotice`]): once a member has stored a version and has
//! its predecessor's notice that every member before it has too (the head
//! needs none), it tells its successor so; the tail commits a forwarded
//! version, and a member sends a SYNCING successor (which commits at once)
//! the whole version, only after that notice. A notice that a predecessor
//! failed, or none within [`FORWARD_TIMEOUT`], leaves the version pending
//! and fails the update. A member whose own store fails after it forwarded
//! leaves service until its process restarts
//! (`StorageService::fail_target`): its successors hold the version
//! pending, so it must not give the number to other bytes; it answers
//! nothing and reports OFFLINE, mgmtd moves it out of the chain, and the
//! new head settles the version. A version a member refuses goes no
//! further. A member commits only once its successor acknowledged and its
//! own store is done.
//!
//! Chunk engine calls block on disk I/O, so they run on tokio's blocking
//! pool, except an unsynced commit that need not wait for any (its chunk's
//! lock free, no flush under way in the metadata store, no failed metadata
//! write in doubt: `ChunkEngine::try_commit_unsynced`), which runs in place
//! on the acknowledgement path.
//!
//! The head alone stages and commits in one durable metadata commit; every
//! other commit waits for no metadata fsync (`ChunkEngine::commit_unsynced`):
//! every member holds the version durably by then, and a commit a machine
//! crash takes back leaves the version pending there: a restarted target
//! goes through SYNCING (see `node`) and resync replaces its copy, except
//! the LASTSRV target of a chain that lost every target, which serves at
//! once; it is the head then, and the head re-drives a leftover pending
//! version before it writes, reads or resyncs the chunk, so an acknowledged
//! version is never rolled back. Every hop checks the chain version against
//! its routing info and the CRC32C of the data. Truncates and zeroing never
//! make a chunk longer or create one: the head turns them into no-ops on a
//! chunk already short enough or missing.
//!
//! A pending version whose forward failed is never dropped (a successor may
//! have committed it); the next update of the chunk first re-drives it down
//! the current chain as the exact bytes of that version (`Replace`, which
//! also shrinks a successor's longer copy) or as a removal. The one exception
//! is a successor's `NoSpace` refusal of a version's first forward: it and
//! everything after it did not commit the version, so each member drops its
//! pending copy on the way back and the client gets `NoSpace` (ENOSPC), not
//! an in-doubt write. The head never drops a version it re-drives (targets
//! that left the chain may have committed it).
//!
//! Every member remembers the outcome of the client request
//! `(client, request, chunk index)` behind each version it applied, so a
//! retry — at the same head or at a member that became head — is answered
//! without being applied again, even after newer updates of the chunk.
//!
//! Reads go to any SERVING replica. A replica holding an uncommitted version
//! answers `NotCommitted` and the client reads elsewhere or retries: we follow
//! 3FS here rather than asking the tail (CRAQ's option), because the tail may
//! be the busiest node and a retry after a write's round trip is cheap.
//! Listings (`ListChunks`, `QueryLastChunk`) show committed versions only.
//!
//! # Repair
//! A replica whose blocks of a chunk fail their checksum answers the read
//! with `Checksum` (the client reads another replica) and mends its copy
//! behind it: it reads the same committed version from another SERVING
//! replica and replaces its blocks only with bytes matching the length and
//! CRC its intact record holds, only if nothing is pending there, and only
//! while the record is still the one it read (no chunk lock is held while
//! the peer answers). A chunk with a pending version, or that no peer holds
//! at the same version, stays damaged and is logged at error; where another
//! replica holds it intact, an operator who moves this target aside gets it
//! back through resync.
//!
//! # Resync
//! A SYNCING target follows every SERVING target in its chain, so its
//! predecessor is the last SERVING target. Updates reach it as whole chunk
//! versions or removals (it may lack the base a partial update builds on)
//! and it applies them committed at once, being the last target an update
//! reaches. The predecessor compares chunk summaries (metadata only) with
//! it, reads and sends every chunk that differs or is missing and removes
//! what it should not have, each under the same per-chunk lock that
//! forwarded updates take, so no update interleaves with the copy of its
//! chunk; then it declares the copy complete and the target reports up to
//! date, which makes mgmtd turn it SERVING. A chunk the predecessor cannot
//! read intact is repaired from another SERVING replica first (see
//! Repair); one it can neither read nor repair is never skipped: the rest
//! is sent, the copy is not declared complete, and the next resync tries
//! again.
//!
//! Must not decide chain states (mgmtd does) or touch the namespace.
//!
//! # Limits
//! Updates of one chunk are serialized by that chunk's own lock
//! ([`ChunkLocks`]: never shared with another chunk, so no two forwards can
//! wait for each other across nodes); each member remembers the outcome of the last
//! [`DEDUP_ENTRIES_MAX`] client requests per chunk so a retry is applied
//! once. A `RemoveChunks` call removes at most `REMOVE_CHUNKS_MAX` chunks and
//! a `ListChunks` answer holds at most `LIST_CHUNKS_MAX`; both answer with a
//! cursor to continue from.
//!
//! # Known gaps
//! A removed chunk leaves no tombstone, so its versions start again at 1. A
//! forwarded update that a successor receives only after its sender gave up
//! on it and the chunk was removed could stage a stale version 1 there; the
//! chunk's next write would then fail with `Forward` until resync. (The
//! same holds for `RemoveInode`.) For the same reason a SYNCING target
//! installs whole versions (forwarded or from resync) without comparing
//! versions: a late try of an older forward that reaches it after a newer
//! one would roll the chunk back until the next resync, and a version
//! compare would instead keep a removed and re-created chunk's old
//! incarnation, whose versions may be higher. Closing both needs chunk
//! incarnations (or tombstones) in the record and on the wire.
//!
//! Stored notices changed the wire: `UpdateRequest` carries a `pass` and
//! `Stored` is a new method, so a member and its successor from releases on
//! either side of the change refuse each other's updates (`BadRequest`) and
//! a chain that mixes them takes no writes. Every storage node of a cluster
//! is upgraded at once; there is no protocol version negotiation yet.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use r3fs_net::{CallOptions, RetryPolicy, Router, RpcClient};
use r3fs_wire::mgmt::{Chain, ChainId, ChainTarget, NodeId, PublicState, RoutingInfo, TargetId};
use r3fs_wire::storage::*;
use r3fs_wire::Method;
use tokio::sync::watch;

use crate::chunk::{ChunkEngine, ChunkError, ChunkId, ChunkMeta, ChunkUpdate};
use crate::chunk_locks::{ChunkGuard, ChunkLocks};

/// Client writes whose outcome the head remembers for retries.
pub const DEDUP_ENTRIES_MAX: usize = 65_536;
/// Deadline of one forwarded update or sync call.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one try to read a peer's copy of a damaged chunk.
const REPAIR_READ_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Stored notices go on connections of their own: on the updates'
    /// connection they could queue behind the very updates that wait for
    /// them (a server runs a bounded number of requests per connection).
    notice_rpc: RpcClient,
    locks: ChunkLocks,
    dedup: Mutex<Dedup>,
    /// The client request behind each pending version on this node (with
    /// that version), so the request is remembered as done when the
    /// version is re-driven.
    origins: Mutex<HashMap<ChunkAddr, (u64, Origin)>>,
    /// SYNCING targets whose copy a predecessor declared complete, with the
    /// chain version it was complete at.
    synced: Mutex<HashMap<TargetId, u64>>,
    /// Stored notices from predecessors, by the pass they name.
    notices: Mutex<Notices>,
    /// Chunks whose damaged copy here a repair is fetching from a peer.
    repairs: Mutex<std::collections::HashSet<ChunkAddr>>,
    /// Woken when a target fails, so the node reports it at once.
    failures: Arc<tokio::sync::Notify>,
}

/// Where an update of a chunk comes from, at the member applying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origination {
    /// A client's update, at the head.
    Head,
    /// The head re-driving a version left pending.
    Redrive,
    /// Forwarded by a predecessor, whose stored notice follows.
    Forwarded,
}

/// One forward of a version, at the target it went to, as the update and
/// its [`StoredNotice`] name it.
type NoticeKey = (TargetId, ChunkAddr, u64, u64);

/// The forward `req` came by.
fn forward_key(req: &UpdateRequest) -> NoticeKey {
    (req.target, req.addr, req.update_ver, req.pass)
}

/// A predecessor's [`StoredNotice`] on this node.
enum Notice {
    /// Arrived (kept for [`NOTICE_KEPT`], for every try of its forward).
    Arrived {
        stored: bool,
        at: tokio::time::Instant,
    },
    /// The update waiting for it.
    Waiting(tokio::sync::oneshot::Sender<bool>),
}

/// Deadline of one try to deliver a stored notice.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a stored notice answers its forward: every try of it (the
/// forward's attempts of [`FORWARD_TIMEOUT`] each, and their backoff).
const NOTICE_KEPT: Duration = Duration::from_secs(4 * FORWARD_TIMEOUT.as_secs());

/// The stored notices on this node.
#[derive(Default)]
struct Notices {
    by_pass: HashMap<NoticeKey, Notice>,
    /// Notices in arrival order: each is dropped once [`NOTICE_KEPT`] old.
    arrived: VecDeque<(tokio::time::Instant, NoticeKey)>,
}

/// The client request an update carries; `(0, 0)` when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Origin {
    client: u64,
    request: u64,
}

/// Answers to client requests by `(client, request, chunk index)`: one
/// request may touch many chunks of a chain (`RemoveChunks`).
#[derive(Default)]
struct Dedup {
    done: HashMap<(u64, u64, u64), ChunkVersion>,
    order: VecDeque<(u64, u64, u64)>,
}

/// What the head makes of a client request, given the chunk's committed state.
struct Planned {
    op: UpdateOp,
    chunk_size: u32,
    data: Bytes,
    /// CRC32C of `data` (as the client sent it).
    crc: u32,
}

/// What one resync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncStats {
    pub compared: usize,
    pub installed: usize,
    pub removed: usize,
    pub bytes: u64,
    /// Chunks whose copy here failed its checksum and was repaired from
    /// another replica before it was compared.
    pub repaired: usize,
}

impl StorageService {
    /// Serves `targets` (the chunk engines of this node) by the routing info
    /// `routing` publishes (from a `RoutingWatcher`, or a fixed one in tests).
    pub fn new(
        node: NodeId,
        targets: HashMap<TargetId, Arc<ChunkEngine>>,
        routing: watch::Receiver<Option<Arc<RoutingInfo>>>,
    ) -> StorageService {
        let failures = Arc::new(tokio::sync::Notify::new());
        for (target, engine) in &targets {
            let (failures, target) = (failures.clone(), *target);
            // However a target fails (a store after its forward, an
            // fdatasync), the heartbeat reports it at once.
            engine.on_failure(move |reason| {
                tracing::error!(
                    target,
                    reason,
                    "storage target failed: it is out of service until this node restarts; \
                     check its disk, then restart the node to resync it"
                );
                failures.notify_waiters();
            });
        }
        StorageService {
            inner: Arc::new(Inner {
                node,
                targets,
                routing,
                rpc: RpcClient::new(r3fs_net::ClientConfig::default()),
                notice_rpc: RpcClient::new(r3fs_net::ClientConfig::default()),
                locks: ChunkLocks::default(),
                dedup: Mutex::new(Dedup::default()),
                origins: Mutex::new(HashMap::new()),
                synced: Mutex::new(HashMap::new()),
                failures,
                notices: Mutex::new(Notices::default()),
                repairs: Mutex::new(std::collections::HashSet::new()),
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

    /// Takes `target` out of service until this process restarts: its disk
    /// failed a write after the target had passed a version on (see
    /// `stage_and_forward`), so its copy may lack a version its successors
    /// committed. It answers nothing from then on, and the node reports it
    /// OFFLINE, so mgmtd moves it out of its chain; after a restart it comes
    /// back through SYNCING and resync replaces its copy.
    /// (The chunk engine may have taken itself out already, see
    /// `ChunkEngine::apply_pending`; the first reason stays.) The node
    /// learns of it through the engine's failure hook (see `new`).
    pub fn fail_target(&self, target: TargetId, reason: String) {
        self.engine(target).fail(reason);
    }

    /// Why `target` failed, if it did (see [`StorageService::fail_target`]).
    pub fn failure(&self, target: TargetId) -> Option<String> {
        self.inner
            .targets
            .get(&target)
            .and_then(|engine| engine.failure().map(String::from))
    }

    /// Resolves when some target fails after this call (not after the
    /// first poll: the wait starts when it is created).
    pub fn target_failed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.failures.notified()
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
        router.register::<Modify, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.modify(req).await) }
        });
        let s = self.clone();
        router.register::<RemoveChunks, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.remove_chunks(req).await) }
        });
        let s = self.clone();
        router.register::<ListChunks, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.list_chunks(req).await) }
        });
        let s = self.clone();
        router.register::<SyncDone, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.sync_done(req)) }
        });
        let s = self.clone();
        router.register::<Stored, _, _>(move |req, _ctx| {
            let s = s.clone();
            async move { Ok(s.stored(req)) }
        });
    }

    /// A predecessor's notice that it, and every member before it, stored
    /// (or failed to store) a version it forwarded here: handed to the
    /// update waiting for it, and kept for [`NOTICE_KEPT`] (every try of the
    /// forward), or until the version is committed here.
    pub fn stored(&self, notice: StoredNotice) -> StorageResult<()> {
        if !self.inner.targets.contains_key(&notice.target) {
            return Err(StorageError::NotServing {
                chain: notice.addr.chain,
            });
        }
        let key = (notice.target, notice.addr, notice.update_ver, notice.pass);
        let mut notices = self.inner.notices.lock();
        let at = tokio::time::Instant::now();
        while let Some(&(old, old_key)) = notices.arrived.front() {
            if at.duration_since(old) < NOTICE_KEPT {
                break;
            }
            notices.arrived.pop_front();
            if let Some(Notice::Arrived { at, .. }) = notices.by_pass.get(&old_key) {
                if *at == old {
                    notices.by_pass.remove(&old_key);
                }
            }
        }
        let stored = notice.stored;
        // Kept for every try of the forward it answers, not only the one
        // waiting now (a retry of the same forward waits for it again).
        if let Some(Notice::Waiting(tx)) =
            notices.by_pass.insert(key, Notice::Arrived { stored, at })
        {
            // The update gave up only if its wait timed out.
            let _ = tx.send(stored);
        }
        notices.arrived.push_back((at, key));
        Ok(())
    }

    /// Waits for the predecessor's [`StoredNotice`] of `req`'s version: a
    /// forwarded version is committed (or passed on whole to a SYNCING
    /// target, which commits at once) only once every member before this
    /// one holds it durably.
    async fn await_stored(&self, chain: ChainId, req: &UpdateRequest) -> StorageResult<()> {
        let key = forward_key(req);
        let waiting = {
            let mut notices = self.inner.notices.lock();
            match notices.by_pass.get(&key) {
                Some(Notice::Arrived { stored, at }) if at.elapsed() < NOTICE_KEPT => Err(*stored),
                _ => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    notices.by_pass.insert(key, Notice::Waiting(tx));
                    Ok(rx)
                }
            }
        };
        let stored = match waiting {
            Err(stored) => Some(stored),
            Ok(rx) => match tokio::time::timeout(FORWARD_TIMEOUT, rx).await {
                Ok(Ok(stored)) => Some(stored),
                _ => {
                    let mut notices = self.inner.notices.lock();
                    if let Some(Notice::Waiting(_)) = notices.by_pass.get(&key) {
                        notices.by_pass.remove(&key);
                    }
                    None
                }
            },
        };
        let reason = match stored {
            Some(true) => return Ok(()),
            Some(false) => format!(
                "a member before this one failed to store {:?} version {}",
                req.addr, req.update_ver
            ),
            None => format!(
                "no word within {FORWARD_TIMEOUT:?} that the members before this one stored {:?} version {}",
                req.addr, req.update_ver
            ),
        };
        Err(StorageError::Forward { chain, reason })
    }

    /// Stored notices this node keeps (for tests and metrics): each until
    /// its version is committed here, or [`NOTICE_KEPT`] if it never is.
    pub fn stored_notices_kept(&self) -> usize {
        self.inner.notices.lock().by_pass.len()
    }

    /// Drops the notice of the forward `req` came by, once its version is
    /// committed here: later tries of it need none (see `needs_notice`).
    fn forget_notice(&self, req: &UpdateRequest) {
        let key = forward_key(req);
        let mut notices = self.inner.notices.lock();
        if let Some(Notice::Arrived { .. }) = notices.by_pass.get(&key) {
            notices.by_pass.remove(&key);
        }
    }

    /// Tells the successor `forwarded` went to whether this member and every
    /// one before it stored its version. Best effort: without it the successor
    /// gives up on the version after [`FORWARD_TIMEOUT`], committing nothing.
    async fn send_stored(
        &self,
        routing: &RoutingInfo,
        chain: ChainId,
        forwarded: &UpdateRequest,
        stored: bool,
    ) {
        let next = forwarded.target;
        let notice = StoredNotice {
            addr: forwarded.addr,
            target: next,
            update_ver: forwarded.update_ver,
            pass: forwarded.pass,
            stored,
        };
        // Short tries: a notice is tiny and its handler never waits, and
        // the forward it answers waits for it.
        let sent = self
            .call_with::<Stored, _>(routing, chain, next, &notice, Bytes::new(), NOTICE_TIMEOUT)
            .await;
        if let Err(e) = sent {
            tracing::debug!(addr = ?forwarded.addr, version = forwarded.update_ver, error = %e, "stored notice not delivered");
        }
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
        let target = chain.targets[pos].target;
        if let Some(reason) = self.failure(target) {
            return Err(StorageError::Io {
                target,
                reason: format!("target out of service until its node restarts: {reason}"),
            });
        }
        Ok((routing, chain, pos))
    }

    fn engine(&self, target: TargetId) -> &Arc<ChunkEngine> {
        &self.inner.targets[&target]
    }

    /// Waits for and takes `addr`'s chunk lock.
    async fn lock_chunk(&self, addr: ChunkAddr) -> ChunkGuard<'_> {
        self.inner.locks.lock(addr).await
    }

    /// A client write, at the head.
    /// The payload's CRC is checked by the chunk engine in the pass that
    /// checksums its blocks.
    pub async fn write(&self, req: WriteRequest, data: Bytes) -> StorageResult<ChunkVersion> {
        let origin = Origin {
            client: req.client,
            request: req.request,
        };
        let (offset, chunk_size, crc) = (req.offset, req.chunk_size, req.crc);
        let plan = move |_: Option<ChunkMeta>| {
            Some(Planned {
                op: UpdateOp::Write { offset },
                chunk_size,
                data,
                crc,
            })
        };
        self.at_head(req.addr, req.chain_ver, origin, plan).await
    }

    /// A client truncate or zeroing of one chunk, at the head. Neither makes
    /// a chunk longer or creates one: on a missing chunk, or one already
    /// short enough, it changes nothing (and a retry still changes nothing).
    pub async fn modify(&self, req: ModifyRequest) -> StorageResult<ChunkVersion> {
        let origin = Origin {
            client: req.client,
            request: req.request,
        };
        let op = req.op;
        let plan = move |meta: Option<ChunkMeta>| {
            let meta = meta?;
            let op = match op {
                ModifyOp::Truncate { length } => {
                    (meta.length > length).then_some(UpdateOp::Truncate { length })?
                }
                ModifyOp::Zero { offset, len } => {
                    let end = (u64::from(offset) + u64::from(len)).min(meta.length.into());
                    let len = end.checked_sub(offset.into()).filter(|&n| n > 0)? as u32;
                    UpdateOp::Zero { offset, len }
                }
            };
            Some(Planned {
                op,
                chunk_size: meta.length,
                data: Bytes::new(),
                crc: crc_fast::crc32_iscsi(&[]),
            })
        };
        self.at_head(req.addr, req.chain_ver, origin, plan).await
    }

    /// Removes the chunks of a file in an index range, at the head: each by a
    /// versioned removal down the chain under its chunk lock, so a removal
    /// never interleaves with a write of the same chunk. At most
    /// [`REMOVE_CHUNKS_MAX`] chunks per call.
    pub async fn remove_chunks(
        &self,
        req: RemoveChunksRequest,
    ) -> StorageResult<RemoveChunksResponse> {
        let (_routing, chain, pos) = self.locate(req.chain)?;
        let me = chain.targets[pos];
        if pos != 0 || me.state != PublicState::Serving {
            return Err(StorageError::NotHead {
                chain: chain.id,
                target: me.target,
            });
        }
        check_chain_version(&chain, req.chain_ver)?;
        let mut response = RemoveChunksResponse {
            removed: 0,
            next_index: None,
        };
        if req.from_index >= req.to_index {
            return Ok(response);
        }
        let engine = self.engine(me.target).clone();
        let (inode, from) = (req.inode, req.from_index);
        let (chunks, more) =
            blocking(move || engine.list_inode_from(inode, from, REMOVE_CHUNKS_MAX as usize))
                .await
                .map_err(|e| io_error(e, me.target))?;
        let origin = Origin {
            client: req.client,
            request: req.request,
        };
        for (id, _) in chunks.iter().filter(|(id, _)| id.index < req.to_index) {
            let addr = ChunkAddr {
                chain: chain.id,
                inode: id.inode,
                index: id.index,
            };
            let planned = AtomicBool::new(false);
            let plan = |meta: Option<ChunkMeta>| {
                meta?;
                planned.store(true, Ordering::Relaxed);
                Some(Planned {
                    op: UpdateOp::Remove,
                    chunk_size: 0,
                    data: Bytes::new(),
                    crc: crc_fast::crc32_iscsi(&[]),
                })
            };
            self.at_head(addr, req.chain_ver, origin, plan).await?;
            response.removed += u64::from(planned.load(Ordering::Relaxed));
        }
        let last = chunks.last().map(|(id, _)| id.index);
        response.next_index = last
            .filter(|_| more)
            .and_then(|i| i.checked_add(1))
            .filter(|&i| i < req.to_index);
        Ok(response)
    }

    /// The head's part of every client update of one chunk: checks it is the
    /// head at the request's chain version, locks the chunk, re-drives a
    /// pending version left by a failed forward, answers a retry from the
    /// dedup table, and otherwise applies what `plan` makes of the chunk's
    /// committed state (`None`: nothing to change) as version
    /// `commit_ver + 1` down the chain.
    async fn at_head(
        &self,
        addr: ChunkAddr,
        chain_ver: u64,
        origin: Origin,
        plan: impl FnOnce(Option<ChunkMeta>) -> Option<Planned>,
    ) -> StorageResult<ChunkVersion> {
        if let Some(done) = self.done(origin, addr) {
            return Ok(done);
        }
        let (routing, chain, pos) = self.locate(addr.chain)?;
        let me = chain.targets[pos];
        if pos != 0 || me.state != PublicState::Serving {
            return Err(StorageError::NotHead {
                chain: chain.id,
                target: me.target,
            });
        }
        check_chain_version(&chain, chain_ver)?;
        let _guard = self.lock_chunk(addr).await;
        // A pending version left by an update whose forward failed is never
        // dropped: a successor may have committed it and serve it. Drive it
        // down the current chain first, then check again whether this very
        // request was that update.
        let meta = match self.recover_pending(&routing, &chain, pos, addr).await {
            // The version stays pending and may still commit: a refusal
            // would tell its own client (retrying, or unknown) its write
            // failed.
            Err(StorageError::NoSpace { .. }) if self.may_be_pending_from(addr, origin) => {
                return Err(StorageError::Io {
                    target: me.target,
                    reason: format!(
                        "{addr:?} holds a pending version a successor has no space for; \
                         it stays pending and is re-driven by the next update"
                    ),
                });
            }
            other => other?,
        };
        if let Some(done) = self.done(origin, addr) {
            return Ok(done);
        }
        let Some(planned) = plan(meta) else {
            let version = chunk_version(meta.as_ref());
            self.remember(origin, addr, version);
            return Ok(version);
        };
        let update = UpdateRequest {
            addr,
            chain_ver: chain.version,
            target: me.target,
            update_ver: meta.map_or(0, |m| m.commit_ver) + 1,
            op: planned.op,
            chunk_size: planned.chunk_size,
            crc: planned.crc,
            client: origin.client,
            request: origin.request,
            // Chosen by each member as it forwards (`stage_and_forward`).
            pass: 0,
        };
        self.apply_and_forward(
            &routing,
            &chain,
            pos,
            update,
            planned.data,
            Origination::Head,
        )
        .await
    }

    /// If this target holds a pending version of `addr`, forwards it down the
    /// chain whole (a removal as a removal) and commits it. Returns the
    /// chunk's committed state afterwards, `None` when it does not exist.
    async fn recover_pending(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        pos: usize,
        addr: ChunkAddr,
    ) -> StorageResult<Option<ChunkMeta>> {
        let me = chain.targets[pos].target;
        let engine = self.engine(me).clone();
        let id = chunk_id(addr);
        let (meta, pending) = {
            let engine = engine.clone();
            blocking(move || {
                let meta = engine.meta(id)?;
                let pending = match meta {
                    Some(m) if m.is_dirty() && !m.pending_remove => {
                        engine.read_version(id, m.update_ver)?
                    }
                    _ => None,
                };
                Ok((meta, pending))
            })
            .await
            .map_err(|e| storage_error(e, addr, me))?
        };
        let Some(meta) = meta.filter(|m| m.is_dirty()) else {
            return Ok(meta);
        };
        let (op, data) = match pending {
            None if meta.pending_remove => (UpdateOp::Remove, Bytes::new()),
            Some(bytes) => (UpdateOp::Replace, bytes),
            None => {
                return Err(io_error(
                    ChunkError::NoPending {
                        id,
                        update_ver: meta.update_ver,
                        commit_ver: meta.commit_ver,
                        newest_ver: meta.update_ver,
                    },
                    me,
                ))
            }
        };
        let origin = match self.inner.origins.lock().get(&addr) {
            Some(&(version, origin)) if version == meta.update_ver => origin,
            _ => Origin::default(),
        };
        tracing::info!(
            ?addr,
            update_ver = meta.update_ver,
            ?op,
            "re-driving a pending version down the chain"
        );
        let redo = UpdateRequest {
            addr,
            chain_ver: chain.version,
            target: me,
            update_ver: meta.update_ver,
            op,
            chunk_size: engine.chunk_size_max(),
            crc: crc_fast::crc32_iscsi(&data),
            client: origin.client,
            request: origin.request,
            // Chosen by each member as it forwards (`stage_and_forward`).
            pass: 0,
        };
        self.apply_and_forward(routing, chain, pos, redo, data, Origination::Redrive)
            .await?;
        let meta = blocking(move || engine.meta(id))
            .await
            .map_err(|e| storage_error(e, addr, me))?;
        assert!(
            meta.is_none_or(|m| !m.is_dirty()),
            "a re-driven version is committed or removed"
        );
        Ok(meta)
    }

    /// If this target is the head and no other target of the chain serves,
    /// and nobody is updating `addr`, re-drives a pending version of it (a
    /// failed forward, or an unsynced commit a machine crash took back,
    /// which may have been acknowledged). Whether that left it settled.
    async fn settle_if_alone(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        pos: usize,
        addr: ChunkAddr,
    ) -> bool {
        if !head_alone(chain, pos) {
            return false;
        }
        let Some(_guard) = self.inner.locks.try_lock(addr) else {
            return false;
        };
        match self.recover_pending(routing, chain, pos, addr).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(?addr, error = %e, "cannot settle a leftover pending version");
                false
            }
        }
    }

    /// [`StorageService::settle_if_alone`] for every dirty chunk in `chunks`
    /// (listed on this target); whether any was settled.
    async fn settle_dirty_if_alone(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        pos: usize,
        chunks: &[(ChunkId, ChunkMeta)],
    ) -> bool {
        let mut settled = false;
        for (id, _) in chunks.iter().filter(|(_, m)| m.is_dirty()) {
            let addr = ChunkAddr {
                chain: chain.id,
                inode: id.inode,
                index: id.index,
            };
            settled |= self.settle_if_alone(routing, chain, pos, addr).await;
        }
        settled
    }

    /// The answer remembered for a client request on one chunk.
    fn done(&self, origin: Origin, addr: ChunkAddr) -> Option<ChunkVersion> {
        let key = (origin.client, origin.request, addr.index);
        self.inner.dedup.lock().done.get(&key).copied()
    }

    fn remember(&self, origin: Origin, addr: ChunkAddr, version: ChunkVersion) {
        if origin == Origin::default() {
            return;
        }
        let key = (origin.client, origin.request, addr.index);
        let mut dedup = self.inner.dedup.lock();
        if dedup.done.insert(key, version).is_none() {
            dedup.order.push_back(key);
        }
        while dedup.order.len() > DEDUP_ENTRIES_MAX {
            if let Some(old) = dedup.order.pop_front() {
                dedup.done.remove(&old);
            }
        }
    }

    /// A forwarded update, at a middle, tail or SYNCING target.
    /// A SERVING target's chunk engine checks the payload CRC of a write or
    /// replacement while checksumming its blocks; everything else is checked here.
    pub async fn update(&self, req: UpdateRequest, data: Bytes) -> StorageResult<ChunkVersion> {
        let (routing, chain, pos) = self.locate(req.addr.chain)?;
        check_chain_version(&chain, req.chain_ver)?;
        let me = chain.targets[pos];
        let engine_checks = me.state == PublicState::Serving
            && matches!(req.op, UpdateOp::Write { .. } | UpdateOp::Replace);
        if !engine_checks {
            check_payload(req.crc, &data)?;
        }
        if me.target != req.target {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        if req.update_ver == 0 {
            return Err(StorageError::Io {
                target: me.target,
                reason: format!("update of {:?} with version 0", req.addr),
            });
        }
        let _guard = self.lock_chunk(req.addr).await;
        match (me.state, req.op) {
            (PublicState::Serving, _) => {
                self.apply_and_forward(&routing, &chain, pos, req, data, Origination::Forwarded)
                    .await
            }
            (PublicState::Syncing, UpdateOp::Replace) => {
                self.install_full(me.target, req, data).await
            }
            (PublicState::Syncing, UpdateOp::Remove) => {
                self.remove_at_syncing(me.target, req).await
            }
            _ => Err(StorageError::NotServing { chain: chain.id }),
        }
    }

    /// A SYNCING target takes a whole chunk version and commits it at once:
    /// it is the last target an update reaches (what follows it in the chain
    /// is WAITING or OFFLINE and gets none).
    async fn install_full(
        &self,
        target: TargetId,
        req: UpdateRequest,
        data: Bytes,
    ) -> StorageResult<ChunkVersion> {
        let engine = self.engine(target).clone();
        let meta = installed_meta(req.update_ver, req.chain_ver, &data);
        let id = chunk_id(req.addr);
        let meta = blocking(move || engine.install(id, meta, &data))
            .await
            .map_err(|e| storage_error(e, req.addr, target))?;
        let version = chunk_version(Some(&meta));
        self.remember(origin_of(&req), req.addr, version);
        Ok(version)
    }

    /// A SYNCING target drops a removed chunk at once, like `install_full`.
    async fn remove_at_syncing(
        &self,
        target: TargetId,
        req: UpdateRequest,
    ) -> StorageResult<ChunkVersion> {
        let engine = self.engine(target).clone();
        let (id, chain_ver) = (chunk_id(req.addr), req.chain_ver);
        blocking(move || drop_chunk(&engine, id, chain_ver))
            .await
            .map_err(|e| storage_error(e, req.addr, target))?;
        let version = chunk_version(None);
        self.remember(origin_of(&req), req.addr, version);
        Ok(version)
    }

    /// Stores the pending version on this node's target, then forwards it
    /// down the chain, and commits it once the successor acknowledged (the
    /// successor has then committed). A successor that ran out of space has
    /// not committed a version's first forward (nor has anything after it),
    /// so the pending version is dropped again and the caller gets
    /// `NoSpace`. A re-driven version (`redrive`) stays pending even then:
    /// targets that have left the chain may have committed it, and it may
    /// have been acknowledged.
    async fn apply_and_forward(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        pos: usize,
        req: UpdateRequest,
        data: Bytes,
        from: Origination,
    ) -> StorageResult<ChunkVersion> {
        let me = chain.targets[pos].target;
        let (addr, update_ver) = (req.addr, req.update_ver);
        let upstream = from == Origination::Forwarded;
        assert!(update_ver > 0, "versions start at 1: {req:?}");
        let origin = origin_of(&req);
        let successor = chain.targets[pos + 1..]
            .iter()
            .find(|t| matches!(t.state, PublicState::Serving | PublicState::Syncing))
            .copied();
        let meta = match successor {
            // The last member of a forwarded version: it stores it, then
            // commits once every member before it has stored it too.
            None if upstream => {
                let held = self.stage_on_target(me, &req, data, stage_plain).await?;
                if needs_notice(held.as_ref(), update_ver) {
                    self.note_origin(addr, update_ver, origin);
                    self.await_stored(chain.id, &req).await?;
                }
                let meta = self
                    .commit_here(me, &req)
                    .await
                    .map_err(|e| commit_in_doubt(e, me, &req))?;
                self.forget_notice(&req);
                meta
            }
            // The head alone: staged and committed in one metadata commit.
            // A crash leaves the old committed version or this one, never a
            // pending copy.
            None => {
                self.stage_on_target(me, &req, data, stage_committed)
                    .await?
            }
            Some(next) => {
                let sent = self
                    .stage_and_forward(routing, chain.id, me, next, &req, data, upstream)
                    .await?;
                // A head's re-drive reaches the members after it as a whole
                // `Replace`, which no client update is: they keep it too.
                let redrive =
                    from == Origination::Redrive || (upstream && req.op == UpdateOp::Replace);
                self.after_forward(me, addr, sent, redrive).await?;
                let meta = self
                    .commit_here(me, &req)
                    .await
                    .map_err(|e| commit_in_doubt(e, me, &req))?;
                if upstream {
                    self.forget_notice(&req);
                }
                meta
            }
        };
        if let Some(meta) = &meta {
            assert!(
                meta.commit_ver >= update_ver,
                "a chunk just committed is at least at that version"
            );
            // Clean, unless a newer version became pending meanwhile (this
            // was a late try of a version committed before).
            assert!(
                !meta.is_dirty() || meta.update_ver > update_ver,
                "a chunk just committed is clean or holds a newer version: {meta:?} after {update_ver}"
            );
        }
        let version = chunk_version(meta.as_ref());
        self.forget_origin(addr, update_ver);
        self.remember(origin, addr, version);
        Ok(version)
    }

    /// Notes that `origin`'s request made version `update_ver` of `addr`,
    /// once this member holds that version from it (a try it refused must
    /// leave the note alone): unless a newer version is noted (a late try
    /// of an older one must not take the pending version's request from
    /// it), and never the unknown origin of a re-drive over a known one.
    fn note_origin(&self, addr: ChunkAddr, update_ver: u64, origin: Origin) {
        let mut origins = self.inner.origins.lock();
        match origins.get(&addr) {
            Some(&(noted, _)) if noted > update_ver => {}
            Some(&(noted, _)) if noted == update_ver && origin == Origin::default() => {}
            _ => {
                origins.insert(addr, (update_ver, origin));
            }
        }
    }

    /// Whether the pending version of `addr` may be `origin`'s write: its
    /// noted origin is that request, or unknown.
    fn may_be_pending_from(&self, addr: ChunkAddr, origin: Origin) -> bool {
        match self.inner.origins.lock().get(&addr) {
            Some(&(_, noted)) => noted == origin || noted == Origin::default(),
            None => true,
        }
    }

    /// Forgets the origin of version `update_ver` of `addr`, once it is
    /// committed here (not a newer version's).
    fn forget_origin(&self, addr: ChunkAddr, update_ver: u64) {
        let mut origins = self.inner.origins.lock();
        if origins
            .get(&addr)
            .is_some_and(|&(noted, _)| noted == update_ver)
        {
            origins.remove(&addr);
        }
    }

    /// Commits `req`'s version here, once the rest of the chain has. A
    /// member before the tail need not wait for its own fsync: its
    /// successor holds the version durably (see
    /// `ChunkEngine::commit_unsynced`); nor need the tail of a forwarded
    /// version: every member before it holds the version durably, pending,
    /// and a pending version is re-driven. A removal stays durable, as a
    /// removed chunk leaves no version to re-drive.
    async fn commit_here(
        &self,
        me: TargetId,
        req: &UpdateRequest,
    ) -> StorageResult<Option<ChunkMeta>> {
        let engine = self.engine(me).clone();
        let (addr, op, update_ver) = (req.addr, req.op, req.update_ver);
        let id = chunk_id(addr);
        let absent_is_done = move |committed| match committed {
            Err(ChunkError::NotFound { .. }) if removes_or_keeps_absent(op) => Ok(None),
            other => other,
        };
        // Most unsynced commits wait for nothing: run them here rather than
        // pay two thread handoffs on every member's acknowledgement path
        // (about 6% of chain write bandwidth on 2 vCPUs).
        let inline = match op {
            UpdateOp::Remove => None,
            _ => engine.try_commit_unsynced(id, update_ver),
        };
        let committed = match inline {
            Some(committed) => absent_is_done(committed),
            None => {
                blocking(move || {
                    absent_is_done(match op {
                        UpdateOp::Remove => engine.commit(id, update_ver),
                        _ => engine.commit_unsynced(id, update_ver),
                    })
                })
                .await
            }
        };
        committed.map_err(|e| storage_error(e, addr, me))
    }

    /// Stages `req` here and forwards it to the successor `next`, in the way
    /// its state and the update allow (see `apply_and_forward`); `upstream`:
    /// the version came from a predecessor, whose [`StoredNotice`] must come
    /// before this member tells `next` it is stored. The outer error is this
    /// target's own; the inner result is the forward's.
    #[allow(clippy::too_many_arguments)]
    async fn stage_and_forward(
        &self,
        routing: &RoutingInfo,
        chain_id: ChainId,
        me: TargetId,
        next: ChainTarget,
        req: &UpdateRequest,
        data: Bytes,
        upstream: bool,
    ) -> StorageResult<StorageResult<()>> {
        // A SYNCING successor gets the whole new version: it may lack the
        // base the update builds on, so it is read after staging.
        if next.state == PublicState::Syncing {
            return self
                .stage_then_forward_whole(routing, chain_id, me, next.target, req, data, upstream)
                .await;
        }
        // The version goes on as soon as it passed every check here and its
        // slots are taken, so this member's block writes, fsyncs and
        // metadata commit overlap its successors'; the successor commits
        // only after this member's stored notice (sent once it and every
        // member before it hold the version). What can still fail here then
        // is the disk, and the successors hold the version pending: this
        // target leaves service (`fail_target`) rather than take the
        // version's number for other bytes.
        let engine = self.engine(me).clone();
        let (addr, staged) = (req.addr, req.clone());
        let (prepared_tx, prepared_rx) = tokio::sync::oneshot::channel();
        let local_data = data.clone();
        let local = tokio::task::spawn_blocking(move || {
            let mut prepared_tx = Some(prepared_tx);
            let mut prepared = || {
                if let Some(tx) = prepared_tx.take() {
                    // The receiver is gone only if the update was dropped.
                    let _ = tx.send(());
                }
            };
            stage(
                &engine,
                chunk_id(addr),
                &staged,
                &local_data,
                Some(&mut prepared),
            )
        });
        if prepared_rx.await.is_err() {
            // Not prepared: refused (or failed), or committed here already.
            // Either way nothing went on.
            return match joined(local).await {
                Ok(held) => {
                    assert!(
                        committed_here(held.as_ref(), req.update_ver),
                        "a stage that succeeds is prepared first unless it is committed: {held:?}"
                    );
                    Ok(Ok(()))
                }
                Err(e) => Err(storage_error(e, addr, me)),
            };
        }
        // A pass of this member's own: its notice then vouches for this
        // forward only, never for a later one of the same version here
        // (say after a `NoSpace` refusal dropped this member's copy).
        let forwarded = UpdateRequest {
            target: next.target,
            pass: rand::random(),
            ..req.clone()
        };
        let forward = self.call::<Update, _>(routing, chain_id, next.target, &forwarded, data);
        let here = async {
            let stored = joined(local).await;
            if let Ok(Some(held)) = &stored {
                if held.is_dirty() && held.update_ver == req.update_ver {
                    // Held here from this request (see `note_origin`).
                    self.note_origin(addr, req.update_ver, origin_of(req));
                }
            }
            let upstream = match (&stored, upstream) {
                (Ok(held), true) if needs_notice(held.as_ref(), req.update_ver) => {
                    self.await_stored(chain_id, req).await
                }
                _ => Ok(()),
            };
            let ok = stored.is_ok() && upstream.is_ok();
            self.send_stored(routing, chain_id, &forwarded, ok).await;
            (stored, upstream)
        };
        let (sent, (stored, upstream)) = tokio::join!(forward, here);
        if let Err(StorageError::NoSpace { .. }) = &sent {
            // The successor refused; this member may now drop its copy
            // (`after_forward`), so a late try of this forward must not
            // find the notice that vouched for it.
            self.send_stored(routing, chain_id, &forwarded, false).await;
        }
        if let Err(e) = stored {
            // In doubt, never a refusal (not even `NoSpace`): the successors
            // hold the version pending.
            let reason = format!(
                "staging {addr:?} version {}: {}",
                req.update_ver,
                crate::describe(&e)
            );
            self.fail_target(me, reason.clone());
            return Err(StorageError::Io { target: me, reason });
        }
        upstream?;
        Ok(sent.map(drop))
    }

    /// Runs `stage_fn` (`stage` or `stage_committed`) for `req` on this
    /// node's target, on the blocking pool; what it holds of the chunk then.
    async fn stage_on_target(
        &self,
        me: TargetId,
        req: &UpdateRequest,
        data: Bytes,
        stage_fn: StageFn,
    ) -> StorageResult<Option<ChunkMeta>> {
        let engine = self.engine(me).clone();
        let addr = req.addr;
        let staged = req.clone();
        blocking(move || stage_fn(&engine, chunk_id(addr), &staged, &data))
            .await
            .map_err(|e| storage_error(e, addr, me))
    }

    /// Stages `req` here, then sends the SYNCING successor `next` the whole
    /// new version (or a removal when the chunk is gone). Errors as for
    /// `stage_and_forward`.
    #[allow(clippy::too_many_arguments)]
    async fn stage_then_forward_whole(
        &self,
        routing: &RoutingInfo,
        chain_id: ChainId,
        me: TargetId,
        next: TargetId,
        req: &UpdateRequest,
        data: Bytes,
        upstream: bool,
    ) -> StorageResult<StorageResult<()>> {
        let engine = self.engine(me).clone();
        let (addr, update_ver) = (req.addr, req.update_ver);
        let staged = req.clone();
        let (held, whole) = blocking(move || {
            let id = chunk_id(addr);
            let held = stage(&engine, id, &staged, &data, None)?;
            // Read apart: a failed read must not hide that it is held now.
            Ok((held, engine.read_version(id, update_ver)))
        })
        .await
        .map_err(|e| storage_error(e, addr, me))?;
        if committed_here(held.as_ref(), update_ver) {
            // A late try: the successor committed it before this member did
            // (a SYNCING one may hold a newer version by now).
            return Ok(Ok(()));
        }
        if held.is_some() {
            self.note_origin(addr, update_ver, origin_of(req));
        }
        let whole = whole.map_err(|e| storage_error(e, addr, me))?;
        // The SYNCING target commits it at once.
        if upstream && needs_notice(held.as_ref(), update_ver) {
            self.await_stored(chain_id, req).await?;
        }
        let (payload, op) = match whole {
            Some(whole) => (whole, UpdateOp::Replace),
            None => (Bytes::new(), UpdateOp::Remove),
        };
        // (Its `pass` names no forward: a SYNCING target waits for no notice.)
        let forwarded = UpdateRequest {
            target: next,
            op,
            crc: crc_fast::crc32_iscsi(&payload),
            ..req.clone()
        };
        let sent = self
            .call::<Update, _>(routing, chain_id, next, &forwarded, payload)
            .await;
        Ok(sent.map(drop))
    }

    /// Passes a forward's outcome on, first dropping the pending version
    /// here if the successor had no space for its first forward. Any other
    /// failure, and any failure of a re-drive, keeps it pending: a successor
    /// may already have committed it, and the next update re-drives it.
    async fn after_forward(
        &self,
        me: TargetId,
        addr: ChunkAddr,
        sent: StorageResult<()>,
        redrive: bool,
    ) -> StorageResult<()> {
        if let (Err(StorageError::NoSpace { .. }), false) = (&sent, redrive) {
            self.abort_after_no_space(me, addr).await;
        }
        sent
    }

    /// Drops this target's pending version of `addr` after the successor
    /// refused it for lack of space. Best effort: a version that stays
    /// pending is re-driven by the next update.
    async fn abort_after_no_space(&self, me: TargetId, addr: ChunkAddr) {
        let engine = self.engine(me).clone();
        let id = chunk_id(addr);
        match blocking(move || engine.abort_pending(id)).await {
            Ok(()) => {
                self.inner.origins.lock().remove(&addr);
            }
            Err(e) => {
                tracing::warn!(?addr, error = %e, "cannot drop a version the chain had no space for")
            }
        }
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
        self.call_with::<M, T>(routing, chain, target, req, payload, FORWARD_TIMEOUT)
            .await
    }

    /// [`StorageService::call`] with tries of at most `timeout` each.
    async fn call_with<M, T>(
        &self,
        routing: &RoutingInfo,
        chain: ChainId,
        target: TargetId,
        req: &M::Request,
        payload: Bytes,
        timeout: Duration,
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
            timeout,
            retry: RetryPolicy::default(),
            idempotent: true,
        };
        let rpc = match M::ID {
            Stored::ID => &self.inner.notice_rpc,
            _ => &self.inner.rpc,
        };
        match rpc.call_with_payload::<M>(addr, req, payload, opts).await {
            Ok((Ok(value), data)) => Ok((value, data)),
            // Passed up as is: the client must see ENOSPC, not a chain fault.
            Ok((Err(e @ StorageError::NoSpace { .. }), _)) => Err(e),
            Ok((Err(e), _)) => Err(fail(format!("target {target} refused: {e}"))),
            Err(e) => Err(fail(format!("target {target} at {addr}: {e}"))),
        }
    }

    /// Mends this target's damaged copy of `addr` in the background (see
    /// [`StorageService::repair`]); at most one repair per chunk at a
    /// time.
    fn spawn_repair(&self, routing: Arc<RoutingInfo>, chain: Chain, me: TargetId, addr: ChunkAddr) {
        if !self.inner.repairs.lock().insert(addr) {
            return;
        }
        /// Forgets the repair however its task ends (or if it never runs).
        struct Done(StorageService, ChunkAddr);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.inner.repairs.lock().remove(&self.1);
            }
        }
        let done = Done(self.clone(), addr);
        // Without the chunk's lock: a peer that is slow to answer must not
        // hold up the chunk's updates, and `repair_committed` installs only
        // over the very record this repair saw.
        tokio::spawn(async move {
            let s = &done.0;
            s.repair(&routing, &chain, me, addr).await;
        });
    }

    /// Replaces this target's copy of `addr`, whose blocks failed their
    /// checksum, with the same committed version read from another SERVING
    /// replica of `chain`. Only a chunk with nothing pending here, and only
    /// bytes matching the length and CRC its record holds (the record is
    /// intact; its blocks are not). Whether it was repaired; every outcome
    /// is logged. Safe with or without the chunk's lock held: the bytes
    /// replace the blocks only while the record is still the one this
    /// repair read (see `ChunkEngine::repair_committed`).
    async fn repair(
        &self,
        routing: &RoutingInfo,
        chain: &Chain,
        me: TargetId,
        addr: ChunkAddr,
    ) -> bool {
        let engine = self.engine(me).clone();
        let id = chunk_id(addr);
        let meta = {
            let engine = engine.clone();
            blocking(move || engine.meta(id)).await
        };
        let meta = match meta {
            Ok(Some(meta)) if !meta.is_dirty() && meta.commit_ver > 0 => meta,
            Ok(other) => {
                tracing::warn!(?addr, target = me, meta = ?other, "a damaged chunk with a pending version (or none) is not repaired from a peer; resync replaces it once this target is out of its chain");
                return false;
            }
            Err(e) => {
                tracing::warn!(?addr, target = me, error = %e, "cannot repair a damaged chunk");
                return false;
            }
        };
        let read = ReadRequest {
            addr,
            offset: 0,
            length: meta.length,
        };
        let peers = chain
            .targets
            .iter()
            .filter(|t| t.target != me && t.state == PublicState::Serving);
        for peer in peers {
            let (resp, data) = match self
                .call_with::<Read, _>(
                    routing,
                    chain.id,
                    peer.target,
                    &read,
                    Bytes::new(),
                    REPAIR_READ_TIMEOUT,
                )
                .await
            {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::debug!(?addr, peer = peer.target, error = %e, "peer cannot supply a damaged chunk");
                    continue;
                }
            };
            let same = resp.commit_ver == meta.commit_ver
                && data.len() == meta.length as usize
                && crc_fast::crc32_iscsi(&data) == meta.crc;
            if !same {
                tracing::debug!(
                    ?addr,
                    peer = peer.target,
                    peer_version = resp.commit_ver,
                    version = meta.commit_ver,
                    "peer holds another version of a damaged chunk"
                );
                continue;
            }
            let engine = engine.clone();
            match blocking(move || engine.repair_committed(id, &meta, &data)).await {
                Ok(true) => {
                    tracing::warn!(?addr, target = me, from = peer.target, version = meta.commit_ver, "repaired a chunk whose copy here failed its checksum; check this target's disk");
                    return true;
                }
                Ok(false) => {
                    tracing::info!(
                        ?addr,
                        target = me,
                        "a damaged chunk changed while it was repaired (a new version, or removed); not repaired now, a read that meets it again retries"
                    );
                    return false;
                }
                Err(e) => {
                    tracing::warn!(?addr, target = me, error = %e, "cannot store the repaired copy of a damaged chunk");
                    return false;
                }
            }
        }
        tracing::error!(
            ?addr,
            target = me,
            version = meta.commit_ver,
            "a chunk here fails its checksum and no other SERVING replica holds the same version"
        );
        false
    }

    /// A client read, at any SERVING replica.
    ///
    /// A head with no other SERVING target (the LASTSRV back after the whole
    /// chain went down) answers a read of a chunk with a leftover pending
    /// version by re-driving that version first: no other replica could
    /// answer, and the version may have been acknowledged. Elsewhere a
    /// pending version gets `NotCommitted` and the client reads elsewhere.
    pub async fn read(&self, req: ReadRequest) -> StorageResult<(ReadResponse, Bytes)> {
        let (routing, chain, pos) = self.locate(req.addr.chain)?;
        let me = chain.targets[pos];
        if me.state != PublicState::Serving {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        let engine = self.engine(me.target).clone();
        let id = chunk_id(req.addr);
        let (offset, length) = (req.offset, req.length);
        let read = || {
            let engine = engine.clone();
            blocking(move || engine.read_with_crc(id, offset, length))
        };
        let mut answer = read().await;
        if let Err(ChunkError::NotCommitted { .. }) = &answer {
            if self.settle_if_alone(&routing, &chain, pos, req.addr).await {
                answer = read().await;
            }
        }
        if let Err(ChunkError::Corrupt { .. }) = &answer {
            // The client reads another replica; this copy is mended behind.
            self.spawn_repair(routing.clone(), chain.clone(), me.target, req.addr);
        }
        let (data, meta, crc) = answer.map_err(|e| storage_error(e, req.addr, me.target))?;
        debug_assert!(crc == crc_fast::crc32_iscsi(&data));
        let resp = ReadResponse {
            commit_ver: meta.commit_ver,
            chunk_length: meta.length,
            crc,
        };
        Ok((resp, data))
    }

    /// The last committed chunk of a file on this node's SERVING target.
    /// A chunk whose newest version is still pending reports its committed
    /// length: the in-flight write settles later.
    pub async fn last_chunk(&self, req: LastChunkRequest) -> StorageResult<Option<LastChunk>> {
        let (routing, chain, pos) = self.locate(req.chain)?;
        let me = chain.targets[pos];
        if me.state != PublicState::Serving {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        let engine = self.engine(me.target).clone();
        let inode = req.inode;
        if head_alone(&chain, pos) {
            // A LASTSRV head may hold acknowledged versions only as pending
            // ones (see `settle_if_alone`): settle the highest chunk, the one
            // the answer is about, before answering (one seek, one re-drive).
            let engine = engine.clone();
            let highest = blocking(move || engine.last_chunk(inode))
                .await
                .map_err(|e| io_error(e, me.target))?;
            if let Some(highest) = highest {
                self.settle_dirty_if_alone(&routing, &chain, pos, &[highest])
                    .await;
            }
        }
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

    /// The committed chunks of a file on this node's SERVING target, from an
    /// index on, at most [`LIST_CHUNKS_MAX`]. A chunk whose first version is
    /// still in flight is left out; one with a newer version in flight shows
    /// its committed length.
    pub async fn list_chunks(&self, req: ListChunksRequest) -> StorageResult<ChunkList> {
        let (routing, chain, pos) = self.locate(req.chain)?;
        let me = chain.targets[pos];
        if me.state != PublicState::Serving {
            return Err(StorageError::NotServing { chain: chain.id });
        }
        let engine = self.engine(me.target).clone();
        let limit = req.limit.clamp(1, LIST_CHUNKS_MAX) as usize;
        let (inode, from) = (req.inode, req.from_index);
        let list = || {
            let engine = engine.clone();
            blocking(move || engine.list_inode_from(inode, from, limit))
        };
        let mut listed = list().await.map_err(|e| io_error(e, me.target))?;
        if self
            .settle_dirty_if_alone(&routing, &chain, pos, &listed.0)
            .await
        {
            listed = list().await.map_err(|e| io_error(e, me.target))?;
        }
        let (chunks, more) = listed;
        let next_index = chunks
            .last()
            .filter(|_| more)
            .and_then(|(id, _)| id.index.checked_add(1));
        let chunks = chunks
            .into_iter()
            .filter(|(_, m)| m.commit_ver > 0)
            .map(|(id, m)| ChunkEntry {
                index: id.index,
                length: m.length,
            })
            .collect();
        Ok(ChunkList { chunks, next_index })
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
        let _guard = self.lock_chunk(req.addr).await;
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
        let _guard = self.lock_chunk(req.addr).await;
        let id = chunk_id(req.addr);
        let chain_ver = req.chain_ver;
        blocking(move || drop_chunk(&engine, id, chain_ver))
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
        // Chunks whose copy here is damaged and could not be repaired.
        let mut damaged = Vec::new();
        for (id, _) in mine {
            seen.insert((id.inode, id.index));
            let addr = ChunkAddr {
                chain: chain_id,
                inode: id.inode,
                index: id.index,
            };
            let _guard = self.lock_chunk(addr).await;
            if pos == 0 {
                // The head's leftover pending version (a failed forward, or
                // an unsynced commit a crash took back — the LASTSRV case)
                // may have been acknowledged: drive it down first, so the
                // copy never rolls the SYNCING target back behind it.
                self.recover_pending(&routing, &chain, pos, addr).await?;
            }
            // Compared by metadata first: only a chunk that differs is read
            // (and so checked) and sent.
            let meta = {
                let engine = engine.clone();
                blocking(move || engine.meta(id))
                    .await
                    .map_err(|e| io_error(e, me.target))?
            };
            let Some(meta) = meta.filter(|m| m.commit_ver > 0) else {
                continue;
            };
            stats.compared += 1;
            if theirs.get(&(id.inode, id.index)) == Some(&summary(id, &meta)) {
                continue;
            }
            let read = || {
                let engine = engine.clone();
                blocking(move || committed(&engine, id))
            };
            let current = match read().await {
                Err(ChunkError::Corrupt { .. }) => {
                    // Never sent as it is, and never skipped: the SYNCING
                    // target would serve an older copy, or none.
                    if !self.repair(&routing, &chain, me.target, addr).await {
                        damaged.push(addr);
                        continue;
                    }
                    stats.repaired += 1;
                    read().await
                }
                other => other,
            };
            let Some((meta, bytes)) = current.map_err(|e| io_error(e, me.target))? else {
                continue;
            };
            let ours = summary(id, &meta);
            stats.installed += 1;
            stats.bytes += bytes.len() as u64;
            let install = SyncInstallRequest {
                target: next.target,
                chain_ver: chain.version,
                chunk: ours,
                addr,
            };
            self.call::<SyncInstall, _>(&routing, chain_id, next.target, &install, bytes)
                .await?;
        }
        for (inode, index) in theirs.keys().filter(|k| !seen.contains(k)) {
            let addr = ChunkAddr {
                chain: chain_id,
                inode: *inode,
                index: *index,
            };
            let _guard = self.lock_chunk(addr).await;
            stats.removed += 1;
            let remove = SyncRemoveRequest {
                target: next.target,
                chain_ver: chain.version,
                addr,
            };
            self.call::<SyncRemove, _>(&routing, chain_id, next.target, &remove, Bytes::new())
                .await?;
        }
        if let Some(&first) = damaged.first() {
            // Everything else was sent; the SYNCING target stays SYNCING
            // until these are mended (a later resync tries again).
            tracing::error!(
                chain = chain_id,
                to = next.target,
                ?damaged,
                "resync cannot finish: this target's copies of these chunks fail their \
                 checksum and no other SERVING replica holds the same version"
            );
            return Err(StorageError::Checksum {
                addr: first,
                target: me.target,
            });
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

/// Whether the target at `pos` is the chain's head and no other target of
/// it serves (the LASTSRV case, or a chain shrunk to one).
fn head_alone(chain: &Chain, pos: usize) -> bool {
    pos == 0
        && chain.targets[1..]
            .iter()
            .all(|t| t.state != PublicState::Serving)
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
    let crc = crc_fast::crc32_iscsi(data);
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
fn committed(engine: &ChunkEngine, id: ChunkId) -> Result<Option<(ChunkMeta, Bytes)>, ChunkError> {
    match engine.read_committed_even_if_dirty(id, 0, engine.chunk_size_max()) {
        Ok((bytes, meta)) => Ok(Some((meta, bytes))),
        Err(ChunkError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A way to stage an update on a target's engine, for
/// `StorageService::stage_on_target`.
type StageFn =
    fn(&ChunkEngine, ChunkId, &UpdateRequest, &[u8]) -> Result<Option<ChunkMeta>, ChunkError>;

/// [`stage`] with no `prepared` callback.
fn stage_plain(
    engine: &ChunkEngine,
    id: ChunkId,
    req: &UpdateRequest,
    data: &[u8],
) -> Result<Option<ChunkMeta>, ChunkError> {
    stage(engine, id, req, data, None)
}

/// Stages `req` as the pending version on `engine`, calling `prepared` as
/// [`ChunkEngine::apply_pending`] does.
fn stage(
    engine: &ChunkEngine,
    id: ChunkId,
    req: &UpdateRequest,
    data: &[u8],
    prepared: Option<&mut dyn FnMut()>,
) -> Result<Option<ChunkMeta>, ChunkError> {
    let update = chunk_update(req, data);
    engine.apply_pending(id, req.update_ver, req.chain_ver, update, prepared)
}

/// Whether a stage that left `held` needs the predecessor's stored notice
/// before the version goes further: not when it found the version already
/// committed here (a retry: every member stored it then) or the chunk absent
/// with nothing to commit.
fn needs_notice(held: Option<&ChunkMeta>, update_ver: u64) -> bool {
    held.is_some_and(|m| m.commit_ver < update_ver)
}

/// A commit that failed after the version went on (every successor
/// committed it; at the tail, every member stored it) is in doubt, never a
/// refusal: a `NoSpace` answer would make the predecessors drop a version
/// their successors hold.
fn commit_in_doubt(e: StorageError, me: TargetId, req: &UpdateRequest) -> StorageError {
    match e {
        StorageError::NoSpace { .. } => StorageError::Io {
            target: me,
            reason: format!(
                "no space to commit {:?} version {} after the chain took it",
                req.addr, req.update_ver
            ),
        },
        other => other,
    }
}

/// Whether a member holding `held` after staging `update_ver` has that
/// version committed already (a late try of it): every member after it
/// committed it before, so it goes no further.
fn committed_here(held: Option<&ChunkMeta>, update_ver: u64) -> bool {
    held.is_some_and(|m| m.commit_ver >= update_ver)
}

/// Stages and commits `req` on `engine` in one metadata commit; `None` when
/// the chunk is absent afterwards.
fn stage_committed(
    engine: &ChunkEngine,
    id: ChunkId,
    req: &UpdateRequest,
    data: &[u8],
) -> Result<Option<ChunkMeta>, ChunkError> {
    let update = chunk_update(req, data);
    engine.apply_committed(id, req.update_ver, req.chain_ver, update)
}

/// The chunk engine's form of `req`, whose payload is `data`.
fn chunk_update<'a>(req: &UpdateRequest, data: &'a [u8]) -> ChunkUpdate<'a> {
    match req.op {
        UpdateOp::Write { offset } => ChunkUpdate::Write {
            offset,
            data,
            chunk_size: req.chunk_size,
            crc: req.crc,
        },
        UpdateOp::Truncate { length } => ChunkUpdate::Truncate { length },
        UpdateOp::Zero { offset, len } => ChunkUpdate::Zero { offset, len },
        UpdateOp::Replace => ChunkUpdate::Replace { data, crc: req.crc },
        UpdateOp::Remove => ChunkUpdate::Remove,
    }
}

/// Ops after which a missing chunk is a valid outcome (nothing to commit).
fn removes_or_keeps_absent(op: UpdateOp) -> bool {
    matches!(op, UpdateOp::Remove | UpdateOp::Zero { .. })
}

/// Drops whatever a SYNCING target holds of `id`, pending or committed.
fn drop_chunk(engine: &ChunkEngine, id: ChunkId, chain_ver: u64) -> Result<(), ChunkError> {
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
}

fn origin_of(req: &UpdateRequest) -> Origin {
    Origin {
        client: req.client,
        request: req.request,
    }
}

/// What a client learns of a chunk's committed state; version 0 when absent.
fn chunk_version(meta: Option<&ChunkMeta>) -> ChunkVersion {
    match meta {
        Some(m) => ChunkVersion {
            commit_ver: m.commit_ver,
            length: m.length,
        },
        None => ChunkVersion {
            commit_ver: 0,
            length: 0,
        },
    }
}

fn check_payload(sent: u32, data: &[u8]) -> StorageResult<()> {
    let computed = crc_fast::crc32_iscsi(data);
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
        reason: crate::describe(&e),
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
        ChunkError::PayloadChecksum { sent, computed, .. } => {
            StorageError::PayloadChecksum { sent, computed }
        }
        ChunkError::NotFound { .. } => StorageError::NotFound { addr },
        ChunkError::OutOfRange { end, limit, .. } => StorageError::OutOfRange { end, limit },
        ChunkError::NoSpace { .. } => StorageError::NoSpace { target },
        other => io_error(other, target),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ChunkError> + Send + 'static,
) -> Result<T, ChunkError> {
    joined(tokio::task::spawn_blocking(f)).await
}

/// The result of a chunk task already running on the blocking pool.
async fn joined<T>(task: tokio::task::JoinHandle<Result<T, ChunkError>>) -> Result<T, ChunkError> {
    match task.await {
        Ok(r) => r,
        Err(e) => Err(ChunkError::Io {
            id: None,
            path: std::path::PathBuf::new(),
            source: std::io::Error::other(format!("chunk task failed: {e}")),
        }),
    }
}
