//! The fixed-newstyle negotiation state machine: decides the reply to every
//! option and when transmission starts or the session ends.
//!
//! Pure and synchronous: options in, encoded replies out (into a `BytesMut`)
//! plus a [`Step`]. It owns the per-session option state (NO_ZEROES,
//! structured replies, selected meta context). It must not do I/O; the
//! server feeds it decoded options and writes out what it produces.

use bytes::BytesMut;

use crate::handshake::{
    ClientFlags, ClientOption, ExportNameReply, Greeting, HandshakeError, Info, InfoRequest,
    MetaContextEntry, MetaContextRequest, OptionReply, ServerEntry,
};
use crate::proto::*;
use crate::target::TargetFlags;

/// What the negotiation knows about the one export it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub flags: TargetFlags,
}

/// What transmission needs from the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// The id of `base:allocation` when the client selected it.
    pub base_allocation_id: Option<u32>,
    pub target_flags: TargetFlags,
}

/// What the server does after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Keep reading options.
    Continue,
    /// Send what was produced, then close the connection.
    Close(String),
    /// Send what was produced, then enter transmission.
    Transmission(SessionParams),
}

/// The transmission flags advertised for an export.
pub fn transmission_flags(flags: TargetFlags, structured_replies: bool) -> u16 {
    let mut t = TFLAG_HAS_FLAGS;
    if flags.read_only {
        t |= TFLAG_READ_ONLY;
    }
    if flags.can_flush {
        t |= TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    }
    if flags.rotational {
        t |= TFLAG_ROTATIONAL;
    }
    if flags.can_trim {
        t |= TFLAG_SEND_TRIM;
    }
    if flags.can_zero {
        t |= TFLAG_SEND_WRITE_ZEROES;
        if flags.can_fast_zero {
            t |= TFLAG_SEND_FAST_ZERO;
        }
    }
    if structured_replies {
        t |= TFLAG_SEND_DF;
    }
    if flags.can_multi_conn {
        t |= TFLAG_CAN_MULTI_CONN;
    }
    if flags.can_cache {
        t |= TFLAG_SEND_CACHE;
    }
    t
}

/// One session's negotiation.
#[derive(Debug)]
pub struct Negotiation {
    export: ExportInfo,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured_replies: bool,
    base_allocation_selected: bool,
}

impl Negotiation {
    pub fn new(export: ExportInfo) -> Self {
        Self {
            export,
            fixed_newstyle: false,
            no_zeroes: false,
            structured_replies: false,
            base_allocation_selected: false,
        }
    }

    pub fn encode_greeting(out: &mut BytesMut) {
        Greeting {
            handshake_flags: SERVER_HANDSHAKE_FLAGS,
        }
        .encode(out);
    }

    /// Accepts the client's flags; an unknown flag must close the session.
    pub fn client_flags(&mut self, flags: ClientFlags) -> Result<(), HandshakeError> {
        flags.validate()?;
        self.fixed_newstyle = flags.0 & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags.0 & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    fn is_our_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.export.name
    }

    fn params(&self) -> SessionParams {
        SessionParams {
            size_bytes: self.export.size_bytes,
            transmission_flags: transmission_flags(self.export.flags, self.structured_replies),
            structured_replies: self.structured_replies,
            base_allocation_id: (self.structured_replies && self.base_allocation_selected)
                .then_some(CONTEXT_ID_BASE_ALLOCATION),
            target_flags: self.export.flags,
        }
    }

