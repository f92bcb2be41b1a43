//! The primary lease: taking it, extending it, and fencing writes with it.
//!
//! The lease is one KV record (`MGLS`): holder, epoch, expiry. Whoever holds an
//! unexpired lease is the primary. Taking an expired lease bumps the epoch,
//! also when the old holder takes it back, so a primary that was paused past
//! its lease comes back with a new epoch and never reuses the old one.
//! Every state-changing transaction of a primary calls [`fence`] first: it
//! reads the lease inside the same transaction, so if another mgmtd has taken
//! the lease, the write either sees that and refuses, or conflicts with the
//! takeover and is retried, sees it and refuses. There is never more than one
//! acting primary, whatever the clocks or pauses.
//!
//! Clocks: expiry is wall-clock milliseconds. mgmtd instances must have clocks
//! within [`STEP_DOWN_MARGIN`] of each other (same assumption as 3FS); a
//! primary stops acting that margin before its lease ends.

use std::time::Duration;

use r3fs_kv::Transaction;
use r3fs_wire::mgmt::{Millis, NodeId};

use crate::error::MgmtdError;
use crate::schema::{self, LeaseRecord};

/// How long before its lease ends a primary stops acting as primary.
pub const STEP_DOWN_MARGIN: Duration = Duration::from_millis(500);

/// What one attempt to take or extend the lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// We hold the lease until `record.expires`.
    Held(LeaseRecord),
    /// Someone else holds an unexpired lease.
    HeldBy(LeaseRecord),
}

/// Takes the lease if it is free or expired, or extends it if we hold it.
pub fn acquire_or_extend(
    txn: &mut dyn Transaction,
    me: NodeId,
    address: &str,
    now: Millis,
    duration: Duration,
) -> Result<LeaseOutcome, MgmtdError> {
    let current: Option<LeaseRecord> = schema::get(txn, schema::LEASE)?;
    let expires = now + duration.as_millis() as Millis;
    let next = match current {
        Some(l) if l.expires > now && l.holder != me => return Ok(LeaseOutcome::HeldBy(l)),
        Some(l) if l.expires > now => LeaseRecord { expires, ..l },
        Some(l) => LeaseRecord {
            holder: me,
            address: address.to_string(),
            epoch: l.epoch + 1,
            expires,
        },
        None => LeaseRecord {
            holder: me,
            address: address.to_string(),
            epoch: 1,
            expires,
        },
    };
    schema::put(txn, schema::LEASE, &next)?;
    Ok(LeaseOutcome::Held(next))
}

/// Refuses unless `me` holds the lease with `epoch` and it has not expired.
/// Reads the lease in `txn`, so a concurrent takeover conflicts with `txn`.
pub fn fence(
    txn: &mut dyn Transaction,
    me: NodeId,
    epoch: u64,
    now: Millis,
) -> Result<(), MgmtdError> {
    let current: Option<LeaseRecord> = schema::get(txn, schema::LEASE)?;
    match current {
        Some(l) if l.holder == me && l.epoch == epoch && l.expires > now => Ok(()),
        Some(l) if l.expires > now => Err(MgmtdError::NotPrimary {
            primary: Some(l.address),
        }),
        _ => Err(MgmtdError::NotPrimary { primary: None }),
    }
}

/// The lease as it stands, without a read conflict.
pub fn peek(txn: &mut dyn Transaction) -> Result<Option<LeaseRecord>, MgmtdError> {
    match txn.snapshot_get(schema::LEASE)? {
        Some(v) => Ok(Some(schema::decode(schema::LEASE, &v)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3fs_kv::embedded::{EmbeddedConfig, EmbeddedEngine};
    use r3fs_kv::KvEngine;

    const LEASE: Duration = Duration::from_millis(100);

    fn engine() -> (tempfile::TempDir, EmbeddedEngine) {
        let dir = tempfile::tempdir().unwrap();
        let e = EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).unwrap();
        (dir, e)
    }

    fn take(e: &EmbeddedEngine, me: NodeId, now: Millis) -> LeaseOutcome {
        let mut t = e.begin().unwrap();
        let out = acquire_or_extend(t.as_mut(), me, &format!("n{me}"), now, LEASE).unwrap();
        t.commit().unwrap();
        out
    }

    fn epoch(out: &LeaseOutcome) -> (bool, u64) {
        match out {
            LeaseOutcome::Held(l) => (true, l.epoch),
            LeaseOutcome::HeldBy(l) => (false, l.epoch),
        }
    }

    #[test]
    fn lease_is_exclusive_until_it_expires_and_every_takeover_bumps_the_epoch() {
        let (_d, e) = engine();
        assert_eq!(epoch(&take(&e, 1, 1000)), (true, 1));
        assert_eq!(
            epoch(&take(&e, 2, 1050)),
            (false, 1),
            "unexpired lease of another holder"
        );
        assert_eq!(
            epoch(&take(&e, 1, 1080)),
            (true, 1),
            "the holder extends without a new epoch"
        );
        assert_eq!(epoch(&take(&e, 2, 1179)), (false, 1), "extended to 1180");
        assert_eq!(
            epoch(&take(&e, 2, 1180)),
            (true, 2),
            "expired: node 2 takes over"
        );
        // Node 1 was paused past its lease: it may take the lease back only
        // after node 2's lapses, and then with a new epoch.
        assert_eq!(epoch(&take(&e, 1, 1200)), (false, 2));
        assert_eq!(epoch(&take(&e, 1, 1300)), (true, 3));
    }

    #[test]
    fn fence_refuses_old_epochs_other_holders_and_expired_leases() {
        let (_d, e) = engine();
        take(&e, 1, 1000);
        let mut t = e.begin().unwrap();
        assert!(fence(t.as_mut(), 1, 1, 1050).is_ok());
        assert!(matches!(
            fence(t.as_mut(), 1, 0, 1050),
            Err(MgmtdError::NotPrimary { .. })
        ));
        assert!(matches!(
            fence(t.as_mut(), 2, 1, 1050),
            Err(MgmtdError::NotPrimary { primary: Some(_) })
        ));
        assert!(matches!(
            fence(t.as_mut(), 1, 1, 1100),
            Err(MgmtdError::NotPrimary { primary: None })
        ));
    }

    #[test]
    fn a_fenced_write_racing_a_takeover_conflicts_and_then_is_refused() {
        let (_d, e) = engine();
        take(&e, 1, 1000);
        // Old primary starts a fenced write while its lease still looks valid...
        let mut old = e.begin().unwrap();
        fence(old.as_mut(), 1, 1, 1090).unwrap();
        old.set(b"MGRV", &7u64.to_le_bytes()).unwrap();
        // ...then the lease lapses and node 2 takes over first.
        assert_eq!(epoch(&take(&e, 2, 1200)), (true, 2));
        assert_eq!(old.commit(), Err(r3fs_kv::KvError::Conflict));
        // The retry sees the takeover and refuses.
        let mut retry = e.begin().unwrap();
        assert!(matches!(
            fence(retry.as_mut(), 1, 1, 1201),
            Err(MgmtdError::NotPrimary { .. })
        ));
        let mut check = e.begin().unwrap();
        assert_eq!(
            check.get(b"MGRV").unwrap(),
            None,
            "the fenced-out write never landed"
        );
    }
}
