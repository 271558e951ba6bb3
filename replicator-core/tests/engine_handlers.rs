//! Per-handler tests of the engine: feed inputs, assert the exact outputs.
//! A small harness builds engines from `create-md` metadata and, where a
//! connected pair is needed, shuttles frames between two engines.
mod common;

use common::*;
use replicator_core::wire::STATE_FLAG_RESYNC_DISK_WAIT;

#[test]
fn disconnected_primary_write_persists_new_uuid_and_al_then_sets_out_of_sync_bit() {
    // A disconnected Primary: the write waits for the new generation's
    // superblock and the AL transaction, then writes locally, completes on
    // the local result and leaves its block marked out of sync.
    let mut e = engine("alpha", "bravo", ProtocolMode::C, b"s");
    e.handle(Time(0), Input::Admin(AdminCommand::Primary { force: true }));
    settle_meta(&mut e);
    let before = e.generation_uuids().current;
    e.handle(
        Time(0),
        Input::Client {
            id: ClientId(1),
            request: ClientRequest::Write {
                offset: 8192,
                data: Bytes::from(vec![7u8; 4096]),
                fua: false,
            },
        },
    );
    let first = drain(&mut e);
    let metas = disk_ops(&first)
        .into_iter()
        .filter(|(_, k)| matches!(k, DiskOp::MetaWrite { .. }))
        .count();
    assert!(
        metas >= 2,
        "superblock + AL before the data write: {first:?}"
    );
    assert!(!disk_ops(&first)
        .iter()
        .any(|(_, k)| matches!(k, DiskOp::Write { .. })));
    for (op, _) in disk_ops(&first) {
        e.handle(
            Time(0),
            Input::DiskDone {
                op,
                result: Ok(Bytes::new()),
            },
        );
    }
    let outs = settle_meta(&mut e);
    let writes = disk_ops(&outs);
    assert_eq!(writes.len(), 1);
    assert_eq!(
        writes[0].1,
        DiskOp::Write {
            offset: 8192,
            data: Bytes::from(vec![7u8; 4096]),
            fua: false
        }
    );
    assert_ne!(e.generation_uuids().current, before, "new generation");
    assert_eq!(e.generation_uuids().bitmap, before);
    let outs = done(&mut e, writes[0].0);
    assert_eq!(completions(&outs), vec![(ClientId(1), Ok(Bytes::new()))]);
    assert_eq!(e.status().out_of_sync_bytes, 4096);
}

#[test]
fn protocol_c_write_completes_only_after_local_write_and_peer_write_ack() {
    // Invariant 1: neither the local completion nor the peer ack alone
    // completes the write; both together do, with no out-of-sync bit.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(Time(0), write_req(5, 0, true));
    let outs = settle_meta(&mut p.a);
    let ops = disk_ops(&outs);
    assert_eq!(ops.len(), 1);
    assert!(matches!(
        ops[0].1,
        DiskOp::Write {
            offset: 0,
            fua: true,
            ..
        }
    ));
    let frames = sent(&outs);
    let Message::Write {
        id,
        offset: 0,
        flags,
        len_bytes: 4096,
        ..
    } = frames[0].clone()
    else {
        panic!("expected a mirrored Write, got {frames:?}");
    };
    assert_eq!(flags & replicator_core::wire::WRITE_FLAG_FUA, 1);
    assert!(
        completions(&done(&mut p.a, ops[0].0)).is_empty(),
        "local alone"
    );
    p.a.handle(
        Time(0),
        Input::PeerFrame(Message::WriteAck { id, error: 0 }),
    );
    assert_eq!(
        completions(&drain(&mut p.a)),
        vec![(ClientId(5), Ok(Bytes::new()))]
    );
    assert_eq!(p.a.status().out_of_sync_bytes, 0);
}

#[test]
fn protocol_c_peer_ack_before_local_completion_still_waits_for_local() {
    // The other order: WriteAck first, then the local completion.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(Time(0), write_req(6, 4096, false));
    let outs = settle_meta(&mut p.a);
    let Message::Write { id, .. } = sent(&outs)[0].clone() else {
        panic!()
    };
    p.a.handle(
        Time(0),
        Input::PeerFrame(Message::WriteAck { id, error: 0 }),
    );
    assert!(completions(&drain(&mut p.a)).is_empty());
    let op = disk_ops(&outs)[0].0;
    assert_eq!(
        completions(&done(&mut p.a, op)),
        vec![(ClientId(6), Ok(Bytes::new()))]
    );
}

#[test]
fn protocol_b_completes_on_recv_ack_and_protocol_a_on_local_completion() {
    // B: local + RecvAck; A: local + frame queued.
    let mut p = Pair::new(ProtocolMode::B);
    p.a.handle(Time(0), write_req(1, 0, false));
    let outs = settle_meta(&mut p.a);
    let Message::Write { id, .. } = sent(&outs)[0].clone() else {
        panic!()
    };
    assert!(completions(&done(&mut p.a, disk_ops(&outs)[0].0)).is_empty());
    p.a.handle(Time(0), Input::PeerFrame(Message::RecvAck { id }));
    assert_eq!(completions(&drain(&mut p.a)).len(), 1);

    let mut p = Pair::new(ProtocolMode::A);
    p.a.handle(Time(0), write_req(2, 0, false));
    let outs = settle_meta(&mut p.a);
    assert_eq!(sent(&outs).len(), 1);
    assert_eq!(completions(&done(&mut p.a, disk_ops(&outs)[0].0)).len(), 1);
}

#[test]
fn flush_completes_only_after_local_flush_and_barrier_ack() {
    // Invariant 3: a FLUSH sends a Barrier and flushes locally; it completes
    // only when both are done.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(
        Time(0),
        Input::Client {
            id: ClientId(9),
            request: ClientRequest::Flush,
        },
    );
    let outs = drain(&mut p.a);
    let Message::Barrier { id } = sent(&outs)[0].clone() else {
        panic!("expected a Barrier, got {outs:?}");
    };
    let ops = disk_ops(&outs);
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].1, DiskOp::Flush);
    assert!(completions(&done(&mut p.a, ops[0].0)).is_empty());
    p.a.handle(
        Time(0),
        Input::PeerFrame(Message::BarrierAck { id, error: 0 }),
    );
    assert_eq!(
        completions(&drain(&mut p.a)),
        vec![(ClientId(9), Ok(Bytes::new()))]
    );
}

#[test]
fn secondary_answers_barrier_only_after_earlier_writes_and_a_flush() {
    // The peer side of a barrier: writes received before it complete, then
    // a local flush, then BarrierAck.
    let mut p = Pair::new(ProtocolMode::C);
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Write {
            id: RequestId(1000),
            offset: 0,
            flags: 0,
            len_bytes: 4096,
            data: Bytes::from(vec![1u8; 4096]),
        }),
    );
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Barrier {
            id: RequestId(1001),
        }),
    );
    // The Secondary's AL transaction (a metadata write) comes first.
    let outs = settle_meta(&mut p.b);
    let ops = disk_ops(&outs);
    assert_eq!(ops.len(), 1, "only the write, no flush yet: {outs:?}");
    assert!(matches!(ops[0].1, DiskOp::Write { offset: 0, .. }));
    let outs = done(&mut p.b, ops[0].0);
    assert_eq!(
        sent(&outs)[0],
        Message::WriteAck {
            id: RequestId(1000),
            error: 0
        }
    );
    let flush = disk_ops(&outs);
    assert_eq!(flush.len(), 1);
    assert_eq!(flush[0].1, DiskOp::Flush);
    let outs = done(&mut p.b, flush[0].0);
    assert_eq!(
        sent(&outs),
        vec![Message::BarrierAck {
            id: RequestId(1001),
            error: 0
        }]
    );
}

#[test]
fn overlapping_write_waits_for_the_earlier_one() {
    // Invariant 2: a later overlapping write is not started (locally or on
    // the wire) until the earlier one completed locally.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(Time(0), write_req(1, 0, false));
    let first = settle_meta(&mut p.a);
    p.a.handle(Time(0), write_req(2, 2048, false));
    let second = settle_meta(&mut p.a);
    assert!(
        disk_ops(&second).is_empty() && sent(&second).is_empty(),
        "{second:?}"
    );
    let outs = done(&mut p.a, disk_ops(&first)[0].0);
    assert_eq!(disk_ops(&outs).len(), 1);
    assert!(matches!(
        sent(&outs)[0],
        Message::Write { offset: 2048, .. }
    ));
}

