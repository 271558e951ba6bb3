//! The replicated node runtime: one event loop per resource that drives
//! `replicator_core::engine::Engine` with real I/O.
//!
//! Owns the loop (wait for one event — an NBD request, a disk completion, a
//! peer frame or link change, a control request, the engine's deadline, the
//! stop signal — then apply it synchronously and execute the engine's
//! outputs), the role-dependent NBD export, the control handler, and the
//! clean stop (stop NBD, finish in-flight I/O, leave the peer, persist the
//! bitmap and a clean superblock, fdatasync). Must not decide anything about
//! replication (the engine does), speak NBD (nbd-frontend does) or frame
//! peer messages (the transport does).
//!
//! Submodules: [`mod@attach`] (metadata on disk → `LoadedMetadata`), [`target`]
//! (the replicated `BlockTarget`), [`nbd`] (the export's life while primary).
#![forbid(unsafe_code)]

pub mod attach;
pub mod nbd;
pub mod rate;
pub mod target;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nbd_frontend::activation::listeners_from_env;
use nbd_frontend::{ExportConfig, Listener};
use replicator_core::engine::{
    AdminCommand, AdminError, ClientError, ClientId, ConnState, DiskError as CoreDiskError, DiskOp,
    Engine, EngineConfig, Event, Input, OpId, Output, ReplState, Time,
};
use replicator_core::generation::SplitBrainPolicy as CoreSplitBrain;
use replicator_core::types::{NodeRole, ProtocolMode};
use replicator_core::wire::Message;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::{Config, NodeConfig, Protocol, SplitBrainPolicy};
use crate::control::engine_map::{admin_command, admin_response, status_report, StatusContext};
use crate::control::protocol::{
    change_events, Event as ControlEvent, Request, Response, StatusReport, Timestamp,
};
use crate::control::server::{self as control_server, ControlError, ControlHandler};
use crate::disk::{AnyEngine, DiskEngine, DiskError};
use crate::transport::{self, lanes::APP_LANE_HIGH_WATER_BYTES, Link, LinkEvent, TransportConfig};

pub use attach::{attach, AttachError, Attached};
pub use target::{ClientCall, ReplicatedTarget};

/// Disk completions, control requests and NBD notices waiting for the loop.
pub const INTERNAL_QUEUE_EVENTS: usize = 1024;
/// Peer frames and link changes waiting for the loop (the reader waits
/// when it is full, which slows the peer down through TCP).
pub const LINK_QUEUE_EVENTS: usize = 256;
/// NBD requests waiting for the loop.
pub const CLIENT_QUEUE_REQUESTS: usize = 256;
/// How long a clean stop may take before it gives up, in milliseconds.
pub const SHUTDOWN_DRAIN_MS: u64 = 15_000;
/// Progress-only status changes (resync progress, out-of-sync bytes) are
/// published as events at most this often, in milliseconds.
pub const PROGRESS_EVENT_INTERVAL_MS: u64 = 1_000;
/// Most already-waiting events applied after one wake-up before the loop
/// waits again (timers and the stop signal are checked between batches).
pub const LOOP_BATCH_EVENTS: usize = 64;
/// Longest a writer task gets to send the last frames at exit, in milliseconds.
pub const LINK_CLOSE_GRACE_MS: u64 = 1_000;

