//! The peer wire protocol: the messages two nodes exchange and their framing.
//!
//! Owns the `Message` enum, the frame layout (fixed big-endian header with
//! magic, version, type, payload length, payload CRC and header CRC), the
//! limits every frame obeys and the pure `encode`/`decode` functions. Must not
//! do I/O, keep connection state or decide what a message means for the
//! replication state machine (that is the engine's job).
//!
//! # Frame layout (version [`WIRE_VERSION`])
//!
//! ```text
//! offset size field
//!  0      4   magic        0x5250_4C57 ("RPLW")
//!  4      2   version      WIRE_VERSION
//!  6      2   type         MessageType code
//!  8      4   payload_len  bytes following the header, <= MAX_PAYLOAD_BYTES
//! 12      4   payload_crc  CRC-32 (IEEE, crc32fast) of the payload
//! 16      4   header_crc   CRC-32 of bytes 0..16
//! 20      …   payload      message fields, big-endian, fixed order
//! ```
//!
//! The header has its own CRC so a corrupted length is caught before the
//! decoder waits for (up to a megabyte of) payload that will never come.
//!
//! # Size limits
//!
//! Application writes larger than [`MAX_WRITE_PAYLOAD_BYTES`] (1 MiB) are
//! split by the engine into several `Write` messages; NBD allows 32 MiB
//! requests but a 1 MiB frame bound keeps per-connection buffers small and
//! lets acks and pings interleave with bulk data. Resync data obeys the same
//! bound. Bitmaps of any size travel as several `BitmapChunk`s, each at most
//! [`MAX_BITMAP_CHUNK_BYTES`] of run-length code.

use bytes::Bytes;
use thiserror::Error;

use crate::types::{DiskState, GenerationUuids, NodeRole, RequestId};

/// Version of the frame layout and of every message format below. Bump it on
/// any change; the golden-byte tests pin the formats of this version.
pub const WIRE_VERSION: u16 = 1;

/// First four bytes of every frame: "RPLW".
pub const WIRE_MAGIC: u32 = 0x5250_4C57;

/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 20;

/// Largest data payload of a single `Write` or `ResyncData` message.
pub const MAX_WRITE_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Room for the fixed fields that accompany a data payload.
pub const MAX_FIXED_FIELDS_BYTES: usize = 4096;

/// Largest payload (fields + data) of any frame.
pub const MAX_PAYLOAD_BYTES: usize = MAX_WRITE_PAYLOAD_BYTES + MAX_FIXED_FIELDS_BYTES;

/// Largest frame, header included. Checked on encode and on decode.
pub const MAX_FRAME_BYTES: usize = HEADER_BYTES + MAX_PAYLOAD_BYTES;

/// Largest run-length code carried by one `BitmapChunk`.
pub const MAX_BITMAP_CHUNK_BYTES: usize = 64 * 1024;

/// Longest human-readable text (refuse or disconnect reason), in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

pub use crate::types::MAX_NAME_BYTES;

const _: () = assert!(HEADER_BYTES == 4 + 2 + 2 + 4 + 4 + 4);
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_BITMAP_CHUNK_BYTES + 64 <= MAX_PAYLOAD_BYTES);
const _: () = assert!(MAX_REASON_BYTES + 64 <= MAX_PAYLOAD_BYTES);

/// `Write` flag: the write must be durable on the peer before it is acked.
pub const WRITE_FLAG_FUA: u32 = 1 << 0;
/// `Write` flag: write zeroes over the range; the message carries no data.
pub const WRITE_FLAG_ZEROES: u32 = 1 << 1;
/// `Write` flag: discard the range; the message carries no data.
pub const WRITE_FLAG_TRIM: u32 = 1 << 2;
/// Every `Write` flag this version knows; other bits are refused.
pub const WRITE_FLAGS_KNOWN: u32 = WRITE_FLAG_FUA | WRITE_FLAG_ZEROES | WRITE_FLAG_TRIM;

/// `State` flag: the sender crashed while primary (its AL extents need resync).
pub const STATE_FLAG_CRASHED_PRIMARY: u32 = 1 << 0;
/// `State` flag: the sender was primary when it last ran.
pub const STATE_FLAG_WAS_PRIMARY: u32 = 1 << 1;
/// `State` flag: the sender's resync is paused by the operator.
pub const STATE_FLAG_SYNC_PAUSED: u32 = 1 << 2;
/// `State` flag: the sender asks for a full resync towards itself (invalidate).
pub const STATE_FLAG_WANT_FULL_SYNC: u32 = 1 << 3;
/// `State` flag: the sender discards its own data on a split brain
/// (`connect --discard-my-data`).
pub const STATE_FLAG_DISCARD_MY_DATA: u32 = 1 << 4;
/// Every `State` flag this version knows; other bits are refused.
pub const STATE_FLAGS_KNOWN: u32 = STATE_FLAG_CRASHED_PRIMARY
    | STATE_FLAG_WAS_PRIMARY
    | STATE_FLAG_SYNC_PAUSED
    | STATE_FLAG_WANT_FULL_SYNC
    | STATE_FLAG_DISCARD_MY_DATA;

