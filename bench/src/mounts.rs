//! What the suites that mount file systems (`fuse`, `channels`) share:
//! SIGINT/SIGTERM counting, private tmpfs mounts, the mount table, unmounting,
//! bindfs as a child and stopping it, and a few small OS helpers.
//!
//! Messages name the suite they come from (`who`), as each suite printed
//! them before.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a mount may take to appear.
pub const MOUNT_WAIT: Duration = Duration::from_secs(10);
/// How long a child may take to exit after its mount is gone before it is
/// killed.
const CHILD_EXIT_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- signals

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// Counts SIGINT and SIGTERM instead of dying, so that every mount and
/// child is cleaned up.
pub fn install_signal_handlers() {
    // SAFETY: the handler only touches an atomic (async-signal-safe); the
    // sigaction struct is fully initialised. Handlers reset to default in
    // exec'd children.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

/// How many SIGINT/SIGTERM arrived so far.
pub fn signal_count() -> usize {
    SIGNALS.load(Ordering::SeqCst)
}

/// Whether a SIGINT or SIGTERM arrived.
#[inline]
pub fn interrupted() -> bool {
    SIGNALS.load(Ordering::Relaxed) > 0
}

pub fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted by a signal");
    }
    Ok(())
}

// ---------------------------------------------------------------- mounts

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// Mount points from /proc/self/mountinfo (octal escapes decoded).
pub fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            let b = m.as_bytes();
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' && i + 3 < b.len() {
                    if let Ok(v) = u8::from_str_radix(&m[i + 1..i + 4], 8) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

pub fn mounted_at(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

/// Mount points at or below `path`.
pub fn mounts_under(path: &Path) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(path))
        .collect()
}

/// What [`unmount_all`] does when a plain unmount fails (busy).
#[derive(Clone, Copy)]
pub enum IfBusy {
    /// Detach lazily.
    Detach,
    /// Force (for FUSE that aborts the connection, so requests stuck in it
    /// fail), then detach lazily.
    ForceThenDetach,
}

/// Unmounts every mount stacked on `path` as `busy` says; silent if none.
pub fn unmount_all(path: &Path, busy: IfBusy, who: &str) {
    let c = cpath(path);
    while mounted_at(path) {
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            continue;
        }
        if let IfBusy::ForceThenDetach = busy {
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_FORCE) } == 0 {
                continue;
            }
        }
        let err = std::io::Error::last_os_error();
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let lazy = match busy {
                IfBusy::Detach => "lazy",
                IfBusy::ForceThenDetach => "lazily",
            };
            eprintln!(
                "{who}: cannot unmount {} ({err}; {lazy}: {})",
                path.display(),
                std::io::Error::last_os_error()
            );
            return;
        }
    }
}

/// Mounts a private tmpfs of `size_mib` MiB named `source` on `path`.
pub fn mount_tmpfs(path: &Path, source: &CStr, size_mib: u64) -> anyhow::Result<()> {
    let opts = CString::new(format!("mode=0755,size={size_mib}m")).unwrap();
    // SAFETY: valid NUL-terminated strings; the data is a C string.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            cpath(path).as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mount tmpfs on {} (needs root)", path.display()));
    }
    Ok(())
}

/// Waits until `path` is a mount point, polling every `poll`; fails when
/// `alive` fails (a daemon exited), on a signal, or after [`MOUNT_WAIT`].
pub fn wait_mounted(
    path: &Path,
    poll: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + MOUNT_WAIT;
    while !mounted_at(path) {
        alive()?;
        check_interrupt()?;
        if Instant::now() > deadline {
            bail!("{} did not appear within {MOUNT_WAIT:?}", path.display());
        }
        std::thread::sleep(poll);
    }
    Ok(())
}

// ---------------------------------------------------------------- children

/// Starts `bindfs -f <flags> -o <options> <src> <mnt>` as our child in its
/// own process group (so a terminal's Ctrl-C reaches only us), stdin and
/// stdout closed.
pub fn spawn_bindfs(
    bindfs: &Path,
    flags: &[&str],
    options: &str,
    src: &Path,
    mnt: &Path,
) -> std::io::Result<Child> {
    Command::new(bindfs)
        .arg("-f")
        .args(flags)
        .arg("-o")
        .arg(options)
        .arg(src)
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
}

/// Waits (polling every `poll`) up to 5 s for our child `child` (`what`)
/// to exit, its mount being gone; else kills it by its pid. Reaps it
/// either way.
pub fn stop_child(child: &mut Child, what: &str, poll: Duration, who: &str) {
    let deadline = Instant::now() + CHILD_EXIT_WAIT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(poll),
            _ => {
                eprintln!(
                    "{who}: {what} (pid {}) did not exit; killing it",
                    child.id()
                );
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
}

// ---------------------------------------------------------------- misc

/// The r3fs binary: `given`, else `r3fs` next to this executable.
pub fn r3fs_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    Ok(match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench executable has no directory")?
            .join("r3fs"),
    })
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews
/// every figure, so they are printed with the tables.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Mount points as one line: `a, b`.
pub fn joined(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A file descriptor, closed on drop.
pub struct Fd(pub libc::c_int);

impl Fd {
    /// `open(2)` with O_CLOEXEC; mode 0644 if it creates.
    pub fn open(path: &Path, flags: libc::c_int) -> std::io::Result<Fd> {
        // SAFETY: a valid path; mode is used only with O_CREAT.
        let fd = unsafe { libc::open(cpath(path).as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Fd(fd))
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}
