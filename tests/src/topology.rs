//! The standard namespace topology: client nodes with Calico-style pods and the node's kernel `vxlan`
//! device programmed as Felix does it, gateway pods on an underlay bridge, a DMZ router with outside
//! servers and an internal network. See `docs/harness.md` for the picture.
//!
//! Addresses (n = node number from 1, m = pod number on its node from 1, k = gateway number from 1):
//!
//! | what | address |
//! |---|---|
//! | underlay bridge (namespace `-ul`), its "router" | 172.18.0.1/16 |
//! | node n `eth0` | 172.18.0.(10+n)/16 |
//! | gateway k `eth0` (its pod IP, the tunnel's next hop) | 172.18.0.(2+k)/16 |
//! | pod (n, m) `eth0` | 10.244.n.m/32 |
//! | gateway k egress IPs: DMZ / internal | 203.0.113.(9+k) / 10.50.0.(9+k) |
//! | DMZ router (`-dmz`) | 203.0.113.1/24, 198.51.100.1/24, 192.0.2.1/24 |
//! | outside servers red / blue | 198.51.100.10/24 / 192.0.2.10/24 |
//! | internal server (`-int`) | 10.50.0.20/16 |
//!
//! With `node_agent` ([`TopologySpec::node_agent`]) the nodes are bare (no vxlan device, rules or tables: the
//! node agent under test makes them) and the nodes route unsteered traffic themselves, masquerading pods:
//!
//! | what | address |
//! |---|---|
//! | underlay ↔ DMZ router link (`todmz` / `toul`) | 172.31.255.1/30 ↔ 172.31.255.2/30 |
//! | the "local" network's router (in the underlay namespace, `tolocal`) | 172.16.1.1/24 |
//! | the local host (`-local`, on-premises, reached without a gateway) | 172.16.1.10/24 |
//!
//! With `ipv6` (the default) the inner networks are dual-stack; the underlay and the tunnel stay IPv4:
//!
//! | what | address |
//! |---|---|
//! | pod (n, m) | fd00:244:n::m/128, default via fe80::ecee:eeff:feee:eeee (the node's `cali…`, MAC ee:ee:ee:ee:ee:ee) |
//! | node → gateway k next hop | the link-local of the gateway's tunnel MAC (EUI-64 of `a2:2a:…`), static neighbour |
//! | gateway k egress IPs: DMZ / internal | 2001:db8:113::(10+k−1) / fd00:50::(10+k−1) |
//! | DMZ router | 2001:db8:113::1/64, 2001:db8:100::1/64, 2001:db8:2::1/64 |
//! | outside servers red / blue | 2001:db8:100::10/64 / 2001:db8:2::10/64 |
//! | internal server | fd00:50::20/64 |

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::error::{Context, Error, Result};
use crate::gateway::{Gateway, GatewayMode};
use crate::netns::{self, Netns};
use crate::process::{Process, TempDir};

/// The tunnel's VXLAN network identifier (Calico's egress gateway VNI).
pub const VNI: u32 = 4097;
/// The tunnel's UDP port.
pub const VXLAN_PORT: u16 = 4790;
/// MTU of the vxlan devices (1500 underlay − 50 bytes of VXLAN over IPv4).
pub const TUNNEL_MTU: u32 = 1450;
/// Name of the node's vxlan device, as Felix names it.
pub const NODE_VXLAN_DEV: &str = "egress.calico";
/// The underlay network.
pub const UNDERLAY: Ipv4Net = net(172, 18, 0, 0, 16);
/// Where pods live.
pub const POD_CIDR: Ipv4Net = net(10, 244, 0, 0, 16);
/// The internal network behind the gateways' `gwint` uplinks.
pub const INTERNAL_NET: Ipv4Net = net(10, 50, 0, 0, 16);
/// The DMZ segment between the gateways' `gwdmz` uplinks and the DMZ router.
pub const DMZ_NET: Ipv4Net = net(203, 0, 113, 0, 24);
/// The DMZ router's address on the DMZ segment.
pub const DMZ_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The "red" outside server (behind the DMZ router).
pub const RED_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The "blue" outside server (behind the DMZ router).
pub const BLUE_SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The server on the internal network (on-link from the gateways).
pub const INTERNAL_SERVER: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 20);
/// The on-premises ("local") network reached from nodes without a gateway (node-agent topologies).
pub const LOCAL_NET: Ipv4Net = net(172, 16, 1, 0, 24);
/// The host on the local network.
pub const LOCAL_SERVER: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 10);
/// The underlay namespace's address on the local network (the local host's router).
pub const LOCAL_ROUTER: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 1);
/// The underlay's end of its link to the DMZ router (node-agent topologies).
pub const TRANSIT_UNDERLAY: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 1);
/// The DMZ router's end of its link to the underlay (node-agent topologies).
pub const TRANSIT_DMZ: Ipv4Addr = Ipv4Addr::new(172, 31, 255, 2);
/// The red server's network.
pub const RED_NET: Ipv4Net = net(198, 51, 100, 0, 24);
/// The blue server's network.
pub const BLUE_NET: Ipv4Net = net(192, 0, 2, 0, 24);
/// Where pods live (IPv6).
pub const POD_CIDR6: Ipv6Net = net6([0xfd00, 0x244, 0, 0, 0, 0, 0, 0], 32);
/// The internal network (IPv6).
pub const INTERNAL_NET6: Ipv6Net = net6([0xfd00, 0x50, 0, 0, 0, 0, 0, 0], 64);
/// The DMZ segment (IPv6).
pub const DMZ_NET6: Ipv6Net = net6([0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0], 64);
/// The DMZ router on the DMZ segment (IPv6).
pub const DMZ_ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 1);
/// The red server's network (IPv6).
pub const RED_NET6: Ipv6Net = net6([0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0], 64);
/// The red server (IPv6).
pub const RED_SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
/// The blue server's network (IPv6).
pub const BLUE_NET6: Ipv6Net = net6([0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 0], 64);
/// The blue server (IPv6).
pub const BLUE_SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x2, 0, 0, 0, 0, 0x10);
/// The internal server (IPv6).
pub const INTERNAL_SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x20);
/// The link-local address pods use as their IPv6 default gateway (Calico's, on every `cali…`).
pub const CALICO_LINK_LOCAL: Ipv6Addr =
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The MAC Calico gives the node side of every pod veth.
pub const CALICO_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// First route table used for pods on a node (pod m uses `POD_TABLE_BASE + m`).
pub const POD_TABLE_BASE: u32 = 200;
/// Priority of the per-pod `ip rule` (Felix's default).
pub const POD_RULE_PRIORITY: u32 = 100;

