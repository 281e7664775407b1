//! `egress-gateway explain --kubeconfig [FILE]`: the objects an explanation needs, read once from the live
//! cluster as kubectl would (its kubeconfig, or `$KUBECONFIG`, `~/.kube/config`, the pod's service account).
//! Each list is converted and assembled exactly as the node agent's first list of the matching watch is
//! ([`cluster::pod`], [`cluster::namespace`], [`cluster::policy`] into a [`ClusterView`]), so the inventory
//! explained is the one the agent plans from: an invalid policy is left out, which blocks the pods that name
//! it.
//!
//! | request | what | the agent's watch |
//! |---|---|---|
//! | GET | `v1` Pod NAMESPACE/NAME | this node's pods |
//! | LIST | `v1` Pods matching the gateway selector, all namespaces | gateway pods |
//! | LIST | `v1` Namespaces, metadata only | namespaces |
//! | LIST | `projectcalico.org/v3` EgressGatewayPolicies | policies |
//!
//! The whole read, connecting included, must finish within [`TIMEOUT`]: a dead API server does not hang
//! the command.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use kube::api::{DynamicObject, ListParams, PartialObjectMeta};
use kube::{Api, Client};

use crate::node::cluster::{self, Change, ClusterView, Object, Update, Watch};

/// What a user needs to be granted, said once after the requests refused.
const EXPLAIN_NEEDS: &str = "explain needs get and list on pods, and list on namespaces and \
                             egressgatewaypolicies.projectcalico.org";

/// How long the whole read may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// The objects read from the API server, as it returned them.
#[derive(Debug)]
struct Objects {
    pod: K8sPod,
    gateways: Vec<K8sPod>,
    namespaces: Vec<PartialObjectMeta<K8sNamespace>>,
    policies: Vec<DynamicObject>,
}

/// Reads pod `namespace/name` and what decides its egress from the cluster `kubeconfig` names (`None`: as
/// kubectl infers it), within [`TIMEOUT`]; every problem as one line for the operator.
pub(crate) fn read(
    kubeconfig: Option<&Path>,
    gateway_selector: &str,
    namespace: &str,
    name: &str,
) -> Result<ClusterView, Vec<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| vec![format!("cannot start a runtime: {e}")])?;
    runtime.block_on(read_within(
        TIMEOUT,
        kubeconfig,
        gateway_selector,
        namespace,
        name,
    ))
}

async fn read_within(
    timeout: Duration,
    kubeconfig: Option<&Path>,
    gateway_selector: &str,
    namespace: &str,
    name: &str,
) -> Result<ClusterView, Vec<String>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let secs = timeout.as_secs_f64();
    // An exec credential plugin in the kubeconfig runs here: it is held to the same deadline.
    let client = tokio::time::timeout_at(deadline, cluster::client_for(kubeconfig, "--kubeconfig"));
    let (client, server) = client
        .await
        .map_err(|_| {
            vec![format!(
                "no Kubernetes API client within {secs} s: does the kubeconfig run a credential plugin \
                 that hangs?"
            )]
        })?
        .map_err(|e| vec![e])?;
    let objects = tokio::time::timeout_at(
        deadline,
        fetch(&client, &server, gateway_selector, namespace, name),
    )
    .await
    .map_err(|_| {
        vec![format!(
            "the Kubernetes API server at {server} did not answer within {secs} s: is it running, and \
             reachable from here?"
        )]
    })??;
    view(&objects, namespace, name).map_err(|e| vec![e])
}

