//! Directory entries: lookup, the calls that make and remove entries, rename
//! and readdir.

use r3fs_kv::RangeOptions;
use r3fs_wire::meta::{
    Attr, CreateRequest, DirEntry, FileType, InodeId, LinkRequest, LookupRequest, MkdirRequest,
    MknodRequest, OpenResponse, ReadDirRequest, ReadDirResponse, RenameRequest, SymlinkRequest,
    UnlinkRequest, User, READDIR_ENTRIES_MAX, ROOT_INODE, SYMLINK_TARGET_BYTES_MAX,
};

use super::{validate_name, MetaStore, Tx, DEPTH_MAX, LINKS_MAX};
use crate::error::{errno, fail, MetaError};
use crate::perm::{self, EXEC, READ, S_ISGID, WRITE};
use crate::schema::{self, DentryRecord, InodeRecord};

/// What a new entry will be; the common part of create, mkdir, mknod, symlink.
#[derive(Clone)]
struct NewInode {
    file_type: FileType,
    perm: u32,
    rdev: u32,
    target: Option<Vec<u8>>,
}

impl MetaStore {
    pub fn lookup(&self, req: &LookupRequest) -> Result<Attr, MetaError> {
        self.run(|tx| {
            let parent = tx.dir(req.parent)?;
            perm::check(&parent, &req.user, EXEC, "search the directory")?;
            let id = match req.name.as_slice() {
                b"." => req.parent,
                b".." => parent.parent,
                name => {
                    validate_name(name, libc::EINVAL)?;
                    match tx.dentry(req.parent, name)? {
                        Some(d) => d.inode,
                        None => fail!(
                            ENOENT,
                            "no entry {:?} in directory {}",
                            String::from_utf8_lossy(name),
                            req.parent
                        ),
                    }
                }
            };
            let rec = tx.existing(id)?;
            tx.attr(id, &rec)
        })
    }

    /// Creates a regular file, or opens the existing one unless `exclusive`.
    pub fn create(&self, req: &CreateRequest) -> Result<OpenResponse, MetaError> {
        validate_name(&req.name, libc::EEXIST)?;
        let mut id = None;
        let session: u64 = rand::random();
        self.run(|tx| {
            let parent = tx.dir(req.parent)?;
            perm::check(&parent, &req.user, EXEC, "search the directory")?;
            if let Some(existing) = tx.dentry(req.parent, &req.name)? {
                if req.exclusive {
                    fail!(EEXIST, "{:?} exists", String::from_utf8_lossy(&req.name));
                }
                if existing.file_type == FileType::Directory {
                    fail!(
                        EISDIR,
                        "{:?} is a directory",
                        String::from_utf8_lossy(&req.name)
                    );
                }
                let (attr, session) = self.open_in(
                    tx,
                    existing.inode,
                    &req.user,
                    req.flags,
                    req.client,
                    session,
                )?;
                return Ok(OpenResponse {
                    attr,
                    session,
                    created: false,
                });
            }
            let new = NewInode {
                file_type: FileType::Regular,
                perm: req.perm,
                rdev: 0,
                target: None,
            };
            let (new_id, rec) =
                self.make_entry(tx, &mut id, req.parent, parent, &req.name, &req.user, new)?;
            let session = if req.flags.write || req.flags.hold {
                tx.put_session(new_id, session, req.client, req.flags.write)?;
                Some(session)
            } else {
                None
            };
            let attr = tx.attr(new_id, &rec)?;
            Ok(OpenResponse {
                attr,
                session,
                created: true,
            })
        })
    }

    pub fn mkdir(&self, req: &MkdirRequest) -> Result<Attr, MetaError> {
        validate_name(&req.name, libc::EEXIST)?;
        let new = NewInode {
            file_type: FileType::Directory,
            perm: req.perm,
            rdev: 0,
            target: None,
        };
        self.make_node(req.parent, &req.name, &req.user, new)
    }

