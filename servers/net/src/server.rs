//! The RPC server: a [`Router`] of handlers per method, and [`RpcServer`]
//! accepting connections and running them.
//!
//! The server answers the RPC layer's own shared-memory handshake
//! (`r3fs_wire::share`, [`crate::shared`]) itself, never through the router.
//!
//! Never interprets request bodies beyond decoding them as the registered
//! method's request type.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use parking_lot::Mutex;
use r3fs_wire::body;
use r3fs_wire::frame::{Frame, FrameKind, FrameLimits};
use r3fs_wire::share::{
    ConfirmShared, ShareAnswer, ShareRegion, ShareRequest, CONFIRM_SHARED_ID, SHARE_REGION_ID,
};
use r3fs_wire::{ErrorBody, ErrorCode, Method};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::frame_reader::FrameReader;
use crate::io::write_frames;
use crate::shared::{RegionCell, SharedRegion, REGION_SLOTS, SLOT_BYTES};
use crate::transport::{Listener, TcpTransport, Transport};

/// Default requests running at once per connection; the reader stops
/// reading while this many are in flight.
pub const IN_FLIGHT_MAX: usize = 256;
/// Default connections served at once; more are accepted and closed.
pub const CONNECTIONS_MAX: usize = 4096;
/// Default time from a frame's first byte to its last.
pub const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection with nothing in flight may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default time [`RpcServer::shutdown`] waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (such as EMFILE) before accepting again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Responses queued for the writer beyond the in-flight ones (error answers
/// from the reader itself).
const WRITE_QUEUE_SLACK_FRAMES: usize = 16;

/// Server tuning; [`Default`] gives the named constants.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub frame_limits: FrameLimits,
    /// Time from a frame's first byte to its last before the connection closes.
    pub frame_read_timeout: Duration,
    /// Time a connection with nothing in flight may send nothing.
    pub idle_timeout: Duration,
    /// Time [`RpcServer::shutdown`] waits for in-flight requests.
    pub drain_timeout: Duration,
    pub in_flight_max: usize,
    pub connections_max: usize,
    /// Accept clients' offers of shared-memory payload regions (possible
    /// only for clients on this host, run by the same user).
    pub share_payloads: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            frame_limits: FrameLimits::default(),
            frame_read_timeout: FRAME_READ_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            drain_timeout: DRAIN_TIMEOUT,
            in_flight_max: IN_FLIGHT_MAX,
            connections_max: CONNECTIONS_MAX,
            share_payloads: true,
        }
    }
}

/// What a handler learns about its call besides the request body.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub peer: SocketAddr,
    pub request_id: u64,
    /// Bulk data sent after the body; empty for most methods.
    pub payload: Bytes,
}

/// A handler's answer: encoded response body and payload, or an error body.
type Reply = Result<(Bytes, Bytes), ErrorBody>;
type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;
type Handler = Arc<dyn Fn(Bytes, CallContext) -> ReplyFuture + Send + Sync>;

struct Route {
    name: &'static str,
    handler: Handler,
    /// `Method::PAYLOAD_CRC_IN_BODY`: the handler checks its payload itself.
    payload_crc_in_body: bool,
    /// `Method::RESPONSE_PAYLOAD_CRC_IN_BODY`: callers check the answer's
    /// payload against its body.
    response_crc_in_body: bool,
}

/// Handlers by method id.
#[derive(Default)]
pub struct Router {
    routes: HashMap<u16, Route>,
}

impl Router {
    pub fn new() -> Self {
        Router::default()
    }

