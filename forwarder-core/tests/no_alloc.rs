//! Heap allocations on the per-packet path, counted by a global allocator that counts only on the thread that
//! asked for it (so that tests running in parallel do not count each other's allocations).
//!
//! What is checked, each test on its own worker after a warm-up (see below):
//! * `established_flows_both_ways_allocate_nothing`: UDP, TCP and ICMP echo flows that already exist, packets
//!   from the pod (`outbound`, `outbound_batch`) and replies from outside (`inbound`, `inbound_batch`), and the
//!   later fragment of a fragmented datagram following its first: zero allocations.
//! * `new_flows_allocate_nothing`: first UDP datagrams, first TCP SYNs and first ICMP echo requests of pod
//!   endpoints never seen before, each creating a conntrack entry and taking a new external port (checked:
//!   the table and the port pools grow by one per packet), one at a time and in batches: zero allocations.
//! * `super_packets_allocate_nothing`: TCP super-packets of an established flow both ways: from the node
//!   (`tunnel_intake`, then `outbound_whole`: translated whole) and from an uplink (`inbound_segmented`: cut
//!   into the caller's segment buffer and translated segment by segment): zero allocations.
//! * `drops_allocate_nothing`: every drop reason listed in that test, each checked to be counted under that
//!   reason exactly once per packet, and none creating state: zero allocations.
//! * `refused_new_flows_allocate_nothing`: new flows refused because the gateway drains, the table is full,
//!   the source's quota is used up or the port pool is exhausted: zero allocations.
//! * `flows_through_served_copies_allocate_nothing`: a dead peer's TCP and UDP flows, served from their
//!   passive copies ([`Standby`](forwarder_core::pipeline::Standby)), both ways, one at a time and in
//!   batches: zero allocations.
//!
//! Warm-up: before counting, each test pushes every kind of packet it counts through the same worker on the
//! same thread. That lets lazily initialised state settle; measured with `NO_ALLOC_BACKTRACE=1` on a fresh
//! worker, the first UDP datagram allocates 4 times and the first TCP SYN after it once: crossbeam-epoch's
//! first `pin` on a thread (the process-wide collector, once, and the thread's participant record), and each
//! port-pool lane (egress IP, protocol) building its port-state array when it hands out its first port
//! (`get_or_init` in ports.rs, once per lane).
//!
//! Not zero: a packet whose tuple's flow has *expired* but was not swept yet replaces that flow, and allocates
//! once (crossbeam-epoch's queue node when the retired slot's bag is flushed):
//! `replacing_an_expired_flow_allocates_at_most_once_in_the_epoch_flush` holds it to that bound. Not on the
//! per-packet path and not checked here: the expiry sweep (`Table::expire`), which flushes the same way.
//!
//! To see where an allocation comes from, run with `NO_ALLOC_BACKTRACE=1`: every counted allocation prints a
//! backtrace.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use forwarder_core::conntrack;
use forwarder_core::offload::VnetHdr;
use forwarder_core::pipeline::{tunnel_mac, Action, Intake, TunnelPacket, UplinkPacket, Worker};
use forwarder_core::ports::PortRange;
use forwarder_core::{Instant, Reason};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}
static BACKTRACE: AtomicBool = AtomicBool::new(false);

fn note_alloc() {
    if COUNTING.with(Cell::get) {
        ALLOCS.with(|a| a.set(a.get() + 1));
        if BACKTRACE.load(Ordering::Relaxed) && !IN_TRACE.with(Cell::get) {
            // Capturing and printing allocate: not counted, and not traced again.
            IN_TRACE.with(|t| t.set(true));
            COUNTING.with(|c| c.set(false));
            eprintln!(
                "counted allocation:\n{}",
                std::backtrace::Backtrace::force_capture()
            );
            COUNTING.with(|c| c.set(true));
            IN_TRACE.with(|t| t.set(false));
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; we only count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns what it returned and how many allocations (and reallocations) this thread made in it.
fn counted<R>(f: impl FnOnce() -> R) -> (R, usize) {
    BACKTRACE.store(
        std::env::var_os("NO_ALLOC_BACKTRACE").is_some(),
        Ordering::Relaxed,
    );
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCS.with(Cell::get))
}

/// Where a packet enters the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Through the tunnel, from this node.
    Out(Ipv4Addr),
    /// On this uplink.
    In(u8),
}

/// A pre-built packet and the buffer it is copied into before each pass (the worker rewrites in place).
struct Case {
    name: &'static str,
    dir: Dir,
    pkt: Vec<u8>,
}

/// What the worker did with a packet, without the borrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Did {
    Forward,
    ToTunnel,
    Neighbour,
    Drop(Reason),
}

