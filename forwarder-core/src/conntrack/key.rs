//! Packed keys and hashing for the conntrack indexes.
//!
//! Addresses are kept as two `u64` words: IPv6 as is, IPv4 as the v4-mapped form `::ffff:a.b.c.d`; a family
//! bit in the tag keeps a real IPv6 `::ffff:…` address apart from an IPv4 one.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::{FlowKey, Proto};

/// Address as two big-endian `u64` words.
pub(crate) type Addr = [u64; 2];

pub(crate) const V6_BIT: u8 = 4;

pub(crate) fn addr_words(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(a) => [0, 0xffff_0000_0000 | u64::from(u32::from(a))],
        IpAddr::V6(a) => split(u128::from(a)),
    }
}

#[allow(clippy::cast_possible_truncation)] // splitting a u128 into halves
fn split(v: u128) -> Addr {
    [(v >> 64) as u64, v as u64]
}

pub(crate) fn words_addr(w: Addr, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from((u128::from(w[0]) << 64) | u128::from(w[1])))
    } else {
        #[allow(clippy::cast_possible_truncation)] // low 32 bits hold the IPv4 address
        IpAddr::V4(Ipv4Addr::from(w[1] as u32))
    }
}

pub(crate) const fn proto_from_index(i: u8) -> Proto {
    match i & 3 {
        0 => Proto::Tcp,
        1 => Proto::Udp,
        2 => Proto::Icmp,
        _ => Proto::Icmpv6,
    }
}

/// A directional tuple in index form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packed {
    pub(crate) src: Addr,
    pub(crate) dst: Addr,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    /// Protocol index (bits 0–1) and [`V6_BIT`].
    pub(crate) tag: u8,
}

impl Packed {
    /// `None` when source and destination are of different families (no flow can match).
    pub(crate) fn from_key(k: &FlowKey) -> Option<Packed> {
        if k.src.is_ipv4() != k.dst.is_ipv4() {
            return None;
        }
        #[allow(clippy::cast_possible_truncation)] // index < 4
        let p = k.proto.index() as u8;
        Some(Packed {
            src: addr_words(k.src),
            dst: addr_words(k.dst),
            sport: k.src_port,
            dport: k.dst_port,
            tag: p | if k.src.is_ipv6() { V6_BIT } else { 0 },
        })
    }

    /// Keyed hash (wyhash-style multiply-fold); `k` from [`HashKey::new`].
    pub(crate) fn hash(&self, k: &HashKey) -> u64 {
        let k = &k.0;
        let p = u64::from(self.sport) | u64::from(self.dport) << 16 | u64::from(self.tag) << 32;
        let h = mum(self.src[0] ^ k[0], self.src[1] ^ k[1])
            ^ mum(self.dst[0] ^ k[2], self.dst[1] ^ k[3])
            ^ mum(p ^ k[4], k[5]);
        mum(h ^ k[6], k[7])
    }
}

/// Per-table hash key, so that tuples colliding in one table do not collide in another (a pod cannot
/// precompute a bucket-flooding set of tuples without knowing the seed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HashKey([u64; 8]);

impl HashKey {
    pub(crate) fn new(seed: u64) -> HashKey {
        let mut x = seed;
        HashKey(K.map(|c| {
            // splitmix64 steps, mixed with the fixed constants
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) ^ c
        }))
    }
}

const K: [u64; 8] = [
    0xa076_1d64_78bd_642f,
    0xe703_7ed1_a0b4_28db,
    0x8ebc_6af0_9c88_c6e3,
    0x5899_65cc_7537_4cc3,
    0x1d8e_4e27_c47d_124f,
    0x9e37_79b9_7f4a_7c15,
    0xbf58_476d_1ce4_e5b9,
    0x94d0_49bb_1331_11eb,
];

#[inline]
fn mum(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    #[allow(clippy::cast_possible_truncation)] // folding halves
    let f = (r as u64) ^ ((r >> 64) as u64);
    f
}

/// Bucket for hash `h` among `n` buckets (multiply-shift range reduction, `n` < 2³²).
#[inline]
pub(crate) fn reduce(h: u64, n: usize) -> usize {
    (((h >> 32) * n as u64) >> 32) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for s in ["192.0.2.1", "2001:db8::7", "::ffff:192.0.2.1"] {
            let ip: IpAddr = s.parse().expect("ip");
            assert_eq!(words_addr(addr_words(ip), ip.is_ipv6()), ip);
        }
    }

    #[test]
    fn families_differ_by_tag() {
        let k4 = FlowKey {
            src: "192.0.2.1".parse().expect("ip"),
            dst: "192.0.2.2".parse().expect("ip"),
            src_port: 1,
            dst_port: 2,
            proto: Proto::Udp,
        };
        let k6 = FlowKey {
            src: "::ffff:192.0.2.1".parse().expect("ip"),
            dst: "::ffff:192.0.2.2".parse().expect("ip"),
            ..k4
        };
        let (a, b) = (
            Packed::from_key(&k4).expect("v4"),
            Packed::from_key(&k6).expect("v6"),
        );
        assert_ne!(a, b);
        let hk = HashKey::new(1);
        assert_ne!(a.hash(&hk), b.hash(&hk));
        assert_ne!(a.hash(&hk), a.hash(&HashKey::new(2)));
        assert!(reduce(a.hash(&hk), 10) < 10);
        let mixed = FlowKey {
            dst: "2001:db8::1".parse().expect("ip"),
            ..k4
        };
        assert!(Packed::from_key(&mixed).is_none());
    }
}
