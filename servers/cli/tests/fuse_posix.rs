//! The POSIX behaviour suite (`r3fs_tests::posix`) against real r3fs
//! mounts: two `r3fs mount`s of one local cluster, so every case also checks
//! what one mount sees of the other's changes (close-to-open, locks, renames).

mod common;
mod sandbox;

use r3fs_tests::posix::{self, Target};
use sandbox::Sandbox;

#[test]
fn posix_suite_passes_on_two_mounts_of_one_local_cluster() {
    if !sandbox::can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    let a = sb.dir("a");
    let b = sb.dir("b");
    sb.ok(&["mount", a.to_str().unwrap()]);
    sb.ok(&["mount", b.to_str().unwrap()]);
    let target = Target {
        a: a.clone(),
        b: b.clone(),
        name: "r3fs: two mounts of one local cluster".into(),
    };
    let report = posix::run_or_panic(&target, None);
    assert_eq!(
        report.outcomes.len(),
        posix::cases().len(),
        "every case ran"
    );
    sb.ok(&["umount", a.to_str().unwrap()]);
    sb.ok(&["umount", b.to_str().unwrap()]);
}