fn push(w: &mut Worker, buf: &mut [u8], dir: Dir, pkt: &[u8], now: Instant) -> Did {
    let a = match dir {
        Dir::Out(node) => {
            buf[..pkt.len()].copy_from_slice(pkt);
            w.outbound(node, buf, pkt.len(), now)
        }
        Dir::In(uplink) => {
            buf[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(pkt);
            w.inbound(uplink, buf, HEADROOM, pkt.len(), now)
        }
    };
    match a {
        Action::Forward { .. } => Did::Forward,
        Action::ToTunnel { .. } => Did::ToTunnel,
        Action::Neighbour => Did::Neighbour,
        Action::Drop(r) => Did::Drop(r),
    }
}

/// Opens a flow with `pkt` (from the pod) and returns its external source port (for ICMP echo, the
/// external identifier).
fn open(w: &mut Worker, buf: &mut [u8], pkt: &[u8], now: Instant) -> u16 {
    buf[..pkt.len()].copy_from_slice(pkt);
    match w.outbound(NODE, buf, pkt.len(), now) {
        Action::Forward { frame, .. } if frame[14 + 9] == 1 => {
            u16::from_be_bytes([frame[14 + 24], frame[14 + 25]])
        }
        Action::Forward { frame, .. } => l4_ports(&frame[14..]).0,
        other => panic!("{other:?}"),
    }
}

fn ports_in_use(w: &Worker) -> u32 {
    w.gateway()
        .table()
        .pools()
        .usage()
        .iter()
        .map(|u| u.in_use)
        .sum()
}

const T0: Instant = Instant::from_secs(1);

#[test]
fn established_flows_both_ways_allocate_nothing() {
    let mut w = worker();
    let mut buf = vec![0u8; 4096];
    let udp_out = pod_udp(SERVER, 4000, 53, &[7; 18]);
    let udp_port = open(&mut w, &mut buf, &udp_out, T0);
    let udp_in = outside_udp(SERVER, DMZ_EGRESS, 53, udp_port, &[9; 18]);
    let syn = pod_tcp(SERVER, 40000, 443, true, &[]);
    let tcp_port = open(&mut w, &mut buf, &syn, T0);
    let syn_ack = outside_tcp(SERVER, DMZ_EGRESS, 443, tcp_port, "SAM", 5000, 1001);
    let tcp_out = pod_tcp(SERVER, 40000, 443, false, b"GET / HTTP/1.1\r\n");
    let tcp_in = outside_tcp(SERVER, DMZ_EGRESS, 443, tcp_port, "A", 5001, 1017);
    let ping = pod_ping(SERVER, 77);
    let ping_id = open(&mut w, &mut buf, &ping, T0);
    let pong = {
        let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
            SERVER.octets(),
            DMZ_EGRESS.octets(),
            60,
        );
        build(|o| b.icmpv4_echo_reply(ping_id, 1).write(o, b"abcdefgh"))
    };
    let (first, later) = ipv4_fragments(&pod_udp(SERVER, 4100, 53, &[0xab; 2000]), 22, 1008, 7);
    assert_eq!(
        push(&mut w, &mut buf, Dir::In(0), &syn_ack, T0),
        Did::ToTunnel
    );
    let cases = [
        (Dir::Out(NODE), &udp_out, Did::Forward),
        (Dir::In(0), &udp_in, Did::ToTunnel),
        (Dir::Out(NODE), &tcp_out, Did::Forward),
        (Dir::In(0), &tcp_in, Did::ToTunnel),
        (Dir::Out(NODE), &ping, Did::Forward),
        (Dir::In(0), &pong, Did::ToTunnel),
        (Dir::Out(NODE), &first, Did::Forward),
        (Dir::Out(NODE), &later, Did::Forward),
    ];
    // Warm-up.
    for (i, (dir, pkt, want)) in cases.iter().enumerate() {
        assert_eq!(push(&mut w, &mut buf, *dir, pkt, T0), *want, "case {i}");
    }
    let flows = w.gateway().table().len();
    let created = w.stats().flows_created;
    let (_, n) = counted(|| {
        for i in 0..5_000u64 {
            let now = Instant::from_millis(2_000 + i);
            for (dir, pkt, want) in &cases {
                assert_eq!(push(&mut w, &mut buf, *dir, pkt, now), *want);
            }
        }
    });
    assert_eq!(n, 0, "{n} heap allocations for established flows");
    assert_eq!(w.gateway().table().len(), flows);
    assert_eq!(w.stats().flows_created, created, "no flow was new");

    // The batch calls: 32 packets of each established flow per call.
    let n = batch_rounds(
        &mut w,
        &[&udp_out, &tcp_out, &ping],
        &[&udp_in, &tcp_in, &pong],
        300,
    );
    assert_eq!(
        n, 0,
        "{n} heap allocations in outbound_batch / inbound_batch"
    );
    assert_eq!(w.stats().flows_created, created, "no flow was new");
}

