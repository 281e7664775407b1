//! External port pools: one pool per (egress IP, protocol), random allocation (RFC 6056) with a reuse delay.
//!
//! Each egress IP has up to three *lanes*: TCP, UDP and the ICMP query identifier of its family (ICMP for an
//! IPv4 egress IP, ICMPv6 for an IPv6 one). A lane is an array of [`AtomicU16`] port states, one per port of
//! the configured [`PortRange`], allocated on first use (so protocols nobody uses cost nothing):
//!
//! * `0` — free (never used, or free again),
//! * `0xFFFF` — owned by one endpoint-independent mapping,
//! * `1..=0xFFFE` — released at second `s` with `1 + s % 0xFFFE`; the port becomes available once more than
//!   `reuse_delay` whole seconds have passed (a released port is never handed out again within the delay; the
//!   16-bit clock wraps every 18.2 hours, so a port released exactly a multiple of that ago looks cooling for
//!   one more delay, which is harmless).
//!
//! Allocation draws a random start in the range and probes linearly (RFC 6056 algorithm 1, "simple port
//! randomization", with increment on collision); a compare-and-swap from an available state to *owned* is the
//! linearization point, so two threads never get the same port. The probe is capped at `MAX_PROBES` (512) states
//! (ranges up to that size are probed whole, so the answer is exact; larger ones in short runs from
//! pseudo-random offsets), so that a refused allocation on a pool whose ports are all cooling costs
//! microseconds, not a scan of 64 Ki states. Release is a compare-and-swap from *owned* to the release stamp
//! (or straight to *free* for a port no packet used). Nothing here
//! takes a lock except the one-time initialisation of a lane ([`OnceLock`]).
//!
//! The conntrack table decides *which* mapping owns a port (endpoint-independent mapping, RFC 4787); this
//! module only guarantees that a port has at most one owner and honours the reuse delay.

use core::net::IpAddr;
use core::time::Duration;
#[cfg(loom)]
use loom::sync::atomic::AtomicU16;
use std::collections::HashMap;
#[cfg(not(loom))]
use std::sync::atomic::AtomicU16;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use crate::flow::Proto;
use crate::time::Instant;

/// Inclusive range of external ports (or ICMP identifiers) handed out, by default `1024..=65535`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest port handed out.
    pub min: u16,
    /// Highest port handed out (inclusive).
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            min: 1024,
            max: 65535,
        }
    }
}

impl PortRange {
    /// Number of ports in the range (0 if `max < min`).
    pub fn len(&self) -> u32 {
        if self.max >= self.min {
            u32::from(self.max - self.min) + 1
        } else {
            0
        }
    }

    /// True when the range holds no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Use of one pool, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// Egress IP.
    pub ip: IpAddr,
    /// Protocol.
    pub proto: Proto,
    /// Ports currently owned by a mapping (cooling ports are not counted).
    pub in_use: u32,
    /// Ports in the range.
    pub capacity: u32,
}

/// Index of an egress IP in [`PortPools`].
pub(crate) type PoolId = u16;

/// Most egress IPs (pool ids are stored in 13 bits in a flow slot).
pub const MAX_POOLS: usize = 8191;

const FREE: u16 = 0;
const OWNED: u16 = 0xFFFF;
const CLOCK_MOD: u64 = 0xFFFE;

/// Most port states [`PortPools::allocate`] examines for one allocation.
pub(crate) const MAX_PROBES: u32 = 512;
/// Consecutive ports probed from each offset of a range larger than [`MAX_PROBES`] (32 states: one or two
/// cache lines).
const PROBE_RUN: u32 = 32;

/// splitmix64 finaliser: the next probe offset of a capped allocation.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hasher of the egress-IP index: a multiply-rotate fold (FxHash's), several times cheaper than the
/// default SipHash on every new flow's pool lookup (measured: SipHash was 2–3 % of a new flow). The keys are
/// the configured egress IPs, not chosen by pods, so the hash needs no key.
#[derive(Debug, Clone, Copy, Default)]
struct BuildIpHasher;

impl core::hash::BuildHasher for BuildIpHasher {
    type Hasher = IpHasher;
    fn build_hasher(&self) -> IpHasher {
        IpHasher(0)
    }
}

#[derive(Debug)]
struct IpHasher(u64);

