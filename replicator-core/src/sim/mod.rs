//! The deterministic simulator: two nodes, each running the real [`Engine`],
//! on simulated disks (volatile cache, crash loss, torn metadata writes), a
//! simulated link (delay, partition, corrupted, duplicated and reordered
//! frames; frames go through the real wire codec, numbered per connection, so
//! corruption meets the CRC and reordering meets the frame-number check), a
//! client
//! issuing overlapping writes, FUA, flushes and reads against the Primary,
//! crashes, restarts (metadata re-read from the simulated disk) and failover.
//!
//! A write-log oracle ([`oracle`]) judges every read, every crash and every
//! failover; invariants are checked after every event; a healed phase must
//! converge to byte-identical replicas with zero out-of-sync bytes. One u64
//! seed reproduces a run.
//!
//! Owns simulation only; must not be used by the daemon. No I/O, no clock.

pub mod disk;
pub mod oracle;

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use crate::activity_log::{self, AL_RING_TRANSACTIONS, AL_TRANSACTION_BYTES};
use crate::bitmap::{Bitmap, BITMAP_PAGE_BYTES};
use crate::engine::rng::SplitMix64;
use crate::engine::{
    AdminCommand, ClientId, ClientRequest, ConnState, DiskOp, Engine, EngineConfig, Input,
    LoadedMetadata, OpId, Output, ReplState, SimFault, Time,
};
use crate::generation::SplitBrainPolicy;
use crate::metadata::{self, MetadataLayout, MetadataWrite, SUPERBLOCK_SLOT_BYTES};
use crate::types::{DiskState, NodeRole, ProtocolMode};
use crate::wire;

use disk::SimDisk;
use oracle::{Floors, Oracle, ORACLE_SECTOR_BYTES};

/// Simulated backing disk size: 18 AL extents, more than the AL holds, so
/// extents get evicted.
pub const SIM_DISK_BYTES: u64 = 72 * 1024 * 1024;
/// AL capacity used in the simulation (the minimum the AL allows).
pub const SIM_AL_EXTENTS: u32 = activity_log::MIN_AL_EXTENTS;
/// Client requests in flight at most.
pub const SIM_CLIENT_MAX_OUTSTANDING: usize = 8;
/// Hot regions the client writes into (overlaps are frequent).
pub const SIM_HOT_REGIONS: u64 = 24;
/// Size of one hot region.
pub const SIM_HOT_REGION_BYTES: u64 = 64 * 1024;
/// Largest client write.
pub const SIM_MAX_WRITE_BYTES: u64 = 16 * 1024;
/// Sim time the healed phase may take to converge.
pub const SIM_CONVERGE_DEADLINE_NS: u64 = 120_000_000_000;
/// Events per run at most (a livelock guard).
pub const SIM_MAX_EVENTS: u64 = 20_000_000;

/// A named scenario, or random faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Random,
    PrimaryCrashMidWrite,
    SecondaryCrash,
    PartitionThenHeal,
    PartitionDuringResync,
    CorruptAndDuplicatedFrames,
    ReorderedFrames,
    SplitBrainBothPromoted,
    FlushRacingDisconnect,
    TornMetadataSlot,
    /// The Secondary's data writes fail (a full or broken disk) while the
    /// Primary acknowledges them, then the Primary crashes.
    SecondaryDiskFails,
    /// The Secondary's flushes fail and lose the writes they should have
    /// made durable (a write-back error), then the Primary crashes.
    SecondaryFlushFails,
    /// A SyncTarget's flushes fail and lose resync data and mirrored
    /// writes; after the resync it crashes, and must hold every write.
    SyncTargetFlushFails,
    /// The SyncSource's reads fail: the target waits and asks again, the
    /// link stays up, and the resync ends once the reads work.
    SyncSourceReadsFail,
    /// The Secondary's metadata writes fail: it stops (and a crash
    /// planned later finds it stopped); the Primary goes on; the Secondary
    /// returns once its disk is sound.
    SecondaryMetaFails,
    /// The Primary's metadata writes fail: it stops, the Secondary takes
    /// over; the old Primary returns once its disk is sound.
    PrimaryMetaFails,
}

/// What a failing disk fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    DataWrites,
    /// Flushes, losing the writes they should have made durable.
    Flushes,
    /// Metadata writes (the node stops at the first).
    MetaWrites,
    /// Data reads (EIO): a SyncSource cannot serve the resync, a client
    /// read fails.
    DataReads,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub scenario: Scenario,
    /// Length of the fault phase in simulated nanoseconds.
    pub safety_ns: u64,
    pub sim_fault: SimFault,
    pub verbose: bool,
}

impl SimConfig {
    pub fn new(seed: u64, scenario: Scenario) -> Self {
        SimConfig {
            seed,
            scenario,
            safety_ns: 400_000_000,
            sim_fault: SimFault::None,
            verbose: false,
        }
    }
}

/// How many times (10 ms apart) the operator's `resync` waits for a
/// resync or verify in progress to end.
const OPERATOR_RESYNC_TRIES: u32 = 1000;

/// A successful run's figures.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub events: u64,
    pub writes_acked: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
    pub crashes: u64,
    pub failovers: u64,
    /// Failovers refused because the survivor's disk was not UpToDate.
    pub failovers_refused: u64,
    /// Data writes that failed on a failing disk.
    pub disk_write_errors: u64,
    /// Data flushes that failed on a failing disk.
    pub disk_flush_errors: u64,
    /// Data reads that failed on a failing disk.
    pub disk_read_errors: u64,
    /// Links a node closed (protocol errors, refusals, disconnects).
    pub links_closed: u64,
    /// Metadata writes that failed, each stopping its node.
    pub meta_write_errors: u64,
    pub fatal_stops: u64,
    pub frames_corrupted: u64,
    pub frames_duplicated: u64,
    /// Frames delivered before the frame sent just ahead of them.
    pub frames_reordered: u64,
    /// Links dropped because a frame arrived out of order.
    pub order_errors_detected: u64,
    pub split_brains_seen: u64,
    pub torn_superblock_writes: u64,
    pub sim_time_ns: u64,
}

