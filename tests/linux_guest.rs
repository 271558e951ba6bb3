//! The most realistic client: a Linux guest under QEMU (TCG) whose virtio
//! disk is the NBD export. The first boot makes an ext4 file system, writes
//! files, records their checksums and trims a deleted file's blocks (TRIM
//! through virtio discard); the server is restarted; the second
//! boot mounts the file system and checks every file.
#![forbid(unsafe_code)]

mod common;

use common::guest::{boot, guest_images, sums};
use common::Export;

#[test]
fn linux_guest_writes_ext4_and_reads_it_back_after_server_restart() {
    // Proves a real kernel's virtio-blk over QEMU's NBD client can mkfs, write, sync, and after a server restart mount and read every file intact.
    let images = guest_images();
    let mut export = Export::start_default();
    let uri = format!(
        "nbd://127.0.0.1:{}/{}",
        export.port().expect("the guest test uses TCP"),
        common::EXPORT_NAME
    );

    let first = boot(&images, &uri, "write", "REPLICATOR-GUEST-WRITE-OK");
    assert!(
        first.contains("/mnt: ") && first.contains("trimmed"),
        "fstrim did not report trimming:\n{first}"
    );
    let written = sums(&first);
    assert_eq!(written.len(), 8, "guest did not report 8 files:\n{first}");

    let status = export.stop();
    assert!(status.success(), "server exited with {status} on SIGTERM");
    export.start_again();

    let second = boot(&images, &uri, "verify", "REPLICATOR-GUEST-VERIFY-OK");
    assert_eq!(
        sums(&second),
        written,
        "files differ after restart:\n{second}"
    );
}
