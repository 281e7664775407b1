//! Answers the gateway gives in the tunnel on its own behalf: ARP for its tunnel address (nodes resolve
//! their next hop) and ping to it (nodes probe it), and turning a frame around towards the node it came from.

use core::net::IpAddr;

use super::{Gateway, TUNNEL_ETH, TUNNEL_L3};
use crate::nat::icmp;
use crate::nat::meta::{PacketMeta, L4};
use crate::wire::{arp, ethernet, icmpv4, icmpv6, ipv4, ipv6, vxlan};
use crate::Reason;

/// Swaps the inner Ethernet addresses so the frame goes back to the node that sent it, from the gateway's
/// tunnel MAC, under a freshly written VXLAN header.
pub(super) fn turn_around(gw: &Gateway, buf: &mut [u8]) {
    // A clean VXLAN header: flags I only, reserved bits zero (Linux drops unknown flags), our VNI.
    vxlan::emit_header(&mut buf[..vxlan::HEADER_LEN], gw.config.vni);
    let mut eth = ethernet::Frame::new_unchecked(&mut buf[TUNNEL_ETH..TUNNEL_L3]);
    let node = eth.src();
    eth.set_dst(&node);
    eth.set_src(&gw.mac);
}

/// Answers an ARP request for the gateway's tunnel address in place; returns the end of the reply.
pub(super) fn answer_arp(gw: &Gateway, buf: &mut [u8], len: usize) -> Result<usize, Reason> {
    let req = arp::Packet::new_checked(buf.get(TUNNEL_L3..len).ok_or(Reason::ArpMalformed)?)?;
    if req.operation() != arp::OP_REQUEST || req.target_ip() != gw.config.tunnel_ip {
        return Err(Reason::NotForUs);
    }
    let (asker_hw, asker_ip) = (req.sender_hw(), req.sender_ip());
    let end = TUNNEL_L3 + arp::PACKET_LEN;
    arp::emit(
        arp::OP_REPLY,
        &gw.mac,
        gw.config.tunnel_ip,
        &asker_hw,
        asker_ip,
        &mut buf[TUNNEL_L3..end],
    );
    turn_around(gw, buf);
    Ok(end)
}

/// Answers an ICMP / ICMPv6 echo request addressed to the gateway in place; returns the end of the reply.
pub(super) fn answer_echo(
    gw: &Gateway,
    buf: &mut [u8],
    meta: &PacketMeta,
    l4: &L4,
) -> Result<usize, Reason> {
    if !matches!(l4, L4::IcmpQuery { request: true, .. }) || meta.frag.is_some() {
        return Err(Reason::NotForUs);
    }
    if !icmp::verify_checksum(buf, meta) {
        return Err(Reason::IcmpBadChecksum);
    }
    match (meta.src, meta.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = ipv4::Packet::new_unchecked(&mut buf[meta.l3..meta.end]);
            ip.set_src(d);
            ip.set_dst(s);
            ip.set_ttl(64);
            ip.fill_checksum();
            icmpv4::Packet::new_unchecked(&mut buf[meta.l4..meta.end])
                .set_msg_type(icmpv4::msg_type::ECHO_REPLY);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = ipv6::Packet::new_unchecked(&mut buf[meta.l3..meta.end]);
            ip.set_src(&d);
            ip.set_dst(&s);
            ip.set_hop_limit(64);
            icmpv6::Packet::new_unchecked(&mut buf[meta.l4..meta.end])
                .set_msg_type(icmpv6::msg_type::ECHO_REPLY);
        }
        _ => return Err(Reason::NotForUs),
    }
    icmp::fill_icmp_checksum(buf, meta);
    turn_around(gw, buf);
    Ok(meta.end)
}
