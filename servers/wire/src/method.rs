//! Method ids and the error body every failed call answers with.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// One RPC method: its id on the wire and its request and response bodies.
///
/// Ids are grouped by service: `0x00xx` reserved for the RPC layer itself,
/// `0x01xx` mgmtd, `0x02xx` meta, `0x03xx` storage. An id never changes meaning.
pub trait Method: Send + Sync + 'static {
    const ID: u16;
    const NAME: &'static str;
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The request body carries the CRC32C of the request payload and the
    /// handler checks the payload against it, so the frame layer leaves the
    /// payload unchecksummed (see [`crate::frame`]). A method that sets this
    /// must reject a payload whose CRC does not match, on every path.
    const PAYLOAD_CRC_IN_BODY: bool = false;
    /// The response body carries the CRC32C of the response payload and
    /// every caller checks the payload against it, so a caller may ask the
    /// server's frame layer to leave the response payload unchecksummed (see
    /// [`crate::frame`]). A method that sets this must have every caller
    /// check the payload, and a caller refuses an unchecksummed payload of a
    /// method that does not set it.
    const RESPONSE_PAYLOAD_CRC_IN_BODY: bool = false;
}

/// Why a call failed, as the server says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A POSIX errno from the service (ENOENT, EEXIST, ...).
    Errno(i32),
    /// The server has no handler for the method id.
    UnknownMethod,
    /// The request body did not decode as the method's request type.
    BadRequest,
    /// The server is shutting down or overloaded; try another server or later.
    Unavailable,
    /// The server gave up on the request after its deadline.
    Timeout,
    /// The service failed in a way it could not express better; see the message.
    Internal,
}

impl ErrorCode {
    /// Whether retrying the same request (possibly on another server) may help.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::Timeout)
    }
}

/// The body of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}
