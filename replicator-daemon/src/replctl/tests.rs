//! `replctl`'s logic against a fake control server on a real Unix socket:
//! output, exit statuses, error sentences, `--wait` progress, `events`.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::*;
use crate::control::protocol::{
    change_events, DiskState, Event, EventObject, PeerRole, ReplicationState, Role,
    MAX_RESPONSE_BYTES,
};
use crate::control::testing::{sample_status, wait_until, FakeHandler, Fixture, TEST_DEADLINE_MS};

/// A `Write` whose bytes the test can read while `run` still holds it.
#[derive(Debug, Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Outcome {
    code: i32,
    out: String,
    err: String,
}

fn socket_args(path: &Path) -> TargetArgs {
    TargetArgs {
        socket: Some(path.to_owned()),
        ..TargetArgs::default()
    }
}

async fn run_capture(target: &TargetArgs, command: ControlCommand, tty: bool) -> Outcome {
    let (out, err) = (SharedBuf::default(), SharedBuf::default());
    let (mut o, mut e) = (out.clone(), err.clone());
    let mut console = Console {
        out: &mut o,
        err: &mut e,
        out_is_tty: tty,
    };
    let code = tokio::time::timeout(
        std::time::Duration::from_millis(TEST_DEADLINE_MS),
        run(target, &command, &mut console),
    )
    .await
    .expect("replctl did not finish in time");
    Outcome {
        code,
        out: out.text(),
        err: err.text(),
    }
}

fn syncing(done_mib: u64, replication: ReplicationState) -> StatusReport {
    let mut s = sample_status();
    s.replication = replication;
    s.peer_disk = DiskState::Inconsistent;
    s.out_of_sync_bytes = (100 - done_mib) << 20;
    s.resync = Some(Progress {
        done_bytes: done_mib << 20,
        total_bytes: 100 << 20,
        rate_bytes_per_s: 10 << 20,
        eta_s: Some((100 - done_mib) / 10),
    });
    s
}

#[tokio::test]
async fn status_prints_the_human_rendering() {
    // Proves `status` prints exactly render::status_text of the daemon's
    // status and exits 0.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::Status { json: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    assert_eq!(o.out, render::status_text(&sample_status()));
    assert!(o.out.starts_with("vm1 role:Primary\n"));
    assert!(o.err.is_empty());
    fx.shutdown().await;
}

#[tokio::test]
async fn status_json_has_every_stable_field() {
    // Proves `status --json` is one JSON object with the stable DESIGN.md
    // §2 fields and their documented values.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::Status { json: true },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    let value: serde_json::Value = serde_json::from_str(&o.out).unwrap();
    let expected = serde_json::json!({
        "resource": "vm1", "node": "alpha", "role": "Primary", "disk": "UpToDate",
        "connection": "Connected", "replication": "Established", "peer_role": "Secondary",
        "peer_disk": "UpToDate", "size_bytes": 1073741824u64, "out_of_sync_bytes": 0,
        "resync": null
    });
    for (key, want) in expected.as_object().unwrap() {
        assert_eq!(&value[key], want, "field {key}");
    }
    fx.shutdown().await;
}

#[tokio::test]
async fn each_command_sends_its_request_and_prints_the_daemon_message() {
    // Proves the command-to-request mapping (flags included) and that the
    // daemon's message is printed with exit status 0.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let cases = [
        (
            ControlCommand::Primary { force: true },
            Request::Primary { force: true },
        ),
        (
            ControlCommand::Secondary { force: false },
            Request::Secondary { force: false },
        ),
        (ControlCommand::Connect, Request::Connect),
        (ControlCommand::Disconnect, Request::Disconnect),
        (ControlCommand::Resync { wait: false }, Request::Resync),
        (ControlCommand::Verify { wait: false }, Request::Verify),
        (ControlCommand::Invalidate, Request::Invalidate),
        (ControlCommand::InvalidateRemote, Request::InvalidateRemote),
        (ControlCommand::PauseSync, Request::PauseSync),
        (ControlCommand::ResumeSync, Request::ResumeSync),
        (
            ControlCommand::NewCurrentUuid { clear_bitmap: true },
            Request::NewCurrentUuid { clear_bitmap: true },
        ),
    ];
    for (command, request) in cases.clone() {
        let o = run_capture(&socket_args(&fx.path), command, false).await;
        assert_eq!(o.code, EXIT_OK, "{}", o.err);
        assert_eq!(o.out, format!("{} done\n", request.name()));
    }
    let sent: Vec<Request> = cases.into_iter().map(|(_, r)| r).collect();
    assert_eq!(fx.handler.requests(), sent);
    fx.shutdown().await;
}

