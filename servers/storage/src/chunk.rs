//! The chunk engine of one storage target: chunk bytes and their CRAQ versions
//! (one committed, at most one pending) in one directory.
//!
//! Must not touch the network, chains or mgmtd: it never forwards a write,
//! never learns who the chain's head or tail is, and never opens any KV store
//! but its own `meta` directory. Chain versions and update versions come from
//! the caller (the CRAQ layer) and are only compared and recorded here.
//!
//! # Layout
//! - `<dir>/meta`: an [`EmbeddedEngine`] (durability `Sync`, group commit)
//!   holding one record per chunk under key `b'c' ++ inode (BE) ++ index
//!   (BE)`: its [`ChunkMeta`] plus, for the committed and the pending
//!   version, the list of its blocks: for each [`BLOCK_BYTES`] of the
//!   version, the block number in the data file and the CRC32C of the
//!   block's bytes (the last block may be short and is checksummed over its
//!   valid bytes only). Block number [`BLOCK_ZERO`] means "all zeros, no
//!   disk block" (gaps and zeroed ranges).
//! - `<dir>/data/blocks`: one file of [`BLOCK_BYTES`] slots, written around
//!   and read around the page cache ([`crate::data_file`]). Which slots are
//!   in use is not stored anywhere: it is exactly the set the records name,
//!   rebuilt by `open`.
//!
//! # Crash safety
//! A new version (write, truncate, zeroing, whole replacement, install)
//! never overwrites a block any record names: the blocks it changes go to
//! free slots (copy on write per block; unchanged blocks are shared with the
//! committed version), the data file is `fdatasync`ed (one sync covers every
//! writer waiting at that moment), and only then does one metadata commit
//! reference them. That commit is the single durability and atomicity point:
//! after a crash the record names either the old committed blocks plus the
//! pending ones, or the new committed blocks; all of them were synced before
//! the record was. `commit` changes only metadata; `commit_unsynced` (for
//! chain members whose successor already committed the version durably)
//! does not wait for its fsync, and the slots it frees are reused only once
//! a later fsync covered it, so a crash that takes the switch back finds
//! every block the old record names intact. The last member of a
//! chain stages and commits a version in that one commit
//! ([`ChunkEngine::apply_committed`]): after a crash it holds the old
//! committed version or the new one, never the new one pending. A slot is
//! freed (for reuse) only after the commit that stopped referencing it; slots written
//! for a version whose record never committed are free after `open`, since
//! no record names them. Pending versions survive a reopen as pending (as in
//! 3FS). A torn or flipped block is caught by its CRC on every read of it.
//!
//! # Concurrency
//! Every operation on a chunk holds that chunk's lock (one of [`LOCK_SHARDS`]
//! mutexes, chosen by hashing the id), so calls on one chunk are serialized
//! and calls on different chunks run in parallel. Reads take the lock too: a
//! commit frees the slots a concurrent read would read, and another chunk's
//! write may then reuse them. A record read under the lock needs no wait
//! for the metadata store's group fsync: every store of it returned only
//! once durable (see `load` for the failed-store case).
//!
//! # Removal
//! [`ChunkEngine::remove`] stages a pending *removal* (a tombstone: no blocks,
//! `ChunkMeta::pending_remove`); its [`ChunkEngine::commit`] deletes the
//! record, frees the blocks and returns `Ok(None)`. A removed chunk is simply
//! absent: `remove` of an absent chunk succeeds (idempotent), while `commit`
//! of an absent chunk is `NotFound` (the caller treats that as done for a
//! retried removal).
//!
//! # Limits
//! A chunk holds at most [`CHUNK_BYTES_MAX`] bytes (and at most the
//! `chunk_size_max` given to [`ChunkEngine::open`]). A read loads and
//! verifies only the blocks it returns bytes from; a write reads (and
//! verifies) only the at most two blocks it covers partially. Listing reads
//! [`LIST_BATCH_CHUNKS`] records per KV transaction. Freed slots are reused
//! but never returned to the file system (the data file keeps its largest
//! size); the free list lives in memory, one entry per free slot.
//!
//! # Full disks
//! A version that needs new slots at the end of the data file is refused
//! with [`ChunkError::NoSpace`] when growing the file would leave less than
//! [`SPACE_RESERVE_BYTES`] free, so the metadata store (whose journal
//! poisons itself on a failed write) keeps room for the commits, aborts and
//! removals that follow, and nothing committed is lost. An `ENOSPC` (or
//! `EDQUOT`) from the data file is `NoSpace` too, and so is one from the
//! metadata store (another process filled the disk); but the store refuses
//! every write after a failed one, so that also takes the target out of
//! service (see `kv_write_failed`), as a failed `fdatasync` of the data
//! file does.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

use crate::crc;
use crate::data_file::DataFile;
use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use r3fs_kv::embedded::{EmbeddedConfig, EmbeddedEngine};
use r3fs_kv::{AsKvError, KvEngine, KvError, RangeOptions, RetryPolicy};
use r3fs_net::payload::PayloadBuf;
use serde::{Deserialize, Serialize};

/// Largest chunk any target accepts.
pub const CHUNK_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Bytes per block: the unit of copy on write, of checksums and of reads.
pub const BLOCK_BYTES: u32 = 64 * 1024;
/// The block number of an all-zero block that has no slot on disk.
pub const BLOCK_ZERO: u64 = u64::MAX;
/// Number of chunk locks; chunks hash onto them.
pub const LOCK_SHARDS: usize = 1024;
/// Records read per KV transaction when listing.
pub const LIST_BATCH_CHUNKS: usize = 4096;
/// Free bytes growing the data file must leave on the target's file system.
/// The metadata store shares that file system, and a failed journal write
/// poisons it until the target reopens, so chunk data must meet a full disk
/// first: then commits, aborts and removals still have room.
pub const SPACE_RESERVE_BYTES: u64 = 4 * 1024 * 1024;

/// The on-disk format this engine writes, recorded in the target's
/// [`FORMAT_FILE`]. Bump it with every incompatible change.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_FILE: &str = "FORMAT";
const META_DIR: &str = "meta";
const DATA_DIR: &str = "data";
const BLOCKS_FILE: &str = "blocks";
const KEY_PREFIX: u8 = b'c';
const KEY_BYTES: usize = 17;
/// OS error 28 as the KV engine prints it (displayed, or debug-printed).
const KV_NO_SPACE_MARKERS: [&str; 2] = ["os error 28", "StorageFull"];

const _: () = assert!(KEY_BYTES == 1 + 8 + 8);
const _: () = assert!(LOCK_SHARDS.is_power_of_two());
const _: () = assert!(BLOCK_BYTES.is_power_of_two());
const _: () = assert!(CHUNK_BYTES_MAX.is_multiple_of(BLOCK_BYTES));

/// A chunk of one target: the `index`-th chunk of file `inode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId {
    pub inode: u64,
    pub index: u64,
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}", self.inode, self.index)
    }
}

/// The versions of one chunk.
///
/// `commit_ver <= update_ver`, and `update_ver == commit_ver + 1` exactly when
/// a pending version exists (at most one). The `pending_*` fields describe the
/// version `update_ver`: the pending one if any, else the committed one (then
/// they equal `length` and `crc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Newest version, pending or committed.
    pub update_ver: u64,
    /// Committed version; 0 when nothing was committed yet.
    pub commit_ver: u64,
    /// Chain version of the last accepted write.
    pub chain_ver: u64,
    /// Committed length in bytes.
    pub length: u32,
    /// CRC32C of the committed bytes.
    pub crc: u32,
    /// Length of version `update_ver`.
    pub pending_length: u32,
    /// CRC32C of version `update_ver`.
    pub pending_crc: u32,
    /// The pending version removes the chunk.
    pub pending_remove: bool,
}

impl ChunkMeta {
    /// A pending version exists.
    pub fn is_dirty(&self) -> bool {
        self.update_ver != self.commit_ver
    }
}

/// A versioned change as a chain member applies it: staged as the pending
/// version by [`ChunkEngine::apply_pending`], or (the last member) staged
/// and committed in one metadata commit by [`ChunkEngine::apply_committed`].
#[derive(Debug, Clone, Copy)]
pub enum ChunkUpdate<'a> {
    /// As [`ChunkEngine::write_pending_checked`].
    Write {
        offset: u32,
        data: &'a [u8],
        chunk_size: u32,
        crc: u32,
    },
    /// As [`ChunkEngine::truncate`].
    Truncate { length: u32 },
    /// As [`ChunkEngine::zero_pending`].
    Zero { offset: u32, len: u32 },
    /// As [`ChunkEngine::replace_pending_checked`].
    Replace { data: &'a [u8], crc: u32 },
    /// As [`ChunkEngine::remove`].
    Remove,
}

/// What a chunk operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {id} not found")]
    NotFound { id: ChunkId },
    /// The target left service after a disk failure (see [`ChunkEngine::fail`]).
    #[error("target out of service until reopened: {reason}")]
    Failed { reason: String },
    #[error("chunk {id} has pending version {update_ver} over committed version {committed_ver}")]
    NotCommitted {
        id: ChunkId,
        committed_ver: u64,
        update_ver: u64,
    },
    #[error("chunk {id}: bytes up to {end} exceed the chunk size {limit}")]
    OutOfRange { id: ChunkId, end: u64, limit: u64 },
    #[error("chunk {id}: version {update_ver} is already pending with other bytes")]
    VersionConflict { id: ChunkId, update_ver: u64 },
    #[error("chunk {id}: version {update_ver} is stale, committed version is {commit_ver}")]
    StaleVersion {
        id: ChunkId,
        update_ver: u64,
        commit_ver: u64,
    },
    #[error("chunk {id}: version {update_ver} is out of order, expected {expected}")]
    OutOfOrder {
        id: ChunkId,
        update_ver: u64,
        expected: u64,
    },
    #[error("chunk {id}: chain version {chain_ver} is older than the stored {stored}")]
    StaleChainVersion {
        id: ChunkId,
        chain_ver: u64,
        stored: u64,
    },
    #[error(
        "chunk {id}: no pending version {update_ver} (committed {commit_ver}, newest {newest_ver})"
    )]
    NoPending {
        id: ChunkId,
        update_ver: u64,
        commit_ver: u64,
        newest_ver: u64,
    },
    #[error("chunk {id} is corrupt: crc expected {expected:#010x}, found {actual:#010x}")]
    Corrupt {
        id: ChunkId,
        expected: u32,
        actual: u32,
    },
    #[error("chunk {id}: install bytes do not match the metadata (length {actual_len} vs {expected_len}, crc {actual_crc:#010x} vs {expected_crc:#010x})")]
    InstallMismatch {
        id: ChunkId,
        expected_len: u32,
        actual_len: u64,
        expected_crc: u32,
        actual_crc: u32,
    },
    #[error("chunk {id}: payload crc sent {sent:#010x}, computed {computed:#010x}")]
    PayloadChecksum {
        id: ChunkId,
        sent: u32,
        computed: u32,
    },
    #[error("chunk {id}: undecodable metadata record: {reason}")]
    BadMeta { id: ChunkId, reason: String },
    #[error("target {path} holds chunk format {found}, this build reads format {expected}: move the target aside and let resync refill it from its chain")]
    UnsupportedFormat {
        path: PathBuf,
        found: String,
        expected: u32,
    },
    #[error("no space left on device writing {path} (chunk {id:?})")]
    NoSpace { id: Option<ChunkId>, path: PathBuf },
    #[error("i/o error on {path} (chunk {id:?})")]
    Io {
        id: Option<ChunkId>,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chunk metadata store failed (chunk {id:?})")]
    Kv {
        id: Option<ChunkId>,
        #[source]
        source: KvError,
    },
    #[error("chunk size {chunk_size_max} exceeds the limit {limit}")]
    ChunkSizeTooLarge { chunk_size_max: u32, limit: u32 },
}

