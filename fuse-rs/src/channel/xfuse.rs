//! XFUSE-style channels: a cloned `/dev/fuse` fd per channel, read by one
//! leader at a time that spins on non-blocking reads (yielding the CPU
//! between them) for an adaptive budget before it blocks in `poll(2)`.
//!
//! Leader/followers: a channel's threads take turns at the fd. The leader
//! that reads a request gives up leadership *before* serving it, so a
//! follower is already waiting (and waking, off the request's critical
//! path) while a slow request runs; the channel never stops reading while
//! any of its threads is free. Replies go to the channel's own fd, which
//! keeps the kernel's per-fd processing list right.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use parking_lot::Mutex;

use super::spin::{AdaptiveSpin, SpinConfig, SpinPermits};
use super::{ChannelEnd, ChannelStats, Dispatch, REQUEST_BYTES_MAX};

/// One XFUSE channel: a cloned fd (non-blocking) and its leader's spin state.
pub struct XfuseChannel {
    fd: File,
    leader: Mutex<AdaptiveSpin>,
}

impl XfuseChannel {
    /// `fd` must be a cloned session fd opened with O_NONBLOCK.
    pub fn new(fd: File, spin: SpinConfig) -> XfuseChannel {
        XfuseChannel {
            fd,
            leader: Mutex::new(AdaptiveSpin::new(spin)),
        }
    }

    /// One worker of this channel: take leadership, wait for a request, pass
    /// leadership on, serve the request; until the mount goes away.
    pub fn serve(
        &self,
        dispatch: &dyn Dispatch,
        stats: &ChannelStats,
        permits: &SpinPermits,
    ) -> ChannelEnd {
        let mut request = vec![0u8; REQUEST_BYTES_MAX];
        let mut reply = vec![0u8; REQUEST_BYTES_MAX];
        loop {
            let len = {
                let mut spin = self.leader.lock();
                let got = self.wait(&mut spin, &mut request, stats, permits);
                stats
                    .spin_budget_ns
                    .store(spin.budget().as_nanos() as u64, Ordering::Relaxed);
                match got {
                    Ok(n) => n,
                    Err(end) => return end,
                }
            };
            stats.requests.fetch_add(1, Ordering::Relaxed);
            dispatch.dispatch(self.fd.as_raw_fd(), &mut request[..len], &mut reply);
        }
    }

    /// Spins for the budget (if a spin permit is free), then blocks.
    fn wait(
        &self,
        spin: &mut AdaptiveSpin,
        buf: &mut [u8],
        stats: &ChannelStats,
        permits: &SpinPermits,
    ) -> Result<usize, ChannelEnd> {
        let budget = spin.budget();
        if !budget.is_zero() {
            if let Some(_permit) = permits.try_acquire() {
                let deadline = Instant::now() + budget;
                loop {
                    match self.try_read(buf)? {
                        Some(n) => {
                            spin.hit();
                            stats.spin_hits.fetch_add(1, Ordering::Relaxed);
                            return Ok(n);
                        }
                        None if Instant::now() >= deadline => {
                            spin.miss();
                            stats.spin_misses.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // Yield between polls: on a small machine the spinner
                        // often shares its CPU with the application whose
                        // next request it waits for; a yield lets that
                        // application run (and costs ~1 µs when nothing else
                        // is runnable).
                        // SAFETY: sched_yield has no preconditions.
                        None => unsafe {
                            libc::sched_yield();
                        },
                    }
                }
            }
        }
        stats.blocking_waits.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        // Block; after the idle period, drop the budget (and show it) once,
        // then block without a timeout: an idle mount does not wake.
        let mut timeout = PollTimeout::try_from(spin.idle_after()).unwrap_or(PollTimeout::NONE);
        loop {
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => {
                    spin.idle();
                    stats.spin_budget_ns.store(0, Ordering::Relaxed);
                    timeout = PollTimeout::NONE;
                    continue;
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(ChannelEnd::Failed(e as i32)),
            }
            if let Some(n) = self.try_read(buf)? {
                spin.woke_after(started.elapsed());
                return Ok(n);
            }
        }
    }

    /// One non-blocking read: `Some(len)` for a request, `None` if there is
    /// none now.
    fn try_read(&self, buf: &mut [u8]) -> Result<Option<usize>, ChannelEnd> {
        loop {
            return match nix::unistd::read(&self.fd, buf) {
                Ok(0) => Err(ChannelEnd::Unmounted),
                Ok(n) => Ok(Some(n)),
                Err(Errno::EAGAIN) => Ok(None),
                // ENOENT: the request we were about to read was interrupted.
                Err(Errno::ENOENT) | Err(Errno::EINTR) => continue,
                Err(Errno::ENODEV) => Err(ChannelEnd::Unmounted),
                Err(e) => Err(ChannelEnd::Failed(e as i32)),
            };
        }
    }
}
