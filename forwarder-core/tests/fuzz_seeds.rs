//! The fuzz targets' seed corpora (`forwarder-core/fuzz/seeds/<target>/`): frames captured from the kernel's
//! vxlan device and the packets the pipeline tests use. `WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_seeds`
//! regenerates them; a normal run checks they are there.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use forwarder_core::wire::vxlan;

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target)
}

fn fixture(name: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect()
}

fn corpora() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for f in [
        "vxlan_arp_request.hex",
        "vxlan_icmp_echo.hex",
        "vxlan_icmp_ecn_ce.hex",
        "vxlan_tcp_syn.hex",
        "vxlan_udp.hex",
    ] {
        let frame = fixture(f);
        let stem = f.trim_end_matches(".hex").to_string();
        // The UDP payload (VXLAN header onwards) is what the tunnel socket hands the pipeline.
        out.push(("outbound", format!("kernel_{stem}"), frame[42..].to_vec()));
        out.push(("decap", format!("kernel_{stem}"), frame));
    }
    let pod = [
        ("tcp_syn", pod_tcp(SERVER, 40000, 443, true, &[])),
        (
            "tcp_data",
            pod_tcp(SERVER, 40000, 443, false, b"GET / HTTP/1.1\r\n\r\n"),
        ),
        ("udp", pod_udp(SERVER, 5353, 53, b"query")),
        ("udp6", pod_udp6(SERVER6, 6000, 53, b"v6 query")),
        ("ping", pod_ping(SERVER, 7)),
        ("ping_gateway", pod_ping(GW, 8)),
    ];
    for (name, d) in pod {
        out.push(("outbound", name.to_string(), d.clone()));
        // The same inner frame with outer headers as a raw (AF_PACKET) backend receives it.
        let inner = &d[8..];
        let mut frame = vec![0u8; vxlan::OUTER_V4_OVERHEAD + inner.len()];
        frame[vxlan::OUTER_V4_OVERHEAD..].copy_from_slice(inner);
        let encap = vxlan::EncapV4 {
            src_mac: [2, 0, 0, 0, 0, 2],
            dst_mac: [2, 0, 0, 0, 0, 3],
            src_ip: NODE,
            dst_ip: GW,
            src_port: 51729,
            dst_port: vxlan::DEFAULT_PORT,
            vni: VNI,
            ttl: 64,
            ident: 1,
        };
        let n = encap
            .encapsulate_v4_with_udp_checksum(&mut frame, inner.len())
            .unwrap();
        frame.truncate(n);
        out.push(("decap", name.to_string(), frame));
    }
    out.push((
        "inbound",
        "tcp_synack".into(),
        outside_tcp(SERVER, DMZ_EGRESS, 443, 20000, "SAM", 9, 1001),
    ));
    out.push((
        "inbound",
        "tcp_rst".into(),
        outside_tcp(SERVER, DMZ_EGRESS, 443, 20000, "R", 9, 0),
    ));
    out.push((
        "inbound",
        "udp".into(),
        outside_udp(SERVER, DMZ_EGRESS, 53, 20000, b"answer"),
    ));
    // An ICMP port unreachable quoting a translated UDP datagram.
    let sent = outside_udp(DMZ_EGRESS, SERVER, 20000, 53, b"query");
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&sent[14..14 + 28]);
    let c = !ref_fold(ref_sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let b = etherparse::PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(
        SERVER.octets(),
        DMZ_EGRESS.octets(),
        60,
    );
    out.push((
        "inbound",
        "icmp_port_unreachable".into(),
        build(|o| b.write(o, etherparse::IpNumber::ICMP, &icmp)),
    ));
    out
}

#[test]
fn seed_corpora_exist() {
    let corpora = corpora();
    if std::env::var_os("WRITE_FUZZ_SEEDS").is_some() {
        for (target, name, bytes) in &corpora {
            let dir = seeds_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (target, name, bytes) in &corpora {
        let path = seeds_dir(target).join(name);
        let on_disk = std::fs::read(&path).unwrap_or_else(|_| {
            panic!(
                "missing seed {}: run WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_seeds",
                path.display()
            )
        });
        assert_eq!(
            &on_disk,
            bytes,
            "seed {} is stale: regenerate it",
            path.display()
        );
    }
}
