//! What the virtio-net header of a received frame asks of us: complete a checksum the sender left to
//! offload, or cut a GSO super-packet into wire-sized segments.
//!
//! On veth (and on a NIC with GRO) a frame handed to a packet socket may still carry a *partial* checksum —
//! only the pseudo-header sum, the rest "to be filled in by the hardware" — or be a 64 KB TCP super-packet with
//! the segment size on the side. Translating either unchanged would send garbage into the tunnel, so the
//! worker repairs them here first. Pure functions over byte slices; unit-tested without privileges.
//!
//! The header is the kernel's `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h), as packet sockets
//! with `PACKET_VNET_HDR` read and write it (Documentation/networking/packet_mmap.rst, packet(7)).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::checksum;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const ETH: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// The fields of `struct virtio_net_hdr` we use (host byte order, as packet sockets give it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*` flags; bit 0 (`NEEDS_CSUM`) says the L4 checksum is partial.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`: none, TCPv4, TCPv6, UDP L4, with the ECN bit 0x80.
    pub gso_type: u8,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (from the start of the frame).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the 10-byte header; `None` when shorter.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let u16_at = |i: usize| Some(u16::from_ne_bytes([*b.get(i)?, *b.get(i + 1)?]));
        Some(VnetHdr {
            flags: *b.first()?,
            gso_type: *b.get(1)?,
            gso_size: u16_at(4)?,
            csum_start: u16_at(6)?,
            csum_offset: u16_at(8)?,
        })
    }

    /// True for a GSO super-packet.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Why a frame could not be repaired (each is counted as an I/O drop reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// `csum_start`/`csum_offset` point outside the frame.
    BadChecksumOffsets,
    /// A GSO type we do not segment (UFO, SCTP, tunnels), or headers we do not parse (IPv6 extension headers).
    UnsupportedGso,
    /// The super-packet's headers are inconsistent.
    MalformedGso,
    /// More segments than the output has room for.
    TooManySegments,
}

/// Completes a partial checksum in place (what `skb_checksum_help` does): the ones' complement sum from
/// `csum_start` to the end of the frame, the field holding the pseudo-header sum, folded and inverted.
pub fn complete_checksum(frame: &mut [u8], h: &VnetHdr) -> Result<(), OffloadError> {
    if h.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(h.csum_start);
    let field = start + usize::from(h.csum_offset);
    if field + 2 > frame.len() {
        return Err(OffloadError::BadChecksumOffsets);
    }
    let mut c = checksum::finish(checksum::sum(&frame[start..], 0));
    if c == 0 && is_udp_checksum(frame, field) {
        c = 0xFFFF;
    }
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// True when the checksum field at `field` is a UDP one (a computed 0 is then sent as 0xFFFF).
fn is_udp_checksum(frame: &[u8], field: usize) -> bool {
    match l3_info(frame) {
        Some(l) => l.proto == PROTO_UDP && field == l.l4 + 6,
        None => false,
    }
}

#[derive(Debug, Clone, Copy)]
struct L3 {
    v6: bool,
    /// Offset of the L4 header.
    l4: usize,
    proto: u8,
}

/// The network header of an Ethernet frame: family, protocol and where the L4 header starts. Only the
/// fixed fields are read, and only where they exist; `l4` may still lie beyond the frame (see [`Layout`]).
fn l3_info(frame: &[u8]) -> Option<L3> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(frame.get(ETH)? & 0x0F) * 4;
            (ihl >= 20).then_some(L3 {
                v6: false,
                l4: ETH + ihl,
                proto: *frame.get(ETH + 9)?,
            })
        }
        ETHERTYPE_IPV6 => Some(L3 {
            v6: true,
            l4: ETH + 40,
            proto: *frame.get(ETH + 6)?,
        }),
        _ => None,
    }
}

/// A frame whose headers were checked for segmentation: an unfragmented IPv4 packet or an IPv6 packet
/// without extension headers, whose IP length is the frame's, carrying TCP with a data offset of at least
/// 5 words (RFC 9293 §3.1) or UDP, with the whole L4 header inside the frame. Once a frame has a `Layout`,
/// every offset below `hdr` can be indexed without a bounds failure.
#[derive(Debug, Clone, Copy)]
struct Layout {
    l3: L3,
    tcp: bool,
    /// Length of all headers: Ethernet, IP and TCP/UDP.
    hdr: usize,
}

