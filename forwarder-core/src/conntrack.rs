//! The connection-tracking table: one lock-free table shared by all workers.
//!
//! # Memory layout
//!
//! * An **arena** of fixed 112-byte [`Flow`] slots, preallocated (`max_entries` plus a small slack for
//!   slots waiting out their epoch grace period). Every field is an atomic; see [`Flow`]'s module for the
//!   layout. Addresses are stored as 16 bytes (IPv4 v4-mapped), so IPv4 and IPv6 flows share the arena.
//! * Three **bucket arrays** of `AtomicU32` heads (`orig` and `reply`: one bucket per entry; `eim`: one per
//!   two entries), each heading an intrusive singly linked list threaded through the slots
//!   (`next_orig`, `next_reply`, `next_eim`). A link holds `slot + 1` (0 = end) and bit 31 is the Harris
//!   *deletion mark* of the node that owns the link.
//! * **Port pools** ([`PortPools`]): 2 bytes per port per used (egress IP, protocol).
//! * A count-min sketch of per-source flow counts (two `AtomicU32` per source hash, `max_entries / 16`
//!   counters).
//!
//! * A small process-wide registry (see `context.rs`) gives each slot its table's timeouts and egress IPs
//!   through a one-byte id instead of a pointer.
//!
//! Steady state at 1 M or 10 M live IPv4 flows: 112 (slot) + 8 (orig and reply buckets) + 2 (EIM buckets) +
//! ~4 (ports) + ~0.5 (slack, sketch) ≈ 126.5 bytes per flow (measured by `bench/src/bin/conntrack_memory.rs`).
//!
//! # Algorithm
//!
//! The indexes are Michael/Harris lock-free hash lists with push-at-head insertion:
//!
//! * **Lookup** hashes the key, walks the bucket list with acquire loads, skips nodes whose own link is marked
//!   (deleted) and flows that are expired, and compares keys. No stores, no locks, no allocation: one miss
//!   for the bucket, then one or two per visited slot (one bucket per entry: ~1.5 slots per successful
//!   lookup). The fields a walk reads sit in the slot's first 64 bytes, but slots are 112 bytes in an arena
//!   aligned to 8 only, so those 64 bytes span two cache lines unless the slot starts on a line boundary (at
//!   best one slot in four, when the arena itself does). The batch forms ([`Table::lookup_outbound_batch`])
//!   prefetch the buckets and then each round of chain nodes of 32 keys at once (both lines of each slot),
//!   overlapping their misses.
//! * **Insert** (same tuple raced by several threads: exactly one wins): (1) walk the orig list; a live match
//!   is returned, an expired one is removed first. (2) If the pod endpoint has no live mapping yet, take a
//!   random port first (so that an exhausted pool refuses before anything else is reserved); then reserve a
//!   unit of capacity, the source quota (which a TCP flow gives back when it finishes: `conntrack/quota.rs`),
//!   and a slot (lock-free Treiber free list with a tag against ABA, then a bump pointer over never-used
//!   slots); fill the slot while it is private. (3) Endpoint-independent
//!   mapping: walk the EIM list for a live *anchor* of (pod address, pod port, protocol, egress IP) and join
//!   it (increment its reference count if non-zero; a port taken in (2) goes back unused); otherwise publish
//!   this slot as the new anchor, with the port of (2) or a new one, by CAS on the EIM bucket head
//!   (re-walking on failure, so two anchors for one endpoint can never be live). (4) Link into
//!   the orig list: re-walk the bucket from the head just read; if the key is there, we lost: undo and
//!   return the winner; otherwise CAS the head from the value read to our slot. **This CAS is the
//!   linearization point of the insert**: all inserts into a bucket change its head, so a successful CAS
//!   proves no same-key node was added since the walk. (5) Push onto the reply list, then mark the flow
//!   live (INIT → LIVE, a release operation, so that sweeps and [`Table::for_each`], which reach slots by
//!   scanning the arena with acquire loads, see the identity fields initialized).
//! * **Batched insert** ([`Table::insert_batch`]): a new flow costs about six random cache misses (orig and
//!   mapping buckets, a mapping chain node, the quota counters, the port state, the reply bucket; profile of
//!   `pipeline_new_flow` one by one: the mapping bucket and chain node 18 % of all samples, the reply bucket
//!   10 %, the preceding lookup 19 %). The batch form hashes up to 32 new flows and prefetches all of those
//!   it can know before touching any (buckets, counters, the first port each will probe, the first two
//!   mapping chain nodes, the slots the allocator will hand out), then runs steps (1)–(3) of every insert,
//!   each prefetching its reply bucket, then steps (4)–(5) of every insert, in input order. Each insert
//!   draws its random numbers from its own generator, seeded once per flow in input order (also by
//!   [`Table::insert`]), so the batch picks exactly the ports one-by-one inserts would.
//! * **Removal** (expiry by [`Table::expire`], or replacement of an expired duplicate by insert) is claimed by
//!   a CAS of the slot's phase LIVE → DEAD — **the linearization point of the removal**; only the claimer
//!   does the accounting. It then marks the slot's `next_orig` / `next_reply` (the Harris logical deletion),
//!   releases the source quota (unless the flow is a finished TCP one) and its reference on the mapping
//!   (the last reference marks the anchor, puts the port into its reuse delay and unlinks the anchor), and unlinks the slot from each list: a walk from
//!   the bucket head CASes each marked node's predecessor to the node's successor, restarting when the
//!   predecessor turns out to be marked. Any remover helps unlink any marked node it passes, so no thread
//!   waits for another.
//! * **Reclamation**: a slot counts *holds* (its flow role plus each list it is linked into). Each successful
//!   unlink CAS drops one; when none remain the slot index is handed to `crossbeam_epoch`'s `defer`, which
//!   pushes it onto the free list only after every thread pinned at unlink time has unpinned. A reader can
//!   therefore never see a slot reused under it (no ABA in the lists, no torn identity). `defer` collects
//!   into a thread-local bag that crossbeam hands over only when it holds 64 functions, so every path that
//!   retires slots flushes it afterwards ([`Table::expire`], and an insert that replaced an expired duplicate,
//!   swept inline or lost its race).
//! * **Port takeover**: a new TCP connection whose pool is exhausted ends a *finished* flow (reset, or a FIN
//!   each way) that is the only user of its mapping and takes its port (`Inner::take_over`). Such a flow is
//!   the anchor of its mapping. Candidates come first from reply-index lookups toward the new connection's
//!   remote endpoint on random ports, then from walking the mapping index from a random bucket (any remote);
//!   nothing is recorded for it on the insert path.
//! * **Install** ([`Table::install`], for state sync between replicas) is an insert with the external port
//!   given instead of drawn: step (2) claims that port (free or cooling; refused when another mapping owns
//!   it or the pod endpoint has a mapping on another port), the rest is the insert above; then the TCP
//!   tracking and the times are set from the image. [`Flow::image`] is the other end.
//! * **Expiry** is an incremental sweep: a shared cursor hands out disjoint ranges of `budget` slots to
//!   callers, so several workers can sweep concurrently without stopping the world.
//! * **Capacity** counts entries, not only live flows: an expired flow that still anchors a live mapping
//!   keeps its entry (its slot and its unit of capacity, counted by [`Table::len`]) until the mapping ends;
//!   the flow whose removal ends the mapping gives the anchor's unit back. So [`InsertError::Full`] means that
//!   `max_entries` entries really are in use, and the arena slack only has to cover slots waiting out their
//!   epoch grace period.
//! * Refresh and expiry may race: a flow refreshed in the same instant the sweeper finds it expired can be
//!   removed; the next packet creates it again.
//!
//! Lookups given no `now` ([`Table::lookup_outbound`], [`Table::lookup_inbound`]) judge expiry by the latest
//! time passed to [`Table::insert`] or [`Table::expire`]; the `_at` variants take it explicitly.

mod context;
mod events;
mod flow;
mod key;
mod quota;

use core::net::IpAddr;
use core::time::Duration;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

pub use crossbeam_epoch::Guard;
pub use events::{FlowEvent, FlowEventKind, FlowEvents};
pub use flow::{Flow, FlowCounters, Refresh, TcpSegment, TcpState, TcpTracking};

use crate::flow::{FlowKey, NodeAddr, Proto, UplinkId};
use crate::ports::{prefetch, PoolId, PortPools, Rng};
use crate::reason::Reason;
use crate::time::Instant;
use flow::{holds_of, phase_of, EimKey, HOLD, PHASE_DEAD, PHASE_INIT, PHASE_LIVE};
use key::{Addr, Packed};

const MARK: u32 = 1 << 31;
const NIL: u32 = 0;