const fn net6(s: [u16; 8], len: u8) -> Ipv6Net {
    let a = Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
    match Ipv6Net::new(a, len) {
        Ok(n) => n,
        Err(_) => panic!("bad prefix length"),
    }
}

const fn net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len) {
        Ok(n) => n,
        Err(_) => panic!("bad prefix length"),
    }
}

/// One route of a pod's egress table: traffic to `dst` goes to these gateways (numbers from 1); none
/// means `throw` (normal routing); several form an ECMP multipath route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// Destination prefix (IPv4 or IPv6).
    pub dst: IpNet,
    /// Gateway numbers (1-based); empty = throw.
    pub gateways: Vec<usize>,
}

impl PodRoute {
    /// `dst` through the given gateways.
    pub fn via(dst: impl Into<IpNet>, gateways: &[usize]) -> Self {
        Self {
            dst: dst.into(),
            gateways: gateways.to_vec(),
        }
    }

    /// `dst` routed normally (a `throw` route).
    pub fn throw(dst: impl Into<IpNet>) -> Self {
        Self {
            dst: dst.into(),
            gateways: Vec::new(),
        }
    }
}

/// A client pod: `None` routes means the pod does not use egress gateways (no ip rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's egress table, or `None` for a pod that is not opted in.
    pub routes: Option<Vec<PodRoute>>,
}

impl PodSpec {
    /// A pod whose whole egress (0.0.0.0/0 and ::/0) goes through these gateways.
    pub fn via(gateways: &[usize]) -> Self {
        Self {
            routes: Some(vec![
                PodRoute::via(Ipv4Net::default(), gateways),
                PodRoute::via(Ipv6Net::default(), gateways),
            ]),
        }
    }

    /// A pod with this egress table.
    pub fn routes(routes: Vec<PodRoute>) -> Self {
        Self {
            routes: Some(routes),
        }
    }

    /// A pod that does not use egress gateways.
    pub fn plain() -> Self {
        Self { routes: None }
    }
}

/// A client node and its pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Pods on this node (pod m is `pods[m-1]`).
    pub pods: Vec<PodSpec>,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct TopologySpec {
    /// Client nodes (node n is `nodes[n-1]`).
    pub nodes: Vec<NodeSpec>,
    /// Gateway pods and their mode (gateway k is `gateways[k-1]`).
    pub gateways: Vec<GatewayMode>,
    /// MTU of the pods' `eth0` (Calico sets the VXLAN MTU, 1450, on pods of a VXLAN cluster).
    pub pod_mtu: u32,
    /// `workers:` in the userspace gateway's configuration (0 = one per core).
    pub workers: usize,
    /// Dual-stack inner networks (pods, DMZ, servers, internal network; kernel-mode gateways). The
    /// underlay and the tunnel stay IPv4. IPv6 routes of pods are skipped when this is off.
    pub ipv6: bool,
    /// Nodes for a node agent: `eth0` and the pods' veths and routes only — no vxlan device, neighbours,
    /// FDB entries, ip rules or pod tables (the agent makes those; pods must be [`PodSpec::plain`], gateways
    /// userspace). Also node routing for unsteered traffic: the underlay namespace routes to the DMZ
    /// router's outside networks and to the local network (172.16.1.0/24, host 172.16.1.10), and each node
    /// masquerades pod traffic leaving `eth0` for non-cluster destinations (Calico's natOutgoing).
    pub node_agent: bool,
    /// External port range `(min, max)` of the gateways' DMZ egress IP (default: the gateway's own,
    /// 1024..=65535 in userspace mode, the kernel's choice in kernel mode): `ports:` in the userspace
    /// configuration; TCP and UDP SNAT `--to-source IP:min-max` on the DMZ uplink in kernel mode.
    pub ports: Option<(u16, u16)>,
    /// `conntrack.max_per_source` of the userspace gateways (default: the gateway's own, 16384); nothing in
    /// kernel mode.
    pub max_per_source: Option<u32>,
    /// More `conntrack.*` keys of the userspace gateways, as written (`("udp_timeout", "120s")`); nothing
    /// in kernel mode.
    pub conntrack: Vec<(String, String)>,
    /// Gateway sets that sync their flows (`sync:` in the userspace configuration), each a list of gateway
    /// numbers; gateway k is ordinal k − 1, and every member lists the others as peers, with one shared key
    /// (`sync.key` in the topology's directory).
    pub sync_sets: Vec<Vec<usize>>,
    /// The sync peers are given by DNS name (`gw<k>.sync.test`), which each gateway's namespace maps to the
    /// peers' addresses in its own `/etc/hosts` ([`Netns::set_hosts`](crate::netns::Netns::set_hosts)), as
    /// a StatefulSet's pods name each other under its headless Service.
    pub sync_by_name: bool,
}

