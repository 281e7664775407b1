// A grammar of frames for the I/O-path fuzz targets: valid outer headers, then inner headers whose fields
// (lengths, data offsets, IHL, extension headers, fragment fields, GSO types and sizes, checksum offsets) are
// chosen from values near the boundaries that matter, or at random. Random bytes practically never line up
// ethertype, protocol, GSO type and data offset; a grammar does in a few thousand runs.
#![allow(dead_code)]

use arbitrary::Arbitrary;

/// The tunnel MTU of `common::worker()`'s configuration (inner IP packet).
pub const TUNNEL_MTU: u16 = 1450;
/// The smallest MTU of the tunnel and the uplinks, which tunnel super-packets are cut to.
pub const SEGMENT_MTU: u16 = 1450;
/// Room the worker leaves behind a packet for an ICMP error built in its place.
pub const ICMP_ROOM: usize = 1536;
/// Segments of one super-packet the worker can hold.
pub const MAX_SEGMENTS: usize = 128;

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum Len {
    /// Bytes of payload.
    Exact(u16),
    /// So that the inner IP packet is the tunnel MTU plus this (slightly over or under it).
    AroundMtu(i8),
    /// So that the payload is `k` segments of the MSS plus `rem` bytes.
    Segments {
        k: u8,
        rem: i8,
    },
    Small(u8),
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum L4Kind {
    Tcp,
    Udp,
    Icmp,
    Other(u8),
}

#[derive(Debug, Arbitrary, Clone)]
pub enum Ext {
    HopByHop(u8),
    Fragment { offset: u16, more: bool },
    Routing(u8),
}

/// An inner IPv4/IPv6 packet with TCP, UDP, ICMP or other payload; every length field either correct or
/// overridden.
#[derive(Debug, Arbitrary, Clone)]
pub struct Inner {
    pub v6: bool,
    pub kind: L4Kind,
    /// IPv4: header length in words (5 unless set); options are filled with NOPs.
    pub ihl: Option<u8>,
    /// IPv4 total length / IPv6 payload length; computed unless set.
    pub ip_len: Option<u16>,
    /// IPv4 flags and fragment offset (DF unless set).
    pub frag: Option<u16>,
    pub ttl: u8,
    pub ext: Vec<Ext>,
    /// TCP data offset in words (5 unless set; values below 5 are what broke the segmentation once).
    pub data_offset: Option<u8>,
    pub tcp_flags: u8,
    pub seq: u32,
    /// UDP length; computed unless set.
    pub udp_len: Option<u16>,
    /// L4 checksum: correct, partial (the pseudo-header sum a sender leaves for offload), or this value.
    pub checksum: Option<Option<u16>>,
    pub len: Len,
    pub fill: u8,
    /// Cut the packet short (or extend it with garbage) by this much after building it.
    pub cut: Option<u16>,
    pub tail: Vec<u8>,
}

pub struct Addrs {
    pub src4: [u8; 4],
    pub dst4: [u8; 4],
    pub src6: [u8; 16],
    pub dst6: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    acc as u16
}

impl Inner {
    /// The MSS a segmentation of this packet would use (to aim lengths at segment boundaries).
    fn mss(&self, l3: usize, l4: usize) -> usize {
        usize::from(SEGMENT_MTU).saturating_sub(l3 + l4).max(1)
    }

    /// Appends the IP packet to `out`.
    pub fn build(&self, a: &Addrs, out: &mut Vec<u8>) {
        let ip_start = out.len();
        let ihl = usize::from(self.ihl.unwrap_or(5) & 0x0F);
        let ext_len: usize = if self.v6 {
            self.ext.len().min(4) * 8
        } else {
            0
        };
        let l3 = if self.v6 {
            40 + ext_len
        } else {
            ihl.max(5) * 4
        };
        let proto = match self.kind {
            L4Kind::Tcp => 6,
            L4Kind::Udp => 17,
            L4Kind::Icmp => {
                if self.v6 {
                    58
                } else {
                    1
                }
            }
            L4Kind::Other(p) => p,
        };
        let doff = usize::from(self.data_offset.unwrap_or(5) & 0x0F);
        let l4 = match self.kind {
            L4Kind::Tcp => doff.max(2) * 4,
            L4Kind::Udp | L4Kind::Icmp => 8,
            L4Kind::Other(_) => 0,
        };
        let payload = match self.len {
            Len::Exact(n) => usize::from(n),
            Len::AroundMtu(d) => usize::from(TUNNEL_MTU)
                .saturating_add_signed(isize::from(d))
                .saturating_sub(l3 + l4),
            Len::Segments { k, rem } => {
                (self.mss(l3, l4) * usize::from(k % 64)).saturating_add_signed(isize::from(rem))
            }
            Len::Small(n) => usize::from(n),
        }
        .min(65_000);
        let total = l3 + l4 + payload;
        // IP header.
        if self.v6 {
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            let pl = self
                .ip_len
                .unwrap_or(u16::try_from(total - 40).unwrap_or(u16::MAX));
            out.extend_from_slice(&pl.to_be_bytes());
            let first_nh = if self.ext.is_empty() {
                proto
            } else {
                ext_code(&self.ext[0])
            };
            out.push(first_nh);
            out.push(self.ttl);
            out.extend_from_slice(&a.src6);
            out.extend_from_slice(&a.dst6);
            for (i, e) in self.ext.iter().take(4).enumerate() {
                let nh = self
                    .ext
                    .get(i + 1)
                    .filter(|_| i + 1 < 4)
                    .map_or(proto, ext_code);
                match e {
                    Ext::HopByHop(x) | Ext::Routing(x) => {
                        out.extend_from_slice(&[nh, 0, 1, 4, *x, 0, 0, 0]);
                    }
                    Ext::Fragment { offset, more } => {
                        let fo = (offset << 3) | u16::from(*more);
                        out.extend_from_slice(&[nh, 0]);
                        out.extend_from_slice(&fo.to_be_bytes());
                        out.extend_from_slice(&[0, 0, 0, 7]);
                    }
                }
            }
        } else {
            out.push(0x40 | (ihl as u8));
            out.push(0);
            let tl = self
                .ip_len
                .unwrap_or(u16::try_from(total).unwrap_or(u16::MAX));
            out.extend_from_slice(&tl.to_be_bytes());
            out.extend_from_slice(&[0x12, 0x34]);
            out.extend_from_slice(&self.frag.unwrap_or(0x4000).to_be_bytes());
            out.push(self.ttl);
            out.push(proto);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&a.src4);
            out.extend_from_slice(&a.dst4);
            while out.len() - ip_start < l3 {
                out.push(1);
            }
            let c = !fold(sum(&out[ip_start..ip_start + 20.min(l3)], 0));
            out[ip_start + 10..ip_start + 12].copy_from_slice(&c.to_be_bytes());
        }
        let l4_start = out.len();
        match self.kind {
            L4Kind::Tcp => {
                out.extend_from_slice(&a.sport.to_be_bytes());
                out.extend_from_slice(&a.dport.to_be_bytes());
                out.extend_from_slice(&self.seq.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 1]);
                out.push((doff as u8) << 4);
                out.push(self.tcp_flags);
                out.extend_from_slice(&[0xFF, 0xFF, 0, 0, 0, 0]);
                out.truncate(l4_start + l4);
                while out.len() < l4_start + l4 {
                    // Options: an MSS option first when there is room, NOPs after.
                    if out.len() == l4_start + 20 && l4 >= 24 {
                        out.extend_from_slice(&[2, 4, 0x05, 0xB4]);
                    } else {
                        out.push(1);
                    }
                }
            }
            L4Kind::Udp => {
                out.extend_from_slice(&a.sport.to_be_bytes());
                out.extend_from_slice(&a.dport.to_be_bytes());
                let ul = self
                    .udp_len
                    .unwrap_or(u16::try_from(8 + payload).unwrap_or(u16::MAX));
                out.extend_from_slice(&ul.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            L4Kind::Icmp => {
                let t = if self.v6 { 128 } else { 8 };
                out.extend_from_slice(&[t, 0, 0, 0]);
                out.extend_from_slice(&a.sport.to_be_bytes());
                out.extend_from_slice(&[0, 1]);
            }
            L4Kind::Other(_) => {}
        }
        out.extend((0..payload).map(|i| self.fill.wrapping_add(i as u8)));
        // The L4 checksum: correct, partial or given.
        let field = match self.kind {
            L4Kind::Tcp if l4 >= 18 => Some(l4_start + 16),
            L4Kind::Udp => Some(l4_start + 6),
            L4Kind::Icmp => Some(l4_start + 2),
            _ => None,
        };
        if let Some(field) = field {
            let l4_len = (out.len() - l4_start) as u32;
            let pseudo = if self.v6 {
                sum(&a.src6, sum(&a.dst6, u32::from(proto) + l4_len))
            } else {
                sum(&a.src4, sum(&a.dst4, u32::from(proto) + l4_len))
            };
            let pseudo = if matches!(self.kind, L4Kind::Icmp) && !self.v6 {
                0
            } else {
                pseudo
            };
            let c = match self.checksum {
                None => {
                    let c = !fold(sum(&out[l4_start..], pseudo));
                    if c == 0 && matches!(self.kind, L4Kind::Udp) {
                        0xFFFF
                    } else {
                        c
                    }
                }
                Some(None) => fold(pseudo),
                Some(Some(v)) => v,
            };
            out[field..field + 2].copy_from_slice(&c.to_be_bytes());
        }
        if let Some(cut) = self.cut {
            let cut = usize::from(cut);
            if cut < out.len() - ip_start {
                out.truncate(out.len() - cut);
            }
        }
        out.extend_from_slice(&self.tail[..self.tail.len().min(64)]);
    }
}

fn ext_code(e: &Ext) -> u8 {
    match e {
        Ext::HopByHop(_) => 0,
        Ext::Routing(_) => 43,
        Ext::Fragment { .. } => 44,
    }
}

/// A virtio-net header as a packet socket could hand it over: the fields a real sender would set for the
/// frame, or mutated ones.
#[derive(Debug, Arbitrary, Clone, Copy)]
pub struct Vnet {
    pub present: bool,
    pub needs_csum: bool,
    pub gso: GsoChoice,
    pub ecn: bool,
    pub gso_size: SizeChoice,
    pub csum_start: Option<u16>,
    pub csum_offset: Option<u16>,
    pub junk_flags: u8,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum GsoChoice {
    None,
    Tcp4,
    Tcp6,
    Udp4Ufo,
    UdpL4,
    Other(u8),
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum SizeChoice {
    Mss,
    Near(i8),
    Any(u16),
}

impl Vnet {
    /// The 10 header bytes for `frame` (an Ethernet frame whose L4 header starts at `l4`).
    pub fn bytes(&self, l4: usize, l4_csum: usize) -> Option<[u8; 10]> {
        if !self.present {
            return None;
        }
        let mut b = [0u8; 10];
        b[0] = u8::from(self.needs_csum) | (self.junk_flags & 0xFE);
        b[1] = match self.gso {
            GsoChoice::None => 0,
            GsoChoice::Tcp4 => 1,
            GsoChoice::Udp4Ufo => 3,
            GsoChoice::Tcp6 => 4,
            GsoChoice::UdpL4 => 5,
            GsoChoice::Other(x) => x,
        } | if self.ecn { 0x80 } else { 0 };
        let size = match self.gso_size {
            SizeChoice::Mss => 1448,
            SizeChoice::Near(d) => 1448u16.wrapping_add_signed(i16::from(d)),
            SizeChoice::Any(v) => v,
        };
        b[4..6].copy_from_slice(&size.to_ne_bytes());
        let start = self.csum_start.unwrap_or(l4 as u16);
        let offset = self.csum_offset.unwrap_or(l4_csum as u16);
        b[6..8].copy_from_slice(&start.to_ne_bytes());
        b[8..10].copy_from_slice(&offset.to_ne_bytes());
        Some(b)
    }
}
