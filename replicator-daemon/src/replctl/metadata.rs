//! `replctl create-md` and `replctl dump-md`: the offline metadata commands.
//!
//! Owns reading and writing the metadata regions of one node's disk (or
//! external metadata file) with plain positioned file I/O, using the layout
//! and codecs of `replicator_core::metadata`. Must not run while the node's
//! daemon runs (it checks the control socket and refuses), and must never
//! overwrite valid metadata without `--force`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use replicator_core::metadata::{
    self, decode_superblocks, MetaFlags, MetaKind, MetadataLayout, MetadataWrite, Superblock,
    SUPERBLOCK_SLOT_BYTES,
};
use serde::Serialize;

use crate::config::{Config, MetaLocation, NodeConfig};

/// Size of the zero buffer used to clear the AL ring and bitmap, in bytes
/// (writes go out in chunks of this size so memory stays bounded).
pub const ZERO_CHUNK_BYTES: usize = 1024 * 1024;

/// Size of one read when counting bitmap bits, in bytes.
pub const BITMAP_READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Why an offline metadata command failed: one sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdError(pub String);

impl std::fmt::Display for MdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn io_sentence(what: &str, path: &Path, e: std::io::Error) -> MdError {
    MdError(format!("cannot {what} {}: {e}", path.display()))
}

/// The files a node's metadata lives on.
struct Devices {
    disk_path: PathBuf,
    meta_path: PathBuf,
    layout: MetadataLayout,
}

fn size_of(file: &mut File, path: &Path) -> Result<u64, MdError> {
    // Seeking to the end gives the size of block devices as well as files.
    file.seek(SeekFrom::End(0))
        .map_err(|e| io_sentence("find the size of", path, e))
}

fn open_rw(path: &Path) -> Result<File, MdError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_sentence("open", path, e))
}

fn geometry(node: &NodeConfig) -> Result<(u32, u32), MdError> {
    let block = u32::try_from(node.options.bitmap_block_bytes).map_err(|_| {
        MdError(format!(
            "bitmap_block_bytes {} is too large",
            node.options.bitmap_block_bytes
        ))
    })?;
    Ok((block, node.options.al_extents))
}

/// Open the node's disk (and metadata file) and compute the layout. With
/// `create_meta_file`, a missing external metadata file is created at the
/// size the layout needs.
fn devices(node: &NodeConfig, create_meta_file: bool) -> Result<(Devices, File, File), MdError> {
    let (block, al_extents) = geometry(node)?;
    let mut disk = open_rw(&node.disk)?;
    let disk_size_bytes = size_of(&mut disk, &node.disk)?;
    let layout_error = |e: metadata::MetadataError| {
        MdError(format!(
            "cannot lay out metadata for {}: {e}",
            node.disk.display()
        ))
    };
    match &node.meta {
        MetaLocation::Internal => {
            let layout = MetadataLayout::internal(disk_size_bytes, block, al_extents)
                .map_err(layout_error)?;
            let meta = disk
                .try_clone()
                .map_err(|e| io_sentence("reopen", &node.disk, e))?;
            Ok((
                Devices {
                    disk_path: node.disk.clone(),
                    meta_path: node.disk.clone(),
                    layout,
                },
                disk,
                meta,
            ))
        }
        MetaLocation::External(path) => {
            if crate::disk::file::same_file(&node.disk, path).unwrap_or(false) {
                return Err(MdError(format!(
                    "`meta` {} is the disk {} itself: {}; nothing was written",
                    path.display(),
                    node.disk.display(),
                    crate::config::META_IS_DISK
                )));
            }
            let needed = MetadataLayout::external(disk_size_bytes, u64::MAX, block, al_extents)
                .map_err(layout_error)?
                .metadata_bytes;
            let mut meta = match open_rw(path) {
                Ok(file) => file,
                Err(_) if create_meta_file && !path.exists() => {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .map_err(|e| io_sentence("create", path, e))?;
                    file.set_len(needed)
                        .map_err(|e| io_sentence("size", path, e))?;
                    file
                }
                Err(e) => return Err(e),
            };
            let meta_size = size_of(&mut meta, path)?;
            let layout = MetadataLayout::external(disk_size_bytes, meta_size, block, al_extents)
                .map_err(layout_error)?;
            Ok((
                Devices {
                    disk_path: node.disk.clone(),
                    meta_path: path.clone(),
                    layout,
                },
                disk,
                meta,
            ))
        }
    }
}

fn read_superblock(meta: &File, devices: &Devices) -> Result<(Superblock, u8), MdError> {
    let mut slots = [
        vec![0u8; SUPERBLOCK_SLOT_BYTES as usize],
        vec![0u8; SUPERBLOCK_SLOT_BYTES as usize],
    ];
    for (slot, buf) in slots.iter_mut().enumerate() {
        let offset = devices.layout.superblock_slot_offset(slot as u8);
        meta.read_exact_at(buf, offset)
            .map_err(|e| io_sentence("read the superblock from", &devices.meta_path, e))?;
    }
    decode_superblocks(&slots[0], &slots[1]).map_err(|e| {
        MdError(format!(
            "{} holds no valid metadata: {e}",
            devices.meta_path.display()
        ))
    })
}

