//! File locks: flock(2) and POSIX record locks, shared by every mount.
//!
//! Semantics follow Linux. POSIX locks of one (client, owner) never conflict
//! with each other: a new lock replaces the owner's overlapping ranges and
//! merges with touching ranges of the same type, and an unlock of the middle
//! of a range leaves two ranges. Different owners conflict when their ranges
//! overlap and one of them is a write lock. A flock lock is one whole-file
//! lock per (client, owner); converting it first drops the old lock, so a
//! failed conversion leaves none (as Linux, which avoids two readers
//! deadlocking on upgrade). flock and POSIX locks never conflict.
//!
//! Meta never waits: a conflict answers EAGAIN. A lock is valid while its
//! client's lease (`LKLS`, see [`crate::schema`]) exists, has the lock's
//! epoch, and has not expired. Invalid locks are ignored and removed by the
//! transaction that finds them; a conflict answer still commits that cleanup.
//!
//! # Limits
//! At most [`LOCKS_PER_INODE_MAX`] lock records of each kind on one inode
//! (beyond: ENOLCK); `drop_client_locks` removes [`LOCK_DROP_BATCH_MAX`]
//! inodes' locks per transaction, for at most [`LOCK_DROP_ROUNDS_MAX`] rounds.

use std::collections::BTreeMap;

use r3fs_kv::RangeOptions;
use r3fs_wire::meta::{
    DropClientLocksRequest, FileType, GetLockRequest, InodeId, LockInfo, LockKind, LockLease,
    LockType, ReleaseLocksRequest, SetLockRequest, Time, LOCK_END_EOF, LOCK_LEASE_DURATION,
};

use super::{MetaStore, Tx};
use crate::error::{errno, fail, MetaError};
use crate::schema::{self, LockLeaseRecord, LockRecord};

/// Most lock records (ranges) of one kind on one inode.
pub const LOCKS_PER_INODE_MAX: usize = 1024;
/// Index entries (inode and kind) one `drop_client_locks` transaction clears.
pub const LOCK_DROP_BATCH_MAX: usize = 256;
/// Transactions one `drop_client_locks` runs before giving up (a client that
/// keeps locking while its locks are dropped).
pub const LOCK_DROP_ROUNDS_MAX: usize = 4096;

/// A lock as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    client: u64,
    owner: u64,
    start: u64,
    rec: LockRecord,
}

impl Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.rec.end
    }

    fn info(&self, kind: LockKind) -> LockInfo {
        LockInfo {
            kind,
            lock_type: if self.rec.write {
                LockType::Write
            } else {
                LockType::Read
            },
            start: self.start,
            end: self.rec.end,
            client: self.client,
            owner: self.owner,
            pid: self.rec.pid,
        }
    }
}

/// One range of one owner, inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub start: u64,
    pub end: u64,
    pub write: bool,
    pub pid: u32,
    pub epoch: u64,
}

/// What a `set_lock` transaction decided; a conflict still commits the
/// cleanup (and a flock conversion's drop) it did.
enum Outcome {
    Done,
    Conflict(LockInfo),
}

