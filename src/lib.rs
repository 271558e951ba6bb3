//! The `replicator` package: the `replicatord` and `replctl` programs, the
//! real-process integration tests (`tests/`) and the benchmarks (`benches/`).
//! The logic lives in the member crates.
#![forbid(unsafe_code)]
