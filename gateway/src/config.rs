//! The gateway's configuration file: YAML in, a validated [`GatewayConfig`] out, or every problem found, each
//! as `file:line: problem` with what to do about it.
//!
//! The file is parsed into a tree whose nodes know their line (`marked-yaml`), then walked by hand into
//! the structs ([`decode`]), so that unknown keys, wrong types and bad values are all reported with the line
//! of the key or value at fault, and one run reports every problem. `docs/configuration.md` describes every
//! key.
//!
//! [`GatewayConfig::pipeline`] turns the configuration into the data plane's
//! [`forwarder_core::pipeline::Config`]; [`restart_needed`] tells a reload which changes it cannot apply.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use forwarder_core::conntrack;
use forwarder_core::flow::UplinkId;
use forwarder_core::pipeline::{self, Gateway, UplinkConfig};
use forwarder_core::ports::PortRange;
use ipnet::IpNet;

mod decode;
pub(crate) mod node;
mod probes;
mod reader;
mod sync;
mod value;

/// A validated gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GatewayConfig {
    /// The file it was read from (the name given to [`GatewayConfig::parse`]).
    pub(crate) path: PathBuf,
    /// `tunnel`: the VXLAN side.
    pub(crate) tunnel: TunnelConfig,
    /// `uplinks`, in file order (an uplink's index is its [`UplinkId`]).
    pub(crate) uplinks: Vec<UplinkSpec>,
    /// `conntrack`: table size, per-pod quota and timeouts.
    pub(crate) conntrack: conntrack::Config,
    /// `conntrack.reset_unknown_tcp`: answer a pod's TCP segment that has no flow and cannot open one with a
    /// reset (`pipeline::Config::reset_unknown_tcp`).
    pub(crate) reset_unknown_tcp: bool,
    /// `ports`: the external ports handed out per egress IP.
    pub(crate) ports: PortRange,
    /// `health.listen`: `GET /readiness`, `GET /livez`.
    pub(crate) health_listen: SocketAddr,
    /// `metrics.listen`: `GET /metrics`.
    pub(crate) metrics_listen: SocketAddr,
    /// `admin.listen`: `GET /flows` (the live flows, for `egress-gateway flows`).
    pub(crate) admin_listen: SocketAddr,
    /// `workers`: forwarding threads; 0 means one per CPU core (the runtime resolves it).
    pub(crate) workers: usize,
    /// `drain_seconds`: how long established flows keep being forwarded after SIGTERM.
    pub(crate) drain: Duration,
    /// `log.format`.
    pub(crate) log_format: LogFormat,
    /// `flow_log`: the NAT translation log, when enabled.
    pub(crate) flow_log: Option<FlowLogConfig>,
    /// `kubernetes.kubeconfig`, for `allowed_sources: kubernetes-nodes` (`None`: `$KUBECONFIG`,
    /// `~/.kube/config`, or the pod's service account).
    pub(crate) kubeconfig: Option<PathBuf>,
    /// `probes`: outside targets whose reachability through the uplinks gates readiness.
    pub(crate) probes: Option<ProbesConfig>,
    /// `sync`: state sync with the other replicas of the gateway set.
    pub(crate) sync: Option<SyncConfig>,
}

/// The `sync` section: this replica's place in its gateway set, and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncConfig {
    /// The set's name: replicas of another set are not listened to.
    pub(crate) set: String,
    /// This replica's ordinal.
    pub(crate) ordinal: u16,
    /// UDP port of the sync socket, on the tunnel address.
    pub(crate) port: u16,
    /// The shared key (HMAC-SHA256) every datagram is authenticated with; `None`: peers are told apart by
    /// their addresses alone.
    pub(crate) key_file: Option<PathBuf>,
    /// The other replicas.
    pub(crate) peers: Vec<SyncPeer>,
}

impl SyncConfig {
    /// The set's id on the wire: FNV-1a (32 bits) of its name, so that two sets on one network never mix.
    pub(crate) fn set_id(&self) -> u32 {
        self.set.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        })
    }
}

/// Where a peer's sync socket is: an address, or a DNS name resolved while the gateway runs (a
/// StatefulSet pod's name under its headless Service, which follows the pod to its new IP).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum PeerAddress {
    /// A fixed IPv4 address and port.
    Ip(SocketAddrV4),
    /// A host name (lower case) and port.
    Name { host: String, port: u16 },
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(a) => a.fmt(f),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// One entry of `sync.peers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyncPeer {
    /// Its ordinal.
    pub(crate) ordinal: u16,
    /// Its sync socket.
    pub(crate) address: PeerAddress,
    /// Its egress IPs, each with the index of the uplink (here) it is on.
    pub(crate) egress: Vec<(usize, IpAddr)>,
}

/// The `probes` section: ICMP echo and TCP connect probes sent from an egress IP through the gateway's own
/// uplinks (see `upstream`). While every target of a kind stays unanswered for `timeout`, the gateway is
/// not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbesConfig {
    /// How often each target is probed.
    pub(crate) interval: Duration,
    /// A target is down when none of its probes was answered for this long (and until its first answer).
    pub(crate) timeout: Duration,
    /// ICMP echo targets (RFC 792, RFC 4443).
    pub(crate) icmp: Vec<IpAddr>,
    /// TCP connect targets: a SYN answered by a SYN-ACK (RFC 9293 §3.5).
    pub(crate) tcp: Vec<SocketAddr>,
}

/// How many source ports (and ICMP echo identifiers) the probes use, next to the `ports` range.
pub(crate) const PROBE_PORTS: u16 = 16;

/// The ports (and ICMP identifiers) the probes send from: [`PROBE_PORTS`] just below `ports.min`, or, when
/// the range starts at 1, just above `ports.max`, so that no NAT mapping can ever take them. `None` when
/// `ports` covers 1..=65535.
pub(crate) fn probe_ports(ports: PortRange) -> Option<std::ops::RangeInclusive<u16>> {
    if ports.min > 1 {
        Some(ports.min.saturating_sub(PROBE_PORTS).max(1)..=ports.min - 1)
    } else if ports.max < u16::MAX {
        Some(ports.max + 1..=ports.max.saturating_add(PROBE_PORTS))
    } else {
        None
    }
}

/// The `flow_log` section: one JSON line per flow for the security team's pod ↔ egress IP:port mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FlowLogConfig {
    /// Where the lines go.
    pub(crate) output: FlowLogOutput,
    /// Rotate the file when it reaches this size.
    pub(crate) max_bytes: u64,
    /// Rotated files kept (`file.1` … `file.N`).
    pub(crate) max_files: u32,
    /// Records buffered between the data path and the writer; beyond it records are dropped and counted.
    pub(crate) queue: usize,
    /// Also a record when a flow starts (always one when it ends).
    pub(crate) starts: bool,
    /// Files or directories of Pod objects naming the pods in the records (`namespace/name`).
    pub(crate) pod_names: Vec<PathBuf>,
}

/// `flow_log.output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FlowLogOutput {
    /// Standard output (a container's log).
    Stdout,
    /// A file, rotated by size.
    File(PathBuf),
}

