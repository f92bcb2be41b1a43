//! RemoteEngine -> KvServer -> EmbeddedEngine: the conformance suite, lost
//! and leaked transactions, a killed server, limits, failover.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use r3fs_kv::embedded::{Durability, EmbeddedConfig, EmbeddedEngine};
use r3fs_kv::{conformance, run, KvEngine, KvError, RangeOptions, RetryPolicy, Transaction};
use r3fs_kv_remote::{
    serve, KvServer, KvServerConfig, RemoteConfig, RemoteEngine, CODE_TOO_MANY_TRANSACTIONS,
    CODE_UNKNOWN_TRANSACTION,
};
use r3fs_net::RpcServer;

/// Bound on every wait for the server to change state in these tests.
const WAIT_MAX: Duration = Duration::from_secs(10);

/// An embedded engine that owns its temporary directory.
struct TempEngine {
    engine: EmbeddedEngine,
    _dir: tempfile::TempDir,
}

impl KvEngine for TempEngine {
    fn begin(&self) -> Result<Box<dyn Transaction>, KvError> {
        self.engine.begin()
    }
    fn name(&self) -> &'static str {
        self.engine.name()
    }
}

fn embedded() -> Arc<dyn KvEngine> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = EmbeddedConfig::new(dir.path());
    config.durability = Durability::Sync;
    let engine = EmbeddedEngine::open(config).expect("open engine");
    Arc::new(TempEngine { engine, _dir: dir })
}

/// A KV server on its own runtime.
struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    rpc: Option<RpcServer>,
    kv: KvServer,
    addr: SocketAddr,
}

