//! Restarting the server: data written and flushed before a SIGTERM is
//! served again, unchanged, by the next run on the same disk and address.
#![forbid(unsafe_code)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{require_tool, run_ok, stdout_of, Export};

const MIB: u64 = 1 << 20;

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
