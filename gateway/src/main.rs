//! `egress-gateway`: the egress gateway pod's userspace forwarder.
//!
//! This binary stays thin: the packet work lives in `forwarder-core`. Where a packet goes:
//! `run.rs` starts everything and runs the control loop (reload, drain, housekeeping); `worker.rs` is one
//! data-path thread (receive a batch, hand it to the pipeline, send what comes out); `io/` holds the sockets
//! (tunnel UDP, uplink AF_PACKET) and the offload repairs; `neighbour.rs` answers and resolves ARP/NDP on
//! the uplinks; `sync.rs` streams the flows to the other replicas of the set and takes a dead one over;
//! `telemetry.rs` and `http.rs` serve metrics and health, `probe.rs` the node agents' UDP health
//! probe, `upstream.rs` the probes of outside targets that gate readiness; `config.rs` reads the YAML file.
//! `demo` runs the seed scenario through the real pipeline in-process; `check` validates configuration and
//! inventory files; `explain` (with `inventory.rs`) tells which gateways a pod's traffic uses and why.
//! `node/` is the node agent (`egress-gateway node`): policies and gateway health in, ip rules, route
//! tables and the vxlan device out, through netlink.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod caps;
mod check;
mod config;
mod demo;
mod explain;
mod flowlog;
mod flows;
mod http;
mod inventory;
mod io;
mod neighbour;
mod node;
mod nodes;
mod probe;
mod run;
mod supervisor;
mod sync;
mod telemetry;
mod upstream;
mod worker;

