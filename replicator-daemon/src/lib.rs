//! replicator-daemon: the only crate that does I/O.
