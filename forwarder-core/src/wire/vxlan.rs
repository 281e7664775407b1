//! VXLAN (RFC 7348) headers, and the full IPv4 underlay encapsulation of the Linux `vxlan` device.
//!
//! [`Packet::check_len`] requires the 8-byte header with the I flag set; after it has succeeded no getter
//! panics, for any bytes. Reserved bits are ignored on receipt and written as zero (RFC 7348 §5).
//!
//! [`EncapV4::encapsulate_v4`] and [`decapsulate_v4`] handle the whole outer Ethernet/IPv4/UDP/VXLAN stack for
//! raw (AF_PACKET / XDP) backends. They are tested byte for byte against frames captured from the kernel's own
//! vxlan device (`forwarder-core/tests/fixtures/*.hex`, made by `capture.sh` there). What the kernel (6.18,
//! device created as Calico does, without `udpcsum`/`noudpcsum`) sends over IPv4: DF clear, TTL 64, DSCP 0
//! with the inner packet's ECN copied out (CE as ECT(0), RFC 6040 — reproduced here), IP ident from the kernel's
//! per-destination generator, UDP source port from the inner flow hash ([`source_port_for`]) and — unlike what
//! older documentation says — a **computed** outer UDP checksum. Receivers accept a zero checksum over IPv4, so
//! [`EncapV4::encapsulate_v4`] writes 0 (cheap); [`EncapV4::encapsulate_v4_with_udp_checksum`] reproduces the
//! kernel exactly.

use core::net::Ipv4Addr;
use core::ops::Range;

use super::ethernet::{self, MacAddr};
use super::{ipv4, udp};
use crate::reason::Reason;

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;
/// UDP port of the Calico egress-gateway tunnel (not IANA's 4789).
pub const DEFAULT_PORT: u16 = 4790;
/// VNI of the Calico egress-gateway tunnel.
pub const DEFAULT_VNI: u32 = 4097;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00FF_FFFF;
/// Bytes in front of the inner Ethernet frame: outer Ethernet, IPv4 (no options), UDP and VXLAN.
pub const OUTER_V4_OVERHEAD: usize =
    ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + udp::HEADER_LEN + HEADER_LEN;
/// Lowest source port the kernel picks (default `net.ipv4.ip_local_port_range`).
pub const SOURCE_PORT_MIN: u16 = 32768;
/// Upper bound of the default `net.ipv4.ip_local_port_range`; the kernel's formula never reaches it.
pub const SOURCE_PORT_MAX: u16 = 60999;

mod field {
    use core::ops::Range;
    pub(super) const FLAGS: usize = 0;
    pub(super) const RESERVED1: Range<usize> = 1..4;
    pub(super) const VNI: Range<usize> = 4..7;
    pub(super) const RESERVED2: usize = 7;
}

/// A view of a VXLAN header followed by the inner Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer and checks it with [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Reason> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// `VxlanTruncated` if shorter than 8 bytes; `VxlanBadFlags` if the I flag is clear (other flag and
    /// reserved bits are ignored, RFC 7348 §5).
    pub fn check_len(&self) -> Result<(), Reason> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            return Err(Reason::VxlanTruncated);
        }
        if self.flags() & FLAG_I == 0 {
            return Err(Reason::VxlanBadFlags);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The flags byte.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The VXLAN network identifier (24 bits).
    pub fn vni(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }

    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the flags byte.
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value;
    }

    /// Sets the VNI (low 24 bits of `vni`) and zeroes the reserved byte after it.
    pub fn set_vni(&mut self, vni: u32) {
        let b = (vni & MAX_VNI).to_be_bytes();
        let buf = self.buffer.as_mut();
        buf[field::VNI].copy_from_slice(&b[1..]);
        buf[field::RESERVED2] = 0;
    }

    /// The inner Ethernet frame, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

/// Writes a VXLAN header into the first 8 bytes of `buf`: flags `0x08` (I), VNI, reserved bits zero.
///
/// # Panics
/// If `buf` is shorter than [`HEADER_LEN`].
pub fn emit_header(buf: &mut [u8], vni: u32) {
    let mut p = Packet::new_unchecked(&mut buf[..HEADER_LEN]);
    p.set_flags(FLAG_I);
    p.buffer[field::RESERVED1].fill(0);
    p.set_vni(vni);
}

/// The outer UDP source port for an inner flow hash, as the kernel's `udp_flow_src_port()` computes it with
/// the default port range: `((hash ^ hash << 16) * (60999 - 32768)) >> 32) + 32768`, i.e. in 32768..=60998.
/// Equal hashes give equal ports, so one inner flow stays on one underlay path.
pub fn source_port_for(inner_hash: u32) -> u16 {
    let hash = inner_hash ^ (inner_hash << 16);
    let span = u64::from(SOURCE_PORT_MAX - SOURCE_PORT_MIN);
    let offset = (u64::from(hash) * span) >> 32; // < span, fits in u16
    SOURCE_PORT_MIN + u16::try_from(offset).unwrap_or(0)
}

