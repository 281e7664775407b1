//! `egress-gateway explain (--inputs FILE... | --kubeconfig [FILE]) --pod NAMESPACE/NAME --dst IP`: what
//! happens to one pod's traffic to one destination, and why, from Kubernetes objects alone: inventory files
//! (offline), or the live cluster read once as the node agent reads it (`live.rs`). Every gateway counts as
//! healthy: only the agent probes them.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use forwarder_core::policy::{AnnotationSource, BlockReason, Decision, Inventory, Pod, Preference};

use crate::inventory;

mod live;

/// Where the objects come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// Inventory files.
    Files(Vec<PathBuf>),
    /// The live cluster.
    Cluster {
        /// A kubeconfig (its current context); `None`: `$KUBECONFIG`, `~/.kube/config`, or the pod's
        /// service account, as kubectl infers it.
        kubeconfig: Option<PathBuf>,
        /// The label selector of the gateway pods (the node agent's `kubernetes.gateway_selector`).
        gateway_selector: String,
    },
}

/// Reads the objects and prints the explanation; exit 1 when they cannot be read (an input has errors, the
/// API server refuses or does not answer) or the pod is not found.
pub(crate) fn run(source: &Source, pod: &str, dst: IpAddr) -> ExitCode {
    let fail = |errors: &[String], what: &str| {
        for e in errors {
            eprintln!("{e}");
        }
        eprintln!("egress-gateway explain: {what}");
        ExitCode::FAILURE
    };
    let view;
    let (inventory, invalid) = match source {
        Source::Files(inputs) => match inventory::load_files(inputs) {
            Ok(i) => (i, Vec::new()),
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                return fail(&errors, "the inputs have errors");
            }
        },
        Source::Cluster {
            kubeconfig,
            gateway_selector,
        } => {
            let (namespace, name) = match pod_key(pod) {
                Ok(key) => key,
                Err(message) => return fail(&[], &message),
            };
            match live::read(kubeconfig.as_deref(), gateway_selector, namespace, name) {
                Ok(v) => view = v,
                Err(errors) => return fail(&errors, "cannot read the cluster"),
            }
            (view.inventory(&Inventory::new()), view.invalid_policies())
        }
    };
    match explain(&inventory, &invalid, pod, dst) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => fail(&[], &message),
    }
}

/// `NAMESPACE/NAME` split.
fn pod_key(pod: &str) -> Result<(&str, &str), String> {
    pod.split_once('/')
        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())
        .ok_or_else(|| format!("--pod {pod}: write NAMESPACE/NAME, e.g. default/client"))
}

