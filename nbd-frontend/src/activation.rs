//! systemd-style socket activation: takes the listening sockets passed as
//! fds 3.. with `LISTEN_PID`/`LISTEN_FDS`, as `nbdinfo [ CMD ]` and systemd
//! do. Owns only the hand-over of those fds (through the `listenfd` crate,
//! so no `unsafe` here); it must not bind or serve anything.

use crate::server::Listener;

/// Why the passed sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={value:?} is not a count of file descriptors")]
    BadFdCount { value: String },
    #[error("socket activation fd {fd} is neither a TCP nor a Unix stream socket: {source}")]
    NotAListener {
        fd: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("socket activation fd {fd} cannot be registered with tokio: {source}")]
    Register {
        fd: usize,
        #[source]
        source: std::io::Error,
    },
}

/// First fd of socket activation.
pub const SD_LISTEN_FDS_START: usize = 3;

/// Takes the listeners passed by socket activation, in fd order. Returns an
/// empty list when this process was not socket-activated (no `LISTEN_FDS`,
/// or `LISTEN_PID` names another process). Always clears `LISTEN_PID`,
/// `LISTEN_FDS` and `LISTEN_FDNAMES` so children do not inherit them. Must
/// run inside a tokio runtime.
pub fn listeners_from_env() -> Result<Vec<Listener>, ActivationError> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok();
    if let (true, Some(value)) = (ours, &count) {
        if value.trim().parse::<u16>().is_err() {
            for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                std::env::remove_var(var);
            }
            return Err(ActivationError::BadFdCount {
                value: value.clone(),
            });
        }
    }
    let activated = ours && count.is_some();
    let mut fds = if activated {
        listenfd::ListenFd::from_env()
    } else {
        listenfd::ListenFd::empty()
    };
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for idx in 0..fds.len() {
        let fd = SD_LISTEN_FDS_START + idx;
        let register = |source| ActivationError::Register { fd, source };
        if let Ok(Some(l)) = fds.take_unix_listener(idx) {
            l.set_nonblocking(true).map_err(register)?;
            let l = tokio::net::UnixListener::from_std(l).map_err(register)?;
            listeners.push(Listener::Unix(l));
            continue;
        }
        match fds.take_tcp_listener(idx) {
            Ok(Some(l)) => {
                l.set_nonblocking(true).map_err(register)?;
                let l = tokio::net::TcpListener::from_std(l).map_err(register)?;
                listeners.push(Listener::Tcp(l));
            }
            Ok(None) => {}
            Err(source) => return Err(ActivationError::NotAListener { fd, source }),
        }
    }
    Ok(listeners)
}
