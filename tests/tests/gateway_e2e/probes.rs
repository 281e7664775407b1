//! Readiness from outside probes (`probes` section): the gateway probes the red server through its own DMZ
//! uplink — ICMP echo over IPv4 and IPv6, TCP connect to a listener — and `/readiness` (and the node
//! agents' UDP probe) follow what the targets answer.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use tests::gateway::HEALTH_PORT;
use tests::raw::{Capture, Frame, L4};
use tests::scenario::{self, value, ConfigSpec};
use tests::topology::{RED_SERVER, RED_SERVER6};
use tests::{require_netns, require_userspace_gateway, traffic, Gateway, Metrics};

use crate::common::{self, READY};

const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_secs(1);
/// What a loaded 2-vCPU machine adds to `INTERVAL + TIMEOUT` before the change shows (polling included).
const SLACK: Duration = Duration::from_secs(2);
/// The probes' source ports and ICMP identifier with the default `ports` (1024..=65535).
const PROBE_PORTS: std::ops::RangeInclusive<u16> = 1008..=1023;

fn up(m: &Metrics, kind: &str, target: &str) -> f64 {
    value(
        m,
        "egress_gateway_probe_up",
        &[("kind", kind), ("target", target)],
    )
}

/// Polls `/readiness` until `pred(status, body)` holds; returns the body and how long it took.
fn wait_readiness(
    gw: &Gateway,
    what: &str,
    pred: impl Fn(u16, &str) -> bool,
) -> (String, Duration) {
    let t = Instant::now();
    let body = scenario::poll(
        INTERVAL + TIMEOUT + SLACK,
        Duration::from_millis(20),
        what,
        || {
            let (status, body) = gw.http_get(HEALTH_PORT, "/readiness").ok()?;
            pred(status, &body).then_some(body)
        },
    )
    .unwrap_or_else(|e| panic!("{e}; metrics:\n{}", probe_lines(gw)));
    (body, t.elapsed())
}

