//! The conformance suite and durability checks against the embedded engine.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use r3fs_kv::embedded::{Durability, EmbeddedConfig, EmbeddedEngine};
use r3fs_kv::{conformance, KvEngine, KvError, RangeOptions, Transaction};

/// An engine that owns its temporary directory (dropped after the engine).
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

fn open(path: &std::path::Path, durability: Durability) -> EmbeddedEngine {
    let mut config = EmbeddedConfig::new(path);
    config.durability = durability;
    EmbeddedEngine::open(config).expect("open engine")
}

fn fresh(durability: Durability) -> Arc<dyn KvEngine> {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), durability);
    Arc::new(TempEngine { engine, _dir: dir })
}

#[test]
fn conformance_suite_passes_with_sync_durability() {
    conformance::run_all(&|| fresh(Durability::Sync));
}

#[test]
fn conformance_suite_passes_with_periodic_durability() {
    conformance::run_all(&|| fresh(Durability::Periodic(Duration::from_millis(20))));
}

fn numbered_key(n: u64) -> Vec<u8> {
    format!("n/{n:010}").into_bytes()
}

/// The numbers stored under `n/`, in order.
fn stored_numbers(engine: &dyn KvEngine) -> Vec<u64> {
    let mut txn = engine.begin().expect("begin");
    let kvs = txn
        .get_range(b"n/", b"n0", RangeOptions::default())
        .expect("range")
        .kvs;
    kvs.iter()
        .map(|kv| {
            let n: u64 = std::str::from_utf8(&kv.value)
                .expect("utf8 value")
                .parse()
                .expect("numeric value");
            assert_eq!(kv.key, numbered_key(n), "key matches value");
            n
        })
        .collect()
}

fn commit_number(engine: &dyn KvEngine, n: u64) -> Result<(), KvError> {
    let mut txn = engine.begin()?;
    txn.set(&numbered_key(n), n.to_string().as_bytes())?;
    txn.commit()
}

#[test]
fn commits_survive_close_and_reopen() {
    for durability in [
        Durability::Sync,
        Durability::Periodic(Duration::from_secs(60)),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let engine = open(dir.path(), durability);
            for n in 0..100 {
                commit_number(&engine, n).expect("commit");
            }
            let mut txn = engine.begin().unwrap();
            txn.clear_range(&numbered_key(10), &numbered_key(20))
                .unwrap();
            txn.commit().unwrap();
        }
        let engine = open(dir.path(), durability);
        let want: Vec<u64> = (0..10).chain(20..100).collect();
        assert_eq!(stored_numbers(&engine), want, "{durability:?}");
        // The reopened engine keeps committing and detecting conflicts.
        let mut reader = engine.begin().unwrap();
        let _ = reader.get(&numbered_key(5)).unwrap();
        commit_number(&engine, 5).unwrap();
        reader.set(b"other", b"1").unwrap();
        assert_eq!(reader.commit(), Err(KvError::Conflict));
    }
}

const CRASH_CHILD_DIR_ENV: &str = "R3FS_KV_CRASH_CHILD_DIR";
const CRASH_CHILD_PERIODIC_ENV: &str = "R3FS_KV_CRASH_CHILD_PERIODIC";
/// Acknowledged commits before the parent kills the child.
const CRASH_ACKS_BEFORE_KILL: u64 = 200;
/// The child gives up after this many commits if nobody kills it.
const CRASH_CHILD_COMMITS_MAX: u64 = 1_000_000;

/// Not a test on its own: the body of the child process that
/// `acknowledged_commits_survive_kill_9_*` starts. Returns at once unless
/// `R3FS_KV_CRASH_CHILD_DIR` is set.
#[test]
fn crash_child_commits_until_killed() {
    let Ok(dir) = std::env::var(CRASH_CHILD_DIR_ENV) else {
        return;
    };
    let durability = match std::env::var(CRASH_CHILD_PERIODIC_ENV) {
        Ok(_) => Durability::Periodic(Duration::from_millis(50)),
        Err(_) => Durability::Sync,
    };
    let engine = open(std::path::Path::new(&dir), durability);
    let mut out = std::io::stdout().lock();
    for n in 0..CRASH_CHILD_COMMITS_MAX {
        commit_number(&engine, n).expect("child commit");
        writeln!(out, "{n}").expect("ack");
        out.flush().expect("flush ack");
    }
}

