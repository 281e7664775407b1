//! Serving a dead peer: replica B keeps passive copies of replica A's flows (as state sync installs them)
//! and, only while it serves A, translates A's established connections with A's egress address and external
//! port, both ways.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use common::*;
use forwarder_core::conntrack::{self, FlowImage, Table, TcpState};
use forwarder_core::flow::{FlowKey, Proto};
use forwarder_core::pipeline::{
    tunnel_mac, Config, Gateway, Standby, StandbyPeer, TunnelPacket, UplinkPacket, Worker,
};
use forwarder_core::ports::{PortPools, PortRange};
use forwarder_core::sync::wire::FlowRecord;
use forwarder_core::{Instant, Reason};
use proptest::prelude::*;

/// Replica A's egress addresses (B's are `DMZ_EGRESS`, `DMZ_EGRESS6`, `INT_EGRESS`).
const A_EGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const A_EGRESS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x11);
const A_INT: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 11);
/// A's ordinal in the gateway set.
const A: u16 = 1;

const T0: Instant = Instant::from_secs(100);
const T1: Instant = Instant::from_secs(105);

fn small() -> conntrack::Config {
    conntrack::Config {
        max_entries: 4096,
        ..conntrack::Config::default()
    }
}

/// A's configuration: B's, with A's egress addresses.
fn config_a() -> Config {
    let mut c = config();
    c.uplinks[0].egress_v4 = vec![A_EGRESS];
    c.uplinks[0].egress_v6 = vec![A_EGRESS6];
    c.uplinks[1].egress_v4 = vec![A_INT];
    c
}

fn a_egress() -> Vec<IpAddr> {
    vec![
        IpAddr::V4(A_EGRESS),
        IpAddr::V6(A_EGRESS6),
        IpAddr::V4(A_INT),
    ]
}

/// Replica A's flows, as state sync would carry them at `T1`: an established TCP connection
/// (pod:40000 → SERVER:443) and a UDP flow (pod:7100 → SERVER:53). Returns the images and the external
/// ports of the two.
fn flows_of_a() -> (Vec<FlowImage>, u16, u16) {
    let gw = Arc::new(Gateway::new(config_a(), small(), PortRange::default()).unwrap());
    let mut a = Worker::new(gw.clone(), 11);
    let (_, _, syn) = out(&mut a, &pod_tcp(SERVER, 40000, 443, true, &[]), T0).fwd();
    assert_eq!(ip4_src(&syn[14..]), A_EGRESS);
    let tcp_port = l4_ports(&syn[14..]).0;
    let syn_ack = outside_tcp(SERVER, A_EGRESS, 443, tcp_port, "SA", 4999, 1001);
    assert!(matches!(inb(&mut a, 0, &syn_ack, T0), Out::Tun { .. }));
    let _ = out(&mut a, &pod_tcp(SERVER, 40000, 443, false, b"GET /"), T0).fwd();
    let (_, _, udp) = out(&mut a, &pod_udp(SERVER, 7100, 53, b"query"), T0).fwd();
    let udp_port = l4_ports(&udp[14..]).0;

    let g = gw.pin();
    let mut images = Vec::new();
    gw.table().for_each(&g, |f| {
        // through the sync record, as the peer receives it
        let rec = FlowRecord::from_image(&f.image(T1), A, 0);
        images.push(rec.to_image(f.uplink()));
    });
    assert_eq!(images.len(), 2);
    let tcp = images.iter().find(|i| i.new.orig.proto == Proto::Tcp);
    assert_eq!(tcp.unwrap().tcp.state(), TcpState::Established);
    (images, tcp_port, udp_port)
}

/// Replica B: its own gateway, with A's copies installed (not served).
fn replica_b(images: &[FlowImage]) -> (Worker, Arc<Standby>) {
    let copies = Table::new(small(), PortPools::new(&a_egress(), PortRange::default()));
    let g = copies.pin();
    for img in images {
        copies.install(img, T1, &g).unwrap();
    }
    drop(g);
    let standby = Arc::new(Standby::new(vec![StandbyPeer::new(
        A,
        a_egress(),
        Arc::new(copies),
    )]));
    let gw = Gateway::new(config(), small(), PortRange::default())
        .unwrap()
        .with_standby(standby.clone());
    (Worker::new(Arc::new(gw), 5), standby)
}

fn copies(s: &Standby) -> &Table {
    s.peer(A).unwrap().table()
}

