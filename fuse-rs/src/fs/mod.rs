//! [`R3fs`]: the `FileSystem` fuse-backend-rs dispatches to, answering each
//! kernel request with meta (namespace, attributes, sessions, locks) and
//! storage (file bytes).
//!
//! Each kernel request runs on a channel worker thread, which blocks on the
//! async clients through the runtime handle. Submodules hold one family of
//! operations each; the trait impl here only forwards.
//!
//! Consistency: close-to-open. `open` drops the kernel's cached pages
//! (no `FOPEN_KEEP_CACHE`) and attributes, `flush` (every `close`) makes
//! the written length and mtime durable in meta, so a file closed on one
//! mount is read whole after an open on another. Directory changes of other
//! mounts are seen after the entry timeout.
//!
//! Must not own kernel channels or the mount; `channel` and `kernel` do.

mod dir;
mod file;
mod lock;
mod namespace;
mod xattr;

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use parking_lot::Mutex;
use r3fs_client::meta::{MetaClient, MetaClientError};
use r3fs_client::storage::{StorageClient, StorageClientError};
use r3fs_wire::meta::{Attr, FileType, Time, User};

use crate::channel::Interrupts;
use crate::creds::Credentials;
use crate::inodes::InodeTable;
use crate::kernel::KernelSession;

pub use file::HINT_INTERVAL;

/// Timeouts the kernel caches our answers for.
#[derive(Debug, Clone)]
pub struct CacheTimeouts {
    pub attr: Duration,
    pub entry: Duration,
    pub negative: Duration,
}

/// The file system a mount serves.
pub struct R3fs {
    rt: tokio::runtime::Handle,
    meta: MetaClient,
    storage: StorageClient,
    timeouts: CacheTimeouts,
    writeback_cache: bool,
    creds: Credentials,
    inodes: InodeTable,
    files: file::OpenFiles,
    dirs: dir::DirHandles,
    locks: lock::LockOwners,
    interrupts: Arc<Interrupts>,
    kernel: OnceLock<Arc<KernelSession>>,
    handle_next: AtomicU64,
}

impl R3fs {
    pub fn new(
        rt: tokio::runtime::Handle,
        meta: MetaClient,
        storage: StorageClient,
        timeouts: CacheTimeouts,
        writeback_cache: bool,
        interrupts: Arc<Interrupts>,
        lock_waiters_max: usize,
    ) -> R3fs {
        R3fs {
            rt,
            meta,
            storage,
            timeouts,
            writeback_cache,
            creds: Credentials::default(),
            inodes: InodeTable::default(),
            files: file::OpenFiles::default(),
            dirs: dir::DirHandles::default(),
            locks: lock::LockOwners::new(lock_waiters_max),
            interrupts,
            kernel: OnceLock::new(),
            handle_next: AtomicU64::new(1),
        }
    }

    /// Lets the file system send the kernel notifications (cache
    /// invalidation) once the mount exists.
    pub fn attach_kernel(&self, kernel: Arc<KernelSession>) {
        let _ = self.kernel.set(kernel);
    }

    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// Inodes the kernel holds references to.
    pub fn kernel_inodes(&self) -> usize {
        self.inodes.len()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn user(&self, ctx: &Context) -> User {
        self.creds.user(ctx.uid, ctx.gid, ctx.pid)
    }

    fn next_handle(&self) -> u64 {
        self.handle_next.fetch_add(1, Ordering::Relaxed)
    }

    /// An entry reply for `attr`, counting one kernel lookup.
    fn entry(&self, attr: &Attr) -> Entry {
        self.inodes.remember(attr.inode);
        Entry {
            inode: attr.inode,
            generation: 0,
            attr: self.stat(attr),
            attr_flags: 0,
            attr_timeout: self.timeouts.attr,
            entry_timeout: self.timeouts.entry,
        }
    }

    /// `stat` of `attr`, with the length this mount has written but not yet
    /// reported to meta.
    fn stat(&self, attr: &Attr) -> stat64 {
        let size = self.files.visible_size(attr);
        to_stat(attr, size)
    }

    /// Forgets the kernel's cached attributes of `inode` (not its pages).
    fn invalidate_attr(&self, inode: u64) {
        if let Some(k) = self.kernel.get() {
            if let Err(e) = k.notify_inval_inode(inode, false) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::debug!(inode, error = %e, "attribute invalidation failed");
                }
            }
        }
    }
}

/// A meta failure as the errno the caller gets. Refusals (ENOENT, EACCES,
/// ...) are normal; transport failures are logged, as they mean the cluster
/// is in trouble.
fn meta_error(op: &'static str, e: MetaClientError) -> io::Error {
    let errno = e.errno();
    match e {
        MetaClientError::Errno { .. } => {
            tracing::debug!(op, errno, error = %e, "meta refused");
            io::Error::from_raw_os_error(errno)
        }
        _ => {
            tracing::warn!(op, error = %e, "meta call failed; answering EIO");
            io::Error::from_raw_os_error(libc::EIO)
        }
    }
}

/// A storage failure as the errno the caller gets: ENOSPC and EINVAL pass
/// through, everything else (a chain down past all retries, checksums on
/// every replica, timeouts) is EIO with a log line naming the inode.
fn storage_error(op: &'static str, inode: u64, e: StorageClientError) -> io::Error {
    let errno = match e.errno() {
        libc::ENOSPC => libc::ENOSPC,
        libc::EINVAL => libc::EINVAL,
        _ => libc::EIO,
    };
    tracing::warn!(op, inode, errno, error = %e, "storage call failed");
    io::Error::from_raw_os_error(errno)
}

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

