//! The peer link: one TCP connection between the two nodes of a resource.
//!
//! Owns listening on this node's `replication` address, dialling the peer's
//! with exponential backoff, the link preamble that names the dialling node
//! (so that exactly one connection survives when both dial at once), and per
//! link a reader task (bytes → `wire::FrameDecoder` → [`LinkEvent::Frame`];
//! frames are numbered per connection, so a lost, repeated or reordered
//! frame drops the link) and a
//! writer task fed by two bounded lanes (application traffic before resync
//! traffic). It also declares a silent peer lost after the configured
//! timeout. It must not interpret messages: the engine does, through the
//! node's event loop, which is the only place that hands a link to it.
//!
//! Tie-break: the dialler sends `PREAMBLE_MAGIC`, its name, and waits for one
//! byte (accept / reject). A node accepts an incoming link only if it has no
//! link, wants one, and is not itself dialling while its name sorts first; a
//! node whose name sorts last abandons its own dial when it accepts. So when
//! both dial at once, the link dialled by the first-sorting node wins on both
//! sides, and the engine never sees two connections.
#![forbid(unsafe_code)]

pub mod lanes;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use crate::disk::aligned::BufPool;
use replicator_core::wire::{self, Message, WireError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

pub use lanes::{lane_of, Lane, Lanes, PushError};

/// First dial retry delay after a failure, in milliseconds.
pub const DIAL_BACKOFF_MIN_MS: u64 = 100;
/// Longest delay between dial attempts, in milliseconds.
pub const DIAL_BACKOFF_MAX_MS: u64 = 3_000;
/// How long connecting plus the preamble exchange may take, in milliseconds.
pub const PREAMBLE_TIMEOUT_MS: u64 = 2_000;
/// First bytes a dialler sends on a new link.
pub const PREAMBLE_MAGIC: [u8; 8] = *b"RPLXLINK";
/// Longest node name in a preamble, in bytes (config names are shorter).
pub const MAX_PREAMBLE_NAME_BYTES: usize = 64;
/// Preamble answer: the link is taken.
pub const PREAMBLE_ACCEPT: u8 = 1;
/// Preamble answer: the link is refused (another link wins).
pub const PREAMBLE_REJECT: u8 = 0;
/// How much the reader asks the socket for at a time, in bytes.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// The writer gathers frames into one socket write up to this many bytes.
pub const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Messages from the manager's helper tasks waiting for the manager.
pub const MANAGER_QUEUE_MESSAGES: usize = 16;

/// Identifies one link over the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

/// What the transport tells the node's event loop.
#[derive(Debug)]
pub enum LinkEvent {
    /// A new link is up; frames for it follow.
    Up(Link),
    /// A decoded frame.
    Frame { link: LinkId, msg: Message },
    /// The byte stream could not be decoded; `Down` follows.
    FrameError { link: LinkId, error: WireError },
    /// The link is gone (closed by either side, timed out, failed).
    Down { link: LinkId, reason: String },
}

/// The loop's handle on a link: queue frames, close it.
#[derive(Debug, Clone)]
pub struct Link {
    pub id: LinkId,
    /// The peer's socket address, for logs.
    pub peer_addr: String,
    shared: Arc<LinkShared>,
}

#[derive(Debug)]
struct LinkShared {
    lanes: Mutex<Lanes>,
    wake: Notify,
    /// Turns true when the link's tasks have ended (socket closed).
    ended: watch::Sender<bool>,
}

impl Link {
    fn new(id: LinkId, peer_addr: String) -> Link {
        Link {
            id,
            peer_addr,
            shared: Arc::new(LinkShared {
                lanes: Mutex::new(Lanes::default()),
                wake: Notify::new(),
                ended: watch::channel(false).0,
            }),
        }
    }

    /// Queues `msg` on its lane. A full lane is an error: the caller drops
    /// the link (the engine then marks what was not mirrored out of sync).
    pub fn send(&self, msg: Message) -> Result<(), PushError> {
        let r = self.lanes().push(msg);
        if r.is_ok() {
            self.shared.wake.notify_one();
        }
        r
    }

    /// Sends what is queued, then closes the connection.
    pub fn close(&self, reason: &str) {
        self.lanes().close(reason);
        self.shared.wake.notify_one();
    }

    /// Resolves when the link's socket is closed (after [`Link::close`],
    /// once the queued frames went out, or when the link failed).
    pub async fn ended(&self) {
        let mut rx = self.shared.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Bytes queued in the application lane (for back-pressure on clients).
    pub fn app_queued_bytes(&self) -> usize {
        self.lanes().app_bytes()
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, Lanes> {
        // A poisoned lock means a panic in a push or pop: a programmer error.
        self.shared.lanes.lock().expect("link lanes lock")
    }
}

/// Static settings of the transport of one node.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// This node's name (sent in the preamble).
    pub node: String,
    /// The peer's name (the only one accepted).
    pub peer: String,
    /// The peer's `replication` address (`host:port`).
    pub peer_addr: String,
    /// A link on which nothing arrived for this long is declared lost.
    pub peer_timeout_ms: u64,
}

/// Exponential dial backoff: [`DIAL_BACKOFF_MIN_MS`] doubling up to `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next_ms: u64,
    max_ms: u64,
}

impl Backoff {
    pub fn new(max_ms: u64) -> Backoff {
        Backoff {
            next_ms: DIAL_BACKOFF_MIN_MS,
            max_ms,
        }
    }

    /// The delay before the next attempt; doubles the one after.
    pub fn next_delay_ms(&mut self) -> u64 {
        let d = self.next_ms;
        self.next_ms = (self.next_ms * 2).min(self.max_ms);
        d
    }

    pub fn reset(&mut self) {
        self.next_ms = DIAL_BACKOFF_MIN_MS;
    }
}

enum ManagerMsg {
    Incoming(TcpStream, String),
    Dialed(Result<TcpStream, String>),
    LinkEnded(LinkId),
}

/// What one turn of the manager's wait produced.
enum Wake {
    Shutdown,
    Accepted(std::io::Result<(TcpStream, std::net::SocketAddr)>),
    Msg(ManagerMsg),
    DialDue,
    WantChanged,
}

/// Runs the transport of one node until `shutdown` turns true: accepts on
/// `listener`, dials the peer while `want` is true and no link is up, and
/// hands each link to `events` as [`LinkEvent::Up`].
pub async fn run(
    cfg: TransportConfig,
    listener: TcpListener,
    mut want: watch::Receiver<bool>,
    events: mpsc::Sender<LinkEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (mgr_tx, mut mgr_rx) = mpsc::channel::<ManagerMsg>(MANAGER_QUEUE_MESSAGES);
    let mut active: Option<LinkId> = None;
    let mut dialing = false;
    let mut abandon_dial = false;
    let mut backoff = Backoff::new(DIAL_BACKOFF_MAX_MS);
    let mut next_dial = Instant::now();
    let mut next_id = 1u64;
    let i_sort_first = cfg.node < cfg.peer;
    loop {
        let may_dial = !dialing && active.is_none() && *want.borrow();
        let wake = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => Wake::Shutdown,
            a = listener.accept() => Wake::Accepted(a),
            Some(m) = mgr_rx.recv() => Wake::Msg(m),
            _ = tokio::time::sleep_until(next_dial), if may_dial => Wake::DialDue,
            r = want.changed() => match r {
                Ok(()) => Wake::WantChanged,
                Err(_) => Wake::Shutdown,
            },
        };
        match wake {
            Wake::Shutdown => break,
            Wake::WantChanged => {}
            Wake::DialDue => {
                dialing = true;
                abandon_dial = false;
                let tx = mgr_tx.clone();
                let (addr, me) = (cfg.peer_addr.clone(), cfg.node.clone());
                tokio::spawn(async move {
                    let r = dial(&addr, &me).await;
                    let _ = tx.send(ManagerMsg::Dialed(r)).await;
                });
            }
            Wake::Accepted(Ok((stream, from))) => {
                let tx = mgr_tx.clone();
                tokio::spawn(async move {
                    match read_preamble(stream).await {
                        Ok((stream, name)) => {
                            let _ = tx.send(ManagerMsg::Incoming(stream, name)).await;
                        }
                        Err(e) => debug!(%from, "incoming link without a valid preamble: {e}"),
                    }
                });
            }
            Wake::Accepted(Err(e)) => {
                warn!("accepting a peer link failed: {e}");
                tokio::time::sleep(Duration::from_millis(DIAL_BACKOFF_MIN_MS)).await;
            }
            Wake::Msg(ManagerMsg::Incoming(stream, name)) => {
                let take = name == cfg.peer
                    && *want.borrow()
                    && active.is_none()
                    && !(dialing && i_sort_first);
                if name != cfg.peer {
                    warn!(node = %name, expected = %cfg.peer, "refusing a link from an unknown node");
                }
                let answer = if take {
                    PREAMBLE_ACCEPT
                } else {
                    PREAMBLE_REJECT
                };
                if stream.try_write(&[answer]).is_err() || !take {
                    continue;
                }
                if dialing {
                    abandon_dial = true;
                }
                backoff.reset();
                let id = LinkId(next_id);
                next_id += 1;
                active = Some(id);
                establish(id, stream, &cfg, &events, &mgr_tx).await;
            }
            Wake::Msg(ManagerMsg::Dialed(r)) => {
                dialing = false;
                match r {
                    Ok(stream) if !abandon_dial && active.is_none() && *want.borrow() => {
                        backoff.reset();
                        let id = LinkId(next_id);
                        next_id += 1;
                        active = Some(id);
                        establish(id, stream, &cfg, &events, &mgr_tx).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let delay = backoff.next_delay_ms();
                        debug!(peer = %cfg.peer_addr, delay_ms = delay, "dial failed: {e}");
                        next_dial = Instant::now() + Duration::from_millis(delay);
                    }
                }
                abandon_dial = false;
            }
            Wake::Msg(ManagerMsg::LinkEnded(id)) => {
                if active == Some(id) {
                    active = None;
                    next_dial = Instant::now() + Duration::from_millis(DIAL_BACKOFF_MIN_MS);
                }
            }
        }
    }
}

