//! The control socket protocol: JSON lines between `replctl` and `replicatord`.
//!
//! Owns the request, response, status and event types and their exact JSON
//! shape (a golden test pins it). Must not do I/O, hold daemon state or know
//! how a command is carried out: the daemon answers through
//! [`crate::control::server::ControlHandler`].
//!
//! One request per line, one response per line:
//!
//! ```text
//! -> {"command":"primary","force":false}
//! <- {"ok":true}
//! -> {"command":"status"}
//! <- {"ok":true,"status":{"resource":"vm1","node":"alpha","role":"Primary",...}}
//! -> {"command":"bogus"}
//! <- {"ok":false,"error":"malformed request: unknown variant `bogus`, ..."}
//! ```
//!
//! `{"command":"events"}` is answered with `{"ok":true}` and then turns the
//! connection into a stream of [`Event`] lines (like `drbdsetup events2`): an
//! `exists` line per object, the `exists -` end marker, then `change` lines
//! until the client closes.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Version of this protocol; bumped on any incompatible change of the JSON
/// shapes below (the golden tests pin them).
pub const CONTROL_PROTOCOL_VERSION: u32 = 1;

/// Longest request line the server accepts, in bytes (newline included).
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Longest response or event line a client accepts, in bytes (newline
/// included). A status report is well under 4 KiB; this leaves room for long
/// error sentences and future fields.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A command sent to the daemon, one JSON object per line, tagged by
/// `"command"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Report the resource's state ([`StatusReport`]).
    Status,
    /// Subscribe to state-change events; the connection then streams events.
    Events,
    /// Become primary; `force` promotes even Inconsistent/Outdated data.
    Primary {
        /// Promote even if the local data is not known to be up to date.
        #[serde(default)]
        force: bool,
    },
    /// Become secondary; `force` demotes even with NBD clients connected.
    Secondary {
        /// Demote even if NBD clients are connected (they are disconnected).
        #[serde(default)]
        force: bool,
    },
    /// Leave StandAlone and connect to the peer.
    Connect,
    /// Drop the peer link and stay StandAlone.
    Disconnect,
    /// Start a resync of the out-of-sync blocks.
    Resync,
    /// Start an online verify of both replicas.
    Verify,
    /// Discard the local data: full resync from the peer.
    Invalidate,
    /// Discard the peer's data: full resync to the peer.
    InvalidateRemote,
    /// Pause a running resync.
    PauseSync,
    /// Resume a paused resync.
    ResumeSync,
    /// Start a new data generation; `clear_bitmap` skips the initial sync.
    NewCurrentUuid {
        /// Mark everything in sync (skip the initial full sync of empty disks).
        #[serde(default)]
        clear_bitmap: bool,
    },
}

impl Request {
    /// The command's name as written on the wire and typed by operators.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Events => "events",
            Request::Primary { .. } => "primary",
            Request::Secondary { .. } => "secondary",
            Request::Connect => "connect",
            Request::Disconnect => "disconnect",
            Request::Resync => "resync",
            Request::Verify => "verify",
            Request::Invalidate => "invalidate",
            Request::InvalidateRemote => "invalidate-remote",
            Request::PauseSync => "pause-sync",
            Request::ResumeSync => "resume-sync",
            Request::NewCurrentUuid { .. } => "new-current-uuid",
        }
    }
}

/// The daemon's answer to one request.
///
/// On the wire: `{"ok":true}`, `{"ok":true,"message":"..."}`,
/// `{"ok":true,"status":{...}}` or `{"ok":false,"error":"one sentence"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ResponseWire", into = "ResponseWire")]
pub enum Response {
    /// The command was carried out (or started, for resync and verify).
    Ok {
        /// An optional sentence for the operator ("resync started: 12 MiB").
        message: Option<String>,
    },
    /// The answer to [`Request::Status`].
    Status(Box<StatusReport>),
    /// The command was refused or failed; one clear sentence saying why.
    Error(String),
}