/// Why a node refuses a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The peer failed the HMAC challenge.
    WrongSecret,
    /// The peer serves another resource.
    WrongResource,
    /// The exported sizes differ.
    SizeMismatch,
    /// The bitmap granularities differ.
    BitmapBlockMismatch,
    /// The peer speaks another wire version.
    VersionMismatch,
    /// Both nodes wrote independently; no automatic resolution applies.
    SplitBrain,
    /// The generation UUIDs share no ancestor.
    UnrelatedData,
    /// Anything else; the message says what.
    Other,
}

impl RefuseReason {
    /// Stable code used on the wire.
    pub const fn code(self) -> u16 {
        match self {
            RefuseReason::WrongSecret => 1,
            RefuseReason::WrongResource => 2,
            RefuseReason::SizeMismatch => 3,
            RefuseReason::BitmapBlockMismatch => 4,
            RefuseReason::VersionMismatch => 5,
            RefuseReason::SplitBrain => 6,
            RefuseReason::UnrelatedData => 7,
            RefuseReason::Other => 8,
        }
    }

    /// Inverse of [`RefuseReason::code`]; `None` for an unknown code.
    pub const fn from_code(code: u16) -> Option<Self> {
        match code {
            1 => Some(RefuseReason::WrongSecret),
            2 => Some(RefuseReason::WrongResource),
            3 => Some(RefuseReason::SizeMismatch),
            4 => Some(RefuseReason::BitmapBlockMismatch),
            5 => Some(RefuseReason::VersionMismatch),
            6 => Some(RefuseReason::SplitBrain),
            7 => Some(RefuseReason::UnrelatedData),
            8 => Some(RefuseReason::Other),
            _ => None,
        }
    }
}

