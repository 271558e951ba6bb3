//! Test helpers: a server on a temporary Unix socket, a tiny hand-written
//! NBD client built on the crate's codecs, and a target wrapper that can
//! hold operations at a gate.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_frontend::handshake::*;
use nbd_frontend::mem::MemTarget;
use nbd_frontend::proto::*;
use nbd_frontend::transmission::*;
use nbd_frontend::{serve, BlockTarget, ExportConfig, Extent, Listener, TargetError, TargetFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};

/// Bound on every single wait in these tests.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub struct TestServer {
    pub path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start<T: BlockTarget>(target: Arc<T>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let (tx, rx) = oneshot::channel();
        let export = ExportConfig {
            name: "vm1".into(),
            description: "test volume".into(),
        };
        let handle = tokio::spawn(serve(
            vec![Listener::Unix(listener)],
            export,
            target,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            path,
            shutdown: Some(tx),
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// Signals shutdown and returns the task so the caller can await it.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let _ = self.shutdown.take().expect("not yet shut down").send(());
        self.handle.take().expect("running")
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///vm1?socket={}", self.path.display())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// One reply as the test client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
    pub message: String,
    pub extents: Vec<WireExtent>,
    /// Type of the first chunk (structured replies).
    pub chunk_type: Option<u16>,
    /// Types of every chunk, in order (structured replies).
    pub chunk_types: Vec<u16>,
}

pub struct Client {
    pub stream: UnixStream,
    buf: BytesMut,
    pub structured: bool,
    pub tflags: u16,
    pending_reads: HashMap<u64, u32>,
}

pub struct Options {
    pub structured: bool,
    pub meta: bool,
}

impl Client {
    pub async fn raw(path: &std::path::Path) -> UnixStream {
        within("connect", UnixStream::connect(path))
            .await
            .expect("connect")
    }

    /// Connects and sends client flags; the client is still negotiating.
    pub async fn negotiating(path: &std::path::Path) -> Self {
        let mut c = Self {
            stream: Self::raw(path).await,
            buf: BytesMut::new(),
            structured: false,
            tflags: 0,
            pending_reads: HashMap::new(),
        };
        let g = c
            .next(|b| Greeting::decode(b).map_err(|e| e.to_string()))
            .await;
        assert_eq!(g.handshake_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut out = BytesMut::new();
        ClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).encode(&mut out);
        c.stream.write_all(&out).await.unwrap();
        c
    }

    /// Connects, negotiates with GO and returns a client in transmission.
    pub async fn connect(path: &std::path::Path, o: Options) -> Self {
        let mut c = Self::negotiating(path).await;
        if o.structured {
            let r = c.option(OPT_STRUCTURED_REPLY, Bytes::new()).await;
            assert_eq!(r.last().unwrap().reply_type, REP_ACK);
            c.structured = true;
        }
        if o.meta {
            let data = MetaContextRequest {
                export_name: "vm1".into(),
                queries: vec![CONTEXT_BASE_ALLOCATION.into()],
            }
            .encode();
            let r = c.option(OPT_SET_META_CONTEXT, data).await;
            assert_eq!(r.len(), 2, "one context then ACK");
        }
        let data = InfoRequest {
            export_name: "vm1".into(),
            info_types: vec![],
        }
        .encode();
        let replies = c.option(OPT_GO, data).await;
        assert_eq!(replies.last().unwrap().reply_type, REP_ACK);
        for r in &replies {
            if let Ok(Info::Export {
                transmission_flags, ..
            }) = Info::parse(&r.data)
            {
                c.tflags = transmission_flags;
            }
        }
        c
    }

    pub async fn next<T>(
        &mut self,
        decode: impl Fn(&mut BytesMut) -> Result<Option<T>, String>,
    ) -> T {
        loop {
            if let Some(x) = decode(&mut self.buf).expect("server bytes decode") {
                return x;
            }
            let n = within("server bytes", self.stream.read_buf(&mut self.buf))
                .await
                .expect("read");
            assert!(n > 0, "server closed the connection unexpectedly");
        }
    }

    /// Sends an option and reads replies up to the final one.
    pub async fn option(&mut self, option: u32, data: Bytes) -> Vec<OptionReply> {
        let mut out = BytesMut::new();
        ClientOption { option, data }.encode(&mut out);
        self.stream.write_all(&out).await.unwrap();
        let mut replies = Vec::new();
        loop {
            let r = self
                .next(|b| OptionReply::decode(b).map_err(|e| e.to_string()))
                .await;
            let last = r.reply_type == REP_ACK || r.is_error();
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    /// Tells the client a READ with this cookie was sent by hand.
    pub fn expect_read(&mut self, cookie: u64, len: u32) {
        self.pending_reads.insert(cookie, len);
    }

    pub async fn send(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        if command == CMD_READ {
            self.pending_reads.insert(cookie, length);
        }
        let mut out = BytesMut::new();
        encode_request(
            &RequestHeader {
                flags,
                command,
                cookie,
                offset,
                length,
            },
            payload,
            &mut out,
        );
        within("send", self.stream.write_all(&out)).await.unwrap();
    }

    /// Reads one whole reply (every chunk of a structured one).
    pub async fn reply(&mut self) -> Reply {
        let pending = self.pending_reads.clone();
        let structured = self.structured;
        let r = self
            .next(move |b| {
                if b.len() < 4 {
                    return Ok(None);
                }
                let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
                if magic == STRUCTURED_REPLY_MAGIC {
                    assert!(structured, "chunk without structured replies");
                    // Our server writes a reply's chunks together: wait for
                    // all of them up to DONE, then take them.
                    let mut peek = b.clone();
                    let mut chunks = Vec::new();
                    loop {
                        let Some(c) = Chunk::decode(&mut peek).map_err(|e| e.to_string())? else {
                            return Ok(None);
                        };
                        let done = c.header.is_done();
                        chunks.push(c);
                        if done {
                            break;
                        }
                    }
                    let _ = b.split_to(b.len() - peek.len());
                    let mut r = Reply {
                        cookie: chunks[0].header.cookie,
                        error: 0,
                        data: vec![],
                        message: String::new(),
                        extents: vec![],
                        chunk_type: Some(chunks[0].header.chunk_type),
                        chunk_types: chunks.iter().map(|c| c.header.chunk_type).collect(),
                    };
                    for c in &chunks {
                        assert_eq!(
                            c.header.cookie, r.cookie,
                            "chunks of two replies interleaved"
                        );
                        match c.header.chunk_type {
                            // Our server sends a read's chunks in order.
                            REPLY_TYPE_OFFSET_DATA => r.data.extend_from_slice(&c.payload[8..]),
                            REPLY_TYPE_OFFSET_HOLE => {
                                let n = u32::from_be_bytes(c.payload[8..12].try_into().unwrap());
                                r.data.resize(r.data.len() + n as usize, 0);
                            }
                            REPLY_TYPE_ERROR => {
                                let (e, m) = parse_error_chunk(&c.payload).expect("error chunk");
                                r.error = e;
                                r.message = m;
                            }
                            REPLY_TYPE_BLOCK_STATUS => {
                                let (id, ext) =
                                    parse_block_status(&c.payload).expect("status chunk");
                                assert_eq!(id, CONTEXT_ID_BASE_ALLOCATION);
                                r.extents = ext;
                            }
                            REPLY_TYPE_NONE => {}
                            other => panic!("unexpected chunk type {other}"),
                        }
                    }
                    return Ok(Some(r));
                }
                if b.len() < SIMPLE_REPLY_HEADER_BYTES {
                    return Ok(None);
                }
                let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
                let error = u32::from_be_bytes(b[4..8].try_into().unwrap());
                let data_len = match pending.get(&cookie) {
                    Some(len) if error == 0 => *len as usize,
                    _ => 0,
                };
                if b.len() < SIMPLE_REPLY_HEADER_BYTES + data_len {
                    return Ok(None);
                }
                let h = SimpleReply::decode(b).map_err(|e| e.to_string())?.unwrap();
                let data = b.split_to(data_len).to_vec();
                Ok(Some(Reply {
                    cookie: h.cookie,
                    error: h.error,
                    data,
                    message: String::new(),
                    extents: vec![],
                    chunk_type: None,
                    chunk_types: Vec::new(),
                }))
            })
            .await;
        self.pending_reads.remove(&r.cookie);
        r
    }

    /// Sends a request and waits for its reply (no other request in flight).
    pub async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        self.send(command, flags, 42, offset, length, payload).await;
        let r = self.reply().await;
        assert_eq!(r.cookie, 42);
        r
    }

    /// True once the server has closed the connection (reads EOF).
    pub async fn closed(&mut self) -> bool {
        let mut scratch = [0u8; 64];
        match within("close", self.stream.read(&mut scratch)).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => true,
        }
    }
}

/// A MemTarget wrapper that can hold reads (all, or one offset) and writes
/// at a gate, count started operations, and refuse fast zeroing.
pub struct GatedTarget {
    pub inner: MemTarget,
    open: watch::Sender<bool>,
    /// Reads at this offset wait for the gate; `None`: every read and write waits.
    pub gated_read_offset: Option<u64>,
    pub started: AtomicUsize,
    pub not_fast: bool,
}

impl GatedTarget {
    pub fn new(size_bytes: u64, gated_read_offset: Option<u64>) -> Self {
        Self {
            inner: MemTarget::new(size_bytes),
            open: watch::channel(false).0,
            gated_read_offset,
            started: AtomicUsize::new(0),
            not_fast: false,
        }
    }

    pub fn open_gate(&self) {
        self.open.send_replace(true);
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    async fn wait_gate(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

impl BlockTarget for GatedTarget {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn flags(&self) -> TargetFlags {
        self.inner.flags()
    }
    async fn read(&self, offset: u64, len_bytes: u32) -> Result<Bytes, TargetError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if self.gated_read_offset.is_none_or(|o| o == offset) {
            self.wait_gate().await;
        }
        self.inner.read(offset, len_bytes).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), TargetError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        if self.gated_read_offset.is_none() {
            self.wait_gate().await;
        }
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), TargetError> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len_bytes: u64, fua: bool) -> Result<(), TargetError> {
        self.inner.trim(offset, len_bytes, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len_bytes: u64,
        may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), TargetError> {
        if fast && self.not_fast {
            return Err(TargetError::NotFast);
        }
        self.inner
            .write_zeroes(offset, len_bytes, may_punch, fast, fua)
            .await
    }
    async fn cache(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        self.inner.cache(offset, len_bytes).await
    }
    async fn block_status(&self, offset: u64, len_bytes: u64) -> Result<Vec<Extent>, TargetError> {
        self.inner.block_status(offset, len_bytes).await
    }
}
