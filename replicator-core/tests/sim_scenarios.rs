//! The deterministic simulator as tests: named fault scenarios, a fixed list
//! of random seeds, and self-tests proving that a deliberately broken engine
//! makes the simulator fail (so a passing run means something).
use replicator_core::engine::SimFault;
use replicator_core::sim::{run, Scenario, SimConfig, SimReport};

fn pass(scenario: Scenario, seeds: &[u64]) -> Vec<SimReport> {
    seeds
        .iter()
        .map(|&seed| match run(&SimConfig::new(seed, scenario)) {
            Ok(r) => r,
            Err(f) => panic!("{f}"),
        })
        .collect()
}

#[test]
fn primary_crash_mid_write_fails_over_without_losing_acknowledged_writes() {
    // The Primary crashes with writes in flight; the in-sync Secondary is
    // promoted and must hold every acknowledged write; the old Primary
    // rejoins as SyncTarget and the pair converges.
    for r in pass(Scenario::PrimaryCrashMidWrite, &[1, 2, 3]) {
        assert_eq!((r.crashes, r.failovers), (1, 1), "{r:?}");
        assert!(r.writes_acked > 100);
    }
}

#[test]
fn secondary_crash_loses_no_flushed_write_and_resyncs() {
    // The Secondary crashes (losing unflushed cache); flushed data survives
    // on it and the transfer log resyncs what it lost.
    for r in pass(Scenario::SecondaryCrash, &[1, 2, 3]) {
        assert_eq!(r.crashes, 1, "{r:?}");
    }
}

#[test]
fn partition_during_writes_then_heal_converges() {
    // Writes continue while partitioned (marked out of sync); after the heal
    // only those blocks are resynced and the replicas end identical.
    pass(Scenario::PartitionThenHeal, &[1, 2, 3]);
}

#[test]
fn partition_during_resync_resumes_and_converges() {
    // Repeated partitions interrupt resyncs; each reconnect resumes.
    pass(Scenario::PartitionDuringResync, &[1, 2, 3]);
}

#[test]
fn corrupt_and_duplicated_frames_drop_the_link_and_never_apply_bad_data() {
    // Bit flips meet the frame CRC and duplicates meet the protocol checks:
    // the link drops, resyncs, and no bad byte reaches a disk.
    let reports = pass(Scenario::CorruptAndDuplicatedFrames, &[1, 2, 3, 4]);
    let corrupted: u64 = reports.iter().map(|r| r.frames_corrupted).sum();
    let duplicated: u64 = reports.iter().map(|r| r.frames_duplicated).sum();
    assert!(corrupted > 0 && duplicated > 0, "{reports:?}");
}

#[test]
fn reordered_frames_are_detected_and_never_misapplied() {
    // Frames overtake the frame sent just before them on the link: each
    // swap is caught by the frame-number check, drops the link and is
    // resynced; the oracle sees no misordered write and the pair converges.
    // (Seed 3 once ended in a false split brain: a resync target interrupted
    // so often that its UUID left the Primary's history; see
    // generation_table.rs.)
    let reports = pass(Scenario::ReorderedFrames, &[1, 2, 3]);
    for r in &reports {
        assert!(r.frames_reordered > 0, "{r:?}");
        assert!(r.order_errors_detected > 0, "{r:?}");
        assert!(r.order_errors_detected <= r.frames_reordered, "{r:?}");
    }
}

#[test]
fn both_promoted_while_partitioned_is_split_brain_never_merged() {
    // Both nodes write while partitioned: the reconnect detects split brain,
    // the link stays down and no data moves until the operator discards one
    // side (the simulator checks both replicas are untouched meanwhile).
    for r in pass(Scenario::SplitBrainBothPromoted, &[1, 2, 3]) {
        assert!(r.split_brains_seen >= 2, "{r:?}");
    }
}

#[test]
fn flush_racing_a_disconnect_still_keeps_flushed_data() {
    // Short partitions land while flushes and barriers are in flight.
    pass(Scenario::FlushRacingDisconnect, &[1, 2, 3]);
}

