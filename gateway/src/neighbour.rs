//! Neighbours on the uplinks: the gateway answers ARP and NDP for its egress addresses and resolves its next
//! hops itself, because those addresses are not configured in the kernel.
//!
//! * [`handle`] reads an ARP or NDP frame received on an uplink: it learns the sender's MAC where the frame
//!   tells it (a reply, or a request for one of our addresses — the sender is about to talk to us) and builds
//!   the answer when the request is for one of our egress addresses.
//! * [`request`] builds an ARP request or a Neighbor Solicitation for a next hop.
//! * [`Neighbours`] is the cache shared by the workers: learnt entries, a generation number that workers
//!   compare against their private copy ([`LocalNeighbours`]) so that the per-packet lookup takes no lock,
//!   probe rate limits, and the refresh schedule (entries are re-probed every [`REACHABLE`], dropped after
//!   [`PROBES`] unanswered probes; the cache holds at most [`CAPACITY`] entries per uplink, oldest out first).
//!
//! Frame parsing and building here are pure; the worker does the sending.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use forwarder_core::flow::UplinkId;
use forwarder_core::wire::ethernet::{self, MacAddr};
use forwarder_core::wire::{arp, icmpv6};

/// How long an entry is trusted before it is probed again.
pub(crate) const REACHABLE: Duration = Duration::from_secs(30);
/// Interval between probes of one address.
pub(crate) const RETRANS: Duration = Duration::from_secs(1);
/// Unanswered probes after which an entry is dropped (or a resolution given up).
pub(crate) const PROBES: u32 = 3;
/// Most entries per uplink.
pub(crate) const CAPACITY: usize = 4096;

const ICMPV6_NS: u8 = icmpv6::msg_type::NEIGHBOR_SOLICIT;
const ICMPV6_NA: u8 = icmpv6::msg_type::NEIGHBOR_ADVERT;
const OPT_SOURCE_LL: u8 = 1;
const OPT_TARGET_LL: u8 = 2;
/// Longest neighbour frame we build: Ethernet + IPv6 + NS/NA with a link-layer option.
pub(crate) const MAX_FRAME: usize = 14 + 40 + 24 + 8;

/// What a received ARP/NDP frame means to us.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Heard {
    /// A neighbour's address, learnt from the frame.
    pub(crate) learnt: Option<(IpAddr, MacAddr)>,
    /// The answer to send (a complete frame of this length in the caller's buffer).
    pub(crate) reply_len: Option<usize>,
}

/// Reads an ARP or NDP frame received on an uplink whose MAC is `our_mac` and whose egress addresses are
/// `ours`; writes an answer into `reply` (at least [`MAX_FRAME`] bytes) when the frame asks for one of them.
pub(crate) fn handle(frame: &[u8], our_mac: MacAddr, ours: &[IpAddr], reply: &mut [u8]) -> Heard {
    let Ok(eth) = ethernet::Frame::new_checked(frame) else {
        return Heard::default();
    };
    match eth.ethertype() {
        ethernet::ethertype::ARP => handle_arp(eth.payload(), our_mac, ours, reply),
        ethernet::ethertype::IPV6 => handle_ndp(eth.payload(), eth.src(), our_mac, ours, reply),
        _ => Heard::default(),
    }
}

fn handle_arp(payload: &[u8], our_mac: MacAddr, ours: &[IpAddr], reply: &mut [u8]) -> Heard {
    let Ok(p) = arp::Packet::new_checked(payload) else {
        return Heard::default();
    };
    if p.hardware_type() != arp::HTYPE_ETHERNET || p.protocol_type() != ethernet::ethertype::IPV4 {
        return Heard::default();
    }
    let sender = p.sender_ip();
    let sender_ok =
        !sender.is_unspecified() && !sender.is_broadcast() && !is_multicast_mac(&p.sender_hw());
    let for_us = ours.contains(&IpAddr::V4(p.target_ip()));
    let mut heard = Heard::default();
    match p.operation() {
        arp::OP_REQUEST if for_us && sender_ok => {
            heard.learnt = Some((IpAddr::V4(sender), p.sender_hw()));
            let n = ethernet::emit(&p.sender_hw(), &our_mac, ethernet::ethertype::ARP, reply);
            let m = arp::emit_reply(&p, &our_mac, &mut reply[n..]);
            heard.reply_len = Some(n + m);
        }
        arp::OP_REPLY if sender_ok => heard.learnt = Some((IpAddr::V4(sender), p.sender_hw())),
        _ => {}
    }
    heard
}