/// The offset of the first non-zero byte in `len_bytes` from `offset`.
fn first_nonzero(
    file: &File,
    path: &Path,
    offset: u64,
    len_bytes: u64,
) -> Result<Option<u64>, MdError> {
    let mut buf = vec![0u8; ZERO_CHUNK_BYTES];
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)
            .map_err(|e| io_sentence("read", path, e))?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(offset + done + i as u64));
        }
        done += n as u64;
    }
    Ok(None)
}

fn zero_range(file: &File, path: &Path, offset: u64, len_bytes: u64) -> Result<(), MdError> {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
    let mut done = 0u64;
    while done < len_bytes {
        let n = (len_bytes - done).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)
            .map_err(|e| io_sentence("write metadata to", path, e))?;
        done += n as u64;
    }
    Ok(())
}

/// `create-md`: write fresh metadata for `node_name` of `config`. Refuses to
/// overwrite valid metadata, or anything but zeros where no valid metadata
/// is, unless `force`. Returns the line to print.
pub fn create_md(config: &Config, node_name: &str, force: bool) -> Result<String, MdError> {
    let node = config.node(node_name).map_err(|e| MdError(e.to_string()))?;
    let (devices, _disk, meta) = devices(node, true)?;
    let existing = read_superblock(&meta, &devices);
    if existing.is_err() && !force {
        // Like drbdmeta: what lies where the metadata goes may be data.
        let (start, len) = (
            devices.layout.metadata_offset_bytes,
            devices.layout.metadata_bytes,
        );
        if let Some(at) = first_nonzero(&meta, &devices.meta_path, start, len)? {
            let hint = match devices.layout.kind {
                MetaKind::Internal => format!(
                    "with internal metadata the last {len} bytes of the disk hold it and the \
                     export shrinks to {} bytes: shrink what the disk holds first, or keep \
                     the metadata in a file or device of its own (meta = PATH)",
                    devices.layout.data_size_bytes
                ),
                MetaKind::External => "is `meta` the right file or device?".to_owned(),
            };
            return Err(MdError(format!(
                "{} holds data where the metadata goes (a non-zero byte at offset {at}, in \
                 bytes {start}..{}) and no replicator metadata; writing it would destroy that \
                 data: {hint}; use --force to write it anyway",
                devices.meta_path.display(),
                start + len
            )));
        }
    }
    if let Ok((existing, _)) = existing {
        if !force {
            return Err(MdError(format!(
                "{} already holds metadata of {}/{} ({}); use --force to overwrite it",
                devices.meta_path.display(),
                existing.resource,
                existing.node,
                if existing.flags.contains(MetaFlags::UP_TO_DATE) {
                    "UpToDate data"
                } else {
                    "not UpToDate"
                }
            )));
        }
    }
    let created = metadata::create(
        &devices.layout,
        &config.resource,
        node_name,
        node.options.al_extents,
    )
    .map_err(|e| MdError(format!("cannot create metadata: {e}")))?;
    for write in &created.writes {
        match write {
            MetadataWrite::Data {
                offset_bytes,
                bytes,
            } => meta
                .write_all_at(bytes, *offset_bytes)
                .map_err(|e| io_sentence("write metadata to", &devices.meta_path, e))?,
            MetadataWrite::Zero {
                offset_bytes,
                len_bytes,
            } => zero_range(&meta, &devices.meta_path, *offset_bytes, *len_bytes)?,
        }
    }
    meta.sync_all()
        .map_err(|e| io_sentence("flush", &devices.meta_path, e))?;
    let place = match devices.layout.kind {
        MetaKind::Internal => format!("internal, at the end of {}", devices.disk_path.display()),
        MetaKind::External => format!("external, in {}", devices.meta_path.display()),
    };
    Ok(format!(
        "created metadata for {}/{node_name} ({place}): data area {} bytes, metadata {} bytes at offset {}",
        config.resource,
        devices.layout.data_size_bytes,
        devices.layout.metadata_bytes,
        devices.layout.metadata_offset_bytes,
    ))
}

/// Generation UUIDs as 16-digit hex strings (JSON numbers lose u64 bits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UuidsDump {
    /// Current generation.
    pub current: String,
    /// Bitmap generation.
    pub bitmap: String,
    /// History, newest first.
    pub history: Vec<String>,
}