/// A failed run: the seed and what broke, with the trace tail.
#[derive(Debug, Clone)]
pub struct SimFailure {
    pub seed: u64,
    pub message: String,
    pub trace_tail: Vec<String>,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation failed (seed {}): {}",
            self.seed, self.message
        )?;
        for l in &self.trace_tail {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Action {
    Crash(usize),
    Restart(usize),
    Partition,
    Heal,
    Promote(usize),
    /// Planned switchover: demote the Primary, promote its in-sync peer.
    Switchover,
    /// Second half of a switchover, once the peer saw the demotion.
    FinishSwitchover(usize),
    /// Writes to node `.0` that the oracle does not protect (a split-brain
    /// victim's writes, discarded later).
    UntrackedWrites(usize, u64),
    Admin(usize, AdminCommand),
    /// Node `.0`'s disk starts failing this way, or (None) stops.
    FailDisk(usize, Option<DiskFault>),
    /// The Secondary of the moment (if running) starts failing.
    SecondaryDiskFaults(DiskFault),
    /// No disk fails any more; the operator restarts a node that stopped
    /// on a metadata error, then runs `resync`.
    DiskFaultsOff,
    /// The operator's `replctl resync` on both nodes, once no resync or
    /// verify runs (retried every 10 ms, this many more times).
    OperatorResync(u32),
    /// Corrupt / duplicate / reorder frames with these per-mille rates.
    NetFaults {
        corrupt: u64,
        duplicate: u64,
        reorder: u64,
    },
    /// Stop the client; check convergence once quiet.
    EndSafety,
    /// Crash with the next superblock write torn.
    CrashTearingSuperblock(usize),
}

#[derive(Debug, Clone)]
enum Ev {
    Disk { node: usize, inc: u64, op: OpId },
    Frame { to: usize, epoch: u64, bytes: Bytes },
    Connect { epoch: u64 },
    LinkDown { node: usize, epoch: u64 },
    Tick { node: usize, inc: u64 },
    Client,
    Script(Action),
}

#[derive(Debug)]
struct Node {
    name: &'static str,
    engine: Option<Engine>,
    data: SimDisk,
    meta: SimDisk,
    inc: u64,
    inflight: BTreeMap<OpId, DiskOp>,
    tick_at: Option<u64>,
    /// Per-sector floor this node's durable image must meet after a crash.
    durable_floor: Floors,
    tear_next_meta: bool,
    /// Crash (tearing it) at the next superblock write this node issues.
    crash_on_superblock_write: bool,
    /// What this node's disk fails now, if anything.
    failing: Option<DiskFault>,
}

#[derive(Debug, Clone)]
enum Req {
    Write {
        wid: u64,
        fua: bool,
        epoch: Option<u64>,
    },
    Read {
        offset: u64,
        len: u64,
        floors: Floors,
    },
    Flush {
        snapshot: Floors,
        epoch: Option<u64>,
    },
}

struct World {
    cfg: SimConfig,
    rng: SplitMix64,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    nodes: [Node; 2],
    layout: MetadataLayout,
    /// The current connection's epoch, if connected at the transport level.
    conn: Option<u64>,
    next_epoch: u64,
    connect_pending: bool,
    partitioned: bool,
    /// A data write failed on this node's disk during the run (only the
    /// disk-failure scenario makes any fail): its copy lacks writes the
    /// Primary acknowledged.
    lost_writes: [bool; 2],
    /// A data read failed on this node's disk during the run: a client
    /// read there may fail with `Io`.
    read_errors: [bool; 2],
    corrupt_per_mille: u64,
    dup_per_mille: u64,
    reorder_per_mille: u64,
    link_tail: [u64; 2],
    /// Event key of the last frame scheduled towards each node.
    last_frame: [Option<(u64, u64)>; 2],
    /// Frame numbering of the current connection, by sending node.
    tx: [wire::FrameEncoder; 2],
    /// Frame-number check of the current connection, by receiving node.
    rx_seq: [wire::FrameDecoder; 2],
    rx: [BytesMut; 2],
    client_on: bool,
    client_node: usize,
    client_tracked: bool,
    outstanding: BTreeMap<ClientId, (usize, u64, Req)>,
    next_client: u64,
    client_scheduled: bool,
    oracle: Oracle,
    trace: Vec<String>,
    report: SimReport,
    split_brain_expected: bool,
    safety_over: bool,
    checksum_resync: bool,
}

const TRACE_KEEP: usize = 60;

impl World {
    fn log(&mut self, s: String) {
        if self.cfg.verbose {
            eprintln!("[{:>12}] {s}", self.now);
        }
        self.trace.push(format!("[{}] {s}", self.now));
        if self.trace.len() > TRACE_KEEP * 4 {
            self.trace.drain(..self.trace.len() - TRACE_KEEP);
        }
    }

    fn fail(&self, message: String) -> SimFailure {
        let start = self.trace.len().saturating_sub(TRACE_KEEP);
        SimFailure {
            seed: self.cfg.seed,
            message: format!("at sim time {} ns: {message}", self.now),
            trace_tail: self.trace[start..].to_vec(),
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((t, self.seq), ev);
    }

    fn engine_cfg(&self, node: usize) -> EngineConfig {
        EngineConfig {
            resource: "sim".to_string(),
            node: self.nodes[node].name.to_string(),
            peer: self.nodes[1 - node].name.to_string(),
            size_bytes: self.layout.data_size_bytes,
            bitmap_block_bytes: self.layout.bitmap_block_bytes,
            protocol: ProtocolMode::C,
            secret: b"sim-secret".to_vec(),
            split_brain: SplitBrainPolicy::Disconnect,
            al_extents: SIM_AL_EXTENTS,
            meta_layout: self.layout,
            resync_rate_bytes_per_s: None,
            sim_fault: self.cfg.sim_fault,
        }
    }

    /// Read the metadata back from the simulated disk, as the daemon would.
    fn load(&mut self, node: usize) -> Result<LoadedMetadata, String> {
        let l = self.layout;
        let n = &self.nodes[node];
        let s0 = n
            .meta
            .read(l.superblock_slot_offset(0), SUPERBLOCK_SLOT_BYTES);
        let s1 = n
            .meta
            .read(l.superblock_slot_offset(1), SUPERBLOCK_SLOT_BYTES);
        let (sb, slot) =
            metadata::decode_superblocks(&s0, &s1).map_err(|e| format!("superblock: {e}"))?;
        let mut bitmap = Bitmap::new(l.data_size_bytes, l.bitmap_block_bytes)
            .map_err(|e| format!("bitmap: {e}"))?;
        for page in 0..bitmap.page_count() {
            let bytes = n
                .meta
                .read(l.bitmap_page_offset(page), BITMAP_PAGE_BYTES as u64);
            bitmap
                .load_page(page, &bytes)
                .map_err(|e| format!("bitmap page {page}: {e}"))?;
        }
        let blocks: Vec<Vec<u8>> = (0..AL_RING_TRANSACTIONS)
            .map(|i| {
                n.meta
                    .read(l.al_block_offset(i), AL_TRANSACTION_BYTES as u64)
            })
            .collect();
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let al = activity_log::recover(&refs).map_err(|e| format!("AL: {e}"))?;
        Ok(LoadedMetadata {
            superblock: sb,
            superblock_slot: slot,
            bitmap,
            al,
        })
    }

    fn start_node(&mut self, node: usize) -> Result<(), SimFailure> {
        let meta = self.load(node).map_err(|e| {
            self.fail(format!(
                "{} cannot load its metadata: {e}",
                self.nodes[node].name
            ))
        })?;
        self.log(format!(
            "{} loads: slot {} seq {} flags {:#x} uuids {:x?} bits {} AL {:?} (seq {})",
            self.nodes[node].name,
            meta.superblock_slot,
            meta.superblock.sequence,
            meta.superblock.flags.0,
            meta.superblock.uuids,
            meta.bitmap.count(),
            meta.al
                .active_extents()
                .iter()
                .map(|e| e.0)
                .collect::<Vec<_>>(),
            meta.al.last_sequence
        ));
        let seed = self.rng.next_u64();
        let cfg = self.engine_cfg(node);
        let mut engine = Engine::new(cfg, meta, seed)
            .map_err(|e| self.fail(format!("engine start failed: {e}")))?;
        engine.set_checksum_resync(self.checksum_resync);
        self.nodes[node].inc += 1;
        self.nodes[node].engine = Some(engine);
        self.nodes[node].tick_at = None;
        self.log(format!("{} started", self.nodes[node].name));
        self.feed(node, Input::Admin(AdminCommand::Connect))?;
        Ok(())
    }

    fn engine(&self, node: usize) -> Option<&Engine> {
        self.nodes[node].engine.as_ref()
    }

    /// Feed one input to a node and carry out its outputs.
    fn feed(&mut self, node: usize, input: Input) -> Result<(), SimFailure> {
        let now = Time(self.now);
        let Some(e) = self.nodes[node].engine.as_mut() else {
            return Ok(());
        };
        e.handle(now, input);
        let mut outs = Vec::new();
        while let Some(o) = e.poll_output() {
            outs.push(o);
        }
        let deadline = e.next_deadline();
        for o in outs {
            if let Output::Fatal { reason } = o {
                // The daemon exits: for its peer and its disk, a crash.
                self.log(format!("{}: FATAL {reason}", self.nodes[node].name));
                self.report.fatal_stops += 1;
                // A stopped Primary is failed over like a crashed one.
                return self.script(Action::Crash(node));
            }
            self.carry_out(node, o)?;
        }
        if let Some(d) = deadline {
            let d = d.0.max(self.now + 1);
            if self.nodes[node]
                .tick_at
                .is_none_or(|t| t > d || t < self.now)
            {
                self.nodes[node].tick_at = Some(d);
                let inc = self.nodes[node].inc;
                self.at(d, Ev::Tick { node, inc });
            }
        }
        self.maybe_connect();
        Ok(())
    }

    fn carry_out(&mut self, node: usize, o: Output) -> Result<(), SimFailure> {
        let name = self.nodes[node].name;
        match o {
            Output::Disk { op, kind } => {
                if self.cfg.verbose {
                    let what = match &kind {
                        DiskOp::Read { offset, len_bytes } => format!("read {offset}+{len_bytes}"),
                        DiskOp::Write { offset, data, fua } => {
                            format!("write {offset}+{} fua={fua}", data.len())
                        }
                        DiskOp::Zero {
                            offset, len_bytes, ..
                        } => format!("zero {offset}+{len_bytes}"),
                        DiskOp::Trim { offset, len_bytes } => format!("trim {offset}+{len_bytes}"),
                        DiskOp::Flush => "flush".to_string(),
                        DiskOp::MetaWrite { offset_bytes, data } => {
                            format!("meta {offset_bytes}+{}", data.len())
                        }
                    };
                    self.log(format!("{name}: {op:?} {what}"));
                }
                let lat = match kind {
                    DiskOp::Flush => 50_000 + self.rng.below(400_000),
                    _ => 10_000 + self.rng.below(200_000),
                };
                if let DiskOp::MetaWrite { offset_bytes, .. } = kind {
                    if self.nodes[node].crash_on_superblock_write
                        && self.is_superblock_write(offset_bytes)
                    {
                        self.nodes[node].crash_on_superblock_write = false;
                        self.at(
                            self.now + 1,
                            Ev::Script(Action::CrashTearingSuperblock(node)),
                        );
                    }
                }
                self.nodes[node].inflight.insert(op, kind);
                let inc = self.nodes[node].inc;
                self.at(self.now + lat, Ev::Disk { node, inc, op });
            }
            Output::Send(msg) => {
                let Some(epoch) = self.conn else {
                    return Ok(());
                };
                if self.partitioned {
                    return Ok(());
                }
                // A duplicate is the message sent twice by the sender's
                // transport (two numbered frames), so it reaches the engine.
                let copies = if self.dup_per_mille > 0 && self.rng.chance(self.dup_per_mille, 1000)
                {
                    self.report.frames_duplicated += 1;
                    self.log(format!("net: duplicate {name} -> {}", msg.name()));
                    2
                } else {
                    1
                };
                let to = 1 - node;
                for _ in 0..copies {
                    let mut buf = BytesMut::new();
                    self.tx[node].encode(&msg, &mut buf).map_err(|e| {
                        self.fail(format!("{name} produced an unencodable frame: {e}"))
                    })?;
                    let mut bytes = buf.to_vec();
                    if self.corrupt_per_mille > 0 && self.rng.chance(self.corrupt_per_mille, 1000) {
                        let i = self.rng.below(bytes.len() as u64) as usize;
                        bytes[i] ^= 1 << self.rng.below(8);
                        self.report.frames_corrupted += 1;
                        self.log(format!("net: corrupt {name} -> {}", msg.name()));
                    }
                    let reorder =
                        self.reorder_per_mille > 0 && self.rng.chance(self.reorder_per_mille, 1000);
                    self.send_frame(to, epoch, Bytes::from(bytes), reorder, msg.name());
                }
            }
            Output::Complete { id, result } => self.client_done(node, id, result)?,
            Output::Event(ev) => {
                if let crate::engine::Event::VerifyDone { mismatched_bytes } = ev {
                    // A disk that lost writes to errors differs, rightly.
                    if mismatched_bytes > 0 && !self.lost_writes.iter().any(|&l| l) {
                        let diff = self.describe_differences();
                        return Err(self.fail(format!(
                            "{name}: online verify found {mismatched_bytes} bytes differing between Established replicas; {diff}"
                        )));
                    }
                }
                if ev == crate::engine::Event::Disk(DiskState::UpToDate) {
                    // A resync brought back what its disk errors lost.
                    self.lost_writes[node] = false;
                }
                if let crate::engine::Event::SplitBrain { .. } = ev {
                    self.report.split_brains_seen += 1;
                    if !self.split_brain_expected {
                        return Err(self.fail(format!("{name}: unexpected split brain")));
                    }
                }
                self.log(format!("{name}: {ev:?}"));
            }
            Output::CloseLink { reason } => {
                self.log(format!("{name}: close link: {reason}"));
                self.report.links_closed += 1;
                if let Some(epoch) = self.conn.take() {
                    self.rx = [BytesMut::new(), BytesMut::new()];
                    let lat = 10_000 + self.rng.below(100_000);
                    self.at(
                        self.now + lat,
                        Ev::LinkDown {
                            node: 1 - node,
                            epoch,
                        },
                    );
                }
            }
            Output::AdminResult(r) => {
                if let Err(e) = r {
                    self.log(format!("{name}: admin refused: {e}"));
                }
            }
            Output::Fatal { .. } => unreachable!("handled in feed"),
        }
        Ok(())
    }

    /// Put a frame on the link towards `to`, behind the frames already in
    /// flight; with `reorder`, swap it with the frame just ahead of it if
    /// that one is still in flight (it then arrives first).
    fn send_frame(&mut self, to: usize, epoch: u64, bytes: Bytes, reorder: bool, what: &str) {
        if reorder {
            if let Some(prev) = self.last_frame[to].filter(|k| self.events.contains_key(k)) {
                let ev = self.events.remove(&prev).expect("checked");
                self.report.frames_reordered += 1;
                self.log(format!(
                    "net: reorder {what} ahead of the frame before it -> {}",
                    self.nodes[to].name
                ));
                self.at(prev.0, Ev::Frame { to, epoch, bytes });
                self.at(prev.0, ev);
                self.last_frame[to] = Some((prev.0, self.seq));
                return;
            }
        }
        let lat = 20_000 + self.rng.below(500_000);
        let t = (self.now + lat).max(self.link_tail[to] + 1);
        self.link_tail[to] = t;
        self.at(t, Ev::Frame { to, epoch, bytes });
        self.last_frame[to] = Some((t, self.seq));
    }

    fn maybe_connect(&mut self) {
        if self.conn.is_some() || self.connect_pending || self.partitioned {
            return;
        }
        let want = |n: &Node| n.engine.as_ref().is_some_and(|e| e.wants_connection());
        if want(&self.nodes[0]) && want(&self.nodes[1]) {
            self.connect_pending = true;
            self.next_epoch += 1;
            let epoch = self.next_epoch;
            let lat = 1_000_000 + self.rng.below(5_000_000);
            self.at(self.now + lat, Ev::Connect { epoch });
        }
    }

    fn link_down_both(&mut self) -> Result<(), SimFailure> {
        if let Some(epoch) = self.conn.take() {
            self.rx = [BytesMut::new(), BytesMut::new()];
            self.log(format!("net: link {epoch} down"));
            for n in 0..2 {
                self.feed(n, Input::Disconnected)?;
            }
        }
        Ok(())
    }

    fn step(&mut self, ev: Ev) -> Result<(), SimFailure> {
        match ev {
            Ev::Disk { node, inc, op } => {
                if self.nodes[node].inc != inc || self.nodes[node].engine.is_none() {
                    return Ok(());
                }
                let Some(kind) = self.nodes[node].inflight.remove(&op) else {
                    return Ok(());
                };
                let n = &mut self.nodes[node];
                // A failing disk: data writes fail (ENOSPC) and change
                // nothing; a flush fails (EIO) and loses the writes it
                // should have made durable; metadata writes fail (EIO).
                let error = match (n.failing, &kind) {
                    (
                        Some(DiskFault::DataWrites),
                        DiskOp::Write { .. } | DiskOp::Zero { .. } | DiskOp::Trim { .. },
                    ) => {
                        self.report.disk_write_errors += 1;
                        self.lost_writes[node] = true;
                        Some(28)
                    }
                    (Some(DiskFault::Flushes), DiskOp::Flush) => {
                        self.report.disk_flush_errors += 1;
                        self.lost_writes[node] |= n.data.lose_unflushed();
                        Some(5)
                    }
                    (Some(DiskFault::MetaWrites), DiskOp::MetaWrite { .. }) => {
                        self.report.meta_write_errors += 1;
                        Some(5)
                    }
                    (Some(DiskFault::DataReads), DiskOp::Read { .. }) => {
                        self.report.disk_read_errors += 1;
                        self.read_errors[node] = true;
                        Some(5)
                    }
                    _ => None,
                };
                if let Some(code) = error {
                    let name = self.nodes[node].name;
                    self.log(format!("{name}: {op:?} FAILED with errno {code}"));
                    return self.feed(
                        node,
                        Input::DiskDone {
                            op,
                            result: Err(crate::engine::DiskError { code }),
                        },
                    );
                }
                let result = match kind {
                    DiskOp::Read { offset, len_bytes } => {
                        Bytes::from(n.data.read(offset, u64::from(len_bytes)))
                    }
                    DiskOp::Write { offset, data, fua } => {
                        n.data.write(offset, &data, fua);
                        Bytes::new()
                    }
                    DiskOp::Zero {
                        offset,
                        len_bytes,
                        fua,
                    } => {
                        n.data.write(offset, &vec![0u8; len_bytes as usize], fua);
                        Bytes::new()
                    }
                    DiskOp::Trim { offset, len_bytes } => {
                        n.data.write(offset, &vec![0u8; len_bytes as usize], false);
                        Bytes::new()
                    }
                    DiskOp::Flush => {
                        n.data.flush();
                        Bytes::new()
                    }
                    DiskOp::MetaWrite { offset_bytes, data } => {
                        n.meta.write(offset_bytes, &data, true);
                        Bytes::new()
                    }
                };
                self.feed(
                    node,
                    Input::DiskDone {
                        op,
                        result: Ok(result),
                    },
                )?;
            }
            Ev::Frame { to, epoch, bytes } => {
                if self.conn != Some(epoch) || self.nodes[to].engine.is_none() {
                    return Ok(());
                }
                self.rx[to].extend_from_slice(&bytes);
                loop {
                    let decoded = if self.cfg.sim_fault == SimFault::IgnoreFrameOrder {
                        wire::decode(&mut self.rx[to])
                    } else {
                        self.rx_seq[to].decode(&mut self.rx[to])
                    };
                    match decoded {
                        Ok(Some(msg)) => {
                            if self.cfg.verbose {
                                let what = match &msg {
                                    wire::Message::State { .. } => format!("{msg:?}"),
                                    _ => msg.name().to_string(),
                                };
                                self.log(format!("{} <- {what}", self.nodes[to].name));
                            }
                            self.feed(to, Input::PeerFrame(msg))?;
                            if self.conn != Some(epoch) {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            if matches!(e, wire::WireError::OutOfOrder { .. }) {
                                self.report.order_errors_detected += 1;
                            }
                            self.log(format!("{}: frame error {e}", self.nodes[to].name));
                            self.rx[to].clear();
                            self.feed(to, Input::PeerFrameError(e))?;
                            break;
                        }
                    }
                }
            }
            Ev::Connect { epoch } => {
                self.connect_pending = false;
                let want = |n: &Node| n.engine.as_ref().is_some_and(|e| e.wants_connection());
                if self.partitioned || !(want(&self.nodes[0]) && want(&self.nodes[1])) {
                    self.maybe_connect();
                    return Ok(());
                }
                self.conn = Some(epoch);
                self.link_tail = [self.now, self.now];
                self.last_frame = [None, None];
                self.tx = Default::default();
                self.rx_seq = Default::default();
                self.log(format!("net: link {epoch} up"));
                self.feed(0, Input::Connected)?;
                if self.conn == Some(epoch) {
                    self.feed(1, Input::Connected)?;
                }
            }
            Ev::LinkDown { node, epoch } => {
                let _ = epoch;
                self.feed(node, Input::Disconnected)?;
            }
            Ev::Tick { node, inc } => {
                if self.nodes[node].inc == inc {
                    self.nodes[node].tick_at = None;
                    self.feed(node, Input::Tick)?;
                }
            }
            Ev::Client => {
                self.client_scheduled = false;
                self.client_step()?;
            }
            Ev::Script(a) => self.script(a)?,
        }
        Ok(())
    }

    // ----- client -----

    fn schedule_client(&mut self) {
        if self.client_on && !self.client_scheduled {
            self.client_scheduled = true;
            let t = self.now + 20_000 + self.rng.below(300_000);
            self.at(t, Ev::Client);
        }
    }

    fn client_step(&mut self) -> Result<(), SimFailure> {
        let node = self.client_node;
        let is_primary = self
            .engine(node)
            .is_some_and(|e| e.role() == NodeRole::Primary);
        if !self.client_on || !is_primary {
            return Ok(());
        }
        if self.outstanding.len() < SIM_CLIENT_MAX_OUTSTANDING {
            let id = ClientId(self.next_client);
            self.next_client += 1;
            let epoch = self.conn_if_established(node);
            let roll = self.rng.below(100);
            let region = self.rng.below(SIM_HOT_REGIONS);
            let base = region * (self.layout.data_size_bytes / SIM_HOT_REGIONS);
            let sectors = 1 + self.rng.below(SIM_MAX_WRITE_BYTES / ORACLE_SECTOR_BYTES);
            let len = sectors * ORACLE_SECTOR_BYTES;
            let within = self
                .rng
                .below((SIM_HOT_REGION_BYTES - len) / ORACLE_SECTOR_BYTES + 1);
            let offset = base + within * ORACLE_SECTOR_BYTES;
            let (req, request) = if roll < 65 {
                let fua = self.rng.chance(1, 10);
                let wid = self.oracle.submit(offset, len, false, self.client_tracked);
                let data = Bytes::from(self.oracle.data_for(wid));
                (
                    Req::Write { wid, fua, epoch },
                    ClientRequest::Write { offset, data, fua },
                )
            } else if roll < 70 {
                let wid = self.oracle.submit(offset, len, true, self.client_tracked);
                (
                    Req::Write {
                        wid,
                        fua: false,
                        epoch,
                    },
                    ClientRequest::WriteZeroes {
                        offset,
                        len_bytes: len as u32,
                        fua: false,
                    },
                )
            } else if roll < 88 {
                let floors = self.oracle.floors(offset, len);
                (
                    Req::Read {
                        offset,
                        len,
                        floors,
                    },
                    ClientRequest::Read {
                        offset,
                        len_bytes: len as u32,
                    },
                )
            } else {
                let snapshot = self.oracle.acked.clone();
                (Req::Flush { snapshot, epoch }, ClientRequest::Flush)
            };
            let inc = self.nodes[node].inc;
            self.outstanding.insert(id, (node, inc, req));
            self.feed(node, Input::Client { id, request })?;
        }
        self.schedule_client();
        Ok(())
    }

    /// The connection epoch if `node` is replicating to a peer that is
    /// Established (its floors may be raised by flushes and FUA).
    fn conn_if_established(&self, node: usize) -> Option<u64> {
        let e = self.engine(node)?;
        let p = self.engine(1 - node)?;
        let st = e.status();
        let ok = st.replication == ReplState::Established
            && p.status().replication == ReplState::Established
            && p.disk_state() == DiskState::UpToDate;
        if ok {
            self.conn
        } else {
            None
        }
    }

    fn client_done(
        &mut self,
        node: usize,
        id: ClientId,
        result: Result<Bytes, crate::engine::ClientError>,
    ) -> Result<(), SimFailure> {
        let Some((n, _inc, req)) = self.outstanding.remove(&id) else {
            return Err(self.fail(format!("completion for unknown client request {id:?}")));
        };
        if n != node {
            return Err(self.fail(format!("{id:?} completed by the wrong node")));
        }
        let name = self.nodes[node].name;
        let data = match result {
            Ok(d) => d,
            Err(e) => {
                // Errors are legal only as NotPrimary after a demotion, and
                // as Io for a read on a disk whose reads failed.
                let failed_read = e == crate::engine::ClientError::Io
                    && self.read_errors[node]
                    && matches!(req, Req::Read { .. });
                if e == crate::engine::ClientError::NotPrimary || failed_read {
                    return Ok(());
                }
                return Err(self.fail(format!("{name}: client request {id:?} failed: {e:?}")));
            }
        };
        match req {
            Req::Write { wid, fua, epoch } => {
                self.report.writes_acked += 1;
                let secs = self.oracle.acked(wid);
                if fua {
                    let still = epoch.is_some() && self.conn_if_established(node) == epoch;
                    for s in secs {
                        raise(&mut self.nodes[node].durable_floor, s, wid);
                        if still {
                            raise(&mut self.nodes[1 - node].durable_floor, s, wid);
                        }
                    }
                }
            }
            Req::Read {
                offset,
                len,
                floors,
            } => {
                self.report.reads_checked += 1;
                if data.len() as u64 != len {
                    return Err(self.fail(format!("{name}: read returned {} bytes", data.len())));
                }
                self.oracle
                    .check(
                        offset,
                        &data,
                        &floors,
                        &format!("{name} read {offset}+{len}"),
                    )
                    .map_err(|e| self.fail(e))?;
            }
            Req::Flush { snapshot, epoch } => {
                self.report.flushes_acked += 1;
                let still = epoch.is_some() && self.conn_if_established(node) == epoch;
                for (&s, &w) in &snapshot {
                    raise(&mut self.nodes[node].durable_floor, s, w);
                    if still {
                        raise(&mut self.nodes[1 - node].durable_floor, s, w);
                    }
                }
            }
        }
        Ok(())
    }

    // ----- faults -----

    fn crash(&mut self, node: usize) -> Result<(), SimFailure> {
        if self.nodes[node].engine.is_none() {
            return Ok(());
        }
        self.report.crashes += 1;
        let name = self.nodes[node].name;
        self.log(format!("CRASH {name}"));
        // A crash before its Inconsistent superblock was durable brings the
        // node back looking UpToDate; its peer marked the writes it never
        // acknowledged, and a failover is only tried to an Established
        // peer, which has resynced them.
        self.lost_writes[node] = false;
        let inflight = std::mem::take(&mut self.nodes[node].inflight);
        let tear = std::mem::take(&mut self.nodes[node].tear_next_meta);
        for (_, op) in inflight {
            if let DiskOp::MetaWrite { offset_bytes, data } = op {
                let slot = self.is_superblock_write(offset_bytes);
                if (tear && slot) || self.rng.chance(1, 4) {
                    let (n, rng) = (&mut self.nodes[node], &mut self.rng);
                    n.meta.torn_write(offset_bytes, &data, tear && slot, rng);
                    if tear && slot {
                        self.report.torn_superblock_writes += 1;
                        self.log(format!("{name}: superblock write at {offset_bytes} torn"));
                    }
                }
            }
        }
        let n = &mut self.nodes[node];
        n.engine = None;
        n.inc += 1;
        n.data.crash(&mut self.rng);
        n.meta.crash(&mut self.rng);
        // Client requests on the crashed node are lost (never acknowledged).
        self.outstanding.retain(|_, (n, _, _)| *n != node);
        // Durability: everything flushed must have survived.
        let floor = self.nodes[node].durable_floor.clone();
        for (&s, &w) in &floor {
            let off = s * ORACLE_SECTOR_BYTES;
            let bytes = self.nodes[node].data.read(off, ORACLE_SECTOR_BYTES);
            let mut one = Floors::new();
            one.insert(s, w);
            self.oracle
                .check(
                    off,
                    &bytes,
                    &one,
                    &format!("{name} after crash (flushed data)"),
                )
                .map_err(|e| self.fail(e))?;
        }
        self.link_down_both()?;
        Ok(())
    }

    fn script(&mut self, a: Action) -> Result<(), SimFailure> {
        self.log(format!("script: {a:?}"));
        match a {
            Action::Crash(n) => {
                let was_primary = self
                    .engine(n)
                    .is_some_and(|e| e.role() == NodeRole::Primary);
                let peer_established = self.conn_if_established(n).is_some();
                // A peer that lost writes to disk errors must refuse to
                // take over, whatever state it shows.
                let peer_lost = self.lost_writes[1 - n] && self.engine(1 - n).is_some();
                self.crash(n)?;
                if was_primary && (peer_established || peer_lost) && !self.split_brain_expected {
                    self.failover(1 - n)?;
                } else if n == self.client_node {
                    self.forget_unflushed(n);
                }
            }
            Action::CrashTearingSuperblock(n) => {
                let in_flight = self.nodes[n].inflight.values().any(|op| {
                    matches!(op, DiskOp::MetaWrite { offset_bytes, .. }
                        if self.is_superblock_write(*offset_bytes))
                });
                if !in_flight {
                    // Crash at the node's next superblock write instead;
                    // not once the healed phase began (EndSafety calls off
                    // such crashes): that write may come after the planned
                    // restart, and the node would stay down.
                    if !self.safety_over {
                        self.nodes[n].crash_on_superblock_write = true;
                    }
                    return Ok(());
                }
                self.nodes[n].tear_next_meta = true;
                self.crash(n)?;
                if n == self.client_node {
                    self.forget_unflushed(n);
                }
            }
            Action::Restart(n) => {
                if self.nodes[n].engine.is_none() {
                    // The disk state after restart is what a crash left.
                    self.nodes[n].inflight.clear();
                    self.start_node(n)?;
                    self.ensure_primary()?;
                }
            }
            Action::FailDisk(n, fault) => self.nodes[n].failing = fault,
            Action::SecondaryDiskFaults(fault) => {
                let n = 1 - self.client_node;
                if self
                    .engine(n)
                    .is_some_and(|e| e.role() == NodeRole::Secondary)
                {
                    self.nodes[n].failing = Some(fault);
                }
            }
            Action::DiskFaultsOff => {
                let mut stopped = Vec::new();
                for (i, n) in self.nodes.iter_mut().enumerate() {
                    let fault = n.failing.take();
                    if fault == Some(DiskFault::MetaWrites) && n.engine.is_none() {
                        stopped.push(i);
                    }
                }
                for n in stopped {
                    self.script(Action::Restart(n))?;
                }
                // The operator's repair once the disk is sound.
                self.script(Action::OperatorResync(OPERATOR_RESYNC_TRIES))?;
            }
            Action::OperatorResync(tries) => {
                let busy = (0..2).any(|n| {
                    self.engine(n).is_some_and(|e| {
                        !matches!(
                            e.status().replication,
                            ReplState::Established | ReplState::Off
                        )
                    })
                });
                if busy && tries > 0 {
                    self.at(
                        self.now + 10_000_000,
                        Ev::Script(Action::OperatorResync(tries - 1)),
                    );
                    return Ok(());
                }
                // A no-op for a pair in sync.
                for n in 0..2 {
                    if self.engine(n).is_some() {
                        self.feed(n, Input::Admin(AdminCommand::StartResync))?;
                    }
                }
            }
            Action::Partition => {
                self.partitioned = true;
                self.link_down_both()?;
            }
            Action::Heal => {
                self.partitioned = false;
                self.maybe_connect();
            }
            Action::Promote(n) => {
                // The client stays with its node (a split-brain second
                // Primary only gets untracked writes).
                self.feed(n, Input::Admin(AdminCommand::Primary { force: false }))?;
            }
            Action::Switchover => {
                let p = self.client_node;
                if self.conn_if_established(p).is_some() {
                    self.feed(p, Input::Admin(AdminCommand::Secondary))?;
                    // The peer learns of the demotion by a State frame.
                    self.at(
                        self.now + 5_000_000,
                        Ev::Script(Action::FinishSwitchover(1 - p)),
                    );
                }
            }
            Action::FinishSwitchover(n) => {
                let st = self.engine(n).map(|e| e.status());
                let ready = st.as_ref().is_some_and(|s| {
                    s.peer_role == Some(NodeRole::Secondary)
                        && s.disk == DiskState::UpToDate
                        && s.replication == ReplState::Established
                });
                if ready {
                    self.feed(n, Input::Admin(AdminCommand::Primary { force: false }))?;
                    if self
                        .engine(n)
                        .is_some_and(|e| e.role() != NodeRole::Primary)
                    {
                        return Err(self.fail(format!(
                            "switchover: in-sync peer refused promotion: {st:?}"
                        )));
                    }
                    self.client_node = n;
                } else {
                    // The link moved meanwhile: the old Primary takes it back.
                    self.ensure_primary()?;
                }
            }
            Action::UntrackedWrites(n, count) => {
                for _ in 0..count {
                    let id = ClientId(self.next_client);
                    self.next_client += 1;
                    let offset = self.rng.below(SIM_HOT_REGIONS)
                        * (self.layout.data_size_bytes / SIM_HOT_REGIONS);
                    let wid = self
                        .oracle
                        .submit(offset, ORACLE_SECTOR_BYTES, false, false);
                    let data = Bytes::from(self.oracle.data_for(wid));
                    let inc = self.nodes[n].inc;
                    self.outstanding.insert(
                        id,
                        (
                            n,
                            inc,
                            Req::Write {
                                wid,
                                fua: false,
                                epoch: None,
                            },
                        ),
                    );
                    self.feed(
                        n,
                        Input::Client {
                            id,
                            request: ClientRequest::Write {
                                offset,
                                data,
                                fua: false,
                            },
                        },
                    )?;
                }
            }
            Action::Admin(n, cmd) => self.feed(n, Input::Admin(cmd))?,
            Action::NetFaults {
                corrupt,
                duplicate,
                reorder,
            } => {
                self.corrupt_per_mille = corrupt;
                self.dup_per_mille = duplicate;
                self.reorder_per_mille = reorder;
            }
            Action::EndSafety => {
                self.safety_over = true;
                for n in &mut self.nodes {
                    n.crash_on_superblock_write = false;
                }
                self.client_on = false;
            }
        }
        self.schedule_client();
        Ok(())
    }

    /// The client's Primary crashed and nobody took over: it comes back
    /// with what it had flushed, and its AL extents are resynced from it, so
    /// acknowledged writes that were never flushed may be gone (ordinary
    /// block-device semantics). From now on only flushed writes are owed.
    fn forget_unflushed(&mut self, n: usize) {
        let floor = self.nodes[n].durable_floor.clone();
        self.log(format!(
            "oracle: {} crashed without failover; owing only its {} flushed sectors",
            self.nodes[n].name,
            floor.len()
        ));
        self.oracle.acked = floor.clone();
        let other = &mut self.nodes[1 - n].durable_floor;
        other.retain(|s, w| match floor.get(s) {
            Some(f) => {
                *w = (*w).min(*f);
                true
            }
            None => false,
        });
    }

    /// If nobody is Primary, the client's node takes the role back (after a
    /// restart of a Primary that had no in-sync peer to fail over to).
    fn ensure_primary(&mut self) -> Result<(), SimFailure> {
        let any = (0..2).any(|n| {
            self.engine(n)
                .is_some_and(|e| e.role() == NodeRole::Primary)
        });
        let p = self.client_node;
        if !any && self.engine(p).is_some() {
            self.feed(p, Input::Admin(AdminCommand::Primary { force: false }))?;
            if self
                .engine(p)
                .is_some_and(|e| e.role() != NodeRole::Primary)
            {
                let st = self.engine(p).map(|e| e.status());
                return Err(self.fail(format!("restarted primary refused promotion: {st:?}")));
            }
        }
        Ok(())
    }

    /// Promote the surviving node after the Primary crashed; it must hold
    /// every acknowledged write.
    fn failover(&mut self, n: usize) -> Result<(), SimFailure> {
        let name = self.nodes[n].name;
        let disk = self.engine(n).map(Engine::disk_state);
        self.feed(n, Input::Admin(AdminCommand::Primary { force: false }))?;
        let promoted = self
            .engine(n)
            .is_some_and(|e| e.role() == NodeRole::Primary);
        if self.lost_writes[n] {
            // Its disk lost writes the Primary acknowledged: promoting it
            // unforced would lose them, so the engine must refuse; the
            // client waits for its node to return.
            if promoted {
                return Err(self.fail(format!(
                    "failover: {name} lost acknowledged writes to disk errors, yet was \
                     promoted unforced (disk {disk:?})"
                )));
            }
            self.report.failovers_refused += 1;
            self.forget_unflushed(1 - n);
            self.log(format!("failover to {name} refused: its disk lost writes"));
            return Ok(());
        }
        self.report.failovers += 1;
        if !promoted {
            return Err(self.fail(format!(
                "failover: {name} (UpToDate, was connected) refused promotion"
            )));
        }
        let acked: Vec<(u64, u64)> = self.oracle.acked.iter().map(|(&s, &w)| (s, w)).collect();
        for (s, w) in acked {
            let off = s * ORACLE_SECTOR_BYTES;
            let bytes = self.nodes[n].data.read(off, ORACLE_SECTOR_BYTES);
            let mut one = Floors::new();
            one.insert(s, w);
            self.oracle
                .check(off, &bytes, &one, &format!("{name} after failover"))
                .map_err(|e| self.fail(e))?;
        }
        self.client_node = n;
        self.log(format!("failover to {name} verified"));
        Ok(())
    }

    // ----- invariants -----

    fn is_superblock_write(&self, offset_bytes: u64) -> bool {
        let start = self.layout.superblock_offset_bytes;
        (start..start + 2 * SUPERBLOCK_SLOT_BYTES).contains(&offset_bytes)
    }

    fn check_invariants(&self) -> Result<(), SimFailure> {
        let (a, b) = (self.engine(0), self.engine(1));
        if let (Some(a), Some(b)) = (a, b) {
            let (sa, sb) = (a.status(), b.status());
            if sa.role == NodeRole::Primary
                && sb.role == NodeRole::Primary
                && (sa.replication != ReplState::Off || sb.replication != ReplState::Off)
            {
                return Err(self.fail("two Primaries replicating to each other".to_string()));
            }
            if self.split_brain_expected
                && sa.role == NodeRole::Primary
                && sb.role == NodeRole::Primary
                && (sa.connection == ConnState::Connected && sa.replication != ReplState::Off)
            {
                return Err(self.fail("split brain silently merged".to_string()));
            }
        }
        for n in 0..2 {
            if let Some(e) = self.engine(n) {
                let st = e.status();
                if st.role == NodeRole::Primary && st.disk != DiskState::UpToDate {
                    return Err(self.fail(format!(
                        "{} is Primary with a {} disk",
                        self.nodes[n].name, st.disk
                    )));
                }
                if e.pending_client_requests() > crate::engine::MAX_CLIENT_REQUESTS {
                    return Err(self.fail("client queue above its bound".to_string()));
                }
            }
        }
        Ok(())
    }

    /// Both up, connected, Established, nothing out of sync, nothing pending.
    fn converged(&self) -> bool {
        let (Some(a), Some(b)) = (self.engine(0), self.engine(1)) else {
            return false;
        };
        let (sa, sb) = (a.status(), b.status());
        self.outstanding.is_empty()
            && sa.replication == ReplState::Established
            && sb.replication == ReplState::Established
            && sa.out_of_sync_bytes == 0
            && sb.out_of_sync_bytes == 0
            && sa.disk == DiskState::UpToDate
            && sb.disk == DiskState::UpToDate
            && a.pending_disk_ops() == 0
            && b.pending_disk_ops() == 0
    }

    /// The first differing pages of the two replicas, with the write id each
    /// side holds in the first differing sector.
    fn describe_differences(&self) -> String {
        let diff = self.nodes[0].data.differing_pages(&self.nodes[1].data);
        let mut out = format!("{} pages differ", diff.len());
        for page in diff.iter().take(4) {
            let off = page * disk::SIM_PAGE_BYTES;
            for k in 0..disk::SIM_PAGE_BYTES / ORACLE_SECTOR_BYTES {
                let so = off + k * ORACLE_SECTOR_BYTES;
                let a = self.nodes[0].data.read(so, ORACLE_SECTOR_BYTES);
                let b = self.nodes[1].data.read(so, ORACLE_SECTOR_BYTES);
                if a != b {
                    out.push_str(&format!(
                        "; byte {so}: alpha {:?} bravo {:?}",
                        oracle::decode_sector(&a, so),
                        oracle::decode_sector(&b, so)
                    ));
                    break;
                }
            }
        }
        out
    }

    fn final_check(&mut self) -> Result<(), SimFailure> {
        let diff = self.nodes[0].data.differing_pages(&self.nodes[1].data);
        if !diff.is_empty() {
            let d = self.describe_differences();
            return Err(self.fail(format!("replicas differ after convergence: {d}")));
        }
        let p = self.client_node;
        let name = self.nodes[p].name;
        let acked: Vec<(u64, u64)> = self.oracle.acked.iter().map(|(&s, &w)| (s, w)).collect();
        for (s, w) in acked {
            let off = s * ORACLE_SECTOR_BYTES;
            let bytes = self.nodes[p].data.read(off, ORACLE_SECTOR_BYTES);
            let mut one = Floors::new();
            one.insert(s, w);
            self.oracle
                .check(off, &bytes, &one, &format!("{name} at the end"))
                .map_err(|e| self.fail(e))?;
        }
        let touched: Vec<u64> = self.oracle.touched_sectors().collect();
        for s in touched {
            let off = s * ORACLE_SECTOR_BYTES;
            let bytes = self.nodes[p].data.read(off, ORACLE_SECTOR_BYTES);
            oracle::decode_sector(&bytes, off).map_err(|e| self.fail(e))?;
        }
        Ok(())
    }
}

fn raise(f: &mut Floors, s: u64, w: u64) {
    let e = f.entry(s).or_insert(0);
    *e = (*e).max(w);
}

fn new_node(name: &'static str, layout: &MetadataLayout) -> Result<Node, String> {
    let mut meta = SimDisk::new(layout.metadata_bytes);
    let created =
        metadata::create(layout, "sim", name, SIM_AL_EXTENTS).map_err(|e| e.to_string())?;
    for w in created.writes {
        match w {
            MetadataWrite::Data {
                offset_bytes,
                bytes,
            } => meta.write(offset_bytes, &bytes, true),
            MetadataWrite::Zero {
                offset_bytes,
                len_bytes,
            } => meta.write(offset_bytes, &vec![0u8; len_bytes as usize], true),
        }
    }
    meta.flush();
    Ok(Node {
        name,
        engine: None,
        data: SimDisk::new(layout.data_size_bytes),
        meta,
        inc: 0,
        inflight: BTreeMap::new(),
        tick_at: None,
        durable_floor: Floors::new(),
        tear_next_meta: false,
        crash_on_superblock_write: false,
        failing: None,
    })
}

/// Run one simulation.
pub fn run(cfg: &SimConfig) -> Result<SimReport, SimFailure> {
    let mut rng = SplitMix64::new(cfg.seed);
    let layout = MetadataLayout::external(
        SIM_DISK_BYTES,
        64 * 1024 * 1024,
        crate::bitmap::DEFAULT_BITMAP_BLOCK_BYTES,
        SIM_AL_EXTENTS,
    )
    .expect("valid sim geometry");
    let mk = |name| {
        new_node(name, &layout).map_err(|e| SimFailure {
            seed: cfg.seed,
            message: format!("create-md failed: {e}"),
            trace_tail: Vec::new(),
        })
    };
    let nodes = [mk("alpha")?, mk("bravo")?];
    let mut w = World {
        rng: SplitMix64::new(rng.next_u64()),
        cfg: cfg.clone(),
        now: 0,
        seq: 0,
        events: BTreeMap::new(),
        nodes,
        layout,
        conn: None,
        next_epoch: 0,
        connect_pending: false,
        partitioned: false,
        lost_writes: [false; 2],
        read_errors: [false; 2],
        corrupt_per_mille: 0,
        dup_per_mille: 0,
        reorder_per_mille: 0,
        link_tail: [0, 0],
        last_frame: [None, None],
        tx: Default::default(),
        rx_seq: Default::default(),
        rx: [BytesMut::new(), BytesMut::new()],
        client_on: false,
        client_node: 0,
        client_tracked: true,
        outstanding: BTreeMap::new(),
        next_client: 1,
        client_scheduled: false,
        oracle: Oracle::new(),
        trace: Vec::new(),
        report: SimReport::default(),
        split_brain_expected: cfg.scenario == Scenario::SplitBrainBothPromoted,
        safety_over: false,
        checksum_resync: false,
    };
    // Half the runs resync by checksum (digest first, data where different).
    w.checksum_resync = rng.chance(1, 2);
    w.start_node(0)?;
    w.start_node(1)?;
    // Bring the pair up: connect, then either skip the initial sync of the
    // two empty disks or force-promote alpha and sync everything.
    w.run_until(|w| w.both_established(), 10_000_000_000, "initial connect")?;
    let full_initial_sync = rng.chance(1, 4) && cfg.scenario == Scenario::Random;
    if full_initial_sync {
        w.feed(0, Input::Admin(AdminCommand::Primary { force: true }))?;
    } else {
        w.feed(
            0,
            Input::Admin(AdminCommand::NewCurrentUuid { clear_bitmap: true }),
        )?;
        w.run_until(
            |w| {
                w.engine(1)
                    .is_some_and(|e| e.disk_state() == DiskState::UpToDate)
            },
            10_000_000_000,
            "clear-bitmap adoption",
        )?;
        w.feed(0, Input::Admin(AdminCommand::Primary { force: false }))?;
    }
    if w.engine(0).map(|e| e.role()) != Some(NodeRole::Primary) {
        return Err(w.fail("alpha could not be promoted at start".to_string()));
    }
    w.client_node = 0;
    w.client_on = true;
    w.schedule_client();
    let start = w.now;
    plan(&mut w, &mut rng, start);
    w.run_until(
        |w| w.safety_over,
        cfg.safety_ns * 4 + 1_000_000_000,
        "safety phase",
    )?;
    // Healed phase: no faults, everything restarted, one Primary.
    w.corrupt_per_mille = 0;
    w.dup_per_mille = 0;
    w.reorder_per_mille = 0;
    w.partitioned = false;
    for n in 0..2 {
        if w.nodes[n].engine.is_none() {
            w.nodes[n].inflight.clear();
            w.start_node(n)?;
        }
    }
    if w.split_brain_expected {
        w.resolve_split_brain()?;
    }
    w.ensure_primary()?;
    for n in 0..2 {
        if w.engine(n)
            .is_some_and(|e| e.status().connection == ConnState::StandAlone)
        {
            w.feed(n, Input::Admin(AdminCommand::Connect))?;
        }
    }
    w.maybe_connect();
    let deadline = SIM_CONVERGE_DEADLINE_NS;
    w.run_until(|w| w.converged(), deadline, "convergence")?;
    w.final_check()?;
    w.report.events = w.seq;
    w.report.sim_time_ns = w.now;
    Ok(w.report.clone())
}

impl World {
    fn both_established(&self) -> bool {
        (0..2).all(|n| {
            self.engine(n)
                .is_some_and(|e| e.status().replication == ReplState::Established)
        })
    }

    /// Process events until `done` holds; fail if the budget runs out.
    fn run_until(
        &mut self,
        done: impl Fn(&World) -> bool,
        budget_ns: u64,
        what: &str,
    ) -> Result<(), SimFailure> {
        let deadline = self.now + budget_ns;
        let mut steps = 0u64;
        while !done(self) {
            let Some((&(t, s), _)) = self.events.iter().next() else {
                return Err(self.fail(format!("{what}: nothing left to happen")));
            };
            if t > deadline {
                let st: Vec<String> = (0..2)
                    .map(|n| match self.engine(n) {
                        Some(e) => format!("{}: {:?}", self.nodes[n].name, e.status()),
                        None => format!("{}: down", self.nodes[n].name),
                    })
                    .collect();
                return Err(self.fail(format!("{what}: not reached in time; {}", st.join("; "))));
            }
            let ev = self.events.remove(&(t, s)).expect("peeked");
            self.now = self.now.max(t);
            self.step(ev)?;
            self.check_invariants()?;
            steps += 1;
            if steps > SIM_MAX_EVENTS {
                return Err(self.fail(format!("{what}: event budget exhausted")));
            }
        }
        Ok(())
    }

    /// Split-brain scenario: the split must have been detected, the link
    /// must be down, and nothing overwritten. Then the operator discards
    /// bravo's changes (secondary + invalidate) and reconnects.
    fn resolve_split_brain(&mut self) -> Result<(), SimFailure> {
        self.client_on = false;
        let quiet = |w: &World| {
            w.outstanding.is_empty()
                && (0..2).all(|n| w.engine(n).is_some_and(|e| e.pending_disk_ops() == 0))
        };
        self.run_until(
            |w| w.report.split_brains_seen > 0 && quiet(w),
            20_000_000_000,
            "split-brain detection",
        )?;
        let before = [self.nodes[0].data.digest(), self.nodes[1].data.digest()];
        let seen = self.report.split_brains_seen;
        // The operator retries connecting: it must be refused again.
        for n in 0..2 {
            self.feed(n, Input::Admin(AdminCommand::Connect))?;
        }
        self.run_until(
            |w| w.report.split_brains_seen > seen && quiet(w) && w.conn.is_none(),
            20_000_000_000,
            "split brain detected again",
        )?;
        let mut reported = false;
        for n in 0..2 {
            let st = self.engine(n).map(|e| e.status());
            if st.as_ref().is_some_and(|s| s.replication != ReplState::Off) {
                return Err(self.fail(format!("split brain: link came up anyway: {st:?}")));
            }
            reported |= st.is_some_and(|s| s.split_brain);
        }
        if !reported {
            return Err(self.fail("split brain not reported in status".to_string()));
        }
        let after = [self.nodes[0].data.digest(), self.nodes[1].data.digest()];
        if before != after {
            return Err(self.fail("split brain: data overwritten automatically".to_string()));
        }
        self.feed(1, Input::Admin(AdminCommand::Secondary))?;
        self.feed(1, Input::Admin(AdminCommand::Invalidate))?;
        self.client_node = 0;
        Ok(())
    }
}

/// Lay out the fault script of a scenario.
fn plan(w: &mut World, rng: &mut SplitMix64, start: u64) {
    let t = |frac_per_mille: u64| start + w.cfg.safety_ns * frac_per_mille / 1000;
    let mut s: Vec<(u64, Action)> = Vec::new();
    let scenario = w.cfg.scenario;
    match scenario {
        Scenario::PrimaryCrashMidWrite => {
            s.push((t(500), Action::Crash(0)));
            s.push((t(800), Action::Restart(0)));
        }
        Scenario::SecondaryCrash => {
            s.push((t(300), Action::Crash(1)));
            s.push((t(600), Action::Restart(1)));
        }
        Scenario::PartitionThenHeal => {
            s.push((t(200), Action::Partition));
            s.push((t(600), Action::Heal));
        }
        Scenario::PartitionDuringResync => {
            s.push((t(100), Action::Partition));
            s.push((t(400), Action::Heal));
            s.push((t(420), Action::Partition));
            s.push((t(600), Action::Heal));
            s.push((t(610), Action::Partition));
            s.push((t(800), Action::Heal));
        }
        Scenario::CorruptAndDuplicatedFrames => {
            s.push((
                t(0),
                Action::NetFaults {
                    corrupt: 3,
                    duplicate: 3,
                    reorder: 0,
                },
            ));
        }
        Scenario::ReorderedFrames => {
            s.push((
                t(0),
                Action::NetFaults {
                    corrupt: 0,
                    duplicate: 0,
                    reorder: 30,
                },
            ));
        }
        Scenario::SplitBrainBothPromoted => {
            s.push((t(200), Action::Partition));
            s.push((t(300), Action::Promote(1)));
            s.push((t(700), Action::Heal));
        }
        Scenario::FlushRacingDisconnect => {
            for k in 0..8 {
                s.push((t(100 + k * 100), Action::Partition));
                s.push((t(100 + k * 100 + 3), Action::Heal));
            }
        }
        Scenario::TornMetadataSlot => {
            s.push((t(300), Action::Partition));
            s.push((t(400), Action::Heal));
            s.push((t(401), Action::CrashTearingSuperblock(1)));
            s.push((t(600), Action::Restart(1)));
        }
        Scenario::SecondaryDiskFails | Scenario::SecondaryFlushFails => {
            let fault = if scenario == Scenario::SecondaryDiskFails {
                DiskFault::DataWrites
            } else {
                DiskFault::Flushes
            };
            s.push((t(100), Action::FailDisk(1, Some(fault))));
            s.push((t(300), Action::Crash(0)));
            s.push((t(400), Action::FailDisk(1, None)));
            s.push((t(500), Action::Restart(0)));
        }
        Scenario::SecondaryMetaFails | Scenario::PrimaryMetaFails => {
            // Had the node gone on after a failed metadata write, a crash
            // would find its activity log and bitmap behind its data (the
            // Primary's log would not name the extents of writes in flight).
            let n = usize::from(scenario == Scenario::SecondaryMetaFails);
            s.push((t(100), Action::FailDisk(n, Some(DiskFault::MetaWrites))));
            s.push((t(200), Action::Crash(n)));
            s.push((t(400), Action::FailDisk(n, None)));
            s.push((t(450), Action::Restart(n)));
        }
        Scenario::SyncSourceReadsFail => {
            // alpha writes alone, then its reads fail as the link heals:
            // it cannot serve the resync until they work again.
            s.push((t(100), Action::Partition));
            s.push((t(290), Action::FailDisk(0, Some(DiskFault::DataReads))));
            s.push((t(300), Action::Heal));
            s.push((t(500), Action::FailDisk(0, None)));
        }
        Scenario::SyncTargetFlushFails => {
            s.push((t(100), Action::Partition));
            s.push((t(300), Action::Heal));
            s.push((t(305), Action::FailDisk(1, Some(DiskFault::Flushes))));
            s.push((t(450), Action::FailDisk(1, None)));
            s.push((t(700), Action::Crash(1)));
            s.push((t(800), Action::Restart(1)));
        }
        Scenario::Random => random_plan(w, rng, &mut s, start),
    }
    if w.cfg.scenario == Scenario::SplitBrainBothPromoted {
        // bravo writes too while partitioned: those writes are discarded.
        s.push((t(320), Action::UntrackedWrites(1, 16)));
    }
    s.push((t(1000), Action::EndSafety));
    for (time, a) in s {
        w.at(time, Ev::Script(a));
    }
}

fn random_plan(w: &World, rng: &mut SplitMix64, s: &mut Vec<(u64, Action)>, start: u64) {
    let span = w.cfg.safety_ns;
    // Choices added after seeds were pinned as regressions come from a
    // stream of their own, so the pinned seeds keep their plans.
    let mut later = SplitMix64::new(w.cfg.seed ^ 0x6c61_7465_725f_7273);
    let faults = 1 + rng.below(5);
    let mut t = start;
    for _ in 0..faults {
        t += rng.below(span / (faults + 1)) + 1_000_000;
        let d = 5_000_000 + rng.below(span / 4);
        match rng.below(12) {
            0 => {
                s.push((t, Action::Crash(0)));
                s.push((t + d, Action::Restart(0)));
            }
            1 => {
                s.push((t, Action::Crash(1)));
                s.push((t + d, Action::Restart(1)));
            }
            2 | 3 => {
                s.push((t, Action::Partition));
                s.push((t + d, Action::Heal));
            }
            4 => {
                s.push((
                    t,
                    Action::NetFaults {
                        corrupt: 1 + rng.below(5),
                        duplicate: rng.below(5),
                        reorder: rng.below(5),
                    },
                ));
                s.push((
                    t + d,
                    Action::NetFaults {
                        corrupt: 0,
                        duplicate: 0,
                        reorder: 0,
                    },
                ));
            }
            5 => s.push((t, Action::Admin(0, AdminCommand::Verify))),
            6 => {
                s.push((t, Action::Admin(1, AdminCommand::Invalidate)));
            }
            7 => {
                s.push((t, Action::Admin(1, AdminCommand::PauseSync)));
                s.push((t + d, Action::Admin(1, AdminCommand::ResumeSync)));
            }
            8 => s.push((t, Action::Switchover)),
            9 | 10 => {
                let fault = match rng.below(3) {
                    0 if later.below(2) == 0 => DiskFault::DataReads,
                    0 => DiskFault::DataWrites,
                    1 => DiskFault::Flushes,
                    _ => DiskFault::MetaWrites,
                };
                s.push((t, Action::SecondaryDiskFaults(fault)));
                s.push((t + d, Action::DiskFaultsOff));
            }
            _ => {
                s.push((t, Action::CrashTearingSuperblock(1)));
                s.push((t + d, Action::Restart(1)));
            }
        }
        t += d;
    }
}
