//! Directories, renames, hard links and symbolic links.
use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{symlink, FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::check::{ensure, ensure_eq, expect_errno, fail, CaseResult, Context};
use super::files::{ensure_bytes, read_whole, write_new};
use super::sys;
use super::Ctx;

fn nlink(p: &Path) -> Result<u64, super::CaseError> {
    Ok(fs::symlink_metadata(p)
        .ctx(format_args!("lstat {}", p.display()))?
        .nlink())
}

fn ino(p: &Path) -> Result<u64, super::CaseError> {
    Ok(fs::symlink_metadata(p)
        .ctx(format_args!("lstat {}", p.display()))?
        .ino())
}

fn mkdirs(ctx: &Ctx, names: &[&str]) -> CaseResult {
    for n in names {
        fs::create_dir(ctx.pa(n)).ctx(format_args!("mkdir {n}"))?;
    }
    Ok(())
}

fn gone(p: &Path, what: &str) -> CaseResult {
    expect_errno(
        fs::symlink_metadata(p),
        &[libc::ENOENT],
        format_args!("lstat of {what}"),
    )
}

/// Every name readdir(3) returns for `dir`, with how often it came back.
fn readdir_counts(dir: &Path) -> Result<HashMap<Vec<u8>, u32>, super::CaseError> {
    let c = sys::cstr(dir);
    // SAFETY: valid path; the stream is closed below.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    if d.is_null() {
        return Err(std::io::Error::last_os_error()).ctx(format_args!("opendir {}", dir.display()));
    }
    let mut counts = HashMap::new();
    loop {
        // SAFETY: `d` is an open stream; the entry is read before the next call.
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) };
        *counts.entry(name.to_bytes().to_vec()).or_insert(0) += 1;
    }
    // SAFETY: closing the stream opened above.
    unsafe { libc::closedir(d) };
    Ok(counts)
}

pub fn mkdir_rmdir(ctx: &Ctx) -> CaseResult {
    let d = ctx.pa("d");
    fs::create_dir(&d).ctx("mkdir d")?;
    ensure!(
        fs::metadata(&d).ctx("stat d")?.is_dir(),
        "d is not a directory after mkdir"
    );
    fs::create_dir_all(ctx.pa("d/x/y/z")).ctx("mkdir -p d/x/y/z")?;
    for p in ["d/x/y/z", "d/x/y", "d/x"] {
        fs::remove_dir(ctx.pa(p)).ctx(format_args!("rmdir {p}"))?;
    }
    fs::remove_dir(&d).ctx("rmdir d")?;
    gone(&d, "a removed directory")?;
    expect_errno(
        fs::remove_dir(&d),
        &[libc::ENOENT],
        "rmdir of a missing directory",
    )?;
    write_new(&ctx.pa("f"), b"x")?;
    expect_errno(
        fs::remove_dir(ctx.pa("f")),
        &[libc::ENOTDIR],
        "rmdir of a file",
    )?;
    fs::create_dir(&d).ctx("mkdir d again")?;
    expect_errno(
        fs::remove_file(&d),
        &[libc::EISDIR],
        "unlink of a directory",
    )
}

pub fn rmdir_nonempty_is_enotempty(ctx: &Ctx) -> CaseResult {
    mkdirs(ctx, &["d1", "d2", "d2/sub"])?;
    write_new(&ctx.pa("d1/f"), b"x")?;
    expect_errno(
        fs::remove_dir(ctx.pa("d1")),
        &[libc::ENOTEMPTY],
        "rmdir of a dir holding a file",
    )?;
    expect_errno(
        fs::remove_dir(ctx.pa("d2")),
        &[libc::ENOTEMPTY],
        "rmdir of a dir holding a dir",
    )?;
    ensure!(
        ctx.pa("d1/f").exists(),
        "d1/f vanished after a refused rmdir"
    );
    Ok(())
}

pub fn mkdir_existing_is_eexist(ctx: &Ctx) -> CaseResult {
    mkdirs(ctx, &["d"])?;
    expect_errno(
        fs::create_dir(ctx.pa("d")),
        &[libc::EEXIST],
        "mkdir of an existing dir",
    )?;
    write_new(&ctx.pa("f"), b"x")?;
    expect_errno(
        fs::create_dir(ctx.pa("f")),
        &[libc::EEXIST],
        "mkdir over a file",
    )?;
    symlink("missing", ctx.pa("l")).ctx("symlink l")?;
    expect_errno(
        fs::create_dir(ctx.pa("l")),
        &[libc::EEXIST],
        "mkdir over a dangling symlink",
    )
}

