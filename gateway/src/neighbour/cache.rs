//! The neighbour cache of the uplinks: what a received claim may change, the probes that keep entries fresh,
//! and the bounds.
//!
//! Rules (a claim is what [`super::handle`] read from a frame):
//! * An entry is created only by a need of ours ([`Neighbours::want`]: a packet, or a configured next hop) or
//!   by an ARP request / Neighbor Solicitation for one of our addresses (RFC 826 "Packet Reception": the
//!   sender is about to talk to us; RFC 4861 §7.2.3). Replies, gratuitous ARP and advertisements never create
//!   one (RFC 4861 §7.2.5: "If no entry exists, the advertisement SHOULD be silently discarded").
//! * An incomplete entry takes a MAC only from an answer to our own request: an ARP reply to our address and
//!   MAC, or a solicited Neighbor Advertisement to our address, within [`ANSWER_WINDOW`] of the request.
//! * A claim that a known address has a *different* MAC never takes effect at once, whatever the frame
//!   (reply, gratuitous ARP, request for us, NA with Override): it moves the entry to PROBE (RFC 4861 §7.3.3,
//!   STALE → PROBE) — unicast probes to the MAC we have. If that MAC answers, the claim is refused
//!   (RFC 5227 §2.4 defends an address the same way) — and so is it when any frame of the known MAC for
//!   that address arrives while the change is pending, even an answer that came late or a request of its own:
//!   under a flood, answers queue behind it, and a forged frame with the known MAC can only keep what we
//!   have. If the known MAC stays silent for [`PROBES`] probes, broadcast requests follow, and a new MAC is
//!   taken only when it is the *only* one that answered during the [`ANSWER_WINDOW`] after a request; when
//!   two or more MACs answer (a host answering for the router as well as the router), the change is refused
//!   as contested and the entry goes back to probing the known MAC. The old MAC is used meanwhile.
//! * Entries are re-probed (unicast) after [`REACHABLE`], the configured next hops after
//!   [`NEXT_HOP_REACHABLE`]; one whose MAC and then broadcast requests go
//!   unanswered is forgotten.
//! * Per uplink at most [`CAPACITY`] learnt entries, of which at most [`PASSIVE_CAPACITY`] created by requests
//!   for us and not yet needed; when full, new ones are refused (counted), nothing is evicted. The configured
//!   next hops ([`Neighbours::set_pinned`]) do not count and are never refused.
//!
//! Locking: one mutex per uplink, taken for neighbour frames, cache misses and housekeeping — never for a
//! data packet whose next hop is known. Workers read resolved MACs from the uplink's [`Table`] without a lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use forwarder_core::flow::UplinkId;
use forwarder_core::wire::ethernet::MacAddr;

use super::table::{Table, SLOTS};
use super::{Claim, ClaimKind, CAPACITY, NEXT_HOP_REACHABLE, PROBES, REACHABLE, RETRANS};

/// How long after a request of ours an answer is believed.
pub(crate) const ANSWER_WINDOW: Duration = RETRANS;
/// Most entries per uplink created by requests for us and not (yet) needed by a packet.
pub(crate) const PASSIVE_CAPACITY: usize = CAPACITY / 4;
/// Most configured next hops per uplink.
const MAX_PINNED: usize = 8;
const _: () = assert!(2 * (CAPACITY + MAX_PINNED) <= SLOTS);

/// What a claim, or a need, did to the cache: each is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A MAC was recorded: an answer to our request, or a request for us from a new neighbour.
    Learnt,
    /// An answer confirmed the MAC we have.
    Confirmed,
    /// A frame repeated the MAC we have without answering us: nothing to do.
    Unchanged,
    /// Ignored: nobody asked (no entry, or no request of ours outstanding), or a frame that may not create
    /// an entry.
    Unsolicited,
    /// Refused: the uplink's cache is full.
    CacheFull,
    /// A different MAC was claimed for a known address: probing it, not applied.
    MacChangeClaimed,
    /// The known MAC stopped answering and the claimed one answered our request: applied.
    MacChangeConfirmed,
    /// The known MAC answered our probe: the claimed change was discarded.
    MacChangeRefused,
    /// Several MACs answered one broadcast request: the change was refused, the known MAC kept.
    MacChangeContested,
}

impl Outcome {
    pub(crate) const ALL: [Outcome; 9] = [
        Outcome::Learnt,
        Outcome::Confirmed,
        Outcome::Unchanged,
        Outcome::Unsolicited,
        Outcome::CacheFull,
        Outcome::MacChangeClaimed,
        Outcome::MacChangeConfirmed,
        Outcome::MacChangeRefused,
        Outcome::MacChangeContested,
    ];

