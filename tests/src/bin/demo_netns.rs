//! README command 1 in network namespaces (binary `demo-netns`): builds the seed scenario — two bare client
//! nodes programmed by the real node agent (`egress-gateway node`) from the seed's EgressGatewayPolicy
//! `red-blue`, two gateway pods (red and blue) running the real `egress-gateway run`, a DMZ router with two
//! outside servers, an internal network and an on-premises ("local") host reached without a gateway — then
//! sends ping, TCP and UDP from every pod to every server, and some hostile input, and prints what each server
//! saw and which gateway and uplink carried it, and the gateways' counters. Everything is removed at the end
//! (also on Ctrl-C).
//!
//! `cargo run -p tests --release --bin demo-netns` (as root, after `cargo build --release -p gateway`).
//! Exit status: 0 when every check passed, 1 when one failed, 2 without root or without the gateway binary,
//! 130 when interrupted.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tests::agent::{AgentConfig, NodeAgent};
use tests::demo::{self, interrupted, Path, Proto, UDP_PORT};
use tests::raw::{self, InnerUdp};
use tests::scenario::{self, drops, packets, value};
use tests::topology::{
    tunnel_mac, Topology, BLUE_NET, INTERNAL_NET, LOCAL_NET, NODE_VXLAN_DEV, RED_NET, VNI,
    VXLAN_PORT,
};
use tests::{GatewayMode, Inventory, Metrics, Policy, PolicyRule, TopologySpec};

/// Hostile input: each must be dropped and counted under its reason.
fn hostile(topo: &Topology) -> tests::Result<Vec<(String, &'static str, bool)>> {
    let gw = topo.gateway(1);
    let node = topo.node(1);
    let pod = topo.pod(1, 1);
    let red = SocketAddr::from((topo.red().ip, UDP_PORT));
    let tunnel = SocketAddr::from((gw.ip, VXLAN_PORT));
    // The agent made the node's vxlan device: its MAC is the inner source a node's frames carry.
    let node_mac = node.ns.mac(NODE_VXLAN_DEV)?;
    let datagram = |vni: u32, src: Ipv4Addr| -> tests::Result<Vec<u8>> {
        raw::vxlan_udp(
            vni,
            &InnerUdp {
                src_mac: raw::parse_mac(&node_mac)?,
                dst_mac: raw::parse_mac(&tunnel_mac(gw.ip))?,
                src: SocketAddr::from((src, 40001)),
                dst: red,
                ttl: 64,
                payload: b"hostile".to_vec(),
            },
        )
    };
    let rogue_ip = Ipv4Addr::new(172, 19, 0, 66);
    let rogue_net =
        ipnet::Ipv4Net::new(rogue_ip, 16).map_err(|e| tests::Error::msg(e.to_string()))?;
    let rogue = scenario::underlay_host(topo, "rogue", rogue_net, 1)?;
    let from_node = SocketAddr::from((node.ip, 0));
    let spoofed = Ipv4Addr::new(10, 99, 0, 7);
    let egress = gw.dmz_egress;
    let mut out = Vec::new();
    let cases: Vec<(String, &'static str)> = vec![
        (
            format!("VXLAN from {rogue_ip}, an underlay host outside allowed_sources"),
            "vxlan_source_not_allowed",
        ),
        (
            format!("VXLAN from node 1 with VNI {}", VNI + 1),
            "vxlan_wrong_vni",
        ),
        (
            format!("VXLAN from node 1, inner source {spoofed} outside the pod CIDRs"),
            "inner_source_not_allowed",
        ),
        (
            format!("unsolicited UDP from the red server to {egress}:53"),
            "no_flow",
        ),
    ];
    for (i, (what, reason)) in cases.into_iter().enumerate() {
        let before = drops(&gw.metrics()?).get(reason).copied().unwrap_or(0.0);
        match i {
            0 => raw::send_udp(
                &rogue,
                SocketAddr::from((rogue_ip, 0)),
                tunnel,
                &[datagram(VNI, pod.ip)?],
            )?,
            1 => raw::send_udp(&node.ns, from_node, tunnel, &[datagram(VNI + 1, pod.ip)?])?,
            2 => raw::send_udp(&node.ns, from_node, tunnel, &[datagram(VNI, spoofed)?])?,
            _ => raw::send_udp(
                &topo.red().ns,
                SocketAddr::from((topo.red().ip, 0)),
                SocketAddr::from((egress, 53)),
                &[b"unsolicited".to_vec()],
            )?,
        }
        let counted = scenario::poll(
            Duration::from_secs(5),
            Duration::from_millis(50),
            reason,
            || {
                let now = drops(&gw.metrics().ok()?)
                    .get(reason)
                    .copied()
                    .unwrap_or(0.0);
                (now > before).then_some(())
            },
        )
        .is_ok();
        out.push((what, reason, counted));
    }
    Ok(out)
}

