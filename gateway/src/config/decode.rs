//! From the YAML tree to a [`GatewayConfig`]: types, ranges, defaults and the checks that span several keys.
//!
//! Every section is read even when an earlier one is wrong, so one run reports every problem, each on the
//! line of the offending key or value. The checks mirror what the data plane (`Gateway::new`) refuses, and
//! add what it cannot see (line numbers, names, addresses that make no sense on a network).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use forwarder_core::conntrack;
use forwarder_core::flow::UplinkId;
use forwarder_core::ports::{PortRange, MAX_POOLS};
use ipnet::IpNet;
use marked_yaml::Node;

use super::reader::{Reader, Value};
use super::value;
use super::{
    FlowLogConfig, FlowLogOutput, GatewayConfig, LogFormat, TunnelConfig, UplinkSpec,
    ALLOWED_FROM_NODES, DEFAULT_SOURCE_PORTS, MAX_SOURCE_PORTS,
};

const ROOT_KEYS: &[&str] = &[
    "tunnel",
    "uplinks",
    "conntrack",
    "ports",
    "health",
    "metrics",
    "admin",
    "workers",
    "drain_seconds",
    "log",
    "flow_log",
    "kubernetes",
    "probes",
    "sync",
];
const KUBERNETES_KEYS: &[&str] = &["kubeconfig"];
const TUNNEL_KEYS: &[&str] = &[
    "listen",
    "vni",
    "allowed_sources",
    "pod_cidrs",
    "mtu",
    "ipv6_address",
    "source_ports",
];
const UPLINK_KEYS: &[&str] = &[
    "name",
    "interface",
    "egress_ips",
    "next_hop",
    "next_hop_v6",
    "mtu",
    "routes",
];
const PORTS_KEYS: &[&str] = &["min", "max"];
const LISTEN_KEYS: &[&str] = &["listen"];
const LOG_KEYS: &[&str] = &["format"];
const FLOW_LOG_KEYS: &[&str] = &[
    "output",
    "max_bytes",
    "max_files",
    "queue",
    "starts",
    "pod_names",
];
const CONNTRACK_KEYS: &[&str] = &[
    "max_entries",
    "max_per_source",
    "udp_timeout",
    "tcp_established_timeout",
    "tcp_transitory_timeout",
    "icmp_timeout",
    "port_reuse_delay",
    "reset_unknown_tcp",
];

/// Largest VXLAN network identifier (24 bits).
pub(super) const MAX_VNI: u64 = (1 << 24) - 1;
/// MTUs accepted for the tunnel and the uplinks.
pub(super) const MTU_RANGE: std::ops::RangeInclusive<u64> = 576..=9000;
/// The IPv6 minimum link MTU (RFC 8200 §5).
pub(super) const IPV6_MIN_MTU: u16 = 1280;
/// Most conntrack entries (the table is preallocated).
pub(super) const MAX_ENTRIES: u64 = 1 << 26;
/// Most worker threads.
pub(super) const MAX_WORKERS: u64 = 1024;
/// Shortest UDP idle timeout (RFC 4787 REQ-5).
pub(super) const MIN_UDP_TIMEOUT: Duration = Duration::from_secs(120);
/// Most uplinks (an uplink is numbered by a [`UplinkId`]).
pub(super) const MAX_UPLINKS: usize = UplinkId::MAX as usize + 1;

