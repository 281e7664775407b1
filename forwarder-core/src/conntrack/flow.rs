//! One flow slot of the arena: identity, NAT binding, TCP tracking, timestamps and counters in 112 bytes.
//!
//! Every field is an atomic so that a slot can be shared by reference between workers without `unsafe`;
//! relaxed loads and stores compile to plain moves. Identity fields are written while the slot is private
//! (freshly popped from the free list) and published by the release CAS that links it into an index (for
//! list walks) and by the release INIT → LIVE transition (for arena scans); they never change while the slot
//! is reachable. Mutable state (TCP, timestamps, counters) is updated with
//! relaxed operations; counters use load + store, so they may lose increments under races (documented as
//! approximate).
//!
//! Layout (`repr(C)`, offsets in bytes): `0` index links · `8` pod address · `24` remote address · `40` ports,
//! pool and protocol · `48` TCP/lifecycle word with the context id · `56` last seen · `60` EIM link —
//! everything a lookup or a list walk reads is in these first 64 bytes (which span two cache lines unless
//! the slot starts on a line boundary: slots are 112 bytes and the arena is only 8-aligned) — then `64` node
//! MAC and uplink · `72` byte counters · `88` node IPv4 · `92` created · `96` mapping reference count · `100`
//! packet counters.

use core::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{
    AtomicU32, AtomicU64,
    Ordering::{Relaxed, Release},
};

use super::context;
use super::key::{self, Addr, Packed, V6_BIT};
use crate::flow::{FlowKey, NodeAddr, Proto, UplinkId};
use crate::ports::PoolId;
use crate::time::Instant;

/// Timestamps are stored in ticks of 64 ms (u32: 8.7 years after the caller's epoch).
pub(crate) const TICK_SHIFT: u32 = 6;

pub(crate) fn tick(now: Instant) -> u32 {
    u32::try_from(now.as_millis() >> TICK_SHIFT).unwrap_or(u32::MAX)
}

/// TCP connection state as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// The pod sent a SYN; no answer yet.
    SynSent,
    /// The remote answered with SYN-ACK; the pod has not acknowledged it yet.
    SynReceived,
    /// Three-way handshake complete.
    Established,
    /// A FIN was seen in one direction only (the other may still send data).
    Closing,
    /// Reset (a valid RST either way); the entry stays for the transitory timeout.
    Closed,
    /// A FIN was seen in each direction (the inbound one inside the pod's window): the connection is over and
    /// the end that closed first waits out TIME-WAIT. The entry stays for the transitory timeout, but a new
    /// connection may take its external port over when the pool is exhausted (see `docs/nat.md`).
    TimeWait,
}

// State codes in the control word. `Closing` has two codes so that the second FIN can be told from a
// repeated first one.
const S_SYN_SENT: u64 = 0;
const S_SYN_RECEIVED: u64 = 1;
const S_ESTABLISHED: u64 = 2;
const S_FIN_OUT: u64 = 3;
const S_CLOSED: u64 = 4;
const S_FIN_IN: u64 = 5;
const S_FIN_BOTH: u64 = 6;

const _: () = assert!(TcpTracking::MAX_STATE as u64 == S_FIN_BOTH);

impl TcpState {
    const fn from_bits(b: u64) -> TcpState {
        match b {
            S_SYN_SENT => TcpState::SynSent,
            S_SYN_RECEIVED => TcpState::SynReceived,
            S_ESTABLISHED => TcpState::Established,
            S_FIN_OUT | S_FIN_IN => TcpState::Closing,
            S_FIN_BOTH => TcpState::TimeWait,
            _ => TcpState::Closed,
        }
    }
}

/// True when the TCP state code of control word `c` says the connection is over: reset, or closed by a FIN
/// each way. Only such a flow may hand its external port over to a new connection.
pub(crate) const fn tcp_finished(c: u64) -> bool {
    matches!((c >> STATE_SHIFT) & 7, S_CLOSED | S_FIN_BOTH)
}

/// A TCP flow's tracking state as carried from one table to another (state sync between replicas): the state
/// code, the reference sequence number and the pod's window. Zero for UDP and ICMP flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpTracking {
    /// The state code (0..=[`TcpTracking::MAX_STATE`]); [`TcpTracking::state`] names it.
    pub code: u8,
    /// In `SynSent` the pod's ISN + 1, afterwards the pod's last acknowledgement number.
    pub reference: u32,
    /// The pod's last advertised window, unscaled.
    pub window: u16,
}

impl TcpTracking {
    /// Highest state code.
    pub const MAX_STATE: u8 = 6;

    /// The state the code stands for.
    pub const fn state(&self) -> TcpState {
        TcpState::from_bits(self.code as u64)
    }
}

/// What the caller knows of a TCP segment.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegment {
    /// TCP flags: FIN=1, SYN=2, RST=4, PSH=8, ACK=0x10.
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with ACK).
    pub ack: u32,
    /// Advertised window, unscaled.
    pub window: u16,
    /// Payload length.
    pub payload_len: u32,
}

