//! The RPC client: pooled connections per address, each multiplexing many
//! calls by request id, with per-attempt timeouts and retries.
//!
//! A new connection first offers the server a shared-memory region for
//! large payloads and asks for one ([`crate::shared`]); a server on another
//! host, or one that does not know the handshake, refuses, and the
//! connection carries every payload on the stream.
//!
//! Never picks servers; callers pass the address (routing is the client
//! libraries' job).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use r3fs_wire::body;
use r3fs_wire::frame::{Frame, FrameKind, FrameLimits};
use r3fs_wire::share::{ConfirmShared, ShareRegion, ShareRequest};
use r3fs_wire::{ErrorBody, Method};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::RpcError;
use crate::frame_reader::FrameReader;
use crate::io::write_frames;
use crate::shared::{RegionCell, SharedRegion, REGION_SLOTS, SLOT_BYTES};
use crate::transport::{TcpTransport, Transport};

/// Default connections kept per server address.
pub const CONNECTIONS_PER_ADDR: usize = 1;
/// Default time allowed to establish a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time allowed per attempt, from sending to the answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default attempts per call, the first included.
pub const RETRY_ATTEMPTS_MAX: u32 = 3;
/// Default wait before the second attempt; doubles per attempt.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(20);
/// Default longest wait between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Frames queued per connection before callers wait.
pub const WRITE_QUEUE_FRAMES_MAX: usize = 1024;

/// Client tuning; [`Default`] gives the named constants.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connections_per_addr: usize,
    pub connect_timeout: Duration,
    pub frame_limits: FrameLimits,
    /// Offer every new connection's server shared-memory payload regions
    /// (used only where the server is on this host and accepts).
    pub share_payloads: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connections_per_addr: CONNECTIONS_PER_ADDR,
            connect_timeout: CONNECT_TIMEOUT,
            frame_limits: FrameLimits::default(),
            share_payloads: true,
        }
    }
}

/// Exponential backoff with jitter between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 1 means no retry.
    pub attempts_max: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: RETRY_ATTEMPTS_MAX,
            backoff_initial: BACKOFF_INITIAL,
            backoff_max: BACKOFF_MAX,
        }
    }
}

impl RetryPolicy {
    /// One attempt only.
    pub fn none() -> Self {
        RetryPolicy {
            attempts_max: 1,
            ..RetryPolicy::default()
        }
    }

    /// Wait before attempt `attempt + 1` (attempts count from 1): the
    /// exponential step, jittered into its upper half.
    fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        let step = self
            .backoff_initial
            .saturating_mul(1 << shift)
            .min(self.backoff_max);
        let half = step / 2;
        let jitter_nanos =
            rand::rng().random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }
}

/// Per-call options.
#[derive(Debug, Clone, Copy)]
pub struct CallOptions {
    /// Time allowed per attempt (connecting included).
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Whether the request may run twice. Only idempotent calls are retried
    /// once they may have reached the server.
    pub idempotent: bool,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: CALL_TIMEOUT,
            retry: RetryPolicy::default(),
            idempotent: false,
        }
    }
}

impl CallOptions {
    /// Defaults, marked idempotent.
    pub fn idempotent() -> Self {
        CallOptions {
            idempotent: true,
            ..CallOptions::default()
        }
    }
}

