//! `replctl`, the operator's tool: resolves which daemon to talk to, sends
//! the command over the control socket, prints the answer, follows resync
//! and verify progress, and turns the outcome into an exit status.
//!
//! - [`cli`]: the clap definitions.
//! - [`metadata`]: the offline `create-md` and `dump-md`.
//! - [`render`]: pure text rendering (status, progress bar, progress lines).
//!
//! Must not hold daemon state or carry out commands: the daemon does. All
//! output goes through the writers passed to [`run`], so tests capture it.
#![forbid(unsafe_code)]

pub mod cli;
pub mod metadata;
pub mod render;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::control::client::{ClientError, ControlClient, StreamItem};
use crate::control::protocol::{ConnectionState, Progress, Request, Response, StatusReport};

pub use cli::{Cli, ControlCommand, TargetArgs};
pub use render::WaitOp;

/// Exit status: the command succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit status: the daemon refused the command, the operation was aborted,
/// or the arguments or config were wrong.
pub const EXIT_FAILED: i32 = 1;
/// Exit status: no daemon answers on the control socket.
pub const EXIT_NO_DAEMON: i32 = 3;

/// How often `--wait` asks the daemon for progress, in milliseconds.
pub const WAIT_POLL_INTERVAL_MS: u64 = 250;
/// Least time between two plain progress lines (not on a terminal), in
/// milliseconds.
pub const PLAIN_PROGRESS_INTERVAL_MS: u64 = 1000;

/// Where `replctl` writes, and whether stdout is a terminal (progress bar)
/// or not (plain progress lines).
pub struct Console<'a> {
    /// Standard output.
    pub out: &'a mut (dyn Write + Send),
    /// Standard error: the one-sentence failure reasons.
    pub err: &'a mut (dyn Write + Send),
    /// Whether `out` is a terminal.
    pub out_is_tty: bool,
}

impl std::fmt::Debug for Console<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("out_is_tty", &self.out_is_tty)
            .finish_non_exhaustive()
    }
}

/// A failure: the exit status and the one sentence for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Process exit status (non-zero, except for [`Failure::reader_gone`]).
    pub exit_code: i32,
    /// One clear sentence; empty when there is nothing to say.
    pub sentence: String,
}

impl Failure {
    fn new(exit_code: i32, sentence: impl Into<String>) -> Self {
        Failure {
            exit_code,
            sentence: sentence.into(),
        }
    }

    fn failed(sentence: impl Into<String>) -> Self {
        Failure::new(EXIT_FAILED, sentence)
    }

    /// Whoever read standard output went away (`replctl events | head`):
    /// stop quietly, as `head` asked for no more.
    fn reader_gone() -> Self {
        Failure::new(EXIT_OK, "")
    }
}

/// The daemon to talk to, resolved from the arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The control socket path.
    pub socket: PathBuf,
    /// `vm1/alpha` when known from the config.
    pub name: Option<String>,
}

impl Target {
    fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("the daemon of {name} at {}", self.socket.display()),
            None => format!("the daemon at {}", self.socket.display()),
        }
    }

    fn client_failure(&self, error: ClientError) -> Failure {
        match error {
            ClientError::Unreachable { .. } => Failure::new(
                EXIT_NO_DAEMON,
                format!("cannot reach {}: is replicatord running?", self.describe()),
            ),
            ClientError::Io { source, .. } => Failure::failed(format!(
                "the connection to {} broke: {source}",
                self.describe()
            )),
            ClientError::Closed { .. } => Failure::failed(format!(
                "{} closed the connection without answering",
                self.describe()
            )),
            ClientError::TimedOut { timeout_ms, .. } => Failure::failed(format!(
                "{} did not answer within {} s",
                self.describe(),
                timeout_ms / 1000
            )),
            ClientError::Protocol { reason, .. } => Failure::failed(format!(
                "{} sent an answer that is not valid: {reason}",
                self.describe()
            )),
        }
    }
}

