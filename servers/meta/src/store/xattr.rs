//! Extended attributes: `user.`, `trusted.` and `security.` namespaces.
//!
//! `user.` needs read or write permission on the file and is allowed on
//! regular files and directories only; `trusted.` is root's alone (others see
//! nothing); `security.` may be set by the owner or root. `system.` (POSIX
//! ACLs) is not supported.

use r3fs_kv::RangeOptions;
use r3fs_wire::meta::{
    FileType, GetXattrRequest, InodeId, ListXattrRequest, RemoveXattrRequest, SetXattrRequest,
    User, XATTR_NAME_BYTES_MAX, XATTR_VALUE_BYTES_MAX,
};

use super::{MetaStore, Tx};
use crate::error::{errno, fail, MetaError};
use crate::perm::{self, READ, WRITE};
use crate::schema::{self, InodeRecord};

/// Most extended attributes one inode may carry.
pub const XATTRS_PER_INODE_MAX: usize = 256;
/// Most bytes `listxattr` may return (Linux `XATTR_LIST_MAX`).
pub const XATTR_LIST_BYTES_MAX: usize = 65536;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Namespace {
    User,
    Trusted,
    Security,
}

fn namespace(name: &[u8]) -> Result<Namespace, MetaError> {
    if name.is_empty() || name.len() > XATTR_NAME_BYTES_MAX {
        fail!(
            ERANGE,
            "xattr name of {} bytes: must be 1 to {XATTR_NAME_BYTES_MAX}",
            name.len()
        );
    }
    if name.contains(&0) {
        fail!(EINVAL, "xattr name contains NUL");
    }
    let ns = if name.starts_with(b"user.") {
        Namespace::User
    } else if name.starts_with(b"trusted.") {
        Namespace::Trusted
    } else if name.starts_with(b"security.") {
        Namespace::Security
    } else {
        fail!(
            EOPNOTSUPP,
            "xattr namespace of {:?} is not supported",
            String::from_utf8_lossy(name)
        );
    };
    let prefix_len = name.iter().position(|&b| b == b'.').map_or(0, |p| p + 1);
    if name.len() == prefix_len {
        fail!(
            EINVAL,
            "xattr name {:?} has no name after the namespace",
            String::from_utf8_lossy(name)
        );
    }
    Ok(ns)
}

/// Whether `user` may read (`write == false`) or change attributes in `ns`.
fn check(rec: &InodeRecord, user: &User, ns: Namespace, write: bool) -> Result<(), MetaError> {
    match ns {
        Namespace::User => {
            if !matches!(rec.file_type, FileType::Regular | FileType::Directory) {
                fail!(
                    EPERM,
                    "user xattrs are allowed on regular files and directories only"
                );
            }
            let mask = if write { WRITE } else { READ };
            perm::check(rec, user, mask, "access user xattrs")
        }
        Namespace::Trusted if user.is_root() => Ok(()),
        Namespace::Trusted if write => fail!(EPERM, "only root may set trusted xattrs"),
        Namespace::Trusted => fail!(ENODATA, "no such xattr"),
        Namespace::Security if write => perm::check_owner(rec, user, "set security xattrs"),
        Namespace::Security => Ok(()),
    }
}

impl MetaStore {
    pub fn getxattr(&self, req: &GetXattrRequest) -> Result<Vec<u8>, MetaError> {
        let ns = namespace(&req.name)?;
        self.run(|tx| {
            let rec = tx.existing(req.inode)?;
            check(&rec, &req.user, ns, false)?;
            tx.t.get(&schema::xattr_key(req.inode, &req.name))?
                .ok_or_else(|| {
                    errno!(
                        ENODATA,
                        "no xattr {:?} on inode {}",
                        String::from_utf8_lossy(&req.name),
                        req.inode
                    )
                })
        })
    }

    pub fn setxattr(&self, req: &SetXattrRequest) -> Result<(), MetaError> {
        let ns = namespace(&req.name)?;
        if req.value.len() > XATTR_VALUE_BYTES_MAX {
            fail!(
                E2BIG,
                "xattr value of {} bytes exceeds {XATTR_VALUE_BYTES_MAX}",
                req.value.len()
            );
        }
        if req.flags.create && req.flags.replace {
            fail!(EINVAL, "XATTR_CREATE and XATTR_REPLACE are exclusive");
        }
        self.run(|tx| {
            let mut rec = tx.existing(req.inode)?;
            check(&rec, &req.user, ns, true)?;
            let key = schema::xattr_key(req.inode, &req.name);
            let exists = tx.t.get(&key)?.is_some();
            if exists && req.flags.create {
                fail!(EEXIST, "xattr {:?} exists (XATTR_CREATE)", String::from_utf8_lossy(&req.name));
            }
            if !exists && req.flags.replace {
                fail!(ENODATA, "xattr {:?} does not exist (XATTR_REPLACE)", String::from_utf8_lossy(&req.name));
            }
            if !exists {
                let names = names(tx, req.inode)?;
                let list_bytes: usize = names.iter().map(|n| n.len() + 1).sum();
                if names.len() >= XATTRS_PER_INODE_MAX || list_bytes + req.name.len() + 1 > XATTR_LIST_BYTES_MAX {
                    fail!(ENOSPC, "inode {} has no room for another xattr ({} of at most {XATTRS_PER_INODE_MAX})", req.inode, names.len());
                }
            }
            tx.t.set(&key, &req.value)?;
            rec.ctime = tx.now;
            tx.put_inode(req.inode, &rec)
        })
    }

    pub fn listxattr(&self, req: &ListXattrRequest) -> Result<Vec<Vec<u8>>, MetaError> {
        self.run(|tx| {
            let rec = tx.existing(req.inode)?;
            let all = names(tx, req.inode)?;
            Ok(all
                .into_iter()
                .filter(|n| namespace(n).is_ok_and(|ns| check(&rec, &req.user, ns, false).is_ok()))
                .collect())
        })
    }

    pub fn removexattr(&self, req: &RemoveXattrRequest) -> Result<(), MetaError> {
        let ns = namespace(&req.name)?;
        self.run(|tx| {
            let mut rec = tx.existing(req.inode)?;
            check(&rec, &req.user, ns, true)?;
            let key = schema::xattr_key(req.inode, &req.name);
            if tx.t.get(&key)?.is_none() {
                fail!(
                    ENODATA,
                    "no xattr {:?} on inode {}",
                    String::from_utf8_lossy(&req.name),
                    req.inode
                );
            }
            tx.t.clear(&key)?;
            rec.ctime = tx.now;
            tx.put_inode(req.inode, &rec)
        })
    }
}

fn names(tx: &mut Tx<'_>, inode: InodeId) -> Result<Vec<Vec<u8>>, MetaError> {
    let prefix = schema::xattr_prefix(inode);
    let end = r3fs_kv::prefix_end(&prefix).expect("xattr prefix has a non-0xff byte");
    let opts = RangeOptions {
        limit: XATTRS_PER_INODE_MAX + 1,
        ..RangeOptions::default()
    };
    let range = tx.t.get_range(&prefix, &end, opts)?;
    Ok(range
        .kvs
        .into_iter()
        .map(|kv| kv.key[prefix.len()..].to_vec())
        .collect())
}
