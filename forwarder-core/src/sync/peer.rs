//! What a replica tracks of each peer's stream of sync datagrams: which incarnation (epoch) of the peer it
//! hears, the highest sequence number applied, the gaps to ask for again, and when it last heard anything.
//!
//! The rules are conntrackd FTFW's (conntrack-tools `src/sync-ftfw.c`), adapted to a sender that answers a
//! NACK with the *current* state of the flows the lost datagrams carried, under new sequence numbers (so a
//! receiver never applies an old copy over a newer one):
//!
//! * a datagram newer than the highest applied is applied; a gap before it is reported once as a NACK
//!   range;
//! * one not newer (a duplicate, or a late one after a newer was applied) is dropped as stale: what it
//!   carried was either applied already or has been sent again since;
//! * sequence numbers compare modulo 2³² (RFC 1982 serial number arithmetic, as conntrackd's
//!   `before`/`after`);
//! * a datagram from an epoch not heard before is a new incarnation (the peer restarted, or the first
//!   contact): its state before this datagram is unknown, so the caller asks for a bulk transfer; a datagram
//!   from an epoch this peer had earlier (delayed in the network past the restart) is dropped.

use core::time::Duration;

use super::wire::Header;
use crate::time::Instant;

/// Earlier epochs of a peer remembered, to drop their late datagrams.
const OLD_EPOCHS: usize = 4;

/// What to do with a datagram, by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply its records; with `nack`, first ask the peer again for the sequence numbers `from..=to` that
    /// never arrived.
    Apply {
        /// The gap before this datagram, inclusive.
        nack: Option<(u32, u32)>,
    },
    /// The first datagram of a new incarnation of the peer: apply its records and ask for a bulk transfer.
    NewEpoch,
    /// Not newer than what was applied: drop it.
    Stale,
    /// From an earlier incarnation of the peer: drop it.
    OldEpoch,
}

/// Counters of one peer's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamStats {
    /// Datagrams applied.
    pub applied: u64,
    /// Sequence numbers found missing (the sum of the NACK ranges' lengths).
    pub missed: u64,
    /// Datagrams dropped as stale.
    pub stale: u64,
    /// Datagrams dropped from an earlier incarnation.
    pub old_epoch: u64,
    /// Incarnations heard (the first contact counts).
    pub epochs: u64,
}

/// One peer's stream, as this replica receives it.
#[derive(Debug, Clone, Default)]
pub struct PeerStream {
    epoch: Option<u64>,
    old: [Option<u64>; OLD_EPOCHS],
    highest: u32,
    last_heard: Option<Instant>,
    stats: StreamStats,
}

/// True when serial number `a` comes after `b` (RFC 1982 §3.2 for 32-bit serials; the undefined half-way
/// case counts as not after).
pub const fn seq_after(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 1 << 31
}

impl PeerStream {
    /// A peer not heard yet.
    pub fn new() -> PeerStream {
        PeerStream::default()
    }

    /// Judges a datagram with `header`, already authenticated and from this peer, received at `now`.
    pub fn accept(&mut self, header: &Header, now: Instant) -> Verdict {
        if self.epoch != Some(header.epoch) {
            if self.old.contains(&Some(header.epoch)) {
                self.stats.old_epoch += 1;
                return Verdict::OldEpoch;
            }
            if let Some(previous) = self.epoch {
                self.old.rotate_right(1);
                self.old[0] = Some(previous);
            }
            self.epoch = Some(header.epoch);
            self.highest = header.seq;
            self.last_heard = Some(now);
            self.stats.epochs += 1;
            self.stats.applied += 1;
            return Verdict::NewEpoch;
        }
        self.last_heard = Some(now);
        if !seq_after(header.seq, self.highest) {
            self.stats.stale += 1;
            return Verdict::Stale;
        }
        let from = self.highest.wrapping_add(1);
        let nack = (header.seq != from).then(|| (from, header.seq.wrapping_sub(1)));
        if let Some((a, b)) = nack {
            self.stats.missed += u64::from(b.wrapping_sub(a)) + 1;
        }
        self.highest = header.seq;
        self.stats.applied += 1;
        Verdict::Apply { nack }
    }

    /// What this replica acknowledges to the peer: the highest sequence number applied and the low 32 bits of
    /// the epoch it belongs to ((0, 0) before the first datagram).
    pub fn ack(&self) -> (u32, u32) {
        match self.epoch {
            #[allow(clippy::cast_possible_truncation)] // the low half, as the header carries it
            Some(e) => (self.highest, e as u32),
            None => (0, 0),
        }
    }

    /// The peer's current epoch, if it was heard.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// How long the peer has been silent at `now` (`None` before the first datagram).
    pub fn silent_for(&self, now: Instant) -> Option<Duration> {
        self.last_heard.map(|t| now.saturating_since(t))
    }

