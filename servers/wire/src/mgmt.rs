//! Requests and responses of mgmtd, and the routing info it hands out: nodes,
//! chain tables, chains and targets with their states.
//!
//! Target states follow 3FS. A target's *local* state is what its storage
//! node reports in heartbeats; its *public* state is what mgmtd decides from
//! the local states of the whole chain, and what clients route by.

use serde::{Deserialize, Serialize};

use crate::Method;

pub type NodeId = u32;
pub type TargetId = u64;
pub type ChainId = u32;
pub type ChainTableId = u32;

/// What mgmtd publishes about a target; clients route by it.
///
/// The declaration order is the order targets take in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PublicState {
    /// Alive, holds every acknowledged write, serves reads and writes.
    Serving,
    /// Down, and was the last SERVING target of its chain: it holds the newest
    /// data, so it must be the one the chain restarts from.
    LastSrv,
    /// Alive and receiving a full copy from its predecessor.
    Syncing,
    /// Alive, waiting for its turn to sync.
    Waiting,
    /// Down, or its storage failed.
    Offline,
}

/// What a storage node reports about one of its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LocalState {
    /// Alive and holding every write mgmtd's SERVING state promised.
    UpToDate,
    /// Alive but not (yet) up to date: restarted, or syncing.
    Online,
    /// Down, or the disk failed.
    Offline,
}

/// One target in a chain, in chain order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainTarget {
    pub target: TargetId,
    pub state: PublicState,
}

/// A replication chain: targets in order (head first), and a version bumped by
/// every change to the order or to any target's public state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub id: ChainId,
    pub version: u64,
    pub targets: Vec<ChainTarget>,
}

/// Milliseconds since the Unix epoch (mgmtd's clock; leases and heartbeats are
/// measured with it).
pub type Millis = u64;

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeType {
    Mgmtd,
    Meta,
    Storage,
    Client,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub node_type: NodeType,
    /// Where the node serves (host:port), as it registered.
    pub address: String,
    pub hostname: String,
    pub registered_at: Millis,
    /// When the primary last heard from it (0: not since the primary took over).
    pub last_heartbeat: Millis,
    /// Whether the primary considers it alive (heard within the heartbeat timeout).
    pub alive: bool,
}

/// A storage target: where it lives, its chain, and both of its states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub id: TargetId,
    pub node: NodeId,
    pub chain: Option<ChainId>,
    pub public_state: PublicState,
    pub local_state: LocalState,
}

/// A set of chains new files are placed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainTable {
    pub id: ChainTableId,
    pub replicas: u32,
    pub chains: Vec<ChainId>,
}

/// Everything clients and servers route by. `version` grows with every change;
/// `epoch` is the lease epoch of the primary that published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingInfo {
    pub version: u64,
    pub epoch: u64,
    pub nodes: Vec<NodeInfo>,
    pub chain_tables: Vec<ChainTable>,
    pub chains: Vec<Chain>,
    pub targets: Vec<TargetInfo>,
}

impl RoutingInfo {
    pub fn chain(&self, id: ChainId) -> Option<&Chain> {
        self.chains.iter().find(|c| c.id == id)
    }
    pub fn target(&self, id: TargetId) -> Option<&TargetInfo> {
        self.targets.iter().find(|t| t.id == id)
    }
    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetPrimaryRequest {}

/// Who holds the primary lease, as the answering mgmtd sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryInfo {
    /// The answering mgmtd.
    pub this_node: NodeId,
    /// Whether the answering mgmtd acts as primary right now.
    pub this_is_primary: bool,
    pub primary: Option<NodeId>,
    pub primary_address: Option<String>,
    pub epoch: u64,
    pub lease_expires: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterNodeRequest {
    /// A fixed id (storage and meta nodes configure theirs), or `None` to be given one.
    pub id: Option<NodeId>,
    pub node_type: NodeType,
    pub address: String,
    pub hostname: String,
    /// Storage nodes: the targets this node serves.
    pub targets: Vec<TargetId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterNodeResponse {
    pub id: NodeId,
    pub routing_version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub node: NodeId,
    /// Storage nodes: every target's local state.
    pub targets: Vec<(TargetId, LocalState)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub routing_version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRoutingInfoRequest {
    /// The newest version the caller has; the answer is newer or `None`.
    pub known_version: u64,
    /// Long poll: wait up to this long for a newer version before answering `None`.
    pub wait_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateChainTableRequest {
    pub table: ChainTableId,
    pub replicas: u32,
    /// Chains to build; `None`: as many as the registered targets allow.
    pub chains: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineTargetRequest {
    pub target: TargetId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisterNodeRequest {
    pub node: NodeId,
}

/// A client session: kept while the client extends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub client: u64,
    pub description: String,
    pub created: Millis,
    pub expires: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtendSessionRequest {
    pub client: u64,
    /// Shown by `list-clients` (host, mount point, ...); kept from the first call.
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListSessionsRequest {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseSessionRequest {
    pub client: u64,
}

macro_rules! methods {
    ($($name:ident = $id:literal : $req:ty => $resp:ty;)*) => {
        $(
            #[doc = concat!("mgmtd method `", stringify!($name), "`.")]
            pub struct $name;
            impl Method for $name {
                const ID: u16 = $id;
                const NAME: &'static str = concat!("mgmtd.", stringify!($name));
                type Request = $req;
                type Response = $resp;
            }
        )*
        /// Every mgmtd method id.
        pub const METHOD_IDS: &[u16] = &[$($id),*];
    };
}

methods! {
    GetPrimary = 0x0101: GetPrimaryRequest => PrimaryInfo;
    RegisterNode = 0x0102: RegisterNodeRequest => RegisterNodeResponse;
    Heartbeat = 0x0103: HeartbeatRequest => HeartbeatResponse;
    GetRoutingInfo = 0x0104: GetRoutingInfoRequest => Option<RoutingInfo>;
    CreateChainTable = 0x0105: CreateChainTableRequest => ChainTable;
    OfflineTarget = 0x0106: OfflineTargetRequest => ();
    UnregisterNode = 0x0107: UnregisterNodeRequest => ();
    ExtendSession = 0x0108: ExtendSessionRequest => SessionInfo;
    ListSessions = 0x0109: ListSessionsRequest => Vec<SessionInfo>;
    CloseSession = 0x010a: CloseSessionRequest => ();
}
