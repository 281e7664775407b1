//! ICMP behaviour (scenario 4): TTL expiry at the gateway and beyond it, path MTU discovery for a DF
//! reply too big for the tunnel (and fragmentation of one without DF), and the TCP MSS clamp.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::raw::{proto, Capture, ErrorQueueSocket, IcmpReport, IpInfo, L4, TCP_ACK, TCP_SYN};
use tests::scenario::{self, value};
use tests::topology::{DMZ_ROUTER, RED_SERVER, TUNNEL_MTU};
use tests::{require_netns, require_userspace_gateway, traffic, TopologySpec};

use crate::common::{self, metrics, METRICS};

const SO_EE_ORIGIN_ICMP: u8 = 2;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// From the pod's namespace: UDP datagrams with `ttl` to `dst`, one every 300 ms, until the socket's error
/// queue reports an ICMP error (returned) or `timeout` passes (`None`). Also returns whether an answer
/// from `dst` arrived instead.
fn probe_with_ttl(
    ns: &tests::Netns,
    dst: SocketAddr,
    ttl: u8,
    timeout: Duration,
) -> (Option<IcmpReport>, bool) {
    ns.run(timeout + Duration::from_secs(5), move || {
        let s = ErrorQueueSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .expect("UDP socket with IP_RECVERR");
        s.set_ttl(ttl).expect("IP_TTL");
        s.sock
            .set_read_timeout(Some(Duration::from_millis(10)))
            .expect("SO_RCVTIMEO");
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            // A pending error may be reported by send itself (EHOSTUNREACH); the queue still holds it.
            let _ = s.sock.send_to(format!("ttl {ttl}").as_bytes(), dst);
            if let Ok(Some(r)) = s.recv_error(Duration::from_millis(300)) {
                return (Some(r), false);
            }
            if let Ok((_, from)) = s.sock.recv_from(&mut buf) {
                if from == dst {
                    return (None, true);
                }
            }
        }
        (None, false)
    })
    .expect("probe thread")
}

/// TTL: the node decrements once, the gateway once more. A pod's datagram sent with TTL 2 reaches the
/// gateway with 1 and the pod gets ICMP time exceeded from the gateway's tunnel address (counted in
/// `egress_gateway_icmp_errors_originated_total`); with TTL 3 it leaves the gateway with 1 and the DMZ
/// router's time exceeded comes back translated to the pod (RFC 5508); with TTL 64 it gets through.
#[test]
fn ttl_expiry_answers_time_exceeded() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let addr = SocketAddr::from((RED_SERVER, 7500));
    let server = traffic::udp_echo_server(&topo.red().ns, addr).unwrap();
    let pod = &topo.pod(1, 1).ns;
    let timeout = Duration::from_secs(10);

    let (report, answered) = probe_with_ttl(pod, addr, 2, timeout);
    let report = report.unwrap_or_else(|| {
        panic!(
            "TTL 2 (1 at the gateway): no ICMP error reached the pod (answered: {answered}); drops: {:?}",
            scenario::drops(&metrics(&topo))
        )
    });
    assert_eq!(
        (report.origin, report.icmp_type, report.icmp_code),
        (SO_EE_ORIGIN_ICMP, ICMP_TIME_EXCEEDED, 0),
        "{report:?}"
    );
    assert_eq!(
        report.offender,
        Some(IpAddr::V4(gw.ip)),
        "time exceeded not from the gateway's tunnel address: {report:?}"
    );
    assert!(
        server.peers().is_empty(),
        "a TTL-2 datagram reached the server"
    );
    scenario::wait_metric(
        gw,
        "egress_gateway_icmp_errors_originated_total",
        &[],
        METRICS,
        |v| v >= 1.0,
    )
    .unwrap();

    let (report, answered) = probe_with_ttl(pod, addr, 3, timeout);
    let report = report.unwrap_or_else(|| {
        panic!("TTL 3 (1 at the DMZ router): no ICMP error reached the pod (answered: {answered})")
    });
    assert_eq!(
        (report.icmp_type, report.offender),
        (ICMP_TIME_EXCEEDED, Some(IpAddr::V4(DMZ_ROUTER))),
        "the DMZ router's time exceeded, translated back: {report:?}"
    );
    assert!(
        server.peers().is_empty(),
        "a TTL-3 datagram reached the server"
    );

    let (report, answered) = probe_with_ttl(pod, addr, 64, timeout);
    assert!(answered && report.is_none(), "TTL 64: {report:?}");
    assert_eq!(
        scenario::peer_ips(&server.peers()),
        vec![IpAddr::V4(gw.dmz_egress)]
    );
}

