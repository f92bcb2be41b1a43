//! The KV service: engine transactions held open on behalf of remote
//! clients, in a map by random id, with an idle reaper.
//!
//! Never interprets keys or values. Every engine call runs on tokio's
//! blocking pool (commits wait for fsync).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r3fs_kv::{KvEngine, KvError, RangeOptions, Transaction};
use r3fs_net::{Router, RpcServer, ServerConfig};
use r3fs_wire::kv::{self as wire, KvResult, Mutation, Mutations, RangePage, TxnId, WireKvError};
use r3fs_wire::{ErrorBody, ErrorCode};

use crate::convert::{atomic_from_wire, to_wire};

/// Default most transactions open at once; `Begin` beyond it fails with a
/// retryable error.
pub const TRANSACTIONS_OPEN_MAX: usize = 10_000;
/// Default time a transaction may go without a call before the server aborts it.
pub const TRANSACTION_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most pairs in one range page.
pub const RANGE_PAGE_ROWS_MAX: usize = 1_000;
/// Default most key and value bytes in one range page (one pair always fits).
pub const RANGE_PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// The reaper checks at least this often (more often for short idle timeouts).
const REAP_INTERVAL_MAX: Duration = Duration::from_secs(1);
const REAP_INTERVAL_MIN: Duration = Duration::from_millis(1);
/// Random ids drawn before `Begin` gives up on finding an unused one.
const TXN_ID_ATTEMPTS_MAX: u32 = 16;

const _: () = assert!(RANGE_PAGE_BYTES_MAX < r3fs_wire::frame::FRAME_BODY_BYTES_MAX as usize / 2);

/// Service tuning; [`Default`] gives the named constants.
#[derive(Debug, Clone)]
pub struct KvServerConfig {
    pub transactions_open_max: usize,
    pub transaction_idle_timeout: Duration,
    pub range_page_rows_max: usize,
    pub range_page_bytes_max: usize,
}

impl Default for KvServerConfig {
    fn default() -> Self {
        KvServerConfig {
            transactions_open_max: TRANSACTIONS_OPEN_MAX,
            transaction_idle_timeout: TRANSACTION_IDLE_TIMEOUT,
            range_page_rows_max: RANGE_PAGE_ROWS_MAX,
            range_page_bytes_max: RANGE_PAGE_BYTES_MAX,
        }
    }
}

/// Counters of the service since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvServerStats {
    pub transactions_open: usize,
    pub transactions_begun: u64,
    pub transactions_committed: u64,
    pub transactions_aborted: u64,
    /// Aborted by the server for being idle.
    pub transactions_reaped: u64,
    /// `Begin`s refused at the open-transaction limit.
    pub transactions_refused: u64,
}

/// A handle to a registered KV service: cheap to clone, for stats.
#[derive(Clone)]
pub struct KvServer {
    state: Arc<State>,
}

/// Binds an RPC server on `listen` that serves only the KV service over
/// `engine`. The entry point of `r3fs kv`. Only one server may own a data
/// directory.
pub async fn serve(
    listen: SocketAddr,
    engine: Arc<dyn KvEngine>,
    config: KvServerConfig,
) -> io::Result<(RpcServer, KvServer)> {
    let mut router = Router::new();
    let kv = KvServer::register(&mut router, engine, config);
    let rpc = RpcServer::bind(listen, router, ServerConfig::default()).await?;
    tracing::info!(addr = %rpc.local_addr(), engine = kv.state.engine.name(), "kv server listening");
    Ok((rpc, kv))
}

