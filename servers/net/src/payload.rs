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
//! buffer returned beyond that is freed.
//!
//! [`LARGE_PAYLOAD_BYTES_MIN`]: r3fs_wire::frame::LARGE_PAYLOAD_BYTES_MIN

use aligned_vec::{AVec, ConstAlign};
use bytes::Bytes;
use parking_lot::Mutex;

/// Alignment of a payload's first byte (and of its buffer's capacity).
pub const PAYLOAD_ALIGN: usize = 4096;
/// Idle buffer bytes the pool keeps.
pub const POOL_BYTES_MAX: usize = 64 * 1024 * 1024;

type Aligned = AVec<u8, ConstAlign<PAYLOAD_ALIGN>>;

/// Idle buffers; every one is zero-initialised to its full capacity once,
/// when first allocated, so reusing one needs no `unsafe` and no memset.
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
    /// A buffer of `len` bytes (contents unspecified) from the pool, or a
    /// new one.
    pub fn with_len(len: usize) -> PayloadBuf {
        let reused = {
            let mut pool = POOL.lock();
            let found = pool.idle.iter().position(|b| b.len() >= len);
            found.map(|i| {
                let buf = pool.idle.swap_remove(i);
                pool.bytes -= buf.len();
                buf
            })
        };
        let buf = reused.unwrap_or_else(|| {
            let mut buf = Aligned::new(PAYLOAD_ALIGN);
            buf.resize(len.next_multiple_of(PAYLOAD_ALIGN), 0);
            buf
        });
        PayloadBuf {
            buf: Some(buf),
            len,
        }
    }

    /// The payload's bytes, to read into.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.buf.as_mut().expect("live buffer")[..len]
    }

    /// Zero-copy `Bytes` over the payload; the buffer returns to the pool
    /// when the last clone is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PayloadBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().expect("live buffer")[..self.len]
    }
}

impl Drop for PayloadBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        let mut pool = POOL.lock();
        if pool.bytes + buf.len() <= POOL_BYTES_MAX {
            pool.bytes += buf.len();
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
        first.as_mut_slice().fill(7);
        let ptr = first.as_ref().as_ptr();
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
            let again = PayloadBuf::with_len(50_000);
            assert_eq!(again.as_ref().len(), 50_000);
            assert_eq!(again.as_ref().as_ptr() as usize % PAYLOAD_ALIGN, 0);
            found |= again.as_ref().as_ptr() == ptr;
            held.push(again);
            if found {
                break;
            }
        }
        assert!(found, "a returned buffer is reused");
    }
}
