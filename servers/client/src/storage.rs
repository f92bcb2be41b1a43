//! [`StorageClient`]: file bytes over CRAQ chains. It splits a byte range into
//! chunk pieces, sends each written piece to its chain's head, spreads reads
//! over SERVING replicas, and retries across routing changes.
//!
//! Besides reads and writes it shrinks files (`truncate`: cut the chunk
//! holding the new end, remove every later chunk), punches holes
//! (`punch_hole`: zero the partial chunks at the ends, remove the whole
//! chunks between), lists a file's chunks with their committed lengths
//! (`list_chunks`, for SEEK_DATA/SEEK_HOLE), settles a file's length
//! (`query_length`) and removes a deleted file's chunks (`remove_inode`).
//! Truncates and holes never make a chunk longer; each chunk's change is a
//! versioned CRAQ update applied once despite retries.
//!
//! Makes no chain decisions (mgmtd does) and never writes to a target other
//! than the head its routing info names; it only reads routing info. It does
//! not know file lengths: a read returns exactly the bytes asked for, with
//! holes and bytes past a chunk's end as zeros, and the caller clips to the
//! file length.
//!
//! # Placement
//! Chunk `i` of an inode holds bytes `[i * chunk_size, (i + 1) * chunk_size)`
//! and lives on chain `layout.chains[i % layout.stripe]`; chains past the
//! first `stripe` entries of `layout.chains` are unused.
//!
//! # Retries
//! Every piece is tried up to `attempts_max` times. Between attempts the
//! client waits, up to `routing_wait`, for newer routing info after errors
//! that routing will fix (stale chain version, not head, not serving, failed
//! forwarding, unreachable node, no routing info), and backs off
//! exponentially with jitter after the others (uncommitted or corrupt
//! replicas, server-side failures). Refusals that cannot succeed later
//! (`StorageError::is_retryable` false) fail at once. A piece keeps its
//! request id across retries, so the head applies a retried write once; after
//! a head change the new head does not know the id, and the piece is written
//! again (same bytes at the same offset, so the result is the same). Every
//! chain member remembers the request ids of the versions it applied, so a
//! new head that was a member also answers a retry without applying it
//! again; a truncate's or hole's chunk removals on one chain share one
//! request id across retries and pages, so a chunk written after its removal
//! is not removed again. A read or listing moves to the next SERVING replica
//! before counting an attempt.
//!
//! # Limits
//! - [`IO_BYTES_MAX`] bytes per call; layouts with chunks over
//!   [`CHUNK_SIZE_MAX`] are refused.
//! - `pieces_in_flight_max` ([`PIECES_IN_FLIGHT_MAX`]) concurrent pieces per call.
//! - `attempts_max` ([`ATTEMPTS_MAX`]) attempts per piece, each RPC bounded by
//!   `call_timeout` ([`CALL_TIMEOUT`]).
//! - `list_chunks` returns at most [`LIST_CHUNKS_TOTAL_MAX`] chunks (more is
//!   `TooManyChunks`, EFBIG; `list_chunks_from` lists piecewise); a truncate
//!   or hole makes at most [`REMOVE_PAGES_MAX`] removal calls per chain.
//! - A full disk on any chain member is `ENOSPC`; the refused write is not
//!   left pending anywhere.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use r3fs_net::{CallOptions, ClientConfig, RetryPolicy, RpcClient, RpcError};
use r3fs_wire::meta::Layout;
use r3fs_wire::mgmt::{Chain, ChainId, PublicState, RoutingInfo, TargetId};
use r3fs_wire::storage::{
    ChunkAddr, ChunkList, ChunkVersion, LastChunk, LastChunkRequest, ListChunks, ListChunksRequest,
    Modify, ModifyOp, ModifyRequest, QueryLastChunk, Read, ReadRequest, RemoveChunks,
    RemoveChunksRequest, RemoveChunksResponse, RemoveInode, RemoveInodeRequest, StorageError,
    Write, WriteRequest, LIST_CHUNKS_MAX,
};
use tokio::sync::watch;

/// Pieces of one call in flight at once.
pub const PIECES_IN_FLIGHT_MAX: usize = 16;
/// Attempts per piece, the first included.
pub const ATTEMPTS_MAX: u32 = 8;
/// How long a retry waits for newer routing info.
pub const ROUTING_WAIT: Duration = Duration::from_secs(2);
/// Deadline of one RPC.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(10);
pub const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Bytes of one read or write call.
pub const IO_BYTES_MAX: u64 = 1 << 30;
/// Largest chunk a layout may ask for: one chunk travels in one frame payload.
pub const CHUNK_SIZE_MAX: u32 = r3fs_wire::frame::FRAME_PAYLOAD_BYTES_MAX;
/// Connections kept to each storage node.
pub const CONNECTIONS_PER_NODE: usize = 2;
/// Chunks [`StorageClient::list_chunks`] returns at most; a file with more
/// is `TooManyChunks` (list it piecewise with `list_chunks_from`).
pub const LIST_CHUNKS_TOTAL_MAX: usize = 1 << 20;
/// `RemoveChunks` calls (each removing up to `REMOVE_CHUNKS_MAX` chunks) per
/// chain in one truncate or hole punch.
pub const REMOVE_PAGES_MAX: u32 = 1 << 20;

