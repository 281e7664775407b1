//! Shared by the integration tests: a gateway like the seed's, and packets built with etherparse (an
//! implementation independent of ours) the way a Calico node's vxlan device and an outside server send them.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::cast_possible_truncation
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use etherparse::PacketBuilder;
use forwarder_core::conntrack;
use forwarder_core::pipeline::{tunnel_mac, Action, Config, Gateway, UplinkConfig, Worker};
use forwarder_core::ports::PortRange;
use forwarder_core::{Instant, Reason};

pub const GW: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
pub const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 3);
pub const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
pub const NODE_MAC: [u8; 6] = [0x66, 0x0a, 0, 0, 0, 2];
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
pub const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 5);
pub const DMZ_EGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const DMZ_EGRESS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
pub const DMZ_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const INT_EGRESS: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 10);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0x20);
pub const INTERNAL_SERVER: Ipv4Addr = Ipv4Addr::new(10, 50, 1, 20);
pub const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
pub const UPLINK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
pub const VNI: u32 = 4097;
pub const HEADROOM: usize = 64;

pub fn config() -> Config {
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    Config {
        vni: VNI,
        tunnel_ip: GW,
        tunnel_ip6: Some(GW6),
        allowed_nodes: vec![net("172.18.0.0/16")],
        pod_cidrs: vec![net("10.244.0.0/16"), net("fd00:244::/32")],
        tunnel_mtu: 1450,
        uplinks: vec![
            UplinkConfig {
                name: "dmz".into(),
                mtu: 1500,
                egress_v4: vec![DMZ_EGRESS],
                egress_v6: vec![DMZ_EGRESS6],
                next_hop_v4: Some(DMZ_ROUTER),
                next_hop_v6: None,
            },
            UplinkConfig {
                name: "internal".into(),
                mtu: 1500,
                egress_v4: vec![INT_EGRESS],
                egress_v6: vec![],
                next_hop_v4: None,
                next_hop_v6: None,
            },
        ],
        routes: vec![
            (net("0.0.0.0/0"), 0),
            (net("::/0"), 0),
            (net("10.50.0.0/16"), 1),
        ],
        ..Config::default()
    }
}

pub fn gateway_with(ct: conntrack::Config, ports: PortRange) -> Arc<Gateway> {
    Arc::new(Gateway::new(config(), ct, ports).unwrap())
}

pub fn worker() -> Worker {
    Worker::new(
        gateway_with(conntrack::Config::default(), PortRange::default()),
        7,
    )
}

/// VXLAN header + inner frame.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut d = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    d.extend_from_slice(inner);
    d
}

pub fn from_pod() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(POD.octets(), SERVER.octets(), 64)
}

pub fn build(
    step: impl FnOnce(&mut Vec<u8>) -> Result<(), etherparse::err::packet::BuildWriteError>,
) -> Vec<u8> {
    let mut out = Vec::new();
    step(&mut out).unwrap();
    out
}

/// A TCP segment from the pod, in a VXLAN datagram.
pub fn pod_tcp(dst: Ipv4Addr, sport: u16, dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(POD.octets(), dst.octets(), 64);
    let t = b.tcp(sport, dport, 1000, 64240);
    let inner = if syn {
        let t = t
            .syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
            .unwrap();
        build(|o| t.write(o, payload))
    } else {
        build(|o| t.ack(5000).write(o, payload))
    };
    vxlan(VNI, &inner)
}

pub fn pod_udp(dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(POD.octets(), dst.octets(), 64);
    vxlan(VNI, &build(|o| b.udp(sport, dport).write(o, payload)))
}

pub fn pod_udp6(dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b =
        PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv6(POD6.octets(), dst.octets(), 64);
    vxlan(VNI, &build(|o| b.udp(sport, dport).write(o, payload)))
}

pub fn pod_ping(dst: Ipv4Addr, ident: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(POD.octets(), dst.octets(), 64);
    vxlan(
        VNI,
        &build(|o| b.icmpv4_echo_request(ident, 1).write(o, b"abcdefgh")),
    )
}

/// A frame from outside arriving on an uplink.
pub fn outside_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(src.octets(), dst.octets(), 60);
    build(|o| b.udp(sport, dport).write(o, payload))
}

pub fn outside_tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: &str,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(src.octets(), dst.octets(), 60);
    let mut t = b.tcp(sport, dport, seq, 65160);
    if flags.contains('S') {
        t = t.syn();
    }
    if flags.contains('A') {
        t = t.ack(ack);
    }
    if flags.contains('R') {
        t = t.rst();
    }
    if flags.contains('M') {
        t = t
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
            .unwrap();
    }
    build(|o| t.write(o, &[]))
}

/// RFC 1071, byte by byte: the reference the fast code is checked against.
pub fn ref_sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        acc += u32::from(w);
    }
    acc
}

