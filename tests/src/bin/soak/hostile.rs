//! The soak's hostile traffic: what a compromised host on the underlay, a spoofing node, a scanner outside
//! and a misbehaving pod send, a few packets per second of each kind for the whole run, aimed at both
//! replicas. Every payload starts with [`MARKER`]; sinks on the red server and in the pods count the marked
//! datagrams that reach them, which must stay none.
//!
//! | kind | from | what | the gateway counts it under |
//! |---|---|---|---|
//! | `vxlan_from_non_node` | a host on the underlay outside the nodes' CIDR | VXLAN with the right VNI, a pod's inner source | `vxlan_source_not_allowed` |
//! | `wrong_vni` | node 1 | VXLAN with VNI + 1 | `vxlan_wrong_vni` |
//! | `spoofed_inner_source` | node 1 | VXLAN whose inner source is outside the pod CIDRs | `inner_source_not_allowed` |
//! | `unsolicited_inbound` | the red server | UDP to the egress IPs (the pods' sink port among others), TCP SYNs | `no_flow` |
//! | `garbage` | node 1; the DMZ router's segment | random datagrams to the VXLAN port, VXLAN headers around random frames; random Ethernet frames to the gateways' DMZ MACs | the parsers' reasons |
//! | `syn_flood` | pod (2,2) | 300 TCP SYNs per second to a port the red server drops | nothing required (legitimate sources) |

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tests::raw::{self, FrameSender, InnerUdp};
use tests::scenario;
use tests::topology::{gateway_eth_mac, tunnel_mac, NODE_VXLAN_DEV, RED_SERVER, VNI, VXLAN_PORT};
use tests::{Netns, NsThread, Result, Topology};

/// What every hostile payload starts with.
pub(crate) const MARKER: &[u8] = b"SOAK-HOSTILE";
/// The sinks' UDP port (on the red server and in the pods).
pub(crate) const SINK_PORT: u16 = 7999;
/// The port the SYN flood aims at (dropped by the red server).
pub(crate) const FLOOD_PORT: u16 = 7998;
/// The rogue underlay host's address: outside the nodes' CIDR (172.18.0.0/16).
const ROGUE: Ipv4Addr = Ipv4Addr::new(172, 19, 0, 66);

/// One kind of hostile input.
struct Kind {
    kind: &'static str,
    what: &'static str,
    reasons: &'static [&'static str],
    /// Marked datagrams of this kind reach a sink; `false` for the SYN flood (legitimate addresses).
    sinks: bool,
}

const KINDS: [Kind; 6] = [
    Kind {
        kind: "vxlan_from_non_node",
        what: "VXLAN from an underlay host outside the nodes' CIDR",
        reasons: &["vxlan_source_not_allowed"],
        sinks: true,
    },
    Kind {
        kind: "wrong_vni",
        what: "VXLAN from node 1 with another VNI",
        reasons: &["vxlan_wrong_vni"],
        sinks: true,
    },
    Kind {
        kind: "spoofed_inner_source",
        what: "VXLAN from node 1 with an inner source outside the pod CIDRs",
        reasons: &["inner_source_not_allowed"],
        sinks: true,
    },
    Kind {
        kind: "unsolicited_inbound",
        what: "UDP and TCP SYNs from the red server to the egress IPs",
        reasons: &["no_flow"],
        sinks: true,
    },
    Kind {
        kind: "garbage",
        what: "random datagrams to the VXLAN port, VXLAN around random frames, random frames on the DMZ",
        // Not `vxlan_wrong_vni` (random VNIs) or `io_other_host`: other kinds and background traffic count
        // there too, and could meet the check by themselves.
        reasons: &[
            "vxlan_truncated",
            "vxlan_bad_flags",
            "ethernet_truncated",
            "not_for_us",
            "unsupported_ethertype",
            "arp_malformed",
            "ipv4_truncated",
            "ipv4_bad_version",
            "ipv4_bad_header_len",
            "ipv4_bad_total_len",
            "ipv4_bad_checksum",
            "ipv6_truncated",
            "ipv6_bad_version",
            "ipv6_bad_payload_len",
            "io_truncated",
        ],
        sinks: true,
    },
    Kind {
        kind: "syn_flood",
        what: "pod (2,2): 300 TCP SYNs per second to a port the red server drops",
        reasons: &[],
        sinks: false,
    },
];

