//! The KV engine as a network service: [`KvServer`] serves any
//! [`KvEngine`](r3fs_kv::KvEngine) over RPC, and [`RemoteEngine`] is a
//! `KvEngine` that talks to it, so callers do not change.
//!
//! Never interprets keys or values and never stores anything itself: data
//! lives in the engine the server wraps. Only one server may own a data
//! directory; several r3fs processes share one store by all talking to that
//! one server.
//!
//! # Design
//! Transactions live on the server (one engine transaction per client
//! transaction, in a map by random id). The client buffers writes and
//! read-conflict ranges and sends them with the next read or the commit, so a
//! read-modify-write costs one round trip for `begin`, one per read and one
//! for the commit; read-your-writes is done by the server's engine. Messages
//! are in [`r3fs_wire::kv`]; KV errors travel inside the response body
//! (`Result<T, WireKvError>`), never as an RPC error.
//!
//! # Use
//! A server process calls [`serve`] (or [`KvServer::register`] on its own
//! router); clients build a [`RemoteEngine`] and use it as any `KvEngine`,
//! from plain threads or tokio's blocking pool (it runs its own small runtime
//! and blocks the calling thread on each call). `Begin` is retried like the
//! other idempotent calls, so a lost answer can leave an unused transaction on
//! the server until the idle reaper aborts it.
//!
//! # Errors the client adds
//! All are [`KvError::Transient`](r3fs_kv::KvError::Transient) (retryable by
//! [`r3fs_kv::run`]) unless said otherwise, with these codes:
//! - [`CODE_UNKNOWN_TRANSACTION`]: the server no longer holds the transaction
//!   (idle-aborted or restarted); nothing of it was committed.
//! - [`CODE_TOO_MANY_TRANSACTIONS`]: the server is at [`TRANSACTIONS_OPEN_MAX`].
//! - [`CODE_UNREACHABLE`]: the call failed in transport before commit.
//! - A commit whose request may have reached the server and whose answer was
//!   lost reports `KvError::MaybeCommitted`.
//!
//! # Limits
//! - Server: [`TRANSACTIONS_OPEN_MAX`] open transactions, each aborted after
//!   [`TRANSACTION_IDLE_TIMEOUT`] without a call; a range page holds at most
//!   [`RANGE_PAGE_ROWS_MAX`] pairs and [`RANGE_PAGE_BYTES_MAX`] bytes.
//! - Client: key, value and transaction sizes per `r3fs_kv`; buffered
//!   mutations are flushed once they reach [`MUTATIONS_BATCH_BYTES_MAX`];
//!   every call is bounded by [`CALL_TIMEOUT`] per attempt and
//!   [`CALL_ATTEMPTS_MAX`] attempts.

mod client;
mod convert;
mod server;

pub use client::{
    RemoteConfig, RemoteEngine, CALL_ATTEMPTS_MAX, CALL_TIMEOUT, MUTATIONS_BATCH_BYTES_MAX,
    RUNTIME_WORKER_THREADS,
};
pub use convert::{CODE_TOO_MANY_TRANSACTIONS, CODE_UNKNOWN_TRANSACTION, CODE_UNREACHABLE};
pub use server::{
    serve, KvServer, KvServerConfig, KvServerStats, RANGE_PAGE_BYTES_MAX, RANGE_PAGE_ROWS_MAX,
    TRANSACTIONS_OPEN_MAX, TRANSACTION_IDLE_TIMEOUT,
};
