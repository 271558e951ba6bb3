//! The control socket server: binds the Unix socket (mode 0600), accepts
//! `replctl` connections, reads bounded JSON-line requests and hands each one
//! to the daemon's [`ControlHandler`]; streams events to subscribers.
//!
//! Owns the socket file's life (stale file replaced, live daemon refused,
//! removed on shutdown) and per-connection limits. Must not interpret
//! commands or hold resource state: the handler does that. Bad input from a
//! client gets an error line; it never panics and never affects another
//! connection.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::protocol::{
    change_events, exists_dump, Event, Request, Response, StatusReport, Timestamp,
    MAX_REQUEST_BYTES,
};

/// Control connections served at the same time; one more gets an error line
/// and is closed.
pub const MAX_CONTROL_CONNECTIONS: usize = 32;

/// Capacity of the event broadcast channel the daemon should create, in
/// events. A subscriber that falls this far behind is dropped.
pub const EVENT_CHANNEL_CAPACITY_EVENTS: usize = 1024;

/// How long a connection may stay silent before it is closed (event
/// subscribers excepted), in milliseconds.
pub const CONTROL_IDLE_TIMEOUT_MS: u64 = 60_000;

/// How long one write to a client may take before the client is dropped, in
/// milliseconds (a subscriber that stops reading must not pin a task).
pub const CONTROL_WRITE_TIMEOUT_MS: u64 = 5_000;

/// How long shutdown waits for in-flight requests to finish before aborting
/// them, in milliseconds.
pub const SHUTDOWN_GRACE_MS: u64 = 2_000;

/// Mode of the socket file: only the daemon's user may send commands.
pub const SOCKET_MODE: u32 = 0o600;

/// The daemon side of the control protocol: carries out one request.
///
/// Object-safe so the server can hold `Arc<dyn ControlHandler>`. The server
/// never passes [`Request::Events`] (it serves subscriptions itself, asking
/// for a [`Request::Status`] to build the initial dump). The returned future
/// may be dropped before completion when the server shuts down.
///
/// Contract for the daemon: answer `{"ok":true}` only once the command took
/// effect or, for resync and verify, once the operation is visible in the
/// next status (replication state or progress), because `replctl --wait`
/// polls status right after. Refusals are one sentence saying why
/// ("The local disk is Outdated; use --force to promote it anyway.").
/// Publish state changes on the broadcast channel given to [`run`], e.g. as
/// [`super::protocol::change_events`] between the statuses before and after
/// each step.
pub trait ControlHandler: Send + Sync {
    /// Carry out `request` and say how it went.
    fn handle(&self, request: Request) -> Pin<Box<dyn Future<Output = Response> + Send + '_>>;
}

/// Least time between two events that only move progress counters
/// (out-of-sync bytes, resync/verify progress), in milliseconds. State
/// changes are published at once; a resync does not flood subscribers.
pub const PROGRESS_EVENT_INTERVAL_MS: u64 = 1000;

/// Whether `new` differs from `old` only in progress counters
/// (out-of-sync bytes, resync/verify progress, transferred bytes).
fn only_progress_changed(old: &StatusReport, new: &StatusReport) -> bool {
    let mut old = old.clone();
    old.out_of_sync_bytes = new.out_of_sync_bytes;
    old.resync = new.resync;
    old.verify = new.verify;
    old.resync_transferred_bytes = new.resync_transferred_bytes;
    // The start or end of a resync or verify is a state change.
    let same_presence = |a: &Option<_>, b: &Option<_>| a.is_some() == b.is_some();
    old == *new
        && same_presence(&old.resync, &new.resync)
        && same_presence(&old.verify, &new.verify)
}

/// Turns the daemon's successive status snapshots into `change` events on
/// the broadcast channel that [`run`] streams to subscribers.
#[derive(Debug)]
pub struct EventPublisher {
    sender: broadcast::Sender<Event>,
    /// The last status subscribers were told about.
    published: Option<StatusReport>,
    last_progress_event: Option<Instant>,
}

impl Default for EventPublisher {
    fn default() -> Self {
        Self::new()
    }
}

