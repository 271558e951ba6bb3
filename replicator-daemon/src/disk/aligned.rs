//! Buffers whose start is aligned for O_DIRECT, a bounded pool of them, and
//! the arithmetic of aligned ranges.
//!
//! Owns [`ALIGN_BYTES`], [`AlignedBuf`] and [`BufPool`]. An `AlignedBuf` is a
//! `BytesMut` whose data pointer is a multiple of [`ALIGN_BYTES`]: it is made
//! by over-allocating and advancing to the first aligned byte, so no
//! allocator tricks and no `unsafe` are needed, and it converts to
//! `BytesMut`/`Bytes` without a copy.
//!
//! A [`BufPool`] keeps such buffers for reuse, so that the I/O path does not
//! allocate, zero and page-fault a fresh buffer per request (with glibc a
//! large one is an mmap, page faults and an munmap each time), and large
//! buffers are not freed on many threads to pile up in per-thread malloc
//! arenas (which once grew a resync target to 536 MiB; the pool replaced a
//! fixed mmap threshold that kept that down). A [`PoolBuf`] goes back to
//! its pool when dropped, also as the owner of a `Bytes`
//! ([`PoolBuf::freeze`]), so a read's buffer returns once the NBD reply is
//! sent. The pool keeps at most
//! [`POOL_IDLE_CAP_BYTES`] of idle buffers (DESIGN.md invariant 8); buffers
//! in use are bounded by whoever holds them (in-flight windows). This
//! module does no I/O.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Buf, Bytes, BytesMut};

use super::huge::{advise_huge_pages, HUGE_PAGE_BYTES};

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

/// Smallest size class of a [`BufPool`]; classes double from here.
pub const POOL_MIN_CLASS_BYTES: usize = ALIGN_BYTES as usize;
/// Largest size class of a [`BufPool`]; a longer buffer is allocated afresh
/// for each use and freed after it.
pub const POOL_MAX_CLASS_BYTES: usize = 4 * 1024 * 1024;
/// Idle bytes the process-wide pool ([`BufPool::shared`]) keeps at most,
/// counting each buffer's whole allocation (its class plus the alignment
/// slack of [`ALIGN_BYTES`]).
pub const POOL_IDLE_CAP_BYTES: usize = 32 * 1024 * 1024;
/// Classes from this size up are carved out of slabs backed by transparent
/// huge pages (see [`super::huge`]): a [`HUGE_PAGE_BYTES`]-aligned slab of
/// at least one huge page, split into buffers of the class.
pub const POOL_HUGE_MIN_CLASS_BYTES: usize = 256 * 1024;
/// Number of size classes: 4 KiB, 8 KiB, ... 4 MiB.
const POOL_CLASSES: usize =
    (POOL_MAX_CLASS_BYTES / POOL_MIN_CLASS_BYTES).trailing_zeros() as usize + 1;

const _: () = assert!(POOL_MIN_CLASS_BYTES << (POOL_CLASSES - 1) == POOL_MAX_CLASS_BYTES);

/// The size class a buffer of `len_bytes` is taken from, if it is pooled.
fn class_of(len_bytes: usize) -> Option<usize> {
    if len_bytes > POOL_MAX_CLASS_BYTES {
        return None;
    }
    let units = len_bytes.div_ceil(POOL_MIN_CLASS_BYTES).max(1);
    Some(units.next_power_of_two().trailing_zeros() as usize)
}

fn class_bytes(class: usize) -> usize {
    POOL_MIN_CLASS_BYTES << class
}

/// What an idle buffer of `class` counts against the cap: its allocation.
fn class_cost_bytes(class: usize) -> usize {
    class_bytes(class) + ALIGN_BYTES as usize
}

/// Reusable aligned buffers in power-of-two size classes from
/// [`POOL_MIN_CLASS_BYTES`] to [`POOL_MAX_CLASS_BYTES`], at most
/// `idle_cap_bytes` of them idle. A returned buffer that would go over the
/// cap first evicts idle buffers of size classes taken from less recently
/// than its own (so the pool follows the workload), else it is freed.
pub struct BufPool {
    idle_cap_bytes: usize,
    /// Large classes come from huge-page slabs ([`BufPool::with_huge_slabs`]).
    huge_slabs: bool,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// Idle buffers per class; each `BytesMut` is aligned and has a
    /// capacity of at least its class.
    idle: [Vec<BytesMut>; POOL_CLASSES],
    idle_bytes: usize,
    /// Per class, `clock` at its latest take (0: never taken).
    last_take: [u64; POOL_CLASSES],
    clock: u64,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("idle_cap_bytes", &self.idle_cap_bytes)
            .field("idle_bytes", &self.idle_bytes())
            .finish()
    }
}

