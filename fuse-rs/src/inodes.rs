//! The kernel's references to our inodes: every reply that hands the kernel
//! an inode (lookup, create, mkdir, readdirplus, ...) adds one lookup; FORGET
//! takes them back. Node ids are meta's inode ids (the root is 1 in both).
//!
//! Kept so the state can be handed to an upgraded daemon and so an operator
//! can see how many inodes the kernel holds; nothing is freed on forget
//! because no per-inode state lives here.

use std::collections::HashMap;

use parking_lot::Mutex;

#[derive(Default)]
pub struct InodeTable {
    lookups: Mutex<HashMap<u64, u64>>,
}

impl InodeTable {
    pub fn remember(&self, inode: u64) {
        *self.lookups.lock().entry(inode).or_insert(0) += 1;
    }

    /// Drops `count` lookups; an inode with none left is forgotten. A forget
    /// for more than we handed out is a kernel/daemon mismatch: logged, and
    /// the count floors at zero.
    pub fn forget(&self, inode: u64, count: u64) {
        let mut lookups = self.lookups.lock();
        let Some(n) = lookups.get_mut(&inode) else {
            tracing::debug!(inode, count, "forget of an inode we do not track");
            return;
        };
        if *n < count {
            tracing::warn!(
                inode,
                held = *n,
                count,
                "kernel forgot more lookups than it got"
            );
        }
        *n = n.saturating_sub(count);
        if *n == 0 {
            lookups.remove(&inode);
        }
    }

    pub fn lookups(&self, inode: u64) -> u64 {
        self.lookups.lock().get(&inode).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.lookups.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_count_up_and_forget_counts_down_to_removal() {
        let t = InodeTable::default();
        t.remember(5);
        t.remember(5);
        assert_eq!(t.lookups(5), 2);
        t.forget(5, 1);
        assert_eq!(t.lookups(5), 1);
        t.forget(5, 3);
        assert_eq!(t.lookups(5), 0);
        assert!(t.is_empty());
        t.forget(9, 1);
        assert!(t.is_empty());
    }
}
