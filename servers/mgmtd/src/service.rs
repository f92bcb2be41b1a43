//! [`Mgmtd`]: one mgmtd instance. It is a standby until it takes the lease,
//! then the primary until it loses or gives up the lease.
//!
//! All primary state changes run one at a time under one async mutex, and each
//! is persisted in a transaction fenced by the lease ([`crate::lease::fence`])
//! before it is published. The in-memory state is a cache of what is stored:
//! a primary that fails to persist steps down and drops it; the next primary
//! reloads it from the engine.
//!
//! Routing info reaches nodes and clients by long poll: `GetRoutingInfo` with
//! the version a caller has returns as soon as a newer one is published, or
//! `None` after the wait.
//!
//! # Limits
//! Long polls wait at most [`ROUTING_WAIT_MAX`]; a chain settles in at most
//! [`CHAIN_STEPS_MAX`] state-machine steps per change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use r3fs_kv::{KvEngine, RetryPolicy, Transaction};
use r3fs_wire::mgmt::*;
use tokio::sync::{watch, Mutex};

use crate::chain;
use crate::config::MgmtdConfig;
use crate::error::MgmtdError;
use crate::lease::{self, LeaseOutcome, STEP_DOWN_MARGIN};
use crate::schema::{self, NodeRecord, Stored, TargetRecord};

/// Longest a routing long poll is held.
pub const ROUTING_WAIT_MAX: Duration = Duration::from_secs(30);
/// Most state-machine steps applied to one chain for one change.
pub const CHAIN_STEPS_MAX: usize = 8;
/// Node ids mgmtd hands out start here; lower ids are for configured nodes.
pub const NODE_ID_AUTO_FIRST: u64 = 10_000;

