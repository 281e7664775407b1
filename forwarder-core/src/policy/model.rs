//! The typed policy model: `EgressGatewayPolicy` (validated), and the namespaces and pods it applies to.
//!
//! These mirror `projectcalico.org/v3` `EgressGatewayPolicy` and `v1` `Namespace` / `Pod`, reduced to the
//! fields that routing decisions use. Reading them from YAML is the binary's job.

use core::fmt;
use core::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::selector::{Labels, Selector};

/// Annotation naming the `EgressGatewayPolicy` a pod or namespace uses.
pub const ANNOTATION_POLICY: &str = "egress.projectcalico.org/egressGatewayPolicy";
/// Annotation with the selector of the egress gateways a pod or namespace uses (no policy).
pub const ANNOTATION_SELECTOR: &str = "egress.projectcalico.org/selector";
/// Annotation with the selector of the namespaces those gateways live in.
pub const ANNOTATION_NAMESPACE_SELECTOR: &str = "egress.projectcalico.org/namespaceSelector";
/// Annotation capping the number of gateways used with the selector annotations.
pub const ANNOTATION_MAX_NEXT_HOPS: &str = "egress.projectcalico.org/maxNextHops";
/// The synthetic namespace label holding the namespace's name (Calico adds it for namespace selectors).
pub const LABEL_NAMESPACE_NAME: &str = "projectcalico.org/name";

/// `gatewayPreference` of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preference {
    /// Use all selected gateways (`None`, the default).
    #[default]
    None,
    /// Use only gateways on the client pod's node when there are any; otherwise all.
    PreferNodeLocal,
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preference::None => "None",
            Preference::PreferNodeLocal => "PreferNodeLocal",
        })
    }
}

/// The `gateway` of a rule: which gateway pods carry the traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySpec {
    /// Selects gateway pods by their labels.
    pub selector: Selector,
    /// Selects the namespaces of those pods (namespace labels plus `projectcalico.org/name`); `None` means
    /// the client pod's own namespace.
    pub namespace_selector: Option<Selector>,
    /// At most this many gateways per client pod (`None` or `Some(0)`: all).
    pub max_next_hops: Option<u32>,
}

/// One rule of a policy: a destination and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Free text, carried for `explain`.
    pub description: Option<String>,
    /// Destination CIDR; `None` means every destination (0.0.0.0/0 and ::/0).
    pub destination: Option<IpNet>,
    /// The gateways to use; `None` means normal routing (a `throw` route).
    pub gateway: Option<GatewaySpec>,
    /// `gatewayPreference` (a field of the rule in Calico's schema, not of `gateway`).
    pub preference: Preference,
}

impl Rule {
    /// The destinations the rule covers: its CIDR (normalised), or both default routes.
    pub fn destinations(&self) -> Vec<IpNet> {
        match self.destination {
            Some(net) => vec![net.trunc()],
            None => vec![IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())],
        }
    }
}

/// An invalid policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// Two rules of one policy have the same destination (a rule without destination counts as
    /// 0.0.0.0/0 and ::/0).
    DuplicateDestination {
        /// The policy's name.
        policy: String,
        /// The repeated destination.
        cidr: IpNet,
        /// Indexes (from 0) of the first and the second rule with it.
        rules: (usize, usize),
    },
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::DuplicateDestination {
                policy,
                cidr,
                rules,
            } => write!(
                f,
                "EgressGatewayPolicy '{policy}': rules {} and {} both have destination {cidr}; \
                 each destination may appear in one rule only",
                rules.0 + 1,
                rules.1 + 1
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

/// A validated `EgressGatewayPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressGatewayPolicy {
    name: String,
    rules: Vec<Rule>,
}

impl EgressGatewayPolicy {
    /// Builds a policy, rejecting duplicate destinations.
    pub fn new(name: impl Into<String>, rules: Vec<Rule>) -> Result<Self, PolicyError> {
        let name = name.into();
        let mut seen: Vec<(IpNet, usize)> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            for net in rule.destinations() {
                if let Some(&(_, first)) = seen.iter().find(|(n, _)| *n == net) {
                    return Err(PolicyError::DuplicateDestination {
                        policy: name,
                        cidr: net,
                        rules: (first, i),
                    });
                }
                seen.push((net, i));
            }
        }
        Ok(EgressGatewayPolicy { name, rules })
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule whose destination is the longest prefix containing `dst`, with the prefix it matched by.
    pub fn rule_for(&self, dst: IpAddr) -> Option<(usize, &Rule, IpNet)> {
        self.rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.destinations().into_iter().map(move |net| (i, r, net)))
            .filter(|(_, _, net)| net.contains(&dst))
            .max_by_key(|(_, _, net)| net.prefix_len())
    }
}

