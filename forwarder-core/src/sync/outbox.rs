//! What a replica still has to tell its peers, coalesced, and what it told them, for answering a NACK.
//!
//! As pfsync and conntrackd do, a flow is queued at most once however often it changes, and its *current*
//! state is read from the table when a datagram is built (OpenBSD `pfsync_q_ins`, conntrackd's cache
//! objects): a connection opened and closed within one flush interval costs one record. A NACK re-queues
//! the flows the lost datagrams carried, again to be sent as they are by then, under new sequence numbers,
//! so a receiver never applies an old copy over a newer one (see [`super::peer`]); their bulk start and
//! end records go again after those flows, so a bulk end never arrives before the flows it closes.
//!
//! Sent are:
//! * a flow record `hold` after a flow starts ([`Outbox::flow_started`], from the table's flow events; a
//!   short connection has usually finished by then, and costs one record), and again
//!   by the refresh scan ([`Outbox::scan`]) when its TCP state changed since it was last sent, or it has been
//!   refreshed by traffic for `refresh` since (so a peer's copy does not expire while the flow lives);
//! * a delete record when a flow ends ([`Outbox::flow_ended`]).
//!
//! A bulk transfer to a peer sends this replica's flows, then the copies it holds of *that peer's* flows,
//! with the peer as their owner: a peer that restarted, or was taken for dead, gets back the connections this
//! replica carried for it (see [`super::inbox`]). Transfers asked for by two peers run one after the other.
//!
//! Idle flows send nothing: their copies expire by the same timeouts. Deletes go first, then flows in the
//! order they were queued. Memory: a mark of 16 bytes per table slot, plus the queues and the resend ring,
//! both bounded.

use core::time::Duration;
use std::collections::{HashSet, VecDeque};

use super::wire::{flow_flags, DeleteReason, FlowId, FlowRecord, Record, Writer};
use crate::conntrack::{Guard, Table};
use crate::time::Instant;

/// What the refresh scan last sent for a slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mark {
    /// The flow's creation (64 ms ticks, + 1; 0 = nothing sent): a new flow in the same slot differs.
    created: u32,
    /// Its TCP state code when sent.
    state: u8,
    /// Its last packet when sent (ms).
    last_seen: u64,
}

impl Mark {
    fn of(f: &crate::conntrack::Flow) -> Mark {
        Mark {
            created: u32::try_from(f.created().as_millis() >> 6).unwrap_or(u32::MAX - 1) + 1,
            state: f.tcp_tracking().code,
            last_seen: f.last_seen().as_millis(),
        }
    }
}

/// One entry of the resend ring: a record a datagram carried.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Flow(FlowId),
    /// A copy of peer `.0`'s flow, handed back to it by a bulk transfer.
    Returned(u16, FlowId),
    Delete(FlowId, DeleteReason),
    /// A bulk start or end record.
    Bulk(Record),
}

/// Counters of the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Flow records written.
    pub flows: u64,
    /// Delete records written.
    pub deletes: u64,
    /// Queued flows that were gone when their datagram was built (their delete follows).
    pub vanished: u64,
    /// Records queued again for a NACK.
    pub resent: u64,
    /// NACKs for datagrams no longer in the resend ring (the peer needs a bulk transfer).
    pub too_old: u64,
    /// Events dropped because a queue was full: a dropped flow goes out with the refresh scan's next change
    /// or refresh of it; a dropped delete leaves the peers' copy to expire by its timeout.
    pub overflow: u64,
}

/// What an outbox holds: queued flows, deletes, handed-back copies and bulk records to send again, and
/// whether a bulk transfer is under way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Flows queued.
    pub flows: usize,
    /// Deletes queued.
    pub deletes: usize,
    /// Handed-back copies to send again.
    pub returns: usize,
    /// Bulk records to send again.
    pub controls: usize,
    /// A bulk transfer is under way.
    pub bulk: bool,
}

