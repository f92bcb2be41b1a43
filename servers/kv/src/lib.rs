//! The transactional key-value layer every r3fs server stores its state in.
//!
//! One trait, [`KvEngine`], shaped after FoundationDB: a [`Transaction`] reads at a
//! consistent snapshot, buffers its writes, and commits only if nothing it read
//! (point keys and ranges, plus explicit read-conflict ranges) was written by a
//! transaction that committed after its snapshot was taken. That gives strict
//! serializability: write skew and phantoms are rejected with [`KvError::Conflict`].
//! [`run`] is the retry loop callers use; it retries retryable errors with
//! exponential backoff and jitter, within a bound on attempts and time.
//!
//! This crate must not know about inodes, chains or any other r3fs schema; it
//! moves bytes. Backends:
//! - [`embedded`]: the default, pure Rust, persistent under a data directory.
//! - `fdb` (cargo feature `fdb`): FoundationDB through the `foundationdb` crate.
//!
//! [`conformance`] is one suite of behaviour checks run against every backend.
//!
//! # Limits
//! Keys are at most [`KEY_BYTES_MAX`], values at most [`VALUE_BYTES_MAX`], and one
//! transaction writes at most [`TRANSACTION_BYTES_MAX`] (FoundationDB's own limits).

use std::time::Duration;

pub mod conformance;
pub mod embedded;
#[cfg(feature = "fdb")]
pub mod fdb;
pub mod limits;
mod retry;

pub use retry::{run, AsKvError, RetryPolicy};

/// Longest key a transaction accepts (FoundationDB: 10,000 bytes).
pub const KEY_BYTES_MAX: usize = 10_000;
/// Longest value a transaction accepts (FoundationDB: 100,000 bytes).
pub const VALUE_BYTES_MAX: usize = 100_000;
/// Most bytes of keys and values one transaction may write (FoundationDB: 10 MB).
pub const TRANSACTION_BYTES_MAX: usize = 10_000_000;

/// What can go wrong in a transaction.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    /// A key or range this transaction read was written by a transaction that
    /// committed after this one's snapshot. Nothing was written. Retryable.
    #[error("transaction conflict: data read was changed by a concurrent commit")]
    Conflict,
    /// The commit outcome is unknown (for example the connection to the cluster
    /// broke during commit). Retryable only by idempotent transaction bodies.
    #[error("transaction may or may not have committed")]
    MaybeCommitted,
    /// The snapshot is older than the engine keeps conflict history for. Retryable.
    #[error("transaction too old: its snapshot is older than the conflict history window")]
    TooOld,
    /// [`run`] gave up.
    #[error("gave up after {attempts} attempts in {elapsed:?}; last error: {last}")]
    RetryLimit {
        attempts: u32,
        elapsed: Duration,
        last: Box<KvError>,
    },
    #[error("key of {len} bytes exceeds the limit of {max} bytes")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge { len: usize, max: usize },
    #[error("transaction writes {len} bytes, over the limit of {max} bytes")]
    TransactionTooLarge { len: usize, max: usize },
    /// A passing fault of the backend (FoundationDB's `future_version`,
    /// `process_behind`, ...): nothing was committed. Retryable.
    #[error("transient engine error {code}: {message}")]
    Transient { code: i32, message: String },
    /// `begin > end` in a range call, or a similar caller mistake.
    #[error("invalid range: begin is after end")]
    InvalidRange,
    /// The engine failed (I/O error, corrupt data, closed database). Not retryable.
    #[error("storage engine error: {0}")]
    Engine(String),
}

impl KvError {
    /// Whether retrying the whole transaction body may succeed.
    /// `MaybeCommitted` counts: bodies run by [`run`] must be idempotent.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KvError::Conflict
                | KvError::MaybeCommitted
                | KvError::TooOld
                | KvError::Transient { .. }
        )
    }
}

/// A key and its value, as returned by range reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// How to read a range `[begin, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RangeOptions {
    /// At most this many pairs; `0` means no limit.
    pub limit: usize,
    /// Return pairs from the end of the range backwards.
    pub reverse: bool,
    /// Snapshot read: adds no read-conflict range.
    pub snapshot: bool,
}

/// The result of a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// True when `limit` stopped the read before the end of the range.
    pub more: bool,
}

/// Mutations applied at commit time to the then-current value, without a read
/// conflict, so many transactions can bump one counter without conflicting.
/// Both treat values as little-endian unsigned 64-bit integers (missing = 0),
/// matching FoundationDB's `ADD` and `MAX` on 8-byte operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicOp {
    /// Wrapping add of the operand (pass `(-n as i64) as u64` to subtract).
    Add,
    /// Keep the larger of the stored value and the operand.
    Max,
}

/// One transaction. Reads see the transaction's own writes. Dropping a
/// transaction without committing discards it.
pub trait Transaction: Send {
    /// Read `key`, adding it to the read-conflict set.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Read `key` without adding a read conflict.
    fn snapshot_get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Read pairs in `[begin, end)`. Unless `opts.snapshot`, adds the part of the
    /// range actually covered (up to the last pair returned when `limit` cut it
    /// short) to the read-conflict set.
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<RangeResult, KvError>;
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError>;
    fn clear(&mut self, key: &[u8]) -> Result<(), KvError>;
    /// Clear every key in `[begin, end)`.
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError>;
    /// Apply `op` with the 8-byte little-endian `operand` at commit time.
    fn atomic_op(&mut self, key: &[u8], op: AtomicOp, operand: u64) -> Result<(), KvError>;
    /// Make the commit fail with `Conflict` if any key in `[begin, end)` is
    /// written by a transaction that commits after this one's snapshot.
    fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError>;
    /// `add_read_conflict_range(key, key + "\0")`.
    fn add_read_conflict_key(&mut self, key: &[u8]) -> Result<(), KvError>;
    /// Commit. A transaction that wrote nothing commits without checks.
    /// On success the writes are durable per the engine's durability policy.
    fn commit(self: Box<Self>) -> Result<(), KvError>;
}

/// A transactional key-value engine. Cheap to share behind an `Arc`.
pub trait KvEngine: Send + Sync {
    /// Start a transaction at the newest committed snapshot.
    fn begin(&self) -> Result<Box<dyn Transaction>, KvError>;
    /// A short name for logs: "embedded", "fdb".
    fn name(&self) -> &'static str;
}

/// The first key after `key` in byte order: `key` followed by a zero byte.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.extend_from_slice(key);
    k.push(0);
    k
}

/// The end of the range of all keys starting with `prefix`, or `None` when
/// `prefix` is empty or all `0xff` (the range runs to the end of the keyspace).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
