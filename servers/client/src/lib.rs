//! Client libraries for r3fs services, used by the FUSE daemon, the CLI,
//! benchmarks and interop.
//!
//! [`MetaClient`] picks a meta server, fails over between servers, and walks
//! paths; [`MgmtClient`] finds the primary mgmtd, and [`RoutingWatcher`]
//! keeps the newest routing info. Both share [`failover`]. Must not reach into server crates: it speaks only the wire protocol
//! through `r3fs-net`.

pub mod failover;
pub mod gc;
pub mod meta;
pub mod mgmt;
pub mod storage;

pub use failover::ClientError;
pub use meta::{MetaClient, MetaClientConfig, MetaClientError};
pub use mgmt::{MgmtClient, RoutingWatcher};
pub use storage::{StorageClient, StorageClientError};
