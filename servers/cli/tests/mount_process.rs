//! `r3fs local-cluster`, `r3fs mount`, `r3fs umount` and `r3fs status` as a
//! user runs them: real processes from the built binary, a local cluster per
//! test in its own temporary data directory, real FUSE mounts.
//!
//! Every test holds a [`Sandbox`]: when it is dropped, pass or fail, it
//! detaches every mount under it, kills the daemons and the local cluster it
//! started (by pid, checked against their command lines) and removes the
//! directory.

mod common;
mod sandbox;

use sandbox::Sandbox;

use std::time::{Duration, Instant};

use serde_json::Value;

/// Waits until `f` holds (processes exit asynchronously).
#[track_caller]
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin_json(mgmtd: &str, cmd: &str) -> Value {
    let out = common::r3fs(&["admin", "--mgmtd", mgmtd, cmd, "--json"]);
    assert!(out.status.success(), "admin {cmd}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fs_ok(meta: &str, args: &[&str]) -> String {
    let out = common::r3fs(&[&["fs", "--meta", meta], args].concat());
    assert!(out.status.success(), "fs {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn local_cluster_serves_and_keeps_the_namespace_across_restarts() {
    let sb = Sandbox::new();
    let out = sb.ok(&["local-cluster"]);
    assert!(out.contains("local cluster ready"), "{out}");
    let (mgmtd, meta) = sb.cluster_file();
    assert!(mgmtd.starts_with("127.0.0.1:") && meta.starts_with("127.0.0.1:"));

    // Health as `r3fs admin` sees it: 3 storage nodes, 4 chains of 3, all SERVING.
    let targets = admin_json(&mgmtd, "list-targets");
    let targets = targets.as_array().unwrap();
    assert_eq!(targets.len(), 12, "{targets:?}");
    assert!(
        targets.iter().all(|t| t["public_state"] == "Serving"),
        "{targets:?}"
    );
    let chains = admin_json(&mgmtd, "list-chains");
    assert_eq!(chains.as_array().unwrap().len(), 4, "{chains}");
    assert!(chains
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["targets"].as_array().unwrap().len() == 3));

    fs_ok(&meta, &["mkdir", "-p", "/kept/dir"]);
    fs_ok(&meta, &["touch", "/kept/file"]);

    let status = sb.status();
    assert_eq!(status["local_cluster"]["ready"], true, "{status}");
    assert_eq!(status["cluster"]["serving_targets"], 12, "{status}");
    assert_eq!(status["cluster"]["meta_ok"], true, "{status}");
    assert_eq!(status["mounts"], serde_json::json!([]));
    let table = sb.ok(&["status"]);
    assert!(
        table.contains("local cluster: running") && table.contains("12/12 in chains SERVING"),
        "{table}"
    );

    // A second start finds it running; foreground start refuses.
    assert!(sb.ok(&["local-cluster"]).contains("already running"));
    let err = sb.fails(&["local-cluster", "start", "--foreground"]);
    assert!(err.contains("already runs"), "{err}");

    assert!(sb.ok(&["local-cluster", "stop"]).contains("stopped"));
    assert!(sb.log().contains("local cluster stopped"), "{}", sb.log());
    assert_eq!(sb.status()["local_cluster"], Value::Null);
    assert!(sb
        .ok(&["local-cluster", "stop"])
        .contains("no local cluster runs"));

    // Restart: same ports, same namespace, every target SERVING again.
    sb.ok(&["local-cluster", "start"]);
    assert_eq!(sb.cluster_file(), (mgmtd.clone(), meta.clone()));
    assert_eq!(fs_ok(&meta, &["ls", "/kept"]), "dir\nfile\n");
    assert_eq!(sb.status()["cluster"]["serving_targets"], 12);
    sb.ok(&["local-cluster", "stop"]);
}

#[test]
fn local_cluster_names_a_taken_port() {
    let sb = Sandbox::new();
    sb.ok(&["local-cluster"]);
    sb.ok(&["local-cluster", "stop"]);
    let (_, meta) = sb.cluster_file();
    let _taken = std::net::TcpListener::bind(&meta).unwrap();
    let err = sb.fails(&["local-cluster"]);
    assert!(
        err.contains(&format!("port {meta} (meta)")) && err.contains("not free"),
        "{err}"
    );
}

#[test]
fn mount_and_umount_reject_bad_inputs_clearly() {
    let sb = Sandbox::new();
    let mnt = sb.dir("mnt");
    let mnt = mnt.to_str().unwrap();
    let missing = sb.root().join("missing");
    let err = sb.fails(&["mount", missing.to_str().unwrap()]);
    assert!(err.contains("does not exist"), "{err}");
    let file = sb.root().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = sb.fails(&["mount", file.to_str().unwrap()]);
    assert!(err.contains("is not a directory"), "{err}");

    let check_cluster = |text: &str, expect: &str| {
        let path = sb.root().join("cluster.toml");
        std::fs::write(&path, text).unwrap();
        let err = sb.fails(&["mount", mnt, "--cluster", path.to_str().unwrap()]);
        assert!(err.contains(expect), "{text:?}: {err}");
    };
    check_cluster(
        "mgmtd = [\"127.0.0.1:1\"]\nmeta = [\"127.0.0.1:2\"]\nkv = []",
        "unknown field `kv`",
    );
    check_cluster("mgmtd = [\"127.0.0.1:1\"]", "missing field `meta`");
    check_cluster("mgmtd = []\nmeta = [\"127.0.0.1:2\"]", "at least one mgmtd");
    let err = sb.fails(&["mount", mnt, "--cluster", "/nonexistent/cluster.toml"]);
    assert!(
        err.contains("read cluster file /nonexistent/cluster.toml"),
        "{err}"
    );
    if nix::unistd::geteuid().is_root() {
        let dead = common::free_addr();
        check_cluster(
            &format!("mgmtd = [\"{dead}\"]\nmeta = [\"{dead}\"]"),
            &format!("cluster not reachable: mgmtd at [{dead}]"),
        );
    }
    let err = sb.fails(&["mount", mnt, "--threads", "0"]);
    assert!(err.contains("--threads 0"), "{err}");
    let err = sb.fails(&["umount", mnt]);
    assert!(err.contains("is not an r3fs mount"), "{err}");
    // None of this started a cluster or registered a mount.
    assert!(!sb.data().join("local-cluster.pid").exists());
    assert_eq!(sb.status()["mounts"], serde_json::json!([]));
}

/// Bytes spanning several 1 MiB chunks, so a file stripes over chains.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn mounts_in(status: &Value) -> Vec<(String, bool, bool)> {
    status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountpoint"].as_str().unwrap().to_string(),
                m["alive"].as_bool().unwrap(),
                m["mounted"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn mounts_share_the_local_cluster_and_the_last_umount_stops_it() {
    if !sandbox::can_mount() {
        eprintln!("skipped: FUSE mounts need root and /dev/fuse");
        return;
    }
    let sb = Sandbox::new();
    let (m1, m2) = (sb.dir("m1"), sb.dir("m2"));
    let (s1, s2) = (m1.to_str().unwrap(), m2.to_str().unwrap());

    let out = sb.ok(&["mount", s1]);
    assert!(out.contains(&format!("mounted r3fs on {s1}")), "{out}");
    let big = pattern(3 * 1024 * 1024 + 12345, 7);
    std::fs::create_dir(m1.join("dir")).unwrap();
    std::fs::write(m1.join("dir/big"), &big).unwrap();
    std::fs::write(m1.join("small"), b"hello r3fs\n").unwrap();
    assert_eq!(std::fs::read(m1.join("dir/big")).unwrap(), big);

    // A second mount reuses the running cluster and sees the same namespace.
    let cluster_pid = sb.status()["local_cluster"]["pid"].clone();
    sb.ok(&["mount", s2]);
    assert_eq!(sb.status()["local_cluster"]["pid"], cluster_pid);
    assert_eq!(std::fs::read(m2.join("dir/big")).unwrap(), big);
    assert_eq!(std::fs::read(m2.join("small")).unwrap(), b"hello r3fs\n");
    let err = sb.fails(&["mount", s2]);
    assert!(err.contains("already an r3fs mount"), "{err}");
    let status = sb.status();
    let mut listed = mounts_in(&status);
    listed.sort();
    assert_eq!(
        listed,
        vec![(s1.to_string(), true, true), (s2.to_string(), true, true)],
        "{status}"
    );

    // A busy mount is refused by name; closing the file lets it go.
    let open = std::fs::File::open(m1.join("small")).unwrap();
    let err = sb.fails(&["umount", s1]);
    assert!(err.contains(&format!("{s1} is busy")), "{err}");
    drop(open);
    sb.ok(&["umount", s1]);
    assert_eq!(mounts_in(&sb.status()), vec![(s2.to_string(), true, true)]);
    assert_eq!(
        sb.status()["local_cluster"]["pid"],
        cluster_pid,
        "m2 still uses it"
    );

    // The last umount stops the cluster the first mount started.
    let out = sb.ok(&["umount", s2]);
    assert!(out.contains("stopped the local cluster"), "{out}");
    eventually("the local cluster to stop", || {
        sb.status()["local_cluster"] == Value::Null
    });

    // Remount: the data survived the stop.
    sb.ok(&["mount", s1]);
    assert_eq!(std::fs::read(m1.join("dir/big")).unwrap(), big);
    sb.ok(&["umount", s1]);
    // Processes exit asynchronously after umount returns.
    eventually("the local cluster to stop again", || {
        sb.status()["local_cluster"] == Value::Null
    });
    assert_eq!(sb.status()["mounts"], serde_json::json!([]));
}

/// A parent that blocks SIGTERM (to sigwait for it, say) passes that mask
/// on through exec; r3fs must still stop gracefully on `local-cluster stop`
/// rather than sit deaf until the SIGKILL fallback.
#[test]
fn a_cluster_started_with_sigterm_blocked_still_stops_gracefully() {
    use std::os::unix::process::CommandExt;
    let sb = Sandbox::new();
    let data = sb.data();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_r3fs"));
    cmd.args(["local-cluster", "--data-dir", data.to_str().unwrap()]);
    // SAFETY: between fork and exec only async-signal-safe calls (sigprocmask).
    unsafe {
        cmd.pre_exec(|| {
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(nix::sys::signal::Signal::SIGTERM);
            set.add(nix::sys::signal::Signal::SIGINT);
            nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&set), None)
                .map_err(std::io::Error::from)
        });
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    sb.ok(&["local-cluster", "stop"]);
    let log = sb.log();
    assert!(
        log.contains("local cluster stopped"),
        "the cluster did not shut down gracefully:\n{log}"
    );
}