/// Why a replicated node could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("the replication engine refuses the metadata of {}: {detail}", path.display())]
    Engine { path: PathBuf, detail: String },
    #[error("node {node} has no peer with a replication address in this config")]
    NoReplicationAddress { node: String },
    #[error("cannot listen for the peer on {addr}: {source}")]
    ListenPeer {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Activation(#[from] nbd_frontend::activation::ActivationError),
    #[error("cannot draw a random seed: {0}")]
    Seed(String),
    #[error("stopping took longer than {SHUTDOWN_DRAIN_MS} ms; the metadata may not be persisted")]
    ShutdownTimeout,
    #[error("the final flush of the disk failed, recent writes may not be durable: {0}")]
    FinalFlush(#[source] DiskError),
    #[error("stopped: {0}")]
    MetadataWrite(String),
    #[error("the node's event loop ended unexpectedly")]
    LoopGone,
}

/// Requests from the control socket, disk completions, NBD notices.
#[derive(Debug)]
enum Internal {
    DiskDone {
        op: OpId,
        result: Result<Bytes, CoreDiskError>,
        /// What failed, for `status`.
        error: Option<String>,
    },
    Control {
        request: Request,
        reply: oneshot::Sender<Response>,
    },
}

/// A running node: its replicated target (for in-process clients and
/// tests), its control entry point and its task.
#[derive(Debug)]
pub struct NodeHandle {
    /// The replicated volume (works only while Primary).
    pub target: Arc<ReplicatedTarget>,
    control: mpsc::Sender<Internal>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl NodeHandle {
    /// Carry out one control request, as `replctl` would.
    pub async fn request(&self, request: Request) -> Response {
        let (reply, rx) = oneshot::channel();
        if self
            .control
            .send(Internal::Control { request, reply })
            .await
            .is_err()
        {
            return Response::error("The daemon is stopping.");
        }
        rx.await
            .unwrap_or_else(|_| Response::error("The daemon is stopping."))
    }

    /// The status report, as `replctl status --json` shows it.
    pub async fn status(&self) -> Option<StatusReport> {
        match self.request(Request::Status).await {
            Response::Status(s) => Some(*s),
            _ => None,
        }
    }

    /// Whether the node's loop has ended (stopped or failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Starts a clean stop (what SIGTERM does).
    pub fn stop(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits for the node to stop.
    pub async fn wait(self) -> Result<(), RunError> {
        self.task.await.map_err(|_| RunError::LoopGone)?
    }
}

struct Handler {
    control: mpsc::Sender<Internal>,
}

impl ControlHandler for Handler {
    fn handle(
        &self,
        request: Request,
    ) -> std::pin::Pin<Box<dyn Future<Output = Response> + Send + '_>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            if self
                .control
                .send(Internal::Control { request, reply })
                .await
                .is_err()
            {
                return Response::error("The daemon is stopping.");
            }
            rx.await
                .unwrap_or_else(|_| Response::error("The daemon is stopping."))
        })
    }
}

/// Runs node `node` of the two-node resource `config` until `shutdown`
/// resolves, then stops cleanly.
pub async fn run_replicated(
    config: &Config,
    node: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let mut handle = start(config, node).await?;
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => handle.stop(),
        r = &mut handle.task => return r.map_err(|_| RunError::LoopGone)?,
    }
    handle.wait().await
}

fn engine_config(
    config: &Config,
    node: &NodeConfig,
    peer: &NodeConfig,
    a: &Attached,
) -> EngineConfig {
    EngineConfig {
        resource: config.resource.clone(),
        node: node.name.clone(),
        peer: peer.name.clone(),
        size_bytes: a.layout.data_size_bytes,
        bitmap_block_bytes: a.layout.bitmap_block_bytes,
        protocol: match config.protocol {
            Protocol::A => ProtocolMode::A,
            Protocol::B => ProtocolMode::B,
            Protocol::C => ProtocolMode::C,
        },
        secret: config.secret.clone().unwrap_or_default().into_bytes(),
        split_brain: match node.options.split_brain {
            SplitBrainPolicy::Disconnect => CoreSplitBrain::Disconnect,
            SplitBrainPolicy::DiscardZeroChanges => CoreSplitBrain::DiscardZeroChanges,
            SplitBrainPolicy::DiscardYoungerPrimary => CoreSplitBrain::DiscardYoungerPrimary,
            SplitBrainPolicy::DiscardLeastChanges => CoreSplitBrain::DiscardLeastChanges,
        },
        al_extents: node.options.al_extents,
        meta_layout: a.layout,
        resync_rate_bytes_per_s: node.options.resync_rate_bytes_per_s,
        sim_fault: Default::default(),
    }
}

