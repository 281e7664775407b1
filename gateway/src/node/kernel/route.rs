//! Routes of the per-pod tables: the messages that write them, reading them back from a dump, and the diff.
//!
//! What `ip route` shows for them, as Felix programs egress tables:
//! * `throw DST proto 242` and `unreachable DST proto 242` (types `RTN_THROW`, `RTN_UNREACHABLE`; IPv6 shows
//!   `dev lo`, the kernel's choice);
//! * IPv4 via one gateway: `DST via GW dev <vxlan> proto 242 onlink` (`RTNH_F_ONLINK` in the header);
//! * IPv4 via several: one route with `RTA_MULTIPATH`, `nexthop via GW dev <vxlan> weight 1 onlink` each;
//! * IPv6: the same with the gateways' link-local addresses and without `onlink` (the neighbours are static).
//!   The kernel reports an IPv6 multipath route as one message with `RTA_MULTIPATH` (as IPv4), so both are
//!   compared the same way: as the sorted set of their next hops;
//! * where the kernel has resilient nexthop groups, routes via gateways instead point at a group:
//!   `DST nhid N proto 242` (`RTA_NH_ID`; [`super::groups`] says which group). The kernel also reports the
//!   group's members in the dump (`nexthop_compat_mode`); only the id is compared.
//!
//! All carry protocol [`RTPROT_EGRESS`] and scope universe; the table goes in `RTA_TABLE` (tables > 255 do not
//! fit the header). No `RTA_PRIORITY` is sent, so IPv4 routes get metric 0 and IPv6 routes metric 1024.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteNextHop,
    RouteNextHopFlags, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

#[cfg(test)]
use super::Message;
use super::{Change, Effect, KernelError};
use crate::node::state::{link_local, tunnel_mac, Ownership, RouteKey, RouteKind, RTPROT_EGRESS};

/// The two families routes are dumped for, with the dump's name for errors.
pub(super) const FAMILIES: [(AddressFamily, &str); 2] = [
    (AddressFamily::Inet, "dump IPv4 routes"),
    (AddressFamily::Inet6, "dump IPv6 routes"),
];

/// The metric the kernel gives a route sent without `RTA_PRIORITY` (`IP6_RT_PRIO_USER` for IPv6).
fn default_metric(dst: &IpNet) -> u32 {
    match dst {
        IpNet::V4(_) => 0,
        IpNet::V6(_) => 1024,
    }
}

/// The table byte of a route or rule header: the table when it fits, else `RT_TABLE_UNSPEC` (the kernel
/// then reads the attribute).
pub(super) fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// One next hop, as compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Hop {
    /// The gateway.
    pub(super) gateway: IpAddr,
    /// The output device.
    pub(super) device: u32,
    /// `RTNH_F_ONLINK`.
    pub(super) onlink: bool,
    /// The kernel's weight value (0 = `weight 1`).
    pub(super) weight: u8,
}

/// What a route does, in the terms the agent compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Shape {
    /// `throw`.
    Throw,
    /// `unreachable`.
    Unreachable,
    /// Via these next hops, sorted (one = a plain route, several = `RTA_MULTIPATH`).
    Via(Vec<Hop>),
    /// Via the nexthop object (a group) with this id.
    Group(u32),
    /// Anything else (another type or scope, an encapsulation, a source prefix, a TOS, a preferred source,
    /// ...): never what the agent wants.
    Other,
}

