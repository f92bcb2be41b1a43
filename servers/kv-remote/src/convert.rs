//! Conversions between the engine's errors and types and their wire forms,
//! and how an RPC failure becomes a `KvError`.

use r3fs_kv::KvError;
use r3fs_net::RpcError;
use r3fs_wire::kv::{self as wire, WireKvError};
use r3fs_wire::ErrorCode;

/// `KvError::Transient` code: the server holds no such transaction (aborted
/// for being idle, or the server restarted). Nothing of it was committed.
pub const CODE_UNKNOWN_TRANSACTION: i32 = 4_401;
/// `KvError::Transient` code: the server holds its maximum of open transactions.
pub const CODE_TOO_MANY_TRANSACTIONS: i32 = 4_402;
/// `KvError::Transient` code: a call before commit failed in transport
/// (connect, timeout, lost connection, server unavailable).
pub const CODE_UNREACHABLE: i32 = 4_403;

fn len(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

pub(crate) fn to_wire(err: KvError) -> WireKvError {
    match err {
        KvError::Conflict => WireKvError::Conflict,
        KvError::MaybeCommitted => WireKvError::MaybeCommitted,
        KvError::TooOld => WireKvError::TooOld,
        KvError::KeyTooLarge { len: l, max } => WireKvError::KeyTooLarge {
            len: len(l),
            max: len(max),
        },
        KvError::ValueTooLarge { len: l, max } => WireKvError::ValueTooLarge {
            len: len(l),
            max: len(max),
        },
        KvError::TransactionTooLarge { len: l, max } => WireKvError::TransactionTooLarge {
            len: len(l),
            max: len(max),
        },
        KvError::Transient { code, message } => WireKvError::Transient { code, message },
        KvError::InvalidRange => WireKvError::InvalidRange,
        KvError::Engine(message) => WireKvError::Engine(message),
        // Only `run` gives up; the server never calls it.
        err @ KvError::RetryLimit { .. } => WireKvError::Engine(err.to_string()),
    }
}

pub(crate) fn from_wire(err: WireKvError) -> KvError {
    match err {
        WireKvError::Conflict => KvError::Conflict,
        WireKvError::MaybeCommitted => KvError::MaybeCommitted,
        WireKvError::TooOld => KvError::TooOld,
        WireKvError::KeyTooLarge { len, max } => KvError::KeyTooLarge {
            len: usize_of(len),
            max: usize_of(max),
        },
        WireKvError::ValueTooLarge { len, max } => KvError::ValueTooLarge {
            len: usize_of(len),
            max: usize_of(max),
        },
        WireKvError::TransactionTooLarge { len, max } => KvError::TransactionTooLarge {
            len: usize_of(len),
            max: usize_of(max),
        },
        WireKvError::Transient { code, message } => KvError::Transient { code, message },
        WireKvError::InvalidRange => KvError::InvalidRange,
        WireKvError::Engine(message) => KvError::Engine(message),
        WireKvError::UnknownTransaction { txn } => KvError::Transient {
            code: CODE_UNKNOWN_TRANSACTION,
            message: format!(
                "kv server holds no transaction {txn:#018x} (idle-aborted or restarted)"
            ),
        },
        WireKvError::TooManyTransactions { max } => KvError::Transient {
            code: CODE_TOO_MANY_TRANSACTIONS,
            message: format!("kv server holds its maximum of {max} open transactions"),
        },
    }
}

pub(crate) fn atomic_to_wire(op: r3fs_kv::AtomicOp) -> wire::AtomicOp {
    match op {
        r3fs_kv::AtomicOp::Add => wire::AtomicOp::Add,
        r3fs_kv::AtomicOp::Max => wire::AtomicOp::Max,
    }
}

pub(crate) fn atomic_from_wire(op: wire::AtomicOp) -> r3fs_kv::AtomicOp {
    match op {
        wire::AtomicOp::Add => r3fs_kv::AtomicOp::Add,
        wire::AtomicOp::Max => r3fs_kv::AtomicOp::Max,
    }
}

/// Whether a failed call may have reached the server and run there.
fn may_have_run(err: &RpcError) -> bool {
    match err {
        RpcError::Connect { .. } | RpcError::Frame { .. } => false,
        RpcError::Remote { code, .. } => {
            !matches!(code, ErrorCode::UnknownMethod | ErrorCode::BadRequest)
        }
        RpcError::RetriesExhausted { last, .. } => may_have_run(last),
        RpcError::Timeout { .. }
        | RpcError::ConnectionLost { .. }
        | RpcError::Decode { .. }
        | RpcError::UncheckedPayload { .. } => true,
    }
}

/// Whether the failure is the network's or a busy server's, so a later
/// attempt may succeed.
fn is_transport(err: &RpcError) -> bool {
    match err {
        RpcError::Connect { .. } | RpcError::Timeout { .. } | RpcError::ConnectionLost { .. } => {
            true
        }
        RpcError::Remote { code, .. } => code.is_retryable(),
        RpcError::RetriesExhausted { last, .. } => is_transport(last),
        RpcError::Decode { .. } | RpcError::Frame { .. } | RpcError::UncheckedPayload { .. } => {
            false
        }
    }
}

/// Whether the failure was a refused or timed-out connect (try another server).
pub(crate) fn is_connect(err: &RpcError) -> bool {
    match err {
        RpcError::Connect { .. } => true,
        RpcError::RetriesExhausted { last, .. } => is_connect(last),
        _ => false,
    }
}

/// A failed call other than commit: transport failures are retryable.
pub(crate) fn rpc_before_commit(err: RpcError) -> KvError {
    if is_transport(&err) {
        KvError::Transient {
            code: CODE_UNREACHABLE,
            message: err.to_string(),
        }
    } else {
        KvError::Engine(err.to_string())
    }
}

/// A failed commit call: `MaybeCommitted` whenever the request may have run.
pub(crate) fn rpc_commit(err: RpcError) -> KvError {
    if may_have_run(&err) {
        tracing::debug!(error = %err, "kv commit outcome unknown");
        return KvError::MaybeCommitted;
    }
    rpc_before_commit(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn every_kv_error_survives_the_wire() {
        let errors = [
            KvError::Conflict,
            KvError::MaybeCommitted,
            KvError::TooOld,
            KvError::KeyTooLarge { len: 3, max: 2 },
            KvError::ValueTooLarge { len: 5, max: 4 },
            KvError::TransactionTooLarge { len: 7, max: 6 },
            KvError::Transient {
                code: 1009,
                message: "future version".into(),
            },
            KvError::InvalidRange,
            KvError::Engine("disk".into()),
        ];
        for err in errors {
            assert_eq!(from_wire(to_wire(err.clone())), err);
        }
    }

    #[test]
    fn service_errors_are_retryable() {
        for err in [
            WireKvError::UnknownTransaction { txn: 1 },
            WireKvError::TooManyTransactions { max: 1 },
        ] {
            assert!(from_wire(err).is_retryable());
        }
    }

    #[test]
    fn commit_failures_map_by_whether_the_request_may_have_run() {
        let method = "kv.Commit";
        let cases = [
            (
                RpcError::Connect {
                    method,
                    addr: addr(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                },
                "transient",
            ),
            (
                RpcError::ConnectionLost {
                    method,
                    addr: addr(),
                },
                "maybe",
            ),
            (
                RpcError::Timeout {
                    method,
                    addr: addr(),
                    after: Duration::from_secs(1),
                },
                "maybe",
            ),
            (
                RpcError::Remote {
                    method,
                    addr: addr(),
                    code: ErrorCode::BadRequest,
                    message: String::new(),
                },
                "engine",
            ),
        ];
        for (err, want) in cases {
            let got = match rpc_commit(err) {
                KvError::MaybeCommitted => "maybe",
                KvError::Transient { .. } => "transient",
                KvError::Engine(_) => "engine",
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(got, want);
        }
    }
}
