//! Connection life cycle: Hello, mutual HMAC authentication, State exchange,
//! the generation-UUID decision, the bitmap exchange, then Established /
//! SyncSource / SyncTarget; state updates while connected; and what a lost
//! link means (out-of-sync marks, a new generation for a Primary).
//!
//! Also the dispatcher of every peer frame, which rejects anything out of
//! protocol by dropping the link. Must not touch the data path directly.

use crate::auth::{self, AUTH_NONCE_BYTES};
use crate::bitmap::{Bitmap, MIN_RLE_CHUNK_BYTES};
use crate::generation::{self, Decision, Side, SideFlags, SyncSource, UuidView};
use crate::types::{BlockIndex, DiskState, GenerationUuids, NodeRole};
use crate::wire::{
    Message, RefuseReason, MAX_BITMAP_CHUNK_BYTES, STATE_FLAG_CRASHED_PRIMARY,
    STATE_FLAG_RESYNC_DISK_WAIT, STATE_FLAG_SYNC_PAUSED, WIRE_VERSION,
};

use super::{ConnState, Engine, Event, Output, ReplState};

/// Bytes of run-length code per BitmapChunk we send.
pub const BITMAP_CHUNK_SEND_BYTES: usize = 16 * 1024;
/// BitmapChunks sent and not yet acknowledged (BitmapAck) at most: the
/// exchange of a large bitmap (about 32 MiB of frames for 1 TiB at 4 KiB per
/// bit when incompressible) never queues more than this many chunks.
pub const BITMAP_CHUNKS_IN_FLIGHT: usize = 8;
const _: () = assert!(
    BITMAP_CHUNK_SEND_BYTES <= MAX_BITMAP_CHUNK_BYTES
        && BITMAP_CHUNK_SEND_BYTES >= MIN_RLE_CHUNK_BYTES
);

/// Where the handshake is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    #[default]
    Idle,
    /// Hello/auth/state in progress.
    Negotiating,
    /// Decided; exchanging bitmaps.
    Bitmaps,
    /// Handshake complete.
    Done,
}

/// The peer's reported state.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeerState {
    pub role: NodeRole,
    pub disk: DiskState,
    pub uuids: GenerationUuids,
    pub flags: u32,
    pub out_of_sync_blocks: u64,
}

#[derive(Debug, Default)]
pub(super) struct Handshake {
    pub phase: Phase,
    pub got_hello: bool,
    pub my_nonce: Option<[u8; AUTH_NONCE_BYTES]>,
    pub peer_authenticated: bool,
    pub me_authenticated: bool,
    pub state_sent: bool,
    pub peer_state: Option<PeerState>,
    pub decision: Option<Decision>,
    /// Bitmap received so far from the peer.
    pub rx_bitmap: Option<Bitmap>,
    pub rx_next_block: u64,
    pub rx_done: bool,
    /// First block of our bitmap not yet sent.
    pub tx_next_block: u64,
    /// Our last chunk went out.
    pub tx_done: bool,
    /// End blocks of the chunks sent and not yet acknowledged, oldest first
    /// (at most [`BITMAP_CHUNKS_IN_FLIGHT`]).
    pub tx_unacked: std::collections::VecDeque<u64>,
}

impl Engine {
    pub(super) fn on_connected(&mut self) {
        if self.conn != ConnState::Connecting {
            // StandAlone nodes do not talk; the caller should not connect.
            self.push(Output::CloseLink {
                reason: "not accepting connections (StandAlone)".to_string(),
            });
            return;
        }
        self.set_conn(ConnState::Connected);
        self.hs = super::handshake::Handshake {
            phase: Phase::Negotiating,
            ..Default::default()
        };
        self.last_rx = self.now;
        self.last_ping = self.now;
        let mut nonce = [0u8; AUTH_NONCE_BYTES];
        self.rng.fill(&mut nonce);
        self.hs.my_nonce = Some(nonce);
        self.send(Message::Hello {
            wire_version: WIRE_VERSION,
            resource: self.cfg.resource.clone(),
            node: self.cfg.node.clone(),
            size_bytes: self.cfg.size_bytes,
            bitmap_block_bytes: self.cfg.bitmap_block_bytes,
            protocol: self.cfg.protocol,
            features: 0,
        });
        self.send(Message::AuthChallenge { nonce });
    }

