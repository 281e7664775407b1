//! Table tests of resolution over one small cluster.

use super::*;
use crate::policy::model::Rule;

fn map(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ns(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Namespace {
    Namespace {
        name: name.into(),
        labels: map(labels),
        annotations: map(annotations),
    }
}

fn pod(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    ips: &[&str],
    node: &str,
) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: map(labels),
        annotations: map(annotations),
        ip: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        node: Some(node.into()),
        host_ip: None,
    }
}

fn gw(
    selector: &str,
    namespace_selector: Option<&str>,
    max_next_hops: Option<u32>,
) -> Option<GatewaySpec> {
    Some(GatewaySpec {
        selector: Selector::parse(selector).unwrap(),
        namespace_selector: namespace_selector.map(|s| Selector::parse(s).unwrap()),
        max_next_hops,
    })
}

fn rule(dst: Option<&str>, gateway: Option<GatewaySpec>, preference: Preference) -> Rule {
    Rule {
        description: None,
        destination: dst.map(|d| d.parse().unwrap()),
        gateway,
        preference,
    }
}

const EGRESS_NS: &str = "projectcalico.org/name == 'egress'";
const RED: &str = "egress-code == 'red'";
const BLUE: &str = "egress-code == 'blue'";
const POLICY: &str = ANNOTATION_POLICY;
const SELECTOR: &str = ANNOTATION_SELECTOR;
const NS_SELECTOR: &str = ANNOTATION_NAMESPACE_SELECTOR;