impl IpHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl core::hash::Hasher for IpHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[allow(clippy::cast_possible_truncation)] // folding both halves
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[allow(clippy::cast_sign_loss)] // bits, not a value
    fn write_isize(&mut self, i: isize) {
        self.add(i as u64);
    }
}

/// The port pools of every egress IP. `Send + Sync`; shared by all workers through the conntrack table.
#[derive(Debug)]
pub struct PortPools {
    range: PortRange,
    pools: Vec<Pool>,
    by_ip: HashMap<IpAddr, PoolId, BuildIpHasher>,
}

#[derive(Debug)]
struct Pool {
    ip: IpAddr,
    lanes: [Lane; 3],
}

#[derive(Debug, Default)]
struct Lane {
    ports: OnceLock<Box<[AtomicU16]>>,
    in_use: AtomicU32,
}

impl Lane {
    /// The port states, allocated (all free) on first use.
    fn cells(&self, n: u32) -> &[AtomicU16] {
        self.ports
            .get_or_init(|| (0..n).map(|_| AtomicU16::new(FREE)).collect())
    }
}

impl PortPools {
    /// Pools for `egress_ips` (duplicates are ignored; at most 8191 IPs, more are ignored), each handing out
    /// ports from `range`.
    pub fn new(egress_ips: &[IpAddr], range: PortRange) -> PortPools {
        let mut pools = Vec::new();
        let mut by_ip = HashMap::with_hasher(BuildIpHasher);
        for &ip in egress_ips {
            if by_ip.contains_key(&ip) || pools.len() >= MAX_POOLS {
                continue;
            }
            #[allow(clippy::cast_possible_truncation)] // bounded by the check above
            by_ip.insert(ip, pools.len() as PoolId);
            pools.push(Pool {
                ip,
                lanes: Default::default(),
            });
        }
        PortPools {
            range,
            pools,
            by_ip,
        }
    }

    /// The configured range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Number of egress IPs.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// True when no egress IP is configured.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// Ports in use per (egress IP, protocol), for metrics (not for the hot path). Lists every protocol of the
    /// IP's family, used or not.
    pub fn usage(&self) -> Vec<PoolUsage> {
        let mut out = Vec::with_capacity(self.pools.len() * 3);
        for pool in &self.pools {
            for (lane, proto) in pool.lanes.iter().zip(lane_protos(pool.ip)) {
                out.push(PoolUsage {
                    ip: pool.ip,
                    proto,
                    in_use: lane.in_use.load(Ordering::Relaxed),
                    capacity: self.range.len(),
                });
            }
        }
        out
    }

    /// The pool of `ip` for `proto`, if `ip` is configured and `proto` belongs to its family.
    pub(crate) fn pool_id(&self, ip: IpAddr, proto: Proto) -> Option<PoolId> {
        let id = *self.by_ip.get(&ip)?;
        lane_index(ip, proto).map(|_| id)
    }

    /// The egress IP of pool `id`.
    pub(crate) fn ip(&self, id: PoolId) -> IpAddr {
        self.pools[usize::from(id)].ip
    }

    fn lane(&self, id: PoolId, proto: Proto) -> Option<&Lane> {
        let pool = self.pools.get(usize::from(id))?;
        lane_index(pool.ip, proto).map(|i| &pool.lanes[i])
    }

    /// Draws the random offset where [`allocate`](Self::allocate) will start probing, and starts fetching
    /// that port's state so that the miss overlaps other work.
    pub(crate) fn draw_start(&self, id: PoolId, proto: Proto, rng: &mut Rng) -> u32 {
        let n = self.range.len().max(1);
        let start = rng.below(n);
        if let Some(cell) = self
            .lane(id, proto)
            .and_then(|l| l.ports.get())
            .and_then(|p| p.get(start as usize))
        {
            prefetch((cell as *const AtomicU16).cast());
        }
        start
    }

    /// Starts fetching the port state where [`draw_start`](Self::draw_start) with `rng` will start probing,
    /// without drawing (for a batch of inserts, which draws later, in order).
    pub(crate) fn prefetch_start(&self, id: PoolId, proto: Proto, rng: &Rng) {
        self.draw_start(id, proto, &mut rng.clone());
    }

