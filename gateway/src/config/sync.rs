//! The `sync` section: the gateway set this replica belongs to, and its peers, to whom it streams its flows
//! and from whom it keeps passive copies (`forwarder_core::sync`, `docs/failover.md`).
//!
//! Besides types and ranges, a peer is checked against the rest of the file: its egress IPs must sit on one
//! of this replica's uplinks (named as in `uplinks`), since a survivor translates a dead peer's flows out of
//! that uplink, and no egress IP may belong to two replicas.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::path::PathBuf;

use super::reader::{Reader, Value};
use super::{value, PeerAddress, SyncConfig, SyncPeer, UplinkSpec};

pub(super) const SYNC_KEYS: &[&str] = &["set", "ordinal", "port", "key_file", "peers"];
pub(super) const PEER_KEYS: &[&str] = &["ordinal", "address", "uplinks"];
pub(super) const PEER_UPLINK_KEYS: &[&str] = &["name", "egress_ips"];

/// Default `sync.port` (4789 is VXLAN, 4790 the gateway's tunnel).
pub(super) const DEFAULT_PORT: u16 = 4792;
/// Largest ordinal: a heartbeat lists the ordinals a replica serves as bits of a 64-bit word.
pub(super) const MAX_ORDINAL: u64 = 63;

/// Reads `sync`; `uplinks` (when valid) for the checks that span sections.
pub(super) fn sync(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    uplinks: Option<&[UplinkSpec]>,
) -> Option<SyncConfig> {
    let m = r.mapping(v, SYNC_KEYS)?;
    let set = m.require(r, "set").and_then(|v| {
        r.parse(&v, |s| {
            let ok = !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if ok {
                Ok(s.to_owned())
            } else {
                Err(format!(
                    "`{s}` is not a set name; use 1 to 63 letters, digits, `-`, `_` or `.` (e.g. the \
                     StatefulSet's name, `egress-red`)"
                ))
            }
        })
    });
    let ordinal_value = m.require(r, "ordinal");
    let ordinal = ordinal_value
        .as_ref()
        .and_then(|v| r.integer::<u16>(v, 0..=MAX_ORDINAL, " (the replica's StatefulSet ordinal)"));
    let port = m.get("port").map_or(Some(DEFAULT_PORT), |v| {
        r.integer::<u16>(&v, 1..=u64::from(u16::MAX), "")
    });
    let key_file = match m.get("key_file") {
        None => Some(None),
        Some(v) => r
            .parse(&v, |s| {
                if s.is_empty() {
                    Err("empty path".to_owned())
                } else {
                    Ok(PathBuf::from(s))
                }
            })
            .map(Some),
    };
    let peers = m
        .require(r, "peers")
        .and_then(|v| peers(r, &v, ordinal, uplinks));
    Some(SyncConfig {
        set: set?,
        ordinal: ordinal?,
        port: port?,
        key_file: key_file?,
        peers: peers?,
    })
}

fn peers(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    own: Option<u16>,
    uplinks: Option<&[UplinkSpec]>,
) -> Option<Vec<SyncPeer>> {
    let items = r.list(v)?;
    if items.is_empty() {
        r.error(
            v.line(),
            format!(
                "{}: the list is empty; list the other replicas of the set (ordinal, address, uplinks), or \
                 remove the `sync` section",
                v.path()
            ),
        );
        return None;
    }
    // Egress IPs seen so far: this replica's own first.
    let mut egress: HashMap<IpAddr, String> = uplinks
        .iter()
        .flat_map(|u| u.iter())
        .flat_map(|u| {
            u.egress_ips
                .iter()
                .map(|ip| (*ip, "this replica".to_owned()))
        })
        .collect();
    let mut ordinals: HashMap<u16, usize> = HashMap::new();
    let mut addresses: HashMap<PeerAddress, usize> = HashMap::new();
    let out: Vec<Option<SyncPeer>> = items
        .iter()
        .map(|item| {
            let p = r.mapping(item, PEER_KEYS)?;
            let ordinal = p.require(r, "ordinal").and_then(|v| {
                let n = r.integer::<u16>(&v, 0..=MAX_ORDINAL, "")?;
                if Some(n) == own {
                    r.error(
                        v.line(),
                        format!(
                            "{}: {n} is this replica's own ordinal; list only the other replicas",
                            v.path()
                        ),
                    );
                    return None;
                }
                if let Some(first) = ordinals.insert(n, v.line()) {
                    r.error(
                        v.line(),
                        format!(
                            "{}: ordinal {n} is already listed on line {first}; each peer once",
                            v.path()
                        ),
                    );
                    return None;
                }
                Some(n)
            });
            let address = p.require(r, "address").and_then(|v| {
                let a = r.parse(&v, peer_address)?;
                if let Some(first) = addresses.insert(a.clone(), v.line()) {
                    r.error(
                        v.line(),
                        format!("{}: {a} is already listed on line {first}", v.path()),
                    );
                    return None;
                }
                Some(a)
            });
            let name = ordinal.map_or_else(|| p.path().to_owned(), |n| format!("peer {n}"));
            let egress = p
                .require(r, "uplinks")
                .and_then(|v| peer_uplinks(r, &v, &name, uplinks, &mut egress));
            Some(SyncPeer {
                ordinal: ordinal?,
                address: address?,
                egress: egress?,
            })
        })
        .collect();
    out.into_iter().collect()
}

