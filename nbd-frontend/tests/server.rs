//! The tokio server over a real Unix socket against in-memory targets,
//! driven by the hand-written client in `common`: data round trips,
//! pipelining, DISC, every bad-input row, oversized and truncated writes,
//! many connections, and shutdown.

mod common;

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use common::*;
use nbd_frontend::mem::MemTarget;
use nbd_frontend::proto::*;
use nbd_frontend::server::MAX_IN_FLIGHT_REQUESTS_PER_CONN;
use nbd_frontend::BlockTarget;
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 1 << 20;

fn plain() -> Options {
    Options {
        structured: false,
        meta: false,
    }
}
fn sr() -> Options {
    Options {
        structured: true,
        meta: true,
    }
}

#[tokio::test]
async fn write_then_read_round_trips_with_simple_and_structured_replies() {
    // Proves data written is read back, with simple replies and with one OFFSET_DATA chunk (DF set).
    let target = Arc::new(MemTarget::new(SIZE));
    let srv = TestServer::start(target.clone()).await;
    for (opts, df) in [(plain(), 0), (sr(), CMD_FLAG_DF)] {
        let mut c = Client::connect(&srv.path, opts).await;
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let r = c
            .call(CMD_WRITE, CMD_FLAG_FUA, 1000, data.len() as u32, &data)
            .await;
        assert_eq!(r.error, 0);
        let r = c
            .call(CMD_READ, df | CMD_FLAG_FUA, 1000, data.len() as u32, &[])
            .await;
        assert_eq!(r.error, 0);
        assert_eq!(r.data, data);
        if c.structured {
            assert_eq!(r.chunk_type, Some(REPLY_TYPE_OFFSET_DATA));
        }
        assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await.error, 0);
    }
    assert_eq!(target.read_now(1000, 3), vec![0, 1, 2]);
    assert!(target.flush_count() >= 2);
}

#[tokio::test]
async fn large_read_of_max_payload_is_served_whole() {
    // Proves a 32 MiB read (the advertised maximum) is answered with all its
    // data: the never-written part as an OFFSET_HOLE chunk, then the data.
    let target = Arc::new(MemTarget::new(64 << 20));
    target.write_now((32 << 20) - 1, b"z");
    let srv = TestServer::start(target).await;
    let mut c = Client::connect(&srv.path, sr()).await;
    let r = c.call(CMD_READ, 0, 0, MAX_PAYLOAD_BYTES, &[]).await;
    assert_eq!(r.error, 0);
    assert_eq!(r.data.len(), MAX_PAYLOAD_BYTES as usize);
    assert_eq!(r.data[r.data.len() - 1], b'z');
    assert_eq!(
        r.chunk_types,
        vec![REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_OFFSET_DATA]
    );
}

#[tokio::test]
async fn pipelined_requests_complete_out_of_order() {
    // Proves a slow request does not hold back a later one: replies come by cookie, out of order.
    let target = Arc::new(GatedTarget::new(SIZE, Some(0)));
    target.inner.write_now(0, b"first");
    target.inner.write_now(4096, b"second");
    let srv = TestServer::start(target.clone()).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    c.send(CMD_READ, 0, 1, 0, 5, &[]).await;
    c.send(CMD_READ, 0, 2, 4096, 6, &[]).await;
    let r = c.reply().await;
    assert_eq!((r.cookie, r.data.as_slice()), (2, &b"second"[..]));
    target.open_gate();
    let r = c.reply().await;
    assert_eq!((r.cookie, r.data.as_slice()), (1, &b"first"[..]));
}

#[tokio::test]
async fn disc_waits_for_outstanding_requests_then_closes() {
    // Proves DISC does not drop an in-flight write: its reply arrives, then the server closes.
    let target = Arc::new(GatedTarget::new(SIZE, None));
    let srv = TestServer::start(target.clone()).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    c.send(CMD_WRITE, 0, 7, 0, 4, b"data").await;
    c.send(CMD_DISC, 0, 8, 0, 0, &[]).await;
    wait_until("write started", || target.started() == 1).await;
    target.open_gate();
    let r = c.reply().await;
    assert_eq!((r.cookie, r.error), (7, 0));
    assert!(c.closed().await);
    assert_eq!(target.inner.read_now(0, 4), b"data");
}

