//! Differential tests against `etherparse`: packets it builds must parse and verify here, and headers that
//! both parsers accept must yield the same fields.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use core::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use proptest::prelude::*;

use super::{ethernet, icmpv4, icmpv6, ipv4, ipv6, tcp, udp};

#[derive(Debug, Clone, Copy)]
enum L4 {
    Udp,
    Tcp(u16),
    Icmp,
}

fn l4() -> impl Strategy<Value = L4> {
    prop_oneof![
        Just(L4::Udp),
        any::<u16>().prop_map(L4::Tcp),
        Just(L4::Icmp)
    ]
}

fn build(v6: bool, src: [u8; 16], dst: [u8; 16], l4: L4, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = if v6 {
        eth.ipv6(src, dst, 63)
    } else {
        eth.ipv4(
            [src[0], src[1], src[2], src[3]],
            [dst[0], dst[1], dst[2], dst[3]],
            63,
        )
    };
    let mut out = Vec::new();
    match l4 {
        L4::Udp => ip.udp(40000, 4790).write(&mut out, payload).unwrap(),
        L4::Tcp(mss) => ip
            .tcp(40001, 443, 0x1234_5678, 64240)
            .syn()
            .options(&[
                TcpOptionElement::Noop,
                TcpOptionElement::MaximumSegmentSize(mss),
            ])
            .unwrap()
            .write(&mut out, payload)
            .unwrap(),
        L4::Icmp if v6 => ip
            .icmpv6_echo_request(7, 9)
            .write(&mut out, payload)
            .unwrap(),
        L4::Icmp => ip
            .icmpv4_echo_request(7, 9)
            .write(&mut out, payload)
            .unwrap(),
    }
    out
}

