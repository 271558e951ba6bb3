//! The tokio NBD server: accepts connections on TCP and Unix listeners,
//! negotiates each session, then pipelines its requests against a
//! [`BlockTarget`].
//!
//! Per connection, a reader decodes requests and spawns each into a bounded
//! in-flight window (so replies may go out of order, matched by cookie); a
//! mutex around the write half makes every reply go out whole. A WRITE
//! payload is received into the buffer the target lends
//! ([`BlockTarget::payload_buf`]) when it lends one. DISC and
//! shutdown wait for in-flight requests before closing. This module owns
//! sockets and tasks; it must not choose errno values or encode bytes itself
//! (that is [`crate::command`] and the codecs).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::command::{
    self, command_name, error_reply, execute, oversized_write, Command, Outgoing,
};
use crate::handshake::{ClientFlags, ClientOption, HandshakeError};
use crate::negotiate::{ExportInfo, Negotiation, SessionParams, Step};
use crate::proto::{ESHUTDOWN, MAX_PAYLOAD_BYTES};
use crate::target::{BlockTarget, PayloadBuf};
use crate::transmission::{Head, Incoming, RequestDecoder, TransmissionError};
use crate::vectored::write_in_turns;

/// Requests of one connection being executed or waiting to send their reply.
pub const MAX_IN_FLIGHT_REQUESTS_PER_CONN: usize = 64;
/// READ/WRITE payload bytes of one connection in flight, in KiB (128 MiB).
pub const MAX_IN_FLIGHT_PAYLOAD_KIB_PER_CONN: u32 = 128 * 1024;
/// How much the reader asks the socket for at a time in transmission.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// How much is asked for at a time during the handshake (options are small;
/// one is at most [`crate::proto::MAX_OPTION_BYTES`]).
pub const HANDSHAKE_READ_CHUNK_BYTES: usize = 4096;
/// Replies whose READ data is at most this long are copied into one buffer
/// and sent with one write.
pub const COALESCE_REPLY_BYTES: usize = 16 * 1024;
/// Pause after an accept error that is not about one connection (e.g. EMFILE).
pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;

const _: () = assert!(MAX_PAYLOAD_BYTES / 1024 < MAX_IN_FLIGHT_PAYLOAD_KIB_PER_CONN);

/// The one export a server offers. The default export name "" maps to it too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub description: String,
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Serves `export` over every listener until `shutdown` resolves; then stops
/// accepting, lets in-flight requests finish (requests already received but
/// not started get ESHUTDOWN), closes every connection and returns.
pub async fn serve<T: BlockTarget>(
    listeners: Vec<Listener>,
    export: ExportConfig,
    target: Arc<T>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    if listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "serve needs at least one listener",
        ));
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Every connection holds a clone of `conns_tx`; recv() returns None when
    // all of them are gone.
    let (conns_tx, mut conns_rx) = tokio::sync::mpsc::channel::<()>(1);
    let export = Arc::new(export);
    let mut accepts = JoinSet::new();
    for listener in listeners {
        accepts.spawn(accept_loop(
            listener,
            export.clone(),
            target.clone(),
            shutdown_rx.clone(),
            conns_tx.clone(),
        ));
    }
    drop(conns_tx);
    shutdown.await;
    info!("shutting down NBD server");
    let _ = shutdown_tx.send(true);
    while accepts.join_next().await.is_some() {}
    let _ = conns_rx.recv().await;
    info!("NBD server stopped");
    Ok(())
}

/// How a wait of the request loop ended.
enum Waited<T> {
    Done(T),
    /// The reply writer failed: no reply can be sent any more.
    Broken,
    /// The server is shutting down.
    Shutdown,
}

/// Waits for `f` unless the reply writer breaks or shutdown is signalled
/// first (checked in that order).
async fn unless_stopped<T>(
    broken: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
    f: impl Future<Output = T>,
) -> Waited<T> {
    tokio::select! {
        biased;
        _ = signalled(broken) => Waited::Broken,
        _ = signalled(shutdown) => Waited::Shutdown,
        t = f => Waited::Done(t),
    }
}

async fn signalled(rx: &mut watch::Receiver<bool>) {
    // A dropped sender also means: stop.
    let _ = rx.wait_for(|v| *v).await;
}

