//! Where meta reads the time: the system clock, or a clock tests move by hand.
//!
//! Every transaction stamps one reading on what it changes and compares lock
//! leases against it. Meta servers on different machines read their own
//! clocks; lock leases are long enough (`LOCK_LEASE_DURATION`) that NTP-sized
//! skew does not matter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use r3fs_wire::meta::Time;

pub trait Clock: Send + Sync {
    fn now(&self) -> Time;
}

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        Time::now()
    }
}

/// A clock that stands still until told to move, for tests of expiry.
#[derive(Debug)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    pub fn new(start: Time) -> ManualClock {
        ManualClock {
            nanos: AtomicU64::new(start.as_nanos()),
        }
    }

    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(by))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Time {
        Time::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(Time::from_nanos(5_000_000_000));
        assert_eq!(clock.now(), Time::from_nanos(5_000_000_000));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), Time::from_nanos(6_500_000_000));
    }
}
