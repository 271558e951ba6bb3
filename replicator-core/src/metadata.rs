//! The on-disk metadata format: the superblock (two alternating slots), the
//! layout of the metadata regions (superblock slots, activity-log ring,
//! bitmap) for internal and external metadata, and the blocks `create-md`
//! writes.
//!
//! Owns byte layouts and their validation. Must not do I/O: the daemon reads
//! and writes the bytes this module describes at the offsets it computes.

use thiserror::Error;

use crate::activity_log::{
    AL_RING_BYTES, AL_RING_TRANSACTIONS, AL_TRANSACTION_BYTES, MAX_AL_EXTENTS, MIN_AL_EXTENTS,
};
use crate::bitmap::{
    blocks_for, check_block_bytes, on_disk_bytes, BITMAP_PAGE_BYTES, MAX_BITMAP_BLOCKS,
};
use crate::types::{NodeRole, MAX_NAME_BYTES};

pub use crate::types::{GenerationUuids, HISTORY_UUIDS};

/// Version of the metadata layout and superblock format; the golden-byte
/// tests pin the format of this version.
pub const METADATA_VERSION: u16 = 1;

/// First four bytes of a superblock slot: "RPMD".
pub const METADATA_MAGIC: u32 = 0x5250_4D44;

/// Size of one superblock slot on disk.
pub const SUPERBLOCK_SLOT_BYTES: u64 = 4096;

/// Number of superblock slots (written alternately).
pub const SUPERBLOCK_SLOTS: u64 = 2;

/// Alignment of every metadata region and of the data area's size.
pub const METADATA_ALIGN_BYTES: u64 = 4096;

/// Metadata flag bits stored in the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MetaFlags(pub u32);

impl MetaFlags {
    /// The data is a consistent copy (not in the middle of a resync as target).
    pub const CONSISTENT: MetaFlags = MetaFlags(1 << 0);
    /// The data was up to date when last written.
    pub const UP_TO_DATE: MetaFlags = MetaFlags(1 << 1);
    /// The data is known to be older than the peer's (outdated).
    pub const OUTDATED: MetaFlags = MetaFlags(1 << 2);
    /// The node was primary when it last wrote metadata.
    pub const WAS_PRIMARY: MetaFlags = MetaFlags(1 << 3);
    /// The node crashed while primary: its AL extents need resync.
    pub const CRASHED_PRIMARY: MetaFlags = MetaFlags(1 << 4);
    /// The activity log is empty (no write may be in flight).
    pub const AL_CLEAN: MetaFlags = MetaFlags(1 << 5);
    /// The daemon shut down cleanly (bitmap fully persisted).
    pub const CLEAN_SHUTDOWN: MetaFlags = MetaFlags(1 << 6);
    /// A full resync is due on the next connection.
    pub const FULL_SYNC: MetaFlags = MetaFlags(1 << 7);
    /// Every flag this version knows; other bits are refused on decode.
    pub const KNOWN: MetaFlags = MetaFlags((1 << 8) - 1);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: MetaFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the bits of `other`.
    pub fn insert(&mut self, other: MetaFlags) {
        self.0 |= other.0;
    }

    /// Clears the bits of `other`.
    pub fn remove(&mut self, other: MetaFlags) {
        self.0 &= !other.0;
    }

    /// Sets or clears the bits of `other`.
    pub fn set(&mut self, other: MetaFlags, on: bool) {
        if on {
            self.insert(other);
        } else {
            self.remove(other);
        }
    }
}

/// The decoded contents of one superblock slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Incremented on every write; the slot is `sequence % 2`.
    pub sequence: u64,
    /// Resource name.
    pub resource: String,
    /// This node's name.
    pub node: String,
    /// Size of the data area (what NBD exports).
    pub data_size_bytes: u64,
    /// Bitmap granularity.
    pub bitmap_block_bytes: u32,
    /// Activity-log capacity in extents.
    pub al_extents: u32,
    /// Generation UUIDs.
    pub uuids: GenerationUuids,
    /// Flag bits.
    pub flags: MetaFlags,
    /// The role the node had when the superblock was written.
    pub last_role: NodeRole,
}

