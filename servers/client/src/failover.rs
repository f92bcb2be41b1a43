//! Calls to a service replicated over several servers: pick a server, move to
//! the next when one fails, back off between rounds, and report errors the
//! same way for every service.
//!
//! A call moves to another server only when it certainly did not run on the
//! one tried (connection refused, the server answered Unavailable — not
//! primary, shutting down, overloaded), or when it is idempotent (then also
//! after timeouts and lost connections). POSIX errnos from the service end the
//! call at once.
//!
//! # Limits
//! At most [`ATTEMPTS_MAX`] attempts per call (one per server if there are
//! more servers), with [`BACKOFF_INITIAL`]..[`BACKOFF_MAX`] between rounds; a
//! failed server is skipped for [`FAILED_SERVER_COOLDOWN`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r3fs_net::{CallOptions, ClientConfig, RetryPolicy, RpcClient, RpcError};
use r3fs_wire::{ErrorCode, Method};

/// How long a server that failed is skipped.
pub const FAILED_SERVER_COOLDOWN: Duration = Duration::from_secs(2);
/// Attempts of one call (more when there are more servers: each gets one).
pub const ATTEMPTS_MAX: usize = 6;
/// Pause after every server failed once, doubled each round up to [`BACKOFF_MAX`].
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(20);
pub const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Why a call to a replicated service failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service refused the call with a POSIX errno.
    #[error("{method}: {message}")]
    Errno {
        method: &'static str,
        errno: i32,
        message: String,
    },
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("{method}: no server could take the call (tried {tried:?}); last error: {last}")]
    NoServer {
        method: &'static str,
        tried: Vec<SocketAddr>,
        last: Box<RpcError>,
    },
    #[error("no servers configured")]
    NoServersConfigured,
}

impl ClientError {
    /// The errno to hand a POSIX caller: the service's own, or EIO for
    /// transport failures (ETIMEDOUT for timeouts).
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Errno { errno, .. } => *errno,
            ClientError::Rpc(RpcError::Timeout { .. }) => libc::ETIMEDOUT,
            _ => libc::EIO,
        }
    }
}

/// How the first server of a call is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Spread calls over all servers (stateless services such as meta).
    RoundRobin,
    /// Start with the server that answered last (a primary, such as mgmtd's).
    Sticky,
}

/// A set of interchangeable servers and the RPC client that reaches them.
pub struct ServerSet {
    rpc: RpcClient,
    servers: Vec<SocketAddr>,
    selection: Selection,
    call_timeout: Duration,
    next: AtomicUsize,
    failed: Mutex<HashMap<SocketAddr, Instant>>,
}

impl ServerSet {
    pub fn new(
        servers: Vec<SocketAddr>,
        selection: Selection,
        call_timeout: Duration,
        connections_per_server: usize,
    ) -> Result<ServerSet, ClientError> {
        if servers.is_empty() {
            return Err(ClientError::NoServersConfigured);
        }
        let rpc = RpcClient::new(ClientConfig {
            connections_per_addr: connections_per_server.max(1),
            ..ClientConfig::default()
        });
        Ok(ServerSet {
            rpc,
            servers,
            selection,
            call_timeout,
            next: AtomicUsize::new(0),
            failed: Mutex::new(HashMap::new()),
        })
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Calls `M` on some server; see the module docs for when it moves on.
    pub async fn call<M: Method>(
        &self,
        req: &M::Request,
        idempotent: bool,
    ) -> Result<M::Response, ClientError> {
        self.call_with_timeout::<M>(req, idempotent, self.call_timeout)
            .await
    }

    /// [`call`](Self::call) with its own per-attempt deadline (long polls).
    pub async fn call_with_timeout<M: Method>(
        &self,
        req: &M::Request,
        idempotent: bool,
        timeout: Duration,
    ) -> Result<M::Response, ClientError> {
        let n = self.servers.len();
        let mut tried = Vec::new();
        let mut last = None;
        let mut backoff = BACKOFF_INITIAL;
        let start = match self.selection {
            Selection::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
            Selection::Sticky => self.next.load(Ordering::Relaxed),
        };
        for attempt in 0..ATTEMPTS_MAX.max(n) {
            if attempt > 0 && attempt % n == 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            let pos = self.pick(start + attempt, attempt + 1 >= n);
            let addr = self.servers[pos];
            tried.push(addr);
            let opts = CallOptions {
                timeout,
                retry: RetryPolicy::none(),
                idempotent,
            };
            match self.rpc.call::<M>(addr, req, opts).await {
                Ok(resp) => {
                    self.failed.lock().remove(&addr);
                    if self.selection == Selection::Sticky {
                        self.next.store(pos, Ordering::Relaxed);
                    }
                    return Ok(resp);
                }
                Err(RpcError::Remote {
                    code: ErrorCode::Errno(errno),
                    message,
                    ..
                }) => {
                    return Err(ClientError::Errno {
                        method: M::NAME,
                        errno,
                        message,
                    });
                }
                Err(e) if moves_to_next_server(&e, idempotent) => {
                    tracing::debug!(server = %addr, method = M::NAME, error = %e, "server failed the call; trying another");
                    self.failed.lock().insert(addr, Instant::now());
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ClientError::NoServer {
            method: M::NAME,
            tried,
            last: Box::new(last.expect("at least one server was tried")),
        })
    }

    /// The index of the server at position `pos`, skipping servers in their
    /// cool-down unless `any` (the last attempt of a round takes whatever is next).
    fn pick(&self, pos: usize, any: bool) -> usize {
        let n = self.servers.len();
        let mut failed = self.failed.lock();
        failed.retain(|_, at| at.elapsed() < FAILED_SERVER_COOLDOWN);
        (0..n)
            .map(|i| (pos + i) % n)
            .find(|&i| any || !failed.contains_key(&self.servers[i]))
            .unwrap_or(pos % n)
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
