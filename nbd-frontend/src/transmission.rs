//! Pure codec for the transmission phase: request headers (with the WRITE
//! payload), simple replies and structured reply chunks.
//!
//! Decoding is "check then parse": partial input is `Ok(None)`. The request
//! decoder bounds every WRITE payload: up to [`MAX_PAYLOAD_BYTES`] it is
//! buffered and returned, up to [`MAX_DRAINED_PAYLOAD_BYTES`] it is discarded
//! as it arrives (so the stream stays in sync), beyond that decoding fails.
//! [`RequestDecoder::decode_head`] instead stops after a WRITE's header so
//! the caller can receive the payload into memory of its choice.
//! This module does no I/O and does not validate commands against an export
//! (that is [`crate::command`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::proto::*;

/// Why transmission bytes could not be decoded; each variant ends the
/// connection because the stream can no longer be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransmissionError {
    #[error("request has magic {found:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadRequestMagic { found: u32 },
    #[error("WRITE of {len_bytes} bytes (cookie {cookie:#x}) exceeds the drain limit of {MAX_DRAINED_PAYLOAD_BYTES} bytes")]
    PayloadTooLarge { cookie: u64, len_bytes: u32 },
    #[error("reply has magic {found:#010x}")]
    BadReplyMagic { found: u32 },
    #[error("reply chunk of {len_bytes} bytes exceeds the limit")]
    ChunkTooLong { len_bytes: u32 },
}

/// The fixed 28-byte part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// Parses a header from at least [`REQUEST_HEADER_BYTES`] bytes without consuming them.
    fn peek(buf: &[u8]) -> Result<Self, TransmissionError> {
        let mut b = &buf[..REQUEST_HEADER_BYTES];
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(TransmissionError::BadRequestMagic { found: magic });
        }
        Ok(Self {
            flags: b.get_u16(),
            command: b.get_u16(),
            cookie: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        })
    }

    /// True when this request is followed by `length` payload bytes.
    pub fn has_payload(&self) -> bool {
        self.command == CMD_WRITE
    }
}

/// A request as a client encodes it (header plus the WRITE payload).
pub fn encode_request(header: &RequestHeader, payload: &[u8], out: &mut BytesMut) {
    out.reserve(REQUEST_HEADER_BYTES + payload.len());
    header.encode(out);
    out.put_slice(payload);
}

/// What the request decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A whole request; `payload` is the WRITE data (empty otherwise).
    Request {
        header: RequestHeader,
        payload: Bytes,
    },
    /// A WRITE longer than [`MAX_PAYLOAD_BYTES`] whose payload was read and
    /// discarded; it must be answered with an error.
    OversizedWrite { header: RequestHeader },
}

/// What [`RequestDecoder::decode_head`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// A whole request, as [`RequestDecoder::decode`] yields it.
    Whole(Incoming),
    /// The header of a WRITE whose `length` payload bytes (at most
    /// [`MAX_PAYLOAD_BYTES`]) follow it. The header has been consumed, the
    /// payload has not: the caller takes exactly `length` bytes (first from
    /// the buffer, then from the stream) before decoding again.
    WritePayloadFollows(RequestHeader),
}

/// Stateful request decoder: remembers an oversized WRITE while its payload
/// is being discarded.
#[derive(Debug, Default)]
pub struct RequestDecoder {
    draining: Option<(RequestHeader, u64)>,
}

impl RequestDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Like [`decode`](Self::decode), but a WRITE whose payload would be
    /// buffered is returned as soon as its header is in, without its payload.
    pub fn decode_head(&mut self, buf: &mut BytesMut) -> Result<Option<Head>, TransmissionError> {
        if self.draining.is_none() && buf.len() >= REQUEST_HEADER_BYTES {
            let header = RequestHeader::peek(buf)?;
            if header.has_payload() && header.length <= MAX_PAYLOAD_BYTES {
                buf.advance(REQUEST_HEADER_BYTES);
                return Ok(Some(Head::WritePayloadFollows(header)));
            }
        }
        Ok(self.decode(buf)?.map(Head::Whole))
    }

    /// Decodes the next request from `buf`, consuming exactly its bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, TransmissionError> {
        if let Some((header, remaining)) = self.draining.as_mut() {
            let n = (*remaining).min(buf.len() as u64);
            buf.advance(n as usize);
            *remaining -= n;
            if *remaining > 0 {
                return Ok(None);
            }
            let header = *header;
            self.draining = None;
            return Ok(Some(Incoming::OversizedWrite { header }));
        }
        if buf.len() < REQUEST_HEADER_BYTES {
            return Ok(None);
        }
        let header = RequestHeader::peek(buf)?;
        if !header.has_payload() {
            buf.advance(REQUEST_HEADER_BYTES);
            return Ok(Some(Incoming::Request {
                header,
                payload: Bytes::new(),
            }));
        }
        let len = header.length;
        if len > MAX_PAYLOAD_BYTES {
            if u64::from(len) > MAX_DRAINED_PAYLOAD_BYTES {
                return Err(TransmissionError::PayloadTooLarge {
                    cookie: header.cookie,
                    len_bytes: len,
                });
            }
            buf.advance(REQUEST_HEADER_BYTES);
            self.draining = Some((header, u64::from(len)));
            return self.decode(buf);
        }
        let total = REQUEST_HEADER_BYTES + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(REQUEST_HEADER_BYTES);
        let payload = buf.split_to(len as usize).freeze();
        Ok(Some(Incoming::Request { header, payload }))
    }
}