impl TcpSegment {
    /// FIN flag.
    pub const FIN: u8 = 0x01;
    /// SYN flag.
    pub const SYN: u8 = 0x02;
    /// RST flag.
    pub const RST: u8 = 0x04;
    /// PSH flag.
    pub const PSH: u8 = 0x08;
    /// ACK flag.
    pub const ACK: u8 = 0x10;

    const fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// Result of accounting a packet to its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// The packet belongs to the flow; forward it.
    Ok,
    /// The packet changed nothing and must not be forwarded (an inbound RST outside the window: a forgery or a
    /// stale segment).
    Ignored,
}

/// Packets and bytes each way. May be slightly low under races (updates are not read-modify-write atomic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowCounters {
    /// Packets pod → outside.
    pub packets_out: u64,
    /// Bytes pod → outside.
    pub bytes_out: u64,
    /// Packets outside → pod.
    pub packets_in: u64,
    /// Bytes outside → pod.
    pub bytes_in: u64,
}

// ---- the control word -----------------------------------------------------------------------------------
// bits 0..32  TCP reference: in SynSent the pod's ISN + 1, afterwards the pod's last acknowledgment number
//             (= the next sequence number it expects from the remote)
// bits 32..48 the pod's last advertised window (unscaled)
// bits 48..51 TcpState
// bits 51..53 lifecycle phase
// bits 53..56 holds: reasons the slot may not be recycled yet (flow role + index links)
// bits 56..64 context id of the table (immutable)
/// Phase of a slot on the free list (a control word with only the context id set).
pub(crate) const PHASE_FREE: u64 = 0;
pub(crate) const PHASE_INIT: u64 = 1;
pub(crate) const PHASE_LIVE: u64 = 2;
pub(crate) const PHASE_DEAD: u64 = 3;
const STATE_SHIFT: u32 = 48;
const PHASE_SHIFT: u32 = 51;
const HOLDS_SHIFT: u32 = 53;
pub(crate) const HOLD: u64 = 1 << HOLDS_SHIFT;
const CTX_SHIFT: u32 = 56;
const CTX_MASK: u64 = 0xFF << CTX_SHIFT;
const TAG_SHIFT: u32 = 61;
/// Pool ids are stored in 13 bits (at most 8191 egress IPs).
pub(crate) const POOL_MASK: u16 = 0x1FFF;

pub(crate) const fn phase_of(ctl: u64) -> u64 {
    (ctl >> PHASE_SHIFT) & 3
}
pub(crate) const fn holds_of(ctl: u64) -> u64 {
    (ctl >> HOLDS_SHIFT) & 7
}
pub(crate) const fn with_phase(ctl: u64, phase: u64) -> u64 {
    (ctl & !(3 << PHASE_SHIFT)) | (phase << PHASE_SHIFT)
}

/// Window scale assumed for the pod's advertised window when checking an inbound RST (the core does not see
/// TCP options; 7 is Linux's default). Wider than exact, still rejects almost every blind forgery.
const ASSUMED_WSCALE: u32 = 7;

/// A tracked, translated flow. Obtained from [`Table`](super::Table) lookups and inserts; valid for the
/// lifetime of the epoch guard used to get it.
#[derive(Debug)]
#[repr(C)]
pub struct Flow {
    pub(crate) next_orig: AtomicU32,
    pub(crate) next_reply: AtomicU32,
    src: [AtomicU64; 2],
    dst: [AtomicU64; 2],
    /// src port | dst port << 16 | external port << 32 | pool << 48 (13 bits) | tag << 61 (3 bits)
    ports: AtomicU64,
    /// See the control word above; bits 56..64 hold the table's context id.
    pub(crate) ctl: AtomicU64,
    last_seen: AtomicU32,
    pub(crate) next_eim: AtomicU32,
    /// node MAC (48 bits) | uplink << 48
    misc: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    node_ip: AtomicU32,
    created: AtomicU32,
    pub(crate) map_refs: AtomicU32,
    pk_out: AtomicU32,
    pk_in: AtomicU32,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 112);
const _: () = assert!(core::mem::offset_of!(Flow, next_eim) == 60); // list walks stay in 64 bytes

fn load2(a: &[AtomicU64; 2]) -> Addr {
    [a[0].load(Relaxed), a[1].load(Relaxed)]
}

/// Key fields for the endpoint-independent mapping: pod address, pod port (ICMP: identifier), tag, pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EimKey {
    pub(crate) src: Addr,
    pub(crate) sport: u16,
    pub(crate) tag: u8,
    pub(crate) pool: PoolId,
}

impl EimKey {
    pub(crate) fn hash(&self, k: &key::HashKey) -> u64 {
        Packed {
            src: self.src,
            dst: [u64::from(self.pool), 0],
            sport: self.sport,
            dport: 0,
            tag: self.tag,
        }
        .hash(k)
    }
}

