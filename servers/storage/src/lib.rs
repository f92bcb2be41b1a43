//! Chunk storage on one node: the local chunk engine ([`chunk`]) and CRAQ
//! chain replication over it ([`craq`]); [`crc`] combines the CRC32Cs of
//! adjacent blocks for the engine, and [`data_file`] moves its blocks to
//! and from disk.
//!
//! Never opens the namespace or edits chains; routing comes from mgmtd.

pub mod chunk;
pub mod chunk_locks;
pub mod craq;
pub mod crc;
pub mod data_file;
pub mod node;

/// `e` and the errors under it, outermost first: what an operator needs to
/// see of a failed disk or store.
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
