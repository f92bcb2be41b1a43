//! Journal fsyncs that do not hold fjall's journal lock.
//!
//! fjall's `Database::persist(SyncData)` runs its `fdatasync` while it holds
//! the journal writer's mutex, which every batch commit takes too. So a
//! commit arriving during a group commit's fsync could not even write its
//! batch until that fsync finished, and the next group commit found few
//! batches to cover. On this project's 2-CPU test machine, with three chunk
//! engines writing at once, a commit's batch write took 0.3 ms on average
//! that way, and 0.03 ms once the fsync ran outside the lock.
//!
//! [`JournalSync`] instead flushes fjall's write buffer to the OS under the
//! lock (`PersistMode::Buffer`, no syscall when nothing is buffered), then
//! `fdatasync`s the active journal file through a descriptor of its own with
//! the lock released. `fdatasync` acts on the file, not on the descriptor,
//! so it makes durable every batch written to that file before the call.
//!
//! # Why every earlier batch is covered
//! fjall keeps its journal as files `<n>.jnl` in the database directory and
//! writes only to the highest-numbered one. It leaves `<n>.jnl` for
//! `<n+1>.jnl` only after an `fsync` of `<n>.jnl`, under the writer lock,
//! and creates `<n+1>.jnl` (and fsyncs the directory) before any batch goes
//! there. So when a sync starts, every batch already written is either in
//! the highest-numbered journal that exists at that moment, which the sync
//! covers, or in an earlier one, which fjall synced when it moved on. Each
//! sync therefore lists the directory first (a few microseconds next to the
//! fsync) and follows the highest number; it never relies on the order in
//! which fjall deletes old journals.
//!
//! A test forces a journal rotation and checks that syncs follow it
//! (`journal_syncs_follow_a_rotation`), so a fjall release that lays its
//! journal out differently fails that test rather than silently losing
//! durability.
//!
//! # Failure
//! A failed `fdatasync` is final, as for the data files of storage targets:
//! the batches it covered may be lost, and the kernel reports a writeback
//! error only once. Every later sync fails with the first error, and the
//! engine refuses every later commit.
//!
//! # Fallback
//! If `open` finds no `<n>.jnl` in the directory, every sync goes through
//! fjall's `persist(SyncData)` under its lock, as before this module, and
//! `open` logs a warning saying so.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use fjall::{Database, PersistMode};
use parking_lot::Mutex;

use crate::KvError;

/// How a [`JournalSync`] makes the journal durable.
enum Way {
    /// `fdatasync` through descriptors of our own, outside fjall's lock.
    OwnDescriptor(Mutex<Option<Active>>),
    /// fjall's `persist(SyncData)`, under its journal lock.
    Fjall,
}

/// The journal file last synced, by number, and our descriptor of it.
struct Active {
    number: u64,
    file: File,
}

/// Syncs the fjall journal of one database directory. Callers serialize
/// their calls (the engine's group-commit leader is the only caller at a
/// time); concurrent calls are correct, only slower.
pub(super) struct JournalSync {
    dir: PathBuf,
    way: Way,
    /// Why a sync failed, once one did.
    failed: Mutex<Option<String>>,
    /// For fault tests: the errno the next syncs fail with, 0 for none.
    #[cfg(test)]
    pub(super) inject_errno: std::sync::atomic::AtomicI32,
}

impl JournalSync {
    /// For the database opened in `dir` (fjall keeps its journal there).
    pub(super) fn open(dir: &Path) -> JournalSync {
        let way = match newest_journal(dir) {
            Ok(Some(_)) => Way::OwnDescriptor(Mutex::new(None)),
            found => {
                let why = match found {
                    Err(e) => format!("cannot list it: {e}"),
                    _ => "no <n>.jnl file in it".to_string(),
                };
                tracing::warn!(
                    dir = %dir.display(),
                    "journal of the embedded KV store not found ({why}): fsyncs hold fjall's journal lock, so commits wait for them"
                );
                Way::Fjall
            }
        };
        JournalSync {
            dir: dir.to_path_buf(),
            way,
            failed: Mutex::new(None),
            #[cfg(test)]
            inject_errno: std::sync::atomic::AtomicI32::new(0),
        }
    }

    /// Makes every batch that fjall wrote before this call durable.
    pub(super) fn sync(&self, db: &Database) -> Result<(), KvError> {
        if let Some(why) = &*self.failed.lock() {
            return Err(failed_before(why));
        }
        let synced = match &self.way {
            Way::Fjall => db.persist(PersistMode::SyncData).map_err(|e| e.to_string()),
            Way::OwnDescriptor(active) => db
                .persist(PersistMode::Buffer)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    self.sync_newest(&mut active.lock())
                        .map_err(|e| e.to_string())
                }),
        };
        synced.map_err(|why| {
            let mut failed = self.failed.lock();
            let first = failed.get_or_insert(why);
            KvError::Engine(format!(
                "fsync of the journal in {} failed ({first}): commits it covered may be lost",
                self.dir.display()
            ))
        })
    }

    /// Whether a sync has failed (the engine then refuses commits).
    pub(super) fn failure(&self) -> Option<KvError> {
        self.failed.lock().as_deref().map(failed_before)
    }

    /// `fdatasync` of the highest-numbered journal, opening it first if it
    /// is not the one synced last.
    fn sync_newest(&self, active: &mut Option<Active>) -> io::Result<()> {
        let number = newest_journal(&self.dir)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no <n>.jnl file any more"))?;
        if active.as_ref().is_none_or(|a| a.number != number) {
            let path = self.dir.join(journal_name(number));
            let file = File::open(&path)?;
            *active = Some(Active { number, file });
        }
        #[cfg(test)]
        match self.inject_errno.load(std::sync::atomic::Ordering::Relaxed) {
            0 => {}
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
        active.as_ref().expect("just set").file.sync_data()
    }

    /// Whether syncs hold fjall's journal lock (the fallback), so that every
    /// commit may wait for one.
    pub(super) fn holds_fjalls_lock(&self) -> bool {
        matches!(self.way, Way::Fjall)
    }

    /// The number of the journal file the last sync went to, if any.
    #[cfg(test)]
    pub(super) fn synced_journal(&self) -> Option<u64> {
        match &self.way {
            Way::OwnDescriptor(active) => active.lock().as_ref().map(|a| a.number),
            Way::Fjall => None,
        }
    }
}

fn failed_before(why: &str) -> KvError {
    KvError::Engine(format!(
        "an earlier fsync of the journal failed ({why}): commits it covered may be lost; reopen the store"
    ))
}

fn journal_name(number: u64) -> String {
    format!("{number}.jnl")
}

/// The highest `<n>` of the `<n>.jnl` files in `dir`.
fn newest_journal(dir: &Path) -> io::Result<Option<u64>> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let number = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok());
        newest = newest.max(number);
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_journal_is_the_highest_number_whatever_else_is_there() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_journal(dir.path()).unwrap(), None);
        for name in [
            "lock",
            "2.jnl",
            "10.jnl",
            "9.jnl",
            "x.jnl",
            "11.jnl.tmp",
            "-1.jnl",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("12.jnl.d")).unwrap();
        assert_eq!(newest_journal(dir.path()).unwrap(), Some(10));
    }

    #[test]
    fn a_directory_that_cannot_be_listed_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(newest_journal(&dir.path().join("missing")).is_err());
    }
}
