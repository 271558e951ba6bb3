//! The test guest: a Debian kernel and a busybox initramfs built by
//! `tests/guest/build.sh` (cached under target/guest-cache), booted under
//! `qemu-system-x86_64 -accel tcg` with an NBD export as its virtio disk.
//! `tests/guest/init` reads `replicator_mode=write|verify|crash` and prints
//! `SUM <md5> <file>` lines and a marker on the serial console.
//!
//! It must not wait a fixed time: a boot runs until the guest powers off
//! (with a time limit), and a background guest is polled for its marker
//! with a deadline. A guest process never outlives its [`Guest`] value.
#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{require_tool, run_ok_within, run_within, tests_path};

/// Building the guest downloads ~70 MB of Debian packages the first time.
pub const GUEST_BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// One boot takes 5-20 s under TCG here; leave room for a loaded CI box.
pub const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Interval between two looks at a background guest's console.
const CONSOLE_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Builds (or finds in target/guest-cache) the kernel and initramfs.
pub fn guest_images() -> PathBuf {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    for (tool, pkg) in [
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("cpio", "cpio"),
        ("gzip", "gzip"),
    ] {
        require_tool(tool, pkg);
    }
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("guest-cache");
    let out = run_ok_within(
        Command::new("bash")
            .arg(tests_path("guest/build.sh"))
            .arg(&cache),
        GUEST_BUILD_TIMEOUT,
    );
    let dir = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim());
    assert!(dir.join("vmlinuz").is_file() && dir.join("initrd.gz").is_file());
    dir
}

fn qemu_command(images: &Path, nbd_uri: &str, mode: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot"])
        .args(["-nic", "none", "-kernel"])
        .arg(images.join("vmlinuz"))
        .arg("-initrd")
        .arg(images.join("initrd.gz"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 replicator_mode={mode}"
        ))
        .arg("-drive")
        .arg(format!(
            "file={nbd_uri},format=raw,if=virtio,cache=none,discard=unmap"
        ));
    cmd
}

fn has_marker(console: &str, marker: &str) -> bool {
    console.lines().any(|l| l.trim_end().ends_with(marker))
}

/// Boots the guest once in `mode` until it powers off; returns its console
/// output after checking it printed `marker`.
pub fn boot(images: &Path, nbd_uri: &str, mode: &str, marker: &str) -> String {
    let out = run_within(&mut qemu_command(images, nbd_uri, mode), GUEST_BOOT_TIMEOUT);
    let console =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        has_marker(&console, marker),
        "guest boot ({mode}) did not print {marker}; status {}\n{console}",
        out.status
    );
    console
}

/// The "SUM <md5> <file>" lines the guest printed, sorted.
pub fn sums(console: &str) -> Vec<String> {
    let mut v: Vec<String> = console
        .lines()
        // The console may put terminal escapes before the first line.
        .filter_map(|l| l.find("SUM ").map(|i| l[i..].trim_end().to_string()))
        .collect();
    v.sort();
    v
}

/// A guest running in the background, its console going to a file.
#[derive(Debug)]
pub struct Guest {
    child: Option<Child>,
    console: PathBuf,
}

impl Guest {
    /// Starts the guest in `mode`; the console goes to `console`.
    pub fn spawn(images: &Path, nbd_uri: &str, mode: &str, console: &Path) -> Guest {
        let out = File::create(console).expect("create console file");
        let child = qemu_command(images, nbd_uri, mode)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone console handle"))
            .stderr(out)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Guest {
            child: Some(child),
            console: console.to_path_buf(),
        }
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Polls the console until a line ends with `marker`; panics if the
    /// guest exits first, prints the failure marker, or the limit passes.
    pub fn wait_for(&mut self, marker: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let console = self.console();
            if has_marker(&console, marker) {
                return console;
            }
            assert!(
                !console.contains("REPLICATOR-GUEST-FAIL"),
                "the guest failed:\n{console}"
            );
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the guest exited with {status} before {marker}:\n{console}");
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not print {marker} within {limit:?}:\n{console}"
            );
            std::thread::sleep(CONSOLE_POLL_INTERVAL);
        }
    }

    /// Kills the VM (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}