fn is_multicast_mac(m: &MacAddr) -> bool {
    m[0] & 1 != 0
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    Ipv6Addr::from(o)
}

/// The link-layer address option of type `kind` in NDP options `opts`.
fn ll_option(mut opts: &[u8], kind: u8) -> Option<MacAddr> {
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == kind && len >= 8 {
            let mut m = [0u8; 6];
            m.copy_from_slice(&opts[2..8]);
            return Some(m);
        }
        opts = &opts[len..];
    }
    None
}

fn handle_ndp(
    ip: &[u8],
    eth_src: MacAddr,
    our_mac: MacAddr,
    ours: &[IpAddr],
    reply: &mut [u8],
) -> Heard {
    // IPv6 header, then ICMPv6 directly (NDP never carries extension headers), hop limit 255 (RFC 4861 §7.1).
    if ip.len() < 40 + icmpv6::NDP_TARGET_LEN || ip[0] >> 4 != 6 || ip[6] != 58 || ip[7] != 255 {
        return Heard::default();
    }
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let Some(msg) = ip.get(40..40 + plen) else {
        return Heard::default();
    };
    let (src, dst) = (v6(&ip[8..24]), v6(&ip[24..40]));
    let Ok(p) = icmpv6::Packet::new_checked(msg) else {
        return Heard::default();
    };
    if msg.len() < icmpv6::NDP_TARGET_LEN || p.msg_code() != 0 || !p.verify_checksum(&src, &dst) {
        return Heard::default();
    }
    let target = p.target_addr();
    let opts = &msg[icmpv6::NDP_TARGET_LEN..];
    let mut heard = Heard::default();
    match p.msg_type() {
        ICMPV6_NS if ours.contains(&IpAddr::V6(target)) => {
            let their_mac = ll_option(opts, OPT_SOURCE_LL);
            if !src.is_unspecified() {
                if let Some(m) = their_mac {
                    heard.learnt = Some((IpAddr::V6(src), m));
                }
            }
            // Duplicate address detection (source ::) is answered to all-nodes (RFC 4861 §7.2.4).
            let (to_ip, to_mac, solicited) = if src.is_unspecified() {
                (
                    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
                    multicast_mac(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
                    false,
                )
            } else {
                (src, their_mac.unwrap_or(eth_src), true)
            };
            heard.reply_len = Some(emit_ndp(
                ICMPV6_NA,
                our_mac,
                to_mac,
                target,
                to_ip,
                target,
                if solicited { 0x60 } else { 0x20 },
                OPT_TARGET_LL,
                reply,
            ));
        }
        ICMPV6_NA => {
            if let Some(m) = ll_option(opts, OPT_TARGET_LL) {
                heard.learnt = Some((IpAddr::V6(target), m));
            }
        }
        _ => {}
    }
    heard
}

/// The Ethernet multicast address of an IPv6 multicast address (RFC 2464 §7).
fn multicast_mac(ip: &Ipv6Addr) -> MacAddr {
    let o = ip.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The solicited-node multicast address of `ip` (RFC 4291 §2.7.1).
fn solicited_node(ip: &Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

#[allow(clippy::too_many_arguments)] // one NDP message's fields
fn emit_ndp(
    kind: u8,
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    flags: u8,
    option: u8,
    out: &mut [u8],
) -> usize {
    let n = ethernet::emit(&dst_mac, &src_mac, ethernet::ethertype::IPV6, out);
    let icmp_len = icmpv6::NDP_TARGET_LEN + 8;
    let ip = &mut out[n..n + 40];
    ip.fill(0);
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&u16::try_from(icmp_len).unwrap_or(32).to_be_bytes());
    ip[6] = 58;
    ip[7] = 255;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let msg = &mut out[n + 40..n + 40 + icmp_len];
    msg.fill(0);
    msg[0] = kind;
    msg[4] = flags;
    msg[24] = option;
    msg[25] = 1;
    msg[26..32].copy_from_slice(&src_mac);
    let mut p = icmpv6::Packet::new_unchecked(&mut *msg);
    p.set_target_addr(&target);
    p.fill_checksum(&src, &dst);
    n + 40 + icmp_len
}

/// Builds a request for `target` (broadcast ARP, or a multicast Neighbor Solicitation; unicast to `known`
/// when refreshing an entry) from `our_ip`; returns the frame's length in `out` (at least [`MAX_FRAME`]).
/// `None` when `our_ip` is not of `target`'s family.
pub(crate) fn request(
    target: IpAddr,
    our_ip: IpAddr,
    our_mac: MacAddr,
    known: Option<MacAddr>,
    out: &mut [u8],
) -> Option<usize> {
    match (target, our_ip) {
        (IpAddr::V4(t), IpAddr::V4(s)) => {
            let dst = known.unwrap_or(ethernet::BROADCAST);
            let n = ethernet::emit(&dst, &our_mac, ethernet::ethertype::ARP, out);
            Some(n + arp::emit(arp::OP_REQUEST, &our_mac, s, &[0; 6], t, &mut out[n..]))
        }
        (IpAddr::V6(t), IpAddr::V6(s)) => {
            let (dst_ip, dst_mac) = match known {
                Some(m) => (t, m),
                None => {
                    let g = solicited_node(&t);
                    (g, multicast_mac(&g))
                }
            };
            Some(emit_ndp(
                ICMPV6_NS,
                our_mac,
                dst_mac,
                s,
                dst_ip,
                t,
                0,
                OPT_SOURCE_LL,
                out,
            ))
        }
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    mac: Option<MacAddr>,
    /// When the entry was last confirmed (or created, while incomplete).
    confirmed: Instant,
    /// Last probe sent and how many went unanswered since the last confirmation.
    last_probe: Option<Instant>,
    probes: u32,
}

/// A probe the control loop should send (refreshing an entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    pub(crate) uplink: UplinkId,
    pub(crate) ip: IpAddr,
    pub(crate) known: Option<MacAddr>,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NeighbourCounts {
    pub(crate) resolved: u64,
    pub(crate) incomplete: u64,
    pub(crate) failed: u64,
}

/// The neighbour cache shared by the workers.
#[derive(Debug, Default)]
pub(crate) struct Neighbours {
    entries: Mutex<HashMap<(UplinkId, IpAddr), Entry>>,
    generation: AtomicU64,
    failed: AtomicU64,
}

impl Neighbours {
    /// Changes whenever a MAC is learnt, changed or forgotten.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(UplinkId, IpAddr), Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `mac` for `ip` on `uplink`. `solicited`: the frame was an answer, so an entry may be created;
    /// otherwise (a request for our address) an entry is only created when there is room.
    pub(crate) fn learn(&self, uplink: UplinkId, ip: IpAddr, mac: MacAddr, now: Instant) {
        let mut m = self.lock();
        let changed = match m.get_mut(&(uplink, ip)) {
            Some(e) => {
                let changed = e.mac != Some(mac);
                *e = Entry {
                    mac: Some(mac),
                    confirmed: now,
                    last_probe: None,
                    probes: 0,
                };
                changed
            }
            None => {
                if m.keys().filter(|(u, _)| *u == uplink).count() >= CAPACITY {
                    let oldest = m
                        .iter()
                        .filter(|((u, _), _)| *u == uplink)
                        .min_by_key(|(_, e)| e.confirmed)
                        .map(|(k, _)| *k);
                    if let Some(k) = oldest {
                        m.remove(&k);
                    }
                }
                m.insert(
                    (uplink, ip),
                    Entry {
                        mac: Some(mac),
                        confirmed: now,
                        last_probe: None,
                        probes: 0,
                    },
                );
                true
            }
        };
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// A packet needs `ip` on `uplink` and no worker knows its MAC: true when a request should go out now
    /// (at most one per [`RETRANS`] per address). After [`PROBES`] unanswered requests the address counts
    /// as failed for a while; callers drop what waits for it.
    pub(crate) fn want(&self, uplink: UplinkId, ip: IpAddr, now: Instant) -> bool {
        let mut m = self.lock();
        let e = m.entry((uplink, ip)).or_insert(Entry {
            mac: None,
            confirmed: now,
            last_probe: None,
            probes: 0,
        });
        if e.mac.is_some() {
            return false; // learnt meanwhile; the worker picks it up with the generation
        }
        let due = e.probes < PROBES
            && e.last_probe
                .is_none_or(|t| now.saturating_duration_since(t) >= RETRANS);
        if due {
            e.last_probe = Some(now);
            e.probes += 1;
        }
        due
    }

    /// Housekeeping, every few hundred milliseconds: returns the probes to send (entries older than
    /// [`REACHABLE`] are re-probed, unicast) and forgets entries that stayed unanswered.
    pub(crate) fn maintain(&self, now: Instant) -> Vec<Probe> {
        let mut probes = Vec::new();
        let mut m = self.lock();
        let before = m.len();
        let mut forgot_resolved = false;
        m.retain(|(uplink, ip), e| {
            let age = now.saturating_duration_since(e.confirmed);
            let since_probe = e
                .last_probe
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
            if e.probes >= PROBES && since_probe >= RETRANS {
                if e.mac.is_some() {
                    forgot_resolved = true;
                } else {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
                return false;
            }
            if e.mac.is_some() && age >= REACHABLE && since_probe >= RETRANS {
                e.last_probe = Some(now);
                e.probes += 1;
                probes.push(Probe {
                    uplink: *uplink,
                    ip: *ip,
                    known: e.mac,
                });
            }
            true
        });
        if forgot_resolved || m.len() != before {
            self.generation.fetch_add(1, Ordering::Release);
        }
        probes
    }

    /// True while `ip` is being resolved and has not yet failed.
    pub(crate) fn pending(&self, uplink: UplinkId, ip: IpAddr) -> bool {
        self.lock()
            .get(&(uplink, ip))
            .is_some_and(|e| e.mac.is_none() && e.probes < PROBES)
    }

    /// Copies the resolved entries into `local`.
    pub(crate) fn snapshot(&self, local: &mut LocalNeighbours) {
        let generation = self.generation();
        let m = self.lock();
        local.map.clear();
        local
            .map
            .extend(m.iter().filter_map(|(k, e)| e.mac.map(|mac| (*k, mac))));
        local.generation = generation;
        local.last = None;
    }

    /// Entry counts for metrics.
    pub(crate) fn counts(&self) -> NeighbourCounts {
        let m = self.lock();
        let resolved = m.values().filter(|e| e.mac.is_some()).count();
        NeighbourCounts {
            resolved: u64::try_from(resolved).unwrap_or(u64::MAX),
            incomplete: u64::try_from(m.len() - resolved).unwrap_or(u64::MAX),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// The resolved MAC of `ip`, if any (control paths and tests).
    pub(crate) fn get(&self, uplink: UplinkId, ip: IpAddr) -> Option<MacAddr> {
        self.lock().get(&(uplink, ip)).and_then(|e| e.mac)
    }
}

/// A worker's private copy of the resolved entries: looked up per packet without a lock.
#[derive(Debug, Default)]
pub(crate) struct LocalNeighbours {
    map: HashMap<(UplinkId, IpAddr), MacAddr>,
    generation: u64,
    last: Option<((UplinkId, IpAddr), MacAddr)>,
}

impl LocalNeighbours {
    /// Refreshes from `shared` when it changed; true when it did.
    pub(crate) fn sync(&mut self, shared: &Neighbours) -> bool {
        if shared.generation() == self.generation {
            return false;
        }
        shared.snapshot(self);
        true
    }

    /// The MAC of `ip` on `uplink`.
    #[inline]
    pub(crate) fn get(&mut self, uplink: UplinkId, ip: IpAddr) -> Option<MacAddr> {
        if let Some((k, mac)) = self.last {
            if k == (uplink, ip) {
                return Some(mac);
            }
        }
        let mac = *self.map.get(&(uplink, ip))?;
        self.last = Some(((uplink, ip), mac));
        Some(mac)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const OUR_MAC: MacAddr = [2, 0, 0, 0, 0, 1];
    const ROUTER_MAC: MacAddr = [2, 0, 0, 0, 0, 0xfe];

    fn ours() -> Vec<IpAddr> {
        vec![
            "203.0.113.10".parse().unwrap(),
            "2001:db8:113::10".parse().unwrap(),
        ]
    }

    #[test]
    fn answers_arp_for_an_egress_address_and_learns_the_asker() {
        let mut req = [0u8; 42];
        let n = request(
            "203.0.113.10".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
            ROUTER_MAC,
            None,
            &mut req,
        )
        .unwrap();
        assert_eq!(n, 42);
        let mut reply = [0u8; MAX_FRAME];
        let heard = handle(&req[..n], OUR_MAC, &ours(), &mut reply);
        assert_eq!(
            heard.learnt,
            Some(("203.0.113.1".parse().unwrap(), ROUTER_MAC))
        );
        let len = heard.reply_len.unwrap();
        let p = etherparse::SlicedPacket::from_ethernet(&reply[..len]).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = p.link else {
            panic!()
        };
        assert_eq!(eth.destination(), ROUTER_MAC);
        assert_eq!(eth.source(), OUR_MAC);
        let a = arp::Packet::new_checked(&reply[14..len]).unwrap();
        assert_eq!(a.operation(), arp::OP_REPLY);
        assert_eq!(a.sender_hw(), OUR_MAC);
        assert_eq!(a.sender_ip(), Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(a.target_ip(), Ipv4Addr::new(203, 0, 113, 1));
    }

    #[test]
    fn ignores_arp_for_other_addresses_but_learns_replies() {
        let mut req = [0u8; 42];
        let n = request(
            "203.0.113.99".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
            ROUTER_MAC,
            None,
            &mut req,
        )
        .unwrap();
        let mut reply = [0u8; MAX_FRAME];
        assert_eq!(
            handle(&req[..n], OUR_MAC, &ours(), &mut reply),
            Heard::default()
        );
        // The router answers our request.
        let mut ans = [0u8; 42];
        let m = ethernet::emit(&OUR_MAC, &ROUTER_MAC, ethernet::ethertype::ARP, &mut ans);
        arp::emit(
            arp::OP_REPLY,
            &ROUTER_MAC,
            Ipv4Addr::new(203, 0, 113, 1),
            &OUR_MAC,
            Ipv4Addr::new(203, 0, 113, 10),
            &mut ans[m..],
        );
        let heard = handle(&ans, OUR_MAC, &ours(), &mut reply);
        assert_eq!(
            heard.learnt,
            Some(("203.0.113.1".parse().unwrap(), ROUTER_MAC))
        );
        assert_eq!(heard.reply_len, None);
    }

    #[test]
    fn answers_neighbor_solicitation_with_a_valid_advertisement() {
        let mut ns = [0u8; MAX_FRAME];
        let n = request(
            "2001:db8:113::10".parse().unwrap(),
            "2001:db8:113::1".parse().unwrap(),
            ROUTER_MAC,
            None,
            &mut ns,
        )
        .unwrap();
        // Multicast to the solicited-node group.
        assert_eq!(&ns[..6], &[0x33, 0x33, 0xff, 0, 0, 0x10]);
        let mut reply = [0u8; MAX_FRAME];
        let heard = handle(&ns[..n], OUR_MAC, &ours(), &mut reply);
        assert_eq!(
            heard.learnt,
            Some(("2001:db8:113::1".parse().unwrap(), ROUTER_MAC))
        );
        let len = heard.reply_len.unwrap();
        assert_eq!(&reply[..6], &ROUTER_MAC);
        let ip = &reply[14..len];
        let msg = &ip[40..];
        assert_eq!(msg[0], ICMPV6_NA);
        assert_eq!(msg[4], 0x60, "solicited + override");
        let p = icmpv6::Packet::new_checked(msg).unwrap();
        assert!(p.verify_checksum(&v6(&ip[8..24]), &v6(&ip[24..40])));
        assert_eq!(
            p.target_addr(),
            "2001:db8:113::10".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(ll_option(&msg[24..], OPT_TARGET_LL), Some(OUR_MAC));
        // And we learn from that advertisement in turn.
        let back = handle(&reply[..len], ROUTER_MAC, &[], &mut [0u8; MAX_FRAME]);
        assert_eq!(
            back.learnt,
            Some(("2001:db8:113::10".parse().unwrap(), OUR_MAC))
        );
    }

    #[test]
    fn garbage_never_panics_and_teaches_nothing() {
        let mut reply = [0u8; MAX_FRAME];
        let mut ns = [0u8; MAX_FRAME];
        let n = request(
            "2001:db8:113::10".parse().unwrap(),
            "2001:db8:113::1".parse().unwrap(),
            ROUTER_MAC,
            None,
            &mut ns,
        )
        .unwrap();
        for cut in 0..n {
            let h = handle(&ns[..cut], OUR_MAC, &ours(), &mut reply);
            assert_eq!(h, Heard::default(), "cut at {cut}");
        }
        // A corrupted checksum is ignored.
        ns[n - 1] ^= 0xff;
        assert_eq!(
            handle(&ns[..n], OUR_MAC, &ours(), &mut reply),
            Heard::default()
        );
    }

    #[test]
    fn cache_resolves_refreshes_and_forgets() {
        let t0 = Instant::now();
        let nb = Neighbours::default();
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        assert!(nb.want(0, ip, t0));
        assert!(
            !nb.want(0, ip, t0 + Duration::from_millis(10)),
            "rate limited"
        );
        assert!(nb.pending(0, ip));
        let mut local = LocalNeighbours::default();
        assert!(local.sync(&nb) || local.get(0, ip).is_none());
        nb.learn(0, ip, ROUTER_MAC, t0 + Duration::from_millis(20));
        assert!(local.sync(&nb));
        assert_eq!(local.get(0, ip), Some(ROUTER_MAC));
        assert!(!local.sync(&nb), "no change, no copy");
        // After REACHABLE a unicast probe is due; unanswered ones remove the entry.
        let mut t = t0 + REACHABLE + Duration::from_millis(20);
        let p = nb.maintain(t);
        assert_eq!(
            p,
            vec![Probe {
                uplink: 0,
                ip,
                known: Some(ROUTER_MAC)
            }]
        );
        for _ in 1..PROBES {
            t += RETRANS;
            assert_eq!(nb.maintain(t).len(), 1);
        }
        t += RETRANS;
        assert!(nb.maintain(t).is_empty());
        assert!(local.sync(&nb));
        assert_eq!(local.get(0, ip), None);
    }

    #[test]
    fn unresolved_addresses_fail_after_the_probes() {
        let t0 = Instant::now();
        let nb = Neighbours::default();
        let ip: IpAddr = "10.50.0.99".parse().unwrap();
        let mut t = t0;
        let mut sent = 0;
        for _ in 0..6 {
            if nb.want(1, ip, t) {
                sent += 1;
            }
            nb.maintain(t);
            t += Duration::from_millis(500);
        }
        assert_eq!(sent, PROBES);
        assert!(!nb.pending(1, ip), "no more probes: given up");
        nb.maintain(t);
        assert_eq!(nb.counts().failed, 1);
        // New traffic starts a new resolution.
        assert!(nb.want(1, ip, t));
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Random frames never panic and never produce a reply longer than the buffer.
        #[test]
        fn hostile_frames_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
            let ours: Vec<IpAddr> = vec!["203.0.113.10".parse().unwrap(), "2001:db8:113::10".parse().unwrap()];
            let mut reply = [0u8; MAX_FRAME];
            let h = handle(&frame, [2, 0, 0, 0, 0, 1], &ours, &mut reply);
            prop_assert!(h.reply_len.is_none_or(|n| n <= MAX_FRAME));
        }
    }
}
