//! The kernel side of a mount: opening `/dev/fuse`, `mount(2)`, unmounting,
//! and the notifications the daemon may send the kernel unasked.
//!
//! Owns the session fd. Knows nothing about requests; `channel` reads them.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::FuseError;

/// The file-system type in /proc/mounts is `fuse.<SUBTYPE>`.
pub const SUBTYPE: &str = "r3fs";
/// `FUSE_NOTIFY_INVAL_INODE` (include/uapi/linux/fuse.h).
const NOTIFY_INVAL_INODE: i32 = 2;
/// `FUSE_NOTIFY_INVAL_ENTRY`.
const NOTIFY_INVAL_ENTRY: i32 = 3;

/// A mounted FUSE file system: the session fd and where it is mounted.
/// Dropping it does not unmount (an upgrade hands the fd on); call
/// [`KernelSession::unmount`].
pub struct KernelSession {
    fd: File,
    mountpoint: PathBuf,
}

/// Mount options we pass to the kernel.
pub struct MountOptions<'a> {
    pub fsname: &'a str,
    pub allow_other: bool,
}

impl KernelSession {
    /// Opens `/dev/fuse` and mounts it on `mountpoint`. The kernel then
    /// queues INIT; nothing works until a channel answers it.
    pub fn mount(
        mountpoint: &Path,
        options: &MountOptions<'_>,
    ) -> Result<KernelSession, FuseError> {
        let meta = std::fs::metadata(mountpoint).map_err(|e| FuseError::Mountpoint {
            path: mountpoint.to_path_buf(),
            reason: e.to_string(),
        })?;
        if !meta.is_dir() {
            return Err(FuseError::Mountpoint {
                path: mountpoint.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| FuseError::Device(e.to_string()))?;
        let mut data = format!(
            "fd={},rootmode=40000,user_id={},group_id={}",
            fd.as_raw_fd(),
            nix::unistd::getuid(),
            nix::unistd::getgid()
        );
        if options.allow_other {
            data.push_str(",allow_other");
        }
        let fstype = format!("fuse.{SUBTYPE}");
        nix::mount::mount(
            Some(options.fsname),
            mountpoint,
            Some(fstype.as_str()),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|e| FuseError::Mount {
            path: mountpoint.to_path_buf(),
            errno: e as i32,
        })?;
        Ok(KernelSession {
            fd,
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Another handle on the same session (a plain `dup`: it shares the
    /// kernel's processing list with the original).
    pub fn try_clone_fd(&self) -> std::io::Result<File> {
        self.fd.try_clone()
    }

    /// A new kernel channel on this session (`FUSE_DEV_IOC_CLONE`): its own
    /// fd with its own processing list, sharing the session's input queue.
    /// Opened non-blocking, for channels that spin before they wait.
    pub fn clone_channel(&self) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        nix::ioctl_read!(fuse_dev_ioc_clone, 229, 0, u32);
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/fuse")?;
        let mut session = self.fd.as_raw_fd() as u32;
        // SAFETY: the ioctl reads one u32 (the session fd) from the pointer.
        unsafe { fuse_dev_ioc_clone(fd.as_raw_fd(), &mut session) }
            .map_err(std::io::Error::from)?;
        Ok(fd)
    }

    /// Detaches the mount: new opens fail at once, files already open keep
    /// working until closed, then the kernel ends the session and every
    /// channel read returns ENODEV.
    pub fn unmount_lazy(&self) -> Result<(), FuseError> {
        unmount(&self.mountpoint, MntFlags::MNT_DETACH)
    }

    /// Asks the kernel to forget cached attributes of `inode` (and cached
    /// pages when `pages`), so the next access asks the daemon again.
    /// Returns ENOENT if the kernel does not know the inode (harmless).
    pub fn notify_inval_inode(&self, inode: u64, pages: bool) -> std::io::Result<()> {
        let offset: i64 = if pages { 0 } else { -1 };
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&inode.to_ne_bytes());
        body.extend_from_slice(&offset.to_ne_bytes());
        body.extend_from_slice(&0i64.to_ne_bytes());
        self.notify(NOTIFY_INVAL_INODE, &body)
    }

    /// Asks the kernel to drop its cached entry `name` in directory `parent`.
    pub fn notify_inval_entry(&self, parent: u64, name: &[u8]) -> std::io::Result<()> {
        let mut body = Vec::with_capacity(16 + name.len() + 1);
        body.extend_from_slice(&parent.to_ne_bytes());
        body.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend_from_slice(name);
        body.push(0);
        self.notify(NOTIFY_INVAL_ENTRY, &body)
    }

    fn notify(&self, code: i32, body: &[u8]) -> std::io::Result<()> {
        let len = 16 + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&code.to_ne_bytes());
        msg.extend_from_slice(&0u64.to_ne_bytes());
        msg.extend_from_slice(body);
        let n = nix::unistd::write(&self.fd, &msg).map_err(std::io::Error::from)?;
        debug_assert_eq!(n, len, "a /dev/fuse write is all or nothing");
        Ok(())
    }
}

/// Sets the kernel readahead window of the mount at `mountpoint` (its
/// backing-device info is named after the mount's device number). Call
/// after INIT: stat of the mountpoint is answered by the daemon.
pub fn set_readahead(mountpoint: &Path, kib: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    std::fs::write(&path, kib.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// Unmounts `path` (any FUSE mount, ours or a stale one).
pub fn unmount(path: &Path, flags: MntFlags) -> Result<(), FuseError> {
    nix::mount::umount2(path, flags).map_err(|e| FuseError::Unmount {
        path: path.to_path_buf(),
        errno: e as i32,
    })
}
