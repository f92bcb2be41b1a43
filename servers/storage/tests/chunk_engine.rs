//! Behaviour of the local chunk engine: versions, CRCs, crashes, full disks.

mod common;

use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

use r3fs_storage::chunk::{
    ChunkEngine, ChunkError, ChunkId, ChunkMeta, ChunkUpdate, FaultPoint, SlotStats, BLOCK_BYTES,
    CHUNK_BYTES_MAX,
};

/// Chunk size used by most tests.
const CHUNK_SIZE: u32 = 64 * 1024;

fn open(dir: &Path) -> ChunkEngine {
    ChunkEngine::open(dir, CHUNK_SIZE).expect("open chunk engine")
}

fn cid(index: u64) -> ChunkId {
    ChunkId { inode: 7, index }
}

/// One step of a scenario; chunks are `cid(chunk)`.
#[derive(Debug, Clone)]
enum Op {
    Write {
        chunk: u64,
        ver: u64,
        chain: u64,
        off: u32,
        data: &'static [u8],
    },
    Commit {
        chunk: u64,
        ver: u64,
    },
    Abort {
        chunk: u64,
    },
    Read {
        chunk: u64,
        off: u32,
        len: u32,
    },
    ReadDirty {
        chunk: u64,
        off: u32,
        len: u32,
    },
    Truncate {
        chunk: u64,
        len: u32,
        ver: u64,
        chain: u64,
    },
    Remove {
        chunk: u64,
        ver: u64,
        chain: u64,
    },
    /// `apply_committed` of a write: staged and committed at once.
    ApplyWrite {
        chunk: u64,
        ver: u64,
        chain: u64,
        off: u32,
        data: &'static [u8],
    },
    /// `apply_committed` of a zeroing.
    ApplyZero {
        chunk: u64,
        ver: u64,
        off: u32,
        len: u32,
    },
    /// `apply_committed` of a removal.
    ApplyRemove {
        chunk: u64,
        ver: u64,
    },
}

fn error_name(e: &ChunkError) -> &'static str {
    match e {
        ChunkError::NotFound { .. } => "NotFound",
        ChunkError::NotCommitted { .. } => "NotCommitted",
        ChunkError::OutOfRange { .. } => "OutOfRange",
        ChunkError::VersionConflict { .. } => "VersionConflict",
        ChunkError::StaleVersion { .. } => "StaleVersion",
        ChunkError::OutOfOrder { .. } => "OutOfOrder",
        ChunkError::StaleChainVersion { .. } => "StaleChainVersion",
        ChunkError::NoPending { .. } => "NoPending",
        ChunkError::Corrupt { .. } => "Corrupt",
        ChunkError::InstallMismatch { .. } => "InstallMismatch",
        ChunkError::PayloadChecksum { .. } => "PayloadChecksum",
        ChunkError::BadMeta { .. } => "BadMeta",
        ChunkError::UnsupportedFormat { .. } => "UnsupportedFormat",
        ChunkError::NoSpace { .. } => "NoSpace",
        ChunkError::Io { .. } => "Io",
        ChunkError::Kv { .. } => "Kv",
        ChunkError::ChunkSizeTooLarge { .. } => "ChunkSizeTooLarge",
        ChunkError::Failed { .. } => "Failed",
    }
}

fn render_meta(m: &ChunkMeta) -> String {
    format!("c{} u{} len{}", m.commit_ver, m.update_ver, m.length)
}

/// Run one op and render its outcome as a short string.
fn run_op(engine: &ChunkEngine, op: &Op) -> String {
    let result = match *op {
        Op::Write {
            chunk,
            ver,
            chain,
            off,
            data,
        } => engine
            .write_pending(cid(chunk), ver, chain, off, data, CHUNK_SIZE)
            .map(|m| render_meta(&m)),
        Op::Commit { chunk, ver } => engine
            .commit(cid(chunk), ver)
            .map(|m| m.map_or("removed".to_string(), |m| render_meta(&m))),
        Op::Abort { chunk } => engine.abort_pending(cid(chunk)).map(|()| "aborted".into()),
        Op::Read { chunk, off, len } => engine
            .read(cid(chunk), off, len)
            .map(|(b, _)| format!("{:?}", String::from_utf8_lossy(&b))),
        Op::ReadDirty { chunk, off, len } => engine
            .read_committed_even_if_dirty(cid(chunk), off, len)
            .map(|(b, _)| format!("{:?}", String::from_utf8_lossy(&b))),
        Op::Truncate {
            chunk,
            len,
            ver,
            chain,
        } => engine
            .truncate(cid(chunk), len, ver, chain)
            .map(|m| render_meta(&m)),
        Op::Remove { chunk, ver, chain } => engine
            .remove(cid(chunk), ver, chain)
            .map(|m| m.map_or("absent".to_string(), |m| render_meta(&m))),
        Op::ApplyWrite {
            chunk,
            ver,
            chain,
            off,
            data,
        } => {
            let update = ChunkUpdate::Write {
                offset: off,
                data,
                chunk_size: CHUNK_SIZE,
                crc: crc_fast::crc32_iscsi(data),
            };
            engine
                .apply_committed(cid(chunk), ver, chain, update)
                .map(|m| m.map_or("absent".to_string(), |m| render_meta(&m)))
        }
        Op::ApplyZero {
            chunk,
            ver,
            off,
            len,
        } => {
            let update = ChunkUpdate::Zero { offset: off, len };
            engine
                .apply_committed(cid(chunk), ver, 1, update)
                .map(|m| m.map_or("absent".to_string(), |m| render_meta(&m)))
        }
        Op::ApplyRemove { chunk, ver } => engine
            .apply_committed(cid(chunk), ver, 1, ChunkUpdate::Remove)
            .map(|m| m.map_or("absent".to_string(), |m| render_meta(&m))),
    };
    match result {
        Ok(s) => s,
        Err(e) => format!("err {}", error_name(&e)),
    }
}

/// Run a scenario on a fresh engine; every step's outcome must match.
fn check(steps: &[(Op, &str)]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    for (i, (op, expect)) in steps.iter().enumerate() {
        let got = run_op(&engine, op);
        assert_eq!(got, *expect, "step {i}: {op:?}");
    }
}

use Op::*;

#[test]
fn pending_writes_are_invisible_until_commit() {
    check(&[
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotFound",
        ),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 1,
                off: 0,
                data: b"hello",
            },
            "c0 u1 len0",
        ),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotCommitted",
        ),
        (
            ReadDirty {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotFound",
        ),
        (Commit { chunk: 0, ver: 1 }, "c1 u1 len5"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"hello\"",
        ),
        (
            Write {
                chunk: 0,
                ver: 2,
                chain: 1,
                off: 0,
                data: b"HE",
            },
            "c1 u2 len5",
        ),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotCommitted",
        ),
        (
            ReadDirty {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"hello\"",
        ),
        (Commit { chunk: 0, ver: 2 }, "c2 u2 len5"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"HEllo\"",
        ),
    ]);
}

#[test]
fn apply_committed_stages_and_commits_in_one_step() {
    let w = |ver, off, data| ApplyWrite {
        chunk: 0,
        ver,
        chain: 1,
        off,
        data,
    };
    check(&[
        (
            ApplyZero {
                chunk: 0,
                ver: 1,
                off: 0,
                len: 4,
            },
            "absent",
        ),
        (ApplyRemove { chunk: 0, ver: 1 }, "absent"),
        (w(1, 0, b"hello"), "c1 u1 len5"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"hello\"",
        ),
        // A retry of the committed version succeeds; other bytes do not.
        (w(1, 0, b"hello"), "c1 u1 len5"),
        (w(1, 0, b"HELLO"), "err StaleVersion"),
        (w(3, 0, b"x"), "err OutOfOrder"),
        (w(2, 5, b" world"), "c2 u2 len11"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 20,
            },
            "\"hello world\"",
        ),
        (
            ApplyZero {
                chunk: 0,
                ver: 3,
                off: 0,
                len: 5,
            },
            "c3 u3 len11",
        ),
        (
            Read {
                chunk: 0,
                off: 5,
                len: 20,
            },
            "\" world\"",
        ),
        // A version left pending (the member was not the tail then) is
        // committed by the same update, and refused with other bytes.
        (
            Write {
                chunk: 0,
                ver: 4,
                chain: 1,
                off: 0,
                data: b"A",
            },
            "c3 u4 len11",
        ),
        (w(4, 0, b"B"), "err VersionConflict"),
        (w(4, 0, b"A"), "c4 u4 len11"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 2,
            },
            "\"A\\0\"",
        ),
        (
            Write {
                chunk: 0,
                ver: 5,
                chain: 1,
                off: 0,
                data: b"Z",
            },
            "c4 u5 len11",
        ),
        (ApplyRemove { chunk: 0, ver: 5 }, "err VersionConflict"),
        (Commit { chunk: 0, ver: 5 }, "c5 u5 len11"),
        (
            ApplyWrite {
                chunk: 0,
                ver: 6,
                chain: 0,
                off: 0,
                data: b"x",
            },
            "err StaleChainVersion",
        ),
        (ApplyRemove { chunk: 0, ver: 6 }, "absent"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 2,
            },
            "err NotFound",
        ),
    ]);
}

