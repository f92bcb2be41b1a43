//! Attributes: modes, owners, times, permission checks as another user,
//! extended attributes.
use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{lchown, symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::check::{
    ensure, ensure_eq, expect_child_errno, expect_child_ok, expect_errno, fail, CaseError,
    CaseResult, Context,
};
use super::files::write_new;
use super::sys::{self, NOBODY};
use super::Ctx;

fn meta(p: &Path) -> Result<fs::Metadata, CaseError> {
    fs::symlink_metadata(p).ctx(format_args!("lstat {}", p.display()))
}

fn chmod(p: &Path, mode: u32) -> CaseResult {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .ctx(format_args!("chmod {mode:o} {}", p.display()))
}

fn mode_str(p: &Path) -> Result<String, CaseError> {
    Ok(format!("{:o}", meta(p)?.mode() & 0o7777))
}

fn skip_unless_root() -> CaseResult {
    if sys::is_root() {
        Ok(())
    } else {
        Err(CaseError::Skip(
            "needs root (to own files another uid cannot touch)".into(),
        ))
    }
}

pub fn chmod_reads_back_and_moves_ctime(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    for mode in [0o600, 0o751, 0o4755, 0o2755, 0o1644, 0o000, 0o777] {
        chmod(&f, mode)?;
        ensure_eq!(
            mode_str(&f)?,
            format!("{mode:o}"),
            "mode of a file after chmod {mode:o}"
        );
    }
    let fd = File::open(&f).ctx("open f")?;
    fd.set_permissions(fs::Permissions::from_mode(0o640))
        .ctx("fchmod 640")?;
    ensure_eq!(mode_str(&f)?, "640", "mode after fchmod 640");
    fs::create_dir(ctx.pa("d")).ctx("mkdir d")?;
    chmod(&ctx.pa("d"), 0o1733)?;
    ensure_eq!(
        mode_str(&ctx.pa("d"))?,
        "1733",
        "mode of a dir after chmod 1733"
    );

    // ctime moves on chmod (mtime does not). Time stamps are as coarse as the
    // file system's clock, so chmod again until ctime has moved, within a bound.
    let m0 = meta(&f)?;
    let before = (m0.ctime(), m0.ctime_nsec());
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut mode = 0o600;
    loop {
        chmod(&f, mode)?;
        let m = meta(&f)?;
        ensure_eq!(
            (m.mtime(), m.mtime_nsec()),
            (m0.mtime(), m0.mtime_nsec()),
            "mtime after chmod (must not change)"
        );
        if (m.ctime(), m.ctime_nsec()) > before {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "ctime after chmod: expected later than {before:?}, saw {:?} for 3 s of chmods",
            (m.ctime(), m.ctime_nsec())
        );
        mode ^= 0o044;
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn chown_reads_back(ctx: &Ctx) -> CaseResult {
    skip_unless_root()?;
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    std::os::unix::fs::chown(&f, Some(NOBODY), Some(NOBODY)).ctx("chown 65534:65534")?;
    let m = meta(&f)?;
    ensure_eq!(
        (m.uid(), m.gid()),
        (NOBODY, NOBODY),
        "uid:gid after chown 65534:65534"
    );
    std::os::unix::fs::chown(&f, None, Some(1234)).ctx("chown -1:1234")?;
    let m = meta(&f)?;
    ensure_eq!(
        (m.uid(), m.gid()),
        (NOBODY, 1234),
        "uid:gid after chown -1:1234"
    );
    let fd = File::open(&f).ctx("open f")?;
    std::os::unix::fs::fchown(&fd, Some(4321), None).ctx("fchown 4321:-1")?;
    let m = meta(&f)?;
    ensure_eq!(
        (m.uid(), m.gid()),
        (4321, 1234),
        "uid:gid after fchown 4321:-1"
    );
    // lchown changes the link, not its target.
    symlink("f", ctx.pa("l")).ctx("symlink f l")?;
    lchown(ctx.pa("l"), Some(777), Some(778)).ctx("lchown l")?;
    let (l, m) = (meta(&ctx.pa("l"))?, meta(&f)?);
    ensure_eq!(
        (l.uid(), l.gid()),
        (777, 778),
        "uid:gid of the link after lchown"
    );
    ensure_eq!(
        (m.uid(), m.gid()),
        (4321, 1234),
        "uid:gid of the target after lchown of the link"
    );
    // Linux: chown of a regular file clears set-user-ID, and set-group-ID
    // when group-execute is set, even for root.
    chmod(&f, 0o6755)?;
    std::os::unix::fs::chown(&f, Some(0), Some(0)).ctx("chown 0:0 of a 6755 file")?;
    ensure_eq!(
        mode_str(&f)?,
        "755",
        "mode of a 6755 file after chown (setuid/setgid cleared)"
    );
    Ok(())
}

fn time_of(m: &fs::Metadata) -> ((i64, i64), (i64, i64)) {
    ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
}

pub fn utimensat_explicit_now_omit(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    let (at, mt) = ((1_000_000_000, 123_456_789), (1_500_000_000, 987_654_321));
    sys::utimensat(&f, [sys::timespec(at.0, at.1), sys::timespec(mt.0, mt.1)])
        .ctx("utimensat explicit")?;
    ensure_eq!(
        time_of(&meta(&f)?),
        (at, mt),
        "(atime, mtime) after explicit utimensat"
    );

    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    };
    // The file system's clock may be coarser than ours: allow a few seconds.
    let lo = now() - 5;
    sys::utimensat(
        &f,
        [
            sys::timespec(0, libc::UTIME_OMIT),
            sys::timespec(0, libc::UTIME_NOW),
        ],
    )
    .ctx("utimensat OMIT, NOW")?;
    let hi = now() + 5;
    let (a, m) = time_of(&meta(&f)?);
    ensure_eq!(a, at, "atime after UTIME_OMIT");
    ensure!(
        (lo..=hi).contains(&m.0),
        "mtime after UTIME_NOW: expected {lo}..={hi} s, saw {m:?}"
    );

    sys::utimensat(
        &f,
        [
            sys::timespec(0, libc::UTIME_NOW),
            sys::timespec(0, libc::UTIME_OMIT),
        ],
    )
    .ctx("utimensat NOW, OMIT")?;
    let hi = now() + 5;
    let (a, m2) = time_of(&meta(&f)?);
    ensure_eq!(m2, m, "mtime after UTIME_OMIT");
    ensure!(
        (lo..=hi).contains(&a.0),
        "atime after UTIME_NOW: expected {lo}..={hi} s, saw {a:?}"
    );
    Ok(())
}

/// A directory of the case made with exactly `mode` (whatever the umask),
/// opened as root so a child dropped to nobody can work relative to it
/// without search permission on the case directory's ancestors.
fn dir_fd(ctx: &Ctx, name: &str, mode: u32) -> Result<File, CaseError> {
    let p = ctx.pa(name);
    fs::create_dir(&p).ctx(format_args!("mkdir {name}"))?;
    chmod(&p, mode)?;
    sys::open(&p, libc::O_RDONLY | libc::O_DIRECTORY, 0).ctx(format_args!("open dir {name}"))
}

/// Runs `f` in a child dropped to uid/gid 65534; returns the errno it
/// reports (0 for success).
fn as_nobody(what: &str, f: impl FnOnce() -> i32) -> Result<i32, CaseError> {
    skip_unless_root()?;
    let code = sys::in_child(|| {
        // SAFETY: we are the single-threaded forked child.
        if unsafe { sys::drop_to_nobody() } {
            f()
        } else {
            sys::DROP_FAILED
        }
    })
    .ctx(format_args!("fork for {what}"))?;
    if code == sys::DROP_FAILED {
        return Err(fail(format!(
            "{what}: the child could not drop to uid/gid 65534"
        )));
    }
    Ok(code)
}

/// The errno of a raw call's result (negative → errno, else 0).
fn rc(r: libc::c_int) -> i32 {
    if r < 0 {
        sys::errno()
    } else {
        0
    }
}

fn name(s: &str) -> CString {
    CString::new(s).expect("name")
}

pub fn nonroot_read_0600_root_file_is_eacces(ctx: &Ctx) -> CaseResult {
    skip_unless_root()?;
    let dir = dir_fd(ctx, "perm", 0o755)?;
    for (n, mode) in [("secret", 0o600), ("public", 0o644)] {
        write_new(&ctx.pa(&format!("perm/{n}")), b"data")?;
        chmod(&ctx.pa(&format!("perm/{n}")), mode)?;
    }
    let (fd, secret, public) = (dir.as_raw_fd(), name("secret"), name("public"));
    let open_as_nobody = |what: &str, n: &CString, flags| {
        // SAFETY: raw syscall on prepared data, in the child.
        as_nobody(what, || rc(unsafe { libc::openat(fd, n.as_ptr(), flags) }))
    };
    let code = open_as_nobody("read of a 0644 root file", &public, libc::O_RDONLY)?;
    expect_child_ok(code, "uid 65534 reading a 0644 root file (control)")?;
    let code = open_as_nobody("read of a 0600 root file", &secret, libc::O_RDONLY)?;
    expect_child_errno(code, &[libc::EACCES], "uid 65534 reading a 0600 root file")?;
    let code = open_as_nobody("write of a 0644 root file", &public, libc::O_WRONLY)?;
    expect_child_errno(
        code,
        &[libc::EACCES],
        "uid 65534 opening a 0644 root file for writing",
    )
}

pub fn nonroot_create_in_0755_root_dir_is_eacces(ctx: &Ctx) -> CaseResult {
    skip_unless_root()?;
    let ro = dir_fd(ctx, "ro", 0o755)?;
    let rw = dir_fd(ctx, "rw", 0o777)?;
    write_new(&ctx.pa("ro/existing"), b"x")?;
    let (ro, rw) = (ro.as_raw_fd(), rw.as_raw_fd());
    let (new, existing, sub) = (name("new"), name("existing"), name("sub"));
    let create = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    // SAFETY (all closures): raw syscalls on prepared data, in the child.
    let code = as_nobody("create", || {
        rc(unsafe { libc::openat(ro, new.as_ptr(), create, 0o644) })
    })?;
    expect_child_errno(
        code,
        &[libc::EACCES],
        "uid 65534 creating a file in a 0755 root dir",
    )?;
    let code = as_nobody("mkdir", || {
        rc(unsafe { libc::mkdirat(ro, sub.as_ptr(), 0o755) })
    })?;
    expect_child_errno(
        code,
        &[libc::EACCES],
        "uid 65534 making a dir in a 0755 root dir",
    )?;
    let code = as_nobody("unlink", || {
        rc(unsafe { libc::unlinkat(ro, existing.as_ptr(), 0) })
    })?;
    expect_child_errno(
        code,
        &[libc::EACCES],
        "uid 65534 unlinking from a 0755 root dir",
    )?;
    ensure!(
        ctx.pa("ro/existing").exists(),
        "ro/existing vanished after a refused unlink"
    );
    let code = as_nobody("create", || {
        rc(unsafe { libc::openat(rw, new.as_ptr(), create, 0o644) })
    })?;
    expect_child_ok(code, "uid 65534 creating a file in a 0777 root dir")?;
    let m = meta(&ctx.pa("rw/new"))?;
    ensure_eq!(
        (m.uid(), m.gid()),
        (NOBODY, NOBODY),
        "owner of a file uid 65534 created"
    );
    Ok(())
}

pub fn nonroot_sticky_dir_unlink(ctx: &Ctx) -> CaseResult {
    skip_unless_root()?;
    let sticky = dir_fd(ctx, "sticky", 0o1777)?;
    let open = dir_fd(ctx, "open", 0o777)?;
    write_new(&ctx.pa("sticky/rootf"), b"x")?;
    write_new(&ctx.pa("open/rootf"), b"x")?;
    let (sticky, open) = (sticky.as_raw_fd(), open.as_raw_fd());
    let (rootf, mine, moved) = (name("rootf"), name("mine"), name("moved"));
    let create = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    // SAFETY (all closures): raw syscalls on prepared data, in the child.
    let code = as_nobody("unlink", || {
        rc(unsafe { libc::unlinkat(sticky, rootf.as_ptr(), 0) })
    })?;
    expect_child_errno(
        code,
        &[libc::EPERM],
        "uid 65534 unlinking root's file in a sticky 1777 dir",
    )?;
    let code = as_nobody("rename", || {
        rc(unsafe { libc::renameat(sticky, rootf.as_ptr(), sticky, moved.as_ptr()) })
    })?;
    expect_child_errno(
        code,
        &[libc::EPERM],
        "uid 65534 renaming root's file in a sticky 1777 dir",
    )?;
    ensure!(
        ctx.pa("sticky/rootf").exists(),
        "sticky/rootf vanished after a refused unlink"
    );
    let code = as_nobody("create and unlink own file", || unsafe {
        let fd = libc::openat(sticky, mine.as_ptr(), create, 0o644);
        if fd < 0 {
            return sys::errno();
        }
        libc::close(fd);
        rc(libc::unlinkat(sticky, mine.as_ptr(), 0))
    })?;
    expect_child_ok(
        code,
        "uid 65534 unlinking its own file in a sticky 1777 dir",
    )?;
    let code = as_nobody("unlink", || {
        rc(unsafe { libc::unlinkat(open, rootf.as_ptr(), 0) })
    })?;
    expect_child_ok(code, "uid 65534 unlinking root's file in a 0777 dir")?;
    expect_errno(
        fs::symlink_metadata(ctx.pa("open/rootf")),
        &[libc::ENOENT],
        "lstat of open/rootf after uid 65534 unlinked it",
    )
}

fn user_attrs(p: &Path) -> Result<Vec<String>, CaseError> {
    let size = sys::listxattr(p, &mut []).ctx("listxattr size")?;
    let mut buf = vec![0; size + 64];
    let n = sys::listxattr(p, &mut buf).ctx("listxattr")?;
    let mut names: Vec<String> = buf[..n]
        .split(|&b| b == 0)
        .filter(|s| s.starts_with(b"user."))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn get(p: &Path, n: &str) -> Result<Vec<u8>, CaseError> {
    let mut buf = vec![0; 65536];
    let len = sys::getxattr(p, n, &mut buf).ctx(format_args!("getxattr {n}"))?;
    buf.truncate(len);
    Ok(buf)
}

pub fn xattr_set_get_list_remove(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    let binary: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    sys::setxattr(&f, "user.a", b"alpha", 0).ctx("setxattr user.a")?;
    sys::setxattr(&f, "user.b", b"", 0).ctx("setxattr user.b (empty value)")?;
    sys::setxattr(&f, "user.c", &binary, 0).ctx("setxattr user.c")?;
    ensure_eq!(get(&f, "user.a")?, b"alpha".to_vec(), "user.a");
    ensure_eq!(get(&f, "user.b")?, Vec::<u8>::new(), "user.b");
    ensure_eq!(get(&f, "user.c")?, binary, "user.c");
    sys::setxattr(&f, "user.a", b"a2", 0).ctx("setxattr user.a again")?;
    ensure_eq!(get(&f, "user.a")?, b"a2".to_vec(), "user.a after overwrite");
    ensure_eq!(
        user_attrs(&f)?,
        vec!["user.a", "user.b", "user.c"],
        "user.* names listed"
    );
    sys::removexattr(&f, "user.a").ctx("removexattr user.a")?;
    expect_errno(
        sys::getxattr(&f, "user.a", &mut [0; 16]),
        &[libc::ENODATA],
        "getxattr after remove",
    )?;
    ensure_eq!(
        user_attrs(&f)?,
        vec!["user.b", "user.c"],
        "user.* names after remove"
    );
    fs::create_dir(ctx.pa("d")).ctx("mkdir d")?;
    sys::setxattr(&ctx.pa("d"), "user.dir", b"on a dir", 0).ctx("setxattr on a directory")?;
    ensure_eq!(
        get(&ctx.pa("d"), "user.dir")?,
        b"on a dir".to_vec(),
        "user.dir on a directory"
    );
    Ok(())
}

pub fn xattr_create_existing_is_eexist(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    sys::setxattr(&f, "user.k", b"one", libc::XATTR_CREATE).ctx("XATTR_CREATE of a new attr")?;
    expect_errno(
        sys::setxattr(&f, "user.k", b"two", libc::XATTR_CREATE),
        &[libc::EEXIST],
        "XATTR_CREATE of an existing attr",
    )?;
    ensure_eq!(
        get(&f, "user.k")?,
        b"one".to_vec(),
        "user.k after refused XATTR_CREATE"
    );
    Ok(())
}

pub fn xattr_replace_missing_is_enodata(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    expect_errno(
        sys::setxattr(&f, "user.k", b"v", libc::XATTR_REPLACE),
        &[libc::ENODATA],
        "XATTR_REPLACE of a missing attr",
    )?;
    sys::setxattr(&f, "user.k", b"v", 0).ctx("setxattr user.k")?;
    sys::setxattr(&f, "user.k", b"replaced", libc::XATTR_REPLACE)
        .ctx("XATTR_REPLACE of an existing attr")?;
    ensure_eq!(
        get(&f, "user.k")?,
        b"replaced".to_vec(),
        "user.k after XATTR_REPLACE"
    );
    Ok(())
}

pub fn xattr_get_missing_is_enodata(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    expect_errno(
        sys::getxattr(&f, "user.none", &mut [0; 16]),
        &[libc::ENODATA],
        "getxattr of a missing attr",
    )?;
    expect_errno(
        sys::getxattr(&f, "user.none", &mut []),
        &[libc::ENODATA],
        "size query of a missing attr",
    )?;
    expect_errno(
        sys::removexattr(&f, "user.none"),
        &[libc::ENODATA],
        "removexattr of a missing attr",
    )?;
    ensure_eq!(
        user_attrs(&f)?,
        Vec::<String>::new(),
        "user.* names of a new file"
    );
    Ok(())
}

pub fn xattr_size_query_zero_buffer(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"x")?;
    let value = vec![0x5a; 300];
    sys::setxattr(&f, "user.s", &value, 0).ctx("setxattr user.s")?;
    ensure_eq!(
        sys::getxattr(&f, "user.s", &mut []).ctx("getxattr size query")?,
        300,
        "size query of a 300-byte value"
    );
    expect_errno(
        sys::getxattr(&f, "user.s", &mut [0; 10]),
        &[libc::ERANGE],
        "getxattr into a 10-byte buffer",
    )?;
    let size = sys::listxattr(&f, &mut []).ctx("listxattr size query")?;
    ensure!(
        size >= "user.s\0".len(),
        "listxattr size query: expected >= 7, saw {size}"
    );
    expect_errno(
        sys::listxattr(&f, &mut [0; 1]),
        &[libc::ERANGE],
        "listxattr into a 1-byte buffer",
    )
}
