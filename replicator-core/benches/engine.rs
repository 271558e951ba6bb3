//! The core write path without I/O: a connected protocol-C Primary takes a
//! 4 KiB client write, emits the disk op and the mirrored frame, gets the
//! disk completion and the peer's WriteAck, and completes the request.
//! Reports writes per second of engine work (no codec, no disk, no network).
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replicator_core::activity_log::{AlRecovery, MIN_AL_EXTENTS};
use replicator_core::bitmap::{Bitmap, DEFAULT_BITMAP_BLOCK_BYTES};
use replicator_core::engine::{
    AdminCommand, ClientId, ClientRequest, DiskOp, Engine, EngineConfig, Input, LoadedMetadata,
    Output, ReplState, SimFault, Time,
};
use replicator_core::generation::SplitBrainPolicy;
use replicator_core::metadata::{self, MetadataLayout};
use replicator_core::types::ProtocolMode;
use replicator_core::wire::Message;

const DISK_BYTES: u64 = 64 * 1024 * 1024;

fn engine(node: &str, peer: &str) -> Engine {
    let l = MetadataLayout::external(DISK_BYTES, 8 << 20, DEFAULT_BITMAP_BLOCK_BYTES, 64)
        .expect("layout");
    let created = metadata::create(&l, "r", node, 64).expect("create-md");
    let cfg = EngineConfig {
        resource: "r".into(),
        node: node.into(),
        peer: peer.into(),
        size_bytes: l.data_size_bytes,
        bitmap_block_bytes: l.bitmap_block_bytes,
        protocol: ProtocolMode::C,
        secret: b"bench".to_vec(),
        split_brain: SplitBrainPolicy::Disconnect,
        al_extents: 64.max(MIN_AL_EXTENTS),
        meta_layout: l,
        resync_rate_bytes_per_s: None,
        sim_fault: SimFault::None,
    };
    let meta = LoadedMetadata {
        superblock: created.superblock,
        superblock_slot: 0,
        bitmap: Bitmap::new(l.data_size_bytes, l.bitmap_block_bytes).expect("bitmap"),
        al: AlRecovery {
            last_sequence: 0,
            capacity: 64,
            slots: vec![None; 64],
            next_context_start: 0,
        },
    };
    Engine::new(cfg, meta, 1).expect("engine")
}

/// Run both engines to quiescence, completing every disk op.
fn settle(a: &mut Engine, b: &mut Engine) {
    loop {
        let mut moved = false;
        for side in 0..2 {
            let (this, other) = if side == 0 {
                (&mut *a, &mut *b)
            } else {
                (&mut *b, &mut *a)
            };
            while let Some(o) = this.poll_output() {
                moved = true;
                match o {
                    Output::Send(m) => other.handle(Time(0), Input::PeerFrame(m)),
                    Output::Disk { op, kind } => {
                        let data = match kind {
                            DiskOp::Read { len_bytes, .. } => {
                                Bytes::from(vec![0u8; len_bytes as usize])
                            }
                            _ => Bytes::new(),
                        };
                        this.handle(
                            Time(0),
                            Input::DiskDone {
                                op,
                                result: Ok(data),
                            },
                        );
                    }
                    _ => {}
                }
            }
        }
        if !moved {
            return;
        }
    }
}

fn connected_primary() -> Engine {
    let (mut a, mut b) = (engine("alpha", "bravo"), engine("bravo", "alpha"));
    for e in [&mut a, &mut b] {
        e.handle(Time(0), Input::Admin(AdminCommand::Connect));
        e.handle(Time(0), Input::Connected);
    }
    settle(&mut a, &mut b);
    a.handle(
        Time(0),
        Input::Admin(AdminCommand::NewCurrentUuid { clear_bitmap: true }),
    );
    settle(&mut a, &mut b);
    a.handle(
        Time(0),
        Input::Admin(AdminCommand::Primary { force: false }),
    );
    settle(&mut a, &mut b);
    assert_eq!(a.status().replication, ReplState::Established);
    a
}

fn write_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    let data = Bytes::from(vec![0xA5u8; 4096]);
    g.bench_function("protocol_c_4k_write", |bench| {
        let mut e = connected_primary();
        let mut id = 0u64;
        let blocks = DISK_BYTES / 4096 / 2;
        bench.iter(|| {
            id += 1;
            // Hot working set: 4 MiB (one AL extent), so the AL stays warm.
            let offset = (id % 1024).min(blocks) * 4096;
            e.handle(
                Time(id),
                Input::Client {
                    id: ClientId(id),
                    request: ClientRequest::Write {
                        offset,
                        data: data.clone(),
                        fua: false,
                    },
                },
            );
            let mut completed = false;
            loop {
                let mut next = Vec::new();
                while let Some(o) = e.poll_output() {
                    match o {
                        Output::Disk { op, .. } => next.push(Input::DiskDone {
                            op,
                            result: Ok(Bytes::new()),
                        }),
                        Output::Send(Message::Write { id: rid, .. }) => {
                            next.push(Input::PeerFrame(Message::WriteAck { id: rid, error: 0 }))
                        }
                        Output::Send(Message::Barrier { id: bid }) => {
                            next.push(Input::PeerFrame(Message::BarrierAck { id: bid, error: 0 }))
                        }
                        Output::Complete { .. } => completed = true,
                        _ => {}
                    }
                }
                if next.is_empty() {
                    break;
                }
                for i in next {
                    e.handle(Time(id), i);
                }
            }
            assert!(completed, "write {id} did not complete");
        });
    });
    g.finish();
}

criterion_group!(benches, write_path);
criterion_main!(benches);