impl BufPool {
    /// An empty pool that keeps at most `idle_cap_bytes` idle; every new
    /// buffer is an allocation of its own.
    pub fn new(idle_cap_bytes: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            idle_cap_bytes,
            huge_slabs: false,
            state: Mutex::new(PoolState::default()),
        })
    }

    /// Like [`BufPool::new`], but buffers of [`POOL_HUGE_MIN_CLASS_BYTES`]
    /// and more are carved out of huge-page slabs (see [`huge_slab`]).
    pub fn with_huge_slabs(idle_cap_bytes: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            idle_cap_bytes,
            huge_slabs: true,
            state: Mutex::new(PoolState::default()),
        })
    }

    /// The process-wide pool (cap [`POOL_IDLE_CAP_BYTES`], huge-page
    /// slabs) that disk engines and NBD targets share, so the cap bounds
    /// the whole process.
    pub fn shared() -> Arc<BufPool> {
        static SHARED: OnceLock<Arc<BufPool>> = OnceLock::new();
        SHARED
            .get_or_init(|| BufPool::with_huge_slabs(POOL_IDLE_CAP_BYTES))
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // The state is consistent after every statement that changes it, so
        // a panic elsewhere while it was held leaves nothing half done.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes held by idle buffers (counted as in the cap).
    pub fn idle_bytes(&self) -> usize {
        self.lock().idle_bytes
    }

    /// A buffer of `len_bytes` whose start is aligned to [`ALIGN_BYTES`].
    /// Its contents are unspecified (zeroes, or bytes of an earlier use):
    /// the caller overwrites every byte it exposes. A reused buffer is not
    /// zeroed; only the part beyond its previous length is, when it grows.
    pub fn take(self: &Arc<Self>, len_bytes: usize) -> PoolBuf {
        let Some(class) = class_of(len_bytes) else {
            return PoolBuf {
                buf: AlignedBuf::zeroed(len_bytes).into_bytes_mut(),
                home: None,
            };
        };
        let reused = {
            let mut st = self.lock();
            st.clock += 1;
            st.last_take[class] = st.clock;
            let b = st.idle[class].pop();
            if b.is_some() {
                st.idle_bytes -= class_cost_bytes(class);
            }
            b
        };
        let buf = match reused {
            Some(mut b) => {
                // Within the capacity: neither reallocates nor moves the start.
                if b.len() >= len_bytes {
                    b.truncate(len_bytes);
                } else {
                    b.resize(len_bytes, 0);
                }
                b
            }
            None => {
                let mut b = self.fresh(class);
                b.truncate(len_bytes);
                b
            }
        };
        assert!(is_aligned_ptr(buf.as_ptr()), "pooled buffer is misaligned");
        PoolBuf {
            buf,
            home: Some((self.clone(), class)),
        }
    }

    /// A new buffer of `class` (its whole class long). Large classes come
    /// from a fresh huge-page slab; its other buffers are kept idle (as far
    /// as the cap allows: a slab's memory goes when all its buffers have).
    fn fresh(&self, class: usize) -> BytesMut {
        let bytes = class_bytes(class);
        if !self.huge_slabs || bytes < POOL_HUGE_MIN_CLASS_BYTES {
            return AlignedBuf::zeroed(bytes).into_bytes_mut();
        }
        let mut pieces = huge_slab(bytes);
        let mine = pieces.remove(0);
        for p in pieces {
            self.give_back(class, p);
        }
        mine
    }

    /// Keeps `buf` of `class` for reuse if the cap allows, else frees it.
    fn give_back(&self, class: usize, buf: BytesMut) {
        if buf.capacity() < class_bytes(class) || !is_aligned_ptr(buf.as_ptr()) {
            // Replaced by whoever borrowed it: not a buffer of this pool.
            return;
        }
        let cost = class_cost_bytes(class);
        if cost > self.idle_cap_bytes {
            return;
        }
        let mut freed = Vec::new();
        {
            let mut st = self.lock();
            while st.idle_bytes + cost > self.idle_cap_bytes {
                let mine = st.last_take[class];
                let victim = (0..POOL_CLASSES)
                    .filter(|&c| c != class && !st.idle[c].is_empty() && st.last_take[c] < mine)
                    .min_by_key(|&c| st.last_take[c]);
                let Some(v) = victim else { break };
                freed.extend(st.idle[v].pop());
                st.idle_bytes -= class_cost_bytes(v);
            }
            if st.idle_bytes + cost <= self.idle_cap_bytes {
                st.idle[class].push(buf);
                st.idle_bytes += cost;
            } else {
                freed.push(buf);
            }
        }
        // Freed outside the lock: munmap of a large buffer takes a while.
        drop(freed);
    }
}

