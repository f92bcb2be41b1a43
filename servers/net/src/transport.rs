//! Byte-stream transports under the RPC layer: connect, bind, accept.
//!
//! A transport knows nothing of frames; it hands out ordered, reliable byte
//! streams. TCP is the default. RDMA would be a second impl of [`Transport`]
//! (behind a cargo feature), exposing its queue pairs as an
//! `AsyncRead + AsyncWrite` stream.
//!
//! # Limits
//! None here; connection counts are limited by the server.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// Connects to and listens on addresses, yielding byte streams.
pub trait Transport: Clone + Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Listener: Listener<Stream = Self::Stream>;

    /// Opens a stream to `addr`.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;

    /// Listens on `addr` (port 0 picks a free port).
    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Whether both ends of `stream` are on this host, so payloads may go
    /// through shared memory (`crate::shared`). `false` when unknown.
    fn same_host(_stream: &Self::Stream) -> bool {
        false
    }
}

/// The accepting side of a [`Transport`].
pub trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next incoming stream and its peer address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;

    /// The address actually bound.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// As [`Transport::same_host`], for an accepted stream.
    fn same_host(_stream: &Self::Stream) -> bool {
        false
    }
}

/// TCP with `TCP_NODELAY` on both ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpTransport;

impl Transport for TcpTransport {
    type Stream = TcpStream;
    type Listener = TcpTransportListener;

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    fn same_host(stream: &TcpStream) -> bool {
        tcp_same_host(stream)
    }

    async fn bind(&self, addr: SocketAddr) -> io::Result<TcpTransportListener> {
        // tokio sets SO_REUSEADDR on Unix, so a restarted server rebinds its port.
        Ok(TcpTransportListener {
            listener: TcpListener::bind(addr).await?,
        })
    }
}

/// A bound TCP listener from [`TcpTransport::bind`].
#[derive(Debug)]
pub struct TcpTransportListener {
    listener: TcpListener,
}

impl Listener for TcpTransportListener {
    type Stream = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = self.listener.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    fn same_host(stream: &TcpStream) -> bool {
        tcp_same_host(stream)
    }
}

/// Loopback, or a connection to this host's own address (the kernel then
/// uses that address as the source too).
fn tcp_same_host(stream: &TcpStream) -> bool {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => peer.ip().is_loopback() || local.ip() == peer.ip(),
        _ => false,
    }
}
