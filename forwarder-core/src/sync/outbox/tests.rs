use core::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::conntrack::{Config, Flow, NewFlow, TcpSegment};
use crate::flow::{FlowKey, NodeAddr, Proto};
use crate::ports::{PortPools, PortRange, Rng};
use crate::sync::wire::{Datagram, Header};

const EGRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

fn table() -> Table {
    Table::new(
        Config {
            max_entries: 64,
            ..Config::default()
        },
        PortPools::new(&[EGRESS], PortRange::default()),
    )
}

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

fn open<'g>(tb: &'g Table, port: u16, proto: Proto, g: &'g Guard) -> &'g Flow {
    let new = NewFlow {
        orig: FlowKey {
            src: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
            src_port: port,
            dst_port: 443,
            proto,
        },
        egress_ip: EGRESS,
        node: NodeAddr {
            ip: Ipv4Addr::new(172, 18, 0, 11),
            mac: [2, 0, 0, 0, 0, 0x11],
        },
        uplink: 0,
    };
    tb.insert(new, t(0), &mut Rng::new(u64::from(port)), g)
        .expect("flow")
}

fn seg(flags: u8, seq: u32, ack: u32) -> Option<TcpSegment> {
    Some(TcpSegment {
        flags,
        seq,
        ack,
        window: 100,
        payload_len: 0,
    })
}

fn id(f: &Flow) -> FlowId {
    FlowRecord::from_image(&f.image(t(0)), 0, 0).id
}

/// Fills one datagram of `size` bytes as sequence number `seq`; returns its records.
fn send(o: &mut Outbox, tb: &Table, seq: u32, size: usize, now: Instant) -> Vec<Record> {
    send_holding(o, tb, None, seq, size, now)
}

/// [`send`] by a replica holding `copies` = (peer, the table of its copies).
fn send_holding(
    o: &mut Outbox,
    tb: &Table,
    copies: Option<(u16, &Table)>,
    seq: u32,
    size: usize,
    now: Instant,
) -> Vec<Record> {
    let g = tb.pin();
    let mut buf = vec![0u8; size];
    let mut w = Writer::new(&mut buf, &Header::default()).expect("room");
    let of = |peer: u16| copies.filter(|c| c.0 == peer).map(|c| c.1);
    o.fill(&mut w, seq, tb, of, now, &g);
    let n = w.finish();
    let dg = Datagram::new_checked(&buf[..n]).expect("valid");
    dg.records().map(|r| r.expect("record")).collect()
}

fn tcp_state(recs: &[Record]) -> Vec<u8> {
    recs.iter()
        .filter_map(|r| match r {
            Record::Flow(f) => Some(f.tcp_state),
            _ => None,
        })
        .collect()
}

/// A flow queued several times is sent once, as it is when the datagram is built; a flow that ended
/// before it was sent costs only its delete.
#[test]
fn changes_are_coalesced_and_read_at_send_time() {
    let tb = table();
    let g = tb.pin();
    let mut o = Outbox::new(
        2,
        tb.slots(),
        Duration::from_secs(10),
        Duration::ZERO,
        100,
        8,
    );
    let a = open(&tb, 1000, Proto::Tcp, &g);
    o.flow_started(id(a), t(0));
    o.flow_started(id(a), t(0));
    a.on_outbound(seg(TcpSegment::SYN, 1, 0), 60, t(1));
    let recs = send(&mut o, &tb, 1, 1400, t(2));
    assert_eq!(recs.len(), 1);
    let Record::Flow(r) = recs[0] else {
        panic!("{recs:?}")
    };
    assert_eq!(
        (r.owner, r.tcp_ref),
        (2, 2),
        "read when sent: the SYN's ISN + 1"
    );
    assert!(o.is_empty());
    assert!(send(&mut o, &tb, 2, 1400, t(3)).is_empty());
    let b = open(&tb, 1001, Proto::Udp, &g);
    o.flow_started(id(b), t(0));
    o.flow_ended(id(b), DeleteReason::Expired);
    let recs = send(&mut o, &tb, 2, 1400, t(4));
    assert_eq!(recs, vec![Record::Delete(id(b), DeleteReason::Expired)]);
    // a flow gone from the table by the time its datagram is built is skipped
    let c = open(&tb, 1002, Proto::Udp, &g);
    o.flow_started(id(c), t(0));
    assert!(tb.remove(&c.reply_key(), t(5), &g));
    assert!(send(&mut o, &tb, 3, 1400, t(5)).is_empty());
    assert_eq!(o.stats().vanished, 1);
}