    /// Registers the handler for `M`. Panics if `M::ID` already has one.
    pub fn register<M, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        M: Method,
        F: Fn(M::Request, CallContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Response, ErrorBody>> + Send + 'static,
    {
        self.insert::<M>(Arc::new(move |body: Bytes, ctx: CallContext| {
            let req = match decode_request::<M>(&body) {
                Ok(req) => req,
                Err(e) => return Box::pin(std::future::ready(Err(e))) as ReplyFuture,
            };
            let fut = handler(req, ctx);
            Box::pin(async move { fut.await.map(|resp| (body::encode(&resp), Bytes::new())) })
        }))
    }

    /// Registers the handler for `M`, which reads the request payload from
    /// [`CallContext::payload`] and answers with a payload too. Panics if
    /// `M::ID` already has a handler.
    pub fn register_with_payload<M, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        M: Method,
        F: Fn(M::Request, CallContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(M::Response, Bytes), ErrorBody>> + Send + 'static,
    {
        self.insert::<M>(Arc::new(move |body: Bytes, ctx: CallContext| {
            let req = match decode_request::<M>(&body) {
                Ok(req) => req,
                Err(e) => return Box::pin(std::future::ready(Err(e))) as ReplyFuture,
            };
            let fut = handler(req, ctx);
            Box::pin(async move {
                fut.await
                    .map(|(resp, payload)| (body::encode(&resp), payload))
            })
        }))
    }

    fn insert<M: Method>(&mut self, handler: Handler) -> &mut Self {
        assert!(
            M::ID != SHARE_REGION_ID && M::ID != CONFIRM_SHARED_ID,
            "method id {:#06x} ({}) is the RPC layer's own, answered before any route",
            M::ID,
            M::NAME
        );
        let route = Route {
            name: M::NAME,
            handler,
            payload_crc_in_body: M::PAYLOAD_CRC_IN_BODY,
            response_crc_in_body: M::RESPONSE_PAYLOAD_CRC_IN_BODY,
        };
        let previous = self.routes.insert(M::ID, route);
        assert!(
            previous.is_none(),
            "method id {:#06x} ({}) registered twice",
            M::ID,
            M::NAME
        );
        self
    }
}

fn decode_request<M: Method>(body: &[u8]) -> Result<M::Request, ErrorBody> {
    body::decode::<M::Request>(body).map_err(|e| ErrorBody {
        code: ErrorCode::BadRequest,
        message: format!("{}: bad request body: {e}", M::NAME),
    })
}

/// A running server. Dropping it stops accepting and closes connections
/// without waiting; [`RpcServer::shutdown`] drains first.
pub struct RpcServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl RpcServer {
    /// Binds a TCP listener on `addr` and starts serving `router`.
    pub async fn bind(
        addr: SocketAddr,
        router: Router,
        config: ServerConfig,
    ) -> io::Result<RpcServer> {
        RpcServer::bind_with(TcpTransport, addr, router, config).await
    }

    /// Like [`RpcServer::bind`] over any transport.
    pub async fn bind_with<T: Transport>(
        transport: T,
        addr: SocketAddr,
        router: Router,
        config: ServerConfig,
    ) -> io::Result<RpcServer> {
        let listener = transport.bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared { router, config });
        let accept_task = tokio::spawn(accept_loop(listener, shared, stop_rx));
        Ok(RpcServer {
            local_addr,
            stop,
            accept_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish and their answers go
    /// out (up to the drain timeout), then closes every connection.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.accept_task.await {
            tracing::warn!(addr = %self.local_addr, error = %e, "rpc server accept task failed");
        }
    }
}

struct Shared {
    router: Router,
    config: ServerConfig,
}

async fn accept_loop<L: Listener>(
    mut listener: L,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= shared.config.connections_max {
                        tracing::warn!(%peer, max = shared.config.connections_max, "too many connections, closing new one");
                        continue;
                    }
                    let same_host = L::same_host(&stream);
                    connections.spawn(serve_connection(stream, peer, same_host, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(shared.config.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "drain timeout, closing connections with requests in flight"
        );
        connections.shutdown().await;
    }
}

/// Aborts a task when dropped, so a connection never leaves its writer behind.
struct AbortOnDrop(tokio::task::JoinHandle<io::Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a connection's read side ended.
enum ReadEnd {
    /// EOF, idle, or shutdown: finish in-flight requests and flush answers.
    Graceful,
    /// Bad or stalled input: close at once.
    Fatal,
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    same_host: bool,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let in_flight_max = shared.config.in_flight_max;
    let (tx, rx) = mpsc::channel(in_flight_max + WRITE_QUEUE_SLACK_FRAMES);
    let out_region = RegionCell::default();
    let mut writer = AbortOnDrop(tokio::spawn(write_frames(wr, rx, out_region.clone())));
    let mut conn = Connection {
        peer,
        shared,
        tx,
        in_flight: Arc::new(Semaphore::new(in_flight_max)),
        stop,
        same_host,
        in_region: RegionCell::default(),
        out_region,
        offered: Mutex::new(None),
        share_asked: Default::default(),
    };
    match conn.read_loop(rd).await {
        ReadEnd::Fatal => {}
        ReadEnd::Graceful => {
            let permits = u32::try_from(in_flight_max).unwrap_or(u32::MAX);
            let in_flight = conn.in_flight.clone();
            let _all = in_flight.acquire_many(permits).await;
            drop(conn);
            match (&mut writer.0).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "write failed"),
                // The runtime is shutting down: nothing went wrong.
                Err(e) if e.is_cancelled() => {
                    tracing::debug!(%peer, "writer task cancelled at shutdown")
                }
                Err(e) => tracing::warn!(%peer, error = %e, "writer task failed"),
            }
        }
    }
}

struct Connection {
    peer: SocketAddr,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Frame>,
    in_flight: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    /// Whether the client is on this host (see `Transport::same_host`).
    same_host: bool,
    /// The client's region for request payloads, once mapped here.
    in_region: RegionCell,
    /// This server's region for answer payloads, once the client confirmed
    /// it mapped it.
    out_region: RegionCell,
    /// This server's region offered to the client, not yet confirmed.
    offered: Mutex<Option<SharedRegion>>,
    /// The client asked to share regions (once per connection).
    share_asked: std::sync::atomic::AtomicBool,
}

impl Connection {
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, mut rd: R) -> ReadEnd {
        let peer = self.peer;
        let config = &self.shared.config;
        let mut reader = FrameReader::with_region(config.frame_limits, self.in_region.clone());
        let mut last_read = Instant::now();
        // When the first byte of the frame now being read arrived.
        let mut frame_started = last_read;
        let sleep = tokio::time::sleep_until(last_read + config.idle_timeout);
        tokio::pin!(sleep);
        if *self.stop.borrow_and_update() {
            return ReadEnd::Graceful;
        }
        loop {
            let mut decoded = false;
            loop {
                match reader.try_frame() {
                    Ok(Some(frame)) => {
                        decoded = true;
                        if let Err(end) = self.dispatch(frame).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "closing connection: bad frame");
                        return ReadEnd::Fatal;
                    }
                }
            }
            if decoded {
                frame_started = last_read;
            }
            let was_empty = !reader.is_mid_frame();
            let deadline = if was_empty {
                last_read + config.idle_timeout
            } else {
                frame_started + config.frame_read_timeout
            };
            sleep.as_mut().reset(deadline);
            tokio::select! {
                biased;
                _ = self.stop.changed() => return ReadEnd::Graceful,
                () = &mut sleep => {
                    if !was_empty {
                        tracing::warn!(%peer, timeout = ?config.frame_read_timeout, buffered = reader.buffered(), "closing connection: frame read timed out");
                        return ReadEnd::Fatal;
                    }
                    if self.in_flight.available_permits() < config.in_flight_max {
                        last_read = Instant::now();
                        continue;
                    }
                    tracing::debug!(%peer, "closing idle connection");
                    return ReadEnd::Graceful;
                }
                read = reader.fill(&mut rd) => match read {
                    Ok(0) if was_empty => return ReadEnd::Graceful,
                    Ok(0) => {
                        tracing::warn!(%peer, buffered = reader.buffered(), "closing connection: stream ended inside a frame");
                        return ReadEnd::Fatal;
                    }
                    Ok(_) => {
                        last_read = Instant::now();
                        if was_empty {
                            frame_started = last_read;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "closing connection: read failed");
                        return ReadEnd::Fatal;
                    }
                },
            }
        }
    }

