//! A POSIX behaviour suite run against any directory: a local file system, a
//! FUSE mount, or one namespace seen through two mounts.
//!
//! Every case gets a fresh subdirectory (`Ctx::a`, and the same directory seen
//! through the second path, `Ctx::b`) which is removed afterwards, pass or
//! fail. The cases encode Linux semantics; where POSIX leaves a choice (hole
//! granularity, lock errno) they accept every allowed answer.
//!
//! ```no_run
//! use r3fs_tests::posix::{self, Target};
//! let dir = tempfile::tempdir().unwrap();
//! posix::run_or_panic(&Target::local(dir.path()), None);
//! ```
mod attrs;
mod check;
mod dirs;
mod files;
mod misc;
mod sys;

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use check::CaseError;

/// Where the suite runs: `a` and `b` are the same namespace seen through two
/// mounts (`b` may equal `a`).
#[derive(Clone, Debug)]
pub struct Target {
    pub a: PathBuf,
    pub b: PathBuf,
    /// Names the target in the report, e.g. "fuse-uring".
    pub name: String,
}

impl Target {
    /// One directory seen once (`a == b`).
    pub fn local(dir: &Path) -> Target {
        Target {
            a: dir.to_path_buf(),
            b: dir.to_path_buf(),
            name: format!("local:{}", dir.display()),
        }
    }
}

/// What a case works in: its own fresh directory, seen through both paths.
pub struct Ctx {
    /// The case's directory through the first mount.
    pub a: PathBuf,
    /// The same directory through the second mount.
    pub b: PathBuf,
}

impl Ctx {
    /// `name` inside the case directory, through the first mount.
    pub fn pa(&self, name: &str) -> PathBuf {
        self.a.join(name)
    }

    /// `name` inside the case directory, through the second mount.
    pub fn pb(&self, name: &str) -> PathBuf {
        self.b.join(name)
    }
}

/// One named POSIX behaviour check.
pub struct Case {
    pub name: &'static str,
    pub run: fn(&Ctx) -> Result<(), CaseError>,
}

/// How one case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// What was expected and what was seen.
    Fail(String),
    /// The case cannot run here (e.g. needs root); says why.
    Skip(String),
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub case: &'static str,
    pub verdict: Verdict,
    pub elapsed: Duration,
}

/// Every case run against one target.
#[derive(Clone, Debug)]
pub struct Report {
    pub target: String,
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.outcomes.iter().filter_map(|o| match &o.verdict {
            Verdict::Fail(m) => Some((o.case, m.as_str())),
            _ => None,
        })
    }

    pub fn passed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.verdict == Verdict::Pass)
            .count()
    }

    /// True when at least one case ran and none failed.
    pub fn is_ok(&self) -> bool {
        !self.outcomes.is_empty() && self.failures().next().is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed = self.failures().count();
        let skipped = self.outcomes.len() - self.passed() - failed;
        writeln!(
            f,
            "posix suite on {}: {} passed, {} failed, {} skipped",
            self.target,
            self.passed(),
            failed,
            skipped
        )?;
        for o in &self.outcomes {
            let ms = o.elapsed.as_millis();
            match &o.verdict {
                Verdict::Pass => writeln!(f, "  ok   {} ({ms} ms)", o.case)?,
                Verdict::Fail(m) => writeln!(f, "  FAIL {} ({ms} ms): {m}", o.case)?,
                Verdict::Skip(m) => writeln!(f, "  skip {}: {m}", o.case)?,
            }
        }
        Ok(())
    }
}

/// Every case, in the order they run.
pub fn cases() -> &'static [Case] {
    CASES
}

/// Runs every case whose name contains `filter` (all when `None`), one after
/// another, each in its own fresh subdirectory of `target.a` (seen as the
/// same subdirectory of `target.b`), removed afterwards.
pub fn run(target: &Target, filter: Option<&str>) -> Report {
    let outcomes = cases()
        .iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
        .map(|c| run_case(target, c))
        .collect();
    Report {
        target: target.name.clone(),
        outcomes,
    }
}