impl Flow {
    /// A free slot of the table whose context id is `ctx`. The id is written here only: every later store to
    /// the control word keeps its top byte (see [`Flow::ctx`]).
    pub(crate) fn empty(ctx: u8) -> Flow {
        Flow {
            next_orig: AtomicU32::new(0),
            next_reply: AtomicU32::new(0),
            src: [AtomicU64::new(0), AtomicU64::new(0)],
            dst: [AtomicU64::new(0), AtomicU64::new(0)],
            ports: AtomicU64::new(0),
            misc: AtomicU64::new(0),
            last_seen: AtomicU32::new(0),
            created: AtomicU32::new(0),
            ctl: AtomicU64::new(PHASE_FREE | u64::from(ctx) << CTX_SHIFT),
            node_ip: AtomicU32::new(0),
            next_eim: AtomicU32::new(0),
            map_refs: AtomicU32::new(0),
            pk_out: AtomicU32::new(0),
            pk_in: AtomicU32::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
        }
    }

    /// Fills a private slot. The external port is set later ([`set_ext_port`](Self::set_ext_port)).
    pub(crate) fn init(
        &self,
        k: &Packed,
        pool: PoolId,
        node: NodeAddr,
        uplink: UplinkId,
        now: Instant,
    ) {
        let ctx = self.ctl.load(Relaxed) & CTX_MASK;
        self.src[0].store(k.src[0], Relaxed);
        self.src[1].store(k.src[1], Relaxed);
        self.dst[0].store(k.dst[0], Relaxed);
        self.dst[1].store(k.dst[1], Relaxed);
        self.ports.store(
            u64::from(k.sport)
                | u64::from(k.dport) << 16
                | u64::from(pool & POOL_MASK) << 48
                | u64::from(k.tag) << TAG_SHIFT,
            Relaxed,
        );
        let mac = node
            .mac
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        self.misc.store(mac | u64::from(uplink) << 48, Relaxed);
        let t = tick(now);
        self.last_seen.store(t, Relaxed);
        self.created.store(t, Relaxed);
        self.ctl.store(
            S_SYN_SENT << STATE_SHIFT | PHASE_INIT << PHASE_SHIFT | HOLD | ctx,
            Relaxed,
        );
        self.node_ip.store(u32::from(node.ip), Relaxed);
        self.next_eim.store(0, Relaxed);
        self.map_refs.store(0, Relaxed);
        self.pk_out.store(0, Relaxed);
        self.pk_in.store(0, Relaxed);
        self.bytes_out.store(0, Relaxed);
        self.bytes_in.store(0, Relaxed);
    }

    pub(crate) fn set_ext_port(&self, port: u16) {
        let p = self.ports.load(Relaxed);
        self.ports
            .store((p & !(0xFFFF << 32)) | u64::from(port) << 32, Relaxed);
    }

    #[inline]
    fn tag(&self) -> u8 {
        #[allow(clippy::cast_possible_truncation)] // top byte
        let t = (self.ports.load(Relaxed) >> TAG_SHIFT) as u8;
        t
    }

    #[inline]
    fn port_field(&self, shift: u32) -> u16 {
        #[allow(clippy::cast_possible_truncation)] // 16-bit field
        let p = (self.ports.load(Relaxed) >> shift) as u16;
        p
    }

    pub(crate) fn pool(&self) -> PoolId {
        self.port_field(48) & POOL_MASK
    }

    /// True for a TCP flow translated to `port` of pool `pool`.
    pub(crate) fn is_tcp_on(&self, pool: PoolId, port: u16) -> bool {
        self.proto() == Proto::Tcp && self.pool() == pool && self.external_port() == port
    }

    fn is_v6(&self) -> bool {
        self.tag() & V6_BIT != 0
    }

    /// Protocol of the flow.
    pub fn proto(&self) -> Proto {
        key::proto_from_index(self.tag())
    }

    fn is_icmp(&self) -> bool {
        matches!(self.proto(), Proto::Icmp | Proto::Icmpv6)
    }

    /// Back to the free phase (the slot is private: off every list, past its grace period). Keeps the
    /// context id.
    pub(crate) fn reset_free(&self) {
        let ctx = self.ctl.load(Relaxed) & CTX_MASK;
        self.ctl.store(PHASE_FREE | ctx, Relaxed);
    }

    pub(crate) fn ctx(&self) -> &context::Context {
        #[allow(clippy::cast_possible_truncation)] // top byte
        let id = (self.ctl.load(Relaxed) >> CTX_SHIFT) as u8;
        // SAFETY: `get` needs the registration of `id` alive while the returned borrow of `self` lasts.
        // (1) `id` is the id of the registration owned by the `conntrack::Inner` whose arena holds `self`:
        //     flows are only made by `Flow::empty(ctx)` in `Table::with_hash_seed`, with that registration's
        //     id, and every other store to `ctl` keeps the top byte (`init` and `reset_free` copy it,
        //     `with_phase`/`with_tcp` mask below bit 51, the HOLD adds and subtracts stay inside the 3-bit
        //     holds field: at most 4 holds). `Flow` has no public constructor and is not `Clone`, so no flow
        //     lives outside an arena.
        // (2) The registration is a field of that `Inner` and is dropped with it, together with the arena;
        //     `&self` borrows the arena, so the `Inner` (and the registration) outlives the returned borrow.
        unsafe { context::get(id) }
    }

