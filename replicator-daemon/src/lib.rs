//! replicator-daemon: the only crate that does I/O.
//!
//! Module map:
//! - [`config`]: the resource TOML file, parsed and validated.
//! - [`control`]: the control socket protocol, server and client.
//! - [`replctl`]: the operator tool's logic (the `replctl` binary is a thin main).
//! - [`disk`]: the backing disk: the [`disk::DiskEngine`] trait and its
//!   io_uring and sync engines (`unsafe` code is only in `disk::uring` and
//!   `busy_poll`).
//! - [`target`]: the NBD target over a local disk (unreplicated serving).
//! - [`replicatord`]: the `replicatord` program (the binary is a thin main).
//! - [`node`]: the replicated node runtime: metadata attach, the event loop
//!   driving the replication engine, the replicated NBD target, control.
//! - [`transport`]: the peer link over TCP (dial/accept, tie-break, lanes).
//! - [`busy_poll`]: polling for events briefly before the runtime thread sleeps.
//! - [`demo`]: `replctl demo`, the two-node quick start (both nodes in-process).
//! - [`replctl_program`]: the `replctl` program's command line (control commands + demo).
#![deny(unsafe_code)]

pub mod busy_poll;
pub mod config;
pub mod control;
pub mod demo;
pub mod disk;
pub mod node;
pub mod replctl;
pub mod replctl_program;
pub mod replicatord;
pub mod target;
pub mod transport;
