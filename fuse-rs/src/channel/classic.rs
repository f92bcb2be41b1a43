//! Classic FUSE waiting: a worker blocks in `read(2)` on the shared session
//! fd until the kernel hands it a request.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::Ordering;

use super::{ChannelEnd, ChannelStats, Dispatch, REQUEST_BYTES_MAX};

/// Serves requests from `fd` until the mount goes away.
pub fn serve(fd: RawFd, dispatch: &dyn Dispatch, stats: &ChannelStats) -> ChannelEnd {
    // SAFETY: the session owns `fd` and outlives every channel loop (the
    // loops are joined before the session is dropped).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut request = vec![0u8; REQUEST_BYTES_MAX];
    let mut reply = vec![0u8; REQUEST_BYTES_MAX];
    loop {
        stats.blocking_waits.fetch_add(1, Ordering::Relaxed);
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
        stats.requests.fetch_add(1, Ordering::Relaxed);
        dispatch.dispatch(fd, &mut request[..len], &mut reply);
    }
}
