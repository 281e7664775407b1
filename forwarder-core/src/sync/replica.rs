//! One replica's side of state sync, without I/O: the binary feeds it the datagrams that arrive and the
//! table's flow events, asks it what to send and when to call again, and moves the bytes (the way
//! quinn-proto drives QUIC for quinn's sockets).
//!
//! Timing, by default (conntrackd and pfsync batch the same way, with coarser clocks):
//! * a change waits at most `flush` (5 ms) for others to share its datagram; a full datagram goes at once;
//! * a datagram goes out at least every `heartbeat` (100 ms) — a heartbeat when nothing else is due — so
//!   a peer learns of a lost tail (the next sequence number shows the gap) and that this replica lives;
//! * a Hello (this replica's state and whom it serves) goes out at least every `heartbeat` and at once when
//!   what it says changes, on a datagram of changes when there are always changes to send: a replica busy
//!   with new flows must still tell a draining peer that it serves it;
//! * a gap is NACKed at once and again every `nack_retry` (25 ms) until the peer answers that it queued
//!   the lost records again (a lost NACK or a lost answer costs a retry, not the records); more than 64
//!   gaps at once, and the peer is asked for a bulk transfer instead;
//! * a peer silent for `dead_after` (300 ms) is reported [`PeerPhase::Silent`]; what to do about it (adopt
//!   its egress IPs) is decided above this module, with the node agents' view;
//! * a peer heard for the first time, or again after a restart (a new epoch), is asked for a bulk transfer,
//!   again every `bulk_retry` (500 ms) until its start arrives (a transfer under way is not restarted),
//!   and is [`PeerPhase::Syncing`] until its end arrives.

use core::net::IpAddr;
use core::time::Duration;

use super::inbox::{apply, Applied, Tables};
use super::outbox::{Backlog, Outbox, OutboxStats};
use super::peer::{PeerStream, StreamStats, Verdict};
use super::wire::{
    self, Datagram, DeleteReason, FlowId, FlowRecord, Header, Hello, PeerState, Record, Writer,
};
use crate::conntrack::{Guard, Table};
use crate::flow::UplinkId;
use crate::time::Instant;

/// How a replica syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// The gateway set: datagrams of another set are refused.
    pub set_id: u32,
    /// This replica's ordinal.
    pub ordinal: u16,
    /// This incarnation: random at process start.
    pub epoch: u64,
    /// Wall clock at process start, ms since the Unix epoch (heartbeats carry it).
    pub started_ms: u64,
    /// Longest a change waits for company.
    pub flush: Duration,
    /// Longest silence of this replica.
    pub heartbeat: Duration,
    /// Silence after which a peer is reported silent.
    pub dead_after: Duration,
    /// A flow refreshed by traffic is sent again after this (its copies must not expire).
    pub refresh: Duration,
    /// A bulk request unanswered this long is sent again.
    pub bulk_retry: Duration,
    /// A NACK not answered as repaired this long is sent again.
    pub nack_retry: Duration,
    /// Bytes of a datagram, MAC included (below the path MTU less IP and UDP headers).
    pub datagram: usize,
    /// Whether datagrams carry a MAC (the caller computes and checks it).
    pub mac: bool,
    /// Table slots the refresh scan visits per flush.
    pub scan_budget: usize,
    /// Flows (and deletes) that may wait; more are dropped and counted (the refresh scan catches up).
    pub queue: usize,
    /// Datagrams remembered for NACKs.
    pub ring: usize,
}

impl Settings {
    /// The defaults above for replica `ordinal` of set `set_id`, incarnation `epoch`.
    pub fn new(set_id: u32, ordinal: u16, epoch: u64, started_ms: u64) -> Settings {
        Settings {
            set_id,
            ordinal,
            epoch,
            started_ms,
            flush: Duration::from_millis(5),
            heartbeat: Duration::from_millis(100),
            dead_after: Duration::from_millis(300),
            refresh: Duration::from_secs(10),
            bulk_retry: Duration::from_millis(500),
            nack_retry: Duration::from_millis(25),
            datagram: 1400,
            mac: false,
            scan_budget: 4096,
            queue: 65_536,
            ring: 4096,
        }
    }
}