/// `rounds` rounds of one `outbound_batch` of 32 datagrams cycling through `outs` and one `inbound_batch` of
/// 32 frames cycling through `ins`, every packet forwarded; returns the heap allocations they made.
fn batch_rounds(w: &mut Worker, outs: &[&Vec<u8>], ins: &[&Vec<u8>], rounds: u64) -> usize {
    let mut out_bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 2048]).collect();
    let mut in_bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 2048]).collect();
    let (_, n) = counted(|| {
        for round in 0..rounds {
            let now = Instant::from_millis(30_000 + round);
            for (b, p) in out_bufs.iter_mut().zip(outs.iter().cycle()) {
                b[..p.len()].copy_from_slice(p);
            }
            let mut it = out_bufs.iter_mut().zip(outs.iter().cycle());
            let mut arr: [TunnelPacket<'_>; 32] = core::array::from_fn(|_| {
                let (b, p) = it.next().unwrap();
                TunnelPacket {
                    from: NODE,
                    buf: b.as_mut_slice(),
                    len: p.len(),
                }
            });
            w.outbound_batch(&mut arr, now, |_, a| {
                assert!(matches!(a, Action::Forward { .. }), "{a:?}");
            });
            for (b, p) in in_bufs.iter_mut().zip(ins.iter().cycle()) {
                b[HEADROOM..HEADROOM + p.len()].copy_from_slice(p);
            }
            let mut it = in_bufs.iter_mut().zip(ins.iter().cycle());
            let mut arr: [UplinkPacket<'_>; 32] = core::array::from_fn(|_| {
                let (b, p) = it.next().unwrap();
                UplinkPacket {
                    buf: b.as_mut_slice(),
                    start: HEADROOM,
                    len: p.len(),
                }
            });
            w.inbound_batch(0, &mut arr, now, |_, a| {
                assert!(matches!(a, Action::ToTunnel { .. }), "{a:?}");
            });
        }
    });
    n
}

#[test]
fn super_packets_allocate_nothing() {
    let mut w = worker();
    let mut buf = vec![0u8; 4096];
    let syn = pod_tcp(SERVER, 40000, 443, true, &[]);
    let tcp_port = open(&mut w, &mut buf, &syn, T0);
    let syn_ack = outside_tcp(SERVER, DMZ_EGRESS, 443, tcp_port, "SAM", 5000, 1001);
    assert_eq!(
        push(&mut w, &mut buf, Dir::In(0), &syn_ack, T0),
        Did::ToTunnel
    );
    // From the node: one VXLAN datagram carrying 20,000 bytes of TCP payload.
    let up = pod_tcp(SERVER, 40000, 443, false, &[5; 20_000]);
    let h_up = match w.tunnel_intake(NODE, &mut up.clone(), 1450, 1450) {
        Intake::Segment(h) => h,
        other => panic!("not a super-packet: {other:?}"),
    };
    // From the uplink: 20,000 bytes from the server in one frame, as GRO hands it over.
    let down = {
        let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
            .ipv4(SERVER.octets(), DMZ_EGRESS.octets(), 60)
            .tcp(443, tcp_port, 5001, 65160)
            .ack(1001);
        build(|o| b.write(o, &[6; 20_000]))
    };
    let h_down = VnetHdr {
        flags: 0,
        gso_type: 1, // VIRTIO_NET_HDR_GSO_TCPV4
        gso_size: 1400,
        csum_start: 34,
        csum_offset: 16,
    };
    let slot = 2048;
    let mut segments = vec![0u8; slot * 64];
    let mut lens = Vec::with_capacity(64);
    let mut whole = vec![0u8; up.len() + 2048];
    let mut run = |w: &mut Worker, now: Instant| {
        whole[..up.len()].copy_from_slice(&up);
        let (a, vnet) = w.outbound_whole(NODE, &mut whole, up.len(), &h_up, now);
        assert!(matches!(a, Action::Forward { .. }), "{a:?}");
        assert!(vnet.is_gso());
        let mut n = 0;
        let cut = w
            .inbound_segmented(
                0,
                &down,
                &h_down,
                &mut segments,
                slot,
                &mut lens,
                now,
                |_, a| {
                    assert!(matches!(a, Action::ToTunnel { .. }), "{a:?}");
                    n += 1;
                },
            )
            .unwrap();
        assert_eq!((cut, n), (15, 15));
    };
    run(&mut w, T0); // warm-up
    let created = w.stats().flows_created;
    let (_, n) = counted(|| {
        for i in 0..2_000u64 {
            run(&mut w, Instant::from_millis(2_000 + i));
        }
    });
    assert_eq!(n, 0, "{n} heap allocations for super-packets");
    assert_eq!(w.stats().flows_created, created, "no flow was new");
}

