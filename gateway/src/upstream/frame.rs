//! The probes on the wire: building an ICMP echo request or a TCP segment (SYN, RST) as a whole Ethernet
//! frame from an egress IP, and reading a received frame into the answer it may be. Pure functions over
//! caller-owned buffers, built on `forwarder_core::wire`.
//!
//! * Echo (RFC 792 for IPv4, RFC 4443 §4.1 for IPv6): identifier fixed per gateway (a port outside the NAT
//!   range, see `config::probe_ports`), sequence number per probe, and data of an 8-byte random nonce and a
//!   tag, which the target returns unchanged: an answer must carry the nonce of a probe in flight, so that
//!   a forged or late reply cannot count.
//! * TCP (RFC 9293): a SYN with a random initial sequence number and an MSS option; the answer is a SYN-ACK
//!   or a RST whose acknowledgment number is that ISN + 1 (§3.5, §3.10.7.3); the prober closes with a RST
//!   whose sequence number is that acknowledgment number (§3.10.7.4), so the target keeps no state.
//!
//! Received checksums are not verified: on veth, and with checksum offload on a NIC's receive side, frames
//! may still carry a partial checksum, and the match on addresses, ports and a 32- or 64-bit random value is
//! what tells an answer from anything else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use forwarder_core::wire::ethernet::{self, MacAddr};
use forwarder_core::wire::{icmpv4, icmpv6, ipv4, ipv6, tcp};

/// What the echo data carries after the nonce, so that a capture shows what the packets are.
pub(crate) const ECHO_TAG: &[u8; 20] = b"egress-gateway probe";
/// Echo data: the nonce, then [`ECHO_TAG`].
const ECHO_DATA_LEN: usize = 8 + ECHO_TAG.len();
/// TCP header of our segments: 20 bytes and, on a SYN, the 4-byte MSS option.
const TCP_SYN_HEADER_LEN: usize = 24;
/// Largest frame built here (Ethernet, IPv6, the larger of ICMP echo and TCP SYN).
pub(crate) const MAX_FRAME: usize = ethernet::HEADER_LEN + ipv6::HEADER_LEN + 8 + ECHO_DATA_LEN;
const TTL: u8 = 64;
/// The TCP window we announce (nothing is ever received into it).
const WINDOW: u16 = 64240;

/// The Ethernet addresses of a probe: the uplink's MAC and the next hop's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hop {
    pub(crate) src_mac: MacAddr,
    pub(crate) dst_mac: MacAddr,
}

/// A TCP segment to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    /// `tcp::flags` bits.
    pub(crate) flags: u8,
    /// The MSS option, on a SYN.
    pub(crate) mss: Option<u16>,
}

/// What a received frame is to the prober.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// An ICMP or ICMPv6 echo reply.
    Echo {
        from: IpAddr,
        to: IpAddr,
        ident: u16,
        seq: u16,
        /// The nonce in its data, when the data is ours.
        nonce: Option<u64>,
    },
    /// A TCP segment.
    Tcp {
        from: SocketAddr,
        to: SocketAddr,
        flags: u8,
        seq: u32,
        ack: u32,
    },
}

