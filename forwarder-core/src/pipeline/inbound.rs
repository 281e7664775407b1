//! Uplink → tunnel: a reply from outside becomes a VXLAN datagram for the node its flow came from.

use core::net::IpAddr;

use super::outbound::{flow_key, frag_key, is_martian};
use super::{Gateway, InFrag, Verdict, WorkerState};
use crate::conntrack::Refresh;
use crate::flow::{NodeAddr, Proto, UplinkId};
use crate::nat::icmp::{self, ErrorKind};
use crate::nat::meta::{parse_l4, PacketMeta, L4};
use crate::nat::rewrite::{self, Side};
use crate::wire::{ethernet, icmpv4, icmpv6, tcp, vxlan};
use crate::{Instant, Reason};

pub(super) fn process(
    gw: &Gateway,
    st: &mut WorkerState,
    uplink: UplinkId,
    buf: &mut [u8],
    start: usize,
    len: usize,
    now: Instant,
) -> Result<Verdict, Reason> {
    let cfg = &gw.config;
    if start < vxlan::HEADER_LEN {
        return Err(Reason::NoBufferRoom);
    }
    let end_of_frame = start.checked_add(len).ok_or(Reason::NoBufferRoom)?;
    let frame = buf.get(start..end_of_frame).ok_or(Reason::NoBufferRoom)?;
    let eth = ethernet::Frame::new_checked(frame)?;
    let v6 = match eth.ethertype() {
        ethernet::ethertype::IPV4 => false,
        ethernet::ethertype::IPV6 => true,
        ethernet::ethertype::ARP => return Ok(Verdict::Neighbour),
        _ => return Err(Reason::UnsupportedEtherType),
    };
    let l3 = start + ethernet::HEADER_LEN;
    let meta = PacketMeta::parse(&buf[..end_of_frame], l3, v6)?;
    let l4 = parse_l4(buf, &meta)?;
    if let L4::IcmpOther { msg_type } = l4 {
        if meta.v6
            && (icmpv6::msg_type::ROUTER_SOLICIT..=icmpv6::msg_type::REDIRECT).contains(&msg_type)
        {
            return Ok(Verdict::Neighbour);
        }
        return Err(Reason::UnsupportedIcmpType);
    }
    if is_martian(meta.src) {
        return Err(Reason::MartianAddress);
    }
    let is_error = matches!(l4, L4::IcmpError { .. });
    let reply_out = |end: usize, next_hop: IpAddr| Verdict::Forward {
        uplink,
        next_hop,
        start,
        end,
    };
    let sender_hop = |u: Option<&super::UplinkConfig>| u.map_or(meta.src, |u| u.next_hop(meta.src));
    let this_uplink = cfg.uplinks.get(usize::from(uplink));

    // Later fragments follow the first.
    let (pod, pod_port, node, tcp_seg) = if meta.is_later_fragment() {
        let f = st
            .frag_in
            .lookup(&frag_key(&meta), now)
            .ok_or(Reason::FragmentNoFlow)?;
        (f.pod, 0, f.node, None)
    } else {
        let guard = gw.table.pin();
        let (key, tcp_seg) = match l4 {
            L4::Tcp {
                src_port,
                dst_port,
                seg,
            } => (flow_key(&meta, Proto::Tcp, src_port, dst_port), Some(seg)),
            L4::Udp { src_port, dst_port } => {
                (flow_key(&meta, Proto::Udp, src_port, dst_port), None)
            }
            L4::IcmpQuery {
                ident,
                request: false,
            } => {
                let p = if meta.v6 { Proto::Icmpv6 } else { Proto::Icmp };
                (flow_key(&meta, p, ident, ident), None)
            }
            L4::IcmpError { .. } => {
                // The quoted packet is one we sent: egress → remote. Its reverse is the flow's reply tuple.
                let emb = icmp::parse_embedded(buf, &meta)?;
                let flow = gw
                    .table
                    .lookup_inbound_at(&emb.key.reversed(), now, &guard)
                    .ok_or(Reason::IcmpErrorNoFlow)?;
                if meta.ttl <= 1 {
                    return Err(Reason::TtlExpired);
                }
                let orig = flow.orig();
                let node = flow.node();
                let too_big = matches!(l4, L4::IcmpError { msg_type, code } if is_too_big(&meta, msg_type, code));
                icmp::translate_error(buf, &meta, &emb, Side::Src, orig.src, orig.src_port);
                if too_big {
                    // The pod's path also crosses the tunnel: never advertise more than it carries.
                    clamp_reported_mtu(buf, &meta, cfg.tunnel_mtu);
                }
                rewrite::decrement_ttl(buf, &meta);
                return encapsulate(gw, buf, start, &meta, node);
            }
            // Unsolicited: echo requests and anything else aimed at an egress address.
            L4::IcmpQuery { request: true, .. } => return Err(Reason::NoFlow),
            L4::IcmpOther { .. } | L4::Fragment => return Err(Reason::UnsupportedIcmpType),
        };
        let flow = gw
            .table
            .lookup_inbound_at(&key, now, &guard)
            .ok_or(Reason::NoFlow)?;
        if meta.ttl <= 1 {
            if icmp::may_originate(&meta, is_error) {
                let end = icmp::originate(buf, &meta, meta.dst, ErrorKind::TimeExceeded)
                    .ok_or(Reason::TtlExpired)?;
                st.stats.drops[Reason::TtlExpired.index()] += 1;
                st.stats.icmp_originated += 1;
                return Ok(reply_out(end, sender_hop(this_uplink)));
            }
            return Err(Reason::TtlExpired);
        }
        if flow.on_inbound(tcp_seg, meta.ip_len(), now) == Refresh::Ignored {
            return Err(Reason::TcpOutOfWindow);
        }
        let orig = flow.orig();
        (orig.src, orig.src_port, flow.node(), tcp_seg)
    };

    if meta.ip_len() > usize::from(cfg.tunnel_mtu) {
        if meta.dont_frag && icmp::may_originate(&meta, is_error) {
            let kind = ErrorKind::TooBig {
                mtu: cfg.tunnel_mtu,
            };
            let end = icmp::originate(buf, &meta, meta.dst, kind).ok_or(Reason::TooBig)?;
            st.stats.drops[Reason::TooBig.index()] += 1;
            st.stats.icmp_originated += 1;
            return Ok(reply_out(end, sender_hop(this_uplink)));
        }
        return Err(Reason::TooBig);
    }
    if tcp_seg.is_some_and(|s| s.flags & tcp::flags::SYN != 0) {
        let mtu = this_uplink.map_or(cfg.tunnel_mtu, |u| u.mtu.min(cfg.tunnel_mtu));
        rewrite::clamp_mss(buf, &meta, rewrite::mss_for_mtu(mtu, meta.v6))?;
    }
    if meta.is_later_fragment() {
        rewrite::readdress_and_forward(buf, &meta, &l4, Side::Dst, pod);
    } else {
        rewrite::translate_and_forward(buf, &meta, &l4, Side::Dst, pod, pod_port);
        if meta.is_first_fragment() {
            st.frag_in
                .insert(frag_key(&meta), InFrag { pod, node }, now);
        }
    }
    encapsulate(gw, buf, start, &meta, node)
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
        let m = p.next_hop_mtu();
        if m == 0 || m > tunnel_mtu {
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
