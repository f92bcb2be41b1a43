//! The adaptive busy-wait of XFUSE-style channels: how long a waiter spins
//! on a non-blocking read before it falls back to a blocking wait.
//!
//! The budget grows while requests arrive back to back (a spin that found a
//! request, or a blocking wait that ended almost at once) and shrinks when a
//! spin finds nothing; a blocking wait that lasted long (the mount was idle)
//! drops it to zero, so an idle mount spins not at all. It is capped, and
//! at most [`SpinPermits`] waiters spin at once machine-wide, so a busy
//! 2-core machine is not starved by spinners.
//!
//! Pure bookkeeping, no clocks or syscalls: the channel loop reports what
//! happened and asks for the next budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Tuning of the adaptive spin.
#[derive(Debug, Clone, Copy)]
pub struct SpinConfig {
    /// The cap of the budget (0 disables spinning).
    pub max: Duration,
    /// The budget a burst starts with.
    pub start: Duration,
    /// A blocking wait shorter than this counts as "back to back".
    pub burst_gap: Duration,
    /// A blocking wait this long means the mount is idle: the budget drops
    /// to zero then, not only when the next request comes.
    pub idle: Duration,
}

impl Default for SpinConfig {
    fn default() -> Self {
        SpinConfig {
            // Several same-CPU round trips (10-15 µs each here) and well under
            // the 100-150 µs it costs to wake an idle vCPU.
            max: Duration::from_micros(200),
            start: Duration::from_micros(20),
            burst_gap: Duration::from_micros(500),
            idle: Duration::from_millis(100),
        }
    }
}

/// One waiter's spin budget.
#[derive(Debug)]
pub struct AdaptiveSpin {
    config: SpinConfig,
    budget: Duration,
}

impl AdaptiveSpin {
    pub fn new(config: SpinConfig) -> AdaptiveSpin {
        assert!(config.start <= config.max);
        AdaptiveSpin {
            config,
            budget: Duration::ZERO,
        }
    }

    /// How long to spin before blocking.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// A spin found a request: requests come back to back, spin longer.
    pub fn hit(&mut self) {
        self.budget = (self.budget * 2)
            .max(self.config.start)
            .min(self.config.max);
    }

    /// A spin of the whole budget found nothing: spin less next time.
    pub fn miss(&mut self) {
        self.budget /= 2;
        if self.budget < self.config.start / 2 {
            self.budget = Duration::ZERO;
        }
    }

    /// A blocking wait has lasted [`SpinConfig::idle`]: the mount is idle.
    pub fn idle(&mut self) {
        self.budget = Duration::ZERO;
    }

    /// How long to block before calling the mount idle.
    pub fn idle_after(&self) -> Duration {
        self.config.idle
    }

    /// A blocking wait ended with a request after `waited`.
    pub fn woke_after(&mut self, waited: Duration) {
        if waited <= self.config.burst_gap {
            self.budget = self.budget.max(self.config.start).min(self.config.max);
        } else {
            self.budget = Duration::ZERO;
        }
    }
}

/// Caps how many waiters spin at once; the others block at once.
#[derive(Debug)]
pub struct SpinPermits {
    free: AtomicUsize,
}

impl SpinPermits {
    pub fn new(permits: usize) -> SpinPermits {
        SpinPermits {
            free: AtomicUsize::new(permits),
        }
    }

    /// At most one spinner per two CPUs (at least one): the rest of the
    /// machine keeps running applications and the daemon's own work.
    pub fn for_this_machine() -> SpinPermits {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        SpinPermits::new((cpus / 2).max(1))
    }

    pub fn try_acquire(&self) -> Option<SpinPermit<'_>> {
        self.free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| SpinPermit { permits: self })
    }
}

pub struct SpinPermit<'a> {
    permits: &'a SpinPermits,
}

impl Drop for SpinPermit<'_> {
    fn drop(&mut self) {
        self.permits.free.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn spin() -> AdaptiveSpin {
        AdaptiveSpin::new(SpinConfig {
            max: us(100),
            start: us(10),
            burst_gap: us(500),
            idle: Duration::from_millis(100),
        })
    }

    #[test]
    fn budget_grows_with_hits_up_to_the_cap() {
        let mut s = spin();
        assert_eq!(s.budget(), Duration::ZERO, "starts idle");
        s.hit();
        assert_eq!(s.budget(), us(10));
        s.hit();
        s.hit();
        assert_eq!(s.budget(), us(40));
        for _ in 0..10 {
            s.hit();
        }
        assert_eq!(s.budget(), us(100), "capped");
    }

    #[test]
    fn misses_shrink_the_budget_to_zero() {
        let mut s = spin();
        for _ in 0..10 {
            s.hit();
        }
        let mut steps = 0;
        while s.budget() > Duration::ZERO {
            s.miss();
            steps += 1;
            assert!(steps < 20, "decays in a bounded number of misses");
        }
        assert_eq!(
            steps, 5,
            "100 -> 50 -> 25 -> 12.5 -> 6.25 -> 0 (below start/2)"
        );
    }

    #[test]
    fn a_long_idle_wait_resets_and_a_short_one_starts_a_burst() {
        let mut s = spin();
        s.hit();
        s.hit();
        s.woke_after(Duration::from_millis(50));
        assert_eq!(s.budget(), Duration::ZERO, "idle mount spins not at all");
        s.woke_after(us(30));
        assert_eq!(s.budget(), us(10), "back-to-back requests start a burst");
        s.hit();
        s.idle();
        assert_eq!(s.budget(), Duration::ZERO, "an idle wait drops the budget");
    }

    #[test]
    fn zero_cap_never_spins() {
        let mut s = AdaptiveSpin::new(SpinConfig {
            max: Duration::ZERO,
            start: Duration::ZERO,
            burst_gap: us(500),
            idle: Duration::from_millis(100),
        });
        s.hit();
        s.woke_after(us(1));
        assert_eq!(s.budget(), Duration::ZERO);
    }

    #[test]
    fn permits_cap_concurrent_spinners() {
        let p = SpinPermits::new(2);
        let a = p.try_acquire().expect("first");
        let _b = p.try_acquire().expect("second");
        assert!(p.try_acquire().is_none(), "third must block instead");
        drop(a);
        assert!(p.try_acquire().is_some(), "a released permit is reusable");
    }
}
