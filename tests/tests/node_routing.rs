//! The harness's node-agent topology without the agent: bare nodes (no vxlan device, rules or tables),
//! node routing with masquerade for unsteered pod traffic (to the local network and to the outside
//! servers), the nftables firewall helper, and — with a Felix-style tunnel programmed by hand and the real
//! userspace gateway — that the masquerade leaves the tunnel alone. Needs CAP_NET_ADMIN.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

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
