//! Kernel channels: how requests get from the kernel to the file system and
//! replies get back, on the fd (or queue) that delivered them.
//!
//! Modes ([`ChannelMode`]):
//! - `fuse`, classic: worker threads read the one session fd with blocking
//!   reads (what libfuse does without `clone_fd`). [`classic`]
//! - `xfuse`: channels, each a cloned fd (`FUSE_DEV_IOC_CLONE`) read by one
//!   leader at a time with an adaptive busy-wait ([`spin`]); the leader hands
//!   leadership to a follower of its channel before serving, so a slow
//!   request never stops its channel from reading. [`xfuse`]
//! - `uring`: FUSE over io_uring, one kernel queue per possible CPU served
//!   by workers pinned to that CPU, each with its own ring and ring entry;
//!   a classic reader stays on the session fd for INIT, FORGET, INTERRUPT.
//!   [`uring`]
//!
//! The fuse ratio `a` (0 ≤ a ≤ 1, the feasibility report's
//! `a·FUSE + (1−a)·XFUSE`) splits the worker threads: `round(a·threads)`
//! wait the classic way on the session fd, the rest serve XFUSE channels.
//! Cloned fds share the kernel's one input queue, so whichever waiter
//! reads first serves the request. In `uring` mode `a` instead picks the
//! share of queue workers that block at once rather than spin (see
//! [`uring`]).
//!
//! fuse-backend-rs's `Server::handle_message` decodes and dispatches
//! ([`ServerDispatch`]). Before handing it a request the dispatcher peeks at
//! the header: INTERRUPTs are recorded in [`Interrupts`] (the library ignores
//! them), INIT marks the mount usable, and the opcode and unique id of the
//! request being served are kept in a thread-local so the file system can
//! tell SETLKW from SETLK (the library sends both to `setlk`).
//!
//! # Limits
//! A read buffer holds [`REQUEST_BYTES_MAX`]; the kernel never sends more
//! than `max_write` plus headers, and we advertise 1 MiB.

pub mod classic;
pub mod spin;
pub mod uring;
pub mod xfuse;

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use parking_lot::Mutex;

/// Largest request the kernel sends us: 1 MiB of data plus headers.
pub const REQUEST_BYTES_MAX: usize = (1 << 20) + 64 * 1024;
/// Interrupted request ids remembered (oldest forgotten first).
pub const INTERRUPTS_REMEMBERED_MAX: usize = 1024;

const OPCODE_INIT: u32 = 26;
const OPCODE_INTERRUPT: u32 = 36;
/// Size of `fuse_in_header`.
const IN_HEADER_BYTES: usize = 40;

thread_local! {
    static CURRENT: Cell<(u32, u64)> = const { Cell::new((0, 0)) };
}

/// The opcode and unique id of the request this thread is serving.
pub fn current_request() -> (u32, u64) {
    CURRENT.with(|c| c.get())
}

/// Request ids the kernel asked us to interrupt, so a long wait (a blocking
/// lock) can give up with EINTR.
#[derive(Default)]
pub struct Interrupts {
    ids: Mutex<VecDeque<u64>>,
}

impl Interrupts {
    fn record(&self, unique: u64) {
        let mut ids = self.ids.lock();
        if ids.len() == INTERRUPTS_REMEMBERED_MAX {
            ids.pop_front();
        }
        ids.push_back(unique);
    }

    /// Whether the kernel asked to interrupt request `unique`.
    pub fn is_interrupted(&self, unique: u64) -> bool {
        self.ids.lock().contains(&unique)
    }
}

/// Why a channel loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelEnd {
    /// The file system was unmounted (ENODEV) or the connection aborted.
    Unmounted,
    /// Reading the fd failed in a way we cannot serve through.
    Failed(i32),
}

/// What a channel hands each request to: decode it, run it, and write the
/// reply to `fd`, the fd that delivered it.
pub trait Dispatch: Send + Sync {
    fn dispatch(&self, fd: RawFd, request: &mut [u8], reply: &mut [u8]);
    /// Whether the kernel's INIT has been answered (the mount is usable).
    fn initialized(&self) -> bool;
    fn interrupts(&self) -> &Interrupts;
}

/// [`Dispatch`] through fuse-backend-rs's `Server` over any `FileSystem`.
pub struct ServerDispatch<F: FileSystem + Send + Sync> {
    server: Server<Arc<F>>,
    interrupts: Arc<Interrupts>,
    initialized: AtomicBool,
}