    /// The metric label.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Learnt => "learnt",
            Outcome::Confirmed => "confirmed",
            Outcome::Unchanged => "unchanged",
            Outcome::Unsolicited => "unsolicited",
            Outcome::CacheFull => "cache_full",
            Outcome::MacChangeClaimed => "mac_change_claimed",
            Outcome::MacChangeConfirmed => "mac_change_confirmed",
            Outcome::MacChangeRefused => "mac_change_refused",
            Outcome::MacChangeContested => "mac_change_contested",
        }
    }

    /// Its place in [`NeighbourCounts::outcomes`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// RFC 4861 §7.3.2 states, as far as we keep them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Being resolved by broadcast requests; no MAC yet.
    Incomplete,
    /// MAC confirmed less than [`REACHABLE`] ago.
    Reachable,
    /// Unicast probes to the MAC we have (it aged, or another MAC was claimed).
    Probe,
    /// The MAC stopped answering: broadcast requests; the answer is taken.
    Verify,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: State,
    /// The MAC the workers use (`None` only while incomplete).
    mac: Option<MacAddr>,
    /// When the MAC was last confirmed (or the entry created).
    confirmed: Instant,
    /// Our last request for this address, and how many went unanswered in the current phase.
    asked: Option<Instant>,
    probes: u32,
    /// A different MAC someone claimed, while we probe the known one.
    candidate: Option<MacAddr>,
    /// A different MAC was claimed and the claim is not settled yet.
    claimed: bool,
    /// In [`State::Verify`]: the MAC that answered our last broadcast request, and whether another did too.
    answer: Option<MacAddr>,
    contested: bool,
    /// A configured next hop: never refused or evicted, does not count against [`CAPACITY`].
    pinned: bool,
    /// Created by a request for us and not needed by a packet yet.
    passive: bool,
}

impl Entry {
    fn new(now: Instant, pinned: bool) -> Entry {
        Entry {
            state: State::Incomplete,
            mac: None,
            confirmed: now,
            asked: None,
            probes: 0,
            candidate: None,
            claimed: false,
            answer: None,
            contested: false,
            pinned,
            passive: false,
        }
    }

    fn confirm(&mut self, mac: MacAddr, now: Instant) {
        self.state = State::Reachable;
        self.mac = Some(mac);
        self.confirmed = now;
        self.asked = None;
        self.probes = 0;
        self.candidate = None;
        self.claimed = false;
        self.answer = None;
        self.contested = false;
    }

    /// Back to unicast probes of the MAC we have, the claim still pending.
    fn reprobe(&mut self) {
        self.state = State::Probe;
        self.asked = None;
        self.probes = 0;
        self.answer = None;
        self.contested = false;
    }
}

/// A probe the control loop should send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe {
    pub(crate) uplink: UplinkId,
    pub(crate) ip: IpAddr,
    /// Unicast to this MAC; broadcast (multicast for NDP) when `None`.
    pub(crate) known: Option<MacAddr>,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NeighbourCounts {
    pub(crate) resolved: u64,
    pub(crate) incomplete: u64,
    pub(crate) failed: u64,
    /// By [`Outcome::index`].
    pub(crate) outcomes: [u64; Outcome::ALL.len()],
}

/// One uplink's entries.
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<IpAddr, Entry>,
    pins: Vec<IpAddr>,
    /// Entries that are not pinned.
    learnt: usize,
    /// Of those, entries with `passive`.
    passive: usize,
}

impl Cache {
    fn insert(&mut self, ip: IpAddr, e: Entry) {
        if !e.pinned {
            self.learnt += 1;
        }
        if e.passive {
            self.passive += 1;
        }
        self.entries.insert(ip, e);
    }

    fn remove(&mut self, ip: IpAddr, table: &Table) {
        if let Some(e) = self.entries.remove(&ip) {
            if !e.pinned {
                self.learnt -= 1;
            }
            if e.passive {
                self.passive -= 1;
            }
            if e.mac.is_some() {
                table.remove(ip);
            }
        }
    }

    fn unpassive(&mut self, ip: IpAddr) {
        if let Some(e) = self.entries.get_mut(&ip) {
            if e.passive {
                e.passive = false;
                self.passive -= 1;
            }
        }
    }

