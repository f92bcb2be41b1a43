//! The POSIX behaviour suite (`r3fs_tests::posix`) against real r3fs
//! mounts, in every channel mode: two `r3fs mount`s of one local cluster,
//! so every case also checks what one mount sees of the other's changes
//! (close-to-open, locks, renames). The two mounts use different modes
//! where a test says so, so a mixed deployment is covered too.

mod common;
mod sandbox;

use r3fs_tests::posix::{self, Target};
use sandbox::Sandbox;

/// Mounts `a` with `opts_a` and `b` with `opts_b` on one local cluster and
/// runs the whole suite across them.
fn suite_on_two_mounts(name: &str, opts_a: &[&str], opts_b: &[&str]) {
    if !sandbox::can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    let a = sb.dir("a");
    let b = sb.dir("b");
    for (dir, opts) in [(&a, opts_a), (&b, opts_b)] {
        let mut args = vec!["mount", dir.to_str().unwrap()];
        args.extend_from_slice(opts);
        sb.ok(&args);
    }
    let target = Target {
        a: a.clone(),
        b: b.clone(),
        name: name.into(),
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

#[test]
fn posix_suite_passes_in_classic_fuse_mode() {
    suite_on_two_mounts(
        "r3fs --channel fuse",
        &["--channel", "fuse"],
        &["--channel", "fuse"],
    );
}

#[test]
fn posix_suite_passes_in_xfuse_mode() {
    suite_on_two_mounts(
        "r3fs --channel xfuse",
        &["--channel", "xfuse"],
        &["--channel", "xfuse"],
    );
}

#[test]
fn posix_suite_passes_with_a_mixed_fuse_ratio() {
    suite_on_two_mounts(
        "r3fs --channel xfuse --fuse-ratio 0.5 beside --channel fuse",
        &["--channel", "xfuse", "--fuse-ratio", "0.5"],
        &["--channel", "fuse"],
    );
}

#[test]
fn posix_suite_passes_in_uring_mode() {
    if !sandbox::can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return;
    }
    let _knob = match sandbox::EnableUring::set() {
        Ok(k) => k,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    // Mount b has half of its queue workers block instead of spin.
    suite_on_two_mounts(
        "r3fs --channel uring beside --channel uring --fuse-ratio 0.5",
        &["--channel", "uring"],
        &["--channel", "uring", "--fuse-ratio", "0.5"],
    );
}

/// With the writeback cache the kernel owns a cached file's size and mtime,
/// so what another mount wrote is seen only once the inode leaves the
/// cache: the suite runs through one mount (`a == b`), where every POSIX
/// rule must hold.
#[test]
fn posix_suite_passes_through_one_mount_with_the_writeback_cache() {
    if !sandbox::can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    let a = sb.dir("a");
    sb.ok(&["mount", a.to_str().unwrap(), "--writeback-cache"]);
    let report = posix::run_or_panic(&Target::local(&a), None);
    assert_eq!(
        report.outcomes.len(),
        posix::cases().len(),
        "every case ran"
    );
    sb.ok(&["umount", a.to_str().unwrap()]);
}
