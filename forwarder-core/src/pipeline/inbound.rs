//! Uplink → tunnel: a reply from outside becomes a VXLAN datagram for the node its flow came from.

use core::net::IpAddr;

use super::outbound::{flow_key, frag_key, is_martian, is_tiny_tcp_fragment};
use super::{standby, Gateway, InFrag, Step, Verdict, WorkerState};
use crate::conntrack::{Flow, Refresh, TcpSegment};
use crate::flow::{FlowKey, NodeAddr, Proto, UplinkId};
use crate::nat::fragment;
use crate::nat::icmp::{self, ErrorKind};
use crate::nat::meta::{parse_l4, PacketMeta, L4};
use crate::nat::rewrite::{self, Side};
use crate::wire::{ethernet, icmpv4, icmpv6, tcp, vxlan};
use crate::{Instant, Reason};

/// A frame that passed every check and needs its flow looked up by the reply tuple.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    meta: PacketMeta,
    l4: L4,
    /// The tuple as received (src = remote, dst = egress address).
    pub(super) key: FlowKey,
    tcp_seg: Option<TcpSegment>,
    start: usize,
}

/// One frame, start to end, with a single flow lookup.
pub(super) fn process(
    gw: &Gateway,
    st: &mut WorkerState,
    uplink: UplinkId,
    buf: &mut [u8],
    start: usize,
    len: usize,
    now: Instant,
) -> Result<Verdict, Reason> {
    match prepare(gw, st, uplink, buf, start, len, now)? {
        Step::Done(v) => Ok(v),
        Step::Lookup(p) => {
            let guard = gw.table.pin();
            let found = gw.table.lookup_inbound_at(&p.key, now, &guard);
            complete(gw, st, uplink, buf, &p, found, now)
        }
    }
}

/// Everything before the flow lookup: neighbour traffic, sanity, ICMP errors (found by the packet they
/// quote), later fragments, and the reply tuple.
#[inline(always)]
pub(super) fn prepare(
    gw: &Gateway,
    st: &mut WorkerState,
    uplink: UplinkId,
    buf: &mut [u8],
    start: usize,
    len: usize,
    now: Instant,
) -> Result<Step<Pending>, Reason> {
    if start < vxlan::HEADER_LEN {
        return Err(Reason::NoBufferRoom);
    }
    let end_of_frame = start.checked_add(len).ok_or(Reason::NoBufferRoom)?;
    let frame = buf.get(start..end_of_frame).ok_or(Reason::NoBufferRoom)?;
    let eth = ethernet::Frame::new_checked(frame)?;
    let v6 = match eth.ethertype() {
        ethernet::ethertype::IPV4 => false,
        ethernet::ethertype::IPV6 => true,
        ethernet::ethertype::ARP => return Ok(Step::Done(Verdict::Neighbour)),
        _ => return Err(Reason::UnsupportedEtherType),
    };
    let l3 = start + ethernet::HEADER_LEN;
    let meta = PacketMeta::parse(&buf[..end_of_frame], l3, v6)?;
    let l4 = parse_l4(buf, &meta)?;
    if let L4::IcmpOther { msg_type } = l4 {
        // Link control messages — NDP (133–137) and multicast listener discovery (130–132, 143) — are the
        // link's business, not translated traffic: handed to the neighbour code, never counted as drops.
        if meta.v6
            && ((icmpv6::msg_type::ROUTER_SOLICIT..=icmpv6::msg_type::REDIRECT).contains(&msg_type)
                || matches!(msg_type, 130..=132 | 143))
        {
            return Ok(Step::Done(Verdict::Neighbour));
        }
        return Err(Reason::UnsupportedIcmpType);
    }
    if is_martian(meta.src) {
        return Err(Reason::MartianAddress);
    }

    // Later fragments follow the first.
    if meta.is_later_fragment() {
        if meta.ttl <= 1 {
            // No ICMP about later fragments (RFC 1812 §4.3.2.7); just never forward with TTL 0.
            return Err(Reason::TtlExpired);
        }
        if is_tiny_tcp_fragment(&meta) {
            return Err(Reason::TinyFragment);
        }
        let f = st
            .frag_in
            .lookup(&frag_key(&meta), now)
            .ok_or(Reason::FragmentNoFlow)?;
        if f.uplink != uplink {
            return Err(Reason::WrongUplink);
        }
        let to = Delivery {
            pod: f.pod,
            pod_port: 0,
            node: f.node,
        };
        let at = Arrival { uplink, start };
        if let Some(refused) = check_tunnel_mtu(gw, st, at, buf, &meta, now) {
            return refused.map(Step::Done);
        }
        return deliver(gw, st, at, buf, &meta, &l4, to, now).map(Step::Done);
    }
    let (key, tcp_seg) = match l4 {
        L4::Tcp {
            src_port,
            dst_port,
            seg,
        } => (flow_key(&meta, Proto::Tcp, src_port, dst_port), Some(seg)),
        L4::Udp { src_port, dst_port } => (flow_key(&meta, Proto::Udp, src_port, dst_port), None),
        L4::IcmpQuery {
            ident,
            request: false,
        } => {
            let p = if meta.v6 { Proto::Icmpv6 } else { Proto::Icmp };
            (flow_key(&meta, p, ident, ident), None)
        }
        L4::IcmpError { msg_type, code } => {
            let at = Arrival { uplink, start };
            return translate_error(gw, st, buf, at, &meta, msg_type, code, now).map(Step::Done);
        }
        // Unsolicited: echo requests and anything else aimed at an egress address.
        L4::IcmpQuery { request: true, .. } => return Err(Reason::NoFlow),
        L4::IcmpOther { .. } | L4::Fragment => return Err(Reason::UnsupportedIcmpType),
    };
    Ok(Step::Lookup(Pending {
        meta,
        l4,
        key,
        tcp_seg,
        start,
    }))
}

