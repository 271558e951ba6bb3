//! Restarting the server: data written and flushed before a SIGTERM is
//! served again, unchanged, by the next run on the same disk and address.
#![forbid(unsafe_code)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require_tool, run_ok, stdout_of, Export};

const MIB: u64 = 1 << 20;
/// How long the background load gets to reach the disk.
const LOAD_VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long fio gets to exit once the server is gone.
const LOAD_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes a random image with nbdcopy, then a FUA write and a
/// WRITE_ZEROES, flushes, and returns the file holding what the export must
/// now contain.
fn write_and_flush_known_image(export: &Export) -> PathBuf {
    let size = export.spec.size_bytes;
    let expected = export.dir().join("expected.img");
    common::write_random_file(&expected, size, 0x7e57);
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&expected)
            .arg(export.uri()),
    );
    let io = stdout_of(
        Command::new("qemu-io")
            .args(["-f", "raw", "-t", "none"])
            .args(["-c", "write -f -P 0x77 60M 1M"])
            .args(["-c", "write -z 10M 1M"])
            .args(["-c", "flush"])
            .arg(export.uri()),
    );
    assert!(!io.contains("failed"), "qemu-io failed:\n{io}");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&expected)
        .expect("open expected image");
    f.seek(SeekFrom::Start(60 * MIB)).expect("seek");
    f.write_all(&vec![0x77; MIB as usize]).expect("write");
    f.seek(SeekFrom::Start(10 * MIB)).expect("seek");
    f.write_all(&vec![0; MIB as usize]).expect("write");
    expected
}

/// Reads the whole export out and compares it with `expected`.
fn assert_export_holds(export: &Export, expected: &Path) {
    let out = export.dir().join("out.img");
    let _ = std::fs::remove_file(&out);
    run_ok(Command::new("nbdcopy").arg(export.uri()).arg(&out));
    common::assert_same_file(expected, &out);
}

#[test]
fn flushed_data_survives_sigterm_and_restart() {
    // Proves SIGTERM stops the server cleanly (exit 0), the flushed data is in the backing file, and it reads back identical after a restart.
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let mut export = Export::start_default();
    let expected = write_and_flush_known_image(&export);

    let status = export.stop();
    assert!(
        status.success(),
        "server exited with {status} on SIGTERM\n{}",
        export.server_log()
    );
    // A one-node resource serves its whole backing file, byte for byte.
    common::assert_same_file(&expected, &export.disk_path());
    export.start_again();
    assert_export_holds(&export, &expected);
    export.assert_no_panic_logged();
}

#[test]
fn flushed_data_survives_sigkill_and_restart() {
    // Proves a crash (SIGKILL) after FLUSH loses nothing: the restarted server serves every flushed byte.
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("qemu-io", "qemu-utils");
    let mut export = Export::start_default();
    let expected = write_and_flush_known_image(&export);
    export.kill_hard();
    export.start_again();
    assert_export_holds(&export, &expected);
    export.assert_no_panic_logged();
}

#[test]
fn sigkill_under_write_load_keeps_flushed_data_and_restarts() {
    // Proves a crash while 4 connections are writing leaves earlier flushed data intact and the server restarts and serves.
    require_tool("fio", "fio");
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let mut export = Export::start_default();
    let io = stdout_of(
        Command::new("qemu-io")
            .args(["-f", "raw", "-t", "none"])
            .args(["-c", "write -P 0x5a 0 32M", "-c", "flush"])
            .arg(export.uri()),
    );
    assert!(!io.contains("failed"), "qemu-io failed:\n{io}");

    // Load: 4 jobs of random writes into [32 MiB, 64 MiB), long enough to
    // be cut by the kill.
    let fio_log = std::fs::File::create(export.dir().join("fio.log")).expect("fio log");
    let mut fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=4",
            "--offset=32m",
            "--size=8m",
            "--offset_increment=8m",
            "--time_based",
            "--runtime=60",
        ])
        .arg(format!("--uri={}", export.uri()))
        .stdout(fio_log.try_clone().expect("clone"))
        .stderr(fio_log)
        .spawn()
        .expect("spawn fio");

    // Wait (with a deadline) until the load has reached the disk.
    let deadline = Instant::now() + LOAD_VISIBLE_TIMEOUT;
    loop {
        let map = stdout_of(Command::new("nbdinfo").arg("--map").arg(export.uri()));
        let data_in_load_range = map.lines().any(|l| {
            let mut cols = l.split_whitespace();
            let off: u64 = cols.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            off >= 32 * MIB && l.contains("data")
        });
        if data_in_load_range {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fio's writes never showed up in the map:\n{map}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    export.kill_hard();
    let fio_status = common::wait_with_deadline(&mut fio, LOAD_STOP_TIMEOUT);
    if fio_status.is_none() {
        let _ = fio.kill();
        let _ = fio.wait();
        panic!("fio did not notice the server's death within {LOAD_STOP_TIMEOUT:?}");
    }

    export.start_again();
    let io = stdout_of(
        Command::new("qemu-io")
            .args(["-f", "raw", "-t", "none"])
            .args(["-c", "read -P 0x5a 0 32M"])
            .arg(export.uri()),
    );
    assert!(
        !io.contains("failed"),
        "flushed data damaged by a crash under load:\n{io}"
    );
    export.assert_no_panic_logged();
}