/// A hash of the inner flow of `datagram` (a VXLAN header followed by the inner Ethernet frame), for the
/// outer UDP source port: RFC 7348 §5 recommends that the source port be "calculated using a hash of fields
/// from the inner packet", so that routers' ECMP and receivers' RSS spread the tunnel's flows while one
/// inner flow keeps one path (and one order). The fields are those the kernel's flow dissector takes for
/// `skb_get_hash()`: the inner addresses and protocol, and the ports of TCP, UDP, UDP-Lite and SCTP.
/// Fragments (IPv4 MF or offset, an IPv6 fragment header) hash without ports, so every fragment of a
/// datagram takes the same path as its first. Anything else (ARP, truncated or unknown headers) hashes
/// what it has; this never panics, whatever the bytes.
///
/// Unlike the kernel's, the hash is not keyed: it only chooses among the gateway's own source ports, and
/// an inner flow's port must not change when the gateway restarts (a stateful middlebox on the underlay
/// would see a new outer flow).
pub fn inner_flow_hash(datagram: &[u8]) -> u32 {
    const ETH: usize = HEADER_LEN;
    const IP: usize = ETH + ethernet::HEADER_LEN;
    let at = |r: Range<usize>| datagram.get(r).unwrap_or(&[]);
    let ethertype = at(ETH + 12..ETH + 14);
    let mut h = Fold::new();
    h.add(ethertype);
    match ethertype {
        [0x08, 0x00] => {
            let ihl = datagram.get(IP).map_or(0, |b| usize::from(b & 0x0f) * 4);
            let proto = datagram.get(IP + 9).copied().unwrap_or(0);
            h.add(at(IP + 12..IP + 20));
            h.add(&[proto]);
            let frag = at(IP + 6..IP + 8);
            let fragment = frag.len() == 2 && (frag[0] & 0x3f != 0 || frag[1] != 0);
            if !fragment && ihl >= 20 && has_ports(proto) {
                h.add(at(IP + ihl..IP + ihl + 4));
            }
        }
        [0x86, 0xdd] => {
            let next = datagram.get(IP + 6).copied().unwrap_or(0);
            h.add(at(IP + 8..IP + 40));
            h.add(&[next]);
            // Only a transport header right after the fixed header carries ports here; behind extension
            // headers (or a fragment header) the flow hashes on its addresses alone.
            if has_ports(next) {
                h.add(at(IP + 40..IP + 44));
            }
        }
        _ => {}
    }
    h.finish()
}

/// TCP, UDP, SCTP, UDP-Lite: a transport header that starts with the two ports.
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

/// A small multiply–xorshift fold over bytes (not cryptographic; see [`inner_flow_hash`]).
struct Fold(u64);

impl Fold {
    fn new() -> Fold {
        Fold(0x9E37_79B9_7F4A_7C15)
    }

    fn add(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            let x = (self.0 ^ u64::from_le_bytes(w)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            self.0 = x ^ (x >> 31);
        }
        // The length goes in too, so that a missing field differs from a zero one.
        self.0 = (self.0 ^ bytes.len() as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    }

    fn finish(&self) -> u32 {
        let x = self.0 ^ (self.0 >> 29);
        #[allow(clippy::cast_possible_truncation)] // the high half, on purpose
        let high = (x.wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 32) as u32;
        high
    }
}

/// Parameters of the outer headers written by [`EncapV4::encapsulate_v4`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncapV4 {
    /// Outer source MAC (our underlay interface).
    pub src_mac: MacAddr,
    /// Outer destination MAC (the underlay next hop).
    pub dst_mac: MacAddr,
    /// Outer source IPv4 address.
    pub src_ip: Ipv4Addr,
    /// Outer destination IPv4 address (the peer VTEP).
    pub dst_ip: Ipv4Addr,
    /// Outer UDP source port (see [`source_port_for`]).
    pub src_port: u16,
    /// Outer UDP destination port ([`DEFAULT_PORT`]).
    pub dst_port: u16,
    /// VNI ([`DEFAULT_VNI`]).
    pub vni: u32,
    /// Outer TTL (the kernel uses 64).
    pub ttl: u8,
    /// Outer IPv4 identification.
    pub ident: u16,
}

