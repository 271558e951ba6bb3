//! A fault-injecting TCP proxy for tests: it sits between two nodes and, on
//! command, cuts the link, stalls it, delays it or corrupts bytes in flight.
//!
//! It forwards every accepted connection to one upstream address. It owns no
//! knowledge of the replication protocol: corruption flips bits in whatever
//! bytes pass, so it is the peer codec's checksum that must catch it. It is a
//! test tool: it never targets anything but the address it was given, which
//! tests keep on 127.0.0.0/8.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Size of one forwarding read, in bytes.
const FORWARD_CHUNK_BYTES: usize = 64 * 1024;

/// What the proxy does with the link now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward bytes (after the configured delay).
    Pass,
    /// Keep connections open but forward nothing: a silent peer.
    Stall,
    /// Close every connection and refuse new ones: a pulled cable.
    Cut,
}

/// Which way bytes travel through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting side to the upstream.
    ToUpstream,
    /// From the upstream back to the connecting side.
    FromUpstream,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<LinkMode>,
    delay_us: AtomicU64,
    /// Chunks still to corrupt, per direction.
    corrupt_chunks: [AtomicU64; 2],
    forwarded_bytes: [AtomicU64; 2],
    corrupted_chunks: AtomicU64,
    connections_accepted: AtomicU64,
}

/// A running proxy; dropping it stops accepting and ends its connections.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        // Ends the forwarding tasks too: they watch the mode.
        self.shared.mode.send_replace(LinkMode::Cut);
    }
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::ToUpstream => 0,
        Direction::FromUpstream => 1,
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards each connection to `upstream`.
    /// Must be called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(LinkMode::Pass);
        let shared = Arc::new(Shared {
            upstream,
            mode,
            delay_us: AtomicU64::new(0),
            corrupt_chunks: [AtomicU64::new(0), AtomicU64::new(0)],
            forwarded_bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            corrupted_chunks: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// The address nodes should dial instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection and refuses new ones until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.shared.mode.send_replace(LinkMode::Cut);
    }

    /// Stops forwarding without closing anything until [`FaultProxy::heal`].
    pub fn stall(&self) {
        self.shared.mode.send_replace(LinkMode::Stall);
    }

    /// Forwards again (connections cut earlier stay closed; new ones pass).
    pub fn heal(&self) {
        self.shared.mode.send_replace(LinkMode::Pass);
    }

    /// The current mode.
    pub fn mode(&self) -> LinkMode {
        *self.shared.mode.borrow()
    }

    /// Holds every forwarded chunk back by `delay` (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(micros, Ordering::Relaxed);
    }

    /// Flips one bit in each of the next `chunks` chunks travelling `direction`.
    pub fn corrupt_next(&self, direction: Direction, chunks: u64) {
        self.shared.corrupt_chunks[index(direction)].store(chunks, Ordering::Relaxed);
    }

    /// Bytes forwarded so far in `direction`.
    pub fn forwarded_bytes(&self, direction: Direction) -> u64 {
        self.shared.forwarded_bytes[index(direction)].load(Ordering::Relaxed)
    }

    /// Chunks corrupted so far, both directions.
    pub fn corrupted_chunks(&self) -> u64 {
        self.shared.corrupted_chunks.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (cut ones included).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections_accepted.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.connections_accepted.fetch_add(1, Ordering::Relaxed);
        if *shared.mode.borrow() == LinkMode::Cut {
            drop(client);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(shared.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (upstream_read, upstream_write) = upstream.into_split();
            let to_upstream = tokio::spawn(forward(
                client_read,
                upstream_write,
                Direction::ToUpstream,
                shared.clone(),
            ));
            let from_upstream = tokio::spawn(forward(
                upstream_read,
                client_write,
                Direction::FromUpstream,
                shared,
            ));
            // When one direction ends, end the other: a half-open link is
            // not what a cut cable looks like.
            tokio::select! {
                _ = to_upstream => {}
                _ = from_upstream => {}
            }
        });
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction,
    shared: Arc<Shared>,
) {
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; FORWARD_CHUNK_BYTES];
    loop {
        // Wait while stalled; end on a cut.
        loop {
            match *mode.borrow_and_update() {
                LinkMode::Pass => break,
                LinkMode::Cut => return,
                LinkMode::Stall => {}
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let delay_us = shared.delay_us.load(Ordering::Relaxed);
        if delay_us > 0 {
            tokio::time::sleep(Duration::from_micros(delay_us)).await;
        }
        // A stall or cut that began while this chunk was read holds it too.
        loop {
            match *mode.borrow_and_update() {
                LinkMode::Pass => break,
                LinkMode::Cut => return,
                LinkMode::Stall => {}
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
        let counter = &shared.corrupt_chunks[index(direction)];
        if counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
        {
            // The middle byte of the chunk: never only a length prefix.
            buf[n / 2] ^= 0x10;
            shared.corrupted_chunks.fetch_add(1, Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        shared.forwarded_bytes[index(direction)].fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An upstream that echoes what it receives.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        stream.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        stream.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn pass_mode_forwards_bytes_unchanged_and_counts_them() {
        // Proves the proxy is transparent when no fault is set.
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
        assert_eq!(proxy.forwarded_bytes(Direction::ToUpstream), 5);
        assert_eq!(proxy.forwarded_bytes(Direction::FromUpstream), 5);
    }

    #[tokio::test]
    async fn stall_holds_bytes_until_heal() {
        // Proves a stalled link delivers nothing, keeps the connection, and
        // delivers the held bytes after heal.
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"a").await, b"a");
        proxy.stall();
        s.write_all(b"b").await.unwrap();
        let mut got = [0u8; 1];
        let timed_out =
            tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut got)).await;
        assert!(timed_out.is_err(), "a stalled link delivered bytes");
        proxy.heal();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("healed link did not deliver")
            .unwrap();
        assert_eq!(&got, b"b");
    }

    #[tokio::test]
    async fn cut_closes_connections_and_refuses_new_ones_until_heal() {
        // Proves a cut ends live connections and new ones until healed.
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"x").await, b"x");
        proxy.cut();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("cut connection stayed open")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf))
            .await
            .expect("connection during a cut stayed open")
            .unwrap_or(0);
        assert_eq!(n, 0);
        proxy.heal();
        let mut healed = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut healed, b"y").await, b"y");
    }

    #[tokio::test]
    async fn corrupt_flips_a_bit_in_exactly_the_requested_chunks() {
        // Proves corruption changes the bytes of the next chunk only.
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.corrupt_next(Direction::ToUpstream, 1);
        let got = round_trip(&mut s, b"abc").await;
        assert_ne!(got, b"abc");
        assert_eq!(got[0], b'a');
        assert_eq!(got[1], b'b' ^ 0x10);
        assert_eq!(round_trip(&mut s, b"abc").await, b"abc");
        assert_eq!(proxy.corrupted_chunks(), 1);
    }

    #[tokio::test]
    async fn delay_holds_each_chunk_back() {
        // Proves the configured delay applies to forwarded chunks.
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.set_delay(Duration::from_millis(100));
        let start = Instant::now();
        assert_eq!(round_trip(&mut s, b"z").await, b"z");
        // Once each way.
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