fn check_acknowledged_commits_survive_kill_9(periodic: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(std::env::current_exe().expect("current exe"));
    command
        .args([
            "--exact",
            "crash_child_commits_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if periodic {
        command.env(CRASH_CHILD_PERIODIC_ENV, "1");
    }
    let mut child = command.spawn().expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child stdout");
        let Ok(n) = line.trim().parse::<u64>() else {
            continue; // libtest's own output
        };
        acked = Some(n);
        if n + 1 >= CRASH_ACKS_BEFORE_KILL {
            child.kill().expect("SIGKILL child");
            break;
        }
    }
    let _ = child.wait().expect("reap child");
    let acked = acked.expect("child acknowledged commits");
    assert!(
        acked + 1 >= CRASH_ACKS_BEFORE_KILL,
        "child stopped early at {acked}"
    );
    let engine = open(dir.path(), Durability::Sync);
    let stored = stored_numbers(&engine);
    let expect_prefix: Vec<u64> = (0..stored.len() as u64).collect();
    assert_eq!(
        stored, expect_prefix,
        "stored commits must be a prefix with no holes"
    );
    assert!(
        stored.len() as u64 > acked,
        "acknowledged commit {acked} lost; {} stored (periodic: {periodic})",
        stored.len()
    );
}

#[test]
fn acknowledged_commits_survive_kill_9_with_sync_durability() {
    check_acknowledged_commits_survive_kill_9(false);
}

#[test]
fn acknowledged_commits_survive_kill_9_with_periodic_durability() {
    check_acknowledged_commits_survive_kill_9(true);
}

/// Threads and commits per thread in the group-commit check.
const GROUP_COMMIT_THREADS: usize = 8;
const GROUP_COMMIT_COMMITS_PER_THREAD: u64 = 250;

#[test]
fn sync_durability_shares_fsyncs_between_concurrent_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Arc::new(open(dir.path(), Durability::Sync));
    let barrier = Arc::new(Barrier::new(GROUP_COMMIT_THREADS));
    let started = Instant::now();
    let threads: Vec<_> = (0..GROUP_COMMIT_THREADS as u64)
        .map(|t| {
            let engine = Arc::clone(&engine);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..GROUP_COMMIT_COMMITS_PER_THREAD {
                    commit_number(&*engine, t * 1_000_000 + i).expect("commit");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("committer");
    }
    let elapsed = started.elapsed();
    let stats = engine.stats();
    let commits = GROUP_COMMIT_THREADS as u64 * GROUP_COMMIT_COMMITS_PER_THREAD;
    println!(
        "sync group commit: {commits} commits by {GROUP_COMMIT_THREADS} threads in {elapsed:?} \
         = {:.0} commits/s, {} fsyncs ({:.1} commits per fsync)",
        commits as f64 / elapsed.as_secs_f64(),
        stats.fsyncs,
        stats.commits as f64 / stats.fsyncs.max(1) as f64,
    );
    assert_eq!(stats.commits, commits);
    assert!(stats.fsyncs >= 1, "sync mode must fsync");
    assert!(
        stats.fsyncs < stats.commits,
        "concurrent commits must share fsyncs: {stats:?}"
    );
}

#[test]
fn sync_durability_fsyncs_every_lone_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), Durability::Sync);
    for n in 0..10 {
        commit_number(&engine, n).expect("commit");
    }
    let stats = engine.stats();
    assert_eq!(stats.commits, 10);
    assert_eq!(
        stats.fsyncs, 10,
        "each sequential commit waits for its own fsync"
    );
}

#[test]
fn periodic_durability_commits_without_waiting_for_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), Durability::Periodic(Duration::from_secs(600)));
    for n in 0..10 {
        commit_number(&engine, n).expect("commit");
    }
    let stats = engine.stats();
    assert_eq!(stats.commits, 10);
    assert_eq!(stats.fsyncs, 0, "no fsync before the first interval ends");
    engine.sync().expect("explicit sync");
    assert_eq!(engine.stats().fsyncs, 1);
}

