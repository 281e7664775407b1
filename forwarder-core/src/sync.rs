//! State synchronisation between the replicas of one gateway set: what they tell each other so that a
//! surviving replica can carry on the connections of one that died.
//!
//! The model follows the two replication protocols Linux and OpenBSD firewall pairs run:
//! conntrackd's FTFW mode (sequence numbers, cumulative acknowledgements, negative acknowledgements for the
//! gaps, a bulk resynchronisation when a peer joins; conntrack-tools `src/sync-ftfw.c`) and pfsync
//! (sectioned datagrams whose record types a receiver can skip by their length; OpenBSD
//! `sys/net/if_pfsync.h`). A replica sends its flow changes — created, TCP state changed, removed — batched
//! into datagrams, never one per packet, and its peers keep them as passive copies.
//!
//! This module is I/O-free like the rest of the crate: it turns state into bytes and bytes into state.
//!
//! * [`wire`]: the datagram — header, sections, records; parsing of untrusted bytes and building into a
//!   caller's buffer.
//! * [`inbox`]: a peer's datagram applied to the table of its passive copies.
//! * [`outbox`]: what a replica still has to tell its peers, coalesced, and the resend ring for NACKs.
//! * [`peer`]: what a replica tracks of each peer's stream — epoch, sequence numbers, gaps to ask again
//!   for, liveness.
//! * [`replica`]: one replica's side of the protocol, without I/O: what to send when, what arrived.
//! * Here: a flow of the table ([`FlowImage`]) as a record and back.

pub mod inbox;
pub mod outbox;
pub mod peer;
pub mod replica;
pub mod wire;

use core::time::Duration;

use crate::conntrack::{FlowImage, NewFlow, TcpTracking};
use crate::flow::{FlowKey, NodeAddr, Proto, UplinkId};
use wire::{FlowId, FlowRecord};

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl FlowRecord {
    /// The record of a flow of the table, owned by the replica of ordinal `owner`.
    pub fn from_image(image: &FlowImage, owner: u16, flags: u8) -> FlowRecord {
        let o = &image.new.orig;
        FlowRecord {
            id: FlowId {
                proto: o.proto,
                egress: image.new.egress_ip,
                ext_port: image.ext_port,
                remote: o.dst,
                remote_port: o.dst_port,
            },
            pod: o.src,
            pod_port: o.src_port,
            node: image.new.node.ip,
            node_mac: image.new.node.mac,
            owner,
            flags,
            tcp_state: image.tcp.code,
            tcp_ref: image.tcp.reference,
            tcp_window: image.tcp.window,
            age_ms: ms(image.age),
            idle_ms: ms(image.idle),
        }
    }

    /// The flow to install, leaving on `uplink` (uplink ids are local: the receiver picks the uplink of the
    /// egress IP).
    pub fn to_image(&self, uplink: UplinkId) -> FlowImage {
        FlowImage {
            new: NewFlow {
                orig: FlowKey {
                    src: self.pod,
                    dst: self.id.remote,
                    src_port: self.pod_port,
                    dst_port: self.id.remote_port,
                    proto: self.id.proto,
                },
                egress_ip: self.id.egress,
                node: NodeAddr {
                    ip: self.node,
                    mac: self.node_mac,
                },
                uplink,
            },
            ext_port: self.id.ext_port,
            tcp: TcpTracking {
                code: self.tcp_state,
                reference: self.tcp_ref,
                window: self.tcp_window,
            },
            age: Duration::from_millis(u64::from(self.age_ms)),
            idle: Duration::from_millis(u64::from(self.idle_ms)),
        }
    }
}

impl FlowId {
    /// The identity of a flow of the table (its reply key), without building its whole record.
    pub fn of(f: &crate::conntrack::Flow) -> FlowId {
        let o = f.orig();
        FlowId {
            proto: o.proto,
            egress: f.egress_ip(),
            ext_port: f.external_port(),
            remote: o.dst,
            remote_port: o.dst_port,
        }
    }

    /// The reply tuple of the flow (what [`Table::remove`](crate::conntrack::Table::remove) takes; for ICMP
    /// the identifier is the external one both ways, as [`Flow::reply_key`](crate::conntrack::Flow::reply_key)
    /// has it).
    pub fn reply_key(&self) -> FlowKey {
        let icmp = matches!(self.proto, Proto::Icmp | Proto::Icmpv6);
        FlowKey {
            src: self.remote,
            dst: self.egress,
            src_port: if icmp {
                self.ext_port
            } else {
                self.remote_port
            },
            dst_port: self.ext_port,
            proto: self.proto,
        }
    }
}

#[cfg(test)]
mod convergence;

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::conntrack::{Config, Table};
    use crate::ports::{PortPools, PortRange, Rng};
    use crate::time::Instant;

    const NODE: NodeAddr = NodeAddr {
        ip: Ipv4Addr::new(172, 18, 0, 11),
        mac: [2, 0, 0, 0, 0, 0x11],
    };

    /// A flow of each protocol and family, carried through its record to a second table: the copy answers
    /// the same reply tuple, with the same port and TCP tracking, and the record's id names it for removal.
    #[test]
    fn flows_travel_through_their_records() {
        let e4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
        let e6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let make = || {
            Table::new(
                Config {
                    max_entries: 64,
                    ..Config::default()
                },
                PortPools::new(&[e4, e6], PortRange::default()),
            )
        };
        let (a, b) = (make(), make());
        let (ga, gb) = (a.pin(), b.pin());
        let mut rng = Rng::new(5);
        let p4 = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5));
        let r4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
        let p6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5));
        let r6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1));
        let flows = [
            (p4, r4, 40000, 443, Proto::Tcp, e4),
            (p4, r4, 5353, 53, Proto::Udp, e4),
            (p4, r4, 77, 77, Proto::Icmp, e4),
            (p6, r6, 40000, 443, Proto::Tcp, e6),
            (p6, r6, 78, 78, Proto::Icmpv6, e6),
        ];
        let now = Instant::from_secs(50);
        for (src, dst, sport, dport, proto, egress_ip) in flows {
            let new = NewFlow {
                orig: FlowKey {
                    src,
                    dst,
                    src_port: sport,
                    dst_port: dport,
                    proto,
                },
                egress_ip,
                node: NODE,
                uplink: 1,
            };
            let f = a
                .insert(new, Instant::from_secs(40), &mut rng, &ga)
                .expect("flow");
            let rec = FlowRecord::from_image(&f.image(now), 3, 0);
            assert_eq!(rec.id.reply_key(), f.reply_key(), "{proto:?}");
            assert_eq!(FlowId::of(f), rec.id, "{proto:?}");
            assert_eq!(rec.owner, 3);
            let img = rec.to_image(1);
            assert_eq!(img, f.image(now), "{proto:?}");
            let c = b.install(&img, now, &gb).expect("installed");
            assert_eq!(c.reply_key(), f.reply_key());
            assert_eq!(c.tcp_tracking(), f.tcp_tracking());
            assert!(b.remove(&rec.id.reply_key(), now, &gb), "{proto:?}");
        }
        assert_eq!(b.len(), 0);
    }
}