/// Writes an echo request from `src` to `dst` into `out` (at least [`MAX_FRAME`] bytes); its length, or
/// `None` when the two addresses are of different families.
pub(crate) fn echo_request(
    hop: &Hop,
    src: IpAddr,
    dst: IpAddr,
    ident: u16,
    seq: u16,
    nonce: u64,
    out: &mut [u8],
) -> Option<usize> {
    let icmp_len = icmpv4::HEADER_LEN + ECHO_DATA_LEN;
    let write_echo = |b: &mut [u8], request: u8| {
        b[0] = request;
        b[1] = 0;
        b[4..6].copy_from_slice(&ident.to_be_bytes());
        b[6..8].copy_from_slice(&seq.to_be_bytes());
        b[8..16].copy_from_slice(&nonce.to_be_bytes());
        b[16..icmp_len].copy_from_slice(ECHO_TAG);
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let l4 = ip4_header(hop, s, d, ipv4::protocol::ICMP, icmp_len, seq, out);
            let b = &mut out[l4..l4 + icmp_len];
            write_echo(b, icmpv4::msg_type::ECHO_REQUEST);
            icmpv4::Packet::new_unchecked(b).fill_checksum();
            Some(l4 + icmp_len)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let l4 = ip6_header(hop, &s, &d, ipv6::next_header::ICMPV6, icmp_len, out);
            let b = &mut out[l4..l4 + icmp_len];
            write_echo(b, icmpv6::msg_type::ECHO_REQUEST);
            icmpv6::Packet::new_unchecked(b).fill_checksum(&s, &d);
            Some(l4 + icmp_len)
        }
        _ => None,
    }
}

/// Writes TCP segment `seg` into `out` (at least [`MAX_FRAME`] bytes); its length, or `None` when the two
/// addresses are of different families.
pub(crate) fn tcp_segment(hop: &Hop, seg: &Segment, out: &mut [u8]) -> Option<usize> {
    let tcp_len = if seg.mss.is_some() {
        TCP_SYN_HEADER_LEN
    } else {
        tcp::MIN_HEADER_LEN
    };
    let l4 = match (seg.src.ip(), seg.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            // The IPv4 identification only has to differ between datagrams in flight (RFC 6864).
            #[allow(clippy::cast_possible_truncation)] // any 16 bits of the ISN do
            let id = seg.seq as u16;
            ip4_header(hop, s, d, ipv4::protocol::TCP, tcp_len, id, out)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ip6_header(hop, &s, &d, ipv6::next_header::TCP, tcp_len, out)
        }
        _ => return None,
    };
    let b = &mut out[l4..l4 + tcp_len];
    b.fill(0);
    let mut t = tcp::Packet::new_unchecked(b);
    t.set_src_port(seg.src.port());
    t.set_dst_port(seg.dst.port());
    t.set_seq_number(seg.seq);
    t.set_ack_number(seg.ack);
    t.set_header_len(tcp_len);
    t.set_flags(seg.flags);
    t.set_window_len(if seg.flags & tcp::flags::RST != 0 {
        0
    } else {
        WINDOW
    });
    if let Some(mss) = seg.mss {
        let o = t.options_mut();
        o[0] = tcp::option::MSS;
        o[1] = 4;
        o[2..4].copy_from_slice(&mss.to_be_bytes());
    }
    match (seg.src.ip(), seg.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => t.fill_checksum_v4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => t.fill_checksum_v6(&s, &d),
        _ => {}
    }
    Some(l4 + tcp_len)
}

/// Ethernet and IPv4 headers for `payload_len` bytes of `protocol`; returns where the payload starts.
fn ip4_header(
    hop: &Hop,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    ident: u16,
    out: &mut [u8],
) -> usize {
    let n = ethernet::emit(&hop.dst_mac, &hop.src_mac, ethernet::ethertype::IPV4, out);
    let total = ipv4::MIN_HEADER_LEN + payload_len;
    let mut ip = ipv4::Packet::new_unchecked(&mut out[n..n + ipv4::MIN_HEADER_LEN]);
    ip.set_version_and_header_len(ipv4::MIN_HEADER_LEN);
    ip.set_dscp_ecn(0);
    // `total` is at most a few dozen bytes.
    ip.set_total_len(u16::try_from(total).unwrap_or(u16::MAX));
    ip.set_ident(ident);
    ip.set_flags_and_frag_offset(true, false, 0);
    ip.set_ttl(TTL);
    ip.set_protocol(protocol);
    ip.set_src(src);
    ip.set_dst(dst);
    ip.fill_checksum();
    n + ipv4::MIN_HEADER_LEN
}