/// A zeroed slab of whole huge pages (at least one, at least `piece`
/// bytes), aligned to [`HUGE_PAGE_BYTES`] and advised for huge pages, split
/// into buffers of `piece` bytes (a power of two from 4 KiB up). The buffers
/// share the slab's allocation, which is freed when the last one is.
fn huge_slab(piece: usize) -> Vec<BytesMut> {
    let slab = piece.max(HUGE_PAGE_BYTES);
    // calloc of this size is a fresh mmap: nothing is touched (or zeroed
    // by hand) until used, the slack included.
    let mut b = BytesMut::zeroed(slab + HUGE_PAGE_BYTES);
    let skip = (HUGE_PAGE_BYTES - (b.as_ptr() as usize % HUGE_PAGE_BYTES)) % HUGE_PAGE_BYTES;
    b.advance(skip);
    b.truncate(slab);
    advise_huge_pages(&mut b);
    let mut pieces = Vec::with_capacity(slab / piece);
    while !b.is_empty() {
        pieces.push(b.split_to(piece));
    }
    pieces
}

/// A buffer from a [`BufPool`] (aligned; contents as [`BufPool::take`]
/// says) that goes back to its pool when dropped.
pub struct PoolBuf {
    buf: BytesMut,
    /// The pool and size class to return to; `None` for an unpooled size.
    home: Option<(Arc<BufPool>, usize)>,
}

/// The pool membership of a lent-out [`PoolBuf`] (see [`PoolBuf::lend`]).
#[derive(Debug)]
pub struct PoolLoan(Option<(Arc<BufPool>, usize)>);

impl PoolBuf {
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The buffer as `Bytes`, without a copy; it goes back to the pool when
    /// the last clone or slice of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// The `BytesMut` itself, for an I/O layer that takes one by value;
    /// [`PoolLoan::restore`] makes it a `PoolBuf` again. If it is never
    /// restored it is simply freed.
    pub fn lend(mut self) -> (BytesMut, PoolLoan) {
        let buf = std::mem::take(&mut self.buf);
        (buf, PoolLoan(self.home.take()))
    }
}