#[test]
fn new_flows_allocate_nothing() {
    const WARM: u16 = 64;
    const N: u16 = 3_000;
    let mut w = worker();
    let mut buf = vec![0u8; 4096];
    // Pod endpoints never seen before: UDP source port, TCP source port, ICMP identifier p.
    let make = |p: u16| {
        [
            pod_udp(SERVER, 10_000 + p, 53, &[1; 32]),
            pod_tcp(SERVER, 10_000 + p, 443, true, &[]),
            pod_ping(SERVER, 10_000 + p),
        ]
    };
    let warm: Vec<[Vec<u8>; 3]> = (0..WARM).map(make).collect();
    let timed: Vec<[Vec<u8>; 3]> = (WARM..WARM + N).map(make).collect();
    for pkts in &warm {
        for p in pkts {
            assert_eq!(push(&mut w, &mut buf, Dir::Out(NODE), p, T0), Did::Forward);
        }
    }
    let (flows, created, ports) = (
        w.gateway().table().len(),
        w.stats().flows_created,
        ports_in_use(&w),
    );
    let (_, n) = counted(|| {
        for (i, pkts) in timed.iter().enumerate() {
            let now = Instant::from_millis(2_000 + i as u64);
            for p in pkts {
                assert_eq!(push(&mut w, &mut buf, Dir::Out(NODE), p, now), Did::Forward);
            }
        }
    });
    let made = 3 * usize::from(N);
    assert_eq!(w.gateway().table().len() - flows, made, "one entry each");
    assert_eq!(w.stats().flows_created - created, made as u64);
    assert_eq!(
        (ports_in_use(&w) - ports) as usize,
        made,
        "one new external port each"
    );
    assert_eq!(n, 0, "{n} heap allocations creating {made} flows");

    // In batches of 32 new UDP flows, as the worker receives them.
    const ROUNDS: u16 = 100;
    let base = 20_000u16;
    let batches: Vec<Vec<Vec<u8>>> = (0..ROUNDS)
        .map(|r| {
            (0..32)
                .map(|i| pod_udp(SERVER, base + r * 32 + i, 53, &[2; 32]))
                .collect()
        })
        .collect();
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 2048]).collect();
    let (flows, ports) = (w.gateway().table().len(), ports_in_use(&w));
    let (_, n) = counted(|| {
        for (r, batch) in batches.iter().enumerate() {
            let now = Instant::from_millis(10_000 + r as u64);
            for (b, p) in bufs.iter_mut().zip(batch) {
                b[..p.len()].copy_from_slice(p);
            }
            let mut it = bufs.iter_mut().zip(batch);
            let mut arr: [TunnelPacket<'_>; 32] = core::array::from_fn(|_| {
                let (b, p) = it.next().unwrap();
                TunnelPacket {
                    from: NODE,
                    buf: b.as_mut_slice(),
                    len: p.len(),
                }
            });
            w.outbound_batch(&mut arr, now, |_, a| {
                assert!(matches!(a, Action::Forward { .. }), "{a:?}");
            });
        }
    });
    let made = 32 * usize::from(ROUNDS);
    assert_eq!(w.gateway().table().len() - flows, made);
    assert_eq!((ports_in_use(&w) - ports) as usize, made);
    assert_eq!(
        n, 0,
        "{n} heap allocations creating {made} flows in batches"
    );
}

