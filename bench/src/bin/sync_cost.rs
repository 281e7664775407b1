//! What state sync costs, measured on the I/O-free protocol engine (`forwarder_core::sync::Replica`) with
//! its default timing, between two replicas on a perfect link:
//!
//! 1. **Bytes on the sync channel per new connection**, for short TCP connections (SYN, handshake 1 ms
//!    later, closed by a FIN each way 2 ms after that) opened at a steady rate, plus one UDP flow per ten
//!    connections. Counted: every datagram the owner sends over the run (headers, heartbeats, flow records)
//!    and the delete record each UDP flow costs when it ends (after its timeout, out of the run: added as
//!    16 bytes each; a finished TCP connection's end costs none).
//! 2. **Installing copies**: the time to apply a bulk transfer of N flows at the peer (parse + install).
//!
//! Usage: `cargo run --release -p bench --bin sync-cost [connections/s] [seconds] [bulk flows]`
//! (defaults 10000, 5, 100000).

use core::net::{IpAddr, Ipv4Addr};
use std::time::Instant as WallClock;

use forwarder_core::conntrack::{Config, NewFlow, Table, TcpSegment};
use forwarder_core::flow::{FlowKey, NodeAddr, Proto};
use forwarder_core::ports::{PortPools, PortRange, Rng};
use forwarder_core::sync::inbox::Tables;
use forwarder_core::sync::replica::{Replica, Settings};
use forwarder_core::sync::wire::FlowRecord;
use forwarder_core::Instant;

const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