/// One mgmtd instance. Cheap to clone.
#[derive(Clone)]
pub struct Mgmtd {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<dyn KvEngine>,
    config: MgmtdConfig,
    state: Mutex<Option<Primary>>,
    routing: watch::Sender<Option<Arc<RoutingInfo>>>,
    /// Whether we act as primary, readable without the state lock.
    status: parking_lot::Mutex<Status>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Status {
    primary_epoch: Option<u64>,
    lease_expires: Millis,
}

/// What a primary holds in memory.
struct Primary {
    epoch: u64,
    expires: Millis,
    last_extend: Millis,
    version: u64,
    nodes: BTreeMap<NodeId, NodeRecord>,
    targets: BTreeMap<TargetId, TargetRecord>,
    chains: BTreeMap<ChainId, Chain>,
    tables: BTreeMap<ChainTableId, ChainTable>,
    sessions: BTreeMap<u64, SessionInfo>,
    /// Last heartbeat per node; every node starts with the takeover time.
    heartbeats: HashMap<NodeId, Millis>,
}

/// Records a change writes; applied to memory only after the commit.
#[derive(Default)]
struct Changes {
    nodes: Vec<NodeRecord>,
    nodes_removed: Vec<NodeId>,
    targets: Vec<TargetRecord>,
    targets_removed: Vec<TargetId>,
    chains: Vec<Chain>,
    tables: Vec<ChainTable>,
    sessions: Vec<SessionInfo>,
    sessions_removed: Vec<u64>,
    /// Whether routing info changed (sessions alone do not change it).
    routing: bool,
}

impl Mgmtd {
    /// Starts the instance: a background task takes the lease when it is free
    /// and keeps it while this instance is primary.
    pub fn start(engine: Arc<dyn KvEngine>, config: MgmtdConfig) -> Result<Mgmtd, MgmtdError> {
        config
            .validate()
            .map_err(|e| MgmtdError::refused(libc_einval(), format!("mgmtd config: {e}")))?;
        let (routing, _) = watch::channel(None);
        let mgmtd = Mgmtd {
            inner: Arc::new(Inner {
                engine,
                config,
                state: Mutex::new(None),
                routing,
                status: parking_lot::Mutex::new(Status::default()),
            }),
        };
        let weak = Arc::downgrade(&mgmtd.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let tick = Mgmtd { inner }.tick().await;
                tokio::time::sleep(tick).await;
            }
        });
        Ok(mgmtd)
    }

    pub fn config(&self) -> &MgmtdConfig {
        &self.inner.config
    }

    /// Whether this instance acts as primary now.
    pub fn is_primary(&self) -> bool {
        let s = *self.inner.status.lock();
        s.primary_epoch.is_some() && now_millis() + margin_ms() < s.lease_expires
    }

    /// One round of lease keeping and liveness checks; returns when to run again.
    async fn tick(&self) -> Duration {
        let cfg = &self.inner.config;
        let mut state = self.inner.state.lock().await;
        let now = now_millis();
        match state.as_mut() {
            Some(p) if now + margin_ms() >= p.expires => {
                tracing::warn!(
                    epoch = p.epoch,
                    "lease about to lapse without extension: stepping down"
                );
                self.step_down(&mut state);
            }
            Some(p) => {
                if now >= p.last_extend + cfg.extend_interval.as_millis() as Millis {
                    self.extend(&mut state).await;
                }
                if state.is_some() {
                    if let Err(e) = self.expire(&mut state).await {
                        tracing::warn!(error = %e, "liveness check failed");
                    }
                }
            }
            None => self.try_take_over(&mut state).await,
        }
        let step = if state.is_some() {
            cfg.extend_interval.min(cfg.heartbeat_timeout / 4)
        } else {
            cfg.check_interval
        };
        step.clamp(Duration::from_millis(50), Duration::from_secs(10))
    }

    async fn try_take_over(&self, state: &mut Option<Primary>) {
        let cfg = self.inner.config.clone();
        let result = self
            .kv(move |txn| {
                let now = now_millis();
                match lease::acquire_or_extend(
                    txn,
                    cfg.node_id,
                    &cfg.address,
                    now,
                    cfg.lease_duration,
                )? {
                    LeaseOutcome::Held(l) => {
                        let mut stored = schema::load(txn)?;
                        if stored.version == 0 {
                            // Version 0 means "I have nothing" in routing polls,
                            // so the first routing info a cluster publishes is 1.
                            stored.version = 1;
                            txn.set(schema::ROUTING_VERSION, &1u64.to_le_bytes())?;
                        }
                        Ok(Some((l, stored, now)))
                    }
                    LeaseOutcome::HeldBy(_) => Ok(None),
                }
            })
            .await;
        match result {
            Ok(Some((lease, stored, now))) => {
                tracing::info!(
                    epoch = lease.epoch,
                    node = self.inner.config.node_id,
                    "took the primary lease"
                );
                *state = Some(Primary::from_stored(
                    stored,
                    lease.epoch,
                    lease.expires,
                    now,
                ));
                self.publish_status(state);
                self.publish_routing(state);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not check the primary lease"),
        }
    }

    async fn extend(&self, state: &mut Option<Primary>) {
        let cfg = self.inner.config.clone();
        let epoch = state.as_ref().map_or(0, |p| p.epoch);
        let result = self
            .kv(move |txn| {
                lease::acquire_or_extend(
                    txn,
                    cfg.node_id,
                    &cfg.address,
                    now_millis(),
                    cfg.lease_duration,
                )
            })
            .await;
        match result {
            Ok(LeaseOutcome::Held(l)) if l.epoch == epoch => {
                if let Some(p) = state.as_mut() {
                    p.expires = l.expires;
                    p.last_extend = now_millis();
                }
                self.publish_status(state);
            }
            Ok(other) => {
                tracing::warn!(?other, epoch, "lost the primary lease: stepping down");
                self.step_down(state);
            }
            Err(e) => tracing::warn!(error = %e, "could not extend the primary lease; will retry"),
        }
    }

    fn step_down(&self, state: &mut Option<Primary>) {
        *state = None;
        self.publish_status(state);
        self.inner.routing.send_replace(None);
    }

    fn publish_status(&self, state: &Option<Primary>) {
        let mut s = self.inner.status.lock();
        s.primary_epoch = state.as_ref().map(|p| p.epoch);
        s.lease_expires = state.as_ref().map_or(0, |p| p.expires);
    }

    fn publish_routing(&self, state: &Option<Primary>) {
        if let Some(p) = state {
            let info = p.routing_info(&self.inner.config, now_millis());
            self.inner.routing.send_replace(Some(Arc::new(info)));
        }
    }

    /// Runs a KV transaction body on the blocking pool (commits wait for fsync).
    async fn kv<T: Send + 'static>(
        &self,
        body: impl FnMut(&mut dyn Transaction) -> Result<T, MgmtdError> + Send + 'static,
    ) -> Result<T, MgmtdError> {
        let engine = self.inner.engine.clone();
        let mut body = body;
        tokio::task::spawn_blocking(move || {
            r3fs_kv::run(engine.as_ref(), RetryPolicy::default(), &mut body)
        })
        .await
        .map_err(|e| MgmtdError::refused(libc_eio(), format!("mgmtd task failed: {e}")))?
    }

    /// The primary state, or NotPrimary if we are not primary or the lease
    /// is about to lapse (then we also step down).
    fn guard<'a>(&self, state: &'a mut Option<Primary>) -> Result<&'a mut Primary, MgmtdError> {
        let now = now_millis();
        if state
            .as_ref()
            .is_some_and(|p| now + margin_ms() >= p.expires)
        {
            tracing::warn!("lease lapsed while serving: stepping down");
            self.step_down(state);
        }
        state
            .as_mut()
            .ok_or(MgmtdError::NotPrimary { primary: None })
    }

    /// Persists `changes` fenced by our lease, then applies them in memory and
    /// publishes the new routing info. A failed write makes us step down.
    async fn commit(
        &self,
        state: &mut Option<Primary>,
        changes: Changes,
    ) -> Result<(), MgmtdError> {
        let p = self.guard(state)?;
        let (me, epoch) = (self.inner.config.node_id, p.epoch);
        let changes = Arc::new(changes);
        let c = changes.clone();
        let result = self
            .kv(move |txn| {
                lease::fence(txn, me, epoch, now_millis())?;
                write_changes(txn, &c)
            })
            .await;
        let version = match result {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, MgmtdError::NotPrimary { .. }) {
                    tracing::warn!(error = %e, "fenced out: another mgmtd holds the lease; stepping down");
                    self.step_down(state);
                }
                return Err(e);
            }
        };
        let p = state.as_mut().expect("still primary after a fenced commit");
        p.apply(&changes, version);
        if changes.routing {
            self.publish_routing(state);
        }
        Ok(())
    }

    /// Marks nodes whose heartbeats stopped as down, their targets offline,
    /// and drops expired sessions.
    async fn expire(&self, state: &mut Option<Primary>) -> Result<(), MgmtdError> {
        let cfg = &self.inner.config;
        let p = self.guard(state)?;
        let now = now_millis();
        let timeout = cfg.heartbeat_timeout.as_millis() as Millis;
        let mut local = HashMap::new();
        let mut newly_down = Vec::new();
        for node in p.nodes.values() {
            let last = p.heartbeats.get(&node.id).copied().unwrap_or(0);
            if now.saturating_sub(last) < timeout {
                continue;
            }
            for t in &node.targets {
                if p.targets
                    .get(t)
                    .is_some_and(|r| r.local_state != LocalState::Offline)
                {
                    local.insert(*t, LocalState::Offline);
                    newly_down.push(node.id);
                }
            }
        }
        let mut changes = p.settle(&local);
        for s in p.sessions.values().filter(|s| s.expires <= now) {
            changes.sessions_removed.push(s.client);
        }
        newly_down.dedup();
        if !newly_down.is_empty() {
            tracing::warn!(nodes = ?newly_down, "heartbeat timeout: marking targets offline");
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.commit(state, changes).await
    }

    // ---- Calls ----

    pub async fn get_primary(&self) -> Result<PrimaryInfo, MgmtdError> {
        let me = self.inner.config.node_id;
        let lease = self.kv(|txn| lease::peek(txn)).await?;
        let now = now_millis();
        let valid = lease.filter(|l| l.expires > now);
        Ok(PrimaryInfo {
            this_node: me,
            this_is_primary: self.is_primary(),
            primary: valid.as_ref().map(|l| l.holder),
            primary_address: valid.as_ref().map(|l| l.address.clone()),
            epoch: valid.as_ref().map_or(0, |l| l.epoch),
            lease_expires: valid.as_ref().map_or(0, |l| l.expires),
        })
    }

    pub async fn register_node(
        &self,
        req: RegisterNodeRequest,
    ) -> Result<RegisterNodeResponse, MgmtdError> {
        if req.address.is_empty() {
            return Err(MgmtdError::refused(
                libc_einval(),
                "a node must register with the address it serves at",
            ));
        }
        let mut state = self.inner.state.lock().await;
        self.guard(&mut state)?;
        let id = match req.id {
            Some(id) => id,
            None => self.allocate_node_id().await?,
        };
        let p = self.guard(&mut state)?;
        if let Some(existing) = p.nodes.get(&id) {
            if existing.node_type != req.node_type {
                return Err(MgmtdError::refused(
                    libc_eexist(),
                    format!(
                        "node id {id} is registered as {:?}, not {:?}",
                        existing.node_type, req.node_type
                    ),
                ));
            }
        }
        let mut seen = HashSet::new();
        for t in &req.targets {
            if !seen.insert(*t) {
                return Err(MgmtdError::refused(
                    libc_einval(),
                    format!("target {t} listed twice"),
                ));
            }
            if let Some(owner) = p.targets.get(t).map(|r| r.node).filter(|n| *n != id) {
                return Err(MgmtdError::refused(
                    libc_eexist(),
                    format!("target {t} belongs to node {owner}"),
                ));
            }
        }
        let now = now_millis();
        let registered_at = p.nodes.get(&id).map_or(now, |n| n.registered_at);
        let old_targets: Vec<TargetId> = p
            .nodes
            .get(&id)
            .map(|n| n.targets.clone())
            .unwrap_or_default();
        let mut changes = Changes {
            routing: true,
            ..Changes::default()
        };
        changes.nodes.push(NodeRecord {
            id,
            node_type: req.node_type,
            address: req.address,
            hostname: req.hostname,
            registered_at,
            targets: req.targets.clone(),
        });
        for t in &req.targets {
            if !p.targets.contains_key(t) {
                changes.targets.push(TargetRecord {
                    id: *t,
                    node: id,
                    chain: None,
                    public_state: PublicState::Offline,
                    local_state: LocalState::Online,
                });
            }
        }
        for t in old_targets.iter().filter(|t| !req.targets.contains(t)) {
            if let Some(chain) = p.targets.get(t).and_then(|r| r.chain) {
                return Err(MgmtdError::refused(
                    libc_ebusy(),
                    format!("node {id} no longer lists target {t}, which is in chain {chain}; take it out of the chain first"),
                ));
            }
            changes.targets_removed.push(*t);
        }
        p.heartbeats.insert(id, now);
        tracing::info!(node = id, node_type = ?req.node_type, "node registered");
        self.commit(&mut state, changes).await?;
        let version = state.as_ref().map_or(0, |p| p.version);
        Ok(RegisterNodeResponse {
            id,
            routing_version: version,
        })
    }

    async fn allocate_node_id(&self) -> Result<NodeId, MgmtdError> {
        let id = self
            .kv(|txn| {
                let next = schema::get_u64(txn, schema::NEXT_NODE_ID)?.max(NODE_ID_AUTO_FIRST);
                txn.set(schema::NEXT_NODE_ID, &(next + 1).to_le_bytes())?;
                Ok(next)
            })
            .await?;
        NodeId::try_from(id).map_err(|_| MgmtdError::refused(libc_enospc(), "node ids exhausted"))
    }

    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, MgmtdError> {
        let mut state = self.inner.state.lock().await;
        let p = self.guard(&mut state)?;
        let Some(node) = p.nodes.get(&req.node) else {
            return Err(MgmtdError::refused(
                libc_enoent(),
                format!("node {} is not registered; register it first", req.node),
            ));
        };
        let mut local = HashMap::new();
        for (t, ls) in &req.targets {
            if !node.targets.contains(t) {
                return Err(MgmtdError::refused(
                    libc_einval(),
                    format!("target {t} does not belong to node {}", req.node),
                ));
            }
            if p.targets.get(t).is_some_and(|r| r.local_state != *ls) {
                local.insert(*t, *ls);
            }
        }
        let was_alive = p.is_alive(req.node, now_millis(), &self.inner.config);
        p.heartbeats.insert(req.node, now_millis());
        let mut changes = p.settle(&local);
        changes.routing |= !was_alive;
        if !changes.is_empty() {
            self.commit(&mut state, changes).await?;
        } else if !was_alive {
            self.publish_routing(&state);
        }
        let version = state.as_ref().map_or(0, |p| p.version);
        Ok(HeartbeatResponse {
            routing_version: version,
        })
    }

    pub async fn routing_info(
        &self,
        req: GetRoutingInfoRequest,
    ) -> Result<Option<RoutingInfo>, MgmtdError> {
        {
            let mut state = self.inner.state.lock().await;
            self.guard(&mut state)?;
        }
        let mut rx = self.inner.routing.subscribe();
        let wait = Duration::from_millis(req.wait_ms as u64).min(ROUTING_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let current = rx.borrow_and_update().clone();
            match current {
                Some(info) if info.version > req.known_version => return Ok(Some((*info).clone())),
                Some(_) => {}
                None => return Err(MgmtdError::NotPrimary { primary: None }),
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(None),
            }
        }
    }

    pub async fn create_chain_table(
        &self,
        req: CreateChainTableRequest,
    ) -> Result<ChainTable, MgmtdError> {
        let mut state = self.inner.state.lock().await;
        let p = self.guard(&mut state)?;
        if p.tables.contains_key(&req.table) {
            return Err(MgmtdError::refused(
                libc_eexist(),
                format!("chain table {} exists", req.table),
            ));
        }
        if req.replicas == 0 {
            return Err(MgmtdError::refused(
                libc_einval(),
                "replicas must be at least 1",
            ));
        }
        let groups = plan_chains(p, req.replicas as usize, req.chains.map(|c| c as usize))?;
        let first_id = p.chains.keys().next_back().map_or(1, |c| c + 1);
        let mut changes = Changes {
            routing: true,
            ..Changes::default()
        };
        let mut ids = Vec::new();
        for (next_chain_id, group) in (first_id..).zip(groups) {
            let chain = chain::new_chain(next_chain_id, &group);
            for t in &group {
                let mut rec = p.targets[t].clone();
                rec.chain = Some(next_chain_id);
                rec.public_state = PublicState::Serving;
                // A new chain is empty: every replica trivially holds all of it.
                rec.local_state = LocalState::UpToDate;
                changes.targets.push(rec);
            }
            ids.push(next_chain_id);
            changes.chains.push(chain);
        }
        let table = ChainTable {
            id: req.table,
            replicas: req.replicas,
            chains: ids,
        };
        changes.tables.push(table.clone());
        tracing::info!(table = table.id, chains = ?table.chains, replicas = table.replicas, "chain table created");
        self.commit(&mut state, changes).await?;
        Ok(table)
    }

    pub async fn offline_target(&self, req: OfflineTargetRequest) -> Result<(), MgmtdError> {
        let mut state = self.inner.state.lock().await;
        let p = self.guard(&mut state)?;
        if !p.targets.contains_key(&req.target) {
            return Err(MgmtdError::refused(
                libc_enoent(),
                format!("no target {}", req.target),
            ));
        }
        let local = HashMap::from([(req.target, LocalState::Offline)]);
        let mut changes = p.settle(&local);
        changes.routing = true;
        tracing::warn!(target = req.target, "target taken offline by an operator");
        self.commit(&mut state, changes).await
    }

    pub async fn unregister_node(&self, req: UnregisterNodeRequest) -> Result<(), MgmtdError> {
        let mut state = self.inner.state.lock().await;
        let p = self.guard(&mut state)?;
        let Some(node) = p.nodes.get(&req.node) else {
            return Err(MgmtdError::refused(
                libc_enoent(),
                format!("no node {}", req.node),
            ));
        };
        if p.is_alive(req.node, now_millis(), &self.inner.config) {
            return Err(MgmtdError::refused(
                libc_ebusy(),
                format!(
                    "node {} is alive (heartbeats arrive); stop it before unregistering",
                    req.node
                ),
            ));
        }
        let chained: Vec<String> = node
            .targets
            .iter()
            .filter_map(|t| {
                p.targets
                    .get(t)
                    .and_then(|r| r.chain.map(|c| format!("target {t} in chain {c}")))
            })
            .collect();
        if !chained.is_empty() {
            return Err(MgmtdError::refused(
                libc_ebusy(),
                format!("node {} still has {}", req.node, chained.join(", ")),
            ));
        }
        let changes = Changes {
            nodes_removed: vec![req.node],
            targets_removed: node.targets.clone(),
            routing: true,
            ..Changes::default()
        };
        self.commit(&mut state, changes).await
    }

    pub async fn extend_session(
        &self,
        req: ExtendSessionRequest,
    ) -> Result<SessionInfo, MgmtdError> {
        let mut state = self.inner.state.lock().await;
        let p = self.guard(&mut state)?;
        let now = now_millis();
        let session = SessionInfo {
            client: req.client,
            description: p
                .sessions
                .get(&req.client)
                .map_or(req.description, |s| s.description.clone()),
            created: p.sessions.get(&req.client).map_or(now, |s| s.created),
            expires: now + self.inner.config.session_timeout.as_millis() as Millis,
        };
        let changes = Changes {
            sessions: vec![session.clone()],
            ..Changes::default()
        };
        self.commit(&mut state, changes).await?;
        Ok(session)
    }

    pub async fn list_sessions(&self) -> Result<Vec<SessionInfo>, MgmtdError> {
        let mut state = self.inner.state.lock().await;
        let p = self.guard(&mut state)?;
        let now = now_millis();
        Ok(p.sessions
            .values()
            .filter(|s| s.expires > now)
            .cloned()
            .collect())
    }

    pub async fn close_session(&self, req: CloseSessionRequest) -> Result<(), MgmtdError> {
        let mut state = self.inner.state.lock().await;
        self.guard(&mut state)?;
        let changes = Changes {
            sessions_removed: vec![req.client],
            ..Changes::default()
        };
        self.commit(&mut state, changes).await
    }
}

