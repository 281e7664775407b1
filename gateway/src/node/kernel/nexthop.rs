//! Nexthop objects (`ip nexthop`): the bytes of `RTM_NEWNEXTHOP` / `RTM_DELNEXTHOP` / `RTM_GETNEXTHOP` and
//! reading the kernel's answers. netlink-packet-route 0.34, the newest release, has `RTA_NH_ID` for routes
//! but no nexthop messages, so this is a small hand-written codec of the uapi (`linux/nexthop.h`,
//! `linux/rtnetlink.h`):
//!
//! ```text
//! struct nhmsg { u8 nh_family; u8 nh_scope; u8 nh_protocol; u8 resvd; u32 nh_flags; }    8 bytes
//! NHA_ID 1 u32 · NHA_GROUP 2 [struct nexthop_grp { u32 id; u8 weight; u8 weight_high; u16 resvd; }]
//! NHA_GROUP_TYPE 3 u16 (0 hash-threshold, 1 resilient) · NHA_BLACKHOLE 4 · NHA_OIF 5 u32
//! NHA_GATEWAY 6 (4 or 16 bytes) · NHA_ENCAP_TYPE 7 · NHA_ENCAP 8 · NHA_FDB 11
//! NHA_RES_GROUP 12 nested { BUCKETS 1 u16 · IDLE_TIMER 2 u32 clock_t · UNBALANCED_TIMER 3 u32 clock_t }
//! ```
//!
//! Requests are laid out attribute for attribute as iproute2 6.1 sends them (the tests compare with bytes
//! captured from `ip nexthop` under strace). Everything the kernel sends is untrusted: [`parse`] checks
//! every length before reading and returns an error for a malformed message, never panics; attributes it
//! does not know are skipped, and a nexthop it cannot describe is [`Kind::Other`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkSerializable, NlaBuffer, NlasIterator,
};

use crate::node::state::RTPROT_EGRESS;

/// `RTM_NEWNEXTHOP`.
pub(super) const RTM_NEWNEXTHOP: u16 = 104;
/// `RTM_DELNEXTHOP`.
pub(super) const RTM_DELNEXTHOP: u16 = 105;
/// `RTM_GETNEXTHOP`.
pub(super) const RTM_GETNEXTHOP: u16 = 106;

const NHMSG_LEN: usize = 8;
const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_GROUP_TYPE: u16 = 3;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_ENCAP_TYPE: u16 = 7;
const NHA_ENCAP: u16 = 8;
const NHA_FDB: u16 = 11;
const NHA_RES_GROUP: u16 = 12;
const NHA_RES_GROUP_BUCKETS: u16 = 1;
const NHA_RES_GROUP_IDLE_TIMER: u16 = 2;
const NHA_RES_GROUP_UNBALANCED_TIMER: u16 = 3;
const NEXTHOP_GRP_TYPE_RES: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const RTNH_F_ONLINK: u32 = 4;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `struct nexthop_grp`.
const GROUP_ENTRY_LEN: usize = 8;

/// The kernel's clock_t unit in netlink (`USER_HZ`): the timers are in hundredths of a second.
pub(super) const USER_HZ: u32 = 100;

/// The settings of a resilient group (`type resilient buckets B idle_timer I unbalanced_timer U`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Resilient {
    /// Hash buckets, shared out among the members (fixed once the group exists).
    pub(super) buckets: u16,
    /// A bucket that saw no packet for this long (clock_t) may be moved to another member.
    pub(super) idle_timer: u32,
    /// A group unbalanced for this long (clock_t) moves busy buckets too; 0 = never.
    pub(super) unbalanced_timer: u32,
}

/// What the agent's groups use: 64 buckets, idle after 120 s, never forced (see docs/node-agent.md).
pub(super) const RESILIENT: Resilient = Resilient {
    buckets: 64,
    idle_timer: 120 * USER_HZ,
    unbalanced_timer: 0,
};

/// One entry of a group: a member's id and its weight (1..=256; the wire holds weight − 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Entry {
    /// The member nexthop.
    pub(super) id: u32,
    /// Its weight.
    pub(super) weight: u16,
}

