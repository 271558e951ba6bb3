//! Human-readable output of `replctl`: status like `drbdadm status`, progress
//! bars and plain progress lines, byte and duration formatting.
//!
//! Pure functions of their arguments (no I/O, no clock) so each output is
//! pinned by a golden test. Must not talk to the daemon or decide exit codes.

use std::fmt::Write as _;

use crate::control::protocol::{ConnectionState, Progress, StatusReport};

/// Width of the `#`/`.` part of the terminal progress bar, in characters.
pub const PROGRESS_BAR_WIDTH_CHARS: usize = 24;

/// Bytes in binary units with one decimal: `0B`, `512B`, `4.0KiB`, `1.00GiB`
/// (two decimals from GiB up, where one decimal hides too much).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit >= 2 {
        format!("{value:.2}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// A rate: `bytes(n)/s`.
pub fn rate(bytes_per_s: u64) -> String {
    format!("{}/s", bytes(bytes_per_s))
}

/// Seconds as `M:SS` or `H:MM:SS`; `--:--` when unknown.
pub fn duration(seconds: Option<u64>) -> String {
    match seconds {
        None => "--:--".to_owned(),
        Some(s) if s < 3600 => format!("{}:{:02}", s / 60, s % 60),
        Some(s) => format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60),
    }
}

fn progress_tokens(progress: &Progress) -> String {
    format!(
        "{:.2}% {}/{} rate:{} eta:{}",
        progress.percent(),
        bytes(progress.done_bytes),
        bytes(progress.total_bytes),
        rate(progress.rate_bytes_per_s),
        duration(progress.eta_s)
    )
}

/// `replctl status` for humans, in the shape of `drbdadm status`:
///
/// ```text
/// vm1 role:Primary
///   disk:UpToDate size:1.00GiB
///   nbd:127.0.0.1:10809 clients:1
///   bravo role:Secondary connection:Connected protocol:C
///     replication:SyncSource peer-disk:Inconsistent out-of-sync:512.0MiB
///     resync:50.00% 512.0MiB/1.00GiB rate:100.0MiB/s eta:0:05
/// ```
pub fn status_text(s: &StatusReport) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{} role:{:?}", s.resource, s.role);
    let _ = writeln!(out, "  disk:{:?} size:{}", s.disk, bytes(s.size_bytes));
    if let Some(error) = &s.disk_error {
        let _ = writeln!(out, "  disk-error: {error}");
    }
    if let Some(nbd) = &s.nbd {
        let _ = writeln!(out, "  nbd:{nbd} clients:{}", s.nbd_clients);
    }
    if s.split_brain {
        let _ = writeln!(
            out,
            "  split-brain:detected (nothing was overwritten; the link stays down until resolved)"
        );
    }
    if s.peer_node.is_empty() {
        let _ = writeln!(out, "  (no peer configured)");
    } else if s.connection == ConnectionState::Connected {
        let _ = writeln!(
            out,
            "  {} role:{:?} connection:Connected protocol:{:?}",
            s.peer_node, s.peer_role, s.protocol
        );
        let _ = writeln!(
            out,
            "    replication:{:?} peer-disk:{:?} out-of-sync:{}",
            s.replication,
            s.peer_disk,
            bytes(s.out_of_sync_bytes)
        );
    } else {
        let _ = writeln!(out, "  {} connection:{:?}", s.peer_node, s.connection);
        let _ = writeln!(out, "    out-of-sync:{}", bytes(s.out_of_sync_bytes));
    }
    if let Some(progress) = &s.resync {
        let paused = if s.replication.is_paused() {
            " (paused)"
        } else {
            ""
        };
        let waiting = match Hold::of_resync(s) {
            Hold::DiskWait { wait_s, peer } => format!(
                " ({}; asking again within {wait_s}s, `replctl resync` now)",
                failed_disk(peer)
            ),
            Hold::TargetWaits => format!(
                " ({} waits after a disk failed; `replctl resync` on {} asks now)",
                s.peer_node, s.peer_node
            ),
            Hold::Moving | Hold::Paused => String::new(),
        };
        let _ = writeln!(
            out,
            "    resync:{}{paused}{waiting}",
            progress_tokens(progress)
        );
    }
    if let Some(progress) = &s.verify {
        let _ = writeln!(out, "    verify:{}", progress_tokens(progress));
    }
    if let Some(reason) = &s.last_refusal {
        let _ = writeln!(out, "    refused: {reason}");
    }
    // The same sentence is often both why the peer was refused and why
    // the link dropped; say it once. Once the link is up again the reason
    // of the last drop is history (still in `--json`).
    if let Some(reason) = s.connection_error.as_ref().filter(|r| {
        s.last_refusal.as_ref() != Some(*r) && s.connection != ConnectionState::Connected
    }) {
        let _ = writeln!(out, "    link-error: {reason}");
    }
    out
}

