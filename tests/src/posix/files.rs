//! Files: open flags, reads and writes at offsets, holes, truncate, and
//! large files checked through the second mount.
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use super::check::{ensure, ensure_eq, expect_errno, fail, CaseResult, Context};
use super::sys;
use super::Ctx;

const MIB: u64 = 1 << 20;

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
pub(super) fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub(super) fn write_new(p: &Path, data: &[u8]) -> CaseResult {
    fs::write(p, data).ctx(format_args!("writing {}", p.display()))
}

pub(super) fn read_whole(p: &Path) -> Result<Vec<u8>, super::CaseError> {
    fs::read(p).ctx(format_args!("reading {}", p.display()))
}

/// Fails unless `seen == expected`, naming the first differing offset.
pub(super) fn ensure_bytes(seen: &[u8], expected: &[u8], what: &str) -> CaseResult {
    if seen == expected {
        return Ok(());
    }
    let at = seen
        .iter()
        .zip(expected)
        .position(|(s, e)| s != e)
        .unwrap_or(seen.len().min(expected.len()));
    Err(fail(format!(
        "{what}: expected {} bytes, saw {}; first difference at offset {at} (expected {:?}, saw {:?})",
        expected.len(),
        seen.len(),
        expected.get(at),
        seen.get(at)
    )))
}

fn mode_of(p: &Path) -> Result<u32, super::CaseError> {
    Ok(fs::symlink_metadata(p)
        .ctx(format_args!("stat {}", p.display()))?
        .mode()
        & 0o7777)
}

pub fn open_excl_on_existing_is_eexist(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    sys::open(&f, flags, 0o644).ctx("O_CREAT|O_EXCL of a new name")?;
    expect_errno(
        sys::open(&f, flags, 0o644),
        &[libc::EEXIST],
        "O_CREAT|O_EXCL of an existing file",
    )?;
    fs::create_dir(ctx.pa("d")).ctx("mkdir d")?;
    expect_errno(
        sys::open(&ctx.pa("d"), flags, 0o644),
        &[libc::EEXIST],
        "O_CREAT|O_EXCL of an existing directory",
    )
}

pub fn open_trunc_empties(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, &random_bytes(1, 10_000))?;
    let fd = sys::open(&f, libc::O_WRONLY | libc::O_TRUNC, 0).ctx("open O_TRUNC")?;
    ensure_eq!(
        fd.metadata().ctx("fstat")?.len(),
        0,
        "size after O_TRUNC (fstat)"
    );
    drop(fd);
    ensure_eq!(read_whole(&f)?.len(), 0, "bytes read after O_TRUNC");
    // O_TRUNC|O_CREAT on an existing file truncates too.
    write_new(&f, b"again")?;
    let fd = sys::open(&f, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)
        .ctx("open O_CREAT|O_TRUNC")?;
    drop(fd);
    ensure_eq!(read_whole(&f)?.len(), 0, "bytes read after O_CREAT|O_TRUNC");
    Ok(())
}

pub fn open_append_appends_after_lseek(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    write_new(&f, b"hello")?;
    let mut fd = sys::open(&f, libc::O_WRONLY | libc::O_APPEND, 0).ctx("open O_APPEND")?;
    ensure_eq!(
        sys::lseek(&fd, 0, libc::SEEK_SET).ctx("lseek 0")?,
        0,
        "lseek(0, SEEK_SET)"
    );
    fd.write_all(b"world").ctx("append write")?;
    ensure_eq!(
        sys::lseek(&fd, 0, libc::SEEK_CUR).ctx("lseek SEEK_CUR")?,
        10,
        "offset after an O_APPEND write"
    );
    sys::lseek(&fd, 2, libc::SEEK_SET).ctx("lseek 2")?;
    fd.write_all(b"!").ctx("second append write")?;
    drop(fd);
    ensure_bytes(
        &read_whole(&f)?,
        b"helloworld!",
        "file after appends at lseek'd offsets",
    )
}

pub fn open_creat_mode_honours_umask(ctx: &Ctx) -> CaseResult {
    let (f1, d1, f2) = (ctx.pa("f1"), ctx.pa("d1"), ctx.pa("f2"));
    let (cf1, cd1, cf2) = (sys::cstr(&f1), sys::cstr(&d1), sys::cstr(&f2));
    // umask is per process: change it only in a child.
    let code = sys::in_child(|| unsafe {
        libc::umask(0o027);
        let fd = libc::open(
            cf1.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o777,
        );
        if fd < 0 || libc::mkdir(cd1.as_ptr(), 0o777) < 0 {
            return sys::errno();
        }
        libc::umask(0);
        if libc::open(
            cf2.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o640,
        ) < 0
        {
            return sys::errno();
        }
        0
    })
    .ctx("fork")?;
    ensure_eq!(code, 0, "errno of the creates in the child (0 is success)");
    ensure_eq!(
        format!("{:o}", mode_of(&f1)?),
        "750",
        "mode of a file created 0777 under umask 027"
    );
    ensure_eq!(
        format!("{:o}", mode_of(&d1)?),
        "750",
        "mode of a dir made 0777 under umask 027"
    );
    ensure_eq!(
        format!("{:o}", mode_of(&f2)?),
        "640",
        "mode of a file created 0640 under umask 0"
    );
    Ok(())
}

