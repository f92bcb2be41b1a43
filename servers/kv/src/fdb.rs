//! The FoundationDB backend: [`FdbEngine`] maps the [`KvEngine`] trait onto a
//! FoundationDB cluster through the `foundationdb` crate (API 7.3).
//!
//! Must not keep any state of its own beyond the database handle: conflicts,
//! versions and durability are FoundationDB's. The trait is synchronous, so each
//! call blocks on the crate's future with `futures::executor::block_on`; FDB's
//! network thread completes them. Do not call it from inside an async executor
//! thread that FDB futures depend on.
//!
//! # Network
//! The FDB client network may be started once per process. The first
//! [`FdbEngine::open`] starts it with `foundationdb::boot()` and keeps the
//! returned guard in a process-wide `OnceLock` for the life of the process. The
//! guard is never dropped, so the network thread is not stopped gracefully: the
//! process exiting tears it down, as on abort. That is acceptable for servers,
//! which hold the engine until exit; nothing durable depends on the stop.
//!
//! # Errors
//! `not_committed` (1020) is `Conflict`, `commit_unknown_result` (1021) is
//! `MaybeCommitted`, `transaction_too_old` (1007) is `TooOld`, the size errors
//! (2101-2103) are the matching size variants; any other code FoundationDB
//! calls maybe-committed is `MaybeCommitted`, any other it calls retryable
//! (`future_version`, `process_behind`, ...) is `Transient`, and the rest are
//! `Engine` with the code and FDB's message.
//!
//! # Limits
//! Sizes are checked before they reach FDB with the crate limits, which equal
//! FoundationDB's. Range reads page through FDB with `WantAll` streaming, at most
//! `RangeOptions::limit` pairs when a limit is set.

use crate::limits::{check_key, check_range, WriteBudget};
use std::sync::OnceLock;

use foundationdb::api::NetworkAutoStop;
use foundationdb::options::{ConflictRangeType, MutationType, StreamingMode};
use foundationdb::{Database, FdbError, KeySelector, RangeOption};
use futures::executor::block_on;

use crate::{
    AtomicOp, KeyValue, KvEngine, KvError, RangeOptions, RangeResult, Transaction, KEY_BYTES_MAX,
    TRANSACTION_BYTES_MAX, VALUE_BYTES_MAX,
};

/// FDB error codes this backend maps to specific [`KvError`] variants.
const FDB_TRANSACTION_TOO_OLD: i32 = 1007;
const FDB_NOT_COMMITTED: i32 = 1020;
const FDB_COMMIT_UNKNOWN_RESULT: i32 = 1021;
const FDB_TRANSACTION_TOO_LARGE: i32 = 2101;
const FDB_KEY_TOO_LARGE: i32 = 2102;
const FDB_VALUE_TOO_LARGE: i32 = 2103;

/// The process-wide FDB network guard, see the module docs.
static NETWORK: OnceLock<NetworkGuard> = OnceLock::new();

struct NetworkGuard(#[allow(dead_code)] NetworkAutoStop);

fn ensure_network() {
    NETWORK.get_or_init(|| {
        // SAFETY: `boot` runs at most once per process (guarded by the
        // OnceLock). The guard lives in a static for the rest of the process;
        // see the module docs for why it is never dropped.
        NetworkGuard(unsafe { foundationdb::boot() })
    });
}

fn map_error(err: FdbError, bytes_written: usize) -> KvError {
    match err.code() {
        FDB_NOT_COMMITTED => KvError::Conflict,
        FDB_COMMIT_UNKNOWN_RESULT => KvError::MaybeCommitted,
        FDB_TRANSACTION_TOO_OLD => KvError::TooOld,
        FDB_TRANSACTION_TOO_LARGE => KvError::TransactionTooLarge {
            len: bytes_written,
            max: TRANSACTION_BYTES_MAX,
        },
        FDB_KEY_TOO_LARGE => KvError::KeyTooLarge {
            len: 0,
            max: KEY_BYTES_MAX,
        },
        FDB_VALUE_TOO_LARGE => KvError::ValueTooLarge {
            len: 0,
            max: VALUE_BYTES_MAX,
        },
        _ if err.is_maybe_committed() => KvError::MaybeCommitted,
        code if err.is_retryable() => KvError::Transient {
            code,
            message: err.message().to_string(),
        },
        code => KvError::Engine(format!("fdb error {code}: {}", err.message())),
    }
}

/// A [`KvEngine`] over a FoundationDB cluster.
pub struct FdbEngine {
    db: Database,
}

impl FdbEngine {
    /// Connect through `cluster_file`, or FDB's default cluster file when `None`.
    /// Starts the FDB network on first use.
    pub fn open(cluster_file: Option<&str>) -> Result<Self, KvError> {
        ensure_network();
        let db = Database::new(cluster_file).map_err(|e| map_error(e, 0))?;
        Ok(FdbEngine { db })
    }
}

impl KvEngine for FdbEngine {
    fn begin(&self) -> Result<Box<dyn Transaction>, KvError> {
        let tr = self.db.create_trx().map_err(|e| map_error(e, 0))?;
        Ok(Box::new(FdbTxn {
            tr,
            budget: WriteBudget::default(),
        }))
    }

    fn name(&self) -> &'static str {
        "fdb"
    }
}

