//! The seed scenario, in-process: two client nodes, three pods, a DMZ uplink and an internal uplink.
//!
//! Frames are built independently of `forwarder-core` (with etherparse), exactly as a Calico client node's
//! `egress.calico` vxlan device would send them (VNI 4097, inner destination MAC `a2:2a:` + gateway IP), and
//! what leaves the gateway is parsed with etherparse again, as the outside server would see it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use forwarder_core::conntrack;
use forwarder_core::pipeline::{
    tunnel_mac, Action, Config, Gateway, UplinkConfig, Worker, INBOUND_HEADROOM,
};
use forwarder_core::ports::PortRange;
use forwarder_core::{Instant, Reason};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const VNI: u32 = 4097;

struct Node {
    name: &'static str,
    ip: Ipv4Addr,
    mac: [u8; 6],
}

struct Pod {
    name: &'static str,
    ip: Ipv4Addr,
    node: usize,
}

#[derive(Clone, Copy)]
enum Probe {
    Tcp(u16),
    Udp(u16),
    Ping,
}

struct Server {
    name: &'static str,
    ip: Ipv4Addr,
    probe: Probe,
}

fn config() -> Result<Config, String> {
    let net = |s: &str| s.parse::<ipnet::IpNet>().map_err(|e| format!("{s}: {e}"));
    Ok(Config {
        vni: VNI,
        tunnel_ip: GATEWAY,
        allowed_nodes: vec![net("172.18.0.0/16")?],
        pod_cidrs: vec![net("10.244.0.0/16")?],
        tunnel_mtu: 1450,
        uplinks: vec![
            UplinkConfig {
                name: "dmz".into(),
                mtu: 1500,
                egress_v4: vec![Ipv4Addr::new(203, 0, 113, 10)],
                egress_v6: vec![],
                next_hop_v4: Some(Ipv4Addr::new(203, 0, 113, 1)),
                next_hop_v6: None,
            },
            UplinkConfig {
                name: "internal".into(),
                mtu: 1500,
                egress_v4: vec![Ipv4Addr::new(10, 50, 0, 10)],
                egress_v6: vec![],
                next_hop_v4: None,
                next_hop_v6: None,
            },
        ],
        routes: vec![(net("0.0.0.0/0")?, 0), (net("10.50.0.0/16")?, 1)],
        ..Config::default()
    })
}

/// A VXLAN datagram (VXLAN header + inner frame) as the node's vxlan device sends it.
fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut d = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    d.extend_from_slice(inner);
    d
}

fn pod_frame(
    node: &Node,
    pod: &Pod,
    dst: Ipv4Addr,
    probe: Probe,
    sport: u16,
) -> Result<Vec<u8>, String> {
    let b = PacketBuilder::ethernet2(node.mac, tunnel_mac(GATEWAY)).ipv4(
        pod.ip.octets(),
        dst.octets(),
        64,
    );
    let mut out = Vec::new();
    let res = match probe {
        Probe::Tcp(port) => b
            .tcp(sport, port, 1_000, 64_240)
            .syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
            .map_err(|e| e.to_string())?
            .write(&mut out, &[]),
        Probe::Udp(port) => b.udp(sport, port).write(&mut out, b"hello from a pod"),
        Probe::Ping => b.icmpv4_echo_request(sport, 1).write(&mut out, b"ping"),
    };
    res.map_err(|e| e.to_string())?;
    Ok(vxlan(VNI, &out))
}

/// What an outside server saw: source address and port (ICMP: identifier), and MSS when a SYN.
struct Seen {
    src: IpAddr,
    src_port: u16,
    mss: Option<u16>,
}

fn as_seen_by_server(frame: &[u8]) -> Result<Seen, String> {
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| format!("unparseable frame: {e}"))?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return Err("not IPv4".into());
    };
    let src = IpAddr::V4(ip.header().source_addr());
    let (src_port, mss) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let mss = t.options_iterator().find_map(|o| match o {
                Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
                _ => None,
            });
            (t.source_port(), mss)
        }
        Some(TransportSlice::Udp(u)) => (u.source_port(), None),
        Some(TransportSlice::Icmpv4(i)) => match i.icmp_type() {
            etherparse::Icmpv4Type::EchoRequest(e) => (e.id, None),
            _ => return Err("unexpected ICMP".into()),
        },
        _ => return Err("no transport header".into()),
    };
    Ok(Seen { src, src_port, mss })
}