#[test]
fn metadata_slot_torn_by_a_crash_falls_back_to_the_other_slot() {
    // A crash tears an in-flight superblock write; the node restarts from
    // the other slot and the pair still converges.
    for r in pass(Scenario::TornMetadataSlot, &[1, 2, 3]) {
        assert_eq!(r.crashes, 1, "{r:?}");
        assert_eq!(r.torn_superblock_writes, 1, "{r:?}");
    }
}

#[test]
fn a_secondary_whose_disk_writes_fail_is_not_failed_over_to() {
    // Invariant 6 under disk errors: the Secondary's data writes fail while
    // the Primary acknowledges them, then the Primary crashes. The
    // Secondary, lacking those writes, must refuse an unforced promotion
    // (promoted, the oracle would find them missing); the Primary returns,
    // its disk is whole again, and the resync makes the replicas converge.
    for r in pass(Scenario::SecondaryDiskFails, &[1, 2, 3, 4, 5]) {
        assert_eq!(
            (r.crashes, r.failovers_refused, r.failovers),
            (1, 1, 0),
            "{r:?}"
        );
        assert!(r.disk_write_errors > 0 && r.writes_acked > 100, "{r:?}");
    }
}

#[test]
fn a_secondary_whose_disk_flushes_fail_is_not_failed_over_to() {
    // Invariant 6 under a write-back error: the Secondary's writes succeed
    // but its flushes fail and lose them (what fsync's EIO reports), while
    // the Primary acknowledges every write. The Secondary must turn
    // Inconsistent rather than pass for a full copy: refused at failover,
    // then the resync of every write it did not flush makes the replicas
    // converge.
    for r in pass(Scenario::SecondaryFlushFails, &[1, 2, 3, 4, 5]) {
        assert_eq!(
            (r.crashes, r.failovers_refused, r.failovers),
            (1, 1, 0),
            "{r:?}"
        );
        assert!(r.disk_flush_errors > 0 && r.writes_acked > 100, "{r:?}");
    }
}

#[test]
fn a_sync_target_whose_flushes_fail_resyncs_what_they_lost() {
    // Invariant 4 under a write-back error during a resync: bravo, the
    // SyncTarget after a partition, loses resync data and mirrored writes
    // to failed flushes. It must send exactly those ranges round again
    // (the source cleared its bits when bravo acknowledged the writes, and
    // marks them again only from bravo's OutOfSync); after the resync it
    // crashes, and its disk must hold every acknowledged write it had
    // flushed.
    for r in pass(Scenario::SyncTargetFlushFails, &[1, 2, 3, 4, 5, 6]) {
        assert!(r.disk_flush_errors > 0 && r.crashes == 1, "{r:?}");
    }
}

#[test]
fn a_sync_source_whose_reads_fail_keeps_the_link_and_finishes_later() {
    // alpha, the SyncSource after a partition, cannot read while the link
    // heals: it answers each request with ResyncReadFailed, bravo keeps the
    // ranges and asks again after its wait, no link is dropped for it, and
    // the resync ends identical once the reads work (checked by `pass`).
    for r in pass(Scenario::SyncSourceReadsFail, &[1, 2, 3, 4, 5]) {
        assert!(r.disk_read_errors > 0, "{r:?}");
        assert_eq!(r.links_closed, 0, "{r:?}");
    }
}

#[test]
fn a_node_whose_metadata_writes_fail_stops_and_comes_back() {
    // A failed metadata write stops the node (its daemon exits), whichever
    // role it has: a stopped Secondary leaves the Primary going on alone; a
    // stopped Primary is failed over to its UpToDate peer, which must hold
    // every acknowledged write. Each returns once its disk is sound and
    // the pair converges.
    for r in pass(Scenario::SecondaryMetaFails, &[1, 2, 3, 4, 5]) {
        assert_eq!((r.fatal_stops, r.crashes, r.failovers), (1, 1, 0), "{r:?}");
    }
    for r in pass(Scenario::PrimaryMetaFails, &[1, 2, 3, 4, 5]) {
        assert_eq!((r.fatal_stops, r.crashes, r.failovers), (1, 1, 1), "{r:?}");
    }
}

