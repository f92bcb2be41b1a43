//! FUSE over io_uring (`--channel uring`, Linux 6.14+ with
//! `/sys/module/fuse/parameters/enable_uring` = Y).
//!
//! # Queues, entries and workers
//! The kernel keeps one request queue per *possible* CPU and puts a request
//! on the queue of the CPU its application runs on. Each queue gets
//! `ceil(threads / queues)` (at least 1) workers. A worker is a thread
//! pinned to its queue's CPU that owns an io_uring (`IORING_SETUP_SQE128`)
//! and one ring entry: a 288-byte header buffer and a payload buffer,
//! registered on its queue with `FUSE_IO_URING_CMD_REGISTER`. Each
//! completion of the worker's one outstanding command is a request in the
//! entry's buffers; the worker serves it, writes the reply into the same
//! buffers and sends `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which delivers
//! the reply and waits for the entry's next request in one command. So a
//! reply always goes back on the entry that delivered its request, and a
//! queue serves as many requests at once as it has workers.
//!
//! # Waiting: the fuse ratio `a`
//! With `W = queues × workers per queue` workers, `round(a·W)` of them wait
//! the classic way: they block in `io_uring_enter(GETEVENTS)` at once
//! (commit and wait are one syscall). The other `W − round(a·W)` use the
//! adaptive busy-wait of XFUSE channels ([`super::spin`]): submit the
//! commit, peek the completion queue for the spin budget (if a
//! [`SpinPermits`] permit is free), then block in `io_uring_enter`. The
//! spin calls `sched_yield` between peeks: a worker runs on the CPU of the
//! applications it serves, so a plain spin would keep them off the CPU. Workers
//! are numbered round-robin over the queues (worker `g` is slot `g / Q` of
//! queue `g % Q`) and the blocking ones are spread evenly over that order
//! (worker `g` blocks iff `⌊(g+1)·B/W⌋ > ⌊g·B/W⌋`, `B = round(a·W)`).
//! Default `a` = 0: every worker spins adaptively.
//!
//! # INIT
//! fuse-backend-rs answers INIT itself and drops flags it does not know, so
//! [`InitInterceptor`] (on the session fd, where INIT arrives) lets it
//! answer into a pipe, then, when the kernel offered `FUSE_OVER_IO_URING`,
//! sets that flag (and `FUSE_INIT_EXT`, so the kernel reads `flags2`) and
//! writes the reply to the session fd itself. The payload buffers are sized
//! from that reply: `max(8192, max_write, max_pages·page size)`, what the
//! kernel requires. Workers register only after the reply is written (the
//! kernel refuses REGISTER before), and [`InitGate::wait_registered`] lets
//! the mount report ready only once every queue has an entry (until then
//! the kernel holds every request). A worker whose REGISTER fails, or a
//! kernel that did not offer io_uring, turns that worker into a classic
//! reader of the session fd (the kernel then falls back to `/dev/fuse`).
//!
//! # Decoding
//! A request arrives split: `fuse_in_header` in the header's `in_out`, the
//! opcode's fixed struct in `op_in` (its size is `len − 40 − payload_sz`),
//! the rest in the payload. The payload buffer has a page of room in front
//! of it, so the worker copies the two header parts just before the payload
//! and hands fuse-backend-rs one contiguous message without copying the
//! payload. `Server::handle_message` writes its reply to an fd; the worker
//! gives it a pipe of its own (capacity ≥ the largest reply) and reads the
//! reply back with one `readv` straight into the entry: the out header into
//! `in_out`, the body into the payload. A reply that is missing, malformed,
//! or larger than the payload buffer is answered with EIO instead.
//!
//! FORGET, INTERRUPT and notifications still use the session fd: a classic
//! reader (`classic::serve`) stays on it.
//!
//! # Shutdown
//! When the mount goes away the kernel completes every entry's command with
//! ENOTCONN (or a commit fails with it); the worker then drops its ring and,
//! since the kernel has released the entry, its buffers. A worker that
//! stops without such a completion leaks its buffers rather than free
//! memory the kernel may still write.

use std::alloc::Layout;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::{Condvar, Mutex};

use super::spin::{AdaptiveSpin, SpinConfig, SpinPermits};
use super::{classic, peek_header, ChannelEnd, ChannelStats, Dispatch, Interrupts, OPCODE_INIT};

/// The module parameter that switches FUSE over io_uring on (global).
pub const ENABLE_URING_PATH: &str = "/sys/module/fuse/parameters/enable_uring";

