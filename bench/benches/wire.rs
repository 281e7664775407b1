//! Wire-layer benchmarks: checksum throughput (fast vs the RFC 1071 reference), incremental update vs full
//! recomputation, and parsing a VXLAN-encapsulated 64-byte UDP packet.
//!
//! Run: `cargo bench -p bench --bench wire -- --warm-up-time 1 --measurement-time 2`

#![allow(missing_docs)]
#![allow(clippy::cast_possible_truncation)] // test data generation and a fold whose loop bounds the value

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use forwarder_core::wire::{checksum, ethernet, ipv4, tcp, udp, vxlan};

const SIZES: [usize; 3] = [64, 1500, 9000];

fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(131) ^ (i >> 3)) as u8)
        .collect()
}

/// A simpler fast variant for comparison: 8 bytes per step, one u64 accumulator with end-around carry.
fn sum_u64_carry(data: &[u8], initial: u32) -> u32 {
    let mut acc = u64::from(initial);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    }
    let tail = checksum::reference::sum(chunks.remainder(), 0);
    let (s, carry) = acc.overflowing_add(u64::from(tail));
    acc = s + u64::from(carry);
    while acc > u64::from(u32::MAX) {
        acc = (acc & 0xFFFF_FFFF) + (acc >> 32);
    }
    acc as u32
}

fn bench_sum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum_sum");
    for len in SIZES {
        let d = data(len);
        assert_eq!(
            checksum::fold(checksum::sum(&d, 0)),
            checksum::fold(checksum::reference::sum(&d, 0))
        );
        assert_eq!(
            checksum::fold(sum_u64_carry(&d, 0)),
            checksum::fold(checksum::reference::sum(&d, 0))
        );
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("fast", len), &d, |b, d| {
            b.iter(|| checksum::sum(black_box(d), 0))
        });
        g.bench_with_input(BenchmarkId::new("u64_carry_8B", len), &d, |b, d| {
            b.iter(|| sum_u64_carry(black_box(d), 0))
        });
        g.bench_with_input(BenchmarkId::new("reference", len), &d, |b, d| {
            b.iter(|| checksum::reference::sum(black_box(d), 0))
        });
    }
    g.finish();
}

/// SNAT of a TCP segment: new source address and port, checksum updated incrementally vs recomputed.
fn bench_update(c: &mut Criterion) {
    let src = Ipv4Addr::new(10, 10, 10, 1);
    let dst = Ipv4Addr::new(198, 51, 100, 10);
    let new_src = Ipv4Addr::new(203, 0, 113, 7);
    let mut g = c.benchmark_group("checksum_update_snat");
    g.throughput(Throughput::Elements(1));
    for len in [64usize, 1500] {
        let mut seg = data(len);
        let mut t = tcp::Packet::new_unchecked(&mut seg[..]);
        t.set_header_len(20);
        t.fill_checksum_v4(src, dst);
        g.bench_function(BenchmarkId::new("incremental", len), |b| {
            b.iter(|| {
                let mut t = tcp::Packet::new_unchecked(black_box(&mut seg[..]));
                let old_port = t.src_port();
                let mut c = checksum::update_bytes(t.checksum(), &src.octets(), &new_src.octets());
                c = checksum::update_u16(c, old_port, 61000);
                t.set_src_port(61000);
                t.set_checksum(c);
                // Undo, so every iteration does the same work.
                let c = checksum::update_bytes(t.checksum(), &new_src.octets(), &src.octets());
                t.set_checksum(checksum::update_u16(c, 61000, old_port));
                t.set_src_port(old_port);
            })
        });
        g.bench_function(BenchmarkId::new("full_recompute", len), |b| {
            b.iter(|| {
                let mut t = tcp::Packet::new_unchecked(black_box(&mut seg[..]));
                let old_port = t.src_port();
                t.set_src_port(61000);
                t.fill_checksum_v4(new_src, dst);
                t.set_src_port(old_port);
                t.fill_checksum_v4(src, dst);
            })
        });
    }
    g.finish();
}

