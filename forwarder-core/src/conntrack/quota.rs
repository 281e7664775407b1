//! The per-source flow quota: how many flows one pod address holds, counted in a count-min sketch.
//!
//! A flow holds one unit of its source's quota from its insert until it finishes or is removed. A TCP flow
//! that *finishes* (reset, or a FIN each way: `tcp_finished`) gives its unit back at once, although the
//! entry stays for the transitory timeout; if a new SYN on the same tuple opens it again, it takes a unit
//! again (unconditionally: it reuses the slot and port it already holds). This is what Linux's connection
//! limit does: `nf_conncount` stops counting a TCP conntrack entry once it is in `CLOSE` or `TIME_WAIT`
//! (`already_closed()` in net/netfilter/nf_conncount.c). So a pod that opens and closes short connections
//! quickly is bounded by the connections it has open, not by how many it closed in the last 240 s, and its
//! closed connections never keep it from opening a UDP flow. (The port a finished connection keeps is the
//! pool's business: a new connection takes it over when the pool is exhausted, `Table::take_over`.)
//!
//! The transitions happen in `Flow::on_outbound` / `Flow::on_inbound` (through the table's context) and in
//! the table's removal; each is decided by a CAS on the flow's control word, so exactly one thread accounts
//! each one, and a flow that is no longer live changes no state (see `flow.rs`).

use std::sync::atomic::{AtomicU32, Ordering};

use super::key::{Addr, HashKey, Packed};

/// Count-min sketch of the flows each source address holds: two counters per source; a source is over its
/// quota only if both of its counters are, so sources that share both counters (probability about
/// (sources / counters)²) share a quota.
#[derive(Debug)]
pub(crate) struct Quota {
    cells: Box<[AtomicU32]>,
    key: HashKey,
    max: u32,
}

impl Quota {
    /// `counters` (a power of two, at least 2) cells keyed by `key`, each source allowed `max` flows.
    pub(crate) fn new(counters: usize, key: HashKey, max: u32) -> Quota {
        debug_assert!(counters.is_power_of_two() && counters >= 2);
        Quota {
            cells: (0..counters).map(|_| AtomicU32::new(0)).collect(),
            key,
            max,
        }
    }

    /// Bytes of counters (for the table's memory estimate).
    pub(crate) fn bytes(&self) -> usize {
        4 * self.cells.len()
    }

    fn cells(&self, src: &Addr) -> (&AtomicU32, &AtomicU32) {
        let h = Packed {
            src: *src,
            dst: [0, 0],
            sport: 0,
            dport: 0,
            tag: 0xF0,
        }
        .hash(&self.key);
        let mask = self.cells.len() - 1;
        #[allow(clippy::cast_possible_truncation)] // masked
        let (a, mut b) = (h as usize & mask, (h >> 32) as usize & mask);
        if a == b {
            b ^= 1;
        }
        (&self.cells[a], &self.cells[b])
    }

    /// Starts fetching the counters of `src` (for a batch of inserts).
    pub(crate) fn prefetch(&self, src: &Addr) {
        let (a, b) = self.cells(src);
        super::prefetch((a as *const AtomicU32).cast());
        super::prefetch((b as *const AtomicU32).cast());
    }

    /// Takes a unit for a new flow of `src`; false (and nothing taken) when `src` holds its quota.
    pub(crate) fn acquire(&self, src: &Addr) -> bool {
        let (a, b) = self.cells(src);
        let x = a.fetch_add(1, Ordering::Relaxed);
        let y = b.fetch_add(1, Ordering::Relaxed);
        if x.min(y) >= self.max {
            a.fetch_sub(1, Ordering::Relaxed);
            b.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Takes a unit whatever the count: a finished flow opened again keeps the slot and port it has.
    pub(crate) fn reacquire(&self, src: &Addr) {
        let (a, b) = self.cells(src);
        a.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(1, Ordering::Relaxed);
    }

    /// True when [`acquire`](Self::acquire) would refuse `src` now.
    pub(crate) fn full(&self, src: &Addr) -> bool {
        let (a, b) = self.cells(src);
        a.load(Ordering::Relaxed).min(b.load(Ordering::Relaxed)) >= self.max
    }

    /// Gives a unit of `src` back.
    pub(crate) fn release(&self, src: &Addr) {
        let (a, b) = self.cells(src);
        a.fetch_sub(1, Ordering::Relaxed);
        b.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sum of all counters (twice the units held): zero when no flow holds a unit.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.cells
            .iter()
            .map(|c| u64::from(c.load(Ordering::Relaxed)))
            .sum()
    }
}