    /// Handles one option, appending every reply to `out`.
    pub fn handle_option(&mut self, opt: ClientOption, out: &mut BytesMut) -> Step {
        let code = opt.option;
        if !self.fixed_newstyle && code != OPT_EXPORT_NAME {
            // Plain newstyle has no error replies: the only way to refuse is to close.
            return Step::Close(format!(
                "option {code} from a client without FIXED_NEWSTYLE"
            ));
        }
        let reply = |r: OptionReply, out: &mut BytesMut| r.encode(out);
        let err = |ty: u32, msg: &str, out: &mut BytesMut| {
            OptionReply::error(code, ty, msg).encode(out);
            Step::Continue
        };
        match code {
            OPT_EXPORT_NAME => {
                let name = match std::str::from_utf8(&opt.data) {
                    Ok(n) if n.len() <= MAX_STRING_BYTES => n,
                    _ => return Step::Close("EXPORT_NAME with an invalid name".into()),
                };
                if !self.is_our_export(name) {
                    return Step::Close(format!("EXPORT_NAME for unknown export {name:?}"));
                }
                ExportNameReply {
                    size_bytes: self.export.size_bytes,
                    transmission_flags: self.params().transmission_flags,
                }
                .encode(self.no_zeroes, out);
                Step::Transmission(self.params())
            }
            OPT_ABORT => {
                reply(OptionReply::ack(code), out);
                Step::Close("client sent ABORT".into())
            }
            OPT_LIST => {
                if !opt.data.is_empty() {
                    return err(REP_ERR_INVALID, "LIST takes no data", out);
                }
                let entry = ServerEntry {
                    name: self.export.name.clone(),
                    description: self.export.description.clone(),
                };
                reply(
                    OptionReply {
                        option: code,
                        reply_type: REP_SERVER,
                        data: entry.encode(),
                    },
                    out,
                );
                reply(OptionReply::ack(code), out);
                Step::Continue
            }
            OPT_STARTTLS => {
                if !opt.data.is_empty() {
                    return err(REP_ERR_INVALID, "STARTTLS takes no data", out);
                }
                err(REP_ERR_POLICY, "TLS is not supported by this server", out)
            }
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::parse(&opt.data) {
                    Ok(r) => r,
                    Err(e) => return err(REP_ERR_INVALID, &e.to_string(), out),
                };
                if !self.is_our_export(&req.export_name) {
                    return err(
                        REP_ERR_UNKNOWN,
                        &format!("no export named {:?}", req.export_name),
                        out,
                    );
                }
                for info in self.infos(&req.info_types) {
                    reply(
                        OptionReply {
                            option: code,
                            reply_type: REP_INFO,
                            data: info.encode(),
                        },
                        out,
                    );
                }
                reply(OptionReply::ack(code), out);
                if code == OPT_GO {
                    Step::Transmission(self.params())
                } else {
                    Step::Continue
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !opt.data.is_empty() {
                    return err(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data", out);
                }
                if self.structured_replies {
                    return err(
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                        out,
                    );
                }
                self.structured_replies = true;
                reply(OptionReply::ack(code), out);
                Step::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = code == OPT_SET_META_CONTEXT;
                if set && !self.structured_replies {
                    return err(
                        REP_ERR_INVALID,
                        "SET_META_CONTEXT needs structured replies first",
                        out,
                    );
                }
                let req = match MetaContextRequest::parse(&opt.data) {
                    Ok(r) => r,
                    Err(e) => return err(REP_ERR_INVALID, &e.to_string(), out),
                };
                if !self.is_our_export(&req.export_name) {
                    return err(
                        REP_ERR_UNKNOWN,
                        &format!("no export named {:?}", req.export_name),
                        out,
                    );
                }
                let matched = if set {
                    req.queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION)
                } else {
                    // LIST: no query lists everything; "base:" is a wildcard
                    // for the base namespace (as in qemu's server).
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| q == CONTEXT_BASE_ALLOCATION || q == "base:")
                };
                if set {
                    self.base_allocation_selected = matched;
                }
                if matched {
                    let entry = MetaContextEntry {
                        context_id: if set { CONTEXT_ID_BASE_ALLOCATION } else { 0 },
                        name: CONTEXT_BASE_ALLOCATION.into(),
                    };
                    reply(
                        OptionReply {
                            option: code,
                            reply_type: REP_META_CONTEXT,
                            data: entry.encode(),
                        },
                        out,
                    );
                }
                reply(OptionReply::ack(code), out);
                Step::Continue
            }
            _ => err(
                REP_ERR_UNSUP,
                &format!("option {code} is not supported by this server"),
                out,
            ),
        }
    }

    /// The REP_INFO payloads for INFO/GO: always EXPORT and BLOCK_SIZE, NAME
    /// and DESCRIPTION when asked; unknown requests are ignored.
    fn infos(&self, requested: &[u16]) -> Vec<Info> {
        let mut infos = vec![Info::Export {
            size_bytes: self.export.size_bytes,
            transmission_flags: self.params().transmission_flags,
        }];
        if requested.contains(&INFO_NAME) {
            infos.push(Info::Name(self.export.name.clone()));
        }
        if requested.contains(&INFO_DESCRIPTION) {
            infos.push(Info::Description(self.export.description.clone()));
        }
        infos.push(Info::BlockSize {
            min_bytes: MIN_BLOCK_BYTES,
            preferred_bytes: PREFERRED_BLOCK_BYTES,
            max_payload_bytes: MAX_PAYLOAD_BYTES,
        });
        infos
    }
}