/// A peer's `address`: `IPv4:port`, or `name:port` with a DNS name (RFC 1123 §2.1 labels, as Kubernetes
/// names a StatefulSet pod under its headless Service: `egress-red-1.egress-gateway.egress.svc.cluster.local`).
/// A name whose last label is all digits is taken for a mistyped address (RFC 3696 §2: no top-level domain
/// is all-numeric).
fn peer_address(s: &str) -> Result<PeerAddress, String> {
    let bad = || {
        format!(
            "`{s}` is not a peer address; give the peer's pod IPv4 address or DNS name and its sync port, \
             e.g. 10.244.1.7:4792 or egress-red-1.egress-gateway.egress.svc.cluster.local:4792"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(bad)?;
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return if value::is_unicast(IpAddr::V4(ip)) {
            Ok(PeerAddress::Ip(SocketAddrV4::new(ip, port)))
        } else {
            Err(bad())
        };
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let last_numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) || last_numeric {
        return Err(bad());
    }
    Ok(PeerAddress::Name { host, port })
}

/// A peer's `uplinks`: (uplink index here, egress IP) pairs.
fn peer_uplinks(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    peer: &str,
    uplinks: Option<&[UplinkSpec]>,
    egress: &mut HashMap<IpAddr, String>,
) -> Option<Vec<(usize, IpAddr)>> {
    let items = r.list(v)?;
    if items.is_empty() {
        r.error(
            v.line(),
            format!(
                "{}: the list is empty; name the uplinks the peer translates to and its egress IPs on each",
                v.path()
            ),
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for item in &items {
        let Some(u) = r.mapping(item, PEER_UPLINK_KEYS) else {
            ok = false;
            continue;
        };
        let index = u.require(r, "name").and_then(|v| {
            let name = r.scalar(&v)?;
            let uplinks = uplinks?;
            let found = uplinks.iter().position(|u| u.name == name);
            if found.is_none() {
                let known: Vec<&str> = uplinks.iter().map(|u| u.name.as_str()).collect();
                r.error(
                    v.line(),
                    format!(
                        "{}: no uplink here is named `{name}` (uplinks: {}); a survivor sends a peer's flows \
                         out of the uplink of the same name, so both replicas need it",
                        v.path(),
                        known.join(", ")
                    ),
                );
            }
            found
        });
        let ips = u.require(r, "egress_ips").and_then(|v| {
            let ips = r.parse_list(&v, value::unicast_ip)?;
            if ips.is_empty() {
                r.error(v.line(), format!("{}: the list is empty", v.path()));
                return None;
            }
            let mut good = true;
            for (ip, line) in &ips {
                if let Some(other) = egress.insert(*ip, peer.to_owned()) {
                    r.error(
                        *line,
                        format!(
                            "{}: egress IP {ip} already belongs to {other}; every egress IP has one owner \
                             in the set",
                            v.path()
                        ),
                    );
                    good = false;
                }
            }
            good.then(|| ips.into_iter().map(|(ip, _)| ip).collect::<Vec<_>>())
        });
        match (index, ips) {
            (Some(i), Some(ips)) => out.extend(ips.into_iter().map(|ip| (i, ip))),
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_address_is_an_ipv4_address_or_a_dns_name_with_a_port() {
        assert_eq!(
            peer_address("10.244.1.7:4792"),
            Ok(PeerAddress::Ip("10.244.1.7:4792".parse().unwrap()))
        );
        for (text, host) in [
            (
                "egress-red-1.egress-gateway.egress.svc.cluster.local:4792",
                "egress-red-1.egress-gateway.egress.svc.cluster.local",
            ),
            (
                "Egress-Red-1.Egress-Gateway.:4792",
                "egress-red-1.egress-gateway",
            ),
            ("gw2:4792", "gw2"),
        ] {
            assert_eq!(
                peer_address(text),
                Ok(PeerAddress::Name {
                    host: host.into(),
                    port: 4792
                }),
                "{text}"
            );
        }
        for bad in [
            "10.244.1.7",
            "10.244.1.7:0",
            "10.244.1.7:65536",
            "0.0.0.0:4792",
            "224.0.0.1:4792",
            "10.244.1:4792",
            "[fd00::1]:4792",
            "fd00::1:4792",
            ":4792",
            "-gw.example:4792",
            "gw-.example:4792",
            "gw..example:4792",
            "gw_1.example:4792",
            "gw 1:4792",
        ] {
            let e = peer_address(bad).unwrap_err();
            assert!(e.contains("is not a peer address"), "{bad}: {e}");
        }
        let long = format!("{}.example:4792", "a".repeat(64));
        assert!(peer_address(&long).is_err());
    }
}
