//! Bounded memory that lets the later fragments of a datagram follow its first fragment.
//!
//! Only the first fragment carries the ports, so only it can find or create the flow. When it is translated,
//! the pipeline records what was done under the datagram's identity `(src, dst, protocol, identification)`;
//! the later fragments look that up and get the same address rewrite and the same destination. The table is
//! a fixed array, 4-way set-associative, allocated once: a full set replaces its expired or oldest entry, so
//! memory never grows and an attacker can at worst evict other datagrams' records (whose later fragments are
//! then dropped and counted as `fragment_no_flow`).
//!
//! Later fragments that arrive *before* the first are dropped (`fragment_no_flow`); the sender's
//! retransmission recovers, exactly as when a reassembly buffer would have overflowed.

use core::net::IpAddr;
use core::time::Duration;

use crate::Instant;

/// A datagram's identity: all its fragments share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol.
    pub proto: u8,
    /// IPv4 / IPv6 identification.
    pub ident: u32,
}

impl FragKey {
    fn hash(&self) -> u64 {
        fn addr_bits(a: &IpAddr) -> u128 {
            match a {
                IpAddr::V4(v) => u128::from(u32::from(*v)),
                IpAddr::V6(v) => u128::from(*v),
            }
        }
        let x = addr_bits(&self.src) ^ addr_bits(&self.dst).rotate_left(64);
        #[allow(clippy::cast_possible_truncation)] // folding 128 bits into 64 on purpose
        let folded = (x as u64) ^ ((x >> 64) as u64);
        let mut h = folded ^ (u64::from(self.ident) << 8) ^ u64::from(self.proto);
        // splitmix64 finaliser
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }
}

const WAYS: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Slot<T> {
    key: FragKey,
    value: T,
    expires: Instant,
}

/// A fixed-size table from datagram identity to what its first fragment decided (`T`).
#[derive(Debug)]
pub struct FragTable<T: Copy> {
    slots: Box<[Option<Slot<T>>]>,
    sets: usize,
    lifetime: Duration,
}

impl<T: Copy> FragTable<T> {
    /// A table holding up to `capacity` datagrams (rounded up to a multiple of 4), each for `lifetime`
    /// after its first fragment.
    pub fn new(capacity: usize, lifetime: Duration) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1);
        FragTable {
            slots: vec![None; sets * WAYS].into_boxed_slice(),
            sets,
            lifetime,
        }
    }

    fn set(&self, key: &FragKey) -> core::ops::Range<usize> {
        let h = key.hash();
        #[allow(clippy::cast_possible_truncation)] // reduced modulo a usize
        let s = (h % self.sets as u64) as usize;
        s * WAYS..s * WAYS + WAYS
    }

    /// Records `value` for the datagram `key` (its first fragment was just translated).
    pub fn insert(&mut self, key: FragKey, value: T, now: Instant) {
        let range = self.set(&key);
        let slot = Slot {
            key,
            value,
            expires: now + self.lifetime,
        };
        let set = &mut self.slots[range];
        // Same key, then an empty or expired slot, then the one closest to expiry.
        let idx = set
            .iter()
            .position(|s| s.is_some_and(|s| s.key == key))
            .or_else(|| set.iter().position(|s| s.is_none_or(|s| s.expires <= now)))
            .unwrap_or_else(|| {
                (0..WAYS)
                    .min_by_key(|&i| set[i].map_or(Instant::ZERO, |s| s.expires))
                    .unwrap_or(0)
            });
        set[idx] = Some(slot);
    }

    /// What the first fragment of datagram `key` decided, if recorded and not expired.
    pub fn lookup(&self, key: &FragKey, now: Instant) -> Option<T> {
        self.slots[self.set(key)]
            .iter()
            .flatten()
            .find(|s| s.key == *key && s.expires > now)
            .map(|s| s.value)
    }

    /// Forgets datagram `key` (its last fragment has passed).
    pub fn remove(&mut self, key: &FragKey) {
        let range = self.set(key);
        for s in &mut self.slots[range] {
            if s.is_some_and(|s| s.key == *key) {
                *s = None;
            }
        }
    }

    /// Maximum number of datagrams tracked at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ident: u32) -> FragKey {
        FragKey {
            src: "10.244.1.5".parse().unwrap(),
            dst: "192.0.2.10".parse().unwrap(),
            proto: 17,
            ident,
        }
    }

    #[test]
    fn later_fragments_find_the_first_until_expiry() {
        let mut t = FragTable::new(16, Duration::from_secs(5));
        t.insert(key(7), 42u32, Instant::from_secs(1));
        assert_eq!(t.lookup(&key(7), Instant::from_secs(2)), Some(42));
        assert_eq!(t.lookup(&key(8), Instant::from_secs(2)), None);
        assert_eq!(t.lookup(&key(7), Instant::from_secs(6)), None);
        t.remove(&key(7));
        assert_eq!(t.lookup(&key(7), Instant::from_secs(2)), None);
    }

    #[test]
    fn memory_is_bounded_and_recent_entries_survive() {
        let mut t = FragTable::new(8, Duration::from_secs(30));
        for i in 0..10_000u32 {
            t.insert(key(i), i, Instant::from_millis(u64::from(i)));
        }
        assert_eq!(t.capacity(), 8);
        // The newest record is always retrievable.
        assert_eq!(t.lookup(&key(9_999), Instant::from_secs(10)), Some(9_999));
        let live = (0..10_000u32)
            .filter(|i| t.lookup(&key(*i), Instant::from_secs(10)).is_some())
            .count();
        assert!(live <= 8);
    }
}
