//! Requests and responses of storage nodes: chunk I/O by clients, and the
//! CRAQ updates chain members send each other.
//!
//! Chunk bytes travel as the frame's bulk payload, never inside the body.
//! Storage refusals travel typed in the response body ([`StorageResult`]) so a
//! client can tell "try another replica or refresh routing" from "refused".
//!
//! Every change to a chunk's bytes (write, truncate, zeroing, removal) is one
//! CRAQ update ([`UpdateOp`]) that the head versions and forwards; clients
//! send writes as [`Write`], truncates and zeroing as [`Modify`], and
//! removals of a range of chunks as [`RemoveChunks`].
//!
//! # Limits
//! A [`ListChunks`] answer holds at most [`LIST_CHUNKS_MAX`] chunks and a
//! [`RemoveChunks`] call removes at most [`REMOVE_CHUNKS_MAX`]; both page by
//! chunk index.

use serde::{Deserialize, Serialize};

use crate::mgmt::{ChainId, TargetId};
use crate::Method;

/// Chunks in one [`ListChunks`] answer.
pub const LIST_CHUNKS_MAX: u32 = 4096;
/// Chunks one [`RemoveChunks`] call removes before it answers with a cursor.
pub const REMOVE_CHUNKS_MAX: u32 = 256;

/// One chunk of a file: the `index`-th chunk of inode `inode`, on chain `chain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkAddr {
    pub chain: ChainId,
    pub inode: u64,
    pub index: u64,
}

/// Why a storage node refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StorageError {
    /// The request's chain version differs from the node's: refresh routing.
    #[error("chain {chain} version mismatch: request has {request}, node has {node}")]
    ChainVersion {
        chain: ChainId,
        request: u64,
        node: u64,
    },
    /// Writes go to the chain head; this target is not it.
    #[error("target {target} is not the head of chain {chain}")]
    NotHead { chain: ChainId, target: TargetId },
    /// This node serves no target of that chain in a state that can answer.
    #[error("no serving target of chain {chain} on this node")]
    NotServing { chain: ChainId },
    /// The replica holds an uncommitted version of the chunk; read elsewhere or retry.
    #[error(
        "chunk {addr:?} has an uncommitted version here (committed {committed}, pending {pending})"
    )]
    NotCommitted {
        addr: ChunkAddr,
        committed: u64,
        pending: u64,
    },
    /// The replica has no committed version of the chunk: a hole, for readers.
    #[error("chunk {addr:?} does not exist")]
    NotFound { addr: ChunkAddr },
    /// The replica's copy failed its checksum; the client reads another replica.
    #[error("chunk {addr:?} on target {target} failed its checksum")]
    Checksum { addr: ChunkAddr, target: TargetId },
    /// Data sent did not match the CRC32C sent with it.
    #[error("payload checksum mismatch: sent {sent:08x}, computed {computed:08x}")]
    PayloadChecksum { sent: u32, computed: u32 },
    #[error("the request ends at byte {end}, past the chunk size {limit}")]
    OutOfRange { end: u64, limit: u64 },
    #[error("no space left on target {target}")]
    NoSpace { target: TargetId },
    /// The successor in the chain failed; the write is not committed.
    #[error("chain {chain} forwarding failed: {reason}")]
    Forward { chain: ChainId, reason: String },
    #[error("storage failure on target {target}: {reason}")]
    Io { target: TargetId, reason: String },
}

impl StorageError {
    /// Whether the same request may succeed later or on another replica
    /// (after refreshing routing info).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            StorageError::OutOfRange { .. }
                | StorageError::PayloadChecksum { .. }
                | StorageError::NoSpace { .. }
        )
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

/// The state of a chunk after an update, as the head reports it;
/// `commit_ver` 0 means the chunk does not exist (removed, or a truncate or
/// zeroing of a missing chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkVersion {
    pub commit_ver: u64,
    pub length: u32,
}

/// A client write of `payload` at `offset` into a chunk. Only the head takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRequest {
    pub addr: ChunkAddr,
    pub chain_ver: u64,
    pub offset: u32,
    pub chunk_size: u32,
    /// CRC32C of the payload. The only check of the payload in transit
    /// (`Write` leaves the frame's payload CRC to it): the head refuses a
    /// payload that does not match with `PayloadChecksum`.
    pub crc: u32,
    /// Identifies a client request, so a retried write is applied once.
    pub client: u64,
    pub request: u64,
}

/// How an update builds version `update_ver` of a chunk from the committed
/// version `update_ver - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateOp {
    /// The payload written at `offset`, zero-filling any gap.
    Write { offset: u32 },
    /// Cut to `length` bytes. The head sends it only for a longer chunk.
    Truncate { length: u32 },
    /// Zeros over `[offset, offset + len)`, clipped to the chunk's length:
    /// never makes the chunk longer.
    Zero { offset: u32, len: u32 },
    /// The payload is the whole chunk at `update_ver`, whatever the base: a
    /// re-driven pending version, and every update sent to a SYNCING target
    /// (which may lack the base and installs it committed at once, being the
    /// last target an update reaches).
    Replace,
    /// The chunk is removed; no payload.
    Remove,
}

