//! Neighbours on the uplinks: the gateway answers ARP and NDP for its egress addresses and resolves its next
//! hops itself, because those addresses are not configured in the kernel.
//!
//! * [`handle`] reads an ARP or NDP frame received on an uplink: it says what the frame claims (an address
//!   and a MAC, and whether the frame can be an answer to a request of ours — a [`Claim`]) and builds the
//!   answer when the frame asks for one of our egress addresses.
//! * [`request`] builds an ARP request or a Neighbor Solicitation for a next hop.
//! * [`Neighbours`] (in `cache.rs`) decides what a claim may change: the rules that keep the cache from being
//!   poisoned, the refresh schedule, the bound per uplink and the configured next hops that are never evicted.
//!   Workers read it through [`LocalNeighbours`] without a lock (`table.rs`).
//!
//! Frame parsing and building here are pure; the worker does the sending.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use forwarder_core::wire::ethernet::{self, MacAddr};
use forwarder_core::wire::{arp, icmpv6};

mod cache;
mod table;

pub(crate) use cache::{LocalNeighbours, Neighbours, Outcome};

/// How long an entry is trusted before it is probed again (RFC 4861 §10 REACHABLE_TIME).
pub(crate) const REACHABLE: Duration = Duration::from_secs(30);
/// How long a configured next hop (the uplink's router) is trusted before it is probed again. Every flow
/// of the uplink depends on it, and a router replaced or failed over to a standby with another MAC does not
/// always say so (Linux sends nothing on a MAC change unless `arp_notify` / `ndisc_notify` is set): a
/// unicast probe every 5 s finds that within 5 s + [`PROBES`] × [`RETRANS`], where [`REACHABLE`] would
/// leave the uplink black-holed for up to 34 s. One ARP request or NS per router every 5 s costs nothing.
pub(crate) const NEXT_HOP_REACHABLE: Duration = Duration::from_secs(5);
/// Interval between probes of one address (RFC 4861 §10 RETRANS_TIMER).
pub(crate) const RETRANS: Duration = Duration::from_secs(1);
/// Unanswered probes after which a phase ends (RFC 4861 §10 MAX_UNICAST_SOLICIT / MAX_MULTICAST_SOLICIT).
pub(crate) const PROBES: u32 = 3;
/// Most learnt entries per uplink; the configured next hops come on top and are never evicted.
pub(crate) const CAPACITY: usize = 4096;

const ICMPV6_NS: u8 = icmpv6::msg_type::NEIGHBOR_SOLICIT;
const ICMPV6_NA: u8 = icmpv6::msg_type::NEIGHBOR_ADVERT;
const OPT_SOURCE_LL: u8 = 1;
const OPT_TARGET_LL: u8 = 2;
/// Neighbor Advertisement flags (RFC 4861 §4.4).
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// Longest neighbour frame we build: Ethernet + IPv6 + NS/NA with a link-layer option.
pub(crate) const MAX_FRAME: usize = 14 + 40 + 24 + 8;

/// What kind of frame made a [`Claim`]: what it may change is decided in [`Neighbours::heard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimKind {
    /// An ARP reply addressed to one of our addresses and our MAC, or a Neighbor Advertisement with the
    /// Solicited flag sent to one of our addresses: it may answer a request of ours.
    Answer,
    /// An ARP request or a Neighbor Solicitation for one of our addresses: its sender is about to talk to us
    /// (RFC 826 "Packet Reception", RFC 4861 §7.2.3).
    Request,
    /// Anything else that names a MAC for an address: gratuitous ARP, requests and replies between others,
    /// unsolicited Neighbor Advertisements. Never creates or changes an entry by itself.
    Unsolicited,
}

/// An address and the MAC a received frame says it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    pub(crate) ip: IpAddr,
    pub(crate) mac: MacAddr,
    pub(crate) kind: ClaimKind,
    /// False only for a Neighbor Advertisement without the Override flag (RFC 4861 §7.2.5): it may not
    /// propose a new MAC for a known entry.
    pub(crate) overrides: bool,
}

