//! flock(2) and POSIX record locks, held in meta so that every mount sees
//! every other mount's locks (3FS has none).
//!
//! Meta never blocks: a conflict answers EAGAIN. A blocking request
//! (SETLKW, or flock without LOCK_NB) is retried here with backoff until it
//! succeeds or the kernel interrupts it (a signal reached the caller), then
//! EINTR. The locks of this mount live under a lease in meta, renewed while
//! any lock may be held; a crashed mount's locks lapse with its lease.
//!
//! # Limits
//! A blocking wait holds a channel worker, so at most
//! `lock_waiters_max` (half the workers) wait at once; more get ENOLCK
//! rather than stalling the mount.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileLock;
use parking_lot::Mutex;
use r3fs_wire::meta::{
    GetLockRequest, LockKind, LockType, ReleaseLocksRequest, SetLockRequest, LOCK_END_EOF,
    LOCK_LEASE_RENEW_INTERVAL,
};

use super::{errno, meta_error, R3fs};
use crate::channel::current_request;

const FUSE_LK_FLOCK: u32 = 1;
const OPCODE_SETLKW: u32 = 33;
/// The kernel's "to end of file" (`OFFSET_MAX`).
const KERNEL_EOF: u64 = i64::MAX as u64;
const WAIT_BACKOFF_INITIAL: Duration = Duration::from_millis(1);
const WAIT_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// How long a non-blocking flock retries a conflict before EWOULDBLOCK.
///
/// The kernel drops a flock when the last fd of its open file description
/// closes, but tells the daemon with an asynchronous RELEASE: close()
/// returns before the lock is gone. A caller that closes and then locks
/// (on this mount or another on the same host) would see its own stale
/// lock. Retrying briefly lets that RELEASE land first.
const FLOCK_RELEASE_GRACE: Duration = Duration::from_millis(50);

/// Which (inode, owner, kind) took a lock on this mount, so close asks meta
/// to release only locks that may exist, and the lease is renewed only
/// while there are any.
pub(crate) struct LockOwners {
    owners: Mutex<HashSet<(u64, u64, bool)>>,
    waiters: AtomicUsize,
    waiters_max: usize,
    epoch: AtomicU64,
}

impl LockOwners {
    pub fn new(waiters_max: usize) -> LockOwners {
        LockOwners {
            owners: Mutex::new(HashSet::new()),
            waiters: AtomicUsize::new(0),
            waiters_max: waiters_max.max(1),
            epoch: AtomicU64::new(0),
        }
    }
}

fn lock_type(kernel: u32) -> io::Result<LockType> {
    match kernel as i32 {
        libc::F_RDLCK => Ok(LockType::Read),
        libc::F_WRLCK => Ok(LockType::Write),
        libc::F_UNLCK => Ok(LockType::Unlock),
        _ => Err(errno(libc::EINVAL)),
    }
}

fn kernel_type(t: LockType) -> u32 {
    (match t {
        LockType::Read => libc::F_RDLCK,
        LockType::Write => libc::F_WRLCK,
        LockType::Unlock => libc::F_UNLCK,
    }) as u32
}

fn to_meta_end(end: u64) -> u64 {
    if end >= KERNEL_EOF {
        LOCK_END_EOF
    } else {
        end
    }
}

fn to_kernel_end(end: u64) -> u64 {
    end.min(KERNEL_EOF)
}

fn kind(flags: u32) -> LockKind {
    if flags & FUSE_LK_FLOCK != 0 {
        LockKind::Flock
    } else {
        LockKind::Posix
    }
}

impl R3fs {
    pub(super) fn do_getlk(
        &self,
        inode: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        let req = GetLockRequest {
            inode,
            client: self.meta.client_id(),
            owner,
            kind: kind(flags),
            lock_type: lock_type(lock.lock_type)?,
            start: lock.start,
            end: to_meta_end(lock.end),
        };
        let held = self
            .block_on(self.meta.get_lock(req))
            .map_err(|e| meta_error("getlk", e))?;
        Ok(match held {
            None => FileLock {
                lock_type: libc::F_UNLCK as u32,
                ..lock
            },
            Some(h) => FileLock {
                start: h.start,
                end: to_kernel_end(h.end),
                lock_type: kernel_type(h.lock_type),
                // The kernel maps the pid into the caller's namespace (0 if
                // no such process exists here). A holder on another host
                // may share its pid with an unrelated local process, as
                // with NFS locks.
                pid: h.pid,
            },
        })
    }

