//! Static neighbours and FDB entries on the vxlan device: the messages that write them, reading them back
//! from a dump, and the diff.
//!
//! * Neighbours: `ip neigh replace GW lladdr MAC dev <vxlan> nud permanent` for each gateway's IPv4 address
//!   and the IPv6 link-local address of its tunnel MAC. The agent owns the permanent ones on its device; a
//!   kernel-made (non-permanent) entry for an address the agent wants is replaced, others are left to the
//!   kernel.
//! * FDB: `bridge fdb append MAC dev <vxlan> dst GW self permanent` (an `AF_BRIDGE` neighbour). All entries on
//!   the agent's device are the agent's. A vxlan device keeps one entry per MAC with a list of destinations;
//!   the agent wants exactly one destination per MAC.
//!
//! Adds use `NLM_F_CREATE | NLM_F_REPLACE` too, so that an entry the kernel made between the dump and the
//! request does not make the add fail.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};

use super::{Change, Effect};
use crate::node::state::{mac_to_string, Mac};

/// The dump request for the IPv4 and IPv6 neighbours of `device` (the kernel filters by device where it
/// checks dump requests strictly; [`observed`] filters anyway).
pub(super) fn dump_request(device: u32) -> RouteNetlinkMessage {
    let mut message = NeighbourMessage::default();
    message.attributes.push(NeighbourAttribute::IfIndex(device));
    RouteNetlinkMessage::GetNeighbour(message)
}

/// The dump request for the FDB entries of `device`.
pub(super) fn fdb_dump_request(device: u32) -> RouteNetlinkMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = device;
    RouteNetlinkMessage::GetNeighbour(message)
}

/// A neighbour on the device, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Neighbour {
    /// Its address.
    pub(super) ip: IpAddr,
    /// Its link-layer address, if it has a (6-byte) one.
    pub(super) mac: Option<Mac>,
    /// `NUD_PERMANENT`: the agent's.
    pub(super) permanent: bool,
}

fn mac(bytes: &[u8]) -> Option<Mac> {
    bytes.try_into().ok()
}

fn address(address: &NeighbourAddress) -> Option<IpAddr> {
    match address {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice())
                .ok()
                .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        },
        _ => None,
    }
}

/// The IPv4 and IPv6 neighbours on `device` in `dumped`.
pub(super) fn observed(dumped: &[RouteNetlinkMessage], device: u32) -> Vec<Neighbour> {
    dumped
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewNeighbour(n) => Some(n),
            _ => None,
        })
        .filter(|n| {
            n.header.ifindex == device
                && matches!(n.header.family, AddressFamily::Inet | AddressFamily::Inet6)
        })
        .filter_map(|n| {
            let mut ip = None;
            let mut lladdr = None;
            for attribute in &n.attributes {
                match attribute {
                    NeighbourAttribute::Destination(a) => ip = address(a),
                    NeighbourAttribute::LinkLayerAddress(bytes) => lladdr = mac(bytes),
                    _ => {}
                }
            }
            Some(Neighbour {
                ip: ip?,
                mac: lladdr,
                permanent: n.header.state == NeighbourState::Permanent,
            })
        })
        .collect()
}

fn base(family: AddressFamily, device: u32) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = family;
    message.header.ifindex = device;
    message
}

fn ip_family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// `ip neigh replace IP lladdr MAC dev <device> nud permanent`.
pub(super) fn message(device: u32, ip: IpAddr, mac: Mac) -> NeighbourMessage {
    let mut message = base(ip_family(ip), device);
    message.header.state = NeighbourState::Permanent;
    message.attributes = vec![
        NeighbourAttribute::Destination(ip.into()),
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
    ];
    message
}

/// The neighbour and FDB requests of one apply.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Adds and replaces (before the routes).
    pub(super) upsert: Vec<Change>,
    /// Deletions (after the routes).
    pub(super) remove: Vec<Change>,
}

/// What turns the `observed` neighbours of `device` (called `name`) into `desired`.
pub(super) fn plan(
    observed: &[Neighbour],
    desired: &BTreeMap<IpAddr, Mac>,
    device: u32,
    name: &str,
) -> Plan {
    let by_ip: BTreeMap<IpAddr, &Neighbour> = observed.iter().map(|n| (n.ip, n)).collect();
    let mut plan = Plan::default();
    for (&ip, &mac) in desired {
        let effect = match by_ip.get(&ip) {
            Some(n) if n.permanent && n.mac == Some(mac) => continue,
            Some(_) => Effect::Replaced,
            None => Effect::Added,
        };
        let verb = if effect == Effect::Added {
            "add"
        } else {
            "replace"
        };
        plan.upsert.push(Change {
            what: format!(
                "{verb} neighbour {ip} lladdr {} dev {name}",
                mac_to_string(mac)
            ),
            message: RouteNetlinkMessage::NewNeighbour(message(device, ip, mac)).into(),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
            effect,
            objects: 1,
            table: None,
        });
    }
    for n in observed {
        if n.permanent && !desired.contains_key(&n.ip) {
            let mut message = base(ip_family(n.ip), device);
            message.attributes = vec![NeighbourAttribute::Destination(n.ip.into())];
            plan.remove.push(Change {
                what: format!("delete neighbour {} dev {name}", n.ip),
                message: RouteNetlinkMessage::DelNeighbour(message).into(),
                flags: 0,
                effect: Effect::Removed,
                objects: 1,
                table: None,
            });
        }
    }
    plan
}