impl From<KvError> for ChunkError {
    fn from(source: KvError) -> Self {
        ChunkError::Kv { id: None, source }
    }
}

impl AsKvError for ChunkError {
    fn as_kv_error(&self) -> Option<&KvError> {
        match self {
            ChunkError::Kv { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result of chunk operations.
pub type ChunkResult<T> = Result<T, ChunkError>;

/// Refuses a target written in another on-disk format (with a message an
/// operator can act on) and stamps a new target with ours. A target with a
/// metadata store but no FORMAT file predates the stamp: format 1.
fn check_format(dir: &Path, meta_dir: &Path) -> ChunkResult<()> {
    let path = dir.join(FORMAT_FILE);
    let expected = format!("r3fs chunk engine format {FORMAT_VERSION}\n");
    match fs::read_to_string(&path) {
        Ok(found) if found == expected => Ok(()),
        Ok(found) => Err(ChunkError::UnsupportedFormat {
            path: dir.to_path_buf(),
            found: format!("{:?}", found.trim()),
            expected: FORMAT_VERSION,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if meta_dir.exists() {
                return Err(ChunkError::UnsupportedFormat {
                    path: dir.to_path_buf(),
                    found: "1 (no FORMAT file)".into(),
                    expected: FORMAT_VERSION,
                });
            }
            fs::create_dir_all(dir).map_err(|e| io_error(None, dir, e))?;
            let tmp = dir.join("FORMAT.tmp");
            fs::write(&tmp, expected.as_bytes()).map_err(|e| io_error(None, &tmp, e))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error(None, &tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| io_error(None, &path, e))?;
            sync_dir(None, dir)
        }
        Err(e) => Err(io_error(None, &path, e)),
    }
}

fn io_error(id: Option<ChunkId>, path: &Path, source: io::Error) -> ChunkError {
    let no_space = matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
    if no_space {
        return ChunkError::NoSpace {
            id,
            path: path.to_path_buf(),
        };
    }
    ChunkError::Io {
        id,
        path: path.to_path_buf(),
        source,
    }
}

/// Attach the chunk id to a KV error, and recognise a full disk.
fn with_id(id: ChunkId, meta_dir: &Path, err: ChunkError) -> ChunkError {
    match err {
        ChunkError::Kv { source, .. } => {
            let no_space = matches!(&source, KvError::Engine(m) if KV_NO_SPACE_MARKERS.iter().any(|k| m.contains(k)));
            if no_space {
                return ChunkError::NoSpace {
                    id: Some(id),
                    path: meta_dir.to_path_buf(),
                };
            }
            ChunkError::Kv {
                id: Some(id),
                source,
            }
        }
        other => other,
    }
}

/// One block of a version: where it lives and the CRC32C of its valid bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct BlockRef {
    /// Slot in the data file, or [`BLOCK_ZERO`].
    block: u64,
    crc: u32,
}

/// The stored record of one chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    meta: ChunkMeta,
    /// Blocks of the committed version (`blocks_for(meta.length)` of them).
    committed: Vec<BlockRef>,
    /// Blocks of the pending version; empty without one or for a removal.
    pending: Vec<BlockRef>,
}

/// Number of blocks holding `length` bytes.
fn blocks_for(length: u32) -> usize {
    length.div_ceil(BLOCK_BYTES) as usize
}

/// Valid bytes of block `i` of a version of `length` bytes.
fn block_len(length: u32, i: usize) -> u32 {
    let start = i as u64 * u64::from(BLOCK_BYTES);
    (u64::from(length).saturating_sub(start)).min(u64::from(BLOCK_BYTES)) as u32
}

/// The CRC32C of a whole version from its blocks' CRCs.
fn version_crc(blocks: &[BlockRef], length: u32) -> u32 {
    let mut crc = 0;
    for (i, b) in blocks.iter().enumerate() {
        crc = crc::combine(crc, b.crc, block_len(length, i) as usize);
    }
    crc
}

/// CRC32C of `len` zero bytes (`len <= BLOCK_BYTES`).
fn zero_crc(len: u32) -> u32 {
    static FULL: OnceLock<u32> = OnceLock::new();
    if len == BLOCK_BYTES {
        return *FULL.get_or_init(|| crc_fast::crc32_iscsi(zeros()));
    }
    crc_fast::crc32_iscsi(&zeros()[..len as usize])
}

fn zeros() -> &'static [u8] {
    static ZEROS: OnceLock<Vec<u8>> = OnceLock::new();
    ZEROS.get_or_init(|| vec![0u8; BLOCK_BYTES as usize])
}

impl Record {
    /// Panics when the record breaks the version invariants: acting on it
    /// would corrupt data.
    fn check(&self) {
        let m = &self.meta;
        assert!(
            m.commit_ver <= m.update_ver,
            "commit_ver > update_ver: {self:?}"
        );
        assert!(
            m.update_ver - m.commit_ver <= 1,
            "two pending versions: {self:?}"
        );
        assert!(m.update_ver > 0, "record without any version: {self:?}");
        assert!(m.commit_ver > 0 || m.length == 0, "{self:?}");
        assert!(
            self.committed.len() == blocks_for(m.length),
            "committed blocks do not match the length: {self:?}"
        );
        if m.is_dirty() && !m.pending_remove {
            assert!(
                self.pending.len() == blocks_for(m.pending_length),
                "pending blocks do not match the length: {self:?}"
            );
        } else {
            assert!(self.pending.is_empty(), "stray pending blocks: {self:?}");
        }
        if !m.is_dirty() {
            assert!(!m.pending_remove, "clean with pending removal: {self:?}");
            assert!(
                m.pending_length == m.length,
                "clean, lengths differ: {self:?}"
            );
            assert!(m.pending_crc == m.crc, "clean, crcs differ: {self:?}");
        }
        debug_assert!(version_crc(&self.committed, m.length) == m.crc, "{self:?}");
    }

    /// Slots on disk the record names.
    fn slots(&self) -> impl Iterator<Item = u64> + '_ {
        self.committed
            .iter()
            .chain(&self.pending)
            .map(|b| b.block)
            .filter(|&b| b != BLOCK_ZERO)
    }

    /// The record once its pending version (not a removal) is committed.
    fn promoted(&self) -> Record {
        let meta = self.meta;
        assert!(meta.is_dirty(), "promoting a clean record: {self:?}");
        assert!(!meta.pending_remove, "promoting a removal: {self:?}");
        Record {
            meta: ChunkMeta {
                commit_ver: meta.update_ver,
                length: meta.pending_length,
                crc: meta.pending_crc,
                ..meta
            },
            committed: self.pending.clone(),
            pending: Vec::new(),
        }
    }
}

/// What staging an update made of a chunk, before any metadata is stored.
enum Staged {
    /// Nothing new to store: a retry of the committed version, or of the
    /// pending one (then `update_ver` is the record's pending version).
    Existing(Record),
    /// A new pending version: its fresh blocks are written and synced, and
    /// the record naming them is not stored yet.
    New(Record),
}

/// The callback of [`ChunkEngine::apply_pending`], called at most once.
struct OnPrepared<'a> {
    f: Option<&'a mut dyn FnMut()>,
    called: bool,
}

impl<'a> OnPrepared<'a> {
    fn new(f: &'a mut dyn FnMut()) -> Self {
        OnPrepared {
            f: Some(f),
            called: false,
        }
    }

    fn none() -> Self {
        OnPrepared {
            f: None,
            called: false,
        }
    }

    fn call(&mut self) {
        if let Some(f) = self.f.take() {
            self.called = true;
            f();
        }
    }
}

/// A versioned change staged as the pending version.
enum Change<'a> {
    Write {
        offset: u32,
        data: &'a [u8],
    },
    Truncate {
        length: u32,
    },
    /// Zeros over `[offset, offset + len)`, clipped to the committed length.
    Zero {
        offset: u32,
        len: u32,
    },
    /// The whole new version.
    Replace {
        data: &'a [u8],
    },
    Remove,
}

/// The new bytes a change lays over the committed version, in chunk offsets.
#[derive(Clone, Copy)]
enum Overlay<'a> {
    None,
    Bytes { offset: u64, data: &'a [u8] },
    Zeros { start: u64, end: u64 },
}

/// The content of one block of a version being built.
enum Content {
    /// The committed version's block, unchanged.
    Keep(BlockRef),
    /// All zeros, no slot.
    Zero,
    /// `payload[start..end]` of a write, as is.
    Payload { start: usize, end: usize },
    /// Bytes assembled from the committed block and the change.
    Owned(Vec<u8>),
}

/// A version laid out in blocks, before any slot is written.
struct Plan {
    length: u32,
    blocks: Vec<(Content, u32)>,
}

impl Plan {
    fn crc(&self) -> u32 {
        let mut crc = 0;
        for (i, (_, block_crc)) in self.blocks.iter().enumerate() {
            crc = crc::combine(crc, *block_crc, block_len(self.length, i) as usize);
        }
        crc
    }
}

fn chunk_key(id: ChunkId) -> [u8; KEY_BYTES] {
    let mut key = [0u8; KEY_BYTES];
    key[0] = KEY_PREFIX;
    key[1..9].copy_from_slice(&id.inode.to_be_bytes());
    key[9..].copy_from_slice(&id.index.to_be_bytes());
    key
}

fn inode_prefix(inode: u64) -> Vec<u8> {
    let mut key = vec![KEY_PREFIX];
    key.extend_from_slice(&inode.to_be_bytes());
    key
}

fn decode_key(key: &[u8]) -> Option<ChunkId> {
    let key: &[u8; KEY_BYTES] = key.try_into().ok()?;
    if key[0] != KEY_PREFIX {
        return None;
    }
    let inode = u64::from_be_bytes(key[1..9].try_into().ok()?);
    let index = u64::from_be_bytes(key[9..].try_into().ok()?);
    Some(ChunkId { inode, index })
}

/// The stored form of `record` (checked first); `None` deletes the record.
fn encode_record(id: ChunkId, record: Option<&Record>) -> ChunkResult<Option<Vec<u8>>> {
    let Some(record) = record else {
        return Ok(None);
    };
    record.check();
    postcard::to_allocvec(record)
        .map(Some)
        .map_err(|e| ChunkError::BadMeta {
            id,
            reason: e.to_string(),
        })
}

fn decode_record(id: ChunkId, value: &[u8]) -> ChunkResult<Record> {
    let record: Record = postcard::from_bytes(value).map_err(|e| ChunkError::BadMeta {
        id,
        reason: e.to_string(),
    })?;
    record.check();
    Ok(record)
}

