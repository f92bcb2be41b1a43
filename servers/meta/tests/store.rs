//! MetaStore behaviour against the real embedded engine: POSIX rules, errnos,
//! sessions, GC, and races between threads.

use std::sync::Arc;

use r3fs_kv::embedded::{EmbeddedConfig, EmbeddedEngine};
use r3fs_kv::KvEngine;
use r3fs_meta::{MetaConfig, MetaError, MetaStore};
use r3fs_wire::meta::*;

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Arc<dyn KvEngine>,
    store: MetaStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn KvEngine> =
        Arc::new(EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).unwrap());
    let store = MetaStore::new(
        engine.clone(),
        MetaConfig::default(),
        Some(dir.path().to_path_buf()),
    )
    .unwrap();
    Fixture {
        _dir: dir,
        engine,
        store,
    }
}

fn root() -> User {
    User::root()
}

fn alice() -> User {
    User {
        uid: 1000,
        gid: 1000,
        groups: vec![50],
    }
}

fn bob() -> User {
    User {
        uid: 2000,
        gid: 2000,
        groups: vec![],
    }
}

#[track_caller]
fn check_errno<T: std::fmt::Debug>(result: Result<T, MetaError>, errno: i32) {
    match result {
        Err(e) => assert_eq!(e.errno(), Some(errno), "expected errno {errno}, got {e}"),
        Ok(v) => panic!("expected errno {errno}, got Ok({v:?})"),
    }
}

fn create(
    s: &MetaStore,
    user: &User,
    parent: InodeId,
    name: &str,
) -> Result<OpenResponse, MetaError> {
    s.create(&CreateRequest {
        user: user.clone(),
        parent,
        name: name.into(),
        perm: 0o644,
        exclusive: true,
        flags: OpenFlags {
            read: true,
            write: false,
            truncate: false,
            hold: false,
        },
        client: 7,
    })
}

fn mkdir(s: &MetaStore, user: &User, parent: InodeId, name: &str, perm: u32) -> Attr {
    s.mkdir(&MkdirRequest {
        user: user.clone(),
        parent,
        name: name.into(),
        perm,
    })
    .unwrap()
}

fn lookup(s: &MetaStore, parent: InodeId, name: &str) -> Result<Attr, MetaError> {
    s.lookup(&LookupRequest {
        user: root(),
        parent,
        name: name.into(),
    })
}

fn rename(
    s: &MetaStore,
    parent: InodeId,
    name: &str,
    new_parent: InodeId,
    new_name: &str,
    flags: RenameFlags,
) -> Result<(), MetaError> {
    s.rename(&RenameRequest {
        user: root(),
        parent,
        name: name.into(),
        new_parent,
        new_name: new_name.into(),
        flags,
    })
}

fn unlink(s: &MetaStore, parent: InodeId, name: &str) -> Result<(), MetaError> {
    s.unlink(&UnlinkRequest {
        user: root(),
        parent,
        name: name.into(),
    })
}

fn names(s: &MetaStore, dir: InodeId) -> Vec<String> {
    let resp = s
        .readdir(&ReadDirRequest {
            user: root(),
            inode: dir,
            after: None,
            limit: 0,
            plus: false,
        })
        .unwrap();
    resp.entries
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect()
}

#[test]
fn create_then_lookup_and_getattr_agree() {
    let f = fixture();
    let made = create(&f.store, &root(), ROOT_INODE, "a").unwrap();
    assert!(made.created);
    assert_eq!(made.attr.file_type, FileType::Regular);
    assert_eq!(made.attr.nlink, 1);
    assert_eq!(made.attr.perm, 0o644);
    assert!(made.attr.layout.is_some());
    let looked = lookup(&f.store, ROOT_INODE, "a").unwrap();
    assert_eq!(looked, made.attr);
    assert_eq!(f.store.getattr(made.attr.inode).unwrap(), made.attr);
}

#[test]
fn exclusive_create_of_existing_name_fails_and_plain_create_opens_it() {
    let f = fixture();
    let first = create(&f.store, &root(), ROOT_INODE, "a").unwrap();
    check_errno(create(&f.store, &root(), ROOT_INODE, "a"), libc::EEXIST);
    let again = f
        .store
        .create(&CreateRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "a".into(),
            perm: 0o600,
            exclusive: false,
            flags: OpenFlags {
                read: true,
                write: true,
                truncate: false,
                hold: false,
            },
            client: 1,
        })
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.attr.inode, first.attr.inode);
    assert!(again.session.is_some(), "a write open registers a session");
    mkdir(&f.store, &root(), ROOT_INODE, "d", 0o755);
    let on_dir = CreateRequest {
        user: root(),
        parent: ROOT_INODE,
        name: "d".into(),
        perm: 0o644,
        exclusive: false,
        flags: OpenFlags::default(),
        client: 1,
    };
    check_errno(f.store.create(&on_dir), libc::EISDIR);
}

