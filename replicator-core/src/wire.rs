//! The peer wire protocol: the messages two nodes exchange and their framing.
//!
//! Owns the `Message` enum, the frame layout (fixed big-endian header with
//! magic, version, type, sequence number, payload length, payload CRC and
//! header CRC), the limits every frame obeys, the pure `encode`/`decode`
//! functions and the per-connection frame numbering ([`FrameEncoder`],
//! [`FrameDecoder`]). Must not do I/O or decide what a message means for the
//! replication state machine (that is the engine's job).
//!
//! # Frame layout (version [`WIRE_VERSION`])
//!
//! ```text
//! offset size field
//!  0      4   magic        0x5250_4C57 ("RPLW")
//!  4      2   version      WIRE_VERSION
//!  6      2   type         MessageType code
//!  8      4   seq          frame number on this connection and direction
//! 12      4   payload_len  bytes following the header, <= MAX_PAYLOAD_BYTES
//! 16      4   payload_crc  CRC-32 (IEEE, crc32fast) of the payload
//! 20      4   header_crc   CRC-32 of bytes 0..20
//! 24      …   payload      message fields, big-endian, fixed order
//! ```
//!
//! The header has its own CRC so a corrupted length is caught before the
//! decoder waits for (up to a megabyte of) payload that will never come.
//!
//! # Frame order
//!
//! A connection numbers its frames per direction from 0, +1 per frame
//! (wrapping), in the order they are put on the stream ([`FrameEncoder`]); the
//! receiver's [`FrameDecoder`] refuses any other number with
//! [`WireError::OutOfOrder`]. A frame that was lost, duplicated or reordered
//! below the codec is therefore a protocol error (the link drops and the
//! nodes resync on reconnect), never a message applied out of order. The
//! plain [`encode`]/[`decode`] functions write sequence 0 and do not check it,
//! for callers that number nothing (tests, benches, one-off frames).
//!
//! # Size limits
//!
//! Application writes larger than [`MAX_WRITE_PAYLOAD_BYTES`] (1 MiB) are
//! split by the engine into several `Write` messages; NBD allows 32 MiB
//! requests but a 1 MiB frame bound keeps per-connection buffers small and
//! lets acks and pings interleave with bulk data. Resync data obeys the same
//! bound. Bitmaps of any size travel as several `BitmapChunk`s, each at most
//! [`MAX_BITMAP_CHUNK_BYTES`] of run-length code; the receiver answers each
//! with a `BitmapAck`, and the sender keeps only a bounded window of chunks
//! unacknowledged (the engine's `BITMAP_CHUNKS_IN_FLIGHT`).

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::types::{DiskState, GenerationUuids, NodeRole, ProtocolMode, RequestId};

/// Version of the frame layout and of every message format below. Bump it on
/// any change; the golden-byte tests pin the formats of this version.
pub const WIRE_VERSION: u16 = 3;

/// First four bytes of every frame: "RPLW".
pub const WIRE_MAGIC: u32 = 0x5250_4C57;

/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 24;

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

