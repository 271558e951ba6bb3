//! Two-node harness for the replication tests: writes the resource config
//! (optionally with a fault proxy in front of each node's replication port),
//! runs `replctl create-md`, starts two `replicatord` processes, drives them
//! with `replctl`, reads `replctl status --json`, and compares the two
//! replicas' data areas byte for byte.
//!
//! It must not sleep a fixed time to wait for a state (every wait polls
//! `status --json` with a deadline and prints both nodes' logs and last
//! status when it expires), and it never leaves a daemon behind: each
//! [`Node`] kills its process on drop. The proxies run on a tokio runtime
//! owned by the [`Cluster`], beside the blocking test code.
#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use replicator::fault_proxy::FaultProxy;
use serde_json::Value;

use super::{
    free_port, run_within, wait_with_deadline, ACTIVATE_PY, EXPORT_NAME, PYTHON,
    SERVER_STOP_TIMEOUT,
};

/// Node names, in the order the config lists them.
pub const NODE_NAMES: [&str; 2] = ["alpha", "bravo"];
/// Default size of each node's backing file.
pub const CLUSTER_DISK_BYTES: u64 = 64 << 20;
/// How long a state change may take to show in `status --json`.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `replctl` call may take (not `--wait` ones).
pub const REPLCTL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon gets to answer on its control socket after spawn.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two status polls.
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Size of one read when comparing replicas.
const COMPARE_CHUNK_BYTES: usize = 1 << 20;
/// The shared secret of the generated configs.
pub const CLUSTER_SECRET: &str = "replication-test-secret";

/// The `replicatord` and `replctl` to run: the ones cargo built for this
/// test, or those in `REPLICATOR_TEST_BIN_DIR` (e.g. `target/release`, to
/// run the suite against an optimised build, whose speed exposes
/// different races and backlogs than a debug build).
pub fn program(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("REPLICATOR_TEST_BIN_DIR") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(name);
        assert!(
            path.is_file(),
            "REPLICATOR_TEST_BIN_DIR has no {}",
            path.display()
        );
        return path;
    }
    match name {
        "replicatord" => PathBuf::from(env!("CARGO_BIN_EXE_replicatord")),
        "replctl" => PathBuf::from(env!("CARGO_BIN_EXE_replctl")),
        other => panic!("unknown program {other}"),
    }
}

/// Where a node keeps its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meta {
    /// At the end of the backing file: the data area is shorter than the file.
    Internal,
    /// In a file of its own: the data area is the whole backing file.
    External,
}

/// What cluster to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub disk_bytes: u64,
    pub meta: Meta,
    /// Put a [`FaultProxy`] in front of each node's replication port.
    pub proxied: bool,
    /// `timeout_ms` (silent peer declared lost), if not the default.
    pub timeout_ms: Option<u64>,
    /// O_DIRECT on the backing files.
    pub direct: bool,
    /// `resync_rate` (e.g. "1M"), unlimited if `None`.
    pub resync_rate: Option<String>,
    /// Write the backing files full of zeroes instead of leaving them
    /// sparse, as a real disk would be allocated.
    pub allocated: bool,
    /// Bravo's own secret, resource name and disk size, when they should
    /// differ from alpha's (refusal tests).
    pub bravo_secret: Option<String>,
    pub bravo_resource: Option<String>,
    pub bravo_disk_bytes: Option<u64>,
    /// Start each node as systemd would with socket activation: its NBD
    /// socket (a Unix socket in the cluster directory) bound beforehand and
    /// passed as fd 3, instead of the configured TCP address.
    pub activated: bool,
    /// `read_only = true`: the primary's export refuses writes.
    pub read_only: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            disk_bytes: CLUSTER_DISK_BYTES,
            meta: Meta::External,
            proxied: false,
            timeout_ms: None,
            direct: false,
            resync_rate: None,
            allocated: false,
            bravo_secret: None,
            bravo_resource: None,
            bravo_disk_bytes: None,
            activated: false,
            read_only: false,
        }
    }
}

