//! [`MetaStore`]: every meta operation as a KV transaction.
//!
//! Each public method runs one retried transaction ([`r3fs_kv::run`]) whose
//! body is idempotent: ids and session numbers are chosen outside the body and
//! reused by retries. Checks (existence, type, permission) happen inside the
//! transaction, so a concurrent change either is seen or conflicts. The one
//! exception is `drop_client_locks`, a bounded series of transactions (its
//! first one voids all the client's locks at once).

mod file;
mod lock;
mod namespace;
mod xattr;

pub use file::GC_LIST_MAX;
pub use lock::{LOCKS_PER_INODE_MAX, LOCK_DROP_BATCH_MAX, LOCK_DROP_ROUNDS_MAX};
pub use xattr::{XATTRS_PER_INODE_MAX, XATTR_LIST_BYTES_MAX};

use std::path::PathBuf;
use std::sync::Arc;

use r3fs_kv::{AtomicOp, KvEngine, RangeOptions, RetryPolicy, Transaction};
use r3fs_wire::meta::{Attr, FileType, InodeId, LockKind, Time, ROOT_INODE};

use crate::alloc::InodeAllocator;
use crate::clock::{Clock, SystemClock};
use crate::config::MetaConfig;
use crate::error::{errno, fail, MetaError};
use crate::schema::{self, DentryRecord, InodeRecord};

/// Most hard links one inode may have (Linux ext4 allows 65,000).
pub const LINKS_MAX: u32 = 65_000;
/// Most directory levels `rename` walks up when checking for a cycle.
pub const DEPTH_MAX: usize = 4096;

/// The meta service's state machine over a KV engine. Stateless apart from the
/// inode id block it hands out from; any number of `MetaStore`s, in one process
/// or many, can serve one engine.
pub struct MetaStore {
    engine: Arc<dyn KvEngine>,
    config: MetaConfig,
    alloc: InodeAllocator,
    retry: RetryPolicy,
    /// Where statfs measures capacity when the config does not set it.
    data_dir: Option<PathBuf>,
    clock: Arc<dyn Clock>,
}

impl MetaStore {
    /// Opens the namespace in `engine`, creating the root directory (owned by
    /// root, mode 0755) the first time.
    pub fn new(
        engine: Arc<dyn KvEngine>,
        config: MetaConfig,
        data_dir: Option<PathBuf>,
    ) -> Result<MetaStore, MetaError> {
        MetaStore::with_clock(engine, config, data_dir, Arc::new(SystemClock))
    }

    /// [`MetaStore::new`] reading the time from `clock` (tests move it to
    /// expire lock leases).
    pub fn with_clock(
        engine: Arc<dyn KvEngine>,
        config: MetaConfig,
        data_dir: Option<PathBuf>,
        clock: Arc<dyn Clock>,
    ) -> Result<MetaStore, MetaError> {
        config
            .validate()
            .map_err(|e| errno!(EINVAL, "meta config: {e}"))?;
        let store = MetaStore {
            alloc: InodeAllocator::new(engine.clone()),
            engine,
            config,
            retry: RetryPolicy::default(),
            data_dir,
            clock,
        };
        store.ensure_root()?;
        Ok(store)
    }

    pub fn config(&self) -> &MetaConfig {
        &self.config
    }

    fn ensure_root(&self) -> Result<(), MetaError> {
        self.run(|tx| {
            if tx.inode(ROOT_INODE)?.is_some() {
                return Ok(());
            }
            let now = tx.now;
            let root = InodeRecord {
                file_type: FileType::Directory,
                perm: 0o755,
                uid: 0,
                gid: 0,
                nlink: 1,
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
                rdev: 0,
                layout: None,
                truncate_ver: 0,
                parent: ROOT_INODE,
                target: None,
            };
            tx.put_inode(ROOT_INODE, &root)?;
            tx.t.set(
                &schema::dir_mtime_key(ROOT_INODE),
                &now.as_nanos().to_le_bytes(),
            )?;
            tx.add_counter(schema::COUNTER_INODES, 1)?;
            Ok(())
        })
    }

    /// Runs `body` in a retried transaction with a [`Tx`] view.
    fn run<T>(
        &self,
        mut body: impl FnMut(&mut Tx<'_>) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        r3fs_kv::run(self.engine.as_ref(), self.retry, |txn| {
            let mut tx = Tx {
                t: txn,
                now: self.clock.now(),
            };
            body(&mut tx)
        })
    }
}