    pub fn mknod(&self, req: &MknodRequest) -> Result<Attr, MetaError> {
        validate_name(&req.name, libc::EEXIST)?;
        match req.file_type {
            FileType::Regular | FileType::Fifo | FileType::Socket => {}
            FileType::CharDevice | FileType::BlockDevice if req.user.is_root() => {}
            FileType::CharDevice | FileType::BlockDevice => {
                fail!(EPERM, "only root may create device nodes")
            }
            FileType::Directory | FileType::Symlink => {
                fail!(
                    EINVAL,
                    "mknod cannot make a {:?}; use mkdir or symlink",
                    req.file_type
                )
            }
        }
        let new = NewInode {
            file_type: req.file_type,
            perm: req.perm,
            rdev: req.rdev,
            target: None,
        };
        self.make_node(req.parent, &req.name, &req.user, new)
    }

    pub fn symlink(&self, req: &SymlinkRequest) -> Result<Attr, MetaError> {
        validate_name(&req.name, libc::EEXIST)?;
        if req.target.is_empty() {
            fail!(ENOENT, "symlink target is empty");
        }
        if req.target.len() > SYMLINK_TARGET_BYTES_MAX {
            fail!(
                ENAMETOOLONG,
                "symlink target of {} bytes exceeds {SYMLINK_TARGET_BYTES_MAX}",
                req.target.len()
            );
        }
        if req.target.contains(&0) {
            fail!(EINVAL, "symlink target contains NUL");
        }
        let new = NewInode {
            file_type: FileType::Symlink,
            perm: 0o777,
            rdev: 0,
            target: Some(req.target.clone()),
        };
        self.make_node(req.parent, &req.name, &req.user, new)
    }

    /// Makes an entry that is not opened as it is made (mkdir, mknod,
    /// symlink) in one retried transaction and returns its attributes.
    fn make_node(
        &self,
        parent: InodeId,
        name: &[u8],
        user: &User,
        new: NewInode,
    ) -> Result<Attr, MetaError> {
        let mut id = None;
        self.run(|tx| {
            let parent_rec = tx.dir(parent)?;
            let (new_id, rec) =
                self.make_entry(tx, &mut id, parent, parent_rec, name, user, new.clone())?;
            tx.attr(new_id, &rec)
        })
    }

    /// Checks that `name` can be added to `parent` and adds it with a new inode.
    /// `id` keeps the allocated inode id across retries of the transaction.
    #[allow(clippy::too_many_arguments)]
    fn make_entry(
        &self,
        tx: &mut Tx<'_>,
        id: &mut Option<InodeId>,
        parent_id: InodeId,
        parent: InodeRecord,
        name: &[u8],
        user: &User,
        new: NewInode,
    ) -> Result<(InodeId, InodeRecord), MetaError> {
        perm::check(&parent, user, WRITE | EXEC, "add entries to the directory")?;
        if tx.dentry(parent_id, name)?.is_some() {
            fail!(
                EEXIST,
                "{:?} exists in directory {parent_id}",
                String::from_utf8_lossy(name)
            );
        }
        let new_id = match *id {
            Some(existing) => existing,
            None => *id.insert(self.alloc.allocate()?),
        };
        let mut perm = new.perm & 0o7777;
        let gid = if parent.perm & S_ISGID != 0 {
            if new.file_type == FileType::Directory {
                perm |= S_ISGID;
            }
            parent.gid
        } else {
            user.gid
        };
        let is_dir = new.file_type == FileType::Directory;
        let rec = InodeRecord {
            file_type: new.file_type,
            perm,
            uid: user.uid,
            gid,
            nlink: 1,
            size: new.target.as_ref().map_or(0, |t| t.len() as u64),
            atime: tx.now,
            mtime: tx.now,
            ctime: tx.now,
            rdev: new.rdev,
            layout: match new.file_type {
                FileType::Regular => Some(
                    parent
                        .layout
                        .clone()
                        .unwrap_or_else(|| self.config.layout_for(new_id)),
                ),
                FileType::Directory => parent.layout.clone(),
                _ => None,
            },
            truncate_ver: 0,
            parent: if is_dir { parent_id } else { 0 },
            target: new.target,
        };
        tx.put_inode(new_id, &rec)?;
        tx.put_dentry(
            parent_id,
            name,
            DentryRecord {
                inode: new_id,
                file_type: rec.file_type,
            },
        )?;
        tx.touch_dir(parent_id)?;
        if is_dir {
            tx.t.set(
                &schema::dir_mtime_key(new_id),
                &tx.now.as_nanos().to_le_bytes(),
            )?;
            tx.add_subdirs(parent_id, 1)?;
        }
        tx.add_counter(schema::COUNTER_INODES, 1)?;
        Ok((new_id, rec))
    }