    #[inline]
    pub(crate) fn matches_orig(&self, k: &Packed) -> bool {
        let ports = self.ports.load(Relaxed);
        #[allow(clippy::cast_possible_truncation)] // low 32 bits: both ports
        let (pp, tag) = (ports as u32, (ports >> TAG_SHIFT) as u8);
        pp == (u32::from(k.sport) | u32::from(k.dport) << 16)
            && tag == k.tag
            && load2(&self.src) == k.src
            && load2(&self.dst) == k.dst
    }

    /// The reply key in index form; `pool_addr` is the egress address of this flow's pool.
    pub(crate) fn reply_packed(&self, pool_addr: Addr) -> Packed {
        let ext = self.port_field(32);
        Packed {
            src: load2(&self.dst),
            dst: pool_addr,
            sport: if self.is_icmp() {
                ext
            } else {
                self.port_field(16)
            },
            dport: ext,
            tag: self.tag(),
        }
    }

    #[inline]
    pub(crate) fn matches_reply(&self, k: &Packed, pool_addrs: &[Addr]) -> bool {
        let ports = self.ports.load(Relaxed);
        #[allow(clippy::cast_possible_truncation)] // 16-bit fields
        let (dport, ext, pool, tag) = (
            (ports >> 16) as u16,
            (ports >> 32) as u16,
            (ports >> 48) as u16 & POOL_MASK,
            (ports >> TAG_SHIFT) as u8,
        );
        let rsport = if tag & 2 != 0 { ext } else { dport }; // ICMP protocols have index 2 and 3
        ext == k.dport
            && rsport == k.sport
            && tag == k.tag
            && load2(&self.dst) == k.src
            && pool_addrs.get(usize::from(pool)) == Some(&k.dst)
    }

    pub(crate) fn orig_packed(&self) -> Packed {
        Packed {
            src: load2(&self.src),
            dst: load2(&self.dst),
            sport: self.port_field(0),
            dport: self.port_field(16),
            tag: self.tag(),
        }
    }

    pub(crate) fn eim_key(&self) -> EimKey {
        EimKey {
            src: load2(&self.src),
            sport: self.port_field(0),
            tag: self.tag(),
            pool: self.pool(),
        }
    }

    pub(crate) fn matches_eim(&self, k: &EimKey) -> bool {
        self.eim_key() == *k
    }

    // ---- public accessors ---------------------------------------------------------------------------

    /// The pod's original tuple (outbound direction).
    pub fn orig(&self) -> FlowKey {
        let v6 = self.is_v6();
        FlowKey {
            src: key::words_addr(load2(&self.src), v6),
            dst: key::words_addr(load2(&self.dst), v6),
            src_port: self.port_field(0),
            dst_port: self.port_field(16),
            proto: self.proto(),
        }
    }

    /// The inbound tuple as received from outside: src = remote, dst = egress IP, src_port = remote port,
    /// dst_port = external port (ICMP: both are the external identifier).
    pub fn reply_key(&self) -> FlowKey {
        let v6 = self.is_v6();
        let ext = self.external_port();
        FlowKey {
            src: key::words_addr(load2(&self.dst), v6),
            dst: self.egress_ip(),
            src_port: if self.is_icmp() {
                ext
            } else {
                self.port_field(16)
            },
            dst_port: ext,
            proto: self.proto(),
        }
    }

    /// The egress IP the flow is translated to.
    pub fn egress_ip(&self) -> IpAddr {
        self.ctx().pool_ips[usize::from(self.pool())]
    }

    /// External port (ICMP: external identifier).
    pub fn external_port(&self) -> u16 {
        self.port_field(32)
    }

