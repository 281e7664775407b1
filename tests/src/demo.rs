//! What the two namespace demos share (binaries `demo-netns`, README command 1, and `demo-kube`, its
//! variant driven by a real kube-apiserver): the start-up checks and exit statuses, Ctrl-C, the seed's four
//! servers, and probes from a pod to a server that check which source the server saw, one table row each.
//!
//! Exit statuses of both: 0 when every check passed, 1 when one failed, 2 when something they need is
//! missing (root, the gateway binary, the API server's binaries), 130 when interrupted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::raw::{proto, Capture, Frame, IpInfo, L4};
use crate::topology::{Host, Pod, Topology};
use crate::traffic;

/// The echo servers' TCP port.
pub const TCP_PORT: u16 = 8000;
/// The echo servers' UDP port.
pub const UDP_PORT: u16 = 8001;
/// How long a refused probe may take: the node answers an `unreachable` route with an ICMP error at once.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C (SIGINT) and SIGTERM set a flag: the demo stops at the next step and removes what it built.
fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Whether Ctrl-C (or SIGTERM) arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// CAP_NET_ADMIN (bit 12) in CapEff of /proc/self/status.
fn has_cap_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// What `main` does first: `--help` (prints `usage`), no other argument, root, network namespaces (also
/// sweeping those left by an earlier run that was killed), the gateway binary; then catches Ctrl-C.
/// `Continue(binary)` to run the demo, `Break(status)` to exit at once.
pub fn prepare(name: &str, usage: &str) -> ControlFlow<ExitCode, PathBuf> {
    if let Some(arg) = std::env::args().nth(1) {
        if arg == "-h" || arg == "--help" {
            println!("{usage}");
            return ControlFlow::Break(ExitCode::SUCCESS);
        }
        eprintln!("{name}: unexpected argument `{arg}`\n\n{usage}");
        return ControlFlow::Break(ExitCode::from(2));
    }
    if !has_cap_net_admin() {
        eprintln!(
            "{name} needs root (CAP_NET_ADMIN) to build network namespaces: run it as root, e.g. \
             `sudo $(command -v cargo) run -p tests --release --bin {name}`, or `./scripts/demo.sh` as root. \
             Without root, `egress-gateway demo` runs the seed scenario in-process."
        );
        return ControlFlow::Break(ExitCode::from(2));
    }
    if crate::require_netns(name).is_none() {
        eprintln!("{name}: cannot create network namespaces here (see above)");
        return ControlFlow::Break(ExitCode::from(2));
    }
    match crate::gateway::userspace_binary_with_run() {
        Ok(binary) => {
            catch_interrupts();
            ControlFlow::Continue(binary)
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            ControlFlow::Break(ExitCode::from(2))
        }
    }
}

/// The exit status for the demo's outcome (`Ok(true)`: every check passed).
pub fn exit_status(name: &str, outcome: crate::Result<bool>) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if interrupted() => ExitCode::from(130),
        Ok(false) => ExitCode::FAILURE,
        // Interrupted, an error is most likely a tool that Ctrl-C stopped too: its first line is enough.
        Err(e) if interrupted() => {
            let e = e.to_string();
            eprintln!("{name}: interrupted ({})", e.lines().next().unwrap_or(""));
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The seed's name for gateway `k`: 1 is red, 2 is blue.
pub fn color(k: usize) -> &'static str {
    if k == 1 {
        "red"
    } else {
        "blue"
    }
}

/// One line per gateway: its pod IP, tunnel MAC and egress IPs.
pub fn print_gateways(topo: &Topology) {
    for gw in topo.gateways() {
        println!(
            "gateway gw{} ({}): pod IP {} (tunnel MAC {}), egress dmz {} / internal {}",
            gw.number,
            color(gw.number),
            gw.ip,
            crate::topology::tunnel_mac(gw.ip),
            gw.dmz_egress,
            gw.internal_egress
        );
    }
}

/// One server of the scenario: TCP and UDP echo servers that record their peers, and a capture of the
/// echo requests it receives.
#[derive(Debug)]
pub struct Server<'a> {
    /// What the demo calls it: `legacy-fw`, `partner`, `internal` or `on-prem`.
    pub name: &'static str,
    /// Its namespace and address.
    pub host: &'a Host,
    /// TCP echo on [`TCP_PORT`].
    pub tcp: traffic::Server,
    /// UDP echo on [`UDP_PORT`].
    pub udp: traffic::Server,
    /// Echo requests addressed to it.
    pub pings: Capture,
}

