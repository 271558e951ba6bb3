//! Transport tests on loopback: tie-break, reconnect, bad frames, timeouts.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::*;

/// How long a test waits for an expected event.
const EVENT_DEADLINE_MS: u64 = 10_000;

struct Node {
    events: mpsc::Receiver<LinkEvent>,
    _want: watch::Sender<bool>,
    stop: watch::Sender<bool>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn start(me: &str, peer: &str, peer_addr: String, listener: TcpListener, timeout_ms: u64) -> Node {
    let (tx, rx) = mpsc::channel(64);
    let (want_tx, want_rx) = watch::channel(true);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cfg = TransportConfig {
        node: me.to_string(),
        peer: peer.to_string(),
        peer_addr,
        peer_timeout_ms: timeout_ms,
    };
    tokio::spawn(run(cfg, listener, want_rx, tx, stop_rx));
    Node {
        events: rx,
        _want: want_tx,
        stop: stop_tx,
    }
}

async fn next_event(n: &mut Node) -> LinkEvent {
    tokio::time::timeout(Duration::from_millis(EVENT_DEADLINE_MS), n.events.recv())
        .await
        .expect("an event within the deadline")
        .expect("transport alive")
}

/// The next event that is not a frame (pings etc. are skipped).
async fn next_up(n: &mut Node) -> Link {
    loop {
        match next_event(n).await {
            LinkEvent::Up(l) => return l,
            LinkEvent::Frame { .. } => {}
            other => panic!("expected Up, got {other:?}"),
        }
    }
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    (l, a)
}

#[test]
fn backoff_doubles_from_min_to_max_and_resets() {
    // Proves the dial schedule: 100 ms doubling, capped, back to 100 ms
    // after a success.
    let mut b = Backoff::new(1_000);
    let d: Vec<u64> = (0..6).map(|_| b.next_delay_ms()).collect();
    assert_eq!(d, [100, 200, 400, 800, 1_000, 1_000]);
    b.reset();
    assert_eq!(b.next_delay_ms(), DIAL_BACKOFF_MIN_MS);
}

#[tokio::test]
async fn both_nodes_dialing_at_once_keep_exactly_one_link() {
    // Proves the tie-break: when both nodes dial each other at the same
    // time, each side ends up with exactly one link, and it is the same TCP
    // connection (a frame sent on one arrives on the other's link).
    for _round in 0..8 {
        let (la, aa) = listener().await;
        let (lb, ab) = listener().await;
        let mut a = start("alpha", "bravo", ab, la, 5_000);
        let mut b = start("bravo", "alpha", aa, lb, 5_000);
        let link_a = next_up(&mut a).await;
        let link_b = next_up(&mut b).await;
        link_a.send(Message::Ping).unwrap();
        match next_event(&mut b).await {
            LinkEvent::Frame { link, msg } => {
                assert_eq!(link, link_b.id);
                assert_eq!(msg, Message::Ping);
            }
            other => panic!("expected the ping on bravo's link, got {other:?}"),
        }
        // No second link and no drop shortly after.
        for n in [&mut a, &mut b] {
            let r = tokio::time::timeout(Duration::from_millis(300), n.events.recv()).await;
            assert!(r.is_err(), "unexpected event after the tie-break: {r:?}");
        }
    }
}

#[tokio::test]
async fn lost_link_is_redialled_until_the_peer_returns() {
    // Proves reconnection: alpha keeps dialling (with backoff) a peer that
    // is not there yet, links when it comes up, and links again after the
    // peer drops the connection.
    let (la, aa) = listener().await;
    let (lb, ab) = listener().await;
    drop(lb); // nothing listens on bravo's address for now
    let mut a = start("alpha", "bravo", ab.clone(), la, 5_000);
    // Let alpha fail at least one dial before bravo exists.
    let r = tokio::time::timeout(Duration::from_millis(250), a.events.recv()).await;
    assert!(r.is_err(), "no link without a peer: {r:?}");
    let lb = TcpListener::bind(&ab).await.unwrap();
    let mut b = start("bravo", "alpha", aa, lb, 5_000);
    let first_a = next_up(&mut a).await;
    let first_b = next_up(&mut b).await;
    first_b.close("test drops the link");
    loop {
        match next_event(&mut a).await {
            LinkEvent::Down { link, .. } => {
                assert_eq!(link, first_a.id);
                break;
            }
            LinkEvent::Frame { .. } => {}
            other => panic!("expected Down, got {other:?}"),
        }
    }
    let second_a = loop {
        match next_event(&mut a).await {
            LinkEvent::Up(l) => break l,
            LinkEvent::Frame { .. } | LinkEvent::Down { .. } => {}
            other => panic!("expected a new link, got {other:?}"),
        }
    };
    assert_ne!(second_a.id, first_a.id);
}

async fn raw_peer(addr: &str, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut pre = PREAMBLE_MAGIC.to_vec();
    pre.push(name.len() as u8);
    pre.extend_from_slice(name.as_bytes());
    s.write_all(&pre).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], PREAMBLE_ACCEPT);
    s
}

