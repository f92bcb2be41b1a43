//! mgmtd: cluster membership, the primary lease, routing info, chain and
//! target states, and client sessions.
//!
//! Several mgmtd instances share one KV engine; the one holding the lease
//! ([`lease`]) is primary and every state change it makes is fenced by that
//! lease. Chain and target states follow 3FS and are decided by a pure state
//! machine ([`chain`]). Routing info is versioned and reaches nodes and
//! clients by long poll ([`service`]).
//!
//! Must not touch chunk data, the namespace, or the storage nodes themselves:
//! it only decides and publishes states from what nodes report.
//!
//! # Limits
//! See [`service`]: long polls, chain settling steps; and [`lease::STEP_DOWN_MARGIN`].

pub mod chain;
pub mod config;
pub mod error;
pub mod lease;
pub mod schema;
pub mod server;
pub mod service;

pub use config::MgmtdConfig;
pub use error::MgmtdError;
pub use service::Mgmtd;