    /// The client node replies are tunnelled back to.
    pub fn node(&self) -> NodeAddr {
        let m = self.misc.load(Relaxed);
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            #[allow(clippy::cast_possible_truncation)] // one byte
            let byte = (m >> (40 - 8 * i)) as u8;
            *b = byte;
        }
        NodeAddr {
            ip: Ipv4Addr::from(self.node_ip.load(Relaxed)),
            mac,
        }
    }

    /// The uplink outbound packets leave on.
    pub fn uplink(&self) -> UplinkId {
        #[allow(clippy::cast_possible_truncation)] // one byte
        let u = (self.misc.load(Relaxed) >> 48) as u8;
        u
    }

    /// TCP state (meaningless for other protocols: `SynSent`).
    pub fn tcp_state(&self) -> TcpState {
        TcpState::from_bits((self.ctl.load(Relaxed) >> STATE_SHIFT) & 7)
    }

    /// When the flow was created (64 ms granularity).
    pub fn created(&self) -> Instant {
        Instant::from_millis(u64::from(self.created.load(Relaxed)) << TICK_SHIFT)
    }

    /// When the flow was last refreshed (64 ms granularity).
    pub fn last_seen(&self) -> Instant {
        Instant::from_millis(u64::from(self.last_seen.load(Relaxed)) << TICK_SHIFT)
    }

    /// Idle timeout for the flow's current protocol state, in milliseconds.
    pub(crate) fn timeout_ms(&self, ctl: u64) -> u64 {
        let c = self.ctx();
        match self.proto() {
            Proto::Udp => c.udp_ms,
            Proto::Icmp | Proto::Icmpv6 => c.icmp_ms,
            Proto::Tcp => {
                if (ctl >> STATE_SHIFT) & 7 == S_ESTABLISHED {
                    c.tcp_est_ms
                } else {
                    c.tcp_trans_ms
                }
            }
        }
    }

    /// True once the flow has been idle for its timeout (or has been removed). Expiry is never early and at
    /// most 64 ms late.
    pub fn is_expired(&self, now: Instant) -> bool {
        let ctl = self.ctl.load(Relaxed);
        match phase_of(ctl) {
            PHASE_LIVE | PHASE_INIT => {}
            _ => return true,
        }
        self.expired_at(ctl, now)
    }

    pub(crate) fn expired_at(&self, ctl: u64, now: Instant) -> bool {
        let last = u64::from(self.last_seen.load(Relaxed)) + 1;
        now.as_millis() >= (last << TICK_SHIFT).saturating_add(self.timeout_ms(ctl))
    }

    /// The TCP tracking state, to carry this flow to another table ([`TcpTracking::default`] for UDP and
    /// ICMP).
    pub fn tcp_tracking(&self) -> TcpTracking {
        if self.proto() != Proto::Tcp {
            return TcpTracking::default();
        }
        let (s, reference, window) = tcp_fields(self.ctl.load(Relaxed));
        #[allow(clippy::cast_possible_truncation)] // a 3-bit field
        let code = s as u8;
        TcpTracking {
            code,
            reference,
            window,
        }
    }

    /// The flow as [`Table::install`](super::Table::install) takes it, to carry it to another table (state
    /// sync); ages are counted to `now` (64 ms granularity).
    pub fn image(&self, now: Instant) -> super::FlowImage {
        super::FlowImage {
            new: super::NewFlow {
                orig: self.orig(),
                egress_ip: self.egress_ip(),
                node: self.node(),
                uplink: self.uplink(),
            },
            ext_port: self.external_port(),
            tcp: self.tcp_tracking(),
            age: now.saturating_since(self.created()),
            idle: now.saturating_since(self.last_seen()),
        }
    }

    /// Sets the TCP tracking state and the times of a flow carried from another table
    /// ([`Table::install`](super::Table::install)); the source quota follows the state as for a packet.
    pub(crate) fn restore(&self, tcp: TcpTracking, created: Instant, last_seen: Instant) {
        if self.proto() == Proto::Tcp {
            let code = u64::from(tcp.code.min(TcpTracking::MAX_STATE));
            if let Ok(prev) = self.ctl.fetch_update(Relaxed, Relaxed, |c| {
                tracked(c).then(|| with_tcp(c, code, tcp.reference, tcp.window))
            }) {
                self.account_finish(prev, with_tcp(prev, code, tcp.reference, tcp.window));
            }
        }
        self.created.store(tick(created), Relaxed);
        self.last_seen.store(tick(last_seen), Relaxed);
    }

    /// Packets and bytes each way.
    pub fn counters(&self) -> FlowCounters {
        FlowCounters {
            packets_out: u64::from(self.pk_out.load(Relaxed)),
            bytes_out: self.bytes_out.load(Relaxed),
            packets_in: u64::from(self.pk_in.load(Relaxed)),
            bytes_in: self.bytes_in.load(Relaxed),
        }
    }

    fn refresh(&self, now: Instant) {
        let t = tick(now);
        if self.last_seen.load(Relaxed) < t {
            self.last_seen.store(t, Relaxed);
        }
    }

    fn count(pk: &AtomicU32, by: &AtomicU64, bytes: usize) {
        pk.store(pk.load(Relaxed).wrapping_add(1), Relaxed);
        by.store(by.load(Relaxed).wrapping_add(bytes as u64), Relaxed);
    }

    /// Gives the source's quota unit back when the TCP transition `prev` → `next` finishes the connection, and
    /// takes one again when a new SYN opens a finished one (see `quota.rs`). The caller's CAS made the
    /// transition, so each is accounted once.
    fn account_finish(&self, prev: u64, next: u64) {
        match (tcp_finished(prev), tcp_finished(next)) {
            (false, true) => self.ctx().quota.release(&self.orig_packed().src),
            (true, false) => self.ctx().quota.reacquire(&self.orig_packed().src),
            _ => {}
        }
    }

    /// Outbound (pod → outside) packet of this flow: refreshes it, follows the TCP state, counts it.
    pub fn on_outbound(&self, tcp: Option<TcpSegment>, bytes: usize, now: Instant) -> Refresh {
        if let (Some(seg), Proto::Tcp) = (tcp, self.proto()) {
            let mut next = 0;
            if let Ok(prev) = self.ctl.fetch_update(Relaxed, Relaxed, |c| {
                next = tcp_outbound(c, &seg);
                tracked(c).then_some(next)
            }) {
                self.account_finish(prev, next);
            }
        }
        self.refresh(now);
        Self::count(&self.pk_out, &self.bytes_out, bytes);
        Refresh::Ok
    }

    /// Inbound (outside → pod) packet: refreshes established flows (TCP: only in `Established`; UDP and
    /// ICMP always), follows the TCP state, counts it. An RST outside the pod's receive window returns
    /// [`Refresh::Ignored`] and changes nothing; a valid RST moves the flow to `Closed`, which expires after the
    /// transitory timeout counted from now. A FIN outside that window is forwarded ([`Refresh::Ok`]) but
    /// neither changes the state nor refreshes the flow.
    pub fn on_inbound(&self, tcp: Option<TcpSegment>, bytes: usize, now: Instant) -> Refresh {
        let refresh = match (tcp, self.proto()) {
            (Some(seg), Proto::Tcp) => {
                let (mut refresh, mut next, mut gone) = (false, 0, false);
                let r = self.ctl.fetch_update(Relaxed, Relaxed, |c| {
                    gone = !tracked(c);
                    if gone {
                        return None;
                    }
                    (next, refresh) = tcp_inbound(c, &seg)?;
                    Some(next)
                });
                match r {
                    Ok(prev) => self.account_finish(prev, next),
                    // Being removed: nothing to follow, and the packet is no forgery.
                    Err(_) if gone => {}
                    Err(_) => return Refresh::Ignored,
                }
                refresh
            }
            (_, Proto::Tcp) => self.tcp_state() == TcpState::Established,
            _ => true,
        };
        if refresh {
            self.refresh(now);
        }
        Self::count(&self.pk_in, &self.bytes_in, bytes);
        Refresh::Ok
    }
}

