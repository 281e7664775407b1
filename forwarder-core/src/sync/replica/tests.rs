use core::net::Ipv4Addr;
use std::collections::BTreeMap;

use super::*;
use crate::conntrack::{Config, NewFlow};
use crate::flow::{FlowKey, NodeAddr, Proto};
use crate::ports::{PortPools, PortRange, Rng};
use crate::sync::inbox::Tables;
use crate::sync::wire::Datagram;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

fn table(egress: IpAddr) -> Table {
    Table::new(
        Config {
            max_entries: 4096,
            ..Config::default()
        },
        PortPools::new(&[egress], PortRange::default()),
    )
}

/// One replica of the simulation: its sync, its own table, the copies of its peer's.
struct Node {
    sync: Replica,
    own: Table,
    copies: Table,
    rng: Rng,
}

impl Node {
    fn new(ordinal: u16, epoch: u64) -> Node {
        let own = table(ip(1 + u8::try_from(ordinal).expect("small")));
        let mut s = Settings::new(42, ordinal, epoch, 0);
        s.datagram = 600;
        Node {
            sync: Replica::new(s, own.slots(), &[0, 1]),
            own,
            copies: table(ip(2 - u8::try_from(ordinal).expect("small"))),
            rng: Rng::new(epoch),
        }
    }

    /// Opens `n` UDP flows from pod `pod`.
    fn open(&mut self, pod: u8, n: u16, now: Instant) {
        let g = self.own.pin();
        let egress = self.own.pools().usage()[0].ip;
        for i in 0..n {
            let new = NewFlow {
                orig: FlowKey {
                    src: IpAddr::V4(Ipv4Addr::new(10, 244, 1, pod)),
                    dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
                    src_port: 10_000 + i,
                    dst_port: 53,
                    proto: Proto::Udp,
                },
                egress_ip: egress,
                node: NodeAddr {
                    ip: Ipv4Addr::new(172, 18, 0, 11),
                    mac: [2, 0, 0, 0, 0, 0x11],
                },
                uplink: 0,
            };
            let f = self.own.insert(new, now, &mut self.rng, &g).expect("flow");
            let id = FlowRecord::from_image(&f.image(now), 0, 0).id;
            self.sync.flow_started(id, now);
        }
    }
}

/// Asserts that two tables hold the same flows on the same ports (without printing thousands of them).
fn same(a: &Table, b: &Table, what: &str) {
    let (ka, kb) = (keys(a), keys(b));
    assert_eq!(ka.len(), kb.len(), "{what}: flow counts");
    assert!(ka == kb, "{what}: the same flows on the same ports");
}

fn keys(t: &Table) -> BTreeMap<String, u16> {
    let g = t.pin();
    let mut m = BTreeMap::new();
    t.for_each(&g, |f| {
        m.insert(format!("{:?}", f.reply_key()), f.external_port());
    });
    m
}

/// Runs the two replicas for `ms` milliseconds from `start`, 1 ms per step, over a link that loses the
/// datagrams `lose` picks (by a running count). Returns the time reached.
fn run(
    nodes: &mut [Node; 2],
    start: u64,
    ms: u64,
    lose: &dyn Fn(u64) -> bool,
    up: [bool; 2],
) -> u64 {
    let mut count = 0u64;
    for t in start..start + ms {
        let now = Instant::from_millis(t);
        for i in 0..2 {
            if !up[i] {
                continue;
            }
            let mut out = Vec::new();
            {
                let n = &mut nodes[i];
                let g = n.own.pin();
                n.sync.tick(&n.own, now, &g);
                let mut buf = [0u8; 600];
                let copies = |_| Some(&n.copies);
                while let Some(len) = n.sync.poll_transmit(&n.own, copies, now, &g, &mut buf) {
                    let peer = 1 - u16::try_from(i).expect("small");
                    n.sync.stamp(peer, &mut buf[..len]);
                    out.push(buf[..len].to_vec());
                }
            }
            for bytes in out {
                count += 1;
                if lose(count) || !up[1 - i] {
                    continue;
                }
                let to = &mut nodes[1 - i];
                let g = to.copies.pin();
                let from = u16::try_from(i).expect("small");
                let tables = Tables {
                    copies: &to.copies,
                    own: &to.own,
                };
                to.sync
                    .receive(from, &bytes, tables, |_, _| Some(0), |_| true, now, &g)
                    .expect("valid");
            }
        }
    }
    start + ms
}

