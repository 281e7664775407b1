//! The resolved neighbours of one uplink as the workers read them: a fixed open-addressed table of atomics
//! (linear probing, at most half full), read without a lock and written in place by the one thread that holds
//! the uplink's cache lock.
//!
//! Each slot is a sequence lock made of atomics only (no `unsafe`): the writer makes the sequence odd, stores
//! the fields and makes it even again; a reader that sees the same even sequence before and after reading the
//! fields has a consistent entry (the pattern of Boehm, "Can seqlocks get along with programming language
//! memory models?", MSPC 2012, with a release fence before the field stores and an acquire fence after the
//! field loads). A change of one entry writes one slot (two when a removal shifts a neighbour back): no reader
//! copies anything. A reader racing a writer may miss an entry once; the worker then takes its slow path
//! (park the frame, ask the cache), which finds the entry.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use forwarder_core::wire::ethernet::MacAddr;

/// Slots per uplink: a power of two, at least twice the most entries it ever holds.
pub(super) const SLOTS: usize = 16384;
const MASK: usize = SLOTS - 1;
/// `meta`: the MAC in the low 48 bits, then these flags.
const OCCUPIED: u64 = 1 << 48;
const V6: u64 = 1 << 49;
/// Sequence reads before a reader gives up on a slot a writer is busy with (and reports a miss).
const SPINS: u32 = 64;

#[derive(Debug, Default)]
struct Slot {
    seq: AtomicU64,
    hi: AtomicU64,
    lo: AtomicU64,
    meta: AtomicU64,
}

/// One uplink's resolved entries.
#[derive(Debug)]
pub(super) struct Table {
    slots: Box<[Slot]>,
    hasher: std::collections::hash_map::RandomState,
}

/// An address as the three words a slot stores.
fn key(ip: IpAddr) -> (u64, u64, u64) {
    match ip {
        IpAddr::V4(a) => (0, u64::from(u32::from(a)), 0),
        IpAddr::V6(a) => {
            let b = u128::from(a);
            #[allow(clippy::cast_possible_truncation)] // the two halves of the address, on purpose
            ((b >> 64) as u64, b as u64, V6)
        }
    }
}

fn mac_bits(mac: MacAddr) -> u64 {
    mac.iter().fold(0, |acc, b| (acc << 8) | u64::from(*b))
}