impl Server {
    fn start(engine: Arc<dyn KvEngine>, config: KvServerConfig, listen: SocketAddr) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        let (rpc, kv) = runtime
            .block_on(serve(listen, engine, config))
            .expect("bind kv server");
        Server {
            addr: rpc.local_addr(),
            runtime: Some(runtime),
            rpc: Some(rpc),
            kv,
        }
    }

    fn local(engine: Arc<dyn KvEngine>, config: KvServerConfig) -> Server {
        Server::start(engine, config, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Graceful stop: in-flight calls finish, then connections close.
    fn shutdown(mut self) {
        if let (Some(runtime), Some(rpc)) = (self.runtime.take(), self.rpc.take()) {
            runtime.block_on(rpc.shutdown());
            runtime.shutdown_timeout(WAIT_MAX);
        }
    }

    /// Like `kill -9` of the process: every task and connection vanishes.
    fn kill(mut self) {
        drop(self.rpc.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    fn wait_until(&self, what: &str, done: impl Fn(&r3fs_kv_remote::KvServerStats) -> bool) {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let stats = self.kv.stats();
            if done(&stats) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {stats:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.rpc.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(WAIT_MAX);
        }
    }
}

fn remote(addrs: Vec<SocketAddr>, config: RemoteConfig) -> RemoteEngine {
    RemoteEngine::new(addrs, config).expect("remote engine")
}

/// Short timeouts so dead-server tests stay fast.
fn quick() -> RemoteConfig {
    RemoteConfig {
        call_timeout: Duration::from_secs(1),
        call_attempts_max: 2,
        connect_timeout: Duration::from_millis(500),
        ..RemoteConfig::default()
    }
}

/// A remote engine over a fresh embedded engine; drops client, then server.
struct RemoteOverEmbedded {
    remote: RemoteEngine,
    _server: Server,
}

impl KvEngine for RemoteOverEmbedded {
    fn begin(&self) -> Result<Box<dyn Transaction>, KvError> {
        self.remote.begin()
    }
    fn name(&self) -> &'static str {
        self.remote.name()
    }
}

fn fresh_remote(config: KvServerConfig) -> Arc<dyn KvEngine> {
    let server = Server::local(embedded(), config);
    let remote = remote(vec![server.addr], RemoteConfig::default());
    Arc::new(RemoteOverEmbedded {
        remote,
        _server: server,
    })
}

#[test]
fn conformance_suite_passes_through_a_remote_server() {
    conformance::run_all(&|| fresh_remote(KvServerConfig::default()));
}

/// Pages of two pairs and 64 bytes force every range read through paging.
#[test]
fn conformance_suite_passes_with_tiny_range_pages() {
    conformance::run_all(&|| {
        fresh_remote(KvServerConfig {
            range_page_rows_max: 2,
            range_page_bytes_max: 64,
            ..KvServerConfig::default()
        })
    });
}

fn transient_code(err: &KvError) -> Option<i32> {
    match err {
        KvError::Transient { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn reaped_transaction_is_retryable_and_run_retries_it() {
    let idle = Duration::from_millis(200);
    let server = Server::local(
        embedded(),
        KvServerConfig {
            transaction_idle_timeout: idle,
            ..KvServerConfig::default()
        },
    );
    let engine = remote(vec![server.addr], quick());
    let mut txn = engine.begin().unwrap();
    txn.set(b"k", b"lost").unwrap();
    assert_eq!(txn.get(b"k").unwrap().as_deref(), Some(b"lost".as_slice()));
    server.wait_until("txn reaped", |s| s.transactions_reaped == 1);
    let err = txn.get(b"k").expect_err("reaped transaction");
    assert_eq!(
        transient_code(&err),
        Some(CODE_UNKNOWN_TRANSACTION),
        "{err}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        txn.commit(),
        Err(err),
        "commit of a reaped txn fails the same way"
    );

    let mut runs = 0;
    run(&engine, RetryPolicy::default(), |txn| {
        runs += 1;
        let _ = txn.get(b"k")?;
        if runs == 1 {
            std::thread::sleep(idle * 4);
        }
        txn.set(b"k", format!("run {runs}").as_bytes())
    })
    .expect("run retries a reaped transaction");
    assert_eq!(runs, 2);
    let mut txn = engine.begin().unwrap();
    assert_eq!(txn.get(b"k").unwrap().as_deref(), Some(b"run 2".as_slice()));
}

#[test]
fn restarted_server_forgets_transactions_and_run_succeeds_after() {
    let store = embedded();
    let server = Server::local(store.clone(), KvServerConfig::default());
    let addr = server.addr;
    let engine = remote(vec![addr], quick());
    let mut txn = engine.begin().unwrap();
    txn.set(b"k", b"before restart").unwrap();
    server.shutdown();
    let server = Server::start(store, KvServerConfig::default(), addr);
    let err = txn.get(b"k").expect_err("transaction of the old server");
    assert!(err.is_retryable(), "{err}");
    drop(txn);
    run(&engine, RetryPolicy::default(), |txn| {
        assert_eq!(txn.get(b"k")?, None, "the lost txn wrote nothing");
        txn.set(b"k", b"after restart")
    })
    .expect("run after restart");
    assert_eq!(server.kv.stats().transactions_committed, 1);
}

/// Wraps an engine so each commit announces itself, then waits a while.
struct SlowCommits {
    inner: Arc<dyn KvEngine>,
    entered: mpsc::SyncSender<()>,
    delay: Duration,
}

struct SlowTxn {
    inner: Box<dyn Transaction>,
    entered: mpsc::SyncSender<()>,
    delay: Duration,
}

impl KvEngine for SlowCommits {
    fn begin(&self) -> Result<Box<dyn Transaction>, KvError> {
        Ok(Box::new(SlowTxn {
            inner: self.inner.begin()?,
            entered: self.entered.clone(),
            delay: self.delay,
        }))
    }
    fn name(&self) -> &'static str {
        "slow-commits"
    }
}

impl Transaction for SlowTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }
    fn snapshot_get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.snapshot_get(key)
    }
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<r3fs_kv::RangeResult, KvError> {
        self.inner.get_range(begin, end, opts)
    }
    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.inner.set(key, value)
    }
    fn clear(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.inner.clear(key)
    }
    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.inner.clear_range(begin, end)
    }
    fn atomic_op(
        &mut self,
        key: &[u8],
        op: r3fs_kv::AtomicOp,
        operand: u64,
    ) -> Result<(), KvError> {
        self.inner.atomic_op(key, op, operand)
    }
    fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.inner.add_read_conflict_range(begin, end)
    }
    fn add_read_conflict_key(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.inner.add_read_conflict_key(key)
    }
    fn commit(self: Box<Self>) -> Result<(), KvError> {
        let _ = self.entered.try_send(());
        std::thread::sleep(self.delay);
        self.inner.commit()
    }
}

#[test]
fn killed_server_fails_calls_in_bounded_time_and_never_acks_a_lost_commit() {
    let (entered_tx, entered_rx) = mpsc::sync_channel(1);
    let slow = Arc::new(SlowCommits {
        inner: embedded(),
        entered: entered_tx,
        delay: Duration::from_millis(500),
    });
    let server = Server::local(slow, KvServerConfig::default());
    let engine = Arc::new(remote(vec![server.addr], quick()));
    let mut open = engine.begin().unwrap();
    open.set(b"other", b"1").unwrap();

    let committer = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let mut txn = engine.begin().unwrap();
            txn.set(b"k", b"v").unwrap();
            txn.commit()
        })
    };
    entered_rx
        .recv_timeout(WAIT_MAX)
        .expect("commit reached the engine");
    let killed = Instant::now();
    server.kill();
    let result = committer.join().expect("committer thread");
    assert_eq!(result, Err(KvError::MaybeCommitted), "commit in flight");

    let err = open.get(b"other").expect_err("read on a dead server");
    assert!(err.is_retryable(), "{err}");
    let err = engine.begin().err().expect("begin on a dead server");
    assert!(err.is_retryable(), "{err}");
    assert!(
        killed.elapsed() < WAIT_MAX,
        "calls to a dead server took {:?}",
        killed.elapsed()
    );
}

