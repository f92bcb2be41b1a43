//! The POSIX behaviour suite against a local directory (`a == b`): every
//! case encodes Linux semantics, so all must pass on a local file system.
use r3fs_tests::posix::{self, Target, Verdict};

#[test]
fn posix_suite_passes_on_a_local_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = posix::run_or_panic(&Target::local(dir.path()), None);
    assert_eq!(
        report.outcomes.len(),
        posix::cases().len(),
        "every case ran"
    );
    // CI runs as root, where nothing is skipped.
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let skipped: Vec<_> = report
            .outcomes
            .iter()
            .filter(|o| matches!(o.verdict, Verdict::Skip(_)))
            .map(|o| o.case)
            .collect();
        assert!(skipped.is_empty(), "cases skipped as root: {skipped:?}");
    }
    // Every case cleaned up after itself.
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read_dir").collect();
    assert!(left.is_empty(), "case directories left behind: {left:?}");
}

#[test]
fn filter_selects_cases_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = posix::run(&Target::local(dir.path()), Some("xattr_"));
    let names: Vec<_> = report.outcomes.iter().map(|o| o.case).collect();
    assert_eq!(names.len(), 5, "xattr cases: {names:?}");
    assert!(names.iter().all(|n| n.starts_with("xattr_")), "{names:?}");
    assert!(report.is_ok(), "{report}");
    let none = posix::run(&Target::local(dir.path()), Some("no such case"));
    assert!(none.outcomes.is_empty() && !none.is_ok());
}

#[test]
fn rename_cases_fail_when_b_is_another_namespace() {
    let (a, b) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let target = Target {
        a: a.path().to_path_buf(),
        b: b.path().to_path_buf(),
        name: "split".into(),
    };
    let panic = std::panic::catch_unwind(|| posix::run_or_panic(&target, Some("rename_")))
        .expect_err("run_or_panic must panic when cases fail");
    let msg = panic.downcast_ref::<String>().expect("panic message");
    let renames = posix::cases()
        .iter()
        .filter(|c| c.name.contains("rename_"))
        .count();
    assert!(
        msg.contains(&format!("{renames} of {renames} cases failed")),
        "{msg}"
    );
    assert!(
        msg.contains("rename_exchange: the case directory created via a is not visible via b"),
        "{msg}"
    );
    let left: Vec<_> = std::fs::read_dir(a.path()).expect("read_dir").collect();
    assert!(left.is_empty(), "case directories left behind: {left:?}");
}
