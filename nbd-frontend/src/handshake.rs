//! Pure codec for the fixed-newstyle handshake: greeting, client flags,
//! options, option replies, the EXPORT_NAME reply and the data of the
//! INFO/GO and *_META_CONTEXT options and of REP_INFO/REP_SERVER/REP_META_CONTEXT.
//!
//! Both directions are here (the server's and a client's) so that tests and
//! fuzzers can round-trip every message. Decoders are "check then parse":
//! partial input is `Ok(None)` and consumes nothing. This module does no I/O
//! and makes no decisions; the negotiation state machine lives in
//! [`crate::negotiate`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::proto::*;

/// Why handshake bytes could not be decoded; each variant ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("greeting has magic {found:#018x}, expected NBDMAGIC and IHAVEOPT")]
    BadGreetingMagic { found: u64 },
    #[error("option header has magic {found:#018x}, expected IHAVEOPT")]
    BadOptionMagic { found: u64 },
    #[error(
        "option {option} carries {len_bytes} bytes, more than the limit of {MAX_OPTION_BYTES}"
    )]
    OptionTooLong { option: u32, len_bytes: u32 },
    #[error("client sent unknown or unadvertised flags {flags:#010x}")]
    UnknownClientFlags { flags: u32 },
    #[error("option reply has magic {found:#018x}, expected {OPTION_REPLY_MAGIC:#018x}")]
    BadOptionReplyMagic { found: u64 },
    #[error("option reply to {option} carries {len_bytes} bytes, more than the limit of {MAX_OPTION_BYTES}")]
    OptionReplyTooLong { option: u32, len_bytes: u32 },
}

/// Why the data of a known option is malformed; answered with `ERR_INVALID`
/// carrying this text, negotiation continues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    #[error("option data ends inside {what}")]
    Truncated { what: &'static str },
    #[error("{what} is {len_bytes} bytes, more than the limit of {MAX_STRING_BYTES}")]
    StringTooLong { what: &'static str, len_bytes: u32 },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{extra_bytes} unexpected bytes after {what}")]
    TrailingBytes {
        what: &'static str,
        extra_bytes: usize,
    },
    #[error("{what} is too short: {len_bytes} bytes")]
    TooShort {
        what: &'static str,
        len_bytes: usize,
    },
}

/// The server's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

impl Greeting {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(self.handshake_flags);
    }

    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, HandshakeError> {
        if buf.len() < GREETING_BYTES {
            return Ok(None);
        }
        let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        let opt = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
        if magic != NBDMAGIC {
            return Err(HandshakeError::BadGreetingMagic { found: magic });
        }
        if opt != IHAVEOPT {
            return Err(HandshakeError::BadGreetingMagic { found: opt });
        }
        buf.advance(16);
        Ok(Some(Self {
            handshake_flags: buf.get_u16(),
        }))
    }
}

/// The client's 32-bit flags, sent once after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.0);
    }

    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, HandshakeError> {
        if buf.len() < CLIENT_FLAGS_BYTES {
            return Ok(None);
        }
        Ok(Some(Self(buf.get_u32())))
    }

    /// Checks the flags against what this server advertised.
    pub fn validate(&self) -> Result<(), HandshakeError> {
        if self.0 & !KNOWN_CLIENT_FLAGS != 0 {
            return Err(HandshakeError::UnknownClientFlags { flags: self.0 });
        }
        Ok(())
    }
}

/// One option from the client: `IHAVEOPT option(4) length(4) data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOption {
    pub option: u32,
    pub data: Bytes,
}

impl ClientOption {
    pub fn encode(&self, out: &mut BytesMut) {
        assert!(
            self.data.len() <= MAX_OPTION_BYTES,
            "option data over limit"
        );
        out.reserve(OPTION_HEADER_BYTES + self.data.len());
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.data.len() as u32);
        out.put_slice(&self.data);
    }

    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, HandshakeError> {
        if buf.len() < OPTION_HEADER_BYTES {
            return Ok(None);
        }
        let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic { found: magic });
        }
        let option = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
        let len_bytes = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
        if len_bytes as usize > MAX_OPTION_BYTES {
            return Err(HandshakeError::OptionTooLong { option, len_bytes });
        }
        let total = OPTION_HEADER_BYTES + len_bytes as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(OPTION_HEADER_BYTES);
        let data = buf.split_to(len_bytes as usize).freeze();
        Ok(Some(Self { option, data }))
    }
}