impl PoolLoan {
    /// `buf` (the lent buffer, possibly truncated) back as a `PoolBuf`.
    pub fn restore(self, buf: BytesMut) -> PoolBuf {
        PoolBuf { buf, home: self.0 }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some((pool, class)) = self.home.take() {
            pool.give_back(class, std::mem::take(&mut self.buf));
        }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl AsMut<[u8]> for PoolBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuf")
            .field("len", &self.buf.len())
            .field("class", &self.home.as_ref().map(|(_, c)| class_bytes(*c)))
            .finish()
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

    fn cost(len: usize) -> usize {
        class_cost_bytes(class_of(len).expect("pooled size"))
    }

    /// A buffer of `len` from `pool`, every byte set to `mark`.
    fn marked(pool: &Arc<BufPool>, len: usize, mark: u8) -> PoolBuf {
        let mut b = pool.take(len);
        b.as_mut_slice().fill(mark);
        b
    }

    /// The mark of a reused buffer (fresh buffers are zeroed, marks are not 0).
    fn mark_of(b: &PoolBuf) -> u8 {
        b.as_slice().first().copied().unwrap_or(0)
    }

    #[test]
    fn pool_buffers_are_aligned_and_exactly_as_long_as_asked() {
        // Proves every size, pooled or not, fresh or reused, comes aligned
        // and exactly as long as asked, including after a lend and restore.
        let pool = BufPool::new(64 * 1024 * 1024);
        for round in 0..2 {
            for len in [
                0,
                1,
                511,
                4096,
                4097,
                100_000,
                1 << 20,
                POOL_MAX_CLASS_BYTES,
            ] {
                let b = pool.take(len);
                assert_eq!(b.len(), len, "round {round}");
                assert!(
                    is_aligned_ptr(b.as_slice().as_ptr()),
                    "len {len} round {round}"
                );
                let (bm, loan) = b.lend();
                assert!(is_aligned_ptr(bm.as_ptr()));
                let b = loan.restore(bm);
                assert_eq!(b.freeze().len(), len);
            }
        }
        let big = pool.take(POOL_MAX_CLASS_BYTES + 1);
        assert_eq!(big.len(), POOL_MAX_CLASS_BYTES + 1);
        assert!(is_aligned_ptr(big.as_slice().as_ptr()));
        let before = pool.idle_bytes();
        drop(big);
        assert_eq!(pool.idle_bytes(), before, "oversized buffers are not kept");
    }

    #[test]
    fn pool_reuses_a_returned_buffer_of_the_same_class_without_zeroing() {
        // Proves a dropped buffer is handed out again, not zeroed, for any
        // length of its size class (shorter or longer than its last use),
        // and is not counted idle while in use.
        let pool = BufPool::new(8 * 1024 * 1024);
        let a = marked(&pool, 1 << 20, 0xab);
        let ptr = a.as_slice().as_ptr();
        assert_eq!(pool.idle_bytes(), 0);
        drop(a);
        assert_eq!(pool.idle_bytes(), cost(1 << 20));
        let b = pool.take((1 << 20) - 4096 * 3 + 7);
        assert_eq!(mark_of(&b), 0xab, "same class reuses the buffer as it was");
        assert_eq!(b.as_slice().as_ptr(), ptr);
        assert_eq!(pool.idle_bytes(), 0);
        drop(b);
        let c = pool.take(1 << 20);
        assert_eq!(c.as_slice().as_ptr(), ptr);
        assert_eq!(c.as_slice()[0], 0xab);
        assert!(
            c.as_slice()[(1 << 20) - 4096 * 3 + 7..]
                .iter()
                .all(|&x| x == 0),
            "grown part is zeroed"
        );
        // A lent buffer restored after I/O returns too.
        let (bm, loan) = c.lend();
        drop(loan.restore(bm));
        assert_eq!(pool.idle_bytes(), cost(1 << 20));
    }

    #[test]
    fn pool_buffer_returns_when_the_last_bytes_handle_drops() {
        // Proves freeze() returns the buffer to the pool only after every
        // clone and slice of the Bytes is gone, from whichever thread.
        let pool = BufPool::new(8 * 1024 * 1024);
        let b = marked(&pool, 8192, 7);
        let ptr = b.as_slice().as_ptr();
        let bytes = b.freeze();
        assert_eq!(bytes.as_ptr(), ptr, "freeze does not copy");
        let tail = bytes.slice(4096..);
        drop(bytes);
        assert_eq!(pool.idle_bytes(), 0, "a slice still uses it");
        std::thread::spawn(move || assert_eq!(&tail[..], &[7u8; 4096][..]))
            .join()
            .unwrap();
        assert_eq!(pool.idle_bytes(), cost(8192));
        assert_eq!(mark_of(&pool.take(8192)), 7);
    }

    #[test]
    fn pool_keeps_no_more_idle_than_its_cap() {
        // Proves the idle bytes never exceed the cap: of five returned
        // buffers only three are kept, and only those three come back.
        let len = 64 * 1024;
        let cap = 3 * cost(len) + cost(len) / 2;
        let pool = BufPool::new(cap);
        let bufs: Vec<PoolBuf> = (1..=5).map(|m| marked(&pool, len, m)).collect();
        for b in bufs {
            drop(b);
            assert!(pool.idle_bytes() <= cap);
        }
        assert_eq!(pool.idle_bytes(), 3 * cost(len));
        let again: Vec<PoolBuf> = (0..5).map(|_| pool.take(len)).collect();
        let mut marks: Vec<u8> = again.iter().map(mark_of).collect();
        marks.sort_unstable();
        assert_eq!(marks, [0, 0, 1, 2, 3], "the first three returned are kept");
        // A buffer larger than the whole cap is never kept.
        let tiny = BufPool::new(1024);
        drop(tiny.take(10));
        assert_eq!(tiny.idle_bytes(), 0);
    }

    #[test]
    fn pool_makes_room_for_the_size_the_workload_uses_now() {
        // Proves a full pool evicts idle buffers of a size class taken from
        // less recently than the returning one, and frees a returning buffer
        // whose class is the stalest instead of evicting a fresher class.
        let mib = 1 << 20;
        let pool = BufPool::new(2 * cost(mib));
        let (a, b, c) = (
            marked(&pool, mib, 1),
            marked(&pool, mib, 2),
            marked(&pool, mib, 3),
        );
        drop(a);
        drop(b);
        assert_eq!(pool.idle_bytes(), 2 * cost(mib));
        drop(marked(&pool, 256 * 1024, 9));
        assert_eq!(
            pool.idle_bytes(),
            cost(mib) + cost(256 * 1024),
            "one 1 MiB buffer evicted"
        );
        drop(c);
        assert_eq!(
            pool.idle_bytes(),
            cost(mib) + cost(256 * 1024),
            "the stale 1 MiB class does not evict the 256 KiB one"
        );
        assert_eq!(mark_of(&pool.take(256 * 1024)), 9);
        assert_eq!(
            mark_of(&pool.take(mib)),
            1,
            "the oldest 1 MiB buffer stayed, LIFO evicted the newer"
        );
    }

    #[test]
    fn size_classes_cover_each_length_with_the_smallest_power_of_two() {
        // Proves the class arithmetic: each length maps to the smallest class that holds it.
        assert_eq!(class_of(0), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of((1 << 20) + 1), Some(9));
        assert_eq!(class_of(POOL_MAX_CLASS_BYTES), Some(POOL_CLASSES - 1));
        assert_eq!(class_of(POOL_MAX_CLASS_BYTES + 1), None);
        for len in [1, 4095, 4096, 4097, 65535, 1 << 20, POOL_MAX_CLASS_BYTES] {
            let c = class_of(len).unwrap();
            assert!(class_bytes(c) >= len && (c == 0 || class_bytes(c - 1) < len));
        }
    }

    #[test]
    fn large_classes_come_from_huge_page_aligned_slabs_whose_pieces_are_reused() {
        // Proves a large class is carved from a slab aligned to a huge page
        // (the first buffer starts on one), the slab's other buffers wait
        // idle and are handed out next (adjacent, no overlap), they are
        // independent (writing one leaves the other alone), and a slab's
        // memory is advised for huge pages where the kernel has them.
        let pool = BufPool::with_huge_slabs(64 * 1024 * 1024);
        let mib = 1 << 20;
        let mut a = pool.take(mib);
        assert_eq!(a.as_slice().as_ptr() as usize % HUGE_PAGE_BYTES, 0);
        assert_eq!(pool.idle_bytes(), cost(mib), "the sibling waits idle");
        let mut b = pool.take(mib);
        assert_eq!(pool.idle_bytes(), 0);
        let (pa, pb) = (
            a.as_slice().as_ptr() as usize,
            b.as_slice().as_ptr() as usize,
        );
        assert_eq!(pa.abs_diff(pb), mib, "siblings of one slab");
        a.as_mut_slice().fill(1);
        b.as_mut_slice().fill(2);
        assert!(a.as_slice().iter().all(|&x| x == 1));
        drop(a);
        assert!(b.as_slice().iter().all(|&x| x == 2));
        // Below the huge classes nothing changes.
        let small = pool.take(POOL_HUGE_MIN_CLASS_BYTES / 2);
        assert_eq!(
            pool.idle_bytes(),
            cost(mib),
            "no siblings for a small class"
        );
        drop(small);
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            let mut slab = huge_slab(mib);
            assert_eq!(slab.len(), 2);
            assert!(advise_huge_pages(&mut slab[0]));
        }
    }
}
