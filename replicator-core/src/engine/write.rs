//! The write path: client requests on the Primary (reads, writes, trims,
//! zeroes, flushes, FUA), the ordering of overlapping data operations, the
//! activity log gate, protocol A/B/C completion, the transfer log and
//! barriers; and on the Secondary, applying the peer's mirrored writes in
//! arrival order and answering barriers.
//!
//! Must not decide sync direction or talk the handshake (see `handshake`).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::{
    ClientError, ClientId, ClientRequest, DiskOp, Engine, LockOwner, OpPurpose, SimFault, Time,
    MAX_CLIENT_REQUESTS, MAX_PEER_WRITES_IN_FLIGHT, MAX_TRANSFER_LOG_WRITES,
};
use crate::activity_log::AlDecision;
use crate::types::{DiskState, NodeRole, ProtocolMode, RequestId};
use crate::wire::{Message, WRITE_FLAG_FUA, WRITE_FLAG_TRIM, WRITE_FLAG_ZEROES};

/// What a write puts on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Payload {
    Data(Bytes),
    Zero,
    Trim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Queued,
    /// Waiting for the superblock write with this sequence (new UUID).
    SbWait(u64),
    /// Waiting for AL transaction `seq` to be durable.
    AlWait(u64),
    Running,
}

/// A client write (or trim/zeroes/flush) in progress on the Primary.
#[derive(Debug)]
pub(super) struct AppWrite {
    pub offset: u64,
    pub len: u64,
    pub payload: Payload,
    pub fua: bool,
    pub stage: Stage,
    pub local_done: bool,
    pub peer_done: bool,
    pub failed: bool,
    /// Whether the AL holds this write's extents (to release them once).
    pub al_held: bool,
    pub is_flush: bool,
    pub barrier: Option<RequestId>,
    pub peer_id: Option<RequestId>,
}

/// An entry of the data-area FIFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataItem {
    App(ClientId),
    Peer(u64),
    ResyncRead(u64),
    ResyncWrite(u64),
    VerifyRead(u64),
}

/// Primary-side replication state.
#[derive(Debug, Default)]
pub(super) struct PrimarySide {
    pub next_req: u64,
    /// Mirrored writes awaiting the peer, by wire id.
    pub by_peer_id: BTreeMap<RequestId, ClientId>,
    /// Transfer log: ranges sent since the last acknowledged barrier, with
    /// the epoch (barrier number) they belong to.
    pub transfer_log: VecDeque<(u64, u64, u64)>,
    pub epoch: u64,
    pub epoch_writes: usize,
    pub epoch_started: Option<Time>,
    /// Barriers sent and not yet acked: barrier id -> (epoch, client flush).
    pub barriers: BTreeMap<RequestId, (u64, Option<ClientId>)>,
}

/// A mirrored write received from the peer.
#[derive(Debug)]
pub(super) struct PeerWrite {
    pub id: RequestId,
    pub offset: u64,
    pub len: u64,
    pub payload: Payload,
    pub fua: bool,
    pub epoch: u64,
    pub started: bool,
    /// Waiting for this AL transaction before the disk write.
    pub al_wait: Option<u64>,
}

/// Secondary-side state for the peer's writes and barriers.
#[derive(Debug, Default)]
pub(super) struct PeerSide {
    pub next_key: u64,
    pub writes: BTreeMap<u64, PeerWrite>,
    /// Id of the last Write or Barrier received on this connection: the
    /// Primary numbers both from one counter in sending order, so each must
    /// be above it.
    pub last_write_id: Option<RequestId>,
    pub epoch: u64,
    /// Barriers received and not yet answered: (id, epoch it closes).
    pub barriers: VecDeque<(RequestId, u64)>,
    pub barrier_flushing: bool,
    /// A flush of the data disk failed since the last BarrierAck: writes
    /// acknowledged to the Primary may be lost, so the next BarrierAck
    /// reports an error (the Primary then marks every write not yet
    /// covered by a good one).
    pub flush_failed: bool,
    /// Acks held back until the superblock sequence `.0` is durable: after
    /// a write or flush of the Primary's data failed here, every later ack
    /// waits (in order) until this disk is durably marked Inconsistent, so
    /// a crash of this node cannot bring it back UpToDate while the
    /// Primary believes it was told.
    pub held_acks: Option<(u64, Vec<Message>)>,
}