impl MetaStore {
    /// `F_SETLK` / `flock(LOCK_NB)`: take, change or drop a lock; EAGAIN on
    /// a conflict. Taking a lock starts the client's lease if it has none, and
    /// fails with ENOLCK if it expired (the client must renew and learn its
    /// locks are lost). Unlocking never fails on a missing inode: the file may
    /// have been removed elsewhere while this client held it open.
    pub fn set_lock(&self, req: &SetLockRequest) -> Result<(), MetaError> {
        let (start, end) = lock_range(req.kind, req.start, req.end)?;
        let fresh_epoch: u64 = rand::random();
        let outcome = self.run(|tx| {
            let want_write = match req.lock_type {
                LockType::Read => Some(false),
                LockType::Write => Some(true),
                LockType::Unlock => None,
            };
            let epoch = match want_write {
                Some(_) => {
                    lockable(tx, req.inode)?;
                    Some(own_lease(tx, req.client, fresh_epoch)?)
                }
                None => None,
            };
            let locks = InodeLocks::load(tx, req.inode, req.kind)?;
            let (mine, others) = locks.split_owner(req.client, req.owner);
            let new = match (want_write, epoch) {
                (Some(write), Some(epoch)) => Some(Range {
                    start,
                    end,
                    write,
                    pid: req.pid,
                    epoch,
                }),
                _ => None,
            };
            let (desired, outcome) = match req.kind {
                LockKind::Posix => posix_decide(&mine, &others, start, end, new),
                LockKind::Flock => flock_decide(&mine, &others, new),
            };
            if desired.len() > mine.len() && others.len() + desired.len() > LOCKS_PER_INODE_MAX {
                fail!(
                    ENOLCK,
                    "inode {} has no room for another {:?} lock ({} of at most {LOCKS_PER_INODE_MAX})",
                    req.inode,
                    req.kind,
                    others.len() + mine.len()
                );
            }
            locks.write_owner(tx, req.client, req.owner, &mine, &desired)?;
            Ok(outcome)
        })?;
        match outcome {
            Outcome::Done => Ok(()),
            Outcome::Conflict(c) => Err(errno!(
                EAGAIN,
                "{:?} lock {}..={} of inode {} conflicts with a {:?} lock {}..={} of client {:#x} owner {:#x} pid {}",
                req.kind,
                start,
                end,
                req.inode,
                c.lock_type,
                c.start,
                c.end,
                c.client,
                c.owner,
                c.pid
            )),
        }
    }

    /// `F_GETLK`: the valid lock of another owner that would block this one,
    /// the one with the lowest start (then lowest client, owner), or None.
    pub fn get_lock(&self, req: &GetLockRequest) -> Result<Option<LockInfo>, MetaError> {
        let (start, end) = lock_range(req.kind, req.start, req.end)?;
        let write = match req.lock_type {
            LockType::Read => false,
            LockType::Write => true,
            LockType::Unlock => fail!(EINVAL, "F_GETLK asks about a read or write lock"),
        };
        self.run(|tx| {
            lockable(tx, req.inode)?;
            let locks = InodeLocks::load(tx, req.inode, req.kind)?;
            let (mine, others) = locks.split_owner(req.client, req.owner);
            locks.write_owner(tx, req.client, req.owner, &mine, &mine)?;
            Ok(first_conflict(&others, start, end, write).map(|h| h.info(req.kind)))
        })
    }

    /// Drops every lock of `kind` that (client, owner) holds on the inode.
    /// Reads only that client's locks there, so it conflicts with nobody
    /// else's calls; an unknown inode has no locks to drop.
    pub fn release_locks(&self, req: &ReleaseLocksRequest) -> Result<(), MetaError> {
        self.run(|tx| {
            let held = scan(
                tx,
                &schema::lock_client_prefix(req.inode, req.kind, req.client),
            )?;
            let mut left = 0;
            for h in &held {
                if h.owner == req.owner {
                    let key = schema::lock_key(req.inode, req.kind, h.client, h.owner, h.start);
                    tx.t.clear(&key)?;
                } else {
                    left += 1;
                }
            }
            if !held.is_empty() && left == 0 {
                tx.t.clear(&schema::lock_index_key(req.client, req.inode, req.kind))?;
            }
            Ok(())
        })
    }

    /// Extends a client's lock lease, or starts a new one (new epoch) if it
    /// has none or it expired; the locks of an older epoch are void.
    pub fn renew_lock_lease(&self, client: u64) -> Result<LockLease, MetaError> {
        let fresh_epoch: u64 = rand::random();
        self.run(|tx| {
            let old = read_lease(tx, client)?;
            let epoch = match old {
                Some(lease) if lease.expires > tx.now => lease.epoch,
                Some(lease) if lease.epoch == fresh_epoch => fresh_epoch.wrapping_add(1),
                _ => fresh_epoch,
            };
            write_lease(tx, client, epoch)?;
            Ok(LockLease { epoch })
        })
    }

