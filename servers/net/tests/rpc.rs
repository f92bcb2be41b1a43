//! Calls through a real server on loopback: happy paths, timeouts, retries,
//! shutdown, panics.

mod common;

use std::time::{Duration, Instant};

use common::*;
use r3fs_net::{CallOptions, ClientConfig, RetryPolicy, RpcClient, RpcError, ServerConfig};
use r3fs_wire::ErrorCode;

fn fast_retry(attempts_max: u32) -> RetryPolicy {
    RetryPolicy {
        attempts_max,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

fn opts(timeout_ms: u64, attempts_max: u32, idempotent: bool) -> CallOptions {
    CallOptions {
        timeout: Duration::from_millis(timeout_ms),
        retry: fast_retry(attempts_max),
        idempotent,
    }
}

#[tokio::test]
async fn echo_round_trip() {
    init_tracing();
    let (server, _) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig::default());
    let got = client
        .call::<Echo>(
            server.local_addr(),
            &"hello".to_string(),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(got, "hello");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_share_one_client() {
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig {
        connections_per_addr: 2,
        ..ClientConfig::default()
    });
    let mut tasks = Vec::new();
    for caller in 0..32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                let msg = format!("{caller}-{i}");
                let got = client
                    .call::<Echo>(addr, &msg, CallOptions::default())
                    .await
                    .unwrap();
                assert_eq!(got, msg);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn payload_round_trip() {
    let (server, _) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig::default());
    for len in [0, 1, 100_000, 4 * 1024 * 1024 + 7] {
        echo_blob(
            &client,
            server.local_addr(),
            &payload(len),
            &format!("{len} bytes"),
        )
        .await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_request_rejected_before_sending() {
    let (server, counter) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig {
        frame_limits: r3fs_wire::frame::FrameLimits {
            body_bytes_max: 16,
            payload_bytes_max: 16,
        },
        ..ClientConfig::default()
    });
    let err = client
        .call::<Echo>(
            server.local_addr(),
            &"x".repeat(100),
            CallOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Frame { .. }), "{err}");
    assert_eq!(counter.get(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn slow_handler_times_out() {
    let (server, _) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig::default());
    let start = Instant::now();
    let err = client
        .call::<Sleep>(server.local_addr(), &1_000, opts(200, 1, true))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RpcError::Timeout {
                method: "test.sleep",
                ..
            }
        ),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    // The connection still serves other calls.
    let got = client
        .call::<Echo>(
            server.local_addr(),
            &"after".to_string(),
            CallOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(got, "after");
    server.shutdown().await;
}

#[tokio::test]
async fn timeout_after_send_not_retried_unless_idempotent() {
    let (server, counter) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig::default());
    let addr = server.local_addr();
    let err = client
        .call::<CountedSleep>(addr, &1_000, opts(100, 3, false))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }), "{err}");
    assert_eq!(counter.get(), 1);
    let err = client
        .call::<CountedSleep>(addr, &1_000, opts(100, 3, true))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::RetriesExhausted { attempts: 3, .. }),
        "{err}"
    );
    assert_eq!(counter.get(), 4);
    server.shutdown().await;
}

