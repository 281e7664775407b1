//! Longest-prefix-match routing: destination address → value (an uplink and its next hop).
//!
//! The table is built once (at start-up or reload) and then only read, so lookups take `&self` and are
//! shared freely between workers. It holds one hash map per prefix length in use, searched from the
//! longest length down: at most 33 (IPv4) or 129 (IPv6) probes, usually a handful, and no allocation.
//! The pipeline consults it once per new flow; established flows carry their uplink in the flow table.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::HashMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// A prefix was added twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicatePrefix(pub IpNet);

impl core::fmt::Display for DuplicatePrefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "route {} is listed more than once", self.0)
    }
}

impl std::error::Error for DuplicatePrefix {}

/// One address family's routes: `(prefix length, map from masked address to value)`, longest first.
#[derive(Debug, Clone)]
struct Family<A, V> {
    by_len: Vec<(u8, HashMap<A, V>)>,
}

impl<A: Copy + Eq + core::hash::Hash, V> Family<A, V> {
    fn new() -> Self {
        Family { by_len: Vec::new() }
    }

    fn insert(&mut self, len: u8, masked: A, value: V) -> bool {
        let pos = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(pos) => pos,
            Err(pos) => {
                self.by_len.insert(pos, (len, HashMap::new()));
                pos
            }
        };
        let map = &mut self.by_len[pos].1;
        if map.contains_key(&masked) {
            return false;
        }
        map.insert(masked, value);
        true
    }

    fn lookup(&self, mask: impl Fn(u8) -> A) -> Option<(u8, &V)> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(*len)).map(|v| (*len, v)))
    }

    fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    match len {
        0 => 0,
        l => addr & (u32::MAX << (32 - u32::from(l.min(32)))),
    }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l => addr & (u128::MAX << (128 - u32::from(l.min(128)))),
    }
}

/// A longest-prefix-match table for IPv4 and IPv6 destinations.
#[derive(Debug, Clone)]
pub struct RouteTable<V> {
    v4: Family<u32, V>,
    v6: Family<u128, V>,
}

impl<V> Default for RouteTable<V> {
    fn default() -> Self {
        RouteTable {
            v4: Family::new(),
            v6: Family::new(),
        }
    }
}