fn mac_of(meta: u64) -> MacAddr {
    let b = meta.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

impl Default for Table {
    fn default() -> Self {
        Table {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl Table {
    fn home(&self, ip: IpAddr) -> usize {
        // The keyed hash (random per table) keeps chosen addresses from piling up in one run of slots.
        #[allow(clippy::cast_possible_truncation)] // only the low bits are used
        let h = self.hasher.hash_one(ip) as usize;
        h & MASK
    }

    /// A consistent copy of slot `i`, or `None` while a writer is busy with it.
    fn read(&self, i: usize) -> Option<(u64, u64, u64)> {
        let s = &self.slots[i & MASK];
        for _ in 0..SPINS {
            let before = s.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let v = (
                    s.hi.load(Ordering::Relaxed),
                    s.lo.load(Ordering::Relaxed),
                    s.meta.load(Ordering::Relaxed),
                );
                fence(Ordering::Acquire);
                if s.seq.load(Ordering::Relaxed) == before {
                    return Some(v);
                }
            }
            std::hint::spin_loop();
        }
        None
    }

    /// The MAC of `ip`: no lock, no allocation.
    pub(super) fn get(&self, ip: IpAddr) -> Option<MacAddr> {
        let (hi, lo, family) = key(ip);
        let mut i = self.home(ip);
        for _ in 0..SLOTS {
            let (h, l, m) = self.read(i)?;
            if m & OCCUPIED == 0 {
                return None;
            }
            if h == hi && l == lo && m & V6 == family {
                return Some(mac_of(m));
            }
            i = (i + 1) & MASK;
        }
        None
    }

    // Writers: only the holder of the uplink's cache lock calls these, so no two writers race and a
    // writer's own relaxed loads see its own stores.

    fn raw(&self, i: usize) -> (u64, u64, u64) {
        let s = &self.slots[i];
        (
            s.hi.load(Ordering::Relaxed),
            s.lo.load(Ordering::Relaxed),
            s.meta.load(Ordering::Relaxed),
        )
    }

    fn write(&self, i: usize, (hi, lo, meta): (u64, u64, u64)) {
        let s = &self.slots[i];
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        s.hi.store(hi, Ordering::Relaxed);
        s.lo.store(lo, Ordering::Relaxed);
        s.meta.store(meta, Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The slot holding `ip`, or the empty slot where it would go.
    fn find(&self, ip: IpAddr) -> (usize, bool) {
        let (hi, lo, family) = key(ip);
        let mut i = self.home(ip);
        for _ in 0..SLOTS {
            let (h, l, m) = self.raw(i);
            if m & OCCUPIED == 0 {
                return (i, false);
            }
            if h == hi && l == lo && m & V6 == family {
                return (i, true);
            }
            i = (i + 1) & MASK;
        }
        // Unreachable while the cache keeps the table at most half full.
        (i, false)
    }

    /// Records (or changes) the MAC of `ip`.
    pub(super) fn set(&self, ip: IpAddr, mac: MacAddr) {
        let (hi, lo, family) = key(ip);
        let (i, _) = self.find(ip);
        self.write(i, (hi, lo, mac_bits(mac) | OCCUPIED | family));
    }

    /// Forgets `ip`, shifting later entries of its run back so that lookups still find them (Knuth, TAOCP
    /// vol. 3, §6.4 Algorithm R).
    pub(super) fn remove(&self, ip: IpAddr) {
        let (mut hole, found) = self.find(ip);
        if !found {
            return;
        }
        let mut j = hole;
        loop {
            j = (j + 1) & MASK;
            let (hi, lo, meta) = self.raw(j);
            if meta & OCCUPIED == 0 {
                break;
            }
            let home = self.home(ip_of(hi, lo, meta));
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.write(hole, (hi, lo, meta));
                hole = j;
            }
        }
        self.write(hole, (0, 0, 0));
    }
}

fn ip_of(hi: u64, lo: u64, meta: u64) -> IpAddr {
    if meta & V6 != 0 {
        IpAddr::V6((u128::from(hi) << 64 | u128::from(lo)).into())
    } else {
        #[allow(clippy::cast_possible_truncation)] // an IPv4 key is stored in the low 32 bits
        IpAddr::V4((lo as u32).into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn addr(n: u32) -> IpAddr {
        if n.is_multiple_of(3) {
            IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(n)))
        } else {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n))
        }
    }

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        [2, 0, b[0], b[1], b[2], b[3]]
    }

    /// Inserts, changes and removes in a pseudo-random order; the table always agrees with a `HashMap`.
    #[test]
    fn agrees_with_a_map_through_inserts_and_removals() {
        let t = Table::default();
        let mut model = HashMap::new();
        let mut x: u32 = 12345;
        for step in 0..60_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let ip = addr(x % 5000);
            if x.is_multiple_of(4) || model.len() >= SLOTS / 2 {
                t.remove(ip);
                model.remove(&ip);
            } else {
                t.set(ip, mac(step));
                model.insert(ip, mac(step));
            }
            if step % 997 == 0 {
                for n in 0..5000 {
                    assert_eq!(t.get(addr(n)), model.get(&addr(n)).copied(), "{n}");
                }
            }
        }
        // 10.0.0.1 and the IPv6 address with the same low bits are different keys.
        let v4 = IpAddr::V4(Ipv4Addr::from(7));
        let v6 = IpAddr::V6(Ipv6Addr::from(7));
        t.set(v4, mac(1));
        assert_eq!(t.get(v6), None);
    }

    /// Readers racing a writer never see an address with another address's MAC.
    #[test]
    fn readers_never_see_a_torn_entry() {
        let t = Arc::new(Table::default());
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (t, stop, passes) = (Arc::clone(&t), Arc::clone(&stop), Arc::clone(&passes));
                std::thread::spawn(move || {
                    let mut hits = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for n in 0..256 {
                            if let Some(m) = t.get(addr(n)) {
                                // Every MAC written for n encodes n in its last two bytes.
                                assert_eq!([m[4], m[5]], [0, u8::try_from(n).unwrap()]);
                                hits += 1;
                            }
                        }
                        passes.fetch_add(1, Ordering::Relaxed);
                    }
                    hits
                })
            })
            .collect();
        // Write until the readers have made enough passes (they may start late on a busy machine).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut round = 0u32;
        while round < 20_000
            || (passes.load(Ordering::Relaxed) < 2_000 && std::time::Instant::now() < deadline)
        {
            let n = round % 256;
            let gen = u8::try_from(round >> 8 & 0xff).unwrap();
            t.set(addr(n), [2, gen, 0, 0, 0, u8::try_from(n).unwrap()]);
            if round.is_multiple_of(3) {
                t.remove(addr((n * 7) % 256));
            }
            round = round.wrapping_add(1);
        }
        stop.store(true, Ordering::Relaxed);
        let hits: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(
            passes.load(Ordering::Relaxed) >= 2_000,
            "the readers hardly ran"
        );
        assert!(hits > 0);
    }
}
