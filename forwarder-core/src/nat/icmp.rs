//! ICMP errors: the ones the gateway originates, and the translation of the ones that refer to a
//! translated flow (RFC 5508 for ICMPv4, and the same rules for ICMPv6).
//!
//! An error is built *in place*: the offending packet is moved back to make room for the new IP and ICMP
//! headers and quoted as far as the minimum-MTU rule allows (576 bytes in all for IPv4 as RFC 1812 says,
//! 1280 for IPv6 as RFC 4443 says) and as far as the buffer allows.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::meta::PacketMeta;
use super::rewrite::Side;
use crate::flow::{FlowKey, Proto};
use crate::wire::{checksum, icmpv4, icmpv6, ipv4, ipv6};
use crate::Reason;

/// An error the gateway originates about a packet it will not forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TTL / hop limit exceeded in transit.
    TimeExceeded,
    /// IPv4 "fragmentation needed and DF set" / ICMPv6 "packet too big", with the next link's MTU.
    TooBig {
        /// The MTU the sender must fit.
        mtu: u16,
    },
    /// IPv4 "communication administratively prohibited" (3/13) / ICMPv6 "administratively prohibited" (1/1):
    /// the flow was refused (port pool exhausted, quota, draining).
    AdminProhibited,
}

/// Whether RFC 1812 §4.3.2.7 / RFC 4443 §2.4(e) allow an error about this packet: never about an ICMP
/// error, a later fragment, or a packet whose source is not a unicast host or whose destination is
/// multicast or broadcast.
pub fn may_originate(meta: &PacketMeta, is_icmp_error: bool) -> bool {
    if is_icmp_error || meta.is_later_fragment() {
        return false;
    }
    match (meta.src, meta.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            !(s.is_unspecified()
                || s.is_multicast()
                || s.is_broadcast()
                || s.is_loopback()
                || d.is_multicast()
                || d.is_broadcast())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            !(s.is_unspecified() || s.is_multicast() || s.is_loopback() || d.is_multicast())
        }
        _ => false,
    }
}

const V4_HEADERS: usize = ipv4::MIN_HEADER_LEN + icmpv4::HEADER_LEN;
const V6_HEADERS: usize = ipv6::HEADER_LEN + icmpv6::HEADER_LEN;

/// Turns the packet described by `meta` into an ICMP error from `src` to the packet's source, in place.
/// Returns the new end of the IP packet in `buf`, or `None` when the families disagree or the buffer
/// cannot hold the error.
pub fn originate(buf: &mut [u8], meta: &PacketMeta, src: IpAddr, kind: ErrorKind) -> Option<usize> {
    let room = buf.len().checked_sub(meta.l3)?;
    match (src, meta.src) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let quote = meta
                .ip_len()
                .min(576 - V4_HEADERS)
                .min(room.checked_sub(V4_HEADERS)?);
            if quote < ipv4::MIN_HEADER_LEN + 8 {
                return None;
            }
            buf.copy_within(meta.l3..meta.l3 + quote, meta.l3 + V4_HEADERS);
            let total = V4_HEADERS + quote;
            let (t, code, rest) = match kind {
                ErrorKind::TimeExceeded => (icmpv4::msg_type::TIME_EXCEEDED, 0, [0; 4]),
                ErrorKind::TooBig { mtu } => {
                    let m = mtu.to_be_bytes();
                    (
                        icmpv4::msg_type::DEST_UNREACHABLE,
                        icmpv4::code::FRAG_NEEDED,
                        [0, 0, m[0], m[1]],
                    )
                }
                ErrorKind::AdminProhibited => (
                    icmpv4::msg_type::DEST_UNREACHABLE,
                    icmpv4::code::ADMIN_PROHIBITED,
                    [0; 4],
                ),
            };
            write_ipv4_header(&mut buf[meta.l3..meta.l3 + total], src, dst, 1, total);
            let mut icmp = icmpv4::Packet::new_unchecked(&mut buf[meta.l3 + 20..meta.l3 + total]);
            icmp.set_msg_type(t);
            icmp.set_msg_code(code);
            icmp.set_rest_of_header(rest);
            icmp.fill_checksum();
            Some(meta.l3 + total)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let quote = meta
                .ip_len()
                .min(1280 - V6_HEADERS)
                .min(room.checked_sub(V6_HEADERS)?);
            if quote < ipv6::HEADER_LEN + 8 {
                return None;
            }
            buf.copy_within(meta.l3..meta.l3 + quote, meta.l3 + V6_HEADERS);
            let total = V6_HEADERS + quote;
            let (t, code, rest) = match kind {
                ErrorKind::TimeExceeded => (icmpv6::msg_type::TIME_EXCEEDED, 0, [0; 4]),
                ErrorKind::TooBig { mtu } => (
                    icmpv6::msg_type::PACKET_TOO_BIG,
                    0,
                    u32::from(mtu).to_be_bytes(),
                ),
                ErrorKind::AdminProhibited => (icmpv6::msg_type::DEST_UNREACHABLE, 1, [0; 4]),
            };
            write_ipv6_header(&mut buf[meta.l3..meta.l3 + total], &src, &dst, 58, total);
            let mut icmp = icmpv6::Packet::new_unchecked(&mut buf[meta.l3 + 40..meta.l3 + total]);
            icmp.set_msg_type(t);
            icmp.set_msg_code(code);
            icmp.set_rest_of_header(rest);
            icmp.fill_checksum(&src, &dst);
            Some(meta.l3 + total)
        }
        _ => None,
    }
}