    /// Applies `c`; the second value is true when the workers' view changed.
    fn heard(&mut self, c: Claim, now: Instant, table: &Table) -> (Outcome, bool) {
        let Some(e) = self.entries.get_mut(&c.ip) else {
            if c.kind != ClaimKind::Request || self.pins.contains(&c.ip) {
                // The configured next hops are learnt from answers only.
                return (Outcome::Unsolicited, false);
            }
            if self.learnt >= CAPACITY || self.passive >= PASSIVE_CAPACITY {
                return (Outcome::CacheFull, false);
            }
            let mut e = Entry::new(now, false);
            e.confirm(c.mac, now);
            e.passive = true;
            self.insert(c.ip, e);
            table.set(c.ip, c.mac);
            return (Outcome::Learnt, true);
        };
        let answered = c.kind == ClaimKind::Answer
            && e.asked
                .is_some_and(|t| now.saturating_duration_since(t) <= ANSWER_WINDOW);
        match e.mac {
            None if answered => {
                e.confirm(c.mac, now);
                table.set(c.ip, c.mac);
                (Outcome::Learnt, true)
            }
            None => (Outcome::Unsolicited, false),
            Some(known) if known == c.mac => {
                if e.claimed {
                    // The known MAC is alive: whatever the frame, the pending change is refused.
                    e.confirm(known, now);
                    return (Outcome::MacChangeRefused, false);
                }
                if !answered {
                    return (Outcome::Unchanged, false);
                }
                e.confirm(known, now);
                (Outcome::Confirmed, false)
            }
            Some(_) if answered && e.state == State::Verify => {
                // Decided when the answer window closes (`maintain`): taken only if no other MAC answered.
                match e.answer {
                    None => e.answer = Some(c.mac),
                    Some(m) if m != c.mac => e.contested = true,
                    Some(_) => {}
                }
                e.claimed = true;
                (Outcome::MacChangeClaimed, false)
            }
            Some(_) => {
                if c.overrides {
                    e.candidate = Some(c.mac);
                }
                e.claimed = true;
                if e.state == State::Reachable {
                    e.state = State::Probe;
                    e.asked = None;
                    e.probes = 0;
                }
                (Outcome::MacChangeClaimed, false)
            }
        }
    }
}

/// The neighbour cache shared by the workers and the control thread.
#[derive(Debug)]
pub(crate) struct Neighbours {
    caches: Vec<Mutex<Cache>>,
    tables: Arc<[Table]>,
    /// Changes whenever a published MAC is learnt, changed or forgotten.
    generation: AtomicU64,
    failed: AtomicU64,
    outcomes: [AtomicU64; Outcome::ALL.len()],
}

impl Neighbours {
    /// An empty cache for `uplinks` uplinks.
    pub(crate) fn new(uplinks: usize) -> Neighbours {
        Neighbours {
            caches: (0..uplinks).map(|_| Mutex::default()).collect(),
            tables: (0..uplinks).map(|_| Table::default()).collect(),
            generation: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            outcomes: Default::default(),
        }
    }

    /// A worker's view.
    pub(crate) fn local(&self) -> LocalNeighbours {
        LocalNeighbours {
            tables: Arc::clone(&self.tables),
            generation: self.generation(),
            last: None,
        }
    }

