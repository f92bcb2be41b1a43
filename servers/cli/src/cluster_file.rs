//! The cluster file: what a client needs to reach a cluster (mgmtd and meta
//! addresses), as TOML. `r3fs local-cluster` writes one into its data
//! directory; `r3fs mount --cluster FILE` and `r3fs status --cluster FILE`
//! read one.
//!
//! ```toml
//! mgmtd = ["127.0.0.1:9200"]   # any mgmtd instances; calls find the primary
//! meta = ["127.0.0.1:9100"]    # meta servers (stateless, any of them)
//! ```

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// mgmtd addresses.
    pub mgmtd: Vec<SocketAddr>,
    /// meta server addresses.
    pub meta: Vec<SocketAddr>,
}

impl ClusterFile {
    /// Reads and checks a cluster file.
    pub fn load(path: &Path) -> anyhow::Result<ClusterFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read cluster file {}", path.display()))?;
        ClusterFile::parse(&text).with_context(|| format!("parse cluster file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<ClusterFile> {
        let file: ClusterFile = toml::from_str(text)?;
        if file.mgmtd.is_empty() {
            bail!("mgmtd = [\"host:port\", ...] must name at least one mgmtd");
        }
        if file.meta.is_empty() {
            bail!("meta = [\"host:port\", ...] must name at least one meta server");
        }
        Ok(file)
    }

    /// Writes the file atomically (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# r3fs cluster file: where clients find this cluster.\n{}",
            toml::to_string(self).context("encode cluster file")?
        );
        write_atomically(path, &text)
    }
}

/// Replaces `path` with `text` so readers see the old or the new content.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expect: Result<(usize, usize), &str>) {
        match (ClusterFile::parse(text), expect) {
            (Ok(f), Ok((m, n))) => assert_eq!((f.mgmtd.len(), f.meta.len()), (m, n)),
            (Err(e), Err(want)) => {
                let got = format!("{e:#}");
                assert!(got.contains(want), "{got:?} should mention {want:?}");
            }
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn cluster_files_parse_and_bad_ones_are_named() {
        check(
            "mgmtd = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nmeta = [\"127.0.0.1:3\"]",
            Ok((2, 1)),
        );
        check("mgmtd = [\"127.0.0.1:1\"]", Err("missing field `meta`"));
        check(
            "mgmtd = [\"127.0.0.1:1\"]\nmeta = [\"127.0.0.1:3\"]\nkv = 1",
            Err("unknown field `kv`"),
        );
        check(
            "mgmtd = []\nmeta = [\"127.0.0.1:3\"]",
            Err("at least one mgmtd"),
        );
        check(
            "mgmtd = [\"nohost\"]\nmeta = []",
            Err("invalid socket address"),
        );
    }

    #[test]
    fn a_saved_file_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        let f = ClusterFile {
            mgmtd: vec!["127.0.0.1:9200".parse().unwrap()],
            meta: vec!["127.0.0.1:9100".parse().unwrap()],
        };
        f.save(&path).unwrap();
        assert_eq!(ClusterFile::load(&path).unwrap(), f);
    }
}