/// A simple reply header: `magic error(4) cookie(8)`; READ data follows on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(self.error);
        out.put_u64(self.cookie);
    }

    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, TransmissionError> {
        if buf.len() < SIMPLE_REPLY_HEADER_BYTES {
            return Ok(None);
        }
        let magic = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(TransmissionError::BadReplyMagic { found: magic });
        }
        buf.advance(4);
        Ok(Some(Self {
            error: buf.get_u32(),
            cookie: buf.get_u64(),
        }))
    }
}

/// A structured reply chunk header: `magic flags(2) type(2) cookie(8) length(4)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.chunk_type);
        out.put_u64(self.cookie);
        out.put_u32(self.length);
    }

    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Largest chunk payload [`Chunk::decode`] accepts: a full read plus its offset.
pub const MAX_CHUNK_PAYLOAD_BYTES: u32 = MAX_PAYLOAD_BYTES + 8;

/// A whole structured reply chunk (client side; used by tests and fuzzers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub header: ChunkHeader,
    pub payload: Bytes,
}

impl Chunk {
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Self>, TransmissionError> {
        if buf.len() < STRUCTURED_REPLY_HEADER_BYTES {
            return Ok(None);
        }
        let mut b = &buf[..STRUCTURED_REPLY_HEADER_BYTES];
        let magic = b.get_u32();
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(TransmissionError::BadReplyMagic { found: magic });
        }
        let header = ChunkHeader {
            flags: b.get_u16(),
            chunk_type: b.get_u16(),
            cookie: b.get_u64(),
            length: b.get_u32(),
        };
        if header.length > MAX_CHUNK_PAYLOAD_BYTES {
            return Err(TransmissionError::ChunkTooLong {
                len_bytes: header.length,
            });
        }
        let total = STRUCTURED_REPLY_HEADER_BYTES + header.length as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(STRUCTURED_REPLY_HEADER_BYTES);
        let payload = buf.split_to(header.length as usize).freeze();
        Ok(Some(Self { header, payload }))
    }
}

/// Encodes the header and offset of an OFFSET_DATA chunk; `data_len` bytes of
/// data must follow it on the wire.
pub fn encode_offset_data_header(
    cookie: u64,
    flags: u16,
    offset: u64,
    data_len: u32,
    out: &mut BytesMut,
) {
    assert!(data_len <= MAX_PAYLOAD_BYTES, "read chunk over limit");
    ChunkHeader {
        flags,
        chunk_type: REPLY_TYPE_OFFSET_DATA,
        cookie,
        length: 8 + data_len,
    }
    .encode(out);
    out.put_u64(offset);
}

/// Encodes an OFFSET_HOLE chunk (`hole_len` must be nonzero).
pub fn encode_offset_hole(cookie: u64, flags: u16, offset: u64, hole_len: u32, out: &mut BytesMut) {
    assert!(hole_len > 0, "empty hole chunk");
    ChunkHeader {
        flags,
        chunk_type: REPLY_TYPE_OFFSET_HOLE,
        cookie,
        length: 12,
    }
    .encode(out);
    out.put_u64(offset);
    out.put_u32(hole_len);
}

/// Encodes a NONE chunk (always with DONE).
pub fn encode_none(cookie: u64, out: &mut BytesMut) {
    ChunkHeader {
        flags: REPLY_FLAG_DONE,
        chunk_type: REPLY_TYPE_NONE,
        cookie,
        length: 0,
    }
    .encode(out);
}

/// Encodes an ERROR chunk with a message (cut to [`MAX_STRING_BYTES`]).
pub fn encode_error_chunk(cookie: u64, flags: u16, error: u32, message: &str, out: &mut BytesMut) {
    let msg = crate::handshake::truncate_utf8(message, MAX_STRING_BYTES);
    ChunkHeader {
        flags,
        chunk_type: REPLY_TYPE_ERROR,
        cookie,
        length: 6 + msg.len() as u32,
    }
    .encode(out);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg.as_bytes());
}

