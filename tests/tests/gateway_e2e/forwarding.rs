//! Forwarding and SNAT: ping, many short TCP connections, UDP request/response, the internal uplink, two
//! nodes at once. (50 MB each way verified by hash: `tests/tests/userspace_path.rs`.)

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tests::raw::{proto, Capture, Frame, IpInfo, ETHERTYPE_IPV4, L4};
use tests::scenario::{self, packets, peer_ips, value};
use tests::topology::{INTERNAL_SERVER, NODE_VXLAN_DEV, RED_SERVER, VXLAN_PORT};
use tests::{require_netns, require_userspace_gateway, traffic};

use crate::common::{self, metrics, METRICS};

const ICMP_ECHO_REQUEST: u8 = 8;

fn is_echo_request(f: &Frame) -> bool {
    matches!(
        f.ip,
        Some(IpInfo {
            proto: proto::ICMP,
            l4: L4::Icmp {
                ty: ICMP_ECHO_REQUEST,
                ..
            },
            ..
        })
    )
}

/// Scenario 1: every pod pings the red server; the server receives the echo requests from the DMZ egress
/// IP (captured on its `eth0`), never from a pod address.
#[test]
fn ping_reaches_the_outside_server_from_the_egress_ip() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let cap = Capture::start(&topo.red().ns, "eth0", |f| {
        !f.outgoing && is_echo_request(f)
    })
    .unwrap();
    for pod in topo.pods() {
        let out = traffic::ping(&pod.ns, IpAddr::V4(RED_SERVER), 3)
            .unwrap_or_else(|e| panic!("ping from pod {}: {e}", pod.ip));
        assert!(out.contains(" 0% packet loss"), "pod {}: {out}", pod.ip);
    }
    let requests = cap.stop().unwrap();
    assert!(
        requests.len() >= 3 * topo.pods().len(),
        "the red server received {} echo requests, expected at least {}",
        requests.len(),
        3 * topo.pods().len()
    );
    for f in &requests {
        assert_eq!(
            (f.src(), f.dst()),
            (
                Some(IpAddr::V4(gw.dmz_egress)),
                Some(IpAddr::V4(RED_SERVER))
            ),
            "echo request at the red server not from the egress IP: {f:?}"
        );
    }
    // One ICMP query mapping per pod (ping's identifier), all through the DMZ uplink.
    let m = scenario::wait_metric(
        gw,
        "egress_gateway_packets_total",
        &[("direction", "uplink_tx"), ("uplink", "dmz")],
        METRICS,
        |v| v >= requests.len() as f64,
    )
    .unwrap();
    assert!(value(&m, "egress_gateway_flows_created_total", &[]) >= 3.0);
}

/// Scenario 2: 1000 short TCP connections from one pod all succeed; the server sees each from the egress IP
/// on a port of its own, and `egress_gateway_flows_created_total` grows by (at least) 1000.
#[test]
fn a_thousand_short_tcp_connections() {
    const N: usize = 1000;
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let addr = SocketAddr::from((RED_SERVER, 7200));
    let server = traffic::tcp_echo_server(&topo.red().ns, addr).unwrap();
    let before = value(&metrics(&topo), "egress_gateway_flows_created_total", &[]);
    let started = std::time::Instant::now();
    let locals = scenario::short_tcp_connections(&topo.pod(1, 1).ns, addr, N).unwrap();
    eprintln!("{N} connections in {:?}", started.elapsed());
    assert_eq!(locals.len(), N);
    let peers = server.peers();
    assert_eq!(
        peers.len(),
        N,
        "the server accepted {} connections",
        peers.len()
    );
    assert_eq!(
        peer_ips(&peers),
        vec![IpAddr::V4(gw.dmz_egress)],
        "the server saw sources other than the egress IP"
    );
    let ports: BTreeSet<u16> = peers.iter().map(SocketAddr::port).collect();
    assert_eq!(
        ports.len(),
        N,
        "two connections shared an external port (never two flows on one port)"
    );
    let m = scenario::wait_metric(
        gw,
        "egress_gateway_flows_created_total",
        &[],
        METRICS,
        |v| v - before >= N as f64,
    )
    .unwrap();
    let created = value(&m, "egress_gateway_flows_created_total", &[]) - before;
    assert!(
        created <= N as f64 + 10.0,
        "{created} flows created for {N} connections"
    );
}

/// Scenario 2: UDP request/response — 200 exchanges per pod on one socket each, every answer checked; the
/// server sees only the egress IP, one external port per pod socket.
#[test]
fn udp_request_response_from_every_pod() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let addr = SocketAddr::from((RED_SERVER, 7201));
    let server = traffic::udp_echo_server(&topo.red().ns, addr).unwrap();
    for pod in topo.pods() {
        scenario::udp_exchanges(&pod.ns, addr, 200, &pod.ip.to_string())
            .unwrap_or_else(|e| panic!("pod {}: {e}", pod.ip));
    }
    let peers = server.peers();
    assert!(
        peers.len() >= 600,
        "the server got {} requests",
        peers.len()
    );
    assert_eq!(peer_ips(&peers), vec![IpAddr::V4(gw.dmz_egress)]);
    let ports: BTreeSet<u16> = peers.iter().map(SocketAddr::port).collect();
    assert_eq!(
        ports.len(),
        topo.pods().len(),
        "one external port per pod socket (endpoint-independent mapping): {ports:?}"
    );
}