/// Errors when computing layouts, creating or decoding metadata.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MetadataError {
    /// The slot does not start with [`METADATA_MAGIC`] (no or foreign metadata).
    #[error("metadata slot {slot}: bad magic {found:#010x} (no replicator metadata here)")]
    BadMagic {
        /// Slot index.
        slot: u8,
        /// Magic found.
        found: u32,
    },
    /// The slot was written by another metadata version.
    #[error("metadata slot {slot}: unsupported format version {found} (this build reads {METADATA_VERSION})")]
    UnsupportedVersion {
        /// Slot index.
        slot: u8,
        /// Version found.
        found: u16,
    },
    /// The slot's checksum does not match (torn or damaged write).
    #[error("metadata slot {slot}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ChecksumMismatch {
        /// Slot index.
        slot: u8,
        /// CRC stored.
        stored: u32,
        /// CRC computed.
        computed: u32,
    },
    /// A field holds a value outside its range.
    #[error("metadata slot {slot}: field {field} invalid: {detail}")]
    FieldOutOfRange {
        /// Slot index.
        slot: u8,
        /// Field name.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Neither slot holds a valid superblock.
    #[error("no valid superblock: slot 0: {slot0}; slot 1: {slot1}")]
    BothSlotsInvalid {
        /// Why slot 0 was refused.
        slot0: Box<MetadataError>,
        /// Why slot 1 was refused.
        slot1: Box<MetadataError>,
    },
    /// The metadata belongs to another resource.
    #[error("metadata belongs to resource {found:?}, not {expected:?}")]
    WrongResource {
        /// Resource in the metadata.
        found: String,
        /// Resource configured.
        expected: String,
    },
    /// The metadata belongs to another node.
    #[error("metadata belongs to node {found:?}, not {expected:?}")]
    WrongNode {
        /// Node in the metadata.
        found: String,
        /// Node configured.
        expected: String,
    },
    /// The recorded data size does not fit the disk.
    #[error("metadata records a data area of {recorded_bytes} bytes but the disk provides {available_bytes}")]
    SizeMismatch {
        /// Size in the superblock.
        recorded_bytes: u64,
        /// Size the layout of this disk gives.
        available_bytes: u64,
    },
    /// The disk or metadata device is too small for the requested layout.
    #[error("{what} of {size_bytes} bytes is too small: needs at least {needed_bytes}")]
    TooSmall {
        /// Which device.
        what: &'static str,
        /// Its size.
        size_bytes: u64,
        /// Size needed.
        needed_bytes: u64,
    },
    /// A parameter (name, granularity, AL size) is invalid.
    #[error("invalid metadata parameter {param}: {detail}")]
    BadParameter {
        /// Parameter name.
        param: &'static str,
        /// What is wrong.
        detail: String,
    },
}

const _: () = assert!(HISTORY_UUIDS >= 2);
const _: () = assert!(MAX_NAME_BYTES <= u8::MAX as usize);

// Superblock layout, version 1 (big-endian; CRC-32 over bytes 0..216):
//
// offset size field
//   0     4   magic "RPMD"
//   4     2   format version
//   6     2   reserved, 0
//   8     8   sequence
//  16     8   data_size_bytes
//  24     4   bitmap_block_bytes
//  28     4   al_extents
//  32     8   uuid current
//  40     8   uuid bitmap
//  48    32   uuid history[4]
//  80     4   flags
//  84     1   last_role code
//  85     1   resource name length
//  86     1   node name length
//  87     1   reserved, 0
//  88    64   resource name, zero padded
// 152    64   node name, zero padded
// 216     4   CRC-32
// 220  3876   zero
const SB_NAME_OFFSET_RESOURCE: usize = 88;
const SB_NAME_OFFSET_NODE: usize = SB_NAME_OFFSET_RESOURCE + MAX_NAME_BYTES;
pub(crate) const SB_CRC_OFFSET: usize = SB_NAME_OFFSET_NODE + MAX_NAME_BYTES;
/// Bytes of a superblock slot that carry data (the rest is zero).
pub const SUPERBLOCK_USED_BYTES: usize = SB_CRC_OFFSET + 4;

const _: () = assert!(SB_CRC_OFFSET == 216);
const _: () = assert!(SUPERBLOCK_USED_BYTES as u64 <= SUPERBLOCK_SLOT_BYTES);
const _: () = assert!(
    HISTORY_UUIDS == 4,
    "superblock layout holds four history UUIDs"
);

fn check_name(param: &'static str, name: &str) -> Result<(), MetadataError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(MetadataError::BadParameter {
            param,
            detail: format!("{name:?} must be 1..={MAX_NAME_BYTES} bytes"),
        });
    }
    if name.bytes().any(|b| b == 0) {
        return Err(MetadataError::BadParameter {
            param,
            detail: format!("{name:?} contains a NUL byte"),
        });
    }
    Ok(())
}

fn check_geometry(bitmap_block_bytes: u32, al_extents: u32) -> Result<(), MetadataError> {
    check_block_bytes(bitmap_block_bytes).map_err(|e| MetadataError::BadParameter {
        param: "bitmap_block_bytes",
        detail: e.to_string(),
    })?;
    if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&al_extents) {
        return Err(MetadataError::BadParameter {
            param: "al_extents",
            detail: format!("{al_extents} outside {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}"),
        });
    }
    Ok(())
}