    /// Starts one request; answers unknown methods itself.
    async fn dispatch(&self, frame: Frame) -> Result<(), ReadEnd> {
        let peer = self.peer;
        if frame.kind != FrameKind::Request {
            tracing::warn!(%peer, kind = ?frame.kind, "closing connection: peer sent a response frame");
            return Err(ReadEnd::Fatal);
        }
        match frame.msg_type {
            SHARE_REGION_ID => return self.share_region(frame).await,
            CONFIRM_SHARED_ID => return self.confirm_shared(frame).await,
            _ => {}
        }
        let Some(route) = self.shared.router.routes.get(&frame.msg_type) else {
            tracing::debug!(%peer, msg_type = frame.msg_type, "unknown method");
            let error = ErrorBody {
                code: ErrorCode::UnknownMethod,
                message: format!("no handler for method id {:#06x}", frame.msg_type),
            };
            let answer = error_frame(frame.msg_type, frame.request_id, &error);
            return self.tx.send(answer).await.map_err(|_| ReadEnd::Fatal);
        };
        // Bit 2 leaves the request payload's CRC to the handler, which only
        // a handler that checks it may take; on an empty request of a method
        // whose answers carry their CRC, it asks for such an answer.
        let asks_crc_in_answer = route.response_crc_in_body && frame.payload.is_empty();
        if frame.payload_crc_in_body && !route.payload_crc_in_body && !asks_crc_in_answer {
            // Nobody would check this payload: refuse it unread.
            tracing::warn!(%peer, method = route.name, "refusing a request whose payload CRC is left to a handler that does not check it");
            let error = ErrorBody {
                code: ErrorCode::BadRequest,
                message: format!(
                    "{}: the payload CRC must be in the frame header for this method",
                    route.name
                ),
            };
            let answer = error_frame(frame.msg_type, frame.request_id, &error);
            return self.tx.send(answer).await.map_err(|_| ReadEnd::Fatal);
        }
        let permit = match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => self
                .in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ReadEnd::Fatal)?,
        };
        let handler = route.handler.clone();
        let name = route.name;
        let response_crc_in_body = route.response_crc_in_body && frame.payload_crc_in_body;
        let tx = self.tx.clone();
        let limits = self.shared.config.frame_limits;
        let Frame {
            msg_type,
            request_id,
            body,
            payload,
            ..
        } = frame;
        let ctx = CallContext {
            peer,
            request_id,
            payload,
        };
        tokio::spawn(async move {
            let reply = AssertUnwindSafe(async move { handler(body, ctx).await })
                .catch_unwind()
                .await;
            let answer = answer_frame(
                (msg_type, request_id, name),
                response_crc_in_body,
                peer,
                limits,
                reply,
            );
            let _ = tx.send(answer).await;
            drop(permit);
        });
        Ok(())
    }
}

