//! Malformed TCP super-packets through the tunnel, from a host outside `allowed_sources` and from a node.
//!
//! The reproduction of a remote crash found in the tunnel intake: a VXLAN datagram carrying an inner IPv4 or
//! IPv6 TCP packet slightly longer than the tunnel MTU, with a TCP data offset below 5, made the worker's
//! super-packet segmentation index past the end of its last, short segment; one such datagram from any host
//! on the underlay stopped the gateway. Here the reproduction and a family of variants (every data offset
//! below 5, last segments of 1–5 bytes, IP lengths that disagree with the datagram, fragments, IHL below 5,
//! a near-64 KiB super-packet) are sent from both kinds of sender; the gateway must keep running, count every
//! datagram from the stranger under `vxlan_source_not_allowed` (the sender is checked before any other work),
//! count the node's under some drop reason, catch no worker panic, and keep forwarding.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tests::raw;
use tests::scenario::{self, drop_count, value};
use tests::topology::{tunnel_mac, RED_SERVER, VNI, VXLAN_PORT};
use tests::{require_netns, require_userspace_gateway, traffic, Metrics};

use crate::common::{self, metrics, METRICS};

/// The standard topology's tunnel MTU (inner IP packet).
const TUNNEL_MTU: usize = 1450;

/// An inner Ethernet frame with a TCP packet whose IP length is `ip_len`, with the TCP data offset set to
/// `doff` words afterwards (the payload fills the rest).
fn inner_tcp(
    macs: ([u8; 6], [u8; 6]),
    v6: bool,
    src: IpAddr,
    dst: SocketAddr,
    doff: u8,
    ip_len: usize,
) -> Vec<u8> {
    let l3 = if v6 { 40 } else { 20 };
    let payload = vec![0x5a; ip_len - l3 - 20];
    let b = etherparse::PacketBuilder::ethernet2(macs.0, macs.1);
    let b = match (src, dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) if !v6 => b.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) if v6 => b.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("address families do not match"),
    };
    let mut out = Vec::new();
    b.tcp(40002, dst.port(), 7, 64240)
        .ack(1)
        .write(&mut out, &payload)
        .expect("build the inner frame");
    out[14 + l3 + 12] = doff << 4;
    out
}

fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut d = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    d.extend_from_slice(inner);
    d
}

/// The reproduction and its variants, as VXLAN datagrams.
fn variants(macs: ([u8; 6], [u8; 6]), pod: Ipv4Addr) -> Vec<Vec<u8>> {
    let dst4 = SocketAddr::from((RED_SERVER, 7602));
    let pod6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 5));
    let dst6 = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0x20), 7602));
    let mut out = Vec::new();
    for (v6, src, dst) in [(false, IpAddr::V4(pod), dst4), (true, pod6, dst6)] {
        for doff in 0..5u8 {
            // IP length = MTU + k: the last segment of the old segmentation held k payload bytes.
            for k in [1, 2, 3, 5] {
                out.push(vxlan(
                    VNI,
                    &inner_tcp(macs, v6, src, dst, doff, TUNNEL_MTU + k),
                ));
            }
        }
        // A near-64 KiB super-packet with data offset 2 and a 3-byte tail.
        let mss = TUNNEL_MTU - if v6 { 40 } else { 20 } - 8;
        let big = (if v6 { 40 } else { 20 }) + 8 + 40 * mss + 3;
        out.push(vxlan(VNI, &inner_tcp(macs, v6, src, dst, 2, big)));
        // IP length one more or one less than the datagram carries.
        for delta in [-1i32, 1] {
            let mut f = inner_tcp(macs, v6, src, dst, 5, TUNNEL_MTU + 40);
            let at = if v6 { 14 + 4 } else { 14 + 2 };
            let len = u16::from_be_bytes([f[at], f[at + 1]]);
            let len = u16::try_from(i32::from(len) + delta).expect("fits");
            f[at..at + 2].copy_from_slice(&len.to_be_bytes());
            out.push(vxlan(VNI, &f));
        }
    }
    // IPv4 only: a first fragment and a later one, over the MTU; an IHL of 4 and of 15.
    for frag in [0x2000u16, 0x00b9] {
        let mut f = inner_tcp(macs, false, IpAddr::V4(pod), dst4, 2, TUNNEL_MTU + 3);
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        out.push(vxlan(VNI, &f));
    }
    for ihl in [4u8, 15] {
        let mut f = inner_tcp(macs, false, IpAddr::V4(pod), dst4, 2, TUNNEL_MTU + 3);
        f[14] = 0x40 | ihl;
        out.push(vxlan(VNI, &f));
    }
    out
}

