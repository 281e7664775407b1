//! The agent against a real kube-apiserver (`kubernetes.kubeconfig`, no input files), with the service
//! account and RBAC of deploy/node-agent/rbac.yaml: what it programs follows the cluster through watches —
//! a new pod, a policy edit, an invalid policy (only its pods blocked), a gateway deleted — it keeps what
//! is programmed while the API server is away, even across its own restart, and names the missing
//! permission when RBAC denies a watch.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use tests::agent::{self, AgentConfig, RouteShape};
use tests::kube::ApiServer;
use tests::scenario::poll;
use tests::topology::{gateway_ip, POD_RULE_PRIORITY};
use tests::{
    require_kube, require_netns, require_node_agent, require_userspace_gateway, Inventory, Metrics,
    NodeAgent, Policy, PolicyRule, TopologySpec,
};

use crate::common::{Env, READY};

/// How long a change in the API may take to reach the node's kernel (watch delivery, plan, netlink).
const CONVERGE: Duration = Duration::from_secs(10);

fn via(k: usize) -> RouteShape {
    RouteShape::Via(vec![IpAddr::V4(gateway_ip(k))])
}

fn default4() -> IpNet {
    IpNet::V4(Ipv4Net::default())
}

/// Waits until `pod`'s table on node 1 routes 0.0.0.0/0 as `want`; returns how long that took.
fn wait_pod_route(env: &Env, api: &ApiServer, pod_ip: IpAddr, want: &RouteShape) -> Duration {
    let start = Instant::now();
    let node = &env.topo.node(1).ns;
    loop {
        let table = agent::rule_table(node, pod_ip, POD_RULE_PRIORITY).unwrap_or(None);
        let now = match table {
            Some(t) => agent::table_route(node, t, default4()).unwrap_or(None),
            None => None,
        };
        if now.as_ref() == Some(want) {
            return start.elapsed();
        }
        if start.elapsed() > CONVERGE {
            env.fail(format!(
                "pod {pod_ip}: want 0.0.0.0/0 {want:?}, have {now:?} (table {table:?}) after {CONVERGE:?}\n\
                 ---- kube-apiserver log:\n{}",
                api.log_tail(10)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's metric `name`, summed over the samples whose labels include `labels`; `None` when there
/// is none (or no answer).
fn metric(env: &Env, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    Metrics::parse(&env.agent.metrics_text().ok()?).get(name, labels)
}

/// The agent's four watches, as its metrics label them.
fn cluster_watches() -> [&'static str; 4] {
    [
        "node_pods",
        "gateway_pods",
        "namespaces",
        "egressgatewaypolicies",
    ]
}

/// Polls until the agent's log contains `needle`.
fn wait_log(env: &Env, needle: &str, timeout: Duration) {
    let start = Instant::now();
    while !env.agent.log_tail(200).contains(needle) {
        if start.elapsed() > timeout {
            env.fail(format!(
                "the agent never logged `{needle}` within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_agent_follows_the_cluster_through_the_api_server() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let kubectl = require_kube!();
    let spec = TopologySpec::node_agent(&[3], vec![mode.clone(), mode]);
    let mut topo = tests::Topology::build(spec).expect("build the node-agent topology");
    for k in 1..=2 {
        topo.gateway_mut(k)
            .wait_ready(READY)
            .unwrap_or_else(|e| panic!("gateway {k}: {e}"));
    }
    let (web, web2, other) = (topo.pod(1, 1).ip, topo.pod(1, 2).ip, topo.pod(1, 3).ip);
    let mut inventory = Inventory::new();
    inventory
        .policy(Policy::new(
            "red",
            vec![PolicyRule::via(Ipv4Net::default(), "red")],
        ))
        .namespace_with_policy("app", "red")
        .client_pod("app", "web", topo.pod(1, 1))
        // On another node: the agent's watch must not even see it.
        .client_pod_at(
            "app",
            "elsewhere",
            2,
            vec!["10.244.9.9".parse().expect("ip")],
        )
        .gateway_pod(1, "red", false)
        .gateway_pod(2, "blue", false);

    // The API server runs in node 1's namespace: the agent reaches it on that namespace's loopback.
    let api_dir = topo.dir().join("kube");
    let mut api = ApiServer::start(&topo.node(1).ns, &api_dir, &kubectl)
        .unwrap_or_else(|e| panic!("start kube-apiserver: {e}"));
    api.apply_inventory(&inventory)
        .expect("write the inventory to the API");
    let rbac = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node-agent/rbac.yaml");
    let rbac_yaml = std::fs::read_to_string(&rbac).expect("read deploy/node-agent/rbac.yaml");
    api.apply(&rbac_yaml).expect("apply the agent's RBAC");
    let sa_kubeconfig = api
        .service_account_kubeconfig(
            "egress",
            "egress-node-agent",
            &topo.dir().join("agent.kubeconfig"),
        )
        .expect("a kubeconfig for the agent's service account");

    let mut config = AgentConfig::for_node(1, Vec::new());
    config.kubeconfig = Some(sa_kubeconfig);
    let mut agent = NodeAgent::start(&topo, &bin, 1, config).expect("start the node agent");
    if let Err(e) = agent.wait_ready(READY) {
        panic!("{e}\nnode 1:\n{}", agent::node_state(&topo.node(1).ns));
    }
    let mut env = Env {
        agent,
        inventory,
        topo,
    };
    let started = wait_pod_route(&env, &api, IpAddr::V4(web), &via(1));
    println!("first plan from the API: app/web via gateway 1 ({started:?} after ready)");
    let pods = metric(
        &env,
        "egress_node_cluster_objects",
        &[("watch", "node_pods")],
    );
    if pods != Some(1.0) {
        env.fail(format!(
            "the node-pods watch holds {pods:?} pods; want 1 (app/web; app/elsewhere is on node2)"
        ));
    }

    // A new pod in the opted-in namespace.
    let mut added = Inventory::new();
    added.client_pod("app", "web2", env.topo.pod(1, 2));
    // Only the pod: applying the harness's bare namespace `app` would drop its policy annotation.
    api.apply_pods(&added.pods).expect("create app/web2");
    let took = wait_pod_route(&env, &api, IpAddr::V4(web2), &via(1));
    println!("new pod app/web2 routed via gateway 1 in {took:?}");

    // A policy edit: red now goes through the blue gateway.
    let mut edited = Inventory::new();
    edited.policy(Policy::new(
        "red",
        vec![PolicyRule::via(Ipv4Net::default(), "blue")],
    ));
    api.apply_inventory(&edited).expect("edit policy red");
    let took = wait_pod_route(&env, &api, IpAddr::V4(web), &via(2));
    wait_pod_route(&env, &api, IpAddr::V4(web2), &via(2));
    println!("policy edit (red → blue gateway) on the node in {took:?}");

    // An invalid policy (a Calico selector the CRD cannot check): only the pods that name it are blocked.
    api.apply(
        "apiVersion: projectcalico.org/v3\nkind: EgressGatewayPolicy\nmetadata:\n  name: broken\nspec:\n  \
         rules:\n  - gateway:\n      selector: \"egress-code == \"\n",
    )
    .expect("create policy broken (the CRD accepts it)");
    let mut other_ns = Inventory::new();
    other_ns
        .namespace_with_policy("other", "broken")
        .client_pod("other", "x", env.topo.pod(1, 3));
    api.apply_inventory(&other_ns)
        .expect("namespace other using broken");
    wait_pod_route(&env, &api, IpAddr::V4(other), &RouteShape::Unreachable);
    wait_pod_route(&env, &api, IpAddr::V4(web), &via(2));
    if metric(&env, "egress_node_invalid_policies", &[]) != Some(1.0) {
        env.fail("egress_node_invalid_policies is not 1");
    }
    wait_log(&env, "EgressGatewayPolicy 'broken' is invalid", CONVERGE);
    // Where an operator looks: `kubectl describe` of the blocked pod and of the policy shows a Warning.
    for (what, args, want) in [
        (
            "pod other/x",
            ["describe", "pod", "-n", "other", "x"],
            ["EgressBlocked", "EgressGatewayPolicy 'broken' is invalid"],
        ),
        (
            "policy broken",
            ["describe", "egressgatewaypolicy", "broken", "", ""],
            ["InvalidPolicy", "node1"],
        ),
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let start = Instant::now();
        loop {
            let text = api.kubectl(&args).unwrap_or_else(|e| e.to_string());
            if want.iter().all(|w| text.contains(w)) {
                break;
            }
            if start.elapsed() > CONVERGE {
                env.fail(format!(
                    "`kubectl {}` shows no Event with {want:?} for {what}:\n{text}",
                    args.join(" ")
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if metric(
        &env,
        "egress_node_events_total",
        &[("reason", "EgressBlocked")],
    ) != Some(1.0)
    {
        env.fail("egress_node_events_total{reason=\"EgressBlocked\"} is not 1 (one blocked pod, published once)");
    }
    println!("invalid policy: other/x blocked, app/* unaffected; Events on the pod and the policy");

    // The API server goes away while the agent runs: its watches fail (counted), it stays synced and
    // ready on what it knew. It comes back with etcd compacted past every resourceVersion the agent holds:
    // each watch is answered 410 Gone and lists again — and nothing is flushed meanwhile.
    let errors_before = metric(&env, "egress_node_watch_errors_total", &[]).unwrap_or(0.0);
    let removed_before = metric(
        &env,
        "egress_node_kernel_changes_total",
        &[("op", "removed")],
    );
    api.stop();
    let start = Instant::now();
    while metric(&env, "egress_node_watch_errors_total", &[]).unwrap_or(0.0) <= errors_before {
        if start.elapsed() > CONVERGE {
            env.fail("egress_node_watch_errors_total did not grow with the API server gone");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if metric(&env, "egress_node_cluster_synced", &[]) != Some(1.0) {
        env.fail("egress_node_cluster_synced left 1 while the API server was away (what it knew is kept)");
    }
    api.start_again_compacted()
        .expect("start kube-apiserver again, etcd compacted");
    let start = Instant::now();
    loop {
        // Routes are sampled throughout: a relist must never show the kernel a half-empty cluster.
        for (ip, want) in [
            (web, via(2)),
            (web2, via(2)),
            (other, RouteShape::Unreachable),
        ] {
            let node = &env.topo.node(1).ns;
            let table = agent::rule_table(node, IpAddr::V4(ip), POD_RULE_PRIORITY).unwrap_or(None);
            let now = table.and_then(|t| agent::table_route(node, t, default4()).unwrap_or(None));
            if now.as_ref() != Some(&want) {
                env.fail(format!(
                    "pod {ip} changed to {now:?} (want {want:?}) while the agent relisted after 410"
                ));
            }
        }
        let expired: Vec<f64> = cluster_watches()
            .iter()
            .map(|w| {
                metric(&env, "egress_node_watch_expired_total", &[("watch", w)]).unwrap_or(0.0)
            })
            .collect();
        if expired.iter().all(|n| *n >= 1.0) && start.elapsed() > Duration::from_secs(2) {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            env.fail(format!(
                "egress_node_watch_expired_total by watch {expired:?} after 30 s; want each ≥ 1 (410 Gone \
                 from the compacted API server)\n---- kube-apiserver log:\n{}",
                api.log_tail(10)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if metric(
        &env,
        "egress_node_kernel_changes_total",
        &[("op", "removed")],
    ) != removed_before
    {
        env.fail("the agent removed kernel state while it relisted after 410");
    }
    wait_log(&env, "(410 Gone); listing again", CONVERGE);
    // The relisted watches carry changes again: red to its own gateway and back.
    for (gateway, want) in [("red", via(1)), ("blue", via(2))] {
        let mut edited = Inventory::new();
        edited.policy(Policy::new(
            "red",
            vec![PolicyRule::via(Ipv4Net::default(), gateway)],
        ));
        api.apply_inventory(&edited).expect("edit policy red");
        wait_pod_route(&env, &api, IpAddr::V4(web), &want);
    }
    println!(
        "API server away and back with etcd compacted: every watch relisted after 410 Gone, nothing flushed"
    );

    // The API server goes away: nothing changes on the node, also across an agent restart.
    api.stop();
    std::thread::sleep(Duration::from_secs(2));
    wait_pod_route(&env, &api, IpAddr::V4(web), &via(2));
    env.agent.restart().expect("restart the agent");
    std::thread::sleep(Duration::from_secs(3));
    match env.agent.readiness() {
        Ok((503, _)) => {}
        other => env.fail(format!(
            "readiness without an API server after a restart: {other:?}, want 503"
        )),
    }
    if metric(&env, "egress_node_cluster_synced", &[]) != Some(0.0) {
        env.fail("egress_node_cluster_synced is not 0 after a restart without an API server");
    }
    for (ip, want) in [
        (web, via(2)),
        (web2, via(2)),
        (other, RouteShape::Unreachable),
    ] {
        wait_pod_route(&env, &api, IpAddr::V4(ip), &want);
    }
    println!("API server down, agent restarted: routes kept, agent not ready");
    api.start_again().expect("start kube-apiserver again");
    if let Err(e) = env.agent.wait_ready(Duration::from_secs(60)) {
        env.fail(format!(
            "the agent did not sync after the API server returned: {e}"
        ));
    }

    // A gateway starts terminating (a graceful delete, which without a kubelet never finishes): the pods
    // using it get Calico Enterprise's maintenance annotations — its IP, when its termination started and
    // when it will end.
    api.kubectl(&[
        "delete",
        "pod",
        "-n",
        "egress",
        "gw2",
        "--grace-period=120",
        "--wait=false",
    ])
    .expect("start deleting gw2");
    let gw2 = gateway_ip(2).to_string();
    let web_annotations = || {
        api.kubectl(&[
            "get",
            "pod",
            "-n",
            "app",
            "web",
            "-o",
            "jsonpath={.metadata.annotations}",
        ])
        .unwrap_or_default()
    };
    let start = Instant::now();
    let annotations = poll(
        CONVERGE,
        Duration::from_millis(20),
        "app/web's maintenance annotations",
        || Some(web_annotations()).filter(|a| a.contains("gatewayMaintenanceGatewayIP")),
    )
    .unwrap_or_else(|e| env.fail(format!("{e}: {}", web_annotations())));
    println!(
        "gateway pod terminating: app/web annotated in {:?}: {annotations}",
        start.elapsed()
    );
    let get = |k: &str| {
        let path = format!(
            "jsonpath={{.metadata.annotations.egress\\.projectcalico\\.org/gatewayMaintenance{k}}}"
        );
        api.kubectl(&["get", "pod", "-n", "app", "web", "-o", &path])
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    assert_eq!(
        get("GatewayIP").as_deref(),
        Some(gw2.as_str()),
        "{annotations}"
    );
    let (started, finished) = (get("StartedTimestamp"), get("FinishedTimestamp"));
    let deletion = api
        .kubectl(&[
            "get",
            "pod",
            "-n",
            "egress",
            "gw2",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ])
        .expect("gw2's deletionTimestamp");
    assert_eq!(finished.as_deref(), Some(deletion.trim()), "{annotations}");
    assert!(
        started.is_some_and(|s| s.as_str() < deletion.trim()),
        "started before it ends: {annotations}"
    );

    // Then the gateway is gone (removed at once, as after its node is lost): its clients lose it (blue had
    // only gateway 2: blocked, fail closed), and the annotations go.
    api.kubectl(&[
        "delete",
        "pod",
        "-n",
        "egress",
        "gw2",
        "--grace-period=0",
        "--force",
    ])
    .expect("delete gw2");
    let took = wait_pod_route(&env, &api, IpAddr::V4(web), &RouteShape::Unreachable);
    println!("gateway pod deleted: app/web blocked in {took:?}");
    poll(
        CONVERGE,
        Duration::from_millis(20),
        "the maintenance annotations to go",
        || (!web_annotations().contains("gatewayMaintenance")).then_some(()),
    )
    .unwrap_or_else(|e| {
        env.fail(format!(
            "app/web's annotations stayed after the gateway was gone: {e}"
        ))
    });

    // RBAC: without `namespaces`, a (re)started agent names what to grant, stays unready, changes nothing.
    env.agent.stop();
    let without_ns = rbac_yaml.replace("resources: [namespaces]", "resources: [configmaps]");
    assert_ne!(
        without_ns, rbac_yaml,
        "rbac.yaml's rule changed shape; update this test"
    );
    api.apply(&without_ns).expect("narrow the ClusterRole");
    env.agent.restart().expect("start the agent again");
    wait_log(&env, "may not `list` namespaces", Duration::from_secs(20));
    match env.agent.readiness() {
        Ok((503, _)) => {}
        other => env.fail(format!("readiness with RBAC denied: {other:?}, want 503")),
    }
    wait_pod_route(&env, &api, IpAddr::V4(web2), &RouteShape::Unreachable);
    wait_pod_route(&env, &api, IpAddr::V4(other), &RouteShape::Unreachable);
    api.apply(&rbac_yaml).expect("restore the ClusterRole");
    if let Err(e) = env.agent.wait_ready(Duration::from_secs(60)) {
        env.fail(format!(
            "the agent did not sync after RBAC was restored: {e}"
        ));
    }
    println!("RBAC denied: the log names the verb and resource; restored: ready again");
    drop(api);
}

/// `tunnel.allowed_sources: kubernetes-nodes`: the gateway admits VXLAN from exactly the InternalIPs of
/// the Node objects it watches. With no Node for node 1 its pod's traffic is dropped at the gateway (counted
/// as `vxlan_source_not_allowed`); once node 1's Node is created it flows, from the gateway's egress IP;
/// after the Node is deleted it is dropped again — no reload, no restart.
#[test]
fn a_gateway_admits_exactly_the_clusters_nodes() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let kubectl = require_kube!();
    let mut env = Env::everything_via(&mode, &bin, &["red"], "red", "red", &["client"], 0);
    let table = env.table_of(env.topo.pod(1, 1));
    env.wait_route(table, default4(), &via(1), Duration::from_secs(5));
    // The API server in the gateway's namespace (the gateway reaches it on its loopback).
    let api_dir = env.topo.dir().join("kube-gw");
    let api = ApiServer::start(&env.topo.gateway(1).ns, &api_dir, &kubectl)
        .unwrap_or_else(|e| env.fail(format!("start kube-apiserver: {e}")));
    let config_path = env
        .topo
        .gateway(1)
        .config_path()
        .expect("a userspace gateway")
        .to_path_buf();
    let config = std::fs::read_to_string(&config_path).expect("the gateway's configuration");
    let allowed = format!("allowed_sources: [{}]", tests::topology::UNDERLAY);
    assert!(
        config.contains(&allowed),
        "the harness's gateway configuration changed shape:\n{config}"
    );
    let config = format!(
        "{}kubernetes: {{ kubeconfig: \"{}\" }}\n",
        config.replace(&allowed, "allowed_sources: kubernetes-nodes"),
        api.kubeconfig().display()
    );
    std::fs::write(&config_path, config).expect("rewrite the gateway's configuration");
    env.topo
        .gateway_mut(1)
        .respawn()
        .expect("restart gateway 1");
    env.topo
        .gateway_mut(1)
        .wait_ready(READY)
        .unwrap_or_else(|e| env.fail(format!("gateway 1 with kubernetes-nodes: {e}")));

    let server = tests::traffic::udp_echo_server(
        &env.topo.red().ns,
        std::net::SocketAddr::from((tests::topology::RED_SERVER, 7300)),
    )
    .unwrap_or_else(|e| env.fail(e));
    let pod_ns = &env.topo.pod(1, 1).ns;
    let answered = |env: &Env| -> bool {
        tests::scenario::udp_flows(pod_ns, server.addr(), 1).is_ok()
            && server.last_peer().map(|p| p.ip())
                == Some(IpAddr::V4(env.topo.gateway(1).dmz_egress))
    };
    let gateway_metric = |env: &Env, name: &str, labels: &[(&str, &str)]| -> f64 {
        env.topo
            .gateway(1)
            .metrics()
            .ok()
            .and_then(|m| m.get(name, labels))
            .unwrap_or(0.0)
    };
    let refused = || [("reason", "vxlan_source_not_allowed")];

    // No Node objects: nothing admitted.
    let before = gateway_metric(&env, "egress_gateway_drops_total", &refused());
    if answered(&env) {
        env.fail("traffic passed a gateway that knows no node");
    }
    let after = gateway_metric(&env, "egress_gateway_drops_total", &refused());
    if after <= before {
        env.fail(format!(
            "no vxlan_source_not_allowed drop counted ({before} → {after})"
        ));
    }

    // Node 1 joins.
    let node_ip = tests::topology::node_ip(1);
    api.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n")
        .unwrap_or_else(|e| env.fail(e));
    let status = format!(
        "{{\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"{node_ip}\"}},{{\"type\":\"Hostname\",\"address\":\"node1\"}}]}}}}"
    );
    api.kubectl(&[
        "patch",
        "node",
        "node1",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ])
    .unwrap_or_else(|e| env.fail(e));
    let start = Instant::now();
    while !answered(&env) {
        if start.elapsed() > CONVERGE {
            env.fail("node 1's Node was created but its pod's traffic still does not pass");
        }
    }
    println!(
        "Node node1 created: traffic admitted after {:?}",
        start.elapsed()
    );
    if gateway_metric(&env, "egress_gateway_tunnel_allowed_nodes", &[]) != 1.0 {
        env.fail("egress_gateway_tunnel_allowed_nodes is not 1");
    }

    // Node 1 leaves.
    api.kubectl(&["delete", "node", "node1"])
        .unwrap_or_else(|e| env.fail(e));
    let start = Instant::now();
    while gateway_metric(&env, "egress_gateway_tunnel_allowed_nodes", &[]) != 0.0 {
        if start.elapsed() > CONVERGE {
            env.fail("node 1's Node was deleted but the gateway still admits it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "Node node1 deleted: no longer admitted after {:?}",
        start.elapsed()
    );
    // (A refused exchange takes the client's whole retry time to fail, so it is checked once, after.)
    if answered(&env) {
        env.fail("node 1's Node was deleted but its pod's traffic still passes");
    }
    drop(api);
}