async fn accept_loop<T: BlockTarget>(
    listener: Listener,
    export: Arc<ExportConfig>,
    target: Arc<T>,
    mut shutdown: watch::Receiver<bool>,
    conns: tokio::sync::mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = signalled(&mut shutdown) => return,
            r = accept_one(&listener) => r,
        };
        match accepted {
            Ok(AcceptedStream::Tcp(stream, peer)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    warn!(%peer, "cannot set TCP_NODELAY: {e}");
                }
                spawn_connection(stream, peer, &export, &target, &shutdown, &conns);
            }
            Ok(AcceptedStream::Unix(stream, peer)) => {
                spawn_connection(stream, peer, &export, &target, &shutdown, &conns);
            }
            Err(e) if is_per_connection_error(&e) => debug!("accept: {e}"),
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::select! {
                    _ = signalled(&mut shutdown) => return,
                    _ = tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)) => {}
                }
            }
        }
    }
}

enum AcceptedStream {
    Tcp(tokio::net::TcpStream, String),
    Unix(tokio::net::UnixStream, String),
}

async fn accept_one(listener: &Listener) -> io::Result<AcceptedStream> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok(AcceptedStream::Tcp(s, peer.to_string()))
        }
        Listener::Unix(l) => {
            let (s, peer) = l.accept().await?;
            let peer = match peer.as_pathname() {
                Some(p) => format!("unix:{}", p.display()),
                None => "unix".to_owned(),
            };
            Ok(AcceptedStream::Unix(s, peer))
        }
    }
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

