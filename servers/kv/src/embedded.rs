//! The embedded engine: FoundationDB-style optimistic transactions over a fjall
//! database in one data directory, with group-committed durability.
//!
//! Owns the data directory given in [`EmbeddedConfig::path`] and nothing else;
//! it must not know any r3fs schema. fjall's own transaction module is not used:
//! conflict detection is ours (module `history`), so read-conflict ranges are explicit
//! and range reads catch phantoms.
//!
//! # How a transaction runs
//! `begin` reads the committed version and then opens a fjall snapshot (in that
//! order, so the snapshot holds at least every commit up to that version). Reads
//! go to the snapshot merged with the transaction's write buffer. Non-snapshot
//! reads record read-conflict ranges. `commit`, under one commit mutex, checks
//! those ranges against the write sets of every commit newer than the snapshot
//! (`Conflict`), or fails with `TooOld` if the history no longer reaches back that
//! far; then it computes atomic ops against the latest values, writes all
//! mutations as one fjall batch (atomic: all or nothing after a crash), bumps the
//! version and records the write set. Commits are strictly serializable.
//!
//! # Durability
//! Every commit's batch is written to the journal file and flushed to the OS
//! (`PersistMode::Buffer`) before the version is published, so in every mode a
//! commit that returned `Ok` survives `kill -9` of the process.
//! - [`Durability::Sync`] (default): `commit` returns only after the journal has
//!   been `fdatasync`ed up to at least its version; concurrent committers share
//!   one fsync (group commit: one becomes the leader and syncs for everyone
//!   already written, the rest wait). A returned commit survives power loss.
//!   A read-only commit waits until everything its snapshot saw is synced, so a
//!   committed read never reports data a power loss could take back. Data is
//!   visible to other transactions' reads as soon as it is in the OS, before
//!   its fsync; a transaction that reads it and writes can only commit after a
//!   later fsync that covers both.
//! - [`Durability::Periodic`]: `commit` returns once the batch is in the OS; a
//!   background thread fsyncs the journal every interval. Power loss or an OS
//!   crash may lose the commits of the last interval. A commit is one journal
//!   batch with a checksum: fjall's recovery truncates an incomplete trailing
//!   batch, so a commit is never half applied; a complete batch whose checksum
//!   fails makes `open` fail with `Engine` rather than drop data silently.
//!
//! The fsync runs outside fjall's journal lock, so commits keep writing
//! their batches while a group commit's fsync is under way (module
//! `journal_sync` says why that covers every earlier batch). An fsync
//! failure is final: that commit and every later one fail with `Engine`;
//! reopen the directory to recover what reached the disk.
//!
//! Versions live in memory only; reopening starts a new version sequence.
//! Because `begin` reads the version before opening the snapshot, a snapshot
//! may hold a commit newer than its version; that can only add conflicts.
//! Keys are stored behind a one-byte prefix because fjall rejects empty keys.
//!
//! # Limits
//! Key, value and transaction sizes per the crate limits; conflict history per
//! [`HISTORY_AGE_MAX`], [`HISTORY_COMMITS_MAX`] and [`HISTORY_BYTES_MAX`]; a
//! transaction older than the history fails with `TooOld`. A group-commit
//! leader waits at most [`GROUP_COMMIT_GATHER_MAX`] for in-flight commits; the
//! periodic fsync interval is at least [`PERIODIC_INTERVAL_MIN`].

mod buffer;
mod history;
mod journal_sync;
#[cfg(test)]
mod tests;

use crate::limits::{check_key, check_range, WriteBudget};
use std::cmp::Ordering as CmpOrdering;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use parking_lot::{Condvar, Mutex};

pub use history::{HISTORY_AGE_MAX, HISTORY_BYTES_MAX, HISTORY_COMMITS_MAX};

use crate::{AtomicOp, KeyValue, KvEngine, KvError, RangeOptions, RangeResult, Transaction};
use buffer::{apply_atomics, Pending, WriteBuffer, ATOMIC_OPERAND_BYTES};
use history::{History, KeyRange};
use journal_sync::JournalSync;

/// Below these counts of sealed memtables and level-0 tables a commit waits
/// for no flush (see [`EmbeddedEngine::writes_may_wait`]).
const SEALED_MEMTABLES_CALM_MAX: usize = 1;
const L0_TABLES_CALM_MAX: usize = 16;

