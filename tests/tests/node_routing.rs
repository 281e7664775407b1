//! The harness's node-agent topology without the agent: bare nodes (no vxlan device, rules or tables),
//! node routing with masquerade for unsteered pod traffic (to the local network and to the outside
//! servers), the nftables firewall helper, and — with a Felix-style tunnel programmed by hand and the real
//! userspace gateway — that the masquerade leaves the tunnel alone. Needs CAP_NET_ADMIN.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use tests::firewall::Proto;
use tests::topology::{LOCAL_SERVER, RED_NET, RED_SERVER};
use tests::{
    agent, require_netns, require_userspace_gateway, traffic, Firewall, GatewayMode, PodRoute,
    Topology, TopologySpec,
};

fn fake_gateway() -> GatewayMode {
    GatewayMode::Userspace {
        binary: PathBuf::from(env!("CARGO_BIN_EXE_fake-gateway")),
    }
}

/// A node-agent topology has bare nodes; unannotated pods reach the local host and the outside servers
/// through the node, masqueraded to the node's address; the firewall rejects (reset, port unreachable)
/// everyone but the admitted sources, and counts both.
#[test]
fn bare_nodes_route_and_masquerade_pod_traffic() {
    require_netns!();
    let topo = Topology::build(TopologySpec::node_agent(&[2], vec![fake_gateway()])).unwrap();
    let node = topo.node(1);
    let node_ip = IpAddr::V4(node.ip);

    // Nothing of the tunnel: the agent makes it.
    assert!(
        node.ns.ip("link show dev egress.calico").is_err(),
        "a node-agent node must not have egress.calico yet"
    );
    for pod in topo.pods() {
        assert_eq!(
            agent::rule_table(&node.ns, IpAddr::V4(pod.ip), 100).unwrap(),
            None
        );
        assert_eq!(pod.table, None);
    }
    assert!(topo.namespaces().iter().any(|n| n.ends_with("-local")));

    // Local network: node routing, masqueraded.
    let local = SocketAddr::from((LOCAL_SERVER, 7000));
    let local_srv = traffic::tcp_echo_server(&topo.local().ns, local).unwrap();
    let pod = topo.pod(1, 1);
    assert_eq!(
        traffic::tcp_echo(&pod.ns, local, b"local").unwrap(),
        b"local"
    );
    assert_eq!(local_srv.last_peer().map(|p| p.ip()), Some(node_ip));

    // The red server behind a firewall that admits only gateway 1's egress IP: refused at once.
    let red = SocketAddr::from((RED_SERVER, 7000));
    let red_srv = traffic::tcp_echo_server(&topo.red().ns, red).unwrap();
    let egress = IpAddr::V4(topo.gateway(1).dmz_egress);
    let fw = Firewall::admit_only(&topo.red().ns, Proto::Tcp, 7000, &[egress]).unwrap();
    let (r, took) = traffic::connect_once(&pod.ns, red, Duration::from_secs(5)).unwrap();
    assert_eq!(
        r.as_ref().map_err(std::io::Error::kind).err(),
        Some(ErrorKind::ConnectionRefused),
        "{r:?} after {took:?}\n{}",
        fw.ruleset()
    );
    assert!(fw.rejected().unwrap() >= 1, "{}", fw.ruleset());
    assert_eq!(fw.admitted().unwrap(), 0);
    assert!(red_srv.peers().is_empty());
    drop(fw);

    // Admitting the node's address lets the same pod in; the server sees the node.
    let fw = Firewall::admit_only(&topo.red().ns, Proto::Tcp, 7000, &[node_ip]).unwrap();
    assert_eq!(traffic::tcp_echo(&pod.ns, red, b"red").unwrap(), b"red");
    assert_eq!(red_srv.last_peer().map(|p| p.ip()), Some(node_ip));
    assert!(fw.admitted().unwrap() >= 1, "{}", fw.ruleset());
    assert_eq!(fw.rejected().unwrap(), 0);
    drop(fw);

    // UDP: port unreachable for the others.
    let red_udp = SocketAddr::from((RED_SERVER, 7001));
    let _udp_srv = traffic::udp_echo_server(&topo.red().ns, red_udp).unwrap();
    let fw = Firewall::admit_only(&topo.red().ns, Proto::Udp, 7001, &[egress]).unwrap();
    let (r, _) =
        traffic::udp_once(&topo.pod(1, 2).ns, red_udp, b"x", Duration::from_secs(3)).unwrap();
    assert_eq!(
        r.as_ref().map_err(std::io::Error::kind).err(),
        Some(ErrorKind::ConnectionRefused),
        "{r:?}"
    );
    assert!(fw.rejected().unwrap() >= 1);
    drop(fw);
    // Without the firewall it answers (through the node, from the node's address).
    assert_eq!(
        traffic::udp_echo(&topo.pod(1, 2).ns, red_udp, b"y").unwrap(),
        b"y"
    );

    // Blue too.
    let blue = SocketAddr::from((topo.blue().ip, 7000));
    let blue_srv = traffic::tcp_echo_server(&topo.blue().ns, blue).unwrap();
    assert_eq!(traffic::tcp_echo(&pod.ns, blue, b"blue").unwrap(), b"blue");
    assert_eq!(blue_srv.last_peer().map(|p| p.ip()), Some(node_ip));
}