    /// The counters.
    pub fn stats(&self) -> StreamStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn h(epoch: u64, seq: u32) -> Header {
        Header {
            epoch,
            seq,
            ..Header::default()
        }
    }

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn in_order_gaps_duplicates_and_wrap() {
        let mut p = PeerStream::new();
        assert_eq!(p.ack(), (0, 0));
        assert_eq!(p.silent_for(t(5)), None);
        assert_eq!(
            p.accept(&h(0xAB_0000_0007, u32::MAX - 1), t(10)),
            Verdict::NewEpoch
        );
        assert_eq!(p.ack(), (u32::MAX - 1, 7));
        assert_eq!(
            p.accept(&h(0xAB_0000_0007, u32::MAX), t(11)),
            Verdict::Apply { nack: None }
        );
        // across the wrap, with 0 and 1 lost
        assert_eq!(
            p.accept(&h(0xAB_0000_0007, 2), t(12)),
            Verdict::Apply { nack: Some((0, 1)) }
        );
        // the lost ones arriving late, and a duplicate: stale
        for seq in [0, 1, 2, u32::MAX] {
            assert_eq!(p.accept(&h(0xAB_0000_0007, seq), t(13)), Verdict::Stale);
        }
        assert_eq!(p.silent_for(t(20)), Some(Duration::from_millis(7)));
        assert_eq!(
            p.stats(),
            StreamStats {
                applied: 3,
                missed: 2,
                stale: 4,
                old_epoch: 0,
                epochs: 1
            }
        );
    }

    #[test]
    fn a_restart_is_a_new_epoch_and_late_datagrams_of_the_old_one_are_dropped() {
        let mut p = PeerStream::new();
        assert_eq!(p.accept(&h(1, 100), t(0)), Verdict::NewEpoch);
        assert_eq!(p.accept(&h(1, 101), t(1)), Verdict::Apply { nack: None });
        // restarted: a new epoch, with sequence numbers starting anywhere
        assert_eq!(p.accept(&h(2, 5), t(2)), Verdict::NewEpoch);
        assert_eq!(p.ack(), (5, 2));
        assert_eq!(p.accept(&h(1, 102), t(3)), Verdict::OldEpoch);
        assert_eq!(p.accept(&h(2, 6), t(4)), Verdict::Apply { nack: None });
        // four more restarts: the oldest epochs are forgotten, the recent ones still refused
        for e in 3..=6 {
            assert_eq!(p.accept(&h(e, 0), t(5)), Verdict::NewEpoch);
        }
        assert_eq!(p.accept(&h(2, 7), t(6)), Verdict::OldEpoch);
        assert_eq!(p.accept(&h(1, 103), t(6)), Verdict::NewEpoch, "forgotten");
        assert_eq!(p.stats().epochs, 7);
    }

    #[test]
    fn serial_arithmetic() {
        assert!(seq_after(1, 0));
        assert!(seq_after(0, u32::MAX));
        assert!(!seq_after(5, 5));
        assert!(!seq_after(0, 1));
        assert!(!seq_after(1 << 31, 0), "half-way is not after");
        assert!(seq_after((1 << 31) - 1, 0));
    }

    proptest! {
        /// A stream of one epoch through a lossy, duplicating, reordering network: no sequence number is
        /// applied twice, nothing older than an applied one is applied after it, and every number up to the
        /// highest received was either applied or reported missing.
        #[test]
        fn every_number_is_applied_once_or_reported_missing(
            start in any::<u32>(),
            n in 1u32..200,
            drops in proptest::collection::vec(any::<bool>(), 200),
            dups in proptest::collection::vec(0usize..200, 0..40),
            swaps in proptest::collection::vec((0usize..200, 0usize..200), 0..40),
        ) {
            let mut arrivals: Vec<u32> = (0..n)
                .filter(|&i| i == 0 || !drops[i as usize])
                .map(|i| start.wrapping_add(i))
                .collect();
            for d in dups {
                if let Some(&s) = arrivals.get(d % arrivals.len()) {
                    arrivals.push(s);
                }
            }
            for (a, b) in swaps {
                let len = arrivals.len();
                arrivals.swap(a % len, b % len);
            }
            // the first arrival opens the epoch: count from there
            let first = arrivals[0];
            let mut p = PeerStream::new();
            let (mut applied, mut missing) = (BTreeSet::new(), BTreeSet::new());
            let mut top = first;
            for (i, &s) in arrivals.iter().enumerate() {
                match p.accept(&h(9, s), t(i as u64)) {
                    Verdict::NewEpoch => {
                        prop_assert_eq!(i, 0);
                        applied.insert(s.wrapping_sub(first));
                    }
                    Verdict::Apply { nack } => {
                        prop_assert!(seq_after(s, top));
                        prop_assert!(applied.insert(s.wrapping_sub(first)), "applied twice");
                        if let Some((a, b)) = nack {
                            let mut x = a;
                            loop {
                                missing.insert(x.wrapping_sub(first));
                                if x == b { break; }
                                x = x.wrapping_add(1);
                            }
                        }
                        top = s;
                    }
                    Verdict::Stale => prop_assert!(!seq_after(s, top)),
                    Verdict::OldEpoch => prop_assert!(false, "one epoch"),
                }
            }
            let high = top.wrapping_sub(first);
            for x in 0..=high {
                prop_assert!(applied.contains(&x) ^ missing.contains(&x), "{}", x);
            }
            prop_assert_eq!(p.stats().missed, missing.len() as u64);
        }
    }
}