#[test]
fn bad_names_get_posix_errnos() {
    let f = fixture();
    let long = "x".repeat(256);
    check_errno(
        create(&f.store, &root(), ROOT_INODE, &long),
        libc::ENAMETOOLONG,
    );
    check_errno(create(&f.store, &root(), ROOT_INODE, "a/b"), libc::EINVAL);
    check_errno(create(&f.store, &root(), ROOT_INODE, "a\0b"), libc::EINVAL);
    check_errno(create(&f.store, &root(), ROOT_INODE, "."), libc::EEXIST);
    check_errno(create(&f.store, &root(), ROOT_INODE, ""), libc::ENOENT);
    assert!(create(&f.store, &root(), ROOT_INODE, &"y".repeat(255)).is_ok());
    check_errno(lookup(&f.store, ROOT_INODE, "missing"), libc::ENOENT);
    let file = create(&f.store, &root(), ROOT_INODE, "f")
        .unwrap()
        .attr
        .inode;
    check_errno(lookup(&f.store, file, "x"), libc::ENOTDIR);
}

#[test]
fn directory_nlink_counts_subdirectories_and_dotdot_resolves() {
    let f = fixture();
    let d = mkdir(&f.store, &root(), ROOT_INODE, "d", 0o755);
    assert_eq!(d.nlink, 2);
    mkdir(&f.store, &root(), d.inode, "e", 0o755);
    create(&f.store, &root(), d.inode, "file").unwrap();
    assert_eq!(f.store.getattr(d.inode).unwrap().nlink, 3);
    assert_eq!(lookup(&f.store, d.inode, "..").unwrap().inode, ROOT_INODE);
    assert_eq!(lookup(&f.store, d.inode, ".").unwrap().inode, d.inode);
    check_errno(
        f.store.rmdir(&UnlinkRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "d".into(),
        }),
        libc::ENOTEMPTY,
    );
    f.store
        .rmdir(&UnlinkRequest {
            user: root(),
            parent: d.inode,
            name: "e".into(),
        })
        .unwrap();
    assert_eq!(f.store.getattr(d.inode).unwrap().nlink, 2);
}

#[test]
fn entry_changes_bump_the_directory_mtime() {
    let f = fixture();
    let d = mkdir(&f.store, &root(), ROOT_INODE, "d", 0o755);
    std::thread::sleep(std::time::Duration::from_millis(5));
    create(&f.store, &root(), d.inode, "x").unwrap();
    let after = f.store.getattr(d.inode).unwrap();
    assert!(after.mtime > d.mtime, "{:?} !> {:?}", after.mtime, d.mtime);
    assert!(after.ctime >= after.mtime);
}

#[test]
fn wrong_types_are_refused() {
    let f = fixture();
    let d = mkdir(&f.store, &root(), ROOT_INODE, "d", 0o755);
    let file = create(&f.store, &root(), ROOT_INODE, "f").unwrap().attr;
    check_errno(unlink(&f.store, ROOT_INODE, "d"), libc::EISDIR);
    check_errno(
        f.store.rmdir(&UnlinkRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "f".into(),
        }),
        libc::ENOTDIR,
    );
    check_errno(
        f.store.link(&LinkRequest {
            user: root(),
            inode: d.inode,
            new_parent: ROOT_INODE,
            new_name: "d2".into(),
        }),
        libc::EPERM,
    );
    check_errno(f.store.readlink(file.inode), libc::EINVAL);
    let trunc_dir = SetAttrRequest {
        user: root(),
        inode: d.inode,
        perm: None,
        uid: None,
        gid: None,
        size: Some(0),
        atime: None,
        mtime: None,
        via_write_handle: false,
    };
    check_errno(f.store.setattr(&trunc_dir), libc::EISDIR);
    check_errno(
        f.store.mknod(&MknodRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "m".into(),
            file_type: FileType::Directory,
            perm: 0o755,
            rdev: 0,
        }),
        libc::EINVAL,
    );
    check_errno(
        f.store.open(&OpenRequest {
            user: root(),
            inode: d.inode,
            flags: OpenFlags {
                read: true,
                write: true,
                ..OpenFlags::default()
            },
            client: 1,
        }),
        libc::EISDIR,
    );
}

