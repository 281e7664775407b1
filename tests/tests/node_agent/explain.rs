//! `egress-gateway explain --kubeconfig` against a real kube-apiserver, with no inventory files: it names
//! the gateway and policy the cluster's objects select (and follows a policy edit), a destination without a
//! gateway, a policy whose selector matches no gateway and an invalid policy (both blocked, as the node
//! agent blocks them), `--gateway-selector`; and it says what is wrong when the pod or its namespace does
//! not exist, when RBAC denies a request and when the API server is down.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use tests::kube::ApiServer;
use tests::topology::gateway_ip;
use tests::{netns, require_kube, require_netns, Inventory, Netns, Policy, PolicyRule, TempDir};

/// The `egress-gateway` binary if it has `explain --kubeconfig`; otherwise why not.
fn explain_binary() -> Result<PathBuf, String> {
    let bin = tests::gateway_binary().map_err(|e| e.to_string())?;
    let path = bin.to_string_lossy().into_owned();
    let out = tests::cmd::output(&path, &["explain", "--help"]).map_err(|e| e.to_string())?;
    if !String::from_utf8_lossy(&out.stdout).contains("--kubeconfig") {
        return Err(format!(
            "{path} has no `explain --kubeconfig` yet (rebuild it: cargo build --release -p gateway)"
        ));
    }
    Ok(bin)
}

/// `egress-gateway explain --kubeconfig <kubeconfig> --pod <pod> --dst <dst> <extra>` in `ns` (where the
/// API server listens on loopback).
struct Explain<'a> {
    ns: &'a Netns,
    bin: &'a Path,
    /// The administrator's kubeconfig.
    admin: PathBuf,
    /// The API server's log.
    api_log: PathBuf,
}

impl Explain<'_> {
    fn run(&self, kubeconfig: &Path, pod: &str, dst: &str, extra: &[&str]) -> Output {
        let bin = self.bin.to_string_lossy();
        let kubeconfig = kubeconfig.to_string_lossy();
        let mut args = vec![
            "netns",
            "exec",
            self.ns.name(),
            &bin,
            "explain",
            "--kubeconfig",
            &kubeconfig,
            "--pod",
            pod,
            "--dst",
            dst,
        ];
        args.extend_from_slice(extra);
        tests::cmd::output("ip", &args).unwrap_or_else(|e| panic!("run explain: {e}"))
    }

    /// The explanation (stdout) for the admin; fails unless it exits 0 and contains every `want`.
    fn explains(&self, pod: &str, dst: &str, extra: &[&str], want: &[&str]) -> String {
        let out = self.run(&self.admin, pod, dst, extra);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        for w in want {
            if !out.status.success() || !stdout.contains(w) {
                self.fail(&format!("explain {pod} {dst} {extra:?}: want `{w}`"), &out);
            }
        }
        println!("explain {pod} → {dst} {extra:?}:\n{stdout}");
        stdout
    }

    /// Fails unless explaining as `kubeconfig` exits 1 with every `want` on stderr; returns stderr.
    fn refused(&self, kubeconfig: &Path, pod: &str, want: &[&str]) -> String {
        let out = self.run(kubeconfig, pod, "192.0.2.10", &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        for w in want {
            if out.status.code() != Some(1) || !stderr.contains(w) {
                self.fail(&format!("explain {pod}: want exit 1 and `{w}`"), &out);
            }
        }
        println!("explain {pod}: refused:\n{stderr}");
        stderr
    }

    fn fail(&self, what: &str, out: &Output) -> ! {
        panic!(
            "{what}; got {}\n---- stdout:\n{}\n---- stderr:\n{}\n---- kube-apiserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tests::process::tail(&self.api_log, 10)
        );
    }
}

