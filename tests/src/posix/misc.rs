//! Open-but-unlinked files, sync, statfs, locks, concurrent writers, limits.
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::check::{ensure, ensure_eq, expect_errno, fail, CaseError, CaseResult, Context};
use super::files::{ensure_bytes, random_bytes, read_whole, write_new};
use super::sys;
use super::Ctx;

pub fn unlink_while_open(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    let fd = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&f)
        .ctx("create f")?;
    let data = random_bytes(20, 8192);
    fd.write_all_at(&data, 0).ctx("pwrite")?;
    fs::remove_file(&f).ctx("unlink f")?;
    expect_errno(
        fs::symlink_metadata(&f),
        &[libc::ENOENT],
        "lstat of the unlinked name via a",
    )?;
    expect_errno(
        fs::symlink_metadata(ctx.pb("f")),
        &[libc::ENOENT],
        "lstat of the unlinked name via b",
    )?;
    let listed = fs::read_dir(&ctx.a).ctx("read_dir")?.count();
    ensure_eq!(listed, 0, "entries listed after unlinking the only file");
    let mut back = vec![0; 8192];
    fd.read_exact_at(&mut back, 0).ctx("pread after unlink")?;
    ensure_bytes(&back, &data, "data read through the fd after unlink")?;
    let more = random_bytes(21, 5000);
    fd.write_all_at(&more, 8192).ctx("pwrite after unlink")?;
    let mut back = vec![0; 5000];
    fd.read_exact_at(&mut back, 8192)
        .ctx("pread of data written after unlink")?;
    ensure_bytes(&back, &more, "data written after unlink")?;
    let m = fd.metadata().ctx("fstat after unlink")?;
    ensure_eq!(m.nlink(), 0, "fstat nlink of an unlinked open file");
    ensure_eq!(m.len(), 8192 + 5000, "fstat size of an unlinked open file");
    fd.sync_all().ctx("fsync of an unlinked open file")?;
    Ok(())
}

pub fn fsync_fdatasync_files_and_dirs(ctx: &Ctx) -> CaseResult {
    let mut f = File::create(ctx.pa("f")).ctx("create f")?;
    f.sync_all().ctx("fsync of an empty file")?;
    f.write_all(&random_bytes(22, 100_000)).ctx("write")?;
    f.sync_data().ctx("fdatasync after a write")?;
    f.sync_all().ctx("fsync after a write")?;
    drop(f);
    File::open(ctx.pa("f"))
        .ctx("open f read-only")?
        .sync_all()
        .ctx("fsync of a read-only fd")?;
    fs::create_dir(ctx.pa("d")).ctx("mkdir d")?;
    write_new(&ctx.pa("d/x"), b"x")?;
    let d = File::open(ctx.pa("d")).ctx("open dir d")?;
    d.sync_all().ctx("fsync of a directory")?;
    d.sync_data().ctx("fdatasync of a directory")?;
    Ok(())
}

pub fn statfs_sane(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), b"x")?;
    for p in [ctx.a.clone(), ctx.pa("f"), ctx.b.clone()] {
        let s = sys::statvfs(&p).ctx(format_args!("statvfs {}", p.display()))?;
        let at = p.display();
        ensure!(
            s.f_bsize > 0,
            "statvfs {at}: expected f_bsize > 0, saw {}",
            s.f_bsize
        );
        ensure!(
            s.f_frsize > 0,
            "statvfs {at}: expected f_frsize > 0, saw {}",
            s.f_frsize
        );
        ensure!(
            s.f_blocks > 0,
            "statvfs {at}: expected f_blocks > 0, saw {}",
            s.f_blocks
        );
        ensure!(
            s.f_blocks >= s.f_bfree && s.f_bfree >= s.f_bavail,
            "statvfs {at}: expected f_blocks >= f_bfree >= f_bavail, saw {} {} {}",
            s.f_blocks,
            s.f_bfree,
            s.f_bavail
        );
        ensure!(
            s.f_namemax >= 255,
            "statvfs {at}: expected f_namemax >= 255, saw {}",
            s.f_namemax
        );
    }
    Ok(())
}

const EWOULDBLOCK: &[i32] = &[libc::EWOULDBLOCK];