/// A VXLAN frame carrying a 64-byte inner UDP/IPv4 Ethernet frame.
fn vxlan_frame() -> Vec<u8> {
    let inner_len = 64;
    let mut buf = vec![0u8; vxlan::OUTER_V4_OVERHEAD + inner_len];
    let inner = &mut buf[vxlan::OUTER_V4_OVERHEAD..];
    ethernet::emit(
        &[0xa2, 0x2a, 10, 10, 10, 2],
        &[0x66, 0x7e, 10, 10, 10, 1],
        ethernet::ethertype::IPV4,
        inner,
    );
    let mut ip = ipv4::Packet::new_unchecked(&mut inner[14..]);
    ip.set_version_and_header_len(20);
    ip.set_total_len(50);
    ip.set_ttl(64);
    ip.set_protocol(ipv4::protocol::UDP);
    ip.set_src(Ipv4Addr::new(10, 10, 10, 1));
    ip.set_dst(Ipv4Addr::new(198, 51, 100, 10));
    ip.fill_checksum();
    udp::emit_header(40000, 5353, 30, ip.payload_mut());
    udp::Packet::new_unchecked(ip.payload_mut()).fill_checksum_v4(
        Ipv4Addr::new(10, 10, 10, 1),
        Ipv4Addr::new(198, 51, 100, 10),
    );
    let encap = vxlan::EncapV4 {
        src_mac: [2, 0, 0xac, 0x12, 0, 2],
        dst_mac: [2, 0, 0xac, 0x12, 0, 3],
        src_ip: Ipv4Addr::new(172, 18, 0, 2),
        dst_ip: Ipv4Addr::new(172, 18, 0, 3),
        src_port: vxlan::source_port_for(0x1234_5678),
        dst_port: vxlan::DEFAULT_PORT,
        vni: vxlan::DEFAULT_VNI,
        ttl: 64,
        ident: 1,
    };
    let n = encap
        .encapsulate_v4_with_udp_checksum(&mut buf, inner_len)
        .expect("room");
    buf.truncate(n);
    buf
}

fn parse_vxlan(frame: &[u8], verify_outer_udp: bool) -> Option<(u32, u16, u16)> {
    let (_, _, vni, inner) = vxlan::decapsulate_v4_with(frame, verify_outer_udp).ok()?;
    let eth = ethernet::Frame::new_checked(&frame[inner]).ok()?;
    let ip = ipv4::Packet::new_checked(eth.payload()).ok()?;
    if !ip.verify_checksum() {
        return None;
    }
    let u = udp::Packet::new_checked(ip.payload()).ok()?;
    if !u.verify_checksum_v4(ip.src(), ip.dst()) {
        return None;
    }
    Some((vni, u.src_port(), u.dst_port()))
}

fn bench_parse(c: &mut Criterion) {
    let frame = vxlan_frame();
    assert_eq!(
        parse_vxlan(&frame, true),
        Some((vxlan::DEFAULT_VNI, 40000, 5353))
    );
    let mut g = c.benchmark_group("vxlan_parse_64B_udp");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decap_and_parse_all_checksums", |b| {
        b.iter(|| parse_vxlan(black_box(&frame), true))
    });
    g.bench_function("decap_and_parse_skip_outer_udp_checksum", |b| {
        b.iter(|| parse_vxlan(black_box(&frame), false))
    });
    let encap = vxlan::EncapV4 {
        src_mac: [2; 6],
        dst_mac: [3; 6],
        src_ip: Ipv4Addr::new(172, 18, 0, 3),
        dst_ip: Ipv4Addr::new(172, 18, 0, 2),
        src_port: 40000,
        dst_port: vxlan::DEFAULT_PORT,
        vni: vxlan::DEFAULT_VNI,
        ttl: 64,
        ident: 7,
    };
    let mut buf = frame.clone();
    let inner_len = frame.len() - vxlan::OUTER_V4_OVERHEAD;
    g.bench_function("encapsulate_v4", |b| {
        b.iter(|| encap.encapsulate_v4(black_box(&mut buf), inner_len))
    });
    g.bench_function("encapsulate_v4_with_udp_checksum", |b| {
        b.iter(|| encap.encapsulate_v4_with_udp_checksum(black_box(&mut buf), inner_len))
    });
    g.finish();
}

criterion_group!(benches, bench_sum, bench_update, bench_parse);
criterion_main!(benches);