pub fn open_missing_is_enoent(ctx: &Ctx) -> CaseResult {
    expect_errno(
        sys::open(&ctx.pa("missing"), libc::O_RDONLY, 0),
        &[libc::ENOENT],
        "open of a missing file",
    )?;
    expect_errno(
        sys::open(&ctx.pa("missing/f"), libc::O_CREAT | libc::O_WRONLY, 0o644),
        &[libc::ENOENT],
        "O_CREAT in a missing directory",
    )?;
    expect_errno(
        fs::metadata(ctx.pa("missing")),
        &[libc::ENOENT],
        "stat of a missing file",
    )
}

pub fn open_directory_on_file_is_enotdir(ctx: &Ctx) -> CaseResult {
    write_new(&ctx.pa("f"), b"x")?;
    expect_errno(
        sys::open(&ctx.pa("f"), libc::O_RDONLY | libc::O_DIRECTORY, 0),
        &[libc::ENOTDIR],
        "O_DIRECTORY on a file",
    )?;
    expect_errno(
        sys::open(&ctx.pa("f/x"), libc::O_RDONLY, 0),
        &[libc::ENOTDIR],
        "open of file/x",
    )?;
    fs::create_dir(ctx.pa("d")).ctx("mkdir d")?;
    sys::open(&ctx.pa("d"), libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .ctx("O_DIRECTORY on a directory")?;
    Ok(())
}

pub fn pwrite_pread_at_offsets(ctx: &Ctx) -> CaseResult {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(ctx.pa("f"))
        .ctx("create f")?;
    let mut model = Vec::new();
    let writes: [(u64, usize); 6] = [
        (0, 100),
        (4095, 2),
        (3 * 4096 + 1, 5000),
        (MIB - 7, 14),
        (50, 4000),
        (2 * MIB + 3, 1),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = random_bytes(10 + i as u64, len);
        f.write_all_at(&data, off)
            .ctx(format_args!("pwrite {len} bytes at {off}"))?;
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        let mut back = vec![0; len];
        f.read_exact_at(&mut back, off)
            .ctx(format_args!("pread {len} bytes at {off}"))?;
        ensure_bytes(&back, &data, &format!("pread right after pwrite at {off}"))?;
    }
    ensure_eq!(
        f.metadata().ctx("fstat")?.len(),
        model.len() as u64,
        "size after pwrites"
    );
    drop(f);
    ensure_bytes(
        &read_whole(&ctx.pa("f"))?,
        &model,
        "whole file after pwrites",
    )
}

pub fn read_at_eof_is_short(ctx: &Ctx) -> CaseResult {
    let data = random_bytes(2, 1000);
    write_new(&ctx.pa("f"), &data)?;
    let mut f = File::open(ctx.pa("f")).ctx("open f")?;
    let mut buf = vec![0; 4096];
    ensure_eq!(
        f.read_at(&mut buf, 900).ctx("pread at 900")?,
        100,
        "bytes read at 900 of 1000"
    );
    ensure_bytes(&buf[..100], &data[900..], "bytes read at 900")?;
    ensure_eq!(
        f.read_at(&mut buf, 1000).ctx("pread at EOF")?,
        0,
        "bytes read at EOF"
    );
    ensure_eq!(
        f.read_at(&mut buf, 5000).ctx("pread past EOF")?,
        0,
        "bytes read past EOF"
    );
    ensure_eq!(
        f.read(&mut buf).ctx("read")?,
        1000,
        "first read(4096) of a 1000-byte file"
    );
    ensure_eq!(
        f.read(&mut buf).ctx("read at EOF")?,
        0,
        "second read at EOF"
    );
    Ok(())
}

pub fn write_past_eof_leaves_zero_hole(ctx: &Ctx) -> CaseResult {
    let head = random_bytes(3, 100);
    let tail = random_bytes(4, 10);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(ctx.pa("f"))
        .ctx("create f")?;
    f.write_all_at(&head, 0).ctx("pwrite head")?;
    f.write_all_at(&tail, 70_003).ctx("pwrite past EOF")?;
    drop(f);
    let mut expected = head;
    expected.resize(70_003, 0);
    expected.extend_from_slice(&tail);
    ensure_bytes(
        &read_whole(&ctx.pa("f"))?,
        &expected,
        "file with a hole from 100 to 70003",
    )
}

pub fn sparse_write_at_64mib(ctx: &Ctx) -> CaseResult {
    let head = random_bytes(5, 100);
    let tail = random_bytes(6, 4101);
    let off = 64 * MIB;
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(ctx.pa("f"))
        .ctx("create f")?;
    f.write_all_at(&head, 0).ctx("pwrite at 0")?;
    f.write_all_at(&tail, off).ctx("pwrite at 64 MiB")?;
    ensure_eq!(
        f.metadata().ctx("fstat")?.len(),
        off + 4101,
        "size after a write at 64 MiB (fstat)"
    );
    drop(f);
    ensure_eq!(
        fs::metadata(ctx.pa("f")).ctx("stat")?.len(),
        off + 4101,
        "size after a write at 64 MiB (stat)"
    );
    let f = File::open(ctx.pa("f")).ctx("open f")?;
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = 0u64;
    while pos < off {
        f.read_exact_at(&mut buf, pos)
            .ctx(format_args!("pread 1 MiB at {pos}"))?;
        let start = if pos == 0 {
            ensure_bytes(&buf[..100], &head, "data at 0")?;
            100
        } else {
            0
        };
        if let Some(i) = buf[start..].iter().position(|&b| b != 0) {
            return Err(fail(format!(
                "hole byte at {} reads as {:#x}, expected 0",
                pos + (start + i) as u64,
                buf[start + i]
            )));
        }
        pos += MIB;
    }
    let mut back = vec![0u8; 8192];
    let n = f.read_at(&mut back, off).ctx("pread at 64 MiB")?;
    ensure_bytes(&back[..n], &tail, "data at 64 MiB")
}

pub fn seek_data_seek_hole_contract(ctx: &Ctx) -> CaseResult {
    // Data only at [1 MiB, 1 MiB + 4096): the rest is a hole, which a file
    // system may report as data (POSIX allows any hole to be data).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(ctx.pa("sparse"))
        .ctx("create sparse")?;
    f.write_all_at(&random_bytes(7, 4096), MIB)
        .ctx("pwrite at 1 MiB")?;
    let size = (MIB + 4096) as i64;
    let data0 = sys::lseek(&f, 0, libc::SEEK_DATA).ctx("SEEK_DATA at 0")?;
    ensure!(
        (0..=MIB as i64).contains(&data0),
        "SEEK_DATA at 0 with data from 1 MiB: expected 0..=1048576, saw {data0}"
    );
    let inside = MIB as i64 + 100;
    ensure_eq!(
        sys::lseek(&f, inside, libc::SEEK_DATA).ctx("SEEK_DATA inside data")?,
        inside,
        "SEEK_DATA at an offset inside data"
    );
    let hole0 = sys::lseek(&f, 0, libc::SEEK_HOLE).ctx("SEEK_HOLE at 0")?;
    ensure!(
        (0..=size).contains(&hole0),
        "SEEK_HOLE at 0: expected 0..={size}, saw {hole0}"
    );
    let hole_in = sys::lseek(&f, inside, libc::SEEK_HOLE).ctx("SEEK_HOLE inside data")?;
    ensure!(
        (inside..=size).contains(&hole_in),
        "SEEK_HOLE at {inside}: expected {inside}..={size}, saw {hole_in}"
    );
    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
        let name = if whence == libc::SEEK_DATA {
            "SEEK_DATA"
        } else {
            "SEEK_HOLE"
        };
        expect_errno(
            sys::lseek(&f, size, whence),
            &[libc::ENXIO],
            format_args!("{name} at EOF"),
        )?;
        expect_errno(
            sys::lseek(&f, size + 1000, whence),
            &[libc::ENXIO],
            format_args!("{name} past EOF"),
        )?;
    }
    // A file with no holes: the only hole is the implicit one at EOF.
    write_new(&ctx.pa("dense"), &random_bytes(8, 10_000))?;
    let dense = File::open(ctx.pa("dense")).ctx("open dense")?;
    ensure_eq!(
        sys::lseek(&dense, 0, libc::SEEK_HOLE).ctx("SEEK_HOLE in a dense file")?,
        10_000,
        "SEEK_HOLE at 0 of a fully written 10000-byte file"
    );
    ensure_eq!(
        sys::lseek(&dense, 0, libc::SEEK_DATA).ctx("SEEK_DATA in a dense file")?,
        0,
        "SEEK_DATA at 0 of a fully written file"
    );
    write_new(&ctx.pa("empty"), b"")?;
    let empty = File::open(ctx.pa("empty")).ctx("open empty")?;
    expect_errno(
        sys::lseek(&empty, 0, libc::SEEK_DATA),
        &[libc::ENXIO],
        "SEEK_DATA at 0 of an empty file",
    )
}