impl KvServer {
    /// Registers the KV methods on `router` and starts the idle reaper, which
    /// stops once the router and every handle are gone.
    ///
    /// # Panics
    /// Outside a tokio runtime (the reaper is a task), or if `config` has a
    /// zero limit.
    pub fn register(
        router: &mut Router,
        engine: Arc<dyn KvEngine>,
        config: KvServerConfig,
    ) -> KvServer {
        assert!(
            config.transactions_open_max > 0,
            "transactions_open_max is 0"
        );
        assert!(config.range_page_rows_max > 0, "range_page_rows_max is 0");
        assert!(config.range_page_bytes_max > 0, "range_page_bytes_max is 0");
        assert!(
            !config.transaction_idle_timeout.is_zero(),
            "transaction_idle_timeout is 0"
        );
        let reap_interval =
            (config.transaction_idle_timeout / 4).clamp(REAP_INTERVAL_MIN, REAP_INTERVAL_MAX);
        let state = Arc::new(State {
            engine,
            config,
            txns: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            epoch: Instant::now(),
        });
        tokio::spawn(reap_loop(Arc::downgrade(&state), reap_interval));

        let s = state.clone();
        router.register::<wire::Begin, _, _>(move |_req, _ctx| s.clone().begin());
        let s = state.clone();
        router.register::<wire::Get, _, _>(move |req, _ctx| {
            let wire::GetRequest {
                txn,
                mutations,
                key,
                snapshot,
            } = req;
            s.clone().with_txn(txn, mutations, move |t| match snapshot {
                true => t.snapshot_get(&key),
                false => t.get(&key),
            })
        });
        let s = state.clone();
        router.register::<wire::GetRange, _, _>(move |req, _ctx| {
            let rows_max = s.config.range_page_rows_max;
            let bytes_max = s.config.range_page_bytes_max;
            let mut req = req;
            let mutations = Mutations {
                first: req.mutations.first,
                list: std::mem::take(&mut req.mutations.list),
            };
            s.clone().with_txn(req.txn, mutations, move |t| {
                range_page(t, &req, rows_max, bytes_max)
            })
        });
        let s = state.clone();
        router.register::<wire::Write, _, _>(move |req, _ctx| {
            s.clone().with_txn(req.txn, req.mutations, |_| Ok(()))
        });
        let s = state.clone();
        router.register::<wire::Commit, _, _>(move |req, _ctx| s.clone().commit(req));
        let s = state.clone();
        router.register::<wire::Abort, _, _>(move |req, _ctx| s.clone().abort(req.txn));
        KvServer { state }
    }

    pub fn stats(&self) -> KvServerStats {
        let c = &self.state.counters;
        KvServerStats {
            transactions_open: self.state.txns.lock().len(),
            transactions_begun: c.begun.load(Ordering::Relaxed),
            transactions_committed: c.committed.load(Ordering::Relaxed),
            transactions_aborted: c.aborted.load(Ordering::Relaxed),
            transactions_reaped: c.reaped.load(Ordering::Relaxed),
            transactions_refused: c.refused.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Counters {
    begun: AtomicU64,
    committed: AtomicU64,
    aborted: AtomicU64,
    reaped: AtomicU64,
    refused: AtomicU64,
}

struct State {
    engine: Arc<dyn KvEngine>,
    config: KvServerConfig,
    txns: Mutex<HashMap<TxnId, Arc<Slot>>>,
    counters: Counters,
    /// Origin of [`Slot::last_used_ms`].
    epoch: Instant,
}

/// One open transaction. `work` is held for the whole of each call; the
/// reaper skips slots whose `work` is locked.
struct Slot {
    work: Mutex<Work>,
    last_used_ms: AtomicU64,
}

struct Work {
    /// `None` once reaped or aborted.
    txn: Option<Box<dyn Transaction>>,
    /// Mutations of the client's sequence applied so far.
    applied: u64,
}

type Answer<T> = Result<KvResult<T>, ErrorBody>;

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Runs an engine call on the blocking pool.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ErrorBody> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ErrorBody {
        code: ErrorCode::Internal,
        message: format!("kv {what}: engine call failed: {e}"),
    })
}

impl State {
    fn open(&self) -> usize {
        self.txns.lock().len()
    }

    fn too_many(&self) -> WireKvError {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        WireKvError::TooManyTransactions {
            max: self.config.transactions_open_max as u64,
        }
    }