/// True while packets may change the TCP state in control word `c`: the flow is being inserted or is live.
/// Once removal has claimed it (DEAD) the state is frozen, so the removal's quota accounting reads a state no
/// packet changes after it.
fn tracked(c: u64) -> bool {
    matches!(phase_of(c), PHASE_INIT | PHASE_LIVE)
}

fn tcp_fields(c: u64) -> (u64, u32, u16) {
    #[allow(clippy::cast_possible_truncation)] // packed fields
    let (r, w) = (c as u32, (c >> 32) as u16);
    ((c >> STATE_SHIFT) & 7, r, w)
}

fn with_tcp(c: u64, s: u64, r: u32, w: u16) -> u64 {
    (c & !((1u64 << 51) - 1)) | s << STATE_SHIFT | u64::from(w) << 32 | u64::from(r)
}

/// Control word after an outbound segment. The pod is trusted: its RST always closes and its FIN always moves
/// to `Closing` (or `TimeWait` after the remote's FIN); the control word keeps no sequence state of the pod's
/// direction to check them against; the pod is inside the trust boundary, outside forgers are not.
pub(crate) fn tcp_outbound(c: u64, seg: &TcpSegment) -> u64 {
    let (state, mut r, mut w) = tcp_fields(c);
    let next = if seg.has(TcpSegment::RST) {
        S_CLOSED
    } else if seg.has(TcpSegment::SYN) && !seg.has(TcpSegment::ACK) {
        r = seg.seq.wrapping_add(1);
        w = seg.window;
        return with_tcp(c, S_SYN_SENT, r, w);
    } else {
        let mut s = state;
        if seg.has(TcpSegment::ACK) {
            r = seg.ack;
            w = seg.window;
            if s == S_SYN_RECEIVED {
                s = S_ESTABLISHED;
            }
        }
        if seg.has(TcpSegment::FIN) {
            s = match s {
                S_CLOSED | S_FIN_BOTH => s,
                S_FIN_IN => S_FIN_BOTH,
                _ => S_FIN_OUT,
            };
        }
        s
    };
    with_tcp(c, next, r, w)
}

/// True when sequence number `seq` lies in the pod's receive window: `r` (next expected) plus the pod's
/// advertised window `w` at the assumed scale.
fn in_window(seq: u32, r: u32, w: u16) -> bool {
    let span = (u32::from(w).max(1) << ASSUMED_WSCALE).max(1);
    seq.wrapping_sub(r) < span
}

