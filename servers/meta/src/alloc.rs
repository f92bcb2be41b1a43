//! Inode id allocation without a single hot counter key.
//!
//! Ids come in blocks of [`BLOCK_IDS`]. The counter of blocks is split over
//! [`SHARDS`] keys; a meta server reserves a block from a random shard in a
//! short transaction of its own and hands its ids out from memory. Block `b` of
//! shard `s` covers ids `(b * SHARDS + s) * BLOCK_IDS ..` so no two blocks overlap.
//! Ids lost to a crash or a failed create are simply never used.

use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;
use r3fs_kv::{KvEngine, RetryPolicy};
use r3fs_wire::meta::InodeId;

use crate::error::MetaError;
use crate::schema::{alloc_key, decode_u64};

/// Counter keys the block counter is split over.
pub const SHARDS: u16 = 64;
/// Ids in one block.
pub const BLOCK_IDS: u64 = 4096;
/// Ids below this are reserved (0 is invalid, 1 is the root directory).
pub const FIRST_ID: InodeId = 16;

pub struct InodeAllocator {
    engine: Arc<dyn KvEngine>,
    free: Mutex<Range<InodeId>>,
}

impl InodeAllocator {
    pub fn new(engine: Arc<dyn KvEngine>) -> InodeAllocator {
        InodeAllocator {
            engine,
            free: Mutex::new(0..0),
        }
    }

    /// A fresh inode id, never handed out before by any meta server.
    pub fn allocate(&self) -> Result<InodeId, MetaError> {
        let mut free = self.free.lock();
        loop {
            if let Some(id) = free.next() {
                if id >= FIRST_ID {
                    return Ok(id);
                }
                continue;
            }
            *free = self.reserve_block()?;
        }
    }

    fn reserve_block(&self) -> Result<Range<InodeId>, MetaError> {
        let shard = rand::random_range(0..SHARDS);
        let key = alloc_key(shard);
        let block = r3fs_kv::run(self.engine.as_ref(), RetryPolicy::default(), |txn| {
            let next = match txn.get(&key)? {
                Some(v) => decode_u64(&key, &v)?,
                None => 0,
            };
            txn.set(&key, &(next + 1).to_le_bytes())?;
            Ok::<u64, MetaError>(next)
        })?;
        let start = (block * SHARDS as u64 + shard as u64) * BLOCK_IDS;
        assert!(
            start.checked_add(BLOCK_IDS).is_some(),
            "inode id space exhausted"
        );
        Ok(start..start + BLOCK_IDS)
    }
}