/// A reply to an option: `magic option(4) reply-type(4) length(4) data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Bytes,
}

impl OptionReply {
    pub fn ack(option: u32) -> Self {
        Self {
            option,
            reply_type: REP_ACK,
            data: Bytes::new(),
        }
    }

    /// An error reply carrying a human-readable message (cut to
    /// [`MAX_STRING_BYTES`] at a character boundary).
    pub fn error(option: u32, reply_type: u32, message: &str) -> Self {
        assert!(reply_type & REP_FLAG_ERROR != 0, "not an error reply type");
        Self {
            option,
            reply_type,
            data: Bytes::copy_from_slice(truncate_utf8(message, MAX_STRING_BYTES).as_bytes()),
        }
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }

    pub fn encode(&self, out: &mut BytesMut) {
        assert!(
            self.data.len() <= MAX_OPTION_BYTES,
            "option reply over limit"
        );
        out.reserve(OPTION_REPLY_HEADER_BYTES + self.data.len());
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.data.len() as u32);
        out.put_slice(&self.data);
    }

    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, HandshakeError> {
        if buf.len() < OPTION_REPLY_HEADER_BYTES {
            return Ok(None);
        }
        let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        if magic != OPTION_REPLY_MAGIC {
            return Err(HandshakeError::BadOptionReplyMagic { found: magic });
        }
        let option = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
        let reply_type = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
        let len_bytes = u32::from_be_bytes(buf[16..20].try_into().expect("4 bytes"));
        if len_bytes as usize > MAX_OPTION_BYTES {
            return Err(HandshakeError::OptionReplyTooLong { option, len_bytes });
        }
        let total = OPTION_REPLY_HEADER_BYTES + len_bytes as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(OPTION_REPLY_HEADER_BYTES);
        let data = buf.split_to(len_bytes as usize).freeze();
        Ok(Some(Self {
            option,
            reply_type,
            data,
        }))
    }
}

/// The reply that ends an EXPORT_NAME negotiation: size, transmission flags
/// and, unless NO_ZEROES was negotiated, 124 zero bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

impl ExportNameReply {
    pub fn encode(&self, no_zeroes: bool, out: &mut BytesMut) {
        out.put_u64(self.size_bytes);
        out.put_u16(self.transmission_flags);
        if !no_zeroes {
            out.put_bytes(0, EXPORT_NAME_REPLY_PADDING_BYTES);
        }
    }

    pub fn decode(no_zeroes: bool, buf: &mut BytesMut) -> Result<Option<Self>, HandshakeError> {
        let total = 10
            + if no_zeroes {
                0
            } else {
                EXPORT_NAME_REPLY_PADDING_BYTES
            };
        if buf.len() < total {
            return Ok(None);
        }
        let reply = Self {
            size_bytes: buf.get_u64(),
            transmission_flags: buf.get_u16(),
        };
        buf.advance(total - 10);
        Ok(Some(reply))
    }
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub export_name: String,
    pub info_types: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        put_string(&mut out, &self.export_name);
        out.put_u16(self.info_types.len() as u16);
        for t in &self.info_types {
            out.put_u16(*t);
        }
        out.freeze()
    }

    pub fn parse(mut data: &[u8]) -> Result<Self, OptionDataError> {
        let export_name = take_string(&mut data, "export name")?;
        if data.len() < 2 {
            return Err(OptionDataError::Truncated {
                what: "information request count",
            });
        }
        let count = data.get_u16() as usize;
        if data.len() < count * 2 {
            return Err(OptionDataError::Truncated {
                what: "information requests",
            });
        }
        let info_types = (0..count).map(|_| data.get_u16()).collect();
        expect_end(data, "information requests")?;
        Ok(Self {
            export_name,
            info_types,
        })
    }
}

/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export_name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        put_string(&mut out, &self.export_name);
        out.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            put_string(&mut out, q);
        }
        out.freeze()
    }

    pub fn parse(mut data: &[u8]) -> Result<Self, OptionDataError> {
        let export_name = take_string(&mut data, "export name")?;
        if data.len() < 4 {
            return Err(OptionDataError::Truncated {
                what: "query count",
            });
        }
        let count = data.get_u32() as usize;
        // Each query needs at least its 4-byte length: reject impossible
        // counts before allocating anything.
        if count > data.len() / 4 {
            return Err(OptionDataError::Truncated { what: "queries" });
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            queries.push(take_string(&mut data, "query")?);
        }
        expect_end(data, "queries")?;
        Ok(Self {
            export_name,
            queries,
        })
    }
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size_bytes: u64,
        transmission_flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min_bytes: u32,
        preferred_bytes: u32,
        max_payload_bytes: u32,
    },
    /// An info type this codec does not know (client side only).
    Unknown {
        info_type: u16,
        data: Bytes,
    },
}