/// See [`EmbeddedEngine::writes_may_wait`].
fn backlog_may_hold_writes(sealed_memtables: usize, l0_tables: usize) -> bool {
    sealed_memtables >= SEALED_MEMTABLES_CALM_MAX || l0_tables >= L0_TABLES_CALM_MAX
}

/// The one fjall keyspace holding all keys.
const KEYSPACE_NAME: &str = "kv";
/// Byte stored in front of every user key: fjall rejects empty keys (it
/// asserts), the trait allows them, and a common prefix keeps the order.
const STORED_KEY_PREFIX: u8 = b'k';

/// The fjall key for a user key.
fn stored_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(key.len() + 1);
    stored.push(STORED_KEY_PREFIX);
    stored.extend_from_slice(key);
    stored
}

/// The user key of a fjall key.
fn user_key(stored: &[u8]) -> Result<&[u8], KvError> {
    match stored.split_first() {
        Some((&STORED_KEY_PREFIX, key)) => Ok(key),
        _ => Err(KvError::Engine(format!(
            "corrupt data: stored key {stored:02x?} lacks the key prefix"
        ))),
    }
}
/// Default fjall block cache size.
pub const CACHE_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Default fsync interval of [`Durability::Periodic`] when built via [`Durability::periodic_default`].
pub const PERIODIC_INTERVAL_DEFAULT: Duration = Duration::from_millis(100);
/// Shortest allowed fsync interval of [`Durability::Periodic`].
pub const PERIODIC_INTERVAL_MIN: Duration = Duration::from_millis(1);
/// Longest a group-commit leader waits for commits already on their way into
/// the journal before it fsyncs, so one fsync covers them all.
pub const GROUP_COMMIT_GATHER_MAX: Duration = Duration::from_micros(200);

/// When a commit counts as durable. See the module docs for the exact guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `commit` returns after the journal is fdatasync'ed (group commit).
    #[default]
    Sync,
    /// `commit` returns once the batch is in the OS; a background thread fsyncs
    /// every interval (clamped to at least [`PERIODIC_INTERVAL_MIN`]).
    Periodic(Duration),
}

impl Durability {
    /// `Periodic` with [`PERIODIC_INTERVAL_DEFAULT`].
    pub fn periodic_default() -> Self {
        Durability::Periodic(PERIODIC_INTERVAL_DEFAULT)
    }
}

/// How to open an [`EmbeddedEngine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedConfig {
    /// Data directory; created if missing.
    pub path: PathBuf,
    /// Default [`Durability::Sync`].
    pub durability: Durability,
    /// fjall block cache; default [`CACHE_BYTES_DEFAULT`].
    pub cache_bytes: u64,
}

impl EmbeddedConfig {
    /// Defaults for everything but the path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            path: path.into(),
            durability: Durability::default(),
            cache_bytes: CACHE_BYTES_DEFAULT,
        }
    }
}

/// Counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbeddedStats {
    /// Commits that wrote something and succeeded.
    pub commits: u64,
    /// Journal fsyncs (group commits and periodic syncs).
    pub fsyncs: u64,
    /// Commits rejected with `Conflict`.
    pub conflicts: u64,
    /// Commits rejected with `TooOld`.
    pub too_old: u64,
}

/// The embedded [`KvEngine`]. Share it behind an `Arc`; dropping it stops the
/// background syncer and syncs the journal.
pub struct EmbeddedEngine {
    inner: Arc<Inner>,
    periodic: Option<JoinHandle<()>>,
}

struct Inner {
    db: Database,
    /// Fsyncs the journal (outside fjall's journal lock).
    journal: JournalSync,
    keyspace: Keyspace,
    durability: Durability,
    /// Newest version whose batch is in fjall. Stored after the batch is applied.
    committed_version: AtomicU64,
    commit: Mutex<History>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    stop: AtomicBool,
    /// Writing commits between start and their batch being in the OS.
    writers_pending: AtomicUsize,
    commits: AtomicU64,
    fsyncs: AtomicU64,
    conflicts: AtomicU64,
    too_old: AtomicU64,
}

struct SyncState {
    /// Every version up to this one is fsync'ed.
    synced_version: u64,
    /// A leader is fsyncing right now.
    syncing: bool,
}

fn engine_error(context: &str, err: impl std::fmt::Display) -> KvError {
    KvError::Engine(format!("{context}: {err}"))
}

