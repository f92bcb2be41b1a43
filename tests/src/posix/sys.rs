//! Thin wrappers over the system calls std lacks, returning `io::Result`.
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub const NOBODY: u32 = 65534;

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// open(2) with raw flags and mode.
pub fn open(p: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<File> {
    let c = cstr(p);
    // SAFETY: `c` is a valid NUL-terminated path; the fd returned is owned by the File.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub fn lseek(f: &File, off: i64, whence: libc::c_int) -> io::Result<i64> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn truncate(p: &Path, len: i64) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path pointer.
    cvt(unsafe { libc::truncate(c.as_ptr(), len) }).map(drop)
}

/// renameat2(2); `flags` is 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: valid path pointers; renameat2 takes (int, char*, int, char*, unsigned).
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    cvt(r as libc::c_int).map(drop)
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).expect("name"));
    // SAFETY: valid pointers; value length matches the slice.
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// getxattr(2); an empty `buf` asks for the value's size.
pub fn getxattr(p: &Path, name: &str, buf: &mut [u8]) -> io::Result<usize> {
    let (c, n) = (cstr(p), CString::new(name).expect("name"));
    let ptr = if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: valid pointers; size matches the buffer (null with size 0).
    cvt_size(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), ptr, buf.len()) })
}

/// listxattr(2); an empty `buf` asks for the list's size.
pub fn listxattr(p: &Path, buf: &mut [u8]) -> io::Result<usize> {
    let c = cstr(p);
    let ptr = if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: as for getxattr.
    cvt_size(unsafe { libc::listxattr(c.as_ptr(), ptr, buf.len()) })
}

pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cstr(p), CString::new(name).expect("name"));
    // SAFETY: valid pointers.
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

pub fn timespec(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// utimensat(AT_FDCWD, p, [atime, mtime], 0).
pub fn utimensat(p: &Path, times: [libc::timespec; 2]) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path and a two-element array.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::flock(f.as_raw_fd(), op) }).map(drop)
}

pub fn lock_desc(l_type: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = l_type as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = start;
    l.l_len = len;
    l
}

/// fcntl(F_SETLK / F_GETLK) with a byte-range lock; returns the (for
/// F_GETLK, updated) description.
pub fn fcntl_lock(f: &File, cmd: libc::c_int, mut l: libc::flock) -> io::Result<libc::flock> {
    // SAFETY: `l` is a valid flock the kernel may write to.
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut l) })?;
    Ok(l)
}

pub fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = cstr(p);
    // SAFETY: zeroed statvfs is valid; the kernel fills it in.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &mut s) })?;
    Ok(s)
}

pub fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Runs `f` in a forked child and returns what it returned (its exit code,
/// 0..=255). The test process may have other threads, so `f` must only make
/// raw system calls on data prepared before the call: no allocation, no locks.
pub fn in_child(f: impl FnOnce() -> i32) -> io::Result<i32> {
    // SAFETY: the child only runs `f` (async-signal-safe by contract) and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(254);
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    wait_exit_code(pid)
}

pub fn wait_exit_code(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(io::Error::other(format!(
            "child ended abnormally (status {status:#x})"
        )))
    }
}

/// Exit code of a child that could not drop its privileges.
pub const DROP_FAILED: i32 = 255;

/// In a forked child (one thread): drops to uid/gid `NOBODY` with no
/// supplementary groups. Raw syscalls, so only this thread changes, which
/// in a child is the whole process.
///
/// # Safety
/// Call only in a single-threaded forked child.
pub unsafe fn drop_to_nobody() -> bool {
    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
        && libc::syscall(libc::SYS_setgid, NOBODY) == 0
        && libc::syscall(libc::SYS_setuid, NOBODY) == 0
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two fds.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by the Files.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}