pub fn readdir_10000_entries_each_once(ctx: &Ctx) -> CaseResult {
    const N: usize = 10_000;
    let names: Vec<String> = (0..N)
        .map(|i| format!("e{i}-{}", "n".repeat(i % 60)))
        .collect();
    fs::create_dir(ctx.pa("d")).ctx("mkdir d")?;
    for n in &names {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(ctx.pa("d").join(n))
            .ctx(format_args!("create d/{n}"))?;
    }
    // Through a: raw readdir(3), which also returns "." and "..".
    let counts = readdir_counts(&ctx.pa("d"))?;
    for dot in [".", ".."] {
        ensure_eq!(
            counts.get(dot.as_bytes()).copied(),
            Some(1),
            "times readdir returned {dot:?}"
        );
    }
    ensure_eq!(
        counts.len(),
        N + 2,
        "distinct names readdir returned (10000 + . and ..)"
    );
    for n in &names {
        ensure_eq!(
            counts.get(n.as_bytes()).copied(),
            Some(1),
            "times readdir returned {n:?}"
        );
    }
    // Through b: std's read_dir, which leaves out "." and "..".
    let mut seen: HashMap<String, u32> = HashMap::new();
    for e in fs::read_dir(ctx.pb("d")).ctx("read_dir via b")? {
        let e = e.ctx("read_dir entry via b")?;
        *seen
            .entry(e.file_name().to_string_lossy().into_owned())
            .or_insert(0) += 1;
    }
    ensure_eq!(seen.len(), N, "distinct names read_dir via b returned");
    if let Some((n, c)) = seen.iter().find(|(_, &c)| c != 1) {
        return Err(fail(format!(
            "read_dir via b returned {n:?} {c} times, expected once"
        )));
    }
    Ok(())
}

pub fn dir_nlink_counts_subdirs(ctx: &Ctx) -> CaseResult {
    let base = nlink(&ctx.a)?;
    ensure_eq!(base, 2, "nlink of an empty directory");
    mkdirs(ctx, &["d"])?;
    ensure_eq!(nlink(&ctx.pa("d"))?, 2, "nlink of a new directory");
    ensure_eq!(nlink(&ctx.a)?, 3, "nlink of the parent after one mkdir");
    mkdirs(ctx, &["d/s1", "d/s2"])?;
    write_new(&ctx.pa("d/f"), b"x")?;
    ensure_eq!(
        nlink(&ctx.pa("d"))?,
        4,
        "nlink of a directory with 2 subdirs and a file"
    );
    fs::remove_dir(ctx.pa("d/s1")).ctx("rmdir d/s1")?;
    ensure_eq!(nlink(&ctx.pa("d"))?, 3, "nlink after rmdir of one subdir");
    fs::rename(ctx.pa("d/s2"), ctx.pa("s2")).ctx("rename d/s2 to s2")?;
    ensure_eq!(
        nlink(&ctx.pa("d"))?,
        2,
        "nlink of the source dir after moving its subdir out"
    );
    ensure_eq!(
        nlink(&ctx.a)?,
        4,
        "nlink of the target dir after moving a subdir in"
    );
    Ok(())
}

pub fn rename_file_over_file(ctx: &Ctx) -> CaseResult {
    let (x, y) = (ctx.pa("x"), ctx.pa("y"));
    write_new(&x, b"xdata")?;
    write_new(&y, b"ydata-longer")?;
    let x_ino = ino(&x)?;
    let old_y = File::open(&y).ctx("open y")?;
    fs::rename(&x, &y).ctx("rename x over y")?;
    gone(&x, "the renamed source")?;
    ensure_eq!(ino(&y)?, x_ino, "inode of y after rename x over y");
    ensure_bytes(&read_whole(&y)?, b"xdata", "y after rename x over y")?;
    let mut buf = Vec::new();
    (&old_y)
        .read_to_end(&mut buf)
        .ctx("read the replaced y through an fd opened before")?;
    ensure_bytes(
        &buf,
        b"ydata-longer",
        "replaced file read through its open fd",
    )
}