    fn refuse(&mut self, reason: RefuseReason, message: String, standalone: bool) {
        self.send(Message::Refuse {
            reason,
            message: message.clone(),
        });
        self.push(Output::Event(Event::ProtocolError {
            detail: message.clone(),
        }));
        self.push(Output::CloseLink { reason: message });
        self.on_link_lost(standalone);
    }

    pub(super) fn on_peer_frame(&mut self, msg: Message) {
        if self.conn != ConnState::Connected {
            // A frame racing our own close: ignore.
            return;
        }
        let negotiating = self.hs.phase == Phase::Negotiating;
        let authed = self.hs.peer_authenticated;
        match msg {
            Message::Hello {
                wire_version,
                resource,
                node,
                size_bytes,
                bitmap_block_bytes,
                protocol,
                ..
            } => {
                if !negotiating || self.hs.got_hello {
                    return self.protocol_error("unexpected Hello".to_string());
                }
                self.hs.got_hello = true;
                if wire_version != WIRE_VERSION {
                    return self.refuse(
                        RefuseReason::VersionMismatch,
                        format!("peer speaks wire version {wire_version}, we speak {WIRE_VERSION}"),
                        true,
                    );
                }
                if resource != self.cfg.resource || node != self.cfg.peer {
                    return self.refuse(
                        RefuseReason::WrongResource,
                        format!(
                            "peer is {node:?} of {resource:?}, expected {:?} of {:?}",
                            self.cfg.peer, self.cfg.resource
                        ),
                        true,
                    );
                }
                if size_bytes != self.cfg.size_bytes {
                    return self.refuse(
                        RefuseReason::SizeMismatch,
                        format!(
                            "peer exports {size_bytes} bytes, we export {}",
                            self.cfg.size_bytes
                        ),
                        true,
                    );
                }
                if protocol != self.cfg.protocol {
                    return self.refuse(
                        RefuseReason::ProtocolMismatch,
                        format!(
                            "peer replicates with protocol {protocol:?}, we use protocol {:?}",
                            self.cfg.protocol
                        ),
                        true,
                    );
                }
                if bitmap_block_bytes != self.cfg.bitmap_block_bytes {
                    self.refuse(
                        RefuseReason::BitmapBlockMismatch,
                        format!(
                            "peer tracks {bitmap_block_bytes} bytes per bit, we track {}",
                            self.cfg.bitmap_block_bytes
                        ),
                        true,
                    );
                }
            }
            Message::AuthChallenge { nonce } => {
                if !negotiating || !self.hs.got_hello {
                    return self.protocol_error("unexpected AuthChallenge".to_string());
                }
                let mac = auth::response(&self.cfg.secret, &nonce, &self.cfg.node);
                self.send(Message::AuthResponse { mac });
            }
            Message::AuthResponse { mac } => {
                let Some(nonce) = self.hs.my_nonce.take() else {
                    return self.protocol_error("unexpected AuthResponse".to_string());
                };
                if !negotiating || !self.hs.got_hello {
                    return self.protocol_error("AuthResponse before Hello".to_string());
                }
                if let Err(e) = auth::verify(&self.cfg.secret, &nonce, &self.cfg.peer, &mac) {
                    return self.refuse(RefuseReason::WrongSecret, e.to_string(), true);
                }
                self.hs.peer_authenticated = true;
                self.send(Message::AuthOk);
                self.maybe_send_state();
            }
            Message::AuthOk => {
                if !negotiating || self.hs.me_authenticated {
                    return self.protocol_error("unexpected AuthOk".to_string());
                }
                self.hs.me_authenticated = true;
                self.maybe_send_state();
            }
            Message::Refuse { reason, message } => {
                let standalone = !matches!(reason, RefuseReason::Other);
                self.push(Output::Event(Event::ProtocolError {
                    detail: format!("peer refused: {message}"),
                }));
                if reason == RefuseReason::SplitBrain {
                    self.split_brain = true;
                }
                self.push(Output::CloseLink { reason: message });
                self.on_link_lost(standalone);
            }
            Message::Disconnect { reason } => {
                self.push(Output::CloseLink { reason });
                self.on_link_lost(false);
            }
            Message::Ping => self.send(Message::PingAck),
            Message::PingAck => {}
            _ if !authed => self.protocol_error("frame before authentication".to_string()),
            Message::State {
                role,
                disk,
                uuids,
                flags,
                out_of_sync_blocks,
            } => {
                let ps = PeerState {
                    role,
                    disk,
                    uuids,
                    flags,
                    out_of_sync_blocks,
                };
                self.on_peer_state(ps);
            }
            Message::BitmapChunk {
                start_block,
                total_blocks,
                last,
                rle,
            } => self.on_bitmap_chunk(start_block, total_blocks, last, &rle),
            Message::BitmapAck { next_block } => self.on_bitmap_ack(next_block),
            Message::SyncUuid { uuid } => {
                // The peer skipped the initial sync (new-current-uuid
                // --clear-bitmap): adopt its generation when both are empty.
                if generation::uuid_is_empty(self.uuids.current)
                    && self.hs.phase == Phase::Done
                    && self.repl == ReplState::Established
                {
                    self.uuids.current = generation::with_role_bit(uuid, false);
                    self.uuids.bitmap = 0;
                    self.bitmap.clear_all();
                    self.bitmap.mark_all_dirty();
                    self.set_disk(DiskState::UpToDate);
                    self.write_dirty_bitmap_pages();
                    self.write_superblock();
                    self.report_oos();
                    // Tell the peer we are UpToDate now (its status shows it).
                    self.send_state_update();
                }
            }
            _ if self.hs.phase != Phase::Done => {
                self.protocol_error("data frame before the handshake finished".to_string())
            }
            Message::Write {
                id,
                offset,
                flags,
                len_bytes,
                data,
            } => self.on_peer_write(id, offset, flags, len_bytes, data),
            Message::RecvAck { id } => self.on_recv_ack(id),
            Message::WriteAck { id, error } => self.on_write_ack(id, error),
            Message::Barrier { id } => self.on_peer_barrier(id),
            Message::BarrierAck { id, error } => self.on_barrier_ack(id, error),
            Message::OutOfSync { offset, len_bytes } => {
                if !self.range_ok(offset, u64::from(len_bytes)) {
                    return self.protocol_error("OutOfSync outside the device".to_string());
                }
                self.mark_oos(offset, u64::from(len_bytes));
                self.source_range_lost(u64::from(len_bytes));
            }
            Message::ResyncAck { id, error } => self.on_resync_ack(id, error),
            Message::ResyncReadFailed { id, error } => self.on_resync_read_failed(id, error),
            Message::ResyncRequest {
                id,
                offset,
                len_bytes,
            } => self.on_resync_request(id, offset, len_bytes, None),
            Message::ResyncChecksumRequest {
                id,
                offset,
                len_bytes,
                digest,
            } => self.on_resync_request(id, offset, len_bytes, Some(digest)),
            Message::ResyncData { id, offset, data } => {
                self.on_resync_data(id, offset, Some(data), 0)
            }
            Message::ResyncInSync {
                id,
                offset,
                len_bytes,
            } => self.on_resync_data(id, offset, None, len_bytes),
            Message::ResyncDone => self.on_resync_done_from_target(),
            Message::VerifyRequest {
                id,
                offset,
                len_bytes,
            } => self.on_verify_request(id, offset, len_bytes),
            Message::VerifyReply {
                id,
                offset,
                len_bytes,
                digest,
            } => self.on_verify_reply(id, offset, len_bytes, digest),
            Message::VerifyDone => self.on_verify_done_from_peer(),
        }
    }