#[test]
fn duplicated_mirrored_write_is_a_protocol_error_that_drops_the_link() {
    // A Write with an id not above the last one (a duplicate) closes the
    // link instead of being applied twice.
    let mut p = Pair::new(ProtocolMode::C);
    let w = Message::Write {
        id: RequestId(500),
        offset: 0,
        flags: 0,
        len_bytes: 512,
        data: Bytes::from(vec![1u8; 512]),
    };
    p.b.handle(Time(0), Input::PeerFrame(w.clone()));
    drain(&mut p.b);
    p.b.handle(Time(0), Input::PeerFrame(w));
    let outs = drain(&mut p.b);
    assert!(
        outs.iter().any(|o| matches!(o, Output::CloseLink { .. })),
        "{outs:?}"
    );
    assert_eq!(p.b.status().connection, ConnState::Connecting);
    assert_eq!(p.b.status().replication, ReplState::Off);
}

#[test]
fn undecodable_frame_drops_link_and_marks_in_flight_write_out_of_sync() {
    // Invariant 7: a corrupt frame closes the link; the write waiting for
    // the peer completes on the local result with its block marked.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(Time(0), write_req(3, 65536, false));
    let outs = settle_meta(&mut p.a);
    p.a.handle(
        Time(0),
        Input::PeerFrameError(WireError::BadMagic { found: 0xdead_beef }),
    );
    let closed = drain(&mut p.a);
    assert!(closed.iter().any(|o| matches!(o, Output::CloseLink { .. })));
    assert_eq!(completions(&done(&mut p.a, disk_ops(&outs)[0].0)).len(), 1);
    assert_eq!(p.a.status().out_of_sync_bytes, 4096);
}

#[test]
fn frame_before_authentication_is_refused() {
    // A data frame on a fresh connection, before Hello/auth: link dropped.
    let mut e = engine("alpha", "bravo", ProtocolMode::C, b"s");
    e.handle(Time(0), Input::Admin(AdminCommand::Connect));
    e.handle(Time(0), Input::Connected);
    drain(&mut e);
    e.handle(
        Time(0),
        Input::PeerFrame(Message::WriteAck {
            id: RequestId(1),
            error: 0,
        }),
    );
    let outs = drain(&mut e);
    assert!(
        outs.iter().any(|o| matches!(o, Output::CloseLink { .. })),
        "{outs:?}"
    );
}

#[test]
fn wrong_secret_is_refused_and_goes_standalone() {
    // Mutual HMAC authentication: a peer with another secret is refused.
    let mut a = engine("alpha", "bravo", ProtocolMode::C, b"right");
    let mut b = engine("bravo", "alpha", ProtocolMode::C, b"wrong");
    for e in [&mut a, &mut b] {
        e.handle(Time(0), Input::Admin(AdminCommand::Connect));
        e.handle(Time(0), Input::Connected);
    }
    let mut outs_a = Vec::new();
    for _ in 0..10 {
        for m in sent(&drain(&mut b)) {
            a.handle(Time(0), Input::PeerFrame(m));
        }
        let oa = drain(&mut a);
        for m in sent(&oa) {
            b.handle(Time(0), Input::PeerFrame(m));
        }
        outs_a.extend(oa);
    }
    assert!(outs_a.iter().any(|o| matches!(
        o,
        Output::Send(Message::Refuse {
            reason: replicator_core::wire::RefuseReason::WrongSecret,
            ..
        })
    )));
    assert_eq!(a.status().connection, ConnState::StandAlone);
}

/// Connect `a` and `b`, shuttle frames until quiet; return everything each
/// side output.
fn handshake_outputs(a: &mut Engine, b: &mut Engine) -> (Vec<Output>, Vec<Output>) {
    for e in [&mut *a, &mut *b] {
        e.handle(Time(0), Input::Admin(AdminCommand::Connect));
        e.handle(Time(0), Input::Connected);
    }
    let (mut outs_a, mut outs_b) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let ob = drain(b);
        for m in sent(&ob) {
            a.handle(Time(0), Input::PeerFrame(m));
        }
        outs_b.extend(ob);
        let oa = drain(a);
        for m in sent(&oa) {
            b.handle(Time(0), Input::PeerFrame(m));
        }
        outs_a.extend(oa);
    }
    (outs_a, outs_b)
}

#[test]
fn peers_with_different_protocols_refuse_each_other_at_hello() {
    // Hello carries the protocol: a protocol-A node and a protocol-C node
    // each refuse the other with ProtocolMismatch, both report it, and both
    // go StandAlone before authenticating.
    let mut a = engine("alpha", "bravo", ProtocolMode::A, b"s");
    let mut b = engine("bravo", "alpha", ProtocolMode::C, b"s");
    let (outs_a, outs_b) = handshake_outputs(&mut a, &mut b);
    for (name, outs, e) in [("alpha", &outs_a, &a), ("bravo", &outs_b, &b)] {
        assert!(
            outs.iter().any(|o| matches!(
                o,
                Output::Send(Message::Refuse {
                    reason: replicator_core::wire::RefuseReason::ProtocolMismatch,
                    ..
                })
            )),
            "{name}: {outs:?}"
        );
        assert!(
            outs.iter().any(|o| matches!(
                o,
                Output::Event(Event::ProtocolError { detail }) if detail.contains("protocol")
            )),
            "{name} reports the reason: {outs:?}"
        );
        assert!(!sent(outs)
            .iter()
            .any(|m| matches!(m, Message::AuthOk | Message::State { .. })));
        assert_eq!(e.status().connection, ConnState::StandAlone, "{name}");
    }
}

#[test]
fn peers_with_the_same_protocol_b_connect() {
    // The protocol check passes when both sides agree (here on B).
    let mut a = engine("alpha", "bravo", ProtocolMode::B, b"s");
    let mut b = engine("bravo", "alpha", ProtocolMode::B, b"s");
    let (outs_a, _) = handshake_outputs(&mut a, &mut b);
    assert!(!sent(&outs_a)
        .iter()
        .any(|m| matches!(m, Message::Refuse { .. })));
    assert_eq!(a.status().connection, ConnState::Connected);
    assert_eq!(b.status().connection, ConnState::Connected);
}

#[test]
fn barrier_overtaking_an_earlier_write_is_a_protocol_error() {
    // Write and Barrier ids come from one counter in sending order: a Write
    // arriving after a Barrier with a higher id was reordered (the barrier
    // would have acknowledged a flush not covering it), so the link drops
    // and the write is never applied.
    let mut p = Pair::new(ProtocolMode::C);
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Barrier { id: RequestId(11) }),
    );
    drain(&mut p.b);
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Write {
            id: RequestId(10),
            offset: 0,
            flags: 0,
            len_bytes: 512,
            data: Bytes::from(vec![1u8; 512]),
        }),
    );
    let outs = drain(&mut p.b);
    assert!(
        outs.iter().any(|o| matches!(o, Output::CloseLink { .. })),
        "{outs:?}"
    );
    assert!(disk_ops(&outs)
        .iter()
        .all(|(_, k)| !matches!(k, DiskOp::Write { .. })));
    assert_eq!(p.b.status().replication, ReplState::Off);
    // And a repeated Barrier id likewise.
    let mut p = Pair::new(ProtocolMode::C);
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Barrier { id: RequestId(5) }),
    );
    drain(&mut p.b);
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Barrier { id: RequestId(5) }),
    );
    let outs = drain(&mut p.b);
    assert!(outs.iter().any(|o| matches!(o, Output::CloseLink { .. })));
}

/// Client write 1 (4 KiB at 0) on alpha, mirrored to bravo: alpha's
/// outputs, and bravo's data write.
fn mirror_one_write(p: &mut Pair) -> (Vec<Output>, OpId) {
    p.a.handle(Time(0), write_req(1, 0, false));
    let oa = settle_meta(&mut p.a);
    for m in sent(&oa) {
        p.b.handle(Time(0), Input::PeerFrame(m));
    }
    let ob = settle_meta(&mut p.b);
    (oa, data_write(&ob))
}

