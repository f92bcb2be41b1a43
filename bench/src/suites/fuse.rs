//! The `fuse` suite: the same single-threaded workload through three file
//! systems, one after another in one run:
//!
//! 1. `tmpfs`: a private tmpfs, the limit (no FUSE, memory is the store);
//! 2. `bindfs`: bindfs (a libfuse passthrough daemon) over another private
//!    tmpfs, so FUSE's own cost shows apart from the cluster's;
//! 3. `r3fs`: `r3fs mount` on a fresh local cluster in a temporary data dir.
//!
//! Workloads: create, stat and unlink of N empty files; a sequential write
//! then read of S MiB in 1 MiB blocks; 4 KiB random reads of that file.
//! Each target is set up just before its workloads and torn down right
//! after, so idle daemons of one do not run during another.
//!
//! Caches: FUSE entries and attributes are cached for 1 s on both FUSE
//! mounts (set explicitly), and stat runs after 1.1 s idle, so every FUSE
//! stat costs one LOOKUP. The sequential write is timed up to fsync and
//! close; then the file's pages are dropped (fsync, `POSIX_FADV_DONTNEED`)
//! and it is reopened (bindfs and r3fs open without `FOPEN_KEEP_CACHE`, so
//! the open drops the FUSE page cache too); the share still cached is
//! measured with `cachestat(2)` just before the read and printed. Random
//! reads use O_DIRECT where the open accepts it, else buffered reads after
//! the same drop (printed per target). What is not dropped is printed too:
//! tmpfs is memory, and r3fs's chunk files sit in the host page cache.
//!
//! Pinning (`--pin`) applies to the benchmark thread during the workloads
//! only: daemons are started unpinned and stay so.
//!
//! Cleanup: every mount, child and temporary directory is registered in a
//! [`Cleanup`] list before it exists and released in reverse order when the
//! target is done, when `run` returns or unwinds, or, after SIGINT/SIGTERM,
//! by a watcher thread if the workload does not stop in time.

