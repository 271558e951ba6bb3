//! The client side of the control socket, used by `replctl` (and tests).
//!
//! Owns connecting, sending one request and reading one bounded response or
//! event line. Must not render anything for humans or decide exit codes:
//! that is `replctl`'s job.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::protocol::{Event, Request, Response, MAX_RESPONSE_BYTES};

/// How long a request may wait for its response by default, in
/// milliseconds. Commands are carried out promptly by the daemon (a resync
/// is started, not waited for), so a minute means the daemon is stuck.
pub const REQUEST_TIMEOUT_MS: u64 = 60_000;

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (no file, refused, permission denied).
    #[error("cannot connect to {path}: {source}")]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The connection broke while sending or receiving.
    #[error("the control connection to {path} broke: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The daemon closed the connection without answering.
    #[error("the daemon at {path} closed the connection without answering")]
    Closed {
        /// The socket path.
        path: PathBuf,
    },
    /// The daemon did not answer in time.
    #[error("the daemon at {path} did not answer within {timeout_ms} ms")]
    TimedOut {
        /// The socket path.
        path: PathBuf,
        /// The limit that passed.
        timeout_ms: u64,
    },
    /// The daemon's answer was not valid protocol.
    #[error("the daemon at {path} sent an answer that is not valid: {reason}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
}

/// A connection to a daemon's control socket.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl ControlClient {
    /// Connect to the control socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Unreachable {
                    path: path.to_owned(),
                    source,
                })?;
        let (read_half, writer) = stream.into_split();
        Ok(ControlClient {
            path: path.to_owned(),
            timeout: Duration::from_millis(REQUEST_TIMEOUT_MS),
            reader: BufReader::new(read_half),
            writer,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Change how long [`Self::request`] waits for an answer (default
    /// [`REQUEST_TIMEOUT_MS`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn io_error(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn protocol_error(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let mut line =
            serde_json::to_vec(request).map_err(|e| self.protocol_error(e.to_string()))?;
        line.push(b'\n');
        let written = async {
            self.writer.write_all(&line).await?;
            self.writer.flush().await
        }
        .await;
        written.map_err(|e| self.io_error(e))
    }

    /// Read one line of at most [`MAX_RESPONSE_BYTES`]; `None` at EOF.
    async fn read_line(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_RESPONSE_BYTES).unwrap_or(u64::MAX);
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| self.io_error(e))?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') && n >= MAX_RESPONSE_BYTES {
            return Err(
                self.protocol_error(format!("a line is longer than {MAX_RESPONSE_BYTES} bytes"))
            );
        }
        Ok(Some(line))
    }

    async fn read_response(&mut self) -> Result<Response, ClientError> {
        let line = self.read_line().await?.ok_or_else(|| ClientError::Closed {
            path: self.path.clone(),
        })?;
        serde_json::from_slice(&line).map_err(|e| self.protocol_error(e.to_string()))
    }

    /// Send `request` and wait for its response. Use [`Self::subscribe`]
    /// for [`Request::Events`].
    pub async fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        let timeout = self.timeout;
        let exchange = async {
            self.send(request).await?;
            self.read_response().await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::TimedOut {
                path: self.path.clone(),
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Subscribe to events. `Ok(Err(sentence))` when the daemon refused.
    pub async fn subscribe(mut self) -> Result<Result<EventStream, String>, ClientError> {
        match self.request(&Request::Events).await? {
            Response::Ok { .. } => Ok(Ok(EventStream { client: self })),
            Response::Error(sentence) => Ok(Err(sentence)),
            Response::Status(_) => Err(self.protocol_error("a status answer to an events request")),
        }
    }
}

/// The event lines of a subscription.
#[derive(Debug)]
pub struct EventStream {
    client: ControlClient,
}

/// One line of an event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// An event.
    Event(Event),
    /// The daemon ended the stream with an error (e.g. the subscriber lagged).
    Ended(String),
}

impl EventStream {
    /// The next event; `Ok(None)` when the daemon closed the stream.
    pub async fn next(&mut self) -> Result<Option<StreamItem>, ClientError> {
        Ok(self.next_line().await?.map(|(_, item)| item))
    }

    /// The raw next line as text (for `replctl events`, which prints lines
    /// as the daemon wrote them after checking they parse).
    pub async fn next_line(&mut self) -> Result<Option<(String, StreamItem)>, ClientError> {
        let Some(line) = self.client.read_line().await? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if let Ok(event) = serde_json::from_str::<Event>(&text) {
            return Ok(Some((text, StreamItem::Event(event))));
        }
        match serde_json::from_str::<Response>(&text) {
            Ok(Response::Error(sentence)) => Ok(Some((text, StreamItem::Ended(sentence)))),
            _ => Err(self
                .client
                .protocol_error(format!("an event line that is not an event: {text}"))),
        }
    }
}