/// What the red server's side of the PMTU test saw.
#[derive(Debug, Default)]
struct ServerSide {
    /// Errors queued on its socket.
    reports: Vec<IcmpReport>,
    /// Sources of the requests.
    peers: Vec<SocketAddr>,
}

/// Bytes of a reply of `len` (recognisable: length and a pattern).
fn reply(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect()
}

/// PMTU: the red server answers a pod's request with a 1500-byte IP packet. Without DF the gateway
/// fragments it into the tunnel (1450) and the pod gets the whole datagram. With DF the gateway drops it
/// and sends ICMP fragmentation-needed with MTU 1450 from its egress IP: the server's socket reports it,
/// its kernel caches the path MTU, and its next reply, at 1450 bytes, reaches the pod.
#[test]
fn a_df_reply_too_big_for_the_tunnel_gets_fragmentation_needed() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let addr = SocketAddr::from((RED_SERVER, 7501));
    let full = 1500 - 28; // UDP payload of a 1500-byte IPv4 packet
    let fits = usize::try_from(TUNNEL_MTU).unwrap() - 28;

    // The server: answers "nodf" with a 1500-byte packet without DF; "df" with one with DF, then (after
    // the error arrives, or 3 s) with a 1450-byte one with DF.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let server = topo
        .red()
        .ns
        .thread(move || -> ServerSide {
            let mut side = ServerSide::default();
            let s = ErrorQueueSocket::bind(addr).unwrap();
            s.sock
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 2048];
            while done_rx.try_recv().is_err() {
                let Ok((n, peer)) = s.sock.recv_from(&mut buf) else {
                    continue;
                };
                side.peers.push(peer);
                match &buf[..n] {
                    b"nodf" => {
                        s.set_dont_fragment(false).unwrap();
                        let _ = s.sock.send_to(&reply(full), peer);
                    }
                    b"df" => {
                        s.set_dont_fragment(true).unwrap();
                        // Fails with EMSGSIZE at once when the kernel already knows the path MTU.
                        let _ = s.sock.send_to(&reply(full), peer);
                        if let Ok(Some(r)) = s.recv_error(Duration::from_secs(3)) {
                            side.reports.push(r);
                        }
                        let _ = s.sock.send_to(&reply(fits), peer);
                    }
                    _ => {}
                }
            }
            side
        })
        .unwrap();

    // The pod: asks, and waits for the answer of the expected size (asking again every 4 s).
    let ask = |what: &'static str, want: usize| -> Result<(), String> {
        topo.pod(1, 1)
            .ns
            .run(Duration::from_secs(30), move || {
                let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(12);
                let mut buf = [0u8; 4096];
                let mut sizes = Vec::new();
                while Instant::now() < deadline {
                    s.send_to(what.as_bytes(), addr).unwrap();
                    let asked = Instant::now();
                    while asked.elapsed() < Duration::from_secs(4) {
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            sizes.push(n);
                            if from == addr && n == want && buf[..n] == reply(want)[..] {
                                return Ok(());
                            }
                        }
                    }
                }
                Err(format!(
                    "`{what}`: no {want}-byte answer within 12 s (got sizes {sizes:?})"
                ))
            })
            .map_err(|e| e.to_string())?
    };
    let nodf = ask("nodf", full);
    let df = ask("df", fits);
    let _ = done_tx.send(());
    let side = server.join_timeout(Duration::from_secs(5)).unwrap();
    let m = metrics(&topo);
    nodf.unwrap_or_else(|e| {
        panic!(
            "{e}; a 1500-byte reply without DF must be fragmented into the tunnel; drops: {:?}",
            scenario::drops(&m)
        )
    });
    let report = side
        .reports
        .first()
        .unwrap_or_else(|| {
            panic!(
                "the server got no ICMP error for its 1500-byte DF reply; drops: {:?}",
                scenario::drops(&m)
            )
        })
        .to_owned();
    assert_eq!(
        (
            report.origin,
            report.icmp_type,
            report.icmp_code,
            report.info
        ),
        (
            SO_EE_ORIGIN_ICMP,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            TUNNEL_MTU
        ),
        "fragmentation needed with the tunnel MTU: {report:?}"
    );
    assert_eq!(
        report.offender,
        Some(IpAddr::V4(gw.dmz_egress)),
        "{report:?}"
    );
    df.unwrap_or_else(|e| panic!("{e}: the 1450-byte DF reply must pass"));
    let route = topo
        .red()
        .ns
        .ip(&format!("-4 route get {}", gw.dmz_egress))
        .unwrap();
    assert!(
        route.contains(&format!("mtu {TUNNEL_MTU}")),
        "the server's kernel did not cache the path MTU: {route}"
    );
    assert_eq!(
        scenario::peer_ips(&side.peers),
        vec![IpAddr::V4(gw.dmz_egress)]
    );
    let m = scenario::wait_metric(
        gw,
        "egress_gateway_drops_total",
        &[("reason", "too_big")],
        METRICS,
        |v| v >= 1.0,
    )
    .unwrap();
    assert!(value(&m, "egress_gateway_icmp_errors_originated_total", &[]) >= 1.0);
}

