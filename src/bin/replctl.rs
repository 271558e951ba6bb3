//! `replctl`: the operator's tool. The logic lives in
//! `replicator_daemon::replctl_program`.
#![forbid(unsafe_code)]
fn main() -> std::process::ExitCode {
    replicator_daemon::replctl_program::main()
}
