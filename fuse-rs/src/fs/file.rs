//! Open files: handles, the per-inode write buffer and written length, and
//! open, create, read, write, flush, fsync, release, fallocate and lseek.
//!
//! Length: storage holds the bytes, meta the length. A writer knows the
//! length it reached (`written_end`, under the file's truncate version) and
//! tells meta on flush (every close), fsync, release and every
//! [`HINT_INTERVAL`] while dirty; until then this mount reports the larger
//! of meta's length and its own.
//!
//! Write-behind: a full buffer (or a 1 MiB kernel write) is sent to storage
//! in the background and `write()` returns; up to [`WRITES_IN_FLIGHT_MAX`]
//! such writes run per file, so one sequential writer keeps several chunk
//! writes in flight. A write that overlaps one in flight waits for it
//! first (storage applies writes to a chunk in arrival order). Read, flush,
//! fsync, truncate, fallocate and lseek wait for every write in flight; a
//! failure is reported by the next write, flush or fsync of the file, as
//! with a page cache.
//!
//! # Limits
//! One write buffer of [`WRITE_BUFFER_BYTES_MAX`] per open inode and
//! [`WRITES_IN_FLIGHT_MAX`] background writes per open inode.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fuse_backend_rs::abi::fuse_abi::{CreateIn, OpenOptions};
use fuse_backend_rs::api::filesystem::{Context, Entry};
use parking_lot::Mutex;
use r3fs_wire::meta::{
    Attr, CloseRequest, CreateRequest, FileType, Layout, LengthHint, OpenFlags, SetAttrRequest,
    SyncRequest,
};

use super::{errno, meta_error, name_bytes, storage_error, HandleMap, R3fs};
use crate::write_buffer::{WriteBuffer, WRITE_BUFFER_BYTES_MAX};

/// Background storage writes per open file.
pub const WRITES_IN_FLIGHT_MAX: usize = 8;

/// How often a dirty file's length is reported to meta while it stays open.
pub const HINT_INTERVAL: Duration = Duration::from_secs(5);

const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
const SEEK_DATA: u32 = 3;
const SEEK_HOLE: u32 = 4;

/// A storage write running in the background: `write()` returned once it
/// started; flush, fsync, read and truncate wait for it.
struct InFlight {
    start: u64,
    end: u64,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

/// One `open()` of a file: which inode, how it was opened, its meta session.
pub(crate) struct FileHandle {
    pub write: bool,
    pub direct: bool,
    pub session: Option<u64>,
    pub file: Arc<OpenFile>,
}

/// A regular file open at least once on this mount.
///
/// Two locks: `io` (write buffer, writes in flight) is held across storage
/// calls; `sizes` (lengths, hint state) only for a few instructions, so a
/// stat never waits for a write. Lock order: `io`, then `sizes`, never the
/// other way.
pub(crate) struct OpenFile {
    pub inode: u64,
    pub layout: Layout,
    io: Mutex<IoState>,
    sizes: Mutex<Sizes>,
}

struct IoState {
    buffer: WriteBuffer,
    /// Storage writes started and not yet waited for (write-behind).
    inflight: Vec<InFlight>,
    /// A write failed after its `write()` returned; the next write,
    /// flush or fsync reports it.
    error: Option<i32>,
}

struct Sizes {
    truncate_ver: u64,
    /// The length meta last told us.
    meta_size: u64,
    /// The end of this mount's writes under `truncate_ver` (0 if none).
    written_end: u64,
    /// `written_end` or `touched` changed since meta last heard.
    hint_pending: bool,
    touched: bool,
    /// Bumped by every write, so a hint answer does not clear newer news.
    write_gen: u64,
    opens: u32,
}

impl Sizes {
    fn size(&self) -> u64 {
        self.meta_size.max(self.written_end)
    }

    /// Adopts what meta says; a newer truncate version (another handle or
    /// mount truncated) makes our written length obsolete.
    fn observe(&mut self, attr: &Attr) {
        if attr.truncate_ver > self.truncate_ver {
            self.truncate_ver = attr.truncate_ver;
            self.written_end = 0;
        }
        if attr.truncate_ver == self.truncate_ver {
            self.meta_size = attr.size;
        }
    }