fn spawn_connection<S, T>(
    stream: S,
    peer: String,
    export: &Arc<ExportConfig>,
    target: &Arc<T>,
    shutdown: &watch::Receiver<bool>,
    conns: &tokio::sync::mpsc::Sender<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: BlockTarget,
{
    let span = tracing::info_span!("nbd_conn", peer = %peer);
    let export = export.clone();
    let target = target.clone();
    let shutdown = shutdown.clone();
    let guard = conns.clone();
    tokio::spawn(
        async move {
            info!("client connected");
            match serve_connection(stream, &export, target, shutdown).await {
                Ok(reason) => info!("client disconnected: {reason}"),
                Err(e) => info!("connection closed: {e}"),
            }
            drop(guard);
        }
        .instrument(span),
    );
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("transmission: {0}")]
    Transmission(#[from] TransmissionError),
}

/// Serves one accepted connection to its end; exposed so tests and other
/// transports (e.g. an inetd-style pipe) can drive a single session.
pub async fn serve_connection<S, T>(
    mut stream: S,
    export: &ExportConfig,
    target: Arc<T>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<String, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: BlockTarget,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut out = BytesMut::new();
    Negotiation::encode_greeting(&mut out);
    stream.write_all(&out).await?;
    let Some(flags) = read_frame(&mut stream, &mut buf, &mut shutdown, ClientFlags::decode).await?
    else {
        return Ok("closed during handshake".into());
    };
    let mut negotiation = Negotiation::new(ExportInfo {
        name: export.name.clone(),
        description: export.description.clone(),
        size_bytes: target.size_bytes(),
        flags: target.flags(),
    });
    negotiation.client_flags(flags)?;
    let params = loop {
        let Some(opt) =
            read_frame(&mut stream, &mut buf, &mut shutdown, ClientOption::decode).await?
        else {
            return Ok("closed during option negotiation".into());
        };
        debug!(option = opt.option, len_bytes = opt.data.len(), "option");
        out.clear();
        let step = negotiation.handle_option(opt, &mut out);
        stream.write_all(&out).await?;
        match step {
            Step::Continue => {}
            Step::Close(reason) => return Ok(reason),
            Step::Transmission(params) => break params,
        }
    };
    info!(
        structured = params.structured_replies,
        flags = params.transmission_flags,
        "negotiated, entering transmission"
    );
    transmission(stream, buf, params, target, shutdown).await
}

/// Reads until `decode` yields a frame; `None` on EOF or shutdown.
async fn read_frame<S, F, E, X>(
    stream: &mut S,
    buf: &mut BytesMut,
    shutdown: &mut watch::Receiver<bool>,
    decode: F,
) -> Result<Option<X>, ConnectionError>
where
    S: AsyncRead + Unpin,
    F: Fn(&mut BytesMut) -> Result<Option<X>, E>,
    ConnectionError: From<E>,
{
    loop {
        if let Some(x) = decode(buf)? {
            return Ok(Some(x));
        }
        buf.reserve(HANDSHAKE_READ_CHUNK_BYTES);
        let n = tokio::select! {
            biased;
            _ = signalled(shutdown) => return Ok(None),
            n = stream.read_buf(buf) => n?,
        };
        if n == 0 {
            return Ok(None);
        }
    }
}

/// A reply queued for the connection's writer, with the window and budget
/// permits of its request: they are given back once it is written, so the
/// budget bounds the replies waiting too.
struct Queued {
    out: Outgoing,
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// Replies the writer takes from its queue at once.
const MAX_REPLIES_PER_WRITE: usize = 64;
/// Replies written in one turn at most: one vectored write call, after
/// which the writer lets the connection's other tasks run.
const REPLIES_PER_TURN: usize = 16;
/// Reply bytes handed to one write call at most, for the same reason.
const WRITE_TURN_BYTES: usize = 1024 * 1024;

/// Writes the queued replies of one connection, whole and one after the
/// other, until the queue closes (then shuts the stream down) or a write
/// fails (then sets `broken`). Replies queued together go out together:
/// heads and small data are gathered in one buffer, large READ data is
/// sent from its own buffer, in one vectored write per turn, so a batch of
/// completions costs a syscall or two, not one each, and a large read
/// reply's head does not go out as a packet of its own.
///
/// A turn is at most [`REPLIES_PER_TURN`] replies and [`WRITE_TURN_BYTES`]
/// bytes; between turns the writer yields, so the requests the client sends
/// as soon as it has its first replies are read and their disk I/O started
/// while the rest go out. Without turns, a batch of 1 MiB read replies was
/// one writev of up to the socket buffer (4 MiB, ~1 ms of copying) with the
/// disk idle meanwhile, and the 32 reads of a depth-32 client travelled as
/// one batch through disk and CPU in turn (measurements: docs/benchmarks.md,
/// "Reply turns").
async fn reply_writer<S: AsyncWrite>(
    mut w: WriteHalf<S>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    broken: Arc<watch::Sender<bool>>,
) {
    let mut batch: Vec<Queued> = Vec::new();
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_REPLIES_PER_WRITE {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        for (i, turn) in batch.chunks(REPLIES_PER_TURN).enumerate() {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            if let Err(e) = write_batch(&mut w, turn, &mut buf).await {
                debug!("reply not sent: {e}");
                let _ = broken.send(true);
                return;
            }
        }
        // The permits go back now that the replies are written.
        batch.clear();
    }
    let _ = w.shutdown().await;
}

async fn write_batch<S: AsyncWrite>(
    w: &mut WriteHalf<S>,
    batch: &[Queued],
    buf: &mut BytesMut,
) -> io::Result<()> {
    // Heads and small data are copied into `buf`; large data is sent from
    // where it is. `runs` are the parts in wire order: a range of `buf`
    // (None) or large data.
    buf.clear();
    let mut runs: Vec<(std::ops::Range<usize>, Option<&Bytes>)> = Vec::new();
    let mut from = 0;
    for (head, data) in batch.iter().flat_map(|q| q.out.pieces()) {
        buf.extend_from_slice(head);
        if data.len() <= COALESCE_REPLY_BYTES {
            buf.extend_from_slice(data);
        } else {
            runs.push((from..buf.len(), None));
            runs.push((0..0, Some(data)));
            from = buf.len();
        }
    }
    runs.push((from..buf.len(), None));
    let parts: Vec<&[u8]> = runs
        .iter()
        .map(|(r, data)| data.map_or(&buf[r.clone()], |d| &d[..]))
        .collect();
    write_in_turns(w, &parts, WRITE_TURN_BYTES).await
}

/// Payload cost of a request in the byte budget, in KiB (rounded up):
/// the READ reply it will hold or the WRITE payload it already holds.
fn cost_kib(cmd: &Result<Command, command::Rejection>) -> u32 {
    match cmd {
        Ok(Command::Read { len_bytes, .. }) => len_bytes.div_ceil(1024),
        Ok(Command::Write { data, .. }) => (data.len() as u32).div_ceil(1024),
        _ => 0,
    }
}

async fn transmission<S, T>(
    stream: S,
    mut buf: BytesMut,
    params: SessionParams,
    target: Arc<T>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<String, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: BlockTarget,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let window = Arc::new(Semaphore::new(MAX_IN_FLIGHT_REQUESTS_PER_CONN));
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PAYLOAD_KIB_PER_CONN as usize));
    // Set by a request task whose reply could not be written.
    let (broken_tx, mut broken_rx) = watch::channel(false);
    let broken_tx = Arc::new(broken_tx);
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Queued>();
    let replies = tokio::spawn(reply_writer(writer, reply_rx, broken_tx.clone()).in_current_span());
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut decoder = RequestDecoder::new();
    let mut shutting_down = false;
    let mut result: Result<String, ConnectionError> = Ok("client closed the connection".into());

    loop {
        while let Some(joined) = tasks.try_join_next() {
            if let Err(e) = joined {
                warn!("request task failed: {e}");
            }
        }
        let incoming = match decoder.decode_head(&mut buf) {
            Ok(Some(Head::Whole(incoming))) => incoming,
            Ok(Some(Head::WritePayloadFollows(header))) => {
                let len = header.length as usize;
                let payload = if shutting_down {
                    // Answered ESHUTDOWN below if whole; no more reading.
                    if buf.len() < len {
                        result = Ok("server shutting down".into());
                        break;
                    }
                    buf.split_to(len).freeze()
                } else {
                    let lent = target.payload_buf(len);
                    let receiving = receive_payload(&mut reader, &mut buf, len, lent);
                    let received =
                        match unless_stopped(&mut broken_rx, &mut shutdown, receiving).await {
                            Waited::Done(r) => r,
                            Waited::Broken => {
                                result = Ok("reply could not be sent".into());
                                break;
                            }
                            Waited::Shutdown => {
                                result = Ok("server shutting down".into());
                                break;
                            }
                        };
                    match received {
                        Ok(Some(payload)) => payload,
                        Ok(None) => break,
                        Err(e) => {
                            result = Err(e.into());
                            break;
                        }
                    }
                };
                Incoming::Request { header, payload }
            }
            Ok(None) if shutting_down => {
                result = Ok("server shutting down".into());
                break;
            }
            Ok(None) => {
                buf.reserve(READ_CHUNK_BYTES);
                let n =
                    match unless_stopped(&mut broken_rx, &mut shutdown, reader.read_buf(&mut buf))
                        .await
                    {
                        Waited::Done(n) => n,
                        Waited::Broken => {
                            result = Ok("reply could not be sent".into());
                            break;
                        }
                        Waited::Shutdown => {
                            shutting_down = true;
                            continue;
                        }
                    };
                match n {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        result = Err(e.into());
                        break;
                    }
                }
            }
            Err(e) => {
                warn!("cannot parse request stream: {e}");
                result = Err(e.into());
                break;
            }
        };
        let (header, validated) = match incoming {
            Incoming::Request { header, payload } => {
                let v = command::validate(&header, payload, &params);
                (header, v)
            }
            Incoming::OversizedWrite { header } => (header, Err(oversized_write(&header))),
        };
        debug!(
            cookie = header.cookie,
            command = command_name(header.command),
            flags = header.flags,
            offset = header.offset,
            len_bytes = header.length,
            "request"
        );
        if matches!(validated, Ok(Command::Disconnect)) {
            result = Ok("client sent DISC".into());
            break;
        }
        let cost = cost_kib(&validated);
        let permits = if shutting_down {
            None
        } else {
            match unless_stopped(
                &mut broken_rx,
                &mut shutdown,
                acquire(&window, &budget, cost),
            )
            .await
            {
                Waited::Done(p) => Some(p),
                Waited::Broken => {
                    result = Ok("reply could not be sent".into());
                    break;
                }
                Waited::Shutdown => {
                    shutting_down = true;
                    None
                }
            }
        };
        let Some(permits) = permits else {
            let out = error_reply(&header, &params, ESHUTDOWN, "the server is shutting down");
            if reply_tx
                .send(Queued {
                    out,
                    _permits: None,
                })
                .is_err()
            {
                result = Ok("reply could not be sent".into());
                break;
            }
            continue;
        };
        let target = target.clone();
        let reply_tx = reply_tx.clone();
        tasks.spawn(
            async move {
                let out = match validated {
                    Ok(cmd) => execute(&*target, &header, &params, cmd).await,
                    Err(rej) => {
                        debug!(
                            cookie = header.cookie,
                            errno = rej.errno,
                            "rejected: {}",
                            rej.message
                        );
                        error_reply(&header, &params, rej.errno, &rej.message)
                    }
                };
                let queued = Queued {
                    out,
                    _permits: Some(permits),
                };
                if reply_tx.send(queued).is_err() {
                    debug!(cookie = header.cookie, "reply not sent: the writer stopped");
                }
            }
            .in_current_span(),
        );
    }
    // DISC, EOF, shutdown or a broken stream: finish what is in flight.
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            warn!("request task failed: {e}");
        }
    }
    // Every reply is queued: close the queue, let the writer finish.
    drop(reply_tx);
    if let Err(e) = replies.await {
        warn!("reply writer failed: {e}");
    }
    result
}

