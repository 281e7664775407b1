//! Neighbour poisoning on the uplink segment: a host on the DMZ bridge claims the router's IPv4 and IPv6
//! addresses with its own MAC in every way ARP and NDP allow — forged replies addressed to the gateway,
//! gratuitous ARP (reply and request), requests for the gateway's egress IP with the router's address as
//! sender, unsolicited and forged-solicited Neighbor Advertisements with the Override flag — and floods the
//! gateway with thousands of distinct fake senders. Pod traffic must keep reaching the real server through
//! the real router, and the poisoner must never see any of it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::netns::Netns;
use tests::raw::{
    self, proto, Capture, Frame, FrameSender, IpInfo, ETHERTYPE_IPV4, ETHERTYPE_IPV6, L4,
};
use tests::scenario::{self, value, ConfigSpec};
use tests::topology::{DMZ_ROUTER, DMZ_ROUTER6, RED_SERVER, RED_SERVER6};
use tests::{require_netns, require_userspace_gateway, traffic, Metrics};

use crate::common::{self, READY};

/// The poisoner's MAC.
const EVIL: [u8; 6] = [0x02, 0x66, 0x66, 0x66, 0x66, 0x66];
const BROADCAST: [u8; 6] = [0xff; 6];
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const EVIL_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x66, 0x66ff, 0xfe66, 0x6666);
/// Distinct fake senders the flood cycles through.
const FAKE_SENDERS: u32 = 6000;
/// How long pod traffic runs under the flood.
const UNDER_FIRE: Duration = Duration::from_secs(8);

fn arp(
    op: u16,
    eth_dst: [u8; 6],
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}

/// RFC 4443 §2.3: the ICMPv6 checksum over the pseudo-header and the message.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// A Neighbor Advertisement (RFC 4861 §4.4) for `target` at `mac`, with a target link-layer option.
fn na(eth_dst: [u8; 6], dst: Ipv6Addr, target: Ipv6Addr, flags: u8, mac: [u8; 6]) -> Vec<u8> {
    let mut msg = vec![136, 0, 0, 0, flags, 0, 0, 0];
    msg.extend_from_slice(&target.octets());
    msg.extend_from_slice(&[2, 1]);
    msg.extend_from_slice(&mac);
    let sum = icmpv6_checksum(EVIL_LINK_LOCAL, dst, &msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + msg.len());
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&EVIL_LINK_LOCAL.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&msg);
    f
}

const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;

/// Every frame of one round of the attack; `n` picks the fake senders of this round.
fn round(gw_mac: [u8; 6], egress: Ipv4Addr, egress6: Ipv6Addr, n: u32) -> Vec<Vec<u8>> {
    const OP_REQUEST: u16 = 1;
    const OP_REPLY: u16 = 2;
    let mut frames = vec![
        // "The router is at EVIL", addressed to the gateway as if it answered its request.
        arp(OP_REPLY, gw_mac, EVIL, DMZ_ROUTER, gw_mac, egress),
        // Gratuitous ARP, as a reply and as a request (RFC 5227 §3 announcement).
        arp(OP_REPLY, BROADCAST, EVIL, DMZ_ROUTER, BROADCAST, DMZ_ROUTER),
        arp(OP_REQUEST, BROADCAST, EVIL, DMZ_ROUTER, [0; 6], DMZ_ROUTER),
        // A request for the gateway's own address, "from the router" (RFC 826's merge rule).
        arp(OP_REQUEST, BROADCAST, EVIL, DMZ_ROUTER, [0; 6], egress),
        // Unsolicited NA with Override to all-nodes, and a forged solicited one to the gateway.
        na(ALL_NODES_MAC, ALL_NODES, DMZ_ROUTER6, NA_OVERRIDE, EVIL),
        na(
            gw_mac,
            egress6,
            DMZ_ROUTER6,
            NA_SOLICITED | NA_OVERRIDE,
            EVIL,
        ),
    ];
    for k in 0..40 {
        let i = (n * 40 + k) % FAKE_SENDERS;
        let b = i.to_be_bytes();
        let mac = [0x02, 0x77, 0, b[1], b[2], b[3]];
        let ip = Ipv4Addr::new(10, 200, b[2], b[3]);
        let ip6 = Ipv6Addr::new(
            0x2001,
            0xdb8,
            0x113,
            0,
            0,
            0,
            0x7700,
            u16::try_from(i).unwrap_or(u16::MAX),
        );
        frames.push(arp(OP_REQUEST, BROADCAST, mac, ip, [0; 6], egress));
        frames.push(arp(OP_REPLY, gw_mac, mac, ip, gw_mac, egress));
        frames.push(na(ALL_NODES_MAC, ALL_NODES, ip6, NA_OVERRIDE, mac));
    }
    frames
}

/// Neighbor Discovery (ICMPv6 types 133 to 137, RFC 4861 §4).
fn is_ndp(f: &Frame) -> bool {
    matches!(
        &f.ip,
        Some(IpInfo {
            proto: proto::ICMPV6,
            l4: L4::Icmp { ty: 133..=137, .. },
            ..
        })
    )
}

