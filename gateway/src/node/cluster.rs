//! The cluster as one node agent needs it, from the Kubernetes API server: four watches, each a list and
//! then a watch from its resourceVersion (kube-rs [`watcher`]: watch bookmarks, relist after `410 Gone`,
//! backoff on errors).
//!
//! | watch | what | scales with |
//! |---|---|---|
//! | this node's pods | `v1` Pods, `fieldSelector=spec.nodeName=<node>` | the node's pods |
//! | gateway pods | `v1` Pods matching `kubernetes.gateway_selector`, all namespaces | the gateways |
//! | namespaces | `v1` Namespaces, metadata only (labels, annotations) | the namespaces |
//! | policies | `projectcalico.org/v3` EgressGatewayPolicies | the policies |
//!
//! No watch sees the other nodes' client pods, so an agent's memory and API traffic do not grow with the
//! size of the cluster; after the first list each watch costs only the changes to what it selects.
//!
//! The watch tasks ([`spawn`]) only convert objects and send [`Update`]s; the agent's loop applies them to
//! its [`ClusterView`] (pure, tested without a server) and replans. Each object is converted on its own: an
//! invalid policy is kept as invalid under its name ([`ClusterView::invalid_policies`]), so the pods that
//! name it are blocked (the policy is missing to the resolution, which fails closed) while everything else
//! keeps converging. A watch that fails keeps what it last knew (fail static); the view counts as synced
//! once every watch has listed once, and the agent writes nothing to the kernel before that.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::IpAddr;
use std::path::Path;

use forwarder_core::policy::{EgressGatewayPolicy, Inventory, Labels, Namespace, Pod};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PartialObjectMeta};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config, ResourceExt};
use tokio::sync::mpsc;

use crate::config::node::KubernetesSettings;
use crate::inventory;

/// One of the four watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Watch {
    /// Pods on this node.
    NodePods,
    /// Gateway pods, cluster-wide.
    GatewayPods,
    /// Namespaces (metadata).
    Namespaces,
    /// EgressGatewayPolicies.
    Policies,
}

impl Watch {
    /// Every watch, in the order they are reported.
    pub(crate) const ALL: [Watch; 4] = [
        Watch::NodePods,
        Watch::GatewayPods,
        Watch::Namespaces,
        Watch::Policies,
    ];

    /// The name in logs and metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Watch::NodePods => "node_pods",
            Watch::GatewayPods => "gateway_pods",
            Watch::Namespaces => "namespaces",
            Watch::Policies => "egressgatewaypolicies",
        }
    }

    /// The API resource behind it, as RBAC names it.
    pub(crate) fn resource(self) -> &'static str {
        match self {
            Watch::NodePods | Watch::GatewayPods => "pods",
            Watch::Namespaces => "namespaces",
            Watch::Policies => "egressgatewaypolicies.projectcalico.org",
        }
    }
}

/// A pod that is terminating: `metadata.deletionTimestamp` is set. RFC 3339 times, as Calico Enterprise
/// writes them into its maintenance annotations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Terminating {
    /// When it started terminating: the deletion time less the grace period.
    pub(crate) started: String,
    /// When it will be gone: `deletionTimestamp`.
    pub(crate) finished: String,
}

/// An object's `metadata.uid`: Events name the object they are about by it (`kubectl describe` finds
/// them by it).
pub(crate) type Uid = String;

/// One object as the agent keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Object {
    /// A pod that has (or will have) addresses, whether it is terminating, and its uid.
    Pod(Pod, Option<Box<Terminating>>, Uid),
    /// A namespace.
    Namespace(Namespace),
    /// A policy, or why it is invalid; and its uid.
    Policy(Result<EgressGatewayPolicy, String>, Uid),
}

/// What a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// A complete list (the first one, or after the watch had to start again): replaces everything.
    Listed(Vec<(String, Object)>),
    /// An object was added or changed.
    Applied(String, Object),
    /// An object was deleted (or left what the watch selects, e.g. a pod that finished).
    Deleted(String),
    /// The watch failed and will retry with backoff; what it knew stays in use.
    Failed(String),
    /// The API server no longer has the watch's resourceVersion (`410 Gone`: its watch cache or etcd has
    /// moved past it, e.g. after compaction or its own restart). The watch lists again; until that list is
    /// complete, what it knew stays in use.
    Expired(String),
}

/// A watch's report to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Update {
    /// Which watch.
    pub(crate) watch: Watch,
    /// What it saw.
    pub(crate) change: Change,
}

/// What one watch knows.
#[derive(Debug, Default)]
struct Store {
    listed: bool,
    objects: BTreeMap<String, Object>,
    error: Option<String>,
}

/// What the agent knows of the cluster: the union of its watches.
#[derive(Debug, Default)]
pub(crate) struct ClusterView {
    stores: BTreeMap<Watch, Store>,
}

