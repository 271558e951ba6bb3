//! NBD front end: the protocol codec and a tokio server over a [`BlockTarget`].
//!
//! Module map:
//! - [`target`]: the [`BlockTarget`] trait the daemon implements.
#![forbid(unsafe_code)]

pub mod target;

pub use target::{BlockTarget, Extent, TargetError, TargetFlags};