impl Changes {
    fn is_empty(&self) -> bool {
        !self.routing
            && self.nodes.is_empty()
            && self.nodes_removed.is_empty()
            && self.targets.is_empty()
            && self.targets_removed.is_empty()
            && self.chains.is_empty()
            && self.tables.is_empty()
            && self.sessions.is_empty()
            && self.sessions_removed.is_empty()
    }
}

/// Writes `c` and, if routing changed, the next routing version; returns the
/// routing version after the write.
fn write_changes(txn: &mut dyn Transaction, c: &Changes) -> Result<u64, MgmtdError> {
    for n in &c.nodes {
        schema::put(txn, &schema::key(schema::NODE, n.id as u64), n)?;
    }
    for id in &c.nodes_removed {
        txn.clear(&schema::key(schema::NODE, *id as u64))?;
    }
    for t in &c.targets {
        schema::put(txn, &schema::key(schema::TARGET, t.id), t)?;
    }
    for id in &c.targets_removed {
        txn.clear(&schema::key(schema::TARGET, *id))?;
    }
    for ch in &c.chains {
        chain::check_invariants(ch).map_err(|e| MgmtdError::Corrupt {
            key: format!("chain {}", ch.id),
            reason: format!("refusing to store a chain that breaks an invariant: {e}"),
        })?;
        schema::put(txn, &schema::key(schema::CHAIN, ch.id as u64), ch)?;
    }
    for t in &c.tables {
        schema::put(txn, &schema::key(schema::TABLE, t.id as u64), t)?;
    }
    for s in &c.sessions {
        schema::put(txn, &schema::key(schema::SESSION, s.client), s)?;
    }
    for id in &c.sessions_removed {
        txn.clear(&schema::key(schema::SESSION, *id))?;
    }
    let mut version = schema::get_u64(txn, schema::ROUTING_VERSION)?;
    if c.routing {
        version += 1;
        txn.set(schema::ROUTING_VERSION, &version.to_le_bytes())?;
    }
    Ok(version)
}