impl ClusterView {
    /// Applies a watch's report; returns whether what the agent plans from changed. A failure changes
    /// nothing but is remembered ([`ClusterView::errors`]) until the watch reports again.
    pub(crate) fn apply(&mut self, update: Update) -> bool {
        let store = self.stores.entry(update.watch).or_default();
        match update.change {
            Change::Listed(objects) => {
                let objects: BTreeMap<String, Object> = objects.into_iter().collect();
                let changed = !store.listed || store.objects != objects;
                store.listed = true;
                store.objects = objects;
                store.error = None;
                changed
            }
            Change::Applied(key, object) => {
                store.error = None;
                store.objects.insert(key, object.clone()) != Some(object)
            }
            Change::Deleted(key) => {
                store.error = None;
                store.objects.remove(&key).is_some()
            }
            Change::Failed(message) => {
                store.error = Some(message);
                false
            }
            Change::Expired(_) => false,
        }
    }

    /// Whether every watch has listed once (what is known is then the whole of what the agent needs).
    pub(crate) fn synced(&self) -> bool {
        Watch::ALL
            .iter()
            .all(|w| self.stores.get(w).is_some_and(|s| s.listed))
    }

    /// The watches that have not listed yet.
    pub(crate) fn unsynced(&self) -> Vec<Watch> {
        Watch::ALL
            .into_iter()
            .filter(|w| !self.stores.get(w).is_some_and(|s| s.listed))
            .collect()
    }

    /// The last error of each watch that has not recovered since.
    pub(crate) fn errors(&self) -> Vec<(Watch, &str)> {
        self.stores
            .iter()
            .filter_map(|(w, s)| s.error.as_deref().map(|e| (*w, e)))
            .collect()
    }

    /// Objects held by each watch.
    pub(crate) fn counts(&self) -> Vec<(Watch, usize)> {
        Watch::ALL
            .into_iter()
            .map(|w| (w, self.stores.get(&w).map_or(0, |s| s.objects.len())))
            .collect()
    }

    /// Gateway pods that are terminating, by IPv4 address.
    pub(crate) fn terminating_gateways(&self) -> BTreeMap<std::net::Ipv4Addr, Terminating> {
        let mut out = BTreeMap::new();
        for (_, object) in self.objects(Watch::GatewayPods) {
            if let Object::Pod(p, Some(t), _) = object {
                for ip in &p.ip {
                    if let IpAddr::V4(a) = ip {
                        out.insert(*a, Terminating::clone(t));
                    }
                }
            }
        }
        out
    }

    /// This node's pod `namespace/name`, as last seen.
    pub(crate) fn node_pod(&self, key: &(String, String)) -> Option<&Pod> {
        self.node_pod_uid(key).map(|(p, _)| p)
    }

    /// This node's pod `namespace/name` and its uid.
    pub(crate) fn node_pod_uid(&self, key: &(String, String)) -> Option<(&Pod, &str)> {
        let name = format!("{}/{}", key.0, key.1);
        match self.stores.get(&Watch::NodePods)?.objects.get(&name)? {
            Object::Pod(p, _, uid) => Some((p, uid.as_str())),
            _ => None,
        }
    }

    /// Invalid policies by name, with the problem.
    pub(crate) fn invalid_policies(&self) -> Vec<(&str, &str)> {
        self.objects(Watch::Policies)
            .filter_map(|(name, o)| match o {
                Object::Policy(Err(why), _) => Some((name, why.as_str())),
                _ => None,
            })
            .collect()
    }

    /// The policy `name`, if it exists but is invalid: why, and its uid.
    pub(crate) fn invalid_policy(&self, name: &str) -> Option<(&str, &str)> {
        match self.stores.get(&Watch::Policies)?.objects.get(name)? {
            Object::Policy(Err(why), uid) => Some((why.as_str(), uid.as_str())),
            _ => None,
        }
    }

    fn objects(&self, watch: Watch) -> impl Iterator<Item = (&str, &Object)> {
        self.stores
            .get(&watch)
            .into_iter()
            .flat_map(|s| s.objects.iter().map(|(k, o)| (k.as_str(), o)))
    }

    /// `base` (objects from input files) with the cluster's objects added; the cluster's win on equal
    /// names. Invalid policies are left out, which blocks the pods that name them.
    pub(crate) fn inventory(&self, base: &Inventory) -> Inventory {
        let mut inventory = base.clone();
        for watch in Watch::ALL {
            for (_, object) in self.objects(watch) {
                match object {
                    Object::Pod(p, _, _) => {
                        inventory.insert_pod(p.clone());
                    }
                    Object::Namespace(n) => {
                        inventory.insert_namespace(n.clone());
                    }
                    Object::Policy(Ok(p), _) => {
                        inventory.insert_policy(p.clone());
                    }
                    Object::Policy(Err(_), _) => {}
                }
            }
        }
        inventory
    }
}