#[test]
fn apply_committed_frees_the_replaced_blocks_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = ChunkEngine::open(dir.path(), 4 * BLOCK_BYTES).expect("open");
    let id = cid(0);
    let data = vec![7u8; 2 * BLOCK_BYTES as usize];
    let apply = |ver, data: &[u8]| {
        let update = ChunkUpdate::Write {
            offset: 0,
            data,
            chunk_size: 4 * BLOCK_BYTES,
            crc: crc_fast::crc32_iscsi(data),
        };
        engine.apply_committed(id, ver, 1, update).expect("apply")
    };
    apply(1, &data);
    assert_eq!(engine.slot_stats(), SlotStats { total: 2, free: 0 });
    let meta = apply(2, &data[..BLOCK_BYTES as usize]).expect("chunk exists");
    assert!(!meta.is_dirty());
    // The write's block is fresh and the one it replaced is free at once;
    // the second block is shared with the old version.
    assert_eq!(engine.slot_stats(), SlotStats { total: 3, free: 1 });
    assert_eq!(
        engine
            .apply_committed(id, 3, 1, ChunkUpdate::Remove)
            .expect("remove"),
        None
    );
    assert_eq!(engine.slot_stats(), SlotStats { total: 3, free: 3 });
    drop(engine);
    let engine = ChunkEngine::open(dir.path(), 4 * BLOCK_BYTES).expect("reopen");
    assert_eq!(engine.slot_stats(), SlotStats { total: 3, free: 3 });
    assert_eq!(engine.meta(id).expect("meta"), None);
}

#[test]
fn offsets_gaps_and_reads_past_the_end() {
    check(&[
        (
            Write {
                chunk: 1,
                ver: 1,
                chain: 1,
                off: 3,
                data: b"ab",
            },
            "c0 u1 len0",
        ),
        (Commit { chunk: 1, ver: 1 }, "c1 u1 len5"),
        (
            Read {
                chunk: 1,
                off: 0,
                len: 100,
            },
            "\"\\0\\0\\0ab\"",
        ),
        (
            Read {
                chunk: 1,
                off: 4,
                len: 100,
            },
            "\"b\"",
        ),
        (
            Read {
                chunk: 1,
                off: 5,
                len: 100,
            },
            "\"\"",
        ),
        (
            Read {
                chunk: 1,
                off: 1000,
                len: 100,
            },
            "\"\"",
        ),
        (
            Read {
                chunk: 1,
                off: 1,
                len: 2,
            },
            "\"\\0\\0\"",
        ),
        (
            Write {
                chunk: 1,
                ver: 2,
                chain: 1,
                off: 7,
                data: b"z",
            },
            "c1 u2 len5",
        ),
        (Commit { chunk: 1, ver: 2 }, "c2 u2 len8"),
        (
            Read {
                chunk: 1,
                off: 0,
                len: 100,
            },
            "\"\\0\\0\\0ab\\0\\0z\"",
        ),
    ]);
}

#[test]
fn retried_writes_and_commits_are_idempotent() {
    check(&[
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 1,
                off: 0,
                data: b"abc",
            },
            "c0 u1 len0",
        ),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 1,
                off: 0,
                data: b"abc",
            },
            "c0 u1 len0",
        ),
        (Commit { chunk: 0, ver: 1 }, "c1 u1 len3"),
        (Commit { chunk: 0, ver: 1 }, "c1 u1 len3"),
        // The write already committed: a late retry succeeds.
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 1,
                off: 0,
                data: b"abc",
            },
            "c1 u1 len3",
        ),
        (
            Truncate {
                chunk: 0,
                len: 2,
                ver: 2,
                chain: 1,
            },
            "c1 u2 len3",
        ),
        (
            Truncate {
                chunk: 0,
                len: 2,
                ver: 2,
                chain: 1,
            },
            "c1 u2 len3",
        ),
        (Commit { chunk: 0, ver: 2 }, "c2 u2 len2"),
        (
            Truncate {
                chunk: 0,
                len: 2,
                ver: 2,
                chain: 1,
            },
            "c2 u2 len2",
        ),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"ab\"",
        ),
    ]);
}

#[test]
fn bad_versions_and_ranges_are_refused() {
    check(&[
        (
            Write {
                chunk: 0,
                ver: 2,
                chain: 1,
                off: 0,
                data: b"a",
            },
            "err OutOfOrder",
        ),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 5,
                off: CHUNK_SIZE,
                data: b"a",
            },
            "err OutOfRange",
        ),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 5,
                off: 0,
                data: b"abc",
            },
            "c0 u1 len0",
        ),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 5,
                off: 0,
                data: b"xyz",
            },
            "err VersionConflict",
        ),
        (
            Write {
                chunk: 0,
                ver: 2,
                chain: 5,
                off: 0,
                data: b"xyz",
            },
            "err OutOfOrder",
        ),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 4,
                off: 0,
                data: b"abc",
            },
            "err StaleChainVersion",
        ),
        (Commit { chunk: 0, ver: 2 }, "err NoPending"),
        (Commit { chunk: 9, ver: 1 }, "err NotFound"),
        (Commit { chunk: 0, ver: 1 }, "c1 u1 len3"),
        (Commit { chunk: 0, ver: 2 }, "err NoPending"),
        (Commit { chunk: 0, ver: 0 }, "err StaleVersion"),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 5,
                off: 0,
                data: b"xyz",
            },
            "err StaleVersion",
        ),
        (
            Write {
                chunk: 0,
                ver: 0,
                chain: 5,
                off: 0,
                data: b"abc",
            },
            "err StaleVersion",
        ),
        (
            Truncate {
                chunk: 0,
                len: CHUNK_SIZE + 1,
                ver: 2,
                chain: 5,
            },
            "err OutOfRange",
        ),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"abc\"",
        ),
    ]);
}

#[test]
fn abort_drops_only_the_pending_version() {
    check(&[
        (Abort { chunk: 0 }, "aborted"),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 1,
                off: 0,
                data: b"one",
            },
            "c0 u1 len0",
        ),
        (Abort { chunk: 0 }, "aborted"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotFound",
        ),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 1,
                off: 0,
                data: b"one",
            },
            "c0 u1 len0",
        ),
        (Commit { chunk: 0, ver: 1 }, "c1 u1 len3"),
        (
            Write {
                chunk: 0,
                ver: 2,
                chain: 1,
                off: 0,
                data: b"two!",
            },
            "c1 u2 len3",
        ),
        (Abort { chunk: 0 }, "aborted"),
        (Abort { chunk: 0 }, "aborted"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"one\"",
        ),
        (
            Write {
                chunk: 0,
                ver: 2,
                chain: 1,
                off: 0,
                data: b"2",
            },
            "c1 u2 len3",
        ),
        (Commit { chunk: 0, ver: 2 }, "c2 u2 len3"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"2ne\"",
        ),
    ]);
}

