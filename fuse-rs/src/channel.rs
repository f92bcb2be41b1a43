//! Kernel channels: reading requests from a `/dev/fuse` fd and answering
//! them on the same fd.
//!
//! A channel is an fd plus the worker threads that read it. Today every
//! worker reads the session fd (classic FUSE, what libfuse does without
//! `clone_fd`); the loop is ours, not fuse-backend-rs's, so that cloned fds
//! and other channel kinds can reuse it and an upgrade can take the fd.
//!
//! fuse-backend-rs's `Server::handle_message` decodes and dispatches. Before
//! handing it a request the loop peeks at the header: INTERRUPTs are
//! recorded in [`Interrupts`] (the library ignores them), and the opcode and
//! unique id of the request being served are kept in a thread-local so the
//! file system can tell SETLKW from SETLK (the library sends both to
//! `setlk`).
//!
//! # Limits
//! A read buffer holds [`REQUEST_BYTES_MAX`]; the kernel never sends more
//! than `max_write` plus headers, and we advertise 1 MiB.

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};
use parking_lot::Mutex;

/// Largest request the kernel sends us: 1 MiB of data plus headers.
pub const REQUEST_BYTES_MAX: usize = (1 << 20) + 64 * 1024;
/// Interrupted request ids remembered (oldest forgotten first).
pub const INTERRUPTS_REMEMBERED_MAX: usize = 1024;

const OPCODE_INTERRUPT: u32 = 36;
/// Size of `fuse_in_header`.
const IN_HEADER_BYTES: usize = 40;

thread_local! {
    static CURRENT: Cell<(u32, u64)> = const { Cell::new((0, 0)) };
}

/// The opcode and unique id of the request this thread is serving.
pub fn current_request() -> (u32, u64) {
    CURRENT.with(|c| c.get())
}

/// Request ids the kernel asked us to interrupt, so a long wait (a blocking
/// lock) can give up with EINTR.
#[derive(Default)]
pub struct Interrupts {
    ids: Mutex<VecDeque<u64>>,
}

impl Interrupts {
    fn record(&self, unique: u64) {
        let mut ids = self.ids.lock();
        if ids.len() == INTERRUPTS_REMEMBERED_MAX {
            ids.pop_front();
        }
        ids.push_back(unique);
    }

    /// Whether the kernel asked to interrupt request `unique`.
    pub fn is_interrupted(&self, unique: u64) -> bool {
        self.ids.lock().contains(&unique)
    }
}

/// Why a channel loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelEnd {
    /// The file system was unmounted (ENODEV) or the connection aborted.
    Unmounted,
    /// Reading the fd failed in a way we cannot serve through.
    Failed(i32),
}

/// Serves requests from `fd` until the mount goes away. Every reply is
/// written to `fd`, the fd that delivered the request.
pub fn serve<F>(fd: RawFd, server: &Server<Arc<F>>, interrupts: &Interrupts) -> ChannelEnd
where
    F: FileSystem + Send + Sync,
{
    // SAFETY: the session owns `fd` and outlives every channel loop (the
    // loops are joined before the session is dropped).
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut request = vec![0u8; REQUEST_BYTES_MAX];
    let mut reply = vec![0u8; REQUEST_BYTES_MAX];
    loop {
        let len = match nix::unistd::read(borrowed, &mut request) {
            Ok(0) => return ChannelEnd::Unmounted,
            Ok(n) => n,
            // ENOENT: the request we were about to read was interrupted.
            Err(nix::errno::Errno::ENOENT)
            | Err(nix::errno::Errno::EINTR)
            | Err(nix::errno::Errno::EAGAIN) => continue,
            Err(nix::errno::Errno::ENODEV) => return ChannelEnd::Unmounted,
            Err(e) => return ChannelEnd::Failed(e as i32),
        };
        dispatch(fd, &mut request[..len], &mut reply, server, interrupts);
    }
}

fn dispatch<F>(
    fd: RawFd,
    request: &mut [u8],
    reply: &mut [u8],
    server: &Server<Arc<F>>,
    interrupts: &Interrupts,
) where
    F: FileSystem + Send + Sync,
{
    let (opcode, unique) = peek_header(request);
    if opcode == OPCODE_INTERRUPT {
        if let Some(target) = interrupt_target(request) {
            interrupts.record(target);
        }
    }
    CURRENT.with(|c| c.set((opcode, unique)));
    let reader = match Reader::from_fuse_buffer(FuseBuf::new(request)) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot wrap a FUSE request buffer");
            return;
        }
    };
    let writer = match FuseDevWriter::<()>::new(fd, reply) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot wrap a FUSE reply buffer");
            return;
        }
    };
    if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
        // The kernel gets no answer for a request we could not decode; it
        // waits until the mount is aborted. Log loudly.
        tracing::warn!(opcode, unique, error = %e, "FUSE request failed to decode or reply");
    }
    CURRENT.with(|c| c.set((0, 0)));
}

/// `(opcode, unique)` from a request's `fuse_in_header`, or zeros when the
/// buffer is too short (the server then rejects it).
fn peek_header(request: &[u8]) -> (u32, u64) {
    if request.len() < IN_HEADER_BYTES {
        return (0, 0);
    }
    let opcode = u32::from_ne_bytes(request[4..8].try_into().unwrap_or_default());
    let unique = u64::from_ne_bytes(request[8..16].try_into().unwrap_or_default());
    (opcode, unique)
}

/// The `unique` an INTERRUPT names (`fuse_interrupt_in` follows the header).
fn interrupt_target(request: &[u8]) -> Option<u64> {
    let bytes = request.get(IN_HEADER_BYTES..IN_HEADER_BYTES + 8)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_peek_reads_opcode_and_unique_and_tolerates_short_buffers() {
        let mut req = vec![0u8; 48];
        req[4..8].copy_from_slice(&OPCODE_INTERRUPT.to_ne_bytes());
        req[8..16].copy_from_slice(&77u64.to_ne_bytes());
        req[40..48].copy_from_slice(&5u64.to_ne_bytes());
        assert_eq!(peek_header(&req), (OPCODE_INTERRUPT, 77));
        assert_eq!(interrupt_target(&req), Some(5));
        assert_eq!(peek_header(&req[..10]), (0, 0));
        assert_eq!(interrupt_target(&req[..44]), None);
    }

    #[test]
    fn interrupts_forget_the_oldest_beyond_the_limit() {
        let i = Interrupts::default();
        for u in 0..(INTERRUPTS_REMEMBERED_MAX as u64 + 1) {
            i.record(u);
        }
        assert!(!i.is_interrupted(0));
        assert!(i.is_interrupted(1));
        assert!(i.is_interrupted(INTERRUPTS_REMEMBERED_MAX as u64));
    }
}
