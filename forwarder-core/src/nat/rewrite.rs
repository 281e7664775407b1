//! SNAT / DNAT of a packet in place, with RFC 1624 incremental checksum updates.
//!
//! Only the fields that change are touched: the address (IPv4 header checksum, and the TCP / UDP / ICMPv6
//! pseudo-header), the port or ICMP echo identifier (L4 checksum), the TTL. A UDP checksum of 0 ("none")
//! stays 0, and a computed 0 is sent as 0xFFFF. Because the update is incremental, a packet whose L4
//! checksum was wrong stays wrong and is rejected by the end host, and a first fragment's checksum — which
//! covers the whole datagram — stays right for the whole datagram.

use core::net::IpAddr;

use super::meta::{PacketMeta, L4};
use crate::wire::checksum;

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
fn l4_checksum_at(meta: &PacketMeta, l4: &L4) -> Option<usize> {
    match l4 {
        L4::Tcp { .. } => Some(meta.l4 + 16),
        L4::Udp { .. } => Some(meta.l4 + 6),
        L4::IcmpQuery { .. } | L4::IcmpError { .. } | L4::IcmpOther { .. } => Some(meta.l4 + 2),
        L4::Fragment => None,
    }
}

/// True when the L4 checksum covers the IP addresses (pseudo-header): TCP, UDP and ICMPv6, not ICMPv4.
fn pseudo_header_covered(meta: &PacketMeta, l4: &L4) -> bool {
    match l4 {
        L4::Tcp { .. } | L4::Udp { .. } => true,
        L4::IcmpQuery { .. } | L4::IcmpError { .. } | L4::IcmpOther { .. } => meta.v6,
        L4::Fragment => false,
    }
}

/// Updates a TCP/ICMP checksum (or a UDP one, keeping "no checksum" and never producing 0).
fn update_l4(buf: &mut [u8], at: usize, udp: bool, old: &[u8], new: &[u8]) {
    let check = read_u16(buf, at);
    let updated = if udp {
        checksum::udp_update(check, old, new)
    } else {
        checksum::update_bytes(check, old, new)
    };
    write_u16(buf, at, updated);
}

/// Rewrites the address of one side of the IP header (and the IPv4 header checksum), then the L4 checksum for
/// the pseudo-header change. `addr` must be of the packet's family; a mismatch leaves the packet untouched and
/// returns false.
pub fn rewrite_addr(buf: &mut [u8], meta: &PacketMeta, l4: &L4, side: Side, addr: IpAddr) -> bool {
    let udp = matches!(l4, L4::Udp { .. });
    let l4_check = l4_checksum_at(meta, l4).filter(|_| pseudo_header_covered(meta, l4));
    match (meta.v6, addr) {
        (false, IpAddr::V4(new)) => {
            let at = meta.l3 + if side == Side::Src { 12 } else { 16 };
            let mut old = [0u8; 4];
            old.copy_from_slice(&buf[at..at + 4]);
            let new = new.octets();
            buf[at..at + 4].copy_from_slice(&new);
            let hc = read_u16(buf, meta.l3 + 10);
            write_u16(buf, meta.l3 + 10, checksum::update_bytes(hc, &old, &new));
            if let Some(c) = l4_check {
                update_l4(buf, c, udp, &old, &new);
            }
            true
        }
        (true, IpAddr::V6(new)) => {
            let at = meta.l3 + if side == Side::Src { 8 } else { 24 };
            let mut old = [0u8; 16];
            old.copy_from_slice(&buf[at..at + 16]);
            let new = new.octets();
            buf[at..at + 16].copy_from_slice(&new);
            if let Some(c) = l4_check {
                update_l4(buf, c, udp, &old, &new);
            }
            true
        }
        _ => false,
    }
}

/// Rewrites the port of one side (TCP, UDP) or the echo identifier (ICMP queries, either side), fixing the
/// L4 checksum. Does nothing for later fragments and other ICMP messages.
pub fn rewrite_port(buf: &mut [u8], meta: &PacketMeta, l4: &L4, side: Side, port: u16) {
    let at = match l4 {
        L4::Tcp { .. } | L4::Udp { .. } => meta.l4 + if side == Side::Src { 0 } else { 2 },
        L4::IcmpQuery { .. } => meta.l4 + 4,
        _ => return,
    };
    let old = read_u16(buf, at);
    if old == port {
        return;
    }
    write_u16(buf, at, port);
    if let Some(c) = l4_checksum_at(meta, l4) {
        update_l4(
            buf,
            c,
            matches!(l4, L4::Udp { .. }),
            &old.to_be_bytes(),
            &port.to_be_bytes(),
        );
    }
}

/// Rewrites address and port of one side: the whole of SNAT (`Side::Src`) or DNAT (`Side::Dst`).
pub fn translate(buf: &mut [u8], meta: &PacketMeta, l4: &L4, side: Side, addr: IpAddr, port: u16) {
    rewrite_addr(buf, meta, l4, side, addr);
    rewrite_port(buf, meta, l4, side, port);
}

/// Decrements the TTL / hop limit by one (the caller has checked it is above 1), fixing the IPv4 checksum.
pub fn decrement_ttl(buf: &mut [u8], meta: &PacketMeta) {
    if meta.v6 {
        let at = meta.l3 + 7;
        buf[at] = buf[at].saturating_sub(1);
    } else {
        let at = meta.l3 + 8;
        let old = read_u16(buf, at);
        buf[at] = buf[at].saturating_sub(1);
        let new = read_u16(buf, at);
        let hc = read_u16(buf, meta.l3 + 10);
        write_u16(
            buf,
            meta.l3 + 10,
            checksum::update_bytes(hc, &old.to_be_bytes(), &new.to_be_bytes()),
        );
    }
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
