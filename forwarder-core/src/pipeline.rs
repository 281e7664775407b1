//! The per-packet pipeline: where a packet goes.
//!
//! * [`Worker::outbound`] takes a VXLAN datagram from a client node (tunnel → uplink): validate the sender
//!   and the VNI, answer ARP and ping for the gateway itself, check the inner source is a pod, find or create
//!   the flow, SNAT, and hand back the frame for an uplink.
//! * [`Worker::inbound`] takes an Ethernet frame from an uplink (uplink → tunnel): find the flow by the reply
//!   tuple (or the tuple quoted in an ICMP error), DNAT, and hand back the VXLAN datagram for the node the
//!   flow came from.
//! * A packet that finds no flow in the gateway's own table, while this replica serves a dead peer
//!   ([`Standby`]), is translated through that peer's passive copy of its flow when there is one.
//!
//! Both return an [`Action`] that borrows the caller's buffer: the packet is rewritten in place and nothing
//! is allocated. Every drop is counted in the worker's [`Stats`] by [`Reason`].
//!
//! One [`Gateway`] (configuration, routes and the shared lock-free flow table) serves any number of
//! [`Worker`]s, one per thread. Callers should hold a [`Gateway::pin`] guard across a batch of packets; the
//! pipeline pins again per packet, which is then nearly free. The batch calls ([`Worker::outbound_batch`],
//! [`Worker::inbound_batch`]) overlap the flow lookups' cache misses, `outbound_batch` also the inserts of
//! the new flows of a batch (`Table::insert_batch`), and give the same results.
//!
//! Housekeeping is the caller's: expired flows are removed (and their ports start their reuse delay) by
//! [`Gateway::expire`], which the I/O layer calls regularly from any thread — e.g. every 10 ms with a budget
//! of a few thousand slots, so the whole table is swept every few seconds. Lookups never return an expired
//! flow in the meantime.

mod config;
mod inbound;
mod intake;
mod local;
mod outbound;
mod standby;

pub use config::{Config, ConfigError, UplinkConfig};
pub use intake::Intake;
pub use standby::{Standby, StandbyPeer};

use core::net::{IpAddr, Ipv4Addr};
use core::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::conntrack::{self, Flow, NewFlow, Table};
use crate::flow::{FlowKey, NodeAddr, UplinkId};
use crate::nat::frag::FragTable;
use crate::ports::{PortPools, PortRange, Rng};
use crate::route::{PrefixSet, RouteTable};
use crate::wire::ethernet::MacAddr;
use crate::wire::vxlan;
use crate::{Instant, Reason};

/// Offset of the inner Ethernet frame in a VXLAN datagram.
pub const TUNNEL_ETH: usize = vxlan::HEADER_LEN;
/// Offset of the inner IP header in a VXLAN datagram.
pub const TUNNEL_L3: usize = vxlan::HEADER_LEN + crate::wire::ethernet::HEADER_LEN;
/// Bytes [`Worker::inbound`] needs in front of an uplink frame to turn it into a VXLAN datagram in place.
pub const INBOUND_HEADROOM: usize = vxlan::HEADER_LEN;

/// The gateway's MAC address inside the tunnel: `a2:2a:` followed by its tunnel IPv4 address, as Calico's
/// client nodes expect.
pub fn tunnel_mac(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    [0xa2, 0x2a, o[0], o[1], o[2], o[3]]
}