/// Attaches the disk, starts the engine, the transport and the control
/// socket, and spawns the loop. Errors here mean the node did not start.
pub async fn start(config: &Config, node_name: &str) -> Result<NodeHandle, RunError> {
    let node = config.node(node_name)?.clone();
    let peer = config
        .peer_of(node_name)
        .ok_or_else(|| RunError::NoReplicationAddress {
            node: node_name.to_string(),
        })?
        .clone();
    let (Some(my_addr), Some(peer_addr)) = (node.replication.clone(), peer.replication.clone())
    else {
        return Err(RunError::NoReplicationAddress { node: node.name });
    };
    let attached = attach(config, &node).await?;
    let cfg = engine_config(config, &node, &peer, &attached);
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| RunError::Seed(e.to_string()))?;
    let engine =
        Engine::new(cfg, attached.loaded.clone(), u64::from_le_bytes(seed)).map_err(|detail| {
            RunError::Engine {
                path: attached.meta_path.clone(),
                detail,
            }
        })?;
    let activated: Vec<Arc<Listener>> = listeners_from_env()?.into_iter().map(Arc::new).collect();
    let peer_listener = tokio::net::TcpListener::bind((my_addr.host.as_str(), my_addr.port))
        .await
        .map_err(|source| RunError::ListenPeer {
            addr: my_addr.to_string(),
            source,
        })?;
    let control_listener = control_server::bind(&node.control)?;

    let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE_EVENTS);
    let (link_tx, link_rx) = mpsc::channel(LINK_QUEUE_EVENTS);
    let (client_tx, client_rx) = mpsc::channel(CLIENT_QUEUE_REQUESTS);
    let (nbd_tx, nbd_rx) = mpsc::channel(4);
    let (want_tx, want_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (events_tx, _) = broadcast::channel(control_server::EVENT_CHANNEL_CAPACITY_EVENTS);

    let transport_cfg = TransportConfig {
        node: node.name.clone(),
        peer: peer.name.clone(),
        peer_addr: peer_addr.to_string(),
        peer_timeout_ms: node.options.peer_timeout_ms,
    };
    let transport_task = tokio::spawn(transport::run(
        transport_cfg,
        peer_listener,
        want_rx,
        link_tx,
        stop_rx.clone(),
    ));
    let handler: Arc<dyn ControlHandler> = Arc::new(Handler {
        control: internal_tx.clone(),
    });
    let mut control_stop = stop_rx.clone();
    let control_task = tokio::spawn(control_server::run(
        control_listener,
        handler,
        events_tx.clone(),
        async move {
            let _ = control_stop.wait_for(|s| *s).await;
        },
    ));

    let target = Arc::new(ReplicatedTarget::new(
        client_tx,
        attached.layout.data_size_bytes,
        node.options.read_only,
    ));
    info!(
        resource = %config.resource,
        node = %node.name,
        peer = %peer.name,
        disk = %node.disk.display(),
        size_bytes = attached.layout.data_size_bytes,
        io_engine = attached.data.io_name(),
        "attached; connecting to the peer"
    );
    let ctx = StatusContext {
        resource: config.resource.clone(),
        node: node.name.clone(),
        peer_node: peer.name.clone(),
        protocol: engine_config(config, &node, &peer, &attached).protocol,
        verify: None,
        last_refusal: None,
        connection_error: None,
        disk_error: None,
        nbd: None,
        nbd_clients: 0,
        resync_transferred_bytes: 0,
    };
    let last_report = status_report(&engine.status(), &ctx);
    let mut rt = Runtime {
        engine,
        origin: Instant::now(),
        data: attached.data.clone(),
        meta: attached.meta.clone(),
        internal_tx: internal_tx.clone(),
        link: None,
        want_tx,
        stop_tx,
        clients: HashMap::new(),
        next_client: 1,
        admin_result: None,
        ctx,
        events_tx,
        last_report,
        last_publish: Instant::now(),
        publish_pending: false,
        status_dirty: false,
        resync_rate: rate::RateMeter::default(),
        verify_rate: rate::RateMeter::default(),
        nbd_addr: node.nbd.clone(),
        activated,
        export: ExportConfig {
            name: config.resource.clone(),
            description: format!(
                "replicator resource {} (node {})",
                config.resource, node.name
            ),
        },
        target: target.clone(),
        nbd: None,
        nbd_tx,
        pending_demote: None,
        stopping: None,
        fatal: None,
        link_failed: None,
        closed_link: None,
        services: vec![transport_task, control_task],
    };
    // Like `drbdadm up`: attach, then connect.
    rt.apply(Input::Admin(AdminCommand::Connect));
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let shutdown = async move {
        let _ = shutdown_rx.wait_for(|s| *s).await;
    };
    let task = tokio::spawn(rt.run(internal_rx, link_rx, client_rx, nbd_rx, shutdown));
    Ok(NodeHandle {
        target,
        control: internal_tx,
        shutdown: shutdown_tx,
        task,
    })
}

/// Where a clean stop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    /// Waiting for the NBD export to close and client requests to finish.
    Draining,
    /// Shutdown sent to the engine; waiting for its metadata writes.
    Persisting,
}