#[test]
fn periodic_durability_fsyncs_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), Durability::Periodic(Duration::from_millis(5)));
    for n in 0..10 {
        commit_number(&engine, n).expect("commit");
    }
    assert_eq!(engine.stats().commits, 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().fsyncs == 0 {
        assert!(Instant::now() < deadline, "periodic syncer never synced");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn empty_and_high_byte_keys_round_trip() {
    let engine = fresh(Durability::Sync);
    let mut txn = engine.begin().unwrap();
    txn.set(b"", b"empty").unwrap();
    txn.set(b"\xff\xff", b"high").unwrap();
    txn.commit().unwrap();
    let mut txn = engine.begin().unwrap();
    assert_eq!(txn.get(b"").unwrap().as_deref(), Some(b"empty".as_slice()));
    let all = txn
        .get_range(b"", b"\xff\xff\xff", RangeOptions::default())
        .unwrap();
    assert_eq!(all.kvs.len(), 2);
}

mod model {
    //! Random operation sequences against a `BTreeMap` model, checked each step.

    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;
    use r3fs_kv::embedded::Durability;
    use r3fs_kv::{AtomicOp, RangeOptions};

    /// Keys come from a tiny alphabet so operations collide often.
    const KEY_ALPHABET: &[u8] = b"abc";
    const KEY_BYTES_MAX: usize = 2;
    const OPS_MAX: usize = 40;

    #[derive(Debug, Clone)]
    enum Op {
        Set(Vec<u8>, Vec<u8>),
        Clear(Vec<u8>),
        ClearRange(Vec<u8>, Vec<u8>),
        Atomic(Vec<u8>, bool, u64),
        Get(Vec<u8>),
        Range(Vec<u8>, Vec<u8>, usize, bool),
        Commit,
        Abort,
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(KEY_ALPHABET), 0..=KEY_BYTES_MAX)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (key(), proptest::collection::vec(any::<u8>(), 0..10)).prop_map(|(k, v)| Op::Set(k, v)),
            key().prop_map(Op::Clear),
            (key(), key()).prop_map(|(a, b)| Op::ClearRange(a.clone().min(b.clone()), a.max(b))),
            (key(), any::<bool>(), 0u64..1000).prop_map(|(k, add, n)| Op::Atomic(k, add, n)),
            key().prop_map(Op::Get),
            (key(), key(), 0usize..4, any::<bool>()).prop_map(|(a, b, l, r)| Op::Range(
                a.clone().min(b.clone()),
                a.max(b),
                l,
                r
            )),
            Just(Op::Commit),
            Just(Op::Abort),
        ]
    }

    fn atomic(base: Option<&Vec<u8>>, add: bool, n: u64) -> Vec<u8> {
        let mut bytes = [0u8; 8];
        if let Some(base) = base {
            let len = base.len().min(8);
            bytes[..len].copy_from_slice(&base[..len]);
        }
        let current = u64::from_le_bytes(bytes);
        let result = if add {
            current.wrapping_add(n)
        } else {
            current.max(n)
        };
        result.to_le_bytes().to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn transactions_match_a_btreemap_model(ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
            let engine = super::fresh(Durability::Periodic(Duration::from_secs(60)));
            let mut committed: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut model = committed.clone();
            let mut txn = engine.begin().unwrap();
            for op in ops {
                match op {
                    Op::Set(k, v) => {
                        txn.set(&k, &v).unwrap();
                        model.insert(k, v);
                    }
                    Op::Clear(k) => {
                        txn.clear(&k).unwrap();
                        model.remove(&k);
                    }
                    Op::ClearRange(a, b) => {
                        txn.clear_range(&a, &b).unwrap();
                        model.retain(|k, _| k < &a || k >= &b);
                    }
                    Op::Atomic(k, add, n) => {
                        let kind = if add { AtomicOp::Add } else { AtomicOp::Max };
                        txn.atomic_op(&k, kind, n).unwrap();
                        let value = atomic(model.get(&k), add, n);
                        model.insert(k, value);
                    }
                    Op::Get(k) => {
                        prop_assert_eq!(txn.get(&k).unwrap(), model.get(&k).cloned(), "get {:?}", k);
                    }
                    Op::Range(a, b, limit, reverse) => {
                        let opts = RangeOptions { limit, reverse, snapshot: false };
                        let got = txn.get_range(&a, &b, opts).unwrap();
                        let mut want: Vec<(Vec<u8>, Vec<u8>)> = model
                            .range(a.clone()..b.clone())
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        if reverse {
                            want.reverse();
                        }
                        let more = limit > 0 && want.len() > limit;
                        if limit > 0 {
                            want.truncate(limit);
                        }
                        let got_pairs: Vec<(Vec<u8>, Vec<u8>)> =
                            got.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
                        prop_assert_eq!(got_pairs, want, "range {:?}..{:?} {:?}", a, b, opts);
                        prop_assert_eq!(got.more, more, "more for {:?}..{:?} {:?}", a, b, opts);
                    }
                    Op::Commit => {
                        txn.commit().unwrap();
                        committed = model.clone();
                        txn = engine.begin().unwrap();
                    }
                    Op::Abort => {
                        drop(txn);
                        model = committed.clone();
                        txn = engine.begin().unwrap();
                    }
                }
            }
        }
    }
}

#[test]
fn an_unsynced_commit_is_visible_at_once_and_durable_with_the_next_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), Durability::Sync);
    let fsyncs_before = engine.stats().fsyncs;
    let mut txn = engine.begin_unsynced();
    txn.set(b"lazy", b"1").expect("set");
    txn.commit().expect("commit");
    let lazy = engine.committed_version();
    assert_eq!(engine.stats().fsyncs, fsyncs_before, "no fsync waited for");
    assert!(engine.synced_version() < lazy, "not durable yet");
    let mut txn = engine.begin().expect("begin");
    assert_eq!(txn.get(b"lazy").expect("get").as_deref(), Some(&b"1"[..]));
    // A waiting commit's group fsync covers the unsynced one before it.
    txn.set(b"sync", b"2").expect("set");
    txn.commit().expect("commit");
    assert!(engine.synced_version() >= lazy);

    let mut txn = engine.begin_unsynced();
    txn.set(b"lazy", b"3").expect("set");
    txn.commit().expect("commit");
    let lazy = engine.committed_version();
    assert!(engine.synced_version() < lazy);
    engine.sync().expect("sync");
    assert!(engine.synced_version() >= lazy);
}