/// What to do with the packet.
#[derive(Debug)]
pub enum Action<'a> {
    /// Send `frame` out of `uplink`. It is a complete Ethernet frame with the right EtherType; the caller
    /// writes the uplink's MAC as source and `next_hop`'s (from its neighbour cache) as destination.
    Forward {
        /// The uplink.
        uplink: UplinkId,
        /// The neighbour to deliver to: the uplink's router, or the destination itself when on-link.
        next_hop: IpAddr,
        /// The frame, in the caller's buffer.
        frame: &'a mut [u8],
    },
    /// Send `datagram` (VXLAN header + inner Ethernet frame, complete) as a UDP payload to the client node
    /// at `node`, port 4790.
    ToTunnel {
        /// The node's underlay address.
        node: Ipv4Addr,
        /// The VXLAN datagram, in the caller's buffer.
        datagram: &'a mut [u8],
        /// `None` for one datagram. `Some(n)`: a reply too big for the tunnel was fragmented (IPv4, DF
        /// clear), and `datagram` holds several VXLAN datagrams back to back, each `n` bytes but the last:
        /// send each as its own UDP datagram, or all at once with UDP segmentation offload of size `n`.
        segment: Option<usize>,
    },
    /// ARP or neighbour discovery on an uplink: for the caller's neighbour handling, not the data path.
    Neighbour,
    /// Dropped; already counted in [`Stats::drops`].
    Drop(Reason),
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (IP packet length).
    pub bytes: u64,
}

impl Counter {
    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += u64::try_from(bytes).unwrap_or(u64::MAX);
    }
}

/// One worker's counters. Single writer (the worker); the caller publishes them as metrics.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Drops by [`Reason::index`].
    pub drops: [u64; Reason::COUNT],
    /// Translated packets sent out of each uplink, by [`UplinkId`].
    pub uplink_tx: Vec<Counter>,
    /// Packets received from each uplink.
    pub uplink_rx: Vec<Counter>,
    /// VXLAN datagrams received from nodes.
    pub tunnel_rx: Counter,
    /// VXLAN datagrams sent to nodes (translated replies, ICMP errors, ARP and echo answers).
    pub tunnel_tx: Counter,
    /// Flows this worker created.
    pub flows_created: u64,
    /// ICMP errors this worker originated (time exceeded, too big, administratively prohibited).
    pub icmp_originated: u64,
    /// ARP requests and pings for the gateway's tunnel address answered.
    pub local_replies: u64,
    /// ICMP errors and TCP resets not sent because of the rate limit (the packet is counted under its drop
    /// reason).
    pub icmp_suppressed: u64,
    /// TCP resets sent to pods for segments of connections with no state here
    /// ([`Config::reset_unknown_tcp`]).
    pub tcp_resets_sent: u64,
    /// Packets (and ICMP errors about them) from pods translated through a served peer's copy of their flow
    /// ([`Standby`]). The later fragments of a datagram follow its first without a lookup and are not
    /// counted here.
    pub standby_out: u64,
    /// Packets (and ICMP errors about them) from outside translated through a served peer's copy of their
    /// flow ([`Standby`]); later fragments as for `standby_out`.
    pub standby_in: u64,
    /// ARP and NDP frames from an uplink handed to the caller ([`Action::Neighbour`]).
    pub neighbour: u64,
    /// Packets received on uplinks a reload removed (gone from `uplink_rx`; kept here so that
    /// [`unaccounted`](Self::unaccounted) stays true).
    pub retired_rx: u64,
    /// Packets sent out of uplinks a reload removed (gone from `uplink_tx`).
    pub retired_tx: u64,
}

impl Stats {
    fn new(uplinks: usize) -> Self {
        Stats {
            drops: [0; Reason::COUNT],
            uplink_tx: vec![Counter::default(); uplinks],
            uplink_rx: vec![Counter::default(); uplinks],
            tunnel_rx: Counter::default(),
            tunnel_tx: Counter::default(),
            flows_created: 0,
            icmp_originated: 0,
            local_replies: 0,
            icmp_suppressed: 0,
            tcp_resets_sent: 0,
            standby_out: 0,
            standby_in: 0,
            neighbour: 0,
            retired_rx: 0,
            retired_tx: 0,
        }
    }

