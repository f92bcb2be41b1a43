//! The mount registry, `DATA_DIR/mounts.toml`: which r3fs mounts run, with
//! their daemon pid and cluster, so `r3fs umount` and `r3fs status` find
//! them. A daemon adds itself once its mount is usable and removes itself
//! when it exits; `r3fs umount` removes what a killed daemon left behind.
//! Every change happens under an exclusive flock of `DATA_DIR/mounts.lock`.
//!
//! ```toml
//! [[mount]]
//! mountpoint = "/mnt/r3fs"
//! pid = 4242
//! cluster = "/var/lib/r3fs/local/cluster.toml"
//! local = true          # uses the local cluster of this data directory
//! log = "/var/lib/r3fs/local/logs/mount-mnt-r3fs.log"
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::daemon;
use crate::cluster_file::write_atomically;
use crate::local_cluster::DataDir;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    pub pid: i32,
    /// The cluster file the mount was started with.
    pub cluster: PathBuf,
    /// Whether it uses the local cluster of this data directory.
    pub local: bool,
    /// The daemon's log file (None: a foreground daemon logs to its stderr).
    pub log: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registry {
    #[serde(default, rename = "mount")]
    mounts: Vec<MountRecord>,
}

/// Runs `f` on the registry under its lock and saves what it leaves.
fn update<T>(dir: &DataDir, f: impl FnOnce(&mut Vec<MountRecord>) -> T) -> anyhow::Result<T> {
    dir.create()?;
    let _lock = lock(dir, FlockArg::LockExclusive)?;
    let mut mounts = load(&dir.mounts_file())?;
    let out = f(&mut mounts);
    let text = toml::to_string(&Registry { mounts }).context("encode the mount registry")?;
    write_atomically(&dir.mounts_file(), &text)?;
    Ok(out)
}

fn lock(dir: &DataDir, arg: FlockArg) -> anyhow::Result<Flock<File>> {
    let path = dir.mounts_lock();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    Flock::lock(file, arg)
        .map_err(|(_, e)| e)
        .with_context(|| format!("lock {}", path.display()))
}

fn load(path: &Path) -> anyhow::Result<Vec<MountRecord>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let r: Registry = toml::from_str(&text)
                .with_context(|| format!("parse the mount registry {}", path.display()))?;
            Ok(r.mounts)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Every registered mount, live or not.
pub fn read(dir: &DataDir) -> anyhow::Result<Vec<MountRecord>> {
    if !dir.mounts_file().exists() {
        return Ok(Vec::new());
    }
    let _lock = lock(dir, FlockArg::LockShared)?;
    load(&dir.mounts_file())
}

/// Registers `record`, replacing any record of the same mountpoint.
pub fn add(dir: &DataDir, record: MountRecord) -> anyhow::Result<()> {
    update(dir, |mounts| {
        mounts.retain(|m| m.mountpoint != record.mountpoint);
        mounts.push(record);
    })
}

/// Removes the record of `mountpoint` (only if its pid is `pid`, when given).
pub fn remove(dir: &DataDir, mountpoint: &Path, pid: Option<i32>) -> anyhow::Result<()> {
    update(dir, |mounts| {
        mounts.retain(|m| !(m.mountpoint == mountpoint && pid.is_none_or(|p| p == m.pid)));
    })
}

/// Registered mounts of the local cluster whose daemon still runs.
pub fn live_local_mounts(dir: &DataDir) -> anyhow::Result<Vec<MountRecord>> {
    Ok(read(dir)?
        .into_iter()
        .filter(|m| m.local && daemon::alive(m.pid))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose pid runs nowhere unless it is our own.
    fn record(mountpoint: &str, pid: i32) -> MountRecord {
        let me = std::process::id() as i32;
        MountRecord {
            mountpoint: mountpoint.into(),
            pid: if pid == me { me } else { i32::MAX - pid },
            cluster: "/c.toml".into(),
            local: true,
            log: None,
        }
    }

    #[test]
    fn records_are_added_replaced_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path()).unwrap();
        assert!(read(&dir).unwrap().is_empty());
        add(&dir, record("/a", 1)).unwrap();
        add(&dir, record("/b", 2)).unwrap();
        add(&dir, record("/a", 3)).unwrap();
        assert_eq!(read(&dir).unwrap(), vec![record("/b", 2), record("/a", 3)]);
        remove(&dir, Path::new("/a"), Some(1)).unwrap();
        assert_eq!(read(&dir).unwrap().len(), 2, "another pid's record stays");
        remove(&dir, Path::new("/a"), None).unwrap();
        assert_eq!(read(&dir).unwrap(), vec![record("/b", 2)]);
        let me = std::process::id() as i32;
        add(&dir, record("/live", me)).unwrap();
        let live = live_local_mounts(&dir).unwrap();
        assert_eq!(live, vec![record("/live", me)]);
    }
}
