//! Resolution: (client pod, destination IP) → which egress gateways carry the traffic, and why.
//!
//! Steps, as in Calico Enterprise:
//!
//! 1. **Which configuration applies** — the first present (non-empty) of: the pod's
//!    `egress.projectcalico.org/egressGatewayPolicy`, the namespace's, the pod's
//!    `egress.projectcalico.org/selector` (with the pod's `namespaceSelector` / `maxNextHops` annotations),
//!    the namespace's selector annotations. None → [`Decision::NotOptedIn`]. A named policy that does not
//!    exist → [`Decision::Blocked`] (fail closed). A selector annotation behaves as a policy with one rule
//!    for every destination.
//! 2. **Which rule** — the rule whose destination is the longest prefix containing the destination (a rule
//!    without destination is 0.0.0.0/0 and ::/0). No rule, or a rule without `gateway` →
//!    [`Decision::NoGateway`] (normal routing: in the kernel, a `throw` route or no route in the pod's table).
//! 3. **Which gateways** — pods matching the rule's selector, in namespaces matching its namespace selector
//!    (namespace labels plus `projectcalico.org/name`; without a namespace selector, the client's own
//!    namespace), that have an address of the destination's family, and pass the caller's health filter.
//!    `PreferNodeLocal` keeps those on the client's node when there are any. `maxNextHops` then keeps at most
//!    that many, chosen per client pod by rendezvous hashing: deterministic, spread across client pods, and a
//!    gateway leaving only moves the clients that used it. No gateway left → [`Decision::Blocked`]
//!    (an `unreachable` route: fail closed).
//!
//! Step 3 is where the cost is: finding the pods a rule's selectors match means looking at every pod.
//! [`Resolver`] does that once per (gateway selector, namespace scope) and keeps the answer while it
//! resolves many pods against an unchanged inventory, as the node agent's plan does for every pod of
//! its node; [`Inventory`]'s own methods resolve one pod with a fresh [`Resolver`].

use core::cell::RefCell;
use core::fmt;
use core::net::IpAddr;
use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::model::{
    EgressGatewayPolicy, GatewaySpec, Namespace, Pod, Preference, ANNOTATION_MAX_NEXT_HOPS,
    ANNOTATION_NAMESPACE_SELECTOR, ANNOTATION_POLICY, ANNOTATION_SELECTOR,
};
use super::selector::{Labels, Selector};
use candidates::Candidates;

mod candidates;

/// Where a pod's egress configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnnotationSource {
    /// No annotation on the pod or its namespace: the pod is not opted in.
    None,
    /// The pod's `egress.projectcalico.org/egressGatewayPolicy`.
    PodPolicy,
    /// The namespace's `egress.projectcalico.org/egressGatewayPolicy`.
    NamespacePolicy,
    /// The pod's `egress.projectcalico.org/selector` (and `namespaceSelector`).
    PodSelector,
    /// The namespace's `egress.projectcalico.org/selector` (and `namespaceSelector`).
    NamespaceSelector,
}

impl fmt::Display for AnnotationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AnnotationSource::None => "no egress annotation on the pod or its namespace",
            AnnotationSource::PodPolicy => {
                "pod annotation egress.projectcalico.org/egressGatewayPolicy"
            }
            AnnotationSource::NamespacePolicy => {
                "namespace annotation egress.projectcalico.org/egressGatewayPolicy"
            }
            AnnotationSource::PodSelector => "pod annotation egress.projectcalico.org/selector",
            AnnotationSource::NamespaceSelector => {
                "namespace annotation egress.projectcalico.org/selector"
            }
        })
    }
}

/// One gateway pod that carries the traffic, with its address in the destination's family.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayMember {
    /// The gateway pod's address (the next hop inside the tunnel, and the source IP the destination sees).
    pub ip: IpAddr,
    /// The gateway pod's namespace.
    pub namespace: String,
    /// The gateway pod's name.
    pub name: String,
    /// The node the gateway pod runs on.
    pub node: Option<String>,
}

/// Why a pod's traffic to a destination is blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockReason {
    /// The pod or namespace names a policy that does not exist.
    MissingPolicy {
        /// The policy's name.
        policy: String,
    },
    /// An egress annotation does not parse.
    InvalidAnnotation {
        /// The annotation's key.
        annotation: &'static str,
        /// What is wrong with it.
        error: String,
    },
    /// The rule selects gateways, but none exists (with an address of the destination's family, and
    /// healthy).
    NoGateways,
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockReason::MissingPolicy { policy } => {
                write!(
                    f,
                    "EgressGatewayPolicy '{policy}' does not exist (all egress traffic is blocked)"
                )
            }
            BlockReason::InvalidAnnotation { annotation, error } => {
                write!(f, "annotation {annotation}: {error}")
            }
            BlockReason::NoGateways => {
                f.write_str("no gateway matches the rule's selectors (or none is healthy)")
            }
        }
    }
}