    /// Changes whenever a MAC is learnt, changed or forgotten.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn lock(&self, uplink: UplinkId) -> Option<MutexGuard<'_, Cache>> {
        self.caches
            .get(usize::from(uplink))
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn count(&self, o: Outcome) -> Outcome {
        self.outcomes[o.index()].fetch_add(1, Ordering::Relaxed);
        o
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Marks `ips` as the configured next hops of `uplink` (replacing the previous ones).
    pub(crate) fn set_pinned(&self, uplink: UplinkId, ips: &[IpAddr]) {
        let Some(mut c) = self.lock(uplink) else {
            return;
        };
        let ips = &ips[..ips.len().min(MAX_PINNED)];
        if c.pins == ips {
            return;
        }
        let c = &mut *c;
        for (ip, e) in &mut c.entries {
            let pinned = ips.contains(ip);
            if pinned && !e.pinned {
                c.learnt -= 1;
                if e.passive {
                    e.passive = false;
                    c.passive -= 1;
                }
            } else if !pinned && e.pinned {
                c.learnt += 1;
            }
            e.pinned = pinned;
        }
        c.pins = ips.to_vec();
    }

    /// Applies what a received frame claims (see the module docs for the rules).
    pub(crate) fn heard(&self, uplink: UplinkId, claim: Claim, now: Instant) -> Outcome {
        let Some(table) = self.tables.get(usize::from(uplink)) else {
            return Outcome::Unsolicited;
        };
        // Without a resolved entry an unsolicited frame can change nothing: no lock for a flood of them.
        if claim.kind == ClaimKind::Unsolicited && table.get(claim.ip).is_none() {
            return self.count(Outcome::Unsolicited);
        }
        let Some(mut c) = self.lock(uplink) else {
            return Outcome::Unsolicited;
        };
        let (o, changed) = c.heard(claim, now, table);
        drop(c);
        if changed {
            self.changed();
        }
        self.count(o)
    }

    /// A packet needs `ip` on `uplink` and no worker knows its MAC: true when a request should go out now
    /// (at most one per [`RETRANS`] per address). After [`PROBES`] unanswered requests the address counts
    /// as failed; callers drop what waits for it. False, and counted, when the cache is full.
    pub(crate) fn want(&self, uplink: UplinkId, ip: IpAddr, now: Instant) -> bool {
        let Some(mut c) = self.lock(uplink) else {
            return false;
        };
        if !c.entries.contains_key(&ip) {
            let pinned = c.pins.contains(&ip);
            if !pinned && c.learnt >= CAPACITY {
                drop(c);
                self.count(Outcome::CacheFull);
                return false;
            }
            c.insert(ip, Entry::new(now, pinned));
        }
        c.unpassive(ip);
        let Some(e) = c.entries.get_mut(&ip) else {
            return false;
        };
        if e.mac.is_some() {
            return false; // learnt meanwhile; the worker finds it in the table
        }
        let due = e.probes < PROBES
            && e.asked
                .is_none_or(|t| now.saturating_duration_since(t) >= RETRANS);
        if due {
            e.asked = Some(now);
            e.probes += 1;
        }
        due
    }

    /// Housekeeping, every few hundred milliseconds: returns the probes to send and forgets entries that
    /// stayed unanswered.
    pub(crate) fn maintain(&self, now: Instant) -> Vec<Probe> {
        let mut probes = Vec::new();
        let mut gone = Vec::new();
        let mut outcomes = Vec::new();
        let mut changed = false;
        for (u, (cache, table)) in self.caches.iter().zip(self.tables.iter()).enumerate() {
            let uplink = UplinkId::try_from(u).unwrap_or(UplinkId::MAX);
            let mut c = cache.lock().unwrap_or_else(PoisonError::into_inner);
            gone.clear();
            for (ip, e) in &mut c.entries {
                let since = e
                    .asked
                    .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
                let reachable = if e.pinned {
                    NEXT_HOP_REACHABLE
                } else {
                    REACHABLE
                };
                if e.state == State::Reachable
                    && now.saturating_duration_since(e.confirmed) >= reachable
                {
                    e.state = State::Probe;
                    e.probes = 0;
                    e.asked = None;
                }
                if since < RETRANS && e.asked.is_some() {
                    continue;
                }
                // The answer window of a broadcast request has closed: one new MAC is taken, several are not.
                if e.state == State::Verify {
                    if let Some(mac) = e.answer {
                        if e.contested {
                            e.reprobe();
                            outcomes.push(Outcome::MacChangeContested);
                        } else {
                            e.confirm(mac, now);
                            table.set(*ip, mac);
                            changed = true;
                            outcomes.push(Outcome::MacChangeConfirmed);
                            continue;
                        }
                    }
                }
                let mut send = |e: &mut Entry, known| {
                    e.asked = Some(now);
                    e.probes += 1;
                    probes.push(Probe {
                        uplink,
                        ip: *ip,
                        known,
                    });
                };
                match e.state {
                    State::Reachable => {}
                    State::Incomplete => {
                        // Requests go out from `want`; this only ends a resolution nobody answered.
                        if e.probes >= PROBES {
                            gone.push(*ip);
                        }
                    }
                    State::Probe if e.probes < PROBES => send(e, e.mac),
                    State::Probe => {
                        e.state = State::Verify;
                        e.probes = 0;
                        send(e, None);
                    }
                    State::Verify if e.probes < PROBES => send(e, None),
                    State::Verify => gone.push(*ip),
                }
            }
            for ip in &gone {
                self.failed.fetch_add(1, Ordering::Relaxed);
                changed |= c.entries.get(ip).is_some_and(|e| e.mac.is_some());
                c.remove(*ip, table);
            }
        }
        for o in outcomes {
            self.count(o);
        }
        if changed {
            self.changed();
        }
        probes
    }

    /// True while `ip` is being resolved and has not yet failed.
    pub(crate) fn pending(&self, uplink: UplinkId, ip: IpAddr) -> bool {
        self.lock(uplink).is_some_and(|c| {
            c.entries
                .get(&ip)
                .is_some_and(|e| e.mac.is_none() && e.probes < PROBES)
        })
    }

    /// Entry counts and outcomes for metrics.
    pub(crate) fn counts(&self) -> NeighbourCounts {
        let mut n = NeighbourCounts {
            failed: self.failed.load(Ordering::Relaxed),
            outcomes: std::array::from_fn(|i| self.outcomes[i].load(Ordering::Relaxed)),
            ..NeighbourCounts::default()
        };
        for cache in &self.caches {
            let c = cache.lock().unwrap_or_else(PoisonError::into_inner);
            let resolved = c.entries.values().filter(|e| e.mac.is_some()).count();
            n.resolved += u64::try_from(resolved).unwrap_or(u64::MAX);
            n.incomplete += u64::try_from(c.entries.len() - resolved).unwrap_or(u64::MAX);
        }
        n
    }

    /// The resolved MAC of `ip`, if any (control paths and tests).
    pub(crate) fn get(&self, uplink: UplinkId, ip: IpAddr) -> Option<MacAddr> {
        self.tables.get(usize::from(uplink))?.get(ip)
    }
}

/// A worker's view of the resolved entries: looked up per packet without a lock or an allocation.
#[derive(Debug)]
pub(crate) struct LocalNeighbours {
    tables: Arc<[Table]>,
    generation: u64,
    /// The last lookup, valid while the generation stays.
    last: Option<((UplinkId, IpAddr), MacAddr)>,
}

impl LocalNeighbours {
    /// Notices a change in `shared`; true when there was one.
    pub(crate) fn sync(&mut self, shared: &Neighbours) -> bool {
        let g = shared.generation();
        if g == self.generation {
            return false;
        }
        self.generation = g;
        self.last = None;
        true
    }

