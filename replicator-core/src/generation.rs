//! Generation-UUID logic: the handshake decision (who syncs from whom, or split
//! brain) and the split-brain auto-recovery policies, after DRBD's
//! `drbd_uuid_compare` table.
//!
//! Owns: the pure decision function and the UUID rotation helpers. Must not:
//! hold state, read metadata or talk to the peer; callers pass views of both
//! sides and act on the returned [`Decision`].
//!
//! UUIDs are compared with their lowest bit masked off: that bit records
//! whether the node was Primary when it stored the UUID (DRBD's convention),
//! which `discard-younger-primary` uses.

/// The value of a current UUID on a freshly created, never-synced disk.
pub const UUID_JUST_CREATED: u64 = 0;

/// Bit 0 of a stored UUID: set when the node was Primary when it stored it.
pub const UUID_PRIMARY_BIT: u64 = 1;

/// Compare UUIDs without their role bit.
fn same(a: u64, b: u64) -> bool {
    (a & !UUID_PRIMARY_BIT) == (b & !UUID_PRIMARY_BIT)
}

fn is_empty(uuid: u64) -> bool {
    same(uuid, UUID_JUST_CREATED)
}

/// One side's generation UUIDs as the decision sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UuidView<'a> {
    /// The generation this node's data belongs to.
    pub current: u64,
    /// The generation the out-of-sync bitmap tracks changes against (0: none).
    pub bitmap: u64,
    /// Older generations, newest first; zero entries are unused slots.
    pub history: &'a [u64],
}

/// What the decision needs to know about one side besides its UUIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SideFlags {
    /// The disk holds a consistent image (UpToDate or Consistent, not
    /// Inconsistent / Outdated-from-an-interrupted-sync).
    pub consistent: bool,
    /// The node crashed while Primary: its AL extents are marked out of sync
    /// and it must be the source for them when UUIDs are otherwise equal.
    pub crashed_primary: bool,
    /// The node is Primary right now.
    pub primary: bool,
    /// Blocks set in this side's out-of-sync bitmap ("changes" for the
    /// split-brain policies).
    pub changed_blocks: u64,
}

/// One side of a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side<'a> {
    pub uuids: UuidView<'a>,
    pub flags: SideFlags,
}

/// Who is the SyncSource of a resync, from this node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSource {
    Me,
    Peer,
}

/// Configured split-brain auto-recovery (DRBD's `after-sb-0pri`). Applied only
/// when neither node is Primary, so a serving Primary's data is never
/// discarded automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitBrainPolicy {
    /// Report and keep the link down (the default).
    #[default]
    Disconnect,
    /// If one side made no changes since the split, sync from the other.
    DiscardZeroChanges,
    /// Discard the side that became Primary last (falls back to least changes).
    DiscardYoungerPrimary,
    /// Discard the side with fewer changed blocks (ties by node order).
    DiscardLeastChanges,
}

/// The outcome of comparing both sides at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Same data: no resync.
    NoSync,
    /// Resync only the blocks in the (merged) out-of-sync bitmaps.
    BitmapResync { source: SyncSource },
    /// Resync every block.
    FullSync { source: SyncSource },
    /// Both sides wrote independently. `has_common_ancestor`: the two bitmap
    /// UUIDs are the same generation (DRBD rule 90, where auto-recovery
    /// policies apply); false when they are related only further back in
    /// history (rule 100, never resolved automatically).
    SplitBrain { has_common_ancestor: bool },
    /// No generation in common: different data sets; never synced.
    Unrelated,
}

/// Which DRBD rule produced the raw decision; kept for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    BothEmpty,
    MeEmpty,
    PeerEmpty,
    EqualCurrent,
    PeerBitmapIsMyCurrent,
    PeerBitmapCoversMyGeneration,
    MyCurrentInPeerHistory,
    MyBitmapIsPeerCurrent,
    MyBitmapCoversPeerGeneration,
    PeerCurrentInMyHistory,
    EqualBitmaps,
    CommonHistory,
    NothingInCommon,
}