/// Replies leave the gateway towards the node from several outer UDP source ports, each inner flow from one
/// (RFC 7348 §5, as the kernel's vxlan device does): 16 UDP flows of one pod, 3 exchanges each, captured
/// on the gateway's underlay port.
#[test]
fn each_reply_flow_keeps_one_outer_source_port_and_flows_spread() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let addr = SocketAddr::from((RED_SERVER, 7207));
    let _server = traffic::udp_echo_server(&topo.red().ns, addr).unwrap();
    let tunnel_out = Capture::start(&gw.ns, "eth0", common::sent_into_tunnel).unwrap();
    let pod = &topo.pods()[0];
    let locals: Vec<SocketAddr> = (0..16)
        .map(|i| {
            scenario::udp_exchanges(&pod.ns, addr, 3, &format!("flow {i}"))
                .unwrap_or_else(|e| panic!("flow {i}: {e}"))
        })
        .collect();
    let frames = tunnel_out.stop().unwrap();
    // Inner destination port (the pod's socket) -> the outer source ports its replies left from.
    let mut by_flow: std::collections::BTreeMap<u16, BTreeSet<u16>> = Default::default();
    for f in &frames {
        let (
            Some(IpInfo {
                l4: L4::Udp { src: outer, .. },
                ..
            }),
            Some(inner),
        ) = (&f.ip, &f.inner)
        else {
            continue;
        };
        if let Some(IpInfo {
            l4: L4::Udp { src: 7207, dst, .. },
            ..
        }) = &inner.ip
        {
            by_flow.entry(*dst).or_default().insert(*outer);
        }
    }
    for l in &locals {
        let ports = by_flow
            .get(&l.port())
            .unwrap_or_else(|| panic!("no reply of flow {l} captured: {by_flow:?}"));
        assert_eq!(
            ports.len(),
            1,
            "flow {l}: replies from several source ports {ports:?}"
        );
    }
    let used: BTreeSet<u16> = by_flow.values().flatten().copied().collect();
    assert!(
        used.len() >= 4,
        "16 flows left from only {} outer source port(s): {used:?}",
        used.len()
    );
    assert!(
        !used.contains(&VXLAN_PORT),
        "a reply left from the listen port: {used:?}"
    );
}

/// Scenario 3: a destination in the internal routes (10.50.0.0/16) leaves by the internal uplink with the
/// internal egress IP (captured on the internal network), and the DMZ sees no IP packet at all (captured
/// on the DMZ router's port towards the gateway; the DMZ uplink's counter does not move).
#[test]
fn internal_destinations_leave_by_the_internal_uplink_only() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let int_addr = SocketAddr::from((INTERNAL_SERVER, 7300));
    let tcp = traffic::tcp_echo_server(&topo.internal().ns, int_addr).unwrap();
    let udp = traffic::udp_echo_server(&topo.internal().ns, int_addr).unwrap();
    let before = metrics(&topo);
    // The DMZ router's bridge port `gw1` faces the gateway's `gwdmz`: what it receives came from the gateway.
    let dmz = Capture::start(&topo.dmz_router().ns, "gw1", |f| {
        !f.outgoing && f.ethertype == ETHERTYPE_IPV4
    })
    .unwrap();
    let internal = Capture::start(&topo.internal().ns, "gw1", |f| {
        !f.outgoing && f.ethertype == ETHERTYPE_IPV4
    })
    .unwrap();
    for pod in topo.pods() {
        let tag = format!("internal from {}", pod.ip);
        assert_eq!(
            traffic::tcp_echo(&pod.ns, int_addr, tag.as_bytes()).unwrap(),
            tag.as_bytes()
        );
        assert_eq!(
            traffic::udp_echo(&pod.ns, int_addr, tag.as_bytes()).unwrap(),
            tag.as_bytes()
        );
        traffic::ping(&pod.ns, IpAddr::V4(INTERNAL_SERVER), 2).unwrap();
    }
    let want = vec![IpAddr::V4(gw.internal_egress)];
    assert_eq!(
        peer_ips(&tcp.peers()),
        want,
        "TCP sources at the internal server"
    );
    assert_eq!(
        peer_ips(&udp.peers()),
        want,
        "UDP sources at the internal server"
    );
    let after = scenario::wait_metric(
        gw,
        "egress_gateway_packets_total",
        &[("direction", "uplink_tx"), ("uplink", "internal")],
        METRICS,
        |v| v >= packets(&before, "uplink_tx", Some("internal")) + 12.0,
    )
    .unwrap();
    let seen_internal = internal.stop().unwrap();
    assert!(
        seen_internal
            .iter()
            .all(|f| f.src() == Some(IpAddr::V4(gw.internal_egress))),
        "a packet on the internal network not from the internal egress IP: {:?}",
        seen_internal
            .iter()
            .find(|f| f.src() != Some(IpAddr::V4(gw.internal_egress)))
    );
    assert!(seen_internal.len() >= 12, "{} packets", seen_internal.len());
    let seen_dmz = dmz.stop().unwrap();
    assert!(
        seen_dmz.is_empty(),
        "the DMZ received {} IPv4 packets from the gateway, e.g. {:?}",
        seen_dmz.len(),
        seen_dmz.first()
    );
    assert_eq!(
        packets(&after, "uplink_tx", Some("dmz")),
        packets(&before, "uplink_tx", Some("dmz")),
        "the DMZ uplink's counter moved"
    );
}