impl Engine {
    pub(super) fn on_client(&mut self, id: ClientId, req: ClientRequest) {
        if self.client_count >= MAX_CLIENT_REQUESTS {
            self.push(super::Output::Complete {
                id,
                result: Err(ClientError::Busy),
            });
            return;
        }
        self.client_count += 1;
        if self.role != NodeRole::Primary {
            self.complete(id, Err(ClientError::NotPrimary));
            return;
        }
        let (offset, len, payload, fua) = match req {
            ClientRequest::Read { offset, len_bytes } => {
                if !self.range_ok(offset, u64::from(len_bytes)) {
                    self.complete(id, Err(ClientError::OutOfRange));
                    return;
                }
                self.app.insert(id, AppWrite::flush_like(false));
                self.new_op(OpPurpose::AppRead(id), DiskOp::Read { offset, len_bytes });
                return;
            }
            ClientRequest::Flush => {
                self.start_flush(id);
                return;
            }
            ClientRequest::Write { offset, data, fua } => {
                let len = data.len() as u64;
                (offset, len, Payload::Data(data), fua)
            }
            ClientRequest::Trim { offset, len_bytes } => {
                (offset, u64::from(len_bytes), Payload::Trim, false)
            }
            ClientRequest::WriteZeroes {
                offset,
                len_bytes,
                fua,
            } => (offset, u64::from(len_bytes), Payload::Zero, fua),
        };
        if !self.range_ok(offset, len)
            || len > crate::wire::MAX_WRITE_PAYLOAD_BYTES as u64
            || crate::activity_log::extents_of(offset, len).is_err()
        {
            self.complete(id, Err(ClientError::OutOfRange));
            return;
        }
        self.app.insert(
            id,
            AppWrite {
                offset,
                len,
                payload,
                fua,
                stage: Stage::Queued,
                local_done: false,
                peer_done: false,
                failed: false,
                al_held: false,
                is_flush: false,
                barrier: None,
                peer_id: None,
            },
        );
        self.data_queue.push_back(DataItem::App(id));
        self.pump();
    }

    fn item_range(&self, item: DataItem) -> (u64, u64) {
        match item {
            DataItem::App(id) => {
                let w = &self.app[&id];
                (w.offset, w.offset + w.len)
            }
            DataItem::Peer(k) => {
                let w = &self.peer.writes[&k];
                (w.offset, w.offset + w.len)
            }
            DataItem::ResyncRead(k) | DataItem::ResyncWrite(k) => self.resync_item_range(k),
            DataItem::VerifyRead(k) => {
                let (_, o, l, _) = self.verify.as_ref().expect("verify running").reads[&k];
                (o, o + l)
            }
        }
    }

    /// Start every queued data operation whose range is free and that no
    /// earlier queued operation overlaps (so overlapping operations start in
    /// arrival order, on both nodes).
    pub(super) fn pump_data_queue(&mut self) {
        let mut i = 0;
        let mut earlier: Vec<(u64, u64)> = Vec::new();
        while i < self.data_queue.len() {
            let item = self.data_queue[i];
            let (s, e) = self.item_range(item);
            let blocked = self.overlaps_lock(s, e) || earlier.iter().any(|&(a, b)| a < e && s < b);
            if !blocked && self.try_start(item) {
                self.data_queue.remove(i);
                continue;
            }
            earlier.push((s, e));
            i += 1;
        }
    }

