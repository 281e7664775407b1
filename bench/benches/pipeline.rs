//! The per-packet pipeline on one core, each group measuring one thing:
//! * `pipeline_established`: one established UDP flow (its entry stays in cache), outbound and inbound, at 64,
//!   1500 and 9000-byte inner frames; each iteration copies the packet into the buffer first, as from a socket.
//! * `pipeline_new_flow`: new-flow creation (miss + port allocation + insert) into a table 25–50 % full, one
//!   packet at a time and through `Worker::outbound_batch` in batches of 32 (`batch32_25_50pct_full`).
//! * `pipeline_1M_flows`: 1 M live flows, every packet of a flow drawn uniformly at random from all 2²⁰ of them
//!   (the table and its buckets do not fit the cache), one by one and in batches of 32; plus the cost of making
//!   those packets alone, to subtract.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use forwarder_core::conntrack;
use forwarder_core::pipeline::{
    tunnel_mac, Action, Config, Gateway, TunnelPacket, UplinkConfig, Worker,
};
use forwarder_core::ports::PortRange;
use forwarder_core::wire::checksum::Delta;
use forwarder_core::Instant;

const GW: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const EGRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const HEADROOM: usize = 64;

fn gateway(max_entries: u32, egress: Vec<Ipv4Addr>) -> Arc<Gateway> {
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    let config = Config {
        vni: 4097,
        tunnel_ip: GW,
        allowed_nodes: vec![net("172.18.0.0/16")],
        pod_cidrs: vec![net("10.0.0.0/8")],
        tunnel_mtu: 9000,
        uplinks: vec![UplinkConfig {
            name: "dmz".into(),
            mtu: 9000,
            egress_v4: egress,
            egress_v6: vec![],
            next_hop_v4: Some(Ipv4Addr::new(203, 0, 113, 1)),
            next_hop_v6: None,
        }],
        routes: vec![(net("0.0.0.0/0"), 0)],
        ..Config::default()
    };
    let ct = conntrack::Config {
        max_entries,
        max_per_source: max_entries,
        ..Default::default()
    };
    Arc::new(Gateway::new(config, ct, PortRange::default()).unwrap())
}

/// A VXLAN datagram carrying an inner Ethernet frame of exactly `frame_len` bytes (UDP).
fn datagram(pod: Ipv4Addr, sport: u16, frame_len: usize) -> Vec<u8> {
    let payload = vec![0x5a; frame_len - 14 - 20 - 8];
    let b = PacketBuilder::ethernet2([0x66, 0, 0, 0, 0, 2], tunnel_mac(GW)).ipv4(
        pod.octets(),
        SERVER.octets(),
        64,
    );
    let mut d = vec![0x08, 0, 0, 0, 0x00, 0x10, 0x01, 0];
    b.udp(sport, 53).write(&mut d, &payload).unwrap();
    d
}

fn established(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline_established");
    for frame_len in [64usize, 1500, 9000] {
        let gw = gateway(1 << 16, vec![EGRESS]);
        let mut w = Worker::new(gw.clone(), 1);
        let out_pkt = datagram(Ipv4Addr::new(10, 244, 1, 5), 4000, frame_len);
        let mut buf = vec![0u8; 16384];
        buf[..out_pkt.len()].copy_from_slice(&out_pkt);
        let ext = match w.outbound(NODE, &mut buf, out_pkt.len(), Instant::from_secs(1)) {
            Action::Forward { frame, .. } => u16::from_be_bytes([frame[34], frame[35]]),
            other => panic!("{other:?}"),
        };
        let payload = vec![0x5a; frame_len - 14 - 20 - 8];
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xfe], [2, 0, 0, 0, 0, 1]).ipv4(
            SERVER.octets(),
            EGRESS.octets(),
            60,
        );
        let mut in_pkt = Vec::new();
        b.udp(53, ext).write(&mut in_pkt, &payload).unwrap();

        g.throughput(Throughput::Elements(1));
        let guard = gw.pin();
        g.bench_with_input(BenchmarkId::new("outbound", frame_len), &out_pkt, |b, p| {
            b.iter(|| {
                // The worker rewrites in place; every packet arrives fresh, as from the socket.
                buf[..p.len()].copy_from_slice(p);
                let a = w.outbound(NODE, &mut buf, p.len(), Instant::from_secs(2));
                assert!(matches!(a, Action::Forward { .. }));
                black_box(&a);
            })
        });
        g.bench_with_input(BenchmarkId::new("inbound", frame_len), &in_pkt, |b, p| {
            b.iter(|| {
                buf[HEADROOM..HEADROOM + p.len()].copy_from_slice(p);
                let a = w.inbound(0, &mut buf, HEADROOM, p.len(), Instant::from_secs(2));
                assert!(matches!(a, Action::ToTunnel { .. }));
                black_box(&a);
            })
        });
        drop(guard);
    }
    g.finish();
}

