//! Mapping from the engine's view (`replicator_core::engine`) to the control
//! protocol: status snapshots, admin commands and their refusals.
//!
//! Owns only these conversions so the daemon's handler stays short and the
//! wire names stay next to the protocol. Must not hold state or do I/O.

use replicator_core::engine::{AdminCommand, AdminError, ConnState, ReplState, ResyncProgress};
use replicator_core::types::{DiskState as CoreDisk, NodeRole, ProtocolMode};

use super::protocol::{
    ConnectionState, DiskState, PeerRole, Progress, ReplicationProtocol, ReplicationState, Request,
    Response, Role, StatusReport,
};

impl From<NodeRole> for Role {
    fn from(role: NodeRole) -> Self {
        match role {
            NodeRole::Primary => Role::Primary,
            NodeRole::Secondary => Role::Secondary,
        }
    }
}

impl From<Option<NodeRole>> for PeerRole {
    fn from(role: Option<NodeRole>) -> Self {
        match role {
            Some(NodeRole::Primary) => PeerRole::Primary,
            Some(NodeRole::Secondary) => PeerRole::Secondary,
            None => PeerRole::Unknown,
        }
    }
}

impl From<CoreDisk> for DiskState {
    fn from(disk: CoreDisk) -> Self {
        match disk {
            CoreDisk::Diskless => DiskState::Diskless,
            CoreDisk::Inconsistent => DiskState::Inconsistent,
            CoreDisk::Outdated => DiskState::Outdated,
            CoreDisk::Consistent => DiskState::Consistent,
            CoreDisk::UpToDate => DiskState::UpToDate,
        }
    }
}

/// The peer's disk; `DUnknown` when not known.
pub fn peer_disk(disk: Option<CoreDisk>) -> DiskState {
    disk.map_or(DiskState::DUnknown, DiskState::from)
}

impl From<ConnState> for ConnectionState {
    fn from(state: ConnState) -> Self {
        match state {
            ConnState::StandAlone => ConnectionState::StandAlone,
            ConnState::Connecting => ConnectionState::Connecting,
            ConnState::Connected => ConnectionState::Connected,
        }
    }
}

impl From<ReplState> for ReplicationState {
    fn from(state: ReplState) -> Self {
        match state {
            ReplState::Off => ReplicationState::Off,
            ReplState::Established => ReplicationState::Established,
            ReplState::SyncSource => ReplicationState::SyncSource,
            ReplState::SyncTarget => ReplicationState::SyncTarget,
            ReplState::PausedSyncS => ReplicationState::PausedSyncS,
            ReplState::PausedSyncT => ReplicationState::PausedSyncT,
            ReplState::VerifyS => ReplicationState::VerifyS,
            ReplState::VerifyT => ReplicationState::VerifyT,
        }
    }
}

impl From<ProtocolMode> for ReplicationProtocol {
    fn from(mode: ProtocolMode) -> Self {
        match mode {
            ProtocolMode::A => ReplicationProtocol::A,
            ProtocolMode::B => ReplicationProtocol::B,
            ProtocolMode::C => ReplicationProtocol::C,
        }
    }
}

impl From<ResyncProgress> for Progress {
    fn from(p: ResyncProgress) -> Self {
        Progress {
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            rate_bytes_per_s: p.rate_bytes_per_s,
            // Without a rate the engine's ETA means nothing.
            eta_s: (p.rate_bytes_per_s > 0).then_some(p.eta_s),
        }
    }
}

/// What the daemon knows beyond the engine's [`replicator_core::engine::Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusContext {
    /// Resource name.
    pub resource: String,
    /// This node's name.
    pub node: String,
    /// The peer's name ("" for a one-node resource).
    pub peer_node: String,
    /// Replication protocol.
    pub protocol: ProtocolMode,
    /// A running verify's progress.
    pub verify: Option<Progress>,
    /// Why the peer was last refused, one sentence.
    pub last_refusal: Option<String>,
    /// Why the link last dropped, one sentence.
    pub connection_error: Option<String>,
    /// The last failed data-disk operation since the disk was UpToDate.
    pub disk_error: Option<String>,
    /// NBD export address while served.
    pub nbd: Option<String>,
    /// NBD clients connected.
    pub nbd_clients: u32,
    /// Resync bytes moved since start.
    pub resync_transferred_bytes: u64,
}

/// Build the status report from the engine's snapshot and the daemon's
/// context.
pub fn status_report(
    status: &replicator_core::engine::Status,
    context: &StatusContext,
) -> StatusReport {
    StatusReport {
        resource: context.resource.clone(),
        node: context.node.clone(),
        role: status.role.into(),
        disk: status.disk.into(),
        connection: status.connection.into(),
        replication: status.replication.into(),
        peer_role: status.peer_role.into(),
        peer_disk: peer_disk(status.peer_disk),
        size_bytes: status.size_bytes,
        out_of_sync_bytes: status.out_of_sync_bytes,
        resync: status.resync.map(Progress::from),
        peer_node: context.peer_node.clone(),
        protocol: context.protocol.into(),
        verify: context.verify,
        split_brain: status.split_brain,
        last_refusal: context.last_refusal.clone(),
        connection_error: context.connection_error.clone(),
        disk_error: context.disk_error.clone(),
        nbd: context.nbd.clone(),
        nbd_clients: context.nbd_clients,
        resync_transferred_bytes: context.resync_transferred_bytes,
        resync_disk_wait_s: status.resync_disk_wait_s,
        resync_disk_wait_peer: status.resync_disk_wait_peer,
        peer_resync_disk_wait: status.peer_resync_disk_wait,
    }
}