pub fn rename_onto_itself(ctx: &Ctx) -> CaseResult {
    let x = ctx.pa("x");
    write_new(&x, b"xdata")?;
    fs::rename(&x, &x).ctx("rename x onto itself")?;
    ensure_bytes(&read_whole(&x)?, b"xdata", "x after rename onto itself")?;
    // Two names of one inode: rename succeeds and does nothing.
    fs::hard_link(&x, ctx.pa("x2")).ctx("link x x2")?;
    fs::rename(&x, ctx.pa("x2")).ctx("rename x onto its own hard link x2")?;
    ensure!(x.exists(), "x vanished after rename onto its own hard link");
    ensure_eq!(nlink(&x)?, 2, "nlink after rename onto its own hard link");
    mkdirs(ctx, &["d"])?;
    fs::rename(ctx.pa("d"), ctx.pa("d")).ctx("rename d onto itself")?;
    ensure!(ctx.pa("d").is_dir(), "d vanished after rename onto itself");
    Ok(())
}

pub fn rename_exchange(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), b"file")?;
    mkdirs(ctx, &["d"])?;
    write_new(&ctx.pa("d/c"), b"child")?;
    let (f_ino, d_ino) = (ino(&ctx.pa("f"))?, ino(&ctx.pa("d"))?);
    sys::renameat2(&ctx.pa("f"), &ctx.pa("d"), libc::RENAME_EXCHANGE).ctx("RENAME_EXCHANGE f d")?;
    ensure_eq!(ino(&ctx.pa("f"))?, d_ino, "inode at f after exchange");
    ensure_eq!(ino(&ctx.pa("d"))?, f_ino, "inode at d after exchange");
    ensure_bytes(&read_whole(&ctx.pa("f/c"))?, b"child", "f/c after exchange")?;
    ensure_bytes(&read_whole(&ctx.pa("d"))?, b"file", "d after exchange")?;
    expect_errno(
        sys::renameat2(&ctx.pa("f"), &ctx.pa("missing"), libc::RENAME_EXCHANGE),
        &[libc::ENOENT],
        "RENAME_EXCHANGE with a missing target",
    )
}

pub fn rename_noreplace_existing_is_eexist(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("x"), b"x")?;
    write_new(&ctx.pa("y"), b"y")?;
    expect_errno(
        sys::renameat2(&ctx.pa("x"), &ctx.pa("y"), libc::RENAME_NOREPLACE),
        &[libc::EEXIST],
        "RENAME_NOREPLACE onto an existing file",
    )?;
    ensure_bytes(
        &read_whole(&ctx.pa("x"))?,
        b"x",
        "x after refused RENAME_NOREPLACE",
    )?;
    ensure_bytes(
        &read_whole(&ctx.pa("y"))?,
        b"y",
        "y after refused RENAME_NOREPLACE",
    )?;
    sys::renameat2(&ctx.pa("x"), &ctx.pa("z"), libc::RENAME_NOREPLACE)
        .ctx("RENAME_NOREPLACE onto a new name")?;
    gone(&ctx.pa("x"), "the source of RENAME_NOREPLACE")?;
    ensure_bytes(&read_whole(&ctx.pa("z"))?, b"x", "z after RENAME_NOREPLACE")
}

pub fn rename_dir_over_empty_dir(ctx: &Ctx) -> CaseResult {
    mkdirs(ctx, &["d1", "d2"])?;
    write_new(&ctx.pa("d1/f"), b"f")?;
    fs::rename(ctx.pa("d1"), ctx.pa("d2")).ctx("rename d1 over empty d2")?;
    gone(&ctx.pa("d1"), "the renamed dir")?;
    ensure_bytes(&read_whole(&ctx.pa("d2/f"))?, b"f", "d2/f after rename")?;
    ensure_eq!(
        nlink(&ctx.a)?,
        3,
        "nlink of the parent after replacing a dir"
    );
    Ok(())
}

pub fn rename_dir_over_nonempty_is_enotempty(ctx: &Ctx) -> CaseResult {
    mkdirs(ctx, &["d1", "d2"])?;
    write_new(&ctx.pa("d2/f"), b"f")?;
    expect_errno(
        fs::rename(ctx.pa("d1"), ctx.pa("d2")),
        &[libc::ENOTEMPTY],
        "rename of a dir over a non-empty dir",
    )?;
    ensure!(
        ctx.pa("d1").is_dir() && ctx.pa("d2/f").exists(),
        "refused rename changed the tree"
    );
    Ok(())
}