/// Control word after an inbound segment and whether it refreshes the flow; `None` for an RST that is not
/// acceptable (RFC 793 / 5961: in SynSent it must acknowledge the SYN, otherwise its sequence number must lie
/// in the pod's receive window). A FIN changes the state only inside the same window (its first byte or the
/// FIN itself, at `seq + payload_len`); outside it the segment is forwarded but changes and refreshes
/// nothing, so a blind forgery cannot demote an established flow to the transitory timeout.
pub(crate) fn tcp_inbound(c: u64, seg: &TcpSegment) -> Option<(u64, bool)> {
    let (state, mut r, w) = tcp_fields(c);
    if seg.has(TcpSegment::RST) {
        let ok = match state {
            S_SYN_SENT => seg.has(TcpSegment::ACK) && seg.ack == r,
            _ => in_window(seg.seq, r, w),
        };
        return ok.then(|| (with_tcp(c, S_CLOSED, r, w), true));
    }
    let mut s = state;
    let refresh = state == S_ESTABLISHED;
    if seg.has(TcpSegment::SYN) && seg.has(TcpSegment::ACK) {
        if state == S_SYN_SENT && seg.ack == r {
            s = S_SYN_RECEIVED;
            r = seg.seq.wrapping_add(1);
        }
    } else if seg.has(TcpSegment::FIN)
        && matches!(state, S_ESTABLISHED | S_SYN_RECEIVED | S_FIN_OUT)
    {
        if !in_window(seg.seq, r, w) && !in_window(seg.seq.wrapping_add(seg.payload_len), r, w) {
            return Some((c, false));
        }
        s = if state == S_FIN_OUT {
            S_FIN_BOTH
        } else {
            S_FIN_IN
        };
    }
    Some((with_tcp(c, s, r, w), refresh))
}

/// INIT → LIVE, a release operation: a thread that finds the slot LIVE by scanning the arena (sweep,
/// `for_each`) with an acquire load also sees its identity fields, written while the slot was private.
/// (Concurrent relaxed read-modify-writes of the TCP bits continue the release sequence.)
pub(crate) fn publish(ctl: &AtomicU64) -> bool {
    ctl.fetch_update(Release, Relaxed, |c| {
        (phase_of(c) == PHASE_INIT).then(|| with_phase(c, PHASE_LIVE))
    })
    .is_ok()
}

