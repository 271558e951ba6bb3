//! The storage behind an export, as the NBD server sees it.
//!
//! Owns the [`BlockTarget`] trait, its error type and [`PayloadBuf`] (memory
//! a target lends for WRITE payloads). It knows nothing of NBD
//! wire numbers (errno values are chosen by the server at the edge) and
//! nothing of replication: the daemon implements this trait over a local disk
//! or over the replication engine.

use std::future::Future;

use bytes::Bytes;

/// What an export can do; the server turns this into transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetFlags {
    /// Writes, trims and zeroes are refused with [`TargetError::ReadOnly`].
    pub read_only: bool,
    /// `flush` makes every completed write durable (SEND_FLUSH, SEND_FUA).
    pub can_flush: bool,
    /// `trim` may discard (SEND_TRIM).
    pub can_trim: bool,
    /// `write_zeroes` is supported (SEND_WRITE_ZEROES).
    pub can_zero: bool,
    /// `write_zeroes` with `fast` can answer [`TargetError::NotFast`] (SEND_FAST_ZERO).
    pub can_fast_zero: bool,
    /// `cache` is understood (SEND_CACHE).
    pub can_cache: bool,
    /// A flush on any connection covers writes completed on all (CAN_MULTI_CONN).
    pub can_multi_conn: bool,
    /// Seek-sensitive storage (ROTATIONAL hint).
    pub rotational: bool,
}

/// One extent of `base:allocation` block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    /// Unallocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads as zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// One piece of a read that may come back fragmented
/// ([`BlockTarget::read_sparse`]), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPiece {
    /// These bytes.
    Data(Bytes),
    /// This many bytes that read as zeroes and were not read (a hole).
    Hole(u32),
}

impl ReadPiece {
    pub fn len_bytes(&self) -> u64 {
        match self {
            ReadPiece::Data(d) => d.len() as u64,
            ReadPiece::Hole(n) => u64::from(*n),
        }
    }
}

/// Most pieces [`BlockTarget::read_sparse`] may return (so most chunks of
/// one READ reply).
pub const MAX_READ_PIECES: usize = 64;

/// Where the pieces of a sparse read of `[offset, offset + len_bytes)` lie,
/// given the range's allocation `extents` (as [`BlockTarget::block_status`]
/// returns them): `(offset, length, hole)` in order, covering exactly the
/// range. Extents that read as zeroes become holes; whatever the extents do
/// not cover is data; past [`MAX_READ_PIECES`] - 1 pieces the rest is one
/// data piece.
pub fn plan_read_pieces(offset: u64, len_bytes: u32, extents: &[Extent]) -> Vec<(u64, u32, bool)> {
    let end = offset + u64::from(len_bytes);
    let mut plan: Vec<(u64, u32, bool)> = Vec::new();
    let mut at = offset;
    for e in extents {
        if at == end || plan.len() == MAX_READ_PIECES - 1 {
            break;
        }
        let n = e.length_bytes.min(end - at) as u32;
        if n == 0 {
            continue;
        }
        match plan.last_mut() {
            Some(last) if last.2 == e.zero => last.1 += n,
            _ => plan.push((at, n, e.zero)),
        }
        at += u64::from(n);
    }
    if at < end {
        let n = (end - at) as u32;
        match plan.last_mut() {
            Some(last) if !last.2 => last.1 += n,
            _ => plan.push((at, n, false)),
        }
    }
    plan
}

/// Carries out a plan of [`plan_read_pieces`]: holes as they are, data
/// read with `target.read`, one piece after the other.
pub async fn read_planned<T: BlockTarget>(
    target: &T,
    plan: &[(u64, u32, bool)],
) -> Result<Vec<ReadPiece>, TargetError> {
    let mut pieces = Vec::with_capacity(plan.len());
    for &(offset, len_bytes, hole) in plan {
        pieces.push(if hole {
            ReadPiece::Hole(len_bytes)
        } else {
            ReadPiece::Data(target.read(offset, len_bytes).await?)
        });
    }
    Ok(pieces)
}

/// Why a target operation failed. The NBD server maps each variant to the
/// errno the spec names; nothing below the server knows NBD errno values.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{op} of {len_bytes} bytes at offset {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("no space left for {len_bytes} bytes at offset {offset}")]
    NoSpace { offset: u64, len_bytes: u64 },
    #[error("zeroing is not faster than writing here")]
    NotFast,
    #[error("the export is shutting down")]
    ShuttingDown,
    #[error("the volume cannot serve this now: {0}")]
    Unavailable(String),
}

/// Memory a target lends for one WRITE payload (see
/// [`BlockTarget::payload_buf`]): the server fills every byte of it from the
/// socket, then passes [`PayloadBuf::freeze`] to [`BlockTarget::write`]. It
/// lets the target choose where payloads land (aligned for O_DIRECT, from a
/// pool) so that it need not copy them.
pub trait PayloadBuf: Send + 'static {
    /// The bytes to fill, exactly as many as the payload has.
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// The filled payload.
    fn freeze(self: Box<Self>) -> Bytes;
}

