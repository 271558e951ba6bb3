//! Two real nodes in one process: real engines over two temp files,
//! connected over loopback TCP, driven through their replicated targets and
//! control requests.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use nbd_frontend::BlockTarget;
use replicator_core::metadata::MetadataLayout;

use super::*;
use crate::config;
use crate::control::protocol::{ConnectionState, ReplicationState, Role};
use crate::replctl::metadata::{create_md, dump_md};

/// How long a test waits for a state to be reached.
const STATE_DEADLINE_MS: u64 = 30_000;
/// Size of each node's backing file.
const DISK_BYTES: u64 = 16 * 1024 * 1024;

struct Pair {
    dir: tempfile::TempDir,
    config: Config,
}

/// Two ports on 127.0.0.1 that were free a moment ago, and not the same
/// one: the kernel may hand out one ephemeral port twice in a row once
/// the first listener is closed.
fn two_free_ports() -> (u16, u16) {
    let port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let first = port();
    loop {
        let second = port();
        if second != first {
            return (first, second);
        }
    }
}

impl Pair {
    /// Two nodes with fresh internal metadata on sparse files.
    fn new() -> Pair {
        Pair::build(false)
    }

    /// Two nodes with fresh metadata in external files.
    fn external() -> Pair {
        Pair::build(true)
    }

    fn build(external: bool) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let meta = |n: &str| {
            if external {
                format!("meta = \"{d}/{n}.md\"\n")
            } else {
                String::new()
            }
        };
        let (pa, pb) = two_free_ports();
        let text = format!(
            "resource = \"r0\"\nsecret = \"s3cret\"\nio_engine = \"sync\"\n\
             [nodes.alpha]\nreplication = \"127.0.0.1:{pa}\"\nnbd = \"unix:{d}/alpha.nbd\"\n\
             control = \"{d}/alpha.ctl\"\ndisk = \"{d}/alpha.img\"\n{ma}\
             [nodes.bravo]\nreplication = \"127.0.0.1:{pb}\"\nnbd = \"unix:{d}/bravo.nbd\"\n\
             control = \"{d}/bravo.ctl\"\ndisk = \"{d}/bravo.img\"\n{mb}",
            ma = meta("alpha"),
            mb = meta("bravo"),
        );
        let path = dir.path().join("r0.toml");
        std::fs::write(&path, text).unwrap();
        let config = config::load(&path).unwrap();
        for n in ["alpha", "bravo"] {
            let f = std::fs::File::create(dir.path().join(format!("{n}.img"))).unwrap();
            f.set_len(DISK_BYTES).unwrap();
            create_md(&config, n, false).unwrap();
        }
        Pair { dir, config }
    }

    fn disk(&self, n: &str) -> PathBuf {
        self.dir.path().join(format!("{n}.img"))
    }

    async fn start(&self, n: &str) -> NodeHandle {
        start(&self.config, n).await.unwrap()
    }

    /// Starts both, waits for Established, skips the initial sync and
    /// promotes alpha.
    async fn up(&self) -> (NodeHandle, NodeHandle) {
        let a = self.start("alpha").await;
        let b = self.start("bravo").await;
        established(&a).await;
        established(&b).await;
        ok(a.request(Request::NewCurrentUuid { clear_bitmap: true })
            .await);
        ok(a.request(Request::Primary { force: false }).await);
        wait_for(&b, "alpha's data UpToDate on bravo", |s| {
            s.disk == crate::control::protocol::DiskState::UpToDate
                && s.peer_role == crate::control::protocol::PeerRole::Primary
        })
        .await;
        // The primary learns that its peer adopted the new generation.
        wait_for(&a, "bravo UpToDate as alpha sees it", |s| {
            s.peer_disk == crate::control::protocol::DiskState::UpToDate
        })
        .await;
        (a, b)
    }

    fn data(&self, n: &str, size: u64) -> Vec<u8> {
        let mut v = std::fs::read(self.disk(n)).unwrap();
        v.truncate(size as usize);
        v
    }
}

