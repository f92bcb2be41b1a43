//! [`RemoteEngine`]: a synchronous [`KvEngine`] whose transactions live on a
//! KV server, driven through a small tokio runtime of its own.
//!
//! Never holds data: a client transaction buffers writes until the next read
//! or the commit, and the server's engine does the rest.

use r3fs_kv::limits::{check_key, check_range, WriteBudget};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use r3fs_kv::{
    key_after, AtomicOp, KeyValue, KvEngine, KvError, RangeOptions, RangeResult, Transaction,
    KEY_BYTES_MAX, VALUE_BYTES_MAX,
};
use r3fs_net::{CallOptions, ClientConfig, RetryPolicy, RpcClient, RpcError, CONNECT_TIMEOUT};
use r3fs_wire::kv::{self as wire, KvResult, Mutation, Mutations, TxnId};
use r3fs_wire::Method;

use crate::convert::{
    atomic_to_wire, from_wire, is_connect, rpc_before_commit, rpc_commit, CODE_UNREACHABLE,
};

/// Default time allowed per call attempt, commit included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default attempts per call (idempotent calls retry after a send; commit
/// retries only when the request surely never left).
pub const CALL_ATTEMPTS_MAX: u32 = 3;
/// Buffered mutation bytes that make the client send them at once, keeping
/// every request far below the frame body limit.
pub const MUTATIONS_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Default worker threads of the client's own runtime.
pub const RUNTIME_WORKER_THREADS: usize = 1;
/// Time allowed for the best-effort abort of a dropped transaction.
const ABORT_TIMEOUT: Duration = Duration::from_secs(1);
/// What one buffered mutation costs beyond its keys and values.
const MUTATION_OVERHEAD_BYTES: usize = 16;
/// Bytes of an atomic operand, charged like the engines do.
const ATOMIC_OPERAND_BYTES: usize = 8;
/// Names the runtime's threads, so a call from one of them is refused
/// instead of deadlocking.
const RUNTIME_THREAD_NAME: &str = "r3fs-kv-remote";

const _: () = assert!(
    MUTATIONS_BATCH_BYTES_MAX + KEY_BYTES_MAX + VALUE_BYTES_MAX
        < r3fs_wire::frame::FRAME_BODY_BYTES_MAX as usize / 2
);

/// Client tuning; [`Default`] gives the named constants.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Per attempt, from sending to the answer; bounds how long a call to a
    /// dead server can block.
    pub call_timeout: Duration,
    pub call_attempts_max: u32,
    pub connect_timeout: Duration,
    pub runtime_worker_threads: usize,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            call_timeout: CALL_TIMEOUT,
            call_attempts_max: CALL_ATTEMPTS_MAX,
            connect_timeout: CONNECT_TIMEOUT,
            runtime_worker_threads: RUNTIME_WORKER_THREADS,
        }
    }
}

/// A [`KvEngine`] served by a KV server ([`crate::KvServer`]).
///
/// Like every `KvEngine` it is synchronous: call it from plain threads or
/// tokio's blocking pool (`spawn_blocking`). A call from an async worker
/// thread works but blocks that worker until the answer arrives.
///
/// Given several addresses it talks to one at a time and moves to the next
/// when `begin` cannot connect; a transaction stays on the server it began
/// at. Only one server may own a data directory, so the others are standbys
/// that take over the same store.
pub struct RemoteEngine {
    inner: Arc<Inner>,
}

struct Inner {
    addrs: Vec<SocketAddr>,
    /// Index into `addrs` of the server `begin` tries first.
    current: AtomicUsize,
    client: RpcClient,
    config: RemoteConfig,
    handle: tokio::runtime::Handle,
    /// `Some` until drop, which shuts it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Unlike dropping, never panics inside another runtime.
            runtime.shutdown_background();
        }
    }
}

/// Why a call produced no response.
enum CallError {
    Rpc(RpcError),
    /// Refused before sending (for example from the runtime's own thread).
    Refused(KvError),
}

impl CallError {
    fn into_kv(self, on_rpc: fn(RpcError) -> KvError) -> KvError {
        match self {
            CallError::Rpc(e) => on_rpc(e),
            CallError::Refused(e) => e,
        }
    }
}