    fn hint(&self) -> Option<LengthHint> {
        (self.written_end > 0).then_some(LengthHint {
            length: self.written_end,
            truncate_ver: self.truncate_ver,
        })
    }

    /// A write reached `end`.
    fn wrote(&mut self, end: u64) {
        self.written_end = self.written_end.max(end);
        self.hint_pending = true;
        self.touched = true;
        self.write_gen += 1;
    }
}

/// Closes meta could not take, kept for the periodic report to retry.
pub const OWED_CLOSES_MAX: usize = 65536;

#[derive(Default)]
pub(crate) struct OpenFiles {
    by_inode: Mutex<HashMap<u64, Arc<OpenFile>>>,
    handles: HandleMap<FileHandle>,
    owed: Mutex<Vec<CloseRequest>>,
}

impl OpenFiles {
    fn attach(&self, attr: &Attr) -> io::Result<Arc<OpenFile>> {
        let layout = attr.layout.clone().ok_or_else(|| {
            tracing::error!(inode = attr.inode, "regular file without a layout");
            errno(libc::EIO)
        })?;
        let mut map = self.by_inode.lock();
        let file = map
            .entry(attr.inode)
            .or_insert_with(|| {
                Arc::new(OpenFile {
                    inode: attr.inode,
                    layout,
                    io: Mutex::new(IoState {
                        buffer: WriteBuffer::new(WRITE_BUFFER_BYTES_MAX),
                        inflight: Vec::new(),
                        error: None,
                    }),
                    sizes: Mutex::new(Sizes {
                        truncate_ver: attr.truncate_ver,
                        meta_size: attr.size,
                        written_end: 0,
                        hint_pending: false,
                        touched: false,
                        write_gen: 0,
                        opens: 0,
                    }),
                })
            })
            .clone();
        let mut sz = file.sizes.lock();
        sz.opens += 1;
        sz.observe(attr);
        drop(sz);
        Ok(file)
    }

    fn detach(&self, file: &Arc<OpenFile>) {
        let mut map = self.by_inode.lock();
        let mut sz = file.sizes.lock();
        assert!(sz.opens > 0, "detach of inode {} with no opens", file.inode);
        sz.opens -= 1;
        if sz.opens == 0 {
            map.remove(&file.inode);
        }
    }

    fn get(&self, inode: u64) -> Option<Arc<OpenFile>> {
        self.by_inode.lock().get(&inode).cloned()
    }

    pub fn handle(&self, fh: u64) -> io::Result<Arc<FileHandle>> {
        self.handles.get(fh)
    }

    pub fn layout(&self, inode: u64) -> Option<Layout> {
        self.get(inode).map(|f| f.layout.clone())
    }

    /// The size to show for `attr`: meta's, or more if this mount wrote
    /// past it under the same truncate version.
    pub fn visible_size(&self, attr: &Attr) -> u64 {
        match self.get(attr.inode) {
            Some(f) => {
                let sz = f.sizes.lock();
                if sz.truncate_ver == attr.truncate_ver {
                    attr.size.max(sz.written_end)
                } else {
                    attr.size
                }
            }
            None => attr.size,
        }
    }

    pub fn observe(&self, attr: &Attr) {
        if let Some(f) = self.get(attr.inode) {
            f.sizes.lock().observe(attr);
        }
    }

    /// After this mount truncated: meta's answer is the whole truth.
    pub fn truncated(&self, attr: &Attr) {
        if let Some(f) = self.get(attr.inode) {
            {
                let mut sz = f.sizes.lock();
                sz.truncate_ver = attr.truncate_ver;
                sz.meta_size = attr.size;
                sz.written_end = 0;
            }
            f.io.lock().buffer.clip(attr.size);
        }
    }

