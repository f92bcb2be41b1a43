//! Inode calls: attributes, open and close with sessions, length hints,
//! access checks, statfs, readlink, and the GC queue storage consumes.

use r3fs_kv::RangeOptions;
use r3fs_wire::meta::{
    AccessRequest, Attr, CloseRequest, FileType, GcEntry, InodeId, LengthHint, OpenFlags,
    OpenRequest, OpenResponse, SetAttrRequest, SetTime, StatFsResponse, SyncRequest, User,
    NAME_BYTES_MAX,
};

use super::{MetaStore, Tx};
use crate::error::{fail, MetaError};
use crate::perm::{self, EXEC, READ, S_ISGID, S_ISUID, WRITE};
use crate::schema::{self, InodeRecord, SessionRecord};

/// Most GC entries one `gc_list` returns.
pub const GC_LIST_MAX: u32 = 1024;

impl MetaStore {
    pub fn getattr(&self, inode: InodeId) -> Result<Attr, MetaError> {
        self.run(|tx| {
            let rec = tx.existing(inode)?;
            tx.attr(inode, &rec)
        })
    }

    pub fn readlink(&self, inode: InodeId) -> Result<Vec<u8>, MetaError> {
        self.run(|tx| {
            let rec = tx.existing(inode)?;
            match rec.target {
                Some(target) if rec.file_type == FileType::Symlink => Ok(target),
                _ => fail!(EINVAL, "inode {inode} is not a symlink"),
            }
        })
    }

    pub fn access(&self, req: &AccessRequest) -> Result<(), MetaError> {
        self.run(|tx| {
            let rec = tx.existing(req.inode)?;
            let mask = req.mask & (READ | WRITE | EXEC);
            perm::check(&rec, &req.user, mask, "access the file as asked")
        })
    }

    pub fn open(&self, req: &OpenRequest) -> Result<OpenResponse, MetaError> {
        let session: u64 = rand::random();
        self.run(|tx| {
            let (attr, session) =
                self.open_in(tx, req.inode, &req.user, req.flags, req.client, session)?;
            Ok(OpenResponse {
                attr,
                session,
                created: false,
            })
        })
    }

    /// Opens an existing inode inside a transaction: type and permission
    /// checks, truncation, and a session for writers and holders.
    pub(super) fn open_in(
        &self,
        tx: &mut Tx<'_>,
        inode: InodeId,
        user: &User,
        flags: OpenFlags,
        client: u64,
        session: u64,
    ) -> Result<(Attr, Option<u64>), MetaError> {
        let mut rec = tx.existing(inode)?;
        let writes = flags.write || flags.truncate;
        match rec.file_type {
            FileType::Directory if writes => fail!(EISDIR, "inode {inode} is a directory"),
            FileType::Symlink => fail!(ELOOP, "inode {inode} is a symlink"),
            _ => {}
        }
        let mask = if flags.read { READ } else { 0 } | if writes { WRITE } else { 0 };
        perm::check(&rec, user, mask, "open the file as asked")?;
        if flags.truncate && rec.file_type == FileType::Regular && rec.size > 0 {
            truncate(tx, &mut rec, 0)?;
            tx.put_inode(inode, &rec)?;
        }
        let session = if rec.file_type == FileType::Regular && (flags.write || flags.hold) {
            tx.put_session(inode, session, client, flags.write)?;
            Some(session)
        } else {
            None
        };
        Ok((tx.attr(inode, &rec)?, session))
    }

    /// Ends a session, applies the writer's length hint, and removes the inode
    /// if it was unlinked and this was the last session holding it.
    pub fn close(&self, req: &CloseRequest) -> Result<Attr, MetaError> {
        self.run(|tx| {
            let mut rec = tx.existing(req.inode)?;
            if let Some(session) = req.session {
                tx.t.clear(&schema::session_key(req.inode, session))?;
            }
            apply_hint(tx, &mut rec, req.hint, req.touched)?;
            let attr = tx.attr(req.inode, &rec)?;
            if rec.nlink == 0 && !tx.has_sessions(req.inode)? {
                tx.destroy(req.inode, &rec)?;
            } else {
                tx.put_inode(req.inode, &rec)?;
            }
            Ok(attr)
        })
    }