impl RemoteEngine {
    /// A client of the KV servers at `addrs`, tried in order. Connects on
    /// first use. Fails if `addrs` is empty or the runtime cannot start.
    pub fn new(addrs: Vec<SocketAddr>, config: RemoteConfig) -> Result<RemoteEngine, KvError> {
        if addrs.is_empty() {
            return Err(KvError::Engine("no kv server address given".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.runtime_worker_threads.max(1))
            .thread_name(RUNTIME_THREAD_NAME)
            .enable_all()
            .build()
            .map_err(|e| KvError::Engine(format!("start kv client runtime: {e}")))?;
        let client = RpcClient::new(ClientConfig {
            connect_timeout: config.connect_timeout,
            ..ClientConfig::default()
        });
        Ok(RemoteEngine {
            inner: Arc::new(Inner {
                addrs,
                current: AtomicUsize::new(0),
                client,
                config,
                handle: runtime.handle().clone(),
                runtime: Some(runtime),
            }),
        })
    }

    /// The server address `begin` tries first.
    pub fn current_addr(&self) -> SocketAddr {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.addrs.len();
        self.inner.addrs[i]
    }
}

impl Inner {
    fn options(&self, idempotent: bool) -> CallOptions {
        CallOptions {
            timeout: self.config.call_timeout,
            retry: RetryPolicy {
                attempts_max: self.config.call_attempts_max.max(1),
                ..RetryPolicy::default()
            },
            idempotent,
        }
    }

    /// Runs the call on the client runtime and waits for it on this thread.
    fn call<M: Method>(
        &self,
        addr: SocketAddr,
        req: M::Request,
        opts: CallOptions,
    ) -> Result<M::Response, CallError> {
        if std::thread::current().name() == Some(RUNTIME_THREAD_NAME) {
            return Err(CallError::Refused(KvError::Engine(
                "remote kv engine called from its own runtime thread".into(),
            )));
        }
        let client = self.client.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let result = client.call::<M>(addr, &req, opts).await;
            let _ = tx.send(result);
        });
        match rx.recv() {
            Ok(result) => result.map_err(CallError::Rpc),
            // The task died without answering: treat as a lost connection.
            Err(_) => Err(CallError::Rpc(RpcError::ConnectionLost {
                method: M::NAME,
                addr,
            })),
        }
    }
}

impl KvEngine for RemoteEngine {
    fn begin(&self) -> Result<Box<dyn Transaction>, KvError> {
        let inner = &self.inner;
        let count = inner.addrs.len();
        let start = inner.current.load(Ordering::Relaxed);
        let mut last = None;
        for step in 0..count {
            let index = (start + step) % count;
            let addr = inner.addrs[index];
            let opts = inner.options(true);
            match inner.call::<wire::Begin>(addr, wire::BeginRequest {}, opts) {
                Ok(Ok(id)) => {
                    if step > 0 {
                        tracing::info!(%addr, "kv client moved to another server");
                        inner.current.store(index, Ordering::Relaxed);
                    }
                    return Ok(Box::new(RemoteTxn::new(inner.clone(), addr, id)));
                }
                Ok(Err(e)) => return Err(from_wire(e)),
                Err(CallError::Rpc(e)) if is_connect(&e) => last = Some(e),
                Err(e) => return Err(e.into_kv(rpc_before_commit)),
            }
        }
        Err(match last {
            Some(e) => rpc_before_commit(e),
            None => KvError::Engine("no kv server address given".into()),
        })
    }

    fn name(&self) -> &'static str {
        "remote"
    }
}

/// A client transaction: the server-side one's id plus the writes not yet sent.
struct RemoteTxn {
    inner: Arc<Inner>,
    addr: SocketAddr,
    id: TxnId,
    pending: Vec<Mutation>,
    pending_bytes: usize,
    /// Mutations the server confirmed applying; the index of `pending[0]`.
    acked: u64,
    /// Key and value bytes written, against `TRANSACTION_BYTES_MAX`.
    budget: WriteBudget,
    /// Set when a request carrying mutations failed: the server may hold
    /// some of them, so every later call fails with this error.
    broken: Option<KvError>,
    /// The server may still hold the transaction; drop sends an abort.
    open: bool,
}

impl RemoteTxn {
    fn new(inner: Arc<Inner>, addr: SocketAddr, id: TxnId) -> RemoteTxn {
        RemoteTxn {
            inner,
            addr,
            id,
            pending: Vec::new(),
            pending_bytes: 0,
            acked: 0,
            budget: WriteBudget::default(),
            broken: None,
            open: true,
        }
    }

    /// Buffers `mutation` of `bytes` key and value bytes; sends the buffer
    /// once it is large.
    fn push(&mut self, mutation: Mutation, bytes: usize) -> Result<(), KvError> {
        if let Some(err) = &self.broken {
            return Err(err.clone());
        }
        self.pending.push(mutation);
        self.pending_bytes += bytes + MUTATION_OVERHEAD_BYTES;
        if self.pending_bytes >= MUTATIONS_BATCH_BYTES_MAX {
            self.send::<wire::Write, ()>(true, rpc_before_commit, |txn, mutations| {
                wire::WriteRequest { txn, mutations }
            })?;
        }
        Ok(())
    }

    /// Sends a request carrying the buffered mutations.
    fn send<M, T>(
        &mut self,
        idempotent: bool,
        on_rpc: fn(RpcError) -> KvError,
        make: impl FnOnce(TxnId, Mutations) -> M::Request,
    ) -> Result<T, KvError>
    where
        M: Method<Response = KvResult<T>>,
    {
        if let Some(err) = &self.broken {
            return Err(err.clone());
        }
        let list = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let carried = list.len() as u64;
        let req = make(
            self.id,
            Mutations {
                first: self.acked,
                list,
            },
        );
        let opts = self.inner.options(idempotent);
        let err = match self.inner.call::<M>(self.addr, req, opts) {
            Ok(Ok(value)) => {
                self.acked += carried;
                return Ok(value);
            }
            Ok(Err(e)) => from_wire(e),
            Err(e) => e.into_kv(on_rpc),
        };
        if carried > 0 {
            self.broken = Some(err.clone());
        }
        Err(err)
    }