#[test]
fn hard_links_share_the_inode_and_count_nlink() {
    let f = fixture();
    let a = create(&f.store, &root(), ROOT_INODE, "a").unwrap().attr;
    let linked = f
        .store
        .link(&LinkRequest {
            user: root(),
            inode: a.inode,
            new_parent: ROOT_INODE,
            new_name: "b".into(),
        })
        .unwrap();
    assert_eq!(linked.nlink, 2);
    check_errno(
        f.store.link(&LinkRequest {
            user: root(),
            inode: a.inode,
            new_parent: ROOT_INODE,
            new_name: "b".into(),
        }),
        libc::EEXIST,
    );
    unlink(&f.store, ROOT_INODE, "a").unwrap();
    let b = lookup(&f.store, ROOT_INODE, "b").unwrap();
    assert_eq!((b.inode, b.nlink), (a.inode, 1));
    unlink(&f.store, ROOT_INODE, "b").unwrap();
    check_errno(f.store.getattr(a.inode), libc::ENOENT);
    let gc = f.store.gc_list(100).unwrap();
    assert_eq!(
        gc.iter().map(|e| e.inode).collect::<Vec<_>>(),
        vec![a.inode]
    );
}

#[test]
fn symlinks_store_their_target() {
    let f = fixture();
    let s = f
        .store
        .symlink(&SymlinkRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "l".into(),
            target: b"some/where".to_vec(),
        })
        .unwrap();
    assert_eq!(
        (s.file_type, s.size, s.perm),
        (FileType::Symlink, 10, 0o777)
    );
    assert_eq!(f.store.readlink(s.inode).unwrap(), b"some/where");
    check_errno(
        f.store.symlink(&SymlinkRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "l2".into(),
            target: vec![],
        }),
        libc::ENOENT,
    );
    check_errno(
        f.store.symlink(&SymlinkRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "l3".into(),
            target: vec![b'a'; 4097],
        }),
        libc::ENAMETOOLONG,
    );
}

#[test]
fn mknod_makes_special_files_and_only_root_makes_devices() {
    let f = fixture();
    let open = mkdir(&f.store, &root(), ROOT_INODE, "open", 0o777);
    let fifo = f
        .store
        .mknod(&MknodRequest {
            user: alice(),
            parent: open.inode,
            name: "p".into(),
            file_type: FileType::Fifo,
            perm: 0o600,
            rdev: 0,
        })
        .unwrap();
    assert_eq!(fifo.file_type, FileType::Fifo);
    check_errno(
        f.store.mknod(&MknodRequest {
            user: alice(),
            parent: open.inode,
            name: "c".into(),
            file_type: FileType::CharDevice,
            perm: 0o600,
            rdev: 0x0501,
        }),
        libc::EPERM,
    );
    let dev = f
        .store
        .mknod(&MknodRequest {
            user: root(),
            parent: open.inode,
            name: "c".into(),
            file_type: FileType::CharDevice,
            perm: 0o600,
            rdev: 0x0501,
        })
        .unwrap();
    assert_eq!(dev.rdev, 0x0501);
}

