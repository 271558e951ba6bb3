//! Shared harness for the real-process NBD tests: starts one NBD server over
//! a sparse backing file in a temp dir, waits until it speaks NBD, runs the
//! external clients (nbdinfo, qemu-img, qemu-io, nbdcopy, fio, Python libnbd)
//! with a time limit, and kills everything on drop.
//!
//! The server is `replicatord` with a generated one-node config. Setting
//! `REPLICATOR_TEST_SERVER=qemu-nbd` swaps in qemu-nbd serving the same file,
//! to check the harness and the client scripts against a known server.
//!
//! It must not sleep a fixed time to wait for a state (everything polls with
//! a deadline), and it never leaves a server process behind.
#![forbid(unsafe_code)]
#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod cluster;
pub mod guest;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The resource name, which is also the NBD export name.
pub const EXPORT_NAME: &str = "vm1";
/// How long a server gets to start answering NBD after spawn.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server gets to exit after SIGTERM.
pub const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit for one external client run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Default export size for the tests.
pub const DEFAULT_EXPORT_SIZE_BYTES: u64 = 64 << 20;
/// Interval between two readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The first 8 bytes every NBD server sends.
const NBD_GREETING_MAGIC: &[u8; 8] = b"NBDMAGIC";

/// Which program serves the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// The product: `replicatord` with a one-node config.
    Replicatord,
    /// Stand-in: `qemu-nbd` over the same file (harness validation).
    QemuNbd,
}

impl ServerKind {
    /// From `REPLICATOR_TEST_SERVER` (`replicatord` by default, or `qemu-nbd`).
    pub fn from_env() -> Self {
        match std::env::var("REPLICATOR_TEST_SERVER").as_deref() {
            Err(_) | Ok("") | Ok("replicatord") => ServerKind::Replicatord,
            Ok("qemu-nbd") => ServerKind::QemuNbd,
            Ok(other) => panic!(
                "REPLICATOR_TEST_SERVER={other:?} is not a known server (replicatord, qemu-nbd)"
            ),
        }
    }
}

/// Where the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// A free port on 127.0.0.1.
    Tcp,
    /// A Unix socket in the temp dir.
    Unix,
    /// systemd socket activation: a Unix socket bound by a wrapper and
    /// passed to the server as fd 3 (`LISTEN_FDS=1`, `LISTEN_PID`).
    Activated,
}

/// Binds argv[1] as a Unix socket, puts it on fd 3, sets LISTEN_FDS and
/// LISTEN_PID to its own pid, and execs argv[2..] (which keeps the pid).
pub const ACTIVATE_PY: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(16)
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="nbd")
os.execvpe(sys.argv[2], sys.argv[2:], env)
"#;

/// What export to start.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    pub size_bytes: u64,
    pub read_only: bool,
    pub listen: Listen,
    /// O_DIRECT on the backing file (`direct = true`, qemu-nbd `--cache=none`).
    pub direct: bool,
}

impl Default for ExportSpec {
    fn default() -> Self {
        ExportSpec {
            size_bytes: DEFAULT_EXPORT_SIZE_BYTES,
            read_only: false,
            listen: Listen::Tcp,
            direct: false,
        }
    }
}

#[derive(Debug, Clone)]
enum Addr {
    Tcp(u16),
    Unix(PathBuf),
}

/// A running NBD export over a sparse file; the process dies with this value.
#[derive(Debug)]
pub struct Export {
    pub kind: ServerKind,
    pub spec: ExportSpec,
    dir: tempfile::TempDir,
    addr: Addr,
    child: Option<Child>,
    /// Incremented per start, so each run logs to its own file.
    starts: u32,
}

impl Export {
    /// Starts an export of the default spec.
    pub fn start_default() -> Export {
        Export::start(ExportSpec::default())
    }

    /// Creates the temp dir, the sparse backing file and the config, starts
    /// the server and waits until it sends the NBD greeting.
    pub fn start(spec: ExportSpec) -> Export {
        let mut export = Export::prepare(spec);
        export.spawn_and_wait();
        export
    }

    /// Like [`Export::start`] without starting the server (for socket
    /// activation, where the client starts it).
    pub fn prepare(spec: ExportSpec) -> Export {
        let kind = ServerKind::from_env();
        if kind == ServerKind::QemuNbd {
            require_tool("qemu-nbd", "qemu-utils");
        }
        let dir = tempfile::Builder::new()
            .prefix("replicator-it-")
            .tempdir()
            .expect("create temp dir");
        let disk = dir.path().join("disk.img");
        File::create(&disk)
            .and_then(|f| f.set_len(spec.size_bytes))
            .expect("create sparse backing file");
        let addr = match spec.listen {
            Listen::Tcp => Addr::Tcp(free_port()),
            Listen::Unix | Listen::Activated => Addr::Unix(dir.path().join("nbd.sock")),
        };
        let export = Export {
            kind,
            spec,
            dir,
            addr,
            child: None,
            starts: 0,
        };
        export.write_config();
        export
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The backing file.
    pub fn disk_path(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("vm1.toml")
    }

    pub fn port(&self) -> Option<u16> {
        match self.addr {
            Addr::Tcp(p) => Some(p),
            Addr::Unix(_) => None,
        }
    }

    /// The NBD URI of the export (libnbd and QEMU both accept it).
    pub fn uri(&self) -> String {
        match &self.addr {
            Addr::Tcp(port) => format!("nbd://127.0.0.1:{port}/{EXPORT_NAME}"),
            Addr::Unix(path) => {
                format!("nbd+unix:///{EXPORT_NAME}?socket={}", path.display())
            }
        }
    }

    /// The URI without an export name (for `nbdinfo --list`).
    pub fn server_uri(&self) -> String {
        match &self.addr {
            Addr::Tcp(port) => format!("nbd://127.0.0.1:{port}"),
            Addr::Unix(path) => format!("nbd+unix://?socket={}", path.display()),
        }
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("server-{start}.log"))
    }