async fn establish(
    id: LinkId,
    stream: TcpStream,
    cfg: &TransportConfig,
    events: &mpsc::Sender<LinkEvent>,
    mgr: &mpsc::Sender<ManagerMsg>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        warn!("cannot set TCP_NODELAY on the peer link: {e}");
    }
    let peer_addr = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    info!(link = id.0, peer = %peer_addr, "peer link up");
    let link = Link::new(id, peer_addr.clone());
    let shared = link.shared.clone();
    // Up goes first so the loop knows the link before any of its frames.
    if events.send(LinkEvent::Up(link)).await.is_err() {
        return;
    }
    let timeout = Duration::from_millis(cfg.peer_timeout_ms);
    let (events, mgr) = (events.clone(), mgr.clone());
    let span = tracing::info_span!("peer_link", link = id.0, peer = %peer_addr);
    tokio::spawn(
        async move {
            let (r, w) = stream.into_split();
            let reason = tokio::select! {
                reason = read_loop(r, id, &events, timeout) => reason,
                reason = write_loop(w, &shared) => reason,
            };
            shared.lanes.lock().expect("link lanes lock").close(&reason);
            shared.ended.send_replace(true);
            info!("peer link down: {reason}");
            let _ = events.send(LinkEvent::Down { link: id, reason }).await;
            let _ = mgr.send(ManagerMsg::LinkEnded(id)).await;
        }
        .instrument(span),
    );
}