/// What a nexthop object is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    /// One next hop: `via <gateway> dev <device> [onlink]`.
    Member {
        /// The gateway (its family is the nexthop's).
        gateway: IpAddr,
        /// The output device.
        device: u32,
        /// `RTNH_F_ONLINK`.
        onlink: bool,
    },
    /// A group of other nexthops.
    Group {
        /// Its entries, in the kernel's order.
        entries: Vec<Entry>,
        /// `Some` for a resilient group, `None` for hash-threshold.
        resilient: Option<Resilient>,
    },
    /// Anything else: a blackhole, an encapsulation, an FDB nexthop, a device without a gateway.
    Other,
}

/// A nexthop object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Nexthop {
    /// Its id (unique in the network namespace).
    pub(super) id: u32,
    /// `nh_protocol`: who made it.
    pub(super) protocol: u8,
    /// What it is.
    pub(super) kind: Kind,
}

/// A request: the message type and its body (`struct nhmsg` and the attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    message_type: u16,
    body: Vec<u8>,
}

impl Request {
    /// `RTM_NEWNEXTHOP` for `nexthop`, with protocol [`RTPROT_EGRESS`] (the object's own protocol is
    /// ignored). `None` for [`Kind::Other`], which the agent never writes.
    pub(super) fn new(nexthop: &Nexthop) -> Option<Request> {
        let mut body = Vec::with_capacity(64);
        match &nexthop.kind {
            Kind::Member {
                gateway,
                device,
                onlink,
            } => {
                let family = match gateway {
                    IpAddr::V4(_) => AF_INET,
                    IpAddr::V6(_) => AF_INET6,
                };
                let flags = if *onlink { RTNH_F_ONLINK } else { 0 };
                header(&mut body, family, RTPROT_EGRESS, flags);
                attribute(&mut body, NHA_ID, &nexthop.id.to_ne_bytes());
                match gateway {
                    IpAddr::V4(v4) => attribute(&mut body, NHA_GATEWAY, &v4.octets()),
                    IpAddr::V6(v6) => attribute(&mut body, NHA_GATEWAY, &v6.octets()),
                }
                attribute(&mut body, NHA_OIF, &device.to_ne_bytes());
            }
            Kind::Group { entries, resilient } => {
                header(&mut body, AF_UNSPEC, RTPROT_EGRESS, 0);
                attribute(&mut body, NHA_ID, &nexthop.id.to_ne_bytes());
                let mut group = Vec::with_capacity(entries.len() * GROUP_ENTRY_LEN);
                for entry in entries {
                    let [low, high] = entry.weight.saturating_sub(1).to_le_bytes();
                    group.extend_from_slice(&entry.id.to_ne_bytes());
                    group.extend_from_slice(&[low, high, 0, 0]);
                }
                attribute(&mut body, NHA_GROUP, &group);
                if let Some(r) = resilient {
                    let mut nested = Vec::with_capacity(24);
                    attribute(&mut nested, NHA_RES_GROUP_BUCKETS, &r.buckets.to_ne_bytes());
                    attribute(
                        &mut nested,
                        NHA_RES_GROUP_IDLE_TIMER,
                        &r.idle_timer.to_ne_bytes(),
                    );
                    attribute(
                        &mut nested,
                        NHA_RES_GROUP_UNBALANCED_TIMER,
                        &r.unbalanced_timer.to_ne_bytes(),
                    );
                    attribute(&mut body, NHA_RES_GROUP | NLA_F_NESTED, &nested);
                    attribute(
                        &mut body,
                        NHA_GROUP_TYPE,
                        &NEXTHOP_GRP_TYPE_RES.to_ne_bytes(),
                    );
                }
            }
            Kind::Other => return None,
        }
        Some(Request {
            message_type: RTM_NEWNEXTHOP,
            body,
        })
    }

    /// `RTM_DELNEXTHOP` of the nexthop `id`.
    pub(super) fn delete(id: u32) -> Request {
        let mut body = Vec::with_capacity(16);
        header(&mut body, AF_UNSPEC, 0, 0);
        attribute(&mut body, NHA_ID, &id.to_ne_bytes());
        Request {
            message_type: RTM_DELNEXTHOP,
            body,
        }
    }

