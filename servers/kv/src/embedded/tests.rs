//! Tests of the engine's own journal syncs (the conformance suite and the
//! crash tests are in `tests/embedded_conformance.rs`).

use super::journal_sync::JournalSync;
use super::*;
use crate::{KvEngine, VALUE_BYTES_MAX};

fn commit_value(engine: &EmbeddedEngine, key: &[u8], value: &[u8]) -> Result<(), KvError> {
    let mut txn = engine.begin()?;
    txn.set(key, value)?;
    txn.commit()
}

fn read(engine: &EmbeddedEngine, key: &[u8]) -> Option<Vec<u8>> {
    engine.begin().unwrap().snapshot_get(key).unwrap()
}

fn journal(engine: &EmbeddedEngine) -> &JournalSync {
    &engine.inner.journal
}

#[test]
fn journal_syncs_follow_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).unwrap();
    commit_value(&engine, b"first", b"1").unwrap();
    let first = journal(&engine).synced_journal();
    assert!(
        first.is_some(),
        "syncs go through our own descriptor: {:?}",
        std::fs::read_dir(dir.path()).unwrap().collect::<Vec<_>>()
    );
    // fjall moves to a new journal at a memtable flush once the journal
    // holds more than 64 MB: write 72 MB of values that do not compress,
    // then flush.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = || {
        (0..VALUE_BYTES_MAX)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<u8>>()
    };
    let mut last = Vec::new();
    for txn in 0..8u32 {
        let mut t = engine.begin().unwrap();
        for i in 0..90u32 {
            last = noise();
            t.set(format!("big-{txn}-{i}").as_bytes(), &last).unwrap();
        }
        t.commit().unwrap();
    }
    engine.inner.keyspace.rotate_memtable_and_wait().unwrap();
    commit_value(&engine, b"after", b"2").unwrap();
    let after = journal(&engine).synced_journal();
    let newest = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".jnl")?.parse::<u64>().ok()
        })
        .max();
    assert!(
        after > first,
        "fjall rotated its journal ({first:?} -> newest {newest:?}), so syncs moved on"
    );
    assert_eq!(
        after, newest,
        "the sync went to the journal fjall writes to"
    );
    drop(engine);
    let engine = EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).unwrap();
    assert_eq!(read(&engine, b"first").as_deref(), Some(&b"1"[..]));
    assert_eq!(read(&engine, b"after").as_deref(), Some(&b"2"[..]));
    assert_eq!(read(&engine, b"big-7-89"), Some(last));
}

#[test]
fn a_failed_journal_fsync_fails_that_commit_and_every_later_one() {
    for durability in [
        Durability::Sync,
        Durability::Periodic(Duration::from_secs(3600)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let engine = EmbeddedEngine::open(EmbeddedConfig {
            durability,
            ..EmbeddedConfig::new(dir.path())
        })
        .unwrap();
        commit_value(&engine, b"before", b"1").unwrap();
        engine.sync().unwrap();
        journal(&engine)
            .inject_errno
            .store(libc::EIO, Ordering::Relaxed);
        let failed = match durability {
            // The commit waits for its fsync, which fails.
            Durability::Sync => commit_value(&engine, b"during", b"2").unwrap_err(),
            // The commit returns at once; the next sync fails.
            Durability::Periodic(_) => {
                commit_value(&engine, b"during", b"2").unwrap();
                engine.sync().unwrap_err()
            }
        };
        assert!(
            matches!(&failed, KvError::Engine(m) if m.contains("fsync of the journal") && m.contains("Input/output error")),
            "{failed:?}"
        );
        // The disk is fine again, but what the failed fsync covered may be
        // lost: nothing commits on top of it, in either mode.
        journal(&engine).inject_errno.store(0, Ordering::Relaxed);
        let later = commit_value(&engine, b"later", b"3").unwrap_err();
        assert!(
            matches!(&later, KvError::Engine(m) if m.contains("an earlier fsync of the journal failed")),
            "{later:?}"
        );
        assert!(engine.sync().is_err(), "syncs keep failing");
        assert_eq!(read(&engine, b"later"), None);
        assert_eq!(read(&engine, b"before").as_deref(), Some(&b"1"[..]));
    }
}

#[test]
fn writes_may_wait_once_a_flush_backlog_nears_fjalls_limits() {
    assert!(!backlog_may_hold_writes(0, 0));
    assert!(!backlog_may_hold_writes(
        SEALED_MEMTABLES_CALM_MAX - 1,
        L0_TABLES_CALM_MAX - 1
    ));
    assert!(backlog_may_hold_writes(SEALED_MEMTABLES_CALM_MAX, 0));
    assert!(backlog_may_hold_writes(0, L0_TABLES_CALM_MAX));
    // Any sealed memtable means a flush is under way; fjall slows writers
    // from 20 level-0 runs.
    const _: () = assert!(SEALED_MEMTABLES_CALM_MAX == 1 && L0_TABLES_CALM_MAX < 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).expect("open");
    assert!(
        !engine.inner.journal.holds_fjalls_lock(),
        "syncs of its own"
    );
    assert!(!engine.writes_may_wait(), "a fresh engine has no backlog");
    // Flushed tables that compaction keeps up with are no backlog.
    for i in 0..3u8 {
        let mut txn = engine.begin().expect("begin");
        txn.set(&[b'k', i], b"value").expect("set");
        txn.commit().expect("commit");
        engine
            .inner
            .keyspace
            .rotate_memtable_and_wait()
            .expect("flush");
    }
    assert!(engine.inner.keyspace.table_count() >= 1);
    assert_eq!(engine.inner.keyspace.sealed_memtable_count(), 0);
    assert!(
        !engine.writes_may_wait(),
        "three flushed tables are no backlog"
    );
}
