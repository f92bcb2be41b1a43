//! How meta state is laid out in the KV engine: key shapes and stored records.
//!
//! Inode ids are little-endian in keys so consecutive ids spread over the key
//! space (3FS does the same to avoid one hot shard in FoundationDB).
//!
//! | key | value |
//! |---|---|
//! | `INOD` inode | [`InodeRecord`] |
//! | `IDMT` dir inode | u64 LE nanos: directory mtime, bumped with atomic max by entry changes |
//! | `IDNL` dir inode | u64 LE: number of subdirectories, atomic add (nlink = 2 + this) |
//! | `DENT` parent name | [`DentryRecord`] |
//! | `INOS` inode session(BE) | [`SessionRecord`]: an open session holding the file |
//! | `XATR` inode name | xattr value bytes |
//! | `GCQ_` inode | [`GcEntry`]: a removed file whose chunks storage must delete |
//! | `IALC` shard(BE u16) | u64 LE: next inode id block of that shard |
//! | `STAT` name | u64 LE counters (inodes, bytes), atomic add |
//! | `LOCK` inode kind client(BE) owner(BE) start(BE) | [`LockRecord`]: one locked range of one owner |
//! | `LKCI` client(BE) inode kind | empty: the client has `LOCK` records of that kind on that inode |
//! | `LKLS` client(BE) | [`LockLeaseRecord`]: the client's lock lease |
//!
//! The directory mtime and subdirectory count live in their own keys so that
//! creating entries in one directory from many clients does not make every
//! transaction conflict on the parent inode.
//!
//! # Locks
//! `kind` is one byte ([`lock_kind_byte`]: flock 0, POSIX 1), so each kind of
//! an inode is one range and flock calls never conflict with POSIX calls in
//! the engine. A flock lock is one record with start 0 and end `u64::MAX`.
//! The ranges of one (client, owner) never overlap and never touch when of
//! the same type (they are merged). Every `LOCK` record has its `LKCI` entry;
//! an entry may outlive its records when the inode is destroyed, until the
//! client drops its locks. A record is valid only while its client's lease
//! exists, carries the record's epoch, and has not expired.

use r3fs_wire::meta::{FileType, GcEntry, InodeId, Layout, LockKind, Time};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::MetaError;

pub const INODE: &[u8; 4] = b"INOD";
pub const DIR_MTIME: &[u8; 4] = b"IDMT";
pub const DIR_SUBDIRS: &[u8; 4] = b"IDNL";
pub const DENTRY: &[u8; 4] = b"DENT";
pub const SESSION: &[u8; 4] = b"INOS";
pub const XATTR: &[u8; 4] = b"XATR";
pub const GC_QUEUE: &[u8; 4] = b"GCQ_";
pub const ID_ALLOC: &[u8; 4] = b"IALC";
pub const COUNTER: &[u8; 4] = b"STAT";
pub const LOCK: &[u8; 4] = b"LOCK";
pub const LOCK_CLIENT_INDEX: &[u8; 4] = b"LKCI";
pub const LOCK_LEASE: &[u8; 4] = b"LKLS";

pub const COUNTER_INODES: &[u8] = b"inodes";
pub const COUNTER_BYTES: &[u8] = b"bytes";

/// An inode as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRecord {
    pub file_type: FileType,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Links from directory entries. Directories keep 1 here and report
    /// `2 + subdirectories`; 0 means unlinked but still held by sessions.
    pub nlink: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub rdev: u32,
    pub layout: Option<Layout>,
    pub truncate_ver: u64,
    /// Directories only: the directory that contains this one (root: itself).
    pub parent: InodeId,
    /// Symlinks only.
    pub target: Option<Vec<u8>>,
}

/// A directory entry as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DentryRecord {
    pub inode: InodeId,
    pub file_type: FileType,
}

/// An open session on a file (a writer, or a reader that asked to hold it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub client: u64,
    pub opened_at: Time,
    pub write: bool,
}

/// One locked range as stored; the key holds inode, kind, client, owner and
/// the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Exclusive (else shared).
    pub write: bool,
    /// Last byte, inclusive.
    pub end: u64,
    pub pid: u32,
    /// The client's lease epoch when the lock was taken.
    pub epoch: u64,
}