/// The text `explain` prints, or why it cannot say. `invalid` lists the policies that exist but are
/// invalid (name, problem), left out of `inventory` as the node agent leaves them out.
pub(crate) fn explain(
    inventory: &Inventory,
    invalid: &[(&str, &str)],
    pod: &str,
    dst: IpAddr,
) -> Result<String, String> {
    let (namespace, name) = pod_key(pod)?;
    let Some(p) = inventory.pod(namespace, name) else {
        return Err(format!(
            "pod {namespace}/{name} is not in the inputs ({} pods read); check the name and the files",
            inventory.pods().count()
        ));
    };
    let e = inventory.explain(p, dst);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "pod:         {namespace}/{name} ({})", describe_pod(p));
    let _ = writeln!(out, "destination: {dst}");
    let _ = writeln!(out, "configured by: {}", e.source);
    if let Some(policy) = &e.policy {
        let _ = writeln!(out, "policy:      {policy}");
    }
    if let Some(rule) = e.rule {
        match e.rule_index {
            Some(i) => {
                let _ = writeln!(out, "rule:        #{} (destination {rule})", i + 1);
            }
            None => {
                let _ = writeln!(out, "rule:        destination {rule}");
            }
        }
    }
    match &e.decision {
        Decision::NotOptedIn => {
            let _ = writeln!(
                out,
                "decision:    not opted in (no egress gateway); normal routing, the destination sees \
                 the pod IP or the node's SNAT address"
            );
        }
        Decision::NoGateway => {
            let why = if e.rule.is_some() {
                "the matched rule has no gateway"
            } else {
                "no rule of the policy covers the destination"
            };
            let _ = writeln!(
                out,
                "decision:    NoGateway ({why}); normal routing, the destination sees the pod IP or \
                 the node's SNAT address"
            );
        }
        Decision::Blocked(why) => {
            // As the node agent says it: the policy is there, but invalid, so it is not used.
            let invalid = match why {
                BlockReason::MissingPolicy { policy } => invalid.iter().find(|(n, _)| n == policy),
                _ => None,
            };
            let why = match invalid {
                Some((policy, problem)) => format!(
                    "EgressGatewayPolicy '{policy}' is invalid and not used (pods that name it are blocked \
                     until it is fixed): {problem}"
                ),
                None => why.to_string(),
            };
            let _ = writeln!(
                out,
                "decision:    Blocked: {why}; nothing reaches the destination"
            );
        }
        Decision::Gateways {
            members,
            max_next_hops,
            preference,
        } => {
            let max = match max_next_hops {
                None | Some(0) => "all".to_owned(),
                Some(n) => n.to_string(),
            };
            let pref = match preference {
                Preference::None => "None",
                Preference::PreferNodeLocal => "PreferNodeLocal",
            };
            let _ = writeln!(
                out,
                "decision:    via {} gateway(s) (maxNextHops: {max}, gatewayPreference: {pref}), one per flow",
                members.len()
            );
            for m in members {
                let _ = writeln!(
                    out,
                    "  gateway {}/{}  ip {}  node {}",
                    m.namespace,
                    m.name,
                    m.ip,
                    m.node.as_deref().unwrap_or("?")
                );
            }
            let _ = writeln!(
                out,
                "source IP:   the egress IP of the gateway chosen for the flow (set in that gateway's \
                 configuration, not in Kubernetes objects)"
            );
        }
    }
    if e.source == AnnotationSource::None {
        let _ = writeln!(
            out,
            "hint:        annotate the pod or namespace with egress.projectcalico.org/egressGatewayPolicy"
        );
    }
    Ok(out)
}

fn describe_pod(p: &Pod) -> String {
    let ips: Vec<String> = p.ip.iter().map(ToString::to_string).collect();
    format!(
        "ip {}, node {}",
        if ips.is_empty() {
            "?".to_owned()
        } else {
            ips.join(", ")
        },
        p.node.as_deref().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn max_next_hops_and_preference_are_shown_and_applied() {
        let text = "\
kind: List
items:
- kind: EgressGatewayPolicy
  metadata: { name: p }
  spec:
    rules:
    - gateway: { selector: \"egress-code == 'red'\", maxNextHops: 1 }
      gatewayPreference: PreferNodeLocal
- kind: Namespace
  metadata: { name: app, annotations: { egress.projectcalico.org/egressGatewayPolicy: p } }
- kind: Pod
  metadata: { name: c, namespace: app }
  spec: { nodeName: node-a }
  status: { podIP: 10.244.1.5 }
- kind: Pod
  metadata: { name: gw-a, namespace: app, labels: { egress-code: red } }
  spec: { nodeName: node-a }
  status: { podIP: 10.244.1.10 }
- kind: Pod
  metadata: { name: gw-b, namespace: app, labels: { egress-code: red } }
  spec: { nodeName: node-b }
  status: { podIP: 10.244.2.10 }
";
        let contents = inventory::parse(text, Path::new("t.yaml")).unwrap();
        let inv = inventory::merge(&[contents]);
        let out = explain(&inv, &[], "app/c", "203.0.113.1".parse().unwrap()).unwrap();
        assert!(
            out.contains("pod annotation") || out.contains("namespace annotation"),
            "{out}"
        );
        assert!(
            out.contains("rule:        #1 (destination 0.0.0.0/0)"),
            "{out}"
        );
        assert!(
            out.contains("via 1 gateway(s) (maxNextHops: 1, gatewayPreference: PreferNodeLocal)"),
            "{out}"
        );
        assert!(
            out.contains("gateway app/gw-a  ip 10.244.1.10  node node-a"),
            "{out}"
        );
        assert!(explain(&inv, &[], "app", "203.0.113.1".parse().unwrap())
            .unwrap_err()
            .contains("NAMESPACE/NAME"));
    }
}