/// Default `health.listen`.
pub(super) const DEFAULT_HEALTH: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080));
/// Default `metrics.listen`.
pub(super) const DEFAULT_METRICS: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9090));
/// Default `admin.listen`: loopback only (the live flows name pods).
pub(super) const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9095));
/// Default uplink MTU.
pub(super) const DEFAULT_UPLINK_MTU: u16 = 1500;
/// Default `flow_log.max_bytes`: 100 MiB.
pub(super) const DEFAULT_FLOW_LOG_BYTES: u64 = 100 << 20;
/// Default drain period.
pub(super) const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Reads the whole configuration; `None` when anything was reported.
pub(super) fn gateway(r: &mut Reader<'_>, root: &Node) -> Option<GatewayConfig> {
    let root = Value::root(root);
    let top = r.mapping(&root, ROOT_KEYS)?;
    let tunnel = top.require(r, "tunnel").and_then(|v| tunnel(r, &v));
    let uplinks = top.require(r, "uplinks").and_then(|v| uplinks(r, &v));
    let ports = top
        .get("ports")
        .map_or(Some(PortRange::default()), |v| ports(r, &v));
    let conntrack = top
        .get("conntrack")
        .map_or(Some((Default::default(), true)), |v| {
            conntrack(r, &v, ports)
        });
    let health = listen(r, top.get("health"), DEFAULT_HEALTH);
    let metrics = listen(r, top.get("metrics"), DEFAULT_METRICS);
    let admin = listen(r, top.get("admin"), DEFAULT_ADMIN);
    if let (Some((health, health_line)), Some((metrics, metrics_line)), Some((admin, admin_line))) =
        (health, metrics, admin)
    {
        for ((a, a_key, a_line), (b, b_key, b_line)) in [
            (
                (health, "health", health_line),
                (metrics, "metrics", metrics_line),
            ),
            (
                (health, "health", health_line),
                (admin, "admin", admin_line),
            ),
            (
                (metrics, "metrics", metrics_line),
                (admin, "admin", admin_line),
            ),
        ] {
            if clash(a, b) {
                r.error(
                    b_line.or(a_line).unwrap_or(top.line()),
                    format!(
                        "{a_key}.listen {a} and {b_key}.listen {b} use the same port; give them different ports"
                    ),
                );
            }
        }
    }
    let workers = top.get("workers").map_or(Some(0), |v| {
        r.integer(&v, 0..=MAX_WORKERS, " (0 = one worker per CPU core)")
    });
    let drain = top.get("drain_seconds").map_or(Some(DEFAULT_DRAIN), |v| {
        r.parse(&v, value::integer).map(Duration::from_secs)
    });
    let log_format = top.get("log").map_or(Some(LogFormat::Text), |v| log(r, &v));
    let kubeconfig = match top.get("kubernetes") {
        None => Some(None),
        Some(v) => kubernetes(r, &v),
    };
    let flow_log = match top.get("flow_log") {
        None => Some(None),
        Some(v) => flow_log(r, &v).map(Some),
    };
    let probes = match top.get("probes") {
        None => Some(None),
        Some(v) => super::probes::probes(r, &v, uplinks.as_deref(), ports).map(Some),
    };
    let sync = match top.get("sync") {
        None => Some(None),
        Some(v) => super::sync::sync(r, &v, uplinks.as_deref()).map(Some),
    };
    Some(GatewayConfig {
        path: Default::default(),
        tunnel: tunnel?,
        uplinks: uplinks?,
        conntrack: conntrack?.0,
        reset_unknown_tcp: conntrack?.1,
        ports: ports?,
        health_listen: health?.0,
        metrics_listen: metrics?.0,
        admin_listen: admin?.0,
        workers: workers?,
        drain: drain?,
        log_format: log_format?,
        flow_log: flow_log?,
        kubeconfig: kubeconfig?,
        probes: probes?,
        sync: sync?,
    })
}

/// `kubernetes: { kubeconfig }`: where the API server is, for `allowed_sources: kubernetes-nodes`.
fn kubernetes(r: &mut Reader<'_>, v: &Value<'_>) -> Option<Option<PathBuf>> {
    let m = r.mapping(v, KUBERNETES_KEYS)?;
    match m.get("kubeconfig") {
        None => Some(None),
        Some(v) => r.parse(&v, value::kubeconfig).map(Some),
    }
}