fn ok(r: Response) {
    assert!(matches!(r, Response::Ok { .. }), "expected ok, got {r:?}");
}

/// The operator's sentence of a success.
fn ok_message(r: Response) -> String {
    match r {
        Response::Ok {
            message: Some(m), ..
        } => m,
        other => panic!("expected ok with a message, got {other:?}"),
    }
}

async fn wait_for(
    h: &NodeHandle,
    what: &str,
    pred: impl Fn(&StatusReport) -> bool,
) -> StatusReport {
    let deadline = Instant::now() + Duration::from_millis(STATE_DEADLINE_MS);
    loop {
        let s = h.status().await.expect("status");
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn established(h: &NodeHandle) -> StatusReport {
    wait_for(h, "Connected/Established", |s| {
        s.connection == ConnectionState::Connected && s.replication == ReplicationState::Established
    })
    .await
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed ^ (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_completes_only_after_both_disks_hold_it() {
    // Proves protocol C end to end: the moment a write through the primary's
    // target returns, both backing files already hold the data (also for a
    // write larger than one engine request); and the
    // primary serves its NBD export while the secondary does not.
    let p = Pair::new();
    let (a, b) = p.up().await;
    let sa = a.status().await.unwrap();
    assert_eq!(sa.role, Role::Primary);
    assert!(sa.nbd.is_some(), "primary serves NBD: {sa:?}");
    assert!(b.status().await.unwrap().nbd.is_none());
    for (i, offset) in [0u64, 4096 * 7, 1024 * 1024 + 512].into_iter().enumerate() {
        let data = pattern(i as u8 + 1, 64 * 1024);
        a.target.write(offset, data.clone(), false).await.unwrap();
        for n in ["alpha", "bravo"] {
            let on_disk = p.data(n, offset + data.len() as u64);
            assert_eq!(
                &on_disk[offset as usize..],
                &data[..],
                "{n} holds the write when it completes"
            );
        }
    }
    // Larger than one engine request: split, mirrored, complete on both.
    let big = pattern(0x5a, 3 * 1024 * 1024 + 4096);
    a.target
        .write(4 * 1024 * 1024, big.clone(), true)
        .await
        .unwrap();
    for n in ["alpha", "bravo"] {
        let on_disk = p.data(n, 4 * 1024 * 1024 + big.len() as u64);
        assert!(
            on_disk[4 * 1024 * 1024..] == big[..],
            "{n} holds the big write"
        );
    }
    a.target.flush().await.unwrap();
    let read = a.target.read(4096 * 7, 4096).await.unwrap();
    assert_eq!(&read[..], &pattern(2, 4096)[..]);
    // The secondary refuses client I/O.
    assert!(b.target.write(0, pattern(9, 4096), false).await.is_err());
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_writes_mark_out_of_sync_then_resync_makes_replicas_identical() {
    // Proves the disconnected path and incremental resync: while StandAlone
    // the primary's writes complete locally and out-of-sync grows by what
    // was written; after reconnecting, resync brings the secondary to a
    // byte-identical copy and out-of-sync back to exactly 0.
    let p = Pair::new();
    let (a, b) = p.up().await;
    ok(a.request(Request::Disconnect).await);
    wait_for(&a, "StandAlone", |s| {
        s.connection == ConnectionState::StandAlone
    })
    .await;
    let writes = [(0u64, 64 * 1024usize), (3 * 1024 * 1024, 128 * 1024)];
    for (i, (offset, len)) in writes.iter().enumerate() {
        a.target
            .write(*offset, pattern(0x40 + i as u8, *len), false)
            .await
            .unwrap();
    }
    let s = a.status().await.unwrap();
    assert_eq!(s.out_of_sync_bytes, 192 * 1024, "{s:?}");
    let size = s.size_bytes;
    assert_ne!(p.data("alpha", size), p.data("bravo", size));
    ok(a.request(Request::Connect).await);
    for h in [&a, &b] {
        wait_for(h, "resync finished", |s| {
            s.replication == ReplicationState::Established && s.out_of_sync_bytes == 0
        })
        .await;
    }
    let moved = b.status().await.unwrap().resync_transferred_bytes;
    assert_eq!(moved, 192 * 1024, "only the out-of-sync blocks travel");
    a.target.flush().await.unwrap();
    assert!(
        p.data("alpha", size) == p.data("bravo", size),
        "replicas identical"
    );
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stop_persists_metadata_and_a_restarted_secondary_resyncs() {
    // Proves the clean stop and restart: a stopped node returns Ok with a
    // CleanShutdown superblock; writes made while it was away are marked and,
    // once it runs again, resynced until the replicas are identical.
    let p = Pair::new();
    let (a, b) = p.up().await;
    b.stop();
    b.wait().await.unwrap();
    let md = dump_md(&p.config, "bravo").unwrap();
    assert!(md.flags.contains(&"CleanShutdown"), "{:?}", md.flags);
    a.target
        .write(8192, pattern(0x77, 32 * 1024), false)
        .await
        .unwrap();
    let s = wait_for(&a, "peer gone", |s| {
        s.connection != ConnectionState::Connected
    })
    .await;
    assert_eq!(s.out_of_sync_bytes, 32 * 1024);
    let b = p.start("bravo").await;
    for h in [&a, &b] {
        wait_for(h, "resync after restart", |s| {
            s.replication == ReplicationState::Established && s.out_of_sync_bytes == 0
        })
        .await;
    }
    let size = s.size_bytes;
    assert!(
        p.data("alpha", size) == p.data("bravo", size),
        "replicas identical"
    );
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
    let md = dump_md(&p.config, "alpha").unwrap();
    assert!(md.flags.contains(&"CleanShutdown"), "{:?}", md.flags);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_replicated_returns_ok_when_its_shutdown_future_resolves() {
    // Proves the library entry point replicatord uses: the shutdown future
    // (SIGTERM in the program) stops the node cleanly with Ok.
    let p = Pair::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let config = p.config.clone();
    let run = tokio::spawn(async move {
        run_replicated(&config, "alpha", async {
            let _ = rx.await;
        })
        .await
    });
    let ctl = p.dir.path().join("alpha.ctl");
    let deadline = Instant::now() + Duration::from_millis(STATE_DEADLINE_MS);
    while !ctl.exists() {
        assert!(Instant::now() < deadline, "control socket never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_millis(STATE_DEADLINE_MS), run)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    let md = dump_md(&p.config, "alpha").unwrap();
    assert!(md.flags.contains(&"CleanShutdown"), "{:?}", md.flags);
}

#[tokio::test]
async fn damaged_metadata_refuses_to_attach_with_the_decoders_reason() {
    // Proves a disk with damaged superblocks is refused with the decoder's
    // precise reason, and a disk without metadata names `replctl create-md`.
    let p = Pair::new();
    let layout = MetadataLayout::internal(DISK_BYTES, 4096, config::DEFAULT_AL_EXTENTS).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.disk("alpha"))
            .unwrap();
        for slot in 0..2u8 {
            // Flip a byte inside each slot's checksummed area.
            f.write_all_at(&[0xFF], layout.superblock_slot_offset(slot) + 40)
                .unwrap();
        }
    }
    let e = start(&p.config, "alpha").await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, RunError::Attach(AttachError::Damaged { .. })),
        "{msg}"
    );
    assert!(msg.contains("checksum mismatch"), "{msg}");

    let f = std::fs::File::create(p.disk("bravo")).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    let e = start(&p.config, "bravo").await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, RunError::Attach(AttachError::NoMetadata { .. })),
        "{msg}"
    );
    assert!(msg.contains("replctl create-md"), "{msg}");
}

#[tokio::test]
async fn external_metadata_that_is_the_disk_under_another_name_is_refused() {
    // Proves a `meta` path that reaches the disk itself (here a symlink; an
    // LV is /dev/vg0/vm1 and /dev/dm-3 alike) passes the config's check by
    // name but is refused by create-md, even forced, with the disk left as
    // it was, and by the daemon: metadata written there would overwrite
    // the start of the data.
    use std::os::unix::fs::FileExt;
    let p = Pair::external();
    let link = p.dir.path().join("alpha-meta-link");
    std::os::unix::fs::symlink(p.disk("alpha"), &link).unwrap();
    let d = p.dir.path().display().to_string();
    let cfg = variant(
        &p,
        "alias.toml",
        &format!("meta = \"{d}/alpha.md\""),
        &format!("meta = \"{}\"", link.display()),
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(p.disk("alpha"))
        .unwrap()
        .write_all_at(b"the VM's partition table", 0)
        .unwrap();
    let before = std::fs::read(p.disk("alpha")).unwrap();
    let e = create_md(&cfg, "alpha", true).unwrap_err().to_string();
    assert!(e.contains("is the disk") && e.contains("internal"), "{e}");
    assert!(
        std::fs::read(p.disk("alpha")).unwrap() == before,
        "the disk was written"
    );
    let e = start(&cfg, "alpha").await.unwrap_err();
    assert!(
        matches!(e, RunError::Attach(AttachError::MetaIsDisk { .. })),
        "{e}"
    );
    assert!(
        std::fs::read(p.disk("alpha")).unwrap() == before,
        "the disk was written"
    );
}

/// `config` with `from` replaced by `to` in its file text, saved as `name`.
fn variant(p: &Pair, name: &str, from: &str, to: &str) -> Config {
    let text = std::fs::read_to_string(&p.config.path).unwrap();
    assert!(text.contains(from), "{from:?} not in the config");
    let path = p.dir.path().join(name);
    std::fs::write(&path, text.replace(from, to)).unwrap();
    config::load(&path).unwrap()
}

async fn refused(h: &NodeHandle, what: &str) -> String {
    let s = wait_for(h, what, |s| {
        s.connection == ConnectionState::StandAlone && s.last_refusal.is_some()
    })
    .await;
    s.last_refusal.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_and_status_says_why() {
    // Proves authentication: a peer with another secret never gets past
    // the handshake; both nodes stay StandAlone and status names the cause.
    let p = Pair::new();
    let other = variant(&p, "bravo.toml", "s3cret", "not-the-secret");
    let a = p.start("alpha").await;
    let b = start(&other, "bravo").await.unwrap();
    let why_a = refused(&a, "alpha refuses bravo").await;
    let why_b = refused(&b, "bravo refused").await;
    for why in [&why_a, &why_b] {
        assert!(why.contains("secret") || why.contains("auth"), "{why}");
    }
    assert_eq!(a.status().await.unwrap().replication, ReplicationState::Off);
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_disk_size_is_refused_and_status_says_why() {
    // Proves the size check: a peer exporting another size is refused at
    // Hello and status on both nodes says so.
    let p = Pair::new();
    let f = std::fs::File::create(p.disk("bravo")).unwrap();
    f.set_len(DISK_BYTES + 4 * 1024 * 1024).unwrap();
    create_md(&p.config, "bravo", false).unwrap();
    let a = p.start("alpha").await;
    let b = p.start("bravo").await;
    let why = refused(&a, "alpha refuses bravo").await;
    assert!(why.contains("bytes"), "{why}");
    let why = refused(&b, "bravo refused").await;
    assert!(why.contains("bytes"), "{why}");
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_shows_the_peer_connecting_and_role_changes() {
    // Proves `replctl events` on a real node: the initial dump over the
    // control socket, then change lines when the peer connects and when the
    // node is promoted.
    use crate::control::client::{ControlClient, StreamItem};
    use crate::control::protocol::{EventKind, EventObject};
    let p = Pair::new();
    let a = p.start("alpha").await;
    let client = ControlClient::connect(&p.dir.path().join("alpha.ctl"))
        .await
        .unwrap();
    let mut stream = client.subscribe().await.unwrap().unwrap();
    let b = p.start("bravo").await;
    let mut saw_connected = false;
    let mut saw_primary = false;
    let deadline = Instant::now() + Duration::from_millis(STATE_DEADLINE_MS);
    while !(saw_connected && saw_primary) {
        assert!(Instant::now() < deadline, "events missing");
        let item = tokio::time::timeout(Duration::from_millis(STATE_DEADLINE_MS), stream.next())
            .await
            .unwrap()
            .unwrap()
            .expect("stream open");
        let StreamItem::Event(ev) = item else {
            panic!("stream ended: {item:?}");
        };
        if ev.kind == EventKind::Change
            && ev.object == EventObject::PeerDevice
            && ev.fields.get("replication") == Some(&serde_json::json!("Established"))
        {
            saw_connected = true;
            ok(a.request(Request::NewCurrentUuid { clear_bitmap: true })
                .await);
            ok(a.request(Request::Primary { force: false }).await);
        }
        if ev.kind == EventKind::Change
            && ev.object == EventObject::Resource
            && ev.fields.get("role") == Some(&serde_json::json!("Primary"))
        {
            saw_primary = true;
        }
    }
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_is_detected_reported_and_nothing_is_overwritten() {
    // Proves invariant 5 through the runtime: both nodes primary and
    // writing while apart; on reconnect the split brain is detected, both
    // stay StandAlone with split_brain in status, and neither replica is
    // overwritten.
    let p = Pair::new();
    let (a, b) = p.up().await;
    ok(a.request(Request::Disconnect).await);
    ok(b.request(Request::Disconnect).await);
    wait_for(&b, "bravo StandAlone", |s| {
        s.connection == ConnectionState::StandAlone
    })
    .await;
    ok(b.request(Request::Primary { force: false }).await);
    a.target.write(0, pattern(0xA1, 4096), false).await.unwrap();
    b.target.write(0, pattern(0xB2, 4096), false).await.unwrap();
    ok(a.request(Request::Connect).await);
    ok(b.request(Request::Connect).await);
    for h in [&a, &b] {
        let s = wait_for(h, "split brain reported", |s| {
            s.split_brain && s.connection == ConnectionState::StandAlone
        })
        .await;
        let why = s.last_refusal.unwrap_or_default();
        assert!(why.contains("split brain"), "{why}");
    }
    assert_eq!(&p.data("alpha", 4096)[..], &pattern(0xA1, 4096)[..]);
    assert_eq!(&p.data("bravo", 4096)[..], &pattern(0xB2, 4096)[..]);
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_metadata_exports_the_whole_disk_and_replicates() {
    // Proves the external-metadata path: the export is the whole backing
    // file, metadata lives in its own file, writes reach both disks.
    let p = Pair::external();
    let (a, b) = p.up().await;
    let s = a.status().await.unwrap();
    assert_eq!(s.size_bytes, DISK_BYTES);
    let data = pattern(0x3c, 8192);
    a.target
        .write(DISK_BYTES - 8192, data.clone(), true)
        .await
        .unwrap();
    for n in ["alpha", "bravo"] {
        assert!(p.data(n, DISK_BYTES)[(DISK_BYTES - 8192) as usize..] == data[..]);
        assert!(p.dir.path().join(format!("{n}.md")).exists());
    }
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_damaged_block_and_resync_repairs_it() {
    // Proves online verify and `resync` while connected: a block changed
    // behind the secondary's back is found by verify, marked out of sync,
    // and `resync` copies it back until the replicas are identical.
    let p = Pair::new();
    let (a, b) = p.up().await;
    a.target
        .write(0, pattern(0x11, 256 * 1024), true)
        .await
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.disk("bravo"))
            .unwrap();
        f.write_all_at(b"damage", 200 * 1024).unwrap();
    }
    ok(a.request(Request::Verify).await);
    // The verify this node drives shows its progress over the whole device.
    let s = a.status().await.unwrap();
    let v = s.verify.expect("verify progress while it runs");
    assert_eq!(v.total_bytes, s.size_bytes);
    assert!(v.done_bytes <= v.total_bytes);
    let s = wait_for(&a, "verify found the damage", |s| {
        s.replication == ReplicationState::Established && s.out_of_sync_bytes > 0
    })
    .await;
    assert!(s.out_of_sync_bytes <= 128 * 1024, "{s:?}");
    ok(a.request(Request::Resync).await);
    for h in [&a, &b] {
        wait_for(h, "resync repaired it", |s| {
            s.replication == ReplicationState::Established && s.out_of_sync_bytes == 0
        })
        .await;
    }
    let size = s.size_bytes;
    assert!(
        p.data("alpha", size) == p.data("bravo", size),
        "replicas identical"
    );
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

/// A pair with `resync_rate = RATE` whose primary (alpha) wrote `len`
/// bytes of `seed`'s pattern while disconnected, then reconnected: the
/// resync of those bytes is under way.
async fn paced_resync(p: &Pair, rate: &str, len: usize, seed: u8) -> (NodeHandle, NodeHandle) {
    let cfg = variant(
        p,
        "paced.toml",
        "io_engine = \"sync\"\n",
        &format!("io_engine = \"sync\"\nresync_rate = \"{rate}\"\n"),
    );
    let a = start(&cfg, "alpha").await.unwrap();
    let b = start(&cfg, "bravo").await.unwrap();
    established(&a).await;
    ok(a.request(Request::NewCurrentUuid { clear_bitmap: true })
        .await);
    ok(a.request(Request::Primary { force: false }).await);
    ok(a.request(Request::Disconnect).await);
    a.target.write(0, pattern(seed, len), false).await.unwrap();
    ok(a.request(Request::Connect).await);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_resync_reports_a_sane_rate_on_both_sides() {
    // Proves resync_rate pacing and the progress report: with a 2 MiB/s
    // limit, both the source and the target report a rate near the limit
    // (not the unmeasured source's absurd one) while it runs.
    let p = Pair::new();
    let (a, b) = paced_resync(&p, "2M", 3 * 1024 * 1024, 0x21).await;
    let limit = 2 * 1024 * 1024;
    for h in [&a, &b] {
        let s = wait_for(h, "a measured resync rate", |s| {
            s.resync
                .is_some_and(|r| r.rate_bytes_per_s > 0 && r.done_bytes > 512 * 1024)
        })
        .await;
        let r = s.resync.unwrap();
        assert!(r.rate_bytes_per_s <= 2 * limit, "{r:?}");
        assert!(r.eta_s.is_some(), "{r:?}");
    }
    // `resync` on the source says what runs and where a retry is asked.
    let m = ok_message(a.request(Request::Resync).await);
    assert!(
        m.contains("already running") && m.contains("`replctl resync` on bravo"),
        "{m}"
    );
    for h in [&a, &b] {
        wait_for(h, "resync done", |s| {
            s.replication == ReplicationState::Established && s.out_of_sync_bytes == 0
        })
        .await;
    }
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_resync_shows_no_rate_and_no_eta_until_resumed() {
    // Proves pause-sync stops the resync on both sides and the progress
    // says so: rate 0, no ETA, nothing done meanwhile (an average since
    // the start would show the old speed and a finite ETA); resume-sync
    // continues it to the end.
    let p = Pair::new();
    let (a, b) = paced_resync(&p, "1M", 4 * 1024 * 1024, 0x33).await;
    wait_for(&a, "a running resync", |s| {
        s.resync
            .is_some_and(|r| r.rate_bytes_per_s > 0 && r.done_bytes > 256 * 1024)
    })
    .await;
    ok(a.request(Request::PauseSync).await);
    for h in [&a, &b] {
        let s = wait_for(h, "a paused resync", |s| s.replication.is_paused()).await;
        let r = s.resync.expect("a paused resync still reports progress");
        assert_eq!(r.rate_bytes_per_s, 0, "{r:?}");
        assert_eq!(r.eta_s, None, "{r:?}");
        assert!(r.done_bytes < r.total_bytes, "{r:?}");
        // `resync` says what holds it, on either side.
        let m = ok_message(h.request(Request::Resync).await);
        assert!(m.contains("paused") && m.contains("resume-sync"), "{m}");
    }
    // Requests sent before the pause still land (as in DRBD); then
    // nothing moves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut paused_at = Vec::new();
    for h in [&a, &b] {
        let r = h.status().await.expect("status").resync.expect("paused");
        paused_at.push(r.done_bytes);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (h, before) in [&a, &b].into_iter().zip(paused_at) {
        let r = h.status().await.expect("status").resync.expect("paused");
        assert_eq!(r.done_bytes, before, "nothing moves while paused");
        assert_eq!((r.rate_bytes_per_s, r.eta_s), (0, None), "{r:?}");
    }
    ok(a.request(Request::ResumeSync).await);
    // Measured from the resume on, and paced: the pause saved no rate up
    // to spend at full speed.
    let s = wait_for(&a, "the resumed resync's rate", |s| {
        !s.replication.is_paused() && s.resync.is_some_and(|r| r.rate_bytes_per_s > 0)
    })
    .await;
    let r = s.resync.expect("running");
    assert!(r.rate_bytes_per_s <= 2 * 1024 * 1024, "{r:?}");
    assert!(r.eta_s.is_some(), "{r:?}");
    for h in [&a, &b] {
        wait_for(h, "resync done", |s| {
            s.replication == ReplicationState::Established && s.out_of_sync_bytes == 0
        })
        .await;
    }
    assert_eq!(p.data("alpha", 4 << 20), p.data("bravo", 4 << 20));
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_leaves_a_file_at_the_nbd_path_alone_and_says_why() {
    // Proves a promotion whose NBD Unix path holds something that is not a
    // socket (a mistyped path in the config) is refused with the reason and
    // deletes nothing; once the path is free the same promotion serves. A
    // socket left by a dead process is still replaced.
    let p = Pair::new();
    let a = p.start("alpha").await;
    let b = p.start("bravo").await;
    established(&a).await;
    ok(a.request(Request::NewCurrentUuid { clear_bitmap: true })
        .await);
    let path = p.dir.path().join("alpha.nbd");
    std::fs::write(&path, b"precious").unwrap();
    match a.request(Request::Primary { force: false }).await {
        Response::Error(e) => assert!(e.contains("not a socket"), "{e}"),
        r => panic!("promotion with a file at the NBD path: {r:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    assert_eq!(a.status().await.unwrap().role, Role::Secondary);
    std::fs::remove_file(&path).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    ok(a.request(Request::Primary { force: false }).await);
    assert_eq!(a.status().await.unwrap().role, Role::Primary);
    tokio::net::UnixStream::connect(&path).await.unwrap();
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demotion_with_nbd_clients_needs_force_and_then_closes_them() {
    // Proves the export follows the role: promotion serves NBD on the
    // configured socket, demotion is refused while a client is connected,
    // `--force` closes the client and stops the export.
    use tokio::io::AsyncReadExt;
    let p = Pair::new();
    let (a, b) = p.up().await;
    let sock = p.dir.path().join("alpha.nbd");
    let mut client = tokio::net::UnixStream::connect(&sock).await.unwrap();
    wait_for(&a, "one NBD client", |s| s.nbd_clients == 1).await;
    let r = a.request(Request::Secondary { force: false }).await;
    match r {
        Response::Error(e) => assert!(e.contains("connected") && e.contains("--force"), "{e}"),
        other => panic!("demotion with a client must be refused: {other:?}"),
    }
    assert_eq!(a.status().await.unwrap().role, Role::Primary);
    ok(a.request(Request::Secondary { force: true }).await);
    let s = a.status().await.unwrap();
    assert_eq!(
        (s.role, s.nbd.as_deref(), s.nbd_clients),
        (Role::Secondary, None, 0)
    );
    // The client's connection was closed (after the server's greeting).
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(STATE_DEADLINE_MS);
    loop {
        let n = tokio::time::timeout_at(deadline, client.read(&mut buf))
            .await
            .expect("the client is closed in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
    }
    assert!(!sock.exists(), "the NBD socket is removed with the export");
    // Promotion serves again.
    ok(a.request(Request::Primary { force: false }).await);
    assert!(sock.exists());
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_resync_resumes_where_it_stopped_after_a_restart() {
    // Proves a clean stop in the middle of a resync keeps what is left in
    // the persisted bitmap: after the restart only the rest is transferred
    // and the replicas end identical.
    let p = Pair::new();
    let cfg = variant(
        &p,
        "paced.toml",
        "io_engine = \"sync\"\n",
        "io_engine = \"sync\"\nresync_rate = \"2M\"\n",
    );
    let a = start(&cfg, "alpha").await.unwrap();
    let b = start(&cfg, "bravo").await.unwrap();
    established(&a).await;
    ok(a.request(Request::NewCurrentUuid { clear_bitmap: true })
        .await);
    ok(a.request(Request::Primary { force: false }).await);
    ok(a.request(Request::Disconnect).await);
    let total = 4 * 1024 * 1024u64;
    a.target
        .write(0, pattern(0x42, total as usize), false)
        .await
        .unwrap();
    ok(a.request(Request::Connect).await);
    wait_for(&b, "resync under way", |s| {
        s.resync.is_some_and(|r| r.done_bytes >= 1024 * 1024)
    })
    .await;
    b.stop();
    b.wait().await.unwrap();
    let left = dump_md(&cfg, "bravo").unwrap().out_of_sync_bytes;
    assert!(left > 0 && left < total, "persisted {left} of {total} left");
    let b = start(&cfg, "bravo").await.unwrap();
    for h in [&a, &b] {
        wait_for(h, "resync finished after restart", |s| {
            s.replication == ReplicationState::Established && s.out_of_sync_bytes == 0
        })
        .await;
    }
    let moved = b.status().await.unwrap().resync_transferred_bytes;
    assert!(moved <= left, "resent {moved} bytes, only {left} were left");
    let size = a.status().await.unwrap().size_bytes;
    assert!(
        p.data("alpha", size) == p.data("bravo", size),
        "replicas identical"
    );
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_bitmap_shows_both_disks_up_to_date_on_both_nodes() {
    // Proves `new-current-uuid --clear-bitmap` on fresh disks makes both
    // nodes report both disks UpToDate with nothing out of sync, without
    // any role change (each side tells the other its new disk state).
    let p = Pair::new();
    let a = p.start("alpha").await;
    let b = p.start("bravo").await;
    established(&a).await;
    established(&b).await;
    ok(a.request(Request::NewCurrentUuid { clear_bitmap: true })
        .await);
    for h in [&a, &b] {
        wait_for(h, "both disks UpToDate", |s| {
            s.disk == crate::control::protocol::DiskState::UpToDate
                && s.peer_disk == crate::control::protocol::DiskState::UpToDate
                && s.out_of_sync_bytes == 0
                && s.replication == ReplicationState::Established
        })
        .await;
    }
    a.stop();
    b.stop();
    a.wait().await.unwrap();
    b.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_a_and_b_replicate_and_flush_makes_both_durable() {
    // Proves the runtime under protocols A and B: writes complete (without
    // waiting for the peer's disk), status names the protocol, and after a
    // flush both replicas are identical.
    for proto in ["A", "B"] {
        let p = Pair::new();
        let cfg = variant(
            &p,
            "proto.toml",
            "resource = \"r0\"\n",
            &format!("resource = \"r0\"\nprotocol = \"{proto}\"\n"),
        );
        let a = start(&cfg, "alpha").await.unwrap();
        let b = start(&cfg, "bravo").await.unwrap();
        established(&a).await;
        ok(a.request(Request::NewCurrentUuid { clear_bitmap: true })
            .await);
        ok(a.request(Request::Primary { force: false }).await);
        let s = a.status().await.unwrap();
        assert_eq!(format!("{:?}", s.protocol), proto);
        for i in 0..16u64 {
            a.target
                .write(i * 65536, pattern(i as u8, 65536), false)
                .await
                .unwrap();
        }
        a.target.flush().await.unwrap();
        let size = s.size_bytes;
        assert!(
            p.data("alpha", size) == p.data("bravo", size),
            "protocol {proto}: replicas identical after flush"
        );
        a.stop();
        b.stop();
        a.wait().await.unwrap();
        b.wait().await.unwrap();
    }
}