impl TopologySpec {
    /// The seed scenario: node 1 with two pods, node 2 with one pod, all of them sending everything
    /// through one gateway in `mode`.
    pub fn standard(mode: GatewayMode) -> Self {
        Self {
            nodes: vec![
                NodeSpec {
                    pods: vec![PodSpec::via(&[1]), PodSpec::via(&[1])],
                },
                NodeSpec {
                    pods: vec![PodSpec::via(&[1])],
                },
            ],
            gateways: vec![mode],
            pod_mtu: TUNNEL_MTU,
            workers: 0,
            ipv6: true,
            node_agent: false,
            ports: None,
            max_per_source: None,
            conntrack: Vec::new(),
            sync_sets: Vec::new(),
            sync_by_name: false,
        }
    }

    /// A topology for the node agent ([`node_agent`](Self::node_agent)): node n with `pods[n-1]` plain pods,
    /// these gateways, dual-stack.
    pub fn node_agent(pods: &[usize], gateways: Vec<GatewayMode>) -> Self {
        Self {
            nodes: pods
                .iter()
                .map(|&count| NodeSpec {
                    pods: vec![PodSpec::plain(); count],
                })
                .collect(),
            gateways,
            node_agent: true,
            ports: None,
            ..Self::standard(GatewayMode::Kernel)
        }
    }
}

/// A client node namespace.
#[derive(Debug)]
pub struct Node {
    /// Its namespace.
    pub ns: Netns,
    /// Node number (from 1).
    pub number: usize,
    /// Underlay address of `eth0`.
    pub ip: Ipv4Addr,
    /// MAC of its `egress.calico` vxlan device (chosen by the kernel, as on a Calico node); empty on a
    /// node-agent topology until [`Topology::felix_tunnel`] (the agent's device is its own).
    pub vxlan_mac: String,
}

/// A client pod namespace.
#[derive(Debug)]
pub struct Pod {
    /// Its namespace.
    pub ns: Netns,
    /// Its node's number.
    pub node: usize,
    /// Pod number on its node (from 1).
    pub number: usize,
    /// Its address (`eth0`, /32).
    pub ip: Ipv4Addr,
    /// Its IPv6 address (/128) when the topology is dual-stack.
    pub ip6: Option<Ipv6Addr>,
    /// The node-side veth (`cali…`).
    pub cali: String,
    /// Its egress table on the node, when opted in.
    pub table: Option<u32>,
}

/// A namespace with one address (outside and internal servers, the DMZ router).
#[derive(Debug)]
pub struct Host {
    /// Its namespace.
    pub ns: Netns,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address when the topology is dual-stack.
    pub ip6: Option<Ipv6Addr>,
}

/// The built topology; dropping it stops the gateways' processes and deletes every namespace.
#[derive(Debug)]
pub struct Topology {
    // Field order is drop order: processes (in gateways) first, the log directory last.
    gateways: Vec<Gateway>,
    pods: Vec<Pod>,
    nodes: Vec<Node>,
    red: Host,
    blue: Host,
    internal: Host,
    local: Option<Host>,
    dmz: Host,
    underlay: Netns,
    prefix: String,
    spec: TopologySpec,
    spawned: std::sync::atomic::AtomicUsize,
    dir: TempDir,
}

impl Topology {
    /// Builds the seed scenario ([`TopologySpec::standard`]) with one gateway in `mode`.
    pub fn standard(mode: GatewayMode) -> Result<Self> {
        Self::build(TopologySpec::standard(mode))
    }