#[derive(Debug, Clone)]
pub struct StorageClientConfig {
    pub pieces_in_flight_max: usize,
    pub attempts_max: u32,
    pub routing_wait: Duration,
    pub call_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub connections_per_node: usize,
}

impl Default for StorageClientConfig {
    fn default() -> Self {
        StorageClientConfig {
            pieces_in_flight_max: PIECES_IN_FLIGHT_MAX,
            attempts_max: ATTEMPTS_MAX,
            routing_wait: ROUTING_WAIT,
            call_timeout: CALL_TIMEOUT,
            backoff_initial: BACKOFF_INITIAL,
            backoff_max: BACKOFF_MAX,
            connections_per_node: CONNECTIONS_PER_NODE,
        }
    }
}

/// Why one attempt at one piece failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The bytes of a read did not match the CRC32C sent with them.
    #[error("read from target {target}: payload crc {computed:08x}, answer says {sent:08x}")]
    ReadChecksum {
        target: TargetId,
        sent: u32,
        computed: u32,
    },
    /// Routing info cannot route the piece (yet).
    #[error("routing: {0}")]
    Routing(String),
}

/// Why a read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageClientError {
    #[error("invalid layout: {reason}")]
    BadLayout { reason: String },
    #[error("invalid range at offset {offset}, length {len}: {reason}")]
    BadRange {
        offset: u64,
        len: u64,
        reason: &'static str,
    },
    /// Refused in a way no retry can fix.
    #[error("chunk {addr:?}: {error}")]
    Refused {
        addr: ChunkAddr,
        error: AttemptError,
    },
    #[error("chunk {addr:?}: gave up after {attempts} attempts; last error: {last}")]
    Exhausted {
        addr: ChunkAddr,
        attempts: u32,
        last: AttemptError,
    },
    /// The file has more chunks than one call handles.
    #[error("inode {inode} has more than {limit} chunks to {what}")]
    TooManyChunks {
        inode: u64,
        limit: u64,
        what: &'static str,
    },
}

impl StorageClientError {
    /// The errno to hand a POSIX caller.
    pub fn errno(&self) -> i32 {
        match self {
            StorageClientError::BadLayout { .. } | StorageClientError::BadRange { .. } => {
                libc::EINVAL
            }
            StorageClientError::Refused { error, .. } => match error {
                AttemptError::Storage(StorageError::NoSpace { .. }) => libc::ENOSPC,
                AttemptError::Storage(StorageError::OutOfRange { .. }) => libc::EINVAL,
                _ => libc::EIO,
            },
            StorageClientError::Exhausted { last, .. } => match last {
                AttemptError::Rpc(RpcError::Timeout { .. }) => libc::ETIMEDOUT,
                _ => libc::EIO,
            },
            StorageClientError::TooManyChunks { .. } => libc::EFBIG,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Fail,
    AwaitRouting,
    Backoff,
}

fn next_step(e: &AttemptError) -> Next {
    match e {
        AttemptError::Storage(s) if !s.is_retryable() => Next::Fail,
        AttemptError::Storage(StorageError::ChainVersion { request, node, .. }) => {
            // Our routing is older than the node's: wait for ours to catch up.
            // Newer: the node's will catch up soon.
            if request < node {
                Next::AwaitRouting
            } else {
                Next::Backoff
            }
        }
        AttemptError::Storage(
            StorageError::NotHead { .. }
            | StorageError::NotServing { .. }
            | StorageError::Forward { .. },
        ) => Next::AwaitRouting,
        AttemptError::Storage(_) | AttemptError::ReadChecksum { .. } => Next::Backoff,
        AttemptError::Rpc(
            RpcError::Connect { .. } | RpcError::Timeout { .. } | RpcError::ConnectionLost { .. },
        ) => Next::AwaitRouting,
        AttemptError::Rpc(RpcError::Remote { code, .. }) if code.is_retryable() => Next::Backoff,
        AttemptError::Rpc(_) => Next::Fail,
        AttemptError::Routing(_) => Next::AwaitRouting,
    }
}

/// One chunk's share of a call: `len` bytes at `chunk_offset` of chunk
/// `index`, at `buf_offset` of the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    index: u64,
    chunk_offset: u32,
    len: u32,
    buf_offset: usize,
}

/// The pieces of `[offset, offset + len)` in file order.
fn pieces(chunk_size: u32, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    assert!(chunk_size > 0, "layouts are checked before splitting");
    let chunk = u64::from(chunk_size);
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let index = pos / chunk;
        let chunk_offset = pos % chunk;
        let piece_len = (chunk - chunk_offset).min(end - pos);
        let piece = Piece {
            index,
            chunk_offset: chunk_offset as u32,
            len: piece_len as u32,
            buf_offset: (pos - offset) as usize,
        };
        pos += piece_len;
        Some(piece)
    })
}

