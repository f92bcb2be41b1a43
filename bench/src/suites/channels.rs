//! The `channels` suite: what the kernel round trip alone costs in each
//! channel mode, side by side with the limit and a peer in one run.
//!
//! Columns, one after another (each set up just before its runs and torn
//! down right after):
//! - `tmpfs`: a private tmpfs, the limit (no FUSE);
//! - `memfs <mode>`: [`MemFs`] (in memory, so no cluster is measured)
//!   served in this process through [`Served`], exactly as a mount serves
//!   r3fs: `fuse` (classic), `xfuse` with fuse ratio a = 0, 0.5 and 1 (a = 1
//!   is classic waiting in a mixed plan), and `uring` when the daemon and
//!   the kernel offer it (`enable_uring` is set only for that column and
//!   restored by a guard);
//! - `bindfs`: bindfs (libfuse 2, `--multithreaded`) over a private tmpfs,
//!   the peer;
//! - `r3fs <mode>`: `r3fs mount --channel <mode>` on a fresh local cluster
//!   (fstat and stat only: pread would measure the storage path).
//!
//! Operations on one file, every FUSE mount with entry and attribute
//! timeouts 0: `fstat` of an open fd (one GETATTR), `stat` of its path
//! (LOOKUP + GETATTR), and 4 KiB `pread` (MemFs answers opens with
//! FOPEN_DIRECT_IO and bindfs runs with `-o direct_io`, so each is a READ;
//! tmpfs reads its page cache). Each runs with 1 application thread (mean
//! and p99 latency, ops/s) and 2 (ops/s), unpinned and pinned. Pinned: the
//! application threads *and the daemon's threads* on CPU 0 (MemFs: the
//! channel workers; bindfs: all its threads; r3fs: all threads of the mount
//! daemon, the cluster servers stay unpinned), i.e. app and daemon share a
//! CPU. Unpinned: everything may run anywhere.
//!
//! Every measurement follows a warm-up (so an adaptive spin has grown its
//! budget). For MemFs the channel counters give the kernel requests per
//! operation, printed as a check of what was measured.
//!
//! Cleanup: every mount is undone and every child stopped by drop guards
//! (also on error, panic, and SIGINT/SIGTERM, which stop the run at the
//! next operation); the temporary directory is removed unless something is
//! still mounted below it.

mod chart;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use r3fs_fuse::channel::spin::SpinConfig;
use r3fs_fuse::channel::{ChannelMode, Interrupts, StatsHandle};
use r3fs_fuse::kernel::{KernelSession, MountOptions};
use r3fs_fuse::memfs::{MemFs, MemFsConfig};
use r3fs_fuse::{resolve_mode, ChannelOptions, Served};

use crate::mounts::{
    self, check_interrupt, cpath, install_signal_handlers, interrupted, loadavg, mounted_at,
    mounts_under, r3fs_bin, spawn_bindfs, stop_child, wait_mounted, which, Fd, IfBusy,
};
use crate::report::{ratio, result, Phase, Table};

const SUITE: &str = "channels";
/// The file every operation works on.
const FILE_BYTES: usize = 1 << 20;
const IO_BYTES: usize = 4096;
const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";
/// How often a mount that is awaited, or a child that should exit, is
/// looked at.
const POLL: Duration = Duration::from_millis(10);
/// Application thread counts of the throughput runs.
const THREADS: [usize; 2] = [1, 2];

#[derive(clap::Args)]
pub struct ChannelsArgs {
    /// For CI: few operations per measurement; r3fs only with fuse and xfuse.
    #[arg(long)]
    quick: bool,
    /// Operations per application thread per measurement [default: 20000;
    /// with --quick 1500].
    #[arg(long)]
    ops: Option<u64>,
    /// Longest time one measurement runs, in ms [default: 2000; with --quick
    /// 120].
    #[arg(long)]
    max_ms: Option<u64>,
    /// Worker threads of the MemFs daemon, split between classic and XFUSE
    /// waiting by the fuse ratio.
    #[arg(long, default_value_t = 4)]
    daemon_threads: usize,
    /// Where to write the PNG chart [default: channels.png in a fresh
    /// directory under the temp dir, printed].
    #[arg(long)]
    chart: Option<PathBuf>,
    /// The r3fs binary [default: `r3fs` next to this executable].
    #[arg(long)]
    r3fs_bin: Option<PathBuf>,
    /// Leave out the r3fs columns.
    #[arg(long)]
    no_r3fs: bool,
    /// Leave out the bindfs column.
    #[arg(long)]
    no_bindfs: bool,
}

// ---------------------------------------------------------------- watchdog

/// A mount that must answer before a deadline, else its FUSE connection is
/// aborted (`umount2(MNT_FORCE)`), so a daemon that stops answering (a
/// channel mode under construction, say) fails its column instead of
/// hanging the run: application threads blocked in FUSE requests cannot be
/// interrupted otherwise.
static ARMED: std::sync::Mutex<Option<(Instant, PathBuf)>> = std::sync::Mutex::new(None);
static FIRED: AtomicBool = AtomicBool::new(false);

fn arm(path: &Path, within: Duration) {
    *ARMED.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now() + within, path.into()));
}

