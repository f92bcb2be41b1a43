//! The FUSE mount under faults, as operators run it: `r3fs kv`, `r3fs mgmtd`,
//! `r3fs meta` and three `r3fs storage` processes with one chain of three,
//! and a mount by `r3fs mount --cluster FILE`. Storage nodes, meta and the
//! daemon itself are killed with SIGKILL while applications use the mount:
//! a syscall may fail (EIO, ENOTCONN) but never hangs, a lost replica goes
//! unnoticed, and everything works again once the processes are back.
//!
//! Every test holds a [`ProcessCluster`] (its processes die with it, by pid)
//! and a [`Mount`] (detached and its daemon killed when dropped, pass or
//! fail), and ends by checking that no mount is left under its temporary
//! directory.
//! Only generous upper bounds are asserted; measured times are printed.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::cluster::{
    single_node_client, storage_index, Meta, ProcessCluster, POLL_INTERVAL, WAIT,
};
use common::r3fs;
use nix::sys::signal::Signal;
use parking_lot::Mutex;

/// Longest a syscall on the mount may take while part of the cluster is down.
const SYSCALL_BOUND: Duration = Duration::from_secs(120);
/// Bytes a test file holds: more than two 1 MiB chunks.
const FILE_BYTES: usize = 2 * 1024 * 1024 + 12345;

fn can_mount() -> bool {
    nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists()
}

/// Deterministic bytes, different for each seed.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(131)) % 251) as u8)
        .collect()
}

/// A call running on its own thread, so a hang shows as a failed test.
struct Pending<T> {
    rx: mpsc::Receiver<T>,
    start: Instant,
}

/// Starts `f` on its own thread.
fn spawn_call<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    Pending { rx, start }
}

impl<T> Pending<T> {
    /// Whether the call is still running.
    fn rx_is_pending(&self) -> bool {
        matches!(self.rx.try_recv(), Err(mpsc::TryRecvError::Empty))
    }

    /// The call's result and how long it took since it started; panics if
    /// it has not returned [`SYSCALL_BOUND`] after it started (the thread
    /// stays blocked until the mount's guard kills the daemon and frees it).
    #[track_caller]
    fn wait(self, what: &str) -> (T, Duration) {
        let left = SYSCALL_BOUND.saturating_sub(self.start.elapsed());
        match self.rx.recv_timeout(left) {
            Ok(v) => (v, self.start.elapsed()),
            Err(_) => panic!("{what} hung: no answer after {SYSCALL_BOUND:?}"),
        }
    }
}

/// Runs `f` on its own thread and returns its result and duration, or
/// panics after [`SYSCALL_BOUND`].
#[track_caller]
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    spawn_call(f).wait(what)
}

/// Waits until `f` holds, at most [`WAIT`]; returns how long it took.
#[track_caller]
fn eventually(what: &str, f: impl FnMut() -> bool) -> Duration {
    common::eventually(what, WAIT, POLL_INTERVAL, f)
}

#[track_caller]
fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("not an OS error: {e}")),
    }
}

/// The whole file, read through a fresh O_DIRECT open so neither the page
/// cache nor an earlier handle can answer.
fn read_direct(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// Mount points in /proc/self/mountinfo under `root`.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Whether `pid` runs (a zombie counts as gone).
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// kv, mgmtd, meta on the kv server and three storage nodes (targets
/// 101..=103 on nodes 1..=3) in one chain of three, and a cluster file to
/// mount; None, said on stderr, where FUSE mounts are impossible.
fn cluster() -> Option<ProcessCluster> {
    if !can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return None;
    }
    Some(ProcessCluster::builder().meta(Meta::OnKv).start())
}

/// An `r3fs mount --cluster` of a cluster, with its daemon pid and log. On
/// drop it detaches the mount and SIGKILLs the daemon (by pid, checked
/// against its command line) if `umount` did not.
struct Mount {
    point: PathBuf,
    data: PathBuf,
    /// Every daemon of ours names this directory on its command line.
    root: PathBuf,
    pid: i32,
    log: PathBuf,
}