/// What a chain member sends its successor: an update with its version assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub addr: ChunkAddr,
    pub chain_ver: u64,
    /// The target that must apply it.
    pub target: TargetId,
    pub update_ver: u64,
    pub op: UpdateOp,
    pub chunk_size: u32,
    /// CRC32C of the payload (empty for truncate, zero and remove). As for
    /// `WriteRequest::crc`, every member checks the payload against it.
    pub crc: u32,
    /// The client request this version carries (0, 0 when unknown), so every
    /// chain member can answer a retry of it, whichever member is head then.
    pub client: u64,
    pub request: u64,
    /// Names this forward of the version (random, chosen by the member that
    /// sends it), so a [`StoredNotice`] answers only it and never a later
    /// forward of the same version number.
    pub pass: u64,
}

/// What a chain member tells its successor after forwarding it an update:
/// whether the member and every member before it now hold that version
/// durably (`stored`). A successor commits a forwarded version only once
/// it has this notice with `stored` (chain replication's update
/// propagation: the tail never serves what a predecessor could lose), so a
/// member may store a version while its successors do. `update_ver` and
/// `pass` name the forward as the update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNotice {
    pub addr: ChunkAddr,
    /// The successor the update went to.
    pub target: TargetId,
    pub update_ver: u64,
    pub pass: u64,
    pub stored: bool,
}

/// A client's change of one chunk that carries no bytes. Only the head
/// takes it; it is versioned and replicated like a write, and a retry with
/// the same `(client, request)` is applied once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModifyOp {
    /// Cut the chunk to `length` bytes if it is longer; a shorter or missing
    /// chunk is left alone.
    Truncate { length: u32 },
    /// Zero `[offset, offset + len)` of the chunk, clipped to its length; a
    /// missing chunk is left alone.
    Zero { offset: u32, len: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModifyRequest {
    pub addr: ChunkAddr,
    pub chain_ver: u64,
    pub op: ModifyOp,
    pub client: u64,
    pub request: u64,
}

/// Removes the chunks of `inode` with index in `[from_index, to_index)` from
/// a chain, each by a versioned removal through the chain. Sent to the head.
/// Answers after at most [`REMOVE_CHUNKS_MAX`] chunks with a cursor to call
/// again from. A chunk this `(client, request)` already removed is not
/// removed again (a chunk written after it stays), so the caller keeps the
/// request id across retries and pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveChunksRequest {
    pub chain: ChainId,
    pub chain_ver: u64,
    pub inode: u64,
    pub from_index: u64,
    pub to_index: u64,
    pub client: u64,
    pub request: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveChunksResponse {
    /// Chunks this call removed.
    pub removed: u64,
    /// Where to continue, if chunks may remain.
    pub next_index: Option<u64>,
}

/// Asks a SERVING replica for the committed chunks of `inode` on `chain`
/// from `from_index` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListChunksRequest {
    pub chain: ChainId,
    pub inode: u64,
    pub from_index: u64,
    /// At most this many (and at most [`LIST_CHUNKS_MAX`]).
    pub limit: u32,
}

/// One chunk of a listing: its index and committed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub index: u64,
    pub length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    /// In index order.
    pub chunks: Vec<ChunkEntry>,
    /// Where to continue, if chunks may remain.
    pub next_index: Option<u64>,
}

/// What a resync compares: one chunk's committed version on a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSummary {
    pub inode: u64,
    pub index: u64,
    pub commit_ver: u64,
    pub length: u32,
    pub crc: u32,
}

/// Asks a SYNCING target for the summaries of all its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncListRequest {
    pub target: TargetId,
    pub chain: ChainId,
    pub chain_ver: u64,
}

/// Puts one whole committed chunk (the payload) on a SYNCING target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncInstallRequest {
    pub target: TargetId,
    pub chain_ver: u64,
    pub chunk: ChunkSummary,
    pub addr: ChunkAddr,
}

/// Removes a chunk the SYNCING target has and its predecessor does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRemoveRequest {
    pub target: TargetId,
    pub chain_ver: u64,
    pub addr: ChunkAddr,
}

/// Tells a SYNCING target its copy is complete: it may report up to date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDoneRequest {
    pub target: TargetId,
    pub chain: ChainId,
    pub chain_ver: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRequest {
    pub addr: ChunkAddr,
    pub offset: u32,
    pub length: u32,
}

