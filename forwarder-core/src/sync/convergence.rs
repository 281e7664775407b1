//! The protocol end to end, without sockets: a replica's flows churn while its outbox sends them over a
//! link that loses and duplicates datagrams; the peer applies what arrives and NACKs the gaps; at the end
//! the peer's copies are exactly the replica's flows.

use core::net::{IpAddr, Ipv4Addr};
use core::time::Duration;
use std::collections::BTreeMap;

use super::inbox::{apply, Tables};
use super::outbox::Outbox;
use super::peer::{PeerStream, Verdict};
use super::wire::{Datagram, DeleteReason, FlowRecord, Header, Hello, PeerState, Record, Writer};
use crate::conntrack::{Config, Table, TcpSegment};
use crate::flow::{FlowKey, NodeAddr, Proto};
use crate::ports::{PortPools, PortRange, Rng};
use crate::time::Instant;

const EGRESS_A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
const NODE: NodeAddr = NodeAddr {
    ip: Ipv4Addr::new(172, 18, 0, 11),
    mac: [2, 0, 0, 0, 0, 0x11],
};

/// The replica's outbox, sending every queued flow at once (no hold), remembering the last `ring` datagrams.
fn outbox(a: &Table, ring: usize) -> Outbox {
    Outbox::new(
        0,
        a.slots(),
        Duration::from_secs(10),
        Duration::ZERO,
        10_000,
        ring,
    )
}

fn table() -> Table {
    Table::new(
        Config {
            max_entries: 4096,
            ..Config::default()
        },
        PortPools::new(&[EGRESS_A], PortRange::default()),
    )
}

/// What the peers should agree on: reply key → (external port, TCP state code).
fn state(t: &Table) -> BTreeMap<String, (u16, u8)> {
    let g = t.pin();
    let mut m = BTreeMap::new();
    t.for_each(&g, |f| {
        m.insert(
            format!("{:?}", f.reply_key()),
            (f.external_port(), f.tcp_tracking().code),
        );
    });
    m
}

#[test]
fn copies_converge_over_a_lossy_link() {
    let a = table();
    let copies = table();
    let own = table(); // the receiver's own table: nothing is handed back to it here
    let mut outbox = outbox(&a, 64);
    let mut stream = PeerStream::new();
    let mut rng = Rng::new(1);
    let mut seq = 100u32;
    let mut sent = 0u32;
    let header = |seq| Header {
        set_id: 7,
        ordinal: 0,
        epoch: 0xE,
        seq,
        ..Header::default()
    };
    let node = NODE;
    let seg = |flags, seq, ack| {
        Some(TcpSegment {
            flags,
            seq,
            ack,
            window: 500,
            payload_len: 0,
        })
    };
    let mut delivered = 0;
    // one round: flows start, some handshake, some end; then the outbox drains over the link
    for round in 0..20u64 {
        let now = Instant::from_millis(round * 1000);
        let g = a.pin();
        for i in 0..40u16 {
            let n = u16::try_from(round).expect("small") * 40 + i;
            let proto = if n % 3 == 0 { Proto::Udp } else { Proto::Tcp };
            let orig = FlowKey {
                src: IpAddr::V4(Ipv4Addr::new(
                    10,
                    244,
                    1,
                    u8::try_from(n % 200).expect("small"),
                )),
                dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
                src_port: 20_000 + n,
                dst_port: 443,
                proto,
            };
            let f = a
                .insert(
                    crate::conntrack::NewFlow {
                        orig,
                        egress_ip: EGRESS_A,
                        node,
                        uplink: 0,
                    },
                    now,
                    &mut rng,
                    &g,
                )
                .expect("flow");
            outbox.flow_started(FlowRecord::from_image(&f.image(now), 0, 0).id, now);
            if proto == Proto::Tcp && n % 2 == 0 {
                f.on_outbound(seg(TcpSegment::SYN, 1, 0), 60, now);
                f.on_inbound(seg(TcpSegment::SYN | TcpSegment::ACK, 9, 2), 60, now);
                f.on_outbound(seg(TcpSegment::ACK, 2, 10), 40, now);
            }
        }
        // a fifth of the flows of two rounds ago end
        if round >= 2 {
            let mut gone = Vec::new();
            a.for_each(&g, |f| {
                if f.created() <= Instant::from_millis((round - 2) * 1000)
                    && f.external_port() % 5 == 0
                {
                    gone.push(f.reply_key());
                }
            });
            for k in gone {
                let f = a.lookup_inbound_at(&k, now, &g).expect("live");
                let id = FlowRecord::from_image(&f.image(now), 0, 0).id;
                assert!(a.remove(&k, now, &g));
                outbox.flow_ended(id, DeleteReason::Flushed);
            }
        }
        outbox.scan(&a, 10_000, now, &g);
        drop(g);
        // drain: small datagrams; every third is lost, every seventh arrives twice; the last one of each
        // round is a heartbeat, so a lost tail shows as a gap
        let mut heartbeat = false;
        loop {
            let mut buf = [0u8; 400];
            let n = {
                let g = a.pin();
                let mut w = Writer::new(&mut buf, &header(seq)).expect("room");
                let records = outbox.fill(&mut w, seq, &a, |_| None, now, &g);
                if records == 0 {
                    if heartbeat {
                        break;
                    }
                    heartbeat = true;
                    w.push(&Record::Hello(Hello {
                        state: PeerState::Ready,
                        served: 1,
                        flows: 0,
                        passive: 0,
                        started_ms: 0,
                        features: 0,
                    }))
                    .expect("fits");
                }
                w.finish()
            };
            sent += 1;
            seq = seq.wrapping_add(1);
            let copies_of = if sent.is_multiple_of(3) {
                0
            } else if sent.is_multiple_of(7) {
                2
            } else {
                1
            };
            for _ in 0..copies_of {
                let dg = Datagram::new_checked(&buf[..n]).expect("valid");
                let g = copies.pin();
                let out = apply(
                    &dg,
                    1,
                    0,
                    &mut stream,
                    Tables {
                        copies: &copies,
                        own: &own,
                    },
                    |_, _| Some(0),
                    |_| true,
                    now,
                    &g,
                );
                assert_eq!(out.refused, 0);
                delivered += 1;
                if let Verdict::Apply {
                    nack: Some((from, to)),
                } = out.verdict
                {
                    // the NACK goes back to the sender (that link is reliable here)
                    assert!(outbox.nack(from, to), "within the ring");
                    heartbeat = false;
                }
            }
        }
        assert_eq!(state(&copies), state(&a), "round {round}");
    }
    let s = stream.stats();
    assert!(s.missed > 50 && s.stale > 10, "{s:?}");
    assert!(outbox.stats().resent > 0);
    assert!(delivered > 100);
    assert_eq!(state(&a).len(), a.len());
}