/// Scenario 7: a pod on node 1 and a pod on node 2 at once — TCP bulk both ways (hash-verified), TCP echo
/// and UDP request/response concurrently; each gets its own replies; the gateway's underlay port carries
/// VXLAN from and to both nodes; the servers see only the egress IP.
#[test]
fn two_pods_on_two_nodes_at_once() {
    const LEN: u64 = 10 * 1024 * 1024;
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let bulk_addr = SocketAddr::from((RED_SERVER, 7400));
    let echo_addr = SocketAddr::from((RED_SERVER, 7401));
    let bulk = traffic::bulk_server(&topo.red().ns, bulk_addr).unwrap();
    let tcp = traffic::tcp_echo_server(&topo.red().ns, echo_addr).unwrap();
    let udp = traffic::udp_echo_server(&topo.red().ns, echo_addr).unwrap();
    let vxlan = |f: &Frame| {
        matches!(
            f.ip,
            Some(IpInfo {
                proto: proto::UDP,
                l4: L4::Udp {
                    dst: VXLAN_PORT,
                    ..
                },
                ..
            })
        )
    };
    let underlay = Capture::start(&gw.ns, "eth0", vxlan).unwrap();
    let pods = [topo.pod(1, 1), topo.pod(2, 1)];
    let timeout = Duration::from_secs(90);
    std::thread::scope(|s| {
        let mut jobs = Vec::new();
        for (i, pod) in pods.iter().enumerate() {
            let seed = 100 + u64::try_from(i).unwrap_or(0) * 2;
            let ns = &pod.ns;
            let who = pod.ip;
            jobs.push(s.spawn(move || {
                traffic::bulk_upload(ns, bulk_addr, LEN, seed, timeout)
                    .map(|_| ())
                    .map_err(|e| format!("{who} upload: {e}"))
            }));
            jobs.push(s.spawn(move || {
                traffic::bulk_download(ns, bulk_addr, LEN, seed + 1, timeout)
                    .map(|_| ())
                    .map_err(|e| format!("{who} download: {e}"))
            }));
            jobs.push(s.spawn(move || {
                for n in 0..50 {
                    let msg = format!("pod {who} message {n}");
                    let back = traffic::tcp_echo(ns, echo_addr, msg.as_bytes())
                        .map_err(|e| format!("{who} tcp echo: {e}"))?;
                    if back != msg.as_bytes() {
                        return Err(format!(
                            "{who} got someone else's echo: {:?}",
                            String::from_utf8_lossy(&back)
                        ));
                    }
                }
                Ok(())
            }));
            jobs.push(s.spawn(move || {
                scenario::udp_exchanges(ns, echo_addr, 200, &format!("pod {who}"))
                    .map(|_| ())
                    .map_err(|e| format!("{who} udp: {e}"))
            }));
        }
        let errors: Vec<String> = jobs
            .into_iter()
            .filter_map(|j| j.join().unwrap_or_else(|_| Err("panicked".into())).err())
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
    });
    let frames = underlay.stop().unwrap();
    for node in topo.nodes() {
        let from = frames
            .iter()
            .filter(|f| !f.outgoing && f.src() == Some(IpAddr::V4(node.ip)))
            .count();
        let to = frames
            .iter()
            .filter(|f| f.outgoing && f.dst() == Some(IpAddr::V4(node.ip)))
            .count();
        assert!(
            from >= 100 && to >= 100,
            "VXLAN at the gateway from node {} ({}): {from} datagrams in, {to} out",
            node.number,
            node.ip
        );
    }
    let egress = vec![IpAddr::V4(gw.dmz_egress)];
    for (what, peers) in [
        ("bulk", bulk.peers()),
        ("tcp echo", tcp.peers()),
        ("udp echo", udp.peers()),
    ] {
        assert_eq!(peer_ips(&peers), egress, "{what} sources at the red server");
    }
    assert!(
        tcp.peers().len() >= 100,
        "{} echo connections",
        tcp.peers().len()
    );
    // The nodes' own view: their tunnel device sent and received.
    for node in topo.nodes() {
        let c = scenario::LinkCounters::read(&node.ns, NODE_VXLAN_DEV).unwrap();
        assert!(
            c.rx_packets > 100 && c.tx_packets > 100,
            "node {}: {c:?}",
            node.number
        );
    }
}