/// The refresh scan re-sends a flow whose TCP state changed or whose traffic advanced by the refresh
/// interval since it was last sent, and leaves idle flows alone.
#[test]
fn the_scan_sends_changes_and_refreshes_only() {
    let tb = table();
    let g = tb.pin();
    let mut o = Outbox::new(
        0,
        tb.slots(),
        Duration::from_secs(10),
        Duration::ZERO,
        100,
        8,
    );
    let tcp = open(&tb, 1000, Proto::Tcp, &g);
    let udp = open(&tb, 1001, Proto::Udp, &g);
    for f in [tcp, udp] {
        o.flow_started(id(f), t(0));
    }
    assert_eq!(send(&mut o, &tb, 1, 1400, t(0)).len(), 2);
    assert_eq!(o.scan(&tb, 1000, t(100), &g), 0, "nothing changed");
    tcp.on_outbound(seg(TcpSegment::SYN, 1, 0), 60, t(200));
    tcp.on_inbound(seg(TcpSegment::SYN | TcpSegment::ACK, 9, 2), 60, t(200));
    tcp.on_outbound(seg(TcpSegment::ACK, 2, 10), 40, t(200));
    udp.on_outbound(None, 60, t(5_000));
    assert_eq!(o.scan(&tb, 1000, t(5_000), &g), 1, "TCP established");
    assert_eq!(tcp_state(&send(&mut o, &tb, 2, 1400, t(5_000))), vec![2]);
    assert_eq!(o.scan(&tb, 1000, t(6_000), &g), 0);
    // UDP traffic 10 s after it was last sent: a refresh
    udp.on_outbound(None, 60, t(10_100));
    assert_eq!(o.scan(&tb, 1000, t(10_100), &g), 1);
    // a scan in small steps visits every slot and comes back to the start
    let mut queued = 0;
    udp.on_outbound(None, 60, t(20_200));
    for _ in 0..10 {
        queued += o.scan(&tb, 1, t(20_200), &g);
    }
    assert_eq!(queued, 0, "already queued");
    assert_eq!(send(&mut o, &tb, 3, 1400, t(20_200)).len(), 1);
}

/// A datagram that is full stops the fill; the rest goes in the next one.
#[test]
fn a_full_datagram_leaves_the_rest_queued() {
    let tb = table();
    let g = tb.pin();
    let mut o = Outbox::new(
        0,
        tb.slots(),
        Duration::from_secs(10),
        Duration::ZERO,
        100,
        8,
    );
    for p in 0..5 {
        o.flow_started(id(open(&tb, 2000 + p, Proto::Udp, &g)), t(0));
    }
    // header 40 + section 4 + 2 × 48
    assert_eq!(send(&mut o, &tb, 1, 140, t(0)).len(), 2);
    assert_eq!(send(&mut o, &tb, 2, 1400, t(0)).len(), 3);
    assert!(o.is_empty());
}

/// A NACK queues the lost datagrams' records again, flows as they are now; one older than the ring says
/// so (the peer needs a bulk transfer), and re-queues what is still there.
#[test]
fn a_nack_requeues_what_the_lost_datagrams_carried() {
    let tb = table();
    let g = tb.pin();
    let mut o = Outbox::new(
        0,
        tb.slots(),
        Duration::from_secs(10),
        Duration::ZERO,
        100,
        2,
    );
    let flows: Vec<FlowId> = (0..4)
        .map(|p| id(open(&tb, 3000 + p, Proto::Udp, &g)))
        .collect();
    o.flow_started(flows[0], t(0));
    send(&mut o, &tb, 10, 1400, t(0));
    o.flow_started(flows[1], t(0));
    o.flow_ended(flows[2], DeleteReason::Expired);
    send(&mut o, &tb, 11, 1400, t(0));
    assert!(o.nack(11, 11));
    assert_eq!(
        send(&mut o, &tb, 12, 1400, t(1)),
        vec![
            Record::Delete(flows[2], DeleteReason::Expired),
            Record::Flow(FlowRecord::from_image(
                &tb.lookup_inbound_at(&flows[1].reply_key(), t(1), &g)
                    .expect("flow")
                    .image(t(1)),
                0,
                0
            ))
        ]
    );
    // the ring keeps 2 datagrams (11 and 12): 10 is gone
    assert!(!o.nack(10, 11));
    assert_eq!(o.stats().too_old, 1);
    let again = send(&mut o, &tb, 13, 1400, t(2));
    assert_eq!(again.len(), 2, "11's records again: {again:?}");
    assert_eq!(o.stats().resent, 4);
}

/// A queued flow waits out the hold, so what happens to it meanwhile goes in its one record; a NACK's
/// resend does not wait.
#[test]
fn a_flow_waits_out_the_hold_and_a_resend_does_not() {
    let tb = table();
    let g = tb.pin();
    let mut o = Outbox::new(
        0,
        tb.slots(),
        Duration::from_secs(10),
        Duration::from_millis(5),
        100,
        8,
    );
    let f = open(&tb, 4000, Proto::Tcp, &g);
    o.flow_started(id(f), t(0));
    assert_eq!(o.due_at(), Some(t(5)));
    assert!(send(&mut o, &tb, 1, 1400, t(3)).is_empty());
    f.on_outbound(seg(TcpSegment::RST, 1, 0), 40, t(4));
    let recs = send(&mut o, &tb, 2, 1400, t(5));
    assert_eq!(tcp_state(&recs), vec![4], "sent once, reset: {recs:?}");
    assert_eq!(o.due_at(), None);
    assert!(o.nack(2, 2));
    assert_eq!(o.due_at(), Some(Instant::ZERO));
    assert_eq!(send(&mut o, &tb, 3, 1400, t(6)).len(), 1);
}

