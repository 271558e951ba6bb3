//! [`Engine`]: a [`DiskEngine`] over any [`BlockIo`] layer.
//!
//! Owns range checks, request size limits, O_DIRECT alignment (bounce
//! buffers and read-modify-write of partial blocks, serialised per block by
//! [`RangeLocks`]), zeroing (fallocate punch hole or zero range, falling back
//! to writing zeroes in bounded chunks), trim and block status. It does not
//! know which I/O layer it runs on, nor anything about NBD or replication.
//!
//! With `direct`, every mutating request (write, zeroes, trim) takes an
//! exclusive lock on the 4 KiB-aligned cover of its range, so two requests
//! touching the same block — even disjoint bytes of it — apply one after the
//! other and neither's bytes are lost to the other's read-modify-write.
//! Without `direct` no locks are taken: pwrite of distinct bytes never
//! interferes.
//!
//! Buffers come from a [`BufPool`] (the process-wide one unless a test
//! gives its own): reads fill a pooled buffer and return it as `Bytes`
//! that go back to the pool when dropped; a write whose data is not
//! aligned, and each read-modify-write, is staged in a pooled buffer.
#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::aligned::{aligned_cover, is_aligned_ptr, AlignedBuf, BufPool, PoolBuf, ALIGN_BYTES};
use super::file::{BackingFile, DiskExtent, DiskKind, FallocateOutcome};
use super::io::BlockIo;
use super::lock::RangeLocks;
use super::{DiskEngine, DiskError, MAX_IO_BYTES, ZERO_CHUNK_BYTES};

/// A disk engine: range-checked, alignment-handling operations over `I`.
#[derive(Debug)]
pub struct Engine<I> {
    io: I,
    file: Arc<BackingFile>,
    locks: RangeLocks,
    pool: Arc<BufPool>,
    punch_supported: AtomicBool,
    zero_range_supported: AtomicBool,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking disk task failed: {e}")))?
}

impl<I: BlockIo> Engine<I> {
    /// An engine over `io`, which must do I/O on `file`, with buffers from
    /// the process-wide pool.
    pub fn new(io: I, file: Arc<BackingFile>) -> Engine<I> {
        Engine::with_pool(io, file, BufPool::shared())
    }

    /// An engine over `io` taking its buffers from `pool`.
    pub fn with_pool(io: I, file: Arc<BackingFile>, pool: Arc<BufPool>) -> Engine<I> {
        Engine {
            io,
            file,
            locks: RangeLocks::default(),
            pool,
            punch_supported: AtomicBool::new(true),
            zero_range_supported: AtomicBool::new(true),
        }
    }