/// Two replicas open flows while every fifth datagram is lost: within a few heartbeats each holds a copy of
/// every flow of the other, both ask each other for a bulk transfer at first contact and end in sync.
#[test]
fn two_replicas_converge_and_stay_in_sync() {
    let mut nodes = [Node::new(0, 0xA), Node::new(1, 0xB)];
    let lossy = |n: u64| n.is_multiple_of(5);
    nodes[0].open(1, 300, Instant::from_millis(0));
    nodes[1].open(2, 200, Instant::from_millis(0));
    let mut t = run(&mut nodes, 0, 50, &lossy, [true, true]);
    nodes[0].open(3, 100, Instant::from_millis(t));
    t = run(&mut nodes, t, 1500, &lossy, [true, true]);
    same(&nodes[1].copies, &nodes[0].own, "copies at 1");
    same(&nodes[0].copies, &nodes[1].own, "copies at 0");
    assert_eq!(keys(&nodes[1].copies).len(), 400);
    let now = Instant::from_millis(t);
    assert_eq!(nodes[0].sync.peer_phase(1, now), Some(PeerPhase::InSync));
    assert_eq!(nodes[1].sync.peer_phase(0, now), Some(PeerPhase::InSync));
    assert_eq!(nodes[1].sync.peer_hello(0).map(|h| h.flows), Some(400));
    let s = nodes[1].sync.peer_stats(0).expect("peer");
    assert!(s.missed > 0, "{s:?}");
    // idle flows send nothing: only heartbeats, about one per 100 ms (once the repairs of the lossy
    // link are done)
    let t = run(&mut nodes, t, 200, &|_| false, [true, true]);
    let before = nodes[0].sync.stats();
    run(&mut nodes, t, 1000, &|_| false, [true, true]);
    let after = nodes[0].sync.stats();
    assert!(
        (9..=11).contains(&(after.sent - before.sent)),
        "{before:?} {after:?}"
    );
    assert_eq!(
        after.sent - before.sent,
        after.heartbeats - before.heartbeats
    );
}

/// A peer that stops is reported silent after `dead_after`, and the survivor keeps its copies (to carry
/// its flows on); restarted (a new epoch, empty tables) it asks for a bulk transfer and gets every flow of
/// the survivor, and its own previous incarnation's flows handed back — on the same ports, which its new
/// flows then do not get.
#[test]
fn a_silent_peer_is_reported_and_a_restarted_one_resyncs() {
    let mut nodes = [Node::new(0, 0xA), Node::new(1, 0xB)];
    nodes[0].open(1, 250, Instant::from_millis(0));
    nodes[1].open(2, 50, Instant::from_millis(0));
    let t = run(&mut nodes, 0, 500, &|_| false, [true, true]);
    assert_eq!(keys(&nodes[1].copies).len(), 250);
    let before = keys(&nodes[1].own);
    // node 1 dies: node 0 hears nothing
    let t = run(&mut nodes, t, 350, &|_| false, [true, false]);
    let now = Instant::from_millis(t);
    assert_eq!(nodes[0].sync.peer_phase(1, now), Some(PeerPhase::Silent));
    assert_eq!(
        keys(&nodes[0].copies).len(),
        50,
        "copies of the dead peer stay"
    );
    // it comes back as a new incarnation with nothing
    nodes[1] = Node::new(1, 0xB2);
    assert_eq!(nodes[1].sync.peer_phase(0, now), Some(PeerPhase::Unknown));
    let t = run(&mut nodes, t, 1500, &|n| n.is_multiple_of(3), [true, true]);
    let now = Instant::from_millis(t);
    same(
        &nodes[1].copies,
        &nodes[0].own,
        "copies at the restarted replica",
    );
    assert_eq!(nodes[1].sync.peer_phase(0, now), Some(PeerPhase::InSync));
    assert_eq!(nodes[0].sync.peer_phase(1, now), Some(PeerPhase::InSync));
    assert!(
        keys(&nodes[1].own) == before,
        "its flows are its own again, on their ports"
    );
    same(&nodes[0].copies, &nodes[1].own, "and copied again");
    assert_eq!(nodes[1].sync.stats().returned, 50);
    assert_eq!(nodes[1].sync.stats().refused, 0);
    assert!(
        nodes[0].sync.stats().bulk_served >= 2,
        "{:?}",
        nodes[0].sync.stats()
    );
    // new flows of the new incarnation take other ports
    nodes[1].open(3, 200, now);
    let ports: std::collections::BTreeSet<u16> = keys(&nodes[1].own).into_values().collect();
    assert_eq!(ports.len(), 250);
}