pub fn flock_across_mounts(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), b"x")?;
    // Two open file descriptions of one file, through the two mounts.
    let fa = File::open(ctx.pa("f")).ctx("open f via a")?;
    let fb = File::open(ctx.pb("f")).ctx("open f via b")?;
    let (ex, sh) = (libc::LOCK_EX | libc::LOCK_NB, libc::LOCK_SH | libc::LOCK_NB);
    sys::flock(&fa, ex).ctx("LOCK_EX via a")?;
    expect_errno(
        sys::flock(&fb, ex),
        EWOULDBLOCK,
        "LOCK_EX|LOCK_NB via b while a holds LOCK_EX",
    )?;
    expect_errno(
        sys::flock(&fb, sh),
        EWOULDBLOCK,
        "LOCK_SH|LOCK_NB via b while a holds LOCK_EX",
    )?;
    let dup = fa.try_clone().ctx("dup of a's fd")?;
    sys::flock(&dup, ex).ctx("LOCK_EX via a dup of the holder's fd (same description)")?;
    sys::flock(&fa, libc::LOCK_UN).ctx("LOCK_UN via a")?;
    sys::flock(&fb, sh).ctx("LOCK_SH via b after a unlocked")?;
    sys::flock(&fa, sh).ctx("LOCK_SH via a beside b's LOCK_SH")?;
    expect_errno(
        sys::flock(&fa, ex),
        EWOULDBLOCK,
        "LOCK_EX|LOCK_NB via a while b holds LOCK_SH",
    )?;
    drop(fb);
    sys::flock(&fa, ex).ctx("LOCK_EX via a after b's fd closed")?;
    let fb = File::open(ctx.pb("f")).ctx("reopen f via b")?;
    expect_errno(
        sys::flock(&fb, ex),
        EWOULDBLOCK,
        "LOCK_EX|LOCK_NB via a new fd on b",
    )?;
    drop((fa, dup));
    sys::flock(&fb, ex).ctx("LOCK_EX via b after every fd of a's description closed")?;
    Ok(())
}

/// A child process holding an F_WRLCK on `[start, start + len)` of `path`
/// until told to close the file ('c') or to exit ('x').
struct LockHolder {
    pid: libc::pid_t,
    to_child: File,
    from_child: File,
}

impl LockHolder {
    fn start(path: &Path, start: i64, len: i64) -> Result<LockHolder, CaseError> {
        let c = sys::cstr(path);
        let (c2p_r, c2p_w) = sys::pipe().ctx("pipe")?;
        let (p2c_r, p2c_w) = sys::pipe().ctx("pipe")?;
        let (r, w, close_r, close_w) = (
            p2c_r.as_raw_fd(),
            c2p_w.as_raw_fd(),
            c2p_r.as_raw_fd(),
            p2c_w.as_raw_fd(),
        );
        let lock = sys::lock_desc(libc::F_WRLCK, start, len);
        // SAFETY: the child makes raw syscalls only, on data prepared here.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).ctx("fork");
        }
        if pid == 0 {
            // SAFETY: single-threaded child; raw syscalls, then _exit.
            unsafe {
                libc::close(close_r);
                libc::close(close_w);
                let fd = libc::open(c.as_ptr(), libc::O_RDWR);
                let mut l = lock;
                let status: u8 = if fd < 0 || libc::fcntl(fd, libc::F_SETLK, &mut l) < 0 {
                    sys::errno() as u8
                } else {
                    0
                };
                libc::write(w, [status].as_ptr().cast(), 1);
                let mut cmd = [0u8];
                while libc::read(r, cmd.as_mut_ptr().cast(), 1) == 1 && cmd[0] == b'c' {
                    libc::close(fd);
                    libc::write(w, b"C".as_ptr().cast(), 1);
                }
                libc::_exit(0);
            }
        }
        let mut holder = LockHolder {
            pid,
            to_child: p2c_w,
            from_child: c2p_r,
        };
        let status = holder.recv()?;
        if status != 0 {
            holder.exit()?;
            return Err(fail(format!(
                "child taking F_WRLCK [{start}, +{len}): expected success, saw {}",
                super::check::errno_name(status as i32)
            )));
        }
        Ok(holder)
    }

    fn recv(&mut self) -> Result<u8, CaseError> {
        let mut b = [0u8];
        self.from_child
            .read_exact(&mut b)
            .ctx("reading from the lock-holding child")?;
        Ok(b[0])
    }

    /// Tells the child to close its fd; returns once it has.
    fn close_file(&mut self) -> CaseResult {
        self.to_child
            .write_all(b"c")
            .ctx("telling the child to close")?;
        ensure_eq!(self.recv()?, b'C', "the child's answer to close");
        Ok(())
    }

    /// Tells the child to exit and reaps it.
    fn exit(self) -> CaseResult {
        let _ = (&self.to_child).write_all(b"x");
        let code = sys::wait_exit_code(self.pid).ctx("waitpid of the lock-holding child")?;
        ensure_eq!(code, 0, "exit code of the lock-holding child");
        Ok(())
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        // Only reached on an early return; `exit` consumes self normally.
        let _ = self.to_child.write_all(b"x");
    }
}

