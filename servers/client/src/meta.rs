//! [`MetaClient`]: calls to the meta service with server selection and failover.
//!
//! Meta servers are stateless, so any server can take any call: the client
//! spreads calls round-robin ([`crate::failover`]). Read-only calls are also
//! retried after timeouts (they are idempotent); calls that change the
//! namespace move to another server only when the request certainly did not
//! run, so a create is never run twice by a retry.
//!
//! # Limits
//! Path walks follow at most [`SYMLINK_HOPS_MAX`] symlinks (Linux's limit,
//! then ELOOP).

use std::net::SocketAddr;
use std::time::Duration;

use r3fs_wire::meta::*;
use r3fs_wire::Method;

use crate::failover::{ClientError, Selection, ServerSet};
/// Symlinks followed in one path walk (Linux `MAXSYMLINKS`).
pub const SYMLINK_HOPS_MAX: usize = 40;

#[derive(Debug, Clone)]
pub struct MetaClientConfig {
    pub servers: Vec<SocketAddr>,
    /// Deadline of one attempt of one call.
    pub call_timeout: Duration,
    /// Connections kept to each server.
    pub connections_per_server: usize,
}

impl MetaClientConfig {
    pub fn new(servers: Vec<SocketAddr>) -> MetaClientConfig {
        MetaClientConfig {
            servers,
            call_timeout: Duration::from_secs(10),
            connections_per_server: 2,
        }
    }
}

/// Errors of meta calls.
pub type MetaClientError = ClientError;

/// A client of the meta service. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct MetaClient {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    servers: ServerSet,
    /// Identifies this client's open sessions to meta.
    client_id: u64,
}

impl MetaClient {
    pub fn new(config: MetaClientConfig) -> Result<MetaClient, MetaClientError> {
        let servers = ServerSet::new(
            config.servers,
            Selection::RoundRobin,
            config.call_timeout,
            config.connections_per_server,
        )?;
        Ok(MetaClient {
            inner: std::sync::Arc::new(Inner {
                servers,
                client_id: rand::random(),
            }),
        })
    }

    pub fn client_id(&self) -> u64 {
        self.inner.client_id
    }

    /// Calls `M` on some meta server. `idempotent` calls are also retried
    /// after timeouts and lost connections.
    pub async fn call<M: Method>(
        &self,
        req: &M::Request,
        idempotent: bool,
    ) -> Result<M::Response, MetaClientError> {
        self.inner.servers.call::<M>(req, idempotent).await
    }

    pub async fn statfs(&self) -> Result<StatFsResponse, MetaClientError> {
        self.call::<StatFs>(&StatFsRequest {}, true).await
    }

    pub async fn lookup(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
    ) -> Result<Attr, MetaClientError> {
        let req = LookupRequest {
            user: user.clone(),
            parent,
            name: name.to_vec(),
        };
        self.call::<Lookup>(&req, true).await
    }

    pub async fn getattr(&self, inode: InodeId) -> Result<Attr, MetaClientError> {
        self.call::<GetAttr>(&GetAttrRequest { inode }, true).await
    }

    pub async fn create(&self, req: CreateRequest) -> Result<OpenResponse, MetaClientError> {
        self.call::<Create>(
            &CreateRequest {
                client: self.client_id(),
                ..req
            },
            false,
        )
        .await
    }

    pub async fn mkdir(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        perm: u32,
    ) -> Result<Attr, MetaClientError> {
        let req = MkdirRequest {
            user: user.clone(),
            parent,
            name: name.to_vec(),
            perm,
        };
        self.call::<Mkdir>(&req, false).await
    }

    pub async fn mknod(&self, req: MknodRequest) -> Result<Attr, MetaClientError> {
        self.call::<Mknod>(&req, false).await
    }

    pub async fn symlink(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
        target: &[u8],
    ) -> Result<Attr, MetaClientError> {
        let req = SymlinkRequest {
            user: user.clone(),
            parent,
            name: name.to_vec(),
            target: target.to_vec(),
        };
        self.call::<Symlink>(&req, false).await
    }

    pub async fn readlink(&self, inode: InodeId) -> Result<Vec<u8>, MetaClientError> {
        self.call::<ReadLink>(&ReadLinkRequest { inode }, true)
            .await
    }

