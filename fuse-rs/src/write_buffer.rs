//! The per-inode write buffer: small contiguous writes are gathered into one
//! storage write (3FS uses 1 MiB), flushed when a write is not contiguous,
//! when it would overflow, and on fsync, flush, read and setattr.
//!
//! Pure bookkeeping: it never talks to storage; the caller flushes what
//! [`WriteBuffer::take`] hands back.

use bytes::Bytes;

/// Bytes one buffer gathers before it must be flushed.
pub const WRITE_BUFFER_BYTES_MAX: usize = 1 << 20;

#[derive(Debug)]
pub struct WriteBuffer {
    offset: u64,
    data: Vec<u8>,
    capacity: usize,
}

impl WriteBuffer {
    pub fn new(capacity: usize) -> WriteBuffer {
        assert!(capacity > 0);
        WriteBuffer {
            offset: 0,
            data: Vec::new(),
            capacity,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One past the last buffered byte.
    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }

    /// Whether `len` bytes at `offset` can join the buffer without a flush.
    pub fn can_append(&self, offset: u64, len: usize) -> bool {
        if self.data.is_empty() {
            len <= self.capacity
        } else {
            offset == self.end() && self.data.len() + len <= self.capacity
        }
    }

    pub fn append(&mut self, offset: u64, bytes: &[u8]) {
        assert!(
            self.can_append(offset, bytes.len()),
            "append must follow can_append"
        );
        if self.data.is_empty() {
            self.offset = offset;
            self.data
                .reserve(self.capacity.min(bytes.len().max(64 * 1024)));
        }
        self.data.extend_from_slice(bytes);
    }

    /// The buffered bytes and their offset, leaving the buffer empty.
    pub fn take(&mut self) -> Option<(u64, Bytes)> {
        if self.data.is_empty() {
            return None;
        }
        let data = std::mem::take(&mut self.data);
        Some((self.offset, Bytes::from(data)))
    }

    /// Drops buffered bytes at or past `length` (a truncate overtook them).
    pub fn clip(&mut self, length: u64) {
        if self.end() <= length {
            return;
        }
        if self.offset >= length {
            self.data.clear();
        } else {
            self.data.truncate((length - self.offset) as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_writes_gather_until_full() {
        let mut b = WriteBuffer::new(10);
        assert!(b.can_append(100, 4));
        b.append(100, b"abcd");
        assert!(b.can_append(104, 6));
        assert!(!b.can_append(104, 7), "would overflow");
        assert!(!b.can_append(105, 1), "not contiguous");
        assert!(!b.can_append(99, 1), "before the buffer");
        b.append(104, b"ef");
        assert_eq!(b.end(), 106);
        assert_eq!(b.take(), Some((100, Bytes::from_static(b"abcdef"))));
        assert!(b.is_empty());
        assert_eq!(b.take(), None);
        assert!(b.can_append(0, 10));
        assert!(!b.can_append(0, 11));
    }

    #[test]
    fn clip_drops_bytes_past_a_truncate() {
        let mut b = WriteBuffer::new(16);
        b.append(10, b"0123456789");
        b.clip(25);
        assert_eq!(b.end(), 20);
        b.clip(15);
        assert_eq!(b.end(), 15);
        b.clip(5);
        assert!(b.is_empty());
    }
}
