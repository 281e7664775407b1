//! Hostile and unsolicited input (scenario 5): inbound traffic to the egress IP that matches no flow, and
//! VXLAN from a host outside `allowed_sources`, with a wrong VNI, or carrying a source outside the pod
//! CIDRs. Each is dropped, counted under its reason, creates no state, and nothing leaves the gateway.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tests::raw::{self, Capture, InnerUdp, ETHERTYPE_IPV4};
use tests::scenario::{self, drop_count, packets, value};
use tests::topology::{tunnel_mac, RED_SERVER, VNI, VXLAN_PORT};
use tests::{require_netns, require_userspace_gateway, traffic, Metrics};

use crate::common::{self, metrics, METRICS};

/// The inner source port of the crafted datagrams.
const POD_PORT: u16 = 40001;

fn conntrack_entries(m: &Metrics) -> f64 {
    value(m, "egress_gateway_conntrack_entries", &[])
}

/// Inbound packets to the DMZ egress IP that belong to no flow — TCP SYNs to two ports and UDP datagrams,
/// from the outside red server and from the DMZ router — are dropped as `no_flow`: no TCP answer (the
/// connection times out, it is not reset), nothing enters the tunnel, the flow table does not grow.
#[test]
fn unsolicited_inbound_is_dropped_without_state() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let egress = gw.dmz_egress;
    let before = metrics(&topo);
    // The gateway's underlay port: anything it sends towards the nodes.
    let tunnel_out = Capture::start(&gw.ns, "eth0", common::sent_into_tunnel).unwrap();
    let mut sent = 0.0;
    for host in [topo.red(), topo.dmz_router()] {
        for port in [22u16, 7600] {
            let target = SocketAddr::from((egress, port));
            let r = host.ns.run(Duration::from_secs(10), move || {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(1500))
                    .map(|_| ())
                    .map_err(|e| e.kind())
            });
            assert_eq!(
                r.unwrap(),
                Err(std::io::ErrorKind::TimedOut),
                "TCP SYN to {target} from {}: must go unanswered",
                host.ip
            );
            sent += 1.0;
        }
        let payloads = vec![b"unsolicited".to_vec(); 5];
        raw::send_udp(
            &host.ns,
            SocketAddr::from((host.ip, 0)),
            SocketAddr::from((egress, 53)),
            &payloads,
        )
        .unwrap();
        sent += 5.0;
    }
    let m = scenario::wait_metric(
        gw,
        "egress_gateway_drops_total",
        &[("reason", "no_flow")],
        METRICS,
        |v| v - drop_count(&before, "no_flow") >= sent,
    )
    .unwrap();
    assert_eq!(
        conntrack_entries(&m),
        conntrack_entries(&before),
        "unsolicited inbound created state"
    );
    assert_eq!(
        value(&m, "egress_gateway_flows_created_total", &[]),
        value(&before, "egress_gateway_flows_created_total", &[])
    );
    assert_eq!(
        packets(&m, "tunnel_tx", None),
        packets(&before, "tunnel_tx", None),
        "something was sent into the tunnel"
    );
    assert!(
        tunnel_out.stop().unwrap().is_empty(),
        "VXLAN left the gateway"
    );
    // The SYN (and its retransmissions) count under no_flow, not under a TCP-specific reason.
    assert_eq!(drop_count(&m, "tcp_no_syn_for_new_flow"), 0.0);
}

