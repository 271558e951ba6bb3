//! Peer input never panics the engine: seeded random streams of messages
//! (valid variants with hostile field values, out-of-order and duplicated
//! frames) are fed to both nodes of an established pair, with their disk
//! operations completed in random order. Every run must end without a panic
//! and with the engine still answering status.
mod common;

use common::*;
use replicator_core::engine::rng::SplitMix64;
use replicator_core::types::{GenerationUuids, ProtocolMode};
use replicator_core::wire::RefuseReason;

fn random_message(r: &mut SplitMix64) -> Message {
    let size = DISK_BYTES;
    let offset = match r.below(4) {
        0 => r.below(size),
        1 => size - 512,
        2 => u64::MAX - r.below(4096),
        _ => r.below(64) * 4096,
    };
    let len = match r.below(4) {
        0 => 0,
        1 => 4096,
        2 => r.below(1 << 21) as u32,
        _ => u32::MAX - r.below(10) as u32,
    };
    let id = RequestId(r.below(64));
    let data_len = (r.below(3) * 2048) as usize;
    let data = Bytes::from(vec![r.below(256) as u8; data_len]);
    let mut digest = [0u8; 32];
    r.fill(&mut digest);
    match r.below(22) {
        0 => Message::Hello {
            wire_version: r.below(3) as u16,
            resource: "r".into(),
            node: if r.chance(1, 2) { "alpha" } else { "bravo" }.into(),
            size_bytes: if r.chance(1, 2) { size } else { r.next_u64() },
            bitmap_block_bytes: 4096,
            protocol: ProtocolMode::from_code(1 + r.below(3) as u8).expect("1..=3"),
            features: 0,
        },
        1 => Message::AuthChallenge { nonce: digest },
        2 => Message::AuthResponse { mac: digest },
        3 => Message::AuthOk,
        4 => Message::State {
            role: if r.chance(1, 2) {
                NodeRole::Primary
            } else {
                NodeRole::Secondary
            },
            disk: DiskState::from_code(r.below(5) as u8).expect("code"),
            uuids: GenerationUuids {
                current: r.below(4),
                bitmap: r.below(4),
                history: [r.below(4), 0, 0, 0],
            },
            flags: r.below(32) as u32,
            out_of_sync_blocks: r.below(100),
        },
        5 => Message::BitmapChunk {
            start_block: r.below(10),
            total_blocks: r.below(10_000),
            last: r.chance(1, 2),
            rle: Bytes::from(vec![r.below(256) as u8; r.below(8) as usize]),
        },
        6 => Message::SyncUuid { uuid: r.next_u64() },
        7 | 8 => Message::Write {
            id: RequestId(r.below(1 << 20)),
            offset,
            flags: r.below(8) as u32,
            len_bytes: if r.chance(1, 2) { data_len as u32 } else { len },
            data,
        },
        9 => Message::RecvAck { id },
        10 => Message::WriteAck {
            id,
            error: r.below(2) as u16,
        },
        11 => Message::Barrier {
            id: RequestId(r.below(1 << 20)),
        },
        12 => Message::BarrierAck { id, error: 0 },
        13 => Message::OutOfSync {
            offset,
            len_bytes: len,
        },
        14 => Message::ResyncRequest {
            id,
            offset,
            len_bytes: len,
        },
        15 => Message::ResyncChecksumRequest {
            id,
            offset,
            len_bytes: len,
            digest,
        },
        16 => Message::ResyncData { id, offset, data },
        17 => Message::ResyncInSync {
            id,
            offset,
            len_bytes: len,
        },
        18 => Message::ResyncDone,
        19 => Message::VerifyRequest {
            id,
            offset,
            len_bytes: len,
        },
        20 => Message::VerifyReply {
            id,
            offset,
            len_bytes: len,
            digest,
        },
        _ => match r.below(5) {
            0 => Message::VerifyDone,
            1 => Message::Ping,
            2 => Message::Refuse {
                reason: RefuseReason::Other,
                message: "x".into(),
            },
            3 => Message::BitmapAck {
                next_block: r.below(8),
            },
            _ => Message::Disconnect { reason: "x".into() },
        },
    }
}

#[test]
fn random_hostile_peer_frames_never_panic_the_engine() {
    // Invariant 7: whatever the peer sends, in whatever order, the engine
    // answers with outputs (often a closed link), never a panic.
    let (mut closes, mut frames) = (0u64, 0u64);
    for seed in 0..60u64 {
        let mut r = SplitMix64::new(seed);
        let mut p = Pair::new(ProtocolMode::C);
        // Some client load on the Primary so acks have something to hit.
        for i in 0..4 {
            p.a.handle(Time(0), write_req(i + 1, i * 8192, r.chance(1, 2)));
        }
        let mut pending: Vec<(usize, OpId, DiskOp)> = Vec::new();
        for step in 0..300u64 {
            let target = r.below(2) as usize;
            let e = if target == 0 { &mut p.a } else { &mut p.b };
            match r.below(10) {
                0 => e.handle(Time(step), Input::Connected),
                1 => e.handle(Time(step), Input::Disconnected),
                2 => e.handle(Time(step * 1_000_000_000), Input::Tick),
                3 if !pending.is_empty() => {
                    let i = r.below(pending.len() as u64) as usize;
                    let (n, op, kind) = pending.swap_remove(i);
                    let data = match kind {
                        DiskOp::Read { len_bytes, .. } => {
                            Bytes::from(vec![0u8; len_bytes as usize])
                        }
                        _ => Bytes::new(),
                    };
                    let e = if n == 0 { &mut p.a } else { &mut p.b };
                    e.handle(
                        Time(step),
                        Input::DiskDone {
                            op,
                            result: Ok(data),
                        },
                    );
                }
                _ => {
                    frames += 1;
                    e.handle(Time(step), Input::PeerFrame(random_message(&mut r)))
                }
            }
            for (n, e) in [(0usize, &mut p.a), (1, &mut p.b)] {
                while let Some(o) = e.poll_output() {
                    match o {
                        Output::Disk { op, kind } => pending.push((n, op, kind)),
                        Output::CloseLink { .. } => closes += 1,
                        _ => {}
                    }
                }
            }
        }
        // Still alive and consistent enough to report.
        let _ = (p.a.status(), p.b.status());
    }
    // The streams really hit the checks (not just ignored frames).
    assert!(
        frames > 10_000 && closes > 100,
        "frames {frames}, closes {closes}"
    );
}