    /// Drops a client's lease (voiding all its locks at once) and then its
    /// locks, [`LOCK_DROP_BATCH_MAX`] inodes per transaction. The client
    /// must not take locks meanwhile.
    pub fn drop_client_locks(&self, req: &DropClientLocksRequest) -> Result<(), MetaError> {
        let client = req.client;
        for _ in 0..LOCK_DROP_ROUNDS_MAX {
            let more = self.run(|tx| {
                tx.t.clear(&schema::lock_lease_key(client))?;
                let prefix = schema::lock_index_prefix(client);
                let end = r3fs_kv::prefix_end(&prefix).expect("index prefix has a non-0xff byte");
                let opts = RangeOptions {
                    limit: LOCK_DROP_BATCH_MAX,
                    ..RangeOptions::default()
                };
                let range = tx.t.get_range(&prefix, &end, opts)?;
                for kv in &range.kvs {
                    let (inode, kind) = schema::lock_index_parts(&kv.key)?;
                    let locks = schema::lock_client_prefix(inode, kind, client);
                    let end = r3fs_kv::prefix_end(&locks).expect("lock prefix has a non-0xff byte");
                    tx.t.clear_range(&locks, &end)?;
                    tx.t.clear(&kv.key)?;
                }
                Ok(range.more)
            })?;
            if !more {
                return Ok(());
            }
        }
        fail!(
            EAGAIN,
            "client {client:#x} kept taking locks while they were dropped"
        )
    }
}

/// The range a request locks: flock locks the whole file.
fn lock_range(kind: LockKind, start: u64, end: u64) -> Result<(u64, u64), MetaError> {
    match kind {
        LockKind::Flock => Ok((0, LOCK_END_EOF)),
        LockKind::Posix if end < start => {
            fail!(EINVAL, "lock range {start}..={end} ends before it starts")
        }
        LockKind::Posix => Ok((start, end)),
    }
}

/// Checks the inode exists and may carry locks (regular files and directories).
fn lockable(tx: &mut Tx<'_>, inode: InodeId) -> Result<(), MetaError> {
    let rec = tx.existing(inode)?;
    match rec.file_type {
        FileType::Regular | FileType::Directory => Ok(()),
        other => fail!(
            EINVAL,
            "inode {inode} is a {other:?}; only files and directories take locks"
        ),
    }
}

fn read_lease(tx: &mut Tx<'_>, client: u64) -> Result<Option<LockLeaseRecord>, MetaError> {
    let key = schema::lock_lease_key(client);
    match tx.t.get(&key)? {
        Some(bytes) => Ok(Some(schema::decode(&key, &bytes)?)),
        None => Ok(None),
    }
}

fn write_lease(tx: &mut Tx<'_>, client: u64, epoch: u64) -> Result<(), MetaError> {
    let lease = LockLeaseRecord {
        epoch,
        expires: lease_end(tx.now),
    };
    tx.t.set(&schema::lock_lease_key(client), &schema::encode(&lease))?;
    Ok(())
}

fn lease_end(now: Time) -> Time {
    let duration = u64::try_from(LOCK_LEASE_DURATION.as_nanos()).unwrap_or(u64::MAX);
    Time::from_nanos(now.as_nanos().saturating_add(duration))
}

/// The epoch a client takes new locks under: its live lease's, or a new
/// lease's if it has none. ENOLCK if its lease expired: the client must
/// renew first and so learn that its locks are gone.
fn own_lease(tx: &mut Tx<'_>, client: u64, fresh_epoch: u64) -> Result<u64, MetaError> {
    match read_lease(tx, client)? {
        Some(lease) if lease.expires > tx.now => Ok(lease.epoch),
        Some(_) => fail!(
            ENOLCK,
            "lock lease of client {client:#x} expired: its locks are lost until it renews the lease"
        ),
        None => {
            write_lease(tx, client, fresh_epoch)?;
            Ok(fresh_epoch)
        }
    }
}

