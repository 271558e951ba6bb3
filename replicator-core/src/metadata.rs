//! The on-disk metadata format: the superblock (two alternating slots), the
//! layout of the metadata regions (superblock slots, activity-log ring,
//! bitmap) for internal and external metadata, and the blocks `create-md`
//! writes.
//!
//! Owns byte layouts and their validation. Must not do I/O: the daemon reads
//! and writes the bytes this module describes at the offsets it computes.

use thiserror::Error;

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