fn total_drops(m: &Metrics) -> f64 {
    scenario::drops(m).values().sum()
}

#[test]
fn malformed_super_packets_from_anyone_leave_the_gateway_serving() {
    const ROUNDS: usize = 3;
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = common::standard(mode);
    let rogue = scenario::underlay_host(&topo, "rogue", "172.19.0.66/16".parse().unwrap(), 1)
        .expect("a host outside allowed_sources on the underlay");
    let gw = topo.gateway(1);
    let node = topo.node(1);
    let pod = topo.pod(1, 1);
    let red = SocketAddr::from((RED_SERVER, 7603));
    let _server = traffic::udp_echo_server(&topo.red().ns, red).unwrap();
    let macs = (
        raw::parse_mac(&node.vxlan_mac).unwrap(),
        raw::parse_mac(&tunnel_mac(gw.ip)).unwrap(),
    );
    let datagrams = variants(macs, pod.ip);
    let tunnel = SocketAddr::from((gw.ip, VXLAN_PORT));
    let before = metrics(&topo);

    let mut from_rogue = Vec::new();
    let mut from_node = Vec::new();
    for _ in 0..ROUNDS {
        from_rogue.extend(datagrams.iter().cloned());
        from_node.extend(datagrams.iter().cloned());
    }
    raw::send_udp(
        &rogue,
        SocketAddr::from(([172, 19, 0, 66], 0)),
        tunnel,
        &from_rogue,
    )
    .unwrap();
    raw::send_udp(&node.ns, SocketAddr::from((node.ip, 0)), tunnel, &from_node).unwrap();
    let sent = (from_rogue.len() + from_node.len()) as f64;
    println!(
        "sent {} malformed datagrams from a stranger and {} from node 1",
        from_rogue.len(),
        from_node.len()
    );

    // Every datagram is counted as dropped, the stranger's before any other work.
    let after = scenario::poll(
        METRICS,
        Duration::from_millis(50),
        "the drop counters",
        || {
            let m = topo.gateway(1).metrics().ok()?;
            (total_drops(&m) - total_drops(&before) >= sent).then_some(m)
        },
    )
    .unwrap_or_else(|e| {
        let m = metrics(&topo);
        panic!(
            "{e}: {} of {sent} counted; drops {:?}",
            total_drops(&m) - total_drops(&before),
            scenario::drops(&m)
        )
    });
    assert_eq!(
        drop_count(&after, "vxlan_source_not_allowed")
            - drop_count(&before, "vxlan_source_not_allowed"),
        from_rogue.len() as f64,
        "every datagram from the stranger, and nothing else, under vxlan_source_not_allowed"
    );
    assert_eq!(
        value(&after, "egress_gateway_worker_panics_total", &[]),
        0.0,
        "a worker panicked"
    );
    assert_eq!(
        value(&after, "egress_gateway_flows_created_total", &[]),
        value(&before, "egress_gateway_flows_created_total", &[]),
        "a malformed datagram created a flow"
    );
    // And it still forwards, for the same pod, through the same worker threads.
    let echo =
        traffic::udp_echo(&pod.ns, red, b"still here").expect("UDP echo through the gateway");
    assert_eq!(echo, b"still here");
    let ping = traffic::ping(&pod.ns, IpAddr::V4(RED_SERVER), 2).expect("ping through the gateway");
    assert!(ping.contains(" 0% packet loss"), "{ping}");
    // Every packet, malformed or not, ended in one counted outcome (docs/metrics.md).
    let m = metrics(&topo);
    assert_eq!(
        (
            scenario::unaccounted(&m),
            value(&m, "egress_gateway_packets_unaccounted", &[])
        ),
        (0.0, 0.0),
        "the packet counters do not balance (recomputed, and the gateway's gauge); drops {:?}",
        scenario::drops(&m)
    );
    let process = topo
        .gateway_mut(1)
        .process_mut()
        .expect("userspace gateway");
    assert!(
        process.try_wait().unwrap().is_none(),
        "the gateway exited; log tail:\n{}",
        process.log_tail(30)
    );
}
