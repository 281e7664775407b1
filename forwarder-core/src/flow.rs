//! Flow identity: the 5-tuple as the conntrack table, the port allocator and the NAT rewrite see it.

use core::net::IpAddr;

/// Transport protocols the gateway translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
    /// ICMP query (echo) for IPv4, protocol 1: the identifier plays the role of both ports.
    Icmp,
    /// ICMPv6 query (echo), next header 58: the identifier plays the role of both ports.
    Icmpv6,
}

impl Proto {
    /// The IP protocol / IPv6 next-header number.
    pub const fn ip_number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Icmpv6 => 58,
        }
    }

    /// Protocol for an IP protocol number, if the gateway translates it.
    pub const fn from_ip_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            1 => Some(Proto::Icmp),
            58 => Some(Proto::Icmpv6),
            _ => None,
        }
    }

    /// Dense index 0..4, for per-protocol arrays.
    pub const fn index(self) -> usize {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
            Proto::Icmp => 2,
            Proto::Icmpv6 => 3,
        }
    }
}

/// A directional 5-tuple. For ICMP queries `src_port` and `dst_port` both hold the echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (ICMP: identifier).
    pub src_port: u16,
    /// Destination port (ICMP: identifier).
    pub dst_port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl FlowKey {
    /// A placeholder key (unspecified addresses, ports 0, UDP); matches no flow.
    pub const EMPTY: FlowKey = FlowKey {
        src: IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(core::net::Ipv4Addr::UNSPECIFIED),
        src_port: 0,
        dst_port: 0,
        proto: Proto::Udp,
    };

    /// The same tuple seen from the other end.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }
}

/// Where a flow's replies go back to: the client node's underlay IPv4 address and the MAC address of its
/// `vxlan` device (the inner source MAC of the frames it sent), learnt when the flow started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    /// The node's underlay (outer) IPv4 address.
    pub ip: core::net::Ipv4Addr,
    /// The node's VXLAN-device MAC address.
    pub mac: [u8; 6],
}

/// Index of an uplink in the gateway's configuration (0-based).
pub type UplinkId = u8;
