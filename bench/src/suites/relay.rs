//! The floor under a chain write on this machine: three RPC servers on
//! loopback that only checksum a 1 MiB payload and pass it on, with no
//! storage at all.
//!
//! A chain write moves every byte through three RPC hops (client to head,
//! head to middle, middle to tail; on one host through shared memory, see
//! `r3fs_net::shared`, else TCP) and checksums it four times (the client
//! once, every member once), all on this machine's CPUs. The relay does
//! exactly that and nothing else: no chunk engine, no disk, no versions,
//! no stored notices. Each server checksums on the blocking pool, as a
//! chunk engine does when it stages a version, so the relay gets no more
//! CPUs for checksums than a chain. Its rate is what the chain could reach
//! if storing cost nothing, so `relay / limit` bounds `write_vs_limit`
//! from above, whatever the storage code does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use r3fs_net::{CallOptions, Router, RpcClient, RpcServer, ServerConfig};
use r3fs_wire::method::{ErrorBody, ErrorCode};
use r3fs_wire::Method;
use serde::{Deserialize, Serialize};

/// A payload to checksum and pass on along the relay.
pub struct Relay;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayRequest {
    /// CRC32C of the payload.
    pub crc: u32,
}

impl Method for Relay {
    /// Outside every service's range: the relay servers know nothing else.
    const ID: u16 = 0xbe01;
    const NAME: &'static str = "bench.Relay";
    type Request = RelayRequest;
    type Response = ();
    const PAYLOAD_CRC_IN_BODY: bool = true;
}

/// Three relay servers in a row; a payload sent to the first reaches the
/// third, and the answer comes back once it did.
pub struct RelayChain {
    client: RpcClient,
    head: SocketAddr,
    /// Payloads each server checked and passed on, from the tail back.
    passed: Vec<Arc<AtomicU64>>,
    _servers: Vec<RpcServer>,
}

impl RelayChain {
    pub async fn start() -> anyhow::Result<RelayChain> {
        let mut servers: Vec<RpcServer> = Vec::new();
        let mut passed = Vec::new();
        // Built from the tail back, so each server knows its successor.
        let mut next: Option<SocketAddr> = None;
        for _ in 0..3 {
            let mut router = Router::new();
            let forward = RpcClient::new(r3fs_net::ClientConfig::default());
            let count = Arc::new(AtomicU64::new(0));
            passed.push(count.clone());
            router.register_with_payload::<Relay, _, _>(move |req, ctx| {
                let (forward, count) = (forward.clone(), count.clone());
                async move { relay(&forward, &count, next, req, ctx.payload).await }
            });
            let server = RpcServer::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                router,
                ServerConfig::default(),
            )
            .await?;
            next = Some(server.local_addr());
            servers.push(server);
        }
        Ok(RelayChain {
            client: RpcClient::new(r3fs_net::ClientConfig::default()),
            head: next.expect("three servers"),
            passed,
            _servers: servers,
        })
    }

    /// Payloads each server checked and passed on so far.
    pub fn passed(&self) -> Vec<u64> {
        self.passed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Sends `payload` down the relay, checksummed as a chain client does.
    pub async fn send(&self, payload: Bytes) -> anyhow::Result<()> {
        let req = RelayRequest {
            crc: crc_fast::crc32_iscsi(&payload),
        };
        self.client
            .call_with_payload::<Relay>(self.head, &req, payload, CallOptions::default())
            .await?;
        Ok(())
    }
}

/// One member's part: check the payload, then pass it to `next` (if any)
/// and answer once it answered.
async fn relay(
    forward: &RpcClient,
    passed: &AtomicU64,
    next: Option<SocketAddr>,
    req: RelayRequest,
    payload: Bytes,
) -> Result<((), Bytes), ErrorBody> {
    // On the blocking pool, where a chunk engine checksums a version it
    // stages, so the relay gets no more CPUs for checksums than a chain.
    let computed = {
        let payload = payload.clone();
        tokio::task::spawn_blocking(move || crc_fast::crc32_iscsi(&payload))
            .await
            .map_err(|e| ErrorBody {
                code: ErrorCode::Unavailable,
                message: format!("checksum task: {e}"),
            })?
    };
    if computed != req.crc {
        return Err(ErrorBody {
            code: ErrorCode::BadRequest,
            message: format!("payload crc {computed:#x}, sent {:#x}", req.crc),
        });
    }
    passed.fetch_add(1, Ordering::Relaxed);
    if let Some(next) = next {
        forward
            .call_with_payload::<Relay>(next, &req, payload, CallOptions::default())
            .await
            .map_err(|e| ErrorBody {
                code: ErrorCode::Unavailable,
                message: format!("relay to {next}: {e}"),
            })?;
    }
    Ok(((), Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payload_crosses_the_relay_and_a_damaged_one_is_refused() {
        let chain = RelayChain::start().await.unwrap();
        chain.send(Bytes::from(vec![7u8; 1 << 20])).await.unwrap();
        assert_eq!(chain.passed(), [1, 1, 1], "every server passed it on once");
        let req = RelayRequest { crc: 1 };
        let refused = chain
            .client
            .call_with_payload::<Relay>(
                chain.head,
                &req,
                Bytes::from_static(b"abc"),
                CallOptions::default(),
            )
            .await;
        let err = refused.unwrap_err().to_string();
        assert!(err.contains("payload crc"), "{err}");
        assert_eq!(chain.passed(), [1, 1, 1], "the head went no further");
    }
}
