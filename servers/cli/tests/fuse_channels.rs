//! Channel behaviour of real mounts: an idle XFUSE mount stops spinning and
//! uses almost no CPU, and every channel mode survives a storm of
//! INTERRUPTs (processes killed while the daemon serves their requests).

mod common;
mod sandbox;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandbox::Sandbox;
use serde_json::Value;

/// The pid of the daemon serving `mountpoint`.
fn daemon_pid(sb: &Sandbox, mountpoint: &Path) -> i32 {
    let status = sb.status();
    status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountpoint"].as_str().unwrap()) == mountpoint)
        .and_then(|m| m["pid"].as_i64())
        .expect("the mount is registered") as i32
}

/// The channel counters the daemon writes (the only mount of the sandbox).
fn channel_stats(sb: &Sandbox) -> Option<Value> {
    let logs = sb.data().join("logs");
    let file = std::fs::read_dir(logs)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".stats.json"))?;
    serde_json::from_slice(&std::fs::read(file).ok()?).ok()
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[track_caller]
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Holds enable_uring at Y for a uring test; None (test skipped, with the
/// reason printed) where the kernel lacks FUSE over io_uring.
fn uring_knob() -> Option<sandbox::EnableUring> {
    match sandbox::EnableUring::set() {
        Ok(k) => Some(k),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

#[test]
fn an_idle_xfuse_mount_stops_spinning_and_uses_almost_no_cpu() {
    idle_mount_stops_spinning("xfuse");
}

#[test]
fn an_idle_uring_mount_stops_spinning_and_uses_almost_no_cpu() {
    let Some(_knob) = uring_knob() else { return };
    idle_mount_stops_spinning("uring");
}

fn idle_mount_stops_spinning(mode: &str) {
    if !sandbox::can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    let mnt = sb.dir("m");
    let m = mnt.to_str().unwrap();
    sb.ok(&[
        "mount",
        m,
        "--channel",
        mode,
        "--attr-timeout-ms",
        "0",
        "--entry-timeout-ms",
        "0",
    ]);
    let file = mnt.join("f");
    std::fs::write(&file, b"x").unwrap();
    // A burst of back-to-back round trips makes the channels spin.
    for _ in 0..3000 {
        std::fs::metadata(&file).unwrap();
    }
    let busy = |v: &Value| {
        v["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["spin_hits"].as_u64().unwrap() + c["spin_misses"].as_u64().unwrap())
            .sum::<u64>()
    };
    eventually(
        "the burst in the channel counters",
        Duration::from_secs(10),
        || channel_stats(&sb).is_some_and(|v| busy(&v) > 0),
    );
    // Idle: every channel's budget drops to zero...
    eventually("every spin budget at zero", Duration::from_secs(10), || {
        channel_stats(&sb).is_some_and(|v| {
            v["channels"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["spin_budget_ns"].as_u64() == Some(0))
        })
    });
    // ...and the daemon burns (almost) no CPU: its periodic work is a few
    // small tasks a second. Generous bound: 10% of one CPU over 2 s.
    let pid = daemon_pid(&sb, &mnt);
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap_or(100) as u64;
    eprintln!("idle daemon used {used} ticks ({hz} per second) in 2 s");
    assert!(
        used * 10 <= 2 * hz,
        "an idle mount spins: {used} ticks in 2 s"
    );
    sb.ok(&["umount", m]);
}

/// Processes blocked in a lock wait or reading, killed mid-request: the
/// kernel sends INTERRUPT, the daemon must end those requests so the killed
/// processes exit, and keep serving.
fn interrupt_storm(opts: &[&str]) {
    if !sandbox::can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    let mnt = sb.dir("m");
    let m = mnt.to_str().unwrap();
    let mut args = vec!["mount", m];
    args.extend_from_slice(opts);
    sb.ok(&args);
    let lock = mnt.join("lock");
    let big = mnt.join("big");
    std::fs::write(&lock, b"").unwrap();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&big, &data).unwrap();

    let mut children = Children::default();
    let holder = children.spawn(
        // -o: the lock stays with flock itself, not its `sleep` child, so
        // killing flock releases it.
        Command::new("flock")
            .args(["-o", "-x"])
            .arg(&lock)
            .args(["-c", "sleep 600"]),
    );
    eventually("the holder's lock", Duration::from_secs(10), || {
        !Command::new("flock")
            .args(["-n", "-x"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap()
            .success()
    });
    // Waiters block in SETLKW (or get ENOLCK beyond the daemon's limit);
    // readers bypass the page cache so each read is a request. Each round
    // kills every waiter and reader (their whole process group, so the
    // `dd` inside a reader's shell is killed mid-read too), checks they all
    // exit, and starts a fresh set: ten storms of INTERRUPTs.
    let waiter = || {
        let mut c = Command::new("flock");
        c.arg("-x").arg(&lock).arg("true");
        c
    };
    let reader = || {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "while :; do dd if={} of=/dev/null bs=1M iflag=direct status=none; done",
            big.display()
        ));
        c
    };
    let started = Instant::now();
    for _round in 0..10 {
        let mut pids: Vec<u32> = (0..6).map(|_| children.spawn(&mut waiter())).collect();
        pids.extend((0..4).map(|_| children.spawn(&mut reader())));
        std::thread::sleep(Duration::from_millis(100));
        for &pid in &pids {
            children.kill(pid);
        }
        // Every killed process exits: none is stuck in a request.
        for &pid in &pids {
            children.wait_exit(pid, Duration::from_secs(60));
        }
    }
    eprintln!("ten rounds of kills done in {:?}", started.elapsed());
    // No killed waiter left a lock behind; the holder's lock goes with it.
    children.kill(holder);
    children.wait_exit(holder, Duration::from_secs(60));
    eventually("the lock free again", Duration::from_secs(10), || {
        Command::new("flock")
            .args(["-n", "-x"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap()
            .success()
    });
    // The daemon still serves, with every byte right.
    assert_eq!(std::fs::read(&big).unwrap(), data);
    sb.ok(&["umount", m]);
}

#[test]
fn classic_fuse_mode_survives_an_interrupt_storm() {
    interrupt_storm(&["--channel", "fuse"]);
}

#[test]
fn xfuse_mode_survives_an_interrupt_storm() {
    interrupt_storm(&["--channel", "xfuse"]);
}

#[test]
fn uring_mode_survives_an_interrupt_storm() {
    let Some(_knob) = uring_knob() else { return };
    interrupt_storm(&["--channel", "uring"]);
}

#[test]
fn mixed_mode_survives_an_interrupt_storm() {
    interrupt_storm(&["--channel", "xfuse", "--fuse-ratio", "0.5"]);
}

/// Child processes of one test, killed by pid when dropped.
#[derive(Default)]
struct Children {
    live: Vec<Child>,
}

impl Children {
    /// Starts `cmd` in a process group of its own, so a kill reaches
    /// everything it started.
    fn spawn(&mut self, cmd: &mut Command) -> u32 {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.live.push(child);
        pid
    }

    /// SIGKILLs the process group of our child `pid`.
    fn kill(&mut self, pid: u32) {
        if self.live.iter().any(|c| c.id() == pid) {
            let group = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }

    #[track_caller]
    fn wait_exit(&mut self, pid: u32, limit: Duration) {
        let c = self.live.iter_mut().find(|c| c.id() == pid).unwrap();
        let deadline = Instant::now() + limit;
        while c.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "process {pid} is stuck in a request"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.live {
            let group = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}
