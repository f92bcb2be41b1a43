//! Payloads through shared memory between a client and a server on one
//! host, in one process and in two: both ways, intact, with the stream for
//! what does not fit and for peers that keep to it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use r3fs_net::shared::{allowed_by_env, SHARED_PAYLOAD_BYTES_MIN, SLOT_BYTES, SWITCH_ENV};
use r3fs_net::{ClientConfig, RpcClient, ServerConfig};

/// Whether this run lets payloads be shared (an operator may have set
/// `R3FS_SHARED_PAYLOADS=off` for the whole test run).
fn sharing_allowed() -> bool {
    let allowed = allowed_by_env();
    if !allowed {
        eprintln!("{SWITCH_ENV} turns sharing off: nothing to check here");
    }
    allowed
}

fn varied(len: usize, seed: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| ((i + seed) * 131 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_payloads_go_through_shared_memory_both_ways() {
    if !sharing_allowed() {
        return;
    }
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
        echo_blob(&client, addr, &varied(len, seed), &format!("{len} bytes")).await;
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
    if !sharing_allowed() {
        return;
    }
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig::default());
    let calls = (0..48).map(|seed| {
        let client = client.clone();
        async move {
            echo_blob(
                &client,
                addr,
                &varied(1 << 20, seed),
                &format!("call {seed}"),
            )
            .await;
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
        echo_blob(&client, server.local_addr(), &sent, "1 MiB").await;
        assert_eq!(client.shared_payloads(), 0);
        server.shutdown().await;
    }
}

const CHILD_ENV: &str = "R3FS_NET_SHARED_CHILD";

/// Not a test on its own: the server process of
/// `payloads_cross_processes_through_shared_memory`. Returns at once unless
/// `R3FS_NET_SHARED_CHILD` is set; then serves until its stdin closes.
#[test]
fn shared_child_serves_until_stdin_closes() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (server, _) = server(ServerConfig::default()).await;
        println!("listening {}", server.local_addr());
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await
        .unwrap();
        server.shutdown().await;
    });
}

/// Kills the child server if the test fails before it ends it.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_cross_processes_through_shared_memory() {
    if !sharing_allowed() {
        return;
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "shared_child_serves_until_stdin_closes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    // Read the child's output to its end (it must never write to a closed
    // pipe), passing on where it listens.
    let stdout = child.0.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The harness may print "test <name> ... " on the same line.
            if let Some(at) = line.find("listening ") {
                let _ = addr_tx.send(line[at + "listening ".len()..].trim().to_string());
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || addr_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the child says where it listens")
        .parse()
        .unwrap();
    let client = RpcClient::new(ClientConfig::default());
    for seed in 0..8 {
        echo_blob(
            &client,
            addr,
            &varied(1 << 20, seed),
            &format!("call {seed}"),
        )
        .await;
    }
    assert_eq!(
        client.shared_payloads(),
        16,
        "every request and answer shared"
    );
    drop(child.0.stdin.take());
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the child server ended with {status}");
}