fn print_counters(name: &str, m: &Metrics) {
    println!("\n{name} counters (GET /metrics):");
    println!(
        "  packets: tunnel_rx {}  tunnel_tx {}  |  uplink dmz: tx {} rx {}  |  uplink internal: tx {} rx {}",
        packets(m, "tunnel_rx", None),
        packets(m, "tunnel_tx", None),
        packets(m, "uplink_tx", Some("dmz")),
        packets(m, "uplink_rx", Some("dmz")),
        packets(m, "uplink_tx", Some("internal")),
        packets(m, "uplink_rx", Some("internal")),
    );
    println!(
        "  flows created {}   conntrack entries {}   ICMP errors originated {}",
        value(m, "egress_gateway_flows_created_total", &[]),
        value(m, "egress_gateway_conntrack_entries", &[]),
        value(m, "egress_gateway_icmp_errors_originated_total", &[]),
    );
    let d = drops(m);
    if d.is_empty() {
        println!("  drops: none");
    } else {
        println!("  drops by reason (non-zero):");
        let background = d.contains_key("unsupported_protocol");
        for (reason, n) in d {
            println!("    {reason:<28} {n}");
        }
        if background {
            println!(
                "  (unsupported_protocol may count a few IGMP reports that the uplinks' neighbours send when \
                 their links come up)"
            );
        }
    }
}

/// The seed's policy: 192.0.2.0/24 (a legacy firewall) through the red gateway, 198.51.100.0/24 (a partner)
/// through the blue one, the internal network through the red gateway's internal uplink, 172.16.1.0/24
/// (on-premises) without a gateway.
fn seed_policy() -> Policy {
    Policy::new(
        "red-blue",
        vec![
            PolicyRule::via(BLUE_NET, "red").described("legacy firewall: red egress IP"),
            PolicyRule::via(RED_NET, "blue").described("partner: blue egress IP"),
            PolicyRule::via(INTERNAL_NET, "red")
                .described("internal systems: red gateway, internal VLAN"),
            PolicyRule::no_gateway(LOCAL_NET).described("on-premises: no gateway"),
        ],
    )
}