/// MSS clamp: pods with a 1500-byte MTU (so their SYN offers MSS 1460, captured on the pod's `eth0`) reach
/// the red server with an MSS that fits the tunnel: at most 1450 − 40 = 1410 (captured on the server's
/// `eth0`).
#[test]
fn tcp_mss_is_clamped_to_the_tunnel() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut spec = TopologySpec::standard(mode);
    spec.pod_mtu = 1500;
    let topo = common::build(spec);
    let addr = SocketAddr::from((RED_SERVER, 7502));
    let _server = traffic::tcp_echo_server(&topo.red().ns, addr).unwrap();
    let syn_to = |port: u16| {
        move |f: &tests::raw::Frame| {
            matches!(
                f.ip,
                Some(IpInfo {
                    proto: proto::TCP,
                    l4: L4::Tcp { dst, flags, .. },
                    ..
                }) if dst == port && flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            )
        }
    };
    let at_pod = Capture::start(&topo.pod(1, 1).ns, "eth0", syn_to(7502)).unwrap();
    let at_server = Capture::start(&topo.red().ns, "eth0", syn_to(7502)).unwrap();
    assert_eq!(
        traffic::tcp_echo(&topo.pod(1, 1).ns, addr, b"mss").unwrap(),
        b"mss"
    );
    let mss = |frames: Vec<tests::raw::Frame>| -> Vec<Option<u16>> {
        frames
            .iter()
            .map(|f| match f.ip.as_ref().map(|i| &i.l4) {
                Some(L4::Tcp { mss, .. }) => *mss,
                _ => None,
            })
            .collect()
    };
    let sent = mss(at_pod.stop().unwrap());
    let seen = mss(at_server.stop().unwrap());
    assert!(
        sent.first() == Some(&Some(1460)),
        "the pod's SYN should offer 1460 with a 1500-byte MTU: {sent:?}"
    );
    let limit = u16::try_from(TUNNEL_MTU - 40).unwrap();
    assert!(
        !seen.is_empty() && seen.iter().all(|m| m.is_some_and(|m| m <= limit)),
        "SYN MSS at the server: {seen:?}, must be at most {limit} (sent by the pod: {sent:?})"
    );
}