/// Every drop reason these packets reach, each counted once per packet under exactly that reason.
fn drop_cases(w: &mut Worker, buf: &mut [u8]) -> Vec<(Case, Reason)> {
    let out = Dir::Out(NODE);
    let good = pod_tcp(SERVER, 41000, 443, true, &[]);
    let mut v = Vec::new();
    let mut case = |name, dir, pkt, r| v.push((Case { name, dir, pkt }, r));
    case(
        "tunnel from outside the node CIDRs",
        Dir::Out(Ipv4Addr::new(192, 168, 9, 9)),
        good.clone(),
        Reason::VxlanSourceNotAllowed,
    );
    let mut p = good.clone();
    p[6] = 0x11;
    case("wrong VNI", out, p, Reason::VxlanWrongVni);
    let mut p = good.clone();
    p[0] = 0;
    case("VXLAN without the I flag", out, p, Reason::VxlanBadFlags);
    case(
        "VXLAN truncated",
        out,
        good[..7].to_vec(),
        Reason::VxlanTruncated,
    );
    case(
        "inner Ethernet truncated",
        out,
        good[..8 + 10].to_vec(),
        Reason::EthernetTruncated,
    );
    let mut p = good.clone();
    p[8] = 0x02;
    case("other destination MAC", out, p, Reason::NotForUs);
    let mut p = good.clone();
    p[8 + 12..8 + 14].copy_from_slice(&[0x88, 0xcc]);
    case("LLDP in the tunnel", out, p, Reason::UnsupportedEtherType);
    case(
        "inner IPv4 truncated",
        out,
        good[..8 + 14 + 12].to_vec(),
        Reason::Ipv4Truncated,
    );
    let mut p = good.clone();
    p[8 + 14 + 10] ^= 0xff;
    case("IPv4 header checksum", out, p, Reason::Ipv4BadChecksum);
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        [10, 99, 0, 1],
        SERVER.octets(),
        64,
    );
    case(
        "inner source outside the pod CIDRs",
        out,
        vxlan(VNI, &build(|o| b.udp(1, 2).write(o, b"x"))),
        Reason::InnerSourceNotAllowed,
    );
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        [224, 0, 0, 5],
        64,
    );
    case(
        "multicast destination",
        out,
        vxlan(VNI, &build(|o| b.udp(1, 2).write(o, b"x"))),
        Reason::MartianAddress,
    );
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        64,
    );
    case(
        "GRE from the pod",
        out,
        vxlan(
            VNI,
            &build(|o| b.write(o, etherparse::IpNumber::GRE, &[0; 8])),
        ),
        Reason::UnsupportedProtocol,
    );
    case(
        "TCP ACK that opens nothing",
        out,
        pod_tcp(SERVER, 41001, 443, false, b"data"),
        Reason::TcpNoSynForNewFlow,
    );
    let (_, second) = ipv4_fragments(&pod_udp(SERVER, 41002, 53, &[0xab; 2000]), 22, 1008, 9);
    case(
        "later fragment before its first",
        out,
        second,
        Reason::FragmentNoFlow,
    );
    let mut tiny = pod_tcp(SERVER, 41003, 443, false, &[1; 16]);
    tiny[22 + 6] = 0;
    tiny[22 + 7] = 1;
    fix_ipv4_checksum(&mut tiny[22..]);
    case("TCP fragment at offset 8", out, tiny, Reason::TinyFragment);
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        POD.octets(),
        SERVER.octets(),
        1,
    );
    case(
        "TTL 1 (answered with time exceeded while the rate limit allows)",
        out,
        vxlan(VNI, &build(|o| b.udp(33434, 33435).write(o, b"trace"))),
        Reason::TtlExpired,
    );
    // Needs an established flow.
    let ext = open(w, buf, &pod_udp(SERVER, 41004, 53, b"q"), T0);
    case(
        "another node sending an existing pod flow",
        Dir::Out(Ipv4Addr::new(172, 18, 0, 77)),
        pod_udp(SERVER, 41004, 53, b"spoof"),
        Reason::FlowNodeMismatch,
    );
    let quoted = outside_udp(SERVER, POD, 53, 41004, b"a");
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    let c = !ref_fold(ref_sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let b = etherparse::PacketBuilder::ethernet2(NODE_MAC, tunnel_mac(GW)).ipv4(
        [10, 244, 9, 9],
        SERVER.octets(),
        64,
    );
    case(
        "ICMP error from a pod about another pod's flow",
        out,
        vxlan(
            VNI,
            &build(|o| b.write(o, etherparse::IpNumber::ICMP, &icmp)),
        ),
        Reason::IcmpErrorNotFromPeer,
    );

    // Inbound.
    case(
        "unsolicited SYN",
        Dir::In(0),
        outside_tcp(SERVER, DMZ_EGRESS, 443, 5555, "S", 1, 0),
        Reason::NoFlow,
    );
    case(
        "reply on the other uplink",
        Dir::In(1),
        outside_udp(SERVER, DMZ_EGRESS, 53, ext, b"a"),
        Reason::WrongUplink,
    );
    let mut p = outside_udp(SERVER, DMZ_EGRESS, 53, ext, b"a");
    p[12..14].copy_from_slice(&[0x88, 0xcc]);
    case(
        "LLDP on the uplink",
        Dir::In(0),
        p,
        Reason::UnsupportedEtherType,
    );
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
        SERVER.octets(),
        DMZ_EGRESS.octets(),
        60,
    );
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&[0x45; 28]);
    case(
        "ICMP error with a bad checksum",
        Dir::In(0),
        build(|o| b.write(o, etherparse::IpNumber::ICMP, &icmp)),
        Reason::IcmpBadChecksum,
    );
    let tcp_ext = open(w, buf, &pod_tcp(SERVER, 41005, 443, true, &[]), T0);
    case(
        "RST outside the window",
        Dir::In(0),
        outside_tcp(SERVER, DMZ_EGRESS, 443, tcp_ext, "R", 0x8000_0000, 0),
        Reason::TcpOutOfWindow,
    );
    v
}

