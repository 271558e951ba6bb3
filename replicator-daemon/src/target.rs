//! [`LocalTarget`]: the NBD [`BlockTarget`] over a local [`DiskEngine`],
//! for a node serving its disk unreplicated.
//!
//! Owns the mapping from NBD semantics to disk operations: FUA is write then
//! fdatasync, FLUSH is fdatasync, fast zero is refused unless the disk can
//! zero without writing. It must not do I/O itself (the engine does) and
//! knows nothing about replication: the replicated path will put the
//! replication engine between the NBD server and the disk instead.

use bytes::{Bytes, BytesMut};
use nbd_frontend::{BlockTarget, Extent, TargetError, TargetFlags};

use crate::disk::{DiskEngine, DiskError};

/// Serves a [`DiskEngine`] as an NBD export.
#[derive(Debug)]
pub struct LocalTarget<E> {
    disk: E,
    read_only: bool,
}

impl<E: DiskEngine> LocalTarget<E> {
    pub fn new(disk: E, read_only: bool) -> LocalTarget<E> {
        LocalTarget { disk, read_only }
    }

    /// The disk underneath (for the final flush at shutdown).
    pub fn disk(&self) -> &E {
        &self.disk
    }

    fn writable(&self) -> Result<(), TargetError> {
        if self.read_only {
            Err(TargetError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

/// Maps a disk error to the server's error type (the server picks the errno).
fn target_err(e: DiskError) -> TargetError {
    match e {
        DiskError::NotFast { .. } => TargetError::NotFast,
        DiskError::Io {
            op,
            offset,
            len_bytes,
            source,
        } => {
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
            ) {
                TargetError::NoSpace { offset, len_bytes }
            } else {
                TargetError::Io {
                    op,
                    offset,
                    len_bytes,
                    source,
                }
            }
        }
        DiskError::OutOfRange {
            op,
            offset,
            len_bytes,
            ..
        } => invalid(op, offset, len_bytes, e_msg_range()),
        DiskError::TooLarge { op, len_bytes, .. } => invalid(op, 0, len_bytes, e_msg_size()),
        other => TargetError::Unavailable(other.to_string()),
    }
}

fn e_msg_range() -> &'static str {
    "the range is outside the disk"
}

fn e_msg_size() -> &'static str {
    "the request is larger than the disk engine accepts"
}

fn invalid(op: &'static str, offset: u64, len_bytes: u64, why: &'static str) -> TargetError {
    TargetError::Io {
        op,
        offset,
        len_bytes,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why),
    }
}

impl<E: DiskEngine> BlockTarget for LocalTarget<E> {
    fn size_bytes(&self) -> u64 {
        self.disk.size_bytes()
    }

    fn flags(&self) -> TargetFlags {
        TargetFlags {
            read_only: self.read_only,
            can_flush: true,
            can_trim: !self.read_only,
            can_zero: !self.read_only,
            // Fast zero requests are answered NotFast whenever zeroing would
            // mean writing, so advertising support is always honest.
            can_fast_zero: !self.read_only,
            can_cache: false,
            // One file, one page cache: fdatasync on any connection covers
            // writes completed on every connection.
            can_multi_conn: true,
            rotational: false,
        }
    }

    async fn read(&self, offset: u64, len_bytes: u32) -> Result<BytesMut, TargetError> {
        self.disk
            .read(offset, len_bytes as usize)
            .await
            .map_err(target_err)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), TargetError> {
        self.writable()?;
        self.disk.write(offset, data).await.map_err(target_err)?;
        if fua {
            self.disk.flush().await.map_err(target_err)?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), TargetError> {
        self.disk.flush().await.map_err(target_err)
    }

    async fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> Result<(), TargetError> {
        self.writable()?;
        self.disk
            .trim(offset, len_bytes)
            .await
            .map_err(target_err)?;
        if fua {
            self.disk.flush().await.map_err(target_err)?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), TargetError> {
        self.writable()?;
        self.disk
            .write_zeroes(offset, len_bytes, may_punch, fast)
            .await
            .map_err(target_err)?;
        if fua {
            self.disk.flush().await.map_err(target_err)?;
        }
        Ok(())
    }

    async fn cache(&self, _offset: u64, _len_bytes: u64) -> Result<(), TargetError> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len_bytes: u64) -> Result<Vec<Extent>, TargetError> {
        let extents = self
            .disk
            .block_status(offset, len_bytes)
            .await
            .map_err(target_err)?;
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                length_bytes: e.length_bytes,
                hole: e.hole,
                zero: e.hole,
            })
            .collect())
    }
}