/// The data write among `outs`.
fn data_write(outs: &[Output]) -> OpId {
    disk_ops(outs)
        .into_iter()
        .find(|(_, k)| matches!(k, DiskOp::Write { .. }))
        .map(|(op, _)| op)
        .expect("a data write")
}

#[test]
fn a_failed_write_on_the_secondary_makes_it_inconsistent_and_unpromotable() {
    use replicator_core::engine::DiskError;
    // Invariant 6 after a disk error: the Secondary's write of an
    // acknowledged block failed (ENOSPC, EIO), so its copy lacks that
    // write. It must not stay UpToDate: it turns Inconsistent, persists
    // that (superblock without the UpToDate flag), tells the Primary, and
    // refuses a promotion without --force once the Primary is gone.
    let mut p = Pair::new(ProtocolMode::C);
    let (oa, op) = mirror_one_write(&mut p);
    p.b.handle(
        Time(0),
        Input::DiskDone {
            op,
            result: Err(DiskError { code: 28 }),
        },
    );
    let mut superblock_flags = Vec::new();
    let mut ob = Vec::new();
    for o in drain(&mut p.b) {
        if let Output::Disk {
            op,
            kind: DiskOp::MetaWrite { offset_bytes, data },
        } = &o
        {
            let l = layout();
            for slot in 0..2u8 {
                if *offset_bytes == l.superblock_slot_offset(slot) {
                    let sb = metadata::decode_superblock(slot, data).expect("a superblock");
                    superblock_flags.push(sb.flags);
                }
            }
            p.b.handle(
                Time(0),
                Input::DiskDone {
                    op: *op,
                    result: Ok(Bytes::new()),
                },
            );
        } else {
            ob.push(o);
        }
    }
    // The failed WriteAck, released by the durable superblock.
    ob.extend(drain(&mut p.b));
    assert_eq!(p.b.disk_state(), DiskState::Inconsistent);
    assert!(
        superblock_flags
            .last()
            .is_some_and(|f| !f.contains(metadata::MetaFlags::UP_TO_DATE)),
        "persisted as not UpToDate: {superblock_flags:?}"
    );
    assert!(p.b.status().out_of_sync_bytes > 0, "the block is marked");
    // The Primary learns it; its own write succeeded, so the client's
    // write completes (its data is on the Primary) and is marked.
    for m in sent(&ob) {
        p.a.handle(Time(0), Input::PeerFrame(m));
    }
    let op = data_write(&oa);
    let outs = done(&mut p.a, op);
    assert!(
        matches!(completions(&outs)[..], [(ClientId(1), Ok(_))]),
        "{outs:?}"
    );
    assert_eq!(p.a.status().peer_disk, Some(DiskState::Inconsistent));
    assert!(p.a.status().out_of_sync_bytes > 0);
    // The Primary is lost: the Secondary may not take over unforced.
    p.b.handle(Time(0), Input::Disconnected);
    drain(&mut p.b);
    p.b.handle(
        Time(0),
        Input::Admin(AdminCommand::Primary { force: false }),
    );
    let outs = settle_meta(&mut p.b);
    assert!(
        outs.contains(&Output::AdminResult(Err(AdminError::StaleData {
            disk: DiskState::Inconsistent
        }))),
        "{outs:?}"
    );
    assert_eq!(p.b.role(), NodeRole::Secondary);
}

/// Complete disk op `op` with `result` without settling metadata writes.
fn finish(
    e: &mut Engine,
    op: OpId,
    result: Result<Bytes, replicator_core::engine::DiskError>,
) -> Vec<Output> {
    e.handle(Time(0), Input::DiskDone { op, result });
    drain(e)
}

fn acks(outs: &[Output]) -> Vec<Message> {
    sent(outs)
        .into_iter()
        .filter(|m| matches!(m, Message::WriteAck { .. } | Message::BarrierAck { .. }))
        .collect()
}

fn superblock_write(outs: &[Output]) -> Option<OpId> {
    let l = layout();
    disk_ops(outs).into_iter().find_map(|(op, k)| match k {
        DiskOp::MetaWrite { offset_bytes, .. }
            if (0..2u8).any(|slot| offset_bytes == l.superblock_slot_offset(slot)) =>
        {
            Some(op)
        }
        _ => None,
    })
}

#[test]
fn the_secondarys_failed_ack_waits_until_its_inconsistent_superblock_is_durable() {
    use replicator_core::engine::DiskError;
    // A crash of the Secondary right after its failed write must not bring
    // it back UpToDate while the Primary, told of the failure, acknowledged
    // the write to its client from its own copy: the failed WriteAck, and
    // every ack after it (in order), goes out only once the superblock
    // without UpToDate is on the metadata disk.
    let mut p = Pair::new(ProtocolMode::C);
    for (id, offset) in [(1000, 0), (1001, 4096)] {
        p.b.handle(
            Time(0),
            Input::PeerFrame(Message::Write {
                id: RequestId(id),
                offset,
                flags: 0,
                len_bytes: 4096,
                data: Bytes::from(vec![1u8; 4096]),
            }),
        );
    }
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Barrier {
            id: RequestId(1002),
        }),
    );
    let ops = disk_ops(&settle_meta(&mut p.b));
    assert_eq!(ops.len(), 2, "{ops:?}");
    let outs = finish(&mut p.b, ops[0].0, Err(DiskError { code: 5 }));
    assert_eq!(p.b.disk_state(), DiskState::Inconsistent);
    assert!(
        sent(&outs)
            .iter()
            .any(|m| matches!(m, Message::State { .. })),
        "the Primary is told at once: {outs:?}"
    );
    assert_eq!(
        acks(&outs),
        vec![],
        "no ack before the superblock is durable"
    );
    let sb = superblock_write(&outs).expect("the Inconsistent superblock is written");
    let outs = finish(&mut p.b, ops[1].0, Ok(Bytes::new()));
    assert_eq!(acks(&outs), vec![], "later acks wait behind the failed one");
    let flush = disk_ops(&outs);
    assert_eq!(flush.len(), 1);
    assert_eq!(flush[0].1, DiskOp::Flush);
    let outs = finish(&mut p.b, flush[0].0, Ok(Bytes::new()));
    assert_eq!(acks(&outs), vec![]);
    let outs = finish(&mut p.b, sb, Ok(Bytes::new()));
    assert_eq!(
        acks(&outs),
        vec![
            Message::WriteAck {
                id: RequestId(1000),
                error: 5
            },
            Message::WriteAck {
                id: RequestId(1001),
                error: 0
            },
            Message::BarrierAck {
                id: RequestId(1002),
                error: 0
            },
        ]
    );
    // Nothing is held any more: the next write is acknowledged at once.
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::Write {
            id: RequestId(1003),
            offset: 8192,
            flags: 0,
            len_bytes: 4096,
            data: Bytes::from(vec![2u8; 4096]),
        }),
    );
    let ops = disk_ops(&settle_meta(&mut p.b));
    let outs = finish(&mut p.b, ops[0].0, Ok(Bytes::new()));
    assert_eq!(
        acks(&outs),
        vec![Message::WriteAck {
            id: RequestId(1003),
            error: 0
        }]
    );
}

