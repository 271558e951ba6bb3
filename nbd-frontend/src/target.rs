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