    /// Drops for one reason.
    pub fn dropped(&self, reason: Reason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Packets received: tunnel datagrams and uplink frames given to the pipeline.
    pub fn received(&self) -> u64 {
        let uplinks: u64 = self.uplink_rx.iter().map(|c| c.packets).sum();
        self.tunnel_rx.packets + uplinks + self.retired_rx
    }

    /// Received packets no outcome accounts for: 0 unless the accounting has a bug. Every packet the
    /// pipeline is given ends in exactly one of
    /// * forwarded: translated and sent on, out of an uplink or back to a node
    ///   (`uplink_tx + tunnel_tx - icmp_originated - tcp_resets_sent - local_replies`: the answers the
    ///   gateway originates leave the same way and are counted with them);
    /// * dropped, under its reason (`drops`; an ICMP error or TCP reset sent about it is counted in
    ///   `icmp_originated` or `tcp_resets_sent` besides);
    /// * answered: an ARP request or ping for the gateway's own tunnel address (`local_replies`);
    /// * handed to the neighbour code (`neighbour`),
    ///
    /// so `received = uplink_tx + tunnel_tx - icmp_originated - tcp_resets_sent + drops + neighbour`. A
    /// reply too big for the tunnel, fragmented, leaves as one `tunnel_tx` packet of several datagrams;
    /// super-packets count once each way. Negative when more was accounted than received.
    pub fn unaccounted(&self) -> i128 {
        let sent: u64 = self.uplink_tx.iter().map(|c| c.packets).sum::<u64>()
            + self.tunnel_tx.packets
            + self.retired_tx;
        i128::from(self.received())
            - (i128::from(sent)
                - i128::from(self.icmp_originated)
                - i128::from(self.tcp_resets_sent)
                + i128::from(self.total_drops())
                + i128::from(self.neighbour))
    }
}

/// Shared by all workers: configuration, routes, and the flow table.
#[derive(Debug)]
pub struct Gateway {
    config: Config,
    mac: MacAddr,
    allowed_nodes: PrefixSet,
    pod_cidrs: PrefixSet,
    routes: RouteTable<UplinkId>,
    table: Arc<Table>,
    draining: AtomicBool,
    standby: Option<Arc<Standby>>,
}

impl Gateway {
    /// Builds a gateway and a new flow table with one port pool per egress address of every uplink.
    pub fn new(
        config: Config,
        conntrack: conntrack::Config,
        ports: PortRange,
    ) -> Result<Gateway, ConfigError> {
        Gateway::with_events(config, conntrack, ports, None)
    }

    /// [`new`](Self::new), with the flow table sending a [`conntrack::FlowEvent`] to `events` whenever a
    /// flow starts or ends (the NAT translation log).
    pub fn with_events(
        config: Config,
        conntrack: conntrack::Config,
        ports: PortRange,
        events: Option<Arc<conntrack::FlowEvents>>,
    ) -> Result<Gateway, ConfigError> {
        Gateway::with_event_queues(config, conntrack, ports, events, None)
    }

    /// [`with_events`](Self::with_events), and the same records to `sync_events` for state sync
    /// ([`Table::set_sync_events`]).
    pub fn with_event_queues(
        config: Config,
        conntrack: conntrack::Config,
        ports: PortRange,
        events: Option<Arc<conntrack::FlowEvents>>,
        sync_events: Option<Arc<conntrack::FlowEvents>>,
    ) -> Result<Gateway, ConfigError> {
        let mut egress: Vec<IpAddr> = Vec::new();
        for ip in config.uplinks.iter().flat_map(UplinkConfig::egress_ips) {
            if egress.contains(&ip) {
                return Err(ConfigError::DuplicateEgressAddress(ip));
            }
            egress.push(ip);
        }
        let pools = PortPools::new(&egress, ports);
        let mut table = match config.hash_seed {
            Some(seed) => Table::with_hash_seed(conntrack, pools, seed),
            None => Table::new(conntrack, pools),
        };
        if let Some(events) = events {
            table.set_events(events);
        }
        if let Some(events) = sync_events {
            table.set_sync_events(events);
        }
        Gateway::with_table(config, Arc::new(table))
    }