#[test]
fn drops_allocate_nothing() {
    let mut w = worker();
    let mut buf = vec![0u8; 4096];
    let cases = drop_cases(&mut w, &mut buf);
    let count = |w: &Worker, r: Reason| w.stats().dropped(r);
    // Warm-up, and the check that each case is the drop it says.
    for (c, r) in &cases {
        let (before, total) = (count(&w, *r), w.stats().total_drops());
        let did = push(&mut w, &mut buf, c.dir, &c.pkt, T0);
        assert!(
            did == Did::Drop(*r)
                || did == Did::ToTunnel
                    && matches!(*r, Reason::TtlExpired | Reason::TcpNoSynForNewFlow),
            "{}: {did:?}, expected {r}",
            c.name
        );
        assert_eq!(count(&w, *r), before + 1, "{}: counted under {r}", c.name);
        assert_eq!(
            w.stats().total_drops(),
            total + 1,
            "{}: counted once",
            c.name
        );
    }
    let flows = w.gateway().table().len();
    let before: Vec<u64> = cases.iter().map(|(_, r)| count(&w, *r)).collect();
    const ROUNDS: u64 = 2_000;
    let (_, n) = counted(|| {
        for i in 0..ROUNDS {
            // Time moves, so the ICMP rate limit lets some time-exceeded answers out: both paths run.
            let now = Instant::from_millis(2_000 + i);
            for (c, _) in &cases {
                let did = push(&mut w, &mut buf, c.dir, &c.pkt, now);
                assert!(matches!(did, Did::Drop(_) | Did::ToTunnel), "{}", c.name);
            }
        }
    });
    assert_eq!(n, 0, "{n} heap allocations dropping");
    assert_eq!(w.gateway().table().len(), flows, "no state from drops");
    for ((c, r), b) in cases.iter().zip(before) {
        let same = cases.iter().filter(|(_, r2)| r2 == r).count() as u64;
        assert_eq!(count(&w, *r) - b, ROUNDS * same, "{}", c.name);
    }
}