/// Encodes a superblock into one slot ([`SUPERBLOCK_SLOT_BYTES`] bytes).
///
/// Panics if the names are invalid: superblocks are built from validated
/// configuration or decoded metadata, so that is a programmer error.
pub fn encode_superblock(sb: &Superblock) -> Vec<u8> {
    assert!(
        check_name("resource", &sb.resource).is_ok() && check_name("node", &sb.node).is_ok(),
        "superblock names must be validated before encoding: {:?}/{:?}",
        sb.resource,
        sb.node
    );
    let mut b = vec![0u8; SUPERBLOCK_SLOT_BYTES as usize];
    b[0..4].copy_from_slice(&METADATA_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&METADATA_VERSION.to_be_bytes());
    b[8..16].copy_from_slice(&sb.sequence.to_be_bytes());
    b[16..24].copy_from_slice(&sb.data_size_bytes.to_be_bytes());
    b[24..28].copy_from_slice(&sb.bitmap_block_bytes.to_be_bytes());
    b[28..32].copy_from_slice(&sb.al_extents.to_be_bytes());
    b[32..40].copy_from_slice(&sb.uuids.current.to_be_bytes());
    b[40..48].copy_from_slice(&sb.uuids.bitmap.to_be_bytes());
    for (i, h) in sb.uuids.history.iter().enumerate() {
        b[48 + i * 8..56 + i * 8].copy_from_slice(&h.to_be_bytes());
    }
    b[80..84].copy_from_slice(&sb.flags.0.to_be_bytes());
    b[84] = sb.last_role.code();
    b[85] = sb.resource.len() as u8;
    b[86] = sb.node.len() as u8;
    b[SB_NAME_OFFSET_RESOURCE..SB_NAME_OFFSET_RESOURCE + sb.resource.len()]
        .copy_from_slice(sb.resource.as_bytes());
    b[SB_NAME_OFFSET_NODE..SB_NAME_OFFSET_NODE + sb.node.len()].copy_from_slice(sb.node.as_bytes());
    let crc = crc32fast::hash(&b[..SB_CRC_OFFSET]);
    b[SB_CRC_OFFSET..SUPERBLOCK_USED_BYTES].copy_from_slice(&crc.to_be_bytes());
    b
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes and validates one superblock slot.
pub fn decode_superblock(slot: u8, b: &[u8]) -> Result<Superblock, MetadataError> {
    let field = |field: &'static str, detail: String| MetadataError::FieldOutOfRange {
        slot,
        field,
        detail,
    };
    if b.len() != SUPERBLOCK_SLOT_BYTES as usize {
        return Err(field(
            "slot",
            format!("{} bytes, expected {SUPERBLOCK_SLOT_BYTES}", b.len()),
        ));
    }
    let magic = be_u32(b, 0);
    if magic != METADATA_MAGIC {
        return Err(MetadataError::BadMagic { slot, found: magic });
    }
    let version = u16::from_be_bytes([b[4], b[5]]);
    if version != METADATA_VERSION {
        return Err(MetadataError::UnsupportedVersion {
            slot,
            found: version,
        });
    }
    let stored = be_u32(b, SB_CRC_OFFSET);
    let computed = crc32fast::hash(&b[..SB_CRC_OFFSET]);
    if stored != computed {
        return Err(MetadataError::ChecksumMismatch {
            slot,
            stored,
            computed,
        });
    }
    if b[6] != 0 || b[7] != 0 || b[87] != 0 {
        return Err(field("reserved", "non-zero".to_string()));
    }
    let bitmap_block_bytes = be_u32(b, 24);
    let al_extents = be_u32(b, 28);
    check_geometry(bitmap_block_bytes, al_extents).map_err(|e| match e {
        MetadataError::BadParameter { param, detail } => field(param, detail),
        other => other,
    })?;
    let flags = MetaFlags(be_u32(b, 80));
    if flags.0 & !MetaFlags::KNOWN.0 != 0 {
        return Err(field(
            "flags",
            format!("unknown bits {:#x}", flags.0 & !MetaFlags::KNOWN.0),
        ));
    }
    let last_role = NodeRole::from_code(b[84])
        .ok_or_else(|| field("last_role", format!("unknown code {}", b[84])))?;
    let name = |which: &'static str, len: u8, at: usize| -> Result<String, MetadataError> {
        let len = usize::from(len);
        if len == 0 || len > MAX_NAME_BYTES {
            return Err(field(which, format!("length {len}")));
        }
        if b[at + len..at + MAX_NAME_BYTES].iter().any(|&x| x != 0) {
            return Err(field(which, "padding not zero".to_string()));
        }
        let s = std::str::from_utf8(&b[at..at + len])
            .map_err(|e| field(which, format!("not UTF-8: {e}")))?;
        check_name(which, s).map_err(|e| field(which, e.to_string()))?;
        Ok(s.to_string())
    };
    let resource = name("resource", b[85], SB_NAME_OFFSET_RESOURCE)?;
    let node = name("node", b[86], SB_NAME_OFFSET_NODE)?;
    let mut history = [0u64; HISTORY_UUIDS];
    for (i, h) in history.iter_mut().enumerate() {
        *h = be_u64(b, 48 + i * 8);
    }
    Ok(Superblock {
        sequence: be_u64(b, 8),
        resource,
        node,
        data_size_bytes: be_u64(b, 16),
        bitmap_block_bytes,
        al_extents,
        uuids: GenerationUuids {
            current: be_u64(b, 32),
            bitmap: be_u64(b, 40),
            history,
        },
        flags,
        last_role,
    })
}