/// VXLAN that must not be accepted, crafted byte for byte as a node's vxlan device sends it (a valid one
/// from node 1 is forwarded first, proving the crafted path works):
/// * from 172.19.0.66, a host on the underlay outside `allowed_sources` → `vxlan_source_not_allowed`;
/// * from node 1 with VNI 4098 → `vxlan_wrong_vni`;
/// * from node 1 with inner sources 10.99.0.7 and 192.168.7.7 (outside the pod CIDRs) →
///   `inner_source_not_allowed`.
///
/// Each count grows by exactly what was sent, the red server receives nothing more, no IPv4 packet
/// reaches the DMZ, and no uplink counter moves.
#[test]
fn hostile_vxlan_is_dropped_and_counted() {
    const EACH: usize = 5;
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let rogue = scenario::underlay_host(&topo, "rogue", "172.19.0.66/16".parse().unwrap(), 1)
        .expect("a host outside allowed_sources on the underlay");
    let node = topo.node(1);
    let pod = topo.pod(1, 1);
    let red = SocketAddr::from((RED_SERVER, 7601));
    let server = traffic::udp_echo_server(&topo.red().ns, red).unwrap();
    let tunnel = SocketAddr::from((gw.ip, VXLAN_PORT));
    let datagram = |vni: u32, src: Ipv4Addr, tag: &str| {
        raw::vxlan_udp(
            vni,
            &InnerUdp {
                src_mac: raw::parse_mac(&node.vxlan_mac).unwrap(),
                dst_mac: raw::parse_mac(&tunnel_mac(gw.ip)).unwrap(),
                src: SocketAddr::from((src, POD_PORT)),
                dst: red,
                ttl: 64,
                payload: tag.as_bytes().to_vec(),
            },
        )
        .unwrap()
    };
    let from_node = SocketAddr::from((node.ip, 0));

    // Control: the same frame, valid, from node 1. The echo comes back through the tunnel to the pod, where
    // a socket on the crafted source port takes it (so the pod sends no port unreachable).
    let pod_sock = pod
        .ns
        .run(Duration::from_secs(5), || {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, POD_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            std::io::Result::Ok(s)
        })
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 64];
    let mut tries = 0;
    let echoed = loop {
        tries += 1;
        assert!(
            tries <= 5,
            "a valid crafted VXLAN datagram got no echo; red saw {:?}; drops: {:?}",
            server.peers(),
            scenario::drops(&metrics(&topo))
        );
        raw::send_udp(
            &node.ns,
            from_node,
            tunnel,
            &[datagram(VNI, pod.ip, "control")],
        )
        .unwrap();
        if let Ok((n, from)) = pod_sock.recv_from(&mut buf) {
            break (n, from);
        }
    };
    assert_eq!(echoed, (7, red), "the control's echo at the pod");
    assert_eq!(
        scenario::peer_ips(&server.peers()),
        vec![IpAddr::V4(gw.dmz_egress)]
    );
    let seen_before = server.peers().len();
    // Every packet of the control counted (forwarded on the uplink, echo into the tunnel) before the
    // baseline is taken.
    let mut before = scenario::wait_metric(
        gw,
        "egress_gateway_packets_total",
        &[("direction", "uplink_tx")],
        METRICS,
        |v| v >= seen_before as f64,
    )
    .unwrap();
    before = scenario::wait_metric(
        gw,
        "egress_gateway_packets_total",
        &[("direction", "tunnel_tx")],
        METRICS,
        |v| v >= packets(&before, "tunnel_tx", None).max(1.0),
    )
    .unwrap();
    let dmz = Capture::start(&topo.dmz_router().ns, "gw1", |f| {
        !f.outgoing && f.ethertype == ETHERTYPE_IPV4
    })
    .unwrap();

    let n = |d: Vec<u8>| vec![d; EACH];
    raw::send_udp(
        &rogue,
        SocketAddr::from(([172, 19, 0, 66], 0)),
        tunnel,
        &n(datagram(VNI, pod.ip, "rogue source")),
    )
    .unwrap();
    raw::send_udp(
        &node.ns,
        from_node,
        tunnel,
        &n(datagram(VNI + 1, pod.ip, "wrong vni")),
    )
    .unwrap();
    for spoofed in [Ipv4Addr::new(10, 99, 0, 7), Ipv4Addr::new(192, 168, 7, 7)] {
        raw::send_udp(
            &node.ns,
            from_node,
            tunnel,
            &n(datagram(VNI, spoofed, "spoofed")),
        )
        .unwrap();
    }
    let expected = [
        ("vxlan_source_not_allowed", EACH),
        ("vxlan_wrong_vni", EACH),
        ("inner_source_not_allowed", 2 * EACH),
    ];
    let delta = |m: &Metrics, reason: &str| drop_count(m, reason) - drop_count(&before, reason);
    let after = scenario::poll(
        METRICS,
        Duration::from_millis(50),
        "the drop counters",
        || {
            let m = gw.metrics().ok()?;
            expected
                .iter()
                .all(|(r, n)| delta(&m, r) >= *n as f64)
                .then_some(m)
        },
    )
    .unwrap_or_else(|e| {
        let m = metrics(&topo);
        panic!(
            "{e}: deltas {:?}; all drops {:?}",
            expected.map(|(r, _)| (r, delta(&m, r))),
            scenario::drops(&m)
        )
    });
    for (reason, n) in expected {
        assert_eq!(delta(&after, reason), n as f64, "drops {reason}");
    }
    // Every hostile datagram is now counted as dropped: none of them can still be forwarded.
    let leaked = dmz.stop().unwrap();
    assert!(
        leaked.is_empty(),
        "IPv4 packets reached the DMZ: {leaked:?}"
    );
    assert_eq!(
        server.peers().len(),
        seen_before,
        "the red server received hostile traffic"
    );
    let after = metrics(&topo);
    assert_eq!(
        packets(&after, "uplink_tx", None),
        packets(&before, "uplink_tx", None),
        "an uplink sent something"
    );
    assert_eq!(
        value(&after, "egress_gateway_flows_created_total", &[]),
        value(&before, "egress_gateway_flows_created_total", &[])
    );
}