pub fn rename_dir_into_own_subtree_is_einval(ctx: &Ctx) -> CaseResult {
    fs::create_dir_all(ctx.pa("d/s/t")).ctx("mkdir -p d/s/t")?;
    expect_errno(
        fs::rename(ctx.pa("d"), ctx.pa("d/x")),
        &[libc::EINVAL],
        "rename d to d/x",
    )?;
    expect_errno(
        fs::rename(ctx.pa("d"), ctx.pa("d/s/t/x")),
        &[libc::EINVAL],
        "rename d to d/s/t/x",
    )?;
    ensure!(ctx.pa("d/s/t").is_dir(), "refused rename changed the tree");
    Ok(())
}

pub fn rename_file_over_dir_is_eisdir(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), b"f")?;
    mkdirs(ctx, &["d"])?;
    expect_errno(
        fs::rename(ctx.pa("f"), ctx.pa("d")),
        &[libc::EISDIR],
        "rename of a file over a dir",
    )
}

pub fn rename_dir_over_file_is_enotdir(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), b"f")?;
    mkdirs(ctx, &["d"])?;
    expect_errno(
        fs::rename(ctx.pa("d"), ctx.pa("f")),
        &[libc::ENOTDIR],
        "rename of a dir over a file",
    )
}

pub fn rename_across_dirs(ctx: &Ctx) -> CaseResult {
    mkdirs(ctx, &["d1", "d2", "d1/sub"])?;
    write_new(&ctx.pa("d1/f"), b"moved")?;
    fs::rename(ctx.pa("d1/f"), ctx.pa("d2/g")).ctx("rename d1/f to d2/g")?;
    gone(&ctx.pa("d1/f"), "d1/f after moving it")?;
    ensure_bytes(&read_whole(&ctx.pa("d2/g"))?, b"moved", "d2/g")?;
    fs::rename(ctx.pa("d1/sub"), ctx.pa("d2/sub")).ctx("rename d1/sub to d2/sub")?;
    ensure_eq!(
        ino(&ctx.pa("d2/sub/.."))?,
        ino(&ctx.pa("d2"))?,
        "inode of d2/sub/.. (must be d2 after the move)"
    );
    let left: Vec<PathBuf> = fs::read_dir(ctx.pa("d1"))
        .ctx("read_dir d1")?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .ctx("read_dir d1 entry")?;
    ensure_eq!(left, Vec::<PathBuf>::new(), "entries left in d1");
    ensure_eq!(
        nlink(&ctx.pa("d1"))?,
        2,
        "nlink of d1 after its subdir moved out"
    );
    ensure_eq!(
        nlink(&ctx.pa("d2"))?,
        3,
        "nlink of d2 after a subdir moved in"
    );
    Ok(())
}

pub fn hardlink_nlink_and_shared_data(ctx: &Ctx) -> CaseResult {
    let (f, g) = (ctx.pa("f"), ctx.pa("g"));
    write_new(&f, b"0123456789")?;
    ensure_eq!(nlink(&f)?, 1, "nlink of a new file");
    fs::hard_link(&f, &g).ctx("link f g")?;
    ensure_eq!(nlink(&f)?, 2, "nlink of f after link");
    ensure_eq!(nlink(&g)?, 2, "nlink of g after link");
    ensure_eq!(ino(&g)?, ino(&f)?, "inode of g vs f");
    let w = OpenOptions::new().write(true).open(&g).ctx("open g")?;
    w.write_all_at(b"AB", 4).ctx("pwrite via g")?;
    drop(w);
    ensure_bytes(&read_whole(&f)?, b"0123AB6789", "f after writing via g")?;
    write_new(&ctx.pa("h"), b"h")?;
    expect_errno(
        fs::hard_link(&f, ctx.pa("h")),
        &[libc::EEXIST],
        "link onto an existing name",
    )?;
    fs::remove_file(&f).ctx("unlink f")?;
    ensure_eq!(nlink(&g)?, 1, "nlink of g after unlink f");
    ensure_bytes(&read_whole(&g)?, b"0123AB6789", "g after unlink f")
}

pub fn hardlink_to_dir_is_eperm(ctx: &Ctx) -> CaseResult {
    mkdirs(ctx, &["d"])?;
    expect_errno(
        fs::hard_link(ctx.pa("d"), ctx.pa("e")),
        &[libc::EPERM],
        "link of a directory",
    )?;
    gone(&ctx.pa("e"), "the refused link")
}