    fn state_flags(&self) -> u32 {
        let mut f = 0;
        if self.crashed_primary {
            f |= STATE_FLAG_CRASHED_PRIMARY;
        }
        if self.sync_paused {
            f |= STATE_FLAG_SYNC_PAUSED;
        }
        if self.resync_disk_wait_s().is_some() {
            f |= STATE_FLAG_RESYNC_DISK_WAIT;
        }
        f
    }

    /// The peer, our SyncTarget, waits after a disk failure.
    pub(super) fn peer_resync_disk_wait(&self) -> bool {
        self.source.is_some()
            && self
                .hs
                .peer_state
                .is_some_and(|p| p.flags & STATE_FLAG_RESYNC_DISK_WAIT != 0)
    }

    fn my_state_message(&self) -> Message {
        Message::State {
            role: self.role,
            disk: self.disk,
            uuids: self.uuids,
            flags: self.state_flags(),
            out_of_sync_blocks: self.bitmap.count(),
        }
    }

    fn maybe_send_state(&mut self) {
        if self.hs.peer_authenticated && self.hs.me_authenticated && !self.hs.state_sent {
            self.hs.state_sent = true;
            let m = self.my_state_message();
            self.send(m);
            if let Some(ps) = self.hs.peer_state {
                self.decide(ps);
            }
        }
    }