/// The outbox of one replica.
#[derive(Debug)]
pub struct Outbox {
    owner: u16,
    refresh: Duration,
    queued: HashSet<FlowId>,
    /// Flows to send, each with when it may go (queued + hold, in queue order; resends go first, at once).
    flows: VecDeque<(FlowId, Instant)>,
    /// How long a queued flow waits before it is sent (its changes of that time go in one record).
    hold: Duration,
    deletes: VecDeque<(FlowId, DeleteReason)>,
    /// Handed-back copies of lost datagrams (peer, flow), sent again after the queued flows.
    returns: VecDeque<(u16, FlowId)>,
    /// Bulk records of lost datagrams, sent again after the queued flows and handed-back copies.
    controls: VecDeque<Record>,
    limit: usize,
    marks: Vec<Mark>,
    cursor: usize,
    /// Per sequence number (oldest first): where its records start in `records`, and how many.
    ring: VecDeque<(u32, usize)>,
    records: VecDeque<Sent>,
    /// Records dropped from the front of `records` so far (so ring positions stay absolute).
    dropped: usize,
    ring_len: usize,
    bulk: Option<Bulk>,
    /// Bulk transfers asked for while another peer's ran: (peer, id), in order.
    waiting: VecDeque<(u16, u32)>,
    /// Bulk end records written so far (resends included).
    ends: u64,
    stats: OutboxStats,
}

/// A bulk transfer under way.
#[derive(Debug, Clone, Copy)]
struct Bulk {
    peer: u16,
    id: u32,
    /// The next slot to send.
    cursor: usize,
    /// Its start record was written.
    started: bool,
    /// Every slot of the own table was visited: the peer's copies are walked now.
    returning: bool,
    /// Every slot was visited: its end record is next.
    done: bool,
    /// Flow records written.
    sent: u32,
}

impl Bulk {
    /// A transfer to `peer` asked for with `id`, not started.
    fn new(peer: u16, id: u32) -> Bulk {
        Bulk {
            peer,
            id,
            cursor: 0,
            started: false,
            returning: false,
            done: false,
            sent: 0,
        }
    }
}

impl Outbox {
    /// An outbox for the flows of a table of `slots` slots owned by ordinal `owner`; flows refreshed by
    /// traffic are sent again every `refresh`; a flow is sent `hold` after it was queued (a short
    /// connection's handshake and close then go in one record); at most `queue` flows and `queue` deletes
    /// wait; the records of the last `ring` datagrams are kept for NACKs.
    pub fn new(
        owner: u16,
        slots: usize,
        refresh: Duration,
        hold: Duration,
        queue: usize,
        ring: usize,
    ) -> Outbox {
        Outbox {
            owner,
            refresh,
            hold,
            queued: HashSet::new(),
            flows: VecDeque::new(),
            deletes: VecDeque::new(),
            returns: VecDeque::new(),
            controls: VecDeque::new(),
            limit: queue.max(1),
            marks: vec![Mark::default(); slots],
            cursor: 0,
            ring: VecDeque::new(),
            records: VecDeque::new(),
            dropped: 0,
            ring_len: ring.max(1),
            bulk: None,
            waiting: VecDeque::new(),
            ends: 0,
            stats: OutboxStats::default(),
        }
    }

    /// A flow started (or changed and must reach the peers soon), at `now`.
    pub fn flow_started(&mut self, id: FlowId, now: Instant) {
        if self.queued.contains(&id) {
            return;
        }
        if self.flows.len() >= self.limit {
            self.stats.overflow += 1;
            return;
        }
        self.queued.insert(id);
        self.flows.push_back((id, self.after_hold(now)));
    }

    fn after_hold(&self, now: Instant) -> Instant {
        let hold = u64::try_from(self.hold.as_millis()).unwrap_or(u64::MAX);
        Instant::from_millis(now.as_millis().saturating_add(hold))
    }

