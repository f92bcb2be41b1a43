//! The chunk engine of one storage target: chunk bytes and their CRAQ versions
//! (one committed, at most one pending) in one directory.
//!
//! Must not touch the network, chains or mgmtd: it never forwards a write,
//! never learns who the chain's head or tail is, and never opens any KV store
//! but its own `meta` directory. Chain versions and update versions come from
//! the caller (the CRAQ layer) and are only compared and recorded here.
//!
//! # Layout
//! - `<dir>/meta`: an [`EmbeddedEngine`] (durability `Sync`) holding one
//!   record per chunk under key `b'c' ++ inode (BE) ++ index (BE)`: its
//!   [`ChunkMeta`] plus the file ids of the committed and the pending version.
//! - `<dir>/data/<inode:016x>/<index:016x>.<file:016x>`: the full bytes of one
//!   version of one chunk. File ids are unique within the target and never
//!   reused while the engine runs, so a referenced file is never overwritten.
//!
//! # Crash safety
//! A new version (write, truncate, zeroing, whole replacement, install) is
//! written to a *fresh* file,
//! `fsync`ed together with its directory, and only then referenced by a
//! metadata commit. The metadata commit is the atomic switch: `commit` changes
//! only metadata (the pending file becomes the committed one), so after a crash
//! the KV record names either the old committed file plus the pending one, or
//! the new committed file; both are complete and durable. Superseded files are
//! deleted after the metadata commit; `open` deletes every version file that
//! no record references (leftovers of a crash or of a failed delete).
//! Pending versions survive a reopen as pending (as in 3FS).
//!
//! # Concurrency
//! Every operation on a chunk holds that chunk's lock (one of [`LOCK_SHARDS`]
//! mutexes, chosen by hashing the id), so calls on one chunk are serialized
//! and calls on different chunks run in parallel. Reads take the lock too:
//! a commit deletes the file a concurrent read would open.
//!
//! # Removal
//! [`ChunkEngine::remove`] stages a pending *removal* (a tombstone: no file,
//! `ChunkMeta::pending_remove`); its [`ChunkEngine::commit`] deletes the
//! record and the files and returns `Ok(None)`. A removed chunk is simply
//! absent: `remove` of an absent chunk succeeds (idempotent), while `commit`
//! of an absent chunk is `NotFound` (the caller treats that as done for a
//! retried removal).
//!
//! # Limits
//! A chunk holds at most [`CHUNK_BYTES_MAX`] bytes (and at most the
//! `chunk_size_max` given to [`ChunkEngine::open`]); every read and write
//! loads the whole committed chunk to verify its CRC32C, so memory per call is
//! bounded by twice the chunk size. Listing reads [`LIST_BATCH_CHUNKS`] records
//! per KV transaction.
//!
//! # Full disks
//! A new version file is refused with [`ChunkError::NoSpace`] when writing
//! it would leave less than [`SPACE_RESERVE_BYTES`] free, so the metadata
//! store (whose journal poisons itself on a failed write) keeps room for the
//! commits, aborts and removals that follow, and nothing committed is lost.
//! An `ENOSPC` (or `EDQUOT`) from a data file is `NoSpace` too; one from the
//! KV journal (another process filled the disk) arrives as `Kv` unless its
//! message names OS error 28.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use r3fs_kv::embedded::{EmbeddedConfig, EmbeddedEngine};
use r3fs_kv::{AsKvError, KvError, RangeOptions, RetryPolicy};
use serde::{Deserialize, Serialize};

/// Largest chunk any target accepts.
pub const CHUNK_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Number of chunk locks; chunks hash onto them.
pub const LOCK_SHARDS: usize = 1024;
/// Records read per KV transaction when listing.
pub const LIST_BATCH_CHUNKS: usize = 4096;
/// Free bytes a new version file must leave on the target's file system.
/// The metadata store shares that file system, and a failed journal write
/// poisons it until the target reopens, so chunk data must meet a full disk
/// first: then commits, aborts and removals still have room.
pub const SPACE_RESERVE_BYTES: u64 = 4 * 1024 * 1024;

const META_DIR: &str = "meta";
const DATA_DIR: &str = "data";
const KEY_PREFIX: u8 = b'c';
const KEY_BYTES: usize = 17;
/// No file: no committed bytes yet, or a pending removal.
const FILE_NONE: u64 = 0;
/// Attempts to create a version file when a concurrent `remove_inode`
/// deleted the inode's directory in between.
const CREATE_ATTEMPTS_MAX: u32 = 3;
/// OS error 28 as the KV engine prints it.
const KV_NO_SPACE_MARKER: &str = "os error 28";