impl Response {
    /// A success without a message.
    pub fn ok() -> Self {
        Response::Ok { message: None }
    }

    /// A success with a sentence for the operator.
    pub fn ok_with(message: impl Into<String>) -> Self {
        Response::Ok {
            message: Some(message.into()),
        }
    }

    /// A refusal or failure with one clear sentence.
    pub fn error(sentence: impl Into<String>) -> Self {
        Response::Error(sentence.into())
    }
}

/// The flat JSON shape of [`Response`]; only used for (de)serialisation.
/// Unknown fields are ignored so an older `replctl` can read a newer daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResponseWire {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Box<StatusReport>>,
}

impl From<Response> for ResponseWire {
    fn from(response: Response) -> Self {
        let mut wire = ResponseWire {
            ok: true,
            error: None,
            message: None,
            status: None,
        };
        match response {
            Response::Ok { message } => wire.message = message,
            Response::Status(status) => wire.status = Some(status),
            Response::Error(error) => {
                wire.ok = false;
                wire.error = Some(error);
            }
        }
        wire
    }
}

impl TryFrom<ResponseWire> for Response {
    type Error = String;

    fn try_from(wire: ResponseWire) -> Result<Self, String> {
        match (wire.ok, wire.error, wire.message, wire.status) {
            (false, Some(error), None, None) => Ok(Response::Error(error)),
            (false, None, _, _) => Err("a response with \"ok\":false has no \"error\"".into()),
            (false, Some(_), _, _) => {
                Err("a response with \"ok\":false carries a message or a status".into())
            }
            (true, Some(_), _, _) => Err("a response with \"ok\":true carries an \"error\"".into()),
            (true, None, message, None) => Ok(Response::Ok { message }),
            (true, None, None, Some(status)) => Ok(Response::Status(status)),
            (true, None, Some(_), Some(_)) => {
                Err("a response carries both a message and a status".into())
            }
        }
    }
}

/// This node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Serves the volume and accepts writes.
    Primary,
    /// Mirrors the primary.
    Secondary,
}

/// The peer's role as far as this node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRole {
    /// The peer serves the volume.
    Primary,
    /// The peer mirrors.
    Secondary,
    /// Not connected: the peer's role is not known.
    Unknown,
}

/// Disk state of a replica (DRBD's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    /// No backing disk attached.
    Diskless,
    /// The backing disk is being attached (metadata being read).
    Attaching,
    /// The disk failed (I/O error); it is detached.
    Failed,
    /// Attached; deciding the state with the peer.
    Negotiating,
    /// Being resynced, or never synced: the data is not usable on its own.
    Inconsistent,
    /// Consistent but known to be older than the peer's.
    Outdated,
    /// Consistent; whether it is the newest is not known.
    Consistent,
    /// Consistent and current.
    UpToDate,
    /// The peer's disk state is not known (not connected).
    DUnknown,
}

/// State of the link to the peer (DRBD's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionState {
    /// Not trying to connect (after `disconnect`, or after a split brain).
    StandAlone,
    /// Tearing the link down.
    Disconnecting,
    /// Trying to reach the peer.
    Connecting,
    /// Link up and handshake done.
    Connected,
}

/// Replication state toward the peer (DRBD 9's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    /// Not connected.
    Off,
    /// Connected, replicas in sync, writes mirrored.
    Established,
    /// Exchanging bitmaps before a resync where this node is the source.
    WFBitMapS,
    /// Exchanging bitmaps before a resync where this node is the target.
    WFBitMapT,
    /// Sending out-of-sync blocks to the peer.
    SyncSource,
    /// Receiving out-of-sync blocks from the peer.
    SyncTarget,
    /// Resync as source, paused.
    PausedSyncS,
    /// Resync as target, paused.
    PausedSyncT,
    /// Online verify, this node drives it.
    VerifyS,
    /// Online verify, the peer drives it.
    VerifyT,
}