    /// Builds a gateway around an existing flow table (a reload keeps every flow). Egress addresses must be
    /// among those the table's port pools were made for; flows of removed uplinks expire naturally.
    pub fn with_table(config: Config, table: Arc<Table>) -> Result<Gateway, ConfigError> {
        if config.uplinks.len() > usize::from(UplinkId::MAX) + 1 {
            return Err(ConfigError::TooManyUplinks(config.uplinks.len()));
        }
        let mut routes = RouteTable::new();
        for (prefix, uplink) in &config.routes {
            let u = config
                .uplinks
                .get(usize::from(*uplink))
                .ok_or(ConfigError::UnknownUplink {
                    prefix: *prefix,
                    uplink: *uplink,
                })?;
            let has_family = match prefix {
                ipnet::IpNet::V4(_) => !u.egress_v4.is_empty(),
                ipnet::IpNet::V6(_) => !u.egress_v6.is_empty(),
            };
            if !has_family {
                return Err(ConfigError::NoEgressAddress {
                    uplink: u.name.clone(),
                    prefix: *prefix,
                });
            }
            routes
                .insert(*prefix, *uplink)
                .map_err(|e| ConfigError::DuplicateRoute(e.0))?;
        }
        Ok(Gateway {
            mac: tunnel_mac(config.tunnel_ip),
            allowed_nodes: PrefixSet::new(&config.allowed_nodes),
            pod_cidrs: PrefixSet::new(&config.pod_cidrs),
            config,
            routes,
            table,
            draining: AtomicBool::new(false),
            standby: None,
        })
    }

    /// The gateway with `standby`'s copies consulted for the peers it serves (see [`Standby`]). A reload
    /// builds the new gateway with [`with_table`](Self::with_table) and gives it the same `standby` again.
    pub fn with_standby(mut self, standby: Arc<Standby>) -> Gateway {
        self.standby = Some(standby);
        self
    }

    /// The peers' copies, when the gateway has them.
    pub fn standby(&self) -> Option<&Arc<Standby>> {
        self.standby.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The shared flow table.
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// The gateway's tunnel MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Pins the current thread for the flow table's memory reclamation; hold it across a batch.
    pub fn pin(&self) -> conntrack::Guard {
        self.table.pin()
    }

    /// Sweeps up to `budget` flow-table slots from where the previous sweep stopped, removing expired flows;
    /// returns how many were removed. Cheap enough to call every few milliseconds.
    pub fn expire(&self, now: Instant, budget: usize) -> usize {
        self.table.expire(now, budget)
    }

    /// While draining, established flows keep flowing and new flows are refused (`Reason::Draining`).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// True while draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Where the later fragments of a translated outbound datagram go.
#[derive(Debug, Clone, Copy)]
struct OutFrag {
    egress: IpAddr,
    uplink: UplinkId,
    next_hop: IpAddr,
}

/// Where the later fragments of a translated reply go, and the uplink they must arrive on.
#[derive(Debug, Clone, Copy)]
struct InFrag {
    pod: IpAddr,
    node: NodeAddr,
    uplink: UplinkId,
}

/// A token bucket for the ICMP errors a worker originates, in thousandths of a token.
#[derive(Debug, Clone, Copy)]
struct IcmpBucket {
    milli_tokens: u64,
    last: Instant,
    rate_per_sec: u64,
    burst_milli: u64,
}

impl IcmpBucket {
    fn new(rate_per_sec: u32, burst: u32) -> Self {
        let burst_milli = u64::from(burst.max(1)) * 1000;
        IcmpBucket {
            milli_tokens: burst_milli,
            last: Instant::ZERO,
            rate_per_sec: u64::from(rate_per_sec),
            burst_milli,
        }
    }

    /// Takes a token if one is there at `now`.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed_ms = now.as_millis().saturating_sub(self.last.as_millis());
        self.last = self.last.max(now);
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed_ms.saturating_mul(self.rate_per_sec))
            .min(self.burst_milli);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// A worker's own state: random numbers for port choice, fragment memory, the ICMP rate limit, counters.
#[derive(Debug)]
struct WorkerState {
    rng: Rng,
    frag_out: FragTable<OutFrag>,
    frag_in: FragTable<InFrag>,
    icmp: IcmpBucket,
    stats: Stats,
}

impl WorkerState {
    /// Accounts for an ICMP error about to be originated instead of a packet dropped for `reason`: false
    /// (and the suppression counted) when the rate limit says no. The drop itself is counted by the caller.
    fn allow_icmp(&mut self, now: Instant, reason: Reason) -> bool {
        self.allow_answer(now, reason)
            .then(|| self.stats.icmp_originated += 1)
            .is_some()
    }

    /// Whether an answer the gateway originates (ICMP error, TCP reset) may go now; counts the packet under
    /// `reason` when it may, and a suppression when it may not.
    fn allow_answer(&mut self, now: Instant, reason: Reason) -> bool {
        if self.icmp.take(now) {
            self.stats.drops[reason.index()] += 1;
            true
        } else {
            self.stats.icmp_suppressed += 1;
            false
        }
    }
}

/// One thread's handle on the pipeline. Not shared; create one per worker thread.
#[derive(Debug)]
pub struct Worker {
    gateway: Arc<Gateway>,
    state: WorkerState,
}

/// What `prepare` found: a decision already, or a packet that needs its flow looked up.
#[derive(Debug, Clone, Copy)]
enum Step<P> {
    Done(Verdict),
    Lookup(P),
}

/// A decision before it borrows the buffer: where the packet is and where it goes.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Forward {
        uplink: UplinkId,
        next_hop: IpAddr,
        start: usize,
        end: usize,
    },
    Tunnel {
        node: Ipv4Addr,
        start: usize,
        end: usize,
    },
    /// Several VXLAN datagrams back to back, each `segment` bytes but the last.
    TunnelSegments {
        node: Ipv4Addr,
        start: usize,
        end: usize,
        segment: usize,
    },
    Neighbour,
}

impl Worker {
    /// A worker for `gateway`; `seed` seeds its random port choice (give each worker a different one, from
    /// the OS's randomness).
    pub fn new(gateway: Arc<Gateway>, seed: u64) -> Worker {
        let c = &gateway.config;
        let state = WorkerState {
            rng: Rng::new(seed),
            frag_out: FragTable::new(c.frag_capacity, c.frag_lifetime),
            frag_in: FragTable::new(c.frag_capacity, c.frag_lifetime),
            icmp: IcmpBucket::new(c.icmp_rate_per_sec, c.icmp_burst),
            stats: Stats::new(c.uplinks.len()),
        };
        Worker { gateway, state }
    }

