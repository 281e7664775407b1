//! Where the agent sends a pod's traffic: the legacy firewall (only the egress IP gets in), a different
//! egress IP per destination (red / blue, IPv4 and IPv6), and one gateway as the single exit (DMZ and
//! internal uplinks).

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tests::agent::{self, RouteShape};
use tests::firewall::Proto;
use tests::topology::{
    gateway_ip, BLUE_NET, BLUE_NET6, BLUE_SERVER, BLUE_SERVER6, INTERNAL_SERVER, INTERNAL_SERVER6,
    LOCAL_NET, LOCAL_SERVER, POD_RULE_PRIORITY, RED_NET, RED_NET6, RED_SERVER, RED_SERVER6,
};
use tests::{
    require_netns, require_node_agent, require_userspace_gateway, traffic, Firewall, Inventory,
    Policy, PolicyRule, TopologySpec,
};

use crate::common::{Env, OrDiag};

/// Scenario 1: the red server's firewall admits only gateway 1's DMZ egress IP. The opted-in pod (its
/// namespace uses a policy sending 0.0.0.0/0 to gateway 1) gets through and is seen from the egress IP; a
/// pod that is not opted in leaves through its node (masqueraded) and is rejected by the firewall — refused
/// at once, counted by the reject rule, never a timeout.
#[test]
fn legacy_firewall_admits_only_the_egress_ip() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let env = Env::start(TopologySpec::node_agent(&[2], vec![mode]), &bin, |topo| {
        let mut inv = Inventory::new();
        inv.policy(Policy::new(
            "legacy-fw",
            vec![PolicyRule::via(Ipv4Net::default(), "red").described("everything via red")],
        ))
        .namespace_with_policy("legacy", "legacy-fw")
        .namespace("plain")
        .client_pod("legacy", "app", topo.pod(1, 1))
        .client_pod("plain", "other", topo.pod(1, 2))
        .gateway_pod(1, "red", topo.spec().ipv6);
        inv
    });
    let topo = &env.topo;
    let (opted, plain) = (topo.pod(1, 1), topo.pod(1, 2));
    let egress = IpAddr::V4(topo.gateway(1).dmz_egress);
    let red = SocketAddr::from((RED_SERVER, 7000));
    let server = traffic::tcp_echo_server(&topo.red().ns, red).or_diag(&env, "red server");
    let fw =
        Firewall::admit_only(&topo.red().ns, Proto::Tcp, 7000, &[egress]).or_diag(&env, "firewall");

    let table = env.table_of(opted);
    env.wait_route(
        table,
        Ipv4Net::default(),
        &RouteShape::Via(vec![IpAddr::V4(gateway_ip(1))]),
        Duration::from_secs(5),
    );
    assert_eq!(
        env.tcp_source(opted, &server),
        egress,
        "the opted-in pod must be seen from the egress IP"
    );
    assert!(fw.admitted().or_diag(&env, "counter") >= 1);

    assert_eq!(
        agent::rule_table(&topo.node(1).ns, IpAddr::V4(plain.ip), POD_RULE_PRIORITY)
            .or_diag(&env, "ip rule"),
        None,
        "a pod that is not opted in must get no rule"
    );
    let rejected = fw.rejected().or_diag(&env, "counter");
    let peers = server.peers().len();
    let (r, took) =
        traffic::connect_once(&plain.ns, red, Duration::from_secs(5)).or_diag(&env, "connect");
    match &r {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => env.fail(format!(
            "the plain pod's connection to the firewalled server: want ECONNREFUSED, got {other:?} after {took:?}\n{}",
            fw.ruleset()
        )),
    }
    assert!(
        fw.rejected().or_diag(&env, "counter") > rejected,
        "the reject rule did not count the plain pod's SYN:\n{}",
        fw.ruleset()
    );
    assert_eq!(
        server.peers().len(),
        peers,
        "the server accepted the plain pod"
    );
}