/// One destination of an FDB entry on the device, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FdbRow {
    /// The entry's MAC.
    pub(super) mac: Mac,
    /// Its destination (the remote VTEP).
    pub(super) dst: Option<IpAddr>,
    /// Permanent, and no port, VNI or device of its own: what the agent writes.
    pub(super) plain: bool,
}

/// The FDB rows on `device` in `dumped`.
pub(super) fn observed_fdb(dumped: &[RouteNetlinkMessage], device: u32) -> Vec<FdbRow> {
    dumped
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewNeighbour(n) => Some(n),
            _ => None,
        })
        .filter(|n| n.header.family == AddressFamily::Bridge && n.header.ifindex == device)
        .filter_map(|n| {
            let mut lladdr = None;
            let mut dst = None;
            let mut plain = n.header.state == NeighbourState::Permanent;
            for attribute in &n.attributes {
                match attribute {
                    NeighbourAttribute::LinkLayerAddress(bytes) => lladdr = mac(bytes),
                    NeighbourAttribute::Destination(a) => dst = address(a),
                    NeighbourAttribute::Port(_)
                    | NeighbourAttribute::Vni(_)
                    | NeighbourAttribute::IfIndex(_)
                    | NeighbourAttribute::SourceVni(_) => plain = false,
                    _ => {}
                }
            }
            Some(FdbRow {
                mac: lladdr?,
                dst,
                plain,
            })
        })
        .collect()
}

fn fdb_base(device: u32, mac: Mac) -> NeighbourMessage {
    let mut message = base(AddressFamily::Bridge, device);
    message.header.flags = NeighbourFlags::Own;
    message.attributes = vec![NeighbourAttribute::LinkLayerAddress(mac.to_vec())];
    message
}

/// `bridge fdb replace MAC dev <device> dst DST self permanent`.
pub(super) fn fdb_message(device: u32, mac: Mac, dst: Ipv4Addr) -> NeighbourMessage {
    let mut message = fdb_base(device, mac);
    message.header.state = NeighbourState::Permanent;
    message
        .attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    message
}