impl EventPublisher {
    /// A publisher with a channel of [`EVENT_CHANNEL_CAPACITY_EVENTS`].
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY_EVENTS);
        EventPublisher {
            sender,
            published: None,
            last_progress_event: None,
        }
    }

    /// The sender to give to [`run`] / [`serve`].
    pub fn sender(&self) -> broadcast::Sender<Event> {
        self.sender.clone()
    }

    /// Publish what changed since the last published snapshot; returns how
    /// many events that was. See [`EventPublisher::publish_at`].
    pub fn publish(&mut self, status: &StatusReport) -> usize {
        self.publish_at(status, Instant::now())
    }

    /// Publish what changed since the last published snapshot, `now` being
    /// the current time. The first snapshot only sets the baseline
    /// (subscribers get the full state from their initial dump). A change of
    /// progress counters alone is held back until
    /// [`PROGRESS_EVENT_INTERVAL_MS`] after the previous such event; it is
    /// then sent with the latest values.
    pub fn publish_at(&mut self, status: &StatusReport, now: Instant) -> usize {
        let Some(published) = &self.published else {
            self.published = Some(status.clone());
            return 0;
        };
        if published == status {
            return 0;
        }
        if only_progress_changed(published, status) {
            let due = self.last_progress_event.is_none_or(|t| {
                now.saturating_duration_since(t)
                    >= Duration::from_millis(PROGRESS_EVENT_INTERVAL_MS)
            });
            if !due {
                return 0;
            }
            self.last_progress_event = Some(now);
        }
        let events = change_events(published, status, &Timestamp::now().to_string());
        for event in &events {
            // No subscriber is not an error: the event is simply not needed.
            let _ = self.sender.send(event.clone());
        }
        self.published = Some(status.clone());
        events.len()
    }
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another process answers on the socket.
    #[error("another daemon is already listening on the control socket {path}")]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket sits at the path.
    #[error("cannot create the control socket {path}: the path exists and is not a socket")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A file-system or socket call failed.
    #[error("cannot {action} the control socket {path}: {source}")]
    Io {
        /// What was being done ("bind", "remove the stale", "set the mode of").
        action: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ControlError {
    let path = path.to_owned();
    move |source| ControlError::Io {
        action,
        path,
        source,
    }
}

/// A bound control socket, ready to [`run`]. Removes its socket file when
/// dropped.
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

impl fmt::Debug for ControlListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlListener")
            .field("path", &self.path)
            .finish()
    }
}

impl ControlListener {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        // Best effort: the file may already be gone; nothing to report to.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind the control socket at `path` with mode 0600.
///
/// A socket file nobody answers on (left by a crashed daemon) is replaced; a
/// socket a live process answers on is refused with
/// [`ControlError::AlreadyRunning`]; any other file is refused. Missing
/// parent directories are created. Must be called inside a tokio runtime.
pub fn bind(path: &Path) -> Result<ControlListener, ControlError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ControlError::AlreadyRunning {
                        path: path.to_owned(),
                    })
                }
                Err(_) => {
                    tracing::info!(path = %path.display(), "removing stale control socket");
                    std::fs::remove_file(path).map_err(io_error("remove the stale", path))?;
                }
            }
        }
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("inspect", path)(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_error("create the directory of", path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_error("bind", path))?;
    let guard = ControlListener {
        listener,
        path: path.to_owned(),
    };
    // Before the first accept: a connection attempt needs write permission on
    // the socket, so after this only the owner (and root) can send commands.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io_error("set the mode of", path))?;
    Ok(guard)
}

/// Bind `path` and serve it until `shutdown` completes; see [`bind`] and
/// [`run`].
pub async fn serve(
    path: &Path,
    handler: Arc<dyn ControlHandler>,
    events: broadcast::Sender<Event>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ControlError> {
    let listener = bind(path)?;
    run(listener, handler, events, shutdown).await;
    Ok(())
}

/// Tunables of [`run_with`]; [`Default`] gives the documented limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// How long a connection may stay silent between requests, in
    /// milliseconds (event subscribers excepted).
    pub idle_timeout_ms: u64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            idle_timeout_ms: CONTROL_IDLE_TIMEOUT_MS,
        }
    }
}