fn disarm() {
    *ARMED.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

fn start_watchdog() {
    std::thread::Builder::new()
        .name("channels-watchdog".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_millis(100));
            let expired = {
                let mut armed = ARMED.lock().unwrap_or_else(|e| e.into_inner());
                match &*armed {
                    Some((deadline, _)) if Instant::now() > *deadline => armed.take(),
                    _ => None,
                }
            };
            if let Some((_, path)) = expired {
                FIRED.store(true, Ordering::SeqCst);
                eprintln!(
                    "channels: {} stopped answering: aborting its FUSE connection (umount -f)",
                    path.display()
                );
                // SAFETY: a valid path; failing (not mounted) is harmless.
                unsafe { libc::umount2(cpath(&path).as_ptr(), libc::MNT_FORCE) };
            }
        })
        .expect("spawn the watchdog thread");
}

// ---------------------------------------------------------------- OS helpers

/// Unmounts every mount stacked on `path`; if busy, forcibly (for FUSE
/// that aborts the connection, so requests stuck in it fail) and then
/// lazily; silent if none.
fn unmount_all(path: &Path) {
    mounts::unmount_all(path, IfBusy::ForceThenDetach, SUITE);
}

/// This process's CPU mask when the suite started ("unpinned").
fn original_mask() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set);
        set
    }
}

fn cpu0_mask() -> libc::cpu_set_t {
    // SAFETY: plain data.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        set
    }
}

/// Sets the CPU mask of thread `tid` (0: the calling thread).
fn set_mask(tid: libc::pid_t, set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: a valid mask of the size given.
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Thread ids of process `pid` (`None`: this process).
fn tasks(pid: Option<i32>) -> Vec<libc::pid_t> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".into(),
    };
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- targets

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Tmpfs,
    MemFs,
    Bindfs,
    R3fs,
}

/// One column.
#[derive(Clone, Debug)]
struct Spec {
    kind: Kind,
    mode: Option<ChannelMode>,
    ratio: Option<f64>,
    /// Table header.
    label: String,
    /// In RESULT names.
    slug: String,
}

impl Spec {
    fn plain(kind: Kind, name: &str) -> Spec {
        Spec {
            kind,
            mode: None,
            ratio: None,
            label: name.into(),
            slug: name.into(),
        }
    }

    fn channel(kind: Kind, mode: ChannelMode, ratio: Option<f64>) -> Spec {
        let base = match kind {
            Kind::MemFs => "memfs",
            _ => "r3fs",
        };
        let (label, slug) = match ratio {
            Some(a) => (
                format!("{base} {mode} a={a}"),
                format!("{base}_{mode}_a{}", format!("{a}").replace('.', "")),
            ),
            None => (format!("{base} {mode}"), format!("{base}_{mode}")),
        };
        Spec {
            kind,
            mode: Some(mode),
            ratio,
            label,
            slug,
        }
    }

    fn is_classic(&self) -> bool {
        self.mode == Some(ChannelMode::Fuse)
    }
}

/// Who serves a mount, for pinning.
enum Daemon {
    None,
    /// Threads of this process.
    Threads(Vec<libc::pid_t>),
    /// Every thread of another process.
    Process(i32),
}

