//! Payloads through shared memory between a client and a server of one
//! process (the same path two processes on one host take): both ways,
//! intact, with the stream for what does not fit and for peers that keep
//! to it.

mod common;

use bytes::Bytes;
use common::*;
use r3fs_net::shared::{SHARED_PAYLOAD_BYTES_MIN, SLOT_BYTES};
use r3fs_net::{CallOptions, ClientConfig, RpcClient, ServerConfig};

fn varied(len: usize, seed: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| ((i + seed) * 131 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_payloads_go_through_shared_memory_both_ways() {
    init_tracing();
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig::default());
    let slot = SLOT_BYTES as usize;
    let mut shared = 0;
    for (seed, len) in [
        0,
        1000,
        SHARED_PAYLOAD_BYTES_MIN - 1,
        SHARED_PAYLOAD_BYTES_MIN,
        1 << 20,
        slot,
        slot + 1,
        1 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        let sent = varied(len, seed);
        let (n, back) = client
            .call_with_payload::<Blob>(addr, &(), sent.clone(), CallOptions::default())
            .await
            .unwrap();
        assert_eq!(n, len as u64);
        assert_eq!(back, sent, "payload of {len} bytes");
        if (SHARED_PAYLOAD_BYTES_MIN..=slot).contains(&len) {
            // The request, and the echo back.
            shared += 2;
        }
        assert_eq!(client.shared_payloads(), shared, "after {len} bytes");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_payloads_in_flight_than_slots_all_arrive_intact() {
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig::default());
    let calls = (0..48).map(|seed| {
        let client = client.clone();
        async move {
            let sent = varied(1 << 20, seed);
            let (_, back) = client
                .call_with_payload::<Blob>(addr, &(), sent.clone(), CallOptions::default())
                .await
                .unwrap();
            assert!(back == sent, "call {seed} came back changed");
        }
    });
    futures::future::join_all(calls).await;
    assert!(client.shared_payloads() > 0);
    server.shutdown().await;
}

#[tokio::test]
async fn either_side_may_keep_payloads_on_the_stream() {
    let sent = varied(1 << 20, 3);
    let closed = ServerConfig {
        share_payloads: false,
        ..ServerConfig::default()
    };
    let keeps = ClientConfig {
        share_payloads: false,
        ..ClientConfig::default()
    };
    for (server_config, client_config) in [
        (closed, ClientConfig::default()),
        (ServerConfig::default(), keeps),
    ] {
        let (server, _) = server(server_config).await;
        let client = RpcClient::new(client_config);
        let (_, back) = client
            .call_with_payload::<Blob>(
                server.local_addr(),
                &(),
                sent.clone(),
                CallOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(back, sent);
        assert_eq!(client.shared_payloads(), 0);
        server.shutdown().await;
    }
}
