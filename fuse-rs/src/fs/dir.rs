//! Directory handles and readdir/readdirplus.
//!
//! The kernel addresses a listing by offset; meta pages by name. A handle
//! keeps the entries fetched so far, so offset `i` always means the same
//! entry for the life of the handle (rewinddir starts a fresh listing):
//! an entry is listed exactly once even while the directory changes.
//!
//! # Limits
//! Entries fetched per meta call: [`READDIR_PAGE_ENTRIES`].

use std::io;

use fuse_backend_rs::abi::fuse_abi::OpenOptions;
use fuse_backend_rs::api::filesystem::{Context, DirEntry, Entry};
use parking_lot::Mutex;
use r3fs_wire::meta::{DirEntry as MetaEntry, FileType, ReadDirRequest};

use super::{dirent_type, errno, meta_error, HandleMap, R3fs};

/// Entries asked of meta per call.
pub const READDIR_PAGE_ENTRIES: u32 = 1024;

/// Offsets 1 and 2 are `.` and `..`; meta's entries follow.
const DOTS: u64 = 2;

pub(crate) struct DirHandle {
    inode: u64,
    listing: Mutex<Listing>,
}

#[derive(Default)]
struct Listing {
    entries: Vec<MetaEntry>,
    /// Meta has more entries after the last one fetched.
    more: bool,
    started: bool,
}

#[derive(Default)]
pub(crate) struct DirHandles {
    handles: HandleMap<DirHandle>,
}

impl DirHandles {
    pub fn remove(&self, fh: u64) {
        self.handles.remove(fh);
    }
}

impl R3fs {
    pub(super) fn do_opendir(
        &self,
        ctx: &Context,
        inode: u64,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        // Opening a directory needs read permission on it (meta checks).
        let user = self.user(ctx);
        self.block_on(self.meta.access(&user, inode, 4))
            .map_err(|e| meta_error("opendir", e))?;
        let fh = self.next_handle();
        self.dirs.handles.insert(
            fh,
            DirHandle {
                inode,
                listing: Mutex::new(Listing::default()),
            },
        );
        Ok((Some(fh), OpenOptions::empty()))
    }

    pub(super) fn do_readdir(
        &self,
        ctx: &Context,
        inode: u64,
        fh: u64,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
        plus: bool,
    ) -> io::Result<()> {
        let handle = self.dirs.handles.get(fh)?;
        if handle.inode != inode {
            return Err(errno(libc::EBADF));
        }
        let mut listing = handle.listing.lock();
        if offset == 0 || !listing.started {
            *listing = Listing::default();
        }
        let mut next = offset;
        loop {
            if next < DOTS {
                let name: &[u8] = if next == 0 { b"." } else { b".." };
                let dirent = DirEntry {
                    ino: inode,
                    offset: next + 1,
                    type_: dirent_type(FileType::Directory),
                    name,
                };
                if add_entry(dirent, Entry::default())? == 0 {
                    return Ok(());
                }
                next += 1;
                continue;
            }
            let index = (next - DOTS) as usize;
            if index >= listing.entries.len() {
                if listing.started && !listing.more {
                    return Ok(());
                }
                self.fetch_page(ctx, inode, &mut listing, plus)?;
                if index >= listing.entries.len() {
                    return Ok(());
                }
            }
            let e = &listing.entries[index];
            let dirent = DirEntry {
                ino: e.inode,
                offset: next + 1,
                type_: dirent_type(e.file_type),
                name: &e.name,
            };
            let added = match (plus, &e.attr) {
                (true, Some(attr)) => {
                    let entry = Entry {
                        inode: attr.inode,
                        generation: 0,
                        attr: self.stat(attr),
                        attr_flags: 0,
                        attr_timeout: self.timeouts.attr,
                        entry_timeout: self.timeouts.entry,
                    };
                    let n = add_entry(dirent, entry)?;
                    if n > 0 {
                        // The kernel now holds a reference to this inode.
                        self.inodes.remember(attr.inode);
                    }
                    n
                }
                _ => add_entry(dirent, Entry::default())?,
            };
            if added == 0 {
                return Ok(());
            }
            next += 1;
        }
    }

    fn fetch_page(
        &self,
        ctx: &Context,
        inode: u64,
        listing: &mut Listing,
        plus: bool,
    ) -> io::Result<()> {
        let req = ReadDirRequest {
            user: self.user(ctx),
            inode,
            after: listing.entries.last().map(|e| e.name.clone()),
            limit: READDIR_PAGE_ENTRIES,
            plus,
        };
        let page = self
            .block_on(self.meta.readdir(req))
            .map_err(|e| meta_error("readdir", e))?;
        listing.started = true;
        listing.more = page.more;
        listing.entries.extend(page.entries);
        Ok(())
    }
}
