//! The pipeline end to end, over bytes: what a client node sends through the tunnel, what leaves on the
//! uplinks, what comes back.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use common::*;
use forwarder_core::conntrack;
use forwarder_core::offload;
use forwarder_core::pipeline::{tunnel_mac, Config, Gateway, Intake, Worker};
use forwarder_core::ports::PortRange;
use forwarder_core::{Instant, Reason};

const T0: Instant = Instant::from_secs(100);

#[test]
fn tcp_syn_is_translated_clamped_and_the_reply_returns_to_the_pod() {
    let mut w = worker();
    let (uplink, hop, frame) = out(&mut w, &pod_tcp(SERVER, 40000, 443, true, &[]), T0).fwd();
    assert_eq!((uplink, hop), (0, any_ip(DMZ_ROUTER)));
    assert_eq!(&frame[12..14], &[0x08, 0x00]);
    let ip = &frame[14..];
    assert_eq!(ip4_src(ip), DMZ_EGRESS);
    assert_eq!(ip4_dst(ip), SERVER);
    assert_eq!(ip[8], 63, "TTL decremented once");
    let (ext_port, dport) = l4_ports(ip);
    assert_eq!(dport, 443);
    assert!(
        ext_port >= 1024,
        "external port {ext_port} in the configured range"
    );
    // MSS option: kind 2 at the start of the options, clamped to 1450 - 40.
    assert_eq!(
        &ip[40..44],
        &[2, 4, (1410u16 >> 8) as u8, (1410u16 & 0xff) as u8]
    );
    assert_checksums(ip);

    // The server's SYN-ACK to the egress address comes back to the pod, in the tunnel, to the right node.
    let reply = outside_tcp(SERVER, DMZ_EGRESS, 443, ext_port, "SAM", 9000, 1001);
    let (node, d) = inb(&mut w, 0, &reply, T0).tun();
    assert_eq!(node, NODE);
    assert_eq!(
        &d[..8],
        &[0x08, 0, 0, 0, 0x00, 0x10, 0x01, 0],
        "VXLAN header, VNI 4097"
    );
    assert_eq!(
        &d[8..14],
        &NODE_MAC,
        "inner destination MAC: the node's vxlan device"
    );
    assert_eq!(
        &d[14..20],
        &tunnel_mac(GW),
        "inner source MAC: a2:2a + gateway IP"
    );
    let ip = &d[22..];
    assert_eq!(ip4_src(ip), SERVER);
    assert_eq!(ip4_dst(ip), POD);
    assert_eq!(l4_ports(ip), (443, 40000));
    assert_eq!(
        &ip[40..44],
        &[2, 4, (1410u16 >> 8) as u8, (1410u16 & 0xff) as u8],
        "SYN-ACK MSS clamped too"
    );
    assert_checksums(ip);
    assert_eq!(w.stats().flows_created, 1);
    assert_eq!(w.stats().total_drops(), 0);
}

#[test]
fn mapping_is_endpoint_independent_and_routes_pick_the_uplink() {
    let mut w = worker();
    let (_, _, a) = out(&mut w, &pod_udp(SERVER, 5353, 53, b"q1"), T0).fwd();
    let (_, _, b) = out(
        &mut w,
        &pod_udp(Ipv4Addr::new(192, 0, 2, 53), 5353, 53, b"q2"),
        T0,
    )
    .fwd();
    assert_eq!(
        l4_ports(&a[14..]).0,
        l4_ports(&b[14..]).0,
        "same pod endpoint, same external port"
    );
    // Internal destinations leave by the internal uplink, on-link, with the internal egress IP.
    let (uplink, hop, f) = out(&mut w, &pod_udp(INTERNAL_SERVER, 5353, 53, b"q3"), T0).fwd();
    assert_eq!((uplink, hop), (1, any_ip(INTERNAL_SERVER)));
    assert_eq!(ip4_src(&f[14..]), INT_EGRESS);
    assert_checksums(&f[14..]);
}

#[test]
fn udp_without_checksum_keeps_none() {
    let mut w = worker();
    let mut d = pod_udp(SERVER, 5000, 9000, b"no checksum here");
    // Zero the inner UDP checksum (offset: 8 VXLAN + 14 Ethernet + 20 IPv4 + 6).
    d[48] = 0;
    d[49] = 0;
    let (_, _, f) = out(&mut w, &d, T0).fwd();
    assert_eq!(&f[14 + 26..14 + 28], &[0, 0], "UDP checksum 0 stays 0");
}

#[test]
fn ping_is_translated_by_identifier_and_answered() {
    let mut w = worker();
    let (_, _, f) = out(&mut w, &pod_ping(SERVER, 77), T0).fwd();
    let ip = &f[14..];
    assert_eq!(ip4_src(ip), DMZ_EGRESS);
    assert_checksums(ip);
    let ext_id = u16::from_be_bytes([ip[24], ip[25]]);
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
        SERVER.octets(),
        DMZ_EGRESS.octets(),
        60,
    );
    let reply = build(|o| b.icmpv4_echo_reply(ext_id, 1).write(o, b"abcdefgh"));
    let (_, d) = inb(&mut w, 0, &reply, T0).tun();
    let ip = &d[22..];
    assert_eq!(ip4_dst(ip), POD);
    assert_eq!(
        u16::from_be_bytes([ip[24], ip[25]]),
        77,
        "identifier restored"
    );
    assert_checksums(ip);
}

#[test]
fn ipv6_flows_are_translated_both_ways() {
    let mut w = worker();
    let (uplink, hop, f) = out(&mut w, &pod_udp6(SERVER6, 6000, 53, b"v6 query"), T0).fwd();
    assert_eq!(uplink, 0);
    assert_eq!(
        hop,
        IpAddr::V6(SERVER6),
        "no IPv6 router configured: on-link"
    );
    assert_eq!(&f[12..14], &[0x86, 0xdd]);
    let ip = &f[14..];
    assert_eq!(&ip[8..24], &DMZ_EGRESS6.octets());
    assert_eq!(ip[7], 63);
    assert_checksums(ip);
    let ext = l4_ports(ip).0;
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv6(
        SERVER6.octets(),
        DMZ_EGRESS6.octets(),
        60,
    );
    let reply = build(|o| b.udp(53, ext).write(o, b"v6 answer"));
    let (_, d) = inb(&mut w, 0, &reply, T0).tun();
    let ip = &d[22..];
    assert_eq!(&ip[24..40], &POD6.octets());
    assert_eq!(l4_ports(ip), (53, 6000));
    assert_checksums(ip);
}

