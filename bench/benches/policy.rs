//! Policy resolution at the size of `scripts/agent-scale.sh`: the egress tables of every pod on one node, as
//! the node agent's plan (`gateway/src/node/desired.rs`) asks for them.
//!
//! The inventory is the one the agent holds in that script: 1,000 namespaces `nsI` (labels `team=tI%10`,
//! annotation `egressGatewayPolicy: pol(I % 10)`), namespaces `egress` and `egscale-latency` (pol0), 10
//! policies `polP` (a `10.0.0.0/8` rule without gateway, and a rule for every destination selecting
//! `egress-code == 'cP'` in `projectcalico.org/name == 'egress'`), 20 gateway pods `gw-K` labelled
//! `egress-code=c(K % 10)` on their own nodes, 40 pods `own-I` on node-a in `ns(I % 1000)`, and 0 or 1,000 pods
//! of `egscale-latency` on node-a — the node holds 40, or 1,040 pods (the script's latency phase).
//!
//! Run: `cargo bench -p bench --bench policy -- --warm-up-time 1 --measurement-time 5`

use core::net::{IpAddr, Ipv4Addr};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use forwarder_core::policy::{
    EgressGatewayPolicy, GatewaySpec, Inventory, Labels, Namespace, Pod, Preference, Rule, Selector,
};

const NAMESPACES: usize = 1_000;
const POLICIES: usize = 10;
const GATEWAYS: usize = 20;
const OWN_PODS: usize = 40;
const NODE: &str = "node-a";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(namespace: &str, name: &str, labels: Labels, ip: Ipv4Addr, node: &str) -> Pod {
    Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels,
        annotations: Labels::new(),
        ip: vec![IpAddr::V4(ip)],
        node: Some(node.to_string()),
        host_ip: Some(IpAddr::V4(Ipv4Addr::new(172, 30, 0, 1))),
    }
}

/// Address `base.x.y` for the `i`-th pod (250 per /24, as the script numbers them).
fn address(a: u8, b: u8, first: u8, i: usize) -> Ipv4Addr {
    let third = u8::try_from(usize::from(first) + i / 250).expect("fewer than 250 x 250 pods");
    let fourth = u8::try_from(1 + i % 250).expect("below 251");
    Ipv4Addr::new(a, b, third, fourth)
}

/// The inventory of `scripts/agent-scale.sh` with `latency` extra pods on node-a.
fn inventory(latency: usize) -> Inventory {
    let mut inv = Inventory::new();
    let policy = |p: usize| format!("pol{p}");
    let annotated =
        |p: usize| labels(&[("egress.projectcalico.org/egressGatewayPolicy", &policy(p))]);
    for i in 0..NAMESPACES {
        inv.insert_namespace(Namespace {
            name: format!("ns{i}"),
            labels: labels(&[("team", &format!("t{}", i % 10))]),
            annotations: annotated(i % POLICIES),
        });
    }
    inv.insert_namespace(Namespace {
        name: "egress".to_string(),
        ..Namespace::default()
    });
    inv.insert_namespace(Namespace {
        name: "egscale-latency".to_string(),
        labels: Labels::new(),
        annotations: annotated(0),
    });
    for p in 0..POLICIES {
        let rules = vec![
            Rule {
                description: None,
                destination: Some("10.0.0.0/8".parse().expect("a prefix")),
                gateway: None,
                preference: Preference::None,
            },
            Rule {
                description: None,
                destination: None,
                gateway: Some(GatewaySpec {
                    selector: Selector::parse(&format!("egress-code == 'c{p}'"))
                        .expect("a selector"),
                    namespace_selector: Some(
                        Selector::parse("projectcalico.org/name == 'egress'").expect("a selector"),
                    ),
                    max_next_hops: None,
                }),
                preference: Preference::None,
            },
        ];
        inv.insert_policy(EgressGatewayPolicy::new(policy(p), rules).expect("a valid policy"));
    }
    for k in 0..GATEWAYS {
        let code = format!("c{}", k % POLICIES);
        let l = labels(&[("egress-code", &code), ("egress-gateway/gateway", "true")]);
        inv.insert_pod(pod(
            "egress",
            &format!("gw-{k}"),
            l,
            address(172, 18, 1, k),
            &format!("gw-node-{k}"),
        ));
    }
    for i in 0..OWN_PODS {
        inv.insert_pod(pod(
            &format!("ns{}", i % NAMESPACES),
            &format!("own-{i}"),
            labels(&[("app", "web")]),
            address(10, 244, 200, i),
            NODE,
        ));
    }
    for i in 0..latency {
        inv.insert_pod(pod(
            "egscale-latency",
            &format!("lat-{i}"),
            labels(&[("app", "latency")]),
            address(10, 245, 1, i),
            NODE,
        ));
    }
    inv
}

/// The pods of node-a, as the plan picks them.
fn node_pods(inv: &Inventory) -> Vec<&Pod> {
    inv.pods()
        .filter(|p| p.node.as_deref() == Some(NODE))
        .collect()
}

fn bench_tables(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_tables");
    g.sample_size(10);
    for latency in [0, 1_000] {
        let inv = inventory(latency);
        let pods = node_pods(&inv);
        let n = pods.len();
        g.throughput(Throughput::Elements(n as u64));
        // Each pod on its own (a fresh resolver per pod), as the plan did before it kept one resolver:
        // every pod's table walks every pod of the inventory.
        g.bench_with_input(BenchmarkId::new("inventory_table", n), &pods, |b, pods| {
            b.iter(|| {
                let mut entries = 0;
                for pod in pods {
                    if let Some(t) = inv.table(pod, |_, _| true) {
                        entries += t.entries.len();
                    }
                }
                black_box(entries)
            });
        });
        // One resolver for the node's pods, as `desired::plan` does (it asks for two tables per pod).
        g.bench_with_input(BenchmarkId::new("resolver_table", n), &pods, |b, pods| {
            b.iter(|| {
                let resolver = inv.resolver();
                let mut entries = 0;
                for pod in pods {
                    if let Some(t) = resolver.table(pod, |_, _| true) {
                        entries += t.entries.len();
                    }
                }
                black_box(entries)
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench_tables);
criterion_main!(benches);