/// A client's lock lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockLeaseRecord {
    pub epoch: u64,
    pub expires: Time,
}

fn key(tag: &[u8; 4], inode: InodeId) -> Vec<u8> {
    let mut k = Vec::with_capacity(12);
    k.extend_from_slice(tag);
    k.extend_from_slice(&inode.to_le_bytes());
    k
}

pub fn inode_key(inode: InodeId) -> Vec<u8> {
    key(INODE, inode)
}
pub fn dir_mtime_key(inode: InodeId) -> Vec<u8> {
    key(DIR_MTIME, inode)
}
pub fn dir_subdirs_key(inode: InodeId) -> Vec<u8> {
    key(DIR_SUBDIRS, inode)
}
/// The prefix of every entry of directory `parent`.
pub fn dentry_prefix(parent: InodeId) -> Vec<u8> {
    key(DENTRY, parent)
}
pub fn dentry_key(parent: InodeId, name: &[u8]) -> Vec<u8> {
    let mut k = dentry_prefix(parent);
    k.extend_from_slice(name);
    k
}
pub fn session_prefix(inode: InodeId) -> Vec<u8> {
    key(SESSION, inode)
}
pub fn session_key(inode: InodeId, session: u64) -> Vec<u8> {
    let mut k = session_prefix(inode);
    k.extend_from_slice(&session.to_be_bytes());
    k
}
pub fn xattr_prefix(inode: InodeId) -> Vec<u8> {
    key(XATTR, inode)
}
pub fn xattr_key(inode: InodeId, name: &[u8]) -> Vec<u8> {
    let mut k = xattr_prefix(inode);
    k.extend_from_slice(name);
    k
}
pub fn gc_key(inode: InodeId) -> Vec<u8> {
    key(GC_QUEUE, inode)
}
pub fn alloc_key(shard: u16) -> Vec<u8> {
    let mut k = ID_ALLOC.to_vec();
    k.extend_from_slice(&shard.to_be_bytes());
    k
}
pub fn counter_key(name: &[u8]) -> Vec<u8> {
    let mut k = COUNTER.to_vec();
    k.extend_from_slice(name);
    k
}

pub fn lock_kind_byte(kind: LockKind) -> u8 {
    match kind {
        LockKind::Flock => 0,
        LockKind::Posix => 1,
    }
}

fn lock_kind_of_byte(b: u8) -> Option<LockKind> {
    match b {
        0 => Some(LockKind::Flock),
        1 => Some(LockKind::Posix),
        _ => None,
    }
}

/// The prefix of every lock of `kind` on `inode`.
pub fn lock_prefix(inode: InodeId, kind: LockKind) -> Vec<u8> {
    let mut k = key(LOCK, inode);
    k.push(lock_kind_byte(kind));
    k
}
/// The prefix of every lock of `kind` one client holds on `inode`.
pub fn lock_client_prefix(inode: InodeId, kind: LockKind, client: u64) -> Vec<u8> {
    let mut k = lock_prefix(inode, kind);
    k.extend_from_slice(&client.to_be_bytes());
    k
}
pub fn lock_key(inode: InodeId, kind: LockKind, client: u64, owner: u64, start: u64) -> Vec<u8> {
    let mut k = lock_client_prefix(inode, kind, client);
    k.extend_from_slice(&owner.to_be_bytes());
    k.extend_from_slice(&start.to_be_bytes());
    k
}
/// Client, owner and start of a key made by [`lock_key`].
pub fn lock_key_parts(k: &[u8]) -> Result<(u64, u64, u64), MetaError> {
    let part = |at: usize| -> Option<u64> {
        let bytes: [u8; 8] = k.get(at..at + 8)?.try_into().ok()?;
        Some(u64::from_be_bytes(bytes))
    };
    match (k.len(), part(13), part(21), part(29)) {
        (37, Some(client), Some(owner), Some(start)) => Ok((client, owner, start)),
        _ => Err(MetaError::Corrupt {
            key: printable(k),
            reason: "not a lock key".into(),
        }),
    }
}
/// The prefix of the lock index entries of one client.
pub fn lock_index_prefix(client: u64) -> Vec<u8> {
    let mut k = LOCK_CLIENT_INDEX.to_vec();
    k.extend_from_slice(&client.to_be_bytes());
    k
}
pub fn lock_index_key(client: u64, inode: InodeId, kind: LockKind) -> Vec<u8> {
    let mut k = lock_index_prefix(client);
    k.extend_from_slice(&inode.to_le_bytes());
    k.push(lock_kind_byte(kind));
    k
}
/// Inode and kind of a key made by [`lock_index_key`].
pub fn lock_index_parts(k: &[u8]) -> Result<(InodeId, LockKind), MetaError> {
    let inode = k
        .get(12..20)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(InodeId::from_le_bytes);
    let kind = k.get(20).copied().and_then(lock_kind_of_byte);
    match (k.len(), inode, kind) {
        (21, Some(inode), Some(kind)) => Ok((inode, kind)),
        _ => Err(MetaError::Corrupt {
            key: printable(k),
            reason: "not a lock index key".into(),
        }),
    }
}
pub fn lock_lease_key(client: u64) -> Vec<u8> {
    let mut k = LOCK_LEASE.to_vec();
    k.extend_from_slice(&client.to_be_bytes());
    k
}

