//! Disk engines side by side: sync vs io_uring, buffered vs O_DIRECT, on a
//! file under /var/tmp (a disk file system; tmpfs refuses O_DIRECT).
//!
//! `cargo bench -p replicator-daemon --bench disk_engines`

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replicator_daemon::config::IoEngineKind;
use replicator_daemon::disk::{open_engine, AnyEngine, DiskEngine, EngineOptions};

/// Size of the benchmark disk.
const DISK_BYTES: u64 = 256 * 1024 * 1024;
/// Request size.
const BLOCK_BYTES: u64 = 4096;
/// Requests in flight per iteration of the queue-depth benchmarks.
const QUEUE_DEPTH: u64 = 32;

fn engine(kind: IoEngineKind, direct: bool) -> (tempfile::TempDir, Arc<AnyEngine>) {
    let dir = tempfile::Builder::new()
        .prefix("disk-bench")
        .tempdir_in("/var/tmp")
        .expect("temp dir in /var/tmp");
    let path = dir.path().join("disk.img");
    // Allocated, not sparse, so writes are overwrites as on a real volume.
    std::fs::write(&path, vec![0x5a; DISK_BYTES as usize]).expect("create disk file");
    let opts = EngineOptions {
        io_engine: kind,
        direct,
        read_only: false,
    };
    (
        dir,
        Arc::new(open_engine(&path, opts).expect("open engine")),
    )
}

/// A cheap deterministic stream of block offsets.
fn offsets(seed: u64, n: u64) -> Vec<u64> {
    let blocks = DISK_BYTES / BLOCK_BYTES;
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * BLOCK_BYTES
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = Bytes::from(vec![0xa5u8; BLOCK_BYTES as usize]);
    let mut group = c.benchmark_group("disk_engines");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for (name, kind, direct) in [
        ("sync", IoEngineKind::Sync, false),
        ("sync-direct", IoEngineKind::Sync, true),
        ("uring", IoEngineKind::Uring, false),
        ("uring-direct", IoEngineKind::Uring, true),
    ] {
        let (_dir, e) = engine(kind, direct);
        let mut seed = 1u64;
        group.throughput(Throughput::Bytes(BLOCK_BYTES * QUEUE_DEPTH));
        group.bench_function(BenchmarkId::new("4k-randwrite-qd32", name), |b| {
            b.iter(|| {
                seed += 1;
                rt.block_on(async {
                    let mut tasks = tokio::task::JoinSet::new();
                    for off in offsets(seed, QUEUE_DEPTH) {
                        let (e, d) = (e.clone(), data.clone());
                        tasks.spawn(async move { e.write(off, d).await });
                    }
                    while let Some(r) = tasks.join_next().await {
                        r.unwrap().unwrap();
                    }
                })
            })
        });
        group.bench_function(BenchmarkId::new("4k-randread-qd32", name), |b| {
            b.iter(|| {
                seed += 1;
                rt.block_on(async {
                    let mut tasks = tokio::task::JoinSet::new();
                    for off in offsets(seed, QUEUE_DEPTH) {
                        let e = e.clone();
                        tasks.spawn(async move { e.read(off, BLOCK_BYTES as usize).await });
                    }
                    while let Some(r) = tasks.join_next().await {
                        r.unwrap().unwrap();
                    }
                })
            })
        });
        group.throughput(Throughput::Bytes(BLOCK_BYTES));
        group.bench_function(BenchmarkId::new("4k-write+flush-qd1", name), |b| {
            b.iter(|| {
                seed += 1;
                let off = offsets(seed, 1)[0];
                rt.block_on(async {
                    e.write(off, data.clone()).await.unwrap();
                    e.flush().await.unwrap();
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
