//! Any bytes as an underlay frame: VXLAN decapsulation, parsing of every inner header and the inner flow hash
//! (the outer source port's entropy) must never panic.
#![no_main]
use forwarder_core::nat::meta::{parse_l4, PacketMeta};
use forwarder_core::wire::{ethernet, vxlan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Any bytes as a VXLAN datagram (header first), as the gateway hashes what it sends into the tunnel.
    let _ = vxlan::inner_flow_hash(data);
    if let Ok((_src, _port, _vni, inner)) = vxlan::decapsulate_v4(data) {
        let inner = &data[inner];
        if let Ok(eth) = ethernet::Frame::new_checked(inner) {
            let v6 = eth.ethertype() == ethernet::ethertype::IPV6;
            if let Ok(meta) = PacketMeta::parse(inner, ethernet::HEADER_LEN, v6) {
                let _ = parse_l4(inner, &meta);
                let _ = forwarder_core::nat::icmp::parse_embedded(inner, &meta);
            }
        }
    }
});
