//! Real libnbd clients against this crate's server: nbdsh (Python libnbd)
//! over a Unix socket, and nbdinfo starting the server itself through
//! systemd socket activation. Needs Debian's libnbd-bin and python3-libnbd.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use nbd_frontend::mem::MemTarget;
use nbd_frontend::{serve, ExportConfig};

const SIZE: u64 = 1 << 20;
/// Upper bound for one client process.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Env var that turns the `activation_child` test into a socket-activated server.
const CHILD_ENV: &str = "NBD_FRONTEND_ACTIVATION_CHILD";

/// Runs a command with a deadline; returns (success, stdout, stderr).
fn run(mut cmd: Command) -> (bool, String, String) {
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e}; install libnbd-bin and python3-libnbd (apt-get install libnbd-bin python3-libnbd)")
        });
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > CLIENT_TIMEOUT {
            let _ = child.kill();
            panic!("{program} did not finish within {CLIENT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn nbdsh(script: String) -> (bool, String, String) {
    let mut cmd = Command::new("/usr/bin/nbdsh");
    cmd.args(["-c", &script]);
    run(cmd)
}

const DATA_SCRIPT: &str = r#"
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(URI)
assert h.get_size() == SIZE, h.get_size()
for ok in [h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_fast_zero(),
           h.can_cache(), h.can_multi_conn(), h.can_df(), h.can_meta_context("base:allocation")]:
    assert ok
assert not h.is_read_only()
h.pwrite(b"x" * 8192, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4096) == b"x" * 8192
assert h.pread(10, 0) == b"\0" * 10
h.flush()
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 4096) == b"\0" * 4096
h.trim(4096, 8192)
h.cache(4096, 0)
seen = []
def status(ctx, offset, entries, err):
    seen.extend(entries)
    return 0
h.block_status(65536, 0, status)
assert len(seen) >= 2 and sum(seen[0::2]) <= 65536, seen
h.set_strict_mode(0)
def expect(errno, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == errno, (e.errno, e.string)
        return
    raise AssertionError("expected " + errno)
expect("EINVAL", lambda: h.pread(1, SIZE))
expect("ENOSPC", lambda: h.pwrite(b"ab", SIZE - 1))
expect("EINVAL", lambda: h.trim(2, SIZE - 1))
expect("ENOSPC", lambda: h.zero(2, SIZE - 1))
assert h.pread(4, 0) == b"\0" * 4
h.shutdown()
print("DATA OK")
"#;

const OPTIONS_SCRIPT: &str = r#"
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(URI)
exports = []
h.opt_list(lambda name, desc: exports.append((name, desc)))
assert exports == [("vm1", "test volume")], exports
contexts = []
h.opt_list_meta_context(lambda name: contexts.append(name))
assert contexts == ["base:allocation"], contexts
h.set_full_info(True)
h.opt_info()
assert h.get_canonical_export_name() == "vm1"
assert h.get_export_description() == "test volume"
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024
h.set_export_name("missing")
try:
    h.opt_info()
    raise AssertionError("unknown export accepted")
except nbd.Error:
    pass
h.opt_abort()
print("OPTIONS OK")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_reads_writes_and_sees_spec_errors_over_unix_socket() {
    // Proves libnbd interoperates: flags, data, zero/trim/cache, block status, DF and the
    // bad-input errnos as a real client sees them, plus LIST/INFO/meta-context in option mode.
    let target = Arc::new(MemTarget::new(SIZE));
    let srv = TestServer::start(target.clone()).await;
    let prelude = format!("URI = {:?}\nSIZE = {SIZE}\n", srv.uri());
    for (script, marker) in [(DATA_SCRIPT, "DATA OK"), (OPTIONS_SCRIPT, "OPTIONS OK")] {
        let full = prelude.clone() + script;
        let (ok, out, err) = tokio::task::spawn_blocking(move || nbdsh(full))
            .await
            .unwrap();
        assert!(ok && out.contains(marker), "nbdsh failed:\n{out}\n{err}");
    }
    assert_eq!(target.read_now(4096, 1), vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_starts_the_server_by_socket_activation() {
    // Proves listeners_from_env takes the LISTEN_FDS socket: nbdinfo [ CMD ] runs this test
    // binary as a socket-activated server and reads the export's size and name.
    let exe = std::env::current_exe().expect("test binary path");
    let exe = exe.to_str().expect("utf-8 path").to_owned();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("/usr/bin/nbdinfo");
        cmd.env(CHILD_ENV, "1").args([
            "--json",
            "--",
            "[",
            &exe,
            "activation_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "]",
        ]);
        run(cmd)
    })
    .await
    .unwrap();
    assert!(ok, "nbdinfo failed:\n{out}\n{err}");
    assert!(out.contains(&format!("\"export-size\": {SIZE}")), "{out}");
    assert!(
        out.contains("\"export-name\": \"vm1\"") || out.contains("\"description\": \"activated\""),
        "{out}"
    );
}

/// Not a test on its own: with `NBD_FRONTEND_ACTIVATION_CHILD` set it is the
/// server that `nbdinfo_starts_the_server_by_socket_activation` launches.
#[test]
fn activation_child() {
    // Proves nothing alone (returns at once); as a child it serves until SIGTERM or the client leaves.
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let listeners = nbd_frontend::activation::listeners_from_env().expect("activation fds");
        assert_eq!(listeners.len(), 1, "libnbd passes one socket");
        assert!(std::env::var_os("LISTEN_FDS").is_none(), "env cleared");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let export = ExportConfig {
            name: "vm1".into(),
            description: "activated".into(),
        };
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::time::sleep(CLIENT_TIMEOUT) => {}
            }
        };
        serve(listeners, export, Arc::new(MemTarget::new(SIZE)), stop)
            .await
            .expect("serve");
    });
}