/// What is being waited for by `--wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOp {
    /// `resync --wait`.
    Resync,
    /// `verify --wait`.
    Verify,
}

impl WaitOp {
    /// The operation's name in output.
    pub fn name(self) -> &'static str {
        match self {
            WaitOp::Resync => "resync",
            WaitOp::Verify => "verify",
        }
    }
}

/// Why a running operation does not move, if it is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Not held: rate and ETA are shown.
    Moving,
    /// Paused by `pause-sync`.
    Paused,
    /// A SyncTarget waiting after its disk (or, `peer`, the SyncSource's)
    /// failed (`resync_disk_wait_s`).
    DiskWait { wait_s: u64, peer: bool },
    /// A SyncSource whose target waits after a disk failed
    /// (`peer_resync_disk_wait`).
    TargetWaits,
}

impl Hold {
    /// What holds a running resync after a disk failure, by its status
    /// (a pause is the wait tracker's to see).
    pub fn of_resync(s: &StatusReport) -> Hold {
        match s.resync_disk_wait_s {
            Some(wait_s) => Hold::DiskWait {
                wait_s,
                peer: s.resync_disk_wait_peer,
            },
            None if s.peer_resync_disk_wait => Hold::TargetWaits,
            None => Hold::Moving,
        }
    }
}

/// Whose disk a resync waits for: "the disk failed" or "the peer's disk
/// failed".
fn failed_disk(peer: bool) -> &'static str {
    if peer {
        "the peer's disk failed"
    } else {
        "the disk failed"
    }
}

/// The terminal progress bar, redrawn in place: starts with `\r`, ends by
/// clearing the rest of the line, no newline.
///
/// `\rresync [############............]  50.00% 512.0MiB/1.00GiB 100.0MiB/s ETA 0:05\x1b[K`
pub fn progress_bar(op: WaitOp, progress: &Progress, hold: Hold) -> String {
    let percent = progress.percent();
    let filled = ((percent / 100.0) * PROGRESS_BAR_WIDTH_CHARS as f64).floor() as usize;
    let filled = filled.min(PROGRESS_BAR_WIDTH_CHARS);
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        ".".repeat(PROGRESS_BAR_WIDTH_CHARS - filled)
    );
    let tail = match hold {
        Hold::Paused => "paused".to_owned(),
        Hold::TargetWaits => "target waits after a disk failed".to_owned(),
        Hold::DiskWait { wait_s, peer } => format!(
            "{} failed, next try within {wait_s}s",
            if peer { "peer's disk" } else { "disk" }
        ),
        Hold::Moving => format!(
            "{} ETA {}",
            rate(progress.rate_bytes_per_s),
            duration(progress.eta_s)
        ),
    };
    format!(
        "\r{} [{bar}] {percent:>6.2}% {}/{} {tail}\x1b[K",
        op.name(),
        bytes(progress.done_bytes),
        bytes(progress.total_bytes)
    )
}

/// The line shown while an operation runs but reports no progress yet.
pub fn waiting_line(op: WaitOp) -> String {
    format!("{} started; waiting for progress", op.name())
}