/// The chain that holds chunk `index` (see the module docs).
fn chain_of(layout: &Layout, index: u64) -> ChainId {
    layout.chains[(index % u64::from(layout.stripe)) as usize]
}

fn check_layout(layout: &Layout) -> Result<(), StorageClientError> {
    let bad = |reason: String| Err(StorageClientError::BadLayout { reason });
    if layout.chunk_size == 0 {
        return bad("chunk size is 0".into());
    }
    if layout.chunk_size > CHUNK_SIZE_MAX {
        return bad(format!(
            "chunk size {} exceeds {CHUNK_SIZE_MAX}",
            layout.chunk_size
        ));
    }
    if layout.stripe == 0 {
        return bad("stripe is 0".into());
    }
    if layout.chains.len() < layout.stripe as usize {
        return bad(format!(
            "stripe {} over only {} chains",
            layout.stripe,
            layout.chains.len()
        ));
    }
    Ok(())
}

fn check_range(offset: u64, len: u64) -> Result<(), StorageClientError> {
    let bad = |reason| {
        Err(StorageClientError::BadRange {
            offset,
            len,
            reason,
        })
    };
    if len > IO_BYTES_MAX {
        return bad("longer than IO_BYTES_MAX");
    }
    if offset.checked_add(len).is_none() {
        return bad("ends past u64::MAX");
    }
    Ok(())
}

/// The address of chunk `index` of `inode`.
fn chunk_addr(layout: &Layout, inode: u64, index: u64) -> ChunkAddr {
    ChunkAddr {
        chain: chain_of(layout, index),
        inode,
        index,
    }
}

/// The parts of a hole `[offset, offset + len)`: the pieces of at most two
/// chunks it covers only partly, and the range of chunk indices it covers
/// whole.
fn hole_parts(chunk_size: u32, offset: u64, len: u64) -> ([Option<Piece>; 2], Option<(u64, u64)>) {
    assert!(chunk_size > 0, "layouts are checked before splitting");
    let chunk = u64::from(chunk_size);
    let end = offset + len;
    let partial = |start: u64, stop: u64| {
        (start < stop).then(|| Piece {
            index: start / chunk,
            chunk_offset: (start % chunk) as u32,
            len: (stop - start) as u32,
            buf_offset: 0,
        })
    };
    let whole_from = offset.div_ceil(chunk);
    let whole_to = end / chunk;
    if whole_from > whole_to {
        // Inside one chunk, touching neither of its ends.
        return ([partial(offset, end), None], None);
    }
    let head = partial(offset, whole_from * chunk);
    let tail = partial(whole_to * chunk, end);
    let whole = (whole_from < whole_to).then_some((whole_from, whole_to));
    ([head, tail], whole)
}

/// Whether a refusal means "this chunk does not exist here" (a hole).
fn is_missing_chunk(e: &StorageError) -> bool {
    matches!(e, StorageError::NotFound { .. })
}

fn find_chain(info: &RoutingInfo, id: ChainId) -> Result<&Chain, AttemptError> {
    info.chain(id).ok_or_else(|| {
        AttemptError::Routing(format!(
            "chain {id} is not in routing info version {}",
            info.version
        ))
    })
}

/// The address of `chain`'s head, if it is SERVING.
fn head_address(info: &RoutingInfo, chain: &Chain) -> Result<SocketAddr, AttemptError> {
    let head = chain
        .targets
        .first()
        .filter(|t| t.state == PublicState::Serving)
        .ok_or_else(|| AttemptError::Routing(format!("chain {} has no SERVING head", chain.id)))?;
    target_address(info, head.target)
}

fn target_address(info: &RoutingInfo, target: TargetId) -> Result<SocketAddr, AttemptError> {
    let t = info
        .target(target)
        .ok_or_else(|| AttemptError::Routing(format!("target {target} not in routing info")))?;
    let node = info.node(t.node).ok_or_else(|| {
        AttemptError::Routing(format!(
            "node {} of target {target} not in routing info",
            t.node
        ))
    })?;
    node.address.parse().map_err(|e| {
        AttemptError::Routing(format!("node {} address {:?}: {e}", node.id, node.address))
    })
}

/// Reads and writes file bytes on storage chains. Cheap to clone; clones
/// share connections and the client id.
#[derive(Clone)]
pub struct StorageClient {
    inner: Arc<Inner>,
}

struct Inner {
    routing: watch::Receiver<Option<Arc<RoutingInfo>>>,
    config: StorageClientConfig,
    rpc: RpcClient,
    /// Identifies this client's writes to heads (with `request_next`).
    client_id: u64,
    request_next: AtomicU64,
}

impl StorageClient {
    /// Routes by the routing info `routing` publishes (from
    /// `RoutingWatcher::subscribe`, or a fixed channel in tests).
    pub fn new(
        routing: watch::Receiver<Option<Arc<RoutingInfo>>>,
        config: StorageClientConfig,
    ) -> StorageClient {
        let rpc = RpcClient::new(ClientConfig {
            connections_per_addr: config.connections_per_node.max(1),
            ..ClientConfig::default()
        });
        StorageClient {
            inner: Arc::new(Inner {
                routing,
                config,
                rpc,
                client_id: rand::random(),
                request_next: AtomicU64::new(1),
            }),
        }
    }