#[test]
fn a_failed_barrier_flush_makes_the_secondary_inconsistent_and_the_primary_marks_the_writes() {
    use replicator_core::engine::DiskError;
    // A write-back error shows only at the flush (fsync's EIO; with
    // `direct = false` that is how a failing disk reports lost writes).
    // Writes the Secondary acknowledged may then be missing from its disk:
    // it turns Inconsistent (persisted before the BarrierAck), and the
    // Primary marks every write its peer has not flushed out of sync,
    // instead of dropping them from its transfer log as durable.
    let mut p = Pair::new(ProtocolMode::C);
    let (oa, wop) = mirror_one_write(&mut p);
    let ob = done(&mut p.b, wop);
    for m in sent(&ob) {
        p.a.handle(Time(0), Input::PeerFrame(m));
    }
    let aop = data_write(&oa);
    let outs = done(&mut p.a, aop);
    assert!(
        matches!(completions(&outs)[..], [(ClientId(1), Ok(_))]),
        "{outs:?}"
    );
    assert_eq!(p.a.status().out_of_sync_bytes, 0);
    // The client flushes: a Barrier to the Secondary, whose flush fails.
    p.a.handle(
        Time(0),
        Input::Client {
            id: ClientId(2),
            request: ClientRequest::Flush,
        },
    );
    let oa = drain(&mut p.a);
    for m in sent(&oa) {
        p.b.handle(Time(0), Input::PeerFrame(m));
    }
    let ob = drain(&mut p.b);
    let flush = disk_ops(&ob);
    assert_eq!(flush.len(), 1, "{ob:?}");
    assert_eq!(flush[0].1, DiskOp::Flush);
    let outs = finish(&mut p.b, flush[0].0, Err(DiskError { code: 5 }));
    assert_eq!(p.b.disk_state(), DiskState::Inconsistent);
    assert_eq!(acks(&outs), vec![], "held until the superblock is durable");
    let mut to_a = sent(&outs);
    let sb = superblock_write(&outs).expect("the Inconsistent superblock is written");
    to_a.extend(sent(&finish(&mut p.b, sb, Ok(Bytes::new()))));
    assert!(to_a.contains(&Message::BarrierAck {
        id: match sent(&oa)[0] {
            Message::Barrier { id } => id,
            ref m => panic!("expected a Barrier, got {m:?}"),
        },
        error: 5
    }));
    for m in to_a {
        p.a.handle(Time(0), Input::PeerFrame(m));
    }
    let (fop, _) = disk_ops(&oa)
        .into_iter()
        .find(|(_, k)| *k == DiskOp::Flush)
        .expect("the primary flushes too");
    let outs = done(&mut p.a, fop);
    // The Primary's own copy is durable: the client's flush succeeds.
    assert_eq!(completions(&outs), vec![(ClientId(2), Ok(Bytes::new()))]);
    assert_eq!(p.a.status().peer_disk, Some(DiskState::Inconsistent));
    assert_eq!(
        p.a.status().out_of_sync_bytes,
        4096,
        "the write the peer acknowledged but could not flush is marked"
    );
}

#[test]
fn a_failed_metadata_write_stops_the_engine() {
    use replicator_core::engine::DiskError;
    // A metadata write may not be taken for done when it failed: the
    // activity log would not name the extents of the writes that follow.
    // The engine asks to stop (Fatal) and takes no more input.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(Time(0), write_req(1, 0, false));
    let outs = drain(&mut p.a);
    let (al, _) = disk_ops(&outs)
        .into_iter()
        .find(|(_, k)| matches!(k, DiskOp::MetaWrite { .. }))
        .expect("the write's extent goes into the activity log first");
    let outs = finish(&mut p.a, al, Err(DiskError { code: 5 }));
    assert!(
        matches!(&outs[..], [Output::Fatal { reason }] if reason.contains("activity log")),
        "{outs:?}"
    );
    p.a.handle(Time(0), write_req(2, 4096, false));
    p.a.handle(
        Time(0),
        Input::Admin(AdminCommand::Primary { force: false }),
    );
    assert_eq!(drain(&mut p.a), vec![], "a stopped engine does nothing");
}

#[test]
fn inconsistent_node_refuses_primary_unless_forced() {
    // Invariant 6: stale data is not promoted without --force.
    let mut e = engine("alpha", "bravo", ProtocolMode::C, b"s");
    assert_eq!(e.disk_state(), DiskState::Inconsistent);
    e.handle(
        Time(0),
        Input::Admin(AdminCommand::Primary { force: false }),
    );
    let outs = drain(&mut e);
    assert!(
        outs.contains(&Output::AdminResult(Err(AdminError::StaleData {
            disk: DiskState::Inconsistent
        })))
    );
    assert_eq!(e.role(), NodeRole::Secondary);
    e.handle(Time(0), Input::Admin(AdminCommand::Primary { force: true }));
    let outs = settle_meta(&mut e);
    assert!(outs.contains(&Output::AdminResult(Ok(()))));
    assert_eq!(e.role(), NodeRole::Primary);
    assert_eq!(e.disk_state(), DiskState::UpToDate);
}

#[test]
fn promotion_refused_while_peer_is_primary() {
    // Single-primary: the Secondary cannot be promoted while the peer is.
    let mut p = Pair::new(ProtocolMode::C);
    p.b.handle(Time(0), Input::Admin(AdminCommand::Primary { force: true }));
    assert!(drain(&mut p.b).contains(&Output::AdminResult(Err(AdminError::PeerIsPrimary))));
}

#[test]
fn secondary_refuses_client_io_and_out_of_range_write_is_rejected() {
    // Only the Primary serves; bad ranges get a clear error, never a panic.
    let mut p = Pair::new(ProtocolMode::C);
    p.b.handle(Time(0), write_req(1, 0, false));
    assert_eq!(
        completions(&drain(&mut p.b)),
        vec![(ClientId(1), Err(ClientError::NotPrimary))]
    );
    let size = p.a.status().size_bytes;
    p.a.handle(Time(0), write_req(2, size - 512, false));
    assert_eq!(
        completions(&drain(&mut p.a)),
        vec![(ClientId(2), Err(ClientError::OutOfRange))]
    );
    p.a.handle(
        Time(0),
        Input::Client {
            id: ClientId(3),
            request: ClientRequest::Read {
                offset: u64::MAX - 10,
                len_bytes: 4096,
            },
        },
    );
    assert_eq!(
        completions(&drain(&mut p.a)),
        vec![(ClientId(3), Err(ClientError::OutOfRange))]
    );
}

#[test]
fn reconnect_after_disconnected_writes_resyncs_exactly_the_dirty_blocks() {
    // Invariant 4: writes while disconnected are resynced on reconnect (the
    // Primary is SyncSource, bravo SyncTarget), and both end at zero bits.
    let mut p = Pair::new(ProtocolMode::C);
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Disconnected);
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    p.a.handle(Time(0), write_req(1, 0, false));
    p.a.handle(Time(0), write_req(2, 1 << 20, false));
    p.run(&mut Vec::new(), &mut Vec::new());
    assert_eq!(p.a.status().out_of_sync_bytes, 8192);
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Connected);
    }
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    p.run(&mut oa, &mut ob);
    assert!(ob.contains(&Output::Event(Event::Replication(ReplState::SyncTarget))));
    assert!(oa.contains(&Output::Event(Event::Replication(ReplState::SyncSource))));
    assert_eq!(p.a.status().replication, ReplState::Established);
    assert_eq!(p.b.status().replication, ReplState::Established);
    assert_eq!(p.a.status().out_of_sync_bytes, 0);
    assert_eq!(p.b.status().out_of_sync_bytes, 0);
    assert!(replicator_core::generation::same_generation(
        p.a.generation_uuids().current,
        p.b.generation_uuids().current
    ));
    assert_eq!(p.a.generation_uuids().bitmap, 0, "source stops tracking");
}

#[test]
fn online_verify_of_identical_replicas_reports_zero_mismatches() {
    // Verify compares digests block range by block range.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(Time(0), Input::Admin(AdminCommand::Verify));
    let mut oa = Vec::new();
    p.run(&mut oa, &mut Vec::new());
    assert!(oa.contains(&Output::Event(Event::VerifyDone {
        mismatched_bytes: 0
    })));
    assert_eq!(p.a.status().replication, ReplState::Established);
}

/// Four 4 KiB writes on a while disconnected, 1 MiB apart; then both
/// see the link come back (nothing shuttled yet).
fn disconnect_write_and_link_up(p: &mut Pair) {
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Disconnected);
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    for i in 0..4 {
        p.a.handle(Time(0), write_req(10 + i, i * (1 << 20), false));
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Connected);
    }
}

fn disconnect_write_reconnect(p: &mut Pair) -> (Vec<Output>, Vec<Output>) {
    disconnect_write_and_link_up(p);
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    p.run(&mut oa, &mut ob);
    (oa, ob)
}