/// What a received ARP/NDP frame means to us.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Heard {
    /// What the frame claims about a neighbour.
    pub(crate) claim: Option<Claim>,
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
    // Nobody may claim one of our own addresses; probes (sender 0.0.0.0, RFC 5227 §2.1.1) name no one.
    let sender_ok = !sender.is_unspecified()
        && !sender.is_broadcast()
        && !sender.is_multicast()
        && !is_multicast_mac(&p.sender_hw())
        && p.sender_hw() != [0; 6]
        && !ours.contains(&IpAddr::V4(sender));
    let for_us = ours.contains(&IpAddr::V4(p.target_ip()));
    // A probe asks whether anyone holds the address (RFC 5227 §2.1.1): the holder answers it as any
    // request (RFC 826; Linux does), to the prober's MAC, and learns nothing from it.
    let probe = sender.is_unspecified()
        && !is_multicast_mac(&p.sender_hw())
        && p.sender_hw() != [0; 6]
        && p.sender_hw() != our_mac;
    let mut heard = Heard::default();
    let kind = match p.operation() {
        arp::OP_REQUEST if for_us && (sender_ok || probe) => {
            let n = ethernet::emit(&p.sender_hw(), &our_mac, ethernet::ethertype::ARP, reply);
            let m = arp::emit_reply(&p, &our_mac, &mut reply[n..]);
            heard.reply_len = Some(n + m);
            ClaimKind::Request
        }
        arp::OP_REPLY if for_us && p.target_hw() == our_mac => ClaimKind::Answer,
        arp::OP_REQUEST | arp::OP_REPLY => ClaimKind::Unsolicited,
        _ => return heard,
    };
    if sender_ok {
        heard.claim = Some(Claim {
            ip: IpAddr::V4(sender),
            mac: p.sender_hw(),
            kind,
            overrides: true,
        });
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
            if !src.is_unspecified() && !ours.contains(&IpAddr::V6(src)) {
                if let Some(m) = their_mac.filter(|m| !is_multicast_mac(m) && *m != [0; 6]) {
                    heard.claim = Some(Claim {
                        ip: IpAddr::V6(src),
                        mac: m,
                        kind: ClaimKind::Request,
                        overrides: true,
                    });
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
                if solicited {
                    NA_SOLICITED | NA_OVERRIDE
                } else {
                    NA_OVERRIDE
                },
                Some(OPT_TARGET_LL),
                reply,
            ));
        }
        ICMPV6_NA if !ours.contains(&IpAddr::V6(target)) && !target.is_multicast() => {
            let flags = msg[4];
            // A solicited advertisement goes to the soliciting node's unicast address (RFC 4861 §7.2.4).
            let kind = if flags & NA_SOLICITED != 0 && ours.contains(&IpAddr::V6(dst)) {
                ClaimKind::Answer
            } else {
                ClaimKind::Unsolicited
            };
            // An answer to a unicast solicitation may omit the option (RFC 4861 §7.2.4; Linux does): its
            // sender's MAC is then the frame's source.
            if let Some(m) = ll_option(opts, OPT_TARGET_LL).or(Some(eth_src)) {
                if !is_multicast_mac(&m) && m != [0; 6] {
                    heard.claim = Some(Claim {
                        ip: IpAddr::V6(target),
                        mac: m,
                        kind,
                        overrides: flags & NA_OVERRIDE != 0,
                    });
                }
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
    option: Option<u8>,
    out: &mut [u8],
) -> usize {
    let n = ethernet::emit(&dst_mac, &src_mac, ethernet::ethertype::IPV6, out);
    let icmp_len = icmpv6::NDP_TARGET_LEN + if option.is_some() { 8 } else { 0 };
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
    if let Some(option) = option {
        msg[24] = option;
        msg[25] = 1;
        msg[26..32].copy_from_slice(&src_mac);
    }
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
                Some(OPT_SOURCE_LL),
                out,
            ))
        }
        _ => None,
    }
}

