//! [`MetaClient`]: calls to the meta service with server selection and failover.
//!
//! Meta servers are stateless, so any server can take any call. The client
//! spreads calls round-robin over servers it believes healthy. A server that
//! cannot be reached, or answers `Unavailable`, is skipped for
//! [`FAILED_SERVER_COOLDOWN`] and the call moves to the next one. Read-only
//! calls are also retried after timeouts (they are idempotent); calls that
//! change the namespace are moved to another server only when the request
//! certainly did not run (connection refused, server unavailable), so a create
//! is never run twice by a retry.
//!
//! # Limits
//! At most [`ATTEMPTS_MAX`] attempts per call (or one per server, if more),
//! with backoff between rounds over all servers; path walks
//! follow at most [`SYMLINK_HOPS_MAX`] symlinks (Linux's limit, then ELOOP).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r3fs_net::{CallOptions, ClientConfig, RetryPolicy, RpcClient, RpcError};
use r3fs_wire::meta::*;
use r3fs_wire::{ErrorCode, Method};

/// How long a server that failed is skipped.
pub const FAILED_SERVER_COOLDOWN: Duration = Duration::from_secs(2);
/// Attempts of one call (more when there are more servers: each gets one).
pub const ATTEMPTS_MAX: usize = 6;
/// Pause after every server failed once, doubled each round up to [`BACKOFF_MAX`].
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(20);
pub const BACKOFF_MAX: Duration = Duration::from_millis(500);
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

#[derive(Debug, thiserror::Error)]
pub enum MetaClientError {
    /// The meta service refused the call with a POSIX errno.
    #[error("{method}: {message}")]
    Errno {
        method: &'static str,
        errno: i32,
        message: String,
    },
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("{method}: no meta server reachable (tried {tried:?}); last error: {last}")]
    NoServer {
        method: &'static str,
        tried: Vec<SocketAddr>,
        last: Box<RpcError>,
    },
    #[error("no meta servers configured")]
    NoServersConfigured,
}

impl MetaClientError {
    /// The errno to hand a POSIX caller: the service's own, or EIO for
    /// transport failures (ETIMEDOUT for timeouts).
    pub fn errno(&self) -> i32 {
        match self {
            MetaClientError::Errno { errno, .. } => *errno,
            MetaClientError::Rpc(RpcError::Timeout { .. }) => libc::ETIMEDOUT,
            _ => libc::EIO,
        }
    }
}

/// A client of the meta service. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct MetaClient {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    rpc: RpcClient,
    config: MetaClientConfig,
    next: AtomicUsize,
    failed: Mutex<HashMap<SocketAddr, Instant>>,
    /// Identifies this client's open sessions to meta.
    client_id: u64,
}

impl MetaClient {
    pub fn new(config: MetaClientConfig) -> Result<MetaClient, MetaClientError> {
        if config.servers.is_empty() {
            return Err(MetaClientError::NoServersConfigured);
        }
        let rpc = RpcClient::new(ClientConfig {
            connections_per_addr: config.connections_per_server.max(1),
            ..ClientConfig::default()
        });
        Ok(MetaClient {
            inner: std::sync::Arc::new(Inner {
                rpc,
                config,
                next: AtomicUsize::new(0),
                failed: Mutex::new(HashMap::new()),
                client_id: rand::random(),
            }),
        })
    }

    pub fn client_id(&self) -> u64 {
        self.inner.client_id
    }

    /// Calls `M` on some healthy meta server. `idempotent` calls are also
    /// retried after timeouts and lost connections. Each attempt goes to the
    /// next server; after every server has been tried once, the client backs
    /// off before the next round, so a briefly restarting server is waited for.
    pub async fn call<M: Method>(
        &self,
        req: &M::Request,
        idempotent: bool,
    ) -> Result<M::Response, MetaClientError> {
        let servers = &self.inner.config.servers;
        let mut tried = Vec::new();
        let mut last = None;
        let mut backoff = BACKOFF_INITIAL;
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        for attempt in 0..ATTEMPTS_MAX.max(servers.len()) {
            if attempt > 0 && attempt % servers.len() == 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            let addr = self.pick(start + attempt, attempt + 1 >= servers.len());
            tried.push(addr);
            let opts = CallOptions {
                timeout: self.inner.config.call_timeout,
                retry: RetryPolicy::none(),
                idempotent,
            };
            match self.inner.rpc.call::<M>(addr, req, opts).await {
                Ok(resp) => {
                    self.inner.failed.lock().remove(&addr);
                    return Ok(resp);
                }
                Err(RpcError::Remote {
                    code: ErrorCode::Errno(errno),
                    message,
                    ..
                }) => {
                    return Err(MetaClientError::Errno {
                        method: M::NAME,
                        errno,
                        message,
                    });
                }
                Err(e) if moves_to_next_server(&e, idempotent) => {
                    tracing::warn!(server = %addr, method = M::NAME, error = %e, "meta server failed; trying another");
                    self.inner.failed.lock().insert(addr, Instant::now());
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(MetaClientError::NoServer {
            method: M::NAME,
            tried,
            last: Box::new(last.expect("at least one server was tried")),
        })
    }

    /// The server at round-robin position `pos`, skipping servers in their
    /// cool-down unless `any` (the last attempt tries whatever comes next).
    fn pick(&self, pos: usize, any: bool) -> SocketAddr {
        let servers = &self.inner.config.servers;
        let mut failed = self.inner.failed.lock();
        failed.retain(|_, at| at.elapsed() < FAILED_SERVER_COOLDOWN);
        (0..servers.len())
            .map(|i| servers[(pos + i) % servers.len()])
            .find(|addr| any || !failed.contains_key(addr))
            .unwrap_or(servers[pos % servers.len()])
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

fn moves_to_next_server(e: &RpcError, idempotent: bool) -> bool {
    match e {
        RpcError::Connect { .. } => true,
        RpcError::Remote { code, .. } => code.is_retryable(),
        RpcError::Timeout { .. } | RpcError::ConnectionLost { .. } => idempotent,
        _ => false,
    }
}