impl ReplicationState {
    /// Whether a resync is under way (running, paused or starting).
    pub fn is_resync(self) -> bool {
        matches!(
            self,
            ReplicationState::WFBitMapS
                | ReplicationState::WFBitMapT
                | ReplicationState::SyncSource
                | ReplicationState::SyncTarget
                | ReplicationState::PausedSyncS
                | ReplicationState::PausedSyncT
        )
    }

    /// Whether a resync is paused.
    pub fn is_paused(self) -> bool {
        matches!(
            self,
            ReplicationState::PausedSyncS | ReplicationState::PausedSyncT
        )
    }

    /// Whether an online verify is under way.
    pub fn is_verify(self) -> bool {
        matches!(self, ReplicationState::VerifyS | ReplicationState::VerifyT)
    }
}

/// Replication protocol of the resource (C by default, as in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReplicationProtocol {
    /// Complete when queued for sending.
    A,
    /// Complete when the peer received it.
    B,
    /// Complete when both disks completed it.
    #[default]
    C,
}

/// Progress of a resync or a verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes processed so far.
    pub done_bytes: u64,
    /// Bytes to process in all.
    pub total_bytes: u64,
    /// Current rate (recent average), bytes per second.
    pub rate_bytes_per_s: u64,
    /// Estimated seconds left; `null` while the rate is zero.
    pub eta_s: Option<u64>,
}

impl Progress {
    /// Completed fraction in percent, 0.0 ..= 100.0 (100 for an empty job).
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            return 100.0;
        }
        let done = self.done_bytes.min(self.total_bytes);
        done as f64 * 100.0 / self.total_bytes as f64
    }
}

/// What `replctl status --json` prints. The first eleven fields are stable
/// (DESIGN.md §2); scripts may rely on them. The rest are for operators and
/// default when absent, so a newer `replctl` can read an older daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Resource name (`vm1`).
    pub resource: String,
    /// This node's name (`alpha`).
    pub node: String,
    /// This node's role.
    pub role: Role,
    /// This node's disk state.
    pub disk: DiskState,
    /// State of the link to the peer.
    pub connection: ConnectionState,
    /// Replication state toward the peer.
    pub replication: ReplicationState,
    /// The peer's role (`Unknown` when not connected).
    pub peer_role: PeerRole,
    /// The peer's disk state (`DUnknown` when not connected).
    pub peer_disk: DiskState,
    /// Size the NBD export offers, in bytes.
    pub size_bytes: u64,
    /// Bytes marked out of sync with the peer.
    pub out_of_sync_bytes: u64,
    /// The running resync, if any.
    pub resync: Option<Progress>,
    /// The peer's node name (`bravo`).
    #[serde(default)]
    pub peer_node: String,
    /// Replication protocol.
    #[serde(default)]
    pub protocol: ReplicationProtocol,
    /// The running online verify, if any.
    #[serde(default)]
    pub verify: Option<Progress>,
    /// Whether a split brain was detected (the link stays down until resolved).
    #[serde(default)]
    pub split_brain: bool,
    /// Why the peer was last refused at handshake (wrong secret, another
    /// resource, a different disk size, split brain), as one sentence.
    #[serde(default)]
    pub last_refusal: Option<String>,
    /// Why the link last dropped (timeout, reset, corrupt frame), one sentence.
    #[serde(default)]
    pub connection_error: Option<String>,
    /// The last failed operation on this node's data disk since the disk
    /// was last UpToDate (what failed, and the OS error), one sentence.
    #[serde(default)]
    pub disk_error: Option<String>,
    /// The NBD export address while it is served (primary only).
    #[serde(default)]
    pub nbd: Option<String>,
    /// Number of NBD clients connected.
    #[serde(default)]
    pub nbd_clients: u32,
    /// Bytes sent or received by resyncs since the daemon started.
    #[serde(default)]
    pub resync_transferred_bytes: u64,
    /// A SyncTarget whose disk failed a resync write or flush waits before
    /// it asks again: this wait's length in seconds (1, doubling up to 16);
    /// absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_disk_wait_s: Option<u64>,
    /// With `resync_disk_wait_s`: the failure was the peer's (the
    /// SyncSource could not read the data), not this node's disk; absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync_disk_wait_peer: bool,
    /// A SyncSource whose target waits after a disk failure (the target's
    /// or this node's) before it asks for more; absent otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peer_resync_disk_wait: bool,
}

