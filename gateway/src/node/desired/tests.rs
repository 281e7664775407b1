//! The planner over a small cluster written as Kubernetes YAML.

use std::path::Path;

use super::*;
use crate::inventory;
use crate::node::state::Mac;

const CLUSTER: &str = r#"
apiVersion: projectcalico.org/v3
kind: EgressGatewayPolicy
metadata: { name: red-blue }
spec:
  rules:
  - destination: { cidr: 192.0.2.0/24 }
    gateway: { selector: "egress-code == 'red'", namespaceSelector: "projectcalico.org/name == 'egress'" }
  - destination: { cidr: 198.51.100.0/24 }
    gateway: { selector: "egress-code == 'blue'", namespaceSelector: "projectcalico.org/name == 'egress'" }
  - destination: { cidr: 172.16.1.0/24 }
  - destination: { cidr: 10.244.9.0/24 }
    gateway: { selector: "egress-code == 'red'", namespaceSelector: "projectcalico.org/name == 'egress'" }
---
apiVersion: v1
kind: List
items:
- { apiVersion: v1, kind: Namespace, metadata: { name: app, annotations: { egress.projectcalico.org/egressGatewayPolicy: red-blue } } }
- { apiVersion: v1, kind: Namespace, metadata: { name: egress } }
- { apiVersion: v1, kind: Namespace, metadata: { name: other } }
- { apiVersion: v1, kind: Namespace, metadata: { name: lost, annotations: { egress.projectcalico.org/egressGatewayPolicy: nope } } }
- apiVersion: v1
  kind: Pod
  metadata: { name: client, namespace: app }
  spec: { nodeName: node-a }
  status: { hostIP: 172.18.0.11, podIP: 10.244.1.5, podIPs: [ { ip: 10.244.1.5 }, { ip: "fd00:244:1::5" } ] }
- apiVersion: v1
  kind: Pod
  metadata: { name: client2, namespace: app }
  spec: { nodeName: node-a }
  status: { hostIP: 172.18.0.11, podIP: 10.244.1.7, podIPs: [ { ip: 10.244.1.7 } ] }
- apiVersion: v1
  kind: Pod
  metadata: { name: elsewhere, namespace: app }
  spec: { nodeName: node-b }
  status: { hostIP: 172.18.0.12, podIP: 10.244.2.5 }
- apiVersion: v1
  kind: Pod
  metadata: { name: plain, namespace: other }
  spec: { nodeName: node-a }
  status: { hostIP: 172.18.0.11, podIP: 10.244.1.6 }
- apiVersion: v1
  kind: Pod
  metadata: { name: blocked, namespace: lost }
  spec: { nodeName: node-a }
  status: { hostIP: 172.18.0.11, podIP: 10.244.1.8 }
- apiVersion: v1
  kind: Pod
  metadata: { name: red-0, namespace: egress, labels: { egress-code: red } }
  spec: { nodeName: node-g }
  status: { podIP: 172.18.0.3, podIPs: [ { ip: 172.18.0.3 }, { ip: "fd00:18::3" } ] }
- apiVersion: v1
  kind: Pod
  metadata: { name: red-1, namespace: egress, labels: { egress-code: red } }
  spec: { nodeName: node-g }
  status: { podIP: 172.18.0.5, podIPs: [ { ip: 172.18.0.5 }, { ip: "fd00:18::5" } ] }
- apiVersion: v1
  kind: Pod
  metadata: { name: blue-0, namespace: egress, labels: { egress-code: blue } }
  spec: { nodeName: node-g }
  status: { podIP: 172.18.0.4 }
"#;

const RED0: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const RED1: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 5);
const BLUE0: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 4);

fn inventory_of(text: &str) -> Inventory {
    let file = inventory::parse(text, Path::new("cluster.yaml")).unwrap();
    inventory::merge(&[file])
}