const _: () = assert!(HEADER_BYTES == 4 + 2 + 2 + 4 + 4 + 4 + 4);
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
/// `State` flag: the sender, a SyncTarget, waits after a disk failure (its
/// own or its source's) before it asks for more.
pub const STATE_FLAG_RESYNC_DISK_WAIT: u32 = 1 << 5;
/// Every `State` flag this version knows; other bits are refused.
pub const STATE_FLAGS_KNOWN: u32 = STATE_FLAG_CRASHED_PRIMARY
    | STATE_FLAG_WAS_PRIMARY
    | STATE_FLAG_SYNC_PAUSED
    | STATE_FLAG_WANT_FULL_SYNC
    | STATE_FLAG_DISCARD_MY_DATA
    | STATE_FLAG_RESYNC_DISK_WAIT;

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
    /// The replication protocols (A/B/C) differ.
    ProtocolMismatch,
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
            RefuseReason::ProtocolMismatch => 9,
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
            9 => Some(RefuseReason::ProtocolMismatch),
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
        /// The sender's replication protocol (A, B or C); peers must agree.
        protocol: ProtocolMode,
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
    /// The receiver of `BitmapChunk`s applied the chunk ending at
    /// `next_block`: flow control of the bitmap exchange (the sender keeps a
    /// bounded window of unacknowledged chunks).
    BitmapAck {
        /// The block after the acknowledged chunk (the next one expected).
        next_block: u64,
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
    /// The sync target wrote the `ResyncData` of request `id` to its disk
    /// (`error` 0), or failed to (the source keeps the range out of sync
    /// and the target asks again). The source clears the range's bits only
    /// on success, so its out-of-sync count and progress are the target's.
    ResyncAck {
        /// The request's id.
        id: RequestId,
        /// 0 on success, else an errno-like code from the target's disk.
        error: u16,
    },
    /// The sync source could not read the range of request `id` (`error`,
    /// an errno-like code from its disk): the target keeps it out of sync
    /// and asks again after a wait, instead of the link dropping.
    ResyncReadFailed {
        /// The request's id.
        id: RequestId,
        /// errno-like code from the source's disk.
        error: u16,
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
    /// The frame's sequence number is not the next one on this connection:
    /// a frame was lost, duplicated or reordered on the way.
    #[error("peer frame number {found} arrived where {expected} was due (lost, duplicated or reordered frame)")]
    OutOfOrder {
        /// The sequence number due.
        expected: u32,
        /// The sequence number received.
        found: u32,
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

/// Stable type codes of the messages.
mod code {
    pub const HELLO: u16 = 1;
    pub const AUTH_CHALLENGE: u16 = 2;
    pub const AUTH_RESPONSE: u16 = 3;
    pub const AUTH_OK: u16 = 4;
    pub const REFUSE: u16 = 5;
    pub const STATE: u16 = 6;
    pub const BITMAP_CHUNK: u16 = 7;
    pub const SYNC_UUID: u16 = 8;
    pub const WRITE: u16 = 9;
    pub const RECV_ACK: u16 = 10;
    pub const WRITE_ACK: u16 = 11;
    pub const BARRIER: u16 = 12;
    pub const BARRIER_ACK: u16 = 13;
    pub const OUT_OF_SYNC: u16 = 14;
    pub const RESYNC_REQUEST: u16 = 15;
    pub const RESYNC_CHECKSUM_REQUEST: u16 = 16;
    pub const RESYNC_DATA: u16 = 17;
    pub const RESYNC_IN_SYNC: u16 = 18;
    pub const RESYNC_DONE: u16 = 19;
    pub const VERIFY_REQUEST: u16 = 20;
    pub const VERIFY_REPLY: u16 = 21;
    pub const VERIFY_DONE: u16 = 22;
    pub const PING: u16 = 23;
    pub const PING_ACK: u16 = 24;
    pub const DISCONNECT: u16 = 25;
    pub const BITMAP_ACK: u16 = 26;
    pub const RESYNC_ACK: u16 = 27;
    pub const RESYNC_READ_FAILED: u16 = 28;
}

impl Message {
    /// The message's type code in the frame header.
    pub fn type_code(&self) -> u16 {
        match self {
            Message::Hello { .. } => code::HELLO,
            Message::AuthChallenge { .. } => code::AUTH_CHALLENGE,
            Message::AuthResponse { .. } => code::AUTH_RESPONSE,
            Message::AuthOk => code::AUTH_OK,
            Message::Refuse { .. } => code::REFUSE,
            Message::State { .. } => code::STATE,
            Message::BitmapChunk { .. } => code::BITMAP_CHUNK,
            Message::BitmapAck { .. } => code::BITMAP_ACK,
            Message::SyncUuid { .. } => code::SYNC_UUID,
            Message::Write { .. } => code::WRITE,
            Message::RecvAck { .. } => code::RECV_ACK,
            Message::WriteAck { .. } => code::WRITE_ACK,
            Message::Barrier { .. } => code::BARRIER,
            Message::BarrierAck { .. } => code::BARRIER_ACK,
            Message::OutOfSync { .. } => code::OUT_OF_SYNC,
            Message::ResyncRequest { .. } => code::RESYNC_REQUEST,
            Message::ResyncChecksumRequest { .. } => code::RESYNC_CHECKSUM_REQUEST,
            Message::ResyncData { .. } => code::RESYNC_DATA,
            Message::ResyncInSync { .. } => code::RESYNC_IN_SYNC,
            Message::ResyncAck { .. } => code::RESYNC_ACK,
            Message::ResyncReadFailed { .. } => code::RESYNC_READ_FAILED,
            Message::ResyncDone => code::RESYNC_DONE,
            Message::VerifyRequest { .. } => code::VERIFY_REQUEST,
            Message::VerifyReply { .. } => code::VERIFY_REPLY,
            Message::VerifyDone => code::VERIFY_DONE,
            Message::Ping => code::PING,
            Message::PingAck => code::PING_ACK,
            Message::Disconnect { .. } => code::DISCONNECT,
        }
    }

    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        type_name(self.type_code()).unwrap_or("Unknown")
    }
}

fn type_name(code: u16) -> Option<&'static str> {
    Some(match code {
        code::HELLO => "Hello",
        code::AUTH_CHALLENGE => "AuthChallenge",
        code::AUTH_RESPONSE => "AuthResponse",
        code::AUTH_OK => "AuthOk",
        code::REFUSE => "Refuse",
        code::STATE => "State",
        code::BITMAP_CHUNK => "BitmapChunk",
        code::BITMAP_ACK => "BitmapAck",
        code::SYNC_UUID => "SyncUuid",
        code::WRITE => "Write",
        code::RECV_ACK => "RecvAck",
        code::WRITE_ACK => "WriteAck",
        code::BARRIER => "Barrier",
        code::BARRIER_ACK => "BarrierAck",
        code::OUT_OF_SYNC => "OutOfSync",
        code::RESYNC_REQUEST => "ResyncRequest",
        code::RESYNC_CHECKSUM_REQUEST => "ResyncChecksumRequest",
        code::RESYNC_DATA => "ResyncData",
        code::RESYNC_IN_SYNC => "ResyncInSync",
        code::RESYNC_ACK => "ResyncAck",
        code::RESYNC_READ_FAILED => "ResyncReadFailed",
        code::RESYNC_DONE => "ResyncDone",
        code::VERIFY_REQUEST => "VerifyRequest",
        code::VERIFY_REPLY => "VerifyReply",
        code::VERIFY_DONE => "VerifyDone",
        code::PING => "Ping",
        code::PING_ACK => "PingAck",
        code::DISCONNECT => "Disconnect",
        _ => return None,
    })
}

fn out_of_range(msg: &'static str, field: &'static str, detail: String) -> WireError {
    WireError::FieldOutOfRange { msg, field, detail }
}

fn check_text(
    msg: &'static str,
    field: &'static str,
    text: &str,
    max_bytes: usize,
    allow_empty: bool,
) -> Result<(), WireError> {
    if text.len() > max_bytes {
        return Err(out_of_range(
            msg,
            field,
            format!("{} bytes, limit {max_bytes}", text.len()),
        ));
    }
    if text.is_empty() && !allow_empty {
        return Err(out_of_range(msg, field, "empty".to_string()));
    }
    Ok(())
}

fn check_range(
    msg: &'static str,
    offset: u64,
    len_bytes: u64,
    max_len_bytes: u64,
) -> Result<(), WireError> {
    if len_bytes == 0 || len_bytes > max_len_bytes {
        return Err(out_of_range(
            msg,
            "len_bytes",
            format!("{len_bytes}, must be 1..={max_len_bytes}"),
        ));
    }
    if offset.checked_add(len_bytes).is_none() {
        return Err(out_of_range(
            msg,
            "offset",
            format!("{offset} + {len_bytes} overflows"),
        ));
    }
    Ok(())
}

/// Checks every field of a message against its limits; used before encoding
/// and after decoding, so both sides enforce the same rules.
pub fn validate(m: &Message) -> Result<(), WireError> {
    let name = m.name();
    let max_data = MAX_WRITE_PAYLOAD_BYTES as u64;
    match m {
        Message::Hello { resource, node, .. } => {
            check_text(name, "resource", resource, MAX_NAME_BYTES, false)?;
            check_text(name, "node", node, MAX_NAME_BYTES, false)?;
        }
        Message::Refuse { message, .. } => {
            check_text(name, "message", message, MAX_REASON_BYTES, true)?
        }
        Message::Disconnect { reason } => {
            check_text(name, "reason", reason, MAX_REASON_BYTES, true)?
        }
        Message::State { flags, .. } => {
            if flags & !STATE_FLAGS_KNOWN != 0 {
                return Err(out_of_range(
                    name,
                    "flags",
                    format!("unknown bits {:#x}", flags & !STATE_FLAGS_KNOWN),
                ));
            }
        }
        Message::BitmapChunk {
            start_block,
            total_blocks,
            rle,
            ..
        } => {
            if start_block > total_blocks {
                return Err(out_of_range(
                    name,
                    "start_block",
                    format!("{start_block} past total_blocks {total_blocks}"),
                ));
            }
            if rle.len() > MAX_BITMAP_CHUNK_BYTES {
                return Err(out_of_range(
                    name,
                    "rle",
                    format!("{} bytes, limit {MAX_BITMAP_CHUNK_BYTES}", rle.len()),
                ));
            }
        }
        Message::Write {
            offset,
            flags,
            len_bytes,
            data,
            ..
        } => {
            if flags & !WRITE_FLAGS_KNOWN != 0 {
                return Err(out_of_range(
                    name,
                    "flags",
                    format!("unknown bits {:#x}", flags & !WRITE_FLAGS_KNOWN),
                ));
            }
            let no_data = flags & (WRITE_FLAG_ZEROES | WRITE_FLAG_TRIM);
            if no_data == WRITE_FLAG_ZEROES | WRITE_FLAG_TRIM {
                return Err(out_of_range(
                    name,
                    "flags",
                    "ZEROES and TRIM are exclusive".to_string(),
                ));
            }
            if no_data != 0 {
                if !data.is_empty() {
                    return Err(out_of_range(
                        name,
                        "data",
                        format!("{} bytes with ZEROES/TRIM, must be empty", data.len()),
                    ));
                }
                check_range(name, *offset, u64::from(*len_bytes), u64::from(u32::MAX))?;
            } else {
                if data.len() as u64 != u64::from(*len_bytes) {
                    return Err(out_of_range(
                        name,
                        "len_bytes",
                        format!("{len_bytes} but {} data bytes", data.len()),
                    ));
                }
                check_range(name, *offset, u64::from(*len_bytes), max_data)?;
            }
        }
        Message::OutOfSync { offset, len_bytes }
        | Message::ResyncInSync {
            offset, len_bytes, ..
        } => check_range(name, *offset, u64::from(*len_bytes), u64::from(u32::MAX))?,
        Message::ResyncRequest {
            offset, len_bytes, ..
        }
        | Message::ResyncChecksumRequest {
            offset, len_bytes, ..
        }
        | Message::VerifyRequest {
            offset, len_bytes, ..
        }
        | Message::VerifyReply {
            offset, len_bytes, ..
        } => check_range(name, *offset, u64::from(*len_bytes), max_data)?,
        Message::ResyncData { offset, data, .. } => {
            check_range(name, *offset, data.len() as u64, max_data)?
        }
        Message::AuthChallenge { .. }
        | Message::AuthResponse { .. }
        | Message::AuthOk
        | Message::SyncUuid { .. }
        | Message::BitmapAck { .. }
        | Message::RecvAck { .. }
        | Message::WriteAck { .. }
        | Message::ResyncAck { .. }
        | Message::ResyncReadFailed { .. }
        | Message::Barrier { .. }
        | Message::BarrierAck { .. }
        | Message::ResyncDone
        | Message::VerifyDone
        | Message::Ping
        | Message::PingAck => {}
    }
    Ok(())
}

fn put_text(dst: &mut BytesMut, text: &str) {
    dst.put_u16(text.len() as u16);
    dst.put_slice(text.as_bytes());
}

fn put_uuids(dst: &mut BytesMut, u: &GenerationUuids) {
    dst.put_u64(u.current);
    dst.put_u64(u.bitmap);
    for h in u.history {
        dst.put_u64(h);
    }
}

/// Appends the frame of `msg` to `dst` with sequence number 0 (see the module
/// doc on frame order). On error `dst` is left unchanged.
pub fn encode(msg: &Message, dst: &mut BytesMut) -> Result<(), WireError> {
    encode_with_seq(msg, 0, dst)
}

/// Appends the frame of `msg`, numbered `seq`, to `dst`. On error `dst` is
/// left unchanged.
pub fn encode_with_seq(msg: &Message, seq: u32, dst: &mut BytesMut) -> Result<(), WireError> {
    if let Some(data) = encode_parts(msg, seq, dst)? {
        dst.extend_from_slice(&data);
    }
    Ok(())
}

/// Like [`encode_with_seq`], but the bulk data of a `Write` or `ResyncData`
/// frame is not copied: `dst` gets the header and the fixed fields, and the
/// data, which goes on the wire right after them, is returned (a vectored
/// write sends both without a copy). Other frames are appended whole and
/// `None` is returned. On error `dst` is left unchanged.
pub fn encode_parts(
    msg: &Message,
    seq: u32,
    dst: &mut BytesMut,
) -> Result<Option<Bytes>, WireError> {
    validate(msg)?;
    let mut tail: Option<&Bytes> = None;
    let start = dst.len();
    dst.reserve(HEADER_BYTES + 128);
    dst.put_bytes(0, HEADER_BYTES);
    match msg {
        Message::Hello {
            wire_version,
            resource,
            node,
            size_bytes,
            bitmap_block_bytes,
            protocol,
            features,
        } => {
            dst.put_u16(*wire_version);
            dst.put_u64(*size_bytes);
            dst.put_u32(*bitmap_block_bytes);
            dst.put_u8(protocol.code());
            dst.put_u64(*features);
            put_text(dst, resource);
            put_text(dst, node);
        }
        Message::AuthChallenge { nonce } => dst.put_slice(nonce),
        Message::AuthResponse { mac } => dst.put_slice(mac),
        Message::AuthOk
        | Message::ResyncDone
        | Message::VerifyDone
        | Message::Ping
        | Message::PingAck => {}
        Message::Refuse { reason, message } => {
            dst.put_u16(reason.code());
            put_text(dst, message);
        }
        Message::State {
            role,
            disk,
            uuids,
            flags,
            out_of_sync_blocks,
        } => {
            dst.put_u8(role.code());
            dst.put_u8(disk.code());
            dst.put_u32(*flags);
            dst.put_u64(*out_of_sync_blocks);
            put_uuids(dst, uuids);
        }
        Message::BitmapChunk {
            start_block,
            total_blocks,
            last,
            rle,
        } => {
            dst.put_u64(*start_block);
            dst.put_u64(*total_blocks);
            dst.put_u8(u8::from(*last));
            dst.put_slice(rle);
        }
        Message::SyncUuid { uuid } => dst.put_u64(*uuid),
        Message::BitmapAck { next_block } => dst.put_u64(*next_block),
        Message::Write {
            id,
            offset,
            flags,
            len_bytes,
            data,
        } => {
            dst.put_u64(id.0);
            dst.put_u64(*offset);
            dst.put_u32(*flags);
            dst.put_u32(*len_bytes);
            tail = Some(data);
        }
        Message::RecvAck { id } | Message::Barrier { id } => dst.put_u64(id.0),
        Message::WriteAck { id, error }
        | Message::BarrierAck { id, error }
        | Message::ResyncAck { id, error }
        | Message::ResyncReadFailed { id, error } => {
            dst.put_u64(id.0);
            dst.put_u16(*error);
        }
        Message::OutOfSync { offset, len_bytes } => {
            dst.put_u64(*offset);
            dst.put_u32(*len_bytes);
        }
        Message::ResyncRequest {
            id,
            offset,
            len_bytes,
        }
        | Message::ResyncInSync {
            id,
            offset,
            len_bytes,
        }
        | Message::VerifyRequest {
            id,
            offset,
            len_bytes,
        } => {
            dst.put_u64(id.0);
            dst.put_u64(*offset);
            dst.put_u32(*len_bytes);
        }
        Message::ResyncChecksumRequest {
            id,
            offset,
            len_bytes,
            digest,
        }
        | Message::VerifyReply {
            id,
            offset,
            len_bytes,
            digest,
        } => {
            dst.put_u64(id.0);
            dst.put_u64(*offset);
            dst.put_u32(*len_bytes);
            dst.put_slice(digest);
        }
        Message::ResyncData { id, offset, data } => {
            dst.put_u64(id.0);
            dst.put_u64(*offset);
            tail = Some(data);
        }
        Message::Disconnect { reason } => put_text(dst, reason),
    }
    let tail_len = tail.map_or(0, |t| t.len());
    let payload_len = dst.len() - start - HEADER_BYTES + tail_len;
    if payload_len > MAX_PAYLOAD_BYTES {
        dst.truncate(start);
        return Err(WireError::Oversize {
            len_bytes: (HEADER_BYTES + payload_len) as u64,
        });
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&dst[start + HEADER_BYTES..]);
    if let Some(t) = tail {
        crc.update(t);
    }
    let payload_crc = crc.finalize();
    let header = &mut dst[start..start + HEADER_BYTES];
    header[0..4].copy_from_slice(&WIRE_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&WIRE_VERSION.to_be_bytes());
    header[6..8].copy_from_slice(&msg.type_code().to_be_bytes());
    header[8..12].copy_from_slice(&seq.to_be_bytes());
    header[12..16].copy_from_slice(&(payload_len as u32).to_be_bytes());
    header[16..20].copy_from_slice(&payload_crc.to_be_bytes());
    let header_crc = crc32fast::hash(&header[0..20]);
    header[20..24].copy_from_slice(&header_crc.to_be_bytes());
    Ok(tail.cloned())
}

/// Where the bulk data starts in the payload of the frame types that carry
/// it (`Write`, `ResyncData`), after their fixed fields.
fn bulk_data_at(msg_type: u16) -> Option<usize> {
    match msg_type {
        code::WRITE => Some(8 + 8 + 4 + 4),
        code::RESYNC_DATA => Some(8 + 8),
        _ => None,
    }
}

/// The size of a frame and where its bulk data starts, read from its header
/// before the rest has arrived (so a reader can put the data where it wants
/// it, e.g. at an O_DIRECT-aligned address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameShape {
    /// Header plus payload.
    pub frame_bytes: usize,
    /// Offset of the bulk data from the start of the frame, for frames that
    /// carry some.
    pub data_at: Option<usize>,
}

