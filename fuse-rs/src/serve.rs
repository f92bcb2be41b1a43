//! Serving any `FileSystem` on a mount through a channel plan: the part of
//! a mount that knows nothing of r3fs, so the channels benchmark can serve
//! an in-memory file system exactly the way a real mount is served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::api::filesystem::FileSystem;

use crate::channel::spin::SpinConfig;
use crate::channel::uring;
use crate::channel::{
    ChannelMode, ChannelPlan, Channels, Dispatch, Interrupts, ServerDispatch, StatsHandle,
};
use crate::kernel::KernelSession;
use crate::{FuseError, INIT_WAIT, THREADS_MAX};

/// How a mount's worker threads wait for kernel requests.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    pub mode: ChannelMode,
    pub threads: usize,
    /// Share of the threads that wait the classic way (`a`); None: 1 for
    /// `fuse`, 0 otherwise.
    pub fuse_ratio: Option<f64>,
    pub spin: SpinConfig,
}

impl ChannelOptions {
    pub fn validate(&self) -> Result<(), FuseError> {
        if self.threads == 0 || self.threads > THREADS_MAX {
            return Err(FuseError::Config(format!(
                "threads must be between 1 and {THREADS_MAX}, not {}",
                self.threads
            )));
        }
        if let Some(a) = self.fuse_ratio {
            if !(0.0..=1.0).contains(&a) {
                return Err(FuseError::Config(format!(
                    "the fuse ratio must be between 0 and 1, not {a}"
                )));
            }
        }
        Ok(())
    }

    /// How the threads are split for `mode`: `a` of them classic, the rest
    /// in one XFUSE channel per CPU; in `uring` mode, workers for every
    /// io_uring queue, `a` of them blocking without spinning.
    pub fn plan(&self, mode: ChannelMode) -> ChannelPlan {
        let a = self.fuse_ratio.unwrap_or(match mode {
            ChannelMode::Fuse => 1.0,
            _ => 0.0,
        });
        if mode == ChannelMode::Uring {
            return ChannelPlan::uring(self.threads, a, uring::possible_cpus());
        }
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let xfuse_threads = self.threads - ((self.threads as f64) * a).round() as usize;
        let per_channel = xfuse_threads.div_ceil(cpus).max(1);
        ChannelPlan::new(self.threads, a, per_channel)
    }
}

/// The channel mode a mount really uses: `auto` picks the best the kernel
/// offers (`uring` when the kernel has FUSE over io_uring and
/// `/sys/module/fuse/parameters/enable_uring` is Y, else `xfuse`); `uring`
/// where it cannot work is an error that names the knob.
pub fn resolve_mode(mode: ChannelMode) -> Result<ChannelMode, FuseError> {
    match mode {
        ChannelMode::Auto => Ok(match uring::available() {
            Ok(()) => ChannelMode::Uring,
            Err(_) => ChannelMode::Xfuse,
        }),
        ChannelMode::Uring => uring::available()
            .map(|()| ChannelMode::Uring)
            .map_err(|why| FuseError::Config(format!("--channel uring: {why}"))),
        m => Ok(m),
    }
}

/// A file system being served on a mounted session.
pub struct Served {
    kernel: Arc<KernelSession>,
    channels: Channels,
    mode: ChannelMode,
    plan: ChannelPlan,
}

impl Served {
    /// Starts the channels of `options` for `fs` on `kernel` and waits until
    /// the kernel's INIT is answered. On failure the mount is detached.
    pub fn start<F: FileSystem + Send + Sync + 'static>(
        fs: Arc<F>,
        kernel: Arc<KernelSession>,
        options: &ChannelOptions,
        interrupts: Arc<Interrupts>,
    ) -> Result<Served, FuseError> {
        let result = Served::start_inner(fs, &kernel, options, interrupts);
        if result.is_err() {
            let _ = kernel.unmount_lazy();
        }
        result.map(|(channels, mode, plan)| Served {
            kernel,
            channels,
            mode,
            plan,
        })
    }

    fn start_inner<F: FileSystem + Send + Sync + 'static>(
        fs: Arc<F>,
        kernel: &KernelSession,
        options: &ChannelOptions,
        interrupts: Arc<Interrupts>,
    ) -> Result<(Channels, ChannelMode, ChannelPlan), FuseError> {
        options.validate()?;
        let mode = resolve_mode(options.mode)?;
        let plan = options.plan(mode);
        tracing::info!(%mode, classic_threads = plan.classic_threads, xfuse_channels = ?plan.xfuse_channels, uring = ?plan.uring, "starting channels");
        let dispatch = Arc::new(ServerDispatch::new(fs, interrupts));
        let channels = Channels::start(kernel, dispatch.clone(), &plan, options.spin)?;
        let deadline = Instant::now() + INIT_WAIT;
        while !dispatch.initialized() {
            if Instant::now() > deadline || channels.all_finished() {
                // No worker may outlive the session fd it reads.
                channels.stop(kernel);
                return Err(FuseError::InitTimeout(INIT_WAIT));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // uring: the kernel holds every request until each queue has an
        // entry; report ready only then.
        if !channels.wait_ready(deadline) {
            channels.stop(kernel);
            return Err(FuseError::InitTimeout(INIT_WAIT));
        }
        Ok((channels, mode, plan))
    }

    pub fn kernel(&self) -> &Arc<KernelSession> {
        &self.kernel
    }

    pub fn mode(&self) -> ChannelMode {
        self.mode
    }

    pub fn plan(&self) -> &ChannelPlan {
        &self.plan
    }

    pub fn stats(&self) -> StatsHandle {
        self.channels.stats_handle()
    }

    /// Serves until the mount goes away; the first channel failure's errno.
    pub fn join(self) -> Option<i32> {
        self.channels.join()
    }
}
