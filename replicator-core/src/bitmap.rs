//! The out-of-sync bitmap: one bit per block of `block_bytes` (default 4 KiB)
//! of the data area, set when the block differs or may differ from the peer.
//!
//! Owns the in-memory bit array, its incrementally kept population count, the
//! word-wise scans used by resync, the run-length code used to exchange
//! bitmaps over the wire and the tracking of which 4 KiB pages of the on-disk
//! bitmap changed since they were last persisted. Must not do I/O: pages come
//! in and go out as byte slices.
//!
//! # Byte ranges and partial blocks
//!
//! [`Bitmap::set_range`] marks every block the range touches, even partly: a
//! block that may differ must be resynced. [`Bitmap::clear_range`] clears only
//! blocks the range covers entirely: a partial write does not prove the rest
//! of the block is in sync. The last block of the device may be shorter than
//! `block_bytes`; a range that reaches the end of the device covers it.
//!
//! # On-disk representation
//!
//! Block `b` is bit `b % 64` of 64-bit word `b / 64`; words are stored
//! little-endian, back to back, in pages of [`BITMAP_PAGE_BYTES`]. Bits past
//! the last block are zero.
//!
//! # Wire chunks
//!
//! A chunk starting at block `s` begins with a tag byte:
//! - `0`, run-length code: unsigned LEB128 varints, alternating run lengths
//!   of clear and set blocks, starting with a clear run (which may be 0);
//!   every later run is at least 1. The chunk ends on a run boundary.
//! - `1`, raw bits: block `s + 8*i + j` is bit `j` of byte `i`; the chunk
//!   covers `8 * len` blocks (fewer at the end of the bitmap, with the unused
//!   high bits zero).
//!
//! The encoder picks whichever covers more blocks within the budget, so a
//! sparse bitmap costs a few bytes and a dense, scattered one at most about
//! one bit per block. The next chunk starts where the previous one ended.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::types::BlockIndex;

/// Default bitmap granularity in bytes per bit.
pub const DEFAULT_BITMAP_BLOCK_BYTES: u32 = 4096;
/// Smallest accepted granularity.
pub const MIN_BITMAP_BLOCK_BYTES: u32 = 4096;
/// Largest accepted granularity (DRBD 9.3 allows up to 1 MiB per bit).
pub const MAX_BITMAP_BLOCK_BYTES: u32 = 1024 * 1024;
/// Size of one page of the on-disk bitmap, the unit of persistence.
pub const BITMAP_PAGE_BYTES: usize = 4096;
/// Most blocks a bitmap may track: 2^32 bits = 512 MiB of RAM, 16 TiB at 4 KiB.
pub const MAX_BITMAP_BLOCKS: u64 = 1 << 32;

const WORD_BITS: u64 = 64;
const WORDS_PER_PAGE: usize = BITMAP_PAGE_BYTES / 8;
const BITS_PER_PAGE: u64 = (BITMAP_PAGE_BYTES as u64) * 8;
/// Longest LEB128 encoding of a u64.
const MAX_VARINT_BYTES: usize = 10;
/// Smallest chunk budget: the tag plus one clear run and one set run.
pub const MIN_RLE_CHUNK_BYTES: usize = 1 + 2 * MAX_VARINT_BYTES;
/// Chunk tag: run-length varints follow.
const CHUNK_TAG_RLE: u8 = 0;
/// Chunk tag: raw bits follow, 8 blocks per byte, lowest bit first.
const CHUNK_TAG_RAW: u8 = 1;

/// Errors of bitmap construction, ranges, merges, pages and run-length code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitmapError {
    /// The granularity is not a power of two within the accepted bounds.
    #[error("bitmap block size {block_bytes} bytes is not a power of two between {MIN_BITMAP_BLOCK_BYTES} and {MAX_BITMAP_BLOCK_BYTES}")]
    BadBlockSize {
        /// The rejected granularity.
        block_bytes: u32,
    },
    /// The device needs more bits than [`MAX_BITMAP_BLOCKS`].
    #[error("a bitmap of {blocks} blocks exceeds the limit of {MAX_BITMAP_BLOCKS}")]
    TooLarge {
        /// Blocks requested.
        blocks: u64,
    },
    /// A byte range reaches past the end of the data area.
    #[error(
        "range at offset {offset} of {len_bytes} bytes exceeds the bitmap's {size_bytes} bytes"
    )]
    RangeOutOfBounds {
        /// Range start.
        offset: u64,
        /// Range length.
        len_bytes: u64,
        /// Size of the data area.
        size_bytes: u64,
    },
    /// Two bitmaps of different geometry cannot be merged.
    #[error("cannot merge a bitmap of {other_blocks} blocks of {other_block_bytes} bytes into one of {blocks} blocks of {block_bytes} bytes")]
    GeometryMismatch {
        /// This bitmap's blocks.
        blocks: u64,
        /// This bitmap's granularity.
        block_bytes: u32,
        /// The other bitmap's blocks.
        other_blocks: u64,
        /// The other bitmap's granularity.
        other_block_bytes: u32,
    },
    /// A page index or page length is wrong.
    #[error("bitmap page {page} invalid: {detail}")]
    BadPage {
        /// Page index.
        page: u64,
        /// What is wrong.
        detail: String,
    },
    /// The run-length code is malformed or runs past the end of the bitmap.
    #[error("bitmap run-length code invalid at byte {at}: {detail}")]
    BadRle {
        /// Byte position in the chunk.
        at: usize,
        /// What is wrong.
        detail: String,
    },
}

