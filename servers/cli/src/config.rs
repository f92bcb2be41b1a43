//! Server configuration files (TOML), with command-line overrides. Every
//! server has a `[kv]` section saying which KV engine holds its state.
//!
//! A meta server:
//! ```toml
//! listen = "127.0.0.1:9100"
//! data_dir = "/var/lib/r3fs/meta"
//!
//! [kv]
//! engine = "embedded"          # or "remote" (an `r3fs kv` server), or "fdb"
//! durability = "sync"          # embedded: or "periodic"
//! fsync_interval_ms = 20       # periodic only: the power-loss window
//! # remote = ["127.0.0.1:9000"] # remote: the kv server
//! # fdb_cluster_file = "/etc/foundationdb/fdb.cluster"
//!
//! [namespace]
//! chunk_size = 1048576
//! stripe = 1
//! chains = [1]
//! ```
//!
//! An mgmtd (several share one `remote` or `fdb` engine):
//! ```toml
//! node_id = 1
//! listen = "127.0.0.1:9200"
//! lease_ms = 60000
//! extend_interval_ms = 10000
//! check_interval_ms = 10000
//! heartbeat_timeout_ms = 60000
//! session_timeout_ms = 300000
//! [kv]
//! engine = "remote"
//! remote = ["127.0.0.1:9000"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use r3fs_meta::MetaConfig;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaServerConfig {
    /// Address the meta RPC service listens on.
    pub listen: SocketAddr,
    /// Where the embedded KV engine keeps its files.
    pub data_dir: PathBuf,
    pub kv: KvConfig,
    pub namespace: MetaConfig,
}

impl Default for MetaServerConfig {
    fn default() -> Self {
        MetaServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            data_dir: PathBuf::from("/var/lib/r3fs/meta"),
            kv: KvConfig::default(),
            namespace: MetaConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Pure-Rust engine in the data directory (one process at a time).
    Embedded,
    /// An `r3fs kv` server (the embedded engine shared by several processes).
    Remote,
    /// A FoundationDB cluster (build with `--features fdb`).
    Fdb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityKind {
    /// A commit is acknowledged after it is fsynced (group commit).
    Sync,
    /// A commit is acknowledged once written to the OS; fsync runs every
    /// `fsync_interval_ms`, which bounds what a power loss can take.
    Periodic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvConfig {
    pub engine: EngineKind,
    pub durability: DurabilityKind,
    pub fsync_interval_ms: u64,
    pub remote: Vec<SocketAddr>,
    pub fdb_cluster_file: Option<PathBuf>,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            engine: EngineKind::Embedded,
            durability: DurabilityKind::Sync,
            fsync_interval_ms: 20,
            remote: Vec::new(),
            fdb_cluster_file: None,
        }
    }
}

/// Longest allowed periodic fsync interval: past this a power loss could take
/// more than a minute of acknowledged work.
pub const FSYNC_INTERVAL_MS_MAX: u64 = 60_000;

impl MetaServerConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.namespace
            .validate()
            .map_err(|e| anyhow::anyhow!("[namespace] {e}"))?;
        self.kv.validate()
    }
}

impl KvConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.durability == DurabilityKind::Periodic
            && !(1..=FSYNC_INTERVAL_MS_MAX).contains(&self.fsync_interval_ms)
        {
            bail!(
                "[kv] fsync_interval_ms = {} must be between 1 and {FSYNC_INTERVAL_MS_MAX}",
                self.fsync_interval_ms
            );
        }
        if self.engine == EngineKind::Remote && self.remote.is_empty() {
            bail!("[kv] engine = \"remote\" needs remote = [\"host:port\"] (an r3fs kv server)");
        }
        Ok(())
    }
}

/// A command-line flag that overrides a config value when it is given: an
/// `Option` flag when `Some`, a list flag when not empty.
pub trait Flag<T> {
    fn given(self) -> Option<T>;
}

impl<T> Flag<T> for Option<T> {
    fn given(self) -> Option<T> {
        self
    }
}

