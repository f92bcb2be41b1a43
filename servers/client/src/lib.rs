//! Client libraries for r3fs services, used by the FUSE daemon, the CLI,
//! benchmarks and interop.
//!
//! [`MetaClient`] picks a meta server, fails over between servers, and walks
//! paths. Must not reach into server crates: it speaks only the wire protocol
//! through `r3fs-net`.

pub mod meta;

pub use meta::{MetaClient, MetaClientConfig, MetaClientError};
