//! What `nbdinfo` (libnbd) sees of the export: size, every transmission
//! flag, block sizes, LIST, JSON output, and the allocation map after TRIM
//! and WRITE_ZEROES; and a read_only = true export.
#![forbid(unsafe_code)]

mod common;

use std::process::Command;

use common::{require_tool, stdout_of, Export, ExportSpec, Listen, EXPORT_NAME};

/// The NBD spec's default (and our advertised) maximum payload.
const MAX_PAYLOAD_BYTES: u64 = 32 << 20;

fn nbdinfo() -> Command {
    require_tool("nbdinfo", "libnbd-bin");
    Command::new("nbdinfo")
}

/// Runs `nbdinfo --can/--is WHAT URI`: exit 0 = true, 2 = false.
fn nbdinfo_bool(export: &Export, option: &str, what: &str) -> bool {
    let out = common::run_within(
        nbdinfo().arg(option).arg(what).arg(export.uri()),
        common::TOOL_TIMEOUT,
    );
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "nbdinfo {option} {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn json_of(export: &Export) -> serde_json::Value {
    let text = stdout_of(nbdinfo().arg("--json").arg(export.uri()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{text}"))
}

/// The `--map` output as (offset, length, type) rows.
fn map_of(export: &Export) -> Vec<(u64, u64, String)> {
    let text = stdout_of(nbdinfo().arg("--map").arg(export.uri()));
    text.lines()
        .map(|line| {
            let mut cols = line.split_whitespace();
            let offset = cols.next().and_then(|c| c.parse().ok());
            let length = cols.next().and_then(|c| c.parse().ok());
            let _type_code = cols.next();
            let kind: Vec<&str> = cols.collect();
            match (offset, length) {
                (Some(o), Some(l)) => (o, l, kind.join(" ")),
                _ => panic!("unparsable nbdinfo --map line {line:?}\n{text}"),
            }
        })
        .collect()
}

/// True when every extent overlapping `[start, end)` has a type description
/// (nbdinfo's last column, e.g. "hole,zero" or "data") containing `word`.
fn range_all(map: &[(u64, u64, String)], start: u64, end: u64, word: &str) -> bool {
    map.iter()
        .filter(|(o, l, _)| *o < end && o + l > start)
        .all(|(_, _, kind)| kind.contains(word))
}

fn qemu_io(export: &Export, commands: &[&str]) {
    require_tool("qemu-io", "qemu-utils");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "none"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(export.uri());
    let out = stdout_of(&mut cmd);
    assert!(
        !out.contains("failed"),
        "qemu-io {commands:?} reported a failure:\n{out}"
    );
}

#[test]
fn nbdinfo_reports_size_and_every_flag() {
    // Proves the export offers its configured size and advertises exactly the expected flags.
    let export = Export::start_default();
    let size = stdout_of(nbdinfo().arg("--size").arg(export.uri()));
    assert_eq!(size.trim(), export.spec.size_bytes.to_string());
    for (what, want) in [
        ("flush", true),
        ("fua", true),
        ("trim", true),
        ("zero", true),
        ("fast-zero", true),
        ("cache", true),
        ("multi-conn", true),
        ("df", true),
    ] {
        assert_eq!(nbdinfo_bool(&export, "--can", what), want, "--can {what}");
    }
    assert!(
        !nbdinfo_bool(&export, "--is", "read-only"),
        "--is read-only"
    );
    assert!(
        !nbdinfo_bool(&export, "--is", "rotational"),
        "--is rotational"
    );
}

#[test]
fn nbdinfo_json_reports_block_sizes_and_flags() {
    // Proves the JSON view parses and carries the block sizes (max 32 MiB), size, structured replies and base:allocation.
    let export = Export::start_default();
    let v = json_of(&export);
    assert_eq!(v["protocol"], "newstyle-fixed", "{v}");
    assert_eq!(v["structured"], true, "{v}");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], EXPORT_NAME);
    assert_eq!(e["export-size"], export.spec.size_bytes);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_multi_conn"], true);
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
        "base:allocation not offered: {e}"
    );
    let min = e["block_size_minimum"]
        .as_u64()
        .expect("block_size_minimum");
    let pref = e["block_size_preferred"]
        .as_u64()
        .expect("block_size_preferred");
    let max = e["block_size_maximum"]
        .as_u64()
        .expect("block_size_maximum");
    assert!(min.is_power_of_two() && min <= 64 << 10, "minimum {min}");
    assert!(
        pref.is_power_of_two() && pref >= min.max(512),
        "preferred {pref}"
    );
    assert_eq!(max, MAX_PAYLOAD_BYTES, "maximum payload");
}