impl Primary {
    fn from_stored(s: Stored, epoch: u64, expires: Millis, now: Millis) -> Primary {
        Primary {
            epoch,
            expires,
            last_extend: now,
            version: s.version,
            heartbeats: s.nodes.iter().map(|n| (n.id, now)).collect(),
            nodes: s.nodes.into_iter().map(|n| (n.id, n)).collect(),
            targets: s.targets.into_iter().map(|t| (t.id, t)).collect(),
            chains: s.chains.into_iter().map(|c| (c.id, c)).collect(),
            tables: s.tables.into_iter().map(|t| (t.id, t)).collect(),
            sessions: s.sessions.into_iter().map(|s| (s.client, s)).collect(),
        }
    }

    fn is_alive(&self, node: NodeId, now: Millis, cfg: &MgmtdConfig) -> bool {
        self.heartbeats.get(&node).is_some_and(|last| {
            now.saturating_sub(*last) < cfg.heartbeat_timeout.as_millis() as Millis
        })
    }

    /// Applies new local states and runs every affected chain's state machine
    /// to a fixed point; returns the records that change.
    fn settle(&self, local: &HashMap<TargetId, LocalState>) -> Changes {
        let mut changes = Changes::default();
        if local.is_empty() {
            return changes;
        }
        let local_of = |t: TargetId| {
            local
                .get(&t)
                .copied()
                .or_else(|| self.targets.get(&t).map(|r| r.local_state))
                .unwrap_or(LocalState::Offline)
        };
        let mut touched_chains = HashSet::new();
        let mut targets: BTreeMap<TargetId, TargetRecord> = BTreeMap::new();
        for (t, ls) in local {
            if let Some(rec) = self.targets.get(t) {
                let mut rec = rec.clone();
                rec.local_state = *ls;
                if let Some(c) = rec.chain {
                    touched_chains.insert(c);
                }
                targets.insert(*t, rec);
            }
        }
        for chain_id in touched_chains {
            let Some(before) = self.chains.get(&chain_id) else {
                continue;
            };
            let mut chain = before.clone();
            // An UpToDate report means "my sync finished" only for a target that
            // was already SYNCING when it reported; one that starts syncing in
            // this settle has not synced anything yet, so it counts as Online.
            let mut started_syncing = HashSet::new();
            // A LASTSRV target that comes back holds every acknowledged
            // write: promoted to SERVING it is up to date by definition. It
            // still reports Online (it has not seen itself SERVING yet), which
            // for a SERVING target means "restarted, demote me": treat it as
            // UpToDate for the rest of this settle, or the chain would cycle
            // LASTSRV -> SERVING -> LASTSRV and never heal.
            let mut promoted_from_lastsrv = HashSet::new();
            for _ in 0..CHAIN_STEPS_MAX {
                let step_local = |t: TargetId| match local_of(t) {
                    LocalState::UpToDate if started_syncing.contains(&t) => LocalState::Online,
                    LocalState::Online if promoted_from_lastsrv.contains(&t) => {
                        LocalState::UpToDate
                    }
                    other => other,
                };
                let next = chain::next_chain(&chain, step_local);
                if next == chain {
                    break;
                }
                for ct in &next.targets {
                    let was = chain
                        .targets
                        .iter()
                        .find(|c| c.target == ct.target)
                        .map(|c| c.state);
                    if ct.state == PublicState::Syncing && was != Some(PublicState::Syncing) {
                        started_syncing.insert(ct.target);
                    }
                    if ct.state == PublicState::Serving && was == Some(PublicState::LastSrv) {
                        promoted_from_lastsrv.insert(ct.target);
                    }
                }
                chain = next;
            }
            if let Err(e) = chain::check_invariants(&chain) {
                panic!("chain state machine broke an invariant on chain {chain_id}: {e}");
            }
            assert!(chain.version >= before.version, "chain versions only grow");
            if chain != *before {
                for ct in &chain.targets {
                    let rec = targets
                        .entry(ct.target)
                        .or_insert_with(|| self.targets[&ct.target].clone());
                    rec.public_state = ct.state;
                }
                tracing::info!(chain = chain_id, version = chain.version, targets = ?chain.targets, "chain changed");
                changes.chains.push(chain);
                changes.routing = true;
            }
        }
        changes.targets = targets.into_values().collect();
        changes
    }