    /// Try to start one data operation; false leaves it queued.
    fn try_start(&mut self, item: DataItem) -> bool {
        match item {
            DataItem::App(id) => self.try_start_app(id),
            DataItem::Peer(k) => {
                // The Secondary keeps an AL too (as DRBD 9 does): if it
                // crashes with mirrored writes in its volatile cache and the
                // Primary is gone as well, its AL names the extents to resync.
                let (s, e) = self.item_range(item);
                let wait = match self.al.begin_write(s, e - s) {
                    Ok(AlDecision::Blocked(_)) => return false,
                    Ok(AlDecision::Ready) => None,
                    Ok(AlDecision::AwaitCommit { sequence }) => Some(sequence),
                    Ok(AlDecision::Persist(tx)) => {
                        let seq = tx.sequence;
                        self.persist_al_transaction(tx);
                        Some(seq)
                    }
                    Err(err) => panic!("AL refused a validated peer write {s}+{}: {err}", e - s),
                };
                self.locks.push((s, e, LockOwner::Peer(k)));
                let w = self.peer.writes.get_mut(&k).expect("queued peer write");
                w.started = true;
                w.al_wait = wait;
                if wait.is_none() {
                    self.issue_peer_write(k);
                }
                true
            }
            DataItem::ResyncRead(k) | DataItem::ResyncWrite(k) => {
                let (s, e) = self.item_range(item);
                self.locks.push((s, e, LockOwner::Resync(k)));
                self.start_resync_item(item);
                true
            }
            DataItem::VerifyRead(k) => {
                let (s, e) = self.item_range(item);
                self.locks.push((s, e, LockOwner::Verify(k)));
                self.start_verify_read(k);
                true
            }
        }
    }

    fn try_start_app(&mut self, id: ClientId) -> bool {
        let replicating = self.replicating;
        // During the handshake (connected, bitmaps not yet exchanged) writes
        // wait: a bit set now would miss the bitmap already sent.
        if self.conn == super::ConnState::Connected && !replicating {
            return false;
        }
        // Mirrored writes need room in the transfer log.
        if replicating && self.primary.transfer_log.len() >= MAX_TRANSFER_LOG_WRITES {
            return false;
        }
        let (offset, len) = {
            let w = &self.app[&id];
            (w.offset, w.len)
        };
        // A disconnected primary starts a new generation before its first write.
        let mut sb_wait = None;
        if !replicating && self.need_new_uuid {
            self.need_new_uuid = false;
            self.rotate_uuid();
            self.write_superblock();
        }
        if let Some(seq) = self.persist.sb_needed_for_writes {
            if self.persist.sb_durable < seq {
                sb_wait = Some(seq);
            }
        }
        let decision = match self.al.begin_write(offset, len) {
            Ok(d) => d,
            Err(_) => {
                // Validated at submit; an AL refusal here is a logic error.
                panic!("activity log refused a validated write at {offset}+{len}");
            }
        };
        let stage = match decision {
            AlDecision::Blocked(_) => return false,
            AlDecision::Ready => None,
            AlDecision::AwaitCommit { sequence } => Some(sequence),
            AlDecision::Persist(tx) => {
                let seq = tx.sequence;
                self.persist_al_transaction(tx);
                Some(seq)
            }
        };
        self.locks.push((offset, offset + len, LockOwner::App(id)));
        let w = self.app.get_mut(&id).expect("queued app write");
        w.al_held = true;
        w.stage = match (stage, sb_wait) {
            (Some(seq), _) => Stage::AlWait(seq),
            (None, Some(seq)) => Stage::SbWait(seq),
            (None, None) => Stage::Running,
        };
        if w.stage == Stage::Running {
            self.issue_app_write(id);
        }
        true
    }

    /// The AL transaction `seq` is durable: start the writes waiting on it.
    fn issue_peer_write(&mut self, k: u64) {
        let w = &self.peer.writes[&k];
        let kind = disk_op(w.offset, w.len, &w.payload, w.fua);
        self.new_op(OpPurpose::PeerWrite(k), kind);
    }