fn flow_log(r: &mut Reader<'_>, v: &Value<'_>) -> Option<FlowLogConfig> {
    let m = r.mapping(v, FLOW_LOG_KEYS)?;
    let output = m.require(r, "output").and_then(|v| {
        r.parse(&v, |s| match s.trim() {
            "" => Err("empty; write `stdout` or a file path".to_string()),
            "stdout" | "-" => Ok(FlowLogOutput::Stdout),
            path if path.starts_with('/') => Ok(FlowLogOutput::File(path.into())),
            path => Err(format!(
                "`{path}` is not an absolute path; write `stdout` or e.g. /var/log/egress/flows.jsonl"
            )),
        })
    });
    let max_bytes = m
        .get("max_bytes")
        .map_or(Some(DEFAULT_FLOW_LOG_BYTES), |v| {
            r.integer(&v, 4096..=u64::MAX, " (bytes)")
        });
    let max_files = m
        .get("max_files")
        .map_or(Some(5), |v| r.integer(&v, 1..=1000, ""));
    let queue = m
        .get("queue")
        .map_or(Some(65_536), |v| r.integer(&v, 16..=(1 << 24), ""));
    let starts = m.get("starts").map_or(Some(true), |v| {
        r.parse(&v, |s| match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("`{s}` is not true or false")),
        })
    });
    let pod_names = match m.get("pod_names") {
        None => Some(Vec::new()),
        Some(v) => r
            .parse_list(&v, |s| {
                if s.starts_with('/') {
                    Ok(std::path::PathBuf::from(s))
                } else {
                    Err(format!(
                        "`{s}` is not an absolute path; give the files or directories of Pod objects, e.g. /etc/egress/pods"
                    ))
                }
            })
            .map(strip),
    };
    Some(FlowLogConfig {
        pod_names: pod_names?,
        output: output?,
        max_bytes: max_bytes?,
        max_files: max_files?,
        queue: queue?,
        starts: starts?,
    })
}

fn tunnel(r: &mut Reader<'_>, v: &Value<'_>) -> Option<TunnelConfig> {
    let t = r.mapping(v, TUNNEL_KEYS)?;
    let listen = t
        .require(r, "listen")
        .and_then(|v| r.parse(&v, tunnel_listen));
    let vni = t
        .require(r, "vni")
        .and_then(|v| r.integer(&v, 0..=MAX_VNI, " (a VNI has 24 bits; Calico uses 4097)"));
    let mut from_nodes = false;
    let allowed_sources = t.require(r, "allowed_sources").and_then(|v| {
        if let Some(word) = v.as_scalar() {
            if word == ALLOWED_FROM_NODES {
                from_nodes = true;
                return Some(Vec::new());
            }
            r.error(
                v.line(),
                format!(
                    "{}: `{word}`: give a list of the nodes' underlay CIDRs, or `{ALLOWED_FROM_NODES}` to admit the \
                     InternalIP of every Node object of the cluster",
                    v.path()
                ),
            );
            return None;
        }
        let nets = nonempty_cidrs(r, &v, "no node could send through the tunnel")?;
        let v6: Vec<_> = nets
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| matches!(n, IpNet::V6(_)))
            .collect();
        for (i, (net, line)) in &v6 {
            r.error(
                *line,
                format!(
                    "{}[{i}]: {net} is IPv6, but the tunnel listens on IPv4, so VXLAN only arrives from IPv4 \
                     nodes; list the nodes' IPv4 CIDRs",
                    v.path()
                ),
            );
        }
        v6.is_empty().then(|| strip(nets))
    });
    let pod_cidrs = t
        .require(r, "pod_cidrs")
        .and_then(|v| nonempty_cidrs(r, &v, "no pod's traffic could be translated").map(strip));
    let mtu = t.require(r, "mtu").and_then(|v| {
        let mtu: u16 = r.integer(&v, MTU_RANGE, "")?;
        let has_v6 = pod_cidrs.iter().flatten().any(|n| matches!(n, IpNet::V6(_)));
        if has_v6 && mtu < IPV6_MIN_MTU {
            r.error(
                v.line(),
                format!(
                    "{}: {mtu} is below {IPV6_MIN_MTU}, the smallest MTU IPv6 allows, and pod_cidrs has IPv6 \
                     networks; raise the MTU to at least {IPV6_MIN_MTU}",
                    v.path()
                ),
            );
            return None;
        }
        Some(mtu)
    });
    let ipv6_address = match t.get("ipv6_address") {
        None => Some(None),
        Some(v) => r.parse(&v, |s| match value::unicast_ip(s)? {
            IpAddr::V6(a) => Ok(Some(a)),
            IpAddr::V4(a) => Err(format!(
                "{a} is IPv4; this is the gateway's IPv6 address inside the tunnel (its IPv4 one is tunnel.listen)"
            )),
        }),
    };
    let source_ports = match t.get("source_ports") {
        None => Some(DEFAULT_SOURCE_PORTS),
        Some(v) => r.integer(
            &v,
            1..=u64::from(MAX_SOURCE_PORTS),
            " (the number of source ports the tunnel's flows are spread over; default 16)",
        ),
    };
    Some(TunnelConfig {
        listen: listen?,
        vni: vni?,
        allowed_sources: allowed_sources?,
        allowed_from_nodes: from_nodes,
        pod_cidrs: pod_cidrs?,
        mtu: mtu?,
        ipv6_address: ipv6_address?,
        source_ports: source_ports?,
    })
}