/// A peer is never reported in sync while datagrams of its bulk transfer are missing, even when the bulk's
/// end overtook them (a readiness that comes before the flows would let traffic reach a replica without
/// them). Checked every millisecond of a lossy transfer.
#[test]
fn a_peer_is_in_sync_only_with_every_datagram_of_its_bulk() {
    let mut early = 0;
    for seed in 1..=6u64 {
        let mut nodes = [Node::new(0, 0xA0 + seed), Node::new(1, 0xB0 + seed)];
        nodes[0].open(1, 400, Instant::from_millis(0));
        // `run` counts the datagrams of each call: count them across the 1 ms steps here
        let count = std::cell::Cell::new(0u64);
        let lose = |_| {
            count.set(count.get() + 1);
            let x = (count.get() ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (x >> 40).is_multiple_of(4)
        };
        let mut t = 0;
        let mut insync_at = None;
        while t < 3000 {
            t = run(&mut nodes, t, 1, &lose, [true, true]);
            let now = Instant::from_millis(t);
            if nodes[1].sync.peer_phase(0, now) == Some(PeerPhase::InSync) {
                if nodes[1].copies.len() != nodes[0].own.len() {
                    early += 1;
                }
                insync_at.get_or_insert(t);
            }
        }
        assert!(insync_at.is_some(), "seed {seed}: never in sync");
        same(&nodes[1].copies, &nodes[0].own, &format!("seed {seed}"));
    }
    assert_eq!(early, 0, "milliseconds in sync without every flow");
}

/// A replica that comes back without the address it had (its configuration changed) cannot take its flows
/// back: it refuses each and deletes it, and the survivor drops its copies instead of carrying connections
/// nobody answers for.
#[test]
fn flows_a_restarted_replica_cannot_take_back_are_deleted_at_its_peers() {
    let mut nodes = [Node::new(0, 0xA), Node::new(1, 0xB)];
    nodes[1].open(2, 40, Instant::from_millis(0));
    let t = run(&mut nodes, 0, 500, &|_| false, [true, true]);
    assert_eq!(keys(&nodes[0].copies).len(), 40);
    let t = run(&mut nodes, t, 350, &|_| false, [true, false]);
    nodes[1] = Node::new(1, 0xB2);
    nodes[1].own = table(ip(9));
    let t = run(&mut nodes, t, 1000, &|_| false, [true, true]);
    assert_eq!(nodes[1].own.len(), 0);
    let s = nodes[1].sync.stats();
    assert_eq!((s.returned, s.disowned), (0, 40), "{s:?}");
    assert_eq!(nodes[0].copies.len(), 0, "the copies went with the deletes");
    assert_eq!(
        nodes[1].sync.peer_phase(0, Instant::from_millis(t)),
        Some(PeerPhase::InSync)
    );
}

/// A bulk transfer goes to every replica of the set (each datagram does): what it hands back to one replica
/// is skipped by the others, neither installed nor counted as refused.
#[test]
fn flows_handed_back_to_another_replica_are_skipped() {
    let mut nodes = [Node::new(0, 0xA), Node::new(1, 0xB)];
    nodes[1].open(2, 30, Instant::from_millis(0));
    let t = run(&mut nodes, 0, 500, &|_| false, [true, true]);
    let now = Instant::from_millis(t);
    let third_own = table(ip(3));
    let third_copies = table(ip(1));
    let mut third = Replica::new(Settings::new(42, 2, 0xC, 0), third_own.slots(), &[0, 1, 2]);
    // node 0's bulk transfer to node 1: its own flows (none) and node 1's, handed back
    let mut buf = [0u8; 1400];
    let Node {
        sync, own, copies, ..
    } = &mut nodes[0];
    let g = own.pin();
    sync.outbox.start_bulk(1, 77);
    let (mut returned, mut seen) = (0, 0);
    while let Some(len) = sync.poll_transmit(own, |_| Some(&*copies), now, &g, &mut buf) {
        let dg = Datagram::new_checked(&buf[..len]).expect("valid");
        seen += dg
            .records()
            .filter(|r| matches!(r, Ok(Record::Flow(f)) if f.owner == 1))
            .count();
        let tables = Tables {
            copies: &third_copies,
            own: &third_own,
        };
        let out = third
            .receive(0, &buf[..len], tables, |_, _| Some(0), |_| true, now, &g)
            .expect("valid");
        returned += out.returned;
        assert_eq!(out.refused, 0);
        if !sync.outbox.bulk_active() {
            break;
        }
    }
    assert_eq!(seen, 30, "the bulk transfer hands node 1's flows back");
    assert_eq!((returned, third_own.len(), third_copies.len()), (0, 0, 0));
}

/// Datagrams of another set, or claiming another sender, change nothing.
#[test]
fn foreign_datagrams_are_refused() {
    let mut a = Node::new(0, 1);
    let mut b = Node::new(1, 2);
    a.open(1, 3, Instant::from_millis(0));
    let g = a.own.pin();
    let mut buf = [0u8; 600];
    let now = Instant::from_millis(10);
    let len = a
        .sync
        .poll_transmit(&a.own, |_| None, now, &g, &mut buf)
        .expect("due");
    let gb = b.copies.pin();
    let tables = Tables {
        copies: &b.copies,
        own: &b.own,
    };
    let mut recv = |from: u16, bytes: &[u8]| {
        b.sync
            .receive(from, bytes, tables, |_, _| Some(0), |_| true, now, &gb)
            .err()
    };
    assert_eq!(
        recv(0, &buf[..len - 1]),
        Some(ReceiveError::Wire(wire::Error::Truncated))
    );
    assert_eq!(recv(5, &buf[..len]), Some(ReceiveError::WrongSender));
    let mut other = buf;
    other[4] ^= 1;
    assert_eq!(recv(0, &other[..len]), Some(ReceiveError::OtherSet));
    // a peer claiming to be another: the header says 0, the socket says 1 is not... 1 is b itself
    assert_eq!(recv(1, &buf[..len]), Some(ReceiveError::WrongSender));
    assert_eq!(b.copies.len(), 0);
    assert_eq!(recv(0, &buf[..len]), None);
    assert_eq!(b.copies.len(), 3);
}

/// A third of the datagrams lost at random, both ways, NACKs and their answers included: every seed
/// converges, with flows opened while it runs.
#[test]
fn converges_under_random_loss_both_ways() {
    for seed in 1..=8u64 {
        let mut nodes = [Node::new(0, 0xA0 + seed), Node::new(1, 0xB0 + seed)];
        let lose = move |n: u64| {
            let x =
                (n ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            (x >> 33).is_multiple_of(3)
        };
        nodes[0].open(1, 200, Instant::from_millis(0));
        let mut t = run(&mut nodes, 0, 40, &lose, [true, true]);
        nodes[1].open(2, 150, Instant::from_millis(t));
        t = run(&mut nodes, t, 40, &lose, [true, true]);
        nodes[0].open(3, 100, Instant::from_millis(t));
        run(&mut nodes, t, 3000, &lose, [true, true]);
        same(
            &nodes[1].copies,
            &nodes[0].own,
            &format!("seed {seed}: copies at 1"),
        );
        same(
            &nodes[0].copies,
            &nodes[1].own,
            &format!("seed {seed}: copies at 0"),
        );
    }
}

/// A replica's heartbeats say which dead peers it serves; its peer learns it from them, and learns when it
/// stops.
#[test]
fn heartbeats_say_whom_a_replica_serves() {
    let mut nodes = [Node::new(0, 0xA), Node::new(1, 0xB)];
    let t = run(&mut nodes, 0, 300, &|_| false, [true, true]);
    assert!(!nodes[1].sync.peer_serves(0, 1));
    nodes[0].sync.set_served([1]);
    let t = run(&mut nodes, t, 300, &|_| false, [true, true]);
    assert!(nodes[1].sync.peer_serves(0, 1), "0 serves 1");
    assert!(!nodes[1].sync.peer_serves(0, 0), "itself does not count");
    nodes[0].sync.set_served([]);
    run(&mut nodes, t, 300, &|_| false, [true, true]);
    assert!(!nodes[1].sync.peer_serves(0, 1), "no longer");
}

/// A replica that has changes to send every millisecond never falls quiet for a heartbeat; what its Hello
/// says still reaches its peer: a change at once, in the next datagram, and the Hello at least every
/// heartbeat besides. (Before, the Hello went out only in a datagram with nothing else, and a replica busy
/// with new flows kept its peers from learning that it served them: a draining peer waited out its
/// drain_seconds.)
#[test]
fn a_busy_replica_still_says_whom_it_serves() {
    let mut nodes = [Node::new(0, 0xA), Node::new(1, 0xB)];
    let mut t = run(&mut nodes, 0, 300, &|_| false, [true, true]);
    let busy = |nodes: &mut [Node; 2], t: u64, ms: u64| -> u64 {
        for step in 0..ms {
            let pod = u8::try_from((t + step) % 200).expect("small") + 1;
            nodes[0].open(pod, 1, Instant::from_millis(t + step));
            run(nodes, t + step, 1, &|_| false, [true, true]);
        }
        t + ms
    };
    t = busy(&mut nodes, t, 200);
    let heartbeats = nodes[0].sync.stats().heartbeats;
    nodes[0].sync.set_served([1]);
    t = busy(&mut nodes, t, 20);
    assert!(
        nodes[1].sync.peer_serves(0, 1),
        "a change of what the Hello says goes out within 20 ms of busy traffic"
    );
    busy(&mut nodes, t, 500);
    let sent = nodes[0].sync.stats().heartbeats - heartbeats;
    assert!(
        (5..=12).contains(&sent),
        "{sent} Hellos in 520 ms of busy traffic: the change, and one per 100 ms heartbeat"
    );
}