// ---------------------------------------------------------------------------------------------------
// Conversions (pure)
// ---------------------------------------------------------------------------------------------------

/// A pod's key and what the agent keeps of it; `None` for a pod that has finished (phase Succeeded or
/// Failed: its addresses may already belong to another pod).
pub(crate) fn pod(p: &K8sPod) -> (String, Option<Object>) {
    let namespace = p.namespace().unwrap_or_else(|| "default".to_string());
    let name = p.name_any();
    let key = format!("{namespace}/{name}");
    let status = p.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return (key, None);
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(s) = status {
        let listed = s.pod_ips.iter().flatten().map(|i| i.ip.as_str());
        for ip in s.pod_ip.as_deref().into_iter().chain(listed) {
            // The API server validates pod IPs; anything else is ignored rather than trusted.
            if let Ok(ip) = ip.parse::<IpAddr>() {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
    }
    let pod = Pod {
        namespace,
        name,
        labels: labels(p.metadata.labels.as_ref()),
        annotations: annotations(p.metadata.annotations.as_ref()),
        ip: ips,
        node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
        host_ip: status
            .and_then(|s| s.host_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
    };
    (
        key,
        Some(Object::Pod(
            pod,
            terminating(&p.metadata).map(Box::new),
            p.metadata.uid.clone().unwrap_or_default(),
        )),
    )
}

/// The terminating window of an object being deleted gracefully.
fn terminating(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<Terminating> {
    let finished = meta.deletion_timestamp.as_ref()?.0;
    let grace = meta.deletion_grace_period_seconds.unwrap_or(0);
    let started = finished
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(grace))
        .unwrap_or(finished);
    Some(Terminating {
        started: started.to_string(),
        finished: finished.to_string(),
    })
}

/// A namespace's name and its labels and annotations.
pub(crate) fn namespace(n: &PartialObjectMeta<K8sNamespace>) -> (String, Option<Object>) {
    let name = n.name_any();
    let ns = Namespace {
        name: name.clone(),
        labels: labels(n.metadata.labels.as_ref()),
        annotations: annotations(n.metadata.annotations.as_ref()),
    };
    (name, Some(Object::Namespace(ns)))
}

/// A policy's name and the policy, or what is wrong with it: the same checks as a policy in an input
/// file (the inventory reader's), which is also what `egress-gateway check` runs.
pub(crate) fn policy(p: &DynamicObject) -> (String, Option<Object>) {
    let name = p.name_any();
    let object = serde_json::json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "EgressGatewayPolicy",
        "metadata": { "name": name },
        "spec": p.data.get("spec").cloned().unwrap_or(serde_json::Value::Null),
    });
    let text = serde_json::to_string_pretty(&object).unwrap_or_default();
    let parsed = match inventory::parse(&text, Path::new("")) {
        Ok(mut contents) if contents.policies.len() == 1 => contents
            .policies
            .pop()
            .ok_or_else(|| "no policy".to_string()),
        Ok(_) => Err("the object is not a policy".to_string()),
        // The line numbers are of the JSON above, which nobody sees: the messages name the field.
        Err(errors) => Err(errors
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")),
    };
    let uid = p.metadata.uid.clone().unwrap_or_default();
    (name, Some(Object::Policy(parsed, uid)))
}

fn labels(map: Option<&BTreeMap<String, String>>) -> Labels {
    map.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// Annotations, without `kubectl apply`'s copy of the whole object (often the largest thing a pod or
/// namespace carries, and never used here).
fn annotations(map: Option<&BTreeMap<String, String>>) -> Labels {
    let mut out = labels(map);
    out.remove(LAST_APPLIED);
    out
}

/// The annotation `kubectl apply` keeps the applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A watch error as the operator needs it: a missing permission names the verb and resource to grant, a
/// missing CRD says which manifest installs it.
pub(crate) fn describe(watch: Watch, e: &watcher::Error) -> String {
    let (verb, status) = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => ("list", Some(s.as_ref())),
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => ("watch", Some(s.as_ref())),
        watcher::Error::WatchError(s) => ("watch", Some(s.as_ref())),
        _ => ("watch", None),
    };
    let resource = watch.resource();
    match status.map(|s| s.code) {
        Some(401) => format!(
            "{resource}: the API server does not accept the agent's credentials (401): {e}; check the service \
             account token or the kubeconfig"
        ),
        Some(403) => format!(
            "{resource}: forbidden: the agent may not `{verb}` {resource}; grant get, list and watch on \
             {resource} to its service account (deploy/node-agent/rbac.yaml). The API server said: {e}"
        ),
        Some(404) if watch == Watch::Policies => format!(
            "{resource}: the API server does not serve EgressGatewayPolicies: install the CRD \
             (deploy/crds/egressgatewaypolicies.yaml) or Calico's API server. The API server said: {e}"
        ),
        _ => format!("{resource}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------------
// The watches (I/O)
// ---------------------------------------------------------------------------------------------------

/// A client for the API server `kubeconfig` names (`None`: `$KUBECONFIG`, `~/.kube/config`, or the pod's
/// service account). Nothing is sent yet: an unreachable server shows as watch errors later, not as a
/// failure here. The gateway's Node watch uses it too.
pub(crate) async fn client(kubeconfig: Option<&Path>) -> Result<Client, String> {
    client_for(kubeconfig, "kubernetes.kubeconfig")
        .await
        .map(|(client, _)| client)
}

/// [`client`], and the API server's URL; messages name `setting` as where `kubeconfig` came from
/// (`egress-gateway explain` gives `--kubeconfig`).
pub(crate) async fn client_for(
    kubeconfig: Option<&Path>,
    setting: &str,
) -> Result<(Client, String), String> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| format!("{setting} {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("{setting} {}: {e}", path.display()))?
        }
        None => Config::infer().await.map_err(|e| {
            format!(
                "no Kubernetes API configuration: no usable $KUBECONFIG or ~/.kube/config, and not in a pod \
                 with a service account ({e}); set {setting}"
            )
        })?,
    };
    let server = config.cluster_url.to_string();
    let client =
        Client::try_from(config).map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
    Ok((client, server))
}

/// EgressGatewayPolicies as the API serves them (deploy/crds/egressgatewaypolicies.yaml): cluster-scoped.
pub(crate) fn policies_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("projectcalico.org", "v3", "EgressGatewayPolicy");
    ApiResource::from_gvk_with_plural(&gvk, "egressgatewaypolicies")
}

/// Starts the four watches on the current runtime; each sends its [`Update`]s to `tx` until the receiver
/// is dropped.
pub(crate) fn spawn(
    client: &Client,
    node: &str,
    settings: &KubernetesSettings,
    tx: &mpsc::UnboundedSender<Update>,
) {
    // Lists with resourceVersion=0 ("any"), as client-go's informers start: served from the API server's
    // watch cache, not a quorum read of etcd; the watch that follows brings the view up to date.
    let config = || watcher::Config::default().any_semantic();
    let pods: Api<K8sPod> = Api::all(client.clone());
    let own = config().fields(&format!("spec.nodeName={node}"));
    tokio::spawn(forward(
        watcher(pods.clone(), own).default_backoff(),
        Watch::NodePods,
        tx.clone(),
        pod,
    ));
    let gateways = config().labels(&settings.gateway_selector);
    tokio::spawn(forward(
        watcher(pods, gateways).default_backoff(),
        Watch::GatewayPods,
        tx.clone(),
        pod,
    ));
    // Metadata only: `Api<PartialObjectMeta<_>>` asks for PartialObjectMetadata.
    let namespaces: Api<PartialObjectMeta<K8sNamespace>> = Api::all(client.clone());
    tokio::spawn(forward(
        watcher(namespaces, config()).default_backoff(),
        Watch::Namespaces,
        tx.clone(),
        namespace,
    ));
    let policies: Api<DynamicObject> = Api::all_with(client.clone(), &policies_resource());
    tokio::spawn(forward(
        watcher(policies, config()).default_backoff(),
        Watch::Policies,
        tx.clone(),
        policy,
    ));
}

/// Turns one watch's events into [`Update`]s: the objects of a (re)list are collected and sent as one
/// [`Change::Listed`] when the list is complete, so a relist never shows a half-empty cluster.
async fn forward<S, K>(
    stream: S,
    watch: Watch,
    tx: mpsc::UnboundedSender<Update>,
    convert: fn(&K) -> (String, Option<Object>),
) where
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
    K: Debug,
{
    let mut stream = std::pin::pin!(stream);
    let mut listing: Vec<(String, Object)> = Vec::new();
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(Event::InitApply(o)) => {
                if let (key, Some(object)) = convert(&o) {
                    listing.push((key, object));
                }
                continue;
            }
            Ok(Event::InitDone) => Change::Listed(std::mem::take(&mut listing)),
            Ok(Event::Apply(o)) => match convert(&o) {
                (key, Some(object)) => Change::Applied(key, object),
                (key, None) => Change::Deleted(key),
            },
            Ok(Event::Delete(o)) => Change::Deleted(convert(&o).0),
            Err(watcher::Error::WatchError(s)) if s.code == 410 => Change::Expired(format!(
                "{}: {} (410 Gone); listing again",
                watch.resource(),
                s.message
            )),
            Err(e) => Change::Failed(describe(watch, &e)),
        };
        if tx.send(Update { watch, change }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