#[tokio::test]
async fn bad_input_rows_get_the_spec_errno_without_disconnect() {
    // Proves each row of the bad-input table over the wire, and that the connection survives all of them.
    let target = Arc::new(MemTarget::new(SIZE));
    let srv = TestServer::start(target.clone()).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    let cases: &[(&str, u16, u16, u64, u32, u32)] = &[
        ("unknown command", 42, 0, 0, 0, EINVAL),
        ("unknown flag", CMD_READ, 1 << 12, 0, 1, EINVAL),
        (
            "flag invalid for command",
            CMD_FLUSH,
            CMD_FLAG_NO_HOLE,
            0,
            0,
            EINVAL,
        ),
        (
            "DF without structured replies",
            CMD_READ,
            CMD_FLAG_DF,
            0,
            1,
            EINVAL,
        ),
        ("write past end", CMD_WRITE, 0, SIZE - 1, 2, ENOSPC),
        ("zeroes past end", CMD_WRITE_ZEROES, 0, SIZE, 1, ENOSPC),
        ("read past end", CMD_READ, 0, SIZE, 1, EINVAL),
        ("trim past end", CMD_TRIM, 0, SIZE - 1, 2, EINVAL),
        ("cache past end", CMD_CACHE, 0, SIZE, 1, EINVAL),
        ("offset overflow", CMD_READ, 0, u64::MAX, 1, EINVAL),
        (
            "read over max payload",
            CMD_READ,
            0,
            0,
            MAX_PAYLOAD_BYTES + 1,
            EINVAL,
        ),
        (
            "block status without context",
            CMD_BLOCK_STATUS,
            0,
            0,
            1,
            EINVAL,
        ),
        (
            "trim longer than max payload, past end",
            CMD_TRIM,
            0,
            0,
            u32::MAX,
            EINVAL,
        ),
        ("zero-length read", CMD_READ, 0, 0, 0, 0),
        ("zero-length write", CMD_WRITE, 0, 0, 0, 0),
        ("zero-length trim", CMD_TRIM, 0, 0, 0, 0),
        ("zero-length zeroes", CMD_WRITE_ZEROES, 0, 0, 0, 0),
        ("FUA on read", CMD_READ, CMD_FLAG_FUA, 0, 1, 0),
        ("FUA on cache", CMD_CACHE, CMD_FLAG_FUA, 0, 4096, 0),
        (
            "zeroes with NO_HOLE",
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            0,
            4096,
            0,
        ),
        ("trim within range", CMD_TRIM, CMD_FLAG_FUA, 0, 4096, 0),
    ];
    for &(what, cmd, flags, offset, len, want) in cases {
        let payload = if cmd == CMD_WRITE {
            vec![1u8; len as usize]
        } else {
            vec![]
        };
        let r = c.call(cmd, flags, offset, len, &payload).await;
        assert_eq!(r.error, want, "{what}");
    }
    assert_eq!(
        target.write_count(),
        2,
        "only the NO_HOLE zeroes and the trim reached the target"
    );
}

#[tokio::test]
async fn structured_errors_use_error_chunks_with_a_message() {
    // Proves READ/BLOCK_STATUS errors with structured replies are ERROR chunks carrying text,
    // zero-length reads are a NONE chunk, and BLOCK_STATUS past end / of 0 bytes is EINVAL.
    let target = Arc::new(MemTarget::new(SIZE));
    let srv = TestServer::start(target).await;
    let mut c = Client::connect(&srv.path, sr()).await;
    let r = c.call(CMD_READ, CMD_FLAG_DF, SIZE, 1, &[]).await;
    assert_eq!((r.error, r.chunk_type), (EINVAL, Some(REPLY_TYPE_ERROR)));
    assert!(r.message.contains("past the end"), "{}", r.message);
    let r = c.call(CMD_READ, 0, 0, 0, &[]).await;
    assert_eq!((r.error, r.chunk_type), (0, Some(REPLY_TYPE_NONE)));
    for (offset, len) in [(SIZE, 1), (0, 0)] {
        let r = c.call(CMD_BLOCK_STATUS, 0, offset, len, &[]).await;
        assert_eq!((r.error, r.chunk_type), (EINVAL, Some(REPLY_TYPE_ERROR)));
    }
}