use std::ffi::{CString, OsStr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::mounts::{
    check_interrupt, cpath, install_signal_handlers, joined, loadavg, mount_tmpfs, mounted_at,
    mounts_under, r3fs_bin, signal_count, spawn_bindfs, stop_child, unmount_all, wait_mounted,
    which, Fd, IfBusy,
};
use crate::report::{ratio, result, Phase, Table};

const SUITE: &str = "fuse";
const BLOCK: usize = 1 << 20;
const SMALL: usize = 4096;
/// Kernel entry/attribute cache timeout given to both FUSE mounts.
const CACHE_TIMEOUT_MS: u64 = 1000;
/// Idle time before the stat phase: longer than [`CACHE_TIMEOUT_MS`].
const STAT_COLD_WAIT: Duration = Duration::from_millis(1100);
/// How often a mount that is awaited, or a child that should exit, is
/// looked at.
const POLL: Duration = Duration::from_millis(20);
/// How long after SIGINT/SIGTERM the watcher waits for the workload to stop
/// before it cleans up by itself and exits.
const INTERRUPT_GRACE: Duration = Duration::from_secs(20);

#[derive(clap::Args)]
pub struct FuseArgs {
    /// Empty files created, stat'ed and unlinked by each target.
    #[arg(long, default_value_t = 10_000)]
    files: u64,
    /// MiB written then read sequentially (1 MiB blocks) by each target.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// 4 KiB random reads of the written file by each target.
    #[arg(long, default_value_t = 20_000)]
    random_reads: u64,
    /// Pin the benchmark thread to CPU 0 during the workloads (daemons stay
    /// unpinned).
    #[arg(long)]
    pin: bool,
    /// The r3fs binary [default: `r3fs` next to this executable].
    #[arg(long)]
    r3fs_bin: Option<PathBuf>,
    /// Extra argument for `r3fs mount` (repeatable), e.g. --writeback-cache.
    #[arg(long, allow_hyphen_values = true)]
    r3fs_mount_arg: Vec<String>,
    /// Keep the temporary directory (r3fs data dir and logs) after the run;
    /// mounts and processes are removed all the same.
    #[arg(long)]
    keep: bool,
}

// ---------------------------------------------------------------- signals

/// Blocks (`block`) or unblocks SIGINT and SIGTERM in the calling thread.
/// The main thread blocks them so that they reach the watcher thread even
/// while the main thread waits in the kernel for a stuck FUSE daemon.
/// (Rust's `Command` clears the mask in children.)
fn mask_signals(block: bool) {
    // SAFETY: a fully initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

// ---------------------------------------------------------------- cleanup

enum Item {
    /// A mount we made with mount(2) (tmpfs).
    Unmount(PathBuf),
    /// bindfs: unmount, then wait for (or kill) our child.
    Bindfs { mnt: PathBuf, child: Child },
    /// `r3fs umount`, then make sure the local cluster of `data` is stopped.
    R3fs {
        bin: PathBuf,
        mnt: PathBuf,
        data: PathBuf,
    },
    /// The temporary directory; kept with --keep, and never removed while
    /// anything is still mounted below it.
    RemoveDir { path: PathBuf, keep: bool },
}

/// What to undo, last registered first. Shared with the signal watcher;
/// each item is taken out once, and released outside the list's lock.
#[derive(Clone, Default)]
struct Cleanup(Arc<Mutex<Vec<Item>>>, Arc<Mutex<()>>);

impl Cleanup {
    fn push(&self, item: Item) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(item);
    }
    fn mark(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    fn pop_above(&self, mark: usize) -> Option<Item> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() > mark {
            v.pop()
        } else {
            None
        }
    }
    /// Releases everything registered after `mark`, one item at a time
    /// across threads (the second lock), so order holds even when the
    /// watcher and the main thread both clean up.
    fn release_to(&self, mark: usize) {
        loop {
            let _one = self.1.lock().unwrap_or_else(|e| e.into_inner());
            let Some(item) = self.pop_above(mark) else {
                return;
            };
            release(item);
        }
    }
    fn release_all(&self) {
        self.release_to(0);
    }
    fn with_bindfs_child<R>(&self, f: impl FnOnce(&mut Child) -> R) -> Option<R> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let child = v.iter_mut().rev().find_map(|i| match i {
            Item::Bindfs { child, .. } => Some(child),
            _ => None,
        })?;
        Some(f(child))
    }
}

/// Releases everything when dropped (normal return, error or panic).
struct CleanupGuard(Cleanup);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        self.0.release_all();
    }
}