/// A cheap, cloneable handle to a shared connection pool.
pub struct RpcClient<T: Transport = TcpTransport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for RpcClient<T> {
    fn clone(&self) -> Self {
        RpcClient {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T> {
    transport: T,
    config: ClientConfig,
    pools: RwLock<HashMap<SocketAddr, Arc<Pool>>>,
    request_id_next: AtomicU64,
}

impl RpcClient<TcpTransport> {
    pub fn new(config: ClientConfig) -> Self {
        RpcClient::with_transport(TcpTransport, config)
    }
}

/// One attempt's failure, and whether the request may have reached the server.
struct AttemptError {
    error: RpcError,
    sent: bool,
}

impl<T: Transport> RpcClient<T> {
    pub fn with_transport(transport: T, config: ClientConfig) -> Self {
        assert!(
            config.connections_per_addr > 0,
            "connections_per_addr must be positive"
        );
        RpcClient {
            inner: Arc::new(Inner {
                transport,
                config,
                pools: RwLock::new(HashMap::new()),
                request_id_next: AtomicU64::new(1),
            }),
        }
    }

    /// Calls `M` at `addr` with no payload.
    pub async fn call<M: Method>(
        &self,
        addr: SocketAddr,
        req: &M::Request,
        opts: CallOptions,
    ) -> Result<M::Response, RpcError> {
        let (resp, _payload) = self
            .call_with_payload::<M>(addr, req, Bytes::new(), opts)
            .await?;
        Ok(resp)
    }

    /// Calls `M` at `addr`, sending `payload` after the body; returns the
    /// response and the payload the server sent back.
    pub async fn call_with_payload<M: Method>(
        &self,
        addr: SocketAddr,
        req: &M::Request,
        payload: Bytes,
        opts: CallOptions,
    ) -> Result<(M::Response, Bytes), RpcError> {
        let body = body::encode(req);
        if let Err(source) = self
            .inner
            .config
            .frame_limits
            .check(body.len(), payload.len())
        {
            return Err(RpcError::Frame {
                method: M::NAME,
                addr,
                source,
            });
        }
        let attempts_max = opts.retry.attempts_max.max(1);
        let mut attempt = 1;
        loop {
            let result = self.attempt::<M>(addr, &body, &payload, opts.timeout).await;
            let failure = match result.map(|frame| decode_answer::<M>(addr, frame)) {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(error)) => AttemptError { error, sent: true },
                Err(failure) => failure,
            };
            if !retryable(&failure, opts.idempotent) {
                return Err(failure.error);
            }
            if attempt >= attempts_max {
                if attempt == 1 {
                    return Err(failure.error);
                }
                return Err(RpcError::RetriesExhausted {
                    method: M::NAME,
                    addr,
                    attempts: attempt,
                    last: Box::new(failure.error),
                });
            }
            tracing::debug!(method = M::NAME, %addr, attempt, error = %failure.error, "retrying call");
            tokio::time::sleep(opts.retry.backoff(attempt)).await;
            attempt += 1;
        }
    }

    async fn attempt<M: Method>(
        &self,
        addr: SocketAddr,
        body: &Bytes,
        payload: &Bytes,
        timeout: Duration,
    ) -> Result<Frame, AttemptError> {
        let method = M::NAME;
        let deadline = Instant::now() + timeout;
        let timed_out = |sent| AttemptError {
            error: RpcError::Timeout {
                method,
                addr,
                after: timeout,
            },
            sent,
        };
        let lost = |sent| AttemptError {
            error: RpcError::ConnectionLost { method, addr },
            sent,
        };
        let conn = match tokio::time::timeout_at(deadline, self.connection(addr, method)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => return Err(AttemptError { error, sent: false }),
            Err(_) => return Err(timed_out(false)),
        };
        let request_id = self.inner.request_id_next.fetch_add(1, Ordering::Relaxed);
        let Some(answer) = conn.shared.register(request_id) else {
            return Err(lost(false));
        };
        let frame = Frame {
            kind: FrameKind::Request,
            msg_type: M::ID,
            request_id,
            body: body.clone(),
            payload: payload.clone(),
            payload_crc_in_body: crc_in_body::<M>(payload),
        };
        let queued = match conn.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(lost(false)),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                match tokio::time::timeout_at(deadline, conn.tx.send(frame)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(lost(false)),
                    Err(_) => Err(timed_out(false)),
                }
            }
        };
        if let Err(e) = queued {
            conn.shared.forget(request_id);
            return Err(e);
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(lost(true)),
            Err(_) => {
                conn.shared.forget(request_id);
                Err(timed_out(true))
            }
        }
    }