    /// Everything the server processes wrote to stderr so far, per start.
    pub fn server_log(&self) -> String {
        let mut all = String::new();
        for start in 1..=self.starts {
            let text = std::fs::read_to_string(self.log_path(start)).unwrap_or_default();
            all.push_str(&format!("--- server start {start} stderr ---\n{text}"));
        }
        all
    }

    fn write_config(&self) {
        let nbd = match (&self.addr, self.spec.listen) {
            // Under socket activation the configured address must not be
            // used: a port nobody connects to makes that visible.
            (_, Listen::Activated) => format!("127.0.0.1:{}", free_port()),
            (Addr::Tcp(port), _) => format!("127.0.0.1:{port}"),
            (Addr::Unix(path), _) => format!("unix:{}", path.display()),
        };
        let d = self.dir.path().display();
        let config = format!(
            r#"# Generated by the integration test harness: one node, no peer.
resource = "{EXPORT_NAME}"
secret = "integration-test"
read_only = {ro}
direct = {direct}

[nodes.alpha]
replication = "127.0.0.1:{repl}"
nbd = "{nbd}"
control = "{d}/alpha.sock"
disk = "{d}/disk.img"
meta = "{d}/alpha.meta"
"#,
            ro = self.spec.read_only,
            direct = self.spec.direct,
            repl = free_port(),
        );
        std::fs::write(self.config_path(), config).expect("write config");
    }

    fn command(&self) -> Command {
        let server = self.server_command();
        if self.spec.listen != Listen::Activated {
            return server;
        }
        let Addr::Unix(path) = &self.addr else {
            unreachable!("activation always uses a Unix socket")
        };
        let mut cmd = Command::new(PYTHON);
        cmd.args(["-c", ACTIVATE_PY])
            .arg(path)
            .arg(server.get_program())
            .args(server.get_args());
        for (k, v) in server.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd
    }