/// Resolve `--socket`, or `--config` + `--node` (the node's `control` key).
pub fn resolve_target(args: &TargetArgs) -> Result<Target, Failure> {
    match (&args.socket, &args.config, &args.node) {
        (Some(socket), None, None) => Ok(Target {
            socket: socket.clone(),
            name: None,
        }),
        (Some(_), _, _) => Err(Failure::failed(
            "give either --socket or --config with --node, not both",
        )),
        (None, Some(config), Some(node)) => {
            let config = crate::config::load(config).map_err(|e| Failure::failed(e.to_string()))?;
            let node_config = config
                .node(node)
                .map_err(|e| Failure::failed(e.to_string()))?;
            Ok(Target {
                socket: node_config.control.clone(),
                name: Some(format!("{}/{}", config.resource, node)),
            })
        }
        (None, Some(_), None) => Err(Failure::failed("--config needs --node NAME too")),
        (None, None, Some(_)) => Err(Failure::failed("--node needs --config FILE too")),
        (None, None, None) => Err(Failure::failed(
            "say which daemon: --config FILE --node NAME, or --socket PATH",
        )),
    }
}

/// Run one control command; returns the process exit status. Failures are
/// written to `console.err` as one sentence prefixed with `replctl: `.
pub async fn run(target: &TargetArgs, command: &ControlCommand, console: &mut Console<'_>) -> i32 {
    let outcome = match command {
        ControlCommand::CreateMd { .. } | ControlCommand::DumpMd { .. } => {
            run_offline(target, command, console).await
        }
        _ => match resolve_target(target) {
            Ok(target) => run_command(&target, command, console).await,
            Err(failure) => Err(failure),
        },
    };
    match outcome {
        Ok(()) => EXIT_OK,
        Err(failure) => {
            if !failure.sentence.is_empty() {
                // Nothing useful can be done if stderr is gone.
                let _ = writeln!(console.err, "replctl: {}", failure.sentence);
                let _ = console.err.flush();
            }
            failure.exit_code
        }
    }
}

fn write_out(console: &mut Console<'_>, text: &str) -> Result<(), Failure> {
    console
        .out
        .write_all(text.as_bytes())
        .and_then(|()| console.out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => Failure::reader_gone(),
            _ => Failure::failed(format!("cannot write to standard output: {e}")),
        })
}

/// `create-md` / `dump-md`: work on the disk named by `--config`/`--node`.
async fn run_offline(
    target: &TargetArgs,
    command: &ControlCommand,
    console: &mut Console<'_>,
) -> Result<(), Failure> {
    let name = match command {
        ControlCommand::CreateMd { .. } => "create-md",
        _ => "dump-md",
    };
    let (Some(config_path), Some(node), None) = (&target.config, &target.node, &target.socket)
    else {
        return Err(Failure::failed(format!(
            "{name} works offline on the disk: give --config FILE --node NAME (not --socket)"
        )));
    };
    let config = crate::config::load(config_path).map_err(|e| Failure::failed(e.to_string()))?;
    let control = config
        .node(node)
        .map_err(|e| Failure::failed(e.to_string()))?
        .control
        .clone();
    if let ControlCommand::CreateMd { .. } = command {
        if ControlClient::connect(&control).await.is_ok() {
            return Err(Failure::failed(format!(
                "replicatord of {}/{node} is running (it answers on {}); stop it before create-md",
                config.resource,
                control.display()
            )));
        }
    }
    let command = command.clone();
    let node = node.clone();
    let work = tokio::task::spawn_blocking(move || match command {
        ControlCommand::CreateMd { force } => {
            metadata::create_md(&config, &node, force).map(|line| format!("{line}\n"))
        }
        ControlCommand::DumpMd { json: true } => metadata::dump_md(&config, &node).map(|d| {
            let mut text = serde_json::to_string_pretty(&d).unwrap_or_default();
            text.push('\n');
            text
        }),
        _ => metadata::dump_md(&config, &node).map(|d| metadata::dump_text(&d)),
    });
    let text = work
        .await
        .map_err(|e| Failure::failed(format!("{name} failed: {e}")))?
        .map_err(|e| Failure::failed(e.0))?;
    write_out(console, &text)
}

