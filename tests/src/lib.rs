//! Helpers shared by the workspace tests: meta servers on loopback over one
//! embedded engine, torn down when the test ends, pass or fail.

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