#[tokio::test]
async fn refused_command_exits_1_with_the_daemon_sentence_on_stderr() {
    // Proves a refusal is one line on stderr, nothing on stdout, exit 1.
    let mut fx = Fixture::start(
        FakeHandler::refusing("The local disk is Outdated; use --force."),
        16,
    );
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::Primary { force: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_FAILED);
    assert_eq!(
        o.err,
        "replctl: primary: The local disk is Outdated; use --force.\n"
    );
    assert!(o.out.is_empty());
    fx.shutdown().await;
}

/// A Unix socket server that reads one line and answers `reply` raw (or
/// closes without answering when `reply` is empty).
fn raw_server(dir: &Path, reply: Vec<u8>) -> std::path::PathBuf {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let path = dir.join("raw.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            let _ = stream.read_line(&mut line).await;
            let _ = stream.get_mut().write_all(&reply).await;
        }
    });
    path
}

#[tokio::test]
async fn garbage_or_silence_from_the_socket_is_one_clear_sentence() {
    // Proves a peer process that is not a replicatord (answers garbage, an
    // over-long line, or nothing) gets exit 1 and one sentence, no panic.
    for (reply, needle) in [
        (
            b"HTTP/1.1 400 Bad Request\r\n".to_vec(),
            "sent an answer that is not valid",
        ),
        (
            b"{\"ok\":false}\n".to_vec(),
            "sent an answer that is not valid",
        ),
        (vec![b'x'; MAX_RESPONSE_BYTES + 10], "longer than"),
        (Vec::new(), "closed the connection without answering"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = raw_server(dir.path(), reply);
        let o = run_capture(
            &socket_args(&path),
            ControlCommand::Status { json: false },
            false,
        )
        .await;
        assert_eq!(o.code, EXIT_FAILED, "{}", o.err);
        assert!(o.err.contains(needle), "{}", o.err);
        assert!(o.err.contains(&path.display().to_string()), "{}", o.err);
        assert_eq!(o.err.lines().count(), 1, "{}", o.err);
        assert!(o.out.is_empty());
    }
}

#[tokio::test]
async fn no_daemon_on_socket_exits_3_with_the_sentence() {
    // Proves the "daemon not running" case via --socket.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm1-alpha.sock");
    let o = run_capture(
        &socket_args(&path),
        ControlCommand::Status { json: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_NO_DAEMON);
    assert_eq!(
        o.err,
        format!(
            "replctl: cannot reach the daemon at {}: is replicatord running?\n",
            path.display()
        )
    );
}

/// Write a two-node config into `dir` whose alpha uses `socket`, the
/// disk `alpha.img` and `meta` ("internal" or a path); returns its path.
fn write_config(dir: &Path, socket: &Path, meta: &str) -> std::path::PathBuf {
    let config = dir.join("vm1.toml");
    std::fs::write(
        &config,
        format!(
            "resource = \"vm1\"\nsecret = \"s\"\n\
             [nodes.alpha]\nreplication = \"127.0.0.1:7789\"\nnbd = \"127.0.0.1:10809\"\n\
             control = \"{}\"\ndisk = \"{}\"\nmeta = \"{meta}\"\n\
             [nodes.bravo]\nreplication = \"127.0.0.1:7790\"\nnbd = \"127.0.0.1:10810\"\n\
             control = \"{}\"\ndisk = \"{}\"\nmeta = \"internal\"\n",
            socket.display(),
            dir.join("alpha.img").display(),
            dir.join("b.sock").display(),
            dir.join("bravo.img").display(),
        ),
    )
    .unwrap();
    config
}

fn config_args(config: &Path) -> TargetArgs {
    TargetArgs {
        config: Some(config.to_owned()),
        node: Some("alpha".into()),
        socket: None,
    }
}

#[tokio::test]
async fn no_daemon_for_config_node_names_resource_node_and_socket() {
    // Proves --config/--node resolves the node's `control` key and the
    // sentence names vm1/alpha and that path.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm1-alpha.sock");
    let config = write_config(dir.path(), &socket, "internal");
    let o = run_capture(&config_args(&config), ControlCommand::Connect, false).await;
    assert_eq!(o.code, EXIT_NO_DAEMON, "{}", o.err);
    assert_eq!(
        o.err,
        format!(
            "replctl: cannot reach the daemon of vm1/alpha at {}: is replicatord running?\n",
            socket.display()
        )
    );
}

/// A sparse disk image of `size_bytes` for alpha.
fn make_disk(dir: &Path, size_bytes: u64) {
    let file = std::fs::File::create(dir.join("alpha.img")).unwrap();
    file.set_len(size_bytes).unwrap();
}

async fn dump_json(config: &Path) -> serde_json::Value {
    let o = run_capture(
        &config_args(config),
        ControlCommand::DumpMd { json: true },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    serde_json::from_str(&o.out).unwrap()
}

#[tokio::test]
async fn create_md_writes_fresh_internal_metadata_that_dump_md_reads_back() {
    // Proves create-md lays down a valid superblock at the end of the disk
    // (names, size, clean bitmap) and dump-md reports it in JSON and text.
    let dir = tempfile::tempdir().unwrap();
    make_disk(dir.path(), 64 << 20);
    let config = write_config(dir.path(), &dir.path().join("a.sock"), "internal");
    let o = run_capture(
        &config_args(&config),
        ControlCommand::CreateMd { force: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    assert!(
        o.out
            .starts_with("created metadata for vm1/alpha (internal, at the end of "),
        "{}",
        o.out
    );
    let d = dump_json(&config).await;
    assert_eq!(d["resource"], "vm1");
    assert_eq!(d["node"], "alpha");
    assert_eq!(d["meta"], "internal");
    assert_eq!(d["last_role"], "Secondary");
    assert_eq!(d["out_of_sync_bytes"], 0);
    assert_eq!(d["uuids"]["current"], "0000000000000000");
    let data = d["data_size_bytes"].as_u64().unwrap();
    assert!(data < 64 << 20 && data > 60 << 20, "{data}");
    assert_eq!(d["metadata_offset_bytes"].as_u64().unwrap(), data);
    assert!(d["flags"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("AlClean")));
    let text = run_capture(
        &config_args(&config),
        ControlCommand::DumpMd { json: false },
        false,
    )
    .await;
    assert_eq!(text.code, EXIT_OK, "{}", text.err);
    assert!(
        text.out.starts_with("vm1/alpha metadata v1 (internal in "),
        "{}",
        text.out
    );
    assert!(text.out.contains("  flags:AlClean\n"), "{}", text.out);
    assert!(text.out.ends_with("  out-of-sync:0B\n"), "{}", text.out);
}

#[tokio::test]
async fn create_md_refuses_to_overwrite_valid_metadata_unless_forced() {
    // Proves existing metadata is protected: a second create-md fails with
    // a sentence naming the owner and --force; with --force it is rewritten
    // (the set bitmap bit is cleared again).
    let dir = tempfile::tempdir().unwrap();
    make_disk(dir.path(), 64 << 20);
    let config = write_config(dir.path(), &dir.path().join("a.sock"), "internal");
    let args = config_args(&config);
    assert_eq!(
        run_capture(&args, ControlCommand::CreateMd { force: false }, false)
            .await
            .code,
        EXIT_OK
    );
    // Mark three blocks out of sync in the on-disk bitmap.
    let loaded = crate::config::load(&config).unwrap();
    let node = loaded.node("alpha").unwrap();
    let layout = replicator_core::metadata::MetadataLayout::internal(
        64 << 20,
        node.options.bitmap_block_bytes as u32,
        node.options.al_extents,
    )
    .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("alpha.img"))
            .unwrap();
        disk.write_all_at(&[0b1011], layout.bitmap_offset_bytes)
            .unwrap();
    }
    let expected_oos = 3 * node.options.bitmap_block_bytes;
    assert_eq!(dump_json(&config).await["out_of_sync_bytes"], expected_oos);
    let o = run_capture(&args, ControlCommand::CreateMd { force: false }, false).await;
    assert_eq!(o.code, EXIT_FAILED);
    assert!(
        o.err.contains("already holds metadata of vm1/alpha"),
        "{}",
        o.err
    );
    assert!(o.err.contains("use --force"), "{}", o.err);
    assert_eq!(
        dump_json(&config).await["out_of_sync_bytes"],
        expected_oos,
        "refused create-md changed the disk"
    );
    let o = run_capture(&args, ControlCommand::CreateMd { force: true }, false).await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    assert_eq!(dump_json(&config).await["out_of_sync_bytes"], 0);
}

#[tokio::test]
async fn create_md_refuses_to_write_over_data_unless_forced() {
    // Proves create-md does not silently destroy what lies where the
    // metadata goes (like drbdmeta): a disk whose last bytes hold data (a
    // GPT backup header, the end of a file system) is refused naming the
    // offset, the way out and --force, and left as it was; so is an
    // external meta file holding data; --force writes the metadata.
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 64u64 << 20;
    make_disk(dir.path(), size);
    let disk_path = dir.path().join("alpha.img");
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk_path)
        .unwrap();
    disk.write_all_at(b"EFI PART backup header", size - 512)
        .unwrap();
    let config = write_config(dir.path(), &dir.path().join("a.sock"), "internal");
    let args = config_args(&config);
    let before = std::fs::read(&disk_path).unwrap();
    let o = run_capture(&args, ControlCommand::CreateMd { force: false }, false).await;
    assert_eq!(o.code, EXIT_FAILED, "{}", o.out);
    for words in [
        "holds data where the metadata goes",
        &format!("offset {}", size - 512),
        "meta = PATH",
        "--force",
    ] {
        assert!(o.err.contains(words), "no {words:?} in {}", o.err);
    }
    assert!(
        std::fs::read(&disk_path).unwrap() == before,
        "refused create-md wrote"
    );
    let o = run_capture(&args, ControlCommand::CreateMd { force: true }, false).await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    assert_eq!(dump_json(&config).await["out_of_sync_bytes"], 0);

    let meta_path = dir.path().join("alpha.md");
    std::fs::write(&meta_path, vec![0x5a; 1 << 20]).unwrap();
    let config = write_config(
        dir.path(),
        &dir.path().join("a.sock"),
        &meta_path.display().to_string(),
    );
    let o = run_capture(
        &config_args(&config),
        ControlCommand::CreateMd { force: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_FAILED, "{}", o.out);
    assert!(
        o.err.contains("is `meta` the right file or device?"),
        "{}",
        o.err
    );
    assert!(
        std::fs::read(&meta_path).unwrap() == vec![0x5a; 1 << 20],
        "refused create-md wrote"
    );
}

#[tokio::test]
async fn create_md_with_external_meta_creates_the_metadata_file() {
    // Proves `meta = PATH`: the file is created at the needed size, the
    // whole disk stays data, and the disk itself is untouched.
    let dir = tempfile::tempdir().unwrap();
    make_disk(dir.path(), 16 << 20);
    let meta = dir.path().join("alpha.meta");
    let config = write_config(
        dir.path(),
        &dir.path().join("a.sock"),
        &meta.display().to_string(),
    );
    let o = run_capture(
        &config_args(&config),
        ControlCommand::CreateMd { force: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    assert!(meta.exists());
    let d = dump_json(&config).await;
    assert_eq!(d["meta"], "external");
    assert_eq!(d["data_size_bytes"], 16u64 << 20);
    assert_eq!(d["metadata_offset_bytes"], 0);
    let disk = std::fs::read(dir.path().join("alpha.img")).unwrap();
    assert!(
        disk.iter().all(|&b| b == 0),
        "external create-md wrote to the data disk"
    );
}

#[tokio::test]
async fn dump_md_on_a_disk_without_metadata_says_so() {
    // Proves a blank disk is reported in one sentence, exit 1, no panic.
    let dir = tempfile::tempdir().unwrap();
    make_disk(dir.path(), 64 << 20);
    let config = write_config(dir.path(), &dir.path().join("a.sock"), "internal");
    let o = run_capture(
        &config_args(&config),
        ControlCommand::DumpMd { json: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_FAILED);
    assert!(o.err.contains("holds no valid metadata"), "{}", o.err);
    assert_eq!(o.err.lines().count(), 1);
}

#[tokio::test]
async fn create_md_is_refused_while_the_daemon_runs_and_needs_config() {
    // Proves create-md never writes under a running daemon (its control
    // socket answers) and is refused with --socket.
    let dir = tempfile::tempdir().unwrap();
    make_disk(dir.path(), 64 << 20);
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let config = write_config(dir.path(), &fx.path, "internal");
    let o = run_capture(
        &config_args(&config),
        ControlCommand::CreateMd { force: true },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_FAILED);
    assert!(
        o.err.contains("replicatord of vm1/alpha is running"),
        "{}",
        o.err
    );
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::DumpMd { json: false },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_FAILED);
    assert!(o.err.contains("works offline"), "{}", o.err);
    fx.shutdown().await;
}

#[tokio::test]
async fn missing_or_conflicting_target_arguments_exit_1_with_a_sentence() {
    // Proves argument mistakes are explained in one line, never a panic.
    let cases = [
        (TargetArgs::default(), "say which daemon"),
        (
            TargetArgs {
                config: Some("/nonexistent/vm1.toml".into()),
                node: None,
                socket: None,
            },
            "--config needs --node",
        ),
        (
            TargetArgs {
                config: Some("/nonexistent/vm1.toml".into()),
                node: Some("alpha".into()),
                socket: None,
            },
            "/nonexistent/vm1.toml",
        ),
        (
            TargetArgs {
                config: Some("a".into()),
                node: Some("b".into()),
                socket: Some("c".into()),
            },
            "not both",
        ),
    ];
    for (target, needle) in cases {
        let o = run_capture(&target, ControlCommand::Status { json: false }, false).await;
        assert_eq!(o.code, EXIT_FAILED);
        assert!(
            o.err.starts_with("replctl: ") && o.err.contains(needle),
            "{}",
            o.err
        );
        assert_eq!(o.err.lines().count(), 1, "{}", o.err);
    }
}

#[tokio::test]
async fn resync_wait_without_tty_prints_plain_progress_pause_and_final_line() {
    // Proves --wait follows a resync through a pause to the end: plain lines
    // (no control characters), the pause is reported and not treated as an
    // abort, a final line, exit 0.
    let out = resync_wait(
        vec![
            syncing(20, ReplicationState::SyncSource),
            syncing(40, ReplicationState::PausedSyncS),
            syncing(40, ReplicationState::PausedSyncS),
            syncing(70, ReplicationState::SyncSource),
            sample_status(),
        ],
        false,
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "resync done");
    assert_eq!(
        lines[1],
        "resync 20.00% 20.0MiB of 100.0MiB at 10.0MiB/s, ETA 0:08"
    );
    assert_eq!(
        lines[2],
        "resync 40.00% 40.0MiB of 100.0MiB, paused (resume-sync continues it)"
    );
    // The repeated paused status printed nothing; the resume printed at once.
    assert_eq!(
        lines[3],
        "resync 70.00% 70.0MiB of 100.0MiB at 10.0MiB/s, ETA 0:03"
    );
    assert_eq!(lines[4], "resync done (100.0MiB processed): 0B out of sync");
    assert_eq!(lines.len(), 5);
    assert!(!out.contains('\r'));
}

/// `replctl resync --wait` (on a terminal or not) against a daemon
/// answering `status` from `script`: what it printed (it must exit 0).
async fn resync_wait(script: Vec<StatusReport>, tty: bool) -> String {
    let mut fx = Fixture::start(FakeHandler::scripted(script), 16);
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::Resync { wait: true },
        tty,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    fx.shutdown().await;
    o.out
}

#[tokio::test]
async fn resync_wait_without_tty_says_when_the_target_waits_for_its_failing_disk() {
    // Proves --wait on a SyncTarget backing off from its disk says so at
    // once, again when the wait grows, and goes back to rate and ETA when
    // the resync moves again.
    let waiting = |wait_s| {
        let mut s = syncing(20, ReplicationState::SyncTarget);
        s.resync_disk_wait_s = Some(wait_s);
        s
    };
    let out = resync_wait(
        vec![
            syncing(20, ReplicationState::SyncTarget),
            waiting(1),
            waiting(2),
            syncing(60, ReplicationState::SyncTarget),
            sample_status(),
        ],
        false,
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[1..5],
        [
            "resync 20.00% 20.0MiB of 100.0MiB at 10.0MiB/s, ETA 0:08",
            "resync 20.00% 20.0MiB of 100.0MiB, the disk failed; asking again within 1s \
             (`replctl resync` now)",
            "resync 20.00% 20.0MiB of 100.0MiB, the disk failed; asking again within 2s \
             (`replctl resync` now)",
            "resync 60.00% 60.0MiB of 100.0MiB at 10.0MiB/s, ETA 0:04",
        ],
        "{out}"
    );
    assert_eq!(lines.len(), 6, "{out}");
}

#[tokio::test]
async fn resync_wait_on_a_tty_redraws_one_bar_then_prints_the_final_line() {
    // Proves the terminal form: bars drawn with \r on one line, a newline
    // before the final line.
    let script = vec![syncing(50, ReplicationState::SyncSource), sample_status()];
    let out = resync_wait(script, true).await;
    let bar = render::progress_bar(
        WaitOp::Resync,
        &syncing(50, ReplicationState::SyncSource).resync.unwrap(),
        render::Hold::Moving,
    );
    assert_eq!(
        out,
        format!("resync done\n{bar}\nresync done (100.0MiB processed): 0B out of sync\n")
    );
}

#[tokio::test]
async fn resync_wait_exits_1_when_the_link_is_lost() {
    // Proves a lost link aborts --wait with exit 1 and a sentence that
    // carries the daemon's reason.
    let mut lost = sample_status();
    lost.connection = ConnectionState::Connecting;
    lost.replication = ReplicationState::Off;
    lost.peer_role = PeerRole::Unknown;
    lost.connection_error = Some("The peer stopped answering pings.".into());
    let script = vec![syncing(10, ReplicationState::SyncSource), lost];
    let mut fx = Fixture::start(FakeHandler::scripted(script), 16);
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::Resync { wait: true },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_FAILED);
    assert_eq!(
        o.err,
        "replctl: resync aborted: the link to bravo is Connecting: The peer stopped answering pings.\n"
    );
    fx.shutdown().await;
}

#[tokio::test]
async fn verify_wait_reports_differences_found() {
    // Proves verify --wait follows VerifyS and the final line reports the
    // out-of-sync amount the verify found.
    let mut running = sample_status();
    running.replication = ReplicationState::VerifyS;
    running.verify = Some(Progress {
        done_bytes: 30 << 20,
        total_bytes: 100 << 20,
        rate_bytes_per_s: 0,
        eta_s: None,
    });
    let mut found = sample_status();
    found.out_of_sync_bytes = 8192;
    let mut fx = Fixture::start(FakeHandler::scripted(vec![running, found]), 16);
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::Verify { wait: true },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    assert_eq!(
        o.out,
        "verify done\nverify 30.00% 30.0MiB of 100.0MiB at 0B/s, ETA --:--\n\
         verify done (100.0MiB processed): 8.0KiB out of sync; `replctl resync` repairs it\n"
    );
    fx.shutdown().await;
}

#[tokio::test]
async fn verify_wait_without_progress_numbers_says_it_is_waiting_once() {
    // Proves a running verify that reports no progress (VerifyS, verify
    // null) prints one "waiting" line, not one per poll, then the result.
    let mut running = sample_status();
    running.replication = ReplicationState::VerifyS;
    let script = vec![running.clone(), running.clone(), running, sample_status()];
    let mut fx = Fixture::start(FakeHandler::scripted(script), 16);
    let o = run_capture(
        &socket_args(&fx.path),
        ControlCommand::Verify { wait: true },
        false,
    )
    .await;
    assert_eq!(o.code, EXIT_OK, "{}", o.err);
    assert_eq!(
        o.out,
        "verify done\nverify started; waiting for progress\nverify done: the replicas are identical\n"
    );
    fx.shutdown().await;
}

#[test]
fn classify_covers_running_paused_done_and_aborted() {
    // Proves the --wait decision table on single statuses.
    let running = syncing(10, ReplicationState::SyncTarget);
    assert_eq!(
        classify(WaitOp::Resync, &running),
        WaitState::Running(running.resync)
    );
    let mut starting = sample_status();
    starting.replication = ReplicationState::WFBitMapS;
    assert_eq!(
        classify(WaitOp::Resync, &starting),
        WaitState::Running(None)
    );
    let paused = syncing(10, ReplicationState::PausedSyncT);
    assert_eq!(
        classify(WaitOp::Resync, &paused),
        WaitState::Paused(paused.resync)
    );
    assert_eq!(classify(WaitOp::Resync, &sample_status()), WaitState::Done);
    assert_eq!(classify(WaitOp::Verify, &sample_status()), WaitState::Done);
    let mut standalone = sample_status();
    standalone.connection = ConnectionState::StandAlone;
    standalone.split_brain = true;
    standalone.last_refusal = Some("Split brain detected.".into());
    assert_eq!(
        classify(WaitOp::Verify, &standalone),
        WaitState::Aborted(
            "verify aborted: the link to bravo is StandAlone: Split brain detected.".into()
        )
    );
    let mut other = sample_status();
    other.replication = ReplicationState::VerifyT;
    assert!(matches!(
        classify(WaitOp::Resync, &other),
        WaitState::Aborted(s) if s.contains("VerifyT")
    ));
}

#[test]
fn wait_tracker_treats_a_not_yet_started_resync_as_starting_until_the_deadline() {
    // Proves the start grace: Established with blocks out of sync before any
    // resync was seen is "starting", then aborted after the deadline; once a
    // resync was seen, Established means done.
    let mut pending = sample_status();
    pending.out_of_sync_bytes = 4096;
    assert_never_starts(
        WaitOp::Resync,
        &pending,
        "resync did not start within 10 s; 4.0KiB remain out of sync",
    );
    let mut tracker = WaitTracker::new(WaitOp::Resync);
    let running = syncing(50, ReplicationState::SyncSource);
    assert_eq!(
        tracker.observe(&running, 0),
        WaitState::Running(running.resync)
    );
    assert_eq!(tracker.observe(&pending, 1), WaitState::Done);
    let mut tracker = WaitTracker::new(WaitOp::Resync);
    assert_eq!(tracker.observe(&sample_status(), 0), WaitState::Done);
    // A Secondary whose disk failed writes knows no blocks (its Primary
    // marked them) but is Inconsistent: its resync is yet to start too.
    let mut failed = sample_status();
    failed.disk = DiskState::Inconsistent;
    assert_never_starts(
        WaitOp::Resync,
        &failed,
        "resync did not start within 10 s; the disk is still Inconsistent",
    );
}

/// A `--wait` for `op` that sees only `status`: still starting at first,
/// aborted with `why` at the start deadline.
fn assert_never_starts(op: WaitOp, status: &StatusReport, why: &str) {
    let mut tracker = WaitTracker::new(op);
    assert_eq!(tracker.observe(status, 0), WaitState::Running(None));
    assert_eq!(
        tracker.observe(status, WAIT_START_TIMEOUT_MS),
        WaitState::Aborted(why.into())
    );
}

#[test]
fn wait_tracker_waits_for_the_link_before_the_start_but_not_after() {
    // Proves a link still coming up when the command was accepted (e.g.
    // right after a promotion) is "starting" until the deadline, while a
    // link lost after the operation ran is an abort at once.
    let mut connecting = sample_status();
    connecting.connection = ConnectionState::Connecting;
    connecting.replication = ReplicationState::Off;
    assert_never_starts(
        WaitOp::Verify,
        &connecting,
        "verify did not start within 10 s; the link to bravo is Connecting",
    );
    let mut tracker = WaitTracker::new(WaitOp::Resync);
    let running = syncing(50, ReplicationState::SyncSource);
    assert_eq!(
        tracker.observe(&running, 0),
        WaitState::Running(running.resync)
    );
    assert!(
        matches!(tracker.observe(&connecting, 1), WaitState::Aborted(s) if s.starts_with("resync aborted"))
    );
}

#[tokio::test]
async fn events_prints_the_dump_and_changes_as_json_lines() {
    // Proves `replctl events` prints each event line as received (dump, end
    // marker, changes) and exits 1 saying so when the daemon goes away.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let target = socket_args(&fx.path);
    let out = SharedBuf::default();
    let err = SharedBuf::default();
    let (mut o, mut e) = (out.clone(), err.clone());
    let replctl = async {
        let mut console = Console {
            out: &mut o,
            err: &mut e,
            out_is_tty: false,
        };
        run(&target, &ControlCommand::Events, &mut console).await
    };
    let driver = async {
        wait_until("the dump is printed", || out.text().lines().count() == 5).await;
        let mut new = sample_status();
        new.role = Role::Secondary;
        for event in change_events(&sample_status(), &new, "t") {
            fx.events.send(event).unwrap();
        }
        wait_until("the change is printed", || out.text().lines().count() == 6).await;
        fx.shutdown().await;
    };
    let (code, ()) =
        tokio::time::timeout(std::time::Duration::from_millis(TEST_DEADLINE_MS), async {
            tokio::join!(replctl, driver)
        })
        .await
        .expect("events did not finish");
    let events: Vec<Event> = out
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0].object, EventObject::Resource);
    assert!(events[4].is_end_of_dump());
    assert_eq!(events[5].fields["role"], "Secondary");
    assert_eq!(code, EXIT_FAILED);
    assert!(
        err.text().contains("closed the event stream"),
        "{}",
        err.text()
    );
}

/// A stdout whose reader went away after `keep` writes.
struct ClosingPipe {
    writes_left: usize,
}

impl Write for ClosingPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.writes_left == 0 {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.writes_left -= 1;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn events_piped_into_head_stops_quietly_when_the_reader_goes() {
    // Proves `replctl events | head -2`: once stdout's reader is gone,
    // replctl exits 0 without an error sentence instead of streaming on.
    let mut fx = Fixture::start(FakeHandler::scripted(vec![sample_status()]), 16);
    let mut out = ClosingPipe { writes_left: 2 };
    let err = SharedBuf::default();
    let mut e = err.clone();
    let mut console = Console {
        out: &mut out,
        err: &mut e,
        out_is_tty: false,
    };
    let code = tokio::time::timeout(
        std::time::Duration::from_millis(TEST_DEADLINE_MS),
        run(
            &socket_args(&fx.path),
            &ControlCommand::Events,
            &mut console,
        ),
    )
    .await
    .expect("events kept running after its reader left");
    assert_eq!(code, EXIT_OK);
    assert_eq!(err.text(), "");
    fx.shutdown().await;
}