    pub(super) fn al_committed(&mut self, seq: u64) {
        let peer_waiting: Vec<u64> = self
            .peer
            .writes
            .iter()
            .filter(|(_, w)| w.al_wait == Some(seq))
            .map(|(k, _)| *k)
            .collect();
        for k in peer_waiting {
            self.peer
                .writes
                .get_mut(&k)
                .expect("waiting peer write")
                .al_wait = None;
            self.issue_peer_write(k);
        }
        let waiting: Vec<ClientId> = self
            .app
            .iter()
            .filter(|(_, w)| w.stage == Stage::AlWait(seq))
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.advance_after_al(id);
        }
    }

    fn advance_after_al(&mut self, id: ClientId) {
        let sb_needed = self
            .persist
            .sb_needed_for_writes
            .filter(|&s| self.persist.sb_durable < s);
        let w = self.app.get_mut(&id).expect("waiting write");
        match sb_needed {
            Some(seq) => w.stage = Stage::SbWait(seq),
            None => {
                w.stage = Stage::Running;
                self.issue_app_write(id);
            }
        }
    }

    /// A superblock write finished: start writes waiting for it.
    pub(super) fn superblock_durable(&mut self) {
        let durable = self.persist.sb_durable;
        let waiting: Vec<ClientId> = self
            .app
            .iter()
            .filter(|(_, w)| matches!(w.stage, Stage::SbWait(s) if s <= durable))
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.app.get_mut(&id).expect("waiting write").stage = Stage::Running;
            self.issue_app_write(id);
        }
    }

    /// Submit the local write and mirror it (or mark it out of sync).
    fn issue_app_write(&mut self, id: ClientId) {
        let (offset, len, payload, fua) = {
            let w = &self.app[&id];
            (w.offset, w.len, w.payload.clone(), w.fua)
        };
        self.new_op(OpPurpose::AppWrite(id), disk_op(offset, len, &payload, fua));
        if self.replicating {
            let rid = RequestId(self.primary.next_req);
            self.primary.next_req += 1;
            let (flags, data) = match &payload {
                Payload::Data(d) => (0, d.clone()),
                Payload::Zero => (WRITE_FLAG_ZEROES, Bytes::new()),
                Payload::Trim => (WRITE_FLAG_TRIM, Bytes::new()),
            };
            let flags = flags | if fua { WRITE_FLAG_FUA } else { 0 };
            self.send(Message::Write {
                id: rid,
                offset,
                flags,
                len_bytes: len as u32,
                data,
            });
            self.primary.by_peer_id.insert(rid, id);
            let epoch = self.primary.epoch;
            self.primary.transfer_log.push_back((offset, len, epoch));
            self.primary.epoch_writes += 1;
            if self.primary.epoch_started.is_none() {
                self.primary.epoch_started = Some(self.now);
            }
            let w = self.app.get_mut(&id).expect("running write");
            w.peer_id = Some(rid);
            let skip_peer = self.cfg.protocol == ProtocolMode::A
                || self.cfg.sim_fault == SimFault::AckBeforePeer;
            if skip_peer {
                w.peer_done = true;
            }
            if self.primary.epoch_writes >= super::BARRIER_EVERY_WRITES {
                self.send_barrier(None);
            }
        } else {
            self.mark_oos(offset, len);
            self.app.get_mut(&id).expect("running write").peer_done = true;
        }
    }

    pub(super) fn app_write_done(&mut self, id: ClientId, ok: bool) {
        let (offset, len) = {
            let w = self.app.get_mut(&id).expect("app write in flight");
            w.local_done = true;
            w.failed |= !ok;
            (w.offset, w.len)
        };
        if !ok {
            // The local copy may now be wrong: the peer's is the good one.
            self.mark_oos(offset, len);
        } else {
            self.wrote_unflushed(offset, len);
        }
        self.unlock(LockOwner::App(id));
        let held = std::mem::replace(
            &mut self.app.get_mut(&id).expect("app write").al_held,
            false,
        );
        if held {
            let _ = self.al.end_write(offset, len);
        }
        self.maybe_finish_app(id);
    }

    fn maybe_finish_app(&mut self, id: ClientId) {
        let Some(w) = self.app.get(&id) else { return };
        if !(w.local_done && w.peer_done) {
            return;
        }
        let failed = w.failed;
        self.app.remove(&id);
        self.complete(
            id,
            if failed {
                Err(ClientError::Io)
            } else {
                Ok(Bytes::new())
            },
        );
    }

    pub(super) fn on_recv_ack(&mut self, id: RequestId) {
        if self.cfg.protocol != ProtocolMode::B {
            return;
        }
        let Some(&cid) = self.primary.by_peer_id.get(&id) else {
            return;
        };
        if let Some(w) = self.app.get_mut(&cid) {
            w.peer_done = true;
        }
        self.maybe_finish_app(cid);
    }

    pub(super) fn on_write_ack(&mut self, id: RequestId, error: u16) {
        let Some(cid) = self.primary.by_peer_id.remove(&id) else {
            self.protocol_error(format!("WriteAck for unknown {id}"));
            return;
        };
        if let Some(w) = self.app.get_mut(&cid) {
            w.peer_done = true;
            if error != 0 {
                let (o, l) = (w.offset, w.len);
                self.mark_oos(o, l);
            }
        }
        self.maybe_finish_app(cid);
    }

    /// Close the current epoch with a barrier; `flush` is the client flush
    /// waiting for it, if any.
    pub(super) fn send_barrier(&mut self, flush: Option<ClientId>) -> Option<RequestId> {
        if !self.replicating {
            return None;
        }
        let rid = RequestId(self.primary.next_req);
        self.primary.next_req += 1;
        let epoch = self.primary.epoch;
        self.primary.barriers.insert(rid, (epoch, flush));
        self.primary.epoch += 1;
        self.primary.epoch_writes = 0;
        self.primary.epoch_started = None;
        self.send(Message::Barrier { id: rid });
        Some(rid)
    }

    fn start_flush(&mut self, id: ClientId) {
        let mut w = AppWrite::flush_like(true);
        w.barrier = self.send_barrier(Some(id));
        w.peer_done = w.barrier.is_none();
        self.app.insert(id, w);
        self.issue_data_flush(OpPurpose::AppFlush(id));
    }

    pub(super) fn app_flush_local_done(&mut self, id: ClientId, ok: bool) {
        if let Some(w) = self.app.get_mut(&id) {
            w.local_done = true;
            w.failed |= !ok;
        }
        self.maybe_finish_app(id);
    }

    pub(super) fn on_barrier_ack(&mut self, id: RequestId, error: u16) {
        let Some((epoch, flush)) = self.primary.barriers.remove(&id) else {
            self.protocol_error(format!("BarrierAck for unknown {id}"));
            return;
        };
        if error != 0 {
            // The peer's flush failed: any write it completed since its last
            // good flush may be lost there, later epochs' included (the
            // failed flush covered them too): every write in the transfer
            // log is marked out of sync (the later ones also stay in it).
            let tl: Vec<(u64, u64)> = self
                .primary
                .transfer_log
                .iter()
                .map(|&(o, l, _)| (o, l))
                .collect();
            for (o, l) in tl {
                self.mark_oos(o, l);
            }
        }
        // Everything of this epoch and before is durable on the peer (or,
        // after an error, marked out of sync).
        while self
            .primary
            .transfer_log
            .front()
            .is_some_and(|&(_, _, e)| e <= epoch)
        {
            self.primary.transfer_log.pop_front();
        }
        if let Some(cid) = flush {
            if let Some(w) = self.app.get_mut(&cid) {
                w.peer_done = true;
            }
            self.maybe_finish_app(cid);
        }
        self.pump();
    }

    /// The link went away: whatever the peer may lack is marked out of sync
    /// and the Primary's waiting requests complete on the local result.
    pub(super) fn write_path_link_lost(&mut self) {
        let tl: Vec<(u64, u64, u64)> = self.primary.transfer_log.drain(..).collect();
        for (o, l, _) in tl {
            self.mark_oos(o, l);
        }
        let waiting: Vec<ClientId> = self.primary.by_peer_id.values().copied().collect();
        self.primary.by_peer_id.clear();
        let flushes: Vec<ClientId> = self
            .primary
            .barriers
            .values()
            .filter_map(|&(_, f)| f)
            .collect();
        self.primary.barriers.clear();
        self.primary.epoch_started = None;
        self.primary.epoch_writes = 0;
        for cid in waiting.into_iter().chain(flushes) {
            if let Some(w) = self.app.get_mut(&cid) {
                w.peer_done = true;
                if !w.is_flush {
                    let (o, l) = (w.offset, w.len);
                    self.mark_oos(o, l);
                }
            }
            self.maybe_finish_app(cid);
        }
        // The secondary side: queued peer writes that never started are
        // dropped (the primary marked them out of sync); barriers too.
        let unstarted: Vec<u64> = self
            .peer
            .writes
            .iter()
            .filter(|(_, w)| !w.started)
            .map(|(k, _)| *k)
            .collect();
        for k in unstarted {
            self.peer.writes.remove(&k);
            self.data_queue.retain(|i| *i != DataItem::Peer(k));
        }
        self.peer.barriers.clear();
        self.peer.last_write_id = None;
        // Acks held for the Primary of this connection: it marks the
        // unacknowledged writes out of sync when it sees the link drop.
        self.peer.held_acks = None;
        self.peer.flush_failed = false;
    }

    // ----- secondary side -----

    pub(super) fn on_peer_write(
        &mut self,
        id: RequestId,
        offset: u64,
        flags: u32,
        len_bytes: u32,
        data: Bytes,
    ) {
        if self.role == NodeRole::Primary || !self.replicating {
            self.protocol_error(format!("unexpected Write {id} from peer"));
            return;
        }
        if self.peer_id_out_of_order(id) {
            self.protocol_error(format!("Write {id} out of order or duplicated"));
            return;
        }
        let len = u64::from(len_bytes);
        if !self.range_ok(offset, len) || len > crate::wire::MAX_WRITE_PAYLOAD_BYTES as u64 {
            self.protocol_error(format!(
                "Write {id} outside the device or too long: {offset}+{len}"
            ));
            return;
        }
        if self.peer.writes.len() >= MAX_PEER_WRITES_IN_FLIGHT {
            self.protocol_error("peer exceeded the in-flight write window".to_string());
            return;
        }
        let payload = if flags & WRITE_FLAG_TRIM != 0 {
            Payload::Trim
        } else if flags & WRITE_FLAG_ZEROES != 0 {
            Payload::Zero
        } else {
            if data.len() as u64 != len {
                self.protocol_error(format!("Write {id}: length does not match data"));
                return;
            }
            Payload::Data(data)
        };
        self.peer.last_write_id = Some(id);
        if self.cfg.protocol == ProtocolMode::B {
            self.send(Message::RecvAck { id });
        }
        let key = self.peer.next_key;
        self.peer.next_key += 1;
        self.peer.writes.insert(
            key,
            PeerWrite {
                id,
                offset,
                len,
                payload,
                fua: flags & WRITE_FLAG_FUA != 0,
                epoch: self.peer.epoch,
                started: false,
                al_wait: None,
            },
        );
        self.data_queue.push_back(DataItem::Peer(key));
        self.pump();
    }

    /// A Write or Barrier `id` not above the last one received: it was
    /// reordered or repeated on the way (a Barrier overtaking a Write would
    /// acknowledge a flush that does not cover it).
    fn peer_id_out_of_order(&self, id: RequestId) -> bool {
        self.cfg.sim_fault != SimFault::IgnoreFrameOrder
            && self.peer.last_write_id.is_some_and(|last| id <= last)
    }

    pub(super) fn peer_write_done(&mut self, key: u64, ok: bool) {
        self.unlock(LockOwner::Peer(key));
        let Some(w) = self.peer.writes.remove(&key) else {
            return;
        };
        let _ = self.al.end_write(w.offset, w.len);
        if !ok {
            self.mark_oos(w.offset, w.len);
            self.local_write_failed();
            self.target_disk_failed();
        } else {
            self.wrote_unflushed(w.offset, w.len);
        }
        if self.replicating {
            self.send_peer_ack(Message::WriteAck {
                id: w.id,
                error: if ok { 0 } else { 5 },
            });
        }
        self.pump_barriers();
    }

    /// Send an ack (WriteAck, BarrierAck, ResyncAck) or an OutOfSync, or
    /// queue it behind the acks held until the Inconsistent superblock is
    /// durable.
    pub(super) fn send_peer_ack(&mut self, m: Message) {
        match &mut self.peer.held_acks {
            Some((_, held)) => held.push(m),
            None => self.send(m),
        }
    }

    /// Tell the peer that `offset..offset + len` is out of sync here, in
    /// order with the acks (a frame carries at most `u32::MAX` bytes).
    pub(super) fn send_out_of_sync(&mut self, offset: u64, len: u64) {
        const MAX: u64 = 1 << 30;
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(MAX);
            self.send_peer_ack(Message::OutOfSync {
                offset: at,
                len_bytes: n as u32,
            });
            at += n;
        }
    }

    /// A superblock write finished: release the acks held for it.
    pub(super) fn release_held_acks(&mut self) {
        let durable = self.persist.sb_durable;
        if self
            .peer
            .held_acks
            .as_ref()
            .is_some_and(|(seq, _)| *seq <= durable)
        {
            let (_, held) = self.peer.held_acks.take().expect("checked above");
            if self.replicating {
                for m in held {
                    self.send(m);
                }
            }
        }
    }

    /// A write the Primary sent failed on this disk. The Primary still
    /// acknowledges it to its client (its own copy holds it), so this disk
    /// no longer holds every acknowledged write and must not pass for a
    /// usable copy: a failover to it would lose them. It is Inconsistent
    /// until a resync of the marked blocks brings it up to date; that is
    /// persisted and told to the Primary, and a promotion then needs
    /// `--force`. The failed ack, and every ack after it, waits until the
    /// superblock saying so is durable.
    pub(super) fn local_write_failed(&mut self) {
        if matches!(
            self.disk,
            DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
        ) {
            self.set_disk(DiskState::Inconsistent);
            let seq = self.write_superblock();
            self.send_state_update();
            if self.persist.sb_durable < seq && self.peer.held_acks.is_none() {
                self.peer.held_acks = Some((seq, Vec::new()));
            }
        }
    }

    pub(super) fn on_peer_barrier(&mut self, id: RequestId) {
        if self.role == NodeRole::Primary || !self.replicating {
            self.protocol_error(format!("unexpected Barrier {id}"));
            return;
        }
        if self.peer_id_out_of_order(id) {
            self.protocol_error(format!("Barrier {id} out of order or duplicated"));
            return;
        }
        if self.peer.barriers.len() >= MAX_TRANSFER_LOG_WRITES {
            self.protocol_error("too many barriers outstanding".to_string());
            return;
        }
        self.peer.last_write_id = Some(id);
        self.peer.barriers.push_back((id, self.peer.epoch));
        self.peer.epoch += 1;
        self.pump_barriers();
    }

    /// Flush for the oldest barrier once every write of its epoch completed.
    fn pump_barriers(&mut self) {
        if self.peer.barrier_flushing {
            return;
        }
        let Some(&(id, epoch)) = self.peer.barriers.front() else {
            return;
        };
        if self.peer.writes.values().any(|w| w.epoch <= epoch) {
            return;
        }
        self.peer.barrier_flushing = true;
        self.issue_data_flush(OpPurpose::BarrierFlush(id));
    }

    pub(super) fn barrier_flush_done(&mut self, id: RequestId, ok: bool) {
        self.peer.barrier_flushing = false;
        if self.peer.barriers.front().map(|b| b.0) == Some(id) {
            let ok = ok && !std::mem::take(&mut self.peer.flush_failed);
            self.peer.barriers.pop_front();
            if self.replicating {
                self.send_peer_ack(Message::BarrierAck {
                    id,
                    error: if ok { 0 } else { 5 },
                });
            }
        }
        self.pump_barriers();
    }
}

impl AppWrite {
    fn flush_like(is_flush: bool) -> Self {
        AppWrite {
            offset: 0,
            len: 0,
            payload: Payload::Trim,
            fua: false,
            stage: Stage::Running,
            local_done: false,
            peer_done: false,
            failed: false,
            al_held: false,
            is_flush,
            barrier: None,
            peer_id: None,
        }
    }
}

pub(super) fn disk_op(offset: u64, len: u64, payload: &Payload, fua: bool) -> DiskOp {
    match payload {
        Payload::Data(d) => DiskOp::Write {
            offset,
            data: d.clone(),
            fua,
        },
        Payload::Zero => DiskOp::Zero {
            offset,
            len_bytes: len as u32,
            fua,
        },
        Payload::Trim => DiskOp::Trim {
            offset,
            len_bytes: len as u32,
        },
    }
}