    pub fn client_id(&self) -> u64 {
        self.inner.client_id
    }

    /// Writes `data` at byte `offset` of `inode`; returns the bytes written
    /// (all of them: a failed piece fails the call, and pieces already
    /// written stay written).
    pub async fn write(
        &self,
        layout: &Layout,
        inode: u64,
        offset: u64,
        data: Bytes,
    ) -> Result<u64, StorageClientError> {
        check_layout(layout)?;
        let len = data.len() as u64;
        check_range(offset, len)?;
        let writes = pieces(layout.chunk_size, offset, len).map(|p| {
            let addr = ChunkAddr {
                chain: chain_of(layout, p.index),
                inode,
                index: p.index,
            };
            let bytes = data.slice(p.buf_offset..p.buf_offset + p.len as usize);
            self.write_piece(addr, p, layout.chunk_size, bytes)
        });
        futures::stream::iter(writes)
            .buffer_unordered(self.inner.config.pieces_in_flight_max.max(1))
            .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
            .await
    }

    /// Reads `len` bytes at `offset` of `inode`. Holes and bytes past a
    /// chunk's committed length read as zeros.
    pub async fn read(
        &self,
        layout: &Layout,
        inode: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StorageClientError> {
        check_layout(layout)?;
        check_range(offset, len)?;
        let mut only = pieces(layout.chunk_size, offset, len);
        if let (Some(p), None) = (only.next(), only.next()) {
            // Within one chunk: a full answer goes back as received (its
            // buffer came from the network layer), without a copy.
            let addr = ChunkAddr {
                chain: chain_of(layout, p.index),
                inode,
                index: p.index,
            };
            let data = self.read_piece(addr, p).await?;
            assert!(
                data.len() <= p.len as usize,
                "read_piece clips to the piece"
            );
            if data.len() == len as usize {
                return Ok(data);
            }
            let mut out = BytesMut::zeroed(len as usize);
            out[..data.len()].copy_from_slice(&data);
            return Ok(out.freeze());
        }
        let reads = pieces(layout.chunk_size, offset, len).map(|p| {
            let addr = ChunkAddr {
                chain: chain_of(layout, p.index),
                inode,
                index: p.index,
            };
            async move { self.read_piece(addr, p).await.map(|data| (p, data)) }
        });
        let mut results = futures::stream::iter(reads)
            .buffer_unordered(self.inner.config.pieces_in_flight_max.max(1));
        let mut out = BytesMut::zeroed(len as usize);
        while let Some((p, data)) = results.try_next().await? {
            assert!(
                data.len() <= p.len as usize,
                "read_piece clips to the piece"
            );
            out[p.buf_offset..p.buf_offset + data.len()].copy_from_slice(&data);
        }
        Ok(out.freeze())
    }

    async fn write_piece(
        &self,
        addr: ChunkAddr,
        piece: Piece,
        chunk_size: u32,
        data: Bytes,
    ) -> Result<u64, StorageClientError> {
        let base = WriteRequest {
            addr,
            chain_ver: 0,
            offset: piece.chunk_offset,
            chunk_size,
            crc: crc_fast::crc32_iscsi(&data),
            client: self.inner.client_id,
            request: self.next_request(),
        };
        self.with_retries(addr, |info| self.write_attempt(info, &base, data.clone()))
            .await?;
        Ok(u64::from(piece.len))
    }

    /// Cuts `inode` to `length` bytes in storage: the chunk holding byte
    /// `length` keeps only the bytes before it, and every chunk after it is
    /// removed, on every chain of the stripe. Never makes a chunk longer:
    /// bytes past `length` are gone, and re-grown bytes read as zeros.
    /// Idempotent, and each chunk's change is applied once despite retries.
    pub async fn truncate(
        &self,
        layout: &Layout,
        inode: u64,
        length: u64,
    ) -> Result<(), StorageClientError> {
        check_layout(layout)?;
        let chunk = u64::from(layout.chunk_size);
        let within = (length % chunk) as u32;
        if within != 0 {
            let index = length / chunk;
            let op = ModifyOp::Truncate { length: within };
            self.modify(chunk_addr(layout, inode, index), op).await?;
        }
        self.remove_chunks(layout, inode, length.div_ceil(chunk), u64::MAX)
            .await
            .map(drop)
    }

    /// Makes `[offset, offset + len)` of `inode` read as zeros without
    /// making any chunk longer: whole chunks in the range are removed, and
    /// the partial chunks at its ends get zeros over the bytes they have.
    pub async fn punch_hole(
        &self,
        layout: &Layout,
        inode: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), StorageClientError> {
        check_layout(layout)?;
        if offset.checked_add(len).is_none() {
            return Err(StorageClientError::BadRange {
                offset,
                len,
                reason: "ends past u64::MAX",
            });
        }
        let (partials, whole) = hole_parts(layout.chunk_size, offset, len);
        for p in partials.into_iter().flatten() {
            let op = ModifyOp::Zero {
                offset: p.chunk_offset,
                len: p.len,
            };
            self.modify(chunk_addr(layout, inode, p.index), op).await?;
        }
        if let Some((from, to)) = whole {
            self.remove_chunks(layout, inode, from, to).await?;
        }
        Ok(())
    }

    /// `(chunk index, committed length)` of every chunk of `inode` over the
    /// chains of `layout`, in index order, read from SERVING replicas. At
    /// most [`LIST_CHUNKS_TOTAL_MAX`] chunks, else `TooManyChunks`.
    pub async fn list_chunks(
        &self,
        layout: &Layout,
        inode: u64,
    ) -> Result<Vec<(u64, u32)>, StorageClientError> {
        let (chunks, complete) = self
            .list_chunks_from(layout, inode, 0, LIST_CHUNKS_TOTAL_MAX)
            .await?;
        if !complete {
            return Err(StorageClientError::TooManyChunks {
                inode,
                limit: LIST_CHUNKS_TOTAL_MAX as u64,
                what: "list",
            });
        }
        Ok(chunks)
    }

    /// The first `limit` chunks of `inode` with index `from_index` or
    /// higher, as [`StorageClient::list_chunks`] gives them, and whether
    /// those are all of them.
    pub async fn list_chunks_from(
        &self,
        layout: &Layout,
        inode: u64,
        from_index: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, u32)>, bool), StorageClientError> {
        check_layout(layout)?;
        let mut all = Vec::new();
        let mut complete = true;
        for &chain in layout.chains.iter().take(layout.stripe as usize) {
            let (chunks, exhausted) = self.list_chain(chain, inode, from_index, limit).await?;
            complete &= exhausted;
            all.extend(chunks);
        }
        all.sort_unstable_by_key(|&(index, _)| index);
        // Each chain gave all its chunks or at least `limit`, so the first
        // `limit` of the merge are the file's first `limit`.
        if all.len() > limit {
            all.truncate(limit);
            complete = false;
        }
        Ok((all, complete))
    }

