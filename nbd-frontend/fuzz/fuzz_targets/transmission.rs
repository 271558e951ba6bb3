//! Fuzz target: the transmission phase (request decoding, validation,
//! execution against an in-memory target, reply framing).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd_frontend::fuzzing::transmission(data);
});