fn release(item: Item) {
    match item {
        Item::Unmount(path) => unmount(&path),
        Item::Bindfs { mnt, mut child } => {
            unmount(&mnt);
            stop_child(&mut child, "bindfs", POLL, SUITE);
        }
        Item::R3fs { bin, mnt, data } => {
            let r3fs = |args: &[&OsStr]| {
                let out = Command::new(&bin)
                    .args(args)
                    .arg("--data-dir")
                    .arg(&data)
                    .stdin(Stdio::null())
                    .process_group(0)
                    .output();
                match out {
                    Ok(o) if o.status.success() => true,
                    Ok(o) => {
                        let err = String::from_utf8_lossy(&o.stderr);
                        let err = err.trim();
                        if !err.contains("is not an r3fs mount") {
                            eprintln!("fuse: `r3fs {}` failed: {err}", args[0].to_string_lossy());
                        }
                        false
                    }
                    Err(e) => {
                        eprintln!("fuse: cannot run {}: {e}", bin.display());
                        false
                    }
                }
            };
            let m = mnt.as_os_str();
            let t = Instant::now();
            let umounted = r3fs(&["umount".as_ref(), m]);
            if umounted {
                println!(
                    "  r3fs: `r3fs umount` (daemon exit, local cluster stop) took {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
            if !umounted && mounted_at(&mnt) {
                // Busy or a stuck daemon: detach now, then let `r3fs umount`
                // wait for (and at worst kill) its daemon and stop the cluster.
                eprintln!("fuse: detaching {} and stopping its daemon", mnt.display());
                unmount(&mnt);
                r3fs(&["umount".as_ref(), m]);
            }
            // A cluster that `r3fs umount` left, or that a failed mount started.
            if data.join("local-cluster.pid").exists() {
                r3fs(&[
                    "local-cluster".as_ref(),
                    "stop".as_ref(),
                    "--force".as_ref(),
                ]);
            }
        }
        Item::RemoveDir { path, keep } => {
            let left = mounts_under(&path);
            if !left.is_empty() {
                eprintln!(
                    "fuse: NOT removing {}: still mounted below it: {}",
                    path.display(),
                    joined(&left)
                );
            } else if keep {
                println!("kept {}", path.display());
            } else if let Err(e) = std::fs::remove_dir_all(&path) {
                eprintln!("fuse: remove {}: {e}", path.display());
            }
        }
    }
}

// ---------------------------------------------------------------- mounts

/// Unmounts `path` (all stacked mounts), lazily if busy; silent if none.
fn unmount(path: &Path) {
    unmount_all(path, IfBusy::Detach, SUITE);
}

// ---------------------------------------------------------------- pinning

/// The calling thread pinned to CPU 0 until dropped.
struct Pinned(Option<libc::cpu_set_t>);

impl Pinned {
    fn new(pin: bool) -> anyhow::Result<Pinned> {
        if !pin {
            return Ok(Pinned(None));
        }
        // SAFETY: cpu_set_t is plain data; pid 0 is this thread.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of_val(&old), &mut old) != 0 {
                return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error()).context("pin to CPU 0");
            }
            Ok(Pinned(Some(old)))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the mask read in `new`.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(old), old) };
        }
    }
}

// ---------------------------------------------------------------- file I/O

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: owned allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn os<T: PartialOrd + Default>(rc: T, what: &str) -> anyhow::Result<T> {
    if rc < T::default() {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(rc)
}

/// Bytes of `fd`'s file in the page cache, by `cachestat(2)` (Linux 6.5+).
fn cached_bytes(fd: &Fd) -> Option<u64> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: valid pointers to repr(C) structs of the kernel's layout.
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, fd.0, &range, &mut st, 0u32) };
    // SAFETY: page size query.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    (rc == 0).then_some(st.nr_cache * page)
}

/// Bytes of the regular files below `dir` that are in the page cache.
fn cached_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut cached = 0;
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            cached += cached_under(&e.path());
        } else if ft.is_file() {
            if let Ok(fd) = Fd::open(&e.path(), libc::O_RDONLY) {
                cached += cached_bytes(&fd).unwrap_or(0);
            }
        }
    }
    cached
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0%".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

// ---------------------------------------------------------------- workloads

struct Col {
    create: Phase,
    stat: Phase,
    unlink: Phase,
    write_mibs: f64,
    read_mibs: f64,
    rand: Phase,
    /// How the reads met caches, for the notes under the table.
    notes: Vec<String>,
}

/// One timed operation per element; latencies per op.
fn timed<T>(items: &[T], mut op: impl FnMut(&T) -> anyhow::Result<()>) -> anyhow::Result<Phase> {
    let mut lat = Vec::with_capacity(items.len());
    let start = Instant::now();
    for it in items {
        check_interrupt()?;
        let s = Instant::now();
        op(it)?;
        lat.push(s.elapsed().as_nanos() as u64);
    }
    Ok(Phase {
        ops: items.len() as u64,
        elapsed: start.elapsed(),
        latencies_ns: lat,
    })
}

fn block_tag(buf: &mut [u8], i: u64) {
    buf[..8].copy_from_slice(&i.to_le_bytes());
}