#[test]
fn checksum_resync_skips_ranges_whose_digests_match() {
    // Checksum-based resync: the target sends digests; where the source's
    // copy has the same digest it answers ResyncInSync and sends no data.
    // (The harness's disks read zeroes on both sides, so every digest
    // matches.)
    let mut p = Pair::new(ProtocolMode::C);
    p.b.set_checksum_resync(true);
    let (oa, ob) = disconnect_write_reconnect(&mut p);
    let asked = sent(&ob)
        .iter()
        .filter(|m| matches!(m, Message::ResyncChecksumRequest { .. }))
        .count();
    assert_eq!(asked, 4, "one digest request per dirty range");
    assert!(!sent(&ob)
        .iter()
        .any(|m| matches!(m, Message::ResyncRequest { .. })));
    let in_sync = sent(&oa)
        .iter()
        .filter(|m| matches!(m, Message::ResyncInSync { .. }))
        .count();
    assert_eq!(in_sync, 4);
    assert!(!sent(&oa)
        .iter()
        .any(|m| matches!(m, Message::ResyncData { .. })));
    assert_eq!(p.b.status().out_of_sync_bytes, 0);
    assert_eq!(p.b.status().replication, ReplState::Established);
}

#[test]
fn plain_resync_requests_and_copies_every_dirty_range() {
    // Without checksums every dirty range is requested and copied.
    let mut p = Pair::new(ProtocolMode::C);
    let (oa, ob) = disconnect_write_reconnect(&mut p);
    let asked = sent(&ob)
        .iter()
        .filter(|m| matches!(m, Message::ResyncRequest { .. }))
        .count();
    let copied = sent(&oa)
        .iter()
        .filter(|m| matches!(m, Message::ResyncData { .. }))
        .count();
    assert_eq!((asked, copied), (4, 4));
    assert!(oa.contains(&Output::Event(Event::Replication(ReplState::SyncSource))));
}

#[test]
fn paused_sync_target_sends_no_requests_until_resumed() {
    // pause-sync stops issuing resync requests; resume-sync continues.
    let mut p = Pair::new(ProtocolMode::C);
    p.b.handle(Time(0), Input::Admin(AdminCommand::PauseSync));
    let (_, ob) = disconnect_write_reconnect(&mut p);
    assert_eq!(p.b.status().replication, ReplState::PausedSyncT);
    assert!(!sent(&ob)
        .iter()
        .any(|m| matches!(m, Message::ResyncRequest { .. })));
    assert_eq!(p.b.status().resync.map(|r| r.total_bytes), Some(16384));
    p.b.handle(Time(0), Input::Admin(AdminCommand::ResumeSync));
    p.run(&mut Vec::new(), &mut Vec::new());
    assert_eq!(p.b.status().replication, ReplState::Established);
    assert_eq!(p.b.status().out_of_sync_bytes, 0);
}

/// A pair whose target (b) has `resync_rate = rate`, after a wrote 4 MiB
/// while disconnected and both reconnected: b is SyncTarget.
fn paced_resync_of_4_mib(rate: u64) -> Pair {
    let mut p = Pair::with_target_rate(ProtocolMode::C, Some(rate));
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Disconnected);
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    for i in 0..4u64 {
        p.a.handle(
            Time(0),
            Input::Client {
                id: ClientId(100 + i),
                request: ClientRequest::Write {
                    offset: i << 20,
                    data: Bytes::from(vec![1u8; 1 << 20]),
                    fua: false,
                },
            },
        );
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Connected);
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    assert_eq!(p.b.status().replication, ReplState::SyncTarget);
    p
}

#[test]
fn resync_rate_limit_throttles_requests_and_sets_a_deadline() {
    // resync_rate bounds the bytes requested per second: with 1 MiB/s and
    // 4 MiB dirty, the first burst stops early, the engine asks for a tick,
    // and the resync only finishes after enough (engine) time has passed.
    let rate = 1 << 20;
    let mut p = paced_resync_of_4_mib(rate);
    let left = p.b.status().out_of_sync_bytes;
    assert!(left > 3 << 20, "burst limited: {left} bytes left");
    let mut now = 0u64;
    let mut ticks = 0;
    while p.b.status().replication == ReplState::SyncTarget {
        let d =
            p.b.next_deadline()
                .expect("a throttled resync asks for a tick");
        now = now.max(d.0);
        p.b.handle(Time(now), Input::Tick);
        p.run(&mut Vec::new(), &mut Vec::new());
        ticks += 1;
        assert!(ticks < 10_000, "resync never finished");
    }
    assert_eq!(p.b.status().out_of_sync_bytes, 0);
    // 4 MiB at 1 MiB/s after a 128 KiB head start: close to 4 s.
    assert!(now >= 3_500_000_000, "finished too early: {now} ns");
}

#[test]
fn a_resumed_resync_does_not_catch_up_at_full_speed() {
    use replicator_core::engine::{RESYNC_RATE_MAX_SAVED_NS, RESYNC_REQUEST_MAX_BYTES};
    // resync_rate holds after a pause too: 10 s paused are not 10 s of rate
    // to spend at once (at most RESYNC_RATE_MAX_SAVED_NS of unused rate is
    // kept), and the rest still takes about as long as the rate says.
    let rate: u64 = 1 << 20;
    let mut p = paced_resync_of_4_mib(rate);
    // One second of paced resync.
    let mut now = 0u64;
    while now < 1_000_000_000 {
        now = now.max(p.b.next_deadline().expect("throttled").0);
        p.b.handle(Time(now), Input::Tick);
        p.run(&mut Vec::new(), &mut Vec::new());
    }
    p.b.handle(Time(now), Input::Admin(AdminCommand::PauseSync));
    p.run(&mut Vec::new(), &mut Vec::new());
    assert_eq!(p.b.status().replication, ReplState::PausedSyncT);
    let before = p.b.status().out_of_sync_bytes;
    for _ in 0..20 {
        // Half-second ticks on both keep the link's pings going.
        now += 500_000_000;
        p.a.handle(Time(now), Input::Tick);
        p.b.handle(Time(now), Input::Tick);
        p.run(&mut Vec::new(), &mut Vec::new());
    }
    assert_eq!(
        p.b.status().out_of_sync_bytes,
        before,
        "paused: nothing moves"
    );
    p.b.handle(Time(now), Input::Admin(AdminCommand::ResumeSync));
    p.run(&mut Vec::new(), &mut Vec::new());
    assert_eq!(p.b.status().replication, ReplState::SyncTarget);
    let burst = before - p.b.status().out_of_sync_bytes;
    let saved = rate * RESYNC_RATE_MAX_SAVED_NS / 1_000_000_000;
    assert!(
        burst <= RESYNC_REQUEST_MAX_BYTES + saved,
        "{burst} bytes at once after the pause"
    );
    let resumed = now;
    let mut ticks = 0;
    while p.b.status().replication == ReplState::SyncTarget {
        now = now.max(p.b.next_deadline().expect("throttled").0);
        p.b.handle(Time(now), Input::Tick);
        p.run(&mut Vec::new(), &mut Vec::new());
        ticks += 1;
        assert!(ticks < 10_000, "resync never finished");
    }
    assert_eq!(p.b.status().out_of_sync_bytes, 0);
    let paced = (before - burst - RESYNC_REQUEST_MAX_BYTES) * 1_000_000_000 / rate;
    assert!(
        now - resumed >= paced,
        "the rest took {} ns, the rate needs {paced}",
        now - resumed
    );
}

#[test]
fn verify_done_racing_its_own_requests_drops_the_link_without_panicking() {
    // Out-of-protocol order from the peer (VerifyDone while our verify read
    // for its request is still queued/in flight) closes the link.
    let mut p = Pair::new(ProtocolMode::C);
    p.b.handle(
        Time(0),
        Input::PeerFrame(Message::VerifyRequest {
            id: RequestId(1),
            offset: 0,
            len_bytes: 4096,
        }),
    );
    p.b.handle(Time(0), Input::PeerFrame(Message::VerifyDone));
    let outs = drain(&mut p.b);
    assert!(
        outs.iter().any(|o| matches!(o, Output::CloseLink { .. })),
        "{outs:?}"
    );
    // The read still completes without touching freed state.
    for (op, _) in disk_ops(&outs) {
        p.b.handle(
            Time(0),
            Input::DiskDone {
                op,
                result: Ok(Bytes::from(vec![0u8; 4096])),
            },
        );
    }
    assert_eq!(p.b.status().replication, ReplState::Off);
}