/// One `base:allocation` extent as it goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireExtent {
    pub length: u32,
    pub flags: u32,
}

/// Encodes a BLOCK_STATUS chunk (at most [`MAX_BLOCK_STATUS_EXTENTS`] extents).
pub fn encode_block_status(
    cookie: u64,
    flags: u16,
    context_id: u32,
    extents: &[WireExtent],
    out: &mut BytesMut,
) {
    assert!(
        !extents.is_empty() && extents.len() <= MAX_BLOCK_STATUS_EXTENTS,
        "extent count out of range"
    );
    ChunkHeader {
        flags,
        chunk_type: REPLY_TYPE_BLOCK_STATUS,
        cookie,
        length: 4 + 8 * extents.len() as u32,
    }
    .encode(out);
    out.put_u32(context_id);
    for e in extents {
        out.put_u32(e.length);
        out.put_u32(e.flags);
    }
}

/// A parsed ERROR chunk payload (client side).
pub fn parse_error_chunk(mut payload: &[u8]) -> Option<(u32, String)> {
    if payload.len() < 6 {
        return None;
    }
    let error = payload.get_u32();
    let len = payload.get_u16() as usize;
    if payload.len() < len {
        return None;
    }
    Some((error, String::from_utf8_lossy(&payload[..len]).into_owned()))
}