/// Idle timeouts per protocol state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// UDP (default 300 s; RFC 4787 asks for at least 120 s).
    pub udp: Duration,
    /// TCP established (default 7440 s = 2 h 4 min, RFC 5382).
    pub tcp_established: Duration,
    /// TCP partially open or closing, and after a valid RST (default 240 s).
    pub tcp_transitory: Duration,
    /// ICMP query (default 60 s).
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            udp: Duration::from_secs(300),
            tcp_established: Duration::from_secs(7440),
            tcp_transitory: Duration::from_secs(240),
            icmp: Duration::from_secs(60),
        }
    }
}

/// Default per-source quota: 16384 open flows, a quarter of the 64,512 ports of the default range of one
/// egress IP and protocol, so four busy pods can still fill an egress IP but no single one can with open
/// connections. A TCP connection stops counting when it finishes (reset, or a FIN each way), as Linux's
/// `nf_conncount` does (see `conntrack/quota.rs` and `docs/nat.md`).
pub const DEFAULT_MAX_PER_SOURCE: u32 = 16384;

/// Random ports whose reply tuple toward the new connection's remote endpoint is looked up first when a TCP
/// pool is exhausted (each probe is one reply-index lookup).
const TAKEOVER_PROBES: u32 = 16;
/// Anchors of the exhausted pool examined for a finished flow to take over (each one random slot read).
/// With a fraction `f` of the pool's mappings held by finished flows the search fails with probability
/// (1 − f)³²: below 10⁻⁶ at f = 0.35.
const TAKEOVER_CANDIDATES: u32 = 32;
/// Mapping-index buckets walked at most for one takeover (4 KiB of bucket heads, read in order).
const TAKEOVER_BUCKETS: usize = 1024;

/// Table configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Most entries (default 2²⁰): live flows, plus removed flows that still anchor a live mapping (see
    /// [`Table::len`]). The arena is preallocated for this many.
    pub max_entries: u32,
    /// Most live flows per pod source IP (default [`DEFAULT_MAX_PER_SOURCE`], a quarter of the ports one
    /// egress IP has per protocol, so that no single pod can hold every port of an egress IP).
    pub max_per_source: u32,
    /// Idle timeouts.
    pub timeouts: Timeouts,
    /// How long a released external port stays unused (default 120 s).
    pub port_reuse_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_entries: 1 << 20,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            timeouts: Timeouts::default(),
            port_reuse_delay: Duration::from_secs(120),
        }
    }
}

/// A new outbound flow to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewFlow {
    /// The pod's original tuple.
    pub orig: FlowKey,
    /// Egress IP to translate to (must be configured in the pools and of the flow's family).
    pub egress_ip: IpAddr,
    /// Client node to send replies back to.
    pub node: NodeAddr,
    /// Uplink outbound packets leave on.
    pub uplink: UplinkId,
}

/// A flow as another table has it, for [`Table::install`]: state sync between the replicas of a gateway
/// set carries flows this way (`crate::sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowImage {
    /// The tuple, egress IP, node and uplink, as for a new flow.
    pub new: NewFlow,
    /// The external port (ICMP: identifier) the flow is translated to.
    pub ext_port: u16,
    /// TCP tracking (default for UDP and ICMP).
    pub tcp: TcpTracking,
    /// Time since the flow was created.
    pub age: Duration,
    /// Time since the flow last saw a packet.
    pub idle: Duration,
}

/// Why a new flow was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// The table is full (no expired entry could be reclaimed).
    Full,
    /// The pod source IP holds its quota of flows.
    SourceQuota,
    /// No external port available for the egress IP and protocol.
    PortsExhausted,
    /// Egress IP / protocol not configured (or address families differ).
    NoPool,
    /// [`Table::install`] only: the external port asked for belongs to another mapping, or the pod endpoint
    /// already has a mapping on another port.
    PortInUse,
}

impl InsertError {
    /// The drop reason to count.
    pub fn reason(self) -> Reason {
        match self {
            InsertError::Full => Reason::ConntrackFull,
            InsertError::SourceQuota => Reason::SourceQuotaExceeded,
            InsertError::PortsExhausted | InsertError::NoPool | InsertError::PortInUse => {
                Reason::PortsExhausted
            }
        }
    }

    const fn index(self) -> usize {
        match self {
            InsertError::Full => 0,
            InsertError::SourceQuota => 1,
            InsertError::PortsExhausted => 2,
            InsertError::NoPool => 3,
            InsertError::PortInUse => 4,
        }
    }
}

/// Refused inserts since the table was created, per cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Refused {
    /// [`InsertError::Full`].
    pub full: u64,
    /// [`InsertError::SourceQuota`].
    pub source_quota: u64,
    /// [`InsertError::PortsExhausted`].
    pub ports_exhausted: u64,
    /// [`InsertError::NoPool`].
    pub no_pool: u64,
    /// [`InsertError::PortInUse`].
    pub port_in_use: u64,
}

#[derive(Debug, Clone, Copy)]
enum List {
    Orig,
    Reply,
    Eim,
}

/// Most flows [`Table::insert_batch`] and the batch lookups work on together (longer batches are done in
/// chunks of this size).
pub const BATCH: usize = 32;

/// What the first half of an insert ([`Inner::insert_begin`]) did.
enum Begun<'g> {
    /// The tuple has a flow already.
    Found(&'g Flow),
    /// A slot is filled and its mapping attached; [`Inner::insert_end`] links it.
    Filled(Filled),
}

/// A filled slot waiting for the second half of its insert.
#[derive(Debug, Clone, Copy)]
struct Filled {
    idx: u32,
    k: Packed,
    /// Hashes of the orig and reply tuples.
    h: u64,
    rh: u64,
    /// Installed with its owner's port ([`Table::install`]): a flow that started elsewhere, not a new one.
    installed: bool,
}

/// An external port taken for a new mapping.
#[derive(Debug, Clone, Copy)]
enum Taken {
    /// Allocated from the pool.
    Fresh(u16),
    /// Taken over from a finished TCP flow.
    Over(u16),
}

impl Taken {
    fn port(self) -> u16 {
        match self {
            Taken::Fresh(p) | Taken::Over(p) => p,
        }
    }
}

/// The shared connection-tracking table. `Send + Sync`; share it through an `Arc`.
pub struct Table {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for Table {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Table")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .field("refused", &self.refused())
            .finish_non_exhaustive()
    }
}

struct Inner {
    slots: Box<[Flow]>,
    orig: Box<[AtomicU32]>,
    reply: Box<[AtomicU32]>,
    eim: Box<[AtomicU32]>,
    quota: Arc<quota::Quota>,
    free: CachePadded<AtomicU64>,
    bump: CachePadded<AtomicU32>,
    live: CachePadded<AtomicUsize>,
    cursor: CachePadded<AtomicUsize>,
    clock: CachePadded<AtomicU64>,
    refused: [AtomicU64; 5],
    takeovers: AtomicU64,
    max_entries: usize,
    reuse_delay: Duration,
    /// The context the slots' ids name; held for its `Drop`, which releases it when the arena goes (see
    /// `context.rs`).
    #[allow(dead_code)]
    ctx: context::Registration,
    pools: PortPools,
    pool_addrs: Box<[Addr]>,
    hash_key: key::HashKey,
    events: Option<Arc<FlowEvents>>,
    /// The second consumer: state sync (the same records, its own queue, so that neither starves the other).
    sync_events: Option<Arc<FlowEvents>>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn atomics(n: usize) -> Box<[AtomicU32]> {
    (0..n).map(|_| AtomicU32::new(0)).collect()
}

impl Table {
    /// A table for `config.max_entries` flows, translating to the egress IPs of `pools`. Allocates the whole
    /// arena now. The index hash is keyed from the arena's address and a process counter (the core reads no
    /// OS randomness); production code should prefer [`with_hash_seed`](Self::with_hash_seed) with a random
    /// seed, so that pods cannot aim many flows at one bucket.
    pub fn new(config: Config, pools: PortPools) -> Table {
        static TABLES: AtomicU64 = AtomicU64::new(0);
        let n = TABLES.fetch_add(1, Ordering::Relaxed);
        let mut t = Self::with_hash_seed(config, pools, n);
        let addr = t.inner.slots.as_ptr() as usize as u64;
        if let Some(inner) = Arc::get_mut(&mut t.inner) {
            inner.hash_key = key::HashKey::new(addr.rotate_left(17) ^ n);
        }
        t
    }