/// What happens to a pod's traffic to one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The pod is not opted in to egress gateways: normal routing, no per-pod table.
    NotOptedIn,
    /// Normal routing (the matched rule has no gateway, or no rule matches).
    NoGateway,
    /// Through these gateways (sorted by IP; never empty), one chosen per flow.
    Gateways {
        /// The gateways, after the health filter, `PreferNodeLocal` and `maxNextHops`.
        members: Vec<GatewayMember>,
        /// The rule's `maxNextHops`.
        max_next_hops: Option<u32>,
        /// The rule's `gatewayPreference`.
        preference: Preference,
    },
    /// Dropped (an `unreachable` route).
    Blocked(BlockReason),
}

/// A decision with the reasons for it (what `explain` prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Which annotation configured the pod.
    pub source: AnnotationSource,
    /// The policy used, when the source names one.
    pub policy: Option<String>,
    /// The destination prefix of the matched rule (0.0.0.0/0 or ::/0 for a rule without destination and for
    /// selector annotations).
    pub rule: Option<IpNet>,
    /// Index (from 0) of the matched rule in the policy.
    pub rule_index: Option<usize>,
    /// The outcome.
    pub decision: Decision,
}

/// One route of a pod's egress table (see [`Inventory::table`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    /// The destination prefix.
    pub destination: IpNet,
    /// Index (from 0) of the policy rule it comes from; `None` for selector annotations and blocks.
    pub rule_index: Option<usize>,
    /// What happens to traffic to this prefix.
    pub decision: Decision,
}

/// A pod's egress table: what the node agent writes into the pod's kernel route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTable {
    /// Which annotation configured the pod.
    pub source: AnnotationSource,
    /// The policy named, when the source names one (also when it is missing).
    pub policy: Option<String>,
    /// One entry per destination prefix, in policy order.
    pub entries: Vec<TableEntry>,
}

/// The configuration that applies to a pod (step 1).
enum Applied<'a> {
    None,
    Missing(String),
    Policy(&'a EgressGatewayPolicy),
    Selector(Result<GatewaySpec, BlockReason>),
}

/// 0.0.0.0/0 or ::/0, in `dst`'s family.
fn default_route(dst: IpAddr) -> IpNet {
    match dst {
        IpAddr::V4(_) => IpNet::V4(Ipv4Net::default()),
        IpAddr::V6(_) => IpNet::V6(Ipv6Net::default()),
    }
}

/// Everything resolution looks at: namespaces, pods (clients and gateways) and policies.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<(String, String), Pod>,
    policies: BTreeMap<String, EgressGatewayPolicy>,
}

impl Inventory {
    /// An empty inventory.
    pub fn new() -> Self {
        Inventory::default()
    }

    /// Adds or replaces a namespace (by name); returns the one replaced.
    pub fn insert_namespace(&mut self, ns: Namespace) -> Option<Namespace> {
        self.namespaces.insert(ns.name.clone(), ns)
    }