/// Scenario 2: one pod, one policy — 192.0.2.0/24 through the red gateway (1), 198.51.100.0/24 through the
/// blue one (2), 172.16.1.0/24 without a gateway. Each destination sees its own source: gateway 1's egress
/// IP, gateway 2's, the node's (node routing, masqueraded). The same for IPv6 through the gateways.
#[test]
fn red_and_blue_destinations_get_their_own_egress_ip() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let spec = TopologySpec::node_agent(&[1], vec![mode.clone(), mode]);
    let env = Env::start(spec, &bin, |topo| {
        let mut rules = vec![
            PolicyRule::via(BLUE_NET, "red").described("legacy firewall: red egress IP"),
            PolicyRule::via(RED_NET, "blue").described("partner: blue egress IP"),
            PolicyRule::no_gateway(LOCAL_NET).described("local: no gateway"),
        ];
        if topo.spec().ipv6 {
            rules.push(PolicyRule::via(BLUE_NET6, "red"));
            rules.push(PolicyRule::via(RED_NET6, "blue"));
        }
        let mut inv = Inventory::new();
        inv.policy(Policy::new("red-blue", rules))
            .namespace_with_policy("app", "red-blue")
            .client_pod("app", "client", topo.pod(1, 1))
            .gateway_pod(1, "red", topo.spec().ipv6)
            .gateway_pod(2, "blue", topo.spec().ipv6);
        inv
    });
    let topo = &env.topo;
    let pod = topo.pod(1, 1);
    let table = env.table_of(pod);
    let (gw1, gw2) = (topo.gateway(1), topo.gateway(2));
    env.wait_route(
        table,
        BLUE_NET,
        &RouteShape::Via(vec![IpAddr::V4(gw1.ip)]),
        Duration::from_secs(5),
    );
    env.wait_route(
        table,
        RED_NET,
        &RouteShape::Via(vec![IpAddr::V4(gw2.ip)]),
        Duration::from_secs(5),
    );
    env.wait_route(table, LOCAL_NET, &RouteShape::Throw, Duration::from_secs(5));

    let port = 7000;
    let blue = traffic::tcp_echo_server(&topo.blue().ns, SocketAddr::from((BLUE_SERVER, port)))
        .or_diag(&env, "blue server");
    let red = traffic::tcp_echo_server(&topo.red().ns, SocketAddr::from((RED_SERVER, port)))
        .or_diag(&env, "red server");
    let local = traffic::tcp_echo_server(&topo.local().ns, SocketAddr::from((LOCAL_SERVER, port)))
        .or_diag(&env, "local server");
    assert_eq!(
        env.tcp_source(pod, &blue),
        IpAddr::V4(gw1.dmz_egress),
        "192.0.2.10 must see the red gateway's egress IP"
    );
    assert_eq!(
        env.tcp_source(pod, &red),
        IpAddr::V4(gw2.dmz_egress),
        "198.51.100.10 must see the blue gateway's egress IP"
    );
    let seen = env.tcp_source(pod, &local);
    assert_eq!(
        seen,
        IpAddr::V4(topo.node(1).ip),
        "172.16.1.10 must be reached by node routing (the node's address), not through a gateway"
    );

    if topo.spec().ipv6 {
        let blue6 =
            traffic::tcp_echo_server(&topo.blue().ns, SocketAddr::from((BLUE_SERVER6, port)))
                .or_diag(&env, "blue server (IPv6)");
        let red6 = traffic::tcp_echo_server(&topo.red().ns, SocketAddr::from((RED_SERVER6, port)))
            .or_diag(&env, "red server (IPv6)");
        assert_eq!(
            env.tcp_source(pod, &blue6).to_string(),
            gw1.dmz_egress6.expect("dual stack").to_string(),
            "2001:db8:2::10 must see the red gateway's IPv6 egress address"
        );
        assert_eq!(
            env.tcp_source(pod, &red6).to_string(),
            gw2.dmz_egress6.expect("dual stack").to_string(),
            "2001:db8:100::10 must see the blue gateway's IPv6 egress address"
        );
        let udp6 = SocketAddr::from((RED_SERVER6, port + 1));
        let udp_server = traffic::udp_echo_server(&topo.red().ns, udp6).or_diag(&env, "udp6");
        traffic::udp_echo(&pod.ns, udp6, b"v6").or_diag(&env, "UDP over IPv6 to red");
        assert_eq!(
            udp_server.last_peer().map(|p| p.ip()),
            gw2.dmz_egress6.map(IpAddr::V6)
        );
    }
}

/// Scenario 3: one gateway with both uplinks is the single exit (policy 0.0.0.0/0 and ::/0 → it): the red
/// server sees its DMZ egress IP, the internal server its internal egress IP.
#[test]
fn single_exit_uses_the_dmz_and_the_internal_uplink() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let env = Env::start(TopologySpec::node_agent(&[1], vec![mode]), &bin, |topo| {
        let mut rules = vec![PolicyRule::via(Ipv4Net::default(), "exit")];
        if topo.spec().ipv6 {
            rules.push(PolicyRule::via(Ipv6Net::default(), "exit"));
        }
        let mut inv = Inventory::new();
        inv.policy(Policy::new("single-exit", rules))
            .namespace_with_policy("app", "single-exit")
            .client_pod("app", "client", topo.pod(1, 1))
            .gateway_pod(1, "exit", topo.spec().ipv6);
        inv
    });
    let topo = &env.topo;
    let pod = topo.pod(1, 1);
    let gw = topo.gateway(1);
    let red = traffic::tcp_echo_server(&topo.red().ns, SocketAddr::from((RED_SERVER, 7000)))
        .or_diag(&env, "red server");
    let internal = traffic::tcp_echo_server(
        &topo.internal().ns,
        SocketAddr::from((INTERNAL_SERVER, 7000)),
    )
    .or_diag(&env, "internal server");
    assert_eq!(env.tcp_source(pod, &red), IpAddr::V4(gw.dmz_egress));
    assert_eq!(
        env.tcp_source(pod, &internal),
        IpAddr::V4(gw.internal_egress),
        "10.50.0.20 must see the internal egress IP (10.50.0.10)"
    );
    if let (Some(dmz6), Some(int6)) = (gw.dmz_egress6, gw.internal_egress6) {
        let red6 = traffic::tcp_echo_server(&topo.red().ns, SocketAddr::from((RED_SERVER6, 7000)))
            .or_diag(&env, "red server (IPv6)");
        let int6_srv = traffic::tcp_echo_server(
            &topo.internal().ns,
            SocketAddr::from((INTERNAL_SERVER6, 7000)),
        )
        .or_diag(&env, "internal server (IPv6)");
        assert_eq!(env.tcp_source(pod, &red6), IpAddr::V6(dmz6));
        assert_eq!(env.tcp_source(pod, &int6_srv), IpAddr::V6(int6));
    }
}