impl EmbeddedEngine {
    /// Open (or create) the database under `config.path`, recovering every
    /// commit that reached the journal, and fsync what was recovered.
    pub fn open(config: EmbeddedConfig) -> Result<Self, KvError> {
        let db = Database::builder(&config.path)
            .cache_size(config.cache_bytes)
            .open()
            .map_err(|e| engine_error(&format!("open {}", config.path.display()), e))?;
        let keyspace = db
            .keyspace(KEYSPACE_NAME, KeyspaceCreateOptions::default)
            .map_err(|e| engine_error("open keyspace", e))?;
        // What recovery found may have come from the OS's cache of a journal
        // a killed process never fsynced: make it durable before anything
        // (a caller's reuse of space the recovered state freed, say) builds
        // on it. Versions are in-memory only: after this, everything is
        // committed and synced as far as this process is concerned.
        db.persist(PersistMode::SyncAll)
            .map_err(|e| engine_error("sync the recovered journal", e))?;
        let version = 0;
        let durability = match config.durability {
            Durability::Periodic(interval) => {
                Durability::Periodic(interval.max(PERIODIC_INTERVAL_MIN))
            }
            Durability::Sync => Durability::Sync,
        };
        let journal = JournalSync::open(&config.path);
        let inner = Arc::new(Inner {
            db,
            journal,
            keyspace,
            durability,
            committed_version: AtomicU64::new(version),
            commit: Mutex::new(History::new(version)),
            sync: Mutex::new(SyncState {
                synced_version: version,
                syncing: false,
            }),
            synced: Condvar::new(),
            stop: AtomicBool::new(false),
            writers_pending: AtomicUsize::new(0),
            commits: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            too_old: AtomicU64::new(0),
        });
        let periodic = match durability {
            Durability::Sync => None,
            Durability::Periodic(interval) => {
                let inner = Arc::clone(&inner);
                let handle = std::thread::Builder::new()
                    .name("r3fs-kv-sync".into())
                    .spawn(move || inner.periodic_sync_loop(interval))
                    .map_err(|e| engine_error("spawn periodic syncer", e))?;
                Some(handle)
            }
        };
        Ok(EmbeddedEngine { inner, periodic })
    }

    /// Counters since open.
    pub fn stats(&self) -> EmbeddedStats {
        let inner = &self.inner;
        EmbeddedStats {
            commits: inner.commits.load(Ordering::Relaxed),
            fsyncs: inner.fsyncs.load(Ordering::Relaxed),
            conflicts: inner.conflicts.load(Ordering::Relaxed),
            too_old: inner.too_old.load(Ordering::Relaxed),
        }
    }

    /// The durability mode in effect (periodic intervals clamped).
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// A transaction whose commit returns once its batch is in the OS,
    /// without waiting for the journal fsync, whatever the durability mode.
    /// It is as visible as any commit at once, and durable once
    /// [`EmbeddedEngine::synced_version`] reaches the
    /// [`EmbeddedEngine::committed_version`] read after it: with the next
    /// group commit of a waiting transaction, a periodic sync or
    /// [`EmbeddedEngine::sync`]. A crash of the process loses nothing (the
    /// batch is in the OS); a crash of the machine before that fsync loses it.
    pub fn begin_unsynced(&self) -> Box<dyn Transaction> {
        Box::new(self.begin_txn(false))
    }

    fn begin_txn(&self, wait_synced: bool) -> EmbeddedTxn {
        // Version first, then snapshot: the snapshot holds at least every
        // commit up to the version (maybe more, which only adds conflicts).
        let read_version = self.inner.committed_version.load(Ordering::Acquire);
        let snapshot = self.inner.db.snapshot();
        EmbeddedTxn {
            inner: Arc::clone(&self.inner),
            snapshot,
            read_version,
            buffer: WriteBuffer::default(),
            reads: Vec::new(),
            budget: WriteBudget::default(),
            wait_synced,
        }
    }

    /// The newest committed version: every commit that returned has a
    /// version at most this.
    pub fn committed_version(&self) -> u64 {
        self.inner.committed_version.load(Ordering::Acquire)
    }

    /// Every commit up to this version is fsynced.
    pub fn synced_version(&self) -> u64 {
        self.inner.sync.lock().synced_version
    }

