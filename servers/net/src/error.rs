//! What a call can fail with, phrased for an operator.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use r3fs_wire::body::BodyError;
use r3fs_wire::frame::FrameError;
use r3fs_wire::ErrorCode;

/// Why [`crate::RpcClient::call`] failed. Every variant names the method and
/// the server address.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{method}: connect to {addr} failed: {source}")]
    Connect {
        method: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{method} to {addr} timed out after {after:?}")]
    Timeout {
        method: &'static str,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("{method} to {addr}: connection lost")]
    ConnectionLost {
        method: &'static str,
        addr: SocketAddr,
    },
    #[error("{method} at {addr} failed: {code:?}: {message}")]
    Remote {
        method: &'static str,
        addr: SocketAddr,
        code: ErrorCode,
        message: String,
    },
    /// The server left the response payload's CRC to the body, but the
    /// method's callers do not check one: nothing would check the payload.
    #[error("{method} from {addr}: response payload without a CRC to check it by")]
    UncheckedPayload {
        method: &'static str,
        addr: SocketAddr,
    },
    #[error("{method} from {addr}: undecodable response: {source}")]
    Decode {
        method: &'static str,
        addr: SocketAddr,
        #[source]
        source: BodyError,
    },
    #[error("{method} to {addr}: request not sendable: {source}")]
    Frame {
        method: &'static str,
        addr: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("{method} to {addr} failed after {attempts} attempts: {last}")]
    RetriesExhausted {
        method: &'static str,
        addr: SocketAddr,
        attempts: u32,
        last: Box<RpcError>,
    },
}

impl RpcError {
    /// The errno of a remote [`ErrorCode::Errno`] failure.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RpcError::Remote {
                code: ErrorCode::Errno(errno),
                ..
            } => Some(*errno),
            RpcError::RetriesExhausted { last, .. } => last.errno(),
            _ => None,
        }
    }

    /// The remote error code, if the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RpcError::Remote { code, .. } => Some(*code),
            RpcError::RetriesExhausted { last, .. } => last.code(),
            _ => None,
        }
    }
}
