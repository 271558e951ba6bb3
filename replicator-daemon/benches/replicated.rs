//! Replicated write throughput: two nodes in one process, connected over
//! loopback TCP, each on a temporary file; writes go through the primary's
//! replicated target (protocol C: each completes when both files hold it).
//!
//!   cargo bench -p replicator-daemon --bench replicated
//!
//! Rows: 4 KiB writes at queue depth 1 and 16, 1 MiB writes at depth 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd_frontend::BlockTarget;
use replicator_daemon::config;
use replicator_daemon::control::protocol::{ConnectionState, ReplicationState, Request, Response};
use replicator_daemon::node::{self, NodeHandle, ReplicatedTarget};
use replicator_daemon::replctl::metadata::create_md;

/// Backing file size of each node.
const DISK_BYTES: u64 = 256 * 1024 * 1024;
/// How long the pair may take to connect.
const CONNECT_DEADLINE_MS: u64 = 30_000;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn pair(dir: &std::path::Path) -> (NodeHandle, NodeHandle) {
    let d = dir.display();
    let text = format!(
        "resource = \"bench\"\nsecret = \"bench\"\n\
         [nodes.alpha]\nreplication = \"127.0.0.1:{}\"\nnbd = \"unix:{d}/alpha.nbd\"\n\
         control = \"{d}/alpha.ctl\"\ndisk = \"{d}/alpha.img\"\n\
         [nodes.bravo]\nreplication = \"127.0.0.1:{}\"\nnbd = \"unix:{d}/bravo.nbd\"\n\
         control = \"{d}/bravo.ctl\"\ndisk = \"{d}/bravo.img\"\n",
        free_port(),
        free_port()
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = config::load(&path).unwrap();
    for n in ["alpha", "bravo"] {
        let f = std::fs::File::create(dir.join(format!("{n}.img"))).unwrap();
        f.set_len(DISK_BYTES).unwrap();
        create_md(&cfg, n, false).unwrap();
    }
    let a = node::start(&cfg, "alpha").await.unwrap();
    let b = node::start(&cfg, "bravo").await.unwrap();
    let deadline = Instant::now() + Duration::from_millis(CONNECT_DEADLINE_MS);
    loop {
        let s = a.status().await.unwrap();
        if s.connection == ConnectionState::Connected
            && s.replication == ReplicationState::Established
        {
            break;
        }
        assert!(Instant::now() < deadline, "the pair did not connect: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for r in [
        Request::NewCurrentUuid { clear_bitmap: true },
        Request::Primary { force: false },
    ] {
        let resp = a.request(r).await;
        assert!(matches!(resp, Response::Ok { .. }), "{resp:?}");
    }
    (a, b)
}

/// Writes `iters` blocks of `block` bytes, `depth` at a time, at
/// successive offsets that wrap around the first half of the disk.
async fn writes(
    target: &Arc<ReplicatedTarget>,
    block: usize,
    depth: usize,
    iters: u64,
) -> Duration {
    let data = Bytes::from(vec![0x5au8; block]);
    let span = DISK_BYTES / 2 / block as u64;
    let start = Instant::now();
    let mut next = 0u64;
    while next < iters {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..depth.min((iters - next) as usize) {
            let (t, d) = (target.clone(), data.clone());
            let offset = (next % span) * block as u64;
            set.spawn(async move { t.write(offset, d, false).await.unwrap() });
            next += 1;
        }
        while set.join_next().await.is_some() {}
    }
    start.elapsed()
}

fn replicated_writes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = rt.block_on(pair(dir.path()));
    let target = a.target.clone();
    let mut g = c.benchmark_group("replicated_write");
    for (name, block, depth) in [
        ("4KiB_qd1", 4096usize, 1usize),
        ("4KiB_qd16", 4096, 16),
        ("1MiB_qd1", 1024 * 1024, 1),
    ] {
        g.throughput(Throughput::Bytes(block as u64));
        g.bench_function(name, |bench| {
            bench.iter_custom(|iters| rt.block_on(writes(&target, block, depth, iters)));
        });
    }
    g.finish();
    a.stop();
    b.stop();
    rt.block_on(async {
        a.wait().await.unwrap();
        b.wait().await.unwrap();
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = replicated_writes
}
criterion_main!(benches);