impl<T> Flag<Vec<T>> for Vec<T> {
    fn given(self) -> Option<Vec<T>> {
        (!self.is_empty()).then_some(self)
    }
}

/// Sets `value` to `flag` when the command line gave it.
pub fn set<T>(value: &mut T, flag: impl Flag<T>) {
    if let Some(v) = flag.given() {
        *value = v;
    }
}

/// Reads a TOML config file, or the type's defaults when there is none.
pub fn load<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MgmtdServerConfig {
    pub node_id: u32,
    pub listen: SocketAddr,
    /// Where the embedded engine keeps its files (engine = "embedded": a single mgmtd).
    pub data_dir: PathBuf,
    pub lease_ms: u64,
    pub extend_interval_ms: u64,
    pub check_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub session_timeout_ms: u64,
    pub kv: KvConfig,
}

impl Default for MgmtdServerConfig {
    fn default() -> Self {
        let d = r3fs_mgmtd::MgmtdConfig::new(1, "");
        MgmtdServerConfig {
            node_id: 1,
            listen: SocketAddr::from(([127, 0, 0, 1], 9200)),
            data_dir: PathBuf::from("/var/lib/r3fs/mgmtd"),
            lease_ms: d.lease_duration.as_millis() as u64,
            extend_interval_ms: d.extend_interval.as_millis() as u64,
            check_interval_ms: d.check_interval.as_millis() as u64,
            heartbeat_timeout_ms: d.heartbeat_timeout.as_millis() as u64,
            session_timeout_ms: d.session_timeout.as_millis() as u64,
            kv: KvConfig::default(),
        }
    }
}

impl MgmtdServerConfig {
    /// Checks what [`mgmtd_config`](Self::mgmtd_config) checks, before any
    /// address is resolved or engine opened.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.mgmtd_config(self.listen).map(drop)
    }

    /// The service settings, checked.
    pub fn mgmtd_config(&self, advertised: SocketAddr) -> anyhow::Result<r3fs_mgmtd::MgmtdConfig> {
        use std::time::Duration;
        let mut c = r3fs_mgmtd::MgmtdConfig::new(self.node_id, advertised.to_string());
        c.lease_duration = Duration::from_millis(self.lease_ms);
        c.extend_interval = Duration::from_millis(self.extend_interval_ms);
        c.check_interval = Duration::from_millis(self.check_interval_ms);
        c.heartbeat_timeout = Duration::from_millis(self.heartbeat_timeout_ms);
        c.session_timeout = Duration::from_millis(self.session_timeout_ms);
        c.validate()
            .map_err(|e| anyhow::anyhow!("mgmtd config: {e}"))?;
        self.kv.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<MetaServerConfig> {
        let cfg: MetaServerConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn full_config_parses() {
        let cfg = parse(
            r#"
            listen = "127.0.0.1:7000"
            data_dir = "/tmp/x"
            [kv]
            durability = "periodic"
            fsync_interval_ms = 5
            [namespace]
            chunk_size = 524288
            chains = [1, 2]
            stripe = 2
            "#,
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 7000);
        assert_eq!(cfg.kv.durability, DurabilityKind::Periodic);
        assert_eq!(cfg.namespace.chains, vec![1, 2]);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(parse("listn = \"127.0.0.1:1\"").is_err());
        assert!(parse("[kv]\nengine = \"rocks\"").is_err());
        assert!(parse("[kv]\ndurability = \"periodic\"\nfsync_interval_ms = 0").is_err());
        assert!(parse("[namespace]\nchunk_size = 1000").is_err());
        assert!(parse("[kv]\nengine = \"remote\"").is_err());
    }

    #[test]
    fn mgmtd_config_checks_timings() {
        let mut cfg: MgmtdServerConfig =
            toml::from_str("node_id = 3\nlease_ms = 4000\nextend_interval_ms = 1000").unwrap();
        assert_eq!(cfg.mgmtd_config(cfg.listen).unwrap().node_id, 3);
        cfg.extend_interval_ms = 3000;
        assert!(cfg.mgmtd_config(cfg.listen).is_err());
    }
}