    /// The MAC of `ip` on `uplink`.
    #[inline]
    pub(crate) fn get(&mut self, uplink: UplinkId, ip: IpAddr) -> Option<MacAddr> {
        if let Some((k, mac)) = self.last {
            if k == (uplink, ip) {
                return Some(mac);
            }
        }
        let mac = self.tables.get(usize::from(uplink))?.get(ip)?;
        self.last = Some(((uplink, ip), mac));
        Some(mac)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const ROUTER_MAC: MacAddr = [2, 0, 0, 0, 0, 0xfe];
    const EVIL: MacAddr = [2, 0xe, 0xe, 0xe, 0xe, 0xe];

    fn router() -> IpAddr {
        "203.0.113.1".parse().unwrap()
    }

    fn claim(ip: IpAddr, mac: MacAddr, kind: ClaimKind) -> Claim {
        Claim {
            ip,
            mac,
            kind,
            overrides: true,
        }
    }

    /// A cache that asked for the router at `t0` and got its answer.
    fn with_router(t0: Instant) -> Neighbours {
        let nb = Neighbours::new(1);
        nb.set_pinned(0, &[router()]);
        assert!(nb.want(0, router(), t0));
        let answer = claim(router(), ROUTER_MAC, ClaimKind::Answer);
        assert_eq!(
            nb.heard(0, answer, t0 + Duration::from_millis(1)),
            Outcome::Learnt
        );
        nb
    }

    #[test]
    fn unsolicited_replies_and_advertisements_are_ignored() {
        let t0 = Instant::now();
        let nb = Neighbours::new(1);
        let ip = router();
        for kind in [ClaimKind::Answer, ClaimKind::Unsolicited] {
            assert_eq!(nb.heard(0, claim(ip, EVIL, kind), t0), Outcome::Unsolicited);
        }
        assert_eq!(nb.get(0, ip), None);
        assert_eq!(nb.counts().resolved + nb.counts().incomplete, 0, "no state");
        // Asked, but the answer comes after the window: ignored too.
        assert!(nb.want(0, ip, t0));
        let late = t0 + ANSWER_WINDOW + Duration::from_millis(1);
        assert_eq!(
            nb.heard(0, claim(ip, EVIL, ClaimKind::Answer), late),
            Outcome::Unsolicited
        );
        // And an unsolicited frame never fills an incomplete entry.
        assert_eq!(
            nb.heard(0, claim(ip, EVIL, ClaimKind::Unsolicited), t0),
            Outcome::Unsolicited
        );
        assert_eq!(nb.get(0, ip), None);
        assert_eq!(nb.counts().outcomes[Outcome::Unsolicited.index()], 4);
    }

    #[test]
    fn a_reply_to_our_request_is_learnt() {
        let t0 = Instant::now();
        let nb = Neighbours::new(2);
        let mut local = nb.local();
        let ip = router();
        assert!(nb.want(0, ip, t0));
        assert!(
            !nb.want(0, ip, t0 + Duration::from_millis(10)),
            "rate limited"
        );
        assert!(nb.pending(0, ip));
        assert_eq!(local.get(0, ip), None);
        let answer = claim(ip, ROUTER_MAC, ClaimKind::Answer);
        assert_eq!(
            nb.heard(0, answer, t0 + Duration::from_millis(20)),
            Outcome::Learnt
        );
        assert!(local.sync(&nb));
        assert_eq!(local.get(0, ip), Some(ROUTER_MAC));
        assert!(!local.sync(&nb), "no change, nothing to do");
        // Per uplink: the other uplink knows nothing of it.
        assert_eq!(local.get(1, ip), None);
        // A request for one of our addresses teaches its sender (RFC 826), once.
        let asker: IpAddr = "203.0.113.7".parse().unwrap();
        let req = claim(asker, EVIL, ClaimKind::Request);
        assert_eq!(nb.heard(0, req, t0), Outcome::Learnt);
        assert_eq!(nb.heard(0, req, t0), Outcome::Unchanged);
        assert_eq!(nb.get(0, asker), Some(EVIL));
    }

    #[test]
    fn a_mac_change_is_refused_while_the_known_mac_answers() {
        let t0 = Instant::now();
        let nb = with_router(t0);
        let mut t = t0 + Duration::from_secs(1);
        // Whatever the frame, a different MAC for the router is only a reason to probe.
        for kind in [
            ClaimKind::Unsolicited,
            ClaimKind::Request,
            ClaimKind::Answer,
        ] {
            assert_eq!(
                nb.heard(0, claim(router(), EVIL, kind), t),
                Outcome::MacChangeClaimed
            );
            assert_eq!(nb.get(0, router()), Some(ROUTER_MAC));
        }
        // The probe goes unicast to the MAC we have ...
        let probes = nb.maintain(t);
        assert_eq!(
            probes,
            vec![Probe {
                uplink: 0,
                ip: router(),
                known: Some(ROUTER_MAC)
            }]
        );
        // ... where a forged answer in the window changes nothing either ...
        t += Duration::from_millis(1);
        assert_eq!(
            nb.heard(0, claim(router(), EVIL, ClaimKind::Answer), t),
            Outcome::MacChangeClaimed
        );
        // ... and the router's answer ends it.
        let answer = claim(router(), ROUTER_MAC, ClaimKind::Answer);
        assert_eq!(nb.heard(0, answer, t), Outcome::MacChangeRefused);
        assert_eq!(nb.get(0, router()), Some(ROUTER_MAC));
        assert!(nb.maintain(t + RETRANS).is_empty(), "reachable again");
        let c = nb.counts();
        assert_eq!(c.outcomes[Outcome::MacChangeRefused.index()], 1);
        assert_eq!(c.outcomes[Outcome::MacChangeConfirmed.index()], 0);
    }

    #[test]
    fn a_mac_change_takes_effect_when_the_old_mac_is_gone_and_the_new_one_answers() {
        let t0 = Instant::now();
        let nb = with_router(t0);
        let mut local = nb.local();
        assert_eq!(local.get(0, router()), Some(ROUTER_MAC));
        const NEW: MacAddr = [2, 0, 0, 0, 0, 0xfd];
        let mut t = t0 + Duration::from_secs(1);
        let hint = claim(router(), NEW, ClaimKind::Unsolicited);
        assert_eq!(nb.heard(0, hint, t), Outcome::MacChangeClaimed);
        // PROBES unanswered unicast probes to the old MAC, then broadcast requests.
        for _ in 0..PROBES {
            let p = nb.maintain(t);
            assert_eq!(p.len(), 1);
            assert_eq!(p[0].known, Some(ROUTER_MAC));
            t += RETRANS;
        }
        let p = nb.maintain(t);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].known, None, "broadcast");
        // Meanwhile the old MAC stays in use.
        assert_eq!(nb.get(0, router()), Some(ROUTER_MAC));
        let answer = claim(router(), NEW, ClaimKind::Answer);
        t += Duration::from_millis(1);
        assert_eq!(nb.heard(0, answer, t), Outcome::MacChangeClaimed);
        assert_eq!(nb.heard(0, answer, t), Outcome::MacChangeClaimed);
        // Taken when the answer window closes with no other MAC in it.
        assert!(!local.sync(&nb));
        assert!(nb.maintain(t + ANSWER_WINDOW).is_empty());
        assert!(local.sync(&nb));
        assert_eq!(local.get(0, router()), Some(NEW));
        assert_eq!(nb.counts().outcomes[Outcome::MacChangeConfirmed.index()], 1);
    }