/// The request a command sends; `None` for the offline commands.
fn request_for(command: &ControlCommand) -> Option<Request> {
    Some(match *command {
        ControlCommand::CreateMd { .. } | ControlCommand::DumpMd { .. } => return None,
        ControlCommand::Status { .. } => Request::Status,
        ControlCommand::Events => Request::Events,
        ControlCommand::Primary { force } => Request::Primary { force },
        ControlCommand::Secondary { force } => Request::Secondary { force },
        ControlCommand::Connect => Request::Connect,
        ControlCommand::Disconnect => Request::Disconnect,
        ControlCommand::Resync { .. } => Request::Resync,
        ControlCommand::Verify { .. } => Request::Verify,
        ControlCommand::Invalidate => Request::Invalidate,
        ControlCommand::InvalidateRemote => Request::InvalidateRemote,
        ControlCommand::PauseSync => Request::PauseSync,
        ControlCommand::ResumeSync => Request::ResumeSync,
        ControlCommand::NewCurrentUuid { clear_bitmap } => Request::NewCurrentUuid { clear_bitmap },
    })
}

async fn run_command(
    target: &Target,
    command: &ControlCommand,
    console: &mut Console<'_>,
) -> Result<(), Failure> {
    let mut client = ControlClient::connect(&target.socket)
        .await
        .map_err(|e| target.client_failure(e))?;
    match command {
        ControlCommand::Status { json } => {
            let status = fetch_status(&mut client, target).await?;
            let text = if *json {
                let mut line = serde_json::to_string_pretty(&status)
                    .map_err(|e| Failure::failed(format!("cannot encode the status: {e}")))?;
                line.push('\n');
                line
            } else {
                render::status_text(&status)
            };
            write_out(console, &text)
        }
        ControlCommand::Events => follow_events(client, target, console).await,
        other => {
            let Some(request) = request_for(other) else {
                return Err(Failure::failed(
                    "create-md and dump-md work offline; they are not sent to the daemon",
                ));
            };
            let response = client
                .request(&request)
                .await
                .map_err(|e| target.client_failure(e))?;
            match response {
                Response::Ok { message } => {
                    if let Some(message) = message {
                        write_out(console, &format!("{message}\n"))?;
                    }
                }
                Response::Error(sentence) => {
                    return Err(Failure::failed(format!("{}: {sentence}", request.name())))
                }
                Response::Status(_) => {
                    return Err(Failure::failed(format!(
                        "{} answered {} with a status",
                        target.describe(),
                        request.name()
                    )))
                }
            }
            match other {
                ControlCommand::Resync { wait: true } => {
                    wait_for(WaitOp::Resync, &mut client, target, console).await
                }
                ControlCommand::Verify { wait: true } => {
                    wait_for(WaitOp::Verify, &mut client, target, console).await
                }
                _ => Ok(()),
            }
        }
    }
}

async fn fetch_status(
    client: &mut ControlClient,
    target: &Target,
) -> Result<StatusReport, Failure> {
    match client
        .request(&Request::Status)
        .await
        .map_err(|e| target.client_failure(e))?
    {
        Response::Status(status) => Ok(*status),
        Response::Error(sentence) => Err(Failure::failed(format!("status: {sentence}"))),
        Response::Ok { .. } => Err(Failure::failed(format!(
            "{} answered status without a status",
            target.describe()
        ))),
    }
}

async fn follow_events(
    client: ControlClient,
    target: &Target,
    console: &mut Console<'_>,
) -> Result<(), Failure> {
    let mut stream = match client
        .subscribe()
        .await
        .map_err(|e| target.client_failure(e))?
    {
        Ok(stream) => stream,
        Err(sentence) => return Err(Failure::failed(format!("events: {sentence}"))),
    };
    loop {
        match stream
            .next_line()
            .await
            .map_err(|e| target.client_failure(e))?
        {
            Some((line, StreamItem::Event(_))) => write_out(console, &format!("{line}\n"))?,
            Some((_, StreamItem::Ended(sentence))) => {
                return Err(Failure::failed(format!(
                    "the event stream ended: {sentence}"
                )))
            }
            None => {
                return Err(Failure::failed(format!(
                    "{} closed the event stream (did it stop?)",
                    target.describe()
                )))
            }
        }
    }
}