impl Info {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Info::Export {
                size_bytes,
                transmission_flags,
            } => {
                out.put_u16(INFO_EXPORT);
                out.put_u64(*size_bytes);
                out.put_u16(*transmission_flags);
            }
            Info::Name(name) => {
                out.put_u16(INFO_NAME);
                out.put_slice(truncate_utf8(name, MAX_STRING_BYTES).as_bytes());
            }
            Info::Description(text) => {
                out.put_u16(INFO_DESCRIPTION);
                out.put_slice(truncate_utf8(text, MAX_STRING_BYTES).as_bytes());
            }
            Info::BlockSize {
                min_bytes,
                preferred_bytes,
                max_payload_bytes,
            } => {
                out.put_u16(INFO_BLOCK_SIZE);
                out.put_u32(*min_bytes);
                out.put_u32(*preferred_bytes);
                out.put_u32(*max_payload_bytes);
            }
            Info::Unknown { info_type, data } => {
                out.put_u16(*info_type);
                out.put_slice(data);
            }
        }
        out.freeze()
    }

    pub fn parse(mut data: &[u8]) -> Result<Self, OptionDataError> {
        if data.len() < 2 {
            return Err(OptionDataError::TooShort {
                what: "info reply",
                len_bytes: data.len(),
            });
        }
        let info_type = data.get_u16();
        let fixed = |data: &[u8], want: usize, what| {
            if data.len() == want {
                Ok(())
            } else {
                Err(OptionDataError::TooShort {
                    what,
                    len_bytes: data.len(),
                })
            }
        };
        match info_type {
            INFO_EXPORT => {
                fixed(data, 10, "INFO_EXPORT")?;
                Ok(Info::Export {
                    size_bytes: data.get_u64(),
                    transmission_flags: data.get_u16(),
                })
            }
            INFO_NAME => Ok(Info::Name(utf8(data, "INFO_NAME")?)),
            INFO_DESCRIPTION => Ok(Info::Description(utf8(data, "INFO_DESCRIPTION")?)),
            INFO_BLOCK_SIZE => {
                fixed(data, 12, "INFO_BLOCK_SIZE")?;
                Ok(Info::BlockSize {
                    min_bytes: data.get_u32(),
                    preferred_bytes: data.get_u32(),
                    max_payload_bytes: data.get_u32(),
                })
            }
            other => Ok(Info::Unknown {
                info_type: other,
                data: Bytes::copy_from_slice(data),
            }),
        }
    }
}

/// The data of `NBD_REP_SERVER`: name-len(4) name description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: String,
    pub description: String,
}

impl ServerEntry {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        put_string(&mut out, &self.name);
        out.put_slice(truncate_utf8(&self.description, MAX_STRING_BYTES).as_bytes());
        out.freeze()
    }

    pub fn parse(mut data: &[u8]) -> Result<Self, OptionDataError> {
        let name = take_string(&mut data, "export name")?;
        let description = utf8(data, "description")?;
        Ok(Self { name, description })
    }
}

/// The data of `NBD_REP_META_CONTEXT`: id(4) name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextEntry {
    pub context_id: u32,
    pub name: String,
}

impl MetaContextEntry {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u32(self.context_id);
        out.put_slice(truncate_utf8(&self.name, MAX_STRING_BYTES).as_bytes());
        out.freeze()
    }

    pub fn parse(mut data: &[u8]) -> Result<Self, OptionDataError> {
        if data.len() < 4 {
            return Err(OptionDataError::TooShort {
                what: "meta context reply",
                len_bytes: data.len(),
            });
        }
        let context_id = data.get_u32();
        Ok(Self {
            context_id,
            name: utf8(data, "context name")?,
        })
    }
}

