//! Why a packet was dropped.
//!
//! Every drop in the core is a [`Reason`]: a small `Copy` value that the caller counts (one counter per
//! reason, see [`Reason::ALL`] and [`Reason::name`]). Drops are never logged per packet.

macro_rules! reasons {
    ($( $(#[doc = $doc:literal])* $variant:ident => $name:literal, )*) => {
        /// Why a packet was dropped. Each variant has a stable snake_case [`name`](Reason::name) used as the
        /// `reason` label of the drop counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Reason {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Reason {
            /// Every reason, in declaration order (index with [`Reason::index`]).
            pub const ALL: &'static [Reason] = &[ $( Reason::$variant, )* ];

            /// Number of reasons.
            pub const COUNT: usize = Reason::ALL.len();

            /// Stable snake_case name, used as a metric label and in documentation.
            pub const fn name(self) -> &'static str {
                match self { $( Reason::$variant => $name, )* }
            }

            /// Position of this reason in [`Reason::ALL`]; handy for a per-reason counter array.
            pub const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

reasons! {
    // ---- wire: malformed or unsupported bytes --------------------------------------------------------
    /// Shorter than an Ethernet header.
    EthernetTruncated => "ethernet_truncated",
    /// EtherType is neither IPv4, IPv6 nor ARP.
    UnsupportedEtherType => "unsupported_ethertype",
    /// ARP packet too short or not Ethernet/IPv4 ARP.
    ArpMalformed => "arp_malformed",
    /// Shorter than an IPv4 header, or than its own header length.
    Ipv4Truncated => "ipv4_truncated",
    /// IPv4 version field is not 4.
    Ipv4BadVersion => "ipv4_bad_version",
    /// IPv4 IHL below 5.
    Ipv4BadHeaderLen => "ipv4_bad_header_len",
    /// IPv4 total length smaller than the header or larger than the buffer.
    Ipv4BadTotalLen => "ipv4_bad_total_len",
    /// IPv4 header checksum does not verify.
    Ipv4BadChecksum => "ipv4_bad_checksum",
    /// Shorter than an IPv6 header.
    Ipv6Truncated => "ipv6_truncated",
    /// IPv6 version field is not 6.
    Ipv6BadVersion => "ipv6_bad_version",
    /// IPv6 payload length larger than the buffer.
    Ipv6BadPayloadLen => "ipv6_bad_payload_len",
    /// An IPv6 extension header runs past the end of the packet or is malformed.
    Ipv6BadExtensionHeader => "ipv6_bad_extension_header",
    /// More IPv6 extension headers than the gateway walks.
    Ipv6TooManyExtensionHeaders => "ipv6_too_many_extension_headers",
    /// UDP datagram shorter than its header.
    UdpTruncated => "udp_truncated",
    /// UDP length field disagrees with the IP payload length.
    UdpBadLength => "udp_bad_length",
    /// UDP checksum does not verify.
    UdpBadChecksum => "udp_bad_checksum",
    /// TCP segment shorter than its header.
    TcpTruncated => "tcp_truncated",
    /// TCP data offset below 5 or past the segment end.
    TcpBadHeaderLen => "tcp_bad_header_len",
    /// TCP options are malformed.
    TcpBadOptions => "tcp_bad_options",
    /// ICMP / ICMPv6 message shorter than its header.
    IcmpTruncated => "icmp_truncated",
    /// ICMP / ICMPv6 checksum does not verify.
    IcmpBadChecksum => "icmp_bad_checksum",
    /// VXLAN header missing or truncated.
    VxlanTruncated => "vxlan_truncated",
    /// VXLAN I flag not set (RFC 7348: the VNI is not valid).
    VxlanBadFlags => "vxlan_bad_flags",

    // ---- security: who may send what -----------------------------------------------------------------
    /// VXLAN datagram from an underlay address outside the allowed node CIDRs.
    VxlanSourceNotAllowed => "vxlan_source_not_allowed",
    /// VXLAN datagram with a VNI other than the configured one.
    VxlanWrongVni => "vxlan_wrong_vni",
    /// Inner source address outside the pod CIDRs (no open relay).
    InnerSourceNotAllowed => "inner_source_not_allowed",
    /// Source or destination is multicast, broadcast, loopback, unspecified or otherwise never forwarded.
    MartianAddress => "martian_address",
    /// Frame on the tunnel not addressed to the gateway's tunnel MAC or to broadcast.
    NotForUs => "not_for_us",
    /// IP protocol the gateway does not translate (not TCP, UDP, ICMP query or ICMP error).
    UnsupportedProtocol => "unsupported_protocol",
    /// ICMP message type the gateway neither translates nor answers.
    UnsupportedIcmpType => "unsupported_icmp_type",
    /// No uplink route for the destination.
    NoRoute => "no_route",
    /// Reply for a flow that arrived on another uplink than the flow left by (spoofing from another VLAN).
    WrongUplink => "wrong_uplink",
    /// Packet of an existing flow sent by another node than the one that opened it (spoofed pod source).
    FlowNodeMismatch => "flow_node_mismatch",
    /// ICMP error whose quoted packet was not sent to the error's sender (an error about someone else's flow).
    IcmpErrorNotFromPeer => "icmp_error_not_from_peer",
    /// TCP fragment with offset 8 bytes, which can overwrite the TCP header (RFC 1858 tiny fragment attack).
    TinyFragment => "tiny_fragment",

    // ---- state: flows, ports and fragments -----------------------------------------------------------
    /// Inbound packet that matches no translated flow (unsolicited); no state is created.
    NoFlow => "no_flow",
    /// Answer to the gateway's own probe of an outside target (to a port of the probe range, no flow): read
    /// by the prober through its own socket, dropped by the data plane.
    ProbeAnswer => "probe_answer",
    /// ICMP error whose embedded packet matches no translated flow.
    IcmpErrorNoFlow => "icmp_error_no_flow",
    /// ICMP error whose embedded packet is truncated or malformed.
    IcmpErrorMalformed => "icmp_error_malformed",
    /// The connection-tracking table is full; the new flow was refused.
    ConntrackFull => "conntrack_full",
    /// The source pod already holds its quota of flows.
    SourceQuotaExceeded => "source_quota_exceeded",
    /// No free external port for the egress IP and protocol.
    PortsExhausted => "ports_exhausted",
    /// New flow refused while the gateway drains.
    Draining => "draining",
    /// TCP segment that cannot open a flow (not a SYN) and matches none.
    TcpNoSynForNewFlow => "tcp_no_syn_for_new_flow",
    /// TCP RST (or other segment the flow's state refuses) outside the receive window: the flow is kept.
    TcpOutOfWindow => "tcp_out_of_window",
    /// Non-first fragment whose datagram's first fragment was never seen (and none could be held).
    FragmentNoFlow => "fragment_no_flow",
    /// Packet with TTL / hop limit of 0 or 1 and no ICMP answer possible (e.g. it was itself an ICMP error).
    TtlExpired => "ttl_expired",
    /// Packet larger than the next link's MTU: with DF set (answered with ICMP where allowed), or without DF
    /// where the gateway does not fragment (IP options; towards an uplink).
    TooBig => "too_big",
    /// Buffer has no headroom / tailroom for the header the action needs.
    NoBufferRoom => "no_buffer_room",
}

impl core::fmt::Display for Reason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_snake_case_and_indexed() {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(seen.insert(r.name()), "duplicate name {}", r.name());
            assert!(r
                .name()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
        assert_eq!(Reason::COUNT, Reason::ALL.len());
    }

    #[test]
    fn every_reason_is_documented_for_operators() {
        let doc = include_str!("../../docs/drop-reasons.md");
        for r in Reason::ALL {
            assert!(
                doc.contains(&format!("| `{}` |", r.name())),
                "docs/drop-reasons.md lacks {}",
                r.name()
            );
        }
    }
}