/// The inode id at the end of a key made by `key` (after a 4-byte tag).
pub fn inode_of_key(k: &[u8]) -> Option<InodeId> {
    let bytes: [u8; 8] = k.get(4..12)?.try_into().ok()?;
    Some(InodeId::from_le_bytes(bytes))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain records into a Vec cannot fail.
    postcard::to_stdvec(value).expect("postcard encodes meta records")
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, MetaError> {
    postcard::from_bytes(bytes).map_err(|e| MetaError::Corrupt {
        key: printable(key),
        reason: e.to_string(),
    })
}

pub fn decode_u64(key: &[u8], bytes: &[u8]) -> Result<u64, MetaError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| MetaError::Corrupt {
        key: printable(key),
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_le_bytes(arr))
}

/// A key for logs: the tag as text, the rest as hex.
pub fn printable(key: &[u8]) -> String {
    let (tag, rest) = key.split_at(key.len().min(4));
    let mut s = String::from_utf8_lossy(tag).into_owned();
    for b in rest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A stored GC entry, for storage to consume.
pub type GcRecord = GcEntry;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dentry_keys_of_one_directory_share_its_prefix_and_sort_by_name() {
        let a = dentry_key(7, b"a");
        let b = dentry_key(7, b"b");
        assert!(a.starts_with(&dentry_prefix(7)));
        assert!(a < b);
        assert!(!dentry_key(8, b"a").starts_with(&dentry_prefix(7)));
    }

    #[test]
    fn inode_of_key_reads_back_the_id() {
        assert_eq!(
            inode_of_key(&gc_key(0x0102_0304_0506)),
            Some(0x0102_0304_0506)
        );
        assert_eq!(inode_of_key(b"GCQ_"), None);
    }

    #[test]
    fn lock_keys_read_back_and_group_by_inode_kind_and_client() {
        let k = lock_key(7, LockKind::Posix, 3, 4, 5);
        assert_eq!(lock_key_parts(&k).unwrap(), (3, 4, 5));
        assert!(k.starts_with(&lock_client_prefix(7, LockKind::Posix, 3)));
        assert!(k.starts_with(&lock_prefix(7, LockKind::Posix)));
        assert!(!k.starts_with(&lock_prefix(7, LockKind::Flock)));
        // Ranges of one owner sort by start.
        assert!(lock_key(7, LockKind::Posix, 3, 4, 5) < lock_key(7, LockKind::Posix, 3, 4, 256));
        let i = lock_index_key(3, 7, LockKind::Flock);
        assert!(i.starts_with(&lock_index_prefix(3)));
        assert_eq!(lock_index_parts(&i).unwrap(), (7, LockKind::Flock));
        assert!(lock_key_parts(&i).is_err());
        assert!(lock_index_parts(&k).is_err());
    }

    #[test]
    fn corrupt_record_is_an_error_not_a_panic() {
        let err = decode::<InodeRecord>(&inode_key(5), &[0xff, 0xff]).unwrap_err();
        assert!(matches!(err, MetaError::Corrupt { .. }), "{err:?}");
        assert!(decode_u64(b"IDNLxxxxxxxx", &[1, 2]).is_err());
    }
}
