//! Shared-memory payload regions: how two processes on one host pass large
//! payloads without the TCP stack.
//!
//! Over loopback TCP a 1 MiB payload costs about 0.3 ms of CPU per hop
//! (copy into socket buffers, segmentation, acknowledgements, copy out),
//! five times a plain copy; a chain write crosses three such hops. When
//! both ends of a connection run on one host, the sender instead copies a
//! payload into a slot of a region it owns (a memfd both map), and the
//! frame carries only the slot's number ([`r3fs_wire::frame::SharedRef`]).
//! The receiver's reader copies the payload out into a buffer of its own
//! and frees the slot at once, then checks the payload like any other:
//! one copy on each side, no kernel work per byte, and nothing the sender
//! does to the slot afterwards can change what the receiver took.
//!
//! The peers agree on regions with the handshake in `r3fs_wire::share`,
//! run by the client when it opens a connection to a server on its own
//! host (`Transport::same_host`). A peer finds the region at
//! `/proc/<pid>/fd/<fd>` and accepts it only if it is a memfd named
//! [`MEMFD_NAME`], sealed against resizing, owned by its own user, of the
//! announced size, and starts with the announced random token; anything
//! else (another user, another pid namespace, a reused pid) leaves the
//! connection on the byte stream. Once the peer mapped it, neither side
//! keeps the memfd open: the mappings hold the memory.
//!
//! # Slots
//! The region holds [`REGION_SLOTS`] slots of [`SLOT_BYTES`], each with a
//! state word in the region's header: free, being filled, or holding a
//! payload of a given length. The owner (the only writer of payloads)
//! claims the lowest free slot, copies the payload in, publishes its length
//! (release) and sends the reference; the peer checks (acquire) that the
//! slot holds exactly the referenced length, copies it out and marks it
//! free (release). So the atomics alone order every access to a slot's
//! bytes between correct peers, and a stale or forged reference is refused.
//! A payload larger than a slot, or one sent while every slot is busy (the
//! peer has not read that far yet), goes on the stream as before: sharing
//! never makes a sender wait. Taking the lowest free slot keeps the memory
//! a connection touches to what it has in flight at once.
//!
//! # Trust
//! The region is writable by both processes, so the receiver never hands
//! the slot's memory on: a buggy or hostile peer can only change the bytes
//! it sends, which every payload's CRC (in the frame header or the body)
//! catches, and can only exhaust its own slots. The seals keep either side
//! from resizing the region under the other (a shrink would kill it with
//! `SIGBUS`). A peer that writes a slot while the other copies it races in
//! a way the language leaves undefined; both sides only copy through raw
//! pointers into or out of memory of their own and never form references
//! into a slot, and a peer able to do this runs as the same user, who can
//! write this process's memory through `/proc` anyway.
//!
//! # Turning it off
//! `ClientConfig::share_payloads` and `ServerConfig::share_payloads` turn
//! it off per client or server; the environment variable [`SWITCH_ENV`]
//! set to `off` (or `0`, `no`, `false`) turns it off for the whole process,
//! both as client and as server, whatever the configs say.
//!
//! # Limits
//! A connection between two processes of one host maps two regions (one
//! per direction) of [`REGION_SLOTS`] × [`SLOT_BYTES`]; only the slots its
//! payloads in flight at once have used are ever touched, and they stay
//! resident while the connection lives.
//!
//! Must not know about methods or frames beyond the slot reference; the
//! reader and writer decide which payloads to share.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use parking_lot::Mutex;
use r3fs_wire::frame::SharedRef;
use r3fs_wire::share::RegionOffer;

use crate::payload::PayloadBuf;

/// Slots per region.
pub const REGION_SLOTS: u32 = 8;
/// Bytes per slot: the largest payload that is shared.
pub const SLOT_BYTES: u32 = 4 * 1024 * 1024;
/// Payloads below this size stay on the stream (a copy into a slot saves
/// nothing there).
pub const SHARED_PAYLOAD_BYTES_MIN: usize = 64 * 1024;
/// The name every region's memfd has (`/memfd:<name>` in `/proc`).
pub const MEMFD_NAME: &str = "r3fs-payloads";
/// The environment variable that turns sharing off for a whole process.
pub const SWITCH_ENV: &str = "R3FS_SHARED_PAYLOADS";
/// The most slots, and the largest slot, a peer's offer may announce.
const OFFER_SLOTS_MAX: u32 = 64;
const OFFER_SLOT_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// The header before the first slot: magic, token, geometry, slot states.
const HEADER_BYTES: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"R3FSSHM1");
/// Where the slot state words start in the header.
const STATES_AT: usize = 64;
/// A slot's state word: free, being filled by its owner, or (any other
/// value) holding a payload of `value - 1` bytes.
const FREE: u32 = 0;
const FILLING: u32 = u32::MAX;
/// The seals every region carries: its size never changes.
const REGION_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK.union(SealFlag::F_SEAL_GROW);

