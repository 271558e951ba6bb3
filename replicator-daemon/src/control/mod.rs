//! The control plane: how `replctl` talks to a running `replicatord`.
//!
//! - [`protocol`]: the JSON-line request/response/status/event types (pure).
//! - [`server`]: the Unix socket server that hands requests to the daemon's
//!   [`server::ControlHandler`] and streams events.
//! - [`client`]: the client side used by `replctl`.
//! - [`engine_map`]: engine status/commands/refusals to protocol values.
//!
//! Must not carry out commands itself: the daemon's handler does.
#![forbid(unsafe_code)]

pub mod client;
pub mod engine_map;
pub mod protocol;
pub mod server;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