struct Runtime {
    engine: Engine,
    origin: Instant,
    data: Arc<AnyEngine>,
    meta: Arc<AnyEngine>,
    internal_tx: mpsc::Sender<Internal>,
    link: Option<Link>,
    want_tx: watch::Sender<bool>,
    stop_tx: watch::Sender<bool>,
    clients: HashMap<ClientId, oneshot::Sender<Result<Bytes, ClientError>>>,
    next_client: u64,
    admin_result: Option<Result<(), AdminError>>,
    ctx: StatusContext,
    events_tx: broadcast::Sender<ControlEvent>,
    last_report: StatusReport,
    last_publish: Instant,
    /// A progress change waits for its turn to be published.
    publish_pending: bool,
    /// An engine event since the last publication (status may differ).
    status_dirty: bool,
    /// The running resync's recent rate, as this node sees its progress.
    resync_rate: rate::RateMeter,
    /// The same for a verify this node drives.
    verify_rate: rate::RateMeter,
    nbd_addr: crate::config::NbdAddress,
    activated: Vec<Arc<Listener>>,
    export: ExportConfig,
    target: Arc<ReplicatedTarget>,
    nbd: Option<nbd::NbdServer>,
    nbd_tx: mpsc::Sender<nbd::NbdStopped>,
    pending_demote: Option<oneshot::Sender<Response>>,
    stopping: Option<Stopping>,
    /// The engine stopped on a metadata write error ([`Output::Fatal`]).
    fatal: Option<String>,
    link_failed: Option<String>,
    /// The link closed last (its writer may still be sending).
    closed_link: Option<Link>,
    /// The transport and the control server, awaited at exit so their
    /// sockets are gone when the node has stopped.
    services: Vec<tokio::task::JoinHandle<()>>,
}

/// What one wait of the loop produced.
enum Wake {
    Internal(Internal),
    Link(LinkEvent),
    Client(ClientCall),
    NbdStopped,
    Deadline,
    PublishDue,
    Shutdown,
    GiveUp,
}

impl Runtime {
    fn now(&self) -> Time {
        Time(self.origin.elapsed().as_nanos() as u64)
    }

