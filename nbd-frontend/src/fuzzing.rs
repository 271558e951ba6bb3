//! Entry points that drive the decoders and state machines over arbitrary
//! bytes, for the cargo-fuzz targets in `nbd-frontend/fuzz` and for the
//! property tests that run them on every `cargo test`.
//!
//! They must never panic on any input; they do assert the server's own
//! output is well-formed (every reply decodes and echoes the right cookie
//! or option), so a panic here is a real bug. No I/O: the in-memory target
//! completes every operation synchronously.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;

use crate::command::{self, error_reply, execute, oversized_write, Command};
use crate::handshake::{ClientFlags, ClientOption, ExportNameReply, OptionReply};
use crate::mem::MemTarget;
use crate::negotiate::{transmission_flags, ExportInfo, Negotiation, SessionParams, Step};
use crate::proto::*;
use crate::target::{BlockTarget, TargetFlags};
use crate::transmission::{Chunk, Incoming, RequestDecoder, SimpleReply};

/// Size of the export the fuzz entry points serve.
pub const FUZZ_EXPORT_BYTES: u64 = 1 << 20;

fn all_flags() -> TargetFlags {
    MemTarget::new(0).flags()
}

/// Runs a whole session over `data`: client flags, options, then (if
/// negotiation reaches transmission) requests.
pub fn handshake(data: &[u8]) {
    let export = ExportInfo {
        name: "fuzz".into(),
        description: "fuzz export".into(),
        size_bytes: FUZZ_EXPORT_BYTES,
        flags: all_flags(),
    };
    let mut negotiation = Negotiation::new(export);
    let mut buf = BytesMut::from(data);
    let flags = match ClientFlags::decode(&mut buf) {
        Ok(Some(f)) => f,
        _ => return,
    };
    let no_zeroes = flags.0 & FLAG_C_NO_ZEROES != 0;
    if negotiation.client_flags(flags).is_err() {
        return;
    }
    let mut out = BytesMut::new();
    loop {
        let opt = match ClientOption::decode(&mut buf) {
            Ok(Some(o)) => o,
            _ => return,
        };
        let code = opt.option;
        out.clear();
        let step = negotiation.handle_option(opt, &mut out);
        if code == OPT_EXPORT_NAME {
            if let Step::Transmission(p) = &step {
                let r = ExportNameReply::decode(no_zeroes, &mut out)
                    .expect("export name reply decodes")
                    .expect("export name reply is whole");
                assert_eq!(r.transmission_flags, p.transmission_flags);
            }
        }
        let mut last = None;
        while !out.is_empty() {
            let r = OptionReply::decode(&mut out)
                .expect("server option reply decodes")
                .expect("server option reply is whole");
            assert_eq!(r.option, code, "reply echoes the option");
            last = Some(r.reply_type);
        }
        if let Some(last) = last {
            assert!(
                last == REP_ACK || last & REP_FLAG_ERROR != 0,
                "final reply is ACK or error"
            );
        }
        match step {
            Step::Continue => {}
            Step::Close(_) => return,
            Step::Transmission(params) => {
                run_requests(params, &mut buf);
                return;
            }
        }
    }
}

/// Runs the transmission phase over `data`. The first byte picks the
/// session (bit 0 structured replies, bit 1 meta context, bit 2 read-only).
pub fn transmission(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let structured = mode & 1 != 0;
    let mut flags = all_flags();
    flags.read_only = mode & 4 != 0;
    let params = SessionParams {
        size_bytes: FUZZ_EXPORT_BYTES,
        transmission_flags: transmission_flags(flags, structured),
        structured_replies: structured,
        base_allocation_id: (structured && mode & 2 != 0).then_some(CONTEXT_ID_BASE_ALLOCATION),
        target_flags: flags,
    };
    run_requests(params, &mut BytesMut::from(rest));
}

fn run_requests(params: SessionParams, buf: &mut BytesMut) {
    let target = MemTarget::with_flags(params.size_bytes, params.target_flags);
    let mut decoder = RequestDecoder::new();
    loop {
        let incoming = match decoder.decode(buf) {
            Ok(Some(i)) => i,
            _ => return,
        };
        let (header, validated) = match incoming {
            Incoming::Request { header, payload } => {
                (header, command::validate(&header, payload, &params))
            }
            Incoming::OversizedWrite { header } => (header, Err(oversized_write(&header))),
        };
        let out = match validated {
            Ok(Command::Disconnect) => return,
            Ok(cmd) => poll_ready(execute(&target, &header, &params, cmd)),
            Err(rej) => error_reply(&header, &params, rej.errno, &rej.message),
        };
        check_reply(header.cookie, params.structured_replies, out.to_bytes());
    }
}

/// Asserts the reply is one well-formed simple reply, or chunks for
/// `cookie` of which exactly the last is DONE.
fn check_reply(cookie: u64, structured: bool, mut reply: BytesMut) {
    if reply.len() >= 4 && reply[..4] == STRUCTURED_REPLY_MAGIC.to_be_bytes() {
        assert!(structured, "chunk sent without structured replies");
        loop {
            let c = Chunk::decode(&mut reply)
                .expect("chunk decodes")
                .expect("chunk is whole");
            assert_eq!(c.header.cookie, cookie);
            if c.header.is_done() {
                assert!(reply.is_empty(), "bytes after the DONE chunk");
                return;
            }
        }
    } else {
        let r = SimpleReply::decode(&mut reply)
            .expect("simple reply decodes")
            .expect("simple reply is whole");
        assert_eq!(r.cookie, cookie);
    }
}

/// Polls a future that must complete without waiting (MemTarget's do).
fn poll_ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory target operation did not complete at once"),
    }
}