    pub fn clip_buffer(&self, inode: u64, length: u64) {
        if let Some(f) = self.get(inode) {
            f.io.lock().buffer.clip(length);
        }
    }

    /// Writes out `inode`'s buffered bytes, if it is open here.
    pub fn flush_inode(&self, fs: &R3fs, inode: u64) -> io::Result<()> {
        match self.get(inode) {
            Some(f) => {
                let mut io = f.io.lock();
                fs.flush_writes(&f, &mut io)
            }
            None => Ok(()),
        }
    }

    fn owe(&self, req: CloseRequest) {
        let mut owed = self.owed.lock();
        if owed.len() >= OWED_CLOSES_MAX {
            let lost = owed.remove(0);
            tracing::error!(
                inode = lost.inode,
                "too many closes owed to meta; the oldest is dropped (its length may be lost)"
            );
        }
        owed.push(req);
    }

    fn all(&self) -> Vec<Arc<OpenFile>> {
        self.by_inode.lock().values().cloned().collect()
    }

    /// Open handles on this mount.
    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }
}

/// What meta's open flags are for kernel open flags `flags`.
fn open_flags(flags: u32) -> (OpenFlags, bool) {
    let acc = flags as i32 & libc::O_ACCMODE;
    let read = acc == libc::O_RDONLY || acc == libc::O_RDWR;
    let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
    let truncate = flags as i32 & libc::O_TRUNC != 0;
    (
        OpenFlags {
            read,
            write: write || truncate,
            truncate: false,
            hold: true,
        },
        truncate,
    )
}