/// The four requests, at once; each error described once.
async fn fetch(
    client: &Client,
    server: &str,
    gateway_selector: &str,
    namespace: &str,
    name: &str,
) -> Result<Objects, Vec<String>> {
    let here: Api<K8sPod> = Api::namespaced(client.clone(), namespace);
    let pods: Api<K8sPod> = Api::all(client.clone());
    let namespaces: Api<K8sNamespace> = Api::all(client.clone());
    let policies: Api<DynamicObject> = Api::all_with(client.clone(), &cluster::policies_resource());
    let all = ListParams::default();
    let selected = ListParams::default().labels(gateway_selector);
    let (pod, gateways, namespaces, policies) = tokio::join!(
        here.get(name),
        pods.list(&selected),
        namespaces.list_metadata(&all),
        policies.list(&all),
    );
    let forbidden =
        forbidden(&pod) || forbidden(&gateways) || forbidden(&namespaces) || forbidden(&policies);
    let namespaces = namespaces.map_err(|e| describe(Watch::Namespaces, "list", "", &e, server));
    let pod = pod.map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 404 => {
            let exists = namespaces.as_ref().map_or(true, |list| {
                list.items
                    .iter()
                    .any(|n| n.metadata.name.as_deref() == Some(namespace))
            });
            if exists {
                format!("pod {name} not found in namespace {namespace}")
            } else {
                format!("pod {namespace}/{name} not found: there is no namespace {namespace}")
            }
        }
        _ => describe(
            Watch::NodePods,
            "get",
            &format!(" in namespace {namespace}"),
            &e,
            server,
        ),
    });
    let gateways = gateways.map_err(|e| {
        describe(
            Watch::GatewayPods,
            "list",
            &format!(" in all namespaces (the gateway pods, {gateway_selector})"),
            &e,
            server,
        )
    });
    let policies = policies.map_err(|e| describe(Watch::Policies, "list", "", &e, server));
    match (pod, gateways, namespaces, policies) {
        (Ok(pod), Ok(gateways), Ok(namespaces), Ok(policies)) => Ok(Objects {
            pod,
            gateways: gateways.items,
            namespaces: namespaces.items,
            policies: policies.items,
        }),
        (pod, gateways, namespaces, policies) => {
            let mut errors: Vec<String> = Vec::new();
            let all = [pod.err(), gateways.err(), namespaces.err(), policies.err()];
            // An unreachable server fails every request alike: say it once.
            for e in all.into_iter().flatten() {
                if !errors.contains(&e) {
                    errors.push(e);
                }
            }
            if forbidden {
                errors.push(EXPLAIN_NEEDS.to_owned());
            }
            Err(errors)
        }
    }
}

/// Whether the API server refused the request (403).
fn forbidden<T>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 403)
}

/// The agent's view of what was read: each list converted as the first list of its watch is, and applied
/// to a [`ClusterView`] as that watch's [`Change::Listed`]. The pod alone is this node's pods.
fn view(objects: &Objects, namespace: &str, name: &str) -> Result<ClusterView, String> {
    let (key, Some(client)) = cluster::pod(&objects.pod) else {
        let phase = objects
            .pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("?");
        return Err(format!(
            "pod {namespace}/{name} has finished (phase {phase}): the node agent routes it no longer (its \
             addresses may already be another pod's)"
        ));
    };
    let mut view = ClusterView::default();
    let mut listed = |watch: Watch, objects: Vec<(String, Object)>| {
        view.apply(Update {
            watch,
            change: Change::Listed(objects),
        });
    };
    listed(Watch::NodePods, vec![(key, client)]);
    listed(
        Watch::GatewayPods,
        converted(&objects.gateways, cluster::pod),
    );
    listed(
        Watch::Namespaces,
        converted(&objects.namespaces, cluster::namespace),
    );
    listed(
        Watch::Policies,
        converted(&objects.policies, cluster::policy),
    );
    Ok(view)
}

/// A list's objects as the agent keeps them (finished pods left out, as a watch leaves them out).
fn converted<K>(items: &[K], convert: fn(&K) -> (String, Option<Object>)) -> Vec<(String, Object)> {
    items
        .iter()
        .filter_map(|o| match convert(o) {
            (key, Some(object)) => Some((key, object)),
            (_, None) => None,
        })
        .collect()
}