/// One message between peers. Offsets and lengths are in bytes of the
/// exported data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message on a connection, both directions.
    Hello {
        /// The sender's [`WIRE_VERSION`].
        wire_version: u16,
        /// Resource name.
        resource: String,
        /// The sender's node name.
        node: String,
        /// The sender's exported data size.
        size_bytes: u64,
        /// The sender's out-of-sync bitmap granularity.
        bitmap_block_bytes: u32,
        /// Optional features the sender supports (bit set, none defined yet).
        features: u64,
    },
    /// A random nonce the receiver must answer with an HMAC (see `auth`).
    AuthChallenge {
        /// Random bytes chosen by the challenger.
        nonce: [u8; 32],
    },
    /// HMAC-SHA256 of the challenger's nonce under the shared secret.
    AuthResponse {
        /// The MAC.
        mac: [u8; 32],
    },
    /// The challenger accepted the response.
    AuthOk,
    /// The sender refuses the connection; the link is closed after this.
    Refuse {
        /// Machine-readable reason.
        reason: RefuseReason,
        /// Human-readable explanation, at most [`MAX_REASON_BYTES`].
        message: String,
    },
    /// The sender's role, disk state and generation UUIDs.
    State {
        /// The sender's role.
        role: NodeRole,
        /// The sender's disk state.
        disk: DiskState,
        /// The sender's generation UUIDs.
        uuids: GenerationUuids,
        /// `STATE_FLAG_*` bits.
        flags: u32,
        /// Number of bits set in the sender's out-of-sync bitmap.
        out_of_sync_blocks: u64,
    },
    /// Part of the sender's out-of-sync bitmap, run-length coded (see `bitmap`).
    BitmapChunk {
        /// First block this chunk describes.
        start_block: u64,
        /// Total number of blocks in the sender's bitmap.
        total_blocks: u64,
        /// This is the final chunk.
        last: bool,
        /// Run-length code, at most [`MAX_BITMAP_CHUNK_BYTES`].
        rle: Bytes,
    },
    /// The sync source tells the target the UUID it will adopt after resync.
    SyncUuid {
        /// The new bitmap/current UUID.
        uuid: u64,
    },
    /// A replicated application write.
    Write {
        /// Sequence number, echoed in `RecvAck`/`WriteAck`.
        id: RequestId,
        /// Byte offset of the write.
        offset: u64,
        /// `WRITE_FLAG_*` bits.
        flags: u32,
        /// Length of the range; equals `data.len()` unless ZEROES or TRIM.
        len_bytes: u32,
        /// The data; empty for ZEROES and TRIM.
        data: Bytes,
    },
    /// Protocol B: the peer received write `id`.
    RecvAck {
        /// The write's id.
        id: RequestId,
    },
    /// The peer completed write `id` on its disk; `error` 0 = success.
    WriteAck {
        /// The write's id.
        id: RequestId,
        /// 0 on success, else an errno-like code from the peer's disk.
        error: u16,
    },
    /// Every write sent before this barrier must be flushed by the peer.
    Barrier {
        /// The barrier's id.
        id: RequestId,
    },
    /// The peer flushed everything before barrier `id`; `error` 0 = success.
    BarrierAck {
        /// The barrier's id.
        id: RequestId,
        /// 0 on success.
        error: u16,
    },
    /// The range differs between the nodes (e.g. a failed peer write).
    OutOfSync {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len_bytes: u32,
    },
    /// The sync target asks for a range's data.
    ResyncRequest {
        /// Request id.
        id: RequestId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len_bytes: u32,
    },
    /// The sync target asks for a range unless its digest matches.
    ResyncChecksumRequest {
        /// Request id.
        id: RequestId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len_bytes: u32,
        /// SHA-256 of the target's copy of the range.
        digest: [u8; 32],
    },
    /// Data answering a resync request.
    ResyncData {
        /// The request's id.
        id: RequestId,
        /// Byte offset.
        offset: u64,
        /// The source's data for the range.
        data: Bytes,
    },
    /// The range's digests matched; nothing to copy, the bits may be cleared.
    ResyncInSync {
        /// The request's id.
        id: RequestId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len_bytes: u32,
    },
    /// The resync completed from the sender's side.
    ResyncDone,
    /// Online verify: asks the peer for the digest of a range.
    VerifyRequest {
        /// Request id.
        id: RequestId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len_bytes: u32,
    },
    /// Online verify: the digest of the peer's copy of a range.
    VerifyReply {
        /// The request's id.
        id: RequestId,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len_bytes: u32,
        /// SHA-256 of the range.
        digest: [u8; 32],
    },
    /// Online verify finished from the sender's side.
    VerifyDone,
    /// Keep-alive probe.
    Ping,
    /// Answer to `Ping`.
    PingAck,
    /// The sender closes the connection on purpose.
    Disconnect {
        /// Human-readable reason, at most [`MAX_REASON_BYTES`].
        reason: String,
    },
}

/// Errors of the peer wire codec. Every one means "drop the link".
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The frame does not start with [`WIRE_MAGIC`].
    #[error("peer frame has bad magic {found:#010x} (expected {WIRE_MAGIC:#010x})")]
    BadMagic {
        /// The magic received.
        found: u32,
    },
    /// The frame was written by another wire version.
    #[error("peer frame has wire version {found}, this node speaks {WIRE_VERSION}")]
    VersionMismatch {
        /// The version received.
        found: u16,
    },
    /// The header CRC does not match.
    #[error(
        "peer frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    HeaderChecksum {
        /// CRC in the frame.
        stored: u32,
        /// CRC computed.
        computed: u32,
    },
    /// The payload CRC does not match.
    #[error("peer frame payload checksum mismatch for type {msg_type} (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadChecksum {
        /// Message type code.
        msg_type: u16,
        /// CRC in the frame.
        stored: u32,
        /// CRC computed.
        computed: u32,
    },
    /// The message type code is not known to this version.
    #[error("peer frame has unknown message type {found}")]
    UnknownType {
        /// The type received.
        found: u16,
    },
    /// The frame exceeds [`MAX_FRAME_BYTES`].
    #[error("peer frame of {len_bytes} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    Oversize {
        /// Length of the frame, header included.
        len_bytes: u64,
    },
    /// The payload is shorter or longer than its message type requires.
    #[error("peer message {msg} has a payload of {found} bytes, expected {expected}")]
    BadLength {
        /// Message name.
        msg: &'static str,
        /// Payload length received.
        found: usize,
        /// Payload length the fields require.
        expected: usize,
    },
    /// A field holds a value outside its range.
    #[error("peer message {msg}: field {field} out of range: {detail}")]
    FieldOutOfRange {
        /// Message name.
        msg: &'static str,
        /// Field name.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
}