    /// `RTM_GETNEXTHOP`, to be sent with `NLM_F_DUMP`: every nexthop of the namespace (the kernel does not
    /// filter nexthop dumps by protocol; [`owned`](super::groups) does).
    pub(super) fn dump() -> Request {
        let mut body = Vec::with_capacity(NHMSG_LEN);
        header(&mut body, AF_UNSPEC, 0, 0);
        Request {
            message_type: RTM_GETNEXTHOP,
            body,
        }
    }
}

impl NetlinkSerializable for Request {
    fn message_type(&self) -> u16 {
        self.message_type
    }

    fn buffer_len(&self) -> usize {
        self.body.len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        // `buffer` is exactly `buffer_len()` long (the trait's contract).
        buffer.copy_from_slice(&self.body);
    }
}

/// What the kernel answers on the nexthop socket: a nexthop, or another message type (skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply(pub(super) Option<Nexthop>);

impl NetlinkDeserializable for Reply {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        match header.message_type {
            RTM_NEWNEXTHOP => parse(payload).map(|n| Reply(Some(n))),
            _ => Ok(Reply(None)),
        }
    }
}

fn header(body: &mut Vec<u8>, family: u8, protocol: u8, flags: u32) {
    body.extend_from_slice(&[family, 0, protocol, 0]);
    body.extend_from_slice(&flags.to_ne_bytes());
}

/// Appends one attribute, padded to 4 bytes.
fn attribute(body: &mut Vec<u8>, kind: u16, value: &[u8]) {
    // Nexthop attributes are a few bytes; a group of 8,191 entries would still fit in u16.
    let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    body.extend_from_slice(&len.to_ne_bytes());
    body.extend_from_slice(&kind.to_ne_bytes());
    body.extend_from_slice(value);
    body.resize(body.len().next_multiple_of(4), 0);
}

fn u16_of(value: &[u8]) -> Result<u16, DecodeError> {
    value
        .try_into()
        .map(u16::from_ne_bytes)
        .map_err(|_| DecodeError::invalid_number(2, value.len()))
}

fn u32_of(value: &[u8]) -> Result<u32, DecodeError> {
    value
        .try_into()
        .map(u32::from_ne_bytes)
        .map_err(|_| DecodeError::invalid_number(4, value.len()))
}

/// Reads one `RTM_NEWNEXTHOP` body (`struct nhmsg` and attributes).
pub(super) fn parse(payload: &[u8]) -> Result<Nexthop, DecodeError> {
    let (Some(head), Some(rest)) = (payload.get(..NHMSG_LEN), payload.get(NHMSG_LEN..)) else {
        return Err(DecodeError::buffer_too_small(payload.len(), NHMSG_LEN));
    };
    let (family, protocol) = (head[0], head[2]);
    let flags = u32_of(&head[4..8])?;
    let mut id = None;
    let mut entries = None;
    let mut group_type = 0;
    let mut resilient = None;
    let mut device = None;
    let mut gateway = None;
    let mut other = false;
    for nla in NlasIterator::new(rest) {
        let nla = nla?;
        let value = nla.value();
        match nla.kind() {
            NHA_ID => id = Some(u32_of(value)?),
            NHA_GROUP => {
                if value.len() % GROUP_ENTRY_LEN != 0 {
                    return Err(DecodeError::from(format!(
                        "NHA_GROUP of {} bytes is not a whole number of {GROUP_ENTRY_LEN}-byte entries",
                        value.len()
                    )));
                }
                let parsed = value
                    .chunks_exact(GROUP_ENTRY_LEN)
                    .map(|e| {
                        Ok(Entry {
                            id: u32_of(&e[..4])?,
                            weight: u16::from_le_bytes([e[4], e[5]]).saturating_add(1),
                        })
                    })
                    .collect::<Result<Vec<_>, DecodeError>>()?;
                entries = Some(parsed);
            }
            NHA_GROUP_TYPE => group_type = u16_of(value)?,
            NHA_RES_GROUP => resilient = Some(parse_resilient(value)?),
            NHA_OIF => device = Some(u32_of(value)?),
            NHA_GATEWAY => {
                gateway = Some(match (family, value.len()) {
                    (AF_INET, 4) => {
                        IpAddr::V4(Ipv4Addr::new(value[0], value[1], value[2], value[3]))
                    }
                    (AF_INET6, 16) => {
                        let mut octets = [0; 16];
                        octets.copy_from_slice(value);
                        IpAddr::V6(Ipv6Addr::from(octets))
                    }
                    _ => return Err(DecodeError::invalid_ip_address(value.len())),
                });
            }
            NHA_BLACKHOLE | NHA_ENCAP_TYPE | NHA_ENCAP | NHA_FDB => other = true,
            _ => {}
        }
    }
    let id = id.ok_or_else(|| DecodeError::from("a nexthop without NHA_ID"))?;
    let kind = match (entries, gateway, device) {
        (Some(entries), _, _) if !other => Kind::Group {
            entries,
            resilient: if group_type == NEXTHOP_GRP_TYPE_RES {
                resilient
            } else {
                None
            },
        },
        (None, Some(gateway), Some(device)) if !other => Kind::Member {
            gateway,
            device,
            onlink: flags & RTNH_F_ONLINK != 0,
        },
        _ => Kind::Other,
    };
    Ok(Nexthop { id, protocol, kind })
}