/// Everything after the flow lookup in the gateway's own table (`found`): on a miss, the served peers'
/// copies; TTL, TCP state, then delivery to the pod.
#[inline(always)]
pub(super) fn complete(
    gw: &Gateway,
    st: &mut WorkerState,
    uplink: UplinkId,
    buf: &mut [u8],
    p: &Pending,
    found: Option<&Flow>,
    now: Instant,
) -> Result<Verdict, Reason> {
    let Some(flow) = found else {
        if let Some(s) = gw.standby.as_deref().filter(|s| s.serving_any()) {
            let guard = gw.table.pin();
            if let Some(copy) = s.lookup_inbound_at(&p.key, now, &guard) {
                let v = existing(gw, st, uplink, buf, p, copy, now);
                if matches!(
                    v,
                    Ok(Verdict::Tunnel { .. } | Verdict::TunnelSegments { .. })
                ) {
                    st.stats.standby_in += 1;
                }
                return v;
            }
        }
        // The reply tuple's destination port is the egress side's (for an echo reply, its identifier).
        let port = p.key.dst_port;
        let probe = gw
            .config
            .probe_ports
            .as_ref()
            .is_some_and(|r| r.contains(&port));
        return Err(if probe {
            Reason::ProbeAnswer
        } else {
            Reason::NoFlow
        });
    };
    existing(gw, st, uplink, buf, p, flow, now)
}

/// A packet of a flow that exists (here, or as a served peer's copy): TTL, TCP state, then delivery to the
/// pod.
#[inline(always)]
fn existing(
    gw: &Gateway,
    st: &mut WorkerState,
    uplink: UplinkId,
    buf: &mut [u8],
    p: &Pending,
    flow: &Flow,
    now: Instant,
) -> Result<Verdict, Reason> {
    let Pending {
        meta,
        l4,
        tcp_seg,
        start,
        ..
    } = *p;
    // Replies come back the way the flow left; the same tuple on another VLAN is spoofed.
    if flow.uplink() != uplink {
        return Err(Reason::WrongUplink);
    }
    let at = Arrival { uplink, start };
    if meta.ttl <= 1 {
        let kind = ErrorKind::TimeExceeded;
        return answer_sender(gw, st, at, buf, &meta, kind, Reason::TtlExpired, now);
    }
    // Everything that can refuse the packet is checked before the flow's state changes.
    if let Some(refused) = check_tunnel_mtu(gw, st, at, buf, &meta, now) {
        return refused;
    }
    if tcp_seg.is_some_and(|s| s.flags & tcp::flags::SYN != 0) {
        let cfg = &gw.config;
        let this = cfg.uplinks.get(usize::from(uplink));
        let mtu = this.map_or(cfg.tunnel_mtu, |u| u.mtu.min(cfg.tunnel_mtu));
        rewrite::clamp_mss(buf, &meta, rewrite::mss_for_mtu(mtu, meta.v6))?;
    }
    if flow.on_inbound(tcp_seg, meta.ip_len(), now) == Refresh::Ignored {
        return Err(Reason::TcpOutOfWindow);
    }
    let orig = flow.orig();
    let to = Delivery {
        pod: orig.src,
        pod_port: orig.src_port,
        node: flow.node(),
    };
    deliver(gw, st, at, buf, &meta, &l4, to, now)
}

