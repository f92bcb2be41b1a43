//! What the storage test binaries share: a small tmpfs to fill up, and a
//! way to damage a byte on disk.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

/// A tmpfs mounted on a temporary directory; unmounted on drop, even when
/// the test panics (lazily if a file on it is still open).
pub struct TmpfsGuard {
    pub dir: tempfile::TempDir,
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(self.dir.path())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("cannot unmount the tmpfs at {}", self.dir.path().display());
        }
    }
}

/// Mounts a tmpfs of `size` (mount(8) syntax, e.g. "16m"); an error when
/// this process may not mount (the caller skips its test then).
pub fn mount_tmpfs(size: &str) -> Result<TmpfsGuard, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir.path())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("mount exited with {status}"));
    }
    Ok(TmpfsGuard { dir })
}

/// Fills the file system of `dir` with a file `dir/filler` until `left`
/// bytes stay free; returns the filler's path.
pub fn fill_leaving(dir: &Path, left: u64) -> std::path::PathBuf {
    let stat = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    let free = stat.blocks_available() * stat.fragment_size();
    let path = dir.join("filler");
    let file = std::fs::File::create(&path).expect("create filler");
    let len = free.saturating_sub(left) as i64;
    nix::fcntl::posix_fallocate(&file, 0, len).expect("fallocate filler");
    path
}

/// Flips the bits `mask` of the byte at `pos` of the file at `path` (a
/// block damaged on disk).
pub fn flip_bits(path: &Path, pos: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, pos).unwrap();
    byte[0] ^= mask;
    file.write_all_at(&byte, pos).unwrap();
}