    /// Switches to a new gateway (after a reload); fragment memory and counters are kept.
    pub fn set_gateway(&mut self, gateway: Arc<Gateway>) {
        let n = gateway.config.uplinks.len();
        let st = &mut self.state.stats;
        for c in st.uplink_rx.iter().skip(n) {
            st.retired_rx += c.packets;
        }
        for c in st.uplink_tx.iter().skip(n) {
            st.retired_tx += c.packets;
        }
        st.uplink_tx.resize(n, Counter::default());
        st.uplink_rx.resize(n, Counter::default());
        self.gateway = gateway;
    }

    /// The gateway this worker serves.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// This worker's counters.
    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }

    /// A VXLAN datagram (VXLAN header + inner Ethernet frame) from the node at underlay address `from`,
    /// in `buf[..len]`. `buf` beyond `len` is spare room the pipeline may use to build an ICMP error.
    pub fn outbound<'a>(
        &mut self,
        from: Ipv4Addr,
        buf: &'a mut [u8],
        len: usize,
        now: crate::Instant,
    ) -> Action<'a> {
        let gw = &*self.gateway;
        let st = &mut self.state;
        st.stats.tunnel_rx.add(len);
        let v = outbound::process(gw, st, from, buf, len, now);
        finish(st, buf, v)
    }

    /// An Ethernet frame received on `uplink`, in `buf[start..start + len]`, with `start >=`
    /// [`INBOUND_HEADROOM`] so that the VXLAN header can be written in front of it.
    pub fn inbound<'a>(
        &mut self,
        uplink: UplinkId,
        buf: &'a mut [u8],
        start: usize,
        len: usize,
        now: crate::Instant,
    ) -> Action<'a> {
        let gw = &*self.gateway;
        let st = &mut self.state;
        if let Some(c) = st.stats.uplink_rx.get_mut(usize::from(uplink)) {
            c.add(len);
        }
        let v = inbound::process(gw, st, uplink, buf, start, len, now);
        finish(st, buf, v)
    }
}

