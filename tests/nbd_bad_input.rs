//! Bad input from NBD clients (reference/nbd-protocol.md §1.8), driven by
//! libnbd in Python with strict mode off, and by a raw-socket client for what
//! libnbd refuses to send. Each test runs one case of
//! tests/scripts/nbd_cases.py against a fresh export; one test runs them all
//! in turn against the primary of a replicated pair.
#![forbid(unsafe_code)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::{Cluster, ClusterSpec};
use common::{Export, ExportSpec, PYTHON};

/// The pair gets this long to be in sync again after the cases.
const PAIR_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Cases that do not apply to a replicated export, and why.
const NOT_FOR_REPLICATED: [(&str, &str); 4] = [
    (
        "write_on_read_only_eperm",
        "needs a read-only export (replicated_read_only_export_refuses_writes_with_eperm)",
    ),
    (
        "sparse_read_sends_holes_as_offset_hole",
        "the replicated export sends reads as data: the replicas may allocate differently",
    ),
    (
        "cache_is_advertised_and_changes_nothing",
        "the replicated export does not advertise CACHE",
    ),
    (
        "fast_zero_is_fast_or_enotsup",
        "the replicated export does not advertise FAST_ZERO: zeroing is mirrored like a write",
    ),
];

/// Runs nbd_cases.py with `args` (a case and a URI, or `--list`); panics
/// with its output if it fails.
fn nbd_cases(args: &[&str]) -> std::process::Output {
    common::require_python_nbd();
    let script = common::tests_path("scripts/nbd_cases.py");
    common::run_ok(Command::new(PYTHON).arg(script).args(args))
}

/// Runs one case of nbd_cases.py against `export`; panics with its output
/// (and the server's log, via the export's drop) if the case fails.
/// Afterwards the server must still run and must not have logged a panic.
fn run_case(export: &mut Export, case: &str) {
    nbd_cases(&[case, &export.uri()]);
    export.assert_running();
    export.assert_no_panic_logged();
}

fn case_on_fresh_export(case: &str) {
    case_on_export(ExportSpec::default(), case);
}

/// Runs one nbd_cases.py case against a fresh export started from `spec`.
fn case_on_export(spec: ExportSpec, case: &str) {
    let mut export = Export::start(spec);
    run_case(&mut export, case);
}

#[test]
fn write_past_end_fails_with_enospc() {
    // Proves WRITE beyond (and straddling) the end gets ENOSPC and the connection lives on.
    case_on_fresh_export("write_past_end_enospc");
}

#[test]
fn write_zeroes_past_end_fails_with_enospc() {
    // Proves WRITE_ZEROES beyond the end gets ENOSPC.
    case_on_fresh_export("write_zeroes_past_end_enospc");
}

#[test]
fn read_past_end_fails_with_einval() {
    // Proves READ beyond (and straddling) the end gets EINVAL.
    case_on_fresh_export("read_past_end_einval");
}

#[test]
fn trim_past_end_fails_with_einval() {
    // Proves TRIM beyond the end gets EINVAL.
    case_on_fresh_export("trim_past_end_einval");
}

#[test]
fn block_status_past_end_fails_with_einval() {
    // Proves BLOCK_STATUS beyond the end gets EINVAL.
    case_on_fresh_export("block_status_past_end_einval");
}

#[test]
fn unknown_command_flag_fails_with_einval() {
    // Proves an undefined command flag, or NO_HOLE on WRITE, gets EINVAL.
    case_on_fresh_export("unknown_command_flag_einval");
}

#[test]
fn block_status_without_meta_context_fails_with_einval() {
    // Proves BLOCK_STATUS with no selected meta context gets EINVAL.
    case_on_fresh_export("block_status_without_meta_context_einval");
}

#[test]
fn zero_length_requests_are_answered_without_disconnect() {
    // Proves zero-length READ/WRITE/TRIM/WRITE_ZEROES/BLOCK_STATUS keep the connection usable.
    case_on_fresh_export("zero_length_requests_answered_without_disconnect");
}