/// Accept connections on `listener` until `shutdown` completes, each served
/// by its own task. On shutdown: stop accepting, end event streams, give
/// in-flight requests [`SHUTDOWN_GRACE_MS`], then remove the socket file.
pub async fn run(
    listener: ControlListener,
    handler: Arc<dyn ControlHandler>,
    events: broadcast::Sender<Event>,
    shutdown: impl Future<Output = ()> + Send,
) {
    run_with(
        listener,
        handler,
        events,
        shutdown,
        ServerOptions::default(),
    )
    .await;
}

/// [`run`] with explicit [`ServerOptions`].
pub async fn run_with(
    listener: ControlListener,
    handler: Arc<dyn ControlHandler>,
    events: broadcast::Sender<Event>,
    shutdown: impl Future<Output = ()> + Send,
    options: ServerOptions,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
    let mut tasks = JoinSet::new();
    let mut connection_id: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    tasks.spawn(refuse_busy(stream));
                    continue;
                };
                let handler = Arc::clone(&handler);
                let events = events.clone();
                let stop = stop_rx.clone();
                connection_id += 1;
                let span = tracing::debug_span!("control", conn = connection_id);
                tasks.spawn(
                    async move {
                        let _permit = permit;
                        serve_connection(stream, handler, events, stop, options).await;
                    }
                    .instrument(span),
                );
            }
            // Reap finished connection tasks so the set does not grow.
            Some(finished) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = finished {
                    if e.is_panic() {
                        tracing::error!("a control connection's handler panicked; that connection was closed");
                    }
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    drop(listener);
}

async fn refuse_busy(mut stream: UnixStream) {
    let line = response_line(&Response::error(format!(
        "The daemon already serves {MAX_CONTROL_CONNECTIONS} control connections; try again later."
    )));
    let _ = write_timed(&mut stream, &line).await;
}

fn response_line(response: &Response) -> Vec<u8> {
    // Serialising plain data to a Vec cannot fail.
    let mut line = serde_json::to_vec(response).unwrap_or_default();
    line.push(b'\n');
    line
}

fn event_line(event: &Event) -> Vec<u8> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    line
}

async fn write_timed<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<()> {
    let write = async {
        writer.write_all(bytes).await?;
        writer.flush().await
    };
    match tokio::time::timeout(Duration::from_millis(CONTROL_WRITE_TIMEOUT_MS), write).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client did not read its answer in time",
        )),
    }
}

/// One line read from a client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A complete line (without its newline).
    Complete(Vec<u8>),
    /// The line exceeded [`MAX_REQUEST_BYTES`]; its bytes were discarded.
    TooLong,
    /// The client closed the connection.
    Closed,
}

/// Read one line of at most `limit_bytes` bytes (newline included). An
/// over-long line is consumed and discarded without buffering it, so the
/// next line can be served.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    limit_bytes: usize,
) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            // EOF: a partial last line without newline is still served.
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::Closed,
                (false, false) => Line::Complete(line),
            });
        }
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long && line.len() + chunk.len() + usize::from(found.is_some()) > limit_bytes {
            too_long = true;
            line = Vec::new();
        }
        if !too_long {
            line.extend_from_slice(chunk);
        }
        let used = found.unwrap_or(buf.len());
        reader.consume(used);
        if found.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete(line)
            });
        }
    }
}

fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line)
        .map_err(|_| "malformed request: the line is not UTF-8".to_owned())?;
    serde_json::from_str(text.trim()).map_err(|e| format!("malformed request: {e}"))
}

