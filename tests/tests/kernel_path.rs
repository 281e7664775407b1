//! The standard topology with the kernel's own gateway path: reachability, SNAT to the egress IPs, bulk
//! transfers verified by hash, and cleanup. Needs CAP_NET_ADMIN (skips without it, fails with
//! `EGRESS_REQUIRE_NETNS=1`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;
use tests::topology::{BLUE_NET, BLUE_SERVER, INTERNAL_NET, INTERNAL_SERVER, RED_NET, RED_SERVER};
use tests::{
    netns, require_netns, traffic, GatewayMode, NodeSpec, PodRoute, PodSpec, Topology, TopologySpec,
};

const BULK: u64 = 50 * 1024 * 1024;

#[test]
fn ping_pod_to_outside_server() {
    require_netns!();
    let topo = Topology::standard(GatewayMode::Kernel).unwrap();
    for pod in topo.pods() {
        traffic::ping(&pod.ns, IpAddr::V4(RED_SERVER), 3)
            .unwrap_or_else(|e| panic!("pod {}: {e}", pod.ip));
    }
}

#[test]
fn dmz_server_sees_dmz_egress_ip() {
    require_netns!();
    let topo = Topology::standard(GatewayMode::Kernel).unwrap();
    let gw = topo.gateway(1);
    let tcp =
        traffic::tcp_echo_server(&topo.red().ns, SocketAddr::from((RED_SERVER, 7000))).unwrap();
    let udp =
        traffic::udp_echo_server(&topo.red().ns, SocketAddr::from((RED_SERVER, 7001))).unwrap();
    for pod in topo.pods() {
        let back = traffic::tcp_echo(&pod.ns, tcp.addr(), b"hello red").unwrap();
        assert_eq!(back, b"hello red");
        assert_eq!(tcp.last_peer().unwrap().ip(), IpAddr::V4(gw.dmz_egress));
        let back = traffic::udp_echo(&pod.ns, udp.addr(), b"hello red udp").unwrap();
        assert_eq!(back, b"hello red udp");
        assert_eq!(udp.last_peer().unwrap().ip(), IpAddr::V4(gw.dmz_egress));
    }
}

#[test]
fn internal_server_sees_internal_egress_ip() {
    require_netns!();
    let topo = Topology::standard(GatewayMode::Kernel).unwrap();
    let gw = topo.gateway(1);
    let addr = SocketAddr::from((INTERNAL_SERVER, 7000));
    let tcp = traffic::tcp_echo_server(&topo.internal().ns, addr).unwrap();
    let back = traffic::tcp_echo(&topo.pod(2, 1).ns, addr, b"hello internal").unwrap();
    assert_eq!(back, b"hello internal");
    assert_eq!(
        tcp.last_peer().unwrap().ip(),
        IpAddr::V4(gw.internal_egress)
    );
}

#[test]
fn bulk_transfers_both_ways_verified_by_hash() {
    require_netns!();
    let topo = Topology::standard(GatewayMode::Kernel).unwrap();
    let pod = topo.pod(1, 1);
    let timeout = Duration::from_secs(60);
    for (host, ip) in [(topo.red(), RED_SERVER), (topo.internal(), INTERNAL_SERVER)] {
        let addr = SocketAddr::from((ip, 7100));
        let server = traffic::bulk_server(&host.ns, addr).unwrap();
        let up = traffic::bulk_upload(&pod.ns, addr, BULK, 1, timeout).unwrap();
        let down = traffic::bulk_download(&pod.ns, addr, BULK, 2, timeout).unwrap();
        eprintln!(
            "{ip}: upload {:.2} Gbit/s, download {:.2} Gbit/s",
            up.gbit_per_s(),
            down.gbit_per_s()
        );
        let gw = topo.gateway(1);
        let expected = if ip == RED_SERVER {
            gw.dmz_egress
        } else {
            gw.internal_egress
        };
        assert!(server
            .peers()
            .iter()
            .all(|p| p.ip() == IpAddr::V4(expected)));
    }
}

