//! What a node wrote (client writes, the Primary's mirrored writes, resync
//! data) that no flush of its data disk has covered yet. A failed flush is
//! a write-back error, which Linux reports once, at one fsync: any of those
//! writes may be gone from the disk while later flushes succeed. So a
//! Secondary marks exactly those ranges out of sync again (a SyncTarget
//! then sends them round again), and one that is not resyncing turns
//! Inconsistent and fails its next BarrierAck (the Primary then marks every
//! write it has not seen flushed).
//!
//! Must not decide when to flush for barriers or resync; it only counts
//! what each flush covers, and asks for a flush of its own when many
//! writes went uncovered.

use std::collections::{BTreeMap, VecDeque};

use super::{DiskOp, Engine, OpId, OpPurpose};
use crate::types::{DiskState, NodeRole};

/// Uncovered writes after which the node flushes on its own; a SyncTarget
/// stops requesting resync data at twice as many.
pub const UNFLUSHED_MAX_RANGES: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Unflushed {
    /// (sequence, offset, len) in completion order.
    ranges: VecDeque<(u64, u64, u64)>,
    next_seq: u64,
    /// Data flushes in flight: the first sequence each does not cover
    /// (writes completed after it was issued).
    flushes: BTreeMap<OpId, u64>,
}

impl Unflushed {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Note a completed write; true when the node should flush now (many
    /// writes uncovered, and no flush under way that will cover some).
    fn wrote(&mut self, offset: u64, len: u64) -> bool {
        self.ranges.push_back((self.next_seq, offset, len));
        self.next_seq += 1;
        self.ranges.len() >= UNFLUSHED_MAX_RANGES && self.flushes.is_empty()
    }

    fn flush_issued(&mut self, op: OpId) {
        self.flushes.insert(op, self.next_seq);
    }

    /// Op `op` finished. None if it was no data flush; else how many
    /// writes it made durable, or (failed) every uncovered write, which may
    /// be lost.
    fn flush_done(&mut self, op: OpId, ok: bool) -> Option<FlushDone> {
        let covers = self.flushes.remove(&op)?;
        if ok {
            let before = self.ranges.len();
            while self.ranges.front().is_some_and(|&(seq, _, _)| seq < covers) {
                self.ranges.pop_front();
            }
            return Some(FlushDone::Durable(before - self.ranges.len()));
        }
        Some(FlushDone::Lost(
            self.ranges.drain(..).map(|(_, o, l)| (o, l)).collect(),
        ))
    }
}

/// What a finished data flush did.
#[derive(Debug, PartialEq, Eq)]
enum FlushDone {
    /// It succeeded, making this many writes durable.
    Durable(usize),
    /// It failed: these (offset, len) ranges may be lost.
    Lost(Vec<(u64, u64)>),
}

impl Engine {
    /// Flush the data disk, noting which writes the flush covers.
    pub(super) fn issue_data_flush(&mut self, purpose: OpPurpose) {
        let op = self.new_op(purpose, DiskOp::Flush);
        self.unflushed.flush_issued(op);
    }

    /// A data write completed (the client's, the Primary's mirrored one,
    /// resync data). A Primary's own count too: demoted, a failed flush
    /// may still lose them.
    pub(super) fn wrote_unflushed(&mut self, offset: u64, len: u64) {
        if self.unflushed.wrote(offset, len) {
            self.issue_data_flush(OpPurpose::CheckpointFlush);
        }
    }

    /// Disk op `op` finished; for a flush of the data disk, act on what it
    /// may have lost. A Primary that lost writes this way has no better
    /// copy to take them from here (the Secondary's may lack others); the
    /// client's flush fails, nothing is marked.
    pub(super) fn data_flush_done(&mut self, op: OpId, ok: bool) {
        let lost = match self.unflushed.flush_done(op, ok) {
            None => return,
            Some(FlushDone::Durable(written)) => {
                if let Some(t) = self.target.as_mut().filter(|_| written > 0) {
                    // Writes reached the disk and a flush: it works again.
                    t.disk_failures = 0;
                }
                return;
            }
            Some(FlushDone::Lost(_)) if self.role == NodeRole::Primary => return,
            Some(FlushDone::Lost(lost)) => lost,
        };
        let tell_source = self.replicating && self.target.as_ref().is_some_and(|t| t.linked);
        for (offset, len) in lost {
            if tell_source {
                // The source cleared these on their acks (or never marked
                // the mirrored writes): it marks them again.
                self.send_out_of_sync(offset, len);
            }
            if let Some(t) = self.target.as_mut() {
                t.done_bytes = t.done_bytes.saturating_sub(len);
                let end = offset + len;
                for (id, &(o, l)) in &t.inflight {
                    if o < end && offset < o + l {
                        t.stale.insert(*id);
                    }
                }
            }
            self.mark_oos(offset, len);
        }
        if self.target.is_none() {
            self.peer.flush_failed = true;
            self.local_write_failed();
        } else {
            debug_assert_eq!(self.disk, DiskState::Inconsistent);
            self.target_disk_failed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_covers_the_writes_completed_before_it_was_issued() {
        let mut u = Unflushed::default();
        u.wrote(0, 4096);
        u.wrote(8192, 4096);
        u.flush_issued(OpId(1));
        u.wrote(16384, 4096);
        assert_eq!(u.flush_done(OpId(1), true), Some(FlushDone::Durable(2)));
        assert_eq!(u.flush_done(OpId(1), true), None, "no longer a flush");
        u.flush_issued(OpId(2));
        assert_eq!(
            u.flush_done(OpId(2), false),
            Some(FlushDone::Lost(vec![(16384, 4096)]))
        );
        u.flush_issued(OpId(3));
        assert_eq!(u.flush_done(OpId(3), true), Some(FlushDone::Durable(0)));
    }
}