    fn apply(&mut self, c: &Changes, version: u64) {
        assert!(version >= self.version, "routing versions only grow");
        for n in &c.nodes {
            self.nodes.insert(n.id, n.clone());
        }
        for id in &c.nodes_removed {
            self.nodes.remove(id);
            self.heartbeats.remove(id);
        }
        for t in &c.targets {
            self.targets.insert(t.id, t.clone());
        }
        for id in &c.targets_removed {
            self.targets.remove(id);
        }
        for ch in &c.chains {
            self.chains.insert(ch.id, ch.clone());
        }
        for t in &c.tables {
            self.tables.insert(t.id, t.clone());
        }
        for s in &c.sessions {
            self.sessions.insert(s.client, s.clone());
        }
        for id in &c.sessions_removed {
            self.sessions.remove(id);
        }
        self.version = version;
    }

    fn routing_info(&self, cfg: &MgmtdConfig, now: Millis) -> RoutingInfo {
        RoutingInfo {
            version: self.version,
            epoch: self.epoch,
            nodes: self
                .nodes
                .values()
                .map(|n| NodeInfo {
                    id: n.id,
                    node_type: n.node_type,
                    address: n.address.clone(),
                    hostname: n.hostname.clone(),
                    registered_at: n.registered_at,
                    last_heartbeat: self.heartbeats.get(&n.id).copied().unwrap_or(0),
                    alive: self.is_alive(n.id, now, cfg),
                })
                .collect(),
            chain_tables: self.tables.values().cloned().collect(),
            chains: self.chains.values().cloned().collect(),
            targets: self
                .targets
                .values()
                .map(|t| TargetInfo {
                    id: t.id,
                    node: t.node,
                    chain: t.chain,
                    public_state: t.public_state,
                    local_state: t.local_state,
                })
                .collect(),
        }
    }
}

