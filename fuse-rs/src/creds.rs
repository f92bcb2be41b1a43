//! Who is calling: the kernel gives uid, gid and pid per request; meta also
//! needs the supplementary groups, which we read from `/proc/<pid>/status`
//! and cache briefly.
//!
//! # Limits
//! At most [`CACHED_CALLERS_MAX`] callers cached, each for [`CACHE_TTL`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r3fs_wire::meta::User;

/// Callers whose groups are cached.
pub const CACHED_CALLERS_MAX: usize = 4096;
/// How long a caller's groups are trusted (setgroups is rare; a pid is reused
/// only after it exits).
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// Supplementary groups kept per caller (Linux `NGROUPS_MAX`).
pub const GROUPS_MAX: usize = 65536;

/// A caller as the kernel names it: pid, uid, gid.
type Caller = (i32, u32, u32);

#[derive(Default)]
pub struct Credentials {
    /// Groups of each recent caller, and when they were read.
    cache: Mutex<HashMap<Caller, (Instant, Vec<u32>)>>,
}

impl Credentials {
    /// The caller of a request as meta sees it.
    pub fn user(&self, uid: u32, gid: u32, pid: i32) -> User {
        if uid == 0 {
            // root passes every permission check; its groups do not matter.
            return User {
                uid,
                gid,
                groups: Vec::new(),
            };
        }
        let key = (pid, uid, gid);
        let now = Instant::now();
        if let Some((at, groups)) = self.cache.lock().get(&key) {
            if now.duration_since(*at) < CACHE_TTL {
                return User {
                    uid,
                    gid,
                    groups: groups.clone(),
                };
            }
        }
        let groups = read_groups(pid).unwrap_or_default();
        let mut cache = self.cache.lock();
        if cache.len() >= CACHED_CALLERS_MAX {
            cache.retain(|_, (at, _)| now.duration_since(*at) < CACHE_TTL);
            if cache.len() >= CACHED_CALLERS_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (now, groups.clone()));
        User { uid, gid, groups }
    }
}

/// The `Groups:` line of `/proc/<pid>/status`; None when the process is
/// gone (a request from a dying process), which means "no extra groups".
fn read_groups(pid: i32) -> Option<Vec<u32>> {
    if pid <= 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find(|l| l.starts_with("Groups:"))?;
    Some(
        line["Groups:".len()..]
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .take(GROUPS_MAX)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line_is_parsed_and_garbage_ignored() {
        let status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 x 1000 \nNgid:\t0\n";
        assert_eq!(parse_groups(status), Some(vec![4, 24, 1000]));
        assert_eq!(parse_groups("Groups:\n"), Some(vec![]));
        assert_eq!(parse_groups("Name: x\n"), None);
    }

    #[test]
    fn own_process_groups_are_read() {
        let me = std::process::id() as i32;
        let groups = read_groups(me).expect("our own status is readable");
        let expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(groups, expected);
        assert_eq!(read_groups(-1), None);
    }
}