#[test]
fn namespaces_are_removed_when_the_topology_drops() {
    require_netns!();
    let topo = Topology::standard(GatewayMode::Kernel).unwrap();
    let names = topo.namespaces();
    let listed = netns::list().unwrap();
    for n in &names {
        assert!(
            listed.contains(n),
            "{n} should exist while the topology lives"
        );
    }
    drop(topo);
    let listed = netns::list().unwrap();
    let left: Vec<_> = names.iter().filter(|n| listed.contains(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn a_panic_inside_a_test_still_removes_the_namespaces() {
    require_netns!();
    let names = std::sync::Mutex::new(Vec::new());
    let dir = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::standard(GatewayMode::Kernel).unwrap();
        *names.lock().unwrap() = topo.namespaces();
        *dir.lock().unwrap() = Some(topo.dir().to_path_buf());
        panic!("deliberate panic with the topology alive");
    }));
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert!(!names.is_empty());
    let listed = netns::list().unwrap();
    let left: Vec<_> = names.iter().filter(|n| listed.contains(n)).collect();
    assert!(
        left.is_empty(),
        "namespaces left behind after a panic: {left:?}"
    );
    // The log directory is kept after a failure (for debugging); this failure was deliberate.
    if let Some(d) = dir.into_inner().unwrap() {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn gateway_mode_switch_rebuilds_the_gateway_and_traffic_flows_again() {
    require_netns!();
    let mut topo = Topology::standard(GatewayMode::Kernel).unwrap();
    let addr = SocketAddr::from((RED_SERVER, 7000));
    let server = traffic::tcp_echo_server(&topo.red().ns, addr).unwrap();
    traffic::tcp_echo(&topo.pod(1, 1).ns, addr, b"before").unwrap();
    topo.set_gateway_mode(1, GatewayMode::Kernel).unwrap();
    topo.gateway_mut(1)
        .wait_ready(Duration::from_secs(10))
        .unwrap();
    let back = traffic::tcp_echo(&topo.pod(1, 1).ns, addr, b"after").unwrap();
    assert_eq!(back, b"after");
    assert!(server
        .peers()
        .iter()
        .all(|p| p.ip() == IpAddr::V4(topo.gateway(1).dmz_egress)));
}

/// Seed scenario: one pod reaches red through gateway 1 and blue through gateway 2 (a different source
/// IP per destination); the internal network through gateway 2's internal uplink.
#[test]
fn per_destination_gateways() {
    require_netns!();
    let spec = TopologySpec {
        nodes: vec![NodeSpec {
            pods: vec![PodSpec::routes(vec![
                PodRoute::via(RED_NET, &[1]),
                PodRoute::via(BLUE_NET, &[2]),
                PodRoute::via(INTERNAL_NET, &[2]),
            ])],
        }],
        gateways: vec![GatewayMode::Kernel, GatewayMode::Kernel],
        ..TopologySpec::standard(GatewayMode::Kernel)
    };
    let topo = Topology::build(spec).unwrap();
    let pod = topo.pod(1, 1);
    for (host, ip, expected) in [
        (topo.red(), RED_SERVER, topo.gateway(1).dmz_egress),
        (topo.blue(), BLUE_SERVER, topo.gateway(2).dmz_egress),
        (
            topo.internal(),
            INTERNAL_SERVER,
            topo.gateway(2).internal_egress,
        ),
    ] {
        let addr = SocketAddr::from((ip, 7000));
        let server = traffic::tcp_echo_server(&host.ns, addr).unwrap();
        traffic::tcp_echo(&pod.ns, addr, b"x").unwrap();
        assert_eq!(
            server.last_peer().unwrap().ip(),
            IpAddr::V4(expected),
            "to {ip}"
        );
    }
}

/// Two gateways for 0.0.0.0/0: a multipath route, flows hashed over both (fib_multipath_hash_policy=1).
#[test]
fn ecmp_spreads_flows_over_both_gateways() {
    require_netns!();
    let spec = TopologySpec {
        nodes: vec![NodeSpec {
            pods: vec![PodSpec::via(&[1, 2])],
        }],
        gateways: vec![GatewayMode::Kernel, GatewayMode::Kernel],
        ..TopologySpec::standard(GatewayMode::Kernel)
    };
    let topo = Topology::build(spec).unwrap();
    let addr = SocketAddr::from((RED_SERVER, 7000));
    let server = traffic::tcp_echo_server(&topo.red().ns, addr).unwrap();
    for _ in 0..24 {
        traffic::tcp_echo(&topo.pod(1, 1).ns, addr, b"x").unwrap();
    }
    let seen: std::collections::BTreeSet<IpAddr> = server.peers().iter().map(|p| p.ip()).collect();
    let expected: std::collections::BTreeSet<IpAddr> = [1, 2]
        .iter()
        .map(|k| IpAddr::V4(topo.gateway(*k).dmz_egress))
        .collect();
    assert_eq!(seen, expected);
}

/// A rule without gateways is a `throw` route: that destination leaves the pod's table and is routed
/// normally (here: the node's default route to the underlay), not through the tunnel.
#[test]
fn throw_route_bypasses_the_gateway() {
    require_netns!();
    let mut topo = Topology::standard(GatewayMode::Kernel).unwrap();
    topo.set_pod_routes(
        1,
        1,
        &[
            PodRoute::throw(RED_NET),
            PodRoute::via(Ipv4Net::default(), &[1]),
        ],
    )
    .unwrap();
    let pod = topo.pod(1, 1);
    let node = topo.node(1);
    let route = |dst: &str| {
        node.ns
            .ip(&format!("route get {dst} from {} iif {}", pod.ip, pod.cali))
            .unwrap()
    };
    let red = route("198.51.100.10");
    assert!(
        red.contains("dev eth0") && !red.contains("egress.calico"),
        "{red}"
    );
    let blue = route("192.0.2.10");
    assert!(blue.contains("dev egress.calico"), "{blue}");
}

/// IPv6 inside the IPv4 tunnel: pods' fd00:244:… addresses reach the DMZ and the internal network as the
/// gateway's IPv6 egress addresses.
#[test]
fn ipv6_inside_the_tunnel() {
    require_netns!();
    let topo = Topology::standard(GatewayMode::Kernel).unwrap();
    tests::scenario::assert_ipv6_egress(&topo);
}