impl Shape {
    /// The shape the agent writes for `kind` towards `dst` over `device`. An IPv4 gateway in an IPv6 route
    /// stands for the link-local address of its tunnel MAC.
    pub(super) fn desired(
        dst: IpNet,
        kind: &RouteKind,
        device: u32,
    ) -> Result<Shape, &'static str> {
        let gateways = match kind {
            RouteKind::Throw => return Ok(Shape::Throw),
            RouteKind::Unreachable => return Ok(Shape::Unreachable),
            RouteKind::Via(gateways) => gateways,
        };
        if gateways.is_empty() {
            return Err("a route via gateways needs at least one gateway");
        }
        let mut hops = gateways
            .iter()
            .map(|gateway| {
                let (gateway, onlink) = match (dst, *gateway) {
                    (IpNet::V4(_), IpAddr::V4(v4)) => (IpAddr::V4(v4), true),
                    (IpNet::V6(_), IpAddr::V6(v6)) => (IpAddr::V6(v6), false),
                    (IpNet::V6(_), IpAddr::V4(v4)) => {
                        (IpAddr::V6(link_local(tunnel_mac(v4))), false)
                    }
                    (IpNet::V4(_), IpAddr::V6(_)) => {
                        return Err("an IPv4 route cannot have an IPv6 gateway")
                    }
                };
                Ok(Hop {
                    gateway,
                    device,
                    onlink,
                    weight: 0,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        hops.sort();
        hops.dedup();
        Ok(Shape::Via(hops))
    }

    /// The shape of a route the kernel reported.
    pub(super) fn observed(message: &RouteMessage) -> Shape {
        let header = &message.header;
        if header.scope != RouteScope::Universe
            || header.tos != 0
            || header.source_prefix_length != 0
        {
            return Shape::Other;
        }
        let mut gateway = None;
        let mut device = None;
        let mut multipath = None;
        let mut group = None;
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Gateway(address) => gateway = ip(address),
                RouteAttribute::Oif(index) => device = Some(*index),
                RouteAttribute::MultiPath(hops) => multipath = Some(hops),
                RouteAttribute::NhId(id) => group = Some(*id),
                RouteAttribute::Encap(_)
                | RouteAttribute::EncapType(_)
                | RouteAttribute::Via(_)
                | RouteAttribute::PrefSource(_)
                | RouteAttribute::Source(_) => return Shape::Other,
                _ => {}
            }
        }
        match header.kind {
            RouteType::Throw => Shape::Throw,
            RouteType::Unreachable => Shape::Unreachable,
            RouteType::Unicast if group.is_some() => group.map_or(Shape::Other, Shape::Group),
            RouteType::Unicast => {
                let hops = match multipath {
                    Some(hops) => hops.iter().map(observed_hop).collect::<Option<Vec<_>>>(),
                    None => gateway.zip(device).map(|(gateway, device)| {
                        vec![Hop {
                            gateway,
                            device,
                            onlink: header.flags.contains(RouteFlags::Onlink),
                            weight: 0,
                        }]
                    }),
                };
                match hops {
                    Some(mut hops) if !hops.is_empty() => {
                        hops.sort();
                        Shape::Via(hops)
                    }
                    _ => Shape::Other,
                }
            }
            _ => Shape::Other,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Throw => f.write_str("throw"),
            Shape::Unreachable => f.write_str("unreachable"),
            Shape::Other => f.write_str("(another kind of route)"),
            Shape::Group(id) => write!(f, "nhid {id}"),
            Shape::Via(hops) => {
                for (i, hop) in hops.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    if hops.len() > 1 {
                        f.write_str("nexthop ")?;
                    }
                    write!(f, "via {} dev {}", hop.gateway, hop.device)?;
                    if hops.len() > 1 {
                        write!(f, " weight {}", u16::from(hop.weight) + 1)?;
                    }
                    if hop.onlink {
                        f.write_str(" onlink")?;
                    }
                }
                Ok(())
            }
        }
    }
}

fn ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn observed_hop(hop: &RouteNextHop) -> Option<Hop> {
    let mut gateway = None;
    for attribute in &hop.attributes {
        match attribute {
            RouteAttribute::Gateway(address) => gateway = ip(address),
            RouteAttribute::Encap(_) | RouteAttribute::EncapType(_) | RouteAttribute::Via(_) => {
                return None
            }
            _ => {}
        }
    }
    Some(Hop {
        gateway: gateway?,
        device: hop.interface_index,
        onlink: hop.flags.contains(RouteNextHopFlags::Onlink),
        weight: hop.hops,
    })
}

