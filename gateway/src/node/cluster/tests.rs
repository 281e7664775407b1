use super::*;
use forwarder_core::policy::{Decision, Inventory};
use serde_json::json;

fn k8s_pod(v: serde_json::Value) -> K8sPod {
    serde_json::from_value(v).expect("a pod")
}

fn client_pod(name: &str, ip: &str, annotations: serde_json::Value) -> K8sPod {
    k8s_pod(json!({
        "metadata": { "name": name, "namespace": "app", "labels": { "app": name },
                      "annotations": annotations },
        "spec": { "nodeName": "node-a", "containers": [] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }, { "ip": "fd00::5" }],
                    "hostIP": "172.18.0.2" }
    }))
}

fn gateway_pod(name: &str, ip: &str) -> K8sPod {
    k8s_pod(json!({
        "metadata": { "name": name, "namespace": "egress",
                      "labels": { "egress-code": "red", "egress-gateway/gateway": "true" } },
        "spec": { "nodeName": "node-b", "containers": [] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }], "hostIP": "172.18.0.3" }
    }))
}

fn k8s_policy(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "projectcalico.org/v3", "kind": "EgressGatewayPolicy",
        "metadata": { "name": name }, "spec": spec
    }))
    .expect("a policy")
}

fn red_policy(name: &str) -> DynamicObject {
    k8s_policy(
        name,
        json!({ "rules": [
            { "destination": { "cidr": "10.0.0.0/8" } },
            { "gateway": { "selector": "egress-code == 'red'",
                           "namespaceSelector": "projectcalico.org/name == 'egress'" } }
        ]}),
    )
}

fn ns(name: &str, annotations: &[(&str, &str)]) -> PartialObjectMeta<K8sNamespace> {
    let mut meta = PartialObjectMeta::<K8sNamespace>::default();
    meta.metadata.name = Some(name.to_string());
    meta.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    meta
}

fn update(watch: Watch, change: Change) -> Update {
    Update { watch, change }
}

fn listed(watch: Watch, objects: Vec<(String, Option<Object>)>) -> Update {
    update(
        watch,
        Change::Listed(
            objects
                .into_iter()
                .filter_map(|(k, o)| o.map(|o| (k, o)))
                .collect(),
        ),
    )
}

/// A view with all four watches listed: one client pod on this node naming `client_policy`, one gateway,
/// the namespaces, and `policies`.
fn synced_view(client_policy: &str, policies: Vec<DynamicObject>) -> ClusterView {
    let mut view = ClusterView::default();
    let annotation = json!({ "egress.projectcalico.org/egressGatewayPolicy": client_policy });
    view.apply(listed(
        Watch::NodePods,
        vec![pod(&client_pod("web", "10.244.1.5", annotation))],
    ));
    view.apply(listed(
        Watch::GatewayPods,
        vec![pod(&gateway_pod("gw-0", "10.244.2.7"))],
    ));
    view.apply(listed(
        Watch::Namespaces,
        vec![namespace(&ns("app", &[])), namespace(&ns("egress", &[]))],
    ));
    view.apply(listed(
        Watch::Policies,
        policies.iter().map(policy).collect(),
    ));
    view
}

fn decision_for_web(view: &ClusterView) -> Decision {
    let inventory = view.inventory(&Inventory::new());
    let pod = inventory.pod("app", "web").expect("the pod is known");
    inventory
        .explain(pod, "192.0.2.1".parse().expect("an address"))
        .decision
}

#[test]
fn a_pod_keeps_what_routing_needs() {
    let applied = json!({ "a": "b", "kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"Pod\"}" });
    let (key, object) = pod(&client_pod("web", "10.244.1.5", applied));
    assert_eq!(key, "app/web");
    let Some(Object::Pod(p, None, _)) = object else {
        panic!("{object:?}")
    };
    assert_eq!(p.namespace, "app");
    assert_eq!(p.name, "web");
    assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(p.annotations.get("a").map(String::as_str), Some("b"));
    assert_eq!(
        p.annotations.len(),
        1,
        "kubectl's copy of the object is not kept"
    );
    let ips: Vec<IpAddr> = vec![
        "10.244.1.5".parse().expect("v4"),
        "fd00::5".parse().expect("v6"),
    ];
    assert_eq!(p.ip, ips, "podIP first, podIPs without repeats");
    assert_eq!(p.node.as_deref(), Some("node-a"));
    assert_eq!(p.host_ip, Some("172.18.0.2".parse().expect("v4")));
}