/// Bytes an unprivileged writer may still use on the file system of `path`.
fn available_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to
    // writable memory of the right type; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialized `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn sync_dir(id: Option<ChunkId>, dir: &Path) -> ChunkResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(id, dir, e))
}

/// Whether a metadata commit waits for its fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitSync {
    Wait,
    /// See [`ChunkEngine::commit_unsynced`].
    Later,
}

/// Free slots of the data file.
struct Slots {
    free: BTreeSet<u64>,
    /// Slots at and after this one are past the end of the data file.
    end: u64,
    /// Slots an unsynced commit stopped naming, with the metadata version
    /// that must be durable before they are reused (oldest first): until
    /// then a crash could bring back the record that names them.
    unsynced: VecDeque<(u64, Vec<u64>)>,
}

/// The store of one storage target. See the module docs.
pub struct ChunkEngine {
    dir: PathBuf,
    meta_dir: PathBuf,
    data_dir: PathBuf,
    /// The slots: `<dir>/data/blocks`.
    data: DataFile,
    chunk_size_max: u32,
    kv: EmbeddedEngine,
    locks: Box<[Mutex<()>]>,
    slots: Mutex<Slots>,
    /// A metadata commit failed: its batch may be visible to reads without
    /// being durable, so from then on `load` waits for durability.
    kv_in_doubt: AtomicBool,
    /// See [`ChunkEngine::inject_faults`]: the errno for
    /// [`FaultPoint::BlockWrite`], 0 for none.
    block_write_fault: AtomicI32,
    /// The errno for [`FaultPoint::UnsyncedCommit`], 0 for none.
    unsynced_commit_fault: AtomicI32,
    /// Why this target left service (see [`ChunkEngine::fail`]).
    failed: OnceLock<String>,
    /// Called once when the target leaves service (see
    /// [`ChunkEngine::on_failure`]).
    failure_hook: Mutex<Option<FailureHook>>,
}

/// See [`ChunkEngine::on_failure`].
type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

/// Where [`ChunkEngine::inject_faults`] makes the disk fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Block writes to the data file.
    BlockWrite,
    /// The data file's `fdatasync`.
    DataSync,
    /// The metadata write of [`ChunkEngine::commit_unsynced`] (a chain
    /// member's commit once its successor committed).
    UnsyncedCommit,
}

impl fmt::Debug for ChunkEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkEngine")
            .field("dir", &self.dir)
            .field("chunk_size_max", &self.chunk_size_max)
            .finish_non_exhaustive()
    }
}

/// Slot counts of a target's data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotStats {
    /// Slots the data file spans.
    pub total: u64,
    /// Of those, slots no record names.
    pub free: u64,
}

impl ChunkEngine {
    /// Open (or create) the target in `dir` and rebuild the free slot list
    /// from the metadata records.
    pub fn open(dir: impl AsRef<Path>, chunk_size_max: u32) -> ChunkResult<ChunkEngine> {
        if chunk_size_max > CHUNK_BYTES_MAX {
            return Err(ChunkError::ChunkSizeTooLarge {
                chunk_size_max,
                limit: CHUNK_BYTES_MAX,
            });
        }
        let dir = dir.as_ref().to_path_buf();
        let meta_dir = dir.join(META_DIR);
        let data_dir = dir.join(DATA_DIR);
        check_format(&dir, &meta_dir)?;
        fs::create_dir_all(&data_dir).map_err(|e| io_error(None, &data_dir, e))?;
        sync_dir(None, &dir)?;
        let blocks_path = data_dir.join(BLOCKS_FILE);
        let data = DataFile::open(&blocks_path).map_err(|e| io_error(None, &blocks_path, e))?;
        // The file's name is durable before any record names a slot in it.
        sync_dir(None, &data_dir)?;
        let kv = EmbeddedEngine::open(EmbeddedConfig::new(&meta_dir))?;
        let locks = (0..LOCK_SHARDS).map(|_| Mutex::new(())).collect();
        let engine = ChunkEngine {
            dir,
            meta_dir,
            data_dir,
            data,
            chunk_size_max,
            kv,
            locks,
            slots: Mutex::new(Slots {
                free: BTreeSet::new(),
                end: 0,
                unsynced: VecDeque::new(),
            }),
            kv_in_doubt: AtomicBool::new(false),
            block_write_fault: AtomicI32::new(0),
            unsynced_commit_fault: AtomicI32::new(0),
            failed: OnceLock::new(),
            failure_hook: Mutex::new(None),
        };
        engine.rebuild_slots()?;
        Ok(engine)
    }

    /// The largest chunk this target accepts.
    pub fn chunk_size_max(&self) -> u32 {
        self.chunk_size_max
    }

    /// Free every slot no record names: slots of superseded versions, and
    /// of versions whose record never committed (a crash between writing
    /// the blocks and the metadata commit).
    fn rebuild_slots(&self) -> ChunkResult<()> {
        let mut used = HashSet::new();
        self.scan(vec![KEY_PREFIX], vec![KEY_PREFIX + 1], |_, record| {
            used.extend(record.slots());
        })?;
        let file_bytes = self
            .data
            .byte_len()
            .map_err(|e| io_error(None, self.data.path(), e))?;
        let file_slots = file_bytes.div_ceil(u64::from(BLOCK_BYTES));
        let end = used
            .iter()
            .map(|&s| s + 1)
            .max()
            .unwrap_or(0)
            .max(file_slots);
        let free: BTreeSet<u64> = (0..end).filter(|s| !used.contains(s)).collect();
        if !free.is_empty() {
            tracing::info!(free = free.len(), end, "chunk data slots free after open");
        }
        *self.slots.lock() = Slots {
            free,
            end,
            unsynced: VecDeque::new(),
        };
        Ok(())
    }

    /// Slot counts of the data file.
    pub fn slot_stats(&self) -> SlotStats {
        let slots = self.slots.lock();
        let unsynced: usize = slots.unsynced.iter().map(|(_, s)| s.len()).sum();
        SlotStats {
            total: slots.end,
            free: (slots.free.len() + unsynced) as u64,
        }
    }