fn name_bytes(name: &CStr) -> Vec<u8> {
    name.to_bytes().to_vec()
}

fn to_stat(attr: &Attr, size: u64) -> stat64 {
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_ino = attr.inode;
    st.st_mode = attr.mode();
    st.st_nlink = attr.nlink as _;
    st.st_uid = attr.uid;
    st.st_gid = attr.gid;
    st.st_rdev = attr.rdev as _;
    st.st_size = size as i64;
    st.st_blksize = attr
        .layout
        .as_ref()
        .map(|l| l.chunk_size.min(1 << 20))
        .unwrap_or(4096) as _;
    st.st_blocks = size.div_ceil(512) as i64;
    set_time(&mut st.st_atime, &mut st.st_atime_nsec, attr.atime);
    set_time(&mut st.st_mtime, &mut st.st_mtime_nsec, attr.mtime);
    set_time(&mut st.st_ctime, &mut st.st_ctime_nsec, attr.ctime);
    st
}

fn set_time(sec: &mut i64, nsec: &mut i64, t: Time) {
    *sec = t.sec;
    *nsec = i64::from(t.nsec);
}

/// `d_type` of a directory entry.
fn dirent_type(t: FileType) -> u32 {
    t.mode_bits() >> 12
}

impl FileSystem for R3fs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ATOMIC_O_TRUNC
            | FsOptions::POSIX_LOCKS
            | FsOptions::FLOCK_LOCKS
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::HANDLE_KILLPRIV;
        if self.writeback_cache {
            want |= FsOptions::WRITEBACK_CACHE;
        }
        let got = want & capable;
        tracing::info!(offered = ?capable, using = ?got, "FUSE INIT");
        Ok(got)
    }

    fn destroy(&self) {
        tracing::info!("FUSE DESTROY: the kernel is done with this mount");
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.do_lookup(ctx, parent, name)
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        self.inodes.forget(inode, count);
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.inodes.forget(inode, count);
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let attr = self
            .block_on(self.meta.getattr(inode))
            .map_err(|e| meta_error("getattr", e))?;
        self.files.observe(&attr);
        Ok((self.stat(&attr), self.timeouts.attr))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.do_setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.block_on(self.meta.readlink(inode))
            .map_err(|e| meta_error("readlink", e))
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.do_symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.do_mknod(ctx, parent, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.do_mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.do_unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.do_rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.do_rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.do_link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.do_open(ctx, inode, flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.do_create(ctx, parent, name, args)
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let data = self.do_read(inode, handle, size, offset)?;
        w.write_all(&data)?;
        Ok(data.len())
    }

    fn write(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        let mut data = vec![0u8; size as usize];
        r.read_exact(&mut data)?;
        self.do_write(inode, handle, data, offset)
    }

    fn flush(&self, _ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.do_flush(inode, handle, lock_owner)
    }

    fn fsync(&self, _ctx: &Context, inode: u64, _datasync: bool, handle: u64) -> io::Result<()> {
        self.do_fsync(inode, handle)
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.do_fallocate(inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.do_release(inode, handle, flock_release, lock_owner)
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        let s = self
            .block_on(self.meta.statfs())
            .map_err(|e| meta_error("statfs", e))?;
        const BLOCK: u64 = 4096;
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = BLOCK as _;
        st.f_frsize = BLOCK as _;
        st.f_blocks = s.capacity_bytes / BLOCK;
        st.f_bfree = s.free_bytes / BLOCK;
        st.f_bavail = s.free_bytes / BLOCK;
        st.f_files = s.inodes_used + (1 << 32);
        st.f_ffree = 1 << 32;
        st.f_favail = 1 << 32;
        st.f_namemax = s.name_bytes_max as _;
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.do_setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.do_getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.do_listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.do_removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.do_opendir(ctx, inode)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.do_readdir(ctx, inode, handle, offset, &mut |e, _| add_entry(e), false)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.do_readdir(ctx, inode, handle, offset, add_entry, true)
    }

    fn fsyncdir(
        &self,
        _ctx: &Context,
        _inode: u64,
        _datasync: bool,
        _handle: u64,
    ) -> io::Result<()> {
        // Every namespace change is a committed (fsynced) transaction by the
        // time meta answers it; there is nothing left to sync.
        Ok(())
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.dirs.remove(handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let user = self.user(ctx);
        self.block_on(self.meta.access(&user, inode, mask))
            .map_err(|e| meta_error("access", e))
    }

    fn lseek(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.do_lseek(inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.do_getlk(inode, owner, lock, flags)
    }

    fn setlk(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.do_setlk(inode, owner, lock, flags)
    }

    fn setlkw(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.do_setlk(inode, owner, lock, flags)
    }
}

/// Shared bookkeeping for handle tables keyed by `fh`.
pub(crate) struct HandleMap<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
}

impl<T> Default for HandleMap<T> {
    fn default() -> Self {
        HandleMap {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<T> HandleMap<T> {
    pub fn insert(&self, fh: u64, value: T) -> Arc<T> {
        let v = Arc::new(value);
        let old = self.map.lock().insert(fh, v.clone());
        assert!(old.is_none(), "file handle {fh} handed out twice");
        v
    }
    pub fn get(&self, fh: u64) -> io::Result<Arc<T>> {
        self.map
            .lock()
            .get(&fh)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }
    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.map.lock().remove(&fh)
    }
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
}