#[test]
fn a_finished_pod_is_gone_and_a_pending_one_has_no_address_yet() {
    for phase in ["Succeeded", "Failed"] {
        let mut p = client_pod("job", "10.244.1.9", json!({}));
        p.status.as_mut().expect("status").phase = Some(phase.into());
        assert_eq!(pod(&p), ("app/job".to_string(), None), "{phase}");
    }
    let pending = k8s_pod(json!({
        "metadata": { "name": "new", "namespace": "app" },
        "spec": { "nodeName": "node-a", "containers": [] },
        "status": { "phase": "Pending" }
    }));
    let Some(Object::Pod(p, None, _)) = pod(&pending).1 else {
        panic!("a pending pod is kept")
    };
    assert!(p.ip.is_empty());
}

#[test]
fn a_namespace_keeps_labels_and_annotations() {
    let (name, object) = namespace(&ns("app", &[("x", "y")]));
    assert_eq!(name, "app");
    let Some(Object::Namespace(n)) = object else {
        panic!("{object:?}")
    };
    assert_eq!(n.annotations.get("x").map(String::as_str), Some("y"));
    assert!(n.labels.is_empty());
}

#[test]
fn a_policy_is_read_with_the_input_files_checks() {
    let (name, object) = policy(&red_policy("red"));
    assert_eq!(name, "red");
    let Some(Object::Policy(Ok(p), _)) = object else {
        panic!("{object:?}")
    };
    assert_eq!(p.name(), "red");
    assert_eq!(p.rules().len(), 2);
    assert!(p.rules()[0].gateway.is_none());
    assert!(p.rules()[1].gateway.is_some());
}

#[test]
fn an_invalid_policy_says_which_field_is_wrong() {
    let cases = [
        (
            json!({ "rules": [{ "destination": { "cidr": "10.0.0.300/8" } }] }),
            "cidr",
        ),
        (
            json!({ "rules": [{ "gateway": { "selector": "egress-code == " } }] }),
            "selector",
        ),
        (
            json!({ "rules": [{ "gatewayPreference": "Nearest" }] }),
            "Nearest",
        ),
        (
            json!({ "rules": [{ "destination": { "cidr": "10.0.0.0/8" } },
                              { "destination": { "cidr": "10.0.0.0/8" } }] }),
            "10.0.0.0/8",
        ),
    ];
    for (spec, needle) in cases {
        let (_, object) = policy(&k8s_policy("bad", spec.clone()));
        let Some(Object::Policy(Err(why), _)) = object else {
            panic!("{spec}: accepted: {object:?}")
        };
        assert!(why.contains(needle), "{spec}: {why}");
        assert!(
            !why.contains(":1:"),
            "no line numbers of the hidden JSON: {why}"
        );
    }
}

#[test]
fn nothing_is_synced_until_every_watch_has_listed() {
    let mut view = ClusterView::default();
    assert!(!view.synced());
    for (i, w) in Watch::ALL.into_iter().enumerate() {
        assert_eq!(view.unsynced().len(), 4 - i);
        assert!(!view.synced());
        assert!(view.apply(update(w, Change::Listed(Vec::new()))));
    }
    assert!(view.synced());
    assert!(view.unsynced().is_empty());
    // The same (empty) list again changes nothing.
    assert!(!view.apply(update(Watch::Policies, Change::Listed(Vec::new()))));
}

#[test]
fn a_failing_watch_keeps_what_it_knew() {
    let mut view = synced_view("red", vec![red_policy("red")]);
    assert!(matches!(decision_for_web(&view), Decision::Gateways { .. }));
    let failed = update(
        Watch::GatewayPods,
        Change::Failed("pods: connection refused".into()),
    );
    assert!(!view.apply(failed), "a failure changes nothing");
    assert_eq!(
        view.errors(),
        vec![(Watch::GatewayPods, "pods: connection refused")]
    );
    assert!(view.synced());
    assert!(matches!(decision_for_web(&view), Decision::Gateways { .. }));
    // The next report clears the error.
    view.apply(update(
        Watch::GatewayPods,
        Change::Deleted("nobody/x".into()),
    ));
    assert!(view.errors().is_empty());
}

#[test]
fn a_relist_replaces_everything_the_watch_knew() {
    let mut view = synced_view("red", vec![red_policy("red")]);
    // The gateway went away while the watch was down; the relist does not have it.
    assert!(view.apply(listed(Watch::GatewayPods, Vec::new())));
    assert!(matches!(decision_for_web(&view), Decision::Blocked(_)));
    assert!(view.apply(listed(
        Watch::GatewayPods,
        vec![pod(&gateway_pod("gw-1", "10.244.2.8"))]
    )));
    let Decision::Gateways { members, .. } = decision_for_web(&view) else {
        panic!("the new gateway is used")
    };
    assert_eq!(members.len(), 1);
}

