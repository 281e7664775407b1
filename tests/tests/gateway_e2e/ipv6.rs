//! IPv6 inside the tunnel (scenario 8). The harness's dual-stack topology routes the pods' IPv6 through
//! the tunnel (next hop: the link-local of the gateway's tunnel MAC), but its userspace configuration has no
//! IPv6 uplink addresses; the test restarts the gateway with a configuration of its own that has them
//! ([`ConfigSpec::ipv6`]).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tests::raw::{proto, Capture, ErrorQueueSocket, IpInfo, L4};
use tests::scenario::{self, ConfigSpec, TUNNEL_IP6};
use tests::topology::{INTERNAL_SERVER6, RED_SERVER6};
use tests::{require_netns, require_userspace_gateway, traffic};

use crate::common::{self, metrics, READY};

const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const SO_EE_ORIGIN_ICMP6: u8 = 3;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// Every pod pings the red server over IPv6 (the server captures the echo requests from the DMZ egress
/// IPv6 address), and talks TCP and UDP to it and TCP to the internal server, which see the DMZ and the
/// internal egress IPv6 addresses; a datagram with hop limit 2 gets ICMPv6 time exceeded from the
/// gateway's tunnel IPv6 address; a 1500-byte reply gets packet too big (MTU 1450) back to the server.
#[test]
fn ipv6_through_the_tunnel() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = common::standard(mode);
    let spec = ConfigSpec {
        ipv6: true,
        ..ConfigSpec::default()
    };
    let yaml = spec.yaml(topo.gateway(1)).unwrap();
    let _own = scenario::restart_gateway(&mut topo, 1, "ipv6", &yaml, READY).unwrap();
    let gw = topo.gateway(1);
    let dmz6 = IpAddr::V6(gw.dmz_egress6.unwrap());
    let int6 = IpAddr::V6(gw.internal_egress6.unwrap());
    let red = SocketAddr::from((RED_SERVER6, 7900));
    let internal = SocketAddr::from((INTERNAL_SERVER6, 7900));
    let red_tcp = traffic::tcp_echo_server(&topo.red().ns, red).unwrap();
    let red_udp = traffic::udp_echo_server(&topo.red().ns, red).unwrap();
    let int_tcp = traffic::tcp_echo_server(&topo.internal().ns, internal).unwrap();
    let pings = Capture::start(&topo.red().ns, "eth0", |f| {
        !f.outgoing
            && matches!(
                f.ip,
                Some(IpInfo {
                    proto: proto::ICMPV6,
                    l4: L4::Icmp {
                        ty: ICMPV6_ECHO_REQUEST,
                        ..
                    },
                    ..
                })
            )
    })
    .unwrap();
    for pod in topo.pods() {
        let ip6 = pod.ip6.expect("dual-stack pods");
        let out = traffic::ping(&pod.ns, IpAddr::V6(RED_SERVER6), 3).unwrap_or_else(|e| {
            panic!(
                "ping6 from {ip6}: {e}; drops: {:?}",
                scenario::drops(&metrics(&topo))
            )
        });
        assert!(out.contains(" 0% packet loss"), "{ip6}: {out}");
        let tag = format!("v6 from {ip6}");
        assert_eq!(
            traffic::tcp_echo(&pod.ns, red, tag.as_bytes()).unwrap(),
            tag.as_bytes()
        );
        assert_eq!(
            traffic::udp_echo(&pod.ns, red, tag.as_bytes()).unwrap(),
            tag.as_bytes()
        );
        assert_eq!(
            traffic::tcp_echo(&pod.ns, internal, tag.as_bytes()).unwrap(),
            tag.as_bytes()
        );
    }
    let requests = pings.stop().unwrap();
    assert!(requests.len() >= 3 * topo.pods().len(), "{requests:?}");
    assert!(
        requests.iter().all(|f| f.src() == Some(dmz6)),
        "echo requests at the red server not from {dmz6}: {:?}",
        requests.iter().find(|f| f.src() != Some(dmz6))
    );
    assert_eq!(scenario::peer_ips(&red_tcp.peers()), vec![dmz6]);
    assert_eq!(scenario::peer_ips(&red_udp.peers()), vec![dmz6]);
    assert_eq!(scenario::peer_ips(&int_tcp.peers()), vec![int6]);

    // Hop limit 2: 1 at the gateway after the node's decrement.
    let report = topo
        .pod(1, 1)
        .ns
        .run(Duration::from_secs(20), move || {
            let s = ErrorQueueSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).unwrap();
            s.set_ttl(2).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let _ = s.sock.send_to(b"hop limit 2", red);
                if let Ok(Some(r)) = s.recv_error(Duration::from_millis(300)) {
                    return Some(r);
                }
            }
            None
        })
        .unwrap()
        .expect("no ICMPv6 error for hop limit 2");
    assert_eq!(
        (report.origin, report.icmp_type, report.offender),
        (
            SO_EE_ORIGIN_ICMP6,
            ICMPV6_TIME_EXCEEDED,
            Some(IpAddr::V6(TUNNEL_IP6))
        ),
        "{report:?}"
    );

    // A 1500-byte IPv6 reply (IPv6 is never fragmented on the way) does not fit the tunnel: the server
    // gets packet too big with MTU 1450 from the egress address, and its 1450-byte retry reaches the pod.
    let pmtu = SocketAddr::from((RED_SERVER6, 7901));
    let server = topo
        .red()
        .ns
        .thread(move || -> Option<tests::raw::IcmpReport> {
            let s = ErrorQueueSocket::bind(pmtu).ok()?;
            s.sock
                .set_read_timeout(Some(Duration::from_secs(15)))
                .ok()?;
            let mut buf = [0u8; 64];
            let (_, peer) = s.sock.recv_from(&mut buf).ok()?;
            let _ = s.sock.send_to(&[7u8; 1500 - 48], peer);
            let report = s.recv_error(Duration::from_secs(5)).ok()?;
            let _ = s.sock.send_to(&[7u8; 1450 - 48], peer);
            report
        })
        .unwrap();
    let got = topo
        .pod(1, 1)
        .ns
        .run(Duration::from_secs(20), move || -> Vec<usize> {
            let s = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut sizes = Vec::new();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(12);
            // Ask (again each second until the server has the request), then collect what comes back.
            while Instant::now() < deadline && !sizes.contains(&(1450 - 48)) {
                if sizes.is_empty() {
                    s.send_to(b"big", pmtu).unwrap();
                }
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    sizes.push(n);
                }
            }
            sizes
        })
        .unwrap();
    let report = server.join_timeout(Duration::from_secs(20)).unwrap();
    let report = report.unwrap_or_else(|| {
        panic!(
            "no ICMPv6 error for a 1500-byte reply (the pod got {got:?}); drops: {:?}",
            scenario::drops(&metrics(&topo))
        )
    });
    assert_eq!(
        (
            report.origin,
            report.icmp_type,
            report.info,
            report.offender
        ),
        (SO_EE_ORIGIN_ICMP6, ICMPV6_PACKET_TOO_BIG, 1450, Some(dmz6)),
        "{report:?}"
    );
    assert_eq!(got, vec![1450 - 48], "what the pod received");
}