/// A broadcast ARP request from `sender` (and `our_mac`) for `target`; returns its length in `out`.
fn broadcast_arp_request(
    sender: std::net::Ipv4Addr,
    target: std::net::Ipv4Addr,
    our_mac: MacAddr,
    out: &mut [u8],
) -> usize {
    let n = ethernet::emit(
        &ethernet::BROADCAST,
        &our_mac,
        ethernet::ethertype::ARP,
        out,
    );
    n + arp::emit(
        arp::OP_REQUEST,
        &our_mac,
        sender,
        &[0; 6],
        target,
        &mut out[n..],
    )
}

/// Builds an announcement that `ip` is at `our_mac` into `out` (at least [`MAX_FRAME`]); returns its length.
/// IPv4: a gratuitous ARP request with sender and target address `ip`, broadcast (RFC 5227 §2.3 explains
/// why a request; Linux replaces an existing entry on it whatever `arp_accept` says). IPv6: an unsolicited
/// Neighbor Advertisement to all-nodes with the Override flag and the target link-layer address
/// (RFC 4861 §7.2.6).
pub(crate) fn announce(ip: IpAddr, our_mac: MacAddr, out: &mut [u8]) -> usize {
    match ip {
        IpAddr::V4(a) => broadcast_arp_request(a, a, our_mac, out),
        IpAddr::V6(a) => {
            let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
            emit_ndp(
                ICMPV6_NA,
                our_mac,
                multicast_mac(&all_nodes),
                a,
                all_nodes,
                a,
                NA_OVERRIDE,
                Some(OPT_TARGET_LL),
                out,
            )
        }
    }
}