    async fn begin(self: Arc<Self>) -> Answer<TxnId> {
        let max = self.config.transactions_open_max;
        if self.open() >= max {
            return Ok(Err(self.too_many()));
        }
        let engine = self.engine.clone();
        let txn = match blocking("begin", move || engine.begin()).await? {
            Ok(txn) => txn,
            Err(e) => return Ok(Err(to_wire(e))),
        };
        let slot = Arc::new(Slot {
            work: Mutex::new(Work {
                txn: Some(txn),
                applied: 0,
            }),
            last_used_ms: AtomicU64::new(millis_since(self.epoch)),
        });
        let mut txns = self.txns.lock();
        if txns.len() >= max {
            drop(txns);
            return Ok(Err(self.too_many()));
        }
        for _ in 0..TXN_ID_ATTEMPTS_MAX {
            let id: TxnId = rand::random();
            if id != 0 && !txns.contains_key(&id) {
                txns.insert(id, slot);
                self.counters.begun.fetch_add(1, Ordering::Relaxed);
                return Ok(Ok(id));
            }
        }
        Ok(Err(WireKvError::Engine(
            "no unused transaction id found".into(),
        )))
    }

    /// Applies `mutations` to transaction `id`, then runs `op` on it.
    async fn with_txn<T: Send + 'static>(
        self: Arc<Self>,
        id: TxnId,
        mutations: Mutations,
        op: impl FnOnce(&mut dyn Transaction) -> Result<T, KvError> + Send + 'static,
    ) -> Answer<T> {
        let Some(slot) = self.txns.lock().get(&id).cloned() else {
            return Ok(Err(WireKvError::UnknownTransaction { txn: id }));
        };
        let epoch = self.epoch;
        blocking("call", move || {
            let mut work = slot.work.lock();
            slot.last_used_ms
                .store(millis_since(epoch), Ordering::Relaxed);
            let Work { txn, applied } = &mut *work;
            let result = match txn {
                None => Err(WireKvError::UnknownTransaction { txn: id }),
                Some(txn) => apply(txn.as_mut(), applied, mutations)
                    .and_then(|()| op(txn.as_mut()).map_err(to_wire)),
            };
            slot.last_used_ms
                .store(millis_since(epoch), Ordering::Relaxed);
            result
        })
        .await
    }