/// The shape of the frame whose header starts `src`; `None` while the
/// header is incomplete, and for any header [`FrameDecoder::decode`] would
/// refuse (bad magic, version or checksum, oversize): decoding reports why.
pub fn peek_frame(src: &[u8]) -> Option<FrameShape> {
    if src.len() < HEADER_BYTES
        || be_u32(src, 0) != WIRE_MAGIC
        || be_u16(src, 4) != WIRE_VERSION
        || be_u32(src, 20) != crc32fast::hash(&src[0..20])
    {
        return None;
    }
    let payload_len = be_u32(src, 12) as usize;
    if payload_len > MAX_PAYLOAD_BYTES {
        return None;
    }
    let data_at = bulk_data_at(be_u16(src, 6))
        .filter(|&at| at <= payload_len)
        .map(|at| HEADER_BYTES + at);
    Some(FrameShape {
        frame_bytes: HEADER_BYTES + payload_len,
        data_at,
    })
}

/// Numbers the frames one side of a connection sends: 0, 1, 2, … (wrapping).
/// One per connection and direction; encode in the order the bytes go out.
#[derive(Debug, Clone, Default)]
pub struct FrameEncoder {
    next_seq: u32,
}

impl FrameEncoder {
    /// An encoder for a new connection (first frame numbered 0).
    pub fn new() -> Self {
        FrameEncoder::default()
    }

    /// Appends the frame of `msg` with the next sequence number. On error
    /// `dst` is left unchanged and the number is not used up.
    pub fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), WireError> {
        encode_with_seq(msg, self.next_seq, dst)?;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(())
    }

    /// Like [`encode`](Self::encode), with the bulk data returned rather
    /// than copied (see [`encode_parts`]); it goes on the wire right after
    /// what was appended to `dst`, before any later frame.
    pub fn encode_parts(
        &mut self,
        msg: &Message,
        dst: &mut BytesMut,
    ) -> Result<Option<Bytes>, WireError> {
        let tail = encode_parts(msg, self.next_seq, dst)?;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(tail)
    }

    /// The number the next frame gets.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }
}

/// Decodes the frames one side of a connection receives and checks that they
/// are numbered 0, 1, 2, … (wrapping): any other number is
/// [`WireError::OutOfOrder`]. One per connection and direction.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    next_seq: u32,
}