pub fn ref_fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Checks every checksum of the IP packet `ip` (IPv4 or IPv6) with the naive reference. Returns the
/// protocol for convenience.
pub fn assert_checksums(ip: &[u8]) {
    let v6 = ip[0] >> 4 == 6;
    let (l4_off, proto, pseudo) = if v6 {
        let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let mut ps = ref_sum(&ip[8..40], 0);
        ps += plen as u32 + u32::from(ip[6]);
        (40, ip[6], ps)
    } else {
        let hl = usize::from(ip[0] & 0xf) * 4;
        assert_eq!(
            ref_fold(ref_sum(&ip[..hl], 0)),
            0xffff,
            "IPv4 header checksum"
        );
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let mut ps = ref_sum(&ip[12..20], 0);
        ps += (total - hl) as u32 + u32::from(ip[9]);
        (hl, ip[9], ps)
    };
    let end = if v6 {
        40 + u16::from_be_bytes([ip[4], ip[5]]) as usize
    } else {
        u16::from_be_bytes([ip[2], ip[3]]) as usize
    };
    let seg = &ip[l4_off..end];
    match proto {
        6 => assert_eq!(ref_fold(ref_sum(seg, pseudo)), 0xffff, "TCP checksum"),
        17 => {
            let c = u16::from_be_bytes([seg[6], seg[7]]);
            if c != 0 || v6 {
                assert_eq!(ref_fold(ref_sum(seg, pseudo)), 0xffff, "UDP checksum");
            }
        }
        1 => assert_eq!(ref_fold(ref_sum(seg, 0)), 0xffff, "ICMP checksum"),
        58 => assert_eq!(ref_fold(ref_sum(seg, pseudo)), 0xffff, "ICMPv6 checksum"),
        _ => {}
    }
}

pub fn ip4_src(ip: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])
}

pub fn ip4_dst(ip: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])
}

pub fn l4_ports(ip: &[u8]) -> (u16, u16) {
    let hl = if ip[0] >> 4 == 6 {
        40
    } else {
        usize::from(ip[0] & 0xf) * 4
    };
    (
        u16::from_be_bytes([ip[hl], ip[hl + 1]]),
        u16::from_be_bytes([ip[hl + 2], ip[hl + 3]]),
    )
}

pub fn any_ip(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// Recomputes the IPv4 header checksum of the header at the start of `ip` (after a test edited it).
pub fn fix_ipv4_checksum(ip: &mut [u8]) {
    let hl = usize::from(ip[0] & 0xf) * 4;
    ip[10] = 0;
    ip[11] = 0;
    let c = !ref_fold(ref_sum(&ip[..hl], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Splits the IPv4 packet at `frame[l3..]` (no options) into two fragments at `cut` bytes of payload
/// (a multiple of 8), with identification `ident`; each keeps `frame[..l3]` in front.
pub fn ipv4_fragments(frame: &[u8], l3: usize, cut: usize, ident: u16) -> (Vec<u8>, Vec<u8>) {
    let (hdr, body) = frame[l3..].split_at(20);
    let frag = |off: usize, data: &[u8], more: bool| {
        let mut h = hdr.to_vec();
        h[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&ident.to_be_bytes());
        h[6..8].copy_from_slice(&((off / 8) as u16 | if more { 0x2000 } else { 0 }).to_be_bytes());
        fix_ipv4_checksum(&mut h);
        let mut f = frame[..l3].to_vec();
        f.extend_from_slice(&h);
        f.extend_from_slice(data);
        f
    };
    (frag(0, &body[..cut], true), frag(cut, &body[cut..], false))
}

/// An action, owned, so tests can keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Fwd {
        uplink: u8,
        next_hop: IpAddr,
        frame: Vec<u8>,
    },
    Tun {
        node: Ipv4Addr,
        dgram: Vec<u8>,
        segment: Option<usize>,
    },
    Neighbour,
    Drop(Reason),
}

impl Out {
    pub fn fwd(self) -> (u8, IpAddr, Vec<u8>) {
        match self {
            Out::Fwd {
                uplink,
                next_hop,
                frame,
            } => (uplink, next_hop, frame),
            other => panic!("expected a forward, got {other:?}"),
        }
    }
    pub fn tun(self) -> (Ipv4Addr, Vec<u8>) {
        match self {
            Out::Tun {
                node,
                dgram,
                segment: None,
            } => (node, dgram),
            other => panic!("expected a tunnel datagram, got {other:?}"),
        }
    }
}

pub fn owned(a: Action<'_>) -> Out {
    match a {
        Action::Forward {
            uplink,
            next_hop,
            frame,
        } => Out::Fwd {
            uplink,
            next_hop,
            frame: frame.to_vec(),
        },
        Action::ToTunnel {
            node,
            datagram,
            segment,
        } => Out::Tun {
            node,
            dgram: datagram.to_vec(),
            segment,
        },
        Action::Neighbour => Out::Neighbour,
        Action::Drop(r) => Out::Drop(r),
    }
}

/// Asserts that every packet `w` was given is accounted for (`Stats::unaccounted`): every test that goes
/// through [`out_from`], [`out`] or [`inb`] checks it after each packet.
#[track_caller]
pub fn assert_accounted(w: &Worker) {
    let s = w.stats();
    assert_eq!(
        s.unaccounted(),
        0,
        "received {} packets but the outcomes account for another number: {s:?}",
        s.received()
    );
}

pub fn out_from(w: &mut Worker, from: Ipv4Addr, d: &[u8], now: Instant) -> Out {
    let mut buf = vec![0u8; d.len() + 2048];
    buf[..d.len()].copy_from_slice(d);
    let o = owned(w.outbound(from, &mut buf, d.len(), now));
    assert_accounted(w);
    o
}

pub fn out(w: &mut Worker, d: &[u8], now: Instant) -> Out {
    out_from(w, NODE, d, now)
}

pub fn inb(w: &mut Worker, uplink: u8, f: &[u8], now: Instant) -> Out {
    let mut buf = vec![0u8; HEADROOM + f.len() + 2048];
    buf[HEADROOM..HEADROOM + f.len()].copy_from_slice(f);
    let o = owned(w.inbound(uplink, &mut buf, HEADROOM, f.len(), now));
    assert_accounted(w);
    o
}