fn run(mode: GatewayMode, agent_binary: &std::path::Path) -> tests::Result<bool> {
    let started = Instant::now();
    println!("egress gateway demo in network namespaces: the node agent and two real gateways (`egress-gateway node`, `egress-gateway run`)");
    let mut topo = Topology::build(TopologySpec::node_agent(&[2, 1], vec![mode.clone(), mode]))?;
    for k in 1..=2 {
        topo.gateway_mut(k).wait_ready(Duration::from_secs(30))?;
    }
    let mut inv = Inventory::new();
    inv.policy(seed_policy())
        .namespace_with_policy("app", "red-blue")
        .namespace("other")
        .client_pod("app", "web", topo.pod(1, 1))
        .client_pod("other", "batch", topo.pod(1, 2))
        .client_pod("app", "api", topo.pod(2, 1))
        .gateway_pod(1, "red", topo.spec().ipv6)
        .gateway_pod(2, "blue", topo.spec().ipv6);
    let inventory = topo.dir().join("cluster.yaml");
    inv.write(&inventory)?;
    let mut agents = Vec::new();
    for n in 1..=2 {
        let mut agent = NodeAgent::start(
            &topo,
            agent_binary,
            n,
            AgentConfig::for_node(n, vec![inventory.clone()]),
        )?;
        agent.wait_ready(Duration::from_secs(30))?;
        agents.push(agent);
    }
    println!(
        "built {} namespaces ({}-*), started 2 gateways and 2 node agents in {:.1} s",
        topo.namespaces().len(),
        topo.prefix(),
        started.elapsed().as_secs_f64()
    );
    demo::print_gateways(&topo);
    println!("EgressGatewayPolicy red-blue (namespace `app` opted in; namespace `other` not):");
    for r in &seed_policy().rules {
        let dst = r.destination.map_or("0.0.0.0/0".into(), |d| d.to_string());
        let via = r
            .gateway
            .as_ref()
            .map_or("no gateway (node routing)".into(), |g| {
                format!("gateway selector {}", g.selector)
            });
        println!(
            "  {dst:<18} {via:<40} {}",
            r.description.as_deref().unwrap_or("")
        );
    }
    println!("pods: n1p1 app/web 10.244.1.1 and n1p2 other/batch 10.244.1.2 on node 1 (172.18.0.11); n2p1 app/api 10.244.2.1 on node 2 (172.18.0.12)");
    let node1_table = topo.node(1).ns.ip("route show table 200")?;
    println!("what the agent programmed on node 1 for app/web (ip rule: from 10.244.1.1 lookup 200; ip route show table 200):");
    for line in node1_table.lines() {
        println!("  {line}");
    }
    println!();

    let servers = demo::start_servers(&topo)?;
    let path = |pod: &tests::Pod, server: &str| -> Option<Path> {
        let opted_in = !(pod.node == 1 && pod.number == 2);
        match (opted_in, server) {
            (true, "legacy-fw") => Some(Path::Dmz(1)),
            (true, "partner") => Some(Path::Dmz(2)),
            (true, "internal") => Some(Path::Internal(1)),
            (_, "on-prem") => Some(Path::Node),
            // Not opted in: the node routes it (masqueraded); the internal VLAN is only behind the gateways.
            (false, "internal") => None,
            (false, _) => Some(Path::Node),
            _ => None,
        }
    };
    let rows = demo::probe_all(&topo, &servers, &Proto::ALL, path);
    let mut ok = rows.iter().all(|r| r.problems.is_empty());

    if !interrupted() {
        println!("\nhostile input to gw1 (each must be dropped and counted):");
        for (what, reason, counted) in hostile(&topo)? {
            println!(
                "  {what:<72} {}",
                if counted {
                    format!("dropped ({reason})")
                } else {
                    ok = false;
                    format!("FAILED: not counted as {reason}")
                }
            );
        }
    }
    for k in 1..=2 {
        let m = scenario::settled_metrics(topo.gateway(k), Duration::from_secs(3))?;
        print_counters(&format!("gw{k}"), &m);
    }

    if interrupted() {
        println!("\ninterrupted: removing the topology");
        return Ok(false);
    }
    let checks = rows.len();
    if ok {
        println!("\nall {checks} probes and the hostile-input checks passed");
    } else {
        let failed = rows.iter().filter(|r| !r.problems.is_empty()).count();
        println!("\n{failed} of {checks} probes (or a hostile-input check) FAILED; log tails:");
        for k in 1..=2 {
            if let Some(p) = topo.gateway(k).process() {
                println!("--- gw{k}\n{}", p.log_tail(20));
            }
        }
        for a in &agents {
            println!("--- node agent\n{}", a.log_tail(20));
        }
    }
    drop(agents);
    drop(servers);
    let names = topo.namespaces().len();
    drop(topo);
    println!("removed the {names} namespaces, the gateways and the node agents");
    Ok(ok)
}

fn main() -> ExitCode {
    let usage = "usage: demo-netns (as root; no arguments)\n\nBuilds the seed scenario in network namespaces \
                 with the real node agent and two real gateways (build them first: cargo build --release -p \
                 gateway), sends ping, TCP and UDP from every pod to every server and some hostile input, \
                 prints what each server saw and through which gateway and uplink, and the gateways' \
                 counters, and removes everything. Exit status 0 when every \
                 check passed, 1 when one failed, 2 without root or the gateway binary, 130 on Ctrl-C.";
    let binary = match demo::prepare("demo-netns", usage) {
        ControlFlow::Continue(binary) => binary,
        ControlFlow::Break(status) => return status,
    };
    let agent = binary.clone();
    demo::exit_status("demo-netns", run(GatewayMode::Userspace { binary }, &agent))
}