pub fn posix_locks_across_processes(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), &[0u8; 1000])?;
    let conflict = &[libc::EAGAIN, libc::EACCES];
    let setlk = |f: &File, t, s, l| sys::fcntl_lock(f, libc::F_SETLK, sys::lock_desc(t, s, l));

    // A child holds [100, 200) via a; this process probes via b.
    let mut holder = LockHolder::start(&ctx.pa("f"), 100, 100)?;
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(ctx.pb("f"))
        .ctx("open f via b")?;
    let r = (|| {
        expect_errno(
            setlk(&fb, libc::F_WRLCK, 150, 50),
            conflict,
            "F_SETLK F_WRLCK [150,200) over the child's [100,200)",
        )?;
        expect_errno(
            setlk(&fb, libc::F_RDLCK, 199, 1),
            conflict,
            "F_SETLK F_RDLCK [199,200) over the child's F_WRLCK",
        )?;
        expect_errno(
            setlk(&fb, libc::F_WRLCK, 0, 0),
            conflict,
            "F_SETLK F_WRLCK of the whole file",
        )?;
        let got = sys::fcntl_lock(&fb, libc::F_GETLK, sys::lock_desc(libc::F_WRLCK, 0, 0))
            .ctx("F_GETLK")?;
        ensure_eq!(
            (got.l_type as i32, got.l_pid, got.l_start, got.l_len),
            (libc::F_WRLCK, holder.pid, 100, 100),
            "F_GETLK (type, pid, start, len) of the child's lock"
        );
        setlk(&fb, libc::F_WRLCK, 0, 100).ctx("F_SETLK F_WRLCK [0,100) beside the child's lock")?;
        setlk(&fb, libc::F_WRLCK, 200, 100)
            .ctx("F_SETLK F_WRLCK [200,300) beside the child's lock")?;
        holder.close_file()?;
        setlk(&fb, libc::F_WRLCK, 100, 100)
            .ctx("F_SETLK F_WRLCK [100,200) after the child closed its fd")?;
        let got = sys::fcntl_lock(&fb, libc::F_GETLK, sys::lock_desc(libc::F_WRLCK, 0, 0))
            .ctx("F_GETLK")?;
        ensure_eq!(
            got.l_type as i32,
            libc::F_UNLCK,
            "F_GETLK type for the lock owner itself"
        );
        Ok(())
    })();
    holder.exit()?;
    r?;
    drop(fb);

    // Released when the holder exits without closing.
    let holder = LockHolder::start(&ctx.pa("f"), 0, 0)?;
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(ctx.pb("f"))
        .ctx("open f via b")?;
    expect_errno(
        setlk(&fb, libc::F_RDLCK, 500, 1),
        conflict,
        "F_SETLK F_RDLCK under the second child's whole-file lock",
    )?;
    holder.exit()?;
    setlk(&fb, libc::F_WRLCK, 0, 0)
        .ctx("F_SETLK F_WRLCK of the whole file after the child exited")?;
    Ok(())
}