#[test]
fn truncate_and_remove_are_versioned() {
    check(&[
        (
            Truncate {
                chunk: 0,
                len: 3,
                ver: 1,
                chain: 1,
            },
            "c0 u1 len0",
        ),
        (Commit { chunk: 0, ver: 1 }, "c1 u1 len3"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"\\0\\0\\0\"",
        ),
        (
            Write {
                chunk: 0,
                ver: 2,
                chain: 1,
                off: 0,
                data: b"abcdef",
            },
            "c1 u2 len3",
        ),
        (Commit { chunk: 0, ver: 2 }, "c2 u2 len6"),
        (
            Truncate {
                chunk: 0,
                len: 2,
                ver: 3,
                chain: 1,
            },
            "c2 u3 len6",
        ),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotCommitted",
        ),
        (Commit { chunk: 0, ver: 3 }, "c3 u3 len2"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"ab\"",
        ),
        (
            Remove {
                chunk: 0,
                ver: 4,
                chain: 1,
            },
            "c3 u4 len2",
        ),
        (
            Remove {
                chunk: 0,
                ver: 4,
                chain: 1,
            },
            "c3 u4 len2",
        ),
        (
            Write {
                chunk: 0,
                ver: 4,
                chain: 1,
                off: 0,
                data: b"x",
            },
            "err VersionConflict",
        ),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotCommitted",
        ),
        (
            ReadDirty {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "\"ab\"",
        ),
        (Commit { chunk: 0, ver: 4 }, "removed"),
        (
            Read {
                chunk: 0,
                off: 0,
                len: 10,
            },
            "err NotFound",
        ),
        (
            Remove {
                chunk: 0,
                ver: 4,
                chain: 1,
            },
            "absent",
        ),
        (Commit { chunk: 0, ver: 4 }, "err NotFound"),
        (
            Write {
                chunk: 0,
                ver: 1,
                chain: 1,
                off: 0,
                data: b"new",
            },
            "c0 u1 len0",
        ),
    ]);
}

#[test]
fn open_refuses_chunks_over_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = ChunkEngine::open(dir.path(), CHUNK_BYTES_MAX + 1).expect_err("too large");
    assert_eq!(error_name(&err), "ChunkSizeTooLarge");
}

fn write_commit(engine: &ChunkEngine, id: ChunkId, ver: u64, off: u32, data: &[u8]) {
    engine
        .write_pending(id, ver, 1, off, data, CHUNK_SIZE)
        .expect("write_pending");
    engine.commit(id, ver).expect("commit");
}

/// Reads land in pooled buffers that held earlier payloads: a block with
/// no slot (a gap) must still read as zeros, never as what the buffer held.
#[test]
fn gaps_read_as_zeros_in_reused_read_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1024 * 1024;
    let engine = ChunkEngine::open(dir.path(), size).unwrap();
    let full = vec![0xabu8; size as usize];
    write_pending_commit(&engine, cid(1), &full, 0, size);
    // One block of data past three blocks of gap.
    let tail = vec![0x5au8; 100];
    let at = 3 * BLOCK_BYTES + 10;
    write_pending_commit(&engine, cid(2), &tail, at, size);
    for round in 0..20 {
        // Fill the pool with buffers full of 0xab, then read the gappy chunk.
        let held: Vec<_> = (0..4)
            .map(|_| engine.read(cid(1), 0, size).unwrap())
            .collect();
        assert!(held.iter().all(|(b, _)| b.iter().all(|&x| x == 0xab)));
        drop(held);
        let (got, meta) = engine.read(cid(2), 0, size).unwrap();
        assert_eq!(meta.length, at + 100);
        assert!(
            got[..at as usize].iter().all(|&x| x == 0),
            "round {round}: the gap reads as zeros"
        );
        assert_eq!(&got[at as usize..], &tail[..]);
    }
}

fn write_pending_commit(engine: &ChunkEngine, id: ChunkId, data: &[u8], off: u32, size: u32) {
    engine
        .write_pending(id, 1, 1, off, data, size)
        .expect("write_pending");
    engine.commit(id, 1).expect("commit");
}

#[test]
fn flipped_byte_on_disk_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let id = cid(0);
    write_commit(&engine, id, 1, 0, b"precious bytes");
    flip_byte(&engine, id, 1, 3);
    let err = engine.read(id, 0, 100).expect_err("corrupt");
    let ChunkError::Corrupt {
        id: got,
        expected,
        actual,
    } = err
    else {
        panic!("expected Corrupt, got {err:?}");
    };
    assert_eq!(got, id);
    assert_ne!(expected, actual);
    // A write built on corrupt bytes is refused too.
    let err = engine
        .write_pending(id, 2, 1, 0, b"x", CHUNK_SIZE)
        .expect_err("corrupt");
    assert_eq!(error_name(&err), "Corrupt");
}

/// A damaged committed copy is repaired with the same version's bytes from
/// elsewhere: only while its record is what the repairer saw, and only with
/// bytes that match the record's length and CRC.
#[test]
fn a_damaged_committed_copy_is_repaired_only_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let id = cid(0);
    write_commit(&engine, id, 1, 0, b"precious bytes");
    let seen = engine.meta(id).unwrap().unwrap();
    flip_byte(&engine, id, 1, 3);
    let wrong = engine.repair_committed(id, &seen, b"precious bytez");
    assert_eq!(error_name(&wrong.unwrap_err()), "InstallMismatch");
    let mut newer = seen;
    newer.commit_ver = 2;
    newer.update_ver = 2;
    assert!(
        !engine
            .repair_committed(id, &newer, b"precious bytes")
            .unwrap(),
        "not the record"
    );
    assert!(engine.read(id, 0, 100).is_err(), "still damaged");
    let before = engine.slot_stats();
    assert!(engine
        .repair_committed(id, &seen, b"precious bytes")
        .unwrap());
    assert_eq!(engine.read(id, 0, 100).unwrap().0, b"precious bytes");
    assert_eq!(engine.meta(id).unwrap().unwrap(), seen, "the same version");
    let taken = |s: SlotStats| s.total - s.free;
    assert_eq!(
        taken(engine.slot_stats()),
        taken(before),
        "the damaged slot was freed"
    );
    // A record with a pending version is not repaired that way.
    engine.write_pending(id, 2, 1, 0, b"P", CHUNK_SIZE).unwrap();
    let seen = engine.meta(id).unwrap().unwrap();
    assert!(!engine
        .repair_committed(id, &seen, b"precious bytes")
        .unwrap());
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(
        engine.read_committed_even_if_dirty(id, 0, 100).unwrap().0,
        &b"precious bytes"[..]
    );
}

/// Flip one bit of byte `offset` of version `ver` of `id` on disk.
fn flip_byte(engine: &ChunkEngine, id: ChunkId, ver: u64, offset: u32) {
    let (path, pos) = engine
        .block_location(id, ver, offset)
        .unwrap()
        .expect("a block on disk");
    common::flip_bits(&path, pos, 0x01);
}

#[test]
fn a_flipped_byte_fails_only_reads_of_its_block() {
    const BIG: u32 = 4 * BLOCK_BYTES;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = ChunkEngine::open(dir.path(), BIG).expect("open");
    let id = cid(0);
    let data: Vec<u8> = (0..3 * BLOCK_BYTES + 100)
        .map(|i| (i % 251) as u8)
        .collect();
    engine.write_pending(id, 1, 1, 0, &data, BIG).unwrap();
    engine.commit(id, 1).unwrap();
    flip_byte(&engine, id, 1, BLOCK_BYTES + 17);
    let b = BLOCK_BYTES as usize;
    // Blocks 0, 2 and 3 still read and verify.
    assert_eq!(engine.read(id, 0, BLOCK_BYTES).unwrap().0, &data[..b]);
    let (tail, _) = engine.read(id, 2 * BLOCK_BYTES + 5, BIG).unwrap();
    assert_eq!(tail, &data[2 * b + 5..]);
    // Any read touching block 1 is refused, whatever bytes it wants.
    for (off, len) in [(BLOCK_BYTES, 1), (BLOCK_BYTES - 1, 2), (0, BIG)] {
        let err = engine.read(id, off, len).expect_err("corrupt block");
        assert_eq!(error_name(&err), "Corrupt", "read {off}+{len}");
    }
    // A write over part of the bad block must read it, and is refused; one
    // that replaces it whole does not need it, and heals the chunk.
    let err = engine.write_pending(id, 2, 1, BLOCK_BYTES + 1, b"x", BIG);
    assert_eq!(error_name(&err.unwrap_err()), "Corrupt");
    let fresh = vec![7u8; b];
    engine
        .write_pending(id, 2, 1, BLOCK_BYTES, &fresh, BIG)
        .unwrap();
    engine.commit(id, 2).unwrap();
    let (all, meta) = engine.read(id, 0, BIG).unwrap();
    let mut want = data.clone();
    want[b..2 * b].copy_from_slice(&fresh);
    assert_eq!(all, want);
    assert_eq!(meta.crc, crc_fast::crc32_iscsi(&want));
}

