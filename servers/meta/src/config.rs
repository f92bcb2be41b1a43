//! Settings of the meta service that shape the namespace.

use r3fs_wire::meta::Layout;
use serde::{Deserialize, Serialize};

/// Smallest chunk size a layout may use (3FS's smallest class).
pub const CHUNK_BYTES_MIN: u32 = 64 * 1024;
/// Largest chunk size a layout may use (3FS's largest class).
pub const CHUNK_BYTES_MAX: u32 = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaConfig {
    /// Chunk size of new files, a power of two between 64 KiB and 64 MiB.
    pub chunk_size: u32,
    /// How many chains a new file's chunks are striped over.
    pub stripe: u32,
    /// Chain ids new files are placed on (until mgmtd hands out chain tables).
    pub chains: Vec<u32>,
    /// Capacity `statfs` reports, in bytes. Unset: the size of the file system
    /// holding the data directory.
    pub capacity_bytes: Option<u64>,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            chunk_size: 1024 * 1024,
            stripe: 1,
            chains: vec![1],
            capacity_bytes: None,
        }
    }
}

impl MetaConfig {
    /// Checks the settings, naming the first one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !self.chunk_size.is_power_of_two()
            || !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&self.chunk_size)
        {
            return Err(format!(
                "chunk_size {} must be a power of two between {CHUNK_BYTES_MIN} and {CHUNK_BYTES_MAX}",
                self.chunk_size
            ));
        }
        if self.chains.is_empty() {
            return Err("chains must name at least one chain id".into());
        }
        if self.stripe == 0 || self.stripe as usize > self.chains.len() {
            return Err(format!(
                "stripe {} must be between 1 and the number of chains ({})",
                self.stripe,
                self.chains.len()
            ));
        }
        Ok(())
    }

    /// The layout of a new file with inode `inode`: `stripe` consecutive chains
    /// starting at a position derived from the inode, so files spread evenly.
    pub fn layout_for(&self, inode: u64) -> Layout {
        let n = self.chains.len();
        let start = (inode % n as u64) as usize;
        let chains = (0..self.stripe as usize)
            .map(|i| self.chains[(start + i) % n])
            .collect();
        Layout {
            chunk_size: self.chunk_size,
            stripe: self.stripe,
            chains,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_chunk_sizes_and_stripes() {
        let ok = MetaConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            MetaConfig {
                chunk_size: 1000,
                ..ok.clone()
            },
            MetaConfig {
                chunk_size: 32 * 1024,
                ..ok.clone()
            },
            MetaConfig {
                stripe: 0,
                ..ok.clone()
            },
            MetaConfig {
                stripe: 2,
                ..ok.clone()
            },
            MetaConfig {
                chains: vec![],
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layouts_spread_over_chains() {
        let cfg = MetaConfig {
            stripe: 2,
            chains: vec![10, 11, 12],
            ..MetaConfig::default()
        };
        assert_eq!(cfg.layout_for(0).chains, vec![10, 11]);
        assert_eq!(cfg.layout_for(2).chains, vec![12, 10]);
    }
}