/// Where a reply goes: the pod's address and port (0 for later fragments), its node.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    pod: IpAddr,
    pod_port: u16,
    node: NodeAddr,
}

/// Where a frame came in: its uplink and its offset in the buffer.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    uplink: UplinkId,
    start: usize,
}

/// A reply too big for the tunnel with DF set: "too big" goes back to the sender. `None` when it fits, or
/// when it may be fragmented (IPv4, DF clear).
#[inline(always)]
fn check_tunnel_mtu(
    gw: &Gateway,
    st: &mut WorkerState,
    at: Arrival,
    buf: &mut [u8],
    meta: &PacketMeta,
    now: Instant,
) -> Option<Result<Verdict, Reason>> {
    let mtu = gw.config.tunnel_mtu;
    if meta.ip_len() <= usize::from(mtu) {
        return None;
    }
    if !meta.dont_frag {
        // IPv4 without DF: fragmented into the tunnel after translation (see `deliver`).
        return None;
    }
    let kind = ErrorKind::TooBig { mtu };
    Some(answer_sender(
        gw,
        st,
        at,
        buf,
        meta,
        kind,
        Reason::TooBig,
        now,
    ))
}

/// DNAT and encapsulation shared by replies and their later fragments; the caller has already passed
/// [`check_tunnel_mtu`], so a packet still too big here may be fragmented.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn deliver(
    gw: &Gateway,
    st: &mut WorkerState,
    at: Arrival,
    buf: &mut [u8],
    meta: &PacketMeta,
    l4: &L4,
    to: Delivery,
    now: Instant,
) -> Result<Verdict, Reason> {
    if meta.is_later_fragment() {
        rewrite::readdress_and_forward(buf, meta, l4, Side::Dst, to.pod);
    } else {
        rewrite::translate_and_forward(buf, meta, l4, Side::Dst, to.pod, to.pod_port);
        if meta.is_first_fragment() {
            let f = InFrag {
                pod: to.pod,
                node: to.node,
                uplink: at.uplink,
            };
            st.frag_in.insert(frag_key(meta), f, now);
        }
    }
    let v = encapsulate(gw, buf, at.start, meta, to.node)?;
    if meta.ip_len() <= usize::from(gw.config.tunnel_mtu) {
        return Ok(v);
    }
    // Too big and DF clear (checked above): fragment into the tunnel, as a router does.
    let start = at.start - vxlan::HEADER_LEN;
    let (end, segment) =
        fragment::split_ipv4(buf, start, meta, gw.config.tunnel_mtu).ok_or(Reason::TooBig)?;
    Ok(Verdict::TunnelSegments {
        node: to.node.ip,
        start,
        end,
        segment,
    })
}

/// Replaces the packet with an ICMP error back to its sender on the uplink it came from, from the address
/// it was sent to, within the ICMP rate limit. The packet counts as dropped for `reason` either way.
#[allow(clippy::too_many_arguments)]
fn answer_sender(
    gw: &Gateway,
    st: &mut WorkerState,
    at: Arrival,
    buf: &mut [u8],
    meta: &PacketMeta,
    kind: ErrorKind,
    reason: Reason,
    now: Instant,
) -> Result<Verdict, Reason> {
    // ICMP errors never get here (they are translated or dropped first), so only the other rules apply.
    if !icmp::may_originate(meta, false) {
        return Err(reason);
    }
    let end = icmp::originate(buf, meta, meta.dst, kind).ok_or(reason)?;
    if !st.allow_icmp(now, reason) {
        return Err(reason);
    }
    let next_hop = gw
        .config
        .uplinks
        .get(usize::from(at.uplink))
        .map_or(meta.src, |u| u.next_hop(meta.src));
    Ok(Verdict::Forward {
        uplink: at.uplink,
        next_hop,
        start: at.start,
        end,
    })
}