/// Writes a 20-byte IPv4 header (TTL 64, no DF) with its checksum at the start of `buf`.
pub fn write_ipv4_header(buf: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, proto: u8, total: usize) {
    let mut ip = ipv4::Packet::new_unchecked(buf);
    ip.set_version_and_header_len(ipv4::MIN_HEADER_LEN);
    ip.set_dscp_ecn(0xc0);
    ip.set_total_len(u16::try_from(total).unwrap_or(u16::MAX));
    ip.set_ident(0);
    ip.set_flags_and_frag_offset(false, false, 0);
    ip.set_ttl(64);
    ip.set_protocol(proto);
    ip.set_src(src);
    ip.set_dst(dst);
    ip.fill_checksum();
}

/// Writes a 40-byte IPv6 header (hop limit 64) at the start of `buf`.
pub fn write_ipv6_header(buf: &mut [u8], src: &Ipv6Addr, dst: &Ipv6Addr, next: u8, total: usize) {
    let mut ip = ipv6::Packet::new_unchecked(buf);
    ip.set_version(6);
    ip.set_traffic_class(0);
    ip.set_flow_label(0);
    ip.set_payload_len(u16::try_from(total - ipv6::HEADER_LEN).unwrap_or(u16::MAX));
    ip.set_next_header(next);
    ip.set_hop_limit(64);
    ip.set_src(src);
    ip.set_dst(dst);
}

/// The packet quoted inside an ICMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Embedded {
    /// Offset of the quoted IP header in the buffer.
    pub l3: usize,
    /// Offset of the quoted upper-layer header.
    pub l4: usize,
    /// End of the quote (the end of the ICMP message).
    pub end: usize,
    /// The quoted tuple as it was sent (for ICMP queries both ports are the echo identifier).
    pub key: FlowKey,
    /// The quoted packet was an ICMP echo (request or reply).
    pub icmp_query: bool,
}

