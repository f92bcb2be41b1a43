//! [`Sandbox`]: a temporary data directory for a local cluster and room for
//! mountpoints, for tests that run `r3fs mount` for real. Dropping it, pass
//! or fail, detaches every mount under it, SIGKILLs the daemons and the
//! local cluster it started (by pid, only if their command line names the
//! sandbox) and removes the directory.

#![allow(dead_code)] // each test file uses part of it

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

use crate::common;

/// FUSE mounts need root and /dev/fuse; tests without them say so and pass.
pub fn can_mount() -> bool {
    nix::unistd::geteuid().is_root() && std::path::Path::new("/dev/fuse").exists()
}

/// A temporary data directory (`data/`) and room for mountpoints.
pub struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    /// The sandbox's own directory.
    pub fn root(&self) -> &std::path::Path {
        self.tmp.path()
    }

    pub fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    /// A new empty directory to mount on.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Runs `r3fs <args> --data-dir <data>`.
    pub fn r3fs(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let data = self.data();
        all.extend(["--data-dir", data.to_str().unwrap()]);
        common::r3fs(&all)
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.r3fs(args);
        assert!(
            out.status.success(),
            "r3fs {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail and returns its stderr.
    #[track_caller]
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.r3fs(args);
        assert!(!out.status.success(), "r3fs {args:?} should fail: {out:?}");
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    pub fn cluster_file(&self) -> (String, String) {
        let text = std::fs::read_to_string(self.data().join("cluster.toml")).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        let first = |k: &str| v[k].as_array().unwrap()[0].as_str().unwrap().to_string();
        (first("mgmtd"), first("meta"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data().join("local-cluster.log")).unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let root = self.tmp.path().to_string_lossy().into_owned();
        let data = self.data();
        // Detach every mount under the sandbox, innermost first.
        let mut mounted: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|p| p.starts_with(&root))
            .collect();
        mounted.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in &mounted {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
        // Daemons from the registry, then the local cluster.
        let registry = std::fs::read_to_string(data.join("mounts.toml")).unwrap_or_default();
        let mut pids: Vec<i32> = registry
            .lines()
            .filter_map(|l| l.strip_prefix("pid = "))
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        if let Ok(p) = std::fs::read_to_string(data.join("local-cluster.pid")) {
            pids.extend(p.trim().parse::<i32>().ok());
        }
        for pid in pids {
            kill_if_ours(pid, &root);
        }
    }
}

/// SIGKILLs `pid` if its command line names our sandbox (never a recycled pid).
fn kill_if_ours(pid: i32, root: &str) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(root) {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Sets `/sys/module/fuse/parameters/enable_uring` to Y while held and
/// restores what it was when the last holder in this process drops it: the
/// knob is global to the machine, and tests of one binary run in parallel,
/// so one saved value is shared by every holder (the first saves it, the
/// last restores it).
pub struct EnableUring(());

static ENABLE_URING: std::sync::Mutex<(usize, String)> = std::sync::Mutex::new((0, String::new()));
const URING_KNOB: &str = "/sys/module/fuse/parameters/enable_uring";

impl EnableUring {
    /// Err (with the reason) if the kernel has no such knob or it cannot
    /// be set.
    pub fn set() -> Result<EnableUring, String> {
        let mut held = ENABLE_URING.lock().unwrap_or_else(|p| p.into_inner());
        if held.0 == 0 {
            let previous = std::fs::read_to_string(URING_KNOB)
                .map_err(|e| format!("{URING_KNOB}: {e} (kernel without FUSE over io_uring)"))?;
            std::fs::write(URING_KNOB, "Y").map_err(|e| format!("cannot set {URING_KNOB}: {e}"))?;
            held.1 = previous.trim().to_string();
        }
        held.0 += 1;
        Ok(EnableUring(()))
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let mut held = ENABLE_URING.lock().unwrap_or_else(|p| p.into_inner());
        held.0 -= 1;
        if held.0 == 0 {
            if let Err(e) = std::fs::write(URING_KNOB, &held.1) {
                eprintln!("cannot restore {URING_KNOB} to {}: {e}", held.1);
            }
        }
    }
}
