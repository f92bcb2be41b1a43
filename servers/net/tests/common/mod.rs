//! Test methods and a server that serves them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use r3fs_net::{Router, RpcServer, ServerConfig};
use r3fs_wire::{ErrorBody, ErrorCode, Method};

pub struct Echo;
impl Method for Echo {
    const ID: u16 = 0x00F0;
    const NAME: &'static str = "test.echo";
    type Request = String;
    type Response = String;
}

/// Sleeps the given milliseconds.
pub struct Sleep;
impl Method for Sleep {
    const ID: u16 = 0x00F1;
    const NAME: &'static str = "test.sleep";
    type Request = u64;
    type Response = ();
}

pub struct Panic;
impl Method for Panic {
    const ID: u16 = 0x00F2;
    const NAME: &'static str = "test.panic";
    type Request = ();
    type Response = ();
}

/// Echoes the payload back; answers with its length.
pub struct Blob;
impl Method for Blob {
    const ID: u16 = 0x00F3;
    const NAME: &'static str = "test.blob";
    type Request = ();
    type Response = u64;
}

/// Answers with the request's text as payload and its CRC32C as body, which
/// the caller checks (so a caller may ask for the answer's payload CRC to be
/// left out of the frame header).
pub struct CheckedBlob;
impl Method for CheckedBlob {
    const ID: u16 = 0x00F6;
    const NAME: &'static str = "test.checked_blob";
    type Request = String;
    type Response = u32;
    const RESPONSE_PAYLOAD_CRC_IN_BODY: bool = true;
}

/// A caller's idea of [`CheckedBlob`] that does not check the CRC.
pub struct UncheckedBlob;
impl Method for UncheckedBlob {
    const ID: u16 = CheckedBlob::ID;
    const NAME: &'static str = "test.unchecked_blob";
    type Request = String;
    type Response = u32;
}

/// Counts the call, then answers with the requested error code (if any).
pub struct Fail;
impl Method for Fail {
    const ID: u16 = 0x00F4;
    const NAME: &'static str = "test.fail";
    type Request = Option<ErrorCode>;
    type Response = u32;
}

/// Counts the call, then sleeps the given milliseconds.
pub struct CountedSleep;
impl Method for CountedSleep {
    const ID: u16 = 0x00F5;
    const NAME: &'static str = "test.counted_sleep";
    type Request = u64;
    type Response = ();
}

/// Never registered.
pub struct Unknown;
impl Method for Unknown {
    const ID: u16 = 0x00FE;
    const NAME: &'static str = "test.unknown";
    type Request = ();
    type Response = ();
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Calls seen by [`Fail`] and [`CountedSleep`].
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU32>);

impl Counter {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

pub fn router(counter: &Counter) -> Router {
    let mut router = Router::new();
    router
        .register::<Echo, _, _>(|req: String, _ctx| async move { Ok(req) })
        .register::<Sleep, _, _>(|ms: u64, _ctx| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        })
        .register::<Panic, _, _>(|(), _ctx| async move {
            if true {
                panic!("test handler panics");
            }
            Ok(())
        })
        .register_with_payload::<Blob, _, _>(|(), ctx| async move {
            let len = ctx.payload.len() as u64;
            Ok((len, ctx.payload))
        })
        .register_with_payload::<CheckedBlob, _, _>(|text: String, _ctx| async move {
            let payload = Bytes::from(text);
            Ok((crc_fast::crc32_iscsi(&payload), payload))
        });
    let count = counter.clone();
    router.register::<Fail, _, _>(move |code: Option<ErrorCode>, _ctx| {
        let n = count.0.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            match code {
                None => Ok(n),
                Some(code) => Err(ErrorBody {
                    code,
                    message: format!("failing call {n} on purpose"),
                }),
            }
        }
    });
    let count = counter.clone();
    router.register::<CountedSleep, _, _>(move |ms: u64, _ctx| {
        count.0.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(())
        }
    });
    router
}

pub async fn server(config: ServerConfig) -> (RpcServer, Counter) {
    server_at(localhost(), config).await
}

pub async fn server_at(addr: SocketAddr, config: ServerConfig) -> (RpcServer, Counter) {
    let counter = Counter::default();
    let server = RpcServer::bind(addr, router(&counter), config)
        .await
        .unwrap();
    (server, counter)
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn payload(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>())
}

/// Sends `sent` to [`Blob`] at `addr` and checks it comes back unchanged
/// (and that the server saw all of it); `what` names the call in a failure.
pub async fn echo_blob<T: r3fs_net::Transport>(
    client: &r3fs_net::RpcClient<T>,
    addr: SocketAddr,
    sent: &Bytes,
    what: &str,
) {
    let (seen, back) = client
        .call_with_payload::<Blob>(addr, &(), sent.clone(), r3fs_net::CallOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(seen, sent.len() as u64, "{what}: length the server saw");
    assert!(back == *sent, "{what}: the payload came back changed");
}