struct FdbTxn {
    tr: foundationdb::Transaction,
    /// Bytes of keys and values written so far, against `TRANSACTION_BYTES_MAX`.
    budget: WriteBudget,
}

impl FdbTxn {
    fn error(&self, err: FdbError) -> KvError {
        map_error(err, self.budget.used())
    }

    fn read(&self, key: &[u8], snapshot: bool) -> Result<Option<Vec<u8>>, KvError> {
        let value = block_on(self.tr.get(key, snapshot)).map_err(|e| self.error(e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Every pair FDB returns for `[begin, end)`, paging until `limit` (0 = all)
    /// or the end of the range.
    fn read_pages(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
        reverse: bool,
        snapshot: bool,
    ) -> Result<Vec<KeyValue>, KvError> {
        let mut out = Vec::new();
        let mut next = Some(RangeOption {
            begin: KeySelector::first_greater_or_equal(begin),
            end: KeySelector::first_greater_or_equal(end),
            limit: (limit > 0).then_some(limit),
            reverse,
            mode: StreamingMode::WantAll,
            ..RangeOption::from((begin, end))
        });
        let mut iteration = 1;
        while let Some(opt) = next.take() {
            let page = block_on(self.tr.get_range(&opt, iteration, snapshot))
                .map_err(|e| self.error(e))?;
            out.extend(page.iter().map(|kv| KeyValue {
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
            }));
            next = opt.next_range(&page);
            iteration += 1;
        }
        Ok(out)
    }
}

impl Transaction for FdbTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.read(key, false)
    }

    fn snapshot_get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.read(key, true)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<RangeResult, KvError> {
        check_range(begin, end)?;
        if begin == end {
            return Ok(RangeResult::default());
        }
        let kvs = self.read_pages(begin, end, opts.limit, opts.reverse, opts.snapshot)?;
        let Some(last) = kvs
            .last()
            .filter(|_| opts.limit > 0 && kvs.len() >= opts.limit)
        else {
            return Ok(RangeResult { kvs, more: false });
        };
        // The limit was reached: probe, without a conflict, for one more pair.
        let (rest_begin, rest_end) = if opts.reverse {
            (begin.to_vec(), last.key.clone())
        } else {
            (crate::key_after(&last.key), end.to_vec())
        };
        let more = !self
            .read_pages(&rest_begin, &rest_end, 1, opts.reverse, true)?
            .is_empty();
        if !more && !opts.snapshot {
            // FDB's read covered only up to the last pair; the caller now knows
            // the whole range, so conflict on all of it.
            self.add_read_conflict_range(&rest_begin, &rest_end)?;
        }
        Ok(RangeResult { kvs, more })
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.budget.set(key, value)?;
        self.tr.set(key, value);
        Ok(())
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.budget.clear(key)?;
        self.tr.clear(key);
        Ok(())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.budget.clear_range(begin, end)?;
        if begin < end {
            self.tr.clear_range(begin, end);
        }
        Ok(())
    }

    fn atomic_op(&mut self, key: &[u8], op: AtomicOp, operand: u64) -> Result<(), KvError> {
        check_key(key)?;
        let param = operand.to_le_bytes();
        self.budget.charge(key.len() + param.len())?;
        let mutation = match op {
            AtomicOp::Add => MutationType::Add,
            AtomicOp::Max => MutationType::Max,
        };
        self.tr.atomic_op(key, &param, mutation);
        Ok(())
    }

    fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        check_range(begin, end)?;
        if begin == end {
            return Ok(());
        }
        self.tr
            .add_conflict_range(begin, end, ConflictRangeType::Read)
            .map_err(|e| self.error(e))
    }

    fn add_read_conflict_key(&mut self, key: &[u8]) -> Result<(), KvError> {
        let end = crate::key_after(key);
        self.add_read_conflict_range(key, &end)
    }

    fn commit(self: Box<Self>) -> Result<(), KvError> {
        let bytes_written = self.budget.used();
        block_on(self.tr.commit())
            .map(|_| ())
            .map_err(|e| map_error(*e, bytes_written))
    }
}
