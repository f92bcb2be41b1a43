//! Requests and responses of the remote KV service: server-side transactions
//! driven by a client that buffers its writes.
//!
//! Knows nothing of engines or sockets (that is `r3fs-kv` and `r3fs-kv-remote`);
//! it only fixes the bytes. Lengths are `u64` here, never `usize`.
//!
//! # Protocol
//! [`Begin`] opens a transaction on the server and returns its id. The client
//! buffers writes ([`Mutation`]s, read-conflict ranges included) and sends them
//! ahead of the next read ([`Get`], [`GetRange`]), with [`Commit`], or alone with
//! [`Write`] when the buffer grows large. Every such request carries `first`,
//! the index of its first mutation in the transaction's mutation sequence; the
//! server skips mutations it has already applied, so a retried request never
//! applies an atomic add twice and every method but [`Commit`] is idempotent.
//! [`Abort`] discards a transaction. The server aborts transactions left idle.
//!
//! # Errors
//! A KV failure is part of the *response*: every method answers
//! `Result<T, WireKvError>`, so [`crate::ErrorBody`] only ever reports transport
//! or server failures (bad request, handler panic). [`WireKvError`] mirrors the
//! engine's error one variant per variant, plus [`WireKvError::UnknownTransaction`]
//! and [`WireKvError::TooManyTransactions`], which the client reports as
//! retryable transient errors.

use serde::{Deserialize, Serialize};

use crate::Method;

/// A transaction id, chosen at random by the server.
pub type TxnId = u64;

/// `AtomicOp` of the engine: values are little-endian `u64`, missing = 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AtomicOp {
    Add,
    Max,
}

/// One buffered write (or read-conflict range) of a transaction, in call order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Clear {
        key: Vec<u8>,
    },
    ClearRange {
        begin: Vec<u8>,
        end: Vec<u8>,
    },
    AtomicOp {
        key: Vec<u8>,
        op: AtomicOp,
        operand: u64,
    },
    AddReadConflictRange {
        begin: Vec<u8>,
        end: Vec<u8>,
    },
}

/// Why a KV call failed, as the engine (or the service) says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireKvError {
    Conflict,
    MaybeCommitted,
    TooOld,
    KeyTooLarge {
        len: u64,
        max: u64,
    },
    ValueTooLarge {
        len: u64,
        max: u64,
    },
    TransactionTooLarge {
        len: u64,
        max: u64,
    },
    Transient {
        code: i32,
        message: String,
    },
    InvalidRange,
    /// Not retryable: I/O error, corrupt data, a protocol violation.
    Engine(String),
    /// The server holds no transaction with this id: it was aborted for being
    /// idle, or the server restarted. Nothing of it was committed.
    UnknownTransaction {
        txn: TxnId,
    },
    /// The server already holds its maximum of open transactions.
    TooManyTransactions {
        max: u64,
    },
}

/// The result of every KV method.
pub type KvResult<T> = Result<T, WireKvError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeginRequest {}

/// Mutations to apply before the request's own work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mutations {
    /// Index of `list[0]` in the transaction's mutation sequence.
    pub first: u64,
    pub list: Vec<Mutation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    pub txn: TxnId,
    pub mutations: Mutations,
    pub key: Vec<u8>,
    /// Snapshot read: no read conflict.
    pub snapshot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRangeRequest {
    pub txn: TxnId,
    pub mutations: Mutations,
    pub begin: Vec<u8>,
    pub end: Vec<u8>,
    /// At most this many pairs; `0` means no limit. The server may return
    /// fewer (see [`RangePage::more`]).
    pub limit: u64,
    pub reverse: bool,
    pub snapshot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Part of a range read. The server caps a page by rows and bytes; `more`
/// says pairs may follow the last one returned (from the request's `limit`
/// or the server's caps). The client continues after the last key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangePage {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRequest {
    pub txn: TxnId,
    pub mutations: Mutations,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    pub txn: TxnId,
    pub mutations: Mutations,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortRequest {
    pub txn: TxnId,
}

macro_rules! methods {
    ($($name:ident = $id:literal : $req:ty => $resp:ty;)*) => {
        $(
            #[doc = concat!("KV method `", stringify!($name), "`.")]
            pub struct $name;
            impl Method for $name {
                const ID: u16 = $id;
                const NAME: &'static str = concat!("kv.", stringify!($name));
                type Request = $req;
                type Response = $resp;
            }
        )*
        /// Every KV method id, for tests that must cover them all.
        pub const METHOD_IDS: &[u16] = &[$($id),*];
    };
}

methods! {
    Begin = 0x0401: BeginRequest => KvResult<TxnId>;
    Get = 0x0402: GetRequest => KvResult<Option<Vec<u8>>>;
    GetRange = 0x0403: GetRangeRequest => KvResult<RangePage>;
    Write = 0x0404: WriteRequest => KvResult<()>;
    Commit = 0x0405: CommitRequest => KvResult<()>;
    Abort = 0x0406: AbortRequest => ();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    #[test]
    fn method_ids_are_in_the_kv_block_and_distinct() {
        let mut ids = METHOD_IDS.to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), METHOD_IDS.len());
        assert!(ids.iter().all(|id| id >> 8 == 0x04));
    }

    #[test]
    fn requests_and_errors_round_trip() {
        let req = GetRangeRequest {
            txn: 7,
            mutations: Mutations {
                first: 3,
                list: vec![
                    Mutation::Set {
                        key: b"k".to_vec(),
                        value: vec![0xff; 3],
                    },
                    Mutation::AtomicOp {
                        key: Vec::new(),
                        op: AtomicOp::Max,
                        operand: u64::MAX,
                    },
                ],
            },
            begin: b"a".to_vec(),
            end: b"z".to_vec(),
            limit: 0,
            reverse: true,
            snapshot: false,
        };
        assert_eq!(
            body::decode::<GetRangeRequest>(&body::encode(&req)).unwrap(),
            req
        );
        let resp: KvResult<RangePage> = Err(WireKvError::TooManyTransactions { max: 9 });
        assert_eq!(
            body::decode::<KvResult<RangePage>>(&body::encode(&resp)).unwrap(),
            resp
        );
    }
}
