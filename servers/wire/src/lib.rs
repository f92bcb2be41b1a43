//! Everything r3fs puts on the network, and nothing else: the frame format
//! ([`frame`]), how bodies are encoded ([`body`]), the method registry
//! ([`method`]), the RPC layer's shared-memory handshake ([`share`]), and
//! each service's request and response types ([`kv`], [`meta`], [`mgmt`],
//! [`storage`]).
//!
//! No sockets, no async runtime, no retries: that is `r3fs-net`. A change here
//! changes the protocol, so it gets the strictest review.

pub mod body;
pub mod frame;
pub mod kv;
pub mod meta;
pub mod method;
pub mod mgmt;
pub mod share;
pub mod storage;

pub use method::{ErrorBody, ErrorCode, Method};