/// Receives the `len` payload bytes of a WRITE whose header was just
/// decoded: those already in `buf` first, then from the socket, straight
/// into `lent` if the target lent a buffer of that length, else into `buf`.
/// `None` if the stream ends first.
async fn receive_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    len: usize,
    lent: Option<Box<dyn PayloadBuf>>,
) -> io::Result<Option<Bytes>> {
    if let Some(mut dest) = lent {
        let slice = dest.as_mut_slice();
        if slice.len() == len {
            let have = buf.len().min(len);
            slice[..have].copy_from_slice(&buf[..have]);
            buf.advance(have);
            return match reader.read_exact(&mut slice[have..]).await {
                Ok(_) => Ok(Some(dest.freeze())),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
                Err(e) => Err(e),
            };
        }
    }
    while buf.len() < len {
        buf.reserve(len - buf.len());
        if reader.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
    Ok(Some(buf.split_to(len).freeze()))
}

async fn acquire(
    window: &Arc<Semaphore>,
    budget: &Arc<Semaphore>,
    cost_kib: u32,
) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
    let slot = window
        .clone()
        .acquire_owned()
        .await
        .expect("window semaphore is never closed");
    let bytes = budget
        .clone()
        .acquire_many_owned(cost_kib)
        .await
        .expect("budget semaphore is never closed");
    (slot, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vectored::testing::Recorder;

    fn reply(tag: u8, data_len: usize) -> Queued {
        Queued {
            out: Outgoing {
                head: BytesMut::from(&[tag; 16][..]),
                data: Bytes::from(vec![tag; data_len]),
                more: Vec::new(),
            },
            _permits: None,
        }
    }

    /// Queues `replies` before the writer starts, runs it over `rec` until
    /// the queue closes, and returns the bytes the replies should make.
    async fn write_queued(replies: Vec<Queued>, rec: &Recorder) -> Vec<u8> {
        let (_r, w) = tokio::io::split(rec.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let (broken, _broken_rx) = watch::channel(false);
        let mut expected = Vec::new();
        for q in replies {
            expected.extend_from_slice(&q.out.to_bytes());
            tx.send(q).unwrap();
        }
        drop(tx);
        reply_writer(w, rx, Arc::new(broken)).await;
        expected
    }

    #[tokio::test]
    async fn replies_queued_together_are_written_together_in_order() {
        // Proves reply batching: 33 replies queued before the writer runs
        // go out in one (vectored) write per turn of REPLIES_PER_TURN,
        // whole and in queue order, a large read's data included; every
        // piece of a fragmented reply goes out, in order.
        let mut queued = Vec::new();
        for tag in 0..32u8 {
            let mut q = reply(tag, if tag % 2 == 0 { 0 } else { 4096 });
            if tag == 7 {
                q.out.more = vec![
                    (BytesMut::from(&[70u8; 20][..]), Bytes::new()),
                    (
                        BytesMut::from(&[71u8; 16][..]),
                        Bytes::from(vec![72u8; 512]),
                    ),
                ];
            }
            queued.push(q);
        }
        queued.push(reply(99, COALESCE_REPLY_BYTES + 1));
        let rec = Recorder::new(usize::MAX);
        // A task ready before the writer starts runs between its turns.
        let between = tokio::spawn({
            let writes = rec.writes.clone();
            async move { writes.lock().unwrap().len() }
        });
        let expected = write_queued(queued, &rec).await;
        assert_eq!(between.await.unwrap(), 1, "ran after the first turn");
        let writes = rec.written();
        // 33 replies: turns of 16, 16 and 1, the large data in the last.
        assert_eq!(
            writes.len(),
            33usize.div_ceil(REPLIES_PER_TURN),
            "one write per turn, the large data included"
        );
        assert_eq!(writes.concat(), expected);
        let first: usize = (0..REPLIES_PER_TURN as u8)
            .map(|tag| {
                reply(tag, if tag % 2 == 0 { 0 } else { 4096 })
                    .out
                    .to_bytes()
                    .len()
            })
            .sum::<usize>()
            + 20
            + 16
            + 512;
        assert_eq!(
            writes[0].len(),
            first,
            "the first turn is the first 16 replies"
        );
    }

    #[tokio::test]
    async fn large_read_replies_go_out_in_turns() {
        // Proves a batch of large replies is written at most
        // WRITE_TURN_BYTES per call (so the connection's request tasks can
        // submit their disk reads in between), whole and in order.
        let rec = Recorder::new(usize::MAX);
        let expected = write_queued((0..3u8).map(|tag| reply(tag, 1 << 20)).collect(), &rec).await;
        let writes = rec.written();
        assert!(writes.iter().all(|c| c.len() <= WRITE_TURN_BYTES));
        assert_eq!(writes.len(), expected.len().div_ceil(WRITE_TURN_BYTES));
        assert_eq!(writes.concat(), expected);
    }
}
