//! A transaction's write buffer: pending point writes, pending atomic ops and
//! cleared ranges, in the shape reads need for read-your-writes.
//!
//! Never touches storage; the caller merges the buffer with its snapshot.
//!
//! # Limits
//! Grows with the transaction; the transaction enforces `TRANSACTION_BYTES_MAX`.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::AtomicOp;

/// What a transaction will do to one key at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    /// A known final value: `Some` for a set, `None` for a clear.
    Value(Option<Vec<u8>>),
    /// Atomic ops to apply, in order, to whatever value the key holds at commit.
    Atomic(Vec<(AtomicOp, u64)>),
}

/// Bytes of the atomic-op operand: FoundationDB's 8-byte little-endian integers.
pub(crate) const ATOMIC_OPERAND_BYTES: usize = 8;

/// Apply one atomic op to `base` (missing = 0). Like FoundationDB, the stored
/// value is zero-extended or truncated to the operand's 8 bytes.
pub(crate) fn apply_atomic(base: Option<&[u8]>, op: AtomicOp, operand: u64) -> Vec<u8> {
    let mut bytes = [0u8; ATOMIC_OPERAND_BYTES];
    if let Some(base) = base {
        let n = base.len().min(ATOMIC_OPERAND_BYTES);
        bytes[..n].copy_from_slice(&base[..n]);
    }
    let current = u64::from_le_bytes(bytes);
    let result = match op {
        AtomicOp::Add => current.wrapping_add(operand),
        AtomicOp::Max => current.max(operand),
    };
    result.to_le_bytes().to_vec()
}

/// Apply `ops` in order to `base`.
pub(crate) fn apply_atomics(base: Option<&[u8]>, ops: &[(AtomicOp, u64)]) -> Vec<u8> {
    let mut value = base.map(<[u8]>::to_vec);
    for &(op, operand) in ops {
        value = Some(apply_atomic(value.as_deref(), op, operand));
    }
    // `ops` is never empty for a pending atomic entry; an empty list reads as the base.
    value.unwrap_or_default()
}

/// The pending writes of one transaction.
#[derive(Debug, Default)]
pub(crate) struct WriteBuffer {
    /// Point writes, newer than any cleared range that covers them.
    pub(crate) writes: BTreeMap<Vec<u8>, Pending>,
    /// Cleared ranges `begin -> end`, disjoint and non-adjacent.
    pub(crate) cleared: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl WriteBuffer {
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.cleared.is_empty()
    }

    pub(crate) fn set(&mut self, key: &[u8], value: &[u8]) {
        self.writes
            .insert(key.to_vec(), Pending::Value(Some(value.to_vec())));
    }

    pub(crate) fn clear(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), Pending::Value(None));
    }

    pub(crate) fn atomic_op(&mut self, key: &[u8], op: AtomicOp, operand: u64) {
        let covered = self.is_cleared(key);
        match self.writes.get_mut(key) {
            Some(Pending::Value(value)) => {
                *value = Some(apply_atomic(value.as_deref(), op, operand));
            }
            Some(Pending::Atomic(ops)) => ops.push((op, operand)),
            None if covered => {
                let value = apply_atomic(None, op, operand);
                self.writes
                    .insert(key.to_vec(), Pending::Value(Some(value)));
            }
            None => {
                self.writes
                    .insert(key.to_vec(), Pending::Atomic(vec![(op, operand)]));
            }
        }
    }

    /// Clear `[begin, end)`; the caller checked `begin <= end`.
    pub(crate) fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin >= end {
            return;
        }
        let inside: Vec<Vec<u8>> = self
            .writes
            .range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in inside {
            self.writes.remove(&k);
        }
        insert_range(&mut self.cleared, begin.to_vec(), end.to_vec());
    }

    /// Whether a cleared range covers `key`.
    pub(crate) fn is_cleared(&self, key: &[u8]) -> bool {
        covers(&self.cleared, key)
    }
}

/// Whether one of the disjoint ranges in `ranges` covers `key`.
pub(crate) fn covers(ranges: &BTreeMap<Vec<u8>, Vec<u8>>, key: &[u8]) -> bool {
    ranges
        .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
        .next_back()
        .is_some_and(|(_, end)| end.as_slice() > key)
}

