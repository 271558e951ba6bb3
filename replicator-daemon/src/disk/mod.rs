//! The backing disk: the [`DiskEngine`] trait and the engines behind it.
//!
//! Owns all I/O on a node's backing disk (a regular file or a block device):
//! reads and writes with owned buffers, fdatasync, zeroing and trimming via
//! fallocate, block status via SEEK_DATA/SEEK_HOLE, and the size. It knows
//! nothing about NBD or replication; the NBD target and, later, the
//! replication engine sit on top of a `DiskEngine`.
//!
//! Module map:
//! - [`aligned`]: O_DIRECT alignment, [`aligned::AlignedBuf`] and the
//!   [`aligned::BufPool`] of reusable aligned buffers.
//! - [`file`]: opening the disk, its size, fallocate and SEEK_DATA/HOLE.
//! - [`huge`]: transparent huge pages for the pool's large buffers.
//! - [`io`]: the [`io::BlockIo`] layer and its sync (pread/pwrite) version.
//! - [`uring`]: the io_uring version of that layer (the crate's only `unsafe`).
//! - [`engine`]: [`engine::Engine`], a `DiskEngine` over any `BlockIo`.
//! - `lock`: range locks serialising O_DIRECT read-modify-write.
//!
//! O_DIRECT (`direct = true`): every transfer is done on 4 KiB-aligned
//! offsets, lengths and buffers. Unaligned requests are served through an
//! aligned bounce buffer covering the aligned range (reads), or by
//! read-modify-write of the partial first and last 4 KiB blocks (writes),
//! with overlapping mutations serialised. The disk size must then be a
//! multiple of 4 KiB.

pub mod aligned;
pub mod engine;
pub mod file;
pub mod huge;
pub mod io;
mod lock;
pub mod uring;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

pub use engine::Engine;
pub use file::{BackingFile, DiskExtent, DiskKind, OpenMode};
pub use io::{Backend, BlockIo, SyncIo};
pub use uring::UringIo;

use crate::config::IoEngineKind;

/// Largest single read or write the engines accept.
pub const MAX_IO_BYTES: usize = 64 * 1024 * 1024;
/// Size of each zero buffer write when fallocate cannot zero a range.
pub const ZERO_CHUNK_BYTES: u64 = 1024 * 1024;

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {} is in use by another process (it holds a lock on it)", path.display())]
    InUse { path: PathBuf },
    #[error("direct I/O needs a disk size that is a multiple of {} bytes, but {} has {size_bytes} bytes", aligned::ALIGN_BYTES, path.display())]
    DirectUnaligned { path: PathBuf, size_bytes: u64 },
    #[error("{op} of {len_bytes} bytes at offset {offset} is past the end of the {size_bytes}-byte disk")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        size_bytes: u64,
    },
    #[error("{op} of {len_bytes} bytes is larger than the {max_bytes}-byte limit")]
    TooLarge {
        op: &'static str,
        len_bytes: u64,
        max_bytes: u64,
    },
    #[error("{op} of {len_bytes} bytes at offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("zeroing {len_bytes} bytes at offset {offset} would not be faster than writing them")]
    NotFast { offset: u64, len_bytes: u64 },
}

/// A node's backing disk. All methods are safe to call concurrently.
pub trait DiskEngine: Send + Sync + 'static {
    /// Size of the disk in bytes, fixed when it was opened.
    fn size_bytes(&self) -> u64;
    /// Whether the disk is a block device (else a regular file).
    fn is_block_device(&self) -> bool;
    /// Whether `write_zeroes` could currently be done without writing data.
    fn zero_can_be_fast(&self, may_punch: bool) -> bool;
    /// Reads exactly `len_bytes` at `offset`. The `Bytes` may hold a pooled
    /// buffer that goes back to its pool when they are dropped.
    fn read(
        &self,
        offset: u64,
        len_bytes: usize,
    ) -> impl Future<Output = Result<Bytes, DiskError>> + Send;
    /// Writes all of `data` at `offset` (not durable until `flush`).
    fn write(&self, offset: u64, data: Bytes)
        -> impl Future<Output = Result<(), DiskError>> + Send;
    /// fdatasync: makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), DiskError>> + Send;
    /// Makes the range read as zeroes: punching a hole if `may_punch`, else
    /// zero-range fallocate, else writing zeroes. With `fast_only`, returns
    /// [`DiskError::NotFast`] instead of writing zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_punch: bool,
        fast_only: bool,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;
    /// Discards the range by punching a hole where supported (a hint).
    fn trim(
        &self,
        offset: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;
    /// Allocation of the range: at least one extent, none past the range,
    /// possibly covering less than asked (ask again for the rest).
    fn block_status(
        &self,
        offset: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Vec<DiskExtent>, DiskError>> + Send;
    /// Where the first data at or after `offset` starts (SEEK_DATA, on the
    /// calling thread: one lseek, cheaper than a hand-off to another
    /// thread; the read path asks it before large reads). `None`: only a
    /// hole follows. A block device is all data.
    fn next_data_now(&self, offset: u64) -> Result<Option<u64>, DiskError>;
    /// A prefetch hint: starts reading the range into the page cache when
    /// the disk is used through it; with O_DIRECT there is nothing to warm.
    fn prefetch(
        &self,
        offset: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<(), DiskError>> + Send;
}

/// The engine type the daemon runs: either I/O layer, chosen at open.
pub type AnyEngine = Engine<Backend>;

/// How to open a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    pub io_engine: IoEngineKind,
    pub direct: bool,
    pub read_only: bool,
}

/// Opens `path` (never creating it) with the asked engine. `Uring` falls back
/// to the sync engine, with a warning, when io_uring cannot be set up.
pub fn open_engine(path: &Path, opts: EngineOptions) -> Result<AnyEngine, DiskError> {
    let file = Arc::new(BackingFile::open(
        path,
        OpenMode {
            read_only: opts.read_only,
            direct: opts.direct,
        },
    )?);
    let backend = choose_backend(&file, opts.io_engine, UringIo::new);
    Ok(Engine::new(backend, file))
}

/// The I/O layer for `kind`; `Uring` falls back to sync when `make_uring` fails.
fn choose_backend(
    file: &Arc<BackingFile>,
    kind: IoEngineKind,
    make_uring: impl FnOnce(Arc<BackingFile>) -> std::io::Result<UringIo>,
) -> Backend {
    match kind {
        IoEngineKind::Sync => Backend::Sync(SyncIo::new(file.clone())),
        IoEngineKind::Uring => match make_uring(file.clone()) {
            Ok(u) => Backend::Uring(u),
            Err(e) => {
                tracing::warn!(error = %e, path = %file.path.display(), "io_uring is unavailable; using the sync engine");
                Backend::Sync(SyncIo::new(file.clone()))
            }
        },
    }
}

#[cfg(test)]
mod tests;
