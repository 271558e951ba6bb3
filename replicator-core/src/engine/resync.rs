//! Resync (SyncTarget pulls out-of-sync blocks from the SyncSource in a
//! bounded window, in linear order), checksum-based resync, invalidate /
//! invalidate-remote, and online verify.
//!
//! Resync data never overwrites a newer application write: on the source a
//! resync read waits behind overlapping writes in the data FIFO (so the data
//! it reads includes every write whose frame went out before it), and on the
//! target resync writes and mirrored writes are applied in arrival order.
//! Must not decide sync direction (see `handshake`).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::durability::UNFLUSHED_MAX_RANGES;
use super::write::DataItem;
use super::{
    AdminError, ConnState, DiskError, DiskOp, Engine, Event, LockOwner, OpPurpose, Output,
    ReplState, ResyncProgress, Time,
};
use crate::generation;
use crate::types::{BlockIndex, DiskState, GenerationUuids, NodeRole, RequestId};
use crate::wire::Message;

/// Most resync requests a SyncTarget has outstanding: asked for and not yet
/// answered, plus answered and not yet written to its disk. Data that waits
/// for a slow disk counts, so memory stays bounded by this window.
pub const RESYNC_MAX_INFLIGHT_REQUESTS: usize = 32;
/// Largest range one resync request covers.
pub const RESYNC_REQUEST_MAX_BYTES: u64 = 128 * 1024;
/// With `resync_rate`, how much unused rate a resync keeps, in time: one
/// that sent less than the rate allowed (paused, held back behind
/// application writes, a slow peer) catches up by at most this much at
/// full speed, then goes at the rate again.
pub const RESYNC_RATE_MAX_SAVED_NS: u64 = 100_000_000;
/// A SyncTarget whose disk failed a resync write or flush requests nothing
/// more for this long, doubling with each failure in a row up to
/// [`RESYNC_DISK_RETRY_MAX_NS`]: a failing disk is not hammered (and its
/// log not flooded) while the operator replaces it; `replctl resync`
/// retries at once.
pub const RESYNC_DISK_RETRY_FIRST_NS: u64 = 1_000_000_000;
/// Longest wait between retries of a resync onto a failing disk.
pub const RESYNC_DISK_RETRY_MAX_NS: u64 = 16_000_000_000;
/// Most verify requests in flight.
pub const VERIFY_MAX_INFLIGHT_REQUESTS: usize = 16;
/// Range one verify request covers.
pub const VERIFY_REQUEST_BYTES: u64 = 128 * 1024;

/// The wait after the `failures`-th disk failure in a row (from 1).
fn resync_disk_wait_ns(failures: u32) -> u64 {
    RESYNC_DISK_RETRY_FIRST_NS
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u64::MAX)
        .min(RESYNC_DISK_RETRY_MAX_NS)
}

#[derive(Debug, Clone)]
pub(super) struct ResyncItem {
    pub id: RequestId,
    pub offset: u64,
    pub len: u64,
    /// Target: the data to write. Source: unused.
    pub data: Bytes,
    /// Source: the target's digest (checksum-based resync).
    pub digest: Option<[u8; 32]>,
}

#[derive(Debug)]
pub(super) struct TargetState {
    pub cursor: u64,
    pub inflight: BTreeMap<RequestId, (u64, u64)>,
    pub writes: BTreeMap<u64, ResyncItem>,
    /// Checksum-based resync: local reads whose digest goes into the request.
    pub csum_reads: BTreeMap<u64, ResyncItem>,
    pub next_id: u64,
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub started: Time,
    pub throttled_until: Option<Time>,
    /// Pacing: bytes requested since `rate_origin`.
    pub sent_bytes_for_rate: u64,
    pub rate_origin: Time,
    pub source_uuids: GenerationUuids,
    pub finishing: bool,
    /// Checksum requests whose range lost writes to a failed flush after
    /// the local read: an in-sync answer compares data no longer on disk.
    pub stale: BTreeSet<RequestId>,
    /// Disk failures (resync write or flush) since the last flush that
    /// made resync data durable; each one holds requests back for longer.
    pub disk_failures: u32,
    /// After a disk failure: no requests before this time.
    pub disk_retry_at: Option<Time>,
    /// The last failure was the source's read, not this disk.
    pub peer_disk_failed: bool,
    /// The link this resync runs on is still up: written data is
    /// acknowledged to the source (a write that completes after the link
    /// dropped belongs to a connection that no longer exists).
    pub linked: bool,
}

impl TargetState {
    /// Whether requests wait after a disk failure at `now`.
    fn waits_for_disk(&self, now: Time) -> bool {
        self.disk_retry_at.is_some_and(|u| now < u)
    }
}