/// `fuse_uring_req_header`: in/out header area, op-in area, `fuse_uring_ent_in_out`.
pub const REQ_HEADER_BYTES: usize = 288;
const OP_IN_OFFSET: usize = 128;
const OP_IN_BYTES: usize = 128;
const ENT_IN_OUT_OFFSET: usize = 256;
const COMMIT_ID_OFFSET: usize = ENT_IN_OUT_OFFSET + 8;
const PAYLOAD_SZ_OFFSET: usize = ENT_IN_OUT_OFFSET + 16;
/// `fuse_in_header` and `fuse_out_header`.
const IN_HEADER_BYTES: usize = 40;
const OUT_HEADER_BYTES: usize = 16;
/// Room in front of the payload for the reassembled headers (one page keeps
/// the payload page-aligned).
const PAYLOAD_PREFIX: usize = 4096;
/// `FUSE_IO_URING_CMD_REGISTER` and `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// INIT flags (include/uapi/linux/fuse.h).
const FUSE_INIT_EXT: u32 = 1 << 30;
const FUSE_MAX_PAGES: u32 = 1 << 22;
/// `FUSE_OVER_IO_URING` (bit 41) as a `flags2` bit.
const FLAGS2_OVER_IO_URING: u32 = 1 << (41 - 32);
/// `FUSE_MIN_READ_BUFFER`, the smallest payload the kernel accepts.
const MIN_PAYLOAD: usize = 8192;
/// The kernel's `max_pages` when INIT does not set `FUSE_MAX_PAGES`.
const DEFAULT_MAX_PAGES: usize = 32;
/// Times a worker registers a fresh entry after a failed commit before it
/// gives up on io_uring.
const REREGISTER_MAX: u32 = 16;

/// Why `--channel uring` cannot be used here, or Ok.
pub fn available() -> Result<(), String> {
    match std::fs::read_to_string(ENABLE_URING_PATH) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
            "this kernel has no FUSE over io_uring ({ENABLE_URING_PATH} does not exist; it needs \
                 Linux 6.14+ built with CONFIG_FUSE_IO_URING); use --channel xfuse"
        ))
        }
        Err(e) => return Err(format!("cannot read {ENABLE_URING_PATH}: {e}")),
        Ok(v) if v.trim() != "Y" => {
            return Err(format!(
                "FUSE over io_uring is switched off: {ENABLE_URING_PATH} is {}; as root run \
                 `echo Y > {ENABLE_URING_PATH}` (the setting is global to the machine), or use \
                 --channel xfuse",
                v.trim()
            ))
        }
        Ok(_) => {}
    }
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(2)
        .map(drop)
        .map_err(|e| format!("cannot create an io_uring with 128-byte entries: {e}"))
}

/// The kernel's number of FUSE queues: the possible CPUs.
pub fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| count_cpu_list(&s))
        .unwrap_or_else(|| {
            // SAFETY: sysconf has no preconditions.
            let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
            usize::try_from(n).unwrap_or(1).max(1)
        })
}

/// Counts the CPUs of a list like `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

/// Whether worker `g` of `total` is one of the `blocking` ones that wait
/// the classic way (spread evenly; exactly `blocking` of them).
pub fn worker_blocks(g: usize, total: usize, blocking: usize) -> bool {
    if total == 0 {
        return false;
    }
    (g + 1) * blocking / total > g * blocking / total
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

/// What the INIT reply settled, as the ring needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitParams {
    /// The reply advertised `FUSE_OVER_IO_URING`.
    pub uring: bool,
    pub max_write: u32,
    /// `max_pages` of the reply, if it set `FUSE_MAX_PAGES`.
    pub max_pages: Option<u16>,
}

impl InitParams {
    /// The payload buffer the kernel requires of every entry.
    pub fn payload_bytes(&self, page_size: usize) -> usize {
        let pages = self
            .max_pages
            .map_or(DEFAULT_MAX_PAGES, |p| usize::from(p.max(1)));
        MIN_PAYLOAD
            .max(self.max_write as usize)
            .max(pages * page_size)
    }
}

/// Whether an INIT request (`fuse_in_header` + `fuse_init_in`) offers
/// `FUSE_OVER_IO_URING`.
pub fn init_offers_uring(request: &[u8]) -> bool {
    let at = IN_HEADER_BYTES;
    if request.len() < at + 20 {
        return false;
    }
    let flags = get_u32(request, at + 12);
    let flags2 = get_u32(request, at + 16);
    flags & FUSE_INIT_EXT != 0 && flags2 & FLAGS2_OVER_IO_URING != 0
}

/// Edits a successful INIT reply (`fuse_out_header` + `fuse_init_out`) to
/// advertise `FUSE_OVER_IO_URING` when `advertise`, and returns what the
/// ring needs; None for an error reply or one too short to carry `flags2`.
pub fn patch_init_reply(reply: &mut [u8], advertise: bool) -> Option<InitParams> {
    // fuse_init_out: flags at 12, max_write at 20, max_pages (u16) at 28,
    // flags2 at 32.
    let o = OUT_HEADER_BYTES;
    if reply.len() < o + 36 || get_u32(reply, 4) != 0 {
        return None;
    }
    let mut flags = get_u32(reply, o + 12);
    if advertise {
        flags |= FUSE_INIT_EXT;
        put_u32(reply, o + 12, flags);
        let flags2 = get_u32(reply, o + 32) | FLAGS2_OVER_IO_URING;
        put_u32(reply, o + 32, flags2);
    }
    let max_pages = u16::from_ne_bytes([reply[o + 28], reply[o + 29]]);
    Some(InitParams {
        uring: advertise,
        max_write: get_u32(reply, o + 20),
        max_pages: (flags & FUSE_MAX_PAGES != 0).then_some(max_pages),
    })
}

/// Why a request in a ring entry cannot be handed on.
#[derive(Debug, PartialEq, Eq)]
pub enum AssembleError {
    /// `payload_sz` is larger than the payload buffer.
    Payload(u32),
    /// `len` does not fit the header, op-in and payload sizes.
    Length { len: u32, payload: u32 },
}

