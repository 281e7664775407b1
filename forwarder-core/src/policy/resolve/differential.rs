//! Differential test of [`Resolver`] against the straightforward resolution it replaced: for every pod of
//! small random inventories, one resolver shared by all pods (as the node agent's plan uses it) must give
//! the tables and explanations that walking every pod of the inventory per client and destination gives.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;
use crate::policy::model::{namespace_selector_labels, Rule};

const NAMESPACES: [&str; 3] = ["a", "b", "egress"];
const POLICIES: [&str; 3] = ["p0", "p1", "missing"];
const SELECTORS: [&str; 6] = [
    "code == 'red'",
    "code == 'blue'",
    "has(code)",
    "",
    "code != 'red'",
    "code ==", // invalid: only reachable through an annotation
];
const NAMESPACE_SELECTORS: [&str; 4] = [
    "team == 'x'",
    "projectcalico.org/name == 'egress'",
    "!has(team)",
    "",
];
const DESTINATIONS: [Option<&str>; 5] = [
    None,
    Some("10.0.0.0/8"),
    Some("192.0.2.0/24"),
    Some("fd00::/8"),
    Some("0.0.0.0/0"),
];
const PROBES: [&str; 5] = [
    "10.1.2.3",
    "192.0.2.9",
    "198.51.100.1",
    "fd00::9",
    "2001:db8::1",
];

/// The gateway step as it was: every pod of the inventory, for every client and destination.
fn gateways_by_scan(
    inv: &Inventory,
    client: &Pod,
    dst: IpAddr,
    spec: &GatewaySpec,
    preference: Preference,
    healthy: &dyn Fn(&GatewayMember) -> bool,
) -> Decision {
    let mut members: Vec<GatewayMember> = inv
        .pods
        .values()
        .filter(|p| !(p.namespace == client.namespace && p.name == client.name))
        .filter(|p| spec.selector.matches(&p.labels))
        .filter(|p| match &spec.namespace_selector {
            Some(sel) => {
                let labels = inv.namespaces.get(&p.namespace).map(|n| &n.labels);
                sel.matches(&namespace_selector_labels(&p.namespace, labels))
            }
            None => p.namespace == client.namespace,
        })
        .filter_map(|p| {
            let ip = *p.ip.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4())?;
            Some(GatewayMember {
                ip,
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                node: p.node.clone(),
            })
        })
        .filter(|m| healthy(m))
        .collect();
    if preference == Preference::PreferNodeLocal {
        if let Some(node) = &client.node {
            if members.iter().any(|m| m.node.as_ref() == Some(node)) {
                members.retain(|m| m.node.as_ref() == Some(node));
            }
        }
    }
    if let Some(max) = spec
        .max_next_hops
        .and_then(|m| usize::try_from(m).ok())
        .filter(|&m| m > 0)
    {
        if members.len() > max {
            let client_key = format!("{}/{}", client.namespace, client.name);
            members.sort_by_cached_key(|m| {
                let score = fnv1a(&[
                    client_key.as_bytes(),
                    b"\0",
                    m.namespace.as_bytes(),
                    b"/",
                    m.name.as_bytes(),
                ]);
                (core::cmp::Reverse(score), m.ip)
            });
            members.truncate(max);
        }
    }
    members.sort();
    if members.is_empty() {
        return Decision::Blocked(BlockReason::NoGateways);
    }
    Decision::Gateways {
        members,
        max_next_hops: spec.max_next_hops,
        preference,
    }
}

/// The decision the straightforward resolution gives `entry` of `pod`'s table (the steps before the
/// gateway step are shared code, so the entry's destination and rule are taken as they are).
fn expected_decision(
    inv: &Inventory,
    pod: &Pod,
    entry: &TableEntry,
    healthy: &dyn Fn(IpNet, &GatewayMember) -> bool,
) -> Decision {
    let net = entry.destination;
    let healthy = |m: &GatewayMember| healthy(net, m);
    match inv.applied(pod).1 {
        Applied::Policy(policy) => {
            let rule = &policy.rules()[entry.rule_index.unwrap()];
            match &rule.gateway {
                None => Decision::NoGateway,
                Some(spec) => {
                    gateways_by_scan(inv, pod, net.network(), spec, rule.preference, &healthy)
                }
            }
        }
        Applied::Selector(Ok(spec)) => {
            gateways_by_scan(inv, pod, net.network(), &spec, Preference::None, &healthy)
        }
        // Not the gateway step: whatever the table says (checked by the table tests).
        Applied::None | Applied::Missing(_) | Applied::Selector(Err(_)) => entry.decision.clone(),
    }
}