#[derive(Debug, Default)]
pub(super) struct SourceState {
    pub reads: BTreeMap<u64, ResyncItem>,
    /// Resync data sent and not yet acknowledged by the target: request id
    /// -> (offset, len). The range's bits stay set until the target says it
    /// wrote it (`ResyncAck`), as DRBD clears on its resync write ack.
    pub unacked: BTreeMap<RequestId, (u64, u64)>,
    pub total_bytes: u64,
    pub done_bytes: u64,
}

/// A verify request: (offset, len, my digest, peer digest).
pub(super) type VerifyPending = (u64, u64, Option<[u8; 32]>, Option<[u8; 32]>);

#[derive(Debug)]
pub(super) struct VerifyState {
    /// I drive the verify (VerifyS).
    pub driver: bool,
    pub cursor: u64,
    pub next_id: u64,
    /// id -> (offset, len, my digest, peer digest)
    pub pending: BTreeMap<RequestId, VerifyPending>,
    /// Reads in flight: op key -> request id (and whether to reply to peer).
    pub reads: BTreeMap<u64, (RequestId, u64, u64, bool)>,
    pub next_key: u64,
    pub mismatched_bytes: u64,
    pub done: bool,
    /// The driver is not Primary: the peer (which may be writing) reads
    /// first, and the local read is queued when its reply arrives, behind
    /// the mirrored writes that preceded the reply.
    pub peer_first: bool,
}

