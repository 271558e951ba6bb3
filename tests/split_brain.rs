//! Split brain with real processes: the link is cut, both nodes are
//! primary and write different data, the link heals. Under the default
//! policy (`disconnect`) both nodes report the split brain, neither replica
//! is overwritten and the link stays down; the operator then resolves it
//! DRBD-style (victim: `replctl secondary` + `replctl invalidate`;
//! survivor: `replctl connect`) and the victim converges to the survivor.
#![forbid(unsafe_code)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::{filled, qemu_io, Cluster, ClusterSpec, STATE_TIMEOUT};

const MIB: u64 = 1 << 20;
/// The full resync of the victim (64 MiB, sparse) takes at most this.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the link is watched for staying down: longer than the
/// transport's longest dial backoff (3 s).
const STAYS_DOWN_WINDOW: Duration = Duration::from_millis(3_500);

#[test]
fn split_brain_is_reported_nothing_overwritten_and_resolved_by_invalidating_the_victim() {
    // Proves invariant 5 end to end: after independent writes on both
    // sides, the reconnect detects split brain on both nodes (status
    // split_brain, last_refusal says so, StandAlone: the link stays down),
    // each replica keeps its own data; `secondary` + `invalidate` on the
    // victim and `connect` on the survivor make the victim a copy of the
    // survivor with nothing out of sync.
    let c = Cluster::up(ClusterSpec {
        proxied: true,
        timeout_ms: Some(2_000),
        ..ClusterSpec::default()
    });
    qemu_io(&c.alpha().uri(), &["write -P 0x10 0 1M"]);
    c.cut();
    c.bravo().wait_status("loses alpha", STATE_TIMEOUT, |s| {
        s["connection"] != "Connected" && s["peer_role"] == "Unknown"
    });
    // An UpToDate secondary cut off from its primary promotes without
    // --force (no fencing configured), which is how split brain happens.
    c.bravo().replctl_ok(&["primary"]);
    c.bravo().wait_nbd();
    qemu_io(&c.alpha().uri(), &["write -P 0xa1 4M 1M"]);
    qemu_io(
        &c.bravo().uri(),
        &["write -P 0xb2 4M 1M", "write -P 0xb3 20M 64k"],
    );
    c.heal();

    for n in &c.nodes {
        let s = n.wait_status("reports split brain", STATE_TIMEOUT, |s| {
            s["split_brain"] == true && s["connection"] == "StandAlone"
        });
        let why = s["last_refusal"].as_str().unwrap_or_default();
        assert!(why.contains("split brain"), "{}: {s}", n.name);
        assert_eq!(s["replication"], "Off", "{}: {s}", n.name);
        assert_eq!(s["role"], "Primary", "{}: {s}", n.name);
    }
    // Nothing was overwritten: each side still has its own writes.
    assert_eq!(
        c.alpha().read_data(4 * MIB, MIB as usize),
        filled(0xa1, MIB as usize)
    );
    assert_eq!(
        c.bravo().read_data(4 * MIB, MIB as usize),
        filled(0xb2, MIB as usize)
    );
    assert_eq!(c.alpha().read_data(20 * MIB, 65536), filled(0, 65536));
    assert_eq!(c.bravo().read_data(20 * MIB, 65536), filled(0xb3, 65536));
    // The link stays down: over a window longer than the longest dial
    // backoff, both nodes stay StandAlone and neither dials the other.
    let dials: u64 = c.proxies().iter().map(|p| p.connections_accepted()).sum();
    let window_end = Instant::now() + STAYS_DOWN_WINDOW;
    while Instant::now() < window_end {
        for n in &c.nodes {
            let s = n.status();
            assert_eq!(s["connection"], "StandAlone", "{}: {s}", n.name);
            assert_eq!(s["split_brain"], true, "{}: {s}", n.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dials_after: u64 = c.proxies().iter().map(|p| p.connections_accepted()).sum();
    assert_eq!(
        dials_after, dials,
        "a node dialled its peer after the split brain"
    );

    // Resolve: bravo is the victim.
    c.bravo().replctl_ok(&["secondary"]);
    c.bravo().replctl_ok(&["invalidate"]);
    c.alpha().replctl_ok(&["connect"]);
    c.wait_in_sync(RESYNC_TIMEOUT);
    for n in &c.nodes {
        let s = n.status();
        assert_eq!(s["split_brain"], false, "{}: {s}", n.name);
    }
    assert_eq!(c.alpha().status()["role"], "Primary");
    assert_eq!(c.bravo().status()["role"], "Secondary");
    assert_eq!(
        c.bravo().read_data(4 * MIB, MIB as usize),
        filled(0xa1, MIB as usize)
    );
    assert_eq!(c.bravo().read_data(20 * MIB, 65536), filled(0, 65536));
    assert_eq!(
        c.bravo().read_data(0, MIB as usize),
        filled(0x10, MIB as usize)
    );
    c.assert_replicas_identical();
}
