//! Ad-hoc throughput printout (no assertion on speed): 8 concurrent callers
//! on one client, small calls, for a short while. Run with `--nocapture`,
//! ideally `--release`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use r3fs_net::{CallOptions, ClientConfig, RpcClient, ServerConfig};

const CALLERS: usize = 8;
const RUN_TIME: Duration = Duration::from_millis(1_000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_callers_small_calls_throughput() {
    let (server, _) = server(ServerConfig::default()).await;
    let addr = server.local_addr();
    let client = RpcClient::new(ClientConfig::default());
    let calls = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let client = client.clone();
        let calls = calls.clone();
        tasks.push(tokio::spawn(async move {
            let msg = "small request".to_string();
            while start.elapsed() < RUN_TIME {
                let got = client
                    .call::<Echo>(addr, &msg, CallOptions::default())
                    .await
                    .unwrap();
                assert_eq!(got.len(), msg.len());
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = calls.load(Ordering::Relaxed);
    println!(
        "throughput: {n} calls in {secs:.2} s = {:.0} calls/s ({CALLERS} callers, 2 workers)",
        n as f64 / secs
    );
    assert!(n > 0);
    server.shutdown().await;
}