#[test]
fn resync_done_while_requests_are_outstanding_is_a_protocol_error() {
    // A SyncSource told "done" while it still serves requests drops the
    // link instead of forgetting queued work.
    let mut p = Pair::new(ProtocolMode::C);
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Disconnected);
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    p.a.handle(Time(0), write_req(1, 0, false));
    p.run(&mut Vec::new(), &mut Vec::new());
    // Connect, but hold bravo's frames so alpha is SyncSource with a request.
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Connected);
    }
    for _ in 0..20 {
        for m in sent(&settle_meta(&mut p.a)) {
            p.b.handle(Time(0), Input::PeerFrame(m));
        }
        for m in sent(&settle_meta(&mut p.b)) {
            let is_req = matches!(m, Message::ResyncRequest { .. });
            p.a.handle(Time(0), Input::PeerFrame(m));
            if is_req {
                break;
            }
        }
        if p.a.status().replication == ReplState::SyncSource && p.a.pending_disk_ops() > 0 {
            break;
        }
    }
    assert_eq!(p.a.status().replication, ReplState::SyncSource);
    p.a.handle(Time(0), Input::PeerFrame(Message::ResyncDone));
    let outs = drain(&mut p.a);
    assert!(
        outs.iter().any(|o| matches!(o, Output::CloseLink { .. })),
        "{outs:?}"
    );
}

#[test]
fn sync_target_with_a_slow_disk_keeps_received_data_within_the_resync_window() {
    // Invariant 8: data a SyncTarget received but has not yet written to its
    // (slow) disk counts against the resync window, so it never asks for more
    // than RESYNC_MAX_INFLIGHT_REQUESTS ranges ahead of its disk, whatever
    // the amount out of sync. Once the disk catches up the resync finishes.
    use replicator_core::engine::{RESYNC_MAX_INFLIGHT_REQUESTS, RESYNC_REQUEST_MAX_BYTES};
    let mut p = Pair::new(ProtocolMode::C);
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Disconnected);
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    // 16 MiB out of sync: 128 requests of 128 KiB, four times the window.
    for i in 0..16u64 {
        p.a.handle(
            Time(0),
            Input::Client {
                id: ClientId(1000 + i),
                request: ClientRequest::Write {
                    offset: i << 20,
                    data: Bytes::from(vec![7u8; 1 << 20]),
                    fua: false,
                },
            },
        );
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(0), Input::Connected);
    }
    // Shuttle like Pair::run, but bravo's data writes never complete.
    let mut held: Vec<OpId> = Vec::new();
    let mut requested_bytes = 0u64;
    for _ in 0..10_000 {
        let (oa, ob) = (drain(&mut p.a), drain(&mut p.b));
        if oa.is_empty() && ob.is_empty() {
            break;
        }
        for o in oa {
            match o {
                Output::Send(m) => p.b.handle(Time(0), Input::PeerFrame(m)),
                Output::Disk { op, kind } => {
                    let data = match kind {
                        DiskOp::Read { len_bytes, .. } => {
                            Bytes::from(vec![7u8; len_bytes as usize])
                        }
                        _ => Bytes::new(),
                    };
                    p.a.handle(
                        Time(0),
                        Input::DiskDone {
                            op,
                            result: Ok(data),
                        },
                    );
                }
                _ => {}
            }
        }
        for o in ob {
            match o {
                Output::Send(m) => {
                    if let Message::ResyncRequest { len_bytes, .. } = &m {
                        requested_bytes += u64::from(*len_bytes);
                    }
                    p.a.handle(Time(0), Input::PeerFrame(m));
                }
                Output::Disk {
                    op,
                    kind: DiskOp::Write { .. },
                } => held.push(op),
                Output::Disk { op, .. } => {
                    p.b.handle(
                        Time(0),
                        Input::DiskDone {
                            op,
                            result: Ok(Bytes::new()),
                        },
                    );
                }
                _ => {}
            }
        }
    }
    assert_eq!(p.b.status().replication, ReplState::SyncTarget);
    let window_bytes = RESYNC_MAX_INFLIGHT_REQUESTS as u64 * RESYNC_REQUEST_MAX_BYTES;
    assert!(
        requested_bytes <= window_bytes,
        "asked for {requested_bytes} bytes ahead of a stalled disk (window {window_bytes})"
    );
    assert_eq!(held.len(), RESYNC_MAX_INFLIGHT_REQUESTS);
    // The disk catches up: the rest of the resync flows and finishes.
    for op in held {
        p.b.handle(
            Time(0),
            Input::DiskDone {
                op,
                result: Ok(Bytes::new()),
            },
        );
    }
    p.run(&mut Vec::new(), &mut Vec::new());
    assert_eq!(p.b.status().replication, ReplState::Established);
    assert_eq!(p.b.status().out_of_sync_bytes, 0);
}

/// A fresh node of an 8 GiB device whose bitmap has every other block set
/// (incompressible: 256 KiB of raw bitmap, more chunks than the window).
fn big_engine_with_striped_bitmap(node: &str, peer: &str) -> Engine {
    custom_engine(node, peer, 8 << 30, DEFAULT_BITMAP_BLOCK_BYTES, 0x55)
}

/// A fresh protocol-C node of a `size`-byte device tracking `block_bytes`
/// per bit, every bitmap page filled with `pattern`.
fn custom_engine(node: &str, peer: &str, size: u64, block_bytes: u32, pattern: u8) -> Engine {
    let l = MetadataLayout::external(size, 64 << 20, block_bytes, MIN_AL_EXTENTS).expect("layout");
    let created = metadata::create(&l, "r", node, MIN_AL_EXTENTS).expect("create-md");
    let mut bitmap = Bitmap::new(size, block_bytes).expect("bitmap");
    for page in 0..bitmap.page_count() {
        bitmap
            .load_page(page, &[pattern; replicator_core::bitmap::BITMAP_PAGE_BYTES])
            .expect("page");
    }
    let cfg = EngineConfig {
        resource: "r".into(),
        node: node.into(),
        peer: peer.into(),
        size_bytes: size,
        bitmap_block_bytes: block_bytes,
        protocol: ProtocolMode::C,
        secret: b"s".to_vec(),
        split_brain: SplitBrainPolicy::Disconnect,
        al_extents: MIN_AL_EXTENTS,
        meta_layout: l,
        resync_rate_bytes_per_s: None,
        sim_fault: SimFault::None,
    };
    let meta = LoadedMetadata {
        superblock: created.superblock,
        superblock_slot: 0,
        bitmap,
        al: AlRecovery {
            last_sequence: 0,
            capacity: MIN_AL_EXTENTS,
            slots: vec![None; MIN_AL_EXTENTS as usize],
            next_context_start: 0,
        },
    };
    let mut e = Engine::new(cfg, meta, 7).expect("engine");
    settle_meta(&mut e);
    e
}

/// Deliver frames both ways and complete disk ops until nothing moves;
/// frames for which `hold(from_a, msg)` is true are kept back and returned.
/// Counts the BitmapChunks `a` sent.
fn shuttle_holding(
    a: &mut Engine,
    b: &mut Engine,
    hold: impl Fn(bool, &Message) -> bool,
    held: &mut Vec<(bool, Message)>,
) -> usize {
    let mut chunks_from_a = 0;
    for _ in 0..10_000 {
        let (oa, ob) = (settle_meta(a), settle_meta(b));
        if oa.is_empty() && ob.is_empty() {
            return chunks_from_a;
        }
        for (from_a, outs) in [(true, oa), (false, ob)] {
            for m in sent(&outs) {
                if from_a && matches!(m, Message::BitmapChunk { .. }) {
                    chunks_from_a += 1;
                }
                if hold(from_a, &m) {
                    held.push((from_a, m));
                } else if from_a {
                    b.handle(Time(0), Input::PeerFrame(m));
                } else {
                    a.handle(Time(0), Input::PeerFrame(m));
                }
            }
        }
    }
    panic!("engines did not settle");
}

