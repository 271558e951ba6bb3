//! replicator-core: the replication engine, sans-IO.
//!
//! No sockets, no files, no clock, no threads: time and randomness come in as
//! arguments, effects come out as values.
//!
//! Module map:
//! - [`types`]: shared newtypes (block, extent, request ids), roles, disk
//!   states, protocol modes, generation UUIDs.
//! - [`wire`]: the peer wire protocol (messages, framing, codec).
//! - [`auth`]: HMAC-SHA256 challenge/response on the shared secret.
//! - [`bitmap`]: the out-of-sync bitmap, its scans, pages and run-length code.
//! - [`activity_log`]: the hot-extent LRU and its on-disk transaction ring.
//! - [`metadata`]: superblock slots, metadata layout, `create-md` blocks.
//! - [`generation`]: the generation-UUID handshake decision and split-brain
//!   policies.
//! - [`engine`]: the replication state machine (`handle` / `poll_output` /
//!   `next_deadline`).
//! - [`sim`]: the deterministic two-node simulator and its write-log oracle.
//! - [`fuzzing`]: entry points the fuzz targets (`replicator-core/fuzz`) and
//!   property tests drive over arbitrary bytes (peer codec, metadata).
#![forbid(unsafe_code)]

pub mod activity_log;
pub mod auth;
pub mod bitmap;
pub mod metadata;
pub mod types;
pub mod wire;

pub mod engine;
pub mod fuzzing;
pub mod generation;
pub mod sim;