impl Connection {
    /// Step 2 of the shared-memory handshake: maps the client's region if
    /// it can and offers one of this server's if asked.
    async fn share_region(&self, frame: Frame) -> Result<(), ReadEnd> {
        let answer = match body::decode::<ShareRequest>(&frame.body) {
            Ok(request) => Ok(body::encode(&self.answer_share(request))),
            Err(e) => Err(ErrorBody {
                code: ErrorCode::BadRequest,
                message: format!("{}: bad request body: {e}", ShareRegion::NAME),
            }),
        };
        self.send_setup_answer(&frame, answer).await
    }

    fn answer_share(&self, request: ShareRequest) -> ShareAnswer {
        let peer = self.peer;
        let refuse = |reason: String| ShareAnswer {
            refused: Some(reason),
            offer: None,
        };
        // Reasons go to a peer that may be anyone: they say nothing about
        // this host; the detail stays in this log.
        if !self.shared.config.share_payloads || !crate::shared::allowed_by_env() {
            return refuse("this server keeps payloads on the stream".to_string());
        }
        if !self.same_host {
            return refuse("the client is not on this server's host".to_string());
        }
        if self
            .share_asked
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return refuse("this connection asked to share a region already".to_string());
        }
        let region = match SharedRegion::attach(&request.offer) {
            Ok(region) => region,
            Err(reason) => {
                tracing::debug!(%peer, reason, "not mapping a client's payload region");
                return refuse("the offered region cannot be mapped here".to_string());
            }
        };
        let _ = self.in_region.set(region);
        let offer = match request.wants_answers {
            false => None,
            true => match SharedRegion::create(REGION_SLOTS, SLOT_BYTES) {
                Ok(own) => {
                    let offer = own.offer();
                    *self.offered.lock() = Some(own);
                    Some(offer)
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no payload region for answers");
                    None
                }
            },
        };
        tracing::debug!(%peer, answers = offer.is_some(), "client's payloads come through shared memory");
        ShareAnswer {
            refused: None,
            offer,
        }
    }

    /// Step 3: the client mapped the region offered to it, so answers may
    /// go through it from now on (it reads them after this frame).
    async fn confirm_shared(&self, frame: Frame) -> Result<(), ReadEnd> {
        let answer = match body::decode::<u128>(&frame.body) {
            Ok(token) => {
                let mut offered = self.offered.lock();
                match offered.take() {
                    Some(own) if own.offer().token == token => {
                        own.peer_mapped();
                        let _ = self.out_region.set(own);
                        Ok(body::encode(&true))
                    }
                    other => {
                        *offered = other;
                        Ok(body::encode(&false))
                    }
                }
            }
            Err(e) => Err(ErrorBody {
                code: ErrorCode::BadRequest,
                message: format!("{}: bad request body: {e}", ConfirmShared::NAME),
            }),
        };
        self.send_setup_answer(&frame, answer).await
    }

    /// Queues the answer (an encoded body, or an error) to a setup call.
    async fn send_setup_answer(
        &self,
        frame: &Frame,
        answer: Result<Bytes, ErrorBody>,
    ) -> Result<(), ReadEnd> {
        let reply = match answer {
            Ok(body) => Frame {
                kind: FrameKind::Response,
                msg_type: frame.msg_type,
                request_id: frame.request_id,
                body,
                payload: Bytes::new(),
                payload_crc_in_body: false,
            },
            Err(error) => error_frame(frame.msg_type, frame.request_id, &error),
        };
        self.tx.send(reply).await.map_err(|_| ReadEnd::Fatal)
    }
}