fn tcp_key(sport: u16) -> FlowKey {
    FlowKey {
        src: any_ip(POD),
        dst: any_ip(SERVER),
        src_port: sport,
        dst_port: 443,
        proto: Proto::Tcp,
    }
}

/// A TCP segment from the pod with the given flags (etherparse letters: S, A, R, F).
fn pod_tcp_flags(sport: u16, flags: &str) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        64,
    );
    let mut t = b.tcp(sport, 443, 2000, 64240);
    if flags.contains('S') {
        t = t.syn();
    }
    if flags.contains('A') {
        t = t.ack(5000);
    }
    if flags.contains('R') {
        t = t.rst();
    }
    if flags.contains('F') {
        t = t.fin();
    }
    vxlan(VNI, &build(|o| t.write(o, &[])))
}

/// While B does not serve A, a pod's packet of A's connection that reaches B (the node agents moved it
/// before B declared A dead, or A is alive but not ready) goes out as A sends it — A's egress address and
/// external port — and A, which owns the address, gets the reply: a reply to A's address reaching B is
/// unsolicited. Once B serves A, it translates both ways: back to the pod through the node.
#[test]
fn a_peers_flows_go_out_as_the_peer_and_come_back_only_while_served() {
    let (images, port, _) = flows_of_a();
    let (mut b, standby) = replica_b(&images);
    let data = pod_tcp(SERVER, 40000, 443, false, b"more");
    let reply = outside_tcp(SERVER, A_EGRESS, 443, port, "A", 5000, 1005);

    // not served: out as A sends it; the reply is A's business
    assert!(!standby.serving_any());
    let (_, _, frame) = out(&mut b, &data, T1).fwd();
    assert_eq!(ip4_src(&frame[14..]), A_EGRESS, "out as A sends it");
    assert_eq!(l4_ports(&frame[14..]), (port, 443));
    assert_eq!(b.stats().tcp_resets_sent, 0);
    // a connection no replica knows gets its reset
    let unknown = pod_tcp(SERVER, 40999, 443, false, b"more");
    assert!(
        matches!(out(&mut b, &unknown, T1), Out::Tun { .. }),
        "a reset"
    );
    assert_eq!(b.stats().tcp_resets_sent, 1);
    assert_eq!(inb(&mut b, 0, &reply, T1), Out::Drop(Reason::NoFlow));
    assert_eq!(b.stats().dropped(Reason::NoFlow), 1);
    assert_eq!((b.stats().standby_out, b.stats().standby_in), (1, 0));
    assert!(standby.served_addresses().is_empty());

    // served
    assert!(standby.set_serving(A, true));
    assert!(!standby.set_serving(A, true), "no change the second time");
    assert!(standby.is_serving(A) && standby.serving_any());
    assert_eq!(standby.served_addresses(), a_egress());
    let (uplink, hop, frame) = out(&mut b, &data, T1).fwd();
    assert_eq!((uplink, hop), (0, any_ip(DMZ_ROUTER)));
    let ip = &frame[14..];
    assert_eq!(ip4_src(ip), A_EGRESS, "A's egress address");
    assert_eq!(l4_ports(ip), (port, 443), "A's external port");
    assert_checksums(ip);

    let (node, d) = inb(&mut b, 0, &reply, T1).tun();
    assert_eq!(node, NODE);
    assert_eq!(&d[8..14], &NODE_MAC);
    let ip = &d[22..];
    assert_eq!((ip4_src(ip), ip4_dst(ip)), (SERVER, POD));
    assert_eq!(l4_ports(ip), (443, 40000));
    assert_checksums(ip);

    // from another VLAN it is still spoofed
    assert_eq!(inb(&mut b, 1, &reply, T1), Out::Drop(Reason::WrongUplink));

    let s = b.stats();
    assert_eq!((s.standby_out, s.standby_in), (2, 1));
    assert_eq!(s.flows_created, 0);
    assert_eq!(
        b.gateway().table().len(),
        0,
        "nothing copied into B's own table"
    );
    assert_eq!(copies(&standby).len(), 2);
    let g = copies(&standby).pin();
    let f = copies(&standby).lookup_outbound_at(&tcp_key(40000), T1, &g);
    assert_eq!(f.unwrap().counters().packets_out, 2, "counted on the copy");
}

