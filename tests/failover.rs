//! Failover by hand with real processes: the primary is killed with
//! SIGKILL while a client writes (8 in flight, some FUA) and logs every
//! acknowledged write; the secondary is promoted and must hold every
//! acknowledged write; the killed node returns as secondary and resyncs.
//! Repeated with the roles swapping and different kill points.
#![forbid(unsafe_code)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, ClusterSpec, STATE_TIMEOUT};
use common::{require_python_nbd, run_within, tests_path, wait_with_deadline, PYTHON};

/// Blocks of 4 KiB each iteration's writer may write (far more than it
/// gets to before the kill).
const BLOCKS_PER_ITERATION: u64 = 4096;
/// The writer gets this long to reach its kill point.
const WRITER_PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);
/// After the kill, the writer must notice the lost connection this fast.
const WRITER_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Exit status of the writer when the server went away.
const WRITER_EXIT_CONNECTION_LOST: i32 = 3;
/// A returning node's resync (a few MiB plus AL extents) takes at most this.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between polls of the writer's log.
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(10);
const MIB: u64 = 1 << 20;

fn acked_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn start_writer(uri: &str, log: &Path, first_block: u64, seed: u64) -> Child {
    Command::new(PYTHON)
        .arg(tests_path("scripts/acked_writer.py"))
        .args(["write", uri])
        .arg(log)
        .args([
            first_block.to_string(),
            BLOCKS_PER_ITERATION.to_string(),
            seed.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn acked_writer.py")
}

fn check_log(uri: &str, log: &Path) -> String {
    let out = run_within(
        Command::new(PYTHON)
            .arg(tests_path("scripts/acked_writer.py"))
            .args(["check", uri])
            .arg(log),
        Duration::from_secs(120),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "acknowledged writes lost: {text}");
    text
}

#[test]
fn primary_kill_during_writes_loses_no_acknowledged_write() {
    // Proves invariants 1 and 3 across a crash: at three kill points (after
    // 50, 600 and 1500 acknowledged writes, roles swapping each time) every
    // write the client saw acknowledged, FUA or not, is on the promoted
    // secondary; an UpToDate secondary whose primary died promotes without
    // --force (DRBD's behaviour without fencing); the killed node comes
    // back as Secondary, resyncs, and the replicas end byte-identical.
    require_python_nbd();
    let mut c = Cluster::up(ClusterSpec::default());
    let kill_points = [50usize, 600, 1500];
    let mut logs = Vec::new();
    let (mut primary, mut secondary) = (0usize, 1usize);
    for (i, &kill_after) in kill_points.iter().enumerate() {
        let log = c.dir().join(format!("acked-{i}.log"));
        let mut writer = start_writer(
            &c.nodes[primary].uri(),
            &log,
            i as u64 * BLOCKS_PER_ITERATION,
            1000 + i as u64,
        );
        let deadline = Instant::now() + WRITER_PROGRESS_TIMEOUT;
        while acked_lines(&log) < kill_after {
            if let Some(status) = writer.try_wait().expect("poll writer") {
                panic!(
                    "writer {i} ended with {status} before {kill_after} acknowledged writes\n{}",
                    c.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "writer {i} did not reach {kill_after} acknowledged writes in {WRITER_PROGRESS_TIMEOUT:?}"
            );
            std::thread::sleep(LOG_POLL_INTERVAL);
        }
        c.nodes[primary].kill_hard();
        let status = wait_with_deadline(&mut writer, WRITER_EXIT_TIMEOUT).unwrap_or_else(|| {
            let _ = writer.kill();
            panic!("writer {i} did not notice its server was killed");
        });
        assert_eq!(
            status.code(),
            Some(WRITER_EXIT_CONNECTION_LOST),
            "writer {i} should have lost its connection mid-run"
        );
        let acked = acked_lines(&log);
        eprintln!(
            "iteration {i}: killed {} after {acked} acknowledged writes",
            c.nodes[primary].name
        );
        logs.push(log);

        let s = &c.nodes[secondary];
        s.wait_status("notices the primary is gone", STATE_TIMEOUT, |st| {
            st["connection"] != "Connected" && st["peer_role"] == "Unknown"
        });
        let st = s.status();
        assert_eq!(st["disk"], "UpToDate", "the survivor's data: {st}");
        s.replctl_ok(&["primary"]);
        s.wait_nbd();
        for log in &logs {
            check_log(&s.uri(), log);
        }

        c.nodes[primary].start();
        c.wait_in_sync(RESYNC_TIMEOUT);
        let back = c.nodes[primary].status();
        assert_eq!(
            back["role"], "Secondary",
            "a crashed primary returns as Secondary: {back}"
        );
        (primary, secondary) = (secondary, primary);
    }
    c.assert_replicas_identical();
    for n in &c.nodes {
        n.assert_no_panic_logged();
    }
}

#[test]
fn inconsistent_sync_target_refuses_promotion_without_force() {
    // Proves invariant 6 with real processes: a secondary whose resync was
    // cut short by the primary's death is Inconsistent, so `replctl
    // primary` fails with a sentence naming the disk state and serves
    // nothing; `replctl primary --force` then promotes it and it serves.
    let mut c = Cluster::up(ClusterSpec {
        // 8 MiB at 1 MiB/s: the resync is still running when alpha dies.
        resync_rate: Some("1M".into()),
        ..ClusterSpec::default()
    });
    c.bravo().replctl_ok(&["disconnect"]);
    c.alpha()
        .wait_status("sees bravo gone", STATE_TIMEOUT, |s| {
            s["connection"] != "Connected"
        });
    common::cluster::qemu_io(&c.alpha().uri(), &["write -P 0x42 0 8M"]);
    c.bravo().replctl_ok(&["connect"]);
    c.bravo().wait_status("is SyncTarget", STATE_TIMEOUT, |s| {
        s["replication"] == "SyncTarget" && s["disk"] == "Inconsistent"
    });
    c.nodes[0].kill_hard();
    let s = c
        .bravo()
        .wait_status("notices alpha is gone", STATE_TIMEOUT, |s| {
            s["connection"] != "Connected"
        });
    assert_eq!(s["disk"], "Inconsistent", "{s}");
    let out = c.bravo().replctl(&["primary"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an Inconsistent node was promoted without --force"
    );
    assert!(
        err.contains("Inconsistent"),
        "the refusal does not name the disk state: {err}"
    );
    assert_eq!(c.bravo().status()["role"], "Secondary");
    assert!(!c.bravo().serves_nbd(), "a refused node serves NBD");
    c.bravo().replctl_ok(&["primary", "--force"]);
    c.bravo().wait_nbd();
    assert_eq!(c.bravo().status()["role"], "Primary");
}

/// A child process killed when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls the JSON lines in `path` until one satisfies `pred`; returns it.
fn wait_event(
    path: &Path,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Only whole lines: the last one may still be being written.
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let ev: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("events printed a line that is not JSON ({e}): {line}"));
            if pred(&ev) {
                return ev;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no event for {what} within {STATE_TIMEOUT:?}; events so far:\n{text}"
        );
        std::thread::sleep(LOG_POLL_INTERVAL);
    }
}

#[test]
fn events_stream_reports_the_primary_loss_and_the_promotion() {
    // Proves `replctl events` as a failover manager would use it: the
    // initial dump ends with `exists -`, then the secondary's stream shows
    // the connection leaving Connected with the peer role Unknown when the
    // primary is killed, and the resource turning Primary when promoted.
    let mut c = Cluster::up(ClusterSpec::default());
    let events = c.dir().join("bravo-events.jsonl");
    let out = std::fs::File::create(&events).expect("create events file");
    let child = Command::new(common::cluster::program("replctl"))
        .arg("--config")
        .arg(&c.bravo().config)
        .args(["--node", "bravo", "events"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn replctl events");
    let _events = KillOnDrop(child);
    wait_event(&events, "the end of the initial dump", |e| {
        e["type"] == "exists" && e["object"] == "-"
    });
    c.nodes[0].kill_hard();
    wait_event(&events, "the lost connection", |e| {
        e["type"] == "change"
            && e["object"] == "connection"
            && e["connection"].as_str().is_some_and(|s| s != "Connected")
            && e["peer_role"] == "Unknown"
    });
    c.bravo().replctl_ok(&["primary"]);
    wait_event(&events, "the promotion", |e| {
        e["type"] == "change" && e["object"] == "resource" && e["role"] == "Primary"
    });
}

#[test]
fn planned_switchover_moves_the_export_and_keeps_the_data() {
    // Proves the hand-over of a healthy pair: while alpha is Primary the
    // connected secondary refuses `primary` (single primary) and serves no
    // NBD; after `secondary` on alpha and `primary` on bravo the export
    // moves to bravo with alpha's data, alpha stops serving, and writes on
    // bravo replicate back to alpha.
    let c = Cluster::up(ClusterSpec::default());
    assert!(!c.bravo().serves_nbd(), "a Secondary serves NBD");
    let out = c.bravo().replctl(&["primary"]);
    assert!(
        !out.status.success(),
        "a second Primary was allowed while connected: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(c.bravo().status()["role"], "Secondary");
    common::cluster::qemu_io(&c.alpha().uri(), &["write -P 0x5e 1M 1M", "flush"]);
    c.alpha().replctl_ok(&["secondary"]);
    wait_not_serving(c.alpha());
    c.bravo()
        .wait_status("sees alpha Secondary", STATE_TIMEOUT, |s| {
            s["peer_role"] == "Secondary"
        });
    c.bravo().replctl_ok(&["primary"]);
    c.bravo().wait_nbd();
    common::cluster::qemu_io(
        &c.bravo().uri(),
        &["read -P 0x5e 1M 1M", "write -P 0x6f 3M 64k", "flush"],
    );
    c.wait_in_sync(RESYNC_TIMEOUT);
    assert_eq!(
        c.alpha().read_data(3 << 20, 65536),
        vec![0x6f; 65536],
        "bravo's write did not reach alpha"
    );
    c.assert_replicas_identical();
}

#[test]
fn promotion_onto_a_taken_nbd_port_is_refused_with_the_reason_and_retried() {
    // Proves a promotion whose NBD address is taken by another process fails
    // with a sentence naming the address, leaves the node Secondary (the
    // engine is not promoted without its export), and the same command
    // succeeds once the address is free.
    let c = Cluster::up(ClusterSpec::default());
    c.alpha().replctl_ok(&["secondary"]);
    wait_not_serving(c.alpha());
    c.bravo()
        .wait_status("sees alpha Secondary", STATE_TIMEOUT, |s| {
            s["peer_role"] == "Secondary"
        });
    let squatter = std::net::TcpListener::bind(("127.0.0.1", c.bravo().nbd_port))
        .expect("take bravo's NBD port");
    let out = c.bravo().replctl(&["primary"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "promotion onto a taken port: {text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", c.bravo().nbd_port)),
        "the refusal does not name the address: {text}"
    );
    assert_eq!(c.bravo().status()["role"], "Secondary");
    drop(squatter);
    c.bravo().replctl_ok(&["primary"]);
    c.bravo().wait_nbd();
    common::cluster::qemu_io(&c.bravo().uri(), &["write -P 0x44 0 64k", "flush"]);
    c.wait_in_sync(RESYNC_TIMEOUT);
    c.assert_replicas_identical();
}

/// Waits until `node` no longer answers the NBD greeting.
fn wait_not_serving(node: &common::cluster::Node) {
    let deadline = Instant::now() + STATE_TIMEOUT;
    while node.serves_nbd() {
        assert!(
            Instant::now() < deadline,
            "{} still serves NBD as Secondary",
            node.name
        );
        std::thread::sleep(LOG_POLL_INTERVAL);
    }
}

#[test]
fn socket_activated_exports_follow_the_role_across_promotions() {
    // Proves that a node started by systemd socket activation serves its
    // export on the passed socket whenever it is Primary, and only then:
    // demoted, it stops answering on it (the socket stays open for the next
    // promotion); promoted again, it serves on the same socket. Alpha
    // serves, hands over to bravo, and takes the export back.
    let c = Cluster::up(ClusterSpec {
        activated: true,
        ..ClusterSpec::default()
    });
    assert!(!c.bravo().serves_nbd(), "a Secondary serves NBD");
    assert_eq!(c.alpha().status()["nbd"], "socket activation");
    let qemu_io = common::cluster::qemu_io;
    qemu_io(&c.alpha().uri(), &["write -P 0x31 1M 64k", "flush"]);
    for (from, to, pattern) in [(0, 1, 0x32), (1, 0, 0x33)] {
        let (from, to) = (&c.nodes[from], &c.nodes[to]);
        from.replctl_ok(&["secondary"]);
        wait_not_serving(from);
        to.wait_status("sees its peer Secondary", STATE_TIMEOUT, |s| {
            s["peer_role"] == "Secondary"
        });
        to.replctl_ok(&["primary"]);
        to.wait_nbd();
        qemu_io(
            &to.uri(),
            &[
                &format!("read -P {} 1M 64k", pattern - 1),
                &format!("write -P {pattern} 1M 64k"),
                "flush",
            ],
        );
    }
    c.wait_in_sync(RESYNC_TIMEOUT);
    assert_eq!(c.bravo().read_data(1 << 20, 65536), vec![0x33; 65536]);
    c.assert_replicas_identical();
}

#[test]
fn crashed_primary_returns_and_resyncs_only_its_activity_log_extents() {
    // Proves invariant 4 for a crashed primary: after `kill -9` of the
    // primary and promotion of the secondary, the old primary comes back
    // and only the extents its activity log held hot (three 4 MiB extents
    // here) plus what the new primary wrote are resynced, far below the
    // 256 MiB device, and the replicas end identical.
    const DEVICE_BYTES: u64 = 256 << 20;
    const AL_EXTENT_BYTES: u64 = 4 << 20;
    let mut c = Cluster::up(ClusterSpec {
        disk_bytes: DEVICE_BYTES,
        ..ClusterSpec::default()
    });
    // Three hot extents on alpha: at 0, 100 MiB and 200 MiB.
    common::cluster::qemu_io(
        &c.alpha().uri(),
        &[
            "write -P 0x31 0 1M",
            "write -P 0x32 100M 1M",
            "write -P 0x33 200M 1M",
        ],
    );
    c.nodes[0].kill_hard();
    c.bravo()
        .wait_status("notices alpha is gone", STATE_TIMEOUT, |s| {
            s["connection"] != "Connected"
        });
    c.bravo().replctl_ok(&["primary"]);
    c.bravo().wait_nbd();
    common::cluster::qemu_io(&c.bravo().uri(), &["write -P 0x34 50M 512k"]);
    let before = c.bravo().status()["resync_transferred_bytes"]
        .as_u64()
        .expect("resync_transferred_bytes");
    c.nodes[0].start();
    c.wait_in_sync(RESYNC_TIMEOUT);
    let sent = c.bravo().status()["resync_transferred_bytes"]
        .as_u64()
        .expect("resync_transferred_bytes")
        - before;
    eprintln!("resync after the old primary's return: {sent} bytes");
    let bound = 3 * AL_EXTENT_BYTES + (512 << 10);
    assert!(
        sent >= 512 << 10,
        "the new primary's 512 KiB were not resynced: {sent} bytes sent"
    );
    assert!(
        sent <= bound,
        "resync sent {sent} bytes, more than the 3 hot AL extents and the 512 KiB written ({bound})"
    );
    assert_eq!(
        c.alpha().read_data(50 << 20, 512 << 10),
        vec![0x34; 512 << 10]
    );
    c.assert_replicas_identical();
}

/// A tmpfs of a given size mounted for one test (the tests run as root, as
/// CI does); unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            ok.success(),
            "cannot mount a tmpfs at {} (needs root)",
            dir.display()
        );
        SmallFs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(
            ok.success(),
            "cannot resize the tmpfs at {}",
            self.0.display()
        );
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_secondary_whose_disk_writes_fail_is_not_promoted_without_force() {
    // Proves invariant 6 with a real disk error: bravo's backing file lives
    // on a 2 MiB file system, so its writes past that fail (ENOSPC) while
    // alpha acknowledges them to the client. Bravo must turn Inconsistent
    // (and stay so across a restart), and once alpha is killed refuse to
    // become Primary without --force: promoted, it would serve a disk
    // without those acknowledged writes. With room again and alpha back,
    // the resync makes the replicas identical.
    let c = Cluster::prepare(ClusterSpec {
        disk_bytes: 16 * MIB,
        ..ClusterSpec::default()
    });
    let small = SmallFs::mount(&c.dir().join("small"), "2m");
    let on_small = small.0.join("bravo.img");
    std::fs::File::create(&on_small)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("sparse file on the small file system");
    std::fs::remove_file(&c.nodes[1].disk).expect("remove bravo's file");
    // Its metadata is in a file of its own, made for a disk of this size.
    std::os::unix::fs::symlink(&on_small, &c.nodes[1].disk).expect("link bravo's disk");
    let mut c = c.started();
    let data = MIB as usize * 8;
    let out = common::cluster::qemu_io(&c.alpha().uri(), &["write -P 0x5a 0 8M"]);
    assert!(
        !out.contains("error"),
        "alpha acknowledges the writes: {out}"
    );
    c.bravo()
        .wait_status("Inconsistent after its writes failed", STATE_TIMEOUT, |s| {
            s["disk"] == "Inconsistent"
        });
    c.alpha()
        .wait_status("sees bravo Inconsistent", STATE_TIMEOUT, |s| {
            s["peer_disk"] == "Inconsistent"
        });
    c.nodes[0].kill_hard();
    c.nodes[1].stop();
    c.nodes[1].start();
    c.bravo()
        .wait_status("still Inconsistent after a restart", STATE_TIMEOUT, |s| {
            s["disk"] == "Inconsistent"
        });
    let refused = c.bravo().replctl(&["primary"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("Inconsistent"),
        "{err}"
    );
    assert!(
        !c.bravo().serves_nbd(),
        "bravo must not serve its partial copy"
    );

    small.resize("64m");
    c.nodes[0].start();
    c.wait_in_sync(RESYNC_TIMEOUT);
    assert!(
        c.bravo().read_data(0, data) == vec![0x5a; data],
        "bravo lacks the acknowledged writes after the resync"
    );
    c.assert_replicas_identical();
    drop(c);
}

/// How a [`FlakyDisk`] misbehaves while its trigger file exists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// A volatile write cache that loses it: writes are accepted and
    /// dropped, and flushes fail with EIO (a write-back error, which Linux
    /// reports only at fsync), the first flush after a loss too.
    LosesWrites,
    /// Writes fail with EIO.
    FailsWrites,
    /// Reads fail with EIO.
    FailsReads,
}

/// A file that fails on demand: nbdkit's eval plugin over a backing file,
/// shown as a file by nbdfuse.
struct FlakyDisk {
    mount: std::path::PathBuf,
    /// The file nbdfuse shows.
    file: std::path::PathBuf,
    /// The medium: what survived.
    back: std::path::PathBuf,
    trigger: std::path::PathBuf,
    fuse: Child,
}

impl FlakyDisk {
    /// `name`-back.img of `size` bytes (a copy of `from`, if given) shown
    /// at `name`/disk in `dir`.
    fn start(dir: &Path, name: &str, size: u64, from: Option<&Path>, flaw: Flaw) -> FlakyDisk {
        common::require_tool("nbdfuse", "libnbd-bin");
        common::require_tool("nbdkit", "nbdkit");
        let back = dir.join(format!("{name}-back.img"));
        match from {
            Some(src) => {
                std::fs::copy(src, &back).expect("copy into the backing file");
            }
            None => {
                std::fs::File::create(&back)
                    .and_then(|f| f.set_len(size))
                    .expect("backing file");
            }
        }
        let trigger = dir.join(format!("{name}-trigger"));
        let mount = dir.join(name);
        std::fs::create_dir_all(&mount).expect("mount point");
        let file = mount.join("disk");
        let (b, t) = (back.display(), trigger.display());
        let write = format!("dd of={b} bs=64k oflag=seek_bytes conv=notrunc seek=$4 status=none");
        let eio = "echo 'EIO injected' >&2; exit 1";
        // A lost write is reported once, at the next flush, even if that
        // comes after the trigger is gone (Linux's errseq: a write-back
        // error reaches the next fsync).
        let lost = dir.join(format!("{name}-lost"));
        let l = lost.display();
        let mut pread =
            format!("dd if={b} bs=64k iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none");
        if flaw == Flaw::FailsReads {
            pread = format!("if [ -e {t} ]; then {eio}; fi; {pread}");
        }
        let (pwrite, flush) = match flaw {
            Flaw::LosesWrites => (
                format!("if [ -e {t} ]; then touch {l}; cat >/dev/null; exit 0; fi; {write}"),
                format!("if [ -e {t} ] || [ -e {l} ]; then rm -f {l}; {eio}; fi"),
            ),
            Flaw::FailsWrites => (
                format!("if [ -e {t} ]; then cat >/dev/null; {eio}; fi; {write}"),
                "exit 0".to_string(),
            ),
            Flaw::FailsReads => (write, "exit 0".to_string()),
        };
        let fuse = Command::new("nbdfuse")
            .arg(&file)
            .args(["[", "nbdkit", "eval"])
            .arg(format!("get_size=stat -c %s {b}"))
            .arg(format!("pread={pread}"))
            .arg(format!("pwrite={pwrite}"))
            .arg(format!("flush={flush}"))
            .args(["can_write=exit 0", "can_flush=exit 0", "]"])
            .stdin(Stdio::null())
            .spawn()
            .expect("run nbdfuse");
        let mut d = FlakyDisk {
            mount,
            file,
            back,
            trigger,
            fuse,
        };
        let size = std::fs::metadata(&d.back).expect("stat backing file").len();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::metadata(&d.file).is_ok_and(|m| m.len() == size) {
            assert!(
                d.fuse.try_wait().expect("nbdfuse status").is_none(),
                "nbdfuse exited"
            );
            assert!(Instant::now() < deadline, "nbdfuse did not show the disk");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// Put the flaky file where `path` was.
    fn replace(&self, path: &Path) {
        std::fs::remove_file(path).expect("remove the file it replaces");
        std::os::unix::fs::symlink(&self.file, path).expect("link the flaky file");
    }

    fn failing(&self, on: bool) {
        if on {
            std::fs::write(&self.trigger, b"").expect("trigger");
        } else {
            std::fs::remove_file(&self.trigger).expect("remove trigger");
        }
    }

    fn medium(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.back).expect("open the medium");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).expect("read the medium");
        buf
    }
}

impl Drop for FlakyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = self.fuse.kill();
        let _ = self.fuse.wait();
    }
}

/// Whether `status` names a failed `op` ("flush", "read", ...) with EIO as
/// its last disk error.
fn disk_error_is_eio(status: &serde_json::Value, op: &str) -> bool {
    status["disk_error"]
        .as_str()
        .is_some_and(|e| e.contains(op) && e.contains("Input/output error"))
}

/// A started pair of 16 MiB whose node `n` has a [`FlakyDisk`] with `flaw`
/// as its data disk (its metadata is in a file of its own, made for a disk
/// of this size); the disk works until told to fail.
fn pair_with_flaky_disk(n: usize, flaw: Flaw) -> (Cluster, FlakyDisk) {
    let c = Cluster::prepare(ClusterSpec {
        disk_bytes: 16 * MIB,
        ..ClusterSpec::default()
    });
    let flaky = FlakyDisk::start(c.dir(), "flaky", 16 * MIB, None, flaw);
    flaky.replace(&c.nodes[n].disk);
    (c.started(), flaky)
}

#[test]
fn a_secondary_whose_disk_flushes_fail_is_not_promoted_without_force() {
    // Invariant 6 with a write-back error: bravo's disk (direct = false)
    // accepts writes into a cache and then fails the flush that should
    // have made them durable, losing them. Bravo answered those writes as
    // done; alpha acknowledged them to the client. Bravo must turn
    // Inconsistent when its flush fails, and refuse an unforced promotion
    // once alpha is killed; alpha must have marked the lost writes, so the
    // resync after its return restores them.
    let (mut c, flaky) = pair_with_flaky_disk(1, Flaw::LosesWrites);
    let uri = c.alpha().uri();
    let out = common::cluster::qemu_io(&uri, &["write -P 0x5a 0 1M", "flush"]);
    assert!(!out.contains("error"), "{out}");
    assert_eq!(c.bravo().status()["disk"], "UpToDate");

    flaky.failing(true);
    let out = common::cluster::qemu_io(&uri, &["write -P 0xa5 1M 1M", "flush"]);
    assert!(
        !out.contains("error"),
        "alpha's own copy is durable: the client's write and flush succeed: {out}"
    );
    c.bravo()
        .wait_status("Inconsistent after its flush failed", STATE_TIMEOUT, |s| {
            s["disk"] == "Inconsistent" && disk_error_is_eio(s, "flush")
        });
    c.alpha()
        .wait_status("sees bravo Inconsistent", STATE_TIMEOUT, |s| {
            s["peer_disk"] == "Inconsistent" && s["out_of_sync_bytes"].as_u64() >= Some(MIB)
        });
    assert!(
        flaky.medium(MIB, MIB as usize) != vec![0xa5; MIB as usize],
        "the injected write-back error lost the writes on bravo's disk"
    );
    c.nodes[0].kill_hard();
    let refused = c.bravo().replctl(&["primary"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("Inconsistent"),
        "{err}"
    );
    assert!(!c.bravo().serves_nbd(), "bravo must not serve its copy");

    flaky.failing(false);
    c.nodes[0].start();
    c.wait_in_sync(RESYNC_TIMEOUT);
    let mut want = vec![0x5a; MIB as usize];
    want.extend(vec![0xa5; MIB as usize]);
    assert!(
        flaky.medium(0, 2 * MIB as usize) == want,
        "bravo's disk lacks the acknowledged writes after the resync"
    );
    assert_eq!(
        c.bravo().status()["disk_error"],
        serde_json::Value::Null,
        "UpToDate again: the error is history"
    );
    c.assert_replicas_identical();

    // Again with alpha alive, so no crash recovery marks its hot extents:
    // the resync restores the lost writes only if alpha marked them when
    // bravo's flush failed. The operator runs `replctl resync` on bravo
    // once its disk is sound.
    c.alpha().replctl_ok(&["primary"]);
    c.alpha().wait_nbd();
    flaky.failing(true);
    let out = common::cluster::qemu_io(&uri, &["write -P 0x3c 2M 1M", "flush"]);
    assert!(!out.contains("error"), "{out}");
    c.bravo()
        .wait_status("Inconsistent after its flush failed", STATE_TIMEOUT, |s| {
            s["disk"] == "Inconsistent"
        });
    // A resync onto the disk while it still fails: bravo retries after
    // 1 s, then 2 s, ... (RESYNC_DISK_RETRY_FIRST_NS), not at once and
    // for ever (it did about 20 failed flushes a second).
    c.bravo().replctl_ok(&["resync"]);
    c.bravo()
        .wait_status("resyncing onto the failing disk", STATE_TIMEOUT, |s| {
            s["replication"] == "SyncTarget"
        });
    let failed_flushes = |c: &Cluster| {
        c.bravo()
            .log()
            .lines()
            .filter(|l| l.contains("disk operation failed: flush"))
            .count()
    };
    let before = failed_flushes(&c);
    std::thread::sleep(Duration::from_secs(4));
    let during = failed_flushes(&c) - before;
    assert!(
        during <= 4,
        "{during} failed flushes in 4 s: the resync must wait longer after each"
    );
    let status = c.bravo().status();
    assert_eq!(status["replication"], "SyncTarget");
    assert!(
        status["resync_disk_wait_s"].as_u64() >= Some(1),
        "status says the resync waits for the disk: {status}"
    );
    // Alpha, the SyncSource, counts the MiB as out of sync too: it clears
    // a range when bravo wrote it, and marks again what bravo's failed
    // flush lost (it used to clear on sending and show the resync as
    // nearly done).
    c.alpha()
        .wait_status("the source still counts the lost MiB", STATE_TIMEOUT, |s| {
            s["replication"] == "SyncSource"
                && s["out_of_sync_bytes"].as_u64() >= Some(MIB)
                && s["peer_resync_disk_wait"] == true
        });
    // Once the disk is sound, the operator's `resync` retries at once.
    flaky.failing(false);
    c.bravo()
        .replctl_ok_within(&["resync", "--wait"], RESYNC_TIMEOUT);
    assert_eq!(c.bravo().status()["disk"], "UpToDate");
    c.wait_in_sync(RESYNC_TIMEOUT);
    assert!(
        flaky.medium(2 * MIB, MIB as usize) == vec![0x3c; MIB as usize],
        "the resync did not restore the writes bravo's failed flush lost"
    );
    c.assert_replicas_identical();
    drop(c);
    drop(flaky);
}

#[test]
fn a_sync_source_whose_reads_fail_keeps_the_link_while_the_target_waits() {
    // As DRBD's negative resync reply: alpha, the SyncSource, cannot read
    // its disk and answers bravo's requests with ResyncReadFailed. Bravo
    // keeps the blocks marked and asks again after 1 s, 2 s, ...; its
    // status says the peer's disk failed; the link stays up. (Before,
    // alpha dropped the link at the failed read and reconnected at once,
    // over and over.) Once alpha reads again, the resync ends.
    let (mut c, flaky) = pair_with_flaky_disk(0, Flaw::FailsReads);
    c.nodes[1].stop();
    let out = common::cluster::qemu_io(&c.alpha().uri(), &["write -P 0x6b 0 1M", "flush"]);
    assert!(!out.contains("error"), "{out}");
    // A restart drops the FUSE file's page cache, so the resync's reads
    // reach the failing disk.
    c.nodes[0].stop();
    flaky.failing(true);
    c.nodes[0].start();
    c.nodes[1].start();
    c.bravo()
        .wait_status("waits for alpha's disk", STATE_TIMEOUT, |s| {
            s["replication"] == "SyncTarget"
                && s["resync_disk_wait_peer"] == true
                && s["resync_disk_wait_s"].as_u64() >= Some(1)
        });
    c.alpha()
        .wait_status("names its failed read", STATE_TIMEOUT, |s| {
            s["replication"] == "SyncSource"
                && s["peer_disk"] == "Inconsistent"
                && s["peer_resync_disk_wait"] == true
                && disk_error_is_eio(s, "read")
        });
    let text = c.bravo().replctl_ok(&["status"]);
    assert!(
        text.contains("the peer's disk failed; asking again within"),
        "{text}"
    );
    for _ in 0..20 {
        let s = c.bravo().status();
        assert!(
            s["connection"] == "Connected" && s["replication"] == "SyncTarget",
            "the link stays up while alpha cannot read: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    flaky.failing(false);
    c.wait_in_sync(RESYNC_TIMEOUT);
    assert!(
        c.bravo().read_data(0, MIB as usize) == vec![0x6b; MIB as usize],
        "bravo lacks what alpha wrote alone"
    );
    c.assert_replicas_identical();
    drop(c);
    drop(flaky);
}

#[test]
fn a_secondary_whose_metadata_writes_fail_stops_and_resyncs_once_its_disk_is_sound() {
    // A metadata write may not be taken for done when it failed: bravo's
    // activity log or superblock would not say what its data holds after
    // a crash. Bravo's metadata file fails its writes (EIO) from some
    // point on: at its next metadata write (the activity log, when alpha's
    // write reaches a new 4 MiB extent) bravo stops with the reason, alpha
    // goes on alone and marks what bravo misses, and once the metadata
    // disk is sound a restart of bravo resyncs it.
    let c = Cluster::prepare(ClusterSpec {
        disk_bytes: 16 * MIB,
        ..ClusterSpec::default()
    });
    let meta = c.dir().join("bravo.meta");
    let flaky = FlakyDisk::start(c.dir(), "flaky-meta", 0, Some(&meta), Flaw::FailsWrites);
    flaky.replace(&meta);
    let mut c = c.started();
    let uri = c.alpha().uri();
    let out = common::cluster::qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);
    assert!(!out.contains("error"), "{out}");

    flaky.failing(true);
    let out = common::cluster::qemu_io(&uri, &["write -P 0x22 8M 1M", "flush"]);
    assert!(!out.contains("error"), "alpha goes on without bravo: {out}");
    let status = c.nodes[1]
        .wait_exit(STATE_TIMEOUT)
        .expect("bravo stops after its metadata write failed");
    assert!(!status.success(), "{status}");
    let log = c.bravo().log();
    assert!(
        log.contains("metadata write") && log.contains("failed"),
        "bravo says why it stopped: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    c.alpha().wait_status(
        "goes on alone with bravo's blocks marked",
        STATE_TIMEOUT,
        |s| s["connection"] != "Connected" && s["out_of_sync_bytes"].as_u64() >= Some(MIB),
    );
    let out = common::cluster::qemu_io(&uri, &["write -P 0x33 12M 1M"]);
    assert!(!out.contains("error"), "{out}");

    flaky.failing(false);
    c.nodes[1].start();
    c.wait_in_sync(RESYNC_TIMEOUT);
    let mut want = vec![0x22; MIB as usize];
    want.extend(vec![0u8; 3 * MIB as usize]);
    want.extend(vec![0x33; MIB as usize]);
    assert!(
        c.bravo().read_data(8 * MIB, 5 * MIB as usize) == want,
        "bravo lacks alpha's writes after the resync"
    );
    c.assert_replicas_identical();
    drop(c);
    drop(flaky);
}
