//! A running `r3fs` server process for tests: started with its stderr in a
//! log file, ready once its port accepts connections, and killed and reaped
//! by pid when dropped, so a failing test leaves nothing behind; a whole
//! cluster of them in [`cluster`]; small helpers the tests share.

#![allow(dead_code)] // each test file uses part of it

pub mod cluster;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_r3fs");
const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Runs `r3fs <args> --listen <free port>`, logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> ServerProcess {
        ServerProcess::start_at(args, log, free_addr())
    }

    /// Runs `r3fs <args> --listen <addr>`, logging to `log`: a server
    /// restarted where its clients expect it.
    pub fn start_at(args: &[&str], log: &Path, addr: SocketAddr) -> ServerProcess {
        let child = Command::new(BIN)
            .args(args)
            .args(["--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn r3fs");
        let mut p = ServerProcess {
            child,
            addr,
            log: log.to_path_buf(),
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("r3fs exited early ({status}): {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "r3fs not ready after {READY_TIMEOUT:?}: {}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal our own child");
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to exit and returns whether it exited 0.
    pub fn wait(&mut self) -> bool {
        self.child.wait().expect("wait for r3fs").success()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGKILL promptly.
        let _ = self.child.kill();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.wait();
    }
}

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Runs `r3fs <args>` to completion.
pub fn r3fs(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run r3fs")
}

/// Runs `r3fs admin --mgmtd <mgmtd> <cmd> --json`, which must succeed.
#[track_caller]
pub fn admin_json(mgmtd: &str, cmd: &str) -> Value {
    let out = r3fs(&["admin", "--mgmtd", mgmtd, cmd, "--json"]);
    assert!(out.status.success(), "admin {cmd}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until `f` holds, trying every `poll` for at most `limit`; returns
/// how long it took.
#[track_caller]
pub fn eventually(
    what: &str,
    limit: Duration,
    poll: Duration,
    mut f: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        std::thread::sleep(poll);
    }
    start.elapsed()
}
