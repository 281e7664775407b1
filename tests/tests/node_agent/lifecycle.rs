//! The agent's footprint: SIGTERM leaves routing in place; `--cleanup` removes every rule, route and the
//! device it made, and nothing else (a route and a rule made by hand in its priority and table range, with
//! another protocol, survive).

use std::net::IpAddr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tests::agent::{self, AGENT_PROTO};
use tests::topology::{NODE_VXLAN_DEV, POD_RULE_PRIORITY};
use tests::{
    require_netns, require_node_agent, require_userspace_gateway, Inventory, Netns, Policy,
    PolicyRule, TopologySpec,
};

use crate::common::{Env, OrDiag};

/// A table in the agent's range that it does not hand out first (it starts at 200).
const HAND_TABLE: u32 = 1199;
/// The hand-made rule's source.
const HAND_SOURCE: &str = "10.244.9.9";

/// Lines of `ip rule show` (both families) at the agent's priority.
fn rules_at_priority(ns: &Netns) -> Vec<String> {
    let prefix = format!("{POD_RULE_PRIORITY}:");
    ["-4", "-6"]
        .iter()
        .flat_map(|f| {
            ns.ip(&format!("{f} rule show"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with(&prefix))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Routes with the agent's protocol in any table (both families).
fn agent_routes(ns: &Netns) -> String {
    ["-4", "-6"]
        .iter()
        .map(|f| {
            ns.ip(&format!("{f} route show table all proto {AGENT_PROTO}"))
                .unwrap_or_else(|e| e.to_string())
        })
        .collect()
}

/// Scenario 7: with a route and a rule made by hand in the agent's range beforehand, the agent programs the
/// node; SIGTERM leaves it all in place; `--cleanup` leaves no rule at priority 100 but the hand-made one, no
/// route with protocol 242, no `egress.calico` — and the hand-made route and rule.
#[test]
fn cleanup_removes_what_the_agent_made_and_nothing_else() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let hand_route = format!("unreachable 192.0.2.0/24 table {HAND_TABLE} proto static");
    let hand_rule = format!("from {HAND_SOURCE} lookup {HAND_TABLE} priority {POD_RULE_PRIORITY}");
    let mut env = Env::start_with(
        TopologySpec::node_agent(&[1], vec![mode]),
        &bin,
        |topo| {
            let mut rules = vec![PolicyRule::via(Ipv4Net::default(), "red")];
            if topo.spec().ipv6 {
                rules.push(PolicyRule::via(Ipv6Net::default(), "red"));
            }
            let mut inv = Inventory::new();
            inv.policy(Policy::new("all", rules))
                .namespace_with_policy("app", "all")
                .client_pod("app", "client", topo.pod(1, 1))
                .gateway_pod(1, "red", topo.spec().ipv6);
            inv
        },
        |topo| {
            let ns = &topo.node(1).ns;
            ns.ip(&format!("route add {hand_route}"))
                .expect("hand-made route");
            ns.ip(&format!("rule add {hand_rule} protocol static"))
                .expect("hand-made rule");
        },
    );
    let node = &env.topo.node(1).ns;
    let pod = env.topo.pod(1, 1);

    // What the agent made.
    let table = env.table_of(pod);
    if let Some(ip6) = pod.ip6 {
        let t6 =
            agent::rule_table(node, IpAddr::V6(ip6), POD_RULE_PRIORITY).or_diag(&env, "ip -6 rule");
        assert_eq!(t6, Some(table), "the pod's IPv6 rule must use its table");
    }
    assert!(node.ip(&format!("link show dev {NODE_VXLAN_DEV}")).is_ok());
    assert!(!agent_routes(node).trim().is_empty());

    // SIGTERM: routing stays.
    let status = env.agent.stop();
    eprintln!("agent after SIGTERM: {status:?}");
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent must exit 0 on SIGTERM: {status:?}\n{}",
        env.diag()
    );
    assert_eq!(
        agent::rule_table(node, IpAddr::V4(pod.ip), POD_RULE_PRIORITY).or_diag(&env, "ip rule"),
        Some(table),
        "SIGTERM must leave the pod's rule in place"
    );
    assert!(node.ip(&format!("link show dev {NODE_VXLAN_DEV}")).is_ok());
    assert!(!agent_routes(node).trim().is_empty());

    // --cleanup.
    let out = env.agent.cleanup().or_diag(&env, "--cleanup");
    eprintln!("--cleanup: {}", out.trim());
    let left = rules_at_priority(node);
    let foreign: Vec<&String> = left.iter().filter(|l| !l.contains(HAND_SOURCE)).collect();
    if !foreign.is_empty() {
        env.fail(format!(
            "rules at priority {POD_RULE_PRIORITY} after --cleanup: {foreign:?}"
        ));
    }
    if !left.iter().any(|l| l.contains(HAND_SOURCE)) {
        env.fail(format!(
            "--cleanup removed the hand-made rule `{hand_rule}`"
        ));
    }
    let routes = agent_routes(node);
    if !routes.trim().is_empty() {
        env.fail(format!(
            "routes with proto {AGENT_PROTO} after --cleanup:\n{routes}"
        ));
    }
    if node.ip(&format!("link show dev {NODE_VXLAN_DEV}")).is_ok() {
        env.fail(format!("{NODE_VXLAN_DEV} still exists after --cleanup"));
    }
    let hand = node
        .ip(&format!("route show table {HAND_TABLE}"))
        .or_diag(&env, "hand table");
    assert!(
        hand.contains("unreachable 192.0.2.0/24"),
        "--cleanup removed the hand-made route: {hand:?}"
    );
    // Give a late writer no chance: the state is the same a moment later.
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent_routes(node).trim().is_empty());
}
