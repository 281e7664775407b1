//! The L3/L4 summary of a packet sitting in a buffer: offsets, addresses, ports and fragment information.
//!
//! Parsing validates every length it relies on, so the offsets in a [`PacketMeta`] are always inside the
//! buffer it was parsed from: the rewrite and ICMP code may index with them without further checks.

use core::net::IpAddr;

use crate::conntrack::TcpSegment;
use crate::wire::{icmpv4, icmpv6, ipv4, ipv6, tcp, udp};
use crate::Reason;

/// Fragment information of an IPv4 or IPv6 datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Identification (IPv4: 16 bits, IPv6: 32 bits).
    pub ident: u32,
    /// Offset of this fragment's data in the datagram, in bytes.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
}

/// Where the IP packet and its upper-layer header are in the buffer, and what they say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// Offset of the IP header in the buffer.
    pub l3: usize,
    /// Offset of the upper-layer (TCP, UDP, ICMP) header in the buffer.
    pub l4: usize,
    /// End of the IP packet in the buffer (`l3` + total length); trailing padding is beyond it.
    pub end: usize,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Upper-layer protocol number.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv4 DF flag; always true for IPv6 (routers never fragment it).
    pub dont_frag: bool,
    /// Present when the packet is a fragment (IPv4 MF or offset, IPv6 fragment header).
    pub frag: Option<Fragment>,
}

impl PacketMeta {
    /// Parses the IPv4 or IPv6 packet that starts at `buf[l3]` and may be followed by padding. The IPv4
    /// header checksum is verified.
    #[inline(always)]
    pub fn parse(buf: &[u8], l3: usize, v6: bool) -> Result<PacketMeta, Reason> {
        let bytes = buf.get(l3..).ok_or(Reason::NoBufferRoom)?;
        if v6 {
            let p = ipv6::Packet::new_checked(bytes)?;
            let upper = p.upper_layer()?;
            let end = l3 + ipv6::HEADER_LEN + usize::from(p.payload_len());
            let frag = upper.fragment.map(|f| Fragment {
                ident: f.ident,
                offset: f.offset,
                more: f.more,
            });
            Ok(PacketMeta {
                l3,
                l4: l3 + upper.offset,
                end,
                v6: true,
                proto: upper.protocol,
                src: IpAddr::V6(p.src()),
                dst: IpAddr::V6(p.dst()),
                ttl: p.hop_limit(),
                dont_frag: true,
                frag,
            })
        } else {
            let p = ipv4::Packet::new_checked(bytes)?;
            if !p.verify_checksum() {
                return Err(Reason::Ipv4BadChecksum);
            }
            let frag = (p.more_frags() || p.frag_offset() != 0).then(|| Fragment {
                ident: u32::from(p.ident()),
                offset: p.frag_offset(),
                more: p.more_frags(),
            });
            Ok(PacketMeta {
                l3,
                l4: l3 + p.header_len(),
                end: l3 + usize::from(p.total_len()),
                v6: false,
                proto: p.protocol(),
                src: IpAddr::V4(p.src()),
                dst: IpAddr::V4(p.dst()),
                ttl: p.ttl(),
                dont_frag: p.dont_frag(),
                frag,
            })
        }
    }

    /// Length of the whole IP packet.
    pub fn ip_len(&self) -> usize {
        self.end - self.l3
    }

    /// True for the second and later fragments, which carry no upper-layer header.
    pub fn is_later_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.offset != 0)
    }

    /// True for the first fragment of a fragmented datagram.
    pub fn is_first_fragment(&self) -> bool {
        self.frag.is_some_and(|f| f.offset == 0)
    }

    /// The ICMP protocol number of this family (1 or 58).
    pub fn icmp_proto(&self) -> u8 {
        if self.v6 {
            58
        } else {
            1
        }
    }
}

/// What the upper-layer header says, as far as translation cares.
#[derive(Debug, Clone, Copy)]
pub enum L4 {
    /// TCP segment.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Flags, sequence numbers and window for the flow's TCP state.
        seg: TcpSegment,
    },
    /// UDP datagram.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP / ICMPv6 echo request or reply.
    IcmpQuery {
        /// Echo identifier.
        ident: u16,
        /// Echo request (else reply).
        request: bool,
    },
    /// ICMP / ICMPv6 error (destination unreachable, packet too big, time exceeded, parameter problem).
    IcmpError {
        /// ICMP type.
        msg_type: u8,
        /// ICMP code.
        code: u8,
    },
    /// Any other ICMP message (router advertisement, neighbour discovery, timestamp, ...).
    IcmpOther {
        /// ICMP type.
        msg_type: u8,
    },
    /// A later fragment: no upper-layer header.
    Fragment,
}