/// Counters of one kind.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    errors: AtomicU64,
}

/// The hostile senders and the sinks.
pub(crate) struct Hostile {
    stop: Arc<AtomicBool>,
    counts: Arc<[Counts; KINDS.len()]>,
    senders: Vec<NsThread<()>>,
    sinks: Vec<NsThread<[u64; KINDS.len()]>>,
    // Last: removed after its sender stopped.
    _rogue: Netns,
}

/// What one kind sent and what reached a sink.
#[derive(Debug)]
pub(crate) struct KindReport {
    /// Its name.
    pub(crate) kind: &'static str,
    /// One line on what it is.
    pub(crate) what: &'static str,
    /// Packets sent.
    pub(crate) sent: u64,
    /// Sends that failed (a replica down, a full queue).
    pub(crate) send_errors: u64,
    /// Marked packets that reached a sink (`None`: not watched).
    pub(crate) delivered: Option<u64>,
    /// The drop reasons it must be counted under (any of them).
    pub(crate) reasons: &'static [&'static str],
}

/// The whole run's hostile input.
#[derive(Debug)]
pub(crate) struct HostileReport {
    /// Per kind.
    pub(crate) kinds: Vec<KindReport>,
}

/// A small xorshift generator (no dependency for test noise).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.subsec_nanos().into())
        | 1
}

/// Sleeps so that a loop doing `per_second` rounds keeps that rate; false once stopped.
fn pace(stop: &AtomicBool, start: Instant, round: u64, per_second: u64) -> bool {
    let due = start + Duration::from_millis(round * 1000 / per_second);
    if let Some(wait) = due.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    !stop.load(Ordering::Relaxed)
}

/// A hostile payload: the marker, the kind's index (so that a sink can tell which kind got through), more.
fn marked(kind: u8, extra: &[u8]) -> Vec<u8> {
    let mut p = MARKER.to_vec();
    p.push(kind);
    p.extend_from_slice(extra);
    p
}

/// Makes the host in `ns` drop every TCP segment to `ports` (nftables syntax: `7998` or `7998-7999`), in
/// a table of its own named `table`, so that SYNs to them stay unanswered.
pub(crate) fn drop_tcp_ports(ns: &Netns, table: &str, ports: &str) -> Result<()> {
    ns.exec_args(&["nft", &format!("add table inet {table}")])?;
    ns.exec_args(&[
        "nft",
        &format!("add chain inet {table} in {{ type filter hook input priority 0; }}"),
    ])?;
    ns.exec_args(&[
        "nft",
        &format!("add rule inet {table} in tcp dport {ports} drop"),
    ])?;
    Ok(())
}

impl Hostile {
    /// Starts the sinks and the senders.
    pub(crate) fn start(topo: &Topology) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[Counts; KINDS.len()]> = Arc::new(Default::default());
        let gateways: Vec<(Ipv4Addr, Ipv4Addr, String)> = (1..=2)
            .map(|k| {
                let gw = topo.gateway(k);
                (gw.ip, gw.dmz_egress, tunnel_mac(gw.ip))
            })
            .collect();
        // The red server drops the flood's port, so that its SYNs stay unanswered.
        let red = &topo.red().ns;
        drop_tcp_ports(red, "soakflood", &FLOOD_PORT.to_string())?;

        let mut sinks = Vec::new();
        let mut sink_at = |ns: &Netns, ip: Ipv4Addr| -> Result<()> {
            let stop = Arc::clone(&stop);
            sinks.push(ns.thread(move || sink(SocketAddr::from((ip, SINK_PORT)), &stop))?);
            Ok(())
        };
        sink_at(red, RED_SERVER)?;
        for (n, m) in [(1, 1), (1, 2), (1, 3), (2, 1)] {
            let pod = topo.pod(n, m);
            sink_at(&pod.ns, pod.ip)?;
        }

