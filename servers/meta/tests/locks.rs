//! File locks in MetaStore against the real embedded engine: POSIX range
//! rules, flock, F_GETLK answers, leases on an injected clock, limits and
//! bad input. Stored records are read back from the engine to check that
//! cleanup really removes them.

use std::sync::Arc;
use std::time::Duration;

use r3fs_kv::embedded::{Durability, EmbeddedConfig, EmbeddedEngine};
use r3fs_kv::{KvEngine, RangeOptions};
use r3fs_meta::clock::ManualClock;
use r3fs_meta::schema::{self, LockRecord};
use r3fs_meta::store::LOCKS_PER_INODE_MAX;
use r3fs_meta::{MetaConfig, MetaError, MetaStore};
use r3fs_wire::meta::*;

use LockKind::{Flock, Posix};
use LockType::{Read, Unlock, Write};

const EOF: u64 = LOCK_END_EOF;

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Arc<dyn KvEngine>,
    clock: Arc<ManualClock>,
    store: MetaStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = EmbeddedConfig::new(dir.path());
    config.durability = Durability::periodic_default();
    let engine: Arc<dyn KvEngine> = Arc::new(EmbeddedEngine::open(config).unwrap());
    let clock = Arc::new(ManualClock::new(Time::from_nanos(
        1_700_000_000_000_000_000,
    )));
    let store =
        MetaStore::with_clock(engine.clone(), MetaConfig::default(), None, clock.clone()).unwrap();
    Fixture {
        _dir: dir,
        engine,
        clock,
        store,
    }
}

impl Fixture {
    fn file(&self, name: &str) -> InodeId {
        self.store
            .create(&CreateRequest {
                user: User::root(),
                parent: ROOT_INODE,
                name: name.into(),
                perm: 0o644,
                exclusive: true,
                flags: OpenFlags::default(),
                client: 1,
            })
            .unwrap()
            .attr
            .inode
    }

    /// Every stored lock of `kind` on `inode`: (client, owner, start, end, write).
    fn stored(&self, inode: InodeId, kind: LockKind) -> Vec<(u64, u64, u64, u64, bool)> {
        let prefix = schema::lock_prefix(inode, kind);
        let end = r3fs_kv::prefix_end(&prefix).unwrap();
        let mut t = self.engine.begin().unwrap();
        let range = t.get_range(&prefix, &end, RangeOptions::default()).unwrap();
        range
            .kvs
            .iter()
            .map(|kv| {
                let (client, owner, start) = schema::lock_key_parts(&kv.key).unwrap();
                let rec: LockRecord = schema::decode(&kv.key, &kv.value).unwrap();
                (client, owner, start, rec.end, rec.write)
            })
            .collect()
    }

    /// The client's lock index: (inode, kind) pairs it holds locks on.
    fn index(&self, client: u64) -> Vec<(InodeId, LockKind)> {
        let prefix = schema::lock_index_prefix(client);
        let end = r3fs_kv::prefix_end(&prefix).unwrap();
        let mut t = self.engine.begin().unwrap();
        let range = t.get_range(&prefix, &end, RangeOptions::default()).unwrap();
        range
            .kvs
            .iter()
            .map(|kv| schema::lock_index_parts(&kv.key).unwrap())
            .collect()
    }

    fn has_lease(&self, client: u64) -> bool {
        let mut t = self.engine.begin().unwrap();
        t.get(&schema::lock_lease_key(client)).unwrap().is_some()
    }
}

/// A lock holder: (client, owner).
#[derive(Clone, Copy)]
struct Who(u64, u64);

const A: Who = Who(10, 1);
const B: Who = Who(20, 1);
/// Same client as A, another owner (another process or OFD).
const A2: Who = Who(10, 2);
const C: Who = Who(30, 1);

fn set(
    s: &MetaStore,
    inode: InodeId,
    who: Who,
    kind: LockKind,
    lock_type: LockType,
    start: u64,
    end: u64,
) -> Result<(), MetaError> {
    s.set_lock(&SetLockRequest {
        inode,
        client: who.0,
        owner: who.1,
        pid: 100 + who.1 as u32,
        kind,
        lock_type,
        start,
        end,
    })
}