    pub fn link(&self, req: &LinkRequest) -> Result<Attr, MetaError> {
        validate_name(&req.new_name, libc::EEXIST)?;
        self.run(|tx| {
            let mut rec = tx.existing(req.inode)?;
            if rec.file_type == FileType::Directory {
                fail!(EPERM, "cannot hard-link directory {}", req.inode);
            }
            if rec.nlink == 0 {
                fail!(ENOENT, "inode {} has been unlinked", req.inode);
            }
            if rec.nlink >= LINKS_MAX {
                fail!(
                    EMLINK,
                    "inode {} already has {} links",
                    req.inode,
                    rec.nlink
                );
            }
            let parent = tx.dir(req.new_parent)?;
            perm::check(
                &parent,
                &req.user,
                WRITE | EXEC,
                "add entries to the directory",
            )?;
            if tx.dentry(req.new_parent, &req.new_name)?.is_some() {
                fail!(
                    EEXIST,
                    "{:?} exists",
                    String::from_utf8_lossy(&req.new_name)
                );
            }
            rec.nlink += 1;
            rec.ctime = tx.now;
            tx.put_inode(req.inode, &rec)?;
            let d = DentryRecord {
                inode: req.inode,
                file_type: rec.file_type,
            };
            tx.put_dentry(req.new_parent, &req.new_name, d)?;
            tx.touch_dir(req.new_parent)?;
            tx.attr(req.inode, &rec)
        })
    }

    pub fn unlink(&self, req: &UnlinkRequest) -> Result<(), MetaError> {
        validate_name(&req.name, libc::EISDIR)?;
        self.run(|tx| {
            let parent = tx.dir(req.parent)?;
            perm::check(
                &parent,
                &req.user,
                WRITE | EXEC,
                "remove entries from the directory",
            )?;
            let d = entry_of(tx, req.parent, &req.name)?;
            let child = tx.existing(d.inode)?;
            if child.file_type == FileType::Directory {
                fail!(
                    EISDIR,
                    "{:?} is a directory; use rmdir",
                    String::from_utf8_lossy(&req.name)
                );
            }
            perm::check_sticky(&parent, &child, &req.user)?;
            tx.clear_dentry(req.parent, &req.name)?;
            tx.touch_dir(req.parent)?;
            tx.drop_link(d.inode, child)
        })
    }

    pub fn rmdir(&self, req: &UnlinkRequest) -> Result<(), MetaError> {
        match req.name.as_slice() {
            b"." => fail!(EINVAL, "cannot remove '.'"),
            b".." => fail!(ENOTEMPTY, "cannot remove '..'"),
            name => validate_name(name, libc::EINVAL)?,
        }
        self.run(|tx| {
            let parent = tx.dir(req.parent)?;
            perm::check(
                &parent,
                &req.user,
                WRITE | EXEC,
                "remove entries from the directory",
            )?;
            let d = entry_of(tx, req.parent, &req.name)?;
            let child = tx.existing(d.inode)?;
            if child.file_type != FileType::Directory {
                fail!(
                    ENOTDIR,
                    "{:?} is not a directory",
                    String::from_utf8_lossy(&req.name)
                );
            }
            perm::check_sticky(&parent, &child, &req.user)?;
            ensure_empty(tx, d.inode)?;
            tx.clear_dentry(req.parent, &req.name)?;
            tx.touch_dir(req.parent)?;
            tx.add_subdirs(req.parent, -1)?;
            tx.destroy(d.inode, &child)
        })
    }