#[test]
fn refused_new_flows_allocate_nothing() {
    let mut buf = vec![0u8; 4096];
    let fresh = |p: u16| pod_udp(SERVER, 50_000 + p, 53, b"new");
    // Each gateway refuses new flows for one reason; warm-up fills it to that point. A refused insert is
    // answered with ICMP administratively prohibited while the worker's ICMP rate limit allows (`ToTunnel`),
    // and dropped silently after; both are counted under the reason.
    let full = conntrack::Config {
        max_entries: 8,
        ..Default::default()
    };
    let quota = conntrack::Config {
        max_per_source: 4,
        ..Default::default()
    };
    let two_ports = PortRange {
        min: 2000,
        max: 2001,
    };
    let setups = [
        (
            "table full",
            gateway_with(full, PortRange::default()),
            8u16,
            Reason::ConntrackFull,
            Did::ToTunnel,
        ),
        (
            "source quota",
            gateway_with(quota, PortRange::default()),
            4,
            Reason::SourceQuotaExceeded,
            Did::ToTunnel,
        ),
        (
            "ports exhausted",
            gateway_with(conntrack::Config::default(), two_ports),
            2,
            Reason::PortsExhausted,
            Did::ToTunnel,
        ),
        (
            "draining",
            gateway_with(conntrack::Config::default(), PortRange::default()),
            1,
            Reason::Draining,
            Did::Drop(Reason::Draining),
        ),
    ];
    for (name, gw, fill, reason, first) in setups {
        let mut w = Worker::new(gw, 11);
        for p in 0..fill {
            assert_eq!(
                push(&mut w, &mut buf, Dir::Out(NODE), &fresh(p), T0),
                Did::Forward,
                "{name}: fill"
            );
        }
        if reason == Reason::Draining {
            w.gateway().set_draining(true);
        }
        let refused: Vec<Vec<u8>> = (fill..fill + 200).map(fresh).collect();
        // Warm-up with the first refused packet.
        assert_eq!(
            push(&mut w, &mut buf, Dir::Out(NODE), &refused[0], T0),
            first,
            "{name}"
        );
        let before = w.stats().dropped(reason);
        let flows = w.gateway().table().len();
        let (_, n) = counted(|| {
            for (i, p) in refused.iter().enumerate().skip(1) {
                let now = Instant::from_millis(2_000 + i as u64);
                let did = push(&mut w, &mut buf, Dir::Out(NODE), p, now);
                assert!(did == Did::Drop(reason) || did == first, "{name}: {did:?}");
            }
        });
        assert_eq!(n, 0, "{name}: {n} heap allocations refusing new flows");
        assert_eq!(w.stats().dropped(reason) - before, 199, "{name}");
        assert_eq!(w.gateway().table().len(), flows, "{name}: no state");
    }
}

#[test]
fn the_counter_counts_this_threads_allocations() {
    let (b, n) = counted(|| Box::new([0u8; 64]));
    assert_eq!(n, 1);
    drop(b);
    let (v, n) = counted(|| {
        let mut v = Vec::with_capacity(1);
        v.extend_from_slice(&[1u8, 2, 3]);
        v
    });
    assert_eq!((v.len(), n), (3, 2), "one allocation and one growth");
    let (_, n) = counted(|| std::thread::spawn(|| Box::new(1u8)).join().unwrap());
    assert!(n >= 1, "spawning allocates here");
}

/// The one per-packet path known to allocate: a packet whose tuple's flow has expired (but was not swept yet)
/// replaces it. The old slot is retired through crossbeam-epoch's `defer`, and `Inner::insert` then flushes the
/// thread's bag (`Guard::flush`, conntrack.rs) so that the slot returns to the free list; crossbeam's
/// `Global::push_bag` allocates one queue node for the sealed bag on every flush (crossbeam-epoch 0.9,
/// `sync/queue.rs` `Queue::push`; found with `NO_ALLOC_BACKTRACE=1`). This test holds it to at most one
/// allocation per replaced flow.
#[test]
fn replacing_an_expired_flow_allocates_at_most_once_in_the_epoch_flush() {
    let mut w = worker();
    let mut buf = vec![0u8; 4096];
    const N: u16 = 2_000;
    let pkts: Vec<Vec<u8>> = (0..N)
        .map(|p| pod_udp(SERVER, 30_000 + p, 53, b"x"))
        .collect();
    for p in &pkts {
        assert_eq!(push(&mut w, &mut buf, Dir::Out(NODE), p, T0), Did::Forward);
    }
    // UDP idles out after 300 s: the same tuples again replace their expired flows.
    let later = Instant::from_secs(1_000);
    let created = w.stats().flows_created;
    let (_, n) = counted(|| {
        for p in &pkts {
            assert_eq!(
                push(&mut w, &mut buf, Dir::Out(NODE), p, later),
                Did::Forward
            );
        }
    });
    assert_eq!(w.stats().flows_created - created, u64::from(N));
    eprintln!("replacing {N} expired flows: {n} allocations");
    assert!(
        n <= usize::from(N),
        "{n} allocations replacing {N} expired flows"
    );
}

