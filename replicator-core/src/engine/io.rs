//! The engine's vocabulary: what comes in ([`Input`]), what goes out
//! ([`Output`]), configuration, the loaded metadata and the status snapshot.
//!
//! Owns plain data types only. Must not hold logic: the state machine lives in
//! the sibling modules.

use bytes::Bytes;

use crate::activity_log::AlRecovery;
use crate::bitmap::Bitmap;
use crate::generation::SplitBrainPolicy;
use crate::metadata::{MetadataLayout, Superblock};
use crate::types::{DiskState, NodeRole, ProtocolMode};
use crate::wire::{Message, WireError};

/// Engine time in nanoseconds from an arbitrary origin chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// `self + nanos`, saturating.
    pub fn plus_ns(self, nanos: u64) -> Time {
        Time(self.0.saturating_add(nanos))
    }
}

/// Identifies one disk operation the engine asked for; echoed in
/// [`Input::DiskDone`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// Identifies one client (NBD) request; echoed in [`Output::Complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// A request from the block front end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    Read {
        offset: u64,
        len_bytes: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len_bytes: u32,
    },
    WriteZeroes {
        offset: u64,
        len_bytes: u32,
        fua: bool,
    },
}

/// Operator commands (`replctl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    Primary {
        force: bool,
    },
    Secondary,
    Connect,
    Disconnect,
    Invalidate,
    InvalidateRemote,
    PauseSync,
    ResumeSync,
    Verify,
    NewCurrentUuid {
        clear_bitmap: bool,
    },
    /// Start a resync of whatever the bitmap holds (reconnects if needed).
    StartResync,
    /// Clean shutdown: persist the bitmap and a clean superblock.
    Shutdown,
}

/// A failed disk operation, as the disk engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskError {
    /// errno-like code.
    pub code: i32,
}

/// Everything that can happen to the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Client {
        id: ClientId,
        request: ClientRequest,
    },
    /// A disk operation finished. Reads carry their data.
    DiskDone {
        op: OpId,
        result: Result<Bytes, DiskError>,
    },
    /// A decoded frame from the peer.
    PeerFrame(Message),
    /// The peer's byte stream could not be decoded: the link must be dropped.
    PeerFrameError(WireError),
    /// The transport connected to the peer.
    Connected,
    /// The transport lost the peer.
    Disconnected,
    /// Time passed (a deadline from [`crate::engine::Engine::next_deadline`]).
    Tick,
    Admin(AdminCommand),
}

/// A disk operation to execute; completion comes back as [`Input::DiskDone`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Read {
        offset: u64,
        len_bytes: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Zero {
        offset: u64,
        len_bytes: u32,
        fua: bool,
    },
    Trim {
        offset: u64,
        len_bytes: u32,
    },
    Flush,
    /// Write `data` at `offset_bytes` of the metadata device; must be durable
    /// (written and flushed) before it is reported done.
    MetaWrite {
        offset_bytes: u64,
        data: Bytes,
    },
}

/// Why a client request failed; the front end maps these to its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientError {
    /// The range lies outside the device or is malformed.
    OutOfRange,
    /// This node does not accept the request in its role (e.g. Secondary).
    NotPrimary,
    /// The local disk failed.
    Io,
    /// Too many requests queued.
    Busy,
}

/// Connection states operators see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    StandAlone,
    Connecting,
    Connected,
}

impl ConnState {
    pub const fn name(self) -> &'static str {
        match self {
            ConnState::StandAlone => "StandAlone",
            ConnState::Connecting => "Connecting",
            ConnState::Connected => "Connected",
        }
    }
}

/// Replication states operators see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
    PausedSyncS,
    PausedSyncT,
    VerifyS,
    VerifyT,
}

impl ReplState {
    pub const fn name(self) -> &'static str {
        match self {
            ReplState::Off => "Off",
            ReplState::Established => "Established",
            ReplState::SyncSource => "SyncSource",
            ReplState::SyncTarget => "SyncTarget",
            ReplState::PausedSyncS => "PausedSyncS",
            ReplState::PausedSyncT => "PausedSyncT",
            ReplState::VerifyS => "VerifyS",
            ReplState::VerifyT => "VerifyT",
        }
    }

    /// Whether application writes are mirrored in this state.
    pub const fn replicating(self) -> bool {
        !matches!(self, ReplState::Off)
    }
}

/// Resync progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_s: u64,
    pub eta_s: u64,
}