/// Where a peer stands, as this replica sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPhase {
    /// Never heard.
    Unknown,
    /// Heard; its bulk transfer to us has not ended yet.
    Syncing,
    /// Its flows are all here (its bulk transfer ended, and no datagram of its stream is missing), and it
    /// is heard.
    InSync,
    /// Not heard for `dead_after`.
    Silent,
}

/// Why a datagram was refused before any of it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveError {
    /// Not a valid datagram.
    Wire(wire::Error),
    /// From another gateway set.
    OtherSet,
    /// The header's ordinal is not the peer the caller says sent it, or not a peer at all.
    WrongSender,
}

impl ReceiveError {
    /// The label of the drop counter.
    pub const fn label(self) -> &'static str {
        match self {
            ReceiveError::Wire(e) => e.label(),
            ReceiveError::OtherSet => "other_set",
            ReceiveError::WrongSender => "wrong_sender",
        }
    }
}

#[derive(Debug)]
struct Peer {
    ordinal: u16,
    stream: PeerStream,
    /// The bulk transfer asked for (id, when, whether its start arrived) and not ended yet.
    asked: Option<(u32, Instant, bool)>,
    /// Its bulk end arrived; in sync once a heartbeat shows that nothing before it is missing.
    ended: bool,
    /// Its bulk transfer ended and every datagram of it is here (for its current epoch).
    synced: bool,
    /// Gaps of its stream, NACKed until it says they are repaired: (from, to, when last NACKed).
    gaps: Vec<(u32, u32, Option<Instant>)>,
    /// A bulk request to send it.
    request: Option<u32>,
    hello: Option<Hello>,
}

impl Peer {
    /// Asks the peer for a bulk transfer with `id` (the request goes with the next datagram).
    fn ask_bulk(&mut self, id: u32, now: Instant) {
        self.asked = Some((id, now, false));
        self.request = Some(id);
    }
}

/// Bit `ordinal` of a served mask (0 for ordinals beyond 63).
fn bit(ordinal: u16) -> u64 {
    1u64.checked_shl(u32::from(ordinal)).unwrap_or(0)
}

/// The next bulk request id.
fn take_id(next: &mut u32) -> u32 {
    let id = *next;
    *next = next.wrapping_add(1);
    id
}

/// Counters of a replica's sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Datagrams built.
    pub sent: u64,
    /// Heartbeat-only datagrams among them.
    pub heartbeats: u64,
    /// Datagrams applied (new epoch or in sequence).
    pub received: u64,
    /// Flow records installed into copies.
    pub installed: u64,
    /// Flows removed from copies by delete records.
    pub removed: u64,
    /// Flows of this replica handed back by a peer's bulk transfer, installed into the own table.
    pub returned: u64,
    /// Flows of this replica handed back that it could not take, deleted at the peers.
    pub disowned: u64,
    /// Records refused.
    pub refused: u64,
    /// Bulk transfers asked for.
    pub bulk_requests: u64,
    /// Bulk transfers served.
    pub bulk_served: u64,
    /// Ends of finished TCP connections not sent (the copies expire by themselves).
    pub deletes_skipped: u64,
}

/// One replica's state sync.
#[derive(Debug)]
pub struct Replica {
    s: Settings,
    outbox: Outbox,
    peers: Vec<Peer>,
    seq: u32,
    last_sent: Option<Instant>,
    next_bulk_id: u32,
    /// Answers to peers' NACKs to send: (peer, from, to).
    repairs: Vec<(u16, u32, u32)>,
    stats: ReplicaStats,
    /// Ordinals of dead peers this replica serves now (bit `i` = ordinal `i`), for its heartbeats.
    served: u64,
    /// A heartbeat is due as soon as nothing else is: a bulk end or repairs went out (see `receive`).
    close: bool,
    /// What its heartbeats say of it.
    state: PeerState,
    /// When the last Hello went out, and what it said of this replica (state, served).
    last_hello: Option<(Instant, PeerState, u64)>,
}