#[test]
fn a_write_with_a_bad_payload_crc_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let id = cid(0);
    let data = b"payload";
    let err = engine
        .write_pending_checked(
            id,
            1,
            1,
            3,
            data,
            CHUNK_SIZE,
            crc_fast::crc32_iscsi(data) ^ 1,
        )
        .expect_err("bad crc");
    assert_eq!(error_name(&err), "PayloadChecksum");
    assert_eq!(engine.meta(id).unwrap(), None);
    assert_eq!(engine.slot_stats().total - engine.slot_stats().free, 0);
    engine
        .write_pending_checked(id, 1, 1, 3, data, CHUNK_SIZE, crc_fast::crc32_iscsi(data))
        .unwrap();
    engine.commit(id, 1).unwrap();
    assert_eq!(engine.read(id, 0, 100).unwrap().0, b"\0\0\0payload");
}

#[test]
fn reopen_keeps_committed_and_pending_versions_and_drops_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (cid(0), cid(1));
    {
        let engine = open(dir.path());
        write_commit(&engine, a, 1, 0, b"alpha");
        write_commit(&engine, b, 1, 0, b"beta");
        engine
            .write_pending(b, 2, 1, 0, b"BETA", CHUNK_SIZE)
            .unwrap();
        assert_eq!(engine.slot_stats(), SlotStats { total: 3, free: 0 });
        // A crash between writing a version's blocks and its metadata
        // commit leaves slots no record names.
        use std::os::unix::fs::FileExt;
        let (path, _) = engine.block_location(a, 1, 0).unwrap().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(b"junk", 5 * u64::from(BLOCK_BYTES))
            .unwrap();
    }
    let engine = open(dir.path());
    assert_eq!(engine.slot_stats(), SlotStats { total: 6, free: 3 });
    assert_eq!(engine.read(a, 0, 100).unwrap().0, b"alpha");
    let err = engine.read(b, 0, 100).expect_err("still pending");
    assert!(matches!(
        err,
        ChunkError::NotCommitted {
            committed_ver: 1,
            update_ver: 2,
            ..
        }
    ));
    engine.commit(b, 2).unwrap();
    assert_eq!(engine.read(b, 0, 100).unwrap().0, b"BETA");
    assert_eq!(
        engine.slot_stats(),
        SlotStats { total: 6, free: 4 },
        "one slot per committed chunk, the orphan and the old version free"
    );
    // New versions reuse free slots and never touch named ones.
    for index in 2..6 {
        write_commit(&engine, cid(index), 1, 0, b"filler");
    }
    assert_eq!(engine.slot_stats(), SlotStats { total: 6, free: 0 });
    assert_eq!(engine.read(a, 0, 100).unwrap().0, b"alpha");
    assert_eq!(engine.read(b, 0, 100).unwrap().0, b"BETA");
}

#[test]
fn listing_install_and_inode_removal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let other = ChunkId { inode: 8, index: 0 };
    for index in [0, 5, 2] {
        write_commit(
            &engine,
            cid(index),
            1,
            0,
            format!("chunk {index}").as_bytes(),
        );
    }
    write_commit(&engine, other, 1, 0, b"other inode");
    let ids: Vec<ChunkId> = engine
        .list()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, vec![cid(0), cid(2), cid(5), other]);
    let (last, meta) = engine.last_chunk(7).unwrap().expect("last chunk");
    assert_eq!(last, cid(5));
    assert_eq!(meta.length, 7);
    assert_eq!(engine.last_chunk(9).unwrap(), None);
    assert_eq!(engine.list_inode(8).unwrap().len(), 1);

    // Install: a resync replaces the chunk wholesale, pending version included.
    engine
        .write_pending(cid(2), 2, 1, 0, b"dirty", CHUNK_SIZE)
        .unwrap();
    let bytes = b"installed".to_vec();
    let mut meta = ChunkMeta {
        update_ver: 9,
        commit_ver: 9,
        chain_ver: 3,
        length: bytes.len() as u32,
        crc: crc_fast::crc32_iscsi(&bytes),
        ..ChunkMeta::default()
    };
    let bad = engine
        .install(cid(2), meta, b"installeD")
        .expect_err("crc mismatch");
    assert_eq!(error_name(&bad), "InstallMismatch");
    let installed = engine.install(cid(2), meta, &bytes).unwrap();
    assert_eq!((installed.commit_ver, installed.update_ver), (9, 9));
    assert_eq!(engine.read(cid(2), 0, 100).unwrap().0, bytes);
    meta.length = 1;
    assert!(engine.install(cid(2), meta, &bytes).is_err());

    assert_eq!(engine.remove_inode(7).unwrap(), 3);
    assert_eq!(engine.list_inode(7).unwrap(), vec![]);
    assert_eq!(engine.last_chunk(7).unwrap(), None);
    assert_eq!(engine.read(other, 0, 100).unwrap().0, b"other inode");
    assert_eq!(engine.meta(cid(0)).unwrap(), None);
}

#[test]
fn concurrent_writers_on_different_chunks_stay_consistent() {
    const THREADS: u64 = 8;
    const VERSIONS: u64 = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let engine = &engine;
            s.spawn(move || {
                for ver in 1..=VERSIONS {
                    let data = pattern(t, ver);
                    write_commit(engine, cid(t), ver, 0, &data);
                }
            });
        }
    });
    for t in 0..THREADS {
        let (bytes, meta) = engine.read(cid(t), 0, CHUNK_SIZE).unwrap();
        assert_eq!(meta.commit_ver, VERSIONS);
        assert_eq!(bytes, pattern(t, VERSIONS));
    }
}

/// Deterministic bytes for (chunk, version).
fn pattern(chunk: u64, ver: u64) -> Vec<u8> {
    let len = 100 + (ver * 37 + chunk * 11) % 900;
    (0..len).map(|i| (i * 7 + ver * 13 + chunk) as u8).collect()
}

/// Where the crash child writes version `ver` of a chunk.
fn crash_offset(ver: u64) -> u32 {
    ((ver * 131) % 3000) as u32
}

/// The bytes of a crash-test chunk at committed version `ver`.
fn crash_expected(chunk: u64, ver: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    for v in 1..=ver {
        let data = pattern(chunk, v);
        let off = crash_offset(v) as usize;
        if bytes.len() < off + data.len() {
            bytes.resize(off + data.len(), 0);
        }
        bytes[off..off + data.len()].copy_from_slice(&data);
    }
    bytes
}

const CRASH_CHILD_DIR_ENV: &str = "R3FS_CHUNK_CRASH_CHILD_DIR";
const CRASH_CHUNKS: u64 = 4;
/// Acknowledged commits before the parent kills the child.
const CRASH_ACKS_BEFORE_KILL: u64 = 120;
/// The child stops after this many steps if nobody kills it.
const CRASH_CHILD_STEPS_MAX: u64 = 1_000_000;

/// Not a test on its own: the body of the child process that
/// `acknowledged_commits_survive_kill_9` starts. Returns at once unless
/// `R3FS_CHUNK_CRASH_CHILD_DIR` is set.
#[test]
fn crash_child_writes_until_killed() {
    let Ok(dir) = std::env::var(CRASH_CHILD_DIR_ENV) else {
        return;
    };
    let engine = open(Path::new(&dir));
    let mut out = std::io::stdout().lock();
    for step in 0..CRASH_CHILD_STEPS_MAX {
        let chunk = step % CRASH_CHUNKS;
        let ver = step / CRASH_CHUNKS + 1;
        let id = cid(chunk);
        engine
            .write_pending(
                id,
                ver,
                1,
                crash_offset(ver),
                &pattern(chunk, ver),
                CHUNK_SIZE,
            )
            .expect("child write");
        engine.commit(id, ver).expect("child commit");
        writeln!(out, "ack {chunk} {ver}").expect("ack");
        out.flush().expect("flush ack");
    }
}