impl<F: FileSystem + Send + Sync> ServerDispatch<F> {
    pub fn new(fs: Arc<F>, interrupts: Arc<Interrupts>) -> ServerDispatch<F> {
        ServerDispatch {
            server: Server::new(fs),
            interrupts,
            initialized: AtomicBool::new(false),
        }
    }
}

impl<F: FileSystem + Send + Sync> Dispatch for ServerDispatch<F> {
    fn dispatch(&self, fd: RawFd, request: &mut [u8], reply: &mut [u8]) {
        let (opcode, unique) = peek_header(request);
        if opcode == OPCODE_INTERRUPT {
            if let Some(target) = interrupt_target(request) {
                self.interrupts.record(target);
            }
        }
        CURRENT.with(|c| c.set((opcode, unique)));
        let reader = match Reader::from_fuse_buffer(FuseBuf::new(request)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot wrap a FUSE request buffer");
                return;
            }
        };
        let writer = match FuseDevWriter::<()>::new(fd, reply) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot wrap a FUSE reply buffer");
                return;
            }
        };
        if let Err(e) = self
            .server
            .handle_message(reader, writer.into(), None, None)
        {
            match e {
                // ENOENT on the reply: the kernel no longer waits for it (the
                // caller was interrupted or the mount is going away).
                fuse_backend_rs::Error::EncodeMessage(ref io)
                    if io.raw_os_error() == Some(libc::ENOENT) =>
                {
                    tracing::debug!(opcode, unique, "reply to an abandoned request dropped");
                }
                // The kernel gets no answer for a request we could not
                // decode; it waits until the mount is aborted. Log loudly.
                _ => {
                    tracing::warn!(opcode, unique, error = %e, "FUSE request failed to decode or reply")
                }
            }
        }
        if opcode == OPCODE_INIT {
            self.initialized.store(true, Ordering::Release);
        }
        CURRENT.with(|c| c.set((0, 0)));
    }

    fn initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }

    fn interrupts(&self) -> &Interrupts {
        &self.interrupts
    }
}

/// Counters of one channel, readable while it runs.
#[derive(Debug, Default)]
pub struct ChannelStats {
    pub requests: AtomicU64,
    /// Spins that found a request.
    pub spin_hits: AtomicU64,
    /// Spins that used their whole budget and found nothing.
    pub spin_misses: AtomicU64,
    /// Waits that blocked in the kernel.
    pub blocking_waits: AtomicU64,
    /// The current spin budget of the channel's leader, in nanoseconds.
    pub spin_budget_ns: AtomicU64,
}

/// One channel as `r3fs status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChannelReport {
    pub name: String,
    pub kind: String,
    pub threads: usize,
    pub requests: u64,
    pub spin_hits: u64,
    pub spin_misses: u64,
    pub blocking_waits: u64,
    pub spin_budget_ns: u64,
}

/// Which way a mount's channels wait for requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelMode {
    /// Classic: every worker blocks on the session fd.
    Fuse,
    /// Cloned fds with adaptive busy-wait.
    Xfuse,
    /// FUSE over io_uring (Linux 6.14+, `enable_uring`).
    Uring,
    /// The best mode the kernel offers.
    Auto,
}

impl std::str::FromStr for ChannelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fuse" => Ok(ChannelMode::Fuse),
            "xfuse" => Ok(ChannelMode::Xfuse),
            "uring" => Ok(ChannelMode::Uring),
            "auto" => Ok(ChannelMode::Auto),
            _ => Err(format!(
                "unknown channel mode {s:?} (fuse, xfuse, uring or auto)"
            )),
        }
    }
}

impl std::fmt::Display for ChannelMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelMode::Fuse => "fuse",
            ChannelMode::Xfuse => "xfuse",
            ChannelMode::Uring => "uring",
            ChannelMode::Auto => "auto",
        })
    }
}

/// How a mount's worker threads are split over channels.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelPlan {
    /// Threads blocking on the session fd.
    pub classic_threads: usize,
    /// XFUSE channels (cloned fds) and the threads of each.
    pub xfuse_channels: Vec<usize>,
    /// FUSE over io_uring queues, in `uring` mode.
    pub uring: Option<UringPlan>,
}