/// A parsed BLOCK_STATUS chunk payload (client side).
pub fn parse_block_status(mut payload: &[u8]) -> Option<(u32, Vec<WireExtent>)> {
    if payload.len() < 4 || (payload.len() - 4) % 8 != 0 {
        return None;
    }
    let id = payload.get_u32();
    let mut extents = Vec::with_capacity(payload.len() / 8);
    while payload.has_remaining() {
        extents.push(WireExtent {
            length: payload.get_u32(),
            flags: payload.get_u32(),
        });
    }
    Some((id, extents))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn write_header(len: u32) -> RequestHeader {
        RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102030405060708,
            offset: 0x1000,
            length: len,
        }
    }

    fn flush_header() -> RequestHeader {
        RequestHeader {
            flags: 0,
            command: CMD_FLUSH,
            cookie: 9,
            offset: 0,
            length: 0,
        }
    }

    #[test]
    fn request_golden_bytes_round_trip_with_payload() {
        // Pins the 28-byte request header and proves the payload is returned whole.
        assert_eq!(WIRE_FORMAT_VERSION, 1, "golden bytes below pin version 1");
        let mut out = BytesMut::new();
        encode_request(&write_header(2), b"hi", &mut out);
        assert_eq!(
            hex(&out),
            "25609513000100010102030405060708000000000000100000000002".to_owned() + "6869"
        );
        let mut dec = RequestDecoder::new();
        let mut partial = BytesMut::from(&out[..29]);
        assert_eq!(dec.decode(&mut partial), Ok(None));
        assert_eq!(partial.len(), 29);
        assert_eq!(
            dec.decode(&mut out).unwrap(),
            Some(Incoming::Request {
                header: write_header(2),
                payload: Bytes::from_static(b"hi")
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn decode_head_stops_after_a_write_header_and_otherwise_decodes_alike() {
        // Proves decode_head consumes only the header of a buffered-size
        // WRITE (payload left for the caller), and yields every other
        // request (incl. an oversized WRITE, drained) exactly as decode does.
        let mut stream = BytesMut::new();
        encode_request(&write_header(5), b"hello", &mut stream);
        let flush = flush_header();
        flush.encode(&mut stream);
        let big = MAX_PAYLOAD_BYTES as usize + 1;
        encode_request(&write_header(big as u32), &vec![0xaa; big], &mut stream);
        flush.encode(&mut stream);
        let mut dec = RequestDecoder::new();
        let mut partial = BytesMut::from(&stream[..REQUEST_HEADER_BYTES - 1]);
        assert_eq!(dec.decode_head(&mut partial), Ok(None));
        assert_eq!(partial.len(), REQUEST_HEADER_BYTES - 1, "nothing consumed");
        let mut buf = stream.clone();
        assert_eq!(
            dec.decode_head(&mut buf),
            Ok(Some(Head::WritePayloadFollows(write_header(5))))
        );
        assert_eq!(&buf[..5], b"hello", "payload left in the buffer");
        buf.advance(5);
        let whole = |i| Ok(Some(Head::Whole(i)));
        let flush_req = Incoming::Request {
            header: flush,
            payload: Bytes::new(),
        };
        assert_eq!(dec.decode_head(&mut buf), whole(flush_req.clone()));
        assert_eq!(
            dec.decode_head(&mut buf),
            whole(Incoming::OversizedWrite {
                header: write_header(big as u32)
            })
        );
        assert_eq!(dec.decode_head(&mut buf), whole(flush_req));
        assert!(buf.is_empty());
    }

    #[test]
    fn request_with_bad_magic_is_an_error() {
        // Proves a wrong request magic is reported, not parsed.
        let mut buf = BytesMut::from(&[0u8; 28][..]);
        assert_eq!(
            RequestDecoder::new().decode(&mut buf),
            Err(TransmissionError::BadRequestMagic { found: 0 })
        );
    }

    #[test]
    fn oversized_write_is_drained_then_next_request_decodes() {
        // Proves a WRITE above the payload limit is discarded chunk by chunk
        // and the following request is still decoded in sync.
        let len = MAX_PAYLOAD_BYTES + 1;
        let mut dec = RequestDecoder::new();
        let mut buf = BytesMut::new();
        write_header(len).encode(&mut buf);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        let mut remaining = len as usize;
        while remaining > 0 {
            let n = remaining.min(1 << 20);
            buf.extend_from_slice(&vec![0xaa; n]);
            remaining -= n;
            let got = dec.decode(&mut buf).unwrap();
            if remaining > 0 {
                assert_eq!(got, None);
                assert!(buf.is_empty(), "drained bytes are not kept");
            } else {
                assert_eq!(
                    got,
                    Some(Incoming::OversizedWrite {
                        header: write_header(len)
                    })
                );
            }
        }
        let flush = flush_header();
        flush.encode(&mut buf);
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Incoming::Request {
                header: flush,
                payload: Bytes::new()
            })
        );
    }

    #[test]
    fn write_above_drain_limit_is_an_error() {
        // Proves a DoS-sized WRITE is refused outright.
        let mut buf = BytesMut::new();
        write_header(u32::MAX).encode(&mut buf);
        assert!(matches!(
            RequestDecoder::new().decode(&mut buf),
            Err(TransmissionError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn simple_reply_golden_bytes_round_trip() {
        // Pins the 16-byte simple reply.
        let r = SimpleReply {
            error: EINVAL,
            cookie: 7,
        };
        let mut out = BytesMut::new();
        r.encode(&mut out);
        assert_eq!(hex(&out), "67446698000000160000000000000007");
        assert_eq!(SimpleReply::decode(&mut out).unwrap(), Some(r));
    }

    #[test]
    fn structured_chunks_golden_bytes_round_trip() {
        // Pins OFFSET_DATA, OFFSET_HOLE, NONE, ERROR and BLOCK_STATUS chunks.
        let mut out = BytesMut::new();
        encode_offset_data_header(5, REPLY_FLAG_DONE, 0x200, 2, &mut out);
        out.put_slice(b"ab");
        assert_eq!(
            hex(&out),
            "668e33ef00010001".to_owned()
                + "0000000000000005"
                + "0000000a"
                + "0000000000000200"
                + "6162"
        );
        let c = Chunk::decode(&mut out).unwrap().unwrap();
        assert_eq!(c.header.chunk_type, REPLY_TYPE_OFFSET_DATA);
        assert!(c.header.is_done());
        assert_eq!(&c.payload[8..], b"ab");

        let mut out = BytesMut::new();
        encode_offset_hole(5, 0, 0x200, 0x1000, &mut out);
        assert_eq!(
            hex(&out),
            "668e33ef0000000200000000000000050000000c00000000000002000000".to_owned() + "1000"
        );

        let mut out = BytesMut::new();
        encode_none(5, &mut out);
        assert_eq!(
            hex(&out),
            "668e33ef0001000000000000000000050000 0000".replace(' ', "")
        );

        let mut out = BytesMut::new();
        encode_error_chunk(5, REPLY_FLAG_DONE, EINVAL, "bad", &mut out);
        assert_eq!(
            hex(&out),
            "668e33ef0001800100000000000000050000000900000016".to_owned() + "0003626164"
        );
        let c = Chunk::decode(&mut out).unwrap().unwrap();
        assert_eq!(parse_error_chunk(&c.payload), Some((EINVAL, "bad".into())));

        let mut out = BytesMut::new();
        let ext = [WireExtent {
            length: 4096,
            flags: STATE_HOLE | STATE_ZERO,
        }];
        encode_block_status(5, REPLY_FLAG_DONE, 1, &ext, &mut out);
        assert_eq!(
            hex(&out),
            "668e33ef000100050000000000000005".to_owned()
                + "0000000c"
                + "00000001"
                + "00001000"
                + "00000003"
        );
        let c = Chunk::decode(&mut out).unwrap().unwrap();
        assert_eq!(parse_block_status(&c.payload), Some((1, ext.to_vec())));
    }
}