#[test]
fn rename_follows_posix_in_every_form() {
    let f = fixture();
    let s = &f.store;
    let none = RenameFlags::default();
    let a = create(s, &root(), ROOT_INODE, "a").unwrap().attr;
    let b = create(s, &root(), ROOT_INODE, "b").unwrap().attr;
    // Overwrite: b's old inode goes to GC.
    rename(s, ROOT_INODE, "a", ROOT_INODE, "b", none).unwrap();
    assert_eq!(lookup(s, ROOT_INODE, "b").unwrap().inode, a.inode);
    check_errno(lookup(s, ROOT_INODE, "a"), libc::ENOENT);
    check_errno(s.getattr(b.inode), libc::ENOENT);
    // NOREPLACE and EXCHANGE.
    let c = create(s, &root(), ROOT_INODE, "c").unwrap().attr;
    check_errno(
        rename(
            s,
            ROOT_INODE,
            "b",
            ROOT_INODE,
            "c",
            RenameFlags {
                noreplace: true,
                exchange: false,
            },
        ),
        libc::EEXIST,
    );
    rename(
        s,
        ROOT_INODE,
        "b",
        ROOT_INODE,
        "c",
        RenameFlags {
            noreplace: false,
            exchange: true,
        },
    )
    .unwrap();
    assert_eq!(lookup(s, ROOT_INODE, "c").unwrap().inode, a.inode);
    assert_eq!(lookup(s, ROOT_INODE, "b").unwrap().inode, c.inode);
    check_errno(
        rename(
            s,
            ROOT_INODE,
            "b",
            ROOT_INODE,
            "zz",
            RenameFlags {
                noreplace: false,
                exchange: true,
            },
        ),
        libc::ENOENT,
    );
    check_errno(
        rename(
            s,
            ROOT_INODE,
            "b",
            ROOT_INODE,
            "c",
            RenameFlags {
                noreplace: true,
                exchange: true,
            },
        ),
        libc::EINVAL,
    );
    // Directories: across parents, nlink follows; never into own subtree.
    let d1 = mkdir(s, &root(), ROOT_INODE, "d1", 0o755);
    let d2 = mkdir(s, &root(), ROOT_INODE, "d2", 0o755);
    let sub = mkdir(s, &root(), d1.inode, "sub", 0o755);
    rename(s, d1.inode, "sub", d2.inode, "moved", none).unwrap();
    assert_eq!(s.getattr(d1.inode).unwrap().nlink, 2);
    assert_eq!(s.getattr(d2.inode).unwrap().nlink, 3);
    assert_eq!(lookup(s, sub.inode, "..").unwrap().inode, d2.inode);
    check_errno(
        rename(s, ROOT_INODE, "d2", sub.inode, "loop", none),
        libc::EINVAL,
    );
    check_errno(
        rename(s, ROOT_INODE, "d2", d2.inode, "self", none),
        libc::EINVAL,
    );
    // Type rules when replacing.
    check_errno(
        rename(s, ROOT_INODE, "d1", ROOT_INODE, "b", none),
        libc::ENOTDIR,
    );
    check_errno(
        rename(s, ROOT_INODE, "b", ROOT_INODE, "d1", none),
        libc::EISDIR,
    );
    check_errno(
        rename(s, ROOT_INODE, "d1", ROOT_INODE, "d2", none),
        libc::ENOTEMPTY,
    );
    rename(s, ROOT_INODE, "d2", ROOT_INODE, "d1", none).unwrap();
    assert_eq!(lookup(s, ROOT_INODE, "d1").unwrap().inode, d2.inode);
    check_errno(s.getattr(d1.inode), libc::ENOENT);
    assert_eq!(s.getattr(ROOT_INODE).unwrap().nlink, 3);
    // Renaming a name onto itself, or onto another link of the same inode, does nothing.
    rename(s, ROOT_INODE, "b", ROOT_INODE, "b", none).unwrap();
    s.link(&LinkRequest {
        user: root(),
        inode: c.inode,
        new_parent: ROOT_INODE,
        new_name: "c2".into(),
    })
    .unwrap();
    rename(s, ROOT_INODE, "b", ROOT_INODE, "c2", none).unwrap();
    assert_eq!(lookup(s, ROOT_INODE, "b").unwrap().nlink, 2);
}

#[test]
fn readdir_pages_return_every_entry_once_in_name_order() {
    let f = fixture();
    let d = mkdir(&f.store, &root(), ROOT_INODE, "d", 0o755);
    let mut expect: Vec<String> = (0..25).map(|i| format!("n{i:03}")).collect();
    for n in &expect {
        create(&f.store, &root(), d.inode, n).unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = f
            .store
            .readdir(&ReadDirRequest {
                user: root(),
                inode: d.inode,
                after: after.clone(),
                limit: 7,
                plus: true,
            })
            .unwrap();
        assert!(page
            .entries
            .iter()
            .all(|e| e.attr.as_ref().map(|a| a.inode) == Some(e.inode)));
        after = page.entries.last().map(|e| e.name.clone());
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| String::from_utf8(e.name).unwrap()),
        );
        if !page.more {
            break;
        }
    }
    expect.sort();
    assert_eq!(seen, expect);
}