#[test]
fn hostile_tunnel_input_is_dropped_and_counted() {
    let mut w = worker();
    let good = pod_tcp(SERVER, 40000, 443, true, &[]);
    assert_eq!(
        out_from(&mut w, Ipv4Addr::new(192, 168, 9, 9), &good, T0),
        Out::Drop(Reason::VxlanSourceNotAllowed)
    );
    let mut bad_vni = good.clone();
    bad_vni[6] = 0x11;
    assert_eq!(out(&mut w, &bad_vni, T0), Out::Drop(Reason::VxlanWrongVni));
    let mut no_i_flag = good.clone();
    no_i_flag[0] = 0;
    assert_eq!(
        out(&mut w, &no_i_flag, T0),
        Out::Drop(Reason::VxlanBadFlags)
    );
    let mut other_mac = good.clone();
    other_mac[8] = 0x02;
    assert_eq!(out(&mut w, &other_mac, T0), Out::Drop(Reason::NotForUs));
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        [10, 99, 0, 1],
        SERVER.octets(),
        64,
    );
    let spoofed = vxlan(VNI, &build(|o| b.udp(1, 2).write(o, b"x")));
    assert_eq!(
        out(&mut w, &spoofed, T0),
        Out::Drop(Reason::InnerSourceNotAllowed)
    );
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        [224, 0, 0, 5],
        64,
    );
    let multicast = vxlan(VNI, &build(|o| b.udp(1, 2).write(o, b"x")));
    assert_eq!(
        out(&mut w, &multicast, T0),
        Out::Drop(Reason::MartianAddress)
    );
    // A mid-stream ACK cannot open a flow (it is answered with a reset: see below).
    assert!(matches!(
        out(&mut w, &pod_tcp(SERVER, 40001, 443, false, b"data"), T0),
        Out::Tun { .. }
    ));
    let mut bad_csum = good.clone();
    bad_csum[8 + 14 + 10] ^= 0xff;
    assert_eq!(
        out(&mut w, &bad_csum, T0),
        Out::Drop(Reason::Ipv4BadChecksum)
    );
    for cut in [3, 10, 21, 30, good.len() - 1] {
        assert!(
            matches!(out(&mut w, &good[..cut], T0), Out::Drop(_)),
            "truncated at {cut}"
        );
    }
    assert_eq!(w.gateway().table().len(), 0, "no state from any of it");
    let s = w.stats();
    for r in [
        Reason::VxlanSourceNotAllowed,
        Reason::VxlanWrongVni,
        Reason::NotForUs,
        Reason::InnerSourceNotAllowed,
        Reason::MartianAddress,
        Reason::TcpNoSynForNewFlow,
        Reason::Ipv4BadChecksum,
    ] {
        assert_eq!(s.dropped(r), 1, "{r} counted once");
    }
}

/// A pod's TCP segment with no flow here and no SYN (its connection went through a replica that died, or
/// its state was lost) is answered with a reset from the server's address and port (RFC 9293 §3.10.7.1),
/// so the pod fails at once instead of retransmitting for minutes; a reset from the pod is never answered,
/// and with `reset_unknown_tcp` off the segment is only dropped. No state either way.
#[test]
fn mid_stream_segments_without_a_flow_get_a_reset() {
    let mut w = worker();
    // an ACK with data, seq 1000 ack 5000: <SEQ=SEG.ACK><CTL=RST>
    let (node, r) = out(&mut w, &pod_tcp(SERVER, 40001, 443, false, b"data"), T0).tun();
    assert_eq!(node, NODE);
    assert_eq!(&r[8..14], &NODE_MAC);
    let ip = &r[22..];
    assert_eq!((ip4_src(ip), ip4_dst(ip)), (SERVER, POD));
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]),
        40,
        "IPv4 + TCP headers, no payload"
    );
    let tcp = &ip[20..];
    assert_eq!(l4_ports(ip), (443, 40001));
    assert_eq!(&tcp[4..8], &5000u32.to_be_bytes());
    assert_eq!(&tcp[8..12], &[0; 4]);
    assert_eq!(tcp[13], 0x04, "RST only");
    assert_checksums(ip);
    // a FIN without ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, the FIN counting one
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        64,
    );
    let fin = vxlan(
        VNI,
        &build(|o| b.tcp(40002, 443, 7000, 100).fin().write(o, b"xyz")),
    );
    let (_, r) = out(&mut w, &fin, T0).tun();
    let tcp = &r[22 + 20..];
    assert_eq!(&tcp[4..8], &[0; 4]);
    assert_eq!(&tcp[8..12], &7004u32.to_be_bytes());
    assert_eq!(tcp[13], 0x14, "RST and ACK");
    assert_checksums(&r[22..]);
    // a reset is never answered
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        64,
    );
    let rst = vxlan(VNI, &build(|o| b.tcp(40003, 443, 1, 0).rst().write(o, &[])));
    assert_eq!(out(&mut w, &rst, T0), Out::Drop(Reason::TcpNoSynForNewFlow));
    let s = w.stats();
    assert_eq!(s.tcp_resets_sent, 2);
    assert_eq!(s.dropped(Reason::TcpNoSynForNewFlow), 3);
    assert_eq!(w.gateway().table().len(), 0);
    // switched off: dropped only
    let mut cfg = config();
    cfg.reset_unknown_tcp = false;
    let gw = Arc::new(
        Gateway::new(cfg, conntrack::Config::default(), PortRange::default()).expect("gateway"),
    );
    let mut quiet = Worker::new(gw, 7);
    assert_eq!(
        out(&mut quiet, &pod_tcp(SERVER, 40001, 443, false, b"data"), T0),
        Out::Drop(Reason::TcpNoSynForNewFlow)
    );
    assert_eq!(quiet.stats().tcp_resets_sent, 0);
}

#[test]
fn mid_stream_ipv6_segments_without_a_flow_get_a_reset() {
    let mut w = worker();
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv6(
        POD6.octets(),
        SERVER6.octets(),
        64,
    );
    let ack = vxlan(
        VNI,
        &build(|o| b.tcp(40004, 443, 10, 100).ack(77).write(o, b"v6")),
    );
    let (_, r) = out(&mut w, &ack, T0).tun();
    let ip = &r[22..];
    assert_eq!(ip[0] >> 4, 6);
    assert_eq!(&ip[8..24], &SERVER6.octets());
    assert_eq!(&ip[24..40], &POD6.octets());
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 20, "TCP header only");
    assert_eq!(l4_ports(ip), (443, 40004));
    assert_eq!(&ip[40 + 4..40 + 8], &77u32.to_be_bytes());
    assert_checksums(ip);
}

#[test]
fn unsolicited_inbound_is_dropped_without_state() {
    let mut w = worker();
    let syn = outside_tcp(SERVER, DMZ_EGRESS, 443, 5555, "S", 1, 0);
    assert_eq!(inb(&mut w, 0, &syn, T0), Out::Drop(Reason::NoFlow));
    let ping = {
        let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
            SERVER.octets(),
            DMZ_EGRESS.octets(),
            60,
        );
        build(|o| b.icmpv4_echo_request(1, 1).write(o, b"hi"))
    };
    assert_eq!(inb(&mut w, 0, &ping, T0), Out::Drop(Reason::NoFlow));
    assert_eq!(w.gateway().table().len(), 0);
    assert_eq!(w.stats().dropped(Reason::NoFlow), 2);
    // ARP on the uplink belongs to the neighbour handling.
    let arp = build(|o| {
        etherparse::PacketBuilder::ethernet2(ROUTER_MAC, [0xff; 6])
            .arp(
                etherparse::ArpPacket::new(
                    etherparse::ArpHardwareId::ETHERNET,
                    etherparse::EtherType::IPV4,
                    etherparse::ArpOperation::REQUEST,
                    &ROUTER_MAC,
                    &DMZ_ROUTER.octets(),
                    &[0; 6],
                    &DMZ_EGRESS.octets(),
                )
                .unwrap(),
            )
            .write(o)
    });
    assert_eq!(inb(&mut w, 0, &arp, T0), Out::Neighbour);
}