impl FrameDecoder {
    /// A decoder for a new connection (first frame must be numbered 0).
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Like [`decode`], and the frame must carry the next sequence number.
    /// On `Ok(None)` and on [`WireError::OutOfOrder`] `src` is left untouched.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, WireError> {
        let m = decode_inner(src, Some(self.next_seq))?;
        if m.is_some() {
            self.next_seq = self.next_seq.wrapping_add(1);
        }
        Ok(m.map(|(_, m)| m))
    }

    /// Decodes one whole frame received in two pieces: `head`, its first
    /// [`FrameShape::data_at`] bytes (header and fixed fields), and `data`,
    /// the rest, which the message then holds without a copy (so a reader can
    /// receive it into a buffer of its choice). Checks everything
    /// [`decode`](Self::decode) checks; the frame must carry the next number.
    pub fn decode_parts(&mut self, head: &[u8], data: Bytes) -> Result<Message, WireError> {
        let m = decode_parts_inner(head, data, Some(self.next_seq))?;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(m)
    }

    /// The number the next frame must carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads the fixed fields of one payload, reporting short payloads precisely.
struct Reader {
    buf: Bytes,
    pos: usize,
    msg: &'static str,
    /// Bulk data received apart from the fixed fields in `buf`
    /// ([`FrameDecoder::decode_parts`]): what `rest` returns after them.
    tail: Option<Bytes>,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.len() - self.pos < n {
            return Err(WireError::BadLength {
                msg: self.msg,
                found: self.buf.len(),
                expected: self.pos + n,
            });
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        self.pos += 1;
        Ok(self.buf[self.pos - 1])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        self.pos += 2;
        Ok(be_u16(&self.buf, self.pos - 2))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        self.pos += 4;
        Ok(be_u32(&self.buf, self.pos - 4))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf[self.pos..self.pos + 8]);
        self.pos += 8;
        Ok(u64::from_be_bytes(b))
    }

    fn array32(&mut self) -> Result<[u8; 32], WireError> {
        self.need(32)?;
        let mut b = [0u8; 32];
        b.copy_from_slice(&self.buf[self.pos..self.pos + 32]);
        self.pos += 32;
        Ok(b)
    }

    fn text(&mut self, field: &'static str) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        self.need(len)?;
        let bytes = &self.buf[self.pos..self.pos + len];
        let text = std::str::from_utf8(bytes)
            .map_err(|e| out_of_range(self.msg, field, format!("not UTF-8: {e}")))?
            .to_string();
        self.pos += len;
        Ok(text)
    }

    fn uuids(&mut self) -> Result<GenerationUuids, WireError> {
        let current = self.u64()?;
        let bitmap = self.u64()?;
        let mut history = [0u64; crate::types::HISTORY_UUIDS];
        for h in &mut history {
            *h = self.u64()?;
        }
        Ok(GenerationUuids {
            current,
            bitmap,
            history,
        })
    }

    /// The rest of the payload, without copying.
    fn rest(&mut self) -> Bytes {
        let rest = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        match self.tail.take() {
            None => rest,
            Some(tail) if rest.is_empty() => tail,
            Some(tail) => {
                let mut joined = BytesMut::with_capacity(rest.len() + tail.len());
                joined.extend_from_slice(&rest);
                joined.extend_from_slice(&tail);
                joined.freeze()
            }
        }
    }

    fn finish(self) -> Result<(), WireError> {
        let tail_bytes = self.tail.as_ref().map_or(0, Bytes::len);
        if self.pos != self.buf.len() || tail_bytes != 0 {
            return Err(WireError::BadLength {
                msg: self.msg,
                found: self.buf.len() + tail_bytes,
                expected: self.pos,
            });
        }
        Ok(())
    }
}

/// Decodes one frame from the front of `src`, whatever its sequence number.
/// Returns `Ok(None)` and leaves `src` untouched while the frame is
/// incomplete; on success removes the frame from `src`. Any error means the
/// stream is unusable (drop the link). Data payloads share `src`'s
/// allocation (no copy).
pub fn decode(src: &mut BytesMut) -> Result<Option<Message>, WireError> {
    Ok(decode_with_seq(src)?.map(|(_, m)| m))
}

/// Like [`decode`], also returning the frame's sequence number.
pub fn decode_with_seq(src: &mut BytesMut) -> Result<Option<(u32, Message)>, WireError> {
    decode_inner(src, None)
}

/// What a checked header says: sequence number, type, type name, payload length.
struct Header {
    seq: u32,
    msg_type: u16,
    msg: &'static str,
    payload_len: usize,
}

/// Checks the whole header at the start of `src` (`src.len() >= HEADER_BYTES`).
fn check_header(src: &[u8], expect_seq: Option<u32>) -> Result<Header, WireError> {
    let magic = be_u32(src, 0);
    if magic != WIRE_MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let version = be_u16(src, 4);
    if version != WIRE_VERSION {
        return Err(WireError::VersionMismatch { found: version });
    }
    let stored = be_u32(src, 20);
    let computed = crc32fast::hash(&src[0..20]);
    if stored != computed {
        return Err(WireError::HeaderChecksum { stored, computed });
    }
    let seq = be_u32(src, 8);
    if let Some(expected) = expect_seq {
        if seq != expected {
            return Err(WireError::OutOfOrder {
                expected,
                found: seq,
            });
        }
    }
    let msg_type = be_u16(src, 6);
    let msg = type_name(msg_type).ok_or(WireError::UnknownType { found: msg_type })?;
    let payload_len = be_u32(src, 12) as usize;
    if payload_len > MAX_PAYLOAD_BYTES {
        return Err(WireError::Oversize {
            len_bytes: (HEADER_BYTES + payload_len) as u64,
        });
    }
    Ok(Header {
        seq,
        msg_type,
        msg,
        payload_len,
    })
}

/// Check then parse; `expect_seq`: the sequence number the frame must carry.
fn decode_inner(
    src: &mut BytesMut,
    expect_seq: Option<u32>,
) -> Result<Option<(u32, Message)>, WireError> {
    if src.len() < HEADER_BYTES {
        return Ok(None);
    }
    let Header {
        seq,
        msg_type,
        msg,
        payload_len,
    } = check_header(src, expect_seq)?;
    if src.len() < HEADER_BYTES + payload_len {
        src.reserve(HEADER_BYTES + payload_len - src.len());
        return Ok(None);
    }
    let computed = crc32fast::hash(&src[HEADER_BYTES..HEADER_BYTES + payload_len]);
    check_payload_crc(src, msg_type, computed)?;
    let mut frame = src.split_to(HEADER_BYTES + payload_len);
    let payload = frame.split_off(HEADER_BYTES).freeze();
    Ok(Some((seq, parse_payload(msg_type, msg, payload, None)?)))
}