impl Daemon {
    fn pin(&self, set: &libc::cpu_set_t) -> anyhow::Result<()> {
        let tids = match self {
            Daemon::None => return Ok(()),
            Daemon::Threads(t) => t.clone(),
            Daemon::Process(pid) => tasks(Some(*pid)),
        };
        for tid in tids {
            match set_mask(tid, set) {
                Ok(()) => {}
                // A thread that exited meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e).with_context(|| format!("set the CPU mask of {tid}")),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match self {
            Daemon::None => "no daemon".into(),
            Daemon::Threads(t) => format!("{} channel threads in this process", t.len()),
            Daemon::Process(pid) => format!("{} threads of pid {pid}", tasks(Some(*pid)).len()),
        }
    }
}

/// What undoes a column's setup, in its Drop.
enum Teardown {
    Tmpfs(PathBuf),
    MemFs {
        mnt: PathBuf,
        served: Option<Served>,
    },
    Bindfs {
        mnt: PathBuf,
        src: PathBuf,
        child: Child,
    },
    R3fs {
        bin: PathBuf,
        mnt: PathBuf,
        data: PathBuf,
    },
}

impl Drop for Teardown {
    fn drop(&mut self) {
        match self {
            Teardown::Tmpfs(p) => unmount_all(p),
            Teardown::MemFs { mnt, served } => {
                // Lazily: the channels end once nothing is open any more.
                let c = cpath(mnt);
                // SAFETY: a valid path.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 && mounted_at(mnt) {
                    eprintln!(
                        "channels: cannot unmount {}: {}",
                        mnt.display(),
                        std::io::Error::last_os_error()
                    );
                }
                if let Some(s) = served.take() {
                    if let Some(errno) = s.join() {
                        eprintln!("channels: a MemFs channel failed with errno {errno}");
                    }
                }
            }
            Teardown::Bindfs { mnt, src, child } => {
                unmount_all(mnt);
                stop_child(child, "bindfs", POLL, SUITE);
                unmount_all(src);
            }
            Teardown::R3fs { bin, mnt, data } => {
                let out = Command::new(&*bin)
                    .arg("umount")
                    .arg(&*mnt)
                    .arg("--data-dir")
                    .arg(&*data)
                    .stdin(Stdio::null())
                    .process_group(0)
                    .output();
                match out {
                    Ok(o) if !o.status.success() && mounted_at(mnt) => eprintln!(
                        "channels: `r3fs umount {}` failed: {}",
                        mnt.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                    Err(e) => eprintln!("channels: cannot run {}: {e}", bin.display()),
                    _ => {}
                }
                if mounted_at(mnt) {
                    unmount_all(mnt);
                }
            }
        }
    }
}

/// Stops the local cluster of an r3fs data directory if one still runs
/// (after the mounts are gone; `r3fs umount` normally stops it).
struct ClusterStop {
    bin: PathBuf,
    data: PathBuf,
}

impl Drop for ClusterStop {
    fn drop(&mut self) {
        if !self.data.join("local-cluster.pid").exists() {
            return;
        }
        let out = Command::new(&self.bin)
            .args(["local-cluster", "stop", "--force", "--data-dir"])
            .arg(&self.data)
            .stdin(Stdio::null())
            .process_group(0)
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!(
                    "channels: `r3fs local-cluster stop` failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
    }
}

/// `enable_uring` set to Y while alive, then put back as it was.
struct UringEnabled {
    previous: Option<String>,
}

impl UringEnabled {
    fn enable() -> anyhow::Result<UringEnabled> {
        let now = std::fs::read_to_string(URING_PARAM).context(URING_PARAM)?;
        if now.trim() == "Y" {
            return Ok(UringEnabled { previous: None });
        }
        std::fs::write(URING_PARAM, "Y").with_context(|| format!("write Y to {URING_PARAM}"))?;
        Ok(UringEnabled {
            previous: Some(now.trim().to_string()),
        })
    }
}

impl Drop for UringEnabled {
    fn drop(&mut self) {
        if let Some(prev) = &self.previous {
            if let Err(e) = std::fs::write(URING_PARAM, prev) {
                eprintln!("channels: cannot restore {URING_PARAM} to {prev}: {e}");
            }
        }
    }
}

/// The first steps of a column served in channel mode `mode`: `enable_uring`
/// switched on (until the guard drops) for uring, and the mount point made.
fn prepare_channel_column(
    base: &Path,
    spec: &Spec,
    mode: ChannelMode,
) -> anyhow::Result<(Option<UringEnabled>, PathBuf)> {
    let uring = if mode == ChannelMode::Uring {
        Some(UringEnabled::enable()?)
    } else {
        None
    };
    let mnt = base.join(&spec.slug);
    std::fs::create_dir_all(&mnt)?;
    Ok((uring, mnt))
}

/// Why FUSE over io_uring cannot be measured, if it cannot. Asks the
/// daemon with `enable_uring` switched on for the question (and put back
/// at once).
fn uring_unavailable() -> Option<String> {
    if !Path::new(URING_PARAM).exists() {
        return Some(format!(
            "{URING_PARAM} is missing (kernel without FUSE over io_uring)"
        ));
    }
    let _enabled = match UringEnabled::enable() {
        Ok(g) => g,
        Err(e) => return Some(format!("cannot switch it on: {e:#}")),
    };
    match resolve_mode(ChannelMode::Uring) {
        Ok(_) => None,
        Err(e) => Some(format!("resolve_mode(uring) fails: {e}")),
    }
}

/// A column ready to measure.
struct Live {
    mnt: PathBuf,
    file: PathBuf,
    daemon: Daemon,
    stats: Option<StatsHandle>,
    ops: Vec<Op>,
    note: String,
    _teardown: Teardown,
    /// Dropped after the teardown (declared after it).
    _uring: Option<UringEnabled>,
}

fn write_file(path: &Path) -> anyhow::Result<()> {
    let data: Vec<u8> = (0..FILE_BYTES).map(|i| (i % 251) as u8).collect();
    std::fs::write(path, &data).with_context(|| format!("write {}", path.display()))
}

fn mount_tmpfs(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)?;
    mounts::mount_tmpfs(path, c"r3fs-bench-channels", 64)
}

fn setup_tmpfs(base: &Path) -> anyhow::Result<Live> {
    let mnt = base.join("tmpfs");
    mount_tmpfs(&mnt)?;
    let teardown = Teardown::Tmpfs(mnt.clone());
    let file = mnt.join("f");
    write_file(&file)?;
    Ok(Live {
        mnt,
        file,
        daemon: Daemon::None,
        stats: None,
        ops: Op::ALL.to_vec(),
        note: "private tmpfs; pread from its page cache".into(),
        _teardown: teardown,
        _uring: None,
    })
}

fn setup_memfs(base: &Path, spec: &Spec, daemon_threads: usize) -> anyhow::Result<Live> {
    let mode = spec.mode.expect("a MemFs column has a mode");
    let (uring, mnt) = prepare_channel_column(base, spec, mode)?;
    let fs = Arc::new(MemFs::new(MemFsConfig {
        attr_timeout: Duration::ZERO,
        entry_timeout: Duration::ZERO,
        direct_io: true,
    }));
    let before = tasks(None);
    let kernel = Arc::new(KernelSession::mount(
        &mnt,
        &MountOptions {
            fsname: "r3fs-bench-memfs",
            allow_other: false,
        },
    )?);
    let mut teardown = Teardown::MemFs {
        mnt: mnt.clone(),
        served: None,
    };
    let options = ChannelOptions {
        mode,
        threads: daemon_threads,
        fuse_ratio: spec.ratio,
        spin: SpinConfig::default(),
    };
    let served = Served::start(fs, kernel, &options, Arc::new(Interrupts::default()))
        .with_context(|| format!("serve MemFs with {}", spec.label))?;
    let plan = served.plan().clone();
    let stats = served.stats();
    if let Teardown::MemFs { served: s, .. } = &mut teardown {
        *s = Some(served);
    }
    let threads: Vec<_> = tasks(None)
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    let file = mnt.join("f");
    write_file(&file)?;
    Ok(Live {
        mnt,
        file,
        note: format!("{daemon_threads} daemon threads, plan {plan:?}"),
        daemon: Daemon::Threads(threads),
        stats: Some(stats),
        ops: Op::ALL.to_vec(),
        _teardown: teardown,
        _uring: uring,
    })
}

fn setup_bindfs(base: &Path, bindfs: &Path) -> anyhow::Result<Live> {
    let src = base.join("bindfs-src");
    let mnt = base.join("bindfs");
    std::fs::create_dir_all(&mnt)?;
    mount_tmpfs(&src)?;
    let child = spawn_bindfs(
        bindfs,
        &["--multithreaded"],
        "attr_timeout=0,entry_timeout=0,negative_timeout=0,direct_io",
        &src,
        &mnt,
    );
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            unmount_all(&src);
            return Err(e).with_context(|| format!("start {}", bindfs.display()));
        }
    };
    let pid = child.id() as i32;
    let mut teardown = Teardown::Bindfs {
        mnt: mnt.clone(),
        src,
        child,
    };
    wait_mounted(&mnt, POLL, || {
        if let Teardown::Bindfs { child, .. } = &mut teardown {
            if let Some(status) = child.try_wait()? {
                bail!("bindfs exited early: {status}");
            }
        }
        Ok(())
    })?;
    let file = mnt.join("f");
    write_file(&file)?;
    Ok(Live {
        mnt,
        file,
        daemon: Daemon::Process(pid),
        stats: None,
        ops: Op::ALL.to_vec(),
        note: "bindfs --multithreaded -o attr_timeout=0,entry_timeout=0,direct_io over tmpfs"
            .into(),
        _teardown: teardown,
        _uring: None,
    })
}