/// Answers a read; the bytes are the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadResponse {
    pub commit_ver: u64,
    /// The chunk's committed length (the payload may be shorter near the end).
    pub chunk_length: u32,
    /// CRC32C of the payload.
    pub crc: u32,
}

/// Removes every chunk of a deleted file from a chain: sent to the head,
/// forwarded down the chain (`target` names the member that must act).
/// Idempotent: removing what is gone does nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveInodeRequest {
    pub chain: ChainId,
    pub chain_ver: u64,
    pub target: TargetId,
    pub inode: u64,
}

/// Asks a SERVING replica of `chain` for the last chunk of `inode` it
/// holds, to settle a file's length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastChunkRequest {
    pub chain: ChainId,
    pub inode: u64,
}

/// The highest-index committed chunk of a file on one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastChunk {
    pub index: u64,
    pub length: u32,
}

macro_rules! methods {
    ($($name:ident = $id:literal : $req:ty => $resp:ty
        $(, payload_crc_in_body = $crc:literal)?
        $(, response_payload_crc_in_body = $rcrc:literal)?;)*) => {
        $(
            #[doc = concat!("storage method `", stringify!($name), "`.")]
            pub struct $name;
            impl Method for $name {
                const ID: u16 = $id;
                const NAME: &'static str = concat!("storage.", stringify!($name));
                type Request = $req;
                type Response = $resp;
                $(const PAYLOAD_CRC_IN_BODY: bool = $crc;)?
                $(const RESPONSE_PAYLOAD_CRC_IN_BODY: bool = $rcrc;)?
            }
        )*
        /// Every storage method id.
        pub const METHOD_IDS: &[u16] = &[$($id),*];
    };
}

methods! {
    Write = 0x0301: WriteRequest => StorageResult<ChunkVersion>, payload_crc_in_body = true;
    Update = 0x0302: UpdateRequest => StorageResult<ChunkVersion>, payload_crc_in_body = true;
    Read = 0x0303: ReadRequest => StorageResult<ReadResponse>, response_payload_crc_in_body = true;
    SyncList = 0x0304: SyncListRequest => StorageResult<Vec<ChunkSummary>>;
    SyncInstall = 0x0305: SyncInstallRequest => StorageResult<()>;
    SyncRemove = 0x0306: SyncRemoveRequest => StorageResult<()>;
    SyncDone = 0x0307: SyncDoneRequest => StorageResult<()>;
    RemoveInode = 0x0308: RemoveInodeRequest => StorageResult<u64>;
    QueryLastChunk = 0x0309: LastChunkRequest => StorageResult<Option<LastChunk>>;
    Modify = 0x030a: ModifyRequest => StorageResult<ChunkVersion>;
    RemoveChunks = 0x030b: RemoveChunksRequest => StorageResult<RemoveChunksResponse>;
    ListChunks = 0x030c: ListChunksRequest => StorageResult<ChunkList>;
    Stored = 0x030d: StoredNotice => StorageResult<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_method_ids_are_in_the_storage_block_and_distinct() {
        let mut ids = METHOD_IDS.to_vec();
        assert!(ids.iter().all(|id| id >> 8 == 0x03));
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), METHOD_IDS.len());
    }

    #[test]
    fn errors_round_trip_and_say_whether_to_retry() {
        let e = StorageError::NotCommitted {
            addr: ChunkAddr {
                chain: 1,
                inode: 2,
                index: 3,
            },
            committed: 4,
            pending: 5,
        };
        let r: StorageResult<ChunkVersion> = Err(e.clone());
        let back: StorageResult<ChunkVersion> =
            crate::body::decode(&crate::body::encode(&r)).unwrap();
        assert_eq!(back, Err(e.clone()));
        assert!(e.is_retryable());
        assert!(!StorageError::NoSpace { target: 1 }.is_retryable());
    }

    #[test]
    fn a_full_chunk_list_fits_in_one_frame_body() {
        let list: StorageResult<ChunkList> = Ok(ChunkList {
            chunks: vec![
                ChunkEntry {
                    index: u64::MAX,
                    length: u32::MAX,
                };
                LIST_CHUNKS_MAX as usize
            ],
            next_index: Some(u64::MAX),
        });
        let body = crate::body::encode(&list);
        assert!(body.len() <= crate::frame::FRAME_BODY_BYTES_MAX as usize);
        let back: StorageResult<ChunkList> = crate::body::decode(&body).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn update_ops_round_trip() {
        for op in [
            UpdateOp::Write { offset: 3 },
            UpdateOp::Truncate { length: 9 },
            UpdateOp::Zero { offset: 1, len: 2 },
            UpdateOp::Replace,
            UpdateOp::Remove,
        ] {
            let back: UpdateOp = crate::body::decode(&crate::body::encode(&op)).unwrap();
            assert_eq!(back, op);
        }
    }
}
