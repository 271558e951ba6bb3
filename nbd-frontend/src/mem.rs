//! A sparse in-memory [`BlockTarget`] for tests (this crate's and others').
//!
//! Owns a map of allocated 4 KiB blocks; unallocated blocks read as zeroes
//! and report as holes. It must not be used for real data: nothing is
//! durable. Flushes are counted so tests can observe them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use crate::target::{
    plan_read_pieces, read_planned, BlockTarget, Extent, ReadPiece, TargetError, TargetFlags,
};

/// Allocation granularity of [`MemTarget`].
pub const MEM_BLOCK_BYTES: u64 = 4096;

/// Sparse in-memory storage.
#[derive(Debug)]
pub struct MemTarget {
    size_bytes: u64,
    flags: TargetFlags,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
    writes: AtomicU64,
}

impl MemTarget {
    /// A writable target supporting every operation.
    pub fn new(size_bytes: u64) -> Self {
        Self::with_flags(
            size_bytes,
            TargetFlags {
                read_only: false,
                can_flush: true,
                can_trim: true,
                can_zero: true,
                can_fast_zero: true,
                can_cache: true,
                can_multi_conn: true,
                rotational: false,
            },
        )
    }

    pub fn with_flags(size_bytes: u64, flags: TargetFlags) -> Self {
        Self {
            size_bytes,
            flags,
            blocks: Mutex::new(BTreeMap::new()),
            flushes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// How many flushes completed.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// How many writes (incl. trims and zeroes) were applied.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// How many 4 KiB blocks are allocated.
    pub fn allocated_blocks(&self) -> usize {
        self.lock().len()
    }

    /// Reads synchronously (for test assertions).
    pub fn read_now(&self, offset: u64, len_bytes: usize) -> Vec<u8> {
        let blocks = self.lock();
        let mut out = vec![0u8; len_bytes];
        let mut pos = 0usize;
        while pos < len_bytes {
            let abs = offset + pos as u64;
            let idx = abs / MEM_BLOCK_BYTES;
            let within = (abs % MEM_BLOCK_BYTES) as usize;
            let n = (MEM_BLOCK_BYTES as usize - within).min(len_bytes - pos);
            if let Some(b) = blocks.get(&idx) {
                out[pos..pos + n].copy_from_slice(&b[within..within + n]);
            }
            pos += n;
        }
        out
    }

    /// Writes synchronously (for test setup).
    pub fn write_now(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.lock();
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let idx = abs / MEM_BLOCK_BYTES;
            let within = (abs % MEM_BLOCK_BYTES) as usize;
            let n = (MEM_BLOCK_BYTES as usize - within).min(data.len() - pos);
            let b = blocks
                .entry(idx)
                .or_insert_with(|| vec![0u8; MEM_BLOCK_BYTES as usize].into_boxed_slice());
            b[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        // A panic while holding the lock leaves whole-block copies, never torn
        // metadata, so the data is still usable.
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, op: &'static str, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        match offset.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(TargetError::Io {
                op,
                offset,
                len_bytes,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            }),
        }
    }

