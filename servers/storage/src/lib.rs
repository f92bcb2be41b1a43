//! Chunk storage on one node: the local chunk engine ([`chunk`]) and CRAQ
//! chain replication over it ([`craq`]).
//!
//! Never opens the namespace or edits chains; routing comes from mgmtd.

pub mod chunk;
pub mod craq;
pub mod node;