const _: () = assert!(KEY_BYTES == 1 + 8 + 8);
const _: () = assert!(LOCK_SHARDS.is_power_of_two());

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

/// What a chunk operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {id} not found")]
    NotFound { id: ChunkId },
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
    #[error("chunk {id}: undecodable metadata record: {reason}")]
    BadMeta { id: ChunkId, reason: String },
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
            let no_space = matches!(&source, KvError::Engine(m) if m.contains(KV_NO_SPACE_MARKER));
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

/// The stored record of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    meta: ChunkMeta,
    /// File of the committed version, `FILE_NONE` when `commit_ver == 0`.
    committed_file: u64,
    /// File of the pending version, `FILE_NONE` without one or for a removal.
    pending_file: u64,
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
        assert!(
            (m.commit_ver == 0) == (self.committed_file == FILE_NONE),
            "{self:?}"
        );
        if m.is_dirty() {
            assert!(
                m.pending_remove == (self.pending_file == FILE_NONE),
                "{self:?}"
            );
        } else {
            assert!(
                self.pending_file == FILE_NONE,
                "clean with pending file: {self:?}"
            );
            assert!(!m.pending_remove, "clean with pending removal: {self:?}");
            assert!(
                m.pending_length == m.length,
                "clean, lengths differ: {self:?}"
            );
            assert!(m.pending_crc == m.crc, "clean, crcs differ: {self:?}");
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

fn decode_record(id: ChunkId, value: &[u8]) -> ChunkResult<Record> {
    let record: Record = postcard::from_bytes(value).map_err(|e| ChunkError::BadMeta {
        id,
        reason: e.to_string(),
    })?;
    record.check();
    Ok(record)
}

/// Parse `<index:016x>.<file:016x>`.
fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let (index, file) = name.split_once('.')?;
    let index = u64::from_str_radix(index, 16).ok()?;
    let file = u64::from_str_radix(file, 16).ok()?;
    Some((index, file))
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

/// The store of one storage target. See the module docs.
pub struct ChunkEngine {
    dir: PathBuf,
    meta_dir: PathBuf,
    data_dir: PathBuf,
    chunk_size_max: u32,
    kv: EmbeddedEngine,
    locks: Box<[Mutex<()>]>,
    /// Serializes creating and removing inode directories.
    dir_lock: Mutex<()>,
    next_file: AtomicU64,
}

impl fmt::Debug for ChunkEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkEngine")
            .field("dir", &self.dir)
            .field("chunk_size_max", &self.chunk_size_max)
            .finish_non_exhaustive()
    }
}

