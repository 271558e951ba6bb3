//! The two send lanes of a peer link: application traffic (writes, acks,
//! the SyncTarget's resync write acks, barriers, state, pings) and resync
//! traffic (resync and verify requests and data). The writer always takes from the application lane first, so client
//! writes and their acks never wait behind bulk resync data.
//!
//! Owns lane classification, the per-lane byte limits and the one ordering
//! rule the priority must not break: an application `Write` (or
//! `OutOfSync`) never overtakes queued resync data for an overlapping range (the peer applies both in
//! arrival order, so overtaking would let old resync data overwrite the new
//! write). Must not do I/O.

use std::collections::VecDeque;

use replicator_core::wire::Message;

/// Most bytes queued in the application lane; more drops the link.
pub const APP_LANE_LIMIT_BYTES: usize = 256 * 1024 * 1024;
/// Most bytes queued in the resync lane; more drops the link.
pub const RESYNC_LANE_LIMIT_BYTES: usize = 64 * 1024 * 1024;
/// Above this many queued application bytes the node stops taking new
/// client requests until the writer catches up.
pub const APP_LANE_HIGH_WATER_BYTES: usize = 32 * 1024 * 1024;
/// Bytes counted per frame on top of its data (header and fields).
pub const FRAME_OVERHEAD_BYTES: usize = 64;

/// Which lane a frame travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    App,
    Resync,
}

/// The lane of `msg`: resync and verify traffic in [`Lane::Resync`],
/// everything else in [`Lane::App`].
pub fn lane_of(msg: &Message) -> Lane {
    match msg {
        Message::ResyncRequest { .. }
        | Message::ResyncChecksumRequest { .. }
        | Message::ResyncData { .. }
        | Message::ResyncInSync { .. }
        | Message::ResyncReadFailed { .. }
        | Message::ResyncDone
        | Message::VerifyRequest { .. }
        | Message::VerifyReply { .. }
        | Message::VerifyDone => Lane::Resync,
        _ => Lane::App,
    }
}

/// Approximate wire size of `msg`, for the lane limits.
pub fn approx_bytes(msg: &Message) -> usize {
    FRAME_OVERHEAD_BYTES
        + match msg {
            Message::Write { data, .. } | Message::ResyncData { data, .. } => data.len(),
            Message::BitmapChunk { rle, .. } => rle.len(),
            _ => 0,
        }
}

/// The data range a frame changes on the peer, if any.
fn data_range(msg: &Message) -> Option<(u64, u64)> {
    match msg {
        Message::Write {
            offset, len_bytes, ..
        }
        | Message::ResyncInSync {
            offset, len_bytes, ..
        }
        | Message::OutOfSync { offset, len_bytes } => {
            Some((*offset, offset.saturating_add(u64::from(*len_bytes))))
        }
        Message::ResyncData { offset, data, .. } => {
            Some((*offset, offset.saturating_add(data.len() as u64)))
        }
        _ => None,
    }
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("the link is closed")]
    Closed,
    #[error(
        "the {lane:?} send lane is full ({limit_bytes} bytes queued): the peer does not keep up"
    )]
    Full { lane: Lane, limit_bytes: usize },
}

/// Both lanes of one link.
#[derive(Debug, Default)]
pub struct Lanes {
    app: VecDeque<Message>,
    resync: VecDeque<Message>,
    app_bytes: usize,
    resync_bytes: usize,
    closed: Option<String>,
}

impl Lanes {
    /// Queues `msg` on its lane.
    pub fn push(&mut self, msg: Message) -> Result<(), PushError> {
        if self.closed.is_some() {
            return Err(PushError::Closed);
        }
        let size = approx_bytes(&msg);
        match lane_of(&msg) {
            Lane::Resync => {
                if self.resync_bytes + size > RESYNC_LANE_LIMIT_BYTES {
                    return Err(PushError::Full {
                        lane: Lane::Resync,
                        limit_bytes: RESYNC_LANE_LIMIT_BYTES,
                    });
                }
                self.resync_bytes += size;
                self.resync.push_back(msg);
            }
            Lane::App => {
                if self.app_bytes + size > APP_LANE_LIMIT_BYTES {
                    return Err(PushError::Full {
                        lane: Lane::App,
                        limit_bytes: APP_LANE_LIMIT_BYTES,
                    });
                }
                if let Some((start, end)) = data_range(&msg) {
                    self.promote_overlapping(start, end);
                }
                self.app_bytes += size;
                self.app.push_back(msg);
            }
        }
        Ok(())
    }

    /// Moves the resync frames up to the last one overlapping `[start, end)`
    /// to the end of the application lane, in their order.
    fn promote_overlapping(&mut self, start: u64, end: u64) {
        let last = self
            .resync
            .iter()
            .rposition(|m| data_range(m).is_some_and(|(s, e)| s < end && start < e));
        if let Some(last) = last {
            for m in self.resync.drain(..=last) {
                let size = approx_bytes(&m);
                self.resync_bytes -= size;
                self.app_bytes += size;
                self.app.push_back(m);
            }
        }
    }

    /// The next frame to send: application lane first.
    pub fn pop(&mut self) -> Option<Message> {
        if let Some(m) = self.app.pop_front() {
            self.app_bytes -= approx_bytes(&m);
            return Some(m);
        }
        let m = self.resync.pop_front()?;
        self.resync_bytes -= approx_bytes(&m);
        Some(m)
    }