    /// Whether a commit now might wait for disk work, so that a caller that
    /// must not block (an async task) commits on a thread that may. A
    /// commit takes fjall's journal lock, which fjall's flush worker holds
    /// through a journal fsync (or rotation) at the start of every memtable
    /// flush, and which our own syncs hold when they fall back to fjall's
    /// (see `journal_sync`); and fjall's write backpressure holds commits
    /// back (spinning, then sleeping) while sealed memtables or level-0
    /// tables pile up. So only a store with no sealed memtable (no flush
    /// under way), few level-0 tables (fjall slows writers from 20 runs; a
    /// run holds at least one table) and syncs of its own counts as calm.
    /// A flush can still begin between this answer and the commit: a window
    /// of microseconds once per memtable.
    pub fn writes_may_wait(&self) -> bool {
        self.inner.journal.holds_fjalls_lock()
            || backlog_may_hold_writes(
                self.inner.keyspace.sealed_memtable_count(),
                self.inner.keyspace.l0_table_count(),
            )
    }

    /// Fsync the journal now, whatever the durability mode.
    pub fn sync(&self) -> Result<(), KvError> {
        let version = self.inner.committed_version.load(Ordering::Acquire);
        self.inner.wait_synced(version)
    }
}

impl Drop for EmbeddedEngine {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        {
            // Wake the periodic syncer, which waits on the same condvar.
            let _state = self.inner.sync.lock();
            self.inner.synced.notify_all();
        }
        if let Some(handle) = self.periodic.take() {
            if handle.join().is_err() {
                tracing::error!("periodic journal syncer panicked");
            }
        }
        if let Err(e) = self.inner.db.persist(PersistMode::SyncAll) {
            tracing::error!("final journal sync failed: {e}");
        }
    }
}

impl Inner {
    fn periodic_sync_loop(&self, interval: Duration) {
        loop {
            {
                let mut state = self.sync.lock();
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                // Group commits and explicit syncs also notify this condvar;
                // keep waiting until the interval is over.
                let deadline = Instant::now() + interval;
                while !self.synced.wait_until(&mut state, deadline).timed_out() {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                }
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
            }
            let version = self.committed_version.load(Ordering::Acquire);
            if let Err(e) = self.wait_synced(version) {
                tracing::error!("periodic journal sync failed: {e}");
            }
        }
    }

    /// Return once every version up to `version` is fsync'ed. Group commit: the
    /// first waiter to find no sync running becomes the leader and syncs
    /// everything written so far; the others wait for it.
    fn wait_synced(&self, version: u64) -> Result<(), KvError> {
        let mut state = self.sync.lock();
        loop {
            if state.synced_version >= version {
                return Ok(());
            }
            if state.syncing {
                self.synced.wait(&mut state);
                continue;
            }
            state.syncing = true;
            let (target, result) = parking_lot::MutexGuard::unlocked(&mut state, || {
                self.gather_writers();
                // Every version up to `target` has its batch in the OS already.
                let target = self.committed_version.load(Ordering::Acquire);
                (target, self.journal.sync(&self.db))
            });
            assert!(target >= version, "waiting for a version not yet committed");
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            state.syncing = false;
            self.synced.notify_all();
            result?;
            if target > state.synced_version {
                state.synced_version = target;
            }
            assert!(
                state.synced_version <= self.committed_version.load(Ordering::Acquire),
                "synced past the committed version"
            );
        }
    }

    /// Give commits already past their conflict check a moment to reach the
    /// journal, bounded by [`GROUP_COMMIT_GATHER_MAX`].
    fn gather_writers(&self) {
        let started = Instant::now();
        while self.writers_pending.load(Ordering::Acquire) > 0
            && started.elapsed() < GROUP_COMMIT_GATHER_MAX
        {
            std::thread::yield_now();
        }
    }

    /// Storage pairs with user keys in `[begin, end)`, in fjall key order.
    fn storage_range(&self, snapshot: &Snapshot, begin: &[u8], end: &[u8]) -> fjall::Iter {
        snapshot.range(&self.keyspace, stored_key(begin)..stored_key(end))
    }

