//! Entry points that drive the peer codec and the metadata decoders over
//! arbitrary bytes, for the cargo-fuzz targets in `replicator-core/fuzz` and
//! for the property tests that run them on every `cargo test`.
//!
//! They must never panic on any input. They also assert what the decoders
//! promise (a decoded frame re-encodes to exactly the bytes it came from, a
//! decoded superblock round-trips, a loaded bitmap page encodes back to its
//! bytes), so a panic here is a real bug. No I/O, no state kept between calls.

use bytes::BytesMut;

use crate::activity_log::{
    self, ActivityLog, AL_MAGIC, AL_RING_TRANSACTIONS, AL_TRANSACTION_BYTES,
};
use crate::bitmap::{Bitmap, BITMAP_PAGE_BYTES, DEFAULT_BITMAP_BLOCK_BYTES};
use crate::metadata::{self, METADATA_MAGIC, METADATA_VERSION, SUPERBLOCK_SLOT_BYTES};
use crate::types::BlockIndex;
use crate::wire::{self, FrameDecoder};

/// Largest device the `metadata` entry point builds a bitmap for (so one
/// fuzz input cannot allocate much): 64 GiB at 4 KiB per bit = 2 MiB.
pub const FUZZ_MAX_DEVICE_BYTES: u64 = 64 << 30;

/// Decodes every frame of a byte stream with [`wire::decode_with_seq`] until
/// the bytes run out or one is refused. Each decoded message must pass
/// [`wire::validate`] and re-encode (same sequence number) to exactly the
/// bytes it was decoded from; `Ok(None)` must consume nothing. A
/// [`FrameDecoder`] over the same bytes must agree with the plain decoder on
/// every frame it accepts.
///
/// If the first byte has bit 7 set, the rest is not a raw stream but a list
/// of `(type, seq step, payload length u16, payload)` records turned into
/// frames with valid headers and CRCs ([`sealed_frames`]), so the message
/// parsers behind the checksums are reached; otherwise `data` is the stream.
pub fn peer_frame(data: &[u8]) {
    match data.split_first() {
        Some((&head, rest)) if head & 0x80 != 0 => decode_stream(&sealed_frames(rest)),
        _ => decode_stream(data),
    }
}

/// Frames with correct magic, version, lengths and CRCs around fuzzer-chosen
/// types, sequence numbers and payloads (see [`peer_frame`]).
pub fn sealed_frames(records: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut seq = 0u32;
    while at + 4 <= records.len() {
        let msg_type = u16::from(records[at] % 32);
        // Mostly the next number; sometimes a jump (a lost or reordered frame).
        seq =
            seq.wrapping_add(u32::from(records[at + 1] % 4 == 0) + u32::from(records[at + 1] / 64));
        let want = usize::from(u16::from_be_bytes([records[at + 2], records[at + 3]]));
        at += 4;
        let len = want.min(records.len() - at);
        let payload = &records[at..at + len];
        at += len;
        let start = out.len();
        out.extend_from_slice(&wire::WIRE_MAGIC.to_be_bytes());
        out.extend_from_slice(&wire::WIRE_VERSION.to_be_bytes());
        out.extend_from_slice(&msg_type.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
        let hcrc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&hcrc.to_be_bytes());
        out.extend_from_slice(payload);
        seq = seq.wrapping_add(1);
    }
    out
}

fn decode_stream(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut checked = BytesMut::from(data);
    let mut ordered = FrameDecoder::new();
    let mut ordered_ok = true;
    let mut at = 0usize;
    loop {
        let before = buf.len();
        match wire::decode_with_seq(&mut buf) {
            Ok(Some((seq, msg))) => {
                let used = before - buf.len();
                assert!(used >= wire::HEADER_BYTES, "a frame has a whole header");
                assert_eq!(wire::validate(&msg), Ok(()), "decoded {msg:?} validates");
                let mut again = BytesMut::new();
                wire::encode_with_seq(&msg, seq, &mut again)
                    .unwrap_or_else(|e| panic!("decoded {msg:?} does not re-encode: {e}"));
                assert_eq!(
                    &again[..],
                    &data[at..at + used],
                    "re-encoding {} changed its bytes",
                    msg.name()
                );
                if ordered_ok {
                    match ordered.decode(&mut checked) {
                        Ok(Some(m)) => assert_eq!(m, msg, "ordered decoder disagrees"),
                        Ok(None) => panic!("ordered decoder wants more bytes for a whole frame"),
                        Err(wire::WireError::OutOfOrder { expected, found }) => {
                            assert_ne!(expected, found);
                            assert_eq!(found, seq);
                            ordered_ok = false;
                        }
                        Err(e) => panic!("ordered decoder refused a frame plain decode took: {e}"),
                    }
                }
                at += used;
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete frame consumes nothing");
                break;
            }
            Err(_) => break,
        }
    }
}

