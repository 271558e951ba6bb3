//! Test harness shared by the engine tests: engines built from `create-md`
//! metadata, output helpers, and a connected pair that shuttles frames and
//! completes disk operations.
#![allow(dead_code, unused_imports)] // each test crate uses a different subset
pub use bytes::Bytes;
pub use replicator_core::activity_log::{AlRecovery, MIN_AL_EXTENTS};
pub use replicator_core::bitmap::{Bitmap, DEFAULT_BITMAP_BLOCK_BYTES};
pub use replicator_core::engine::{
    AdminCommand, AdminError, ClientError, ClientId, ClientRequest, ConnState, DiskError, DiskOp,
    Engine, EngineConfig, Event, Input, LoadedMetadata, OpId, Output, ReplState, SimFault, Time,
};
pub use replicator_core::generation::SplitBrainPolicy;
pub use replicator_core::metadata::{self, MetadataLayout};
pub use replicator_core::types::{DiskState, NodeRole, ProtocolMode, RequestId};
pub use replicator_core::wire::{Message, WireError};

pub const DISK_BYTES: u64 = 16 * 1024 * 1024;

pub fn layout() -> MetadataLayout {
    MetadataLayout::external(
        DISK_BYTES,
        8 << 20,
        DEFAULT_BITMAP_BLOCK_BYTES,
        MIN_AL_EXTENTS,
    )
    .expect("layout")
}

pub fn engine(node: &str, peer: &str, protocol: ProtocolMode, secret: &[u8]) -> Engine {
    engine_with_rate(node, peer, protocol, secret, None)
}

pub fn engine_with_rate(
    node: &str,
    peer: &str,
    protocol: ProtocolMode,
    secret: &[u8],
    resync_rate_bytes_per_s: Option<u64>,
) -> Engine {
    let l = layout();
    let created = metadata::create(&l, "r", node, MIN_AL_EXTENTS).expect("create-md");
    let cfg = EngineConfig {
        resource: "r".into(),
        node: node.into(),
        peer: peer.into(),
        size_bytes: l.data_size_bytes,
        bitmap_block_bytes: l.bitmap_block_bytes,
        protocol,
        secret: secret.to_vec(),
        split_brain: SplitBrainPolicy::Disconnect,
        al_extents: MIN_AL_EXTENTS,
        meta_layout: l,
        resync_rate_bytes_per_s,
        sim_fault: SimFault::None,
    };
    let meta = LoadedMetadata {
        superblock: created.superblock,
        superblock_slot: 0,
        bitmap: Bitmap::new(l.data_size_bytes, l.bitmap_block_bytes).expect("bitmap"),
        al: AlRecovery {
            last_sequence: 0,
            capacity: MIN_AL_EXTENTS,
            slots: vec![None; MIN_AL_EXTENTS as usize],
            next_context_start: 0,
        },
    };
    let mut e = Engine::new(cfg, meta, 7).expect("engine");
    settle_meta(&mut e);
    e
}

pub fn drain(e: &mut Engine) -> Vec<Output> {
    std::iter::from_fn(|| e.poll_output()).collect()
}

/// Complete every metadata write (repeatedly); return the other outputs.
pub fn settle_meta(e: &mut Engine) -> Vec<Output> {
    let mut rest = Vec::new();
    loop {
        let outs = drain(e);
        if outs.is_empty() {
            return rest;
        }
        for o in outs {
            match o {
                Output::Disk {
                    op,
                    kind: DiskOp::MetaWrite { .. },
                } => e.handle(
                    Time(0),
                    Input::DiskDone {
                        op,
                        result: Ok(Bytes::new()),
                    },
                ),
                other => rest.push(other),
            }
        }
    }
}

pub fn disk_ops(outs: &[Output]) -> Vec<(OpId, DiskOp)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Disk { op, kind } => Some((*op, kind.clone())),
            _ => None,
        })
        .collect()
}

pub fn sent(outs: &[Output]) -> Vec<Message> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

pub fn completions(outs: &[Output]) -> Vec<(ClientId, Result<Bytes, ClientError>)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Complete { id, result } => Some((*id, result.clone())),
            _ => None,
        })
        .collect()
}

pub fn done(e: &mut Engine, op: OpId) -> Vec<Output> {
    e.handle(
        Time(0),
        Input::DiskDone {
            op,
            result: Ok(Bytes::new()),
        },
    );
    settle_meta(e)
}