impl EncapV4 {
    /// Writes outer Ethernet, IPv4 (DF clear, DSCP 0, ECN from the inner IP packet like the kernel's
    /// `ip_tunnel_ecn_encap`, correct header checksum), UDP (checksum 0) and VXLAN
    /// headers in front of the inner Ethernet frame that already sits at
    /// `buf[OUTER_V4_OVERHEAD..OUTER_V4_OVERHEAD + inner_len]`, and returns the total frame length.
    ///
    /// Errors: `NoBufferRoom` if `buf` is too short, `TooBig` if the outer IPv4 packet would exceed 65535 bytes.
    pub fn encapsulate_v4(&self, buf: &mut [u8], inner_len: usize) -> Result<usize, Reason> {
        self.encapsulate(buf, inner_len, false)
    }

    /// As [`encapsulate_v4`](Self::encapsulate_v4), but with the outer UDP checksum computed over the whole
    /// datagram, as the Linux vxlan device does by default: the output equals the kernel's byte for byte.
    pub fn encapsulate_v4_with_udp_checksum(
        &self,
        buf: &mut [u8],
        inner_len: usize,
    ) -> Result<usize, Reason> {
        self.encapsulate(buf, inner_len, true)
    }

    fn encapsulate(
        &self,
        buf: &mut [u8],
        inner_len: usize,
        udp_checksum: bool,
    ) -> Result<usize, Reason> {
        let total = OUTER_V4_OVERHEAD
            .checked_add(inner_len)
            .ok_or(Reason::TooBig)?;
        if buf.len() < total {
            return Err(Reason::NoBufferRoom);
        }
        let ip_len = u16::try_from(total - ethernet::HEADER_LEN).map_err(|_| Reason::TooBig)?;
        let udp_len = ip_len - 20; // ip_len >= 36

        let frame = &mut buf[..total];
        let ecn = inner_ecn(&frame[OUTER_V4_OVERHEAD..]);
        ethernet::emit(
            &self.dst_mac,
            &self.src_mac,
            ethernet::ethertype::IPV4,
            frame,
        );

        let (ip_hdr, rest) = frame[ethernet::HEADER_LEN..].split_at_mut(ipv4::MIN_HEADER_LEN);
        let mut ip = ipv4::Packet::new_unchecked(ip_hdr);
        ip.set_version_and_header_len(ipv4::MIN_HEADER_LEN);
        ip.set_dscp_ecn(ecn);
        ip.set_total_len(ip_len);
        ip.set_ident(self.ident);
        ip.set_flags_and_frag_offset(false, false, 0);
        ip.set_ttl(self.ttl);
        ip.set_protocol(ipv4::protocol::UDP);
        ip.set_src(self.src_ip);
        ip.set_dst(self.dst_ip);
        ip.fill_checksum();

        udp::emit_header(self.src_port, self.dst_port, udp_len, rest);
        emit_header(&mut rest[udp::HEADER_LEN..], self.vni);
        if udp_checksum {
            udp::Packet::new_unchecked(rest).fill_checksum_v4(self.src_ip, self.dst_ip);
        }
        Ok(total)
    }
}

/// The ECN bits the kernel puts on the outer header for an inner Ethernet frame (`INET_ECN_encapsulate` with
/// outer TOS 0): the inner ECT codepoint, CE becoming ECT(0); 0 for non-IP frames.
fn inner_ecn(inner: &[u8]) -> u8 {
    let ecn = match (inner.get(12..14), inner.get(14), inner.get(15)) {
        (Some([0x08, 0x00]), Some(_), Some(tos)) => tos & 0b11,
        (Some([0x86, 0xDD]), Some(_), Some(b1)) => (b1 >> 4) & 0b11,
        _ => 0,
    };
    if ecn == 0b11 {
        0b10
    } else {
        ecn
    }
}

/// What [`decapsulate_v4`] found in an underlay frame.
pub type Decapsulated = (Ipv4Addr, u16, u32, Range<usize>);

/// Validates an underlay frame — Ethernet with the IPv4 EtherType, IPv4 (header checksum verified, not a
/// fragment, protocol UDP), UDP (length; checksum verified unless zero), VXLAN (I flag), and an inner frame of
/// at least an Ethernet header — and returns `(outer source address, UDP source port, VNI, inner frame range
/// within frame)`. The UDP destination port and the VNI are not checked here.
///
/// Errors: the `check_len` reasons of each layer, `UnsupportedEtherType`, `Ipv4BadChecksum`, `UdpBadChecksum`,
/// `EthernetTruncated` for a short inner frame, and `UnsupportedProtocol` for non-UDP or fragmented outer
/// packets (a raw backend does not reassemble the underlay).
pub fn decapsulate_v4(frame: &[u8]) -> Result<Decapsulated, Reason> {
    decapsulate_v4_with(frame, true)
}

