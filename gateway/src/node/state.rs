//! What the node agent wants the kernel to hold: the vxlan device, ip rules, the routes of the per-pod
//! tables, static neighbours and FDB entries. Computed by `desired.rs` (pure), written by `kernel.rs`.
//!
//! Ownership: the agent only ever reads, changes or deletes
//! * rules and routes whose protocol is [`RTPROT_EGRESS`] (and, for rules, whose priority and table are
//!   the configured ones),
//! * nexthop objects whose protocol is [`RTPROT_EGRESS`] and whose id is in [`NEXTHOP_IDS`],
//! * the vxlan device it created (its `ifalias` is [`DEVICE_ALIAS`]) and the neighbours and FDB entries
//!   on that device.
//!
//! Everything else on the node is left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

/// The routing protocol number on every rule and route the agent makes (`ip route show proto 242`).
pub(crate) const RTPROT_EGRESS: u8 = 242;
/// The `ifalias` of a vxlan device the agent created.
pub(crate) const DEVICE_ALIAS: &str = "egress-gateway node agent";

/// The ids of the agent's nexthop objects (`ip nexthop show proto 242`): 0xf2f2_0000 to 0xf2f2_ffff
/// (242 is [`RTPROT_EGRESS`]). Nexthop ids are one namespace per network namespace, shared with every
/// routing daemon on the node (FRR's zebra, for one, numbers its own from the bottom up), so the agent keeps
/// to a fixed block high in the space rather than one derived from its tables: groups are per set of
/// gateways, not per pod, and a block of 65,536 needs no configuration. An id in the block that another
/// program uses (another protocol) is left alone and skipped.
pub(crate) const NEXTHOP_IDS: RangeInclusive<u32> = 0xf2f2_0000..=0xf2f2_ffff;

/// A MAC address.
pub(crate) type Mac = [u8; 6];

/// The vxlan device, as Felix makes `egress.calico`: no learning, static FDB and neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VxlanSpec {
    /// Device name (at most 15 bytes).
    pub(crate) device: String,
    /// VXLAN network identifier.
    pub(crate) vni: u32,
    /// Destination UDP port.
    pub(crate) port: u16,
    /// Device MTU.
    pub(crate) mtu: u32,
    /// Local (underlay) address: outer source of the tunnel.
    pub(crate) local: Ipv4Addr,
    /// Underlay device (`dev` of the vxlan): the one holding `local`.
    pub(crate) underlay_device: String,
}

/// What the agent owns on the node; [`crate::node::kernel`] never touches anything outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ownership {
    /// The vxlan device's name.
    pub(crate) device: String,
    /// Priority of the agent's ip rules.
    pub(crate) rule_priority: u32,
    /// Route tables the agent may use.
    pub(crate) tables: RangeInclusive<u32>,
    /// Nexthop ids the agent may use ([`NEXTHOP_IDS`]).
    pub(crate) nexthops: RangeInclusive<u32>,
}

/// One `ip rule`: `from <src> lookup <table> priority <p> proto 242`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct RuleSpec {
    /// The pod's address (a /32 or /128 source match).
    pub(crate) src: IpAddr,
    /// Its table.
    pub(crate) table: u32,
    /// The rule's priority.
    pub(crate) priority: u32,
}

/// What a route in a pod's table does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum RouteKind {
    /// `throw`: leave the table, continue with the next rule (normal routing).
    Throw,
    /// `unreachable`: the pod's traffic is refused (fail closed).
    Unreachable,
    /// Via these gateways over the vxlan device, with equal weights: a resilient nexthop group of them, or
    /// (a kernel without such groups) a plain or multipath route. IPv4
    /// next hops are the gateways' pod IPs, `onlink`; IPv6 next hops are the link-local addresses of the
    /// gateways' tunnel MACs. Sorted, not empty.
    Via(Vec<IpAddr>),
}

/// The key of one route: (table, destination). The family is the destination's.
pub(crate) type RouteKey = (u32, IpNet);

/// The whole desired state of the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Desired {
    /// ip rules (both families).
    pub(crate) rules: BTreeSet<RuleSpec>,
    /// Routes of the per-pod tables.
    pub(crate) routes: BTreeMap<RouteKey, RouteKind>,
    /// Permanent neighbours on the vxlan device: gateway IPv4 → tunnel MAC, and the IPv6 link-local of
    /// that MAC → the same MAC.
    pub(crate) neighbours: BTreeMap<IpAddr, Mac>,
    /// FDB entries on the vxlan device: tunnel MAC → the gateway's underlay (pod) IPv4 address.
    pub(crate) fdb: BTreeMap<Mac, Ipv4Addr>,
}

/// The inner (tunnel) MAC of a gateway: `a2:2a:` + the four bytes of its IPv4 pod address.
pub(crate) fn tunnel_mac(ip: Ipv4Addr) -> Mac {
    let o = ip.octets();
    [0xa2, 0x2a, o[0], o[1], o[2], o[3]]
}

/// The EUI-64 link-local address of `mac`, as the kernel gives an interface with that MAC: the IPv6 next
/// hop of a gateway.
pub(crate) fn link_local(mac: Mac) -> Ipv6Addr {
    let w = |hi: u8, lo: u8| (u16::from(hi) << 8) | u16::from(lo);
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        w(mac[0] ^ 0x02, mac[1]),
        w(mac[2], 0xff),
        w(0xfe, mac[3]),
        w(mac[4], mac[5]),
    )
}

/// `aa:bb:cc:dd:ee:ff`.
pub(crate) fn mac_to_string(mac: Mac) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

/// What one reconcile changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ApplyReport {
    /// Objects (rules, routes, neighbours, FDB entries) added.
    pub(crate) added: usize,
    /// Objects replaced because they differed.
    pub(crate) replaced: usize,
    /// Objects the agent owned that are no longer wanted, deleted.
    pub(crate) removed: usize,
}

impl ApplyReport {
    /// Nothing changed.
    pub(crate) fn is_empty(&self) -> bool {
        self.added == 0 && self.replaced == 0 && self.removed == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_mac_and_link_local_match_the_kernel() {
        let mac = tunnel_mac(Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(mac_to_string(mac), "a2:2a:ac:12:00:03");
        // `ip -6 addr` on a device with MAC a2:2a:ac:12:00:03 shows fe80::a02a:acff:fe12:3.
        assert_eq!(
            link_local(mac),
            "fe80::a02a:acff:fe12:3".parse::<Ipv6Addr>().unwrap()
        );
    }
}
