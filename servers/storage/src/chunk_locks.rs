//! One async lock per chunk address, for as long as someone holds or waits
//! for it.
//!
//! The CRAQ layer holds a chunk's lock while it forwards an update and waits
//! for the successor. With a fixed table of lock stripes, two chunks of
//! different chains could share a stripe on every node (the hash is the
//! same everywhere), so two nodes that are each other's successor in two
//! chains could each hold the stripe the other's forward needs: both stall
//! until the forward times out. Locking the exact address removes every such
//! cycle: a forward only ever waits for the same chunk on a later member.
//!
//! # Limits
//! One map entry per chunk that is locked or waited for; an entry goes when
//! its last guard drops (a waiter cancelled before it got the lock leaves
//! its entry until the next guard of that chunk drops).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use r3fs_wire::storage::ChunkAddr;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// See the module docs.
#[derive(Default)]
pub struct ChunkLocks {
    map: Mutex<HashMap<ChunkAddr, Arc<AsyncMutex<()>>>>,
}

/// Holds one chunk's lock; unlocks (and forgets an unused entry) on drop.
pub struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    addr: ChunkAddr,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ChunkLocks {
    /// Waits for and takes the lock of `addr`.
    pub async fn lock(&self, addr: ChunkAddr) -> ChunkGuard<'_> {
        let mutex = self.entry(addr);
        let guard = mutex.lock_owned().await;
        ChunkGuard {
            locks: self,
            addr,
            guard: Some(guard),
        }
    }

    /// Takes the lock of `addr` if nobody holds it.
    pub fn try_lock(&self, addr: ChunkAddr) -> Option<ChunkGuard<'_>> {
        // A failed attempt drops its reference to the entry with it.
        let Ok(guard) = self.entry(addr).try_lock_owned() else {
            self.forget_if_unused(addr);
            return None;
        };
        Some(ChunkGuard {
            locks: self,
            addr,
            guard: Some(guard),
        })
    }

    /// Chunks with an entry (locked, or waited for).
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(&self, addr: ChunkAddr) -> Arc<AsyncMutex<()>> {
        self.map.lock().entry(addr).or_default().clone()
    }

    fn forget_if_unused(&self, addr: ChunkAddr) {
        let mut map = self.map.lock();
        // The map's own reference is the only one: nobody holds or waits.
        if map.get(&addr).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&addr);
        }
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        // Unlock first: the guard holds a reference to the entry.
        drop(self.guard.take());
        self.locks.forget_if_unused(self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(chain: u32, index: u64) -> ChunkAddr {
        ChunkAddr {
            chain,
            inode: 7,
            index,
        }
    }

    #[tokio::test]
    async fn one_lock_per_chunk_and_entries_go_with_their_last_guard() {
        let locks = Arc::new(ChunkLocks::default());
        let a = locks.lock(addr(1, 0)).await;
        // Another chunk never waits for this one, whatever the hashes.
        let b = locks.lock(addr(2, 0)).await;
        assert!(locks.try_lock(addr(1, 0)).is_none());
        assert_eq!(locks.len(), 2);
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(addr(1, 0)).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "the same chunk waits");
        drop(a);
        waiter.await.unwrap();
        drop(b);
        assert!(locks.is_empty(), "no entry outlives its guards");
        assert!(locks.try_lock(addr(1, 0)).is_some());
        assert!(locks.is_empty());
    }
}