/// Not a test on its own: the child of
/// `versions_committed_at_once_survive_kill_9_whole_or_not_at_all`, which
/// applies each version as the tail does (`apply_committed`). Returns at
/// once unless `R3FS_CHUNK_CRASH_CHILD_DIR` is set.
#[test]
fn crash_child_applies_committed_until_killed() {
    let Ok(dir) = std::env::var(CRASH_CHILD_DIR_ENV) else {
        return;
    };
    let engine = open(Path::new(&dir));
    let mut out = std::io::stdout().lock();
    for step in 0..CRASH_CHILD_STEPS_MAX {
        let chunk = step % CRASH_CHUNKS;
        let ver = step / CRASH_CHUNKS + 1;
        let data = pattern(chunk, ver);
        let update = ChunkUpdate::Write {
            offset: crash_offset(ver),
            data: &data,
            chunk_size: CHUNK_SIZE,
            crc: crc_fast::crc32_iscsi(&data),
        };
        let meta = engine
            .apply_committed(cid(chunk), ver, 1, update)
            .expect("child apply")
            .expect("a written chunk exists");
        assert_eq!((meta.commit_ver, meta.update_ver), (ver, ver));
        writeln!(out, "ack {chunk} {ver}").expect("ack");
        out.flush().expect("flush ack");
    }
}

#[test]
fn acknowledged_commits_survive_kill_9() {
    crash_child_and_check("crash_child_writes_until_killed", CrashLeaves::MaybePending);
}

#[test]
fn versions_committed_at_once_survive_kill_9_whole_or_not_at_all() {
    crash_child_and_check(
        "crash_child_applies_committed_until_killed",
        CrashLeaves::NeverPending,
    );
}

/// What the version in flight at the kill may leave behind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CrashLeaves {
    /// Staged and committed in two steps: it may stay pending.
    MaybePending,
    /// One metadata commit: committed or absent, never pending.
    NeverPending,
}

/// Runs the crash child `child_test`, kills it after
/// `CRASH_ACKS_BEFORE_KILL` acknowledged versions, reopens its target and
/// checks that every acknowledged version survived with the right bytes.
fn crash_child_and_check(child_test: &str, leaves: CrashLeaves) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut acked = [0u64; CRASH_CHUNKS as usize];
    let mut acks = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child stdout");
        let mut words = line.split_whitespace();
        if words.next() != Some("ack") {
            continue; // libtest's own output
        }
        let chunk: usize = words.next().and_then(|w| w.parse().ok()).expect("chunk");
        let ver: u64 = words.next().and_then(|w| w.parse().ok()).expect("ver");
        acked[chunk] = ver;
        acks += 1;
        // Keep reading after the kill: acks the child wrote before it died
        // are acknowledged too (it may be several steps ahead of us).
        if acks == CRASH_ACKS_BEFORE_KILL {
            child.kill().expect("SIGKILL child");
        }
    }
    let _ = child.wait().expect("reap child");
    assert!(
        acks >= CRASH_ACKS_BEFORE_KILL,
        "child stopped early after {acks} acks"
    );
    // The step after the last acknowledged one may have gone further.
    let in_flight = (acks % CRASH_CHUNKS) as usize;
    let engine = open(dir.path());
    for (chunk, &acked_ver) in acked.iter().enumerate() {
        let id = cid(chunk as u64);
        let meta = engine.meta(id).unwrap().expect("acknowledged chunk exists");
        let newer_allowed = u64::from(chunk == in_flight);
        assert!(
            meta.commit_ver >= acked_ver && meta.commit_ver <= acked_ver + newer_allowed,
            "chunk {chunk}: committed {} but acknowledged {}",
            meta.commit_ver,
            acked_ver
        );
        assert!(
            meta.update_ver <= acked_ver + newer_allowed,
            "chunk {chunk}: {meta:?}"
        );
        if leaves == CrashLeaves::NeverPending {
            assert!(!meta.is_dirty(), "chunk {chunk} half applied: {meta:?}");
        }
        let (bytes, _) = engine
            .read_committed_even_if_dirty(id, 0, CHUNK_SIZE)
            .expect("committed bytes with a valid crc");
        assert_eq!(
            bytes,
            crash_expected(chunk as u64, meta.commit_ver),
            "chunk {chunk}"
        );
    }
}

#[test]
fn full_disk_is_no_space_and_loses_nothing_acknowledged() {
    const TMPFS_SIZE: &str = "8m";
    const WRITE_BYTES: usize = 256 * 1024;
    const WRITES_MAX: u64 = 200;
    let guard = match common::mount_tmpfs(TMPFS_SIZE) {
        Ok(guard) => guard,
        Err(reason) => {
            println!("skipped: cannot mount tmpfs ({reason})");
            return;
        }
    };
    let engine = match ChunkEngine::open(guard.dir.path(), CHUNK_BYTES_MAX) {
        Ok(engine) => engine,
        Err(e) => {
            println!("skipped: engine does not open on a {TMPFS_SIZE} tmpfs: {e}");
            return;
        }
    };
    let mut committed = Vec::new();
    let mut no_space = None;
    for index in 0..WRITES_MAX {
        let id = cid(index);
        let data = vec![index as u8; WRITE_BYTES];
        let result = engine
            .write_pending(id, 1, 1, 0, &data, CHUNK_BYTES_MAX)
            .and_then(|_| engine.commit(id, 1));
        match result {
            Ok(_) => committed.push(id),
            Err(e) => {
                no_space = Some(e);
                break;
            }
        }
    }
    let err = no_space.expect("the tmpfs must fill up");
    println!("{} chunks committed before: {err}", committed.len());
    assert_eq!(error_name(&err), "NoSpace", "{err:?}");
    assert!(!committed.is_empty());
    for id in &committed {
        let (bytes, _) = engine
            .read(*id, 0, CHUNK_BYTES_MAX)
            .expect("acknowledged chunk");
        assert_eq!(bytes, vec![id.index as u8; WRITE_BYTES]);
    }
    drop(engine);
    let engine = ChunkEngine::open(guard.dir.path(), CHUNK_BYTES_MAX).expect("reopen");
    for id in &committed {
        let (bytes, _) = engine.read(*id, 0, CHUNK_BYTES_MAX).expect("after reopen");
        assert_eq!(bytes.len(), WRITE_BYTES);
    }
}

#[test]
fn writes_stop_at_the_space_reserve_while_commits_and_removals_go_on() {
    let guard = match common::mount_tmpfs("16m") {
        Ok(guard) => guard,
        Err(reason) => {
            println!("skipped: cannot mount tmpfs ({reason})");
            return;
        }
    };
    let engine = ChunkEngine::open(guard.dir.path().join("t"), CHUNK_SIZE).expect("open");
    let staged = cid(0);
    engine
        .write_pending(
            staged,
            1,
            1,
            0,
            b"staged before the disk filled",
            CHUNK_SIZE,
        )
        .unwrap();
    // Something else fills the disk until less than the reserve is free.
    let filler = guard.dir.path().join("filler");
    let block = vec![0xaau8; 256 * 1024];
    let mut file = std::fs::File::create(&filler).unwrap();
    let reserve = r3fs_storage::chunk::SPACE_RESERVE_BYTES;
    loop {
        file.write_all(&block).unwrap();
        let free = fs_free_bytes(guard.dir.path());
        if free < reserve {
            assert!(free > 64 * 1024, "the filler left room for metadata");
            break;
        }
    }
    file.sync_all().unwrap();
    // A new version is refused, though its bytes would fit...
    let err = engine
        .write_pending(cid(1), 1, 1, 0, b"tiny", CHUNK_SIZE)
        .unwrap_err();
    assert_eq!(error_name(&err), "NoSpace", "{err:?}");
    assert!(engine.meta(cid(1)).unwrap().is_none());
    // ...while metadata changes still have room.
    engine.commit(staged, 1).unwrap();
    engine.remove(staged, 2, 1).unwrap();
    assert!(engine.commit(staged, 2).unwrap().is_none());
    drop(file);
    std::fs::remove_file(&filler).unwrap();
    engine
        .write_pending(cid(1), 1, 1, 0, b"room again", CHUNK_SIZE)
        .unwrap();
    engine.commit(cid(1), 1).unwrap();
    drop(engine);
}

fn fs_free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().nth(1).unwrap().trim().parse().unwrap()
}

mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const CHUNKS: u64 = 3;
    const OPS_MAX: usize = 60;
    const MODEL_CHUNK_SIZE: u32 = 64;

    #[derive(Debug, Clone)]
    enum MOp {
        Write {
            chunk: u64,
            ver_delta: i8,
            off: u32,
            len: u32,
            byte: u8,
        },
        Truncate {
            chunk: u64,
            ver_delta: i8,
            len: u32,
        },
        Commit {
            chunk: u64,
            ver_delta: i8,
        },
        Abort {
            chunk: u64,
        },
        Read {
            chunk: u64,
        },
        /// Close and reopen the engine (a clean restart: free slots rebuilt).
        Reopen,
    }

    #[derive(Debug, Default, Clone)]
    struct ModelChunk {
        commit_ver: u64,
        committed: Vec<u8>,
        pending: Option<Vec<u8>>,
    }

    /// Chunk size of the multi-block model: four blocks.
    const BIG_CHUNK_SIZE: u32 = 4 * BLOCK_BYTES;

    /// Offsets near block boundaries, and lengths within and across blocks.
    fn big_op() -> impl Strategy<Value = MOp> {
        let chunk = 0..CHUNKS;
        let delta = prop_oneof![8 => Just(1i8), 1 => Just(0i8), 1 => Just(-1i8)];
        let at = (0..=4u32, -3i64..4).prop_map(|(k, d)| {
            (i64::from(k * BLOCK_BYTES) + d).clamp(0, i64::from(BIG_CHUNK_SIZE)) as u32
        });
        let len = prop_oneof![
            3 => 0..12u32,
            1 => Just(BLOCK_BYTES - 3),
            1 => Just(BLOCK_BYTES),
            1 => Just(2 * BLOCK_BYTES + 5),
        ];
        prop_oneof![
            4 => (chunk.clone(), delta.clone(), at.clone(), len, any::<u8>())
                .prop_map(|(chunk, ver_delta, off, len, byte)| MOp::Write { chunk, ver_delta, off, len, byte }),
            1 => (chunk.clone(), delta, at)
                .prop_map(|(chunk, ver_delta, len)| MOp::Truncate { chunk, ver_delta, len }),
            3 => (chunk.clone(), prop_oneof![4 => Just(1i8), 1 => Just(0i8)])
                .prop_map(|(chunk, ver_delta)| MOp::Commit { chunk, ver_delta }),
            1 => chunk.clone().prop_map(|chunk| MOp::Abort { chunk }),
            2 => chunk.prop_map(|chunk| MOp::Read { chunk }),
            1 => Just(MOp::Reopen),
        ]
    }

    fn op() -> impl Strategy<Value = MOp> {
        let chunk = 0..CHUNKS;
        let delta = prop_oneof![8 => Just(1i8), 1 => Just(0i8), 1 => Just(2i8), 1 => Just(-1i8)];
        prop_oneof![
            4 => (chunk.clone(), delta.clone(), 0..MODEL_CHUNK_SIZE + 4, 0..12u32, any::<u8>())
                .prop_map(|(chunk, ver_delta, off, len, byte)| MOp::Write { chunk, ver_delta, off, len, byte }),
            1 => (chunk.clone(), delta.clone(), 0..MODEL_CHUNK_SIZE)
                .prop_map(|(chunk, ver_delta, len)| MOp::Truncate { chunk, ver_delta, len }),
            3 => (chunk.clone(), prop_oneof![4 => Just(1i8), 1 => Just(0i8), 1 => Just(2i8)])
                .prop_map(|(chunk, ver_delta)| MOp::Commit { chunk, ver_delta }),
            1 => chunk.clone().prop_map(|chunk| MOp::Abort { chunk }),
            3 => chunk.prop_map(|chunk| MOp::Read { chunk }),
            1 => Just(MOp::Reopen),
        ]
    }

    fn target_ver(m: &ModelChunk, delta: i8) -> u64 {
        (m.commit_ver as i64 + i64::from(delta)).max(0) as u64
    }

    /// The model's verdict on staging `new` as version `ver`: Ok or an error name.
    fn stage(
        m: &mut ModelChunk,
        ver: u64,
        new: Vec<u8>,
        retry_ok: bool,
    ) -> Result<(), &'static str> {
        if ver <= m.commit_ver {
            return if ver == m.commit_ver && m.commit_ver > 0 && retry_ok {
                Ok(())
            } else {
                Err("StaleVersion")
            };
        }
        if ver != m.commit_ver + 1 {
            return Err("OutOfOrder");
        }
        match &m.pending {
            Some(p) if *p == new => Ok(()),
            Some(_) => Err("VersionConflict"),
            None => {
                m.pending = Some(new);
                Ok(())
            }
        }
    }

    fn apply(m: &mut ModelChunk, op: &MOp, size: u32) -> Result<Option<Vec<u8>>, &'static str> {
        match *op {
            MOp::Write {
                ver_delta,
                off,
                len,
                byte,
                ..
            } => {
                if off + len > size {
                    return Err("OutOfRange");
                }
                let data = vec![byte; len as usize];
                let (start, end) = (off as usize, (off + len) as usize);
                let retry_ok = m.committed.get(start..end) == Some(&data[..]);
                let mut new = m.committed.clone();
                if new.len() < end {
                    new.resize(end, 0);
                }
                new[start..end].copy_from_slice(&data);
                stage(m, target_ver(m, ver_delta), new, retry_ok).map(|()| None)
            }
            MOp::Truncate { ver_delta, len, .. } => {
                let retry_ok = m.committed.len() == len as usize;
                let mut new = m.committed.clone();
                new.resize(len as usize, 0);
                stage(m, target_ver(m, ver_delta), new, retry_ok).map(|()| None)
            }
            MOp::Commit { ver_delta, .. } => {
                let ver = target_ver(m, ver_delta);
                if m.commit_ver == 0 && m.pending.is_none() {
                    return Err("NotFound");
                }
                if ver == m.commit_ver {
                    return Ok(None);
                }
                match m.pending.take() {
                    Some(p) if ver == m.commit_ver + 1 => {
                        m.committed = p;
                        m.commit_ver = ver;
                        Ok(None)
                    }
                    other => {
                        m.pending = other;
                        Err("NoPending")
                    }
                }
            }
            MOp::Abort { .. } => {
                m.pending = None;
                Ok(None)
            }
            MOp::Reopen => Ok(None),
            MOp::Read { .. } => {
                if m.commit_ver == 0 && m.pending.is_none() {
                    Err("NotFound")
                } else if m.pending.is_some() {
                    Err("NotCommitted")
                } else {
                    Ok(Some(m.committed.clone()))
                }
            }
        }
    }

    fn run_engine(
        engine: &ChunkEngine,
        op: &MOp,
        ver_of: impl Fn(u64, i8) -> u64,
        size: u32,
    ) -> Result<Option<Vec<u8>>, String> {
        let name = |e: ChunkError| error_name(&e).to_string();
        match *op {
            MOp::Write {
                chunk,
                ver_delta,
                off,
                len,
                byte,
            } => engine
                .write_pending(
                    cid(chunk),
                    ver_of(chunk, ver_delta),
                    1,
                    off,
                    &vec![byte; len as usize],
                    size,
                )
                .map(|_| None)
                .map_err(name),
            MOp::Truncate {
                chunk,
                ver_delta,
                len,
            } => engine
                .truncate(cid(chunk), len, ver_of(chunk, ver_delta), 1)
                .map(|_| None)
                .map_err(name),
            MOp::Commit { chunk, ver_delta } => engine
                .commit(cid(chunk), ver_of(chunk, ver_delta))
                .map(|_| None)
                .map_err(name),
            MOp::Abort { chunk } => engine
                .abort_pending(cid(chunk))
                .map(|()| None)
                .map_err(name),
            MOp::Read { chunk } => engine
                .read(cid(chunk), 0, size)
                .map(|(b, _)| Some(b))
                .map_err(name),
            MOp::Reopen => unreachable!("the runner reopens"),
        }
    }

    fn chunk_of(op: &MOp) -> u64 {
        match *op {
            MOp::Write { chunk, .. }
            | MOp::Truncate { chunk, .. }
            | MOp::Commit { chunk, .. }
            | MOp::Abort { chunk }
            | MOp::Read { chunk } => chunk,
            MOp::Reopen => 0,
        }
    }

    /// Run `ops` against a fresh engine of chunk size `size` and the model,
    /// checking outcomes and invariants after every step.
    fn run_model(ops: &[MOp], size: u32) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut engine = ChunkEngine::open(dir.path(), size).expect("open");
        let mut model: HashMap<u64, ModelChunk> = HashMap::new();
        for (step, op) in ops.iter().enumerate() {
            if let MOp::Reopen = op {
                drop(engine);
                engine = ChunkEngine::open(dir.path(), size).expect("reopen");
            }
            let chunk = chunk_of(op);
            let before = model.entry(chunk).or_default().clone();
            let ver_of = |_: u64, delta: i8| target_ver(&before, delta);
            let got = match op {
                MOp::Reopen => Ok(None),
                _ => run_engine(&engine, op, ver_of, size),
            };
            let m = model.entry(chunk).or_default();
            let want = apply(m, op, size).map_err(str::to_string);
            prop_assert_eq!(&got, &want, "step {} {:?}", step, op);
            // Invariants on the engine's side after every step, every chunk.
            let mut slots_max = 0;
            for (&c, m) in &model {
                if let Some(meta) = engine.meta(cid(c)).expect("meta") {
                    prop_assert!(meta.commit_ver <= meta.update_ver);
                    prop_assert_eq!(meta.commit_ver, m.commit_ver);
                    prop_assert_eq!(meta.is_dirty(), m.pending.is_some());
                    prop_assert_eq!(meta.length as usize, m.committed.len());
                    if meta.commit_ver > 0 {
                        let (bytes, _) = engine
                            .read_committed_even_if_dirty(cid(c), 0, size)
                            .expect("committed");
                        prop_assert_eq!(&bytes, &m.committed);
                        prop_assert_eq!(meta.crc, crc_fast::crc32_iscsi(&bytes));
                    }
                    if let Some(p) = &m.pending {
                        let bytes = engine
                            .read_version(cid(c), meta.update_ver)
                            .expect("pending");
                        prop_assert_eq!(bytes.as_deref(), Some(&p[..]));
                    }
                    let blocks = |n: usize| n.div_ceil(BLOCK_BYTES as usize) as u64;
                    slots_max += blocks(m.committed.len());
                    slots_max += m.pending.as_ref().map_or(0, |p| blocks(p.len()));
                } else {
                    prop_assert_eq!(m.commit_ver, 0);
                    prop_assert!(m.pending.is_none());
                }
            }
            let stats = engine.slot_stats();
            prop_assert!(
                stats.total - stats.free <= slots_max,
                "slots in use {:?} exceed the versions' blocks {}",
                stats,
                slots_max
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn random_operations_match_a_model(ops in proptest::collection::vec(op(), 1..OPS_MAX)) {
            run_model(&ops, MODEL_CHUNK_SIZE)?;
        }

        #[test]
        fn random_multi_block_operations_match_a_model(
            ops in proptest::collection::vec(big_op(), 1..OPS_MAX)
        ) {
            run_model(&ops, BIG_CHUNK_SIZE)?;
        }
    }
}

