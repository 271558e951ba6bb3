//! The cargo-fuzz crate in replicator-core/fuzz must keep compiling against
//! this crate's `fuzzing` API (the entry points themselves are exercised on
//! every run by the property tests in src/fuzzing.rs).

use std::process::Command;
use std::time::{Duration, Instant};

/// Upper bound for a cold `cargo check` of the fuzz crate (libFuzzer's C++ included).
const FUZZ_CHECK_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn fuzz_targets_type_check_against_the_crate_api() {
    // Proves both fuzz targets still compile: breaks if a `fuzzing::` fn they call changes.
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["check", "--quiet", "--bins", "--manifest-path", manifest])
        // The fuzz crate is its own workspace with its own target dir; keep it
        // off the main workspace's lock.
        .env_remove("CARGO_TARGET_DIR")
        .spawn()
        .expect("run cargo");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for cargo") {
            break status;
        }
        if start.elapsed() > FUZZ_CHECK_TIMEOUT {
            let _ = child.kill();
            panic!("cargo check of the fuzz crate took over {FUZZ_CHECK_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "fuzz crate does not compile: {status}");
}