fn get(
    s: &MetaStore,
    inode: InodeId,
    who: Who,
    kind: LockKind,
    lock_type: LockType,
    start: u64,
    end: u64,
) -> Result<Option<LockInfo>, MetaError> {
    s.get_lock(&GetLockRequest {
        inode,
        client: who.0,
        owner: who.1,
        kind,
        lock_type,
        start,
        end,
    })
}

#[track_caller]
fn check_errno<T: std::fmt::Debug>(result: Result<T, MetaError>, errno: i32) {
    match result {
        Err(e) => assert_eq!(e.errno(), Some(errno), "expected errno {errno}, got {e}"),
        Ok(v) => panic!("expected errno {errno}, got Ok({v:?})"),
    }
}

#[test]
fn posix_ranges_of_one_owner_merge_split_upgrade_and_downgrade() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    set(s, ino, A, Posix, Read, 0, 99).unwrap();
    set(s, ino, A, Posix, Read, 100, 199).unwrap();
    assert_eq!(f.stored(ino, Posix), [(10, 1, 0, 199, false)]);
    // Upgrade of the middle splits the read lock.
    set(s, ino, A, Posix, Write, 50, 59).unwrap();
    assert_eq!(
        f.stored(ino, Posix),
        [
            (10, 1, 0, 49, false),
            (10, 1, 50, 59, true),
            (10, 1, 60, 199, false)
        ]
    );
    // Downgrade merges it back.
    set(s, ino, A, Posix, Read, 50, 59).unwrap();
    assert_eq!(f.stored(ino, Posix), [(10, 1, 0, 199, false)]);
    // Unlock of the middle leaves two ranges; of the rest, none.
    set(s, ino, A, Posix, Unlock, 20, 29).unwrap();
    assert_eq!(
        f.stored(ino, Posix),
        [(10, 1, 0, 19, false), (10, 1, 30, 199, false)]
    );
    // To EOF, then unlocking everything.
    set(s, ino, A, Posix, Write, 150, EOF).unwrap();
    assert_eq!(
        f.stored(ino, Posix),
        [
            (10, 1, 0, 19, false),
            (10, 1, 30, 149, false),
            (10, 1, 150, EOF, true)
        ]
    );
    assert_eq!(f.index(10), [(ino, Posix)]);
    set(s, ino, A, Posix, Unlock, 0, EOF).unwrap();
    assert_eq!(f.stored(ino, Posix), []);
    assert_eq!(f.index(10), [], "no locks left, no index entry");
}

#[test]
fn read_locks_share_and_write_locks_exclude_other_owners() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    set(s, ino, A, Posix, Read, 0, 99).unwrap();
    set(s, ino, B, Posix, Read, 50, 149).unwrap();
    check_errno(set(s, ino, B, Posix, Write, 90, 95), libc::EAGAIN);
    // Another owner of the same client conflicts like anyone else.
    check_errno(set(s, ino, A2, Posix, Write, 0, 0), libc::EAGAIN);
    // The failed attempt changed nothing.
    assert_eq!(
        f.stored(ino, Posix),
        [(10, 1, 0, 99, false), (20, 1, 50, 149, false)]
    );
    // Beyond the other owners' ranges a write lock is fine.
    set(s, ino, A2, Posix, Write, 150, 200).unwrap();
    check_errno(set(s, ino, B, Posix, Read, 200, 300), libc::EAGAIN);
    // An owner's own locks never block it: A upgrades where only it reads.
    set(s, ino, A, Posix, Write, 0, 49).unwrap();
    check_errno(set(s, ino, A, Posix, Write, 0, 50), libc::EAGAIN);
    // After B unlocks, A can upgrade the rest.
    set(s, ino, B, Posix, Unlock, 0, EOF).unwrap();
    set(s, ino, A, Posix, Write, 0, 149).unwrap();
    assert_eq!(
        f.stored(ino, Posix),
        [(10, 1, 0, 149, true), (10, 2, 150, 200, true)]
    );
}

