//! Conntrack benchmarks: lookups with 1 M live flows (1 and 2 threads), and new flows (miss + port
//! allocation + insert).
//!
//! Run: `cargo bench -p bench --bench conntrack -- --warm-up-time 1 --measurement-time 3`

use core::net::{IpAddr, Ipv4Addr};
use std::hint::black_box;
use std::time::{Duration, Instant as WallClock};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use forwarder_core::conntrack::{Config, InsertError, NewFlow, Table};
use forwarder_core::flow::{FlowKey, NodeAddr, Proto};
use forwarder_core::ports::{PortPools, PortRange, Rng};
use forwarder_core::Instant;

const FLOWS: usize = 1 << 20;
const BATCH: usize = 1024;

/// Each pod of [`flow`] opens 50,000 flows: above the default per-source quota, so the benchmarks set one
/// that admits them (the quota check costs the same whatever its value).
const PER_SOURCE: u32 = 65_536;

fn egress_ips(n: u32) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0xC633_6400 + i))) // 198.51.100.0 + i
        .collect()
}

/// Flow `i`: its own pod endpoint (pod 10.x.y.z, port 10000 + i % 50000) towards one of 4096 remotes.
fn flow(i: u32, ips: &[IpAddr]) -> NewFlow {
    #[allow(clippy::cast_possible_truncation)] // bounded by the modulo
    let (sport, dport) = (10_000 + (i % 50_000) as u16, 443);
    NewFlow {
        orig: FlowKey {
            src: IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (i / 50_000))),
            dst: IpAddr::V4(Ipv4Addr::from(0xCB00_7100 + (i % 4096))),
            src_port: sport,
            dst_port: dport,
            proto: if i.is_multiple_of(5) {
                Proto::Udp
            } else {
                Proto::Tcp
            },
        },
        egress_ip: ips[i as usize % ips.len()],
        node: NodeAddr {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            mac: [2, 0, 0, 0, 0, 1],
        },
        uplink: 0,
    }
}

fn filled_table(n: usize) -> (Table, Vec<FlowKey>, Vec<FlowKey>) {
    let ips = egress_ips(32);
    let table = Table::new(
        Config {
            max_entries: u32::try_from(n).unwrap_or(u32::MAX),
            max_per_source: PER_SOURCE,
            ..Config::default()
        },
        PortPools::new(&ips, PortRange::default()),
    );
    let mut rng = Rng::new(1);
    let mut out = Vec::with_capacity(n);
    let mut inb = Vec::with_capacity(n);
    {
        let g = table.pin();
        for i in 0..u32::try_from(n).unwrap_or(u32::MAX) {
            let f = table
                .insert(flow(i, &ips), Instant::ZERO, &mut rng, &g)
                .expect("fill");
            out.push(f.orig());
            inb.push(f.reply_key());
        }
    }
    // random access order
    let mut r = Rng::new(2);
    for i in (1..out.len()).rev() {
        let j = r.below(u32::try_from(i + 1).unwrap_or(u32::MAX)) as usize;
        out.swap(i, j);
        inb.swap(i, j);
    }
    (table, out, inb)
}

