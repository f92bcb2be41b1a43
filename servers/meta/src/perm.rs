//! POSIX permission checks against an inode's owner, group and mode bits.
//!
//! Root bypasses read and write checks, and execute checks on anything with at
//! least one execute bit (or any directory), as Linux does.

use r3fs_wire::meta::{FileType, User};

use crate::error::{fail, MetaError};
use crate::schema::InodeRecord;

pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const EXEC: u32 = 1;

pub const S_ISUID: u32 = 0o4000;
pub const S_ISGID: u32 = 0o2000;
pub const S_ISVTX: u32 = 0o1000;

/// Whether `user` may access `inode` for every bit in `mask` (READ|WRITE|EXEC).
pub fn allowed(inode: &InodeRecord, user: &User, mask: u32) -> bool {
    if user.is_root() {
        let needs_exec = mask & EXEC != 0;
        let any_exec = inode.perm & 0o111 != 0 || inode.file_type == FileType::Directory;
        return !needs_exec || any_exec;
    }
    let bits = if user.uid == inode.uid {
        (inode.perm >> 6) & 7
    } else if user.in_group(inode.gid) {
        (inode.perm >> 3) & 7
    } else {
        inode.perm & 7
    };
    bits & mask == mask
}

/// `allowed`, as an EACCES error naming what was refused.
pub fn check(inode: &InodeRecord, user: &User, mask: u32, what: &str) -> Result<(), MetaError> {
    if allowed(inode, user, mask) {
        return Ok(());
    }
    fail!(
        EACCES,
        "uid {} may not {what}: mode {:o} owned by {}:{}",
        user.uid,
        inode.perm,
        inode.uid,
        inode.gid
    )
}

/// In a sticky directory only the owner of the entry, the owner of the
/// directory, or root may remove or rename the entry.
pub fn check_sticky(dir: &InodeRecord, child: &InodeRecord, user: &User) -> Result<(), MetaError> {
    if dir.perm & S_ISVTX == 0 || user.is_root() || user.uid == dir.uid || user.uid == child.uid {
        return Ok(());
    }
    fail!(
        EPERM,
        "uid {} may not remove an entry owned by uid {} from a sticky directory",
        user.uid,
        child.uid
    )
}

/// Only the owner or root may change mode, times to explicit values, and so on.
pub fn check_owner(inode: &InodeRecord, user: &User, what: &str) -> Result<(), MetaError> {
    if user.is_root() || user.uid == inode.uid {
        return Ok(());
    }
    fail!(
        EPERM,
        "uid {} is not the owner (uid {}) and may not {what}",
        user.uid,
        inode.uid
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3fs_wire::meta::Time;

    fn file(perm: u32, uid: u32, gid: u32, file_type: FileType) -> InodeRecord {
        InodeRecord {
            file_type,
            perm,
            uid,
            gid,
            nlink: 1,
            size: 0,
            atime: Time { sec: 0, nsec: 0 },
            mtime: Time { sec: 0, nsec: 0 },
            ctime: Time { sec: 0, nsec: 0 },
            rdev: 0,
            layout: None,
            truncate_ver: 0,
            parent: 0,
            target: None,
        }
    }

    fn user(uid: u32, gid: u32, groups: &[u32]) -> User {
        User {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    fn check_case(perm: u32, who: User, mask: u32, expect: bool) {
        let f = file(perm, 1000, 100, FileType::Regular);
        assert_eq!(
            allowed(&f, &who, mask),
            expect,
            "perm {perm:o} uid {} mask {mask}",
            who.uid
        );
    }

    #[test]
    fn owner_group_other_bits_are_chosen_by_identity() {
        check_case(0o640, user(1000, 5, &[]), READ | WRITE, true);
        check_case(0o640, user(1000, 5, &[]), EXEC, false);
        check_case(0o640, user(2000, 100, &[]), READ, true);
        check_case(0o640, user(2000, 100, &[]), WRITE, false);
        check_case(0o640, user(2000, 7, &[100]), READ, true);
        check_case(0o640, user(2000, 7, &[8]), READ, false);
        // The owner class applies even when its bits are stricter than others'.
        check_case(0o077, user(1000, 100, &[]), READ, false);
    }

    #[test]
    fn root_bypasses_all_but_exec_on_non_executable_files() {
        check_case(0o000, User::root(), READ | WRITE, true);
        check_case(0o000, User::root(), EXEC, false);
        check_case(0o010, User::root(), EXEC, true);
        let dir = file(0o000, 1000, 100, FileType::Directory);
        assert!(allowed(&dir, &User::root(), EXEC));
    }

    #[test]
    fn sticky_directory_protects_other_users_entries() {
        let dir = file(0o1777, 0, 0, FileType::Directory);
        let theirs = file(0o644, 1000, 100, FileType::Regular);
        assert!(check_sticky(&dir, &theirs, &user(2000, 100, &[])).is_err());
        assert!(check_sticky(&dir, &theirs, &user(1000, 100, &[])).is_ok());
        assert!(check_sticky(&dir, &theirs, &User::root()).is_ok());
    }
}