/// While B serves A, a new connection of the pod gets a flow of B's own, with B's egress address; a SYN
/// for the tuple of a copy that is over (reset) does too, and leaves the copy as it was.
#[test]
fn new_connections_while_serving_get_the_replicas_own_address() {
    let (images, port, _) = flows_of_a();
    let (mut b, standby) = replica_b(&images);
    standby.set_serving(A, true);

    let (_, _, f) = out(&mut b, &pod_tcp(SERVER, 40001, 443, true, &[]), T1).fwd();
    assert_eq!(ip4_src(&f[14..]), DMZ_EGRESS);
    assert_eq!(b.stats().flows_created, 1);

    // the pod resets A's connection through the copy, then opens the same tuple again
    let (_, _, f) = out(&mut b, &pod_tcp_flags(40000, "R"), T1).fwd();
    assert_eq!(l4_ports(&f[14..]).0, port);
    let (_, _, f) = out(&mut b, &pod_tcp_flags(40000, "S"), T1).fwd();
    assert_eq!(ip4_src(&f[14..]), DMZ_EGRESS, "a new local flow");
    assert_eq!(b.stats().flows_created, 2);
    assert_eq!(b.stats().standby_out, 1, "the reset only");
    let g = copies(&standby).pin();
    let copy = copies(&standby).lookup_outbound_at(&tcp_key(40000), T1, &g);
    assert_eq!(copy.unwrap().tcp_state(), TcpState::Closed, "not reopened");
    // the new connection's packets stay on the local flow
    let (_, _, f) = out(&mut b, &pod_tcp(SERVER, 40000, 443, false, b"x"), T1).fwd();
    assert_eq!(ip4_src(&f[14..]), DMZ_EGRESS);
}

/// Serving stops again: replies to A's address are A's business again; the pod's packets still go out as
/// A sends them.
#[test]
fn unserving_stops_the_translation() {
    let (images, port, udp_port) = flows_of_a();
    let (mut b, standby) = replica_b(&images);
    let data = pod_tcp(SERVER, 40000, 443, false, b"more");
    let reply = outside_udp(SERVER, A_EGRESS, 53, udp_port, b"answer");
    standby.set_serving(A, true);
    assert_eq!(ip4_src(&out(&mut b, &data, T1).fwd().2[14..]), A_EGRESS);
    assert!(matches!(inb(&mut b, 0, &reply, T1), Out::Tun { .. }));

    assert!(standby.set_serving(A, false));
    assert!(!standby.set_serving(A, false));
    assert!(!standby.serving_any() && !standby.is_serving(A));
    assert!(standby.served_addresses().is_empty());
    assert_eq!(
        ip4_src(&out(&mut b, &data, T1).fwd().2[14..]),
        A_EGRESS,
        "still out as A sends it"
    );
    assert_eq!(inb(&mut b, 0, &reply, T1), Out::Drop(Reason::NoFlow));
    let tcp_reply = outside_tcp(SERVER, A_EGRESS, 443, port, "A", 5000, 1005);
    assert_eq!(inb(&mut b, 0, &tcp_reply, T1), Out::Drop(Reason::NoFlow));
    assert_eq!(b.stats().standby_out, 2);
    assert_eq!(b.stats().standby_in, 1);
    // unknown peers change nothing
    assert!(!standby.set_serving(9, true));
    assert!(!standby.serving_any());
}

/// ICMP errors about a served copy's packets are translated both ways: from outside (port unreachable
/// quoting what left with A's address) to the pod, and from the pod (quoting a reply it got) to outside.
#[test]
fn icmp_errors_about_a_served_flow_are_translated() {
    let (images, _, udp_port) = flows_of_a();
    let (mut b, standby) = replica_b(&images);
    standby.set_serving(A, true);
    let (_, _, sent) = out(&mut b, &pod_udp(SERVER, 7100, 53, b"query"), T1).fwd();
    let ip = &sent[14..];
    assert_eq!((ip4_src(ip), l4_ports(ip).0), (A_EGRESS, udp_port));

    // from outside: port unreachable quoting what was sent
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&ip[..28]);
    let c = !ref_fold(ref_sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let router = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
        DMZ_ROUTER.octets(),
        A_EGRESS.octets(),
        60,
    );
    let err = build(|o| router.write(o, etherparse::IpNumber::ICMP, &icmp));
    let (node, d) = inb(&mut b, 0, &err, T1).tun();
    assert_eq!(node, NODE);
    let ip = &d[22..];
    assert_eq!(ip4_dst(ip), POD);
    assert_eq!(ip4_src(&ip[28..]), POD, "quoted source back to the pod");
    assert_eq!(l4_ports(&ip[28..]), (7100, 53));
    assert_checksums(ip);

    // from the pod: port unreachable about a reply it received
    let reply = outside_udp(SERVER, POD, 53, 7100, b"answer");
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&reply[14..14 + 28]);
    let c = !ref_fold(ref_sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let pod = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        64,
    );
    let err = vxlan(
        VNI,
        &build(|o| pod.write(o, etherparse::IpNumber::ICMP, &icmp)),
    );
    let (uplink, _, f) = out(&mut b, &err, T1).fwd();
    assert_eq!(uplink, 0);
    let ip = &f[14..];
    assert_eq!(ip4_src(ip), A_EGRESS, "outer source: A's address");
    assert_eq!(
        ip4_dst(&ip[28..]),
        A_EGRESS,
        "quoted destination: A's address"
    );
    assert_eq!(l4_ports(&ip[28..]), (53, udp_port));
    assert_checksums(ip);

    let s = b.stats();
    assert_eq!((s.standby_out, s.standby_in), (2, 1));
}

