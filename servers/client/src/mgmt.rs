//! [`MgmtClient`]: calls to mgmtd, which go to whichever instance holds the
//! primary lease; and [`RoutingWatcher`], which keeps the newest routing info.
//!
//! Standbys answer state-changing calls with `Unavailable` (not primary), so
//! the shared failover moves on to the next mgmtd and then sticks to the one
//! that answered. The watcher long-polls `GetRoutingInfo` with the version it
//! holds and never replaces routing info with an older version, even across a
//! primary change.
//!
//! # Limits
//! Long polls ask mgmtd to wait [`ROUTING_POLL_WAIT`]; after a failed poll the
//! watcher waits [`ROUTING_RETRY_DELAY`] before the next.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use r3fs_wire::mgmt::*;
use tokio::sync::watch;

use crate::failover::{ClientError, Selection, ServerSet};

/// How long one routing long poll waits for a change.
pub const ROUTING_POLL_WAIT: Duration = Duration::from_secs(10);
/// Pause after a failed routing poll.
pub const ROUTING_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Deadline of one ordinary mgmtd call attempt.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the mgmtd instances of one cluster. Cheap to clone.
#[derive(Clone)]
pub struct MgmtClient {
    servers: Arc<ServerSet>,
}

impl MgmtClient {
    pub fn new(servers: Vec<SocketAddr>) -> Result<MgmtClient, ClientError> {
        let servers = ServerSet::new(servers, Selection::Sticky, CALL_TIMEOUT, 1)?;
        Ok(MgmtClient {
            servers: Arc::new(servers),
        })
    }

    /// Who holds the primary lease, as some reachable mgmtd sees it.
    pub async fn primary(&self) -> Result<PrimaryInfo, ClientError> {
        self.servers
            .call::<GetPrimary>(&GetPrimaryRequest {}, true)
            .await
    }

    /// Asks one particular mgmtd who is primary (tests and `admin status`).
    pub async fn primary_as_seen_by(&self, index: usize) -> Result<PrimaryInfo, ClientError> {
        let one = ServerSet::new(
            vec![self.servers.servers()[index]],
            Selection::Sticky,
            CALL_TIMEOUT,
            1,
        )?;
        one.call::<GetPrimary>(&GetPrimaryRequest {}, true).await
    }

    pub async fn register(
        &self,
        req: RegisterNodeRequest,
    ) -> Result<RegisterNodeResponse, ClientError> {
        // Registering again with the same id and targets changes nothing.
        let idempotent = req.id.is_some();
        self.servers.call::<RegisterNode>(&req, idempotent).await
    }

    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, ClientError> {
        self.servers.call::<Heartbeat>(&req, true).await
    }

    /// Routing info newer than `known_version`, waiting up to `wait` for it.
    pub async fn routing_info(
        &self,
        known_version: u64,
        wait: Duration,
    ) -> Result<Option<RoutingInfo>, ClientError> {
        let req = GetRoutingInfoRequest {
            known_version,
            wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
        };
        let timeout = wait + CALL_TIMEOUT;
        self.servers
            .call_with_timeout::<GetRoutingInfo>(&req, true, timeout)
            .await
    }

    pub async fn create_chain_table(
        &self,
        req: CreateChainTableRequest,
    ) -> Result<ChainTable, ClientError> {
        self.servers.call::<CreateChainTable>(&req, false).await
    }

    pub async fn offline_target(&self, target: TargetId) -> Result<(), ClientError> {
        self.servers
            .call::<OfflineTarget>(&OfflineTargetRequest { target }, true)
            .await
    }

    pub async fn unregister_node(&self, node: NodeId) -> Result<(), ClientError> {
        self.servers
            .call::<UnregisterNode>(&UnregisterNodeRequest { node }, false)
            .await
    }

    pub async fn extend_session(
        &self,
        client: u64,
        description: &str,
    ) -> Result<SessionInfo, ClientError> {
        let req = ExtendSessionRequest {
            client,
            description: description.to_string(),
        };
        self.servers.call::<ExtendSession>(&req, true).await
    }

    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        self.servers
            .call::<ListSessions>(&ListSessionsRequest {}, true)
            .await
    }

    pub async fn close_session(&self, client: u64) -> Result<(), ClientError> {
        self.servers
            .call::<CloseSession>(&CloseSessionRequest { client }, true)
            .await
    }
}

/// The newest routing info, kept current by a background long poll.
/// Dropping the watcher stops the poll.
pub struct RoutingWatcher {
    rx: watch::Receiver<Option<Arc<RoutingInfo>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RoutingWatcher {
    /// Starts watching; the first routing info arrives as soon as a primary answers.
    pub fn start(client: MgmtClient) -> RoutingWatcher {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(async move {
            let mut known = 0u64;
            loop {
                match client.routing_info(known, ROUTING_POLL_WAIT).await {
                    Ok(Some(info)) if info.version > known => {
                        known = info.version;
                        if tx.send(Some(Arc::new(info))).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "routing poll failed; retrying");
                        tokio::time::sleep(ROUTING_RETRY_DELAY).await;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        RoutingWatcher { rx, task }
    }

    /// A receiver of every newer routing info, for services that route by it.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<RoutingInfo>>> {
        self.rx.clone()
    }

    /// The newest routing info seen so far.
    pub fn current(&self) -> Option<Arc<RoutingInfo>> {
        self.rx.borrow().clone()
    }

    /// Waits until routing info satisfying `pred` arrives, or `timeout` passes.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&RoutingInfo) -> bool,
    ) -> Option<Arc<RoutingInfo>> {
        let wait = self.rx.wait_for(|r| r.as_deref().is_some_and(&mut pred));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(r)) => r.clone(),
            _ => None,
        }
    }
}

impl Drop for RoutingWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