/// An ICMP error from outside about a packet we sent: the quoted packet went egress → remote, so its reverse
/// is the flow's reply tuple. The quote and the outer destination are turned back to the pod; the error never
/// refreshes the flow. The flow may be a served peer's copy.
#[allow(clippy::too_many_arguments)]
fn translate_error(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    at: Arrival,
    meta: &PacketMeta,
    msg_type: u8,
    code: u8,
    now: Instant,
) -> Result<Verdict, Reason> {
    if !icmp::verify_checksum(buf, meta) {
        return Err(Reason::IcmpBadChecksum);
    }
    let emb = icmp::parse_embedded(buf, meta)?;
    let guard = gw.table.pin();
    let key = emb.key.reversed();
    let (flow, copy) = match gw.table.lookup_inbound_at(&key, now, &guard) {
        Some(f) => (f, false),
        None => {
            let f = standby::inbound_copy(gw.standby.as_deref(), &key, now, &guard);
            (f.ok_or(Reason::IcmpErrorNoFlow)?, true)
        }
    };
    if flow.uplink() != at.uplink {
        return Err(Reason::WrongUplink);
    }
    if meta.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    let orig = flow.orig();
    icmp::translate_error(buf, meta, &emb, Side::Src, orig.src, orig.src_port);
    if is_too_big(meta, msg_type, code) {
        // The pod's path also crosses the tunnel: never advertise more than it carries.
        clamp_reported_mtu(buf, meta, gw.config.tunnel_mtu);
    }
    rewrite::decrement_ttl(buf, meta);
    if copy {
        st.stats.standby_in += 1;
    }
    encapsulate(gw, buf, at.start, meta, flow.node())
}

/// True for "fragmentation needed" (ICMPv4 3/4) and "packet too big" (ICMPv6 2).
fn is_too_big(meta: &PacketMeta, msg_type: u8, code: u8) -> bool {
    if meta.v6 {
        msg_type == icmpv6::msg_type::PACKET_TOO_BIG
    } else {
        msg_type == icmpv4::msg_type::DEST_UNREACHABLE && code == icmpv4::code::FRAG_NEEDED
    }
}

/// Lowers the MTU reported in a too-big error to what the tunnel carries, and fixes the ICMP checksum.
fn clamp_reported_mtu(buf: &mut [u8], meta: &PacketMeta, tunnel_mtu: u16) {
    if meta.v6 {
        let mut p = icmpv6::Packet::new_unchecked(&mut buf[meta.l4..meta.end]);
        if p.mtu() > u32::from(tunnel_mtu) {
            p.set_mtu(u32::from(tunnel_mtu));
        }
    } else {
        let mut p = icmpv4::Packet::new_unchecked(&mut buf[meta.l4..meta.end]);
        // 0 comes from routers older than RFC 1191: left alone, the pod falls back to its plateau search.
        let m = p.next_hop_mtu();
        if m > tunnel_mtu {
            p.set_next_hop_mtu(tunnel_mtu);
        }
    }
    icmp::fill_icmp_checksum(buf, meta);
}

/// Writes the VXLAN header in front of the frame and readdresses the inner Ethernet header to the node.
fn encapsulate(
    gw: &Gateway,
    buf: &mut [u8],
    start: usize,
    meta: &PacketMeta,
    node: NodeAddr,
) -> Result<Verdict, Reason> {
    let vx = start - vxlan::HEADER_LEN;
    vxlan::emit_header(&mut buf[vx..start], gw.config.vni);
    let mut eth = ethernet::Frame::new_unchecked(&mut buf[start..start + ethernet::HEADER_LEN]);
    eth.set_dst(&node.mac);
    eth.set_src(&gw.mac);
    Ok(Verdict::Tunnel {
        node: node.ip,
        start: vx,
        end: meta.end,
    })
}