#[tokio::test]
async fn undecodable_frame_reports_frame_error_then_drops_the_link() {
    // Proves a corrupt byte stream is never turned into a frame: the loop
    // gets FrameError (so the engine drops and resyncs), then Down.
    let (la, aa) = listener().await;
    // bravo sorts last, so it takes the incoming link even mid-dial.
    let mut a = start("bravo", "alpha", "127.0.0.1:1".into(), la, 5_000);
    let mut s = raw_peer(&aa, "alpha").await;
    let link = next_up(&mut a).await;
    s.write_all(&[0xEE; 64]).await.unwrap();
    match next_event(&mut a).await {
        LinkEvent::FrameError { link: id, error } => {
            assert_eq!(id, link.id);
            assert!(matches!(error, WireError::BadMagic { .. }), "{error:?}");
        }
        other => panic!("expected FrameError, got {other:?}"),
    }
    match next_event(&mut a).await {
        LinkEvent::Down { link: id, reason } => {
            assert_eq!(id, link.id);
            assert!(reason.contains("undecodable"), "{reason}");
        }
        other => panic!("expected Down, got {other:?}"),
    }
}

#[tokio::test]
async fn silent_peer_is_declared_lost_after_the_timeout() {
    // Proves a stalled link is detected by the configured timeout, not left
    // hanging: nothing arrives for timeout_ms, so the link goes Down.
    let (la, aa) = listener().await;
    let mut a = start("bravo", "alpha", "127.0.0.1:1".into(), la, 300);
    let _s = raw_peer(&aa, "alpha").await;
    let link = next_up(&mut a).await;
    match next_event(&mut a).await {
        LinkEvent::Down { link: id, reason } => {
            assert_eq!(id, link.id);
            assert!(reason.contains("silent for 300 ms"), "{reason}");
        }
        other => panic!("expected Down, got {other:?}"),
    }
}

#[tokio::test]
async fn link_from_an_unknown_node_is_refused() {
    // Proves only the configured peer may link: another name gets the
    // reject byte and no link reaches the loop.
    let (la, aa) = listener().await;
    let mut a = start("alpha", "bravo", "127.0.0.1:1".into(), la, 5_000);
    let mut s = TcpStream::connect(&aa).await.unwrap();
    let mut pre = PREAMBLE_MAGIC.to_vec();
    pre.push(7);
    pre.extend_from_slice(b"mallory");
    s.write_all(&pre).await.unwrap();
    let mut answer = [9u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], PREAMBLE_REJECT);
    let r = tokio::time::timeout(Duration::from_millis(200), a.events.recv()).await;
    assert!(r.is_err(), "no link for an unknown node: {r:?}");
}