impl Layout {
    fn of(frame: &[u8]) -> Result<Layout, OffloadError> {
        let l3 = l3_info(frame).ok_or(OffloadError::MalformedGso)?;
        let at = |i: usize| frame.get(i).copied().ok_or(OffloadError::MalformedGso);
        let be16 = |i: usize| Ok::<_, OffloadError>(u16::from_be_bytes([at(i)?, at(i + 1)?]));
        let ip_len = if l3.v6 {
            40 + usize::from(be16(ETH + 4)?)
        } else {
            if be16(ETH + 6)? & 0x3FFF != 0 {
                return Err(OffloadError::MalformedGso);
            }
            usize::from(be16(ETH + 2)?)
        };
        if ETH + ip_len != frame.len() {
            return Err(OffloadError::MalformedGso);
        }
        let (tcp, l4_len) = match l3.proto {
            PROTO_TCP => (true, usize::from(at(l3.l4 + 12)? >> 4) * 4),
            PROTO_UDP => (false, 8),
            // IPv6 extension headers, or anything else: not something this code cuts.
            _ => return Err(OffloadError::UnsupportedGso),
        };
        let hdr = l3.l4 + l4_len;
        if (tcp && l4_len < 20) || hdr > frame.len() {
            return Err(OffloadError::MalformedGso);
        }
        Ok(Layout { l3, tcp, hdr })
    }
}