    /// Up to `limit` committed chunks of `inode` on one chain from
    /// `from_index` on, and whether the chain has no more.
    async fn list_chain(
        &self,
        chain: ChainId,
        inode: u64,
        from_index: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, u32)>, bool), StorageClientError> {
        let mut out = Vec::new();
        let mut cursor = from_index;
        while out.len() < limit {
            let req = ListChunksRequest {
                chain,
                inode,
                from_index: cursor,
                limit: (limit - out.len()).min(LIST_CHUNKS_MAX as usize) as u32,
            };
            let addr = ChunkAddr {
                chain,
                inode,
                index: cursor,
            };
            let page: ChunkList = self
                .with_retries(addr, |info| self.list_attempt(info, &req))
                .await?;
            out.extend(page.chunks.iter().map(|c| (c.index, c.length)));
            match page.next_index {
                // A cursor that does not move forward (a broken or hostile
                // server) would loop forever: refuse it.
                Some(next) if next <= cursor => {
                    return Err(StorageClientError::Refused {
                        addr,
                        error: AttemptError::Routing(format!(
                            "listing cursor went from {cursor} to {next}"
                        )),
                    });
                }
                Some(next) => cursor = next,
                None => return Ok((out, true)),
            }
        }
        Ok((out, false))
    }

    async fn list_attempt(
        &self,
        info: Arc<RoutingInfo>,
        req: &ListChunksRequest,
    ) -> Result<ChunkList, AttemptError> {
        let chain = find_chain(&info, req.chain)?;
        let mut last = None;
        for t in chain
            .targets
            .iter()
            .filter(|t| t.state == PublicState::Serving)
        {
            let node = target_address(&info, t.target)?;
            match self
                .inner
                .rpc
                .call::<ListChunks>(node, req, self.call_options())
                .await
            {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => last = Some(AttemptError::from(e)),
                Err(e) => last = Some(AttemptError::from(e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            AttemptError::Routing(format!("chain {} has no SERVING replica", chain.id))
        }))
    }

    /// A truncate or zeroing of one chunk at its head, with one request id
    /// across retries.
    async fn modify(&self, addr: ChunkAddr, op: ModifyOp) -> Result<(), StorageClientError> {
        let base = ModifyRequest {
            addr,
            chain_ver: 0,
            op,
            client: self.inner.client_id,
            request: self.next_request(),
        };
        self.with_retries(addr, |info| self.modify_attempt(info, &base))
            .await
            .map(drop)
    }

    async fn modify_attempt(
        &self,
        info: Arc<RoutingInfo>,
        base: &ModifyRequest,
    ) -> Result<ChunkVersion, AttemptError> {
        let chain = find_chain(&info, base.addr.chain)?;
        let node = head_address(&info, chain)?;
        let req = ModifyRequest {
            chain_ver: chain.version,
            ..base.clone()
        };
        let resp = self
            .inner
            .rpc
            .call::<Modify>(node, &req, self.call_options())
            .await?;
        Ok(resp?)
    }

    /// Removes the chunks of `inode` with index in `[from, to)` from every
    /// chain of the stripe; returns how many the heads removed.
    async fn remove_chunks(
        &self,
        layout: &Layout,
        inode: u64,
        from: u64,
        to: u64,
    ) -> Result<u64, StorageClientError> {
        let mut removed = 0;
        for &chain in layout.chains.iter().take(layout.stripe as usize) {
            removed += self.remove_chunks_on(chain, inode, from, to).await?;
        }
        Ok(removed)
    }

    /// Pages through `RemoveChunks` on one chain with one request id, so a
    /// chunk removed by an earlier attempt and written since stays.
    async fn remove_chunks_on(
        &self,
        chain: ChainId,
        inode: u64,
        from: u64,
        to: u64,
    ) -> Result<u64, StorageClientError> {
        let mut base = RemoveChunksRequest {
            chain,
            chain_ver: 0,
            inode,
            from_index: from,
            to_index: to,
            client: self.inner.client_id,
            request: self.next_request(),
        };
        let mut removed = 0;
        for _ in 0..REMOVE_PAGES_MAX {
            let addr = ChunkAddr {
                chain,
                inode,
                index: base.from_index,
            };
            let resp: RemoveChunksResponse = self
                .with_retries(addr, |info| self.remove_chunks_attempt(info, &base))
                .await?;
            removed += resp.removed;
            match resp.next_index {
                Some(next) if next <= base.from_index => {
                    return Err(StorageClientError::Refused {
                        addr,
                        error: AttemptError::Routing(format!(
                            "removal cursor went from {} to {next}",
                            base.from_index
                        )),
                    });
                }
                Some(next) => base.from_index = next,
                None => return Ok(removed),
            }
        }
        Err(StorageClientError::TooManyChunks {
            inode,
            limit: u64::from(REMOVE_PAGES_MAX) * u64::from(r3fs_wire::storage::REMOVE_CHUNKS_MAX),
            what: "remove",
        })
    }

    async fn remove_chunks_attempt(
        &self,
        info: Arc<RoutingInfo>,
        base: &RemoveChunksRequest,
    ) -> Result<RemoveChunksResponse, AttemptError> {
        let chain = find_chain(&info, base.chain)?;
        let node = head_address(&info, chain)?;
        let req = RemoveChunksRequest {
            chain_ver: chain.version,
            ..base.clone()
        };
        let resp = self
            .inner
            .rpc
            .call::<RemoveChunks>(node, &req, self.call_options())
            .await?;
        Ok(resp?)
    }

    fn next_request(&self) -> u64 {
        self.inner.request_next.fetch_add(1, Ordering::Relaxed)
    }

    /// Removes every chunk of `inode` from each chain `layout` uses (garbage
    /// collection of a deleted file); returns how many chunks the heads
    /// dropped. Idempotent.
    pub async fn remove_inode(
        &self,
        layout: &Layout,
        inode: u64,
    ) -> Result<u64, StorageClientError> {
        check_layout(layout)?;
        let mut removed = 0;
        for &chain in layout.chains.iter().take(layout.stripe as usize) {
            let addr = ChunkAddr {
                chain,
                inode,
                index: 0,
            };
            removed += self
                .with_retries(addr, |info| self.remove_attempt(info, chain, inode))
                .await?;
        }
        Ok(removed)
    }

    /// The length of `inode`'s data as storage holds it: the end of its
    /// highest committed chunk over the chains of `layout` (0 if none).
    pub async fn query_length(
        &self,
        layout: &Layout,
        inode: u64,
    ) -> Result<u64, StorageClientError> {
        check_layout(layout)?;
        let mut length = 0u64;
        for &chain in layout.chains.iter().take(layout.stripe as usize) {
            let addr = ChunkAddr {
                chain,
                inode,
                index: 0,
            };
            let last = self
                .with_retries(addr, |info| self.last_chunk_attempt(info, chain, inode))
                .await?;
            if let Some(last) = last {
                length =
                    length.max(last.index * u64::from(layout.chunk_size) + u64::from(last.length));
            }
        }
        Ok(length)
    }

    async fn last_chunk_attempt(
        &self,
        info: Arc<RoutingInfo>,
        chain_id: ChainId,
        inode: u64,
    ) -> Result<Option<LastChunk>, AttemptError> {
        let chain = find_chain(&info, chain_id)?;
        let mut last = None;
        for t in chain
            .targets
            .iter()
            .filter(|t| t.state == PublicState::Serving)
        {
            let node = target_address(&info, t.target)?;
            let req = LastChunkRequest {
                chain: chain.id,
                inode,
            };
            match self
                .inner
                .rpc
                .call::<QueryLastChunk>(node, &req, self.call_options())
                .await
            {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => last = Some(AttemptError::from(e)),
                Err(e) => last = Some(AttemptError::from(e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            AttemptError::Routing(format!("chain {} has no SERVING replica", chain.id))
        }))
    }

    async fn remove_attempt(
        &self,
        info: Arc<RoutingInfo>,
        chain_id: ChainId,
        inode: u64,
    ) -> Result<u64, AttemptError> {
        let chain = find_chain(&info, chain_id)?;
        let head = chain
            .targets
            .first()
            .filter(|t| t.state == PublicState::Serving)
            .ok_or_else(|| {
                AttemptError::Routing(format!("chain {} has no SERVING head", chain.id))
            })?;
        let node = target_address(&info, head.target)?;
        let req = RemoveInodeRequest {
            chain: chain.id,
            chain_ver: chain.version,
            target: head.target,
            inode,
        };
        let resp = self
            .inner
            .rpc
            .call::<RemoveInode>(node, &req, self.call_options())
            .await?;
        Ok(resp?)
    }

    async fn write_attempt(
        &self,
        info: Arc<RoutingInfo>,
        base: &WriteRequest,
        data: Bytes,
    ) -> Result<ChunkVersion, AttemptError> {
        let chain = find_chain(&info, base.addr.chain)?;
        let head = chain
            .targets
            .first()
            .filter(|t| t.state == PublicState::Serving)
            .ok_or_else(|| {
                AttemptError::Routing(format!("chain {} has no SERVING head", chain.id))
            })?;
        let node = target_address(&info, head.target)?;
        let req = WriteRequest {
            chain_ver: chain.version,
            ..base.clone()
        };
        let (resp, _) = self
            .inner
            .rpc
            .call_with_payload::<Write>(node, &req, data, self.call_options())
            .await?;
        Ok(resp?)
    }

    /// The bytes of one piece, possibly short (the chunk ends early or is missing).
    async fn read_piece(&self, addr: ChunkAddr, piece: Piece) -> Result<Bytes, StorageClientError> {
        let req = ReadRequest {
            addr,
            offset: piece.chunk_offset,
            length: piece.len,
        };
        self.with_retries(addr, |info| self.read_attempt(info, &req))
            .await
    }

    /// Tries every SERVING replica once, starting at a random one.
    async fn read_attempt(
        &self,
        info: Arc<RoutingInfo>,
        req: &ReadRequest,
    ) -> Result<Bytes, AttemptError> {
        let chain = find_chain(&info, req.addr.chain)?;
        let serving: Vec<TargetId> = chain
            .targets
            .iter()
            .filter(|t| t.state == PublicState::Serving)
            .map(|t| t.target)
            .collect();
        if serving.is_empty() {
            return Err(AttemptError::Routing(format!(
                "chain {} has no SERVING target",
                chain.id
            )));
        }
        let start = rand::random_range(0..serving.len());
        let mut last = None;
        for i in 0..serving.len() {
            let target = serving[(start + i) % serving.len()];
            match self.read_replica(&info, target, req).await {
                Ok(data) => return Ok(data),
                Err(e) if next_step(&e) == Next::Fail => return Err(e),
                Err(e) => {
                    if matches!(
                        e,
                        AttemptError::Storage(StorageError::Checksum { .. })
                            | AttemptError::ReadChecksum { .. }
                    ) {
                        tracing::warn!(chunk = ?req.addr, target, error = %e, "corrupt replica; reading another");
                    } else {
                        tracing::debug!(chunk = ?req.addr, target, error = %e, "replica failed a read; trying another");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one replica was tried"))
    }

    async fn read_replica(
        &self,
        info: &RoutingInfo,
        target: TargetId,
        req: &ReadRequest,
    ) -> Result<Bytes, AttemptError> {
        let node = target_address(info, target)?;
        let (resp, data) = self
            .inner
            .rpc
            .call_with_payload::<Read>(node, req, Bytes::new(), self.call_options())
            .await?;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) if is_missing_chunk(&e) => return Ok(Bytes::new()),
            Err(e) => return Err(e.into()),
        };
        let computed = crc_fast::crc32_iscsi(&data);
        if computed != resp.crc {
            return Err(AttemptError::ReadChecksum {
                target,
                sent: resp.crc,
                computed,
            });
        }
        // A server never sends more than asked; clip if one does.
        Ok(data.slice(..data.len().min(req.length as usize)))
    }

    fn call_options(&self) -> CallOptions {
        CallOptions {
            timeout: self.inner.config.call_timeout,
            retry: RetryPolicy::none(),
            idempotent: true,
        }
    }

    /// Runs `attempt` with the newest routing info until it succeeds, fails
    /// for good, or runs out of attempts (see the module docs).
    async fn with_retries<T, F, Fut>(
        &self,
        addr: ChunkAddr,
        mut attempt: F,
    ) -> Result<T, StorageClientError>
    where
        F: FnMut(Arc<RoutingInfo>) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let config = &self.inner.config;
        let attempts_max = config.attempts_max.max(1);
        let mut routing = self.inner.routing.clone();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let snapshot = routing.borrow_and_update().clone();
            let result = match snapshot {
                Some(info) => attempt(info).await,
                None => Err(AttemptError::Routing("no routing info yet".into())),
            };
            let error = match result {
                Ok(value) => return Ok(value),
                Err(e) => e,
            };
            let next = next_step(&error);
            if next == Next::Fail {
                return Err(StorageClientError::Refused { addr, error });
            }
            if attempts >= attempts_max {
                return Err(StorageClientError::Exhausted {
                    addr,
                    attempts,
                    last: error,
                });
            }
            tracing::debug!(chunk = ?addr, attempts, error = %error, "retrying chunk I/O");
            let backoff = self.backoff(attempts);
            match next {
                Next::AwaitRouting => {
                    let changed =
                        tokio::time::timeout(config.routing_wait, routing.changed()).await;
                    if matches!(changed, Ok(Err(_))) {
                        // The routing sender is gone: nothing newer will come.
                        tokio::time::sleep(backoff).await;
                    }
                }
                Next::Backoff => tokio::time::sleep(backoff).await,
                Next::Fail => unreachable!("handled above"),
            }
        }
    }

    /// Wait before attempt `attempt + 1`: the exponential step, jittered into
    /// its upper half.
    fn backoff(&self, attempt: u32) -> Duration {
        let config = &self.inner.config;
        let shift = attempt.saturating_sub(1).min(20);
        let step = config
            .backoff_initial
            .saturating_mul(1 << shift)
            .min(config.backoff_max);
        let half = step / 2;
        let jitter = rand::random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(chunk_size: u32, offset: u64, len: u64, expect: &[(u64, u32, u32, usize)]) {
        let got: Vec<_> = pieces(chunk_size, offset, len)
            .map(|p| (p.index, p.chunk_offset, p.len, p.buf_offset))
            .collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn ranges_split_at_chunk_boundaries() {
        check(10, 0, 0, &[]);
        check(10, 0, 10, &[(0, 0, 10, 0)]);
        check(10, 5, 3, &[(0, 5, 3, 0)]);
        check(10, 5, 20, &[(0, 5, 5, 0), (1, 0, 10, 5), (2, 0, 5, 15)]);
        check(10, 30, 11, &[(3, 0, 10, 0), (4, 0, 1, 10)]);
    }

    fn check_hole(
        chunk_size: u32,
        offset: u64,
        len: u64,
        expect_partial: &[(u64, u32, u32)],
        expect_whole: Option<(u64, u64)>,
    ) {
        let (partials, whole) = hole_parts(chunk_size, offset, len);
        let got: Vec<_> = partials
            .into_iter()
            .flatten()
            .map(|p| (p.index, p.chunk_offset, p.len))
            .collect();
        assert_eq!(got, expect_partial, "partial chunks of {offset}+{len}");
        assert_eq!(whole, expect_whole, "whole chunks of {offset}+{len}");
    }

    #[test]
    fn holes_split_into_partial_ends_and_whole_chunks() {
        check_hole(10, 0, 0, &[], None);
        check_hole(10, 3, 4, &[(0, 3, 4)], None);
        check_hole(10, 3, 7, &[(0, 3, 7)], None);
        check_hole(10, 0, 10, &[], Some((0, 1)));
        check_hole(10, 5, 20, &[(0, 5, 5), (2, 0, 5)], Some((1, 2)));
        check_hole(10, 10, 30, &[], Some((1, 4)));
        check_hole(10, 8, 4, &[(0, 8, 2), (1, 0, 2)], None);
        check_hole(10, 0, 7, &[(0, 0, 7)], None);
    }

    #[test]
    fn chunks_go_round_robin_over_the_stripe() {
        let layout = Layout {
            chunk_size: 10,
            stripe: 2,
            chains: vec![7, 8, 9],
        };
        let chains: Vec<_> = (0..5).map(|i| chain_of(&layout, i)).collect();
        assert_eq!(chains, [7, 8, 7, 8, 7]);
    }

    #[test]
    fn bad_layouts_and_ranges_are_einval() {
        let ok = Layout {
            chunk_size: 10,
            stripe: 2,
            chains: vec![1, 2],
        };
        assert!(check_layout(&ok).is_ok());
        for bad in [
            Layout {
                chunk_size: 0,
                ..ok.clone()
            },
            Layout {
                stripe: 0,
                ..ok.clone()
            },
            Layout {
                stripe: 3,
                ..ok.clone()
            },
            Layout {
                chunk_size: CHUNK_SIZE_MAX + 1,
                ..ok.clone()
            },
        ] {
            assert_eq!(check_layout(&bad).unwrap_err().errno(), libc::EINVAL);
        }
        assert_eq!(check_range(u64::MAX, 1).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            check_range(0, IO_BYTES_MAX + 1).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn too_many_chunks_is_efbig() {
        let e = StorageClientError::TooManyChunks {
            inode: 7,
            limit: LIST_CHUNKS_TOTAL_MAX as u64,
            what: "list",
        };
        assert_eq!(e.errno(), libc::EFBIG);
        assert_eq!(
            e.to_string(),
            "inode 7 has more than 1048576 chunks to list"
        );
    }

    #[test]
    fn only_not_found_is_a_hole() {
        let addr = ChunkAddr {
            chain: 1,
            inode: 7,
            index: 3,
        };
        assert!(is_missing_chunk(&StorageError::NotFound { addr }));
        let io = StorageError::Io {
            target: 1,
            reason: "chunk 7:3 not found".into(),
        };
        assert!(
            !is_missing_chunk(&io),
            "an I/O error is never taken for a hole"
        );
        assert!(!is_missing_chunk(&StorageError::NotServing { chain: 1 }));
    }
}