/// The answers to the gateway's own probes of outside targets (sent from ports just outside the NAT range,
/// the echo identifier the first of them) are told apart from unsolicited traffic; nothing else changes.
#[test]
fn answers_to_the_gateways_own_probes_are_counted_apart() {
    let ports = 1008..=1023;
    let gateway = |probe_ports: Option<std::ops::RangeInclusive<u16>>| {
        let config = Config {
            probe_ports,
            ..config()
        };
        let gw = Gateway::new(config, conntrack::Config::default(), PortRange::default()).unwrap();
        Worker::new(Arc::new(gw), 7)
    };
    let syn_ack = |dport: u16| outside_tcp(SERVER, DMZ_EGRESS, 443, dport, "SA", 1, 2);
    let echo_reply = |ident: u16| {
        let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
            SERVER.octets(),
            DMZ_EGRESS.octets(),
            60,
        );
        build(|o| b.icmpv4_echo_reply(ident, 1).write(o, b"nonce..."))
    };
    let mut w = gateway(Some(ports.clone()));
    for (frame, want) in [
        (syn_ack(*ports.start()), Reason::ProbeAnswer),
        (syn_ack(*ports.end()), Reason::ProbeAnswer),
        (echo_reply(*ports.start()), Reason::ProbeAnswer),
        (syn_ack(*ports.end() + 1), Reason::NoFlow),
        (syn_ack(*ports.start() - 1), Reason::NoFlow),
        (echo_reply(7), Reason::NoFlow),
    ] {
        assert_eq!(inb(&mut w, 0, &frame, T0), Out::Drop(want));
    }
    assert_eq!(w.stats().dropped(Reason::ProbeAnswer), 3);
    assert_eq!(w.gateway().table().len(), 0);
    // Without probes the same ports are just unsolicited.
    let mut w = gateway(None);
    assert_eq!(
        inb(&mut w, 0, &syn_ack(1010), T0),
        Out::Drop(Reason::NoFlow)
    );
}

#[test]
fn ttl_expiry_answers_time_exceeded_to_the_pod() {
    let mut w = worker();
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        1,
    );
    let d = vxlan(VNI, &build(|o| b.udp(33434, 33435).write(o, b"traceroute")));
    let (node, r) = out(&mut w, &d, T0).tun();
    assert_eq!(node, NODE);
    assert_eq!(&r[8..14], &NODE_MAC);
    let ip = &r[22..];
    assert_eq!(ip4_src(ip), GW);
    assert_eq!(ip4_dst(ip), POD);
    assert_eq!(
        (ip[9], ip[20], ip[21]),
        (1, 11, 0),
        "ICMP time exceeded in transit"
    );
    assert_eq!(
        &ip[28..28 + 20],
        &d[22..42],
        "the original IPv4 header is quoted"
    );
    assert_checksums(ip);
    assert_eq!(w.stats().dropped(Reason::TtlExpired), 1);
    assert_eq!(w.stats().icmp_originated, 1);
}

#[test]
fn too_big_for_the_tunnel_with_df_brings_frag_needed_to_the_sender() {
    let mut w = worker();
    let (_, _, f) = out(&mut w, &pod_udp(SERVER, 7000, 7001, b"open"), T0).fwd();
    let ext = l4_ports(&f[14..]).0;
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
        SERVER.octets(),
        DMZ_EGRESS.octets(),
        60,
    );
    let mut big = build(|o| b.udp(7001, ext).write(o, &[0x55; 1472]));
    // Set DF and fix the header checksum.
    big[14 + 6] |= 0x40;
    fix_ipv4_checksum(&mut big[14..]);
    let (uplink, hop, e) = inb(&mut w, 0, &big, T0).fwd();
    assert_eq!((uplink, hop), (0, any_ip(DMZ_ROUTER)));
    let ip = &e[14..];
    assert_eq!(ip4_dst(ip), SERVER);
    assert_eq!(ip4_src(ip), DMZ_EGRESS);
    assert_eq!((ip[20], ip[21]), (3, 4), "fragmentation needed");
    assert_eq!(
        u16::from_be_bytes([ip[26], ip[27]]),
        1450,
        "next-hop MTU is the tunnel's"
    );
    assert!(ip.len() <= 576);
    assert_checksums(ip);
}

#[test]
fn icmp_errors_about_a_flow_are_translated_back_and_do_not_refresh() {
    let mut w = worker();
    let (_, _, f) = out(&mut w, &pod_udp(SERVER, 7100, 53, b"query"), T0).fwd();
    let sent = f[14..].to_vec();
    let ext = l4_ports(&sent).0;
    let g = w.gateway().clone();
    let last_seen = {
        let guard = g.pin();
        let key = forwarder_core::flow::FlowKey {
            src: any_ip(POD),
            dst: any_ip(SERVER),
            src_port: 7100,
            dst_port: 53,
            proto: forwarder_core::flow::Proto::Udp,
        };
        g.table().lookup_outbound(&key, &guard).unwrap().last_seen()
    };
    // The server's router answers "port unreachable", quoting what we sent.
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&sent[..28]);
    let c = !ref_fold(ref_sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
        SERVER.octets(),
        DMZ_EGRESS.octets(),
        60,
    );
    let frame = build(|o| b.write(o, etherparse::IpNumber::ICMP, &icmp));
    let later = Instant::from_secs(150);
    let (node, d) = inb(&mut w, 0, &frame, later).tun();
    assert_eq!(node, NODE);
    let ip = &d[22..];
    assert_eq!(ip4_dst(ip), POD);
    assert_eq!((ip[20], ip[21]), (3, 3));
    let quoted = &ip[28..];
    assert_eq!(ip4_src(quoted), POD, "quoted source restored to the pod");
    assert_eq!(l4_ports(quoted), (7100, 53), "quoted port restored");
    assert_eq!(
        ref_fold(ref_sum(&quoted[..20], 0)),
        0xffff,
        "quoted IPv4 header checksum"
    );
    assert_checksums(ip);
    let _ = ext;
    let guard = g.pin();
    let key = forwarder_core::flow::FlowKey {
        src: any_ip(POD),
        dst: any_ip(SERVER),
        src_port: 7100,
        dst_port: 53,
        proto: forwarder_core::flow::Proto::Udp,
    };
    assert_eq!(
        g.table().lookup_outbound(&key, &guard).unwrap().last_seen(),
        last_seen,
        "ICMP errors never refresh"
    );
}

#[test]
fn arp_and_ping_for_the_gateway_are_answered_in_the_tunnel() {
    let mut w = worker();
    let arp = build(|o| {
        etherparse::PacketBuilder::ethernet2(NODE_MAC, [0xff; 6])
            .arp(
                etherparse::ArpPacket::new(
                    etherparse::ArpHardwareId::ETHERNET,
                    etherparse::EtherType::IPV4,
                    etherparse::ArpOperation::REQUEST,
                    &NODE_MAC,
                    &[10, 244, 1, 0],
                    &[0; 6],
                    &GW.octets(),
                )
                .unwrap(),
            )
            .write(o)
    });
    let (node, r) = out(&mut w, &vxlan(VNI, &arp), T0).tun();
    assert_eq!(node, NODE);
    assert_eq!(&r[8..14], &NODE_MAC);
    assert_eq!(&r[20..22], &[0x08, 0x06]);
    let a = &r[22..];
    assert_eq!(&a[6..8], &[0, 2], "ARP reply");
    assert_eq!(&a[8..14], &tunnel_mac(GW), "answers a2:2a + gateway IP");
    assert_eq!(&a[14..18], &GW.octets());
    assert_eq!(&a[24..28], &[10, 244, 1, 0]);

    let (node, r) = out(&mut w, &pod_ping(GW, 9), T0).tun();
    assert_eq!(node, NODE);
    let ip = &r[22..];
    assert_eq!((ip4_src(ip), ip4_dst(ip), ip[20]), (GW, POD, 0));
    assert_checksums(ip);
    assert_eq!(
        w.gateway().table().len(),
        0,
        "no flow for the gateway's own answers"
    );
}

#[test]
fn draining_refuses_new_flows_and_keeps_old_ones() {
    let mut w = worker();
    let (_, _, _) = out(&mut w, &pod_udp(SERVER, 8000, 53, b"a"), T0).fwd();
    w.gateway().set_draining(true);
    assert!(matches!(
        out(&mut w, &pod_udp(SERVER, 8000, 53, b"b"), T0),
        Out::Fwd { .. }
    ));
    assert_eq!(
        out(&mut w, &pod_udp(SERVER, 8001, 53, b"c"), T0),
        Out::Drop(Reason::Draining)
    );
}