    /// Adds or replaces a pod (by namespace and name); returns the one replaced.
    pub fn insert_pod(&mut self, pod: Pod) -> Option<Pod> {
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod)
    }

    /// Adds or replaces a policy (by name); returns the one replaced.
    pub fn insert_policy(&mut self, policy: EgressGatewayPolicy) -> Option<EgressGatewayPolicy> {
        self.policies.insert(policy.name().to_string(), policy)
    }

    /// A namespace by name.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<&EgressGatewayPolicy> {
        self.policies.get(name)
    }

    /// All namespaces, by name.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// All pods, by namespace then name.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    /// All policies, by name.
    pub fn policies(&self) -> impl Iterator<Item = &EgressGatewayPolicy> {
        self.policies.values()
    }

    /// A resolver over this inventory, for resolving many pods against it (see [`Resolver`]).
    pub fn resolver(&self) -> Resolver<'_> {
        Resolver {
            inventory: self,
            candidates: RefCell::new(Candidates::default()),
        }
    }

    /// The decision for `pod`'s traffic to `dst`, with every gateway considered healthy.
    pub fn resolve(&self, pod: &Pod, dst: IpAddr) -> Decision {
        self.explain(pod, dst).decision
    }

    /// The decision for `pod`'s traffic to `dst` and why, with every gateway considered healthy.
    pub fn explain(&self, pod: &Pod, dst: IpAddr) -> Explanation {
        self.explain_filtered(pod, dst, |_| true)
    }

    /// The decision and why, using only gateways for which `healthy` is true (applied before
    /// `PreferNodeLocal` and `maxNextHops`, so that a failed gateway is replaced).
    pub fn explain_filtered(
        &self,
        pod: &Pod,
        dst: IpAddr,
        healthy: impl Fn(&GatewayMember) -> bool,
    ) -> Explanation {
        self.resolver().explain_filtered(pod, dst, healthy)
    }

    /// The whole egress table of `pod` (see [`Resolver::table`]). `None` when the pod is not opted in.
    pub fn table(
        &self,
        pod: &Pod,
        healthy: impl Fn(IpNet, &GatewayMember) -> bool,
    ) -> Option<PodTable> {
        self.resolver().table(pod, healthy)
    }

    /// 1. Which configuration applies to `pod`, and where it came from.
    fn applied(&self, pod: &Pod) -> (AnnotationSource, Applied<'_>) {
        let ns = self.namespaces.get(&pod.namespace);
        let empty = Labels::new();
        let ns_annotations = ns.map_or(&empty, |n| &n.annotations);
        let get = annotation;
        let policy_name = match (
            get(&pod.annotations, ANNOTATION_POLICY),
            get(ns_annotations, ANNOTATION_POLICY),
        ) {
            (Some(name), _) => Some((AnnotationSource::PodPolicy, name)),
            (None, Some(name)) => Some((AnnotationSource::NamespacePolicy, name)),
            (None, None) => None,
        };
        if let Some((source, name)) = policy_name {
            return match self.policies.get(name) {
                Some(policy) => (source, Applied::Policy(policy)),
                None => (source, Applied::Missing(name.to_string())),
            };
        }
        if get(&pod.annotations, ANNOTATION_SELECTOR).is_some() {
            (
                AnnotationSource::PodSelector,
                Applied::Selector(selector_spec(&pod.annotations)),
            )
        } else if get(ns_annotations, ANNOTATION_SELECTOR).is_some() {
            (
                AnnotationSource::NamespaceSelector,
                Applied::Selector(selector_spec(ns_annotations)),
            )
        } else {
            (AnnotationSource::None, Applied::None)
        }
    }
}

/// Resolves pods against one inventory, remembering which pods each gateway selector matches (per
/// namespace selector, or per client namespace for a rule without one), so that resolving every pod of
/// a node looks at each pod of the inventory once per distinct selector rather than once per client pod
/// and destination. The decisions are those of resolving each pod on its own.
///
/// What it remembers is only valid for the inventory it borrows, which cannot change while it lives.
#[derive(Debug)]
pub struct Resolver<'a> {
    inventory: &'a Inventory,
    candidates: RefCell<Candidates<'a>>,
}

