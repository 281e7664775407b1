//! What the pipeline needs to know about its surroundings: the tunnel, the pods, the uplinks and routes.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::time::Duration;

use ipnet::IpNet;

use crate::flow::UplinkId;

/// One uplink (the DMZ or an internal VLAN): where translated packets leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// Name for logs and metrics (`dmz`, `internal`).
    pub name: String,
    /// MTU of the link (IP packet size).
    pub mtu: u16,
    /// IPv4 egress addresses; a pod's flows use one of them, chosen by the pod's address.
    pub egress_v4: Vec<Ipv4Addr>,
    /// IPv6 egress addresses.
    pub egress_v6: Vec<Ipv6Addr>,
    /// IPv4 router on the link; `None` when destinations are on-link.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// IPv6 router on the link; `None` when destinations are on-link.
    pub next_hop_v6: Option<Ipv6Addr>,
}

impl UplinkConfig {
    /// The egress address this uplink uses for flows of `pod` towards a destination of `pod`'s family:
    /// always the same one for one pod (stable hash), so a pod keeps its source IP.
    pub fn egress_for(&self, pod: IpAddr) -> Option<IpAddr> {
        fn pick<T: Copy>(list: &[T], h: u64) -> Option<T> {
            let n = u64::try_from(list.len()).ok().filter(|n| *n > 0)?;
            list.get(usize::try_from(h % n).ok()?).copied()
        }
        match pod {
            IpAddr::V4(a) => pick(&self.egress_v4, mix(u64::from(u32::from(a)))).map(IpAddr::V4),
            IpAddr::V6(a) => {
                let v = u128::from(a);
                #[allow(clippy::cast_possible_truncation)] // folding 128 bits into 64 on purpose
                let h = mix((v as u64) ^ ((v >> 64) as u64));
                pick(&self.egress_v6, h).map(IpAddr::V6)
            }
        }
    }

    /// Where to send a packet for `dst` on this link: the router, or `dst` itself when on-link.
    pub fn next_hop(&self, dst: IpAddr) -> IpAddr {
        match dst {
            IpAddr::V4(_) => self.next_hop_v4.map_or(dst, IpAddr::V4),
            IpAddr::V6(_) => self.next_hop_v6.map_or(dst, IpAddr::V6),
        }
    }

    /// Every egress address of the uplink.
    pub fn egress_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.egress_v4
            .iter()
            .map(|a| IpAddr::V4(*a))
            .chain(self.egress_v6.iter().map(|a| IpAddr::V6(*a)))
    }
}

fn mix(mut h: u64) -> u64 {
    h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The gateway's data-plane configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// VXLAN network identifier accepted and sent (Calico: 4097).
    pub vni: u32,
    /// The gateway's address inside the tunnel: the nodes' next hop, and its tunnel MAC is `a2:2a:` + these
    /// four bytes. It is also the underlay address the tunnel socket listens on.
    pub tunnel_ip: Ipv4Addr,
    /// The gateway's IPv6 address inside the tunnel, used as the source of ICMPv6 errors it originates.
    pub tunnel_ip6: Option<Ipv6Addr>,
    /// Underlay CIDRs of the nodes allowed to send VXLAN.
    pub allowed_nodes: Vec<IpNet>,
    /// Inner source CIDRs that may be translated (the pods).
    pub pod_cidrs: Vec<IpNet>,
    /// MTU inside the tunnel (1450 over a 1500-byte underlay).
    pub tunnel_mtu: u16,
    /// The uplinks, indexed by [`UplinkId`].
    pub uplinks: Vec<UplinkConfig>,
    /// Destination prefix → uplink; longest prefix wins.
    pub routes: Vec<(IpNet, UplinkId)>,
    /// Datagrams whose fragments each worker can track at once.
    pub frag_capacity: usize,
    /// How long the later fragments of a datagram may follow its first.
    pub frag_lifetime: Duration,
    /// ICMP errors each worker may originate per second (RFC 4443 §2.4(f), RFC 1812 §4.3.2.8); beyond it
    /// the packet is dropped without an answer and counted in `Stats::icmp_suppressed`.
    pub icmp_rate_per_sec: u32,
    /// Burst of ICMP errors allowed above the rate.
    pub icmp_burst: u32,
    /// Answer a pod's TCP segment that belongs to no flow here and cannot open one (not a SYN; not itself a
    /// reset) with a TCP reset (RFC 9293 §3.10.7.1), so the pod's connection fails at once instead of
    /// retransmitting into silence: what a connection through a replica that died, or whose state was lost,
    /// sees. Rate-limited with the ICMP errors; otherwise the segment is only dropped. Counted under
    /// `tcp_no_syn_for_new_flow` either way.
    pub reset_unknown_tcp: bool,
    /// Key of the flow table's hash. Set it from the OS's randomness (the core reads none) so that pods
    /// cannot aim many flows at one bucket; `None` lets the table derive a weak key from its address.
    pub hash_seed: Option<u64>,
    /// The local ports (and ICMP echo identifiers) the gateway's prober of outside targets sends from,
    /// outside the NAT's port range: an inbound packet to one of them that matches no flow is that
    /// prober's answer, counted as [`Reason::ProbeAnswer`](crate::reason::Reason::ProbeAnswer) rather than
    /// as unsolicited. `None` without probes.
    pub probe_ports: Option<core::ops::RangeInclusive<u16>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vni: 4097,
            tunnel_ip: Ipv4Addr::UNSPECIFIED,
            tunnel_ip6: None,
            allowed_nodes: Vec::new(),
            pod_cidrs: Vec::new(),
            tunnel_mtu: 1450,
            uplinks: Vec::new(),
            routes: Vec::new(),
            frag_capacity: 4096,
            frag_lifetime: Duration::from_secs(30),
            hash_seed: None,
            reset_unknown_tcp: true,
            probe_ports: None,
            icmp_rate_per_sec: 1000,
            icmp_burst: 50,
        }
    }
}

/// A configuration the pipeline cannot run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A route names an uplink that does not exist.
    UnknownUplink {
        /// The route's prefix.
        prefix: IpNet,
        /// The uplink index it names.
        uplink: UplinkId,
    },
    /// The same prefix is routed twice.
    DuplicateRoute(IpNet),
    /// More uplinks than an [`UplinkId`] can number.
    TooManyUplinks(usize),
    /// An uplink routes a family for which it has no egress address.
    NoEgressAddress {
        /// The uplink's name.
        uplink: String,
        /// The prefix routed to it.
        prefix: IpNet,
    },
    /// An egress address appears on two uplinks.
    DuplicateEgressAddress(IpAddr),
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::UnknownUplink { prefix, uplink } => {
                write!(
                    f,
                    "route {prefix} names uplink #{uplink}, which does not exist"
                )
            }
            ConfigError::DuplicateRoute(p) => write!(f, "route {p} is listed more than once"),
            ConfigError::TooManyUplinks(n) => {
                write!(f, "{n} uplinks configured; at most 256 are supported")
            }
            ConfigError::NoEgressAddress { uplink, prefix } => write!(
                f,
                "uplink {uplink} carries route {prefix} but has no egress address of that family"
            ),
            ConfigError::DuplicateEgressAddress(a) => {
                write!(
                    f,
                    "egress address {a} is configured on more than one uplink"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}
