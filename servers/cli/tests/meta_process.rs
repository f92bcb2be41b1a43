//! The `r3fs` binary as operators run it: a meta server process, `r3fs fs`
//! commands against it, SIGTERM, kill -9, restart, and bad configuration.
//! Every test kills the processes it started (by pid, on drop) and removes
//! its temporary directory, even when it fails.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{free_addr, ServerProcess, BIN};

/// A running `r3fs meta` and the `r3fs fs` commands that talk to it.
struct MetaProcess(ServerProcess);

impl std::ops::Deref for MetaProcess {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.0
    }
}

impl std::ops::DerefMut for MetaProcess {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.0
    }
}

impl MetaProcess {
    fn start(data_dir: &Path, extra: &[&str]) -> MetaProcess {
        let data = data_dir.to_str().unwrap();
        let mut args = vec!["meta", "--data-dir", data];
        args.extend_from_slice(extra);
        MetaProcess(ServerProcess::start(&args, &data_dir.with_extension("log")))
    }

    fn fs(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["fs", "--meta", &self.addr.to_string()])
            .args(args)
            .output()
            .expect("run r3fs fs")
    }

    #[track_caller]
    fn fs_ok(&self, args: &[&str]) -> String {
        let out = self.fs(args);
        assert!(
            out.status.success(),
            "r3fs fs {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

#[test]
fn fs_commands_work_against_a_meta_server_process() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = MetaProcess::start(&tmp.path().join("meta"), &[]);
    meta.fs_ok(&["mkdir", "-p", "/a/b/c"]);
    meta.fs_ok(&["touch", "/a/b/file"]);
    meta.fs_ok(&["ln", "-s", "/a/b", "/a/link"]);
    meta.fs_ok(&["mv", "/a/b/file", "/a/moved"]);
    assert_eq!(meta.fs_ok(&["ls", "/a/link"]), "c\n");
    let listing = meta.fs_ok(&["ls", "-l", "/a"]);
    assert!(
        listing.contains(" b\n") && listing.contains(" link\n") && listing.contains(" moved\n"),
        "{listing}"
    );
    assert_eq!(meta.fs_ok(&["readlink", "/a/link"]), "/a/b\n");
    meta.fs_ok(&["chmod", "700", "/a/moved"]);
    assert!(meta.fs_ok(&["stat", "/a/moved"]).contains("mode: 700"));
    meta.fs_ok(&["setfattr", "/a/moved", "user.color", "blue"]);
    assert_eq!(
        meta.fs_ok(&["getfattr", "/a/moved", "user.color"]),
        "blue\n"
    );
    assert!(meta.fs_ok(&["statfs"]).contains("inodes"));
    // Errors name the failure and exit non-zero.
    let out = meta.fs(&["rmdir", "/a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not empty"), "{err}");
    let out = meta.fs(&["stat", "/missing"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no entry"),
        "{out:?}"
    );
    let out = meta.fs(&["chmod", "99", "/a"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("octal mode"),
        "{out:?}"
    );
}

#[test]
fn sigterm_drains_and_a_restart_keeps_the_namespace() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("meta");
    let mut meta = MetaProcess::start(&data, &[]);
    meta.fs_ok(&["mkdir", "/kept"]);
    meta.fs_ok(&["touch", "/kept/f"]);
    meta.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(meta.wait(), "clean exit on SIGTERM: {}", meta.log_text());
    assert!(
        meta.log_text().contains("meta server stopped"),
        "{}",
        meta.log_text()
    );
    let again = MetaProcess::start(&data, &[]);
    assert_eq!(again.fs_ok(&["ls", "/kept"]), "f\n");
}

#[test]
fn acknowledged_creates_survive_kill_9_of_the_meta_server() {
    for durability in ["sync", "periodic"] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("meta");
        let meta = MetaProcess::start(&data, &["--durability", durability]);
        let addr = meta.addr;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let acked = runtime.block_on(async move {
            use r3fs_wire::meta::{CreateRequest, OpenFlags, User, ROOT_INODE};
            let client =
                r3fs_client::MetaClient::new(r3fs_client::MetaClientConfig::new(vec![addr]))
                    .unwrap();
            let mut acked = Vec::new();
            for i in 0..100_000u32 {
                let req = CreateRequest {
                    user: User::root(),
                    parent: ROOT_INODE,
                    name: format!("f{i}").into_bytes(),
                    perm: 0o644,
                    exclusive: true,
                    flags: OpenFlags::default(),
                    client: 0,
                };
                if i == 300 {
                    // Kill while creates are in flight from another task.
                    let pid = nix::unistd::Pid::from_raw(meta.child.id() as i32);
                    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
                }
                match client.create(req).await {
                    Ok(_) => acked.push(i),
                    Err(_) => break,
                }
            }
            drop(meta);
            acked
        });
        assert!(
            acked.len() >= 300,
            "{durability}: {} creates acknowledged",
            acked.len()
        );
        let again = MetaProcess::start(&data, &[]);
        let listing = again.fs_ok(&["ls", "/"]);
        let present: std::collections::HashSet<&str> = listing.lines().collect();
        for i in &acked {
            assert!(
                present.contains(format!("f{i}").as_str()),
                "{durability}: acknowledged f{i} lost after kill -9"
            );
        }
    }
}

#[test]
fn bad_configuration_fails_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("meta.toml");
    let run = |cfg_text: &str| {
        std::fs::write(&cfg, cfg_text).unwrap();
        let out = Command::new(BIN)
            .args(["meta", "--config"])
            .arg(&cfg)
            .args(["--data-dir"])
            .arg(tmp.path().join("d"))
            .args(["--listen", &free_addr().to_string()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{cfg_text:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run("listn = 1").contains("unknown field"));
    assert!(run("[namespace]\nchunk_size = 1000").contains("power of two"));
    assert!(
        run("[kv]\ndurability = \"periodic\"\nfsync_interval_ms = 0").contains("fsync_interval_ms")
    );
    if !cfg!(feature = "fdb") {
        assert!(run("[kv]\nengine = \"fdb\"").contains("without FoundationDB support"));
    }
    let out = Command::new(BIN)
        .args(["meta", "--config", "/nonexistent/r3fs.toml"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read config file /nonexistent/r3fs.toml")
    );
}