    /// A live connection to `addr`, connecting if its pool slot has none.
    async fn connection(
        &self,
        addr: SocketAddr,
        method: &'static str,
    ) -> Result<Arc<Conn>, RpcError> {
        let pool = self.pool(addr);
        let slot_count = pool.slots.len();
        let slot_index = pool.slot_next.fetch_add(1, Ordering::Relaxed) % slot_count;
        let Some(slot) = pool.slots.get(slot_index) else {
            unreachable!("slot index is reduced modulo the slot count");
        };
        if let Some(conn) = slot.live() {
            return Ok(conn);
        }
        let _connecting = slot.connecting.lock().await;
        if let Some(conn) = slot.live() {
            return Ok(conn);
        }
        let connect = self.inner.transport.connect(addr);
        let stream = match tokio::time::timeout(self.inner.config.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(RpcError::Connect {
                    method,
                    addr,
                    source,
                })
            }
            Err(_) => {
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(RpcError::Connect {
                    method,
                    addr,
                    source,
                });
            }
        };
        let same_host = T::same_host(&stream);
        let conn = Conn::start(stream, addr, self.inner.config.frame_limits);
        if same_host && self.inner.config.share_payloads && crate::shared::allowed_by_env() {
            // Bounded as a whole: a server that does not answer the handshake
            // costs the first call at most one connect timeout more.
            let timeout = self.inner.config.connect_timeout;
            if tokio::time::timeout(timeout, self.share_regions(&conn, addr))
                .await
                .is_err()
            {
                tracing::debug!(%addr, ?timeout, "shared-memory handshake timed out; payloads stay on the stream");
            }
        }
        *slot.conn.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Runs the shared-memory handshake (`r3fs_wire::share`) on a new
    /// connection before anyone else uses it. Best effort: whatever fails
    /// leaves that direction on the stream, and says why at debug level.
    async fn share_regions(&self, conn: &Conn, addr: SocketAddr) {
        let own = match SharedRegion::create(REGION_SLOTS, SLOT_BYTES) {
            Ok(own) => own,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "no shared payload region for this connection");
                return;
            }
        };
        let request = ShareRequest {
            offer: own.offer(),
            wants_answers: true,
        };
        let answer = match self.setup_call::<ShareRegion>(conn, addr, &request).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "server shares no payload memory");
                return;
            }
        };
        if let Some(reason) = answer.refused {
            tracing::debug!(%addr, reason, "server refused this connection's payload region");
            return;
        }
        own.peer_mapped();
        let _ = conn.out_region.set(own);
        let Some(offer) = answer.offer else { return };
        match SharedRegion::attach(&offer) {
            Ok(region) => {
                // Mapped before the server hears so: it shares answers only
                // after reading the confirmation.
                let _ = conn.in_region.set(region);
                match self
                    .setup_call::<ConfirmShared>(conn, addr, &offer.token)
                    .await
                {
                    Ok(true) => tracing::debug!(%addr, "payloads go through shared memory"),
                    Ok(false) => tracing::debug!(%addr, "server withdrew its payload region"),
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "confirming the payload region failed")
                    }
                }
            }
            Err(reason) => {
                tracing::debug!(%addr, reason, "cannot map the server's payload region");
            }
        }
    }

    /// One call of `M` on `conn` itself, within the connect timeout.
    async fn setup_call<M: Method>(
        &self,
        conn: &Conn,
        addr: SocketAddr,
        req: &M::Request,
    ) -> Result<M::Response, RpcError> {
        let method = M::NAME;
        let request_id = self.inner.request_id_next.fetch_add(1, Ordering::Relaxed);
        let lost = || RpcError::ConnectionLost { method, addr };
        let answer = conn.shared.register(request_id).ok_or_else(lost)?;
        let frame = Frame {
            kind: FrameKind::Request,
            msg_type: M::ID,
            request_id,
            body: body::encode(req),
            payload: Bytes::new(),
            payload_crc_in_body: false,
        };
        conn.tx.send(frame).await.map_err(|_| lost())?;
        let timeout = self.inner.config.connect_timeout;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(frame)) => decode_answer::<M>(addr, frame).map(|(resp, _)| resp),
            Ok(Err(_)) => Err(lost()),
            Err(_) => {
                conn.shared.forget(request_id);
                Err(RpcError::Timeout {
                    method,
                    addr,
                    after: timeout,
                })
            }
        }
    }

    /// Payloads this client's live connections moved through shared
    /// memory, both ways.
    pub fn shared_payloads(&self) -> u64 {
        let pools = self.inner.pools.read();
        let conns = pools.values().flat_map(|pool| {
            pool.slots
                .iter()
                .filter_map(|slot| slot.conn.lock().clone())
        });
        conns
            .map(|conn| {
                let moved = |cell: &RegionCell| cell.get().map_or(0, SharedRegion::moved);
                moved(&conn.out_region) + moved(&conn.in_region)
            })
            .sum()
    }

    fn pool(&self, addr: SocketAddr) -> Arc<Pool> {
        if let Some(pool) = self.inner.pools.read().get(&addr) {
            return pool.clone();
        }
        let mut pools = self.inner.pools.write();
        let count = self.inner.config.connections_per_addr;
        pools
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Pool {
                    slots: (0..count).map(|_| Slot::default()).collect(),
                    slot_next: AtomicUsize::new(0),
                })
            })
            .clone()
    }
}

