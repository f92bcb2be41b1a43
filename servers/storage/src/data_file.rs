//! The data file of one target: block slots written and read around the
//! page cache, and made durable by a shared `fdatasync`.
//!
//! Writes use `O_DIRECT`, straight from the caller's memory where it is
//! aligned to [`DIRECT_ALIGN`] (payloads land so, see `r3fs_net::payload`),
//! else from a per-thread bounce buffer: a chunk version's blocks go to fresh slots that nobody
//! reads until a commit names them, so caching them buys nothing, while
//! copying them into the page cache and writing them back at `fdatasync`
//! was a quarter of a storage node's CPU under sequential writes (measured
//! with `perf` on `r3fs-bench storage`). A write is padded with zeros to the
//! alignment; the padding stays inside the block's slot. Reads of slots use
//! `O_DIRECT` too: a cold 1 MiB read through the page cache took four times
//! as long as a direct one here (page cache insertion, small readahead
//! I/Os), and the storage node has no use for a second cache of blocks the
//! clients cache themselves. Linux keeps direct and buffered access
//! coherent (a direct read writes back dirty cached pages first).
//!
//! Where the file system refuses `O_DIRECT` (at open or, with `EINVAL`, at
//! the first write) the file falls back to buffered writes for good and
//! says so once in the log. Either way `fdatasync` stays the durability
//! point: it flushes the device cache and the metadata of a grown file.
//! A failed `fdatasync` is final: the writes it covered may be lost, and a
//! later one would succeed without saying so (the kernel reports a
//! writeback error once), so every later sync fails too.
//!
//! Must not know about chunks, versions or slots' owners: it moves bytes
//! at offsets the chunk engine chooses.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use aligned_vec::{AVec, ConstAlign};
use parking_lot::Mutex;

/// Memory, offset and length alignment of a direct write (the largest
/// logical block size in common use; 512-byte devices accept it too).
pub const DIRECT_ALIGN: usize = 4096;
/// Bytes one direct write moves at most (the bounce buffer's size).
pub const DIRECT_WRITE_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(DIRECT_WRITE_BYTES_MAX.is_multiple_of(DIRECT_ALIGN));

type Bounce = AVec<u8, ConstAlign<DIRECT_ALIGN>>;

thread_local! {
    /// One bounce buffer per thread that writes (the blocking pool's threads).
    static BOUNCE: RefCell<Bounce> = RefCell::new(Bounce::new(DIRECT_ALIGN));
}

/// See the module docs.
pub struct DataFile {
    path: PathBuf,
    /// Reads, buffered writes (the fallback) and `fdatasync`.
    buffered: File,
    /// The same file opened `O_DIRECT`, while the file system takes it.
    direct: Option<File>,
    direct_refused: AtomicBool,
    sync: GroupSync,
}

/// Group sync: one `fdatasync` covers every write that finished before it
/// started.
struct GroupSync {
    /// Writes finished so far.
    written: AtomicU64,
    /// Every write up to this count is durable.
    synced: AtomicU64,
    /// Held while syncing; holds why a sync failed, if one did (then every
    /// later sync fails).
    lock: Mutex<Option<String>>,
    /// See [`DataFile::inject_sync_faults`]: the errno, 0 for none.
    fault: AtomicI32,
}

impl DataFile {
    /// Opens (or creates) the file at `path`.
    pub fn open(path: &Path) -> io::Result<DataFile> {
        DataFile::open_with(path, true)
    }

