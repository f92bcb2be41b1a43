//! The meta RPC service: every method of [`r3fs_wire::meta`] registered on an
//! `r3fs-net` router, answered by a shared [`MetaStore`].
//!
//! Calls that may write run on tokio's blocking pool, because a commit waits
//! for the engine's group fsync. Read-only calls run on the async workers: they
//! read the engine's in-memory state and return at once, and a hop to the
//! blocking pool would cost more than the read.

use std::sync::Arc;

use r3fs_net::Router;
use r3fs_wire::meta::*;
use r3fs_wire::{ErrorBody, ErrorCode};

use crate::{MetaError, MetaStore};

/// Registers every meta method on `router`, served by `store`.
pub fn register(router: &mut Router, store: Arc<MetaStore>) {
    macro_rules! inline {
        ($method:ty, |$s:ident, $r:ident| $call:expr) => {{
            let store = store.clone();
            router.register::<$method, _, _>(move |$r, _ctx| {
                let $s = store.clone();
                async move { answer($call) }
            });
        }};
    }
    macro_rules! blocking {
        ($method:ty, |$s:ident, $r:ident| $call:expr) => {{
            let store = store.clone();
            router.register::<$method, _, _>(move |$r, _ctx| {
                let $s = store.clone();
                async move { on_blocking_pool(move || $call).await }
            });
        }};
    }
    inline!(StatFs, |s, _r| s.statfs());
    inline!(Lookup, |s, r| s.lookup(&r));
    inline!(GetAttr, |s, r| s.getattr(r.inode));
    inline!(ReadLink, |s, r| s.readlink(r.inode));
    inline!(ReadDir, |s, r| s.readdir(&r));
    inline!(Access, |s, r| s.access(&r));
    inline!(GetXattr, |s, r| s.getxattr(&r));
    inline!(ListXattr, |s, r| s.listxattr(&r));
    inline!(GcList, |s, r| s.gc_list(r.limit));
    blocking!(Create, |s, r| s.create(&r));
    blocking!(Mkdir, |s, r| s.mkdir(&r));
    blocking!(Mknod, |s, r| s.mknod(&r));
    blocking!(Symlink, |s, r| s.symlink(&r));
    blocking!(Link, |s, r| s.link(&r));
    blocking!(Unlink, |s, r| s.unlink(&r));
    blocking!(Rmdir, |s, r| s.rmdir(&r));
    blocking!(Rename, |s, r| s.rename(&r));
    blocking!(SetAttr, |s, r| s.setattr(&r));
    blocking!(Open, |s, r| s.open(&r));
    blocking!(Close, |s, r| s.close(&r));
    blocking!(Sync, |s, r| s.sync(&r));
    blocking!(SetXattr, |s, r| s.setxattr(&r));
    blocking!(RemoveXattr, |s, r| s.removexattr(&r));
    blocking!(GcDone, |s, r| s.gc_done(&r.inodes));
    // Lock calls may write even when they only ask: they remove expired locks.
    blocking!(SetLock, |s, r| s.set_lock(&r));
    blocking!(GetLock, |s, r| s.get_lock(&r));
    blocking!(ReleaseLocks, |s, r| s.release_locks(&r));
    blocking!(RenewLockLease, |s, r| s.renew_lock_lease(r.client));
    blocking!(DropClientLocks, |s, r| s.drop_client_locks(&r));
}

fn answer<T>(result: Result<T, MetaError>) -> Result<T, ErrorBody> {
    result.map_err(|e| {
        if e.errno().is_none() {
            tracing::error!(error = %e, "meta call failed");
        }
        e.to_error_body()
    })
}

async fn on_blocking_pool<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, MetaError> + Send + 'static,
) -> Result<T, ErrorBody> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => answer(result),
        Err(e) => Err(ErrorBody {
            code: ErrorCode::Internal,
            message: format!("meta call panicked or was cancelled: {e}"),
        }),
    }
}