#[test]
fn leaked_and_dropped_transactions_are_removed_from_the_server() {
    let server = Server::local(
        embedded(),
        KvServerConfig {
            transaction_idle_timeout: Duration::from_millis(200),
            ..KvServerConfig::default()
        },
    );
    let engine = remote(vec![server.addr], quick());
    let dropped = engine.begin().unwrap();
    let leaked = engine.begin().unwrap();
    assert_eq!(server.kv.stats().transactions_open, 2);
    drop(dropped);
    server.wait_until("dropped txn aborted", |s| {
        s.transactions_aborted == 1 && s.transactions_open == 1
    });
    // A client that dies never sends an abort.
    std::mem::forget(leaked);
    server.wait_until("leaked txn reaped", |s| {
        s.transactions_reaped == 1 && s.transactions_open == 0
    });
}

#[test]
fn too_many_open_transactions_is_a_retryable_error() {
    let server = Server::local(
        embedded(),
        KvServerConfig {
            transactions_open_max: 2,
            ..KvServerConfig::default()
        },
    );
    let engine = remote(vec![server.addr], quick());
    let first = engine.begin().unwrap();
    let _second = engine.begin().unwrap();
    let err = engine.begin().err().expect("third open transaction");
    assert_eq!(
        transient_code(&err),
        Some(CODE_TOO_MANY_TRANSACTIONS),
        "{err}"
    );
    assert!(err.is_retryable());
    assert_eq!(server.kv.stats().transactions_refused, 1);
    drop(first);
    server.wait_until("abort frees a slot", |s| s.transactions_open == 1);
    engine.begin().expect("begin after a slot freed");
}

#[test]
fn begin_fails_over_to_the_next_address() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let server = Server::local(embedded(), KvServerConfig::default());
    let engine = remote(vec![dead, server.addr], quick());
    let mut txn = engine.begin().expect("begin via the second address");
    txn.set(b"k", b"v").unwrap();
    txn.commit().unwrap();
    assert_eq!(engine.current_addr(), server.addr);
}

#[test]
fn large_transactions_are_sent_in_batches() {
    let server = Server::local(embedded(), KvServerConfig::default());
    let engine = remote(vec![server.addr], RemoteConfig::default());
    let value = vec![7u8; 90_000];
    let mut txn = engine.begin().unwrap();
    for i in 0..100u32 {
        txn.set(format!("big/{i:03}").as_bytes(), &value).unwrap();
    }
    txn.commit().expect("9 MB transaction");
    let mut txn = engine.begin().unwrap();
    let got = txn
        .get_range(b"big/", b"big0", RangeOptions::default())
        .unwrap();
    assert_eq!(got.kvs.len(), 100);
    assert!(got.kvs.iter().all(|kv| kv.value == value));
}

const BENCH_THREADS: usize = 8;
const BENCH_COMMITS_PER_THREAD: usize = 100;

/// Not a timed assertion: prints commits/s of 1-key read-modify-writes.
#[test]
fn read_modify_write_throughput_printout() {
    let server = Server::local(embedded(), KvServerConfig::default());
    let engine = Arc::new(remote(vec![server.addr], RemoteConfig::default()));
    for (label, shared_key) in [("one shared key", true), ("a key per thread", false)] {
        let barrier = Arc::new(Barrier::new(BENCH_THREADS));
        let started = Instant::now();
        let threads: Vec<_> = (0..BENCH_THREADS)
            .map(|t| {
                let engine = engine.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let key = match shared_key {
                        true => b"counter".to_vec(),
                        false => format!("counter/{t}").into_bytes(),
                    };
                    let policy = RetryPolicy {
                        attempts_max: 10_000,
                        elapsed_max: Duration::from_secs(60),
                        ..RetryPolicy::default()
                    };
                    barrier.wait();
                    for _ in 0..BENCH_COMMITS_PER_THREAD {
                        run(&*engine, policy, |txn| {
                            let n = match txn.get(&key)? {
                                Some(v) => u64::from_le_bytes(v.try_into().unwrap_or([0; 8])),
                                None => 0,
                            };
                            txn.set(&key, &(n + 1).to_le_bytes())
                        })
                        .expect("increment");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("bench thread");
        }
        let elapsed = started.elapsed();
        let commits = BENCH_THREADS * BENCH_COMMITS_PER_THREAD;
        println!(
            "remote rmw, {label}: {commits} commits by {BENCH_THREADS} threads in {elapsed:?} = {:.0} commits/s",
            commits as f64 / elapsed.as_secs_f64()
        );
    }
}