    /// The I/O layer's name ("uring", "sync").
    pub fn io_name(&self) -> &'static str {
        self.io.name()
    }

    /// The backing file.
    pub fn file(&self) -> &BackingFile {
        &self.file
    }

    /// Makes the engine behave as on a file system without fallocate.
    #[cfg(test)]
    pub(crate) fn disable_fallocate_for_test(&self) {
        self.punch_supported.store(false, Ordering::Relaxed);
        self.zero_range_supported.store(false, Ordering::Relaxed);
    }

    fn direct(&self) -> bool {
        self.file.mode.direct
    }

    fn check(&self, op: &'static str, offset: u64, len_bytes: u64) -> Result<(), DiskError> {
        let size_bytes = self.file.size_bytes;
        match offset.checked_add(len_bytes) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(DiskError::OutOfRange {
                op,
                offset,
                len_bytes,
                size_bytes,
            }),
        }
    }

    fn check_io_len(&self, op: &'static str, len_bytes: u64) -> Result<(), DiskError> {
        if len_bytes > MAX_IO_BYTES as u64 {
            return Err(DiskError::TooLarge {
                op,
                len_bytes,
                max_bytes: MAX_IO_BYTES as u64,
            });
        }
        Ok(())
    }

    fn io_err(
        op: &'static str,
        offset: u64,
        len_bytes: u64,
    ) -> impl FnOnce(io::Error) -> DiskError {
        move |source| DiskError::Io {
            op,
            offset,
            len_bytes,
            source,
        }
    }

    /// Fills `buf` from `offset`, erroring on a short read.
    async fn read_pooled(&self, offset: u64, buf: PoolBuf) -> Result<PoolBuf, DiskError> {
        let (buf, loan) = buf.lend();
        Ok(loan.restore(self.read_exact(offset, buf).await?))
    }

    /// Reads `[offset, offset + len)` fully, erroring on a short read.
    async fn read_exact(&self, offset: u64, buf: BytesMut) -> Result<BytesMut, DiskError> {
        let len = buf.len() as u64;
        let (mut buf, n) = self
            .io
            .read_at(offset, buf)
            .await
            .map_err(Self::io_err("read", offset, len))?;
        if (n as u64) < len {
            return Err(Self::io_err("read", offset, len)(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the disk ended after {n} of {len} bytes (was it truncated?)"),
            )));
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes `data` at `offset`; with `direct` the caller holds the range lock.
    async fn write_unlocked(&self, offset: u64, data: Bytes) -> Result<(), DiskError> {
        let len = data.len() as u64;
        if !self.direct() {
            return self
                .io
                .write_at(offset, data)
                .await
                .map_err(Self::io_err("write", offset, len));
        }
        let (start, end) = aligned_cover(offset, len);
        if start == offset && end == offset + len {
            let data = if is_aligned_ptr(data.as_ptr()) {
                data
            } else {
                let mut staged = self.pool.take(data.len());
                staged.as_mut_slice().copy_from_slice(&data);
                staged.freeze()
            };
            return self
                .io
                .write_at(offset, data)
                .await
                .map_err(Self::io_err("write", offset, len));
        }
        // Read-modify-write of the partial first and last blocks. The
        // pooled cover holds stale bytes: every byte of it is overwritten
        // below, by the head block, the tail block or `data` (a partial
        // head or tail block is read whole; a whole one is all `data`).
        let block = ALIGN_BYTES as usize;
        let mut cover = self.pool.take((end - start) as usize);
        let head_partial = offset != start;
        let tail_partial = offset + len != end;
        if head_partial {
            let head = self.read_pooled(start, self.pool.take(block)).await?;
            cover.as_mut_slice()[..block].copy_from_slice(head.as_slice());
        }
        let last_block = end - ALIGN_BYTES;
        if tail_partial && !(head_partial && last_block == start) {
            let tail = self.read_pooled(last_block, self.pool.take(block)).await?;
            cover.as_mut_slice()[(last_block - start) as usize..].copy_from_slice(tail.as_slice());
        }
        let at = (offset - start) as usize;
        cover.as_mut_slice()[at..at + data.len()].copy_from_slice(&data);
        self.io
            .write_at(start, cover.freeze())
            .await
            .map_err(Self::io_err("write", offset, len))
    }

    /// Writes zero buffers over the range, in chunks of [`ZERO_CHUNK_BYTES`].
    async fn write_zero_chunks(&self, offset: u64, len_bytes: u64) -> Result<(), DiskError> {
        let zeroes = AlignedBuf::zeroed(ZERO_CHUNK_BYTES.min(len_bytes) as usize).freeze();
        let mut pos = offset;
        let end = offset + len_bytes;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK_BYTES);
            self.write_unlocked(pos, zeroes.slice(..n as usize)).await?;
            pos += n;
        }
        Ok(())
    }

    async fn fallocate(
        &self,
        punch: bool,
        offset: u64,
        len_bytes: u64,
    ) -> Result<FallocateOutcome, DiskError> {
        let file = self.file.clone();
        let op = if punch { "punch hole" } else { "zero range" };
        let outcome = blocking(move || {
            if punch {
                file.punch_hole(offset, len_bytes)
            } else {
                file.zero_range(offset, len_bytes)
            }
        })
        .await
        .map_err(Self::io_err(op, offset, len_bytes))?;
        if let FallocateOutcome::Unsupported = outcome {
            let flag = if punch {
                &self.punch_supported
            } else {
                &self.zero_range_supported
            };
            if flag.swap(false, Ordering::Relaxed) {
                tracing::info!(path = %self.file.path.display(), op, "fallocate mode not supported here; not trying it again");
            }
        }
        Ok(outcome)
    }

    async fn lock_if_direct(
        &self,
        offset: u64,
        len_bytes: u64,
    ) -> Option<super::lock::RangeGuard<'_>> {
        if self.direct() {
            let (start, end) = aligned_cover(offset, len_bytes);
            Some(self.locks.lock(start, end).await)
        } else {
            None
        }
    }
}

impl<I: BlockIo> DiskEngine for Engine<I> {
    fn size_bytes(&self) -> u64 {
        self.file.size_bytes
    }