/// The server's answer, as an Ethernet frame arriving on the uplink.
fn server_reply(server: &Server, to: IpAddr, to_port: u16) -> Result<Vec<u8>, String> {
    let IpAddr::V4(to) = to else {
        return Err("IPv6 egress in an IPv4 demo".into());
    };
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xfe], [2, 0, 0, 0, 0, 0x01]).ipv4(
        server.ip.octets(),
        to.octets(),
        60,
    );
    let mut out = Vec::new();
    let res = match server.probe {
        Probe::Tcp(port) => b
            .tcp(port, to_port, 9_000, 65_160)
            .syn()
            .ack(1_001)
            .write(&mut out, &[]),
        Probe::Udp(port) => b.udp(port, to_port).write(&mut out, b"hello from outside"),
        Probe::Ping => b.icmpv4_echo_reply(to_port, 1).write(&mut out, b"ping"),
    };
    res.map_err(|e| e.to_string())?;
    Ok(out)
}

/// Where a reply ended up: node, and the pod address and port in the inner packet.
fn delivered(datagram: &[u8]) -> Result<(IpAddr, u16), String> {
    let inner = datagram.get(8..).ok_or("short datagram")?;
    let p = SlicedPacket::from_ethernet(inner).map_err(|e| e.to_string())?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return Err("not IPv4".into());
    };
    let port = match &p.transport {
        Some(TransportSlice::Tcp(t)) => t.destination_port(),
        Some(TransportSlice::Udp(u)) => u.destination_port(),
        Some(TransportSlice::Icmpv4(i)) => match i.icmp_type() {
            etherparse::Icmpv4Type::EchoReply(e) => e.id,
            _ => 0,
        },
        _ => 0,
    };
    Ok((IpAddr::V4(ip.header().destination_addr()), port))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn run(verbose: bool) -> Result<(), String> {
    let nodes = [
        Node {
            name: "node-a",
            ip: Ipv4Addr::new(172, 18, 0, 2),
            mac: [0x66, 0x0a, 0, 0, 0, 0x02],
        },
        Node {
            name: "node-b",
            ip: Ipv4Addr::new(172, 18, 0, 4),
            mac: [0x66, 0x0b, 0, 0, 0, 0x04],
        },
    ];
    let pods = [
        Pod {
            name: "shop/frontend",
            ip: Ipv4Addr::new(10, 244, 1, 5),
            node: 0,
        },
        Pod {
            name: "shop/billing",
            ip: Ipv4Addr::new(10, 244, 2, 7),
            node: 1,
        },
        Pod {
            name: "ops/monitor",
            ip: Ipv4Addr::new(10, 244, 1, 9),
            node: 0,
        },
    ];
    let servers = [
        Server {
            name: "saas-api (DMZ)",
            ip: Ipv4Addr::new(198, 51, 100, 20),
            probe: Probe::Tcp(443),
        },
        Server {
            name: "partner-dns (DMZ)",
            ip: Ipv4Addr::new(192, 0, 2, 53),
            probe: Probe::Udp(53),
        },
        Server {
            name: "legacy-db (internal)",
            ip: Ipv4Addr::new(10, 50, 1, 20),
            probe: Probe::Tcp(5432),
        },
        Server {
            name: "mainframe (internal)",
            ip: Ipv4Addr::new(10, 50, 2, 30),
            probe: Probe::Ping,
        },
    ];
    let gw = Arc::new(
        Gateway::new(
            config()?,
            conntrack::Config::default(),
            PortRange::default(),
        )
        .map_err(|e| e.to_string())?,
    );
    let mut worker = Worker::new(gw.clone(), 0x5eed);
    let uplink_names: Vec<&str> = gw
        .config()
        .uplinks
        .iter()
        .map(|u| u.name.as_str())
        .collect();
    let mut now = Instant::from_secs(1);
    let mut failures = Vec::new();
    let mut buf = vec![0u8; 2048];

    println!("egress gateway demo — the pipeline of forwarder-core, in-process (the namespace version, as root: cargo run -p tests --bin demo-netns)");
    println!("gateway tunnel address {GATEWAY} (inner MAC a2:2a:ac:12:00:03), VXLAN VNI {VNI}, port 4790");
    println!("uplink dmz: egress 203.0.113.10 via 203.0.113.1, routes 0.0.0.0/0");
    println!("uplink internal: egress 10.50.0.10 on-link, routes 10.50.0.0/16\n");
    println!(
        "{:<22} {:<15} {:<17} {:<9} {:<22} {:<6} reply delivered to",
        "outside server", "pod", "pod source", "uplink", "server saw source", "MSS"
    );

    for (i, pod) in pods.iter().enumerate() {
        let node = &nodes[pod.node];
        for server in &servers {
            now = now + core::time::Duration::from_millis(10);
            let sport = 40_000 + u16::try_from(i).unwrap_or(0);
            let d = pod_frame(node, pod, server.ip, server.probe, sport)?;
            buf[..d.len()].copy_from_slice(&d);
            let (uplink, seen) = match worker.outbound(node.ip, &mut buf, d.len(), now) {
                Action::Forward { uplink, frame, .. } => {
                    if verbose {
                        println!("  out {}", hex(frame));
                    }
                    (uplink, as_seen_by_server(frame)?)
                }
                other => {
                    failures.push(format!(
                        "{} → {}: expected a forward, got {other:?}",
                        pod.name, server.name
                    ));
                    continue;
                }
            };
            // The server answers the address and port it saw.
            let r = server_reply(server, seen.src, seen.src_port)?;
            let start = INBOUND_HEADROOM;
            buf[start..start + r.len()].copy_from_slice(&r);
            let back = match worker.inbound(uplink, &mut buf, start, r.len(), now) {
                Action::ToTunnel {
                    node: to, datagram, ..
                } => {
                    let (ip, port) = delivered(datagram)?;
                    let ok = to == node.ip && ip == IpAddr::V4(pod.ip) && port == sport;
                    if !ok {
                        failures.push(format!("reply for {} went to {to} {ip}:{port}", pod.name));
                    }
                    let name = nodes.iter().find(|n| n.ip == to).map_or("?", |n| n.name);
                    format!("{name} → {ip}:{port}{}", if ok { "" } else { "  ✗" })
                }
                other => {
                    failures.push(format!("reply for {} not delivered: {other:?}", pod.name));
                    format!("{other:?}")
                }
            };
            println!(
                "{:<22} {:<15} {:<17} {:<9} {:<22} {:<6} {back}",
                server.name,
                pod.name,
                format!("{}:{sport}", pod.ip),
                uplink_names
                    .get(usize::from(uplink))
                    .copied()
                    .unwrap_or("?"),
                format!("{}:{}", seen.src, seen.src_port),
                seen.mss.map_or("-".to_string(), |m| m.to_string()),
            );
        }
    }

    println!("\nhostile and malformed input (each must be dropped and counted):");
    let node = &nodes[0];
    let pod = &pods[0];
    let hostile = |failures: &mut Vec<String>, label: &str, want: Reason, act: Action<'_>| {
        let got = match act {
            Action::Drop(r) => Some(r),
            _ => None,
        };
        let mark = if got == Some(want) {
            "dropped"
        } else {
            "NOT DROPPED AS EXPECTED"
        };
        if got != Some(want) {
            failures.push(format!("{label}: expected drop {want}, got {got:?}"));
        }
        println!("  {label:<58} {mark} ({want})");
    };
    let good = pod_frame(node, pod, servers[0].ip, Probe::Tcp(443), 41_000)?;
    buf[..good.len()].copy_from_slice(&good);
    hostile(
        &mut failures,
        "VXLAN from 192.168.99.9 (not a node CIDR)",
        Reason::VxlanSourceNotAllowed,
        worker.outbound(Ipv4Addr::new(192, 168, 99, 9), &mut buf, good.len(), now),
    );
    let mut wrong_vni = good.clone();
    wrong_vni[6] ^= 1;
    buf[..wrong_vni.len()].copy_from_slice(&wrong_vni);
    hostile(
        &mut failures,
        "VXLAN with VNI 4096",
        Reason::VxlanWrongVni,
        worker.outbound(node.ip, &mut buf, wrong_vni.len(), now),
    );
    let spoof = Pod {
        name: "spoofed",
        ip: Ipv4Addr::new(10, 99, 0, 1),
        node: 0,
    };
    let s = pod_frame(node, &spoof, servers[0].ip, Probe::Tcp(443), 41_001)?;
    buf[..s.len()].copy_from_slice(&s);
    hostile(
        &mut failures,
        "inner source 10.99.0.1 outside the pod CIDRs (open relay)",
        Reason::InnerSourceNotAllowed,
        worker.outbound(node.ip, &mut buf, s.len(), now),
    );
    let unsolicited = server_reply(
        &servers[0],
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
        5555,
    )?;
    buf[8..8 + unsolicited.len()].copy_from_slice(&unsolicited);
    let flows_before = gw.table().len();
    hostile(
        &mut failures,
        "unsolicited SYN-ACK from outside to 203.0.113.10:5555",
        Reason::NoFlow,
        worker.inbound(0, &mut buf, 8, unsolicited.len(), now),
    );
    if gw.table().len() != flows_before {
        failures.push("unsolicited inbound created state".into());
    }
    let truncated = &good[..good.len() - 10];
    buf[..truncated.len()].copy_from_slice(truncated);
    hostile(
        &mut failures,
        "truncated inner IPv4 packet",
        Reason::Ipv4BadTotalLen,
        worker.outbound(node.ip, &mut buf, truncated.len(), now),
    );

    let st = worker.stats();
    println!(
        "\nflows in the table: {}   created: {}   ICMP originated: {}",
        gw.table().len(),
        st.flows_created,
        st.icmp_originated
    );
    println!("drops by reason:");
    for r in Reason::ALL {
        let n = st.dropped(*r);
        if n > 0 {
            println!("  {:<32} {n}", r.name());
        }
    }
    if failures.is_empty() {
        println!("\nall checks passed");
        Ok(())
    } else {
        Err(format!(
            "{} check(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        ))
    }
}