async fn serve_connection(
    stream: UnixStream,
    handler: Arc<dyn ControlHandler>,
    events: broadcast::Sender<Event>,
    mut stop: watch::Receiver<bool>,
    options: ServerOptions,
) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    loop {
        let line = tokio::select! {
            _ = stop.changed() => return,
            read = tokio::time::timeout(
                Duration::from_millis(options.idle_timeout_ms),
                read_line(&mut reader, MAX_REQUEST_BYTES),
            ) => read,
        };
        let line = match line {
            Err(_) => {
                let idle = Response::error("Closing the control connection after it stayed idle.");
                let _ = write_timed(&mut write_half, &response_line(&idle)).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "control connection read failed");
                return;
            }
            Ok(Ok(Line::Closed)) => return,
            Ok(Ok(Line::TooLong)) => {
                let error = Response::error(format!(
                    "request too long: a request line may hold at most {MAX_REQUEST_BYTES} bytes"
                ));
                if write_timed(&mut write_half, &response_line(&error))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Ok(Ok(Line::Complete(line))) => line,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request = match parse_request(&line) {
            Ok(request) => request,
            Err(sentence) => {
                if write_timed(&mut write_half, &response_line(&Response::error(sentence)))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        tracing::debug!(command = request.name(), "control request");
        if request == Request::Events {
            stream_events(reader, write_half, handler, events.subscribe(), stop).await;
            return;
        }
        let response = handler.handle(request).await;
        if write_timed(&mut write_half, &response_line(&response))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Serve an `events` subscription: `{"ok":true}`, the `exists` dump, the end
/// marker, then every broadcast event until the client closes, the server
/// stops, or the subscriber lags (then a final error line says so).
async fn stream_events<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: BufReader<R>,
    mut writer: W,
    handler: Arc<dyn ControlHandler>,
    mut events: broadcast::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
) {
    // `events` was subscribed before the status is taken: a change racing
    // with the dump is sent again rather than lost.
    let status = match handler.handle(Request::Status).await {
        Response::Status(status) => status,
        Response::Error(sentence) => {
            let _ = write_timed(&mut writer, &response_line(&Response::Error(sentence))).await;
            return;
        }
        Response::Ok { .. } => {
            let error = Response::error("The daemon answered the status query without a status.");
            let _ = write_timed(&mut writer, &response_line(&error)).await;
            return;
        }
    };
    let mut head = response_line(&Response::ok());
    for event in exists_dump(&status, &Timestamp::now().to_string()) {
        head.extend_from_slice(&event_line(&event));
    }
    if write_timed(&mut writer, &head).await.is_err() {
        return;
    }
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            // Anything the client sends is ignored; EOF or an error ends it.
            read = tokio::io::AsyncReadExt::read(&mut reader, &mut scratch) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
            received = events.recv() => match received {
                Ok(event) => {
                    if write_timed(&mut writer, &event_line(&event)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "dropping a lagging event subscriber");
                    let error = Response::error(format!(
                        "event subscriber dropped: it fell {missed} events behind"
                    ));
                    let _ = write_timed(&mut writer, &response_line(&error)).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> Vec<Line> {
        let mut reader = BufReader::with_capacity(8, input);
        let mut out = Vec::new();
        loop {
            let line = read_line(&mut reader, limit).await.unwrap();
            let done = line == Line::Closed;
            out.push(line);
            if done {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn read_line_splits_lines_and_discards_only_the_over_long_one() {
        // Proves the bounded reader: lines split at '\n', an over-long line
        // becomes TooLong (and is skipped whole, across buffer refills), the
        // following line is intact, and a final unterminated line is kept.
        let got = lines(b"ab\n0123456789abcdef\ncd\nef", 8).await;
        assert_eq!(
            got,
            [
                Line::Complete(b"ab".to_vec()),
                Line::TooLong,
                Line::Complete(b"cd".to_vec()),
                Line::Complete(b"ef".to_vec()),
                Line::Closed
            ]
        );
    }

    #[tokio::test]
    async fn read_line_accepts_a_line_of_exactly_the_limit() {
        // Proves the limit counts the newline and is inclusive.
        let got = lines(b"1234567\n12345678\n", 8).await;
        assert_eq!(
            got,
            [
                Line::Complete(b"1234567".to_vec()),
                Line::TooLong,
                Line::Closed
            ]
        );
    }

    #[test]
    fn parse_request_names_the_problem() {
        // Proves malformed input yields a sentence, not a panic.
        assert!(parse_request(b"\xff\xfe")
            .unwrap_err()
            .contains("not UTF-8"));
        assert!(parse_request(b"{")
            .unwrap_err()
            .starts_with("malformed request"));
        assert_eq!(
            parse_request(b" {\"command\":\"status\"} "),
            Ok(Request::Status)
        );
    }
}
