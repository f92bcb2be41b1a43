//! `r3fs mount` and `r3fs umount`: the FUSE daemon (`r3fs_fuse::run`) as a
//! background process, the local cluster it needs, and the registry that
//! ties mounts, daemons and clusters together.
//!
//! Never serves FUSE requests itself: the daemon library does. This module
//! only checks inputs, starts and stops processes, and keeps the registry.
//!
//! # Limits
//! A background daemon must report ready within [`MOUNT_READY_TIMEOUT`];
//! `umount` waits [`DAEMON_EXIT_TIMEOUT`] for the daemon before SIGKILL.

pub mod daemon;
pub mod registry;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::mount::MntFlags;

use crate::cluster_file::ClusterFile;
use crate::local_cluster::{self, DataDir, DataDirArg};
use registry::MountRecord;

pub const MOUNT_READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `mount` waits for a cluster to answer before giving up.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);
use r3fs_fuse::{READAHEAD_KIB_MAX, THREADS_MAX};
const CACHE_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// The source shown in /proc/mounts; also how an r3fs mount is recognised.
pub const FSNAME: &str = "r3fs";

#[derive(clap::Args)]
#[command(
    long_about = "Mount r3fs on MOUNTPOINT (an existing directory) with the FUSE daemon.\n\n\
        Without --cluster, it uses the local cluster of the data directory and starts it \
        in the background (`r3fs local-cluster`) if it does not run yet; further mounts \
        share it and its namespace. The daemon runs in the background, logging to \
        DATA_DIR/logs/mount-<path>.log, and the command returns once the mount is usable. \
        `r3fs umount MOUNTPOINT` stops it; `r3fs status` lists mounts.\n\n\
        Needs root and /dev/fuse."
)]
pub struct MountArgs {
    /// Directory to mount on; it must exist.
    mountpoint: PathBuf,
    /// Cluster file naming mgmtd and meta addresses [default: the local cluster
    /// of --data-dir, started if needed].
    #[arg(long)]
    cluster: Option<PathBuf>,
    #[command(flatten)]
    dir: DataDirArg,
    /// Keep the daemon attached (logs to stderr) until unmounted or SIGINT/SIGTERM.
    #[arg(long)]
    foreground: bool,
    /// Threads serving the kernel channel. Each blocks on the network while it
    /// serves a request, so this is how many requests run at once.
    #[arg(long, default_value_t = r3fs_fuse::THREADS_DEFAULT)]
    threads: usize,
    /// Kernel readahead for sequential reads, in KiB (the kernel's default is
    /// 128; larger windows keep several chunk reads in flight).
    #[arg(long, default_value_t = r3fs_fuse::READAHEAD_KIB_DEFAULT)]
    readahead_kb: u32,
    /// How long the kernel caches file attributes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    attr_timeout_ms: u64,
    /// How long the kernel caches name lookups, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    entry_timeout_ms: u64,
    /// How long the kernel caches failed lookups, in milliseconds (0: never, so
    /// files created through other mounts appear at once).
    #[arg(long, default_value_t = 0)]
    negative_timeout_ms: u64,
    /// Let the kernel cache writes and send them in larger batches. The kernel
    /// then owns a cached file's size and mtime: another mount's changes to a
    /// file are seen only after it leaves this mount's cache, so use it for
    /// files with one writer.
    #[arg(long)]
    writeback_cache: bool,
    /// How the daemon waits for kernel requests: `fuse` (classic: every
    /// worker blocks on the session fd), `xfuse` (a cloned fd per channel,
    /// adaptive busy-wait before blocking), `uring` (FUSE over io_uring), or
    /// `auto` (the best the kernel offers).
    #[arg(long, default_value = "auto")]
    channel: r3fs_fuse::channel::ChannelMode,
    /// Share `a` (0..=1) of the worker threads that wait the classic way
    /// (block at once, no spinning): with fuse/xfuse they read the session fd
    /// and the rest serve XFUSE channels with adaptive busy-wait; with uring
    /// they block in io_uring_enter and the rest spin on their queue's
    /// completion ring first. Default: 1 for `--channel fuse`, 0 otherwise.
    #[arg(long)]
    fuse_ratio: Option<f64>,
    /// Only root may use the mount. By default every user may (the kernel's
    /// allow_other), with permissions checked by meta against the caller's
    /// uid and groups, as on a local file system.
    #[arg(long)]
    private: bool,
    /// Set on the background child: report readiness on stdout, then detach it.
    #[arg(long, hide = true)]
    daemon_child: bool,
}

