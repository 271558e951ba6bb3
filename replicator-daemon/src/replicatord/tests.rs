//! Tests of the replicatord program logic, with real NBD clients (nbdinfo,
//! qemu-io) against an in-process node.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::oneshot;

use super::*;

/// Size of each test disk.
const DISK_BYTES: u64 = 4 * 1024 * 1024;
/// How long a node may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one external client command may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Poll interval while waiting for a state.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn disk(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    fn make_disk(&self) {
        std::fs::File::create(self.disk())
            .and_then(|f| f.set_len(DISK_BYTES))
            .unwrap();
    }

    /// Writes a config whose single node serves on the Unix socket; `extra`
    /// goes at the top level.
    fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("vm1.toml");
        let text = format!(
            "resource = \"vm1\"\n{extra}\n[nodes.alpha]\nnbd = \"unix:{}\"\ndisk = \"{}\"\n",
            self.sock().display(),
            self.disk().display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock().display())
    }
}

/// Runs an external client, failing clearly if it is not installed.
async fn client(program: &str, args: &[&str]) -> std::process::Output {
    let run = Command::new(program)
        .args(args)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CLIENT_TIMEOUT, run).await {
        Err(_) => panic!("{program} {args:?} ran longer than {CLIENT_TIMEOUT:?}"),
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
            panic!(
                "{program} is not installed: apt-get install libnbd-bin python3-libnbd qemu-utils"
            )
        }
        Ok(Err(e)) => panic!("cannot run {program}: {e}"),
        Ok(Ok(out)) => out,
    }
}

async fn wait_for_socket(path: &Path, node: &tokio::task::JoinHandle<Result<(), NodeError>>) {
    let deadline = Instant::now() + START_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(!node.is_finished(), "the node stopped before listening");
        assert!(
            Instant::now() < deadline,
            "the node did not listen within {START_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Starts the node in a task; returns it and the trigger that stops it.
async fn start(
    config: PathBuf,
    sock: &Path,
) -> (
    tokio::task::JoinHandle<Result<(), NodeError>>,
    oneshot::Sender<()>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let node = tokio::spawn(async move {
        run_node(&config, "alpha", async {
            let _ = stopped.await;
        })
        .await
    });
    wait_for_socket(sock, &node).await;
    (node, stop)
}

#[tokio::test]
async fn bad_config_fails_before_the_disk_is_opened() {
    // Proves a config error stops start-up before the disk is touched: the
    // existing disk keeps its contents and mtime, a missing one is not created.
    let s = Setup::new();
    std::fs::write(s.disk(), vec![7u8; 8192]).unwrap();
    let before = std::fs::metadata(s.disk()).unwrap();
    let config = s.config("io_engine = \"aio\"");
    let e = run_node(&config, "alpha", std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::Config(_)), "{e}");
    assert!(e.to_string().contains("`io_engine`"), "{e}");
    let after = std::fs::metadata(s.disk()).unwrap();
    assert_eq!(before.mtime_nsec(), after.mtime_nsec());
    assert_eq!(before.mtime(), after.mtime());
    assert_eq!(std::fs::read(s.disk()).unwrap(), vec![7u8; 8192]);
    assert!(!s.sock().exists(), "no listener may be created either");

    std::fs::remove_file(s.disk()).unwrap();
    let e = run_node(&config, "alpha", std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::Config(_)), "{e}");
    assert!(!s.disk().exists(), "the disk must not be created");
}

#[tokio::test]
async fn unknown_node_is_refused_listing_the_nodes() {
    // Proves --node with a name not in the file fails naming the nodes present.
    let s = Setup::new();
    let config = s.config("");
    let e = run_node(&config, "bravo", std::future::pending())
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("\"bravo\"") && msg.contains("nodes present: alpha"),
        "{msg}"
    );
}