#[test]
fn exhausted_port_pool_answers_admin_prohibited() {
    let gw = gateway_with(
        conntrack::Config::default(),
        PortRange {
            min: 2000,
            max: 2001,
        },
    );
    let mut w = Worker::new(gw, 3);
    for p in 0..2 {
        assert!(matches!(
            out(&mut w, &pod_udp(SERVER, 9000 + p, 53, b"x"), T0),
            Out::Fwd { .. }
        ));
    }
    let (node, r) = out(&mut w, &pod_udp(SERVER, 9002, 53, b"x"), T0).tun();
    assert_eq!(node, NODE);
    let ip = &r[22..];
    assert_eq!(
        (ip[20], ip[21]),
        (3, 13),
        "ICMP administratively prohibited"
    );
    assert_checksums(ip);
    assert_eq!(w.stats().dropped(Reason::PortsExhausted), 1);
}

#[test]
fn fragments_follow_the_first() {
    let mut w = worker();
    // A UDP datagram of 2000 payload bytes in two fragments.
    let (first, second) = ipv4_fragments(
        &pod_udp(SERVER, 9500, 9501, &[0xab; 2000]),
        22,
        1008,
        0x1234,
    );
    // A later fragment before its first has nowhere to go.
    assert_eq!(out(&mut w, &second, T0), Out::Drop(Reason::FragmentNoFlow));
    let (u1, _, f1) = out(&mut w, &first, T0).fwd();
    let (u2, _, f2) = out(&mut w, &second, T0).fwd();
    assert_eq!((u1, u2), (0, 0));
    assert_eq!(ip4_src(&f1[14..]), DMZ_EGRESS);
    assert_eq!(ip4_src(&f2[14..]), DMZ_EGRESS);
    // Reassembled, the translated datagram's UDP checksum is right.
    let mut reassembled = f1[14..34].to_vec();
    reassembled.extend_from_slice(&f1[34..]);
    reassembled.extend_from_slice(&f2[34..]);
    let total = reassembled.len() as u16;
    reassembled[2..4].copy_from_slice(&total.to_be_bytes());
    reassembled[6] = 0;
    reassembled[7] = 0;
    reassembled[10] = 0;
    reassembled[11] = 0;
    let c = !ref_fold(ref_sum(&reassembled[..20], 0));
    reassembled[10..12].copy_from_slice(&c.to_be_bytes());
    assert_checksums(&reassembled);
}

/// Two UDP fragments (first, later) of one 2000-byte datagram from the pod, in VXLAN datagrams.
fn fragment_pair() -> (Vec<u8>, Vec<u8>) {
    ipv4_fragments(
        &pod_udp(SERVER, 9600, 9601, &[0xcd; 2000]),
        22,
        1008,
        0x4321,
    )
}

#[test]
fn batches_give_the_same_results_as_one_by_one() {
    use forwarder_core::pipeline::{TunnelPacket, UplinkPacket};
    let (first, later) = fragment_pair();
    let inputs: Vec<Vec<u8>> = vec![
        pod_tcp(SERVER, 41000, 443, true, &[]),
        pod_tcp(SERVER, 41000, 443, true, &[]), // the same SYN again: finds the flow just made
        pod_udp(SERVER, 41001, 53, b"a"),
        pod_tcp(SERVER, 41002, 443, true, &[]),
        pod_tcp(SERVER, 41002, 443, false, b"data right behind its SYN"),
        first,
        later, // follows the first fragment in the same batch
        pod_ping(SERVER, 5),
        pod_udp(INTERNAL_SERVER, 41003, 5432, b"b"),
        pod_tcp(SERVER, 41004, 443, false, b"no SYN"), // dropped
    ];
    let inputs: Vec<Vec<u8>> = inputs.iter().cycle().take(45).cloned().collect(); // more than one chunk

    let mut one = worker();
    let expected: Vec<Out> = inputs.iter().map(|d| out(&mut one, d, T0)).collect();

    let mut batched = worker();
    let mut bufs: Vec<Vec<u8>> = inputs
        .iter()
        .map(|d| {
            let mut b = d.clone();
            b.resize(d.len() + 2048, 0);
            b
        })
        .collect();
    let mut batch: Vec<TunnelPacket<'_>> = bufs
        .iter_mut()
        .zip(&inputs)
        .map(|(b, d)| TunnelPacket {
            from: NODE,
            buf: b.as_mut_slice(),
            len: d.len(),
        })
        .collect();
    let mut got = Vec::new();
    batched.outbound_batch(&mut batch, T0, |i, a| {
        assert_eq!(i, got.len(), "emitted in order");
        got.push(owned(a));
    });
    assert_eq!(got, expected);
    assert_eq!(batched.stats().flows_created, one.stats().flows_created);
    assert_eq!(batched.stats().drops, one.stats().drops);

    // Replies, batched, against one by one.
    let replies: Vec<Vec<u8>> = expected
        .iter()
        .filter_map(|o| match o {
            Out::Fwd { frame, .. }
                if frame[14 + 9] == 17 && frame[14 + 6] & 0x3f == 0 && frame[14 + 7] == 0 =>
            {
                let ip = &frame[14..];
                let (sport, dport) = l4_ports(ip);
                Some(outside_udp(
                    ip4_dst(ip),
                    ip4_src(ip),
                    dport,
                    sport,
                    b"reply",
                ))
            }
            _ => None,
        })
        .collect();
    assert!(!replies.is_empty());
    let want: Vec<Out> = replies.iter().map(|r| inb(&mut one, 0, r, T0)).collect();
    let mut rbufs: Vec<Vec<u8>> = replies
        .iter()
        .map(|r| {
            let mut b = vec![0u8; HEADROOM];
            b.extend_from_slice(r);
            b
        })
        .collect();
    let mut rbatch: Vec<UplinkPacket<'_>> = rbufs
        .iter_mut()
        .zip(&replies)
        .map(|(b, r)| UplinkPacket {
            buf: b.as_mut_slice(),
            start: HEADROOM,
            len: r.len(),
        })
        .collect();
    let mut rgot = Vec::new();
    batched.inbound_batch(0, &mut rbatch, T0, |_, a| rgot.push(owned(a)));
    assert_eq!(rgot, want);
}

