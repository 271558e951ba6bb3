//! The `replctl` program: one command line for the control commands
//! ([`crate::replctl`]) and the quick-start `demo` ([`crate::demo`]).
//!
//! Owns only parsing and dispatch; `src/bin/replctl.rs` calls [`main`]. It
//! must not carry out any command itself.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::demo::{self, DemoArgs};
use crate::replctl::{self, Console, ControlCommand, TargetArgs};

/// `replctl [--config F --node N | --socket PATH] COMMAND`.
#[derive(Debug, Clone, Parser)]
#[command(name = "replctl", version, about = "Operate replicatord daemons")]
pub struct ReplctlCli {
    /// Which daemon (not used by `demo`).
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(subcommand)]
    pub command: ReplctlCommand,
}

/// Every `replctl` subcommand.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ReplctlCommand {
    /// Quick start: two nodes replicating on loopback over sparse 1 GiB files, alpha serving NBD, until Ctrl-C.
    Demo(DemoArgs),
    #[command(flatten)]
    Control(ControlCommand),
}

/// The program: returns the exit status.
pub fn main() -> ExitCode {
    let cli = ReplctlCli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("replctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match &cli.command {
            ReplctlCommand::Demo(args) => run_demo(args).await,
            ReplctlCommand::Control(command) => {
                let mut out = std::io::stdout();
                let mut err = std::io::stderr();
                let out_is_tty = out.is_terminal();
                let mut console = Console {
                    out: &mut out,
                    err: &mut err,
                    out_is_tty,
                };
                replctl::run(&cli.target, command, &mut console).await
            }
        }
    });
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn run_demo(args: &DemoArgs) -> i32 {
    let result = async {
        let stop = async {
            // If the handler cannot be installed, stop at once rather than
            // leave the nodes running with no way to stop them cleanly.
            if let Err(e) = tokio::signal::ctrl_c().await {
                eprintln!("replctl: cannot wait for Ctrl-C ({e}); stopping the demo");
            }
        };
        demo::run(
            args,
            &std::env::temp_dir(),
            &mut std::io::stdout(),
            stop,
            true,
        )
        .await
    }
    .await;
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("replctl: demo: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_and_control_commands_parse_side_by_side() {
        // Proves `demo` and the control commands share one command line.
        let c = ReplctlCli::try_parse_from(["replctl", "demo", "--port", "10900"]).unwrap();
        assert_eq!(c.command, ReplctlCommand::Demo(DemoArgs { port: 10900 }));
        let c = ReplctlCli::try_parse_from(["replctl", "demo"]).unwrap();
        assert_eq!(c.command, ReplctlCommand::Demo(DemoArgs { port: 10809 }));
        let c =
            ReplctlCli::try_parse_from(["replctl", "--socket", "/s", "status", "--json"]).unwrap();
        assert_eq!(
            c.command,
            ReplctlCommand::Control(ControlCommand::Status { json: true })
        );
        assert!(ReplctlCli::try_parse_from(["replctl", "frobnicate"]).is_err());
    }
}