#[test]
fn flock_is_one_whole_file_lock_per_owner_and_ignores_posix_locks() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    // The range of a flock request is ignored.
    set(s, ino, A, Flock, Read, 5, 6).unwrap();
    set(s, ino, B, Flock, Read, 0, 0).unwrap();
    assert_eq!(
        f.stored(ino, Flock),
        [(10, 1, 0, EOF, false), (20, 1, 0, EOF, false)]
    );
    // POSIX locks live apart: an exclusive POSIX lock is granted anyway.
    set(s, ino, A2, Posix, Write, 0, EOF).unwrap();
    check_errno(set(s, ino, A2, Flock, Write, 0, 0), libc::EAGAIN);
    // A failed conversion drops the old lock, as Linux does.
    check_errno(set(s, ino, A, Flock, Write, 0, 0), libc::EAGAIN);
    assert_eq!(f.stored(ino, Flock), [(20, 1, 0, EOF, false)]);
    // Now B converts to exclusive; taking its own shared lock again is a no-op.
    set(s, ino, B, Flock, Write, 0, 0).unwrap();
    set(s, ino, B, Flock, Write, 0, 0).unwrap();
    check_errno(set(s, ino, A, Flock, Read, 0, 0), libc::EAGAIN);
    set(s, ino, B, Flock, Read, 0, 0).unwrap();
    set(s, ino, A, Flock, Read, 0, 0).unwrap();
    set(s, ino, B, Flock, Unlock, 0, 0).unwrap();
    assert_eq!(f.stored(ino, Flock), [(10, 1, 0, EOF, false)]);
    assert_eq!(f.stored(ino, Posix), [(10, 2, 0, EOF, true)]);
    // Directories take locks too.
    set(s, ROOT_INODE, B, Flock, Write, 0, 0).unwrap();
}

#[test]
fn getlk_reports_the_lowest_conflicting_lock_of_another_owner() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    assert_eq!(get(s, ino, A, Posix, Write, 0, EOF).unwrap(), None);
    set(s, ino, B, Posix, Read, 300, 399).unwrap();
    set(s, ino, A2, Posix, Write, 100, 199).unwrap();
    set(s, ino, A, Posix, Write, 0, 99).unwrap();
    let first = get(s, ino, A, Posix, Write, 0, EOF).unwrap().unwrap();
    assert_eq!(
        first,
        LockInfo {
            kind: Posix,
            lock_type: Write,
            start: 100,
            end: 199,
            client: 10,
            owner: 2,
            pid: 102,
        }
    );
    // A read probe passes read locks and the owner's own locks.
    assert_eq!(get(s, ino, A, Posix, Read, 0, 99).unwrap(), None);
    assert_eq!(get(s, ino, A, Posix, Read, 250, EOF).unwrap(), None);
    let b = get(s, ino, A, Posix, Write, 250, EOF).unwrap().unwrap();
    assert_eq!((b.client, b.start, b.lock_type), (20, 300, Read));
    assert_eq!(get(s, ino, A, Flock, Write, 0, 0).unwrap(), None);
    check_errno(get(s, ino, A, Posix, Unlock, 0, 1), libc::EINVAL);
}

#[test]
fn locks_of_an_expired_lease_are_ignored_and_cleaned() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    let other = f.file("g");
    set(s, ino, A, Posix, Write, 0, EOF).unwrap();
    set(s, other, A, Flock, Write, 0, 0).unwrap();
    let first = s.renew_lock_lease(A.0).unwrap();
    // Renewed in time, the locks hold across more than one lease duration.
    f.clock
        .advance(LOCK_LEASE_DURATION - Duration::from_secs(1));
    assert_eq!(s.renew_lock_lease(A.0).unwrap(), first);
    f.clock
        .advance(LOCK_LEASE_DURATION - Duration::from_secs(1));
    check_errno(set(s, ino, B, Posix, Read, 0, 0), libc::EAGAIN);
    // Not renewed: the lease runs out and the locks stop counting.
    f.clock.advance(LOCK_LEASE_DURATION);
    assert_eq!(get(s, ino, B, Posix, Write, 0, EOF).unwrap(), None);
    assert_eq!(f.stored(ino, Posix), [], "get_lock removed the dead lock");
    // B's own lease (started by its failed attempt) ran out too.
    check_errno(set(s, other, B, Flock, Write, 0, 0), libc::ENOLCK);
    s.renew_lock_lease(B.0).unwrap();
    set(s, other, B, Flock, Write, 0, 0).unwrap();
    assert_eq!(f.stored(other, Flock), [(20, 1, 0, EOF, true)]);
    assert_eq!(f.index(A.0), [], "A's index entries went with its locks");
    // A learns of the loss: taking a lock fails until it renews, and the
    // renewal hands out a new epoch.
    check_errno(set(s, ino, A, Posix, Read, 0, 0), libc::ENOLCK);
    let second = s.renew_lock_lease(A.0).unwrap();
    assert_ne!(second.epoch, first.epoch);
    set(s, ino, A, Posix, Read, 0, 0).unwrap();
    check_errno(set(s, other, A, Flock, Read, 0, 0), libc::EAGAIN);
}