    pub async fn link(
        &self,
        user: &User,
        inode: InodeId,
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<Attr, MetaClientError> {
        let req = LinkRequest {
            user: user.clone(),
            inode,
            new_parent,
            new_name: new_name.to_vec(),
        };
        self.call::<Link>(&req, false).await
    }

    pub async fn unlink(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
    ) -> Result<(), MetaClientError> {
        let req = UnlinkRequest {
            user: user.clone(),
            parent,
            name: name.to_vec(),
        };
        self.call::<Unlink>(&req, false).await
    }

    pub async fn rmdir(
        &self,
        user: &User,
        parent: InodeId,
        name: &[u8],
    ) -> Result<(), MetaClientError> {
        let req = UnlinkRequest {
            user: user.clone(),
            parent,
            name: name.to_vec(),
        };
        self.call::<Rmdir>(&req, false).await
    }

    pub async fn rename(&self, req: RenameRequest) -> Result<(), MetaClientError> {
        self.call::<Rename>(&req, false).await
    }

    pub async fn readdir(&self, req: ReadDirRequest) -> Result<ReadDirResponse, MetaClientError> {
        self.call::<ReadDir>(&req, true).await
    }

    /// Every entry of a directory, page by page.
    pub async fn readdir_all(
        &self,
        user: &User,
        inode: InodeId,
        plus: bool,
    ) -> Result<Vec<DirEntry>, MetaClientError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let req = ReadDirRequest {
                user: user.clone(),
                inode,
                after,
                limit: READDIR_ENTRIES_MAX,
                plus,
            };
            let page = self.readdir(req).await?;
            after = page.entries.last().map(|e| e.name.clone());
            all.extend(page.entries);
            if !page.more || after.is_none() {
                return Ok(all);
            }
        }
    }

    pub async fn setattr(&self, req: SetAttrRequest) -> Result<Attr, MetaClientError> {
        self.call::<SetAttr>(&req, false).await
    }

    pub async fn open(
        &self,
        user: &User,
        inode: InodeId,
        flags: OpenFlags,
    ) -> Result<OpenResponse, MetaClientError> {
        let req = OpenRequest {
            user: user.clone(),
            inode,
            flags,
            client: self.client_id(),
        };
        self.call::<Open>(&req, false).await
    }

    pub async fn close(&self, req: CloseRequest) -> Result<Attr, MetaClientError> {
        self.call::<Close>(&req, false).await
    }

    pub async fn sync(&self, req: SyncRequest) -> Result<Attr, MetaClientError> {
        self.call::<Sync>(&req, true).await
    }

    pub async fn access(
        &self,
        user: &User,
        inode: InodeId,
        mask: u32,
    ) -> Result<(), MetaClientError> {
        self.call::<Access>(
            &AccessRequest {
                user: user.clone(),
                inode,
                mask,
            },
            true,
        )
        .await
    }

    pub async fn getxattr(
        &self,
        user: &User,
        inode: InodeId,
        name: &[u8],
    ) -> Result<Vec<u8>, MetaClientError> {
        let req = GetXattrRequest {
            user: user.clone(),
            inode,
            name: name.to_vec(),
        };
        self.call::<GetXattr>(&req, true).await
    }

    pub async fn setxattr(&self, req: SetXattrRequest) -> Result<(), MetaClientError> {
        // A retried XATTR_CREATE that already ran would fail with EEXIST.
        let idempotent = !req.flags.create;
        self.call::<SetXattr>(&req, idempotent).await
    }

    pub async fn listxattr(
        &self,
        user: &User,
        inode: InodeId,
    ) -> Result<Vec<Vec<u8>>, MetaClientError> {
        self.call::<ListXattr>(
            &ListXattrRequest {
                user: user.clone(),
                inode,
            },
            true,
        )
        .await
    }

    pub async fn removexattr(
        &self,
        user: &User,
        inode: InodeId,
        name: &[u8],
    ) -> Result<(), MetaClientError> {
        let req = RemoveXattrRequest {
            user: user.clone(),
            inode,
            name: name.to_vec(),
        };
        self.call::<RemoveXattr>(&req, false).await
    }

    /// Removed files whose chunks storage must still delete.
    pub async fn gc_list(&self, limit: u32) -> Result<Vec<GcEntry>, MetaClientError> {
        self.call::<GcList>(&GcListRequest { limit }, true).await
    }

    /// Tells meta these files' chunks are deleted.
    pub async fn gc_done(&self, inodes: Vec<InodeId>) -> Result<(), MetaClientError> {
        self.call::<GcDone>(&GcDoneRequest { inodes }, true).await
    }

    /// `F_SETLK` / `flock(LOCK_NB)`: a conflict fails with EAGAIN; a
    /// blocking caller retries. `req.client` is normally [`Self::client_id`].
    /// Retried after timeouts: applying one owner's lock twice is the same as
    /// once.
    pub async fn set_lock(&self, req: SetLockRequest) -> Result<(), MetaClientError> {
        self.call::<SetLock>(&req, true).await
    }

    /// `F_GETLK`: the first lock of another owner that conflicts, or None.
    pub async fn get_lock(&self, req: GetLockRequest) -> Result<Option<LockInfo>, MetaClientError> {
        self.call::<GetLock>(&req, true).await
    }

    /// Drops every lock of one kind one owner holds on one inode (POSIX
    /// locks on flush, flock locks on the last release of a file handle).
    pub async fn release_locks(&self, req: ReleaseLocksRequest) -> Result<(), MetaClientError> {
        self.call::<ReleaseLocks>(&req, true).await
    }

    /// Extends `client`'s lock lease (call every [`LOCK_LEASE_RENEW_INTERVAL`]
    /// while holding locks). A changed epoch means the lease had expired and
    /// every lock of the client is lost.
    pub async fn renew_lock_lease(&self, client: u64) -> Result<LockLease, MetaClientError> {
        self.call::<RenewLockLease>(&RenewLockLeaseRequest { client }, true)
            .await
    }

    /// Drops every lock of `client` and its lease (clean unmount).
    pub async fn drop_client_locks(&self, client: u64) -> Result<(), MetaClientError> {
        self.call::<DropClientLocks>(&DropClientLocksRequest { client }, true)
            .await
    }

    /// Walks an absolute `path` from the root, following symlinks in every
    /// component and, if `follow`, in the last one.
    pub async fn resolve(
        &self,
        user: &User,
        path: &str,
        follow: bool,
    ) -> Result<Attr, MetaClientError> {
        let mut hops = 0;
        self.walk(user, ROOT_INODE, path.as_bytes(), follow, &mut hops)
            .await
    }

    /// The directory that would hold `path`'s last component, and that name.
    pub async fn resolve_parent(
        &self,
        user: &User,
        path: &str,
    ) -> Result<(Attr, Vec<u8>), MetaClientError> {
        let trimmed = path.trim_end_matches('/');
        let (dir, name) = match trimmed.rsplit_once('/') {
            Some((dir, name)) => (if dir.is_empty() { "/" } else { dir }, name),
            None => ("/", trimmed),
        };
        if name.is_empty() {
            return Err(MetaClientError::Errno {
                method: "resolve",
                errno: libc::EINVAL,
                message: format!("path {path:?} has no last component"),
            });
        }
        let parent = self.resolve(user, dir, true).await?;
        Ok((parent, name.as_bytes().to_vec()))
    }

    async fn walk(
        &self,
        user: &User,
        start: InodeId,
        path: &[u8],
        follow: bool,
        hops: &mut usize,
    ) -> Result<Attr, MetaClientError> {
        let mut dir = if path.starts_with(b"/") {
            ROOT_INODE
        } else {
            start
        };
        let mut attr = self.getattr(dir).await?;
        let parts: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|p| !p.is_empty())
            .collect();
        for (i, part) in parts.iter().enumerate() {
            let next = self.lookup(user, dir, part).await?;
            let last = i + 1 == parts.len();
            attr = if next.file_type == FileType::Symlink && (follow || !last) {
                *hops += 1;
                if *hops > SYMLINK_HOPS_MAX {
                    return Err(MetaClientError::Errno {
                        method: "resolve",
                        errno: libc::ELOOP,
                        message: format!(
                            "more than {SYMLINK_HOPS_MAX} symlinks in {:?}",
                            String::from_utf8_lossy(path)
                        ),
                    });
                }
                let target = self.readlink(next.inode).await?;
                Box::pin(self.walk(user, dir, &target, true, hops)).await?
            } else {
                next
            };
            dir = attr.inode;
        }
        Ok(attr)
    }
}