/// Gaps of one peer's stream asked for at once; more, and a bulk transfer is cheaper.
const MAX_GAPS: usize = 64;

impl Replica {
    /// A replica with settings `s`, whose own table has `slots` slots, among `peers` (ordinals; its own is
    /// ignored).
    pub fn new(s: Settings, slots: usize, peers: &[u16]) -> Replica {
        Replica {
            outbox: Outbox::new(s.ordinal, slots, s.refresh, s.flush, s.queue, s.ring),
            peers: peers
                .iter()
                .filter(|&&p| p != s.ordinal)
                .map(|&ordinal| Peer {
                    ordinal,
                    stream: PeerStream::new(),
                    asked: None,
                    ended: false,
                    synced: false,
                    gaps: Vec::new(),
                    request: None,
                    hello: None,
                })
                .collect(),
            seq: 1,
            last_sent: None,
            next_bulk_id: 1,
            repairs: Vec::new(),
            stats: ReplicaStats::default(),
            served: 0,
            close: false,
            state: PeerState::Starting,
            last_hello: None,
            s,
        }
    }

    /// A flow of the own table started (from its flow events).
    pub fn flow_started(&mut self, id: FlowId, now: Instant) {
        self.outbox.flow_started(id, now);
    }

    /// A flow of the own table ended. A finished TCP connection (reset, or a FIN each way) that expired
    /// costs no record: the peers' copies are finished too (the refresh scan sent the change) and expire by
    /// the same transitory timeout.
    pub fn flow_ended(&mut self, id: FlowId, why: DeleteReason, tcp_finished: bool) {
        if why == DeleteReason::Expired && tcp_finished {
            self.stats.deletes_skipped += 1;
            return;
        }
        self.outbox.flow_ended(id, why);
    }

