//! The `replicator` package: the `replicatord` and `replctl` programs, the
//! real-process integration tests (`tests/`) and the benchmarks (`benches/`).
//! The logic lives in the member crates; this library holds only what the
//! tests and benchmarks share:
//! - [`fault_proxy`]: a TCP proxy that cuts, stalls, delays and corrupts the
//!   link between two nodes on command.
#![forbid(unsafe_code)]

pub mod fault_proxy;
