//! Byte buffers whose first byte sits on a [`ALIGN`] boundary, without unsafe code: a plain
//! `Vec` a little larger than needed, used from its first aligned byte on.
//!
//! The receiver reads and decompresses chunks into these, so a sink writing with `O_DIRECT`
//! (the file sink, `backend/direct.rs`) can hand a chunk to the kernel as it is instead of
//! copying it into an aligned block first.

use std::ops::{Deref, DerefMut};

/// Address alignment of the buffers: the page size, a multiple of every device's direct-I/O
/// memory alignment.
pub const ALIGN: usize = 4096;

/// A resizable byte buffer that starts on an [`ALIGN`] boundary (see the module docs).
#[derive(Default)]
pub struct AlignedBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// An empty buffer (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes the buffer can hold without a new allocation.
    fn capacity(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }

    /// Makes the buffer `len` bytes long. Bytes kept from an earlier use are left as they
    /// were (the callers overwrite them). Growing allocates a new zeroed buffer of at least
    /// twice the old capacity, as `Vec` does, so a slowly growing length does not reallocate
    /// (and fault in fresh pages) every time.
    pub fn resize(&mut self, len: usize) {
        if len > self.capacity() {
            let capacity = len.max(2 * self.capacity());
            self.buf = vec![0u8; capacity + ALIGN];
            self.start = self.buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        }
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_aligned_at_every_size_and_keeps_its_length() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        for len in [1, 4096, 1 << 20, 100, (1 << 20) + 3, 0, 3 << 20] {
            b.resize(len);
            assert_eq!(b.len(), len);
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0, "len {len}");
            }
            b.fill(7);
            assert!(b.iter().all(|&x| x == 7));
        }
        // Growing a little reuses the doubled capacity.
        let mut g = AlignedBuf::new();
        g.resize(1000);
        g.resize(1500);
        let at = g.as_ptr();
        g.resize(2000);
        assert_eq!(g.as_ptr(), at);
    }
}
