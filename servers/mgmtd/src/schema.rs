//! How mgmtd keeps its state in the KV engine.
//!
//! | key | value |
//! |---|---|
//! | `MGLS` | [`LeaseRecord`]: who is primary, its epoch, until when |
//! | `MGRV` | u64 LE: routing info version |
//! | `MGNI` | u64 LE: next node id to hand out |
//! | `MGND` node (BE) | [`NodeRecord`] |
//! | `MGTG` target (BE) | [`TargetRecord`] |
//! | `MGCH` chain (BE) | [`Chain`] |
//! | `MGCT` table (BE) | [`ChainTable`] |
//! | `MGSS` client (BE) | [`SessionInfo`] |
//!
//! Heartbeat times are not stored: they change every few seconds and a new
//! primary starts every node's heartbeat clock afresh when it takes over.

use r3fs_kv::{KvError, RangeOptions, Transaction};
use r3fs_wire::mgmt::{
    Chain, ChainTable, LocalState, Millis, NodeId, NodeType, PublicState, SessionInfo, TargetId,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::MgmtdError;

pub const LEASE: &[u8] = b"MGLS";
pub const ROUTING_VERSION: &[u8] = b"MGRV";
pub const NEXT_NODE_ID: &[u8] = b"MGNI";
pub const NODE: &[u8; 4] = b"MGND";
pub const TARGET: &[u8; 4] = b"MGTG";
pub const CHAIN: &[u8; 4] = b"MGCH";
pub const TABLE: &[u8; 4] = b"MGCT";
pub const SESSION: &[u8; 4] = b"MGSS";

/// The primary lease. An mgmtd acts as primary only while it holds an
/// unexpired lease with its own id and epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: NodeId,
    pub address: String,
    /// Grows by one with every change of holder; fences writes of old primaries.
    pub epoch: u64,
    pub expires: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub node_type: NodeType,
    pub address: String,
    pub hostname: String,
    pub registered_at: Millis,
    pub targets: Vec<TargetId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    pub id: TargetId,
    pub node: NodeId,
    pub chain: Option<u32>,
    pub public_state: PublicState,
    pub local_state: LocalState,
}

pub fn key(tag: &[u8; 4], id: u64) -> Vec<u8> {
    let mut k = tag.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes mgmtd records")
}

pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, MgmtdError> {
    postcard::from_bytes(bytes).map_err(|e| MgmtdError::Corrupt {
        key: String::from_utf8_lossy(&key[..key.len().min(4)]).into_owned(),
        reason: e.to_string(),
    })
}

pub fn get<T: DeserializeOwned>(
    txn: &mut dyn Transaction,
    key: &[u8],
) -> Result<Option<T>, MgmtdError> {
    match txn.get(key)? {
        Some(v) => Ok(Some(decode(key, &v)?)),
        None => Ok(None),
    }
}

pub fn put<T: Serialize>(txn: &mut dyn Transaction, key: &[u8], v: &T) -> Result<(), KvError> {
    txn.set(key, &encode(v))
}

/// Every record under `tag`.
pub fn all<T: DeserializeOwned>(
    txn: &mut dyn Transaction,
    tag: &[u8; 4],
) -> Result<Vec<T>, MgmtdError> {
    let end = r3fs_kv::prefix_end(tag).expect("tags are not 0xff");
    let range = txn.get_range(tag, &end, RangeOptions::default())?;
    range
        .kvs
        .iter()
        .map(|kv| decode(&kv.key, &kv.value))
        .collect()
}

pub fn get_u64(txn: &mut dyn Transaction, key: &[u8]) -> Result<u64, MgmtdError> {
    match txn.get(key)? {
        Some(v) => {
            let arr: [u8; 8] = v.as_slice().try_into().map_err(|_| MgmtdError::Corrupt {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: format!("expected 8 bytes, found {}", v.len()),
            })?;
            Ok(u64::from_le_bytes(arr))
        }
        None => Ok(0),
    }
}

/// Routing state as loaded by a primary that takes over.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub version: u64,
    pub nodes: Vec<NodeRecord>,
    pub targets: Vec<TargetRecord>,
    pub chains: Vec<Chain>,
    pub tables: Vec<ChainTable>,
    pub sessions: Vec<SessionInfo>,
}

pub fn load(txn: &mut dyn Transaction) -> Result<Stored, MgmtdError> {
    Ok(Stored {
        version: get_u64(txn, ROUTING_VERSION)?,
        nodes: all(txn, NODE)?,
        targets: all(txn, TARGET)?,
        chains: all(txn, CHAIN)?,
        tables: all(txn, TABLE)?,
        sessions: all(txn, SESSION)?,
    })
}