async fn dial(addr: &str, me: &str) -> Result<TcpStream, String> {
    let limit = Duration::from_millis(PREAMBLE_TIMEOUT_MS);
    let attempt = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let mut pre = Vec::with_capacity(PREAMBLE_MAGIC.len() + 1 + me.len());
        pre.extend_from_slice(&PREAMBLE_MAGIC);
        pre.push(u8::try_from(me.len()).map_err(|_| "node name too long".to_string())?);
        pre.extend_from_slice(me.as_bytes());
        s.write_all(&pre)
            .await
            .map_err(|e| format!("send preamble: {e}"))?;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer)
            .await
            .map_err(|e| format!("read preamble answer: {e}"))?;
        if answer[0] == PREAMBLE_ACCEPT {
            Ok(s)
        } else {
            Err("the peer keeps another link".to_string())
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| format!("no answer from {addr} within {PREAMBLE_TIMEOUT_MS} ms"))?
}

async fn read_preamble(mut s: TcpStream) -> Result<(TcpStream, String), String> {
    let limit = Duration::from_millis(PREAMBLE_TIMEOUT_MS);
    let read = async {
        let mut head = [0u8; PREAMBLE_MAGIC.len() + 1];
        s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        if head[..PREAMBLE_MAGIC.len()] != PREAMBLE_MAGIC {
            return Err("bad preamble magic".to_string());
        }
        let len = usize::from(head[PREAMBLE_MAGIC.len()]);
        if len == 0 || len > MAX_PREAMBLE_NAME_BYTES {
            return Err(format!("preamble name of {len} bytes"));
        }
        let mut name = vec![0u8; len];
        s.read_exact(&mut name).await.map_err(|e| e.to_string())?;
        let name = String::from_utf8(name).map_err(|_| "preamble name is not UTF-8".to_string())?;
        Ok(name)
    };
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(name)) => Ok((s, name)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no preamble within {PREAMBLE_TIMEOUT_MS} ms")),
    }
}

