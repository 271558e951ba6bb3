//! Fuzz target: the metadata decoders (superblock slots, activity-log ring,
//! bitmap pages and run-length chunks); the first byte picks the decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    replicator_core::fuzzing::metadata(data);
});
