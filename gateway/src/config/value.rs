//! Scalar values of the configuration file: durations, addresses, CIDRs, names.
//!
//! Each parser takes the text of one YAML scalar and returns the value, or a message that says what is wrong
//! and what to write instead. The caller adds the file, line and key.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

/// `kubernetes.kubeconfig` (of the gateway and of the node agent): a non-empty path.
pub(super) fn kubeconfig(s: &str) -> Result<std::path::PathBuf, String> {
    if s.trim().is_empty() {
        Err("an empty path; leave `kubeconfig` out to use the pod's service account".into())
    } else {
        Ok(std::path::PathBuf::from(s))
    }
}

/// A whole number written in decimal.
pub(super) fn integer(s: &str) -> Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{s}` is not a whole number; write digits only, e.g. 4097"
        ));
    }
    s.parse()
        .map_err(|_| format!("{s} is too large for any setting here"))
}

/// A duration: `250ms`, `300s`, `5m`, `2h`, a sequence of them (`2h4m`), or a bare number of seconds.
pub(super) fn duration(s: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "`{s}` is not a duration; write e.g. 300s, 5m, 2h, 2h4m, 250ms, or a number of seconds"
        )
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s} seconds is too long"));
    }
    let mut millis: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(invalid()),
        };
        millis = number
            .checked_mul(scale)
            .and_then(|ms| millis.checked_add(ms))
            .ok_or_else(|| format!("{s} is too long"))?;
        rest = tail;
    }
    if s.is_empty() {
        return Err(invalid());
    }
    Ok(Duration::from_millis(millis))
}

/// An IP address, IPv4 or IPv6.
pub(super) fn ip(s: &str) -> Result<IpAddr, String> {
    if s.contains('/') {
        return Err(format!(
            "`{s}` is a CIDR; write a single address here, without the prefix length"
        ));
    }
    IpAddr::from_str(s)
        .map_err(|_| format!("`{s}` is not an IP address; write e.g. 203.0.113.10 or 2001:db8::10"))
}

/// Whether a host can have this address: not unspecified, multicast or broadcast.
pub(super) fn is_unicast(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// An address a host can be reached at (see [`is_unicast`]).
pub(super) fn unicast_ip(s: &str) -> Result<IpAddr, String> {
    let a = ip(s)?;
    if !is_unicast(a) {
        return Err(format!(
            "{a} is not a unicast address; give the address of a host"
        ));
    }
    Ok(a)
}

/// A CIDR (`10.244.0.0/16`, `fd00::/64`) with no host bits set.
pub(super) fn cidr(s: &str) -> Result<IpNet, String> {
    if !s.contains('/') {
        return Err(match IpAddr::from_str(s) {
            Ok(IpAddr::V4(_)) => format!(
                "`{s}` has no prefix length; write {s}/32 for one address, or the network's CIDR"
            ),
            Ok(IpAddr::V6(_)) => format!(
                "`{s}` has no prefix length; write {s}/128 for one address, or the network's CIDR"
            ),
            Err(_) => format!("`{s}` is not a CIDR; write e.g. 10.244.0.0/16 or fd00::/64"),
        });
    }
    let net = IpNet::from_str(s).map_err(|_| {
        format!(
            "`{s}` is not a valid CIDR; write e.g. 10.244.0.0/16 or fd00::/64 \
             (IPv4 prefixes are at most /32, IPv6 at most /128)"
        )
    })?;
    let network = net.trunc();
    if network != net {
        return Err(format!("{net} has host bits set; did you mean {network}?"));
    }
    Ok(net)
}

/// An `address:port` to listen on (`0.0.0.0:8080`, `[::]:9090`).
pub(super) fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(s).map_err(|_| {
        if s.parse::<IpAddr>().is_ok() {
            format!("`{s}` has no port; write address:port, e.g. {s}:8080 (IPv6 in brackets: [::]:8080)")
        } else {
            format!("`{s}` is not an address:port; write e.g. 0.0.0.0:8080, or [::]:8080 for IPv6")
        }
    })
}

/// Longest uplink name (it appears in logs and as a metrics label).
pub(super) const MAX_UPLINK_NAME: usize = 32;

/// An uplink's name: letters, digits, `-`, `_` and `.`, at most [`MAX_UPLINK_NAME`] characters.
pub(super) fn uplink_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the uplink name is empty; give a short name such as dmz".into());
    }
    if s.chars().count() > MAX_UPLINK_NAME {
        return Err(format!(
            "the uplink name `{s}` is longer than {MAX_UPLINK_NAME} characters; shorten it"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "the uplink name `{s}` contains {c:?}; use letters, digits, `-`, `_` and `.` only"
        ));
    }
    Ok(s.to_owned())
}

/// Longest Linux interface name (`IFNAMSIZ` is 16 including the terminating NUL).
pub(super) const MAX_INTERFACE_NAME: usize = 15;

/// A Linux network interface name, by the kernel's own rules (`dev_valid_name`).
pub(super) fn interface_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err(
            "the interface name is empty; give the uplink's network interface, e.g. eth1".into(),
        );
    }
    if s.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "interface name `{s}` is {} bytes long; Linux allows at most {MAX_INTERFACE_NAME}",
            s.len()
        ));
    }
    if s == "." || s == ".." || s.contains(['/', ':']) || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "`{s}` is not a valid Linux interface name (no `/`, `:` or spaces, not `.` or `..`)"
        ));
    }
    Ok(s.to_owned())
}

/// The number of single-character edits between two short strings (Levenshtein), for "did you mean".
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(duration("2h4m"), Ok(Duration::from_secs(7440)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "5x", "5 s", "-5s", "1.5h", "5d", "h5", "5s5"] {
            assert!(duration(bad).is_err(), "{bad} accepted");
        }
        assert!(duration("5x").unwrap_err().contains("300s, 5m, 2h"));
        assert!(duration("18446744073709551615h")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn integers() {
        assert_eq!(integer("4097"), Ok(4097));
        assert_eq!(integer("0"), Ok(0));
        assert!(integer("-1").is_err());
        assert!(integer("0x10").is_err());
        assert!(integer("").is_err());
        assert!(integer("99999999999999999999999")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn cidrs() {
        assert_eq!(cidr("10.244.0.0/16"), Ok("10.244.0.0/16".parse().unwrap()));
        assert_eq!(cidr("fd00::/64"), Ok("fd00::/64".parse().unwrap()));
        assert_eq!(cidr("0.0.0.0/0"), Ok("0.0.0.0/0".parse().unwrap()));
        assert_eq!(
            cidr("10.244.0.1/16").unwrap_err(),
            "10.244.0.1/16 has host bits set; did you mean 10.244.0.0/16?"
        );
        assert!(cidr("10.0.0.1").unwrap_err().contains("10.0.0.1/32"));
        assert!(cidr("fd00::1").unwrap_err().contains("fd00::1/128"));
        assert!(cidr("10.0.0.0/33").is_err());
        assert!(cidr("dmz").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(ip("2001:db8::1"), Ok("2001:db8::1".parse().unwrap()));
        assert!(ip("10.0.0.1/32").unwrap_err().contains("is a CIDR"));
        assert!(ip("10.0.0.256").is_err());
        assert!(unicast_ip("0.0.0.0").is_err());
        assert!(unicast_ip("224.0.0.1").is_err());
        assert!(unicast_ip("255.255.255.255").is_err());
        assert!(unicast_ip("ff02::1").is_err());
        assert_eq!(
            socket_addr("0.0.0.0:8080"),
            Ok("0.0.0.0:8080".parse().unwrap())
        );
        assert_eq!(socket_addr("[::]:9090"), Ok("[::]:9090".parse().unwrap()));
        assert!(socket_addr("0.0.0.0").unwrap_err().contains("has no port"));
        assert!(socket_addr("::1:80").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(uplink_name("dmz"), Ok("dmz".into()));
        assert!(uplink_name("").is_err());
        assert!(uplink_name(&"x".repeat(33))
            .unwrap_err()
            .contains("longer than 32"));
        assert!(uplink_name("d m z").is_err());
        assert_eq!(interface_name("gwdmz"), Ok("gwdmz".into()));
        assert!(interface_name("abcdefghijklmnop")
            .unwrap_err()
            .contains("at most 15"));
        assert!(interface_name("eth0:1").is_err());
        assert!(interface_name("..").is_err());
        assert!(interface_name("").is_err());
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("egress_ip", "egress_ips"), 1);
        assert_eq!(edit_distance("nexthop", "next_hop"), 1);
        assert_eq!(edit_distance("mtu", "mtu"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