pub fn symlink_readlink_lstat_stat(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), b"target data")?;
    symlink("f", ctx.pa("l")).ctx("symlink f l")?;
    ensure_eq!(
        fs::read_link(ctx.pa("l")).ctx("readlink l")?,
        PathBuf::from("f"),
        "readlink l"
    );
    let lm = fs::symlink_metadata(ctx.pa("l")).ctx("lstat l")?;
    ensure!(
        lm.file_type().is_symlink(),
        "lstat of a symlink: expected a symlink, saw {:?}",
        lm.file_type()
    );
    ensure_eq!(lm.len(), 1, "lstat size of a symlink to \"f\"");
    let m = fs::metadata(ctx.pa("l")).ctx("stat l")?;
    ensure!(
        m.is_file(),
        "stat through a symlink: expected a file, saw {:?}",
        m.file_type()
    );
    ensure_eq!(
        m.ino(),
        ino(&ctx.pa("f"))?,
        "inode stat returns through the link"
    );
    ensure_bytes(
        &read_whole(&ctx.pa("l"))?,
        b"target data",
        "read through the symlink",
    )?;
    mkdirs(ctx, &["sub"])?;
    symlink("../f", ctx.pa("sub/up")).ctx("symlink ../f sub/up")?;
    ensure_bytes(
        &read_whole(&ctx.pa("sub/up"))?,
        b"target data",
        "read through a ../ symlink",
    )?;
    expect_errno(
        symlink("f", ctx.pa("l")),
        &[libc::EEXIST],
        "symlink onto an existing name",
    )?;
    expect_errno(
        fs::read_link(ctx.pa("f")),
        &[libc::EINVAL],
        "readlink of a regular file",
    )
}

pub fn symlink_dangling(ctx: &Ctx) -> CaseResult {
    symlink("missing", ctx.pa("l")).ctx("symlink missing l")?;
    fs::symlink_metadata(ctx.pa("l")).ctx("lstat of a dangling symlink")?;
    expect_errno(
        fs::metadata(ctx.pa("l")),
        &[libc::ENOENT],
        "stat through a dangling symlink",
    )?;
    expect_errno(
        sys::open(&ctx.pa("l"), libc::O_RDONLY, 0),
        &[libc::ENOENT],
        "open of a dangling symlink",
    )?;
    expect_errno(
        sys::open(
            &ctx.pa("l"),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o644,
        ),
        &[libc::EEXIST],
        "O_CREAT|O_EXCL on a dangling symlink",
    )?;
    // Linux: O_CREAT through a dangling symlink creates its target.
    drop(
        sys::open(&ctx.pa("l"), libc::O_CREAT | libc::O_WRONLY, 0o644)
            .ctx("O_CREAT through a dangling symlink")?,
    );
    ensure!(
        ctx.pa("missing").is_file(),
        "O_CREAT through a dangling symlink did not create its target"
    );
    Ok(())
}

pub fn symlink_loop_is_eloop(ctx: &Ctx) -> CaseResult {
    symlink("l2", ctx.pa("l1")).ctx("symlink l2 l1")?;
    symlink("l1", ctx.pa("l2")).ctx("symlink l1 l2")?;
    symlink("self", ctx.pa("self")).ctx("symlink self self")?;
    expect_errno(
        fs::metadata(ctx.pa("l1")),
        &[libc::ELOOP],
        "stat of a two-link loop",
    )?;
    expect_errno(
        sys::open(&ctx.pa("l1"), libc::O_RDONLY, 0),
        &[libc::ELOOP],
        "open of a two-link loop",
    )?;
    expect_errno(
        fs::metadata(ctx.pa("self")),
        &[libc::ELOOP],
        "stat of a self loop",
    )?;
    expect_errno(
        fs::metadata(ctx.pa("l1/x")),
        &[libc::ELOOP],
        "stat of a path through a loop",
    )?;
    write_new(&ctx.pa("f"), b"f")?;
    symlink("f", ctx.pa("lf")).ctx("symlink f lf")?;
    expect_errno(
        sys::open(&ctx.pa("lf"), libc::O_RDONLY | libc::O_NOFOLLOW, 0),
        &[libc::ELOOP],
        "O_NOFOLLOW open of a symlink",
    )
}