/// Decodes both slots and returns the valid superblock with the higher
/// sequence and the slot it came from. A torn write of one slot leaves the
/// other; if both are invalid the error gives both reasons.
pub fn decode_superblocks(slot0: &[u8], slot1: &[u8]) -> Result<(Superblock, u8), MetadataError> {
    match (decode_superblock(0, slot0), decode_superblock(1, slot1)) {
        (Ok(a), Ok(b)) => Ok(if b.sequence > a.sequence {
            (b, 1)
        } else {
            (a, 0)
        }),
        (Ok(a), Err(_)) => Ok((a, 0)),
        (Err(_), Ok(b)) => Ok((b, 1)),
        (Err(a), Err(b)) => Err(MetadataError::BothSlotsInvalid {
            slot0: Box::new(a),
            slot1: Box::new(b),
        }),
    }
}

/// Where metadata lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    /// At the end of the backing disk.
    Internal,
    /// On a separate file or device; the whole disk holds data.
    External,
}

/// Byte offsets and sizes of the metadata regions. Offsets are on the
/// metadata device (the backing disk itself for internal metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataLayout {
    /// Internal or external.
    pub kind: MetaKind,
    /// Size of the data area at offset 0 of the backing disk (exported size).
    pub data_size_bytes: u64,
    /// Start of the metadata region (= superblock slot 0).
    pub metadata_offset_bytes: u64,
    /// Total size of the metadata region.
    pub metadata_bytes: u64,
    /// Offset of superblock slot 0; slot 1 follows.
    pub superblock_offset_bytes: u64,
    /// Offset of the AL ring.
    pub al_offset_bytes: u64,
    /// Size of the AL ring.
    pub al_bytes: u64,
    /// Offset of the on-disk bitmap.
    pub bitmap_offset_bytes: u64,
    /// Size of the on-disk bitmap (whole pages).
    pub bitmap_bytes: u64,
    /// Bitmap granularity the layout was computed for.
    pub bitmap_block_bytes: u32,
}

fn align_down(v: u64, a: u64) -> u64 {
    v - v % a
}

/// Smallest data area a layout accepts.
pub const MIN_DATA_BYTES: u64 = 1024 * 1024;

impl MetadataLayout {
    fn regions(
        kind: MetaKind,
        data_size_bytes: u64,
        metadata_offset_bytes: u64,
        bitmap_bytes: u64,
        bitmap_block_bytes: u32,
    ) -> Self {
        let superblock_offset_bytes = metadata_offset_bytes;
        let al_offset_bytes = superblock_offset_bytes + SUPERBLOCK_SLOTS * SUPERBLOCK_SLOT_BYTES;
        let bitmap_offset_bytes = al_offset_bytes + AL_RING_BYTES;
        MetadataLayout {
            kind,
            data_size_bytes,
            metadata_offset_bytes,
            metadata_bytes: SUPERBLOCK_SLOTS * SUPERBLOCK_SLOT_BYTES + AL_RING_BYTES + bitmap_bytes,
            superblock_offset_bytes,
            al_offset_bytes,
            al_bytes: AL_RING_BYTES,
            bitmap_offset_bytes,
            bitmap_bytes,
            bitmap_block_bytes,
        }
    }

    /// Internal metadata at the end of a backing disk of `disk_size_bytes`:
    /// `[data area | superblock ×2 | AL ring | bitmap]`. The bitmap is sized
    /// for the whole disk (a slight overestimate that avoids a fixpoint) and
    /// the data area is aligned down to [`METADATA_ALIGN_BYTES`].
    pub fn internal(
        disk_size_bytes: u64,
        bitmap_block_bytes: u32,
        al_extents: u32,
    ) -> Result<Self, MetadataError> {
        check_geometry(bitmap_block_bytes, al_extents)?;
        let blocks = blocks_for(disk_size_bytes, bitmap_block_bytes);
        if blocks > MAX_BITMAP_BLOCKS {
            return Err(MetadataError::BadParameter {
                param: "disk size",
                detail: format!("{blocks} bitmap blocks exceed {MAX_BITMAP_BLOCKS}"),
            });
        }
        let bitmap_bytes = on_disk_bytes(blocks);
        let md = SUPERBLOCK_SLOTS * SUPERBLOCK_SLOT_BYTES + AL_RING_BYTES + bitmap_bytes;
        let needed = md + MIN_DATA_BYTES + METADATA_ALIGN_BYTES;
        if disk_size_bytes < needed {
            return Err(MetadataError::TooSmall {
                what: "backing disk",
                size_bytes: disk_size_bytes,
                needed_bytes: needed,
            });
        }
        let offset = align_down(disk_size_bytes - md, METADATA_ALIGN_BYTES);
        Ok(Self::regions(
            MetaKind::Internal,
            offset,
            offset,
            bitmap_bytes,
            bitmap_block_bytes,
        ))
    }