/// The workloads on the directory `root` of a mounted file system.
/// `server_cache`: a directory whose files' page cache share is reported
/// before reads (r3fs's storage targets).
fn workloads(
    root: &Path,
    args: &FuseArgs,
    offsets: &[u64],
    server_cache: Option<&Path>,
) -> anyhow::Result<Col> {
    let mut notes = Vec::new();
    let _pin = Pinned::new(args.pin)?;

    // Metadata: empty files in one directory.
    let dir = root.join("meta");
    std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let names: Vec<CString> = (0..args.files)
        .map(|i| cpath(&dir.join(format!("f{i:08}"))))
        .collect();
    let create = timed(&names, |p| {
        // SAFETY: valid path.
        let fd = unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            )
        };
        os(fd, "create")?;
        // SAFETY: our fd.
        os(unsafe { libc::close(fd) }, "close")?;
        Ok(())
    })?;
    std::thread::sleep(STAT_COLD_WAIT);
    let stat = timed(&names, |p| {
        // SAFETY: valid path and out buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        os(unsafe { libc::stat(p.as_ptr(), &mut st) }, "stat")?;
        Ok(())
    })?;
    let unlink = timed(&names, |p| {
        // SAFETY: valid path.
        os(unsafe { libc::unlink(p.as_ptr()) }, "unlink")?;
        Ok(())
    })?;
    std::fs::remove_dir(&dir)?;

    // Sequential write: timed to fsync and close.
    let path = root.join("seq.dat");
    let blocks = args.size_mib.max(1);
    let mut buf = Aligned::new(BLOCK);
    for (i, b) in buf.as_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let start = Instant::now();
    {
        let fd = Fd::open(&path, libc::O_CREAT | libc::O_TRUNC | libc::O_WRONLY)
            .with_context(|| format!("create {}", path.display()))?;
        for i in 0..blocks {
            check_interrupt()?;
            block_tag(buf.as_mut(), i);
            // SAFETY: our fd and buffer.
            let n = unsafe { libc::write(fd.0, buf.ptr.cast(), BLOCK) };
            if os(n, "write")? as usize != BLOCK {
                bail!("short write at block {i}");
            }
        }
        // SAFETY: our fd.
        os(unsafe { libc::fsync(fd.0) }, "fsync")?;
        let raw = fd.0;
        std::mem::forget(fd);
        // SAFETY: our fd, closed once (the guard was forgotten).
        os(unsafe { libc::close(raw) }, "close")?;
    }
    let write_mibs = blocks as f64 / start.elapsed().as_secs_f64();

    // Drop the file's pages, then reopen for the read.
    drop_cache(&path)?;
    let size = blocks * BLOCK as u64;
    let server = |what: &str, notes: &mut Vec<String>| {
        if let Some(d) = server_cache {
            let c = cached_under(d);
            notes.push(format!(
                "before {what}: {} MiB of the storage targets' files in the host page cache \
                 (file {blocks} MiB x 3 replicas = {} MiB): servers may read from memory (not dropped)",
                c >> 20,
                blocks * 3
            ));
        }
    };
    let read_mibs = {
        let fd = Fd::open(&path, libc::O_RDONLY)?;
        let cached = cached_bytes(&fd);
        notes.push(format!(
            "seq read: {} of the file in the page cache at open (after fsync + POSIX_FADV_DONTNEED + reopen)",
            cached.map_or("unknown (no cachestat)".into(), |c| pct(c, size))
        ));
        server("seq read", &mut notes);
        let start = Instant::now();
        for i in 0..blocks {
            check_interrupt()?;
            let mut got = 0;
            while got < BLOCK {
                // SAFETY: our fd; reads into the buffer's remaining bytes.
                let n = unsafe { libc::read(fd.0, buf.ptr.add(got).cast(), BLOCK - got) };
                let n = os(n, "read")?;
                if n == 0 {
                    bail!("unexpected end of file at block {i}");
                }
                got += n as usize;
            }
            let tag = u64::from_le_bytes(buf.as_mut()[..8].try_into().unwrap());
            if tag != i || buf.as_mut()[BLOCK - 1] != ((BLOCK - 1) % 251) as u8 {
                bail!("block {i} read back wrong (tag {tag})");
            }
        }
        drop(fd);
        blocks as f64 / start.elapsed().as_secs_f64()
    };

    // Random 4 KiB reads.
    drop_cache(&path)?;
    let (fd, mode) = match Fd::open(&path, libc::O_RDONLY | libc::O_DIRECT) {
        Ok(fd) => (fd, "O_DIRECT".to_string()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let fd = Fd::open(&path, libc::O_RDONLY)?;
            let c = cached_bytes(&fd).map_or("?".into(), |c| pct(c, size));
            (
                fd,
                format!("buffered (O_DIRECT refused), {c} cached at open after DONTNEED; readahead may serve later reads"),
            )
        }
        Err(e) => return Err(e).context("open for random reads"),
    };
    notes.push(format!("rand 4K reads: {mode}"));
    server("rand reads", &mut notes);
    let small = Aligned::new(SMALL);
    let rand = timed(offsets, |&off| {
        // SAFETY: our fd and aligned buffer.
        let n = unsafe { libc::pread(fd.0, small.ptr.cast(), SMALL, off as libc::off_t) };
        if os(n, "pread")? as usize != SMALL {
            bail!("short read at {off}");
        }
        Ok(())
    })?;
    drop(fd);
    std::fs::remove_file(&path)?;
    Ok(Col {
        create,
        stat,
        unlink,
        write_mibs,
        read_mibs,
        rand,
        notes,
    })
}

