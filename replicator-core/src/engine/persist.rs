//! Metadata persistence decisions: when the superblock (two alternating
//! slots, written one at a time), AL transactions and bitmap pages are
//! written, and what the writes that depend on them wait for.
//!
//! Byte layouts come from the `metadata`, `activity_log` and `bitmap` modules;
//! this module only decides what to write where and when. Must not do I/O.

use bytes::Bytes;

use super::{DiskOp, Engine, OpPurpose};
use crate::activity_log::AlTransaction;
use crate::metadata::{MetaFlags, Superblock};
use crate::types::{DiskState, NodeRole};

#[derive(Debug)]
pub(super) struct Persist {
    /// Template of the superblock (names, sizes) from the loaded one.
    template: Superblock,
    /// Slot the next superblock write goes to.
    next_slot: u8,
    /// Sequence of the next superblock write.
    next_seq: u64,
    /// The superblock write in flight, by sequence.
    inflight: Option<u64>,
    /// State changed while a write was in flight: write again after it.
    dirty: bool,
    /// Highest superblock sequence known durable.
    pub sb_durable: u64,
    /// Writes must not start before this superblock sequence is durable
    /// (a new generation UUID or the Primary flag).
    pub sb_needed_for_writes: Option<u64>,
    /// An AL transaction group: (sequence, parts outstanding).
    al_group: Option<(u64, usize)>,
    /// An evicting AL transaction waiting for its flush and bitmap pages.
    al_staged: Option<AlTransaction>,
    al_pages_left: usize,
    pub clean_shutdown: bool,
}

impl Persist {
    pub(super) fn new(sb: &Superblock, loaded_slot: u8) -> Persist {
        Persist {
            template: sb.clone(),
            next_slot: (loaded_slot + 1) % 2,
            next_seq: sb.sequence + 1,
            inflight: None,
            dirty: false,
            sb_durable: sb.sequence,
            sb_needed_for_writes: None,
            al_group: None,
            al_staged: None,
            al_pages_left: 0,
            clean_shutdown: false,
        }
    }
}

impl Engine {
    fn current_superblock(&self, sequence: u64) -> Superblock {
        let mut sb = self.persist.template.clone();
        sb.sequence = sequence;
        sb.uuids = self.uuids;
        let mut f = MetaFlags::default();
        f.set(MetaFlags::CONSISTENT, self.disk >= DiskState::Outdated);
        f.set(MetaFlags::UP_TO_DATE, self.disk == DiskState::UpToDate);
        f.set(MetaFlags::OUTDATED, self.disk == DiskState::Outdated);
        f.set(MetaFlags::WAS_PRIMARY, self.role == NodeRole::Primary);
        f.set(MetaFlags::CRASHED_PRIMARY, self.crashed_primary);
        f.set(MetaFlags::CLEAN_SHUTDOWN, self.persist.clean_shutdown);
        sb.flags = f;
        sb.last_role = self.role;
        sb
    }

    /// Persist the current state in the next superblock slot (or after the
    /// write in flight). Returns the sequence that will hold this state.
    pub(super) fn write_superblock(&mut self) -> u64 {
        if let Some(seq) = self.persist.inflight {
            self.persist.dirty = true;
            let covering = seq + 1;
            self.persist.sb_needed_for_writes = Some(covering);
            return covering;
        }
        let seq = self.persist.next_seq;
        self.persist.next_seq += 1;
        let slot = self.persist.next_slot;
        self.persist.next_slot = (slot + 1) % 2;
        let sb = self.current_superblock(seq);
        let data = Bytes::from(crate::metadata::encode_superblock(&sb));
        let offset_bytes = self.cfg.meta_layout.superblock_slot_offset(slot);
        self.persist.inflight = Some(seq);
        self.persist.sb_needed_for_writes = Some(seq);
        self.new_op(
            OpPurpose::Superblock(seq),
            DiskOp::MetaWrite { offset_bytes, data },
        );
        seq
    }

    pub(super) fn superblock_done(&mut self, seq: u64) {
        self.persist.inflight = None;
        self.persist.sb_durable = self.persist.sb_durable.max(seq);
        if std::mem::take(&mut self.persist.dirty) {
            self.write_superblock();
        }
        self.superblock_durable();
        self.release_held_acks();
    }

    /// Write every bitmap page changed since it was last persisted.
    pub(super) fn write_dirty_bitmap_pages(&mut self) -> usize {
        let pages = self.bitmap.take_dirty_pages();
        let n = pages.len();
        for page in pages {
            self.emit_bitmap_page(page, None);
        }
        n
    }

    fn emit_bitmap_page(&mut self, page: u64, group: Option<u64>) {
        let bytes = self
            .bitmap
            .encode_page(page)
            .expect("page index from the bitmap itself");
        let offset_bytes = self.cfg.meta_layout.bitmap_page_offset(page);
        let purpose = match group {
            Some(_) => OpPurpose::AlPage,
            None => OpPurpose::BitmapPage,
        };
        self.new_op(
            purpose,
            DiskOp::MetaWrite {
                offset_bytes,
                data: Bytes::from(bytes),
            },
        );
    }

    /// Persist an AL transaction. When extents leave the AL, their data
    /// must not depend on the AL any more: first the data disk is flushed
    /// (completed writes to the leaving extents become durable), then the
    /// dirty bitmap pages are written, and only then the AL block that drops
    /// the extents. The transaction commits when that block is durable.
    pub(super) fn persist_al_transaction(&mut self, tx: AlTransaction) {
        assert!(
            self.persist.al_group.is_none() && self.persist.al_staged.is_none(),
            "one AL transaction at a time"
        );
        let seq = tx.sequence;
        if tx.evicted.is_empty() {
            self.write_al_block(tx);
        } else {
            self.persist.al_staged = Some(tx);
            self.issue_data_flush(OpPurpose::AlPreFlush(seq));
        }
    }

    fn write_al_block(&mut self, tx: AlTransaction) {
        let seq = tx.sequence;
        self.persist.al_group = Some((seq, 1));
        let offset_bytes = self.cfg.meta_layout.al_block_offset(tx.ring_slot);
        self.new_op(
            OpPurpose::AlGroup(seq),
            DiskOp::MetaWrite {
                offset_bytes,
                data: Bytes::from(tx.block),
            },
        );
    }

    /// The pre-eviction data flush finished: write the bitmap pages.
    pub(super) fn al_preflush_done(&mut self, seq: u64) {
        let pages = self.bitmap.take_dirty_pages();
        if pages.is_empty() {
            let tx = self
                .persist
                .al_staged
                .take()
                .expect("staged AL transaction");
            return self.write_al_block(tx);
        }
        self.persist.al_pages_left = pages.len();
        for page in pages {
            self.emit_bitmap_page(page, Some(seq));
        }
    }

    /// One bitmap page of an eviction finished; after the last, the AL block.
    pub(super) fn al_page_done(&mut self) {
        self.persist.al_pages_left -= 1;
        if self.persist.al_pages_left == 0 {
            let tx = self
                .persist
                .al_staged
                .take()
                .expect("staged AL transaction");
            self.write_al_block(tx);
        }
    }

    pub(super) fn al_group_part_done(&mut self, seq: u64) {
        let Some((s, left)) = self.persist.al_group.as_mut() else {
            return;
        };
        assert_eq!(*s, seq, "AL group completion out of order");
        *left -= 1;
        if *left == 0 {
            self.persist.al_group = None;
            self.al.commit(seq).expect("the outstanding transaction");
            self.al_committed(seq);
        }
    }
}
