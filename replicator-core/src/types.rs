//! Shared newtypes and small enums used across the core: block and extent
//! indices, request ids, roles, disk states, protocol modes and the generation
//! UUID set.
//!
//! Owns only plain values and their stable numeric codes (the codes appear on
//! the wire and on disk, so they never change once released). Must not hold
//! logic about replication or encoding beyond code <-> value conversion.

use std::fmt;

/// Longest resource or node name, in bytes of UTF-8, on the wire and on disk.
pub const MAX_NAME_BYTES: usize = 64;

/// Number of history UUIDs kept per node (DRBD keeps two; we keep four so a
/// node that went through several generations while away can still be matched).
pub const HISTORY_UUIDS: usize = 4;

/// Index of a bitmap block (one bit of the out-of-sync bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockIndex(pub u64);

/// Index of an activity-log extent (`offset / AL_EXTENT_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ExtentIndex(pub u32);

/// Sequence number of a replicated request (write, barrier, resync request),
/// chosen by the sender and echoed in acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RequestId(pub u64);

impl fmt::Display for BlockIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

impl fmt::Display for ExtentIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "extent {}", self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}", self.0)
    }
}

/// A node's role for one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    /// Serves the volume and accepts writes.
    Primary,
    /// Mirrors the primary.
    Secondary,
}

impl NodeRole {
    /// Stable code used on the wire and on disk.
    pub const fn code(self) -> u8 {
        match self {
            NodeRole::Primary => 1,
            NodeRole::Secondary => 2,
        }
    }

    /// Inverse of [`NodeRole::code`]; `None` for an unknown code.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(NodeRole::Primary),
            2 => Some(NodeRole::Secondary),
            _ => None,
        }
    }

    /// The name operators and scripts see (`replctl status`).
    pub const fn name(self) -> &'static str {
        match self {
            NodeRole::Primary => "Primary",
            NodeRole::Secondary => "Secondary",
        }
    }
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The state of a node's local copy, as DRBD names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiskState {
    /// No backing disk attached.
    Diskless,
    /// Holds data that is known not to be a usable copy (resync target, new disk).
    Inconsistent,
    /// Consistent but known to be older than the peer's copy.
    Outdated,
    /// Consistent, freshness unknown (peer not reachable yet).
    Consistent,
    /// Consistent and the newest copy.
    UpToDate,
}

impl DiskState {
    /// Stable code used on the wire and on disk.
    pub const fn code(self) -> u8 {
        match self {
            DiskState::Diskless => 0,
            DiskState::Inconsistent => 1,
            DiskState::Outdated => 2,
            DiskState::Consistent => 3,
            DiskState::UpToDate => 4,
        }
    }

    /// Inverse of [`DiskState::code`]; `None` for an unknown code.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(DiskState::Diskless),
            1 => Some(DiskState::Inconsistent),
            2 => Some(DiskState::Outdated),
            3 => Some(DiskState::Consistent),
            4 => Some(DiskState::UpToDate),
            _ => None,
        }
    }

    /// The name operators and scripts see (`replctl status`).
    pub const fn name(self) -> &'static str {
        match self {
            DiskState::Diskless => "Diskless",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
            DiskState::Consistent => "Consistent",
            DiskState::UpToDate => "UpToDate",
        }
    }
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When a replicated write is reported complete (DRBD protocols A, B, C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProtocolMode {
    /// Local write done and the frame queued for sending.
    A,
    /// Local write done and the peer received the frame.
    B,
    /// Local write done and the peer's write done (the default).
    #[default]
    C,
}

impl ProtocolMode {
    /// Stable code used on the wire.
    pub const fn code(self) -> u8 {
        match self {
            ProtocolMode::A => 1,
            ProtocolMode::B => 2,
            ProtocolMode::C => 3,
        }
    }

    /// Inverse of [`ProtocolMode::code`]; `None` for an unknown code.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(ProtocolMode::A),
            2 => Some(ProtocolMode::B),
            3 => Some(ProtocolMode::C),
            _ => None,
        }
    }
}

/// A node's generation identifiers (DRBD's model, see
/// `reference/drbd-model.md`): the current data generation, the generation the
/// out-of-sync bitmap tracks against (0 while connected and in sync), and a
/// rolling history of earlier generations, newest first. 0 means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GenerationUuids {
    /// The generation of the data on this node.
    pub current: u64,
    /// The generation the bitmap records changes against; 0 if none.
    pub bitmap: u64,
    /// Earlier generations, newest first; 0 for unused entries.
    pub history: [u64; HISTORY_UUIDS],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_codes_round_trip_and_unknown_codes_are_rejected() {
        // Proves every role survives code() -> from_code() and that codes outside
        // the table (including 0, the zero-filled default) are refused.
        for role in [NodeRole::Primary, NodeRole::Secondary] {
            assert_eq!(NodeRole::from_code(role.code()), Some(role));
        }
        assert_eq!(NodeRole::from_code(0), None);
        assert_eq!(NodeRole::from_code(3), None);
    }

    #[test]
    fn disk_state_codes_are_stable_and_round_trip() {
        // Pins the on-wire/on-disk codes of the disk states; changing one would
        // break compatibility with existing metadata and peers.
        let pinned = [
            (DiskState::Diskless, 0),
            (DiskState::Inconsistent, 1),
            (DiskState::Outdated, 2),
            (DiskState::Consistent, 3),
            (DiskState::UpToDate, 4),
        ];
        for (state, code) in pinned {
            assert_eq!(state.code(), code);
            assert_eq!(DiskState::from_code(code), Some(state));
        }
        assert_eq!(DiskState::from_code(5), None);
    }

    #[test]
    fn protocol_codes_round_trip_and_default_is_c() {
        // Proves the protocol codes round trip and that C is the default mode.
        for p in [ProtocolMode::A, ProtocolMode::B, ProtocolMode::C] {
            assert_eq!(ProtocolMode::from_code(p.code()), Some(p));
        }
        assert_eq!(ProtocolMode::from_code(0), None);
        assert_eq!(ProtocolMode::default(), ProtocolMode::C);
    }
}