#[test]
fn explain_reads_the_live_cluster() {
    require_netns!();
    let kubectl = require_kube!();
    let bin = match explain_binary() {
        Ok(bin) => bin,
        Err(why) => {
            let test = tests::privilege::current_test_name();
            if std::env::var("EGRESS_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("{test}: explain --kubeconfig is required but unusable: {why}");
            }
            tests::privilege::skipped(&test, &why);
            return;
        }
    };
    // Drop order (reverse): the API server stops, then its namespace goes, then the directory.
    let prefix = netns::unique_prefix();
    let dir = TempDir::new(&format!("{prefix}-explain")).expect("a directory");
    let ns = Netns::new(&format!("{prefix}-kube")).expect("a namespace for the API server");
    let mut api = ApiServer::start(&ns, &dir.path().join("kube"), &kubectl)
        .unwrap_or_else(|e| panic!("start kube-apiserver: {e}"));

    let private: IpNet = "10.0.0.0/8".parse().expect("a CIDR");
    let mut inventory = Inventory::new();
    inventory
        .policy(Policy::new(
            "red",
            vec![
                PolicyRule::no_gateway(private),
                PolicyRule::via(Ipv4Net::default(), "red"),
            ],
        ))
        // Its selector matches no gateway pod.
        .policy(Policy::new(
            "green",
            vec![PolicyRule::via(Ipv4Net::default(), "green")],
        ))
        .namespace_with_policy("app", "red")
        .client_pod_at("app", "web", 1, vec![IpAddr::from([10, 244, 1, 5])])
        .namespace_with_policy("other", "green")
        .client_pod_at("other", "x", 1, vec![IpAddr::from([10, 244, 1, 6])])
        .gateway_pod(1, "red", false)
        .gateway_pod(2, "blue", false);
    api.apply_inventory(&inventory)
        .expect("write the inventory to the API");
    let explain = Explain {
        ns: &ns,
        bin: &bin,
        admin: api.kubeconfig(),
        api_log: dir.path().join("kube/kube-apiserver.log"),
    };

    // Through the red gateway, found through the namespace's annotation and the policy in the API.
    let (gw1, gw2) = (gateway_ip(1), gateway_ip(2));
    let out = explain.explains(
        "app/web",
        "192.0.2.10",
        &[],
        &[
            "namespace annotation egress.projectcalico.org/egressGatewayPolicy",
            "policy:      red",
            "rule:        #2 (destination 0.0.0.0/0)",
            "via 1 gateway(s)",
            &format!("gateway egress/gw1  ip {gw1}  node gateway-node1"),
        ],
    );
    assert!(!out.contains("egress/gw2"), "{out}");
    // A destination whose rule has no gateway.
    explain.explains(
        "app/web",
        "10.1.2.3",
        &[],
        &[
            "rule:        #1 (destination 10.0.0.0/8)",
            "NoGateway (the matched rule has no gateway)",
        ],
    );
    // Only the gateway pods the selector lists are gateways.
    explain.explains(
        "app/web",
        "192.0.2.10",
        &["--gateway-selector", "egress-code=blue"],
        &["Blocked: no gateway matches"],
    );
    // A policy edit is seen at once: each run reads the cluster.
    let mut edited = Inventory::new();
    edited.policy(Policy::new(
        "red",
        vec![PolicyRule::via(Ipv4Net::default(), "blue")],
    ));
    api.apply_inventory(&edited).expect("edit policy red");
    explain.explains(
        "app/web",
        "192.0.2.10",
        &[],
        &[&format!("gateway egress/gw2  ip {gw2}  node gateway-node2")],
    );

    // A policy whose selector matches no gateway: blocked (fail closed).
    explain.explains(
        "other/x",
        "192.0.2.10",
        &[],
        &[
            "policy:      green",
            "Blocked: no gateway matches the rule's selectors",
            "nothing reaches the destination",
        ],
    );
    // An invalid policy (a Calico selector the CRD cannot check): blocked, as the agent reports it.
    api.apply(
        "apiVersion: projectcalico.org/v3\nkind: EgressGatewayPolicy\nmetadata:\n  name: broken\nspec:\n  \
         rules:\n  - gateway:\n      selector: \"egress-code == \"\n",
    )
    .expect("create policy broken (the CRD accepts it)");
    let mut bad = Inventory::new();
    bad.namespace_with_policy("bad", "broken").client_pod_at(
        "bad",
        "y",
        1,
        vec![IpAddr::from([10, 244, 1, 7])],
    );
    api.apply_inventory(&bad)
        .expect("namespace bad using broken");
    explain.explains(
        "bad/y",
        "192.0.2.10",
        &[],
        &[
            "policy:      broken",
            "Blocked: EgressGatewayPolicy 'broken' is invalid and not used",
            "selector",
        ],
    );

    // What does not exist is named.
    let admin = api.kubeconfig();
    explain.refused(&admin, "app/nope", &["pod nope not found in namespace app"]);
    explain.refused(&admin, "ghost/x", &["there is no namespace ghost"]);

    // RBAC: a service account without any grant is told the verb and the resource.
    api.kubectl(&["create", "serviceaccount", "-n", "app", "viewer"])
        .expect("create service account app/viewer");
    let viewer = api
        .service_account_kubeconfig("app", "viewer", &dir.path().join("viewer.kubeconfig"))
        .expect("a kubeconfig for app/viewer");
    let stderr = explain.refused(
        &viewer,
        "app/web",
        &[
            "pods: forbidden: the kubeconfig's user may not `get` pods in namespace app",
            "may not `list` pods in all namespaces (the gateway pods, egress-gateway/gateway=true)",
            "may not `list` namespaces",
            "may not `list` egressgatewaypolicies.projectcalico.org",
        ],
    );
    assert_eq!(
        stderr.matches("explain needs get and list on pods").count(),
        1,
        "what to grant, once: {stderr}"
    );

    // The API server is gone: said at once, exit 1.
    api.stop();
    let start = Instant::now();
    explain.refused(
        &admin,
        "app/web",
        &["cannot reach the Kubernetes API server at https://127.0.0.1:"],
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "explain took {took:?} with the API server down"
    );
}