/// Where a `--wait` stands according to one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitState {
    /// Running (progress unknown while the bitmaps are exchanged).
    Running(Option<Progress>),
    /// A resync is paused: keep waiting.
    Paused(Option<Progress>),
    /// Finished.
    Done,
    /// Aborted; the sentence says why.
    Aborted(String),
}

/// Classify `status` for an operation being waited for. Pure, so each case
/// is tested.
pub fn classify(op: WaitOp, status: &StatusReport) -> WaitState {
    if status.connection != ConnectionState::Connected {
        let why = status
            .connection_error
            .as_deref()
            .or(status.last_refusal.as_deref())
            .map(|reason| format!(": {reason}"))
            .unwrap_or_default();
        return WaitState::Aborted(format!(
            "{} aborted: the link to {} is {:?}{why}",
            op.name(),
            status.peer_node,
            status.connection
        ));
    }
    let replication = status.replication;
    match op {
        WaitOp::Resync if replication.is_paused() => WaitState::Paused(status.resync),
        WaitOp::Resync if replication.is_resync() => WaitState::Running(status.resync),
        WaitOp::Verify if replication.is_verify() => WaitState::Running(status.verify),
        _ => {
            let progress = match op {
                WaitOp::Resync => status.resync,
                WaitOp::Verify => status.verify,
            };
            match (replication, progress) {
                // The daemon may report progress a moment before the state.
                (_, Some(progress)) => WaitState::Running(Some(progress)),
                (crate::control::protocol::ReplicationState::Established, None) => WaitState::Done,
                (other, None) => WaitState::Aborted(format!(
                    "{} aborted: replication is now {other:?}",
                    op.name()
                )),
            }
        }
    }
}

/// How long `resync --wait` waits for a resync to show up while data is
/// still out of sync, in milliseconds.
pub const WAIT_START_TIMEOUT_MS: u64 = 10_000;

/// Follows the statuses seen by one `--wait`: like [`classify`], except that
/// before the operation was first seen running, a link that is not up yet,
/// or (for resync) blocks still out of sync without a resync, mean
/// "starting", not aborted or done, for up to [`WAIT_START_TIMEOUT_MS`].
#[derive(Debug, Clone)]
pub struct WaitTracker {
    op: WaitOp,
    seen_running: bool,
}

impl WaitTracker {
    /// A tracker for `op`, right after the daemon accepted the command.
    pub fn new(op: WaitOp) -> Self {
        WaitTracker {
            op,
            seen_running: false,
        }
    }

    /// Classify `status`, seen `since_request_ms` after the command was
    /// accepted.
    pub fn observe(&mut self, status: &StatusReport, since_request_ms: u64) -> WaitState {
        let state = classify(self.op, status);
        let waiting_to_start = match &state {
            WaitState::Running(_) | WaitState::Paused(_) => {
                self.seen_running = true;
                return state;
            }
            // The daemon accepted the command while the link was down (it
            // connects first, as after a promotion): not lost yet.
            WaitState::Aborted(_) => {
                !self.seen_running && status.connection != ConnectionState::Connected
            }
            // A resync starts after a reconnect: until it was seen, blocks
            // marked here or a disk not UpToDate (a Secondary whose disk
            // failed writes) mean it has yet to start.
            WaitState::Done => {
                self.op == WaitOp::Resync
                    && !self.seen_running
                    && (status.out_of_sync_bytes > 0
                        || status.disk != crate::control::protocol::DiskState::UpToDate)
            }
        };
        if !waiting_to_start {
            return state;
        }
        if since_request_ms < WAIT_START_TIMEOUT_MS {
            return WaitState::Running(None);
        }
        let why = if status.connection != ConnectionState::Connected {
            format!(
                "the link to {} is {:?}",
                status.peer_node, status.connection
            )
        } else if status.out_of_sync_bytes > 0 {
            format!(
                "{} remain out of sync",
                render::bytes(status.out_of_sync_bytes)
            )
        } else {
            format!("the disk is still {:?}", status.disk)
        };
        WaitState::Aborted(format!(
            "{} did not start within {} s; {why}",
            self.op.name(),
            WAIT_START_TIMEOUT_MS / 1000
        ))
    }
}