/// Every lock record under `prefix`, in key order; ENOLCK past the limit.
fn scan(tx: &mut Tx<'_>, prefix: &[u8]) -> Result<Vec<Held>, MetaError> {
    let end = r3fs_kv::prefix_end(prefix).expect("lock prefix has a non-0xff byte");
    let opts = RangeOptions {
        limit: LOCKS_PER_INODE_MAX + 1,
        ..RangeOptions::default()
    };
    let range = tx.t.get_range(prefix, &end, opts)?;
    if range.more || range.kvs.len() > LOCKS_PER_INODE_MAX {
        fail!(
            ENOLCK,
            "more than {LOCKS_PER_INODE_MAX} locks under {}",
            schema::printable(prefix)
        );
    }
    range
        .kvs
        .iter()
        .map(|kv| {
            let (client, owner, start) = schema::lock_key_parts(&kv.key)?;
            let rec: LockRecord = schema::decode(&kv.key, &kv.value)?;
            if rec.end < start {
                return Err(MetaError::Corrupt {
                    key: schema::printable(&kv.key),
                    reason: format!("lock ends at {} before its start {start}", rec.end),
                });
            }
            Ok(Held {
                client,
                owner,
                start,
                rec,
            })
        })
        .collect()
}

/// The valid locks of one kind on one inode, read in a transaction that has
/// already removed the invalid ones it found.
struct InodeLocks {
    inode: InodeId,
    kind: LockKind,
    valid: Vec<Held>,
    /// Records per client as stored before this transaction, valid or not.
    stored: BTreeMap<u64, usize>,
}

impl InodeLocks {
    fn load(tx: &mut Tx<'_>, inode: InodeId, kind: LockKind) -> Result<InodeLocks, MetaError> {
        let all = scan(tx, &schema::lock_prefix(inode, kind))?;
        let mut leases: BTreeMap<u64, Option<LockLeaseRecord>> = BTreeMap::new();
        let mut stored = BTreeMap::new();
        let mut valid = Vec::with_capacity(all.len());
        for h in all {
            *stored.entry(h.client).or_insert(0) += 1;
            let lease = match leases.get(&h.client) {
                Some(lease) => *lease,
                None => {
                    let lease = read_lease(tx, h.client)?;
                    leases.insert(h.client, lease);
                    lease
                }
            };
            if lease.is_some_and(|l| l.epoch == h.rec.epoch && l.expires > tx.now) {
                valid.push(h);
            } else {
                tx.t.clear(&schema::lock_key(inode, kind, h.client, h.owner, h.start))?;
            }
        }
        Ok(InodeLocks {
            inode,
            kind,
            valid,
            stored,
        })
    }

    /// The owner's ranges (sorted by start) and everyone else's locks.
    fn split_owner(&self, client: u64, owner: u64) -> (Vec<Range>, Vec<Held>) {
        let (mine, others): (Vec<Held>, Vec<Held>) = self
            .valid
            .iter()
            .partition(|h| h.client == client && h.owner == owner);
        let mine = mine
            .iter()
            .map(|h| Range {
                start: h.start,
                end: h.rec.end,
                write: h.rec.write,
                pid: h.rec.pid,
                epoch: h.rec.epoch,
            })
            .collect();
        (mine, others)
    }