/// One node: its config file, ports, disk and (while running) its process.
#[derive(Debug)]
pub struct Node {
    pub name: &'static str,
    pub config: PathBuf,
    pub disk: PathBuf,
    pub nbd_port: u16,
    pub repl_port: u16,
    pub resource: String,
    /// The socket-activated NBD socket, when the node is started with one.
    pub activated: Option<PathBuf>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Node {
    /// `replctl --config C --node N ARGS…`, whatever its exit status.
    pub fn replctl(&self, args: &[&str]) -> Output {
        self.replctl_within(args, REPLCTL_TIMEOUT)
    }

    /// Like [`Node::replctl`] with a longer limit (for `--wait`).
    pub fn replctl_within(&self, args: &[&str], limit: Duration) -> Output {
        let mut cmd = Command::new(program("replctl"));
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--node", self.name])
            .args(args);
        run_within(&mut cmd, limit)
    }

    /// Runs `replctl ARGS…` and panics with its output and the daemon's log
    /// unless it exits 0; returns stdout.
    pub fn replctl_ok(&self, args: &[&str]) -> String {
        self.replctl_ok_within(args, REPLCTL_TIMEOUT)
    }

    /// Like [`Node::replctl_ok`] with a longer limit (for `--wait`).
    pub fn replctl_ok_within(&self, args: &[&str], limit: Duration) -> String {
        let out = self.replctl_within(args, limit);
        assert!(
            out.status.success(),
            "replctl {args:?} on {} failed with {}\nstdout:\n{}\nstderr:\n{}\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `replctl status --json` parsed, or `None` while the daemon does not answer.
    pub fn try_status(&self) -> Option<Value> {
        let out = self.replctl(&["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `replctl status --json` parsed; panics if the daemon does not answer.
    pub fn status(&self) -> Value {
        self.try_status().unwrap_or_else(|| {
            panic!(
                "replctl status --json on {} failed\n{}",
                self.name,
                self.log()
            )
        })
    }

    /// Polls the status until `pred` holds; panics after `limit` with the
    /// last status and the log.
    pub fn wait_status(&self, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(s) = self.try_status() {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: {what}: not reached within {limit:?}; last status:\n{}\n{}",
                    self.name,
                    last.map(|s| serde_json::to_string_pretty(&s).unwrap())
                        .unwrap_or_else(|| "(no answer)".into()),
                    self.log()
                );
            }
            std::thread::sleep(STATUS_POLL_INTERVAL);
        }
    }

    /// The NBD URI of this node's export (served only while Primary).
    pub fn uri(&self) -> String {
        match &self.activated {
            Some(path) => format!("nbd+unix:///{}?socket={}", self.resource, path.display()),
            None => format!("nbd://127.0.0.1:{}/{}", self.nbd_port, self.resource),
        }
    }

    /// Whether something answers the NBD greeting on the export's socket.
    /// (A socket-activated socket accepts connections even while nothing
    /// serves them; only the greeting tells.)
    pub fn serves_nbd(&self) -> bool {
        fn greets(mut s: impl Read) -> std::io::Result<bool> {
            let mut magic = [0u8; 8];
            s.read_exact(&mut magic)?;
            Ok(&magic == b"NBDMAGIC")
        }
        let timeout = Some(Duration::from_secs(2));
        match &self.activated {
            Some(path) => UnixStream::connect(path)
                .and_then(|s| {
                    s.set_read_timeout(timeout)?;
                    greets(s)
                })
                .unwrap_or(false),
            None => TcpStream::connect(("127.0.0.1", self.nbd_port))
                .and_then(|s| {
                    s.set_read_timeout(timeout)?;
                    greets(s)
                })
                .unwrap_or(false),
        }
    }

    /// Polls until the export answers NBD.
    pub fn wait_nbd(&self) {
        let deadline = Instant::now() + STATE_TIMEOUT;
        while !self.serves_nbd() {
            assert!(
                Instant::now() < deadline,
                "{} does not serve NBD at {} within {STATE_TIMEOUT:?}\n{}",
                self.name,
                self.uri(),
                self.log()
            );
            std::thread::sleep(STATUS_POLL_INTERVAL);
        }
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.join(format!("{}-{start}.log", self.name))
    }

    /// Everything the daemon wrote to stderr, per start.
    pub fn log(&self) -> String {
        let mut all = String::new();
        for start in 1..=self.starts {
            let text = std::fs::read_to_string(self.log_path(start)).unwrap_or_default();
            all.push_str(&format!(
                "--- {} start {start} stderr ---\n{text}",
                self.name
            ));
        }
        all
    }

    /// `replctl create-md` (offline).
    pub fn create_md(&self) {
        self.replctl_ok(&["create-md"]);
    }

    /// Starts the daemon and waits until its control socket answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        self.starts += 1;
        let log = File::create(self.log_path(self.starts)).expect("create daemon log");
        let mut cmd = match &self.activated {
            Some(path) => {
                // The wrapper binds the socket (a stale one from the last
                // start would make that fail), then execs the daemon.
                let _ = std::fs::remove_file(path);
                let mut c = Command::new(PYTHON);
                c.args(["-c", ACTIVATE_PY])
                    .arg(path)
                    .arg(program("replicatord"));
                c
            }
            None => Command::new(program("replicatord")),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(["--node", self.name])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn replicatord");
        self.child = Some(child);
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "replicatord {} exited with {status} at start\n{}",
                    self.name,
                    self.log()
                );
            }
            if self.try_status().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicatord {} did not answer on its control socket within {DAEMON_START_TIMEOUT:?}\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(STATUS_POLL_INTERVAL);
        }
    }

    /// SIGKILL (a crash), reaped.
    pub fn kill_hard(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        child.kill().expect("SIGKILL replicatord");
        child.wait().expect("reap replicatord");
    }

    /// SIGTERM and wait; panics unless it exits 0 within the limit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        let ok = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &child.id().to_string()])
            .status()
            .expect("run sh -c kill");
        assert!(ok.success(), "kill -TERM failed");
        match wait_with_deadline(&mut child, SERVER_STOP_TIMEOUT) {
            Some(status) => assert!(
                status.success(),
                "{} exited with {status} on SIGTERM\n{}",
                self.name,
                self.log()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {SERVER_STOP_TIMEOUT:?}\n{}",
                    self.name,
                    self.log()
                );
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits at most `limit` for the daemon to exit on its own; its exit
    /// status, or None if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = super::wait_with_deadline(self.child.as_mut()?, limit)?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Panics if any run of this daemon logged a Rust panic.
    pub fn assert_no_panic_logged(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "{} panicked:\n{log}", self.name);
    }

    /// `len` bytes of the data area at `offset`, read from the backing file.
    pub fn read_data(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.disk).expect("open backing file");
        f.seek(SeekFrom::Start(offset)).expect("seek backing file");
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).expect("read backing file");
        buf
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Two nodes of resource `vm1`, optionally with a fault proxy in front of
/// each replication port.
#[derive(Debug)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub nodes: [Node; 2],
    /// `proxies[i]` forwards to node i's replication port; the other node
    /// dials it. Present when `spec.proxied`.
    pub proxies: Option<[FaultProxy; 2]>,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Writes the configs and backing files and runs `create-md` on both
    /// nodes; starts nothing.
    pub fn prepare(spec: ClusterSpec) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("replicator-repl-")
            .tempdir()
            .expect("create temp dir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("fault-proxy")
            .build()
            .expect("start the proxies' runtime");
        let repl_ports = [free_port(), free_port()];
        let nbd_ports = [free_port(), free_port()];
        let proxies = spec.proxied.then(|| {
            runtime.block_on(async {
                let mut v = Vec::new();
                for port in repl_ports {
                    let upstream = SocketAddr::from(([127, 0, 0, 1], port));
                    v.push(FaultProxy::start(upstream).await.expect("start proxy"));
                }
                let [a, b]: [FaultProxy; 2] = v.try_into().expect("two proxies");
                [a, b]
            })
        });
        let d = dir.path();
        let mk_node = |i: usize| {
            let name = NODE_NAMES[i];
            let bravo = i == 1;
            let size = if bravo {
                spec.bravo_disk_bytes.unwrap_or(spec.disk_bytes)
            } else {
                spec.disk_bytes
            };
            let disk = d.join(format!("{name}.img"));
            if spec.allocated {
                allocate_zeroes(&disk, size);
            } else {
                File::create(&disk)
                    .and_then(|f| f.set_len(size))
                    .expect("create sparse backing file");
            }
            let resource = match (bravo, &spec.bravo_resource) {
                (true, Some(r)) => r.clone(),
                _ => EXPORT_NAME.to_string(),
            };
            let secret = match (bravo, &spec.bravo_secret) {
                (true, Some(s)) => s.clone(),
                _ => CLUSTER_SECRET.to_string(),
            };
            // This node listens on its own port and dials the peer's,
            // which is the peer's proxy when there are proxies.
            let repl_addr = |j: usize| match (&proxies, j == i) {
                (Some(p), false) => p[j].addr().to_string(),
                _ => format!("127.0.0.1:{}", repl_ports[j]),
            };
            let mut text = format!(
                "# Generated by tests/common/cluster.rs for node {name}.\n\
                 resource = \"{resource}\"\nprotocol = \"C\"\nsecret = \"{secret}\"\n\
                 direct = {direct}\n",
                direct = spec.direct
            );
            if let Some(t) = spec.timeout_ms {
                text.push_str(&format!("timeout_ms = {t}\n"));
            }
            if spec.read_only {
                text.push_str("read_only = true\n");
            }
            if let Some(r) = &spec.resync_rate {
                text.push_str(&format!("resync_rate = \"{r}\"\n"));
            }
            for (j, n) in NODE_NAMES.iter().enumerate() {
                let meta = match spec.meta {
                    Meta::Internal => "internal".to_string(),
                    Meta::External => d.join(format!("{n}.meta")).display().to_string(),
                };
                text.push_str(&format!(
                    "\n[nodes.{n}]\nreplication = \"{repl}\"\nnbd = \"127.0.0.1:{nbd}\"\n\
                     control = \"{ctl}\"\ndisk = \"{disk}\"\nmeta = \"{meta}\"\n",
                    repl = repl_addr(j),
                    nbd = nbd_ports[j],
                    ctl = d.join(format!("{n}.sock")).display(),
                    disk = d.join(format!("{n}.img")).display(),
                ));
            }
            let config = d.join(format!("{name}.toml"));
            std::fs::write(&config, text).expect("write config");
            Node {
                name,
                config,
                disk,
                nbd_port: nbd_ports[i],
                repl_port: repl_ports[i],
                resource,
                activated: spec.activated.then(|| d.join(format!("{name}-nbd.sock"))),
                dir: d.to_path_buf(),
                child: None,
                starts: 0,
            }
        };
        let nodes = [mk_node(0), mk_node(1)];
        for n in &nodes {
            n.create_md();
        }
        Cluster {
            spec,
            nodes,
            proxies,
            runtime,
            dir,
        }
    }