/// Reads frames until the socket ends, a frame is bad, the peer is silent
/// for `timeout`, or the loop is gone. Returns why the link ends.
async fn read_loop(
    mut r: OwnedReadHalf,
    id: LinkId,
    events: &mpsc::Sender<LinkEvent>,
    timeout: Duration,
) -> String {
    let pool = BufPool::shared();
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    // Frames are numbered per connection: a lost, repeated or reordered
    // frame is a decode error (the link drops and resyncs).
    let mut decoder = wire::FrameDecoder::new();
    loop {
        loop {
            let shape = wire::peek_frame(&buf);
            let big_data_at = shape.and_then(|sh| {
                sh.data_at
                    .filter(|&at| sh.frame_bytes - at >= ALIGNED_DATA_MIN_BYTES && buf.len() >= at)
                    .map(|at| (at, sh.frame_bytes - at))
            });
            let decoded = if let Some((at, data_bytes)) = big_data_at {
                // Large data goes into a pooled buffer of its own, aligned
                // for O_DIRECT (no bounce copy before the disk write, no
                // fresh allocation per frame), read straight from the
                // socket once what `buf` holds of it is copied.
                let head = buf[..at].to_vec();
                let mut data = pool.take(data_bytes);
                let have = (buf.len() - at).min(data_bytes);
                data.as_mut_slice()[..have].copy_from_slice(&buf[at..at + have]);
                buf.advance(at + have);
                if let Err(why) =
                    read_exact(&mut r, &mut data.as_mut_slice()[have..], timeout).await
                {
                    return why;
                }
                decoder.decode_parts(&head, data.freeze()).map(Some)
            } else {
                match shape {
                    Some(sh) if buf.len() >= sh.frame_bytes => {
                        // A whole frame is copied out, so `buf` keeps its
                        // memory for the next read: split off, every read
                        // would need a fresh 256 KiB buffer (an mmap, page
                        // faults and a munmap per frame).
                        let mut frame = BytesMut::from(&buf[..sh.frame_bytes]);
                        buf.advance(sh.frame_bytes);
                        decoder.decode(&mut frame)
                    }
                    // Incomplete, or a header the decoder refuses (it says why).
                    _ => decoder.decode(&mut buf),
                }
            };
            match decoded {
                Ok(Some(msg)) => {
                    if events
                        .send(LinkEvent::Frame { link: id, msg })
                        .await
                        .is_err()
                    {
                        return "the node is stopping".to_string();
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let reason = format!("undecodable frame from the peer: {error}");
                    let _ = events.send(LinkEvent::FrameError { link: id, error }).await;
                    return reason;
                }
            }
        }
        buf.reserve(READ_CHUNK_BYTES);
        if let Err(why) = read_some(&mut r, &mut buf, timeout).await {
            return why;
        }
    }
}

/// Data of at least this many bytes is received into a pooled buffer of its
/// own, aligned for O_DIRECT. Smaller data is copied out of the read buffer
/// with its frame (a small copy costs less than the extra read).
pub const ALIGNED_DATA_MIN_BYTES: usize = 64 * 1024;

/// One read into `buf`'s spare capacity, or why the link ends.
async fn read_some(
    r: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<usize, String> {
    read_outcome(
        tokio::time::timeout(timeout, r.read_buf(buf)).await,
        timeout,
    )
}

/// Fills `dst` from the socket, each read within `timeout`.
async fn read_exact(
    r: &mut OwnedReadHalf,
    dst: &mut [u8],
    timeout: Duration,
) -> Result<(), String> {
    let mut filled = 0;
    while filled < dst.len() {
        let read = tokio::time::timeout(timeout, r.read(&mut dst[filled..])).await;
        filled += read_outcome(read, timeout)?;
    }
    Ok(())
}

/// Bytes read, or why the link ends (silence, end of stream, error).
fn read_outcome(
    read: Result<std::io::Result<usize>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<usize, String> {
    match read {
        Err(_) => Err(format!(
            "the peer was silent for {} ms (timeout_ms)",
            timeout.as_millis()
        )),
        Ok(Ok(0)) => Err("the peer closed the connection".to_string()),
        Ok(Err(e)) => Err(format!("reading from the peer failed: {e}")),
        Ok(Ok(n)) => Ok(n),
    }
}

/// Part of a batch of frames: bytes encoded into the batch buffer, or bulk
/// data sent from where it is.
enum Segment {
    Encoded(std::ops::Range<usize>),
    Data(Bytes),
}

/// Data shorter than this is copied into the batch buffer: fewer iovecs,
/// and a small copy costs less than a segment.
const COPY_DATA_BELOW_BYTES: usize = 16 * 1024;

/// Writes queued frames, application lane first, until the lanes are closed
/// and drained (returns the close reason) or the socket fails.
async fn write_loop(mut w: OwnedWriteHalf, shared: &LinkShared) -> String {
    let mut buf = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    let mut batch: VecDeque<Message> = VecDeque::new();
    let mut segments: Vec<Segment> = Vec::new();
    // Numbers frames in the order they go on the wire.
    let mut encoder = wire::FrameEncoder::new();
    loop {
        let closed = {
            let mut lanes = shared.lanes.lock().expect("link lanes lock");
            let mut bytes = 0usize;
            while bytes < WRITE_BATCH_BYTES {
                match lanes.pop() {
                    Some(m) => {
                        bytes += lanes::approx_bytes(&m);
                        batch.push_back(m);
                    }
                    None => break,
                }
            }
            lanes.closed_reason()
        };
        if batch.is_empty() {
            if let Some(reason) = closed {
                let _ = w.shutdown().await;
                return reason;
            }
            shared.wake.notified().await;
            continue;
        }
        buf.clear();
        segments.clear();
        let mut encoded_from = 0;
        for m in batch.drain(..) {
            match encoder.encode_parts(&m, &mut buf) {
                Ok(Some(data)) if data.len() >= COPY_DATA_BELOW_BYTES => {
                    segments.push(Segment::Encoded(encoded_from..buf.len()));
                    segments.push(Segment::Data(data));
                    encoded_from = buf.len();
                }
                Ok(Some(data)) => buf.extend_from_slice(&data),
                Ok(None) => {}
                // The engine produced a frame the codec refuses: drop the
                // link (the engine resyncs) rather than send garbage.
                Err(e) => return format!("cannot encode a {} frame: {e}", m.name()),
            }
        }
        if encoded_from < buf.len() {
            segments.push(Segment::Encoded(encoded_from..buf.len()));
        }
        if let Err(e) = write_segments(&mut w, &buf, &segments).await {
            return format!("writing to the peer failed: {e}");
        }
    }
}

/// Writes every segment, in order, with vectored writes.
async fn write_segments(
    w: &mut OwnedWriteHalf,
    buf: &[u8],
    segments: &[Segment],
) -> std::io::Result<()> {
    let parts: Vec<&[u8]> = segments
        .iter()
        .map(|s| match s {
            Segment::Encoded(r) => &buf[r.clone()],
            Segment::Data(d) => &d[..],
        })
        .collect();
    nbd_frontend::vectored::write_all_slices(w, &parts).await
}

#[cfg(test)]
mod tests;