/// Kind of an event line (as in `drbdsetup events2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// Part of the initial dump: the object exists with these fields.
    Exists,
    /// The object's fields changed.
    Change,
    /// The object appeared (a connection object when a peer is configured).
    Create,
    /// The object went away.
    Destroy,
}

/// The object an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventObject {
    /// The resource: role.
    Resource,
    /// The link to the peer: connection state, peer role, refusal reasons.
    Connection,
    /// This node's replica: disk state, size, NBD export.
    Device,
    /// The replica pair: replication state, peer disk, out of sync, progress.
    PeerDevice,
    /// Only in the `exists -` line that ends the initial dump.
    #[serde(rename = "-")]
    EndOfDump,
}

/// One event line: `{"type":"change","object":"connection","time":"...",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// exists / change / create / destroy.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// What the event is about.
    pub object: EventObject,
    /// When, RFC 3339 UTC with milliseconds (`2026-11-27T15:38:01.123Z`).
    pub time: String,
    /// The object's fields (all of them for `exists`, the changed ones for
    /// `change`), named as in [`StatusReport`].
    #[serde(flatten)]
    pub fields: BTreeMap<String, serde_json::Value>,
}

impl Event {
    /// The `exists -` line that ends the initial dump.
    pub fn end_of_dump(time: String) -> Self {
        Event {
            kind: EventKind::Exists,
            object: EventObject::EndOfDump,
            time,
            fields: BTreeMap::new(),
        }
    }

    /// Whether this is the `exists -` end marker.
    pub fn is_end_of_dump(&self) -> bool {
        self.kind == EventKind::Exists && self.object == EventObject::EndOfDump
    }
}

/// Names of the [`StatusReport`] fields carried by each event object, in the
/// order they are listed. `resource` (and `peer_node` for the peer objects)
/// identify the object and are in every line.
const OBJECT_FIELDS: [(EventObject, &[&str]); 4] = [
    (EventObject::Resource, &["role", "split_brain"]),
    (
        EventObject::Connection,
        &[
            "connection",
            "peer_role",
            "protocol",
            "last_refusal",
            "connection_error",
        ],
    ),
    (
        EventObject::Device,
        &[
            "node",
            "disk",
            "size_bytes",
            "nbd",
            "nbd_clients",
            "disk_error",
        ],
    ),
    (
        EventObject::PeerDevice,
        &[
            "replication",
            "peer_disk",
            "out_of_sync_bytes",
            "resync",
            "verify",
            "resync_transferred_bytes",
        ],
    ),
];

fn status_fields(status: &StatusReport) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(status) {
        Ok(serde_json::Value::Object(map)) => map,
        // A struct of plain fields always serialises to an object.
        other => unreachable!("StatusReport serialised to {other:?}"),
    }
}

fn object_event(
    kind: EventKind,
    object: EventObject,
    time: &str,
    all: &serde_json::Map<String, serde_json::Value>,
    names: &[&str],
) -> Event {
    let mut fields = BTreeMap::new();
    let mut ids = vec!["resource"];
    if matches!(object, EventObject::Connection | EventObject::PeerDevice) {
        ids.push("peer_node");
    }
    for name in ids.iter().chain(names) {
        if let Some(value) = all.get(*name) {
            fields.insert((*name).to_owned(), value.clone());
        }
    }
    Event {
        kind,
        object,
        time: time.to_owned(),
        fields,
    }
}

