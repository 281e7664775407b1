//! The passive copies of the other replicas' flows, consulted by the data path for the replicas this one
//! serves.
//!
//! State sync (`crate::sync`) keeps each peer replica's flows in a table of their own, built with port
//! pools of that peer's egress addresses only. While a peer is alive nothing here is on the data path: its
//! copies are only kept up to date. When it dies, the I/O layer takes its egress addresses over on the
//! uplink (ARP/NDP) and calls [`Standby::set_serving`]: from then on a reply to its addresses that finds no
//! flow in the gateway's own table is looked up in the copies of the served peers and, when found there,
//! translated exactly as the peer did, so that the peer's established connections survive (the failover
//! pfsync(4) gives OpenBSD firewall pairs, and conntrackd's FTFW mode Linux ones). A pod's packet that
//! finds no flow in the own table is looked up in every peer's copies, served or not, and goes out as the
//! peer sends it — its egress address and external port, its uplink — whether the peer is dead or only
//! not ready (see [`Standby::lookup_outbound_at`]). Copies are never moved into the local table, and the
//! data path never creates a flow in them: new connections get local flows with this replica's own egress
//! addresses.
//!
//! Uplink ids in the copies are this replica's: the sync receiver picks the local uplink of each flow's
//! egress address when it installs the copy ([`FlowRecord::to_image`](crate::sync::wire::FlowRecord)).
//!
//! The cost: on a miss of the local table only, one lookup per peer for a pod's packet, one relaxed atomic
//! load for a reply while no peer is served.

use core::net::IpAddr;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::conntrack::{Flow, Guard, Table, TcpSegment, TcpState};
use crate::flow::FlowKey;
use crate::Instant;

/// One other replica of the gateway set: its egress addresses and the table of its flows' passive copies.
#[derive(Debug)]
pub struct StandbyPeer {
    /// The replica's ordinal in the gateway set (as state sync numbers it).
    pub ordinal: u16,
    /// The replica's egress addresses: the addresses its copies are translated to, and which this replica
    /// answers for on the uplinks while it serves the peer.
    pub egress: Vec<IpAddr>,
    table: Arc<Table>,
    serving: AtomicBool,
    /// Frames heard on the uplinks in which another host claims one of its addresses.
    claims: AtomicU64,
    /// Probes of its addresses asked for and not sent yet.
    probe_wanted: AtomicBool,
}

impl StandbyPeer {
    /// A peer, not served. `table` holds its copies (built with port pools of `egress` only, so that it
    /// never hands out a port of this replica's own addresses).
    pub fn new(ordinal: u16, egress: Vec<IpAddr>, table: Arc<Table>) -> StandbyPeer {
        StandbyPeer {
            ordinal,
            egress,
            table,
            serving: AtomicBool::new(false),
            claims: AtomicU64::new(0),
            probe_wanted: AtomicBool::new(false),
        }
    }

    /// How many frames heard on the uplinks claimed one of the peer's addresses for a MAC other than this
    /// replica's (its answers to probes, its announcements): a count that grew while the peer was silent
    /// says it still holds its addresses on the segment.
    pub fn claims(&self) -> u64 {
        self.claims.load(Ordering::Relaxed)
    }

    /// Asks the I/O layer to probe the peer's addresses on their uplinks (RFC 5227 §2.1.1, RFC 4862
    /// §5.4.2); the answers show in [`claims`](Self::claims).
    pub fn want_probe(&self) {
        self.probe_wanted.store(true, Ordering::Relaxed);
    }

    /// True once after each [`want_probe`](Self::want_probe): the I/O layer sends the probes then.
    pub fn take_probe(&self) -> bool {
        self.probe_wanted.swap(false, Ordering::Relaxed)
    }

    /// The table of the peer's copies (what state sync installs into and removes from).
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// True while this replica translates the peer's flows.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

/// The passive copies of the gateway set's other replicas' flows, and which of those replicas this one serves
/// now. `Send + Sync`: shared as an `Arc` by the gateway (kept across reloads, see
/// [`Gateway::with_standby`](super::Gateway::with_standby)) and the I/O layer that switches serving on and
/// off.
#[derive(Debug)]
pub struct Standby {
    peers: Vec<StandbyPeer>,
    /// How many peers are served: the data path's one check while there are none.
    serving: AtomicUsize,
    /// This replica drains and a peer serves its own addresses now: it no longer answers for them.
    handed_over: AtomicBool,
}

impl Standby {
    /// One entry per peer: its ordinal, its egress addresses, the table of its copies; none served. Ordinals
    /// should be distinct: of two peers with the same ordinal only the first is ever found.
    pub fn new(peers: Vec<StandbyPeer>) -> Standby {
        let serving = peers.iter().filter(|p| p.is_serving()).count();
        Standby {
            peers,
            serving: AtomicUsize::new(serving),
            handed_over: AtomicBool::new(false),
        }
    }