/// The batch path inserts the new flows of a chunk together (`Table::insert_batch`): with many new flows per
/// chunk, refusals inside a chunk (ports exhausted, source quota, no SYN), a second packet of a new flow and
/// a repeated SYN of an existing flow in the same chunk, the results are still those of one-by-one
/// processing, byte for byte (the same external ports), and so are the counters and the table.
#[test]
fn batched_new_flows_give_the_same_results_as_one_by_one() {
    use forwarder_core::pipeline::TunnelPacket;
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for i in 0..40u16 {
        inputs.push(pod_udp(SERVER, 9000 + i, 53, b"q"));
        if i % 5 == 0 {
            inputs.push(pod_tcp(SERVER, 9100 + i, 443, true, &[]));
        }
        if i % 7 == 3 {
            inputs.push(pod_udp(SERVER, 9000 + i - 1, 53, b"again")); // a second packet of a new flow
        }
        if i % 11 == 5 {
            inputs.push(pod_tcp(SERVER, 9100 + i, 443, false, b"no SYN")); // refused before its insert
        }
        if i % 13 == 12 {
            inputs.push(pod_tcp(SERVER, 9100, 443, true, &[])); // the SYN of an existing flow again
        }
        if i % 4 == 1 {
            inputs.push(pod_udp(INTERNAL_SERVER, 9000 + i, 53, b"i")); // the other uplink's pool
        }
    }
    // 20 ports per protocol and egress IP, 30 flows per pod: both run out inside chunks
    let ct = conntrack::Config {
        max_entries: 64,
        max_per_source: 30,
        ..conntrack::Config::default()
    };
    let ports = PortRange {
        min: 2000,
        max: 2019,
    };
    let mut one = Worker::new(gateway_with(ct, ports), 3);
    let expected: Vec<Out> = inputs.iter().map(|d| out(&mut one, d, T0)).collect();

    let mut batched = Worker::new(gateway_with(ct, ports), 3);
    let mut bufs: Vec<Vec<u8>> = inputs
        .iter()
        .map(|d| {
            let mut b = d.clone();
            b.resize(d.len() + 2048, 0);
            b
        })
        .collect();
    let mut batch: Vec<TunnelPacket<'_>> = bufs
        .iter_mut()
        .zip(&inputs)
        .map(|(b, d)| TunnelPacket {
            from: NODE,
            buf: b.as_mut_slice(),
            len: d.len(),
        })
        .collect();
    let mut got = Vec::new();
    batched.outbound_batch(&mut batch, T0, |_, a| got.push(owned(a)));
    assert_eq!(got, expected);
    let (s1, s2) = (one.stats(), batched.stats());
    assert_eq!(s2.flows_created, s1.flows_created);
    assert_eq!(s2.drops, s1.drops);
    assert_eq!(s2.icmp_originated, s1.icmp_originated);
    assert_eq!(batched.gateway().table().len(), one.gateway().table().len());
    assert!(s2.dropped(Reason::PortsExhausted) > 0, "{:?}", s2.drops);
    assert!(
        s2.dropped(Reason::SourceQuotaExceeded) > 0,
        "{:?}",
        s2.drops
    );
    assert!(s2.dropped(Reason::TcpNoSynForNewFlow) > 0);
}

/// Passes each of `chunks` to `outbound_batch` of one worker, and its packets one by one to `outbound` of
/// another (same configuration, same seed); checks that both give the same actions and counters.
fn batched_and_one_by_one(
    ct: conntrack::Config,
    ports: PortRange,
    chunks: &[Vec<Vec<u8>>],
) -> Worker {
    use forwarder_core::pipeline::TunnelPacket;
    let mut one = Worker::new(gateway_with(ct, ports), 3);
    let mut batched = Worker::new(gateway_with(ct, ports), 3);
    for chunk in chunks {
        let expected: Vec<Out> = chunk.iter().map(|d| out(&mut one, d, T0)).collect();
        let mut bufs: Vec<Vec<u8>> = chunk
            .iter()
            .map(|d| {
                let mut b = d.clone();
                b.resize(d.len() + 2048, 0);
                b
            })
            .collect();
        let mut batch: Vec<TunnelPacket<'_>> = bufs
            .iter_mut()
            .zip(chunk)
            .map(|(b, d)| TunnelPacket {
                from: NODE,
                buf: b.as_mut_slice(),
                len: d.len(),
            })
            .collect();
        let mut got = Vec::new();
        batched.outbound_batch(&mut batch, T0, |_, a| got.push(owned(a)));
        assert_eq!(got, expected);
    }
    let (s1, s2) = (one.stats(), batched.stats());
    assert_eq!(s2.flows_created, s1.flows_created);
    assert_eq!(s2.drops, s1.drops);
    assert_eq!(batched.gateway().table().len(), one.gateway().table().len());
    batched
}

/// Where a batch of new flows must not run ahead of the packets before them, it does not: a new flow's
/// second packet that inserts again after its first was refused (the random port of every later insert
/// depends on it), and an existing flow's RST that gives its quota unit back to a new flow after it.
#[test]
fn batched_new_flows_wait_for_what_one_by_one_would_have_done_first() {
    let ports = PortRange {
        min: 2000,
        max: 2003,
    };
    // UDP runs out after 4 ports; the refused flow's second packet tries again before three TCP flows,
    // whose ports (4 to choose from) depend on how many inserts drew random numbers before them
    let mut chunk: Vec<Vec<u8>> = (0..5)
        .map(|i| pod_udp(SERVER, 9000 + i, 53, b"u"))
        .collect();
    chunk.push(pod_udp(SERVER, 9004, 53, b"again"));
    chunk.extend((0..3).map(|i| pod_tcp(SERVER, 9100 + i, 443, true, &[])));
    let w = batched_and_one_by_one(conntrack::Config::default(), ports, &[chunk]);
    assert_eq!(w.stats().dropped(Reason::PortsExhausted), 2);

    // two flows per pod: the RST of the first ends it (its unit goes back), so the new flow behind it fits
    let rst = {
        let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
            POD.octets(),
            SERVER.octets(),
            64,
        );
        vxlan(
            VNI,
            &build(|o| b.tcp(9200, 443, 1001, 0).rst().write(o, &[])),
        )
    };
    let ct = conntrack::Config {
        max_per_source: 2,
        ..conntrack::Config::default()
    };
    let first = vec![
        pod_tcp(SERVER, 9200, 443, true, &[]),
        pod_udp(SERVER, 9201, 53, b"u"),
    ];
    let second = vec![rst, pod_udp(SERVER, 9202, 53, b"fits after the RST")];
    let w = batched_and_one_by_one(ct, PortRange::default(), &[first, second]);
    assert_eq!(w.stats().flows_created, 3);
    assert_eq!(w.stats().dropped(Reason::SourceQuotaExceeded), 0);
}

// ---- regressions from the protocol review ---------------------------------------------------------

/// Opens a UDP flow pod:sport → SERVER:53 and returns the external port.
fn open_udp(w: &mut Worker, sport: u16) -> u16 {
    let (_, _, f) = out(w, &pod_udp(SERVER, sport, 53, b"q"), T0).fwd();
    l4_ports(&f[14..]).0
}

fn port_unreachable_about(sent_ip: &[u8], corrupt: bool) -> Vec<u8> {
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&sent_ip[..28]);
    let c = !ref_fold(ref_sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    if corrupt {
        let n = icmp.len();
        icmp[n - 1] ^= 0x40;
    }
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
        SERVER.octets(),
        DMZ_EGRESS.octets(),
        60,
    );
    build(|o| b.write(o, etherparse::IpNumber::ICMP, &icmp))
}

#[test]
fn icmp_errors_with_a_bad_checksum_are_dropped_not_laundered() {
    let mut w = worker();
    let (_, _, f) = out(&mut w, &pod_udp(SERVER, 7300, 53, b"q"), T0).fwd();
    assert_eq!(
        inb(&mut w, 0, &port_unreachable_about(&f[14..], true), T0),
        Out::Drop(Reason::IcmpBadChecksum)
    );
    assert!(matches!(
        inb(&mut w, 0, &port_unreachable_about(&f[14..], false), T0),
        Out::Tun { .. }
    ));
}

#[test]
fn replies_must_arrive_on_the_uplink_the_flow_left_by() {
    let mut w = worker();
    let (_, _, f) = out(&mut w, &pod_udp(SERVER, 7400, 53, b"q"), T0).fwd();
    let ext = l4_ports(&f[14..]).0;
    let reply = outside_udp(SERVER, DMZ_EGRESS, 53, ext, b"a");
    assert_eq!(
        inb(&mut w, 1, &reply, T0),
        Out::Drop(Reason::WrongUplink),
        "spoofed from the internal VLAN"
    );
    assert_eq!(
        inb(&mut w, 1, &port_unreachable_about(&f[14..], false), T0),
        Out::Drop(Reason::WrongUplink)
    );
    assert!(matches!(inb(&mut w, 0, &reply, T0), Out::Tun { .. }));
}