    /// Builds `spec` under a fresh unique prefix. Everything made so far is removed if a step fails.
    pub fn build(spec: TopologySpec) -> Result<Self> {
        if spec.nodes.is_empty() || spec.nodes.len() > 200 {
            crate::bail!("1 to 200 nodes, not {}", spec.nodes.len());
        }
        if spec.gateways.is_empty() || spec.gateways.len() > 7 {
            crate::bail!("1 to 7 gateways, not {}", spec.gateways.len());
        }
        if spec.node_agent {
            if spec.gateways.contains(&GatewayMode::Kernel) {
                crate::bail!("node_agent topologies need userspace gateways: a kernel-mode gateway needs the nodes' vxlan MACs, which the agent makes later");
            }
            if spec
                .nodes
                .iter()
                .flat_map(|n| &n.pods)
                .any(|p| p.routes.is_some())
            {
                crate::bail!(
                    "with node_agent the agent programs the pods' tables: use PodSpec::plain()"
                );
            }
        }
        let prefix = netns::unique_prefix();
        let dir = TempDir::new(&prefix)?;
        let ns = |role: &str| Netns::new(&format!("{prefix}-{role}"));

        // Underlay: a bridge with the "underlay router" address (the nodes' default route).
        let underlay = ns("ul")?;
        bridge_without_netfilter(&underlay);
        underlay.ip(&format!(
            "link add br0 address {} type bridge",
            BRIDGE_MAC[0]
        ))?;
        underlay.ip("addr add 172.18.0.1/16 dev br0")?;
        underlay.ip("link set br0 up")?;

        let v6 = spec.ipv6;
        let dmz = build_dmz(
            Host {
                ns: ns("dmz")?,
                ip: DMZ_ROUTER,
                ip6: v6.then_some(DMZ_ROUTER6),
            },
            v6,
        )?;
        let red = outside_server(
            ns("red")?,
            &dmz,
            "red",
            (RED_SERVER, RED_NET),
            (RED_SERVER6, RED_NET6),
            v6,
        )?;
        let blue = outside_server(
            ns("blue")?,
            &dmz,
            "blue",
            (BLUE_SERVER, BLUE_NET),
            (BLUE_SERVER6, BLUE_NET6),
            v6,
        )?;
        let internal = Host {
            ns: ns("int")?,
            ip: INTERNAL_SERVER,
            ip6: v6.then_some(INTERNAL_SERVER6),
        };
        bridge_without_netfilter(&internal.ns);
        no_dad(&internal.ns)?;
        internal.ns.ip(&format!(
            "link add br0 address {} type bridge",
            BRIDGE_MAC[1]
        ))?;
        internal
            .ns
            .ip(&format!("addr add {INTERNAL_SERVER}/16 dev br0"))?;
        if v6 {
            internal.ns.ip(&format!(
                "-6 addr add {INTERNAL_SERVER6}/{} dev br0 nodad",
                INTERNAL_NET6.prefix_len()
            ))?;
        }
        internal.ns.ip("link set br0 up")?;
        let local = if spec.node_agent {
            Some(node_routing(&underlay, &dmz, ns("local")?)?)
        } else {
            None
        };

        let mut nodes = Vec::new();
        let mut pods = Vec::new();
        for (i, node_spec) in spec.nodes.iter().enumerate() {
            let n = i + 1;
            let node = build_node(ns(&format!("node{n}"))?, n, &underlay, &spec)?;
            for (j, pod_spec) in node_spec.pods.iter().enumerate() {
                let m = j + 1;
                let pod = build_pod(ns(&format!("n{n}p{m}"))?, &node, m, pod_spec, &spec)?;
                pods.push(pod);
            }
            nodes.push(node);
        }

        let mut topo = Self {
            gateways: Vec::new(),
            pods,
            nodes,
            red,
            blue,
            internal,
            local,
            dmz,
            underlay,
            prefix,
            spec,
            spawned: std::sync::atomic::AtomicUsize::new(0),
            dir,
        };
        for k in 1..=topo.spec.gateways.len() {
            let mode = topo.spec.gateways[k - 1].clone();
            let gw = topo.build_gateway(k, mode)?;
            topo.gateways.push(gw);
        }
        Ok(topo)
    }

