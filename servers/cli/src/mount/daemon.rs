//! Background processes: the `r3fs` binary re-executed as a detached child
//! (new session, stdin closed, stderr to a log file) that reports readiness
//! with one line on its stdout pipe; and checks on pids it left behind.
//!
//! Readiness: the parent reads one line from the child's stdout. A line means
//! ready; end of file means the child exited (or closed stdout) before it was
//! ready, and the parent shows the tail of its log. After reporting, the
//! child points its stdout at /dev/null, so it never writes into a pipe
//! nobody reads.

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Lines of a child's log shown when it fails to start.
const LOG_TAIL_LINES: usize = 30;
/// How long a child that missed its readiness deadline gets to stop on
/// SIGTERM before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Runs `r3fs <args> --daemon-child` detached, waits up to `timeout` for its
/// ready line and returns it. `what` names the child in errors.
pub fn spawn_and_wait(
    what: &str,
    args: &[OsString],
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<String> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("create log directory {}", parent.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open log file {}", log.display()))?;
    let start_offset = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("find the r3fs executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("start the {what}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(read.map(|_| line));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if !line.is_empty() => Ok(line.trim_end().to_string()),
        Ok(_) => {
            let status = child.wait().context("wait for the child")?;
            bail!(
                "the {what} exited before it was ready ({status}); its log {}:\n{}",
                log.display(),
                log_tail(log, start_offset)
            )
        }
        Err(_) => {
            // A child stuck in mount(2) or INIT may ignore SIGTERM: wait a
            // bounded time, then SIGKILL, so this command never hangs.
            let _ = signal(child.id() as i32, Signal::SIGTERM);
            let deadline = Instant::now() + STOP_WAIT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
            bail!(
                "the {what} was not ready after {timeout:?} and was stopped; its log {}:\n{}",
                log.display(),
                log_tail(log, start_offset)
            )
        }
    }
}

/// Reports readiness: `message` on stdout (the parent's pipe, or the
/// terminal in the foreground); a daemon child then detaches its stdout.
pub fn notify_ready(message: &str, daemon_child: bool) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{message}");
    let _ = out.flush();
    if daemon_child {
        match std::fs::File::open("/dev/null") {
            Ok(null) => {
                if let Err(e) = nix::unistd::dup2_stdout(null) {
                    tracing::warn!(error = %e, "detach stdout");
                }
            }
            Err(e) => tracing::warn!(error = %e, "open /dev/null"),
        }
    }
}

/// The last lines of `log` written after `offset`.
fn log_tail(log: &Path, offset: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let start = (offset as usize).min(text.len());
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[from..].join("\n")
}

/// Whether `pid` runs (a zombie counts as exited).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Whether `pid`'s command line contains `needle` (guards against signalling
/// a recycled pid).
pub fn cmdline_contains(pid: i32, needle: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
    cmdline.contains(needle)
}

pub fn signal(pid: i32, sig: Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(pid), sig)
        .with_context(|| format!("send {sig} to pid {pid}"))
}

/// Waits up to `timeout` for `pid` to exit; returns whether it did.
pub fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_named() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(!alive(i32::MAX));
        assert!(!cmdline_contains(me, "no-such-argument-anywhere"));
    }
}