#[test]
fn another_node_cannot_use_or_forge_errors_for_a_pods_flow() {
    let mut w = worker();
    let _ = open_udp(&mut w, 7500);
    let other_node = Ipv4Addr::new(172, 18, 0, 77);
    assert_eq!(
        out_from(&mut w, other_node, &pod_udp(SERVER, 7500, 53, b"spoof"), T0),
        Out::Drop(Reason::FlowNodeMismatch)
    );
    // A pod that did not receive the quoted packet cannot send an error about it.
    let quoted = outside_udp(SERVER, POD, 53, 7500, b"a");
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    let c = !ref_fold(ref_sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        [10, 244, 9, 9],
        SERVER.octets(),
        64,
    );
    let forged = vxlan(
        VNI,
        &build(|o| b.write(o, etherparse::IpNumber::ICMP, &icmp)),
    );
    assert_eq!(
        out(&mut w, &forged, T0),
        Out::Drop(Reason::IcmpErrorNotFromPeer)
    );
}

#[test]
fn icmp_errors_the_gateway_originates_are_rate_limited() {
    let mut w = worker();
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        1,
    );
    let d = vxlan(VNI, &build(|o| b.udp(33434, 33435).write(o, b"traceroute")));
    let answered = (0..200)
        .filter(|_| matches!(out(&mut w, &d, T0), Out::Tun { .. }))
        .count();
    assert_eq!(answered, 50, "the burst, no more, in one instant");
    assert_eq!(w.stats().icmp_suppressed, 150);
    assert_eq!(
        w.stats().dropped(Reason::TtlExpired),
        200,
        "every packet still counted as dropped"
    );
    // 100 ms later, 100 more tokens at 1000/s (capped by the burst of 50).
    let later = Instant::from_millis(T0.as_millis() + 100);
    let answered = (0..200)
        .filter(|_| matches!(out(&mut w, &d, later), Out::Tun { .. }))
        .count();
    assert_eq!(answered, 50);
}

#[test]
fn a_refused_syn_creates_no_flow() {
    let mut w = worker();
    // A DF SYN larger than the uplink's MTU (1500): answered with too-big, and no flow is left behind.
    let mut big = pod_tcp(SERVER, 7600, 443, true, &[0u8; 1480]);
    big[22 + 6] |= 0x40;
    fix_ipv4_checksum(&mut big[22..]);
    let (_, r) = out(&mut w, &big, T0).tun();
    assert_eq!((r[22 + 20], r[22 + 21]), (3, 4));
    assert_eq!(w.gateway().table().len(), 0);
}

#[test]
fn later_fragments_respect_ttl_and_tiny_tcp_fragments_are_refused() {
    let mut w = worker();
    let (first, later) = fragment_pair();
    assert!(matches!(out(&mut w, &first, T0), Out::Fwd { .. }));
    let mut later_ttl1 = later.clone();
    later_ttl1[22 + 8] = 1;
    fix_ipv4_checksum(&mut later_ttl1[22..]);
    assert!(matches!(
        out(&mut w, &later_ttl1, T0),
        Out::Drop(Reason::TtlExpired)
    ));
    // TCP fragment at offset 8 (FO = 1).
    let mut tiny = pod_tcp(SERVER, 7700, 443, false, &[1; 16]);
    tiny[22 + 6] = 0;
    tiny[22 + 7] = 1;
    fix_ipv4_checksum(&mut tiny[22..]);
    assert_eq!(out(&mut w, &tiny, T0), Out::Drop(Reason::TinyFragment));
}

#[test]
fn tunnel_answers_carry_a_clean_vxlan_header() {
    let mut w = worker();
    let mut d = pod_ping(GW, 3);
    d[0] = 0x88; // I flag plus an unknown flag
    d[3] = 0x12; // reserved bits
    d[7] = 0x34;
    let (_, r) = out(&mut w, &d, T0).tun();
    assert_eq!(&r[..8], &[0x08, 0, 0, 0, 0x00, 0x10, 0x01, 0]);
}

#[test]
fn inbound_later_fragments_are_never_forwarded_with_ttl_0() {
    let mut w = worker();
    let ext = open_udp(&mut w, 7800);
    let whole = outside_udp(SERVER, DMZ_EGRESS, 53, ext, &[0x77; 1200]);
    let (first, later) = ipv4_fragments(&whole, 14, 600, 0x5151);
    let mut later_ttl1 = later.clone();
    later_ttl1[14 + 8] = 1;
    fix_ipv4_checksum(&mut later_ttl1[14..]);
    assert!(matches!(inb(&mut w, 0, &first, T0), Out::Tun { .. }));
    assert_eq!(
        inb(&mut w, 0, &later_ttl1, T0),
        Out::Drop(Reason::TtlExpired)
    );
    assert_eq!(inb(&mut w, 1, &later, T0), Out::Drop(Reason::WrongUplink));
    let (_, d) = inb(&mut w, 0, &later, T0).tun();
    assert_eq!(ip4_dst(&d[22..]), POD);
    assert_eq!(d[22 + 8], 59);
}

#[test]
fn expiry_sweeps_flows_and_frees_their_ports_for_reuse_later() {
    let gw = gateway_with(
        conntrack::Config::default(),
        PortRange {
            min: 3000,
            max: 3000,
        },
    );
    let mut w = Worker::new(gw.clone(), 11);
    assert!(matches!(
        out(&mut w, &pod_udp(SERVER, 9100, 53, b"x"), T0),
        Out::Fwd { .. }
    ));
    // The only port is taken.
    assert!(matches!(
        out(&mut w, &pod_udp(SERVER, 9101, 53, b"x"), T0),
        Out::Tun { .. }
    ));
    // UDP idles out after 300 s; the sweep removes it; the port waits out its 120 s reuse delay.
    let t1 = Instant::from_secs(T0.as_secs() + 301);
    let mut removed = 0;
    for _ in 0..64 {
        removed += gw.expire(t1, 1 << 16);
    }
    assert_eq!(removed, 1);
    assert_eq!(gw.table().len(), 0);
    assert!(
        matches!(
            out(&mut w, &pod_udp(SERVER, 9101, 53, b"x"), t1),
            Out::Tun { .. }
        ),
        "still cooling"
    );
    let t2 = Instant::from_secs(T0.as_secs() + 301 + 121);
    let (_, _, f) = out(&mut w, &pod_udp(SERVER, 9101, 53, b"x"), t2).fwd();
    assert_eq!(l4_ports(&f[14..]).0, 3000);
}

/// Reassembles the IPv4 fragments carried by back-to-back VXLAN datagrams of `segment` bytes; checks every
/// piece on the way (VXLAN header, inner MACs, IPv4 checksum, size within `mtu`).
fn reassemble(dgrams: &[u8], segment: usize, mtu: usize) -> (Vec<u8>, usize) {
    let mut pieces: Vec<(usize, bool, Vec<u8>)> = Vec::new();
    let mut hdr = Vec::new();
    for unit in dgrams.chunks(segment) {
        assert_eq!(&unit[..8], &[0x08, 0, 0, 0, 0x00, 0x10, 0x01, 0]);
        assert_eq!(&unit[8..14], &NODE_MAC);
        let ip = &unit[22..];
        assert!(
            ip.len() <= mtu,
            "fragment of {} bytes exceeds the tunnel MTU",
            ip.len()
        );
        assert_eq!(
            ref_fold(ref_sum(&ip[..20], 0)),
            0xffff,
            "fragment header checksum"
        );
        let fo = u16::from_be_bytes([ip[6], ip[7]]);
        assert_eq!(fo & 0x4000, 0, "no DF on fragments");
        pieces.push((
            usize::from(fo & 0x1fff) * 8,
            fo & 0x2000 != 0,
            ip[20..].to_vec(),
        ));
        if hdr.is_empty() {
            hdr = ip[..20].to_vec();
        }
    }
    let n = pieces.len();
    let mut data = Vec::new();
    for (i, (off, more, piece)) in pieces.into_iter().enumerate() {
        assert_eq!(off, data.len(), "fragments contiguous and in order");
        assert_eq!(more, i + 1 < n, "MF on all but the last");
        data.extend_from_slice(&piece);
    }
    let mut ip = hdr;
    ip.extend_from_slice(&data);
    let total = ip.len() as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0;
    ip[7] = 0;
    fix_ipv4_checksum(&mut ip);
    (ip, n)
}