/// A state change, for `replctl events` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Role(NodeRole),
    Disk(DiskState),
    Connection(ConnState),
    Replication(ReplState),
    PeerRole(Option<NodeRole>),
    PeerDisk(Option<DiskState>),
    OutOfSync {
        bytes: u64,
    },
    Resync(ResyncProgress),
    /// Both sides wrote independently; the link stays down.
    SplitBrain {
        has_common_ancestor: bool,
    },
    /// The peer holds unrelated data.
    UnrelatedPeer,
    /// Online verify finished; `mismatched_bytes` were marked out of sync.
    VerifyDone {
        mismatched_bytes: u64,
    },
    /// The peer link was dropped because of a protocol problem.
    ProtocolError {
        detail: String,
    },
}

/// Errors of admin commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// The local data is Inconsistent or Outdated: promoting it would serve
    /// stale data. `--force` overrides.
    StaleData { disk: DiskState },
    /// The peer is Primary (single-primary mode).
    PeerIsPrimary,
    /// The command does not apply in the current state.
    WrongState { detail: String },
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminError::StaleData { disk } => write!(
                f,
                "refusing to become primary: local disk is {disk} (use --force to override)"
            ),
            AdminError::PeerIsPrimary => f.write_str("the peer is already primary"),
            AdminError::WrongState { detail } => f.write_str(detail),
        }
    }
}

impl std::error::Error for AdminError {}

/// One effect for the caller to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Disk {
        op: OpId,
        kind: DiskOp,
    },
    Send(Message),
    Complete {
        id: ClientId,
        result: Result<Bytes, ClientError>,
    },
    Event(Event),
    /// Close the peer link (after sending what was queued before this).
    CloseLink {
        reason: String,
    },
    /// Result of an [`Input::Admin`] command.
    AdminResult(Result<(), AdminError>),
    /// The node must stop now: a write of its metadata failed, so what it
    /// would persist next (its disk state, the activity log, the bitmap)
    /// cannot be trusted to be there after a crash. The engine takes no
    /// more input; its peer sees the link drop, as after a crash.
    Fatal {
        reason: String,
    },
}

/// Test hooks that deliberately break the engine, set only by the simulator's
/// self-test to prove the oracle catches a broken invariant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimFault {
    #[default]
    None,
    /// Complete protocol-C writes without waiting for the peer's WriteAck.
    AckBeforePeer,
    /// Do not mark out-of-sync bits for writes done while disconnected.
    ForgetOutOfSync,
    /// Accept reordered frames: the simulator stops checking frame numbers
    /// and the engine stops checking that Write/Barrier ids increase.
    IgnoreFrameOrder,
}

/// Static configuration of one node's engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub resource: String,
    pub node: String,
    pub peer: String,
    pub size_bytes: u64,
    pub bitmap_block_bytes: u32,
    pub protocol: ProtocolMode,
    pub secret: Vec<u8>,
    pub split_brain: SplitBrainPolicy,
    pub al_extents: u32,
    /// Where the metadata regions lie on the metadata device (for internal
    /// metadata, the backing disk itself); `MetaWrite` offsets come from it.
    pub meta_layout: MetadataLayout,
    /// None: unlimited.
    pub resync_rate_bytes_per_s: Option<u64>,
    /// Simulator-only breakage; always `SimFault::None` in production.
    pub sim_fault: SimFault,
}

/// What the daemon read from disk before starting the engine.
#[derive(Debug, Clone)]
pub struct LoadedMetadata {
    pub superblock: Superblock,
    /// Which slot the superblock came from (the next write goes to the other).
    pub superblock_slot: u8,
    pub bitmap: Bitmap,
    /// What the AL ring holds (`activity_log::recover`).
    pub al: AlRecovery,
}

/// A snapshot for `replctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub role: NodeRole,
    pub disk: DiskState,
    pub connection: ConnState,
    pub replication: ReplState,
    pub peer_role: Option<NodeRole>,
    pub peer_disk: Option<DiskState>,
    pub size_bytes: u64,
    pub out_of_sync_bytes: u64,
    pub resync: Option<ResyncProgress>,
    /// A SyncTarget waiting after its disk failed a resync write or flush:
    /// how long this wait is (1 s, doubling, at most 16 s), in seconds.
    pub resync_disk_wait_s: Option<u64>,
    /// The failure behind `resync_disk_wait_s` was the peer's: the
    /// SyncSource could not read the data.
    pub resync_disk_wait_peer: bool,
    /// A SyncSource whose target waits after a disk failure (the target's
    /// or this node's) before it asks for more.
    pub peer_resync_disk_wait: bool,
    pub split_brain: bool,
}