/// New flows: each packet comes from a pod endpoint never seen before, so it misses, takes a port and is
/// inserted. To measure a defined state, every sample starts from a fresh 1 M-entry table already holding
/// 256 K live flows (filled outside the timing) and times up to 256 K new ones: the table is 25–50 % full
/// while measured, as on a busy gateway, whatever number of iterations criterion picks.
fn new_flows(c: &mut Criterion) {
    const PREFILL: usize = 256 * 1024;
    let mut g = c.benchmark_group("pipeline_new_flow");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    // Pre-built packets: 512 pods x 1024 source ports; the first PREFILL prefill, the rest are timed.
    let packets: Vec<Vec<u8>> = (0..u32::try_from(2 * PREFILL).unwrap())
        .map(|i| {
            let pod = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + (i % 512));
            datagram(pod, 10_000 + u16::try_from(i / 512).unwrap(), 64)
        })
        .collect();
    let egress: Vec<Ipv4Addr> = (0..16u8)
        .map(|i| Ipv4Addr::new(203, 0, 113, 10 + i))
        .collect();
    g.bench_function("outbound_miss_alloc_insert_25_50pct_full", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let n = usize::try_from((iters - done).min(PREFILL as u64)).unwrap();
                let gw = gateway(1 << 20, egress.clone());
                let mut w = Worker::new(gw.clone(), 9);
                let mut buf = vec![0u8; 2048];
                let guard = gw.pin();
                for p in &packets[..PREFILL] {
                    buf[..p.len()].copy_from_slice(p);
                    black_box(w.outbound(NODE, &mut buf, p.len(), Instant::from_secs(1)));
                }
                let start = StdInstant::now();
                for p in &packets[PREFILL..PREFILL + n] {
                    buf[..p.len()].copy_from_slice(p);
                    let a = w.outbound(NODE, &mut buf, p.len(), Instant::from_secs(1));
                    black_box(&a);
                }
                total += start.elapsed();
                drop(guard);
                assert_eq!(
                    w.stats().flows_created,
                    (PREFILL + n) as u64,
                    "every packet created a flow"
                );
                done += n as u64;
            }
            total
        })
    });
    // The same packets through `Worker::outbound_batch`, 32 at a time (as from one `recvmmsg`); iterations
    // still count flows.
    // (buffers written once here: a fresh zeroed buffer costs a page fault on first write)
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0x5a; 2048]).collect();
    g.bench_function("batch32_25_50pct_full", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let n = usize::try_from((iters - done).min(PREFILL as u64)).unwrap();
                let gw = gateway(1 << 20, egress.clone());
                let mut w = Worker::new(gw.clone(), 9);
                let guard = gw.pin();
                // prefilled through the batch path too, so that its code is as warm as the data allows
                for chunk in packets[..PREFILL].chunks(32) {
                    outbound_batch(&mut w, &mut bufs, chunk);
                }
                let start = StdInstant::now();
                for chunk in packets[PREFILL..PREFILL + n].chunks(32) {
                    outbound_batch(&mut w, &mut bufs, chunk);
                }
                total += start.elapsed();
                drop(guard);
                assert_eq!(
                    w.stats().flows_created,
                    (PREFILL + n) as u64,
                    "every packet created a flow"
                );
                done += n as u64;
            }
            total
        })
    });
    g.finish();
}

/// Copies `packets` (at most 32) into `bufs` and passes them to `Worker::outbound_batch` at 1 s.
fn outbound_batch(w: &mut Worker, bufs: &mut [Vec<u8>], packets: &[Vec<u8>]) {
    let mut it = bufs.iter_mut().zip(packets);
    let mut batch: [TunnelPacket<'_>; 32] = core::array::from_fn(|_| match it.next() {
        Some((buf, p)) => {
            buf[..p.len()].copy_from_slice(p);
            TunnelPacket {
                from: NODE,
                buf: buf.as_mut_slice(),
                len: p.len(),
            }
        }
        None => TunnelPacket {
            from: NODE,
            buf: &mut [],
            len: 0,
        },
    });
    w.outbound_batch(
        &mut batch[..packets.len()],
        Instant::from_secs(1),
        |_, a| {
            black_box(&a);
        },
    );
}