#[derive(clap::Args)]
#[command(long_about = "Unmount an r3fs mount and stop its daemon.\n\n\
        The kernel sends open files' pending writes through the daemon before it lets \
        the unmount happen; if a process still has a file open or its working directory \
        in the mount, the unmount fails (busy) unless --lazy. Then it waits for the \
        daemon to exit (30 s, then SIGKILL) and, if the mount used a local cluster that \
        `r3fs mount` started, stops that cluster once no mount uses it. Data stays.")]
pub struct UmountArgs {
    /// The mounted directory.
    mountpoint: PathBuf,
    /// Detach now even if busy; the daemon exits when the last open file closes.
    #[arg(long, short)]
    lazy: bool,
    #[command(flatten)]
    dir: DataDirArg,
}

pub fn run_mount(args: MountArgs) -> anyhow::Result<()> {
    let dir = DataDir::new(&args.dir.data_dir)?;
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    check_options(&args)?;
    let given = match &args.cluster {
        Some(path) => Some((ClusterFile::load(path)?, std::path::absolute(path)?)),
        None => None,
    };
    check_privileges()?;
    if let Some(m) = live_record(&dir, &mountpoint)? {
        bail!(
            "{} is already an r3fs mount (daemon pid {}); `r3fs umount {}` first",
            mountpoint.display(),
            m.pid,
            mountpoint.display()
        );
    }
    let (cluster, cluster_path, local) = match given {
        Some((file, path)) => (file, path, false),
        None => {
            local_cluster::ensure_running(&dir, true)?;
            let path = dir.cluster_file();
            (ClusterFile::load(&path)?, path, true)
        }
    };
    check_reachable(&cluster)?;
    if !args.foreground {
        return spawn_daemon(&args, &dir, &mountpoint);
    }
    let log = args.daemon_child.then(|| dir.mount_log(&mountpoint));
    let record = MountRecord {
        mountpoint: mountpoint.clone(),
        pid: std::process::id() as i32,
        cluster: cluster_path,
        local,
        log,
    };
    serve(&args, &dir, record, cluster)
}

/// Re-executes this command with --foreground in a detached process and
/// returns once it reports the mount usable.
fn spawn_daemon(args: &MountArgs, dir: &DataDir, mountpoint: &Path) -> anyhow::Result<()> {
    let mut child: Vec<OsString> = vec![
        "mount".into(),
        mountpoint.into(),
        "--foreground".into(),
        "--data-dir".into(),
        dir.root.clone().into(),
        format!("--attr-timeout-ms={}", args.attr_timeout_ms).into(),
        format!("--entry-timeout-ms={}", args.entry_timeout_ms).into(),
        format!("--negative-timeout-ms={}", args.negative_timeout_ms).into(),
    ];
    if let Some(path) = &args.cluster {
        child.push("--cluster".into());
        child.push(std::path::absolute(path)?.into());
    }
    child.push(format!("--threads={}", args.threads).into());
    child.push(format!("--readahead-kb={}", args.readahead_kb).into());
    child.push(format!("--channel={}", args.channel).into());
    if let Some(a) = args.fuse_ratio {
        child.push(format!("--fuse-ratio={a}").into());
    }
    if args.writeback_cache {
        child.push("--writeback-cache".into());
    }
    if args.private {
        child.push("--private".into());
    }
    let log = dir.mount_log(mountpoint);
    let line = daemon::spawn_and_wait("mount daemon", &child, &log, MOUNT_READY_TIMEOUT)?;
    println!("{line}");
    println!("daemon log: {}", log.display());
    Ok(())
}