/// Userspace egress gateway for Kubernetes: terminates the VXLAN tunnel from client nodes, SNATs pod traffic
/// to fixed egress IPs and forwards it onto the DMZ or internal uplinks; replies go back through the tunnel.
#[derive(Debug, Parser)]
#[command(name = "egress-gateway", version, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the egress gateway pod's forwarder)
    ///
    /// Run the gateway: VXLAN from the nodes on `tunnel.listen`, translated traffic out of the uplink
    /// interfaces, replies back through the tunnel. Health on `health.listen` (/readiness, /livez), metrics
    /// on `metrics.listen` (/metrics). SIGHUP or a changed file reloads the configuration (established flows
    /// are kept); SIGTERM drains for `drain_seconds`, then exits 0. With `sync`, the replicas of a set keep
    /// copies of each other's flows, a survivor carries a dead replica's connections on and hands them back
    /// when it returns, and SIGTERM hands a replica's connections to a peer within about a second
    /// (docs/failover.md).
    /// Needs CAP_NET_RAW and CAP_NET_ADMIN.
    Run {
        /// The configuration file (YAML; see docs/configuration.md).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The pod's own IP: replaces the address of `tunnel.listen` (its port stays), also on reload. In a
        /// StatefulSet: `--tunnel-ip=$(POD_IP)` from the downward API's status.podIP.
        #[arg(long, value_name = "IP")]
        tunnel_ip: Option<std::net::Ipv4Addr>,
    },
    /// Check gateway configurations and inventory files, start nothing
    ///
    /// Check files without starting anything: prints `FILE: ok (N uplinks, M routes)` for each valid gateway
    /// configuration and `FILE: ok (N policies, M namespaces, K pods)` for each valid inventory file
    /// (Kubernetes objects: a top-level `kind:`), or every problem as `file:line: problem` on stderr and
    /// exits 1. Pods and namespaces naming a policy that is in none of the files get a
    /// `file:line: warning: ...` line; warnings alone do not change the exit status (the policy may live in
    /// a file not given).
    Check {
        /// Files to check (see docs/configuration.md).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Explain which gateway (or none) a pod's traffic to a destination uses, and why
    ///
    /// Explain what happens to a pod's traffic to one destination: which annotation applies, which policy
    /// and rule, which gateways (name, IP, node), maxNextHops and preference, and what source the
    /// destination sees; or why there is no gateway, or why the traffic is blocked. Every gateway counts as
    /// healthy. With `--kubeconfig` it reads the live cluster as kubectl does (GET the pod; LIST namespaces,
    /// EgressGatewayPolicies and the gateway pods) and explains from what the node agent would see, within
    /// 10 s. Exits 1 when an input has errors, the API server refuses or does not answer, or the pod is not
    /// found.
    Explain {
        /// Inventory files: Namespace, Pod and EgressGatewayPolicy objects as `kubectl get -o yaml` prints
        /// (or --kubeconfig).
        #[arg(
            long,
            num_args = 1..,
            value_name = "FILE",
            required_unless_present = "kubeconfig",
            conflicts_with = "kubeconfig"
        )]
        inputs: Vec<PathBuf>,
        /// Read the live cluster instead of files: this kubeconfig's current context; without FILE,
        /// $KUBECONFIG, ~/.kube/config or the pod's service account, as kubectl does.
        #[arg(long, num_args = 0..=1, value_name = "FILE")]
        kubeconfig: Option<Option<PathBuf>>,
        /// With --kubeconfig: the label selector of the gateway pods (the node agent's
        /// `kubernetes.gateway_selector`).
        #[arg(
            long,
            value_name = "SELECTOR",
            default_value = config::node::DEFAULT_GATEWAY_SELECTOR,
            value_parser = config::node::label_selector,
            conflicts_with = "inputs"
        )]
        gateway_selector: String,
        /// The client pod.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        pod: String,
        /// The destination address.
        #[arg(long, value_name = "IP")]
        dst: IpAddr,
    },
    /// List a running gateway's live flows (NAT mappings)
    ///
    /// List the live flows (NAT mappings) of a running gateway: pod address and port, the egress IP and
    /// port the outside sees, destination, protocol, uplink, node, start, packets and bytes each way. Reads
    /// `GET /flows` on the gateway's `admin.listen` (default 127.0.0.1:9095; in Kubernetes run it in the
    /// gateway pod with `kubectl exec`). Filters combine.
    Flows {
        /// The gateway's admin address.
        #[arg(long, default_value = "127.0.0.1:9095", value_name = "ADDR:PORT")]
        admin: std::net::SocketAddr,
        /// Only flows of this pod address.
        #[arg(long, value_name = "IP")]
        pod: Option<IpAddr>,
        /// Only the flow(s) on this egress (external) port: what a firewall log shows.
        #[arg(long, value_name = "PORT")]
        egress_port: Option<u16>,
        /// Only flows to this destination address.
        #[arg(long, value_name = "IP")]
        dst: Option<IpAddr>,
        /// At most this many flows (default 10000).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Print the JSON lines as the gateway sends them instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the node agent (client nodes: ip rules, route tables, vxlan device)
    ///
    /// Run the node agent on a client node: it watches EgressGatewayPolicies, Namespaces and Pods through
    /// the Kubernetes API (`kubernetes`: this node's pods, the gateway pods, namespaces' metadata) and/or
    /// reads them from `inputs` files (re-read when they change, or on SIGHUP), probes the gateways'
    /// `/readiness`, and keeps the node's kernel programmed through netlink: the vxlan device with static neighbours and FDB entries,
    /// an ip rule per opted-in pod, per-pod tables with throw, unreachable and multipath routes. SIGTERM
    /// leaves routing in place; `--cleanup` removes everything the agent made. Needs CAP_NET_ADMIN (see
    /// docs/node-agent.md).
    Node {
        /// The agent's configuration file (YAML; see docs/node-agent.md).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// This node's Kubernetes name; overrides `node_name` in the file (in a DaemonSet:
        /// `--node-name=$(NODE_NAME)` from the downward API's spec.nodeName).
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
        /// The node's underlay IPv4 address; overrides `underlay_ip` in the file (in a DaemonSet:
        /// `--underlay-ip=$(HOST_IP)` from status.hostIP).
        #[arg(long, value_name = "IP")]
        underlay_ip: Option<std::net::Ipv4Addr>,
        /// Remove every rule, route, neighbour and FDB entry the agent made, and its vxlan device, then exit.
        #[arg(long)]
        cleanup: bool,
    },
    /// Run the seed scenario in-process and print what each server saw
    ///
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
    if matches!(cli.command, Command::Run { .. } | Command::Node { .. }) {
        // The image's file capabilities are permitted, not effective: make them effective (caps.rs).
        if let Err(e) = caps::raise_permitted() {
            eprintln!("egress-gateway: cannot read or raise capabilities: {e}");
        }
    }
    match cli.command {
        Command::Run { config, tunnel_ip } => match run::run(&config, tunnel_ip) {
            Ok(()) => ExitCode::SUCCESS,
            Err(run::RunError::Config(errors)) => {
                eprintln!("{errors}");
                eprintln!("egress-gateway: not started: the configuration has errors");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("egress-gateway: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Node {
            config,
            node_name,
            underlay_ip,
            cleanup,
        } => match node::agent::run(
            &config,
            &config::node::Overrides {
                node_name,
                underlay_ip,
            },
            cleanup,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(node::agent::AgentError::Config(errors)) => {
                eprintln!("{errors}");
                eprintln!("egress-gateway node: not started: the configuration has errors");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("egress-gateway node: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { files } => check::run(&files),
        Command::Flows {
            admin,
            pod,
            egress_port,
            dst,
            limit,
            json,
        } => flows::run(
            admin,
            &flows::Query {
                pod,
                egress_port,
                dst,
                limit,
            },
            json,
        ),
        Command::Explain {
            inputs,
            kubeconfig,
            gateway_selector,
            pod,
            dst,
        } => explain::run(
            &explain_source(inputs, kubeconfig, gateway_selector),
            &pod,
            dst,
        ),
        Command::Demo { verbose } => match demo::run(verbose) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("egress-gateway demo: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Where `explain` reads from: clap has checked that exactly one of `--inputs` and `--kubeconfig` is given.
fn explain_source(
    inputs: Vec<PathBuf>,
    kubeconfig: Option<Option<PathBuf>>,
    gateway_selector: String,
) -> explain::Source {
    match kubeconfig {
        Some(kubeconfig) => explain::Source::Cluster {
            kubeconfig,
            gateway_selector,
        },
        None => explain::Source::Files(inputs),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::CommandFactory as _;

    use super::*;

    /// The source `egress-gateway explain <args> --pod app/web --dst 192.0.2.1` reads, or clap's error.
    fn explain_args(args: &[&str]) -> Result<explain::Source, clap::Error> {
        let mut all = vec!["egress-gateway", "explain"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--pod", "app/web", "--dst", "192.0.2.1"]);
        match Cli::try_parse_from(all)?.command {
            Command::Explain {
                inputs,
                kubeconfig,
                gateway_selector,
                ..
            } => Ok(explain_source(inputs, kubeconfig, gateway_selector)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn explain_reads_files_or_the_cluster() {
        assert_eq!(
            explain_args(&["--inputs", "a.yaml", "b.yaml"]).unwrap(),
            explain::Source::Files(vec!["a.yaml".into(), "b.yaml".into()])
        );
        assert_eq!(
            explain_args(&["--kubeconfig"]).unwrap(),
            explain::Source::Cluster {
                kubeconfig: None,
                gateway_selector: config::node::DEFAULT_GATEWAY_SELECTOR.to_owned(),
            }
        );
        assert_eq!(
            explain_args(&[
                "--kubeconfig",
                "/k/config",
                "--gateway-selector",
                "role in (gw)"
            ])
            .unwrap(),
            explain::Source::Cluster {
                kubeconfig: Some("/k/config".into()),
                gateway_selector: "role in (gw)".to_owned(),
            }
        );
        // `--kubeconfig=FILE` and the flag last.
        let last = Cli::try_parse_from([
            "egress-gateway",
            "explain",
            "--pod",
            "app/web",
            "--dst",
            "192.0.2.1",
            "--kubeconfig=/k/config",
        ])
        .unwrap();
        assert!(
            matches!(last.command, Command::Explain { kubeconfig: Some(Some(ref k)), .. } if k == Path::new("/k/config")),
            "{last:?}"
        );
    }

    #[test]
    fn explain_wants_exactly_one_source() {
        let neither = explain_args(&[]).unwrap_err();
        assert_eq!(
            neither.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        let both = explain_args(&["--inputs", "a.yaml", "--kubeconfig"]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        let both = explain_args(&["--kubeconfig", "k", "--inputs", "a.yaml"]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        // The selector only means something with --kubeconfig, and is checked as the agent checks it.
        let alone = explain_args(&["--inputs", "a.yaml", "--gateway-selector", "x=y"]).unwrap_err();
        assert_eq!(alone.kind(), clap::error::ErrorKind::ArgumentConflict);
        let bad = explain_args(&["--kubeconfig", "--gateway-selector", "a=b;c"]).unwrap_err();
        assert_eq!(bad.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(bad.to_string().contains("cannot appear"), "{bad}");
    }
}