    /// Applies a writer's length hint (fsync, or a periodic flush).
    pub fn sync(&self, req: &SyncRequest) -> Result<Attr, MetaError> {
        self.run(|tx| {
            let mut rec = tx.existing(req.inode)?;
            if apply_hint(tx, &mut rec, req.hint, req.touched)? {
                tx.put_inode(req.inode, &rec)?;
            }
            tx.attr(req.inode, &rec)
        })
    }

    pub fn setattr(&self, req: &SetAttrRequest) -> Result<Attr, MetaError> {
        self.run(|tx| {
            let mut rec = tx.existing(req.inode)?;
            set_attr(tx, &mut rec, req)?;
            rec.ctime = tx.now;
            tx.put_inode(req.inode, &rec)?;
            tx.attr(req.inode, &rec)
        })
    }

    pub fn statfs(&self) -> Result<StatFsResponse, MetaError> {
        let (inodes_used, used_bytes) = self.run(|tx| {
            let inodes = read_counter(tx, schema::COUNTER_INODES)?;
            let bytes = read_counter(tx, schema::COUNTER_BYTES)?;
            Ok((inodes, bytes))
        })?;
        let capacity_bytes = match (self.config.capacity_bytes, &self.data_dir) {
            (Some(bytes), _) => bytes,
            (None, Some(dir)) => match nix::sys::statvfs::statvfs(dir) {
                Ok(st) => st.blocks().saturating_mul(st.fragment_size()),
                Err(e) => fail!(EIO, "statvfs of data directory {}: {e}", dir.display()),
            },
            (None, None) => u64::MAX / 2,
        };
        Ok(StatFsResponse {
            capacity_bytes,
            used_bytes,
            free_bytes: capacity_bytes.saturating_sub(used_bytes),
            inodes_used,
            name_bytes_max: NAME_BYTES_MAX as u32,
        })
    }

    /// Removed files whose chunks still need deleting, oldest inode first.
    pub fn gc_list(&self, limit: u32) -> Result<Vec<GcEntry>, MetaError> {
        let limit = limit.clamp(1, GC_LIST_MAX) as usize;
        self.run(|tx| {
            let begin = schema::GC_QUEUE.to_vec();
            let end = r3fs_kv::prefix_end(&begin).expect("GC prefix has a non-0xff byte");
            let opts = RangeOptions {
                limit,
                snapshot: true,
                ..RangeOptions::default()
            };
            let range = tx.t.get_range(&begin, &end, opts)?;
            range
                .kvs
                .iter()
                .map(|kv| schema::decode(&kv.key, &kv.value))
                .collect()
        })
    }

    /// Drops GC entries whose chunks storage has deleted.
    pub fn gc_done(&self, inodes: &[InodeId]) -> Result<(), MetaError> {
        self.run(|tx| {
            for &inode in inodes {
                tx.t.clear(&schema::gc_key(inode))?;
            }
            Ok(())
        })
    }
}

impl Tx<'_> {
    pub fn put_session(
        &mut self,
        inode: InodeId,
        session: u64,
        client: u64,
        write: bool,
    ) -> Result<(), MetaError> {
        let rec = SessionRecord {
            client,
            opened_at: self.now,
            write,
        };
        self.t
            .set(&schema::session_key(inode, session), &schema::encode(&rec))?;
        Ok(())
    }
}

fn read_counter(tx: &mut Tx<'_>, name: &[u8]) -> Result<u64, MetaError> {
    let key = schema::counter_key(name);
    match tx.t.snapshot_get(&key)? {
        Some(v) => schema::decode_u64(&key, &v),
        None => Ok(0),
    }
}