#[test]
fn bitmap_exchange_keeps_at_most_a_window_of_unacknowledged_chunks() {
    // Invariant 8: a bitmap that needs more chunks than the window is sent
    // BITMAP_CHUNKS_IN_FLIGHT chunks at a time; without BitmapAcks nothing
    // more goes out, each ack releases exactly one more chunk, and the
    // handshake completes only after both bitmaps crossed.
    use replicator_core::engine::BITMAP_CHUNKS_IN_FLIGHT;
    let mut a = big_engine_with_striped_bitmap("alpha", "bravo");
    let mut b = big_engine_with_striped_bitmap("bravo", "alpha");
    for e in [&mut a, &mut b] {
        e.handle(Time(0), Input::Admin(AdminCommand::Connect));
        e.handle(Time(0), Input::Connected);
    }
    let mut held = Vec::new();
    let is_ack_to_a = |from_a: bool, m: &Message| !from_a && matches!(m, Message::BitmapAck { .. });
    let sent_first = shuttle_holding(&mut a, &mut b, is_ack_to_a, &mut held);
    assert_eq!(
        sent_first, BITMAP_CHUNKS_IN_FLIGHT,
        "the window bounds the burst"
    );
    assert_eq!(held.len(), BITMAP_CHUNKS_IN_FLIGHT, "one ack per chunk");
    assert_ne!(a.status().replication, ReplState::Established);
    // One ack releases one chunk.
    let (_, first_ack) = held.remove(0);
    a.handle(Time(0), Input::PeerFrame(first_ack));
    let more = sent(&drain(&mut a));
    assert_eq!(
        more.iter()
            .filter(|m| matches!(m, Message::BitmapChunk { .. }))
            .count(),
        1
    );
    for m in more {
        b.handle(Time(0), Input::PeerFrame(m));
    }
    // Release everything: the exchange finishes, never above the window.
    let mut total = BITMAP_CHUNKS_IN_FLIGHT + 1;
    for (_, m) in held.drain(..) {
        a.handle(Time(0), Input::PeerFrame(m));
    }
    total += shuttle_holding(&mut a, &mut b, |_, _| false, &mut Vec::new());
    assert!(total > 2 * BITMAP_CHUNKS_IN_FLIGHT, "{total} chunks");
    assert_eq!(a.status().replication, ReplState::Established);
    assert_eq!(b.status().replication, ReplState::Established);
    assert_eq!(a.status().out_of_sync_bytes, 4u64 << 30);
}

#[test]
fn unexpected_bitmap_ack_is_a_protocol_error() {
    // A BitmapAck naming a block no chunk ended at (or with no chunk
    // outstanding) drops the link.
    let mut p = Pair::new(ProtocolMode::C);
    p.a.handle(
        Time(0),
        Input::PeerFrame(Message::BitmapAck { next_block: 1 }),
    );
    let outs = drain(&mut p.a);
    assert!(
        outs.iter().any(|o| matches!(o, Output::CloseLink { .. })),
        "{outs:?}"
    );
}

#[test]
fn peers_with_different_bitmap_granularity_refuse_each_other_at_hello() {
    // Hello carries bitmap_block_bytes: 4 KiB and 8 KiB per bit cannot merge
    // bitmaps, so both sides refuse with BitmapBlockMismatch, report it and
    // go StandAlone.
    let mut a = custom_engine("alpha", "bravo", 1 << 30, 4096, 0);
    let mut b = custom_engine("bravo", "alpha", 1 << 30, 8192, 0);
    let (outs_a, outs_b) = handshake_outputs(&mut a, &mut b);
    for (name, outs, e) in [("alpha", &outs_a, &a), ("bravo", &outs_b, &b)] {
        assert!(
            outs.iter().any(|o| matches!(
                o,
                Output::Send(Message::Refuse {
                    reason: replicator_core::wire::RefuseReason::BitmapBlockMismatch,
                    ..
                })
            )),
            "{name}: {outs:?}"
        );
        assert!(
            outs.iter().any(|o| matches!(
                o,
                Output::Event(Event::ProtocolError { detail }) if detail.contains("bytes per bit")
            )),
            "{name} reports the reason: {outs:?}"
        );
        assert_eq!(e.status().connection, ConnState::StandAlone, "{name}");
    }
}

#[test]
fn a_sync_target_whose_disk_fails_waits_longer_before_each_retry() {
    // A SyncTarget whose disk fails its resync writes keeps the blocks
    // marked and asks for nothing more for RESYNC_DISK_RETRY_FIRST_NS, then
    // twice as long after the next failure; `replctl resync` (StartResync)
    // retries at once, and with a sound disk the resync finishes.
    use replicator_core::engine::{RESYNC_DISK_RETRY_FIRST_NS, RESYNC_DISK_RETRY_MAX_NS};
    let requests = |outs: &[Output]| {
        sent(outs)
            .iter()
            .filter(|m| matches!(m, Message::ResyncRequest { .. }))
            .count()
    };
    let mut p = Pair::new(ProtocolMode::C);
    disconnect_write_and_link_up(&mut p);
    // b's disk fails writes where the four ranges are (below 4 MiB).
    let bad = |op: &DiskOp| matches!(op, DiskOp::Write { offset, .. } if *offset < 4 << 20);
    let mut ob = Vec::new();
    p.run_at(Time(0), bad, &mut Vec::new(), &mut ob);
    assert_eq!(p.b.status().replication, ReplState::SyncTarget);
    assert_eq!(requests(&ob), 4, "the first try asks for every range");
    assert_eq!(
        p.b.status().out_of_sync_bytes,
        16384,
        "failed writes clear nothing"
    );

    // Ticks (and pings) until `until`: how many requests b sent meanwhile.
    let tick_until = |p: &mut Pair, now: &mut u64, until: u64| {
        let mut ob = Vec::new();
        while *now < until {
            *now = (*now + 100_000_000).min(until);
            for e in [&mut p.a, &mut p.b] {
                e.handle(Time(*now), Input::Tick);
            }
            p.run_at(Time(*now), bad, &mut Vec::new(), &mut ob);
            let next = p.b.next_deadline().expect("b waits for a tick");
            assert!(next.0 > *now, "a deadline in the past would spin the loop");
        }
        requests(&ob)
    };
    let mut now = 0;
    let first = RESYNC_DISK_RETRY_FIRST_NS;
    let secs = |ns: u64| ns / 1_000_000_000;
    assert_eq!(p.b.status().resync_disk_wait_s, Some(secs(first)));
    assert_eq!(
        tick_until(&mut p, &mut now, first - 1),
        0,
        "no retry before the wait"
    );
    assert_eq!(
        tick_until(&mut p, &mut now, first),
        4,
        "the retry asks again"
    );
    assert_eq!(p.b.status().resync_disk_wait_s, Some(secs(2 * first)));
    assert_eq!(
        tick_until(&mut p, &mut now, 3 * first - 1),
        0,
        "the second wait is twice as long"
    );
    assert_eq!(tick_until(&mut p, &mut now, 3 * first), 4);
    // Then 4, 8 and 16 s, and 16 s from then on: tries at 7, 15, 31, 47,
    // ... 159 s (uncapped it would be 7, 15, 31, 63 and 127 s).
    assert_eq!(secs(RESYNC_DISK_RETRY_MAX_NS), 16);
    let capped = tick_until(&mut p, &mut now, 3 * first + 10 * RESYNC_DISK_RETRY_MAX_NS);
    assert_eq!(
        capped,
        11 * 4,
        "waits stop growing at RESYNC_DISK_RETRY_MAX_NS"
    );
    assert_eq!(p.b.status().replication, ReplState::SyncTarget);
    assert_eq!(p.b.status().resync_disk_wait_s, Some(16));
    assert_eq!(p.a.status().connection, ConnState::Connected);
    assert_eq!(
        p.a.status().resync_disk_wait_s,
        None,
        "only the target waits"
    );

    // A mirrored write elsewhere reaches b's disk, and a flush makes it
    // durable: the disk works, so the next failure waits 1 s again.
    p.a.handle(Time(now), write_req(20, 8 << 20, false));
    p.a.handle(
        Time(now),
        Input::Client {
            id: ClientId(21),
            request: ClientRequest::Flush,
        },
    );
    p.run_at(Time(now), bad, &mut Vec::new(), &mut Vec::new());
    assert_eq!(
        p.b.status().resync_disk_wait_s,
        Some(16),
        "the wait under way goes on"
    );
    // The wait under way (from the try at 159 s) ends at 175 s; that try
    // fails and waits 1 s, not 16.
    assert_eq!(tick_until(&mut p, &mut now, 175 * first), 4);
    assert_eq!(p.b.status().resync_disk_wait_s, Some(secs(first)));

    // The operator's `resync` retries now; the disk works again.
    p.b.handle(Time(now), Input::Admin(AdminCommand::StartResync));
    p.run_at(Time(now), |_| false, &mut Vec::new(), &mut Vec::new());
    assert_eq!(p.b.status().replication, ReplState::Established);
    assert_eq!(p.b.status().out_of_sync_bytes, 0);
    assert_eq!(p.b.status().resync_disk_wait_s, None);
    assert_eq!(p.b.disk_state(), DiskState::UpToDate);
}