/// Runs the suite, prints the report, and panics naming every failed case
/// (or when `filter` matched no case).
pub fn run_or_panic(target: &Target, filter: Option<&str>) -> Report {
    let report = run(target, filter);
    println!("{report}");
    if report.outcomes.is_empty() {
        panic!(
            "posix suite on {}: filter {filter:?} matched no case",
            target.name
        );
    }
    let failed: Vec<String> = report
        .failures()
        .map(|(c, m)| format!("{c}: {m}"))
        .collect();
    if !failed.is_empty() {
        panic!(
            "posix suite on {}: {} of {} cases failed:\n  {}",
            target.name,
            failed.len(),
            report.outcomes.len(),
            failed.join("\n  ")
        );
    }
    report
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn run_case(target: &Target, case: &Case) -> Outcome {
    let start = Instant::now();
    let dir = format!(
        "{}.{}.{}",
        case.name,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let ctx = Ctx {
        a: target.a.join(&dir),
        b: target.b.join(&dir),
    };
    let mut verdict = match prepare(&ctx) {
        Err(Prepare::NotCreated(m)) => {
            return Outcome {
                case: case.name,
                verdict: Verdict::Fail(m),
                elapsed: start.elapsed(),
            }
        }
        Err(Prepare::NotVisibleViaB(m)) => Verdict::Fail(m),
        Ok(()) => match catch_unwind(AssertUnwindSafe(|| (case.run)(&ctx))) {
            Ok(Ok(())) => Verdict::Pass,
            Ok(Err(CaseError::Fail(m))) => Verdict::Fail(m),
            Ok(Err(CaseError::Skip(m))) => Verdict::Skip(m),
            Err(p) => Verdict::Fail(format!("panicked: {}", panic_message(&p))),
        },
    };
    if let Err(e) = std::fs::remove_dir_all(&ctx.a) {
        let m = format!("removing the case directory {}: {e}", ctx.a.display());
        verdict = match verdict {
            Verdict::Fail(f) => Verdict::Fail(format!("{f}; then {m}")),
            _ => Verdict::Fail(m),
        };
    }
    Outcome {
        case: case.name,
        verdict,
        elapsed: start.elapsed(),
    }
}

enum Prepare {
    NotCreated(String),
    NotVisibleViaB(String),
}

fn prepare(ctx: &Ctx) -> Result<(), Prepare> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&ctx.a)
        .map_err(|e| {
            Prepare::NotCreated(format!(
                "creating the case directory {}: {e}",
                ctx.a.display()
            ))
        })?;
    match std::fs::metadata(&ctx.b) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Prepare::NotVisibleViaB(format!(
            "{} is not a directory via b",
            ctx.b.display()
        ))),
        Err(e) => Err(Prepare::NotVisibleViaB(format!(
            "the case directory created via a is not visible via b ({}): {e}",
            ctx.b.display()
        ))),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

macro_rules! cases {
    ($($module:ident :: $name:ident),* $(,)?) => {
        &[$(Case { name: stringify!($name), run: $module::$name }),*]
    };
}

static CASES: &[Case] = cases![
    files::open_excl_on_existing_is_eexist,
    files::open_trunc_empties,
    files::open_append_appends_after_lseek,
    files::open_creat_mode_honours_umask,
    files::open_missing_is_enoent,
    files::open_directory_on_file_is_enotdir,
    files::pwrite_pread_at_offsets,
    files::read_at_eof_is_short,
    files::write_past_eof_leaves_zero_hole,
    files::sparse_write_at_64mib,
    files::seek_data_seek_hole_contract,
    files::truncate_shrink_then_regrow_reads_zeros,
    files::ftruncate_on_open_fd,
    files::truncate_directory_is_eisdir,
    files::many_chunks_checksum_via_b,
    dirs::mkdir_rmdir,
    dirs::rmdir_nonempty_is_enotempty,
    dirs::mkdir_existing_is_eexist,
    dirs::readdir_10000_entries_each_once,
    dirs::dir_nlink_counts_subdirs,
    dirs::rename_file_over_file,
    dirs::rename_onto_itself,
    dirs::rename_exchange,
    dirs::rename_noreplace_existing_is_eexist,
    dirs::rename_dir_over_empty_dir,
    dirs::rename_dir_over_nonempty_is_enotempty,
    dirs::rename_dir_into_own_subtree_is_einval,
    dirs::rename_file_over_dir_is_eisdir,
    dirs::rename_dir_over_file_is_enotdir,
    dirs::rename_across_dirs,
    dirs::hardlink_nlink_and_shared_data,
    dirs::hardlink_to_dir_is_eperm,
    dirs::symlink_readlink_lstat_stat,
    dirs::symlink_dangling,
    dirs::symlink_loop_is_eloop,
    attrs::chmod_reads_back_and_moves_ctime,
    attrs::chown_reads_back,
    attrs::utimensat_explicit_now_omit,
    attrs::nonroot_read_0600_root_file_is_eacces,
    attrs::nonroot_create_in_0755_root_dir_is_eacces,
    attrs::nonroot_sticky_dir_unlink,
    attrs::xattr_set_get_list_remove,
    attrs::xattr_create_existing_is_eexist,
    attrs::xattr_replace_missing_is_enodata,
    attrs::xattr_get_missing_is_enodata,
    attrs::xattr_size_query_zero_buffer,
    misc::unlink_while_open,
    misc::fsync_fdatasync_files_and_dirs,
    misc::statfs_sane,
    misc::flock_across_mounts,
    misc::posix_locks_across_processes,
    misc::concurrent_writers_different_files,
    misc::concurrent_writers_one_file_disjoint_via_a_and_b,
    misc::name_256_bytes_is_enametoolong,
    misc::symlink_target_4097_bytes_is_enametoolong,
];