    /// Tell a connected peer about a role / disk / pause change.
    pub(super) fn send_state_update(&mut self) {
        if self.conn == ConnState::Connected && self.hs.state_sent {
            let m = self.my_state_message();
            self.send(m);
        }
    }

    fn on_peer_state(&mut self, ps: PeerState) {
        match self.hs.phase {
            Phase::Negotiating => {
                if self.hs.peer_state.is_some() {
                    return self.protocol_error("duplicate State".to_string());
                }
                self.hs.peer_state = Some(ps);
                if self.hs.state_sent {
                    self.decide(ps);
                }
            }
            Phase::Done | Phase::Bitmaps => {
                // A state update while connected.
                if ps.role == NodeRole::Primary && self.role == NodeRole::Primary {
                    return self.protocol_error("both nodes Primary".to_string());
                }
                self.hs.peer_state = Some(ps);
                self.set_peer(Some(ps.role), Some(ps.disk));
                self.update_paused();
            }
            Phase::Idle => self.protocol_error("State outside a connection".to_string()),
        }
    }

    /// Both States are known: compare generations.
    fn decide(&mut self, ps: PeerState) {
        self.set_peer(Some(ps.role), Some(ps.disk));
        let me = Side {
            uuids: UuidView {
                current: self.uuids.current,
                bitmap: self.uuids.bitmap,
                history: &self.uuids.history,
            },
            flags: SideFlags {
                consistent: self.disk >= DiskState::Outdated,
                crashed_primary: self.crashed_primary,
                primary: self.role == NodeRole::Primary,
                changed_blocks: self.bitmap.count(),
            },
        };
        let peer = Side {
            uuids: UuidView {
                current: ps.uuids.current,
                bitmap: ps.uuids.bitmap,
                history: &ps.uuids.history,
            },
            flags: SideFlags {
                consistent: ps.disk >= DiskState::Outdated,
                crashed_primary: ps.flags & STATE_FLAG_CRASHED_PRIMARY != 0,
                primary: ps.role == NodeRole::Primary,
                changed_blocks: ps.out_of_sync_blocks,
            },
        };
        let i_win_ties = self.cfg.node < self.cfg.peer;
        let d = generation::decide(&me, &peer, self.cfg.split_brain, i_win_ties);
        match d {
            Decision::SplitBrain {
                has_common_ancestor,
            } => {
                self.split_brain = true;
                self.push(Output::Event(Event::SplitBrain {
                    has_common_ancestor,
                }));
                return self.refuse(
                    RefuseReason::SplitBrain,
                    "split brain detected: both nodes wrote independently".to_string(),
                    true,
                );
            }
            Decision::Unrelated => {
                self.push(Output::Event(Event::UnrelatedPeer));
                return self.refuse(
                    RefuseReason::UnrelatedData,
                    "peer holds unrelated data (no common generation)".to_string(),
                    true,
                );
            }
            _ if ps.role == NodeRole::Primary && self.role == NodeRole::Primary => {
                return self.refuse(
                    RefuseReason::Other,
                    "both nodes are Primary (dual-primary is not supported)".to_string(),
                    true,
                );
            }
            Decision::BitmapResync {
                source: SyncSource::Peer,
            }
            | Decision::FullSync {
                source: SyncSource::Peer,
            } if self.role == NodeRole::Primary => {
                return self.refuse(
                    RefuseReason::Other,
                    "the Primary would become SyncTarget; refusing (demote it first)".to_string(),
                    true,
                );
            }
            _ => {}
        }
        self.hs.decision = Some(d);
        self.hs.phase = Phase::Bitmaps;
        if let Decision::FullSync { .. } = d {
            self.bitmap.set_all();
        }
        // Send our bitmap (after a full-sync set_all it is all ones), a
        // window of chunks at a time.
        self.hs.tx_next_block = 0;
        self.hs.tx_done = false;
        self.hs.tx_unacked.clear();
        self.hs.rx_bitmap = Some(
            Bitmap::new(self.cfg.size_bytes, self.cfg.bitmap_block_bytes)
                .expect("config validated at engine start"),
        );
        self.hs.rx_next_block = 0;
        self.hs.rx_done = false;
        self.send_bitmap_window();
    }

