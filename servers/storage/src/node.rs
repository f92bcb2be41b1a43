//! A storage node's life with mgmtd: register the node and its targets, keep
//! routing info current, report every target's local state in heartbeats, and
//! start a resync whenever this node's target precedes a SYNCING one.
//!
//! The local state rule. A target reports ONLINE from the moment the process
//! starts: after a restart it cannot know what it missed, so mgmtd must see it
//! as not up to date and send it through SYNCING. It reports UP-TO-DATE once
//! either (a) a predecessor declared its resync complete, or (b) routing info
//! published after mgmtd processed this process's first heartbeat shows the
//! target SERVING — mgmtd then knew the target had restarted and still chose
//! it to serve (a new chain, or the LASTSRV coming back).
//!
//! A target its service took out of service after a disk failure
//! (`StorageService::fail_target`) reports OFFLINE, at once, until the
//! process restarts.
//!
//! Must not decide chain states; it only reports and follows them.
//!
//! # Limits
//! Heartbeats every [`NodeConfig::heartbeat_interval`]; at most one resync
//! per chain at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use r3fs_wire::mgmt::{ChainId, LocalState, NodeId, PublicState, RoutingInfo, TargetId};
use tokio::sync::watch;

use crate::craq::StorageService;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub heartbeat_interval: Duration,
    /// How long to wait before retrying a resync that failed.
    pub resync_retry: Duration,
}

/// What the node reports to mgmtd; implemented over `MgmtClient` by the
/// binary (this crate does not depend on client crates).
pub trait Reporter: Send + Sync + 'static {
    /// Sends a heartbeat; returns the routing version mgmtd had after it.
    fn heartbeat(
        &self,
        node: NodeId,
        targets: Vec<(TargetId, LocalState)>,
    ) -> impl std::future::Future<Output = Result<u64, String>> + Send;
}

/// Decides each target's local state (see the module docs).
#[derive(Default)]
pub struct LocalStates {
    /// Routing version mgmtd reported after our first heartbeat.
    first_report: Option<u64>,
    /// Targets seen SERVING in routing info published after that.
    serving: HashSet<TargetId>,
}

impl LocalStates {
    pub fn reported(&mut self, routing_version: u64) {
        self.first_report.get_or_insert(routing_version);
    }

    /// The state to report for `target` under `routing`, given whether a
    /// predecessor declared its resync complete.
    pub fn state(
        &mut self,
        target: TargetId,
        routing: Option<&RoutingInfo>,
        synced: bool,
    ) -> LocalState {
        let public = routing
            .and_then(|r| r.target(target))
            .map(|t| t.public_state);
        let fresh = match (self.first_report, routing) {
            (Some(v0), Some(r)) => r.version >= v0,
            _ => false,
        };
        if fresh && public == Some(PublicState::Serving) {
            self.serving.insert(target);
        }
        if public.is_some_and(|p| matches!(p, PublicState::Offline | PublicState::Waiting)) {
            // Taken out of service (e.g. offline-target): it must sync again.
            self.serving.remove(&target);
        }
        if self.serving.contains(&target) || synced {
            LocalState::UpToDate
        } else {
            LocalState::Online
        }
    }
}

