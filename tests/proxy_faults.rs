//! Link faults between two real nodes, injected by
//! `replicator::fault_proxy::FaultProxy` in front of each node's
//! replication port: a cut, a stall (silent peer), a delay and a corrupted
//! chunk. The primary keeps serving writes through each, the link comes
//! back after the fault ends, and a corrupted frame is never applied.
#![forbid(unsafe_code)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::{
    field_u64, filled, qemu_io, qemu_io_within, Cluster, ClusterSpec, STATE_TIMEOUT,
};
use replicator::fault_proxy::Direction;

const MIB: u64 = 1 << 20;
/// The `timeout_ms` of these clusters: a silent peer is lost after this.
const PEER_TIMEOUT_MS: u64 = 2_000;
/// Slack on top of `timeout_ms` for detection, qemu-io start-up and a
/// loaded 2-CPU machine.
const DETECTION_MARGIN_MS: u64 = 4_000;
/// A write while the link is down must complete within this (it waits for
/// no peer at all).
const DEGRADED_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Resync of a few MiB after the link comes back.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(60);

fn proxied() -> Cluster {
    Cluster::up(ClusterSpec {
        proxied: true,
        timeout_ms: Some(PEER_TIMEOUT_MS),
        ..ClusterSpec::default()
    })
}

#[test]
fn cut_link_primary_keeps_writing_and_resyncs_after_heal() {
    // Proves a pulled cable degrades, not stops, the primary: writes during
    // the cut complete and are marked out of sync (exactly their size);
    // after heal the nodes reconnect by themselves and resync, leaving
    // identical replicas.
    let c = proxied();
    qemu_io(&c.alpha().uri(), &["write -P 0x51 0 1M"]);
    c.cut();
    c.alpha()
        .wait_status("sees the link down", STATE_TIMEOUT, |s| {
            s["connection"] != "Connected"
        });
    qemu_io_within(
        &c.alpha().uri(),
        &["write -P 0x5a 4M 2M", "flush"],
        DEGRADED_WRITE_TIMEOUT,
    );
    let s = c.alpha().status();
    assert_eq!(field_u64(&s, "out_of_sync_bytes"), 2 * MIB, "{s}");
    assert_eq!(s["role"], "Primary");
    c.heal();
    c.wait_in_sync(RESYNC_TIMEOUT);
    assert_eq!(
        c.bravo().read_data(4 * MIB, 2 * MIB as usize),
        filled(0x5a, 2 * MIB as usize)
    );
    c.assert_replicas_identical();
}

#[test]
fn stalled_link_is_declared_lost_within_timeout_and_writes_go_on() {
    // Proves a silent peer (connection open, nothing arriving) is declared
    // lost within timeout_ms plus a margin, that a protocol-C write caught
    // in the stall then completes without the peer, and that the link
    // recovers and resyncs after heal.
    let c = proxied();
    qemu_io(&c.alpha().uri(), &["write -P 0x61 0 1M"]);
    c.stall();
    let stalled_at = Instant::now();
    let limit = Duration::from_millis(PEER_TIMEOUT_MS + DETECTION_MARGIN_MS);
    qemu_io_within(&c.alpha().uri(), &["write -P 0x6b 8M 1M"], limit);
    let write_done = stalled_at.elapsed();
    let s = c
        .alpha()
        .wait_status("declares the stalled peer lost", limit, |s| {
            s["connection"] != "Connected"
        });
    let lost = stalled_at.elapsed();
    eprintln!("stall: write done after {write_done:?}, peer lost after {lost:?}");
    assert!(
        lost <= limit,
        "the stalled peer was declared lost after {lost:?}, limit {limit:?}"
    );
    assert!(
        s["connection_error"].is_string(),
        "status does not say why the link dropped: {s}"
    );
    assert!(field_u64(&s, "out_of_sync_bytes") >= MIB, "{s}");
    c.heal();
    c.wait_in_sync(RESYNC_TIMEOUT);
    assert_eq!(
        c.bravo().read_data(8 * MIB, MIB as usize),
        filled(0x6b, MIB as usize)
    );
    c.assert_replicas_identical();
}