/// Fragments of a served copy's datagrams follow their first fragment both ways: out with A's address,
/// back to the pod through the node.
#[test]
fn fragments_of_a_served_flow_follow_their_first() {
    let (images, _, udp_port) = flows_of_a();
    let (mut b, standby) = replica_b(&images);
    standby.set_serving(A, true);
    let (first, later) = ipv4_fragments(&pod_udp(SERVER, 7100, 53, &[0xab; 2000]), 22, 1008, 0x55);
    for f in [first, later] {
        let (uplink, _, frame) = out(&mut b, &f, T1).fwd();
        assert_eq!((uplink, ip4_src(&frame[14..])), (0, A_EGRESS));
    }
    let reply = outside_udp(SERVER, A_EGRESS, 53, udp_port, &[0xcd; 2000]);
    let (first, later) = ipv4_fragments(&reply, 14, 1008, 0x66);
    for f in [first, later] {
        let (node, d) = inb(&mut b, 0, &f, T1).tun();
        assert_eq!((node, ip4_dst(&d[22..])), (NODE, POD));
    }
    // the first fragments looked the copy up; the later ones followed them
    assert_eq!((b.stats().standby_out, b.stats().standby_in), (1, 1));
    assert_eq!(b.gateway().table().len(), 0);
}

/// The pod's packets of one chunk, and the replies to them, through the batch calls and one by one while
/// B serves A: the same actions and counters. The chunk mixes A's connection, a reset of it followed by a
/// SYN of its tuple (a new local flow), new flows with data right behind their SYN, and A's UDP flow.
#[test]
fn batches_through_copies_give_the_same_results_as_one_by_one() {
    let (images, port, udp_port) = flows_of_a();
    let (first, later) = ipv4_fragments(&pod_udp(SERVER, 7100, 53, &[0xcd; 2000]), 22, 1008, 0x77);
    let inputs: Vec<Vec<u8>> = vec![
        pod_tcp(SERVER, 40000, 443, false, b"A's connection"),
        pod_udp(SERVER, 7100, 53, b"A's UDP flow"),
        first,
        later,
        pod_tcp(SERVER, 41000, 443, true, &[]),
        pod_tcp(SERVER, 41000, 443, false, b"data right behind its SYN"),
        pod_udp(SERVER, 41001, 53, b"new"),
        pod_tcp_flags(40000, "R"),
        pod_tcp_flags(40000, "S"),
        pod_tcp(SERVER, 40000, 443, false, b"the new connection"),
        pod_tcp(SERVER, 41002, 443, false, b"no SYN"),
    ];
    let replies: Vec<Vec<u8>> = vec![
        outside_udp(SERVER, A_EGRESS, 53, udp_port, b"to A's flow"),
        outside_tcp(SERVER, A_EGRESS, 443, port, "A", 5000, 1005),
        outside_udp(
            SERVER,
            A_EGRESS,
            53,
            udp_port.wrapping_add(1),
            b"unsolicited",
        ),
        outside_udp(SERVER, INT_EGRESS, 53, udp_port, b"not A's"),
    ];

    let run = |batched: bool| {
        let (mut b, standby) = replica_b(&images);
        standby.set_serving(A, true);
        let mut got = Vec::new();
        if batched {
            let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|d| padded(d, 0)).collect();
            let mut batch: Vec<TunnelPacket<'_>> = bufs
                .iter_mut()
                .zip(&inputs)
                .map(|(buf, d)| TunnelPacket {
                    from: NODE,
                    buf: buf.as_mut_slice(),
                    len: d.len(),
                })
                .collect();
            b.outbound_batch(&mut batch, T1, |_, a| got.push(owned(a)));
            let mut bufs: Vec<Vec<u8>> = replies.iter().map(|r| padded(r, HEADROOM)).collect();
            let mut batch: Vec<UplinkPacket<'_>> = bufs
                .iter_mut()
                .zip(&replies)
                .map(|(buf, r)| UplinkPacket {
                    buf: buf.as_mut_slice(),
                    start: HEADROOM,
                    len: r.len(),
                })
                .collect();
            b.inbound_batch(0, &mut batch, T1, |_, a| got.push(owned(a)));
        } else {
            got.extend(inputs.iter().map(|d| out(&mut b, d, T1)));
            got.extend(replies.iter().map(|r| inb(&mut b, 0, r, T1)));
        }
        (got, b, standby)
    };
    let (want, one, _) = run(false);
    let (got, batched, standby) = run(true);
    assert_eq!(got, want);
    let (s1, s2) = (one.stats(), batched.stats());
    assert_eq!(s2.drops, s1.drops);
    assert_eq!(s2.flows_created, s1.flows_created);
    assert_eq!(
        (s2.standby_out, s2.standby_in),
        (s1.standby_out, s1.standby_in)
    );
    // A's connection, A's UDP flow and its first fragment, the reset; the two replies to A's flows
    assert_eq!((s2.standby_out, s2.standby_in), (4, 2));
    assert_eq!(s2.flows_created, 3);
    assert_eq!(s2.dropped(Reason::NoFlow), 2);
    assert_eq!(copies(&standby).len(), 2);
}