/// Runs heartbeats and resyncs until the returned handle is dropped.
pub fn spawn<R: Reporter>(
    service: StorageService,
    reporter: R,
    mut routing: watch::Receiver<Option<Arc<RoutingInfo>>>,
    config: NodeConfig,
) -> NodeTasks {
    let beat = {
        let service = service.clone();
        let mut routing = routing.clone();
        tokio::spawn(async move {
            let mut states = LocalStates::default();
            loop {
                // Armed before the report is built, so a failure while this
                // beat is on its way still wakes the next one.
                let failed = service.target_failed();
                tokio::pin!(failed);
                let current = routing.borrow_and_update().clone();
                let report: Vec<(TargetId, LocalState)> = service
                    .targets()
                    .map(|t| {
                        let public = current
                            .as_deref()
                            .and_then(|r| r.target(t))
                            .map(|x| x.public_state);
                        let synced =
                            service.synced_at(t).is_some() && public == Some(PublicState::Syncing);
                        if public == Some(PublicState::Serving) {
                            service.clear_synced(t);
                        }
                        if service.failure(t).is_some() {
                            return (t, LocalState::Offline);
                        }
                        (t, states.state(t, current.as_deref(), synced))
                    })
                    .collect();
                match reporter.heartbeat(config.node_id, report).await {
                    Ok(version) => states.reported(version),
                    Err(e) => tracing::warn!(error = %e, "heartbeat to mgmtd failed"),
                }
                // Beat again at the interval, or at once when routing changes
                // or a target fails; stop when the routing source is gone
                // (the node shuts down).
                let next = async {
                    tokio::select! {
                        changed = routing.changed() => changed.is_ok(),
                        () = &mut failed => true,
                    }
                };
                if let Ok(false) = tokio::time::timeout(config.heartbeat_interval, next).await {
                    return;
                }
            }
        })
    };
    let sync = tokio::spawn(async move {
        let running: Arc<Mutex<HashSet<ChainId>>> = Arc::default();
        let mut failed_at: HashMap<ChainId, tokio::time::Instant> = HashMap::new();
        loop {
            let current = routing.borrow_and_update().clone();
            for chain in current.iter().flat_map(|r| r.chains.iter()) {
                if !precedes_syncing(&service, chain) || running.lock().contains(&chain.id) {
                    continue;
                }
                if failed_at
                    .get(&chain.id)
                    .is_some_and(|t| t.elapsed() < config.resync_retry)
                {
                    continue;
                }
                failed_at.remove(&chain.id);
                running.lock().insert(chain.id);
                let (service, running, id) = (service.clone(), running.clone(), chain.id);
                let result = service.resync(id).await;
                running.lock().remove(&id);
                if let Err(e) = result {
                    tracing::warn!(chain = id, error = %e, "resync failed; will retry");
                    failed_at.insert(id, tokio::time::Instant::now());
                }
            }
            if let Ok(Err(_)) = tokio::time::timeout(config.resync_retry, routing.changed()).await {
                return;
            }
        }
    });
    NodeTasks {
        tasks: vec![beat, sync],
    }
}

fn precedes_syncing(service: &StorageService, chain: &r3fs_wire::mgmt::Chain) -> bool {
    chain.targets.windows(2).any(|w| {
        w[0].state == PublicState::Serving
            && w[1].state == PublicState::Syncing
            && service.targets().any(|t| t == w[0].target)
    })
}

/// The node's background tasks; dropping this stops them.
pub struct NodeTasks {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for NodeTasks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3fs_wire::mgmt::{Chain, ChainTarget, TargetInfo};

    fn routing(version: u64, state: PublicState) -> RoutingInfo {
        RoutingInfo {
            version,
            epoch: 1,
            nodes: vec![],
            chain_tables: vec![],
            chains: vec![Chain {
                id: 1,
                version,
                targets: vec![ChainTarget { target: 5, state }],
            }],
            targets: vec![TargetInfo {
                id: 5,
                node: 1,
                chain: Some(1),
                public_state: state,
                local_state: LocalState::Online,
            }],
        }
    }

    #[test]
    fn a_restarted_target_reports_online_until_mgmtd_has_seen_it() {
        let mut s = LocalStates::default();
        let stale = routing(10, PublicState::Serving);
        // Before the first heartbeat is answered, SERVING in routing proves nothing.
        assert_eq!(s.state(5, Some(&stale), false), LocalState::Online);
        s.reported(11);
        assert_eq!(
            s.state(5, Some(&stale), false),
            LocalState::Online,
            "routing from before our report"
        );
        // mgmtd processed our ONLINE report and moved us to WAITING, then SYNCING.
        assert_eq!(
            s.state(5, Some(&routing(11, PublicState::Waiting)), false),
            LocalState::Online
        );
        assert_eq!(
            s.state(5, Some(&routing(12, PublicState::Syncing)), true),
            LocalState::UpToDate
        );
        // Once serving after our report, it stays up to date.
        assert_eq!(
            s.state(5, Some(&routing(13, PublicState::Serving)), false),
            LocalState::UpToDate
        );
        assert_eq!(
            s.state(5, Some(&routing(14, PublicState::Serving)), false),
            LocalState::UpToDate
        );
        // An operator takes it offline: it must sync again.
        assert_eq!(
            s.state(5, Some(&routing(15, PublicState::Offline)), false),
            LocalState::Online
        );
    }

    #[test]
    fn a_target_chosen_to_serve_after_the_report_is_up_to_date() {
        let mut s = LocalStates::default();
        s.reported(3);
        // A new chain table puts the fresh target in service.
        assert_eq!(
            s.state(5, Some(&routing(4, PublicState::Serving)), false),
            LocalState::UpToDate
        );
    }
}