/// Groups free storage targets (in no chain) into chains of `replicas`
/// targets on distinct nodes, taking from the nodes with the most free
/// targets first so chains spread evenly.
fn plan_chains(
    p: &Primary,
    replicas: usize,
    wanted: Option<usize>,
) -> Result<Vec<Vec<TargetId>>, MgmtdError> {
    let mut free: BTreeMap<NodeId, Vec<TargetId>> = BTreeMap::new();
    for t in p.targets.values().filter(|t| t.chain.is_none()) {
        if p.nodes
            .get(&t.node)
            .is_some_and(|n| n.node_type == NodeType::Storage)
        {
            free.entry(t.node).or_default().push(t.id);
        }
    }
    for list in free.values_mut() {
        list.sort_unstable();
        list.reverse();
    }
    let mut groups = Vec::new();
    loop {
        if wanted.is_some_and(|w| groups.len() >= w) {
            break;
        }
        let mut nodes: Vec<(usize, NodeId)> = free
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(n, l)| (l.len(), *n))
            .collect();
        if nodes.len() < replicas {
            break;
        }
        nodes.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let group: Vec<TargetId> = nodes[..replicas]
            .iter()
            .map(|(_, n)| {
                free.get_mut(n)
                    .and_then(Vec::pop)
                    .expect("node has a free target")
            })
            .collect();
        groups.push(group);
    }
    if groups.is_empty() || wanted.is_some_and(|w| groups.len() < w) {
        let nodes_with_free = free.values().filter(|l| !l.is_empty()).count();
        return Err(MgmtdError::refused(
            libc_einval(),
            format!(
                "cannot build {} chain(s) of {replicas} replicas on distinct nodes: {nodes_with_free} storage node(s) have free targets",
                wanted.map_or("any".to_string(), |w| w.to_string())
            ),
        ));
    }
    Ok(groups)
}

fn margin_ms() -> Millis {
    STEP_DOWN_MARGIN.as_millis() as Millis
}

// errno values without pulling libc into the wire-facing API.
fn libc_einval() -> i32 {
    22
}
fn libc_eio() -> i32 {
    5
}
fn libc_eexist() -> i32 {
    17
}
fn libc_enoent() -> i32 {
    2
}
fn libc_ebusy() -> i32 {
    16
}
fn libc_enospc() -> i32 {
    28
}
