//! `replctl`'s command line: which daemon to talk to and what to ask it.
//!
//! Owns the clap definitions of the stable flags (`--config`, `--node`,
//! `--socket`, `--json`, `--wait`, `--force`) and the control subcommands.
//! Must not do anything: [`super::run`] carries the commands out.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Which daemon to talk to: a node of a resource config, or a socket path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct TargetArgs {
    /// The resource's config file (with --node): the socket is that node's
    /// `control` key.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// The node of the config file whose daemon to talk to.
    #[arg(long, value_name = "NAME", global = true)]
    pub node: Option<String>,
    /// The daemon's control socket, instead of --config/--node.
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
}

/// A `replctl` command: sent to a running daemon, or (`create-md`,
/// `dump-md`) carried out offline on the node's disk.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ControlCommand {
    /// Write fresh metadata to this node's disk or metadata file (offline).
    CreateMd {
        /// Overwrite valid metadata that is already there.
        #[arg(long)]
        force: bool,
    },
    /// Print this node's on-disk metadata (offline).
    DumpMd {
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show role, disk, connection, replication, out-of-sync and resync progress.
    Status {
        /// Print the status as JSON (stable field names, for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Print state changes as JSON lines (like `drbdsetup events2`) until interrupted.
    Events,
    /// Promote this node: serve the NBD export and accept writes.
    Primary {
        /// Promote even if the local data is Inconsistent or Outdated.
        #[arg(long)]
        force: bool,
    },
    /// Demote this node: stop the NBD export.
    Secondary {
        /// Demote even if NBD clients are connected (they are disconnected).
        #[arg(long)]
        force: bool,
    },
    /// Connect to the peer (leave StandAlone).
    Connect,
    /// Drop the link to the peer and stay StandAlone.
    Disconnect,
    /// Start a resync of the out-of-sync blocks.
    Resync {
        /// Follow the progress until the resync is done.
        #[arg(long)]
        wait: bool,
    },
    /// Compare both replicas block by block; differences are marked out of sync.
    Verify {
        /// Follow the progress until the verify is done.
        #[arg(long)]
        wait: bool,
    },
    /// Discard this node's data: full resync from the peer.
    Invalidate,
    /// Discard the peer's data: full resync to the peer.
    InvalidateRemote,
    /// Pause a running resync.
    PauseSync,
    /// Resume a paused resync.
    ResumeSync,
    /// Start a new data generation.
    NewCurrentUuid {
        /// Mark everything in sync: skips the initial full sync of empty disks.
        #[arg(long)]
        clear_bitmap: bool,
    },
}

/// `replctl [--config F --node N | --socket PATH] COMMAND` for the control
/// commands alone. The `replctl` binary may embed [`TargetArgs`] and
/// [`ControlCommand`] (flattened) next to its other subcommands.
#[derive(Debug, Clone, Parser)]
#[command(name = "replctl", about = "Operate a replicatord daemon")]
pub struct Cli {
    /// Which daemon.
    #[command(flatten)]
    pub target: TargetArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: ControlCommand,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_before_and_after_the_subcommand() {
        // Proves the stable flags parse in both positions operators use.
        let a = Cli::try_parse_from([
            "replctl", "--config", "f.toml", "--node", "alpha", "status", "--json",
        ])
        .unwrap();
        let b = Cli::try_parse_from([
            "replctl", "status", "--json", "--config", "f.toml", "--node", "alpha",
        ])
        .unwrap();
        assert_eq!(a.target, b.target);
        assert_eq!(a.command, ControlCommand::Status { json: true });
        assert_eq!(a.target.node.as_deref(), Some("alpha"));
    }

    #[test]
    fn every_command_name_parses_with_its_flags() {
        // Proves the DESIGN.md §2 command names and flags.
        let parse = |args: &[&str]| {
            let mut argv = vec!["replctl", "--socket", "/s"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap().command
        };
        assert_eq!(parse(&["events"]), ControlCommand::Events);
        assert_eq!(
            parse(&["primary", "--force"]),
            ControlCommand::Primary { force: true }
        );
        assert_eq!(
            parse(&["secondary"]),
            ControlCommand::Secondary { force: false }
        );
        assert_eq!(parse(&["connect"]), ControlCommand::Connect);
        assert_eq!(parse(&["disconnect"]), ControlCommand::Disconnect);
        assert_eq!(
            parse(&["resync", "--wait"]),
            ControlCommand::Resync { wait: true }
        );
        assert_eq!(parse(&["verify"]), ControlCommand::Verify { wait: false });
        assert_eq!(parse(&["invalidate"]), ControlCommand::Invalidate);
        assert_eq!(
            parse(&["invalidate-remote"]),
            ControlCommand::InvalidateRemote
        );
        assert_eq!(parse(&["pause-sync"]), ControlCommand::PauseSync);
        assert_eq!(parse(&["resume-sync"]), ControlCommand::ResumeSync);
        assert_eq!(
            parse(&["new-current-uuid", "--clear-bitmap"]),
            ControlCommand::NewCurrentUuid { clear_bitmap: true }
        );
        assert_eq!(
            parse(&["create-md", "--force"]),
            ControlCommand::CreateMd { force: true }
        );
        assert_eq!(
            parse(&["dump-md", "--json"]),
            ControlCommand::DumpMd { json: true }
        );
        assert!(Cli::try_parse_from(["replctl", "promote"]).is_err());
    }
}