    fn open_with(path: &Path, try_direct: bool) -> io::Result<DataFile> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        let buffered = options.open(path)?;
        let direct = match options.custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) if try_direct => Some(file),
            Ok(_) => None,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), "the file system refuses O_DIRECT: chunk data is written through the page cache");
                None
            }
            Err(e) => return Err(e),
        };
        Ok(DataFile {
            path: path.to_path_buf(),
            buffered,
            direct,
            direct_refused: AtomicBool::new(false),
            sync: GroupSync {
                written: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                lock: Mutex::new(None),
                fault: AtomicI32::new(0),
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes.
    pub fn byte_len(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.len())
    }

    /// Whether writes bypass the page cache.
    pub fn writes_direct(&self) -> bool {
        self.direct.is_some() && !self.direct_refused.load(Ordering::Relaxed)
    }

    /// Writes `bytes` at `offset` (a multiple of [`DIRECT_ALIGN`]). The file
    /// may receive up to `DIRECT_ALIGN - 1` zero bytes after them: the
    /// caller owns the space up to the next multiple of the alignment.
    /// Durable only after [`DataFile::sync_data`].
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        assert!(
            offset.is_multiple_of(DIRECT_ALIGN as u64),
            "data file writes start aligned: {offset}"
        );
        let result = match &self.direct {
            Some(direct) if !self.direct_refused.load(Ordering::Relaxed) => {
                match write_direct(direct, bytes, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.refuse_direct(&e);
                        self.buffered.write_all_at(bytes, offset)
                    }
                    other => other,
                }
            }
            _ => self.buffered.write_all_at(bytes, offset),
        };
        if result.is_ok() {
            self.sync.written.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    /// Allocates `[offset, offset + len)` on disk without writing it, so
    /// writes there later find the space taken (`ENOSPC` here, not then).
    /// A file system that cannot allocate ahead is left to allocate on
    /// write.
    pub fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        // SAFETY: a plain syscall on an fd this file owns.
        let rc = unsafe { libc::fallocate(self.buffered.as_raw_fd(), 0, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => Ok(()),
            _ => Err(e),
        }
    }

    fn refuse_direct(&self, e: &io::Error) {
        if !self.direct_refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %self.path.display(), error = %e, "an aligned O_DIRECT write was refused: chunk data is written through the page cache from now on");
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`: with `O_DIRECT` through
    /// the bounce buffer when `offset` is aligned (block slots always are),
    /// else through the page cache.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(direct)
                if offset.is_multiple_of(DIRECT_ALIGN as u64)
                    && !self.direct_refused.load(Ordering::Relaxed) =>
            {
                match read_direct(direct, &self.buffered, buf, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.refuse_direct(&e);
                        self.buffered.read_exact_at(buf, offset)
                    }
                    other => other,
                }
            }
            _ => self.buffered.read_exact_at(buf, offset),
        }
    }

    /// Makes every write that finished before this call durable, sharing one
    /// `fdatasync` with the callers waiting at the same time. Fails for
    /// good once one `fdatasync` failed (see the module docs).
    pub fn sync_data(&self) -> io::Result<()> {
        let mine = self.sync.written.load(Ordering::SeqCst);
        let mut failed = self.sync.lock.lock();
        if let Some(why) = &*failed {
            return Err(io::Error::other(format!(
                "an earlier fdatasync of {} failed ({why}): writes it covered may be lost",
                self.path.display()
            )));
        }
        if self.sync.synced.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let upto = self.sync.written.load(Ordering::SeqCst);
        let synced = match self.sync.fault.load(Ordering::Relaxed) {
            0 => self.buffered.sync_data(),
            errno => Err(io::Error::from_raw_os_error(errno)),
        };
        if let Err(e) = synced {
            *failed = Some(e.to_string());
            return Err(e);
        }
        self.sync.synced.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    /// For fault tests: while `errno` is set, `fdatasync` fails with it (a
    /// relaxed load per sync when unused). A failure stays, as a real one
    /// does.
    pub fn inject_sync_faults(&self, errno: Option<i32>) {
        self.sync.fault.store(errno.unwrap_or(0), Ordering::Relaxed);
    }
}

/// `bytes` at `offset` through `O_DIRECT`. Bytes already at an aligned
/// address (payloads the network layer received into aligned buffers) go
/// out as they are, up to the last whole alignment unit; the rest goes
/// through the bounce buffer, in pieces, the last one padded with zeros.
fn write_direct(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    let in_place = if (bytes.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        bytes.len() / DIRECT_ALIGN * DIRECT_ALIGN
    } else {
        0
    };
    if in_place > 0 {
        file.write_all_at(&bytes[..in_place], offset)?;
    }
    let rest = &bytes[in_place..];
    if rest.is_empty() {
        return Ok(());
    }
    let offset = offset + in_place as u64;
    BOUNCE.with_borrow_mut(|bounce| {
        for (i, piece) in rest.chunks(DIRECT_WRITE_BYTES_MAX).enumerate() {
            let padded = piece.len().next_multiple_of(DIRECT_ALIGN);
            bounce.clear();
            bounce.extend_from_slice(piece);
            bounce.resize(padded, 0);
            let at = offset + (i * DIRECT_WRITE_BYTES_MAX) as u64;
            file.write_all_at(bounce.as_slice(), at)?;
        }
        Ok(())
    })
}

/// Exactly `buf.len()` bytes at `offset` through `O_DIRECT`, in
/// bounce-buffer-sized pieces each rounded up to the alignment (the file
/// may end inside the rounding: only the bytes asked for must exist).
/// `buf.len()` bytes at `offset` through `O_DIRECT`: straight into `buf`
/// when it is aligned (up to its last whole alignment unit), the rest
/// through the bounce buffer.
fn read_direct(file: &File, buffered: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let in_place = if (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
        buf.len() / DIRECT_ALIGN * DIRECT_ALIGN
    } else {
        0
    };
    let mut got = 0;
    while got < in_place {
        let n = file.read_at(&mut buf[got..in_place], offset + got as u64)?;
        got += n;
        if n == 0 || !got.is_multiple_of(DIRECT_ALIGN) {
            // The file's end: what is left, if it exists, through the page
            // cache; else UnexpectedEof.
            return buffered.read_exact_at(&mut buf[got..], offset + got as u64);
        }
    }
    read_bounced(file, buffered, &mut buf[got..], offset + got as u64)
}

fn read_bounced(file: &File, buffered: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    BOUNCE.with_borrow_mut(|bounce| {
        for (i, piece) in buf.chunks_mut(DIRECT_WRITE_BYTES_MAX).enumerate() {
            let at = offset + (i * DIRECT_WRITE_BYTES_MAX) as u64;
            let padded = piece.len().next_multiple_of(DIRECT_ALIGN);
            if bounce.len() < padded {
                bounce.resize(padded, 0);
            }
            let mut got = 0;
            while got < piece.len() && got.is_multiple_of(DIRECT_ALIGN) {
                let n = file.read_at(&mut bounce[got..padded], at + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            let direct = got.min(piece.len());
            piece[..direct].copy_from_slice(&bounce[..direct]);
            // A short direct read (the file's end, unaligned): the rest, if
            // it exists, through the page cache; else UnexpectedEof.
            buffered.read_exact_at(&mut piece[direct..], at + direct as u64)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_and_pad_only_to_the_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::open(&dir.path().join("blocks")).unwrap();
        let big: Vec<u8> = (0..DIRECT_WRITE_BYTES_MAX + 5000)
            .map(|i| (i % 251) as u8)
            .collect();
        file.write_at(&big, 0).unwrap();
        file.write_at(b"short", 3 * DIRECT_WRITE_BYTES_MAX as u64)
            .unwrap();
        file.sync_data().unwrap();
        let mut back = vec![0u8; big.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, big);
        let mut short = [0u8; 5];
        file.read_exact_at(&mut short, 3 * DIRECT_WRITE_BYTES_MAX as u64)
            .unwrap();
        assert_eq!(&short, b"short");
        let len = std::fs::metadata(file.path()).unwrap().len();
        let expected = 3 * DIRECT_WRITE_BYTES_MAX as u64 + DIRECT_ALIGN as u64;
        assert!(
            len == expected || (!file.writes_direct() && len == expected - 4091),
            "file length {len}"
        );
    }

    #[test]
    fn a_failed_sync_fails_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::open(&dir.path().join("blocks")).unwrap();
        file.write_at(&[1u8; 4096], 0).unwrap();
        file.sync_data().unwrap();
        file.write_at(&[2u8; 4096], 4096).unwrap();
        file.inject_sync_faults(Some(libc::EIO));
        let first = file.sync_data().unwrap_err();
        assert_eq!(first.raw_os_error(), Some(libc::EIO));
        file.inject_sync_faults(None);
        // Another writer's write, and one with nothing new: neither may
        // hear that its bytes are durable.
        file.write_at(&[3u8; 4096], 8192).unwrap();
        for _ in 0..2 {
            let later = file.sync_data().unwrap_err().to_string();
            assert!(later.contains("an earlier fdatasync"), "{later}");
        }
    }

    #[test]
    fn without_direct_writes_the_same_bytes_go_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::open_with(&dir.path().join("blocks"), false).unwrap();
        assert!(!file.writes_direct());
        file.write_at(b"buffered", 0).unwrap();
        file.sync_data().unwrap();
        let mut back = [0u8; 8];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"buffered");
        assert_eq!(file.byte_len().unwrap(), 8, "no padding without O_DIRECT");

        // A refused direct write switches the file to buffered writes for good.
        let file = DataFile::open(&dir.path().join("other")).unwrap();
        file.refuse_direct(&io::Error::from_raw_os_error(libc::EINVAL));
        assert!(!file.writes_direct());
        file.write_at(b"after", 0).unwrap();
        let mut back = [0u8; 5];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"after");
        assert_eq!(file.byte_len().unwrap(), 5);
    }

    #[test]
    fn aligned_memory_is_written_in_place_and_any_tail_through_the_bounce_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::open(&dir.path().join("blocks")).unwrap();
        let mut aligned = Bounce::new(DIRECT_ALIGN);
        let pattern: Vec<u8> = (0..3 * DIRECT_ALIGN + 100)
            .map(|i| (i % 241) as u8)
            .collect();
        aligned.extend_from_slice(&pattern);
        for (offset, bytes) in [
            (0u64, &aligned[..]),                     // aligned, ragged tail
            (65_536, &aligned[..2 * DIRECT_ALIGN]),   // aligned, whole units
            (131_072, &aligned[1..DIRECT_ALIGN + 1]), // unaligned memory
            (196_608, &aligned[..DIRECT_ALIGN - 1]),  // aligned, no whole unit
        ] {
            file.write_at(bytes, offset).unwrap();
            let mut back = vec![0u8; bytes.len()];
            file.read_exact_at(&mut back, offset).unwrap();
            assert_eq!(back, bytes, "at {offset}");
        }
    }

    #[test]
    fn direct_reads_see_buffered_writes_and_stop_at_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks");
        let buffered = DataFile::open_with(&path, false).unwrap();
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        buffered.write_at(&bytes, 0).unwrap();
        let file = DataFile::open(&path).unwrap();
        let mut back = vec![0u8; 5000];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, bytes, "dirty cached pages are written back first");
        let mut tail = vec![0u8; 904];
        file.read_exact_at(&mut tail, 4096).unwrap();
        assert_eq!(tail, bytes[4096..]);
        let mut past = vec![0u8; 1000];
        let err = file.read_exact_at(&mut past, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Aligned destinations take the direct read in place (whole units,
    /// then the bounce buffer for a short tail); the end of the file stops
    /// it anywhere in between.
    #[test]
    fn direct_reads_into_aligned_memory_match_at_every_length_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::open(&dir.path().join("blocks")).unwrap();
        let len = 3 * DIRECT_WRITE_BYTES_MAX + 5000;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        file.write_at(&bytes, 0).unwrap();
        file.sync_data().unwrap();
        for want in [4096, 5000, DIRECT_WRITE_BYTES_MAX, len] {
            for at in [0, 4096, DIRECT_WRITE_BYTES_MAX] {
                let mut payload = r3fs_net::payload::PayloadBuf::with_len(want);
                let buf = payload.whole_mut();
                let fits = at + want <= len;
                match file.read_exact_at(buf, at as u64) {
                    Ok(()) => {
                        assert!(fits, "{want} at {at} read past the end");
                        assert!(buf[..] == bytes[at..at + want], "{want} at {at}");
                    }
                    Err(e) => {
                        assert!(!fits, "{want} at {at}: {e}");
                        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                    }
                }
            }
        }
        // Unaligned memory goes through the bounce buffer alike.
        let mut unaligned = vec![0u8; 4097];
        let (_, tail) = unaligned.split_at_mut(1);
        file.read_exact_at(tail, 4096).unwrap();
        assert!(tail[..] == bytes[4096..8192]);
    }

    #[test]
    fn a_rewritten_slot_reads_back_its_new_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::open(&dir.path().join("blocks")).unwrap();
        file.write_at(&[1u8; 8192], 0).unwrap();
        let mut buf = [0u8; 8192];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1u8; 8192]);
        file.write_at(&[2u8; 8192], 0).unwrap();
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [2u8; 8192]);
    }

    #[test]
    fn a_sync_covers_writes_that_finished_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = DataFile::open(&dir.path().join("blocks")).unwrap();
        file.sync_data().unwrap();
        file.write_at(&[7u8; 100], 0).unwrap();
        assert_eq!(file.sync.written.load(Ordering::SeqCst), 1);
        file.sync_data().unwrap();
        assert_eq!(file.sync.synced.load(Ordering::SeqCst), 1);
    }
}