fn tunnel_listen(s: &str) -> Result<SocketAddrV4, String> {
    let SocketAddr::V4(addr) = value::socket_addr(s)? else {
        return Err(format!(
            "{s} is IPv6; the VXLAN tunnel listens on the pod's IPv4 address, e.g. 172.18.0.3:4790"
        ));
    };
    if !value::is_unicast(IpAddr::V4(*addr.ip())) {
        return Err(format!(
            "{} cannot be the tunnel address: it is also the nodes' next hop; give the gateway pod's IP, \
             e.g. 172.18.0.3:4790",
            addr.ip()
        ));
    }
    if addr.port() == 0 {
        return Err(format!(
            "port 0 cannot receive VXLAN; use the nodes' VXLAN port (Calico: 4790), e.g. {}:4790",
            addr.ip()
        ));
    }
    Ok(addr)
}

/// A non-empty list of CIDRs, each with its line.
fn nonempty_cidrs(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    consequence: &str,
) -> Option<Vec<(IpNet, usize)>> {
    let nets = r.parse_list(v, value::cidr)?;
    if nets.is_empty() {
        r.error(
            v.line(),
            format!(
                "{}: the list is empty, so {consequence}; add at least one CIDR",
                v.path()
            ),
        );
        return None;
    }
    Some(nets)
}

fn strip<T>(items: Vec<(T, usize)>) -> Vec<T> {
    items.into_iter().map(|(v, _)| v).collect()
}

/// Where each item that must be unique across the uplinks was first seen (uplink and line), to report a
/// duplicate with both places.
#[derive(Debug, Default)]
struct Seen {
    names: HashMap<String, usize>,
    interfaces: HashMap<String, (String, usize)>,
    egress: HashMap<IpAddr, (String, usize)>,
    routes: HashMap<IpNet, (String, usize)>,
}

/// Records `key` at `place` unless it was seen before; returns the earlier place if so.
fn first_seen<K: std::hash::Hash + Eq, P: Clone>(
    seen: &mut HashMap<K, P>,
    key: K,
    place: P,
) -> Option<P> {
    match seen.entry(key) {
        Entry::Occupied(first) => Some(first.get().clone()),
        Entry::Vacant(slot) => {
            slot.insert(place);
            None
        }
    }
}

fn uplinks(r: &mut Reader<'_>, v: &Value<'_>) -> Option<Vec<UplinkSpec>> {
    let items = r.list(v)?;
    if items.is_empty() {
        r.error(
            v.line(),
            "uplinks: the list is empty; add at least one uplink (name, interface, egress_ips, routes)",
        );
        return None;
    }
    if items.len() > MAX_UPLINKS {
        r.error(
            v.line(),
            format!(
                "uplinks: {} uplinks configured; at most {MAX_UPLINKS} are supported",
                items.len()
            ),
        );
        return None;
    }
    let mut seen = Seen::default();
    let specs: Vec<Option<UplinkSpec>> = items
        .iter()
        .map(|item| uplink(r, item, &mut seen))
        .collect();
    if seen.egress.len() > MAX_POOLS {
        r.error(
            v.line(),
            format!(
                "uplinks: {} egress IPs configured; at most {MAX_POOLS} are supported",
                seen.egress.len()
            ),
        );
        return None;
    }
    specs.into_iter().collect()
}

