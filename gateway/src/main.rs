//! `egress-gateway`: the egress gateway pod's userspace forwarder.
//!
//! This binary stays thin: the packet work lives in `forwarder-core`. Subcommands grow with the issues:
//! `demo` runs the seed scenario through the real pipeline in-process.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    }
}
