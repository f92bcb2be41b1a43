//! [`MemFs`]: a small in-memory `FileSystem`, the fixture for channel tests
//! and benchmarks. Served through [`crate::serve::Served`] exactly like the
//! real file system, it shows what the kernel round trip and the channels
//! cost without the cluster behind them.
//!
//! Regular files and directories only (mknod accepts regular files), one
//! big lock, inodes freed once unlinked, forgotten by the kernel and
//! closed. Attribute and entry timeouts are configurable: 0 makes every
//! `stat`/`fstat` a kernel round trip. `direct_io` answers every open with
//! `FOPEN_DIRECT_IO`, so each `read(2)` is a READ request.
//!
//! # Limits
//! Files hold at most [`FILE_BYTES_MAX`]; names at most [`NAME_BYTES_MAX`].

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use parking_lot::RwLock;

/// Largest file MemFs keeps (it is memory).
pub const FILE_BYTES_MAX: u64 = 1 << 30;
/// Longest name in a directory.
pub const NAME_BYTES_MAX: usize = 255;
const ROOT: u64 = 1;
const BLOCK: u64 = 4096;

/// How MemFs answers.
#[derive(Debug, Clone, Copy)]
pub struct MemFsConfig {
    /// How long the kernel may cache attributes (0: every stat asks).
    pub attr_timeout: Duration,
    /// How long the kernel may cache name lookups (0: every path walk asks).
    pub entry_timeout: Duration,
    /// Answer opens with `FOPEN_DIRECT_IO` (no page cache: every read and
    /// write is a request).
    pub direct_io: bool,
}