fn retryable(failure: &AttemptError, idempotent: bool) -> bool {
    if !failure.sent {
        return true;
    }
    match &failure.error {
        RpcError::Timeout { .. } | RpcError::ConnectionLost { .. } => idempotent,
        RpcError::Remote { code, .. } => idempotent && code.is_retryable(),
        _ => false,
    }
}

/// Whether a request of `M` carrying `payload` sets frame bit 2: its own
/// payload's CRC is in the body, and (for a method whose answers carry
/// one) the caller asks for the answer's CRC in the body too. A payload the
/// handler does not check itself keeps its CRC in the header.
fn crc_in_body<M: Method>(payload: &Bytes) -> bool {
    match (M::PAYLOAD_CRC_IN_BODY, payload.is_empty()) {
        (true, false) => true,
        (false, false) => false,
        (_, true) => M::RESPONSE_PAYLOAD_CRC_IN_BODY,
    }
}

fn decode_answer<M: Method>(
    addr: SocketAddr,
    frame: Frame,
) -> Result<(M::Response, Bytes), RpcError> {
    let method = M::NAME;
    if frame.payload_crc_in_body && !M::RESPONSE_PAYLOAD_CRC_IN_BODY {
        return Err(RpcError::UncheckedPayload { method, addr });
    }
    match frame.kind {
        FrameKind::Response => match body::decode::<M::Response>(&frame.body) {
            Ok(resp) => Ok((resp, frame.payload)),
            Err(source) => Err(RpcError::Decode {
                method,
                addr,
                source,
            }),
        },
        _ => match body::decode::<ErrorBody>(&frame.body) {
            Ok(error) => Err(RpcError::Remote {
                method,
                addr,
                code: error.code,
                message: error.message,
            }),
            Err(source) => Err(RpcError::Decode {
                method,
                addr,
                source,
            }),
        },
    }
}

struct Pool {
    slots: Vec<Slot>,
    slot_next: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Arc<Conn>>>,
    /// Held while connecting, so concurrent callers share one new connection.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn live(&self) -> Option<Arc<Conn>> {
        let mut conn = self.conn.lock();
        match &*conn {
            Some(c) if !c.shared.is_closed() => Some(c.clone()),
            Some(_) => {
                *conn = None;
                None
            }
            None => None,
        }
    }
}