    /// Applies a datagram that peer `from` sent (the caller checked its source address and, with a key, its
    /// MAC) to `tables`: the table of that peer's copies, and the own table for the flows it hands back
    /// (those this replica cannot take are deleted at the peers in turn). `uplink` and `accept` as for
    /// [`apply`].
    #[allow(clippy::too_many_arguments)] // the peer's context, each a separate concern of the caller
    pub fn receive(
        &mut self,
        from: u16,
        bytes: &[u8],
        tables: Tables<'_>,
        uplink: impl Fn(u16, IpAddr) -> Option<UplinkId>,
        accept: impl Fn(&FlowRecord) -> bool,
        now: Instant,
        guard: &Guard,
    ) -> Result<Applied, ReceiveError> {
        let dg = Datagram::new_checked(bytes).map_err(ReceiveError::Wire)?;
        let h = dg.header();
        if h.set_id != self.s.set_id {
            return Err(ReceiveError::OtherSet);
        }
        let me = self.s.ordinal;
        let Some(peer) = self.peers.iter_mut().find(|p| p.ordinal == from) else {
            return Err(ReceiveError::WrongSender);
        };
        if h.ordinal != from {
            return Err(ReceiveError::WrongSender);
        }
        let out = apply(
            &dg,
            me,
            from,
            &mut peer.stream,
            tables,
            uplink,
            accept,
            now,
            guard,
        );
        match out.verdict {
            Verdict::NewEpoch => {
                // a new incarnation (or first contact): what it had before is unknown until its bulk ends
                peer.synced = false;
                peer.ended = false;
                // and what its previous incarnation said of itself (ready, serving) no longer holds
                peer.hello = None;
                peer.gaps.clear();
                peer.ask_bulk(take_id(&mut self.next_bulk_id), now);
                self.stats.bulk_requests += 1;
            }
            Verdict::Apply { nack: Some((a, b)) } if peer.gaps.len() < MAX_GAPS => {
                peer.gaps.push((a, b, None));
            }
            Verdict::Apply { nack: Some(_) } => {
                // too much lost to ask for piece by piece: take everything again
                peer.gaps.clear();
                peer.ask_bulk(take_id(&mut self.next_bulk_id), now);
                self.stats.bulk_requests += 1;
            }
            Verdict::Apply { nack: None } | Verdict::Stale | Verdict::OldEpoch => {}
        }
        if matches!(out.verdict, Verdict::NewEpoch | Verdict::Apply { .. }) {
            self.stats.received += 1;
        }
        if let (Some((id, _)), Some((asked, at, _))) = (out.bulk_start, peer.asked) {
            if id == asked {
                // under way: a long transfer is not asked for again while the peer is heard
                peer.asked = Some((asked, at, true));
            }
        }
        if let (Some((id, _)), Some((asked, ..))) = (out.bulk_end, peer.asked) {
            if id == asked {
                peer.asked = None;
                peer.ended = true;
            }
        }
        if out.hello.is_some() {
            peer.hello = out.hello;
        }
        peer.gaps
            .retain(|&(a, b, _)| !out.repaired.contains(&(a, b)));
        // The bulk end may overtake lost datagrams of the transfer, and a lost last datagram shows only with
        // the next one. A sender follows its bulk end and its repairs with a heartbeat once all they carry
        // went out: that heartbeat, with no datagram missing before it, closes the transfer.
        if peer.ended && peer.gaps.is_empty() && out.hello.is_some() {
            peer.ended = false;
            peer.synced = true;
        }
        self.stats.installed += u64::from(out.installed);
        self.stats.removed += u64::from(out.removed);
        self.stats.refused += u64::from(out.refused);
        self.stats.returned += u64::from(out.returned);
        for &id in &out.disowned {
            self.stats.disowned += 1;
            self.outbox.flow_ended(id, DeleteReason::Flushed);
        }
        for &(a, b) in &out.nacks {
            if !self.outbox.nack(a, b) {
                // gone from the ring: only a bulk transfer can repair that peer
                self.outbox.start_bulk(from, 0);
                self.stats.bulk_served += 1;
            }
            self.repairs.push((from, a, b));
        }
        if let Some(id) = out.bulk_request {
            self.outbox.start_bulk(from, id);
            self.stats.bulk_served += 1;
        }
        Ok(out)
    }

    /// Housekeeping at `now`: the refresh scan of `own` (a slice of it per call) and bulk requests that went
    /// unanswered. Call it whenever [`poll_timeout`](Self::poll_timeout) says.
    pub fn tick(&mut self, own: &Table, now: Instant, guard: &Guard) {
        self.outbox.scan(own, self.s.scan_budget, now, guard);
        for p in &mut self.peers {
            if let Some((_, at, started)) = p.asked {
                let silent = p
                    .stream
                    .silent_for(now)
                    .is_none_or(|d| d >= self.s.dead_after);
                // a transfer under way is asked for again only if the peer went silent meanwhile
                let lost = !started || silent;
                if now.saturating_since(at) >= self.s.bulk_retry && lost && !silent {
                    p.ask_bulk(take_id(&mut self.next_bulk_id), now);
                    self.stats.bulk_requests += 1;
                }
            }
        }
    }