impl R3fs {
    pub(super) fn do_open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let user = self.user(ctx);
        let (meta_flags, truncate) = open_flags(flags);
        let resp = self
            .block_on(self.meta.open(&user, inode, meta_flags))
            .map_err(|e| meta_error("open", e))?;
        if resp.attr.file_type != FileType::Regular {
            // Directories come through opendir; special files are the
            // kernel's. Anything else here has nothing for us to serve.
            return Ok((None, OpenOptions::empty(), None));
        }
        let (fh, _) = self.open_handle(&resp.attr, resp.session, flags, truncate)?;
        self.invalidate_attr(inode);
        Ok((Some(fh), open_options(flags), None))
    }

    pub(super) fn do_create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let (meta_flags, truncate) = open_flags(args.flags);
        let req = CreateRequest {
            user: self.user(ctx),
            parent,
            name: name_bytes(name),
            perm: args.mode & !args.umask & 0o7777,
            exclusive: args.flags as i32 & libc::O_EXCL != 0,
            flags: meta_flags,
            client: 0,
        };
        let resp = self
            .block_on(self.meta.create(req))
            .map_err(|e| meta_error("create", e))?;
        let truncate = truncate && !resp.created;
        let (fh, attr) = self.open_handle(&resp.attr, resp.session, args.flags, truncate)?;
        Ok((self.entry(&attr), Some(fh), open_options(args.flags), None))
    }

    /// Registers a handle for a file meta just opened; truncates it first
    /// for O_TRUNC (storage before meta, see `do_setattr`). Returns the
    /// handle and the file's attributes after the open.
    fn open_handle(
        &self,
        attr: &Attr,
        session: Option<u64>,
        flags: u32,
        truncate: bool,
    ) -> io::Result<(u64, Attr)> {
        // The kernel sends no RELEASE for a failed open: every error path
        // here closes the meta session itself.
        let file = match self.files.attach(attr) {
            Ok(f) => f,
            Err(e) => {
                self.close_session(attr.inode, session);
                return Err(e);
            }
        };
        let attr = match truncate {
            false => attr.clone(),
            true => match self.truncate_open_file(&file) {
                Ok(new) => new,
                Err(e) => {
                    self.close_session(file.inode, session);
                    self.files.detach(&file);
                    return Err(e);
                }
            },
        };
        let handle = FileHandle {
            write: open_flags(flags).0.write,
            direct: flags as i32 & libc::O_DIRECT != 0,
            session,
            file,
        };
        let fh = self.next_handle();
        self.files.handles.insert(fh, handle);
        Ok((fh, attr))
    }

    fn truncate_open_file(&self, file: &OpenFile) -> io::Result<Attr> {
        self.truncate_storage(file.inode, 0)?;
        let req = SetAttrRequest {
            user: r3fs_wire::meta::User::root(),
            inode: file.inode,
            perm: None,
            uid: None,
            gid: None,
            size: Some(0),
            atime: None,
            mtime: None,
            via_write_handle: true,
        };
        // The open already checked write permission; the size change is
        // made as the opener's write handle.
        let new = self
            .block_on(self.meta.setattr(req))
            .map_err(|e| meta_error("open(O_TRUNC)", e))?;
        self.files.truncated(&new);
        Ok(new)
    }

    fn close_session(&self, inode: u64, session: Option<u64>) {
        let req = CloseRequest {
            inode,
            session,
            hint: None,
            touched: false,
        };
        self.close_or_owe(req);
    }

    /// Sends a close to meta; if meta cannot take it now, it is owed and
    /// retried by the periodic report (a lost close would lose the file's
    /// length and leave its session behind).
    fn close_or_owe(&self, req: CloseRequest) {
        if let Err(e) = self.block_on(self.meta.close(req.clone())) {
            tracing::warn!(inode = req.inode, error = %e, "meta close failed; retrying in the background");
            self.files.owe(req);
        }
    }

    pub(super) fn do_read(&self, inode: u64, fh: u64, size: u32, offset: u64) -> io::Result<Bytes> {
        let h = self.files.handle(fh)?;
        let file = &h.file;
        debug_assert_eq!(file.inode, inode);
        {
            let mut io = file.io.lock();
            self.flush_writes(file, &mut io)?;
        }
        let length = file.sizes.lock().size();
        if offset >= length || size == 0 {
            return Ok(Bytes::new());
        }
        let len = u64::from(size).min(length - offset);
        self.block_on(self.storage.read(&file.layout, inode, offset, len))
            .map_err(|e| storage_error("read", inode, e))
    }

    pub(super) fn do_write(
        &self,
        inode: u64,
        fh: u64,
        data: Vec<u8>,
        offset: u64,
    ) -> io::Result<usize> {
        let h = self.files.handle(fh)?;
        if !h.write {
            return Err(errno(libc::EBADF));
        }
        let file = &h.file;
        debug_assert_eq!(file.inode, inode);
        let len = data.len();
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| errno(libc::EFBIG))?;
        let mut io = file.io.lock();
        if let Some(e) = io.error.take() {
            return Err(errno(e));
        }
        if h.direct {
            // O_DIRECT: done when write() returns, no buffering.
            self.flush_writes(file, &mut io)?;
            self.block_on(
                self.storage
                    .write(&file.layout, inode, offset, Bytes::from(data)),
            )
            .map_err(|e| storage_error("write", inode, e))?;
        } else if len < WRITE_BUFFER_BYTES_MAX && io.buffer.can_append(offset, len) {
            io.buffer.append(offset, &data);
        } else {
            if let Some((o, d)) = io.buffer.take() {
                self.start_write(file, &mut io, o, d)?;
            }
            if len < WRITE_BUFFER_BYTES_MAX {
                io.buffer.append(offset, &data);
            } else {
                self.start_write(file, &mut io, offset, Bytes::from(data))?;
            }
        }
        file.sizes.lock().wrote(end);
        Ok(len)
    }

    /// Writes out the buffer of `file` and waits for every write in
    /// flight; a failure is remembered for the next flush/fsync as well as
    /// returned.
    fn flush_writes(&self, file: &OpenFile, st: &mut IoState) -> io::Result<()> {
        if let Some((offset, data)) = st.buffer.take() {
            self.start_write(file, st, offset, data)?;
        }
        self.wait_writes(st, |_| true)
    }

    /// Starts a background storage write of `data` at `offset`, after the
    /// writes it overlaps and while the window has room.
    fn start_write(
        &self,
        file: &OpenFile,
        st: &mut IoState,
        offset: u64,
        data: Bytes,
    ) -> io::Result<()> {
        let end = offset + data.len() as u64;
        // A failure of an earlier write is kept in `st.error` for the next
        // write/flush/fsync; these bytes are still written (dropping them
        // would lose data the application was told is written).
        let _ = self.wait_writes(st, |w| w.start < end && offset < w.end);
        while st.inflight.len() >= WRITES_IN_FLIGHT_MAX {
            let oldest = st.inflight[0].start;
            let _ = self.wait_writes(st, |w| w.start == oldest);
        }
        let storage = self.storage.clone();
        let layout = file.layout.clone();
        let inode = file.inode;
        let task = self.rt.spawn(async move {
            match storage.write(&layout, inode, offset, data).await {
                Ok(_) => Ok(()),
                Err(e) => Err(storage_error("write", inode, e)),
            }
        });
        st.inflight.push(InFlight {
            start: offset,
            end,
            task,
        });
        Ok(())
    }

    /// Waits for the writes in flight that `pick` selects; the first
    /// failure is remembered in the file and returned.
    fn wait_writes(&self, st: &mut IoState, pick: impl Fn(&InFlight) -> bool) -> io::Result<()> {
        if !st.inflight.iter().any(&pick) {
            return Ok(());
        }
        let mut failure = None;
        let mut kept = Vec::with_capacity(st.inflight.len());
        for w in std::mem::take(&mut st.inflight) {
            if !pick(&w) {
                kept.push(w);
                continue;
            }
            let result = match self.block_on(w.task) {
                Ok(r) => r,
                Err(join) => {
                    tracing::error!(error = %join, "a background write task died");
                    Err(errno(libc::EIO))
                }
            };
            if let Err(e) = result {
                failure.get_or_insert(e);
            }
        }
        st.inflight = kept;
        match failure {
            Some(e) => {
                st.error = e.raw_os_error();
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Tells meta the length and mtime this mount's writes reached.
    fn report_length(&self, file: &OpenFile) -> io::Result<()> {
        let (req, gen) = {
            let st = file.sizes.lock();
            if !st.hint_pending {
                return Ok(());
            }
            let req = SyncRequest {
                inode: file.inode,
                hint: st.hint(),
                touched: st.touched,
            };
            (req, st.write_gen)
        };
        let attr = self
            .block_on(self.meta.sync(req))
            .map_err(|e| meta_error("sync", e))?;
        let mut st = file.sizes.lock();
        if st.write_gen == gen {
            st.hint_pending = false;
            st.touched = false;
        }
        st.observe(&attr);
        Ok(())
    }

    pub(super) fn do_flush(&self, inode: u64, fh: u64, lock_owner: u64) -> io::Result<()> {
        let h = self.files.handle(fh)?;
        let file = &h.file;
        let flushed = {
            let mut st = file.io.lock();
            let r = self.flush_writes(file, &mut st);
            match st.error.take() {
                Some(e) => Err(errno(e)),
                None => r,
            }
        };
        self.release_posix_locks(inode, lock_owner);
        // Meta's length must not cover bytes that failed to reach storage.
        flushed?;
        self.report_length(file)
    }

    pub(super) fn do_fsync(&self, _inode: u64, fh: u64) -> io::Result<()> {
        let h = self.files.handle(fh)?;
        let file = &h.file;
        {
            let mut st = file.io.lock();
            let flushed = self.flush_writes(file, &mut st);
            // Report a failure once, here, not again at close.
            if let Some(e) = st.error.take() {
                return Err(errno(e));
            }
            flushed?;
        }
        self.report_length(file)
    }

    pub(super) fn do_release(
        &self,
        inode: u64,
        fh: u64,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let Some(h) = self.files.handles.remove(fh) else {
            return Err(errno(libc::EBADF));
        };
        let file = &h.file;
        {
            let mut io = file.io.lock();
            if let Err(e) = self.flush_writes(file, &mut io) {
                tracing::error!(inode, error = %e, "buffered writes lost at release (close already returned)");
            }
        }
        let (hint, touched) = {
            let mut sz = file.sizes.lock();
            let pending = std::mem::take(&mut sz.hint_pending);
            let touched = std::mem::take(&mut sz.touched);
            (if pending { sz.hint() } else { None }, touched)
        };
        let req = CloseRequest {
            inode,
            session: h.session,
            hint,
            touched,
        };
        self.close_or_owe(req);
        if flock_release {
            if let Some(owner) = lock_owner {
                self.release_flock(inode, owner);
            }
        }
        self.files.detach(file);
        Ok(())
    }

    pub(super) fn do_fallocate(
        &self,
        inode: u64,
        fh: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let h = self.files.handle(fh)?;
        if !h.write {
            return Err(errno(libc::EBADF));
        }
        let end = offset
            .checked_add(length)
            .ok_or_else(|| errno(libc::EFBIG))?;
        if length == 0 {
            return Err(errno(libc::EINVAL));
        }
        let file = &h.file;
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let zero = match mode & !FALLOC_FL_KEEP_SIZE {
            0 => false,
            FALLOC_FL_PUNCH_HOLE if keep_size => true,
            FALLOC_FL_ZERO_RANGE => true,
            _ => return Err(errno(libc::EOPNOTSUPP)),
        };
        {
            let mut io = file.io.lock();
            self.flush_writes(file, &mut io)?;
        }
        let size = file.sizes.lock().size();
        if zero && offset < size {
            let len = end.min(size) - offset;
            self.block_on(self.storage.punch_hole(&file.layout, inode, offset, len))
                .map_err(|e| storage_error("fallocate", inode, e))?;
            let mut sz = file.sizes.lock();
            sz.touched = true;
            sz.hint_pending = true;
            sz.write_gen += 1;
        }
        if !keep_size && end > size {
            // Storage holds nothing past `size`, so the new bytes read as
            // zeros; meta must hear our length first so it extends from it.
            self.report_length(file)?;
            let req = SetAttrRequest {
                user: r3fs_wire::meta::User::root(),
                inode,
                perm: None,
                uid: None,
                gid: None,
                size: Some(end),
                atime: None,
                mtime: None,
                via_write_handle: true,
            };
            let attr = self
                .block_on(self.meta.setattr(req))
                .map_err(|e| meta_error("fallocate", e))?;
            self.files.truncated(&attr);
        }
        Ok(())
    }

    pub(super) fn do_lseek(
        &self,
        inode: u64,
        fh: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        if whence != SEEK_DATA && whence != SEEK_HOLE {
            return Err(errno(libc::EINVAL));
        }
        if self.writeback_cache {
            // The kernel holds written pages and owns the size; it does not
            // write them back before asking us. ENOSYS makes it answer
            // SEEK_DATA/SEEK_HOLE itself (all data up to its size), which
            // POSIX allows and which sees its own cached writes.
            return Err(errno(libc::ENOSYS));
        }
        let h = self.files.handle(fh)?;
        let file = &h.file;
        {
            let mut io = file.io.lock();
            self.flush_writes(file, &mut io)?;
        }
        let size = file.sizes.lock().size();
        if offset >= size {
            return Err(errno(libc::ENXIO));
        }
        let chunks = self
            .block_on(self.storage.list_chunks(&file.layout, inode))
            .map_err(|e| storage_error("lseek", inode, e))?;
        let chunk_size = u64::from(file.layout.chunk_size);
        let regions = chunks
            .iter()
            .map(|&(index, len)| (index * chunk_size, index * chunk_size + u64::from(len)));
        seek(regions, offset, size, whence == SEEK_DATA).ok_or_else(|| errno(libc::ENXIO))
    }

    /// Sends pending length hints of every dirty open file (the periodic
    /// report). Skips files busy with I/O; they are reported next round.
    pub async fn report_lengths(&self) {
        let owed = std::mem::take(&mut *self.files.owed.lock());
        for req in owed {
            if let Err(e) = self.meta.close(req.clone()).await {
                tracing::warn!(inode = req.inode, error = %e, "owed meta close failed again");
                self.files.owe(req);
            }
        }
        for file in self.files.all() {
            let (req, gen) = {
                // Report only lengths whose bytes are on storage: skip a
                // file with writes buffered or in flight (or busy).
                match file.io.try_lock() {
                    Some(io) if io.buffer.is_empty() && io.inflight.is_empty() => {}
                    _ => continue,
                }
                let sz = file.sizes.lock();
                if !sz.hint_pending {
                    continue;
                }
                let req = SyncRequest {
                    inode: file.inode,
                    hint: sz.hint(),
                    touched: sz.touched,
                };
                (req, sz.write_gen)
            };
            match self.meta.sync(req).await {
                Ok(attr) => {
                    let mut sz = file.sizes.lock();
                    if sz.write_gen == gen {
                        sz.hint_pending = false;
                        sz.touched = false;
                    }
                    sz.observe(&attr);
                }
                Err(e) => {
                    tracing::warn!(inode = file.inode, error = %e, "periodic length report failed")
                }
            }
        }
    }

    /// Writes out every open file's buffered and in-flight writes (at
    /// shutdown: a connection abort sends no RELEASE).
    pub fn flush_all(&self) {
        for file in self.files.all() {
            let mut io = file.io.lock();
            if let Err(e) = self.flush_writes(&file, &mut io) {
                tracing::error!(inode = file.inode, error = %e, "writes lost at shutdown");
            }
        }
    }

    /// Open handles on this mount (for status and shutdown).
    pub fn open_handles(&self) -> usize {
        self.files.handle_count()
    }
}

fn open_options(flags: u32) -> OpenOptions {
    if flags as i32 & libc::O_DIRECT != 0 {
        OpenOptions::DIRECT_IO
    } else {
        OpenOptions::empty()
    }
}

/// SEEK_DATA / SEEK_HOLE over the data `regions` (sorted `[start, end)`
/// byte ranges) of a file of `size` bytes, from `offset < size`. Bytes
/// outside every region are a hole; the end of the file is a hole.
fn seek(
    regions: impl Iterator<Item = (u64, u64)>,
    offset: u64,
    size: u64,
    data: bool,
) -> Option<u64> {
    assert!(offset < size);
    let mut pos = offset;
    for (start, end) in regions {
        let end = end.min(size);
        if end <= pos || start >= end {
            continue;
        }
        if data {
            return Some(start.max(pos));
        }
        if start > pos {
            return Some(pos);
        }
        pos = end;
    }
    if data {
        None
    } else {
        Some(pos.min(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_data_and_hole_follow_regions() {
        let r = [(0u64, 10u64), (10, 15), (30, 40)];
        let data = |o| seek(r.iter().copied(), o, 50, true);
        let hole = |o| seek(r.iter().copied(), o, 50, false);
        assert_eq!(data(0), Some(0));
        assert_eq!(data(12), Some(12));
        assert_eq!(data(15), Some(30));
        assert_eq!(data(41), None);
        assert_eq!(hole(0), Some(15), "adjacent regions are one run of data");
        assert_eq!(hole(20), Some(20));
        assert_eq!(hole(35), Some(40));
        assert_eq!(hole(45), Some(45));
        // A region past the size does not count; the end is a hole.
        let r = [(0u64, 100u64)];
        assert_eq!(seek(r.iter().copied(), 5, 50, false), Some(50));
        assert_eq!(seek(std::iter::empty(), 5, 50, true), None);
    }

    #[test]
    fn open_flags_map_access_modes_and_truncate() {
        let (f, t) = open_flags(libc::O_RDONLY as u32);
        assert!(f.read && !f.write && !t && f.hold);
        let (f, t) = open_flags((libc::O_WRONLY | libc::O_TRUNC) as u32);
        assert!(!f.read && f.write && t && !f.truncate);
        let (f, _) = open_flags(libc::O_RDWR as u32);
        assert!(f.read && f.write);
    }
}