/// One multiplexed connection. Dropping it stops its tasks.
struct Conn {
    tx: mpsc::Sender<Frame>,
    shared: Arc<ConnShared>,
    /// This client's region for request payloads, once the server mapped it.
    out_region: RegionCell,
    /// The server's region for answer payloads, once mapped here.
    in_region: RegionCell,
}

impl Conn {
    fn start<S>(stream: S, addr: SocketAddr, limits: FrameLimits) -> Arc<Conn>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_FRAMES_MAX);
        let (out_region, in_region) = (RegionCell::default(), RegionCell::default());
        let shared = Arc::new(ConnShared {
            addr,
            pending: Mutex::new(Pending {
                calls: HashMap::new(),
                closed: false,
            }),
            tasks: OnceLock::new(),
        });
        let writer = {
            let shared = shared.clone();
            let out_region = out_region.clone();
            tokio::spawn(async move {
                if let Err(e) = write_frames(wr, rx, out_region).await {
                    tracing::debug!(addr = %shared.addr, error = %e, "rpc connection write failed");
                }
                shared.close();
            })
        };
        let reader = {
            let shared = shared.clone();
            let reader = FrameReader::with_region(limits, in_region.clone());
            tokio::spawn(async move {
                read_answers(rd, reader, &shared).await;
                shared.close();
            })
        };
        let _ = shared
            .tasks
            .set([reader.abort_handle(), writer.abort_handle()]);
        Arc::new(Conn {
            tx,
            shared,
            out_region,
            in_region,
        })
    }
}

/// Hands every answer frame read from `rd` to its waiting call, until the
/// stream ends or breaks the protocol.
async fn read_answers<R>(mut rd: R, mut reader: FrameReader, shared: &ConnShared)
where
    R: tokio::io::AsyncRead + Unpin,
{
    loop {
        loop {
            match reader.try_frame() {
                Ok(Some(frame)) if frame.kind != FrameKind::Request => shared.answer(frame),
                Ok(Some(_)) => {
                    tracing::warn!(addr = %shared.addr, "closing connection: server sent a request frame");
                    return;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(addr = %shared.addr, error = %e, "closing connection: bad frame");
                    return;
                }
            }
        }
        match reader.fill(&mut rd).await {
            Ok(0) if reader.is_mid_frame() => {
                tracing::warn!(addr = %shared.addr, buffered = reader.buffered(), "closing connection: stream ended inside a frame");
                return;
            }
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(addr = %shared.addr, error = %e, "rpc connection read failed");
                return;
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.close();
    }
}

struct ConnShared {
    addr: SocketAddr,
    pending: Mutex<Pending>,
    tasks: OnceLock<[AbortHandle; 2]>,
}

struct Pending {
    calls: HashMap<u64, oneshot::Sender<Frame>>,
    closed: bool,
}

impl ConnShared {
    /// Makes room for the answer to `request_id`; `None` if the connection is closed.
    fn register(&self, request_id: u64) -> Option<oneshot::Receiver<Frame>> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock();
        if pending.closed {
            return None;
        }
        pending.calls.insert(request_id, tx);
        Some(rx)
    }

    fn forget(&self, request_id: u64) {
        self.pending.lock().calls.remove(&request_id);
    }

    fn answer(&self, frame: Frame) {
        let caller = self.pending.lock().calls.remove(&frame.request_id);
        // No caller: it timed out and gave up.
        if let Some(caller) = caller {
            let _ = caller.send(frame);
        }
    }

    fn is_closed(&self) -> bool {
        self.pending.lock().closed
    }

    /// Fails every pending call with connection lost and stops both tasks.
    fn close(&self) {
        let calls = {
            let mut pending = self.pending.lock();
            pending.closed = true;
            std::mem::take(&mut pending.calls)
        };
        drop(calls);
        if let Some(tasks) = self.tasks.get() {
            tasks.iter().for_each(AbortHandle::abort);
        }
    }
}