/// One plain progress line for logs and pipes (no control characters, no
/// newline): `resync 50.00% 512.0MiB of 1.00GiB at 100.0MiB/s, ETA 0:05`.
pub fn progress_line(op: WaitOp, progress: &Progress, hold: Hold) -> String {
    let head = format!(
        "{} {:.2}% {} of {}",
        op.name(),
        progress.percent(),
        bytes(progress.done_bytes),
        bytes(progress.total_bytes)
    );
    match hold {
        Hold::Paused => format!("{head}, paused (resume-sync continues it)"),
        Hold::TargetWaits => format!(
            "{head}, the target waits after a disk failed (`replctl resync` there asks now)"
        ),
        Hold::DiskWait { wait_s, peer } => format!(
            "{head}, {}; asking again within {wait_s}s (`replctl resync` now)",
            failed_disk(peer)
        ),
        Hold::Moving => format!(
            "{head} at {}, ETA {}",
            rate(progress.rate_bytes_per_s),
            duration(progress.eta_s)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{
        DiskState, PeerRole, ReplicationProtocol, ReplicationState, Role,
    };

    fn syncing() -> StatusReport {
        StatusReport {
            resource: "vm1".into(),
            node: "alpha".into(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            connection: ConnectionState::Connected,
            replication: ReplicationState::SyncSource,
            peer_role: PeerRole::Secondary,
            peer_disk: DiskState::Inconsistent,
            size_bytes: 1 << 30,
            out_of_sync_bytes: 512 << 20,
            resync: Some(half_done()),
            peer_node: "bravo".into(),
            protocol: ReplicationProtocol::C,
            verify: None,
            split_brain: false,
            last_refusal: None,
            connection_error: None,
            disk_error: None,
            nbd: Some("127.0.0.1:10809".into()),
            nbd_clients: 1,
            resync_transferred_bytes: 512 << 20,
            resync_disk_wait_s: None,
            resync_disk_wait_peer: false,
            peer_resync_disk_wait: false,
        }
    }

    /// A wait for this node's disk.
    fn local(wait_s: u64) -> Hold {
        Hold::DiskWait {
            wait_s,
            peer: false,
        }
    }

    fn half_done() -> Progress {
        Progress {
            done_bytes: 512 << 20,
            total_bytes: 1 << 30,
            rate_bytes_per_s: 100 << 20,
            eta_s: Some(5),
        }
    }

    #[test]
    fn status_text_of_a_syncing_primary_is_pinned_golden() {
        // Proves the human status of a connected primary during a resync.
        assert_eq!(
            status_text(&syncing()),
            "vm1 role:Primary\n\
             \x20 disk:UpToDate size:1.00GiB\n\
             \x20 nbd:127.0.0.1:10809 clients:1\n\
             \x20 bravo role:Secondary connection:Connected protocol:C\n\
             \x20   replication:SyncSource peer-disk:Inconsistent out-of-sync:512.0MiB\n\
             \x20   resync:50.00% 512.0MiB/1.00GiB rate:100.0MiB/s eta:0:05\n"
        );
    }

    #[test]
    fn status_text_of_a_refused_split_brain_secondary_is_pinned_golden() {
        // Proves the disconnected layout: no peer role, the split-brain line,
        // the refusal and link-error sentences, no nbd line.
        let mut s = syncing();
        s.role = Role::Secondary;
        s.connection = ConnectionState::StandAlone;
        s.replication = ReplicationState::Off;
        s.peer_role = PeerRole::Unknown;
        s.peer_disk = DiskState::DUnknown;
        s.resync = None;
        s.nbd = None;
        s.nbd_clients = 0;
        s.split_brain = true;
        s.out_of_sync_bytes = 12288;
        s.last_refusal = Some("Both nodes wrote since they last agreed (split brain).".into());
        s.connection_error = Some("The peer closed the connection.".into());
        assert_eq!(
            status_text(&s),
            "vm1 role:Secondary\n\
             \x20 disk:UpToDate size:1.00GiB\n\
             \x20 split-brain:detected (nothing was overwritten; the link stays down until resolved)\n\
             \x20 bravo connection:StandAlone\n\
             \x20   out-of-sync:12.0KiB\n\
             \x20   refused: Both nodes wrote since they last agreed (split brain).\n\
             \x20   link-error: The peer closed the connection.\n"
        );
    }

    #[test]
    fn status_text_names_the_last_disk_error_under_the_disk() {
        // Proves an Inconsistent Secondary says why: the failed disk
        // operation, right under its disk state.
        let mut s = syncing();
        s.role = Role::Secondary;
        s.disk = DiskState::Inconsistent;
        s.nbd = None;
        s.disk_error = Some(
            "flush of 67108864 bytes at offset 0 failed: Input/output error (os error 5)".into(),
        );
        let text = status_text(&s);
        assert!(
            text.starts_with(
                "vm1 role:Secondary\n\
                 \x20 disk:Inconsistent size:1.00GiB\n\
                 \x20 disk-error: flush of 67108864 bytes at offset 0 failed: \
                 Input/output error (os error 5)\n"
            ),
            "{text}"
        );
        s.disk_error = None;
        assert!(!status_text(&s).contains("disk-error"));
    }

    #[test]
    fn status_text_says_a_resync_waits_after_a_disk_failure() {
        // Proves a SyncTarget backing off from its failing disk says so on
        // its resync line, and how the operator retries at once.
        let mut s = syncing();
        s.role = Role::Secondary;
        s.replication = ReplicationState::SyncTarget;
        s.resync_disk_wait_s = Some(8);
        let text = status_text(&s);
        assert!(
            text.contains(
                "    resync:50.00% 512.0MiB/1.00GiB rate:100.0MiB/s eta:0:05 \
                 (the disk failed; asking again within 8s, `replctl resync` now)\n"
            ),
            "{text}"
        );
        s.resync_disk_wait_peer = true;
        assert!(
            status_text(&s).contains("(the peer's disk failed; asking again within 8s,"),
            "the SyncSource's read failed"
        );
        s.resync_disk_wait_s = None;
        s.resync_disk_wait_peer = false;
        assert!(!status_text(&s).contains("disk failed"));
        // The source of a waiting target says so, and where to retry.
        s.replication = ReplicationState::SyncSource;
        s.peer_resync_disk_wait = true;
        assert!(
            status_text(&s).contains(
                "eta:0:05 (bravo waits after a disk failed; `replctl resync` on bravo asks now)\n"
            ),
            "{}",
            status_text(&s)
        );
        s.peer_resync_disk_wait = false;
        // Absent from --json unless waiting (the pinned golden has none).
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("resync_disk_wait_s").is_none(), "{json}");
    }

    #[test]
    fn status_text_says_a_refusal_that_also_dropped_the_link_once() {
        // Proves an identical refusal and link error are not printed twice.
        let mut s = syncing();
        s.connection = ConnectionState::StandAlone;
        s.last_refusal = Some("The peer failed authentication.".into());
        s.connection_error = s.last_refusal.clone();
        let text = status_text(&s);
        assert!(
            text.ends_with("    refused: The peer failed authentication.\n"),
            "{text}"
        );
        assert!(!text.contains("link-error"), "{text}");
    }

    #[test]
    fn status_text_shows_the_link_error_only_while_the_link_is_down() {
        // Proves the reason of the last drop is shown while reconnecting
        // and not under a link that is up again.
        let mut s = syncing();
        s.connection = ConnectionState::Connecting;
        s.connection_error = Some("The peer closed the connection.".into());
        assert!(
            status_text(&s).ends_with("    link-error: The peer closed the connection.\n"),
            "{}",
            status_text(&s)
        );
        s.connection = ConnectionState::Connected;
        assert!(
            !status_text(&s).contains("link-error"),
            "{}",
            status_text(&s)
        );
    }

    #[test]
    fn status_text_marks_a_paused_resync_and_shows_verify() {
        // Proves paused resyncs say so and a running verify gets its line.
        let mut s = syncing();
        s.replication = ReplicationState::PausedSyncS;
        assert!(status_text(&s)
            .contains("resync:50.00% 512.0MiB/1.00GiB rate:100.0MiB/s eta:0:05 (paused)\n"));
        s.replication = ReplicationState::VerifyS;
        s.resync = None;
        s.verify = Some(Progress {
            done_bytes: 0,
            total_bytes: 4096,
            rate_bytes_per_s: 0,
            eta_s: None,
        });
        assert!(status_text(&s).contains("    verify:0.00% 0B/4.0KiB rate:0B/s eta:--:--\n"));
    }

    #[test]
    fn status_text_of_a_one_node_resource_says_there_is_no_peer() {
        // Proves a resource without a peer does not print an empty peer name.
        let mut s = syncing();
        s.peer_node = String::new();
        s.connection = ConnectionState::StandAlone;
        s.replication = ReplicationState::Off;
        s.resync = None;
        let text = status_text(&s);
        assert!(text.contains("\n  (no peer configured)\n"), "{text}");
        assert!(!text.contains("\n   connection"), "{text}");
    }

    #[test]
    fn bytes_and_durations_use_binary_units_and_clock_format() {
        // Proves unit boundaries and duration formatting.
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1024), "1.0KiB");
        assert_eq!(bytes(1536 << 10), "1.5MiB");
        assert_eq!(bytes(1 << 30), "1.00GiB");
        assert_eq!(bytes(u64::MAX), "16.00EiB");
        assert_eq!(duration(Some(0)), "0:00");
        assert_eq!(duration(Some(65)), "1:05");
        assert_eq!(duration(Some(3 * 3600 + 7)), "3:00:07");
        assert_eq!(duration(None), "--:--");
    }

    #[test]
    fn progress_bar_for_a_terminal_redraws_in_place() {
        // Proves the tty bar: carriage return first, half-filled bar,
        // percentage, amounts, rate, ETA, clear-to-end, no newline.
        assert_eq!(
            progress_bar(WaitOp::Resync, &half_done(), Hold::Moving),
            "\rresync [############............]  50.00% 512.0MiB/1.00GiB 100.0MiB/s ETA 0:05\x1b[K"
        );
        let paused = progress_bar(WaitOp::Verify, &half_done(), Hold::Paused);
        assert!(paused.starts_with("\rverify [############"));
        assert!(paused.ends_with("512.0MiB/1.00GiB paused\x1b[K"));
        assert!(!paused.contains('\n'));
    }

    #[test]
    fn progress_bar_is_full_and_never_overflows_at_or_past_completion() {
        // Proves the bar is bounded even if done exceeds total.
        let over = Progress {
            done_bytes: 2 << 30,
            total_bytes: 1 << 30,
            rate_bytes_per_s: 0,
            eta_s: Some(0),
        };
        let bar = progress_bar(WaitOp::Resync, &over, Hold::Moving);
        assert!(bar.contains(&format!("[{}]", "#".repeat(PROGRESS_BAR_WIDTH_CHARS))));
        assert!(bar.contains("100.00%"));
    }

    #[test]
    fn progress_line_for_pipes_has_no_control_characters() {
        // Proves the non-tty line: plain text with rate and ETA, or paused.
        assert_eq!(
            progress_line(WaitOp::Resync, &half_done(), Hold::Moving),
            "resync 50.00% 512.0MiB of 1.00GiB at 100.0MiB/s, ETA 0:05"
        );
        assert_eq!(
            progress_line(WaitOp::Resync, &half_done(), Hold::Paused),
            "resync 50.00% 512.0MiB of 1.00GiB, paused (resume-sync continues it)"
        );
        assert_eq!(
            progress_line(WaitOp::Resync, &half_done(), local(4)),
            "resync 50.00% 512.0MiB of 1.00GiB, the disk failed; asking again within 4s \
             (`replctl resync` now)"
        );
        assert!(progress_bar(WaitOp::Resync, &half_done(), local(4))
            .ends_with("512.0MiB/1.00GiB disk failed, next try within 4s\x1b[K"));
        let peer = Hold::DiskWait {
            wait_s: 2,
            peer: true,
        };
        assert_eq!(
            progress_line(WaitOp::Resync, &half_done(), peer),
            "resync 50.00% 512.0MiB of 1.00GiB, the peer's disk failed; asking again within 2s \
             (`replctl resync` now)"
        );
        assert!(progress_bar(WaitOp::Resync, &half_done(), peer)
            .ends_with("512.0MiB/1.00GiB peer's disk failed, next try within 2s\x1b[K"));
        assert_eq!(
            progress_line(WaitOp::Resync, &half_done(), Hold::TargetWaits),
            "resync 50.00% 512.0MiB of 1.00GiB, the target waits after a disk failed \
             (`replctl resync` there asks now)"
        );
        assert!(
            progress_bar(WaitOp::Resync, &half_done(), Hold::TargetWaits)
                .ends_with("512.0MiB/1.00GiB target waits after a disk failed\x1b[K")
        );
        assert!(!progress_line(WaitOp::Verify, &half_done(), Hold::Moving)
            .chars()
            .any(char::is_control));
    }
}
