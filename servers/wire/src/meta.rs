//! Requests and responses of the meta service: POSIX namespace operations.
//!
//! Every request that acts for a user carries that user's [`User`] so meta can
//! check permissions itself. Failures come back as `ErrorCode::Errno(errno)`.
//! Names are raw bytes (POSIX names need not be UTF-8).
//!
//! # File locks
//! flock(2) and POSIX record locks (fcntl, OFD locks as POSIX locks with their
//! own owner) are held in meta so every mount sees them. A lock belongs to a
//! (client, owner) pair: `client` names the mount, `owner` is the kernel's lock
//! owner. Locks never block in meta: a conflict answers EAGAIN and a blocking
//! caller retries. Each client's locks live under a lock lease of
//! [`LOCK_LEASE_DURATION`] that it renews every [`LOCK_LEASE_RENEW_INTERVAL`];
//! the locks of a client whose lease expired are void.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Method;

/// An inode number. `0` is never used; the root directory is [`ROOT_INODE`].
pub type InodeId = u64;
/// The root directory's inode.
pub const ROOT_INODE: InodeId = 1;
/// Longest name of a directory entry, in bytes.
pub const NAME_BYTES_MAX: usize = 255;
/// Longest symlink target, in bytes (Linux `PATH_MAX`).
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4096;
/// Longest extended attribute name, in bytes (Linux `XATTR_NAME_MAX`).
pub const XATTR_NAME_BYTES_MAX: usize = 255;
/// Largest extended attribute value, in bytes (Linux `XATTR_SIZE_MAX`).
pub const XATTR_VALUE_BYTES_MAX: usize = 65536;
/// Most entries one readdir call returns.
pub const READDIR_ENTRIES_MAX: u32 = 4096;

/// Who is asking: uid, primary gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl User {
    pub fn root() -> User {
        User {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileType {
    /// The `S_IFMT` bits of this type.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::Symlink => 0o120000,
            FileType::Fifo => 0o010000,
            FileType::Socket => 0o140000,
            FileType::CharDevice => 0o020000,
            FileType::BlockDevice => 0o060000,
        }
    }
}

/// A point in time: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
    /// Nanoseconds since the epoch, saturating (times before 1970 give 0).
    pub fn as_nanos(self) -> u64 {
        if self.sec < 0 {
            return 0;
        }
        (self.sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(self.nsec as u64)
    }
    pub fn from_nanos(nanos: u64) -> Time {
        Time {
            sec: (nanos / 1_000_000_000) as i64,
            nsec: (nanos % 1_000_000_000) as u32,
        }
    }
}

/// Where a file's bytes live: chunks of `chunk_size` bytes, striped round-robin
/// over `stripe` chains taken from `chains` (chain ids in routing info).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub chunk_size: u32,
    pub stripe: u32,
    pub chains: Vec<u32>,
}

/// The attributes of an inode, as stat(2) needs them, plus the file layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub inode: InodeId,
    pub file_type: FileType,
    /// Permission bits including set-uid, set-gid and sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Length in bytes: file length, symlink target length, 0 for others.
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Device number for character and block devices.
    pub rdev: u32,
    /// Regular files only.
    pub layout: Option<Layout>,
    /// Bumped by every truncate; length hints from before it are ignored.
    pub truncate_ver: u64,
}