/// The `tunnel` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TunnelConfig {
    /// UDP address the VXLAN socket listens on; its IP is also the nodes' next hop (`tunnel_ip`).
    pub(crate) listen: SocketAddrV4,
    /// VXLAN network identifier (24 bits).
    pub(crate) vni: u32,
    /// Underlay CIDRs of the nodes allowed to send VXLAN (IPv4); empty with `allowed_from_nodes`.
    pub(crate) allowed_sources: Vec<IpNet>,
    /// `allowed_sources: kubernetes-nodes`: the InternalIPs of the cluster's Node objects, watched.
    pub(crate) allowed_from_nodes: bool,
    /// Inner source CIDRs that may be translated.
    pub(crate) pod_cidrs: Vec<IpNet>,
    /// MTU inside the tunnel.
    pub(crate) mtu: u16,
    /// The gateway's IPv6 address inside the tunnel (source of the ICMPv6 errors it sends).
    pub(crate) ipv6_address: Option<Ipv6Addr>,
    /// How many outer UDP source ports the gateway sends from, each inner flow on one of them chosen by a
    /// hash of the flow (RFC 7348 §5).
    pub(crate) source_ports: u16,
}

/// `tunnel.source_ports` when the file does not say.
pub(crate) const DEFAULT_SOURCE_PORTS: u16 = 16;
/// `tunnel.allowed_sources: kubernetes-nodes`: admit the InternalIPs of the cluster's Node objects.
pub(crate) const ALLOWED_FROM_NODES: &str = "kubernetes-nodes";
/// The most `tunnel.source_ports` may ask for (one socket each).
pub(crate) const MAX_SOURCE_PORTS: u16 = 256;

/// One entry of `uplinks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UplinkSpec {
    /// Name in logs and metrics.
    pub(crate) name: String,
    /// Linux network interface.
    pub(crate) interface: String,
    /// Addresses pod traffic is translated to (IPv4 and/or IPv6).
    pub(crate) egress_ips: Vec<IpAddr>,
    /// IPv4 router; `None` when destinations are on-link.
    pub(crate) next_hop: Option<Ipv4Addr>,
    /// IPv6 router; `None` when destinations are on-link.
    pub(crate) next_hop_v6: Option<Ipv6Addr>,
    /// Link MTU.
    pub(crate) mtu: u16,
    /// Destination prefixes sent out on this uplink.
    pub(crate) routes: Vec<IpNet>,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl GatewayConfig {
    /// Reads and validates; on failure every problem found, each `file:line: problem`.
    pub(crate) fn load(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
        GatewayConfig::parse(&read_file(path)?, path)
    }

    /// [`load`](Self::load), then `tunnel_ip` (the pod's own IP, `--tunnel-ip`) replaces the address of
    /// `tunnel.listen`, keeping its port: one file serves a pod whose IP changes on every restart.
    pub(crate) fn load_with(
        path: &Path,
        tunnel_ip: Option<Ipv4Addr>,
    ) -> Result<GatewayConfig, ConfigErrors> {
        let mut config = GatewayConfig::load(path)?;
        if let Some(ip) = tunnel_ip {
            config.tunnel.listen.set_ip(ip);
        }
        Ok(config)
    }

    /// Parses from a string (for tests and reload), `name` used in messages as the file name.
    pub(crate) fn parse(text: &str, name: &Path) -> Result<GatewayConfig, ConfigErrors> {
        let root = reader::parse_yaml(text, name).map_err(|e| ConfigErrors(vec![e]))?;
        if let Some((kind, _)) = decode::kind(&root) {
            return Err(ConfigErrors(vec![ConfigError::new(
                name,
                None,
                format!(
                    "not a gateway configuration (kind: {kind}); this is an inventory file (Kubernetes objects): check it with `egress-gateway check`, use it with `egress-gateway explain --inputs`"
                ),
            )]));
        }
        let config = decode_all(name, |r| decode::gateway(r, &root))?;
        Ok(GatewayConfig {
            path: name.to_owned(),
            ..config
        })
    }

    /// The data-plane configuration for [`Gateway::new`]: uplinks in file order, each route pointing at the
    /// index of its uplink. `hash_seed` keys the flow table's hash (pass OS randomness).
    pub(crate) fn pipeline(&self, hash_seed: Option<u64>) -> pipeline::Config {
        let uplinks = self
            .uplinks
            .iter()
            .map(|u| UplinkConfig {
                name: u.name.clone(),
                mtu: u.mtu,
                egress_v4: u
                    .egress_ips
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V4(a) => Some(*a),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
                egress_v6: u
                    .egress_ips
                    .iter()
                    .filter_map(|ip| match ip {
                        IpAddr::V6(a) => Some(*a),
                        IpAddr::V4(_) => None,
                    })
                    .collect(),
                next_hop_v4: u.next_hop,
                next_hop_v6: u.next_hop_v6,
            })
            .collect();
        let routes = self
            .uplinks
            .iter()
            .enumerate()
            .flat_map(|(i, u)| {
                // `parse` refuses more uplinks than an UplinkId can number, so this never saturates.
                let id = UplinkId::try_from(i).unwrap_or(UplinkId::MAX);
                u.routes.iter().map(move |net| (*net, id))
            })
            .collect();
        pipeline::Config {
            vni: self.tunnel.vni,
            tunnel_ip: *self.tunnel.listen.ip(),
            tunnel_ip6: self.tunnel.ipv6_address,
            allowed_nodes: self.tunnel.allowed_sources.clone(),
            pod_cidrs: self.tunnel.pod_cidrs.clone(),
            tunnel_mtu: self.tunnel.mtu,
            uplinks,
            routes,
            hash_seed,
            probe_ports: self.probes.as_ref().and_then(|_| probe_ports(self.ports)),
            reset_unknown_tcp: self.reset_unknown_tcp,
            ..pipeline::Config::default()
        }
    }

    /// Number of routes over all uplinks.
    pub(crate) fn route_count(&self) -> usize {
        self.uplinks.iter().map(|u| u.routes.len()).sum()
    }

    /// Builds the data plane from this configuration (with a tiny flow table) to confirm it accepts it.
    /// `parse` already checks everything the data plane checks; this guards against the two drifting apart.
    pub(crate) fn check_data_plane(&self) -> Result<(), ConfigError> {
        let conntrack = conntrack::Config {
            max_entries: 1,
            ..self.conntrack
        };
        Gateway::new(self.pipeline(None), conntrack, self.ports)
            .map(drop)
            .map_err(|e| {
                ConfigError::new(
                    &self.path,
                    None,
                    format!("the data plane refuses this configuration: {e}"),
                )
            })
    }
}