const _: () = assert!(STATES_AT + 4 * OFFER_SLOTS_MAX as usize <= HEADER_BYTES);
const _: () = assert!(geometry_ok(REGION_SLOTS, SLOT_BYTES));
// A held length + 1 never reads as FILLING.
const _: () = assert!(OFFER_SLOT_BYTES_MAX < u32::MAX - 1);

/// A region slot shared between a connection's setup and its reader or
/// writer task: empty until the handshake filled it.
pub(crate) type RegionCell = Arc<OnceLock<SharedRegion>>;

/// Payloads moved through shared memory by this process (counted by each
/// end: a client and a server in one process count a payload twice), and
/// payloads that went on the stream although a region was there (too
/// large, or no free slot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedStats {
    pub shared: u64,
    pub fallbacks: u64,
}

static SHARED_TOTAL: AtomicU64 = AtomicU64::new(0);
static FALLBACKS_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Whether [`SWITCH_ENV`] leaves sharing on (read once per process).
pub fn allowed_by_env() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        let value = std::env::var(SWITCH_ENV).ok();
        let allowed = switch_allows(value.as_deref());
        if !allowed {
            tracing::info!("{SWITCH_ENV}={value:?}: payloads stay on the stream");
        }
        allowed
    })
}

/// Whether a value of [`SWITCH_ENV`] (`None`: unset) leaves sharing on.
fn switch_allows(value: Option<&str>) -> bool {
    let off = value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "no" | "false"
        )
    });
    !off
}

/// What every connection of this process has moved so far, both ways.
pub fn totals() -> SharedStats {
    SharedStats {
        shared: SHARED_TOTAL.load(Ordering::Relaxed),
        fallbacks: FALLBACKS_TOTAL.load(Ordering::Relaxed),
    }
}

/// One mapped region: this process's own (it puts payloads in) or a
/// peer's (it takes payloads out).
pub struct SharedRegion {
    map: MmapRaw,
    /// The owner's memfd, open until the peer mapped the region (it finds
    /// it through `/proc`); then closed, as the mappings hold the memory.
    file: Mutex<Option<File>>,
    offer: RegionOffer,
    /// Payloads put or taken through this region.
    moved: AtomicU64,
}

impl std::fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("offer", &self.offer)
            .field("moved", &self.moved.load(Ordering::Relaxed))
            .finish()
    }
}

/// Whether a region of `slots` slots of `slot_bytes` is one this module
/// makes or maps: slots aligned for direct I/O, sizes within the limits.
const fn geometry_ok(slots: u32, slot_bytes: u32) -> bool {
    slots >= 1
        && slots <= OFFER_SLOTS_MAX
        && slot_bytes > 0
        && slot_bytes <= OFFER_SLOT_BYTES_MAX
        && (slot_bytes as usize).is_multiple_of(crate::payload::PAYLOAD_ALIGN)
}

fn region_len(slots: u32, slot_bytes: u32) -> usize {
    HEADER_BYTES + slots as usize * slot_bytes as usize
}

