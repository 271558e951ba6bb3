//! Codec throughput: a 4 KiB WRITE request encoded and decoded, a READ
//! simple reply header encoded, and a structured OFFSET_DATA chunk encoded
//! and decoded. Pure CPU, no sockets.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd_frontend::proto::*;
use nbd_frontend::transmission::*;

const PAYLOAD_BYTES: usize = 4096;

fn write_header(cookie: u64) -> RequestHeader {
    RequestHeader {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie,
        offset: cookie * 4096,
        length: PAYLOAD_BYTES as u32,
    }
}

fn bench_codec(c: &mut Criterion) {
    let payload = vec![0xabu8; PAYLOAD_BYTES];
    let mut g = c.benchmark_group("nbd_codec");
    g.throughput(Throughput::Elements(1));

    g.bench_function("encode_write_request_4k", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            encode_request(&write_header(black_box(7)), &payload, &mut out);
            black_box(out.len())
        })
    });

    let mut one = BytesMut::new();
    encode_request(&write_header(7), &payload, &mut one);
    let one = one.freeze();
    g.bench_function("decode_write_request_4k", |b| {
        let mut dec = RequestDecoder::new();
        b.iter(|| {
            let mut buf = BytesMut::from(&one[..]);
            black_box(dec.decode(&mut buf).unwrap().unwrap())
        })
    });

    g.bench_function("encode_read_simple_reply_header", |b| {
        let mut out = BytesMut::with_capacity(64);
        b.iter(|| {
            out.clear();
            SimpleReply {
                error: 0,
                cookie: black_box(9),
            }
            .encode(&mut out);
            black_box(out.len())
        })
    });

    g.bench_function("encode_offset_data_chunk_4k", |b| {
        let data = Bytes::from(payload.clone());
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            encode_offset_data_header(
                black_box(9),
                REPLY_FLAG_DONE,
                4096,
                data.len() as u32,
                &mut out,
            );
            out.extend_from_slice(&data);
            black_box(out.len())
        })
    });

    let mut chunk = BytesMut::new();
    encode_offset_data_header(9, REPLY_FLAG_DONE, 4096, PAYLOAD_BYTES as u32, &mut chunk);
    chunk.extend_from_slice(&payload);
    let chunk = chunk.freeze();
    g.bench_function("decode_offset_data_chunk_4k", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&chunk[..]);
            black_box(Chunk::decode(&mut buf).unwrap().unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