#[test]
fn readdir_during_churn_returns_stable_entries_exactly_once() {
    let f = fixture();
    let d = mkdir(&f.store, &root(), ROOT_INODE, "d", 0o755);
    let stable: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    for n in &stable {
        create(&f.store, &root(), d.inode, n).unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    let mut round = 0;
    loop {
        // Between pages, add and remove names that sort before, among and after the stable ones.
        for prefix in ["a", "s", "z"] {
            let name = format!("{prefix}churn{round}");
            create(&f.store, &root(), d.inode, &name).unwrap();
            if round > 0 {
                unlink(&f.store, d.inode, &format!("{prefix}churn{}", round - 1)).unwrap();
            }
        }
        round += 1;
        let page = f
            .store
            .readdir(&ReadDirRequest {
                user: root(),
                inode: d.inode,
                after: after.clone(),
                limit: 5,
                plus: false,
            })
            .unwrap();
        after = page.entries.last().map(|e| e.name.clone());
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| String::from_utf8(e.name).unwrap()),
        );
        if !page.more {
            break;
        }
    }
    for n in &stable {
        assert_eq!(
            seen.iter().filter(|s| *s == n).count(),
            1,
            "{n} in {seen:?}"
        );
    }
    let mut dedup = seen.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len(), "no entry twice: {seen:?}");
}

#[test]
fn permissions_follow_posix_for_non_root_users() {
    let f = fixture();
    let s = &f.store;
    // Root-owned 0755 root: alice may look but not create.
    check_errno(create(s, &alice(), ROOT_INODE, "x"), libc::EACCES);
    let home = mkdir(s, &root(), ROOT_INODE, "home", 0o777);
    let secret = mkdir(s, &alice(), home.inode, "secret", 0o700);
    assert_eq!((secret.uid, secret.gid), (1000, 1000));
    create(s, &alice(), secret.inode, "f").unwrap();
    check_errno(
        s.lookup(&LookupRequest {
            user: bob(),
            parent: secret.inode,
            name: "f".into(),
        }),
        libc::EACCES,
    );
    check_errno(
        s.readdir(&ReadDirRequest {
            user: bob(),
            inode: secret.inode,
            after: None,
            limit: 0,
            plus: false,
        }),
        libc::EACCES,
    );
    // Opening for write needs w; root bypasses.
    let ro = create(s, &alice(), home.inode, "ro").unwrap().attr;
    let wr = OpenFlags {
        read: false,
        write: true,
        ..OpenFlags::default()
    };
    check_errno(
        s.open(&OpenRequest {
            user: bob(),
            inode: ro.inode,
            flags: wr,
            client: 1,
        }),
        libc::EACCES,
    );
    assert!(s
        .open(&OpenRequest {
            user: root(),
            inode: ro.inode,
            flags: wr,
            client: 1
        })
        .is_ok());
    check_errno(
        s.access(&AccessRequest {
            user: bob(),
            inode: ro.inode,
            mask: 2,
        }),
        libc::EACCES,
    );
    assert!(s
        .access(&AccessRequest {
            user: bob(),
            inode: ro.inode,
            mask: 4
        })
        .is_ok());
    // Sticky directory: bob may not remove alice's file from a 1777 directory.
    let tmp = mkdir(s, &root(), ROOT_INODE, "tmp", 0o1777);
    create(s, &alice(), tmp.inode, "hers").unwrap();
    check_errno(
        s.unlink(&UnlinkRequest {
            user: bob(),
            parent: tmp.inode,
            name: "hers".into(),
        }),
        libc::EPERM,
    );
    s.unlink(&UnlinkRequest {
        user: alice(),
        parent: tmp.inode,
        name: "hers".into(),
    })
    .unwrap();
}

#[test]
fn setgid_directories_pass_their_group_down() {
    let f = fixture();
    let shared = mkdir(&f.store, &root(), ROOT_INODE, "shared", 0o777);
    let sattr = |perm: Option<u32>, gid: Option<u32>| SetAttrRequest {
        user: root(),
        inode: shared.inode,
        perm,
        uid: None,
        gid,
        size: None,
        atime: None,
        mtime: None,
        via_write_handle: false,
    };
    f.store.setattr(&sattr(None, Some(50))).unwrap();
    f.store.setattr(&sattr(Some(0o2777), None)).unwrap();
    let file = create(&f.store, &alice(), shared.inode, "f").unwrap().attr;
    assert_eq!(file.gid, 50);
    let sub = mkdir(&f.store, &alice(), shared.inode, "sub", 0o755);
    assert_eq!((sub.gid, sub.perm & 0o2000), (50, 0o2000));
}