/// Ethernet and IPv6 headers for `payload_len` bytes of `next_header`; returns where the payload starts.
fn ip6_header(
    hop: &Hop,
    src: &Ipv6Addr,
    dst: &Ipv6Addr,
    next_header: u8,
    payload_len: usize,
    out: &mut [u8],
) -> usize {
    let n = ethernet::emit(&hop.dst_mac, &hop.src_mac, ethernet::ethertype::IPV6, out);
    let mut ip = ipv6::Packet::new_unchecked(&mut out[n..n + ipv6::HEADER_LEN]);
    ip.set_version(6);
    ip.set_traffic_class(0);
    ip.set_flow_label(0);
    ip.set_payload_len(u16::try_from(payload_len).unwrap_or(u16::MAX));
    ip.set_next_header(next_header);
    ip.set_hop_limit(TTL);
    ip.set_src(src);
    ip.set_dst(dst);
    n + ipv6::HEADER_LEN
}

/// Reads a frame received on an uplink whose MAC is `our_mac`: an echo reply or a TCP segment addressed to
/// that MAC, or `None` for anything else (other hosts' frames, fragments, IPv6 extension headers).
pub(crate) fn parse(frame: &[u8], our_mac: MacAddr) -> Option<Reply> {
    let eth = ethernet::Frame::new_checked(frame).ok()?;
    if eth.dst() != our_mac {
        return None;
    }
    match eth.ethertype() {
        ethernet::ethertype::IPV4 => {
            let ip = ipv4::Packet::new_checked(eth.payload()).ok()?;
            if ip.is_fragment() {
                return None;
            }
            let (from, to) = (IpAddr::V4(ip.src()), IpAddr::V4(ip.dst()));
            match ip.protocol() {
                ipv4::protocol::ICMP => {
                    let p = icmpv4::Packet::new_checked(ip.payload()).ok()?;
                    (p.msg_type() == icmpv4::msg_type::ECHO_REPLY && p.msg_code() == 0).then(|| {
                        Reply::Echo {
                            from,
                            to,
                            ident: p.echo_ident(),
                            seq: p.echo_seq_no(),
                            nonce: nonce_of(p.data()),
                        }
                    })
                }
                ipv4::protocol::TCP => tcp_reply(from, to, ip.payload()),
                _ => None,
            }
        }
        ethernet::ethertype::IPV6 => {
            let ip = ipv6::Packet::new_checked(eth.payload()).ok()?;
            let (from, to) = (IpAddr::V6(ip.src()), IpAddr::V6(ip.dst()));
            match ip.next_header() {
                ipv6::next_header::ICMPV6 => {
                    let p = icmpv6::Packet::new_checked(ip.payload()).ok()?;
                    (p.msg_type() == icmpv6::msg_type::ECHO_REPLY && p.msg_code() == 0).then(|| {
                        Reply::Echo {
                            from,
                            to,
                            ident: p.echo_ident(),
                            seq: p.echo_seq_no(),
                            nonce: nonce_of(p.data()),
                        }
                    })
                }
                ipv6::next_header::TCP => tcp_reply(from, to, ip.payload()),
                _ => None,
            }
        }
        _ => None,
    }
}

fn tcp_reply(from: IpAddr, to: IpAddr, segment: &[u8]) -> Option<Reply> {
    let t = tcp::Packet::new_checked(segment).ok()?;
    Some(Reply::Tcp {
        from: SocketAddr::new(from, t.src_port()),
        to: SocketAddr::new(to, t.dst_port()),
        flags: t.flags(),
        seq: t.seq_number(),
        ack: t.ack_number(),
    })
}