/// Two peers ask for a bulk transfer at once: the second waits for the end of the first, and each gets its
/// start and end records around every flow. The transfer to peer 2 hands back the copies of peer 2's flows
/// (its own, with peer 2 as owner); a lost datagram of them is sent again, ahead of the repeated end.
#[test]
fn bulk_transfers_run_one_after_the_other_and_hand_back_the_peers_flows() {
    let (tb, theirs) = (table(), table());
    let g = tb.pin();
    let mut o = Outbox::new(
        0,
        tb.slots(),
        Duration::from_secs(10),
        Duration::ZERO,
        100,
        64,
    );
    for p in 0..5 {
        open(&tb, 4000 + p, Proto::Udp, &g);
    }
    let handed: Vec<FlowId> = (0..3)
        .map(|p| id(open(&theirs, 5000 + p, Proto::Udp, &g)))
        .collect();
    let copies = Some((2, &theirs));
    o.start_bulk(1, 7);
    // a few records per datagram: the first transfer is under way when the second is asked for
    let small = 160;
    let mut seen = send_holding(&mut o, &tb, copies, 1, small, t(0));
    o.start_bulk(2, 9);
    let mut seq = 2;
    while o.bulk_active() {
        let recs = send_holding(&mut o, &tb, copies, seq, small, t(0));
        assert!(!recs.is_empty() && seq < 100, "no progress");
        seen.extend(recs);
        seq += 1;
    }
    let summary: Vec<String> = seen
        .iter()
        .map(|r| match r {
            Record::Flow(f) => format!("flow of {}", f.owner),
            r => format!("{r:?}"),
        })
        .collect();
    let mut want = vec!["BulkStart { peer: 1, id: 7, count: 5 }".to_string()];
    want.extend(vec!["flow of 0".to_string(); 5]);
    want.push("BulkEnd { peer: 1, id: 7, count: 5 }".into());
    want.push("BulkStart { peer: 2, id: 9, count: 8 }".into());
    want.extend(vec!["flow of 0".to_string(); 5]);
    want.extend(vec!["flow of 2".to_string(); 3]);
    want.push("BulkEnd { peer: 2, id: 9, count: 8 }".into());
    assert_eq!(summary, want);
    let returned: Vec<FlowId> = seen
        .iter()
        .filter_map(|r| match r {
            Record::Flow(f) if f.owner == 2 => {
                assert_eq!(f.flags, flow_flags::BULK);
                Some(f.id)
            }
            _ => None,
        })
        .collect();
    assert_eq!(returned, handed);
    // the last two datagrams (handed-back flows among them, and the end) were lost
    assert!(o.nack(seq - 2, seq - 1));
    let again = send_holding(&mut o, &tb, copies, seq, 1400, t(1));
    let again_returned: Vec<FlowId> = again
        .iter()
        .filter_map(|r| match r {
            Record::Flow(f) if f.owner == 2 => Some(f.id),
            _ => None,
        })
        .collect();
    assert_eq!(again_returned, handed, "{again:?}");
    assert_eq!(
        again.last(),
        Some(&Record::BulkEnd {
            peer: 2,
            id: 9,
            count: 8
        })
    );
}

/// A peer NACKing the same range again and again (a bug, or a forger without a key) cannot grow the queues
/// past their bound: past it the NACK says a bulk transfer is needed, and the overflow is counted.
#[test]
fn a_flood_of_nacks_does_not_grow_the_queues_past_their_bound() {
    let (tb, theirs) = (table(), table());
    let g = tb.pin();
    let limit = 4;
    let mut o = Outbox::new(
        0,
        tb.slots(),
        Duration::from_secs(10),
        Duration::ZERO,
        limit,
        64,
    );
    for p in 0..3 {
        open(&theirs, 5000 + p, Proto::Udp, &g);
    }
    o.start_bulk(2, 9);
    let mut seq = 1;
    while o.bulk_active() {
        assert!(!send_holding(&mut o, &tb, Some((2, &theirs)), seq, 1400, t(0)).is_empty());
        seq += 1;
    }
    // start, three handed-back flows, end: five records the NACK queues again, each time
    assert!(
        !o.nack(1, seq - 1),
        "more than the bound: a bulk transfer is needed"
    );
    for _ in 0..1000 {
        o.nack(1, seq - 1);
    }
    assert!(o.returns.len() + o.controls.len() <= limit);
    assert!(o.stats().overflow >= 1000);
}
