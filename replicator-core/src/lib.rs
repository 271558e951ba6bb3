//! replicator-core: the replication engine, sans-IO.
//!
//! No sockets, no files, no clock, no threads: time and randomness come in as
//! arguments, effects come out as values.
#![forbid(unsafe_code)]

pub mod generation;