/// fsync + POSIX_FADV_DONTNEED of `path`'s pages (the caller reopens).
fn drop_cache(path: &Path) -> anyhow::Result<()> {
    let fd = Fd::open(path, libc::O_RDONLY)?;
    // SAFETY: our fd.
    unsafe {
        os(libc::fsync(fd.0), "fsync")?;
        let rc = libc::posix_fadvise(fd.0, 0, 0, libc::POSIX_FADV_DONTNEED);
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc)).context("posix_fadvise");
        }
    }
    Ok(())
}

/// Same offsets for every target: splitmix64 over the file's 4 KiB slots.
fn random_offsets(n: u64, size: u64) -> Vec<u64> {
    let slots = (size / SMALL as u64).max(1);
    let mut x: u64 = 0x5eed_f00d;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z % slots) * SMALL as u64
        })
        .collect()
}

// ---------------------------------------------------------------- targets

fn run_tmpfs(
    base: &Path,
    args: &FuseArgs,
    offsets: &[u64],
    cleanup: &Cleanup,
    tmpfs_mib: u64,
) -> anyhow::Result<Col> {
    let mnt = base.join("tmpfs");
    std::fs::create_dir(&mnt)?;
    cleanup.push(Item::Unmount(mnt.clone()));
    mount_tmpfs(&mnt, c"r3fs-bench-tmpfs", tmpfs_mib)?;
    let mut col = workloads(&mnt, args, offsets, None)?;
    col.notes
        .push("tmpfs is memory: every read is served from RAM, no cache can be dropped".into());
    Ok(col)
}