#[test]
fn delayed_link_slows_protocol_c_writes_but_stays_connected() {
    // Proves protocol C waits for the peer (each depth-1 write takes at
    // least the link's round trip) and that a slow link below timeout_ms
    // is not declared lost: it stays Connected with nothing out of sync.
    let c = proxied();
    let delay = Duration::from_millis(25);
    for p in c.proxies() {
        p.set_delay(delay);
    }
    let writes = 10u64;
    let cmds: Vec<String> = (0..writes)
        .map(|i| format!("write -P 0x{:02x} {} 4k", 0x70 + i, i * 64 * 1024))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let start = Instant::now();
    qemu_io(&c.alpha().uri(), &cmds);
    let took = start.elapsed();
    // Data one way, the ack back: two delays per write at least.
    let floor = delay * 2 * writes as u32;
    assert!(
        took >= floor,
        "{writes} protocol-C writes over a {delay:?} link took {took:?}, less than {floor:?}: acknowledged before the peer?"
    );
    let s = c.alpha().status();
    assert_eq!(s["connection"], "Connected", "{s}");
    assert_eq!(s["replication"], "Established", "{s}");
    assert_eq!(s["out_of_sync_bytes"], 0, "{s}");
    assert!(s["connection_error"].is_null(), "{s}");
    for p in c.proxies() {
        p.set_delay(Duration::ZERO);
    }
    for i in 0..writes {
        assert_eq!(
            c.bravo().read_data(i * 64 * 1024, 4096),
            filled(0x70 + i as u8, 4096)
        );
    }
    c.assert_replicas_identical();
}

/// The proxy carrying the live link and the direction in which alpha's
/// (the primary's) frames cross it: found by writing and watching which
/// proxy forwards the bytes.
fn primary_to_secondary_path(c: &Cluster) -> (usize, Direction) {
    let before: Vec<u64> = c
        .proxies()
        .iter()
        .map(|p| {
            p.forwarded_bytes(Direction::ToUpstream) + p.forwarded_bytes(Direction::FromUpstream)
        })
        .collect();
    qemu_io(&c.alpha().uri(), &["write -P 0x01 32M 1M"]);
    let grew: Vec<u64> = c
        .proxies()
        .iter()
        .zip(&before)
        .map(|(p, b)| {
            p.forwarded_bytes(Direction::ToUpstream) + p.forwarded_bytes(Direction::FromUpstream)
                - b
        })
        .collect();
    // proxies[1] sits in front of bravo: alpha dialled it, its frames go
    // upstream. proxies[0] sits in front of alpha: they come back from it.
    if grew[1] >= grew[0] {
        (1, Direction::ToUpstream)
    } else {
        (0, Direction::FromUpstream)
    }
}

fn flip(direction: Direction) -> Direction {
    match direction {
        Direction::ToUpstream => Direction::FromUpstream,
        Direction::FromUpstream => Direction::ToUpstream,
    }
}

#[test]
fn corrupted_frame_is_never_applied_and_the_link_resyncs() {
    // Proves invariant 7 on the peer link, both ways: a bit flipped in a
    // frame from the primary (write data) and then in one from the
    // secondary (acks) makes the receiver drop the link with a checksum
    // error in its status instead of applying the frame; the primary's
    // writes still complete; after each automatic reconnect and resync the
    // secondary holds exactly the written data and the replicas are equal.
    let c = proxied();
    for (round, receiver, pattern) in [(0, 1usize, 0x7cu8), (1, 0usize, 0x7d)] {
        let (proxy, to_bravo) = primary_to_secondary_path(&c);
        let direction = if receiver == 1 {
            to_bravo
        } else {
            flip(to_bravo)
        };
        let p = &c.proxies()[proxy];
        let corrupted_before = p.corrupted_chunks();
        p.corrupt_next(direction, 1);
        let offset = (12 + 2 * round) * MIB;
        qemu_io(
            &c.alpha().uri(),
            &[&format!("write -P {pattern:#x} {offset} 1M")],
        );
        assert_eq!(
            p.corrupted_chunks(),
            corrupted_before + 1,
            "round {round}: the proxy corrupted nothing"
        );
        let r = &c.nodes[receiver];
        let s = r.wait_status("reports the corrupt frame", STATE_TIMEOUT, |s| {
            s["connection_error"]
                .as_str()
                .is_some_and(|e| e.contains("checksum"))
        });
        eprintln!("round {round}: {} says {}", r.name, s["connection_error"]);
        c.wait_in_sync(RESYNC_TIMEOUT);
        assert_eq!(
            c.bravo().read_data(offset, MIB as usize),
            filled(pattern, MIB as usize),
            "round {round}: bravo does not hold the written data"
        );
        c.assert_replicas_identical();
    }
}

#[test]
fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
    // Proves the harness's ports cannot be taken by an outgoing connection
    // (the kernel picks those from ip_local_port_range) before a daemon or
    // the proxy binds them, and are never handed out twice.
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read ip_local_port_range")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port number");
    let ports: Vec<u16> = (0..64).map(|_| common::free_port()).collect();
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    for p in ports {
        assert!(p < ephemeral_low, "{p} is in the ephemeral range");
        std::net::TcpListener::bind(("127.0.0.1", p)).expect("free to bind");
    }
}
