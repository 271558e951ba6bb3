//! Fuzz target: the peer wire codec (frame decoding, field validation, the
//! frame-number check) over arbitrary bytes, and the re-encode round trip of
//! every frame that decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replicator_core::fuzzing::peer_frame(data);
});
