//! NBD wire constants: magics, flags, option/reply/command numbers, errno
//! values and the size limits this server enforces.
//!
//! Owns only numbers; it must not parse, encode or do I/O. Values follow
//! NetworkBlockDevice/nbd doc/proto.md (fixed newstyle, no extended headers).

/// Version of the wire formats pinned by the golden-bytes tests. Bump it when
/// any encoded byte changes.
pub const WIRE_FORMAT_VERSION: u32 = 1;

// Magics.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bit).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// What this server advertises in its greeting.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// Client flags (32 bit).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit closes the session.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (16 bit).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation state bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// The only metadata context this server offers.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The id this server gives `base:allocation` when it is selected.
pub const CONTEXT_ID_BASE_ALLOCATION: u32 = 1;

// NBD errno values (only the server's edge uses these).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// Sizes of fixed headers.
pub const GREETING_BYTES: usize = 18;
pub const CLIENT_FLAGS_BYTES: usize = 4;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
pub const EXPORT_NAME_REPLY_PADDING_BYTES: usize = 124;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;

// Limits.
/// A string on the wire (export name, description, context name, message).
pub const MAX_STRING_BYTES: usize = 4096;
/// The data of one option; a longer option is treated as a DoS and closes
/// the session (the largest legitimate one, a meta-context query list, is far below).
pub const MAX_OPTION_BYTES: usize = 64 * 1024;
/// Smallest I/O granularity advertised in INFO_BLOCK_SIZE (no alignment needed).
pub const MIN_BLOCK_BYTES: u32 = 1;
/// Preferred I/O granularity advertised in INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Largest READ or WRITE payload served; advertised in INFO_BLOCK_SIZE.
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;
/// A WRITE longer than [`MAX_PAYLOAD_BYTES`] but at most this long has its
/// payload read and discarded and is answered EINVAL; a longer one closes
/// the connection (treated as a DoS).
pub const MAX_DRAINED_PAYLOAD_BYTES: u64 = 64 * 1024 * 1024;
/// A READ with DF up to this length is always answered in one chunk.
pub const DF_UNFRAGMENTED_BYTES: u32 = 64 * 1024;
/// Most extents sent in one BLOCK_STATUS chunk.
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 4096;

const _: () = assert!(MAX_DRAINED_PAYLOAD_BYTES >= MAX_PAYLOAD_BYTES as u64);
const _: () = assert!(MAX_OPTION_BYTES >= 4 + MAX_STRING_BYTES + 2);

// Header sizes are the sum of their fields (see the layouts in the spec).
const _: () = assert!(GREETING_BYTES == 8 + 8 + 2);
const _: () = assert!(OPTION_HEADER_BYTES == 8 + 4 + 4);
const _: () = assert!(OPTION_REPLY_HEADER_BYTES == 8 + 4 + 4 + 4);
const _: () = assert!(REQUEST_HEADER_BYTES == 4 + 2 + 2 + 8 + 8 + 4);
const _: () = assert!(SIMPLE_REPLY_HEADER_BYTES == 4 + 4 + 8);
const _: () = assert!(STRUCTURED_REPLY_HEADER_BYTES == 4 + 2 + 2 + 8 + 4);
const _: () = assert!(10 + EXPORT_NAME_REPLY_PADDING_BYTES == 134);
