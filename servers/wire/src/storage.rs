//! Requests and responses of storage nodes: chunk I/O by clients, and the
//! CRAQ updates chain members send each other.
//!
//! Chunk bytes travel as the frame's bulk payload, never inside the body.
//! Storage refusals travel typed in the response body ([`StorageResult`]) so a
//! client can tell "try another replica or refresh routing" from "refused".

use serde::{Deserialize, Serialize};

use crate::mgmt::{ChainId, TargetId};
use crate::Method;

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

/// The state of a chunk after a write, as the head reports it.
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
    /// CRC32C of the payload.
    pub crc: u32,
    /// Identifies a client request, so a retried write is applied once.
    pub client: u64,
    pub request: u64,
}

/// What a chain member sends its successor: a write with its version assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub addr: ChunkAddr,
    pub chain_ver: u64,
    /// The target that must apply it.
    pub target: TargetId,
    pub update_ver: u64,
    pub offset: u32,
    pub chunk_size: u32,
    pub crc: u32,
    /// The payload is the whole chunk at `update_ver`, not a piece at
    /// `offset`: sent to a SYNCING target, which may lack the version a
    /// partial write builds on. It installs the chunk committed at once (it is
    /// the last target a write reaches).
    pub full: bool,
    /// The client request this version carries (0, 0 when unknown), so every
    /// chain member can answer a retry of it, whichever member is head then.
    pub client: u64,
    pub request: u64,
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
    ($($name:ident = $id:literal : $req:ty => $resp:ty;)*) => {
        $(
            #[doc = concat!("storage method `", stringify!($name), "`.")]
            pub struct $name;
            impl Method for $name {
                const ID: u16 = $id;
                const NAME: &'static str = concat!("storage.", stringify!($name));
                type Request = $req;
                type Response = $resp;
            }
        )*
        /// Every storage method id.
        pub const METHOD_IDS: &[u16] = &[$($id),*];
    };
}

methods! {
    Write = 0x0301: WriteRequest => StorageResult<ChunkVersion>;
    Update = 0x0302: UpdateRequest => StorageResult<ChunkVersion>;
    Read = 0x0303: ReadRequest => StorageResult<ReadResponse>;
    SyncList = 0x0304: SyncListRequest => StorageResult<Vec<ChunkSummary>>;
    SyncInstall = 0x0305: SyncInstallRequest => StorageResult<()>;
    SyncRemove = 0x0306: SyncRemoveRequest => StorageResult<()>;
    SyncDone = 0x0307: SyncDoneRequest => StorageResult<()>;
    RemoveInode = 0x0308: RemoveInodeRequest => StorageResult<u64>;
    QueryLastChunk = 0x0309: LastChunkRequest => StorageResult<Option<LastChunk>>;
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
}
