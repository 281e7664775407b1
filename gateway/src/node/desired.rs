//! From the inventory, this node's name and the gateways' health to the kernel state the node should hold
//! ([`Desired`]): pure, so that every rule of the node agent is tested without privileges.
//!
//! Per opted-in pod on this node: a table (kept for as long as the pod exists), one ip rule per pod
//! address, and in the table
//! * a `throw` route per cluster CIDR (pods, services, nodes are never steered to a gateway) and for the
//!   link-local networks (the pod's ARP for its gateway 169.254.1.1 must keep working when the table blocks),
//! * one route per prefix of the pod's configuration ([`Inventory::table`]): `throw` (no gateway),
//!   `unreachable` (blocked, or no healthy gateway: fail closed), or via the gateways (the kernel module
//!   turns these into resilient nexthop groups, or multipath routes on older kernels).
//!
//! A gateway is a next hop while it is healthy. One that answers 503 `draining` stays in the routes that
//! already use it (their flows keep going until it exits) but is not added anywhere new. The tunnel is
//! IPv4: a gateway is reached at its IPv4 pod IP (its next hop for IPv4 destinations, and its FDB
//! entry); IPv6 destinations use the link-local address of its tunnel MAC.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;

use forwarder_core::policy::{BlockReason, Decision, GatewayMember, Inventory, Pod, PodTable};
use ipnet::IpNet;

use super::state::{link_local, tunnel_mac, Desired, RouteKey, RouteKind, RuleSpec};
use crate::config::node::RESERVED_TABLES;

/// Link-local networks, thrown in every table. The node answers a Calico pod's ARP for its default gateway
/// 169.254.1.1 by proxy ARP, which looks the target up from the pod, through the pod's rule: without the
/// throw, a table whose default route is `unreachable` (a missing policy, no healthy gateway) would also
/// silence the pod's ARP, and the pod could reach nothing — not even the cluster — and would fail by ARP
/// timeout instead of at once.
const LINK_LOCAL: [IpNet; 2] = [
    IpNet::V4(
        match ipnet::Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16) {
            Ok(n) => n,
            Err(_) => panic!("prefix"),
        },
    ),
    IpNet::V6(
        match ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
            Ok(n) => n,
            Err(_) => panic!("prefix"),
        },
    ),
];

/// A pod, by namespace and name.
pub(crate) type PodKey = (String, String);

/// What the agent knows about one gateway's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Health {
    /// Not probed yet.
    #[default]
    Unknown,
    /// Answers 200.
    Healthy,
    /// Answers 503 `draining`: keeps the flows it has, gets no new ones.
    Draining,
    /// Does not answer, or answers an error.
    Down,
}

/// The settings the plan depends on.
#[derive(Debug, Clone)]
pub(crate) struct Settings<'a> {
    /// This node's name (`spec.nodeName` of its pods).
    pub(crate) node: &'a str,
    /// Priority of the ip rules.
    pub(crate) rule_priority: u32,
    /// Tables the agent may use.
    pub(crate) tables: RangeInclusive<u32>,
    /// Destinations never steered.
    pub(crate) cluster_cidrs: &'a [IpNet],
}

/// What the previous plan decided, for stable table numbers and draining gateways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Memory {
    /// Each programmed pod's table.
    pub(crate) tables: BTreeMap<PodKey, u32>,
    /// The gateways (tunnel IPv4) each route used.
    pub(crate) members: BTreeMap<RouteKey, BTreeSet<Ipv4Addr>>,
}

/// The plan: the desired kernel state and what led to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// What the kernel should hold.
    pub(crate) desired: Desired,
    /// What to remember for the next plan.
    pub(crate) memory: Memory,
    /// Every gateway (tunnel IPv4) this node's pods may use, healthy or not: the ones to probe.
    pub(crate) gateways: BTreeSet<Ipv4Addr>,
    /// Opted-in pods on this node that got a table.
    pub(crate) pods: usize,
    /// Things the operator should know (a route inside a cluster CIDR skipped, tables exhausted, ...).
    pub(crate) problems: Vec<String>,
    /// Opted-in pods whose traffic (to some or all destinations) is blocked by a configuration error — a
    /// policy that is missing (or invalid, which leaves it out of the inventory), an annotation that does
    /// not parse — with the errors, each once. Not a gateway's health: only what someone must fix.
    pub(crate) misconfigured: BTreeMap<PodKey, Vec<BlockReason>>,
}