/// Sets the length to `size`, bumping the truncate version so that length
/// hints from writes issued before the truncate cannot grow the file back.
fn truncate(tx: &mut Tx<'_>, rec: &mut InodeRecord, size: u64) -> Result<(), MetaError> {
    tx.add_counter(schema::COUNTER_BYTES, size as i64 - rec.size as i64)?;
    rec.size = size;
    rec.truncate_ver += 1;
    rec.mtime = tx.now;
    rec.ctime = tx.now;
    Ok(())
}

/// Grows the length to the hint if it was written under the current truncate
/// version; a hint never shrinks a file. Returns whether `rec` changed.
fn apply_hint(
    tx: &mut Tx<'_>,
    rec: &mut InodeRecord,
    hint: Option<LengthHint>,
    touched: bool,
) -> Result<bool, MetaError> {
    let mut changed = false;
    if let Some(h) = hint {
        if h.truncate_ver == rec.truncate_ver && h.length > rec.size {
            tx.add_counter(schema::COUNTER_BYTES, (h.length - rec.size) as i64)?;
            rec.size = h.length;
            changed = true;
        }
    }
    if touched {
        rec.mtime = tx.now;
        rec.ctime = tx.now;
        changed = true;
    }
    Ok(changed)
}

/// The POSIX rules of chmod, chown, truncate and utimens.
fn set_attr(tx: &mut Tx<'_>, rec: &mut InodeRecord, req: &SetAttrRequest) -> Result<(), MetaError> {
    let user = &req.user;
    let inode = req.inode;
    if let Some(size) = req.size {
        match rec.file_type {
            FileType::Regular => {}
            FileType::Directory => fail!(EISDIR, "cannot truncate directory {inode}"),
            _ => fail!(
                EINVAL,
                "cannot truncate inode {inode} of type {:?}",
                rec.file_type
            ),
        }
        if !req.via_write_handle {
            perm::check(rec, user, WRITE, "truncate the file")?;
        }
        if size != rec.size {
            truncate(tx, rec, size)?;
        } else {
            rec.mtime = tx.now;
        }
    }
    if req.uid.is_some() || req.gid.is_some() {
        let new_uid = req.uid.unwrap_or(rec.uid);
        let new_gid = req.gid.unwrap_or(rec.gid);
        if !user.is_root() {
            if new_uid != rec.uid {
                fail!(EPERM, "only root may change the owner of inode {inode}");
            }
            if new_gid != rec.gid && (user.uid != rec.uid || !user.in_group(new_gid)) {
                fail!(
                    EPERM,
                    "uid {} may not change the group of inode {inode} to {new_gid}",
                    user.uid
                );
            }
        }
        if (new_uid != rec.uid || new_gid != rec.gid) && rec.file_type != FileType::Directory {
            // chown clears set-uid, and set-gid when it is meaningful (group exec set).
            rec.perm &= !S_ISUID;
            if rec.perm & 0o010 != 0 {
                rec.perm &= !S_ISGID;
            }
        }
        rec.uid = new_uid;
        rec.gid = new_gid;
    }
    if let Some(perm) = req.perm {
        perm::check_owner(rec, user, "change the mode")?;
        let mut perm = perm & 0o7777;
        if !user.is_root() && !user.in_group(rec.gid) {
            perm &= !S_ISGID;
        }
        rec.perm = perm;
    }
    for (time, is_mtime) in [(req.atime, false), (req.mtime, true)] {
        let Some(time) = time else { continue };
        let value = match time {
            SetTime::Now => {
                if !user.is_root() && user.uid != rec.uid {
                    perm::check(rec, user, WRITE, "set times to now")?;
                }
                tx.now
            }
            SetTime::At(t) => {
                perm::check_owner(rec, user, "set times")?;
                t
            }
        };
        if is_mtime {
            rec.mtime = value;
            if rec.file_type == FileType::Directory {
                tx.t.set(
                    &schema::dir_mtime_key(inode),
                    &value.as_nanos().to_le_bytes(),
                )?;
            }
        } else {
            rec.atime = value;
        }
    }
    Ok(())
}