    /// Takes an available port of pool `id` for `proto`, probing from offset `start` (random, from
    /// [`draw_start`](Self::draw_start)); `None` when none is available (all owned or cooling), or when
    /// [`MAX_PROBES`] probes found none. A range of at most `MAX_PROBES` ports is probed whole (exact answer);
    /// a larger one in runs of [`PROBE_RUN`] consecutive ports, each run from a new offset derived from
    /// `start`, so that a refused allocation costs a bounded amount of work even when every port is cooling.
    pub(crate) fn allocate(
        &self,
        id: PoolId,
        proto: Proto,
        now: Instant,
        reuse_delay: Duration,
        start: u32,
    ) -> Option<u16> {
        let lane = self.lane(id, proto)?;
        let n = self.range.len();
        if n == 0 || lane.in_use.load(Ordering::Relaxed) >= n {
            return None;
        }
        let ports = lane.cells(n);
        let now_s = now.as_secs();
        let delay_s = reuse_delay.as_secs() + u64::from(reuse_delay.subsec_nanos() > 0);
        let (runs, run_len) = if n <= MAX_PROBES {
            (1, n)
        } else {
            (MAX_PROBES / PROBE_RUN, PROBE_RUN)
        };
        let mut seed = u64::from(start);
        let mut off = start % n;
        for run in 0..runs {
            if run > 0 {
                seed = mix(seed);
                #[allow(clippy::cast_possible_truncation)] // < n
                let o = (((seed >> 32) * u64::from(n)) >> 32) as u32;
                off = o;
            }
            for _ in 0..run_len {
                if take(&ports[off as usize], now_s, delay_s) {
                    lane.in_use.fetch_add(1, Ordering::Relaxed);
                    #[allow(clippy::cast_possible_truncation)]
                    // off < n ≤ 65536 and min + off ≤ max
                    return Some(self.range.min.wrapping_add(off as u16));
                }
                off += 1;
                if off == n {
                    off = 0;
                }
            }
        }
        None
    }

    /// Takes port `port` of pool `id` for `proto` whether it is free or cooling: for a flow whose port was
    /// chosen by another table (state sync; its owner honoured the reuse delay). False when the port is
    /// owned already, or outside the range.
    pub(crate) fn claim(&self, id: PoolId, proto: Proto, port: u16) -> bool {
        let Some(lane) = self.lane(id, proto) else {
            return false;
        };
        let n = self.range.len();
        let off = u32::from(port.wrapping_sub(self.range.min));
        if port < self.range.min || off >= n {
            return false;
        }
        let ports = lane.cells(n);
        let cell = &ports[off as usize];
        let won = cell
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
                (v != OWNED).then_some(OWNED)
            })
            .is_ok();
        if won {
            lane.in_use.fetch_add(1, Ordering::Relaxed);
        }
        won
    }

    /// Gives back a port taken with [`allocate`](Self::allocate): it becomes available again after the reuse
    /// delay, counted from `now`. A port that is not owned is left alone.
    pub(crate) fn release(&self, id: PoolId, proto: Proto, port: u16, now: Instant) {
        #[allow(clippy::cast_possible_truncation)] // < CLOCK_MOD + 1 ≤ 0xFFFE
        let stamp = 1 + (now.as_secs() % CLOCK_MOD) as u16;
        self.give_back(id, proto, port, stamp);
    }

    /// Gives back a port taken with [`allocate`](Self::allocate) that no packet was ever translated to (a
    /// mapping that lost its creation race or was never published): it is free again at once.
    pub(crate) fn release_unused(&self, id: PoolId, proto: Proto, port: u16) {
        self.give_back(id, proto, port, FREE);
    }

    fn give_back(&self, id: PoolId, proto: Proto, port: u16, to: u16) {
        let Some(lane) = self.lane(id, proto) else {
            return;
        };
        let Some(cell) = lane
            .ports
            .get()
            .and_then(|p| p.get(usize::from(port.wrapping_sub(self.range.min))))
        else {
            return;
        };
        if give(cell, to) {
            lane.in_use.fetch_sub(1, Ordering::Relaxed);
        } else {
            debug_assert!(false, "released a port that was not owned");
        }
    }

    /// True when `port` of pool `id` for `proto` is owned by a mapping (for tests).
    #[cfg(test)]
    pub(crate) fn is_owned(&self, id: PoolId, proto: Proto, port: u16) -> bool {
        self.lane(id, proto)
            .and_then(|l| l.ports.get())
            .and_then(|p| p.get(usize::from(port.wrapping_sub(self.range.min))))
            .is_some_and(|c| c.load(Ordering::Relaxed) == OWNED)
    }
}