    /// No more frames are accepted; the writer sends what is queued, then
    /// closes. The first reason is kept.
    pub fn close(&mut self, reason: &str) {
        if self.closed.is_none() {
            self.closed = Some(reason.to_string());
        }
    }

    pub fn closed_reason(&self) -> Option<String> {
        self.closed.clone()
    }

    pub fn app_bytes(&self) -> usize {
        self.app_bytes
    }

    pub fn resync_bytes(&self) -> usize {
        self.resync_bytes
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use replicator_core::types::RequestId;

    use super::*;

    fn write(id: u64, offset: u64, len: usize) -> Message {
        Message::Write {
            id: RequestId(id),
            offset,
            flags: 0,
            len_bytes: len as u32,
            data: Bytes::from(vec![1u8; len]),
        }
    }

    fn resync_data(id: u64, offset: u64, len: usize) -> Message {
        Message::ResyncData {
            id: RequestId(id),
            offset,
            data: Bytes::from(vec![2u8; len]),
        }
    }

    fn drain(l: &mut Lanes) -> Vec<Message> {
        std::iter::from_fn(|| l.pop()).collect()
    }

    #[test]
    fn app_frames_go_before_queued_resync_frames() {
        // Proves the writer's priority: resync data queued first still goes
        // out after application writes and acks queued later.
        let mut l = Lanes::default();
        l.push(resync_data(1, 0, 4096)).unwrap();
        l.push(resync_data(2, 4096, 4096)).unwrap();
        l.push(write(7, 1 << 20, 4096)).unwrap();
        l.push(Message::WriteAck {
            id: RequestId(3),
            error: 0,
        })
        .unwrap();
        let names: Vec<&str> = drain(&mut l).iter().map(Message::name).collect();
        assert_eq!(names, ["Write", "WriteAck", "ResyncData", "ResyncData"]);
        assert_eq!((l.app_bytes(), l.resync_bytes()), (0, 0));
    }

    #[test]
    fn resync_acks_keep_their_order_with_write_acks_and_out_of_sync() {
        // Proves a SyncTarget's ResyncAck (the source clears the range) and
        // its WriteAck with an error or OutOfSync (the source marks it
        // again) travel in one lane, so a later mark never arrives before
        // an earlier clear; a read failure answers in the resync lane.
        let mut l = Lanes::default();
        let ack = |id| Message::ResyncAck {
            id: RequestId(id),
            error: 0,
        };
        let failed_write = Message::WriteAck {
            id: RequestId(9),
            error: 5,
        };
        let lost = Message::OutOfSync {
            offset: 0,
            len_bytes: 4096,
        };
        for m in [ack(1), failed_write, lost, ack(2)] {
            l.push(m).unwrap();
        }
        let names: Vec<&str> = drain(&mut l).iter().map(Message::name).collect();
        assert_eq!(names, ["ResyncAck", "WriteAck", "OutOfSync", "ResyncAck"]);
        let failed = Message::ResyncReadFailed {
            id: RequestId(3),
            error: 5,
        };
        assert_eq!(lane_of(&failed), Lane::Resync);
    }

    #[test]
    fn app_write_never_overtakes_overlapping_resync_data() {
        // Proves the ordering rule: a write overlapping queued resync data
        // goes after it (and after every resync frame before it), so the
        // peer never applies old resync data over the newer write.
        let mut l = Lanes::default();
        l.push(resync_data(1, 0, 4096)).unwrap();
        l.push(resync_data(2, 8192, 4096)).unwrap();
        l.push(resync_data(3, 65536, 4096)).unwrap();
        l.push(write(9, 10_000, 100)).unwrap();
        let order: Vec<(String, u64)> = drain(&mut l)
            .iter()
            .map(|m| match m {
                Message::ResyncData { id, .. } | Message::Write { id, .. } => {
                    (m.name().to_string(), id.0)
                }
                _ => unreachable!(),
            })
            .collect();
        let expect = [
            ("ResyncData", 1),
            ("ResyncData", 2),
            ("Write", 9),
            ("ResyncData", 3),
        ];
        let expect: Vec<(String, u64)> = expect.iter().map(|(n, i)| (n.to_string(), *i)).collect();
        assert_eq!(order, expect);
    }

    #[test]
    fn full_lane_is_refused_and_closed_lane_refuses_everything() {
        // Proves the lanes are bounded (a full lane is an error the caller
        // turns into a dropped link) and a closed link takes nothing.
        let mut l = Lanes::default();
        let chunk = 1024 * 1024;
        let mut pushed = 0;
        let err = loop {
            match l.push(resync_data(pushed, pushed * chunk as u64, chunk)) {
                Ok(()) => pushed += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(
            err,
            PushError::Full {
                lane: Lane::Resync,
                limit_bytes: RESYNC_LANE_LIMIT_BYTES
            }
        );
        assert!(l.resync_bytes() <= RESYNC_LANE_LIMIT_BYTES);
        l.close("test");
        assert_eq!(l.push(Message::Ping), Err(PushError::Closed));
        assert_eq!(l.closed_reason().as_deref(), Some("test"));
    }
}
