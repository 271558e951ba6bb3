//! The activity log (AL): the bounded set of "hot" extents (4 MiB each) that
//! may hold writes in flight, and its on-disk transaction ring.
//!
//! Owns the LRU of active extents, the in-flight count per extent, the
//! decision whether a write may start or must wait for an AL transaction, the
//! encoding of transactions into fixed-size blocks and the recovery of the
//! active set from the ring after a crash. Must not do I/O or decide anything
//! about resync: it only says which extents were active.
//!
//! # Protocol with the caller
//!
//! 1. Before a write starts, call [`ActivityLog::begin_write`]:
//!    - [`AlDecision::Ready`]: the extents are active and durable; start now.
//!    - [`AlDecision::Persist`]: write the transaction's block at
//!      `ring_slot * AL_TRANSACTION_BYTES` of the AL ring, then call
//!      [`ActivityLog::commit`], then start the write.
//!    - [`AlDecision::AwaitCommit`]: the extents are reserved but a transaction
//!      that activates one of them is still being written; start the write
//!      after `commit(sequence)`.
//!    - [`AlDecision::Blocked`]: nothing was reserved. Call `begin_write` again
//!      after the event the reason names: `commit` of the outstanding
//!      transaction, or an `end_write` that returned `true` (an extent became
//!      idle and can be evicted).
//! 2. When the write completed (or failed), call [`ActivityLog::end_write`]
//!    with the same range.
//!
//! At most one transaction is outstanding at a time, so the ring is written
//! strictly in sequence order and a torn write can only hit the newest block.
//!
//! # On-disk ring (version [`AL_FORMAT_VERSION`])
//!
//! [`AL_RING_TRANSACTIONS`] blocks of [`AL_TRANSACTION_BYTES`]; transaction
//! `seq` goes to block `seq % AL_RING_TRANSACTIONS`. Each block holds up to
//! [`AL_UPDATES_PER_TRANSACTION`] slot updates and a rolling window of
//! [`AL_CONTEXT_PER_TRANSACTION`] slots of the full slot table, so replaying
//! the newest run of consecutive valid blocks rebuilds the whole table.
//!
//! ```text
//! offset size field (big-endian)
//!  0      4   magic 0x5250_414C ("RPAL")
//!  4      2   format version
//!  6      2   n_updates (<= 64)
//!  8      8   sequence (>= 1)
//! 16      4   capacity (slots)
//! 20      4   context_start (slot)
//! 24      2   n_context (<= 888)
//! 26      2   reserved, 0
//! 28      4   CRC-32 of the whole block with this field zero
//! 32    512   64 x (slot u32, extent u32) updates; unused entries zero
//! 544  3552   888 x extent u32 context; 0xFFFF_FFFF = empty slot
//! ```

use std::collections::BTreeMap;

use thiserror::Error;

use crate::types::ExtentIndex;

/// Bytes covered by one AL extent.
pub const AL_EXTENT_BYTES: u64 = 4 * 1024 * 1024;
/// Default AL capacity in extents (DRBD's default; about 4.8 GiB hot).
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
/// Size of one on-disk transaction block.
pub const AL_TRANSACTION_BYTES: usize = 4096;
/// Number of transaction blocks in the on-disk ring.
pub const AL_RING_TRANSACTIONS: u32 = 8;
/// Size of the on-disk ring.
pub const AL_RING_BYTES: u64 = AL_RING_TRANSACTIONS as u64 * AL_TRANSACTION_BYTES as u64;
/// Most slot updates one transaction carries.
pub const AL_UPDATES_PER_TRANSACTION: usize = 64;
/// Slots of the full table each transaction repeats.
pub const AL_CONTEXT_PER_TRANSACTION: usize = 888;
/// Most extents one `begin_write` may touch (a 32 MiB NBD write touches 9).
pub const AL_MAX_EXTENTS_PER_WRITE: usize = 16;
/// Smallest AL capacity: one maximal write must fit.
pub const MIN_AL_EXTENTS: u32 = AL_MAX_EXTENTS_PER_WRITE as u32;
/// Largest AL capacity: the ring minus one (possibly torn) block must repeat
/// the whole table.
pub const MAX_AL_EXTENTS: u32 = (AL_RING_TRANSACTIONS - 1) * AL_CONTEXT_PER_TRANSACTION as u32;
/// Version of the transaction block format.
pub const AL_FORMAT_VERSION: u16 = 1;
/// First four bytes of a transaction block: "RPAL".
pub const AL_MAGIC: u32 = 0x5250_414C;