/// Hints the CPU to fetch the cache line holding `p` (no effect on other architectures). The conntrack
/// table uses it too.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never dereferences `p` architecturally and never faults.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn lane_protos(ip: IpAddr) -> [Proto; 3] {
    if ip.is_ipv4() {
        [Proto::Tcp, Proto::Udp, Proto::Icmp]
    } else {
        [Proto::Tcp, Proto::Udp, Proto::Icmpv6]
    }
}

fn lane_index(ip: IpAddr, proto: Proto) -> Option<usize> {
    match (proto, ip.is_ipv4()) {
        (Proto::Tcp, _) => Some(0),
        (Proto::Udp, _) => Some(1),
        (Proto::Icmp, true) | (Proto::Icmpv6, false) => Some(2),
        _ => None,
    }
}

/// Takes the port of `cell` if it is available: the compare-and-swap to *owned* is the linearization point
/// of an allocation (at most one caller wins a state; modelled by `tests::loom_*`).
#[inline]
fn take(cell: &AtomicU16, now_s: u64, delay_s: u64) -> bool {
    let v = cell.load(Ordering::Relaxed);
    available(v, now_s, delay_s)
        && cell
            .compare_exchange(v, OWNED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
}

/// Releases an owned port to state `to` (a release stamp or *free*); false when it was not owned.
fn give(cell: &AtomicU16, to: u16) -> bool {
    cell.compare_exchange(OWNED, to, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

fn available(v: u16, now_s: u64, delay_s: u64) -> bool {
    match v {
        FREE => true,
        OWNED => false,
        stamp => {
            let released = u64::from(stamp - 1);
            let age = (now_s % CLOCK_MOD + CLOCK_MOD - released) % CLOCK_MOD;
            age > delay_s
        }
    }
}

/// A small, fast, non-cryptographic PRNG (wyrand), one per worker, seeded by the caller (the core reads no
/// OS randomness). Good enough for RFC 6056 port randomisation when seeded from a real entropy source.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        #[allow(clippy::cast_possible_truncation)] // folding the 128-bit product
        let r = (t >> 64) as u64 ^ t as u64;
        r
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        #[allow(clippy::cast_possible_truncation)] // high half
        let r = (self.next_u64() >> 32) as u32;
        r
    }

    /// A uniform-enough value in `0..n` (multiply-shift; `n` > 0).
    pub fn below(&mut self, n: u32) -> u32 {
        #[allow(clippy::cast_possible_truncation)] // < n
        let r = ((u64::from(self.next_u32()) * u64::from(n)) >> 32) as u32;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    const DELAY: Duration = Duration::from_secs(120);

    #[test]
    fn default_range() {
        let r = PortRange::default();
        assert_eq!((r.min, r.max, r.len()), (1024, 65535, 64512));
        assert!(PortRange { min: 5, max: 4 }.is_empty());
    }

    #[test]
    fn allocates_distinct_ports_until_exhausted() {
        let pools = PortPools::new(&[V4], PortRange { min: 100, max: 109 });
        let id = pools.pool_id(V4, Proto::Udp).expect("pool");
        let mut rng = Rng::new(1);
        let mut got = std::collections::HashSet::new();
        for _ in 0..10 {
            let p = pools
                .allocate(id, Proto::Udp, Instant::ZERO, DELAY, rng.next_u32())
                .expect("port");
            assert!((100..=109).contains(&p));
            assert!(got.insert(p));
        }
        assert_eq!(
            pools.allocate(id, Proto::Udp, Instant::ZERO, DELAY, rng.next_u32()),
            None
        );
        // other protocols are independent
        assert!(pools
            .allocate(id, Proto::Tcp, Instant::ZERO, DELAY, rng.next_u32())
            .is_some());
        let u = pools.usage();
        assert_eq!(u.len(), 3);
        assert_eq!(u[1].proto, Proto::Udp);
        assert_eq!((u[1].in_use, u[1].capacity), (10, 10));
    }

    #[test]
    fn released_port_waits_for_the_reuse_delay() {
        let pools = PortPools::new(&[V4], PortRange { min: 7, max: 7 });
        let id = pools.pool_id(V4, Proto::Tcp).expect("pool");
        let mut rng = Rng::new(2);
        let t0 = Instant::from_millis(10_900);
        assert_eq!(
            pools.allocate(id, Proto::Tcp, t0, DELAY, rng.next_u32()),
            Some(7)
        );
        pools.release(id, Proto::Tcp, 7, t0);
        assert!(!pools.is_owned(id, Proto::Tcp, 7));
        for ms in [10_900, 60_000, 130_000, 130_899] {
            assert_eq!(
                pools.allocate(
                    id,
                    Proto::Tcp,
                    Instant::from_millis(ms),
                    DELAY,
                    rng.next_u32()
                ),
                None,
                "{ms}"
            );
        }
        assert_eq!(
            pools.allocate(
                id,
                Proto::Tcp,
                Instant::from_secs(132),
                DELAY,
                rng.next_u32()
            ),
            Some(7)
        );
    }

    /// All owned but one free port just behind the start: an uncapped probe walks the whole range to it, the
    /// capped one gives up after `MAX_PROBES` states (this start's runs miss the port).
    #[test]
    fn probe_of_a_large_range_is_capped() {
        let pools = PortPools::new(&[V4], PortRange::default());
        let id = pools.pool_id(V4, Proto::Udp).expect("pool");
        let p = pools
            .allocate(id, Proto::Udp, Instant::ZERO, DELAY, 0)
            .expect("port");
        pools.release_unused(id, Proto::Udp, p);
        // every port released at t = 1 s (cooling) but offset 99
        let ports = pools
            .lane(id, Proto::Udp)
            .expect("lane")
            .ports
            .get()
            .expect("ports");
        for (i, c) in ports.iter().enumerate() {
            c.store(if i == 99 { FREE } else { 2 }, Ordering::Relaxed);
        }
        let t1 = Instant::from_secs(2);
        assert_eq!(pools.allocate(id, Proto::Udp, t1, DELAY, 100), None);
        // every port cooling: refused quickly (a full scan took ~80 µs; allow a slow shared machine)
        ports[99].store(2, Ordering::Relaxed);
        let reps = 1000u32;
        let begin = std::time::Instant::now();
        for s in 0..reps {
            assert_eq!(pools.allocate(id, Proto::Udp, t1, DELAY, s * 61), None);
        }
        let per = begin.elapsed() / reps;
        assert!(
            per < std::time::Duration::from_micros(40),
            "{per:?} per refusal"
        );
        // a start whose first run covers the free port finds it
        ports[99].store(FREE, Ordering::Relaxed);
        assert_eq!(
            pools.allocate(id, Proto::Udp, t1, DELAY, 90),
            Some(1024 + 99)
        );
    }

    /// A range no larger than the cap is probed whole: exact answer from any start.
    #[test]
    fn probe_of_a_small_range_is_exact() {
        let n = u16::try_from(MAX_PROBES).expect("small");
        let range = PortRange {
            min: 1000,
            max: 1000 + n - 1,
        };
        let pools = PortPools::new(&[V4], range);
        let id = pools.pool_id(V4, Proto::Tcp).expect("pool");
        for _ in 0..MAX_PROBES {
            assert!(pools
                .allocate(id, Proto::Tcp, Instant::ZERO, DELAY, 7)
                .is_some());
        }
        for p in range.min..=range.max {
            pools.release(id, Proto::Tcp, p, Instant::ZERO);
        }
        pools
            .lane(id, Proto::Tcp)
            .expect("lane")
            .ports
            .get()
            .expect("ports")[3]
            .store(FREE, Ordering::Relaxed);
        let mut rng = Rng::new(5);
        let t1 = Instant::from_secs(1);
        assert_eq!(
            pools.allocate(id, Proto::Tcp, t1, DELAY, rng.next_u32()),
            Some(1003)
        );
        assert_eq!(pools.allocate(id, Proto::Tcp, t1, DELAY, 4), None);
    }

    /// Releasing a port that is not owned (a double release) must not restart its reuse delay.
    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "not owned"))]
    fn release_of_a_port_not_owned_changes_nothing() {
        let pools = PortPools::new(&[V4], PortRange { min: 7, max: 7 });
        let id = pools.pool_id(V4, Proto::Udp).expect("pool");
        let p = pools
            .allocate(id, Proto::Udp, Instant::ZERO, DELAY, 0)
            .expect("port");
        pools.release(id, Proto::Udp, p, Instant::from_secs(0));
        pools.release(id, Proto::Udp, p, Instant::from_secs(100)); // stray second release
        assert_eq!(pools.usage()[1].in_use, 0);
        assert_eq!(
            pools.allocate(id, Proto::Udp, Instant::from_secs(122), DELAY, 0),
            Some(7),
            "delay counted from the real release"
        );
    }

    /// A port no packet used goes straight back to free, without the reuse delay.
    #[test]
    fn unused_port_is_free_at_once() {
        let pools = PortPools::new(&[V4], PortRange { min: 7, max: 7 });
        let id = pools.pool_id(V4, Proto::Tcp).expect("pool");
        let p = pools
            .allocate(id, Proto::Tcp, Instant::ZERO, DELAY, 0)
            .expect("port");
        pools.release_unused(id, Proto::Tcp, p);
        assert_eq!(pools.usage()[0].in_use, 0);
        assert_eq!(
            pools.allocate(id, Proto::Tcp, Instant::from_secs(1), DELAY, 0),
            Some(7)
        );
    }

    #[test]
    fn family_decides_icmp_lane() {
        let v6: IpAddr = "2001:db8::1".parse().expect("v6");
        let pools = PortPools::new(&[V4, v6, V4], PortRange::default());
        assert_eq!(pools.len(), 2);
        assert!(pools.pool_id(V4, Proto::Icmp).is_some());
        assert!(pools.pool_id(V4, Proto::Icmpv6).is_none());
        assert!(pools.pool_id(v6, Proto::Icmpv6).is_some());
        assert!(pools.pool_id(v6, Proto::Icmp).is_none());
        assert!(pools
            .pool_id("192.0.2.9".parse().expect("ip"), Proto::Tcp)
            .is_none());
    }

    #[test]
    fn rng_is_deterministic_and_spread() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut buckets = [0u32; 8];
        for _ in 0..8000 {
            buckets[a.below(8) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&c| (800..1200).contains(&c)),
            "{buckets:?}"
        );
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Two allocators race for one free port: exactly one owns it.
    #[test]
    fn loom_one_owner_per_port() {
        loom::model(|| {
            let cell = Arc::new(AtomicU16::new(FREE));
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let cell = Arc::clone(&cell);
                    loom::thread::spawn(move || take(&cell, 0, 0))
                })
                .collect();
            let won = hs.into_iter().map(|h| h.join().expect("join"));
            assert_eq!(won.filter(|&w| w).count(), 1);
            assert_eq!(cell.load(Ordering::Relaxed), OWNED);
        });
    }

    /// A release races an allocation of the same port: the allocator gets it only after the reuse delay
    /// (here: never, at the same second), an unused give-back makes it free at once, and a second give-back
    /// of a port no longer owned changes nothing.
    #[test]
    fn loom_release_races_allocation() {
        loom::model(|| {
            let cell = Arc::new(AtomicU16::new(OWNED));
            let c2 = Arc::clone(&cell);
            let releaser = loom::thread::spawn(move || (give(&c2, 1), give(&c2, FREE)));
            let c3 = Arc::clone(&cell);
            let taker = loom::thread::spawn(move || take(&c3, 0, 120));
            let (first, second) = releaser.join().expect("join");
            let took = taker.join().expect("join");
            assert!(first, "the owner's release succeeds");
            assert!(!second, "the port was no longer owned");
            assert!(!took, "a port released now is cooling for 120 s");
            assert_eq!(cell.load(Ordering::Relaxed), 1);
        });
    }

    /// A mapping that lost its race gives its port back unused (free at once) while another thread tries to
    /// allocate it: the allocator wins only after the give-back, and then it is the only owner.
    #[test]
    fn loom_unused_give_back_then_reallocation() {
        loom::model(|| {
            let cell = Arc::new(AtomicU16::new(OWNED));
            let c2 = Arc::clone(&cell);
            let loser = loom::thread::spawn(move || give(&c2, FREE));
            let c3 = Arc::clone(&cell);
            let taker = loom::thread::spawn(move || take(&c3, 0, 120));
            assert!(loser.join().expect("join"));
            let took = taker.join().expect("join");
            let end = cell.load(Ordering::Relaxed);
            assert_eq!(
                end == OWNED,
                took,
                "owned at the end exactly when the allocator won"
            );
            if !took {
                assert_eq!(end, FREE);
            }
        });
    }
}