        let net = Ipv4Net::new(ROGUE, 16).map_err(|e| tests::Error::msg(e.to_string()))?;
        let rogue = scenario::underlay_host(topo, "rogue", net, 1)?;
        rogue.ip(&format!(
            "neigh replace {} lladdr {} dev eth0 nud permanent",
            topo.gateway(2).ip,
            gateway_eth_mac(2)
        ))?;
        let node = topo.node(1);
        let node_mac = raw::parse_mac(&node.ns.mac(NODE_VXLAN_DEV)?)?;
        let pod_src = SocketAddr::from((topo.pod(1, 1).ip, 40001));
        let inner = move |gw_mac: &str, src: SocketAddr, kind: u8| -> Result<InnerUdp> {
            Ok(InnerUdp {
                src_mac: node_mac,
                dst_mac: raw::parse_mac(gw_mac)?,
                src,
                dst: SocketAddr::from((RED_SERVER, SINK_PORT)),
                ttl: 64,
                payload: marked(kind, b"vxlan"),
            })
        };
        // Prebuilt datagrams, per gateway: the VXLAN of kinds 0–2.
        let mut foreign = Vec::new();
        let mut wrong_vni = Vec::new();
        let mut spoofed = Vec::new();
        for (ip, _, mac) in &gateways {
            let to = SocketAddr::from((*ip, VXLAN_PORT));
            foreign.push((to, raw::vxlan_udp(VNI, &inner(mac, pod_src, 0)?)?));
            wrong_vni.push((to, raw::vxlan_udp(VNI + 1, &inner(mac, pod_src, 1)?)?));
            let spoof = SocketAddr::from((Ipv4Addr::new(10, 99, 0, 7), 40001));
            spoofed.push((to, raw::vxlan_udp(VNI, &inner(mac, spoof, 2)?)?));
        }

