//! `tunnel.allowed_sources: kubernetes-nodes`: the tunnel admits VXLAN only from the InternalIP addresses of
//! the cluster's Node objects, learnt through a watch of Nodes (kube-rs `watcher`: list, then watch with
//! bookmarks; relist after `410 Gone`; backoff on errors) on a thread of its own with a small tokio runtime.
//! The data path never waits for it: the control loop takes each new set ([`Snapshot`]) and swaps the
//! pipeline, as a reload does. Until the first complete list the gateway admits no node and is not ready;
//! while the watch fails, the last set stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::mpsc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};

/// What the watch reports to the control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodesUpdate {
    /// The whole set of node addresses, after the first list and after every change to it.
    Snapshot(BTreeSet<Ipv4Addr>),
    /// The watch failed (retrying with backoff); the last set stays.
    Failed(String),
}

/// A Node's IPv4 InternalIP addresses (the addresses its kubelet reports; the tunnel's outer source is one).
pub(crate) fn internal_ips(node: &Node) -> Vec<Ipv4Addr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// The addresses of every node, by node name, kept from watch events.
#[derive(Debug, Default)]
pub(crate) struct NodeSet {
    listed: bool,
    nodes: BTreeMap<String, Vec<Ipv4Addr>>,
    listing: BTreeMap<String, Vec<Ipv4Addr>>,
}

impl NodeSet {
    /// Applies one watch event; returns the new set when it changed (or was listed for the first time).
    pub(crate) fn apply(&mut self, event: Event<Node>) -> Option<BTreeSet<Ipv4Addr>> {
        let before = self.set();
        match event {
            Event::Init => {
                self.listing.clear();
                return None;
            }
            Event::InitApply(n) => {
                self.listing.insert(n.name_any(), internal_ips(&n));
                return None;
            }
            Event::InitDone => {
                self.nodes = std::mem::take(&mut self.listing);
                if !self.listed {
                    self.listed = true;
                    return Some(self.set());
                }
            }
            Event::Apply(n) => {
                self.nodes.insert(n.name_any(), internal_ips(&n));
            }
            Event::Delete(n) => {
                self.nodes.remove(&n.name_any());
            }
        }
        let after = self.set();
        (self.listed && after != before).then_some(after)
    }

    fn set(&self) -> BTreeSet<Ipv4Addr> {
        self.nodes.values().flatten().copied().collect()
    }
}

/// Starts the watch on its own thread; its reports arrive on the returned channel. A configuration that
/// cannot make a client (no kubeconfig, not in a pod) is reported there too, once.
pub(crate) fn spawn(kubeconfig: Option<PathBuf>) -> std::io::Result<mpsc::Receiver<NodesUpdate>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("nodes-watch".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(NodesUpdate::Failed(format!("cannot start a runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(watch(kubeconfig, tx));
        })?;
    Ok(rx)
}

async fn watch(kubeconfig: Option<PathBuf>, tx: mpsc::Sender<NodesUpdate>) {
    let client = match crate::node::cluster::client(kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(NodesUpdate::Failed(e));
            return;
        }
    };
    let nodes: Api<Node> = Api::all(client);
    let stream = watcher(nodes, watcher::Config::default().any_semantic()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut set = NodeSet::default();
    while let Some(event) = stream.next().await {
        let update = match event {
            Ok(e) => match set.apply(e) {
                Some(s) => NodesUpdate::Snapshot(s),
                None => continue,
            },
            Err(e) => NodesUpdate::Failed(describe(&e)),
        };
        if tx.send(update).is_err() {
            return;
        }
    }
}

fn describe(e: &watcher::Error) -> String {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    match status {
        Some(403) => format!(
            "nodes: forbidden: the gateway may not list and watch nodes; grant get, list and watch on nodes to \
             its service account (docs/configuration.md). The API server said: {e}"
        ),
        _ => format!("nodes: {e}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn node(name: &str, addresses: &[(&str, &str)]) -> Node {
        let addresses: Vec<serde_json::Value> = addresses
            .iter()
            .map(|(t, a)| serde_json::json!({ "type": t, "address": a }))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "status": { "addresses": addresses }
        }))
        .unwrap()
    }

    fn ips(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn only_ipv4_internal_ips_count() {
        let n = node(
            "a",
            &[
                ("InternalIP", "172.18.0.2"),
                ("InternalIP", "fd00::2"),
                ("ExternalIP", "203.0.113.9"),
                ("Hostname", "a"),
                ("InternalIP", "not-an-ip"),
            ],
        );
        assert_eq!(
            internal_ips(&n),
            vec!["172.18.0.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(internal_ips(&node("b", &[])).is_empty());
    }

    #[test]
    fn nothing_before_the_first_list_then_every_change() {
        let mut s = NodeSet::default();
        assert_eq!(s.apply(Event::Init), None);
        assert_eq!(
            s.apply(Event::InitApply(node("a", &[("InternalIP", "10.0.0.1")]))),
            None
        );
        assert_eq!(
            s.apply(Event::InitApply(node("b", &[("InternalIP", "10.0.0.2")]))),
            None
        );
        assert_eq!(
            s.apply(Event::InitDone),
            Some(ips(&["10.0.0.1", "10.0.0.2"]))
        );
        // A status update that does not change the address: nothing to do.
        assert_eq!(
            s.apply(Event::Apply(node("a", &[("InternalIP", "10.0.0.1")]))),
            None
        );
        assert_eq!(
            s.apply(Event::Apply(node("c", &[("InternalIP", "10.0.0.3")]))),
            Some(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]))
        );
        assert_eq!(
            s.apply(Event::Delete(node("a", &[]))),
            Some(ips(&["10.0.0.2", "10.0.0.3"]))
        );
        // A relist keeps the old set until it is complete, then replaces it.
        assert_eq!(s.apply(Event::Init), None);
        assert_eq!(
            s.apply(Event::InitApply(node("d", &[("InternalIP", "10.0.0.4")]))),
            None
        );
        assert_eq!(s.set(), ips(&["10.0.0.2", "10.0.0.3"]));
        assert_eq!(s.apply(Event::InitDone), Some(ips(&["10.0.0.4"])));
        // An empty first list is a (complete, empty) set too.
        let mut e = NodeSet::default();
        e.apply(Event::Init);
        assert_eq!(e.apply(Event::InitDone), Some(BTreeSet::new()));
    }
}
