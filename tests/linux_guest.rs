//! The most realistic client: a Linux guest under QEMU (TCG) whose virtio
//! disk is the NBD export. The first boot makes an ext4 file system, writes
//! files, records their checksums and trims a deleted file's blocks (TRIM
//! through virtio discard); the server is restarted; the second
//! boot mounts the file system and checks every file.
#![forbid(unsafe_code)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{require_tool, run_ok_within, run_within, Export};

/// Building the guest downloads ~70 MB of Debian packages the first time.
const GUEST_BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// One boot takes 5-20 s under TCG here; leave room for a loaded CI box.
const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Builds (or finds in target/guest-cache) the kernel and initramfs.
fn guest_images() -> PathBuf {
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
            .arg(common::tests_path("guest/build.sh"))
            .arg(&cache),
        GUEST_BUILD_TIMEOUT,
    );
    let dir = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim());
    assert!(dir.join("vmlinuz").is_file() && dir.join("initrd.gz").is_file());
    dir
}

/// Boots the guest once in `mode`; returns its console output after
/// checking it printed `marker`.
fn boot(images: &Path, export: &Export, mode: &str, marker: &str) -> String {
    let port = export.port().expect("the guest test uses TCP");
    let out = run_within(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot"])
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
                "file=nbd://127.0.0.1:{port}/{},format=raw,if=virtio,cache=none,discard=unmap",
                common::EXPORT_NAME
            )),
        GUEST_BOOT_TIMEOUT,
    );
    let console =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        console.lines().any(|l| l.trim_end().ends_with(marker)),
        "guest boot ({mode}) did not print {marker}; status {}\n{console}",
        out.status
    );
    console
}

/// The "SUM <md5> <file>" lines the guest printed, sorted.
fn sums(console: &str) -> Vec<String> {
    let mut v: Vec<String> = console
        .lines()
        // The console may put terminal escapes before the first line.
        .filter_map(|l| l.find("SUM ").map(|i| l[i..].trim_end().to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn linux_guest_writes_ext4_and_reads_it_back_after_server_restart() {
    // Proves a real kernel's virtio-blk over QEMU's NBD client can mkfs, write, sync, and after a server restart mount and read every file intact.
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    let images = guest_images();
    let mut export = Export::start_default();

    let first = boot(&images, &export, "write", "REPLICATOR-GUEST-WRITE-OK");
    assert!(
        first.contains("/mnt: ") && first.contains("trimmed"),
        "fstrim did not report trimming:\n{first}"
    );
    let written = sums(&first);
    assert_eq!(written.len(), 8, "guest did not report 8 files:\n{first}");

    let status = export.stop();
    assert!(status.success(), "server exited with {status} on SIGTERM");
    export.start_again();

    let second = boot(&images, &export, "verify", "REPLICATOR-GUEST-VERIFY-OK");
    assert_eq!(
        sums(&second),
        written,
        "files differ after restart:\n{second}"
    );
}