#[test]
fn a_conflict_answer_still_removes_dead_locks() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    set(s, ino, A, Posix, Read, 0, 9).unwrap();
    f.clock.advance(LOCK_LEASE_DURATION / 2);
    set(s, ino, B, Posix, Read, 0, 9).unwrap();
    f.clock
        .advance(LOCK_LEASE_DURATION / 2 + Duration::from_secs(1));
    // A's lease is over, B's is not: B still blocks, A's lock is gone.
    check_errno(set(s, ino, C, Posix, Write, 0, 9), libc::EAGAIN);
    assert_eq!(f.stored(ino, Posix), [(20, 1, 0, 9, false)]);
}

#[test]
fn a_new_lease_voids_the_locks_of_the_old_one() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    set(s, ino, A, Posix, Write, 0, 9).unwrap();
    f.clock
        .advance(LOCK_LEASE_DURATION + Duration::from_secs(1));
    // A renews before anyone touched its old lock: the lock stays void.
    s.renew_lock_lease(A.0).unwrap();
    set(s, ino, B, Posix, Write, 0, 9).unwrap();
    check_errno(set(s, ino, A, Posix, Read, 5, 5), libc::EAGAIN);
}

#[test]
fn too_many_locks_on_one_inode_give_enolck() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    // Disjoint ranges with gaps, so nothing merges.
    for i in 0..LOCKS_PER_INODE_MAX as u64 {
        set(s, ino, A, Posix, Write, i * 10, i * 10 + 4).unwrap();
    }
    check_errno(
        set(s, ino, B, Posix, Read, 1_000_000, 1_000_001),
        libc::ENOLCK,
    );
    // Splitting a range would make one more.
    check_errno(set(s, ino, A, Posix, Unlock, 1, 2), libc::ENOLCK);
    // Changes that do not add a record still work.
    set(s, ino, A, Posix, Read, 0, 4).unwrap();
    set(s, ino, A, Posix, Unlock, 10, 14).unwrap();
    set(s, ino, B, Posix, Read, 1_000_000, 1_000_001).unwrap();
    check_errno(
        set(s, ino, B, Posix, Read, 2_000_000, 2_000_001),
        libc::ENOLCK,
    );
    // The limit is per kind.
    set(s, ino, B, Flock, Read, 0, 0).unwrap();
    s.release_locks(&ReleaseLocksRequest {
        inode: ino,
        client: A.0,
        owner: A.1,
        kind: Posix,
    })
    .unwrap();
    assert_eq!(f.stored(ino, Posix), [(20, 1, 1_000_000, 1_000_001, false)]);
}

#[test]
fn bad_lock_requests_get_posix_errnos() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    check_errno(set(s, ino, A, Posix, Read, 10, 9), libc::EINVAL);
    check_errno(get(s, ino, A, Posix, Read, 10, 9), libc::EINVAL);
    check_errno(set(s, 999_999, A, Posix, Read, 0, 9), libc::ENOENT);
    check_errno(get(s, 999_999, A, Posix, Read, 0, 9), libc::ENOENT);
    check_errno(set(s, 999_999, A, Flock, Write, 0, 0), libc::ENOENT);
    let link = s
        .symlink(&SymlinkRequest {
            user: User::root(),
            parent: ROOT_INODE,
            name: "l".into(),
            target: "f".into(),
        })
        .unwrap()
        .inode;
    check_errno(set(s, link, A, Flock, Write, 0, 0), libc::EINVAL);
    // Unlocking or releasing on a vanished inode is not an error: another
    // mount may have removed the file this one still had open.
    set(s, 999_999, A, Posix, Unlock, 0, EOF).unwrap();
    s.release_locks(&ReleaseLocksRequest {
        inode: 999_999,
        client: A.0,
        owner: A.1,
        kind: Flock,
    })
    .unwrap();
    assert_eq!(f.stored(ino, Posix), []);
}

