//! Turns decoded requests into target calls and target results into encoded
//! replies: request validation (the bad-input rules of the NBD spec), the
//! `TargetError` → NBD errno mapping, and reply framing (simple or structured).
//!
//! This is the only place that chooses NBD errno values. It does no socket
//! I/O: [`execute`] returns the bytes of one whole reply for the server to
//! write atomically.

use bytes::{Bytes, BytesMut};

use crate::negotiate::SessionParams;
use crate::proto::*;
use crate::target::{BlockTarget, Extent, ReadPiece, TargetError, MAX_READ_PIECES};
use crate::transmission::{
    encode_block_status, encode_error_chunk, encode_none, encode_offset_data_header,
    encode_offset_hole, RequestHeader, SimpleReply, WireExtent,
};

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len_bytes: u32,
        /// DF: the reply must be one chunk (no OFFSET_HOLE fragments).
        df: bool,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len_bytes: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len_bytes: u32,
    },
    WriteZeroes {
        offset: u64,
        len_bytes: u32,
        may_punch: bool,
        fast: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len_bytes: u32,
        req_one: bool,
        context_id: u32,
    },
}

/// Why a request is refused before reaching the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub message: String,
}

fn reject(errno: u32, message: impl Into<String>) -> Rejection {
    Rejection {
        errno,
        message: message.into(),
    }
}

/// The command flags each command accepts (FUA is accepted everywhere).
fn allowed_flags(command: u16, p: &SessionParams) -> u16 {
    let mut f = CMD_FLAG_FUA;
    match command {
        CMD_READ if p.structured_replies => f |= CMD_FLAG_DF,
        CMD_WRITE_ZEROES => {
            f |= CMD_FLAG_NO_HOLE;
            if p.transmission_flags & TFLAG_SEND_FAST_ZERO != 0 {
                f |= CMD_FLAG_FAST_ZERO;
            }
        }
        CMD_BLOCK_STATUS => f |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    f
}

/// Name of a command for messages and logs.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// Checks a request against the export, in the order: command, flags,
/// support, read-only, length, range.
pub fn validate(
    h: &RequestHeader,
    payload: Bytes,
    p: &SessionParams,
) -> Result<Command, Rejection> {
    let name = command_name(h.command);
    if name == "unknown" {
        return Err(reject(EINVAL, format!("unknown command {}", h.command)));
    }
    if h.command == CMD_DISC {
        return Ok(Command::Disconnect);
    }
    let bad_flags = h.flags & !allowed_flags(h.command, p);
    if bad_flags != 0 {
        return Err(reject(
            EINVAL,
            format!("flags {bad_flags:#x} are not valid for {name}"),
        ));
    }
    let t = p.target_flags;
    // Read-only first: a read-only export need not advertise TRIM or
    // WRITE_ZEROES, and the reason they fail there is that it is read-only.
    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && t.read_only {
        return Err(reject(EPERM, format!("{name} on a read-only export")));
    }
    let unsupported = match h.command {
        CMD_TRIM => !t.can_trim,
        CMD_WRITE_ZEROES => !t.can_zero,
        CMD_BLOCK_STATUS => p.base_allocation_id.is_none(),
        _ => false,
    };
    if unsupported {
        let why = if h.command == CMD_BLOCK_STATUS {
            "BLOCK_STATUS needs structured replies and a selected meta context"
        } else {
            "this export does not support it"
        };
        return Err(reject(EINVAL, format!("{name}: {why}")));
    }
    if h.command == CMD_FLUSH {
        if h.offset != 0 || h.length != 0 {
            return Err(reject(EINVAL, "FLUSH must have offset and length 0"));
        }
        return Ok(Command::Flush);
    }
    if h.command == CMD_READ && h.length > MAX_PAYLOAD_BYTES {
        return Err(reject(
            EINVAL,
            format!(
                "READ of {} bytes exceeds the maximum payload of {MAX_PAYLOAD_BYTES}",
                h.length
            ),
        ));
    }
    let end = h.offset.checked_add(u64::from(h.length));
    if end.is_none_or(|e| e > p.size_bytes) {
        let errno = if matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err(reject(
            errno,
            format!(
                "{name} of {} bytes at offset {} runs past the end of the export ({} bytes)",
                h.length, h.offset, p.size_bytes
            ),
        ));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len_bytes) = (h.offset, h.length);
    Ok(match h.command {
        CMD_READ => Command::Read {
            offset,
            len_bytes,
            df: h.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write {
            offset,
            data: payload,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset,
            len_bytes,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, len_bytes },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len_bytes,
            may_punch: h.flags & CMD_FLAG_NO_HOLE == 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
            fua,
        },
        CMD_BLOCK_STATUS => {
            if len_bytes == 0 {
                return Err(reject(EINVAL, "BLOCK_STATUS of 0 bytes"));
            }
            Command::BlockStatus {
                offset,
                len_bytes,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                context_id: p.base_allocation_id.expect("checked above"),
            }
        }
        _ => unreachable!("every known command is handled above"),
    })
}

/// The rejection for a WRITE whose payload was over [`MAX_PAYLOAD_BYTES`]
/// and was drained. EINVAL, as qemu's server answers (the spec permits
/// EINVAL, EOVERFLOW or ENOMEM; EOVERFLOW is kept for DF cases).
pub fn oversized_write(h: &RequestHeader) -> Rejection {
    reject(
        EINVAL,
        format!(
            "WRITE of {} bytes exceeds the maximum payload of {MAX_PAYLOAD_BYTES}",
            h.length
        ),
    )
}

/// Maps a target failure to the NBD errno the spec names. `fast_zero` says
/// whether the request asked for FAST_ZERO (the only case where ENOTSUP is allowed).
pub fn errno_for(err: &TargetError, fast_zero: bool) -> u32 {
    match err {
        TargetError::Io { source, .. } => match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
            _ => EIO,
        },
        TargetError::ReadOnly => EPERM,
        TargetError::NoSpace { .. } => ENOSPC,
        TargetError::NotFast if fast_zero => ENOTSUP,
        TargetError::NotFast => EIO,
        TargetError::ShuttingDown => ESHUTDOWN,
        TargetError::Unavailable(_) => EIO,
    }
}

