//! Option negotiation, driven through the pure state machine: every option
//! the server knows, the errors the spec asks for, and when it closes.

use bytes::{BufMut, Bytes, BytesMut};
use nbd_frontend::handshake::*;
use nbd_frontend::mem::MemTarget;
use nbd_frontend::negotiate::*;
use nbd_frontend::proto::*;
use nbd_frontend::BlockTarget;

fn export() -> ExportInfo {
    ExportInfo {
        name: "vm1".into(),
        description: "test volume".into(),
        size_bytes: 1 << 20,
        flags: MemTarget::new(0).flags(),
    }
}

fn fixed() -> Negotiation {
    let mut n = Negotiation::new(export());
    n.client_flags(ClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
        .unwrap();
    n
}

fn opt(option: u32, data: impl Into<Bytes>) -> ClientOption {
    ClientOption {
        option,
        data: data.into(),
    }
}

/// Runs one option and decodes every option reply it produced.
fn run(n: &mut Negotiation, o: ClientOption) -> (Step, Vec<OptionReply>) {
    let code = o.option;
    let mut out = BytesMut::new();
    let step = n.handle_option(o, &mut out);
    let mut replies = Vec::new();
    while let Some(r) = OptionReply::decode(&mut out).unwrap() {
        assert_eq!(r.option, code);
        replies.push(r);
    }
    assert!(out.is_empty(), "trailing bytes after option replies");
    (step, replies)
}

fn types(replies: &[OptionReply]) -> Vec<u32> {
    replies.iter().map(|r| r.reply_type).collect()
}

fn info_data(name: &str, infos: &[u16]) -> Bytes {
    InfoRequest {
        export_name: name.into(),
        info_types: infos.to_vec(),
    }
    .encode()
}

fn meta_data(name: &str, queries: &[&str]) -> Bytes {
    MetaContextRequest {
        export_name: name.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
    .encode()
}

#[test]
fn unknown_client_flag_is_refused() {
    // Proves a client flag the server does not know is an error (the server closes).
    let mut n = Negotiation::new(export());
    assert!(n.client_flags(ClientFlags(1 << 5)).is_err());
}

#[test]
fn go_with_name_and_description_returns_infos_then_ack_and_starts_transmission() {
    // Proves GO answers EXPORT, NAME, DESCRIPTION, BLOCK_SIZE then ACK and enters transmission.
    let mut n = fixed();
    let (step, replies) = run(
        &mut n,
        opt(OPT_GO, info_data("vm1", &[INFO_NAME, INFO_DESCRIPTION, 77])),
    );
    assert_eq!(
        types(&replies),
        [REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]
    );
    let infos: Vec<Info> = replies[..4]
        .iter()
        .map(|r| Info::parse(&r.data).unwrap())
        .collect();
    let tflags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    assert_eq!(
        infos,
        vec![
            Info::Export {
                size_bytes: 1 << 20,
                transmission_flags: tflags
            },
            Info::Name("vm1".into()),
            Info::Description("test volume".into()),
            Info::BlockSize {
                min_bytes: 1,
                preferred_bytes: 4096,
                max_payload_bytes: 32 << 20
            },
        ]
    );
    match step {
        Step::Transmission(p) => {
            assert!(!p.structured_replies);
            assert_eq!(
                p.transmission_flags, tflags,
                "no SEND_DF without structured replies"
            );
            assert_eq!(p.base_allocation_id, None);
        }
        other => panic!("expected transmission, got {other:?}"),
    }
}

#[test]
fn info_then_go_give_identical_info_and_default_export_maps_to_ours() {
    // Proves INFO continues negotiation, matches a following GO, and "" is our export.
    let mut n = fixed();
    let (step, info) = run(&mut n, opt(OPT_INFO, info_data("", &[])));
    assert_eq!(step, Step::Continue);
    let (step, go) = run(&mut n, opt(OPT_GO, info_data("", &[])));
    assert!(matches!(step, Step::Transmission(_)));
    let strip = |r: &[OptionReply]| {
        r.iter()
            .map(|x| (x.reply_type, x.data.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&info), strip(&go));
}

#[test]
fn go_for_unknown_export_is_err_unknown_and_negotiation_continues() {
    // Proves an unknown export name on GO/INFO gets ERR_UNKNOWN with a message.
    let mut n = fixed();
    for code in [OPT_GO, OPT_INFO] {
        let (step, r) = run(&mut n, opt(code, info_data("nope", &[])));
        assert_eq!(step, Step::Continue);
        assert_eq!(types(&r), [REP_ERR_UNKNOWN]);
        assert!(!r[0].data.is_empty(), "error carries a message");
    }
}

#[test]
fn go_with_malformed_data_is_err_invalid() {
    // Proves truncated or over-long GO data gets ERR_INVALID, not a close.
    let mut n = fixed();
    let mut bad = BytesMut::new();
    bad.put_u32(100);
    bad.put_slice(b"short");
    let (step, r) = run(&mut n, opt(OPT_GO, bad.freeze()));
    assert_eq!(step, Step::Continue);
    assert_eq!(types(&r), [REP_ERR_INVALID]);
}

#[test]
fn export_name_known_replies_with_and_without_zeroes() {
    // Proves EXPORT_NAME sends 10 bytes with NO_ZEROES and 134 without.
    for (flags, len) in [
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10),
        (FLAG_C_FIXED_NEWSTYLE, 134),
        (0, 134),
    ] {
        let mut n = Negotiation::new(export());
        n.client_flags(ClientFlags(flags)).unwrap();
        let mut out = BytesMut::new();
        let step = n.handle_option(opt(OPT_EXPORT_NAME, Bytes::from_static(b"vm1")), &mut out);
        assert!(matches!(step, Step::Transmission(_)));
        assert_eq!(out.len(), len, "flags {flags}");
        let r = ExportNameReply::decode(len == 10, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(r.size_bytes, 1 << 20);
    }
}

#[test]
fn export_name_unknown_closes_without_reply() {
    // Proves EXPORT_NAME for an unknown export closes (it cannot send an error).
    let mut n = fixed();
    let mut out = BytesMut::new();
    let step = n.handle_option(opt(OPT_EXPORT_NAME, Bytes::from_static(b"other")), &mut out);
    assert!(matches!(step, Step::Close(_)));
    assert!(out.is_empty());
}

#[test]
fn abort_is_acked_then_closes() {
    // Proves ABORT gets ACK and ends the session (data ignored).
    let mut n = fixed();
    let (step, r) = run(&mut n, opt(OPT_ABORT, Bytes::from_static(b"junk")));
    assert!(matches!(step, Step::Close(_)));
    assert_eq!(types(&r), [REP_ACK]);
}

#[test]
fn list_returns_the_export_and_rejects_data() {
    // Proves LIST answers one REP_SERVER (name + description) then ACK; data is ERR_INVALID.
    let mut n = fixed();
    let (_, r) = run(&mut n, opt(OPT_LIST, Bytes::new()));
    assert_eq!(types(&r), [REP_SERVER, REP_ACK]);
    assert_eq!(
        ServerEntry::parse(&r[0].data).unwrap(),
        ServerEntry {
            name: "vm1".into(),
            description: "test volume".into()
        }
    );
    let (step, r) = run(&mut n, opt(OPT_LIST, Bytes::from_static(b"x")));
    assert_eq!(step, Step::Continue);
    assert_eq!(types(&r), [REP_ERR_INVALID]);
}

#[test]
fn starttls_is_policy_error_and_unknown_options_are_unsup() {
    // Proves STARTTLS -> ERR_POLICY (ERR_INVALID with data), PEEK_EXPORT, EXTENDED_HEADERS and unknown -> ERR_UNSUP, all continuing.
    let mut n = fixed();
    assert_eq!(
        types(&run(&mut n, opt(OPT_STARTTLS, Bytes::new())).1),
        [REP_ERR_POLICY]
    );
    assert_eq!(
        types(&run(&mut n, opt(OPT_STARTTLS, Bytes::from_static(b"x"))).1),
        [REP_ERR_INVALID]
    );
    for code in [OPT_PEEK_EXPORT, OPT_EXTENDED_HEADERS, 0, 999, u32::MAX] {
        let (step, r) = run(&mut n, opt(code, Bytes::from_static(b"some data")));
        assert_eq!(step, Step::Continue);
        assert_eq!(types(&r), [REP_ERR_UNSUP], "option {code}");
    }
    // Still negotiating afterwards.
    assert!(matches!(
        run(&mut n, opt(OPT_GO, info_data("vm1", &[]))).0,
        Step::Transmission(_)
    ));
}

#[test]
fn structured_reply_acks_once_rejects_repeat_and_data_and_enables_df() {
    // Proves SR is ACKed, a repeat or data gets ERR_INVALID, and GO then advertises SEND_DF.
    let mut n = fixed();
    assert_eq!(
        types(&run(&mut n, opt(OPT_STRUCTURED_REPLY, Bytes::from_static(b"x"))).1),
        [REP_ERR_INVALID]
    );
    assert_eq!(
        types(&run(&mut n, opt(OPT_STRUCTURED_REPLY, Bytes::new())).1),
        [REP_ACK]
    );
    assert_eq!(
        types(&run(&mut n, opt(OPT_STRUCTURED_REPLY, Bytes::new())).1),
        [REP_ERR_INVALID]
    );
    match run(&mut n, opt(OPT_GO, info_data("vm1", &[]))).0 {
        Step::Transmission(p) => {
            assert!(p.structured_replies);
            assert_ne!(p.transmission_flags & TFLAG_SEND_DF, 0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn list_meta_context_lists_base_allocation_for_empty_exact_and_wildcard_queries() {
    // Proves LIST_META_CONTEXT: no query lists all, "base:" is a wildcard, other namespaces are ignored.
    let mut n = fixed();
    for queries in [
        &[][..],
        &["base:"][..],
        &["base:allocation"][..],
        &["qemu:dirty", "base:"][..],
    ] {
        let (_, r) = run(
            &mut n,
            opt(OPT_LIST_META_CONTEXT, meta_data("vm1", queries)),
        );
        assert_eq!(types(&r), [REP_META_CONTEXT, REP_ACK], "{queries:?}");
        assert_eq!(
            MetaContextEntry::parse(&r[0].data).unwrap().name,
            CONTEXT_BASE_ALLOCATION
        );
    }
    for queries in [&["qemu:dirty-bitmap:x"][..], &["base:nothing"][..]] {
        let (_, r) = run(
            &mut n,
            opt(OPT_LIST_META_CONTEXT, meta_data("vm1", queries)),
        );
        assert_eq!(types(&r), [REP_ACK], "{queries:?}");
    }
    let (_, r) = run(
        &mut n,
        opt(OPT_LIST_META_CONTEXT, Bytes::from_static(b"\0\0")),
    );
    assert_eq!(types(&r), [REP_ERR_INVALID]);
    let (_, r) = run(&mut n, opt(OPT_LIST_META_CONTEXT, meta_data("zz", &[])));
    assert_eq!(types(&r), [REP_ERR_UNKNOWN]);
}

#[test]
fn set_meta_context_needs_structured_replies_selects_and_replaces() {
    // Proves SET_META_CONTEXT: ERR_INVALID before SR, selects base:allocation with an id,
    // a later SET with no match deselects, and GO carries the selection.
    let mut n = fixed();
    let (_, r) = run(
        &mut n,
        opt(OPT_SET_META_CONTEXT, meta_data("vm1", &["base:allocation"])),
    );
    assert_eq!(types(&r), [REP_ERR_INVALID]);
    run(&mut n, opt(OPT_STRUCTURED_REPLY, Bytes::new()));
    let (_, r) = run(
        &mut n,
        opt(OPT_SET_META_CONTEXT, meta_data("vm1", &["base:allocation"])),
    );
    assert_eq!(types(&r), [REP_META_CONTEXT, REP_ACK]);
    let entry = MetaContextEntry::parse(&r[0].data).unwrap();
    assert_eq!(entry.context_id, CONTEXT_ID_BASE_ALLOCATION);
    let (_, r) = run(
        &mut n,
        opt(
            OPT_SET_META_CONTEXT,
            meta_data("vm1", &["base:unknown-leaf"]),
        ),
    );
    assert_eq!(types(&r), [REP_ACK]);
    match run(&mut n, opt(OPT_GO, info_data("vm1", &[]))).0 {
        Step::Transmission(p) => assert_eq!(p.base_allocation_id, None),
        other => panic!("{other:?}"),
    }
    let mut n = fixed();
    run(&mut n, opt(OPT_STRUCTURED_REPLY, Bytes::new()));
    run(
        &mut n,
        opt(OPT_SET_META_CONTEXT, meta_data("", &["base:allocation"])),
    );
    match run(&mut n, opt(OPT_GO, info_data("", &[]))).0 {
        Step::Transmission(p) => assert_eq!(p.base_allocation_id, Some(CONTEXT_ID_BASE_ALLOCATION)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn plain_newstyle_client_may_only_send_export_name() {
    // Proves a client without FIXED_NEWSTYLE is closed on any other option (no error replies exist for it).
    let mut n = Negotiation::new(export());
    n.client_flags(ClientFlags(0)).unwrap();
    let mut out = BytesMut::new();
    assert!(matches!(
        n.handle_option(opt(OPT_LIST, Bytes::new()), &mut out),
        Step::Close(_)
    ));
    assert!(out.is_empty());
}

#[test]
fn read_only_rotational_export_advertises_its_flags() {
    // Proves TargetFlags map to READ_ONLY/ROTATIONAL and unsupported features are not advertised.
    let mut e = export();
    e.flags.read_only = true;
    e.flags.rotational = true;
    e.flags.can_trim = false;
    e.flags.can_zero = false;
    e.flags.can_multi_conn = false;
    let f = transmission_flags(e.flags, false);
    assert_ne!(f & TFLAG_READ_ONLY, 0);
    assert_ne!(f & TFLAG_ROTATIONAL, 0);
    assert_eq!(
        f & (TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_FAST_ZERO
            | TFLAG_CAN_MULTI_CONN),
        0
    );
}