    /// The unique prefix of every namespace of this topology (`eg<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of all namespaces of this topology.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![
            self.underlay.name().to_owned(),
            self.dmz.ns.name().to_owned(),
            self.red.ns.name().to_owned(),
            self.blue.ns.name().to_owned(),
            self.internal.ns.name().to_owned(),
        ];
        v.extend(self.local.iter().map(|h| h.ns.name().to_owned()));
        v.extend(self.nodes.iter().map(|n| n.ns.name().to_owned()));
        v.extend(self.pods.iter().map(|p| p.ns.name().to_owned()));
        v.extend(self.gateways.iter().map(|g| g.ns.name().to_owned()));
        v
    }

    /// Directory for logs and configuration files (removed with the topology unless a test failed or
    /// `EGRESS_KEEP_LOGS=1`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Spawns `command` (program and arguments) inside `ns`, its output in this topology's log directory
    /// (`<program>-<ns>-<n>.log`); the returned guard kills it on drop. Drop it before the topology.
    pub fn spawn(&self, ns: &Netns, command: &[&str]) -> Result<Process> {
        let n = self
            .spawned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let program = command
            .first()
            .and_then(|p| Path::new(p).file_name())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let role = ns.name().rsplit('-').next().unwrap_or("ns");
        ns.spawn(
            command,
            self.dir().join(format!("{program}-{role}-{n}.log")),
        )
    }

    /// Node `n` (from 1).
    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Pod `m` on node `n` (both from 1).
    pub fn pod(&self, n: usize, m: usize) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.node == n && p.number == m)
            .unwrap_or_else(|| panic!("no pod {m} on node {n}"))
    }

    /// All pods.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Gateway `k` (from 1). Panics if there is none (also after a failed [`set_gateway_mode`](Self::set_gateway_mode)).
    pub fn gateway(&self, k: usize) -> &Gateway {
        self.gateways
            .iter()
            .find(|g| g.number == k)
            .unwrap_or_else(|| panic!("no gateway {k}"))
    }

    /// Gateway `k`, mutably (to stop or signal its process).
    pub fn gateway_mut(&mut self, k: usize) -> &mut Gateway {
        self.gateways
            .iter_mut()
            .find(|g| g.number == k)
            .unwrap_or_else(|| panic!("no gateway {k}"))
    }

    /// All gateways.
    pub fn gateways(&self) -> &[Gateway] {
        &self.gateways
    }

    /// The red outside server (198.51.100.10, behind the DMZ router).
    pub fn red(&self) -> &Host {
        &self.red
    }

    /// The blue outside server (192.0.2.10, behind the DMZ router).
    pub fn blue(&self) -> &Host {
        &self.blue
    }

    /// The internal server (10.50.0.20, on-link on the internal network).
    pub fn internal(&self) -> &Host {
        &self.internal
    }

    /// The local host (172.16.1.10, reached from nodes without a gateway). Only node-agent topologies
    /// ([`TopologySpec::node_agent`]) have it; panics otherwise.
    pub fn local(&self) -> &Host {
        self.local
            .as_ref()
            .expect("only node_agent topologies have the local host")
    }

    /// The DMZ router.
    pub fn dmz_router(&self) -> &Host {
        &self.dmz
    }

    /// The underlay namespace (bridge `br0`).
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// The spec this topology was built from (with the gateways' current modes).
    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// Switches gateway `k` to `mode`: its namespace is rebuilt identically (same names, addresses and
    /// MACs, so the nodes' neighbour and FDB entries stay valid) and configured for the new mode; the
    /// rest of the topology is untouched. For userspace mode, wait with [`Gateway::wait_ready`].
    pub fn set_gateway_mode(&mut self, k: usize, mode: GatewayMode) -> Result<()> {
        if k == 0 || k > self.spec.gateways.len() {
            crate::bail!("no gateway {k}");
        }
        // Drop the old one first: its process, its namespace and with it its veths. If building the new
        // one fails, gateway k is absent until a later call succeeds.
        if let Some(i) = self.gateways.iter().position(|g| g.number == k) {
            let mut old = self.gateways.remove(i);
            old.stop_process();
            // Deleting a namespace dismantles it asynchronously: remove its links now so that the
            // peers' names (gw<k> on the bridges) are free for the new gateway.
            for dev in ["eth0", "gwdmz", "gwint"] {
                let _ = old.ns.ip(&format!("link del {dev}"));
            }
            drop(old);
        }
        for ns in [&self.underlay, &self.dmz.ns, &self.internal.ns] {
            let _ = ns.ip(&format!("link del gw{k}"));
        }
        self.spec.gateways[k - 1] = mode.clone();
        let gw = self.build_gateway(k, mode)?;
        let at = self.gateways.partition_point(|g| g.number < k);
        self.gateways.insert(at, gw);
        Ok(())
    }

    /// Replaces the sync sets ([`TopologySpec::sync_sets`]). Running gateways are not touched: the
    /// change takes effect for a gateway when its configuration is next written, i.e. on
    /// [`set_gateway_mode`](Self::set_gateway_mode).
    pub fn set_sync_sets(&mut self, sets: Vec<Vec<usize>>) {
        self.spec.sync_sets = sets;
    }

    /// Replaces the egress table of pod (n, m) on its node (the pod becomes opted in if it was not).
    pub fn set_pod_routes(&mut self, n: usize, m: usize, routes: &[PodRoute]) -> Result<()> {
        let gateway_ips: Vec<Ipv4Addr> = (1..=self.spec.gateways.len()).map(gateway_ip).collect();
        let node = &self.nodes[n - 1];
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.node == n && p.number == m)
            .ok_or_else(|| Error::msg(format!("no pod {m} on node {n}")))?;
        if node.vxlan_mac.is_empty() {
            crate::bail!("node {n} has no {NODE_VXLAN_DEV} (node_agent topology): call felix_tunnel({n}) first");
        }
        let table = POD_TABLE_BASE + u32::try_from(m).unwrap_or(0);
        if pod.table.is_none() {
            add_pod_rules(&node.ns, pod.ip, pod.ip6, table)?;
            pod.table = Some(table);
        }
        program_table(&node.ns, table, routes, &gateway_ips, self.spec.ipv6)
    }

    /// Programs node `n`'s egress tunnel by hand as Felix does it (the vxlan device, a static neighbour and
    /// FDB entry per gateway) on a node-agent topology, where the nodes start without it; then
    /// [`set_pod_routes`](Self::set_pod_routes) works. For checking the topology without the agent.
    pub fn felix_tunnel(&mut self, n: usize) -> Result<()> {
        let gateways = self.spec.gateways.len();
        let ipv6 = self.spec.ipv6;
        let node = self
            .nodes
            .get_mut(n.wrapping_sub(1))
            .ok_or_else(|| Error::msg(format!("no node {n}")))?;
        node.vxlan_mac = felix_tunnel(&node.ns, node.ip, gateways, ipv6)?;
        Ok(())
    }

    fn build_gateway(&self, k: usize, mode: GatewayMode) -> Result<Gateway> {
        let ns = Netns::new(&format!("{}-gw{k}", self.prefix))?;
        no_dad(&ns)?;
        let ip = gateway_ip(k);
        // eth0 on the underlay bridge.
        ns.ip(&format!(
            "link add eth0 address {} type veth peer name gw{k} netns {}",
            gateway_eth_mac(k),
            self.underlay.name()
        ))?;
        self.underlay.ip(&format!("link set gw{k} master br0 up"))?;
        ns.ip(&format!("addr add {ip}/16 dev eth0"))?;
        ns.ip("link set eth0 up")?;
        // Uplinks: gwdmz to the DMZ router's bridge, gwint to the internal network's bridge.
        ns.ip(&format!(
            "link add gwdmz address 02:cb:00:71:00:{k:02x} type veth peer name gw{k} netns {}",
            self.dmz.ns.name()
        ))?;
        self.dmz.ns.ip(&format!("link set gw{k} master dmz up"))?;
        ns.ip(&format!(
            "link add gwint address 02:0a:32:00:00:{k:02x} type veth peer name gw{k} netns {}",
            self.internal.ns.name()
        ))?;
        self.internal
            .ns
            .ip(&format!("link set gw{k} master br0 up"))?;
        ns.ip("link set gwdmz up")?;
        ns.ip("link set gwint up")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let mut gw = Gateway::new(ns, k, ip, mode, self.spec.ipv6);
        gw.configure(self)
            .with_context(|| format!("configure gateway {k}"))?;
        Ok(gw)
    }

    pub(crate) fn ports(&self) -> Option<(u16, u16)> {
        self.spec.ports
    }

    /// Whether the sync peers are given by DNS name ([`TopologySpec::sync_by_name`]).
    pub(crate) fn sync_by_name(&self) -> bool {
        self.spec.sync_by_name
    }

    /// The members of gateway `k`'s sync set, if it is in one.
    pub(crate) fn sync_set(&self, k: usize) -> Option<&[usize]> {
        self.spec
            .sync_sets
            .iter()
            .find(|set| set.contains(&k))
            .map(Vec::as_slice)
    }

    pub(crate) fn max_per_source(&self) -> Option<u32> {
        self.spec.max_per_source
    }

    pub(crate) fn workers(&self) -> usize {
        self.spec.workers
    }
}

