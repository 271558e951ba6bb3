//! Benchmarks of the out-of-sync bitmap at the size of a 1 TiB device with
//! 4 KiB per bit (2^28 bits, 32 MiB): setting ranges as writes arrive while
//! disconnected, and scanning for set blocks as resync does.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replicator_core::bitmap::Bitmap;
use replicator_core::types::BlockIndex;

const DEVICE_BYTES: u64 = 1 << 40;
const BLOCK_BYTES: u32 = 4096;

fn bench_bitmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("bitmap_1TiB");
    let mut bm = Bitmap::new(DEVICE_BYTES, BLOCK_BYTES).expect("bitmap");

    // set_range of 4 KiB writes at scattered offsets (a pseudo-random walk).
    group.throughput(Throughput::Elements(1));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    group.bench_function("set_range_4KiB_random", |b| {
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let offset = (x >> 24) % (DEVICE_BYTES / 4096) * 4096;
            black_box(bm.set_range(offset, 4096).expect("in range"))
        })
    });

    // set_range of a 1 MiB write.
    group.bench_function("set_range_1MiB", |b| {
        let mut off = 0u64;
        b.iter(|| {
            off = (off + (1 << 20)) % DEVICE_BYTES;
            black_box(bm.set_range(off, 1 << 20).expect("in range"))
        })
    });

    // Full scan of a sparse bitmap (1000 set runs), as resync walks it.
    let mut sparse = Bitmap::new(DEVICE_BYTES, BLOCK_BYTES).expect("bitmap");
    for i in 0..1000u64 {
        sparse.set_blocks(BlockIndex(i * 268_000)..BlockIndex(i * 268_000 + 16));
    }
    group.throughput(Throughput::Bytes(DEVICE_BYTES / u64::from(BLOCK_BYTES) / 8));
    group.bench_function("scan_runs_sparse_32MiB", |b| {
        b.iter(|| black_box(sparse.runs().count()))
    });

    // next_set over an empty bitmap: the whole 32 MiB of zero words.
    let empty = Bitmap::new(DEVICE_BYTES, BLOCK_BYTES).expect("bitmap");
    group.bench_function("next_set_empty_32MiB", |b| {
        b.iter(|| black_box(empty.next_set(BlockIndex(0))))
    });
    group.finish();
}

criterion_group!(benches, bench_bitmap);
criterion_main!(benches);