/// The io_uring queues of a mount in `uring` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringPlan {
    /// One per possible CPU (the kernel's count).
    pub queues: usize,
    /// Workers (each a ring with one entry) per queue.
    pub workers_per_queue: usize,
    /// Workers that block at once instead of spinning: `round(a·workers)`.
    pub blocking_workers: usize,
}

impl UringPlan {
    pub fn workers(&self) -> usize {
        self.queues * self.workers_per_queue
    }
}

impl ChannelPlan {
    /// `threads` workers, a share `fuse_ratio` of them classic, the rest in
    /// XFUSE channels of about `threads_per_channel` each.
    pub fn new(threads: usize, fuse_ratio: f64, threads_per_channel: usize) -> ChannelPlan {
        assert!(threads > 0);
        assert!((0.0..=1.0).contains(&fuse_ratio));
        assert!(threads_per_channel > 0);
        let classic = ((threads as f64) * fuse_ratio).round() as usize;
        let xfuse = threads - classic.min(threads);
        let channels = xfuse.div_ceil(threads_per_channel);
        let xfuse_channels = (0..channels)
            .map(|i| xfuse / channels + usize::from(i < xfuse % channels))
            .collect();
        ChannelPlan {
            classic_threads: classic.min(threads),
            xfuse_channels,
            uring: None,
        }
    }

    /// `uring` mode: one session reader (INIT, FORGET, INTERRUPT) and
    /// `ceil(threads / queues)` workers per queue, a share `fuse_ratio` of
    /// them blocking without spinning.
    pub fn uring(threads: usize, fuse_ratio: f64, queues: usize) -> ChannelPlan {
        assert!(threads > 0 && queues > 0);
        assert!((0.0..=1.0).contains(&fuse_ratio));
        let workers_per_queue = threads.div_ceil(queues).max(1);
        let workers = queues * workers_per_queue;
        ChannelPlan {
            classic_threads: 1,
            xfuse_channels: Vec::new(),
            uring: Some(UringPlan {
                queues,
                workers_per_queue,
                blocking_workers: ((workers as f64) * fuse_ratio).round() as usize,
            }),
        }
    }
}

/// `(opcode, unique)` from a request's `fuse_in_header`, or zeros when the
/// buffer is too short (the server then rejects it).
fn peek_header(request: &[u8]) -> (u32, u64) {
    if request.len() < IN_HEADER_BYTES {
        return (0, 0);
    }
    let opcode = u32::from_ne_bytes(request[4..8].try_into().unwrap_or_default());
    let unique = u64::from_ne_bytes(request[8..16].try_into().unwrap_or_default());
    (opcode, unique)
}

