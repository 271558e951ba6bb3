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
pub(crate) const AL_CRC_OFFSET: usize = 28;
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

    /// Rebuilds the AL from a recovery: the recovered extents are active and
    /// durable with no writes in flight; the next transaction continues the
    /// ring's sequence. The capacity must match the ring's (else the caller
    /// resyncs the recovered extents and starts from a zeroed ring).
    pub fn restore(capacity: u32, recovery: &AlRecovery) -> Result<Self, AlError> {
        let mut al = ActivityLog::new(capacity)?;
        if recovery.last_sequence == 0 {
            return Ok(al);
        }
        if recovery.capacity != capacity || recovery.slots.len() != capacity as usize {
            return Err(AlError::CapacityChanged {
                recovered: recovery.capacity,
                configured: capacity,
            });
        }
        for (i, e) in recovery.slots.iter().enumerate() {
            if let Some(e) = *e {
                if al.index.insert(e, i as u32).is_some() {
                    return Err(AlError::Unrecoverable {
                        detail: format!("{e} recorded in two slots"),
                    });
                }
                al.slots[i].extent = Some(e);
            }
        }
        al.committed_seq = recovery.last_sequence;
        al.context_cursor = recovery.next_context_start % capacity;
        Ok(al)
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
            // Only the `need` oldest matter: partial selection, not a full sort.
            // (tick, slot) pairs are unique, so the choice is deterministic.
            if need < idle.len() {
                idle.select_nth_unstable(need - 1);
                idle.truncate(need);
            }
            idle.sort_unstable();
            chosen.extend(idle.iter().map(|&(_, i)| i));
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

/// The active set recovered from the on-disk ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlRecovery {
    /// Sequence of the newest valid transaction; 0 if the ring is empty.
    pub last_sequence: u64,
    /// Capacity the ring was written with (0 if the ring is empty).
    pub capacity: u32,
    /// The slot table at `last_sequence`.
    pub slots: Vec<Option<ExtentIndex>>,
    /// First slot of the next transaction's context window, so a restored
    /// log keeps repeating the table in order (any `ceil(capacity /
    /// AL_CONTEXT_PER_TRANSACTION)` consecutive transactions cover it).
    pub next_context_start: u32,
}

impl AlRecovery {
    /// The extents that may hold writes that reached only this node, ascending.
    pub fn active_extents(&self) -> Vec<ExtentIndex> {
        let mut v: Vec<ExtentIndex> = self.slots.iter().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One decoded transaction block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DecodedTxn {
    sequence: u64,
    capacity: u32,
    updates: Vec<(u32, u32)>,
    context_start: u32,
    context: Vec<u32>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes the block at ring position `ring_slot`. `Ok(None)` for a block that
/// was never written (all zero); an error for anything damaged or foreign.
fn decode_block(ring_slot: u32, b: &[u8]) -> Result<Option<DecodedTxn>, AlError> {
    let bad = |detail: String| AlError::BadBlock { ring_slot, detail };
    if b.len() != AL_TRANSACTION_BYTES {
        return Err(bad(format!(
            "{} bytes, expected {AL_TRANSACTION_BYTES}",
            b.len()
        )));
    }
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let magic = be32(b, 0);
    if magic != AL_MAGIC {
        return Err(bad(format!("bad magic {magic:#010x}")));
    }
    let version = u16::from_be_bytes([b[4], b[5]]);
    if version != AL_FORMAT_VERSION {
        return Err(bad(format!("unsupported format version {version}")));
    }
    let stored = be32(b, AL_CRC_OFFSET);
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..AL_CRC_OFFSET]);
    h.update(&[0; 4]);
    h.update(&b[AL_CRC_OFFSET + 4..]);
    let computed = h.finalize();
    if stored != computed {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    let n_updates = usize::from(u16::from_be_bytes([b[6], b[7]]));
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[8..16]);
    let sequence = u64::from_be_bytes(seq);
    let capacity = be32(b, 16);
    let context_start = be32(b, 20);
    let n_context = usize::from(u16::from_be_bytes([b[24], b[25]]));
    if sequence == 0 || sequence % u64::from(AL_RING_TRANSACTIONS) != u64::from(ring_slot) {
        return Err(bad(format!(
            "sequence {sequence} does not belong in this ring slot"
        )));
    }
    if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&capacity) {
        return Err(bad(format!("capacity {capacity} out of range")));
    }
    if n_updates > AL_UPDATES_PER_TRANSACTION || n_context > AL_CONTEXT_PER_TRANSACTION {
        return Err(bad(format!(
            "{n_updates} updates / {n_context} context entries exceed the block"
        )));
    }
    if u64::from(context_start) + n_context as u64 > u64::from(capacity) {
        return Err(bad(format!(
            "context {context_start}+{n_context} exceeds capacity {capacity}"
        )));
    }
    let mut updates = Vec::with_capacity(n_updates);
    for i in 0..n_updates {
        let o = AL_HEADER_BYTES + i * AL_UPDATE_BYTES;
        let slot = be32(b, o);
        if slot >= capacity {
            return Err(bad(format!(
                "update slot {slot} exceeds capacity {capacity}"
            )));
        }
        updates.push((slot, be32(b, o + 4)));
    }
    let context = (0..n_context)
        .map(|i| be32(b, AL_CONTEXT_OFFSET + i * 4))
        .collect();
    Ok(Some(DecodedTxn {
        sequence,
        capacity,
        updates,
        context_start,
        context,
    }))
}

