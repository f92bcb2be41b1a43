//! RPC over the r3fs wire format: transports, the server [`Router`] and
//! [`RpcServer`], and the pooled, multiplexing [`RpcClient`].
//!
//! Never defines bytes on the network (that is `r3fs-wire`: frames, bodies,
//! method ids) and never knows what a method means; services register
//! handlers and callers name a [`Method`](r3fs_wire::Method).
//!
//! # Design
//! - [`transport`]: a [`Transport`] connects and binds byte streams. TCP
//!   ([`TcpTransport`], `TCP_NODELAY` on) is the default and the only one built
//!   today. An RDMA transport (`ibverbs`, behind a cargo feature) plugs in as
//!   another `Transport` impl whose `Stream` is an `AsyncRead + AsyncWrite` over
//!   queue pairs; [`RpcServer::bind_with`] and [`RpcClient::with_transport`]
//!   take any transport, so callers do not change.
//! - Server: per connection one reader task (decodes frames, enforces read
//!   timeouts; payloads of 64 KiB and more land in aligned, pooled buffers,
//!   see [`payload`]), one spawned task per request (bounded by
//!   `ServerConfig::in_flight_max`), and one writer task that batches all
//!   queued responses into as few writes as possible.
//! - Client: per address a pool of `ClientConfig::connections_per_addr`
//!   connections; each multiplexes calls by request id with one reader and one
//!   batching writer task. A broken connection fails all its pending calls at
//!   once and is replaced on the next call.
//! - Same host: a client opening a connection offers a shared-memory
//!   region and asks for one ([`shared`], handshake in `r3fs_wire::share`);
//!   where both ends map each other's, payloads of 64 KiB and more go
//!   through a region's slots instead of the stream, both ways, with a
//!   copy on each side and no TCP work per byte. Elsewhere the offer is
//!   refused and nothing changes (`ClientConfig::share_payloads`,
//!   `ServerConfig::share_payloads` turn it off).
//!
//! # Limits
//! - Frames: [`FrameLimits`](r3fs_wire::frame::FrameLimits) on both sides.
//! - Server: [`IN_FLIGHT_MAX`] requests per connection, [`CONNECTIONS_MAX`]
//!   connections, [`FRAME_READ_TIMEOUT`] per frame, [`IDLE_TIMEOUT`] per idle
//!   connection, [`DRAIN_TIMEOUT`] on shutdown.
//! - Client: [`WRITE_QUEUE_FRAMES_MAX`] queued frames per connection,
//!   [`RETRY_ATTEMPTS_MAX`] attempts by default, [`CALL_TIMEOUT`] per attempt.
//! - Writers: at most [`WRITE_BATCH_BYTES_MAX`] per batched write.

mod client;
mod error;
mod frame_reader;
mod io;
pub mod payload;
mod server;
pub mod shared;
pub mod transport;

pub use client::{
    CallOptions, ClientConfig, RetryPolicy, RpcClient, BACKOFF_INITIAL, BACKOFF_MAX, CALL_TIMEOUT,
    CONNECTIONS_PER_ADDR, CONNECT_TIMEOUT, RETRY_ATTEMPTS_MAX, WRITE_QUEUE_FRAMES_MAX,
};
pub use error::RpcError;
pub use io::WRITE_BATCH_BYTES_MAX;
pub use server::{
    CallContext, Router, RpcServer, ServerConfig, CONNECTIONS_MAX, DRAIN_TIMEOUT,
    FRAME_READ_TIMEOUT, IDLE_TIMEOUT, IN_FLIGHT_MAX,
};
pub use transport::{Listener, TcpTransport, Transport};