/// Runs the daemon in this process until the mount goes away.
fn serve(
    args: &MountArgs,
    dir: &DataDir,
    record: MountRecord,
    cluster: ClusterFile,
) -> anyhow::Result<()> {
    let threads = args.threads;
    let config = r3fs_fuse::MountConfig {
        mountpoint: record.mountpoint.clone(),
        mgmtd: cluster.mgmtd.clone(),
        meta: cluster.meta.clone(),
        fsname: FSNAME.into(),
        threads,
        attr_timeout: Duration::from_millis(args.attr_timeout_ms),
        entry_timeout: Duration::from_millis(args.entry_timeout_ms),
        negative_timeout: Duration::from_millis(args.negative_timeout_ms),
        writeback_cache: args.writeback_cache,
        allow_other: !args.private,
        readahead_kib: args.readahead_kb,
        channel: args.channel,
        fuse_ratio: args.fuse_ratio,
        spin: Default::default(),
        stats_path: Some(stats_path(dir, &record.mountpoint)),
    };
    let mountpoint = record.mountpoint.clone();
    let message = format!(
        "mounted r3fs on {} (daemon pid {}, mgmtd {}, meta {})",
        mountpoint.display(),
        record.pid,
        cluster.mgmtd[0],
        cluster.meta[0]
    );
    let daemon_child = args.daemon_child;
    let registry_dir = dir.clone();
    tracing::info!(mountpoint = %mountpoint.display(), threads, mgmtd = ?cluster.mgmtd, meta = ?cluster.meta, "mounting");
    let result = r3fs_fuse::run(config, move || {
        if let Err(e) = registry::add(&registry_dir, record) {
            tracing::warn!(error = format!("{e:#}"), "register the mount");
        }
        tracing::info!("mount ready");
        daemon::notify_ready(&message, daemon_child);
    });
    if let Err(e) = registry::remove(dir, &mountpoint, Some(std::process::id() as i32)) {
        tracing::warn!(error = format!("{e:#}"), "unregister the mount");
    }
    result.map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(mountpoint = %mountpoint.display(), "unmounted; daemon exiting");
    Ok(())
}

/// Where a mount's daemon writes its channel counters (read by `r3fs status`).
pub fn stats_path(dir: &DataDir, mountpoint: &Path) -> PathBuf {
    dir.mount_log(mountpoint).with_extension("stats.json")
}

fn check_options(args: &MountArgs) -> anyhow::Result<()> {
    if let Some(a) = args.fuse_ratio {
        if !(0.0..=1.0).contains(&a) {
            bail!("--fuse-ratio {a} must be between 0 and 1");
        }
    }
    if args.channel == r3fs_fuse::channel::ChannelMode::Uring {
        r3fs_fuse::resolve_mode(args.channel)?;
    }
    let n = args.threads;
    if !(1..=THREADS_MAX).contains(&n) {
        bail!("--threads {n} must be between 1 and {THREADS_MAX}");
    }
    let kib = args.readahead_kb;
    if !(4..=READAHEAD_KIB_MAX).contains(&kib) {
        bail!("--readahead-kb {kib} must be between 4 and {READAHEAD_KIB_MAX}");
    }
    for (name, ms) in [
        ("--attr-timeout-ms", args.attr_timeout_ms),
        ("--entry-timeout-ms", args.entry_timeout_ms),
        ("--negative-timeout-ms", args.negative_timeout_ms),
    ] {
        if ms > CACHE_TIMEOUT_MS_MAX {
            bail!("{name} {ms} must be at most {CACHE_TIMEOUT_MS_MAX} (one hour)");
        }
    }
    Ok(())
}