    /// External metadata on a device of `meta_size_bytes` at offset 0; the
    /// data area is the whole backing disk, aligned down to
    /// [`METADATA_ALIGN_BYTES`].
    pub fn external(
        disk_size_bytes: u64,
        meta_size_bytes: u64,
        bitmap_block_bytes: u32,
        al_extents: u32,
    ) -> Result<Self, MetadataError> {
        check_geometry(bitmap_block_bytes, al_extents)?;
        let data = align_down(disk_size_bytes, METADATA_ALIGN_BYTES);
        if data < MIN_DATA_BYTES {
            return Err(MetadataError::TooSmall {
                what: "backing disk",
                size_bytes: disk_size_bytes,
                needed_bytes: MIN_DATA_BYTES,
            });
        }
        let blocks = blocks_for(data, bitmap_block_bytes);
        if blocks > MAX_BITMAP_BLOCKS {
            return Err(MetadataError::BadParameter {
                param: "disk size",
                detail: format!("{blocks} bitmap blocks exceed {MAX_BITMAP_BLOCKS}"),
            });
        }
        let bitmap_bytes = on_disk_bytes(blocks);
        let layout = Self::regions(
            MetaKind::External,
            data,
            0,
            bitmap_bytes,
            bitmap_block_bytes,
        );
        if meta_size_bytes < layout.metadata_bytes {
            return Err(MetadataError::TooSmall {
                what: "metadata device",
                size_bytes: meta_size_bytes,
                needed_bytes: layout.metadata_bytes,
            });
        }
        Ok(layout)
    }

    /// Offset of superblock slot `slot` (0 or 1).
    pub fn superblock_slot_offset(&self, slot: u8) -> u64 {
        assert!(u64::from(slot) < SUPERBLOCK_SLOTS, "superblock slot {slot}");
        self.superblock_offset_bytes + u64::from(slot) * SUPERBLOCK_SLOT_BYTES
    }

    /// Offset of AL ring block `ring_slot`.
    pub fn al_block_offset(&self, ring_slot: u32) -> u64 {
        assert!(ring_slot < AL_RING_TRANSACTIONS, "AL ring slot {ring_slot}");
        self.al_offset_bytes + u64::from(ring_slot) * AL_TRANSACTION_BYTES as u64
    }

    /// Offset of bitmap page `page`.
    pub fn bitmap_page_offset(&self, page: u64) -> u64 {
        assert!(
            (page + 1) * BITMAP_PAGE_BYTES as u64 <= self.bitmap_bytes,
            "bitmap page {page}"
        );
        self.bitmap_offset_bytes + page * BITMAP_PAGE_BYTES as u64
    }

    /// Checks a decoded superblock against this disk and configuration:
    /// resource and node names, data size and bitmap granularity.
    pub fn check_superblock(
        &self,
        sb: &Superblock,
        resource: &str,
        node: &str,
    ) -> Result<(), MetadataError> {
        if sb.resource != resource {
            return Err(MetadataError::WrongResource {
                found: sb.resource.clone(),
                expected: resource.to_string(),
            });
        }
        if sb.node != node {
            return Err(MetadataError::WrongNode {
                found: sb.node.clone(),
                expected: node.to_string(),
            });
        }
        if sb.data_size_bytes != self.data_size_bytes {
            return Err(MetadataError::SizeMismatch {
                recorded_bytes: sb.data_size_bytes,
                available_bytes: self.data_size_bytes,
            });
        }
        if sb.bitmap_block_bytes != self.bitmap_block_bytes {
            return Err(MetadataError::FieldOutOfRange {
                slot: 0,
                field: "bitmap_block_bytes",
                detail: format!(
                    "metadata has {} but the layout uses {}",
                    sb.bitmap_block_bytes, self.bitmap_block_bytes
                ),
            });
        }
        Ok(())
    }
}

/// One write `create-md` performs on the metadata device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataWrite {
    /// Write these bytes at this offset.
    Data {
        /// Offset on the metadata device.
        offset_bytes: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Zero this range (the caller may punch a hole or write zeroes).
    Zero {
        /// Offset on the metadata device.
        offset_bytes: u64,
        /// Length.
        len_bytes: u64,
    },
}

