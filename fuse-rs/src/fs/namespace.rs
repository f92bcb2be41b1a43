//! Namespace operations: lookup, create of non-regular entries, link,
//! unlink, rename, and setattr (chmod, chown, utimens, truncate).

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, SetattrValid};
use fuse_backend_rs::api::filesystem::{Context, Entry};
use r3fs_wire::meta::{
    FileType, MknodRequest, RenameFlags, RenameRequest, SetAttrRequest, SetTime, Time,
};

use super::{errno, meta_error, name_bytes, storage_error, R3fs};

const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;
const RENAME_WHITEOUT: u32 = 4;
const W_OK: u32 = 2;

impl R3fs {
    pub(super) fn do_lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let user = self.user(ctx);
        match self.block_on(self.meta.lookup(&user, parent, name.to_bytes())) {
            Ok(attr) => {
                self.files.observe(&attr);
                Ok(self.entry(&attr))
            }
            Err(e) if e.errno() == libc::ENOENT && !self.timeouts.negative.is_zero() => {
                // A negative entry (inode 0) the kernel caches for a while.
                Ok(Entry {
                    inode: 0,
                    entry_timeout: self.timeouts.negative,
                    ..Entry::default()
                })
            }
            Err(e) => Err(meta_error("lookup", e)),
        }
    }

    pub(super) fn do_mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let user = self.user(ctx);
        let perm = mode & !umask & 0o7777;
        let attr = self
            .block_on(self.meta.mkdir(&user, parent, name.to_bytes(), perm))
            .map_err(|e| meta_error("mkdir", e))?;
        Ok(self.entry(&attr))
    }

    pub(super) fn do_mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let file_type = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileType::Regular,
            libc::S_IFIFO => FileType::Fifo,
            libc::S_IFSOCK => FileType::Socket,
            libc::S_IFCHR => FileType::CharDevice,
            libc::S_IFBLK => FileType::BlockDevice,
            libc::S_IFDIR => return Err(errno(libc::EPERM)),
            _ => return Err(errno(libc::EINVAL)),
        };
        let req = MknodRequest {
            user: self.user(ctx),
            parent,
            name: name_bytes(name),
            file_type,
            perm: mode & !umask & 0o7777,
            rdev,
        };
        let attr = self
            .block_on(self.meta.mknod(req))
            .map_err(|e| meta_error("mknod", e))?;
        Ok(self.entry(&attr))
    }

    pub(super) fn do_symlink(
        &self,
        ctx: &Context,
        target: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let user = self.user(ctx);
        let attr = self
            .block_on(
                self.meta
                    .symlink(&user, parent, name.to_bytes(), target.to_bytes()),
            )
            .map_err(|e| meta_error("symlink", e))?;
        Ok(self.entry(&attr))
    }

    pub(super) fn do_link(
        &self,
        ctx: &Context,
        inode: u64,
        new_parent: u64,
        new_name: &CStr,
    ) -> io::Result<Entry> {
        let user = self.user(ctx);
        let attr = self
            .block_on(
                self.meta
                    .link(&user, inode, new_parent, new_name.to_bytes()),
            )
            .map_err(|e| meta_error("link", e))?;
        self.files.observe(&attr);
        Ok(self.entry(&attr))
    }

    pub(super) fn do_unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let user = self.user(ctx);
        self.block_on(self.meta.unlink(&user, parent, name.to_bytes()))
            .map_err(|e| meta_error("unlink", e))
    }

    pub(super) fn do_rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let user = self.user(ctx);
        self.block_on(self.meta.rmdir(&user, parent, name.to_bytes()))
            .map_err(|e| meta_error("rmdir", e))
    }

    pub(super) fn do_rename(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        if flags & RENAME_WHITEOUT != 0
            || flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) != 0
        {
            return Err(errno(libc::EINVAL));
        }
        let req = RenameRequest {
            user: self.user(ctx),
            parent,
            name: name_bytes(name),
            new_parent,
            new_name: name_bytes(new_name),
            flags: RenameFlags {
                noreplace: flags & RENAME_NOREPLACE != 0,
                exchange: flags & RENAME_EXCHANGE != 0,
            },
        };
        self.block_on(self.meta.rename(req))
            .map_err(|e| meta_error("rename", e))
    }

    /// chmod, chown, utimens and truncate. A truncate removes storage's bytes
    /// past the new length *before* meta records it, so a crash in between
    /// leaves zeros where the file was cut, never old bytes after a later
    /// extension. The permission check comes first, so a caller who may
    /// not write cannot destroy data.
    pub(super) fn do_setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let user = self.user(ctx);
        let via_write_handle = match handle {
            Some(fh) => self.files.handle(fh).map(|h| h.write).unwrap_or(false),
            None => false,
        };
        let size = valid
            .contains(SetattrValid::SIZE)
            .then_some(attr.st_size as u64);
        if let Some(size) = size {
            if !via_write_handle {
                self.block_on(self.meta.access(&user, inode, W_OK))
                    .map_err(|e| meta_error("truncate", e))?;
            }
            self.truncate_storage(inode, size)?;
        }
        let time = |now: SetattrValid, set: SetattrValid, sec: i64, nsec: i64| {
            if valid.contains(now) {
                Some(SetTime::Now)
            } else if valid.contains(set) {
                Some(SetTime::At(Time {
                    sec,
                    nsec: nsec as u32,
                }))
            } else {
                None
            }
        };
        let req = SetAttrRequest {
            user,
            inode,
            perm: valid
                .contains(SetattrValid::MODE)
                .then_some(attr.st_mode & 0o7777),
            uid: valid.contains(SetattrValid::UID).then_some(attr.st_uid),
            gid: valid.contains(SetattrValid::GID).then_some(attr.st_gid),
            size,
            atime: time(
                SetattrValid::ATIME_NOW,
                SetattrValid::ATIME,
                attr.st_atime,
                attr.st_atime_nsec,
            ),
            mtime: time(
                SetattrValid::MTIME_NOW,
                SetattrValid::MTIME,
                attr.st_mtime,
                attr.st_mtime_nsec,
            ),
            via_write_handle,
        };
        let new = self
            .block_on(self.meta.setattr(req))
            .map_err(|e| meta_error("setattr", e))?;
        if size.is_some() {
            self.files.truncated(&new);
        } else {
            self.files.observe(&new);
        }
        Ok((self.stat(&new), self.timeouts.attr))
    }

    /// Flushes this mount's buffered writes of `inode` and cuts storage's
    /// copy at `size`. Needs the layout: from an open file, or from meta.
    pub(super) fn truncate_storage(&self, inode: u64, size: u64) -> io::Result<()> {
        self.files.flush_inode(self, inode)?;
        let layout = match self.files.layout(inode) {
            Some(l) => l,
            None => {
                let attr = self
                    .block_on(self.meta.getattr(inode))
                    .map_err(|e| meta_error("truncate", e))?;
                match attr.file_type {
                    FileType::Regular => {}
                    FileType::Directory => return Err(errno(libc::EISDIR)),
                    _ => return Err(errno(libc::EINVAL)),
                }
                attr.layout.ok_or_else(|| errno(libc::EIO))?
            }
        };
        self.files.clip_buffer(inode, size);
        self.block_on(self.storage.truncate(&layout, inode, size))
            .map_err(|e| storage_error("truncate", inode, e))
    }
}