/// The canonical mountpoint, after checking it is a directory and not an
/// r3fs mount already.
fn check_mountpoint(path: &Path) -> anyhow::Result<PathBuf> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mountpoint {shown} does not exist; create it first (mkdir -p {shown})")
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mountpoint {shown} is a FUSE mount whose daemon is gone; `r3fs umount {shown}` first"
        ),
        Err(e) => return Err(e).with_context(|| format!("mountpoint {shown}")),
    };
    if !meta.is_dir() {
        bail!("mountpoint {shown} is not a directory");
    }
    let canonical = std::fs::canonicalize(path).with_context(|| format!("resolve {shown}"))?;
    if let Some(m) = r3fs_mount_at(&canonical) {
        bail!(
            "{} is already an r3fs mount ({} {}); `r3fs umount {}` first",
            canonical.display(),
            m.fstype,
            m.source,
            canonical.display()
        );
    }
    Ok(canonical)
}

fn check_privileges() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "r3fs mount needs root: it mounts with mount(2) and /dev/fuse is root-only (try sudo)"
        );
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("/dev/fuse does not exist: load the FUSE module (modprobe fuse)")
        }
        Err(e) => Err(e).context("open /dev/fuse"),
    }
}

/// Checks that mgmtd has a primary and meta answers, naming the addresses.
fn check_reachable(cluster: &ClusterFile) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let mgmt = r3fs_client::MgmtClient::new(cluster.mgmtd.clone())?;
        match tokio::time::timeout(REACH_TIMEOUT, mgmt.primary()).await {
            Ok(Ok(p)) if p.primary.is_some() => {}
            Ok(Ok(_)) => bail!(
                "cluster not ready: mgmtd at {:?} answers but no instance holds the primary lease",
                cluster.mgmtd
            ),
            Ok(Err(e)) => bail!("cluster not reachable: mgmtd at {:?}: {e}", cluster.mgmtd),
            Err(_) => bail!(
                "cluster not reachable: mgmtd at {:?} did not answer within {REACH_TIMEOUT:?}",
                cluster.mgmtd
            ),
        }
        let config = r3fs_client::MetaClientConfig::new(cluster.meta.clone());
        let meta = r3fs_client::MetaClient::new(config)?;
        match tokio::time::timeout(REACH_TIMEOUT, meta.statfs()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => bail!("cluster not reachable: meta at {:?}: {e}", cluster.meta),
            Err(_) => bail!(
                "cluster not reachable: meta at {:?} did not answer within {REACH_TIMEOUT:?}",
                cluster.meta
            ),
        }
    })
}

/// The registry record of `mountpoint` whose daemon still runs.
fn live_record(dir: &DataDir, mountpoint: &Path) -> anyhow::Result<Option<MountRecord>> {
    Ok(registry::read(dir)?
        .into_iter()
        .find(|m| m.mountpoint == mountpoint && daemon::alive(m.pid)))
}