/// The out-of-sync bitmap of one data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
    size_bytes: u64,
    block_bytes: u32,
    count: u64,
    /// One bit per on-disk page: set when the page changed since persisted.
    dirty: Vec<u64>,
}

/// Checks a bitmap granularity: a power of two within bounds.
pub fn check_block_bytes(block_bytes: u32) -> Result<(), BitmapError> {
    if !block_bytes.is_power_of_two()
        || !(MIN_BITMAP_BLOCK_BYTES..=MAX_BITMAP_BLOCK_BYTES).contains(&block_bytes)
    {
        return Err(BitmapError::BadBlockSize { block_bytes });
    }
    Ok(())
}

/// Number of blocks needed to cover `size_bytes` at `block_bytes` per bit.
pub fn blocks_for(size_bytes: u64, block_bytes: u32) -> u64 {
    size_bytes.div_ceil(u64::from(block_bytes))
}

/// Bytes the on-disk bitmap of `blocks` bits occupies (whole pages).
pub fn on_disk_bytes(blocks: u64) -> u64 {
    blocks.div_ceil(BITS_PER_PAGE) * BITMAP_PAGE_BYTES as u64
}

impl Bitmap {
    /// An all-clear bitmap for a data area of `size_bytes`.
    pub fn new(size_bytes: u64, block_bytes: u32) -> Result<Self, BitmapError> {
        check_block_bytes(block_bytes)?;
        let blocks = blocks_for(size_bytes, block_bytes);
        if blocks > MAX_BITMAP_BLOCKS {
            return Err(BitmapError::TooLarge { blocks });
        }
        let pages = blocks.div_ceil(BITS_PER_PAGE);
        // Whole pages of words, so page encoding never needs bounds juggling.
        let words = (pages as usize) * WORDS_PER_PAGE;
        Ok(Bitmap {
            words: vec![0; words],
            blocks,
            size_bytes,
            block_bytes,
            count: 0,
            dirty: vec![0; (pages as usize).div_ceil(64)],
        })
    }

    /// Bytes per bit.
    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    /// Number of blocks (bits) tracked.
    pub fn len_blocks(&self) -> u64 {
        self.blocks
    }

    /// Size of the data area in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Number of set bits, kept incrementally (O(1)).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes marked out of sync (a short last block counts its real length).
    pub fn out_of_sync_bytes(&self) -> u64 {
        let mut bytes = self.count * u64::from(self.block_bytes);
        if self.blocks > 0 && self.get(BlockIndex(self.blocks - 1)) {
            bytes -= self.blocks * u64::from(self.block_bytes) - self.size_bytes;
        }
        bytes
    }

    /// Byte range `(offset, len_bytes)` of a block, clipped to the data area.
    pub fn block_range_bytes(&self, block: BlockIndex) -> (u64, u64) {
        let start = block.0 * u64::from(self.block_bytes);
        let end = (start + u64::from(self.block_bytes)).min(self.size_bytes);
        (start, end.saturating_sub(start))
    }

    /// Whether block `block` is set; blocks past the end read as clear.
    pub fn get(&self, block: BlockIndex) -> bool {
        if block.0 >= self.blocks {
            return false;
        }
        self.words[(block.0 / WORD_BITS) as usize] & (1 << (block.0 % WORD_BITS)) != 0
    }