    /// [`new`](Self::new) with the index hash keyed by `seed` (pass 64 random bits).
    pub fn with_hash_seed(config: Config, pools: PortPools, seed: u64) -> Table {
        let max = (config.max_entries as usize).clamp(1, (MARK as usize - 1) * 31 / 32);
        let slack = 64 + max / 1024;
        let pool_ips: Box<[IpAddr]> = (0..pools.len())
            .map(|i| pools.ip(PoolId::try_from(i).unwrap_or(PoolId::MAX)))
            .collect();
        let pool_addrs = pool_ips.iter().map(|&ip| key::addr_words(ip)).collect();
        let t = config.timeouts;
        // Keyed apart from the index (which `new` re-keys after this): pods cannot choose their addresses,
        // so a predictable quota key costs at most a shared quota between two pods.
        let quota = Arc::new(quota::Quota::new(
            (max / 16).next_power_of_two().max(1024),
            key::HashKey::new(seed.rotate_left(31) ^ 0x51ed_270b_2740_d7b3),
            config.max_per_source,
        ));
        let ctx = context::register(context::Context {
            quota: quota.clone(),
            pool_ips,
            udp_ms: ms(t.udp),
            tcp_est_ms: ms(t.tcp_established),
            tcp_trans_ms: ms(t.tcp_transitory),
            icmp_ms: ms(t.icmp),
        });
        let slots: Box<[Flow]> = (0..max + slack).map(|_| Flow::empty(ctx.id())).collect();
        Table {
            inner: Arc::new(Inner {
                slots,
                orig: atomics(max.max(16)),
                reply: atomics(max.max(16)),
                eim: atomics((max / 2).max(16)),
                quota,
                free: CachePadded::new(AtomicU64::new(0)),
                bump: CachePadded::new(AtomicU32::new(0)),
                live: CachePadded::new(AtomicUsize::new(0)),
                cursor: CachePadded::new(AtomicUsize::new(0)),
                clock: CachePadded::new(AtomicU64::new(0)),
                refused: Default::default(),
                takeovers: AtomicU64::new(0),
                max_entries: max,
                reuse_delay: config.port_reuse_delay,
                ctx,
                pools,
                pool_addrs,
                hash_key: key::HashKey::new(seed),
                events: None,
                sync_events: None,
            }),
        }
    }