/// The engine command a request maps to; `None` for `status` and `events`
/// (answered from state, not by the engine). `secondary --force` maps to a
/// plain `Secondary`: the force is about NBD clients, which the daemon
/// disconnects before demoting.
pub fn admin_command(request: &Request) -> Option<AdminCommand> {
    Some(match *request {
        Request::Status | Request::Events => return None,
        Request::Primary { force } => AdminCommand::Primary { force },
        Request::Secondary { .. } => AdminCommand::Secondary,
        Request::Connect => AdminCommand::Connect,
        Request::Disconnect => AdminCommand::Disconnect,
        Request::Resync => AdminCommand::StartResync,
        Request::Verify => AdminCommand::Verify,
        Request::Invalidate => AdminCommand::Invalidate,
        Request::InvalidateRemote => AdminCommand::InvalidateRemote,
        Request::PauseSync => AdminCommand::PauseSync,
        Request::ResumeSync => AdminCommand::ResumeSync,
        Request::NewCurrentUuid { clear_bitmap } => AdminCommand::NewCurrentUuid { clear_bitmap },
    })
}

/// The response to an engine's admin result: ok, or its one-sentence
/// refusal (first letter capitalised, ending with a full stop).
pub fn admin_response(result: Result<(), AdminError>) -> Response {
    match result {
        Ok(()) => Response::ok(),
        Err(e) => Response::error(sentence(&e.to_string())),
    }
}

fn sentence(text: &str) -> String {
    let mut chars = text.trim().chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => return "The command was refused.".to_owned(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use replicator_core::engine::Status;

    fn context() -> StatusContext {
        StatusContext {
            resource: "vm1".into(),
            node: "alpha".into(),
            peer_node: "bravo".into(),
            protocol: ProtocolMode::C,
            verify: None,
            last_refusal: None,
            connection_error: None,
            disk_error: None,
            nbd: Some("127.0.0.1:10809".into()),
            nbd_clients: 2,
            resync_transferred_bytes: 7,
        }
    }

    #[test]
    fn engine_status_maps_to_the_stable_wire_names() {
        // Proves the engine snapshot becomes the documented JSON values,
        // including Unknown/DUnknown for a disconnected peer and a null ETA
        // when the rate is zero.
        let status = Status {
            role: NodeRole::Primary,
            disk: CoreDisk::UpToDate,
            connection: ConnState::Connecting,
            replication: ReplState::Off,
            peer_role: None,
            peer_disk: None,
            size_bytes: 1 << 30,
            out_of_sync_bytes: 8192,
            resync: Some(ResyncProgress {
                done_bytes: 0,
                total_bytes: 8192,
                rate_bytes_per_s: 0,
                eta_s: 99,
            }),
            resync_disk_wait_s: Some(4),
            resync_disk_wait_peer: true,
            peer_resync_disk_wait: true,
            split_brain: true,
        };
        let json = serde_json::to_value(status_report(&status, &context())).unwrap();
        assert_eq!(json["role"], "Primary");
        assert_eq!(json["disk"], "UpToDate");
        assert_eq!(json["connection"], "Connecting");
        assert_eq!(json["replication"], "Off");
        assert_eq!(json["peer_role"], "Unknown");
        assert_eq!(json["peer_disk"], "DUnknown");
        assert_eq!(json["out_of_sync_bytes"], 8192);
        assert_eq!(json["resync"]["eta_s"], serde_json::Value::Null);
        assert_eq!(json["resync_disk_wait_s"], 4);
        assert_eq!(json["resync_disk_wait_peer"], true);
        assert_eq!(json["peer_resync_disk_wait"], true);
        assert_eq!(json["split_brain"], true);
        assert_eq!(json["nbd_clients"], 2);
        assert_eq!(json["protocol"], "C");
    }

    #[test]
    fn every_replication_state_name_matches_the_engine_name() {
        // Proves the two enums spell each state the same way.
        for state in [
            ReplState::Off,
            ReplState::Established,
            ReplState::SyncSource,
            ReplState::SyncTarget,
            ReplState::PausedSyncS,
            ReplState::PausedSyncT,
            ReplState::VerifyS,
            ReplState::VerifyT,
        ] {
            let wire = serde_json::to_value(ReplicationState::from(state)).unwrap();
            assert_eq!(wire, state.name());
        }
    }

    #[test]
    fn requests_map_to_admin_commands() {
        // Proves the request-to-engine mapping, and that status/events are
        // not engine commands.
        assert_eq!(admin_command(&Request::Status), None);
        assert_eq!(admin_command(&Request::Events), None);
        assert_eq!(
            admin_command(&Request::Primary { force: true }),
            Some(AdminCommand::Primary { force: true })
        );
        assert_eq!(
            admin_command(&Request::Secondary { force: true }),
            Some(AdminCommand::Secondary)
        );
        assert_eq!(
            admin_command(&Request::Resync),
            Some(AdminCommand::StartResync)
        );
        assert_eq!(
            admin_command(&Request::NewCurrentUuid { clear_bitmap: true }),
            Some(AdminCommand::NewCurrentUuid { clear_bitmap: true })
        );
    }

    #[test]
    fn admin_refusals_become_one_capitalised_sentence() {
        // Proves the engine's refusal text reaches operators as a sentence.
        assert_eq!(admin_response(Ok(())), Response::ok());
        assert_eq!(
            admin_response(Err(AdminError::PeerIsPrimary)),
            Response::error("The peer is already primary.")
        );
        assert_eq!(
            admin_response(Err(AdminError::StaleData {
                disk: CoreDisk::Outdated
            })),
            Response::error(
                "Refusing to become primary: local disk is Outdated (use --force to override)."
            )
        );
    }
}