    fn server_command(&self) -> Command {
        match self.kind {
            ServerKind::Replicatord => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_replicatord"));
                cmd.arg("--config")
                    .arg(self.config_path())
                    .args(["--node", "alpha"]);
                cmd.env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                );
                cmd
            }
            ServerKind::QemuNbd => {
                let mut cmd = Command::new("qemu-nbd");
                cmd.args(["-f", "raw", "-x", EXPORT_NAME, "--persistent", "--shared=0"]);
                match (&self.addr, self.spec.listen) {
                    (_, Listen::Activated) => {}
                    (Addr::Tcp(port), _) => {
                        cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
                    }
                    (Addr::Unix(path), _) => {
                        cmd.arg("-k").arg(path);
                    }
                }
                if self.spec.read_only {
                    cmd.arg("--read-only");
                } else {
                    cmd.arg("--discard=unmap");
                }
                if self.spec.direct {
                    cmd.arg("--cache=none");
                }
                cmd.arg(self.disk_path());
                cmd
            }
        }
    }

    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "server already running");
        self.starts += 1;
        let log = File::create(self.log_path(self.starts)).expect("create server log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?} server: {e}", self.kind));
        self.child = Some(child);
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "the {:?} server exited with {status} before serving NBD\n{}",
                    self.kind,
                    self.server_log()
                );
            }
            if self.greets() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the {:?} server did not send an NBD greeting within {:?}\n{}",
                    self.kind,
                    SERVER_START_TIMEOUT,
                    self.server_log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// True when a connection gets the NBD greeting magic.
    fn greets(&self) -> bool {
        let mut magic = [0u8; 8];
        let io_timeout = Some(Duration::from_secs(2));
        let ok = match &self.addr {
            Addr::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).and_then(|mut s| {
                s.set_read_timeout(io_timeout)?;
                s.read_exact(&mut magic)
            }),
            Addr::Unix(path) => UnixStream::connect(path).and_then(|mut s| {
                s.set_read_timeout(io_timeout)?;
                s.read_exact(&mut magic)
            }),
        };
        ok.is_ok() && &magic == NBD_GREETING_MAGIC
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server not running");
        // The shell's kill builtin: no unsafe libc call, and no dependency
        // on procps (not installed on a minimal Debian).
        let status = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &child.id().to_string()])
            .status()
            .expect("run sh -c kill");
        assert!(status.success(), "kill -TERM failed");
        match wait_with_deadline(&mut child, SERVER_STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not exit within {SERVER_STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.server_log()
                );
            }
        }
    }

    /// Kills the server with SIGKILL (a crash) and reaps it.
    pub fn kill_hard(&mut self) {
        let mut child = self.child.take().expect("server not running");
        child.kill().expect("SIGKILL the server");
        child.wait().expect("reap the server");
    }

    /// Panics unless the server process is still running.
    pub fn assert_running(&mut self) {
        let exited = self
            .child
            .as_mut()
            .map(|c| c.try_wait().expect("poll the server"));
        match exited {
            Some(None) => {}
            Some(Some(status)) => panic!("the server exited with {status}\n{}", self.server_log()),
            None => panic!("the server is not running"),
        }
    }

    /// Panics if any server run logged a Rust panic.
    pub fn assert_no_panic_logged(&self) {
        let log = self.server_log();
        assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    }

    /// Starts the server again on the same address and file.
    pub fn start_again(&mut self) {
        self.spawn_and_wait();
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.server_log());
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago, and not handed out
/// before in this test process: a config with one port for two listeners
/// is refused (it happened in CI: bravo's `nbd` and `replication` both on
/// 44769, two binds to port 0 in a row). The port lies below the kernel's
/// ephemeral range (`ip_local_port_range`), so no outgoing connection of
/// any test (an NBD client, a node dialling its peer, the fault proxy)
/// can take it between now and the daemon's bind; each test process
/// starts at its own place in that range.
pub fn free_port() -> u16 {
    /// Where this process goes on looking, and what it handed out.
    struct Ports {
        next: Option<u32>,
        handed_out: Vec<u16>,
    }
    static PORTS: std::sync::Mutex<Ports> = std::sync::Mutex::new(Ports {
        next: None,
        handed_out: Vec::new(),
    });
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST);
    let mut p = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    if span >= 1_000 {
        let start = *p.next.get_or_insert_with(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) % span
        });
        for i in 0..span {
            let port = (LOWEST + (start + i) % span) as u16;
            if !p.handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                p.handed_out.push(port);
                p.next = Some((start + i + 1) % span);
                return port;
            }
        }
    }
    // No room below the ephemeral range: ask the kernel.
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if !p.handed_out.contains(&port) {
            p.handed_out.push(port);
            return port;
        }
    }
}

/// Waits up to `limit` for the child to exit.
pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL_INTERVAL),
            Ok(None) => return None,
            Err(e) => panic!("wait for child: {e}"),
        }
    }
}

/// True when `name` is an executable on PATH (or a path that exists).
pub fn have_tool(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// Fails the test with what to install when `name` is missing.
pub fn require_tool(name: &str, debian_package: &str) {
    assert!(
        have_tool(name),
        "install {name} (Debian package {debian_package}); scripts/test.sh installs it"
    );
}

/// Debian's Python with the libnbd module; fails with what to install.
pub const PYTHON: &str = "/usr/bin/python3";

pub fn require_python_nbd() {
    require_tool(PYTHON, "python3");
    let ok = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "install the Python nbd module for {PYTHON} (Debian package python3-libnbd)"
    );
}

/// Path of a file under tests/ (scripts, guest builder).
pub fn tests_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(rel)
}

/// Runs `cmd` with a time limit; panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    run_ok_within(cmd, TOOL_TIMEOUT)
}

/// Like [`run_ok`] with an explicit limit.
pub fn run_ok_within(cmd: &mut Command, limit: Duration) -> Output {
    let out = run_within(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` with a time limit and returns its output whatever the status;
/// panics if it runs past the limit (after killing it).
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    // Output goes to temp files, not pipes: a grandchild that inherits them
    // (a socket-activated server, say) must not block the reader.
    let out_file = tempfile::tempfile().expect("stdout temp file");
    let err_file = tempfile::tempfile().expect("stderr temp file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().expect("clone stdout file"))
        .stderr(err_file.try_clone().expect("clone stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let status = wait_with_deadline(&mut child, limit);
    let read_back = |mut f: File| {
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("rewind output file");
        f.read_to_end(&mut buf).expect("read output file");
        buf
    };
    let stdout = read_back(out_file);
    let stderr = read_back(err_file);
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{cmd:?} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout,
        stderr,
    }
}

/// stdout of a successful run as a String.
pub fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).expect("utf-8 output")
}

/// Writes `len` bytes of seeded pseudo-random data (xorshift64*) to `path`.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(File::create(path).expect("create data file"));
    let mut state = seed | 1;
    let mut left = len;
    while left > 0 {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        let n = left.min(8) as usize;
        f.write_all(&word[..n]).expect("write data file");
        left -= n as u64;
    }
    f.flush().expect("flush data file");
}

/// Panics unless the two files have identical contents (via `cmp`).
pub fn assert_same_file(a: &Path, b: &Path) {
    let out = run_within(Command::new("cmp").arg(a).arg(b), TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}