    /// Send bitmap chunks until the window is full or the bitmap is sent.
    fn send_bitmap_window(&mut self) {
        let total = self.bitmap.len_blocks();
        while !self.hs.tx_done && self.hs.tx_unacked.len() < BITMAP_CHUNKS_IN_FLIGHT {
            let start = BlockIndex(self.hs.tx_next_block);
            let (rle, next) = self.bitmap.encode_rle(start, BITMAP_CHUNK_SEND_BYTES);
            let last = next.0 >= total;
            self.send(Message::BitmapChunk {
                start_block: start.0,
                total_blocks: total,
                last,
                rle,
            });
            self.hs.tx_unacked.push_back(next.0);
            self.hs.tx_next_block = next.0;
            self.hs.tx_done = last;
        }
    }

    fn on_bitmap_ack(&mut self, next_block: u64) {
        if self.hs.tx_unacked.front() != Some(&next_block) {
            return self.protocol_error(format!(
                "BitmapAck up to block {next_block}, expected {:?}",
                self.hs.tx_unacked.front()
            ));
        }
        self.hs.tx_unacked.pop_front();
        if self.hs.phase == Phase::Bitmaps {
            self.send_bitmap_window();
            self.maybe_finish_handshake();
        }
    }

    fn on_bitmap_chunk(&mut self, start: u64, total: u64, last: bool, rle: &[u8]) {
        if self.hs.phase != Phase::Bitmaps || self.hs.rx_done {
            return self.protocol_error("unexpected BitmapChunk".to_string());
        }
        let expected_total = self.bitmap.len_blocks();
        if total != expected_total || start != self.hs.rx_next_block {
            return self.protocol_error(format!(
                "BitmapChunk at block {start} of {total}, expected {} of {expected_total}",
                self.hs.rx_next_block
            ));
        }
        let rx = self.hs.rx_bitmap.as_mut().expect("bitmap phase");
        match rx.apply_rle(BlockIndex(start), rle) {
            Ok(end) => self.hs.rx_next_block = end.0,
            Err(e) => return self.protocol_error(format!("bad bitmap chunk: {e}")),
        }
        if last && self.hs.rx_next_block != total {
            return self.protocol_error("bitmap ended early".to_string());
        }
        self.send(Message::BitmapAck {
            next_block: self.hs.rx_next_block,
        });
        if last {
            self.hs.rx_done = true;
            self.maybe_finish_handshake();
        }
    }

