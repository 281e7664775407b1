//! Policy semantics on the node: a policy that does not exist blocks the pod's egress (fail closed) but
//! not its cluster traffic; a policy edited in the inventory file takes effect without restarting the
//! agent.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tests::agent::{GatewayRef, RouteShape};
use tests::scenario::{poll, UdpProbe};
use tests::topology::RED_SERVER;
use tests::{
    require_netns, require_node_agent, require_userspace_gateway, traffic, Inventory, Policy,
    PolicyRule, TopologySpec,
};

use crate::common::{Env, OrDiag};

/// A blocked pod's attempt must fail at least this fast (an ICMP error, not a timeout).
const FAST: Duration = Duration::from_secs(2);
/// The pods' IPv4 default gateway (Calico's; answered by the node's proxy ARP).
const CALICO_GATEWAY: &str = "169.254.1.1";

/// Scenario 5: the pod's namespace names `does-not-exist`. Its traffic to the red server fails at once
/// (the node's route for it is `unreachable`: TCP and UDP get an error well before any timeout, and the
/// server sees nothing), while its traffic to another pod and to the node still works (cluster CIDRs are
/// never steered). The pod has sent nothing before the agent programmed it (as a pod that starts after its
/// table was written), so it must still be able to resolve its default gateway 169.254.1.1.
#[test]
fn a_missing_policy_blocks_egress_but_not_the_cluster() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let env = Env::start(TopologySpec::node_agent(&[2], vec![mode]), &bin, |topo| {
        let mut inv = Inventory::new();
        inv.policy(Policy::new(
            "exists",
            vec![PolicyRule::via(Ipv4Net::default(), "red")],
        ))
        .namespace_with_policy("locked", "does-not-exist")
        .namespace("plain")
        .client_pod("locked", "blocked", topo.pod(1, 1))
        .client_pod("plain", "peer", topo.pod(1, 2))
        .gateway_pod(1, "red", topo.spec().ipv6);
        inv
    });
    let topo = &env.topo;
    let (pod, peer) = (topo.pod(1, 1), topo.pod(1, 2));
    let node = topo.node(1);
    let table = env.table_of(pod);
    env.wait_route(
        table,
        Ipv4Net::default(),
        &RouteShape::Unreachable,
        Duration::from_secs(5),
    );

    // Everything below is checked and reported together: one root cause often breaks several.
    let mut problems: Vec<String> = Vec::new();

    // The kernel's own verdict for the pod's packet arriving on its cali device.
    let route_get = |dst: &str| {
        node.ns
            .ip(&format!("route get {dst} from {} iif {}", pod.ip, pod.cali))
            .unwrap_or_else(|e| e.to_string())
    };
    let is_unreachable = |v: &str| {
        let v = v.to_lowercase();
        v.contains("unreachable") || v.contains("no route to host")
    };
    let verdict = route_get(&RED_SERVER.to_string());
    if !is_unreachable(&verdict) {
        problems.push(format!(
            "`ip route get {RED_SERVER} from {} iif {}` must say unreachable: {verdict}",
            pod.ip, pod.cali
        ));
    }
    // The pod's default gateway (169.254.1.1) is answered by the node's proxy ARP only if the node routes
    // the pod's packets to it somewhere other than back out of cali (unicast, another device): a pod whose
    // table sends 169.254.1.1 to `unreachable` cannot resolve its gateway, and then nothing it sends leaves
    // the pod — cluster traffic included — and every attempt ends in an ARP timeout (3 s), not an ICMP error.
    let gateway_verdict = route_get(CALICO_GATEWAY);
    if is_unreachable(&gateway_verdict) {
        problems.push(format!(
            "`ip route get {CALICO_GATEWAY} from {} iif {}` is unreachable ({}): the node's proxy ARP will not \
             answer the pod for its default gateway (a `throw` for 169.254.1.1 — or the link-local range — in the \
             pod's table would keep it answering)",
            pod.ip,
            pod.cali,
            gateway_verdict.trim()
        ));
    }

    let red = SocketAddr::from((RED_SERVER, 7000));
    let tcp = traffic::tcp_echo_server(&topo.red().ns, red).or_diag(&env, "red TCP server");
    let udp = traffic::udp_echo_server(&topo.red().ns, red).or_diag(&env, "red UDP server");
    let (r, took) =
        traffic::connect_once(&pod.ns, red, Duration::from_secs(5)).or_diag(&env, "connect");
    match &r {
        Err(e) if took < FAST => eprintln!("blocked TCP connect failed after {took:?}: {e}"),
        other => problems.push(format!(
            "a blocked pod's TCP connect must fail within {FAST:?}: {other:?} after {took:?}"
        )),
    }
    let (r, took) =
        traffic::udp_once(&pod.ns, red, b"blocked?", Duration::from_secs(4)).or_diag(&env, "udp");
    match &r {
        Err(e) if took < FAST => eprintln!("blocked UDP exchange failed after {took:?}: {e}"),
        other => problems.push(format!(
            "a blocked pod's UDP must get an error within {FAST:?}, not an answer or a timeout: {other:?} after {took:?}"
        )),
    }
    if !tcp.peers().is_empty() || !udp.peers().is_empty() {
        problems.push(format!(
            "the red server heard from the blocked pod: TCP {:?}, UDP {:?}",
            tcp.peers(),
            udp.peers()
        ));
    }

    // Cluster traffic: another pod on the node, and the node itself.
    let to_peer = SocketAddr::from((peer.ip, 7000));
    let _peer_srv = traffic::tcp_echo_server(&peer.ns, to_peer).or_diag(&env, "peer server");
    let to_node = SocketAddr::from((node.ip, 7000));
    let _node_srv = traffic::tcp_echo_server(&node.ns, to_node).or_diag(&env, "node server");
    for (what, addr) in [("another pod", to_peer), ("the node", to_node)] {
        let (r, took) =
            traffic::connect_once(&pod.ns, addr, Duration::from_secs(5)).or_diag(&env, "connect");
        if let Err(e) = r {
            problems.push(format!(
                "cluster traffic of a blocked pod must still work: connect to {what} ({addr}): {e} after {took:?}"
            ));
        }
    }
    if !problems.is_empty() {
        let neigh = pod.ns.ip("neigh show").unwrap_or_else(|e| e.to_string());
        env.fail(format!(
            "{} problem(s):\n* {}\n---- the pod's neighbours:\n{neigh}",
            problems.len(),
            problems.join("\n* ")
        ));
    }
}

