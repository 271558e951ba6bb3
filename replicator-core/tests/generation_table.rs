//! One scenario test per row of the generation-UUID handshake table, plus the
//! split-brain auto-recovery policies. Each test calls the pure decision from
//! both sides and checks that the two answers mirror each other.
use replicator_core::generation::{
    compare_uuids, decide, Decision, Rule, Side, SideFlags, SplitBrainPolicy, SyncSource, UuidView,
};

const A: u64 = 0xA000;
const B: u64 = 0xB000;
const C: u64 = 0xC000;
const D: u64 = 0xD000;

fn consistent(changed_blocks: u64) -> SideFlags {
    SideFlags {
        consistent: true,
        changed_blocks,
        ..SideFlags::default()
    }
}

fn side(current: u64, bitmap: u64, history: &[u64], flags: SideFlags) -> Side<'_> {
    Side {
        uuids: UuidView {
            current,
            bitmap,
            history,
        },
        flags,
    }
}

fn mirror(d: Decision) -> Decision {
    let flip = |s| match s {
        SyncSource::Me => SyncSource::Peer,
        SyncSource::Peer => SyncSource::Me,
    };
    match d {
        Decision::BitmapResync { source } => Decision::BitmapResync {
            source: flip(source),
        },
        Decision::FullSync { source } => Decision::FullSync {
            source: flip(source),
        },
        other => other,
    }
}

/// Decide from both sides; assert they agree; return (my decision, my rule).
fn both_ways(me: &Side<'_>, peer: &Side<'_>, policy: SplitBrainPolicy) -> (Decision, Rule) {
    let mine = decide(me, peer, policy, true);
    let theirs = decide(peer, me, policy, false);
    assert_eq!(mirror(mine), theirs, "the two nodes must agree");
    (mine, compare_uuids(me, peer, true).1)
}