#[tokio::test]
async fn block_status_reports_data_and_holes_and_honours_req_one() {
    // Proves BLOCK_STATUS returns base:allocation extents within the request, and REQ_ONE gives one.
    let target = Arc::new(MemTarget::new(SIZE));
    target.write_now(8192, &[9u8; 4096]);
    let srv = TestServer::start(target).await;
    let mut c = Client::connect(&srv.path, sr()).await;
    let r = c.call(CMD_BLOCK_STATUS, 0, 0, 16384, &[]).await;
    assert_eq!(r.error, 0);
    let got: Vec<(u32, u32)> = r.extents.iter().map(|e| (e.length, e.flags)).collect();
    assert_eq!(
        got,
        vec![
            (8192, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            (4096, STATE_HOLE | STATE_ZERO)
        ]
    );
    let r = c
        .call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 16384, &[])
        .await;
    assert_eq!(r.extents.len(), 1);
}

#[tokio::test]
async fn read_only_export_refuses_modifications_with_eperm() {
    // Proves WRITE/TRIM/WRITE_ZEROES on a read-only export get EPERM (payload still consumed) and reads work.
    let mut f = MemTarget::new(0).flags();
    f.read_only = true;
    let target = Arc::new(MemTarget::with_flags(SIZE, f));
    let srv = TestServer::start(target).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    assert_ne!(c.tflags & TFLAG_READ_ONLY, 0);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 3, b"abc").await.error, EPERM);
    assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]).await.error, EPERM);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).await.error, EPERM);
    assert_eq!(c.call(CMD_READ, 0, 0, 3, &[]).await.data, vec![0, 0, 0]);
}

#[tokio::test]
async fn fast_zero_that_is_not_fast_gets_enotsup() {
    // Proves FAST_ZERO refused by the target maps to ENOTSUP (and only there).
    let mut t = GatedTarget::new(SIZE, Some(u64::MAX));
    t.not_fast = true;
    let srv = TestServer::start(Arc::new(t)).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    assert_ne!(c.tflags & TFLAG_SEND_FAST_ZERO, 0);
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096, &[])
            .await
            .error,
        ENOTSUP
    );
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).await.error, 0);
}

#[tokio::test]
async fn oversized_write_is_drained_answered_einval_and_next_request_parsed() {
    // Proves a WRITE over 32 MiB is read and discarded, answered EINVAL, nothing is written,
    // and the request after it is still parsed in sync.
    let target = Arc::new(MemTarget::new(64 << 20));
    let srv = TestServer::start(target.clone()).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    let len = MAX_PAYLOAD_BYTES + 4096;
    let payload = vec![0x5au8; len as usize];
    c.send(CMD_WRITE, 0, 1, 0, len, &payload).await;
    c.send(CMD_READ, 0, 2, 0, 4, &[]).await;
    let r = c.reply().await;
    assert_eq!((r.cookie, r.error), (1, EINVAL));
    let r = c.reply().await;
    assert_eq!((r.cookie, r.error, r.data), (2, 0, vec![0, 0, 0, 0]));
    assert_eq!(target.write_count(), 0);
}