/// Compares the payload CRC stored in `header` with `computed`.
fn check_payload_crc(header: &[u8], msg_type: u16, computed: u32) -> Result<(), WireError> {
    let stored = be_u32(header, 16);
    if stored != computed {
        return Err(WireError::PayloadChecksum {
            msg_type,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Parses and validates a checked payload: `fixed`, then `tail` if the
/// bulk data came apart.
fn parse_payload(
    msg_type: u16,
    msg: &'static str,
    fixed: Bytes,
    tail: Option<Bytes>,
) -> Result<Message, WireError> {
    let mut r = Reader {
        buf: fixed,
        pos: 0,
        msg,
        tail,
    };
    let m = parse(msg_type, &mut r)?;
    r.finish()?;
    validate(&m)?;
    Ok(m)
}

/// Check then parse a frame given as `head` (header and fixed fields) and
/// its bulk `data`, which the message holds as given.
fn decode_parts_inner(
    head: &[u8],
    data: Bytes,
    expect_seq: Option<u32>,
) -> Result<Message, WireError> {
    if head.len() < HEADER_BYTES {
        return Err(WireError::BadLength {
            msg: "frame header",
            found: head.len(),
            expected: HEADER_BYTES,
        });
    }
    let Header {
        msg_type,
        msg,
        payload_len,
        ..
    } = check_header(head, expect_seq)?;
    let found = head.len() - HEADER_BYTES + data.len();
    if found != payload_len {
        return Err(WireError::BadLength {
            msg,
            found,
            expected: payload_len,
        });
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[HEADER_BYTES..]);
    crc.update(&data);
    check_payload_crc(head, msg_type, crc.finalize())?;
    let fixed = Bytes::copy_from_slice(&head[HEADER_BYTES..]);
    parse_payload(msg_type, msg, fixed, Some(data))
}

fn parse(msg_type: u16, r: &mut Reader) -> Result<Message, WireError> {
    let msg = r.msg;
    Ok(match msg_type {
        code::HELLO => {
            let wire_version = r.u16()?;
            let size_bytes = r.u64()?;
            let bitmap_block_bytes = r.u32()?;
            let pc = r.u8()?;
            let protocol = ProtocolMode::from_code(pc)
                .ok_or_else(|| out_of_range(msg, "protocol", format!("unknown code {pc}")))?;
            let features = r.u64()?;
            let resource = r.text("resource")?;
            let node = r.text("node")?;
            Message::Hello {
                wire_version,
                resource,
                node,
                size_bytes,
                bitmap_block_bytes,
                protocol,
                features,
            }
        }
        code::AUTH_CHALLENGE => Message::AuthChallenge {
            nonce: r.array32()?,
        },
        code::AUTH_RESPONSE => Message::AuthResponse { mac: r.array32()? },
        code::AUTH_OK => Message::AuthOk,
        code::REFUSE => {
            let c = r.u16()?;
            let reason = RefuseReason::from_code(c)
                .ok_or_else(|| out_of_range(msg, "reason", format!("unknown code {c}")))?;
            Message::Refuse {
                reason,
                message: r.text("message")?,
            }
        }
        code::STATE => {
            let rc = r.u8()?;
            let role = NodeRole::from_code(rc)
                .ok_or_else(|| out_of_range(msg, "role", format!("unknown code {rc}")))?;
            let dc = r.u8()?;
            let disk = DiskState::from_code(dc)
                .ok_or_else(|| out_of_range(msg, "disk", format!("unknown code {dc}")))?;
            let flags = r.u32()?;
            let out_of_sync_blocks = r.u64()?;
            let uuids = r.uuids()?;
            Message::State {
                role,
                disk,
                uuids,
                flags,
                out_of_sync_blocks,
            }
        }
        code::BITMAP_CHUNK => {
            let start_block = r.u64()?;
            let total_blocks = r.u64()?;
            let last = match r.u8()? {
                0 => false,
                1 => true,
                other => {
                    return Err(out_of_range(
                        msg,
                        "last",
                        format!("{other}, must be 0 or 1"),
                    ))
                }
            };
            Message::BitmapChunk {
                start_block,
                total_blocks,
                last,
                rle: r.rest(),
            }
        }
        code::SYNC_UUID => Message::SyncUuid { uuid: r.u64()? },
        code::BITMAP_ACK => Message::BitmapAck {
            next_block: r.u64()?,
        },
        code::WRITE => {
            let id = RequestId(r.u64()?);
            let offset = r.u64()?;
            let flags = r.u32()?;
            let len_bytes = r.u32()?;
            Message::Write {
                id,
                offset,
                flags,
                len_bytes,
                data: r.rest(),
            }
        }
        code::RECV_ACK => Message::RecvAck {
            id: RequestId(r.u64()?),
        },
        code::WRITE_ACK => Message::WriteAck {
            id: RequestId(r.u64()?),
            error: r.u16()?,
        },
        code::BARRIER => Message::Barrier {
            id: RequestId(r.u64()?),
        },
        code::BARRIER_ACK => Message::BarrierAck {
            id: RequestId(r.u64()?),
            error: r.u16()?,
        },
        code::RESYNC_ACK => Message::ResyncAck {
            id: RequestId(r.u64()?),
            error: r.u16()?,
        },
        code::RESYNC_READ_FAILED => Message::ResyncReadFailed {
            id: RequestId(r.u64()?),
            error: r.u16()?,
        },
        code::OUT_OF_SYNC => Message::OutOfSync {
            offset: r.u64()?,
            len_bytes: r.u32()?,
        },
        code::RESYNC_REQUEST => Message::ResyncRequest {
            id: RequestId(r.u64()?),
            offset: r.u64()?,
            len_bytes: r.u32()?,
        },
        code::RESYNC_CHECKSUM_REQUEST => Message::ResyncChecksumRequest {
            id: RequestId(r.u64()?),
            offset: r.u64()?,
            len_bytes: r.u32()?,
            digest: r.array32()?,
        },
        code::RESYNC_DATA => Message::ResyncData {
            id: RequestId(r.u64()?),
            offset: r.u64()?,
            data: r.rest(),
        },
        code::RESYNC_IN_SYNC => Message::ResyncInSync {
            id: RequestId(r.u64()?),
            offset: r.u64()?,
            len_bytes: r.u32()?,
        },
        code::RESYNC_DONE => Message::ResyncDone,
        code::VERIFY_REQUEST => Message::VerifyRequest {
            id: RequestId(r.u64()?),
            offset: r.u64()?,
            len_bytes: r.u32()?,
        },
        code::VERIFY_REPLY => Message::VerifyReply {
            id: RequestId(r.u64()?),
            offset: r.u64()?,
            len_bytes: r.u32()?,
            digest: r.array32()?,
        },
        code::VERIFY_DONE => Message::VerifyDone,
        code::PING => Message::Ping,
        code::PING_ACK => Message::PingAck,
        code::DISCONNECT => Message::Disconnect {
            reason: r.text("reason")?,
        },
        other => return Err(WireError::UnknownType { found: other }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a frame by hand from the documented layout (independent of
    /// `encode`), so golden tests check the encoder against the spec.
    fn frame(msg_type: u16, payload: &[u8]) -> Vec<u8> {
        frame_seq(msg_type, 0, payload)
    }

    fn frame_seq(msg_type: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&0x5250_4C57u32.to_be_bytes());
        f.extend_from_slice(&3u16.to_be_bytes());
        f.extend_from_slice(&msg_type.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
        let hcrc = crc32fast::hash(&f);
        f.extend_from_slice(&hcrc.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
            .collect()
    }

    fn enc(m: &Message) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode(m, &mut b).expect("encode");
        b.to_vec()
    }

    fn dec_all(bytes: &[u8]) -> Result<Option<Message>, WireError> {
        let mut b = BytesMut::from(bytes);
        decode(&mut b)
    }

    /// Every variant once, with the hand-written payload of WIRE_VERSION 3.
    fn golden() -> Vec<(Message, u16, Vec<u8>)> {
        let uuids = GenerationUuids {
            current: 0x1111,
            bitmap: 0x2222,
            history: [3, 4, 5, 6],
        };
        vec![
            (
                Message::Hello {
                    wire_version: 3,
                    resource: "vm1".into(),
                    node: "alpha".into(),
                    size_bytes: 1 << 30,
                    bitmap_block_bytes: 4096,
                    protocol: ProtocolMode::B,
                    features: 0,
                },
                1,
                hex("0003 0000000040000000 00001000 02 0000000000000000 0003 766d31 0005 616c706861"),
            ),
            (
                Message::AuthChallenge { nonce: [0xab; 32] },
                2,
                vec![0xab; 32],
            ),
            (Message::AuthResponse { mac: [0xcd; 32] }, 3, vec![0xcd; 32]),
            (Message::AuthOk, 4, vec![]),
            (
                Message::Refuse {
                    reason: RefuseReason::SplitBrain,
                    message: "sb".into(),
                },
                5,
                hex("0006 0002 7362"),
            ),
            (
                Message::State {
                    role: NodeRole::Primary,
                    disk: DiskState::UpToDate,
                    uuids,
                    flags: STATE_FLAG_CRASHED_PRIMARY,
                    out_of_sync_blocks: 7,
                },
                6,
                hex(
                    "01 04 00000001 0000000000000007 0000000000001111 0000000000002222
                     0000000000000003 0000000000000004 0000000000000005 0000000000000006",
                ),
            ),
            (
                Message::BitmapChunk {
                    start_block: 5,
                    total_blocks: 100,
                    last: true,
                    rle: Bytes::from_static(&[0x02, 0x03]),
                },
                7,
                hex("0000000000000005 0000000000000064 01 0203"),
            ),
            (
                Message::SyncUuid { uuid: 0xdead },
                8,
                hex("000000000000dead"),
            ),
            (
                Message::Write {
                    id: RequestId(9),
                    offset: 4096,
                    flags: WRITE_FLAG_FUA,
                    len_bytes: 4,
                    data: Bytes::from_static(b"abcd"),
                },
                9,
                hex("0000000000000009 0000000000001000 00000001 00000004 61626364"),
            ),
            (
                Message::RecvAck { id: RequestId(10) },
                10,
                hex("000000000000000a"),
            ),
            (
                Message::WriteAck {
                    id: RequestId(11),
                    error: 5,
                },
                11,
                hex("000000000000000b 0005"),
            ),
            (
                Message::Barrier { id: RequestId(12) },
                12,
                hex("000000000000000c"),
            ),
            (
                Message::BarrierAck {
                    id: RequestId(13),
                    error: 0,
                },
                13,
                hex("000000000000000d 0000"),
            ),
            (
                Message::OutOfSync {
                    offset: 8192,
                    len_bytes: 512,
                },
                14,
                hex("0000000000002000 00000200"),
            ),
            (
                Message::ResyncRequest {
                    id: RequestId(15),
                    offset: 0,
                    len_bytes: 4096,
                },
                15,
                hex("000000000000000f 0000000000000000 00001000"),
            ),
            (
                Message::ResyncChecksumRequest {
                    id: RequestId(16),
                    offset: 0,
                    len_bytes: 4096,
                    digest: [0x11; 32],
                },
                16,
                [
                    hex("0000000000000010 0000000000000000 00001000"),
                    vec![0x11; 32],
                ]
                .concat(),
            ),
            (
                Message::ResyncData {
                    id: RequestId(17),
                    offset: 512,
                    data: Bytes::from_static(b"xy"),
                },
                17,
                hex("0000000000000011 0000000000000200 7879"),
            ),
            (
                Message::ResyncInSync {
                    id: RequestId(18),
                    offset: 0,
                    len_bytes: 1,
                },
                18,
                hex("0000000000000012 0000000000000000 00000001"),
            ),
            (Message::ResyncDone, 19, vec![]),
            (
                Message::VerifyRequest {
                    id: RequestId(20),
                    offset: 0,
                    len_bytes: 2,
                },
                20,
                hex("0000000000000014 0000000000000000 00000002"),
            ),
            (
                Message::VerifyReply {
                    id: RequestId(21),
                    offset: 0,
                    len_bytes: 2,
                    digest: [0x22; 32],
                },
                21,
                [
                    hex("0000000000000015 0000000000000000 00000002"),
                    vec![0x22; 32],
                ]
                .concat(),
            ),
            (Message::VerifyDone, 22, vec![]),
            (Message::Ping, 23, vec![]),
            (Message::PingAck, 24, vec![]),
            (
                Message::Disconnect {
                    reason: "bye".into(),
                },
                25,
                hex("0003 627965"),
            ),
            (
                Message::BitmapAck { next_block: 0x20 },
                26,
                hex("0000000000000020"),
            ),
            (
                Message::ResyncAck {
                    id: RequestId(27),
                    error: 28,
                },
                27,
                hex("000000000000001b 001c"),
            ),
            (
                Message::ResyncReadFailed {
                    id: RequestId(28),
                    error: 5,
                },
                28,
                hex("000000000000001c 0005"),
            ),
        ]
    }

    #[test]
    fn golden_bytes_pin_every_message_of_wire_version_3() {
        // Proves each message encodes to exactly the documented bytes of
        // WIRE_VERSION 3 and decodes back; a format change without a version
        // bump fails here.
        assert_eq!(WIRE_VERSION, 3, "update the golden bytes with the version");
        let cases = golden();
        assert_eq!(cases.len(), 28, "one golden case per variant");
        for (msg, msg_type, payload) in cases {
            let expected = frame(msg_type, &payload);
            assert_eq!(enc(&msg), expected, "{}", msg.name());
            assert_eq!(dec_all(&expected), Ok(Some(msg.clone())), "{}", msg.name());
        }
    }

    #[test]
    fn header_of_a_ping_is_pinned_byte_for_byte() {
        // Pins the header layout itself, including both CRCs, against literal bytes
        // (header CRC computed independently: Python zlib.crc32 of bytes 0..20).
        assert_eq!(
            enc(&Message::Ping),
            hex("52504c57 0003 0017 00000000 00000000 00000000 5a977243")
        );
        let mut b = BytesMut::new();
        encode_with_seq(&Message::Ping, 7, &mut b).expect("ping encodes");
        assert_eq!(
            &b[..],
            &hex("52504c57 0003 0017 00000007 00000000 00000000 3ef61f8a")[..]
        );
    }

    #[test]
    fn frame_encoder_numbers_frames_and_decoder_accepts_them_in_order() {
        // Proves a FrameEncoder numbers frames 0, 1, 2, … and a FrameDecoder
        // on the other side accepts exactly that stream.
        let mut tx = FrameEncoder::new();
        let mut b = BytesMut::new();
        let msgs = [golden()[8].0.clone(), Message::Ping, golden()[11].0.clone()];
        for m in &msgs {
            tx.encode(m, &mut b).expect("encodes");
        }
        assert_eq!(tx.next_seq(), 3);
        let mut peek = b.clone();
        let seqs: Vec<u32> = (0..3)
            .map(|_| decode_with_seq(&mut peek).expect("ok").expect("frame").0)
            .collect();
        assert_eq!(seqs, [0, 1, 2]);
        let mut rx = FrameDecoder::new();
        for m in &msgs {
            assert_eq!(rx.decode(&mut b).as_ref(), Ok(&Some(m.clone())));
        }
        assert!(b.is_empty());
        assert_eq!(rx.decode(&mut b), Ok(None));
    }

    #[test]
    fn swapped_lost_or_duplicated_frames_are_out_of_order_errors() {
        // Proves the FrameDecoder refuses a reordered, a missing and a
        // repeated frame number with OutOfOrder naming both numbers, leaving
        // the buffer untouched, while plain decode ignores the number.
        let f = |seq| frame_seq(23, seq, &[]);
        // Swapped: frame 1 arrives before frame 0.
        let mut b = BytesMut::from(&[f(1), f(0)].concat()[..]);
        let mut rx = FrameDecoder::new();
        assert_eq!(
            rx.decode(&mut b),
            Err(WireError::OutOfOrder {
                expected: 0,
                found: 1
            })
        );
        assert_eq!(b.len(), 2 * HEADER_BYTES, "nothing consumed on OutOfOrder");
        // Duplicated: 0, 0.
        let mut b = BytesMut::from(&[f(0), f(0)].concat()[..]);
        let mut rx = FrameDecoder::new();
        assert_eq!(rx.decode(&mut b), Ok(Some(Message::Ping)));
        assert_eq!(
            rx.decode(&mut b),
            Err(WireError::OutOfOrder {
                expected: 1,
                found: 0
            })
        );
        // Lost: 0, 2.
        let mut b = BytesMut::from(&[f(0), f(2)].concat()[..]);
        let mut rx = FrameDecoder::new();
        assert_eq!(rx.decode(&mut b), Ok(Some(Message::Ping)));
        assert!(matches!(
            rx.decode(&mut b),
            Err(WireError::OutOfOrder {
                expected: 1,
                found: 2
            })
        ));
        // Plain decode does not check numbers.
        let mut b = BytesMut::from(&[f(5), f(3)].concat()[..]);
        assert_eq!(decode(&mut b), Ok(Some(Message::Ping)));
        assert_eq!(decode_with_seq(&mut b), Ok(Some((3, Message::Ping))));
    }

    #[test]
    fn frame_numbers_wrap_around() {
        // Proves the sequence wraps from u32::MAX to 0 on both sides.
        let mut tx = FrameEncoder { next_seq: u32::MAX };
        let mut rx = FrameDecoder { next_seq: u32::MAX };
        let mut b = BytesMut::new();
        tx.encode(&Message::Ping, &mut b).expect("encodes");
        tx.encode(&Message::PingAck, &mut b).expect("encodes");
        assert_eq!(rx.decode(&mut b), Ok(Some(Message::Ping)));
        assert_eq!(rx.decode(&mut b), Ok(Some(Message::PingAck)));
        assert_eq!(rx.next_seq(), 1);
    }

    #[test]
    fn partial_frames_return_none_and_consume_nothing() {
        // Proves check-then-parse: every strict prefix of a frame is Ok(None)
        // and leaves the buffer intact; the full frame then decodes.
        let bytes = enc(&golden()[8].0);
        for cut in 0..bytes.len() {
            let mut b = BytesMut::from(&bytes[..cut]);
            assert_eq!(decode(&mut b), Ok(None), "cut at {cut}");
            assert_eq!(b.len(), cut);
        }
        let mut b = BytesMut::from(&bytes[..]);
        b.extend_from_slice(&enc(&Message::Ping));
        assert!(matches!(decode(&mut b), Ok(Some(Message::Write { .. }))));
        assert_eq!(decode(&mut b), Ok(Some(Message::Ping)));
        assert!(b.is_empty());
    }

    #[test]
    fn decoded_write_data_shares_the_receive_buffer() {
        // Proves data payloads are sliced from the input, not copied.
        let msg = Message::Write {
            id: RequestId(1),
            offset: 0,
            flags: 0,
            len_bytes: 4096,
            data: Bytes::from(vec![7u8; 4096]),
        };
        let mut b = BytesMut::from(&enc(&msg)[..]);
        let base = b.as_ptr() as usize;
        let Ok(Some(Message::Write { data, .. })) = decode(&mut b) else {
            panic!("write did not decode");
        };
        assert_eq!(data.as_ptr() as usize, base + HEADER_BYTES + 24);
    }

    #[test]
    fn bad_magic_version_type_and_checksums_give_precise_errors() {
        // Proves each header defect maps to its own WireError variant.
        let good = enc(&Message::Ping);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(dec_all(&bad), Err(WireError::BadMagic { .. })));

        // The previous version (no ResyncAck) is refused, not half-understood.
        let v2 = {
            let mut f = frame(23, &[]);
            f[5] = 2;
            let c = crc32fast::hash(&f[..20]);
            f[20..24].copy_from_slice(&c.to_be_bytes());
            f
        };
        assert_eq!(dec_all(&v2), Err(WireError::VersionMismatch { found: 2 }));

        assert_eq!(
            dec_all(&frame(99, &[])),
            Err(WireError::UnknownType { found: 99 })
        );

        let mut hdr = good.clone();
        hdr[13] ^= 1;
        assert!(matches!(
            dec_all(&hdr),
            Err(WireError::HeaderChecksum { .. })
        ));

        let mut pay = enc(&golden()[8].0);
        let last = pay.len() - 1;
        pay[last] ^= 0x80;
        assert!(matches!(
            dec_all(&pay),
            Err(WireError::PayloadChecksum { msg_type: 9, .. })
        ));
    }

    #[test]
    fn oversize_frames_are_refused_on_decode_and_encode() {
        // Proves MAX_FRAME_BYTES is enforced before waiting for the payload and
        // that the encoder refuses a write above MAX_WRITE_PAYLOAD_BYTES.
        let mut f = frame(9, &[]);
        f[12..16].copy_from_slice(&((MAX_PAYLOAD_BYTES + 1) as u32).to_be_bytes());
        let c = crc32fast::hash(&f[..20]);
        f[20..24].copy_from_slice(&c.to_be_bytes());
        assert!(matches!(dec_all(&f), Err(WireError::Oversize { .. })));

        let big = Message::Write {
            id: RequestId(1),
            offset: 0,
            flags: 0,
            len_bytes: (MAX_WRITE_PAYLOAD_BYTES + 1) as u32,
            data: Bytes::from(vec![0; MAX_WRITE_PAYLOAD_BYTES + 1]),
        };
        let mut dst = BytesMut::from(&b"keep"[..]);
        assert!(matches!(
            encode(&big, &mut dst),
            Err(WireError::FieldOutOfRange {
                field: "len_bytes",
                ..
            })
        ));
        assert_eq!(&dst[..], b"keep", "failed encode leaves dst unchanged");

        let max = Message::ResyncData {
            id: RequestId(2),
            offset: 0,
            data: Bytes::from(vec![1; MAX_WRITE_PAYLOAD_BYTES]),
        };
        let bytes = enc(&max);
        assert!(bytes.len() <= MAX_FRAME_BYTES);
        assert_eq!(dec_all(&bytes), Ok(Some(max)));
    }

    #[test]
    fn out_of_range_fields_are_refused_with_the_field_named() {
        // Proves field validation on decode: unknown codes, inconsistent
        // lengths, overlong names, trailing bytes and bad UTF-8 are errors.
        let field = |r: Result<Option<Message>, WireError>| match r {
            Err(WireError::FieldOutOfRange { field, .. }) => field,
            other => panic!("expected FieldOutOfRange, got {other:?}"),
        };
        assert_eq!(field(dec_all(&frame(5, &hex("0063 0000")))), "reason");
        let mut state = hex("09 04 00000000 0000000000000000");
        state.extend_from_slice(&[0; 48]);
        assert_eq!(field(dec_all(&frame(6, &state))), "role");
        // Write claims 8 bytes but carries 4.
        let w = hex("0000000000000001 0000000000000000 00000000 00000008 61626364");
        assert_eq!(field(dec_all(&frame(9, &w))), "len_bytes");
        // ZEROES with data.
        let z = hex("0000000000000001 0000000000000000 00000002 00000004 61626364");
        assert_eq!(field(dec_all(&frame(9, &z))), "data");
        // Unknown write flag.
        let u = hex("0000000000000001 0000000000000000 00000080 00000001 61");
        assert_eq!(field(dec_all(&frame(9, &u))), "flags");
        // Range that overflows u64.
        let o = hex("ffffffffffffffff 00000010");
        assert_eq!(field(dec_all(&frame(14, &o))), "offset");
        // Unknown protocol code in Hello.
        let p = hex("0002 0000000000001000 00001000 04 0000000000000000 0001 61 0001 62");
        assert_eq!(field(dec_all(&frame(1, &p))), "protocol");
        // Name longer than MAX_NAME_BYTES.
        let mut h = hex("0001 0000000000001000 00001000 03 0000000000000000 0041");
        h.extend_from_slice(&[b'a'; 65]);
        h.extend_from_slice(&hex("0001 61"));
        assert_eq!(field(dec_all(&frame(1, &h))), "resource");
        // Invalid UTF-8.
        assert_eq!(field(dec_all(&frame(25, &hex("0002 fffe")))), "reason");
        // Trailing bytes after a fixed-size message.
        assert!(matches!(
            dec_all(&frame(10, &hex("0000000000000001 00"))),
            Err(WireError::BadLength {
                msg: "RecvAck",
                found: 9,
                expected: 8
            })
        ));
        // Short payload.
        assert!(matches!(
            dec_all(&frame(10, &hex("00000001"))),
            Err(WireError::BadLength { msg: "RecvAck", .. })
        ));
    }

    fn arb_text(max: usize, allow_empty: bool) -> impl Strategy<Value = String> {
        let min = usize::from(!allow_empty);
        proptest::collection::vec(proptest::char::range('a', 'z'), min..=max.min(16))
            .prop_map(|v| v.into_iter().collect())
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
    }

    fn arb_uuids() -> impl Strategy<Value = GenerationUuids> {
        (any::<u64>(), any::<u64>(), any::<[u64; 4]>()).prop_map(|(current, bitmap, history)| {
            GenerationUuids {
                current,
                bitmap,
                history,
            }
        })
    }

    fn arb_range() -> impl Strategy<Value = (u64, u32)> {
        (0u64..1 << 50, 1u32..=MAX_WRITE_PAYLOAD_BYTES as u32)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let reason = prop_oneof![
            Just(RefuseReason::WrongSecret),
            Just(RefuseReason::WrongResource),
            Just(RefuseReason::SizeMismatch),
            Just(RefuseReason::BitmapBlockMismatch),
            Just(RefuseReason::VersionMismatch),
            Just(RefuseReason::SplitBrain),
            Just(RefuseReason::UnrelatedData),
            Just(RefuseReason::Other),
            Just(RefuseReason::ProtocolMismatch),
        ];
        let role = prop_oneof![Just(NodeRole::Primary), Just(NodeRole::Secondary)];
        let disk = (0u8..5).prop_map(|c| DiskState::from_code(c).expect("0..5 valid"));
        let id = any::<u64>().prop_map(RequestId);
        prop_oneof![
            (
                any::<u16>(),
                arb_text(MAX_NAME_BYTES, false),
                arb_text(MAX_NAME_BYTES, false),
                any::<u64>(),
                any::<u32>(),
                (1u8..=3).prop_map(|c| ProtocolMode::from_code(c).expect("1..=3 valid")),
                any::<u64>()
            )
                .prop_map(
                    |(
                        wire_version,
                        resource,
                        node,
                        size_bytes,
                        bitmap_block_bytes,
                        protocol,
                        features,
                    )| {
                        Message::Hello {
                            wire_version,
                            resource,
                            node,
                            size_bytes,
                            bitmap_block_bytes,
                            protocol,
                            features,
                        }
                    }
                ),
            any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge { nonce }),
            any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }),
            Just(Message::AuthOk),
            (reason, arb_text(MAX_REASON_BYTES, true))
                .prop_map(|(reason, message)| Message::Refuse { reason, message }),
            (role, disk, arb_uuids(), 0..=STATE_FLAGS_KNOWN, any::<u64>()).prop_map(
                |(role, disk, uuids, flags, out_of_sync_blocks)| Message::State {
                    role,
                    disk,
                    uuids,
                    flags,
                    out_of_sync_blocks
                }
            ),
            (0u64..1000, 0u64..1000, any::<bool>(), arb_bytes(64)).prop_map(|(a, b, last, rle)| {
                Message::BitmapChunk {
                    start_block: a.min(b),
                    total_blocks: a.max(b),
                    last,
                    rle,
                }
            }),
            any::<u64>().prop_map(|uuid| Message::SyncUuid { uuid }),
            any::<u64>().prop_map(|next_block| Message::BitmapAck { next_block }),
            (
                id.clone(),
                0u64..1 << 50,
                any::<bool>(),
                arb_bytes(300).prop_filter("non-empty", |d| !d.is_empty())
            )
                .prop_map(|(id, offset, fua, data)| Message::Write {
                    id,
                    offset,
                    flags: if fua { WRITE_FLAG_FUA } else { 0 },
                    len_bytes: data.len() as u32,
                    data
                }),
            (id.clone(), 0u64..1 << 50, any::<bool>(), 1u32..).prop_map(
                |(id, offset, trim, len_bytes)| Message::Write {
                    id,
                    offset,
                    flags: if trim {
                        WRITE_FLAG_TRIM
                    } else {
                        WRITE_FLAG_ZEROES | WRITE_FLAG_FUA
                    },
                    len_bytes,
                    data: Bytes::new()
                }
            ),
            id.clone().prop_map(|id| Message::RecvAck { id }),
            (id.clone(), any::<u16>()).prop_map(|(id, error)| Message::WriteAck { id, error }),
            id.clone().prop_map(|id| Message::Barrier { id }),
            (id.clone(), any::<u16>()).prop_map(|(id, error)| Message::BarrierAck { id, error }),
            (id.clone(), any::<u16>()).prop_map(|(id, error)| Message::ResyncAck { id, error }),
            (id.clone(), any::<u16>())
                .prop_map(|(id, error)| Message::ResyncReadFailed { id, error }),
            (0u64..1 << 50, 1u32..)
                .prop_map(|(offset, len_bytes)| Message::OutOfSync { offset, len_bytes }),
            (id.clone(), arb_range()).prop_map(|(id, (offset, len_bytes))| {
                Message::ResyncRequest {
                    id,
                    offset,
                    len_bytes,
                }
            }),
            (id.clone(), arb_range(), any::<[u8; 32]>()).prop_map(
                |(id, (offset, len_bytes), digest)| {
                    Message::ResyncChecksumRequest {
                        id,
                        offset,
                        len_bytes,
                        digest,
                    }
                }
            ),
            (
                id.clone(),
                0u64..1 << 50,
                arb_bytes(300).prop_filter("non-empty", |d| !d.is_empty())
            )
                .prop_map(|(id, offset, data)| Message::ResyncData {
                    id,
                    offset,
                    data
                }),
            (id.clone(), 0u64..1 << 50, 1u32..).prop_map(|(id, offset, len_bytes)| {
                Message::ResyncInSync {
                    id,
                    offset,
                    len_bytes,
                }
            }),
            Just(Message::ResyncDone),
            (id.clone(), arb_range()).prop_map(|(id, (offset, len_bytes))| {
                Message::VerifyRequest {
                    id,
                    offset,
                    len_bytes,
                }
            }),
            (id, arb_range(), any::<[u8; 32]>()).prop_map(|(id, (offset, len_bytes), digest)| {
                Message::VerifyReply {
                    id,
                    offset,
                    len_bytes,
                    digest,
                }
            }),
            Just(Message::VerifyDone),
            Just(Message::Ping),
            Just(Message::PingAck),
            arb_text(MAX_REASON_BYTES, true).prop_map(|reason| Message::Disconnect { reason }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in arb_message()) {
            // Proves decode(encode(m)) == m for every variant and that the
            // frame is consumed exactly.
            let mut b = BytesMut::new();
            encode(&msg, &mut b).expect("valid message encodes");
            prop_assert!(b.len() <= MAX_FRAME_BYTES);
            prop_assert_eq!(decode(&mut b), Ok(Some(msg)));
            prop_assert!(b.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Proves the decoder returns Ok or Err on any input, never panics,
            // and never consumes bytes when it returns Ok(None) or Err.
            let mut b = BytesMut::from(&bytes[..]);
            let before = b.len();
            match decode(&mut b) {
                Ok(Some(_)) => prop_assert!(b.len() < before),
                Ok(None) | Err(_) => prop_assert_eq!(b.len(), before),
            }
        }

        #[test]
        fn arbitrary_payload_behind_a_valid_header_never_panics(
            msg_type in 0u16..30,
            payload in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            // Proves the field parsers survive any payload that passes the
            // CRCs (a buggy or hostile peer), returning an error or a valid message.
            let f = frame(msg_type, &payload);
            if let Ok(Some(m)) = dec_all(&f) {
                prop_assert_eq!(validate(&m), Ok(()));
            }
        }

        #[test]
        fn parts_are_the_frame_and_peek_finds_its_data(msg in arb_message(), seq in any::<u32>()) {
            // Proves the vectored encoding sends exactly the bytes of the
            // whole-frame encoding, and that peeking at a header finds the
            // frame's length and the offset of its bulk data.
            let mut whole = BytesMut::new();
            encode_with_seq(&msg, seq, &mut whole).unwrap();
            let mut head = BytesMut::new();
            let tail = encode_parts(&msg, seq, &mut head).unwrap();
            let mut joined = head.clone();
            if let Some(t) = &tail {
                joined.extend_from_slice(t);
            }
            prop_assert_eq!(&joined[..], &whole[..]);
            prop_assert_eq!(peek_frame(&whole[..HEADER_BYTES - 1]), None);
            let shape = peek_frame(&whole).expect("a valid header");
            prop_assert_eq!(shape.frame_bytes, whole.len());
            match (&msg, shape.data_at) {
                (Message::Write { data, .. } | Message::ResyncData { data, .. }, Some(at)) => {
                    prop_assert_eq!(&whole[at..], &data[..]);
                    prop_assert_eq!(tail.as_ref(), Some(data));
                }
                (Message::Write { .. } | Message::ResyncData { .. }, None) => {
                    prop_assert!(false, "no data offset for a data frame");
                }
                (_, at) => {
                    prop_assert_eq!(at, None);
                    prop_assert_eq!(tail, None);
                }
            }
            let mut bad = whole.clone();
            bad[21] ^= 1;
            prop_assert_eq!(peek_frame(&bad), None);
        }

        #[test]
        fn a_frame_decoded_in_two_parts_is_the_message(
            msg in arb_message(),
            bit in any::<prop::sample::Index>(),
        ) {
            // Proves decode_parts (head and data received apart) gives the
            // message decode gives, checks the frame number, and catches any
            // flipped bit in either part.
            let mut whole = BytesMut::new();
            encode_with_seq(&msg, 0, &mut whole).unwrap();
            let at = peek_frame(&whole).unwrap().data_at.unwrap_or(whole.len());
            let data = Bytes::copy_from_slice(&whole[at..]);
            let got = FrameDecoder::new().decode_parts(&whole[..at], data.clone());
            prop_assert_eq!(got, Ok(msg.clone()));
            let mut second = FrameDecoder::new();
            second.decode_parts(&whole[..at], data.clone()).unwrap();
            let out_of_order = matches!(
                second.decode_parts(&whole[..at], data),
                Err(WireError::OutOfOrder { .. })
            );
            prop_assert!(out_of_order, "a repeated frame number was accepted");
            let i = bit.index(whole.len() * 8);
            let mut bad = whole.clone();
            bad[i / 8] ^= 1 << (i % 8);
            let r = FrameDecoder::new().decode_parts(&bad[..at], Bytes::copy_from_slice(&bad[at..]));
            prop_assert!(r.is_err(), "corrupt frame decoded as {:?}", r);
        }

        #[test]
        fn a_flipped_bit_anywhere_is_detected(msg in arb_message(), bit in any::<prop::sample::Index>()) {
            // Proves the CRCs catch any single-bit corruption of a frame: the
            // result is an error or "incomplete", never a different message.
            let mut bytes = enc(&msg);
            let i = bit.index(bytes.len() * 8);
            bytes[i / 8] ^= 1 << (i % 8);
            match dec_all(&bytes) {
                Err(_) | Ok(None) => {}
                Ok(Some(other)) => prop_assert!(false, "corrupt frame decoded as {:?}", other),
            }
        }
    }
}