/// An egress annotation choice: none, a policy, or selector annotations (selector, namespace selector,
/// `maxNextHops` text).
#[derive(Debug, Clone)]
enum Annotation {
    None,
    Policy(usize),
    Selector(usize, Option<usize>, Option<&'static str>),
}

fn annotation() -> impl Strategy<Value = Annotation> {
    prop_oneof![
        Just(Annotation::None),
        (0..POLICIES.len()).prop_map(Annotation::Policy),
        (
            0..SELECTORS.len(),
            proptest::option::of(0..NAMESPACE_SELECTORS.len()),
            proptest::option::of(prop_oneof![Just("0"), Just("1"), Just("2"), Just("x")]),
        )
            .prop_map(|(s, n, m)| Annotation::Selector(s, n, m)),
    ]
}

fn annotations(a: &Annotation) -> Labels {
    let mut out = Labels::new();
    match *a {
        Annotation::None => {}
        Annotation::Policy(p) => {
            out.insert(ANNOTATION_POLICY.into(), POLICIES[p].into());
        }
        Annotation::Selector(s, n, m) => {
            out.insert(ANNOTATION_SELECTOR.into(), SELECTORS[s].into());
            if let Some(n) = n {
                out.insert(
                    ANNOTATION_NAMESPACE_SELECTOR.into(),
                    NAMESPACE_SELECTORS[n].into(),
                );
            }
            if let Some(m) = m {
                out.insert(ANNOTATION_MAX_NEXT_HOPS.into(), m.into());
            }
        }
    }
    out
}

/// A namespace: labelled `team=x`, `team=y` or not at all, with an egress annotation.
fn namespace() -> impl Strategy<Value = (Option<bool>, Annotation)> {
    (proptest::option::of(any::<bool>()), annotation())
}

/// A pod: namespace, name, label `code`, an egress annotation, addresses (bit 0: IPv4, bit 1: IPv6), its
/// address number (few, so that gateways share addresses), node.
type PodChoice = (
    usize,
    usize,
    Option<bool>,
    Annotation,
    u8,
    u8,
    Option<usize>,
);

fn pod() -> impl Strategy<Value = PodChoice> {
    (
        0..NAMESPACES.len(),
        0..6usize,
        proptest::option::of(any::<bool>()),
        annotation(),
        0..4u8,
        0..4u8,
        proptest::option::of(0..3usize),
    )
}

/// A rule: destination, gateway (selector, namespace selector, `maxNextHops`), `PreferNodeLocal`.
type RuleChoice = (usize, Option<(usize, Option<usize>, Option<u32>)>, bool);

fn rule() -> impl Strategy<Value = RuleChoice> {
    (
        0..DESTINATIONS.len(),
        proptest::option::of((
            0..SELECTORS.len() - 1, // policies hold parsed selectors
            proptest::option::of(0..NAMESPACE_SELECTORS.len()),
            proptest::option::of(0..4u32),
        )),
        any::<bool>(),
    )
}

fn build(
    namespaces: &[Option<(Option<bool>, Annotation)>],
    pods: &[PodChoice],
    policies: &[Vec<RuleChoice>],
) -> Inventory {
    let mut inv = Inventory::new();
    for (name, ns) in NAMESPACES.iter().zip(namespaces) {
        let Some((team, a)) = ns else { continue };
        let mut labels = Labels::new();
        if let Some(x) = team {
            labels.insert("team".into(), if *x { "x" } else { "y" }.into());
        }
        inv.insert_namespace(Namespace {
            name: (*name).into(),
            labels,
            annotations: annotations(a),
        });
    }
    for (ns, name, code, a, family, number, node) in pods {
        let mut labels = Labels::new();
        if let Some(red) = code {
            labels.insert("code".into(), if *red { "red" } else { "blue" }.into());
        }
        let mut ip = Vec::new();
        if family & 1 != 0 {
            ip.push(IpAddr::V4(Ipv4Addr::new(10, 0, 0, *number)));
        }
        if family & 2 != 0 {
            ip.push(IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0,
                0,
                0,
                0,
                0,
                0,
                (*number).into(),
            )));
        }
        inv.insert_pod(Pod {
            namespace: NAMESPACES[*ns].into(),
            name: format!("p{name}"),
            labels,
            annotations: annotations(a),
            ip,
            node: node.map(|n| format!("node-{n}")),
            host_ip: None,
        });
    }
    for (name, rules) in POLICIES.iter().zip(policies) {
        let rules = rules
            .iter()
            .map(|&(dst, gateway, local)| Rule {
                description: None,
                destination: DESTINATIONS[dst].map(|d| d.parse().unwrap()),
                gateway: gateway.map(|(s, n, max_next_hops)| GatewaySpec {
                    selector: Selector::parse(SELECTORS[s]).unwrap(),
                    namespace_selector: n.map(|n| Selector::parse(NAMESPACE_SELECTORS[n]).unwrap()),
                    max_next_hops,
                }),
                preference: if local {
                    Preference::PreferNodeLocal
                } else {
                    Preference::None
                },
            })
            .collect();
        // Two rules with one destination make an invalid policy: the inventory then lacks it.
        if let Ok(policy) = EgressGatewayPolicy::new(*name, rules) {
            inv.insert_policy(policy);
        }
    }
    inv
}

