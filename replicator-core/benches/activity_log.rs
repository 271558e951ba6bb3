//! Benchmarks of the activity log with the default 1237 extents: the hot path
//! (write to an active extent) and the cold path (a new extent evicting the
//! least recently used one and encoding a transaction block).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use replicator_core::activity_log::{ActivityLog, AlDecision, AL_EXTENT_BYTES, DEFAULT_AL_EXTENTS};

fn bench_al(c: &mut Criterion) {
    let mut group = c.benchmark_group("activity_log_1237");

    let mut hot = ActivityLog::new(DEFAULT_AL_EXTENTS).expect("al");
    if let Ok(AlDecision::Persist(t)) = hot.begin_write(0, 4096) {
        hot.commit(t.sequence).expect("commit");
    }
    hot.end_write(0, 4096).expect("end");
    group.bench_function("hot_begin_end_write", |b| {
        b.iter(|| {
            black_box(hot.begin_write(8192, 4096).expect("begin"));
            black_box(hot.end_write(8192, 4096).expect("end"))
        })
    });

    let mut cold = ActivityLog::new(DEFAULT_AL_EXTENTS).expect("al");
    let mut extent = 0u64;
    group.bench_function("cold_write_with_eviction", |b| {
        b.iter(|| {
            let off = extent * AL_EXTENT_BYTES;
            extent += 1;
            if let AlDecision::Persist(t) = cold.begin_write(off, 4096).expect("begin") {
                cold.commit(t.sequence).expect("commit");
                black_box(t.block.len());
            }
            cold.end_write(off, 4096).expect("end")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_al);
criterion_main!(benches);