impl Default for MemFsConfig {
    fn default() -> Self {
        MemFsConfig {
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            direct_io: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Times {
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

#[derive(Debug)]
struct Node {
    /// `S_IFREG`/`S_IFDIR` and permission bits.
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    times: Times,
    data: Vec<u8>,
    children: BTreeMap<Vec<u8>, u64>,
    parent: u64,
    /// The kernel's references (entries replied minus forgets).
    lookups: u64,
    opens: u64,
}

impl Node {
    fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    next_inode: u64,
}

/// An in-memory file system (see the module docs).
#[derive(Debug)]
pub struct MemFs {
    config: MemFsConfig,
    state: RwLock<State>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn now() -> SystemTime {
    SystemTime::now()
}

fn split_time(t: SystemTime) -> (i64, i64) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
        Err(_) => (0, 0),
    }
}

fn time_from(sec: i64, nsec: i64) -> SystemTime {
    if sec < 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
}

fn check_name(name: &CStr) -> io::Result<&[u8]> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    if b.len() > NAME_BYTES_MAX {
        return Err(errno(libc::ENAMETOOLONG));
    }
    Ok(b)
}

impl MemFs {
    pub fn new(config: MemFsConfig) -> MemFs {
        let t = now();
        let root = Node {
            mode: libc::S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            times: Times {
                atime: t,
                mtime: t,
                ctime: t,
            },
            data: Vec::new(),
            children: BTreeMap::new(),
            parent: ROOT,
            lookups: 0,
            opens: 0,
        };
        MemFs {
            config,
            state: RwLock::new(State {
                nodes: HashMap::from([(ROOT, root)]),
                next_inode: ROOT + 1,
            }),
        }
    }

    pub fn config(&self) -> &MemFsConfig {
        &self.config
    }

    /// Inodes alive (the root included): for tests of freeing.
    pub fn inodes(&self) -> usize {
        self.state.read().nodes.len()
    }

    fn stat_of(inode: u64, n: &Node) -> stat64 {
        // SAFETY: stat64 is plain data; all-zero is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        st.st_ino = inode;
        st.st_mode = n.mode;
        st.st_nlink = n.nlink.into();
        st.st_uid = n.uid;
        st.st_gid = n.gid;
        st.st_size = n.data.len() as i64;
        st.st_blksize = BLOCK as _;
        st.st_blocks = (n.data.len() as u64).div_ceil(512) as i64;
        (st.st_atime, st.st_atime_nsec) = split_time(n.times.atime);
        (st.st_mtime, st.st_mtime_nsec) = split_time(n.times.mtime);
        (st.st_ctime, st.st_ctime_nsec) = split_time(n.times.ctime);
        st
    }

    fn entry(&self, inode: u64, n: &Node) -> Entry {
        Entry {
            inode,
            generation: 0,
            attr: MemFs::stat_of(inode, n),
            attr_flags: 0,
            attr_timeout: self.config.attr_timeout,
            entry_timeout: self.config.entry_timeout,
        }
    }

    /// Adds a node named `name` in `parent` and returns its entry (one
    /// kernel reference taken).
    fn add(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32) -> io::Result<Entry> {
        let name = check_name(name)?;
        let mut s = self.state.write();
        let p = s.nodes.get(&parent).ok_or_else(|| errno(libc::ENOENT))?;
        if !p.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        if p.children.contains_key(name) {
            return Err(errno(libc::EEXIST));
        }
        let inode = s.next_inode;
        s.next_inode += 1;
        let t = now();
        let dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let node = Node {
            mode,
            uid: ctx.uid,
            gid: ctx.gid,
            nlink: if dir { 2 } else { 1 },
            times: Times {
                atime: t,
                mtime: t,
                ctime: t,
            },
            data: Vec::new(),
            children: BTreeMap::new(),
            parent,
            lookups: 1,
            opens: 0,
        };
        let entry = self.entry(inode, &node);
        s.nodes.insert(inode, node);
        let p = s.nodes.get_mut(&parent).expect("checked above");
        p.children.insert(name.to_vec(), inode);
        p.times.mtime = t;
        p.times.ctime = t;
        if dir {
            p.nlink += 1;
        }
        Ok(entry)
    }

    /// Removes `name` from `parent` (a directory when `dir`).
    fn remove(&self, parent: u64, name: &CStr, dir: bool) -> io::Result<()> {
        let name = check_name(name)?;
        let mut s = self.state.write();
        let p = s.nodes.get(&parent).ok_or_else(|| errno(libc::ENOENT))?;
        let inode = *p.children.get(name).ok_or_else(|| errno(libc::ENOENT))?;
        let n = &s.nodes[&inode];
        match (dir, n.is_dir()) {
            (true, false) => return Err(errno(libc::ENOTDIR)),
            (false, true) => return Err(errno(libc::EISDIR)),
            (true, true) if !n.children.is_empty() => return Err(errno(libc::ENOTEMPTY)),
            _ => {}
        }
        let t = now();
        let p = s.nodes.get_mut(&parent).expect("looked up above");
        p.children.remove(name);
        p.times.mtime = t;
        p.times.ctime = t;
        if dir {
            p.nlink -= 1;
        }
        let n = s.nodes.get_mut(&inode).expect("looked up above");
        n.nlink = if dir { 0 } else { n.nlink - 1 };
        n.times.ctime = t;
        MemFs::maybe_free(&mut s, inode);
        Ok(())
    }

    /// Frees `inode` once nothing names, references or holds it open.
    fn maybe_free(s: &mut State, inode: u64) {
        if inode == ROOT {
            return;
        }
        if let Some(n) = s.nodes.get(&inode) {
            if n.nlink == 0 && n.lookups == 0 && n.opens == 0 {
                s.nodes.remove(&inode);
            }
        }
    }

    fn open_node(&self, inode: u64, flags: u32) -> io::Result<OpenOptions> {
        let mut s = self.state.write();
        let n = s.nodes.get_mut(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        if flags & libc::O_TRUNC as u32 != 0 && !n.is_dir() {
            n.data.clear();
            let t = now();
            n.times.mtime = t;
            n.times.ctime = t;
        }
        n.opens += 1;
        Ok(if self.config.direct_io {
            OpenOptions::DIRECT_IO
        } else {
            OpenOptions::empty()
        })
    }
}

impl FileSystem for MemFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let want = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ATOMIC_O_TRUNC
            | FsOptions::PARALLEL_DIROPS;
        Ok(want & capable)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let name = name.to_bytes();
        let mut s = self.state.write();
        let p = s.nodes.get(&parent).ok_or_else(|| errno(libc::ENOENT))?;
        if !p.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let inode = match name {
            b"." => parent,
            b".." => p.parent,
            _ => *p.children.get(name).ok_or_else(|| errno(libc::ENOENT))?,
        };
        let n = s.nodes.get_mut(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        n.lookups += 1;
        Ok(self.entry(inode, n))
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        let mut s = self.state.write();
        if let Some(n) = s.nodes.get_mut(&inode) {
            n.lookups = n.lookups.saturating_sub(count);
        }
        MemFs::maybe_free(&mut s, inode);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let s = self.state.read();
        let n = s.nodes.get(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        Ok((MemFs::stat_of(inode, n), self.config.attr_timeout))
    }

    fn setattr(
        &self,
        _ctx: &Context,
        inode: u64,
        attr: stat64,
        _handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let mut s = self.state.write();
        let n = s.nodes.get_mut(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        let t = now();
        if valid.contains(SetattrValid::MODE) {
            n.mode = (n.mode & libc::S_IFMT) | (attr.st_mode & !libc::S_IFMT);
        }
        if valid.contains(SetattrValid::UID) {
            n.uid = attr.st_uid;
        }
        if valid.contains(SetattrValid::GID) {
            n.gid = attr.st_gid;
        }
        if valid.contains(SetattrValid::SIZE) {
            if n.is_dir() {
                return Err(errno(libc::EISDIR));
            }
            let size = u64::try_from(attr.st_size).map_err(|_| errno(libc::EINVAL))?;
            if size > FILE_BYTES_MAX {
                return Err(errno(libc::EFBIG));
            }
            n.data.resize(size as usize, 0);
            n.times.mtime = t;
        }
        if valid.contains(SetattrValid::ATIME_NOW) {
            n.times.atime = t;
        } else if valid.contains(SetattrValid::ATIME) {
            n.times.atime = time_from(attr.st_atime, attr.st_atime_nsec);
        }
        if valid.contains(SetattrValid::MTIME_NOW) {
            n.times.mtime = t;
        } else if valid.contains(SetattrValid::MTIME) {
            n.times.mtime = time_from(attr.st_mtime, attr.st_mtime_nsec);
        }
        n.times.ctime = t;
        Ok((MemFs::stat_of(inode, n), self.config.attr_timeout))
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        _rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(errno(libc::EPERM));
        }
        self.add(ctx, parent, name, libc::S_IFREG | (mode & 0o7777 & !umask))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.add(ctx, parent, name, libc::S_IFDIR | (mode & 0o7777 & !umask))
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.remove(parent, name, false)
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.remove(parent, name, true)
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let opts = self.open_node(inode, flags)?;
        Ok((Some(inode), opts, None))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let entry = self.add(
            ctx,
            parent,
            name,
            libc::S_IFREG | (args.mode & 0o7777 & !args.umask),
        )?;
        let opts = self.open_node(entry.inode, 0)?;
        Ok((entry, Some(entry.inode), opts, None))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let s = self.state.read();
        let n = s.nodes.get(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        if n.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        let len = n.data.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let end = len.min(offset + u64::from(size));
        let bytes = &n.data[offset as usize..end as usize];
        w.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn write(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        let end = offset
            .checked_add(u64::from(size))
            .filter(|&e| e <= FILE_BYTES_MAX)
            .ok_or_else(|| errno(libc::EFBIG))?;
        // Read the payload before taking the lock.
        let mut buf = vec![0u8; size as usize];
        r.read_exact(&mut buf)?;
        let mut s = self.state.write();
        let n = s.nodes.get_mut(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        if n.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        if n.data.len() < end as usize {
            n.data.resize(end as usize, 0);
        }
        n.data[offset as usize..end as usize].copy_from_slice(&buf);
        let t = now();
        n.times.mtime = t;
        n.times.ctime = t;
        Ok(buf.len())
    }

    fn flush(&self, _ctx: &Context, _inode: u64, _handle: u64, _lock_owner: u64) -> io::Result<()> {
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, _inode: u64, _datasync: bool, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn release(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
        _handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let mut s = self.state.write();
        if let Some(n) = s.nodes.get_mut(&inode) {
            n.opens = n.opens.saturating_sub(1);
        }
        MemFs::maybe_free(&mut s, inode);
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        let s = self.state.read();
        let used: u64 = s
            .nodes
            .values()
            .map(|n| (n.data.len() as u64).div_ceil(BLOCK))
            .sum();
        let blocks = FILE_BYTES_MAX / BLOCK * 4;
        // SAFETY: statvfs64 is plain data; all-zero is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = BLOCK;
        st.f_frsize = BLOCK;
        st.f_blocks = blocks;
        st.f_bfree = blocks.saturating_sub(used);
        st.f_bavail = st.f_bfree;
        st.f_files = 1 << 20;
        st.f_ffree = (1u64 << 20).saturating_sub(s.nodes.len() as u64);
        st.f_favail = st.f_ffree;
        st.f_namemax = NAME_BYTES_MAX as u64;
        Ok(st)
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let s = self.state.read();
        let n = s.nodes.get(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        if !n.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        Ok((Some(inode), OpenOptions::empty()))
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let s = self.state.read();
        let n = s.nodes.get(&inode).ok_or_else(|| errno(libc::ENOENT))?;
        if !n.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        // Offsets: 1 after ".", 2 after "..", 3 + i after the i-th child
        // (children in name order; a listing sees a stable order).
        let dots: [(&[u8], u64); 2] = [(b".", inode), (b"..", n.parent)];
        let children = n.children.iter().map(|(name, &ino)| (name.as_slice(), ino));
        for (i, (name, ino)) in dots.into_iter().chain(children).enumerate() {
            let next = i as u64 + 1;
            if next <= offset {
                continue;
            }
            let type_ = match s.nodes.get(&ino) {
                Some(c) if c.is_dir() => libc::DT_DIR,
                _ => libc::DT_REG,
            };
            let dirent = DirEntry {
                ino,
                offset: next,
                type_: u32::from(type_),
                name,
            };
            if add_entry(dirent)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn access(&self, _ctx: &Context, inode: u64, _mask: u32) -> io::Result<()> {
        if self.state.read().nodes.contains_key(&inode) {
            Ok(())
        } else {
            Err(errno(libc::ENOENT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::file_traits::FileReadWriteVolatile;

    struct Sink(Vec<u8>);
    impl io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl ZeroCopyWriter for Sink {
        fn write_from(
            &mut self,
            _f: &mut dyn FileReadWriteVolatile,
            _count: usize,
            _off: u64,
        ) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
        fn available_bytes(&self) -> usize {
            usize::MAX
        }
    }

    struct Source<'a>(&'a [u8]);
    impl io::Read for Source<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            io::Read::read(&mut self.0, b)
        }
    }
    impl ZeroCopyReader for Source<'_> {
        fn read_to(
            &mut self,
            _f: &mut dyn FileReadWriteVolatile,
            _count: usize,
            _off: u64,
        ) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }

    fn name(s: &str) -> std::ffi::CString {
        std::ffi::CString::new(s).unwrap()
    }

    fn create(fs: &MemFs, parent: u64, n: &str) -> u64 {
        let args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: 0o644,
            umask: 0o022,
            fuse_flags: 0,
        };
        let (entry, handle, _, _) = fs.create(&Context::new(), parent, &name(n), args).unwrap();
        assert_eq!(handle, Some(entry.inode));
        entry.inode
    }

    fn write(fs: &MemFs, inode: u64, offset: u64, data: &[u8]) -> usize {
        let mut src = Source(data);
        let ctx = Context::new();
        fs.write(
            &ctx,
            inode,
            inode,
            &mut src,
            data.len() as u32,
            offset,
            None,
            false,
            0,
            0,
        )
        .unwrap()
    }

    fn read(fs: &MemFs, inode: u64, offset: u64, size: u32) -> Vec<u8> {
        let mut sink = Sink(Vec::new());
        let ctx = Context::new();
        let n = fs
            .read(&ctx, inode, inode, &mut sink, size, offset, None, 0)
            .unwrap();
        assert_eq!(n, sink.0.len());
        sink.0
    }

    fn names(fs: &MemFs, dir: u64, from: u64) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        fs.readdir(&Context::new(), dir, dir, 4096, from, &mut |e| {
            out.push((String::from_utf8_lossy(e.name).into_owned(), e.offset));
            Ok(1)
        })
        .unwrap();
        out
    }

    fn err(r: io::Result<impl std::fmt::Debug>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    #[test]
    fn files_are_created_written_read_and_stat_ed() {
        let fs = MemFs::new(MemFsConfig::default());
        let ctx = Context::new();
        let ino = create(&fs, ROOT, "a");
        assert_eq!(write(&fs, ino, 0, b"hello"), 5);
        assert_eq!(write(&fs, ino, 8, b"xy"), 2);
        assert_eq!(read(&fs, ino, 0, 100), b"hello\0\0\0xy");
        assert_eq!(read(&fs, ino, 3, 2), b"lo");
        assert!(read(&fs, ino, 50, 10).is_empty());
        let (st, t) = fs.getattr(&ctx, ino, None).unwrap();
        assert_eq!(t, Duration::from_secs(1));
        assert_eq!(st.st_size, 10);
        assert_eq!(st.st_mode, libc::S_IFREG | 0o644);
        assert_eq!(st.st_ino, ino);
        let e = fs.lookup(&ctx, ROOT, &name("a")).unwrap();
        assert_eq!(e.inode, ino);
        assert_eq!(err(fs.lookup(&ctx, ROOT, &name("b"))), libc::ENOENT);
        assert_eq!(
            err(fs.mkdir(&ctx, ROOT, &name("a"), 0o755, 0)),
            libc::EEXIST
        );
        let sfs = fs.statfs(&ctx, ROOT).unwrap();
        assert_eq!(sfs.f_namemax, 255);
        assert!(sfs.f_bfree < sfs.f_blocks);
    }

    #[test]
    fn setattr_truncates_extends_and_changes_mode() {
        let fs = MemFs::new(MemFsConfig::default());
        let ctx = Context::new();
        let ino = create(&fs, ROOT, "f");
        write(&fs, ino, 0, b"0123456789");
        // SAFETY: plain data.
        let mut attr: stat64 = unsafe { std::mem::zeroed() };
        attr.st_size = 4;
        attr.st_mode = 0o600;
        let (st, _) = fs
            .setattr(
                &ctx,
                ino,
                attr,
                None,
                SetattrValid::SIZE | SetattrValid::MODE,
            )
            .unwrap();
        assert_eq!(st.st_size, 4);
        assert_eq!(st.st_mode, libc::S_IFREG | 0o600);
        assert_eq!(read(&fs, ino, 0, 100), b"0123");
        attr.st_size = 6;
        fs.setattr(&ctx, ino, attr, None, SetattrValid::SIZE)
            .unwrap();
        assert_eq!(read(&fs, ino, 0, 100), b"0123\0\0");
        // O_TRUNC on open empties the file.
        fs.open(&ctx, ino, libc::O_TRUNC as u32, 0).unwrap();
        assert!(read(&fs, ino, 0, 100).is_empty());
    }

    #[test]
    fn directories_list_and_remove_in_order() {
        let fs = MemFs::new(MemFsConfig::default());
        let ctx = Context::new();
        let d = fs.mkdir(&ctx, ROOT, &name("d"), 0o755, 0o022).unwrap();
        assert_eq!(d.attr.st_mode, libc::S_IFDIR | 0o755);
        assert_eq!(fs.getattr(&ctx, ROOT, None).unwrap().0.st_nlink, 3);
        create(&fs, d.inode, "b");
        create(&fs, d.inode, "a");
        let e = fs
            .mknod(&ctx, d.inode, &name("c"), libc::S_IFREG | 0o600, 0, 0)
            .unwrap();
        assert_eq!(e.attr.st_mode, libc::S_IFREG | 0o600);
        assert_eq!(
            err(fs.mknod(&ctx, d.inode, &name("p"), libc::S_IFIFO | 0o600, 0, 0)),
            libc::EPERM
        );
        let all = names(&fs, d.inode, 0);
        let got: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(got, [".", "..", "a", "b", "c"]);
        // Resuming from an entry's offset continues after it.
        let rest = names(&fs, d.inode, all[2].1);
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].0, "b");
        assert_eq!(err(fs.rmdir(&ctx, ROOT, &name("d"))), libc::ENOTEMPTY);
        assert_eq!(err(fs.unlink(&ctx, ROOT, &name("d"))), libc::EISDIR);
        assert_eq!(err(fs.rmdir(&ctx, d.inode, &name("a"))), libc::ENOTDIR);
        for n in ["a", "b", "c"] {
            fs.unlink(&ctx, d.inode, &name(n)).unwrap();
        }
        fs.rmdir(&ctx, ROOT, &name("d")).unwrap();
        assert_eq!(fs.getattr(&ctx, ROOT, None).unwrap().0.st_nlink, 2);
        assert_eq!(names(&fs, ROOT, 0).len(), 2);
    }

    #[test]
    fn unlinked_inodes_live_until_forgotten_and_closed() {
        let fs = MemFs::new(MemFsConfig::default());
        let ctx = Context::new();
        let ino = create(&fs, ROOT, "f"); // one lookup, one open
        write(&fs, ino, 0, b"data");
        fs.unlink(&ctx, ROOT, &name("f")).unwrap();
        assert_eq!(fs.inodes(), 2);
        assert_eq!(
            read(&fs, ino, 0, 10),
            b"data",
            "open after unlink still reads"
        );
        fs.release(&ctx, ino, 0, ino, false, false, None).unwrap();
        assert_eq!(fs.inodes(), 2, "the kernel still references it");
        fs.forget(&ctx, ino, 1);
        assert_eq!(fs.inodes(), 1);
        assert_eq!(err(fs.getattr(&ctx, ino, None)), libc::ENOENT);
    }

    #[test]
    fn timeouts_and_direct_io_follow_the_config() {
        let fs = MemFs::new(MemFsConfig {
            attr_timeout: Duration::ZERO,
            entry_timeout: Duration::from_millis(5),
            direct_io: true,
        });
        let ctx = Context::new();
        let args = CreateIn {
            flags: 0,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let (e, _, opts, _) = fs.create(&ctx, ROOT, &name("f"), args).unwrap();
        assert_eq!(e.attr_timeout, Duration::ZERO);
        assert_eq!(e.entry_timeout, Duration::from_millis(5));
        assert_eq!(opts, OpenOptions::DIRECT_IO);
        let (_, opts, _) = fs.open(&ctx, e.inode, 0, 0).unwrap();
        assert_eq!(opts, OpenOptions::DIRECT_IO);
        assert_eq!(fs.getattr(&ctx, e.inode, None).unwrap().1, Duration::ZERO);
        assert_eq!(err(fs.lookup(&ctx, ROOT, &name("a/b"))), libc::ENOENT);
        assert_eq!(
            err(fs.mkdir(&ctx, ROOT, &name("a/b"), 0o755, 0)),
            libc::EINVAL
        );
    }

    /// Unmounts (lazily) and joins the channels when dropped, so a failing
    /// test never leaves a mount behind.
    struct Mounted {
        path: std::path::PathBuf,
        served: Option<crate::serve::Served>,
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = crate::kernel::unmount(&self.path, nix::mount::MntFlags::MNT_DETACH);
            if let Some(s) = self.served.take() {
                s.join();
            }
        }
    }

    fn can_mount() -> bool {
        nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/fuse").exists()
    }

    #[test]
    fn a_real_mount_creates_writes_reads_and_stats() {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::MetadataExt;
        if !can_mount() {
            eprintln!("skipped: mounting FUSE needs root and /dev/fuse");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fs = std::sync::Arc::new(MemFs::new(MemFsConfig {
            attr_timeout: Duration::ZERO,
            entry_timeout: Duration::ZERO,
            direct_io: true,
        }));
        for mode in [
            crate::channel::ChannelMode::Fuse,
            crate::channel::ChannelMode::Xfuse,
        ] {
            let kernel = std::sync::Arc::new(
                crate::kernel::KernelSession::mount(
                    dir.path(),
                    &crate::kernel::MountOptions {
                        fsname: "r3fs-memfs-test",
                        allow_other: false,
                    },
                )
                .unwrap(),
            );
            // Declared before any file on the mount, so dropped after them.
            let mut guard = Mounted {
                path: dir.path().to_path_buf(),
                served: None,
            };
            let options = crate::serve::ChannelOptions {
                mode,
                threads: 2,
                fuse_ratio: None,
                spin: Default::default(),
            };
            guard.served = Some(
                crate::serve::Served::start(fs.clone(), kernel, &options, Default::default())
                    .unwrap(),
            );
            let path = dir.path().join(format!("file-{mode}"));
            {
                let mut f = std::fs::OpenOptions::new()
                    .create_new(true)
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                f.write_all(b"through the kernel").unwrap();
                f.rewind().unwrap();
                let mut back = String::new();
                f.read_to_string(&mut back).unwrap();
                assert_eq!(back, "through the kernel");
                assert_eq!(f.metadata().unwrap().len(), 18);
            }
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), 18);
            assert_eq!(meta.mode() & 0o777, 0o644 & !nix_umask());
            assert!(std::fs::read_dir(dir.path())
                .unwrap()
                .any(|e| e.unwrap().file_name() == *format!("file-{mode}")));
            std::fs::create_dir(dir.path().join("sub")).unwrap();
            std::fs::remove_dir(dir.path().join("sub")).unwrap();
            let c = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid path and a zeroed out-parameter.
            let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut sv) }, 0);
            assert_eq!(sv.f_namemax, 255);
            // Unmount for real (not lazily): nothing is open any more.
            crate::kernel::unmount(dir.path(), nix::mount::MntFlags::empty()).unwrap();
            assert_eq!(guard.served.take().unwrap().join(), None);
        }
        // The data outlived the mounts (same MemFs), and nothing is left
        // mounted on the directory.
        assert!(!std::fs::read_dir(dir.path()).unwrap().any(|_| true));
        assert_eq!(fs.state.read().nodes[&ROOT].children.len(), 2);
    }

    /// The process umask, read without changing it (tests run in parallel).
    fn nix_umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
    }
}
