//! Buffers for large payloads: aligned for direct I/O, and reused.
//!
//! A payload of at least [`LARGE_PAYLOAD_BYTES_MIN`] is read straight into a
//! [`PayloadBuf`] instead of the connection's read buffer: its first byte
//! sits at a [`PAYLOAD_ALIGN`] boundary, so a storage target can hand it to
//! an `O_DIRECT` write without copying it first, and the buffer goes back
//! to a process-wide pool when the last `Bytes` viewing it is dropped, so
//! the next payload does not fault in fresh pages (a new 1 MiB allocation
//! per write cost page faults and page zeroing on every hop).
//!
//! # Limits
//! The pool keeps at most [`POOL_BYTES_MAX`] bytes of idle buffers; a
//! buffer returned beyond that is freed. A buffer's memory is reserved for
//! the announced length but touched (zeroed) only [`GROW_BYTES`] ahead of
//! what has arrived, so a peer that announces a large payload and stalls
//! pins little memory until the frame read timeout closes it.
//!
//! [`LARGE_PAYLOAD_BYTES_MIN`]: r3fs_wire::frame::LARGE_PAYLOAD_BYTES_MIN

use aligned_vec::{AVec, ConstAlign};
use bytes::Bytes;
use parking_lot::Mutex;

/// Alignment of a payload's first byte (and of its buffer's capacity).
pub const PAYLOAD_ALIGN: usize = 4096;
/// Idle buffer bytes the pool keeps.
pub const POOL_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How far ahead of the bytes read a buffer is initialised.
pub const GROW_BYTES: usize = 256 * 1024;

type Aligned = AVec<u8, ConstAlign<PAYLOAD_ALIGN>>;

/// Idle buffers. A buffer's initialised part (its `len`) only grows, and is
/// zeroed once, when first initialised; reading into it needs no `unsafe`
/// and reusing it no memset. Accounted by capacity.
static POOL: Mutex<Pool> = Mutex::new(Pool {
    idle: Vec::new(),
    bytes: 0,
});

struct Pool {
    idle: Vec<Aligned>,
    bytes: usize,
}

/// A payload being read, then owned by the `Bytes` made of it.
pub struct PayloadBuf {
    /// `None` only while dropping.
    buf: Option<Aligned>,
    len: usize,
}

impl PayloadBuf {
    /// A buffer for a payload of `len` bytes: the smallest idle one that
    /// fits, or a new one.
    pub fn with_len(len: usize) -> PayloadBuf {
        let reused = {
            let mut pool = POOL.lock();
            let found = (pool.idle.iter().enumerate())
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            found.map(|i| {
                let buf = pool.idle.swap_remove(i);
                pool.bytes -= buf.capacity();
                buf
            })
        };
        let buf = reused.unwrap_or_else(|| {
            Aligned::with_capacity(PAYLOAD_ALIGN, len.next_multiple_of(PAYLOAD_ALIGN))
        });
        assert!(buf.capacity() >= len, "a payload buffer holds its payload");
        PayloadBuf {
            buf: Some(buf),
            len,
        }
    }

    /// Where the payload's bytes from `filled` on are read to: a non-empty
    /// slice (at most [`GROW_BYTES`]) unless `filled` is the whole payload.
    pub fn spare(&mut self, filled: usize) -> &mut [u8] {
        let want = filled.saturating_add(GROW_BYTES).min(self.len);
        let buf = self.buf.as_mut().expect("live buffer");
        if buf.len() < want {
            // Within the capacity reserved at creation: no reallocation.
            buf.resize(want, 0);
        }
        &mut buf[filled.min(want)..want]
    }

    /// All of the payload's memory at once, for a caller that fills every
    /// byte itself (a direct read): zeroed where this buffer was never
    /// used, else holding what its last payload left there.
    pub fn whole_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        let buf = self.buf.as_mut().expect("live buffer");
        if buf.len() < len {
            // Within the capacity reserved at creation: no reallocation.
            buf.resize(len, 0);
        }
        &mut buf[..len]
    }

    /// Zero-copy `Bytes` over the payload, once all of it was read; the
    /// buffer returns to the pool when the last clone is dropped.
    pub fn freeze(mut self) -> Bytes {
        let _ = self.spare(self.len);
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PayloadBuf {
    /// The payload once frozen; before, only the part initialised so far.
    fn as_ref(&self) -> &[u8] {
        let buf = self.buf.as_ref().expect("live buffer");
        &buf[..self.len.min(buf.len())]
    }
}

impl Drop for PayloadBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let mut pool = POOL.lock();
        if pool.bytes + buf.capacity() <= POOL_BYTES_MAX {
            pool.bytes += buf.capacity();
            pool.idle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_aligned_and_their_buffers_reused() {
        let mut first = PayloadBuf::with_len(100_000);
        first.spare(0).fill(7);
        let ptr = first.spare(0).as_ptr();
        assert_eq!(ptr as usize % PAYLOAD_ALIGN, 0);
        let bytes = first.freeze();
        assert_eq!(bytes.len(), 100_000);
        assert!(bytes.iter().all(|&b| b == 7));
        let clone = bytes.slice(4096..8192);
        drop(bytes);
        // Still viewed by a slice: not back in the pool yet.
        assert_eq!(clone.len(), 4096);
        drop(clone);
        // Tests share the pool, so look for this very buffer.
        let mut found = false;
        let mut held = Vec::new();
        for _ in 0..64 {
            let mut again = PayloadBuf::with_len(50_000);
            let spare = again.spare(0);
            assert_eq!(spare.len(), 50_000);
            assert_eq!(spare.as_ptr() as usize % PAYLOAD_ALIGN, 0);
            found |= spare.as_ptr() == ptr;
            held.push(again);
            if found {
                break;
            }
        }
        assert!(found, "a returned buffer is reused");
    }

    #[test]
    fn memory_is_initialised_only_as_far_as_bytes_arrive() {
        let len = 8 * GROW_BYTES + 5;
        let mut buf = PayloadBuf::with_len(len);
        let initialised = |b: &PayloadBuf| b.buf.as_ref().unwrap().len();
        assert!(initialised(&buf) < len || initialised(&buf) == 0);
        let mut filled = 0;
        while filled < len {
            let spare = buf.spare(filled);
            assert!(!spare.is_empty() && spare.len() <= GROW_BYTES);
            let n = spare.len().min(1000);
            spare[..n].fill(3);
            filled += n;
            assert!(initialised(&buf) <= filled + GROW_BYTES);
        }
        assert!(buf.spare(len).is_empty());
        let bytes = buf.freeze();
        assert_eq!(bytes.len(), len);
        assert!(bytes.iter().all(|&b| b == 3));
    }
}