    fn storage_get(&self, snapshot: &Snapshot, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        snapshot
            .get(&self.keyspace, stored_key(key))
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| engine_error("read", e))
    }

    /// Check, apply and record one writing transaction; returns its version.
    fn commit_writes(
        &self,
        read_version: u64,
        reads: &[KeyRange],
        buffer: WriteBuffer,
    ) -> Result<u64, KvError> {
        // After a failed journal fsync nothing may commit on top of what it
        // may have lost (see `journal_sync`).
        if let Some(e) = self.journal.failure() {
            return Err(e);
        }
        let mut history = self.commit.lock();
        if let Err(e) = history.check(read_version, reads) {
            let counter = match e {
                KvError::TooOld => &self.too_old,
                _ => &self.conflicts,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let WriteBuffer { writes, cleared } = buffer;
        self.apply(&writes, &cleared)?;
        let version = self.committed_version.load(Ordering::Relaxed) + 1;
        let keys: Vec<Vec<u8>> = writes.into_keys().collect();
        history.record(version, keys, cleared.into_iter().collect(), Instant::now());
        self.committed_version.store(version, Ordering::Release);
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(version)
    }

    /// Write the buffer as one fjall batch, computing atomic ops and cleared
    /// ranges against the latest data. Caller holds the commit mutex.
    fn apply(
        &self,
        writes: &BTreeMap<Vec<u8>, Pending>,
        cleared: &BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<(), KvError> {
        let latest = self.db.snapshot();
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for (begin, end) in cleared {
            for guard in self.storage_range(&latest, begin, end) {
                let stored = guard
                    .key()
                    .map_err(|e| engine_error("scan cleared range", e))?;
                // A point write in the range replaces the clear; one batch must
                // not hold two entries for one key.
                if !writes.contains_key(user_key(&stored)?) {
                    batch.remove(&self.keyspace, stored);
                }
            }
        }
        for (key, pending) in writes {
            match pending {
                Pending::Value(Some(value)) => {
                    batch.insert(&self.keyspace, stored_key(key), value.as_slice())
                }
                Pending::Value(None) => batch.remove(&self.keyspace, stored_key(key)),
                Pending::Atomic(ops) => {
                    let base = self.storage_get(&latest, key)?;
                    let value = apply_atomics(base.as_deref(), ops);
                    batch.insert(&self.keyspace, stored_key(key), value);
                }
            }
        }
        batch.commit().map_err(|e| engine_error("write batch", e))
    }
}

impl KvEngine for EmbeddedEngine {
    fn begin(&self) -> Result<Box<dyn Transaction>, KvError> {
        Ok(Box::new(self.begin_txn(true)))
    }

    fn name(&self) -> &'static str {
        "embedded"
    }
}

/// A key and value read from storage.
type StoredPair = (Vec<u8>, Vec<u8>);

struct EmbeddedTxn {
    inner: Arc<Inner>,
    snapshot: Snapshot,
    read_version: u64,
    buffer: WriteBuffer,
    /// Read-conflict ranges.
    reads: Vec<KeyRange>,
    /// Bytes of keys and values written so far, against `TRANSACTION_BYTES_MAX`.
    budget: WriteBudget,
    /// Under [`Durability::Sync`], whether `commit` waits for the journal
    /// fsync (false for [`EmbeddedEngine::begin_unsynced`]).
    wait_synced: bool,
}

impl EmbeddedTxn {
    fn read_key(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.buffer.writes.get(key) {
            Some(Pending::Value(value)) => Ok(value.clone()),
            Some(Pending::Atomic(ops)) => {
                let base = self.inner.storage_get(&self.snapshot, key)?;
                Ok(Some(apply_atomics(base.as_deref(), ops)))
            }
            None if self.buffer.is_cleared(key) => Ok(None),
            None => self.inner.storage_get(&self.snapshot, key),
        }
    }

    /// The next storage pair not hidden by a cleared range.
    fn next_stored(
        &self,
        iter: &mut dyn Iterator<Item = fjall::Guard>,
    ) -> Result<Option<StoredPair>, KvError> {
        for guard in iter {
            let (key, value) = guard
                .into_inner()
                .map_err(|e| engine_error("range read", e))?;
            let key = user_key(&key)?;
            if !self.buffer.is_cleared(key) {
                return Ok(Some((key.to_vec(), value.to_vec())));
            }
        }
        Ok(None)
    }

    /// Merge storage and the write buffer over `[begin, end)`. Returns the pairs
    /// and whether the limit cut the read short.
    fn read_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
    ) -> Result<(Vec<KeyValue>, bool), KvError> {
        let stored = self.inner.storage_range(&self.snapshot, begin, end);
        let mut stored: Box<dyn Iterator<Item = fjall::Guard>> = if reverse {
            Box::new(stored.rev())
        } else {
            Box::new(stored)
        };
        let buffered = self.buffer.writes.range::<[u8], _>((
            std::ops::Bound::Included(begin),
            std::ops::Bound::Excluded(end),
        ));
        let mut buffered: Box<dyn Iterator<Item = (&Vec<u8>, &Pending)>> = if reverse {
            Box::new(buffered.rev())
        } else {
            Box::new(buffered)
        };
        let mut out = Vec::new();
        let mut s = self.next_stored(stored.as_mut())?;
        let mut b = buffered.next();
        loop {
            let order = match (&s, &b) {
                (None, None) => break,
                (Some(_), None) => CmpOrdering::Less,
                (None, Some(_)) => CmpOrdering::Greater,
                (Some((sk, _)), Some((bk, _))) => {
                    let order = sk.as_slice().cmp(bk.as_slice());
                    if reverse {
                        order.reverse()
                    } else {
                        order
                    }
                }
            };
            let item = match order {
                CmpOrdering::Less => {
                    let item = s.take().map(|(key, value)| KeyValue { key, value });
                    s = self.next_stored(stored.as_mut())?;
                    item
                }
                CmpOrdering::Greater => {
                    let item = b.and_then(|(k, p)| resolve(k, p, None));
                    b = buffered.next();
                    item
                }
                CmpOrdering::Equal => {
                    let base = s.take().map(|(_, value)| value);
                    let item = b.and_then(|(k, p)| resolve(k, p, base.as_deref()));
                    s = self.next_stored(stored.as_mut())?;
                    b = buffered.next();
                    item
                }
            };
            if let Some(kv) = item {
                if limit > 0 && out.len() == limit {
                    return Ok((out, true));
                }
                out.push(kv);
            }
        }
        Ok((out, false))
    }
}