/// `d` with `headroom` bytes in front and 2048 spare bytes behind.
fn padded(d: &[u8], headroom: usize) -> Vec<u8> {
    let mut b = vec![0u8; headroom];
    b.extend_from_slice(d);
    b.resize(headroom + d.len() + 2048, 0);
    b
}

/// One step of the property test below.
#[derive(Debug, Clone)]
enum Step {
    Serve(bool),
    /// A segment of A's connection, or another of the pod's ports (`false`: a new connection's SYN).
    PodTcp {
        copy: bool,
        flags: &'static str,
    },
    /// A UDP datagram of A's flow, or of another port.
    PodUdp {
        copy: bool,
    },
    /// A reply to A's address: to A's UDP flow's port, or to another.
    Reply {
        copy: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        any::<bool>().prop_map(Step::Serve),
        (
            any::<bool>(),
            prop::sample::select(vec!["A", "S", "R", "F", "FA"])
        )
            .prop_map(|(copy, flags)| Step::PodTcp { copy, flags }),
        any::<bool>().prop_map(|copy| Step::PodUdp { copy }),
        any::<bool>().prop_map(|copy| Step::Reply { copy }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the pod and the outside send, and however serving is switched on and off, the data path
    /// never creates a flow in the copies' table, translates to A's address only A's flows, and translates
    /// a reply to A's address only while A is served and only when it matches a copy.
    #[test]
    fn packets_never_create_copies_and_replies_use_them_only_served(
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let (images, _, udp_port) = flows_of_a();
        let (mut b, standby) = replica_b(&images);
        for (i, s) in steps.iter().enumerate() {
            let serving = standby.is_serving(A);
            let now = Instant::from_millis(T1.as_millis() + i as u64);
            match *s {
                Step::Serve(on) => {
                    standby.set_serving(A, on);
                }
                Step::PodTcp { copy, flags } => {
                    let sport = if copy { 40000 } else { 42000 + i as u16 };
                    if let Out::Fwd { frame, .. } = out(&mut b, &pod_tcp_flags(sport, flags), now) {
                        prop_assert!(copy || ip4_src(&frame[14..]) != A_EGRESS);
                    }
                }
                Step::PodUdp { copy } => {
                    let sport = if copy { 7100 } else { 43000 + i as u16 };
                    let (_, _, f) = out(&mut b, &pod_udp(SERVER, sport, 53, b"q"), now).fwd();
                    prop_assert_eq!(ip4_src(&f[14..]) == A_EGRESS, copy, "A's flow out as A sends it");
                }
                Step::Reply { copy } => {
                    let port = if copy { udp_port } else { udp_port ^ 0x4000 };
                    let r = inb(&mut b, 0, &outside_udp(SERVER, A_EGRESS, 53, port, b"r"), now);
                    if serving && copy {
                        prop_assert!(matches!(r, Out::Tun { .. }), "{:?}", r);
                    } else {
                        prop_assert_eq!(r, Out::Drop(Reason::NoFlow));
                    }
                }
            }
            prop_assert_eq!(copies(&standby).len(), 2);
        }
    }
}