#[test]
fn both_disks_just_created_need_no_sync() {
    // Two empty disks (current UUID 0): nothing to copy either way.
    let h = [0u64; 4];
    let (d, rule) = both_ways(
        &side(0, 0, &h, SideFlags::default()),
        &side(0, 0, &h, SideFlags::default()),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(d, Decision::NoSync);
    assert_eq!(rule, Rule::BothEmpty);
}

#[test]
fn one_empty_disk_gets_a_full_sync_from_the_other() {
    // The side with data is the SyncSource of a full sync.
    let h = [0u64; 4];
    let (d, rule) = both_ways(
        &side(A, 0, &h, consistent(0)),
        &side(0, 0, &h, SideFlags::default()),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::FullSync {
            source: SyncSource::Me
        }
    );
    assert_eq!(rule, Rule::PeerEmpty);
    let (d, rule) = both_ways(
        &side(0, 0, &h, SideFlags::default()),
        &side(A, 0, &h, consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::FullSync {
            source: SyncSource::Peer
        }
    );
    assert_eq!(rule, Rule::MeEmpty);
}

#[test]
fn equal_current_uuids_need_no_sync() {
    // Same generation, both consistent, no dirty bits: in sync.
    let h = [B, 0];
    let (d, rule) = both_ways(
        &side(A, 0, &h, consistent(0)),
        &side(A | 1, 0, &h, consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(d, Decision::NoSync);
    assert_eq!(rule, Rule::EqualCurrent);
}

#[test]
fn equal_current_with_crashed_primary_resyncs_its_activity_log_from_it() {
    // A primary that crashed is the source for its dirty AL extents.
    let h = [0u64; 2];
    let crashed = SideFlags {
        crashed_primary: true,
        ..consistent(8)
    };
    let (d, _) = both_ways(
        &side(A, 0, &h, crashed),
        &side(A, 0, &h, consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Me
        }
    );
}

#[test]
fn equal_current_crashed_old_primary_syncs_from_the_promoted_primary() {
    // After a failover the promoted node (Primary now, no write yet, so the
    // same UUID) is the source, even though the old primary crashed.
    let h = [0u64; 2];
    let crashed = SideFlags {
        crashed_primary: true,
        ..consistent(8)
    };
    let primary = SideFlags {
        primary: true,
        ..consistent(0)
    };
    let (d, _) = both_ways(
        &side(A, 0, &h, crashed),
        &side(A, 0, &h, primary),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Peer
        }
    );
}

#[test]
fn equal_current_with_inconsistent_side_resumes_resync_from_consistent_one() {
    // An interrupted resync (target Inconsistent) resumes on reconnect.
    let h = [0u64; 2];
    let target = SideFlags {
        consistent: false,
        changed_blocks: 5,
        ..SideFlags::default()
    };
    let (d, _) = both_ways(
        &side(A, 0, &h, target),
        &side(A, 0, &h, consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Peer
        }
    );
}

#[test]
fn equal_current_with_dirty_bits_on_one_side_resyncs_from_that_side() {
    // Writes in flight at disconnect left bits on the primary, same UUID.
    let h = [0u64; 2];
    let (d, _) = both_ways(
        &side(A, 0, &h, consistent(3)),
        &side(A, 0, &h, consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Me
        }
    );
}

#[test]
fn my_bitmap_uuid_equal_to_peer_current_makes_me_bitmap_source() {
    // I wrote while disconnected (new current C, bitmap tracks A); peer stayed at A.
    let (d, rule) = both_ways(
        &side(C, A, &[A, 0], consistent(7)),
        &side(A, 0, &[0, 0], consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Me
        }
    );
    assert_eq!(rule, Rule::MyBitmapIsPeerCurrent);
}

#[test]
fn peer_bitmap_uuid_equal_to_my_current_makes_me_bitmap_target() {
    // The mirror row: the peer moved on, I am the SyncTarget.
    let (d, rule) = both_ways(
        &side(A, 0, &[0, 0], consistent(0)),
        &side(C, A, &[A, 0], consistent(7)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Peer
        }
    );
    assert_eq!(rule, Rule::PeerBitmapIsMyCurrent);
}

#[test]
fn finished_resync_the_source_never_heard_of_is_a_bitmap_resync() {
    // bravo finished a resync from alpha (adopting generation C, keeping
    // alpha's bitmap UUID A in its history); the link dropped before alpha
    // learnt it, and alpha wrote on (new current D, C in history, bitmap
    // still A). alpha's bitmap covers everything bravo lacks.
    let (d, rule) = both_ways(
        &side(D, A, &[C, 0], consistent(5)),
        &side(C, 0, &[A, B], consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Me
        }
    );
    assert_eq!(rule, Rule::MyBitmapCoversPeerGeneration);
    let (d, rule) = both_ways(
        &side(C, 0, &[A, B], consistent(0)),
        &side(D, A, &[C, 0], consistent(5)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Peer
        }
    );
    assert_eq!(rule, Rule::PeerBitmapCoversMyGeneration);
}

#[test]
fn my_current_in_peer_history_means_full_sync_from_peer() {
    // Peer went two generations past mine (bitmap lost): full sync to me.
    let (d, rule) = both_ways(
        &side(A, 0, &[0, 0], consistent(0)),
        &side(D, C, &[C, A], consistent(7)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::FullSync {
            source: SyncSource::Peer
        }
    );
    assert_eq!(rule, Rule::MyCurrentInPeerHistory);
}

#[test]
fn peer_current_in_my_history_means_full_sync_from_me() {
    // The mirror row.
    let (d, rule) = both_ways(
        &side(D, C, &[C, A], consistent(7)),
        &side(A, 0, &[0, 0], consistent(0)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::FullSync {
            source: SyncSource::Me
        }
    );
    assert_eq!(rule, Rule::PeerCurrentInMyHistory);
}

#[test]
fn equal_bitmaps_different_currents_is_split_brain_with_common_ancestor() {
    // Both wrote after the split from generation A: split brain, link stays down.
    let (d, rule) = both_ways(
        &side(B, A, &[A, 0], consistent(4)),
        &side(C, A, &[A, 0], consistent(9)),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(
        d,
        Decision::SplitBrain {
            has_common_ancestor: true
        }
    );
    assert_eq!(rule, Rule::EqualBitmaps);
}

#[test]
fn history_overlap_only_is_split_brain_without_auto_recovery() {
    // Related only further back: split brain that no policy resolves.
    let (d, rule) = both_ways(
        &side(B, D, &[D, A], consistent(0)),
        &side(C, 0xE000, &[0xE000, A], consistent(5)),
        SplitBrainPolicy::DiscardZeroChanges,
    );
    assert_eq!(
        d,
        Decision::SplitBrain {
            has_common_ancestor: false
        }
    );
    assert_eq!(rule, Rule::CommonHistory);
}

#[test]
fn nothing_in_common_is_unrelated_data() {
    // Two disks from different create-md runs: never synced.
    let (d, rule) = both_ways(
        &side(A, 0, &[B, 0], consistent(0)),
        &side(C, 0, &[D, 0], consistent(0)),
        SplitBrainPolicy::DiscardLeastChanges,
    );
    assert_eq!(d, Decision::Unrelated);
    assert_eq!(rule, Rule::NothingInCommon);
}

#[test]
fn discard_zero_changes_syncs_from_the_side_that_wrote() {
    // Split brain where only one side changed blocks resolves toward it.
    let (d, _) = both_ways(
        &side(B, A, &[A, 0], consistent(0)),
        &side(C, A, &[A, 0], consistent(9)),
        SplitBrainPolicy::DiscardZeroChanges,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Peer
        }
    );
}

#[test]
fn discard_zero_changes_keeps_split_brain_when_both_wrote() {
    // Both changed blocks: the policy does not apply.
    let (d, _) = both_ways(
        &side(B, A, &[A, 0], consistent(1)),
        &side(C, A, &[A, 0], consistent(9)),
        SplitBrainPolicy::DiscardZeroChanges,
    );
    assert!(matches!(d, Decision::SplitBrain { .. }));
}

#[test]
fn discard_least_changes_syncs_from_the_side_with_more_changes() {
    // Fewer changed blocks loses.
    let (d, _) = both_ways(
        &side(B, A, &[A, 0], consistent(12)),
        &side(C, A, &[A, 0], consistent(9)),
        SplitBrainPolicy::DiscardLeastChanges,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Me
        }
    );
}

#[test]
fn discard_younger_primary_keeps_the_node_that_was_primary_before_the_split() {
    // My bitmap UUID carries the primary bit: I was the old primary, the peer
    // was promoted later and is discarded even though it changed more.
    let (d, _) = both_ways(
        &side(B, A | 1, &[A | 1, 0], consistent(1)),
        &side(C, A, &[A, 0], consistent(50)),
        SplitBrainPolicy::DiscardYoungerPrimary,
    );
    assert_eq!(
        d,
        Decision::BitmapResync {
            source: SyncSource::Me
        }
    );
}

#[test]
fn split_brain_policy_never_discards_a_current_primary() {
    // With a Primary on either side the policy is not applied.
    let primary = SideFlags {
        primary: true,
        ..consistent(0)
    };
    let (d, _) = both_ways(
        &side(B, A, &[A, 0], primary),
        &side(C, A, &[A, 0], consistent(9)),
        SplitBrainPolicy::DiscardZeroChanges,
    );
    assert_eq!(
        d,
        Decision::SplitBrain {
            has_common_ancestor: true
        }
    );
}

#[test]
fn disconnect_policy_keeps_split_brain() {
    // The default policy never resolves anything.
    let (d, _) = both_ways(
        &side(B, A, &[A, 0], consistent(0)),
        &side(C, A, &[A, 0], consistent(9)),
        SplitBrainPolicy::Disconnect,
    );
    assert!(matches!(d, Decision::SplitBrain { .. }));
}

#[test]
fn inconsistent_side_whose_uuid_left_the_history_full_syncs_instead_of_split_brain() {
    // DRBD's "sync due to disk states": a resync target interrupted so often
    // that its current UUID fell out of the Primary's bounded history looks
    // like a split brain to the UUID table; because it is Inconsistent (it
    // never served writes of its own) it is fully resynced from the
    // consistent side instead, never reported as split brain.
    let target_history = [B, 0, 0, 0];
    let primary_history = [D, C, 0x9000, 0x8000];
    let target = SideFlags {
        consistent: false,
        changed_blocks: 7,
        ..SideFlags::default()
    };
    let primary = SideFlags {
        consistent: true,
        primary: true,
        changed_blocks: 9,
        ..SideFlags::default()
    };
    let me = side(0x7000, 0, &target_history, target);
    let peer = side(0x6000, B, &primary_history, primary);
    assert!(matches!(
        compare_uuids(&me, &peer, true).0,
        Decision::SplitBrain { .. }
    ));
    let (d, _) = both_ways(&me, &peer, SplitBrainPolicy::Disconnect);
    assert_eq!(
        d,
        Decision::FullSync {
            source: SyncSource::Peer
        }
    );
    // Unrelated data stays unrelated, whatever the disk states.
    let lone = [0u64; 4];
    let (d, _) = both_ways(
        &side(0x7000, 0, &lone, target),
        &side(0x6000, 0, &lone, primary),
        SplitBrainPolicy::Disconnect,
    );
    assert_eq!(d, Decision::Unrelated);
}