/// A Kubernetes namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `metadata.annotations`.
    pub annotations: Labels,
}

impl Namespace {
    /// The labels namespace selectors see: the namespace's own plus `projectcalico.org/name`.
    pub fn selector_labels(&self) -> Labels {
        namespace_selector_labels(&self.name, Some(&self.labels))
    }
}

/// Labels a namespace selector sees for namespace `name` (with `labels` when the namespace is known).
pub(crate) fn namespace_selector_labels(name: &str, labels: Option<&Labels>) -> Labels {
    let mut out = labels.cloned().unwrap_or_default();
    out.insert(LABEL_NAMESPACE_NAME.to_string(), name.to_string());
    out
}

/// A Kubernetes pod: a client, a gateway, or neither.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `metadata.annotations`.
    pub annotations: Labels,
    /// `status.podIPs` (IPv4 and/or IPv6).
    pub ip: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `status.hostIP`.
    pub host_ip: Option<IpAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(dst: Option<&str>, gw: bool) -> Rule {
        Rule {
            description: None,
            destination: dst.map(|d| d.parse().unwrap()),
            gateway: gw.then(|| GatewaySpec {
                selector: Selector::parse("egress-code == 'red'").unwrap(),
                namespace_selector: None,
                max_next_hops: None,
            }),
            preference: Preference::None,
        }
    }

    #[test]
    fn duplicate_cidr_is_an_error_naming_policy_and_cidr() {
        let e = EgressGatewayPolicy::new(
            "p1",
            vec![
                rule(Some("10.0.0.0/8"), false),
                rule(Some("10.0.0.0/8"), true),
            ],
        )
        .unwrap_err();
        assert_eq!(
            e,
            PolicyError::DuplicateDestination {
                policy: "p1".into(),
                cidr: "10.0.0.0/8".parse().unwrap(),
                rules: (0, 1)
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("'p1'") && text.contains("10.0.0.0/8"),
            "{text}"
        );
    }

    #[test]
    fn duplicates_are_compared_after_normalising() {
        let e = EgressGatewayPolicy::new(
            "p",
            vec![
                rule(Some("10.1.2.3/8"), false),
                rule(Some("10.0.0.0/8"), true),
            ],
        );
        assert!(e.is_err());
    }

    #[test]
    fn missing_destination_counts_as_both_defaults() {
        assert!(EgressGatewayPolicy::new(
            "p",
            vec![rule(None, true), rule(Some("0.0.0.0/0"), false)]
        )
        .is_err());
        assert!(
            EgressGatewayPolicy::new("p", vec![rule(Some("::/0"), false), rule(None, true)])
                .is_err()
        );
        assert!(EgressGatewayPolicy::new("p", vec![rule(None, true), rule(None, false)]).is_err());
        assert!(EgressGatewayPolicy::new(
            "p",
            vec![rule(None, true), rule(Some("10.0.0.0/8"), false)]
        )
        .is_ok());
    }

    #[test]
    fn rule_for_takes_the_longest_prefix() {
        let p = EgressGatewayPolicy::new(
            "p",
            vec![
                rule(None, true),
                rule(Some("10.0.0.0/8"), false),
                rule(Some("10.1.0.0/16"), true),
            ],
        )
        .unwrap();
        let idx = |ip: &str| {
            p.rule_for(ip.parse().unwrap())
                .map(|(i, _, net)| (i, net.to_string()))
        };
        assert_eq!(idx("10.1.2.3"), Some((2, "10.1.0.0/16".into())));
        assert_eq!(idx("10.2.0.1"), Some((1, "10.0.0.0/8".into())));
        assert_eq!(idx("192.0.2.1"), Some((0, "0.0.0.0/0".into())));
        assert_eq!(idx("2001:db8::1"), Some((0, "::/0".into())));
        let only_v4 = EgressGatewayPolicy::new("q", vec![rule(Some("10.0.0.0/8"), false)]).unwrap();
        assert!(only_v4.rule_for("2001:db8::1".parse().unwrap()).is_none());
    }
}