    /// Replaces the owner's ranges `mine` by `desired`, writing only what
    /// changed, and keeps every client's index entry in step with its records.
    fn write_owner(
        &self,
        tx: &mut Tx<'_>,
        client: u64,
        owner: u64,
        mine: &[Range],
        desired: &[Range],
    ) -> Result<(), MetaError> {
        check_ranges(desired);
        let record = |r: &Range| LockRecord {
            write: r.write,
            end: r.end,
            pid: r.pid,
            epoch: r.epoch,
        };
        let before: BTreeMap<u64, LockRecord> = mine.iter().map(|r| (r.start, record(r))).collect();
        let after: BTreeMap<u64, LockRecord> =
            desired.iter().map(|r| (r.start, record(r))).collect();
        for start in before.keys().filter(|s| !after.contains_key(s)) {
            let key = schema::lock_key(self.inode, self.kind, client, owner, *start);
            tx.t.clear(&key)?;
        }
        for (start, rec) in after.iter().filter(|(s, r)| before.get(s) != Some(r)) {
            let key = schema::lock_key(self.inode, self.kind, client, owner, *start);
            tx.t.set(&key, &schema::encode(rec))?;
        }
        let mut left: BTreeMap<u64, usize> = BTreeMap::new();
        for h in &self.valid {
            if !(h.client == client && h.owner == owner) {
                *left.entry(h.client).or_insert(0) += 1;
            }
        }
        *left.entry(client).or_insert(0) += desired.len();
        for (&c, &n) in &self.stored {
            if n > 0 && left.get(&c).copied().unwrap_or(0) == 0 {
                tx.t.clear(&schema::lock_index_key(c, self.inode, self.kind))?;
            }
        }
        for (&c, &n) in &left {
            if n > 0 && self.stored.get(&c).copied().unwrap_or(0) == 0 {
                tx.t.set(&schema::lock_index_key(c, self.inode, self.kind), &[])?;
            }
        }
        Ok(())
    }
}

/// One owner's ranges are sorted, disjoint, and same-type ranges never touch.
fn check_ranges(ranges: &[Range]) {
    for r in ranges {
        assert!(r.start <= r.end, "lock range ends before it starts");
    }
    for pair in ranges.windows(2) {
        assert!(
            pair[0].end < pair[1].start,
            "lock ranges of one owner overlap"
        );
        assert!(
            pair[0].write != pair[1].write || pair[0].end + 1 < pair[1].start,
            "touching lock ranges of one type were not merged"
        );
    }
}

/// The lock among `others` that blocks a lock of `start..=end`, lowest start
/// first (then client, owner).
fn first_conflict(others: &[Held], start: u64, end: u64, write: bool) -> Option<&Held> {
    others
        .iter()
        .filter(|h| h.overlaps(start, end) && (write || h.rec.write))
        .min_by_key(|h| (h.start, h.client, h.owner))
}

/// A POSIX request: the owner's new ranges and whether it conflicted (then
/// nothing changes).
fn posix_decide(
    mine: &[Range],
    others: &[Held],
    start: u64,
    end: u64,
    new: Option<Range>,
) -> (Vec<Range>, Outcome) {
    if let Some(new) = new {
        if let Some(c) = first_conflict(others, start, end, new.write) {
            return (mine.to_vec(), Outcome::Conflict(c.info(LockKind::Posix)));
        }
    }
    (posix_apply(mine, start, end, new), Outcome::Done)
}

/// A flock request: converting drops the old lock even when the new one
/// then conflicts (Linux does the same).
fn flock_decide(mine: &[Range], others: &[Held], new: Option<Range>) -> (Vec<Range>, Outcome) {
    let Some(new) = new else {
        return (Vec::new(), Outcome::Done);
    };
    if mine.iter().any(|r| r.write == new.write) {
        return (mine.to_vec(), Outcome::Done);
    }
    match first_conflict(others, new.start, new.end, new.write) {
        Some(c) => (Vec::new(), Outcome::Conflict(c.info(LockKind::Flock))),
        None => (vec![new], Outcome::Done),
    }
}