#[test]
fn setattr_enforces_owner_rules_and_truncate_versions() {
    let f = fixture();
    let s = &f.store;
    let home = mkdir(s, &root(), ROOT_INODE, "home", 0o777);
    let file = create(s, &alice(), home.inode, "f").unwrap().attr;
    let base = SetAttrRequest {
        user: alice(),
        inode: file.inode,
        perm: None,
        uid: None,
        gid: None,
        size: None,
        atime: None,
        mtime: None,
        via_write_handle: false,
    };
    check_errno(
        s.setattr(&SetAttrRequest {
            user: bob(),
            perm: Some(0o777),
            ..base.clone()
        }),
        libc::EPERM,
    );
    assert_eq!(
        s.setattr(&SetAttrRequest {
            perm: Some(0o4755),
            ..base.clone()
        })
        .unwrap()
        .perm,
        0o4755
    );
    check_errno(
        s.setattr(&SetAttrRequest {
            uid: Some(2000),
            ..base.clone()
        }),
        libc::EPERM,
    );
    check_errno(
        s.setattr(&SetAttrRequest {
            gid: Some(2000),
            ..base.clone()
        }),
        libc::EPERM,
    );
    let chgrp = s
        .setattr(&SetAttrRequest {
            gid: Some(50),
            ..base.clone()
        })
        .unwrap();
    assert_eq!(chgrp.gid, 50);
    assert_eq!(chgrp.perm & 0o4000, 0, "chown clears set-uid");
    let chown = s
        .setattr(&SetAttrRequest {
            user: root(),
            uid: Some(2000),
            ..base.clone()
        })
        .unwrap();
    assert_eq!(chown.uid, 2000);
    // utimens: explicit times only by the owner; "now" by anyone who may write.
    let t = Time {
        sec: 1_000_000,
        nsec: 5,
    };
    check_errno(
        s.setattr(&SetAttrRequest {
            user: alice(),
            mtime: Some(SetTime::At(t)),
            ..base.clone()
        }),
        libc::EPERM,
    );
    let timed = s
        .setattr(&SetAttrRequest {
            user: bob(),
            mtime: Some(SetTime::At(t)),
            atime: Some(SetTime::At(t)),
            ..base.clone()
        })
        .unwrap();
    assert_eq!((timed.mtime, timed.atime), (t, t));
    // Length hints grow the file; a truncate makes older hints void.
    let v0 = timed.truncate_ver;
    let grown = s
        .sync(&SyncRequest {
            inode: file.inode,
            hint: Some(LengthHint {
                length: 5000,
                truncate_ver: v0,
            }),
            touched: true,
        })
        .unwrap();
    assert_eq!(grown.size, 5000);
    let shrunk = s
        .setattr(&SetAttrRequest {
            user: bob(),
            size: Some(100),
            ..base.clone()
        })
        .unwrap();
    assert_eq!((shrunk.size, shrunk.truncate_ver), (100, v0 + 1));
    let stale = s
        .sync(&SyncRequest {
            inode: file.inode,
            hint: Some(LengthHint {
                length: 9000,
                truncate_ver: v0,
            }),
            touched: false,
        })
        .unwrap();
    assert_eq!(
        stale.size, 100,
        "a hint from before the truncate is ignored"
    );
    let smaller = s
        .sync(&SyncRequest {
            inode: file.inode,
            hint: Some(LengthHint {
                length: 10,
                truncate_ver: v0 + 1,
            }),
            touched: false,
        })
        .unwrap();
    assert_eq!(smaller.size, 100, "a hint never shrinks a file");
}

#[test]
fn unlinked_open_file_lives_until_its_last_session_closes() {
    let f = fixture();
    let s = &f.store;
    let rw = OpenFlags {
        read: true,
        write: true,
        ..OpenFlags::default()
    };
    let made = s
        .create(&CreateRequest {
            user: root(),
            parent: ROOT_INODE,
            name: "f".into(),
            perm: 0o644,
            exclusive: true,
            flags: rw,
            client: 1,
        })
        .unwrap();
    let first = made.session.unwrap();
    let second = s
        .open(&OpenRequest {
            user: root(),
            inode: made.attr.inode,
            flags: rw,
            client: 2,
        })
        .unwrap()
        .session
        .unwrap();
    unlink(s, ROOT_INODE, "f").unwrap();
    check_errno(lookup(s, ROOT_INODE, "f"), libc::ENOENT);
    let held = s.getattr(made.attr.inode).unwrap();
    assert_eq!(held.nlink, 0);
    s.close(&CloseRequest {
        inode: made.attr.inode,
        session: Some(first),
        hint: Some(LengthHint {
            length: 10,
            truncate_ver: 0,
        }),
        touched: true,
    })
    .unwrap();
    assert!(
        s.getattr(made.attr.inode).is_ok(),
        "still held by the second session"
    );
    assert!(s.gc_list(10).unwrap().is_empty());
    s.close(&CloseRequest {
        inode: made.attr.inode,
        session: Some(second),
        hint: None,
        touched: false,
    })
    .unwrap();
    check_errno(s.getattr(made.attr.inode), libc::ENOENT);
    let gc = s.gc_list(10).unwrap();
    assert_eq!(gc.len(), 1);
    assert_eq!((gc[0].inode, gc[0].length), (made.attr.inode, 10));
    s.gc_done(&[made.attr.inode]).unwrap();
    assert!(s.gc_list(10).unwrap().is_empty());
}

