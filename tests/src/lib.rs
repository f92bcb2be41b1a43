//! Helpers shared by the workspace tests: meta servers on loopback over one
//! embedded engine, torn down when the test ends, pass or fail.
pub mod linearizability;
pub mod posix;

use std::net::SocketAddr;
use std::sync::Arc;

use r3fs_client::{MetaClient, MetaClientConfig};
use r3fs_kv::embedded::{EmbeddedConfig, EmbeddedEngine};
use r3fs_kv::KvEngine;
use r3fs_meta::{MetaConfig, MetaStore};
use r3fs_net::{Router, RpcServer, ServerConfig};

/// `servers` meta servers on 127.0.0.1, each with its own `MetaStore`, all on
/// one embedded engine in a temporary directory.
pub struct MetaCluster {
    pub addrs: Vec<SocketAddr>,
    servers: Vec<RpcServer>,
    pub engine: Arc<dyn KvEngine>,
    _dir: tempfile::TempDir,
}

impl MetaCluster {
    pub async fn start(servers: usize) -> MetaCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine: Arc<dyn KvEngine> =
            Arc::new(EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).expect("open engine"));
        let mut running = Vec::new();
        for _ in 0..servers {
            let store = MetaStore::new(engine.clone(), MetaConfig::default(), None).expect("store");
            let mut router = Router::new();
            r3fs_meta::server::register(&mut router, Arc::new(store));
            let server = RpcServer::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                router,
                ServerConfig::default(),
            )
            .await
            .expect("bind meta server");
            running.push(server);
        }
        MetaCluster {
            addrs: running.iter().map(RpcServer::local_addr).collect(),
            servers: running,
            engine,
            _dir: dir,
        }
    }

    /// A client of every server.
    pub fn client(&self) -> MetaClient {
        MetaClient::new(MetaClientConfig::new(self.addrs.clone())).expect("client")
    }

    /// A client of server `i` only.
    pub fn client_of(&self, i: usize) -> MetaClient {
        MetaClient::new(MetaClientConfig::new(vec![self.addrs[i]])).expect("client")
    }

    /// Stops every server, finishing in-flight calls.
    pub async fn shutdown(self) {
        for s in self.servers {
            s.shutdown().await;
        }
    }
}

/// `n` mgmtd instances on 127.0.0.1 sharing one embedded engine, with
/// timings short enough for tests. Instances can be stopped one by one.
pub struct MgmtdCluster {
    pub addrs: Vec<SocketAddr>,
    servers: Vec<Option<RpcServer>>,
    _dir: tempfile::TempDir,
}

/// Test timings: lease 2 s extended every 300 ms, standbys check every 100 ms.
pub fn fast_mgmtd_config(node_id: u32, address: SocketAddr) -> r3fs_mgmtd::MgmtdConfig {
    use std::time::Duration;
    let mut c = r3fs_mgmtd::MgmtdConfig::new(node_id, address.to_string());
    c.lease_duration = Duration::from_millis(2000);
    c.extend_interval = Duration::from_millis(300);
    c.check_interval = Duration::from_millis(100);
    c.heartbeat_timeout = Duration::from_millis(800);
    c.session_timeout = Duration::from_millis(800);
    c
}

impl MgmtdCluster {
    pub async fn start(n: usize) -> MgmtdCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine: Arc<dyn KvEngine> =
            Arc::new(EmbeddedEngine::open(EmbeddedConfig::new(dir.path())).expect("open engine"));
        let mut servers = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..n {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
            let addr = probe.local_addr().expect("probe addr");
            drop(probe);
            let mgmtd =
                r3fs_mgmtd::Mgmtd::start(engine.clone(), fast_mgmtd_config(i as u32 + 1, addr))
                    .expect("start mgmtd");
            let mut router = Router::new();
            r3fs_mgmtd::server::register(&mut router, mgmtd);
            let server = RpcServer::bind(addr, router, ServerConfig::default())
                .await
                .expect("bind mgmtd");
            servers.push(Some(server));
            addrs.push(addr);
        }
        MgmtdCluster {
            addrs,
            servers,
            _dir: dir,
        }
    }

    pub fn client(&self) -> r3fs_client::MgmtClient {
        r3fs_client::MgmtClient::new(self.addrs.clone()).expect("mgmt client")
    }

    /// Stops instance `i` as a crash would: it stops answering and stops
    /// extending its lease (the lease record stays until it expires).
    pub async fn stop(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.shutdown().await;
        }
    }

    /// Waits until some instance is primary; returns its index.
    pub async fn wait_for_primary(&self, timeout: std::time::Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        let client = self.client();
        while tokio::time::Instant::now() < deadline {
            for i in 0..self.addrs.len() {
                if self.servers[i].is_none() {
                    continue;
                }
                if let Ok(p) = client.primary_as_seen_by(i).await {
                    if p.this_is_primary {
                        return Some(i);
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        None
    }
}