/// The masquerade does not touch the tunnel: with `egress.calico` programmed by hand (as Felix does) and
/// the real userspace gateway, a steered pod reaches red from the egress IP while a plain pod on the same
/// node reaches it from the node's address.
#[test]
fn masquerade_leaves_the_tunnel_alone() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = Topology::build(TopologySpec::node_agent(&[2], vec![mode])).unwrap();
    topo.gateway_mut(1)
        .wait_ready(Duration::from_secs(30))
        .unwrap();
    topo.felix_tunnel(1).unwrap();
    topo.set_pod_routes(1, 1, &[PodRoute::via(RED_NET, &[1])])
        .unwrap();
    let red = SocketAddr::from((RED_SERVER, 7000));
    let server = traffic::tcp_echo_server(&topo.red().ns, red).unwrap();
    assert_eq!(
        traffic::tcp_echo(&topo.pod(1, 1).ns, red, b"steered").unwrap(),
        b"steered"
    );
    assert_eq!(
        server.last_peer().map(|p| p.ip()),
        Some(IpAddr::V4(topo.gateway(1).dmz_egress))
    );
    assert_eq!(
        traffic::tcp_echo(&topo.pod(1, 2).ns, red, b"plain").unwrap(),
        b"plain"
    );
    assert_eq!(
        server.last_peer().map(|p| p.ip()),
        Some(IpAddr::V4(topo.node(1).ip))
    );
}

/// The readers and probes the node-agent scenarios rely on, checked against a node programmed by hand the
/// way the agent programs it: `agent::rule_table` and `agent::table_route` parse the kernel's real output
/// (multipath, unreachable); 48 UDP flows spread over a two-gateway multipath route; the `UdpProbe`
/// measures how long a flow is cut off when its route changes; an `unreachable` route makes TCP and UDP fail
/// at once (not a timeout) and `ip route get … iif cali…` say so.
#[test]
fn scenario_tools_on_a_hand_programmed_node() {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use ipnet::Ipv4Net;
    use tests::agent::RouteShape;
    use tests::scenario::{self, UdpProbe};

    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo =
        Topology::build(TopologySpec::node_agent(&[1], vec![mode.clone(), mode])).unwrap();
    for k in 1..=2 {
        topo.gateway_mut(k)
            .wait_ready(Duration::from_secs(30))
            .unwrap();
    }
    topo.felix_tunnel(1).unwrap();
    let all = IpNet::from(Ipv4Net::default());
    topo.set_pod_routes(1, 1, &[PodRoute::via(all, &[1, 2])])
        .unwrap();
    let node = &topo.node(1).ns;
    let pod = topo.pod(1, 1);
    let table = agent::rule_table(node, IpAddr::V4(pod.ip), 100)
        .unwrap()
        .expect("the pod's rule");
    let (gw1, gw2) = (topo.gateway(1).ip, topo.gateway(2).ip);
    assert_eq!(
        agent::table_route(node, table, all).unwrap(),
        Some(RouteShape::Via(vec![IpAddr::V4(gw1), IpAddr::V4(gw2)]))
    );

    let flows = SocketAddr::from((RED_SERVER, 7100));
    let server = traffic::udp_echo_server(&topo.red().ns, flows).unwrap();
    scenario::udp_flows(&pod.ns, flows, 48).unwrap();
    let seen: BTreeSet<IpAddr> = server.peers().iter().map(SocketAddr::ip).collect();
    assert_eq!(seen.len(), 2, "{seen:?}");

    let probe_addr = SocketAddr::from((RED_SERVER, 7101));
    let probe_srv = traffic::udp_echo_server(&topo.red().ns, probe_addr).unwrap();
    let probe = UdpProbe::start(&pod.ns, probe_addr, Duration::from_millis(10)).unwrap();
    probe
        .wait_answer_after(Instant::now(), Duration::from_secs(5))
        .unwrap();
    let via = probe_srv.last_peer().unwrap().ip();
    let other = if via == IpAddr::V4(topo.gateway(1).dmz_egress) {
        2
    } else {
        1
    };
    let switched = Instant::now();
    node.ip(&format!(
        "route replace default via {} dev egress.calico onlink table {table}",
        topo.gateway(other).ip
    ))
    .unwrap();
    let cut = probe
        .wait_answer_after(switched, Duration::from_secs(5))
        .unwrap();
    eprintln!(
        "probe answered {} ms after the route change",
        cut.as_millis()
    );
    assert_eq!(
        probe_srv.last_peer().unwrap().ip(),
        IpAddr::V4(topo.gateway(other).dmz_egress)
    );
    probe.stop().unwrap();

    // Fail closed: an unreachable route.
    node.ip(&format!("route replace unreachable default table {table}"))
        .unwrap();
    assert_eq!(
        agent::table_route(node, table, all).unwrap(),
        Some(RouteShape::Unreachable)
    );
    let verdict = node
        .ip(&format!(
            "route get {RED_SERVER} from {} iif {}",
            pod.ip, pod.cali
        ))
        .unwrap_or_else(|e| e.to_string());
    assert!(
        verdict.to_lowercase().contains("unreachable")
            || verdict.to_lowercase().contains("no route to host"),
        "{verdict}"
    );
    let red = SocketAddr::from((RED_SERVER, 7000));
    let _tcp = traffic::tcp_echo_server(&topo.red().ns, red).unwrap();
    let (r, took) = traffic::connect_once(&pod.ns, red, Duration::from_secs(5)).unwrap();
    eprintln!("connect through an unreachable route: {r:?} after {took:?}");
    assert!(
        r.is_err() && took < Duration::from_secs(2),
        "{r:?} {took:?}"
    );
    let (r, took) = traffic::udp_once(&pod.ns, probe_addr, b"x", Duration::from_secs(3)).unwrap();
    eprintln!("UDP through an unreachable route: {r:?} after {took:?}");
    assert!(
        r.is_err() && took < Duration::from_secs(2),
        "{r:?} {took:?}"
    );
}