#[tokio::test]
async fn remote_errors_retried_only_when_retryable_and_idempotent() {
    let (server, counter) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig::default());
    let addr = server.local_addr();
    let check = |code: ErrorCode, idempotent: bool, calls: u32| {
        let client = client.clone();
        let counter = counter.clone();
        async move {
            let before = counter.get();
            let err = client
                .call::<Fail>(addr, &Some(code), opts(1_000, 3, idempotent))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Some(code), "{err}");
            assert_eq!(
                counter.get() - before,
                calls,
                "{code:?} idempotent={idempotent}"
            );
            err
        }
    };
    let err = check(ErrorCode::Errno(2), true, 1).await;
    assert_eq!(err.errno(), Some(2));
    assert!(err.to_string().contains("test.fail"), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    check(ErrorCode::BadRequest, true, 1).await;
    check(ErrorCode::Internal, true, 1).await;
    check(ErrorCode::Unavailable, false, 1).await;
    let err = check(ErrorCode::Unavailable, true, 3).await;
    assert!(
        matches!(err, RpcError::RetriesExhausted { attempts: 3, .. }),
        "{err}"
    );
    check(ErrorCode::Timeout, true, 3).await;
    assert_eq!(
        client
            .call::<Fail>(addr, &None, CallOptions::default())
            .await
            .unwrap(),
        counter.get()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_method_answered() {
    let (server, _) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig::default());
    let err = client
        .call::<Unknown>(server.local_addr(), &(), opts(1_000, 3, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownMethod), "{err}");
    server.shutdown().await;
}

#[tokio::test]
async fn handler_panic_answered_internal() {
    let (server, _) = server(ServerConfig::default()).await;
    let client = RpcClient::new(ClientConfig::default());
    let addr = server.local_addr();
    let err = client
        .call::<Panic>(addr, &(), opts(1_000, 3, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Internal), "{err}");
    assert!(err.to_string().contains("test handler panics"), "{err}");
    let got = client
        .call::<Echo>(addr, &"alive".to_string(), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(got, "alive");
    server.shutdown().await;
}

#[tokio::test]
async fn connect_refused_retried_until_server_comes_up() {
    // Find a free port, then leave it closed for a while.
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    server.shutdown().await;
    let client = RpcClient::new(ClientConfig::default());
    let err = client
        .call::<Echo>(addr, &"x".to_string(), opts(1_000, 1, false))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Connect { .. }), "{err}");
    let starter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server_at(addr, ServerConfig::default()).await
    });
    let start = Instant::now();
    // Not idempotent: connect failures are retried anyway.
    let got = client
        .call::<Echo>(addr, &"up".to_string(), opts(1_000, 30, false))
        .await
        .unwrap();
    assert_eq!(got, "up");
    assert!(start.elapsed() >= Duration::from_millis(250));
    let (server, _) = starter.await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn pooled_connection_replaced_after_server_restart() {
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig::default());
    client
        .call::<Echo>(addr, &"one".to_string(), CallOptions::default())
        .await
        .unwrap();
    server.shutdown().await;
    let (server, _) = server_at(addr, ServerConfig::default()).await;
    let got = client
        .call::<Echo>(addr, &"two".to_string(), opts(1_000, 5, true))
        .await
        .unwrap();
    assert_eq!(got, "two");
    server.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_then_refuses() {
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig::default());
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call::<Sleep>(addr, &300, opts(5_000, 1, false))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    server.shutdown().await;
    assert!(start.elapsed() >= Duration::from_millis(100));
    slow.await.unwrap().unwrap();
    let fresh = RpcClient::new(ClientConfig::default());
    let err = fresh
        .call::<Echo>(addr, &"late".to_string(), opts(1_000, 1, false))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn pending_calls_fail_promptly_when_connection_drops() {
    let config = ServerConfig {
        drain_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let (server, counter) = server(config).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig::default());
    let mut calls = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .call::<CountedSleep>(addr, &10_000, opts(20_000, 3, false))
                .await
        }));
    }
    while counter.get() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    server.shutdown().await;
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, RpcError::ConnectionLost { .. }), "{err}");
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(counter.get(), 4, "not idempotent, so not retried");
}

#[test]
#[should_panic(expected = "the RPC layer's own")]
fn a_method_may_not_take_the_rpc_layers_own_ids() {
    struct Squatter;
    impl r3fs_wire::Method for Squatter {
        const ID: u16 = r3fs_wire::share::SHARE_REGION_ID;
        const NAME: &'static str = "test.squatter";
        type Request = ();
        type Response = ();
    }
    r3fs_net::Router::new().register::<Squatter, _, _>(|(), _ctx| async { Ok(()) });
}