    fn read_key(&mut self, key: &[u8], snapshot: bool) -> Result<Option<Vec<u8>>, KvError> {
        let key = key.to_vec();
        self.send::<wire::Get, _>(true, rpc_before_commit, |txn, mutations| wire::GetRequest {
            txn,
            mutations,
            key,
            snapshot,
        })
    }
}

impl Transaction for RemoteTxn {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.read_key(key, false)
    }

    fn snapshot_get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.read_key(key, true)
    }

    /// Reads page by page (the server caps pages); each page continues after
    /// the last key, so the read conflicts add up to those of one read.
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        opts: RangeOptions,
    ) -> Result<RangeResult, KvError> {
        check_range(begin, end)?;
        if begin == end {
            return Ok(RangeResult::default());
        }
        let (mut begin, mut end) = (begin.to_vec(), end.to_vec());
        let mut kvs: Vec<KeyValue> = Vec::new();
        loop {
            let remaining = match opts.limit {
                0 => 0,
                limit => limit - kvs.len(),
            };
            let (b, e) = (begin.clone(), end.clone());
            let page =
                self.send::<wire::GetRange, _>(true, rpc_before_commit, |txn, mutations| {
                    wire::GetRangeRequest {
                        txn,
                        mutations,
                        begin: b,
                        end: e,
                        limit: remaining as u64,
                        reverse: opts.reverse,
                        snapshot: opts.snapshot,
                    }
                })?;
            let got = page.kvs.len();
            if (page.more && got == 0) || (remaining > 0 && got > remaining) {
                return Err(KvError::Engine(format!(
                    "kv server sent a bad range page: {got} pairs for {remaining}, more {}",
                    page.more
                )));
            }
            kvs.extend(page.kvs.into_iter().map(|kv| KeyValue {
                key: kv.key,
                value: kv.value,
            }));
            let full = opts.limit > 0 && kvs.len() == opts.limit;
            if !page.more || full {
                return Ok(RangeResult {
                    kvs,
                    more: page.more,
                });
            }
            let Some(last) = kvs.last() else {
                unreachable!("a page with more has pairs");
            };
            if opts.reverse {
                end = last.key.clone();
            } else {
                begin = key_after(&last.key);
            }
        }
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.budget.set(key, value)?;
        let bytes = key.len() + value.len();
        let mutation = Mutation::Set {
            key: key.to_vec(),
            value: value.to_vec(),
        };
        self.push(mutation, bytes)
    }

    fn clear(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.budget.clear(key)?;
        self.push(Mutation::Clear { key: key.to_vec() }, key.len())
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.budget.clear_range(begin, end)?;
        let bytes = begin.len() + end.len();
        let mutation = Mutation::ClearRange {
            begin: begin.to_vec(),
            end: end.to_vec(),
        };
        self.push(mutation, bytes)
    }

    fn atomic_op(&mut self, key: &[u8], op: AtomicOp, operand: u64) -> Result<(), KvError> {
        check_key(key)?;
        let bytes = key.len() + ATOMIC_OPERAND_BYTES;
        self.budget.charge(bytes)?;
        let mutation = Mutation::AtomicOp {
            key: key.to_vec(),
            op: atomic_to_wire(op),
            operand,
        };
        self.push(mutation, bytes)
    }

    fn add_read_conflict_range(&mut self, begin: &[u8], end: &[u8]) -> Result<(), KvError> {
        check_range(begin, end)?;
        if begin == end {
            return Ok(());
        }
        let mutation = Mutation::AddReadConflictRange {
            begin: begin.to_vec(),
            end: end.to_vec(),
        };
        self.push(mutation, begin.len() + end.len())
    }

    fn add_read_conflict_key(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.add_read_conflict_range(key, &key_after(key))
    }

    fn commit(mut self: Box<Self>) -> Result<(), KvError> {
        let was_broken = self.broken.is_some();
        let result = self.send::<wire::Commit, ()>(false, rpc_commit, |txn, mutations| {
            wire::CommitRequest { txn, mutations }
        });
        // The server forgets the transaction once a commit reaches it.
        self.open = matches!(
            &result,
            Err(KvError::Transient { code, .. }) if *code == CODE_UNREACHABLE
        ) || was_broken;
        result
    }
}

impl Drop for RemoteTxn {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let client = self.inner.client.clone();
        let (addr, txn) = (self.addr, self.id);
        let opts = CallOptions {
            timeout: ABORT_TIMEOUT,
            retry: RetryPolicy::none(),
            idempotent: true,
        };
        // Best effort: the server's idle reaper covers a lost abort.
        self.inner.handle.spawn(async move {
            let req = wire::AbortRequest { txn };
            if let Err(e) = client.call::<wire::Abort>(addr, &req, opts).await {
                tracing::debug!(%addr, error = %e, "kv abort failed");
            }
        });
    }
}