/// Reads a bounded, length-prefixed UTF-8 string.
fn take_string(data: &mut &[u8], what: &'static str) -> Result<String, OptionDataError> {
    if data.len() < 4 {
        return Err(OptionDataError::Truncated { what });
    }
    let len_bytes = data.get_u32();
    if len_bytes as usize > MAX_STRING_BYTES {
        return Err(OptionDataError::StringTooLong { what, len_bytes });
    }
    if data.len() < len_bytes as usize {
        return Err(OptionDataError::Truncated { what });
    }
    let (s, rest) = data.split_at(len_bytes as usize);
    *data = rest;
    utf8(s, what)
}

fn utf8(data: &[u8], what: &'static str) -> Result<String, OptionDataError> {
    if data.len() > MAX_STRING_BYTES {
        return Err(OptionDataError::StringTooLong {
            what,
            len_bytes: data.len() as u32,
        });
    }
    std::str::from_utf8(data)
        .map(str::to_owned)
        .map_err(|_| OptionDataError::NotUtf8 { what })
}

fn expect_end(data: &[u8], what: &'static str) -> Result<(), OptionDataError> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(OptionDataError::TrailingBytes {
            what,
            extra_bytes: data.len(),
        })
    }
}

fn put_string(out: &mut BytesMut, s: &str) {
    let s = truncate_utf8(s, MAX_STRING_BYTES);
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

/// The longest prefix of `s` of at most `max_bytes` that ends on a char boundary.
pub(crate) fn truncate_utf8(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn greeting_golden_bytes_round_trip() {
        // Pins the 18-byte greeting with FIXED_NEWSTYLE|NO_ZEROES.
        assert_eq!(WIRE_FORMAT_VERSION, 1, "golden bytes below pin version 1");
        let mut out = BytesMut::new();
        Greeting {
            handshake_flags: SERVER_HANDSHAKE_FLAGS,
        }
        .encode(&mut out);
        assert_eq!(
            hex(&out),
            "4e42444d414749434948415645".to_owned() + "4f50540003"
        );
        assert_eq!(out.len(), GREETING_BYTES);
        let g = Greeting::decode(&mut out).unwrap().unwrap();
        assert_eq!(g.handshake_flags, 3);
        assert!(out.is_empty());
    }

    #[test]
    fn client_flags_golden_bytes_and_unknown_bits_rejected() {
        // Pins client flags and proves unknown bits are an error.
        let mut out = BytesMut::new();
        ClientFlags(3).encode(&mut out);
        assert_eq!(hex(&out), "00000003");
        let f = ClientFlags::decode(&mut out).unwrap().unwrap();
        assert_eq!(f.validate(), Ok(()));
        assert_eq!(
            ClientFlags(4).validate(),
            Err(HandshakeError::UnknownClientFlags { flags: 4 })
        );
    }

    #[test]
    fn option_golden_bytes_and_partial_input_is_none() {
        // Pins an option (GO with data "ab") and shows a prefix decodes to None.
        let opt = ClientOption {
            option: OPT_GO,
            data: Bytes::from_static(b"ab"),
        };
        let mut out = BytesMut::new();
        opt.encode(&mut out);
        assert_eq!(
            hex(&out),
            "49484156454f5054000000070000000261 62".replace(' ', "")
        );
        let mut partial = BytesMut::from(&out[..17]);
        assert_eq!(ClientOption::decode(&mut partial), Ok(None));
        assert_eq!(partial.len(), 17);
        assert_eq!(ClientOption::decode(&mut out).unwrap().unwrap(), opt);
    }

    #[test]
    fn option_with_bad_magic_or_too_long_is_an_error() {
        // Proves the option decoder rejects a wrong magic and an over-limit length.
        let mut bad = BytesMut::from(&[0u8; 16][..]);
        assert!(matches!(
            ClientOption::decode(&mut bad),
            Err(HandshakeError::BadOptionMagic { found: 0 })
        ));
        let mut long = BytesMut::new();
        long.put_u64(IHAVEOPT);
        long.put_u32(OPT_GO);
        long.put_u32(MAX_OPTION_BYTES as u32 + 1);
        assert!(matches!(
            ClientOption::decode(&mut long),
            Err(HandshakeError::OptionTooLong { .. })
        ));
    }

    #[test]
    fn option_reply_golden_bytes_round_trip() {
        // Pins an ERR_UNSUP reply with a message.
        let r = OptionReply::error(OPT_PEEK_EXPORT, REP_ERR_UNSUP, "no");
        let mut out = BytesMut::new();
        r.encode(&mut out);
        assert_eq!(
            hex(&out),
            "0003e889045565a9000000048000000100000002".to_owned() + "6e6f"
        );
        assert_eq!(OptionReply::decode(&mut out).unwrap().unwrap(), r);
    }

    #[test]
    fn export_name_reply_golden_bytes_with_and_without_zeroes() {
        // Pins the 10- and 134-byte EXPORT_NAME replies.
        let r = ExportNameReply {
            size_bytes: 0x1000,
            transmission_flags: 0x0101,
        };
        let mut short = BytesMut::new();
        r.encode(true, &mut short);
        assert_eq!(hex(&short), "00000000000010000101");
        let mut long = BytesMut::new();
        r.encode(false, &mut long);
        assert_eq!(long.len(), 134);
        assert!(long[10..].iter().all(|b| *b == 0));
        assert_eq!(ExportNameReply::decode(true, &mut short).unwrap(), Some(r));
        assert_eq!(ExportNameReply::decode(false, &mut long).unwrap(), Some(r));
        assert!(long.is_empty());
    }

    #[test]
    fn info_request_golden_bytes_and_bad_data_rejected() {
        // Pins GO/INFO data and proves truncation and trailing bytes are invalid.
        let req = InfoRequest {
            export_name: "x".into(),
            info_types: vec![INFO_NAME, INFO_BLOCK_SIZE],
        };
        let data = req.encode();
        assert_eq!(hex(&data), "00000001780002".to_owned() + "00010003");
        assert_eq!(InfoRequest::parse(&data).unwrap(), req);
        assert!(InfoRequest::parse(&data[..data.len() - 1]).is_err());
        let mut extra = data.to_vec();
        extra.push(0);
        assert!(matches!(
            InfoRequest::parse(&extra),
            Err(OptionDataError::TrailingBytes { .. })
        ));
        let mut huge = BytesMut::new();
        huge.put_u32(MAX_STRING_BYTES as u32 + 1);
        assert!(matches!(
            InfoRequest::parse(&huge),
            Err(OptionDataError::StringTooLong { .. })
        ));
    }

    #[test]
    fn meta_context_request_golden_bytes_and_bad_counts_rejected() {
        // Pins *_META_CONTEXT data and proves an impossible query count is invalid.
        let req = MetaContextRequest {
            export_name: String::new(),
            queries: vec!["base:".into()],
        };
        let data = req.encode();
        assert_eq!(
            hex(&data),
            "00000000000000010000000562617365 3a".replace(' ', "")
        );
        assert_eq!(MetaContextRequest::parse(&data).unwrap(), req);
        let mut bad = BytesMut::new();
        bad.put_u32(0);
        bad.put_u32(u32::MAX);
        assert!(MetaContextRequest::parse(&bad).is_err());
    }

    #[test]
    fn info_payloads_golden_bytes_round_trip() {
        // Pins the four REP_INFO payloads this server sends.
        let cases = [
            (
                Info::Export {
                    size_bytes: 1 << 20,
                    transmission_flags: 0x0d6f,
                },
                "000000000000001000000d6f",
            ),
            (Info::Name("vm1".into()), "0001766d31"),
            (Info::Description("d".into()), "000264"),
            (
                Info::BlockSize {
                    min_bytes: 1,
                    preferred_bytes: 4096,
                    max_payload_bytes: MAX_PAYLOAD_BYTES,
                },
                "0003000000010000100002000000",
            ),
        ];
        for (info, golden) in cases {
            let data = info.encode();
            assert_eq!(hex(&data), golden, "{info:?}");
            assert_eq!(Info::parse(&data).unwrap(), info);
        }
    }

    #[test]
    fn server_and_meta_context_entries_golden_bytes_round_trip() {
        // Pins REP_SERVER and REP_META_CONTEXT payloads.
        let s = ServerEntry {
            name: "a".into(),
            description: "b".into(),
        };
        assert_eq!(hex(&s.encode()), "000000016162");
        assert_eq!(ServerEntry::parse(&s.encode()).unwrap(), s);
        let m = MetaContextEntry {
            context_id: 1,
            name: CONTEXT_BASE_ALLOCATION.into(),
        };
        let data = m.encode();
        assert_eq!(&data[..4], &[0, 0, 0, 1]);
        assert_eq!(&data[4..], b"base:allocation");
        assert_eq!(MetaContextEntry::parse(&data).unwrap(), m);
    }

    #[test]
    fn truncate_utf8_never_splits_a_character() {
        // Proves message truncation keeps valid UTF-8.
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 5), "abc");
    }
}
