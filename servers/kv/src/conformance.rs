//! The behaviour checks every [`KvEngine`] backend must pass, run by each
//! backend's integration tests.
//!
//! Test support code: checks panic with a message on a violation. It must not
//! depend on any backend; each check gets a fresh, empty engine from a factory
//! (for shared backends such as FoundationDB the factory clears the keyspace).
//!
//! # Limits
//! Concurrency checks use [`THREADS`] threads and [`INCREMENTS_PER_THREAD`]
//! increments each; the size checks write up to `TRANSACTION_BYTES_MAX`.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::{
    run, AsKvError, AtomicOp, KeyValue, KvEngine, KvError, RangeOptions, RetryPolicy,
    KEY_BYTES_MAX, TRANSACTION_BYTES_MAX, VALUE_BYTES_MAX,
};

/// Returns a fresh, empty engine.
pub type Factory<'a> = &'a dyn Fn() -> Arc<dyn KvEngine>;

/// One check of the suite.
pub type Check = fn(Factory);

/// Threads in the concurrency checks.
pub const THREADS: usize = 8;
/// Increments each thread makes in the concurrency checks.
pub const INCREMENTS_PER_THREAD: usize = 50;

/// Every check, each on a fresh engine.
pub fn run_all(factory: Factory) {
    let checks: &[(&str, Check)] = &[
        ("point_get_set_clear", point_get_set_clear),
        ("read_your_writes", read_your_writes),
        (
            "range_reads_honor_limit_reverse_more",
            range_reads_honor_limit_reverse_more,
        ),
        (
            "range_read_conflicts_cover_only_what_was_read",
            range_read_conflicts_cover_only_what_was_read,
        ),
        (
            "clear_range_removes_stored_keys",
            clear_range_removes_stored_keys,
        ),
        ("atomic_ops_apply_at_commit", atomic_ops_apply_at_commit),
        (
            "concurrent_atomic_adds_do_not_conflict",
            concurrent_atomic_adds_do_not_conflict,
        ),
        (
            "snapshot_reads_add_no_conflict",
            snapshot_reads_add_no_conflict,
        ),
        (
            "explicit_read_conflict_range_conflicts",
            explicit_read_conflict_range_conflicts,
        ),
        (
            "blind_writes_and_read_only_commits_succeed",
            blind_writes_and_read_only_commits_succeed,
        ),
        ("write_skew_is_rejected", write_skew_is_rejected),
        ("phantom_is_rejected", phantom_is_rejected),
        (
            "concurrent_read_modify_write_counts_exactly",
            concurrent_read_modify_write_counts_exactly,
        ),
        (
            "concurrent_transfers_preserve_the_total",
            concurrent_transfers_preserve_the_total,
        ),
        ("run_stops_at_retry_limit", run_stops_at_retry_limit),
        (
            "run_passes_non_kv_errors_through",
            run_passes_non_kv_errors_through,
        ),
        ("size_limits_are_enforced", size_limits_are_enforced),
        ("inverted_ranges_are_rejected", inverted_ranges_are_rejected),
    ];
    for (name, check) in checks {
        eprintln!("kv conformance: {name}");
        check(factory);
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

fn u64_value(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

fn decode_u64(value: Option<Vec<u8>>) -> u64 {
    let value = value.unwrap_or_default();
    let bytes: [u8; 8] = value
        .as_slice()
        .try_into()
        .expect("counter value is 8 bytes");
    u64::from_le_bytes(bytes)
}

fn set_all(engine: &dyn KvEngine, pairs: &[(&str, &str)]) {
    let mut txn = engine.begin().expect("begin");
    for (k, v) in pairs {
        txn.set(k.as_bytes(), v.as_bytes()).expect("set");
    }
    txn.commit().expect("commit setup");
}

fn get(engine: &dyn KvEngine, key: &str) -> Option<Vec<u8>> {
    let mut txn = engine.begin().expect("begin");
    txn.get(key.as_bytes()).expect("get")
}

fn range_all(engine: &dyn KvEngine, begin: &str, end: &str) -> Vec<KeyValue> {
    let mut txn = engine.begin().expect("begin");
    txn.get_range(begin.as_bytes(), end.as_bytes(), RangeOptions::default())
        .expect("get_range")
        .kvs
}

fn opts(limit: usize, reverse: bool, snapshot: bool) -> RangeOptions {
    RangeOptions {
        limit,
        reverse,
        snapshot,
    }
}

pub fn point_get_set_clear(factory: Factory) {
    let engine = factory();
    assert_eq!(get(&*engine, "a"), None, "fresh engine must be empty");
    set_all(&*engine, &[("a", "1"), ("b", "2")]);
    assert_eq!(get(&*engine, "a").as_deref(), Some(b"1".as_slice()));
    set_all(&*engine, &[("a", "3")]);
    assert_eq!(
        get(&*engine, "a").as_deref(),
        Some(b"3".as_slice()),
        "overwrite"
    );
    let mut txn = engine.begin().unwrap();
    txn.clear(b"a").unwrap();
    txn.clear(b"missing").unwrap();
    txn.commit().unwrap();
    assert_eq!(get(&*engine, "a"), None, "cleared key");
    assert_eq!(get(&*engine, "b").as_deref(), Some(b"2".as_slice()));
    // Dropping a transaction discards its writes.
    let mut txn = engine.begin().unwrap();
    txn.set(b"c", b"x").unwrap();
    drop(txn);
    assert_eq!(get(&*engine, "c"), None, "dropped txn must not write");
    // Empty values are values.
    set_all(&*engine, &[("e", "")]);
    assert_eq!(get(&*engine, "e"), Some(Vec::new()), "empty value");
}

pub fn read_your_writes(factory: Factory) {
    let engine = factory();
    set_all(&*engine, &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
    let mut txn = engine.begin().unwrap();
    txn.set(b"a", b"new").unwrap();
    txn.set(b"bb", b"ins").unwrap();
    txn.clear(b"c").unwrap();
    assert_eq!(txn.get(b"a").unwrap().as_deref(), Some(b"new".as_slice()));
    assert_eq!(txn.get(b"c").unwrap(), None, "own clear");
    assert_eq!(
        txn.get_range(b"a", b"z", RangeOptions::default())
            .unwrap()
            .kvs,
        vec![kv("a", "new"), kv("b", "2"), kv("bb", "ins"), kv("d", "4")],
        "range merges own writes"
    );
    assert_eq!(
        txn.get_range(b"a", b"z", opts(2, true, false)).unwrap().kvs,
        vec![kv("d", "4"), kv("bb", "ins")],
        "reverse range merges own writes"
    );
    txn.clear_range(b"b", b"d").unwrap();
    assert_eq!(txn.get(b"b").unwrap(), None, "own clear_range");
    assert_eq!(
        txn.get(b"bb").unwrap(),
        None,
        "own clear_range over own write"
    );
    txn.set(b"bc", b"after").unwrap();
    assert_eq!(
        txn.get_range(b"a", b"z", RangeOptions::default())
            .unwrap()
            .kvs,
        vec![kv("a", "new"), kv("bc", "after"), kv("d", "4")],
        "write after clear_range is visible"
    );
    txn.set(b"n", &u64_value(5)).unwrap();
    txn.atomic_op(b"n", AtomicOp::Add, 2).unwrap();
    assert_eq!(decode_u64(txn.get(b"n").unwrap()), 7, "atomic over own set");
    txn.commit().unwrap();
    assert_eq!(
        range_all(&*engine, "a", "m"),
        vec![kv("a", "new"), kv("bc", "after"), kv("d", "4")]
    );
    // Pending atomic ops over a stored value read as applied.
    set_all(&*engine, &[]);
    let mut txn = engine.begin().unwrap();
    txn.atomic_op(b"n", AtomicOp::Add, 10).unwrap();
    txn.atomic_op(b"m", AtomicOp::Max, 3).unwrap();
    assert_eq!(
        decode_u64(txn.get(b"n").unwrap()),
        17,
        "pending add over stored"
    );
    assert_eq!(
        decode_u64(txn.get(b"m").unwrap()),
        3,
        "pending max over missing"
    );
    let kvs = txn
        .get_range(b"m", b"o", RangeOptions::default())
        .unwrap()
        .kvs;
    assert_eq!(kvs.len(), 2, "range sees pending atomic keys");
    txn.commit().unwrap();
    assert_eq!(decode_u64(get(&*engine, "n")), 17);
}

pub fn range_reads_honor_limit_reverse_more(factory: Factory) {
    let engine = factory();
    set_all(
        &*engine,
        &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")],
    );
    let mut txn = engine.begin().unwrap();
    let cases: &[(RangeOptions, &[&str], bool)] = &[
        (opts(0, false, false), &["a", "b", "c", "d", "e"], false),
        (opts(2, false, false), &["a", "b"], true),
        (opts(5, false, false), &["a", "b", "c", "d", "e"], false),
        (opts(6, false, false), &["a", "b", "c", "d", "e"], false),
        (opts(0, true, false), &["e", "d", "c", "b", "a"], false),
        (opts(2, true, false), &["e", "d"], true),
        (opts(2, false, true), &["a", "b"], true),
        (opts(3, true, true), &["e", "d", "c"], true),
    ];
    for (o, keys, more) in cases {
        let got = txn.get_range(b"a", b"z", *o).unwrap();
        let got_keys: Vec<&[u8]> = got.kvs.iter().map(|kv| kv.key.as_slice()).collect();
        let want: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        assert_eq!(got_keys, want, "keys for {o:?}");
        assert_eq!(got.more, *more, "more for {o:?}");
    }
    let got = txn.get_range(b"b", b"d", RangeOptions::default()).unwrap();
    assert_eq!(
        got.kvs,
        vec![kv("b", "2"), kv("c", "3")],
        "end is exclusive"
    );
    let got = txn.get_range(b"c", b"c", RangeOptions::default()).unwrap();
    assert!(got.kvs.is_empty() && !got.more, "empty range");
    let got = txn.get_range(b"x", b"z", opts(1, false, false)).unwrap();
    assert!(got.kvs.is_empty() && !got.more, "range past the data");
}

pub fn range_read_conflicts_cover_only_what_was_read(factory: Factory) {
    let engine = factory();
    // Forward, cut short after "b": a write at "c" is outside, one at "ab" inside.
    for (write, reverse, expect_conflict) in [
        ("c", false, false),
        ("ab", false, true),
        ("b", false, true),
        ("b", true, false),
        ("c", true, true),
        ("cc", true, true),
    ] {
        let mut reset = engine.begin().unwrap();
        reset.clear_range(b"a", b"e").unwrap();
        for k in ["a", "b", "c", "d"] {
            reset.set(k.as_bytes(), b"v").unwrap();
        }
        reset.commit().unwrap();
        let mut reader = engine.begin().unwrap();
        let got = reader
            .get_range(b"a", b"e", opts(2, reverse, false))
            .unwrap();
        assert!(got.more);
        let mut writer = engine.begin().unwrap();
        writer.set(write.as_bytes(), b"w").unwrap();
        writer.commit().unwrap();
        reader.set(b"out", b"1").unwrap();
        let result = reader.commit();
        if expect_conflict {
            assert_eq!(
                result,
                Err(KvError::Conflict),
                "write {write} reverse {reverse}"
            );
        } else {
            assert_eq!(result, Ok(()), "write {write} reverse {reverse}");
        }
    }
    // A read of the whole range conflicts with a write anywhere in it, even past the last key.
    let mut reader = engine.begin().unwrap();
    let _ = reader
        .get_range(b"a", b"y", RangeOptions::default())
        .unwrap();
    set_all(&*engine, &[("x", "new")]);
    reader.set(b"out", b"2").unwrap();
    assert_eq!(
        reader.commit(),
        Err(KvError::Conflict),
        "write past the last key of a full read"
    );
}

pub fn clear_range_removes_stored_keys(factory: Factory) {
    let engine = factory();
    set_all(
        &*engine,
        &[("a", "1"), ("b", "2"), ("ba", "x"), ("c", "3"), ("d", "4")],
    );
    let mut txn = engine.begin().unwrap();
    txn.clear_range(b"b", b"d").unwrap();
    txn.clear_range(b"q", b"q").unwrap();
    txn.commit().unwrap();
    assert_eq!(
        range_all(&*engine, "a", "z"),
        vec![kv("a", "1"), kv("d", "4")]
    );
    // A clear_range followed by a set of a key inside it keeps the set.
    let mut txn = engine.begin().unwrap();
    txn.clear_range(b"a", b"z").unwrap();
    txn.set(b"c", b"kept").unwrap();
    txn.commit().unwrap();
    assert_eq!(range_all(&*engine, "a", "z"), vec![kv("c", "kept")]);
}

pub fn atomic_ops_apply_at_commit(factory: Factory) {
    let engine = factory();
    let mut txn = engine.begin().unwrap();
    txn.atomic_op(b"add", AtomicOp::Add, 5).unwrap();
    txn.atomic_op(b"add", AtomicOp::Add, 6).unwrap();
    txn.atomic_op(b"max", AtomicOp::Max, 9).unwrap();
    txn.atomic_op(b"wrap", AtomicOp::Add, u64::MAX).unwrap();
    txn.commit().unwrap();
    assert_eq!(decode_u64(get(&*engine, "add")), 11, "add to missing");
    assert_eq!(decode_u64(get(&*engine, "max")), 9, "max of missing");
    let mut txn = engine.begin().unwrap();
    txn.atomic_op(b"add", AtomicOp::Add, (-4i64) as u64)
        .unwrap();
    txn.atomic_op(b"max", AtomicOp::Max, 3).unwrap();
    txn.atomic_op(b"wrap", AtomicOp::Add, 2).unwrap();
    txn.commit().unwrap();
    assert_eq!(
        decode_u64(get(&*engine, "add")),
        7,
        "subtract by wrapping add"
    );
    assert_eq!(decode_u64(get(&*engine, "max")), 9, "max keeps the larger");
    assert_eq!(decode_u64(get(&*engine, "wrap")), 1, "add wraps");
    // Two transactions adding to one key both commit and both count.
    let mut t1 = engine.begin().unwrap();
    let mut t2 = engine.begin().unwrap();
    t1.atomic_op(b"add", AtomicOp::Add, 100).unwrap();
    t2.atomic_op(b"add", AtomicOp::Add, 1000).unwrap();
    t1.commit().expect("first atomic add");
    t2.commit().expect("second atomic add must not conflict");
    assert_eq!(decode_u64(get(&*engine, "add")), 1107);
}

pub fn concurrent_atomic_adds_do_not_conflict(factory: Factory) {
    let engine = factory();
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let engine = Arc::clone(&engine);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..INCREMENTS_PER_THREAD {
                    let mut txn = engine.begin().unwrap();
                    txn.atomic_op(b"counter", AtomicOp::Add, 1).unwrap();
                    txn.commit().expect("atomic adds never conflict");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("adder thread");
    }
    assert_eq!(
        decode_u64(get(&*engine, "counter")),
        (THREADS * INCREMENTS_PER_THREAD) as u64
    );
}

pub fn snapshot_reads_add_no_conflict(factory: Factory) {
    let engine = factory();
    set_all(&*engine, &[("x", "1"), ("y", "1")]);
    let mut txn = engine.begin().unwrap();
    assert_eq!(
        txn.snapshot_get(b"x").unwrap().as_deref(),
        Some(b"1".as_slice())
    );
    let _ = txn.get_range(b"a", b"z", opts(0, false, true)).unwrap();
    set_all(&*engine, &[("x", "2"), ("m", "new")]);
    assert_eq!(
        txn.snapshot_get(b"x").unwrap().as_deref(),
        Some(b"1".as_slice()),
        "reads stay at the snapshot"
    );
    txn.set(b"y", b"2").unwrap();
    txn.commit().expect("snapshot reads must not conflict");
}

pub fn explicit_read_conflict_range_conflicts(factory: Factory) {
    let engine = factory();
    let mut txn = engine.begin().unwrap();
    txn.add_read_conflict_range(b"m", b"p").unwrap();
    set_all(&*engine, &[("p", "outside")]);
    txn.set(b"q", b"1").unwrap();
    txn.commit()
        .expect("write at the exclusive end must not conflict");

    let mut txn = engine.begin().unwrap();
    txn.add_read_conflict_range(b"m", b"p").unwrap();
    set_all(&*engine, &[("n", "inside")]);
    txn.set(b"q", b"1").unwrap();
    assert_eq!(
        txn.commit(),
        Err(KvError::Conflict),
        "write inside conflict range"
    );

    let mut txn = engine.begin().unwrap();
    txn.add_read_conflict_key(b"k").unwrap();
    set_all(&*engine, &[("k", "v")]);
    txn.set(b"q", b"1").unwrap();
    assert_eq!(
        txn.commit(),
        Err(KvError::Conflict),
        "write to conflict key"
    );

    // A cleared range overlapping the conflict range conflicts too.
    set_all(&*engine, &[("n", "again")]);
    let mut txn = engine.begin().unwrap();
    txn.add_read_conflict_key(b"zz").unwrap();
    let mut clearer = engine.begin().unwrap();
    clearer.clear_range(b"y", b"zzz").unwrap();
    clearer.commit().unwrap();
    txn.set(b"q", b"1").unwrap();
    assert_eq!(
        txn.commit(),
        Err(KvError::Conflict),
        "clear_range over conflict key"
    );
}

pub fn blind_writes_and_read_only_commits_succeed(factory: Factory) {
    let engine = factory();
    let mut t1 = engine.begin().unwrap();
    let mut t2 = engine.begin().unwrap();
    t1.set(b"k", b"1").unwrap();
    t2.set(b"k", b"2").unwrap();
    t1.commit().expect("blind write 1");
    t2.commit().expect("blind write 2");
    assert_eq!(
        get(&*engine, "k").as_deref(),
        Some(b"2".as_slice()),
        "last commit wins"
    );

    let mut reader = engine.begin().unwrap();
    assert_eq!(reader.get(b"k").unwrap().as_deref(), Some(b"2".as_slice()));
    set_all(&*engine, &[("k", "3")]);
    reader.commit().expect("read-only commit never conflicts");
}

pub fn write_skew_is_rejected(factory: Factory) {
    let engine = factory();
    set_all(&*engine, &[("x", "1"), ("y", "1")]);
    let mut a = engine.begin().unwrap();
    let mut b = engine.begin().unwrap();
    let ax = a.get(b"x").unwrap();
    let ay = a.get(b"y").unwrap();
    let bx = b.get(b"x").unwrap();
    let by = b.get(b"y").unwrap();
    assert!(ax.is_some() && ay.is_some() && bx.is_some() && by.is_some());
    a.set(b"y", b"0").unwrap();
    b.set(b"x", b"0").unwrap();
    a.commit().expect("first of the write-skew pair");
    assert_eq!(
        b.commit(),
        Err(KvError::Conflict),
        "write skew must be rejected"
    );
}

pub fn phantom_is_rejected(factory: Factory) {
    let engine = factory();
    set_all(&*engine, &[("item/1", "a"), ("item/2", "b")]);
    let mut a = engine.begin().unwrap();
    let items = a
        .get_range(b"item/", b"item0", RangeOptions::default())
        .unwrap();
    a.set(b"summary", items.kvs.len().to_string().as_bytes())
        .unwrap();
    let mut b = engine.begin().unwrap();
    b.set(b"item/3", b"c").unwrap();
    b.commit().expect("insert");
    assert_eq!(
        a.commit(),
        Err(KvError::Conflict),
        "phantom insert must be rejected"
    );
    assert_eq!(get(&*engine, "summary"), None);
}

pub fn concurrent_read_modify_write_counts_exactly(factory: Factory) {
    let engine = factory();
    let policy = RetryPolicy {
        attempts_max: 10_000,
        elapsed_max: Duration::from_secs(60),
        ..RetryPolicy::default()
    };
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let engine = Arc::clone(&engine);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..INCREMENTS_PER_THREAD {
                    run(&*engine, policy, |txn| {
                        let n = match txn.get(b"counter")? {
                            None => 0,
                            Some(v) => decode_u64(Some(v)),
                        };
                        txn.set(b"counter", &u64_value(n + 1))?;
                        Ok::<_, KvError>(())
                    })
                    .expect("increment within the retry policy");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("incrementer thread");
    }
    assert_eq!(
        decode_u64(get(&*engine, "counter")),
        (THREADS * INCREMENTS_PER_THREAD) as u64,
        "lost update"
    );
}

/// Accounts in the transfer check; each starts with [`TRANSFER_BALANCE`].
const TRANSFER_ACCOUNTS: u64 = 5;
const TRANSFER_BALANCE: u64 = 1_000;

fn account_key(i: u64) -> Vec<u8> {
    format!("acct/{i}").into_bytes()
}

/// Threads move money between accounts with read-modify-write transactions
/// while auditors sum every balance in one range read: each audit must see the
/// exact total (snapshots are consistent, commits atomic and serializable).
pub fn concurrent_transfers_preserve_the_total(factory: Factory) {
    let engine = factory();
    let mut txn = engine.begin().unwrap();
    for i in 0..TRANSFER_ACCOUNTS {
        txn.set(&account_key(i), &u64_value(TRANSFER_BALANCE))
            .unwrap();
    }
    txn.commit().unwrap();
    let total = TRANSFER_ACCOUNTS * TRANSFER_BALANCE;
    let policy = RetryPolicy {
        attempts_max: 10_000,
        elapsed_max: Duration::from_secs(60),
        ..RetryPolicy::default()
    };
    let threads: Vec<_> = (0..THREADS as u64)
        .map(|t| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                for i in 0..INCREMENTS_PER_THREAD as u64 {
                    if t % 2 == 0 {
                        let from = account_key((t + i) % TRANSFER_ACCOUNTS);
                        let to = account_key((t + 2 * i + 1) % TRANSFER_ACCOUNTS);
                        run(&*engine, policy, |txn| {
                            let a = decode_u64(txn.get(&from)?);
                            let b = decode_u64(txn.get(&to)?);
                            if from != to && a > 0 {
                                let amount = 1 + (i % a);
                                txn.set(&from, &u64_value(a - amount))?;
                                txn.set(&to, &u64_value(b + amount))?;
                            }
                            Ok::<_, KvError>(())
                        })
                        .expect("transfer");
                    } else {
                        let seen = run(&*engine, policy, |txn| {
                            let kvs = txn
                                .get_range(b"acct/", b"acct0", RangeOptions::default())?
                                .kvs;
                            Ok::<_, KvError>(
                                kvs.into_iter()
                                    .map(|kv| decode_u64(Some(kv.value)))
                                    .sum::<u64>(),
                            )
                        })
                        .expect("audit");
                        assert_eq!(seen, total, "audit saw a partial transfer");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("transfer thread");
    }
    let kvs = range_all(&*engine, "acct/", "acct0");
    let sum: u64 = kvs.into_iter().map(|kv| decode_u64(Some(kv.value))).sum();
    assert_eq!(sum, total, "money created or destroyed");
}

pub fn run_stops_at_retry_limit(factory: Factory) {
    let engine = factory();
    let policy = RetryPolicy {
        attempts_max: 3,
        elapsed_max: Duration::from_secs(30),
        backoff_initial: Duration::from_micros(10),
        backoff_max: Duration::from_micros(100),
    };
    let mut runs = 0;
    let result = run(&*engine, policy, |txn| {
        runs += 1;
        let _ = txn.get(b"hot")?;
        // Someone else writes what we read, every time.
        let mut other = engine.begin()?;
        other.set(b"hot", runs.to_string().as_bytes())?;
        other.commit()?;
        txn.set(b"mine", b"1")?;
        Ok::<_, KvError>(())
    });
    match result {
        Err(KvError::RetryLimit { attempts, last, .. }) => {
            assert_eq!(attempts, 3, "attempts");
            assert_eq!(*last, KvError::Conflict, "last error");
        }
        other => panic!("expected RetryLimit, got {other:?}"),
    }
    assert_eq!(runs, 3, "body runs");
    assert_eq!(get(&*engine, "mine"), None, "no attempt committed");
}

#[derive(Debug, PartialEq)]
enum BodyError {
    Kv(KvError),
    NotFound(&'static str),
}

impl From<KvError> for BodyError {
    fn from(e: KvError) -> Self {
        BodyError::Kv(e)
    }
}

impl AsKvError for BodyError {
    fn as_kv_error(&self) -> Option<&KvError> {
        match self {
            BodyError::Kv(e) => Some(e),
            BodyError::NotFound(_) => None,
        }
    }
}

pub fn run_passes_non_kv_errors_through(factory: Factory) {
    let engine = factory();
    let mut runs = 0;
    let result: Result<(), BodyError> = run(&*engine, RetryPolicy::default(), |txn| {
        runs += 1;
        txn.set(b"k", b"v")?;
        Err(BodyError::NotFound("inode 7"))
    });
    assert_eq!(result, Err(BodyError::NotFound("inode 7")));
    assert_eq!(runs, 1, "non-KV errors are not retried");
    assert_eq!(get(&*engine, "k"), None, "a failed body does not commit");
    let mut runs = 0;
    let result: Result<(), BodyError> = run(&*engine, RetryPolicy::default(), |txn| {
        runs += 1;
        txn.set(&vec![b'k'; KEY_BYTES_MAX + 1], b"v")?;
        Ok(())
    });
    assert!(
        matches!(result, Err(BodyError::Kv(KvError::KeyTooLarge { .. }))),
        "non-retryable KV errors pass through: {result:?}"
    );
    assert_eq!(runs, 1);
}

pub fn size_limits_are_enforced(factory: Factory) {
    let engine = factory();
    let mut txn = engine.begin().unwrap();
    let max_key = vec![b'k'; KEY_BYTES_MAX];
    let big_key = vec![b'k'; KEY_BYTES_MAX + 1];
    let max_value = vec![b'v'; VALUE_BYTES_MAX];
    let big_value = vec![b'v'; VALUE_BYTES_MAX + 1];
    txn.set(&max_key, &max_value)
        .expect("largest key and value");
    assert_eq!(
        txn.set(&big_key, b"v"),
        Err(KvError::KeyTooLarge {
            len: KEY_BYTES_MAX + 1,
            max: KEY_BYTES_MAX
        })
    );
    assert!(matches!(
        txn.clear(&big_key),
        Err(KvError::KeyTooLarge { .. })
    ));
    assert!(matches!(
        txn.atomic_op(&big_key, AtomicOp::Add, 1),
        Err(KvError::KeyTooLarge { .. })
    ));
    assert_eq!(
        txn.set(b"k", &big_value),
        Err(KvError::ValueTooLarge {
            len: VALUE_BYTES_MAX + 1,
            max: VALUE_BYTES_MAX
        })
    );
    txn.commit().expect("limits-sized write commits");
    assert_eq!(get(&*engine, "k"), None, "rejected writes are not applied");

    // Fill one transaction past TRANSACTION_BYTES_MAX: the error comes from a
    // mutation or, at the latest, from commit.
    let mut txn = engine.begin().unwrap();
    let value = vec![b'v'; VALUE_BYTES_MAX - 100];
    let writes = TRANSACTION_BYTES_MAX / value.len() + 2;
    let mut failed = None;
    for i in 0..writes {
        if let Err(e) = txn.set(format!("big/{i:06}").as_bytes(), &value) {
            failed = Some(e);
            break;
        }
    }
    let err = match failed {
        Some(e) => e,
        None => txn.commit().expect_err("oversized transaction must fail"),
    };
    assert!(
        matches!(err, KvError::TransactionTooLarge { .. }),
        "expected TransactionTooLarge, got {err:?}"
    );
}

pub fn inverted_ranges_are_rejected(factory: Factory) {
    let engine = factory();
    let mut txn = engine.begin().unwrap();
    assert_eq!(
        txn.get_range(b"b", b"a", RangeOptions::default()),
        Err(KvError::InvalidRange)
    );
    assert_eq!(txn.clear_range(b"b", b"a"), Err(KvError::InvalidRange));
    assert_eq!(
        txn.add_read_conflict_range(b"b", b"a"),
        Err(KvError::InvalidRange)
    );
    txn.clear_range(b"a", b"a").expect("empty clear_range");
    txn.add_read_conflict_range(b"a", b"a")
        .expect("empty conflict range");
    txn.commit().expect("commit after rejected calls");
}
