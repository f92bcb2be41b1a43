//! What every server subcommand shares: opening the configured KV engine,
//! resolving the address it advertises, and waiting for the signal to stop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use r3fs_kv::KvEngine;

use crate::config::{DurabilityKind, EngineKind, KvConfig};

/// Opens the engine `kv` names; `data_dir` is used by the embedded engine.
pub fn open(kv: &KvConfig, data_dir: &Path) -> anyhow::Result<Arc<dyn KvEngine>> {
    match kv.engine {
        EngineKind::Embedded => {
            use r3fs_kv::embedded::{Durability, EmbeddedConfig, EmbeddedEngine};
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("create data directory {}", data_dir.display()))?;
            let mut ecfg = EmbeddedConfig::new(data_dir);
            ecfg.durability = match kv.durability {
                DurabilityKind::Sync => Durability::Sync,
                DurabilityKind::Periodic => {
                    Durability::Periodic(Duration::from_millis(kv.fsync_interval_ms))
                }
            };
            let engine = EmbeddedEngine::open(ecfg).with_context(|| {
                format!(
                    "open the embedded KV engine in {} (is another r3fs process using it?)",
                    data_dir.display()
                )
            })?;
            Ok(Arc::new(engine))
        }
        EngineKind::Remote => {
            let engine = r3fs_kv_remote::RemoteEngine::new(
                kv.remote.clone(),
                r3fs_kv_remote::RemoteConfig::default(),
            )
            .with_context(|| format!("set up the connection to kv server {:?}", kv.remote))?;
            Ok(Arc::new(engine))
        }
        EngineKind::Fdb => open_fdb(kv),
    }
}

#[cfg(feature = "fdb")]
fn open_fdb(kv: &KvConfig) -> anyhow::Result<Arc<dyn KvEngine>> {
    let cluster_file =
        match &kv.fdb_cluster_file {
            Some(path) => Some(path.to_str().with_context(|| {
                format!("fdb_cluster_file {} is not valid UTF-8", path.display())
            })?),
            None => None,
        };
    let engine = r3fs_kv::fdb::FdbEngine::open(cluster_file).context("connect to FoundationDB")?;
    Ok(Arc::new(engine))
}

#[cfg(not(feature = "fdb"))]
fn open_fdb(_kv: &KvConfig) -> anyhow::Result<Arc<dyn KvEngine>> {
    anyhow::bail!("this r3fs was built without FoundationDB support; rebuild with `cargo build --release --features fdb` (needs libfdb_c)")
}

/// The address a server advertises: `listen`, with port 0 resolved to a
/// free port first (a probe bind; the port is taken again at once).
pub fn advertised(listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let probe =
        std::net::TcpListener::bind(listen).with_context(|| format!("listen on {listen}"))?;
    Ok(probe.local_addr()?)
}

/// Returns on SIGTERM or SIGINT.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