    /// Builds the next datagram into `buf` (at least `datagram` bytes) if one is due at `now`: returns its
    /// length. Control records first (NACKs and bulk requests for peers), then the outbox; a heartbeat when
    /// nothing else is due and the replica has been quiet for `heartbeat`. The acknowledgement fields are
    /// set per addressee with [`stamp`](Self::stamp), the MAC (when `mac`) after that by the caller.
    /// `copies(peer)` is the table of a peer's copies: a bulk transfer to that peer hands them back.
    pub fn poll_transmit<'t>(
        &mut self,
        own: &Table,
        copies: impl Fn(u16) -> Option<&'t Table>,
        now: Instant,
        guard: &Guard,
        buf: &mut [u8],
    ) -> Option<usize> {
        let retry = self.s.nack_retry;
        let due =
            move |sent: Option<Instant>| sent.is_none_or(|t| now.saturating_since(t) >= retry);
        let controls = !self.repairs.is_empty()
            || self
                .peers
                .iter()
                .any(|p| p.request.is_some() || p.gaps.iter().any(|g| due(g.2)));
        let changes = self.outbox.due_at().is_some_and(|t| t <= now);
        let hello_due = self.hello_due(now);
        let heartbeat = self.close
            || self
                .last_sent
                .is_none_or(|t| now.saturating_since(t) >= self.s.heartbeat);
        if !controls && !changes && !heartbeat && !hello_due {
            return None;
        }
        let size = self.s.datagram.min(buf.len());
        let header = Header {
            set_id: self.s.set_id,
            ordinal: self.s.ordinal,
            mac: self.s.mac,
            key_id: u8::from(self.s.mac),
            epoch: self.s.epoch,
            seq: self.seq,
            ack: 0,
            acked_epoch: 0,
            sent_ms: u32::try_from(now.as_millis() & u64::from(u32::MAX)).unwrap_or(0),
        };
        let mut w = Writer::new(&mut buf[..size], &header).ok()?;
        let mut n = 0;
        let ends = self.outbox.ends_written();
        while let Some(&(peer, from, to)) = self.repairs.first() {
            if w.push(&Record::Repaired { peer, from, to }).is_err() {
                break;
            }
            self.repairs.remove(0);
            self.close = true;
            n += 1;
        }
        for p in &mut self.peers {
            for g in p.gaps.iter_mut().filter(|g| due(g.2)) {
                let r = Record::Nack {
                    peer: p.ordinal,
                    from: g.0,
                    to: g.1,
                };
                if w.push(&r).is_err() {
                    break;
                }
                g.2 = Some(now);
                n += 1;
            }
            if let Some(id) = p.request {
                let r = Record::BulkRequest {
                    peer: p.ordinal,
                    id,
                };
                if w.push(&r).is_ok() {
                    p.request = None;
                    n += 1;
                }
            }
        }
        if controls || changes || !self.outbox.is_empty() {
            n += self.outbox.fill(&mut w, self.seq, own, copies, now, guard);
            self.close |= self.outbox.ends_written() != ends;
        }
        if n == 0 {
            if !heartbeat && !hello_due {
                return None;
            }
            w.push(&Record::Hello(self.hello(own))).ok()?;
            self.stats.heartbeats += 1;
            self.close = false;
            self.last_hello = Some((now, self.state, self.served));
        } else if hello_due && !self.close && self.outbox.transfer_idle() {
            // A replica that always has records to send would otherwise never send its Hello, and its peers
            // would not learn that it drains or serves them (a drain could not end). Not while a transfer
            // or a repair closes: there the Hello marks that everything before it went out.
            if w.push(&Record::Hello(self.hello(own))).is_ok() {
                self.stats.heartbeats += 1;
                self.last_hello = Some((now, self.state, self.served));
            }
        }
        let len = w.finish();
        self.seq = self.seq.wrapping_add(1);
        self.last_sent = Some(now);
        self.stats.sent += 1;
        Some(len)
    }

    /// Sets the acknowledgement fields of the datagram in `buf` for peer `peer`: the highest of its
    /// sequence numbers applied here, in its epoch.
    pub fn stamp(&self, peer: u16, buf: &mut [u8]) {
        let Some(p) = self.peers.iter().find(|p| p.ordinal == peer) else {
            return;
        };
        if let Ok(mut dg) = Datagram::new_checked(buf) {
            let (ack, epoch) = p.stream.ack();
            dg.set_ack(ack, epoch);
        }
    }

    /// When to call [`poll_transmit`](Self::poll_transmit) and [`tick`](Self::tick) next, at the latest.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let at = |t: Option<Instant>, d: Duration| {
            t.map_or(now, |t| {
                Instant::from_millis(
                    t.as_millis() + u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                )
            })
        };
        let mut next = at(self.last_sent, self.s.heartbeat);
        if let Some(t) = self.outbox.due_at() {
            next = next.min(t.max(now));
        }
        if self.close || !self.repairs.is_empty() || self.peers.iter().any(|p| p.request.is_some())
        {
            next = now;
        }
        if self.hello_changed() {
            next = now;
        }
        for g in self.peers.iter().flat_map(|p| &p.gaps) {
            next = next.min(at(g.2, self.s.nack_retry));
        }
        next
    }

    /// Where peer `ordinal` stands at `now`.
    pub fn peer_phase(&self, ordinal: u16, now: Instant) -> Option<PeerPhase> {
        let p = self.peers.iter().find(|p| p.ordinal == ordinal)?;
        Some(match p.stream.silent_for(now) {
            None => PeerPhase::Unknown,
            Some(d) if d >= self.s.dead_after => PeerPhase::Silent,
            Some(_) if p.synced => PeerPhase::InSync,
            Some(_) => PeerPhase::Syncing,
        })
    }

    /// The last heartbeat peer `ordinal` sent.
    pub fn peer_hello(&self, ordinal: u16) -> Option<Hello> {
        self.peers.iter().find(|p| p.ordinal == ordinal)?.hello
    }

    /// The stream counters of peer `ordinal`.
    pub fn peer_stats(&self, ordinal: u16) -> Option<StreamStats> {
        Some(
            self.peers
                .iter()
                .find(|p| p.ordinal == ordinal)?
                .stream
                .stats(),
        )
    }

    /// Says in this replica's heartbeats where it stands (what a peer serving its addresses waits for before
    /// it gives them back: [`PeerState::Ready`]); [`PeerState::Starting`] until called.
    pub fn set_state(&mut self, state: PeerState) {
        self.state = state;
    }

    /// Says in this replica's heartbeats that it serves the dead peers `ordinals` now (besides itself), so
    /// that a peer taken over by mistake — alive but cut off — learns it when it hears this replica again.
    pub fn set_served(&mut self, ordinals: impl IntoIterator<Item = u16>) {
        self.served = ordinals.into_iter().fold(0, |m, o| m | bit(o));
    }

    /// Whether peer `ordinal`'s last heartbeat says it serves replica `served` (not itself).
    pub fn peer_serves(&self, ordinal: u16, served: u16) -> bool {
        ordinal != served
            && self
                .peer_hello(ordinal)
                .is_some_and(|h| h.served & bit(served) != 0)
    }

    /// True when nothing waits to be told to the peers (no queued change, no bulk transfer, no repair).
    pub fn outbox_idle(&self) -> bool {
        self.outbox.is_empty() && self.repairs.is_empty()
    }

    /// What the outbox holds, and the repairs (NACKs) still to send.
    pub fn backlog(&self) -> (Backlog, usize) {
        (self.outbox.backlog(), self.repairs.len())
    }

    /// This replica's counters.
    pub fn stats(&self) -> ReplicaStats {
        self.stats
    }

    /// The outbox's counters.
    pub fn outbox_stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// A Hello is due: none for `heartbeat`, or what it says of this replica changed since the last one.
    fn hello_due(&self, now: Instant) -> bool {
        self.hello_changed()
            || self
                .last_hello
                .is_none_or(|(at, ..)| now.saturating_since(at) >= self.s.heartbeat)
    }

    /// What a Hello says of this replica (state, whom it serves) changed since the last one went out.
    fn hello_changed(&self) -> bool {
        self.last_hello
            .is_some_and(|(_, state, served)| state != self.state || served != self.served)
    }

    fn hello(&self, own: &Table) -> Hello {
        Hello {
            state: self.state,
            served: self.served | bit(self.s.ordinal),
            flows: u32::try_from(own.len()).unwrap_or(u32::MAX),
            passive: 0,
            started_ms: self.s.started_ms,
            features: 0,
        }
    }
}

#[cfg(test)]
mod tests;