#[tokio::test]
async fn frame_out_of_sequence_is_a_frame_error_and_drops_the_link() {
    // Proves frames are numbered per connection on the real link: a
    // well-formed frame carrying the wrong number (as after a lost or
    // reordered frame) is never delivered; the loop gets FrameError, then Down.
    let (la, aa) = listener().await;
    let mut a = start("bravo", "alpha", "127.0.0.1:1".into(), la, 5_000);
    let mut s = raw_peer(&aa, "alpha").await;
    let link = next_up(&mut a).await;
    let mut out = BytesMut::new();
    wire::encode_with_seq(&Message::Ping, 0, &mut out).unwrap();
    wire::encode_with_seq(&Message::PingAck, 2, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    match next_event(&mut a).await {
        LinkEvent::Frame { msg, .. } => assert_eq!(msg, Message::Ping),
        other => panic!("expected the first frame, got {other:?}"),
    }
    match next_event(&mut a).await {
        LinkEvent::FrameError { link: id, error } => {
            assert_eq!(id, link.id);
            assert!(matches!(error, WireError::OutOfOrder { .. }), "{error:?}");
        }
        other => panic!("expected FrameError, got {other:?}"),
    }
    match next_event(&mut a).await {
        LinkEvent::Down { link: id, .. } => assert_eq!(id, link.id),
        other => panic!("expected Down, got {other:?}"),
    }
}

#[tokio::test]
async fn mixed_frames_arrive_whole_in_order_and_bulk_data_aligned() {
    // Proves the vectored writer and the aligned reader carry every frame
    // exactly: large and small data frames interleaved with others, in
    // order, data intact, and data of 64 KiB and more at an aligned address
    // (whether its frame arrived whole in one read or in pieces).
    use replicator_core::types::RequestId;
    let (la, aa) = listener().await;
    let (lb, ab) = listener().await;
    let mut a = start("alpha", "bravo", ab, la, 5_000);
    let mut b = start("bravo", "alpha", aa, lb, 5_000);
    let link_a = next_up(&mut a).await;
    let _link_b = next_up(&mut b).await;
    let sizes = [
        1 << 20,
        100,
        4096,
        128 << 10,
        512,
        2047,
        2048,
        5000,
        1 << 20,
    ];
    let mut sent = Vec::new();
    for round in 0..4u64 {
        for (k, &len) in sizes.iter().enumerate() {
            let seed = round * 100 + k as u64;
            let data = Bytes::from(
                (0..len)
                    .map(|i| (i as u64 * 31 + seed) as u8)
                    .collect::<Vec<u8>>(),
            );
            let msg = if k % 2 == 0 {
                Message::Write {
                    id: RequestId(seed),
                    offset: seed * 4096,
                    flags: 0,
                    len_bytes: len as u32,
                    data,
                }
            } else {
                Message::ResyncData {
                    id: RequestId(seed),
                    offset: seed * 4096,
                    data,
                }
            };
            sent.push(msg.clone());
            link_a.send(msg).unwrap();
            sent.push(Message::Ping);
            link_a.send(Message::Ping).unwrap();
        }
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        match next_event(&mut b).await {
            LinkEvent::Frame { msg, .. } => {
                if let Message::Write { data, .. } | Message::ResyncData { data, .. } = &msg {
                    if data.len() >= ALIGNED_DATA_MIN_BYTES {
                        assert_eq!(
                            data.as_ptr() as usize % crate::disk::aligned::ALIGN_BYTES as usize,
                            0,
                            "{} bytes",
                            data.len()
                        );
                    }
                }
                got.push(msg);
            }
            other => panic!("expected frames, got {other:?}"),
        }
    }
    assert_eq!(got.len(), sent.len());
    // Each lane keeps its order (application frames may overtake resync data).
    for lane in [Lane::App, Lane::Resync] {
        let got: Vec<_> = got.iter().filter(|m| lane_of(m) == lane).collect();
        let sent: Vec<_> = sent.iter().filter(|m| lane_of(m) == lane).collect();
        assert_eq!(got.len(), sent.len());
        for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
            assert!(
                g == s,
                "{lane:?} frame {i}: got {} {:?}, sent {} {:?}",
                g.name(),
                summary(g),
                s.name(),
                summary(s)
            );
        }
    }
}

/// Id, offset and data length of a data frame, for failure messages.
fn summary(m: &Message) -> Option<(u64, u64, usize)> {
    match m {
        Message::Write {
            id, offset, data, ..
        }
        | Message::ResyncData { id, offset, data } => Some((id.0, *offset, data.len())),
        _ => None,
    }
}

#[tokio::test]
async fn corrupt_large_data_is_a_frame_error_whether_whole_or_in_pieces() {
    // Proves large data received apart from its head (pooled buffer) is
    // still checked: one flipped data bit gives FrameError and Down, never
    // a frame, both when the frame arrives in one write and in pieces.
    use replicator_core::types::RequestId;
    for in_pieces in [false, true] {
        let (la, aa) = listener().await;
        let mut a = start("bravo", "alpha", "127.0.0.1:1".into(), la, 5_000);
        let mut s = raw_peer(&aa, "alpha").await;
        let link = next_up(&mut a).await;
        let mut frame = BytesMut::new();
        let msg = Message::Write {
            id: RequestId(7),
            offset: 0,
            flags: 0,
            len_bytes: 256 * 1024,
            data: Bytes::from(vec![0x5A; 256 * 1024]),
        };
        wire::encode_with_seq(&msg, 0, &mut frame).unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 0x10;
        if in_pieces {
            for piece in frame.chunks(10_000) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            s.write_all(&frame).await.unwrap();
        }
        match next_event(&mut a).await {
            LinkEvent::FrameError { link: id, error } => {
                assert_eq!(id, link.id);
                assert!(
                    matches!(error, WireError::PayloadChecksum { .. }),
                    "{error:?}"
                );
            }
            other => panic!("expected FrameError, got {other:?}"),
        }
        assert!(matches!(next_event(&mut a).await, LinkEvent::Down { .. }));
    }
}