fn updates(m: &Metrics, outcome: &str) -> f64 {
    value(
        m,
        "egress_gateway_neighbour_updates_total",
        &[("outcome", outcome)],
    )
}

/// While a host on the DMZ claims the router's addresses and floods fake senders, every pod's TCP and UDP
/// echo (IPv4) and TCP echo (IPv6) to the red server succeeds, the server sees only the egress addresses,
/// the poisoner receives none of the pod traffic, and the gateway's counters show the claims refused:
/// `unsolicited` and `mac_change_claimed` grow, the router answered the probes (`mac_change_refused`), no
/// change was ever applied (the poisoner answers every request of the gateway too: a change it could win only
/// if the router's frames all went missing for seconds, and then it is contested by the router's), and the fake senders hit the cache bound (`cache_full`).
#[test]
fn a_poisoning_host_cannot_divert_pod_traffic() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = common::standard(mode);
    let spec = ConfigSpec {
        ipv6: true,
        ..ConfigSpec::default()
    };
    let yaml = spec.yaml(topo.gateway(1)).unwrap();
    let _own = scenario::restart_gateway(&mut topo, 1, "neighbour", &yaml, READY).unwrap();
    let gw = topo.gateway(1);
    let egress = gw.dmz_egress;
    let egress6 = gw.dmz_egress6.expect("dual-stack topology");
    let gw_mac = raw::parse_mac(&gw.ns.mac("gwdmz").unwrap()).unwrap();
    let red = topo.red();
    let tcp4 = traffic::tcp_echo_server(&red.ns, SocketAddr::from((RED_SERVER, 7950))).unwrap();
    let udp4 = traffic::udp_echo_server(&red.ns, SocketAddr::from((RED_SERVER, 7951))).unwrap();
    let tcp6 = traffic::tcp_echo_server(&red.ns, SocketAddr::from((RED_SERVER6, 7952))).unwrap();
    let pods: Vec<_> = topo.pods().iter().collect();

    // Before the attack: the gateway has resolved the router (both families).
    for (k, pod) in pods.iter().enumerate() {
        let msg = format!("before {k}");
        assert_eq!(
            traffic::tcp_echo(&pod.ns, tcp4.addr(), msg.as_bytes()).unwrap(),
            msg.as_bytes()
        );
        assert_eq!(
            traffic::tcp_echo(&pod.ns, tcp6.addr(), msg.as_bytes()).unwrap(),
            msg.as_bytes()
        );
    }
    let before = gw.metrics().unwrap();

    // The poisoner: its own namespace, one port on the DMZ bridge.
    let poisoner = Netns::new(&format!("{}-poison", topo.prefix())).unwrap();
    let dmz = &topo.dmz_router().ns;
    dmz.ip(&format!(
        "link add poison type veth peer name eth0 netns {}",
        poisoner.name()
    ))
    .unwrap();
    dmz.ip("link set poison master dmz up").unwrap();
    poisoner
        .sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        .unwrap();
    poisoner
        .ip("link set eth0 address 02:66:66:66:66:66 up")
        .unwrap();
    // Anything of the gateway's egress traffic that reaches the poisoner.
    // (The gateway's own ARP and NDP is multicast and reaches every port of the segment: not counted.)
    let stolen = Capture::start(&poisoner, "eth0", move |f| {
        !f.outgoing
            && matches!(f.ethertype, ETHERTYPE_IPV4 | ETHERTYPE_IPV6)
            && !is_ndp(f)
            && matches!(f.src(), Some(ip) if ip == IpAddr::V4(egress) || ip == IpAddr::V6(egress6))
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        poisoner
            .thread(move || -> tests::Result<()> {
                let tx = FrameSender::open("eth0")?;
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    for f in round(gw_mac, egress, egress6, n) {
                        // A full queue on the veth is the flood's problem, not the test's.
                        if tx.send(&f).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n = n.wrapping_add(1);
                    std::thread::sleep(Duration::from_millis(4));
                }
                Ok(())
            })
            .unwrap()
    };
    // Let the flood reach every worker before judging.
    std::thread::sleep(Duration::from_millis(500));

    let start = Instant::now();
    let mut exchanges = 0;
    while start.elapsed() < UNDER_FIRE {
        for (k, pod) in pods.iter().enumerate() {
            let msg = format!("under fire {exchanges} {k}");
            let b = msg.as_bytes();
            assert_eq!(
                traffic::tcp_echo(&pod.ns, tcp4.addr(), b).unwrap(),
                b,
                "TCP from pod {k}"
            );
            assert_eq!(
                traffic::udp_echo(&pod.ns, udp4.addr(), b).unwrap(),
                b,
                "UDP from pod {k}"
            );
            assert_eq!(
                traffic::tcp_echo(&pod.ns, tcp6.addr(), b).unwrap(),
                b,
                "TCP/IPv6 from pod {k}"
            );
        }
        exchanges += 1;
    }
    stop.store(true, Ordering::Relaxed);
    flood.join_timeout(Duration::from_secs(5)).unwrap().unwrap();
    let frames = sent.load(Ordering::Relaxed);
    assert!(frames > 10_000, "the poisoner sent only {frames} frames");
    eprintln!(
        "{exchanges} rounds of echoes from {} pods under a flood of {frames} frames",
        pods.len()
    );

    let m = scenario::settled_metrics(gw, Duration::from_secs(3)).unwrap();
    let grew = |outcome: &str| updates(&m, outcome) - updates(&before, outcome);
    eprintln!(
        "neighbour updates during the attack: {:?}; failures {}",
        [
            "learnt",
            "confirmed",
            "unchanged",
            "unsolicited",
            "cache_full",
            "mac_change_claimed",
            "mac_change_confirmed",
            "mac_change_refused",
            "mac_change_contested"
        ]
        .map(|o| (o, grew(o))),
        value(&m, "egress_gateway_neighbour_failures_total", &[])
            - value(&before, "egress_gateway_neighbour_failures_total", &[])
    );
    let stolen = stolen.stop().unwrap();
    assert!(
        stolen.is_empty(),
        "the poisoner received {} frames of pod traffic, first {:?}",
        stolen.len(),
        stolen.first()
    );
    for (server, egress) in [
        (&tcp4, IpAddr::V4(egress)),
        (&udp4, IpAddr::V4(egress)),
        (&tcp6, IpAddr::V6(egress6)),
    ] {
        let peers = server.peers();
        assert!(
            peers.len() >= exchanges * pods.len(),
            "{} saw {} peers",
            server.addr(),
            peers.len()
        );
        assert!(
            peers.iter().all(|p| p.ip() == egress),
            "{} saw {peers:?}",
            server.addr()
        );
    }

    assert!(
        grew("unsolicited") > 1000.0,
        "unsolicited: {}",
        grew("unsolicited")
    );
    assert!(
        grew("mac_change_claimed") > 100.0,
        "claimed: {}",
        grew("mac_change_claimed")
    );
    assert!(
        grew("mac_change_refused") >= 2.0,
        "the router's answers to the probes: {}",
        grew("mac_change_refused")
    );
    assert_eq!(
        grew("mac_change_confirmed"),
        0.0,
        "a MAC change was applied"
    );
    assert!(
        grew("cache_full") > 0.0,
        "the fake senders never hit the bound"
    );
    let resolved = value(&m, "egress_gateway_neighbours", &[("state", "resolved")]);
    assert!(resolved <= 1024.0 + 10.0, "{resolved} resolved entries");
}