    async fn run(
        mut self,
        mut internal_rx: mpsc::Receiver<Internal>,
        mut link_rx: mpsc::Receiver<LinkEvent>,
        mut client_rx: mpsc::Receiver<ClientCall>,
        mut nbd_rx: mpsc::Receiver<nbd::NbdStopped>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), RunError> {
        tokio::pin!(shutdown);
        let mut give_up_at: Option<Instant> = None;
        loop {
            let deadline = self
                .engine
                .next_deadline()
                .map(|t| self.origin + Duration::from_nanos(t.0));
            let congested = self.congested();
            let publish_at = self.last_publish + Duration::from_millis(PROGRESS_EVENT_INTERVAL_MS);
            let wake = tokio::select! {
                Some(ev) = internal_rx.recv() => Wake::Internal(ev),
                Some(ev) = link_rx.recv() => Wake::Link(ev),
                Some(call) = client_rx.recv(), if !congested => Wake::Client(call),
                Some(_) = nbd_rx.recv() => Wake::NbdStopped,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => Wake::Deadline,
                _ = tokio::time::sleep_until(publish_at), if self.publish_pending => Wake::PublishDue,
                _ = &mut shutdown, if self.stopping.is_none() => Wake::Shutdown,
                _ = tokio::time::sleep_until(give_up_at.unwrap_or_else(Instant::now)), if give_up_at.is_some() => Wake::GiveUp,
            };
            match wake {
                Wake::Internal(ev) => self.on_internal(ev),
                Wake::Link(ev) => self.on_link(ev),
                Wake::Client(call) => self.on_client(call),
                Wake::NbdStopped => self.on_nbd_stopped(),
                Wake::Deadline => self.apply(Input::Tick),
                Wake::PublishDue => self.publish(),
                Wake::Shutdown => {
                    info!("stopping: closing the NBD export, finishing in-flight I/O");
                    give_up_at = Some(Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS));
                    self.stopping = Some(Stopping::Draining);
                    if let Some(server) = &self.nbd {
                        server.stop();
                    }
                }
                Wake::GiveUp => {
                    error!("stopping took too long; giving up");
                    self.finish_links().await;
                    return Err(RunError::ShutdownTimeout);
                }
            }
            // Events that are already waiting are applied one by one without
            // going back to the select (and its timers) for each.
            for _ in 0..LOOP_BATCH_EVENTS {
                if let Ok(ev) = internal_rx.try_recv() {
                    self.on_internal(ev);
                } else if let Ok(ev) = link_rx.try_recv() {
                    self.on_link(ev);
                } else if !self.congested() {
                    match client_rx.try_recv() {
                        Ok(call) => self.on_client(call),
                        Err(_) => break,
                    }
                } else {
                    break;
                }
            }
            crate::busy_poll::BusyPoll::global().set_outstanding(
                self.engine.pending_client_requests() + self.engine.pending_disk_ops(),
            );
            if let Some(reason) = self.fatal.take() {
                // Like a crash for the peer and the clients: no final flush
                // or superblock (the metadata disk just failed), the link
                // and the export close.
                if let Some(server) = &self.nbd {
                    server.stop();
                }
                self.finish_links().await;
                return Err(RunError::MetadataWrite(reason));
            }
            if let Some(done) = self.advance_stop() {
                let flushed = self.data.flush().await;
                let meta_flushed = if Arc::ptr_eq(&self.data, &self.meta) {
                    Ok(())
                } else {
                    self.meta.flush().await
                };
                self.finish_links().await;
                flushed.and(meta_flushed).map_err(RunError::FinalFlush)?;
                info!("metadata persisted and disk flushed; stopped cleanly");
                return done;
            }
        }
    }

    /// Whether the peer link's application lane is so full that new client
    /// requests wait.
    fn congested(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.app_queued_bytes() > APP_LANE_HIGH_WATER_BYTES)
    }

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::DiskDone { op, result, error } => {
                if let Some(error) = error {
                    self.ctx.disk_error = Some(error);
                    self.status_dirty = true;
                }
                self.apply(Input::DiskDone { op, result });
            }
            Internal::Control { request, reply } => self.on_control(request, reply),
        }
    }

    /// Moves a clean stop forward; `Some` when the loop may end.
    fn advance_stop(&mut self) -> Option<Result<(), RunError>> {
        match self.stopping? {
            Stopping::Draining => {
                if self.nbd.is_none() && self.engine.pending_client_requests() == 0 {
                    // Leave the peer first (it then marks what it writes
                    // for us), then persist bitmap and a clean superblock.
                    self.apply(Input::Admin(AdminCommand::Disconnect));
                    self.apply(Input::Admin(AdminCommand::Shutdown));
                    self.stopping = Some(Stopping::Persisting);
                    return self.advance_stop();
                }
                None
            }
            Stopping::Persisting => (self.engine.pending_disk_ops() == 0).then_some(Ok(())),
        }
    }

    async fn finish_links(&mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(link) = self.link.take() {
            link.close("this node is stopping");
            self.closed_link = Some(link);
        }
        // Let the writer send the last frames (Disconnect) before exit.
        if let Some(link) = self.closed_link.take() {
            let grace = Duration::from_millis(LINK_CLOSE_GRACE_MS);
            if tokio::time::timeout(grace, link.ended()).await.is_err() {
                warn!("the peer link did not close in time");
            }
        }
        let grace = Duration::from_millis(control_server::SHUTDOWN_GRACE_MS + LINK_CLOSE_GRACE_MS);
        for task in self.services.drain(..) {
            if tokio::time::timeout(grace, task).await.is_err() {
                warn!("a service task did not stop in time");
            }
        }
    }

    /// Feeds one input and carries out everything it produced.
    fn apply(&mut self, input: Input) {
        let now = self.now();
        self.engine.handle(now, input);
        self.drain_outputs();
        while let Some(reason) = self.link_failed.take() {
            if let Some(link) = self.link.take() {
                link.close(&reason);
            }
            self.ctx.connection_error = Some(reason);
            let now = self.now();
            self.engine.handle(now, Input::Disconnected);
            self.drain_outputs();
        }
        let want = self.engine.wants_connection();
        self.want_tx.send_if_modified(|w| {
            let changed = *w != want;
            *w = want;
            changed
        });
        // Most steps (a write and its acks while connected) change nothing
        // operators see; only engine events do.
        if self.status_dirty {
            self.publish();
        }
    }

    fn drain_outputs(&mut self) {
        while let Some(out) = self.engine.poll_output() {
            match out {
                Output::Disk { op, kind } => self.exec_disk(op, kind),
                Output::Send(msg) => self.send(msg),
                Output::Complete { id, result } => {
                    if let Some(reply) = self.clients.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
                Output::Event(ev) => self.on_engine_event(ev),
                Output::CloseLink { reason } => {
                    if let Some(link) = self.link.take() {
                        info!(link = link.id.0, "closing the peer link: {reason}");
                        link.close(&reason);
                        self.closed_link = Some(link);
                    }
                }
                Output::AdminResult(r) => self.admin_result = Some(r),
                Output::Fatal { reason } => {
                    error!("stopping at once: {reason}; the metadata is not to be trusted past this point (a restart reads it again, and refuses a damaged block)");
                    self.fatal = Some(reason);
                }
            }
        }
    }

    fn send(&mut self, msg: Message) {
        let Some(link) = &self.link else {
            return;
        };
        if let Message::ResyncData { data, .. } = &msg {
            self.ctx.resync_transferred_bytes += data.len() as u64;
        }
        if let Err(e) = link.send(msg) {
            if self.link_failed.is_none() {
                warn!("dropping the peer link: {e}");
                self.link_failed = Some(e.to_string());
            }
        }
    }

    fn on_engine_event(&mut self, ev: Event) {
        self.status_dirty = true;
        match &ev {
            Event::ProtocolError { detail } => {
                warn!("peer link: {detail}");
                self.ctx.connection_error = Some(detail.clone());
                // Refusals leave the engine StandAlone; keep them apart.
                if detail.starts_with("peer refused")
                    || self.engine.status().connection == ConnState::StandAlone
                {
                    self.ctx.last_refusal = Some(detail.clone());
                }
            }
            Event::SplitBrain { .. } => {
                error!("split brain detected: both nodes wrote independently; resolve it by hand");
                self.ctx.last_refusal =
                    Some("split brain detected: both nodes wrote independently".to_string());
            }
            Event::UnrelatedPeer => {
                error!("the peer holds unrelated data");
                self.ctx.last_refusal = Some("the peer holds unrelated data".to_string());
            }
            Event::Connection(ConnState::Connected) => {
                info!("connected to the peer");
            }
            Event::Replication(r @ ReplState::Established) => {
                self.ctx.last_refusal = None;
                info!(replication = r.name(), "replication state");
            }
            Event::Resync(_) | Event::OutOfSync { .. } => {
                tracing::debug!(?ev, "engine event");
                return;
            }
            // A resync made the disk whole again: the error is history.
            Event::Disk(replicator_core::types::DiskState::UpToDate) => self.ctx.disk_error = None,
            _ => {}
        }
        info!(?ev, "state change");
    }

    /// Publishes `change` events for what changed since the last
    /// publication: state changes at once, progress at most every
    /// [`PROGRESS_EVENT_INTERVAL_MS`].
    fn publish(&mut self) {
        self.status_dirty = false;
        let report = self.report();
        if report == self.last_report {
            return;
        }
        let progress_only = without_progress(&report) == without_progress(&self.last_report);
        let now = Instant::now();
        if progress_only
            && now < self.last_publish + Duration::from_millis(PROGRESS_EVENT_INTERVAL_MS)
        {
            self.publish_pending = true;
            return;
        }
        self.publish_pending = false;
        let time = Timestamp::now().to_string();
        for ev in change_events(&self.last_report, &report, &time) {
            // No subscriber is fine.
            let _ = self.events_tx.send(ev);
        }
        self.last_report = report;
        self.last_publish = now;
    }

    fn report(&mut self) -> StatusReport {
        self.ctx.nbd = self.nbd.as_ref().map(|s| s.address.clone());
        self.ctx.nbd_clients = self.nbd.as_ref().map_or(0, nbd::NbdServer::clients);
        let mut status = self.engine.status();
        // Rate and ETA measured here, on both sides of a resync: the
        // engine's source side has no start time to measure from. A paused
        // resync moves nothing: rate 0, no ETA; once resumed its rate counts
        // from the resume, not over the pause.
        let now = Instant::now();
        let paused = matches!(
            status.replication,
            ReplState::PausedSyncS | ReplState::PausedSyncT
        );
        match status.resync.as_mut() {
            None => self.resync_rate.reset(),
            Some(p) if paused => {
                self.resync_rate.reset();
                p.rate_bytes_per_s = 0;
                p.eta_s = 0;
            }
            Some(p) => {
                p.rate_bytes_per_s = self.resync_rate.sample(now, p.done_bytes);
                p.eta_s = p
                    .total_bytes
                    .saturating_sub(p.done_bytes)
                    .checked_div(p.rate_bytes_per_s)
                    .unwrap_or(0);
            }
        }
        self.ctx.verify = match self.engine.verify_progress() {
            None => {
                self.verify_rate.reset();
                None
            }
            Some((done_bytes, total_bytes)) => {
                let rate = self.verify_rate.sample(now, done_bytes);
                Some(crate::control::protocol::Progress {
                    done_bytes,
                    total_bytes,
                    rate_bytes_per_s: rate,
                    eta_s: total_bytes.saturating_sub(done_bytes).checked_div(rate),
                })
            }
        };
        status_report(&status, &self.ctx)
    }

    fn exec_disk(&self, op: OpId, kind: DiskOp) {
        let data = self.data.clone();
        let meta = self.meta.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let mut error = None;
            let result = run_disk_op(&data, &meta, kind).await.map_err(|e| {
                warn!(op = op.0, "disk operation failed: {e}");
                error = Some(e.to_string());
                CoreDiskError { code: errno(&e) }
            });
            let _ = tx.send(Internal::DiskDone { op, result, error }).await;
        });
    }

    fn on_client(&mut self, call: ClientCall) {
        let id = ClientId(self.next_client);
        self.next_client += 1;
        self.clients.insert(id, call.reply);
        self.apply(Input::Client {
            id,
            request: call.request,
        });
    }

    fn on_link(&mut self, ev: LinkEvent) {
        let current = self.link.as_ref().map(|l| l.id);
        match ev {
            LinkEvent::Up(link) => {
                if current.is_some() || self.stopping.is_some() {
                    // The transport keeps one link; never show two.
                    link.close("another link is in use");
                    return;
                }
                self.link = Some(link);
                self.apply(Input::Connected);
            }
            LinkEvent::Frame { link, msg } if Some(link) == current => {
                if let Message::ResyncData { data, .. } = &msg {
                    self.ctx.resync_transferred_bytes += data.len() as u64;
                }
                self.apply(Input::PeerFrame(msg));
            }
            LinkEvent::FrameError { link, error } if Some(link) == current => {
                self.apply(Input::PeerFrameError(error));
            }
            LinkEvent::Down { link, reason } if Some(link) == current => {
                self.link = None;
                self.ctx.connection_error = Some(reason);
                self.apply(Input::Disconnected);
            }
            // Frames and news of a link the loop already closed.
            LinkEvent::Frame { .. } | LinkEvent::FrameError { .. } | LinkEvent::Down { .. } => {}
        }
    }

    fn admin(&mut self, cmd: AdminCommand) -> Result<(), AdminError> {
        self.admin_result = None;
        self.apply(Input::Admin(cmd));
        self.admin_result.take().unwrap_or_else(|| {
            Err(AdminError::WrongState {
                detail: "the engine did not answer the command".to_string(),
            })
        })
    }

    fn on_control(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        if self.stopping.is_some() && request != Request::Status {
            let _ = reply.send(Response::error("The daemon is stopping."));
            return;
        }
        let response = match request {
            Request::Status | Request::Events => Response::Status(Box::new(self.report())),
            Request::Primary { force } => self.promote(force),
            Request::Secondary { force } => {
                if self.pending_demote.is_some() {
                    Response::error("A demotion is already in progress.")
                } else if let Some(server) = &self.nbd {
                    let clients = server.clients();
                    if clients > 0 && !force {
                        Response::error(format!(
                            "{clients} NBD client(s) are connected; disconnect them first or use --force."
                        ))
                    } else {
                        server.stop();
                        self.pending_demote = Some(reply);
                        return;
                    }
                } else {
                    admin_response(self.admin(AdminCommand::Secondary))
                }
            }
            Request::Resync => self.resync(),
            other => match admin_command(&other) {
                Some(cmd) => admin_response(self.admin(cmd)),
                None => Response::error("This command is not carried out by the daemon."),
            },
        };
        self.publish();
        let _ = reply.send(response);
    }

    /// `resync`: while connected and in sync as far as the link knows but
    /// with blocks marked out of sync (after a verify), reconnect so the
    /// handshake exchanges bitmaps and starts the resync; otherwise let the
    /// engine (re)connect.
    fn resync(&mut self) -> Response {
        let s = self.engine.status();
        let connected = s.connection == ConnState::Connected;
        if connected
            && matches!(
                s.replication,
                ReplState::PausedSyncS | ReplState::PausedSyncT
            )
        {
            return Response::ok_with(
                "the resync is paused (pause-sync, here or on the peer): \
                 `replctl resume-sync` continues it",
            );
        }
        if connected && s.replication == ReplState::SyncSource {
            // The target drives the resync (and its waits after a disk
            // failure); nothing to start here.
            let peer = &self.ctx.peer_node;
            return Response::ok_with(format!(
                "a resync to {peer} is already running; if it waits after a disk failure, \
                 `replctl resync` on {peer} asks again at once"
            ));
        }
        if connected && s.replication == ReplState::Established {
            if !self.engine.needs_resync() {
                return Response::ok_with("nothing to resync: the replicas are in sync");
            }
            // The engine renegotiates the link; the handshake starts it.
            return match self.admin(AdminCommand::StartResync) {
                Ok(()) if s.out_of_sync_bytes > 0 => Response::ok_with(format!(
                    "resync of {} bytes starts after a reconnect",
                    s.out_of_sync_bytes
                )),
                Ok(()) => Response::ok_with(format!(
                    "resync starts after a reconnect (disk {}, peer disk {})",
                    s.disk.name(),
                    s.peer_disk.map_or("unknown", |d| d.name())
                )),
                Err(e) => admin_response(Err(e)),
            };
        }
        admin_response(self.admin(AdminCommand::StartResync))
    }

    fn promote(&mut self, force: bool) -> Response {
        if self.engine.role() == NodeRole::Primary {
            return Response::ok();
        }
        let (listeners, cleanup, address) = if self.activated.is_empty() {
            match nbd::bind(&self.nbd_addr) {
                Ok((l, cleanup)) => {
                    let address = match &l {
                        Listener::Tcp(t) => t
                            .local_addr()
                            .map_or_else(|_| self.nbd_addr.to_string(), |a| a.to_string()),
                        Listener::Unix(_) => self.nbd_addr.to_string(),
                    };
                    (vec![Arc::new(l)], cleanup, address)
                }
                Err(e) => {
                    return Response::error(format!(
                        "Cannot listen for NBD on {}: {e}.",
                        self.nbd_addr
                    ))
                }
            }
        } else {
            (
                self.activated.clone(),
                None,
                "socket activation".to_string(),
            )
        };
        match self.admin(AdminCommand::Primary { force }) {
            Ok(()) => {
                self.nbd = Some(nbd::NbdServer::start(
                    listeners,
                    cleanup,
                    address,
                    self.export.clone(),
                    self.target.clone(),
                    self.nbd_tx.clone(),
                ));
                Response::ok()
            }
            Err(e) => {
                drop(listeners);
                if let Some(path) = cleanup {
                    let _ = std::fs::remove_file(path);
                }
                admin_response(Err(e))
            }
        }
    }

    fn on_nbd_stopped(&mut self) {
        self.nbd = None;
        if let Some(reply) = self.pending_demote.take() {
            let r = admin_response(self.admin(AdminCommand::Secondary));
            let _ = reply.send(r);
        }
        self.publish();
    }
}