    /// The router replaced without a word (a new MAC, no gratuitous ARP or NA): the configured next hop is
    /// probed every [`NEXT_HOP_REACHABLE`], its old MAC stays silent for [`PROBES`] probes, a broadcast
    /// request finds the new one: within 10 s, where [`REACHABLE`] would have taken up to 34 s.
    #[test]
    fn a_router_replaced_silently_is_found_within_next_hop_reachable_and_the_probes() {
        let t0 = Instant::now();
        let nb = with_router(t0);
        const NEW: MacAddr = [2, 0, 0, 0, 0, 0xfd];
        assert!(nb.maintain(t0 + NEXT_HOP_REACHABLE - RETRANS).is_empty());
        let mut t = t0 + NEXT_HOP_REACHABLE + Duration::from_millis(1);
        for _ in 0..PROBES {
            let p = nb.maintain(t);
            assert_eq!(
                (p.len(), p[0].known),
                (1, Some(ROUTER_MAC)),
                "unicast probe"
            );
            t += RETRANS;
        }
        let p = nb.maintain(t);
        assert_eq!((p.len(), p[0].known), (1, None), "broadcast");
        let answer = claim(router(), NEW, ClaimKind::Answer);
        assert_eq!(
            nb.heard(0, answer, t + Duration::from_millis(1)),
            Outcome::MacChangeClaimed
        );
        assert!(nb.maintain(t + ANSWER_WINDOW).is_empty());
        assert_eq!(nb.get(0, router()), Some(NEW));
        assert!(t + ANSWER_WINDOW - t0 < NEXT_HOP_REACHABLE + (PROBES + 2) * RETRANS);
    }