/// The DMZ router is replaced, or fails over to a standby with another MAC, without announcing it (Linux
/// sends no gratuitous ARP or unsolicited NA on a MAC change unless `arp_notify` / `ndisc_notify` is set).
/// The gateway keeps sending to the old MAC until its probes of it go unanswered, then asks everyone
/// (broadcast ARP, multicast NS) and takes the one MAC that answers: both families reach the red server
/// again within 15 s. (Found by the soak: IPv6 never came back.)
#[test]
fn a_router_whose_mac_changes_unannounced_is_found_again() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let red = topo.red();
    let tcp4 = traffic::tcp_echo_server(&red.ns, SocketAddr::from((RED_SERVER, 7953))).unwrap();
    let tcp6 = traffic::tcp_echo_server(&red.ns, SocketAddr::from((RED_SERVER6, 7954))).unwrap();
    let pod = topo.pod(1, 1);
    for server in [&tcp4, &tcp6] {
        assert_eq!(
            traffic::tcp_echo(&pod.ns, server.addr(), b"before").unwrap(),
            b"before"
        );
    }
    topo.dmz_router()
        .ns
        .ip("link set dmz address 02:d0:00:00:00:01")
        .unwrap();
    let changed = Instant::now();
    for (family, server) in [("IPv4", &tcp4), ("IPv6", &tcp6)] {
        let mut last = None;
        while changed.elapsed() < Duration::from_secs(25) {
            match traffic::tcp_echo(&pod.ns, server.addr(), b"after") {
                Ok(echo) if echo == b"after" => {
                    last = None;
                    break;
                }
                Ok(echo) => last = Some(format!("echo {echo:?}")),
                Err(e) => last = Some(e.to_string()),
            }
        }
        let took = changed.elapsed();
        let m = topo.gateway(1).metrics().unwrap();
        eprintln!(
            "{family}: through the router's new MAC {took:?} after the change ({last:?}); neighbour updates: {:?}",
            m.samples()
                .iter()
                .filter(|s| s.name == "egress_gateway_neighbour_updates_total" && s.value > 0.0)
                .map(|s| format!("{:?}={}", s.labels, s.value))
                .collect::<Vec<_>>()
        );
        assert!(
            last.is_none() && took < Duration::from_secs(15),
            "{family} did not reach the red server through the router's new MAC within 15 s: {last:?}"
        );
    }
}