/// Feeds `data` to one of the metadata decoders. The first byte picks the
/// decoder (low two bits) and whether to repair magic, version and checksum
/// first (bit 7), so the field checks behind them are reached too:
/// 0 both superblock slots, 1 the activity-log ring, 2 a bitmap page,
/// 3 a bitmap run-length chunk (as a peer sends it).
pub fn metadata(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let seal = head & 0x80 != 0;
    match head & 3 {
        0 => superblocks(rest, seal),
        1 => al_ring(rest, seal),
        2 => bitmap_page(rest),
        _ => bitmap_chunk(rest),
    }
}

/// `n` bytes taken from `data` at `*at` (zero-padded past its end).
fn take(data: &[u8], at: &mut usize, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let start = (*at).min(data.len());
    let end = (start + n).min(data.len());
    v[..end - start].copy_from_slice(&data[start..end]);
    *at = start + n;
    v
}

fn u64_from(data: &[u8], at: &mut usize) -> u64 {
    let b = take(data, at, 8);
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

fn superblocks(data: &[u8], seal: bool) {
    let mut at = 0;
    let slot = SUPERBLOCK_SLOT_BYTES as usize;
    let mut s0 = take(data, &mut at, slot);
    let mut s1 = take(data, &mut at, slot);
    if seal {
        for s in [&mut s0, &mut s1] {
            s[0..4].copy_from_slice(&METADATA_MAGIC.to_be_bytes());
            s[4..6].copy_from_slice(&METADATA_VERSION.to_be_bytes());
            let off = metadata::SB_CRC_OFFSET;
            let crc = crc32fast::hash(&s[..off]);
            s[off..off + 4].copy_from_slice(&crc.to_be_bytes());
        }
    }
    if let Ok((sb, slot)) = metadata::decode_superblocks(&s0, &s1) {
        assert!(slot <= 1);
        let bytes = metadata::encode_superblock(&sb);
        assert_eq!(
            metadata::decode_superblock(slot, &bytes).as_ref(),
            Ok(&sb),
            "a decoded superblock round-trips"
        );
    }
}

fn al_ring(data: &[u8], seal: bool) {
    let mut at = 0;
    let mut blocks: Vec<Vec<u8>> = (0..AL_RING_TRANSACTIONS)
        .map(|_| take(data, &mut at, AL_TRANSACTION_BYTES))
        .collect();
    if seal {
        for b in blocks.iter_mut().filter(|b| b.iter().any(|&x| x != 0)) {
            b[0..4].copy_from_slice(&AL_MAGIC.to_be_bytes());
            b[4..6].copy_from_slice(&activity_log::AL_FORMAT_VERSION.to_be_bytes());
            let off = activity_log::AL_CRC_OFFSET;
            b[off..off + 4].fill(0);
            let crc = crc32fast::hash(b);
            b[off..off + 4].copy_from_slice(&crc.to_be_bytes());
        }
    }
    let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    if let Ok(rec) = activity_log::recover(&refs) {
        // Whatever recovered must restore (or be refused) without panicking.
        if let Ok(al) = ActivityLog::restore(rec.capacity, &rec) {
            assert!(al.active_extents().len() <= al.capacity() as usize);
        }
    }
}

fn device_bitmap(data: &[u8], at: &mut usize) -> Option<Bitmap> {
    let size = 1 + u64_from(data, at) % FUZZ_MAX_DEVICE_BYTES;
    Bitmap::new(size, DEFAULT_BITMAP_BLOCK_BYTES).ok()
}

fn bitmap_page(data: &[u8]) {
    let mut at = 0;
    let Some(mut bm) = device_bitmap(data, &mut at) else {
        return;
    };
    let page = u64_from(data, &mut at) % (bm.page_count() + 1);
    let bytes = take(data, &mut at, BITMAP_PAGE_BYTES);
    if bm.load_page(page, &bytes).is_ok() {
        assert_eq!(
            bm.encode_page(page).expect("loaded page exists"),
            bytes,
            "a loaded page encodes back to its bytes"
        );
        assert!(bm.count() <= bm.len_blocks());
    }
}

fn bitmap_chunk(data: &[u8]) {
    let mut at = 0;
    let Some(mut bm) = device_bitmap(data, &mut at) else {
        return;
    };
    let start = u64_from(data, &mut at) % (bm.len_blocks() + 2);
    let chunk = data.get(at..).unwrap_or(&[]);
    let chunk = &chunk[..chunk.len().min(wire::MAX_BITMAP_CHUNK_BYTES)];
    match bm.apply_rle(BlockIndex(start), chunk) {
        Ok(end) => {
            assert!(
                end.0 >= start && end.0 <= bm.len_blocks(),
                "chunk end in range"
            );
            assert!(
                bm.count() <= end.0 - start,
                "only the chunk's blocks are set"
            );
        }
        Err(_) => assert_eq!(bm.count(), 0, "a refused chunk changes nothing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RequestId;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn frames(msgs: &[wire::Message]) -> Vec<u8> {
        let mut tx = wire::FrameEncoder::new();
        let mut b = BytesMut::new();
        for m in msgs {
            tx.encode(m, &mut b).expect("encodes");
        }
        b.to_vec()
    }

    #[test]
    fn peer_frame_accepts_a_valid_numbered_stream_and_its_prefixes() {
        // Proves the entry point's own assertions hold on real frames (a
        // false assertion there would panic here), whole and cut anywhere.
        let bytes = frames(&[
            wire::Message::Write {
                id: RequestId(1),
                offset: 4096,
                flags: wire::WRITE_FLAG_FUA,
                len_bytes: 3,
                data: Bytes::from_static(b"abc"),
            },
            wire::Message::Barrier { id: RequestId(2) },
            wire::Message::Ping,
        ]);
        for cut in 0..=bytes.len() {
            peer_frame(&bytes[..cut]);
        }
    }

    #[test]
    fn sealed_frames_reach_the_message_parsers() {
        // Proves sealed mode builds frames the decoder takes: a record for a
        // Ping (type 23, empty) and a RecvAck (type 10, 8 bytes) decode to
        // those messages, numbered 0 and 1.
        let records = [
            [23, 1, 0, 0].as_slice(),
            &[10, 1, 0, 8],
            &7u64.to_be_bytes(),
        ]
        .concat();
        let mut b = BytesMut::from(&sealed_frames(&records)[..]);
        let mut rx = FrameDecoder::new();
        assert_eq!(rx.decode(&mut b), Ok(Some(wire::Message::Ping)));
        assert_eq!(
            rx.decode(&mut b),
            Ok(Some(wire::Message::RecvAck { id: RequestId(7) }))
        );
        assert!(b.is_empty());
        let mut sealed = vec![0x80];
        sealed.extend_from_slice(&records);
        peer_frame(&sealed);
    }

    #[test]
    fn metadata_accepts_valid_blocks_in_every_mode() {
        // Proves each metadata mode's assertions hold on valid input: a
        // created superblock, an all-zero AL ring, an empty bitmap page and a
        // run-length chunk made by the encoder.
        let layout = metadata::MetadataLayout::external(
            1 << 30,
            64 << 20,
            DEFAULT_BITMAP_BLOCK_BYTES,
            activity_log::MIN_AL_EXTENTS,
        )
        .expect("layout");
        let created =
            metadata::create(&layout, "r", "alpha", activity_log::MIN_AL_EXTENTS).expect("md");
        let sb = metadata::encode_superblock(&created.superblock);
        let mut input = vec![0u8];
        input.extend_from_slice(&sb);
        input.extend_from_slice(&sb);
        metadata(&input);
        metadata(&[1]);
        let mut page = vec![2u8];
        page.extend_from_slice(&((1u64 << 30) - 1).to_be_bytes());
        page.extend_from_slice(&0u64.to_be_bytes());
        page.extend_from_slice(&[0xff; 64]);
        metadata(&page);
        let mut bm = Bitmap::new(1 << 30, DEFAULT_BITMAP_BLOCK_BYTES).expect("bitmap");
        bm.set_range(8192, 1 << 20).expect("in range");
        let (rle, _) = bm.encode_rle(BlockIndex(0), 1024);
        let mut chunk = vec![3u8];
        chunk.extend_from_slice(&((1u64 << 30) - 1).to_be_bytes());
        chunk.extend_from_slice(&0u64.to_be_bytes());
        chunk.extend_from_slice(&rle);
        metadata(&chunk);
    }

    proptest! {
        #[test]
        fn peer_frame_never_panics_on_arbitrary_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            // Proves the peer codec entry point survives any byte string.
            peer_frame(&data);
        }

        #[test]
        fn peer_frame_never_panics_on_sealed_records(
            records in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            // Proves the message parsers behind valid headers and CRCs
            // survive any payload, and the round trip holds for what decodes.
            let mut data = vec![0x80];
            data.extend_from_slice(&records);
            peer_frame(&data);
        }

        #[test]
        fn peer_frame_never_panics_on_mutated_valid_frames(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            // Proves the entry point survives frames damaged after a valid
            // start (CRCs mostly catch it; when not, the round trip holds).
            let mut bytes = frames(&[
                wire::Message::Barrier { id: RequestId(9) },
                wire::Message::OutOfSync { offset: 0, len_bytes: 512 },
                wire::Message::Ping,
            ]);
            for (i, v) in flips {
                let i = i.index(bytes.len());
                bytes[i] ^= v;
            }
            let n = cut.index(bytes.len() + 1);
            peer_frame(&bytes[..n]);
        }

        #[test]
        fn metadata_never_panics_on_arbitrary_bytes(
            head in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..9000),
        ) {
            // Proves every metadata decoder, sealed or not, survives any
            // bytes with a clear result.
            let mut data = vec![head];
            data.extend_from_slice(&body);
            metadata(&data);
        }
    }
}