impl<V> RouteTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `prefix → value`. Host bits of the prefix are ignored (10.1.2.3/8 is 10.0.0.0/8).
    pub fn insert(&mut self, prefix: IpNet, value: V) -> Result<(), DuplicatePrefix> {
        let added = match prefix {
            IpNet::V4(n) => self.v4.insert(
                n.prefix_len(),
                mask_v4(u32::from(n.addr()), n.prefix_len()),
                value,
            ),
            IpNet::V6(n) => self.v6.insert(
                n.prefix_len(),
                mask_v6(u128::from(n.addr()), n.prefix_len()),
                value,
            ),
        };
        if added {
            Ok(())
        } else {
            Err(DuplicatePrefix(prefix.trunc()))
        }
    }

    /// The value of the longest prefix containing `dst`, with that prefix.
    pub fn lookup(&self, dst: IpAddr) -> Option<(IpNet, &V)> {
        match dst {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    /// IPv4 lookup.
    pub fn lookup_v4(&self, dst: Ipv4Addr) -> Option<(IpNet, &V)> {
        let a = u32::from(dst);
        self.v4.lookup(|len| mask_v4(a, len)).map(|(len, v)| {
            let net = Ipv4Net::new(Ipv4Addr::from(mask_v4(a, len)), len).map(IpNet::V4);
            // The length came from a prefix that was valid when inserted.
            (net.unwrap_or_default(), v)
        })
    }

    /// IPv6 lookup.
    pub fn lookup_v6(&self, dst: Ipv6Addr) -> Option<(IpNet, &V)> {
        let a = u128::from(dst);
        self.v6.lookup(|len| mask_v6(a, len)).map(|(len, v)| {
            let net = Ipv6Net::new(Ipv6Addr::from(mask_v6(a, len)), len).map(IpNet::V6);
            (net.unwrap_or_default(), v)
        })
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when no prefix is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A set of prefixes, precompiled to (network, mask) pairs, for the membership tests of every packet
/// (is the node allowed, is the inner source a pod). Linear: meant for the handful of CIDRs a cluster has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl PrefixSet {
    /// The set of `nets`.
    pub fn new(nets: &[IpNet]) -> Self {
        let mut set = PrefixSet::default();
        for n in nets {
            match n {
                IpNet::V4(n) => {
                    let m = u32::from(n.netmask());
                    set.v4.push((u32::from(n.addr()) & m, m));
                }
                IpNet::V6(n) => {
                    let m = u128::from(n.netmask());
                    set.v6.push((u128::from(n.addr()) & m, m));
                }
            }
        }
        set
    }

    /// True when `addr` is inside one of the prefixes.
    #[inline]
    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.contains_v4(a),
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|&(net, mask)| a & mask == net)
            }
        }
    }

    /// IPv4 membership.
    #[inline]
    pub fn contains_v4(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        self.v4.iter().any(|&(net, mask)| a & mask == net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = RouteTable::new();
        t.insert(net("0.0.0.0/0"), "dmz").unwrap();
        t.insert(net("10.50.0.0/16"), "internal").unwrap();
        t.insert(net("10.50.7.0/24"), "lab").unwrap();
        t.insert(net("::/0"), "dmz6").unwrap();
        t.insert(net("fd00:50::/32"), "internal6").unwrap();
        let get = |s: &str| t.lookup(s.parse().unwrap()).map(|(_, v)| *v);
        assert_eq!(get("203.0.113.7"), Some("dmz"));
        assert_eq!(get("10.50.1.1"), Some("internal"));
        assert_eq!(get("10.50.7.9"), Some("lab"));
        assert_eq!(get("2001:db8::1"), Some("dmz6"));
        assert_eq!(get("fd00:50::9"), Some("internal6"));
        assert_eq!(
            t.lookup("10.50.7.9".parse().unwrap()).map(|(n, _)| n),
            Some(net("10.50.7.0/24"))
        );
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn no_default_means_no_route() {
        let mut t = RouteTable::new();
        t.insert(net("10.50.0.0/16"), 1).unwrap();
        assert!(t.lookup("192.0.2.1".parse().unwrap()).is_none());
        assert!(t.lookup("::1".parse().unwrap()).is_none());
    }

    #[test]
    fn duplicates_are_refused_even_with_host_bits() {
        let mut t = RouteTable::new();
        t.insert(net("10.0.0.0/8"), 1).unwrap();
        assert_eq!(
            t.insert(net("10.1.2.3/8"), 2),
            Err(DuplicatePrefix(net("10.0.0.0/8")))
        );
        assert_eq!(
            t.lookup("10.9.9.9".parse().unwrap()).map(|(_, v)| *v),
            Some(1)
        );
    }

    #[test]
    fn host_routes() {
        let mut t = RouteTable::new();
        t.insert(net("192.0.2.1/32"), 1).unwrap();
        t.insert(net("2001:db8::1/128"), 2).unwrap();
        assert_eq!(
            t.lookup("192.0.2.1".parse().unwrap()).map(|(_, v)| *v),
            Some(1)
        );
        assert!(t.lookup("192.0.2.2".parse().unwrap()).is_none());
        assert_eq!(
            t.lookup("2001:db8::1".parse().unwrap()).map(|(_, v)| *v),
            Some(2)
        );
    }

    #[test]
    fn prefix_set_matches_ipnet() {
        let nets = [
            net("10.244.0.0/16"),
            net("172.18.0.0/16"),
            net("fd00:244::/32"),
            net("0.0.0.0/0"),
        ];
        let set = PrefixSet::new(&nets[..3]);
        for a in [
            "10.244.9.9",
            "10.245.0.1",
            "172.18.255.255",
            "fd00:244::1",
            "fd00:245::1",
            "8.8.8.8",
        ] {
            let a: IpAddr = a.parse().unwrap();
            assert_eq!(
                set.contains(a),
                nets[..3].iter().any(|n| n.contains(&a)),
                "{a}"
            );
        }
        assert!(PrefixSet::new(&nets[3..]).contains("8.8.8.8".parse().unwrap()));
        assert!(!PrefixSet::new(&[]).contains("8.8.8.8".parse().unwrap()));
    }

    proptest! {
        /// Differential test against a linear scan over ipnet's own `contains`.
        #[test]
        fn matches_linear_scan(prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
                               probes in proptest::collection::vec(any::<u32>(), 1..50)) {
            let mut t = RouteTable::new();
            let mut list: Vec<Ipv4Net> = Vec::new();
            for (i, (a, l)) in prefixes.iter().enumerate() {
                let n = Ipv4Net::new(Ipv4Addr::from(*a), *l).unwrap().trunc();
                if t.insert(IpNet::V4(n), i).is_ok() { list.push(n); }
            }
            for p in probes {
                let a = Ipv4Addr::from(p);
                let want = list.iter().filter(|n| n.contains(&a)).max_by_key(|n| n.prefix_len());
                let got = t.lookup_v4(a).map(|(n, _)| n);
                prop_assert_eq!(got, want.map(|n| IpNet::V4(*n)));
            }
        }
    }
}