/// The nonce of echo data that is ours (nonce, then the tag).
fn nonce_of(data: &[u8]) -> Option<u64> {
    if data.len() < ECHO_DATA_LEN || &data[8..ECHO_DATA_LEN] != ECHO_TAG {
        return None;
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&data[..8]);
    Some(u64::from_be_bytes(n))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};

    const OURS: MacAddr = [2, 0, 0, 0, 0, 0x10];
    const ROUTER: MacAddr = [2, 0, 0, 0, 0, 1];
    const HOP: Hop = Hop {
        src_mac: OURS,
        dst_mac: ROUTER,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Swaps the Ethernet addresses: the frame as the router would send it back to us.
    fn returned(frame: &mut [u8]) {
        let (a, b) = frame.split_at_mut(6);
        a.swap_with_slice(&mut b[..6]);
    }

    #[test]
    fn echo_request_v4_is_what_etherparse_reads_with_valid_checksums() {
        let mut out = [0u8; MAX_FRAME];
        let n = echo_request(
            &HOP,
            ip("203.0.113.10"),
            ip("198.51.100.1"),
            1023,
            7,
            0x0102_0304_0506_0708,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 14 + 20 + 8 + 28);
        let p = SlicedPacket::from_ethernet(&out[..n]).unwrap();
        let Some(NetSlice::Ipv4(v4)) = &p.net else {
            panic!("not ipv4")
        };
        let h = v4.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(h.source, [203, 0, 113, 10]);
        assert_eq!(h.destination, [198, 51, 100, 1]);
        assert!(h.dont_fragment);
        assert_eq!(h.time_to_live, 64);
        let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
            panic!("not icmp")
        };
        let Icmpv4Type::EchoRequest(e) = icmp.icmp_type() else {
            panic!("not an echo request")
        };
        assert_eq!((e.id, e.seq), (1023, 7));
        assert_eq!(
            icmp.checksum(),
            icmp.icmp_type().calc_checksum(icmp.payload())
        );
        assert_eq!(&icmp.payload()[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&icmp.payload()[8..], ECHO_TAG);
    }

    #[test]
    fn echo_request_v6_has_a_valid_checksum() {
        let (src, dst) = (ip("2001:db8:113::10"), ip("2001:db8:100::1"));
        let mut out = [0u8; MAX_FRAME];
        let n = echo_request(&HOP, src, dst, 1023, 9, 42, &mut out).unwrap();
        let p = SlicedPacket::from_ethernet(&out[..n]).unwrap();
        let Some(NetSlice::Ipv6(v6)) = &p.net else {
            panic!("not ipv6")
        };
        let h = v6.header().to_header();
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not icmpv6")
        };
        let Icmpv6Type::EchoRequest(e) = icmp.icmp_type() else {
            panic!("not an echo request")
        };
        assert_eq!((e.id, e.seq), (1023, 9));
        let want = icmp
            .icmp_type()
            .calc_checksum(h.source, h.destination, icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), want);
        assert_eq!(h.hop_limit, 64);
    }

    #[test]
    fn syn_and_rst_are_what_etherparse_reads_with_valid_checksums() {
        for (src, dst) in [
            (sa("203.0.113.10:1010"), sa("198.51.100.1:443")),
            (sa("[2001:db8:113::10]:1010"), sa("[2001:db8:100::1]:443")),
        ] {
            let syn = Segment {
                src,
                dst,
                seq: 0xdead_beef,
                ack: 0,
                flags: tcp::flags::SYN,
                mss: Some(1460),
            };
            let rst = Segment {
                seq: 0xdead_bef0,
                flags: tcp::flags::RST,
                mss: None,
                ..syn
            };
            for seg in [syn, rst] {
                let mut out = [0u8; MAX_FRAME];
                let n = tcp_segment(&HOP, &seg, &mut out).unwrap();
                let p = SlicedPacket::from_ethernet(&out[..n]).unwrap();
                let Some(TransportSlice::Tcp(t)) = &p.transport else {
                    panic!("not tcp")
                };
                let want = match &p.net {
                    Some(NetSlice::Ipv4(v4)) => {
                        let h = v4.header().to_header();
                        assert_eq!(h.header_checksum, h.calc_header_checksum());
                        t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap()
                    }
                    Some(NetSlice::Ipv6(v6)) => t
                        .to_header()
                        .calc_checksum_ipv6(&v6.header().to_header(), t.payload())
                        .unwrap(),
                    _ => panic!("no ip"),
                };
                assert_eq!(t.checksum(), want);
                assert_eq!((t.source_port(), t.destination_port()), (1010, 443));
                assert_eq!(t.sequence_number(), seg.seq);
                assert_eq!(t.syn(), seg.flags == tcp::flags::SYN);
                assert_eq!(t.rst(), seg.flags == tcp::flags::RST);
                assert!(!t.ack());
                if seg.mss.is_some() {
                    assert_eq!(
                        t.options_iterator().next().unwrap().unwrap(),
                        etherparse::TcpOptionElement::MaximumSegmentSize(1460)
                    );
                }
            }
        }
    }

    #[test]
    fn families_must_match() {
        let mut out = [0u8; MAX_FRAME];
        assert_eq!(
            echo_request(
                &HOP,
                ip("203.0.113.10"),
                ip("2001:db8::1"),
                1,
                1,
                1,
                &mut out
            ),
            None
        );
        let seg = Segment {
            src: sa("203.0.113.10:1"),
            dst: sa("[2001:db8::1]:2"),
            seq: 0,
            ack: 0,
            flags: tcp::flags::SYN,
            mss: None,
        };
        assert_eq!(tcp_segment(&HOP, &seg, &mut out), None);
    }

    #[test]
    fn an_echo_reply_parses_with_its_nonce() {
        for (src, dst) in [
            (ip("203.0.113.10"), ip("198.51.100.1")),
            (ip("2001:db8:113::10"), ip("2001:db8:100::1")),
        ] {
            let mut out = [0u8; MAX_FRAME];
            let n = echo_request(&HOP, dst, src, 1023, 5, 77, &mut out).unwrap();
            // Turn the request into the target's reply: type 0 (IPv4) or 129 (IPv6).
            let l4 = n - 8 - ECHO_DATA_LEN;
            out[l4] = if src.is_ipv4() { 0 } else { 129 };
            returned(&mut out[..n]);
            assert_eq!(
                parse(&out[..n], OURS),
                Some(Reply::Echo {
                    from: dst,
                    to: src,
                    ident: 1023,
                    seq: 5,
                    nonce: Some(77)
                })
            );
            // Someone else's frame, and our own request, are not answers.
            assert_eq!(parse(&out[..n], [2, 0, 0, 0, 0, 0x99]), None);
            out[l4] = if src.is_ipv4() { 8 } else { 128 };
            assert_eq!(parse(&out[..n], OURS), None);
            // Data that is not ours: no nonce.
            out[l4] = if src.is_ipv4() { 0 } else { 129 };
            out[n - 1] ^= 0xff;
            assert!(matches!(
                parse(&out[..n], OURS),
                Some(Reply::Echo { nonce: None, .. })
            ));
        }
    }

    #[test]
    fn a_syn_ack_parses() {
        let seg = Segment {
            src: sa("198.51.100.1:443"),
            dst: sa("203.0.113.10:1010"),
            seq: 5,
            ack: 0xdead_bef0,
            flags: tcp::flags::SYN | tcp::flags::ACK,
            mss: Some(1460),
        };
        let hop = Hop {
            src_mac: ROUTER,
            dst_mac: OURS,
        };
        let mut out = [0u8; MAX_FRAME];
        let n = tcp_segment(&hop, &seg, &mut out).unwrap();
        assert_eq!(
            parse(&out[..n], OURS),
            Some(Reply::Tcp {
                from: seg.src,
                to: seg.dst,
                flags: seg.flags,
                seq: 5,
                ack: 0xdead_bef0
            })
        );
        // A fragment is not read.
        out[14 + 6] = 0x20; // MF
        assert_eq!(parse(&out[..n], OURS), None);
        // Garbage does not panic.
        for len in 0..n {
            let _ = parse(&out[..len], OURS);
        }
    }
}