/// A transaction with typed accessors for the meta schema.
pub(crate) struct Tx<'a> {
    pub t: &'a mut dyn Transaction,
    /// The time this attempt stamps on what it changes.
    pub now: Time,
}

impl Tx<'_> {
    pub fn inode(&mut self, id: InodeId) -> Result<Option<InodeRecord>, MetaError> {
        let key = schema::inode_key(id);
        match self.t.get(&key)? {
            Some(bytes) => Ok(Some(schema::decode(&key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// The inode, or ENOENT.
    pub fn existing(&mut self, id: InodeId) -> Result<InodeRecord, MetaError> {
        self.inode(id)?
            .ok_or_else(|| errno!(ENOENT, "inode {id} does not exist"))
    }

    /// The inode if it is a directory; ENOENT or ENOTDIR otherwise.
    pub fn dir(&mut self, id: InodeId) -> Result<InodeRecord, MetaError> {
        let rec = self.existing(id)?;
        if rec.file_type != FileType::Directory {
            fail!(ENOTDIR, "inode {id} is not a directory");
        }
        Ok(rec)
    }

    pub fn put_inode(&mut self, id: InodeId, rec: &InodeRecord) -> Result<(), MetaError> {
        assert!(
            rec.file_type != FileType::Directory || rec.nlink == 1,
            "directories store nlink 1"
        );
        self.t.set(&schema::inode_key(id), &schema::encode(rec))?;
        Ok(())
    }

    /// The attributes clients see. Directories add their entry-change mtime and
    /// subdirectory count, which live in keys of their own; those are snapshot
    /// reads so that returning a directory's attributes never makes a
    /// transaction conflict with entry changes in it.
    pub fn attr(&mut self, id: InodeId, rec: &InodeRecord) -> Result<Attr, MetaError> {
        let mut attr = Attr {
            inode: id,
            file_type: rec.file_type,
            perm: rec.perm,
            uid: rec.uid,
            gid: rec.gid,
            nlink: rec.nlink,
            size: rec.size,
            atime: rec.atime,
            mtime: rec.mtime,
            ctime: rec.ctime,
            rdev: rec.rdev,
            layout: rec.layout.clone(),
            truncate_ver: rec.truncate_ver,
        };
        if rec.file_type == FileType::Directory {
            let mkey = schema::dir_mtime_key(id);
            if let Some(v) = self.t.snapshot_get(&mkey)? {
                attr.mtime = Time::from_nanos(schema::decode_u64(&mkey, &v)?);
                attr.ctime = attr.ctime.max(attr.mtime);
            }
            let nkey = schema::dir_subdirs_key(id);
            let subdirs = match self.t.snapshot_get(&nkey)? {
                Some(v) => schema::decode_u64(&nkey, &v)?,
                None => 0,
            };
            attr.nlink = 2u64.saturating_add(subdirs).min(u32::MAX as u64) as u32;
        }
        Ok(attr)
    }

    pub fn dentry(
        &mut self,
        parent: InodeId,
        name: &[u8],
    ) -> Result<Option<DentryRecord>, MetaError> {
        let key = schema::dentry_key(parent, name);
        match self.t.get(&key)? {
            Some(bytes) => Ok(Some(schema::decode(&key, &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn put_dentry(
        &mut self,
        parent: InodeId,
        name: &[u8],
        d: DentryRecord,
    ) -> Result<(), MetaError> {
        self.t
            .set(&schema::dentry_key(parent, name), &schema::encode(&d))?;
        Ok(())
    }

    pub fn clear_dentry(&mut self, parent: InodeId, name: &[u8]) -> Result<(), MetaError> {
        self.t.clear(&schema::dentry_key(parent, name))?;
        Ok(())
    }

    /// Sets a directory's mtime (and so ctime) to at least now, without a read
    /// conflict: concurrent entry changes in one directory do not collide here.
    pub fn touch_dir(&mut self, dir: InodeId) -> Result<(), MetaError> {
        self.t.atomic_op(
            &schema::dir_mtime_key(dir),
            AtomicOp::Max,
            self.now.as_nanos(),
        )?;
        Ok(())
    }

    pub fn add_subdirs(&mut self, dir: InodeId, delta: i64) -> Result<(), MetaError> {
        self.t
            .atomic_op(&schema::dir_subdirs_key(dir), AtomicOp::Add, delta as u64)?;
        Ok(())
    }

    pub fn add_counter(&mut self, name: &[u8], delta: i64) -> Result<(), MetaError> {
        self.t
            .atomic_op(&schema::counter_key(name), AtomicOp::Add, delta as u64)?;
        Ok(())
    }

    /// Whether any session holds the inode open. Reads the session range, so a
    /// concurrent open or close conflicts with this transaction.
    pub fn has_sessions(&mut self, id: InodeId) -> Result<bool, MetaError> {
        let prefix = schema::session_prefix(id);
        let end = r3fs_kv::prefix_end(&prefix).expect("session prefix has a non-0xff byte");
        let opts = RangeOptions {
            limit: 1,
            ..RangeOptions::default()
        };
        Ok(!self.t.get_range(&prefix, &end, opts)?.kvs.is_empty())
    }

    /// Removes one link to `id`. The inode goes away with its last link unless
    /// a session still holds it open; then it stays with nlink 0 until the last
    /// session closes.
    pub fn drop_link(&mut self, id: InodeId, mut rec: InodeRecord) -> Result<(), MetaError> {
        if rec.nlink == 0 {
            return Err(MetaError::Corrupt {
                key: schema::printable(&schema::inode_key(id)),
                reason: "a directory entry points at an inode with nlink 0".into(),
            });
        }
        rec.nlink -= 1;
        rec.ctime = self.now;
        if rec.nlink > 0 || self.has_sessions(id)? {
            return self.put_inode(id, &rec);
        }
        self.destroy(id, &rec)
    }

    /// Deletes an inode with no links and no sessions, and queues a regular
    /// file's chunks for garbage collection. Its locks go with it (their
    /// clients' index entries stay until those clients drop their locks).
    pub fn destroy(&mut self, id: InodeId, rec: &InodeRecord) -> Result<(), MetaError> {
        assert!(id != ROOT_INODE, "the root directory is never destroyed");
        self.t.clear(&schema::inode_key(id))?;
        let xattrs = schema::xattr_prefix(id);
        let end = r3fs_kv::prefix_end(&xattrs).expect("xattr prefix has a non-0xff byte");
        self.t.clear_range(&xattrs, &end)?;
        for kind in [LockKind::Flock, LockKind::Posix] {
            let locks = schema::lock_prefix(id, kind);
            let end = r3fs_kv::prefix_end(&locks).expect("lock prefix has a non-0xff byte");
            self.t.clear_range(&locks, &end)?;
        }
        if rec.file_type == FileType::Directory {
            self.t.clear(&schema::dir_mtime_key(id))?;
            self.t.clear(&schema::dir_subdirs_key(id))?;
        }
        if let (FileType::Regular, Some(layout)) = (rec.file_type, &rec.layout) {
            let entry = schema::GcRecord {
                inode: id,
                layout: layout.clone(),
                length: rec.size,
                queued_at: self.now,
            };
            self.t.set(&schema::gc_key(id), &schema::encode(&entry))?;
            self.add_counter(schema::COUNTER_BYTES, -(rec.size as i64))?;
        }
        self.add_counter(schema::COUNTER_INODES, -1)?;
        Ok(())
    }
}

/// Checks a name for a new or existing entry: not empty, at most 255 bytes,
/// no `/` or NUL. `.` and `..` are refused with `dots_errno`.
pub(crate) fn validate_name(name: &[u8], dots_errno: i32) -> Result<(), MetaError> {
    if name.is_empty() {
        fail!(ENOENT, "empty name");
    }
    if name.len() > r3fs_wire::meta::NAME_BYTES_MAX {
        fail!(ENAMETOOLONG, "name of {} bytes exceeds 255", name.len());
    }
    if name.contains(&b'/') || name.contains(&0) {
        fail!(
            EINVAL,
            "name {:?} contains '/' or NUL",
            String::from_utf8_lossy(name)
        );
    }
    if name == b"." || name == b".." {
        return Err(MetaError::Errno {
            errno: dots_errno,
            message: format!("'{}' cannot be used here", String::from_utf8_lossy(name)),
        });
    }
    Ok(())
}