/// The seed's servers: the legacy firewall (192.0.2.10) and the partner (198.51.100.10) behind the DMZ
/// router, the internal server (10.50.0.20) and the on-premises host (172.16.1.10).
pub fn start_servers(topo: &Topology) -> crate::Result<Vec<Server<'_>>> {
    let mut servers = Vec::new();
    // The internal server's address is on its bridge; the others' on their eth0.
    for (name, host, dev) in [
        ("legacy-fw", topo.blue(), "eth0"),
        ("partner", topo.red(), "eth0"),
        ("internal", topo.internal(), "br0"),
        ("on-prem", topo.local(), "eth0"),
    ] {
        servers.push(Server {
            name,
            host,
            tcp: traffic::tcp_echo_server(&host.ns, SocketAddr::from((host.ip, TCP_PORT)))?,
            udp: traffic::udp_echo_server(&host.ns, SocketAddr::from((host.ip, UDP_PORT)))?,
            pings: Capture::start(&host.ns, dev, is_echo_request_to(host.ip))?,
        });
    }
    Ok(servers)
}

/// How traffic from a pod to a server should leave, and so which source the server should see.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Path {
    /// Through gateway k's DMZ uplink.
    Dmz(usize),
    /// Through gateway k's internal uplink.
    Internal(usize),
    /// Not through a gateway: the node routes it (masqueraded to the node's address).
    Node,
    /// Nowhere: the node refuses it at once (an `unreachable` route, fail closed) and the server sees
    /// nothing.
    Refused,
}

/// What a probe sends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    /// ICMP echo.
    Ping,
    /// A TCP connection that echoes a tag.
    Tcp,
    /// A UDP exchange that echoes a tag.
    Udp,
}