pub fn truncate_shrink_then_regrow_reads_zeros(ctx: &Ctx) -> CaseResult {
    let f = ctx.pa("f");
    let data = random_bytes(9, 3 * 4096 + 100);
    write_new(&f, &data)?;
    sys::truncate(&f, 5000).ctx("truncate to 5000")?;
    ensure_eq!(
        fs::metadata(&f).ctx("stat")?.len(),
        5000,
        "size after truncate to 5000"
    );
    ensure_bytes(
        &read_whole(&f)?,
        &data[..5000],
        "file after shrinking to 5000",
    )?;
    sys::truncate(&f, 3 * 4096 + 100).ctx("truncate back up")?;
    let mut expected = data[..5000].to_vec();
    expected.resize(3 * 4096 + 100, 0);
    ensure_bytes(
        &read_whole(&f)?,
        &expected,
        "file re-grown by truncate (bytes past 5000 must be zero)",
    )?;
    sys::truncate(&f, (10 * MIB) as i64).ctx("truncate to 10 MiB")?;
    expected.resize((10 * MIB) as usize, 0);
    ensure_bytes(&read_whole(&f)?, &expected, "file extended to 10 MiB")?;
    sys::truncate(&f, 0).ctx("truncate to 0")?;
    ensure_eq!(read_whole(&f)?.len(), 0, "bytes after truncate to 0");
    Ok(())
}