#[tokio::test]
async fn two_node_config_with_a_missing_disk_is_refused_before_serving() {
    // Proves a resource with a peer takes the replicated path, and that a
    // disk that cannot be attached stops it with one sentence before any
    // NBD socket exists.
    let s = Setup::new();
    let path = s.dir.path().join("two.toml");
    let text = format!(
        "resource = \"vm1\"\nsecret = \"s\"\n\
         [nodes.alpha]\nreplication = \"127.0.0.1:7789\"\nnbd = \"unix:{sock}\"\ndisk = \"{disk}\"\n\
         [nodes.bravo]\nreplication = \"127.0.0.2:7789\"\nnbd = \"unix:{sock}\"\ndisk = \"{disk}\"\n",
        sock = s.sock().display(),
        disk = s.disk().display()
    );
    std::fs::write(&path, text).unwrap();
    let e = run_node(&path, "alpha", std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::Replicated(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("cannot open disk") && !msg.contains('\n'),
        "{msg}"
    );
    assert!(!s.sock().exists() && !s.disk().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_disk_to_real_clients_and_stops_cleanly() {
    // Proves a one-node config serves the whole disk: nbdinfo sees its size
    // under the resource name and the default export, qemu-io writes land in
    // the file, and the node stops with Ok and removes its socket.
    let s = Setup::new();
    s.make_disk();
    let (node, stop) = start(s.config(""), &s.sock()).await;

    for export in ["vm1", ""] {
        let out = client("nbdinfo", &["--json", &s.uri(export)]).await;
        assert!(
            out.status.success(),
            "nbdinfo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let size = &info["exports"][0]["export-size"];
        assert_eq!(size.as_u64(), Some(DISK_BYTES), "{info}");
        assert_eq!(info["exports"][0]["can_multi_conn"], true, "{info}");
    }
    let uri = s.uri("vm1");
    let out = client(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4097 10000",
            "-c",
            "write -f -P 0xcd 1048576 65536",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 4097 10000",
            &uri,
        ],
    )
    .await;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !text.contains("fail")
            && !text.contains("Pattern verification failed"),
        "{text}"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(START_TIMEOUT, node)
        .await
        .expect("node did not stop")
        .unwrap()
        .expect("node stopped with an error");
    assert!(
        !s.sock().exists(),
        "the socket file must be removed at exit"
    );
    let disk = std::fs::read(s.disk()).unwrap();
    assert!(disk[4097..14097].iter().all(|&b| b == 0xab));
    assert!(disk[1048576..1048576 + 65536].iter().all(|&b| b == 0xcd));
    assert_eq!(disk[4096], 0);
    assert_eq!(disk[14097], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_node_refuses_writes() {
    // Proves read_only = true exports a read-only volume: writes fail and the file is unchanged.
    let s = Setup::new();
    s.make_disk();
    let (node, stop) = start(
        s.config("read_only = true\nio_engine = \"sync\""),
        &s.sock(),
    )
    .await;
    let out = client("nbdinfo", &["--json", &s.uri("vm1")]).await;
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    // qemu-io refuses to open a read-only export for writing, so send the
    // write anyway with libnbd's strict checks off and expect EPERM.
    let script = "h.set_strict_mode(0)\n\
                  try:\n    h.pwrite(b'x' * 4096, 0)\n    print('WRITE ACCEPTED')\n\
                  except nbd.Error as e:\n    print('refused', e)\n";
    let out = client("nbdsh", &["-u", &s.uri("vm1"), "-c", script]).await;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("refused") && text.contains("EPERM"),
        "{text}"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(START_TIMEOUT, node)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(std::fs::read(s.disk()).unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn live_socket_is_not_stolen_and_other_files_are_not_removed() {
    // Proves start-up refuses a socket path another process listens on, and
    // a path that is not a socket, instead of deleting it.
    let s = Setup::new();
    s.make_disk();
    let _other = std::os::unix::net::UnixListener::bind(s.sock()).unwrap();
    let e = run_node(&s.config(""), "alpha", std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::Listen { .. }), "{e}");
    assert!(s.sock().exists());
    drop(_other);
    std::fs::remove_file(s.sock()).unwrap();
    std::fs::write(s.sock(), b"precious").unwrap();
    let e = run_node(&s.config(""), "alpha", std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(e, NodeError::Listen { .. }), "{e}");
    assert_eq!(std::fs::read(s.sock()).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced() {
    // Proves a socket file left by a dead process does not prevent start-up.
    let s = Setup::new();
    s.make_disk();
    drop(std::os::unix::net::UnixListener::bind(s.sock()).unwrap());
    assert!(s.sock().exists());
    let (node, stop) = start(s.config(""), &s.sock()).await;
    stop.send(()).unwrap();
    tokio::time::timeout(START_TIMEOUT, node)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_node_cleanly_after_flushing() {
    // Proves the real signal path: with the handlers installed, SIGTERM makes
    // the node stop accepting, flush and return Ok (the process survives,
    // since the handler, not the default action, receives it).
    let s = Setup::new();
    s.make_disk();
    let shutdown = shutdown_signal().expect("install signal handlers");
    let config = s.config("");
    let node = tokio::spawn(async move { run_node(&config, "alpha", shutdown).await });
    wait_for_socket(&s.sock(), &node).await;
    let out = client(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 0 64k", &s.uri("vm1")],
    )
    .await;
    assert!(out.status.success());
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
        .expect("send SIGTERM to self");
    tokio::time::timeout(START_TIMEOUT, node)
        .await
        .expect("node did not stop on SIGTERM")
        .unwrap()
        .expect("node stopped with an error");
    assert!(!s.sock().exists());
    assert!(std::fs::read(s.disk()).unwrap()[..65536]
        .iter()
        .all(|&b| b == 0x42));
}