/// Fresh metadata for `create-md`: the superblock and the writes that lay it
/// down. A new node is Inconsistent with empty UUIDs, a zeroed AL ring and a
/// clear bitmap (the first connection decides the initial sync; an operator
/// skips it with `new-current-uuid --clear-bitmap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedMetadata {
    /// The superblock (as in slot 0).
    pub superblock: Superblock,
    /// Writes in order: zero the AL ring and bitmap, then both slots.
    pub writes: Vec<MetadataWrite>,
}

/// Builds fresh metadata for `resource`/`node` on `layout`.
pub fn create(
    layout: &MetadataLayout,
    resource: &str,
    node: &str,
    al_extents: u32,
) -> Result<CreatedMetadata, MetadataError> {
    check_name("resource", resource)?;
    check_name("node", node)?;
    check_geometry(layout.bitmap_block_bytes, al_extents)?;
    let mut sb = Superblock {
        sequence: 0,
        resource: resource.to_string(),
        node: node.to_string(),
        data_size_bytes: layout.data_size_bytes,
        bitmap_block_bytes: layout.bitmap_block_bytes,
        al_extents,
        uuids: GenerationUuids::default(),
        flags: MetaFlags::AL_CLEAN,
        last_role: NodeRole::Secondary,
    };
    let slot1 = encode_superblock(&sb);
    sb.sequence = 1;
    let slot0 = encode_superblock(&sb);
    Ok(CreatedMetadata {
        writes: vec![
            MetadataWrite::Zero {
                offset_bytes: layout.al_offset_bytes,
                len_bytes: layout.al_bytes,
            },
            MetadataWrite::Zero {
                offset_bytes: layout.bitmap_offset_bytes,
                len_bytes: layout.bitmap_bytes,
            },
            MetadataWrite::Data {
                offset_bytes: layout.superblock_slot_offset(1),
                bytes: slot1,
            },
            MetadataWrite::Data {
                offset_bytes: layout.superblock_slot_offset(0),
                bytes: slot0,
            },
        ],
        superblock: sb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn sample() -> Superblock {
        Superblock {
            sequence: 0x0102_0304_0506_0708,
            resource: "vm1".into(),
            node: "alpha".into(),
            data_size_bytes: GIB,
            bitmap_block_bytes: 4096,
            al_extents: 1237,
            uuids: GenerationUuids {
                current: 0xaaaa,
                bitmap: 0xbbbb,
                history: [1, 2, 3, 4],
            },
            flags: MetaFlags(MetaFlags::CONSISTENT.0 | MetaFlags::AL_CLEAN.0),
            last_role: NodeRole::Primary,
        }
    }

    #[test]
    fn superblock_golden_bytes_of_version_1() {
        // Pins the superblock layout of METADATA_VERSION 1 byte for byte; the
        // CRC is checked against an independent computation.
        assert_eq!(METADATA_VERSION, 1);
        let b = encode_superblock(&sample());
        assert_eq!(b.len(), 4096);
        let mut expected = Vec::new();
        expected.extend_from_slice(b"RPMD\x00\x01\x00\x00");
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0x40, 0, 0, 0]);
        expected.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0x04, 0xd5]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0xaa, 0xaa]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0xbb, 0xbb]);
        for h in 1u8..=4 {
            expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, h]);
        }
        expected.extend_from_slice(&[0, 0, 0, 0x21, 1, 3, 5, 0]);
        let mut name = [0u8; 64];
        name[..3].copy_from_slice(b"vm1");
        expected.extend_from_slice(&name);
        let mut name = [0u8; 64];
        name[..5].copy_from_slice(b"alpha");
        expected.extend_from_slice(&name);
        assert_eq!(&b[..216], &expected[..]);
        assert_eq!(&b[216..220], &crc32fast::hash(&expected).to_be_bytes());
        assert!(b[220..].iter().all(|&x| x == 0));
        assert_eq!(decode_superblock(0, &b), Ok(sample()));
    }

    #[test]
    fn meta_flags_set_and_clear_single_bits() {
        // Proves the flag helpers touch only the named bits.
        let mut f = MetaFlags::default();
        f.insert(MetaFlags::CONSISTENT);
        f.set(MetaFlags::CRASHED_PRIMARY, true);
        assert!(f.contains(MetaFlags::CONSISTENT) && f.contains(MetaFlags::CRASHED_PRIMARY));
        f.set(MetaFlags::CONSISTENT, false);
        assert_eq!(f, MetaFlags::CRASHED_PRIMARY);
        f.remove(MetaFlags::CRASHED_PRIMARY);
        assert_eq!(f, MetaFlags(0));
        assert!(MetaFlags::KNOWN.contains(MetaFlags::FULL_SYNC));
    }

    #[test]
    fn newer_valid_slot_wins_and_a_torn_slot_falls_back_to_the_older() {
        // Proves slot selection: the higher sequence wins when both are valid,
        // and a torn write of the newer slot leaves the older one in charge.
        let mut old = sample();
        old.sequence = 7;
        let mut new = sample();
        new.sequence = 8;
        new.uuids.current = 0xcccc;
        let a = encode_superblock(&old);
        let b = encode_superblock(&new);
        assert_eq!(decode_superblocks(&a, &b), Ok((new.clone(), 1)));
        assert_eq!(decode_superblocks(&b, &a), Ok((new, 0)));
        let mut torn = b.clone();
        torn[100..].fill(0);
        assert_eq!(decode_superblocks(&a, &torn), Ok((old, 0)));
    }

    #[test]
    fn damaged_or_foreign_metadata_is_refused_with_the_reason() {
        // Proves each defect has its own error: no metadata (bad magic), newer
        // format, checksum mismatch, invalid fields, and both slots bad.
        let good = encode_superblock(&sample());
        let zero = vec![0u8; 4096];
        match decode_superblocks(&zero, &zero) {
            Err(MetadataError::BothSlotsInvalid { slot0, slot1 }) => {
                assert!(matches!(
                    *slot0,
                    MetadataError::BadMagic { slot: 0, found: 0 }
                ));
                assert!(matches!(*slot1, MetadataError::BadMagic { slot: 1, .. }));
            }
            other => panic!("expected BothSlotsInvalid, got {other:?}"),
        }
        let mut v2 = good.clone();
        v2[5] = 2;
        assert_eq!(
            decode_superblock(0, &v2),
            Err(MetadataError::UnsupportedVersion { slot: 0, found: 2 })
        );
        let mut flipped = good.clone();
        flipped[40] ^= 1;
        assert!(matches!(
            decode_superblock(1, &flipped),
            Err(MetadataError::ChecksumMismatch { slot: 1, .. })
        ));
        // A field out of range with a valid CRC (a buggy writer).
        let mut role = good.clone();
        role[84] = 9;
        let crc = crc32fast::hash(&role[..216]);
        role[216..220].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            decode_superblock(0, &role),
            Err(MetadataError::FieldOutOfRange {
                field: "last_role",
                ..
            })
        ));
        assert!(matches!(
            decode_superblock(0, &good[..100]),
            Err(MetadataError::FieldOutOfRange { field: "slot", .. })
        ));
    }

    #[test]
    fn superblock_of_another_resource_node_or_size_is_refused() {
        // Proves check_superblock refuses metadata that belongs elsewhere.
        let layout = MetadataLayout::internal(GIB + (64 << 20), 4096, 1237).expect("layout");
        let mut sb = sample();
        sb.data_size_bytes = layout.data_size_bytes;
        assert_eq!(layout.check_superblock(&sb, "vm1", "alpha"), Ok(()));
        assert!(matches!(
            layout.check_superblock(&sb, "vm2", "alpha"),
            Err(MetadataError::WrongResource { .. })
        ));
        assert!(matches!(
            layout.check_superblock(&sb, "vm1", "bravo"),
            Err(MetadataError::WrongNode { .. })
        ));
        sb.data_size_bytes -= 4096;
        assert!(matches!(
            layout.check_superblock(&sb, "vm1", "alpha"),
            Err(MetadataError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn internal_layout_places_regions_after_the_data_without_overlap() {
        // Proves the internal layout: data area first and aligned, then the
        // two slots, the AL ring and the bitmap, ending within the disk, with
        // one bitmap bit per block of the data area.
        let disk = 10 * GIB + 12345;
        let l = MetadataLayout::internal(disk, 4096, 1237).expect("layout");
        assert_eq!(l.data_size_bytes % METADATA_ALIGN_BYTES, 0);
        assert_eq!(l.metadata_offset_bytes, l.data_size_bytes);
        assert_eq!(l.superblock_slot_offset(1), l.data_size_bytes + 4096);
        assert_eq!(l.al_offset_bytes, l.data_size_bytes + 8192);
        assert_eq!(l.bitmap_offset_bytes, l.al_offset_bytes + AL_RING_BYTES);
        assert!(l.bitmap_offset_bytes + l.bitmap_bytes <= disk);
        assert!(l.bitmap_bytes * 8 * 4096 >= l.data_size_bytes);
        // 10 GiB at 4 KiB per bit: 320 KiB of bitmap, metadata < 0.01 %.
        assert_eq!(l.bitmap_bytes, 320 * 1024 + 4096);
        assert!(disk - l.data_size_bytes < l.metadata_bytes + METADATA_ALIGN_BYTES);
        assert_eq!(l.al_block_offset(7), l.al_offset_bytes + 7 * 4096);
        assert_eq!(l.al_block_offset(7) + 4096, l.bitmap_offset_bytes);
        let last_page = l.bitmap_bytes / 4096 - 1;
        assert_eq!(
            l.bitmap_page_offset(last_page) + 4096,
            l.bitmap_offset_bytes + l.bitmap_bytes
        );
        assert!(matches!(
            MetadataLayout::internal(1 << 20, 4096, 1237),
            Err(MetadataError::TooSmall { .. })
        ));
        assert!(matches!(
            MetadataLayout::internal(u64::MAX, 4096, 1237),
            Err(MetadataError::BadParameter {
                param: "disk size",
                ..
            })
        ));
        assert!(matches!(
            MetadataLayout::internal(GIB, 1000, 1237),
            Err(MetadataError::BadParameter {
                param: "bitmap_block_bytes",
                ..
            })
        ));
    }

    #[test]
    fn external_layout_uses_the_whole_disk_and_checks_the_meta_device() {
        // Proves external metadata exports the whole (aligned) disk and
        // refuses a metadata device too small for the bitmap.
        let l = MetadataLayout::external(GIB, 1 << 20, 4096, 1237).expect("layout");
        assert_eq!(l.kind, MetaKind::External);
        assert_eq!(l.data_size_bytes, GIB);
        assert_eq!(l.metadata_offset_bytes, 0);
        assert_eq!(l.bitmap_bytes, 32 * 1024);
        assert!(matches!(
            MetadataLayout::external(GIB, 8192, 4096, 1237),
            Err(MetadataError::TooSmall {
                what: "metadata device",
                ..
            })
        ));
    }

    #[test]
    fn created_metadata_is_inconsistent_empty_and_decodes() {
        // Proves create-md output: zeroed AL and bitmap written before both
        // superblock slots; the superblock is a fresh Inconsistent secondary
        // with empty UUIDs, and both slots decode (slot 0 is newer).
        let l = MetadataLayout::internal(GIB, 4096, 1237).expect("layout");
        let c = create(&l, "vm1", "alpha", 1237).expect("create");
        let sb = &c.superblock;
        assert_eq!(sb.uuids, GenerationUuids::default());
        assert!(!sb.flags.contains(MetaFlags::CONSISTENT));
        assert!(sb.flags.contains(MetaFlags::AL_CLEAN));
        assert_eq!(sb.last_role, NodeRole::Secondary);
        assert_eq!(sb.data_size_bytes, l.data_size_bytes);
        let [MetadataWrite::Zero { .. }, MetadataWrite::Zero { .. }, MetadataWrite::Data {
            offset_bytes: o1,
            bytes: s1,
        }, MetadataWrite::Data {
            offset_bytes: o0,
            bytes: s0,
        }] = &c.writes[..]
        else {
            panic!("unexpected writes {:?}", c.writes);
        };
        assert_eq!(
            (*o0, *o1),
            (l.superblock_slot_offset(0), l.superblock_slot_offset(1))
        );
        assert_eq!(decode_superblocks(s0, s1), Ok((sb.clone(), 0)));
        assert!(matches!(
            create(&l, "", "alpha", 1237),
            Err(MetadataError::BadParameter {
                param: "resource",
                ..
            })
        ));
        assert!(matches!(
            create(&l, "vm1", &"n".repeat(65), 1237),
            Err(MetadataError::BadParameter { param: "node", .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_slot_bytes_never_panic(
            a in proptest::collection::vec(any::<u8>(), 0..4200),
            b in proptest::collection::vec(any::<u8>(), 4096..=4096),
        ) {
            // Proves the decoder refuses or accepts any bytes without panicking.
            let _ = decode_superblocks(&a, &b);
        }

        #[test]
        fn mutated_valid_superblock_never_panics_and_never_decodes_silently_changed(
            pos in 0usize..220, val in any::<u8>(),
        ) {
            // Proves corrupting a byte of the covered area is either caught
            // (error) or is a no-op (same value written back).
            let good = encode_superblock(&sample());
            let mut bad = good.clone();
            bad[pos] = val;
            match decode_superblock(0, &bad) {
                Ok(sb) => prop_assert!(bad == good && sb == sample()),
                Err(_) => prop_assert!(bad != good),
            }
        }

        #[test]
        fn superblocks_round_trip(
            seq in any::<u64>(), size in any::<u64>(), cur in any::<u64>(), bm in any::<u64>(),
            hist in any::<[u64; 4]>(), flags in 0u32..256, primary in any::<bool>(),
            res in "[a-z0-9_-]{1,64}", node in "[a-z0-9_-]{1,64}", shift in 12u32..=20, al in MIN_AL_EXTENTS..=MAX_AL_EXTENTS,
        ) {
            // Proves encode/decode is the identity on every valid superblock.
            let sb = Superblock {
                sequence: seq, resource: res, node, data_size_bytes: size,
                bitmap_block_bytes: 1 << shift, al_extents: al,
                uuids: GenerationUuids { current: cur, bitmap: bm, history: hist },
                flags: MetaFlags(flags),
                last_role: if primary { NodeRole::Primary } else { NodeRole::Secondary },
            };
            prop_assert_eq!(decode_superblock(1, &encode_superblock(&sb)), Ok(sb));
        }
    }
}