/// The keys whose change a reload cannot apply (the running gateway must be restarted), as key paths
/// (`tunnel.listen`, `uplinks[0].interface`, ...); empty when `new` can be applied by a reload.
///
/// Sockets, interfaces, threads and the flow table with its port pools are set up once at start; routes,
/// allowed sources, pod CIDRs, next hops, MTUs and timeouts can change at run time.
#[cfg_attr(not(test), allow(dead_code))] // called by the runtime's reload, which lands separately
pub(crate) fn restart_needed(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let mut keys = Vec::new();
    let mut check = |key: &str, changed: bool| {
        if changed {
            keys.push(key.to_owned());
        }
    };
    check("tunnel.listen", old.tunnel.listen != new.tunnel.listen);
    check(
        "tunnel.source_ports",
        old.tunnel.source_ports != new.tunnel.source_ports,
    );
    check(
        "tunnel.allowed_sources (between a list and kubernetes-nodes)",
        old.tunnel.allowed_from_nodes != new.tunnel.allowed_from_nodes,
    );
    check("kubernetes.kubeconfig", old.kubeconfig != new.kubeconfig);
    if old.uplinks.len() == new.uplinks.len() {
        for (i, (a, b)) in old.uplinks.iter().zip(&new.uplinks).enumerate() {
            check(
                &format!("uplinks[{i}].interface"),
                a.interface != b.interface,
            );
            let (mut ea, mut eb) = (a.egress_ips.clone(), b.egress_ips.clone());
            ea.sort_unstable();
            eb.sort_unstable();
            check(&format!("uplinks[{i}].egress_ips"), ea != eb);
            check(&format!("uplinks[{i}].mtu"), a.mtu != b.mtu);
        }
    } else {
        check("uplinks (an uplink was added or removed)", true);
    }
    check("health.listen", old.health_listen != new.health_listen);
    check("metrics.listen", old.metrics_listen != new.metrics_listen);
    check("admin.listen", old.admin_listen != new.admin_listen);
    check("workers", old.workers != new.workers);
    check(
        "conntrack.max_entries",
        old.conntrack.max_entries != new.conntrack.max_entries,
    );
    // The flow table fixes its quota, timeouts and port reuse delay when it is built.
    check(
        "conntrack.max_per_source",
        old.conntrack.max_per_source != new.conntrack.max_per_source,
    );
    check(
        "conntrack timeouts",
        old.conntrack.timeouts != new.conntrack.timeouts,
    );
    check(
        "conntrack.port_reuse_delay",
        old.conntrack.port_reuse_delay != new.conntrack.port_reuse_delay,
    );
    // Workers size their segment buffers and the segment size of tunnel super-packets from the MTUs.
    check("tunnel.mtu", old.tunnel.mtu != new.tunnel.mtu);
    check("ports", old.ports != new.ports);
    check("log.format", old.log_format != new.log_format);
    // The writer thread and the table's event queue are set up at start.
    check("flow_log", old.flow_log != new.flow_log);
    // The prober's sockets, filters and per-target metrics are set up at start.
    check("probes", old.probes != new.probes);
    // The sync thread, its socket, key and the peers' tables of copies are set up at start.
    check("sync", old.sync != new.sync);
    keys
}

/// The text of a configuration file, or the error saying it cannot be read.
fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            path,
            None,
            format!("cannot read the file: {e}; check the path and its permissions"),
        )])
    })
}