/// Underlay address of gateway `k` (its pod IP): 172.18.0.(2+k).
pub fn gateway_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, octet(2 + k))
}

/// Underlay address of node `n`: 172.18.0.(10+n).
pub fn node_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, octet(10 + n))
}

/// Address of pod `m` on node `n`: 10.244.n.m.
pub fn pod_ip(n: usize, m: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, octet(n), octet(m))
}

/// Gateway `k`'s DMZ egress IP: 203.0.113.(9+k).
pub fn dmz_egress_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, octet(9 + k))
}

/// Gateway `k`'s internal egress IP: 10.50.0.(9+k).
pub fn internal_egress_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 50, 0, octet(9 + k))
}

/// The inner (tunnel) MAC of a gateway: `a2:2a:` + the four bytes of its IPv4 address.
pub fn tunnel_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("a2:2a:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// IPv6 address of pod `m` on node `n`: fd00:244:n::m.
pub fn pod_ip6(n: usize, m: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, seg(n), 0, 0, 0, 0, seg(m))
}

/// Gateway `k`'s DMZ egress IPv6 address: 2001:db8:113::(10+k−1).
pub fn dmz_egress_ip6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, seg(0x10 + k - 1))
}

/// Gateway `k`'s internal egress IPv6 address: fd00:50::(10+k−1).
pub fn internal_egress_ip6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, seg(0x10 + k - 1))
}

/// The EUI-64 link-local address of a MAC (`aa:bb:cc:dd:ee:ff`), as the kernel gives an interface.
pub fn link_local(mac: &str) -> Result<Ipv6Addr> {
    let b: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::msg(format!("bad MAC {mac}")))?;
    let [b0, b1, b2, b3, b4, b5] = b[..] else {
        crate::bail!("bad MAC {mac}");
    };
    let w = |hi: u8, lo: u8| (u16::from(hi) << 8) | u16::from(lo);
    Ok(Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        w(b0 ^ 0x02, b1),
        w(b2, 0xff),
        w(0xfe, b3),
        w(b4, b5),
    ))
}

/// MAC of gateway `k`'s `eth0` (fixed so that a rebuilt gateway keeps it).
pub fn gateway_eth_mac(k: usize) -> String {
    format!("02:ac:12:00:00:{:02x}", 2 + k)
}

fn seg(v: usize) -> u16 {
    u16::try_from(v).unwrap_or_else(|_| panic!("address group {v} out of range"))
}

/// No duplicate address detection in `ns` (set before its links exist): addresses are usable at once.
fn no_dad(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
}

fn add_pod_rules(node: &Netns, ip: Ipv4Addr, ip6: Option<Ipv6Addr>, table: u32) -> Result<()> {
    node.ip(&format!(
        "rule add from {ip} lookup {table} priority {POD_RULE_PRIORITY}"
    ))?;
    if let Some(ip6) = ip6 {
        node.ip(&format!(
            "-6 rule add from {ip6} lookup {table} priority {POD_RULE_PRIORITY}"
        ))?;
    }
    Ok(())
}

fn octet(v: usize) -> u8 {
    u8::try_from(v).unwrap_or_else(|_| panic!("address octet {v} out of range"))
}

/// A bridge stands for a switch: frames crossing it must not go through iptables. With `br_netfilter`
/// loaded (by anything on the machine) new namespaces default to `bridge-nf-call-*=1`; turn that off.
/// Without the module the keys do not exist, which is fine.
fn bridge_without_netfilter(ns: &Netns) {
    for t in ["iptables", "ip6tables", "arptables"] {
        let _ = ns.sysctl(&format!("net.bridge.bridge-nf-call-{t}"), "0");
    }
}

/// The bridges' MACs (underlay, internal, DMZ), set explicitly: a bridge without one takes the lowest MAC of
/// its ports (Linux `br_stp_recalculate_bridge_id`), so a test that adds a port — a poisoner on the DMZ —
/// would change the router's MAC under the gateway half of the time.
const BRIDGE_MAC: [&str; 3] = [
    "02:b0:00:00:00:01",
    "02:b0:00:00:00:02",
    "02:b0:00:00:00:03",
];