/// One whole reply, written atomically: `head` then `data` (READ payload),
/// then each further (head, data) piece of `more` (the other chunks of a
/// fragmented READ reply).
#[derive(Debug, Default)]
pub struct Outgoing {
    pub head: BytesMut,
    pub data: Bytes,
    pub more: Vec<(BytesMut, Bytes)>,
}

impl Outgoing {
    /// Every (head, data) piece, in wire order.
    pub fn pieces(&self) -> impl Iterator<Item = (&[u8], &Bytes)> {
        std::iter::once((&self.head[..], &self.data))
            .chain(self.more.iter().map(|(h, d)| (&h[..], d)))
    }

    pub fn len_bytes(&self) -> usize {
        self.pieces().map(|(h, d)| h.len() + d.len()).sum()
    }

    /// The whole reply in one buffer (tests and fuzzers).
    pub fn to_bytes(&self) -> BytesMut {
        let mut all = BytesMut::with_capacity(self.len_bytes());
        for (h, d) in self.pieces() {
            all.extend_from_slice(h);
            all.extend_from_slice(d);
        }
        all
    }
}

/// Encodes an error reply; READ and BLOCK_STATUS get an ERROR chunk when
/// structured replies are on (a simple reply to READ is then forbidden).
pub fn error_reply(h: &RequestHeader, p: &SessionParams, errno: u32, message: &str) -> Outgoing {
    let mut out = Outgoing::default();
    let structured = p.structured_replies && matches!(h.command, CMD_READ | CMD_BLOCK_STATUS);
    if structured {
        encode_error_chunk(h.cookie, REPLY_FLAG_DONE, errno, message, &mut out.head);
    } else {
        SimpleReply {
            error: errno,
            cookie: h.cookie,
        }
        .encode(&mut out.head);
    }
    out
}

fn ok_reply(cookie: u64) -> Outgoing {
    let mut out = Outgoing::default();
    SimpleReply { error: 0, cookie }.encode(&mut out.head);
    out
}