fn run_bindfs(
    base: &Path,
    bindfs: &Path,
    args: &FuseArgs,
    offsets: &[u64],
    cleanup: &Cleanup,
    tmpfs_mib: u64,
) -> anyhow::Result<Col> {
    let src = base.join("bindfs-src");
    let mnt = base.join("bindfs");
    std::fs::create_dir(&src)?;
    std::fs::create_dir(&mnt)?;
    cleanup.push(Item::Unmount(src.clone()));
    mount_tmpfs(&src, c"r3fs-bench-tmpfs", tmpfs_mib)?;
    let options = format!(
        "big_writes,entry_timeout={t},attr_timeout={t}",
        t = CACHE_TIMEOUT_MS as f64 / 1000.0
    );
    let child = spawn_bindfs(bindfs, &[], &options, &src, &mnt)
        .with_context(|| format!("start {}", bindfs.display()))?;
    cleanup.push(Item::Bindfs {
        mnt: mnt.clone(),
        child,
    });
    wait_mounted(&mnt, POLL, || {
        match cleanup.with_bindfs_child(|c| c.try_wait()) {
            Some(Ok(Some(status))) => bail!("bindfs exited early: {status}"),
            _ => Ok(()),
        }
    })?;
    let mut col = workloads(&mnt, args, offsets, None)?;
    col.notes.push(
        "bindfs's backing store is tmpfs (memory); only the FUSE page cache is dropped".into(),
    );
    Ok(col)
}

fn run_r3fs(
    base: &Path,
    bin: &Path,
    args: &FuseArgs,
    offsets: &[u64],
    cleanup: &Cleanup,
) -> anyhow::Result<Col> {
    let mnt = base.join("r3fs");
    let data = base.join("r3fs-data");
    std::fs::create_dir(&mnt)?;
    std::fs::create_dir(&data)?;
    cleanup.push(Item::R3fs {
        bin: bin.to_path_buf(),
        mnt: mnt.clone(),
        data: data.clone(),
    });
    let t = Instant::now();
    let out = Command::new(bin)
        .arg("mount")
        .arg(&mnt)
        .arg("--data-dir")
        .arg(&data)
        .arg(format!("--attr-timeout-ms={CACHE_TIMEOUT_MS}"))
        .arg(format!("--entry-timeout-ms={CACHE_TIMEOUT_MS}"))
        .args(&args.r3fs_mount_arg)
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .with_context(|| format!("run {} mount", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`r3fs mount` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  r3fs: {line}");
    }
    println!(
        "  r3fs: local cluster + mount ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if !mounted_at(&mnt) {
        bail!(
            "`r3fs mount` succeeded but {} is not mounted",
            mnt.display()
        );
    }
    let mut col = workloads(&mnt, args, offsets, Some(&data.join("storage")))?;
    col.notes.push(format!(
        "r3fs mount: defaults + entry/attr timeout {CACHE_TIMEOUT_MS} ms{}",
        if args.r3fs_mount_arg.is_empty() {
            String::new()
        } else {
            format!(" + {}", args.r3fs_mount_arg.join(" "))
        }
    ));
    Ok(col)
}

// ---------------------------------------------------------------- report

fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

struct Row {
    label: &'static str,
    metric: &'static str,
    unit: &'static str,
    get: fn(&Col) -> f64,
    /// Digits after the point in the table.
    prec: usize,
}

const ROWS: &[Row] = &[
    Row {
        label: "create ops/s",
        metric: "create_ops",
        unit: "ops/s",
        get: |c| c.create.ops_per_sec(),
        prec: 0,
    },
    Row {
        label: "create mean µs",
        metric: "create_mean_us",
        unit: "us",
        get: |c| c.create.mean_us(),
        prec: 1,
    },
    Row {
        label: "stat ops/s",
        metric: "stat_ops",
        unit: "ops/s",
        get: |c| c.stat.ops_per_sec(),
        prec: 0,
    },
    Row {
        label: "stat mean µs",
        metric: "stat_mean_us",
        unit: "us",
        get: |c| c.stat.mean_us(),
        prec: 1,
    },
    Row {
        label: "unlink ops/s",
        metric: "unlink_ops",
        unit: "ops/s",
        get: |c| c.unlink.ops_per_sec(),
        prec: 0,
    },
    Row {
        label: "unlink mean µs",
        metric: "unlink_mean_us",
        unit: "us",
        get: |c| c.unlink.mean_us(),
        prec: 1,
    },
    Row {
        label: "seq write MiB/s",
        metric: "seq_write_mibs",
        unit: "MiB/s",
        get: |c| c.write_mibs,
        prec: 0,
    },
    Row {
        label: "seq read MiB/s",
        metric: "seq_read_mibs",
        unit: "MiB/s",
        get: |c| c.read_mibs,
        prec: 0,
    },
    Row {
        label: "rand 4K read IOPS",
        metric: "rand4k_iops",
        unit: "IOPS",
        get: |c| c.rand.ops_per_sec(),
        prec: 0,
    },
    Row {
        label: "rand 4K mean µs",
        metric: "rand4k_mean_us",
        unit: "us",
        get: |c| c.rand.mean_us(),
        prec: 1,
    },
    Row {
        label: "rand 4K p99 µs",
        metric: "rand4k_p99_us",
        unit: "us",
        get: |c| c.rand.p99_us(),
        prec: 1,
    },
];

// ---------------------------------------------------------------- run

pub fn run(args: FuseArgs) -> anyhow::Result<()> {
    install_signal_handlers();
    let cleanup = Cleanup::default();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (cleanup, done) = (cleanup.clone(), done.clone());
        std::thread::spawn(move || {
            mask_signals(false);
            let mut first: Option<Instant> = None;
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                let n = signal_count();
                if n == 0 {
                    continue;
                }
                let since = *first.get_or_insert_with(Instant::now);
                if n >= 2 || since.elapsed() > INTERRUPT_GRACE {
                    eprintln!("fuse: interrupted and the workload did not stop; cleaning up");
                    cleanup.release_all();
                    std::process::exit(130);
                }
            }
        })
    };
    mask_signals(true);
    let out = run_inner(&args, &cleanup);
    cleanup.release_all();
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    out
}