/// The `unique` an INTERRUPT names (`fuse_interrupt_in` follows the header).
fn interrupt_target(request: &[u8]) -> Option<u64> {
    let bytes = request.get(IN_HEADER_BYTES..IN_HEADER_BYTES + 8)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_peek_reads_opcode_and_unique_and_tolerates_short_buffers() {
        let mut req = vec![0u8; 48];
        req[4..8].copy_from_slice(&OPCODE_INTERRUPT.to_ne_bytes());
        req[8..16].copy_from_slice(&77u64.to_ne_bytes());
        req[40..48].copy_from_slice(&5u64.to_ne_bytes());
        assert_eq!(peek_header(&req), (OPCODE_INTERRUPT, 77));
        assert_eq!(interrupt_target(&req), Some(5));
        assert_eq!(peek_header(&req[..10]), (0, 0));
        assert_eq!(interrupt_target(&req[..44]), None);
    }

    #[test]
    fn plan_splits_threads_by_the_fuse_ratio() {
        let p = ChannelPlan::new(8, 1.0, 4);
        assert_eq!(
            p,
            ChannelPlan {
                classic_threads: 8,
                xfuse_channels: vec![],
                uring: None,
            }
        );
        let p = ChannelPlan::new(8, 0.0, 4);
        assert_eq!(
            p,
            ChannelPlan {
                classic_threads: 0,
                xfuse_channels: vec![4, 4],
                uring: None,
            }
        );
        let p = ChannelPlan::new(8, 0.5, 3);
        assert_eq!(
            p,
            ChannelPlan {
                classic_threads: 4,
                xfuse_channels: vec![2, 2],
                uring: None,
            }
        );
        let p = ChannelPlan::new(3, 0.5, 1);
        assert_eq!(p.classic_threads, 2, "0.5 * 3 rounds to 2");
        assert_eq!(p.xfuse_channels, vec![1]);
        for threads in 1..20 {
            for tenths in 0..=10 {
                let p = ChannelPlan::new(threads, tenths as f64 / 10.0, 2);
                let total: usize = p.classic_threads + p.xfuse_channels.iter().sum::<usize>();
                assert_eq!(total, threads, "every thread is placed once");
                assert!(p.xfuse_channels.iter().all(|&n| n >= 1));
            }
        }
    }

    #[test]
    fn uring_plan_covers_every_queue_and_counts_blocking_workers() {
        let p = ChannelPlan::uring(8, 0.0, 2);
        assert_eq!(p.classic_threads, 1, "the session reader");
        assert!(p.xfuse_channels.is_empty());
        assert_eq!(
            p.uring,
            Some(UringPlan {
                queues: 2,
                workers_per_queue: 4,
                blocking_workers: 0
            })
        );
        let p = ChannelPlan::uring(3, 0.5, 64).uring.unwrap();
        assert_eq!(p.workers_per_queue, 1, "every queue needs a worker");
        assert_eq!(p.workers(), 64);
        assert_eq!(p.blocking_workers, 32);
        let p = ChannelPlan::uring(8, 1.0, 2).uring.unwrap();
        assert_eq!(p.blocking_workers, 8);
    }

    #[test]
    fn channel_modes_parse_and_print() {
        for m in ["fuse", "xfuse", "uring", "auto"] {
            assert_eq!(m.parse::<ChannelMode>().unwrap().to_string(), m);
        }
        assert!("classic".parse::<ChannelMode>().is_err());
    }

    #[test]
    fn interrupts_forget_the_oldest_beyond_the_limit() {
        let i = Interrupts::default();
        for u in 0..(INTERRUPTS_REMEMBERED_MAX as u64 + 1) {
            i.record(u);
        }
        assert!(!i.is_interrupted(0));
        assert!(i.is_interrupted(1));
        assert!(i.is_interrupted(INTERRUPTS_REMEMBERED_MAX as u64));
    }
}

/// The running channels of a mount.
pub struct Channels {
    workers: Vec<std::thread::JoinHandle<ChannelEnd>>,
    stats: Vec<(String, &'static str, usize, Arc<ChannelStats>)>,
    /// In `uring` mode: INIT's outcome and how many queue workers register.
    uring: Option<Arc<uring::InitGate>>,
}

impl Channels {
    /// Starts the worker threads of `plan` on `kernel`'s session.
    pub fn start(
        kernel: &crate::kernel::KernelSession,
        dispatch: Arc<dyn Dispatch>,
        plan: &ChannelPlan,
        spin: spin::SpinConfig,
    ) -> std::io::Result<Channels> {
        let mut channels = Channels {
            workers: Vec::new(),
            stats: Vec::new(),
            uring: None,
        };
        match channels.start_all(kernel, dispatch, plan, spin) {
            Ok(()) => Ok(channels),
            Err(e) => {
                // Workers already started read the session's fd: end the
                // session and join them before the fd can be closed.
                channels.stop(kernel);
                Err(e)
            }
        }
    }

    /// Ends the session (detaching the mount) and joins every worker, so no
    /// thread outlives the fd it reads. For failed starts.
    pub fn stop(self, kernel: &crate::kernel::KernelSession) {
        let _ = kernel.unmount_lazy();
        let _ = self.join();
    }