#[test]
fn fixed_random_seeds_pass() {
    // Random fault mixes (crashes, failovers, partitions, corruption,
    // verify, invalidate, pause, switchover, torn metadata, disk errors).
    pass(Scenario::Random, &(1000..1010).collect::<Vec<u64>>());
}

#[test]
fn random_seed_with_an_in_sync_answer_for_lost_data_passes() {
    // This random run once lost an acknowledged write: a SyncTarget's
    // checksum request read a block, a failed flush then lost the write in
    // it, and the source's "in sync" answer cleared the bit it had just
    // marked again.
    let r = pass(Scenario::Random, &[13097841793478859439]);
    assert!(r[0].disk_flush_errors > 0, "{r:?}");
}

#[test]
fn random_seed_whose_torn_superblock_crash_came_after_its_restart_passes() {
    // This random run once stopped converging: a crash planned at bravo's
    // next superblock write found none before the planned restart, so it
    // struck later, with no restart left, and bravo stayed down.
    let r = pass(Scenario::Random, &[2176767591694900303]);
    assert!(r[0].disk_write_errors > 0, "{r:?}");
}

#[test]
fn engine_acking_before_the_peer_makes_the_simulator_fail() {
    // A broken protocol C (ack on local completion only) must be caught:
    // after a failover the promoted node lacks acknowledged writes.
    let failures = (1..=6)
        .filter(|&seed| {
            let mut cfg = SimConfig::new(seed, Scenario::PrimaryCrashMidWrite);
            cfg.sim_fault = SimFault::AckBeforePeer;
            run(&cfg).is_err()
        })
        .count();
    assert!(
        failures >= 3,
        "only {failures} of 6 seeds caught the early ack"
    );
}

#[test]
fn engine_forgetting_out_of_sync_bits_makes_the_simulator_fail() {
    // Writes done while partitioned without out-of-sync bits are never
    // resynced: the convergence check must find the replicas differ.
    let failures = (1..=4)
        .filter(|&seed| {
            let mut cfg = SimConfig::new(seed, Scenario::PartitionThenHeal);
            cfg.sim_fault = SimFault::ForgetOutOfSync;
            run(&cfg).is_err()
        })
        .count();
    assert_eq!(failures, 4);
}

#[test]
fn ignoring_frame_order_makes_the_simulator_fail_on_a_reorder_seed() {
    // Seed 1 of the reorder scenario swaps two overlapping Writes in flight.
    // With the frame-number check and the engine's Write/Barrier id check on
    // the run passes; with both switched off the Secondary applies the
    // writes in the wrong order and the oracle must find the replicas differ.
    let cfg = SimConfig::new(1, Scenario::ReorderedFrames);
    let ok = run(&cfg).unwrap_or_else(|f| panic!("{f}"));
    assert!(ok.order_errors_detected > 0, "{ok:?}");
    let mut broken = cfg.clone();
    broken.sim_fault = SimFault::IgnoreFrameOrder;
    let failure = run(&broken).expect_err("misordered writes went unnoticed");
    assert!(
        failure.message.contains("replicas differ"),
        "{}",
        failure.message
    );
}

#[test]
fn same_seed_replays_the_same_run() {
    // One u64 seed reproduces a run exactly.
    let a = run(&SimConfig::new(77, Scenario::Random)).expect("seed 77");
    let b = run(&SimConfig::new(77, Scenario::Random)).expect("seed 77");
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
fn primary_crash_then_promoted_secondary_crash_still_converges() {
    // Regression (found by the random simulator): the Primary crashes, the
    // Secondary is promoted and crashes at once, losing mirrored writes from
    // its volatile cache while the only record of them (the old Primary's
    // transfer log) is gone. The Secondary's own AL marks those extents, so
    // the replicas converge.
    let r = run(&SimConfig::new(4151800119742464954, Scenario::Random))
        .unwrap_or_else(|f| panic!("{f}"));
    assert_eq!((r.crashes, r.failovers), (2, 1), "{r:?}");
}