#[test]
fn the_pending_version_can_be_read_whole_for_re_forwarding() {
    let dir = tempfile::tempdir().unwrap();
    let engine = r3fs_storage::chunk::ChunkEngine::open(dir.path(), 1 << 20).unwrap();
    let id = r3fs_storage::chunk::ChunkId { inode: 1, index: 0 };
    assert!(engine.read_pending(id).unwrap().is_none(), "no chunk");
    engine.write_pending(id, 1, 1, 0, b"base", 1 << 20).unwrap();
    engine.commit(id, 1).unwrap();
    assert!(engine.read_pending(id).unwrap().is_none(), "clean chunk");
    engine.write_pending(id, 2, 1, 6, b"xy", 1 << 20).unwrap();
    let (bytes, meta) = engine.read_pending(id).unwrap().unwrap();
    assert_eq!(&bytes[..], b"base\0\0xy");
    assert_eq!((meta.update_ver, meta.commit_ver), (2, 1));
}

#[test]
fn a_target_of_another_format_is_refused_with_a_clear_error() {
    // A fresh target is stamped with this build's format and reopens.
    let dir = tempfile::tempdir().unwrap();
    drop(ChunkEngine::open(dir.path(), 1 << 20).unwrap());
    let stamp = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
    assert!(stamp.contains(&r3fs_storage::chunk::FORMAT_VERSION.to_string()));
    drop(ChunkEngine::open(dir.path(), 1 << 20).unwrap());

    // Another version in the stamp.
    std::fs::write(dir.path().join("FORMAT"), "r3fs chunk engine format 99\n").unwrap();
    let Err(err) = ChunkEngine::open(dir.path(), 1 << 20) else {
        panic!("a target of another format opened");
    };
    assert!(matches!(err, ChunkError::UnsupportedFormat { .. }), "{err}");
    assert!(err.to_string().contains("format 99"), "{err}");

    // A metadata store without a stamp: written before formats were stamped.
    std::fs::remove_file(dir.path().join("FORMAT")).unwrap();
    let Err(err) = ChunkEngine::open(dir.path(), 1 << 20) else {
        panic!("a target of another format opened");
    };
    assert!(err.to_string().contains("no FORMAT file"), "{err}");
}

/// The slot holding byte 0 of version `ver` of `id`.
fn slot_of(engine: &ChunkEngine, id: ChunkId, ver: u64) -> u64 {
    let (_, pos) = engine
        .block_location(id, ver, 0)
        .expect("location")
        .expect("a block on disk");
    pos / u64::from(BLOCK_BYTES)
}

#[test]
fn an_unsynced_commit_switches_at_once_and_frees_its_slots_only_once_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let (a, b) = (cid(0), cid(1));
    let block = vec![1u8; BLOCK_BYTES as usize];
    let newer = vec![2u8; BLOCK_BYTES as usize];
    engine
        .write_pending(a, 1, 1, 0, &block, CHUNK_SIZE)
        .expect("stage a1");
    engine.commit(a, 1).expect("commit a1");
    let old = slot_of(&engine, a, 1);
    // Two slots free for good (aborted stages).
    let mut aborted = Vec::new();
    for c in [cid(2), cid(3)] {
        engine
            .write_pending(c, 1, 1, 0, &block, CHUNK_SIZE)
            .expect("stage");
        aborted.push(slot_of(&engine, c, 1));
    }
    for c in [cid(2), cid(3)] {
        engine.abort_pending(c).expect("abort");
    }
    engine
        .write_pending(a, 2, 1, 0, &newer, CHUNK_SIZE)
        .expect("stage a2");
    let meta = engine
        .commit_unsynced(a, 2)
        .expect("commit a2")
        .expect("chunk");
    assert_eq!((meta.commit_ver, meta.is_dirty()), (2, false));
    assert_eq!(engine.read(a, 0, 4).expect("read").0, vec![2u8; 4]);
    // The old block no record names counts as free but is not reused while
    // a crash could still bring back the record naming it.
    assert_eq!(engine.slot_stats(), SlotStats { total: 3, free: 2 });
    engine
        .write_pending(b, 1, 1, 0, &block, CHUNK_SIZE)
        .expect("stage b1");
    let b1 = slot_of(&engine, b, 1);
    assert_ne!(b1, old, "reused before durable");
    assert!(aborted.contains(&b1));
    // That stage's durable commit covered the switch: now it is reused.
    engine.commit(b, 1).expect("commit b1");
    engine
        .write_pending(b, 2, 1, 0, &newer, CHUNK_SIZE)
        .expect("stage b2");
    assert_eq!(slot_of(&engine, b, 2), old);
    engine.commit_unsynced(b, 2).expect("commit b2");
    // Short of free slots, a stage makes the queued frees durable rather
    // than grow the file: b1's slot is reused, the file keeps three slots.
    engine
        .write_pending(a, 3, 1, 0, &block, CHUNK_SIZE)
        .expect("stage a3");
    assert_eq!(slot_of(&engine, a, 3), b1);
    assert_eq!(engine.slot_stats().total, 3);
    engine.commit(a, 3).expect("commit a3");
    drop(engine);
    let engine = open(dir.path());
    assert_eq!(engine.read(a, 0, 4).expect("read a").0, vec![1u8; 4]);
    assert_eq!(engine.read(b, 0, 4).expect("read b").0, vec![2u8; 4]);
    assert_eq!(engine.slot_stats(), SlotStats { total: 3, free: 1 });
}

#[test]
fn unsynced_commits_of_many_chunks_at_once_keep_every_slot_accounted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    const THREADS: u64 = 8;
    const VERSIONS: u64 = 40;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let engine = &engine;
            s.spawn(move || {
                for v in 1..=VERSIONS {
                    let data = vec![(t * 31 + v) as u8; BLOCK_BYTES as usize];
                    engine
                        .write_pending(cid(t), v, 1, 0, &data, CHUNK_SIZE)
                        .expect("stage");
                    engine.commit_unsynced(cid(t), v).expect("commit");
                }
            });
        }
    });
    for t in 0..THREADS {
        let (bytes, meta) = engine.read(cid(t), 0, 4).expect("read");
        assert_eq!(meta.commit_ver, VERSIONS);
        assert_eq!(bytes, vec![(t * 31 + VERSIONS) as u8; 4]);
    }
    let stats = engine.slot_stats();
    assert_eq!(
        stats.total - stats.free,
        THREADS,
        "one block per chunk in use"
    );
}