#[test]
fn writes_on_read_only_export_fail_with_eperm() {
    // Proves WRITE, TRIM and WRITE_ZEROES on a read_only = true export get EPERM.
    case_on_export(
        ExportSpec {
            read_only: true,
            ..ExportSpec::default()
        },
        "write_on_read_only_eperm",
    );
}

#[test]
fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    // Proves an unknown option is answered ERR_UNSUP, its data consumed, and GO + READ still work.
    case_on_fresh_export("unknown_option_err_unsup_then_negotiation_continues");
}

#[test]
fn starttls_is_refused_and_plaintext_continues() {
    // Proves STARTTLS gets ERR_UNSUP/ERR_POLICY and a TLS-allowing client falls back to plaintext.
    case_on_fresh_export("starttls_refused_and_negotiation_continues");
}

#[test]
fn list_option_shows_the_export() {
    // Proves NBD_OPT_LIST names the resource's export.
    case_on_fresh_export("list_shows_the_export");
}

#[test]
fn info_of_unknown_export_errors_and_known_export_still_negotiates() {
    // Proves INFO of an unknown name fails, then INFO + GO of the real export succeed and agree.
    case_on_fresh_export("info_of_unknown_export_errors_then_known_export_works");
}

#[test]
fn oversized_write_errors_and_connection_keeps_working() {
    // Proves a 33 MiB WRITE (max payload is 32 MiB) is refused, not applied, and the stream stays in sync.
    case_on_fresh_export("oversized_write_errors_and_connection_survives");
}

#[test]
fn simple_replies_without_structured_replies_work() {
    // Proves a client that does not ask for structured replies can read, write and get errors.
    case_on_fresh_export("structured_replies_off_still_works");
}

#[test]
fn sparse_reads_send_holes_as_offset_hole_chunks_unless_df() {
    // Proves a structured READ over never-written and trimmed ranges gets
    // OFFSET_HOLE chunks there and OFFSET_DATA for written data, tiling the
    // request with the right bytes; with DF it is one OFFSET_DATA chunk.
    case_on_fresh_export("sparse_read_sends_holes_as_offset_hole");
}

#[test]
fn sparse_reads_over_o_direct_send_holes_too() {
    // Proves the same over an O_DIRECT backing file (aligned reads of the
    // data pieces, holes found through the same file).
    case_on_export(
        ExportSpec {
            direct: true,
            ..ExportSpec::default()
        },
        "sparse_read_sends_holes_as_offset_hole",
    );
}

#[test]
fn cache_is_advertised_and_changes_nothing() {
    // Proves SEND_CACHE is advertised, CACHE succeeds without changing
    // what reads return, and a CACHE past the end gets EINVAL.
    case_on_fresh_export("cache_is_advertised_and_changes_nothing");
}

#[test]
fn fast_zero_either_zeroes_or_fails_with_enotsup() {
    // Proves WRITE_ZEROES with FAST_ZERO either zeroes the range or fails with ENOTSUP leaving it intact.
    case_on_fresh_export("fast_zero_is_fast_or_enotsup");
}

#[test]
fn multi_conn_flush_on_one_connection_makes_write_visible_on_all() {
    // Proves CAN_MULTI_CONN holds: write on conn 1, flush on conn 2, read on conn 0 sees it.
    case_on_fresh_export("multi_conn_flush_on_one_connection_visible_on_all");
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    // Proves a request with a bad magic drops that connection while new clients are served.
    case_on_fresh_export("bad_request_magic_closes_connection");
}

#[test]
fn unknown_client_handshake_flags_close_the_connection() {
    // Proves unknown client flags in the handshake make the server close the connection.
    case_on_fresh_export("unknown_client_flags_close_connection");
}

#[test]
fn truncated_write_payload_then_close_applies_nothing() {
    // Proves a WRITE whose payload is cut short by a close changes no byte, and other clients are unaffected.
    case_on_fresh_export("truncated_write_payload_then_close_applies_nothing");
}