/// The line printed when a waited-for operation finished.
pub fn final_line(op: WaitOp, status: &StatusReport, last: Option<&Progress>) -> String {
    let amount = last
        .map(|p| format!(" ({} processed)", render::bytes(p.total_bytes)))
        .unwrap_or_default();
    match op {
        WaitOp::Resync => format!(
            "resync done{amount}: {} out of sync",
            render::bytes(status.out_of_sync_bytes)
        ),
        WaitOp::Verify if status.out_of_sync_bytes == 0 => {
            format!("verify done{amount}: the replicas are identical")
        }
        WaitOp::Verify => format!(
            "verify done{amount}: {} out of sync; `replctl resync` repairs it",
            render::bytes(status.out_of_sync_bytes)
        ),
    }
}

async fn wait_for(
    op: WaitOp,
    client: &mut ControlClient,
    target: &Target,
    console: &mut Console<'_>,
) -> Result<(), Failure> {
    let mut last_progress: Option<Progress> = None;
    let mut last_plain: Option<tokio::time::Instant> = None;
    let mut was_held = render::Hold::Moving;
    let mut bar_drawn = false;
    let mut announced = false;
    let mut tracker = WaitTracker::new(op);
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(WAIT_POLL_INTERVAL_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let status = fetch_status(client, target).await?;
        let since_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let state = tracker.observe(&status, since_ms);
        let disk_wait = match op {
            WaitOp::Resync => render::Hold::of_resync(&status),
            WaitOp::Verify => render::Hold::Moving,
        };
        let (progress, hold) = match &state {
            WaitState::Running(p) => (*p, disk_wait),
            WaitState::Paused(p) => (*p, render::Hold::Paused),
            WaitState::Done | WaitState::Aborted(_) => {
                if bar_drawn {
                    write_out(console, "\n")?;
                }
                if let WaitState::Aborted(sentence) = state {
                    return Err(Failure::failed(sentence));
                }
                return write_out(
                    console,
                    &format!("{}\n", final_line(op, &status, last_progress.as_ref())),
                );
            }
        };
        if progress.is_some() {
            last_progress = progress;
        }
        let Some(shown) = progress.or(last_progress) else {
            // Running but no numbers yet (bitmap exchange, link coming up,
            // or a daemon that reports no verify progress): say so once.
            if !announced {
                let line = render::waiting_line(op);
                if console.out_is_tty {
                    write_out(console, &format!("\r{line}\x1b[K"))?;
                    bar_drawn = true;
                } else {
                    write_out(console, &format!("{line}\n"))?;
                }
                announced = true;
            }
            continue;
        };
        if console.out_is_tty {
            write_out(console, &render::progress_bar(op, &shown, hold))?;
            bar_drawn = true;
        } else {
            let now = tokio::time::Instant::now();
            let due = last_plain.is_none_or(|t| {
                now.duration_since(t) >= Duration::from_millis(PLAIN_PROGRESS_INTERVAL_MS)
            });
            // A pause, a wait for the disk or their end is reported at
            // once; progress at most once a second, and not repeated while
            // paused.
            if hold != was_held || (due && hold != render::Hold::Paused) {
                write_out(
                    console,
                    &format!("{}\n", render::progress_line(op, &shown, hold)),
                )?;
                last_plain = Some(now);
            }
        }
        was_held = hold;
    }
}

#[cfg(test)]
mod tests;