/// The frame answering request `request_id` of method `name` (`msg_type`);
/// `crc_in_body`: the method's answer carries its payload's CRC.
fn answer_frame(
    (msg_type, request_id, name): (u16, u64, &'static str),
    crc_in_body: bool,
    peer: SocketAddr,
    limits: FrameLimits,
    reply: std::thread::Result<Reply>,
) -> Frame {
    let error = match reply {
        Ok(Ok((body, payload))) => match limits.check(body.len(), payload.len()) {
            Ok(()) => {
                return Frame {
                    kind: FrameKind::Response,
                    msg_type,
                    request_id,
                    body,
                    payload_crc_in_body: crc_in_body && !payload.is_empty(),
                    payload,
                }
            }
            Err(e) => {
                tracing::warn!(%peer, method = name, error = %e, "response too large");
                ErrorBody {
                    code: ErrorCode::Internal,
                    message: format!("{name}: response too large: {e}"),
                }
            }
        },
        Ok(Err(error)) => error,
        Err(panic) => {
            let what = panic_message(panic.as_ref());
            tracing::warn!(%peer, method = name, panic = what, "handler panicked");
            ErrorBody {
                code: ErrorCode::Internal,
                message: format!("{name}: handler panicked: {what}"),
            }
        }
    };
    error_frame(msg_type, request_id, &error)
}

fn error_frame(msg_type: u16, request_id: u64, error: &ErrorBody) -> Frame {
    Frame {
        kind: FrameKind::ErrorResponse,
        msg_type,
        request_id,
        body: body::encode(error),
        payload: Bytes::new(),
        payload_crc_in_body: false,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "non-string panic"
    }
}