    /// The peer of ordinal `ordinal`.
    pub fn peer(&self, ordinal: u16) -> Option<&StandbyPeer> {
        self.peers.iter().find(|p| p.ordinal == ordinal)
    }

    /// Every peer.
    pub fn peers(&self) -> &[StandbyPeer] {
        &self.peers
    }

    /// Starts or stops translating peer `ordinal`'s flows (both directions). Returns whether it changed
    /// (false too for an unknown ordinal). Takes effect for the packets the workers look up after it; the
    /// caller answers for the peer's addresses on the uplink ([`served_addresses`](Self::served_addresses))
    /// before serving starts, and stops answering after it ends.
    pub fn set_serving(&self, ordinal: u16, serving: bool) -> bool {
        let Some(p) = self.peer(ordinal) else {
            return false;
        };
        // The swap makes exactly one of two racing callers see the change, so the count stays exact.
        let changed = p.serving.swap(serving, Ordering::Relaxed) != serving;
        if changed {
            if serving {
                self.serving.fetch_add(1, Ordering::Relaxed);
            } else {
                self.serving.fetch_sub(1, Ordering::Relaxed);
            }
        }
        changed
    }

    /// Counts a frame heard on an uplink in which another host (not this replica's MAC) claims `addr`: when
    /// `addr` is a peer's egress address, that peer's [`StandbyPeer::claims`] grows. Returns whether it was.
    pub fn heard_claim(&self, addr: IpAddr) -> bool {
        match self.peers.iter().find(|p| p.egress.contains(&addr)) {
            Some(p) => {
                p.claims.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// True while peer `ordinal` is served (false for an unknown ordinal).
    pub fn is_serving(&self, ordinal: u16) -> bool {
        self.peer(ordinal).is_some_and(StandbyPeer::is_serving)
    }

    /// True when any peer is served: one relaxed atomic load, the data path's only cost while nothing is
    /// adopted.
    #[inline(always)]
    pub fn serving_any(&self) -> bool {
        self.serving.load(Ordering::Relaxed) != 0
    }

    /// Says whether this replica's own addresses are handed over (it drains, and a peer serves them): the
    /// I/O layer then stops answering ARP and neighbour discovery for them, so that the neighbours keep
    /// the peer's MAC. Its flows still translate here for whatever keeps arriving.
    pub fn set_handed_over(&self, handed_over: bool) {
        self.handed_over.store(handed_over, Ordering::Relaxed);
    }

    /// True while this replica's own addresses are handed over ([`set_handed_over`](Self::set_handed_over)).
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Relaxed)
    }

    /// The egress addresses of the peers served now, for the I/O layer's ARP and neighbour discovery
    /// answers on the uplinks.
    pub fn served_addresses(&self) -> Vec<IpAddr> {
        self.peers
            .iter()
            .filter(|p| p.is_serving())
            .flat_map(|p| p.egress.iter().copied())
            .collect()
    }

    /// True when `addr` is an egress address of a peer served now.
    pub fn serves_address(&self, addr: IpAddr) -> bool {
        self.serving_any()
            && self
                .peers
                .iter()
                .any(|p| p.is_serving() && p.egress.contains(&addr))
    }

    /// The copy of an outbound packet's flow, by the pod's original tuple, in any peer's table, served or
    /// not (in the order of [`peers`](Self::peers)). A pod's packet that reaches this replica for a flow
    /// a live peer owns — the node agents moved it here because the peer is not ready, or faster than this
    /// replica declared the peer dead — goes out as the peer sends it, with its egress address and port,
    /// and the peer, which owns the address, gets the replies: the flow keeps its identity either way. A
    /// new mapping of this replica's own for it would change the source the server sees.
    pub fn lookup_outbound_at<'g>(
        &'g self,
        key: &FlowKey,
        now: Instant,
        guard: &'g Guard,
    ) -> Option<&'g Flow> {
        // served peers first: after a pod's flow moved between replicas, its tuple may be in two tables
        let served = || {
            self.peers
                .iter()
                .filter(|p| p.is_serving())
                .find_map(|p| p.table.lookup_outbound_at(key, now, guard))
        };
        let any = || {
            self.peers
                .iter()
                .find_map(|p| p.table.lookup_outbound_at(key, now, guard))
        };
        if self.serving_any() {
            served().or_else(any)
        } else {
            any()
        }
    }