/// Plans the node's state. `health` says how each gateway (by tunnel IPv4) is doing.
pub(crate) fn plan(
    inventory: &Inventory,
    settings: &Settings<'_>,
    health: &dyn Fn(Ipv4Addr) -> Health,
    previous: &Memory,
) -> Plan {
    let mut plan = Plan::default();
    let pods: Vec<&Pod> = inventory
        .pods()
        .filter(|p| p.node.as_deref() == Some(settings.node))
        .filter(|p| !p.ip.is_empty())
        // Host-network pods share the node's address: there is nothing to steer.
        .filter(|p| p.host_ip.is_none_or(|h| !p.ip.contains(&h)))
        .collect();

    // One resolver for every pod of the node: it finds the pods each gateway selector matches once,
    // rather than walking the whole inventory per pod and destination (`policy::Resolver` says why).
    let resolver = inventory.resolver();

    // Tables: pods keep theirs; new pods get the lowest free one. With each opted-in pod, its table with
    // every gateway the pod could use, healthy or not.
    let opted_in: Vec<(&Pod, PodKey, PodTable)> = pods
        .iter()
        .filter_map(|p| {
            let all = resolver.table(p, |_, _| true)?;
            Some((*p, (p.namespace.clone(), p.name.clone()), all))
        })
        .collect();
    let mut used: BTreeSet<u32> = BTreeSet::new();
    for (_, key, _) in &opted_in {
        if let Some(&t) = previous.tables.get(key) {
            if settings.tables.contains(&t) && used.insert(t) {
                plan.memory.tables.insert(key.clone(), t);
            }
        }
    }
    let mut free = settings
        .tables
        .clone()
        .filter(|t| !RESERVED_TABLES.contains(t) && !used.contains(t));
    for (_, key, _) in &opted_in {
        if plan.memory.tables.contains_key(key) {
            continue;
        }
        match free.next() {
            Some(t) => {
                plan.memory.tables.insert(key.clone(), t);
            }
            None => plan.problems.push(format!(
                "pod {}/{}: no free route table in {}..={}; its traffic is not steered (widen `tables`)",
                key.0,
                key.1,
                settings.tables.start(),
                settings.tables.end()
            )),
        }
    }

    let tunnel_ip = |m: &GatewayMember| -> Option<Ipv4Addr> {
        let pod = inventory.pod(&m.namespace, &m.name)?;
        pod.ip.iter().find_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    };

    for (pod, key, all) in &opted_in {
        let Some(&table) = plan.memory.tables.get(key) else {
            continue;
        };
        plan.pods += 1;
        for ip in &pod.ip {
            plan.desired.rules.insert(RuleSpec {
                src: *ip,
                table,
                priority: settings.rule_priority,
            });
        }
        for net in settings.cluster_cidrs.iter().chain(&LINK_LOCAL) {
            plan.desired.routes.insert((table, *net), RouteKind::Throw);
        }
        // Every gateway the pod could use, healthy or not: probed, and given neighbours and FDB entries.
        for entry in &all.entries {
            match &entry.decision {
                Decision::Gateways { members, .. } => {
                    plan.gateways.extend(members.iter().filter_map(tunnel_ip));
                }
                Decision::Blocked(
                    why @ (BlockReason::MissingPolicy { .. }
                    | BlockReason::InvalidAnnotation { .. }),
                ) => {
                    let reasons = plan.misconfigured.entry(key.clone()).or_default();
                    if !reasons.contains(why) {
                        reasons.push(why.clone());
                    }
                }
                _ => {}
            }
        }
        let eligible = |net: IpNet, m: &GatewayMember| -> bool {
            let Some(gw) = tunnel_ip(m) else {
                return false;
            };
            match health(gw) {
                Health::Healthy => true,
                Health::Draining => previous
                    .members
                    .get(&(table, net))
                    .is_some_and(|s| s.contains(&gw)),
                Health::Unknown | Health::Down => false,
            }
        };
        let Some(t) = resolver.table(pod, eligible) else {
            continue;
        };
        for entry in t.entries {
            let net = entry.destination;
            if let Some(cluster) = settings.cluster_cidrs.iter().find(|c| c.contains(&net)) {
                if net.prefix_len() > 0 {
                    plan.problems.push(format!(
                        "pod {}/{}: rule for {net} lies inside cluster CIDR {cluster}, which is never steered; skipped",
                        key.0, key.1
                    ));
                }
                continue;
            }
            let kind = match entry.decision {
                Decision::NotOptedIn | Decision::NoGateway => RouteKind::Throw,
                Decision::Blocked(_) => RouteKind::Unreachable,
                Decision::Gateways { members, .. } => {
                    let gws: BTreeSet<Ipv4Addr> = members.iter().filter_map(tunnel_ip).collect();
                    let hops: BTreeSet<IpAddr> = gws
                        .iter()
                        .map(|gw| match net {
                            IpNet::V4(_) => IpAddr::V4(*gw),
                            IpNet::V6(_) => IpAddr::V6(link_local(tunnel_mac(*gw))),
                        })
                        .collect();
                    plan.memory.members.insert((table, net), gws);
                    RouteKind::Via(hops.into_iter().collect())
                }
            };
            plan.desired.routes.insert((table, net), kind);
        }
    }

    for gw in &plan.gateways {
        let mac = tunnel_mac(*gw);
        plan.desired.neighbours.insert(IpAddr::V4(*gw), mac);
        plan.desired
            .neighbours
            .insert(IpAddr::V6(link_local(mac)), mac);
        plan.desired.fdb.insert(mac, *gw);
    }
    plan
}

#[cfg(test)]
mod tests;