fn setup_r3fs(base: &Path, bin: &Path, data: &Path, spec: &Spec) -> anyhow::Result<Live> {
    let mode = spec.mode.expect("an r3fs column has a mode");
    let (uring, mnt) = prepare_channel_column(base, spec, mode)?;
    let teardown = Teardown::R3fs {
        bin: bin.to_path_buf(),
        mnt: mnt.clone(),
        data: data.to_path_buf(),
    };
    let mut cmd = Command::new(bin);
    cmd.arg("mount")
        .arg(&mnt)
        .arg("--data-dir")
        .arg(data)
        .arg(format!("--channel={mode}"))
        .args(["--attr-timeout-ms=0", "--entry-timeout-ms=0"]);
    if let Some(a) = spec.ratio {
        cmd.arg(format!("--fuse-ratio={a}"));
    }
    let out = cmd
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .with_context(|| format!("run {} mount", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`r3fs mount --channel {mode}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid = stdout
        .split("daemon pid ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<i32>().ok());
    if !mounted_at(&mnt) {
        bail!(
            "`r3fs mount` succeeded but {} is not mounted",
            mnt.display()
        );
    }
    let file = mnt.join("f");
    std::fs::write(&file, vec![7u8; IO_BYTES]).context("write a file on r3fs")?;
    Ok(Live {
        mnt,
        file,
        daemon: pid.map_or(Daemon::None, Daemon::Process),
        stats: None,
        ops: vec![Op::Fstat, Op::Stat],
        note: format!(
            "r3fs mount --channel {mode}{} --attr-timeout-ms 0 --entry-timeout-ms 0 (8 threads; local cluster unpinned{})",
            spec.ratio.map(|a| format!(" --fuse-ratio {a}")).unwrap_or_default(),
            if pid.is_none() { "; daemon pid unknown, so the daemon is never pinned" } else { "" }
        ),
        _teardown: teardown,
        _uring: uring,
    })
}

// ---------------------------------------------------------------- measuring

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Op {
    Fstat,
    Stat,
    Pread,
}

impl Op {
    const ALL: [Op; 3] = [Op::Fstat, Op::Stat, Op::Pread];
    fn name(self) -> &'static str {
        match self {
            Op::Fstat => "fstat",
            Op::Stat => "stat",
            Op::Pread => "pread4k",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Pin {
    Unpinned,
    Pinned,
}

impl Pin {
    const ALL: [Pin; 2] = [Pin::Unpinned, Pin::Pinned];
    fn name(self) -> &'static str {
        match self {
            Pin::Unpinned => "unpinned",
            Pin::Pinned => "pinned",
        }
    }
}

/// One measured figure set.
#[derive(Clone, Copy, Debug)]
struct Figures {
    mean_us: f64,
    p99_us: f64,
    ops_per_sec: f64,
    /// Kernel requests the daemon served per operation (MemFs only).
    requests_per_op: Option<f64>,
}

type Key = (String, Op, Pin, usize);

struct Budget {
    ops: u64,
    max: Duration,
}

/// Runs `op` on `file` in `threads` application threads, each `ops` times
/// or until `max` passed, pinned to CPU 0 or not.
fn run_op(
    file: &Path,
    op: Op,
    threads: usize,
    pin: Pin,
    budget: &Budget,
    unpinned: &libc::cpu_set_t,
) -> anyhow::Result<Phase> {
    let path = cpath(file);
    let barrier = Barrier::new(threads);
    let outcomes: Vec<anyhow::Result<(Instant, Instant, Vec<u64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (path, barrier) = (&path, &barrier);
                s.spawn(move || -> anyhow::Result<(Instant, Instant, Vec<u64>)> {
                    set_mask(
                        0,
                        &match pin {
                            Pin::Pinned => cpu0_mask(),
                            Pin::Unpinned => *unpinned,
                        },
                    )
                    .context("set the application thread's CPU mask")?;
                    let fd = Fd::open(file, libc::O_RDONLY);
                    // Everyone waits at the barrier, even after a failure.
                    barrier.wait();
                    let fd = fd.with_context(|| format!("open {}", file.display()))?;
                    let mut buf = vec![0u8; IO_BYTES];
                    // SAFETY (below): plain data out-parameters and a buffer
                    // of IO_BYTES.
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    let mut lat = Vec::with_capacity(budget.ops as usize);
                    let start = Instant::now();
                    let blocks = (FILE_BYTES / IO_BYTES) as u64;
                    for i in 0..budget.ops {
                        let t0 = Instant::now();
                        let rc = match op {
                            Op::Fstat => (unsafe { libc::fstat(fd.0, &mut st) }) as isize,
                            Op::Stat => (unsafe { libc::stat(path.as_ptr(), &mut st) }) as isize,
                            Op::Pread => unsafe {
                                libc::pread(
                                    fd.0,
                                    buf.as_mut_ptr().cast(),
                                    IO_BYTES,
                                    (((i + t as u64 * 7) % blocks) * IO_BYTES as u64) as i64,
                                )
                            },
                        };
                        let t1 = Instant::now();
                        if rc < 0 || (op == Op::Pread && rc as usize != IO_BYTES) {
                            return Err(std::io::Error::last_os_error())
                                .with_context(|| format!("{} of {}", op.name(), file.display()));
                        }
                        lat.push((t1 - t0).as_nanos() as u64);
                        if i % 64 == 63 && (t1 - start >= budget.max || interrupted()) {
                            break;
                        }
                    }
                    Ok((start, Instant::now(), lat))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a benchmark thread panicked")))
            })
            .collect()
    });
    check_interrupt()?;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut latencies_ns = Vec::new();
    for o in outcomes {
        let (s, e, lat) = o?;
        first = Some(first.map_or(s, |f| f.min(s)));
        last = Some(last.map_or(e, |l| l.max(e)));
        latencies_ns.extend(lat);
    }
    let (Some(first), Some(last)) = (first, last) else {
        bail!("no thread ran");
    };
    Ok(Phase {
        ops: latencies_ns.len() as u64,
        elapsed: last - first,
        latencies_ns,
    })
}

fn requests(stats: &Option<StatsHandle>) -> Option<u64> {
    stats
        .as_ref()
        .map(|s| s.reports().iter().map(|r| r.requests).sum())
}

/// Measures every op, pinning and thread count of one column.
fn measure(
    spec: &Spec,
    live: &Live,
    budget: &Budget,
    unpinned: &libc::cpu_set_t,
    out: &mut HashMap<Key, Figures>,
) -> anyhow::Result<()> {
    let warm = Budget {
        ops: (budget.ops / 10).clamp(100, 1000),
        max: budget.max / 4,
    };
    for pin in Pin::ALL {
        let daemon_mask = match pin {
            Pin::Pinned => cpu0_mask(),
            Pin::Unpinned => *unpinned,
        };
        live.daemon.pin(&daemon_mask)?;
        for &op in &live.ops {
            arm(&live.mnt, budget.max * 3 + Duration::from_secs(10));
            run_op(&live.file, op, 1, pin, &warm, unpinned)?;
            for threads in THREADS {
                arm(&live.mnt, budget.max * 3 + Duration::from_secs(10));
                let before = requests(&live.stats);
                let phase = run_op(&live.file, op, threads, pin, budget, unpinned)?;
                let after = requests(&live.stats);
                let requests_per_op = match (before, after) {
                    (Some(b), Some(a)) if a > b && phase.ops > 0 => {
                        Some((a - b) as f64 / phase.ops as f64)
                    }
                    _ => None,
                };
                out.insert(
                    (spec.slug.clone(), op, pin, threads),
                    Figures {
                        mean_us: phase.mean_us(),
                        p99_us: phase.p99_us(),
                        ops_per_sec: phase.ops_per_sec(),
                        requests_per_op,
                    },
                );
            }
        }
    }
    live.daemon.pin(unpinned)?;
    Ok(())
}

// ---------------------------------------------------------------- the run

/// The run's temporary directory: removed at the end unless something is
/// still mounted below it (then kept and said so).
struct BaseDir(Option<tempfile::TempDir>);

impl Drop for BaseDir {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        let left = mounts_under(dir.path());
        if left.is_empty() {
            if let Err(e) = dir.close() {
                eprintln!("channels: cannot remove the temporary directory: {e}");
            }
        } else {
            let kept = dir.keep();
            eprintln!(
                "channels: NOT removing {}: still mounted below it: {left:?}",
                kept.display()
            );
        }
    }
}

pub fn run(args: ChannelsArgs) -> anyhow::Result<()> {
    install_signal_handlers();
    start_watchdog();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        bail!("the channels suite mounts file systems: run it as root with /dev/fuse");
    }
    if args.daemon_threads == 0 {
        bail!("--daemon-threads must be at least 1");
    }
    let budget = Budget {
        ops: args.ops.unwrap_or(if args.quick { 1500 } else { 20_000 }),
        max: Duration::from_millis(args.max_ms.unwrap_or(if args.quick { 120 } else { 2000 })),
    };
    let unpinned = original_mask();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "channels suite: kernel {}, {cpus} CPUs, load average {} at start; {} ops per thread per measurement (at most {} ms), warm-up before each",
        kernel.trim(),
        loadavg(),
        budget.ops,
        budget.max.as_millis()
    );
    println!("  pinned: application thread(s) and the daemon's threads all on CPU 0 (app and daemon share a CPU); unpinned: anywhere");
    println!("  every FUSE mount: entry and attribute timeouts 0, so fstat = GETATTR, stat = LOOKUP + GETATTR; pread4k = one READ (direct_io)");

    let base = BaseDir(Some(
        tempfile::Builder::new()
            .prefix("r3fs-bench-channels-")
            .tempdir()
            .context("create a temporary directory")?,
    ));
    let base_path = base.0.as_ref().expect("just made").path().to_path_buf();
    let mut specs: Vec<Spec> = Vec::new();
    let mut results: HashMap<Key, Figures> = HashMap::new();
    let mut notes: Vec<String> = Vec::new();

    let mut memfs_modes = vec![
        (ChannelMode::Fuse, None),
        (ChannelMode::Xfuse, Some(0.0)),
        (ChannelMode::Xfuse, Some(0.5)),
        (ChannelMode::Xfuse, Some(1.0)),
    ];
    let uring_skip = uring_unavailable();
    match &uring_skip {
        Some(why) => println!("uring: SKIPPED: {why}"),
        None => {
            println!(
                "uring: available; {URING_PARAM} (now {}) is Y only while a uring column runs, then put back",
                std::fs::read_to_string(URING_PARAM).unwrap_or_default().trim()
            );
            memfs_modes.push((ChannelMode::Uring, None));
        }
    }

    // The limit.
    let spec = Spec::plain(Kind::Tmpfs, "tmpfs");
    run_column(
        &spec,
        &base_path.join(&spec.slug),
        || setup_tmpfs(&base_path),
        &budget,
        &unpinned,
        &mut results,
        &mut notes,
    )?;
    specs.push(spec);

    // MemFs in each channel mode.
    for &(mode, ratio) in &memfs_modes {
        let spec = Spec::channel(Kind::MemFs, mode, ratio);
        run_column(
            &spec,
            &base_path.join(&spec.slug),
            || setup_memfs(&base_path, &spec, args.daemon_threads),
            &budget,
            &unpinned,
            &mut results,
            &mut notes,
        )?;
        specs.push(spec);
    }

    // The peer.
    let bindfs = which("bindfs");
    match (&bindfs, args.no_bindfs) {
        (_, true) => println!("bindfs: skipped (--no-bindfs)"),
        (None, _) => println!(
            "bindfs: SKIPPED: not installed (`apt-get install -y bindfs`); no bindfs column"
        ),
        (Some(b), false) => {
            let spec = Spec::plain(Kind::Bindfs, "bindfs");
            run_column(
                &spec,
                &base_path.join(&spec.slug),
                || setup_bindfs(&base_path, b),
                &budget,
                &unpinned,
                &mut results,
                &mut notes,
            )?;
            specs.push(spec);
        }
    }

    // The real client.
    if args.no_r3fs {
        println!("r3fs: skipped (--no-r3fs)");
    } else {
        let bin = r3fs_bin(args.r3fs_bin.as_deref())?;
        if !bin.exists() {
            println!(
                "r3fs: SKIPPED: {} not found (`cargo build --release -p r3fs-cli` or --r3fs-bin)",
                bin.display()
            );
        } else {
            let data = base_path.join("r3fs-data");
            std::fs::create_dir_all(&data)?;
            // Dropped after every r3fs column's teardown.
            let _cluster = ClusterStop {
                bin: bin.clone(),
                data: data.clone(),
            };
            let mut modes = vec![(ChannelMode::Fuse, None), (ChannelMode::Xfuse, Some(0.0))];
            if !args.quick {
                modes.push((ChannelMode::Xfuse, Some(0.5)));
                if uring_skip.is_none() {
                    modes.push((ChannelMode::Uring, None));
                }
            }
            for (mode, ratio) in modes {
                let spec = Spec::channel(Kind::R3fs, mode, ratio);
                let started = Instant::now();
                run_column(
                    &spec,
                    &base_path.join(&spec.slug),
                    || setup_r3fs(&base_path, &bin, &data, &spec),
                    &budget,
                    &unpinned,
                    &mut results,
                    &mut notes,
                )?;
                println!(
                    "  ({} incl. mount/unmount: {:.1} s)",
                    spec.label,
                    started.elapsed().as_secs_f64()
                );
                specs.push(spec);
            }
        }
    }

    println!("load average at the end: {}", loadavg());
    report(&specs, &results, &notes, &args, &base_path)?;
    drop(base);
    Ok(())
}

/// Sets up, measures and tears down one column. A failure of the column is
/// printed and leaves it empty; a signal ends the run.
fn run_column(
    spec: &Spec,
    mnt: &Path,
    setup: impl FnOnce() -> anyhow::Result<Live>,
    budget: &Budget,
    unpinned: &libc::cpu_set_t,
    results: &mut HashMap<Key, Figures>,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    println!("running {} ...", spec.label);
    FIRED.store(false, Ordering::SeqCst);
    // A mount (an r3fs one starts a cluster first) and a file written.
    arm(mnt, Duration::from_secs(90));
    let outcome = setup().and_then(|live| {
        notes.push(format!(
            "{}: {}; pinned daemon = {}",
            spec.label,
            live.note,
            live.daemon.describe()
        ));
        let measured = measure(spec, &live, budget, unpinned, results);
        arm(mnt, Duration::from_secs(30));
        drop(live);
        measured
    });
    disarm();
    let outcome = match outcome {
        Err(e) if FIRED.load(Ordering::SeqCst) => {
            Err(e.context("the mount stopped answering and was aborted by the watchdog"))
        }
        o => o,
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(e) if interrupted() => Err(e),
        Err(e) => {
            println!("  {}: FAILED: {e:#}", spec.label);
            notes.push(format!("{}: FAILED: {e:#}", spec.label));
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- report

fn report(
    specs: &[Spec],
    results: &HashMap<Key, Figures>,
    notes: &[String],
    args: &ChannelsArgs,
    base: &Path,
) -> anyhow::Result<()> {
    let get = |s: &Spec, op: Op, pin: Pin, t: usize| results.get(&(s.slug.clone(), op, pin, t));
    println!();
    for n in notes {
        println!("  {n}");
    }
    // Requests per op, from MemFs's channel counters.
    for s in specs.iter().filter(|s| s.kind == Kind::MemFs) {
        let per: Vec<String> = Op::ALL
            .iter()
            .filter_map(|&op| {
                get(s, op, Pin::Unpinned, 1)
                    .and_then(|f| f.requests_per_op)
                    .map(|r| format!("{} {r:.2}", op.name()))
            })
            .collect();
        if !per.is_empty() {
            println!("  {}: kernel requests per op: {}", s.label, per.join(", "));
        }
    }

    let mut header = vec!["op", "pin", "figure"];
    header.extend(specs.iter().map(|s| s.label.as_str()));
    println!("\nLatency, 1 application thread: mean / p99 µs");
    let mut table = Table::new(&header);
    for op in Op::ALL {
        for pin in Pin::ALL {
            let mut row = vec![
                op.name().to_string(),
                pin.name().into(),
                "mean/p99 µs".into(),
            ];
            row.extend(specs.iter().map(|s| match get(s, op, pin, 1) {
                Some(f) => format!("{:.1}/{:.0}", f.mean_us, f.p99_us),
                None => "-".into(),
            }));
            table.row(row);
        }
    }
    table.print();
    println!("\nThroughput: kops/s with 1 and 2 application threads");
    let mut table = Table::new(&header);
    for op in Op::ALL {
        for pin in Pin::ALL {
            for t in THREADS {
                let mut row = vec![
                    op.name().to_string(),
                    pin.name().into(),
                    format!("{t} thr kops/s"),
                ];
                row.extend(specs.iter().map(|s| match get(s, op, pin, t) {
                    Some(f) => format!("{:.1}", f.ops_per_sec / 1e3),
                    None => "-".into(),
                }));
                table.row(row);
            }
        }
    }
    table.print();

    // Which MemFs mode wins where.
    let modes: Vec<&Spec> = specs.iter().filter(|s| s.kind == Kind::MemFs).collect();
    println!("\nBest MemFs mode:");
    for op in Op::ALL {
        for pin in Pin::ALL {
            let lat = modes
                .iter()
                .filter_map(|s| get(s, op, pin, 1).map(|f| (s, f.mean_us)))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let thr = modes
                .iter()
                .filter_map(|s| get(s, op, pin, 2).map(|f| (s, f.ops_per_sec)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let (Some(l), Some(t)) = (lat, thr) {
                println!(
                    "  {:<8} {:<8}: lowest latency {} ({:.1} µs); most ops/s with 2 threads {} ({:.1} k)",
                    op.name(),
                    pin.name(),
                    l.0.label,
                    l.1,
                    t.0.label,
                    t.1 / 1e3
                );
            }
        }
    }

    // The chart.
    let chart_path = match &args.chart {
        Some(p) => p.clone(),
        None => {
            let dir = std::env::temp_dir().join("r3fs-bench-output");
            std::fs::create_dir_all(&dir)?;
            dir.join("channels.png")
        }
    };
    let _ = base;
    let labels: Vec<String> = specs.iter().map(|s| s.label.clone()).collect();
    let series = |f: &dyn Fn(&Spec) -> Option<f64>| specs.iter().map(f).collect::<Vec<_>>();
    let mut latency = Vec::new();
    for op in Op::ALL {
        for pin in Pin::ALL {
            latency.push((
                format!("{} {}", op.name(), pin.name()),
                series(&|s| get(s, op, pin, 1).map(|f| f.mean_us)),
            ));
        }
    }
    let mut throughput = Vec::new();
    for op in [Op::Fstat, Op::Pread] {
        for pin in Pin::ALL {
            for t in THREADS {
                throughput.push((
                    format!("{} {} {t} thr", op.name(), pin.name()),
                    series(&|s| get(s, op, pin, t).map(|f| f.ops_per_sec / 1e3)),
                ));
            }
        }
    }
    let panels = [
        chart::Panel {
            title: "mean latency, 1 application thread (log scale)".into(),
            unit: "µs".into(),
            series: latency,
        },
        chart::Panel {
            title: "throughput (log scale)".into(),
            unit: "kops/s".into(),
            series: throughput,
        },
    ];
    let title = format!(
        "r3fs-bench channels: kernel round trip per channel mode ({cpus} CPUs; pinned = app + daemon on CPU 0)",
        cpus = std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    match chart::draw(&chart_path, &title, &labels, &panels) {
        Ok(()) => println!("\nchart: {}", chart_path.display()),
        Err(e) => println!("\nchart: NOT written ({e:#})"),
    }

    // Machine-readable lines.
    println!();
    for s in specs {
        for op in Op::ALL {
            for pin in Pin::ALL {
                let name = format!("{}_{}_{}", s.slug, op.name(), pin.name());
                if let Some(f) = get(s, op, pin, 1) {
                    result(SUITE, &format!("{name}_mean"), f.mean_us, "us");
                    result(SUITE, &format!("{name}_p99"), f.p99_us, "us");
                }
                for t in THREADS {
                    if let Some(f) = get(s, op, pin, t) {
                        result(SUITE, &format!("{name}_{t}t"), f.ops_per_sec, "ops/s");
                    }
                }
            }
        }
    }
    ratios(specs, results);
    Ok(())
}

fn ratios(specs: &[Spec], results: &HashMap<Key, Figures>) {
    let mean = |s: &Spec, op: Op, pin: Pin| {
        results
            .get(&(s.slug.clone(), op, pin, 1))
            .map(|f| f.mean_us)
    };
    let modes: Vec<&Spec> = specs.iter().filter(|s| s.kind == Kind::MemFs).collect();
    let best = |op: Op, pin: Pin| {
        modes
            .iter()
            .filter_map(|s| mean(s, op, pin).map(|m| (*s, m)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    let worst = |op: Op, pin: Pin| {
        modes
            .iter()
            .filter_map(|s| mean(s, op, pin).map(|m| (*s, m)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    };
    let classic = modes.iter().find(|s| s.is_classic());
    let bindfs = specs.iter().find(|s| s.kind == Kind::Bindfs);
    let tmpfs = specs.iter().find(|s| s.kind == Kind::Tmpfs);
    for op in Op::ALL {
        if let (Some(c), Some((b, bm))) = (classic, best(op, Pin::Unpinned)) {
            if let Some(cm) = mean(c, op, Pin::Unpinned) {
                println!(
                    "# {}: classic {cm:.1} µs / best ({}) {bm:.1} µs, unpinned",
                    op.name(),
                    b.label
                );
                ratio(
                    SUITE,
                    &format!("best_vs_classic_{}_unpinned", op.name()),
                    cm / bm,
                );
            }
        }
    }
    if let (Some((bu, mu)), Some((bp, mp))) =
        (best(Op::Fstat, Pin::Unpinned), best(Op::Fstat, Pin::Pinned))
    {
        println!(
            "# fstat: best unpinned ({}) {mu:.1} µs / best pinned ({}) {mp:.1} µs",
            bu.label, bp.label
        );
        ratio(SUITE, "best_unpinned_vs_pinned_fstat", mu / mp);
    }
    if let Some(c) = classic {
        if let (Some(u), Some(p)) = (
            mean(c, Op::Fstat, Pin::Unpinned),
            mean(c, Op::Fstat, Pin::Pinned),
        ) {
            ratio(SUITE, "classic_unpinned_vs_pinned_fstat", u / p);
        }
    }
    if let (Some((w, wm)), Some(b)) = (worst(Op::Fstat, Pin::Unpinned), bindfs) {
        if let Some(bm) = mean(b, Op::Fstat, Pin::Unpinned) {
            println!(
                "# fstat unpinned: slowest mode ({}) {wm:.1} µs / bindfs {bm:.1} µs",
                w.label
            );
            ratio(SUITE, "slowest_mode_vs_bindfs_fstat", wm / bm);
        }
    }
    if let (Some((_, bm)), Some(b)) = (best(Op::Fstat, Pin::Unpinned), bindfs) {
        if let Some(bf) = mean(b, Op::Fstat, Pin::Unpinned) {
            ratio(SUITE, "best_mode_vs_bindfs_fstat", bm / bf);
        }
    }
    if let (Some((_, bm)), Some(t)) = (best(Op::Fstat, Pin::Unpinned), tmpfs) {
        if let Some(tm) = mean(t, Op::Fstat, Pin::Unpinned) {
            ratio(SUITE, "best_mode_vs_tmpfs_fstat", bm / tm);
        }
    }
    // 2-thread throughput: best mode over classic.
    let ops2 = |s: &Spec| {
        results
            .get(&(s.slug.clone(), Op::Fstat, Pin::Unpinned, 2))
            .map(|f| f.ops_per_sec)
    };
    if let Some(c) = classic.and_then(|c| ops2(c)) {
        if let Some(b) = modes
            .iter()
            .filter_map(|s| ops2(s))
            .max_by(|a, b| a.total_cmp(b))
        {
            ratio(SUITE, "best_vs_classic_fstat_2t_unpinned_throughput", b / c);
        }
    }
    // The real client over MemFs in the same mode: what the cluster adds.
    for r in specs.iter().filter(|s| s.kind == Kind::R3fs) {
        let same = modes
            .iter()
            .find(|m| m.mode == r.mode && m.ratio == r.ratio);
        if let (Some(m), Some(rm)) = (same, mean(r, Op::Fstat, Pin::Unpinned)) {
            if let Some(mm) = mean(m, Op::Fstat, Pin::Unpinned) {
                ratio(
                    SUITE,
                    &format!("{}_vs_{}_fstat_unpinned", r.slug, m.slug),
                    rm / mm,
                );
            }
        }
    }
}