/// A failed request as the operator needs it: a missing permission names the verb and resource (and
/// where), an unreachable server says so, a missing CRD says which manifest installs it.
fn describe(watch: Watch, verb: &str, scope: &str, e: &kube::Error, server: &str) -> String {
    let resource = watch.resource();
    match e {
        kube::Error::Api(s) => match s.code {
            401 => format!(
                "{resource}: the API server at {server} does not accept the kubeconfig's credentials (401): \
                 {}; check its user (token, certificate) and context",
                s.message
            ),
            403 => format!(
                "{resource}: forbidden: the kubeconfig's user may not `{verb}` {resource}{scope}. The API \
                 server said: {}",
                s.message
            ),
            404 if watch == Watch::Policies => format!(
                "{resource}: the API server does not serve EgressGatewayPolicies: install the CRD \
                 (deploy/crds/egressgatewaypolicies.yaml) or Calico's API server. The API server said: {}",
                s.message
            ),
            code => format!("{resource}: `{verb}` failed ({code}): {}", s.message),
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => format!(
            "cannot reach the Kubernetes API server at {server}: {}",
            chain(e)
        ),
        _ => format!("{resource}: `{verb}` failed: {}", chain(e)),
    }
}

/// An error and its sources, each once (kube's and hyper's messages often repeat their source's).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::path::PathBuf;

    use forwarder_core::policy::Inventory;
    use kube::core::Status;
    use serde_json::json;

    use super::*;
    use crate::explain::explain;

    fn k8s_pod(namespace: &str, name: &str, labels: serde_json::Value, ip: &str) -> K8sPod {
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": namespace, "labels": labels },
            "spec": { "nodeName": "node-a", "containers": [] },
            "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }], "hostIP": "172.18.0.2" }
        }))
        .expect("a pod")
    }

    fn ns(name: &str, policy: Option<&str>) -> PartialObjectMeta<K8sNamespace> {
        let mut meta = PartialObjectMeta::<K8sNamespace>::default();
        meta.metadata.name = Some(name.to_owned());
        meta.metadata.annotations = policy.map(|p| {
            [(
                "egress.projectcalico.org/egressGatewayPolicy".to_owned(),
                p.to_owned(),
            )]
            .into()
        });
        meta
    }

    fn k8s_policy(name: &str, selector: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "EgressGatewayPolicy",
            "metadata": { "name": name },
            "spec": { "rules": [
                { "destination": { "cidr": "10.0.0.0/8" } },
                { "gateway": { "selector": selector,
                               "namespaceSelector": "projectcalico.org/name == 'egress'" } }
            ]}
        }))
        .expect("a policy")
    }

    /// app/web in namespace app (policy `policy`), gateway egress/gw1 labelled red, and `policies`.
    fn objects(policy: &str, policies: Vec<DynamicObject>) -> Objects {
        Objects {
            pod: k8s_pod("app", "web", json!({ "app": "web" }), "10.244.1.5"),
            gateways: vec![k8s_pod(
                "egress",
                "gw1",
                json!({ "egress-code": "red", "egress-gateway/gateway": "true" }),
                "172.18.0.3",
            )],
            namespaces: vec![ns("app", Some(policy)), ns("egress", None)],
            policies,
        }
    }

    fn explained(view: &ClusterView, dst: &str) -> String {
        let inventory = view.inventory(&Inventory::new());
        explain(
            &inventory,
            &view.invalid_policies(),
            "app/web",
            dst.parse().expect("an address"),
        )
        .expect("explained")
    }

    #[test]
    fn the_lists_make_the_agents_view() {
        let objects = objects("red", vec![k8s_policy("red", "egress-code == 'red'")]);
        let view = view(&objects, "app", "web").expect("a view");
        assert!(view.synced(), "every watch listed");
        let out = explained(&view, "192.0.2.1");
        assert!(out.contains("policy:      red"), "{out}");
        assert!(
            out.contains("gateway egress/gw1  ip 172.18.0.3  node node-a"),
            "{out}"
        );
        let out = explained(&view, "10.1.2.3");
        assert!(out.contains("NoGateway"), "{out}");
    }

    #[test]
    fn an_invalid_policy_blocks_as_the_agent_says() {
        let objects = objects("broken", vec![k8s_policy("broken", "egress-code == ")]);
        let view = view(&objects, "app", "web").expect("a view");
        let out = explained(&view, "192.0.2.1");
        assert!(
            out.contains("Blocked: EgressGatewayPolicy 'broken' is invalid and not used"),
            "{out}"
        );
        // A missing policy is only missing.
        let objects = objects_without_policies("gone");
        let out = explained(&view_of(&objects), "192.0.2.1");
        assert!(
            out.contains("Blocked: EgressGatewayPolicy 'gone' does not exist"),
            "{out}"
        );
    }

    fn objects_without_policies(policy: &str) -> Objects {
        objects(policy, Vec::new())
    }

    fn view_of(objects: &Objects) -> ClusterView {
        view(objects, "app", "web").expect("a view")
    }

    #[test]
    fn a_finished_pod_is_not_explained() {
        let mut objects = objects_without_policies("red");
        objects.pod.status.as_mut().expect("status").phase = Some("Succeeded".to_owned());
        let e = view(&objects, "app", "web").expect_err("finished");
        assert!(e.contains("app/web has finished (phase Succeeded)"), "{e}");
    }

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Status::failure(message, "Reason").with_code(code).boxed())
    }

    #[test]
    fn errors_name_what_is_missing() {
        let server = "https://127.0.0.1:6443/";
        let e = describe(
            Watch::NodePods,
            "get",
            " in namespace app",
            &api_error(
                403,
                "pods \"web\" is forbidden: User \"u\" cannot get resource",
            ),
            server,
        );
        assert!(
            e.starts_with(
                "pods: forbidden: the kubeconfig's user may not `get` pods in namespace app. The API \
                 server said: "
            ),
            "{e}"
        );
        assert!(e.contains("cannot get resource"), "{e}");
        let e = describe(
            Watch::Policies,
            "list",
            "",
            &api_error(404, "the server could not find the requested resource"),
            server,
        );
        assert!(e.contains("deploy/crds/egressgatewaypolicies.yaml"), "{e}");
        let e = describe(
            Watch::Namespaces,
            "list",
            "",
            &api_error(401, "Unauthorized"),
            server,
        );
        assert!(
            e.contains("does not accept the kubeconfig's credentials (401)"),
            "{e}"
        );
    }

    /// A kubeconfig for `https://127.0.0.1:<port>` (any certificate).
    fn kubeconfig(port: u16, test: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "egress-explain-{}-{test}.kubeconfig",
            std::process::id()
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    \
             insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  \
             context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }

    fn read_from(path: &Path, timeout: Duration) -> Vec<String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let result = runtime.block_on(read_within(
            timeout,
            Some(path),
            "egress-gateway/gateway=true",
            "app",
            "web",
        ));
        let _ = std::fs::remove_file(path);
        result.expect_err("no API server")
    }

    #[test]
    fn a_silent_server_times_out() {
        // Connections complete in the kernel's backlog; nothing ever answers the TLS handshake.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("port").port();
        let path = kubeconfig(port, "silent");
        let errors = read_from(&path, Duration::from_millis(300));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains(&format!(
                "at https://127.0.0.1:{port}/ did not answer within 0.3 s"
            )),
            "{errors:?}"
        );
    }

    #[test]
    fn an_unreachable_server_says_so_once() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("port").port()
        };
        let path = kubeconfig(port, "refused");
        let errors = read_from(&path, Duration::from_secs(5));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(&format!(
                "cannot reach the Kubernetes API server at https://127.0.0.1:{port}/"
            )),
            "{errors:?}"
        );
    }

    #[test]
    fn a_missing_kubeconfig_is_named() {
        let errors = read_from(Path::new("/nonexistent/kubeconfig"), Duration::from_secs(5));
        assert!(
            errors[0].starts_with("--kubeconfig /nonexistent/kubeconfig: "),
            "{errors:?}"
        );
    }
}