/// Finds the packet quoted in the ICMP error at `meta.l4`. It must be of the same family, carry a full IP
/// header and at least the first 8 bytes of a TCP, UDP or ICMP echo header.
pub fn parse_embedded(buf: &[u8], meta: &PacketMeta) -> Result<Embedded, Reason> {
    let l3 = meta.l4 + 8;
    let quoted = buf.get(l3..meta.end).ok_or(Reason::IcmpErrorMalformed)?;
    let (l4_rel, proto, src, dst) = if meta.v6 {
        if quoted.len() < ipv6::HEADER_LEN || quoted[0] >> 4 != 6 {
            return Err(Reason::IcmpErrorMalformed);
        }
        let p = ipv6::Packet::new_unchecked(quoted);
        let (off, next) = quoted_upper_layer_v6(quoted, p.next_header())?;
        (off, next, IpAddr::V6(p.src()), IpAddr::V6(p.dst()))
    } else {
        if quoted.len() < ipv4::MIN_HEADER_LEN || quoted[0] >> 4 != 4 {
            return Err(Reason::IcmpErrorMalformed);
        }
        let p = ipv4::Packet::new_unchecked(quoted);
        let hl = usize::from(quoted[0] & 0x0f) * 4;
        // Only a first (or unfragmented) packet quotes an upper-layer header.
        if hl < ipv4::MIN_HEADER_LEN || hl > quoted.len() || p.frag_offset() != 0 {
            return Err(Reason::IcmpErrorMalformed);
        }
        (hl, p.protocol(), IpAddr::V4(p.src()), IpAddr::V4(p.dst()))
    };
    let l4 = quoted
        .get(l4_rel..l4_rel + 8)
        .ok_or(Reason::IcmpErrorMalformed)?;
    let word = |i: usize| u16::from_be_bytes([l4[i], l4[i + 1]]);
    let (proto, src_port, dst_port, icmp_query) = match (proto, meta.v6) {
        (6, _) => (Proto::Tcp, word(0), word(2), false),
        (17, _) => (Proto::Udp, word(0), word(2), false),
        (1, false) if matches!(l4[0], 0 | 8) => (Proto::Icmp, word(4), word(4), true),
        (58, true) if matches!(l4[0], 128 | 129) => (Proto::Icmpv6, word(4), word(4), true),
        _ => return Err(Reason::IcmpErrorMalformed),
    };
    Ok(Embedded {
        l3,
        l4: l3 + l4_rel,
        end: meta.end,
        key: FlowKey {
            src,
            dst,
            src_port,
            dst_port,
            proto,
        },
        icmp_query,
    })
}