fn cluster_cidrs() -> Vec<IpNet> {
    ["10.244.0.0/16", "172.18.0.0/16", "fd00:244::/32"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn settings(cidrs: &[IpNet]) -> Settings<'_> {
    Settings {
        node: "node-a",
        rule_priority: 100,
        tables: 200..=1200,
        cluster_cidrs: cidrs,
    }
}

fn all_healthy(_: Ipv4Addr) -> Health {
    Health::Healthy
}

fn route(plan: &Plan, table: u32, dst: &str) -> Option<RouteKind> {
    plan.desired
        .routes
        .get(&(table, dst.parse().unwrap()))
        .cloned()
}

fn via(ips: &[Ipv4Addr]) -> RouteKind {
    RouteKind::Via(ips.iter().map(|ip| IpAddr::V4(*ip)).collect())
}

#[test]
fn tables_rules_and_routes_for_this_nodes_opted_in_pods() {
    let inv = inventory_of(CLUSTER);
    let cidrs = cluster_cidrs();
    let plan = plan(&inv, &settings(&cidrs), &all_healthy, &Memory::default());

    // app/client, app/client2 and lost/blocked are opted in on node-a; other/plain is not, app/elsewhere
    // is on another node. Tables in name order from the first.
    let tables: Vec<(String, u32)> = plan
        .memory
        .tables
        .iter()
        .map(|((ns, name), t)| (format!("{ns}/{name}"), *t))
        .collect();
    assert_eq!(
        tables,
        vec![
            ("app/client".to_string(), 200),
            ("app/client2".to_string(), 201),
            ("lost/blocked".to_string(), 202)
        ]
    );
    assert_eq!(plan.pods, 3);
    let rules: Vec<String> = plan
        .desired
        .rules
        .iter()
        .map(|r| format!("{} {} {}", r.src, r.table, r.priority))
        .collect();
    assert_eq!(
        rules,
        vec![
            "10.244.1.5 200 100",
            "10.244.1.7 201 100",
            "10.244.1.8 202 100",
            "fd00:244:1::5 200 100"
        ]
    );

    assert_eq!(route(&plan, 200, "192.0.2.0/24"), Some(via(&[RED0, RED1])));
    assert_eq!(route(&plan, 200, "198.51.100.0/24"), Some(via(&[BLUE0])));
    assert_eq!(route(&plan, 200, "172.16.1.0/24"), Some(RouteKind::Throw));
    // Cluster CIDRs are thrown in every table; a rule inside one is skipped and reported.
    for net in ["10.244.0.0/16", "172.18.0.0/16", "fd00:244::/32"] {
        assert_eq!(route(&plan, 200, net), Some(RouteKind::Throw), "{net}");
    }
    assert_eq!(route(&plan, 200, "10.244.9.0/24"), None);
    assert!(
        plan.problems
            .iter()
            .any(|p| p.contains("10.244.9.0/24 lies inside cluster CIDR 10.244.0.0/16")),
        "{:?}",
        plan.problems
    );
    // A missing policy blocks everything but the cluster.
    assert_eq!(route(&plan, 202, "0.0.0.0/0"), Some(RouteKind::Unreachable));
    assert_eq!(route(&plan, 202, "::/0"), Some(RouteKind::Unreachable));
    assert_eq!(route(&plan, 202, "10.244.0.0/16"), Some(RouteKind::Throw));

    // Probed: every gateway a pod may use; each has neighbours (IPv4 and link-local) and an FDB entry.
    assert_eq!(plan.gateways, BTreeSet::from([RED0, BLUE0, RED1]));
    let mac: Mac = [0xa2, 0x2a, 172, 18, 0, 3];
    assert_eq!(plan.desired.neighbours.get(&IpAddr::V4(RED0)), Some(&mac));
    assert_eq!(
        plan.desired
            .neighbours
            .get(&IpAddr::V6("fe80::a02a:acff:fe12:3".parse().unwrap())),
        Some(&mac)
    );
    assert_eq!(plan.desired.fdb.get(&mac), Some(&RED0));
    assert_eq!(plan.desired.neighbours.len(), 6);
}

#[test]
fn ipv6_routes_use_link_locals_of_dual_stack_gateways() {
    let text = CLUSTER.replace(
        "  - destination: { cidr: 172.16.1.0/24 }",
        "  - destination: { cidr: \"2001:db8:100::/64\" }\n    gateway: { selector: \"egress-code == 'red'\", namespaceSelector: \"projectcalico.org/name == 'egress'\" }\n  - destination: { cidr: \"2001:db8:2::/64\" }\n    gateway: { selector: \"egress-code == 'blue'\", namespaceSelector: \"projectcalico.org/name == 'egress'\" }",
    );
    let inv = inventory_of(&text);
    let cidrs = cluster_cidrs();
    let plan = plan(&inv, &settings(&cidrs), &all_healthy, &Memory::default());
    let ll = |ip: Ipv4Addr| IpAddr::V6(link_local(tunnel_mac(ip)));
    assert_eq!(
        route(&plan, 200, "2001:db8:100::/64"),
        Some(RouteKind::Via(vec![ll(RED0), ll(RED1)]))
    );
    // blue-0 has no IPv6 address: it cannot carry IPv6 (fail closed).
    assert_eq!(
        route(&plan, 200, "2001:db8:2::/64"),
        Some(RouteKind::Unreachable)
    );
}

#[test]
fn health_failover_fail_closed_and_draining() {
    let inv = inventory_of(CLUSTER);
    let cidrs = cluster_cidrs();
    let s = settings(&cidrs);
    let first = plan(&inv, &s, &all_healthy, &Memory::default());

    // red-0 dies: it leaves the multipath set, the others stay.
    let down = |ip: Ipv4Addr| {
        if ip == RED0 {
            Health::Down
        } else {
            Health::Healthy
        }
    };
    let p = plan(&inv, &s, &down, &first.memory);
    assert_eq!(route(&p, 200, "192.0.2.0/24"), Some(via(&[RED1])));
    assert_eq!(route(&p, 200, "198.51.100.0/24"), Some(via(&[BLUE0])));
    // Its neighbours stay (so that it can come back without a gap), and it is still probed.
    assert!(p.gateways.contains(&RED0));
    assert!(p.desired.neighbours.contains_key(&IpAddr::V4(RED0)));

    // Both reds down: unreachable, not normal routing.
    let reds_down = |ip: Ipv4Addr| {
        if ip == BLUE0 {
            Health::Healthy
        } else {
            Health::Down
        }
    };
    let p = plan(&inv, &s, &reds_down, &p.memory);
    assert_eq!(route(&p, 200, "192.0.2.0/24"), Some(RouteKind::Unreachable));
    // Unknown (not probed yet) counts as not healthy.
    let p = plan(&inv, &s, &|_| Health::Unknown, &Memory::default());
    assert_eq!(route(&p, 200, "192.0.2.0/24"), Some(RouteKind::Unreachable));

    // Draining: kept where it is already used, not added where it was not.
    let draining = |ip: Ipv4Addr| {
        if ip == RED1 {
            Health::Draining
        } else {
            Health::Healthy
        }
    };
    let p = plan(&inv, &s, &draining, &first.memory);
    assert_eq!(route(&p, 200, "192.0.2.0/24"), Some(via(&[RED0, RED1])));
    let without_red0 = plan(&inv, &s, &down, &first.memory);
    let p = plan(&inv, &s, &draining, &without_red0.memory);
    // red-1 was in the set after red-0 died, so it stays while draining.
    assert_eq!(route(&p, 200, "192.0.2.0/24"), Some(via(&[RED0, RED1])));
    let red1_down = |ip: Ipv4Addr| {
        if ip == RED1 {
            Health::Down
        } else {
            Health::Healthy
        }
    };
    let without_red1 = plan(&inv, &s, &red1_down, &first.memory);
    let p = plan(&inv, &s, &draining, &without_red1.memory);
    // red-1 was not in the set: draining does not bring it in.
    assert_eq!(route(&p, 200, "192.0.2.0/24"), Some(via(&[RED0])));
}

#[test]
fn tables_are_stable_and_reused() {
    let inv = inventory_of(CLUSTER);
    let cidrs = cluster_cidrs();
    let s = settings(&cidrs);
    let first = plan(&inv, &s, &all_healthy, &Memory::default());
    // client goes away: client2 keeps 201; a new pod takes the lowest free table (200).
    let text = CLUSTER.replace(
        "metadata: { name: client, namespace: app }",
        "metadata: { name: newcomer, namespace: app }",
    );
    let inv2 = inventory_of(&text);
    let p = plan(&inv2, &s, &all_healthy, &first.memory);
    let t = |ns: &str, n: &str| {
        p.memory
            .tables
            .get(&(ns.to_string(), n.to_string()))
            .copied()
    };
    assert_eq!(t("app", "client2"), Some(201));
    assert_eq!(t("lost", "blocked"), Some(202));
    assert_eq!(t("app", "newcomer"), Some(200));
    assert_eq!(t("app", "client"), None);

    // Reserved tables are skipped; an exhausted range is reported, not silently ignored.
    let s = Settings {
        tables: 253..=256,
        ..settings(&cidrs)
    };
    let p = plan(&inv, &s, &all_healthy, &Memory::default());
    assert_eq!(
        p.memory.tables.values().copied().collect::<Vec<_>>(),
        vec![256]
    );
    assert_eq!(
        p.problems
            .iter()
            .filter(|m| m.contains("no free route table"))
            .count(),
        2
    );
}

#[test]
fn host_network_pods_and_pods_without_address_are_left_alone() {
    let text = format!(
        "{CLUSTER}- apiVersion: v1\n  kind: Pod\n  metadata: {{ name: hostnet, namespace: app }}\n  spec: {{ nodeName: node-a }}\n  status: {{ hostIP: 172.18.0.11, podIP: 172.18.0.11 }}\n- apiVersion: v1\n  kind: Pod\n  metadata: {{ name: pending, namespace: app }}\n  spec: {{ nodeName: node-a }}\n"
    );
    let inv = inventory_of(&text);
    let cidrs = cluster_cidrs();
    let p = plan(&inv, &settings(&cidrs), &all_healthy, &Memory::default());
    assert_eq!(p.pods, 3);
    assert!(!p
        .memory
        .tables
        .contains_key(&("app".to_string(), "hostnet".to_string())));
}

#[test]
fn the_same_inputs_give_the_same_plan() {
    let inv = inventory_of(CLUSTER);
    let cidrs = cluster_cidrs();
    let s = settings(&cidrs);
    let a = plan(&inv, &s, &all_healthy, &Memory::default());
    let b = plan(&inv, &s, &all_healthy, &a.memory);
    assert_eq!(a.desired, b.desired);
    assert_eq!(a.memory, b.memory);
}
