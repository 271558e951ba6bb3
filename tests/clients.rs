//! Real NBD clients against the export: qemu-img (convert in and out,
//! compare, map), qemu-io (every command QEMU's block layer sends), nbdcopy
//! over 4 connections, and fio's nbd engine with crc32c verification over
//! 4 concurrent connections.
#![forbid(unsafe_code)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{require_tool, run_ok, run_ok_within, stdout_of, Export};

const MIB: u64 = 1 << 20;
/// fio gets this long at most (its own runtime limit is set below it).
const FIO_TIMEOUT: Duration = Duration::from_secs(180);

/// A sparse raw image of `size` bytes with seeded random data in
/// `[0, 16 MiB)` and `[48 MiB, 56 MiB)` and a hole in between.
fn make_source_image(path: &Path, size: u64, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let chunk = path.with_extension("chunk");
    let mut f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    for (i, (off, len)) in [(0, 16 * MIB), (48 * MIB, 8 * MIB)].into_iter().enumerate() {
        common::write_random_file(&chunk, len, seed + i as u64);
        let data = std::fs::read(&chunk).expect("read chunk");
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&data).expect("write chunk");
    }
    std::fs::remove_file(chunk).expect("remove chunk");
}

fn qemu_img() -> Command {
    require_tool("qemu-img", "qemu-utils");
    Command::new("qemu-img")
}

/// Runs qemu-io commands on the export; panics if any of them failed.
fn qemu_io(export: &Export, commands: &[&str]) -> String {
    require_tool("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "none"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(export.uri());
    let out = stdout_of(&mut cmd);
    assert!(
        !out.to_lowercase().contains("fail"),
        "qemu-io {commands:?} reported a failure:\n{out}"
    );
    out
}

#[test]
fn qemu_img_convert_in_and_out_round_trips_and_compares_equal() {
    // Proves a random-data image written by qemu-img convert reads back identical (compare, convert out + cmp) and map shows data vs zeroes.
    let export = Export::start_default();
    let size = export.spec.size_bytes;
    let src = export.dir().join("src.img");
    make_source_image(&src, size, 0x5eed);
    run_ok(
        qemu_img()
            .args(["convert", "-n", "-f", "raw", "-O", "raw", "-t", "none"])
            .arg(&src)
            .arg(export.uri()),
    );
    run_ok(
        qemu_img()
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(export.uri()),
    );
    let out = export.dir().join("out.img");
    run_ok(
        qemu_img()
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(export.uri())
            .arg(&out),
    );
    common::assert_same_file(&src, &out);
    run_ok(
        qemu_img()
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(export.uri())
            .arg(&out),
    );

    // The map: data where the image has data, zeroes in the hole.
    let text = stdout_of(
        qemu_img()
            .args(["map", "--output=json", "-f", "raw"])
            .arg(export.uri()),
    );
    let map: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("qemu-img map json: {e}\n{text}"));
    let entries = map.as_array().expect("map is an array");
    let covering = |start: u64, end: u64| {
        entries.iter().filter(move |e| {
            let s = e["start"].as_u64().expect("start");
            let l = e["length"].as_u64().expect("length");
            s < end && s + l > start
        })
    };
    assert!(
        covering(0, 16 * MIB).all(|e| e["data"] == true && e["zero"] == false),
        "random data not mapped as data: {text}"
    );
    assert!(
        covering(48 * MIB, 56 * MIB).all(|e| e["data"] == true),
        "second data range not mapped as data: {text}"
    );
    assert!(
        covering(16 * MIB, 48 * MIB).all(|e| e["zero"] == true),
        "hole not mapped as zero: {text}"
    );
    let total: u64 = entries
        .iter()
        .map(|e| e["length"].as_u64().expect("length"))
        .sum();
    assert_eq!(total, size, "map does not cover the export: {text}");
}

#[test]
fn qemu_io_write_fua_zero_discard_flush_read_back_verified() {
    // Proves WRITE, FUA WRITE, WRITE_ZEROES (with and without may-punch), TRIM and FLUSH each do what they say, checked by read -P.
    let export = Export::start_default();
    qemu_io(
        &export,
        &[
            "write -P 0x11 0 1M",
            "write -f -P 0x22 1M 1M",
            "write -P 0x33 2M 2M",
            "write -z 2M 1M",
            "write -z -u 3M 512k",
            "write -P 0x44 5M 1M",
            "discard 5M 1M",
            "write -P 0x55 7M 64k",
            "flush",
        ],
    );
    let out = qemu_io(
        &export,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 1M",
            "read -P 0 2M 1M",
            "read -P 0 3M 512k",
            "read -P 0x33 3584k 512k",
            "read -P 0x55 7M 64k",
            "read -P 0 8M 1M",
        ],
    );
    assert_eq!(
        out.matches("read ").count(),
        7,
        "not every read ran:\n{out}"
    );
    // Unaligned, sub-sector I/O goes through read-modify-write in QEMU.
    qemu_io(&export, &["write -P 0x66 10000 3000", "flush"]);
    qemu_io(
        &export,
        &["read -P 0x66 10000 3000", "read -P 0x11 13000 1000"],
    );
}

#[test]
fn nbdcopy_with_four_connections_copies_in_and_out_identically() {
    // Proves nbdcopy over 4 multi-conn connections writes an image in and reads it out byte-identical.
    require_tool("nbdcopy", "libnbd-bin");
    let export = Export::start_default();
    let src = export.dir().join("src.img");
    make_source_image(&src, export.spec.size_bytes, 0xc0b1);
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--flush"])
            .arg(&src)
            .arg(export.uri()),
    );
    let out = export.dir().join("out.img");
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(export.uri())
            .arg(&out),
    );
    common::assert_same_file(&src, &out);
}

#[test]
fn fio_four_jobs_randwrite_with_crc32c_verify_passes() {
    // Proves 4 concurrent connections doing random 4 KiB writes at depth 8 read back what they wrote (crc32c verify).
    require_tool("fio", "fio");
    let export = Export::start_default();
    let out = export.dir().join("fio.json");
    run_ok_within(
        Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                "--numjobs=4",
                "--size=8m",
                "--offset_increment=16m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--runtime=120",
                "--output-format=json",
            ])
            .arg(format!("--uri={}", export.uri()))
            .arg(format!("--output={}", out.display())),
        FIO_TIMEOUT,
    );
    let text = std::fs::read_to_string(&out).expect("read fio output");
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("fio json: {e}\n{text}"));
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4, "{text}");
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job failed: {job}");
        let written = job["write"]["io_bytes"].as_u64().expect("write io_bytes");
        assert_eq!(written, 8 * MIB, "job did not write its range: {job}");
        let verified = job["read"]["io_bytes"].as_u64().expect("read io_bytes");
        assert_eq!(verified, 8 * MIB, "job did not verify its range: {job}");
    }
}