fn build_dmz(router: Host, v6: bool) -> Result<Host> {
    let ns = &router.ns;
    bridge_without_netfilter(ns);
    no_dad(ns)?;
    ns.ip(&format!(
        "link add dmz address {} type bridge",
        BRIDGE_MAC[2]
    ))?;
    ns.ip(&format!("addr add {DMZ_ROUTER}/24 dev dmz"))?;
    if v6 {
        ns.ip(&format!(
            "-6 addr add {DMZ_ROUTER6}/{} dev dmz nodad",
            DMZ_NET6.prefix_len()
        ))?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    ns.ip("link set dmz up")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(router)
}

fn outside_server(
    ns: Netns,
    router: &Host,
    link: &str,
    (ip, net): (Ipv4Addr, Ipv4Net),
    (ip6, net6): (Ipv6Addr, Ipv6Net),
    v6: bool,
) -> Result<Host> {
    no_dad(&ns)?;
    let gw = Ipv4Addr::from(u32::from(net.network()) + 1);
    let gw6 = Ipv6Addr::from(u128::from(net6.network()) + 1);
    router.ns.ip(&format!(
        "link add {link} type veth peer name eth0 netns {}",
        ns.name()
    ))?;
    router
        .ns
        .ip(&format!("addr add {gw}/{} dev {link}", net.prefix_len()))?;
    ns.ip(&format!("addr add {ip}/{} dev eth0", net.prefix_len()))?;
    if v6 {
        router.ns.ip(&format!(
            "-6 addr add {gw6}/{} dev {link} nodad",
            net6.prefix_len()
        ))?;
        ns.ip(&format!(
            "-6 addr add {ip6}/{} dev eth0 nodad",
            net6.prefix_len()
        ))?;
    }
    router.ns.ip(&format!("link set {link} up"))?;
    ns.ip("link set eth0 up")?;
    ns.ip(&format!("route add default via {gw}"))?;
    if v6 {
        ns.ip(&format!("-6 route add default via {gw6}"))?;
    }
    Ok(Host {
        ns,
        ip,
        ip6: v6.then_some(ip6),
    })
}

fn build_node(ns: Netns, n: usize, underlay: &Netns, spec: &TopologySpec) -> Result<Node> {
    let ip = node_ip(n);
    no_dad(&ns)?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    ns.sysctl("net.ipv6.fib_multipath_hash_policy", "1")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    ns.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
    ns.ip(&format!(
        "link add eth0 address 02:18:00:00:00:{:02x} type veth peer name node{n} netns {}",
        10 + n,
        underlay.name()
    ))?;
    underlay.ip(&format!("link set node{n} master br0 up"))?;
    ns.ip(&format!("addr add {ip}/16 dev eth0"))?;
    ns.ip("link set eth0 up")?;
    ns.ip("route add default via 172.18.0.1 dev eth0")?;

    let vxlan_mac = if spec.node_agent {
        masquerade_pods(&ns)?;
        // Every packet a fail-closed (`unreachable`) route refuses gets its ICMP error, not one per
        // second and destination: a blocked pod fails at once, test after test.
        ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        ns.sysctl("net.ipv6.icmp.ratelimit", "0")?;
        String::new()
    } else {
        felix_tunnel(&ns, ip, spec.gateways.len(), spec.ipv6)?
    };
    Ok(Node {
        ns,
        number: n,
        ip,
        vxlan_mac,
    })
}

/// The node's egress tunnel as Felix makes it: `egress.calico` (no learning), a static neighbour (IPv4 and
/// the IPv6 link-local) and FDB entry per gateway. Returns the device's MAC.
fn felix_tunnel(ns: &Netns, ip: Ipv4Addr, gateways: usize, ipv6: bool) -> Result<String> {
    // The egress vxlan device, as Felix creates it (no learning; the FDB and neighbours are static).
    ns.ip(&format!(
        "link add {NODE_VXLAN_DEV} type vxlan id {VNI} dstport {VXLAN_PORT} local {ip} dev eth0 nolearning"
    ))?;
    ns.ip(&format!("link set {NODE_VXLAN_DEV} mtu {TUNNEL_MTU} up"))?;
    ns.sysctl("net.ipv4.conf.egress/calico.rp_filter", "0")?;
    for k in 1..=gateways {
        let gw = gateway_ip(k);
        let mac = tunnel_mac(gw);
        ns.ip(&format!(
            "neigh add {gw} lladdr {mac} dev {NODE_VXLAN_DEV} nud permanent"
        ))?;
        if ipv6 {
            // The IPv6 next hop is the link-local of the gateway's tunnel MAC.
            ns.ip(&format!(
                "-6 neigh add {} lladdr {mac} dev {NODE_VXLAN_DEV} nud permanent",
                link_local(&mac)?
            ))?;
        }
        crate::cmd::run(
            "bridge",
            &[
                "-n",
                ns.name(),
                "fdb",
                "append",
                &mac,
                "dev",
                NODE_VXLAN_DEV,
                "dst",
                &gw.to_string(),
            ],
        )?;
    }
    ns.mac(NODE_VXLAN_DEV)
}

/// Calico's natOutgoing on a node: pod traffic leaving `eth0` for anything outside the cluster (pods,
/// underlay) is masqueraded to the node's address. The tunnel's outer packets (source: the node) and
/// traffic into `egress.calico` do not match.
fn masquerade_pods(ns: &Netns) -> Result<()> {
    let nft = |args: &str| -> Result<String> {
        let mut v = vec!["nft"];
        v.extend(crate::cmd::words(args));
        ns.exec_args(&v)
    };
    nft("add table ip harness_nat")?;
    nft("add chain ip harness_nat postrouting { type nat hook postrouting priority srcnat ; }")?;
    nft(&format!(
        "add rule ip harness_nat postrouting oifname eth0 ip saddr {POD_CIDR} ip daddr != {{ {POD_CIDR}, {UNDERLAY} }} masquerade"
    ))?;
    Ok(())
}

/// Node routing for unsteered traffic: the underlay namespace (the nodes' default router) gets a link to
/// the DMZ router and routes the outside networks there, and a local network with one host (returned);
/// the DMZ router routes the underlay and the local network back.
fn node_routing(underlay: &Netns, dmz: &Host, local: Netns) -> Result<Host> {
    underlay.sysctl("net.ipv4.ip_forward", "1")?;
    underlay.ip(&format!(
        "link add todmz type veth peer name toul netns {}",
        dmz.ns.name()
    ))?;
    underlay.ip(&format!("addr add {TRANSIT_UNDERLAY}/30 dev todmz"))?;
    underlay.ip("link set todmz up")?;
    dmz.ns.ip(&format!("addr add {TRANSIT_DMZ}/30 dev toul"))?;
    dmz.ns.ip("link set toul up")?;
    for outside in [RED_NET, BLUE_NET] {
        underlay.ip(&format!("route add {outside} via {TRANSIT_DMZ} dev todmz"))?;
    }
    for inside in [UNDERLAY, LOCAL_NET] {
        dmz.ns.ip(&format!(
            "route add {inside} via {TRANSIT_UNDERLAY} dev toul"
        ))?;
    }
    no_dad(&local)?;
    underlay.ip(&format!(
        "link add tolocal type veth peer name eth0 netns {}",
        local.name()
    ))?;
    underlay.ip(&format!(
        "addr add {LOCAL_ROUTER}/{} dev tolocal",
        LOCAL_NET.prefix_len()
    ))?;
    underlay.ip("link set tolocal up")?;
    local.ip(&format!(
        "addr add {LOCAL_SERVER}/{} dev eth0",
        LOCAL_NET.prefix_len()
    ))?;
    local.ip("link set eth0 up")?;
    local.ip(&format!("route add default via {LOCAL_ROUTER}"))?;
    Ok(Host {
        ns: local,
        ip: LOCAL_SERVER,
        ip6: None,
    })
}

fn build_pod(ns: Netns, node: &Node, m: usize, pod: &PodSpec, spec: &TopologySpec) -> Result<Pod> {
    let ip = pod_ip(node.number, m);
    let ip6 = spec.ipv6.then(|| pod_ip6(node.number, m));
    let cali = format!("cali{:02x}{:02x}", node.number, m);
    no_dad(&ns)?;
    ns.ip(&format!(
        "link add eth0 mtu {} type veth peer name {cali} address {CALICO_MAC} mtu {} netns {}",
        spec.pod_mtu,
        spec.pod_mtu,
        node.ns.name()
    ))?;
    ns.ip(&format!("addr add {ip}/32 dev eth0"))?;
    if let Some(ip6) = ip6 {
        ns.ip(&format!("-6 addr add {ip6}/128 dev eth0 nodad"))?;
    }
    ns.ip("link set eth0 up")?;
    ns.ip("route add 169.254.1.1 dev eth0 scope link")?;
    ns.ip("route add default via 169.254.1.1 dev eth0")?;
    if ip6.is_some() {
        ns.ip(&format!(
            "-6 route add default via {CALICO_LINK_LOCAL} dev eth0"
        ))?;
    }
    // Node side, as Calico does it: proxy ARP answers for 169.254.1.1, a /32 route to the pod.
    node.ns
        .sysctl(&format!("net.ipv4.conf.{cali}.proxy_arp"), "1")?;
    node.ns
        .sysctl(&format!("net.ipv4.neigh.{cali}.proxy_delay"), "0")?;
    node.ns
        .sysctl(&format!("net.ipv4.conf.{cali}.rp_filter"), "0")?;
    node.ns.ip(&format!("link set {cali} up"))?;
    node.ns
        .ip(&format!("route add {ip}/32 dev {cali} scope link"))?;
    if let Some(ip6) = ip6 {
        node.ns.ip(&format!("-6 route add {ip6}/128 dev {cali}"))?;
    }
    let mut table = None;
    if let Some(routes) = &pod.routes {
        let t = POD_TABLE_BASE + u32::try_from(m).unwrap_or(0);
        add_pod_rules(&node.ns, ip, ip6, t)?;
        let gateway_ips: Vec<Ipv4Addr> = (1..=spec.gateways.len()).map(gateway_ip).collect();
        program_table(&node.ns, t, routes, &gateway_ips, spec.ipv6)?;
        table = Some(t);
    }
    Ok(Pod {
        ns,
        node: node.number,
        number: m,
        ip,
        ip6,
        cali,
        table,
    })
}

/// Writes a pod's egress table: flush, then one route per entry (throw, single next hop, or multipath).
/// IPv4 next hops are the gateways' IPs (`onlink`); IPv6 next hops the link-locals of their tunnel MACs.
fn program_table(
    ns: &Netns,
    table: u32,
    routes: &[PodRoute],
    gateways: &[Ipv4Addr],
    ipv6: bool,
) -> Result<()> {
    let _ = ns.ip(&format!("-4 route flush table {table}"));
    let _ = ns.ip(&format!("-6 route flush table {table}"));
    for r in routes {
        let (family, hop) = match r.dst {
            IpNet::V4(_) => ("-4", None),
            IpNet::V6(_) if ipv6 => ("-6", Some(())),
            IpNet::V6(_) => continue,
        };
        let next_hop = |k: usize| -> Result<String> {
            let gw = lookup_gateway(gateways, k)?;
            Ok(match hop {
                None => format!("via {gw} dev {NODE_VXLAN_DEV} onlink"),
                Some(()) => format!("via {} dev {NODE_VXLAN_DEV}", link_local(&tunnel_mac(gw))?),
            })
        };
        let cmd = match r.gateways.as_slice() {
            [] => format!("{family} route replace table {table} throw {}", r.dst),
            [k] => format!(
                "{family} route replace table {table} {} {}",
                r.dst,
                next_hop(*k)?
            ),
            ks => {
                let mut s = format!("{family} route replace table {table} {}", r.dst);
                for k in ks {
                    s.push_str(&format!(" nexthop {}", next_hop(*k)?));
                }
                s
            }
        };
        ns.ip(&cmd)?;
    }
    Ok(())
}

fn lookup_gateway(gateways: &[Ipv4Addr], k: usize) -> Result<Ipv4Addr> {
    k.checked_sub(1)
        .and_then(|i| gateways.get(i))
        .copied()
        .ok_or_else(|| Error::msg(format!("pod route names gateway {k}, which does not exist")))
}