    /// Silences the known MAC for [`PROBES`] probes; returns the time of the first broadcast request.
    fn to_verify(nb: &Neighbours, mut t: Instant) -> Instant {
        assert_eq!(
            nb.heard(0, claim(router(), EVIL, ClaimKind::Unsolicited), t),
            Outcome::MacChangeClaimed
        );
        for _ in 0..PROBES {
            assert_eq!(nb.maintain(t)[0].known, Some(ROUTER_MAC));
            t += RETRANS;
        }
        assert_eq!(nb.maintain(t)[0].known, None, "broadcast");
        t
    }

    #[test]
    fn two_macs_answering_one_broadcast_change_nothing() {
        let t0 = Instant::now();
        let nb = with_router(t0);
        let t = to_verify(&nb, t0 + Duration::from_secs(1));
        // A host forging answers and another (the router on a new card, or the attacker's second MAC).
        const NEW: MacAddr = [2, 0, 0, 0, 0, 0xfd];
        for mac in [EVIL, NEW, EVIL] {
            let answer = claim(router(), mac, ClaimKind::Answer);
            assert_eq!(nb.heard(0, answer, t), Outcome::MacChangeClaimed);
        }
        // The window closes contested: back to unicast probes of the MAC we have, which stays in use.
        let p = nb.maintain(t + ANSWER_WINDOW);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].known, Some(ROUTER_MAC));
        assert_eq!(nb.get(0, router()), Some(ROUTER_MAC));
        let c = nb.counts();
        assert_eq!(c.outcomes[Outcome::MacChangeContested.index()], 1);
        assert_eq!(c.outcomes[Outcome::MacChangeConfirmed.index()], 0);
        // The same again with the attacker alone in a later window would be taken: ARP cannot tell them
        // apart once the known MAC is silent for good (documented in docs/running.md).
    }

    #[test]
    fn a_late_frame_of_the_known_mac_refuses_a_pending_change() {
        let t0 = Instant::now();
        // Late answers (queued behind a flood), requests for us, even unsolicited announcements: any frame
        // with the known MAC shows it alive, in Probe and in Verify alike.
        for kind in [
            ClaimKind::Answer,
            ClaimKind::Request,
            ClaimKind::Unsolicited,
        ] {
            for verify in [false, true] {
                let nb = with_router(t0);
                let mut t = t0 + Duration::from_secs(1);
                if verify {
                    t = to_verify(&nb, t);
                    let forged = claim(router(), EVIL, ClaimKind::Answer);
                    assert_eq!(nb.heard(0, forged, t), Outcome::MacChangeClaimed);
                } else {
                    let forged = claim(router(), EVIL, ClaimKind::Unsolicited);
                    assert_eq!(nb.heard(0, forged, t), Outcome::MacChangeClaimed);
                    nb.maintain(t);
                }
                let late = t + 3 * ANSWER_WINDOW / 2;
                let real = claim(router(), ROUTER_MAC, kind);
                assert_eq!(
                    nb.heard(0, real, late),
                    Outcome::MacChangeRefused,
                    "{kind:?}"
                );
                assert!(nb.maintain(late).is_empty(), "reachable again");
                assert_eq!(nb.get(0, router()), Some(ROUTER_MAC));
                assert_eq!(nb.counts().outcomes[Outcome::MacChangeConfirmed.index()], 0);
            }
        }
    }

    #[test]
    fn entries_are_refreshed_and_forgotten_when_nobody_answers() {
        let t0 = Instant::now();
        let nb = Neighbours::new(1);
        let ip: IpAddr = "203.0.113.50".parse().unwrap();
        assert!(nb.want(0, ip, t0));
        nb.heard(0, claim(ip, ROUTER_MAC, ClaimKind::Answer), t0);
        let mut local = nb.local();
        assert!(nb.maintain(t0 + REACHABLE - RETRANS).is_empty());
        // After REACHABLE: PROBES unicast probes, then PROBES broadcast ones, then the entry goes.
        let mut t = t0 + REACHABLE;
        let mut sent = Vec::new();
        for _ in 0..2 * PROBES {
            let p = nb.maintain(t);
            assert_eq!(p.len(), 1);
            sent.push(p[0].known);
            t += RETRANS;
        }
        assert_eq!(sent.iter().filter(|k| k.is_some()).count(), 3);
        assert!(nb.maintain(t).is_empty());
        assert_eq!(nb.get(0, ip), None);
        assert!(local.sync(&nb));
        assert_eq!(local.get(0, ip), None);
        assert_eq!(nb.counts().failed, 1);
    }

    #[test]
    fn unresolved_addresses_fail_after_the_probes() {
        let t0 = Instant::now();
        let nb = Neighbours::new(2);
        let ip: IpAddr = "10.50.0.99".parse().unwrap();
        let mut t = t0;
        let mut sent = 0;
        for _ in 0..6 {
            if nb.want(1, ip, t) {
                sent += 1;
            }
            nb.maintain(t);
            t += Duration::from_millis(500);
        }
        assert_eq!(sent, PROBES);
        assert!(!nb.pending(1, ip), "no more probes: given up");
        nb.maintain(t);
        assert_eq!(nb.counts().failed, 1);
        // New traffic starts a new resolution.
        assert!(nb.want(1, ip, t));
    }

    #[test]
    fn a_pinned_next_hop_is_never_refused_or_evicted() {
        let t0 = Instant::now();
        let nb = with_router(t0);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        nb.set_pinned(0, &[router(), v6]);
        // Fill the uplink with learnt entries.
        for n in 0..u32::try_from(CAPACITY).unwrap() {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
            assert!(nb.want(0, ip, t0));
            nb.heard(0, claim(ip, EVIL, ClaimKind::Answer), t0);
        }
        let one_more = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
        assert!(!nb.want(0, one_more, t0), "full: refused");
        assert_eq!(nb.counts().outcomes[Outcome::CacheFull.index()], 1);
        // The router is still there, and the other next hop can still be resolved.
        assert_eq!(nb.get(0, router()), Some(ROUTER_MAC));
        assert!(nb.want(0, v6, t0));
        assert_eq!(
            nb.heard(0, claim(v6, ROUTER_MAC, ClaimKind::Answer), t0),
            Outcome::Learnt
        );
        assert_eq!(nb.counts().resolved, u64::try_from(CAPACITY).unwrap() + 2);
        // A request for us cannot create the configured next hop's entry (answers only).
        let nb = Neighbours::new(1);
        nb.set_pinned(0, &[router()]);
        let req = claim(router(), EVIL, ClaimKind::Request);
        assert_eq!(nb.heard(0, req, t0), Outcome::Unsolicited);
        assert_eq!(nb.get(0, router()), None);
    }

    #[test]
    fn a_flood_of_distinct_senders_stays_bounded() {
        let t0 = Instant::now();
        let nb = with_router(t0);
        let mut local = nb.local();
        for n in 0..100_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0xc633_0000 + n));
            let mac = [2, 0xe, 0, 0, 0, 0];
            for kind in [
                ClaimKind::Unsolicited,
                ClaimKind::Answer,
                ClaimKind::Request,
            ] {
                nb.heard(0, claim(ip, mac, kind), t0);
            }
            // And the router's address, over and over.
            nb.heard(0, claim(router(), mac, ClaimKind::Unsolicited), t0);
        }
        let c = nb.counts();
        assert_eq!(
            c.resolved,
            u64::try_from(PASSIVE_CAPACITY).unwrap() + 1,
            "only requests for us created entries, up to their share"
        );
        assert_eq!(c.incomplete, 0);
        assert_eq!(c.outcomes[Outcome::Unsolicited.index()], 200_000);
        assert_eq!(
            c.outcomes[Outcome::CacheFull.index()],
            100_000 - u64::try_from(PASSIVE_CAPACITY).unwrap()
        );
        assert_eq!(local.get(0, router()), Some(ROUTER_MAC));
        // Destinations we need still get resolved: requests for us only take their share.
        let ip: IpAddr = "203.0.113.77".parse().unwrap();
        assert!(nb.want(0, ip, t0));
        let answer = claim(ip, ROUTER_MAC, ClaimKind::Answer);
        assert_eq!(nb.heard(0, answer, t0), Outcome::Learnt);
        local.sync(&nb);
        assert_eq!(local.get(0, ip), Some(ROUTER_MAC));
    }
}