/// What turns the `observed` FDB of `device` (called `name`) into `desired`.
pub(super) fn plan_fdb(
    observed: &[FdbRow],
    desired: &BTreeMap<Mac, Ipv4Addr>,
    device: u32,
    name: &str,
) -> Plan {
    let mut by_mac: BTreeMap<Mac, Vec<&FdbRow>> = BTreeMap::new();
    for row in observed {
        by_mac.entry(row.mac).or_default().push(row);
    }
    let delete = |mac: Mac, rows: usize| Change {
        what: format!("delete FDB entry {} dev {name}", mac_to_string(mac)),
        message: RouteNetlinkMessage::DelNeighbour(fdb_base(device, mac)).into(),
        flags: 0,
        effect: Effect::Removed,
        objects: rows,
        table: None,
    };
    let write = |mac: Mac, dst: Ipv4Addr, effect: Effect| Change {
        what: format!(
            "{} FDB entry {} dst {dst} dev {name}",
            if effect == Effect::Added {
                "add"
            } else {
                "replace"
            },
            mac_to_string(mac)
        ),
        message: RouteNetlinkMessage::NewNeighbour(fdb_message(device, mac, dst)).into(),
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        effect,
        objects: 1,
        table: None,
    };
    let mut plan = Plan::default();
    for (&mac, &dst) in desired {
        let rows = by_mac.remove(&mac).unwrap_or_default();
        match rows.as_slice() {
            [] => plan.upsert.push(write(mac, dst, Effect::Added)),
            [row] if row.plain && row.dst == Some(IpAddr::V4(dst)) => {}
            [_] => plan.upsert.push(write(mac, dst, Effect::Replaced)),
            several => {
                // A replace only rewrites the first destination: start again from one.
                plan.upsert.push(delete(mac, several.len()));
                plan.upsert.push(write(mac, dst, Effect::Added));
            }
        }
    }
    for (mac, rows) in by_mac {
        plan.remove.push(delete(mac, rows.len()));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::state::{link_local, tunnel_mac};
    use rtnetlink::packet_core::{Emitable, Parseable};

    fn dumped(message: &NeighbourMessage) -> RouteNetlinkMessage {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        RouteNetlinkMessage::NewNeighbour(NeighbourMessage::parse(bytes.as_slice()).unwrap())
    }

    fn gw(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 1, last)
    }

    #[test]
    fn neighbour_messages_read_back() {
        let mac = tunnel_mac(gw(5));
        let v6 = IpAddr::V6(link_local(mac));
        let dumps = [
            dumped(&message(7, IpAddr::V4(gw(5)), mac)),
            dumped(&message(7, v6, mac)),
            dumped(&message(8, IpAddr::V4(gw(6)), mac)),
        ];
        let found = observed(&dumps, 7);
        assert_eq!(
            found,
            [
                Neighbour {
                    ip: IpAddr::V4(gw(5)),
                    mac: Some(mac),
                    permanent: true
                },
                Neighbour {
                    ip: v6,
                    mac: Some(mac),
                    permanent: true
                }
            ]
        );
    }

    #[test]
    fn neighbour_plan() {
        let (a, b, c, d) = (gw(1), gw(2), gw(3), gw(4));
        let observed = [
            // right
            Neighbour {
                ip: a.into(),
                mac: Some(tunnel_mac(a)),
                permanent: true,
            },
            // wrong MAC
            Neighbour {
                ip: b.into(),
                mac: Some(tunnel_mac(a)),
                permanent: true,
            },
            // made by the kernel, wanted: replaced
            Neighbour {
                ip: c.into(),
                mac: None,
                permanent: false,
            },
            // made by the kernel, not wanted: left alone
            Neighbour {
                ip: d.into(),
                mac: None,
                permanent: false,
            },
            // the agent's, no longer wanted
            Neighbour {
                ip: gw(9).into(),
                mac: Some(tunnel_mac(gw(9))),
                permanent: true,
            },
        ];
        let desired: BTreeMap<IpAddr, Mac> = [a, b, c, gw(5)]
            .into_iter()
            .map(|ip| (IpAddr::V4(ip), tunnel_mac(ip)))
            .collect();
        let p = plan(&observed, &desired, 7, "egress.calico");
        let whats: Vec<_> = p.upsert.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "replace neighbour 10.244.1.2 lladdr a2:2a:0a:f4:01:02 dev egress.calico",
                "replace neighbour 10.244.1.3 lladdr a2:2a:0a:f4:01:03 dev egress.calico",
                "add neighbour 10.244.1.5 lladdr a2:2a:0a:f4:01:05 dev egress.calico"
            ]
        );
        let whats: Vec<_> = p.remove.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(whats, ["delete neighbour 10.244.1.9 dev egress.calico"]);
    }

    #[test]
    fn fdb_messages_read_back() {
        let mac = tunnel_mac(gw(5));
        let m = fdb_message(7, mac, gw(5));
        assert!(m.header.flags.contains(NeighbourFlags::Own), "NTF_SELF");
        let found = observed_fdb(&[dumped(&m)], 7);
        assert_eq!(
            found,
            [FdbRow {
                mac,
                dst: Some(IpAddr::V4(gw(5))),
                plain: true
            }]
        );
        assert!(observed_fdb(&[dumped(&m)], 8).is_empty());
    }

    #[test]
    fn fdb_plan() {
        let row = |mac_of: u8, dst: u8, plain: bool| FdbRow {
            mac: tunnel_mac(gw(mac_of)),
            dst: Some(IpAddr::V4(gw(dst))),
            plain,
        };
        let observed = [
            row(1, 1, true),  // right
            row(2, 9, true),  // wrong destination
            row(3, 3, false), // its own port
            row(4, 4, true),  // two destinations
            row(4, 8, true),
            row(6, 6, true), // not wanted
        ];
        let desired: BTreeMap<Mac, Ipv4Addr> = [1, 2, 3, 4, 5]
            .into_iter()
            .map(|i| (tunnel_mac(gw(i)), gw(i)))
            .collect();
        let p = plan_fdb(&observed, &desired, 7, "egress.calico");
        let whats: Vec<_> = p
            .upsert
            .iter()
            .map(|c| (c.what.as_str(), c.effect, c.objects))
            .collect();
        assert_eq!(
            whats,
            [
                (
                    "replace FDB entry a2:2a:0a:f4:01:02 dst 10.244.1.2 dev egress.calico",
                    Effect::Replaced,
                    1
                ),
                (
                    "replace FDB entry a2:2a:0a:f4:01:03 dst 10.244.1.3 dev egress.calico",
                    Effect::Replaced,
                    1
                ),
                (
                    "delete FDB entry a2:2a:0a:f4:01:04 dev egress.calico",
                    Effect::Removed,
                    2
                ),
                (
                    "add FDB entry a2:2a:0a:f4:01:04 dst 10.244.1.4 dev egress.calico",
                    Effect::Added,
                    1
                ),
                (
                    "add FDB entry a2:2a:0a:f4:01:05 dst 10.244.1.5 dev egress.calico",
                    Effect::Added,
                    1
                ),
            ]
        );
        let whats: Vec<_> = p.remove.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(
            whats,
            ["delete FDB entry a2:2a:0a:f4:01:06 dev egress.calico"]
        );
    }
}