/// Most packets one batch call looks up together (more are processed in chunks of this size).
pub const BATCH: usize = 32;

/// A VXLAN datagram for [`Worker::outbound_batch`]: as for [`Worker::outbound`], the datagram is
/// `buf[..len]` and `buf` beyond it is spare room.
#[derive(Debug)]
pub struct TunnelPacket<'a> {
    /// The sending node's underlay address.
    pub from: Ipv4Addr,
    /// The buffer.
    pub buf: &'a mut [u8],
    /// Length of the datagram.
    pub len: usize,
}

/// An uplink frame for [`Worker::inbound_batch`]: as for [`Worker::inbound`], the frame is
/// `buf[start..start + len]`.
#[derive(Debug)]
pub struct UplinkPacket<'a> {
    /// The buffer.
    pub buf: &'a mut [u8],
    /// Where the frame starts (at least [`INBOUND_HEADROOM`]).
    pub start: usize,
    /// Length of the frame.
    pub len: usize,
}

impl Worker {
    /// [`outbound`](Self::outbound) for a batch: the flow lookups of up to [`BATCH`] datagrams overlap
    /// their cache misses, and so do the inserts of the new flows among them (see `insert_new_flows`).
    /// `emit(i, action)` is called for every datagram, in order. The result is the same as calling
    /// `outbound` for each in turn.
    ///
    /// A frame that leaves (`Forward`, `ToTunnel`) is handed to `emit` with the buffer's own lifetime `'b`,
    /// moved out of its packet (whose `buf` is empty afterwards), so that the caller can queue it for a
    /// batched send that outlives this call. Other packets keep their buffer.
    pub fn outbound_batch<'b>(
        &mut self,
        batch: &mut [TunnelPacket<'b>],
        now: crate::Instant,
        mut emit: impl FnMut(usize, Action<'b>),
    ) {
        let gw = &*self.gateway;
        let st = &mut self.state;
        for (c, chunk) in batch.chunks_mut(BATCH).enumerate() {
            let mut steps = [Err(Reason::NoBufferRoom); BATCH];
            let mut keys = [None; BATCH];
            for (i, p) in chunk.iter_mut().enumerate() {
                st.stats.tunnel_rx.add(p.len);
                steps[i] = outbound::prepare(gw, st, p.from, p.buf, p.len, now);
                if let Ok(Step::Lookup(pending)) = &steps[i] {
                    keys[i] = Some(pending.key);
                }
            }
            let guard = gw.table.pin();
            let found = lookup_batch(&keys[..chunk.len()], |k, out| {
                gw.table.lookup_outbound_batch(k, now, out, &guard);
            });
            let new = insert_new_flows(gw, st, chunk, &steps, &keys, &found, &guard, now);
            for (i, p) in chunk.iter_mut().enumerate() {
                let v = match steps[i] {
                    Ok(Step::Done(v)) => Ok(v),
                    Ok(Step::Lookup(pending)) if new[i].is_some() => match new[i] {
                        Some(Ok(created)) => {
                            outbound::complete_new(gw, st, p.buf, &pending, created, now)
                        }
                        Some(Err(r)) => outbound::refuse(gw, st, p.buf, &pending, r, now),
                        None => unreachable!("guarded"),
                    },
                    Ok(Step::Lookup(pending)) => {
                        let f = match found[i] {
                            // A miss whose key missed earlier in this batch: that packet may have created
                            // the flow since (a SYN and its data in one batch).
                            None if missed_earlier(&keys, &found, i) => {
                                gw.table.lookup_outbound_at(&pending.key, now, &guard)
                            }
                            f => f,
                        };
                        outbound::complete(gw, st, p.buf, &pending, f, &guard, now)
                    }
                    // A later fragment may follow a first fragment earlier in this batch.
                    Err(Reason::FragmentNoFlow) => {
                        outbound::process(gw, st, p.from, p.buf, p.len, now)
                    }
                    Err(r) => Err(r),
                };
                emit(c * BATCH + i, finish_moving(st, &mut p.buf, v));
            }
        }
    }

    /// [`inbound`](Self::inbound) for a batch, like [`outbound_batch`](Self::outbound_batch) (frames that
    /// leave are moved out of their packets; ARP/NDP frames, `Action::Neighbour`, stay for the caller).
    pub fn inbound_batch<'b>(
        &mut self,
        uplink: UplinkId,
        batch: &mut [UplinkPacket<'b>],
        now: crate::Instant,
        mut emit: impl FnMut(usize, Action<'b>),
    ) {
        let gw = &*self.gateway;
        let st = &mut self.state;
        for (c, chunk) in batch.chunks_mut(BATCH).enumerate() {
            let mut steps = [Err(Reason::NoBufferRoom); BATCH];
            let mut keys = [None; BATCH];
            for (i, p) in chunk.iter_mut().enumerate() {
                if let Some(ctr) = st.stats.uplink_rx.get_mut(usize::from(uplink)) {
                    ctr.add(p.len);
                }
                steps[i] = inbound::prepare(gw, st, uplink, p.buf, p.start, p.len, now);
                if let Ok(Step::Lookup(pending)) = &steps[i] {
                    keys[i] = Some(pending.key);
                }
            }
            let guard = gw.table.pin();
            let found = lookup_batch(&keys[..chunk.len()], |k, out| {
                gw.table.lookup_inbound_batch(k, now, out, &guard);
            });
            for (i, p) in chunk.iter_mut().enumerate() {
                let v = match steps[i] {
                    Ok(Step::Done(v)) => Ok(v),
                    Ok(Step::Lookup(pending)) => {
                        inbound::complete(gw, st, uplink, p.buf, &pending, found[i], now)
                    }
                    Err(Reason::FragmentNoFlow) => {
                        inbound::process(gw, st, uplink, p.buf, p.start, p.len, now)
                    }
                    Err(r) => Err(r),
                };
                emit(c * BATCH + i, finish_moving(st, &mut p.buf, v));
            }
        }
    }
}

/// What became of a packet of a batch that needed a new flow: the insert's result, or the refusal decided
/// before it.
type NewFlowOutcome<'g> = Result<Result<&'g Flow, conntrack::InsertError>, outbound::Refusal>;

/// The new flows of an outbound chunk, inserted together ([`Table::insert_batch`], which overlaps their cache
/// misses): `out[i]` is `Some` for each packet whose new flow was planned and inserted (or refused) here;
/// the caller completes the others as before.
///
/// The results are those of one-by-one processing: planning changes no state, the inserts run in packet
/// order, and the batch stops before the first packet that could make a later insert see something else
/// than one-by-one processing would — the second packet of a tuple that missed earlier in the chunk (it
/// must find, or not, the flow the first one created), or a TCP SYN, FIN or RST of an existing flow (it may
/// take or give back a quota unit, or free a port for a takeover; for a served peer's copy, finish it or
/// open it again, which decides whether a later SYN of its tuple gets a new flow). Later packets take the
/// one-by-one path. A packet that misses the local table but has a served peer's copy gets no new flow;
/// `outbound::complete` looks the copy up again.
#[allow(clippy::too_many_arguments)]
fn insert_new_flows<'g>(
    gw: &'g Gateway,
    st: &mut WorkerState,
    chunk: &mut [TunnelPacket<'_>],
    steps: &[Result<Step<outbound::Pending>, Reason>; BATCH],
    keys: &[Option<FlowKey>; BATCH],
    found: &[Option<&'g Flow>; BATCH],
    guard: &'g conntrack::Guard,
    now: Instant,
) -> [Option<NewFlowOutcome<'g>>; BATCH] {
    let mut out = [None; BATCH];
    let mut batch = [NEW_FLOW_NONE; BATCH];
    let mut at = [0usize; BATCH];
    let mut n = 0;
    for (i, p) in chunk.iter_mut().enumerate() {
        let Ok(Step::Lookup(pending)) = &steps[i] else {
            continue;
        };
        match found[i].or_else(|| pending.copy(gw, now, guard)) {
            Some(_) if pending.may_change_insert_state() => break,
            Some(_) => {}
            None if missed_earlier(keys, found, i) => break,
            None => match outbound::plan_new(gw, p.buf, pending) {
                Ok(new) => {
                    (batch[n], at[n]) = (new, i);
                    n += 1;
                }
                Err(r) => out[i] = Some(Err(r)),
            },
        }
    }
    if n > 0 {
        let mut created = [Err(conntrack::InsertError::Full); BATCH];
        gw.table
            .insert_batch(&batch[..n], now, &mut st.rng, &mut created[..n], guard);
        for j in 0..n {
            out[at[j]] = Some(Ok(created[j]));
        }
    }
    out
}

/// Filler for unused entries of a batch of new flows.
const NEW_FLOW_NONE: NewFlow = NewFlow {
    orig: FlowKey::EMPTY,
    egress_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    node: NodeAddr {
        ip: Ipv4Addr::UNSPECIFIED,
        mac: [0; 6],
    },
    uplink: 0,
};

/// Looks up the present keys of a chunk together; `found[i]` answers `keys[i]`.
fn lookup_batch<'g>(
    keys: &[Option<FlowKey>],
    lookup: impl FnOnce(&[FlowKey], &mut [Option<&'g Flow>]),
) -> [Option<&'g Flow>; BATCH] {
    let mut dense = [FlowKey::EMPTY; BATCH];
    let mut at = [0usize; BATCH];
    let mut n = 0;
    for (i, k) in keys.iter().enumerate() {
        if let Some(k) = k {
            dense[n] = *k;
            at[n] = i;
            n += 1;
        }
    }
    let mut dense_found = [None; BATCH];
    lookup(&dense[..n], &mut dense_found[..n]);
    let mut found = [None; BATCH];
    for j in 0..n {
        found[at[j]] = dense_found[j];
    }
    found
}

/// True when an earlier packet of the chunk had the same key and found no flow.
fn missed_earlier(
    keys: &[Option<FlowKey>; BATCH],
    found: &[Option<&Flow>; BATCH],
    i: usize,
) -> bool {
    let Some(k) = keys[i] else {
        return false;
    };
    // the source port first: one compare rejects almost every other key
    (0..i)
        .any(|j| keys[j].is_some_and(|o| o.src_port == k.src_port && o == k) && found[j].is_none())
}

/// [`finish`] for a packet of a batch: a frame that leaves is moved out of `buf` (left empty) with the buffer's
/// whole lifetime; any other verdict leaves `buf` in place.
fn finish_moving<'b>(
    st: &mut WorkerState,
    buf: &mut &'b mut [u8],
    v: Result<Verdict, Reason>,
) -> Action<'b> {
    match v {
        Ok(Verdict::Forward { .. } | Verdict::Tunnel { .. } | Verdict::TunnelSegments { .. }) => {
            finish(st, core::mem::take(buf), v)
        }
        Ok(Verdict::Neighbour) | Err(_) => finish(st, &mut [], v),
    }
}

fn finish<'a>(st: &mut WorkerState, buf: &'a mut [u8], v: Result<Verdict, Reason>) -> Action<'a> {
    match v {
        Ok(Verdict::Forward {
            uplink,
            next_hop,
            start,
            end,
        }) => {
            if let Some(c) = st.stats.uplink_tx.get_mut(usize::from(uplink)) {
                c.add(end - start);
            }
            Action::Forward {
                uplink,
                next_hop,
                frame: &mut buf[start..end],
            }
        }
        Ok(Verdict::Tunnel { node, start, end }) => {
            st.stats.tunnel_tx.add(end - start);
            Action::ToTunnel {
                node,
                datagram: &mut buf[start..end],
                segment: None,
            }
        }
        Ok(Verdict::TunnelSegments {
            node,
            start,
            end,
            segment,
        }) => {
            st.stats.tunnel_tx.add(end - start);
            Action::ToTunnel {
                node,
                datagram: &mut buf[start..end],
                segment: Some(segment),
            }
        }
        Ok(Verdict::Neighbour) => {
            st.stats.neighbour += 1;
            Action::Neighbour
        }
        Err(r) => {
            st.stats.drops[r.index()] += 1;
            Action::Drop(r)
        }
    }
}