/// Runs a validated command on the target and encodes its reply.
/// [`Command::Disconnect`] is the caller's business and must not reach here.
pub async fn execute<T: BlockTarget>(
    target: &T,
    h: &RequestHeader,
    p: &SessionParams,
    cmd: Command,
) -> Outgoing {
    let fail = |e: TargetError, fast: bool| error_reply(h, p, errno_for(&e, fast), &e.to_string());
    match cmd {
        Command::Read {
            offset,
            len_bytes,
            df,
        } => {
            if len_bytes == 0 {
                return read_reply(h, p, offset, Bytes::new());
            }
            if p.structured_replies && !df {
                return match target.read_sparse(offset, len_bytes).await {
                    Ok(pieces) => {
                        sparse_read_reply(h, offset, len_bytes, pieces).unwrap_or_else(|why| {
                            error_reply(h, p, EIO, &format!("target read: {why}"))
                        })
                    }
                    Err(e) => fail(e, false),
                };
            }
            match target.read(offset, len_bytes).await {
                Ok(data) if data.len() == len_bytes as usize => read_reply(h, p, offset, data),
                Ok(data) => error_reply(
                    h,
                    p,
                    EIO,
                    &format!(
                        "target returned {} bytes for a {len_bytes}-byte read",
                        data.len()
                    ),
                ),
                Err(e) => fail(e, false),
            }
        }
        Command::Write { offset, data, fua } => {
            if data.is_empty() {
                return ok_reply(h.cookie);
            }
            match target.write(offset, data, fua).await {
                Ok(()) => ok_reply(h.cookie),
                Err(e) => fail(e, false),
            }
        }
        Command::Flush => match target.flush().await {
            Ok(()) => ok_reply(h.cookie),
            Err(e) => fail(e, false),
        },
        Command::Trim {
            offset,
            len_bytes,
            fua,
        } => {
            if len_bytes == 0 {
                return ok_reply(h.cookie);
            }
            match target.trim(offset, u64::from(len_bytes), fua).await {
                Ok(()) => ok_reply(h.cookie),
                Err(e) => fail(e, false),
            }
        }
        Command::Cache { offset, len_bytes } => {
            // CACHE is a hint: a target that does not cache answers success.
            if len_bytes == 0 || !p.target_flags.can_cache {
                return ok_reply(h.cookie);
            }
            match target.cache(offset, u64::from(len_bytes)).await {
                Ok(()) => ok_reply(h.cookie),
                Err(e) => fail(e, false),
            }
        }
        Command::WriteZeroes {
            offset,
            len_bytes,
            may_punch,
            fast,
            fua,
        } => {
            if len_bytes == 0 {
                return ok_reply(h.cookie);
            }
            match target
                .write_zeroes(offset, u64::from(len_bytes), may_punch, fast, fua)
                .await
            {
                Ok(()) => ok_reply(h.cookie),
                Err(e) => fail(e, fast),
            }
        }
        Command::BlockStatus {
            offset,
            len_bytes,
            req_one,
            context_id,
        } => match target.block_status(offset, u64::from(len_bytes)).await {
            Ok(extents) => {
                let wire = clip_extents(&extents, len_bytes, req_one);
                if wire.is_empty() {
                    return error_reply(h, p, EIO, "target returned no extents");
                }
                let mut out = Outgoing::default();
                encode_block_status(h.cookie, REPLY_FLAG_DONE, context_id, &wire, &mut out.head);
                out
            }
            Err(e) => fail(e, false),
        },
        Command::Disconnect => {
            unreachable!("DISC is handled by the connection, never executed")
        }
    }
}

fn read_reply(h: &RequestHeader, p: &SessionParams, offset: u64, data: Bytes) -> Outgoing {
    let mut out = Outgoing::default();
    if !p.structured_replies {
        SimpleReply {
            error: 0,
            cookie: h.cookie,
        }
        .encode(&mut out.head);
    } else if data.is_empty() {
        encode_none(h.cookie, &mut out.head);
    } else {
        // One OFFSET_DATA chunk: never fragmented, so DF is honoured for every
        // read up to MAX_PAYLOAD_BYTES, beyond the DF_UNFRAGMENTED_BYTES the
        // spec requires; EOVERFLOW is therefore never needed.
        encode_offset_data_header(
            h.cookie,
            REPLY_FLAG_DONE,
            offset,
            data.len() as u32,
            &mut out.head,
        );
    }
    out.data = data;
    out
}

