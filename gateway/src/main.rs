//! `egress-gateway`: the egress gateway pod's userspace forwarder.
//!
//! This binary stays thin: the packet work lives in `forwarder-core`. Subcommands grow with the issues:
//! `demo` runs the seed scenario through the real pipeline in-process; `check` validates configuration files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod config;
mod demo;

/// Userspace egress gateway for Kubernetes: terminates the VXLAN tunnel from client nodes, SNATs pod traffic
/// to fixed egress IPs and forwards it onto the DMZ or internal uplinks; replies go back through the tunnel.
#[derive(Debug, Parser)]
#[command(name = "egress-gateway", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the seed scenario through the forwarding pipeline in-process: client nodes' VXLAN frames (as the
    /// kernel's vxlan device builds them) are translated onto the DMZ and internal uplinks, the outside
    /// servers answer, hostile traffic is fed in, and the result is printed (what each server saw, where
    /// each reply went, every drop by reason). Needs no privileges. Exits non-zero if any check fails.
    Demo {
        /// Also print every frame in hex.
        #[arg(long)]
        verbose: bool,
    },
    /// Check configuration files without starting anything: prints `FILE: ok (N uplinks, M routes)` for each
    /// valid gateway configuration, or every problem as `file:line: problem` on stderr and exits 1.
    Check {
        /// Files to check (see docs/configuration.md).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { verbose } => match demo::run(verbose) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("egress-gateway demo: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { files } => check::run(&files),
    }
}