    async fn commit(self: Arc<Self>, req: wire::CommitRequest) -> Answer<()> {
        let id = req.txn;
        let Some(slot) = self.txns.lock().remove(&id) else {
            return Ok(Err(WireKvError::UnknownTransaction { txn: id }));
        };
        let state = self.clone();
        blocking("commit", move || {
            let mut work = slot.work.lock();
            let Work { txn, applied } = &mut *work;
            let Some(mut txn) = txn.take() else {
                return Err(WireKvError::UnknownTransaction { txn: id });
            };
            apply(txn.as_mut(), applied, req.mutations)?;
            txn.commit().map_err(to_wire)?;
            state.counters.committed.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    async fn abort(self: Arc<Self>, id: TxnId) -> Result<(), ErrorBody> {
        let Some(slot) = self.txns.lock().remove(&id) else {
            return Ok(());
        };
        self.counters.aborted.fetch_add(1, Ordering::Relaxed);
        blocking("abort", move || drop(slot.work.lock().txn.take())).await
    }

    /// Takes every transaction idle longer than the timeout and not in a call.
    fn take_idle(&self) -> Vec<Box<dyn Transaction>> {
        let now = millis_since(self.epoch);
        let idle_ms =
            u64::try_from(self.config.transaction_idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut reaped = Vec::new();
        self.txns.lock().retain(|_, slot| {
            let last = slot.last_used_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) < idle_ms {
                return true;
            }
            let Some(mut work) = slot.work.try_lock() else {
                return true; // in a call right now
            };
            reaped.extend(work.txn.take());
            false
        });
        reaped
    }
}

async fn reap_loop(state: Weak<State>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let reaped = state.take_idle();
        if reaped.is_empty() {
            continue;
        }
        let count = reaped.len();
        state
            .counters
            .reaped
            .fetch_add(count as u64, Ordering::Relaxed);
        tracing::info!(count, timeout = ?state.config.transaction_idle_timeout, "kv server aborted idle transactions");
        drop(state);
        if let Err(e) = blocking("reap", move || drop(reaped)).await {
            tracing::warn!(error = %e.message, "kv reaper failed to drop transactions");
        }
    }
}

/// Applies the part of `mutations` not yet applied, counting in `applied`.
fn apply(
    txn: &mut dyn Transaction,
    applied: &mut u64,
    mutations: Mutations,
) -> Result<(), WireKvError> {
    let Mutations { first, list } = mutations;
    if first > *applied {
        return Err(WireKvError::Engine(format!(
            "mutation sequence gap: {first} sent, {applied} applied"
        )));
    }
    let skip = usize::try_from(*applied - first).unwrap_or(usize::MAX);
    for mutation in list.into_iter().skip(skip) {
        apply_one(txn, mutation).map_err(to_wire)?;
        *applied += 1;
    }
    Ok(())
}

fn apply_one(txn: &mut dyn Transaction, mutation: Mutation) -> Result<(), KvError> {
    match mutation {
        Mutation::Set { key, value } => txn.set(&key, &value),
        Mutation::Clear { key } => txn.clear(&key),
        Mutation::ClearRange { begin, end } => txn.clear_range(&begin, &end),
        Mutation::AtomicOp { key, op, operand } => {
            txn.atomic_op(&key, atomic_from_wire(op), operand)
        }
        Mutation::AddReadConflictRange { begin, end } => txn.add_read_conflict_range(&begin, &end),
    }
}

/// One page of a range read, capped by rows and bytes.
fn range_page(
    txn: &mut dyn Transaction,
    req: &wire::GetRangeRequest,
    rows_max: usize,
    bytes_max: usize,
) -> Result<RangePage, KvError> {
    let asked = usize::try_from(req.limit).unwrap_or(usize::MAX);
    let limit = match asked {
        0 => rows_max,
        n => n.min(rows_max),
    };
    let opts = RangeOptions {
        limit,
        reverse: req.reverse,
        snapshot: req.snapshot,
    };
    let result = txn.get_range(&req.begin, &req.end, opts)?;
    let mut more = result.more;
    let mut bytes = 0usize;
    let mut kvs = Vec::with_capacity(result.kvs.len());
    for kv in result.kvs {
        let size = kv.key.len() + kv.value.len();
        if !kvs.is_empty() && bytes + size > bytes_max {
            // The engine read further than this page returns; its read
            // conflict covers that part too, which the client reads next.
            more = true;
            break;
        }
        bytes += size;
        kvs.push(wire::KeyValue {
            key: kv.key,
            value: kv.value,
        });
    }
    Ok(RangePage { kvs, more })
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3fs_kv::embedded::{EmbeddedConfig, EmbeddedEngine};

    fn add(n: u64) -> Mutation {
        Mutation::AtomicOp {
            key: b"n".to_vec(),
            op: wire::AtomicOp::Add,
            operand: n,
        }
    }

    fn check(steps: &[(u64, Vec<Mutation>)], want_applied: u64, want_value: u64) {
        let dir = tempfile::tempdir().unwrap();
        let engine = EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).unwrap();
        let mut txn = engine.begin().unwrap();
        let mut applied = 0;
        for (first, list) in steps {
            let mutations = Mutations {
                first: *first,
                list: list.clone(),
            };
            apply(txn.as_mut(), &mut applied, mutations).unwrap();
        }
        assert_eq!(applied, want_applied);
        let value = txn.get(b"n").unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(value.try_into().unwrap()), want_value);
    }

    #[test]
    fn retried_mutations_apply_once() {
        check(
            &[(0, vec![add(1), add(2)]), (0, vec![add(1), add(2)])],
            2,
            3,
        );
        check(&[(0, vec![add(1)]), (0, vec![add(1), add(10)])], 2, 11);
        check(
            &[(0, vec![add(1)]), (1, vec![add(10)]), (1, vec![add(10)])],
            2,
            11,
        );
    }

    #[test]
    fn mutation_gap_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let engine = EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).unwrap();
        let mut txn = engine.begin().unwrap();
        let mut applied = 0;
        let gap = Mutations {
            first: 1,
            list: vec![add(1)],
        };
        assert!(matches!(
            apply(txn.as_mut(), &mut applied, gap),
            Err(WireKvError::Engine(_))
        ));
        assert_eq!(applied, 0);
    }
}