#[test]
fn release_drops_one_owners_locks_of_one_kind() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    set(s, ino, A, Posix, Read, 0, 9).unwrap();
    set(s, ino, A, Posix, Write, 20, 29).unwrap();
    set(s, ino, A2, Posix, Read, 40, 49).unwrap();
    set(s, ino, A, Flock, Read, 0, 0).unwrap();
    let release = |who: Who, kind| {
        s.release_locks(&ReleaseLocksRequest {
            inode: ino,
            client: who.0,
            owner: who.1,
            kind,
        })
        .unwrap()
    };
    release(A, Posix);
    assert_eq!(f.stored(ino, Posix), [(10, 2, 40, 49, false)]);
    assert_eq!(f.stored(ino, Flock), [(10, 1, 0, EOF, false)]);
    assert_eq!(f.index(A.0), [(ino, Flock), (ino, Posix)]);
    release(A2, Posix);
    release(A, Flock);
    assert_eq!(f.index(A.0), []);
    set(s, ino, B, Posix, Write, 0, EOF).unwrap();
}

#[test]
fn drop_client_locks_removes_every_lock_and_the_lease() {
    let f = fixture();
    let s = &f.store;
    let files: Vec<InodeId> = (0..5).map(|i| f.file(&format!("f{i}"))).collect();
    for &ino in &files {
        set(s, ino, A, Posix, Write, 0, 9).unwrap();
        set(s, ino, A2, Flock, Read, 0, 0).unwrap();
        set(s, ino, B, Posix, Read, 10, 19).unwrap();
    }
    assert_eq!(f.index(A.0).len(), 10);
    s.drop_client_locks(&DropClientLocksRequest { client: A.0 })
        .unwrap();
    assert_eq!(f.index(A.0), []);
    assert!(!f.has_lease(A.0));
    for &ino in &files {
        assert_eq!(f.stored(ino, Posix), [(20, 1, 10, 19, false)]);
        assert_eq!(f.stored(ino, Flock), []);
        set(s, ino, B, Posix, Write, 0, 9).unwrap();
    }
    // Dropping again, or for a client with nothing, is fine.
    s.drop_client_locks(&DropClientLocksRequest { client: A.0 })
        .unwrap();
}

#[test]
fn removing_a_file_removes_its_locks() {
    let f = fixture();
    let s = &f.store;
    let ino = f.file("f");
    set(s, ino, A, Posix, Write, 0, 9).unwrap();
    set(s, ino, B, Flock, Write, 0, 0).unwrap();
    s.unlink(&UnlinkRequest {
        user: User::root(),
        parent: ROOT_INODE,
        name: "f".into(),
    })
    .unwrap();
    assert_eq!(f.stored(ino, Posix), []);
    assert_eq!(f.stored(ino, Flock), []);
    // The index entry outlives the file until the client drops its locks.
    assert_eq!(f.index(A.0), [(ino, Posix)]);
    s.drop_client_locks(&DropClientLocksRequest { client: A.0 })
        .unwrap();
    assert_eq!(f.index(A.0), []);
}

#[test]
fn racing_threads_have_one_write_lock_winner_per_round() {
    let f = fixture();
    let ino = f.file("f");
    let store = Arc::new(f.store);
    for round in 0..10u64 {
        let mut threads = Vec::new();
        for t in 0..4u64 {
            let store = store.clone();
            threads.push(std::thread::spawn(move || {
                set(&store, ino, Who(t, round), Posix, Write, 100, 199)
            }));
        }
        let mut winners = Vec::new();
        for (t, th) in threads.into_iter().enumerate() {
            match th.join().unwrap() {
                Ok(()) => winners.push(t as u64),
                Err(e) => assert_eq!(e.errno(), Some(libc::EAGAIN), "{e}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        set(&store, ino, Who(winners[0], round), Posix, Unlock, 0, EOF).unwrap();
    }
}