    fn start_all(
        &mut self,
        kernel: &crate::kernel::KernelSession,
        dispatch: Arc<dyn Dispatch>,
        plan: &ChannelPlan,
        spin: spin::SpinConfig,
    ) -> std::io::Result<()> {
        let channels = self;
        let permits = Arc::new(spin::SpinPermits::for_this_machine());
        // In uring mode the session reader answers INIT itself (to advertise
        // io_uring) and tells the queue workers when the session ends.
        let gate = plan
            .uring
            .map(|u| Arc::new(uring::InitGate::new(u.workers())));
        let session_dispatch: Arc<dyn Dispatch> = match &gate {
            Some(g) => Arc::new(uring::InitInterceptor::new(dispatch.clone(), g.clone())),
            None => dispatch.clone(),
        };
        if plan.classic_threads > 0 {
            let stats = Arc::new(ChannelStats::default());
            channels.stats.push((
                "session".into(),
                "fuse",
                plan.classic_threads,
                stats.clone(),
            ));
            for i in 0..plan.classic_threads {
                let (dispatch, stats, fd) = (session_dispatch.clone(), stats.clone(), kernel.fd());
                let gate = gate.clone();
                channels.spawn(format!("r3fs-fuse-{i}"), move || {
                    let end = classic::serve(fd, dispatch.as_ref(), &stats);
                    if let Some(g) = gate {
                        g.end();
                    }
                    end
                })?;
            }
        }
        if let (Some(u), Some(gate)) = (plan.uring, gate) {
            channels.uring = Some(gate.clone());
            let queue_stats: Vec<Arc<ChannelStats>> = (0..u.queues)
                .map(|q| {
                    let stats = Arc::new(ChannelStats::default());
                    channels.stats.push((
                        format!("queue-{q}"),
                        "uring",
                        u.workers_per_queue,
                        stats.clone(),
                    ));
                    stats
                })
                .collect();
            for g in 0..u.workers() {
                let (q, slot) = (g % u.queues, g / u.queues);
                let worker = uring::QueueWorker {
                    qid: u16::try_from(q).map_err(|_| std::io::Error::other("too many CPUs"))?,
                    blocks: uring::worker_blocks(g, u.workers(), u.blocking_workers),
                    fd: kernel.fd(),
                    dispatch: dispatch.clone(),
                    gate: gate.clone(),
                    stats: queue_stats[q].clone(),
                    permits: permits.clone(),
                    spin,
                };
                channels.spawn(format!("r3fs-uring-{q}.{slot}"), move || worker.run())?;
            }
        }
        for (c, &threads) in plan.xfuse_channels.iter().enumerate() {
            let channel = Arc::new(xfuse::XfuseChannel::new(kernel.clone_channel()?, spin));
            let stats = Arc::new(ChannelStats::default());
            channels
                .stats
                .push((format!("clone-{c}"), "xfuse", threads, stats.clone()));
            for t in 0..threads {
                let (dispatch, stats, channel, permits) = (
                    dispatch.clone(),
                    stats.clone(),
                    channel.clone(),
                    permits.clone(),
                );
                channels.spawn(format!("r3fs-xfuse-{c}.{t}"), move || {
                    channel.serve(dispatch.as_ref(), &stats, &permits)
                })?;
            }
        }
        Ok(())
    }

    fn spawn(
        &mut self,
        name: String,
        f: impl FnOnce() -> ChannelEnd + Send + 'static,
    ) -> std::io::Result<()> {
        self.workers
            .push(std::thread::Builder::new().name(name).spawn(f)?);
        Ok(())
    }

    /// A shared handle on the counters, for reporting while the mount runs.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle {
            stats: self.stats.clone(),
        }
    }

    /// In `uring` mode, waits until every queue worker has registered its
    /// entry (the kernel holds every request until all queues have one) or
    /// fell back to the session fd; false if `deadline` passed first.
    /// Other modes are ready at once.
    pub fn wait_ready(&self, deadline: std::time::Instant) -> bool {
        match &self.uring {
            Some(gate) => gate.wait_registered(deadline),
            None => true,
        }
    }

    pub fn all_finished(&self) -> bool {
        self.workers.iter().all(|w| w.is_finished())
    }

    /// Waits for every worker; the first failure's errno, if any.
    pub fn join(self) -> Option<i32> {
        let mut failure = None;
        for w in self.workers {
            match w.join() {
                Ok(ChannelEnd::Unmounted) => {}
                Ok(ChannelEnd::Failed(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert(libc::EIO);
                }
            }
        }
        failure
    }
}

/// Reads the counters of a mount's channels.
#[derive(Clone)]
pub struct StatsHandle {
    stats: Vec<(String, &'static str, usize, Arc<ChannelStats>)>,
}

impl StatsHandle {
    pub fn reports(&self) -> Vec<ChannelReport> {
        self.stats
            .iter()
            .map(|(name, kind, threads, s)| ChannelReport {
                name: name.clone(),
                kind: (*kind).to_string(),
                threads: *threads,
                requests: s.requests.load(Ordering::Relaxed),
                spin_hits: s.spin_hits.load(Ordering::Relaxed),
                spin_misses: s.spin_misses.load(Ordering::Relaxed),
                blocking_waits: s.blocking_waits.load(Ordering::Relaxed),
                spin_budget_ns: s.spin_budget_ns.load(Ordering::Relaxed),
            })
            .collect()
    }
}