#[test]
fn replies_too_big_for_the_tunnel_without_df_are_fragmented_into_it() {
    let mut w = worker();
    let ext = open_udp(&mut w, 7900);
    let payload: Vec<u8> = (0..1472u32).map(|i| (i % 251) as u8).collect();
    let mut reply = outside_udp(SERVER, DMZ_EGRESS, 53, ext, &payload);
    assert_eq!(reply.len(), 14 + 1500);
    reply[14 + 6] &= !0x40; // etherparse sets DF; this sender lets routers fragment
    fix_ipv4_checksum(&mut reply[14..]);
    let Out::Tun {
        node,
        dgram,
        segment: Some(segment),
    } = inb(&mut w, 0, &reply, T0)
    else {
        panic!("expected fragments in the tunnel");
    };
    assert_eq!(node, NODE);
    assert_eq!(
        segment,
        8 + 14 + 20 + 1424,
        "1450-byte tunnel MTU: 1424 bytes of data per fragment"
    );
    let (ip, n) = reassemble(&dgram, segment, 1450);
    assert_eq!(n, 2);
    assert_eq!(ip4_dst(&ip), POD);
    assert_eq!(l4_ports(&ip), (53, 7900));
    assert_eq!(&ip[28..], &payload[..]);
    assert_checksums(&ip);

    // A reply that is itself a first fragment keeps MF on every piece.
    let big = outside_udp(SERVER, DMZ_EGRESS, 53, ext, &[0x42; 3000]);
    let (first, _) = ipv4_fragments(&big, 14, 1480, 0x2222);
    let Out::Tun {
        dgram,
        segment: Some(segment),
        ..
    } = inb(&mut w, 0, &first, T0)
    else {
        panic!("expected fragments");
    };
    for unit in dgram.chunks(segment) {
        assert_ne!(
            unit[22 + 6] & 0x20,
            0,
            "MF kept: more of the original datagram follows"
        );
    }
    // With DF the sender is told instead.
    let mut df = reply.clone();
    df[14 + 6] |= 0x40;
    fix_ipv4_checksum(&mut df[14..]);
    let (_, _, icmp) = inb(&mut w, 0, &df, T0).fwd();
    assert_eq!((icmp[14 + 20], icmp[14 + 21]), (3, 4));
}

#[test]
fn icmpv6_errors_quoting_extension_headers_are_translated() {
    let mut w = worker();
    let (_, _, f) = out(&mut w, &pod_udp6(SERVER6, 6100, 53, b"v6 query"), T0).fwd();
    let ext = l4_ports(&f[14..]).0;
    // The quote: IPv6 header (egress → server, next header 60), 8 bytes of destination options (next 17,
    // PadN), then the UDP header as we sent it.
    let mut quote = vec![0x60, 0, 0, 0, 0, 16, 60, 63];
    quote.extend_from_slice(&DMZ_EGRESS6.octets());
    quote.extend_from_slice(&SERVER6.octets());
    quote.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    quote.extend_from_slice(&ext.to_be_bytes());
    quote.extend_from_slice(&[0, 53, 0, 16, 0, 0]);
    let mut icmp = vec![2u8, 0, 0, 0, 0, 0, 0x05, 0x00]; // packet too big, MTU 1280
    icmp.extend_from_slice(&quote);
    let router: [u8; 16] = SERVER6.octets();
    let mut ps = ref_sum(&router, 0) + ref_sum(&DMZ_EGRESS6.octets(), 0);
    ps += icmp.len() as u32 + 58;
    let c = !ref_fold(ref_sum(&icmp, ps));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv6(
        router,
        DMZ_EGRESS6.octets(),
        60,
    );
    let frame = build(|o| b.write(o, etherparse::IpNumber::IPV6_ICMP, &icmp));
    let (node, d) = inb(&mut w, 0, &frame, T0).tun();
    assert_eq!(node, NODE);
    let ip = &d[22..];
    assert_eq!(&ip[24..40], &POD6.octets(), "outer destination: the pod");
    let q = &ip[48..];
    assert_eq!(&q[8..24], &POD6.octets(), "quoted source restored");
    assert_eq!(
        u16::from_be_bytes([q[48], q[49]]),
        6100,
        "quoted port restored past the options header"
    );
    assert_checksums(ip);
}