impl Resolver<'_> {
    /// The decision and why, using only gateways for which `healthy` is true (applied before
    /// `PreferNodeLocal` and `maxNextHops`, so that a failed gateway is replaced).
    pub fn explain_filtered(
        &self,
        pod: &Pod,
        dst: IpAddr,
        healthy: impl Fn(&GatewayMember) -> bool,
    ) -> Explanation {
        let mut ex = Explanation {
            source: AnnotationSource::None,
            policy: None,
            rule: None,
            rule_index: None,
            decision: Decision::NotOptedIn,
        };
        let (source, applied) = self.inventory.applied(pod);
        ex.source = source;
        match applied {
            Applied::None => {}
            Applied::Missing(name) => {
                ex.policy = Some(name.clone());
                ex.decision = Decision::Blocked(BlockReason::MissingPolicy { policy: name });
            }
            Applied::Policy(policy) => {
                ex.policy = Some(policy.name().to_string());
                // 2. Which rule.
                let Some((index, rule, net)) = policy.rule_for(dst) else {
                    ex.decision = Decision::NoGateway;
                    return ex;
                };
                ex.rule = Some(net);
                ex.rule_index = Some(index);
                ex.decision = match &rule.gateway {
                    None => Decision::NoGateway,
                    Some(spec) => self.gateways(pod, dst, spec, rule.preference, &healthy),
                };
            }
            Applied::Selector(spec) => {
                ex.rule = Some(default_route(dst));
                ex.decision = match spec {
                    Ok(spec) => self.gateways(pod, dst, &spec, Preference::None, &healthy),
                    Err(reason) => Decision::Blocked(reason),
                };
            }
        }
        ex
    }

    /// The whole egress table of `pod`: one entry per destination prefix of the configuration that
    /// applies (a missing policy or an invalid annotation blocks 0.0.0.0/0 and ::/0), each with its
    /// decision, using only gateways for which `healthy(prefix, member)` is true. Longest prefix wins
    /// between entries, as in the kernel's table. `None` when the pod is not opted in.
    pub fn table(
        &self,
        pod: &Pod,
        healthy: impl Fn(IpNet, &GatewayMember) -> bool,
    ) -> Option<PodTable> {
        let (source, applied) = self.inventory.applied(pod);
        let defaults = [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())];
        let blocked = |reason: BlockReason| -> Vec<TableEntry> {
            defaults
                .iter()
                .map(|&destination| TableEntry {
                    destination,
                    rule_index: None,
                    decision: Decision::Blocked(reason.clone()),
                })
                .collect()
        };
        let (policy, entries) = match applied {
            Applied::None => return None,
            Applied::Missing(name) => (
                Some(name.clone()),
                blocked(BlockReason::MissingPolicy { policy: name }),
            ),
            Applied::Policy(policy) => {
                let mut entries = Vec::new();
                for (index, rule) in policy.rules().iter().enumerate() {
                    for destination in rule.destinations() {
                        let decision = match &rule.gateway {
                            None => Decision::NoGateway,
                            Some(spec) => self.gateways(
                                pod,
                                destination.network(),
                                spec,
                                rule.preference,
                                &|m: &GatewayMember| healthy(destination, m),
                            ),
                        };
                        entries.push(TableEntry {
                            destination,
                            rule_index: Some(index),
                            decision,
                        });
                    }
                }
                (Some(policy.name().to_string()), entries)
            }
            Applied::Selector(Err(reason)) => (None, blocked(reason)),
            Applied::Selector(Ok(spec)) => (
                None,
                defaults
                    .iter()
                    .map(|&destination| TableEntry {
                        destination,
                        rule_index: None,
                        decision: self.gateways(
                            pod,
                            destination.network(),
                            &spec,
                            Preference::None,
                            &|m: &GatewayMember| healthy(destination, m),
                        ),
                    })
                    .collect(),
            ),
        };
        Some(PodTable {
            source,
            policy,
            entries,
        })
    }

    /// 3. Which gateways.
    fn gateways(
        &self,
        client: &Pod,
        dst: IpAddr,
        spec: &GatewaySpec,
        preference: Preference,
        healthy: &impl Fn(&GatewayMember) -> bool,
    ) -> Decision {
        // The pods the selectors match, in the inventory's order (namespace, then name): the order the
        // `maxNextHops` choice falls back on when two gateways tie.
        let candidates =
            self.candidates
                .borrow_mut()
                .matching(self.inventory, spec, &client.namespace);
        let mut members: Vec<GatewayMember> = candidates
            .iter()
            .filter(|p| !(p.namespace == client.namespace && p.name == client.name))
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
}

/// The gateway spec that selector annotations (on one pod or namespace) describe.
fn selector_spec(annotations: &Labels) -> Result<GatewaySpec, BlockReason> {
    let get = annotation;
    let parse = |key: &'static str, text: &str| {
        Selector::parse(text).map_err(|e| BlockReason::InvalidAnnotation {
            annotation: key,
            error: e.to_string(),
        })
    };
    let selector = parse(
        ANNOTATION_SELECTOR,
        get(annotations, ANNOTATION_SELECTOR).unwrap_or(""),
    )?;
    let namespace_selector = get(annotations, ANNOTATION_NAMESPACE_SELECTOR)
        .map(|t| parse(ANNOTATION_NAMESPACE_SELECTOR, t))
        .transpose()?;
    let max_next_hops = get(annotations, ANNOTATION_MAX_NEXT_HOPS)
        .map(|t| {
            t.parse::<u32>()
                .map_err(|_| BlockReason::InvalidAnnotation {
                    annotation: ANNOTATION_MAX_NEXT_HOPS,
                    error: format!("expected a non-negative integer, found '{t}'"),
                })
        })
        .transpose()?;
    Ok(GatewaySpec {
        selector,
        namespace_selector,
        max_next_hops,
    })
}

/// An annotation's value, trimmed; empty counts as absent.
fn annotation<'a>(annotations: &'a Labels, key: &str) -> Option<&'a str> {
    annotations
        .get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// 64-bit FNV-1a: a fixed hash, so that gateway choice is the same on every node and every run.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod differential;