/// Cuts the GSO super-packet `frame` into segments of at most `gso_size` payload bytes, each a complete
/// Ethernet frame with its own IP length, IPv4 identification and checksum, TCP sequence number and flags
/// (FIN and PSH on the last segment only, CWR on the first only) and a full L4 checksum — the same
/// segments the kernel's software GSO would produce. With `checksums` false the L4 checksums are left
/// as they are (for segments that are joined again before they leave; [`fill_checksums`] completes them
/// otherwise). Segment `k` is written to `out(k)`, which returns a
/// buffer at least `header + gso_size` long; returns the length of every segment through `lens`.
pub fn segment<'o>(
    frame: &[u8],
    h: &VnetHdr,
    mut out: impl FnMut(usize) -> Option<&'o mut [u8]>,
    lens: &mut Vec<usize>,
    checksums: bool,
) -> Result<(), OffloadError> {
    lens.clear();
    let Layout { l3, tcp, hdr } = Layout::of(frame)?;
    let wanted = match h.gso_type & !GSO_ECN {
        GSO_TCPV4 if !l3.v6 => true,
        GSO_TCPV6 if l3.v6 => true,
        GSO_UDP_L4 => false,
        _ => return Err(OffloadError::UnsupportedGso),
    };
    if wanted != tcp {
        return Err(OffloadError::UnsupportedGso);
    }
    let mss = usize::from(h.gso_size);
    if mss == 0 {
        return Err(OffloadError::MalformedGso);
    }
    let payload = &frame[hdr..];
    let count = payload.len().div_ceil(mss).max(1);
    let seq0 = if tcp {
        u32::from_be_bytes([
            frame[l3.l4 + 4],
            frame[l3.l4 + 5],
            frame[l3.l4 + 6],
            frame[l3.l4 + 7],
        ])
    } else {
        0
    };
    let id0 = if l3.v6 {
        0
    } else {
        u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]])
    };
    let flags0 = if tcp { frame[l3.l4 + 13] } else { 0 };
    for k in 0..count {
        let chunk = &payload[(k * mss).min(payload.len())..((k + 1) * mss).min(payload.len())];
        let seg_len = hdr + chunk.len();
        let buf = out(k).ok_or(OffloadError::TooManySegments)?;
        let seg = buf
            .get_mut(..seg_len)
            .ok_or(OffloadError::TooManySegments)?;
        seg[..hdr].copy_from_slice(&frame[..hdr]);
        seg[hdr..].copy_from_slice(chunk);
        if l3.v6 {
            let pl = u16::try_from(seg_len - ETH - 40).map_err(|_| OffloadError::MalformedGso)?;
            seg[ETH + 4..ETH + 6].copy_from_slice(&pl.to_be_bytes());
        } else {
            let total = u16::try_from(seg_len - ETH).map_err(|_| OffloadError::MalformedGso)?;
            seg[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
            #[allow(clippy::cast_possible_truncation)] // IPv4 IDs wrap by design
            let id = id0.wrapping_add(k as u16);
            seg[ETH + 4..ETH + 6].copy_from_slice(&id.to_be_bytes());
            seg[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
            let c = checksum::finish(checksum::sum(&seg[ETH..l3.l4], 0));
            seg[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
        }
        let l4_total = u32::try_from(seg_len - l3.l4).map_err(|_| OffloadError::MalformedGso)?;
        let check_at = if tcp {
            #[allow(clippy::cast_possible_truncation)] // sequence numbers wrap by design
            let seq = seq0.wrapping_add((k * mss) as u32);
            seg[l3.l4 + 4..l3.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let mut f = flags0;
            if k + 1 != count {
                f &= !(0x01 | 0x08); // FIN, PSH
            }
            if k != 0 {
                f &= !0x80; // CWR
            }
            seg[l3.l4 + 13] = f;
            l3.l4 + 16
        } else {
            let ul = u16::try_from(l4_total).map_err(|_| OffloadError::MalformedGso)?;
            seg[l3.l4 + 4..l3.l4 + 6].copy_from_slice(&ul.to_be_bytes());
            l3.l4 + 6
        };
        if checksums {
            fill_l4_checksum(seg, l3, check_at);
        }
        lens.push(seg_len);
    }
    Ok(())
}

/// Computes the TCP/UDP checksum of `frame` (an Ethernet frame) from scratch; `false` for anything else.
pub fn fill_checksums(frame: &mut [u8]) -> bool {
    let Some(l3) = l3_info(frame) else {
        return false;
    };
    let check_at = match l3.proto {
        PROTO_TCP => l3.l4 + 16,
        PROTO_UDP => l3.l4 + 6,
        _ => return false,
    };
    if check_at + 2 > frame.len() {
        return false;
    }
    fill_l4_checksum(frame, l3, check_at);
    true
}

fn fill_l4_checksum(seg: &mut [u8], l3: L3, check_at: usize) {
    let tcp = l3.proto == PROTO_TCP;
    seg[check_at..check_at + 2].copy_from_slice(&[0, 0]);
    let l4_total = u32::try_from(seg.len() - l3.l4).unwrap_or(0);
    let pseudo = if l3.v6 {
        checksum::pseudo_header_v6(
            &v6_at(seg, ETH + 8),
            &v6_at(seg, ETH + 24),
            l3.proto,
            l4_total,
        )
    } else {
        checksum::pseudo_header_v4(
            v4_at(seg, ETH + 12),
            v4_at(seg, ETH + 16),
            l3.proto,
            l4_total,
        )
    };
    let mut c = checksum::finish(checksum::sum(&seg[l3.l4..], pseudo));
    if !tcp && c == 0 {
        c = 0xFFFF;
    }
    seg[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The segmentation a TCP super-packet received through the tunnel socket needs (`frame`: the inner
/// Ethernet frame, larger than the tunnel MTU). The socket does not pass the sender's segment size on, so
/// segments are cut to fit `mtu`; TCP accepts any segmentation within the MSS. `None` for anything but an
/// unfragmented TCP packet whose IP length matches the frame.
pub fn tunnel_gso(frame: &[u8], mtu: u16) -> Option<VnetHdr> {
    let Layout { l3, tcp, hdr } = Layout::of(frame).ok()?;
    if !tcp {
        return None;
    }
    let mss = usize::from(mtu)
        .checked_sub(hdr - ETH)
        .filter(|m| *m >= 8)?;
    Some(VnetHdr {
        flags: 0,
        gso_type: if l3.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        gso_size: u16::try_from(mss).ok()?,
        csum_start: 0,
        csum_offset: 0,
    })
}

/// Prepares the translated TCP super-packet `frame` (a complete Ethernet frame, its IP length the
/// frame's) to leave whole through a packet socket with `PACKET_VNET_HDR`: writes the partial checksum
/// the offload completes (the pseudo-header sum of the translated addresses and the whole TCP length, as
/// Linux's `__tcp_v4_send_check` leaves it for `CHECKSUM_PARTIAL`) and returns the header that has the
/// kernel cut it into segments of `gso_size` payload bytes and fill in their checksums. O(1) in the
/// payload: whatever the field held before (the sender's own partial sum, changed by the translation) is
/// replaced, never summed over.
pub fn prepare_whole(frame: &mut [u8], gso_size: u16) -> Result<VnetHdr, OffloadError> {
    let Layout { l3, tcp, .. } = Layout::of(frame)?;
    if !tcp {
        return Err(OffloadError::UnsupportedGso);
    }
    if gso_size == 0 {
        return Err(OffloadError::MalformedGso);
    }
    partial_tcp(frame, l3, gso_size).ok_or(OffloadError::MalformedGso)
}

/// Writes the pseudo-header sum into the TCP checksum field of `frame` (whose `Layout` was checked: the
/// field lies inside it) and returns the GSO header for segments of `gso_size` payload bytes.
fn partial_tcp(frame: &mut [u8], l3: L3, gso_size: u16) -> Option<VnetHdr> {
    let l4_total = u32::try_from(frame.len().checked_sub(l3.l4)?).ok()?;
    let pseudo = if l3.v6 {
        checksum::pseudo_header_v6(
            &v6_at(frame, ETH + 8),
            &v6_at(frame, ETH + 24),
            PROTO_TCP,
            l4_total,
        )
    } else {
        checksum::pseudo_header_v4(
            v4_at(frame, ETH + 12),
            v4_at(frame, ETH + 16),
            PROTO_TCP,
            l4_total,
        )
    };
    frame
        .get_mut(l3.l4 + 16..l3.l4 + 18)?
        .copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    Some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if l3.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        gso_size,
        csum_start: u16::try_from(l3.l4).ok()?,
        csum_offset: 16,
    })
}

impl VnetHdr {
    /// The 10 bytes of `struct virtio_net_hdr` (host byte order), with `hdr_len` = `header_len`.
    pub fn to_bytes(self, header_len: u16) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&header_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Computes the pseudo-header sum of an IP packet for a protocol and L4 length.
type PseudoSum = fn(&[u8], u8, u32) -> u32;

/// Completes the inner TCP/UDP checksum of a datagram that arrived through the tunnel socket when it is
/// still *partial* — when the field holds exactly the pseudo-header sum a sender leaves for offload.
///
/// A UDP socket cannot say whether a datagram's payload checksum was left to offload: on veth (a gateway pod
/// on the same node as its client, or a namespace test), the node's kernel hands the inner segment to the
/// vxlan device with `CHECKSUM_PARTIAL` and nothing ever fills it in. Translating such a packet
/// incrementally would send a wrong checksum on. A complete checksum equals the bare pseudo-header sum with
/// probability 2^-16, and recomputing a correct checksum changes nothing, so the test is safe.
/// `ip` is the inner IP packet (without Ethernet). Returns true when it completed one.
pub fn complete_partial_inner(ip: &mut [u8]) -> bool {
    let Some(&first) = ip.first() else {
        return false;
    };
    let (l4, proto, pseudo_of): (usize, u8, PseudoSum) = match first >> 4 {
        4 => {
            if ip.len() < 20 {
                return false;
            }
            let ihl = usize::from(first & 0x0F) * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            // Fragments (offset or MF set) never carry partial checksums.
            if ihl < 20 || frag & 0x3FFF != 0 {
                return false;
            }
            (ihl, ip[9], |b, p, len| {
                checksum::pseudo_header_v4(v4_at(b, 12), v4_at(b, 16), p, len)
            })
        }
        6 => {
            if ip.len() < 40 {
                return false;
            }
            (40, ip[6], |b, p, len| {
                checksum::pseudo_header_v6(&v6_at(b, 8), &v6_at(b, 24), p, len)
            })
        }
        _ => return false,
    };
    let field = match proto {
        PROTO_TCP => l4 + 16,
        PROTO_UDP => l4 + 6,
        _ => return false,
    };
    let total = match first >> 4 {
        4 => usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        _ => 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
    };
    if total > ip.len() || field + 2 > total {
        return false;
    }
    let Ok(l4_len) = u32::try_from(total - l4) else {
        return false;
    };
    let stored = u16::from_be_bytes([ip[field], ip[field + 1]]);
    let pseudo = checksum::fold(pseudo_of(ip, proto, l4_len));
    if stored != pseudo || (proto == PROTO_UDP && stored == 0) {
        return false;
    }
    // The field holds the pseudo-header sum: sum the segment with it in place, as skb_checksum_help does.
    let mut c = checksum::finish(checksum::sum(&ip[l4..total], 0));
    if c == 0 && proto == PROTO_UDP {
        c = 0xFFFF;
    }
    ip[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

fn v4_at(b: &[u8], i: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3])
}

fn v6_at(b: &[u8], i: usize) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[i..i + 16]);
    Ipv6Addr::from(o)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn tcp_frame(payload: &[u8], flags_fin_psh: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([198, 51, 100, 10], [203, 0, 113, 10], 64)
            .tcp(80, 40000, 1000, 65000)
            .ack(7)
            .cwr();
        if flags_fin_psh {
            b = b.fin().psh();
        }
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    #[test]
    fn completes_a_partial_tcp_checksum() {
        let mut f = tcp_frame(b"hello world", false);
        let good = f.clone();
        // What the sender leaves for offload: the pseudo-header sum, not inverted.
        let len = u32::try_from(f.len() - 34).unwrap();
        let pseudo = checksum::fold(checksum::pseudo_header_v4(
            Ipv4Addr::new(198, 51, 100, 10),
            Ipv4Addr::new(203, 0, 113, 10),
            6,
            len,
        ));
        f[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        complete_checksum(&mut f, &h).unwrap();
        assert_eq!(f, good);
        let bad = VnetHdr {
            csum_start: 100,
            ..h
        };
        assert_eq!(
            complete_checksum(&mut f, &bad),
            Err(OffloadError::BadChecksumOffsets)
        );
    }

    #[test]
    fn segments_tcp_like_the_kernel() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let frame = tcp_frame(&payload, true);
        let h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            ..VnetHdr::default()
        };
        let mut bufs = vec![vec![0u8; 2000]; 4];
        let mut lens = Vec::new();
        let mut it = bufs.iter_mut();
        segment(
            &frame,
            &h,
            |_| it.next().map(|b| &mut b[..]),
            &mut lens,
            true,
        )
        .unwrap();
        assert_eq!(lens, vec![54 + 1400, 54 + 1400, 54 + 200]);
        let mut data = Vec::new();
        for (k, (b, &len)) in bufs.iter().zip(&lens).enumerate() {
            let p = SlicedPacket::from_ethernet(&b[..len]).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
                panic!("not ipv4")
            };
            assert_eq!(usize::from(ip.header().total_len()), len - 14);
            let Some(TransportSlice::Tcp(t)) = &p.transport else {
                panic!("not tcp")
            };
            assert_eq!(t.sequence_number(), 1000 + 1400 * u32::try_from(k).unwrap());
            assert_eq!(t.fin(), k == 2);
            assert_eq!(t.psh(), k == 2);
            assert_eq!(t.cwr(), k == 0);
            assert!(t.ack());
            // Checksums as a reference would compute them.
            let want = t
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                .unwrap();
            assert_eq!(t.checksum(), want);
            let ipsum = ip.header().to_header().calc_header_checksum();
            assert_eq!(ip.header().header_checksum(), ipsum);
            data.extend_from_slice(t.payload());
        }
        assert_eq!(data, payload);
    }

    #[test]
    fn refuses_what_it_cannot_segment() {
        let frame = tcp_frame(&[0; 100], false);
        let mut lens = Vec::new();
        let ufo = VnetHdr {
            gso_type: 3,
            gso_size: 10,
            ..VnetHdr::default()
        };
        assert_eq!(
            segment(&frame, &ufo, |_| None, &mut lens, true),
            Err(OffloadError::UnsupportedGso)
        );
        let h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 10,
            ..VnetHdr::default()
        };
        let mut one = [0u8; 100];
        let mut first = Some(&mut one[..]);
        assert_eq!(
            segment(&frame, &h, |_| first.take(), &mut lens, true),
            Err(OffloadError::TooManySegments)
        );
        for cut in 0..frame.len() {
            let _ = segment(&frame[..cut], &h, |_| None, &mut lens, true);
        }
    }

    #[test]
    fn completes_partial_inner_checksums_and_leaves_good_ones() {
        let good = tcp_frame(b"some payload", false);
        let mut ip = good[14..].to_vec();
        assert!(
            !complete_partial_inner(&mut ip),
            "a complete checksum is left alone"
        );
        assert_eq!(ip, good[14..]);
        let len = u32::try_from(ip.len() - 20).unwrap();
        let pseudo = checksum::fold(checksum::pseudo_header_v4(
            Ipv4Addr::new(198, 51, 100, 10),
            Ipv4Addr::new(203, 0, 113, 10),
            6,
            len,
        ));
        ip[36..38].copy_from_slice(&pseudo.to_be_bytes());
        assert!(complete_partial_inner(&mut ip));
        assert_eq!(ip, good[14..]);
        // UDP over IPv6.
        let mut v = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            .udp(5353, 53)
            .write(&mut v, b"query")
            .unwrap();
        let good6 = v.clone();
        let pseudo = checksum::fold(checksum::pseudo_header_v6(
            &Ipv6Addr::from([0xfd; 16]),
            &Ipv6Addr::from([0x20; 16]),
            17,
            13,
        ));
        v[46..48].copy_from_slice(&pseudo.to_be_bytes());
        assert!(complete_partial_inner(&mut v));
        assert_eq!(v, good6);
        for cut in 0..good6.len() {
            let mut t = good6[..cut].to_vec();
            let _ = complete_partial_inner(&mut t);
        }
    }

    #[test]
    fn prepare_whole_leaves_the_checksum_the_offload_completes() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let frame = tcp_frame(&payload, true);
        let h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            ..VnetHdr::default()
        };
        let mut bufs = vec![vec![0u8; 2000]; 4];
        let mut lens = Vec::new();
        let mut it = bufs.iter_mut();
        segment(
            &frame,
            &h,
            |_| it.next().map(|b| &mut b[..]),
            &mut lens,
            true,
        )
        .unwrap();
        assert_eq!(lens.len(), 4);
        // Prepared to leave whole: the header asks for the same cut, and the partial checksum it writes
        // completes to the original one.
        let mut whole = frame.clone();
        let vh = prepare_whole(&mut whole, 1400).unwrap();
        assert_eq!(vh.gso_size, 1400);
        assert_eq!(
            (vh.gso_type, vh.csum_start, vh.csum_offset, vh.flags),
            (GSO_TCPV4, 34, 16, F_NEEDS_CSUM)
        );
        complete_checksum(&mut whole, &vh).unwrap();
        assert_eq!(whole, frame);
        // Not TCP, or no segment size: refused.
        assert!(prepare_whole(&mut frame.clone(), 0).is_err());
        let mut udp = frame.clone();
        udp[14 + 9] = PROTO_UDP;
        assert!(prepare_whole(&mut udp, 1400).is_err());
        // Segments cut without checksums get them from fill_checksums.
        let mut raw = vec![vec![0u8; 2000]; 4];
        let mut it = raw.iter_mut();
        segment(
            &frame,
            &h,
            |_| it.next().map(|b| &mut b[..]),
            &mut lens,
            false,
        )
        .unwrap();
        for (r, (b, l)) in raw.iter_mut().zip(bufs.iter().zip(&lens)) {
            assert!(fill_checksums(&mut r[..*l]));
            assert_eq!(&r[..*l], &b[..*l]);
        }
    }

    /// A TCP frame whose data offset says `doff` words, `payload` bytes behind 20 header bytes (so the
    /// IP length matches the frame), as an attacker would send it.
    fn tcp_frame_with_data_offset(v6: bool, doff: u8, payload: usize) -> Vec<u8> {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2([2; 6], [4; 6]);
        let b = if v6 {
            b.ipv6([0xfd; 16], [0x20; 16], 64)
        } else {
            b.ipv4([10, 244, 1, 5], [198, 51, 100, 10], 64)
        };
        b.tcp(40000, 80, 1, 65000)
            .write(&mut v, &vec![7u8; payload])
            .unwrap();
        let l4 = if v6 { 54 } else { 34 };
        v[l4 + 12] = doff << 4;
        v
    }

    /// The remote crash: a TCP packet slightly over the tunnel MTU with a data offset below 5 made the
    /// segmentation index past the end of its last, short segment. Every data offset and every short
    /// last segment is refused now, by both paths (tunnel and uplink) and by the preparation to leave whole.
    #[test]
    fn data_offsets_below_five_are_refused_not_a_panic() {
        for v6 in [false, true] {
            for doff in 0..16u8 {
                for over in 0..24 {
                    let frame = tcp_frame_with_data_offset(v6, doff, 1430 + over);
                    let h = tunnel_gso(&frame, 1450);
                    if doff < 5 {
                        assert!(h.is_none(), "doff {doff} accepted");
                    }
                    let gso = VnetHdr {
                        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                        gso_size: 1400,
                        ..VnetHdr::default()
                    };
                    let mut bufs = vec![vec![0u8; 1600]; 4];
                    let mut lens = Vec::new();
                    for checksums in [false, true] {
                        let mut it = bufs.iter_mut();
                        let r = segment(
                            &frame,
                            &gso,
                            |_| it.next().map(|b| &mut b[..]),
                            &mut lens,
                            checksums,
                        );
                        if doff < 5 {
                            assert_eq!(r, Err(OffloadError::MalformedGso));
                        }
                    }
                    if doff < 5 {
                        assert!(prepare_whole(&mut frame.clone(), 1000).is_err());
                    }
                }
            }
        }
    }

    /// A super-packet whose IP length is not the frame's length (or is a fragment) is not cut.
    #[test]
    fn ip_length_must_match_the_frame() {
        let frame = tcp_frame(&[1; 3000], false);
        let h = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            ..VnetHdr::default()
        };
        let mut lens = Vec::new();
        for (at, value) in [(16usize, 0x00u8), (17, 0x10), (20, 0x20), (20, 0x00)] {
            let mut f = frame.clone();
            f[at] = value;
            if at == 20 && value == 0 {
                f[21] = 1; // fragment offset 8
            }
            let mut bufs = vec![vec![0u8; 1600]; 4];
            let mut it = bufs.iter_mut();
            assert_eq!(
                segment(&f, &h, |_| it.next().map(|b| &mut b[..]), &mut lens, true),
                Err(OffloadError::MalformedGso),
                "byte {at} = {value:#x}"
            );
            assert!(tunnel_gso(&f, 1450).is_none());
        }
        // A GSO type for the other protocol or family is refused too.
        let udp = VnetHdr {
            gso_type: GSO_UDP_L4,
            gso_size: 1400,
            ..VnetHdr::default()
        };
        assert_eq!(
            segment(&frame, &udp, |_| None, &mut lens, true),
            Err(OffloadError::UnsupportedGso)
        );
    }

    #[test]
    fn parses_the_header() {
        let mut b = [0u8; 10];
        b[0] = 1;
        b[1] = GSO_TCPV6;
        b[4..6].copy_from_slice(&1440u16.to_ne_bytes());
        b[6..8].copy_from_slice(&54u16.to_ne_bytes());
        b[8..10].copy_from_slice(&16u16.to_ne_bytes());
        let h = VnetHdr::parse(&b).unwrap();
        assert!(h.is_gso());
        assert_eq!((h.gso_size, h.csum_start, h.csum_offset), (1440, 54, 16));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the bytes and the header say, nothing panics and outputs stay within their buffers.
        #[test]
        fn hostile_frames_never_panic(
            mut frame in proptest::collection::vec(any::<u8>(), 0..3000),
            flags in any::<u8>(), gso_type in any::<u8>(), gso_size in any::<u16>(),
            csum_start in any::<u16>(), csum_offset in any::<u16>(), mtu in any::<u16>(),
        ) {
            let h = VnetHdr { flags, gso_type, gso_size, csum_start, csum_offset };
            let _ = complete_checksum(&mut frame, &h);
            let mut bufs = vec![vec![0u8; 1600]; 8];
            let mut it = bufs.iter_mut();
            let mut lens = Vec::new();
            let _ = segment(&frame, &h, |_| it.next().map(|b| &mut b[..]), &mut lens, true);
            let _ = tunnel_gso(&frame, mtu);
            let _ = fill_checksums(&mut frame);
            if frame.len() > 14 {
                let _ = complete_partial_inner(&mut frame[14..]);
            }
            let _ = prepare_whole(&mut frame, gso_size);
        }
    }
}