/// Copies the request's `fuse_in_header` and op-in struct from `header` (a
/// `fuse_uring_req_header`) to just before the payload, which starts at
/// `buf[prefix..]`, and returns the range of `buf` that holds the whole
/// request as `read(/dev/fuse)` would have returned it.
pub fn assemble_request(
    header: &[u8],
    buf: &mut [u8],
    prefix: usize,
) -> Result<std::ops::Range<usize>, AssembleError> {
    let len = get_u32(header, 0);
    let payload = get_u32(header, PAYLOAD_SZ_OFFSET);
    if payload as usize > buf.len() - prefix {
        return Err(AssembleError::Payload(payload));
    }
    let op_in = (len as usize)
        .checked_sub(IN_HEADER_BYTES + payload as usize)
        .filter(|&n| n <= OP_IN_BYTES && IN_HEADER_BYTES + n <= prefix)
        .ok_or(AssembleError::Length { len, payload })?;
    let start = prefix - op_in - IN_HEADER_BYTES;
    buf[start..start + IN_HEADER_BYTES].copy_from_slice(&header[..IN_HEADER_BYTES]);
    buf[start + IN_HEADER_BYTES..prefix]
        .copy_from_slice(&header[OP_IN_OFFSET..OP_IN_OFFSET + op_in]);
    Ok(start..prefix + payload as usize)
}