/// Walks the extension headers of a quoted IPv6 packet (hop-by-hop, routing, destination options, AH, and a
/// fragment header of a *first* fragment) within the quote itself — the quoted payload length describes the
/// original packet, not the quote. Returns the upper layer's offset and protocol.
fn quoted_upper_layer_v6(quoted: &[u8], first: u8) -> Result<(usize, u8), Reason> {
    let mut off = ipv6::HEADER_LEN;
    let mut next = first;
    for _ in 0..8 {
        let len = match next {
            0 | 43 | 60 | 51 | 44 => {
                let hdr = quoted.get(off..off + 8).ok_or(Reason::IcmpErrorMalformed)?;
                let len = match next {
                    51 => (usize::from(hdr[1]) + 2) * 4,
                    // Only a first fragment quotes an upper-layer header.
                    44 if u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 != 0 => {
                        return Err(Reason::IcmpErrorMalformed)
                    }
                    44 => 8,
                    _ => (usize::from(hdr[1]) + 1) * 8,
                };
                next = hdr[0];
                len
            }
            _ => return Ok((off, next)),
        };
        off += len;
    }
    Err(Reason::IcmpErrorMalformed)
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn write_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Translates an ICMP error that refers to a translated flow (RFC 5508 §4.2): the quoted packet's `side`
/// address and port become `addr` / `port` (its IPv4 header checksum and, where quoted, its L4 checksum are
/// updated); the outer packet's address on the *other* side becomes `addr` too (the error travels the
/// opposite way to the packet it quotes); the ICMP checksum is recomputed over the whole message.
pub fn translate_error(
    buf: &mut [u8],
    meta: &PacketMeta,
    emb: &Embedded,
    side: Side,
    addr: IpAddr,
    port: u16,
) {
    let outer_side = match side {
        Side::Src => Side::Dst,
        Side::Dst => Side::Src,
    };
    let outer_addr = addr;
    // Quoted packet: address, then port / identifier, with the checksums that cover them.
    let (old_addr, new_addr, addr_len) = match (addr, emb.key.src) {
        (IpAddr::V4(a), IpAddr::V4(_)) => {
            let mut o = [0u8; 16];
            let at = emb.l3 + if side == Side::Src { 12 } else { 16 };
            o[..4].copy_from_slice(&buf[at..at + 4]);
            buf[at..at + 4].copy_from_slice(&a.octets());
            let hc = read_u16(buf, emb.l3 + 10);
            write_u16(
                buf,
                emb.l3 + 10,
                checksum::update_bytes(hc, &o[..4], &a.octets()),
            );
            let mut n = [0u8; 16];
            n[..4].copy_from_slice(&a.octets());
            (o, n, 4)
        }
        (IpAddr::V6(a), IpAddr::V6(_)) => {
            let mut o = [0u8; 16];
            let at = emb.l3 + if side == Side::Src { 8 } else { 24 };
            o.copy_from_slice(&buf[at..at + 16]);
            buf[at..at + 16].copy_from_slice(&a.octets());
            (o, a.octets(), 16)
        }
        _ => return,
    };
    let (port_at, check_at, pseudo, udp) = match emb.key.proto {
        Proto::Tcp => (
            emb.l4 + if side == Side::Src { 0 } else { 2 },
            emb.l4 + 16,
            true,
            false,
        ),
        Proto::Udp => (
            emb.l4 + if side == Side::Src { 0 } else { 2 },
            emb.l4 + 6,
            true,
            true,
        ),
        Proto::Icmp => (emb.l4 + 4, emb.l4 + 2, false, false),
        Proto::Icmpv6 => (emb.l4 + 4, emb.l4 + 2, true, false),
    };
    let old_port = read_u16(buf, port_at);
    write_u16(buf, port_at, port);
    // The quoted L4 checksum is updated when it is inside the quote (TCP's may be cut off).
    if check_at + 2 <= emb.end {
        let mut c = read_u16(buf, check_at);
        let upd = |c: u16, o: &[u8], n: &[u8]| {
            if udp {
                checksum::udp_update(c, o, n)
            } else {
                checksum::update_bytes(c, o, n)
            }
        };
        if pseudo {
            c = upd(c, &old_addr[..addr_len], &new_addr[..addr_len]);
        }
        c = upd(c, &old_port.to_be_bytes(), &port.to_be_bytes());
        write_u16(buf, check_at, c);
    }
    // Outer header.
    match outer_addr {
        IpAddr::V4(a) if !meta.v6 => {
            let at = meta.l3 + if outer_side == Side::Src { 12 } else { 16 };
            let mut o = [0u8; 4];
            o.copy_from_slice(&buf[at..at + 4]);
            buf[at..at + 4].copy_from_slice(&a.octets());
            let hc = read_u16(buf, meta.l3 + 10);
            write_u16(
                buf,
                meta.l3 + 10,
                checksum::update_bytes(hc, &o, &a.octets()),
            );
        }
        IpAddr::V6(a) if meta.v6 => {
            let at = meta.l3 + if outer_side == Side::Src { 8 } else { 24 };
            buf[at..at + 16].copy_from_slice(&a.octets());
        }
        _ => {}
    }
    fill_icmp_checksum(buf, meta);
}

/// Verifies the ICMP / ICMPv6 checksum of the message at `meta.l4..meta.end` (a fragmented message cannot
/// be verified and fails). Errors are verified before they are translated (RFC 5508 REQ-3), since the
/// translation recomputes the checksum and would otherwise launder a corrupted message.
pub fn verify_checksum(buf: &[u8], meta: &PacketMeta) -> bool {
    if meta.frag.is_some() {
        return false;
    }
    let msg = &buf[meta.l4..meta.end];
    if meta.v6 {
        let ip = ipv6::Packet::new_unchecked(&buf[meta.l3..meta.end]);
        icmpv6::Packet::new_unchecked(msg).verify_checksum(&ip.src(), &ip.dst())
    } else {
        icmpv4::Packet::new_unchecked(msg).verify_checksum()
    }
}

/// Recomputes the ICMP / ICMPv6 checksum of the message at `meta.l4..meta.end` from scratch.
pub fn fill_icmp_checksum(buf: &mut [u8], meta: &PacketMeta) {
    if meta.v6 {
        let ip = ipv6::Packet::new_unchecked(&buf[meta.l3..meta.end]);
        let (src, dst) = (ip.src(), ip.dst());
        icmpv6::Packet::new_unchecked(&mut buf[meta.l4..meta.end]).fill_checksum(&src, &dst);
    } else {
        icmpv4::Packet::new_unchecked(&mut buf[meta.l4..meta.end]).fill_checksum();
    }
}