impl Mount {
    #[track_caller]
    fn start(cluster: &ProcessCluster) -> Mount {
        let point = cluster.path("mnt");
        std::fs::create_dir_all(&point).unwrap();
        let data = cluster.path("mount-data");
        let out = r3fs(&[
            "mount",
            point.to_str().unwrap(),
            "--cluster",
            cluster.cluster_file().to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "r3fs mount: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = stdout
            .split("daemon pid ")
            .nth(1)
            .and_then(|s| s.split([',', ')']).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no daemon pid in {stdout:?}"));
        let log = stdout
            .lines()
            .find_map(|l| l.strip_prefix("daemon log: "))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no daemon log in {stdout:?}"));
        Mount {
            point,
            data,
            root: cluster.dir().to_path_buf(),
            pid,
            log,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.point.join(name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ours(&self) -> bool {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(self.root.to_str().unwrap())
    }

    fn kill_daemon(&self) {
        assert!(self.ours(), "daemon pid {} is not ours", self.pid);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGKILL)
            .expect("kill our daemon");
    }

    /// `r3fs umount`, which must succeed and leave the daemon gone.
    #[track_caller]
    fn umount(&self) {
        let out = r3fs(&[
            "umount",
            self.point.to_str().unwrap(),
            "--data-dir",
            self.data.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "r3fs umount: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!alive(self.pid), "daemon {} outlived umount", self.pid);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for p in mounts_under(&self.point) {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
        if alive(self.pid) && self.ours() {
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            // Not our child: init reaps it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(self.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The end of every test: no mount left under the test's directory.
#[track_caller]
fn assert_no_mounts(cluster: &ProcessCluster) {
    let left = mounts_under(cluster.dir());
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}

#[test]
fn storage_chain_down_gives_eio_not_a_hang() {
    let Some(mut cluster) = cluster() else {
        return;
    };
    let mount = Mount::start(&cluster);
    let data = pattern(FILE_BYTES, 1);
    let path = mount.file("data");
    std::fs::write(&path, &data).unwrap();
    assert!(
        read_direct(&path).unwrap() == data,
        "read back before the outage"
    );
    let inode = std::fs::metadata(&path).unwrap().ino();
    // A file created and opened before the outage, written during it.
    let late = mount.file("late");
    let mut late_file = File::create(&late).unwrap();
    let late_inode = late_file.metadata().unwrap().ino();

    for n in 0..3 {
        cluster.kill_storage(n);
    }

    // Both at once: each must fail on its own within the bound.
    let p = path.clone();
    let read = spawn_call(move || read_direct(&p));
    let synced = spawn_call(move || {
        late_file.write_all(&pattern(8192, 2))?;
        late_file.sync_all()
    });
    // While that fsync waits on storage's retries, a stat of the same file
    // answers at once: sizes are not locked across storage calls. (After
    // the kernel's 1 s attribute timeout, so the stat reaches the daemon.)
    std::thread::sleep(Duration::from_millis(1200));
    let late_path = late.clone();
    let (stat, stat_took) = bounded(
        "stat of a file whose writes wait on a dead chain",
        move || std::fs::metadata(&late_path),
    );
    println!("stat during the stuck fsync answered in {stat_took:?}");
    assert!(stat.is_ok(), "{stat:?}");
    // Generous: it takes milliseconds; waiting for the fsync takes >10 s.
    assert!(
        stat_took < Duration::from_secs(5),
        "the stat waited for the stuck write: {stat_took:?}"
    );
    assert!(
        synced.rx_is_pending(),
        "the fsync must still be waiting on storage while the stat answers"
    );
    let (read, took) = read.wait("O_DIRECT read with the chain down");
    println!("O_DIRECT read with the chain down failed after {took:?}: {read:?}");
    assert_eq!(errno_of(read), libc::EIO);
    let (synced, took) = synced.wait("write + fsync with the chain down");
    println!("write + fsync with the chain down failed after {took:?}: {synced:?}");
    assert_eq!(errno_of(synced), libc::EIO);

    // The daemon lives on and meta still answers through it.
    assert!(alive(mount.pid), "the daemon died:\n{}", mount.log_text());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), FILE_BYTES as u64);
    let mut names: Vec<String> = std::fs::read_dir(&mount.point)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data", "late"]);
    let log = mount.log_text();
    for (op, ino) in [("read", inode), ("write", late_inode)] {
        assert!(
            log.lines().any(|l| l.contains("storage call failed")
                && l.contains(&format!("op=\"{op}\""))
                && l.contains(&format!("inode={ino}"))),
            "no log line names the failed {op} of inode {ino}:\n{log}"
        );
    }

    for n in 0..3 {
        cluster.start_storage(n);
    }
    // The last serving target comes back and serves as it is; the others
    // resync from it. (mgmtd once cycled such a target LASTSRV -> SERVING ->
    // LASTSRV forever; tests/tests/mgmtd.rs has the unit-level check.)
    let took = cluster.wait_serving("the chain heals after a whole-chain outage");
    println!("the chain healed {took:?} after the restart");
    let p = path.clone();
    let took = eventually("the file reads back after the outage", move || {
        read_direct(&p).is_ok_and(|d| d == data)
    });
    println!("the file read back {took:?} after the chain healed");
    mount.umount();
    drop(mount);
    assert_no_mounts(&cluster);
}

const BLOCK_BYTES: usize = 4096;
/// The writer stops appending here (16 MiB), far beyond what a run writes.
const BLOCKS_MAX: u64 = 4096;
/// Blocks the writer must get acknowledged in each phase.
const PHASE_BLOCKS: u64 = 20;

#[test]
fn one_replica_down_is_invisible_to_the_application() {
    let Some(mut cluster) = cluster() else {
        return;
    };
    let mount = Mount::start(&cluster);
    let path = mount.file("log");
    File::create(&path).unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let reads = Arc::new(AtomicU64::new(0));
    // Slowest write+fsync and slowest open+reads, in microseconds.
    let write_max_us = Arc::new(AtomicU64::new(0));
    let read_max_us = Arc::new(AtomicU64::new(0));

    // The writer appends a block at a time and fsyncs each.
    let writer = {
        let (path, acked, stop, errors, slowest) = (
            path.clone(),
            acked.clone(),
            stop.clone(),
            errors.clone(),
            write_max_us.clone(),
        );
        std::thread::spawn(move || {
            let mut f = OpenOptions::new().write(true).open(&path).unwrap();
            for b in 0..BLOCKS_MAX {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let start = Instant::now();
                let r = f
                    .write_all(&pattern(BLOCK_BYTES, b))
                    .and_then(|()| f.sync_all());
                slowest.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = r {
                    errors.lock().push(format!("write+fsync of block {b}: {e}"));
                    return;
                }
                acked.store(b + 1, Ordering::Release);
            }
        })
    };
    // The reader opens afresh, with O_DIRECT, and checks the newest
    // acknowledged block and a random older one.
    let reader = {
        let (path, acked, stop, errors, reads, slowest) = (
            path.clone(),
            acked.clone(),
            stop.clone(),
            errors.clone(),
            reads.clone(),
            read_max_us.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = acked.load(Ordering::Acquire);
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let check = |f: &File, b: u64| -> Result<(), String> {
                    let mut buf = vec![0u8; BLOCK_BYTES];
                    f.read_exact_at(&mut buf, b * BLOCK_BYTES as u64)
                        .map_err(|e| format!("read of block {b}: {e}"))?;
                    if buf != pattern(BLOCK_BYTES, b) {
                        return Err(format!("block {b} read wrong bytes"));
                    }
                    Ok(())
                };
                let start = Instant::now();
                let r = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .map_err(|e| format!("open: {e}"))
                    .and_then(|f| {
                        check(&f, n - 1)?;
                        check(&f, rand::random_range(0..n))
                    });
                slowest.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = r {
                    errors.lock().push(e);
                    return;
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let progress = |what: &str| {
        let from = acked.load(Ordering::Acquire);
        let took = eventually(what, || {
            !errors.lock().is_empty() || acked.load(Ordering::Acquire) >= from + PHASE_BLOCKS
        });
        println!("{what}: {took:?}");
    };

    progress("the writer makes progress before the kill");
    let head = cluster.chain()[0].0;
    let n = storage_index(head);
    cluster.kill_storage(n);
    let killed = Instant::now();
    let took = cluster.wait_target_state(head, "Offline");
    println!("head target {head} offline after {took:?}");
    progress("the writer makes progress with the head down");
    let during = acked.load(Ordering::Acquire);
    cluster.start_storage(n);
    cluster.wait_serving("the chain heals after the head restarts");
    println!("outage of target {head}: {:?}", killed.elapsed());
    progress("the writer makes progress after the resync");
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    reader.join().unwrap();
    let errors = errors.lock().clone();
    assert!(
        errors.is_empty(),
        "syscalls failed: {errors:?}\n{}",
        cluster.logs()
    );
    let blocks = acked.load(Ordering::Acquire);
    assert!(blocks < BLOCKS_MAX, "the writer ran out of blocks");
    println!(
        "{blocks} blocks written and fsynced ({during} by the end of the outage), {} reads; \
         slowest write+fsync {:?}, slowest open+2 reads {:?}",
        reads.load(Ordering::Relaxed),
        Duration::from_micros(write_max_us.load(Ordering::Relaxed)),
        Duration::from_micros(read_max_us.load(Ordering::Relaxed)),
    );

    let expect: Vec<u8> = (0..blocks).flat_map(|b| pattern(BLOCK_BYTES, b)).collect();
    assert!(
        read_direct(&path).unwrap() == expect,
        "the file reads back whole"
    );
    let inode = std::fs::metadata(&path).unwrap().ino();
    check_every_replica(&cluster, inode, &expect);
    mount.umount();
    drop(mount);
    assert_no_mounts(&cluster);
}

/// Reads `inode` from each replica alone and compares with `expect`.
fn check_every_replica(cluster: &ProcessCluster, inode: u64, expect: &[u8]) {
    use r3fs_client::{MetaClient, MetaClientConfig, MgmtClient, RoutingWatcher};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let meta = MetaClient::new(MetaClientConfig::new(vec![cluster.meta_addr()])).unwrap();
        let attr = meta.getattr(inode).await.unwrap();
        let layout = attr.layout.expect("a file has a layout");
        let mgmt = MgmtClient::new(vec![cluster.mgmtd_addr().parse().unwrap()]).unwrap();
        let mut watcher = RoutingWatcher::start(mgmt);
        let routing = watcher
            .wait_for(WAIT, |_| true)
            .await
            .expect("routing info");
        for node in &routing.nodes {
            let Some((_tx, direct)) = single_node_client(&routing, node.id) else {
                continue;
            };
            let data = direct
                .read(&layout, inode, 0, expect.len() as u64)
                .await
                .unwrap_or_else(|e| panic!("read from node {}: {e}", node.id));
            assert!(
                &data[..] == expect,
                "node {} holds different bytes",
                node.id
            );
        }
    });
}

#[test]
fn meta_down_gives_eio_and_recovers() {
    let Some(mut cluster) = cluster() else {
        return;
    };
    let mount = Mount::start(&cluster);
    let data = pattern(100_000, 3);
    std::fs::write(mount.file("before"), &data).unwrap();
    // Created past the mount, so the kernel has never looked it up.
    let meta = cluster.meta_addr().to_string();
    let out = r3fs(&["fs", "--meta", &meta, "touch", "/uncached"]);
    assert!(out.status.success(), "fs touch: {out:?}");

    cluster.kill_meta();
    let p = mount.file("uncached");
    let (stat, took) = bounded("stat of an uncached path with meta down", move || {
        std::fs::metadata(&p)
    });
    println!("stat with meta down failed after {took:?}: {stat:?}");
    assert_eq!(errno_of(stat), libc::EIO);
    let p = mount.file("new");
    let (create, took) = bounded("create with meta down", move || File::create(&p));
    println!("create with meta down failed after {took:?}: {create:?}");
    assert_eq!(errno_of(create), libc::EIO);
    assert!(alive(mount.pid), "the daemon died:\n{}", mount.log_text());

    let restarted = Instant::now();
    cluster.start_meta();
    let took = eventually("the mount answers again after meta restarts", || {
        std::fs::metadata(mount.file("uncached")).is_ok()
    });
    println!(
        "stat succeeds {took:?} after meta listens again ({:?} after the restart began)",
        restarted.elapsed()
    );
    let mut f = File::create(mount.file("after")).unwrap();
    f.write_all(b"written after meta came back").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(mount.file("after")).unwrap(),
        b"written after meta came back"
    );
    assert!(read_direct(&mount.file("before")).unwrap() == data);
    let mut names: Vec<String> = std::fs::read_dir(&mount.point)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["after", "before", "uncached"]);
    mount.umount();
    drop(mount);
    assert_no_mounts(&cluster);
}

#[test]
fn daemon_killed_leaves_a_clean_error() {
    let Some(cluster) = cluster() else {
        return;
    };
    let mount = Mount::start(&cluster);
    let data = pattern(FILE_BYTES, 4);
    std::fs::write(mount.file("kept"), &data).unwrap();
    let mut open = File::open(mount.file("kept")).unwrap();

    mount.kill_daemon();
    // The kernel ends a dead daemon's connection: requests fail with
    // ENOTCONN, or for one caught on an io_uring queue (a mount in auto mode
    // uses uring when the machine enables it) ECONNABORTED, or ECANCELED if
    // the kernel had handed it to the dead daemon's ring entry already.
    let gone = |e: i32| matches!(e, libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED);
    let took = eventually("the daemon is gone", || !alive(mount.pid));
    println!("daemon gone {took:?} after SIGKILL");
    let p = mount.file("kept");
    let (stat, took) = bounded("stat on a mount without daemon", move || {
        std::fs::metadata(&p)
    });
    println!("stat without daemon failed after {took:?}");
    let e = errno_of(stat);
    assert!(gone(e), "stat: errno {e}");
    let p = mount.point.clone();
    let (list, _) = bounded("readdir on a mount without daemon", move || {
        std::fs::read_dir(&p).map(|_| ())
    });
    let e = errno_of(list);
    assert!(gone(e), "readdir: errno {e}");
    let (read, _) = bounded("read of an open file without daemon", move || {
        let mut buf = vec![0u8; 4096];
        open.seek(SeekFrom::Start(0))?;
        open.read(&mut buf)
    });
    let e = errno_of(read);
    assert!(gone(e), "read: errno {e}");

    mount.umount();
    assert!(
        mounts_under(&mount.point).is_empty(),
        "umount left the mount"
    );
    let again = Mount::start(&cluster);
    assert!(
        read_direct(&again.file("kept")).unwrap() == data,
        "data survives a remount"
    );
    again.umount();
    drop(again);
    drop(mount);
    assert_no_mounts(&cluster);
}