/// Two engines connected through a perfect link: frames are delivered,
/// data disk ops completed (reads return zeroes), until nothing moves.
pub struct Pair {
    pub a: Engine,
    pub b: Engine,
}

impl Pair {
    pub fn new(protocol: ProtocolMode) -> Pair {
        Pair::with_target_rate(protocol, None)
    }

    pub fn with_target_rate(protocol: ProtocolMode, rate: Option<u64>) -> Pair {
        let mut p = Pair {
            a: engine("alpha", "bravo", protocol, b"s"),
            b: engine_with_rate("bravo", "alpha", protocol, b"s", rate),
        };
        for e in [&mut p.a, &mut p.b] {
            e.handle(Time(0), Input::Admin(AdminCommand::Connect));
            e.handle(Time(0), Input::Connected);
        }
        p.run(&mut Vec::new(), &mut Vec::new());
        assert_eq!(p.a.status().replication, ReplState::Established);
        p.a.handle(
            Time(0),
            Input::Admin(AdminCommand::NewCurrentUuid { clear_bitmap: true }),
        );
        p.run(&mut Vec::new(), &mut Vec::new());
        p.a.handle(
            Time(0),
            Input::Admin(AdminCommand::Primary { force: false }),
        );
        p.run(&mut Vec::new(), &mut Vec::new());
        assert_eq!(p.a.role(), NodeRole::Primary);
        assert_eq!(p.b.disk_state(), DiskState::UpToDate);
        p
    }

    /// Shuttle frames and complete every disk op; collect other outputs.
    pub fn run(&mut self, a_out: &mut Vec<Output>, b_out: &mut Vec<Output>) {
        self.run_at(Time(0), |_| false, a_out, b_out);
    }

    /// Like [`Pair::run`], at engine time `now`; each data write or flush
    /// of b for which `b_fails` holds fails with EIO.
    pub fn run_at(
        &mut self,
        now: Time,
        b_fails: impl Fn(&DiskOp) -> bool,
        a_out: &mut Vec<Output>,
        b_out: &mut Vec<Output>,
    ) {
        let fails = |me: usize, op: &DiskOp| {
            me == 1 && matches!(op, DiskOp::Write { .. } | DiskOp::Flush) && b_fails(op)
        };
        self.run_failing(now, fails, a_out, b_out);
    }

    /// Like [`Pair::run`], at engine time `now`; each data read, write or
    /// flush for which `fails(node, op)` holds (node 0 is a, 1 is b) fails
    /// with EIO.
    pub fn run_failing(
        &mut self,
        now: Time,
        fails: impl Fn(usize, &DiskOp) -> bool,
        a_out: &mut Vec<Output>,
        b_out: &mut Vec<Output>,
    ) {
        for _ in 0..10_000 {
            let (oa, ob) = (drain(&mut self.a), drain(&mut self.b));
            if oa.is_empty() && ob.is_empty() {
                return;
            }
            for (outs, me, keep) in [(oa, 0, &mut *a_out), (ob, 1, &mut *b_out)] {
                for o in outs {
                    let (this, other) = if me == 0 {
                        (&mut self.a, &mut self.b)
                    } else {
                        (&mut self.b, &mut self.a)
                    };
                    if matches!(o, Output::Send(_)) {
                        keep.push(o.clone());
                    }
                    match o {
                        Output::Send(m) => other.handle(now, Input::PeerFrame(m)),
                        Output::Disk { op, kind } => {
                            let result = match kind {
                                DiskOp::Read { .. } | DiskOp::Write { .. } | DiskOp::Flush
                                    if fails(me, &kind) =>
                                {
                                    Err(DiskError { code: 5 })
                                }
                                DiskOp::Read { len_bytes, .. } => {
                                    Ok(Bytes::from(vec![0u8; len_bytes as usize]))
                                }
                                _ => Ok(Bytes::new()),
                            };
                            this.handle(now, Input::DiskDone { op, result });
                        }
                        other_out => keep.push(other_out),
                    }
                }
            }
        }
        panic!("pair did not settle");
    }
}

pub fn write_req(id: u64, offset: u64, fua: bool) -> Input {
    Input::Client {
        id: ClientId(id),
        request: ClientRequest::Write {
            offset,
            data: Bytes::from(vec![id as u8; 4096]),
            fua,
        },
    }
}
