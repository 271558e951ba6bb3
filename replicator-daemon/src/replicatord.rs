//! The `replicatord` program: command line, logging, and running one node of
//! one resource until SIGTERM/SIGINT.
//!
//! Owns the order of start-up (config first, so a bad config never touches
//! the disk; then the listeners; then the disk), the choice between serving
//! unreplicated and the replicated path, and the clean stop (stop accepting,
//! let in-flight requests finish, fdatasync the disk, exit 0). It must not
//! implement NBD (nbd-frontend does) or disk I/O (the `disk` module does);
//! `src/bin/replicatord.rs` only calls [`main`].
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use nbd_frontend::activation::{listeners_from_env, ActivationError};
use nbd_frontend::{ExportConfig, Listener};
use tracing::{info, warn};

use crate::busy_poll::BusyPoll;
use crate::config::{self, Config, ConfigError, NbdAddress, NodeConfig};
use crate::disk::{open_engine, DiskEngine, DiskError, EngineOptions};
use crate::target::LocalTarget;

/// `replicatord --config F --node N [--log-format text|json]`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "replicatord",
    version,
    about = "Run one node of a replicated resource, serving its volume over NBD"
)]
pub struct Args {
    /// The resource's config file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Which node of the config this process is.
    #[arg(long, value_name = "NAME")]
    pub node: String,
    /// Log line format on stderr (the level comes from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Why the node could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Replicated(#[from] crate::node::RunError),
    #[error("cannot listen for NBD on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("the NBD server failed: {0}")]
    Serve(#[source] io::Error),
    #[error("the final flush of the disk failed, recent writes may not be durable: {0}")]
    FinalFlush(#[source] DiskError),
}

/// The program: parses arguments, sets up logging, runs the node until a
/// signal, and turns the outcome into the exit status.
pub fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    // One thread runs the NBD connections, the event loop, the peer link
    // and submits and reaps the io_uring disk I/O. Handing each request
    // between tokio workers cost more than it gained: 4 KiB depth-1 writes
    // took 172 µs with the multi-thread runtime and 106-120 µs with this one
    // (qemu-nbd 140 µs), with depth-32 IOPS unchanged. Before it sleeps, the
    // thread polls for a while (busy_poll: waking a halted CPU is slow).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(|| BusyPoll::global().before_park())
        .on_thread_unpark(|| BusyPoll::global().after_unpark())
        .thread_name("replicatord")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("replicatord: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    BusyPoll::global().attach_to_runtime();
    let outcome = runtime.block_on(async {
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                return Err(NodeError::Serve(io::Error::new(
                    e.kind(),
                    format!("cannot install signal handlers: {e}"),
                )))
            }
        };
        run_node(&args.config, &args.node, shutdown).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One sentence, also when logs are JSON: this is the exit reason.
            eprintln!("replicatord: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; RUST_LOG selects levels (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(io::stderr);
    // A second initialisation (tests) is harmless: the first one stays.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Resolves when SIGTERM or SIGINT arrives. The handlers are installed
/// before this returns, so a signal sent right after start-up is not lost.
pub fn shutdown_signal() -> io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            signal = name,
            "stopping: no new connections, finishing in-flight I/O"
        );
    })
}

/// Runs node `node` of the resource in `config_path` until `shutdown`
/// resolves. The config is fully validated before anything else is opened.
pub async fn run_node(
    config_path: &Path,
    node: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let config = config::load(config_path)?;
    let node_config = config.node(node)?.clone();
    BusyPoll::global().set_max(std::time::Duration::from_micros(
        node_config.options.busy_poll_us,
    ));
    if config.peer_of(node).is_some() {
        return crate::node::run_replicated(&config, node, shutdown)
            .await
            .map_err(NodeError::Replicated);
    }
    serve_unreplicated(&config, &node_config, shutdown).await
}

/// Serves the node's whole backing disk over NBD, like qemu-nbd.
async fn serve_unreplicated(
    config: &Config,
    node: &NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let (listeners, unix_path) = listen(&node.nbd).await?;
    let opts = &node.options;
    let engine = open_engine(
        &node.disk,
        EngineOptions {
            io_engine: opts.io_engine,
            direct: opts.direct,
            read_only: opts.read_only,
        },
    )?;
    info!(
        resource = %config.resource,
        node = %node.name,
        disk = %node.disk.display(),
        size_bytes = engine.size_bytes(),
        io_engine = engine.io_name(),
        direct = opts.direct,
        read_only = opts.read_only,
        "serving the disk unreplicated over NBD"
    );
    let target = Arc::new(LocalTarget::new(engine, opts.read_only));
    let export = ExportConfig {
        name: config.resource.clone(),
        description: format!(
            "replicator resource {} (node {})",
            config.resource, node.name
        ),
    };
    let served = nbd_frontend::serve(listeners, export, target.clone(), shutdown).await;
    if let Some(path) = unix_path {
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(path = %path.display(), error = %e, "cannot remove the NBD socket");
        }
    }
    // Whatever happened to the server, make completed writes durable.
    let flushed = target.disk().flush().await;
    served.map_err(NodeError::Serve)?;
    flushed.map_err(NodeError::FinalFlush)?;
    info!("disk flushed; stopped cleanly");
    Ok(())
}

/// The listeners passed by socket activation if any, else a new one on the
/// configured address. Also returns a Unix socket path to remove at exit.
async fn listen(addr: &NbdAddress) -> Result<(Vec<Listener>, Option<PathBuf>), NodeError> {
    let activated = listeners_from_env()?;
    if !activated.is_empty() {
        info!(
            count = activated.len(),
            "using listeners from socket activation"
        );
        return Ok((activated, None));
    }
    let listen_err = |source| NodeError::Listen {
        addr: addr.to_string(),
        source,
    };
    match addr {
        NbdAddress::Tcp(hp) => {
            let l = tokio::net::TcpListener::bind((hp.host.as_str(), hp.port))
                .await
                .map_err(listen_err)?;
            let local = l.local_addr().map_err(listen_err)?;
            info!(addr = %local, "listening for NBD on TCP");
            Ok((vec![Listener::Tcp(l)], None))
        }
        NbdAddress::Unix(path) => {
            crate::node::nbd::remove_stale_socket(path).map_err(listen_err)?;
            let l = tokio::net::UnixListener::bind(path).map_err(listen_err)?;
            info!(path = %path.display(), "listening for NBD on a Unix socket");
            Ok((vec![Listener::Unix(l)], Some(path.clone())))
        }
    }
}

#[cfg(test)]
mod tests;
