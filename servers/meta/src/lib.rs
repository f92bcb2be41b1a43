//! The meta service: stateless servers that turn POSIX namespace operations
//! into transactions on the KV engine.
//!
//! Owns the metadata schema ([`schema`]) and its rules: permission checks
//! ([`perm`]), inode id allocation ([`alloc`]), and every operation
//! ([`MetaStore`]). Holds no state of its own beyond a block of free inode ids,
//! so any number of meta servers can serve one namespace; conflicts are settled
//! by the engine's serializable transactions.
//!
//! Must not touch chunk data (storage owns it) or chain routing (mgmtd owns it);
//! it only records a file's layout and queues removed files for storage's GC.
//!
//! # Limits
//! Names up to 255 bytes, symlink targets up to 4096 bytes, xattr values up to
//! 64 KiB and [`store::XATTRS_PER_INODE_MAX`] xattrs per inode, at most
//! [`store::LINKS_MAX`] hard links, readdir pages of at most 4096 entries,
//! [`store::LOCKS_PER_INODE_MAX`] lock ranges of each kind per inode (then
//! ENOLCK).
//!
//! # Locks
//! flock and POSIX record locks live in the KV store (see [`schema`]) under
//! per-client leases, so they are shared by every mount; a client's locks die
//! with its lease. Meta never waits for a lock: conflicts answer EAGAIN.

pub mod alloc;
pub mod clock;
pub mod config;
pub mod error;
pub mod perm;
pub mod schema;
pub mod server;
pub mod store;

pub use config::MetaConfig;
pub use error::MetaError;
pub use store::MetaStore;
