//! The opened backing disk: a regular file or a block device.
//!
//! Owns opening (read-write or read-only, optionally O_DIRECT, with an
//! flock so that only one process writes a disk at a time), finding the
//! size, and the blocking syscalls both engines share: fallocate (punch hole,
//! zero range) and SEEK_DATA/SEEK_HOLE. It must not be called on an async
//! thread for those blocking calls: the engine runs them on tokio's blocking
//! pool. Reads and writes are not done here but by the engines.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

use super::aligned::ALIGN_BYTES;
use super::DiskError;

/// Most extents one block-status answer reports; the caller asks again for the rest.
pub const MAX_EXTENTS_PER_STATUS: usize = 1024;

/// Whether two paths name one file or device: the same inode (symlinks
/// followed), or one block device under two names (`/dev/vg0/vm1` and
/// `/dev/dm-3` are different nodes of the same device).
pub fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (ma, mb) = (std::fs::metadata(a)?, std::fs::metadata(b)?);
    if ma.file_type().is_block_device() && mb.file_type().is_block_device() {
        return Ok(ma.rdev() == mb.rdev());
    }
    Ok(ma.dev() == mb.dev() && ma.ino() == mb.ino())
}

/// What kind of object backs the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    RegularFile,
    BlockDevice,
}

/// One run of `[offset, offset + length)` with the same allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskExtent {
    pub length_bytes: u64,
    /// Not allocated: reads as zeroes.
    pub hole: bool,
}

/// How a file was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenMode {
    pub read_only: bool,
    pub direct: bool,
}

/// An opened backing disk, shared by an engine and its I/O thread.
#[derive(Debug)]
pub struct BackingFile {
    pub file: File,
    pub path: PathBuf,
    pub kind: DiskKind,
    pub size_bytes: u64,
    pub mode: OpenMode,
}

/// How a fallocate call turned out.
#[derive(Debug)]
pub enum FallocateOutcome {
    Done,
    /// The file system or device does not support this mode.
    Unsupported,
}

impl BackingFile {
    /// Opens an existing file or block device. Never creates anything.
    pub fn open(path: &Path, mode: OpenMode) -> Result<BackingFile, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_owned(),
            source,
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(!mode.read_only);
        let mut flags = libc::O_CLOEXEC;
        if mode.direct {
            flags |= libc::O_DIRECT;
        }
        opts.custom_flags(flags);
        let mut file = opts.open(path).map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        let kind = if ft.is_block_device() {
            DiskKind::BlockDevice
        } else if ft.is_file() {
            DiskKind::RegularFile
        } else {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            )));
        };
        // One writer per disk: a second daemon (or a typo in another
        // resource's config) must not interleave writes with this one.
        // flock does not conflict with the fcntl locks qemu-img takes.
        let lock = if mode.read_only {
            rustix::fs::FlockOperation::NonBlockingLockShared
        } else {
            rustix::fs::FlockOperation::NonBlockingLockExclusive
        };
        match rustix::fs::flock(&file, lock) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(DiskError::InUse {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(open_err(e.into())),
        }
        // SEEK_END gives the length of a file and the size of a block device
        // alike (the latter is what BLKGETSIZE64 reports).
        let size_bytes = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if mode.direct && size_bytes % ALIGN_BYTES != 0 {
            return Err(DiskError::DirectUnaligned {
                path: path.to_owned(),
                size_bytes,
            });
        }
        Ok(BackingFile {
            file,
            path: path.to_owned(),
            kind,
            size_bytes,
            mode,
        })
    }

    /// Deallocates `[offset, offset + len)` (reads as zeroes afterwards).
    pub fn punch_hole(&self, offset: u64, len_bytes: u64) -> io::Result<FallocateOutcome> {
        self.fallocate(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len_bytes,
        )
    }

    /// Zeroes `[offset, offset + len)` keeping it allocated.
    pub fn zero_range(&self, offset: u64, len_bytes: u64) -> io::Result<FallocateOutcome> {
        self.fallocate(
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len_bytes,
        )
    }

    fn fallocate(
        &self,
        flags: FallocateFlags,
        offset: u64,
        len_bytes: u64,
    ) -> io::Result<FallocateOutcome> {
        loop {
            match rustix::fs::fallocate(&self.file, flags, offset, len_bytes) {
                Ok(()) => return Ok(FallocateOutcome::Done),
                Err(rustix::io::Errno::INTR) => continue,
                Err(
                    rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::NOTTY,
                ) => return Ok(FallocateOutcome::Unsupported),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// SEEK_DATA from `offset`: where the next data starts, `None` when
    /// only a hole follows. Block devices are all data. One call, whatever
    /// the file system: unlike SEEK_HOLE after data, which walks the page
    /// cache to the end of the data on tmpfs (a whole file per call).
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        if self.kind == DiskKind::BlockDevice || offset >= self.size_bytes {
            return Ok((offset < self.size_bytes).then_some(offset));
        }
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(d) => Ok(Some(d)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// posix_fadvise(WILLNEED): the kernel starts reading the range into
    /// the page cache.
    pub fn will_need(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let len = std::num::NonZeroU64::new(len_bytes);
        rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::WillNeed)?;
        Ok(())
    }

    /// Allocation of `[offset, offset + len)`: at most
    /// [`MAX_EXTENTS_PER_STATUS`] extents, at least one, none past the range.
    /// Block devices report everything as data.
    pub fn block_status(&self, offset: u64, len_bytes: u64) -> io::Result<Vec<DiskExtent>> {
        let end = offset + len_bytes;
        if self.kind == DiskKind::BlockDevice || len_bytes == 0 {
            return Ok(vec![DiskExtent {
                length_bytes: len_bytes,
                hole: false,
            }]);
        }
        let mut extents: Vec<DiskExtent> = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < MAX_EXTENTS_PER_STATUS {
            let data_at = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d.min(end),
                // No data at or after pos: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            let (hole, next) = if data_at > pos {
                (true, data_at)
            } else {
                let hole_at = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(pos)) {
                    Ok(h) => h.min(end),
                    Err(rustix::io::Errno::NXIO) => end,
                    Err(e) => return Err(e.into()),
                };
                // A hole "at pos" right after SEEK_DATA said data is at pos
                // means the file changed under us; report data to be safe.
                (false, hole_at.max(pos + 1).min(end))
            };
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length_bytes += next - pos,
                _ => extents.push(DiskExtent {
                    length_bytes: next - pos,
                    hole,
                }),
            }
            pos = next;
        }
        Ok(extents)
    }
}