pub fn run_umount(args: UmountArgs) -> anyhow::Result<()> {
    let dir = DataDir::new(&args.dir.data_dir)?;
    let mountpoint = resolve(&args.mountpoint)?;
    let shown = mountpoint.display();
    let record = registry::read(&dir)?
        .into_iter()
        .find(|m| m.mountpoint == mountpoint);
    let mounted = r3fs_mount_at(&mountpoint).is_some();
    if !mounted && record.is_none() {
        bail!("{shown} is not an r3fs mount (`r3fs status` lists them)");
    }
    if mounted {
        let flags = if args.lazy {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        match nix::mount::umount2(&mountpoint, flags) {
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(Errno::EBUSY) => bail!(
                "{shown} is busy: a process has a file open or its working directory in it \
                 (`fuser -vm {shown}` lists them); close them and retry, or `r3fs umount --lazy {shown}` \
                 to detach now and let the daemon finish when they are done"
            ),
            Err(Errno::EPERM) => bail!("unmounting {shown} needs root"),
            Err(e) => return Err(e).with_context(|| format!("unmount {shown}")),
        }
    }
    let Some(record) = record else {
        println!("unmounted {shown} (no registered daemon)");
        return Ok(());
    };
    if !daemon::wait_exit(record.pid, DAEMON_EXIT_TIMEOUT) {
        if args.lazy {
            println!(
                "detached {shown}; its daemon (pid {}) exits once the last open file closes",
                record.pid
            );
            return Ok(());
        }
        if daemon::cmdline_contains(record.pid, &mountpoint.to_string_lossy()) {
            eprintln!(
                "r3fs: daemon pid {} did not exit within {DAEMON_EXIT_TIMEOUT:?}; killing it",
                record.pid
            );
            daemon::signal(record.pid, nix::sys::signal::Signal::SIGKILL)?;
            daemon::wait_exit(record.pid, Duration::from_secs(5));
        }
    }
    registry::remove(&dir, &mountpoint, None)?;
    println!("unmounted {shown}");
    if record.local {
        stop_unused_local_cluster(&dir)?;
    }
    Ok(())
}

/// Stops the local cluster if a mount started it and no live mount uses it.
fn stop_unused_local_cluster(dir: &DataDir) -> anyhow::Result<()> {
    let Some(state) = local_cluster::state(dir) else {
        return Ok(());
    };
    if !state.started_by_mount || !registry::live_local_mounts(dir)?.is_empty() {
        return Ok(());
    }
    if local_cluster::stop(dir)? {
        println!(
            "stopped the local cluster in {} (no mount uses it)",
            dir.root.display()
        );
    }
    Ok(())
}

/// `path` made absolute with its parent resolved, without touching `path`
/// itself (a mount whose daemon died cannot be stat'ed).
fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)
            .with_context(|| format!("resolve {}", parent.display()))?
            .join(name)),
        _ => Ok(abs),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_r3fs(&self) -> bool {
        self.fstype.starts_with("fuse") && (self.source == FSNAME || self.fstype.ends_with(".r3fs"))
    }
}

/// The mounts this process sees.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| text.lines().filter_map(parse_mountinfo_line).collect())
        .unwrap_or_default()
}

/// The topmost r3fs mount at `path`, if any.
pub fn r3fs_mount_at(path: &Path) -> Option<MountEntry> {
    mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path)
        .filter(MountEntry::is_r3fs)
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mountpoint = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fstype = right.next()?;
    let source = right.next()?;
    Some(MountEntry {
        mountpoint: PathBuf::from(unescape(mountpoint)),
        fstype: unescape(fstype),
        source: unescape(source),
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, expect: Option<(&str, &str, &str, bool)>) {
        let got = parse_mountinfo_line(line).map(|m| {
            let r3fs = m.is_r3fs();
            (m.mountpoint, m.fstype, m.source, r3fs)
        });
        let want = expect.map(|(p, t, s, r)| (PathBuf::from(p), t.to_string(), s.to_string(), r));
        assert_eq!(got, want, "{line}");
    }

    #[test]
    fn mountinfo_lines_parse_and_r3fs_mounts_are_recognised() {
        check(
            "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
            Some(("/mnt2", "ext3", "/dev/root", false)),
        );
        check(
            "90 30 0:52 / /mnt/my\\040dir rw,nosuid - fuse.r3fs r3fs rw,user_id=0",
            Some(("/mnt/my dir", "fuse.r3fs", "r3fs", true)),
        );
        check(
            "91 30 0:53 / /mnt/x rw - fuse r3fs rw",
            Some(("/mnt/x", "fuse", "r3fs", true)),
        );
        check(
            "91 30 0:53 / /mnt/x rw - fuse sshfs rw",
            Some(("/mnt/x", "fuse", "sshfs", false)),
        );
        check("garbage", None);
    }
}
