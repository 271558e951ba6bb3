//! Positional I/O of whole buffers: the layer each engine implements.
//!
//! Owns the [`BlockIo`] trait, the sync implementation ([`SyncIo`]: pread,
//! pwrite and fdatasync on tokio's blocking pool) and [`Backend`], the
//! run-time choice between it and the io_uring one. It does not check ranges
//! or alignment: the engine above does, so a buffer handed down here is
//! already aligned when the file was opened with O_DIRECT.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::file::BackingFile;
use super::uring::UringIo;

/// Reads, writes and data syncs with owned buffers.
pub trait BlockIo: Send + Sync + 'static {
    /// Fills `buf` from `offset` until it is full or the file ends; returns
    /// the buffer and how many bytes were read.
    fn read_at(
        &self,
        offset: u64,
        buf: BytesMut,
    ) -> impl Future<Output = io::Result<(BytesMut, usize)>> + Send;
    /// Writes all of `data` at `offset`.
    fn write_at(&self, offset: u64, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// fdatasync: every write completed before the call is durable after it.
    fn sync_data(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Short name for logs ("uring", "sync").
    fn name(&self) -> &'static str;
}

/// pread/pwrite/fdatasync on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct SyncIo {
    file: Arc<BackingFile>,
}

impl SyncIo {
    pub fn new(file: Arc<BackingFile>) -> SyncIo {
        SyncIo { file }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking I/O task failed: {e}")))?
}

impl BlockIo for SyncIo {
    fn read_at(
        &self,
        offset: u64,
        mut buf: BytesMut,
    ) -> impl Future<Output = io::Result<(BytesMut, usize)>> + Send {
        let file = self.file.clone();
        blocking(move || {
            let mut filled = 0;
            while filled < buf.len() {
                match file
                    .file
                    .read_at(&mut buf[filled..], offset + filled as u64)
                {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((buf, filled))
        })
    }

    fn write_at(&self, offset: u64, data: Bytes) -> impl Future<Output = io::Result<()>> + Send {
        let file = self.file.clone();
        blocking(move || file.file.write_all_at(&data, offset))
    }

    fn sync_data(&self) -> impl Future<Output = io::Result<()>> + Send {
        let file = self.file.clone();
        blocking(move || file.file.sync_data())
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}

/// The I/O layer chosen at run time from the config.
#[derive(Debug)]
pub enum Backend {
    Sync(SyncIo),
    Uring(UringIo),
}

impl BlockIo for Backend {
    async fn read_at(&self, offset: u64, buf: BytesMut) -> io::Result<(BytesMut, usize)> {
        match self {
            Backend::Sync(s) => s.read_at(offset, buf).await,
            Backend::Uring(u) => u.read_at(offset, buf).await,
        }
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        match self {
            Backend::Sync(s) => s.write_at(offset, data).await,
            Backend::Uring(u) => u.write_at(offset, data).await,
        }
    }

    async fn sync_data(&self) -> io::Result<()> {
        match self {
            Backend::Sync(s) => s.sync_data().await,
            Backend::Uring(u) => u.sync_data().await,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Sync(s) => s.name(),
            Backend::Uring(u) => u.name(),
        }
    }
}