fn table(max: u32) -> Table {
    Table::new(
        Config {
            max_entries: max,
            max_per_source: max,
            ..Config::default()
        },
        PortPools::new(&[EGRESS], PortRange::default()),
    )
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn seg(flags: u8, seq: u32, ack: u32) -> Option<TcpSegment> {
    Some(TcpSegment {
        flags,
        seq,
        ack,
        window: 500,
        payload_len: 0,
    })
}

fn new_flow(n: u64, proto: Proto) -> NewFlow {
    #[allow(clippy::cast_possible_truncation)] // spread over pods and ports
    let (pod, port) = ((n / 50_000) as u8, (10_000 + n % 50_000) as u16);
    NewFlow {
        orig: FlowKey {
            src: IpAddr::V4(Ipv4Addr::new(10, 244, 1, pod)),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
            src_port: port,
            dst_port: if proto == Proto::Tcp { 443 } else { 53 },
            proto,
        },
        egress_ip: EGRESS,
        node: NodeAddr {
            ip: Ipv4Addr::new(172, 18, 0, 11),
            mac: [2, 0, 0, 0, 0, 0x11],
        },
        uplink: 0,
    }
}

fn main() {
    let rate = arg(1, 10_000);
    let seconds = arg(2, 5);
    let bulk = arg(3, 100_000);
    let total = rate * seconds;
    let max = u32::try_from(total * 2 + bulk).unwrap_or(u32::MAX);

    // 1. bytes per connection
    let own = table(max);
    let copies = table(max);
    let b_own = table(16); // the receiving replica's own flows: none
    let mut a = Replica::new(Settings::new(1, 0, 0xA, 0), own.slots(), &[0, 1]);
    let mut b = Replica::new(Settings::new(1, 1, 0xB, 0), copies.slots(), &[0, 1]);
    let mut rng = Rng::new(9);
    let (mut bytes, mut datagrams, mut opened, mut udp) = (0u64, 0u64, 0u64, 0u64);
    let mut pending: Vec<(u64, u64)> = Vec::new(); // (connection, opened at ms)
    let mut buf = [0u8; 1400];
    for ms in 0..seconds * 1000 + 300 {
        let now = Instant::from_millis(ms);
        let g = own.pin();
        if ms < seconds * 1000 {
            for _ in 0..rate / 1000 {
                let f = own
                    .insert(new_flow(opened, Proto::Tcp), now, &mut rng, &g)
                    .expect("tcp");
                f.on_outbound(seg(TcpSegment::SYN, 1, 0), 60, now);
                a.flow_started(FlowRecord::from_image(&f.image(now), 0, 0).id, now);
                pending.push((opened, ms));
                opened += 1;
                if opened.is_multiple_of(10) {
                    let u = own
                        .insert(new_flow(u64::MAX / 2 + udp, Proto::Udp), now, &mut rng, &g)
                        .expect("udp");
                    a.flow_started(FlowRecord::from_image(&u.image(now), 0, 0).id, now);
                    udp += 1;
                }
            }
        }
        // handshakes after 1 ms, closes after 3 ms
        pending.retain(|&(n, at)| {
            let k = new_flow(n, Proto::Tcp).orig;
            let Some(f) = own.lookup_outbound_at(&k, now, &g) else {
                return false;
            };
            if ms == at + 1 {
                f.on_inbound(seg(TcpSegment::SYN | TcpSegment::ACK, 9, 2), 60, now);
                f.on_outbound(seg(TcpSegment::ACK, 2, 10), 40, now);
            }
            if ms == at + 3 {
                let fin = TcpSegment::FIN | TcpSegment::ACK;
                f.on_outbound(seg(fin, 2, 10), 40, now);
                f.on_inbound(seg(fin, 10, 3), 40, now);
                f.on_outbound(seg(TcpSegment::ACK, 3, 11), 40, now);
                return false;
            }
            true
        });
        a.tick(&own, now, &g);
        while let Some(len) = a.poll_transmit(&own, |_| None, now, &g, &mut buf) {
            a.stamp(1, &mut buf[..len]);
            bytes += len as u64 + 28; // IPv4 + UDP headers
            datagrams += 1;
            let gb = copies.pin();
            let tables = Tables {
                copies: &copies,
                own: &b_own,
            };
            b.receive(0, &buf[..len], tables, |_, _| Some(0), |_| true, now, &gb)
                .expect("valid");
        }
        drop(g);
        let gb = copies.pin();
        b.tick(&b_own, now, &gb);
        while let Some(len) = b.poll_transmit(&b_own, |_| None, now, &gb, &mut buf) {
            let g = own.pin();
            let tables = Tables {
                copies: &table(16),
                own: &own,
            };
            a.receive(1, &buf[..len], tables, |_, _| Some(0), |_| true, now, &g)
                .expect("valid");
        }
    }
    let flows = opened + udp;
    // the finished TCP connections' ends cost no record (Replica::flow_ended); the UDP flows' do
    let deletes = 16 * udp;
    println!(
        "{opened} TCP connections (+{udp} UDP flows) at {rate}/s for {seconds} s: {datagrams} datagrams, {bytes} bytes on the wire \
         (IP and UDP headers included) + {deletes} bytes of delete records later = {:.1} bytes per flow; copies at the peer: {} of {}",
        (bytes + deletes) as f64 / flows as f64,
        copies.len(),
        own.len()
    );

    // 2. installing a bulk transfer at the peer
    let src = table(u32::try_from(bulk * 2).unwrap_or(u32::MAX));
    let dst = table(u32::try_from(bulk * 2).unwrap_or(u32::MAX));
    let g = src.pin();
    let now = Instant::from_secs(10);
    for n in 0..bulk {
        // TCP and UDP have a pool each: 100,000 flows fit one egress IP's two pools
        let proto = if n.is_multiple_of(2) {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        src.insert(new_flow(n / 2, proto), now, &mut rng, &g)
            .expect("flow");
    }
    drop(g);
    let mut s = Replica::new(Settings::new(1, 0, 0xC, 0), src.slots(), &[0, 1]);
    let mut d = Replica::new(Settings::new(1, 1, 0xD, 0), dst.slots(), &[0, 1]);
    let mut datagrams = Vec::new();
    let (d_own, s_copies) = (table(16), table(16));
    let mut t = 0;
    // first contact: the peer asks for a bulk; collect what the owner sends until the bulk is done
    while dst.len() < usize::try_from(bulk).unwrap_or(usize::MAX) && t < 600_000 {
        let now = Instant::from_millis(10_000 + t);
        let gs = src.pin();
        while let Some(len) = s.poll_transmit(&src, |_| Some(&s_copies), now, &gs, &mut buf) {
            datagrams.push(buf[..len].to_vec());
        }
        drop(gs);
        let started = WallClock::now();
        let gd = dst.pin();
        for dgm in datagrams.drain(..) {
            let tables = Tables {
                copies: &dst,
                own: &d_own,
            };
            d.receive(0, &dgm, tables, |_, _| Some(0), |_| true, now, &gd)
                .expect("valid");
        }
        INSTALL_NS.with(|c| c.set(c.get() + started.elapsed().as_nanos()));
        while let Some(len) = d.poll_transmit(&d_own, |_| None, now, &gd, &mut buf) {
            let gs = src.pin();
            let tables = Tables {
                copies: &s_copies,
                own: &src,
            };
            s.receive(1, &buf[..len], tables, |_, _| Some(0), |_| true, now, &gs)
                .expect("valid");
        }
        t += 1;
    }
    let ns = INSTALL_NS.with(std::cell::Cell::get);
    println!(
        "bulk transfer of {bulk} flows: {} copies installed; the peer spent {:.1} ms parsing and installing \
         ({:.0} ns per flow); {} ms of simulated time",
        dst.len(),
        ns as f64 / 1e6,
        ns as f64 / bulk as f64,
        t
    );
}

thread_local! {
    static INSTALL_NS: std::cell::Cell<u128> = const { std::cell::Cell::new(0) };
}