/// The message that writes `shape` as the route to `dst` in `table` (for `RTM_NEWROUTE`).
pub(super) fn message(table: u32, dst: IpNet, shape: &Shape) -> RouteMessage {
    let mut message = RouteMessage::default();
    let header = &mut message.header;
    header.address_family = family(&dst);
    header.destination_prefix_length = dst.prefix_len();
    header.table = header_table(table);
    header.protocol = RouteProtocol::from(RTPROT_EGRESS);
    header.scope = RouteScope::Universe;
    header.kind = match shape {
        Shape::Throw => RouteType::Throw,
        Shape::Unreachable => RouteType::Unreachable,
        Shape::Via(_) | Shape::Group(_) | Shape::Other => RouteType::Unicast,
    };
    message.attributes.push(RouteAttribute::Table(table));
    message
        .attributes
        .push(RouteAttribute::Destination(dst.addr().into()));
    match shape {
        Shape::Via(hops) if hops.len() == 1 => {
            let hop = hops[0];
            if hop.onlink {
                message.header.flags |= RouteFlags::Onlink;
            }
            message
                .attributes
                .push(RouteAttribute::Gateway(hop.gateway.into()));
            message.attributes.push(RouteAttribute::Oif(hop.device));
        }
        Shape::Via(hops) => {
            let hops = hops
                .iter()
                .map(|hop| {
                    let mut next = RouteNextHop::default();
                    if hop.onlink {
                        next.flags |= RouteNextHopFlags::Onlink;
                    }
                    next.hops = hop.weight;
                    next.interface_index = hop.device;
                    next.attributes
                        .push(RouteAttribute::Gateway(hop.gateway.into()));
                    next
                })
                .collect();
            message.attributes.push(RouteAttribute::MultiPath(hops));
        }
        Shape::Group(id) => message.attributes.push(RouteAttribute::NhId(*id)),
        Shape::Throw | Shape::Unreachable | Shape::Other => {}
    }
    message
}

fn family(dst: &IpNet) -> AddressFamily {
    match dst {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}

/// The message that deletes a route the kernel reported: its header and key (table, destination, source,
/// metric) without its next hops, so that a multipath route goes as a whole.
fn delete_message(dumped: &RouteMessage) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header = dumped.header.clone();
    message.header.flags = RouteFlags::empty();
    message.attributes = dumped
        .attributes
        .iter()
        .filter(|attribute| {
            matches!(
                attribute,
                RouteAttribute::Table(_)
                    | RouteAttribute::Destination(_)
                    | RouteAttribute::Source(_)
                    | RouteAttribute::Priority(_)
            )
        })
        .cloned()
        .collect();
    message
}

/// The dump request for one family's routes: all tables, filtered by protocol where the kernel does strict
/// checking (elsewhere [`owned`] filters).
pub(super) fn dump_request(family: AddressFamily) -> RouteNetlinkMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = family;
    message.header.protocol = RouteProtocol::from(RTPROT_EGRESS);
    RouteNetlinkMessage::GetRoute(message)
}

/// A route the agent owns, as the kernel reported it.
#[derive(Debug, Clone)]
pub(super) struct Owned {
    /// Its table and destination.
    pub(super) key: RouteKey,
    /// What it does.
    pub(super) shape: Shape,
    /// Whether it is where the agent's own route with that key would be (default metric; no TOS or
    /// source prefix). Others with the same key are extra and go.
    pub(super) primary: bool,
    /// The dump, to delete it exactly.
    message: RouteMessage,
}

