//! README command 1 in network namespaces (binary `demo-netns`): builds the seed scenario — two
//! Calico-style client nodes with three pods, one gateway pod running the real `egress-gateway run`, a DMZ
//! router with the red and blue outside servers, an internal network with its server — then sends ping,
//! TCP and UDP from every pod to every server, and some hostile input, and prints what each server saw and
//! which uplink carried it, and the gateway's counters. Everything is removed at the end (also on Ctrl-C).
//!
//! `cargo run -p tests --release --bin demo-netns` (as root, after `cargo build --release -p gateway`).
//! Exit status: 0 when every check passed, 1 when one failed, 2 without root or without the gateway binary,
//! 130 when interrupted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tests::raw::{self, proto, Capture, Frame, InnerUdp, IpInfo, ETHERTYPE_IPV4, L4};
use tests::scenario::{self, drops, packets, value};
use tests::topology::{tunnel_mac, Host, Topology, VNI, VXLAN_PORT};
use tests::{traffic, GatewayMode, Metrics};

const TCP_PORT: u16 = 8000;
const UDP_PORT: u16 = 8001;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C (SIGINT) and SIGTERM set a flag: the demo stops at the next step and removes the topology.
fn catch_interrupts() {
    let handler = on_interrupt as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

fn interrupted() -> bool {
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

/// One outside server of the scenario.
struct Server<'a> {
    name: &'static str,
    host: &'a Host,
    /// The uplink its network is routed to.
    uplink: &'static str,
    tcp: traffic::Server,
    udp: traffic::Server,
    pings: Capture,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Ping,
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// Where a probe left the gateway: the captures on the DMZ router's and the internal network's ports facing
/// the gateway.
struct Uplinks {
    dmz: Capture,
    internal: Capture,
}

impl Uplinks {
    /// Frames towards `dst` seen so far on (DMZ, internal).
    fn count(&self, dst: Ipv4Addr) -> (usize, usize) {
        let n = |c: &Capture| {
            c.frames()
                .iter()
                .filter(|f| f.dst() == Some(IpAddr::V4(dst)))
                .count()
        };
        (n(&self.dmz), n(&self.internal))
    }

    /// Which uplink carried something towards `dst` since `before` (waiting up to 1 s for the capture).
    fn which(&self, dst: Ipv4Addr, before: (usize, usize)) -> &'static str {
        let seen = scenario::poll(
            Duration::from_secs(1),
            Duration::from_millis(10),
            "frames",
            || {
                let now = self.count(dst);
                (now != before).then_some(now)
            },
        );
        match seen {
            Ok((d, i)) if d > before.0 && i > before.1 => "both!",
            Ok((d, _)) if d > before.0 => "dmz",
            Ok(_) => "internal",
            Err(_) => "none",
        }
    }
}

/// One line of the table.
struct Row {
    pod: String,
    pod_ip: Ipv4Addr,
    dest: String,
    proto: Proto,
    saw: String,
    uplink: &'static str,
    problems: Vec<String>,
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

fn probe(
    topo: &Topology,
    uplinks: &Uplinks,
    pod: &tests::Pod,
    server: &Server<'_>,
    p: Proto,
) -> Row {
    let gw = topo.gateway(1);
    let dst = server.host.ip;
    let expected_src = if server.uplink == "internal" {
        gw.internal_egress
    } else {
        gw.dmz_egress
    };
    let before = uplinks.count(dst);
    let mut problems = Vec::new();
    let tag = format!("demo {} {} {}", pod.ip, server.name, p.name());
    let (saw, saw_ip) = match p {
        Proto::Ping => {
            let seen_before = server.pings.frames().len();
            if let Err(e) = traffic::ping(&pod.ns, IpAddr::V4(dst), 2) {
                problems.push(format!("ping failed: {e}"));
            }
            let frames = server.pings.frames();
            match frames.get(seen_before..).and_then(|f| f.first()) {
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
            }
        }
        Proto::Tcp | Proto::Udp => {
            let (server_side, port) = if p == Proto::Tcp {
                (&server.tcp, TCP_PORT)
            } else {
                (&server.udp, UDP_PORT)
            };
            let seen_before = server_side.peers().len();
            let addr = SocketAddr::from((dst, port));
            let result = if p == Proto::Tcp {
                traffic::tcp_echo(&pod.ns, addr, tag.as_bytes())
            } else {
                traffic::udp_echo(&pod.ns, addr, tag.as_bytes())
            };
            match result {
                Ok(back) if back == tag.as_bytes() => {}
                Ok(back) => {
                    problems.push(format!("wrong echo: {:?}", String::from_utf8_lossy(&back)))
                }
                Err(e) => problems.push(format!("{e}")),
            }
            match server_side
                .peers()
                .get(seen_before..)
                .and_then(|p| p.first())
            {
                Some(peer) => (peer.to_string(), Some(peer.ip())),
                None => ("nothing".into(), None),
            }
        }
    };
    if saw_ip != Some(IpAddr::V4(expected_src)) {
        problems.push(format!("the server should see {expected_src}"));
    }
    let uplink = uplinks.which(dst, before);
    if uplink != server.uplink {
        problems.push(format!("should leave by the {} uplink", server.uplink));
    }
    Row {
        pod: format!("n{}p{} (node {})", pod.node, pod.number, pod.node),
        pod_ip: pod.ip,
        dest: format!("{} {dst}", server.name),
        proto: p,
        saw,
        uplink,
        problems,
    }
}

/// Hostile input: each must be dropped and counted under its reason.
fn hostile(topo: &Topology) -> tests::Result<Vec<(String, &'static str, bool)>> {
    let gw = topo.gateway(1);
    let node = topo.node(1);
    let pod = topo.pod(1, 1);
    let red = SocketAddr::from((topo.red().ip, UDP_PORT));
    let tunnel = SocketAddr::from((gw.ip, VXLAN_PORT));
    let datagram = |vni: u32, src: Ipv4Addr| -> tests::Result<Vec<u8>> {
        raw::vxlan_udp(
            vni,
            &InnerUdp {
                src_mac: raw::parse_mac(&node.vxlan_mac)?,
                dst_mac: raw::parse_mac(&tunnel_mac(gw.ip))?,
                src: SocketAddr::from((src, 40001)),
                dst: red,
                ttl: 64,
                payload: b"hostile".to_vec(),
            },
        )
    };
    let rogue_ip = Ipv4Addr::new(172, 19, 0, 66);
    let rogue_net =
        ipnet::Ipv4Net::new(rogue_ip, 16).map_err(|e| tests::Error::msg(e.to_string()))?;
    let rogue = scenario::underlay_host(topo, "rogue", rogue_net, 1)?;
    let from_node = SocketAddr::from((node.ip, 0));
    let spoofed = Ipv4Addr::new(10, 99, 0, 7);
    let egress = gw.dmz_egress;
    let mut out = Vec::new();
    let cases: Vec<(String, &'static str)> = vec![
        (
            format!("VXLAN from {rogue_ip}, an underlay host outside allowed_sources"),
            "vxlan_source_not_allowed",
        ),
        (
            format!("VXLAN from node 1 with VNI {}", VNI + 1),
            "vxlan_wrong_vni",
        ),
        (
            format!("VXLAN from node 1, inner source {spoofed} outside the pod CIDRs"),
            "inner_source_not_allowed",
        ),
        (
            format!("unsolicited UDP from the red server to {egress}:53"),
            "no_flow",
        ),
    ];
    for (i, (what, reason)) in cases.into_iter().enumerate() {
        let before = drops(&gw.metrics()?).get(reason).copied().unwrap_or(0.0);
        match i {
            0 => raw::send_udp(
                &rogue,
                SocketAddr::from((rogue_ip, 0)),
                tunnel,
                &[datagram(VNI, pod.ip)?],
            )?,
            1 => raw::send_udp(&node.ns, from_node, tunnel, &[datagram(VNI + 1, pod.ip)?])?,
            2 => raw::send_udp(&node.ns, from_node, tunnel, &[datagram(VNI, spoofed)?])?,
            _ => raw::send_udp(
                &topo.red().ns,
                SocketAddr::from((topo.red().ip, 0)),
                SocketAddr::from((egress, 53)),
                &[b"unsolicited".to_vec()],
            )?,
        }
        let counted = scenario::poll(
            Duration::from_secs(5),
            Duration::from_millis(50),
            reason,
            || {
                let now = drops(&gw.metrics().ok()?)
                    .get(reason)
                    .copied()
                    .unwrap_or(0.0);
                (now > before).then_some(())
            },
        )
        .is_ok();
        out.push((what, reason, counted));
    }
    Ok(out)
}

fn print_counters(m: &Metrics) {
    println!("\ngateway counters (GET /metrics):");
    println!(
        "  packets: tunnel_rx {}  tunnel_tx {}  |  uplink dmz: tx {} rx {}  |  uplink internal: tx {} rx {}",
        packets(m, "tunnel_rx", None),
        packets(m, "tunnel_tx", None),
        packets(m, "uplink_tx", Some("dmz")),
        packets(m, "uplink_rx", Some("dmz")),
        packets(m, "uplink_tx", Some("internal")),
        packets(m, "uplink_rx", Some("internal")),
    );
    println!(
        "  flows created {}   conntrack entries {}   ICMP errors originated {}",
        value(m, "egress_gateway_flows_created_total", &[]),
        value(m, "egress_gateway_conntrack_entries", &[]),
        value(m, "egress_gateway_icmp_errors_originated_total", &[]),
    );
    let d = drops(m);
    if d.is_empty() {
        println!("  drops: none");
    } else {
        println!("  drops by reason (non-zero):");
        let background = d.contains_key("unsupported_protocol");
        for (reason, n) in d {
            println!("    {reason:<28} {n}");
        }
        if background {
            println!(
                "  (unsupported_protocol may count a few IGMP reports that the uplinks' neighbours send when \
                 their links come up)"
            );
        }
    }
}

fn run(mode: GatewayMode) -> tests::Result<bool> {
    let started = Instant::now();
    println!("egress gateway demo in network namespaces: the real `egress-gateway run` between Calico-style nodes and outside servers");
    let mut topo = Topology::standard(mode)?;
    topo.gateway_mut(1).wait_ready(Duration::from_secs(30))?;
    let gw = topo.gateway(1);
    println!(
        "built {} namespaces ({}-*) and started the gateway in {:.1} s",
        topo.namespaces().len(),
        topo.prefix(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "gateway gw1: tunnel {}:{VXLAN_PORT} VNI {VNI} (inner MAC {}); uplink dmz: egress {} via 203.0.113.1, routes 0.0.0.0/0; uplink internal: egress {} on-link, routes 10.50.0.0/16",
        gw.ip,
        tunnel_mac(gw.ip),
        gw.dmz_egress,
        gw.internal_egress
    );
    println!("pods: n1p1 10.244.1.1, n1p2 10.244.1.2 on node 1 (172.18.0.11); n2p1 10.244.2.1 on node 2 (172.18.0.12); all egress through gw1\n");

    // The internal server's address is on its bridge; the outside servers' on their eth0.
    let mut servers = Vec::new();
    for (name, host, dev, uplink) in [
        ("red", topo.red(), "eth0", "dmz"),
        ("blue", topo.blue(), "eth0", "dmz"),
        ("internal", topo.internal(), "br0", "internal"),
    ] {
        servers.push(Server {
            name,
            host,
            uplink,
            tcp: traffic::tcp_echo_server(&host.ns, SocketAddr::from((host.ip, TCP_PORT)))?,
            udp: traffic::udp_echo_server(&host.ns, SocketAddr::from((host.ip, UDP_PORT)))?,
            pings: Capture::start(&host.ns, dev, is_echo_request_to(host.ip))?,
        });
    }
    let from_gateway = |f: &Frame| !f.outgoing && f.ethertype == ETHERTYPE_IPV4;
    let uplinks = Uplinks {
        dmz: Capture::start(&topo.dmz_router().ns, "gw1", from_gateway)?,
        internal: Capture::start(&topo.internal().ns, "gw1", from_gateway)?,
    };

    println!(
        "{:<14} {:<12} {:<23} {:<6} {:<32} {:<9} result",
        "pod", "pod IP", "destination", "proto", "server saw source", "uplink"
    );
    let mut rows = Vec::new();
    'probes: for pod in topo.pods() {
        for server in &servers {
            for p in [Proto::Ping, Proto::Tcp, Proto::Udp] {
                if interrupted() {
                    break 'probes;
                }
                let row = probe(&topo, &uplinks, pod, server, p);
                println!(
                    "{:<14} {:<12} {:<23} {:<6} {:<32} {:<9} {}",
                    row.pod,
                    row.pod_ip.to_string(),
                    row.dest,
                    row.proto.name(),
                    row.saw,
                    row.uplink,
                    if row.problems.is_empty() {
                        "ok".to_owned()
                    } else {
                        format!("FAILED: {}", row.problems.join("; "))
                    }
                );
                rows.push(row);
            }
        }
    }
    let mut ok = rows.iter().all(|r| r.problems.is_empty());

    if !interrupted() {
        println!("\nhostile input (each must be dropped and counted):");
        for (what, reason, counted) in hostile(&topo)? {
            println!(
                "  {what:<72} {}",
                if counted {
                    format!("dropped ({reason})")
                } else {
                    ok = false;
                    format!("FAILED: not counted as {reason}")
                }
            );
        }
    }
    let m = scenario::settled_metrics(topo.gateway(1), Duration::from_secs(3))?;
    print_counters(&m);

    if interrupted() {
        println!("\ninterrupted: removing the topology");
        return Ok(false);
    }
    let checks = rows.len();
    if ok {
        println!("\nall {checks} probes and the hostile-input checks passed");
    } else {
        let failed = rows.iter().filter(|r| !r.problems.is_empty()).count();
        println!(
            "\n{failed} of {checks} probes (or a hostile-input check) FAILED; gateway log tail:"
        );
        if let Some(p) = topo.gateway(1).process() {
            println!("{}", p.log_tail(20));
        }
    }
    drop(uplinks);
    drop(servers);
    let names = topo.namespaces().len();
    drop(topo);
    println!("removed the {names} namespaces and the gateway process");
    Ok(ok)
}

fn main() -> ExitCode {
    if let Some(arg) = std::env::args().nth(1) {
        let help = arg == "-h" || arg == "--help";
        let text = "usage: demo-netns (as root; no arguments)\n\nBuilds the seed scenario in network namespaces \
                    with the real `egress-gateway run` (build it first: cargo build --release -p gateway), sends \
                    ping, TCP and UDP from every pod to every server and some hostile input, prints what each \
                    server saw and the gateway's counters, and removes everything. Exit status 0 when every \
                    check passed, 1 when one failed, 2 without root or the gateway binary, 130 on Ctrl-C.";
        if help {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        eprintln!("demo-netns: unexpected argument `{arg}`\n\n{text}");
        return ExitCode::from(2);
    }
    if !has_cap_net_admin() {
        eprintln!(
            "demo-netns needs root (CAP_NET_ADMIN) to build network namespaces: run it as root, e.g. \
             `sudo $(command -v cargo) run -p tests --release --bin demo-netns`, or `./scripts/demo.sh` as root. \
             Without root, `egress-gateway demo` runs the same scenario in-process."
        );
        return ExitCode::from(2);
    }
    // Also sweeps namespaces left by an earlier run that was killed.
    if tests::require_netns("demo-netns").is_none() {
        eprintln!("demo-netns: cannot create network namespaces here (see above)");
        return ExitCode::from(2);
    }
    let binary = match tests::gateway::userspace_binary_with_run() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("demo-netns: {e}");
            return ExitCode::from(2);
        }
    };
    catch_interrupts();
    match run(GatewayMode::Userspace { binary }) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if interrupted() => ExitCode::from(130),
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo-netns: {e}");
            if interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