/// Scenario 6: a UDP probe stream flows through gateway 1 (red); the inventory file is rewritten so that
/// the rule selects gateway 2 (blue). Within 3 s the server sees gateway 2's egress IP, and the agent is the
/// same process (no restart).
#[test]
fn a_live_policy_edit_moves_traffic_without_a_restart() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let mut env = Env::everything_via(&mode, &bin, &["red", "blue"], "red", "live", &["client"], 0);
    let (egress1, egress2) = (
        IpAddr::V4(env.topo.gateway(1).dmz_egress),
        IpAddr::V4(env.topo.gateway(2).dmz_egress),
    );
    let addr = SocketAddr::from((RED_SERVER, 7100));
    let server = traffic::udp_echo_server(&env.topo.red().ns, addr).or_diag(&env, "server");
    let probe = UdpProbe::start(&env.topo.pod(1, 1).ns, addr, Duration::from_millis(10))
        .or_diag(&env, "probe");
    probe
        .wait_answer_after(Instant::now(), Duration::from_secs(5))
        .or_diag(&env, "the probe before the edit");
    assert_eq!(server.last_peer().map(|p| p.ip()), Some(egress1));
    let pid = env.agent.pid();

    let mut inv = env.inventory.clone();
    inv.policy_mut("live").or_diag(&env, "policy").rules[0].gateway =
        Some(GatewayRef::code("blue"));
    let edited = Instant::now();
    env.set_inventory(inv);
    let moved = poll(
        Duration::from_secs(3),
        Duration::from_millis(10),
        "",
        || (server.last_peer().map(|p| p.ip()) == Some(egress2)).then(Instant::now),
    );
    let Ok(moved) = moved else {
        env.fail(format!(
            "3 s after the edit the server still sees the probe from {:?}, not gateway 2's {egress2}",
            server.last_peer()
        ));
    };
    eprintln!(
        "policy edit: traffic moved to gateway 2 after {} ms",
        moved.duration_since(edited).as_millis()
    );
    assert_eq!(env.agent.pid(), pid, "the agent must not be restarted");
    let m = tests::Metrics::parse(&env.agent.metrics_text().or_diag(&env, "agent /metrics"));
    assert!(
        m.get("egress_node_input_reloads_total", &[("result", "ok")]) >= Some(1.0),
        "the edit must count as a reload"
    );
    assert!(env.agent.is_running(), "the agent exited");
    probe
        .wait_answer_after(Instant::now(), Duration::from_secs(2))
        .or_diag(&env, "the probe after the edit");
    probe.stop().or_diag(&env, "probe thread");
}