    fn lock(&self, id: ChunkId) -> MutexGuard<'_, ()> {
        self.lock_of(id).lock()
    }

    fn lock_of(&self, id: ChunkId) -> &Mutex<()> {
        let hash = (id.inode.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.index)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let shard = (hash >> 32) as usize & (LOCK_SHARDS - 1);
        &self.locks[shard]
    }

    /// Where byte `offset` of version `ver` (committed or pending) of `id`
    /// lives: the data file and the position in it. For tests and tools (say,
    /// to damage a block on purpose); `None` when no such version or byte
    /// exists or the byte is in an all-zero block without a slot. Never
    /// write to it.
    pub fn block_location(
        &self,
        id: ChunkId,
        ver: u64,
        offset: u32,
    ) -> ChunkResult<Option<(PathBuf, u64)>> {
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        let (blocks, length) = if ver == record.meta.commit_ver {
            (&record.committed, record.meta.length)
        } else if ver == record.meta.update_ver {
            (&record.pending, record.meta.pending_length)
        } else {
            return Ok(None);
        };
        if offset >= length {
            return Ok(None);
        }
        let block = blocks[(offset / BLOCK_BYTES) as usize].block;
        if block == BLOCK_ZERO {
            return Ok(None);
        }
        let pos = block * u64::from(BLOCK_BYTES) + u64::from(offset % BLOCK_BYTES);
        Ok(Some((self.data.path().to_path_buf(), pos)))
    }

    // ---- metadata ----

    /// The record of `id`. The caller holds the chunk's lock.
    ///
    /// Reads a snapshot and drops the transaction uncommitted: committing a
    /// read-only transaction under `Durability::Sync` waits for the group
    /// fsync of every commit its snapshot saw, other chunks' included. That
    /// wait buys nothing here. Every record of a chunk is stored under its
    /// lock, and `store` returns only once its commit is fsynced; so the
    /// value a reader holding the lock sees was stored by a `store` that
    /// already returned `Ok` (durable), or by one that failed. A failed
    /// commit may have left its batch visible but not durable: `store` then
    /// sets `kv_in_doubt` (before releasing the lock), and from then on
    /// loads commit their read and so wait for (or fail with) the fsync, as
    /// before. So no load returns a record a crash could take back, and
    /// nothing read from it reaches a client or a successor undurably —
    /// except the switch of a [`ChunkEngine::commit_unsynced`], which is
    /// visible at once: its version is durable on every later chain member
    /// already, its blocks are durable here, and any later durable commit
    /// of this target (the next stage of the chunk among them) covers it.
    fn load(&self, id: ChunkId) -> ChunkResult<Option<Record>> {
        self.check_in_service()?;
        if self.kv_in_doubt.load(Ordering::Acquire) {
            return self.load_durable(id);
        }
        self.load_snapshot(id)
    }

    /// The record of `id` as the metadata store holds it now, durable or
    /// not: [`ChunkEngine::load`] once no failed store is in doubt.
    fn load_snapshot(&self, id: ChunkId) -> ChunkResult<Option<Record>> {
        let key = chunk_key(id);
        let value = self
            .kv
            .begin()
            .and_then(|mut txn| txn.snapshot_get(&key))
            .map_err(|e| with_id(id, &self.meta_dir, e.into()))?;
        value.map(|v| decode_record(id, &v)).transpose()
    }

    /// [`ChunkEngine::load`] through a committed read, which waits until
    /// everything the read saw is durable.
    fn load_durable(&self, id: ChunkId) -> ChunkResult<Option<Record>> {
        let key = chunk_key(id);
        let value = r3fs_kv::run(&self.kv, RetryPolicy::default(), |txn| {
            Ok::<_, ChunkError>(txn.snapshot_get(&key)?)
        })
        .map_err(|e| with_id(id, &self.meta_dir, e))?;
        value.map(|v| decode_record(id, &v)).transpose()
    }

    /// Store (or with `None`, delete) the record of `id`: the atomic switch.
    fn store(&self, id: ChunkId, record: Option<&Record>) -> ChunkResult<()> {
        let key = chunk_key(id);
        let value = encode_record(id, record)?;
        r3fs_kv::run(&self.kv, RetryPolicy::default(), |txn| {
            match &value {
                Some(v) => txn.set(&key, v)?,
                None => txn.clear(&key)?,
            }
            Ok::<_, ChunkError>(())
        })
        .map_err(|e| {
            // See `load`: the batch may be visible without being durable.
            self.kv_in_doubt.store(true, Ordering::Release);
            self.kv_write_failed(id, e)
        })
    }

    /// A metadata write (or its fsync) failed with `err`. The store refuses
    /// every write after such a failure (fjall poisons itself), so the
    /// target can do nothing more until it is opened again: it leaves
    /// service, and the node reports it. The error as `with_id` maps it.
    fn kv_write_failed(&self, id: ChunkId, err: ChunkError) -> ChunkError {
        if let Some(KvError::Engine(message)) = err.as_kv_error() {
            self.fail(format!(
                "the metadata store in {} failed a write and refuses every write after it: {message}",
                self.meta_dir.display()
            ));
        }
        with_id(id, &self.meta_dir, err)
    }

    /// [`ChunkEngine::store`] without waiting for the fsync; returns the
    /// metadata version that must be durable for the store to be.
    fn store_unsynced(&self, id: ChunkId, record: Option<&Record>) -> ChunkResult<u64> {
        let key = chunk_key(id);
        let value = encode_record(id, record)?;
        // Records are written only under their chunk's lock and read without
        // conflict ranges, so this write never conflicts: one attempt.
        let mut txn = self.kv.begin_unsynced();
        let committed = match self.unsynced_commit_fault.load(Ordering::Relaxed) {
            0 => match &value {
                Some(v) => txn.set(&key, v),
                None => txn.clear(&key),
            }
            .and_then(|()| txn.commit()),
            // As the store reports a failed journal write.
            errno => Err(KvError::Engine(format!(
                "write batch (injected): {}",
                io::Error::from_raw_os_error(errno)
            ))),
        };
        if let Err(e) = committed {
            // See `load`: the batch may be visible without being durable.
            self.kv_in_doubt.store(true, Ordering::Release);
            return Err(self.kv_write_failed(id, e.into()));
        }
        Ok(self.kv.committed_version())
    }

    /// Visit the records in `[begin, end)` in key order, a batch per transaction.
    fn scan(
        &self,
        mut begin: Vec<u8>,
        end: Vec<u8>,
        mut visit: impl FnMut(ChunkId, Record),
    ) -> ChunkResult<()> {
        self.check_in_service()?;
        let opts = RangeOptions {
            limit: LIST_BATCH_CHUNKS,
            reverse: false,
            snapshot: true,
        };
        loop {
            let batch = r3fs_kv::run(&self.kv, RetryPolicy::default(), |txn| {
                Ok::<_, ChunkError>(txn.get_range(&begin, &end, opts)?)
            })?;
            for kv in &batch.kvs {
                let Some(id) = decode_key(&kv.key) else {
                    tracing::warn!(key = ?kv.key, "unknown key in chunk metadata");
                    continue;
                };
                visit(id, decode_record(id, &kv.value)?);
            }
            match batch.kvs.last() {
                Some(last) if batch.more => begin = r3fs_kv::key_after(&last.key),
                _ => return Ok(()),
            }
        }
    }

    // ---- slots ----

    /// `n` free slots, growing the data file when the free list runs out.
    fn alloc(&self, id: ChunkId, n: usize) -> ChunkResult<Vec<u64>> {
        let mut synced = self.kv.synced_version();
        let mut synced_once = false;
        let mut slots = loop {
            let mut slots = self.slots.lock();
            while slots.unsynced.front().is_some_and(|(v, _)| *v <= synced) {
                let (_, freed) = slots.unsynced.pop_front().expect("checked");
                for slot in freed {
                    let fresh = slots.free.insert(slot);
                    assert!(fresh, "slot {slot} freed twice");
                }
            }
            if slots.free.len() >= n || synced_once {
                break slots;
            }
            let waiting: usize = slots.unsynced.iter().map(|(_, s)| s.len()).sum();
            if slots.free.len() + waiting < n {
                break slots;
            }
            // The slots waiting for durability would cover this version:
            // make them durable (once) rather than grow the file, or refuse
            // with NoSpace on a full disk.
            drop(slots);
            self.kv
                .sync()
                .map_err(|e| self.kv_write_failed(id, e.into()))?;
            synced = self.kv.synced_version();
            synced_once = true;
        };
        let reused = n.min(slots.free.len());
        let grown = (n - reused) as u64;
        if grown > 0 {
            let bytes = grown * u64::from(BLOCK_BYTES);
            self.check_space(id, bytes)?;
            // Taken on disk now, under the slots' lock: concurrent stages
            // each see the others' growth in the free space, and the
            // version's block writes (after `apply_pending` let it go on)
            // do not run out of space.
            self.data
                .reserve(slots.end * u64::from(BLOCK_BYTES), bytes)
                .map_err(|e| io_error(Some(id), self.data.path(), e))?;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..reused {
            out.extend(slots.free.pop_first());
        }
        for _ in 0..grown {
            out.push(slots.end);
            slots.end += 1;
        }
        assert!(out.len() == n, "allocated {} of {n} slots", out.len());
        Ok(out)
    }

    /// Return slots that an unsynced commit stopped naming to the free list
    /// once metadata version `durable_at` is durable.
    fn release_after(&self, durable_at: u64, freed: Vec<u64>) {
        let freed: Vec<u64> = freed.into_iter().filter(|&s| s != BLOCK_ZERO).collect();
        if freed.is_empty() {
            return;
        }
        let mut slots = self.slots.lock();
        // Commits of other chunks may have queued a later version already
        // (versions are read outside this lock): waiting for the later one
        // is safe and keeps the queue in order.
        let durable_at = slots
            .unsynced
            .back()
            .map_or(durable_at, |(v, _)| durable_at.max(*v));
        slots.unsynced.push_back((durable_at, freed));
    }

    /// Return slots no record names any more to the free list.
    fn release(&self, freed: impl IntoIterator<Item = u64>) {
        let mut slots = self.slots.lock();
        for slot in freed {
            if slot == BLOCK_ZERO {
                continue;
            }
            assert!(slot < slots.end, "freeing slot {slot} past the end");
            let fresh = slots.free.insert(slot);
            assert!(fresh, "slot {slot} freed twice");
        }
    }

    /// `NoSpace` unless `bytes` more leave [`SPACE_RESERVE_BYTES`] free.
    fn check_space(&self, id: ChunkId, bytes: u64) -> ChunkResult<()> {
        let available =
            available_bytes(&self.data_dir).map_err(|e| io_error(Some(id), &self.data_dir, e))?;
        if available < bytes.saturating_add(SPACE_RESERVE_BYTES) {
            return Err(ChunkError::NoSpace {
                id: Some(id),
                path: self.data_dir.clone(),
            });
        }
        Ok(())
    }

    /// Make every finished write to the data file durable, sharing one
    /// `fdatasync` with the writers waiting at the same time.
    ///
    /// A failed `fdatasync` takes the target out of service: the writes it
    /// covered, other writers' among them, may be lost, and a later
    /// `fdatasync` that succeeds would not bring them back (the kernel
    /// reports a writeback error once), so no later version may be
    /// declared durable on top of them.
    fn sync_data(&self, id: ChunkId) -> ChunkResult<()> {
        self.data.sync_data().map_err(|e| {
            let e = io_error(Some(id), self.data.path(), e);
            self.fail(format!(
                "fdatasync of the data file failed, so writes it covered may be lost: {}",
                crate::describe(&e)
            ));
            e
        })
    }

    fn write_slots(&self, id: ChunkId, first: u64, bytes: &[u8]) -> ChunkResult<()> {
        let errno = self.block_write_fault.load(Ordering::Relaxed);
        if errno != 0 {
            let injected = io::Error::from_raw_os_error(errno);
            return Err(io_error(Some(id), self.data.path(), injected));
        }
        self.data
            .write_at(bytes, first * u64::from(BLOCK_BYTES))
            .map_err(|e| io_error(Some(id), self.data.path(), e))
    }

    /// Write the new blocks of `plan` to fresh slots and sync them; returns
    /// the version's block list. On failure no slot stays taken.
    fn write_plan(
        &self,
        id: ChunkId,
        plan: Plan,
        payload: &[u8],
        prepared: &mut OnPrepared<'_>,
    ) -> ChunkResult<Vec<BlockRef>> {
        let fresh = plan
            .blocks
            .iter()
            .filter(|(c, _)| matches!(c, Content::Payload { .. } | Content::Owned(_)))
            .count();
        let slots = self.alloc(id, fresh)?;
        prepared.call();
        let mut refs = Vec::with_capacity(plan.blocks.len());
        let written = self.write_blocks(id, plan, payload, &slots, &mut refs);
        let synced = written
            .and_then(|()| match fresh {
                0 => Ok(()),
                _ => self.sync_data(id),
            })
            // Out of service meanwhile (another writer's sync failed, say):
            // no record may name these blocks now.
            .and_then(|()| self.check_in_service());
        if let Err(e) = synced {
            self.release(slots);
            return Err(e);
        }
        Ok(refs)
    }

    fn write_blocks(
        &self,
        id: ChunkId,
        plan: Plan,
        payload: &[u8],
        slots: &[u64],
        refs: &mut Vec<BlockRef>,
    ) -> ChunkResult<()> {
        let mut next = slots.iter().copied();
        // A run of payload blocks in consecutive slots goes out in one write.
        let mut run: Option<(u64, usize, usize)> = None;
        for (content, crc) in plan.blocks {
            let block = match content {
                Content::Keep(b) => b.block,
                Content::Zero => BLOCK_ZERO,
                Content::Payload { start, end } => {
                    let slot = next.next().expect("a slot per new block");
                    run = match run {
                        Some((first, s, e))
                            if e == start
                                && first + ((e - s) / BLOCK_BYTES as usize) as u64 == slot
                                && (e - s) % BLOCK_BYTES as usize == 0 =>
                        {
                            Some((first, s, end))
                        }
                        Some((first, s, e)) => {
                            self.write_slots(id, first, &payload[s..e])?;
                            Some((slot, start, end))
                        }
                        None => Some((slot, start, end)),
                    };
                    slot
                }
                Content::Owned(bytes) => {
                    let slot = next.next().expect("a slot per new block");
                    self.write_slots(id, slot, &bytes)?;
                    slot
                }
            };
            refs.push(BlockRef { block, crc });
        }
        if let Some((first, s, e)) = run {
            self.write_slots(id, first, &payload[s..e])?;
        }
        assert!(next.next().is_none(), "every allocated slot is written");
        Ok(())
    }

    /// Bytes `[start, end)` of the version `blocks` (`length` bytes long),
    /// reading and verifying only the blocks they lie in; and their CRC32C.
    fn read_range(
        &self,
        id: ChunkId,
        blocks: &[BlockRef],
        length: u32,
        start: u32,
        end: u32,
    ) -> ChunkResult<(Bytes, u32)> {
        let end = end.min(length);
        if start >= end {
            return Ok((Bytes::new(), 0));
        }
        let first = (start / BLOCK_BYTES) as usize;
        let last = ((end - 1) / BLOCK_BYTES) as usize;
        let base = first as u64 * u64::from(BLOCK_BYTES);
        let span_end = (last as u64 + 1) * u64::from(BLOCK_BYTES);
        let span_end = span_end.min(length.into());
        // From the payload pool: memory a recent payload already faulted in,
        // not a fresh zeroed allocation per read. Every byte of the span is
        // written below (read, or zeroed for a block with no slot).
        let mut payload = PayloadBuf::with_len((span_end - base) as usize);
        let buf = payload.whole_mut();
        let at = |i: usize| (i as u64 * u64::from(BLOCK_BYTES) - base) as usize;
        let mut i = first;
        while i <= last {
            if blocks[i].block == BLOCK_ZERO {
                buf[at(i)..at(i) + block_len(length, i) as usize].fill(0);
                i += 1;
                continue;
            }
            let mut j = i;
            while j < last
                && blocks[j + 1].block != BLOCK_ZERO
                && blocks[j + 1].block == blocks[j].block + 1
            {
                j += 1;
            }
            let to = at(j) + block_len(length, j) as usize;
            self.data
                .read_exact_at(
                    &mut buf[at(i)..to],
                    blocks[i].block * u64::from(BLOCK_BYTES),
                )
                .map_err(|e| io_error(Some(id), self.data.path(), e))?;
            i = j + 1;
        }
        for (i, b) in blocks.iter().enumerate().take(last + 1).skip(first) {
            if b.block == BLOCK_ZERO {
                continue;
            }
            let bytes = &buf[at(i)..at(i) + block_len(length, i) as usize];
            let actual = crc_fast::crc32_iscsi(bytes);
            if actual != b.crc {
                return Err(ChunkError::Corrupt {
                    id,
                    expected: b.crc,
                    actual,
                });
            }
        }
        let whole_blocks = u64::from(start) == base && u64::from(end) == span_end;
        if whole_blocks {
            let mut crc = 0;
            for (i, b) in blocks.iter().enumerate().take(last + 1).skip(first) {
                crc = crc::combine(crc, b.crc, block_len(length, i) as usize);
            }
            return Ok((payload.freeze(), crc));
        }
        let out = payload
            .freeze()
            .slice((u64::from(start) - base) as usize..(u64::from(end) - base) as usize);
        let crc = crc_fast::crc32_iscsi(&out);
        Ok((out, crc))
    }

    /// The committed bytes of `record`, CRC verified; empty before the first commit.
    fn committed_bytes(&self, id: ChunkId, record: &Record) -> ChunkResult<Bytes> {
        let length = record.meta.length;
        self.read_range(id, &record.committed, length, 0, length)
            .map(|(bytes, _)| bytes)
    }

    /// The pending version's bytes of `record` (not a removal), CRC verified.
    fn pending_bytes(&self, id: ChunkId, record: &Record) -> ChunkResult<Bytes> {
        let length = record.meta.pending_length;
        self.read_range(id, &record.pending, length, 0, length)
            .map(|(bytes, _)| bytes)
    }

    /// Lay out the version `change` makes of the committed version of
    /// `record` in blocks, reading (and verifying) only the committed blocks
    /// the change covers partially; `None` for a removal. Also returns the
    /// CRC32C of the change's payload, computed on the way.
    fn plan(
        &self,
        id: ChunkId,
        record: Option<&Record>,
        change: &Change<'_>,
    ) -> ChunkResult<Option<(Plan, u32)>> {
        let (old, old_len): (&[BlockRef], u32) = match record {
            Some(r) => (&r.committed, r.meta.length),
            None => (&[], 0),
        };
        let (length, overlay, keep_old) = match *change {
            Change::Write { offset, data } => {
                let end = offset + data.len() as u32;
                let overlay = Overlay::Bytes {
                    offset: offset.into(),
                    data,
                };
                (old_len.max(end), overlay, true)
            }
            Change::Truncate { length } => (length, Overlay::None, true),
            Change::Zero { offset, len } => {
                let (start, end) = clip(old_len as usize, offset, len);
                let overlay = Overlay::Zeros {
                    start: start as u64,
                    end: end as u64,
                };
                (old_len, overlay, true)
            }
            Change::Replace { data } => {
                let overlay = Overlay::Bytes { offset: 0, data };
                (data.len() as u32, overlay, false)
            }
            Change::Remove => return Ok(None),
        };
        let mut blocks = Vec::with_capacity(blocks_for(length));
        let mut payload_crc = 0;
        for i in 0..blocks_for(length) {
            let len = block_len(length, i);
            let bs = i as u64 * u64::from(BLOCK_BYTES);
            let be = bs + u64::from(len);
            let old_valid = if keep_old { block_len(old_len, i) } else { 0 };
            let (os, oe) = match overlay {
                Overlay::None => (be, be),
                Overlay::Bytes { offset, data } => {
                    let end = offset + data.len() as u64;
                    (offset.clamp(bs, be), end.clamp(bs, be))
                }
                Overlay::Zeros { start, end } => (start.clamp(bs, be), end.clamp(bs, be)),
            };
            let touched = os < oe;
            let block = match overlay {
                Overlay::Bytes { offset, data } if os == bs && oe == be => {
                    let (start, end) = ((bs - offset) as usize, (be - offset) as usize);
                    let crc = crc_fast::crc32_iscsi(&data[start..end]);
                    payload_crc = crc::combine(payload_crc, crc, end - start);
                    (Content::Payload { start, end }, crc)
                }
                Overlay::Zeros { .. } if os == bs && oe == be => (Content::Zero, zero_crc(len)),
                _ if !touched && old_valid == len => (Content::Keep(old[i]), old[i].crc),
                _ if !touched && old_valid == 0 => (Content::Zero, zero_crc(len)),
                _ => {
                    let keep = old_valid.min(len);
                    let (kept, _) =
                        self.read_range(id, old, old_len, bs as u32, bs as u32 + keep)?;
                    let mut bytes = kept.to_vec();
                    bytes.resize(len as usize, 0);
                    let piece = (os - bs) as usize..(oe - bs) as usize;
                    match overlay {
                        Overlay::Bytes { offset, data } if touched => {
                            let src = &data[(os - offset) as usize..(oe - offset) as usize];
                            let crc = crc_fast::crc32_iscsi(src);
                            payload_crc = crc::combine(payload_crc, crc, src.len());
                            bytes[piece].copy_from_slice(src);
                        }
                        Overlay::Zeros { .. } => bytes[piece].fill(0),
                        _ => {}
                    }
                    let crc = crc_fast::crc32_iscsi(&bytes);
                    (Content::Owned(bytes), crc)
                }
            };
            blocks.push(block);
        }
        Ok(Some((Plan { length, blocks }, payload_crc)))
    }

    // ---- writes ----

    /// Stage a write of `data` at `offset` as pending version `update_ver`:
    /// the committed bytes with `data` over them, zero-filling any gap. The
    /// committed version stays readable until [`ChunkEngine::commit`].
    /// A retry of the same pending (or already committed) write succeeds.
    pub fn write_pending(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        offset: u32,
        data: &[u8],
        chunk_size: u32,
    ) -> ChunkResult<ChunkMeta> {
        self.write_inner(id, update_ver, chain_ver, offset, data, chunk_size, None)
    }

    /// [`ChunkEngine::write_pending`] of a payload that must have CRC32C
    /// `crc` (as sent over the network): checked in the same pass that
    /// checksums the blocks, before anything is written;
    /// [`ChunkError::PayloadChecksum`] otherwise.
    #[allow(clippy::too_many_arguments)]
    pub fn write_pending_checked(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        offset: u32,
        data: &[u8],
        chunk_size: u32,
        crc: u32,
    ) -> ChunkResult<ChunkMeta> {
        self.write_inner(
            id,
            update_ver,
            chain_ver,
            offset,
            data,
            chunk_size,
            Some(crc),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write_inner(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        offset: u32,
        data: &[u8],
        chunk_size: u32,
        sent_crc: Option<u32>,
    ) -> ChunkResult<ChunkMeta> {
        self.check_write_range(id, offset, data, chunk_size)?;
        let change = Change::Write { offset, data };
        self.stage_pending(id, update_ver, chain_ver, change, sent_crc, None)
            .map(|meta| meta.expect("a write leaves a chunk"))
    }

    /// `OutOfRange` unless `data` at `offset` fits a chunk of `chunk_size`.
    fn check_write_range(
        &self,
        id: ChunkId,
        offset: u32,
        data: &[u8],
        chunk_size: u32,
    ) -> ChunkResult<()> {
        let end = u64::from(offset) + data.len() as u64;
        let limit = chunk_size.min(self.chunk_size_max);
        if end > u64::from(limit) {
            return Err(ChunkError::OutOfRange {
                id,
                end,
                limit: limit.into(),
            });
        }
        Ok(())
    }

    /// `OutOfRange` unless a version of `length` bytes fits this target.
    fn check_length(&self, id: ChunkId, length: u64) -> ChunkResult<()> {
        if length > u64::from(self.chunk_size_max) {
            return Err(ChunkError::OutOfRange {
                id,
                end: length,
                limit: self.chunk_size_max.into(),
            });
        }
        Ok(())
    }

    /// Stage pending version `update_ver`: the committed bytes cut or
    /// zero-extended to `length`.
    pub fn truncate(
        &self,
        id: ChunkId,
        length: u32,
        update_ver: u64,
        chain_ver: u64,
    ) -> ChunkResult<ChunkMeta> {
        self.check_length(id, length.into())?;
        let change = Change::Truncate { length };
        self.stage_pending(id, update_ver, chain_ver, change, None, None)
            .map(|meta| meta.expect("a truncate leaves a chunk"))
    }

    /// Stage pending version `update_ver`: the committed bytes with
    /// `[offset, offset + len)` zeroed, clipped to the committed length (the
    /// chunk never grows). A missing chunk stays missing: `Ok(None)`.
    pub fn zero_pending(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        offset: u32,
        len: u32,
    ) -> ChunkResult<Option<ChunkMeta>> {
        let change = Change::Zero { offset, len };
        self.stage_pending(id, update_ver, chain_ver, change, None, None)
    }

    /// Stage pending version `update_ver` as exactly `data`, whatever the
    /// committed bytes (a re-driven version: it may be shorter than them).
    /// The payload must have CRC32C `crc`, checked as for
    /// [`ChunkEngine::write_pending_checked`].
    pub fn replace_pending_checked(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        data: &[u8],
        crc: u32,
    ) -> ChunkResult<ChunkMeta> {
        self.check_length(id, data.len() as u64)?;
        let change = Change::Replace { data };
        self.stage_pending(id, update_ver, chain_ver, change, Some(crc), None)
            .map(|meta| meta.expect("a replacement leaves a chunk"))
    }

    /// Stage the removal of `id` as pending version `update_ver`; its commit
    /// deletes the chunk. `Ok(None)` when the chunk is already absent.
    pub fn remove(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
    ) -> ChunkResult<Option<ChunkMeta>> {
        self.stage_pending(id, update_ver, chain_ver, Change::Remove, None, None)
    }

    /// Stage `update` as version `update_ver` and commit it, in one metadata
    /// commit: for the last member of a chain, after which nothing can
    /// refuse the version. Same checks and retry rules as the `*_pending`
    /// calls and [`ChunkEngine::commit`] one after the other, and the same
    /// result (`Ok(None)`: the chunk is absent afterwards) — but a crash
    /// leaves the chunk either at the old committed version or at the new
    /// one, never with `update_ver` pending: the new blocks are synced
    /// before the one commit that names them, as committed.
    pub fn apply_committed(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        update: ChunkUpdate<'_>,
    ) -> ChunkResult<Option<ChunkMeta>> {
        let (change, sent_crc) = self.checked_change(id, update)?;
        let keeps_absent = matches!(change, Change::Zero { .. } | Change::Remove);
        let _guard = self.lock(id);
        let record = self.load(id)?;
        if record.is_none() && keeps_absent {
            return Ok(None);
        }
        let prepared = &mut OnPrepared::none();
        let staged = self.stage(
            id, record, update_ver, chain_ver, change, sent_crc, prepared,
        )?;
        self.store_committed(id, staged, update_ver)
    }

    /// Stage `update` as pending version `update_ver`, with the checks,
    /// retry rules and results of the `*_pending` calls (`Ok(None)`: the
    /// chunk is absent and stays so). `prepared`, if given, is called once
    /// every check has passed and the version's slots are taken, before
    /// anything is written, and on every success but a retry of the version
    /// committed here (nothing to pass on then): from that call on, the
    /// stage can fail only as the disk does (a block write, an fsync, the
    /// metadata commit), never as a refusal of the version. A chain member
    /// forwards the version at that point, so its own disk work overlaps its
    /// successors'. A failure after that call takes the target out of
    /// service ([`ChunkEngine::fail`]) before the chunk is unlocked: the
    /// successors hold a version this copy lacks.
    pub fn apply_pending(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        update: ChunkUpdate<'_>,
        prepared: Option<&mut dyn FnMut()>,
    ) -> ChunkResult<Option<ChunkMeta>> {
        let (change, sent_crc) = self.checked_change(id, update)?;
        self.stage_pending(id, update_ver, chain_ver, change, sent_crc, prepared)
    }

    /// The one path of every `*_pending` call and [`ChunkEngine::apply_pending`]:
    /// `change` (its range already checked) staged as pending version
    /// `update_ver` under the chunk's lock; `Ok(None)` when a zeroing or
    /// removal finds the chunk absent.
    fn stage_pending(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        change: Change<'_>,
        sent_crc: Option<u32>,
        prepared: Option<&mut dyn FnMut()>,
    ) -> ChunkResult<Option<ChunkMeta>> {
        let mut prepared = match prepared {
            Some(f) => OnPrepared::new(f),
            None => OnPrepared::none(),
        };
        let keeps_absent = matches!(change, Change::Zero { .. } | Change::Remove);
        let _guard = self.lock(id);
        let record = self.load(id)?;
        if record.is_none() && keeps_absent {
            prepared.call();
            return Ok(None);
        }
        let staged = self
            .stage(
                id,
                record,
                update_ver,
                chain_ver,
                change,
                sent_crc,
                &mut prepared,
            )
            .and_then(|staged| match staged {
                // A retry of the committed version: nothing goes on.
                Staged::Existing(record) if record.meta.commit_ver >= update_ver => {
                    Ok(Some(record.meta))
                }
                staged => {
                    prepared.call();
                    self.store_pending(id, staged).map(Some)
                }
            });
        if let (Err(e), true) = (&staged, prepared.called) {
            // Successors may commit this version; this copy lacks it. Out
            // of service before the chunk's lock is released, so no reader
            // waiting for it sees the older version.
            self.fail(format!(
                "storing chunk {id} version {update_ver}: {}",
                crate::describe(e)
            ));
        }
        staged
    }

    /// The change `update` makes, once its range fits this target, and the
    /// payload CRC it was sent with.
    fn checked_change<'a>(
        &self,
        id: ChunkId,
        update: ChunkUpdate<'a>,
    ) -> ChunkResult<(Change<'a>, Option<u32>)> {
        Ok(match update {
            ChunkUpdate::Write {
                offset,
                data,
                chunk_size,
                crc,
            } => {
                self.check_write_range(id, offset, data, chunk_size)?;
                (Change::Write { offset, data }, Some(crc))
            }
            ChunkUpdate::Truncate { length } => {
                self.check_length(id, length.into())?;
                (Change::Truncate { length }, None)
            }
            ChunkUpdate::Zero { offset, len } => (Change::Zero { offset, len }, None),
            ChunkUpdate::Replace { data, crc } => {
                self.check_length(id, data.len() as u64)?;
                (Change::Replace { data }, Some(crc))
            }
            ChunkUpdate::Remove => (Change::Remove, None),
        })
    }

    /// For fault tests: while `errno` is set, every call at `point` fails
    /// with it, as on a failing (`EIO`) or full (`ENOSPC`) disk; nothing
    /// else is touched. A relaxed load per call when unused.
    pub fn inject_faults(&self, point: FaultPoint, errno: Option<i32>) {
        match point {
            FaultPoint::BlockWrite => {
                self.block_write_fault
                    .store(errno.unwrap_or(0), Ordering::Relaxed);
            }
            // Injected under the data file's own sync lock, where a real
            // failure is met.
            FaultPoint::DataSync => self.data.inject_sync_faults(errno),
            FaultPoint::UnsyncedCommit => {
                self.unsynced_commit_fault
                    .store(errno.unwrap_or(0), Ordering::Relaxed);
            }
        }
    }

    /// Takes this target out of service for good (until it is opened
    /// again): every operation refuses with [`ChunkError::Failed`] from now
    /// on. The first reason stays; the failure hook runs once.
    pub fn fail(&self, reason: String) {
        if self.failed.set(reason).is_ok() {
            tracing::error!(dir = %self.dir.display(), reason = %self.failed.get().expect("set"), "chunk engine out of service");
            if let Some(hook) = &*self.failure_hook.lock() {
                hook(self.failed.get().expect("set"));
            }
        }
    }

    /// Sets what to call, with the reason, when this target leaves service
    /// (in place of any earlier hook: the service that serves the target
    /// now). Called from the thread that failed it, so it must not block
    /// nor call into the engine. A target that failed before the call does
    /// not run it: check [`ChunkEngine::failure`] after.
    pub fn on_failure(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.failure_hook.lock() = Some(Box::new(hook));
    }

    /// Why this target left service, if it did (see [`ChunkEngine::fail`]).
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    fn check_in_service(&self) -> ChunkResult<()> {
        match self.failed.get() {
            Some(reason) => Err(ChunkError::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Store a staged version as pending.
    fn store_pending(&self, id: ChunkId, staged: Staged) -> ChunkResult<ChunkMeta> {
        let new = match staged {
            Staged::Existing(record) => return Ok(record.meta),
            Staged::New(new) => new,
        };
        // On failure the batch may still be visible, and after a restart
        // durable: its slots stay taken until the next open rebuilds the free
        // list from the records (a leak, never an overwrite).
        self.store(id, Some(&new))?;
        Ok(new.meta)
    }

    /// Store a staged version as committed: the single metadata commit
    /// switches from the old committed version straight to `update_ver`.
    fn store_committed(
        &self,
        id: ChunkId,
        staged: Staged,
        update_ver: u64,
    ) -> ChunkResult<Option<ChunkMeta>> {
        let new = match staged {
            Staged::Existing(record) => {
                return self.commit_loaded(id, record, update_ver, CommitSync::Wait)
            }
            Staged::New(new) => new,
        };
        assert!(
            new.meta.update_ver == update_ver,
            "{new:?} is not {update_ver}"
        );
        if new.meta.pending_remove {
            assert!(new.pending.is_empty(), "a removal has no blocks: {new:?}");
            self.store(id, None)?;
            self.release(new.slots().collect::<Vec<_>>());
            return Ok(None);
        }
        let done = new.promoted();
        assert!(done.meta.commit_ver == update_ver, "{done:?}");
        // On failure the batch may still be visible, and after a restart
        // durable: its slots stay taken until the next open rebuilds the free
        // list from the records (a leak, never an overwrite).
        self.store(id, Some(&done))?;
        self.release(only_in(&new.committed, &done.committed));
        Ok(Some(done.meta))
    }

    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        id: ChunkId,
        record: Option<Record>,
        update_ver: u64,
        chain_ver: u64,
        change: Change<'_>,
        sent_crc: Option<u32>,
        prepared: &mut OnPrepared<'_>,
    ) -> ChunkResult<Staged> {
        let meta = record.as_ref().map(|r| r.meta).unwrap_or_default();
        if chain_ver < meta.chain_ver {
            return Err(ChunkError::StaleChainVersion {
                id,
                chain_ver,
                stored: meta.chain_ver,
            });
        }
        if update_ver <= meta.commit_ver {
            if let (Some(sent), Change::Write { data, .. } | Change::Replace { data }) =
                (sent_crc, &change)
            {
                check_payload(id, sent, crc_fast::crc32_iscsi(data))?;
            }
            return self
                .check_committed_retry(id, record, update_ver, &change)
                .map(Staged::Existing);
        }
        let expected = meta.commit_ver + 1;
        if update_ver != expected {
            return Err(ChunkError::OutOfOrder {
                id,
                update_ver,
                expected,
            });
        }
        let plan = self.plan(id, record.as_ref(), &change)?;
        if let (Some(sent), Some((_, computed))) = (sent_crc, &plan) {
            check_payload(id, sent, *computed)?;
        }
        let plan = plan.map(|(plan, _)| plan);
        let pending_crc = plan.as_ref().map_or(0, Plan::crc);
        let pending_length = plan.as_ref().map_or(0, |p| p.length);
        let pending_remove = plan.is_none();
        if meta.is_dirty() {
            let same = meta.pending_remove == pending_remove
                && meta.pending_length == pending_length
                && meta.pending_crc == pending_crc;
            if same {
                let record = record.expect("a dirty chunk has a record");
                return Ok(Staged::Existing(record));
            }
            return Err(ChunkError::VersionConflict { id, update_ver });
        }
        let payload = match change {
            Change::Write { data, .. } | Change::Replace { data } => data,
            _ => &[],
        };
        let pending = match plan {
            Some(plan) => self.write_plan(id, plan, payload, prepared)?,
            None => Vec::new(),
        };
        let committed = record.map(|r| r.committed).unwrap_or_default();
        let new = Record {
            meta: ChunkMeta {
                update_ver,
                chain_ver,
                pending_length,
                pending_crc,
                pending_remove,
                ..meta
            },
            committed,
            pending,
        };
        debug_assert!(version_crc(&new.pending, pending_length) == pending_crc);
        Ok(Staged::New(new))
    }

    /// `update_ver <= commit_ver`: success only for a retry of the write that
    /// produced the committed version.
    fn check_committed_retry(
        &self,
        id: ChunkId,
        record: Option<Record>,
        update_ver: u64,
        change: &Change<'_>,
    ) -> ChunkResult<Record> {
        let meta = record.as_ref().map(|r| r.meta).unwrap_or_default();
        let stale = ChunkError::StaleVersion {
            id,
            update_ver,
            commit_ver: meta.commit_ver,
        };
        let Some(record) = record else {
            return Err(stale);
        };
        if update_ver != meta.commit_ver || meta.commit_ver == 0 {
            return Err(stale);
        }
        let (blocks, length) = (&record.committed, meta.length);
        let matches = match change {
            Change::Write { offset, data } => {
                let end = offset.saturating_add(data.len() as u32);
                let (got, _) = self.read_range(id, blocks, length, *offset, end)?;
                end <= length && got == *data
            }
            Change::Truncate { length } => meta.length == *length,
            Change::Zero { offset, len } => {
                let (start, end) = clip(length as usize, *offset, *len);
                let (got, _) = self.read_range(id, blocks, length, start as u32, end as u32)?;
                got.iter().all(|&b| b == 0)
            }
            Change::Replace { data } => self.committed_bytes(id, &record)? == *data,
            Change::Remove => false,
        };
        if matches {
            Ok(record)
        } else {
            Err(stale)
        }
    }

    /// Make pending version `update_ver` the committed one. Idempotent when
    /// `update_ver` is already committed. `Ok(None)` when the commit removed
    /// the chunk.
    pub fn commit(&self, id: ChunkId, update_ver: u64) -> ChunkResult<Option<ChunkMeta>> {
        let _guard = self.lock(id);
        let record = self.load(id)?.ok_or(ChunkError::NotFound { id })?;
        self.commit_loaded(id, record, update_ver, CommitSync::Wait)
    }

    /// [`ChunkEngine::commit`] without waiting for the metadata fsync: the
    /// switch is visible at once and durable with the next durable metadata
    /// commit of this target (any stage or [`ChunkEngine::commit`]). A crash of the machine before that leaves the version
    /// pending again, with its blocks intact (they were synced when it was
    /// staged): reads answer `NotCommitted` and the chain re-drives or
    /// resyncs it. The slots the switch frees are reused only once it is
    /// durable. Only for a version every member of the chain holds
    /// durably (a member commits after its successor did; the tail of a
    /// forwarded version after its stored notice), so a commit taken back
    /// is re-driven, never lost.
    pub fn commit_unsynced(&self, id: ChunkId, update_ver: u64) -> ChunkResult<Option<ChunkMeta>> {
        let _guard = self.lock(id);
        let record = self.load(id)?.ok_or(ChunkError::NotFound { id })?;
        self.commit_loaded(id, record, update_ver, CommitSync::Later)
    }

    /// [`ChunkEngine::commit_unsynced`] when it need not wait for disk work,
    /// for a caller on an async worker: `None`, having done nothing, when
    /// the chunk's lock is taken (a read or resync of the chunk may hold it
    /// through disk I/O), when a failed metadata write put reads behind
    /// fsyncs (see `load`), or when the metadata store may hold the commit
    /// back ([`EmbeddedEngine::writes_may_wait`]); the caller then runs
    /// `commit_unsynced` where blocking is fine.
    ///
    /// What runs: a metadata read (from memory, unless a memtable flush came
    /// between the version's stage and this commit), one unsynced batch, and
    /// the slots' lock to queue the freed slots, which a stage growing the
    /// data file holds through a `statvfs` and a `fallocate`. No fsync.
    pub fn try_commit_unsynced(
        &self,
        id: ChunkId,
        update_ver: u64,
    ) -> Option<ChunkResult<Option<ChunkMeta>>> {
        if self.kv.writes_may_wait() {
            return None;
        }
        let _guard = self.lock_of(id).try_lock()?;
        // Checked under the lock, right before the read it decides on.
        if self.kv_in_doubt.load(Ordering::Acquire) {
            return None;
        }
        let committed = self
            .check_in_service()
            .and_then(|()| self.load_snapshot(id))
            .and_then(|record| record.ok_or(ChunkError::NotFound { id }))
            .and_then(|record| self.commit_loaded(id, record, update_ver, CommitSync::Later));
        Some(committed)
    }

    /// [`ChunkEngine::commit`] of the just loaded `record`, under its lock.
    fn commit_loaded(
        &self,
        id: ChunkId,
        record: Record,
        update_ver: u64,
        sync: CommitSync,
    ) -> ChunkResult<Option<ChunkMeta>> {
        let meta = record.meta;
        if update_ver == meta.commit_ver {
            return Ok(Some(meta));
        }
        if update_ver < meta.commit_ver {
            return Err(ChunkError::StaleVersion {
                id,
                update_ver,
                commit_ver: meta.commit_ver,
            });
        }
        if !meta.is_dirty() || update_ver != meta.update_ver {
            return Err(ChunkError::NoPending {
                id,
                update_ver,
                commit_ver: meta.commit_ver,
                newest_ver: meta.update_ver,
            });
        }
        let new = (!meta.pending_remove).then(|| record.promoted());
        let freed = match &new {
            None => record.slots().collect::<Vec<_>>(),
            Some(new) => only_in(&record.committed, &new.committed),
        };
        match sync {
            CommitSync::Wait => {
                self.store(id, new.as_ref())?;
                self.release(freed);
            }
            CommitSync::Later => {
                let durable_at = self.store_unsynced(id, new.as_ref())?;
                self.release_after(durable_at, freed);
            }
        }
        Ok(new.map(|n| n.meta))
    }

    /// Drop the pending version of `id`, if any (a chain write failed). A
    /// chunk that never committed disappears.
    pub fn abort_pending(&self, id: ChunkId) -> ChunkResult<()> {
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(());
        };
        let meta = record.meta;
        if !meta.is_dirty() {
            return Ok(());
        }
        if meta.commit_ver == 0 {
            self.store(id, None)?;
        } else {
            let new = Record {
                meta: ChunkMeta {
                    update_ver: meta.commit_ver,
                    pending_length: meta.length,
                    pending_crc: meta.crc,
                    pending_remove: false,
                    ..meta
                },
                committed: record.committed.clone(),
                pending: Vec::new(),
            };
            self.store(id, Some(&new))?;
        }
        self.release(only_in(&record.pending, &record.committed));
        Ok(())
    }

    /// Replace `id` wholesale with the committed version `meta`/`bytes` (resync),
    /// dropping any pending version. The bytes must match `meta.length` and
    /// `meta.crc`; `meta`'s pending fields are ignored.
    pub fn install(&self, id: ChunkId, meta: ChunkMeta, bytes: &[u8]) -> ChunkResult<ChunkMeta> {
        let plan = self.whole_version_plan(id, &meta, bytes)?;
        let _guard = self.lock(id);
        let old = self.load(id)?;
        self.store_whole(id, old, meta, plan, bytes)
    }

    /// Replace the blocks of `id`'s committed version with `bytes`, a copy
    /// of that version from another replica, after its own blocks failed
    /// their checksum. Only while the record is still `expected` (the
    /// same committed version, nothing pending) and `bytes` match its
    /// length and CRC: `Ok(false)`, with nothing done, when the record
    /// changed meanwhile (a new version, a removal).
    pub fn repair_committed(
        &self,
        id: ChunkId,
        expected: &ChunkMeta,
        bytes: &[u8],
    ) -> ChunkResult<bool> {
        let plan = self.whole_version_plan(id, expected, bytes)?;
        let _guard = self.lock(id);
        let Some(old) = self.load(id)? else {
            return Ok(false);
        };
        if old.meta != *expected || old.meta.is_dirty() {
            return Ok(false);
        }
        self.store_whole(id, Some(old), *expected, plan, bytes)?;
        Ok(true)
    }

    /// The plan of a whole committed version `meta` with contents `bytes`,
    /// once they match.
    fn whole_version_plan(&self, id: ChunkId, meta: &ChunkMeta, bytes: &[u8]) -> ChunkResult<Plan> {
        if bytes.len() as u64 > u64::from(self.chunk_size_max) {
            return Err(ChunkError::OutOfRange {
                id,
                end: bytes.len() as u64,
                limit: self.chunk_size_max.into(),
            });
        }
        let change = Change::Replace { data: bytes };
        let (plan, actual_crc) = self
            .plan(id, None, &change)?
            .expect("a replacement has bytes");
        if bytes.len() as u64 != u64::from(meta.length) || actual_crc != meta.crc {
            return Err(ChunkError::InstallMismatch {
                id,
                expected_len: meta.length,
                actual_len: bytes.len() as u64,
                expected_crc: meta.crc,
                actual_crc,
            });
        }
        if meta.commit_ver == 0 {
            return Err(ChunkError::OutOfOrder {
                id,
                update_ver: 0,
                expected: 1,
            });
        }
        Ok(plan)
    }

    /// Store `bytes` (planned by `whole_version_plan`) as `id`'s only
    /// version, committed at `meta`, in place of `old`. The caller holds the
    /// chunk's lock.
    fn store_whole(
        &self,
        id: ChunkId,
        old: Option<Record>,
        meta: ChunkMeta,
        plan: Plan,
        bytes: &[u8],
    ) -> ChunkResult<ChunkMeta> {
        let committed = self.write_plan(id, plan, bytes, &mut OnPrepared::none())?;
        let new = Record {
            meta: ChunkMeta {
                update_ver: meta.commit_ver,
                pending_length: meta.length,
                pending_crc: meta.crc,
                pending_remove: false,
                ..meta
            },
            committed,
            pending: Vec::new(),
        };
        // On failure the batch may still be visible, and after a restart
        // durable: its slots stay taken until the next open rebuilds the free
        // list from the records (a leak, never an overwrite).
        self.store(id, Some(&new))?;
        if let Some(old) = old {
            self.release(old.slots().collect::<Vec<_>>());
        }
        Ok(new.meta)
    }

    /// Delete every chunk of `inode` (garbage collection of a deleted file),
    /// whatever their versions. Returns how many chunks were removed.
    pub fn remove_inode(&self, inode: u64) -> ChunkResult<usize> {
        let chunks = self.list_inode(inode)?;
        for (id, _) in &chunks {
            let _guard = self.lock(*id);
            let Some(record) = self.load(*id)? else {
                continue;
            };
            self.store(*id, None)?;
            self.release(record.slots().collect::<Vec<_>>());
        }
        Ok(chunks.len())
    }

    // ---- reads ----

    /// Read up to `len` committed bytes at `offset`, clipped to the committed
    /// length. `NotCommitted` when a pending version exists.
    pub fn read(&self, id: ChunkId, offset: u32, len: u32) -> ChunkResult<(Vec<u8>, ChunkMeta)> {
        self.read_with_crc(id, offset, len)
            .map(|(bytes, meta, _)| (bytes.to_vec(), meta))
    }

    /// [`ChunkEngine::read`], also returning the CRC32C of the bytes (from the
    /// block CRCs when the range is whole blocks, so the bytes are
    /// checksummed once), and the bytes as read from the disk (into aligned
    /// memory, not copied since).
    pub fn read_with_crc(
        &self,
        id: ChunkId,
        offset: u32,
        len: u32,
    ) -> ChunkResult<(Bytes, ChunkMeta, u32)> {
        let _guard = self.lock(id);
        let record = self.load(id)?.ok_or(ChunkError::NotFound { id })?;
        if record.meta.is_dirty() {
            return Err(ChunkError::NotCommitted {
                id,
                committed_ver: record.meta.commit_ver,
                update_ver: record.meta.update_ver,
            });
        }
        self.read_committed(id, &record, offset, len)
    }

    /// Like [`ChunkEngine::read`], but returns the committed version even when
    /// a pending one exists (the CRAQ tail, a resync source).
    pub fn read_committed_even_if_dirty(
        &self,
        id: ChunkId,
        offset: u32,
        len: u32,
    ) -> ChunkResult<(Bytes, ChunkMeta)> {
        let _guard = self.lock(id);
        let record = self.load(id)?.ok_or(ChunkError::NotFound { id })?;
        self.read_committed(id, &record, offset, len)
            .map(|(bytes, meta, _)| (bytes, meta))
    }

    fn read_committed(
        &self,
        id: ChunkId,
        record: &Record,
        offset: u32,
        len: u32,
    ) -> ChunkResult<(Bytes, ChunkMeta, u32)> {
        if record.meta.commit_ver == 0 {
            return Err(ChunkError::NotFound { id });
        }
        let length = record.meta.length;
        let start = offset.min(length);
        let end = offset.saturating_add(len).min(length);
        let (bytes, crc) = self.read_range(id, &record.committed, length, start, end)?;
        Ok((bytes, record.meta, crc))
    }

    /// The whole pending version of `id` (CRC verified) with its metadata, or
    /// `None` when no pending version exists or it is a removal. The CRAQ head
    /// re-drives it down the chain after a failed forward.
    pub fn read_pending(&self, id: ChunkId) -> ChunkResult<Option<(Bytes, ChunkMeta)>> {
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        if !record.meta.is_dirty() || record.meta.pending_remove {
            return Ok(None);
        }
        let bytes = self.pending_bytes(id, &record)?;
        Ok(Some((bytes, record.meta)))
    }

    /// The whole bytes of version `ver` of `id` (CRC verified), whether it is
    /// the committed or the pending one; `None` when the chunk has no such
    /// version or it is a removal.
    pub fn read_version(&self, id: ChunkId, ver: u64) -> ChunkResult<Option<Bytes>> {
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        let m = record.meta;
        if ver == m.commit_ver && m.commit_ver > 0 {
            return self.committed_bytes(id, &record).map(Some);
        }
        if ver != m.update_ver || !m.is_dirty() || m.pending_remove {
            return Ok(None);
        }
        self.pending_bytes(id, &record).map(Some)
    }

    /// The metadata of `id`, if it exists.
    pub fn meta(&self, id: ChunkId) -> ChunkResult<Option<ChunkMeta>> {
        // Under the lock, so `load` sees no store still waiting for its fsync.
        let _guard = self.lock(id);
        Ok(self.load(id)?.map(|r| r.meta))
    }

    /// Every chunk of the target in id order (resync compares these).
    pub fn list(&self) -> ChunkResult<Vec<(ChunkId, ChunkMeta)>> {
        let mut out = Vec::new();
        self.scan(vec![KEY_PREFIX], vec![KEY_PREFIX + 1], |id, r| {
            out.push((id, r.meta))
        })?;
        Ok(out)
    }

    /// Every chunk of `inode` in index order.
    pub fn list_inode(&self, inode: u64) -> ChunkResult<Vec<(ChunkId, ChunkMeta)>> {
        let begin = inode_prefix(inode);
        let end = r3fs_kv::prefix_end(&begin).unwrap_or_else(|| vec![KEY_PREFIX + 1]);
        let mut out = Vec::new();
        self.scan(begin, end, |id, r| out.push((id, r.meta)))?;
        Ok(out)
    }

    /// At most `limit` chunks of `inode` with index `from_index` or higher,
    /// in index order, read in one KV transaction; and whether more may follow.
    pub fn list_inode_from(
        &self,
        inode: u64,
        from_index: u64,
        limit: usize,
    ) -> ChunkResult<(Vec<(ChunkId, ChunkMeta)>, bool)> {
        let begin = chunk_key(ChunkId {
            inode,
            index: from_index,
        })
        .to_vec();
        let prefix = inode_prefix(inode);
        let end = r3fs_kv::prefix_end(&prefix).unwrap_or_else(|| vec![KEY_PREFIX + 1]);
        let opts = RangeOptions {
            limit: limit.clamp(1, LIST_BATCH_CHUNKS),
            reverse: false,
            snapshot: true,
        };
        let batch = r3fs_kv::run(&self.kv, RetryPolicy::default(), |txn| {
            Ok::<_, ChunkError>(txn.get_range(&begin, &end, opts)?)
        })?;
        let mut out = Vec::with_capacity(batch.kvs.len());
        for kv in &batch.kvs {
            let Some(id) = decode_key(&kv.key) else {
                tracing::warn!(key = ?kv.key, "unknown key in chunk metadata");
                continue;
            };
            out.push((id, decode_record(id, &kv.value)?.meta));
        }
        Ok((out, batch.more))
    }

    /// The chunk of `inode` with the highest index (settles the file length).
    pub fn last_chunk(&self, inode: u64) -> ChunkResult<Option<(ChunkId, ChunkMeta)>> {
        let begin = inode_prefix(inode);
        let end = r3fs_kv::prefix_end(&begin).unwrap_or_else(|| vec![KEY_PREFIX + 1]);
        let opts = RangeOptions {
            limit: 1,
            reverse: true,
            snapshot: true,
        };
        let batch = r3fs_kv::run(&self.kv, RetryPolicy::default(), |txn| {
            Ok::<_, ChunkError>(txn.get_range(&begin, &end, opts)?)
        })?;
        let Some(kv) = batch.kvs.first() else {
            return Ok(None);
        };
        let Some(id) = decode_key(&kv.key) else {
            return Ok(None);
        };
        Ok(Some((id, decode_record(id, &kv.value)?.meta)))
    }
}

/// Slots of `a` that `b` does not name (what a version switch frees).
fn only_in(a: &[BlockRef], b: &[BlockRef]) -> Vec<u64> {
    let keep: HashSet<u64> = b.iter().map(|r| r.block).collect();
    a.iter()
        .map(|r| r.block)
        .filter(|s| *s != BLOCK_ZERO && !keep.contains(s))
        .collect()
}

fn check_payload(id: ChunkId, sent: u32, computed: u32) -> ChunkResult<()> {
    if sent != computed {
        return Err(ChunkError::PayloadChecksum { id, sent, computed });
    }
    Ok(())
}

/// `[offset, offset + len)` clipped to `[0, length)`, as indices.
fn clip(length: usize, offset: u32, len: u32) -> (usize, usize) {
    let end = (u64::from(offset) + u64::from(len)).min(length as u64) as usize;
    let start = (offset as usize).min(end);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write of `data` at the start of a one-block chunk.
    fn write_at_start(data: &[u8]) -> ChunkUpdate<'_> {
        ChunkUpdate::Write {
            offset: 0,
            data,
            chunk_size: BLOCK_BYTES,
            crc: crc_fast::crc32_iscsi(data),
        }
    }

    #[test]
    fn unsynced_frees_queued_out_of_version_order_wait_for_the_later_version() {
        // Two commits read their versions outside the slots lock, so the
        // later one may queue first.
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = ChunkEngine::open(dir.path(), BLOCK_BYTES).expect("open");
        engine.slots.lock().end = 4;
        let base = engine.kv.committed_version();
        engine.release_after(base + 2, vec![0, 1]);
        engine.release_after(base + 1, vec![2]);
        let queued: Vec<u64> = engine
            .slots
            .lock()
            .unsynced
            .iter()
            .map(|(v, _)| *v)
            .collect();
        assert_eq!(queued, [base + 2, base + 2]);
        assert_eq!(engine.slot_stats(), SlotStats { total: 4, free: 3 });
    }

    #[test]
    fn keys_round_trip_and_sort_by_inode_then_index() {
        let a = ChunkId {
            inode: 1,
            index: 300,
        };
        let b = ChunkId { inode: 2, index: 0 };
        assert_eq!(decode_key(&chunk_key(a)), Some(a));
        assert!(chunk_key(a) < chunk_key(b));
        assert_eq!(decode_key(b"short"), None);
    }

    #[test]
    fn block_lengths_and_version_crc_match_the_whole_bytes() {
        let length = 2 * BLOCK_BYTES + 5;
        assert_eq!(blocks_for(length), 3);
        assert_eq!(blocks_for(0), 0);
        assert_eq!(block_len(length, 1), BLOCK_BYTES);
        assert_eq!(block_len(length, 2), 5);
        let bytes: Vec<u8> = (0..length).map(|i| (i * 7) as u8).collect();
        let blocks: Vec<BlockRef> = bytes
            .chunks(BLOCK_BYTES as usize)
            .map(|c| BlockRef {
                block: 0,
                crc: crc_fast::crc32_iscsi(c),
            })
            .collect();
        assert_eq!(version_crc(&blocks, length), crc_fast::crc32_iscsi(&bytes));
        assert_eq!(zero_crc(10), crc_fast::crc32_iscsi(&[0u8; 10]));
    }

    #[test]
    fn loads_after_a_failed_store_read_through_a_durable_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = ChunkEngine::open(dir.path(), BLOCK_BYTES).expect("open");
        let id = ChunkId { inode: 1, index: 0 };
        engine
            .apply_committed(id, 1, 1, write_at_start(b"one"))
            .expect("v1");
        let fast = engine.load(id).expect("snapshot load");
        // What a failed metadata commit leaves behind: every later load
        // commits its read, and sees the same records.
        engine.kv_in_doubt.store(true, Ordering::Release);
        assert_eq!(engine.load(id).expect("durable load"), fast);
        let meta = engine
            .apply_committed(id, 2, 1, write_at_start(b"two"))
            .expect("v2");
        assert_eq!(meta.map(|m| m.commit_ver), Some(2));
        let (bytes, _) = engine.read(id, 0, 3).expect("read");
        assert_eq!(bytes, b"two");
    }

    #[test]
    fn an_unsynced_commit_runs_in_place_only_when_nothing_would_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = ChunkEngine::open(dir.path(), BLOCK_BYTES).expect("open");
        let id = ChunkId { inode: 3, index: 1 };
        engine
            .apply_pending(id, 1, 1, write_at_start(b"one"), None)
            .expect("stage v1");
        // The chunk's lock is taken (a read of it, say): nothing happens.
        {
            let _held = engine.lock(id);
            assert!(engine.try_commit_unsynced(id, 1).is_none());
        }
        assert_eq!(
            engine.meta(id).expect("meta").map(|m| m.commit_ver),
            Some(0)
        );
        let meta = engine
            .try_commit_unsynced(id, 1)
            .expect("nothing to wait for")
            .expect("commit v1");
        assert_eq!(meta.map(|m| (m.commit_ver, m.update_ver)), Some((1, 1)));
        // Errors come back as `commit_unsynced` gives them.
        let stale = engine.try_commit_unsynced(id, 0).expect("runs");
        assert!(
            matches!(stale, Err(ChunkError::StaleVersion { .. })),
            "{stale:?}"
        );
        let absent = ChunkId { inode: 3, index: 2 };
        let missing = engine.try_commit_unsynced(absent, 1).expect("runs");
        assert!(
            matches!(missing, Err(ChunkError::NotFound { .. })),
            "{missing:?}"
        );
        // After a failed metadata write, loads wait for fsyncs: not here.
        engine
            .apply_pending(id, 2, 1, write_at_start(b"two"), None)
            .expect("stage v2");
        engine.kv_in_doubt.store(true, Ordering::Release);
        assert!(engine.try_commit_unsynced(id, 2).is_none());
        let meta = engine.meta(id).expect("meta").expect("chunk");
        assert_eq!((meta.commit_ver, meta.update_ver), (1, 2), "left pending");
        let meta = engine
            .commit_unsynced(id, 2)
            .expect("commit v2 the slow way");
        assert_eq!(meta.map(|m| m.commit_ver), Some(2));
        let (bytes, _) = engine.read(id, 0, 3).expect("read");
        assert_eq!(bytes, b"two");
    }

    #[test]
    fn only_in_lists_slots_a_version_switch_frees() {
        let r = |block| BlockRef { block, crc: 0 };
        let old = [r(1), r(2), r(BLOCK_ZERO), r(3)];
        let new = [r(1), r(7), r(3)];
        assert_eq!(only_in(&old, &new), vec![2]);
        assert_eq!(only_in(&new, &old), vec![7]);
    }
}