    fn check_writable(&self) -> Result<(), TargetError> {
        if self.flags.read_only {
            Err(TargetError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Zeroes a range: whole blocks are dropped when `punch`, else filled
    /// with zeroes (allocated).
    fn zero_range(&self, offset: u64, len_bytes: u64, punch: bool) {
        let mut blocks = self.lock();
        let end = offset + len_bytes;
        let mut pos = offset;
        while pos < end {
            let idx = pos / MEM_BLOCK_BYTES;
            let within = (pos % MEM_BLOCK_BYTES) as usize;
            let n = (MEM_BLOCK_BYTES - within as u64).min(end - pos) as usize;
            if punch && within == 0 && n as u64 == MEM_BLOCK_BYTES {
                blocks.remove(&idx);
            } else if let Some(b) = blocks.get_mut(&idx) {
                b[within..within + n].fill(0);
            } else if !punch {
                blocks.insert(idx, vec![0u8; MEM_BLOCK_BYTES as usize].into_boxed_slice());
            }
            pos += n as u64;
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}

impl BlockTarget for MemTarget {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn flags(&self) -> TargetFlags {
        self.flags
    }

    async fn read(&self, offset: u64, len_bytes: u32) -> Result<Bytes, TargetError> {
        self.check("read", offset, u64::from(len_bytes))?;
        Ok(Bytes::from(self.read_now(offset, len_bytes as usize)))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), TargetError> {
        self.check_writable()?;
        self.check("write", offset, data.len() as u64)?;
        self.write_now(offset, &data);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn flush(&self) -> Result<(), TargetError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len_bytes: u64, _fua: bool) -> Result<(), TargetError> {
        self.check_writable()?;
        self.check("trim", offset, len_bytes)?;
        self.zero_range(offset, len_bytes, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_punch: bool,
        _fast: bool,
        _fua: bool,
    ) -> Result<(), TargetError> {
        self.check_writable()?;
        self.check("write_zeroes", offset, len_bytes)?;
        self.zero_range(offset, len_bytes, may_punch);
        Ok(())
    }

    async fn cache(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        self.check("cache", offset, len_bytes)
    }

    /// Blocks never written (or trimmed) come back as holes.
    async fn read_sparse(
        &self,
        offset: u64,
        len_bytes: u32,
    ) -> Result<Vec<ReadPiece>, TargetError> {
        let extents = self.block_status(offset, u64::from(len_bytes)).await?;
        read_planned(self, &plan_read_pieces(offset, len_bytes, &extents)).await
    }

    async fn block_status(&self, offset: u64, len_bytes: u64) -> Result<Vec<Extent>, TargetError> {
        self.check("block_status", offset, len_bytes)?;
        let blocks = self.lock();
        let end = offset + len_bytes;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = pos / MEM_BLOCK_BYTES;
            let n = (MEM_BLOCK_BYTES - pos % MEM_BLOCK_BYTES).min(end - pos);
            let hole = !blocks.contains_key(&idx);
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length_bytes += n,
                _ => extents.push(Extent {
                    length_bytes: n,
                    hole,
                    zero: hole,
                }),
            }
            pos += n;
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn mem_target_reads_back_writes_and_reports_holes() {
        // Proves unaligned writes read back, trims punch whole blocks, and
        // block status reports allocated vs hole extents.
        let t = MemTarget::new(64 * 1024);
        block_on(async {
            t.write(4000, Bytes::from(vec![7u8; 200]), false)
                .await
                .unwrap();
            assert_eq!(&t.read(4000, 200).await.unwrap()[..], &[7u8; 200][..]);
            assert_eq!(&t.read(3990, 10).await.unwrap()[..], &[0u8; 10][..]);
            let st = t.block_status(0, 16384).await.unwrap();
            assert_eq!(
                st,
                vec![
                    Extent {
                        length_bytes: 8192,
                        hole: false,
                        zero: false
                    },
                    Extent {
                        length_bytes: 8192,
                        hole: true,
                        zero: true
                    }
                ]
            );
            t.trim(0, 8192, false).await.unwrap();
            assert_eq!(t.allocated_blocks(), 0);
            t.write_zeroes(0, 4096, false, false, false).await.unwrap();
            assert_eq!(t.allocated_blocks(), 1, "NO_HOLE zeroes allocate");
            assert!(t
                .write(65535, Bytes::from_static(b"ab"), false)
                .await
                .is_err());
        });
    }

    #[test]
    fn read_only_mem_target_refuses_writes() {
        // Proves a read-only MemTarget answers ReadOnly to every modification.
        let mut f = MemTarget::new(0).flags();
        f.read_only = true;
        let t = MemTarget::with_flags(4096, f);
        block_on(async {
            assert!(matches!(
                t.write(0, Bytes::from_static(b"a"), false).await,
                Err(TargetError::ReadOnly)
            ));
            assert!(matches!(
                t.trim(0, 1, false).await,
                Err(TargetError::ReadOnly)
            ));
            assert!(matches!(
                t.write_zeroes(0, 1, true, false, false).await,
                Err(TargetError::ReadOnly)
            ));
        });
    }
}