    /// The copy of an inbound packet's flow, by the tuple as received (dst = the peer's egress address), in
    /// the tables of the served peers whose egress addresses hold `key.dst`; `None` for anything else, so an
    /// unsolicited packet to a peer's address is dropped as before while that peer is not served.
    pub fn lookup_inbound_at<'g>(
        &'g self,
        key: &FlowKey,
        now: Instant,
        guard: &'g Guard,
    ) -> Option<&'g Flow> {
        if !self.serving_any() {
            return None;
        }
        self.peers
            .iter()
            .filter(|p| p.is_serving() && p.egress.contains(&key.dst))
            .find_map(|p| p.table.lookup_inbound_at(key, now, guard))
    }
}

/// True for a pod's TCP segment that opens a connection: SYN without ACK or RST.
pub(super) fn is_opening_syn(seg: Option<TcpSegment>) -> bool {
    seg.is_some_and(|s| {
        s.flags & (TcpSegment::SYN | TcpSegment::ACK | TcpSegment::RST) == TcpSegment::SYN
    })
}

/// The copy an outbound packet that missed the local table is translated through, if any: a served peer's
/// flow of its tuple, except that a SYN never reopens a finished copy (reset, or a FIN each way) — the
/// pod's new connection gets a flow of its own here instead (a local one, with this replica's egress
/// address), as a connection opened after the failover would.
#[inline]
pub(super) fn outbound_copy<'g>(
    standby: Option<&'g Standby>,
    key: &FlowKey,
    tcp: Option<TcpSegment>,
    now: Instant,
    guard: &'g Guard,
) -> Option<&'g Flow> {
    let f = standby?.lookup_outbound_at(key, now, guard)?;
    if is_opening_syn(tcp) && matches!(f.tcp_state(), TcpState::Closed | TcpState::TimeWait) {
        return None;
    }
    Some(f)
}