pub fn concurrent_writers_different_files(ctx: &Ctx) -> CaseResult {
    const THREADS: usize = 6;
    let paths = |i: usize| -> (PathBuf, PathBuf) {
        let n = format!("t{i}");
        if i & 1 == 0 {
            (ctx.pa(&n), ctx.pb(&n))
        } else {
            (ctx.pb(&n), ctx.pa(&n))
        }
    };
    let data: Vec<Vec<u8>> = (0..THREADS)
        .map(|i| random_bytes(30 + i as u64, 2_000_000 + i * 1001))
        .collect();
    let results: Vec<CaseResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (w, _) = paths(i);
                let d = &data[i];
                s.spawn(move || -> CaseResult {
                    let mut f = File::create(&w).ctx(format_args!("create {}", w.display()))?;
                    for chunk in d.chunks(65_536 + i) {
                        f.write_all(chunk)
                            .ctx(format_args!("write {}", w.display()))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(fail("writer thread panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    for (i, d) in data.iter().enumerate() {
        let (_, r) = paths(i);
        ensure_bytes(
            &read_whole(&r)?,
            d,
            &format!("t{i} read via the other mount"),
        )?;
    }
    Ok(())
}

pub fn concurrent_writers_one_file_disjoint_via_a_and_b(ctx: &Ctx) -> CaseResult {
    const BLOCK: usize = 65_537;
    const BLOCKS: usize = 64;
    let data = random_bytes(40, BLOCK * BLOCKS);
    File::create(ctx.pa("shared")).ctx("create shared")?;
    let writer = |path: PathBuf, parity: usize| -> CaseResult {
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .ctx(format_args!("open {}", path.display()))?;
        let mut blocks: Vec<usize> = (0..BLOCKS).filter(|b| b % 2 == parity).collect();
        if parity == 1 {
            blocks.reverse();
        }
        for b in blocks {
            f.write_all_at(&data[b * BLOCK..(b + 1) * BLOCK], (b * BLOCK) as u64)
                .ctx(format_args!("pwrite block {b} via {}", path.display()))?;
        }
        Ok(())
    };
    let (ra, rb) = std::thread::scope(|s| {
        let a = s.spawn(|| writer(ctx.pa("shared"), 0));
        let b = s.spawn(|| writer(ctx.pb("shared"), 1));
        let join = |h: std::thread::ScopedJoinHandle<'_, CaseResult>| {
            h.join()
                .unwrap_or_else(|_| Err(fail("writer thread panicked")))
        };
        (join(a), join(b))
    });
    ra?;
    rb?;
    ensure_bytes(
        &read_whole(&ctx.pa("shared"))?,
        &data,
        "shared file read via a (even blocks via a, odd via b)",
    )?;
    ensure_bytes(
        &read_whole(&ctx.pb("shared"))?,
        &data,
        "shared file read via b",
    )
}

pub fn name_256_bytes_is_enametoolong(ctx: &Ctx) -> CaseResult {
    let ok = "n".repeat(255);
    let long = "n".repeat(256);
    write_new(&ctx.pa(&ok), b"x")?;
    ensure!(
        ctx.pa(&ok).exists(),
        "a file with a 255-byte name is missing after create"
    );
    fs::remove_file(ctx.pa(&ok)).ctx("unlink the 255-byte name")?;
    let too_long = &[libc::ENAMETOOLONG];
    expect_errno(
        sys::open(&ctx.pa(&long), libc::O_CREAT | libc::O_WRONLY, 0o644),
        too_long,
        "create with a 256-byte name",
    )?;
    expect_errno(
        fs::create_dir(ctx.pa(&long)),
        too_long,
        "mkdir with a 256-byte name",
    )?;
    expect_errno(
        fs::symlink_metadata(ctx.pa(&long)),
        too_long,
        "lstat of a 256-byte name",
    )?;
    expect_errno(
        symlink("x", ctx.pa(&long)),
        too_long,
        "symlink named with 256 bytes",
    )?;
    write_new(&ctx.pa("f"), b"x")?;
    expect_errno(
        fs::rename(ctx.pa("f"), ctx.pa(&long)),
        too_long,
        "rename to a 256-byte name",
    )?;
    expect_errno(
        fs::hard_link(ctx.pa("f"), ctx.pa(&long)),
        too_long,
        "link to a 256-byte name",
    )?;
    let path: String = "d/".repeat(2100);
    expect_errno(
        fs::symlink_metadata(ctx.pa(&path)),
        too_long,
        "lstat of a 4200-byte path",
    )
}

pub fn symlink_target_4097_bytes_is_enametoolong(ctx: &Ctx) -> CaseResult {
    // Linux: a target must fit PATH_MAX (4096) with its NUL, so 4095 bytes
    // is the longest.
    let longest = "t".repeat(4095);
    symlink(&longest, ctx.pa("ok")).ctx("symlink with a 4095-byte target")?;
    ensure_eq!(
        fs::read_link(ctx.pa("ok")).ctx("readlink of a 4095-byte target")?,
        PathBuf::from(&longest),
        "readlink of a 4095-byte target"
    );
    ensure_eq!(
        fs::symlink_metadata(ctx.pa("ok")).ctx("lstat")?.len(),
        4095,
        "lstat size of a 4095-byte link"
    );
    expect_errno(
        symlink("t".repeat(4097), ctx.pa("l")),
        &[libc::ENAMETOOLONG],
        "symlink with a 4097-byte target",
    )?;
    expect_errno(
        symlink("t".repeat(4096), ctx.pa("l")),
        &[libc::ENAMETOOLONG],
        "symlink with a 4096-byte target",
    )?;
    expect_errno(
        fs::symlink_metadata(ctx.pa("l")),
        &[libc::ENOENT],
        "lstat of the refused symlink",
    )
}