    /// Both bitmaps are across (ours sent to the end, the peer's received):
    /// finish. Acks of our last chunks may still arrive afterwards.
    fn maybe_finish_handshake(&mut self) {
        if self.hs.phase == Phase::Bitmaps && self.hs.rx_done && self.hs.tx_done {
            self.finish_handshake();
        }
    }

    fn finish_handshake(&mut self) {
        let rx = self.hs.rx_bitmap.take().expect("bitmap received");
        if self.bitmap.merge(&rx).is_err() {
            return self.protocol_error("peer bitmap has another geometry".to_string());
        }
        let d = self.hs.decision.expect("decided");
        self.hs.phase = Phase::Done;
        self.replicating = true;
        self.need_new_uuid = false;
        self.split_brain = false;
        match d {
            Decision::NoSync => {
                if self.disk == DiskState::Consistent {
                    self.set_disk(DiskState::UpToDate);
                }
                if self.disk >= DiskState::Consistent
                    && self
                        .hs
                        .peer_state
                        .is_some_and(|p| p.disk >= DiskState::Consistent)
                {
                    // Same generation, nothing dirty on either side.
                    self.bitmap.clear_all();
                }
                self.set_repl(ReplState::Established);
                self.report_oos();
            }
            Decision::BitmapResync { source } | Decision::FullSync { source } => {
                self.report_oos();
                if source == SyncSource::Me {
                    self.start_sync_source();
                } else {
                    self.start_sync_target();
                }
            }
            Decision::SplitBrain { .. } | Decision::Unrelated => {
                unreachable!("refused before the bitmap exchange")
            }
        }
        self.pump();
    }

    /// The link is gone (peer closed, transport error, protocol error or
    /// operator disconnect). `standalone`: do not reconnect.
    pub(super) fn on_link_lost(&mut self, standalone: bool) {
        let was_connected = self.conn == ConnState::Connected;
        let was_replicating = self.replicating;
        self.replicating = false;
        self.hs = Handshake::default();
        if was_connected || was_replicating {
            self.write_path_link_lost();
            self.resync_link_lost();
        }
        if was_replicating && self.role == super::NodeRole::Primary {
            // A Primary that lost its peer starts a new generation (lazily,
            // on its first write).
            self.need_new_uuid = true;
        }
        self.set_repl(ReplState::Off);
        self.set_peer(None, None);
        if was_replicating {
            // Bits set in RAM for the lost peer are persisted now.
            self.write_dirty_bitmap_pages();
        }
        let next = if standalone || self.conn == ConnState::StandAlone {
            ConnState::StandAlone
        } else {
            ConnState::Connecting
        };
        self.set_conn(next);
        self.pump();
    }

    pub(super) fn update_paused(&mut self) {
        let peer_paused = self
            .hs
            .peer_state
            .is_some_and(|p| p.flags & STATE_FLAG_SYNC_PAUSED != 0);
        let paused = self.sync_paused || peer_paused;
        let r = match (self.repl, paused) {
            (ReplState::SyncSource, true) => ReplState::PausedSyncS,
            (ReplState::SyncTarget, true) => ReplState::PausedSyncT,
            (ReplState::PausedSyncS, false) => ReplState::SyncSource,
            (ReplState::PausedSyncT, false) => ReplState::SyncTarget,
            (r, _) => r,
        };
        self.set_repl(r);
    }
}