    fn check_range(&self, offset: u64, len_bytes: u64) -> Result<(), BitmapError> {
        match offset.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(BitmapError::RangeOutOfBounds {
                offset,
                len_bytes,
                size_bytes: self.size_bytes,
            }),
        }
    }

    /// Marks every block the byte range touches; returns how many were newly set.
    pub fn set_range(&mut self, offset: u64, len_bytes: u64) -> Result<u64, BitmapError> {
        self.check_range(offset, len_bytes)?;
        if len_bytes == 0 {
            return Ok(0);
        }
        let bb = u64::from(self.block_bytes);
        let first = offset / bb;
        let end = (offset + len_bytes).div_ceil(bb);
        Ok(self.set_blocks(BlockIndex(first)..BlockIndex(end)))
    }

    /// Clears the blocks the byte range covers entirely; returns how many were
    /// newly cleared.
    pub fn clear_range(&mut self, offset: u64, len_bytes: u64) -> Result<u64, BitmapError> {
        self.check_range(offset, len_bytes)?;
        let bb = u64::from(self.block_bytes);
        let first = offset.div_ceil(bb);
        let end_byte = offset + len_bytes;
        let end = if end_byte == self.size_bytes {
            self.blocks
        } else {
            end_byte / bb
        };
        if first >= end {
            return Ok(0);
        }
        Ok(self.clear_blocks(BlockIndex(first)..BlockIndex(end)))
    }

    /// Sets blocks `range` (clipped to the bitmap); returns how many changed.
    pub fn set_blocks(&mut self, range: Range<BlockIndex>) -> u64 {
        self.update_blocks(range, true)
    }

    /// Clears blocks `range` (clipped to the bitmap); returns how many changed.
    pub fn clear_blocks(&mut self, range: Range<BlockIndex>) -> u64 {
        self.update_blocks(range, false)
    }

    /// Sets every block (a full resync).
    pub fn set_all(&mut self) -> u64 {
        self.set_blocks(BlockIndex(0)..BlockIndex(self.blocks))
    }

    /// Clears every block.
    pub fn clear_all(&mut self) -> u64 {
        self.clear_blocks(BlockIndex(0)..BlockIndex(self.blocks))
    }

    fn update_blocks(&mut self, range: Range<BlockIndex>, set: bool) -> u64 {
        let start = range.start.0.min(self.blocks);
        let end = range.end.0.min(self.blocks);
        if start >= end {
            return 0;
        }
        let mut changed = 0u64;
        let first_word = start / WORD_BITS;
        let last_word = (end - 1) / WORD_BITS;
        for w in first_word..=last_word {
            let lo = if w == first_word {
                start % WORD_BITS
            } else {
                0
            };
            let hi = if w == last_word {
                (end - 1) % WORD_BITS + 1
            } else {
                WORD_BITS
            };
            let mask = if hi - lo == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let idx = w as usize;
            let old = self.words[idx];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                self.words[idx] = new;
                let diff = (old ^ new).count_ones() as u64;
                changed += diff;
                self.mark_word_dirty(idx);
            }
        }
        if set {
            self.count += changed;
        } else {
            self.count -= changed;
        }
        changed
    }

    fn mark_word_dirty(&mut self, word: usize) {
        let page = word / WORDS_PER_PAGE;
        self.dirty[page / 64] |= 1 << (page % 64);
    }

    /// The first set block at or after `from`, scanning a word at a time.
    pub fn next_set(&self, from: BlockIndex) -> Option<BlockIndex> {
        self.next_with(from, false)
    }

    /// The first clear block at or after `from`.
    pub fn next_clear(&self, from: BlockIndex) -> Option<BlockIndex> {
        self.next_with(from, true)
    }

    fn next_with(&self, from: BlockIndex, want_clear: bool) -> Option<BlockIndex> {
        if from.0 >= self.blocks {
            return None;
        }
        let mut w = (from.0 / WORD_BITS) as usize;
        let last_word = ((self.blocks - 1) / WORD_BITS) as usize;
        let load = |i: usize| {
            if want_clear {
                !self.words[i]
            } else {
                self.words[i]
            }
        };
        let mut word = load(w) & (u64::MAX << (from.0 % WORD_BITS));
        loop {
            if word != 0 {
                let bit = w as u64 * WORD_BITS + u64::from(word.trailing_zeros());
                return (bit < self.blocks).then_some(BlockIndex(bit));
            }
            w += 1;
            if w > last_word {
                return None;
            }
            word = load(w);
        }
    }

    /// Iterates over maximal runs of set blocks in ascending order.
    pub fn runs(&self) -> SetRuns<'_> {
        SetRuns {
            bitmap: self,
            pos: 0,
        }
    }

    /// ORs `other` into `self` (both must have the same geometry); returns how
    /// many blocks were newly set.
    pub fn merge(&mut self, other: &Bitmap) -> Result<u64, BitmapError> {
        if other.blocks != self.blocks || other.block_bytes != self.block_bytes {
            return Err(BitmapError::GeometryMismatch {
                blocks: self.blocks,
                block_bytes: self.block_bytes,
                other_blocks: other.blocks,
                other_block_bytes: other.block_bytes,
            });
        }
        let mut changed = 0u64;
        for i in 0..self.words.len() {
            let old = self.words[i];
            let new = old | other.words[i];
            if new != old {
                self.words[i] = new;
                changed += (old ^ new).count_ones() as u64;
                self.mark_word_dirty(i);
            }
        }
        self.count += changed;
        Ok(changed)
    }

    /// Number of pages of the on-disk bitmap.
    pub fn page_count(&self) -> u64 {
        (self.words.len() / WORDS_PER_PAGE) as u64
    }

    /// Pages changed since they were last taken, ascending.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for (i, &w) in self.dirty.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                pages.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        pages
    }

    /// Returns the dirty pages and marks them clean (call when the caller is
    /// about to persist them).
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        let pages = self.dirty_pages();
        self.dirty.iter_mut().for_each(|w| *w = 0);
        pages
    }

    /// Marks every page dirty (e.g. after loading from an untrusted source).
    pub fn mark_all_dirty(&mut self) {
        let pages = self.page_count();
        for p in 0..pages {
            self.dirty[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// The on-disk bytes of page `page`.
    pub fn encode_page(&self, page: u64) -> Result<Vec<u8>, BitmapError> {
        if page >= self.page_count() {
            return Err(BitmapError::BadPage {
                page,
                detail: format!("only {} pages", self.page_count()),
            });
        }
        let start = page as usize * WORDS_PER_PAGE;
        let mut out = Vec::with_capacity(BITMAP_PAGE_BYTES);
        for w in &self.words[start..start + WORDS_PER_PAGE] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        Ok(out)
    }

    /// Loads page `page` from its on-disk bytes, replacing the page's bits.
    /// Refuses a page with bits set past the last block (corrupt or foreign).
    pub fn load_page(&mut self, page: u64, bytes: &[u8]) -> Result<(), BitmapError> {
        if page >= self.page_count() {
            return Err(BitmapError::BadPage {
                page,
                detail: format!("only {} pages", self.page_count()),
            });
        }
        if bytes.len() != BITMAP_PAGE_BYTES {
            return Err(BitmapError::BadPage {
                page,
                detail: format!("{} bytes, expected {BITMAP_PAGE_BYTES}", bytes.len()),
            });
        }
        let start = page as usize * WORDS_PER_PAGE;
        let mut new_words = [0u64; WORDS_PER_PAGE];
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            new_words[i] = u64::from_le_bytes(b);
            let first_bit = (start + i) as u64 * WORD_BITS;
            let valid_bits = self.blocks.saturating_sub(first_bit).min(WORD_BITS);
            let valid_mask = if valid_bits == WORD_BITS {
                u64::MAX
            } else {
                (1u64 << valid_bits) - 1
            };
            if new_words[i] & !valid_mask != 0 {
                return Err(BitmapError::BadPage {
                    page,
                    detail: format!(
                        "bits set past the last block {} in word {}",
                        self.blocks,
                        start + i
                    ),
                });
            }
        }
        for (i, &new) in new_words.iter().enumerate() {
            let idx = start + i;
            let old = self.words[idx];
            self.count -= old.count_ones() as u64;
            self.count += new.count_ones() as u64;
            self.words[idx] = new;
        }
        Ok(())
    }

    /// Encodes the bitmap from block `start` into one wire chunk of at most
    /// `max_bytes` (at least [`MIN_RLE_CHUNK_BYTES`]): run-length code, or raw
    /// bits when that covers more blocks in the same budget (dense, scattered
    /// bitmaps). Returns the chunk and the block where the next chunk starts
    /// (`len_blocks()` when done). Every chunk makes progress unless `start`
    /// is already at the end.
    pub fn encode_rle(&self, start: BlockIndex, max_bytes: usize) -> (Bytes, BlockIndex) {
        assert!(
            max_bytes >= MIN_RLE_CHUNK_BYTES,
            "bitmap chunk budget {max_bytes} below {MIN_RLE_CHUNK_BYTES}"
        );
        let start = start.0.min(self.blocks);
        let budget = max_bytes - 1;
        let (runs, rle_end) = self.encode_runs(start, budget);
        let raw_end = start.saturating_add(8 * budget as u64).min(self.blocks);
        if raw_end <= rle_end {
            let mut out = BytesMut::with_capacity(1 + runs.len());
            out.put_u8(CHUNK_TAG_RLE);
            out.put_slice(&runs);
            return (out.freeze(), BlockIndex(rle_end));
        }
        let mut out = BytesMut::with_capacity(1 + ((raw_end - start) as usize).div_ceil(8));
        out.put_u8(CHUNK_TAG_RAW);
        let mut pos = start;
        while pos < raw_end {
            let n = (raw_end - pos).min(WORD_BITS);
            let bits = self.bits_at(pos, n);
            out.put_slice(&bits.to_le_bytes()[..(n as usize).div_ceil(8)]);
            pos += n;
        }
        (out.freeze(), BlockIndex(raw_end))
    }

    /// Run-length varints from `start` within `budget` bytes.
    fn encode_runs(&self, start: u64, budget: usize) -> (Vec<u8>, u64) {
        let mut out = Vec::with_capacity(budget.min(4096));
        let mut pos = start;
        let mut want_set = false;
        while pos < self.blocks {
            let next = if want_set {
                self.next_clear(BlockIndex(pos))
            } else {
                self.next_set(BlockIndex(pos))
            };
            let run_end = next.map_or(self.blocks, |b| b.0);
            let mut buf = [0u8; MAX_VARINT_BYTES];
            let n = put_varint(&mut buf, run_end - pos);
            // A clear run must be followed by a set run in the same chunk,
            // unless it reaches the end, so reserve room for both.
            let reserve = if !want_set && run_end < self.blocks {
                MAX_VARINT_BYTES
            } else {
                0
            };
            if out.len() + n + reserve > budget {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            pos = run_end;
            want_set = !want_set;
        }
        (out, pos)
    }

    /// `n` (1..=64) bits starting at block `pos`, block `pos` in bit 0.
    fn bits_at(&self, pos: u64, n: u64) -> u64 {
        let w = (pos / WORD_BITS) as usize;
        let off = pos % WORD_BITS;
        let mut bits = self.words[w] >> off;
        if off > 0 && w + 1 < self.words.len() {
            bits |= self.words[w + 1] << (WORD_BITS - off);
        }
        if n < WORD_BITS {
            bits &= (1u64 << n) - 1;
        }
        bits
    }

    /// ORs `bits` (already masked to the bitmap) in at block `pos`.
    fn or_bits(&mut self, pos: u64, bits: u64) {
        let w = (pos / WORD_BITS) as usize;
        let off = pos % WORD_BITS;
        let mut parts = [(w, bits << off), (w + 1, 0)];
        if off > 0 {
            parts[1].1 = bits >> (WORD_BITS - off);
        }
        for (idx, part) in parts {
            if part == 0 {
                continue;
            }
            let old = self.words[idx];
            let new = old | part;
            if new != old {
                self.words[idx] = new;
                self.count += (old ^ new).count_ones() as u64;
                self.mark_word_dirty(idx);
            }
        }
    }

    /// Decodes a chunk made by [`Bitmap::encode_rle`] starting at `start`
    /// and ORs its set blocks into the bitmap. Returns the block where the
    /// chunk ended. A malformed chunk changes nothing.
    pub fn apply_rle(
        &mut self,
        start: BlockIndex,
        chunk: &[u8],
    ) -> Result<BlockIndex, BitmapError> {
        let bad = |at: usize, detail: String| BitmapError::BadRle { at, detail };
        if start.0 > self.blocks {
            return Err(bad(
                0,
                format!(
                    "chunk starts at block {} past the end {}",
                    start.0, self.blocks
                ),
            ));
        }
        match chunk.first() {
            None => Err(bad(0, "empty chunk (no encoding tag)".to_string())),
            Some(&CHUNK_TAG_RLE) => {
                let runs = decode_rle(start, self.blocks, &chunk[1..]).map_err(|e| match e {
                    BitmapError::BadRle { at, detail } => bad(at + 1, detail),
                    other => other,
                })?;
                let mut end = start;
                for (range, is_set) in runs {
                    if is_set {
                        self.set_blocks(range.clone());
                    }
                    end = range.end;
                }
                Ok(end)
            }
            Some(&CHUNK_TAG_RAW) => {
                let raw = &chunk[1..];
                let remaining = self.blocks - start.0;
                let covered = (8 * raw.len() as u64).min(remaining);
                if raw.is_empty() || raw.len() as u64 != covered.div_ceil(8) {
                    return Err(bad(
                        1,
                        format!("{} raw bytes for {remaining} remaining blocks", raw.len()),
                    ));
                }
                if covered % 8 != 0 && raw[raw.len() - 1] >> (covered % 8) != 0 {
                    return Err(bad(raw.len(), "bits set past the end".to_string()));
                }
                let mut pos = start.0;
                for group in raw.chunks(8) {
                    let mut b = [0u8; 8];
                    b[..group.len()].copy_from_slice(group);
                    self.or_bits(pos, u64::from_le_bytes(b));
                    pos += 64;
                }
                Ok(BlockIndex(start.0 + covered))
            }
            Some(&tag) => Err(bad(0, format!("unknown chunk encoding {tag}"))),
        }
    }
}

/// Decodes run-length varints starting at `start` into `(blocks, is_set)`
/// runs, checking that they stay within `total_blocks`.
fn decode_rle(
    start: BlockIndex,
    total_blocks: u64,
    rle: &[u8],
) -> Result<Vec<(Range<BlockIndex>, bool)>, BitmapError> {
    let mut runs = Vec::new();
    let mut pos = start.0;
    let mut at = 0usize;
    let mut is_set = false;
    let mut first = true;
    while at < rle.len() {
        let (run, n) = get_varint(&rle[at..]).ok_or_else(|| BitmapError::BadRle {
            at,
            detail: "truncated or overlong varint".to_string(),
        })?;
        if run == 0 && !first {
            return Err(BitmapError::BadRle {
                at,
                detail: "zero-length run".to_string(),
            });
        }
        let end = pos
            .checked_add(run)
            .filter(|&e| e <= total_blocks)
            .ok_or_else(|| BitmapError::BadRle {
                at,
                detail: format!("run of {run} blocks from {pos} passes the end {total_blocks}"),
            })?;
        if run > 0 {
            runs.push((BlockIndex(pos)..BlockIndex(end), is_set));
        }
        pos = end;
        at += n;
        is_set = !is_set;
        first = false;
    }
    Ok(runs)
}

fn put_varint(buf: &mut [u8; MAX_VARINT_BYTES], mut v: u64) -> usize {
    let mut n = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf[n] = byte;
            return n + 1;
        }
        buf[n] = byte | 0x80;
        n += 1;
    }
}