/// The table and destination of a reported route.
fn key(message: &RouteMessage) -> Option<RouteKey> {
    let header = &message.header;
    let mut table = u32::from(header.table);
    let mut dst = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(address) => dst = ip(address),
            _ => {}
        }
    }
    let dst = match (header.address_family, dst) {
        (_, Some(dst)) => dst,
        (AddressFamily::Inet, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (AddressFamily::Inet6, None) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let dst = IpNet::new(dst, header.destination_prefix_length).ok()?;
    Some((table, dst))
}

/// The routes in `dumped` that the agent owns: protocol [`RTPROT_EGRESS`], a table in `owned.tables`.
pub(super) fn owned(dumped: &[RouteNetlinkMessage], owned: &Ownership) -> Vec<Owned> {
    dumped
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewRoute(route) => Some(route),
            _ => None,
        })
        .filter(|route| u8::from(route.header.protocol) == RTPROT_EGRESS)
        .filter(|route| {
            matches!(
                route.header.address_family,
                AddressFamily::Inet | AddressFamily::Inet6
            )
        })
        .filter_map(|route| {
            let key = key(route)?;
            if !owned.tables.contains(&key.0) {
                return None;
            }
            let metric = route
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Priority(metric) => Some(*metric),
                    _ => None,
                })
                .unwrap_or(0);
            let header = &route.header;
            let primary = metric == default_metric(&key.1)
                && header.tos == 0
                && header.source_prefix_length == 0;
            Some(Owned {
                key,
                shape: Shape::observed(route),
                primary,
                message: route.clone(),
            })
        })
        .collect()
}

/// The route requests of one apply.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Adds and replaces.
    pub(super) upsert: Vec<Change>,
    /// Deletions.
    pub(super) remove: Vec<Change>,
}

/// What turns the `observed` owned routes into `desired` (routes via `device`; a route in `groups` via that
/// nexthop group instead of its own next hops).
pub(super) fn plan(
    observed: Vec<Owned>,
    desired: &BTreeMap<RouteKey, RouteKind>,
    device: u32,
    owned: &Ownership,
    groups: &BTreeMap<RouteKey, u32>,
) -> Result<Plan, KernelError> {
    let mut by_key: BTreeMap<RouteKey, Vec<Owned>> = BTreeMap::new();
    for route in observed {
        by_key.entry(route.key).or_default().push(route);
    }
    let mut plan = Plan::default();
    for (&(table, dst), kind) in desired {
        let invalid = |reason| KernelError::InvalidRoute { table, dst, reason };
        if !owned.tables.contains(&table) {
            return Err(invalid("the table is outside the agent's tables"));
        }
        if dst.trunc() != dst {
            return Err(invalid("the destination has host bits set"));
        }
        let mut want = Shape::desired(dst, kind, device).map_err(invalid)?;
        if let (Shape::Via(_), Some(&group)) = (&want, groups.get(&(table, dst))) {
            want = Shape::Group(group);
        }
        let mut existing = by_key.remove(&(table, dst)).unwrap_or_default();
        let primary = existing
            .iter()
            .position(|route| route.primary)
            .map(|i| existing.remove(i));
        match primary {
            Some(route) if route.shape == want => {}
            Some(_) => plan.upsert.push(Change {
                what: format!("replace route {dst} table {table}"),
                message: RouteNetlinkMessage::NewRoute(message(table, dst, &want)).into(),
                flags: NLM_F_CREATE | NLM_F_REPLACE,
                effect: Effect::Replaced,
                objects: 1,
                table: Some(table),
            }),
            None => plan.upsert.push(Change {
                what: format!("add route {dst} table {table}"),
                message: RouteNetlinkMessage::NewRoute(message(table, dst, &want)).into(),
                flags: NLM_F_CREATE | NLM_F_EXCL,
                effect: Effect::Added,
                objects: 1,
                table: Some(table),
            }),
        }
        plan.remove.extend(existing.iter().map(remove));
    }
    plan.remove
        .extend(by_key.values().flat_map(|routes| routes.iter().map(remove)));
    Ok(plan)
}