    pub fn rename(&self, req: &RenameRequest) -> Result<(), MetaError> {
        if req.flags.noreplace && req.flags.exchange {
            fail!(EINVAL, "RENAME_NOREPLACE and RENAME_EXCHANGE are exclusive");
        }
        validate_name(&req.name, libc::EBUSY)?;
        validate_name(&req.new_name, libc::EBUSY)?;
        self.run(|tx| rename_in(tx, req))
    }

    pub fn readdir(&self, req: &ReadDirRequest) -> Result<ReadDirResponse, MetaError> {
        let limit = match req.limit {
            0 => READDIR_ENTRIES_MAX,
            n => n.min(READDIR_ENTRIES_MAX),
        } as usize;
        self.run(|tx| {
            let dir = tx.dir(req.inode)?;
            perm::check(&dir, &req.user, READ, "list the directory")?;
            let prefix = schema::dentry_prefix(req.inode);
            let begin = match &req.after {
                Some(after) => r3fs_kv::key_after(&schema::dentry_key(req.inode, after)),
                None => prefix.clone(),
            };
            let end = r3fs_kv::prefix_end(&prefix).expect("dentry prefix has a non-0xff byte");
            let opts = RangeOptions {
                limit,
                ..RangeOptions::default()
            };
            let range = tx.t.get_range(&begin, &end, opts)?;
            let mut entries = Vec::with_capacity(range.kvs.len());
            for kv in range.kvs {
                let d: DentryRecord = schema::decode(&kv.key, &kv.value)?;
                let attr = if req.plus {
                    let rec = tx.existing(d.inode)?;
                    Some(tx.attr(d.inode, &rec)?)
                } else {
                    None
                };
                entries.push(DirEntry {
                    name: kv.key[prefix.len()..].to_vec(),
                    inode: d.inode,
                    file_type: d.file_type,
                    attr,
                });
            }
            Ok(ReadDirResponse {
                entries,
                more: range.more,
            })
        })
    }
}

/// The entry `name` of `parent`, or ENOENT.
fn entry_of(tx: &mut Tx<'_>, parent: InodeId, name: &[u8]) -> Result<DentryRecord, MetaError> {
    tx.dentry(parent, name)?.ok_or_else(|| {
        errno!(
            ENOENT,
            "no entry {:?} in directory {parent}",
            String::from_utf8_lossy(name)
        )
    })
}

/// ENOTEMPTY unless directory `dir` has no entries. Reads the entry range, so a
/// concurrent create in `dir` conflicts with the caller's transaction.
fn ensure_empty(tx: &mut Tx<'_>, dir: InodeId) -> Result<(), MetaError> {
    let prefix = schema::dentry_prefix(dir);
    let end = r3fs_kv::prefix_end(&prefix).expect("dentry prefix has a non-0xff byte");
    let opts = RangeOptions {
        limit: 1,
        ..RangeOptions::default()
    };
    if !tx.t.get_range(&prefix, &end, opts)?.kvs.is_empty() {
        fail!(ENOTEMPTY, "directory {dir} is not empty");
    }
    Ok(())
}

/// EINVAL if directory `moved` is `dest` or one of its ancestors: moving it
/// there would cut it off from the tree. Every ancestor read joins the
/// transaction's read set, so two renames that would together form a cycle
/// conflict and one of them sees the other's result on retry.
fn ensure_not_ancestor(tx: &mut Tx<'_>, moved: InodeId, dest: InodeId) -> Result<(), MetaError> {
    let mut at = dest;
    for _ in 0..DEPTH_MAX {
        if at == moved {
            fail!(EINVAL, "cannot move directory {moved} into its own subtree");
        }
        if at == ROOT_INODE {
            return Ok(());
        }
        at = tx.dir(at)?.parent;
    }
    fail!(
        ELOOP,
        "directory {dest} is more than {DEPTH_MAX} levels deep"
    )
}