fn uplink(r: &mut Reader<'_>, v: &Value<'_>, seen: &mut Seen) -> Option<UplinkSpec> {
    let u = r.mapping(v, UPLINK_KEYS)?;
    let name = u.require(r, "name").and_then(|v| {
        let name = r.parse(&v, value::uplink_name)?;
        if let Some(first) = first_seen(&mut seen.names, name.clone(), v.line()) {
            r.error(
                v.line(),
                format!(
                    "{}: uplink name `{name}` is already used on line {first}; names must be unique",
                    v.path()
                ),
            );
            return None;
        }
        Some(name)
    });
    let label = name.clone().unwrap_or_else(|| u.path().to_owned());
    let interface = u.require(r, "interface").and_then(|v| {
        let interface = r.parse(&v, value::interface_name)?;
        if let Some((other, first)) = first_seen(
            &mut seen.interfaces,
            interface.clone(),
            (label.clone(), v.line()),
        ) {
            r.error(
                v.line(),
                format!(
                    "{}: interface `{interface}` is already used by uplink `{other}` (line {first}); \
                     each uplink needs its own interface",
                    v.path()
                ),
            );
            return None;
        }
        Some(interface)
    });
    let egress_ips = u
        .require(r, "egress_ips")
        .and_then(|v| egress_ips(r, &v, &label, seen));
    let next_hop = match u.get("next_hop") {
        None => Some(None),
        Some(v) => r.parse(&v, |s| match value::unicast_ip(s)? {
            IpAddr::V4(a) => Ok(Some(a)),
            IpAddr::V6(a) => Err(format!(
                "{a} is IPv6; next_hop is the IPv4 router, put an IPv6 router in next_hop_v6"
            )),
        }),
    };
    let next_hop_v6 = match u.get("next_hop_v6") {
        None => Some(None),
        Some(v) => r.parse(&v, |s| match value::unicast_ip(s)? {
            IpAddr::V6(a) => Ok(Some(a)),
            IpAddr::V4(a) => Err(format!(
                "{a} is IPv4; next_hop_v6 is the IPv6 router, put an IPv4 router in next_hop"
            )),
        }),
    };
    let mtu = match u.get("mtu") {
        None => Some(DEFAULT_UPLINK_MTU),
        Some(v) => r.integer::<u16>(&v, MTU_RANGE, "").and_then(|mtu| {
            let has_v6 = egress_ips.iter().flatten().any(IpAddr::is_ipv6);
            if has_v6 && mtu < IPV6_MIN_MTU {
                r.error(
                    v.line(),
                    format!(
                        "{}: {mtu} is below {IPV6_MIN_MTU}, the smallest MTU IPv6 allows, and this uplink has an \
                         IPv6 egress IP; raise the MTU to at least {IPV6_MIN_MTU}",
                        v.path()
                    ),
                );
                return None;
            }
            Some(mtu)
        }),
    };
    let routes = u
        .require(r, "routes")
        .and_then(|v| routes(r, &v, &label, egress_ips.as_deref(), seen));
    Some(UplinkSpec {
        name: name?,
        interface: interface?,
        egress_ips: egress_ips?,
        next_hop: next_hop?,
        next_hop_v6: next_hop_v6?,
        mtu: mtu?,
        routes: routes?,
    })
}

fn egress_ips(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    uplink: &str,
    seen: &mut Seen,
) -> Option<Vec<IpAddr>> {
    let ips = r.parse_list(v, |s| {
        let ip = value::unicast_ip(s)?;
        if ip.is_loopback() {
            return Err(format!(
                "{ip} is a loopback address; give an address of the uplink's network"
            ));
        }
        Ok(ip)
    })?;
    if ips.is_empty() {
        r.error(
            v.line(),
            format!(
                "{}: the list is empty; an uplink needs at least one egress IP to translate to",
                v.path()
            ),
        );
        return None;
    }
    let mut ok = true;
    for (i, (ip, line)) in ips.iter().enumerate() {
        if let Some((other, first)) = first_seen(&mut seen.egress, *ip, (uplink.to_owned(), *line))
        {
            let place = if other == uplink {
                format!("listed twice on this uplink (line {first}); remove one")
            } else {
                format!("already on uplink `{other}` (line {first}); an egress IP belongs to one uplink")
            };
            r.error(
                *line,
                format!("{}[{i}]: egress IP {ip} is {place}", v.path()),
            );
            ok = false;
        }
    }
    ok.then(|| strip(ips))
}