        let mut senders = Vec::new();
        // 0: the rogue underlay host.
        {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            senders.push(rogue.thread(move || {
                let Ok(sock) = UdpSocket::bind((ROGUE, 0)) else {
                    counts[0].errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let start = Instant::now();
                let mut round = 0;
                while pace(&stop, start, round, 10) {
                    let (to, dgram) = &foreign[(round % 2) as usize];
                    count(&counts[0], sock.send_to(dgram, to).is_ok());
                    round += 1;
                }
            })?);
        }
        // 1, 2 and 4 (the tunnel's share): node 1.
        {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            let node_ip = node.ip;
            let vxlan_to: Vec<SocketAddr> = gateways
                .iter()
                .map(|(ip, ..)| SocketAddr::from((*ip, VXLAN_PORT)))
                .collect();
            senders.push(node.ns.thread(move || {
                let Ok(sock) = UdpSocket::bind((node_ip, 0)) else {
                    counts[1].errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut noise = Noise(seed());
                let start = Instant::now();
                let mut round = 0;
                while pace(&stop, start, round, 10) {
                    let k = (round % 2) as usize;
                    let (to, dgram) = &wrong_vni[k];
                    count(&counts[1], sock.send_to(dgram, to).is_ok());
                    let (to, dgram) = &spoofed[k];
                    count(&counts[2], sock.send_to(dgram, to).is_ok());
                    // Garbage: random bytes; and a valid VXLAN header around a random frame.
                    let len = (noise.next() % 300) as usize;
                    let junk = noise.bytes(len);
                    count(&counts[4], sock.send_to(&junk, vxlan_to[k]).is_ok());
                    let v = VNI.to_be_bytes();
                    let mut framed = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
                    let len = (noise.next() % 200) as usize;
                    framed.extend(noise.bytes(len));
                    count(&counts[4], sock.send_to(&framed, vxlan_to[k]).is_ok());
                    round += 1;
                }
            })?);
        }
        // 3: the red server, to the egress IPs.
        {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            let egress: Vec<Ipv4Addr> = gateways.iter().map(|g| g.1).collect();
            senders.push(red.thread(move || {
                let Ok(sock) = UdpSocket::bind((RED_SERVER, 0)) else {
                    counts[3].errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut noise = Noise(seed());
                let start = Instant::now();
                let mut round = 0u64;
                while pace(&stop, start, round, 10) {
                    let ip = egress[(round % 2) as usize];
                    let port = if round % 4 < 2 {
                        SINK_PORT
                    } else {
                        1024 + (noise.next() % 64_000) as u16
                    };
                    count(
                        &counts[3],
                        sock.send_to(&marked(3, b"unsolicited"), (ip, port)).is_ok(),
                    );
                    if round.is_multiple_of(5) {
                        // One SYN, unanswered: the socket is dropped when the 1 ms connect times out.
                        let to = SocketAddr::from((ip, 1024 + (noise.next() % 64_000) as u16));
                        let _ = TcpStream::connect_timeout(&to, Duration::from_millis(1));
                        count(&counts[3], true);
                    }
                    round += 1;
                }
            })?);
        }
        // 4 (the uplink's share): random frames on the DMZ segment to the gateways' DMZ MACs.
        {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            let macs: Vec<[u8; 6]> = (1..=2)
                .map(|k| {
                    topo.gateway(k)
                        .ns
                        .mac("gwdmz")
                        .and_then(|m| raw::parse_mac(&m))
                })
                .collect::<Result<_>>()?;
            senders.push(topo.dmz_router().ns.thread(move || {
                let Ok(tx) = FrameSender::open("dmz") else {
                    counts[4].errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut noise = Noise(seed());
                let start = Instant::now();
                let mut round = 0u64;
                while pace(&stop, start, round, 10) {
                    let mut frame = macs[(round % 2) as usize].to_vec();
                    frame.extend_from_slice(&[0x02, 0xee, 0xee, 0xee, 0xee, 0xee]);
                    // IPv4, IPv6, ARP or anything, then random bytes.
                    let ethertype: [u8; 2] = match round % 4 {
                        0 => [0x08, 0x00],
                        1 => [0x86, 0xdd],
                        2 => [0x08, 0x06],
                        _ => [noise.byte(), noise.byte()],
                    };
                    frame.extend_from_slice(&ethertype);
                    let len = (noise.next() % 120) as usize;
                    frame.extend(noise.bytes(len));
                    count(&counts[4], tx.send(&frame).is_ok());
                    round += 1;
                }
            })?);
        }
        // 5: the SYN flood from pod (2,2).
        {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            let to = SocketAddr::from((RED_SERVER, FLOOD_PORT));
            senders.push(topo.pod(2, 2).ns.thread(move || {
                let start = Instant::now();
                let mut round = 0;
                while pace(&stop, start, round, 300) {
                    // The SYN leaves; the socket is dropped when the 1 ms connect times out.
                    let _ = TcpStream::connect_timeout(&to, Duration::from_millis(1));
                    count(&counts[5], true);
                    round += 1;
                }
            })?);
        }
        Ok(Self {
            stop,
            counts,
            senders,
            sinks,
            _rogue: rogue,
        })
    }

    /// Stops the senders, gives stragglers a second, stops the sinks; what was sent and what arrived.
    pub(crate) fn finish(mut self) -> Result<HostileReport> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.senders.drain(..) {
            t.join_timeout(Duration::from_secs(10))?;
        }
        let mut delivered = [0u64; KINDS.len()];
        for t in self.sinks.drain(..) {
            for (d, n) in delivered
                .iter_mut()
                .zip(t.join_timeout(Duration::from_secs(10))?)
            {
                *d += n;
            }
        }
        let kinds = KINDS
            .iter()
            .zip(self.counts.iter())
            .zip(delivered)
            .map(|((k, c), delivered)| KindReport {
                kind: k.kind,
                what: k.what,
                sent: c.sent.load(Ordering::Relaxed),
                send_errors: c.errors.load(Ordering::Relaxed),
                delivered: k.sinks.then_some(delivered),
                reasons: k.reasons,
            })
            .collect();
        Ok(HostileReport { kinds })
    }
}

fn count(c: &Counts, ok: bool) {
    if ok {
        c.sent.fetch_add(1, Ordering::Relaxed);
    } else {
        c.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts the marked datagrams arriving at `addr` until stopped (and a second more), per kind (a marked
/// datagram of an unknown kind counts as garbage).
fn sink(addr: SocketAddr, stop: &AtomicBool) -> [u64; KINDS.len()] {
    let mut n = [0u64; KINDS.len()];
    let Ok(sock) = UdpSocket::bind(addr) else {
        // A sink that cannot listen would hide deliveries: count that against every kind.
        return [1; KINDS.len()];
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 2048];
    let mut stopped: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed)
            && stopped.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(1)
        {
            return n;
        }
        if let Ok((len, _)) = sock.recv_from(&mut buf) {
            if buf[..len].starts_with(MARKER) {
                let kind = buf.get(MARKER.len()).map_or(4, |&k| usize::from(k).min(4));
                n[kind] += 1;
            }
        }
    }
}
