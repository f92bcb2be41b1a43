//! Garbage collection of removed files: meta queues a file when its last link
//! and last session are gone; this deletes its chunks from every chain of its
//! layout and then takes it off the queue.
//!
//! Every step is idempotent (removing removed chunks does nothing, and
//! acknowledging twice does nothing), so several storage nodes may run it at
//! once and a crash between the steps only repeats work.
//!
//! # Limits
//! At most [`GC_BATCH_MAX`] files per round.

use crate::failover::ClientError;
use crate::storage::StorageClientError;
use crate::{MetaClient, StorageClient};

/// Files handled per round.
pub const GC_BATCH_MAX: u32 = 64;

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcRound {
    pub files: usize,
    pub chunks: u64,
    /// Files whose chunks could not be removed this round (left queued).
    pub failed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("garbage collection: {0}")]
    Meta(#[from] ClientError),
}

/// One round: take up to [`GC_BATCH_MAX`] queued files, delete their chunks,
/// acknowledge the ones that succeeded.
pub async fn collect_garbage(
    meta: &MetaClient,
    storage: &StorageClient,
) -> Result<GcRound, GcError> {
    let entries = meta.gc_list(GC_BATCH_MAX).await?;
    let mut round = GcRound::default();
    let mut done = Vec::new();
    for entry in entries {
        match storage.remove_inode(&entry.layout, entry.inode).await {
            Ok(chunks) => {
                round.files += 1;
                round.chunks += chunks;
                done.push(entry.inode);
            }
            Err(e) => {
                round.failed += 1;
                log_failure(entry.inode, &e);
            }
        }
    }
    if !done.is_empty() {
        meta.gc_done(done).await?;
    }
    Ok(round)
}

fn log_failure(inode: u64, e: &StorageClientError) {
    tracing::warn!(inode, error = %e, "could not delete the chunks of a removed file; will retry");
}