fn routes(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    uplink: &str,
    egress: Option<&[IpAddr]>,
    seen: &mut Seen,
) -> Option<Vec<IpNet>> {
    let routes = r.parse_list(v, value::cidr)?;
    let mut ok = true;
    for (i, (net, line)) in routes.iter().enumerate() {
        let path = format!("{}[{i}]", v.path());
        if let Some((other, first)) = first_seen(&mut seen.routes, *net, (uplink.to_owned(), *line))
        {
            r.error(
                *line,
                format!(
                    "{path}: route {net} is already listed on uplink `{other}` (line {first}); \
                     each prefix goes to one uplink, remove one"
                ),
            );
            ok = false;
        }
        let Some(egress) = egress else { continue };
        let (family, has) = match net {
            IpNet::V4(_) => ("IPv4", egress.iter().any(IpAddr::is_ipv4)),
            IpNet::V6(_) => ("IPv6", egress.iter().any(IpAddr::is_ipv6)),
        };
        if !has {
            r.error(
                *line,
                format!(
                    "{path}: route {net} is {family}, but uplink `{uplink}` has no {family} egress IP to \
                     translate to; add one to its egress_ips or remove the route"
                ),
            );
            ok = false;
        }
    }
    ok.then(|| strip(routes))
}

/// The `conntrack` section, and its `reset_unknown_tcp`; `ports` (when valid) bounds an explicit
/// `max_per_source`.
fn conntrack(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    ports: Option<PortRange>,
) -> Option<(conntrack::Config, bool)> {
    let c = r.mapping(v, CONNTRACK_KEYS)?;
    let defaults = conntrack::Config::default();
    let max_entries = c
        .get("max_entries")
        .map_or(Some(defaults.max_entries), |v| {
            r.integer(
                &v,
                1..=MAX_ENTRIES,
                " (the table is preallocated for this many flows)",
            )
        });
    let max_per_source = c.get("max_per_source");
    let per_source = max_per_source
        .as_ref()
        .map_or(Some(defaults.max_per_source), |v| {
            r.integer(v, 1..=MAX_ENTRIES, "")
        });
    if let (Some(v), Some(per), Some(range)) = (&max_per_source, per_source, ports) {
        if per > range.len() {
            r.error(
                v.line(),
                format!(
                    "conntrack.max_per_source ({per}) is larger than the {} ports of one egress IP \
                     (ports {}..={}), so one pod could take every port of an egress IP; lower \
                     max_per_source (default {}, a quarter of the default range)",
                    range.len(),
                    range.min,
                    range.max,
                    conntrack::DEFAULT_MAX_PER_SOURCE
                ),
            );
        }
    }
    if let (Some(max), Some(per)) = (max_entries, per_source) {
        if per > max {
            let line = max_per_source.as_ref().map_or(c.line(), Value::line);
            r.error(
                line,
                format!(
                    "conntrack.max_per_source ({per}) is larger than conntrack.max_entries ({max}), so one pod \
                     could fill the table; lower max_per_source"
                ),
            );
        }
    }
    let timeout = |r: &mut Reader<'_>, key: &str, default: Duration, min: Duration, why: &str| {
        let Some(v) = c.get(key) else {
            return Some(default);
        };
        let d = r.parse(&v, value::duration)?;
        if d < min {
            r.error(
                v.line(),
                format!("{}: {} is too short; {why}", v.path(), human(d)),
            );
            return None;
        }
        Some(d)
    };
    let t = defaults.timeouts;
    let nonzero = Duration::from_millis(1);
    let udp = timeout(
        r,
        "udp_timeout",
        t.udp,
        MIN_UDP_TIMEOUT,
        "RFC 4787 (REQ-5) requires at least 120s for UDP mappings (default 300s)",
    );
    let tcp_established = timeout(
        r,
        "tcp_established_timeout",
        t.tcp_established,
        nonzero,
        "use a positive duration (default 7440s = 2h4m, RFC 5382)",
    );
    let tcp_transitory = timeout(
        r,
        "tcp_transitory_timeout",
        t.tcp_transitory,
        nonzero,
        "use a positive duration (default 240s)",
    );
    let icmp = timeout(
        r,
        "icmp_timeout",
        t.icmp,
        nonzero,
        "use a positive duration (default 60s)",
    );
    let port_reuse_delay = timeout(
        r,
        "port_reuse_delay",
        defaults.port_reuse_delay,
        Duration::ZERO,
        "",
    );
    let reset_unknown_tcp = c.get("reset_unknown_tcp").map_or(Some(true), |v| {
        r.parse(&v, |s| match s {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("`{s}` is not true or false")),
        })
    });
    Some((
        conntrack::Config {
            max_entries: max_entries?,
            max_per_source: per_source?,
            timeouts: conntrack::Timeouts {
                udp: udp?,
                tcp_established: tcp_established?,
                tcp_transitory: tcp_transitory?,
                icmp: icmp?,
            },
            port_reuse_delay: port_reuse_delay?,
        },
        reset_unknown_tcp?,
    ))
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn ports(r: &mut Reader<'_>, v: &Value<'_>) -> Option<PortRange> {
    let p = r.mapping(v, PORTS_KEYS)?;
    let defaults = PortRange::default();
    let min_value = p.get("min");
    let min = min_value.as_ref().map_or(Some(defaults.min), |v| {
        r.integer(v, 1..=65535, " (port 0 is never handed out)")
    });
    let max = p
        .get("max")
        .map_or(Some(defaults.max), |v| r.integer(&v, 1..=65535, ""));
    let range = PortRange {
        min: min?,
        max: max?,
    };
    if range.min > range.max {
        let line = min_value.as_ref().map_or(p.line(), Value::line);
        r.error(
            line,
            format!(
                "ports: min ({}) is above max ({}); min must be at most max",
                range.min, range.max
            ),
        );
        return None;
    }
    Some(range)
}

