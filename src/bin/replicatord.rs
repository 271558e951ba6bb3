//! `replicatord --config F --node N`: runs one node of one resource.
//! The logic lives in `replicator_daemon::replicatord`.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    replicator_daemon::replicatord::main()
}
