//! SNAT / DNAT of a packet in place, with RFC 1624 incremental checksum updates.
//!
//! Only the fields that change are touched: the address (IPv4 header checksum, and the TCP / UDP / ICMPv6
//! pseudo-header), the port or ICMP echo identifier (L4 checksum), the TTL. A UDP checksum of 0 ("none")
//! stays 0, and a computed 0 is sent as 0xFFFF. Because the update is incremental, a packet whose L4
//! checksum was wrong stays wrong and is rejected by the end host, and a first fragment's checksum — which
//! covers the whole datagram — stays right for the whole datagram.

use core::net::IpAddr;

use super::meta::{PacketMeta, L4};
use crate::wire::checksum::Delta;

/// Which end of the packet is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Source address and port (SNAT of outbound packets).
    Src,
    /// Destination address and port (DNAT of replies).
    Dst,
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn write_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Offset of the L4 checksum field, if this packet carries one we maintain.
#[inline]
fn l4_checksum_at(meta: &PacketMeta, l4: &L4) -> Option<usize> {
    match l4 {
        L4::Tcp { .. } => Some(meta.l4 + 16),
        L4::Udp { .. } => Some(meta.l4 + 6),
        L4::IcmpQuery { .. } | L4::IcmpError { .. } | L4::IcmpOther { .. } => Some(meta.l4 + 2),
        L4::Fragment => None,
    }
}

/// True when the L4 checksum covers the IP addresses (pseudo-header): TCP, UDP and ICMPv6, not ICMPv4.
#[inline]
fn pseudo_header_covered(meta: &PacketMeta, l4: &L4) -> bool {
    match l4 {
        L4::Tcp { .. } | L4::Udp { .. } => true,
        L4::IcmpQuery { .. } | L4::IcmpError { .. } | L4::IcmpOther { .. } => meta.v6,
        L4::Fragment => false,
    }
}

/// The one routine behind every public rewrite: each field that changes is written and recorded in the
/// [`Delta`] of each checksum covering it, and each checksum is updated once at the end.
#[inline]
fn rewrite(
    buf: &mut [u8],
    meta: &PacketMeta,
    l4: &L4,
    side: Side,
    addr: Option<IpAddr>,
    port: Option<u16>,
    ttl: bool,
) -> bool {
    let mut ip_delta = Delta::new();
    let mut l4_delta = Delta::new();
    let pseudo = pseudo_header_covered(meta, l4);
    match (meta.v6, addr) {
        (_, None) => {}
        (false, Some(IpAddr::V4(new))) => {
            let at = meta.l3 + if side == Side::Src { 12 } else { 16 };
            let new = new.octets();
            ip_delta.change(&buf[at..at + 4], &new);
            if pseudo {
                l4_delta.change(&buf[at..at + 4], &new);
            }
            buf[at..at + 4].copy_from_slice(&new);
        }
        (true, Some(IpAddr::V6(new))) => {
            let at = meta.l3 + if side == Side::Src { 8 } else { 24 };
            let new = new.octets();
            if pseudo {
                l4_delta.change(&buf[at..at + 16], &new);
            }
            buf[at..at + 16].copy_from_slice(&new);
        }
        _ => return false,
    }
    if let Some(port) = port {
        let at = match l4 {
            L4::Tcp { .. } | L4::Udp { .. } => {
                Some(meta.l4 + if side == Side::Src { 0 } else { 2 })
            }
            L4::IcmpQuery { .. } => Some(meta.l4 + 4),
            _ => None,
        };
        if let Some(at) = at {
            l4_delta.change_u16(read_u16(buf, at), port);
            write_u16(buf, at, port);
        }
    }
    if ttl {
        if meta.v6 {
            let at = meta.l3 + 7;
            buf[at] = buf[at].saturating_sub(1);
        } else {
            // TTL shares a 16-bit word with the protocol.
            let at = meta.l3 + 8;
            let old = read_u16(buf, at);
            buf[at] = buf[at].saturating_sub(1);
            ip_delta.change_u16(old, read_u16(buf, at));
        }
    }
    if !meta.v6 && !ip_delta.is_empty() {
        let c = read_u16(buf, meta.l3 + 10);
        write_u16(buf, meta.l3 + 10, ip_delta.apply(c));
    }
    if let Some(at) = l4_checksum_at(meta, l4).filter(|_| !l4_delta.is_empty()) {
        let c = read_u16(buf, at);
        let updated = if matches!(l4, L4::Udp { .. }) {
            l4_delta.apply_udp(c)
        } else {
            l4_delta.apply(c)
        };
        write_u16(buf, at, updated);
    }
    true
}

/// Rewrites the address of one side of the IP header (and the IPv4 header checksum), then the L4 checksum for
/// the pseudo-header change. `addr` must be of the packet's family; a mismatch leaves the packet untouched and
/// returns false.
pub fn rewrite_addr(buf: &mut [u8], meta: &PacketMeta, l4: &L4, side: Side, addr: IpAddr) -> bool {
    rewrite(buf, meta, l4, side, Some(addr), None, false)
}

/// Rewrites the port of one side (TCP, UDP) or the echo identifier (ICMP queries, either side), fixing the
/// L4 checksum. Does nothing for later fragments and other ICMP messages.
pub fn rewrite_port(buf: &mut [u8], meta: &PacketMeta, l4: &L4, side: Side, port: u16) {
    rewrite(buf, meta, l4, side, None, Some(port), false);
}

/// Rewrites address and port of one side: the whole of SNAT (`Side::Src`) or DNAT (`Side::Dst`).
pub fn translate(buf: &mut [u8], meta: &PacketMeta, l4: &L4, side: Side, addr: IpAddr, port: u16) {
    rewrite(buf, meta, l4, side, Some(addr), Some(port), false);
}

/// [`translate`] and [`decrement_ttl`] in one pass: what a forwarded packet needs, each checksum updated
/// once.
#[inline]
pub fn translate_and_forward(
    buf: &mut [u8],
    meta: &PacketMeta,
    l4: &L4,
    side: Side,
    addr: IpAddr,
    port: u16,
) {
    rewrite(buf, meta, l4, side, Some(addr), Some(port), true);
}

/// Rewrites only the address and decrements the TTL: later fragments, which carry no L4 header.
pub fn readdress_and_forward(buf: &mut [u8], meta: &PacketMeta, l4: &L4, side: Side, addr: IpAddr) {
    rewrite(buf, meta, l4, side, Some(addr), None, true);
}

/// Decrements the TTL / hop limit by one (the caller has checked it is above 1), fixing the IPv4 checksum.
pub fn decrement_ttl(buf: &mut [u8], meta: &PacketMeta) {
    rewrite(buf, meta, &L4::Fragment, Side::Src, None, None, true);
}

/// Largest TCP MSS that fits `mtu` for this packet's family (IP header + 20-byte TCP header).
pub fn mss_for_mtu(mtu: u16, v6: bool) -> u16 {
    mtu.saturating_sub(if v6 { 60 } else { 40 })
}

/// Clamps the MSS option of a SYN to `max_mss`; returns the (old, new) values when it changed something.
pub fn clamp_mss(
    buf: &mut [u8],
    meta: &PacketMeta,
    max_mss: u16,
) -> Result<Option<(u16, u16)>, crate::Reason> {
    let mut t = crate::wire::tcp::Packet::new_unchecked(&mut buf[meta.l4..meta.end]);
    t.clamp_mss(max_mss)
}