impl L4 {
    /// True for every ICMP error message, including those the gateway does not translate (IPv4 source
    /// quench and redirect, ICMPv6 types below 128): never answer an error with an error (RFC 1812
    /// §4.3.2.7, RFC 4443 §2.4(e)).
    pub fn is_icmp_error(&self, v6: bool) -> bool {
        match *self {
            L4::IcmpError { .. } => true,
            L4::IcmpOther { msg_type } => {
                if v6 {
                    msg_type < 128
                } else {
                    matches!(msg_type, 4 | 5)
                }
            }
            _ => false,
        }
    }
}

/// Parses the upper-layer header at `meta.l4`. Checksums are not verified: a translated packet keeps a wrong
/// checksum wrong (incremental update), and the end host rejects it.
#[inline(always)]
pub fn parse_l4(buf: &[u8], meta: &PacketMeta) -> Result<L4, Reason> {
    if meta.is_later_fragment() {
        return Ok(L4::Fragment);
    }
    let bytes = buf.get(meta.l4..meta.end).ok_or(Reason::Ipv4BadTotalLen)?;
    match meta.proto {
        6 => {
            let t = tcp::Packet::new_checked(bytes)?;
            let payload_len = u32::try_from(bytes.len() - t.header_len()).unwrap_or(u32::MAX);
            Ok(L4::Tcp {
                src_port: t.src_port(),
                dst_port: t.dst_port(),
                seg: TcpSegment {
                    flags: t.flags(),
                    seq: t.seq_number(),
                    ack: t.ack_number(),
                    window: t.window_len(),
                    payload_len,
                },
            })
        }
        17 => {
            // A first fragment holds only part of the datagram its UDP length describes.
            if meta.frag.is_some() {
                if bytes.len() < udp::HEADER_LEN {
                    return Err(Reason::UdpTruncated);
                }
                let u = udp::Packet::new_unchecked(bytes);
                return Ok(L4::Udp {
                    src_port: u.src_port(),
                    dst_port: u.dst_port(),
                });
            }
            let u = udp::Packet::new_checked(bytes)?;
            Ok(L4::Udp {
                src_port: u.src_port(),
                dst_port: u.dst_port(),
            })
        }
        1 if !meta.v6 => {
            let i = icmpv4::Packet::new_checked(bytes)?;
            let t = i.msg_type();
            Ok(match t {
                icmpv4::msg_type::ECHO_REQUEST | icmpv4::msg_type::ECHO_REPLY => L4::IcmpQuery {
                    ident: i.echo_ident(),
                    request: t == icmpv4::msg_type::ECHO_REQUEST,
                },
                icmpv4::msg_type::DEST_UNREACHABLE
                | icmpv4::msg_type::TIME_EXCEEDED
                | icmpv4::msg_type::PARAM_PROBLEM => L4::IcmpError {
                    msg_type: t,
                    code: i.msg_code(),
                },
                _ => L4::IcmpOther { msg_type: t },
            })
        }
        58 if meta.v6 => {
            let i = icmpv6::Packet::new_checked(bytes)?;
            let t = i.msg_type();
            Ok(match t {
                icmpv6::msg_type::ECHO_REQUEST | icmpv6::msg_type::ECHO_REPLY => L4::IcmpQuery {
                    ident: i.echo_ident(),
                    request: t == icmpv6::msg_type::ECHO_REQUEST,
                },
                icmpv6::msg_type::DEST_UNREACHABLE
                | icmpv6::msg_type::PACKET_TOO_BIG
                | icmpv6::msg_type::TIME_EXCEEDED
                | icmpv6::msg_type::PARAM_PROBLEM => L4::IcmpError {
                    msg_type: t,
                    code: i.msg_code(),
                },
                _ => L4::IcmpOther { msg_type: t },
            })
        }
        _ => Err(Reason::UnsupportedProtocol),
    }
}
