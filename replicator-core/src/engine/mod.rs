//! The replication state machine of one node, sans-IO (quinn-proto shape):
//! [`Engine::handle`] takes an [`Input`] at a [`Time`], [`Engine::poll_output`]
//! yields the effects ([`Output`]) and [`Engine::next_deadline`] says when to
//! tick it next.
//!
//! Owns roles, disk/connection/replication states, the write path (protocols
//! A/B/C, write ordering, barriers, the transfer log), the handshake, resync,
//! online verify and metadata persistence decisions. Must not do I/O, read a
//! clock, spawn threads or draw randomness other than from the seed it was
//! given.
//!
//! Submodules: [`io`] (types), `write` (client requests and the peer's
//! mirrored writes), `handshake` (connect, auth, state, bitmap exchange,
//! decision, disconnect), `resync` (resync and verify), `persist` (metadata
//! writes), `durability` (what each data flush covers, and what a failed one
//! may have lost), [`rng`] (seeded PRNG).

mod durability;
mod handshake;
pub mod io;
mod persist;
mod resync;
pub mod rng;
mod write;

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::activity_log::ActivityLog;
use crate::bitmap::Bitmap;
use crate::metadata::MetaFlags;
use crate::types::{DiskState, NodeRole, RequestId};
use crate::wire::Message;

pub use handshake::{BITMAP_CHUNKS_IN_FLIGHT, BITMAP_CHUNK_SEND_BYTES};
pub use io::*;
pub use resync::{
    RESYNC_DISK_RETRY_FIRST_NS, RESYNC_DISK_RETRY_MAX_NS, RESYNC_MAX_INFLIGHT_REQUESTS,
    RESYNC_RATE_MAX_SAVED_NS, RESYNC_REQUEST_MAX_BYTES,
};

use handshake::Handshake;
use persist::Persist;
use resync::{SourceState, TargetState, VerifyState};
use rng::SplitMix64;
use write::{AppWrite, DataItem, PeerSide, PrimarySide};

/// Most client requests (reads, writes, flushes) the engine holds at once;
/// more are refused with `ClientError::Busy`.
pub const MAX_CLIENT_REQUESTS: usize = 1024;
/// Most mirrored writes from the peer queued or in flight on this node; a peer
/// exceeding it is a protocol error.
pub const MAX_PEER_WRITES_IN_FLIGHT: usize = MAX_CLIENT_REQUESTS * 2;
/// Most writes in the transfer log (sent, not yet covered by a BarrierAck);
/// new writes wait when it is full.
pub const MAX_TRANSFER_LOG_WRITES: usize = 4096;
/// A barrier is sent after this many writes in one epoch.
pub const BARRIER_EVERY_WRITES: usize = 256;
/// A barrier is sent when the current epoch is this old.
pub const BARRIER_INTERVAL_NS: u64 = 100_000_000;
/// Keep-alive interval.
pub const PING_INTERVAL_NS: u64 = 1_000_000_000;
/// The link is dropped when nothing arrived for this long.
pub const PEER_TIMEOUT_NS: u64 = 6_000_000_000;
/// Most outputs buffered before the caller drains them (a programmer-error
/// bound: every input produces a bounded number of outputs).
pub const MAX_PENDING_OUTPUTS: usize = 1 << 20;