    /// A flow ended.
    pub fn flow_ended(&mut self, id: FlowId, why: DeleteReason) {
        if self.queued.remove(&id) {
            self.flows.retain(|f| f.0 != id);
        }
        if self.deletes.len() >= self.limit {
            self.stats.overflow += 1;
            return;
        }
        self.deletes.push_back((id, why));
    }

    /// Scans up to `budget` slots of `table` from where the last scan stopped, queueing each live flow whose
    /// TCP state changed, or whose last packet advanced by `refresh` or more, since it was last sent (a flow
    /// not sent yet by the scan counts as sent at its creation, by [`flow_started`](Self::flow_started)).
    /// Returns how many flows it queued.
    pub fn scan(&mut self, table: &Table, budget: usize, now: Instant, guard: &Guard) -> usize {
        let mut queued = 0;
        let refresh = u64::try_from(self.refresh.as_millis()).unwrap_or(u64::MAX);
        let due = self.after_hold(now);
        let next = table.scan_slots(self.cursor, budget, guard, |i, f| {
            let Some(mark) = self.marks.get_mut(i) else {
                return;
            };
            let now_mark = Mark::of(f);
            if mark.created != now_mark.created {
                // not sent since this flow took the slot: count it as sent, at its creation, in the state a
                // flow starts in (SYN sent for TCP), by `flow_started`
                *mark = Mark {
                    state: 0,
                    last_seen: f.created().as_millis(),
                    ..now_mark
                };
            }
            if mark.state != now_mark.state
                || now_mark.last_seen.saturating_sub(mark.last_seen) >= refresh
            {
                *mark = now_mark;
                let id = FlowId::of(f);
                if !self.queued.contains(&id) && self.flows.len() < self.limit {
                    self.queued.insert(id);
                    self.flows.push_back((id, due));
                    queued += 1;
                }
            }
        });
        self.cursor = next;
        queued
    }

    /// When the next record may be sent: now for deletes, bulk records and a bulk transfer, else when the
    /// oldest queued flow has waited out its hold; `None` when nothing waits.
    pub fn due_at(&self) -> Option<Instant> {
        if !self.deletes.is_empty()
            || !self.returns.is_empty()
            || !self.controls.is_empty()
            || self.bulk.is_some()
        {
            return Some(Instant::ZERO);
        }
        self.flows.iter().map(|&(_, due)| due).min()
    }

    /// What waits, for a log line that says why the outbox is not empty.
    pub fn backlog(&self) -> Backlog {
        Backlog {
            flows: self.flows.len(),
            deletes: self.deletes.len(),
            returns: self.returns.len(),
            controls: self.controls.len(),
            bulk: self.bulk.is_some(),
        }
    }

    /// True when no bulk transfer is under way and no lost records wait to go again (handed-back copies,
    /// bulk records): only the live stream of changes, if anything, is queued.
    pub fn transfer_idle(&self) -> bool {
        self.returns.is_empty() && self.controls.is_empty() && self.bulk.is_none()
    }