/// `apply_pending` calls `prepared` once a version has passed every check
/// and its slots are taken, and on every success, but never for a refusal:
/// a chain member forwards the version at that call, so whatever can refuse
/// it must come first. After the call only the disk can fail the stage,
/// and then the committed version is untouched and the slots are free again.
#[test]
fn apply_pending_is_prepared_only_past_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let write = |offset: u32, data: &'static [u8], crc: u32| ChunkUpdate::Write {
        offset,
        data,
        chunk_size: CHUNK_SIZE,
        crc,
    };
    let ok = |data: &'static [u8]| write(0, data, crc_fast::crc32_iscsi(data));
    let apply = |ver: u64, chain: u64, update: ChunkUpdate<'_>| {
        let mut calls = 0;
        let result = engine.apply_pending(cid(0), ver, chain, update, Some(&mut || calls += 1));
        (result, calls)
    };
    let (meta, calls) = apply(1, 2, ok(b"one"));
    assert_eq!((meta.unwrap().unwrap().update_ver, calls), (1, 1));
    // A retry of the pending version is prepared too (it goes on again).
    let (meta, calls) = apply(1, 2, ok(b"one"));
    assert_eq!((meta.unwrap().unwrap().update_ver, calls), (1, 1));
    let refusals = [
        (
            "other bytes for the pending version",
            apply(1, 2, ok(b"two")),
        ),
        ("out of order", apply(3, 2, ok(b"two"))),
        ("stale chain version", apply(2, 1, ok(b"two"))),
        ("payload checksum", apply(2, 2, write(0, b"two", 7))),
        (
            "past the chunk size",
            apply(2, 2, write(CHUNK_SIZE - 1, b"two", 0)),
        ),
    ];
    for (what, (result, calls)) in refusals {
        assert!(result.is_err(), "{what}: {result:?}");
        assert_eq!(calls, 0, "{what}");
    }
    engine.commit(cid(0), 1).unwrap();
    // A retry of the committed version succeeds and is not prepared:
    // nothing goes on from here.
    let (meta, calls) = apply(1, 2, ok(b"one"));
    assert_eq!((meta.unwrap().unwrap().commit_ver, calls), (1, 0));
    // Zeroing a missing chunk keeps it missing: a success, prepared.
    let mut calls = 0;
    let zero = ChunkUpdate::Zero { offset: 0, len: 3 };
    let none = engine.apply_pending(cid(9), 1, 2, zero, Some(&mut || calls += 1));
    assert!(matches!(none, Ok(None)), "{none:?}");
    assert_eq!(calls, 1);

    let before = engine.slot_stats();
    engine.inject_faults(FaultPoint::BlockWrite, Some(libc::EIO));
    let (result, calls) = apply(2, 2, ok(b"two"));
    assert!(matches!(result, Err(ChunkError::Io { .. })), "{result:?}");
    assert_eq!(calls, 1, "the disk fails after the version was prepared");
    let taken = |s: SlotStats| s.total - s.free;
    assert_eq!(
        taken(engine.slot_stats()),
        taken(before),
        "no slot stays taken"
    );
    // A successor may have committed version 2: the target is out of
    // service from now on, whatever is asked, even with the disk back.
    engine.inject_faults(FaultPoint::BlockWrite, None);
    let reason = engine.failure().expect("out of service").to_string();
    assert!(
        reason.contains("version 2") && reason.contains("os error 5"),
        "{reason}"
    );
    for refused in [
        engine.meta(cid(0)).map(drop),
        engine.read(cid(0), 0, 3).map(drop),
        engine.list().map(drop),
        apply(2, 2, ok(b"two")).0.map(drop),
    ] {
        assert!(
            matches!(refused, Err(ChunkError::Failed { .. })),
            "{refused:?}"
        );
    }
    // What it holds is the committed version 1, as a reopen shows.
    drop(engine);
    reopens_with_only_committed(dir.path(), cid(0), 1, b"one");
}

/// After a reopen of `dir`, `id` holds version `ver` committed, with
/// nothing pending, and reads `bytes`.
fn reopens_with_only_committed(dir: &Path, id: ChunkId, ver: u64, bytes: &[u8]) {
    let engine = open(dir);
    let meta = engine.meta(id).unwrap().unwrap();
    assert!(!meta.is_dirty() && meta.commit_ver == ver, "{meta:?}");
    let len = bytes.len() as u32;
    assert_eq!(engine.read(id, 0, len).unwrap().0, bytes);
}

/// A failed `fdatasync` of the data file takes the target out of service:
/// the writes it covered (other writers' too) may be lost, and a later
/// `fdatasync` that succeeds would not say so. The failure hook runs once,
/// and what was committed before is intact after a reopen.
#[test]
fn a_failed_data_sync_takes_the_target_out_of_service() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let hooked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = hooked.clone();
    engine.on_failure(|_| panic!("replaced"));
    engine.on_failure(move |reason| {
        assert!(reason.contains("fdatasync"), "{reason}");
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let write = |data: &'static [u8]| ChunkUpdate::Write {
        offset: 0,
        data,
        chunk_size: CHUNK_SIZE,
        crc: crc_fast::crc32_iscsi(data),
    };
    engine.apply_committed(cid(0), 1, 1, write(b"one")).unwrap();
    engine.inject_faults(FaultPoint::DataSync, Some(libc::EIO));
    let failed = engine.apply_pending(cid(0), 2, 1, write(b"two"), None);
    assert!(matches!(failed, Err(ChunkError::Io { .. })), "{failed:?}");
    engine.inject_faults(FaultPoint::DataSync, None);
    let reason = engine.failure().expect("out of service").to_string();
    assert!(reason.contains("os error 5"), "{reason}");
    let refused = engine.apply_pending(cid(1), 1, 1, write(b"new"), None);
    assert!(
        matches!(refused, Err(ChunkError::Failed { .. })),
        "{refused:?}"
    );
    engine.fail("again".into());
    assert_eq!(hooked.load(Ordering::SeqCst), 1, "the hook runs once");
    drop(engine);
    reopens_with_only_committed(dir.path(), cid(0), 1, b"one");
}

/// A metadata write that fails (here: another process filled the disk)
/// leaves the store refusing every later write, so the target leaves
/// service at once, and the node can report it; a reopen, with room again,
/// finds everything committed before.
#[test]
fn a_failed_metadata_write_takes_the_target_out_of_service() {
    let guard = match common::mount_tmpfs("16m") {
        Ok(guard) => guard,
        Err(reason) => {
            println!("skipped: cannot mount tmpfs ({reason})");
            return;
        }
    };
    let dir = guard.dir.path().join("t");
    let engine = ChunkEngine::open(&dir, CHUNK_SIZE).expect("open");
    write_commit(&engine, cid(0), 1, 0, b"kept");
    let filler = guard.dir.path().join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    while file.write_all(&[0xaa; 4096]).is_ok() {}
    // Chunks without blocks: each a metadata write only.
    let failed = (1..100_000)
        .map(|i| {
            engine
                .write_pending(cid(i), 1, 1, 0, b"", CHUNK_SIZE)
                .and_then(|_| engine.commit(cid(i), 1))
        })
        .find_map(Result::err)
        .expect("the metadata store must meet the full disk");
    assert_eq!(error_name(&failed), "NoSpace", "{failed:?}");
    let reason = engine.failure().expect("out of service").to_string();
    assert!(reason.contains("metadata store"), "{reason}");
    drop(file);
    std::fs::remove_file(&filler).unwrap();
    let refused = engine.write_pending(cid(0), 2, 1, 0, b"new", CHUNK_SIZE);
    assert_eq!(error_name(&refused.unwrap_err()), "Failed");
    drop(engine);
    let engine = ChunkEngine::open(&dir, CHUNK_SIZE).expect("reopen");
    assert_eq!(engine.read(cid(0), 0, 10).unwrap().0, b"kept");
    write_commit(&engine, cid(0), 2, 0, b"KEPT");
}