/// A health filter that fails some gateways, depending on the prefix, the gateway and `seed`.
fn health(seed: u8) -> impl Fn(IpNet, &GatewayMember) -> bool {
    move |net, m| {
        let h = fnv1a(&[
            &[seed],
            net.to_string().as_bytes(),
            m.namespace.as_bytes(),
            m.name.as_bytes(),
        ]);
        !h.is_multiple_of(3)
    }
}

proptest! {
    #[test]
    fn resolver_decides_as_a_walk_over_every_pod(
        namespaces in proptest::collection::vec(proptest::option::of(namespace()), NAMESPACES.len()),
        pods in proptest::collection::vec(pod(), 0..14),
        policies in proptest::collection::vec(proptest::collection::vec(rule(), 0..4), 2),
        seed in any::<u8>(),
    ) {
        let inv = build(&namespaces, &pods, &policies);
        let resolver = inv.resolver();
        let all = |_: IpNet, _: &GatewayMember| true;
        let some = health(seed);
        for pod in inv.pods() {
            // The shared resolver, asked with different health filters in turn, as the plan asks it.
            for healthy in [&all as &dyn Fn(IpNet, &GatewayMember) -> bool, &some] {
                let table = resolver.table(pod, healthy);
                prop_assert_eq!(&table, &inv.table(pod, healthy));
                let Some(table) = table else { continue };
                for entry in &table.entries {
                    prop_assert_eq!(
                        &entry.decision,
                        &expected_decision(&inv, pod, entry, healthy),
                        "pod {}/{}, prefix {}", &pod.namespace, &pod.name, entry.destination
                    );
                }
            }
            for dst in PROBES {
                let dst: IpAddr = dst.parse().unwrap();
                let healthy = |m: &GatewayMember| some(default_route(dst), m);
                let got = resolver.explain_filtered(pod, dst, healthy);
                let expected = match (inv.applied(pod).1, got.rule_index) {
                    (Applied::Policy(policy), Some(index)) => match &policy.rules()[index].gateway {
                        None => Decision::NoGateway,
                        Some(spec) => gateways_by_scan(
                            &inv, pod, dst, spec, policy.rules()[index].preference, &healthy,
                        ),
                    },
                    (Applied::Selector(Ok(spec)), _) => {
                        gateways_by_scan(&inv, pod, dst, &spec, Preference::None, &healthy)
                    }
                    _ => got.decision.clone(),
                };
                prop_assert_eq!(&got.decision, &expected, "pod {}/{} to {}", &pod.namespace, &pod.name, dst);
            }
        }
    }
}
