//! Properties of the NAT rewrite over random packets: translating and translating back is the identity, and
//! every incremental checksum equals a full recomputation.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::{assert_checksums, build};
use etherparse::PacketBuilder;
use forwarder_core::nat::meta::{parse_l4, PacketMeta};
use forwarder_core::nat::rewrite::{decrement_ttl, translate, Side};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Kind {
    Tcp,
    Udp,
    Icmp,
}

fn packet(
    v6: bool,
    kind: &Kind,
    src: [u8; 16],
    dst: [u8; 16],
    sp: u16,
    dp: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = if v6 {
        PacketBuilder::ipv6(src, dst, 64)
    } else {
        PacketBuilder::ipv4(
            src[..4].try_into().unwrap(),
            dst[..4].try_into().unwrap(),
            64,
        )
    };
    match (kind, v6) {
        (Kind::Tcp, _) => build(|o| b.tcp(sp, dp, 7, 1000).ack(3).write(o, payload)),
        (Kind::Udp, _) => build(|o| b.udp(sp, dp).write(o, payload)),
        (Kind::Icmp, false) => build(|o| b.icmpv4_echo_request(sp, dp).write(o, payload)),
        (Kind::Icmp, true) => build(|o| b.icmpv6_echo_request(sp, dp).write(o, payload)),
    }
}

fn addr(v6: bool, b: [u8; 16]) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn translate_then_untranslate_is_identity(
        v6 in any::<bool>(),
        kind in prop_oneof![Just(Kind::Tcp), Just(Kind::Udp), Just(Kind::Icmp)],
        src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new in any::<[u8; 16]>(),
        sp in any::<u16>(), dp in any::<u16>(), np in any::<u16>(),
        side_src in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let original = packet(v6, &kind, src, dst, sp, dp, &payload);
        let mut buf = original.clone();
        let meta = PacketMeta::parse(&buf, 0, v6).unwrap();
        let l4 = parse_l4(&buf, &meta).unwrap();
        let side = if side_src { Side::Src } else { Side::Dst };
        translate(&mut buf, &meta, &l4, side, addr(v6, new), np);
        // The incremental update matches a full recomputation.
        assert_checksums(&buf);
        let (old_addr, old_port) = match side {
            Side::Src => (addr(v6, src), sp),
            Side::Dst => (addr(v6, dst), dp),
        };
        let old_port = if matches!(kind, Kind::Icmp) { sp } else { old_port };
        translate(&mut buf, &meta, &l4, side, old_addr, old_port);
        assert_checksums(&buf);
        // Identity, except that a checksum may come back as the other zero (0x0000 vs 0xFFFF).
        let diff: Vec<usize> = (0..buf.len()).filter(|&i| buf[i] != original[i]).collect();
        for i in &diff {
            prop_assert!(buf[*i] == 0xff || buf[*i] == 0x00, "byte {} differs: {:02x} vs {:02x}", i, buf[*i], original[*i]);
        }
        decrement_ttl(&mut buf, &meta);
        assert_checksums(&buf);
    }
}