#[tokio::test]
async fn write_above_drain_limit_closes_the_connection() {
    // Proves a DoS-sized WRITE header makes the server hang up instead of reading it.
    let target = Arc::new(MemTarget::new(SIZE));
    let srv = TestServer::start(target).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    c.send(
        CMD_WRITE,
        0,
        1,
        0,
        (MAX_DRAINED_PAYLOAD_BYTES + 1) as u32,
        &[],
    )
    .await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn bad_request_magic_closes_the_connection() {
    // Proves an unparseable request stream is closed, not guessed at.
    let srv = TestServer::start(Arc::new(MemTarget::new(SIZE))).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    c.stream.write_all(&[0u8; 28]).await.unwrap();
    assert!(c.closed().await);
}

/// Sends an 8 KiB WRITE with only half its payload, then closes.
async fn vanish_mid_write(mut c: Client) {
    let mut out = BytesMut::new();
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(0);
    out.put_u16(CMD_WRITE);
    out.put_u64(1);
    out.put_u64(0);
    out.put_u32(8192);
    out.put_slice(&[0xffu8; 4096]);
    c.stream.write_all(&out).await.unwrap();
}

#[tokio::test]
async fn truncated_write_applies_nothing_and_other_connections_are_unaffected() {
    // Proves a client vanishing mid-payload writes nothing and another connection keeps working.
    let target = Arc::new(MemTarget::new(SIZE));
    let srv = TestServer::start(target.clone()).await;
    let mut other = Client::connect(&srv.path, sr()).await;
    let c = Client::connect(&srv.path, plain()).await;
    vanish_mid_write(c).await;
    let r = other.call(CMD_READ, 0, 0, 8192, &[]).await;
    assert_eq!(r.data, vec![0u8; 8192]);
    assert_eq!(other.call(CMD_WRITE, 0, 0, 2, b"ok").await.error, 0);
    assert_eq!(
        target.write_count(),
        1,
        "only the other connection's write was applied"
    );
    assert_eq!(target.read_now(0, 3), b"ok\0");
}

#[tokio::test]
async fn writes_on_one_connection_are_visible_on_another_after_flush() {
    // Proves several connections share one export (multi-conn is advertised for MemTarget).
    let target = Arc::new(MemTarget::new(SIZE));
    let srv = TestServer::start(target).await;
    let mut a = Client::connect(&srv.path, plain()).await;
    let mut b = Client::connect(&srv.path, sr()).await;
    assert_ne!(a.tflags & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(a.call(CMD_WRITE, 0, 512, 5, b"hello").await.error, 0);
    assert_eq!(b.call(CMD_FLUSH, 0, 0, 0, &[]).await.error, 0);
    assert_eq!(b.call(CMD_READ, 0, 512, 5, &[]).await.data, b"hello");
}

#[tokio::test]
async fn unknown_client_flags_close_and_unknown_options_keep_negotiating() {
    // Proves over the socket: an unknown client flag closes; ERR_UNSUP leaves negotiation usable.
    let srv = TestServer::start(Arc::new(MemTarget::new(SIZE))).await;
    let mut s = Client::raw(&srv.path).await;
    let mut greeting = [0u8; GREETING_BYTES];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut greeting)
        .await
        .unwrap();
    s.write_all(&0x8000_0001u32.to_be_bytes()).await.unwrap();
    let mut scratch = [0u8; 8];
    let n = within("close", tokio::io::AsyncReadExt::read(&mut s, &mut scratch))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "server must close after unknown client flags");

    let mut c = Client::negotiating(&srv.path).await;
    let r = c
        .option(OPT_PEEK_EXPORT, bytes::Bytes::from_static(b"xyz"))
        .await;
    assert_eq!(r[0].reply_type, REP_ERR_UNSUP);
    let r = c.option(OPT_STARTTLS, bytes::Bytes::new()).await;
    assert_eq!(r[0].reply_type, REP_ERR_POLICY);
    let r = c.option(OPT_ABORT, bytes::Bytes::new()).await;
    assert_eq!(r[0].reply_type, REP_ACK);
    assert!(c.closed().await);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_refuses_queued_ones_and_returns() {
    // Proves shutdown lets the full in-flight window finish, answers the request waiting for a
    // slot with ESHUTDOWN, closes the connection and makes serve() return.
    let target = Arc::new(GatedTarget::new(SIZE, None));
    let mut srv = TestServer::start(target.clone()).await;
    let mut c = Client::connect(&srv.path, plain()).await;
    let n = MAX_IN_FLIGHT_REQUESTS_PER_CONN as u64 + 1;
    // One write, so the server reads every request before the window fills.
    let mut batch = BytesMut::new();
    for cookie in 0..n {
        nbd_frontend::transmission::encode_request(
            &nbd_frontend::transmission::RequestHeader {
                flags: 0,
                command: CMD_READ,
                cookie,
                offset: cookie * 512,
                length: 512,
            },
            &[],
            &mut batch,
        );
        c.expect_read(cookie, 512);
    }
    c.stream.write_all(&batch).await.unwrap();
    wait_until("window full", || {
        target.started() == MAX_IN_FLIGHT_REQUESTS_PER_CONN
    })
    .await;
    let server = srv.begin_shutdown();
    let r = c.reply().await;
    assert_eq!(
        (r.cookie, r.error),
        (n - 1, ESHUTDOWN),
        "the request beyond the window is refused"
    );
    target.open_gate();
    for _ in 0..MAX_IN_FLIGHT_REQUESTS_PER_CONN {
        let r = c.reply().await;
        assert_eq!(r.error, 0);
        assert_eq!(r.data.len(), 512);
    }
    assert_eq!(
        target.started(),
        MAX_IN_FLIGHT_REQUESTS_PER_CONN,
        "window never exceeded"
    );
    assert!(c.closed().await);
    within("serve returns", server).await.unwrap().unwrap();
    assert!(
        tokio::net::UnixStream::connect(&srv.path).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn tcp_listener_serves_export_name_clients_with_zero_padding() {
    // Proves the TCP listener path: an old-style EXPORT_NAME client without NO_ZEROES gets the
    // 134-byte reply, then simple-reply transmission works; serve() with no listener is an error.
    use nbd_frontend::handshake::{ClientFlags, ClientOption, ExportNameReply};
    use nbd_frontend::transmission::{encode_request, RequestHeader, SimpleReply};
    use nbd_frontend::{serve, ExportConfig, Listener};
    use tokio::io::AsyncReadExt;

    let export = ExportConfig {
        name: "vm1".into(),
        description: String::new(),
    };
    let target = Arc::new(MemTarget::new(SIZE));
    assert!(serve(Vec::new(), export.clone(), target.clone(), async {})
        .await
        .is_err());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        vec![Listener::Tcp(listener)],
        export,
        target.clone(),
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut s = within("tcp connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let mut greeting = [0u8; GREETING_BYTES];
    within("greeting", s.read_exact(&mut greeting))
        .await
        .unwrap();
    let mut out = BytesMut::new();
    ClientFlags(FLAG_C_FIXED_NEWSTYLE).encode(&mut out);
    ClientOption {
        option: OPT_EXPORT_NAME,
        data: bytes::Bytes::new(),
    }
    .encode(&mut out);
    encode_request(
        &RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 3,
            offset: 10,
            length: 3,
        },
        b"tcp",
        &mut out,
    );
    s.write_all(&out).await.unwrap();
    let mut reply = vec![0u8; 134 + 16];
    within("replies", s.read_exact(&mut reply)).await.unwrap();
    let mut buf = BytesMut::from(&reply[..]);
    let r = ExportNameReply::decode(false, &mut buf).unwrap().unwrap();
    assert_eq!(r.size_bytes, SIZE);
    let w = SimpleReply::decode(&mut buf).unwrap().unwrap();
    assert_eq!((w.cookie, w.error), (3, 0));
    // The read goes out only after the write was answered (replies may be reordered).
    out.clear();
    encode_request(
        &RequestHeader {
            flags: 0,
            command: CMD_READ,
            cookie: 4,
            offset: 10,
            length: 3,
        },
        &[],
        &mut out,
    );
    s.write_all(&out).await.unwrap();
    let mut reply = vec![0u8; 16 + 3];
    within("read reply", s.read_exact(&mut reply))
        .await
        .unwrap();
    let mut buf = BytesMut::from(&reply[..]);
    let rd = SimpleReply::decode(&mut buf).unwrap().unwrap();
    assert_eq!((rd.cookie, rd.error), (4, 0));
    assert_eq!(&buf[..], b"tcp");
    stop_tx.send(()).unwrap();
    within("serve returns", server).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_during_negotiation_closes_the_session_and_returns() {
    // Proves a client still negotiating does not keep the server alive past shutdown.
    let mut srv = TestServer::start(Arc::new(MemTarget::new(SIZE))).await;
    let mut c = Client::negotiating(&srv.path).await;
    let r = c.option(OPT_LIST, bytes::Bytes::new()).await;
    assert_eq!(r.last().unwrap().reply_type, REP_ACK);
    let server = srv.begin_shutdown();
    assert!(c.closed().await);
    within("serve returns", server).await.unwrap().unwrap();
}

/// A [`MemTarget`] that lends WRITE payload buffers (of the asked length, or
/// one byte short when `wrong_len`) and counts them.
struct LendingTarget {
    inner: MemTarget,
    wrong_len: bool,
    lent: std::sync::atomic::AtomicUsize,
}

struct VecPayload(Vec<u8>);

impl nbd_frontend::PayloadBuf for VecPayload {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn freeze(self: Box<Self>) -> bytes::Bytes {
        bytes::Bytes::from(self.0)
    }
}

impl BlockTarget for LendingTarget {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn flags(&self) -> nbd_frontend::TargetFlags {
        self.inner.flags()
    }
    fn payload_buf(&self, len_bytes: usize) -> Option<Box<dyn nbd_frontend::PayloadBuf>> {
        self.lent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Garbage, so a byte the server failed to fill would show.
        let len = if self.wrong_len {
            len_bytes.saturating_sub(1)
        } else {
            len_bytes
        };
        Some(Box::new(VecPayload(vec![0xee; len])))
    }
    async fn read(&self, offset: u64, len: u32) -> Result<bytes::Bytes, nbd_frontend::TargetError> {
        self.inner.read(offset, len).await
    }
    async fn write(
        &self,
        offset: u64,
        data: bytes::Bytes,
        fua: bool,
    ) -> Result<(), nbd_frontend::TargetError> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), nbd_frontend::TargetError> {
        self.inner.flush().await
    }
    async fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), nbd_frontend::TargetError> {
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), nbd_frontend::TargetError> {
        self.inner
            .write_zeroes(offset, len, may_punch, fast, fua)
            .await
    }
    async fn cache(&self, offset: u64, len: u64) -> Result<(), nbd_frontend::TargetError> {
        self.inner.cache(offset, len).await
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<nbd_frontend::Extent>, nbd_frontend::TargetError> {
        self.inner.block_status(offset, len).await
    }
}

#[tokio::test]
async fn writes_received_into_lent_buffers_land_whole_even_split_across_reads() {
    // Proves pipelined WRITEs of every size (inside one socket read, and
    // longer than a read chunk) are received into the target's buffers
    // fully filled, and that a buffer of the wrong length is not used.
    for wrong_len in [false, true] {
        let target = Arc::new(LendingTarget {
            inner: MemTarget::new(4 * SIZE),
            wrong_len,
            lent: Default::default(),
        });
        let srv = TestServer::start(target.clone()).await;
        let mut c = Client::connect(&srv.path, plain()).await;
        let sizes = [1usize, 4096, 300_000, 1 << 20, 7, 65_536];
        let mut offset = 0u64;
        let mut expect = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|j| (j % 253) as u8 ^ i as u8).collect();
            c.send(CMD_WRITE, 0, i as u64, offset, len as u32, &data)
                .await;
            c.send(CMD_FLUSH, 0, 100 + i as u64, 0, 0, &[]).await;
            expect.push((offset, data));
            offset += len as u64 + 3;
        }
        for _ in 0..2 * sizes.len() {
            assert_eq!(c.reply().await.error, 0);
        }
        for (off, data) in &expect {
            assert_eq!(&target.inner.read_now(*off, data.len()), data, "at {off}");
        }
        assert_eq!(
            target.lent.load(std::sync::atomic::Ordering::SeqCst),
            sizes.len(),
            "one buffer asked for per WRITE"
        );
    }
}

#[tokio::test]
async fn truncated_write_into_a_lent_buffer_applies_nothing() {
    // Proves a client vanishing mid-payload writes nothing when the payload
    // was going into a lent buffer.
    let target = Arc::new(LendingTarget {
        inner: MemTarget::new(SIZE),
        wrong_len: false,
        lent: Default::default(),
    });
    let srv = TestServer::start(target.clone()).await;
    let c = Client::connect(&srv.path, plain()).await;
    vanish_mid_write(c).await;
    let mut other = Client::connect(&srv.path, plain()).await;
    let r = other.call(CMD_READ, 0, 0, 8192, &[]).await;
    assert_eq!(r.data, vec![0u8; 8192]);
    wait_until("the truncated write was received", || {
        target.lent.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(target.inner.write_count(), 0);
}
