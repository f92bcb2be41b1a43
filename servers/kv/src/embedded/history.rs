//! The conflict history: the write sets of recently committed transactions,
//! checked against a committing transaction's read-conflict ranges.
//!
//! Never touches storage; the engine calls it under its commit mutex.
//!
//! # Limits
//! Keeps commits for at most [`HISTORY_AGE_MAX`] (FoundationDB's MVCC window),
//! at most [`HISTORY_COMMITS_MAX`] commits and about [`HISTORY_BYTES_MAX`] bytes
//! of keys. A transaction whose snapshot is older than the oldest commit still
//! kept fails with `TooOld`.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use crate::KvError;

/// How long a commit's write set stays checkable (FoundationDB: 5 s).
pub const HISTORY_AGE_MAX: Duration = Duration::from_secs(5);
/// Most commits the history keeps.
pub const HISTORY_COMMITS_MAX: usize = 500_000;
/// Most bytes of written keys and cleared-range bounds the history keeps.
pub const HISTORY_BYTES_MAX: usize = 256 * 1024 * 1024;

const _: () = assert!(HISTORY_BYTES_MAX > crate::TRANSACTION_BYTES_MAX);

/// One half-open key range `[begin, end)`.
pub(crate) type KeyRange = (Vec<u8>, Vec<u8>);

struct CommitRecord {
    version: u64,
    at: Instant,
    keys: Vec<Vec<u8>>,
    bytes: usize,
}

pub(crate) struct History {
    /// Every commit with a version above this is in the history.
    horizon: u64,
    /// The newest commit version recorded.
    newest: u64,
    /// Key -> version of the newest commit in the history that wrote it.
    points: BTreeMap<Vec<u8>, u64>,
    /// Cleared ranges by commit version, oldest first.
    ranges: VecDeque<(u64, Vec<u8>, Vec<u8>)>,
    commits: VecDeque<CommitRecord>,
    bytes: usize,
}

impl History {
    /// An empty history whose newest commit is `version`.
    pub(crate) fn new(version: u64) -> Self {
        History {
            horizon: version,
            newest: version,
            points: BTreeMap::new(),
            ranges: VecDeque::new(),
            commits: VecDeque::new(),
            bytes: 0,
        }
    }

    /// `Conflict` if a commit after `read_version` wrote into one of `reads`,
    /// `TooOld` if such commits may have been forgotten.
    pub(crate) fn check(&self, read_version: u64, reads: &[KeyRange]) -> Result<(), KvError> {
        assert!(read_version <= self.newest, "snapshot from the future");
        if read_version == self.newest {
            return Ok(());
        }
        if read_version < self.horizon {
            return Err(KvError::TooOld);
        }
        for (begin, end) in reads {
            let points = self.points.range::<[u8], _>((
                Bound::Included(begin.as_slice()),
                Bound::Excluded(end.as_slice()),
            ));
            for (_, &version) in points {
                if version > read_version {
                    return Err(KvError::Conflict);
                }
            }
            for (version, rb, re) in self.ranges.iter().rev() {
                if *version <= read_version {
                    break;
                }
                if rb < end && begin < re {
                    return Err(KvError::Conflict);
                }
            }
        }
        Ok(())
    }

    /// Record the write set of the commit at `version` and forget commits that
    /// fall out of the limits.
    pub(crate) fn record(
        &mut self,
        version: u64,
        keys: Vec<Vec<u8>>,
        cleared: Vec<KeyRange>,
        now: Instant,
    ) {
        assert!(
            version > self.newest,
            "commit versions must strictly increase"
        );
        self.newest = version;
        let mut bytes = 0;
        for key in &keys {
            bytes += key.len();
            self.points.insert(key.clone(), version);
        }
        for (begin, end) in cleared {
            bytes += begin.len() + end.len();
            self.ranges.push_back((version, begin, end));
        }
        self.bytes += bytes;
        self.commits.push_back(CommitRecord {
            version,
            at: now,
            keys,
            bytes,
        });
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while let Some(oldest) = self.commits.front() {
            let expired = now.saturating_duration_since(oldest.at) > HISTORY_AGE_MAX;
            let full = self.commits.len() > HISTORY_COMMITS_MAX || self.bytes > HISTORY_BYTES_MAX;
            if !expired && !full {
                break;
            }
            let Some(record) = self.commits.pop_front() else {
                break;
            };
            for key in &record.keys {
                if self.points.get(key) == Some(&record.version) {
                    self.points.remove(key);
                }
            }
            while self
                .ranges
                .front()
                .is_some_and(|(version, _, _)| *version <= record.version)
            {
                self.ranges.pop_front();
            }
            self.bytes -= record.bytes;
            assert!(
                record.version > self.horizon,
                "history horizon must advance"
            );
            self.horizon = record.version;
        }
    }

    /// Commits currently kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.commits.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(b: &str, e: &str) -> KeyRange {
        (b.as_bytes().to_vec(), e.as_bytes().to_vec())
    }

    fn check(
        history: &History,
        read_version: u64,
        reads: &[KeyRange],
        expect: Result<(), KvError>,
    ) {
        assert_eq!(
            history.check(read_version, reads),
            expect,
            "reads {reads:?} at {read_version}"
        );
    }

    #[test]
    fn point_and_range_writes_conflict_only_after_snapshot() {
        let now = Instant::now();
        let mut h = History::new(10);
        h.record(11, vec![b"b".to_vec()], vec![], now);
        h.record(12, vec![], vec![r("m", "p")], now);
        check(&h, 10, &[r("a", "b")], Ok(()));
        check(&h, 10, &[r("a", "b\0")], Err(KvError::Conflict));
        check(&h, 11, &[r("a", "c")], Ok(()));
        check(&h, 11, &[r("o", "q")], Err(KvError::Conflict));
        check(&h, 11, &[r("p", "q")], Ok(()));
        check(&h, 12, &[r("a", "z")], Ok(()));
    }

    #[test]
    fn expired_commits_make_old_snapshots_too_old() {
        let start = Instant::now();
        let mut h = History::new(0);
        h.record(1, vec![b"a".to_vec()], vec![r("x", "y")], start);
        h.record(2, vec![b"b".to_vec()], vec![], start + HISTORY_AGE_MAX * 2);
        assert_eq!(h.len(), 1);
        check(&h, 0, &[r("c", "d")], Err(KvError::TooOld));
        check(&h, 1, &[r("a", "b")], Ok(()));
        check(&h, 1, &[r("x", "y")], Ok(()));
        check(&h, 1, &[r("b", "c")], Err(KvError::Conflict));
    }
}