/// The initial dump for a new subscriber: one `exists` line per object,
/// carrying every field, followed by the `exists -` end marker.
pub fn exists_dump(status: &StatusReport, time: &str) -> Vec<Event> {
    let all = status_fields(status);
    let mut events: Vec<Event> = OBJECT_FIELDS
        .iter()
        .map(|(object, names)| object_event(EventKind::Exists, *object, time, &all, names))
        .collect();
    events.push(Event::end_of_dump(time.to_owned()));
    events
}

/// The `change` lines that take a subscriber from `old` to `new`: one per
/// object with at least one changed field, carrying only the changed fields
/// (plus the identifying ones). The daemon publishes these after each step.
pub fn change_events(old: &StatusReport, new: &StatusReport, time: &str) -> Vec<Event> {
    let before = status_fields(old);
    let after = status_fields(new);
    OBJECT_FIELDS
        .iter()
        .filter_map(|(object, names)| {
            let changed: Vec<&str> = names
                .iter()
                .copied()
                .filter(|name| before.get(*name) != after.get(*name))
                .collect();
            (!changed.is_empty())
                .then(|| object_event(EventKind::Change, *object, time, &after, &changed))
        })
        .collect()
}

/// An RFC 3339 UTC timestamp with milliseconds for `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Timestamp {
    /// The current wall-clock time (the daemon's edge; the core has no clock).
    pub fn now() -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp { unix_ms }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.unix_ms % 1000;
        let secs = self.unix_ms / 1000;
        let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        // Days to civil date (Howard Hinnant's algorithm), proleptic Gregorian.
        let days = (secs / 86_400) as i64 + 719_468;
        let era = days.div_euclid(146_097);
        let doe = days.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{ms:03}Z"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_status() -> StatusReport {
        StatusReport {
            resource: "vm1".into(),
            node: "alpha".into(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            connection: ConnectionState::Connected,
            replication: ReplicationState::SyncSource,
            peer_role: PeerRole::Secondary,
            peer_disk: DiskState::Inconsistent,
            size_bytes: 1 << 30,
            out_of_sync_bytes: 512 << 20,
            resync: Some(Progress {
                done_bytes: 512 << 20,
                total_bytes: 1 << 30,
                rate_bytes_per_s: 100 << 20,
                eta_s: Some(5),
            }),
            peer_node: "bravo".into(),
            protocol: ReplicationProtocol::C,
            verify: None,
            split_brain: false,
            last_refusal: None,
            connection_error: None,
            disk_error: None,
            nbd: Some("127.0.0.1:10809".into()),
            nbd_clients: 1,
            resync_transferred_bytes: 512 << 20,
            resync_disk_wait_s: None,
            resync_disk_wait_peer: false,
            peer_resync_disk_wait: false,
        }
    }

    #[test]
    fn status_report_json_is_pinned_golden() {
        // Proves the exact JSON of a status (field names, order, value
        // spellings) so scripts relying on `status --json` do not break.
        let text = serde_json::to_string(&Response::Status(Box::new(sample_status()))).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"ok":true,"status":{"resource":"vm1","node":"alpha","role":"Primary","#,
                r#""disk":"UpToDate","connection":"Connected","replication":"SyncSource","#,
                r#""peer_role":"Secondary","peer_disk":"Inconsistent","size_bytes":1073741824,"#,
                r#""out_of_sync_bytes":536870912,"resync":{"done_bytes":536870912,"#,
                r#""total_bytes":1073741824,"rate_bytes_per_s":104857600,"eta_s":5},"#,
                r#""peer_node":"bravo","protocol":"C","verify":null,"split_brain":false,"#,
                r#""last_refusal":null,"connection_error":null,"disk_error":null,"#,
                r#""nbd":"127.0.0.1:10809","#,
                r#""nbd_clients":1,"resync_transferred_bytes":536870912}}"#
            )
        );
        assert_eq!(
            CONTROL_PROTOCOL_VERSION, 1,
            "golden changed: bump the version"
        );
    }

    #[test]
    fn status_without_resync_serialises_resync_as_null() {
        // Proves `resync` is present and null (not omitted) when none runs, as
        // DESIGN.md §2 shows.
        let mut status = sample_status();
        status.resync = None;
        let value = serde_json::to_value(&status).unwrap();
        assert_eq!(value["resync"], serde_json::Value::Null);
        assert!(value.as_object().unwrap().contains_key("resync"));
    }

    #[test]
    fn every_request_round_trips_through_json_with_pinned_names() {
        // Proves each request's wire spelling and that parsing inverts it.
        let cases = [
            (Request::Status, r#"{"command":"status"}"#),
            (Request::Events, r#"{"command":"events"}"#),
            (
                Request::Primary { force: true },
                r#"{"command":"primary","force":true}"#,
            ),
            (
                Request::Secondary { force: false },
                r#"{"command":"secondary","force":false}"#,
            ),
            (Request::Connect, r#"{"command":"connect"}"#),
            (Request::Disconnect, r#"{"command":"disconnect"}"#),
            (Request::Resync, r#"{"command":"resync"}"#),
            (Request::Verify, r#"{"command":"verify"}"#),
            (Request::Invalidate, r#"{"command":"invalidate"}"#),
            (
                Request::InvalidateRemote,
                r#"{"command":"invalidate-remote"}"#,
            ),
            (Request::PauseSync, r#"{"command":"pause-sync"}"#),
            (Request::ResumeSync, r#"{"command":"resume-sync"}"#),
            (
                Request::NewCurrentUuid { clear_bitmap: true },
                r#"{"command":"new-current-uuid","clear_bitmap":true}"#,
            ),
        ];
        for (request, text) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), text);
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), request);
            assert!(text.contains(request.name()));
        }
    }

    #[test]
    fn force_flags_default_to_false_when_omitted() {
        // Proves a hand-written `{"command":"primary"}` is a non-forced promote.
        let request: Request = serde_json::from_str(r#"{"command":"primary"}"#).unwrap();
        assert_eq!(request, Request::Primary { force: false });
    }

    #[test]
    fn unknown_command_and_unknown_field_are_rejected() {
        // Proves typos are errors rather than silently ignored.
        assert!(serde_json::from_str::<Request>(r#"{"command":"promote"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"command":"primary","forse":true}"#).is_err());
    }

    #[test]
    fn responses_have_the_documented_wire_shapes() {
        // Proves ok / ok+message / error shapes and that inconsistent
        // combinations are rejected when parsed.
        assert_eq!(
            serde_json::to_string(&Response::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::ok_with("started")).unwrap(),
            r#"{"ok":true,"message":"started"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::error("No peer.")).unwrap(),
            r#"{"ok":false,"error":"No peer."}"#
        );
        for good in [r#"{"ok":true}"#, r#"{"ok":false,"error":"x"}"#] {
            let parsed: Response = serde_json::from_str(good).unwrap();
            assert_eq!(serde_json::to_string(&parsed).unwrap(), good);
        }
        for bad in [
            r#"{"ok":false}"#,
            r#"{"ok":true,"error":"x"}"#,
            r#"{"ok":false,"error":"x","message":"y"}"#,
        ] {
            assert!(serde_json::from_str::<Response>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn status_with_only_the_stable_fields_parses_and_unknown_fields_are_ignored() {
        // Proves version tolerance: the DESIGN.md example (stable fields
        // only) parses with defaults for the rest, and a response carrying a
        // field this build does not know still parses.
        let text = r#"{"ok":true,"future":1,"status":{"resource":"vm1","node":"alpha",
            "role":"Primary","disk":"UpToDate","connection":"Connected",
            "replication":"Established","peer_role":"Secondary","peer_disk":"UpToDate",
            "size_bytes":1073741824,"out_of_sync_bytes":0,"resync":null,"later":true}}"#;
        let Response::Status(status) = serde_json::from_str(text).unwrap() else {
            panic!("not a status");
        };
        assert_eq!(status.size_bytes, 1 << 30);
        assert_eq!(status.protocol, ReplicationProtocol::C);
        assert_eq!(status.peer_node, "");
        assert!(!status.split_brain);
        assert!(serde_json::from_str::<StatusReport>(r#"{"resource":"vm1"}"#).is_err());
    }

    #[test]
    fn exists_dump_lists_each_object_then_the_end_marker() {
        // Proves the initial dump's shape: resource, connection, device,
        // peer-device with their fields, then `exists -`.
        let events = exists_dump(&sample_status(), "T");
        let objects: Vec<EventObject> = events.iter().map(|e| e.object).collect();
        assert_eq!(
            objects,
            [
                EventObject::Resource,
                EventObject::Connection,
                EventObject::Device,
                EventObject::PeerDevice,
                EventObject::EndOfDump
            ]
        );
        assert!(events.iter().all(|e| e.kind == EventKind::Exists));
        assert!(events[4].is_end_of_dump());
        assert_eq!(
            serde_json::to_value(&events[1]).unwrap(),
            json!({"type":"exists","object":"connection","time":"T","resource":"vm1",
                   "peer_node":"bravo","connection":"Connected","peer_role":"Secondary",
                   "protocol":"C","last_refusal":null,"connection_error":null})
        );
        assert_eq!(
            serde_json::to_string(&events[4]).unwrap(),
            r#"{"type":"exists","object":"-","time":"T"}"#
        );
    }

    #[test]
    fn change_events_carry_only_changed_objects_and_fields() {
        // Proves a diff of two statuses yields one change line per touched
        // object with exactly the changed fields (plus identifiers).
        let old = sample_status();
        let mut new = old.clone();
        new.connection = ConnectionState::Connecting;
        new.peer_role = PeerRole::Unknown;
        new.connection_error = Some("The peer stopped answering pings.".into());
        let events = change_events(&old, &new, "T");
        assert_eq!(events.len(), 1);
        assert_eq!(
            serde_json::to_value(&events[0]).unwrap(),
            json!({"type":"change","object":"connection","time":"T","resource":"vm1",
                   "peer_node":"bravo","connection":"Connecting","peer_role":"Unknown",
                   "connection_error":"The peer stopped answering pings."})
        );
        assert!(change_events(&old, &old, "T").is_empty());
    }

    #[test]
    fn event_lines_parse_back_to_the_same_event() {
        // Proves a client can read what the server writes.
        for event in exists_dump(&sample_status(), "2026-01-01T00:00:00.000Z") {
            let text = serde_json::to_string(&event).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), event);
        }
    }

    #[test]
    fn timestamp_formats_known_instants_as_rfc3339_utc() {
        // Proves the civil-date conversion on the epoch, a leap day and a
        // date past 2038.
        assert_eq!(
            Timestamp { unix_ms: 0 }.to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp {
                unix_ms: 951_782_400_123
            }
            .to_string(),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            Timestamp {
                unix_ms: 2_524_608_000_000 + 3_723_004
            }
            .to_string(),
            "2050-01-01T01:02:03.004Z"
        );
    }

    #[test]
    fn progress_percent_is_bounded_and_handles_empty_jobs() {
        // Proves percent never exceeds 100 and an empty job counts as done.
        let p = |done, total| Progress {
            done_bytes: done,
            total_bytes: total,
            rate_bytes_per_s: 0,
            eta_s: None,
        };
        assert_eq!(p(0, 0).percent(), 100.0);
        assert_eq!(p(50, 200).percent(), 25.0);
        assert_eq!(p(300, 200).percent(), 100.0);
    }
}