pub fn ftruncate_on_open_fd(ctx: &Ctx) -> CaseResult {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(ctx.pa("f"))
        .ctx("create f")?;
    let data = random_bytes(10, 8192);
    f.write_all_at(&data, 0).ctx("pwrite")?;
    f.set_len(100).ctx("ftruncate to 100")?;
    ensure_eq!(
        f.metadata().ctx("fstat")?.len(),
        100,
        "fstat size after ftruncate to 100"
    );
    ensure_eq!(
        fs::metadata(ctx.pa("f")).ctx("stat")?.len(),
        100,
        "stat size after ftruncate to 100"
    );
    let mut back = vec![0; 8192];
    let n = f.read_at(&mut back, 0).ctx("pread")?;
    ensure_bytes(&back[..n], &data[..100], "bytes after ftruncate to 100")?;
    f.set_len(8192).ctx("ftruncate to 8192")?;
    f.read_exact_at(&mut back, 0).ctx("pread after re-grow")?;
    let mut expected = data[..100].to_vec();
    expected.resize(8192, 0);
    ensure_bytes(&back, &expected, "bytes after ftruncate back to 8192")?;
    drop(f);
    ensure_bytes(&read_whole(&ctx.pa("f"))?, &expected, "file after close")
}

pub fn truncate_directory_is_eisdir(ctx: &Ctx) -> CaseResult {
    let d = ctx.pa("d");
    fs::create_dir(&d).ctx("mkdir d")?;
    expect_errno(
        sys::truncate(&d, 0),
        &[libc::EISDIR],
        "truncate(2) of a directory",
    )?;
    expect_errno(
        sys::open(&d, libc::O_WRONLY, 0),
        &[libc::EISDIR],
        "open O_WRONLY of a directory",
    )?;
    expect_errno(
        sys::open(&d, libc::O_RDWR, 0),
        &[libc::EISDIR],
        "open O_RDWR of a directory",
    )
}

pub fn many_chunks_checksum_via_b(ctx: &Ctx) -> CaseResult {
    let data = random_bytes(11, (40 * MIB) as usize + 12_345);
    let want_crc = crc_fast::crc32_iscsi(&data);
    let mut f = File::create(ctx.pa("big")).ctx("create big via a")?;
    let sizes = [1usize, 4095, 65_537, 1_048_573, 3_145_739, 511, 524_309];
    let mut pos = 0;
    for size in sizes.iter().cycle() {
        if pos == data.len() {
            break;
        }
        let end = (pos + size).min(data.len());
        f.write_all(&data[pos..end])
            .ctx(format_args!("write {} bytes at {pos}", end - pos))?;
        pos = end;
    }
    drop(f);
    // Close-to-open: a file closed via a reads back whole via b.
    let mut f = File::open(ctx.pb("big")).ctx("open big via b")?;
    let mut back = Vec::with_capacity(data.len());
    let mut buf = vec![0; 1_000_003];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(format_args!("read via b at {}", back.len()))?;
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    let got_crc = crc_fast::crc32_iscsi(&back);
    if got_crc != want_crc || back.len() != data.len() {
        ensure_bytes(
            &back,
            &data,
            &format!("crc32c {got_crc:#010x} read via b, expected {want_crc:#010x}"),
        )?;
    }
    Ok(())
}