#[test]
fn applied_and_deleted_objects_change_the_view_only_when_they_differ() {
    let mut view = synced_view("red", vec![red_policy("red")]);
    let (key, object) = pod(&gateway_pod("gw-0", "10.244.2.7"));
    let object = object.expect("a running pod");
    assert!(
        !view.apply(update(
            Watch::GatewayPods,
            Change::Applied(key.clone(), object)
        )),
        "the same object again (a resync or a status change the agent ignores)"
    );
    let (_, moved) = pod(&gateway_pod("gw-0", "10.244.2.9"));
    assert!(view.apply(update(
        Watch::GatewayPods,
        Change::Applied(key.clone(), moved.expect("running"))
    )));
    assert!(view.apply(update(Watch::GatewayPods, Change::Deleted(key.clone()))));
    assert!(!view.apply(update(Watch::GatewayPods, Change::Deleted(key))));
}

#[test]
fn an_invalid_policy_blocks_only_the_pods_that_name_it() {
    let bad = k8s_policy(
        "broken",
        json!({ "rules": [{ "destination": { "cidr": "not-a-cidr" } }] }),
    );
    let view = synced_view("broken", vec![red_policy("red"), bad.clone()]);
    assert_eq!(view.invalid_policies().len(), 1);
    assert_eq!(view.invalid_policies()[0].0, "broken");
    // The pod naming the broken policy is blocked (fail closed), not let out through the node.
    assert!(matches!(decision_for_web(&view), Decision::Blocked(_)));
    // The valid policy is still in force for a pod that names it.
    let view = synced_view("red", vec![red_policy("red"), bad]);
    assert!(matches!(decision_for_web(&view), Decision::Gateways { .. }));
    // Fixing the policy unblocks the pod.
    let mut view = synced_view("broken", vec![red_policy("red")]);
    let (name, fixed) = policy(&red_policy("broken"));
    assert!(view.apply(update(
        Watch::Policies,
        Change::Applied(name, fixed.expect("a policy"))
    )));
    assert!(view.invalid_policies().is_empty());
    assert!(matches!(decision_for_web(&view), Decision::Gateways { .. }));
}

#[test]
fn cluster_objects_win_over_input_files() {
    let mut base = Inventory::new();
    base.insert_policy(EgressGatewayPolicy::new("red", Vec::new()).expect("empty policy"));
    let view = synced_view("red", vec![red_policy("red")]);
    let inventory = view.inventory(&base);
    let red = inventory.policy("red").expect("red");
    assert_eq!(red.rules().len(), 2, "the API server's version");
}

#[test]
fn errors_name_what_to_grant_or_install() {
    let status = |code: u16, message: &str| {
        Box::new(kube::core::Status {
            code,
            message: message.into(),
            ..kube::core::Status::default()
        })
    };
    let forbidden = watcher::Error::InitialListFailed(kube::Error::Api(status(
        403,
        "pods is forbidden: User \"system:serviceaccount:egress:egress-node-agent\" cannot list resource \"pods\"",
    )));
    let text = describe(Watch::GatewayPods, &forbidden);
    assert!(text.contains("may not `list` pods"), "{text}");
    assert!(text.contains("rbac.yaml"), "{text}");
    assert!(
        text.contains("cannot list resource"),
        "the server's words: {text}"
    );
    let missing = watcher::Error::InitialListFailed(kube::Error::Api(status(404, "not found")));
    let text = describe(Watch::Policies, &missing);
    assert!(text.contains("install the CRD"), "{text}");
    let text = describe(Watch::Namespaces, &missing);
    assert!(!text.contains("CRD"), "{text}");
}

#[test]
fn a_terminating_gateway_pod_carries_its_window() {
    let mut gw = gateway_pod("gw-0", "10.244.2.7");
    gw.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-12-04T08:03:24Z".parse().expect("a timestamp"),
    ));
    gw.metadata.deletion_grace_period_seconds = Some(120);
    let Some(Object::Pod(_, Some(t), _)) = pod(&gw).1 else {
        panic!("terminating")
    };
    assert_eq!(t.started, "2026-12-04T08:01:24Z");
    assert_eq!(t.finished, "2026-12-04T08:03:24Z");
    let mut view = synced_view("red", vec![red_policy("red")]);
    assert!(view.terminating_gateways().is_empty());
    let (key, object) = pod(&gw);
    view.apply(update(
        Watch::GatewayPods,
        Change::Applied(key, object.expect("kept while terminating")),
    ));
    let terminating = view.terminating_gateways();
    assert_eq!(terminating.len(), 1);
    assert_eq!(
        terminating[&"10.244.2.7".parse().expect("ip")].finished,
        t.finished
    );
}