fn rename_in(tx: &mut Tx<'_>, req: &RenameRequest) -> Result<(), MetaError> {
    let src_parent = tx.dir(req.parent)?;
    perm::check(
        &src_parent,
        &req.user,
        WRITE | EXEC,
        "remove entries from the source directory",
    )?;
    let dst_parent = if req.new_parent == req.parent {
        src_parent.clone()
    } else {
        tx.dir(req.new_parent)?
    };
    perm::check(
        &dst_parent,
        &req.user,
        WRITE | EXEC,
        "add entries to the target directory",
    )?;
    let src = entry_of(tx, req.parent, &req.name)?;
    let mut src_rec = tx.existing(src.inode)?;
    perm::check_sticky(&src_parent, &src_rec, &req.user)?;
    let dst = tx.dentry(req.new_parent, &req.new_name)?;
    if req.flags.noreplace && dst.is_some() {
        fail!(
            EEXIST,
            "{:?} exists (RENAME_NOREPLACE)",
            String::from_utf8_lossy(&req.new_name)
        );
    }
    if req.flags.exchange && dst.is_none() {
        fail!(
            ENOENT,
            "{:?} does not exist (RENAME_EXCHANGE)",
            String::from_utf8_lossy(&req.new_name)
        );
    }
    if dst.is_some_and(|d| d.inode == src.inode) {
        // Same inode under both names (or the very same entry): POSIX says do nothing.
        return Ok(());
    }
    let src_is_dir = src_rec.file_type == FileType::Directory;
    let moves_parent = req.parent != req.new_parent;
    if src_is_dir && moves_parent {
        ensure_not_ancestor(tx, src.inode, req.new_parent)?;
    }
    let dst_rec = match dst {
        Some(d) => {
            let rec = tx.existing(d.inode)?;
            perm::check_sticky(&dst_parent, &rec, &req.user)?;
            Some((d, rec))
        }
        None => None,
    };

    if req.flags.exchange {
        let (d, mut dst_rec) = dst_rec.expect("exchange checked that the target exists");
        let dst_is_dir = dst_rec.file_type == FileType::Directory;
        if dst_is_dir && moves_parent {
            ensure_not_ancestor(tx, d.inode, req.parent)?;
        }
        tx.put_dentry(req.new_parent, &req.new_name, src)?;
        tx.put_dentry(req.parent, &req.name, d)?;
        if moves_parent {
            if src_is_dir {
                src_rec.parent = req.new_parent;
            }
            if dst_is_dir {
                dst_rec.parent = req.parent;
            }
            let delta = src_is_dir as i64 - dst_is_dir as i64;
            if delta != 0 {
                tx.add_subdirs(req.parent, -delta)?;
                tx.add_subdirs(req.new_parent, delta)?;
            }
        }
        src_rec.ctime = tx.now;
        dst_rec.ctime = tx.now;
        tx.put_inode(src.inode, &src_rec)?;
        tx.put_inode(d.inode, &dst_rec)?;
        tx.touch_dir(req.parent)?;
        tx.touch_dir(req.new_parent)?;
        return Ok(());
    }

    if let Some((d, rec)) = dst_rec {
        let dst_is_dir = rec.file_type == FileType::Directory;
        match (src_is_dir, dst_is_dir) {
            (true, false) => fail!(
                ENOTDIR,
                "cannot replace non-directory {:?} with a directory",
                String::from_utf8_lossy(&req.new_name)
            ),
            (false, true) => fail!(
                EISDIR,
                "cannot replace directory {:?} with a non-directory",
                String::from_utf8_lossy(&req.new_name)
            ),
            (true, true) => {
                ensure_empty(tx, d.inode)?;
                tx.add_subdirs(req.new_parent, -1)?;
                tx.destroy(d.inode, &rec)?;
            }
            (false, false) => tx.drop_link(d.inode, rec)?,
        }
    }
    tx.clear_dentry(req.parent, &req.name)?;
    tx.put_dentry(req.new_parent, &req.new_name, src)?;
    if src_is_dir && moves_parent {
        src_rec.parent = req.new_parent;
        tx.add_subdirs(req.parent, -1)?;
        tx.add_subdirs(req.new_parent, 1)?;
    }
    src_rec.ctime = tx.now;
    tx.put_inode(src.inode, &src_rec)?;
    tx.touch_dir(req.parent)?;
    tx.touch_dir(req.new_parent)?;
    Ok(())
}