/// Encodes a READ reply from the target's pieces: OFFSET_DATA for data,
/// OFFSET_HOLE for holes, DONE on the last. Pieces that do not cover
/// exactly `len_bytes` (or an empty piece) are the target's bug, reported
/// as `Err` so the client gets EIO rather than a wrong reply.
fn sparse_read_reply(
    h: &RequestHeader,
    offset: u64,
    len_bytes: u32,
    pieces: Vec<ReadPiece>,
) -> Result<Outgoing, String> {
    let total: u64 = pieces.iter().map(ReadPiece::len_bytes).sum();
    if total != u64::from(len_bytes) || pieces.iter().any(|p| p.len_bytes() == 0) {
        return Err(format!(
            "{} pieces of {total} bytes for a {len_bytes}-byte read",
            pieces.len()
        ));
    }
    if pieces.len() > MAX_READ_PIECES {
        return Err(format!(
            "{} pieces, more than {MAX_READ_PIECES}",
            pieces.len()
        ));
    }
    let mut out = Outgoing::default();
    let last = pieces.len() - 1;
    let mut at = offset;
    for (i, piece) in pieces.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let mut head = BytesMut::new();
        let n = piece.len_bytes();
        let data = match piece {
            ReadPiece::Data(d) => {
                encode_offset_data_header(h.cookie, flags, at, d.len() as u32, &mut head);
                d
            }
            ReadPiece::Hole(n) => {
                encode_offset_hole(h.cookie, flags, at, n, &mut head);
                Bytes::new()
            }
        };
        at += n;
        if i == 0 {
            out.head = head;
            out.data = data;
        } else {
            out.more.push((head, data));
        }
    }
    Ok(out)
}