const AL_HEADER_BYTES: usize = 32;
const AL_UPDATE_BYTES: usize = 8;
const AL_CONTEXT_OFFSET: usize = AL_HEADER_BYTES + AL_UPDATES_PER_TRANSACTION * AL_UPDATE_BYTES;
const AL_CRC_OFFSET: usize = 28;
const EMPTY_SLOT: u32 = u32::MAX;

const _: () = assert!(AL_CONTEXT_OFFSET + AL_CONTEXT_PER_TRANSACTION * 4 == AL_TRANSACTION_BYTES);
const _: () = assert!(AL_MAX_EXTENTS_PER_WRITE <= AL_UPDATES_PER_TRANSACTION);
const _: () = assert!(MIN_AL_EXTENTS <= DEFAULT_AL_EXTENTS && DEFAULT_AL_EXTENTS <= MAX_AL_EXTENTS);

/// Errors of the activity log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AlError {
    /// The configured capacity is outside bounds.
    #[error("al_extents {capacity} outside {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}")]
    BadCapacity {
        /// Requested capacity.
        capacity: u32,
    },
    /// A write touches more extents than [`AL_MAX_EXTENTS_PER_WRITE`] or its
    /// range overflows.
    #[error("write at offset {offset} of {len_bytes} bytes touches too many AL extents (limit {AL_MAX_EXTENTS_PER_WRITE})")]
    WriteTooLarge {
        /// Write offset.
        offset: u64,
        /// Write length.
        len_bytes: u64,
    },
    /// `end_write` for a range with no write in flight.
    #[error("end_write for {extent} with no write in flight")]
    NotInFlight {
        /// The extent.
        extent: ExtentIndex,
    },
    /// `commit` of a transaction that is not outstanding.
    #[error("commit of AL transaction {sequence}, but the outstanding one is {outstanding:?}")]
    UnknownTransaction {
        /// Sequence passed.
        sequence: u64,
        /// Sequence outstanding, if any.
        outstanding: Option<u64>,
    },
    /// A transaction block failed validation.
    #[error("AL transaction block {ring_slot}: {detail}")]
    BadBlock {
        /// Ring position.
        ring_slot: u32,
        /// What is wrong.
        detail: String,
    },
    /// The ring does not hold enough history to rebuild the active set.
    #[error("AL ring cannot be recovered: {detail}")]
    Unrecoverable {
        /// What is missing.
        detail: String,
    },
    /// A recovered AL has another capacity than configured.
    #[error("recovered AL has {recovered} slots but {configured} are configured")]
    CapacityChanged {
        /// Capacity in the ring.
        recovered: u32,
        /// Capacity configured.
        configured: u32,
    },
}

/// Why `begin_write` could not reserve the write's extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlBlocked {
    /// New extents are needed but a transaction is being written; retry after
    /// `commit(sequence)`.
    TransactionInFlight {
        /// The outstanding transaction.
        sequence: u64,
    },
    /// Every evictable slot is busy with writes in flight; retry after an
    /// `end_write` returns `true`.
    AllExtentsBusy,
}

/// An AL transaction to persist before the writes depending on it start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    /// Transaction sequence number (>= 1).
    pub sequence: u64,
    /// Block index in the ring where `block` must be written.
    pub ring_slot: u32,
    /// Extents that become active.
    pub added: Vec<ExtentIndex>,
    /// Extents that leave the AL (their bitmap pages may be persisted now).
    pub evicted: Vec<ExtentIndex>,
    /// The encoded block, [`AL_TRANSACTION_BYTES`] long.
    pub block: Vec<u8>,
}

/// What the caller must do before a write may start (see module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlDecision {
    /// Start the write now.
    Ready,
    /// Persist this transaction, `commit` it, then start the write.
    Persist(AlTransaction),
    /// Start the write after `commit(sequence)`.
    AwaitCommit {
        /// The outstanding transaction.
        sequence: u64,
    },
    /// Nothing reserved; retry later.
    Blocked(AlBlocked),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    extent: Option<ExtentIndex>,
    in_flight: u32,
    last_used: u64,
    /// Sequence of the transaction that activated the extent; durable once
    /// `<= committed_seq`.
    activated_seq: u64,
}

const EMPTY: Slot = Slot {
    extent: None,
    in_flight: 0,
    last_used: 0,
    activated_seq: 0,
};