/// Runs `decode` over a [`reader::Reader`] of file `name`: its value when nothing was reported, else every
/// problem in line order.
fn decode_all<T>(
    name: &Path,
    decode: impl FnOnce(&mut reader::Reader<'_>) -> Option<T>,
) -> Result<T, ConfigErrors> {
    let mut reader = reader::Reader::new(name);
    let config = decode(&mut reader);
    let mut errors = reader.into_errors();
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => {
            if errors.is_empty() {
                // Every path that rejects a value reports it; this only guards against a silent refusal.
                errors.push(ConfigError::new(name, None, "the configuration is invalid"));
            }
            errors.sort_by_key(|e| e.line);
            Err(ConfigErrors(errors))
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigErrors(pub(crate) Vec<ConfigError>);

/// One problem: where, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    /// The file.
    pub(crate) file: PathBuf,
    /// 1-based line of the offending key or value, when the problem has one.
    pub(crate) line: Option<usize>,
    /// What is wrong and what to do.
    pub(crate) message: String,
}

impl ConfigError {
    pub(crate) fn new(file: &Path, line: Option<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use forwarder_core::conntrack::Timeouts;

    use super::*;

    /// A configuration with every section.
    const EXAMPLE: &str = "\
tunnel:
  listen: 172.18.0.3:4790
  vni: 4097
  allowed_sources: [172.18.0.0/16]
  pod_cidrs: [10.244.0.0/16]
  mtu: 1450
  ipv6_address: fd00::3
uplinks:
  - name: dmz
    interface: gwdmz
    egress_ips: [203.0.113.10]
    next_hop: 203.0.113.1
    next_hop_v6: 2001:db8:1::1
    mtu: 1500
    routes: [0.0.0.0/0]
  - name: internal
    interface: gwint
    egress_ips: [10.50.0.10]
    routes: [10.50.0.0/16]
conntrack: { max_entries: 1048576, max_per_source: 16384, udp_timeout: 300s, tcp_established_timeout: 7440s,
             tcp_transitory_timeout: 240s, icmp_timeout: 60s, port_reuse_delay: 120s }
ports: { min: 1024, max: 65535 }
health: { listen: 0.0.0.0:8080 }
metrics: { listen: 0.0.0.0:9090 }
workers: 0
drain_seconds: 30
log: { format: text }
";

    /// Only the required keys; line numbers below refer to this text.
    const BASE: &str = "\
tunnel:
  listen: 172.18.0.3:4790
  vni: 4097
  allowed_sources: [172.18.0.0/16]
  pod_cidrs: [10.244.0.0/16]
  mtu: 1450
uplinks:
  - name: dmz
    interface: gwdmz
    egress_ips: [203.0.113.10]
    next_hop: 203.0.113.1
    routes: [0.0.0.0/0]
  - name: internal
    interface: gwint
    egress_ips: [10.50.0.10]
    routes: [10.50.0.0/16]
";

    const FILE: &str = "gw.yaml";

    fn parse(text: &str) -> Result<GatewayConfig, ConfigErrors> {
        GatewayConfig::parse(text, Path::new(FILE))
    }

    /// BASE with `from` replaced by `to` (which must occur).
    fn edit(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from:?} not in BASE");
        BASE.replacen(from, to, 1)
    }

    /// The problems reported for `text`, as printed.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    /// Asserts that `text` is refused with exactly one problem, on `line`, containing `fragment`.
    #[track_caller]
    fn refused(text: &str, line: usize, fragment: &str) {
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let prefix = format!("{FILE}:{line}: ");
        assert!(
            errors[0].starts_with(&prefix) && errors[0].contains(fragment),
            "expected `{prefix}...{fragment}...`, got {errors:#?}"
        );
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn expected_example() -> GatewayConfig {
        GatewayConfig {
            path: PathBuf::from(FILE),
            tunnel: TunnelConfig {
                listen: "172.18.0.3:4790".parse().unwrap(),
                vni: 4097,
                allowed_sources: vec![net("172.18.0.0/16")],
                allowed_from_nodes: false,
                pod_cidrs: vec![net("10.244.0.0/16")],
                source_ports: DEFAULT_SOURCE_PORTS,
                mtu: 1450,
                ipv6_address: Some("fd00::3".parse().unwrap()),
            },
            uplinks: vec![
                UplinkSpec {
                    name: "dmz".into(),
                    interface: "gwdmz".into(),
                    egress_ips: vec!["203.0.113.10".parse().unwrap()],
                    next_hop: Some(Ipv4Addr::new(203, 0, 113, 1)),
                    next_hop_v6: Some("2001:db8:1::1".parse().unwrap()),
                    mtu: 1500,
                    routes: vec![net("0.0.0.0/0")],
                },
                UplinkSpec {
                    name: "internal".into(),
                    interface: "gwint".into(),
                    egress_ips: vec!["10.50.0.10".parse().unwrap()],
                    next_hop: None,
                    next_hop_v6: None,
                    mtu: 1500,
                    routes: vec![net("10.50.0.0/16")],
                },
            ],
            conntrack: conntrack::Config {
                max_entries: 1_048_576,
                max_per_source: 16384,
                timeouts: Timeouts {
                    udp: Duration::from_secs(300),
                    tcp_established: Duration::from_secs(7440),
                    tcp_transitory: Duration::from_secs(240),
                    icmp: Duration::from_secs(60),
                },
                port_reuse_delay: Duration::from_secs(120),
            },
            reset_unknown_tcp: true,
            ports: PortRange {
                min: 1024,
                max: 65535,
            },
            health_listen: "0.0.0.0:8080".parse().unwrap(),
            metrics_listen: "0.0.0.0:9090".parse().unwrap(),
            admin_listen: "127.0.0.1:9095".parse().unwrap(),
            workers: 0,
            drain: Duration::from_secs(30),
            log_format: LogFormat::Text,
            flow_log: None,
            kubeconfig: None,
            probes: None,
            sync: None,
        }
    }

    #[test]
    fn the_tunnel_ip_from_the_command_line_replaces_the_files() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/gateway.yaml"
        ));
        let c = GatewayConfig::load_with(path, Some(Ipv4Addr::new(10, 244, 7, 9))).unwrap();
        assert_eq!(c.tunnel.listen, "10.244.7.9:4790".parse().unwrap());
        assert_eq!(c.pipeline(None).tunnel_ip, Ipv4Addr::new(10, 244, 7, 9));
        assert_eq!(
            GatewayConfig::load_with(path, None).unwrap(),
            GatewayConfig::load(path).unwrap()
        );
    }

    /// A `sync` section for BASE: this replica ordinal 0, one peer (lines 17 to 24).
    const SYNC: &str = "sync:
  set: egress-red
  ordinal: 0
  key_file: /etc/egress/sync/key
  peers:
    - ordinal: 1
      address: 172.18.0.4:4792
      uplinks: [{ name: dmz, egress_ips: [203.0.113.11, '2001:db8:113::11'] }, { name: internal, egress_ips: [10.50.0.11] }]
";

    #[test]
    fn sync_section() {
        let c = parse(&format!("{BASE}{SYNC}")).unwrap();
        let s = c.sync.as_ref().unwrap();
        assert_eq!((s.set.as_str(), s.ordinal, s.port), ("egress-red", 0, 4792));
        assert_eq!(s.key_file, Some(PathBuf::from("/etc/egress/sync/key")));
        assert_eq!(s.peers.len(), 1);
        let p = &s.peers[0];
        assert_eq!(
            (p.ordinal, &p.address),
            (1, &PeerAddress::Ip("172.18.0.4:4792".parse().unwrap()))
        );
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        assert_eq!(
            p.egress,
            vec![
                (0, ip("203.0.113.11")),
                (0, ip("2001:db8:113::11")),
                (1, ip("10.50.0.11"))
            ]
        );
        // FNV-1a 32 of the name, as every replica computes it
        assert_eq!(s.set_id(), 0xeead_d8f8);
        assert_ne!(
            s.set_id(),
            SyncConfig {
                set: "egress-blue".into(),
                ..s.clone()
            }
            .set_id()
        );
        // a change needs a restart
        let mut other = c.clone();
        other.sync.as_mut().unwrap().peers[0].address =
            PeerAddress::Ip("172.18.0.5:4792".parse().unwrap());
        assert_eq!(restart_needed(&c, &other), vec!["sync"]);
    }

    #[test]
    fn sync_section_errors() {
        // (in SYNC, replaced by, line, message)
        for (from, to, line, message) in [
            (
                "ordinal: 1",
                "ordinal: 0",
                22,
                "sync.peers[0].ordinal: 0 is this replica's own ordinal",
            ),
            (
                "name: internal",
                "name: inside",
                24,
                "no uplink here is named `inside` (uplinks: dmz, internal)",
            ),
            (
                "203.0.113.11",
                "203.0.113.10",
                24,
                "egress IP 203.0.113.10 already belongs to this replica",
            ),
            (
                "172.18.0.4:4792",
                "172.18.0.4",
                23,
                "`172.18.0.4` is not a peer address",
            ),
            (
                "set: egress-red",
                "set: 'egress red'",
                18,
                "`egress red` is not a set name",
            ),
            (
                "  ordinal: 0\n",
                "  ordinal: 64\n",
                19,
                "sync.ordinal: 64 is out of range",
            ),
        ] {
            refused(&format!("{BASE}{}", SYNC.replace(from, to)), line, message);
        }
        refused(
            &format!("{BASE}sync: {{ set: red, ordinal: 0, peers: [] }}\n"),
            17,
            "sync.peers: the list is empty",
        );
    }

    #[test]
    fn probes_section() {
        // BASE is 16 lines; the section starts on line 17.
        let c = parse(&format!(
            "{BASE}probes:\n  interval: 1s\n  timeout: 3s\n  icmp: [198.51.100.1, 10.50.0.1]\n  tcp: ['198.51.100.1:443']\n"
        ))
        .unwrap();
        assert_eq!(
            c.probes,
            Some(ProbesConfig {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(3),
                icmp: vec![
                    "198.51.100.1".parse().unwrap(),
                    "10.50.0.1".parse().unwrap()
                ],
                tcp: vec!["198.51.100.1:443".parse().unwrap()],
            })
        );
        // Calico Enterprise's ICMP probe defaults.
        let p = parse(&format!("{BASE}probes: {{ icmp: [198.51.100.1] }}\n"))
            .unwrap()
            .probes
            .unwrap();
        assert_eq!(
            (p.interval, p.timeout, p.tcp.len()),
            (Duration::from_secs(5), Duration::from_secs(15), 0)
        );
        assert_eq!(parse(BASE).unwrap().probes, None);

        refused(
            &format!("{BASE}probes: {{ interval: 2s, timeout: 2s, icmp: [198.51.100.1] }}\n"),
            17,
            "probes: timeout (2s) must be longer than interval (2s)",
        );
        refused(
            &format!("{BASE}probes:\n  interval: 20s\n  icmp: [198.51.100.1]\n"),
            18,
            "timeout (15s) must be longer than interval (20s)",
        );
        refused(
            &format!("{BASE}probes: {{ interval: 10ms, icmp: [198.51.100.1] }}\n"),
            17,
            "probes.interval: 10ms is out of range; use a duration at least 100ms",
        );
        refused(
            &format!("{BASE}probes: {{ interval: 1s }}\n"),
            17,
            "probes: no targets",
        );
        refused(
            &format!("{BASE}probes:\n  icmp:\n    - 198.51.100.1\n    - 203.0.113.10\n"),
            20,
            "probes.icmp[1]: 203.0.113.10 is one of the gateway's own egress IPs",
        );
        refused(
            &format!("{BASE}probes:\n  icmp: [198.51.100.1]\n  tcp: ['198.51.100.1:443', '198.51.100.1:443']\n"),
            19,
            "probes.tcp[1]: tcp 198.51.100.1:443 is listed twice (first on line 19)",
        );
        refused(
            &format!("{BASE}probes: {{ tcp: [198.51.100.1] }}\n"),
            17,
            "probes.tcp[0]: `198.51.100.1` has no port",
        );
        refused(
            &format!("{BASE}probes: {{ tcp: ['198.51.100.1:0'] }}\n"),
            17,
            "port 0 cannot be connected to",
        );
        refused(
            &format!("{BASE}probes: {{ icmp: [127.0.0.1] }}\n"),
            17,
            "127.0.0.1 is a loopback address",
        );
        refused(
            &format!("{BASE}probes: {{ icmp: ['2001:db8::1'] }}\n"),
            17,
            "probes.icmp[0]: no uplink routes 2001:db8::1",
        );
        refused(
            &format!("{BASE}probes: {{ icmp: [198.51.100.1], count: 3 }}\n"),
            17,
            "unknown key `count` in probes; known keys are interval, timeout, icmp, tcp",
        );
        refused(
            &format!("{BASE}ports: {{ min: 1 }}\nprobes: {{ icmp: [198.51.100.1] }}\n"),
            18,
            "probes: `ports` covers every port (1..=65535)",
        );
        // Every problem of the section at once.
        let e = errors(&format!(
            "{BASE}probes:\n  timeout: 1s\n  interval: 1s\n  icmp: [203.0.113.10]\n"
        ));
        assert_eq!(e.len(), 2, "{e:#?}");
        assert!(
            e[0].starts_with("gw.yaml:18: probes: timeout (1s)"),
            "{e:#?}"
        );
        assert!(
            e[1].starts_with("gw.yaml:20: probes.icmp[0]: 203.0.113.10"),
            "{e:#?}"
        );
        // A range starting at 1 leaves the ports above it.
        let c = parse(&format!(
            "{BASE}ports: {{ min: 1, max: 60000 }}\nprobes: {{ icmp: [198.51.100.1] }}\n"
        ))
        .unwrap();
        assert_eq!(probe_ports(c.ports), Some(60001..=60016));
        assert_eq!(probe_ports(PortRange::default()), Some(1008..=1023));
        assert_eq!(probe_ports(PortRange { min: 5, max: 9 }), Some(1..=4));
        assert_eq!(
            probe_ports(PortRange { min: 1, max: 65530 }),
            Some(65531..=65535)
        );
        // Too many targets.
        let many: Vec<String> = (1..=65).map(|i| format!("198.51.100.{i}")).collect();
        refused(
            &format!("{BASE}probes: {{ icmp: [{}] }}\n", many.join(", ")),
            17,
            "probes: 65 targets; at most 64 are supported",
        );
        // Changing the probes needs a restart.
        let old = parse(&format!("{BASE}probes: {{ icmp: [198.51.100.1] }}\n")).unwrap();
        let new = parse(&format!("{BASE}probes: {{ icmp: [198.51.100.2] }}\n")).unwrap();
        assert_eq!(restart_needed(&old, &new), ["probes"]);
    }

    #[test]
    fn flow_log_and_admin_sections() {
        let c = parse(&format!(
            "{BASE}admin: {{ listen: 127.0.0.1:9200 }}\nflow_log: {{ output: /var/log/egress/flows.jsonl, max_bytes: 8192, \
             max_files: 3, queue: 1024, starts: false, pod_names: [/etc/egress/pods] }}\n"
        ))
        .unwrap();
        assert_eq!(c.admin_listen, "127.0.0.1:9200".parse().unwrap());
        assert_eq!(
            c.flow_log,
            Some(FlowLogConfig {
                output: FlowLogOutput::File("/var/log/egress/flows.jsonl".into()),
                max_bytes: 8192,
                max_files: 3,
                queue: 1024,
                starts: false,
                pod_names: vec!["/etc/egress/pods".into()],
            })
        );
        let c = parse(&format!("{BASE}flow_log: {{ output: stdout }}\n")).unwrap();
        let f = c.flow_log.unwrap();
        assert_eq!(f.output, FlowLogOutput::Stdout);
        assert_eq!(
            (f.max_bytes, f.max_files, f.queue, f.starts),
            (100 << 20, 5, 65_536, true)
        );
        assert_eq!(parse(BASE).unwrap().flow_log, None);
        assert_eq!(
            parse(BASE).unwrap().admin_listen,
            "127.0.0.1:9095".parse().unwrap()
        );

        let e = errors(&format!(
            "{BASE}flow_log: {{ output: flows.jsonl, starts: maybe, pod_names: [pods] }}\n"
        ))
        .join("\n");
        assert!(
            e.contains("flow_log.output: `flows.jsonl` is not an absolute path"),
            "{e}"
        );
        assert!(
            e.contains("flow_log.starts: `maybe` is not true or false"),
            "{e}"
        );
        assert!(
            e.contains("flow_log.pod_names[0]: `pods` is not an absolute path"),
            "{e}"
        );
        let e = errors(&format!("{BASE}admin: {{ listen: 0.0.0.0:9090 }}\n")).join("\n");
        assert!(
            e.contains(
                "metrics.listen 0.0.0.0:9090 and admin.listen 0.0.0.0:9090 use the same port"
            ),
            "{e}"
        );
        // Changing the log needs a restart; the admin address too.
        let old = parse(BASE).unwrap();
        let new = parse(&format!("{BASE}flow_log: {{ output: stdout }}\n")).unwrap();
        assert_eq!(restart_needed(&old, &new), ["flow_log"]);
        let new = parse(&format!("{BASE}admin: {{ listen: 127.0.0.1:9200 }}\n")).unwrap();
        assert_eq!(restart_needed(&old, &new), ["admin.listen"]);
    }

    #[test]
    fn the_example_parses_to_the_expected_values() {
        assert_eq!(parse(EXAMPLE), Ok(expected_example()));
    }

    #[test]
    fn the_shipped_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.yaml");
        let config = GatewayConfig::load(&path).unwrap();
        let expected = GatewayConfig {
            path,
            tunnel: TunnelConfig {
                ipv6_address: None,
                ..expected_example().tunnel
            },
            ..expected_example()
        };
        let mut expected = expected;
        expected.uplinks[0].next_hop_v6 = None;
        assert_eq!(config, expected);
        assert_eq!(config.route_count(), 2);
        assert_eq!(config.check_data_plane(), Ok(()));
    }

    #[test]
    fn omitted_sections_take_their_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.conntrack, conntrack::Config::default());
        assert_eq!(c.ports, PortRange::default());
        assert_eq!(c.health_listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.metrics_listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(c.workers, 0);
        assert_eq!(c.drain, Duration::from_secs(30));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.tunnel.ipv6_address, None);
        assert_eq!(c.uplinks[0].mtu, 1500);
        assert_eq!(c.uplinks[1].next_hop, None);
        assert_eq!(c.uplinks[1].next_hop_v6, None);
        // The example spells out the defaults, so both agree apart from the optional IPv6 keys.
        let mut example = parse(EXAMPLE).unwrap();
        example.tunnel.ipv6_address = None;
        example.uplinks[0].next_hop_v6 = None;
        assert_eq!(c, example);
        // Empty sections and empty optional values also mean the defaults.
        let empty = format!("{BASE}conntrack: {{}}\nports: {{}}\nhealth:\nmetrics: {{ listen: ~ }}\nworkers:\nlog: {{}}\n");
        assert_eq!(parse(&empty), Ok(c));
    }

    #[test]
    fn durations_in_every_form() {
        let c = parse(&format!(
            "{BASE}conntrack:\n  udp_timeout: 5m\n  tcp_established_timeout: 2h4m\n  tcp_transitory_timeout: 240\n  \
             icmp_timeout: 1500ms\n  port_reuse_delay: 0\n"
        ))
        .unwrap();
        let t = c.conntrack.timeouts;
        assert_eq!(t.udp, Duration::from_secs(300));
        assert_eq!(t.tcp_established, Duration::from_secs(7440));
        assert_eq!(t.tcp_transitory, Duration::from_secs(240));
        assert_eq!(t.icmp, Duration::from_millis(1500));
        assert_eq!(c.conntrack.port_reuse_delay, Duration::ZERO);
        refused(
            &format!("{BASE}conntrack:\n  icmp_timeout: 1 minute\n"),
            18,
            "conntrack.icmp_timeout: `1 minute` is not a duration; write e.g. 300s",
        );
        refused(
            &format!("{BASE}conntrack:\n  icmp_timeout: 0s\n"),
            18,
            "conntrack.icmp_timeout: 0s is too short",
        );
    }

    #[test]
    fn resets_for_unknown_tcp_are_on_unless_switched_off() {
        assert!(
            parse(&format!("{BASE}conntrack: {{}}\n"))
                .unwrap()
                .reset_unknown_tcp
        );
        let off = parse(&format!("{BASE}conntrack:\n  reset_unknown_tcp: false\n")).unwrap();
        assert!(!off.reset_unknown_tcp);
        assert!(!off.pipeline(None).reset_unknown_tcp);
        refused(
            &format!("{BASE}conntrack:\n  reset_unknown_tcp: no\n"),
            18,
            "conntrack.reset_unknown_tcp: `no` is not true or false",
        );
    }

    #[test]
    fn the_pipeline_config_is_accepted_by_the_data_plane() {
        let c = parse(EXAMPLE).unwrap();
        let p = c.pipeline(Some(7));
        assert_eq!(p.vni, 4097);
        assert_eq!(p.tunnel_ip, Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(p.tunnel_ip6, Some("fd00::3".parse().unwrap()));
        assert_eq!(p.allowed_nodes, vec![net("172.18.0.0/16")]);
        assert_eq!(p.pod_cidrs, vec![net("10.244.0.0/16")]);
        assert_eq!(p.tunnel_mtu, 1450);
        assert_eq!(p.hash_seed, Some(7));
        assert_eq!(
            p.routes,
            vec![(net("0.0.0.0/0"), 0), (net("10.50.0.0/16"), 1)]
        );
        assert_eq!(p.uplinks[0].name, "dmz");
        assert_eq!(p.uplinks[0].egress_v4, vec![Ipv4Addr::new(203, 0, 113, 10)]);
        assert_eq!(
            p.uplinks[0].next_hop_v4,
            Some(Ipv4Addr::new(203, 0, 113, 1))
        );
        assert_eq!(p.uplinks[1].next_hop_v4, None);
        let conntrack = conntrack::Config {
            max_entries: 4096,
            ..c.conntrack
        };
        let gateway = Gateway::new(p, conntrack, c.ports).unwrap();
        assert_eq!(gateway.table().pools().len(), 2);
        // A reload builds the data plane around the running table.
        let reloaded = parse(&EXAMPLE.replace(
            "routes: [10.50.0.0/16]",
            "routes: [10.50.0.0/16, 10.60.0.0/16]",
        ))
        .unwrap();
        assert!(restart_needed(&c, &reloaded).is_empty());
        Gateway::with_table(reloaded.pipeline(Some(7)), Arc::clone(gateway.table())).unwrap();
    }

    #[test]
    fn dual_stack_uplinks_split_their_egress_ips_by_family() {
        let text = edit(
            "    egress_ips: [203.0.113.10]\n    next_hop: 203.0.113.1\n    routes: [0.0.0.0/0]\n",
            "    egress_ips: [203.0.113.10, 2001:db8:1::10]\n    next_hop: 203.0.113.1\n    \
             next_hop_v6: 2001:db8:1::1\n    routes: [0.0.0.0/0, '::/0']\n",
        )
        .replace(
            "pod_cidrs: [10.244.0.0/16]",
            "pod_cidrs: [10.244.0.0/16, fd00:10:244::/56]",
        );
        let c = parse(&text).unwrap();
        let p = c.pipeline(None);
        assert_eq!(p.uplinks[0].egress_v4, vec![Ipv4Addr::new(203, 0, 113, 10)]);
        assert_eq!(
            p.uplinks[0].egress_v6,
            vec!["2001:db8:1::10".parse::<Ipv6Addr>().unwrap()]
        );
        assert_eq!(
            p.uplinks[0].next_hop_v6,
            Some("2001:db8:1::1".parse().unwrap())
        );
        assert_eq!(p.routes[1], (net("::/0"), 0));
        assert_eq!(c.check_data_plane(), Ok(()));
    }

    #[test]
    fn yaml_syntax_errors() {
        refused(
            &edit("vni: 4097", "vni: [4097"),
            4,
            "YAML syntax error at column",
        );
        refused(
            "tunnel:\n  listen: [1\n",
            2,
            "YAML syntax error at the end of the file",
        );
        refused(
            &edit("  mtu: 1450", "  vni: 1"),
            6,
            "key `vni` appears twice in this mapping (first on line 3)",
        );
        refused("- tunnel\n", 1, "the file must be a YAML mapping");
        refused(
            &edit("vni: 4097", "vni: &v 4097"),
            3,
            "anchors and aliases are not supported",
        );
        refused(
            &format!("{BASE}---\nworkers: 2\n"),
            17,
            "a second YAML document starts here",
        );
    }

    #[test]
    fn wrong_types() {
        refused(
            &edit("vni: 4097", "vni: [4097]"),
            3,
            "tunnel.vni: expected a single value, found a list",
        );
        refused(
            &edit("vni: 4097", "vni: four"),
            3,
            "tunnel.vni: `four` is not a whole number",
        );
        refused(
            &edit("pod_cidrs: [10.244.0.0/16]", "pod_cidrs: 10.244.0.0/16"),
            5,
            "tunnel.pod_cidrs: expected a list",
        );
        let uplinks = &BASE[BASE.find("uplinks:").unwrap()..];
        refused(
            &format!("tunnel: 5\n{uplinks}"),
            1,
            "tunnel: expected a mapping of keys (listen, vni,",
        );
        refused(
            &format!("{BASE}workers: many\n"),
            17,
            "workers: `many` is not a whole number",
        );
        refused(
            &format!("{BASE}log: {{ format: xml }}\n"),
            17,
            "log.format: `xml` is not a log format; use text or json",
        );
    }

    #[test]
    fn unknown_keys_are_errors_on_their_own_line() {
        refused(
            &format!("{BASE}tunel: {{}}\n"),
            17,
            "unknown key `tunel` at the top level; did you mean `tunnel`?",
        );
        refused(
            &edit(
                "    egress_ips: [10.50.0.10]",
                "    egress_ips: [10.50.0.10]\n    egress_ip: 10.50.0.11",
            ),
            16,
            "unknown key `egress_ip` in uplinks[1]; did you mean `egress_ips`?",
        );
        refused(
            &format!("{BASE}conntrack:\n  flows: 10\n"),
            18,
            "unknown key `flows` in conntrack; known keys are max_entries, max_per_source",
        );
    }

    #[test]
    fn missing_keys_are_reported_on_the_parent() {
        refused(
            &edit("  vni: 4097\n", ""),
            1,
            "`tunnel` is missing the required key `tunnel.vni`",
        );
        refused(
            &edit("    interface: gwint\n", ""),
            13,
            "`uplinks[1]` is missing the required key `uplinks[1].interface`",
        );
        refused(
            &edit("  vni: 4097\n", "  vni:\n"),
            3,
            "`tunnel.vni` has no value",
        );
        let errors = errors("workers: 1\n");
        assert_eq!(
            errors,
            vec![
                format!("{FILE}:1: the file is missing the required key `tunnel`; add it (see docs/configuration.md)"),
                format!("{FILE}:1: the file is missing the required key `uplinks`; add it (see docs/configuration.md)"),
            ]
        );
    }

    #[test]
    fn bad_addresses() {
        refused(
            &edit("listen: 172.18.0.3:4790", "listen: 172.18.0.3"),
            2,
            "tunnel.listen: `172.18.0.3` has no port",
        );
        refused(
            &edit("listen: 172.18.0.3:4790", "listen: '[fd00::3]:4790'"),
            2,
            "is IPv6; the VXLAN tunnel listens",
        );
        refused(
            &edit("listen: 172.18.0.3:4790", "listen: 0.0.0.0:4790"),
            2,
            "0.0.0.0 cannot be the tunnel address",
        );
        refused(
            &edit("egress_ips: [203.0.113.10]", "egress_ips: [203.0.113.300]"),
            10,
            "uplinks[0].egress_ips[0]: `203.0.113.300` is not an IP address",
        );
        refused(
            &edit("egress_ips: [203.0.113.10]", "egress_ips: [127.0.0.1]"),
            10,
            "127.0.0.1 is a loopback address",
        );
        refused(
            &edit("routes: [0.0.0.0/0]", "routes: [0.0.0.0/40]"),
            12,
            "uplinks[0].routes[0]: `0.0.0.0/40` is not a valid CIDR",
        );
        refused(
            &edit("routes: [10.50.0.0/16]", "routes: [10.50.0.0]"),
            16,
            "`10.50.0.0` has no prefix length; write 10.50.0.0/32",
        );
        refused(
            &format!("{BASE}health: {{ listen: 'localhost:80' }}\n"),
            17,
            "health.listen: `localhost:80` is not an address:port",
        );
        refused(
            &format!("{BASE}health: {{ listen: 0.0.0.0:9090 }}\n"),
            17,
            "health.listen 0.0.0.0:9090 and metrics.listen 0.0.0.0:9090 use the same port",
        );
        refused(
            &format!("{BASE}metrics: {{ listen: '[::]:8080' }}\n"),
            17,
            "use the same port",
        );
        assert!(parse(&format!("{BASE}metrics: {{ listen: '127.0.0.1:9100' }}\n")).is_ok());
    }

    #[test]
    fn cidrs_with_host_bits_say_what_was_meant() {
        refused(
            &edit("pod_cidrs: [10.244.0.0/16]", "pod_cidrs: [10.244.0.1/16]"),
            5,
            "tunnel.pod_cidrs[0]: 10.244.0.1/16 has host bits set; did you mean 10.244.0.0/16?",
        );
        refused(
            &edit("routes: [0.0.0.0/0]", "routes: [203.0.113.7/24]"),
            12,
            "did you mean 203.0.113.0/24?",
        );
    }

    #[test]
    fn tunnel_ranges() {
        refused(
            &edit("vni: 4097", "vni: 16777216"),
            3,
            "tunnel.vni: 16777216 is out of range; use 0..=16777215",
        );
        assert_eq!(
            parse(&edit("vni: 4097", "vni: 16777215"))
                .unwrap()
                .tunnel
                .vni,
            16_777_215
        );
        refused(
            &edit("mtu: 1450", "mtu: 575"),
            6,
            "tunnel.mtu: 575 is out of range; use 576..=9000",
        );
        refused(&edit("mtu: 1450", "mtu: 9001"), 6, "use 576..=9000");
        assert!(parse(&edit("mtu: 1450", "mtu: 576")).is_ok());
        refused(
            &edit(
                "pod_cidrs: [10.244.0.0/16]\n  mtu: 1450",
                "pod_cidrs: [10.244.0.0/16, 'fd00::/64']\n  mtu: 1200",
            ),
            6,
            "tunnel.mtu: 1200 is below 1280, the smallest MTU IPv6 allows",
        );
        let nodes = parse(&edit(
            "allowed_sources: [172.18.0.0/16]",
            "allowed_sources: kubernetes-nodes",
        ))
        .expect("kubernetes-nodes");
        assert!(nodes.tunnel.allowed_from_nodes && nodes.tunnel.allowed_sources.is_empty());
        assert!(
            nodes.pipeline(None).allowed_nodes.is_empty(),
            "nothing admitted until listed"
        );
        refused(
            &edit("allowed_sources: [172.18.0.0/16]", "allowed_sources: nodes"),
            4,
            "tunnel.allowed_sources: `nodes`: give a list of the nodes' underlay CIDRs, or `kubernetes-nodes`",
        );
        refused(
            &edit(
                "allowed_sources: [172.18.0.0/16]",
                "allowed_sources: [172.18.0.0/16, '2001:db8::/32']",
            ),
            4,
            "tunnel.allowed_sources[1]: 2001:db8::/32 is IPv6, but the tunnel listens on IPv4",
        );
        refused(
            &edit("allowed_sources: [172.18.0.0/16]", "allowed_sources: []"),
            4,
            "the list is empty, so no node could send",
        );
        refused(
            &edit("  mtu: 1450", "  mtu: 1450\n  ipv6_address: 10.0.0.3"),
            7,
            "10.0.0.3 is IPv4",
        );
    }

    #[test]
    fn uplink_names_and_interfaces() {
        refused(
            &edit("name: internal", "name: dmz"),
            13,
            "uplinks[1].name: uplink name `dmz` is already used on line 8",
        );
        refused(
            &edit("interface: gwint", "interface: gwdmz"),
            14,
            "interface `gwdmz` is already used by uplink `dmz` (line 9)",
        );
        refused(
            &edit("name: internal", "name: ''"),
            13,
            "the uplink name is empty",
        );
        refused(
            &edit("name: internal", &format!("name: {}", "i".repeat(33))),
            13,
            "longer than 32 characters",
        );
        refused(
            &edit("interface: gwint", "interface: gw-internal-vlan50"),
            14,
            "Linux allows at most 15",
        );
    }

    #[test]
    fn uplink_addresses_and_routes() {
        refused(
            &edit("egress_ips: [10.50.0.10]", "egress_ips: [203.0.113.10]"),
            15,
            "uplinks[1].egress_ips[0]: egress IP 203.0.113.10 is already on uplink `dmz` (line 10)",
        );
        refused(
            &edit(
                "egress_ips: [10.50.0.10]",
                "egress_ips: [10.50.0.10, 10.50.0.10]",
            ),
            15,
            "listed twice on this uplink",
        );
        refused(
            &edit("egress_ips: [10.50.0.10]", "egress_ips: []"),
            15,
            "an uplink needs at least one egress IP",
        );
        refused(
            &edit(
                "routes: [10.50.0.0/16]",
                "routes: [10.50.0.0/16, 0.0.0.0/0]",
            ),
            16,
            "uplinks[1].routes[1]: route 0.0.0.0/0 is already listed on uplink `dmz` (line 12)",
        );
        refused(
            &edit(
                "routes: [10.50.0.0/16]",
                "routes: [10.50.0.0/16, '2001:db8::/32']",
            ),
            16,
            "route 2001:db8::/32 is IPv6, but uplink `internal` has no IPv6 egress IP",
        );
        refused(
            &edit("next_hop: 203.0.113.1", "next_hop: 2001:db8::1"),
            11,
            "uplinks[0].next_hop: 2001:db8::1 is IPv6; next_hop is the IPv4 router",
        );
        refused(
            &edit("next_hop: 203.0.113.1", "next_hop_v6: 203.0.113.1"),
            11,
            "uplinks[0].next_hop_v6: 203.0.113.1 is IPv4",
        );
        refused(
            &edit("routes: [0.0.0.0/0]", "routes: [0.0.0.0/0]\n    mtu: 100"),
            13,
            "uplinks[0].mtu: 100 is out of range",
        );
        // An uplink without routes is allowed: that is how a reload drains it.
        assert!(parse(&edit("routes: [10.50.0.0/16]", "routes: []")).is_ok());
    }

    #[test]
    fn no_uplinks() {
        let text = format!("{}uplinks: []\n", &BASE[..BASE.find("uplinks:").unwrap()]);
        refused(
            &text,
            7,
            "uplinks: the list is empty; add at least one uplink",
        );
    }

    #[test]
    fn conntrack_and_port_limits() {
        refused(
            &format!("{BASE}conntrack: {{ max_entries: 0 }}\n"),
            17,
            "conntrack.max_entries: 0 is out of range; use 1..=67108864",
        );
        refused(
            &format!("{BASE}conntrack: {{ max_entries: 67108865 }}\n"),
            17,
            "out of range",
        );
        refused(
            &format!("{BASE}conntrack: {{ max_entries: 1000 }}\n"),
            17,
            "max_per_source (16384) is larger than conntrack.max_entries (1000)",
        );
        refused(
            &format!("{BASE}conntrack: {{ max_per_source: 300 }}\nports: {{ min: 2000, max: 2255 }}\n"),
            17,
            "conntrack.max_per_source (300) is larger than the 256 ports of one egress IP (ports 2000..=2255)",
        );
        assert!(parse(&format!(
            "{BASE}conntrack: {{ max_per_source: 256 }}\nports: {{ min: 2000, max: 2255 }}\n"
        ))
        .is_ok());
        // the default quota with a narrow range is the operator's choice of range, not an error
        assert!(parse(&format!("{BASE}ports: {{ min: 2000, max: 2255 }}\n")).is_ok());
        refused(
            &format!("{BASE}conntrack:\n  udp_timeout: 119s\n"),
            18,
            "conntrack.udp_timeout: 119s is too short; RFC 4787 (REQ-5) requires at least 120s",
        );
        assert!(parse(&format!("{BASE}conntrack: {{ udp_timeout: 2m }}\n")).is_ok());
        refused(
            &format!("{BASE}ports: {{ min: 0 }}\n"),
            17,
            "ports.min: 0 is out of range; use 1..=65535",
        );
        refused(
            &format!("{BASE}ports:\n  min: 5000\n  max: 4000\n"),
            18,
            "ports: min (5000) is above max (4000)",
        );
        refused(
            &format!("{BASE}workers: 1025\n"),
            17,
            "workers: 1025 is out of range; use 0..=1024",
        );
        assert_eq!(
            parse(&format!("{BASE}workers: 1024\n")).unwrap().workers,
            1024
        );
    }

    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = BASE
            .replace("vni: 4097", "vni: 99999999")
            .replace("egress_ips: [10.50.0.10]", "egress_ips: [203.0.113.10]")
            .replace("next_hop: 203.0.113.1", "nexthop: 203.0.113.1")
            + "workers: 5000\n";
        let errors = errors(&text);
        let lines: Vec<&str> = errors
            .iter()
            .map(|e| e.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            lines,
            ["gw.yaml:3:", "gw.yaml:11:", "gw.yaml:15:", "gw.yaml:17:"],
            "{errors:#?}"
        );
        assert_eq!(
            ConfigErrors(parse(&text).unwrap_err().0)
                .to_string()
                .lines()
                .count(),
            4
        );
    }

    #[test]
    fn policy_files_are_not_gateway_configurations() {
        let errors = errors(
            "apiVersion: projectcalico.org/v3\nkind: EgressGatewayPolicy\nmetadata: { name: p }\n",
        );
        assert_eq!(
            errors,
            [format!(
                "{FILE}: not a gateway configuration (kind: EgressGatewayPolicy); this is an inventory file (Kubernetes objects): check it with `egress-gateway check`, use it with `egress-gateway explain --inputs`"
            )]
        );
    }

    #[test]
    fn unreadable_files_say_so() {
        let e = GatewayConfig::load(Path::new("/nonexistent/gateway.yaml")).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/gateway.yaml: cannot read the file"),
            "{e}"
        );
    }

    #[test]
    fn errors_print_file_and_line() {
        let e = ConfigError::new(Path::new("a.yaml"), Some(3), "bad");
        assert_eq!(e.to_string(), "a.yaml:3: bad");
        let e = ConfigError::new(Path::new("a.yaml"), None, "bad");
        assert_eq!(e.to_string(), "a.yaml: bad");
    }

    #[test]
    fn reload_rules() {
        let old = parse(EXAMPLE).unwrap();
        let reloadable = [
            (
                "routes: [10.50.0.0/16]",
                "routes: [10.50.0.0/16, 10.60.0.0/16]",
            ),
            (
                "allowed_sources: [172.18.0.0/16]",
                "allowed_sources: [172.19.0.0/16]",
            ),
            ("pod_cidrs: [10.244.0.0/16]", "pod_cidrs: [10.245.0.0/16]"),
            ("next_hop: 203.0.113.1", "next_hop: 203.0.113.2"),
            ("vni: 4097", "vni: 4098"),
            ("drain_seconds: 30", "drain_seconds: 60"),
        ];
        for (from, to) in reloadable {
            let new = parse(&EXAMPLE.replacen(from, to, 1)).unwrap();
            assert_ne!(old, new);
            assert_eq!(restart_needed(&old, &new), Vec::<String>::new(), "{to}");
        }
        let restart = [
            (
                "listen: 172.18.0.3:4790",
                "listen: 172.18.0.4:4790",
                "tunnel.listen",
            ),
            (
                "interface: gwint",
                "interface: gwint2",
                "uplinks[1].interface",
            ),
            (
                "egress_ips: [203.0.113.10]",
                "egress_ips: [203.0.113.11]",
                "uplinks[0].egress_ips",
            ),
            (
                "listen: 0.0.0.0:8080",
                "listen: 0.0.0.0:8081",
                "health.listen",
            ),
            (
                "listen: 0.0.0.0:9090",
                "listen: 0.0.0.0:9091",
                "metrics.listen",
            ),
            ("workers: 0", "workers: 2", "workers"),
            (
                "max_entries: 1048576",
                "max_entries: 2097152",
                "conntrack.max_entries",
            ),
            ("min: 1024", "min: 2048", "ports"),
            (
                "udp_timeout: 300s",
                "udp_timeout: 600s",
                "conntrack timeouts",
            ),
            ("mtu: 1450", "mtu: 1400", "tunnel.mtu"),
            ("    mtu: 1500", "    mtu: 9000", "uplinks[0].mtu"),
            ("format: text", "format: json", "log.format"),
        ];
        for (from, to, key) in restart {
            let new = parse(&EXAMPLE.replacen(from, to, 1)).unwrap();
            assert_eq!(restart_needed(&old, &new), [key], "{to}");
        }
        // Reordering the egress IPs of an uplink keeps the same port pools.
        let two = EXAMPLE.replace(
            "egress_ips: [203.0.113.10]",
            "egress_ips: [203.0.113.10, 203.0.113.11]",
        );
        let swapped = EXAMPLE.replace(
            "egress_ips: [203.0.113.10]",
            "egress_ips: [203.0.113.11, 203.0.113.10]",
        );
        assert!(restart_needed(&parse(&two).unwrap(), &parse(&swapped).unwrap()).is_empty());
        // Adding an uplink, and several changes at once.
        let third = EXAMPLE.replace(
            "conntrack:",
            "  - { name: lab, interface: gwlab, egress_ips: [192.0.2.10], routes: [192.0.2.0/24] }\nconntrack:",
        );
        assert_eq!(
            restart_needed(&old, &parse(&third).unwrap()),
            ["uplinks (an uplink was added or removed)"]
        );
        let both = EXAMPLE
            .replace("workers: 0", "workers: 4")
            .replace("4790", "4791");
        assert_eq!(
            restart_needed(&old, &parse(&both).unwrap()),
            ["tunnel.listen", "workers"]
        );
    }
}
