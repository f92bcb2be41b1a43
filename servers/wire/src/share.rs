//! The RPC layer's own methods (ids `0x00xx`): the handshake by which two
//! processes on one host agree to pass large payloads through shared
//! memory instead of the byte stream (frame bit 3, see [`crate::frame`]).
//!
//! 1. The caller offers the region it will put request payloads in
//!    ([`ShareRegion`]), and may ask for one for the answers.
//! 2. The server maps the caller's region if it can (same host, same
//!    user) and from then on resolves the caller's shared payloads; it
//!    answers whether it did, and offers a region of its own if asked and
//!    it mapped the caller's.
//! 3. The caller, once it mapped the server's region, says so
//!    ([`ConfirmShared`]); only after reading that does the server put
//!    answer payloads in it.
//!
//! A server that does not know these methods answers `UnknownMethod`, and
//! both sides keep the byte stream: nothing depends on the handshake.

use serde::{Deserialize, Serialize};

use crate::method::Method;

/// A region one process offers its peer: enough for the peer to find the
/// memory (`/proc/<pid>/fd/<fd>` of a memfd) and to prove it found the
/// right one (`token`, also written at the region's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionOffer {
    pub pid: u32,
    pub fd: i32,
    pub token: u128,
    pub slots: u32,
    pub slot_bytes: u32,
}

/// The caller's side of step 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRequest {
    /// The region request payloads will come from.
    pub offer: RegionOffer,
    /// Whether the caller wants a region for answer payloads too.
    pub wants_answers: bool,
}

/// The server's answer to step 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareAnswer {
    /// `None`: the server mapped the caller's region and takes shared
    /// request payloads from now on; otherwise why not.
    pub refused: Option<String>,
    /// The server's region for answer payloads, if asked for and the
    /// caller's region was mapped.
    pub offer: Option<RegionOffer>,
}

/// Id of [`ShareRegion`].
pub const SHARE_REGION_ID: u16 = 0x0001;
/// Id of [`ConfirmShared`].
pub const CONFIRM_SHARED_ID: u16 = 0x0002;

/// Step 1 and 2 of the handshake.
pub struct ShareRegion;

impl Method for ShareRegion {
    const ID: u16 = SHARE_REGION_ID;
    const NAME: &'static str = "rpc.ShareRegion";
    type Request = ShareRequest;
    type Response = ShareAnswer;
}

/// Step 3: the caller mapped the server's region (its token, as a check).
pub struct ConfirmShared;

impl Method for ConfirmShared {
    const ID: u16 = CONFIRM_SHARED_ID;
    const NAME: &'static str = "rpc.ConfirmShared";
    type Request = u128;
    type Response = bool;
}