/// The storage behind an export. Offsets and lengths are already checked by
/// the server against [`BlockTarget::size_bytes`] when these are called.
/// Implementations must be safe to call concurrently from many connections.
pub trait BlockTarget: Send + Sync + 'static {
    /// The size the export offers, in bytes.
    fn size_bytes(&self) -> u64;
    /// What the export supports.
    fn flags(&self) -> TargetFlags;
    /// Reads exactly `len_bytes` at `offset`.
    fn read(
        &self,
        offset: u64,
        len_bytes: u32,
    ) -> impl Future<Output = Result<Bytes, TargetError>> + Send;
    /// Reads `len_bytes` at `offset` for a reply that may be fragmented
    /// (structured replies, no DF): pieces in order covering exactly the
    /// range, where a [`ReadPiece::Hole`] reads as zeroes and is sent as an
    /// OFFSET_HOLE chunk instead of data. The default reads it all as one
    /// piece; a target that knows its holes cheaply overrides it.
    fn read_sparse(
        &self,
        offset: u64,
        len_bytes: u32,
    ) -> impl Future<Output = Result<Vec<ReadPiece>, TargetError>> + Send {
        async move { Ok(vec![ReadPiece::Data(self.read(offset, len_bytes).await?)]) }
    }
    /// A buffer of exactly `len_bytes` (at most
    /// [`crate::proto::MAX_PAYLOAD_BYTES`]) for the payload of a WRITE,
    /// asked for as soon as its header arrives, before the request is
    /// validated; a buffer of another length is not used. `None` (the
    /// default): the server keeps the payload in its receive buffer.
    fn payload_buf(&self, len_bytes: usize) -> Option<Box<dyn PayloadBuf>> {
        let _ = len_bytes;
        None
    }
    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;
    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), TargetError>> + Send;
    /// Discards a range (a hint; contents afterwards are unspecified).
    fn trim(
        &self,
        offset: u64,
        len_bytes: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;
    /// Makes a range read as zeroes; `may_punch` allows deallocation, `fast`
    /// asks for [`TargetError::NotFast`] unless it is cheaper than a write.
    fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;
    /// A prefetch hint; must not change what reads return.
    fn cache(
        &self,
        offset: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;
    /// Allocation status of `[offset, offset + len_bytes)`: at least one
    /// extent; only the last may run past the range.
    fn block_status(
        &self,
        offset: u64,
        len_bytes: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, TargetError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn read_plans_tile_the_range_and_put_holes_only_on_zeroes(
            extents in proptest::collection::vec((1u64..=16, any::<bool>()), 0..200),
            start in 0u64..64,
            len in 1u32..=256,
        ) {
            // Proves a plan covers the read exactly, in order, with no empty
            // or same-kind neighbouring pieces, at most MAX_READ_PIECES, a
            // hole only where the extents read as zeroes, and (when the
            // limit is not hit) data only where they do not.
            let unit = 512u64;
            let mut zero_at = Vec::new();
            let ext: Vec<Extent> = extents
                .iter()
                .map(|&(n, zero)| {
                    zero_at.extend(std::iter::repeat_n(zero, n as usize));
                    Extent { length_bytes: n * unit, hole: zero, zero }
                })
                .collect();
            // The extents describe the range from `start` on.
            let offset = start * unit;
            let plan = plan_read_pieces(offset, len * unit as u32, &ext);
            prop_assert!(!plan.is_empty() && plan.len() <= MAX_READ_PIECES);
            let mut at = offset;
            for w in plan.windows(2) {
                prop_assert!(w[0].2 != w[1].2, "neighbours of one kind: {:?}", plan);
            }
            let is_zero = |u: u64| zero_at.get((u - start) as usize).copied().unwrap_or(false);
            for &(o, n, hole) in &plan {
                prop_assert_eq!(o, at);
                prop_assert!(n > 0);
                for u in o / unit..(o + u64::from(n)) / unit {
                    if hole {
                        prop_assert!(is_zero(u), "hole over data at unit {}", u);
                    } else if plan.len() < MAX_READ_PIECES {
                        prop_assert!(!is_zero(u), "data over a hole at unit {}", u);
                    }
                }
                at += u64::from(n);
            }
            prop_assert_eq!(at, offset + u64::from(len) * unit);
        }
    }

    #[test]
    fn a_read_past_the_extents_is_data_there() {
        // Proves extents covering less than the read (block status may
        // answer short) leave the rest as data, merged with data before it.
        let e = |n, zero| Extent {
            length_bytes: n,
            hole: zero,
            zero,
        };
        assert_eq!(
            plan_read_pieces(100, 50, &[e(10, true)]),
            vec![(100, 10, true), (110, 40, false)]
        );
        assert_eq!(
            plan_read_pieces(0, 50, &[e(10, false)]),
            vec![(0, 50, false)]
        );
        assert_eq!(
            plan_read_pieces(0, 5, &[e(0, true), e(10, true)]),
            vec![(0, 5, true)]
        );
    }
}