    /// Prepares, starts both nodes, waits until they are connected, skips
    /// the initial sync (`new-current-uuid --clear-bitmap`: both disks are
    /// fresh sparse files, all zero), promotes alpha and waits for its export.
    pub fn up(spec: ClusterSpec) -> Cluster {
        Cluster::prepare(spec).started()
    }

    /// A prepared pair started as [`Cluster::up`] does: connected, both
    /// disks UpToDate, alpha Primary and serving NBD.
    pub fn started(self) -> Cluster {
        let mut c = self;
        c.nodes[0].start();
        c.nodes[1].start();
        c.wait_both("connected", |s| s["connection"] == "Connected");
        c.alpha()
            .replctl_ok(&["new-current-uuid", "--clear-bitmap"]);
        // Bravo's view of alpha's disk is checked after the promotion:
        // see replication.rs `clear_bitmap_shows_both_disks_up_to_date_on_both_nodes`.
        c.wait_both("UpToDate, in sync", |s| {
            s["disk"] == "UpToDate" && s["replication"] == "Established"
        });
        c.alpha()
            .wait_status("sees bravo UpToDate", STATE_TIMEOUT, |s| {
                s["peer_disk"] == "UpToDate"
            });
        c.alpha().replctl_ok(&["primary"]);
        c.alpha().wait_nbd();
        c.bravo()
            .wait_status("sees alpha as an UpToDate Primary", STATE_TIMEOUT, |s| {
                s["peer_role"] == "Primary" && s["peer_disk"] == "UpToDate"
            });
        c
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn alpha(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn bravo(&self) -> &Node {
        &self.nodes[1]
    }

    /// The proxies (panics if the cluster was built without them).
    pub fn proxies(&self) -> &[FaultProxy; 2] {
        self.proxies
            .as_ref()
            .expect("cluster built without proxies")
    }

    /// Cuts both directions of the link.
    pub fn cut(&self) {
        self.proxies().iter().for_each(FaultProxy::cut);
    }

    /// Stalls both directions of the link.
    pub fn stall(&self) {
        self.proxies().iter().for_each(FaultProxy::stall);
    }

    /// Lets the link through again.
    pub fn heal(&self) {
        self.proxies().iter().for_each(FaultProxy::heal);
    }

    /// Runs `f` on the proxies' runtime (for async proxy calls, if any).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Waits until `pred` holds on both nodes' status.
    pub fn wait_both(&self, what: &str, pred: impl Fn(&Value) -> bool) {
        for n in &self.nodes {
            n.wait_status(what, STATE_TIMEOUT, &pred);
        }
    }

    /// Waits until both nodes are connected, Established, UpToDate and
    /// have nothing out of sync.
    pub fn wait_in_sync(&self, limit: Duration) {
        for n in &self.nodes {
            n.wait_status("connected and in sync", limit, |s| {
                s["connection"] == "Connected"
                    && s["replication"] == "Established"
                    && s["disk"] == "UpToDate"
                    && s["peer_disk"] == "UpToDate"
                    && s["out_of_sync_bytes"] == 0
            });
        }
    }

    /// The exported size (from alpha's status), which is the data area.
    pub fn size_bytes(&self) -> u64 {
        self.alpha().status()["size_bytes"]
            .as_u64()
            .expect("size_bytes is a number")
    }

    /// Panics with the first differing offset unless the two replicas'
    /// data areas (the first `size_bytes` of each backing file; internal
    /// metadata lies beyond) are byte-identical.
    pub fn assert_replicas_identical(&self) {
        let size = self.size_bytes();
        for n in &self.nodes {
            let len = std::fs::metadata(&n.disk).expect("stat disk").len();
            assert!(
                len >= size,
                "{} backing file is {len} bytes, shorter than the {size}-byte export",
                n.name
            );
            if self.spec.meta == Meta::External {
                assert_eq!(len, size, "external metadata: the export is the whole file");
            }
        }
        let mut a = File::open(&self.alpha().disk).expect("open alpha disk");
        let mut b = File::open(&self.bravo().disk).expect("open bravo disk");
        let mut buf_a = vec![0u8; COMPARE_CHUNK_BYTES];
        let mut buf_b = vec![0u8; COMPARE_CHUNK_BYTES];
        let mut offset = 0u64;
        while offset < size {
            let n = (size - offset).min(COMPARE_CHUNK_BYTES as u64) as usize;
            a.read_exact(&mut buf_a[..n]).expect("read alpha disk");
            b.read_exact(&mut buf_b[..n]).expect("read bravo disk");
            if buf_a[..n] != buf_b[..n] {
                let i = (0..n).find(|&i| buf_a[i] != buf_b[i]).unwrap_or(0);
                panic!(
                    "replicas differ at byte {} (alpha {:#04x}, bravo {:#04x})\n{}\n{}",
                    offset + i as u64,
                    buf_a[i],
                    buf_b[i],
                    self.alpha().log(),
                    self.bravo().log()
                );
            }
            offset += n as u64;
        }
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!("{}\n{}", self.alpha().log(), self.bravo().log())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Creates `path` as `size` bytes of written zeroes (no holes), left in
/// the page cache unsynced as `dd` leaves them: O_DIRECT writes over dirty
/// cached pages are slow, which makes the disk slower than the link.
fn allocate_zeroes(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = File::create(path).expect("create backing file");
    let chunk = vec![0u8; COMPARE_CHUNK_BYTES];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("write zeroes");
        left -= n as u64;
    }
}

/// Runs qemu-io commands against `uri`; panics unless all succeed.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    qemu_io_within(uri, commands, super::TOOL_TIMEOUT)
}

/// Like [`qemu_io`] with an explicit limit.
pub fn qemu_io_within(uri: &str, commands: &[&str], limit: Duration) -> String {
    super::require_tool("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "none"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run_within(&mut cmd, limit);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.to_lowercase().contains("fail"),
        "qemu-io {commands:?} on {uri} failed ({}):\n{text}",
        out.status
    );
    text
}

/// `len` bytes of `byte`.
pub fn filled(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

/// A status field as u64 (panics with the status if it is not a number).
pub fn field_u64(s: &Value, key: &str) -> u64 {
    s[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status field {key} is not a number: {s}"))
}