fn lookups(c: &mut Criterion) {
    let (table, out, inb) = filled_table(FLOWS);
    assert_eq!(table.len(), FLOWS);
    let mut g = c.benchmark_group("conntrack_lookup_1M");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut pos = 0;
    g.bench_function("outbound", |b| {
        b.iter(|| {
            let guard = table.pin();
            for k in &out[pos..pos + BATCH] {
                black_box(table.lookup_outbound(k, &guard).is_some());
            }
            pos = (pos + BATCH) % FLOWS;
        });
    });
    g.bench_function("inbound", |b| {
        b.iter(|| {
            let guard = table.pin();
            for k in &inb[pos..pos + BATCH] {
                black_box(table.lookup_inbound(k, &guard).is_some());
            }
            pos = (pos + BATCH) % FLOWS;
        });
    });
    g.bench_function("outbound_batch32", |b| {
        b.iter(|| {
            let guard = table.pin();
            let mut res = [None; BATCH];
            table.lookup_outbound_batch(&out[pos..pos + BATCH], Instant::ZERO, &mut res, &guard);
            black_box(&res);
            pos = (pos + BATCH) % FLOWS;
        });
    });
    g.bench_function("inbound_batch32", |b| {
        b.iter(|| {
            let guard = table.pin();
            let mut res = [None; BATCH];
            table.lookup_inbound_batch(&inb[pos..pos + BATCH], Instant::ZERO, &mut res, &guard);
            black_box(&res);
            pos = (pos + BATCH) % FLOWS;
        });
    });
    g.bench_function("outbound_and_refresh", |b| {
        b.iter(|| {
            let guard = table.pin();
            for k in &out[pos..pos + BATCH] {
                if let Some(f) = table.lookup_outbound(k, &guard) {
                    f.on_outbound(None, 64, Instant::from_secs(1));
                }
            }
            pos = (pos + BATCH) % FLOWS;
        });
    });
    // two threads, each looking up its own half of the keys; throughput counts both threads' lookups
    g.throughput(Throughput::Elements(2 * BATCH as u64));
    g.bench_function("outbound_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = WallClock::now();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (table, out) = (&table, &out);
                    s.spawn(move || {
                        let half = FLOWS / 2;
                        let mut p = 0;
                        for _ in 0..iters {
                            let guard = table.pin();
                            for k in &out[t * half + p..t * half + p + BATCH] {
                                black_box(table.lookup_outbound(k, &guard).is_some());
                            }
                            p = (p + BATCH) % half;
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    g.bench_function("outbound_batch32_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = WallClock::now();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (table, out) = (&table, &out);
                    s.spawn(move || {
                        let half = FLOWS / 2;
                        let mut p = 0;
                        for _ in 0..iters {
                            let guard = table.pin();
                            let mut res = [None; BATCH];
                            let keys = &out[t * half + p..t * half + p + BATCH];
                            table.lookup_outbound_batch(keys, Instant::ZERO, &mut res, &guard);
                            black_box(&res);
                            p = (p + BATCH) % half;
                        }
                    });
                }
            });
            start.elapsed()
        });
    });
    g.finish();
}

fn inserts(c: &mut Criterion) {
    // 1 M-entry table, 32 egress IPs (2 M TCP+UDP ports): flows are inserted until the table is full, then a
    // fresh table is built outside the timed region.
    let ips = egress_ips(32);
    let make = || {
        Table::new(
            Config {
                max_entries: 1 << 20,
                max_per_source: PER_SOURCE,
                ..Config::default()
            },
            PortPools::new(&ips, PortRange::default()),
        )
    };
    let mut g = c.benchmark_group("conntrack_new_flow");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut table = make();
    let mut next: u32 = 0;
    let mut rng = Rng::new(3);
    g.bench_function("miss_alloc_insert", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next as usize + BATCH > table.capacity() {
                    table = make();
                    next = 0;
                }
                let start = WallClock::now();
                let guard = table.pin();
                for _ in 0..BATCH {
                    let nf = flow(next, &ips);
                    next += 1;
                    if table.lookup_outbound(&nf.orig, &guard).is_none() {
                        black_box(
                            table
                                .insert(nf, Instant::ZERO, &mut rng, &guard)
                                .expect("insert"),
                        );
                    }
                }
                total += start.elapsed();
            }
            total
        });
    });
    // The same flows in batches of 32: one batched lookup, then one batched insert of the misses.
    let mut table = make();
    let mut next: u32 = 0;
    let mut rng = Rng::new(3);
    g.bench_function("batch32", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next as usize + BATCH > table.capacity() {
                    table = make();
                    next = 0;
                }
                let start = WallClock::now();
                let guard = table.pin();
                for _ in 0..BATCH / 32 {
                    let news: [NewFlow; 32] =
                        core::array::from_fn(|j| flow(next + u32::try_from(j).unwrap_or(0), &ips));
                    next += 32;
                    let keys = news.map(|n| n.orig);
                    let mut found = [None; 32];
                    table.lookup_outbound_batch(&keys, Instant::ZERO, &mut found, &guard);
                    let mut miss = [news[0]; 32];
                    let mut n = 0;
                    for (nf, f) in news.iter().zip(&found) {
                        if f.is_none() {
                            miss[n] = *nf;
                            n += 1;
                        }
                    }
                    let mut res = [Err(InsertError::Full); 32];
                    table.insert_batch(&miss[..n], Instant::ZERO, &mut rng, &mut res, &guard);
                    for r in &res[..n] {
                        black_box(r.expect("insert"));
                    }
                }
                total += start.elapsed();
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, lookups, inserts);
criterion_main!(benches);