/// The value a buffered entry gives `key` over the stored `base`.
fn resolve(key: &[u8], pending: &Pending, base: Option<&[u8]>) -> Option<KeyValue> {
    let value = match pending {
        Pending::Value(value) => value.clone()?,
        Pending::Atomic(ops) => apply_atomics(base, ops),
    };
    Some(KeyValue {
        key: key.to_vec(),
        value,
    })
}

impl Transaction for EmbeddedTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let value = self.read_key(key)?;
        self.reads.push((key.to_vec(), crate::key_after(key)));
        Ok(value)
    }

    fn snapshot_get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.read_key(key)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<RangeResult, KvError> {
        check_range(begin, end)?;
        let (kvs, more) = self.read_range(begin, end, opts.limit, opts.reverse)?;
        if !opts.snapshot && begin < end {
            let covered = match (more, kvs.last()) {
                (true, Some(last)) if opts.reverse => (last.key.clone(), end.to_vec()),
                (true, Some(last)) => (begin.to_vec(), crate::key_after(&last.key)),
                _ => (begin.to_vec(), end.to_vec()),
            };
            self.reads.push(covered);
        }
        Ok(RangeResult { kvs, more })
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.budget.set(key, value)?;
        self.buffer.set(key, value);
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.budget.clear(key)?;
        self.buffer.clear(key);
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.budget.clear_range(begin, end)?;
        self.buffer.clear_range(begin, end);
        Ok(())
    }

    fn atomic_op(&mut self, key: &[u8], op: AtomicOp, operand: u64) -> Result<(), KvError> {
        check_key(key)?;
        self.budget.charge(key.len() + ATOMIC_OPERAND_BYTES)?;
        self.buffer.atomic_op(key, op, operand);
        Ok(())
    }

    fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        check_range(begin, end)?;
        if begin < end {
            self.reads.push((begin.to_vec(), end.to_vec()));
        }
        Ok(())
    }

    fn add_read_conflict_key(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.reads.push((key.to_vec(), crate::key_after(key)));
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), KvError> {
        let EmbeddedTxn {
            inner,
            snapshot,
            read_version,
            buffer,
            reads,
            wait_synced,
            ..
        } = *self;
        drop(snapshot);
        if buffer.is_empty() {
            // Read-only: nothing to check. Under Sync, do not report reads of
            // data a power loss could still take back.
            return match inner.durability {
                Durability::Sync if wait_synced => inner.wait_synced(read_version),
                _ => Ok(()),
            };
        }
        inner.writers_pending.fetch_add(1, Ordering::AcqRel);
        let committed = inner.commit_writes(read_version, &reads, buffer);
        inner.writers_pending.fetch_sub(1, Ordering::AcqRel);
        let version = committed?;
        match inner.durability {
            Durability::Sync if wait_synced => inner.wait_synced(version),
            _ => Ok(()),
        }
    }
}
