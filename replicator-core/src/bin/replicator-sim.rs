//! The deterministic simulator's command line.
//!
//! `replicator-sim --seconds N` runs random seeds (from the clock) for N
//! seconds of wall time and exits non-zero on the first failure, printing the
//! seed; `replicator-sim --seed S [--scenario NAME] [--verbose]` replays one
//! run (with a trace on --verbose). `--sim-fault NAME` breaks the engine on
//! purpose (self-test of the oracle: such runs are expected to fail).
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replicator_core::engine::SimFault;
use replicator_core::sim::{run, Scenario, SimConfig};

fn sim_fault(name: &str) -> Option<SimFault> {
    Some(match name {
        "ack-before-peer" => SimFault::AckBeforePeer,
        "forget-out-of-sync" => SimFault::ForgetOutOfSync,
        "ignore-frame-order" => SimFault::IgnoreFrameOrder,
        _ => return None,
    })
}

const USAGE: &str = "usage: replicator-sim (--seconds N | --seed S) [--scenario NAME] [--sim-fault NAME] [--verbose]
sim faults: ack-before-peer, forget-out-of-sync, ignore-frame-order
scenarios: random (default), primary-crash, secondary-crash, partition, partition-resync,
           corrupt-dup, reorder, split-brain, flush-disconnect, torn-metadata,
           secondary-disk-fails, secondary-flush-fails, sync-target-flush-fails,
           sync-source-reads-fail, secondary-meta-fails, primary-meta-fails";

fn scenario(name: &str) -> Option<Scenario> {
    Some(match name {
        "random" => Scenario::Random,
        "primary-crash" => Scenario::PrimaryCrashMidWrite,
        "secondary-crash" => Scenario::SecondaryCrash,
        "partition" => Scenario::PartitionThenHeal,
        "partition-resync" => Scenario::PartitionDuringResync,
        "corrupt-dup" => Scenario::CorruptAndDuplicatedFrames,
        "reorder" => Scenario::ReorderedFrames,
        "split-brain" => Scenario::SplitBrainBothPromoted,
        "flush-disconnect" => Scenario::FlushRacingDisconnect,
        "torn-metadata" => Scenario::TornMetadataSlot,
        "secondary-disk-fails" => Scenario::SecondaryDiskFails,
        "secondary-flush-fails" => Scenario::SecondaryFlushFails,
        "sync-target-flush-fails" => Scenario::SyncTargetFlushFails,
        "sync-source-reads-fail" => Scenario::SyncSourceReadsFail,
        "secondary-meta-fails" => Scenario::SecondaryMetaFails,
        "primary-meta-fails" => Scenario::PrimaryMetaFails,
        _ => return None,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seconds: Option<u64> = None;
    let mut seed: Option<u64> = None;
    let mut sc = Scenario::Random;
    let mut verbose = false;
    let mut fault = SimFault::None;
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1);
        match (args[i].as_str(), value) {
            ("--seconds", Some(v)) => match v.parse() {
                Ok(n) => seconds = Some(n),
                Err(_) => return usage(&format!("--seconds needs a number, got {v:?}")),
            },
            ("--seed", Some(v)) => match v.parse() {
                Ok(n) => seed = Some(n),
                Err(_) => return usage(&format!("--seed needs a number, got {v:?}")),
            },
            ("--scenario", Some(v)) => match scenario(v) {
                Some(s) => sc = s,
                None => return usage(&format!("unknown scenario {v:?}")),
            },
            ("--sim-fault", Some(v)) => match sim_fault(v) {
                Some(f) => fault = f,
                None => return usage(&format!("unknown sim fault {v:?}")),
            },
            ("--verbose", _) => {
                verbose = true;
                i += 1;
                continue;
            }
            (other, _) => return usage(&format!("unexpected argument {other:?}")),
        }
        i += 2;
    }
    match (seed, seconds) {
        (Some(seed), None) => {
            let mut cfg = SimConfig::new(seed, sc);
            cfg.verbose = verbose;
            cfg.sim_fault = fault;
            match run(&cfg) {
                Ok(r) => {
                    println!("seed {seed}: ok {r:?}");
                    ExitCode::SUCCESS
                }
                Err(f) => {
                    eprintln!("{f}");
                    ExitCode::FAILURE
                }
            }
        }
        (None, Some(secs)) => {
            let start = Instant::now();
            let mut seed = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let mut runs = 0u64;
            while start.elapsed() < Duration::from_secs(secs) {
                let mut cfg = SimConfig::new(seed, sc);
                cfg.verbose = verbose;
                cfg.sim_fault = fault;
                if let Err(f) = run(&cfg) {
                    eprintln!("{f}");
                    eprintln!("replay with: replicator-sim --seed {seed}");
                    return ExitCode::FAILURE;
                }
                runs += 1;
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
            }
            println!("{runs} seeds passed in {secs} s");
            ExitCode::SUCCESS
        }
        _ => usage("give exactly one of --seconds and --seed"),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("replicator-sim: {msg}\n{USAGE}");
    ExitCode::from(2)
}
