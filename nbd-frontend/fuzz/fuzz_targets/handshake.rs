//! Fuzz target: a whole NBD session (client flags, options, then requests)
//! through the negotiation state machine and the transmission path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_frontend::fuzzing::handshake(data);
});