/// One owner's ranges after it locks (`new`) or unlocks `start..=end`: the
/// old ranges lose that span (a range around it splits in two), the new one
/// goes in, and it merges with touching ranges of its type.
pub(crate) fn posix_apply(mine: &[Range], start: u64, end: u64, new: Option<Range>) -> Vec<Range> {
    let mut out = Vec::with_capacity(mine.len() + 2);
    for r in mine {
        if r.end < start || r.start > end {
            out.push(*r);
            continue;
        }
        if r.start < start {
            out.push(Range {
                end: start - 1,
                ..*r
            });
        }
        if r.end > end {
            out.push(Range {
                start: end + 1,
                ..*r
            });
        }
    }
    out.extend(new);
    out.sort_by_key(|r| r.start);
    let mut merged: Vec<Range> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            // Only the new range touches another one of its type (the old
            // ones were merged already); the merged range is the new lock's.
            Some(prev) if prev.write == r.write && prev.end.checked_add(1) == Some(r.start) => {
                *prev = Range {
                    end: r.end,
                    pid: new.map_or(prev.pid, |n| n.pid),
                    epoch: new.map_or(prev.epoch, |n| n.epoch),
                    ..*prev
                };
            }
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64, write: bool) -> Range {
        Range {
            start,
            end,
            write,
            pid: 1,
            epoch: 9,
        }
    }

    /// Applies `(start, end, Some(write) | None)` steps to an empty owner and
    /// compares the result as `(start, end, write)`.
    fn check(steps: &[(u64, u64, Option<bool>)], expect: &[(u64, u64, bool)]) {
        let mut mine = Vec::new();
        for &(s, e, w) in steps {
            mine = posix_apply(&mine, s, e, w.map(|w| r(s, e, w)));
            check_ranges(&mine);
        }
        let got: Vec<(u64, u64, bool)> = mine.iter().map(|r| (r.start, r.end, r.write)).collect();
        assert_eq!(got, expect, "after {steps:?}");
    }

    #[test]
    fn posix_ranges_of_one_owner_merge_split_and_convert() {
        // Overlapping and touching same-type locks merge.
        check(
            &[(0, 9, Some(false)), (5, 14, Some(false))],
            &[(0, 14, false)],
        );
        check(
            &[(0, 9, Some(true)), (10, 19, Some(true))],
            &[(0, 19, true)],
        );
        // A gap keeps them apart.
        check(
            &[(0, 9, Some(true)), (11, 19, Some(true))],
            &[(0, 9, true), (11, 19, true)],
        );
        // Upgrading the middle splits the read lock around a write lock.
        check(
            &[(0, 99, Some(false)), (40, 59, Some(true))],
            &[(0, 39, false), (40, 59, true), (60, 99, false)],
        );
        // Downgrading all of it back merges into one read lock.
        check(
            &[
                (0, 99, Some(false)),
                (40, 59, Some(true)),
                (40, 59, Some(false)),
            ],
            &[(0, 99, false)],
        );
        // Unlocking the middle leaves two ranges; unlocking to EOF trims.
        check(
            &[(0, 99, Some(true)), (10, 19, None)],
            &[(0, 9, true), (20, 99, true)],
        );
        check(
            &[(0, LOCK_END_EOF, Some(true)), (50, LOCK_END_EOF, None)],
            &[(0, 49, true)],
        );
        // A lock covering several ranges replaces them all.
        check(
            &[
                (0, 4, Some(false)),
                (10, 14, Some(true)),
                (20, 24, Some(false)),
                (2, 22, Some(true)),
            ],
            &[(0, 1, false), (2, 22, true), (23, 24, false)],
        );
        // Unlocking what is not locked changes nothing.
        check(&[(5, 9, Some(false)), (20, 30, None)], &[(5, 9, false)]);
        check(&[(0, 0, None)], &[]);
        // Ranges at the very end of the offset space.
        check(
            &[
                (LOCK_END_EOF, LOCK_END_EOF, Some(true)),
                (0, LOCK_END_EOF - 1, Some(true)),
            ],
            &[(0, LOCK_END_EOF, true)],
        );
    }

    #[test]
    fn flock_conversion_drops_the_old_lock_when_the_new_one_conflicts() {
        let other = Held {
            client: 2,
            owner: 2,
            start: 0,
            rec: LockRecord {
                write: false,
                end: LOCK_END_EOF,
                pid: 5,
                epoch: 1,
            },
        };
        let shared = r(0, LOCK_END_EOF, false);
        let exclusive = r(0, LOCK_END_EOF, true);
        let (desired, outcome) = flock_decide(&[shared], &[other], Some(exclusive));
        assert!(desired.is_empty());
        assert!(matches!(outcome, Outcome::Conflict(_)));
        let (desired, outcome) = flock_decide(&[shared], &[other], Some(shared));
        assert_eq!(desired, vec![shared]);
        assert!(matches!(outcome, Outcome::Done));
    }
}