fn remove(route: &Owned) -> Change {
    let (table, dst) = route.key;
    Change {
        what: format!("delete route {dst} table {table}"),
        message: RouteNetlinkMessage::DelRoute(delete_message(&route.message)).into(),
        flags: 0,
        effect: Effect::Removed,
        objects: 1,
        table: Some(table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::{RouteCacheInfo, RoutePreference};
    use rtnetlink::packet_core::{Emitable, Parseable};

    fn owned_tables() -> Ownership {
        Ownership {
            device: "egress.calico".into(),
            rule_priority: 100,
            tables: 300..=399,
            nexthops: crate::node::state::NEXTHOP_IDS,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Emits and parses back, as the kernel would see the request.
    fn round_trip(message: &RouteMessage) -> RouteMessage {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        RouteMessage::parse(bytes.as_slice()).unwrap()
    }

    /// What a dump returns for `message`: the request plus what the kernel adds.
    fn as_dumped(message: &RouteMessage) -> RouteMessage {
        let mut dumped = round_trip(message);
        dumped.header.table = if dumped.header.table == 0 {
            252
        } else {
            dumped.header.table
        };
        if dumped.header.address_family == AddressFamily::Inet6 {
            dumped.attributes.push(RouteAttribute::Priority(1024));
            dumped
                .attributes
                .push(RouteAttribute::Preference(RoutePreference::Medium));
            dumped.attributes.push(RouteAttribute::CacheInfo(
                RouteCacheInfo::parse(&[0; 32]).unwrap(),
            ));
        }
        dumped
    }

    #[test]
    fn throw_and_unreachable_carry_type_protocol_scope_and_table() {
        let dst = net("10.0.0.0/8");
        let throw = message(301, dst, &Shape::Throw);
        assert_eq!(throw.header.kind, RouteType::Throw);
        assert_eq!(u8::from(throw.header.protocol), 242);
        assert_eq!(throw.header.scope, RouteScope::Universe);
        assert_eq!(throw.header.table, 0, "table 301 does not fit the header");
        assert!(throw.attributes.contains(&RouteAttribute::Table(301)));
        assert!(!throw
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Oif(_) | RouteAttribute::Gateway(_))));
        let unreachable = message(200, net("2001:db8::/32"), &Shape::Unreachable);
        assert_eq!(unreachable.header.kind, RouteType::Unreachable);
        assert_eq!(unreachable.header.table, 200);
        assert_eq!(unreachable.header.address_family, AddressFamily::Inet6);
    }

    #[test]
    fn ipv4_single_gateway_is_onlink_over_the_device() {
        let dst = net("0.0.0.0/0");
        let shape = Shape::desired(dst, &RouteKind::Via(vec![ip("10.244.1.5")]), 7).unwrap();
        let m = message(300, dst, &shape);
        assert_eq!(m.header.kind, RouteType::Unicast);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert!(m
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet(
                "10.244.1.5".parse().unwrap()
            ))));
        assert!(m.attributes.contains(&RouteAttribute::Oif(7)));
        assert_eq!(shape.to_string(), "via 10.244.1.5 dev 7 onlink");
    }

    #[test]
    fn ipv4_multipath_has_one_onlink_hop_per_gateway() {
        let dst = net("0.0.0.0/0");
        let kind = RouteKind::Via(vec![ip("10.244.2.9"), ip("10.244.1.5")]);
        let shape = Shape::desired(dst, &kind, 7).unwrap();
        let m = round_trip(&message(300, dst, &shape));
        let hops = m
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::MultiPath(hops) => Some(hops.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(hops.len(), 2);
        for hop in &hops {
            assert!(hop.flags.contains(RouteNextHopFlags::Onlink));
            assert_eq!(hop.interface_index, 7);
            assert_eq!(hop.hops, 0, "weight 1");
        }
        assert!(!m.header.flags.contains(RouteFlags::Onlink));
        assert_eq!(
            shape.to_string(),
            "nexthop via 10.244.1.5 dev 7 weight 1 onlink nexthop via 10.244.2.9 dev 7 weight 1 onlink"
        );
    }

    #[test]
    fn ipv6_hops_are_link_local_and_not_onlink() {
        let dst = net("::/0");
        let ll = link_local(tunnel_mac("10.244.1.5".parse().unwrap()));
        let given = Shape::desired(dst, &RouteKind::Via(vec![IpAddr::V6(ll)]), 7).unwrap();
        // An IPv4 gateway in an IPv6 route means the link-local of its tunnel MAC.
        let derived = Shape::desired(dst, &RouteKind::Via(vec![ip("10.244.1.5")]), 7).unwrap();
        assert_eq!(given, derived);
        let m = message(300, dst, &given);
        assert!(!m.header.flags.contains(RouteFlags::Onlink));
        assert!(m
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet6(ll))));
    }

    #[test]
    fn invalid_desired_routes_are_refused() {
        assert!(Shape::desired(net("10.0.0.0/8"), &RouteKind::Via(vec![]), 1).is_err());
        assert!(
            Shape::desired(net("10.0.0.0/8"), &RouteKind::Via(vec![ip("fe80::1")]), 1).is_err()
        );
        let mut desired = BTreeMap::new();
        desired.insert((300, net("10.1.2.3/8")), RouteKind::Throw);
        let e = plan(vec![], &desired, 1, &owned_tables(), &BTreeMap::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "route 10.1.2.3/8 table 300: the destination has host bits set"
        );
        let mut desired = BTreeMap::new();
        desired.insert((254, net("10.0.0.0/8")), RouteKind::Throw);
        let e = plan(vec![], &desired, 1, &owned_tables(), &BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("outside the agent's tables"), "{e}");
    }

    /// Every shape reads back from what the kernel would dump as the shape that was written: the basis of
    /// idempotent applies.
    #[test]
    fn written_shapes_read_back_equal() {
        let cases = [
            (net("10.0.0.0/8"), RouteKind::Throw),
            (net("203.0.113.0/24"), RouteKind::Unreachable),
            (net("0.0.0.0/0"), RouteKind::Via(vec![ip("10.244.1.5")])),
            (
                net("0.0.0.0/0"),
                RouteKind::Via(vec![ip("10.244.1.5"), ip("10.244.2.9")]),
            ),
            (net("fd00::/8"), RouteKind::Throw),
            (net("2001:db8::/32"), RouteKind::Unreachable),
            (
                net("::/0"),
                RouteKind::Via(vec![ip("fe80::a02a:aff:fef4:105")]),
            ),
            (
                net("::/0"),
                RouteKind::Via(vec![
                    ip("fe80::a02a:aff:fef4:105"),
                    ip("fe80::a02a:aff:fef4:209"),
                ]),
            ),
        ];
        for (dst, kind) in cases {
            let want = Shape::desired(dst, &kind, 9).unwrap();
            let dumped = as_dumped(&message(4000, dst, &want));
            assert_eq!(Shape::observed(&dumped), want, "{dst} {kind:?}");
            let found = owned(
                &[RouteNetlinkMessage::NewRoute(dumped)],
                &Ownership {
                    tables: 4000..=4000,
                    ..owned_tables()
                },
            );
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].key, (4000, dst));
            assert!(found[0].primary, "{dst}");
        }
    }

    #[test]
    fn reported_state_flags_do_not_matter_but_onlink_and_device_do() {
        let dst = net("0.0.0.0/0");
        let kind = RouteKind::Via(vec![ip("10.244.1.5"), ip("10.244.2.9")]);
        let want = Shape::desired(dst, &kind, 9).unwrap();
        let mut dumped = as_dumped(&message(300, dst, &want));
        for attribute in &mut dumped.attributes {
            if let RouteAttribute::MultiPath(hops) = attribute {
                hops.reverse();
                hops[0].flags |= RouteNextHopFlags::Linkdown;
            }
        }
        // Order and state flags (linkdown, dead) are not configuration: still the same route.
        assert_eq!(Shape::observed(&dumped), want);
        // Without onlink, or over another device, it is not.
        for attribute in &mut dumped.attributes {
            if let RouteAttribute::MultiPath(hops) = attribute {
                hops[1].flags.remove(RouteNextHopFlags::Onlink);
            }
        }
        assert_ne!(Shape::observed(&dumped), want);
        assert_ne!(Shape::desired(dst, &kind, 10).unwrap(), want);
    }

    #[test]
    fn ownership_is_protocol_and_table_range() {
        let want = Shape::Throw;
        let mut ours = as_dumped(&message(300, net("10.0.0.0/8"), &want));
        let theirs = {
            let mut m = ours.clone();
            m.header.protocol = RouteProtocol::Static;
            m
        };
        let outside = as_dumped(&message(500, net("10.0.0.0/8"), &want));
        let found = owned(
            &[
                RouteNetlinkMessage::NewRoute(ours.clone()),
                RouteNetlinkMessage::NewRoute(theirs),
                RouteNetlinkMessage::NewRoute(outside),
            ],
            &owned_tables(),
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, (300, net("10.0.0.0/8")));
        // The same key with another metric is owned but not primary.
        ours.attributes.push(RouteAttribute::Priority(5));
        let found = owned(&[RouteNetlinkMessage::NewRoute(ours)], &owned_tables());
        assert!(!found[0].primary);
    }

    fn dumped_owned(table: u32, dst: &str, kind: &RouteKind) -> Vec<Owned> {
        let dst = net(dst);
        let shape = Shape::desired(dst, kind, 9).unwrap();
        owned(
            &[RouteNetlinkMessage::NewRoute(as_dumped(&message(
                table, dst, &shape,
            )))],
            &owned_tables(),
        )
    }

    #[test]
    fn plan_adds_replaces_and_removes() {
        let via = RouteKind::Via(vec![ip("10.244.1.5"), ip("10.244.2.9")]);
        let mut observed = dumped_owned(300, "0.0.0.0/0", &via);
        observed.extend(dumped_owned(300, "10.0.0.0/8", &RouteKind::Throw));
        observed.extend(dumped_owned(301, "0.0.0.0/0", &RouteKind::Throw));
        observed.extend(dumped_owned(302, "::/0", &RouteKind::Unreachable));

        let mut desired = BTreeMap::new();
        desired.insert(
            (300, net("0.0.0.0/0")),
            RouteKind::Via(vec![ip("10.244.2.9")]),
        );
        desired.insert((300, net("10.0.0.0/8")), RouteKind::Throw);
        desired.insert((302, net("::/0")), RouteKind::Unreachable);
        desired.insert((303, net("::/0")), RouteKind::Throw);

        let p = plan(observed, &desired, 9, &owned_tables(), &BTreeMap::new()).unwrap();
        let whats: Vec<_> = p.upsert.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "replace route 0.0.0.0/0 table 300",
                "add route ::/0 table 303"
            ]
        );
        assert_eq!(p.upsert[0].flags, NLM_F_CREATE | NLM_F_REPLACE);
        assert_eq!(p.upsert[1].flags, NLM_F_CREATE | NLM_F_EXCL);
        let whats: Vec<_> = p.remove.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(whats, ["delete route 0.0.0.0/0 table 301"]);
        let Message::Rtnl(RouteNetlinkMessage::DelRoute(del)) = &p.remove[0].message else {
            panic!("not a delete")
        };
        assert_eq!(u8::from(del.header.protocol), 242);
        assert_eq!(del.header.kind, RouteType::Throw);
        assert!(del.attributes.contains(&RouteAttribute::Table(301)));

        // The same device and kinds: nothing to do.
        let observed = dumped_owned(300, "0.0.0.0/0", &via);
        let mut desired = BTreeMap::new();
        desired.insert((300, net("0.0.0.0/0")), via.clone());
        let p = plan(observed, &desired, 9, &owned_tables(), &BTreeMap::new()).unwrap();
        assert!(p.upsert.is_empty() && p.remove.is_empty());
        // Another device: replace.
        let observed = dumped_owned(300, "0.0.0.0/0", &via);
        let p = plan(observed, &desired, 10, &owned_tables(), &BTreeMap::new()).unwrap();
        assert_eq!(p.upsert.len(), 1);
        assert_eq!(p.upsert[0].effect, Effect::Replaced);
    }

    #[test]
    fn plan_removes_extra_routes_at_the_same_key() {
        let mut observed = dumped_owned(302, "::/0", &RouteKind::Unreachable);
        let mut extra = observed[0].clone();
        extra.primary = false;
        observed.push(extra);
        let mut desired = BTreeMap::new();
        desired.insert((302, net("::/0")), RouteKind::Unreachable);
        let p = plan(observed, &desired, 9, &owned_tables(), &BTreeMap::new()).unwrap();
        assert!(p.upsert.is_empty());
        assert_eq!(p.remove.len(), 1);
    }
}