#[test]
fn flows_through_served_copies_allocate_nothing() {
    use forwarder_core::conntrack::{FlowImage, NewFlow, Table, TcpTracking};
    use forwarder_core::flow::{FlowKey, NodeAddr, Proto};
    use forwarder_core::pipeline::{Gateway, Standby, StandbyPeer};
    use forwarder_core::ports::PortPools;
    use std::net::IpAddr;
    use std::sync::Arc;
    use std::time::Duration;

    // the peer's egress address, its copies of an established TCP connection and a UDP flow
    let peer = Ipv4Addr::new(203, 0, 113, 11);
    let ct = conntrack::Config {
        max_entries: 1024,
        ..conntrack::Config::default()
    };
    let copies = Table::new(
        ct,
        PortPools::new(&[IpAddr::V4(peer)], PortRange::default()),
    );
    let image = |sport, dport, proto, ext_port, tcp| FlowImage {
        new: NewFlow {
            orig: FlowKey {
                src: any_ip(POD),
                dst: any_ip(SERVER),
                src_port: sport,
                dst_port: dport,
                proto,
            },
            egress_ip: IpAddr::V4(peer),
            node: NodeAddr {
                ip: NODE,
                mac: NODE_MAC,
            },
            uplink: 0,
        },
        ext_port,
        tcp,
        age: Duration::from_secs(5),
        idle: Duration::ZERO,
    };
    let established = TcpTracking {
        code: 2,
        reference: 5000,
        window: 64240,
    };
    {
        let g = copies.pin();
        copies
            .install(&image(40000, 443, Proto::Tcp, 30000, established), T0, &g)
            .unwrap();
        let udp = image(4000, 53, Proto::Udp, 30001, TcpTracking::default());
        copies.install(&udp, T0, &g).unwrap();
    }
    let standby = Arc::new(Standby::new(vec![StandbyPeer::new(
        1,
        vec![IpAddr::V4(peer)],
        Arc::new(copies),
    )]));
    standby.set_serving(1, true);
    let gw = Gateway::new(config(), ct, PortRange::default()).unwrap();
    let mut w = Worker::new(Arc::new(gw.with_standby(standby)), 7);

    let tcp_out = pod_tcp(SERVER, 40000, 443, false, b"GET / HTTP/1.1\r\n");
    let tcp_in = outside_tcp(SERVER, peer, 443, 30000, "A", 5001, 1017);
    let udp_out = pod_udp(SERVER, 4000, 53, &[7; 18]);
    let udp_in = outside_udp(SERVER, peer, 53, 30001, &[9; 18]);
    let mut buf = vec![0u8; 4096];
    let cases = [
        (Dir::Out(NODE), &tcp_out, Did::Forward),
        (Dir::In(0), &tcp_in, Did::ToTunnel),
        (Dir::Out(NODE), &udp_out, Did::Forward),
        (Dir::In(0), &udp_in, Did::ToTunnel),
    ];
    for (i, (dir, pkt, want)) in cases.iter().enumerate() {
        assert_eq!(push(&mut w, &mut buf, *dir, pkt, T0), *want, "case {i}");
    }
    let (_, n) = counted(|| {
        for i in 0..2_000u64 {
            let now = Instant::from_millis(2_000 + i);
            for (dir, pkt, want) in &cases {
                assert_eq!(push(&mut w, &mut buf, *dir, pkt, now), *want);
            }
        }
    });
    assert_eq!(n, 0, "{n} heap allocations for served copies");

    let n = batch_rounds(&mut w, &[&tcp_out, &udp_out], &[&tcp_in, &udp_in], 200);
    assert_eq!(
        n, 0,
        "{n} heap allocations in the batch calls through copies"
    );
    let s = w.stats();
    assert_eq!(s.flows_created, 0);
    assert_eq!(s.standby_out, 2 + 2 * 2_000 + 32 * 200);
    assert_eq!(s.standby_in, s.standby_out);
    assert_eq!(w.gateway().table().len(), 0);
}