#[test]
fn bad_input_cases_over_unix_socket_behave_the_same() {
    // Proves the export over a Unix socket handles the raw-socket negotiation cases too.
    let mut export = Export::start(ExportSpec {
        listen: common::Listen::Unix,
        ..ExportSpec::default()
    });
    run_case(
        &mut export,
        "unknown_option_err_unsup_then_negotiation_continues",
    );
    run_case(&mut export, "list_shows_the_export");
}

#[test]
fn export_name_option_serves_with_and_without_zero_padding() {
    // Proves the old EXPORT_NAME option gets size + flags (+124 zero bytes unless NO_ZEROES) and serves simple-reply reads; DISC closes.
    case_on_fresh_export("export_name_option_serves_with_and_without_zeroes");
}

#[test]
fn export_name_of_unknown_export_closes_only_that_connection() {
    // Proves EXPORT_NAME with an unknown name closes that connection (it cannot carry an error) and others are served.
    case_on_fresh_export("export_name_of_unknown_export_closes");
}

#[test]
fn abort_option_is_acknowledged_and_closed() {
    // Proves NBD_OPT_ABORT gets an ACK (or a plain close) and the server then closes.
    case_on_fresh_export("abort_option_is_acknowledged");
}

#[test]
fn disc_after_pipelined_writes_answers_and_applies_them_all() {
    // Proves NBD_CMD_DISC sent behind 8 unanswered writes lets all of them land before the close (replies, if sent, are successes).
    case_on_fresh_export("disc_after_pipelined_writes_applies_them");
}

#[test]
fn replicated_export_answers_bad_input_like_the_one_node_export() {
    // Proves invariant 7 on the export users run: every case of
    // nbd_cases.py that applies to a replicated export (out-of-range
    // requests, unknown flags and options, oversized and truncated writes,
    // bad magic, abrupt disconnects, multi-conn flush), run in turn against
    // the primary of a connected pair, gets the spec's answer; afterwards
    // both daemons run, neither logged a panic, the pair is still connected
    // and in sync, and the two replicas are byte-identical.
    let listed = nbd_cases(&["--list"]);
    let cases: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    for (name, _) in NOT_FOR_REPLICATED {
        assert!(
            cases.iter().any(|c| c == name),
            "{name} is excluded for the replicated export but is not a case: {cases:?}"
        );
    }
    let mut c = Cluster::up(ClusterSpec::default());
    let uri = c.alpha().uri();
    let mut ran = 0;
    for case in &cases {
        if let Some((_, why)) = NOT_FOR_REPLICATED.iter().find(|(name, _)| name == case) {
            eprintln!("not run on the replicated export: {case} ({why})");
            continue;
        }
        nbd_cases(&[case, &uri]);
        ran += 1;
        for node in c.nodes.iter_mut() {
            assert!(
                node.is_running(),
                "{} exited during case {case}\n{}",
                node.name,
                node.log()
            );
        }
    }
    assert!(ran >= 20, "only {ran} cases ran: {cases:?}");
    for node in &c.nodes {
        node.assert_no_panic_logged();
    }
    c.wait_in_sync(PAIR_SYNC_TIMEOUT);
    c.assert_replicas_identical();
}

#[test]
fn replicated_read_only_export_refuses_writes_with_eperm() {
    // Proves a pair with read_only = true advertises its export read-only
    // on the primary and answers WRITE, TRIM and WRITE_ZEROES with EPERM,
    // changing nothing on either replica.
    let c = Cluster::up(ClusterSpec {
        read_only: true,
        ..ClusterSpec::default()
    });
    nbd_cases(&["write_on_read_only_eperm", &c.alpha().uri()]);
    for node in &c.nodes {
        node.assert_no_panic_logged();
        assert_eq!(node.status()["out_of_sync_bytes"], 0, "{}", node.name);
    }
    let zeroes = vec![0u8; 1 << 20];
    for node in &c.nodes {
        assert_eq!(
            node.read_data(0, 1 << 20),
            zeroes,
            "{}'s first MiB changed under a read-only export",
            node.name
        );
    }
    c.assert_replicas_identical();
}
