//! Property tests: every message round-trips through encode/decode, input
//! split at any point decodes the same, and arbitrary bytes never panic the
//! decoders or the fuzz entry points (the same functions the cargo-fuzz
//! targets call).

use bytes::{Bytes, BytesMut};
use nbd_frontend::fuzzing;
use nbd_frontend::handshake::*;
use nbd_frontend::proto::*;
use nbd_frontend::transmission::*;
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/_é-]{0,40}"
}

fn request() -> impl Strategy<Value = (RequestHeader, Vec<u8>)> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        any::<u64>(),
        0u32..3000,
    )
        .prop_map(|(flags, command, cookie, offset, length)| {
            let h = RequestHeader {
                flags,
                command,
                cookie,
                offset,
                length,
            };
            let payload = if command == CMD_WRITE {
                vec![0xa5; length as usize]
            } else {
                vec![]
            };
            (h, payload)
        })
}

proptest! {
    #[test]
    fn client_option_round_trips(option in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
        // Proves any option encodes and decodes to itself, consuming exactly its bytes.
        let o = ClientOption { option, data: Bytes::from(data) };
        let mut buf = BytesMut::new();
        o.encode(&mut buf);
        buf.extend_from_slice(b"next");
        prop_assert_eq!(ClientOption::decode(&mut buf).unwrap(), Some(o));
        prop_assert_eq!(&buf[..], b"next");
    }

    #[test]
    fn option_reply_round_trips(option in any::<u32>(), reply_type in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..300)) {
        // Proves any option reply encodes and decodes to itself.
        let r = OptionReply { option, reply_type, data: Bytes::from(data) };
        let mut buf = BytesMut::new();
        r.encode(&mut buf);
        prop_assert_eq!(OptionReply::decode(&mut buf).unwrap(), Some(r));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn info_and_meta_requests_round_trip(export_name in name(), info_types in proptest::collection::vec(any::<u16>(), 0..20), queries in proptest::collection::vec(name(), 0..10)) {
        // Proves GO/INFO and *_META_CONTEXT data round-trip.
        let i = InfoRequest { export_name: export_name.clone(), info_types };
        prop_assert_eq!(InfoRequest::parse(&i.encode()).unwrap(), i);
        let m = MetaContextRequest { export_name, queries };
        prop_assert_eq!(MetaContextRequest::parse(&m.encode()).unwrap(), m);
    }

    #[test]
    fn info_replies_round_trip(size_bytes in any::<u64>(), tflags in any::<u16>(), text in name(), min in any::<u32>(), pref in any::<u32>(), max in any::<u32>()) {
        // Proves every REP_INFO payload round-trips.
        for info in [
            Info::Export { size_bytes, transmission_flags: tflags },
            Info::Name(text.clone()),
            Info::Description(text.clone()),
            Info::BlockSize { min_bytes: min, preferred_bytes: pref, max_payload_bytes: max },
        ] {
            prop_assert_eq!(Info::parse(&info.encode()).unwrap(), info);
        }
    }

    #[test]
    fn export_name_reply_round_trips(size_bytes in any::<u64>(), transmission_flags in any::<u16>(), no_zeroes in any::<bool>()) {
        // Proves the EXPORT_NAME reply round-trips in both padding modes.
        let r = ExportNameReply { size_bytes, transmission_flags };
        let mut buf = BytesMut::new();
        r.encode(no_zeroes, &mut buf);
        prop_assert_eq!(ExportNameReply::decode(no_zeroes, &mut buf).unwrap(), Some(r));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn request_stream_decodes_the_same_however_it_is_split(reqs in proptest::collection::vec(request(), 1..8), splits in proptest::collection::vec(1usize..200, 1..50)) {
        // Proves check-then-parse: feeding the stream in arbitrary pieces yields exactly the encoded requests.
        let mut wire = BytesMut::new();
        for (h, p) in &reqs {
            encode_request(h, p, &mut wire);
        }
        let mut dec = RequestDecoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < wire.len() {
            let n = splits[i % splits.len()].min(wire.len() - pos);
            i += 1;
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            while let Some(inc) = dec.decode(&mut buf).unwrap() {
                got.push(inc);
            }
        }
        let want: Vec<Incoming> = reqs
            .into_iter()
            .map(|(header, p)| Incoming::Request { header, payload: Bytes::from(p) })
            .collect();
        prop_assert_eq!(got, want);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn replies_round_trip(cookie in any::<u64>(), error in any::<u32>(), offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..500), msg in name()) {
        // Proves simple replies and OFFSET_DATA / ERROR / BLOCK_STATUS chunks round-trip.
        let mut buf = BytesMut::new();
        SimpleReply { error, cookie }.encode(&mut buf);
        prop_assert_eq!(SimpleReply::decode(&mut buf).unwrap(), Some(SimpleReply { error, cookie }));

        encode_offset_data_header(cookie, REPLY_FLAG_DONE, offset, data.len() as u32, &mut buf);
        buf.extend_from_slice(&data);
        let c = Chunk::decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(c.header.cookie, cookie);
        prop_assert_eq!(&c.payload[..8], &offset.to_be_bytes()[..]);
        prop_assert_eq!(&c.payload[8..], &data[..]);

        encode_error_chunk(cookie, REPLY_FLAG_DONE, error, &msg, &mut buf);
        let c = Chunk::decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(parse_error_chunk(&c.payload), Some((error, msg)));

        let ext: Vec<WireExtent> = data.iter().map(|b| WireExtent { length: u32::from(*b) + 1, flags: u32::from(b & 3) }).collect();
        encode_block_status(cookie, REPLY_FLAG_DONE, 1, &ext, &mut buf);
        let c = Chunk::decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(parse_block_status(&c.payload), Some((1, ext)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        // Proves no decoder panics on garbage (errors are values).
        let _ = Greeting::decode(&mut BytesMut::from(&data[..]));
        let _ = ClientOption::decode(&mut BytesMut::from(&data[..]));
        let _ = OptionReply::decode(&mut BytesMut::from(&data[..]));
        let _ = ExportNameReply::decode(false, &mut BytesMut::from(&data[..]));
        let _ = InfoRequest::parse(&data);
        let _ = MetaContextRequest::parse(&data);
        let _ = Info::parse(&data);
        let _ = ServerEntry::parse(&data);
        let _ = MetaContextEntry::parse(&data);
        let _ = SimpleReply::decode(&mut BytesMut::from(&data[..]));
        let _ = Chunk::decode(&mut BytesMut::from(&data[..]));
        let _ = parse_error_chunk(&data);
        let _ = parse_block_status(&data);
        let mut dec = RequestDecoder::new();
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
    }

    #[test]
    fn fuzz_entry_points_never_panic_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        // Proves the fuzz targets' functions survive garbage.
        fuzzing::handshake(&data);
        fuzzing::transmission(&data);
    }

    #[test]
    fn fuzz_entry_points_never_panic_on_well_formed_sessions(
        options in proptest::collection::vec((1u32..13, proptest::collection::vec(any::<u8>(), 0..40)), 0..6),
        go in any::<bool>(),
        reqs in proptest::collection::vec(request(), 0..10),
        mode in any::<u8>(),
    ) {
        // Proves the fuzz entry points (hence negotiation + validation + execution + reply
        // framing) hold up on sessions that get past the framing into deep paths.
        let mut wire = BytesMut::new();
        ClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).encode(&mut wire);
        ClientOption { option: OPT_STRUCTURED_REPLY, data: Bytes::new() }.encode(&mut wire);
        ClientOption {
            option: OPT_SET_META_CONTEXT,
            data: MetaContextRequest { export_name: "fuzz".into(), queries: vec![CONTEXT_BASE_ALLOCATION.into()] }.encode(),
        }
        .encode(&mut wire);
        for (option, data) in options {
            if option != OPT_ABORT && option != OPT_GO && option != OPT_EXPORT_NAME {
                ClientOption { option, data: Bytes::from(data) }.encode(&mut wire);
            }
        }
        let finish = if go {
            ClientOption { option: OPT_GO, data: InfoRequest { export_name: String::new(), info_types: vec![1, 2, 3] }.encode() }
        } else {
            ClientOption { option: OPT_EXPORT_NAME, data: Bytes::from_static(b"fuzz") }
        };
        finish.encode(&mut wire);
        let mut tx = BytesMut::new();
        tx.extend_from_slice(&[mode]);
        for (h, p) in &reqs {
            let h = RequestHeader { offset: h.offset % (2 << 20), ..*h };
            encode_request(&h, p, &mut wire);
            encode_request(&h, p, &mut tx);
        }
        fuzzing::handshake(&wire);
        fuzzing::transmission(&tx);
    }
}