/// The tunnel intake checks the sender and the VNI before it does anything else with a datagram: a TCP
/// super-packet (larger than the tunnel MTU) from a host that is not an allowed node, or with another VNI,
/// is dropped and counted, never segmented. From an allowed node, the same datagram with a TCP data offset
/// below 5 (the remote crash once) is refused as malformed and never cut either.
#[test]
fn tunnel_intake_checks_the_sender_before_any_work() {
    let mut w = worker();
    let big = pod_tcp(SERVER, 40000, 80, false, &[9u8; 3000]);
    let stranger = Ipv4Addr::new(192, 0, 2, 66);
    let mut d = big.clone();
    assert_eq!(
        w.tunnel_intake(stranger, &mut d, 1450, 1450),
        Intake::Drop(Reason::VxlanSourceNotAllowed)
    );
    assert_eq!(d, big, "nothing touched the refused datagram");
    let mut other_vni = vxlan(VNI + 1, &big[8..]);
    assert_eq!(
        w.tunnel_intake(NODE, &mut other_vni, 1450, 1450),
        Intake::Drop(Reason::VxlanWrongVni)
    );
    assert_eq!(w.stats().dropped(Reason::VxlanSourceNotAllowed), 1);
    assert_eq!(w.stats().dropped(Reason::VxlanWrongVni), 1);
    // From a node it is a super-packet to cut.
    let mut d = big.clone();
    assert!(matches!(
        w.tunnel_intake(NODE, &mut d, 1450, 1450),
        Intake::Segment(_)
    ));
    // The crash: data offset 2, a last segment of 1..5 bytes. Not cut; the pipeline drops it.
    for doff in 0..5u8 {
        for payload in 1422..1430 {
            let mut d = pod_tcp(SERVER, 40000, 80, false, &vec![1u8; payload]);
            d[8 + 14 + 20 + 12] = doff << 4;
            match w.tunnel_intake(NODE, &mut d, 1450, 1450) {
                Intake::Segment(h) => panic!("doff {doff}, payload {payload}: cut with {h:?}"),
                Intake::Translate { .. } => {
                    let len = d.len();
                    d.resize(len + 1600, 0);
                    assert!(matches!(
                        owned(w.outbound(NODE, &mut d, len, Instant::from_secs(1))),
                        Out::Drop(_)
                    ));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// A TCP super-packet of `payload` from the pod (VXLAN datagram), its TCP checksum either complete or, as
/// the node's kernel leaves it for offload, only the pseudo-header sum (`partial`).
fn pod_super(payload: &[u8], partial: bool) -> Vec<u8> {
    let mut d = pod_tcp(SERVER, 40000, 80, false, payload);
    if partial {
        let ip = &d[8 + 14..];
        let tcp_len = ip.len() - 20;
        let ps = ref_sum(&ip[12..20], 0) + tcp_len as u32 + 6;
        let c = ref_fold(ps).to_be_bytes();
        d[8 + 14 + 20 + 16..8 + 14 + 20 + 18].copy_from_slice(&c);
    }
    d
}

/// Cuts `frame` (a complete Ethernet frame) as the kernel's GSO would, with complete checksums.
fn segment_as_kernel(frame: &[u8], h: &offload::VnetHdr) -> Vec<Vec<u8>> {
    let mut bufs = vec![vec![0u8; 2048]; 64];
    let mut lens = Vec::new();
    let mut it = bufs.iter_mut();
    offload::segment(frame, h, |_| it.next().map(|b| &mut b[..]), &mut lens, true).unwrap();
    bufs.iter()
        .zip(&lens)
        .map(|(b, &n)| b[..n].to_vec())
        .collect()
}

/// A super-packet translated whole and then cut by the kernel gives exactly the segments the
/// segment-then-translate path gives (same egress address and port, TTL, IP IDs, sequence numbers, flags,
/// checksums), whether the sender's checksum was complete or partial, and the header asks for
/// segments of the size the intake chose.
#[test]
fn a_super_packet_translated_whole_leaves_as_its_segments_would() {
    for partial in [false, true] {
        let mut w = worker();
        out(&mut w, &pod_tcp(SERVER, 40000, 80, true, &[]), T0).fwd();
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let d = pod_super(&payload, partial);
        let h = match w.tunnel_intake(NODE, &mut d.clone(), 1450, 1450) {
            Intake::Segment(h) => h,
            other => panic!("not a super-packet: {other:?}"),
        };

        let slot = 2048;
        let mut segs = vec![0u8; slot * 64];
        let mut lens = Vec::new();
        let mut cut_first = Vec::new();
        w.outbound_segmented(NODE, &d, &h, &mut segs, slot, &mut lens, T0, |_, a| {
            let (_, _, mut f) = owned(a).fwd();
            assert!(offload::fill_checksums(&mut f));
            cut_first.push(f);
        })
        .unwrap();

        let mut buf = vec![0u8; d.len() + 2048];
        buf[..d.len()].copy_from_slice(&d);
        let (a, vnet) = w.outbound_whole(NODE, &mut buf, d.len(), &h, T0);
        let (uplink, next_hop, whole) = owned(a).fwd();
        assert_eq!((uplink, next_hop), (0, any_ip(DMZ_ROUTER)));
        assert_eq!(vnet.gso_size, h.gso_size);
        assert!(vnet.is_gso());
        assert_eq!(ip4_src(&whole[14..]), DMZ_EGRESS);
        let cut_after = segment_as_kernel(&whole, &vnet);

        assert_eq!(cut_after.len(), cut_first.len(), "partial: {partial}");
        for (k, (a, b)) in cut_after.iter().zip(&cut_first).enumerate() {
            assert_checksums(&a[14..]);
            assert!(a == b, "segment {k} differs (partial: {partial})");
        }
        let carried: Vec<u8> = cut_after
            .iter()
            .flat_map(|f| f[14 + 40..].to_vec())
            .collect();
        assert_eq!(carried, payload);
    }
}

/// The uplink's MTU is checked against the segments a super-packet leaves as, not its own length: one
/// whose segments fit is forwarded whole; one whose segments would not fit is answered, as a packet of
/// that size would be, with ICMP too-big (DF) to the pod; a SYN is never cut, so it is checked whole.
#[test]
fn a_super_packet_is_checked_against_the_mtu_of_its_segments() {
    let mut w = worker();
    out(&mut w, &pod_tcp(SERVER, 40000, 80, true, &[]), T0).fwd();
    let mut d = pod_super(&[3u8; 9000], true);
    d[8 + 14 + 6] |= 0x40; // DF
    fix_ipv4_checksum(&mut d[8 + 14..]);
    let h = match w.tunnel_intake(NODE, &mut d.clone(), 1450, 1450) {
        Intake::Segment(h) => h,
        other => panic!("not a super-packet: {other:?}"),
    };
    let run = |w: &mut Worker, d: &[u8], h: &offload::VnetHdr| {
        let mut buf = vec![0u8; d.len() + 2048];
        buf[..d.len()].copy_from_slice(d);
        owned(w.outbound_whole(NODE, &mut buf, d.len(), h, T0).0)
    };
    let (_, _, f) = run(&mut w, &d, &h).fwd();
    assert_eq!(
        f.len(),
        d.len() - 8,
        "forwarded whole, 9,000 bytes of payload"
    );

    // Segments of 1,461 payload bytes are 1,501-byte packets: one more than the DMZ uplink carries.
    let too_big = offload::VnetHdr {
        gso_size: 1461,
        ..h
    };
    let (node, icmp) = run(&mut w, &d, &too_big).tun();
    assert_eq!(node, NODE);
    assert_eq!((icmp[8 + 14 + 20], icmp[8 + 14 + 21]), (3, 4), "too big");
    let fits = offload::VnetHdr {
        gso_size: 1460,
        ..h
    };
    run(&mut w, &d, &fits).fwd();

    let mut syn = pod_tcp(SERVER, 40001, 80, true, &[5u8; 3000]);
    syn[8 + 14 + 6] |= 0x40;
    fix_ipv4_checksum(&mut syn[8 + 14..]);
    let h = match w.tunnel_intake(NODE, &mut syn.clone(), 1450, 1450) {
        Intake::Segment(h) => h,
        other => panic!("not a super-packet: {other:?}"),
    };
    let len = syn.len();
    syn.resize(len + 2048, 0);
    let r = owned(w.outbound_whole(NODE, &mut syn, len, &h, T0).0);
    assert!(matches!(r, Out::Tun { .. }), "a big SYN is refused: {r:?}");
}

#[test]
fn a_reload_that_removes_an_uplink_keeps_every_packet_accounted_for() {
    let mut w = worker();
    // Out of the internal uplink (1) and back in on it; an unsolicited packet in on it.
    let (uplink, _, frame) = out(&mut w, &pod_udp(INTERNAL_SERVER, 5000, 53, b"q"), T0).fwd();
    assert_eq!(uplink, 1);
    let (external, _) = l4_ports(&frame[14..]);
    let reply = outside_udp(INTERNAL_SERVER, INT_EGRESS, 53, external, b"a");
    inb(&mut w, 1, &reply, T0).tun();
    assert!(matches!(
        inb(
            &mut w,
            1,
            &outside_udp(INTERNAL_SERVER, INT_EGRESS, 53, 1, b"x"),
            T0
        ),
        Out::Drop(Reason::NoFlow)
    ));
    let received = w.stats().received();
    assert_eq!(received, 3);

    // The reload keeps the DMZ only: the internal uplink's counters leave `uplink_rx`/`uplink_tx`, and
    // the balance still holds.
    let mut config = config();
    config.uplinks.truncate(1);
    config.routes.retain(|&(_, u)| u == 0);
    let gw =
        Arc::new(Gateway::new(config, conntrack::Config::default(), PortRange::default()).unwrap());
    w.set_gateway(gw);
    assert_eq!(w.stats().uplink_rx.len(), 1);
    assert_eq!(w.stats().received(), received);
    assert_accounted(&w);
    out(&mut w, &pod_udp(SERVER, 5001, 53, b"q"), T0).fwd();
    assert_eq!(w.stats().received(), received + 1);
}
