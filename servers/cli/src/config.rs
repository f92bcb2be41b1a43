//! The meta server's configuration file (TOML), with command-line overrides.
//!
//! ```toml
//! listen = "127.0.0.1:9100"
//! data_dir = "/var/lib/r3fs/meta"
//!
//! [kv]
//! engine = "embedded"          # or "fdb" (needs a build with --features fdb)
//! durability = "sync"          # or "periodic"
//! fsync_interval_ms = 20       # periodic only: the power-loss window
//! # fdb_cluster_file = "/etc/foundationdb/fdb.cluster"
//!
//! [namespace]
//! chunk_size = 1048576
//! stripe = 1
//! chains = [1]
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
    pub fdb_cluster_file: Option<PathBuf>,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            engine: EngineKind::Embedded,
            durability: DurabilityKind::Sync,
            fsync_interval_ms: 20,
            fdb_cluster_file: None,
        }
    }
}

/// Longest allowed periodic fsync interval: past this a power loss could take
/// more than a minute of acknowledged work.
pub const FSYNC_INTERVAL_MS_MAX: u64 = 60_000;

impl MetaServerConfig {
    /// Reads `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<MetaServerConfig> {
        let Some(path) = path else {
            return Ok(MetaServerConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config file {}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.namespace
            .validate()
            .map_err(|e| anyhow::anyhow!("[namespace] {e}"))?;
        if self.kv.durability == DurabilityKind::Periodic
            && !(1..=FSYNC_INTERVAL_MS_MAX).contains(&self.kv.fsync_interval_ms)
        {
            bail!(
                "[kv] fsync_interval_ms = {} must be between 1 and {FSYNC_INTERVAL_MS_MAX}",
                self.kv.fsync_interval_ms
            );
        }
        Ok(())
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
    }
}