/// Reads one LEB128 varint; `None` if truncated, longer than 10 bytes or
/// overflowing u64.
fn get_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(MAX_VARINT_BYTES) {
        let part = u64::from(b & 0x7f);
        if i == MAX_VARINT_BYTES - 1 && part > 1 {
            return None;
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Iterator over maximal runs of set blocks (see [`Bitmap::runs`]).
#[derive(Debug)]
pub struct SetRuns<'a> {
    bitmap: &'a Bitmap,
    pos: u64,
}

impl Iterator for SetRuns<'_> {
    type Item = Range<BlockIndex>;

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.bitmap.next_set(BlockIndex(self.pos))?;
        let end = self
            .bitmap
            .next_clear(start)
            .unwrap_or(BlockIndex(self.bitmap.blocks));
        self.pos = end.0;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BB: u32 = 4096;

    fn model_set(model: &mut [bool], offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let bb = u64::from(BB);
        for b in offset / bb..(offset + len).div_ceil(bb) {
            model[b as usize] = true;
        }
    }

    fn model_clear(model: &mut [bool], size: u64, offset: u64, len: u64) {
        let bb = u64::from(BB);
        for (b, bit) in model.iter_mut().enumerate() {
            let start = b as u64 * bb;
            let end = (start + bb).min(size);
            if start >= offset && end <= offset + len {
                *bit = false;
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
    }

    fn arb_case() -> impl Strategy<Value = (u64, Vec<Op>)> {
        (1u64..3_000_000).prop_flat_map(|size| {
            let op = (0..size, 0..size, any::<bool>()).prop_map(move |(a, l, set)| {
                let len = l.min(size - a);
                if set {
                    Op::Set(a, len)
                } else {
                    Op::Clear(a, len)
                }
            });
            (Just(size), proptest::collection::vec(op, 0..40))
        })
    }

    proptest! {
        #[test]
        fn bitmap_matches_a_vec_bool_model((size, ops) in arb_case()) {
            // Proves set_range/clear_range (partial-block rules), count,
            // next_set, next_clear and runs agree with a naive model.
            let mut bm = Bitmap::new(size, BB).expect("valid");
            let mut model = vec![false; blocks_for(size, BB) as usize];
            for op in ops {
                match op {
                    Op::Set(o, l) => { bm.set_range(o, l).expect("in range"); model_set(&mut model, o, l) }
                    Op::Clear(o, l) => { bm.clear_range(o, l).expect("in range"); model_clear(&mut model, size, o, l) }
                }
            }
            prop_assert_eq!(bm.count(), model.iter().filter(|&&b| b).count() as u64);
            for (i, &bit) in model.iter().enumerate() {
                prop_assert_eq!(bm.get(BlockIndex(i as u64)), bit);
                let want_set = model[i..].iter().position(|&b| b).map(|p| BlockIndex((i + p) as u64));
                prop_assert_eq!(bm.next_set(BlockIndex(i as u64)), want_set);
                let want_clear = model[i..].iter().position(|&b| !b).map(|p| BlockIndex((i + p) as u64));
                prop_assert_eq!(bm.next_clear(BlockIndex(i as u64)), want_clear);
            }
            let from_runs: u64 = bm.runs().map(|r| r.end.0 - r.start.0).sum();
            prop_assert_eq!(from_runs, bm.count());
            let expected_bytes: u64 = model.iter().enumerate().filter(|(_, &b)| b)
                .map(|(i, _)| bm.block_range_bytes(BlockIndex(i as u64)).1).sum();
            prop_assert_eq!(bm.out_of_sync_bytes(), expected_bytes);
        }

        #[test]
        fn rle_chunks_reproduce_the_bitmap((size, ops) in arb_case(), budget in MIN_RLE_CHUNK_BYTES..64) {
            // Proves a bitmap sent as RLE chunks of any budget rebuilds
            // exactly on the receiver, and every chunk respects its budget.
            let mut bm = Bitmap::new(size, BB).expect("valid");
            for op in ops {
                if let Op::Set(o, l) = op { bm.set_range(o, l).expect("in range"); }
            }
            let mut rx = Bitmap::new(size, BB).expect("valid");
            let mut pos = BlockIndex(0);
            let mut chunks = 0;
            while pos.0 < bm.len_blocks() {
                let (code, next) = bm.encode_rle(pos, budget);
                prop_assert!(code.len() <= budget);
                prop_assert!(next > pos, "chunk must make progress");
                prop_assert_eq!(rx.apply_rle(pos, &code), Ok(next));
                pos = next;
                chunks += 1;
                prop_assert!(chunks <= bm.len_blocks() + 1);
            }
            prop_assert_eq!(rx.count(), bm.count());
            prop_assert_eq!(rx.runs().collect::<Vec<_>>(), bm.runs().collect::<Vec<_>>());
        }

        #[test]
        fn random_bits_survive_chunking_at_any_offset(
            bits in proptest::collection::vec(any::<bool>(), 0..2000),
            budget in MIN_RLE_CHUNK_BYTES..80,
            preset in proptest::collection::vec(0u64..2000, 0..20),
        ) {
            // Proves RLE and raw chunks (chosen per chunk) rebuild random
            // bitmaps exactly, starting at unaligned blocks, and that applying
            // ORs into bits the receiver already had.
            let n = bits.len() as u64;
            let mut bm = Bitmap::new(n * u64::from(BB), BB).expect("valid");
            for (i, &b) in bits.iter().enumerate() {
                if b { bm.set_blocks(BlockIndex(i as u64)..BlockIndex(i as u64 + 1)); }
            }
            let mut rx = Bitmap::new(bm.size_bytes(), BB).expect("valid");
            let mut expected = bm.clone();
            for p in preset.into_iter().filter(|&p| p < n) {
                rx.set_blocks(BlockIndex(p)..BlockIndex(p + 1));
                expected.set_blocks(BlockIndex(p)..BlockIndex(p + 1));
            }
            let mut pos = BlockIndex(0);
            while pos.0 < n {
                let (chunk, next) = bm.encode_rle(pos, budget);
                prop_assert!(chunk.len() <= budget && next > pos);
                prop_assert_eq!(rx.apply_rle(pos, &chunk), Ok(next));
                pos = next;
            }
            prop_assert_eq!(rx.count(), expected.count());
            prop_assert_eq!(rx.runs().collect::<Vec<_>>(), expected.runs().collect::<Vec<_>>());
        }

        #[test]
        fn arbitrary_rle_never_panics(start in 0u64..200, code in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Proves a hostile run-length chunk is refused or applied within
            // bounds, never panics and never sets bits past the end.
            let mut bm = Bitmap::new(100 * u64::from(BB), BB).expect("valid");
            if let Ok(end) = bm.apply_rle(BlockIndex(start), &code) {
                prop_assert!(end.0 <= 100);
            }
            prop_assert!(bm.count() <= 100);
        }
    }

    #[test]
    fn partial_block_write_sets_but_does_not_clear() {
        // Proves the documented asymmetry: a partial range marks the block but
        // cannot clear it; a range covering the short last block clears it.
        let mut bm = Bitmap::new(3 * 4096 + 100, BB).expect("valid");
        assert_eq!(bm.len_blocks(), 4);
        assert_eq!(bm.set_range(4095, 2), Ok(2));
        assert_eq!(bm.clear_range(0, 4096 + 4095), Ok(1));
        assert!(bm.get(BlockIndex(1)));
        assert_eq!(bm.set_range(3 * 4096 + 50, 1), Ok(1));
        assert_eq!(bm.out_of_sync_bytes(), 4096 + 100);
        assert_eq!(bm.clear_range(3 * 4096, 100), Ok(1));
        assert_eq!(bm.count(), 1);
    }

    #[test]
    fn out_of_bounds_ranges_and_bad_geometry_are_errors() {
        // Proves ranges past the end (or overflowing) and invalid granularities
        // are refused instead of panicking.
        let mut bm = Bitmap::new(8192, BB).expect("valid");
        assert!(matches!(
            bm.set_range(8000, 200),
            Err(BitmapError::RangeOutOfBounds { .. })
        ));
        assert!(matches!(
            bm.clear_range(u64::MAX, 2),
            Err(BitmapError::RangeOutOfBounds { .. })
        ));
        assert_eq!(
            Bitmap::new(8192, 3000).unwrap_err(),
            BitmapError::BadBlockSize { block_bytes: 3000 }
        );
        assert!(matches!(
            Bitmap::new(u64::MAX, BB),
            Err(BitmapError::TooLarge { .. })
        ));
        let other = Bitmap::new(4096, BB).expect("valid");
        assert!(matches!(
            bm.merge(&other),
            Err(BitmapError::GeometryMismatch { .. })
        ));
    }

    #[test]
    fn merge_ors_bits_and_counts_new_ones() {
        // Proves merge is a bitwise OR and that count stays exact.
        let mut a = Bitmap::new(1 << 20, BB).expect("valid");
        let mut b = a.clone();
        a.set_blocks(BlockIndex(0)..BlockIndex(10));
        b.set_blocks(BlockIndex(5)..BlockIndex(20));
        assert_eq!(a.merge(&b), Ok(10));
        assert_eq!(a.count(), 20);
        assert_eq!(
            a.runs().collect::<Vec<_>>(),
            vec![BlockIndex(0)..BlockIndex(20)]
        );
    }

    #[test]
    fn dirty_pages_track_changed_pages_and_reload_round_trips() {
        // Proves only pages whose bits changed are reported dirty, that taking
        // them resets tracking, and that encode_page/load_page round trip.
        let mut bm = Bitmap::new(4 * BITS_PER_PAGE * u64::from(BB), BB).expect("valid");
        assert_eq!(bm.page_count(), 4);
        bm.set_blocks(BlockIndex(BITS_PER_PAGE * 2 + 5)..BlockIndex(BITS_PER_PAGE * 2 + 6));
        bm.set_blocks(BlockIndex(BITS_PER_PAGE - 1)..BlockIndex(BITS_PER_PAGE + 1));
        assert_eq!(bm.take_dirty_pages(), vec![0, 1, 2]);
        assert!(bm.dirty_pages().is_empty());
        bm.set_blocks(BlockIndex(0)..BlockIndex(1));
        bm.set_blocks(BlockIndex(0)..BlockIndex(1));
        assert_eq!(bm.dirty_pages(), vec![0]);

        let mut loaded = Bitmap::new(bm.size_bytes(), BB).expect("valid");
        for p in 0..bm.page_count() {
            loaded
                .load_page(p, &bm.encode_page(p).expect("page"))
                .expect("load");
        }
        assert_eq!(loaded.count(), bm.count());
        assert_eq!(
            loaded.runs().collect::<Vec<_>>(),
            bm.runs().collect::<Vec<_>>()
        );
    }

    #[test]
    fn page_with_bits_past_the_end_is_refused() {
        // Proves load_page rejects a page that sets bits beyond the last block
        // (foreign or corrupt metadata) and leaves the count untouched.
        let mut bm = Bitmap::new(10 * u64::from(BB), BB).expect("valid");
        let mut page = vec![0u8; BITMAP_PAGE_BYTES];
        page[0] = 0xff;
        page[1] = 0x04; // bit 10: the 11th block of a 10-block bitmap
        assert!(matches!(
            bm.load_page(0, &page),
            Err(BitmapError::BadPage { page: 0, .. })
        ));
        assert_eq!(bm.count(), 0);
        assert!(bm.load_page(0, &page[..100]).is_err());
        assert!(bm.load_page(1, &page).is_err());
    }

    #[test]
    fn rle_of_a_huge_sparse_bitmap_fits_one_chunk() {
        // Proves the run-length code stays tiny for sparse bitmaps: a 1 TiB
        // device with three dirty runs encodes in a handful of bytes.
        let mut bm = Bitmap::new(1 << 40, BB).expect("valid");
        bm.set_blocks(BlockIndex(7)..BlockIndex(9));
        bm.set_blocks(BlockIndex(1 << 20)..BlockIndex((1 << 20) + 1));
        bm.set_blocks(BlockIndex((1 << 28) - 1)..BlockIndex(1 << 28));
        let (code, next) = bm.encode_rle(BlockIndex(0), 1024);
        assert_eq!(next, BlockIndex(1 << 28));
        assert!(code.len() < 32, "{} bytes", code.len());
        // Pinned encoding: RLE tag, then the first runs: clear 7, set 2.
        assert_eq!(&code[..3], &[0, 7, 2]);
    }

    #[test]
    fn malformed_chunks_are_refused_with_position() {
        // Proves zero-length runs, runs past the end, truncated varints,
        // unknown tags, wrong raw lengths and raw bits past the end are errors
        // naming the byte position, and that a refused chunk changes nothing.
        let mut bm = Bitmap::new(100 * u64::from(BB), BB).expect("valid");
        let at = |r: Result<BlockIndex, BitmapError>| match r {
            Err(BitmapError::BadRle { at, .. }) => at,
            other => panic!("expected BadRle, got {other:?}"),
        };
        assert_eq!(at(bm.apply_rle(BlockIndex(0), &[0, 1, 0])), 2);
        assert_eq!(at(bm.apply_rle(BlockIndex(0), &[0, 50, 51])), 2);
        assert_eq!(at(bm.apply_rle(BlockIndex(0), &[0, 0x80])), 1);
        assert_eq!(at(bm.apply_rle(BlockIndex(0), &[])), 0);
        assert_eq!(at(bm.apply_rle(BlockIndex(0), &[7, 1])), 0);
        assert_eq!(at(bm.apply_rle(BlockIndex(101), &[0])), 0);
        // Raw: 100 blocks need 13 bytes; 14 is too many, bit 100 is past the end.
        assert_eq!(
            at(bm.apply_rle(BlockIndex(0), &[&[1u8][..], &[0; 14]].concat())),
            1
        );
        let mut past_end = vec![1u8];
        past_end.extend_from_slice(&[0; 13]);
        past_end[13] = 0x10;
        assert_eq!(at(bm.apply_rle(BlockIndex(0), &past_end)), 13);
        assert_eq!(bm.count(), 0);
        assert_eq!(
            bm.apply_rle(BlockIndex(0), &[0, 0, 100]),
            Ok(BlockIndex(100))
        );
        assert_eq!(bm.count(), 100);
    }

    #[test]
    fn dense_scattered_bitmap_uses_raw_chunks_of_one_bit_per_block() {
        // Proves the encoder switches to raw bits when runs are short: every
        // other block set costs about one bit per block, not a byte per run,
        // and the chunks rebuild the bitmap exactly.
        let blocks = 100_000u64;
        let mut bm = Bitmap::new(blocks * u64::from(BB), BB).expect("valid");
        for b in (0..blocks).step_by(2) {
            bm.set_blocks(BlockIndex(b)..BlockIndex(b + 1));
        }
        let mut rx = Bitmap::new(bm.size_bytes(), BB).expect("valid");
        let (mut pos, mut total_bytes) = (BlockIndex(0), 0usize);
        while pos.0 < blocks {
            let (chunk, next) = bm.encode_rle(pos, 1024);
            assert_eq!(chunk[0], CHUNK_TAG_RAW);
            total_bytes += chunk.len();
            assert_eq!(rx.apply_rle(pos, &chunk), Ok(next));
            pos = next;
        }
        assert!(
            total_bytes as u64 <= blocks / 8 + blocks / 8 / 1000 + 2,
            "{total_bytes}"
        );
        assert_eq!(rx.count(), blocks / 2);
        assert_eq!(rx.runs().collect::<Vec<_>>(), bm.runs().collect::<Vec<_>>());
    }
}