fn parse_resilient(value: &[u8]) -> Result<Resilient, DecodeError> {
    let mut r = Resilient {
        buckets: 0,
        idle_timer: 0,
        unbalanced_timer: 0,
    };
    for nla in NlasIterator::new(value) {
        let nla: NlaBuffer<&[u8]> = nla?;
        let value = nla.value();
        match nla.kind() {
            NHA_RES_GROUP_BUCKETS => r.buckets = u16_of(value)?,
            NHA_RES_GROUP_IDLE_TIMER => r.idle_timer = u32_of(value)?,
            NHA_RES_GROUP_UNBALANCED_TIMER => r.unbalanced_timer = u32_of(value)?,
            _ => {}
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{
        NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
    };

    /// The whole message as sent with `flags`, sequence number 0x6b12e625 (as in the captures).
    fn sent(request: Request, flags: u16) -> Vec<u8> {
        let mut message = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(request),
        );
        message.header.flags = flags;
        message.header.sequence_number = 0x6b12_e625;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    const REPLACE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE;

    /// `strace -e trace=sendmsg -e write=3 ip nexthop replace id 1694564356 group 1694564353/1694564354
    /// type resilient buckets 64 idle_timer 120 unbalanced_timer 0 proto 242` (iproute2 6.1, x86-64).
    const GROUP_BYTES: &str = "58 00 00 00 68 00 05 05 25 e6 12 6b 00 00 00 00 \
        00 00 f2 00 00 00 00 00 08 00 01 00 04 00 01 65 \
        14 00 02 00 01 00 01 65 00 00 00 00 02 00 01 65 \
        00 00 00 00 1c 00 0c 80 06 00 01 00 40 00 00 00 \
        08 00 02 00 e0 2e 00 00 08 00 03 00 00 00 00 00 \
        06 00 03 00 01 00 00 00";

    #[test]
    fn a_resilient_group_is_what_ip_nexthop_sends() {
        let group = Nexthop {
            id: 1_694_564_356,
            protocol: RTPROT_EGRESS,
            kind: Kind::Group {
                entries: vec![
                    Entry {
                        id: 1_694_564_353,
                        weight: 1,
                    },
                    Entry {
                        id: 1_694_564_354,
                        weight: 1,
                    },
                ],
                resilient: Some(RESILIENT),
            },
        };
        assert_eq!(
            sent(Request::new(&group).unwrap(), REPLACE),
            hex(GROUP_BYTES)
        );
    }

    #[test]
    fn members_are_what_ip_nexthop_sends() {
        // `ip nexthop replace id 1694564354 via 10.244.2.9 dev v0 onlink proto 242` (v0 is ifindex 3).
        let v4 = Nexthop {
            id: 1_694_564_354,
            protocol: RTPROT_EGRESS,
            kind: Kind::Member {
                gateway: "10.244.2.9".parse().unwrap(),
                device: 3,
                onlink: true,
            },
        };
        assert_eq!(
            sent(Request::new(&v4).unwrap(), REPLACE),
            hex("30 00 00 00 68 00 05 05 25 e6 12 6b 00 00 00 00 \
                 02 00 f2 00 04 00 00 00 08 00 01 00 02 00 01 65 \
                 08 00 06 00 0a f4 02 09 08 00 05 00 03 00 00 00")
        );
        // `ip -6 nexthop replace id 1694564355 via fe80::a02a:aff:fef4:105 dev v0 proto 242`.
        let v6 = Nexthop {
            id: 1_694_564_355,
            protocol: RTPROT_EGRESS,
            kind: Kind::Member {
                gateway: "fe80::a02a:aff:fef4:105".parse().unwrap(),
                device: 3,
                onlink: false,
            },
        };
        assert_eq!(
            sent(Request::new(&v6).unwrap(), REPLACE),
            hex("3c 00 00 00 68 00 05 05 25 e6 12 6b 00 00 00 00 \
                 0a 00 f2 00 00 00 00 00 08 00 01 00 03 00 01 65 \
                 14 00 06 00 fe 80 00 00 00 00 00 00 a0 2a 0a ff \
                 fe f4 01 05 08 00 05 00 03 00 00 00")
        );
    }

    #[test]
    fn delete_and_dump_are_what_ip_nexthop_sends() {
        // `ip nexthop del id 1694564357`.
        assert_eq!(
            sent(Request::delete(1_694_564_357), NLM_F_REQUEST | NLM_F_ACK),
            hex("20 00 00 00 69 00 05 00 25 e6 12 6b 00 00 00 00 \
                 00 00 00 00 00 00 00 00 08 00 01 00 05 00 01 65")
        );
        assert_eq!(
            NetlinkSerializable::message_type(&Request::dump()),
            RTM_GETNEXTHOP
        );
        assert_eq!(Request::dump().body, [0; 8]);
        assert_eq!(
            Request::new(&Nexthop {
                id: 1,
                protocol: 0,
                kind: Kind::Other
            }),
            None
        );
    }

    /// Answers of the kernel (6.18) to `ip nexthop show id N`, read with `strace -e read=3`.
    const GROUP_REPLY: &str = "6c 00 00 00 68 00 00 00 25 e6 12 6b 98 5b 00 00 \
        00 00 f2 00 00 00 00 00 08 00 01 00 04 00 01 65 \
        06 00 03 00 01 00 00 00 14 00 02 00 01 00 01 65 \
        00 00 00 00 02 00 01 65 00 00 00 00 28 00 0c 80 \
        06 00 01 00 40 00 00 00 08 00 02 00 e0 2e 00 00 \
        08 00 03 00 00 00 00 00 0c 00 04 00 00 00 00 00 \
        00 00 00 00 08 00 0e 00 00 00 00 80";
    const V4_REPLY: &str = "30 00 00 00 68 00 00 00 29 e6 12 6b e5 5b 00 00 \
        02 fd f2 00 04 00 00 00 08 00 01 00 02 00 01 65 \
        08 00 05 00 03 00 00 00 08 00 06 00 0a f4 02 09";
    const V6_REPLY: &str = "3c 00 00 00 68 00 00 00 29 e6 12 6b ea 5b 00 00 \
        0a fd f2 00 00 00 00 00 08 00 01 00 03 00 01 65 \
        08 00 05 00 03 00 00 00 14 00 06 00 fe 80 00 00 \
        00 00 00 00 a0 2a 0a ff fe f4 01 05";

    fn received(bytes: &str) -> Nexthop {
        let message = NetlinkMessage::<Reply>::deserialize(&hex(bytes)).unwrap();
        match message.payload {
            NetlinkPayload::InnerMessage(Reply(Some(nexthop))) => nexthop,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kernel_answers_parse() {
        let group = received(GROUP_REPLY);
        assert_eq!(group.id, 1_694_564_356);
        assert_eq!(group.protocol, 242);
        assert_eq!(
            group.kind,
            Kind::Group {
                entries: vec![
                    Entry {
                        id: 1_694_564_353,
                        weight: 1
                    },
                    Entry {
                        id: 1_694_564_354,
                        weight: 1
                    }
                ],
                resilient: Some(RESILIENT),
            }
        );
        assert_eq!(
            received(V4_REPLY).kind,
            Kind::Member {
                gateway: "10.244.2.9".parse().unwrap(),
                device: 3,
                onlink: true
            }
        );
        assert_eq!(
            received(V6_REPLY).kind,
            Kind::Member {
                gateway: "fe80::a02a:aff:fef4:105".parse().unwrap(),
                device: 3,
                onlink: false
            }
        );
    }

    #[test]
    fn what_is_not_a_member_or_a_group_is_other() {
        let body = |attrs: &[(u16, &[u8])], family: u8| {
            let mut b = Vec::new();
            header(&mut b, family, 242, 0);
            for (kind, value) in attrs {
                attribute(&mut b, *kind, value);
            }
            b
        };
        let id = 7u32.to_ne_bytes();
        let blackhole = parse(&body(&[(NHA_ID, &id), (NHA_BLACKHOLE, &[])], AF_INET)).unwrap();
        assert_eq!(blackhole.kind, Kind::Other);
        let device_only = parse(&body(&[(NHA_ID, &id), (NHA_OIF, &[3, 0, 0, 0])], AF_INET));
        assert_eq!(device_only.unwrap().kind, Kind::Other);
        // A hash-threshold group is a group, but not a resilient one.
        let mpath = parse(&body(
            &[(NHA_ID, &id), (NHA_GROUP, &[1, 0, 0, 0, 4, 0, 0, 0])],
            AF_UNSPEC,
        ))
        .unwrap();
        assert_eq!(
            mpath.kind,
            Kind::Group {
                entries: vec![Entry { id: 1, weight: 5 }],
                resilient: None
            }
        );
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let good = hex(GROUP_REPLY)[16..].to_vec();
        // Every truncation of a real answer either parses or is an error.
        for len in 0..good.len() {
            let _ = parse(&good[..len]);
        }
        assert!(parse(&[]).is_err());
        let mut b = Vec::new();
        header(&mut b, AF_INET, 242, 0);
        assert!(parse(&b).is_err(), "no NHA_ID");
        let mut bad = b.clone();
        attribute(&mut bad, NHA_ID, &[1, 2]);
        assert!(parse(&bad).is_err(), "short NHA_ID");
        let mut bad = b.clone();
        attribute(&mut bad, NHA_ID, &1u32.to_ne_bytes());
        attribute(&mut bad, NHA_GROUP, &[1, 0, 0, 0, 0]);
        assert!(parse(&bad).is_err(), "NHA_GROUP of 5 bytes");
        let mut bad = b.clone();
        attribute(&mut bad, NHA_ID, &1u32.to_ne_bytes());
        attribute(&mut bad, NHA_GATEWAY, &[10, 0, 0]);
        assert!(parse(&bad).is_err(), "3-byte gateway");
        let mut bad = b;
        bad.extend_from_slice(&[200, 0, 1, 0, 1, 0, 0, 0]);
        assert!(parse(&bad).is_err(), "attribute longer than the message");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&bytes);
            let _ = NetlinkMessage::<Reply>::deserialize(&bytes);
        }

        #[test]
        fn groups_read_back(ids in proptest::collection::btree_set(1u32..u32::MAX, 1..16), id in 1u32..u32::MAX) {
            let group = Nexthop {
                id,
                protocol: RTPROT_EGRESS,
                kind: Kind::Group {
                    entries: ids.iter().map(|&id| Entry { id, weight: 1 }).collect(),
                    resilient: Some(RESILIENT),
                },
            };
            let request = Request::new(&group).unwrap();
            proptest::prop_assert_eq!(parse(&request.body).unwrap(), group);
        }
    }
}