proptest! {
    #[test]
    fn etherparse_built_packets_parse_and_verify(
        v6 in any::<bool>(), src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), l4 in l4(),
        payload in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let frame = build(v6, src, dst, l4, &payload);
        let eth = ethernet::Frame::new_checked(&frame[..]).unwrap();
        prop_assert_eq!(eth.src(), [2, 0, 0, 0, 0, 1]);
        let (l4_bytes, v4addrs, v6addrs) = if v6 {
            prop_assert_eq!(eth.ethertype(), ethernet::ethertype::IPV6);
            let ip = ipv6::Packet::new_checked(eth.payload()).unwrap();
            prop_assert_eq!(ip.hop_limit(), 63);
            let ul = ip.upper_layer().unwrap();
            prop_assert_eq!(ul.offset, 40);
            (ip.payload().to_vec(), None, Some((ip.src(), ip.dst())))
        } else {
            prop_assert_eq!(eth.ethertype(), ethernet::ethertype::IPV4);
            let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
            prop_assert!(ip.verify_checksum());
            prop_assert_eq!(ip.ttl(), 63);
            (ip.payload().to_vec(), Some((ip.src(), ip.dst())), None)
        };
        prop_assert_eq!(v6addrs.map(|a| a.0), v6.then(|| Ipv6Addr::from(src)));
        prop_assert_eq!(v4addrs.map(|a| a.0), (!v6).then(|| Ipv4Addr::new(src[0], src[1], src[2], src[3])));
        match l4 {
            L4::Udp => {
                let u = udp::Packet::new_checked(&l4_bytes[..]).unwrap();
                prop_assert_eq!((u.src_port(), u.dst_port(), u.payload()), (40000, 4790, &payload[..]));
                if let Some((s, d)) = v4addrs { prop_assert!(u.verify_checksum_v4(s, d)); }
                if let Some((s, d)) = v6addrs { prop_assert!(u.verify_checksum_v6(&s, &d)); }
            }
            L4::Tcp(mss) => {
                let t = tcp::Packet::new_checked(&l4_bytes[..]).unwrap();
                prop_assert_eq!((t.src_port(), t.seq_number(), t.flags()), (40001, 0x1234_5678, tcp::flags::SYN));
                prop_assert_eq!(t.mss(), Ok(Some(mss)));
                prop_assert_eq!(t.payload(), &payload[..]);
                if let Some((s, d)) = v4addrs { prop_assert!(t.verify_checksum_v4(s, d)); }
                if let Some((s, d)) = v6addrs { prop_assert!(t.verify_checksum_v6(&s, &d)); }
            }
            L4::Icmp => {
                if let Some((s, d)) = v6addrs {
                    let i = icmpv6::Packet::new_checked(&l4_bytes[..]).unwrap();
                    prop_assert_eq!((i.msg_type(), i.echo_ident(), i.echo_seq_no()), (128, 7, 9));
                    prop_assert!(i.verify_checksum(&s, &d));
                } else {
                    let i = icmpv4::Packet::new_checked(&l4_bytes[..]).unwrap();
                    prop_assert_eq!((i.msg_type(), i.echo_ident(), i.echo_seq_no()), (8, 7, 9));
                    prop_assert!(i.verify_checksum());
                }
            }
        }
    }

    #[test]
    fn our_packets_parse_in_etherparse(
        src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sport in any::<u16>(), zero_csum in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
        let mut b = vec![0u8; 14 + 20 + 8 + payload.len()];
        ethernet::emit(&[2, 0, 0, 0, 0, 2], &[2, 0, 0, 0, 0, 1], ethernet::ethertype::IPV4, &mut b);
        let total = u16::try_from(b.len() - 14).unwrap();
        let mut ip = ipv4::Packet::new_unchecked(&mut b[14..]);
        ip.set_version_and_header_len(20);
        ip.set_total_len(total);
        ip.set_flags_and_frag_offset(true, false, 0);
        ip.set_ttl(64);
        ip.set_protocol(ipv4::protocol::UDP);
        ip.set_src(src);
        ip.set_dst(dst);
        ip.fill_checksum();
        udp::emit_header(sport, 53, total - 20, ip.payload_mut());
        let mut u = udp::Packet::new_unchecked(ip.payload_mut());
        u.payload_mut().copy_from_slice(&payload);
        if !zero_csum { u.fill_checksum_v4(src, dst); }
        let ours = u.checksum();

        let sliced = SlicedPacket::from_ethernet(&b).unwrap();
        let Some(NetSlice::Ipv4(v4)) = sliced.net else { panic!("not ipv4") };
        prop_assert_eq!(v4.header().header_checksum(), v4.header().to_header().calc_header_checksum());
        prop_assert!(v4.header().dont_fragment());
        let Some(TransportSlice::Udp(us)) = sliced.transport else { panic!("not udp") };
        prop_assert_eq!((us.source_port(), us.destination_port(), us.payload()), (sport, 53, &payload[..]));
        if !zero_csum {
            let theirs = us.to_header().calc_checksum_ipv4_raw(src.octets(), dst.octets(), &payload).unwrap();
            prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn ipv4_header_fields_agree(mut data in proptest::collection::vec(any::<u8>(), 20..80)) {
        data[0] = 0x40 | (data[0] & 0x0F);
        let len = u16::try_from(data.len()).unwrap();
        data[2..4].copy_from_slice(&len.to_be_bytes());
        let ours = ipv4::Packet::new_checked(&data[..]);
        let theirs = etherparse::Ipv4HeaderSlice::from_slice(&data);
        prop_assert_eq!(ours.is_ok(), theirs.is_ok());
        if let (Ok(o), Ok(t)) = (ours, theirs) {
            prop_assert_eq!(o.header_len(), t.slice().len());
            prop_assert_eq!((o.src(), o.dst(), o.ttl(), o.protocol()), (t.source_addr(), t.destination_addr(), t.ttl(), t.protocol().0));
            prop_assert_eq!((o.ident(), o.dont_frag(), o.more_frags()), (t.identification(), t.dont_fragment(), t.more_fragments()));
            prop_assert_eq!(o.frag_offset(), t.fragments_offset().value() * 8);
            prop_assert_eq!(o.dscp_ecn(), (t.dcp().value() << 2) | t.ecn().value());
            prop_assert_eq!(o.verify_checksum(), t.header_checksum() == t.to_header().calc_header_checksum());
        }
    }

    #[test]
    fn ipv6_extension_walk_agrees(
        chain in proptest::collection::vec((prop::sample::select(vec![0u8, 43, 60, 51, 44]), 0u8..3), 0..5),
        last in prop::sample::select(vec![6u8, 17, 58]),
        frag_offset in prop::sample::select(vec![0u16, 0, 185]),
    ) {
        // Build a chain (Hop-by-Hop only first, one fragment header at most), then 24 bytes of upper layer.
        let mut kinds: Vec<(u8, u8)> = Vec::new();
        for (i, (k, l)) in chain.into_iter().enumerate() {
            if (k == 0 && i != 0) || (k == 44 && kinds.iter().any(|x| x.0 == 44)) { continue; }
            kinds.push((k, l));
        }
        let mut ext = Vec::new();
        for (i, &(k, l)) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).map_or(last, |x| x.0);
            match k {
                44 => {
                    let [hi, lo] = ((frag_offset << 3) | 1).to_be_bytes();
                    ext.extend_from_slice(&[next, 0, hi, lo, 0, 0, 0, 1]);
                }
                51 => { ext.extend_from_slice(&[next, 2 * l + 1]); ext.resize(ext.len() + usize::from(2 * l + 3) * 4 - 2, 0); }
                _ => { ext.extend_from_slice(&[next, l]); ext.resize(ext.len() + (usize::from(l) + 1) * 8 - 2, 0); }
            }
        }
        let first = kinds.first().map_or(last, |x| x.0);
        ext.resize(ext.len() + 24, 0);
        let mut b = vec![0u8; 40];
        let mut p = ipv6::Packet::new_unchecked(&mut b[..]);
        p.set_version(6);
        p.set_payload_len(u16::try_from(ext.len()).unwrap());
        p.set_next_header(first);
        p.set_hop_limit(1);
        b.extend_from_slice(&ext);

        let ours = ipv6::Packet::new_checked(&b[..]).unwrap().upper_layer().unwrap();
        if let Some(f) = ours.fragment.filter(|f| f.offset != 0) {
            // Deliberate difference: in a non-first fragment we stop at the fragment header (what follows is
            // not a header), while etherparse keeps walking.
            prop_assert_eq!(ours.protocol, b[f.header_offset]);
            prop_assert_eq!(ours.offset, f.header_offset + 8);
            return Ok(());
        }
        let theirs = etherparse::Ipv6Slice::from_slice(&b).unwrap();
        let payload = theirs.payload();
        prop_assert_eq!(ours.protocol, payload.ip_number.0);
        prop_assert_eq!(ours.offset, b.len() - payload.payload.len());
        prop_assert_eq!(ours.fragment.is_some_and(|f| f.offset != 0 || f.more), payload.fragmented);
    }
}
