//! NBD front end: the protocol codec and a tokio server over a [`BlockTarget`].
//!
//! Module map:
//! - [`proto`]: wire constants and the limits this server enforces.
//! - [`handshake`]: pure codec of the fixed-newstyle handshake messages.
//! - [`negotiate`]: the option-negotiation state machine (pure).
//! - [`transmission`]: pure codec of requests, simple replies and chunks.
//! - [`command`]: request validation, errno mapping, reply framing.
//! - [`server`]: the tokio server (listeners, connections, shutdown).
//! - [`activation`]: systemd socket activation (`LISTEN_FDS`).
//! - [`mem`]: a sparse in-memory [`BlockTarget`] for tests.
//! - [`fuzzing`]: entry points the fuzz targets and property tests drive.
//! - [`target`]: the [`BlockTarget`] trait the daemon implements.
#![forbid(unsafe_code)]

pub mod activation;
pub mod command;
pub mod fuzzing;
pub mod handshake;
pub mod mem;
pub mod negotiate;
pub mod proto;
pub mod server;
pub mod target;
pub mod transmission;
pub mod vectored;

pub use server::{serve, ExportConfig, Listener};
pub use target::{BlockTarget, Extent, PayloadBuf, ReadPiece, TargetError, TargetFlags};