#[test]
fn a_sync_source_counts_a_range_synced_only_once_the_target_wrote_it() {
    // As DRBD clears on its resync write ack: the SyncSource clears a
    // range's bits when the target says it wrote the data (ResyncAck), not
    // when it sends it, and marks again what the target's failed flush
    // lost (OutOfSync). So the Primary's out-of-sync figure and progress
    // are the target's, even while the target's disk fails.
    let count =
        |outs: &[Output], f: fn(&Message) -> bool| sent(outs).iter().filter(|m| f(m)).count();
    let mut p = Pair::new(ProtocolMode::C);
    disconnect_write_and_link_up(&mut p);
    let writes_fail = |op: &DiskOp| matches!(op, DiskOp::Write { offset, .. } if *offset < 4 << 20);
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    p.run_at(Time(0), writes_fail, &mut oa, &mut ob);
    assert_eq!(p.a.status().replication, ReplState::SyncSource);
    assert_eq!(count(&oa, |m| matches!(m, Message::ResyncData { .. })), 4);
    assert_eq!(
        count(&ob, |m| matches!(m, Message::ResyncAck { error: 5, .. })),
        4,
        "each failed write is acknowledged as failed"
    );
    assert_eq!(
        p.a.status().out_of_sync_bytes,
        16384,
        "sent but not written: still out of sync on the source"
    );
    assert_eq!(p.a.status().resync.map(|r| r.done_bytes), Some(0));
    assert_eq!(
        p.a.status().peer_disk,
        Some(DiskState::Inconsistent),
        "the source sees the target's disk as it is"
    );
    assert!(p.a.status().peer_resync_disk_wait, "and that it waits");

    // The writes land now, but the flush that ends the resync fails: the
    // target marks the four ranges again, and so does the source.
    p.b.handle(Time(0), Input::Admin(AdminCommand::StartResync));
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    p.run_at(Time(0), |op| *op == DiskOp::Flush, &mut oa, &mut ob);
    assert_eq!(
        count(&ob, |m| matches!(m, Message::ResyncAck { error: 0, .. })),
        4
    );
    assert_eq!(
        count(&ob, |m| matches!(m, Message::OutOfSync { .. })),
        4,
        "the failed flush's losses are told to the source"
    );
    assert_eq!(p.b.status().out_of_sync_bytes, 16384);
    assert_eq!(p.a.status().out_of_sync_bytes, 16384);
    assert_eq!(p.a.status().replication, ReplState::SyncSource);
    assert_eq!(p.a.status().resync.map(|r| r.done_bytes), Some(0));

    // A sound disk: both end at zero, Established.
    p.b.handle(Time(0), Input::Admin(AdminCommand::StartResync));
    p.run(&mut Vec::new(), &mut Vec::new());
    for e in [&p.a, &p.b] {
        assert_eq!(e.status().replication, ReplState::Established);
        assert_eq!(e.status().out_of_sync_bytes, 0);
    }
    assert_eq!(p.b.disk_state(), DiskState::UpToDate);
    assert_eq!(p.a.status().peer_disk, Some(DiskState::UpToDate));
}

#[test]
fn a_resync_ack_the_source_did_not_expect_drops_the_link() {
    // Invariant 7: a ResyncAck while not SyncSource, or for data never
    // sent, is a protocol error, never a clear of the source's bits.
    let closes = |e: &mut Engine| {
        e.handle(
            Time(0),
            Input::PeerFrame(Message::ResyncAck {
                id: RequestId(999),
                error: 0,
            }),
        );
        drain(e)
            .iter()
            .any(|o| matches!(o, Output::CloseLink { .. }))
    };
    let mut p = Pair::new(ProtocolMode::C);
    assert!(closes(&mut p.a), "not SyncSource");

    let mut p = Pair::new(ProtocolMode::C);
    disconnect_write_and_link_up(&mut p);
    let writes_fail = |op: &DiskOp| matches!(op, DiskOp::Write { .. });
    p.run_at(Time(0), writes_fail, &mut Vec::new(), &mut Vec::new());
    assert_eq!(p.a.status().replication, ReplState::SyncSource);
    assert!(closes(&mut p.a), "SyncSource, unknown request");
    assert_eq!(p.a.status().out_of_sync_bytes, 16384);
}

#[test]
fn a_sync_source_that_cannot_read_answers_so_and_the_target_waits() {
    // As DRBD's negative resync reply: a SyncSource whose read fails tells
    // the target (ResyncReadFailed) instead of dropping the link, which
    // reconnected ten times a second and failed again. The target keeps
    // the ranges marked and waits as after its own disk's failure, saying
    // the peer's disk failed; once the source reads again, the resync ends.
    let mut p = Pair::new(ProtocolMode::C);
    disconnect_write_and_link_up(&mut p);
    let a_reads_fail = |me: usize, op: &DiskOp| me == 0 && matches!(op, DiskOp::Read { .. });
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    p.run_failing(Time(0), a_reads_fail, &mut oa, &mut ob);
    let failed = sent(&oa)
        .iter()
        .filter(|m| matches!(m, Message::ResyncReadFailed { error: 5, .. }))
        .count();
    assert_eq!(failed, 4, "one answer per request");
    assert!(
        !oa.iter()
            .chain(&ob)
            .any(|o| matches!(o, Output::CloseLink { .. })),
        "the link stays up"
    );
    assert_eq!(p.a.status().connection, ConnState::Connected);
    assert_eq!(p.b.status().replication, ReplState::SyncTarget);
    let status = p.b.status();
    assert_eq!(status.resync_disk_wait_s, Some(1));
    assert!(
        status.resync_disk_wait_peer,
        "the wait is for the peer's disk"
    );
    for e in [&p.a, &p.b] {
        assert_eq!(e.status().out_of_sync_bytes, 16384);
    }
    // b says so in its State, and a's status shows that its target waits.
    let waits = |m: &Message| matches!(m, Message::State { flags, .. } if flags & STATE_FLAG_RESYNC_DISK_WAIT != 0);
    assert!(sent(&ob).iter().any(waits), "b's State says it waits");
    assert!(p.a.status().peer_resync_disk_wait);

    // Before the wait ends nothing is asked; after it, with the source's
    // disk readable again, the resync finishes.
    let mut ob = Vec::new();
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(999_000_000), Input::Tick);
    }
    p.run_failing(Time(999_000_000), a_reads_fail, &mut Vec::new(), &mut ob);
    assert!(!sent(&ob)
        .iter()
        .any(|m| matches!(m, Message::ResyncRequest { .. })));
    for e in [&mut p.a, &mut p.b] {
        e.handle(Time(1_000_000_000), Input::Tick);
    }
    let mut ob = Vec::new();
    p.run_failing(Time(1_000_000_000), |_, _| false, &mut Vec::new(), &mut ob);
    let first_state = sent(&ob)
        .into_iter()
        .find(|m| matches!(m, Message::State { .. }))
        .expect("b's State at the end of its wait");
    assert!(!waits(&first_state), "the wait is over: {first_state:?}");
    for e in [&p.a, &p.b] {
        assert_eq!(e.status().replication, ReplState::Established);
        assert_eq!(e.status().out_of_sync_bytes, 0);
    }
    assert!(!p.b.status().resync_disk_wait_peer);
    assert!(!p.a.status().peer_resync_disk_wait);

    // A ResyncReadFailed nobody asked for drops the link.
    p.b.handle(
        Time(1_000_000_000),
        Input::PeerFrame(Message::ResyncReadFailed {
            id: RequestId(999),
            error: 5,
        }),
    );
    assert!(drain(&mut p.b)
        .iter()
        .any(|o| matches!(o, Output::CloseLink { .. })));
}
