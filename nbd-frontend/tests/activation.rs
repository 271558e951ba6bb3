//! Socket activation env handling that needs no passed fd: variables meant
//! for another process are ignored and cleared, a malformed count is an
//! error. (The fd hand-over itself is tested by nbdinfo in real_clients.rs.)
//! One test only: it mutates this process's environment.

use nbd_frontend::activation::{listeners_from_env, ActivationError};

#[tokio::test]
async fn activation_env_for_another_pid_is_ignored_and_a_bad_count_is_an_error() {
    // Proves LISTEN_* for another PID yields no listener and is cleared, and a
    // non-numeric LISTEN_FDS for us is a clear error (and is cleared too).
    std::env::set_var("LISTEN_PID", "1");
    std::env::set_var("LISTEN_FDS", "1");
    std::env::set_var("LISTEN_FDNAMES", "nbd");
    assert!(listeners_from_env().unwrap().is_empty());
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert!(std::env::var_os(var).is_none(), "{var} not cleared");
    }

    std::env::set_var("LISTEN_PID", std::process::id().to_string());
    std::env::set_var("LISTEN_FDS", "many");
    match listeners_from_env() {
        Err(ActivationError::BadFdCount { value }) => assert_eq!(value, "many"),
        Err(other) => panic!("wrong error: {other}"),
        Ok(l) => panic!("accepted a bad count: {} listeners", l.len()),
    }
    assert!(std::env::var_os("LISTEN_FDS").is_none());

    // Not activated at all: nothing to take.
    assert!(listeners_from_env().unwrap().is_empty());
}