/// What `dump-md --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetadataDump {
    /// Resource recorded in the metadata.
    pub resource: String,
    /// Node recorded in the metadata.
    pub node: String,
    /// `internal` or `external`.
    pub meta: &'static str,
    /// The file holding the metadata.
    pub meta_path: String,
    /// Where the metadata region starts on it.
    pub metadata_offset_bytes: u64,
    /// Size of the metadata region.
    pub metadata_bytes: u64,
    /// Metadata format version.
    pub version: u16,
    /// Which superblock slot is current.
    pub slot: u8,
    /// Its write sequence number.
    pub sequence: u64,
    /// Size of the data area (what NBD exports).
    pub data_size_bytes: u64,
    /// Bitmap granularity.
    pub bitmap_block_bytes: u32,
    /// Activity-log extents.
    pub al_extents: u32,
    /// Generation UUIDs.
    pub uuids: UuidsDump,
    /// Names of the flags set.
    pub flags: Vec<&'static str>,
    /// Role when last written.
    pub last_role: &'static str,
    /// Bytes marked out of sync in the on-disk bitmap.
    pub out_of_sync_bytes: u64,
}

const FLAG_NAMES: [(MetaFlags, &str); 8] = [
    (MetaFlags::CONSISTENT, "Consistent"),
    (MetaFlags::UP_TO_DATE, "UpToDate"),
    (MetaFlags::OUTDATED, "Outdated"),
    (MetaFlags::WAS_PRIMARY, "WasPrimary"),
    (MetaFlags::CRASHED_PRIMARY, "CrashedPrimary"),
    (MetaFlags::AL_CLEAN, "AlClean"),
    (MetaFlags::CLEAN_SHUTDOWN, "CleanShutdown"),
    (MetaFlags::FULL_SYNC, "FullSync"),
];

fn count_bitmap_bits(meta: &File, devices: &Devices) -> Result<u64, MdError> {
    let layout = &devices.layout;
    let mut buf = vec![0u8; BITMAP_READ_CHUNK_BYTES];
    let mut bits = 0u64;
    let mut done = 0u64;
    while done < layout.bitmap_bytes {
        let n = (layout.bitmap_bytes - done).min(BITMAP_READ_CHUNK_BYTES as u64) as usize;
        meta.read_exact_at(&mut buf[..n], layout.bitmap_offset_bytes + done)
            .map_err(|e| io_sentence("read the bitmap from", &devices.meta_path, e))?;
        bits += buf[..n]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum::<u64>();
        done += n as u64;
    }
    Ok(bits)
}

/// `dump-md`: read the node's metadata and describe it.
pub fn dump_md(config: &Config, node_name: &str) -> Result<MetadataDump, MdError> {
    let node = config.node(node_name).map_err(|e| MdError(e.to_string()))?;
    let (devices, _disk, meta) = devices(node, false)?;
    let (sb, slot) = read_superblock(&meta, &devices)?;
    let bits = count_bitmap_bits(&meta, &devices)?;
    let hex = |v: u64| format!("{v:016x}");
    Ok(MetadataDump {
        resource: sb.resource.clone(),
        node: sb.node.clone(),
        meta: match devices.layout.kind {
            MetaKind::Internal => "internal",
            MetaKind::External => "external",
        },
        meta_path: devices.meta_path.display().to_string(),
        metadata_offset_bytes: devices.layout.metadata_offset_bytes,
        metadata_bytes: devices.layout.metadata_bytes,
        version: metadata::METADATA_VERSION,
        slot,
        sequence: sb.sequence,
        data_size_bytes: sb.data_size_bytes,
        bitmap_block_bytes: sb.bitmap_block_bytes,
        al_extents: sb.al_extents,
        uuids: UuidsDump {
            current: hex(sb.uuids.current),
            bitmap: hex(sb.uuids.bitmap),
            history: sb.uuids.history.iter().map(|&h| hex(h)).collect(),
        },
        flags: FLAG_NAMES
            .iter()
            .filter(|(flag, _)| sb.flags.contains(*flag))
            .map(|(_, name)| *name)
            .collect(),
        last_role: sb.last_role.name(),
        out_of_sync_bytes: (bits * u64::from(sb.bitmap_block_bytes)).min(sb.data_size_bytes),
    })
}

/// `dump-md` for humans.
pub fn dump_text(d: &MetadataDump) -> String {
    format!(
        "{}/{} metadata v{} ({} in {}, offset {}, {} bytes)\n\
         \x20 slot:{} sequence:{} last-role:{}\n\
         \x20 data-size:{} ({} bytes) bitmap-block:{} al-extents:{}\n\
         \x20 uuids current:{} bitmap:{} history:{}\n\
         \x20 flags:{}\n\
         \x20 out-of-sync:{}\n",
        d.resource,
        d.node,
        d.version,
        d.meta,
        d.meta_path,
        d.metadata_offset_bytes,
        d.metadata_bytes,
        d.slot,
        d.sequence,
        d.last_role,
        super::render::bytes(d.data_size_bytes),
        d.data_size_bytes,
        d.bitmap_block_bytes,
        d.al_extents,
        d.uuids.current,
        d.uuids.bitmap,
        d.uuids.history.join(","),
        if d.flags.is_empty() {
            "-".to_owned()
        } else {
            d.flags.join(",")
        },
        super::render::bytes(d.out_of_sync_bytes),
    )
}