/// [`decapsulate_v4`] with the outer UDP checksum check optional (for backends whose NIC or kernel already
/// verified it). The IPv4 header checksum is always verified (except when fuzzing).
pub fn decapsulate_v4_with(
    frame: &[u8],
    verify_udp_checksum: bool,
) -> Result<Decapsulated, Reason> {
    let eth = ethernet::Frame::new_checked(frame)?;
    if eth.ethertype() != ethernet::ethertype::IPV4 {
        return Err(Reason::UnsupportedEtherType);
    }
    let ip = ipv4::Packet::new_checked(eth.payload())?;
    if !cfg!(fuzzing) && !ip.verify_checksum() {
        return Err(Reason::Ipv4BadChecksum);
    }
    if ip.protocol() != ipv4::protocol::UDP || ip.is_fragment() {
        return Err(Reason::UnsupportedProtocol);
    }
    let u = udp::Packet::new_checked(ip.payload())?;
    if verify_udp_checksum && !cfg!(fuzzing) && !u.verify_checksum_v4(ip.src(), ip.dst()) {
        return Err(Reason::UdpBadChecksum);
    }
    let vx = Packet::new_checked(u.payload())?;
    if vx.payload().len() < ethernet::HEADER_LEN {
        return Err(Reason::EthernetTruncated);
    }
    let start = ethernet::HEADER_LEN + ip.header_len() + udp::HEADER_LEN + HEADER_LEN;
    let end = ethernet::HEADER_LEN + ip.header_len() + usize::from(u.len());
    Ok((ip.src(), u.src_port(), vx.vni(), start..end))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::wire::{arp, checksum, icmpv4, tcp};
    use proptest::prelude::*;

    /// Parses a fixture: hex bytes, whitespace ignored, `#` lines are comments.
    fn fixture(text: &str) -> Vec<u8> {
        let hex: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
            .collect();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    const ICMP: &str = include_str!("../../tests/fixtures/vxlan_icmp_echo.hex");
    const UDP: &str = include_str!("../../tests/fixtures/vxlan_udp.hex");
    const TCP: &str = include_str!("../../tests/fixtures/vxlan_tcp_syn.hex");
    const ARP: &str = include_str!("../../tests/fixtures/vxlan_arp_request.hex");
    const ICMP_CE: &str = include_str!("../../tests/fixtures/vxlan_icmp_ecn_ce.hex");

    const NODE_MAC: MacAddr = [0x02, 0x00, 0xac, 0x12, 0x00, 0x02];
    const PEER_MAC: MacAddr = [0x02, 0x00, 0xac, 0x12, 0x00, 0x03];
    const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
    const PEER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
    const TUNNEL_MAC: MacAddr = [0x66, 0x7e, 0x0a, 0x0a, 0x0a, 0x01];
    const GATEWAY_MAC: MacAddr = [0xa2, 0x2a, 0x0a, 0x0a, 0x0a, 0x02];
    const POD: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 1);
    const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

    /// Decapsulates a kernel frame, checks the outer headers, re-encapsulates the inner frame with the same
    /// parameters and compares byte for byte; returns the inner frame.
    fn check_kernel_frame(frame: &[u8], outer_tos: u8) -> Vec<u8> {
        let (src, sport, vni, inner) = decapsulate_v4(frame).unwrap();
        assert_eq!((src, vni, inner.end), (NODE, DEFAULT_VNI, frame.len()));
        assert_eq!(inner.start, OUTER_V4_OVERHEAD);
        assert!(
            (SOURCE_PORT_MIN..SOURCE_PORT_MAX).contains(&sport),
            "source port {sport}"
        );

        let eth = ethernet::Frame::new_checked(frame).unwrap();
        assert_eq!((eth.src(), eth.dst()), (NODE_MAC, PEER_MAC));
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (ip.dst(), ip.ttl(), ip.dscp_ecn(), ip.dont_frag()),
            (PEER, 64, outer_tos, false)
        );
        let u = udp::Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(u.dst_port(), DEFAULT_PORT);
        assert_ne!(
            u.checksum(),
            0,
            "this kernel sends outer UDP checksums by default"
        );
        assert!(u.verify_checksum_v4(ip.src(), ip.dst()));
        let vx = Packet::new_checked(u.payload()).unwrap();
        assert_eq!(vx.flags(), FLAG_I);
        assert_eq!(&u.payload()[..8], &[0x08, 0, 0, 0, 0x00, 0x10, 0x01, 0x00]);

        let params = EncapV4 {
            src_mac: NODE_MAC,
            dst_mac: PEER_MAC,
            src_ip: NODE,
            dst_ip: PEER,
            src_port: sport,
            dst_port: DEFAULT_PORT,
            vni: DEFAULT_VNI,
            ttl: 64,
            ident: ip.ident(),
        };
        let mut buf = vec![0xEEu8; frame.len() + 16];
        buf[inner.clone()].copy_from_slice(&frame[inner.clone()]);
        assert_eq!(
            params.encapsulate_v4_with_udp_checksum(&mut buf, inner.len()),
            Ok(frame.len())
        );
        assert_eq!(&buf[..frame.len()], frame, "kernel-identical encapsulation");
        assert_eq!(
            params.encapsulate_v4(&mut buf, inner.len()),
            Ok(frame.len())
        );
        assert_eq!(&buf[..40], &frame[..40]);
        assert_eq!(&buf[40..42], &[0, 0], "UDP checksum left zero");
        assert_eq!(&buf[42..frame.len()], &frame[42..]);
        assert_eq!(
            decapsulate_v4(&buf[..frame.len()]),
            Ok((src, sport, vni, inner.clone()))
        );
        frame[inner].to_vec()
    }

    fn inner_ipv4(inner: &[u8], proto: u8) -> (Vec<u8>, Ipv4Addr, Ipv4Addr) {
        let eth = ethernet::Frame::new_checked(inner).unwrap();
        assert_eq!(
            (eth.src(), eth.dst(), eth.ethertype()),
            (TUNNEL_MAC, GATEWAY_MAC, ethernet::ethertype::IPV4)
        );
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (ip.src(), ip.dst(), ip.protocol(), ip.ttl()),
            (POD, SERVER, proto, 64)
        );
        (ip.payload().to_vec(), ip.src(), ip.dst())
    }

    #[test]
    fn kernel_icmp_echo() {
        let inner = check_kernel_frame(&fixture(ICMP), 0);
        let (l4, _, _) = inner_ipv4(&inner, ipv4::protocol::ICMP);
        let icmp = icmpv4::Packet::new_checked(&l4[..]).unwrap();
        assert_eq!(icmp.msg_type(), icmpv4::msg_type::ECHO_REQUEST);
        assert_eq!(icmp.echo_seq_no(), 1);
        assert_eq!(icmp.data().len(), 56);
        assert!(icmp.verify_checksum());
    }

    #[test]
    fn kernel_icmp_echo_with_ecn_ce() {
        // Inner DSCP EF + CE (0xbb): the kernel copies only the ECN, and CE as ECT(0).
        let inner = check_kernel_frame(&fixture(ICMP_CE), 0x02);
        let eth = ethernet::Frame::new_checked(&inner[..]).unwrap();
        let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(
            (ip.dscp_ecn(), ip.dst()),
            (0xbb, Ipv4Addr::new(198, 51, 100, 11))
        );
        let icmp = icmpv4::Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.data().len(), 16);
    }

    #[test]
    fn kernel_udp() {
        let inner = check_kernel_frame(&fixture(UDP), 0);
        let (l4, s, d) = inner_ipv4(&inner, ipv4::protocol::UDP);
        let u = udp::Packet::new_checked(&l4[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port()), (40000, 5353));
        assert_eq!(u.payload(), b"hello from the kernel vxlan\n");
        assert!(u.verify_checksum_v4(s, d));
    }

    #[test]
    fn kernel_tcp_syn() {
        let inner = check_kernel_frame(&fixture(TCP), 0);
        let (mut l4, s, d) = inner_ipv4(&inner, ipv4::protocol::TCP);
        let mut t = tcp::Packet::new_checked(&mut l4[..]).unwrap();
        assert_eq!(
            (t.src_port(), t.dst_port(), t.flags()),
            (40001, 443, tcp::flags::SYN)
        );
        assert_eq!(t.mss(), Ok(Some(1410)));
        assert!(t.verify_checksum_v4(s, d));
        assert_eq!(t.clamp_mss(1360), Ok(Some((1410, 1360))));
        assert!(t.verify_checksum_v4(s, d));
    }

    #[test]
    fn kernel_arp_request() {
        let inner = check_kernel_frame(&fixture(ARP), 0);
        let eth = ethernet::Frame::new_checked(&inner[..]).unwrap();
        assert_eq!(
            (eth.src(), eth.dst(), eth.ethertype()),
            (TUNNEL_MAC, ethernet::BROADCAST, ethernet::ethertype::ARP)
        );
        let a = arp::Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(a.operation(), arp::OP_REQUEST);
        assert_eq!(
            (a.sender_hw(), a.sender_ip(), a.target_ip()),
            (TUNNEL_MAC, POD, Ipv4Addr::new(10, 10, 10, 3))
        );
    }

    #[test]
    fn header_deconstruct_construct() {
        let bytes = [0x08, 0, 0, 0, 0x00, 0x10, 0x01, 0x00, 0xAA];
        let p = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(
            (p.flags(), p.vni(), p.payload()),
            (FLAG_I, 4097, &[0xAA][..])
        );
        let mut b = [0xFFu8; 9];
        emit_header(&mut b, 4097);
        assert_eq!(b[..8], bytes[..8]);
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_vni(0x0123_4567);
        p.payload_mut()[0] = 1;
        assert_eq!(p.vni(), 0x23_4567);
        // Reserved bits set by a sender are ignored.
        let odd = [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 1, 0xFF];
        assert_eq!(Packet::new_checked(&odd[..]).unwrap().vni(), 1);
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            Packet::new_checked(&[0x08, 0, 0, 0, 0, 0, 1][..]).unwrap_err(),
            Reason::VxlanTruncated
        );
        assert_eq!(
            Packet::new_checked(&[0x00, 0, 0, 0, 0, 0, 1, 0][..]).unwrap_err(),
            Reason::VxlanBadFlags
        );
    }

    #[test]
    fn decapsulate_errors() {
        let good = fixture(UDP);
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            decapsulate_v4(&b)
        };
        assert_eq!(bad(&|b| b.truncate(13)), Err(Reason::EthernetTruncated));
        assert_eq!(bad(&|b| b[12] = 0x86), Err(Reason::UnsupportedEtherType));
        assert_eq!(bad(&|b| b.truncate(30)), Err(Reason::Ipv4Truncated));
        assert_eq!(bad(&|b| b[24] ^= 1), Err(Reason::Ipv4BadChecksum));
        assert_eq!(bad(&|b| b.truncate(100)), Err(Reason::Ipv4BadTotalLen));
        let refill = |b: &mut Vec<u8>| ipv4::Packet::new_unchecked(&mut b[14..34]).fill_checksum();
        assert_eq!(
            bad(&|b| {
                b[23] = 6;
                refill(b)
            }),
            Err(Reason::UnsupportedProtocol)
        );
        assert_eq!(
            bad(&|b| {
                b[20] = 0x20;
                refill(b)
            }),
            Err(Reason::UnsupportedProtocol)
        );
        assert_eq!(bad(&|b| b[100] ^= 1), Err(Reason::UdpBadChecksum));
        assert!(decapsulate_v4_with(
            &{
                let mut b = good.clone();
                b[100] ^= 1;
                b
            },
            false
        )
        .is_ok());
        assert_eq!(
            bad(&|b| {
                b[38] = 0;
                b[39] = 7;
                b[40] = 0;
                b[41] = 0
            }),
            Err(Reason::UdpBadLength)
        );
        assert_eq!(
            bad(&|b| {
                b[42] = 0;
                b[40] = 0;
                b[41] = 0
            }),
            Err(Reason::VxlanBadFlags)
        );
        // UDP length covering only the VXLAN header.
        let short = |b: &mut Vec<u8>| {
            b[38..42].copy_from_slice(&[0, 16, 0, 0]);
        };
        assert_eq!(bad(&short), Err(Reason::EthernetTruncated));
        assert_eq!(
            bad(&|b| { b[38..42].copy_from_slice(&[0, 15, 0, 0]) }),
            Err(Reason::VxlanTruncated)
        );
    }

    #[test]
    fn encapsulate_errors() {
        let p = EncapV4 {
            src_mac: NODE_MAC,
            dst_mac: PEER_MAC,
            src_ip: NODE,
            dst_ip: PEER,
            src_port: 40000,
            dst_port: DEFAULT_PORT,
            vni: DEFAULT_VNI,
            ttl: 64,
            ident: 0,
        };
        let mut small = [0u8; 60];
        assert_eq!(p.encapsulate_v4(&mut small, 14), Err(Reason::NoBufferRoom));
        let mut big = vec![0u8; 70000];
        assert_eq!(
            p.encapsulate_v4(&mut big, 65535 - 36 + 1),
            Err(Reason::TooBig)
        );
        assert_eq!(p.encapsulate_v4(&mut big, 65535 - 36), Ok(65535 + 14));
        assert_eq!(p.encapsulate_v4(&mut big, usize::MAX), Err(Reason::TooBig));
    }

    #[test]
    fn ecn_is_copied_from_the_inner_packet() {
        let p = EncapV4 {
            src_mac: NODE_MAC,
            dst_mac: PEER_MAC,
            src_ip: NODE,
            dst_ip: PEER,
            src_port: 40000,
            dst_port: DEFAULT_PORT,
            vni: DEFAULT_VNI,
            ttl: 64,
            ident: 0,
        };
        let inner = fixture(UDP)[OUTER_V4_OVERHEAD..].to_vec();
        // (inner ethertype, byte 14, byte 15) -> outer DSCP/ECN byte.
        for (et, b14, b15, outer) in [
            ([0x08, 0x00], 0x45, 0xB8, 0), // DSCP EF, not ECT: nothing copied
            ([0x08, 0x00], 0x45, 0x02, 2), // ECT(0)
            ([0x08, 0x00], 0x45, 0x01, 1), // ECT(1)
            ([0x08, 0x00], 0x45, 0x03, 2), // CE -> ECT(0)
            ([0x86, 0xDD], 0x6B, 0x90, 1), // IPv6 traffic class 0xB9: ECT(1)
            ([0x08, 0x06], 0x00, 0x03, 0), // ARP
        ] {
            let mut buf = vec![0u8; OUTER_V4_OVERHEAD + inner.len()];
            buf[OUTER_V4_OVERHEAD..].copy_from_slice(&inner);
            buf[OUTER_V4_OVERHEAD + 12..OUTER_V4_OVERHEAD + 14].copy_from_slice(&et);
            buf[OUTER_V4_OVERHEAD + 14] = b14;
            buf[OUTER_V4_OVERHEAD + 15] = b15;
            p.encapsulate_v4(&mut buf, inner.len()).unwrap();
            let ip = ipv4::Packet::new_checked(&buf[14..]).unwrap();
            assert_eq!(ip.dscp_ecn(), outer, "{et:?} {b15:#x}");
            assert!(ip.verify_checksum());
        }
    }

    #[test]
    fn source_ports() {
        assert_eq!(source_port_for(0), 32768);
        assert_eq!(source_port_for(u32::MAX), 32768); // hash ^ hash << 16 == 0x0000_FFFF
        assert_eq!(
            source_port_for(0xFFFF_0000),
            32768 + u16::try_from((0xFFFF_0000u64 * 28231) >> 32).unwrap()
        );
    }

    /// A VXLAN datagram around Ethernet + IPv4 (20-byte header) + 8 bytes of transport header + payload.
    fn v4_datagram(
        proto: u8,
        src: [u8; 4],
        dst: [u8; 4],
        ports: (u16, u16),
        frag: u16,
        ttl: u8,
    ) -> Vec<u8> {
        let mut d = vec![0u8; HEADER_LEN + 14 + 20 + 8 + 16];
        emit_header(&mut d, DEFAULT_VNI);
        d[8 + 12..8 + 14].copy_from_slice(&[0x08, 0x00]);
        let ip = 8 + 14;
        d[ip] = 0x45;
        d[ip + 6..ip + 8].copy_from_slice(&frag.to_be_bytes());
        d[ip + 8] = ttl;
        d[ip + 9] = proto;
        d[ip + 12..ip + 16].copy_from_slice(&src);
        d[ip + 16..ip + 20].copy_from_slice(&dst);
        d[ip + 20..ip + 22].copy_from_slice(&ports.0.to_be_bytes());
        d[ip + 22..ip + 24].copy_from_slice(&ports.1.to_be_bytes());
        d[ip + 28..].fill(ttl); // payload differs with the TTL too
        d
    }

    #[test]
    fn one_inner_flow_keeps_one_hash_and_flows_spread() {
        const SERVER: [u8; 4] = [198, 51, 100, 10];
        const POD: [u8; 4] = [10, 244, 1, 5];
        let a = inner_flow_hash(&v4_datagram(17, SERVER, POD, (53, 40000), 0, 64));
        // TTL, payload and the DF bit are not part of the flow.
        assert_eq!(
            a,
            inner_flow_hash(&v4_datagram(17, SERVER, POD, (53, 40000), 0x4000, 3))
        );
        // Ports, addresses and protocol are.
        assert_ne!(
            a,
            inner_flow_hash(&v4_datagram(17, SERVER, POD, (53, 40001), 0, 64))
        );
        assert_ne!(
            a,
            inner_flow_hash(&v4_datagram(
                17,
                SERVER,
                [10, 244, 1, 6],
                (53, 40000),
                0,
                64
            ))
        );
        assert_ne!(
            a,
            inner_flow_hash(&v4_datagram(6, SERVER, POD, (53, 40000), 0, 64))
        );
        // ICMP has no ports: its first 4 bytes (type, code, checksum) do not count.
        assert_eq!(
            inner_flow_hash(&v4_datagram(1, SERVER, POD, (0x0000, 1), 0, 64)),
            inner_flow_hash(&v4_datagram(1, SERVER, POD, (0x0300, 2), 0, 64))
        );
        // Every fragment of one datagram (first with MF, middle, last) goes the same way.
        let first = inner_flow_hash(&v4_datagram(17, SERVER, POD, (53, 40000), 0x2000, 64));
        let middle = inner_flow_hash(&v4_datagram(17, SERVER, POD, (1, 2), 0x2000 | 185, 64));
        let last = inner_flow_hash(&v4_datagram(17, SERVER, POD, (3, 4), 370, 64));
        assert_eq!((first, middle), (last, last));

        // 4096 flows of one pod spread over 16 ports about evenly (a port index as the gateway picks it).
        let mut counts = [0u32; 16];
        for port in 0..4096u16 {
            let h = inner_flow_hash(&v4_datagram(6, SERVER, POD, (443, 32768 + port), 0, 64));
            counts[usize::try_from((u64::from(h) * 16) >> 32).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|&c| (192..=320).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn ipv6_flows_hash_on_addresses_and_ports() {
        let mut d = vec![0u8; HEADER_LEN + 14 + 40 + 8];
        d[8 + 12..8 + 14].copy_from_slice(&[0x86, 0xdd]);
        let ip = 8 + 14;
        d[ip] = 0x60;
        d[ip + 6] = 17;
        d[ip + 8..ip + 24]
            .copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        d[ip + 24..ip + 40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        d[ip + 40..ip + 44].copy_from_slice(&[0, 53, 0x9c, 0x40]);
        let a = inner_flow_hash(&d);
        d[ip + 7] = 1; // hop limit
        assert_eq!(a, inner_flow_hash(&d));
        d[ip + 43] ^= 1; // destination port
        assert_ne!(a, inner_flow_hash(&d));
        d[ip + 6] = 44; // behind a fragment header: the ports no longer count
        let f = inner_flow_hash(&d);
        d[ip + 40] ^= 0xff;
        assert_eq!(f, inner_flow_hash(&d));
    }

    proptest! {
        #[test]
        fn source_port_in_range(h in any::<u32>()) {
            let p = source_port_for(h);
            prop_assert!((SOURCE_PORT_MIN..SOURCE_PORT_MAX).contains(&p));
        }

        #[test]
        fn inner_flow_hash_never_panics(data in proptest::collection::vec(any::<u8>(), 0..120), v6 in any::<bool>(), cut in 0usize..120) {
            let mut data = data;
            if data.len() > 21 {
                data[20..22].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
            }
            data.truncate(cut);
            let _ = inner_flow_hash(&data);
        }

        #[test]
        fn getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..32), fix in any::<bool>()) {
            if fix && !data.is_empty() { data[0] |= FLAG_I; }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.flags(), p.vni(), p.payload().len());
            }
            let _ = decapsulate_v4_with(&data, true);
        }

        #[test]
        fn decapsulate_never_panics_on_mutated_kernel_frames(
            which in 0usize..5, at in 0usize..200, val in any::<u8>(), cut in 0usize..200,
        ) {
            let mut f = fixture([ICMP, UDP, TCP, ARP, ICMP_CE][which]);
            let at = at % f.len();
            f[at] = val;
            f.truncate(cut.max(1).min(f.len()));
            if let Ok((_, _, _, r)) = decapsulate_v4_with(&f, false) {
                prop_assert!(r.start <= r.end && r.end <= f.len());
            }
        }

        #[test]
        fn encapsulate_then_decapsulate(
            inner in proptest::collection::vec(any::<u8>(), 14..200),
            sport in any::<u16>(), vni in 0u32..=MAX_VNI, ident in any::<u16>(), csum in any::<bool>(),
        ) {
            let p = EncapV4 { src_mac: NODE_MAC, dst_mac: PEER_MAC, src_ip: NODE, dst_ip: PEER, src_port: sport,
                dst_port: DEFAULT_PORT, vni, ttl: 64, ident };
            let mut buf = vec![0u8; OUTER_V4_OVERHEAD + inner.len()];
            buf[OUTER_V4_OVERHEAD..].copy_from_slice(&inner);
            let n = if csum { p.encapsulate_v4_with_udp_checksum(&mut buf, inner.len()) }
                    else { p.encapsulate_v4(&mut buf, inner.len()) };
            prop_assert_eq!(n, Ok(buf.len()));
            let (src, port, v, r) = decapsulate_v4(&buf).unwrap();
            prop_assert_eq!((src, port, v), (NODE, sport, vni));
            prop_assert_eq!(&buf[r], &inner[..]);
        }
    }

    #[test]
    fn checksum_helpers_agree_on_fixture() {
        // The outer UDP checksum computed over the whole datagram with the pseudo-header.
        let f = fixture(TCP);
        let ip = ipv4::Packet::new_checked(&f[14..]).unwrap();
        let d = ip.payload();
        let s = checksum::sum(
            d,
            checksum::pseudo_header_v4(ip.src(), ip.dst(), 17, u32::try_from(d.len()).unwrap()),
        );
        assert_eq!(checksum::finish(s), 0);
    }
}