    fn is_block_device(&self) -> bool {
        self.file.kind == DiskKind::BlockDevice
    }

    fn zero_can_be_fast(&self, may_punch: bool) -> bool {
        let punch = may_punch && self.punch_supported.load(Ordering::Relaxed);
        // Zero range on a block device may be carried out by writing zeroes.
        let zero_range = self.file.kind == DiskKind::RegularFile
            && self.zero_range_supported.load(Ordering::Relaxed);
        punch || zero_range
    }

    async fn read(&self, offset: u64, len_bytes: usize) -> Result<Bytes, DiskError> {
        self.check_io_len("read", len_bytes as u64)?;
        self.check("read", offset, len_bytes as u64)?;
        if len_bytes == 0 {
            return Ok(Bytes::new());
        }
        // The pooled buffer is not zeroed: read_pooled fills all of it or fails.
        if !self.direct() {
            let buf = self.pool.take(len_bytes);
            return Ok(self.read_pooled(offset, buf).await?.freeze());
        }
        let (start, end) = aligned_cover(offset, len_bytes as u64);
        let cover = self.pool.take((end - start) as usize);
        let cover = self.read_pooled(start, cover).await?.freeze();
        // Slicing Bytes moves its start; no copy.
        let head = (offset - start) as usize;
        Ok(cover.slice(head..head + len_bytes))
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), DiskError> {
        let len = data.len() as u64;
        self.check_io_len("write", len)?;
        self.check("write", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _guard = self.lock_if_direct(offset, len).await;
        self.write_unlocked(offset, data).await
    }

    async fn flush(&self) -> Result<(), DiskError> {
        self.io
            .sync_data()
            .await
            .map_err(Self::io_err("flush", 0, self.file.size_bytes))
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_punch: bool,
        fast_only: bool,
    ) -> Result<(), DiskError> {
        self.check("write zeroes", offset, len_bytes)?;
        if len_bytes == 0 {
            return Ok(());
        }
        if fast_only && !self.zero_can_be_fast(may_punch) {
            return Err(DiskError::NotFast { offset, len_bytes });
        }
        let _guard = self.lock_if_direct(offset, len_bytes).await;
        if may_punch && self.punch_supported.load(Ordering::Relaxed) {
            if let FallocateOutcome::Done = self.fallocate(true, offset, len_bytes).await? {
                return Ok(());
            }
        }
        let zero_range_may_be_slow = self.file.kind == DiskKind::BlockDevice;
        if !(fast_only && zero_range_may_be_slow)
            && self.zero_range_supported.load(Ordering::Relaxed)
        {
            if let FallocateOutcome::Done = self.fallocate(false, offset, len_bytes).await? {
                return Ok(());
            }
        }
        if fast_only {
            return Err(DiskError::NotFast { offset, len_bytes });
        }
        self.write_zero_chunks(offset, len_bytes).await
    }

    async fn trim(&self, offset: u64, len_bytes: u64) -> Result<(), DiskError> {
        self.check("trim", offset, len_bytes)?;
        if len_bytes == 0 || !self.punch_supported.load(Ordering::Relaxed) {
            // Trim is a hint: where holes cannot be punched, it does nothing.
            return Ok(());
        }
        let _guard = self.lock_if_direct(offset, len_bytes).await;
        self.fallocate(true, offset, len_bytes).await.map(|_| ())
    }

    async fn block_status(
        &self,
        offset: u64,
        len_bytes: u64,
    ) -> Result<Vec<DiskExtent>, DiskError> {
        self.check("block status", offset, len_bytes)?;
        let file = self.file.clone();
        blocking(move || file.block_status(offset, len_bytes))
            .await
            .map_err(Self::io_err("block status", offset, len_bytes))
    }

    fn next_data_now(&self, offset: u64) -> Result<Option<u64>, DiskError> {
        self.check("seek data", offset, 0)?;
        self.file
            .next_data(offset)
            .map_err(Self::io_err("seek data", offset, 0))
    }

    async fn prefetch(&self, offset: u64, len_bytes: u64) -> Result<(), DiskError> {
        self.check("prefetch", offset, len_bytes)?;
        if self.direct() || len_bytes == 0 {
            return Ok(());
        }
        let file = self.file.clone();
        blocking(move || file.will_need(offset, len_bytes))
            .await
            .map_err(Self::io_err("prefetch", offset, len_bytes))
    }
}