impl SharedRegion {
    /// A new region of this process's, every slot free, sealed against
    /// resizing.
    pub fn create(slots: u32, slot_bytes: u32) -> io::Result<SharedRegion> {
        assert!(
            geometry_ok(slots, slot_bytes),
            "region geometry {slots} x {slot_bytes} out of range"
        );
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd: OwnedFd = memfd_create(
            MEMFD_NAME,
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(io::Error::from)?;
        let file = File::from(fd);
        let len = region_len(slots, slot_bytes);
        file.set_len(len as u64)?;
        fcntl(
            file.as_fd(),
            FcntlArg::F_ADD_SEALS(REGION_SEALS | SealFlag::F_SEAL_SEAL),
        )
        .map_err(io::Error::from)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        let offer = RegionOffer {
            pid: std::process::id(),
            fd: file.as_raw_fd(),
            token: rand::random(),
            slots,
            slot_bytes,
        };
        let ptr = map.as_mut_ptr();
        // SAFETY: the mapping is `len` bytes, more than the header, and
        // nobody else knows of it yet.
        unsafe {
            std::ptr::write_unaligned(ptr.cast::<u64>(), MAGIC.to_le());
            std::ptr::write_unaligned(ptr.add(8).cast::<u128>(), offer.token.to_le());
            std::ptr::write_unaligned(ptr.add(24).cast::<u32>(), slots.to_le());
            std::ptr::write_unaligned(ptr.add(28).cast::<u32>(), slot_bytes.to_le());
        }
        Ok(SharedRegion {
            map,
            file: Mutex::new(Some(file)),
            offer,
            moved: AtomicU64::new(0),
        })
    }

    /// Closes the owner's memfd once the peer has mapped the region.
    pub(crate) fn peer_mapped(&self) {
        self.file.lock().take();
    }

    /// Maps a peer's region, after checking it is what `offer` says; the
    /// error says why not (for this process's log: it names local paths).
    pub fn attach(offer: &RegionOffer) -> Result<SharedRegion, String> {
        let RegionOffer {
            pid,
            fd,
            token,
            slots,
            slot_bytes,
        } = *offer;
        if !geometry_ok(slots, slot_bytes) {
            return Err(format!(
                "region geometry {slots} x {slot_bytes} out of range"
            ));
        }
        let path = format!("/proc/{pid}/fd/{fd}");
        // Only a memfd of ours: opening a FIFO or a device found at a
        // reused pid's fd could block or have side effects. Checked again
        // on what was opened, as the fd may change in between.
        let expected = format!("/memfd:{MEMFD_NAME} (deleted)");
        let is_region = |link: &str| -> Result<(), String> {
            let target = std::fs::read_link(link).map_err(|e| format!("{link}: {e}"))?;
            match target.to_string_lossy() == expected {
                true => Ok(()),
                false => Err(format!(
                    "{path} is {}, not a payload region",
                    target.display()
                )),
            }
        };
        is_region(&path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_flags())
            .open(&path)
            .map_err(|e| format!("{path}: {e}"))?;
        is_region(&format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        let seals = fcntl(file.as_fd(), FcntlArg::F_GET_SEALS)
            .map(SealFlag::from_bits_truncate)
            .map_err(|e| format!("{path}: seals: {e}"))?;
        if !seals.contains(REGION_SEALS) {
            return Err(format!("{path} is not sealed against resizing"));
        }
        let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
        let len = region_len(slots, slot_bytes);
        if !meta.is_file() || meta.len() != len as u64 {
            return Err(format!(
                "{path}: {} bytes, the offer says {len}",
                meta.len()
            ));
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(format!(
                "{path} belongs to uid {}, not to this process's",
                meta.uid()
            ));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| format!("{path}: mmap: {e}"))?;
        let ptr = map.as_ptr();
        // SAFETY: the mapping is `len` bytes, more than the header.
        let (magic, found_token, found_slots, found_slot_bytes) = unsafe {
            (
                u64::from_le(std::ptr::read_unaligned(ptr.cast::<u64>())),
                u128::from_le(std::ptr::read_unaligned(ptr.add(8).cast::<u128>())),
                u32::from_le(std::ptr::read_unaligned(ptr.add(24).cast::<u32>())),
                u32::from_le(std::ptr::read_unaligned(ptr.add(28).cast::<u32>())),
            )
        };
        if magic != MAGIC
            || found_token != token
            || found_slots != slots
            || found_slot_bytes != slot_bytes
        {
            return Err(format!(
                "{path} is not the offered region (token or geometry differ)"
            ));
        }
        // The mapping holds the memory; the fd is not needed any more.
        Ok(SharedRegion {
            map,
            file: Mutex::new(None),
            offer: *offer,
            moved: AtomicU64::new(0),
        })
    }

    /// What a peer needs to attach this region.
    pub fn offer(&self) -> RegionOffer {
        self.offer
    }

    /// Payloads put into or taken out of this region so far.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    fn state(&self, slot: u32) -> &AtomicU32 {
        assert!(slot < self.offer.slots, "slot {slot} out of range");
        // SAFETY: the state words lie in the header, inside the mapping,
        // 4-byte aligned (the mapping is page aligned); the mapping lives
        // as long as `self`; other processes touch them only atomically.
        unsafe {
            &*self
                .map
                .as_ptr()
                .add(STATES_AT + 4 * slot as usize)
                .cast::<AtomicU32>()
        }
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.offer.slots, "slot {slot} out of range");
        // SAFETY: in bounds: the region holds `slots` slots after the header.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(HEADER_BYTES + slot as usize * self.offer.slot_bytes as usize)
        }
    }

    /// Copies `payload` into the lowest free slot of this (own) region and
    /// publishes it; `None` when it does not fit a slot or no slot is free,
    /// and the payload goes on the stream.
    pub fn put(&self, payload: &[u8]) -> Option<u32> {
        if payload.len() > self.offer.slot_bytes as usize {
            FALLBACKS_TOTAL.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let held = u32::try_from(payload.len() + 1).expect("a slot's length fits u32");
        for slot in 0..self.offer.slots {
            let state = self.state(slot);
            // Acquire: the peer's copy out of this slot (released with
            // FREE) is over before this copy in starts.
            if state
                .compare_exchange(FREE, FILLING, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: the slot holds `slot_bytes` >= `payload.len()` bytes
            // and is this side's while FILLING: a correct peer reads it only
            // once it holds a length. A raw copy from memory of our own, no
            // reference into the slot (see the module docs on trust).
            unsafe {
                std::ptr::copy_nonoverlapping(payload.as_ptr(), self.slot_ptr(slot), payload.len());
            }
            // Release: the bytes are in before the peer sees the length.
            state.store(held, Ordering::Release);
            self.moved.fetch_add(1, Ordering::Relaxed);
            SHARED_TOTAL.fetch_add(1, Ordering::Relaxed);
            return Some(slot);
        }
        FALLBACKS_TOTAL.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Copies the payload `at` names out of this (peer's) region into a
    /// buffer of this process's and frees the slot.
    pub fn take(&self, at: SharedRef) -> Result<Bytes, String> {
        let SharedRef { slot, len } = at;
        if slot >= self.offer.slots || len > self.offer.slot_bytes {
            return Err(format!(
                "slot {slot} with {len} bytes is outside the region ({} x {})",
                self.offer.slots, self.offer.slot_bytes
            ));
        }
        let state = self.state(slot);
        // Acquire: pairs with the owner's release of the length, so all of
        // the payload's bytes are visible.
        let held = state.load(Ordering::Acquire);
        if held != len + 1 {
            return Err(format!(
                "slot {slot} does not hold the {len} bytes referenced (state {held:#x})"
            ));
        }
        let mut buf = PayloadBuf::with_len(len as usize);
        let to = buf.whole_mut();
        // SAFETY: the slot holds `slot_bytes` >= `len` bytes and `to` is
        // this process's own memory; a correct owner does not write a slot
        // holding a payload (see the module docs on trust).
        unsafe { std::ptr::copy_nonoverlapping(self.slot_ptr(slot), to.as_mut_ptr(), to.len()) };
        // Release: the copy is over before the owner may fill the slot again.
        state.store(FREE, Ordering::Release);
        self.moved.fetch_add(1, Ordering::Relaxed);
        SHARED_TOTAL.fetch_add(1, Ordering::Relaxed);
        Ok(buf.freeze())
    }
}

fn libc_flags() -> i32 {
    // Never block on open, never become a controlling terminal.
    nix::fcntl::OFlag::O_NONBLOCK.bits() | nix::fcntl::OFlag::O_NOCTTY.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn a_payload_goes_through_a_slot_and_frees_it() {
        let own = SharedRegion::create(2, 1024 * 1024).unwrap();
        let peer = SharedRegion::attach(&own.offer()).unwrap();
        for round in 0..5u8 {
            let sent = payload(1024 * 1024 - round as usize, round);
            let slot = own.put(&sent).expect("a free slot");
            let got = peer
                .take(SharedRef {
                    slot,
                    len: sent.len() as u32,
                })
                .unwrap();
            assert_eq!(&got[..], &sent[..]);
            assert_eq!(got.as_ptr() as usize % crate::payload::PAYLOAD_ALIGN, 0);
        }
        assert_eq!(own.moved(), 5);
        assert_eq!(peer.moved(), 5);
    }

    #[test]
    fn a_full_region_or_a_large_payload_falls_back_to_the_stream() {
        let own = SharedRegion::create(2, 64 * 1024).unwrap();
        let peer = SharedRegion::attach(&own.offer()).unwrap();
        let small = payload(4096, 1);
        let a = own.put(&small).unwrap();
        let b = own.put(&small).unwrap();
        assert_ne!(a, b);
        assert_eq!(own.put(&small), None, "every slot busy");
        assert_eq!(own.put(&payload(64 * 1024 + 1, 2)), None, "too large");
        peer.take(SharedRef { slot: b, len: 4096 }).unwrap();
        assert_eq!(own.put(&small), Some(b), "a freed slot is reused");
    }

    #[test]
    fn a_bad_reference_is_refused() {
        let own = SharedRegion::create(2, 64 * 1024).unwrap();
        let peer = SharedRegion::attach(&own.offer()).unwrap();
        let err = peer.take(SharedRef { slot: 0, len: 10 }).unwrap_err();
        assert!(err.contains("does not hold"), "{err}");
        let err = peer.take(SharedRef { slot: 2, len: 10 }).unwrap_err();
        assert!(err.contains("outside the region"), "{err}");
        let slot = own.put(&payload(100, 3)).unwrap();
        let err = peer
            .take(SharedRef {
                slot,
                len: 64 * 1024 + 1,
            })
            .unwrap_err();
        assert!(err.contains("outside the region"), "{err}");
        // A reference naming another length than the slot holds.
        let err = peer.take(SharedRef { slot, len: 99 }).unwrap_err();
        assert!(err.contains("does not hold the 99 bytes"), "{err}");
        let got = peer.take(SharedRef { slot, len: 100 }).unwrap();
        assert_eq!(&got[..], &payload(100, 3)[..]);
        // Taken once: a replayed reference is refused.
        let err = peer.take(SharedRef { slot, len: 100 }).unwrap_err();
        assert!(err.contains("does not hold"), "{err}");
    }

    #[test]
    fn a_memfd_that_could_be_resized_is_refused() {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(MEMFD_NAME, MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(region_len(2, 64 * 1024) as u64).unwrap();
        let offer = RegionOffer {
            pid: std::process::id(),
            fd: file.as_raw_fd(),
            token: 1,
            slots: 2,
            slot_bytes: 64 * 1024,
        };
        let err = SharedRegion::attach(&offer).unwrap_err();
        assert!(err.contains("not sealed"), "{err}");
    }

    #[test]
    fn the_owner_closes_its_memfd_once_the_peer_mapped_it() {
        let own = SharedRegion::create(2, 64 * 1024).unwrap();
        let peer = SharedRegion::attach(&own.offer()).unwrap();
        own.peer_mapped();
        // Nobody can attach through the offer any more ...
        assert!(SharedRegion::attach(&own.offer()).is_err());
        // ... and the two mappings still work.
        let slot = own.put(&payload(5000, 9)).unwrap();
        let got = peer.take(SharedRef { slot, len: 5000 }).unwrap();
        assert_eq!(&got[..], &payload(5000, 9)[..]);
    }

    #[test]
    fn an_offer_that_does_not_match_is_refused() {
        let own = SharedRegion::create(2, 64 * 1024).unwrap();
        let wrong_token = RegionOffer {
            token: own.offer().token ^ 1,
            ..own.offer()
        };
        let err = SharedRegion::attach(&wrong_token).unwrap_err();
        assert!(err.contains("not the offered region"), "{err}");
        let wrong_size = RegionOffer {
            slots: 3,
            ..own.offer()
        };
        let err = SharedRegion::attach(&wrong_size).unwrap_err();
        assert!(err.contains("the offer says"), "{err}");
        // An fd that is no region: a plain file of this process.
        let plain = tempfile_in_proc();
        let not_memfd = RegionOffer {
            fd: plain.as_raw_fd(),
            ..own.offer()
        };
        let err = SharedRegion::attach(&not_memfd).unwrap_err();
        assert!(err.contains("not a payload region"), "{err}");
        // A memfd of another name.
        let other = nix::sys::memfd::memfd_create(
            "r3fs-payloads-not",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .unwrap();
        let other_name = RegionOffer {
            fd: other.as_raw_fd(),
            ..own.offer()
        };
        let err = SharedRegion::attach(&other_name).unwrap_err();
        assert!(err.contains("not a payload region"), "{err}");
        let no_such_fd = RegionOffer {
            fd: 1_000_000,
            ..own.offer()
        };
        assert!(SharedRegion::attach(&no_such_fd).is_err());
        let bad_geometry = RegionOffer {
            slot_bytes: 1000,
            ..own.offer()
        };
        let err = SharedRegion::attach(&bad_geometry).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn the_switch_turns_sharing_off_only_when_it_says_so() {
        assert!(switch_allows(None));
        for on in ["on", "1", "yes", ""] {
            assert!(switch_allows(Some(on)), "{on:?}");
        }
        for off in ["off", "OFF", "0", "no", "false", " off "] {
            assert!(!switch_allows(Some(off)), "{off:?}");
        }
    }

    fn tempfile_in_proc() -> File {
        let path = std::env::temp_dir().join(format!("r3fs-shared-test-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