    /// Sends a [`FlowEvent`] to `events` whenever a flow starts or ends (the NAT translation log). Only
    /// before the table is shared: returns false (and changes nothing) once it has been cloned.
    pub fn set_events(&mut self, events: Arc<FlowEvents>) -> bool {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.events = Some(events);
                true
            }
            None => false,
        }
    }

    /// The event queue given to [`set_events`](Self::set_events).
    pub fn events(&self) -> Option<&Arc<FlowEvents>> {
        self.inner.events.as_ref()
    }

    /// Sends the same records to a second queue, `events`, for state sync (`sync::replica`). Only before
    /// the table is shared, as [`set_events`](Self::set_events).
    pub fn set_sync_events(&mut self, events: Arc<FlowEvents>) -> bool {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.sync_events = Some(events);
                true
            }
            None => false,
        }
    }

    /// The queue given to [`set_sync_events`](Self::set_sync_events).
    pub fn sync_events(&self) -> Option<&Arc<FlowEvents>> {
        self.inner.sync_events.as_ref()
    }

    /// Pins the current thread for epoch-based reclamation ([`crossbeam_epoch::pin`]). Flows returned under a
    /// guard stay valid (never reused for another flow) until the guard is dropped; keep guards short (one
    /// batch of packets).
    pub fn pin(&self) -> Guard {
        crossbeam_epoch::pin()
    }

    /// Outbound packet's flow, by the pod's original tuple. Expiry is judged by the latest time the table was
    /// given (see [`lookup_outbound_at`](Self::lookup_outbound_at)).
    pub fn lookup_outbound<'g>(&'g self, key: &FlowKey, guard: &'g Guard) -> Option<&'g Flow> {
        self.lookup_outbound_at(key, self.inner.now(), guard)
    }

    /// Inbound packet's flow, by the tuple as received from outside (src = remote, dst = egress IP,
    /// dst_port = external port).
    pub fn lookup_inbound<'g>(&'g self, key: &FlowKey, guard: &'g Guard) -> Option<&'g Flow> {
        self.lookup_inbound_at(key, self.inner.now(), guard)
    }

    /// Looks up a batch of outbound tuples (`out[i]` for `keys[i]`; `out` at least as long as `keys`),
    /// overlapping the cache misses of up to 32 lookups: hashes and prefetches all buckets, then loads the
    /// heads and prefetches the first slots, then compares. Several times the throughput of one-by-one
    /// lookups on a table much larger than the cache.
    pub fn lookup_outbound_batch<'g>(
        &'g self,
        keys: &[FlowKey],
        now: Instant,
        out: &mut [Option<&'g Flow>],
        _guard: &'g Guard,
    ) {
        self.inner.batch(List::Orig, keys, now, out);
    }

    /// Batch form of [`lookup_inbound_at`](Self::lookup_inbound_at), like
    /// [`lookup_outbound_batch`](Self::lookup_outbound_batch).
    pub fn lookup_inbound_batch<'g>(
        &'g self,
        keys: &[FlowKey],
        now: Instant,
        out: &mut [Option<&'g Flow>],
        _guard: &'g Guard,
    ) {
        self.inner.batch(List::Reply, keys, now, out);
    }

    /// [`lookup_outbound`](Self::lookup_outbound) with an explicit `now` for the expiry check.
    pub fn lookup_outbound_at<'g>(
        &'g self,
        key: &FlowKey,
        now: Instant,
        _guard: &'g Guard,
    ) -> Option<&'g Flow> {
        let k = Packed::from_key(key)?;
        self.inner.find_orig(&k, k.hash(&self.inner.hash_key), now)
    }

    /// [`lookup_inbound`](Self::lookup_inbound) with an explicit `now` for the expiry check.
    pub fn lookup_inbound_at<'g>(
        &'g self,
        key: &FlowKey,
        now: Instant,
        _guard: &'g Guard,
    ) -> Option<&'g Flow> {
        let k = Packed::from_key(key)?;
        let inner = &*self.inner;
        inner.walk_reply(
            inner
                .bucket(List::Reply, k.hash(&inner.hash_key))
                .load(Ordering::Acquire),
            &k,
            now,
        )
    }

    /// Creates the flow for a new outbound tuple (allocating or reusing the external port of the pod
    /// endpoint); if another thread inserted the same tuple meanwhile, returns that flow. Refusals are counted
    /// ([`refused`](Self::refused)).
    pub fn insert<'g>(
        &'g self,
        new: NewFlow,
        now: Instant,
        rng: &mut Rng,
        guard: &'g Guard,
    ) -> Result<&'g Flow, InsertError> {
        // Each insert draws from its own generator, seeded here, so that a batch can draw for all its flows
        // first and still pick the ports one-by-one inserts would (see `insert_batch`).
        let mut own = Rng::new(rng.next_u64());
        let r = self.inner.insert(&new, now, &mut own, None, guard);
        if let Err(e) = r {
            self.inner.refused[e.index()].fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Installs a flow as another table has it — a peer replica's flow kept as a passive copy, or a
    /// restarted replica's own flow given back by its peers — with the image's external port, TCP tracking
    /// and times. A live flow of the same tuple on the same port is updated to the image (the image's owner
    /// is authoritative). The port is claimed even while it cools after an earlier release: its owner chose
    /// it. Refused with [`InsertError::PortInUse`] when the port belongs to another pod endpoint's mapping,
    /// or the pod endpoint is on another port. A live flow of the tuple on another port (a copy that missed
    /// a change), or one that a race put on another port (its mapping ended or appeared between the check and
    /// the attach), is removed and the install refused the same way, so that the next install of the image
    /// succeeds. Other refusals as for [`insert`](Self::insert) (a TCP flow needs no SYN here). An installed
    /// flow started elsewhere: its start goes to the sync events only, not to the flow log (its end goes to
    /// both).
    pub fn install<'g>(
        &'g self,
        image: &FlowImage,
        now: Instant,
        guard: &'g Guard,
    ) -> Result<&'g Flow, InsertError> {
        let mut rng = Rng::new(0); // an exact port draws nothing
        let r = self
            .inner
            .insert(&image.new, now, &mut rng, Some(image.ext_port), guard)
            .and_then(|f| {
                if f.external_port() != image.ext_port {
                    self.remove(&f.reply_key(), now, guard);
                    return Err(InsertError::PortInUse);
                }
                let ago = |d: Duration| {
                    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                    Instant::from_millis(now.as_millis().saturating_sub(ms))
                };
                f.restore(image.tcp, ago(image.age), ago(image.idle));
                Ok(f)
            });
        if let Err(e) = r {
            self.inner.refused[e.index()].fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Removes the live flow whose reply tuple is `reply` (state sync: the owner reported its end); false when
    /// there is none. Its port goes into the reuse delay if it ended its mapping.
    pub fn remove(&self, reply: &FlowKey, now: Instant, guard: &Guard) -> bool {
        let Some(f) = self.lookup_inbound_at(reply, now, guard) else {
            return false;
        };
        let inner = &self.inner;
        let claimed = inner.claim(f, now, |_| true);
        if claimed {
            inner.finish_removal(inner.index_of(f), f, now, true, false, guard);
            guard.flush();
        }
        claimed
    }

    /// [`insert`](Self::insert) for a batch (`out[i]` for `new[i]`; `out` at least as long as `new`), with the
    /// same results as inserting each in turn (a flow whose tuple equals an earlier one's gets that flow),
    /// overlapping the cache misses of up to [`BATCH`] inserts: the buckets, the quota counters, the port
    /// states and the first chain nodes of all of them are prefetched before any is touched, and each
    /// insert prefetches its reply bucket well before it links into it.
    pub fn insert_batch<'g>(
        &'g self,
        new: &[NewFlow],
        now: Instant,
        rng: &mut Rng,
        out: &mut [Result<&'g Flow, InsertError>],
        guard: &'g Guard,
    ) {
        self.inner.insert_batch(new, now, rng, out, guard);
        for r in out.iter().take(new.len()) {
            if let Err(e) = r {
                self.inner.refused[e.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Incremental sweep: visits at most `budget` slots from where the previous call stopped, removes expired
    /// flows (releasing their ports into the reuse delay), returns how many were removed. Concurrent callers
    /// sweep disjoint ranges.
    pub fn expire(&self, now: Instant, budget: usize) -> usize {
        self.inner.advance_clock(now);
        let guard = crossbeam_epoch::pin();
        let removed = self.inner.sweep(now, budget, &guard);
        if removed > 0 {
            guard.flush();
        }
        removed
    }

    /// Entries in use: live flows (inserted and not removed; expired flows count until swept), plus removed
    /// flows that still anchor the live endpoint-independent mapping of their pod endpoint (they keep their
    /// entry until the mapping ends). At most [`capacity`](Self::capacity).
    pub fn len(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// True when no flow is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most live flows.
    pub fn capacity(&self) -> usize {
        self.inner.max_entries
    }

    /// Calls `f` for every live flow (for the flows listing and metrics; not a snapshot).
    pub fn for_each(&self, _guard: &Guard, mut f: impl FnMut(&Flow)) {
        let inner = &*self.inner;
        let hwm = inner.hwm();
        for slot in &inner.slots[..hwm] {
            // acquire: pairs with the release of `flow::publish`, so the identity fields are initialized
            if phase_of(slot.ctl.load(Ordering::Acquire)) == PHASE_LIVE {
                f(slot);
            }
        }
    }

    /// Calls `f` with the slot index and flow of each live flow among up to `budget` slots from slot `from`,
    /// and returns where the next call should start (0 after the last slot in use): an incremental scan,
    /// for work that must visit every flow now and then without stopping the workers (state sync's
    /// refresh).
    pub fn scan_slots(
        &self,
        from: usize,
        budget: usize,
        _guard: &Guard,
        mut f: impl FnMut(usize, &Flow),
    ) -> usize {
        let inner = &*self.inner;
        let hwm = inner.hwm();
        let from = if from >= hwm { 0 } else { from };
        let end = from.saturating_add(budget).min(hwm);
        for (i, slot) in inner.slots[from..end].iter().enumerate() {
            // acquire: pairs with the release of `flow::publish`, as in `for_each`
            if phase_of(slot.ctl.load(Ordering::Acquire)) == PHASE_LIVE {
                f(from + i, slot);
            }
        }
        if end >= hwm {
            0
        } else {
            end
        }
    }

    /// The slot index of a flow of this table (as [`scan_slots`](Self::scan_slots) numbers them).
    pub fn slot_of(&self, f: &Flow) -> usize {
        self.inner.index_of(f) as usize
    }

    /// The number of slots (what [`scan_slots`](Self::scan_slots) may number).
    pub fn slots(&self) -> usize {
        self.inner.slots.len()
    }

    /// The port pools.
    pub fn pools(&self) -> &PortPools {
        &self.inner.pools
    }

    /// Refused inserts per cause.
    pub fn refused(&self) -> Refused {
        let r = |i: usize| self.inner.refused[i].load(Ordering::Relaxed);
        Refused {
            full: r(0),
            source_quota: r(1),
            ports_exhausted: r(2),
            no_pool: r(3),
            port_in_use: r(4),
        }
    }

    /// External TCP ports taken over from finished flows (reset, or a FIN each way) by new connections while
    /// the pool was exhausted, since the table was created.
    pub fn port_takeovers(&self) -> u64 {
        self.inner.takeovers.load(Ordering::Relaxed)
    }

    /// Bytes allocated by the table (arena, indexes, sketch; not the lazily allocated port lanes).
    pub fn allocated_bytes(&self) -> usize {
        let i = &*self.inner;
        core::mem::size_of_val(&*i.slots)
            + 4 * (i.orig.len() + i.reply.len() + i.eim.len())
            + i.quota.bytes()
    }
}

impl Inner {
    fn now(&self) -> Instant {
        Instant::from_millis(self.clock.load(Ordering::Relaxed))
    }

    fn advance_clock(&self, now: Instant) {
        let t = now.as_millis();
        if self.clock.load(Ordering::Relaxed) < t {
            self.clock.fetch_max(t, Ordering::Relaxed);
        }
    }

    #[inline]
    fn slot(&self, link: u32) -> &Flow {
        &self.slots[((link & !MARK) - 1) as usize]
    }

    fn hwm(&self) -> usize {
        (self.bump.load(Ordering::Acquire) as usize).min(self.slots.len())
    }

    fn buckets(&self, l: List) -> &[AtomicU32] {
        match l {
            List::Orig => &self.orig,
            List::Reply => &self.reply,
            List::Eim => &self.eim,
        }
    }

    #[inline]
    fn bucket(&self, l: List, h: u64) -> &AtomicU32 {
        let b = self.buckets(l);
        &b[key::reduce(h, b.len())]
    }

    fn link(f: &Flow, l: List) -> &AtomicU32 {
        match l {
            List::Orig => &f.next_orig,
            List::Reply => &f.next_reply,
            List::Eim => &f.next_eim,
        }
    }

    fn batch<'g>(&'g self, l: List, keys: &[FlowKey], now: Instant, out: &mut [Option<&'g Flow>]) {
        const N: usize = BATCH;
        for (keys, out) in keys.chunks(N).zip(out.chunks_mut(N)) {
            let mut packed = [None; N];
            let mut heads = [NIL; N];
            let buckets = self.buckets(l);
            let mut where_ = [0usize; N];
            for (i, k) in keys.iter().enumerate() {
                packed[i] = Packed::from_key(k);
                if let Some(p) = &packed[i] {
                    where_[i] = key::reduce(p.hash(&self.hash_key), buckets.len());
                    prefetch((&buckets[where_[i]] as *const AtomicU32).cast());
                }
            }
            for i in 0..keys.len() {
                if packed[i].is_some() {
                    heads[i] = buckets[where_[i]].load(Ordering::Acquire);
                    if heads[i] != NIL {
                        let f = self.slot(heads[i]);
                        let p = (f as *const Flow).cast::<u8>();
                        prefetch(p);
                        prefetch(p.wrapping_add(63)); // the 64 lookup bytes may straddle two lines
                    }
                }
            }
            // Walk all chains one node per round, prefetching every chain's next node before the next
            // round, so that the misses of second and later nodes overlap too.
            let mut cur = heads;
            for o in out.iter_mut().take(keys.len()) {
                *o = None;
            }
            loop {
                let mut more = false;
                for i in 0..keys.len() {
                    let (Some(k), true) = (&packed[i], cur[i] != NIL) else {
                        continue;
                    };
                    let f = self.slot(cur[i]);
                    let next = Self::link(f, l).load(Ordering::Acquire);
                    let hit = next & MARK == 0
                        && match l {
                            List::Orig => f.matches_orig(k),
                            _ => f.matches_reply(k, &self.pool_addrs),
                        }
                        && Self::visible(f, now);
                    if hit {
                        out[i] = Some(f);
                        cur[i] = NIL;
                        // The caller goes on to the slot's tail (counters, node, uplink): start that miss now
                        // so it overlaps with the rest of the batch.
                        let p = (f as *const Flow).cast::<u8>();
                        prefetch(p.wrapping_add(64));
                        prefetch(p.wrapping_add(core::mem::size_of::<Flow>() - 1));
                    } else {
                        cur[i] = next & !MARK;
                        if cur[i] != NIL {
                            let p = (self.slot(cur[i]) as *const Flow).cast::<u8>();
                            prefetch(p);
                            prefetch(p.wrapping_add(63));
                            more = true;
                        }
                    }
                }
                if !more {
                    break;
                }
            }
        }
    }

    #[inline]
    fn walk_orig(&self, head: u32, k: &Packed, now: Instant) -> Option<&Flow> {
        let mut cur = head;
        while cur != NIL {
            let f = self.slot(cur);
            let next = f.next_orig.load(Ordering::Acquire);
            if next & MARK == 0 && f.matches_orig(k) && Self::visible(f, now) {
                return Some(f);
            }
            cur = next & !MARK;
        }
        None
    }

    #[inline]
    fn walk_reply(&self, head: u32, k: &Packed, now: Instant) -> Option<&Flow> {
        let mut cur = head;
        while cur != NIL {
            let f = self.slot(cur);
            let next = f.next_reply.load(Ordering::Acquire);
            if next & MARK == 0 && f.matches_reply(k, &self.pool_addrs) && Self::visible(f, now) {
                return Some(f);
            }
            cur = next & !MARK;
        }
        None
    }

    /// Not removed and not expired.
    #[inline]
    fn visible(f: &Flow, now: Instant) -> bool {
        let ctl = f.ctl.load(Ordering::Relaxed);
        phase_of(ctl) != PHASE_DEAD && !f.expired_at(ctl, now)
    }

    #[inline]
    fn find_orig(&self, k: &Packed, h: u64, now: Instant) -> Option<&Flow> {
        self.walk_orig(self.bucket(List::Orig, h).load(Ordering::Acquire), k, now)
    }

    /// Walks the orig list from `head` for `k`: `Ok(Some(live))`, `Ok(None)` (absent), or `Err(())` when an
    /// expired duplicate was found and removed (the caller re-reads the head and walks again).
    fn scan_orig(
        self: &Arc<Self>,
        head: u32,
        k: &Packed,
        now: Instant,
        guard: &Guard,
    ) -> Result<Option<u32>, ()> {
        let mut cur = head;
        while cur != NIL {
            let f = self.slot(cur);
            let next = f.next_orig.load(Ordering::Acquire);
            if next & MARK == 0 && f.matches_orig(k) {
                let ctl = f.ctl.load(Ordering::Acquire);
                match phase_of(ctl) {
                    PHASE_INIT => return Ok(Some(cur)),
                    PHASE_LIVE if !f.expired_at(ctl, now) => return Ok(Some(cur)),
                    PHASE_LIVE => {
                        self.kill(cur - 1, now, guard);
                        return Err(());
                    }
                    _ => {} // removed (claimed), not yet marked: absent
                }
            }
            cur = next & !MARK;
        }
        Ok(None)
    }

    fn insert<'g>(
        self: &'g Arc<Self>,
        new: &NewFlow,
        now: Instant,
        rng: &mut Rng,
        exact: Option<u16>,
        guard: &'g Guard,
    ) -> Result<&'g Flow, InsertError> {
        let mut retired = false;
        self.advance_clock(now);
        let r = self.insert_flow(new, now, rng, exact, guard, &mut retired);
        if retired {
            // Slots retired on this path (an expired duplicate replaced, the inline sweep, a lost race) were
            // deferred into this thread's local bag, which crossbeam only hands over when it holds 64 of them:
            // hand them over now so that they come back to the free list (rare path).
            guard.flush();
        }
        r
    }

    /// One insert, both halves; with `exact`, the flow gets that external port or is refused
    /// ([`Table::install`]).
    fn insert_flow<'g>(
        self: &'g Arc<Self>,
        new: &NewFlow,
        now: Instant,
        rng: &mut Rng,
        exact: Option<u16>,
        guard: &'g Guard,
        retired: &mut bool,
    ) -> Result<&'g Flow, InsertError> {
        let (k, pool) = self.new_key(new)?;
        let h = k.hash(&self.hash_key);
        let ek = EimKey {
            src: k.src,
            sport: k.sport,
            tag: k.tag,
            pool,
        };
        let eh = ek.hash(&self.hash_key);
        // start fetching the mapping's bucket while the orig list is walked
        prefetch((self.bucket(List::Eim, eh) as *const AtomicU32).cast());
        match self.insert_begin(new, &k, h, &ek, eh, now, rng, exact, guard, retired)? {
            Begun::Found(f) => Ok(f),
            Begun::Filled(b) => self.insert_end(&b, now, guard, retired),
        }
    }

    /// The index form of a new flow's tuple and its pool.
    #[inline]
    fn new_key(&self, new: &NewFlow) -> Result<(Packed, PoolId), InsertError> {
        let k = Packed::from_key(&new.orig).ok_or(InsertError::NoPool)?;
        let pool = if new.egress_ip.is_ipv4() == new.orig.src.is_ipv4() {
            self.pools.pool_id(new.egress_ip, new.orig.proto)
        } else {
            None
        }
        .ok_or(InsertError::NoPool)?;
        Ok((k, pool))
    }

    /// The first half of an insert, steps (1)–(3) of the module docs: the orig list is walked, the port,
    /// capacity, quota and slot are taken, the slot is filled and its mapping attached (published: other
    /// inserts of the same pod endpoint join it), and the reply bucket is prefetched. The slot is not yet in
    /// the orig or reply list; [`insert_end`](Self::insert_end) links it. Between the two halves of one insert
    /// only first halves of inserts of *other* tuples may run (see [`insert_batch`](Self::insert_batch)).
    #[allow(clippy::too_many_arguments)] // the keys and hashes a batch computed ahead
    #[inline]
    fn insert_begin<'g>(
        self: &'g Arc<Self>,
        new: &NewFlow,
        k: &Packed,
        h: u64,
        ek: &EimKey,
        eh: u64,
        now: Instant,
        rng: &mut Rng,
        exact: Option<u16>,
        guard: &'g Guard,
        retired: &mut bool,
    ) -> Result<Begun<'g>, InsertError> {
        let bucket = self.bucket(List::Orig, h);
        let eb = self.bucket(List::Eim, eh);
        let pool = ek.pool;
        // (1) already there?
        loop {
            match self.scan_orig(bucket.load(Ordering::Acquire), k, now, guard) {
                Ok(Some(link)) => return Ok(Begun::Found(self.slot(link))),
                Ok(None) => break,
                Err(()) => *retired = true,
            }
        }
        // (2) a port first when the endpoint has no mapping yet, so that an exhausted pool refuses before
        // anything else is reserved; then capacity, quota, slot
        let proto = new.orig.proto;
        let anchor = self.find_anchor(eb.load(Ordering::Acquire), ek, false);
        let port = if let Some(want) = exact {
            // an installed flow keeps the port its owner chose (see `Table::install`)
            match anchor {
                Some(a) if a.external_port() != want => return Err(InsertError::PortInUse),
                Some(_) => None,
                None if self.pools.claim(pool, proto, want) => Some(Taken::Fresh(want)),
                None => return Err(InsertError::PortInUse),
            }
        } else if anchor.is_none() {
            Some(match self.take_port(pool, proto, now, rng) {
                Ok(p) => Taken::Fresh(p),
                // TCP flows start with the pod's SYN (the pipeline creates no TCP flow otherwise)
                // a pod over its quota would be refused below: do not end another flow for it
                Err(e) if proto == Proto::Tcp && !self.quota.full(&k.src) => {
                    *retired = true;
                    Taken::Over(self.take_over(k, pool, now, rng, guard).ok_or(e)?)
                }
                Err(e) => return Err(e),
            })
        } else {
            None
        };
        let give_back = |port: Option<Taken>| self.give_back(pool, proto, port, now);
        if !self.reserve_entry() {
            *retired |= self.sweep(now, 256, guard) > 0;
            if !self.reserve_entry() {
                give_back(port);
                return Err(InsertError::Full);
            }
        }
        if !self.quota.acquire(&k.src) {
            self.live.fetch_sub(1, Ordering::Relaxed);
            give_back(port);
            return Err(InsertError::SourceQuota);
        }
        let Some(idx) = self.alloc_slot() else {
            self.quota.release(&k.src);
            self.live.fetch_sub(1, Ordering::Relaxed);
            give_back(port);
            return Err(InsertError::Full);
        };
        let f = &self.slots[idx as usize];
        f.init(k, pool, new.node, new.uplink, now);
        // (3) endpoint-independent mapping
        if let Err(e) = self.attach_mapping(idx, f, port, now, rng) {
            self.quota.release(&k.src);
            self.live.fetch_sub(1, Ordering::Relaxed);
            self.push_free(idx); // never published
            return Err(e);
        }
        let rk = f.reply_packed(self.pool_addrs[usize::from(pool)]);
        let rh = rk.hash(&self.hash_key);
        prefetch((self.bucket(List::Reply, rh) as *const AtomicU32).cast());
        Ok(Begun::Filled(Filled {
            idx,
            k: *k,
            h,
            rh,
            installed: exact.is_some(),
        }))
    }

    /// The second half of an insert, steps (4) and (5): link into the orig list (the linearization point;
    /// a flow of the same tuple that another thread linked first wins, and this slot is given back), then
    /// into the reply list, then live.
    fn insert_end<'g>(
        self: &'g Arc<Self>,
        b: &Filled,
        now: Instant,
        guard: &'g Guard,
        retired: &mut bool,
    ) -> Result<&'g Flow, InsertError> {
        let Filled {
            idx,
            ref k,
            h,
            rh,
            installed,
        } = *b;
        let f = &self.slots[idx as usize];
        let bucket = self.bucket(List::Orig, h);
        // (4) link into the orig list; the successful CAS is the linearization point
        f.ctl.fetch_add(HOLD, Ordering::Relaxed);
        loop {
            let head = bucket.load(Ordering::Acquire);
            match self.scan_orig(head, k, now, guard) {
                Err(()) => {
                    *retired = true;
                    continue;
                }
                Ok(Some(winner)) => {
                    // lost the race: give everything back, hand out the winner
                    f.ctl.fetch_sub(HOLD, Ordering::Relaxed);
                    flow::set_phase(&f.ctl, PHASE_INIT, PHASE_DEAD);
                    *retired = true;
                    self.finish_removal(idx, f, now, false, false, guard);
                    return Ok(self.slot(winner));
                }
                Ok(None) => {}
            }
            f.next_orig.store(head, Ordering::Relaxed);
            if bucket
                .compare_exchange(head, idx + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break;
            }
        }
        // (5) reply list, then live
        let rb = self.bucket(List::Reply, rh);
        f.ctl.fetch_add(HOLD, Ordering::Relaxed);
        let mut head = rb.load(Ordering::Acquire);
        loop {
            f.next_reply.store(head, Ordering::Relaxed);
            match rb.compare_exchange_weak(head, idx + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        flow::publish(&f.ctl);
        if installed {
            // State sync tells the peers about it; the flow log logged its start where it started.
            if let Some(q) = &self.sync_events {
                q.push(FlowEvent::of(f, FlowEventKind::Start, now));
            }
        } else {
            self.emit(f, FlowEventKind::Start, now);
        }
        Ok(f)
    }

    /// [`Table::insert_batch`]: per chunk of [`BATCH`] flows, first hashes every tuple and prefetches what
    /// an insert touches at random (orig and mapping buckets, quota counters, the first port state it will
    /// probe), then the first node of each orig and mapping chain, then runs the first half of every insert
    /// (each prefetching its reply bucket) and finally the second halves, all in input order. A tuple equal
    /// to an earlier one of the chunk (or with no pool) is inserted whole, after the second halves of the
    /// inserts before it, exactly as one-by-one inserts would see it.
    ///
    /// Same results as [`insert`](Self::insert) on each flow in turn: the operations on the table are the
    /// same, in the same order, except that the first halves of later inserts run before the second halves
    /// of earlier ones, and a first half neither reads nor changes what a second half writes for another
    /// tuple (its orig and reply links and its phase, INIT until then: a sweep or a takeover only ends LIVE
    /// flows). Each insert draws its randomness from its own generator seeded from `rng`, once per flow in
    /// input order, as [`Table::insert`] does.
    fn insert_batch<'g>(
        self: &'g Arc<Self>,
        new: &[NewFlow],
        now: Instant,
        rng: &mut Rng,
        out: &mut [Result<&'g Flow, InsertError>],
        guard: &'g Guard,
    ) {
        self.advance_clock(now);
        let mut retired = false;
        for (new, out) in new.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
            self.insert_chunk(new, now, rng, out, guard, &mut retired);
        }
        if retired {
            guard.flush(); // as in `insert`
        }
    }

    fn insert_chunk<'g>(
        self: &'g Arc<Self>,
        new: &[NewFlow],
        now: Instant,
        rng: &mut Rng,
        out: &mut [Result<&'g Flow, InsertError>],
        guard: &'g Guard,
        retired: &mut bool,
    ) {
        const EMPTY: Packed = Packed {
            src: [0; 2],
            dst: [0; 2],
            sport: 0,
            dport: 0,
            tag: 0,
        };
        let n = new.len().min(out.len());
        let mut rngs: [Rng; BATCH] = core::array::from_fn(|_| Rng::new(0));
        let mut keys = [EMPTY; BATCH];
        let mut eks = [EimKey {
            src: [0; 2],
            sport: 0,
            tag: 0,
            pool: 0,
        }; BATCH];
        let mut hashes = [(0u64, 0u64); BATCH];
        // whole: insert this one whole, in turn (an earlier tuple of the chunk is equal, or it has no pool)
        let mut whole = [false; BATCH];
        // a tiny open-addressing set of the chunk's tuples, by hash, to find the equal ones in O(n)
        let mut seen = [0u8; 2 * BATCH];
        for i in 0..n {
            rngs[i] = Rng::new(rng.next_u64());
            let Ok((k, pool)) = self.new_key(&new[i]) else {
                whole[i] = true;
                continue;
            };
            let h = k.hash(&self.hash_key);
            let mut s = (h >> 58) as usize; // 2 * BATCH = 64 = 2⁶ cells
            loop {
                match seen[s] {
                    0 => {
                        #[allow(clippy::cast_possible_truncation)] // i < BATCH
                        let tag = i as u8 + 1;
                        seen[s] = tag;
                        break;
                    }
                    j if keys[usize::from(j) - 1] == k => {
                        whole[i] = true;
                        break;
                    }
                    _ => s = (s + 1) % (2 * BATCH),
                }
            }
            let ek = EimKey {
                src: k.src,
                sport: k.sport,
                tag: k.tag,
                pool,
            };
            let eh = ek.hash(&self.hash_key);
            keys[i] = k;
            eks[i] = ek;
            hashes[i] = (h, eh);
            if whole[i] {
                continue;
            }
            prefetch((self.bucket(List::Orig, h) as *const AtomicU32).cast());
            prefetch((self.bucket(List::Eim, eh) as *const AtomicU32).cast());
            self.quota.prefetch(&k.src);
            self.pools.prefetch_start(pool, new[i].orig.proto, &rngs[i]);
        }
        self.prefetch_next_slots(n);
        // the first node of every chain (both lines of its 64 lookup bytes)
        let node = |link: u32| {
            if link != NIL {
                let p = (self.slot(link) as *const Flow).cast::<u8>();
                prefetch(p);
                prefetch(p.wrapping_add(63));
            }
        };
        let mut eim_heads = [NIL; BATCH];
        for i in 0..n {
            if !whole[i] {
                let (h, eh) = hashes[i];
                node(self.bucket(List::Orig, h).load(Ordering::Acquire));
                eim_heads[i] = self.bucket(List::Eim, eh).load(Ordering::Acquire);
                node(eim_heads[i]);
            }
        }
        // and the second node of the mapping chains (two entries per mapping bucket: second nodes are common)
        for &head in &eim_heads[..n] {
            if head != NIL {
                node(self.slot(head).next_eim.load(Ordering::Relaxed) & !MARK);
            }
        }
        let mut filled = [None; BATCH];
        let mut pending = 0..0; // inserts whose second half has not run yet
        for i in 0..n {
            if whole[i] {
                for j in pending.clone() {
                    if let Some(b) = filled[j].take() {
                        out[j] = self.insert_end(&b, now, guard, retired);
                    }
                }
                pending = i + 1..i + 1;
                out[i] = self.insert_flow(&new[i], now, &mut rngs[i], None, guard, retired);
                continue;
            }
            let (h, eh) = hashes[i];
            pending.end = i + 1;
            match self.insert_begin(
                &new[i],
                &keys[i],
                h,
                &eks[i],
                eh,
                now,
                &mut rngs[i],
                None,
                guard,
                retired,
            ) {
                Ok(Begun::Found(f)) => out[i] = Ok(f),
                Ok(Begun::Filled(b)) => filled[i] = Some(b),
                Err(e) => out[i] = Err(e),
            }
        }
        for j in pending {
            if let Some(b) = filled[j].take() {
                out[j] = self.insert_end(&b, now, guard, retired);
            }
        }
    }

    /// A port of `pool` for a new mapping.
    fn take_port(
        &self,
        pool: PoolId,
        proto: Proto,
        now: Instant,
        rng: &mut Rng,
    ) -> Result<u16, InsertError> {
        let start = self.pools.draw_start(pool, proto, rng);
        self.pools
            .allocate(pool, proto, now, self.reuse_delay, start)
            .ok_or(InsertError::PortsExhausted)
    }

    /// Returns a port taken for a mapping that was never published. A fresh one is free again at once (no
    /// packet was translated to it); one taken over from a finished flow goes into the reuse delay, as it
    /// would have without the takeover.
    fn give_back(&self, pool: PoolId, proto: Proto, port: Option<Taken>, now: Instant) {
        match port {
            Some(Taken::Fresh(p)) => self.pools.release_unused(pool, proto, p),
            Some(Taken::Over(p)) => self.pools.release(pool, proto, p, now),
            None => {}
        }
    }

    /// The pool of a new TCP connection is exhausted: take over the external port of a *finished* flow (reset,
    /// or a FIN each way: [`TcpState::Closed`], [`TcpState::TimeWait`]). First toward the new connection's
    /// remote endpoint, by [`TAKEOVER_PROBES`] reply-index lookups on random ports; then toward any remote
    /// endpoint: a port that can be taken over belongs to a mapping with one flow, which is then the
    /// mapping's anchor, so the candidates are found by walking the mapping index from a random bucket: [`TAKEOVER_BUCKETS`] buckets
    /// at most (sequential reads), and at most [`TAKEOVER_CANDIDATES`] anchors of this pool examined (one
    /// random slot read each). RFC 7857 §3.2 lets a NAT reuse a port in TIME_WAIT for a new SYN; the kernel's
    /// nf_nat goes further and shares a port between remote endpoints all the time. The finished flow is
    /// removed (claimed LIVE → DEAD like an expiry) and, as it held the only reference on its mapping, the
    /// port passes to the caller still owned, skipping the reuse delay; a port whose mapping lives on (the old
    /// pod endpoint still talks to others through it) is left alone. Because the port only ever has one
    /// owning mapping, no two live flows share a reply tuple. Nothing is recorded for this on the insert
    /// path: the search costs only when the pool is exhausted.
    fn take_over(
        self: &Arc<Self>,
        k: &Packed,
        pool: PoolId,
        now: Instant,
        rng: &mut Rng,
        guard: &Guard,
    ) -> Option<u16> {
        // First the cheap case: a finished flow toward the new connection's own remote endpoint, found by
        // looking up the reply index for its would-be reply tuple on random ports. It finds one wherever
        // connections toward one server fill the pool, however large the table.
        let range = self.pools.range();
        for _ in 0..TAKEOVER_PROBES {
            #[allow(clippy::cast_possible_truncation)] // below(n) < n ≤ 65536 and min + it ≤ max
            let port = range.min.wrapping_add(rng.below(range.len().max(1)) as u16);
            let rk = Packed {
                src: k.dst,
                dst: self.pool_addrs[usize::from(pool)],
                sport: k.dport,
                dport: port,
                tag: k.tag,
            };
            let head = self
                .bucket(List::Reply, rk.hash(&self.hash_key))
                .load(Ordering::Acquire);
            let Some(old) = self.walk_reply(head, &rk, now) else {
                continue;
            };
            if self.claim_finished(old, pool, port, now).is_some() {
                if let Some(p) =
                    self.finish_removal(self.index_of(old), old, now, true, true, guard)
                {
                    self.takeovers.fetch_add(1, Ordering::Relaxed);
                    return Some(p);
                }
            }
        }
        // Then any remote endpoint: the anchors of the mapping index. With few ports in a large table the
        // anchors are sparse there, which is why the probes above come first.
        let n = self.eim.len();
        #[allow(clippy::cast_possible_truncation)] // n = max_entries / 2 < 2³¹
        let start = rng.below(n as u32) as usize;
        let mut examined = 0;
        for i in 0..n.min(TAKEOVER_BUCKETS) {
            let mut cur = self.eim[(start + i) % n].load(Ordering::Acquire);
            while cur != NIL {
                let idx = (cur & !MARK) - 1;
                let a = self.slot(cur);
                let next = a.next_eim.load(Ordering::Acquire);
                cur = next & !MARK;
                if next & MARK != 0 || a.pool() != pool || a.proto() != Proto::Tcp {
                    continue;
                }
                let port = a.external_port();
                if self.claim_finished(a, pool, port, now).is_some() {
                    if let Some(p) = self.finish_removal(idx, a, now, true, true, guard) {
                        self.takeovers.fetch_add(1, Ordering::Relaxed);
                        return Some(p);
                    }
                }
                examined += 1;
                if examined == TAKEOVER_CANDIDATES {
                    return None;
                }
            }
        }
        None
    }

    /// One candidate of [`take_over`](Self::take_over): claims `f` (LIVE → DEAD, its end reported) when it is a
    /// finished TCP flow that anchors the mapping of `port` in `pool` and is its only user (a flow may still
    /// join the mapping until it ends: then the removal hands no port over). The claim checks again that the
    /// flow is live and finished.
    fn claim_finished(&self, f: &Flow, pool: PoolId, port: u16, now: Instant) -> Option<()> {
        let c = f.ctl.load(Ordering::Acquire);
        if phase_of(c) != PHASE_LIVE
            || !flow::tcp_finished(c)
            || !f.is_tcp_on(pool, port)
            || f.map_refs.load(Ordering::Acquire) != 1
        {
            return None;
        }
        self.claim(f, now, flow::tcp_finished).then_some(())
    }

    /// The arena index of a slot.
    fn index_of(&self, f: &Flow) -> u32 {
        let off = (f as *const Flow as usize) - (self.slots.as_ptr() as usize);
        #[allow(clippy::cast_possible_truncation)] // slots.len() < 2³¹
        let idx = (off / core::mem::size_of::<Flow>()) as u32;
        idx
    }

    /// Joins the live mapping of the flow's pod endpoint or creates one (this slot becomes its anchor), with
    /// `port` if the caller already took one (given back unused if a mapping turns up). On error no port is
    /// held.
    fn attach_mapping(
        &self,
        idx: u32,
        f: &Flow,
        port: Option<Taken>,
        now: Instant,
        rng: &mut Rng,
    ) -> Result<(), InsertError> {
        let ek = f.eim_key();
        let proto = f.proto();
        let bucket = self.bucket(List::Eim, ek.hash(&self.hash_key));
        let mut mine = port;
        loop {
            let head = bucket.load(Ordering::Acquire);
            if let Some(anchor) = self.find_anchor(head, &ek, true) {
                self.give_back(ek.pool, proto, mine, now);
                f.set_ext_port(anchor.external_port());
                return Ok(());
            }
            let taken = match mine {
                Some(t) => t,
                None => Taken::Fresh(self.take_port(ek.pool, proto, now, rng)?),
            };
            mine = Some(taken);
            let port = taken.port();
            f.set_ext_port(port);
            f.map_refs.store(1, Ordering::Relaxed);
            f.next_eim.store(head, Ordering::Relaxed);
            f.ctl.fetch_add(HOLD, Ordering::Relaxed);
            if bucket
                .compare_exchange(head, idx + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
            f.ctl.fetch_sub(HOLD, Ordering::Relaxed);
            f.map_refs.store(0, Ordering::Relaxed);
        }
    }

    /// The live anchor of `ek` reachable from `head`; with `join`, takes a reference on it (only while its
    /// count is non-zero: a mapping never comes back to life).
    fn find_anchor(&self, head: u32, ek: &EimKey, join: bool) -> Option<&Flow> {
        let mut cur = head;
        while cur != NIL {
            let a = self.slot(cur);
            let next = a.next_eim.load(Ordering::Acquire);
            if next & MARK == 0 && a.matches_eim(ek) {
                let ok = if join {
                    a.map_refs
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                            (r != 0).then_some(r + 1)
                        })
                        .is_ok()
                } else {
                    a.map_refs.load(Ordering::Acquire) != 0
                };
                if ok {
                    return Some(a);
                }
            }
            cur = next & !MARK;
        }
        None
    }

    /// Drops one flow's reference on its mapping; the last one ends the mapping. `used`: whether the flow was
    /// ever published (a flow that lost its insert race was not, so a mapping it created and alone held goes
    /// back to the pool without the reuse delay). True when `f` is the anchor of a mapping that lives on: the
    /// slot then keeps its capacity unit until the mapping ends, and the flow whose release ends the mapping
    /// gives that unit back.
    ///
    /// With `hand_over`, a port freed by the last reference is not given back to the pool but returned, still
    /// owned, for the caller's new mapping ([`take_over`](Self::take_over)).
    fn release_mapping(
        self: &Arc<Self>,
        f: &Flow,
        now: Instant,
        used: bool,
        hand_over: bool,
        guard: &Guard,
    ) -> (bool, Option<u16>) {
        let ek = f.eim_key();
        let h = ek.hash(&self.hash_key);
        let bucket = self.bucket(List::Eim, h);
        let Some(anchor) = self.find_anchor(bucket.load(Ordering::Acquire), &ek, false) else {
            debug_assert!(false, "flow without a live mapping");
            return (false, None);
        };
        let mine = core::ptr::eq(anchor, f);
        if anchor.map_refs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return (mine, None);
        }
        anchor.next_eim.fetch_or(MARK, Ordering::AcqRel);
        let port = anchor.external_port();
        let handed = if hand_over {
            Some(port)
        } else {
            if mine && !used {
                self.pools.release_unused(ek.pool, anchor.proto(), port);
            } else {
                self.pools.release(ek.pool, anchor.proto(), port, now);
            }
            None
        };
        if !mine {
            // the anchor's own flow was removed earlier (it held a reference until then) and kept its unit
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        self.unlink(List::Eim, bucket, guard);
        (false, handed)
    }

    /// Removes slot `idx` if it is live and expired at `now`. True if this call removed it.
    fn kill(self: &Arc<Self>, idx: u32, now: Instant, guard: &Guard) -> bool {
        let f = &self.slots[idx as usize];
        let claimed = self.claim(f, now, |c| f.expired_at(c, now));
        if claimed {
            self.finish_removal(idx, f, now, true, false, guard);
        }
        claimed
    }

    /// Claims live flow `f` for removal when `also` holds for its control word: the CAS LIVE → DEAD, the
    /// linearization point of a removal (only the claimer does the accounting), and its end reported. True
    /// if this call claimed it; the caller then calls [`finish_removal`](Self::finish_removal).
    fn claim(&self, f: &Flow, now: Instant, also: impl Fn(u64) -> bool) -> bool {
        let claimed = f
            .ctl
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (phase_of(c) == PHASE_LIVE && also(c)).then(|| flow::with_phase(c, PHASE_DEAD))
            })
            .is_ok();
        if claimed {
            // Before the removal: the slot's fields stay valid until it is retired.
            self.emit(f, FlowEventKind::End, now);
        }
        claimed
    }

    /// Sends the record of `f` to the event queues there are.
    fn emit(&self, f: &Flow, kind: FlowEventKind, now: Instant) {
        if self.events.is_none() && self.sync_events.is_none() {
            return;
        }
        let event = FlowEvent::of(f, kind, now);
        for q in [&self.events, &self.sync_events].into_iter().flatten() {
            q.push(event);
        }
    }

    /// Accounting and unlinking after a claim (phase now DEAD). With `hand_over`, the port of a mapping this
    /// removal ends is returned still owned (see [`release_mapping`](Self::release_mapping)).
    fn finish_removal(
        self: &Arc<Self>,
        idx: u32,
        f: &Flow,
        now: Instant,
        linked: bool,
        hand_over: bool,
        guard: &Guard,
    ) -> Option<u16> {
        f.next_orig.fetch_or(MARK, Ordering::AcqRel);
        f.next_reply.fetch_or(MARK, Ordering::AcqRel);
        let ok = f.orig_packed();
        // A finished TCP flow gave its unit back when it finished (`quota.rs`); the phase is DEAD now, so the
        // TCP state no longer changes.
        if !flow::tcp_finished(f.ctl.load(Ordering::Acquire)) {
            self.quota.release(&ok.src);
        }
        let (keeps_unit, handed) = self.release_mapping(f, now, linked, hand_over, guard);
        if !keeps_unit {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
        if linked {
            self.unlink(
                List::Orig,
                self.bucket(List::Orig, ok.hash(&self.hash_key)),
                guard,
            );
            let rk = f.reply_packed(self.pool_addrs[usize::from(f.pool())]);
            self.unlink(
                List::Reply,
                self.bucket(List::Reply, rk.hash(&self.hash_key)),
                guard,
            );
        }
        self.drop_hold(idx, guard);
        handed
    }

    /// Walks list `l` from `bucket`, physically unlinking every marked node (Harris): CAS the predecessor's
    /// link from the node to its successor; restart from the head when the predecessor is itself marked.
    fn unlink(self: &Arc<Self>, l: List, bucket: &AtomicU32, guard: &Guard) {
        'restart: loop {
            let mut pred = bucket;
            let mut cur = pred.load(Ordering::Acquire);
            loop {
                if cur & MARK != 0 {
                    continue 'restart; // predecessor got deleted under us
                }
                if cur == NIL {
                    return;
                }
                let node = self.slot(cur);
                let next = Self::link(node, l).load(Ordering::Acquire);
                if next & MARK != 0 {
                    match pred.compare_exchange(
                        cur,
                        next & !MARK,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            self.drop_hold(cur - 1, guard);
                            cur = next & !MARK;
                        }
                        Err(_) => continue 'restart,
                    }
                } else {
                    pred = Self::link(node, l);
                    cur = next;
                }
            }
        }
    }

    /// Drops one hold of slot `idx`; the last one retires the slot through the epoch.
    fn drop_hold(self: &Arc<Self>, idx: u32, guard: &Guard) {
        let prev = self.slots[idx as usize]
            .ctl
            .fetch_sub(HOLD, Ordering::AcqRel);
        debug_assert!(holds_of(prev) >= 1);
        if holds_of(prev) == 1 {
            let me = Arc::clone(self);
            guard.defer(move || me.push_free(idx));
        }
    }

    fn reserve_entry(&self) -> bool {
        self.live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_entries).then_some(n + 1)
            })
            .is_ok()
    }

    /// Pops a free slot (Treiber stack, head = tag << 32 | slot + 1), else takes a never-used one.
    fn alloc_slot(&self) -> Option<u32> {
        let mut head = self.free.load(Ordering::Acquire);
        loop {
            #[allow(clippy::cast_possible_truncation)] // low half is the link
            let top = head as u32;
            if top == NIL {
                break;
            }
            // A stale `next` (the slot was popped and reused meanwhile) fails the CAS through the tag.
            let next = self.slot(top).next_orig.load(Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(next);
            match self
                .free
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // The next insert pops `next`, reading its link and then filling it: start that miss now.
                    if next != NIL {
                        self.prefetch_slot(next - 1);
                    }
                    return Some(top - 1);
                }
                Err(h) => head = h,
            }
        }
        let n = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.bump
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |b| {
                (b < n).then_some(b + 1)
            })
            .ok()
    }

    /// Starts fetching all of slot `idx` (112 bytes: two or three cache lines), which is about to be filled.
    #[inline]
    fn prefetch_slot(&self, idx: u32) {
        if let Some(f) = self.slots.get(idx as usize) {
            let p = (f as *const Flow).cast::<u8>();
            prefetch(p);
            prefetch(p.wrapping_add(64));
            prefetch(p.wrapping_add(core::mem::size_of::<Flow>() - 1));
        }
    }

    /// Starts fetching the slots the next `n` inserts will probably take: the free list's top (each pop
    /// prefetches the next one), else the next never-used slots. A hint only: other threads may take them.
    fn prefetch_next_slots(&self, n: usize) {
        #[allow(clippy::cast_possible_truncation)] // low half is the link
        let top = self.free.load(Ordering::Relaxed) as u32;
        if top != NIL {
            self.prefetch_slot(top - 1);
            return;
        }
        let bump = self.bump.load(Ordering::Relaxed);
        for j in 0..u32::try_from(n).unwrap_or(0) {
            self.prefetch_slot(bump.wrapping_add(j));
        }
    }

    fn push_free(&self, idx: u32) {
        let f = &self.slots[idx as usize];
        f.reset_free();
        let mut head = self.free.load(Ordering::Acquire);
        loop {
            #[allow(clippy::cast_possible_truncation)] // low half is the link
            f.next_orig.store(head as u32, Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(idx + 1);
            match self
                .free
                .compare_exchange_weak(head, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(h) => head = h,
            }
        }
    }

    fn sweep(self: &Arc<Self>, now: Instant, budget: usize, guard: &Guard) -> usize {
        let hwm = self.hwm();
        if hwm == 0 || budget == 0 {
            return 0;
        }
        let n = budget.min(hwm);
        let start = self.cursor.fetch_add(n, Ordering::Relaxed) % hwm;
        let mut removed = 0;
        for j in 0..n {
            let mut i = start + j;
            if i >= hwm {
                i -= hwm;
            }
            #[allow(clippy::cast_possible_truncation)] // slots.len() < 2³¹
            let idx = i as u32;
            let f = &self.slots[i];
            let ctl = f.ctl.load(Ordering::Acquire); // pairs with `flow::publish`
            if phase_of(ctl) == PHASE_LIVE && f.expired_at(ctl, now) && self.kill(idx, now, guard) {
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests;