#[test]
fn xattrs_follow_linux_rules() {
    let f = fixture();
    let s = &f.store;
    let file = create(s, &root(), ROOT_INODE, "f").unwrap().attr;
    let set = |user: User, name: &str, value: &[u8], flags: XattrFlags| {
        s.setxattr(&SetXattrRequest {
            user,
            inode: file.inode,
            name: name.into(),
            value: value.to_vec(),
            flags,
        })
    };
    set(root(), "user.a", b"1", XattrFlags::default()).unwrap();
    set(root(), "trusted.t", b"2", XattrFlags::default()).unwrap();
    assert_eq!(
        s.getxattr(&GetXattrRequest {
            user: root(),
            inode: file.inode,
            name: "user.a".into()
        })
        .unwrap(),
        b"1"
    );
    check_errno(
        set(
            root(),
            "user.a",
            b"x",
            XattrFlags {
                create: true,
                replace: false,
            },
        ),
        libc::EEXIST,
    );
    check_errno(
        set(
            root(),
            "user.b",
            b"x",
            XattrFlags {
                create: false,
                replace: true,
            },
        ),
        libc::ENODATA,
    );
    check_errno(
        set(root(), "user.big", &vec![0u8; 65537], XattrFlags::default()),
        libc::E2BIG,
    );
    check_errno(
        set(root(), "other.x", b"x", XattrFlags::default()),
        libc::EOPNOTSUPP,
    );
    check_errno(set(root(), "", b"x", XattrFlags::default()), libc::ERANGE);
    check_errno(
        set(bob(), "user.a", b"x", XattrFlags::default()),
        libc::EACCES,
    );
    check_errno(
        set(bob(), "trusted.x", b"x", XattrFlags::default()),
        libc::EPERM,
    );
    let mut all = s
        .listxattr(&ListXattrRequest {
            user: root(),
            inode: file.inode,
        })
        .unwrap();
    all.sort();
    assert_eq!(all, vec![b"trusted.t".to_vec(), b"user.a".to_vec()]);
    assert_eq!(
        s.listxattr(&ListXattrRequest {
            user: bob(),
            inode: file.inode
        })
        .unwrap(),
        vec![b"user.a".to_vec()]
    );
    s.removexattr(&RemoveXattrRequest {
        user: root(),
        inode: file.inode,
        name: "user.a".into(),
    })
    .unwrap();
    check_errno(
        s.getxattr(&GetXattrRequest {
            user: root(),
            inode: file.inode,
            name: "user.a".into(),
        }),
        libc::ENODATA,
    );
    check_errno(
        s.removexattr(&RemoveXattrRequest {
            user: root(),
            inode: file.inode,
            name: "user.a".into(),
        }),
        libc::ENODATA,
    );
}

#[test]
fn statfs_counts_inodes_and_bytes() {
    let f = fixture();
    let before = f.store.statfs().unwrap();
    assert_eq!(before.inodes_used, 1, "the root");
    let file = create(&f.store, &root(), ROOT_INODE, "f").unwrap().attr;
    f.store
        .sync(&SyncRequest {
            inode: file.inode,
            hint: Some(LengthHint {
                length: 4096,
                truncate_ver: 0,
            }),
            touched: true,
        })
        .unwrap();
    let after = f.store.statfs().unwrap();
    assert_eq!((after.inodes_used, after.used_bytes), (2, 4096));
    assert!(after.capacity_bytes > 0);
    unlink(&f.store, ROOT_INODE, "f").unwrap();
    let gone = f.store.statfs().unwrap();
    assert_eq!((gone.inodes_used, gone.used_bytes), (1, 0));
}