/// Builds a probe asking whether anyone on the link holds `ip` into `out` (at least [`MAX_FRAME`]); returns
/// its length. IPv4: an ARP request from sender address 0.0.0.0, broadcast (RFC 5227 §2.1.1). IPv6: a
/// Neighbor Solicitation from the unspecified address to the solicited-node group, without a source
/// link-layer option (duplicate address detection, RFC 4862 §5.4.2; RFC 4861 §7.1.1), which the holder
/// answers to all-nodes. Either way the probe claims nothing for the prober, and the holder's answer is
/// heard as a claim of `ip` by its MAC.
pub(crate) fn probe(ip: IpAddr, our_mac: MacAddr, out: &mut [u8]) -> usize {
    match ip {
        IpAddr::V4(a) => broadcast_arp_request(std::net::Ipv4Addr::UNSPECIFIED, a, our_mac, out),
        IpAddr::V6(a) => {
            let g = solicited_node(&a);
            emit_ndp(
                ICMPV6_NS,
                our_mac,
                multicast_mac(&g),
                Ipv6Addr::UNSPECIFIED,
                g,
                a,
                0,
                None,
                out,
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const OUR_MAC: MacAddr = [2, 0, 0, 0, 0, 1];
    const ROUTER_MAC: MacAddr = [2, 0, 0, 0, 0, 0xfe];

    fn claim(ip: &str, mac: MacAddr, kind: ClaimKind) -> Claim {
        Claim {
            ip: ip.parse().unwrap(),
            mac,
            kind,
            overrides: true,
        }
    }

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
            heard.claim,
            Some(claim("203.0.113.1", ROUTER_MAC, ClaimKind::Request))
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
            Heard {
                claim: Some(claim("203.0.113.1", ROUTER_MAC, ClaimKind::Unsolicited)),
                reply_len: None
            }
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
            heard.claim,
            Some(claim("203.0.113.1", ROUTER_MAC, ClaimKind::Answer))
        );
        assert_eq!(heard.reply_len, None);
    }

    fn arp(op: u16, mac: MacAddr, from: &str, to_mac: MacAddr, to: &str) -> [u8; 42] {
        let mut f = [0u8; 42];
        let m = ethernet::emit(&ethernet::BROADCAST, &mac, ethernet::ethertype::ARP, &mut f);
        arp::emit(
            op,
            &mac,
            from.parse().unwrap(),
            &to_mac,
            to.parse().unwrap(),
            &mut f[m..],
        );
        f
    }

    fn na(mac: MacAddr, dst: &str, target: &str, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; MAX_FRAME];
        let n = emit_ndp(
            ICMPV6_NA,
            mac,
            OUR_MAC,
            target.parse().unwrap(),
            dst.parse().unwrap(),
            target.parse().unwrap(),
            flags,
            Some(OPT_TARGET_LL),
            &mut f,
        );
        f.truncate(n);
        f
    }

    /// Only a reply to our address and MAC, or a solicited advertisement to our address, can answer us.
    #[test]
    fn an_announcement_is_heard_as_an_unsolicited_claim_of_the_address() {
        let mut frame = [0u8; MAX_FRAME];
        let theirs = [2, 0, 0, 0, 0, 9];
        for ip in ["203.0.113.77", "2001:db8:113::77"] {
            let ip: IpAddr = ip.parse().unwrap();
            let n = announce(ip, theirs, &mut frame);
            let heard = handle(&frame[..n], OUR_MAC, &ours(), &mut [0u8; MAX_FRAME]);
            let claim = heard.claim.expect("a claim");
            assert_eq!((claim.ip, claim.mac), (ip, theirs), "{ip}");
            assert_eq!(claim.kind, ClaimKind::Unsolicited, "{ip}");
            assert!(heard.reply_len.is_none(), "{ip}: not answered");
        }
    }

    /// A replica probing a peer's address (before it takes it over) hears the holder's answer as a claim of
    /// that address by the holder's MAC; the probe itself claims nothing, for anyone.
    #[test]
    fn a_probe_of_an_address_is_answered_by_its_holder_and_heard_as_its_claim() {
        const PROBER: MacAddr = [2, 0, 0, 0, 0, 2];
        for ip in ["203.0.113.10", "2001:db8:113::10"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut frame = [0u8; MAX_FRAME];
            let n = probe(ip, PROBER, &mut frame);
            // a bystander learns nothing and does not answer
            let bystander = handle(&frame[..n], ROUTER_MAC, &[], &mut [0u8; MAX_FRAME]);
            assert_eq!(bystander, Heard::default(), "{ip}");
            // the holder answers
            let mut answer = [0u8; MAX_FRAME];
            let held = handle(&frame[..n], OUR_MAC, &ours(), &mut answer);
            assert_eq!(held.claim, None, "{ip}: the probe claims nothing");
            let m = held.reply_len.unwrap_or_else(|| panic!("{ip}: answered"));
            // the prober, which does not hold it, hears the holder claim it
            let heard = handle(&answer[..m], PROBER, &[], &mut [0u8; MAX_FRAME]);
            let claim = heard.claim.unwrap_or_else(|| panic!("{ip}: a claim"));
            assert_eq!((claim.ip, claim.mac), (ip, OUR_MAC), "{ip}");
            assert!(heard.reply_len.is_none());
        }
    }

    #[test]
    fn tells_answers_from_unsolicited_claims() {
        const EVIL: MacAddr = [2, 0xe, 0xe, 0xe, 0xe, 0xe];
        let mut r = [0u8; MAX_FRAME];
        let kind = |f: &[u8]| {
            handle(f, OUR_MAC, &ours(), &mut [0u8; MAX_FRAME])
                .claim
                .map(|c| (c.kind, c.mac, c.overrides))
        };
        let reply = arp(arp::OP_REPLY, EVIL, "203.0.113.1", OUR_MAC, "203.0.113.10");
        assert_eq!(kind(&reply), Some((ClaimKind::Answer, EVIL, true)));
        // Gratuitous ARP, as a reply and as a request (RFC 5227 §3 announcement).
        let garp = arp(
            arp::OP_REPLY,
            EVIL,
            "203.0.113.1",
            ethernet::BROADCAST,
            "203.0.113.1",
        );
        assert_eq!(kind(&garp), Some((ClaimKind::Unsolicited, EVIL, true)));
        let garp = arp(arp::OP_REQUEST, EVIL, "203.0.113.1", [0; 6], "203.0.113.1");
        assert_eq!(kind(&garp), Some((ClaimKind::Unsolicited, EVIL, true)));
        // A reply to our address but to another MAC.
        let other = arp(arp::OP_REPLY, EVIL, "203.0.113.1", EVIL, "203.0.113.10");
        assert_eq!(kind(&other), Some((ClaimKind::Unsolicited, EVIL, true)));
        // Nobody may claim our own address, and probes (sender 0.0.0.0) claim nothing; a probe of our
        // address is answered, to the prober's MAC (RFC 5227 §2.1.1).
        let ours_claimed = arp(arp::OP_REPLY, EVIL, "203.0.113.10", OUR_MAC, "203.0.113.10");
        assert_eq!(kind(&ours_claimed), None);
        let probe = arp(arp::OP_REQUEST, EVIL, "0.0.0.0", [0; 6], "203.0.113.10");
        let heard = handle(&probe, OUR_MAC, &ours(), &mut r);
        assert_eq!(heard.claim, None);
        let n = heard.reply_len.expect("the probe is answered");
        assert_eq!(&r[..6], &EVIL[..], "to the prober");
        let p = arp::Packet::new_checked(&r[14..n]).unwrap();
        assert_eq!(p.operation(), arp::OP_REPLY);
        assert_eq!(p.sender_ip(), "203.0.113.10".parse::<Ipv4Addr>().unwrap());
        assert_eq!(p.sender_hw(), OUR_MAC);
        // a probe of another address, or from a multicast MAC, is not
        let other = arp(arp::OP_REQUEST, EVIL, "0.0.0.0", [0; 6], "203.0.113.99");
        assert_eq!(handle(&other, OUR_MAC, &ours(), &mut r), Heard::default());
        let multicast = arp(
            arp::OP_REQUEST,
            ethernet::BROADCAST,
            "0.0.0.0",
            [0; 6],
            "203.0.113.10",
        );
        assert_eq!(
            handle(&multicast, OUR_MAC, &ours(), &mut r),
            Heard::default()
        );
        // Advertisements: solicited to us answers; unsolicited (to all-nodes, or without S) does not.
        let sol = na(EVIL, "2001:db8:113::10", "2001:db8:113::1", NA_SOLICITED);
        assert_eq!(kind(&sol), Some((ClaimKind::Answer, EVIL, false)));
        let unsol = na(EVIL, "ff02::1", "2001:db8:113::1", NA_OVERRIDE);
        assert_eq!(kind(&unsol), Some((ClaimKind::Unsolicited, EVIL, true)));
        let unsol = na(EVIL, "2001:db8:113::10", "2001:db8:113::1", NA_OVERRIDE);
        assert_eq!(kind(&unsol), Some((ClaimKind::Unsolicited, EVIL, true)));
        let ours_claimed = na(EVIL, "ff02::1", "2001:db8:113::10", NA_OVERRIDE);
        assert_eq!(kind(&ours_claimed), None);
        // An answer to a unicast solicitation without the target link-layer option (as Linux sends it):
        // the MAC is the frame's source.
        let mut bare = na(
            ROUTER_MAC,
            "2001:db8:113::10",
            "2001:db8:113::1",
            NA_SOLICITED,
        );
        bare.truncate(bare.len() - 8);
        bare[14 + 5] -= 8;
        let (src, dst) = (v6(&bare[22..38]), v6(&bare[38..54]));
        let mut p = icmpv6::Packet::new_unchecked(&mut bare[54..]);
        p.fill_checksum(&src, &dst);
        assert_eq!(kind(&bare), Some((ClaimKind::Answer, ROUTER_MAC, false)));
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
            heard.claim,
            Some(claim("2001:db8:113::1", ROUTER_MAC, ClaimKind::Request))
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
        // To the router (whose address it is sent to) it is an answer.
        let router: Vec<IpAddr> = vec!["2001:db8:113::1".parse().unwrap()];
        let back = handle(&reply[..len], ROUTER_MAC, &router, &mut [0u8; MAX_FRAME]);
        assert_eq!(
            back.claim,
            Some(claim("2001:db8:113::10", OUR_MAC, ClaimKind::Answer))
        );
        // To anyone else it is not.
        let back = handle(&reply[..len], ROUTER_MAC, &[], &mut [0u8; MAX_FRAME]);
        assert_eq!(
            back.claim,
            Some(claim("2001:db8:113::10", OUR_MAC, ClaimKind::Unsolicited))
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