fn run_inner(args: &FuseArgs, cleanup: &Cleanup) -> anyhow::Result<()> {
    let _guard = CleanupGuard(cleanup.clone());
    // SAFETY: plain query.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the fuse suite mounts tmpfs and FUSE file systems: run it as root");
    }
    let r3fs_bin = r3fs_bin(args.r3fs_bin.as_deref())?;
    if !r3fs_bin.is_file() {
        bail!(
            "{} not found: build it (`cargo build --release -p r3fs-cli`) or pass --r3fs-bin",
            r3fs_bin.display()
        );
    }
    let bindfs = which("bindfs");
    let blocks = args.size_mib.max(1);
    let tmpfs_mib = blocks + 256;
    if let Some(avail) = mem_available_mib() {
        if avail < tmpfs_mib + 512 {
            bail!(
                "{avail} MiB of memory available; the tmpfs targets need about {} MiB: lower --size-mib",
                tmpfs_mib + 512
            );
        }
    }
    let base = tempfile::Builder::new()
        .prefix("r3fs-bench-fuse-")
        .tempdir()
        .context("create a temporary directory")?
        .keep();
    cleanup.push(Item::RemoveDir {
        path: base.clone(),
        keep: args.keep,
    });
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let pinning = if args.pin {
        "benchmark thread PINNED to CPU 0 during workloads (daemons unpinned)".to_string()
    } else {
        format!("UNPINNED (benchmark thread and daemons on any of {cpus} CPUs)")
    };
    println!(
        "fuse suite: {} empty files create/stat/unlink, {blocks} MiB sequential write+read in 1 MiB blocks, \
         {} random 4 KiB reads; one thread; {cpus} CPUs, kernel {}, load average {}; {pinning}",
        args.files,
        args.random_reads,
        kernel.trim(),
        loadavg()
    );
    println!(
        "caches: FUSE entry/attr timeout {CACHE_TIMEOUT_MS} ms on both FUSE mounts; stat runs after {} ms idle \
         (one LOOKUP per FUSE stat); seq write timed to fsync+close; before each read phase: fsync + \
         POSIX_FADV_DONTNEED + reopen (FUSE open drops cached pages); random reads O_DIRECT where accepted",
        STAT_COLD_WAIT.as_millis()
    );
    println!("temporary directory: {}", base.display());
    let offsets = random_offsets(args.random_reads, blocks * BLOCK as u64);

    let mut cols: Vec<(&str, Option<Col>)> = Vec::new();
    let mark = cleanup.mark();
    println!("running tmpfs ...");
    let c = run_tmpfs(&base, args, &offsets, cleanup, tmpfs_mib);
    cleanup.release_to(mark);
    cols.push(("tmpfs", Some(c?)));

    match &bindfs {
        None => {
            println!(
                "bindfs: NOT INSTALLED (`apt-get install -y bindfs`); skipping the bindfs column"
            );
            cols.push(("bindfs", None));
        }
        Some(bindfs) => {
            let version = Command::new(bindfs)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            println!(
                "running bindfs ({version}, libfuse 2, single-threaded, -o big_writes (128 KiB writes), -f as our child) ..."
            );
            let c = run_bindfs(&base, bindfs, args, &offsets, cleanup, tmpfs_mib);
            cleanup.release_to(mark);
            cols.push(("bindfs", Some(c?)));
        }
    }

    println!("running r3fs ({}) ...", r3fs_bin.display());
    let c = run_r3fs(&base, &r3fs_bin, args, &offsets, cleanup);
    cleanup.release_to(mark);
    cols.push(("r3fs", Some(c?)));

    report(args, &cols, &pinning);
    let left = mounts_under(&base);
    if left.is_empty() {
        println!("mounts left under {}: none", base.display());
    } else {
        println!(
            "WARNING: mounts left under {}: {}",
            base.display(),
            joined(&left)
        );
    }
    Ok(())
}

