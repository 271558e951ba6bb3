//! Benchmarks of the peer wire codec: encode and decode of `Write` frames of
//! 4 KiB and 1 MiB (the largest data payload), reported as bytes per second.
//! Measures only the pure codec; no I/O.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replicator_core::types::RequestId;
use replicator_core::wire::{decode, encode, Message, MAX_WRITE_PAYLOAD_BYTES};

fn write_msg(len: usize) -> Message {
    Message::Write {
        id: RequestId(42),
        offset: 1 << 30,
        flags: 0,
        len_bytes: len as u32,
        data: Bytes::from(vec![0x5a; len]),
    }
}

fn bench_write_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire_write_frame");
    for (name, len) in [("4KiB", 4096), ("1MiB", MAX_WRITE_PAYLOAD_BYTES)] {
        let msg = write_msg(len);
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = BytesMut::with_capacity(len + 64);
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                buf.clear();
                encode(black_box(&msg), &mut buf).expect("encode");
                black_box(buf.len())
            })
        });
        let mut frame = BytesMut::new();
        encode(&msg, &mut frame).expect("encode");
        let frame = frame.freeze();
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| {
                // The copy into a receive buffer stands for the socket read.
                let mut rx = BytesMut::from(&frame[..]);
                black_box(decode(&mut rx).expect("decode").expect("complete"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_write_frames);
criterion_main!(benches);