/// Writes an error reply for request `unique` into an entry's header.
fn put_error_reply(header: &mut [u8], unique: u64, errno: i32) {
    header[..4].copy_from_slice(&(OUT_HEADER_BYTES as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    put_u32(header, PAYLOAD_SZ_OFFSET, 0);
}

/// Moves a captured reply (`fuse_out_header` + body, or why there is
/// none) into an entry: the out header into `header`, the body into
/// `payload`, and sets `payload_sz`; a reply that is missing, malformed,
/// for another request or larger than `payload` becomes an EIO error
/// reply. Returns whether the file system's own reply was kept.
fn finish_reply(
    header: &mut [u8],
    payload: &mut [u8],
    captured: Result<&[u8], &'static str>,
    unique: u64,
) -> bool {
    let fault = match captured {
        Err(why) => Err(why),
        Ok(r) if r.len() < OUT_HEADER_BYTES => Err("no reply"),
        Ok(r) if r.len() - OUT_HEADER_BYTES > payload.len() => {
            Err("reply larger than the payload buffer")
        }
        Ok(r) if get_u64(r, 8) != unique => Err("reply for another request"),
        Ok(r) => Ok(r),
    };
    match fault {
        Err(why) => {
            tracing::warn!(unique, "{why}; answering EIO");
            put_error_reply(header, unique, libc::EIO);
            false
        }
        Ok(r) => {
            let body = r.len() - OUT_HEADER_BYTES;
            header[..OUT_HEADER_BYTES].copy_from_slice(&r[..OUT_HEADER_BYTES]);
            payload[..body].copy_from_slice(&r[OUT_HEADER_BYTES..]);
            put_u32(header, PAYLOAD_SZ_OFFSET, body as u32);
            true
        }
    }
}

/// How long INIT's answer waits for the queue workers to prepare.
const PREPARE_WAIT: Duration = Duration::from_secs(5);

/// The INIT handshake between the session reader and the queue workers,
/// and their registration. INIT's reply may advertise io_uring only if
/// every worker can serve it (the kernel then holds every request until
/// each queue has an entry), so: the reader proposes the reply's
/// parameters, each worker allocates its buffers and says whether it is
/// ready, the reader advertises io_uring only if all are, writes the reply
/// and publishes the outcome; then the workers register.
pub struct InitGate {
    workers: usize,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    proposal: Option<InitParams>,
    prepared: usize,
    unprepared: usize,
    init: Option<InitParams>,
    ended: bool,
    /// Workers that registered their entry or fell back to the session fd.
    settled: usize,
}

impl InitGate {
    pub fn new(workers: usize) -> InitGate {
        InitGate {
            workers,
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.state.lock());
        self.changed.notify_all();
    }

    /// Waits until `done` holds, the session ends, or `deadline`.
    fn wait<T>(
        &self,
        deadline: Option<Instant>,
        mut done: impl FnMut(&GateState) -> Option<T>,
    ) -> Option<T> {
        let mut s = self.state.lock();
        loop {
            if let Some(v) = done(&s) {
                return Some(v);
            }
            if s.ended {
                return None;
            }
            match deadline {
                Some(d) => {
                    if self.changed.wait_until(&mut s, d).timed_out() {
                        return done(&s);
                    }
                }
                None => self.changed.wait(&mut s),
            }
        }
    }

    /// Proposes INIT's parameters and waits for every worker to prepare;
    /// whether all could.
    fn propose(&self, params: InitParams) -> bool {
        self.update(|s| s.proposal = Some(params));
        if !params.uring {
            return false;
        }
        let deadline = Instant::now() + PREPARE_WAIT;
        let all = self.wait(Some(deadline), |s| {
            (s.prepared + s.unprepared >= self.workers).then_some(s.unprepared == 0)
        });
        all == Some(true)
    }

    fn set_init(&self, params: InitParams) {
        self.update(|s| s.init = Some(params));
    }

    /// The session fd is closed for reading (unmounted): workers waiting
    /// for INIT stop.
    pub fn end(&self) {
        self.update(|s| s.ended = true);
    }

    fn prepared(&self, ok: bool) {
        self.update(|s| {
            if ok {
                s.prepared += 1
            } else {
                s.unprepared += 1
            }
        });
    }

    fn settle(&self) {
        self.update(|s| s.settled += 1);
    }

    fn wait_proposal(&self) -> Option<InitParams> {
        self.wait(None, |s| s.proposal)
    }

    /// Waits for INIT's reply; None if the session ended first.
    fn wait_init(&self) -> Option<InitParams> {
        self.wait(None, |s| s.init)
    }

    /// Waits until every worker registered (or fell back), or the session
    /// ended, or `deadline`; whether they all did.
    pub fn wait_registered(&self, deadline: Instant) -> bool {
        self.wait(Some(deadline), |s| {
            (s.settled >= self.workers).then_some(())
        })
        .is_some()
    }
}

/// Where `Server::handle_message` writes a reply so we can read it back: a
/// memfd mapped into our memory. Before each request the file position is
/// rewound and the header cleared; after it the reply is in the mapping.
struct Capture {
    fd: OwnedFd,
    map: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by the one thread that uses the capture.
unsafe impl Send for Capture {}

impl Capture {
    /// Room for a reply of `len` bytes.
    fn new(len: usize) -> io::Result<Capture> {
        let len = len.max(OUT_HEADER_BYTES);
        // SAFETY: the name is a NUL-terminated string.
        let raw = unsafe { libc::memfd_create(c"r3fs-reply".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: plain syscalls on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: maps `len` bytes of the memfd we just sized.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(map.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Capture { fd, map, len })
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes, written only through the fd by our
        // own thread's syscalls.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len) }
    }

    /// Readies the capture for the next reply.
    fn rewind(&mut self) -> io::Result<()> {
        // SAFETY: the first OUT_HEADER_BYTES of the mapping (len >= that).
        unsafe { std::ptr::write_bytes(self.map.as_ptr(), 0, OUT_HEADER_BYTES) };
        // SAFETY: a plain syscall on our fd.
        if unsafe { libc::lseek(self.fd.as_raw_fd(), 0, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The reply written since [`Capture::rewind`], by its header's length.
    fn reply(&self) -> Result<&[u8], &'static str> {
        let b = self.bytes();
        match get_u32(b, 0) as usize {
            0 => Err("no reply"),
            n if n < OUT_HEADER_BYTES => Err("reply shorter than its header"),
            n if n > self.len => Err("reply larger than the payload buffer"),
            n => Ok(&b[..n]),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.len) };
    }
}

/// The [`Dispatch`] the session reader uses in uring mode: INIT is
/// answered with `FUSE_OVER_IO_URING` added (when the kernel offered it and
/// every queue worker is ready); every other request goes to `inner`.
pub struct InitInterceptor {
    inner: Arc<dyn Dispatch>,
    gate: Arc<InitGate>,
}

impl InitInterceptor {
    pub fn new(inner: Arc<dyn Dispatch>, gate: Arc<InitGate>) -> InitInterceptor {
        InitInterceptor { inner, gate }
    }
}

const NO_URING: InitParams = InitParams {
    uring: false,
    max_write: 0,
    max_pages: None,
};

impl Dispatch for InitInterceptor {
    fn dispatch(&self, fd: RawFd, request: &mut [u8], reply: &mut [u8]) {
        if peek_header(request).0 != OPCODE_INIT {
            return self.inner.dispatch(fd, request, reply);
        }
        let offered = init_offers_uring(request);
        let capture = match Capture::new(64 * 1024).and_then(|mut c| c.rewind().map(|()| c)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot capture the INIT reply; serving without io_uring");
                self.inner.dispatch(fd, request, reply);
                self.gate.propose(NO_URING);
                self.gate.set_init(NO_URING);
                return;
            }
        };
        self.inner.dispatch(capture.fd(), request, reply);
        let mut msg = capture.reply().map(<[u8]>::to_vec).unwrap_or_default();
        // What the reply would settle with io_uring, before deciding on it.
        let mut params = patch_init_reply(&mut msg.clone(), offered).unwrap_or(NO_URING);
        if !offered {
            tracing::warn!("the kernel did not offer FUSE over io_uring; serving /dev/fuse");
        }
        let ready = self.gate.propose(params);
        if params.uring && !ready {
            tracing::warn!("not every uring worker is ready; serving /dev/fuse");
            params.uring = false;
        }
        patch_init_reply(&mut msg, params.uring);
        // SAFETY: `fd` is the session fd the request came from.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Err(e) = nix::unistd::write(borrowed, &msg) {
            tracing::error!(error = %e, "cannot answer INIT");
        }
        tracing::info!(?params, "INIT answered");
        self.gate.set_init(params);
    }

    fn initialized(&self) -> bool {
        self.inner.initialized()
    }

    fn interrupts(&self) -> &Interrupts {
        self.inner.interrupts()
    }
}

/// Page-aligned memory the kernel reads and writes while our thread is in
/// a syscall; we make slices of it only between such syscalls.
struct Buffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: a plain owned allocation.
unsafe impl Send for Buffer {}

impl Buffer {
    fn new(len: usize, align: usize) -> Buffer {
        let layout = Layout::from_size_align(len, align).expect("valid buffer layout");
        // SAFETY: len > 0 for every caller.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Buffer { ptr, layout }
    }

    fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `layout.size()` bytes and initialized.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// One ring entry's memory: the header, the payload (after a page of room
/// for reassembly) and the iovecs REGISTER points at.
struct RingEntry {
    header: Buffer,
    payload: Buffer,
    payload_bytes: usize,
    iov: Box<[libc::iovec; 2]>,
}

impl RingEntry {
    fn new(payload_bytes: usize) -> RingEntry {
        let header = Buffer::new(REQ_HEADER_BYTES, 64);
        let payload = Buffer::new(PAYLOAD_PREFIX + payload_bytes, 4096);
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: REQ_HEADER_BYTES,
            },
            libc::iovec {
                // SAFETY: within the allocation.
                iov_base: unsafe { payload.as_mut_ptr().add(PAYLOAD_PREFIX) }.cast(),
                iov_len: payload_bytes,
            },
        ]);
        RingEntry {
            header,
            payload,
            payload_bytes,
            iov,
        }
    }
}

/// One worker of one queue: see the module docs.
pub struct QueueWorker {
    pub qid: u16,
    /// Wait the classic way (no spin).
    pub blocks: bool,
    /// The session fd (the ring commands name it).
    pub fd: RawFd,
    pub dispatch: Arc<dyn Dispatch>,
    pub gate: Arc<InitGate>,
    pub stats: Arc<ChannelStats>,
    pub permits: Arc<SpinPermits>,
    pub spin: SpinConfig,
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// What ended a worker's ring loop.
enum LoopEnd {
    /// The kernel completed our last command with an error: it holds no
    /// reference to the entry's buffers any more.
    Released(ChannelEnd),
    /// Registration was refused: serve the session fd instead.
    Fallback,
    /// We stopped with a command possibly still in the kernel.
    Abandoned(ChannelEnd),
}

impl QueueWorker {
    /// Serves this worker's queue until the mount goes away.
    pub fn run(self) -> ChannelEnd {
        pin_to_cpu(usize::from(self.qid));
        let ring = Ring::builder().build(4);
        let Some(proposal) = self.gate.wait_proposal() else {
            return ChannelEnd::Unmounted;
        };
        // Allocate everything before INIT's reply can promise io_uring.
        let prepared = match ring {
            _ if !proposal.uring => Err("INIT did not offer io_uring".to_string()),
            Err(e) => Err(format!("cannot create an io_uring: {e}")),
            Ok(ring) => {
                let payload_bytes = proposal.payload_bytes(page_size());
                Capture::new(payload_bytes + OUT_HEADER_BYTES)
                    .map(|c| (ring, c, RingEntry::new(payload_bytes)))
                    .map_err(|e| format!("cannot make a reply buffer: {e}"))
            }
        };
        if proposal.uring {
            self.gate.prepared(prepared.is_ok());
        }
        let Some(init) = self.gate.wait_init() else {
            return ChannelEnd::Unmounted;
        };
        let (mut ring, mut capture, mut entry) = match prepared {
            Ok(p) if init.uring => p,
            Ok(_) => return self.fall_back("INIT did not enable io_uring"),
            Err(why) => return self.fall_back(&why),
        };
        match self.serve_ring(&mut ring, &mut entry, &mut capture) {
            LoopEnd::Released(end) => {
                drop(ring);
                drop(entry);
                end
            }
            LoopEnd::Fallback => {
                drop(ring);
                drop(entry);
                self.fall_back("REGISTER failed")
            }
            LoopEnd::Abandoned(end) => {
                drop(ring);
                std::mem::forget(entry);
                end
            }
        }
    }

    fn fall_back(&self, why: &str) -> ChannelEnd {
        tracing::warn!(
            qid = self.qid,
            why,
            "uring worker serves the session fd instead"
        );
        self.gate.settle();
        classic::serve(self.fd, self.dispatch.as_ref(), &self.stats)
    }

    fn serve_ring(&self, ring: &mut Ring, entry: &mut RingEntry, capture: &mut Capture) -> LoopEnd {
        let mut spin = AdaptiveSpin::new(self.spin);
        let mut registering = true;
        let mut reregistered = 0;
        let mut reply = vec![0u8; entry.payload_bytes + OUT_HEADER_BYTES];
        self.push(ring, self.register_sqe(entry));
        // Submit REGISTER now, so the mount can tell when every queue has
        // an entry; a refusal shows up as an error completion.
        if let Err(e) = submit(ring) {
            tracing::warn!(qid = self.qid, error = %e, "submitting REGISTER failed");
            return LoopEnd::Fallback;
        }
        let mut settled = false;
        if ring.completion().is_empty() {
            self.gate.settle();
            settled = true;
        }
        loop {
            let cqe = match self.wait(ring, &mut spin) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(qid = self.qid, error = %e, "waiting on the ring failed");
                    return LoopEnd::Abandoned(ChannelEnd::Failed(
                        e.raw_os_error().unwrap_or(libc::EIO),
                    ));
                }
            };
            let res = cqe.result();
            if res < 0 {
                let errno = -res;
                match errno {
                    libc::ENOTCONN | libc::ENODEV | libc::ECONNABORTED | libc::ECANCELED => {
                        if !settled {
                            self.gate.settle();
                        }
                        return LoopEnd::Released(ChannelEnd::Unmounted);
                    }
                    libc::EAGAIN if registering && reregistered < REREGISTER_MAX => {
                        // The kernel has not taken INIT's reply in yet.
                        reregistered += 1;
                        std::thread::sleep(Duration::from_millis(10));
                        self.push(ring, self.register_sqe(entry));
                        continue;
                    }
                    _ if registering => {
                        tracing::warn!(qid = self.qid, errno, "FUSE_IO_URING_CMD_REGISTER refused");
                        return LoopEnd::Fallback;
                    }
                    _ if reregistered < REREGISTER_MAX => {
                        // The commit was refused and the kernel keeps the
                        // old entry aside; offer the buffers again.
                        tracing::warn!(
                            qid = self.qid,
                            errno,
                            "COMMIT_AND_FETCH refused; registering again"
                        );
                        reregistered += 1;
                        registering = true;
                        self.push(ring, self.register_sqe(entry));
                        continue;
                    }
                    _ => return LoopEnd::Released(ChannelEnd::Failed(errno)),
                }
            }
            if !settled {
                self.gate.settle();
                settled = true;
            }
            registering = false;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let commit_id = self.serve_one(entry, &mut reply, capture);
            self.push(ring, self.commit_sqe(commit_id));
        }
    }

    /// Serves the request in `entry` and leaves the reply in it; returns the
    /// commit id.
    fn serve_one(&self, entry: &mut RingEntry, reply: &mut [u8], capture: &mut Capture) -> u64 {
        let header = entry.header.slice();
        let commit_id = get_u64(header, COMMIT_ID_OFFSET);
        let unique = get_u64(header, 8);
        let payload = entry.payload.slice();
        let range = match assemble_request(header, payload, PAYLOAD_PREFIX) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(qid = self.qid, unique, error = ?e, "malformed ring request; answering EIO");
                put_error_reply(header, unique, libc::EIO);
                return commit_id;
            }
        };
        if let Err(e) = capture.rewind() {
            tracing::warn!(qid = self.qid, error = %e, "cannot rewind the reply buffer; answering EIO");
            put_error_reply(header, unique, libc::EIO);
            return commit_id;
        }
        self.dispatch
            .dispatch(capture.fd(), &mut payload[range], reply);
        let body = &mut payload[PAYLOAD_PREFIX..PAYLOAD_PREFIX + entry.payload_bytes];
        finish_reply(header, body, capture.reply(), unique);
        commit_id
    }

    fn register_sqe(&self, entry: &RingEntry) -> squeue::Entry128 {
        let sqe = opcode::UringCmd80::new(types::Fd(self.fd), CMD_REGISTER)
            .cmd(cmd_req(0, self.qid))
            .addr(Some(entry.iov.as_ptr() as u64))
            .build();
        with_len(sqe, 2)
    }

    fn commit_sqe(&self, commit_id: u64) -> squeue::Entry128 {
        opcode::UringCmd80::new(types::Fd(self.fd), CMD_COMMIT_AND_FETCH)
            .cmd(cmd_req(commit_id, self.qid))
            .build()
    }

    fn push(&self, ring: &mut Ring, sqe: squeue::Entry128) {
        // SAFETY: the SQE points only at the entry's iovecs and buffers,
        // which live until the kernel completes the command (or leak).
        unsafe { ring.submission().push(&sqe) }.expect("the ring has room for one command");
    }

    /// Submits what is queued and waits for the next completion: spin for
    /// the budget (adaptive workers with a permit), then block.
    fn wait(&self, ring: &mut Ring, spin: &mut AdaptiveSpin) -> io::Result<cqueue::Entry> {
        let budget = if self.blocks {
            Duration::ZERO
        } else {
            spin.budget()
        };
        if !budget.is_zero() {
            if let Some(_permit) = self.permits.try_acquire() {
                submit(ring)?;
                let deadline = Instant::now() + budget;
                loop {
                    if let Some(c) = ring.completion().next() {
                        spin.hit();
                        self.stats.spin_hits.fetch_add(1, Ordering::Relaxed);
                        self.record_budget(spin);
                        return Ok(c);
                    }
                    if Instant::now() >= deadline {
                        spin.miss();
                        self.stats.spin_misses.fetch_add(1, Ordering::Relaxed);
                        self.record_budget(spin);
                        break;
                    }
                    // The worker shares its CPU with the applications whose
                    // requests it serves: yield to them if they are
                    // runnable (and run our pending task work, which is
                    // how a request reaches this ring).
                    // SAFETY: no preconditions.
                    unsafe { libc::sched_yield() };
                }
            }
        }
        self.stats.blocking_waits.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        // With a budget left, block at most the idle period first: if nothing
        // comes the mount is idle and the budget drops to zero (and shows it).
        if !self.blocks && !spin.budget().is_zero() {
            let idle = spin.idle_after();
            let ts = types::Timespec::new()
                .sec(idle.as_secs())
                .nsec(idle.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                    spin.idle();
                    self.record_budget(spin);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            if let Some(c) = ring.completion().next() {
                spin.woke_after(started.elapsed());
                self.record_budget(spin);
                return Ok(c);
            }
        }
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            if let Some(c) = ring.completion().next() {
                if !self.blocks {
                    spin.woke_after(started.elapsed());
                    self.record_budget(spin);
                }
                return Ok(c);
            }
        }
    }

    fn record_budget(&self, spin: &AdaptiveSpin) {
        self.stats
            .spin_budget_ns
            .store(spin.budget().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Submits queued commands without waiting, retrying interruptions.
fn submit(ring: &Ring) -> io::Result<()> {
    loop {
        match ring.submit() {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// `fuse_uring_cmd_req` in the 80-byte command area.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

/// Sets the SQE's `len` (io-uring 0.7's `UringCmd80` has no setter;
/// REGISTER needs the iovec count there).
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe built from zeroed
    // memory (every byte initialized) then 64 plain bytes; `len` is the
    // u32 at offset 24 of io_uring_sqe. Any byte pattern is a valid SQE.
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    bytes[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(4096)
}

/// Pins the calling thread to `cpu` (a possible CPU that is offline is
/// skipped: the kernel routes no requests there anyway).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET checks the index.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, error = %io::Error::last_os_error(), "cannot pin a uring worker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_header(len: u32, opcode: u32, unique: u64, op_in: &[u8], payload: u32) -> Vec<u8> {
        let mut h = vec![0u8; REQ_HEADER_BYTES];
        put_u32(&mut h, 0, len);
        put_u32(&mut h, 4, opcode);
        h[8..16].copy_from_slice(&unique.to_ne_bytes());
        h[OP_IN_OFFSET..OP_IN_OFFSET + op_in.len()].copy_from_slice(op_in);
        h[COMMIT_ID_OFFSET..COMMIT_ID_OFFSET + 8].copy_from_slice(&unique.to_ne_bytes());
        put_u32(&mut h, PAYLOAD_SZ_OFFSET, payload);
        h
    }

    #[test]
    fn a_split_request_is_reassembled_in_front_of_its_payload() {
        // A WRITE: 40-byte fuse_write_in in op_in, 5 bytes of data.
        let op_in: Vec<u8> = (0..40u8).collect();
        let header = ring_header(40 + 40 + 5, 16, 9, &op_in, 5);
        let mut buf = vec![0u8; PAYLOAD_PREFIX + 64];
        buf[PAYLOAD_PREFIX..PAYLOAD_PREFIX + 5].copy_from_slice(b"hello");
        let r = assemble_request(&header, &mut buf, PAYLOAD_PREFIX).unwrap();
        let msg = &buf[r];
        assert_eq!(msg.len(), 85);
        assert_eq!(get_u32(msg, 0), 85);
        assert_eq!(get_u32(msg, 4), 16);
        assert_eq!(get_u64(msg, 8), 9);
        assert_eq!(&msg[40..80], &op_in[..]);
        assert_eq!(&msg[80..], b"hello");

        // A LOOKUP: no op-in struct, the name is the payload.
        let header = ring_header(40 + 4, 1, 10, &[], 4);
        buf[PAYLOAD_PREFIX..PAYLOAD_PREFIX + 4].copy_from_slice(b"abc\0");
        let r = assemble_request(&header, &mut buf, PAYLOAD_PREFIX).unwrap();
        assert_eq!(r, PAYLOAD_PREFIX - 40..PAYLOAD_PREFIX + 4);
        assert_eq!(&buf[r][40..], b"abc\0");
    }

    #[test]
    fn inconsistent_ring_requests_are_refused() {
        let mut buf = vec![0u8; PAYLOAD_PREFIX + 16];
        let too_big = ring_header(40 + 100, 16, 1, &[], 100);
        assert_eq!(
            assemble_request(&too_big, &mut buf, PAYLOAD_PREFIX),
            Err(AssembleError::Payload(100))
        );
        let short = ring_header(30, 3, 1, &[], 0);
        assert!(matches!(
            assemble_request(&short, &mut buf, PAYLOAD_PREFIX),
            Err(AssembleError::Length { .. })
        ));
        let op_in_too_big = ring_header(40 + 200, 3, 1, &[], 0);
        assert!(matches!(
            assemble_request(&op_in_too_big, &mut buf, PAYLOAD_PREFIX),
            Err(AssembleError::Length { .. })
        ));
    }

    fn init_reply(flags: u32, max_write: u32, max_pages: u16, flags2: u32) -> Vec<u8> {
        let mut r = vec![0u8; OUT_HEADER_BYTES + 64];
        let len = r.len() as u32;
        put_u32(&mut r, 0, len);
        r[8..16].copy_from_slice(&1u64.to_ne_bytes());
        let o = OUT_HEADER_BYTES;
        put_u32(&mut r, o, 7);
        put_u32(&mut r, o + 4, 33);
        put_u32(&mut r, o + 12, flags);
        put_u32(&mut r, o + 20, max_write);
        r[o + 28..o + 30].copy_from_slice(&max_pages.to_ne_bytes());
        put_u32(&mut r, o + 32, flags2);
        r
    }

    #[test]
    fn init_reply_gains_the_io_uring_flag_and_keeps_the_rest() {
        let mut r = init_reply(FUSE_MAX_PAGES | 1, 1 << 20, 256, 1 << 2);
        let p = patch_init_reply(&mut r, true).unwrap();
        assert_eq!(
            p,
            InitParams {
                uring: true,
                max_write: 1 << 20,
                max_pages: Some(256)
            }
        );
        let o = OUT_HEADER_BYTES;
        assert_eq!(get_u32(&r, o + 12), FUSE_MAX_PAGES | 1 | FUSE_INIT_EXT);
        assert_eq!(get_u32(&r, o + 32), (1 << 2) | FLAGS2_OVER_IO_URING);
        assert_eq!(get_u32(&r, o + 4), 33, "minor untouched");
        assert_eq!(p.payload_bytes(4096), 1 << 20);

        let mut plain = init_reply(1, 4096, 0, 0);
        let before = plain.clone();
        let p = patch_init_reply(&mut plain, false).unwrap();
        assert_eq!(plain, before, "nothing changes when not advertising");
        assert_eq!(p.max_pages, None);
        assert_eq!(p.payload_bytes(4096), 32 * 4096, "kernel default max_pages");

        let mut error = init_reply(0, 0, 0, 0);
        error[4..8].copy_from_slice(&(-libc::EPROTO).to_ne_bytes());
        assert_eq!(patch_init_reply(&mut error, true), None);
        assert_eq!(patch_init_reply(&mut [0u8; 20], true), None);
    }

    #[test]
    fn init_offer_needs_init_ext_and_the_flags2_bit() {
        let mut req = vec![0u8; IN_HEADER_BYTES + 64];
        assert!(!init_offers_uring(&req));
        put_u32(&mut req, IN_HEADER_BYTES + 16, FLAGS2_OVER_IO_URING);
        assert!(!init_offers_uring(&req), "flags2 counts only with INIT_EXT");
        put_u32(&mut req, IN_HEADER_BYTES + 12, FUSE_INIT_EXT);
        assert!(init_offers_uring(&req));
        assert!(!init_offers_uring(&req[..50]));
    }

    #[test]
    fn replies_are_checked_before_commit() {
        let mut h = vec![0u8; REQ_HEADER_BYTES];
        let mut payload = vec![0u8; 32];
        let mut r = vec![0u8; 16 + 24];
        put_u32(&mut r, 0, 40);
        r[8..16].copy_from_slice(&5u64.to_ne_bytes());
        r[16..].copy_from_slice(&[7u8; 24]);
        assert!(finish_reply(&mut h, &mut payload, Ok(&r), 5));
        assert_eq!(&h[..16], &r[..16]);
        assert_eq!(&payload[..24], &[7u8; 24]);
        assert_eq!(get_u32(&h, PAYLOAD_SZ_OFFSET), 24);

        let big = vec![0u8; 16 + 33];
        let cases: [(Result<&[u8], &str>, u64); 4] = [
            (Err("no reply"), 5),
            (Ok(&r[..10]), 5),
            (Ok(&big), 0),
            (Ok(&r), 6),
        ];
        for (captured, unique) in cases {
            assert!(!finish_reply(&mut h, &mut payload, captured, unique));
            assert_eq!(get_u32(&h, 0), 16);
            assert_eq!(get_u32(&h, 4) as i32, -libc::EIO);
            assert_eq!(get_u64(&h, 8), unique);
            assert_eq!(get_u32(&h, PAYLOAD_SZ_OFFSET), 0);
        }
    }

    #[test]
    fn a_capture_returns_the_reply_written_to_its_fd() {
        let mut c = Capture::new(4096).unwrap();
        c.rewind().unwrap();
        assert_eq!(c.reply(), Err("no reply"));
        let mut msg = vec![0u8; 24];
        put_u32(&mut msg, 0, 24);
        msg[16..].copy_from_slice(b"abcdefgh");
        // SAFETY: the capture's fd is open.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(c.fd()) };
        nix::unistd::write(fd, &msg).unwrap();
        assert_eq!(c.reply().unwrap(), &msg[..]);
        c.rewind().unwrap();
        let mut short = vec![0u8; 16];
        put_u32(&mut short, 0, 16);
        nix::unistd::write(fd, &short).unwrap();
        assert_eq!(c.reply().unwrap(), &short[..], "rewound to the start");
        put_u32(&mut short, 0, 5000);
        c.rewind().unwrap();
        nix::unistd::write(fd, &short).unwrap();
        assert!(c.reply().is_err(), "a length past the buffer is refused");
    }

    #[test]
    fn blocking_workers_are_spread_and_counted_exactly() {
        for total in 1..20 {
            for blocking in 0..=total {
                let n = (0..total)
                    .filter(|&g| worker_blocks(g, total, blocking))
                    .count();
                assert_eq!(n, blocking, "{blocking} of {total}");
            }
        }
        // Half of 4 workers over 2 queues: one per queue.
        let blocks: Vec<bool> = (0..4).map(|g| worker_blocks(g, 4, 2)).collect();
        assert_eq!(blocks, [false, true, false, true]);
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn command_area_and_sqe_len_are_laid_out_as_the_kernel_reads_them() {
        let cmd = cmd_req(0x1122, 3);
        assert_eq!(get_u64(&cmd, 0), 0, "flags");
        assert_eq!(get_u64(&cmd, 8), 0x1122, "commit_id");
        assert_eq!(u16::from_ne_bytes([cmd[16], cmd[17]]), 3, "qid");
        let sqe = with_len(
            opcode::UringCmd80::new(types::Fd(7), CMD_REGISTER)
                .addr(Some(0xabc))
                .build(),
            2,
        );
        // SAFETY: see with_len.
        let bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(get_u32(&bytes, 24), 2, "len");
        assert_eq!(get_u64(&bytes, 16), 0xabc, "addr");
        assert_eq!(get_u32(&bytes, 4), 7, "fd");
    }
}