/// The full handshake decision: the UUID table, then the split-brain policy.
/// `i_win_ties` breaks symmetric cases (both crashed primaries, equal change
/// counts); the two nodes must pass opposite values.
pub fn decide(
    me: &Side<'_>,
    peer: &Side<'_>,
    policy: SplitBrainPolicy,
    i_win_ties: bool,
) -> Decision {
    let (raw, _rule) = compare_uuids(me, peer, i_win_ties);
    if me.flags.consistent != peer.flags.consistent && raw != Decision::Unrelated {
        // DRBD's "sync due to disk states": a side that is Inconsistent (an
        // interrupted resync target; it never served writes of its own) syncs
        // from the consistent side whatever the UUIDs say. Its current UUID
        // may have left the other side's bounded history after repeated
        // interruptions, which would otherwise look like a split brain. When
        // the UUIDs do not vouch for a bitmap resync from that side, copy
        // everything.
        let source = if me.flags.consistent {
            SyncSource::Me
        } else {
            SyncSource::Peer
        };
        return match raw {
            Decision::BitmapResync { source: s } if s == source => raw,
            _ => Decision::FullSync { source },
        };
    }
    match raw {
        Decision::SplitBrain {
            has_common_ancestor: true,
        } => recover_split_brain(me, peer, policy, i_win_ties).unwrap_or(raw),
        other => other,
    }
}

fn tie(i_win_ties: bool) -> SyncSource {
    if i_win_ties {
        SyncSource::Me
    } else {
        SyncSource::Peer
    }
}

/// DRBD's UUID comparison table, without the split-brain policy.
pub fn compare_uuids(me: &Side<'_>, peer: &Side<'_>, i_win_ties: bool) -> (Decision, Rule) {
    let (mu, pu) = (&me.uuids, &peer.uuids);
    let me_empty = is_empty(mu.current);
    let peer_empty = is_empty(pu.current);
    if me_empty && peer_empty {
        return (Decision::NoSync, Rule::BothEmpty);
    }
    if me_empty {
        return (
            Decision::FullSync {
                source: SyncSource::Peer,
            },
            Rule::MeEmpty,
        );
    }
    if peer_empty {
        return (
            Decision::FullSync {
                source: SyncSource::Me,
            },
            Rule::PeerEmpty,
        );
    }
    if same(mu.current, pu.current) {
        return (equal_current(me, peer, i_win_ties), Rule::EqualCurrent);
    }
    if !is_empty(pu.bitmap) && same(pu.bitmap, mu.current) {
        return (
            Decision::BitmapResync {
                source: SyncSource::Peer,
            },
            Rule::PeerBitmapIsMyCurrent,
        );
    }
    if covers(pu, mu) {
        return (
            Decision::BitmapResync {
                source: SyncSource::Peer,
            },
            Rule::PeerBitmapCoversMyGeneration,
        );
    }
    if in_history(mu.current, pu.history) {
        return (
            Decision::FullSync {
                source: SyncSource::Peer,
            },
            Rule::MyCurrentInPeerHistory,
        );
    }
    if !is_empty(mu.bitmap) && same(mu.bitmap, pu.current) {
        return (
            Decision::BitmapResync {
                source: SyncSource::Me,
            },
            Rule::MyBitmapIsPeerCurrent,
        );
    }
    if covers(mu, pu) {
        return (
            Decision::BitmapResync {
                source: SyncSource::Me,
            },
            Rule::MyBitmapCoversPeerGeneration,
        );
    }
    if in_history(pu.current, mu.history) {
        return (
            Decision::FullSync {
                source: SyncSource::Me,
            },
            Rule::PeerCurrentInMyHistory,
        );
    }
    if !is_empty(mu.bitmap) && same(mu.bitmap, pu.bitmap) {
        return (
            Decision::SplitBrain {
                has_common_ancestor: true,
            },
            Rule::EqualBitmaps,
        );
    }
    let mine = std::iter::once(mu.bitmap).chain(mu.history.iter().copied());
    let common = mine
        .filter(|u| !is_empty(*u))
        .any(|u| same(u, pu.bitmap) || in_history(u, pu.history));
    if common {
        return (
            Decision::SplitBrain {
                has_common_ancestor: false,
            },
            Rule::CommonHistory,
        );
    }
    (Decision::Unrelated, Rule::NothingInCommon)
}

/// `a`'s bitmap covers `b`'s data: `b` finished a resync from `a` and adopted
/// a generation `a` had since its bitmap UUID (so `b`'s current is in `a`'s
/// history and `a`'s bitmap UUID is in `b`'s history), but `a` never learnt
/// that the resync finished (the link dropped) and moved on. Every block `b`
/// lacks was written since `a`'s bitmap UUID, so a bitmap resync suffices.
fn covers(a: &UuidView<'_>, b: &UuidView<'_>) -> bool {
    !is_empty(a.bitmap) && in_history(a.bitmap, b.history) && in_history(b.current, a.history)
}