fn report(args: &FuseArgs, cols: &[(&str, Option<Col>)], pinning: &str) {
    let get = |name: &str| {
        cols.iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, c)| c.as_ref())
    };
    let (bindfs, r3fs) = (get("bindfs"), get("r3fs"));
    let mut table = Table::new(&["workload", "tmpfs", "bindfs", "r3fs", "r3fs/bindfs"]);
    for row in ROWS {
        let mut cells = vec![row.label.to_string()];
        for (_, col) in cols {
            cells.push(col.as_ref().map_or("-".into(), |c| {
                format!("{:.p$}", (row.get)(c), p = row.prec)
            }));
        }
        cells.push(match (bindfs, r3fs) {
            (Some(b), Some(r)) => format!("{:.2}", (row.get)(r) / (row.get)(b)),
            _ => "-".into(),
        });
        table.row(cells);
    }
    println!();
    println!(
        "fuse: {} files, {} MiB, {} rand reads; {pinning}; load average at the end {}",
        args.files,
        args.size_mib.max(1),
        args.random_reads,
        loadavg()
    );
    table.print();
    for (name, col) in cols {
        if let Some(c) = col {
            for n in &c.notes {
                println!("  {name}: {n}");
            }
        }
    }
    for (name, col) in cols {
        if let Some(c) = col {
            for row in ROWS {
                result(
                    SUITE,
                    &format!("{name}_{}", row.metric),
                    (row.get)(c),
                    row.unit,
                );
            }
        }
    }
    result(SUITE, "pinned", if args.pin { 1.0 } else { 0.0 }, "bool");
    if let (Some(b), Some(r)) = (bindfs, r3fs) {
        for row in ROWS {
            ratio(
                SUITE,
                &format!("r3fs_vs_bindfs_{}", row.metric),
                (row.get)(r) / (row.get)(b),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_in_range_and_repeatable() {
        let a = random_offsets(1000, 64 << 20);
        assert_eq!(a, random_offsets(1000, 64 << 20));
        assert!(a
            .iter()
            .all(|o| o % SMALL as u64 == 0 && *o + SMALL as u64 <= 64 << 20));
    }
}