fn digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Engine {
    pub(super) fn resync_item_range(&self, k: u64) -> (u64, u64) {
        let item = self
            .target
            .as_ref()
            .and_then(|t| t.writes.get(&k).or_else(|| t.csum_reads.get(&k)))
            .or_else(|| self.source.as_ref().and_then(|s| s.reads.get(&k)))
            .expect("queued resync item");
        (item.offset, item.offset + item.len)
    }

    pub(super) fn start_resync_item(&mut self, item: DataItem) {
        match item {
            DataItem::ResyncRead(k) => {
                let csum = self.target.as_ref().and_then(|t| t.csum_reads.get(&k));
                let (purpose, it) = match csum {
                    Some(it) => (OpPurpose::CsumRead(k), it),
                    None => (
                        OpPurpose::ResyncRead(k),
                        &self.source.as_ref().expect("source").reads[&k],
                    ),
                };
                let (offset, len) = (it.offset, it.len);
                self.new_op(
                    purpose,
                    DiskOp::Read {
                        offset,
                        len_bytes: len as u32,
                    },
                );
            }
            DataItem::ResyncWrite(k) => {
                let it = &self.target.as_ref().expect("target").writes[&k];
                let (offset, data) = (it.offset, it.data.clone());
                self.new_op(
                    OpPurpose::ResyncWrite(k),
                    DiskOp::Write {
                        offset,
                        data,
                        fua: false,
                    },
                );
            }
            _ => unreachable!("not a resync item"),
        }
    }

    pub(super) fn start_sync_target(&mut self) {
        let source_uuids = self
            .hs
            .peer_state
            .map(|p| p.uuids)
            .expect("peer state known");
        self.set_disk(DiskState::Inconsistent);
        // The source shows its peer's disk as it is while the resync runs
        // (its status said UpToDate until the end).
        self.send_state_update();
        // The merged bitmap must survive a crash before resync data lands.
        self.bitmap.mark_all_dirty();
        self.write_dirty_bitmap_pages();
        self.write_superblock();
        let total = self.bitmap.out_of_sync_bytes();
        self.target = Some(TargetState {
            cursor: 0,
            inflight: BTreeMap::new(),
            writes: BTreeMap::new(),
            csum_reads: BTreeMap::new(),
            next_id: 1,
            total_bytes: total,
            done_bytes: 0,
            started: self.now,
            throttled_until: None,
            sent_bytes_for_rate: 0,
            rate_origin: self.now,
            source_uuids,
            finishing: false,
            stale: BTreeSet::new(),
            disk_failures: 0,
            disk_retry_at: None,
            peer_disk_failed: false,
            linked: true,
        });
        self.set_repl(ReplState::SyncTarget);
        self.update_paused();
        self.resync_pump();
    }

    pub(super) fn start_sync_source(&mut self) {
        let total = self.bitmap.out_of_sync_bytes();
        self.source = Some(SourceState {
            reads: BTreeMap::new(),
            unacked: BTreeMap::new(),
            total_bytes: total,
            done_bytes: 0,
        });
        self.set_repl(ReplState::SyncSource);
        self.update_paused();
        self.push(Output::Event(Event::Resync(ResyncProgress {
            done_bytes: 0,
            total_bytes: total,
            rate_bytes_per_s: 0,
            eta_s: 0,
        })));
    }

    /// Issue resync requests while the window has room.
    pub(super) fn resync_pump(&mut self) {
        if self.repl != ReplState::SyncTarget || !self.replicating {
            return;
        }
        let now = self.now;
        let rate = self.cfg.resync_rate_bytes_per_s;
        let block = u64::from(self.cfg.bitmap_block_bytes);
        let size = self.cfg.size_bytes;
        let Some(t) = self.target.as_mut() else {
            return;
        };
        if t.finishing {
            return;
        }
        if t.throttled_until.is_some_and(|u| now < u) || t.waits_for_disk(now) {
            return;
        }
        t.throttled_until = None;
        self.end_disk_wait();
        let Some(t) = self.target.as_mut() else {
            return;
        };
        let mut requests = Vec::new();
        while t.inflight.len() + t.writes.len() < RESYNC_MAX_INFLIGHT_REQUESTS
            && self.unflushed.len() < 2 * UNFLUSHED_MAX_RANGES
        {
            if let Some(rate) = rate {
                // Allowed bytes so far at the configured rate.
                let at_rate = |ns: u64| (u128::from(rate) * u128::from(ns) / 1_000_000_000) as u64;
                let mut allowed =
                    at_rate(now.0.saturating_sub(t.rate_origin.0)) + RESYNC_REQUEST_MAX_BYTES;
                if allowed.saturating_sub(t.sent_bytes_for_rate)
                    > RESYNC_REQUEST_MAX_BYTES + at_rate(RESYNC_RATE_MAX_SAVED_NS)
                {
                    // Too much unused rate saved up: start pacing afresh.
                    t.rate_origin = now;
                    t.sent_bytes_for_rate = 0;
                    allowed = RESYNC_REQUEST_MAX_BYTES;
                }
                if t.sent_bytes_for_rate >= allowed {
                    let wait_ns = ((t.sent_bytes_for_rate - allowed + 1) as u128 * 1_000_000_000
                        / u128::from(rate.max(1))) as u64;
                    t.throttled_until = Some(now.plus_ns(wait_ns.max(1_000_000)));
                    break;
                }
            }
            let Some(first) = self.bitmap.next_set(BlockIndex(t.cursor)) else {
                if t.inflight.is_empty() && t.writes.is_empty() {
                    if self.bitmap.count() == 0 {
                        t.finishing = true;
                        break;
                    }
                    // Bits set behind the cursor (re-dirtied): another pass.
                    t.cursor = 0;
                    continue;
                }
                break;
            };
            // Skip blocks with a request or write already outstanding.
            let offset = first.0 * block;
            let busy = t
                .inflight
                .values()
                .chain(
                    t.writes
                        .values()
                        .map(|w| (w.offset, w.len))
                        .collect::<Vec<_>>()
                        .iter(),
                )
                .any(|&(o, l)| o <= offset && offset < o + l);
            if busy {
                t.cursor = first.0 + 1;
                continue;
            }
            let mut end_block = first.0 + 1;
            let max_blocks = (RESYNC_REQUEST_MAX_BYTES / block).max(1);
            while end_block - first.0 < max_blocks && self.bitmap.get(BlockIndex(end_block)) {
                end_block += 1;
            }
            let end = (end_block * block).min(size);
            let len = end - offset;
            let id = RequestId(t.next_id);
            t.next_id += 1;
            t.inflight.insert(id, (offset, len));
            t.cursor = end_block;
            t.sent_bytes_for_rate += len;
            requests.push((id, offset, len));
        }
        let finishing = t.finishing;
        for (id, offset, len) in requests {
            if self.checksum_resync {
                // Digest the local copy first; the request carries it.
                let k = self.peer.next_key;
                self.peer.next_key += 1;
                let item = ResyncItem {
                    id,
                    offset,
                    len,
                    data: Bytes::new(),
                    digest: None,
                };
                let t = self.target.as_mut().expect("target");
                t.csum_reads.insert(k, item);
                self.data_queue.push_back(DataItem::ResyncRead(k));
            } else {
                self.send(Message::ResyncRequest {
                    id,
                    offset,
                    len_bytes: len as u32,
                });
            }
        }
        if self.checksum_resync {
            self.pump_data_queue();
        }
        if finishing {
            self.issue_data_flush(OpPurpose::TargetFinalFlush);
        }
    }

    pub(super) fn on_resync_request(
        &mut self,
        id: RequestId,
        offset: u64,
        len: u32,
        target_digest: Option<[u8; 32]>,
    ) {
        let len = u64::from(len);
        let Some(src) = self.source.as_ref() else {
            return self.protocol_error(format!("ResyncRequest {id} while not SyncSource"));
        };
        if !self.range_ok(offset, len) || len > RESYNC_REQUEST_MAX_BYTES {
            return self.protocol_error(format!("ResyncRequest {id} for bad range {offset}+{len}"));
        }
        // The target's window counts its requests and the data it has not
        // written yet; an ack on its way may still be counted here, as may
        // acks it holds back behind a superblock write, hence twice.
        if src.reads.len() >= RESYNC_MAX_INFLIGHT_REQUESTS
            || src.reads.len() + src.unacked.len() >= 2 * RESYNC_MAX_INFLIGHT_REQUESTS
        {
            return self.protocol_error("peer exceeded the resync window".to_string());
        }
        let k = self.peer.next_key;
        self.peer.next_key += 1;
        self.source.as_mut().expect("source").reads.insert(
            k,
            ResyncItem {
                id,
                offset,
                len,
                data: Bytes::new(),
                digest: target_digest,
            },
        );
        self.data_queue.push_back(DataItem::ResyncRead(k));
        self.pump();
    }

    pub(super) fn resync_read_done(&mut self, k: u64, result: Result<Bytes, DiskError>) {
        self.unlock(LockOwner::Resync(k));
        let Some(src) = self.source.as_mut() else {
            return;
        };
        let Some(item) = src.reads.remove(&k) else {
            return;
        };
        if !self.replicating {
            return;
        }
        let data = match result {
            Ok(data) => data,
            Err(e) => {
                // Cannot serve: the bits stay set on both sides, and the
                // target asks again after a wait (as DRBD's negative resync
                // reply); the link stays up for everything else.
                return self.send(Message::ResyncReadFailed {
                    id: item.id,
                    error: u16::try_from(e.code).unwrap_or(u16::MAX),
                });
            }
        };
        match item.digest {
            Some(d) if d == digest(&data) => {
                // Nothing to write: the copies match now.
                src.done_bytes += item.len;
                self.send(Message::ResyncInSync {
                    id: item.id,
                    offset: item.offset,
                    len_bytes: item.len as u32,
                });
                let _ = self.bitmap.clear_range(item.offset, item.len);
            }
            _ => {
                // The bits stay until the target acknowledges its write.
                src.unacked.insert(item.id, (item.offset, item.len));
                self.send(Message::ResyncData {
                    id: item.id,
                    offset: item.offset,
                    data,
                });
            }
        }
    }

    /// The target wrote (or failed to write) the data of request `id`.
    pub(super) fn on_resync_ack(&mut self, id: RequestId, error: u16) {
        let Some(src) = self.source.as_mut() else {
            return self.protocol_error(format!("ResyncAck {id} while not SyncSource"));
        };
        let Some((offset, len)) = src.unacked.remove(&id) else {
            return self.protocol_error(format!("ResyncAck for unknown {id}"));
        };
        if error == 0 {
            src.done_bytes += len;
            let _ = self.bitmap.clear_range(offset, len);
        }
        // On an error the range stays marked: the target asks for it again
        // after its disk wait.
    }

    /// The target lost written data (resync or mirrored writes) to a failed
    /// flush and marked it again (`OutOfSync`): the source's progress goes
    /// back by as much.
    pub(super) fn source_range_lost(&mut self, len: u64) {
        if let Some(src) = self.source.as_mut() {
            src.done_bytes = src.done_bytes.saturating_sub(len);
        }
    }

    /// Checksum-based resync: the local copy was read; ask the source for
    /// the range unless its digest matches ours.
    pub(super) fn csum_read_done(&mut self, k: u64, result: Result<Bytes, DiskError>) {
        self.unlock(LockOwner::Resync(k));
        let Some(item) = self.target.as_mut().and_then(|t| t.csum_reads.remove(&k)) else {
            return;
        };
        let asked = self
            .target
            .as_ref()
            .is_some_and(|t| t.inflight.contains_key(&item.id));
        if !self.replicating || !asked {
            return;
        }
        match result {
            Ok(data) => self.send(Message::ResyncChecksumRequest {
                id: item.id,
                offset: item.offset,
                len_bytes: item.len as u32,
                digest: digest(&data),
            }),
            // Unreadable here: fetch the data unconditionally.
            Err(_) => self.send(Message::ResyncRequest {
                id: item.id,
                offset: item.offset,
                len_bytes: item.len as u32,
            }),
        }
    }

    pub(super) fn on_resync_data(
        &mut self,
        id: RequestId,
        offset: u64,
        data: Option<Bytes>,
        in_sync_len: u32,
    ) {
        let Some(t) = self.target.as_mut() else {
            return self.protocol_error(format!("resync reply {id} while not SyncTarget"));
        };
        let Some(&(o, l)) = t.inflight.get(&id) else {
            return self.protocol_error(format!("resync reply for unknown {id}"));
        };
        let len = data
            .as_ref()
            .map_or(u64::from(in_sync_len), |d| d.len() as u64);
        if o != offset || l != len {
            return self.protocol_error(format!(
                "resync reply {id} covers {offset}+{len}, asked {o}+{l}"
            ));
        }
        t.inflight.remove(&id);
        let stale = t.stale.remove(&id);
        match data {
            // The bits stay: the next pass asks again.
            None if stale => {}
            None => {
                t.done_bytes += len;
                let _ = self.bitmap.clear_range(offset, len);
            }
            Some(data) => {
                let k = self.peer.next_key;
                self.peer.next_key += 1;
                t.writes.insert(
                    k,
                    ResyncItem {
                        id,
                        offset,
                        len,
                        data,
                        digest: None,
                    },
                );
                self.data_queue.push_back(DataItem::ResyncWrite(k));
            }
        }
        self.pump();
    }

    pub(super) fn resync_write_done(&mut self, k: u64, ok: bool) {
        self.unlock(LockOwner::Resync(k));
        let Some(t) = self.target.as_mut() else {
            return;
        };
        let Some(item) = t.writes.remove(&k) else {
            return;
        };
        let ack = t.linked && self.replicating;
        if ok {
            t.done_bytes += item.len;
            let _ = self.bitmap.clear_range(item.offset, item.len);
            self.wrote_unflushed(item.offset, item.len);
        } else {
            self.target_disk_failed();
        }
        if ack {
            // With the other acks, in order: a later failure's mark must
            // reach the source after this clear, never before it.
            self.send_peer_ack(Message::ResyncAck {
                id: item.id,
                error: if ok { 0 } else { 5 },
            });
        }
    }

    /// The SyncTarget's disk failed a resync write or a flush: the blocks
    /// stay (or are again) out of sync, and requests wait before the next
    /// try.
    pub(super) fn target_disk_failed(&mut self) {
        self.resync_failed_on(false);
    }

    /// The SyncSource could not read the data of request `id`: its blocks
    /// stay out of sync, and requests wait as after a failure here. (The
    /// error itself is logged and shown by the source, whose disk it is.)
    pub(super) fn on_resync_read_failed(&mut self, id: RequestId, _error: u16) {
        let Some(t) = self.target.as_mut() else {
            return self.protocol_error(format!("ResyncReadFailed {id} while not SyncTarget"));
        };
        if t.inflight.remove(&id).is_none() {
            return self.protocol_error(format!("ResyncReadFailed for unknown {id}"));
        }
        t.stale.remove(&id);
        self.resync_failed_on(true);
        self.pump();
    }

    /// A resync try failed on this disk or (`peer`) on the source's: one
    /// step of the wait before the next requests.
    fn resync_failed_on(&mut self, peer: bool) {
        let now = self.now;
        let Some(t) = self.target.as_mut() else {
            return;
        };
        if t.waits_for_disk(now) {
            // Another failure of the same try (the requests of one window
            // fail together): one step of the wait.
            return;
        }
        t.disk_failures = t.disk_failures.saturating_add(1);
        t.disk_retry_at = Some(now.plus_ns(resync_disk_wait_ns(t.disk_failures)));
        t.peer_disk_failed = peer;
        // The source's status says its target waits (STATE_FLAG_RESYNC_DISK_WAIT).
        self.send_state_update();
    }

    /// The wait a SyncTarget is in after a disk failure, in seconds.
    pub(super) fn resync_disk_wait_s(&self) -> Option<u64> {
        let t = self
            .target
            .as_ref()
            .filter(|t| t.waits_for_disk(self.now))?;
        Some(resync_disk_wait_ns(t.disk_failures) / 1_000_000_000)
    }

    /// `replctl resync` on a SyncTarget waiting after disk failures: the
    /// operator says the disk is sound again, so the next try is now.
    pub(super) fn target_retry_now(&mut self) {
        if let Some(t) = self.target.as_mut().filter(|t| t.disk_failures > 0) {
            t.disk_failures = 0;
            self.end_disk_wait();
            self.resync_pump();
        }
    }

    /// A wait after a disk failure is over (it ran out, or the operator
    /// ended it): the source's status stops saying that its target waits.
    fn end_disk_wait(&mut self) {
        if self
            .target
            .as_mut()
            .and_then(|t| t.disk_retry_at.take())
            .is_some()
        {
            self.send_state_update();
        }
    }

    pub(super) fn target_final_flush_done(&mut self, ok: bool) {
        let Some(t) = self.target.as_mut() else {
            return;
        };
        t.finishing = false;
        // A failed flush was counted as the target's disk failure when it
        // was reported (`data_flush_done`).
        if !ok || !self.replicating || self.bitmap.count() > 0 {
            // Not finished after all (new bits or a failed flush): keep going.
            return;
        }
        let src = t.source_uuids;
        self.target = None;
        self.uuids.current = src.current & !generation::UUID_PRIMARY_BIT;
        self.uuids.bitmap = 0;
        // Keep the source's bitmap UUID in our history: if the source never
        // hears that we finished, it can still resync us by bitmap.
        self.uuids.history = src.history;
        if src.bitmap != 0 {
            self.push_history(src.bitmap);
        }
        self.crashed_primary = false;
        self.set_disk(DiskState::UpToDate);
        self.bitmap.mark_all_dirty();
        self.write_dirty_bitmap_pages();
        self.write_superblock();
        self.send(Message::ResyncDone);
        self.set_repl(ReplState::Established);
        self.report_oos();
    }

    pub(super) fn on_resync_done_from_target(&mut self) {
        match self.source.as_ref() {
            None => return self.protocol_error("ResyncDone while not SyncSource".to_string()),
            Some(s) if !s.reads.is_empty() => {
                return self
                    .protocol_error("ResyncDone with resync requests outstanding".to_string())
            }
            Some(s) if !s.unacked.is_empty() => {
                return self
                    .protocol_error("ResyncDone with resync data unacknowledged".to_string())
            }
            Some(_) => {}
        }
        self.source = None;
        if self.bitmap.count() == 0 {
            if self.uuids.bitmap != 0 {
                let b = self.uuids.bitmap;
                self.push_history(b);
                self.uuids.bitmap = 0;
            }
            self.crashed_primary = false;
        }
        if self.disk == DiskState::Consistent {
            self.set_disk(DiskState::UpToDate);
        }
        self.write_dirty_bitmap_pages();
        self.write_superblock();
        self.set_repl(ReplState::Established);
        if let Some(ps) = self.hs.peer_state.as_mut() {
            ps.disk = DiskState::UpToDate;
        }
        let role = self.peer_role;
        self.set_peer(role, Some(DiskState::UpToDate));
        self.report_oos();
        if self.bitmap.count() > 0 {
            // Blocks marked while the resync ran (the target's disk failed
            // a write or a flush): another round, from a new handshake.
            self.renegotiate("blocks marked during the resync");
        }
    }

    pub(super) fn resync_link_lost(&mut self) {
        // In-flight disk writes of resync data still complete and clear
        // their bits (the data came from the source); requests are dropped.
        if let Some(t) = self.target.as_mut() {
            t.inflight.clear();
            t.stale.clear();
            t.finishing = false;
            t.linked = false;
        }
        if let Some(s) = self.source.as_mut() {
            // Their bits stay set: the next handshake resyncs them.
            s.unacked.clear();
        }
        let queued_writes: Vec<u64> = self
            .data_queue
            .iter()
            .filter_map(|i| match i {
                DataItem::ResyncWrite(k) | DataItem::ResyncRead(k) => Some(*k),
                _ => None,
            })
            .collect();
        for k in queued_writes {
            self.data_queue
                .retain(|i| *i != DataItem::ResyncWrite(k) && *i != DataItem::ResyncRead(k));
            if let Some(t) = self.target.as_mut() {
                t.writes.remove(&k);
                t.csum_reads.remove(&k);
            }
            if let Some(s) = self.source.as_mut() {
                s.reads.remove(&k);
            }
        }
        let target_busy = self
            .target
            .as_ref()
            .is_some_and(|t| !t.writes.is_empty() || !t.csum_reads.is_empty());
        if !target_busy {
            self.target = None;
        }
        let source_busy = self.source.as_ref().is_some_and(|s| !s.reads.is_empty());
        if !source_busy {
            self.source = None;
        }
        self.data_queue
            .retain(|i| !matches!(i, DataItem::VerifyRead(_)));
        self.verify = None;
    }

    pub(super) fn resync_progress(&self) -> Option<ResyncProgress> {
        let (done, total, started) = match (&self.target, &self.source) {
            (Some(t), _) => (t.done_bytes, t.total_bytes, t.started),
            (None, Some(s)) => (s.done_bytes, s.total_bytes, self.now),
            _ => return None,
        };
        let elapsed_ns = self.now.0.saturating_sub(started.0).max(1);
        let rate = (u128::from(done) * 1_000_000_000 / u128::from(elapsed_ns)) as u64;
        let left = total.saturating_sub(done);
        let eta = left.checked_div(rate).unwrap_or(0);
        Some(ResyncProgress {
            done_bytes: done,
            total_bytes: total,
            rate_bytes_per_s: rate,
            eta_s: eta,
        })
    }

    /// `invalidate`: throw away the local copy and resync it from the peer.
    pub(super) fn invalidate_local(&mut self) -> Result<(), AdminError> {
        if self.role == NodeRole::Primary {
            return Err(AdminError::WrongState {
                detail: "refusing to invalidate the Primary's data".to_string(),
            });
        }
        if self.target.is_some() || self.source.is_some() {
            return Err(AdminError::WrongState {
                detail: "a resync is already running".to_string(),
            });
        }
        // Forget the local generation: the next handshake sees a
        // just-created disk and fully syncs it from the peer (this also
        // resolves a split brain in the peer's favour, like DRBD's
        // --discard-my-data).
        self.push_history(self.uuids.current);
        self.uuids.current = generation::UUID_JUST_CREATED;
        self.uuids.bitmap = 0;
        self.split_brain = false;
        self.bitmap.set_all();
        self.set_disk(DiskState::Inconsistent);
        self.write_dirty_bitmap_pages();
        self.write_superblock();
        self.report_oos();
        if self.conn == ConnState::StandAlone {
            self.set_conn(ConnState::Connecting);
        }
        self.renegotiate("invalidate");
        Ok(())
    }

    /// `invalidate-remote`: overwrite the peer from here: start a new
    /// generation with every block marked, so the peer becomes SyncTarget.
    pub(super) fn invalidate_remote(&mut self) -> Result<(), AdminError> {
        if self.disk != DiskState::UpToDate {
            return Err(AdminError::StaleData { disk: self.disk });
        }
        if self.peer_role == Some(NodeRole::Primary) {
            return Err(AdminError::PeerIsPrimary);
        }
        if self.target.is_some() || self.source.is_some() {
            return Err(AdminError::WrongState {
                detail: "a resync is already running".to_string(),
            });
        }
        self.rotate_uuid();
        self.bitmap.set_all();
        self.write_dirty_bitmap_pages();
        self.write_superblock();
        self.report_oos();
        self.renegotiate("invalidate-remote");
        Ok(())
    }

    /// Drop a connected link so the handshake runs again with the new state.
    pub(super) fn renegotiate(&mut self, why: &str) {
        if self.conn == ConnState::Connected {
            self.send(Message::Disconnect {
                reason: format!("{why}: renegotiating"),
            });
            self.push(Output::CloseLink {
                reason: format!("{why}: renegotiating"),
            });
            self.on_link_lost(false);
        }
    }

    // ----- online verify -----

    pub(super) fn start_verify(&mut self) -> Result<(), AdminError> {
        if self.repl != ReplState::Established {
            return Err(AdminError::WrongState {
                detail: format!(
                    "verify needs an Established connection, not {}",
                    self.repl.name()
                ),
            });
        }
        self.verify = Some(VerifyState {
            driver: true,
            cursor: 0,
            next_id: 1,
            pending: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_key: 1,
            mismatched_bytes: 0,
            done: false,
            peer_first: self.role != NodeRole::Primary,
        });
        self.set_repl(ReplState::VerifyS);
        self.verify_pump();
        Ok(())
    }

    pub(super) fn verify_pump(&mut self) {
        let size = self.cfg.size_bytes;
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if !v.driver || v.done || !self.replicating {
            return;
        }
        let mut reqs = Vec::new();
        let mut peer_first_reqs = Vec::new();
        while v.pending.len() < VERIFY_MAX_INFLIGHT_REQUESTS && v.cursor < size {
            let offset = v.cursor;
            let len = VERIFY_REQUEST_BYTES.min(size - offset);
            v.cursor += len;
            let id = RequestId(v.next_id);
            v.next_id += 1;
            v.pending.insert(id, (offset, len, None, None));
            if v.peer_first {
                peer_first_reqs.push((id, offset, len));
                continue;
            }
            let key = v.next_key;
            v.next_key += 1;
            v.reads.insert(key, (id, offset, len, false));
            reqs.push(key);
        }
        let finished = v.pending.is_empty() && v.cursor >= size;
        if finished {
            v.done = true;
            let mismatched = v.mismatched_bytes;
            self.verify = None;
            self.send(Message::VerifyDone);
            self.set_repl(ReplState::Established);
            self.push(Output::Event(Event::VerifyDone {
                mismatched_bytes: mismatched,
            }));
            return;
        }
        for (id, offset, len) in peer_first_reqs {
            self.send(Message::VerifyRequest {
                id,
                offset,
                len_bytes: len as u32,
            });
        }
        for key in reqs {
            self.data_queue.push_back(DataItem::VerifyRead(key));
        }
        self.pump_data_queue();
    }

    /// A verify read got its range: the driver tells the peer to read the
    /// same range now (the request travels in order with mirrored writes,
    /// so both reads see the same writes).
    pub(super) fn start_verify_read(&mut self, key: u64) {
        let v = self.verify.as_ref().expect("verify running");
        let (id, offset, len, reply) = v.reads[&key];
        if !reply && !v.peer_first {
            self.send(Message::VerifyRequest {
                id,
                offset,
                len_bytes: len as u32,
            });
        }
        self.new_op(
            OpPurpose::VerifyRead(key),
            DiskOp::Read {
                offset,
                len_bytes: len as u32,
            },
        );
    }

    pub(super) fn on_verify_request(&mut self, id: RequestId, offset: u64, len: u32) {
        let len64 = u64::from(len);
        if !self.range_ok(offset, len64) || len64 > VERIFY_REQUEST_BYTES {
            return self.protocol_error(format!("VerifyRequest {id} for bad range"));
        }
        if self.verify.is_none() {
            if self.repl != ReplState::Established {
                return self.protocol_error("VerifyRequest while not Established".to_string());
            }
            self.verify = Some(VerifyState {
                driver: false,
                cursor: 0,
                next_id: 0,
                pending: BTreeMap::new(),
                reads: BTreeMap::new(),
                next_key: 1,
                mismatched_bytes: 0,
                done: false,
                peer_first: false,
            });
            self.set_repl(ReplState::VerifyT);
        }
        let v = self.verify.as_mut().expect("verify");
        if v.driver || v.reads.len() >= VERIFY_MAX_INFLIGHT_REQUESTS {
            return self.protocol_error("peer exceeded the verify window".to_string());
        }
        let key = v.next_key;
        v.next_key += 1;
        v.reads.insert(key, (id, offset, len64, true));
        self.data_queue.push_back(DataItem::VerifyRead(key));
        self.pump();
    }

    pub(super) fn verify_read_done(&mut self, key: u64, result: Result<Bytes, DiskError>) {
        self.unlock(LockOwner::Verify(key));
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let Some((id, offset, len, reply)) = v.reads.remove(&key) else {
            return;
        };
        // A failed read counts as a difference.
        let d = result.map(|data| digest(&data)).unwrap_or([0xFF; 32]);
        if reply {
            if self.replicating {
                self.send(Message::VerifyReply {
                    id,
                    offset,
                    len_bytes: len as u32,
                    digest: d,
                });
            }
            return;
        }
        if let Some(p) = v.pending.get_mut(&id) {
            p.2 = Some(d);
        }
        self.verify_compare(id);
    }

    pub(super) fn on_verify_reply(&mut self, id: RequestId, offset: u64, len: u32, d: [u8; 32]) {
        let Some(v) = self.verify.as_mut() else {
            return self.protocol_error("VerifyReply without a verify".to_string());
        };
        match v.pending.get_mut(&id) {
            Some(p) if p.0 == offset && p.1 == u64::from(len) && p.3.is_none() => p.3 = Some(d),
            _ => return self.protocol_error(format!("unexpected VerifyReply {id}")),
        }
        if v.peer_first {
            let key = v.next_key;
            v.next_key += 1;
            v.reads.insert(key, (id, offset, u64::from(len), false));
            self.data_queue.push_back(DataItem::VerifyRead(key));
            return self.pump_data_queue();
        }
        self.verify_compare(id);
    }

    fn verify_compare(&mut self, id: RequestId) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let Some(&(offset, len, Some(mine), Some(theirs))) = v.pending.get(&id) else {
            return;
        };
        v.pending.remove(&id);
        if mine != theirs {
            v.mismatched_bytes += len;
            self.mark_oos(offset, len);
        }
        self.verify_pump();
    }

    pub(super) fn on_verify_done_from_peer(&mut self) {
        if self.verify.as_ref().is_some_and(|v| v.driver) {
            return self.protocol_error("VerifyDone from the peer while we drive".to_string());
        }
        if self.verify.as_ref().is_some_and(|v| !v.reads.is_empty()) {
            return self.protocol_error("VerifyDone with verify reads outstanding".to_string());
        }
        self.verify = None;
        if self.repl == ReplState::VerifyT {
            self.set_repl(ReplState::Established);
        }
    }
}
