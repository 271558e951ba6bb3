//! The NBD export of a replicated node, served only while it is Primary:
//! started on promotion, stopped on demotion and shutdown.
//!
//! Owns binding the configured address (or reusing socket-activation
//! listeners), the accept loop, the count of connected clients (demotion is
//! refused while there are any, unless forced) and closing them: a stop lets
//! in-flight requests finish, then closes every connection, then reports
//! [`NbdStopped`] to the node's loop. Must not implement NBD (nbd-frontend
//! does) nor decide roles (the loop does).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use nbd_frontend::server::serve_connection;
use nbd_frontend::{ExportConfig, Listener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use super::target::ReplicatedTarget;
use crate::config::NbdAddress;

/// Sent to the loop when a stopped server has closed every connection.
#[derive(Debug)]
pub struct NbdStopped;

/// Binds the configured NBD address now (synchronously, so the loop can
/// refuse a promotion whose address is taken). Returns the listener and, for
/// a Unix socket, the path to remove when it stops.
pub fn bind(addr: &NbdAddress) -> io::Result<(Listener, Option<PathBuf>)> {
    match addr {
        NbdAddress::Tcp(hp) => {
            let l = std::net::TcpListener::bind((hp.host.as_str(), hp.port))?;
            l.set_nonblocking(true)?;
            Ok((Listener::Tcp(tokio::net::TcpListener::from_std(l)?), None))
        }
        NbdAddress::Unix(path) => {
            remove_stale_socket(path)?;
            let l = std::os::unix::net::UnixListener::bind(path)?;
            l.set_nonblocking(true)?;
            Ok((
                Listener::Unix(tokio::net::UnixListener::from_std(l)?),
                Some(path.clone()),
            ))
        }
    }
}

/// Removes a socket file left by a process that is gone; refuses to touch a
/// live socket or anything that is not a socket.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        ));
    }
    std::fs::remove_file(path)
}

/// A running export.
#[derive(Debug)]
pub struct NbdServer {
    stop: watch::Sender<bool>,
    clients: Arc<AtomicU32>,
    /// What the export listens on (for status).
    pub address: String,
}

impl NbdServer {
    /// Serves `target` on `listeners` until [`NbdServer::stop`].
    pub fn start(
        listeners: Vec<Arc<Listener>>,
        cleanup: Option<PathBuf>,
        address: String,
        export: ExportConfig,
        target: Arc<ReplicatedTarget>,
        stopped: mpsc::Sender<NbdStopped>,
    ) -> NbdServer {
        let (stop, stop_rx) = watch::channel(false);
        let clients = Arc::new(AtomicU32::new(0));
        let export = Arc::new(export);
        let count = clients.clone();
        info!(%address, "serving the volume over NBD (primary)");
        tokio::spawn(async move {
            let mut accepts = JoinSet::new();
            for l in listeners {
                let (stop_rx, export, target, count) = (
                    stop_rx.clone(),
                    export.clone(),
                    target.clone(),
                    count.clone(),
                );
                accepts.spawn(accept_loop(l, stop_rx, export, target, count));
            }
            let mut sets = Vec::new();
            while let Some(r) = accepts.join_next().await {
                if let Ok(set) = r {
                    sets.push(set);
                }
            }
            for mut set in sets {
                while set.join_next().await.is_some() {}
            }
            if let Some(path) = cleanup {
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), "cannot remove the NBD socket: {e}");
                }
            }
            info!("NBD export stopped");
            let _ = stopped.send(NbdStopped).await;
        });
        NbdServer {
            stop,
            clients,
            address,
        }
    }

    /// Clients connected now.
    pub fn clients(&self) -> u32 {
        self.clients.load(Ordering::SeqCst)
    }

    /// Stop accepting, finish in-flight requests, close every connection;
    /// [`NbdStopped`] follows.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(
    listener: Arc<Listener>,
    mut stop: watch::Receiver<bool>,
    export: Arc<ExportConfig>,
    target: Arc<ReplicatedTarget>,
    count: Arc<AtomicU32>,
) -> JoinSet<()> {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return conns,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (export, target, shutdown, count) =
                    (export.clone(), target.clone(), stop.clone(), count.clone());
                count.fetch_add(1, Ordering::SeqCst);
                let span = tracing::info_span!("nbd_conn", peer = %peer);
                conns.spawn(
                    async move {
                        info!("client connected");
                        let r = match stream {
                            Accepted::Tcp(s) => {
                                let _ = s.set_nodelay(true);
                                serve_connection(s, &export, target, shutdown).await
                            }
                            Accepted::Unix(s) => {
                                serve_connection(s, &export, target, shutdown).await
                            }
                        };
                        match r {
                            Ok(reason) => info!("client disconnected: {reason}"),
                            Err(e) => info!("connection closed: {e}"),
                        }
                        count.fetch_sub(1, Ordering::SeqCst);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!("NBD accept failed: {e}");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return conns,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(
                        nbd_frontend::server::ACCEPT_ERROR_BACKOFF_MS,
                    )) => {}
                }
            }
        }
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> io::Result<(Accepted, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok((Accepted::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Accepted::Unix(s), "unix".to_string()))
        }
    }
}