/// The `listen` address of the `health` or `metrics` section, with its line when it was given.
fn listen(
    r: &mut Reader<'_>,
    section: Option<Value<'_>>,
    default: SocketAddr,
) -> Option<(SocketAddr, Option<usize>)> {
    let Some(v) = section else {
        return Some((default, None));
    };
    let m = r.mapping(&v, LISTEN_KEYS)?;
    match m.get("listen") {
        None => Some((default, None)),
        Some(v) => r.parse(&v, value::socket_addr).map(|a| (a, Some(v.line()))),
    }
}

/// Whether two listening sockets would collide.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The `log` section (the gateway's and the node agent's).
pub(super) fn log(r: &mut Reader<'_>, v: &Value<'_>) -> Option<LogFormat> {
    let l = r.mapping(v, LOG_KEYS)?;
    let Some(v) = l.get("format") else {
        return Some(LogFormat::Text);
    };
    r.parse(&v, |s| match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("`{s}` is not a log format; use text or json")),
    })
}

/// Whether the file is a Kubernetes-style object (`kind: ...` at the top level) rather than a gateway
/// configuration: its kind and line.
pub(super) fn kind(root: &Node) -> Option<(String, usize)> {
    let map = root.as_mapping()?;
    let (key, value) = map.iter().find(|(k, _)| k.as_str() == "kind")?;
    let kind = match value {
        Node::Scalar(s) => s.as_str().to_owned(),
        _ => "?".into(),
    };
    Some((kind, key.span().start().map_or(1, |m| m.line())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/configuration.md documents every key the parser knows (and so stays in step with it).
    #[test]
    fn every_key_is_documented() {
        let docs = include_str!("../../../docs/configuration.md");
        let sections: [(&str, &[&str]); 15] = [
            ("kubernetes.", KUBERNETES_KEYS),
            ("", ROOT_KEYS),
            ("tunnel.", TUNNEL_KEYS),
            ("uplinks[].", UPLINK_KEYS),
            ("conntrack.", CONNTRACK_KEYS),
            ("ports.", PORTS_KEYS),
            ("health.", LISTEN_KEYS),
            ("metrics.", LISTEN_KEYS),
            ("admin.", LISTEN_KEYS),
            ("log.", LOG_KEYS),
            ("flow_log.", FLOW_LOG_KEYS),
            ("probes.", super::super::probes::PROBES_KEYS),
            ("sync.", super::super::sync::SYNC_KEYS),
            ("sync.peers[].", super::super::sync::PEER_KEYS),
            (
                "sync.peers[].uplinks[].",
                super::super::sync::PEER_UPLINK_KEYS,
            ),
        ];
        for (prefix, keys) in sections {
            for key in keys {
                // A section is documented by a heading, or by the rows of its keys.
                let heading =
                    |line: &str| line.starts_with("## ") && line.contains(&format!("`{key}`"));
                let documented = if prefix.is_empty() {
                    docs.contains(&format!("| `{key}")) || docs.lines().any(heading)
                } else {
                    docs.contains(&format!("| `{prefix}{key}` |"))
                };
                assert!(
                    documented,
                    "docs/configuration.md does not document `{prefix}{key}`"
                );
            }
        }
    }
}