/// Converts target extents to wire extents covering at most `len_bytes`:
/// zero-length extents are dropped, the last one is clipped to the request,
/// at most [`MAX_BLOCK_STATUS_EXTENTS`] (or 1 with REQ_ONE) are kept.
pub fn clip_extents(extents: &[Extent], len_bytes: u32, req_one: bool) -> Vec<WireExtent> {
    let max = if req_one { 1 } else { MAX_BLOCK_STATUS_EXTENTS };
    let mut remaining = u64::from(len_bytes);
    let mut wire = Vec::new();
    for e in extents {
        if remaining == 0 || wire.len() == max {
            break;
        }
        let length = e.length_bytes.min(remaining);
        if length == 0 {
            continue;
        }
        remaining -= length;
        let mut flags = 0;
        if e.hole {
            flags |= STATE_HOLE;
        }
        if e.zero {
            flags |= STATE_ZERO;
        }
        wire.push(WireExtent {
            length: length as u32,
            flags,
        });
    }
    wire
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::TargetFlags;

    fn flags() -> TargetFlags {
        TargetFlags {
            read_only: false,
            can_flush: true,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_cache: true,
            can_multi_conn: true,
            rotational: false,
        }
    }

    fn params(structured: bool, ctx: bool) -> SessionParams {
        SessionParams {
            size_bytes: 1 << 20,
            transmission_flags: crate::negotiate::transmission_flags(flags(), structured),
            structured_replies: structured,
            base_allocation_id: ctx.then_some(1),
            target_flags: flags(),
        }
    }

    fn hdr(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn errno(h: RequestHeader, p: &SessionParams) -> u32 {
        validate(&h, Bytes::new(), p).unwrap_err().errno
    }

    #[test]
    fn bad_input_table_gives_the_spec_errno() {
        // Proves each validation row of the bad-input table picks its errno.
        let p = params(true, true);
        let size = p.size_bytes;
        assert_eq!(errno(hdr(99, 0, 0, 0), &p), EINVAL, "unknown command");
        assert_eq!(
            errno(hdr(CMD_READ, 1 << 9, 0, 1), &p),
            EINVAL,
            "unknown flag"
        );
        assert_eq!(
            errno(hdr(CMD_WRITE, CMD_FLAG_DF, 0, 0), &p),
            EINVAL,
            "DF on WRITE"
        );
        assert_eq!(errno(hdr(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 1), &p), EINVAL);
        assert_eq!(errno(hdr(CMD_WRITE, 0, size, 1), &p), ENOSPC);
        assert_eq!(errno(hdr(CMD_WRITE_ZEROES, 0, size - 1, 2), &p), ENOSPC);
        assert_eq!(errno(hdr(CMD_READ, 0, size, 1), &p), EINVAL);
        assert_eq!(errno(hdr(CMD_TRIM, 0, u64::MAX, 2), &p), EINVAL);
        assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, size, 1), &p), EINVAL);
        assert_eq!(errno(hdr(CMD_BLOCK_STATUS, 0, 0, 0), &p), EINVAL);
        assert_eq!(
            errno(hdr(CMD_READ, 0, 0, MAX_PAYLOAD_BYTES + 1), &p),
            EINVAL
        );
        assert_eq!(errno(hdr(CMD_FLUSH, 0, 1, 0), &p), EINVAL);
        assert_eq!(
            errno(hdr(CMD_BLOCK_STATUS, 0, 0, 1), &params(true, false)),
            EINVAL
        );
        assert_eq!(
            errno(hdr(CMD_READ, CMD_FLAG_DF, 0, 1), &params(false, false)),
            EINVAL
        );
        let mut ro = params(true, true);
        ro.target_flags.read_only = true;
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(hdr(cmd, 0, 0, 1), &ro), EPERM);
        }
        // A read-only export that advertises neither TRIM nor WRITE_ZEROES
        // (the replicated one) still answers them EPERM, not EINVAL.
        ro.target_flags.can_trim = false;
        ro.target_flags.can_zero = false;
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(hdr(cmd, 0, 0, 1), &ro), EPERM);
        }
        assert!(validate(&hdr(CMD_READ, CMD_FLAG_FUA, 0, 1), Bytes::new(), &ro).is_ok());
        assert!(validate(
            &hdr(CMD_READ, CMD_FLAG_FUA | CMD_FLAG_DF, size - 1, 1),
            Bytes::new(),
            &p
        )
        .is_ok());
        assert!(validate(
            &hdr(
                CMD_WRITE_ZEROES,
                CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                0,
                1
            ),
            Bytes::new(),
            &p
        )
        .is_ok());
    }

    #[test]
    fn fast_zero_flag_is_invalid_when_not_advertised() {
        // Proves FAST_ZERO is refused with EINVAL on an export without SEND_FAST_ZERO.
        let mut p = params(true, true);
        p.target_flags.can_fast_zero = false;
        p.transmission_flags = crate::negotiate::transmission_flags(p.target_flags, true);
        assert_eq!(
            errno(hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &p),
            EINVAL
        );
    }

    #[test]
    fn target_errors_map_to_the_spec_errno() {
        // Proves the TargetError -> errno table, incl. ENOTSUP only for FAST_ZERO.
        let io = |code| TargetError::Io {
            op: "write",
            offset: 0,
            len_bytes: 1,
            source: std::io::Error::from_raw_os_error(code),
        };
        assert_eq!(errno_for(&io(libc::ENOSPC), false), ENOSPC);
        assert_eq!(errno_for(&io(libc::EDQUOT), false), ENOSPC);
        assert_eq!(errno_for(&io(libc::EFBIG), false), ENOSPC);
        assert_eq!(errno_for(&io(libc::EIO), false), EIO);
        assert_eq!(errno_for(&TargetError::ReadOnly, false), EPERM);
        assert_eq!(
            errno_for(
                &TargetError::NoSpace {
                    offset: 0,
                    len_bytes: 1
                },
                false
            ),
            ENOSPC
        );
        assert_eq!(errno_for(&TargetError::NotFast, true), ENOTSUP);
        assert_eq!(errno_for(&TargetError::NotFast, false), EIO);
        assert_eq!(errno_for(&TargetError::ShuttingDown, false), ESHUTDOWN);
        assert_eq!(errno_for(&TargetError::Unavailable("x".into()), false), EIO);
    }

    #[test]
    fn extents_are_clipped_to_the_request_and_req_one() {
        // Proves block status never runs past the request, drops empty extents, honours REQ_ONE.
        let ext = |len, hole| Extent {
            length_bytes: len,
            hole,
            zero: hole,
        };
        let e = [ext(0, false), ext(100, true), ext(1 << 40, false)];
        let w = clip_extents(&e, 150, false);
        assert_eq!(
            w,
            vec![
                WireExtent {
                    length: 100,
                    flags: STATE_HOLE | STATE_ZERO
                },
                WireExtent {
                    length: 50,
                    flags: 0
                }
            ]
        );
        assert_eq!(clip_extents(&e, 150, true).len(), 1);
        assert!(clip_extents(&[ext(0, false)], 10, false).is_empty());
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn read_cmd(offset: u64, len_bytes: u32, df: bool) -> Command {
        Command::Read {
            offset,
            len_bytes,
            df,
        }
    }

    #[test]
    fn sparse_read_goes_out_as_hole_data_hole_chunks_with_done_last() {
        // Proves a structured READ over a hole, written data and a hole is
        // three chunks (golden bytes), DONE only on the last, and that DF
        // or simple replies give one whole data reply instead.
        let t = crate::mem::MemTarget::with_flags(1 << 20, flags());
        let bs = crate::mem::MEM_BLOCK_BYTES;
        run(t.write(bs, Bytes::from(vec![0xab; bs as usize]), false)).unwrap();
        // The three blocks, DF or not, structured replies or simple.
        let read3 = |df: bool, structured: bool| {
            let flags = if df { CMD_FLAG_DF } else { 0 };
            let h = hdr(CMD_READ, flags, 0, 3 * bs as u32);
            run(execute(
                &t,
                &h,
                &params(structured, false),
                read_cmd(0, 3 * bs as u32, df),
            ))
        };
        let out = read3(false, true);
        let mut want = BytesMut::new();
        encode_offset_hole(1, 0, 0, bs as u32, &mut want);
        encode_offset_data_header(1, 0, bs, bs as u32, &mut want);
        want.extend_from_slice(&vec![0xab; bs as usize]);
        encode_offset_hole(1, REPLY_FLAG_DONE, 2 * bs, bs as u32, &mut want);
        assert_eq!(out.to_bytes(), want);
        assert_eq!(out.len_bytes(), want.len());
        // Golden: the first chunk, an OFFSET_HOLE of one block at 0.
        let mut first = BytesMut::new();
        encode_offset_hole(1, 0, 0, bs as u32, &mut first);
        assert_eq!(
            &first[..],
            &[
                0x66, 0x8e, 0x33, 0xef, // structured reply magic
                0, 0, 0, 2, // flags, OFFSET_HOLE
                0, 0, 0, 0, 0, 0, 0, 1, // cookie
                0, 0, 0, 12, // length
                0, 0, 0, 0, 0, 0, 0, 0, // offset
                0, 0, 0x10, 0, // hole length
            ][..]
        );
        let out = read3(true, true);
        assert!(out.more.is_empty(), "DF reply fragmented");
        assert_eq!(out.data.len(), 3 * bs as usize);
        let out = read3(false, false);
        assert!(out.more.is_empty(), "simple reply fragmented");
        assert_eq!(out.head.len(), SIMPLE_REPLY_HEADER_BYTES);
    }

    #[test]
    fn pieces_that_do_not_tile_the_read_are_an_eio_error_chunk() {
        // Proves a target's wrong pieces (short, long, empty, too many)
        // become an EIO ERROR chunk, never a reply that lies about data.
        let h = hdr(CMD_READ, 0, 0, 8);
        let data = |n: usize| ReadPiece::Data(Bytes::from(vec![1; n]));
        for pieces in [
            vec![data(4)],
            vec![data(4), ReadPiece::Hole(8)],
            vec![data(8), ReadPiece::Hole(0)],
            vec![ReadPiece::Hole(0), data(8)],
        ] {
            assert!(sparse_read_reply(&h, 0, 8, pieces).is_err());
        }
        let many = vec![ReadPiece::Hole(1); MAX_READ_PIECES + 1];
        let n = many.len() as u32;
        assert!(sparse_read_reply(&hdr(CMD_READ, 0, 0, n), 0, n, many).is_err());
        let ok = sparse_read_reply(&h, 0, 8, vec![ReadPiece::Hole(3), data(5)]).unwrap();
        assert_eq!(ok.more.len(), 1);
    }
}