fn in_history(uuid: u64, history: &[u64]) -> bool {
    !is_empty(uuid) && history.iter().any(|h| !is_empty(*h) && same(*h, uuid))
}

/// Same current generation: in sync unless one side is inconsistent (an
/// interrupted resync), crashed as Primary (its AL extents are dirty) or holds
/// out-of-sync bits (writes in flight when the link dropped). A node that is
/// Primary right now is the source: it serves the data (e.g. promoted after
/// the crash of the other, before writing anything).
fn equal_current(me: &Side<'_>, peer: &Side<'_>, i_win_ties: bool) -> Decision {
    let (m, p) = (&me.flags, &peer.flags);
    let bitmap = |source| Decision::BitmapResync { source };
    match (m.consistent, p.consistent) {
        (true, false) => return bitmap(SyncSource::Me),
        (false, true) => return bitmap(SyncSource::Peer),
        (false, false) => return Decision::NoSync,
        (true, true) => {}
    }
    let dirty =
        m.crashed_primary || p.crashed_primary || m.changed_blocks > 0 || p.changed_blocks > 0;
    if !dirty {
        return Decision::NoSync;
    }
    match (m.primary, p.primary) {
        (true, false) => return bitmap(SyncSource::Me),
        (false, true) => return bitmap(SyncSource::Peer),
        _ => {}
    }
    match (m.crashed_primary, p.crashed_primary) {
        (true, true) => return bitmap(tie(i_win_ties)),
        (true, false) => return bitmap(SyncSource::Me),
        (false, true) => return bitmap(SyncSource::Peer),
        (false, false) => {}
    }
    match (m.changed_blocks > 0, p.changed_blocks > 0) {
        (true, false) => bitmap(SyncSource::Me),
        (false, true) => bitmap(SyncSource::Peer),
        _ => bitmap(tie(i_win_ties)),
    }
}

/// Apply the after-split-brain policy; `None` keeps the split brain.
fn recover_split_brain(
    me: &Side<'_>,
    peer: &Side<'_>,
    policy: SplitBrainPolicy,
    i_win_ties: bool,
) -> Option<Decision> {
    if me.flags.primary || peer.flags.primary {
        return None;
    }
    let (mine, theirs) = (me.flags.changed_blocks, peer.flags.changed_blocks);
    let least_changes = || {
        let source = match mine.cmp(&theirs) {
            std::cmp::Ordering::Greater => SyncSource::Me,
            std::cmp::Ordering::Less => SyncSource::Peer,
            std::cmp::Ordering::Equal => tie(i_win_ties),
        };
        Some(source)
    };
    let source = match policy {
        SplitBrainPolicy::Disconnect => None,
        SplitBrainPolicy::DiscardZeroChanges => match (mine == 0, theirs == 0) {
            (true, true) => Some(tie(i_win_ties)),
            (true, false) => Some(SyncSource::Peer),
            (false, true) => Some(SyncSource::Me),
            (false, false) => None,
        },
        SplitBrainPolicy::DiscardYoungerPrimary => {
            // The bitmap UUID is the generation before the split; its role
            // bit says who was Primary then (the older primary). The other
            // one was promoted later: discard it.
            let me_old = me.uuids.bitmap & UUID_PRIMARY_BIT != 0;
            let peer_old = peer.uuids.bitmap & UUID_PRIMARY_BIT != 0;
            match (me_old, peer_old) {
                (true, false) => Some(SyncSource::Me),
                (false, true) => Some(SyncSource::Peer),
                _ => least_changes(),
            }
        }
        SplitBrainPolicy::DiscardLeastChanges => least_changes(),
    }?;
    Some(Decision::BitmapResync { source })
}

/// Tag a freshly generated UUID with the node's role.
pub fn with_role_bit(uuid: u64, primary: bool) -> u64 {
    if primary {
        uuid | UUID_PRIMARY_BIT
    } else {
        uuid & !UUID_PRIMARY_BIT
    }
}

/// Whether a UUID value is the "just created" marker (role bit ignored).
pub fn uuid_is_empty(uuid: u64) -> bool {
    is_empty(uuid)
}

/// Whether two UUIDs name the same generation (role bit ignored).
pub fn same_generation(a: u64, b: u64) -> bool {
    same(a, b)
}
