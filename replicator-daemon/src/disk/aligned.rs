//! Buffers whose start is aligned for O_DIRECT, and the arithmetic of
//! aligned ranges.
//!
//! Owns [`ALIGN_BYTES`] and [`AlignedBuf`]. An `AlignedBuf` is a `BytesMut`
//! whose data pointer is a multiple of [`ALIGN_BYTES`]: it is made by
//! over-allocating and advancing to the first aligned byte, so no allocator
//! tricks and no `unsafe` are needed, and it converts to `BytesMut`/`Bytes`
//! without a copy. This module does no I/O.
#![forbid(unsafe_code)]

use bytes::{Buf, Bytes, BytesMut};

/// Alignment of offsets, lengths and buffer addresses for O_DIRECT I/O.
/// 4096 covers every logical block size Linux block devices use.
pub const ALIGN_BYTES: u64 = 4096;

/// A zero-filled buffer whose first byte sits at an [`ALIGN_BYTES`] boundary.
#[derive(Debug)]
pub struct AlignedBuf(BytesMut);

impl AlignedBuf {
    /// A zeroed buffer of `len_bytes`, aligned to [`ALIGN_BYTES`].
    pub fn zeroed(len_bytes: usize) -> AlignedBuf {
        let align = ALIGN_BYTES as usize;
        let mut b = BytesMut::zeroed(len_bytes + align);
        let skip = (align - (b.as_ptr() as usize % align)) % align;
        b.advance(skip);
        b.truncate(len_bytes);
        assert!(is_aligned_ptr(b.as_ptr()), "aligned buffer is misaligned");
        AlignedBuf(b)
    }

    /// A copy of `data` in an aligned buffer.
    pub fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.0.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes_mut(self) -> BytesMut {
        self.0
    }

    pub fn freeze(self) -> Bytes {
        self.0.freeze()
    }
}

/// Whether a buffer address is suitably aligned for O_DIRECT.
pub fn is_aligned_ptr(p: *const u8) -> bool {
    (p as usize) % (ALIGN_BYTES as usize) == 0
}

/// `offset` rounded down to an alignment boundary.
pub fn align_down(offset: u64) -> u64 {
    offset - offset % ALIGN_BYTES
}

/// `offset` rounded up to an alignment boundary.
pub fn align_up(offset: u64) -> u64 {
    align_down(offset + ALIGN_BYTES - 1)
}

/// The smallest aligned range `[start, end)` covering `[offset, offset + len)`.
pub fn aligned_cover(offset: u64, len_bytes: u64) -> (u64, u64) {
    (align_down(offset), align_up(offset + len_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_zeroed_and_exact_length() {
        // Proves AlignedBuf yields aligned, zeroed buffers of the asked length.
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(is_aligned_ptr(b.as_slice().as_ptr()));
            assert!(b.as_slice().iter().all(|&x| x == 0));
            let bm = b.into_bytes_mut();
            assert!(is_aligned_ptr(bm.as_ptr()), "conversion must not copy");
        }
    }

    #[test]
    fn aligned_cover_rounds_outward() {
        // Proves the cover of a range starts at or before it and ends at or after it, aligned.
        assert_eq!(aligned_cover(0, 4096), (0, 4096));
        assert_eq!(aligned_cover(1, 1), (0, 4096));
        assert_eq!(aligned_cover(4095, 2), (0, 8192));
        assert_eq!(aligned_cover(8192, 0), (8192, 8192));
    }
}
