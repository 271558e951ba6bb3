//! Failover under a real guest: a Linux guest under QEMU has the primary's
//! export as its disk, makes an ext4 file system, writes files and syncs,
//! and keeps writing; the primary is killed with SIGKILL mid-write (and the
//! VM with it); the secondary is promoted; a guest booted from the
//! secondary's export mounts the file system and finds every synced file
//! intact, and `e2fsck -fn` on the secondary's replica finds it clean.
#![forbid(unsafe_code)]

mod common;

use std::process::Command;

use common::cluster::{Cluster, ClusterSpec, STATE_TIMEOUT};
use common::guest::{boot, guest_images, sums, Guest, GUEST_BOOT_TIMEOUT};
use common::{require_tool, run_within};

#[test]
fn guest_fs_survives_primary_kill_and_boots_clean_from_promoted_secondary() {
    // Proves what a VM sees on failover: every file the guest synced before
    // the primary died is on the promoted secondary, and the ext4 file
    // system there mounts (journal replay) and checks clean.
    require_tool("e2fsck", "e2fsprogs");
    let images = guest_images();
    let mut c = Cluster::up(ClusterSpec::default());
    let mut guest = Guest::spawn(
        &images,
        &c.alpha().uri(),
        "crash",
        &c.dir().join("guest-crash.console"),
    );
    let console = guest.wait_for("REPLICATOR-GUEST-SYNCED", GUEST_BOOT_TIMEOUT);
    let synced = sums(&console);
    assert_eq!(synced.len(), 8, "guest did not report 8 files:\n{console}");

    // The primary dies while the guest is still writing.
    c.nodes[0].kill_hard();
    guest.kill();

    let b = c.bravo();
    b.wait_status("notices alpha is gone", STATE_TIMEOUT, |s| {
        s["connection"] != "Connected" && s["peer_role"] == "Unknown"
    });
    b.replctl_ok(&["primary"]);
    b.wait_nbd();
    let second = boot(&images, &b.uri(), "verify", "REPLICATOR-GUEST-VERIFY-OK");
    assert_eq!(
        sums(&second),
        synced,
        "files differ on the promoted secondary:\n{second}"
    );

    // The guest's mount replayed the journal; the replica is now clean.
    let fsck = run_within(
        Command::new("e2fsck").args(["-f", "-n"]).arg(&b.disk),
        common::TOOL_TIMEOUT,
    );
    assert!(
        fsck.status.success(),
        "e2fsck -fn on bravo's replica: {}\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}