/// `r` without the fields that change with every resync step or write.
fn without_progress(r: &StatusReport) -> StatusReport {
    StatusReport {
        resync: None,
        verify: None,
        out_of_sync_bytes: 0,
        resync_transferred_bytes: 0,
        ..r.clone()
    }
}

/// errno-like code of a disk error, for the engine.
fn errno(e: &DiskError) -> i32 {
    match e {
        DiskError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        DiskError::OutOfRange { .. } | DiskError::TooLarge { .. } => libc::EINVAL,
        _ => libc::EIO,
    }
}

async fn run_disk_op(data: &AnyEngine, meta: &AnyEngine, kind: DiskOp) -> Result<Bytes, DiskError> {
    match kind {
        DiskOp::Read { offset, len_bytes } => data.read(offset, len_bytes as usize).await,
        DiskOp::Write {
            offset,
            data: d,
            fua,
        } => {
            data.write(offset, d).await?;
            if fua {
                data.flush().await?;
            }
            Ok(Bytes::new())
        }
        DiskOp::Zero {
            offset,
            len_bytes,
            fua,
        } => {
            data.write_zeroes(offset, u64::from(len_bytes), false, false)
                .await?;
            if fua {
                data.flush().await?;
            }
            Ok(Bytes::new())
        }
        DiskOp::Trim { offset, len_bytes } => {
            data.trim(offset, u64::from(len_bytes)).await?;
            Ok(Bytes::new())
        }
        DiskOp::Flush => {
            data.flush().await?;
            Ok(Bytes::new())
        }
        DiskOp::MetaWrite {
            offset_bytes,
            data: d,
        } => {
            meta.write(offset_bytes, d).await?;
            meta.flush().await?;
            Ok(Bytes::new())
        }
    }
}

#[cfg(test)]
mod tests;