/// One node's replication engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    rng: SplitMix64,
    now: Time,
    outputs: VecDeque<Output>,
    next_op: u64,
    /// What each outstanding disk op is for.
    ops: BTreeMap<OpId, OpPurpose>,

    role: NodeRole,
    disk: DiskState,
    conn: ConnState,
    repl: ReplState,
    peer_role: Option<NodeRole>,
    peer_disk: Option<DiskState>,
    split_brain: bool,
    /// The peer link is usable for mirrored writes (handshake finished).
    replicating: bool,
    /// A primary that lost (or never had) its peer starts a new generation on
    /// its first write; cleared once it did.
    need_new_uuid: bool,
    crashed_primary: bool,
    sync_paused: bool,
    /// Resync sends digests first and copies only differing ranges.
    checksum_resync: bool,

    uuids: crate::types::GenerationUuids,
    bitmap: Bitmap,
    al: ActivityLog,
    persist: Persist,

    /// Client requests being served, by client id.
    app: BTreeMap<ClientId, AppWrite>,
    client_count: usize,
    /// Data-area operations waiting for their range (FIFO among overlaps).
    data_queue: VecDeque<DataItem>,
    /// Byte ranges of data-area operations in flight: (start, end, owner).
    locks: Vec<(u64, u64, LockOwner)>,
    primary: PrimarySide,
    peer: PeerSide,
    unflushed: durability::Unflushed,
    hs: Handshake,
    target: Option<TargetState>,
    source: Option<SourceState>,
    verify: Option<VerifyState>,
    last_rx: Time,
    last_ping: Time,
    /// Set by [`Output::Fatal`]: every later input is ignored.
    failed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum LockOwner {
    App(ClientId),
    Peer(u64),
    Resync(u64),
    Verify(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OpPurpose {
    AppWrite(ClientId),
    AppRead(ClientId),
    AppFlush(ClientId),
    PeerWrite(u64),
    BarrierFlush(RequestId),
    ResyncRead(u64),
    CsumRead(u64),
    ResyncWrite(u64),
    VerifyRead(u64),
    TargetFinalFlush,
    /// A node's own flush after many writes no other flush covered.
    CheckpointFlush,
    Superblock(u64),
    AlGroup(u64),
    AlPreFlush(u64),
    AlPage,
    BitmapPage,
}

impl OpPurpose {
    /// What a metadata write holds, for messages.
    fn meta_name(&self) -> &'static str {
        match self {
            OpPurpose::Superblock(_) => "superblock",
            OpPurpose::AlGroup(_) => "activity log",
            OpPurpose::AlPage | OpPurpose::BitmapPage => "bitmap page",
            _ => "data",
        }
    }
}

impl Engine {
    /// A node starting from its loaded metadata. `seed` feeds the UUIDs and
    /// nonces this engine generates; pass real randomness in production.
    pub fn new(cfg: EngineConfig, meta: LoadedMetadata, seed: u64) -> Result<Engine, String> {
        let sb = &meta.superblock;
        if meta.bitmap.size_bytes() != cfg.size_bytes
            || meta.bitmap.block_bytes() != cfg.bitmap_block_bytes
        {
            return Err(format!(
                "bitmap covers {} bytes at {} bytes per bit, config says {} at {}",
                meta.bitmap.size_bytes(),
                meta.bitmap.block_bytes(),
                cfg.size_bytes,
                cfg.bitmap_block_bytes
            ));
        }
        let al = match ActivityLog::restore(cfg.al_extents, &meta.al) {
            Ok(al) => al,
            // A resized AL: its recovered extents are resynced below.
            Err(_) => ActivityLog::new(cfg.al_extents).map_err(|e| e.to_string())?,
        };
        let al_active = meta.al.active_extents();
        let flags = sb.flags;
        let crashed_primary = flags.contains(MetaFlags::CRASHED_PRIMARY)
            || (flags.contains(MetaFlags::WAS_PRIMARY)
                && !flags.contains(MetaFlags::CLEAN_SHUTDOWN));
        let disk = if !flags.contains(MetaFlags::CONSISTENT) {
            DiskState::Inconsistent
        } else if flags.contains(MetaFlags::OUTDATED) {
            DiskState::Outdated
        } else if flags.contains(MetaFlags::UP_TO_DATE) {
            DiskState::UpToDate
        } else {
            DiskState::Consistent
        };
        let persist = Persist::new(sb, meta.superblock_slot);
        let mut e = Engine {
            rng: SplitMix64::new(seed),
            now: Time(0),
            outputs: VecDeque::new(),
            next_op: 1,
            ops: BTreeMap::new(),
            role: NodeRole::Secondary,
            disk,
            conn: ConnState::StandAlone,
            repl: ReplState::Off,
            peer_role: None,
            peer_disk: None,
            split_brain: false,
            replicating: false,
            need_new_uuid: false,
            crashed_primary,
            sync_paused: false,
            checksum_resync: false,
            uuids: sb.uuids,
            bitmap: meta.bitmap,
            al,
            persist,
            app: BTreeMap::new(),
            client_count: 0,
            data_queue: VecDeque::new(),
            locks: Vec::new(),
            primary: PrimarySide::default(),
            peer: PeerSide::default(),
            unflushed: durability::Unflushed::default(),
            hs: Handshake::default(),
            target: None,
            source: None,
            verify: None,
            last_rx: Time(0),
            last_ping: Time(0),
            failed: false,
            cfg,
        };
        let unclean = !flags.contains(MetaFlags::CLEAN_SHUTDOWN);
        if crashed_primary || unclean {
            // The AL names every extent that may hold a write the peer lacks
            // (a crashed Primary) or that this node may have lost from its
            // volatile cache (a crashed Secondary).
            for ext in &al_active {
                let start = u64::from(ext.0) * crate::activity_log::AL_EXTENT_BYTES;
                if start < e.cfg.size_bytes {
                    let len = crate::activity_log::AL_EXTENT_BYTES.min(e.cfg.size_bytes - start);
                    let _ = e.bitmap.set_range(start, len);
                }
            }
        }
        // Record that we are running (not cleanly shut down) and remember a
        // crash until a resync clears it.
        e.write_superblock();
        e.write_dirty_bitmap_pages();
        Ok(e)
    }

    /// Feed one input at time `now`.
    pub fn handle(&mut self, now: Time, input: Input) {
        if self.failed {
            return;
        }
        if now > self.now {
            self.now = now;
        }
        match input {
            Input::Client { id, request } => self.on_client(id, request),
            Input::DiskDone { op, result } => self.on_disk_done(op, result),
            Input::PeerFrame(msg) => {
                self.last_rx = self.now;
                self.on_peer_frame(msg);
            }
            Input::PeerFrameError(err) => {
                if self.conn == ConnState::Connected {
                    self.protocol_error(format!("undecodable frame from peer: {err}"));
                }
            }
            Input::Connected => self.on_connected(),
            Input::Disconnected => self.on_link_lost(false),
            Input::Tick => self.on_tick(),
            Input::Admin(cmd) => {
                let r = self.on_admin(cmd);
                self.push(Output::AdminResult(r));
            }
        }
        assert!(
            self.outputs.len() <= MAX_PENDING_OUTPUTS,
            "caller must drain outputs"
        );
    }

    /// The next effect to carry out, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the engine wants an [`Input::Tick`].
    pub fn next_deadline(&self) -> Option<Time> {
        let mut d: Option<Time> = None;
        let mut at = |t: Time| {
            d = Some(d.map_or(t, |x: Time| x.min(t)));
        };
        if self.conn == ConnState::Connected {
            at(self.last_ping.plus_ns(PING_INTERVAL_NS));
            at(self.last_rx.plus_ns(PEER_TIMEOUT_NS));
            if let Some(since) = self.primary.epoch_started {
                at(since.plus_ns(BARRIER_INTERVAL_NS));
            }
            if let Some(t) = self.target.as_ref() {
                t.throttled_until
                    .into_iter()
                    .chain(t.disk_retry_at)
                    .for_each(&mut at);
            }
        }
        d
    }

    /// Checksum-based resync (DRBD's `csums-alg`): the SyncTarget sends the
    /// SHA-256 of its copy of each range and the source sends data only where
    /// the digests differ. Takes effect for requests issued from now on.
    pub fn set_checksum_resync(&mut self, on: bool) {
        self.checksum_resync = on;
    }

    /// Whether the transport should (re)connect to the peer.
    pub fn wants_connection(&self) -> bool {
        self.conn == ConnState::Connecting
    }

    pub fn role(&self) -> NodeRole {
        self.role
    }

    pub fn disk_state(&self) -> DiskState {
        self.disk
    }

    pub fn generation_uuids(&self) -> crate::types::GenerationUuids {
        self.uuids
    }

    /// The in-memory out-of-sync bitmap (for tests and the simulator).
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// Client requests not yet completed.
    pub fn pending_client_requests(&self) -> usize {
        self.client_count
    }

    /// Disk operations not yet completed.
    pub fn pending_disk_ops(&self) -> usize {
        self.ops.len()
    }

    pub fn status(&self) -> Status {
        let disk_wait_s = self.resync_disk_wait_s();
        Status {
            role: self.role,
            disk: self.disk,
            connection: self.conn,
            replication: self.repl,
            peer_role: self.peer_role,
            peer_disk: self.peer_disk,
            size_bytes: self.cfg.size_bytes,
            out_of_sync_bytes: self.bitmap.out_of_sync_bytes(),
            resync: self.resync_progress(),
            resync_disk_wait_s: disk_wait_s,
            resync_disk_wait_peer: disk_wait_s.is_some()
                && self.target.as_ref().is_some_and(|t| t.peer_disk_failed),
            peer_resync_disk_wait: self.peer_resync_disk_wait(),
            split_brain: self.split_brain,
        }
    }

    /// Bytes compared so far and bytes in all of an online verify this node
    /// drives (VerifyS); `None` when it drives none.
    pub fn verify_progress(&self) -> Option<(u64, u64)> {
        let v = self.verify.as_ref().filter(|v| v.driver && !v.done)?;
        let in_flight: u64 = v.pending.values().map(|p| p.1).sum();
        Some((v.cursor.saturating_sub(in_flight), self.cfg.size_bytes))
    }

    // ----- small helpers shared by the submodules -----

    fn push(&mut self, o: Output) {
        self.outputs.push_back(o);
    }

    fn send(&mut self, m: Message) {
        self.push(Output::Send(m));
    }

    fn new_op(&mut self, purpose: OpPurpose, kind: DiskOp) -> OpId {
        let op = OpId(self.next_op);
        self.next_op += 1;
        self.ops.insert(op, purpose);
        self.push(Output::Disk { op, kind });
        op
    }

    fn complete(&mut self, id: ClientId, result: Result<Bytes, ClientError>) {
        self.client_count = self.client_count.saturating_sub(1);
        self.push(Output::Complete { id, result });
    }

    fn set_role(&mut self, r: NodeRole) {
        if self.role != r {
            self.role = r;
            self.push(Output::Event(Event::Role(r)));
        }
    }

    fn set_disk(&mut self, d: DiskState) {
        if self.disk != d {
            self.disk = d;
            self.push(Output::Event(Event::Disk(d)));
        }
    }

    fn set_conn(&mut self, c: ConnState) {
        if self.conn != c {
            self.conn = c;
            self.push(Output::Event(Event::Connection(c)));
        }
    }

    fn set_repl(&mut self, r: ReplState) {
        if self.repl != r {
            self.repl = r;
            self.push(Output::Event(Event::Replication(r)));
        }
    }

    fn set_peer(&mut self, role: Option<NodeRole>, disk: Option<DiskState>) {
        if self.peer_role != role {
            self.peer_role = role;
            self.push(Output::Event(Event::PeerRole(role)));
        }
        if self.peer_disk != disk {
            self.peer_disk = disk;
            self.push(Output::Event(Event::PeerDisk(disk)));
        }
    }

    /// Whether an Established pair is not in sync: blocks marked here, or
    /// either disk not UpToDate (a Secondary whose disk failed writes knows
    /// no blocks; its Primary marked them).
    pub fn needs_resync(&self) -> bool {
        self.bitmap.out_of_sync_bytes() > 0
            || self.disk != DiskState::UpToDate
            || self.peer_disk != Some(DiskState::UpToDate)
    }

    fn report_oos(&mut self) {
        let bytes = self.bitmap.out_of_sync_bytes();
        self.push(Output::Event(Event::OutOfSync { bytes }));
    }

    /// Mark a byte range out of sync (clamped to the device).
    fn mark_oos(&mut self, offset: u64, len: u64) {
        if self.cfg.sim_fault == SimFault::ForgetOutOfSync {
            return;
        }
        if len == 0 || offset >= self.cfg.size_bytes {
            return;
        }
        let len = len.min(self.cfg.size_bytes - offset);
        if let Ok(n) = self.bitmap.set_range(offset, len) {
            if n > 0 {
                self.report_oos();
            }
        }
    }

    fn overlaps_lock(&self, start: u64, end: u64) -> bool {
        self.locks.iter().any(|&(s, e, _)| s < end && start < e)
    }

    fn unlock(&mut self, owner: LockOwner) {
        if let Some(i) = self.locks.iter().position(|&(_, _, o)| o == owner) {
            self.locks.swap_remove(i);
        }
    }

    fn range_ok(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.cfg.size_bytes)
    }

    fn on_tick(&mut self) {
        if self.conn != ConnState::Connected {
            return;
        }
        if self.now >= self.last_rx.plus_ns(PEER_TIMEOUT_NS) {
            self.protocol_error("peer timed out".to_string());
            return;
        }
        if self.now >= self.last_ping.plus_ns(PING_INTERVAL_NS) {
            self.last_ping = self.now;
            self.send(Message::Ping);
        }
        if self
            .primary
            .epoch_started
            .is_some_and(|t| self.now >= t.plus_ns(BARRIER_INTERVAL_NS))
        {
            self.send_barrier(None);
        }
        if self.target.is_some() {
            self.resync_pump();
        }
    }

    fn on_disk_done(&mut self, op: OpId, result: Result<Bytes, DiskError>) {
        let Some(purpose) = self.ops.remove(&op) else {
            // Unknown completion: a caller bug, never peer input.
            panic!("disk completion for unknown {op:?}");
        };
        if let (
            OpPurpose::Superblock(_)
            | OpPurpose::AlGroup(_)
            | OpPurpose::AlPage
            | OpPurpose::BitmapPage,
            Err(e),
        ) = (&purpose, &result)
        {
            // No metadata write may be taken for done when it is not: the
            // node stops, as DRBD detaches a disk on a metadata I/O error.
            self.failed = true;
            self.outputs.clear();
            self.push(Output::Fatal {
                reason: format!(
                    "a metadata write ({}) failed with errno {}",
                    purpose.meta_name(),
                    e.code
                ),
            });
            return;
        }
        self.data_flush_done(op, result.is_ok());
        match purpose {
            OpPurpose::AppWrite(id) => self.app_write_done(id, result.is_ok()),
            OpPurpose::AppRead(id) => {
                let r = result.map_err(|_| ClientError::Io);
                self.app.remove(&id);
                self.complete(id, r);
            }
            OpPurpose::AppFlush(id) => self.app_flush_local_done(id, result.is_ok()),
            OpPurpose::PeerWrite(key) => self.peer_write_done(key, result.is_ok()),
            OpPurpose::BarrierFlush(id) => self.barrier_flush_done(id, result.is_ok()),
            OpPurpose::ResyncRead(key) => self.resync_read_done(key, result),
            OpPurpose::CsumRead(key) => self.csum_read_done(key, result),
            OpPurpose::ResyncWrite(key) => self.resync_write_done(key, result.is_ok()),
            OpPurpose::VerifyRead(key) => self.verify_read_done(key, result),
            OpPurpose::TargetFinalFlush => self.target_final_flush_done(result.is_ok()),
            OpPurpose::Superblock(seq) => self.superblock_done(seq),
            OpPurpose::AlGroup(seq) => self.al_group_part_done(seq),
            OpPurpose::AlPreFlush(seq) => self.al_preflush_done(seq),
            OpPurpose::AlPage => self.al_page_done(),
            // Nothing waits for these (a checkpoint flush is counted above).
            OpPurpose::CheckpointFlush | OpPurpose::BitmapPage => {}
        }
        self.pump();
    }

    fn on_admin(&mut self, cmd: AdminCommand) -> Result<(), AdminError> {
        match cmd {
            AdminCommand::Primary { force } => self.promote(force),
            AdminCommand::Secondary => {
                if self.role == NodeRole::Secondary {
                    return Ok(());
                }
                self.set_role(NodeRole::Secondary);
                self.write_superblock();
                self.send_state_update();
                Ok(())
            }
            AdminCommand::Connect => {
                if self.conn == ConnState::StandAlone {
                    self.split_brain = false;
                    self.set_conn(ConnState::Connecting);
                }
                Ok(())
            }
            AdminCommand::Disconnect => {
                if self.conn == ConnState::Connected {
                    self.send(Message::Disconnect {
                        reason: "operator disconnect".to_string(),
                    });
                    self.push(Output::CloseLink {
                        reason: "operator disconnect".to_string(),
                    });
                    self.on_link_lost(true);
                }
                self.set_conn(ConnState::StandAlone);
                Ok(())
            }
            AdminCommand::Invalidate => self.invalidate_local(),
            AdminCommand::InvalidateRemote => self.invalidate_remote(),
            AdminCommand::PauseSync => {
                self.sync_paused = true;
                self.update_paused();
                self.send_state_update();
                Ok(())
            }
            AdminCommand::ResumeSync => {
                self.sync_paused = false;
                self.update_paused();
                self.send_state_update();
                self.resync_pump();
                Ok(())
            }
            AdminCommand::Verify => self.start_verify(),
            AdminCommand::NewCurrentUuid { clear_bitmap } => self.new_current_uuid(clear_bitmap),
            AdminCommand::StartResync => {
                if self.conn == ConnState::StandAlone {
                    self.set_conn(ConnState::Connecting);
                } else if self.repl == ReplState::Established && self.needs_resync() {
                    // A resync starts at a handshake: after a verify found
                    // differences, or after the Secondary's disk failed
                    // writes and turned Inconsistent.
                    self.renegotiate("resync");
                } else if self.repl == ReplState::SyncTarget {
                    self.target_retry_now();
                }
                Ok(())
            }
            AdminCommand::Shutdown => {
                self.persist.clean_shutdown = true;
                self.bitmap.mark_all_dirty();
                self.write_dirty_bitmap_pages();
                self.write_superblock();
                Ok(())
            }
        }
    }

    fn promote(&mut self, force: bool) -> Result<(), AdminError> {
        if self.role == NodeRole::Primary {
            return Ok(());
        }
        if self.peer_role == Some(NodeRole::Primary) {
            return Err(AdminError::PeerIsPrimary);
        }
        let stale = match self.disk {
            DiskState::UpToDate => false,
            // Consistent while connected to an UpToDate peer is behind it.
            DiskState::Consistent => self.replicating,
            _ => true,
        };
        if stale && !force {
            return Err(AdminError::StaleData { disk: self.disk });
        }
        if self.repl == ReplState::SyncTarget || self.repl == ReplState::PausedSyncT {
            return Err(AdminError::WrongState {
                detail: "refusing to become primary while SyncTarget".to_string(),
            });
        }
        if stale || self.disk == DiskState::Consistent {
            self.set_disk(DiskState::UpToDate);
        }
        self.set_role(NodeRole::Primary);
        let peer_behind = self.peer_disk.is_some_and(|d| d != DiskState::UpToDate);
        if stale && self.replicating && peer_behind {
            // Forced over a peer that is not UpToDate either (e.g. the
            // initial sync): this node's data becomes the new generation and
            // the peer is fully resynced from it.
            self.rotate_uuid();
            self.bitmap.set_all();
            self.write_dirty_bitmap_pages();
            self.write_superblock();
            self.report_oos();
            self.renegotiate("primary --force");
            return Ok(());
        }
        if !self.replicating {
            self.need_new_uuid = true;
        }
        self.write_superblock();
        self.send_state_update();
        Ok(())
    }

    fn new_current_uuid(&mut self, clear_bitmap: bool) -> Result<(), AdminError> {
        if clear_bitmap {
            // Skip the initial sync of two empty disks: only valid while
            // connected with both sides at the empty generation.
            if !(self.replicating
                && crate::generation::uuid_is_empty(self.uuids.current)
                && self.repl == ReplState::Established)
            {
                return Err(AdminError::WrongState {
                    detail: "new-current-uuid --clear-bitmap needs a connected pair of just-created disks"
                        .to_string(),
                });
            }
            let uuid = self.fresh_uuid();
            self.uuids.current = uuid;
            self.uuids.bitmap = 0;
            self.bitmap.clear_all();
            self.bitmap.mark_all_dirty();
            self.set_disk(DiskState::UpToDate);
            self.write_dirty_bitmap_pages();
            self.write_superblock();
            self.send(Message::SyncUuid { uuid });
            // After the SyncUuid, so the peer shows us UpToDate.
            self.send_state_update();
            self.report_oos();
            return Ok(());
        }
        self.rotate_uuid();
        self.write_superblock();
        Ok(())
    }

    fn fresh_uuid(&mut self) -> u64 {
        loop {
            let u = crate::generation::with_role_bit(
                self.rng.next_u64(),
                self.role == NodeRole::Primary,
            );
            if !crate::generation::uuid_is_empty(u) {
                return u;
            }
        }
    }

    /// Start a new data generation: the old current becomes the bitmap UUID
    /// (or history, if the bitmap already tracks an older one).
    fn rotate_uuid(&mut self) {
        let old = self.uuids.current;
        if self.uuids.bitmap == 0 {
            self.uuids.bitmap = old;
        } else {
            self.push_history(old);
        }
        self.uuids.current = self.fresh_uuid();
    }

    fn push_history(&mut self, uuid: u64) {
        if uuid == 0 {
            return;
        }
        let h = &mut self.uuids.history;
        h.rotate_right(1);
        h[0] = uuid;
    }

    /// Drop the link because the peer broke the protocol; resync on reconnect.
    fn protocol_error(&mut self, detail: String) {
        self.push(Output::Event(Event::ProtocolError {
            detail: detail.clone(),
        }));
        self.push(Output::CloseLink { reason: detail });
        self.on_link_lost(false);
    }

    /// Run everything that may have become possible.
    fn pump(&mut self) {
        self.pump_data_queue();
        self.resync_pump();
        self.verify_pump();
    }
}