/// A peer that (re)starts with nothing asks for a bulk transfer when it first hears the replica, and gets
/// every flow over the same lossy link, announced and closed by the bulk records; flows that change
/// meanwhile reach it too.
#[test]
fn a_new_peer_gets_everything_by_bulk_transfer() {
    let a = table();
    let copies = table();
    let own = table(); // the receiver's own table: nothing is handed back to it here
    let mut outbox = outbox(&a, 256);
    let mut stream = PeerStream::new();
    let mut rng = Rng::new(2);
    let node = NODE;
    let now = Instant::from_secs(5);
    let g = a.pin();
    for n in 0..1000u16 {
        let orig = FlowKey {
            src: IpAddr::V4(Ipv4Addr::new(
                10,
                244,
                2,
                u8::try_from(n % 250).expect("small"),
            )),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20)),
            src_port: 30_000 + n,
            dst_port: 53,
            proto: Proto::Udp,
        };
        let new = crate::conntrack::NewFlow {
            orig,
            egress_ip: EGRESS_A,
            node,
            uplink: 0,
        };
        a.insert(new, now, &mut rng, &g).expect("flow");
    }
    drop(g);
    let (mut seq, mut sent) = (1u32, 0u32);
    let (mut announced, mut ended) = (None, None);
    let mut asked = false;
    for step in 0..10_000 {
        let mut buf = [0u8; 1400];
        let n = {
            let g = a.pin();
            let header = Header {
                epoch: 0xA,
                seq,
                ..Header::default()
            };
            let mut w = Writer::new(&mut buf, &header).expect("room");
            if outbox.fill(&mut w, seq, &a, |_| None, now, &g) == 0 {
                if asked && outbox.is_empty() && ended.is_some() {
                    break;
                }
                w.push(&Record::Hello(Hello {
                    state: PeerState::Ready,
                    served: 1,
                    flows: 1000,
                    passive: 0,
                    started_ms: 0,
                    features: 0,
                }))
                .expect("fits");
            }
            w.finish()
        };
        seq += 1;
        sent += 1;
        if sent.is_multiple_of(4) {
            continue; // lost
        }
        let dg = Datagram::new_checked(&buf[..n]).expect("valid");
        let g = copies.pin();
        let out = apply(
            &dg,
            1,
            0,
            &mut stream,
            Tables {
                copies: &copies,
                own: &own,
            },
            |_, _| Some(0),
            |_| true,
            now,
            &g,
        );
        match out.verdict {
            Verdict::NewEpoch => {
                // the peer's answer, a bulk request, reaches the replica
                assert!(!asked, "one epoch");
                asked = true;
                outbox.start_bulk(1, 77);
            }
            Verdict::Apply {
                nack: Some((from, to)),
            } => {
                assert!(outbox.nack(from, to));
            }
            _ => {}
        }
        announced = announced.or(out.bulk_start);
        ended = ended.or(out.bulk_end);
        assert!(step < 9_999, "never converged");
    }
    assert_eq!(announced, Some((77, 1000)));
    assert_eq!(ended, Some((77, 1000)));
    assert_eq!(state(&copies), state(&a));
    assert!(outbox.stats().resent > 0, "losses were repaired");
}