#[test]
fn nbdinfo_list_shows_the_export_over_unix_socket() {
    // Proves LIST over a Unix socket names the export.
    let export = Export::start(ExportSpec {
        listen: Listen::Unix,
        ..ExportSpec::default()
    });
    let text = stdout_of(nbdinfo().arg("--list").arg(export.server_uri()));
    assert!(
        text.contains(&format!("export=\"{EXPORT_NAME}\"")),
        "nbdinfo --list did not show {EXPORT_NAME}:\n{text}"
    );
}

#[test]
fn nbdinfo_map_shows_holes_after_trim_and_write_zeroes() {
    // Proves block status reports data where written, and holes after TRIM and after WRITE_ZEROES.
    let export = Export::start_default();
    let mib = 1u64 << 20;
    qemu_io(&export, &["write -P 0xa5 0 8M"]);
    let map = map_of(&export);
    assert!(
        range_all(&map, 0, 8 * mib, "data"),
        "written range not reported as data: {map:?}"
    );
    assert!(
        range_all(&map, 16 * mib, 64 * mib, "hole"),
        "never-written range not a hole: {map:?}"
    );
    qemu_io(&export, &["discard 1M 2M"]);
    let map = map_of(&export);
    assert!(
        range_all(&map, mib, 3 * mib, "hole"),
        "TRIMmed range not a hole: {map:?}"
    );
    assert!(
        range_all(&map, 0, mib, "data"),
        "data before the TRIM lost: {map:?}"
    );
    // WRITE_ZEROES that may punch (qemu-io -u) leaves a hole.
    qemu_io(&export, &["write -z -u 4M 2M"]);
    let map = map_of(&export);
    assert!(
        range_all(&map, 4 * mib, 6 * mib, "hole"),
        "WRITE_ZEROES (may punch) range not a hole: {map:?}"
    );
    // WRITE_ZEROES with NO_HOLE (plain -z) must at least read as zero.
    qemu_io(&export, &["write -z 7M 512k"]);
    let map = map_of(&export);
    assert!(
        range_all(&map, 7 * mib, 7 * mib + 512 * 1024, "zero"),
        "WRITE_ZEROES (no hole) range not reported as zero: {map:?}"
    );
    assert!(
        range_all(&map, 6 * mib, 7 * mib, "data"),
        "data between the zeroed ranges lost: {map:?}"
    );
    qemu_io(
        &export,
        &[
            "read -P 0 1M 2M",
            "read -P 0xa5 3M 1M",
            "read -P 0 4M 2M",
            "read -P 0xa5 6M 1M",
            "read -P 0 7M 512k",
            "read -P 0xa5 7680k 512k",
        ],
    );
}

#[test]
fn read_only_export_reports_read_only_and_refuses_writes() {
    // Proves read_only = true is advertised and a write through qemu-io fails with EPERM.
    let export = Export::start(ExportSpec {
        read_only: true,
        ..ExportSpec::default()
    });
    assert!(nbdinfo_bool(&export, "--is", "read-only"), "--is read-only");
    common::require_python_nbd();
    let script = r#"
import errno, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 4096, 0)
except nbd.Error as e:
    sys.exit(0 if e.args[1] == errno.EPERM else "write failed with %s, want EPERM" % e)
sys.exit("write on a read-only export succeeded")
"#;
    common::run_ok(
        Command::new(common::PYTHON)
            .args(["-c", script])
            .arg(export.uri()),
    );
    // QEMU sees the read-only flag and refuses to open the export for writing.
    let out = common::run_within(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 1 0 4k"])
            .arg(export.uri()),
        common::TOOL_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Permission denied"),
        "qemu-io opened a read-only export for writing: {stderr}"
    );
}

#[test]
fn socket_activated_server_serves_the_export() {
    // Proves systemd socket activation: the server serves on the socket passed as fd 3 (LISTEN_FDS), not on its configured address.
    let export = Export::start(ExportSpec {
        listen: Listen::Activated,
        ..ExportSpec::default()
    });
    let size = stdout_of(nbdinfo().arg("--size").arg(export.uri()));
    assert_eq!(size.trim(), export.spec.size_bytes.to_string());
    let text = stdout_of(nbdinfo().arg("--list").arg(export.server_uri()));
    assert!(
        text.contains(&format!("export=\"{EXPORT_NAME}\"")),
        "{text}"
    );
}
