//! Any bytes as a sync datagram from a peer, past the parser into the protocol engine: with the header
//! forced to this set and this peer (what a forger on the sync network can send once it has the key, or
//! without a key), `Replica::receive` must never panic, the copies table it writes to may only ever hold
//! flows translated to the peer's own egress IP, and the own table (what a peer hands back) only flows
//! translated to this replica's, however the records lie.
#![no_main]
use core::net::{IpAddr, Ipv4Addr};

use forwarder_core::conntrack::{Config, Table};
use forwarder_core::ports::{PortPools, PortRange};
use forwarder_core::sync::inbox::Tables;
use forwarder_core::sync::replica::{Replica, Settings};
use forwarder_core::Instant;
use libfuzzer_sys::fuzz_target;

const PEER_EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const MY_EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));

fuzz_target!(|data: &[u8]| {
    let copies = Table::new(
        Config {
            max_entries: 64,
            ..Config::default()
        },
        PortPools::new(&[PEER_EGRESS], PortRange::default()),
    );
    let own = Table::new(
        Config {
            max_entries: 16,
            ..Config::default()
        },
        PortPools::new(&[MY_EGRESS], PortRange::default()),
    );
    let mut me = Replica::new(Settings::new(7, 1, 0xB, 0), own.slots(), &[0, 1]);
    let mut d = data.to_vec();
    if d.len() >= 24 {
        d[0..3].copy_from_slice(&[0x45, 0x47, 1]); // magic, version
        d[4..8].copy_from_slice(&7u32.to_be_bytes()); // this set
        d[8..10].copy_from_slice(&0u16.to_be_bytes()); // from peer 0
    }
    // the datagram, then the same one as the next of the stream, then again (stale)
    for round in 0..3u32 {
        if d.len() >= 24 && round == 1 {
            let seq = u32::from_be_bytes([d[20], d[21], d[22], d[23]]).wrapping_add(1);
            d[20..24].copy_from_slice(&seq.to_be_bytes());
        }
        let now = Instant::from_millis(5 + u64::from(round));
        let g = copies.pin();
        let tables = Tables {
            copies: &copies,
            own: &own,
        };
        let _ = me.receive(0, &d, tables, |_, _| Some(0), |_| true, now, &g);
        drop(g);
        let mut buf = [0u8; 1400];
        let go = own.pin();
        while me
            .poll_transmit(&own, |_| Some(&copies), now, &go, &mut buf)
            .is_some()
        {}
    }
    let g = copies.pin();
    copies.for_each(&g, |f| assert_eq!(f.egress_ip(), PEER_EGRESS));
    own.for_each(&g, |f| assert_eq!(f.egress_ip(), MY_EGRESS));
});