#[test]
fn two_stores_on_one_engine_share_the_namespace() {
    let f = fixture();
    let other = MetaStore::new(f.engine.clone(), MetaConfig::default(), None).unwrap();
    let made = create(&f.store, &root(), ROOT_INODE, "shared")
        .unwrap()
        .attr;
    assert_eq!(
        lookup(&other, ROOT_INODE, "shared").unwrap().inode,
        made.inode
    );
    let made2 = create(&other, &root(), ROOT_INODE, "second").unwrap().attr;
    assert_ne!(
        made.inode, made2.inode,
        "the two allocators hand out disjoint ids"
    );
    check_errno(create(&other, &root(), ROOT_INODE, "shared"), libc::EEXIST);
}

#[test]
fn concurrent_creates_of_one_name_have_exactly_one_winner() {
    let f = Arc::new(fixture());
    for round in 0..10 {
        let name = format!("race{round}");
        let wins: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let f = f.clone();
                    let name = name.clone();
                    scope.spawn(move || match create(&f.store, &root(), ROOT_INODE, &name) {
                        Ok(_) => 1,
                        Err(e) => {
                            assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
                            0
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1, "round {round}");
    }
}

#[test]
fn concurrent_renames_that_would_form_a_cycle_leave_a_tree() {
    let f = Arc::new(fixture());
    for round in 0..20 {
        let top = mkdir(&f.store, &root(), ROOT_INODE, &format!("t{round}"), 0o755);
        let a = mkdir(&f.store, &root(), top.inode, "a", 0o755);
        let b = mkdir(&f.store, &root(), top.inode, "b", 0o755);
        std::thread::scope(|scope| {
            let f1 = f.clone();
            let f2 = f.clone();
            let t = top.inode;
            scope.spawn(move || rename(&f1.store, t, "a", b.inode, "a", RenameFlags::default()));
            scope.spawn(move || rename(&f2.store, t, "b", a.inode, "b", RenameFlags::default()));
        });
        // Exactly one move happened; walking up from both reaches the root.
        for dir in [a.inode, b.inode] {
            let mut at = dir;
            for _ in 0..10 {
                if at == ROOT_INODE {
                    break;
                }
                at = lookup(&f.store, at, "..").unwrap().inode;
            }
            assert_eq!(
                at, ROOT_INODE,
                "round {round}: directory {dir} is cut off from the root"
            );
        }
        assert_eq!(names(&f.store, top.inode).len(), 1, "round {round}");
    }
}

#[test]
fn concurrent_mkdir_and_rmdir_in_one_directory_keep_nlink_exact() {
    let f = Arc::new(fixture());
    let d = mkdir(&f.store, &root(), ROOT_INODE, "d", 0o755);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let f = f.clone();
            scope.spawn(move || {
                for i in 0..30 {
                    let name = format!("t{t}-{i}");
                    mkdir(&f.store, &root(), d.inode, &name, 0o755);
                    if i % 2 == 0 {
                        f.store
                            .rmdir(&UnlinkRequest {
                                user: root(),
                                parent: d.inode,
                                name: name.into(),
                            })
                            .unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(names(&f.store, d.inode).len(), 60);
    assert_eq!(f.store.getattr(d.inode).unwrap().nlink, 62);
}

#[test]
fn create_racing_rmdir_never_leaves_an_orphan_entry() {
    let f = Arc::new(fixture());
    for round in 0..20 {
        let name = format!("d{round}");
        let d = mkdir(&f.store, &root(), ROOT_INODE, &name, 0o755);
        let (created, removed) = std::thread::scope(|scope| {
            let f1 = f.clone();
            let f2 = f.clone();
            let c = scope.spawn(move || create(&f1.store, &root(), d.inode, "x").is_ok());
            let r = scope.spawn(move || {
                f2.store
                    .rmdir(&UnlinkRequest {
                        user: root(),
                        parent: ROOT_INODE,
                        name: name.into(),
                    })
                    .is_ok()
            });
            (c.join().unwrap(), r.join().unwrap())
        });
        assert!(created || removed, "round {round}: one of them succeeds");
        if removed {
            check_errno(f.store.getattr(d.inode), libc::ENOENT);
            let r = f.store.readdir(&ReadDirRequest {
                user: root(),
                inode: d.inode,
                after: None,
                limit: 0,
                plus: false,
            });
            check_errno(r, libc::ENOENT);
            assert!(
                !created,
                "round {round}: a file was created in a removed directory"
            );
        }
    }
}