fn probe_lines(gw: &Gateway) -> String {
    gw.metrics_text()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("egress_gateway_probe") || l.starts_with("egress_gateway_ready"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The state byte of the node agents' UDP health probe (0 ready, 1 draining, 2 not ready), asked from
/// inside the gateway's namespace.
fn udp_state(gw: &Gateway) -> u8 {
    let addr = SocketAddr::from((gw.ip, HEALTH_PORT));
    gw.ns
        .run(Duration::from_secs(5), move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("a read timeout");
            let mut req = *b"EGHP\x01\x00\x00\x00nonce-42";
            req[8..].copy_from_slice(&42u64.to_be_bytes());
            s.send_to(&req, addr).expect("send the probe request");
            let mut buf = [0u8; 32];
            let n = s.recv(&mut buf).expect("a probe reply within 2 s");
            assert_eq!((n, &buf[..6]), (16, &b"EGHP\x01\x01"[..]), "a probe reply");
            buf[6]
        })
        .expect("run in the gateway's namespace")
}

fn is_probe(f: &Frame, tcp_port: u16) -> bool {
    !f.outgoing
        && match &f.ip {
            Some(ip) => match ip.l4 {
                L4::Icmp { ty, .. } => ty == 8 || ty == 128,
                L4::Tcp { dst, flags, .. } => dst == tcp_port && flags & 0x02 != 0,
                _ => false,
            },
            None => false,
        }
}

/// Probes to red's address over IPv4 and IPv6 and to a TCP listener: ready once both kinds answer, each
/// probe from the DMZ egress IP and a port (identifier) below `ports.min`; the listener closed → 503
/// `probes failing: tcp ...` within interval + timeout, `probe_up{tcp}` 0, refusals counted, the UDP probe
/// says "not ready"; the listener back → ready; red dropping echo requests of both families → 503 naming
/// both ICMP targets; the drop removed → ready again.
#[test]
fn outside_probes_gate_readiness() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = common::standard(mode);
    let tcp_addr = SocketAddr::from((RED_SERVER, 7800));
    let server = traffic::tcp_echo_server(&topo.red().ns, tcp_addr).unwrap();
    let cap = Capture::start(&topo.red().ns, "eth0", move |f| is_probe(f, 7800)).unwrap();
    let spec = ConfigSpec {
        ipv6: true,
        ..ConfigSpec::default()
    };
    let yaml = format!(
        "{}probes:\n  interval: {}ms\n  timeout: {}ms\n  icmp: [{RED_SERVER}, '{RED_SERVER6}']\n  tcp: ['{tcp_addr}']\n",
        spec.yaml(topo.gateway(1)).unwrap(),
        INTERVAL.as_millis(),
        TIMEOUT.as_millis(),
    );
    let started = Instant::now();
    let _own = scenario::restart_gateway(&mut topo, 1, "probes", &yaml, READY).unwrap();
    eprintln!("ready with probes after {:?}", started.elapsed());
    let gw = topo.gateway(1);
    let (egress, egress6) = (gw.dmz_egress, gw.dmz_egress6.unwrap());
    let icmp6 = RED_SERVER6.to_string();
    // Ready needs one answering target per kind; wait for all three (IPv6 needs NDP first).
    for (kind, target) in [
        ("icmp", RED_SERVER.to_string()),
        ("icmp", icmp6.clone()),
        ("tcp", tcp_addr.to_string()),
    ] {
        scenario::wait_metric(
            gw,
            "egress_gateway_probe_up",
            &[("kind", kind), ("target", &target)],
            common::METRICS,
            |v| v == 1.0,
        )
        .unwrap_or_else(|e| panic!("{kind} {target}: {e}\n{}", probe_lines(gw)));
    }
    let m = gw.metrics().unwrap();
    assert_eq!(value(&m, "egress_gateway_ready", &[]), 1.0);
    assert!(value(&m, "egress_gateway_probe_answered_total", &[]) >= 2.0);
    assert_eq!(udp_state(gw), 0, "ready");

    // What red saw: probes from the DMZ egress IPs, from ports (and an identifier) outside the NAT range.
    let seen = cap.stop().unwrap();
    assert!(!seen.is_empty(), "red saw no probes");
    for f in &seen {
        let ip = f.ip.as_ref().unwrap();
        assert!(
            ip.src == IpAddr::V4(egress) || ip.src == IpAddr::V6(egress6),
            "probe from {}",
            ip.src
        );
        let port = match ip.l4 {
            L4::Icmp { rest, .. } => u16::try_from(rest >> 16).unwrap(),
            L4::Tcp { src, .. } => src,
            _ => unreachable!(),
        };
        assert!(PROBE_PORTS.contains(&port), "probe from port {port}");
    }
    for ty in [8, 128] {
        assert!(
            seen.iter()
                .any(|f| matches!(f.ip.as_ref().unwrap().l4, L4::Icmp { ty: t, .. } if t == ty)),
            "no ICMP type {ty} probe seen"
        );
    }

    // The TCP listener closes: red answers RST, the TCP kind fails.
    drop(server);
    let (body, took) = wait_readiness(gw, "503 after the listener closed", |s, _| s == 503);
    eprintln!(
        "not ready {took:?} after the listener closed: {}",
        body.trim()
    );
    assert_eq!(body, format!("probes failing: tcp {tcp_addr}\n"));
    assert!(took <= INTERVAL + TIMEOUT + SLACK, "{took:?}");
    let m = gw.metrics().unwrap();
    assert_eq!(up(&m, "tcp", &tcp_addr.to_string()), 0.0);
    assert_eq!(up(&m, "icmp", &RED_SERVER.to_string()), 1.0);
    assert!(
        value(&m, "egress_gateway_probe_refused_total", &[("kind", "tcp")]) >= 1.0,
        "{}",
        probe_lines(gw)
    );
    assert_eq!(value(&m, "egress_gateway_ready", &[]), 0.0);
    assert_eq!(udp_state(gw), 2, "not ready");

    // The listener is back: ready at the next answer.
    let server = traffic::tcp_echo_server(&topo.red().ns, tcp_addr).unwrap();
    let (_, took) = wait_readiness(gw, "200 after the listener came back", |s, _| s == 200);
    eprintln!("ready {took:?} after the listener came back");
    assert_eq!(udp_state(gw), 0);

    // Red drops echo requests of both families: the ICMP kind fails (the TCP one still answers).
    let red = &topo.red().ns;
    for cmd in [
        "add table inet egw_probe_drop",
        "add chain inet egw_probe_drop input { type filter hook input priority filter ; policy accept ; }",
        "add rule inet egw_probe_drop input icmp type echo-request drop",
        "add rule inet egw_probe_drop input icmpv6 type echo-request drop",
    ] {
        red.exec_args(&["nft", cmd]).unwrap();
    }
    let (body, took) = wait_readiness(gw, "503 while red drops pings", |s, _| s == 503);
    eprintln!(
        "not ready {took:?} after red began dropping pings: {}",
        body.trim()
    );
    assert_eq!(
        body,
        format!("probes failing: icmp {RED_SERVER}, icmp {RED_SERVER6}\n")
    );
    assert!(took <= INTERVAL + TIMEOUT + SLACK, "{took:?}");
    let m = gw.metrics().unwrap();
    assert_eq!(up(&m, "icmp", &RED_SERVER.to_string()), 0.0);
    assert_eq!(up(&m, "icmp", &icmp6), 0.0);
    assert_eq!(up(&m, "tcp", &tcp_addr.to_string()), 1.0);
    red.exec_args(&["nft", "delete table inet egw_probe_drop"])
        .unwrap();
    let (_, took) = wait_readiness(gw, "200 after red answers pings again", |s, _| s == 200);
    eprintln!("ready {took:?} after red answered pings again");
    // The workers saw every answer too and dropped it as a probe answer, not as unsolicited traffic.
    let m = gw.metrics().unwrap();
    assert!(scenario::drop_count(&m, "probe_answer") >= 1.0);
    assert_eq!(scenario::drop_count(&m, "no_flow"), 0.0);
    drop(server);
}