/// Insert `[begin, end)` into a set of disjoint ranges, merging overlapping and
/// adjacent ones.
fn insert_range(ranges: &mut BTreeMap<Vec<u8>, Vec<u8>>, mut begin: Vec<u8>, mut end: Vec<u8>) {
    if let Some((b, e)) = ranges
        .range::<[u8], _>((Bound::Unbounded, Bound::Included(begin.as_slice())))
        .next_back()
    {
        if *e >= begin {
            begin = b.clone();
            if *e > end {
                end = e.clone();
            }
        }
    }
    let overlapping: Vec<Vec<u8>> = ranges
        .range::<[u8], _>((
            Bound::Included(begin.as_slice()),
            Bound::Included(end.as_slice()),
        ))
        .map(|(b, _)| b.clone())
        .collect();
    for b in overlapping {
        if let Some(e) = ranges.remove(&b) {
            if e > end {
                end = e;
            }
        }
    }
    ranges.insert(begin, end);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_ranges(inserts: &[(&str, &str)], expect: &[(&str, &str)]) {
        let mut ranges = BTreeMap::new();
        for (b, e) in inserts {
            insert_range(&mut ranges, b.as_bytes().to_vec(), e.as_bytes().to_vec());
        }
        let got: Vec<(String, String)> = ranges
            .iter()
            .map(|(b, e)| {
                (
                    String::from_utf8(b.clone()).unwrap(),
                    String::from_utf8(e.clone()).unwrap(),
                )
            })
            .collect();
        let expect: Vec<(String, String)> = expect
            .iter()
            .map(|(b, e)| (b.to_string(), e.to_string()))
            .collect();
        assert_eq!(got, expect, "inserting {inserts:?}");
    }

    #[test]
    fn cleared_ranges_merge_overlapping_and_adjacent() {
        check_ranges(&[("a", "c"), ("e", "g")], &[("a", "c"), ("e", "g")]);
        check_ranges(&[("a", "c"), ("c", "e")], &[("a", "e")]);
        check_ranges(&[("c", "e"), ("a", "c")], &[("a", "e")]);
        check_ranges(&[("a", "c"), ("e", "g"), ("b", "f")], &[("a", "g")]);
        check_ranges(&[("a", "z"), ("b", "c")], &[("a", "z")]);
        check_ranges(&[("b", "c"), ("a", "z")], &[("a", "z")]);
    }

    #[test]
    fn cover_is_half_open() {
        let mut ranges = BTreeMap::new();
        insert_range(&mut ranges, b"b".to_vec(), b"d".to_vec());
        assert!(!covers(&ranges, b"a"));
        assert!(covers(&ranges, b"b"));
        assert!(covers(&ranges, b"c\xff"));
        assert!(!covers(&ranges, b"d"));
    }

    #[test]
    fn atomic_ops_zero_extend_and_truncate() {
        assert_eq!(apply_atomic(None, AtomicOp::Add, 5), 5u64.to_le_bytes());
        assert_eq!(
            apply_atomic(Some(&[1]), AtomicOp::Add, 1),
            2u64.to_le_bytes()
        );
        let long = [1u8, 0, 0, 0, 0, 0, 0, 0, 9, 9];
        assert_eq!(
            apply_atomic(Some(&long), AtomicOp::Add, 1),
            2u64.to_le_bytes()
        );
        assert_eq!(
            apply_atomic(Some(&u64::MAX.to_le_bytes()), AtomicOp::Add, 2),
            1u64.to_le_bytes()
        );
        assert_eq!(
            apply_atomic(Some(&[7]), AtomicOp::Max, 3),
            7u64.to_le_bytes()
        );
        assert_eq!(
            apply_atomic(Some(&[2]), AtomicOp::Max, 3),
            3u64.to_le_bytes()
        );
    }

    #[test]
    fn atomic_after_clear_range_starts_from_zero() {
        let mut buf = WriteBuffer::default();
        buf.atomic_op(b"k", AtomicOp::Add, 1);
        buf.clear_range(b"a", b"z");
        assert!(buf.writes.is_empty());
        buf.atomic_op(b"k", AtomicOp::Add, 2);
        assert_eq!(
            buf.writes.get(b"k".as_slice()),
            Some(&Pending::Value(Some(2u64.to_le_bytes().to_vec())))
        );
    }
}