impl ChunkEngine {
    /// Open (or create) the target in `dir`, deleting version files that no
    /// metadata record references.
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
        fs::create_dir_all(&data_dir).map_err(|e| io_error(None, &data_dir, e))?;
        sync_dir(None, &dir)?;
        let kv = EmbeddedEngine::open(EmbeddedConfig::new(&meta_dir))?;
        let locks = (0..LOCK_SHARDS).map(|_| Mutex::new(())).collect();
        let engine = ChunkEngine {
            dir,
            meta_dir,
            data_dir,
            chunk_size_max,
            kv,
            locks,
            dir_lock: Mutex::new(()),
            next_file: AtomicU64::new(FILE_NONE + 1),
        };
        engine.remove_orphans()?;
        Ok(engine)
    }

    /// The largest chunk this target accepts.
    pub fn chunk_size_max(&self) -> u32 {
        self.chunk_size_max
    }

    fn remove_orphans(&self) -> ChunkResult<()> {
        let mut referenced = HashSet::new();
        let mut file_max = FILE_NONE;
        self.scan(vec![KEY_PREFIX], vec![KEY_PREFIX + 1], |_, record| {
            for file in [record.committed_file, record.pending_file] {
                if file != FILE_NONE {
                    referenced.insert(file);
                    file_max = file_max.max(file);
                }
            }
        })?;
        let read_dir = |d: &Path| fs::read_dir(d).map_err(|e| io_error(None, d, e));
        for inode_entry in read_dir(&self.data_dir)? {
            let inode_entry = inode_entry.map_err(|e| io_error(None, &self.data_dir, e))?;
            let inode_dir = inode_entry.path();
            if !inode_dir.is_dir() {
                continue;
            }
            for entry in read_dir(&inode_dir)? {
                let path = entry.map_err(|e| io_error(None, &inode_dir, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let Some((_, file)) = parse_file_name(name) else {
                    tracing::warn!(path = %path.display(), "unknown file in chunk data directory");
                    continue;
                };
                file_max = file_max.max(file);
                if !referenced.contains(&file) {
                    tracing::info!(path = %path.display(), "removing orphan chunk version file");
                    fs::remove_file(&path).map_err(|e| io_error(None, &path, e))?;
                }
            }
            // Fails (harmlessly) unless the directory is now empty.
            let _ = fs::remove_dir(&inode_dir);
        }
        self.next_file.store(file_max + 1, Ordering::Relaxed);
        Ok(())
    }

    fn lock(&self, id: ChunkId) -> MutexGuard<'_, ()> {
        let hash = (id.inode.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.index)
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let shard = (hash >> 32) as usize & (LOCK_SHARDS - 1);
        self.locks[shard].lock()
    }

    fn inode_dir(&self, inode: u64) -> PathBuf {
        self.data_dir.join(format!("{inode:016x}"))
    }

    fn file_path(&self, id: ChunkId, file: u64) -> PathBuf {
        self.inode_dir(id.inode)
            .join(format!("{:016x}.{file:016x}", id.index))
    }

    /// The file holding version `ver` (committed or pending) of `id`, for
    /// tests and tools (say, to damage it on purpose); `None` when no such
    /// version has a file. Never write to it.
    pub fn data_path(&self, id: ChunkId, ver: u64) -> ChunkResult<Option<PathBuf>> {
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        let file = if ver == record.meta.commit_ver {
            record.committed_file
        } else if ver == record.meta.update_ver {
            record.pending_file
        } else {
            FILE_NONE
        };
        Ok((file != FILE_NONE).then(|| self.file_path(id, file)))
    }

    // ---- metadata ----

    fn load(&self, id: ChunkId) -> ChunkResult<Option<Record>> {
        let key = chunk_key(id);
        let value = r3fs_kv::run(&self.kv, RetryPolicy::default(), |txn| {
            Ok::<_, ChunkError>(txn.snapshot_get(&key)?)
        })
        .map_err(|e| with_id(id, &self.meta_dir, e))?;
        value.map(|v| decode_record(id, &v)).transpose()
    }

    /// Store (or with `None`, delete) the record of `id`: the atomic switch.
    fn store(&self, id: ChunkId, record: Option<&Record>) -> ChunkResult<()> {
        if let Some(record) = record {
            record.check();
        }
        let key = chunk_key(id);
        let value =
            record
                .map(postcard::to_allocvec)
                .transpose()
                .map_err(|e| ChunkError::BadMeta {
                    id,
                    reason: e.to_string(),
                })?;
        r3fs_kv::run(&self.kv, RetryPolicy::default(), |txn| {
            match &value {
                Some(v) => txn.set(&key, v)?,
                None => txn.clear(&key)?,
            }
            Ok::<_, ChunkError>(())
        })
        .map_err(|e| with_id(id, &self.meta_dir, e))
    }

    /// Visit the records in `[begin, end)` in key order, a batch per transaction.
    fn scan(
        &self,
        mut begin: Vec<u8>,
        end: Vec<u8>,
        mut visit: impl FnMut(ChunkId, Record),
    ) -> ChunkResult<()> {
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

    // ---- files ----

    /// Write `bytes` to a fresh version file and make it durable.
    fn write_version_file(&self, id: ChunkId, bytes: &[u8]) -> ChunkResult<u64> {
        self.check_space(id, bytes.len() as u64)?;
        let file = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.file_path(id, file);
        let mut attempt = 0;
        let mut handle = loop {
            attempt += 1;
            self.ensure_inode_dir(id)?;
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(handle) => break handle,
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < CREATE_ATTEMPTS_MAX => {}
                Err(e) => return Err(io_error(Some(id), &path, e)),
            }
        };
        let written = handle.write_all(bytes).and_then(|()| handle.sync_all());
        if let Err(e) = written {
            drop(handle);
            let _ = fs::remove_file(&path);
            return Err(io_error(Some(id), &path, e));
        }
        sync_dir(Some(id), &self.inode_dir(id.inode))?;
        Ok(file)
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

    fn ensure_inode_dir(&self, id: ChunkId) -> ChunkResult<()> {
        let dir = self.inode_dir(id.inode);
        let _guard = self.dir_lock.lock();
        if dir.is_dir() {
            return Ok(());
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error(Some(id), &dir, e)),
        }
        sync_dir(Some(id), &self.data_dir)
    }

    /// Delete a superseded version file; a failure only leaves an orphan that
    /// the next `open` removes.
    fn delete_file(&self, id: ChunkId, file: u64) {
        if file == FILE_NONE {
            return;
        }
        let path = self.file_path(id, file);
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete superseded chunk version");
        }
    }

    /// The committed bytes of `record`, CRC verified; empty before the first commit.
    fn committed_bytes(&self, id: ChunkId, record: &Record) -> ChunkResult<Vec<u8>> {
        if record.committed_file == FILE_NONE {
            return Ok(Vec::new());
        }
        let path = self.file_path(id, record.committed_file);
        let bytes = fs::read(&path).map_err(|e| io_error(Some(id), &path, e))?;
        let actual = crc32c::crc32c(&bytes);
        let length_ok = bytes.len() == record.meta.length as usize;
        if actual != record.meta.crc || !length_ok {
            return Err(ChunkError::Corrupt {
                id,
                expected: record.meta.crc,
                actual,
            });
        }
        Ok(bytes)
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
        let end = u64::from(offset) + data.len() as u64;
        let limit = chunk_size.min(self.chunk_size_max);
        if end > u64::from(limit) {
            return Err(ChunkError::OutOfRange {
                id,
                end,
                limit: limit.into(),
            });
        }
        let _guard = self.lock(id);
        let record = self.load(id)?;
        self.stage(
            id,
            record,
            update_ver,
            chain_ver,
            Change::Write { offset, data },
        )
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
        if length > self.chunk_size_max {
            return Err(ChunkError::OutOfRange {
                id,
                end: length.into(),
                limit: self.chunk_size_max.into(),
            });
        }
        let _guard = self.lock(id);
        let record = self.load(id)?;
        self.stage(
            id,
            record,
            update_ver,
            chain_ver,
            Change::Truncate { length },
        )
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
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        self.stage(
            id,
            Some(record),
            update_ver,
            chain_ver,
            Change::Zero { offset, len },
        )
        .map(Some)
    }

    /// Stage pending version `update_ver` as exactly `data`, whatever the
    /// committed bytes (a re-driven version: it may be shorter than them).
    pub fn replace_pending(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
        data: &[u8],
    ) -> ChunkResult<ChunkMeta> {
        if data.len() as u64 > u64::from(self.chunk_size_max) {
            return Err(ChunkError::OutOfRange {
                id,
                end: data.len() as u64,
                limit: self.chunk_size_max.into(),
            });
        }
        let _guard = self.lock(id);
        let record = self.load(id)?;
        self.stage(id, record, update_ver, chain_ver, Change::Replace { data })
    }

    /// Stage the removal of `id` as pending version `update_ver`; its commit
    /// deletes the chunk. `Ok(None)` when the chunk is already absent.
    pub fn remove(
        &self,
        id: ChunkId,
        update_ver: u64,
        chain_ver: u64,
    ) -> ChunkResult<Option<ChunkMeta>> {
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        self.stage(id, Some(record), update_ver, chain_ver, Change::Remove)
            .map(Some)
    }

    fn stage(
        &self,
        id: ChunkId,
        record: Option<Record>,
        update_ver: u64,
        chain_ver: u64,
        change: Change<'_>,
    ) -> ChunkResult<ChunkMeta> {
        let meta = record.map(|r| r.meta).unwrap_or_default();
        if chain_ver < meta.chain_ver {
            return Err(ChunkError::StaleChainVersion {
                id,
                chain_ver,
                stored: meta.chain_ver,
            });
        }
        if update_ver <= meta.commit_ver {
            return self.check_committed_retry(id, record, update_ver, &change);
        }
        let expected = meta.commit_ver + 1;
        if update_ver != expected {
            return Err(ChunkError::OutOfOrder {
                id,
                update_ver,
                expected,
            });
        }
        let committed = match &record {
            Some(r) => self.committed_bytes(id, r)?,
            None => Vec::new(),
        };
        let new_bytes = apply(committed, &change);
        let pending_crc = new_bytes.as_deref().map_or(0, crc32c::crc32c);
        let pending_length = new_bytes.as_ref().map_or(0, |b| b.len() as u32);
        let pending_remove = new_bytes.is_none();
        if meta.is_dirty() {
            let same = meta.pending_remove == pending_remove
                && meta.pending_length == pending_length
                && meta.pending_crc == pending_crc;
            if same {
                return Ok(meta);
            }
            return Err(ChunkError::VersionConflict { id, update_ver });
        }
        let pending_file = match &new_bytes {
            Some(bytes) => self.write_version_file(id, bytes)?,
            None => FILE_NONE,
        };
        let new = Record {
            meta: ChunkMeta {
                update_ver,
                chain_ver,
                pending_length,
                pending_crc,
                pending_remove,
                ..meta
            },
            committed_file: record.map_or(FILE_NONE, |r| r.committed_file),
            pending_file,
        };
        if let Err(e) = self.store(id, Some(&new)) {
            self.delete_file(id, pending_file);
            return Err(e);
        }
        Ok(new.meta)
    }

    /// `update_ver <= commit_ver`: success only for a retry of the write that
    /// produced the committed version.
    fn check_committed_retry(
        &self,
        id: ChunkId,
        record: Option<Record>,
        update_ver: u64,
        change: &Change<'_>,
    ) -> ChunkResult<ChunkMeta> {
        let meta = record.map(|r| r.meta).unwrap_or_default();
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
        let matches = match change {
            Change::Write { offset, data } => {
                let committed = self.committed_bytes(id, &record)?;
                let start = *offset as usize;
                committed.get(start..start + data.len()) == Some(*data)
            }
            Change::Truncate { length } => meta.length == *length,
            Change::Zero { offset, len } => {
                let committed = self.committed_bytes(id, &record)?;
                let (start, end) = clip(committed.len(), *offset, *len);
                committed[start..end].iter().all(|&b| b == 0)
            }
            Change::Replace { data } => self.committed_bytes(id, &record)? == *data,
            Change::Remove => false,
        };
        if matches {
            Ok(meta)
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
        if meta.pending_remove {
            self.store(id, None)?;
            self.delete_file(id, record.committed_file);
            return Ok(None);
        }
        let new = Record {
            meta: ChunkMeta {
                commit_ver: meta.update_ver,
                length: meta.pending_length,
                crc: meta.pending_crc,
                ..meta
            },
            committed_file: record.pending_file,
            pending_file: FILE_NONE,
        };
        self.store(id, Some(&new))?;
        self.delete_file(id, record.committed_file);
        Ok(Some(new.meta))
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
                committed_file: record.committed_file,
                pending_file: FILE_NONE,
            };
            self.store(id, Some(&new))?;
        }
        self.delete_file(id, record.pending_file);
        Ok(())
    }

    /// Replace `id` wholesale with the committed version `meta`/`bytes` (resync),
    /// dropping any pending version. The bytes must match `meta.length` and
    /// `meta.crc`; `meta`'s pending fields are ignored.
    pub fn install(&self, id: ChunkId, meta: ChunkMeta, bytes: &[u8]) -> ChunkResult<ChunkMeta> {
        let actual_crc = crc32c::crc32c(bytes);
        if bytes.len() as u64 != u64::from(meta.length) || actual_crc != meta.crc {
            return Err(ChunkError::InstallMismatch {
                id,
                expected_len: meta.length,
                actual_len: bytes.len() as u64,
                expected_crc: meta.crc,
                actual_crc,
            });
        }
        if meta.length > self.chunk_size_max {
            return Err(ChunkError::OutOfRange {
                id,
                end: meta.length.into(),
                limit: self.chunk_size_max.into(),
            });
        }
        if meta.commit_ver == 0 {
            return Err(ChunkError::OutOfOrder {
                id,
                update_ver: 0,
                expected: 1,
            });
        }
        let _guard = self.lock(id);
        let old = self.load(id)?;
        let file = self.write_version_file(id, bytes)?;
        let new = Record {
            meta: ChunkMeta {
                update_ver: meta.commit_ver,
                pending_length: meta.length,
                pending_crc: meta.crc,
                pending_remove: false,
                ..meta
            },
            committed_file: file,
            pending_file: FILE_NONE,
        };
        if let Err(e) = self.store(id, Some(&new)) {
            self.delete_file(id, file);
            return Err(e);
        }
        if let Some(old) = old {
            self.delete_file(id, old.committed_file);
            self.delete_file(id, old.pending_file);
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
            self.delete_file(*id, record.committed_file);
            self.delete_file(*id, record.pending_file);
        }
        let _guard = self.dir_lock.lock();
        // Fails (harmlessly) if a new chunk of the inode appeared meanwhile.
        let _ = fs::remove_dir(self.inode_dir(inode));
        Ok(chunks.len())
    }

    // ---- reads ----

    /// Read up to `len` committed bytes at `offset`, clipped to the committed
    /// length. `NotCommitted` when a pending version exists.
    pub fn read(&self, id: ChunkId, offset: u32, len: u32) -> ChunkResult<(Vec<u8>, ChunkMeta)> {
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
    ) -> ChunkResult<(Vec<u8>, ChunkMeta)> {
        let _guard = self.lock(id);
        let record = self.load(id)?.ok_or(ChunkError::NotFound { id })?;
        self.read_committed(id, &record, offset, len)
    }

    fn read_committed(
        &self,
        id: ChunkId,
        record: &Record,
        offset: u32,
        len: u32,
    ) -> ChunkResult<(Vec<u8>, ChunkMeta)> {
        if record.meta.commit_ver == 0 {
            return Err(ChunkError::NotFound { id });
        }
        let bytes = self.committed_bytes(id, record)?;
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize)
            .saturating_add(len as usize)
            .min(bytes.len());
        Ok((bytes[start..end].to_vec(), record.meta))
    }

    /// The whole pending version of `id` (CRC verified) with its metadata, or
    /// `None` when no pending version exists or it is a removal. The CRAQ head
    /// re-drives it down the chain after a failed forward.
    pub fn read_pending(&self, id: ChunkId) -> ChunkResult<Option<(Vec<u8>, ChunkMeta)>> {
        let _guard = self.lock(id);
        let Some(record) = self.load(id)? else {
            return Ok(None);
        };
        if !record.meta.is_dirty() || record.pending_file == FILE_NONE {
            return Ok(None);
        }
        let path = self.file_path(id, record.pending_file);
        let bytes = fs::read(&path).map_err(|e| io_error(Some(id), &path, e))?;
        let actual = crc32c::crc32c(&bytes);
        if actual != record.meta.pending_crc || bytes.len() != record.meta.pending_length as usize {
            return Err(ChunkError::Corrupt {
                id,
                expected: record.meta.pending_crc,
                actual,
            });
        }
        Ok(Some((bytes, record.meta)))
    }

    /// The whole bytes of version `ver` of `id` (CRC verified), whether it is
    /// the committed or the pending one; `None` when the chunk has no such
    /// version or it is a removal.
    pub fn read_version(&self, id: ChunkId, ver: u64) -> ChunkResult<Option<Vec<u8>>> {
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
        let path = self.file_path(id, record.pending_file);
        let bytes = fs::read(&path).map_err(|e| io_error(Some(id), &path, e))?;
        let actual = crc32c::crc32c(&bytes);
        if actual != m.pending_crc || bytes.len() != m.pending_length as usize {
            return Err(ChunkError::Corrupt {
                id,
                expected: m.pending_crc,
                actual,
            });
        }
        Ok(Some(bytes))
    }

    /// The metadata of `id`, if it exists.
    pub fn meta(&self, id: ChunkId) -> ChunkResult<Option<ChunkMeta>> {
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

/// The bytes of the new version: `None` for a removal.
fn apply(mut bytes: Vec<u8>, change: &Change<'_>) -> Option<Vec<u8>> {
    match change {
        Change::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
            Some(bytes)
        }
        Change::Truncate { length } => {
            bytes.resize(*length as usize, 0);
            Some(bytes)
        }
        Change::Zero { offset, len } => {
            let (start, end) = clip(bytes.len(), *offset, *len);
            bytes[start..end].fill(0);
            Some(bytes)
        }
        Change::Replace { data } => Some(data.to_vec()),
        Change::Remove => None,
    }
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
    fn apply_zero_fills_gaps_and_truncates() {
        let w = Change::Write {
            offset: 4,
            data: b"ab",
        };
        assert_eq!(apply(b"xy".to_vec(), &w), Some(b"xy\0\0ab".to_vec()));
        let t = Change::Truncate { length: 1 };
        assert_eq!(apply(b"xy".to_vec(), &t), Some(b"x".to_vec()));
        assert_eq!(apply(b"xy".to_vec(), &Change::Remove), None);
    }

    #[test]
    fn file_names_parse() {
        assert_eq!(
            parse_file_name("000000000000000a.0000000000000003"),
            Some((10, 3))
        );
        assert_eq!(parse_file_name("junk"), None);
    }
}