    pub(super) fn do_setlk(
        &self,
        inode: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let kind = kind(flags);
        let req = SetLockRequest {
            inode,
            client: self.meta.client_id(),
            owner,
            pid: lock.pid,
            kind,
            lock_type: lock_type(lock.lock_type)?,
            start: lock.start,
            end: to_meta_end(lock.end),
        };
        if req.lock_type != LockType::Unlock {
            // Record first: a lock may exist in meta even if the answer is lost.
            self.locks
                .owners
                .lock()
                .insert((inode, owner, kind == LockKind::Flock));
        }
        let (opcode, unique) = current_request();
        let blocking = opcode == OPCODE_SETLKW;
        match self.set_lock(&req) {
            Err(e) if blocking && e.errno() == libc::EAGAIN => self.wait_for_lock(req, unique),
            Err(e) if kind == LockKind::Flock && e.errno() == libc::EAGAIN => {
                self.retry_flock(req, unique)
            }
            r => r.map_err(|e| meta_error("setlk", e)),
        }
    }

    /// One attempt at `req`. Meta refuses locks (ENOLCK) once this mount's
    /// lease lapsed, which happens whenever it held no locks for a lease
    /// period: renew and try once more.
    fn set_lock(&self, req: &SetLockRequest) -> Result<(), r3fs_client::meta::MetaClientError> {
        match self.block_on(self.meta.set_lock(req.clone())) {
            Err(e) if e.errno() == libc::ENOLCK => {
                let lease = self.block_on(self.meta.renew_lock_lease(self.meta.client_id()))?;
                self.locks.epoch.store(lease.epoch, Ordering::Release);
                self.block_on(self.meta.set_lock(req.clone()))
            }
            r => r,
        }
    }

    /// A non-blocking flock that conflicted: retry within
    /// [`FLOCK_RELEASE_GRACE`], then EWOULDBLOCK.
    fn retry_flock(&self, req: SetLockRequest, unique: u64) -> io::Result<()> {
        let deadline = std::time::Instant::now() + FLOCK_RELEASE_GRACE;
        let mut backoff = WAIT_BACKOFF_INITIAL;
        loop {
            if std::time::Instant::now() >= deadline || self.interrupts.is_interrupted(unique) {
                return Err(errno(libc::EAGAIN));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(WAIT_BACKOFF_MAX);
            match self.set_lock(&req) {
                Err(e) if e.errno() == libc::EAGAIN => continue,
                r => return r.map_err(|e| meta_error("flock", e)),
            }
        }
    }

    /// Retries a conflicting blocking lock until it is granted or the kernel
    /// interrupts request `unique`.
    fn wait_for_lock(&self, req: SetLockRequest, unique: u64) -> io::Result<()> {
        let waiters = &self.locks.waiters;
        if waiters.fetch_add(1, Ordering::AcqRel) >= self.locks.waiters_max {
            waiters.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                inode = req.inode,
                "too many blocked lock waits; answering ENOLCK"
            );
            return Err(errno(libc::ENOLCK));
        }
        let mut backoff = WAIT_BACKOFF_INITIAL;
        let result = loop {
            if self.interrupts.is_interrupted(unique) {
                break Err(errno(libc::EINTR));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(WAIT_BACKOFF_MAX);
            match self.set_lock(&req) {
                Err(e) if e.errno() == libc::EAGAIN => continue,
                r => break r.map_err(|e| meta_error("setlkw", e)),
            }
        };
        waiters.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn release(&self, inode: u64, owner: u64, kind: LockKind) {
        let key = (inode, owner, kind == LockKind::Flock);
        if !self.locks.owners.lock().remove(&key) {
            return;
        }
        let req = ReleaseLocksRequest {
            inode,
            client: self.meta.client_id(),
            owner,
            kind,
        };
        if let Err(e) = self.block_on(self.meta.release_locks(req)) {
            // The locks stay until the lease of this mount lapses.
            tracing::warn!(inode, owner, error = %e, "releasing locks failed");
        }
    }

    /// A close: POSIX drops every record lock the closing owner holds on
    /// the file, whichever fd took it.
    pub(super) fn release_posix_locks(&self, inode: u64, owner: u64) {
        self.release(inode, owner, LockKind::Posix);
    }

    /// The last close of an open file description drops its flock.
    pub(super) fn release_flock(&self, inode: u64, owner: u64) {
        self.release(inode, owner, LockKind::Flock);
    }

    /// Keeps this mount's lock lease alive in meta while it may hold locks.
    pub async fn renew_locks_forever(&self) {
        let mut tick = tokio::time::interval(LOCK_LEASE_RENEW_INTERVAL);
        loop {
            tick.tick().await;
            if self.locks.owners.lock().is_empty() {
                continue;
            }
            match self.meta.renew_lock_lease(self.meta.client_id()).await {
                Ok(lease) => {
                    let old = self.locks.epoch.swap(lease.epoch, Ordering::AcqRel);
                    if old != 0 && old != lease.epoch {
                        tracing::error!(
                            "this mount's lock lease lapsed (meta unreachable too long): every lock it held is lost"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "renewing the lock lease failed"),
            }
        }
    }

    /// Drops every lock this mount holds (clean unmount).
    pub async fn drop_locks(&self) {
        if let Err(e) = self.meta.drop_client_locks(self.meta.client_id()).await {
            tracing::warn!(error = %e, "dropping this mount's locks failed; they lapse with its lease");
        }
    }
}