/// 1 M live flows (as many pod endpoints), each packet's flow drawn uniformly at random from all 2²⁰ of them
/// (xorshift64, a new draw per packet, never a repeating short cycle), so the table's buckets and slots
/// (≈ 126 bytes per flow, see conntrack.rs: over 100 MB) do not fit the cache, as on a busy gateway.
///
/// * `outbound_random_of_1M/64`: one packet per iteration through `Worker::outbound`.
/// * `outbound_batch32_random_of_1M/64`: 32 packets per iteration through `Worker::outbound_batch`, as the
///   worker thread hands them over from one `recvmmsg`; throughput counts packets.
/// * `packet_generator_only/64`: the draw and the packet patching alone (no pipeline), the part of the two
///   figures above that is the benchmark's own work.
fn many_flows(c: &mut Criterion) {
    const FLOWS: u32 = 1 << 20;
    let egress: Vec<Ipv4Addr> = (0..64u8)
        .map(|i| Ipv4Addr::new(203, 0, 113, 64 + i))
        .collect();
    let gw = gateway(FLOWS + FLOWS / 8, egress);
    let mut w = Worker::new(gw.clone(), 5);
    // Packets are made from one hot template (as they would sit in a receive ring), with the pod address
    // and port of flow `i` patched in and the checksums updated incrementally: a few nanoseconds, measured
    // by `packet_generator_only`.
    let template = datagram(Ipv4Addr::new(10, 8, 0, 0), 2_000, 64);
    let make = |i: u32, out: &mut [u8]| -> usize {
        let n = template.len();
        out[..n].copy_from_slice(&template);
        let pod = (u32::from(Ipv4Addr::new(10, 8, 0, 0)) + (i % 1024)).to_be_bytes();
        let port = (2_000 + u16::try_from(i / 1024).unwrap()).to_be_bytes();
        let mut ip = Delta::new();
        ip.change(&out[34..38], &pod);
        let mut l4 = ip;
        l4.change(&out[42..44], &port);
        let c = u16::from_be_bytes([out[32], out[33]]);
        out[32..34].copy_from_slice(&ip.apply(c).to_be_bytes());
        let c = u16::from_be_bytes([out[48], out[49]]);
        out[48..50].copy_from_slice(&l4.apply_udp(c).to_be_bytes());
        out[34..38].copy_from_slice(&pod);
        out[42..44].copy_from_slice(&port);
        n
    };
    let mut buf = vec![0u8; 2048];
    for i in 0..FLOWS {
        let n = make(i, &mut buf);
        assert!(matches!(
            w.outbound(NODE, &mut buf, n, Instant::from_secs(1)),
            Action::Forward { .. }
        ));
    }
    assert_eq!(gw.table().len(), FLOWS as usize);
    // Uniform over 0..2²⁰: the top 20 bits of a xorshift64 state (period 2⁶⁴ − 1).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut draw = move || -> u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        u32::try_from(x >> (64 - FLOWS.trailing_zeros())).unwrap()
    };
    let mut g = c.benchmark_group("pipeline_1M_flows");
    g.throughput(Throughput::Elements(1));
    let guard = gw.pin();
    g.bench_function("outbound_random_of_1M/64", |b| {
        b.iter(|| {
            let n = make(draw(), &mut buf);
            let a = w.outbound(NODE, &mut buf, n, Instant::from_secs(2));
            black_box(&a);
        })
    });
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 2048]).collect();
    g.throughput(Throughput::Elements(32));
    g.bench_function("outbound_batch32_random_of_1M/64", |b| {
        b.iter(|| {
            let mut lens = [0usize; 32];
            for (i, buf) in bufs.iter_mut().enumerate() {
                lens[i] = make(draw(), buf);
            }
            let mut it = bufs.iter_mut().zip(lens);
            let mut batch: [TunnelPacket<'_>; 32] = core::array::from_fn(|_| {
                let (buf, len) = it.next().unwrap();
                TunnelPacket {
                    from: NODE,
                    buf: buf.as_mut_slice(),
                    len,
                }
            });
            w.outbound_batch(&mut batch, Instant::from_secs(2), |_, a| {
                black_box(&a);
            });
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("packet_generator_only/64", |b| {
        b.iter(|| black_box(make(draw(), &mut buf)))
    });
    drop(guard);
    assert_eq!(w.stats().total_drops(), 0);
    assert_eq!(
        w.stats().flows_created,
        u64::from(FLOWS),
        "every measured packet found its flow"
    );
    g.finish();
}

criterion_group!(benches, established, new_flows, many_flows);
criterion_main!(benches);