/// The activity log of one node.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    slots: Vec<Slot>,
    index: BTreeMap<ExtentIndex, u32>,
    tick: u64,
    /// Sequence of the last committed (durable) transaction.
    committed_seq: u64,
    outstanding: Option<u64>,
    context_cursor: u32,
}

/// Extents touched by the byte range `[offset, offset + len_bytes)`.
pub fn extents_of(offset: u64, len_bytes: u64) -> Result<Vec<ExtentIndex>, AlError> {
    if len_bytes == 0 {
        return Ok(Vec::new());
    }
    let too_large = AlError::WriteTooLarge { offset, len_bytes };
    let end = offset.checked_add(len_bytes).ok_or(too_large.clone())?;
    let first = offset / AL_EXTENT_BYTES;
    let last = (end - 1) / AL_EXTENT_BYTES;
    if last - first + 1 > AL_MAX_EXTENTS_PER_WRITE as u64 || last > u64::from(EMPTY_SLOT - 1) {
        return Err(too_large);
    }
    Ok((first..=last).map(|e| ExtentIndex(e as u32)).collect())
}

impl ActivityLog {
    /// An empty AL of `capacity` extents whose first transaction is sequence 1.
    pub fn new(capacity: u32) -> Result<Self, AlError> {
        if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&capacity) {
            return Err(AlError::BadCapacity { capacity });
        }
        Ok(ActivityLog {
            slots: vec![EMPTY; capacity as usize],
            index: BTreeMap::new(),
            tick: 0,
            committed_seq: 0,
            outstanding: None,
            context_cursor: 0,
        })
    }

    /// Capacity in extents.
    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The active extents, ascending.
    pub fn active_extents(&self) -> Vec<ExtentIndex> {
        self.index.keys().copied().collect()
    }

    /// Whether `extent` is active (durable or about to be).
    pub fn is_active(&self, extent: ExtentIndex) -> bool {
        self.index.contains_key(&extent)
    }

    /// Number of writes in flight across all extents (a write spanning two
    /// extents counts twice).
    pub fn in_flight(&self) -> u64 {
        self.slots.iter().map(|s| u64::from(s.in_flight)).sum()
    }

    /// The transaction being persisted, if any.
    pub fn outstanding(&self) -> Option<u64> {
        self.outstanding
    }

    /// Sequence of the next transaction.
    pub fn next_sequence(&self) -> u64 {
        self.committed_seq + 1 + u64::from(self.outstanding.is_some())
    }

    /// Reserves the extents of a write; see the module docs for the decision.
    pub fn begin_write(&mut self, offset: u64, len_bytes: u64) -> Result<AlDecision, AlError> {
        let extents = extents_of(offset, len_bytes)?;
        let missing: Vec<ExtentIndex> = extents
            .iter()
            .copied()
            .filter(|e| !self.index.contains_key(e))
            .collect();
        if missing.is_empty() {
            let mut await_seq = None;
            self.tick += 1;
            for e in &extents {
                let slot = &mut self.slots[self.index[e] as usize];
                slot.in_flight += 1;
                slot.last_used = self.tick;
                if slot.activated_seq > self.committed_seq {
                    await_seq = Some(slot.activated_seq);
                }
            }
            return Ok(match await_seq {
                Some(sequence) => AlDecision::AwaitCommit { sequence },
                None => AlDecision::Ready,
            });
        }
        if let Some(sequence) = self.outstanding {
            return Ok(AlDecision::Blocked(AlBlocked::TransactionInFlight {
                sequence,
            }));
        }
        // Choose slots: empty ones first, then least recently used idle ones
        // that this write does not itself need.
        let mut chosen: Vec<u32> = Vec::with_capacity(missing.len());
        for (i, s) in self.slots.iter().enumerate() {
            if chosen.len() == missing.len() {
                break;
            }
            if s.extent.is_none() {
                chosen.push(i as u32);
            }
        }
        if chosen.len() < missing.len() {
            let mut idle: Vec<(u64, u32)> = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    s.in_flight == 0
                        && s.activated_seq <= self.committed_seq
                        && s.extent.is_some_and(|e| !extents.contains(&e))
                })
                .map(|(i, s)| (s.last_used, i as u32))
                .collect();
            let need = missing.len() - chosen.len();
            if idle.len() < need {
                return Ok(AlDecision::Blocked(AlBlocked::AllExtentsBusy));
            }
            idle.sort_unstable();
            chosen.extend(idle.iter().take(need).map(|&(_, i)| i));
        }
        let sequence = self.committed_seq + 1;
        self.tick += 1;
        let mut evicted = Vec::new();
        let mut updates = Vec::with_capacity(missing.len());
        for (&slot_idx, &extent) in chosen.iter().zip(&missing) {
            let slot = &mut self.slots[slot_idx as usize];
            if let Some(old) = slot.extent {
                self.index.remove(&old);
                evicted.push(old);
            }
            *slot = Slot {
                extent: Some(extent),
                in_flight: 0,
                last_used: self.tick,
                activated_seq: sequence,
            };
            self.index.insert(extent, slot_idx);
            updates.push((slot_idx, extent));
        }
        for e in &extents {
            let slot = &mut self.slots[self.index[e] as usize];
            slot.in_flight += 1;
            slot.last_used = self.tick;
        }
        let block = self.encode_transaction(sequence, &updates);
        self.outstanding = Some(sequence);
        evicted.sort_unstable();
        Ok(AlDecision::Persist(AlTransaction {
            sequence,
            ring_slot: (sequence % u64::from(AL_RING_TRANSACTIONS)) as u32,
            added: missing,
            evicted,
            block,
        }))
    }

    /// Marks transaction `sequence` durable; writes waiting for it may start.
    pub fn commit(&mut self, sequence: u64) -> Result<(), AlError> {
        if self.outstanding != Some(sequence) {
            return Err(AlError::UnknownTransaction {
                sequence,
                outstanding: self.outstanding,
            });
        }
        self.outstanding = None;
        self.committed_seq = sequence;
        Ok(())
    }

    /// Releases the extents of a finished write. Returns `true` if an extent
    /// became idle (a blocked `begin_write` may now succeed).
    pub fn end_write(&mut self, offset: u64, len_bytes: u64) -> Result<bool, AlError> {
        let extents = extents_of(offset, len_bytes)?;
        for e in &extents {
            match self.index.get(e) {
                Some(&i) if self.slots[i as usize].in_flight > 0 => {}
                _ => return Err(AlError::NotInFlight { extent: *e }),
            }
        }
        let mut freed = false;
        for e in &extents {
            let slot = &mut self.slots[self.index[e] as usize];
            slot.in_flight -= 1;
            freed |= slot.in_flight == 0;
        }
        Ok(freed)
    }

    fn encode_transaction(&mut self, sequence: u64, updates: &[(u32, ExtentIndex)]) -> Vec<u8> {
        assert!(updates.len() <= AL_UPDATES_PER_TRANSACTION);
        let capacity = self.capacity();
        let start = self.context_cursor;
        let n_context = (capacity - start).min(AL_CONTEXT_PER_TRANSACTION as u32);
        self.context_cursor = (start + n_context) % capacity;
        let context: Vec<u32> = (start..start + n_context)
            .map(|i| self.slots[i as usize].extent.map_or(EMPTY_SLOT, |e| e.0))
            .collect();
        encode_block(sequence, capacity, updates, start, &context)
    }
}