/// A client pod of the fixture: namespace, name, annotations, node.
type Client = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// A row of the resolution table: namespace, pod, destination, source, policy, rule, decision summary
/// (`*N`: N gateways).
type Row = (
    &'static str,
    &'static str,
    &'static str,
    AnnotationSource,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

fn cluster() -> Inventory {
    let mut inv = Inventory::new();
    inv.insert_namespace(ns("default", &[], &[]));
    inv.insert_namespace(ns("apps", &[], &[(POLICY, "ns-policy")]));
    inv.insert_namespace(ns("egress", &[("team", "net")], &[]));
    inv.insert_namespace(ns(
        "sel-ns",
        &[],
        &[(SELECTOR, BLUE), (NS_SELECTOR, EGRESS_NS)],
    ));
    inv.insert_namespace(ns("blocked-ns", &[], &[(POLICY, "missing")]));

    let red = [("egress-code", "red")];
    inv.insert_pod(pod(
        "egress",
        "red-a",
        &red,
        &[],
        &["10.10.0.1", "fd00::1"],
        "node-a",
    ));
    inv.insert_pod(pod("egress", "red-b", &red, &[], &["10.10.0.2"], "node-b"));
    inv.insert_pod(pod(
        "egress",
        "blue-a",
        &[("egress-code", "blue")],
        &[],
        &["10.10.0.3"],
        "node-a",
    ));
    inv.insert_pod(pod("egress", "red-c", &red, &[], &["10.10.0.4"], "node-c"));
    inv.insert_pod(pod(
        "default",
        "red-default",
        &red,
        &[],
        &["10.10.0.9"],
        "node-a",
    ));

    let policies = [
        EgressGatewayPolicy::new(
            "red-blue",
            vec![
                rule(
                    Some("192.0.2.0/24"),
                    gw(RED, Some(EGRESS_NS), None),
                    Preference::None,
                ),
                rule(
                    Some("198.51.100.0/24"),
                    gw(BLUE, Some(EGRESS_NS), None),
                    Preference::None,
                ),
                rule(Some("172.16.1.0/24"), None, Preference::None),
                rule(Some("192.0.2.128/25"), None, Preference::None),
            ],
        ),
        EgressGatewayPolicy::new(
            "ns-policy",
            vec![rule(
                None,
                gw(RED, Some("team == 'net'"), Some(2)),
                Preference::None,
            )],
        ),
        EgressGatewayPolicy::new(
            "local",
            vec![rule(
                None,
                gw(RED, Some(EGRESS_NS), None),
                Preference::PreferNodeLocal,
            )],
        ),
        EgressGatewayPolicy::new(
            "same-ns",
            vec![rule(None, gw(RED, None, None), Preference::None)],
        ),
    ];
    for p in policies {
        inv.insert_policy(p.unwrap());
    }

    let clients: [Client; 14] = [
        ("default", "c-policy", &[(POLICY, "red-blue")], "node-a"),
        ("default", "c-none", &[], "node-a"),
        ("default", "c-missing", &[(POLICY, "nope")], "node-a"),
        ("default", "c-local", &[(POLICY, "local")], "node-b"),
        (
            "default",
            "c-local-elsewhere",
            &[(POLICY, "local")],
            "node-z",
        ),
        (
            "default",
            "c-selector",
            &[(SELECTOR, BLUE), (NS_SELECTOR, EGRESS_NS)],
            "node-a",
        ),
        ("default", "c-same-ns", &[(POLICY, "same-ns")], "node-a"),
        (
            "default",
            "c-bad-selector",
            &[(SELECTOR, "egress-code = 'x'")],
            "node-a",
        ),
        ("default", "c-empty-annotation", &[(POLICY, "")], "node-a"),
        ("apps", "a-plain", &[], "node-a"),
        ("apps", "a-override", &[(POLICY, "red-blue")], "node-a"),
        (
            "apps",
            "a-selector",
            &[(SELECTOR, BLUE), (NS_SELECTOR, EGRESS_NS)],
            "node-a",
        ),
        ("sel-ns", "s-plain", &[], "node-a"),
        ("sel-ns", "s-pod", &[(SELECTOR, RED)], "node-a"),
    ];
    for (namespace, name, annotations, node) in clients {
        inv.insert_pod(pod(
            namespace,
            name,
            &[],
            annotations,
            &["10.0.0.10", "fd00:1::10"],
            node,
        ));
    }
    inv.insert_pod(pod(
        "blocked-ns",
        "b-plain",
        &[],
        &[],
        &["10.0.0.11"],
        "node-a",
    ));
    inv
}

/// A compact, comparable form of a decision.
fn summary(d: &Decision) -> String {
    match d {
        Decision::NotOptedIn => "not-opted-in".into(),
        Decision::NoGateway => "no-gateway".into(),
        Decision::Blocked(BlockReason::MissingPolicy { policy }) => {
            format!("blocked: missing {policy}")
        }
        Decision::Blocked(BlockReason::InvalidAnnotation { annotation, .. }) => {
            format!("blocked: invalid {annotation}")
        }
        Decision::Blocked(BlockReason::NoGateways) => "blocked: no gateways".into(),
        Decision::Gateways { members, .. } => {
            let names: Vec<String> = members
                .iter()
                .map(|m| format!("{}@{}", m.name, m.ip))
                .collect();
            format!("via {}", names.join(","))
        }
    }
}

#[test]
fn resolution_table() {
    use AnnotationSource as S;
    let inv = cluster();
    #[rustfmt::skip]
    let table: &[Row] = &[
        // pod policy; longest prefix first
        ("default", "c-policy", "192.0.2.1", S::PodPolicy, Some("red-blue"), Some("192.0.2.0/24"),
         "via red-a@10.10.0.1,red-b@10.10.0.2,red-c@10.10.0.4"),
        ("default", "c-policy", "192.0.2.200", S::PodPolicy, Some("red-blue"), Some("192.0.2.128/25"), "no-gateway"),
        ("default", "c-policy", "198.51.100.7", S::PodPolicy, Some("red-blue"), Some("198.51.100.0/24"),
         "via blue-a@10.10.0.3"),
        ("default", "c-policy", "172.16.1.5", S::PodPolicy, Some("red-blue"), Some("172.16.1.0/24"), "no-gateway"),
        // no rule covers the destination: normal routing
        ("default", "c-policy", "203.0.113.1", S::PodPolicy, Some("red-blue"), None, "no-gateway"),
        ("default", "c-policy", "2001:db8::1", S::PodPolicy, Some("red-blue"), None, "no-gateway"),
        // not opted in; empty annotation = absent
        ("default", "c-none", "192.0.2.1", S::None, None, None, "not-opted-in"),
        ("default", "c-empty-annotation", "192.0.2.1", S::None, None, None, "not-opted-in"),
        // missing policy: fail closed, from the pod or from the namespace
        ("default", "c-missing", "192.0.2.1", S::PodPolicy, Some("nope"), None, "blocked: missing nope"),
        ("blocked-ns", "b-plain", "8.8.8.8", S::NamespacePolicy, Some("missing"), None, "blocked: missing missing"),
        // namespace policy; pod policy beats it; namespace policy beats pod selector
        ("apps", "a-override", "198.51.100.7", S::PodPolicy, Some("red-blue"), Some("198.51.100.0/24"),
         "via blue-a@10.10.0.3"),
        ("apps", "a-selector", "198.51.100.7", S::NamespacePolicy, Some("ns-policy"), Some("0.0.0.0/0"), "*2"),
        ("apps", "a-plain", "8.8.8.8", S::NamespacePolicy, Some("ns-policy"), Some("0.0.0.0/0"), "*2"),
        // selector annotations: pod, then namespace; without namespaceSelector, the client's namespace
        ("default", "c-selector", "8.8.8.8", S::PodSelector, None, Some("0.0.0.0/0"), "via blue-a@10.10.0.3"),
        ("sel-ns", "s-plain", "8.8.8.8", S::NamespaceSelector, None, Some("0.0.0.0/0"), "via blue-a@10.10.0.3"),
        ("sel-ns", "s-pod", "8.8.8.8", S::PodSelector, None, Some("0.0.0.0/0"), "blocked: no gateways"),
        ("default", "c-bad-selector", "8.8.8.8", S::PodSelector, None, Some("0.0.0.0/0"),
         "blocked: invalid egress.projectcalico.org/selector"),
        // a rule without destination covers IPv6 too; members are the gateways with an IPv6 address
        ("default", "c-local", "2001:db8::1", S::PodPolicy, Some("local"), Some("::/0"), "via red-a@fd00::1"),
        ("default", "c-selector", "2001:db8::1", S::PodSelector, None, Some("::/0"), "blocked: no gateways"),
        // PreferNodeLocal: the local gateway when there is one, else all
        ("default", "c-local", "8.8.8.8", S::PodPolicy, Some("local"), Some("0.0.0.0/0"), "via red-b@10.10.0.2"),
        ("default", "c-local-elsewhere", "8.8.8.8", S::PodPolicy, Some("local"), Some("0.0.0.0/0"),
         "via red-a@10.10.0.1,red-b@10.10.0.2,red-c@10.10.0.4"),
        // no namespaceSelector in the rule: gateways of the client's namespace only
        ("default", "c-same-ns", "8.8.8.8", S::PodPolicy, Some("same-ns"), Some("0.0.0.0/0"),
         "via red-default@10.10.0.9"),
    ];
    for &(namespace, name, dst, source, policy, rule, expected) in table {
        let client = inv.pod(namespace, name).unwrap();
        let ex = inv.explain(client, dst.parse().unwrap());
        let ctx = format!("{namespace}/{name} → {dst}: {ex:?}");
        assert_eq!(ex.source, source, "{ctx}");
        assert_eq!(ex.policy.as_deref(), policy, "{ctx}");
        assert_eq!(ex.rule.map(|r| r.to_string()).as_deref(), rule, "{ctx}");
        if let Some(n) = expected.strip_prefix('*') {
            let Decision::Gateways {
                members,
                max_next_hops,
                ..
            } = &ex.decision
            else {
                panic!("{ctx}")
            };
            assert_eq!(members.len().to_string(), n, "{ctx}");
            assert_eq!(*max_next_hops, Some(2), "{ctx}");
        } else {
            assert_eq!(summary(&ex.decision), expected, "{ctx}");
        }
        assert_eq!(
            inv.resolve(client, dst.parse().unwrap()),
            ex.decision,
            "{ctx}"
        );
    }
}

#[test]
fn invalid_selector_annotation_says_where() {
    let inv = cluster();
    let client = inv.pod("default", "c-bad-selector").unwrap();
    let Decision::Blocked(reason) = inv.resolve(client, "8.8.8.8".parse().unwrap()) else {
        panic!()
    };
    assert_eq!(reason.to_string(), "annotation egress.projectcalico.org/selector: at 12: expected an operator ('==', '!=', 'in', 'not in', 'contains', 'starts with', 'ends with'), found '= 'x''");
}

#[test]
fn max_next_hops_is_deterministic_spread_and_stable() {
    let mut inv = cluster();
    let dst: IpAddr = "8.8.8.8".parse().unwrap();
    let mut sets = std::collections::BTreeSet::new();
    for i in 0..30 {
        inv.insert_pod(pod(
            "apps",
            &format!("client-{i}"),
            &[],
            &[],
            &["10.0.1.1"],
            "node-a",
        ));
        let client = inv.pod("apps", &format!("client-{i}")).unwrap().clone();
        let Decision::Gateways { members, .. } = inv.resolve(&client, dst) else {
            panic!()
        };
        assert_eq!(members.len(), 2);
        assert!(
            members.windows(2).all(|w| w[0].ip < w[1].ip),
            "sorted by IP"
        );
        assert_eq!(
            inv.resolve(&client, dst),
            inv.resolve(&client, dst),
            "deterministic"
        );
        // Losing a gateway the client does not use changes nothing for it; losing one it uses replaces only that one.
        let unused = ["red-a", "red-b", "red-c"]
            .into_iter()
            .find(|n| members.iter().all(|m| m.name != *n))
            .unwrap();
        let without_unused = inv
            .explain_filtered(&client, dst, |m| m.name != unused)
            .decision;
        assert_eq!(without_unused, inv.resolve(&client, dst));
        let used = members[0].name.clone();
        let Decision::Gateways { members: after, .. } = inv
            .explain_filtered(&client, dst, |m| m.name != used)
            .decision
        else {
            panic!()
        };
        assert_eq!(after.len(), 2);
        assert!(after.iter().any(|m| m.name == members[1].name));
        sets.insert(members.iter().map(|m| m.name.clone()).collect::<Vec<_>>());
    }
    assert!(
        sets.len() > 1,
        "clients spread over gateway subsets: {sets:?}"
    );
}

#[test]
fn max_next_hops_zero_or_large_means_all() {
    let mut inv = cluster();
    for (name, max) in [("zero", 0), ("large", 10)] {
        inv.insert_policy(
            EgressGatewayPolicy::new(
                name,
                vec![rule(
                    None,
                    gw(RED, Some(EGRESS_NS), Some(max)),
                    Preference::None,
                )],
            )
            .unwrap(),
        );
        inv.insert_pod(pod(
            "default",
            name,
            &[],
            &[(POLICY, name)],
            &["10.0.0.12"],
            "node-a",
        ));
        let d = inv.resolve(
            inv.pod("default", name).unwrap(),
            "8.8.8.8".parse().unwrap(),
        );
        assert_eq!(
            summary(&d),
            "via red-a@10.10.0.1,red-b@10.10.0.2,red-c@10.10.0.4"
        );
    }
}

#[test]
fn max_next_hops_annotation_applies_to_selector_annotations() {
    let mut inv = cluster();
    let annotations = [
        (SELECTOR, RED),
        (NS_SELECTOR, EGRESS_NS),
        (ANNOTATION_MAX_NEXT_HOPS, "1"),
    ];
    inv.insert_pod(pod(
        "default",
        "one",
        &[],
        &annotations,
        &["10.0.0.13"],
        "node-a",
    ));
    let Decision::Gateways {
        members,
        max_next_hops,
        ..
    } = inv.resolve(
        inv.pod("default", "one").unwrap(),
        "8.8.8.8".parse().unwrap(),
    )
    else {
        panic!()
    };
    assert_eq!((members.len(), max_next_hops), (1, Some(1)));

    inv.insert_pod(pod(
        "default",
        "bad",
        &[],
        &[(SELECTOR, RED), (ANNOTATION_MAX_NEXT_HOPS, "two")],
        &["10.0.0.14"],
        "node-a",
    ));
    let d = inv.resolve(
        inv.pod("default", "bad").unwrap(),
        "8.8.8.8".parse().unwrap(),
    );
    assert_eq!(
        summary(&d),
        "blocked: invalid egress.projectcalico.org/maxNextHops"
    );
}

#[test]
fn health_filter_applies_before_node_preference() {
    let inv = cluster();
    let client = inv.pod("default", "c-local").unwrap();
    let dst: IpAddr = "8.8.8.8".parse().unwrap();
    // The local gateway (red-b) is down: fall back to all the others.
    let d = inv
        .explain_filtered(client, dst, |m| m.name != "red-b")
        .decision;
    assert_eq!(summary(&d), "via red-a@10.10.0.1,red-c@10.10.0.4");
    // Everything is down: blocked (an unreachable route), not routed around the gateways.
    let d = inv.explain_filtered(client, dst, |_| false).decision;
    assert_eq!(summary(&d), "blocked: no gateways");
}

#[test]
fn namespace_selector_sees_namespace_labels_and_name() {
    let mut inv = cluster();
    // A gateway in a namespace the inventory does not know: only projectcalico.org/name is there.
    inv.insert_pod(pod(
        "unlisted",
        "red-x",
        &[("egress-code", "red")],
        &[],
        &["10.10.0.5"],
        "node-a",
    ));
    let by = |ns_sel: &str| {
        let mut inv = inv.clone();
        inv.insert_policy(
            EgressGatewayPolicy::new(
                "p",
                vec![rule(None, gw(RED, Some(ns_sel), None), Preference::None)],
            )
            .unwrap(),
        );
        inv.insert_pod(pod(
            "default",
            "c",
            &[],
            &[(POLICY, "p")],
            &["10.0.0.15"],
            "node-a",
        ));
        summary(&inv.resolve(inv.pod("default", "c").unwrap(), "8.8.8.8".parse().unwrap()))
    };
    assert_eq!(
        by("projectcalico.org/name == 'unlisted'"),
        "via red-x@10.10.0.5"
    );
    assert_eq!(
        by("projectcalico.org/name in {'unlisted', 'default'}"),
        "via red-x@10.10.0.5,red-default@10.10.0.9"
    );
    assert_eq!(
        by("team == 'net'"),
        "via red-a@10.10.0.1,red-b@10.10.0.2,red-c@10.10.0.4"
    );
    assert_eq!(
        by("all()"),
        "via red-a@10.10.0.1,red-b@10.10.0.2,red-c@10.10.0.4,red-x@10.10.0.5,red-default@10.10.0.9"
    );
}

#[test]
fn display_of_reasons_and_sources() {
    assert_eq!(
        BlockReason::MissingPolicy { policy: "p".into() }.to_string(),
        "EgressGatewayPolicy 'p' does not exist (all egress traffic is blocked)"
    );
    assert!(AnnotationSource::NamespacePolicy
        .to_string()
        .starts_with("namespace annotation"));
}

/// `(destination, decision summary)` of every entry of a pod's table.
fn table_of(inv: &Inventory, ns: &str, name: &str) -> Option<Vec<(String, String)>> {
    let p = inv.pod(ns, name).unwrap();
    inv.table(p, |_, _| true).map(|t| {
        t.entries
            .iter()
            .map(|e| (e.destination.to_string(), summary(&e.decision)))
            .collect()
    })
}

#[test]
fn pod_tables_list_every_rule_of_the_configuration() {
    let inv = cluster();
    let row = |d: &str, s: &str| (d.to_string(), s.to_string());
    assert_eq!(
        table_of(&inv, "default", "c-policy").unwrap(),
        vec![
            row(
                "192.0.2.0/24",
                "via red-a@10.10.0.1,red-b@10.10.0.2,red-c@10.10.0.4"
            ),
            row("198.51.100.0/24", "via blue-a@10.10.0.3"),
            row("172.16.1.0/24", "no-gateway"),
            row("192.0.2.128/25", "no-gateway"),
        ]
    );
    // A rule without destination covers both families; only dual-stack gateways serve IPv6.
    assert_eq!(
        table_of(&inv, "default", "c-local").unwrap(),
        vec![
            row("0.0.0.0/0", "via red-b@10.10.0.2"),
            row("::/0", "via red-a@fd00::1"),
        ]
    );
    // Missing policies and invalid annotations block everything (fail closed).
    for name in ["c-missing", "c-bad-selector"] {
        let t = table_of(&inv, "default", name).unwrap();
        assert_eq!(t.len(), 2, "{name}");
        assert!(
            t.iter().all(|(_, s)| s.starts_with("blocked")),
            "{name}: {t:?}"
        );
    }
    let t = inv.table(inv.pod("blocked-ns", "b-plain").unwrap(), |_, _| true);
    assert_eq!(t.unwrap().policy.as_deref(), Some("missing"));
    // Selector annotations: one gateway set for both default routes.
    assert_eq!(
        table_of(&inv, "default", "c-selector").unwrap(),
        vec![
            row("0.0.0.0/0", "via blue-a@10.10.0.3"),
            row("::/0", "blocked: no gateways"),
        ]
    );
    assert_eq!(table_of(&inv, "default", "c-none"), None);
    assert_eq!(table_of(&inv, "apps", "a-plain").unwrap().len(), 2);
}

#[test]
fn pod_table_health_filter_sees_the_prefix() {
    let inv = cluster();
    let p = inv.pod("default", "c-policy").unwrap();
    let red_net: IpNet = "192.0.2.0/24".parse().unwrap();
    // red-a is unhealthy for the red prefix only: the other entries are unaffected.
    let t = inv
        .table(p, |net, m| !(net == red_net && m.name == "red-a"))
        .unwrap();
    assert_eq!(
        summary(&t.entries[0].decision),
        "via red-b@10.10.0.2,red-c@10.10.0.4"
    );
    assert_eq!(summary(&t.entries[1].decision), "via blue-a@10.10.0.3");
    // Nothing healthy: blocked (an unreachable route), not normal routing.
    let t = inv.table(p, |_, _| false).unwrap();
    assert_eq!(summary(&t.entries[0].decision), "blocked: no gateways");
    assert_eq!(summary(&t.entries[2].decision), "no-gateway");
}