impl Attr {
    /// `st_mode`: type bits and permission bits.
    pub fn mode(&self) -> u32 {
        self.file_type.mode_bits() | self.perm
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFsRequest {}
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFsResponse {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub inodes_used: u64,
    pub name_bytes_max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRequest {
    pub user: User,
    pub parent: InodeId,
    pub name: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetAttrRequest {
    pub inode: InodeId,
}

/// Open flags meta cares about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFlags {
    pub read: bool,
    pub write: bool,
    pub truncate: bool,
    /// Register a session even for a read-only open, so the file's data outlives
    /// an unlink until this handle closes.
    pub hold: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    pub user: User,
    pub parent: InodeId,
    pub name: Vec<u8>,
    /// Permission bits after the caller applied its umask.
    pub perm: u32,
    /// `O_EXCL`: fail with EEXIST if the name exists.
    pub exclusive: bool,
    pub flags: OpenFlags,
    /// Identifies the client for its open sessions.
    pub client: u64,
}

/// What an open or create returns: the attributes, and the session id if one
/// was registered (write or `hold` opens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenResponse {
    pub attr: Attr,
    pub session: Option<u64>,
    /// `create` only: whether this call made the file.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    pub user: User,
    pub parent: InodeId,
    pub name: Vec<u8>,
    pub perm: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MknodRequest {
    pub user: User,
    pub parent: InodeId,
    pub name: Vec<u8>,
    pub file_type: FileType,
    pub perm: u32,
    pub rdev: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymlinkRequest {
    pub user: User,
    pub parent: InodeId,
    pub name: Vec<u8>,
    pub target: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadLinkRequest {
    pub inode: InodeId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRequest {
    pub user: User,
    pub inode: InodeId,
    pub new_parent: InodeId,
    pub new_name: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnlinkRequest {
    pub user: User,
    pub parent: InodeId,
    pub name: Vec<u8>,
}

/// `renameat2` flags. At most one may be set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    pub user: User,
    pub parent: InodeId,
    pub name: Vec<u8>,
    pub new_parent: InodeId,
    pub new_name: Vec<u8>,
    pub flags: RenameFlags,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadDirRequest {
    pub user: User,
    pub inode: InodeId,
    /// Continue after this name (the last one of the previous page).
    pub after: Option<Vec<u8>>,
    /// Most entries to return; capped at [`READDIR_ENTRIES_MAX`].
    pub limit: u32,
    /// Also return each entry's attributes (readdirplus).
    pub plus: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub inode: InodeId,
    pub file_type: FileType,
    pub attr: Option<Attr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadDirResponse {
    pub entries: Vec<DirEntry>,
    /// More entries follow the last one returned.
    pub more: bool,
}

/// A time to set: the server's clock, or a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Time),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttrRequest {
    pub user: User,
    pub inode: InodeId,
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// The caller holds the file open for writing (ftruncate): skip the write
    /// permission check for `size`, as the open already passed it.
    pub via_write_handle: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    pub user: User,
    pub inode: InodeId,
    pub flags: OpenFlags,
    pub client: u64,
}

/// The length a writer has reached, and the truncate version it wrote under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LengthHint {
    pub length: u64,
    pub truncate_ver: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRequest {
    pub inode: InodeId,
    pub session: Option<u64>,
    pub hint: Option<LengthHint>,
    /// The writer changed the file: set mtime and ctime to now.
    pub touched: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub inode: InodeId,
    pub hint: Option<LengthHint>,
    pub touched: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub user: User,
    pub inode: InodeId,
    /// `R_OK | W_OK | X_OK` bits (4, 2, 1); 0 checks existence.
    pub mask: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetXattrRequest {
    pub user: User,
    pub inode: InodeId,
    pub name: Vec<u8>,
}

/// `setxattr` flags: `create` fails if it exists, `replace` if it does not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XattrFlags {
    pub create: bool,
    pub replace: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetXattrRequest {
    pub user: User,
    pub inode: InodeId,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    pub flags: XattrFlags,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListXattrRequest {
    pub user: User,
    pub inode: InodeId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveXattrRequest {
    pub user: User,
    pub inode: InodeId,
    pub name: Vec<u8>,
}

/// A file whose chunks storage must remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcEntry {
    pub inode: InodeId,
    pub layout: Layout,
    pub length: u64,
    pub queued_at: Time,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcListRequest {
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcDoneRequest {
    pub inodes: Vec<InodeId>,
}

/// How long a client's locks outlive its last lease renewal.
pub const LOCK_LEASE_DURATION: Duration = Duration::from_secs(30);
/// How often a client holding locks renews its lock lease.
pub const LOCK_LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(10);
const _: () = assert!(3 * LOCK_LEASE_RENEW_INTERVAL.as_secs() <= LOCK_LEASE_DURATION.as_secs());
/// The end of a lock range that runs to the end of the file (and beyond).
pub const LOCK_END_EOF: u64 = u64::MAX;

/// Which lock family: flock(2) locks and POSIX record locks never conflict
/// with each other (as on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    /// Whole-file lock, one per (client, owner) per inode.
    Flock,
    /// Byte-range lock; ranges of one (client, owner) merge and split.
    Posix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockType {
    /// Shared.
    Read,
    /// Exclusive.
    Write,
    /// Remove (only in [`SetLockRequest`]).
    Unlock,
}

/// `F_SETLK` or `flock(LOCK_NB)`: take, change or drop a lock without
/// waiting. A conflict fails with EAGAIN; the caller retries to wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLockRequest {
    pub inode: InodeId,
    /// The mount asking: one id per mount, the one whose lease it renews.
    pub client: u64,
    /// The kernel's lock owner.
    pub owner: u64,
    /// Reported by [`GetLock`] to others.
    pub pid: u32,
    pub kind: LockKind,
    pub lock_type: LockType,
    /// First byte of the range (POSIX only; flock locks the whole file).
    pub start: u64,
    /// Last byte of the range, inclusive; [`LOCK_END_EOF`] runs to the end.
    pub end: u64,
}

/// `F_GETLK`: the lock that would block `lock_type` (Read or Write) on the
/// range for this owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetLockRequest {
    pub inode: InodeId,
    pub client: u64,
    pub owner: u64,
    pub kind: LockKind,
    pub lock_type: LockType,
    pub start: u64,
    pub end: u64,
}

/// A lock someone holds, as `F_GETLK` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: LockKind,
    /// Read or Write.
    pub lock_type: LockType,
    pub start: u64,
    pub end: u64,
    pub client: u64,
    pub owner: u64,
    pub pid: u32,
}

/// Drops every lock of `kind` that (client, owner) holds on `inode`: POSIX
/// locks on flush, flock locks on release of the last handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseLocksRequest {
    pub inode: InodeId,
    pub client: u64,
    pub owner: u64,
    pub kind: LockKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewLockLeaseRequest {
    pub client: u64,
}

/// A client's lock lease after a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockLease {
    /// Changes whenever the lease starts anew (first lock, or a renewal after
    /// it expired): every lock taken under an older epoch is void, so a client
    /// that sees its epoch change has lost all its locks.
    pub epoch: u64,
}

/// Drops every lock of a client and its lease (clean unmount).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropClientLocksRequest {
    pub client: u64,
}

macro_rules! methods {
    ($($name:ident = $id:literal : $req:ty => $resp:ty;)*) => {
        $(
            #[doc = concat!("Meta method `", stringify!($name), "`.")]
            pub struct $name;
            impl Method for $name {
                const ID: u16 = $id;
                const NAME: &'static str = concat!("meta.", stringify!($name));
                type Request = $req;
                type Response = $resp;
            }
        )*
        /// Every meta method id, for tests that must cover them all.
        pub const METHOD_IDS: &[u16] = &[$($id),*];
    };
}

methods! {
    StatFs = 0x0201: StatFsRequest => StatFsResponse;
    Lookup = 0x0202: LookupRequest => Attr;
    GetAttr = 0x0203: GetAttrRequest => Attr;
    Create = 0x0204: CreateRequest => OpenResponse;
    Mkdir = 0x0205: MkdirRequest => Attr;
    Mknod = 0x0206: MknodRequest => Attr;
    Symlink = 0x0207: SymlinkRequest => Attr;
    ReadLink = 0x0208: ReadLinkRequest => Vec<u8>;
    Link = 0x0209: LinkRequest => Attr;
    Unlink = 0x020a: UnlinkRequest => ();
    Rmdir = 0x020b: UnlinkRequest => ();
    Rename = 0x020c: RenameRequest => ();
    ReadDir = 0x020d: ReadDirRequest => ReadDirResponse;
    SetAttr = 0x020e: SetAttrRequest => Attr;
    Open = 0x020f: OpenRequest => OpenResponse;
    Close = 0x0210: CloseRequest => Attr;
    Sync = 0x0211: SyncRequest => Attr;
    Access = 0x0212: AccessRequest => ();
    GetXattr = 0x0213: GetXattrRequest => Vec<u8>;
    SetXattr = 0x0214: SetXattrRequest => ();
    ListXattr = 0x0215: ListXattrRequest => Vec<Vec<u8>>;
    RemoveXattr = 0x0216: RemoveXattrRequest => ();
    GcList = 0x0217: GcListRequest => Vec<GcEntry>;
    GcDone = 0x0218: GcDoneRequest => ();
    SetLock = 0x0219: SetLockRequest => ();
    GetLock = 0x021a: GetLockRequest => Option<LockInfo>;
    ReleaseLocks = 0x021b: ReleaseLocksRequest => ();
    RenewLockLease = 0x021c: RenewLockLeaseRequest => LockLease;
    DropClientLocks = 0x021d: DropClientLocksRequest => ();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_ids_are_in_the_meta_block_and_distinct() {
        let mut ids = METHOD_IDS.to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), METHOD_IDS.len());
        assert!(ids.iter().all(|id| id >> 8 == 0x02));
    }

    #[test]
    fn lock_requests_round_trip() {
        let req = SetLockRequest {
            inode: 9,
            client: u64::MAX,
            owner: 3,
            pid: 77,
            kind: LockKind::Posix,
            lock_type: LockType::Write,
            start: 10,
            end: LOCK_END_EOF,
        };
        let bytes = postcard::to_stdvec(&req).unwrap();
        assert_eq!(postcard::from_bytes::<SetLockRequest>(&bytes).unwrap(), req);
        let info = Some(LockInfo {
            kind: LockKind::Flock,
            lock_type: LockType::Read,
            start: 0,
            end: LOCK_END_EOF,
            client: 1,
            owner: 2,
            pid: 3,
        });
        let bytes = postcard::to_stdvec(&info).unwrap();
        assert_eq!(
            postcard::from_bytes::<Option<LockInfo>>(&bytes).unwrap(),
            info
        );
    }
}