/// Rebuilds the active set from the ring's [`AL_RING_TRANSACTIONS`] blocks
/// (in ring order). Damaged blocks (a torn newest write) are skipped; the
/// newest run of consecutive sequences is replayed. Fails if that run cannot
/// account for every slot (the caller must then resync everything).
pub fn recover(blocks: &[&[u8]]) -> Result<AlRecovery, AlError> {
    if blocks.len() != AL_RING_TRANSACTIONS as usize {
        return Err(AlError::Unrecoverable {
            detail: format!(
                "{} ring blocks, expected {AL_RING_TRANSACTIONS}",
                blocks.len()
            ),
        });
    }
    let mut txns: Vec<DecodedTxn> = blocks
        .iter()
        .enumerate()
        .filter_map(|(i, b)| decode_block(i as u32, b).ok().flatten())
        .collect();
    txns.sort_unstable_by_key(|t| std::cmp::Reverse(t.sequence));
    let Some(newest) = txns.first() else {
        return Ok(AlRecovery {
            last_sequence: 0,
            capacity: 0,
            slots: Vec::new(),
            next_context_start: 0,
        });
    };
    let capacity = newest.capacity;
    let mut window = 1;
    while window < txns.len()
        && txns[window].sequence + 1 == txns[window - 1].sequence
        && txns[window].capacity == capacity
    {
        window += 1;
    }
    let window = &txns[..window];
    let oldest = window.last().map_or(0, |t| t.sequence);
    if oldest != 1 {
        let mut covered = vec![false; capacity as usize];
        for t in window {
            let start = t.context_start as usize;
            covered[start..start + t.context.len()].fill(true);
        }
        if let Some(gap) = covered.iter().position(|&c| !c) {
            return Err(AlError::Unrecoverable {
                detail: format!(
                    "transactions {oldest}..={} do not record slot {gap}",
                    newest.sequence
                ),
            });
        }
    }
    let mut slots: Vec<Option<ExtentIndex>> = vec![None; capacity as usize];
    let decode_extent = |e: u32| (e != EMPTY_SLOT).then_some(ExtentIndex(e));
    for t in window.iter().rev() {
        for &(slot, e) in &t.updates {
            slots[slot as usize] = decode_extent(e);
        }
        for (i, &e) in t.context.iter().enumerate() {
            slots[t.context_start as usize + i] = decode_extent(e);
        }
    }
    Ok(AlRecovery {
        last_sequence: newest.sequence,
        capacity,
        slots,
        next_context_start: ((newest.context_start as usize + newest.context.len())
            % capacity as usize) as u32,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const X: u64 = AL_EXTENT_BYTES;

    /// Runs begin_write and, if a transaction is needed, persists and commits it.
    fn write_now(al: &mut ActivityLog, ring: &mut [Vec<u8>], extent: u64) -> AlDecision {
        let d = al.begin_write(extent * X, 4096).expect("begin");
        if let AlDecision::Persist(t) = &d {
            ring[t.ring_slot as usize] = t.block.clone();
            al.commit(t.sequence).expect("commit");
        }
        d
    }

    fn empty_ring() -> Vec<Vec<u8>> {
        vec![vec![0; AL_TRANSACTION_BYTES]; AL_RING_TRANSACTIONS as usize]
    }

    fn recover_ring(ring: &[Vec<u8>]) -> Result<AlRecovery, AlError> {
        let refs: Vec<&[u8]> = ring.iter().map(|b| b.as_slice()).collect();
        recover(&refs)
    }

    #[test]
    fn cold_extent_needs_a_transaction_and_hot_extent_is_ready() {
        // Proves the first write to an extent must persist a transaction
        // activating it, and a later write to the same extent starts at once.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let mut ring = empty_ring();
        let AlDecision::Persist(t) = write_now(&mut al, &mut ring, 3) else {
            panic!("cold extent must persist");
        };
        assert_eq!((t.sequence, t.ring_slot), (1, 1));
        assert_eq!(t.added, vec![ExtentIndex(3)]);
        assert!(t.evicted.is_empty());
        assert_eq!(al.begin_write(3 * X + 8192, 4096), Ok(AlDecision::Ready));
        assert_eq!(al.in_flight(), 2);
    }

    #[test]
    fn write_spanning_extents_activates_both_in_one_transaction() {
        // Proves a write crossing an extent boundary reserves both extents and
        // end_write releases both.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let Ok(AlDecision::Persist(t)) = al.begin_write(X - 512, 1024) else {
            panic!("expected a transaction");
        };
        assert_eq!(t.added, vec![ExtentIndex(0), ExtentIndex(1)]);
        al.commit(t.sequence).expect("commit");
        assert_eq!(al.in_flight(), 2);
        assert_eq!(al.end_write(X - 512, 1024), Ok(true));
        assert_eq!(al.in_flight(), 0);
    }

    #[test]
    fn least_recently_used_idle_extent_is_evicted() {
        // Proves eviction picks the least recently used extent with no write
        // in flight and reports it in the transaction.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let mut ring = empty_ring();
        for e in 0..u64::from(MIN_AL_EXTENTS) {
            write_now(&mut al, &mut ring, e);
            al.end_write(e * X, 4096).expect("end");
        }
        write_now(&mut al, &mut ring, 0); // refresh extent 0
        al.end_write(0, 4096).expect("end");
        let AlDecision::Persist(t) = write_now(&mut al, &mut ring, 100) else {
            panic!("new extent must persist");
        };
        assert_eq!(t.evicted, vec![ExtentIndex(1)]);
        assert!(al.is_active(ExtentIndex(0)) && !al.is_active(ExtentIndex(1)));
    }

    #[test]
    fn busy_extents_are_never_evicted_and_the_write_is_blocked() {
        // Proves that when every extent has writes in flight a new extent is
        // refused with AllExtentsBusy (nothing reserved), and that the
        // end_write which frees an extent returns true and unblocks it.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let mut ring = empty_ring();
        for e in 0..u64::from(MIN_AL_EXTENTS) {
            write_now(&mut al, &mut ring, e);
        }
        let before = al.in_flight();
        assert_eq!(
            al.begin_write(100 * X, 4096),
            Ok(AlDecision::Blocked(AlBlocked::AllExtentsBusy))
        );
        assert_eq!(al.in_flight(), before);
        assert_eq!(al.end_write(5 * X, 4096), Ok(true));
        let AlDecision::Persist(t) = write_now(&mut al, &mut ring, 100) else {
            panic!("freed extent must allow the write");
        };
        assert_eq!(t.evicted, vec![ExtentIndex(5)]);
    }

    #[test]
    fn writes_wait_for_the_outstanding_transaction() {
        // Proves a write to an extent whose activation is not yet durable must
        // await the commit, and a write needing another new extent is blocked
        // until the outstanding transaction commits.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let Ok(AlDecision::Persist(t)) = al.begin_write(0, 4096) else {
            panic!("expected a transaction");
        };
        assert_eq!(
            al.begin_write(4096, 4096),
            Ok(AlDecision::AwaitCommit { sequence: 1 })
        );
        assert_eq!(
            al.begin_write(X, 4096),
            Ok(AlDecision::Blocked(AlBlocked::TransactionInFlight {
                sequence: 1
            }))
        );
        assert!(matches!(
            al.commit(2),
            Err(AlError::UnknownTransaction { .. })
        ));
        al.commit(t.sequence).expect("commit");
        assert_eq!(al.begin_write(8192, 4096), Ok(AlDecision::Ready));
        assert!(matches!(al.begin_write(X, 4096), Ok(AlDecision::Persist(t)) if t.sequence == 2));
    }

    #[test]
    fn bad_calls_are_errors_not_panics() {
        // Proves end_write without a write in flight, oversize writes and bad
        // capacities return errors.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        assert_eq!(
            al.end_write(0, 1),
            Err(AlError::NotInFlight {
                extent: ExtentIndex(0)
            })
        );
        assert!(matches!(
            al.begin_write(0, 17 * X),
            Err(AlError::WriteTooLarge { .. })
        ));
        assert!(matches!(
            al.begin_write(u64::MAX, 2),
            Err(AlError::WriteTooLarge { .. })
        ));
        assert!(matches!(
            ActivityLog::new(MIN_AL_EXTENTS - 1),
            Err(AlError::BadCapacity { .. })
        ));
        assert!(matches!(
            ActivityLog::new(MAX_AL_EXTENTS + 1),
            Err(AlError::BadCapacity { .. })
        ));
        assert_eq!(al.begin_write(0, 0), Ok(AlDecision::Ready));
    }

    #[test]
    fn transaction_block_layout_is_pinned() {
        // Pins the on-disk header layout of AL_FORMAT_VERSION 1: magic,
        // version, counts, sequence, capacity, context window, update entry.
        assert_eq!(AL_FORMAT_VERSION, 1);
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let Ok(AlDecision::Persist(t)) = al.begin_write(7 * X, 1) else {
            panic!("expected a transaction");
        };
        let b = &t.block;
        assert_eq!(b.len(), AL_TRANSACTION_BYTES);
        assert_eq!(&b[0..4], b"RPAL");
        assert_eq!(
            &b[4..28],
            &[0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 16, 0, 0, 0, 0, 0, 16, 0, 0]
        );
        assert_eq!(
            &b[32..40],
            &[0, 0, 0, 0, 0, 0, 0, 7],
            "update: slot 0 <- extent 7"
        );
        assert_eq!(
            &b[544..552],
            &[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff],
            "context: slot 0 = 7, slot 1 empty"
        );
        let mut zeroed = b.clone();
        zeroed[28..32].fill(0);
        assert_eq!(&b[28..32], &crc32fast::hash(&zeroed).to_be_bytes());
    }

    #[test]
    fn torn_newest_transaction_recovers_the_previous_state() {
        // Proves a crash tearing the newest transaction leaves the state of
        // the transaction before it, which is all a started write relied on.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let mut ring = empty_ring();
        write_now(&mut al, &mut ring, 1);
        write_now(&mut al, &mut ring, 2);
        let before = recover_ring(&ring).expect("recover");
        let Ok(AlDecision::Persist(t)) = al.begin_write(9 * X, 1) else {
            panic!("expected a transaction");
        };
        let mut torn = t.block.clone();
        torn[2048..].fill(0x5a);
        ring[t.ring_slot as usize] = torn;
        let after = recover_ring(&ring).expect("recover");
        assert_eq!(after, before);
        assert_eq!(after.active_extents(), vec![ExtentIndex(1), ExtentIndex(2)]);
        assert_eq!(after.last_sequence, 2);
    }

    #[test]
    fn restored_log_continues_the_ring_and_stays_recoverable() {
        // Proves restore() keeps slot positions and sequence so that a ring
        // mixing transactions from before and after a restart still recovers
        // the live set, including after the ring wraps.
        let cap = MAX_AL_EXTENTS; // needs 7 transactions to repeat the table
        let mut al = ActivityLog::new(cap).expect("capacity");
        let mut ring = empty_ring();
        for e in 0..5 {
            write_now(&mut al, &mut ring, e);
        }
        let rec = recover_ring(&ring).expect("recover");
        let mut al = ActivityLog::restore(cap, &rec).expect("restore");
        assert_eq!(al.active_extents(), rec.active_extents());
        assert_eq!(al.next_sequence(), 6);
        for e in 100..120 {
            write_now(&mut al, &mut ring, e);
            let r = recover_ring(&ring).expect("recover");
            assert_eq!(r.active_extents(), al.active_extents());
        }
        assert!(matches!(
            ActivityLog::restore(cap - 1, &recover_ring(&ring).expect("recover")),
            Err(AlError::CapacityChanged { .. })
        ));
    }

    #[test]
    fn ring_without_enough_history_is_unrecoverable() {
        // Proves recovery refuses (rather than under-reports) when the valid
        // transactions do not repeat every slot of a large table.
        let cap = MAX_AL_EXTENTS;
        let mut al = ActivityLog::new(cap).expect("capacity");
        let mut ring = empty_ring();
        for e in 0..12 {
            write_now(&mut al, &mut ring, e);
        }
        // Damage three of the older blocks: the consecutive run shrinks to 5.
        for seq in [5u64, 6, 7] {
            ring[(seq % 8) as usize][100] ^= 1;
        }
        assert!(matches!(
            recover_ring(&ring),
            Err(AlError::Unrecoverable { .. })
        ));
        assert!(matches!(recover(&[]), Err(AlError::Unrecoverable { .. })));
    }

    #[test]
    fn foreign_or_misplaced_blocks_are_refused_by_the_block_decoder() {
        // Proves the block decoder names the defect: bad magic, checksum, and
        // a valid block copied to the wrong ring position.
        let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
        let Ok(AlDecision::Persist(t)) = al.begin_write(0, 1) else {
            panic!("expected a transaction");
        };
        assert!(decode_block(1, &t.block).expect("valid").is_some());
        let err = |r: Result<Option<DecodedTxn>, AlError>| match r {
            Err(AlError::BadBlock { detail, .. }) => detail,
            other => panic!("expected BadBlock, got {other:?}"),
        };
        assert!(err(decode_block(2, &t.block)).contains("ring slot"));
        let mut m = t.block.clone();
        m[0] = 0;
        assert!(err(decode_block(1, &m)).contains("magic"));
        let mut c = t.block.clone();
        c[4000] ^= 0x10;
        assert!(err(decode_block(1, &c)).contains("checksum"));
        assert_eq!(decode_block(1, &[0; AL_TRANSACTION_BYTES]), Ok(None));
    }

    proptest! {
        #[test]
        fn recovery_after_every_commit_equals_the_live_set(
            ops in proptest::collection::vec((0u64..64, any::<bool>()), 1..200)
        ) {
            // Proves the ring always records a superset-free, exact copy of the
            // active set: after each commit, recover() == active_extents().
            let mut al = ActivityLog::new(MIN_AL_EXTENTS).expect("capacity");
            let mut ring = empty_ring();
            let mut in_flight: Vec<u64> = Vec::new();
            for (extent, finish) in ops {
                match write_now(&mut al, &mut ring, extent) {
                    AlDecision::Blocked(_) => {}
                    _ => in_flight.push(extent),
                }
                if finish || in_flight.len() >= MIN_AL_EXTENTS as usize {
                    let e = in_flight.remove(0);
                    al.end_write(e * X, 4096).expect("end");
                }
                let r = recover_ring(&ring).expect("recover");
                prop_assert_eq!(r.active_extents(), al.active_extents());
                for &e in &in_flight {
                    prop_assert!(al.is_active(ExtentIndex(e as u32)));
                }
            }
        }

        #[test]
        fn arbitrary_ring_bytes_never_panic(
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), AL_TRANSACTION_BYTES), 8),
        ) {
            // Proves recovery of a garbage ring returns a result, never panics.
            let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
            let _ = recover(&refs);
        }
    }
}