fn encode_block(
    sequence: u64,
    capacity: u32,
    updates: &[(u32, ExtentIndex)],
    context_start: u32,
    context: &[u32],
) -> Vec<u8> {
    let mut b = vec![0u8; AL_TRANSACTION_BYTES];
    b[0..4].copy_from_slice(&AL_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&AL_FORMAT_VERSION.to_be_bytes());
    b[6..8].copy_from_slice(&(updates.len() as u16).to_be_bytes());
    b[8..16].copy_from_slice(&sequence.to_be_bytes());
    b[16..20].copy_from_slice(&capacity.to_be_bytes());
    b[20..24].copy_from_slice(&context_start.to_be_bytes());
    b[24..26].copy_from_slice(&(context.len() as u16).to_be_bytes());
    for (i, (slot, extent)) in updates.iter().enumerate() {
        let o = AL_HEADER_BYTES + i * AL_UPDATE_BYTES;
        b[o..o + 4].copy_from_slice(&slot.to_be_bytes());
        b[o + 4..o + 8].copy_from_slice(&extent.0.to_be_bytes());
    }
    for (i, e) in context.iter().enumerate() {
        let o = AL_CONTEXT_OFFSET + i * 4;
        b[o..o + 4].copy_from_slice(&e.to_be_bytes());
    }
    let crc = crc32fast::hash(&b);
    b[AL_CRC_OFFSET..AL_CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    b
}