pub(crate) fn set_phase(ctl: &AtomicU64, from: u64, to: u64) -> bool {
    ctl.fetch_update(Relaxed, Relaxed, |c| {
        (phase_of(c) == from).then(|| with_phase(c, to))
    })
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYN: u8 = TcpSegment::SYN;
    const ACK: u8 = TcpSegment::ACK;
    const RST: u8 = TcpSegment::RST;
    const FIN: u8 = TcpSegment::FIN;

    fn seg(flags: u8, seq: u32, ack: u32, window: u16) -> TcpSegment {
        TcpSegment {
            flags,
            seq,
            ack,
            window,
            payload_len: 0,
        }
    }

    fn state(c: u64) -> TcpState {
        TcpState::from_bits(tcp_fields(c).0)
    }

    /// Handshake pod ISN 1000, remote ISN 5000, pod window 1000 (×128 assumed scale).
    fn established() -> u64 {
        let c = tcp_outbound(0, &seg(SYN, 1000, 0, 1000));
        assert_eq!(state(c), TcpState::SynSent);
        let (c, refresh) = tcp_inbound(c, &seg(SYN | ACK, 5000, 1001, 2000)).expect("syn-ack");
        assert!(!refresh);
        assert_eq!(state(c), TcpState::SynReceived);
        let c = tcp_outbound(c, &seg(ACK, 1001, 5001, 1000));
        assert_eq!(state(c), TcpState::Established);
        c
    }

    #[test]
    fn handshake_then_fin() {
        let c = established();
        let (c2, refresh) = tcp_inbound(c, &seg(ACK, 5001, 1001, 10)).expect("data");
        assert!(refresh);
        assert_eq!(state(c2), TcpState::Established);
        let c3 = tcp_outbound(c2, &seg(FIN | ACK, 1001, 5001, 1000));
        assert_eq!(state(c3), TcpState::Closing);
        let (c4, _) = tcp_inbound(established(), &seg(FIN | ACK, 5001, 1001, 10)).expect("fin");
        assert_eq!(state(c4), TcpState::Closing);
    }

    /// A FIN each way (in either order) is `TimeWait`, the only closing state that may hand its port over;
    /// repeated FINs of one side stay `Closing`; an inbound FIN outside the window does not finish the flow.
    #[test]
    fn fin_both_ways_is_time_wait() {
        let out_fin = tcp_outbound(established(), &seg(FIN | ACK, 1001, 5001, 1000));
        let again = tcp_outbound(out_fin, &seg(FIN | ACK, 1001, 5001, 1000));
        assert_eq!(state(again), TcpState::Closing);
        assert!(!tcp_finished(again));
        let (forged, _) =
            tcp_inbound(out_fin, &seg(FIN | ACK, 0x9000_0000, 1002, 10)).expect("fwd");
        assert_eq!(state(forged), TcpState::Closing);
        let (tw, _) = tcp_inbound(out_fin, &seg(FIN | ACK, 5001, 1002, 10)).expect("fin");
        assert_eq!(state(tw), TcpState::TimeWait);
        assert!(tcp_finished(tw));
        let (in_fin, _) = tcp_inbound(established(), &seg(FIN | ACK, 5001, 1001, 10)).expect("fin");
        let (in_again, _) = tcp_inbound(in_fin, &seg(FIN | ACK, 5001, 1001, 10)).expect("fin");
        assert_eq!(state(in_again), TcpState::Closing);
        let tw2 = tcp_outbound(in_again, &seg(FIN | ACK, 1001, 5002, 1000));
        assert_eq!(state(tw2), TcpState::TimeWait);
        assert!(tcp_finished(tw2));
        // a later ACK keeps it over; RST too; a new SYN from the pod reopens
        let ack = tcp_outbound(tw2, &seg(ACK, 1002, 5002, 1000));
        assert_eq!(state(ack), TcpState::TimeWait);
        assert!(tcp_finished(tcp_outbound(
            established(),
            &seg(RST, 1001, 0, 0)
        )));
        assert!(!tcp_finished(established()));
        assert_eq!(
            state(tcp_outbound(tw2, &seg(SYN, 7, 0, 100))),
            TcpState::SynSent
        );
    }

    #[test]
    fn fin_outside_the_window_changes_nothing() {
        let c = established();
        // before the window, beyond it, far away (a blind forgery): forwarded, no state change, no refresh
        for seq in [5000, 5001 + 1000 * 128, 0x8000_0000] {
            let (c2, refresh) = tcp_inbound(c, &seg(FIN | ACK, seq, 1001, 10)).expect("forwarded");
            assert_eq!(state(c2), TcpState::Established, "{seq}");
            assert_eq!(c2, c, "{seq}");
            assert!(!refresh, "{seq}");
        }
        // inside: first byte, last byte of the window; a retransmission whose FIN lands on the expected byte
        for (seq, len) in [(5001, 0), (5001 + 1000 * 128 - 1, 0), (4901, 100)] {
            let mut s = seg(FIN | ACK, seq, 1001, 10);
            s.payload_len = len;
            let (c2, _) = tcp_inbound(c, &s).expect("fin");
            assert_eq!(state(c2), TcpState::Closing, "{seq}");
        }
        // in SynReceived the window starts at the remote's ISN + 1
        let syn = tcp_outbound(0, &seg(SYN, 1000, 0, 1000));
        let (sr, _) = tcp_inbound(syn, &seg(SYN | ACK, 5000, 1001, 2000)).expect("syn-ack");
        let (x, _) = tcp_inbound(sr, &seg(FIN, 0x9000_0000, 0, 0)).expect("forwarded");
        assert_eq!(state(x), TcpState::SynReceived);
        let (x, _) = tcp_inbound(sr, &seg(FIN, 5001, 0, 0)).expect("fin");
        assert_eq!(state(x), TcpState::Closing);
    }

    #[test]
    fn syn_ack_with_wrong_ack_does_not_advance() {
        let c = tcp_outbound(0, &seg(SYN, 1000, 0, 1000));
        let (c, _) = tcp_inbound(c, &seg(SYN | ACK, 5000, 777, 2000)).expect("forwarded");
        assert_eq!(state(c), TcpState::SynSent);
    }

    #[test]
    fn rst_window_check() {
        let c = established();
        // exactly the expected sequence number, and inside the window
        for seq in [5001, 5001 + 1000 * 128 - 1] {
            let (r, refresh) = tcp_inbound(c, &seg(RST, seq, 0, 0)).expect("valid rst");
            assert_eq!(state(r), TcpState::Closed);
            assert!(refresh);
        }
        // before the window, beyond it, far away
        for seq in [5000, 5001 + 1000 * 128, 5001u32.wrapping_add(1 << 31)] {
            assert!(tcp_inbound(c, &seg(RST, seq, 0, 0)).is_none(), "{seq}");
        }
    }

    #[test]
    fn rst_in_syn_sent_must_ack_the_syn() {
        let c = tcp_outbound(0, &seg(SYN, 1000, 0, 1000));
        assert!(tcp_inbound(c, &seg(RST, 0, 0, 0)).is_none());
        assert!(tcp_inbound(c, &seg(RST | ACK, 0, 999, 0)).is_none());
        let (r, _) = tcp_inbound(c, &seg(RST | ACK, 0, 1001, 0)).expect("valid");
        assert_eq!(state(r), TcpState::Closed);
    }

    #[test]
    fn outbound_rst_closes_and_syn_reopens() {
        let c = tcp_outbound(established(), &seg(RST, 1001, 0, 0));
        assert_eq!(state(c), TcpState::Closed);
        let c = tcp_outbound(c, &seg(SYN, 9000, 0, 100));
        assert_eq!(state(c), TcpState::SynSent);
    }

    #[test]
    fn tcp_bits_do_not_touch_lifecycle() {
        let base = (PHASE_LIVE << PHASE_SHIFT) | (3 * HOLD);
        let c = tcp_outbound(base, &seg(SYN, u32::MAX, 0, u16::MAX));
        assert_eq!(phase_of(c), PHASE_LIVE);
        assert_eq!(holds_of(c), 3);
        assert_eq!(tcp_fields(c), (S_SYN_SENT, 0, u16::MAX));
    }
}