/// The copy an inbound packet that missed the local table is translated through, if any.
#[inline]
pub(super) fn inbound_copy<'g>(
    standby: Option<&'g Standby>,
    key: &FlowKey,
    now: Instant,
    guard: &'g Guard,
) -> Option<&'g Flow> {
    standby
        .filter(|s| s.serving_any())?
        .lookup_inbound_at(key, now, guard)
}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use super::*;
    use crate::conntrack::{Config, NewFlow};
    use crate::flow::{NodeAddr, Proto};
    use crate::ports::{PortPools, PortRange, Rng};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    const C: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 3));
    const NOW: Instant = Instant::from_secs(10);

    fn peer(ordinal: u16, egress: IpAddr) -> StandbyPeer {
        let t = Table::new(
            Config {
                max_entries: 64,
                ..Config::default()
            },
            PortPools::new(&[egress], PortRange::default()),
        );
        StandbyPeer::new(ordinal, vec![egress], Arc::new(t))
    }

    /// A UDP flow of peer `p`'s egress address, inserted into its copies; returns its reply key.
    fn flow(p: &StandbyPeer) -> FlowKey {
        let g = p.table().pin();
        let new = NewFlow {
            orig: FlowKey {
                src: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
                dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
                src_port: 5353,
                dst_port: 53,
                proto: Proto::Udp,
            },
            egress_ip: p.egress[0],
            node: NodeAddr {
                ip: Ipv4Addr::new(172, 18, 0, 2),
                mac: [2, 0, 0, 0, 0, 2],
            },
            uplink: 0,
        };
        let f = p
            .table()
            .insert(new, NOW, &mut Rng::new(1), &g)
            .expect("flow");
        f.reply_key()
    }

    /// A claim of a peer's address counts for that peer only; a probe asked for is taken once.
    #[test]
    fn claims_of_an_address_count_for_its_peer_and_a_probe_is_taken_once() {
        let s = Standby::new(vec![peer(0, A), peer(2, C)]);
        assert!(s.heard_claim(A));
        assert!(s.heard_claim(A));
        assert!(!s.heard_claim(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9))));
        assert_eq!(
            (s.peer(0).unwrap().claims(), s.peer(2).unwrap().claims()),
            (2, 0)
        );
        let p = s.peer(2).unwrap();
        assert!(!p.take_probe());
        p.want_probe();
        p.want_probe();
        assert!(p.take_probe());
        assert!(!p.take_probe());
    }

    /// The count behind `serving_any` follows every change and only changes; inbound only served peers
    /// whose addresses hold the destination are looked in, outbound served peers first, then any.
    #[test]
    fn serving_is_counted_and_limits_the_lookups() {
        let (a, c) = (peer(1, A), peer(3, C));
        let (reply_a, reply_c) = (flow(&a), flow(&c));
        let s = Standby::new(vec![a, c]);
        let g = crossbeam_epoch::pin();
        let orig = s.peers()[0]
            .table()
            .lookup_inbound_at(&reply_a, NOW, &g)
            .map(Flow::orig);
        let orig = orig.expect("copy");
        assert!(!s.serving_any());
        // a pod's packet finds a copy served or not (the first peer's), a reply only a served one's
        let f = s.lookup_outbound_at(&orig, NOW, &g).expect("A's copy");
        assert_eq!(f.egress_ip(), A);
        assert!(s.lookup_inbound_at(&reply_a, NOW, &g).is_none());

        assert!(s.set_serving(3, true));
        assert!(!s.set_serving(3, true));
        assert!(s.serving_any() && s.is_serving(3) && !s.is_serving(1));
        assert_eq!(s.served_addresses(), vec![C]);
        assert!(s.serves_address(C) && !s.serves_address(A));
        // the pod's tuple is the same in both copies: the served peer's is found first
        let f = s.lookup_outbound_at(&orig, NOW, &g).expect("C's copy");
        assert_eq!(f.egress_ip(), C);
        assert!(s.lookup_inbound_at(&reply_a, NOW, &g).is_none());
        assert!(s.lookup_inbound_at(&reply_c, NOW, &g).is_some());
        // C's tuple to A's address (the same port in A's copies) is A's business
        let mut to_a = reply_c;
        to_a.dst = A;
        assert!(s.lookup_inbound_at(&to_a, NOW, &g).is_none());

        assert!(s.set_serving(1, true));
        assert_eq!(s.served_addresses(), vec![A, C]);
        assert!(s.lookup_inbound_at(&reply_a, NOW, &g).is_some());
        assert!(s.lookup_inbound_at(&to_a, NOW, &g).is_some());

        assert!(s.set_serving(1, false) && s.set_serving(3, false));
        assert!(!s.set_serving(3, false) && !s.set_serving(7, true));
        assert!(!s.serving_any());
        assert!(s.served_addresses().is_empty());
        assert!(s.peer(7).is_none());
    }

    /// A pod's SYN never reopens a finished copy; any other segment, or a SYN of a copy still open, uses it.
    #[test]
    fn a_syn_does_not_reopen_a_finished_copy() {
        let syn = |flags| {
            Some(TcpSegment {
                flags,
                seq: 1,
                ack: 0,
                window: 100,
                payload_len: 0,
            })
        };
        assert!(is_opening_syn(syn(TcpSegment::SYN)));
        assert!(!is_opening_syn(syn(TcpSegment::SYN | TcpSegment::ACK)));
        assert!(!is_opening_syn(syn(TcpSegment::SYN | TcpSegment::RST)));
        assert!(!is_opening_syn(syn(TcpSegment::ACK)));
        assert!(!is_opening_syn(None));

        let s = Standby::new(vec![peer(1, A)]);
        let a = s.peer(1).expect("peer");
        let g = a.table().pin();
        let key = FlowKey {
            src: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
            src_port: 40000,
            dst_port: 443,
            proto: Proto::Tcp,
        };
        let new = NewFlow {
            orig: key,
            egress_ip: A,
            node: NodeAddr {
                ip: Ipv4Addr::new(172, 18, 0, 2),
                mac: [2, 0, 0, 0, 0, 2],
            },
            uplink: 0,
        };
        let f = a
            .table()
            .insert(new, NOW, &mut Rng::new(1), &g)
            .expect("flow");
        f.on_outbound(syn(TcpSegment::SYN), 60, NOW);
        s.set_serving(1, true);
        let found = |flags| outbound_copy(Some(&s), &key, syn(flags), NOW, &g).is_some();
        assert!(
            found(TcpSegment::SYN),
            "a retransmitted SYN of an open copy"
        );
        f.on_outbound(syn(TcpSegment::RST), 60, NOW);
        assert_eq!(f.tcp_state(), TcpState::Closed);
        assert!(!found(TcpSegment::SYN));
        assert!(found(TcpSegment::ACK));
        assert!(outbound_copy(None, &key, syn(TcpSegment::ACK), NOW, &g).is_none());
    }
}