impl Proto {
    /// All three, in table order.
    pub const ALL: [Self; 3] = [Self::Ping, Self::Tcp, Self::Udp];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One probe: one line of the table.
#[derive(Debug)]
pub struct Row {
    /// The pod, `n<node>p<number>`.
    pub pod: String,
    /// Its address.
    pub pod_ip: Ipv4Addr,
    /// The server's name.
    pub server: &'static str,
    /// The server's name and address.
    pub dest: String,
    /// What was sent.
    pub proto: Proto,
    /// The source address the server saw, if it saw anything.
    pub src: Option<IpAddr>,
    /// What the server saw, as printed.
    pub saw: String,
    /// Which path that source stands for (or why nothing arrived).
    pub via: String,
    /// What was wrong; empty when the probe passed.
    pub problems: Vec<String>,
}

/// The source a server should see for `path` from a pod on node `node` (none when refused).
fn expected_source(topo: &Topology, path: Path, node: usize) -> Option<Ipv4Addr> {
    match path {
        Path::Dmz(k) => Some(topo.gateway(k).dmz_egress),
        Path::Internal(k) => Some(topo.gateway(k).internal_egress),
        Path::Node => Some(topo.node(node).ip),
        Path::Refused => None,
    }
}

/// What a source address says about the path: which gateway and uplink, or the node.
pub fn describe_source(topo: &Topology, src: Option<IpAddr>) -> String {
    let Some(IpAddr::V4(src)) = src else {
        return "-".into();
    };
    for gw in topo.gateways() {
        let name = color(gw.number);
        if src == gw.dmz_egress {
            return format!("gw{} {name}, dmz", gw.number);
        }
        if src == gw.internal_egress {
            return format!("gw{} {name}, internal", gw.number);
        }
    }
    if topo.nodes().iter().any(|n| n.ip == src) {
        return "node (no gateway)".into();
    }
    "?".into()
}

fn is_echo_request_to(dst: Ipv4Addr) -> impl Fn(&Frame) -> bool {
    move |f| {
        !f.outgoing
            && f.dst() == Some(IpAddr::V4(dst))
            && matches!(
                f.ip,
                Some(IpInfo {
                    proto: proto::ICMP,
                    l4: L4::Icmp { ty: 8, .. },
                    ..
                })
            )
    }
}

/// Sends `p` from `pod` to `server` and checks that the server saw the source `path` stands for (for
/// [`Path::Refused`]: that the pod's packet was refused at once and the server saw nothing).
pub fn probe(topo: &Topology, pod: &Pod, server: &Server<'_>, path: Path, p: Proto) -> Row {
    let dst = server.host.ip;
    let mut problems = Vec::new();
    let tag = format!("demo {} {} {}", pod.ip, server.name, p.name());
    let pings_before = server.pings.frames().len();
    let tcp_before = server.tcp.peers().len();
    let udp_before = server.udp.peers().len();
    let mut refused = None;
    if path == Path::Refused {
        match send_refused(pod, dst, p, &tag) {
            Ok(why) => refused = Some(why),
            Err(e) => problems.push(e),
        }
    } else if let Err(e) = send(pod, dst, p, &tag) {
        problems.push(e);
    }
    let (saw, src) = match p {
        Proto::Ping => match server
            .pings
            .frames()
            .get(pings_before..)
            .and_then(|f| f.first())
        {
            Some(f) => {
                let id = match f.ip.as_ref().map(|i| &i.l4) {
                    Some(L4::Icmp { rest, .. }) => rest >> 16,
                    _ => 0,
                };
                let src = f.src();
                (
                    format!(
                        "{} (icmp id {id})",
                        src.map_or("?".into(), |s| s.to_string())
                    ),
                    src,
                )
            }
            None => ("nothing".into(), None),
        },
        Proto::Tcp | Proto::Udp => {
            let (side, before) = if p == Proto::Tcp {
                (&server.tcp, tcp_before)
            } else {
                (&server.udp, udp_before)
            };
            match side.peers().get(before..).and_then(|p| p.first()) {
                Some(peer) => (peer.to_string(), Some(peer.ip())),
                None => ("nothing".into(), None),
            }
        }
    };
    let expected = expected_source(topo, path, pod.node);
    match expected {
        Some(want) if src != Some(IpAddr::V4(want)) => {
            problems.push(format!("the server should see {want}"));
        }
        None if src.is_some() => problems.push("the server should see nothing".into()),
        _ => {}
    }
    Row {
        pod: format!("n{}p{}", pod.node, pod.number),
        pod_ip: pod.ip,
        server: server.name,
        dest: format!("{} {dst}", server.name),
        proto: p,
        src,
        saw,
        via: refused.unwrap_or_else(|| describe_source(topo, src)),
        problems,
    }
}

/// One exchange that should be answered.
fn send(pod: &Pod, dst: Ipv4Addr, p: Proto, tag: &str) -> Result<(), String> {
    let result = match p {
        Proto::Ping => {
            return traffic::ping(&pod.ns, IpAddr::V4(dst), 2)
                .map(|_| ())
                .map_err(|e| format!("ping failed: {e}"))
        }
        Proto::Tcp => traffic::tcp_echo(&pod.ns, SocketAddr::from((dst, TCP_PORT)), tag.as_bytes()),
        Proto::Udp => traffic::udp_echo(&pod.ns, SocketAddr::from((dst, UDP_PORT)), tag.as_bytes()),
    };
    match result {
        Ok(back) if back == tag.as_bytes() => Ok(()),
        Ok(back) => Err(format!("wrong echo: {:?}", String::from_utf8_lossy(&back))),
        Err(e) => Err(e.to_string()),
    }
}

/// One attempt that the node should refuse at once; how it was refused.
fn send_refused(pod: &Pod, dst: Ipv4Addr, p: Proto, tag: &str) -> Result<String, String> {
    let start = Instant::now();
    let outcome = match p {
        // One echo request; iputils' ping stops at the first ICMP error (-W: at most 2 s without one).
        Proto::Ping => match pod.ns.exec(&format!("ping -n -q -c 1 -W 2 {dst}")) {
            Ok(_) => Ok(()),
            Err(_) => Err("icmp error".to_owned()),
        },
        Proto::Tcp => {
            traffic::connect_once(&pod.ns, SocketAddr::from((dst, TCP_PORT)), REFUSED_WITHIN)
                .map_err(|e| e.to_string())?
                .0
                .map(|_| ())
                .map_err(|e| e.kind().to_string())
        }
        Proto::Udp => traffic::udp_once(
            &pod.ns,
            SocketAddr::from((dst, UDP_PORT)),
            tag.as_bytes(),
            REFUSED_WITHIN,
        )
        .map_err(|e| e.to_string())?
        .0
        .map(|_| ())
        .map_err(|e| e.kind().to_string()),
    };
    let took = start.elapsed();
    match outcome {
        Ok(()) => Err("answered: it should have been refused".into()),
        Err(_) if took >= REFUSED_WITHIN => Err(format!(
            "no answer for {took:.1?}: dropped silently instead of refused at once"
        )),
        Err(why) => Ok(format!("refused ({why})")),
    }
}

/// The table's header line.
pub fn print_header() {
    println!(
        "{:<6} {:<12} {:<24} {:<6} {:<30} {:<22} result",
        "pod", "pod IP", "destination", "proto", "server saw source", "path"
    );
}

/// One line of the table.
pub fn print_row(row: &Row) {
    println!(
        "{:<6} {:<12} {:<24} {:<6} {:<30} {:<22} {}",
        row.pod,
        row.pod_ip.to_string(),
        row.dest,
        row.proto.name(),
        row.saw,
        row.via,
        if row.problems.is_empty() {
            "ok".to_owned()
        } else {
            format!("FAILED: {}", row.problems.join("; "))
        }
    );
}

/// Probes every pod of `topo` against every server that `plan` gives a path for, with `protos`, printing
/// the table as it goes; stops early on Ctrl-C.
pub fn probe_all(
    topo: &Topology,
    servers: &[Server<'_>],
    protos: &[Proto],
    plan: impl Fn(&Pod, &str) -> Option<Path>,
) -> Vec<Row> {
    print_header();
    let mut rows = Vec::new();
    for pod in topo.pods() {
        for server in servers {
            let Some(path) = plan(pod, server.name) else {
                continue;
            };
            for &p in protos {
                if interrupted() {
                    return rows;
                }
                let row = probe(topo, pod, server, path, p);
                print_row(&row);
                rows.push(row);
            }
        }
    }
    rows
}