    /// True when nothing waits (no queued change, no bulk transfer).
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
            && self.deletes.is_empty()
            && self.returns.is_empty()
            && self.controls.is_empty()
            && self.bulk.is_none()
    }

    /// Fills the datagram being written as sequence number `seq`: deletes first, then flows as `table` has
    /// them at `now`, then the bulk transfer under way. `copies(peer)` is the table of a peer's copies (what a
    /// bulk transfer hands back to it). Stops at the first record that does not fit (it stays queued).
    /// Returns the records written.
    pub fn fill<'t>(
        &mut self,
        w: &mut Writer<'_>,
        seq: u32,
        table: &Table,
        copies: impl Fn(u16) -> Option<&'t Table>,
        now: Instant,
        guard: &Guard,
    ) -> usize {
        let start = self.dropped + self.records.len();
        let mut n = 0;
        while let Some(&(id, why)) = self.deletes.front() {
            if w.push(&Record::Delete(id, why)).is_err() {
                break;
            }
            self.deletes.pop_front();
            self.records.push_back(Sent::Delete(id, why));
            self.stats.deletes += 1;
            n += 1;
        }
        let mut full = !self.deletes.is_empty();
        while !full {
            let Some(&(id, due)) = self.flows.front() else {
                break;
            };
            if due > now {
                break;
            }
            let Some(f) = table.lookup_inbound_at(&id.reply_key(), now, guard) else {
                self.flows.pop_front();
                self.queued.remove(&id);
                self.stats.vanished += 1;
                continue;
            };
            let rec = FlowRecord::from_image(&f.image(now), self.owner, 0);
            if w.push(&Record::Flow(rec)).is_err() {
                full = true;
                break;
            }
            // what the peers now have: the refresh scan sends it again only when it changes
            if let Some(mark) = self.marks.get_mut(table.slot_of(f)) {
                *mark = Mark::of(f);
            }
            self.flows.pop_front();
            self.queued.remove(&id);
            self.records.push_back(Sent::Flow(id));
            self.stats.flows += 1;
            n += 1;
        }
        while !full {
            let Some(&(peer, id)) = self.returns.front() else {
                break;
            };
            let found = copies(peer).and_then(|c| c.lookup_inbound_at(&id.reply_key(), now, guard));
            if let Some(f) = found {
                let rec = FlowRecord::from_image(&f.image(now), peer, flow_flags::BULK);
                if w.push(&Record::Flow(rec)).is_err() {
                    full = true;
                    break;
                }
                self.records.push_back(Sent::Returned(peer, id));
                self.stats.flows += 1;
                n += 1;
            } else {
                self.stats.vanished += 1;
            }
            self.returns.pop_front();
        }
        while !full {
            let Some(&r) = self.controls.front() else {
                break;
            };
            if w.push(&r).is_err() {
                full = true;
                break;
            }
            self.controls.pop_front();
            self.records.push_back(Sent::Bulk(r));
            if matches!(r, Record::BulkEnd { .. }) {
                self.ends += 1;
            }
            n += 1;
        }
        if !full && self.controls.is_empty() {
            n += self.fill_bulk(w, table, &copies, now, guard);
        }
        if n > 0 {
            self.ring.push_back((seq, start));
            while self.ring.len() > self.ring_len {
                self.ring.pop_front();
                let keep_from = self.ring.front().map_or(start + n, |&(_, s)| s);
                while self.dropped < keep_from && self.records.pop_front().is_some() {
                    self.dropped += 1;
                }
            }
        }
        n
    }

    /// Peer `peer` asked for all flows (it started, or lost too much): after what is queued, every live flow
    /// — and every copy held of the peer's own flows, handed back — is sent between a bulk start and a bulk
    /// end record carrying `id`, walking the tables as they are while the transfer runs. The peer's transfer
    /// under way starts over with the new id; another peer's goes on, and this one waits for its end.
    pub fn start_bulk(&mut self, peer: u16, id: u32) {
        if self.bulk.is_some_and(|b| b.peer != peer) {
            match self.waiting.iter_mut().find(|w| w.0 == peer) {
                Some(w) => w.1 = id,
                None => self.waiting.push_back((peer, id)),
            }
            return;
        }
        self.bulk = Some(Bulk::new(peer, id));
    }

    /// Bulk end records written so far, resends included (a heartbeat follows them: `Replica`).
    pub fn ends_written(&self) -> u64 {
        self.ends
    }

    /// True while a bulk transfer is under way.
    pub fn bulk_active(&self) -> bool {
        self.bulk.is_some()
    }

    /// The bulk transfer's part of a datagram: its start record, then flows from its cursor, then its end.
    fn fill_bulk<'t>(
        &mut self,
        w: &mut Writer<'_>,
        table: &Table,
        copies: &impl Fn(u16) -> Option<&'t Table>,
        now: Instant,
        guard: &Guard,
    ) -> usize {
        let mut n = 0;
        let owner = self.owner;
        while let Some(b) = self.bulk.as_mut() {
            let theirs = copies(b.peer);
            if !b.started {
                let count = table.len() + theirs.map_or(0, Table::len);
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                let r = Record::BulkStart {
                    peer: b.peer,
                    id: b.id,
                    count,
                };
                if w.push(&r).is_err() {
                    break;
                }
                self.records.push_back(Sent::Bulk(r));
                b.started = true;
                n += 1;
                continue;
            }
            if b.done {
                let r = Record::BulkEnd {
                    peer: b.peer,
                    id: b.id,
                    count: b.sent,
                };
                if w.push(&r).is_ok() {
                    self.records.push_back(Sent::Bulk(r));
                    self.ends += 1;
                    self.bulk = self
                        .waiting
                        .pop_front()
                        .map(|(peer, id)| Bulk::new(peer, id));
                    n += 1;
                    continue;
                }
                break;
            }
            // this replica's flows, then the peer's own flows it holds copies of, handed back
            let (walked, owner) = match (b.returning, theirs) {
                (false, _) => (table, owner),
                (true, Some(c)) => (c, b.peer),
                (true, None) => {
                    b.done = true;
                    continue;
                }
            };
            let (mut full, mut sent) = (false, None);
            let next = walked.scan_slots(b.cursor, 1, guard, |_, f| {
                let rec = FlowRecord::from_image(&f.image(now), owner, flow_flags::BULK);
                if w.push(&Record::Flow(rec)).is_ok() {
                    sent = Some(rec.id);
                } else {
                    full = true;
                }
            });
            if full {
                break;
            }
            if let Some(id) = sent {
                b.sent += 1;
                self.records.push_back(if b.returning {
                    Sent::Returned(b.peer, id)
                } else {
                    Sent::Flow(id)
                });
                self.stats.flows += 1;
                n += 1;
            }
            if next != 0 {
                b.cursor = next;
            } else if b.returning {
                b.done = true;
            } else {
                b.returning = true;
                b.cursor = 0;
            }
        }
        n
    }

    /// A peer missed the datagrams `from..=to`: their records are queued again (flows to be sent as they
    /// are now). False when some of them are no longer in the resend ring, or would not fit in the queues
    /// (at most `queue` handed-back copies and bulk records wait): the peer then needs a bulk transfer.
    pub fn nack(&mut self, from: u32, to: u32) -> bool {
        let end = self.dropped + self.records.len();
        let mut complete = self
            .ring
            .front()
            .is_some_and(|&(oldest, _)| !super::peer::seq_after(oldest, from));
        if !complete {
            self.stats.too_old += 1;
        }
        let mut again = Vec::new();
        for (i, &(seq, start)) in self.ring.iter().enumerate() {
            let in_range = !super::peer::seq_after(from, seq) && !super::peer::seq_after(seq, to);
            if !in_range {
                continue;
            }
            let stop = self.ring.get(i + 1).map_or(end, |&(_, s)| s);
            for at in start..stop {
                if let Some(&r) = self.records.get(at - self.dropped) {
                    again.push(r);
                } else {
                    complete = false;
                }
            }
        }
        for r in again {
            self.stats.resent += 1;
            match r {
                Sent::Flow(id) => {
                    // sent again at once, ahead of the flows still waiting out their hold
                    if self.queued.insert(id) {
                        self.flows.push_front((id, Instant::ZERO));
                    }
                }
                // A peer that NACKs the same range again and again (a bug, or a forger without a key)
                // must not grow the queues without bound: past `limit`, the rest is left to a bulk
                // transfer.
                Sent::Returned(..) | Sent::Bulk(_)
                    if self.returns.len() + self.controls.len() >= self.limit =>
                {
                    self.stats.overflow += 1;
                    complete = false;
                }
                Sent::Returned(peer, id) => self.returns.push_back((peer, id)),
                Sent::Delete(id, why) => self.flow_ended(id, why),
                Sent::Bulk(r) => self.controls.push_back(r),
            }
        }
        complete
    }

    /// The counters.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
