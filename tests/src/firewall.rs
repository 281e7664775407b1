//! A legacy perimeter firewall on an outside server: nftables in the server's namespace admitting only some
//! source addresses to one port; everyone else is rejected (TCP reset, or ICMP port unreachable for UDP),
//! so a refused client fails at once with ECONNREFUSED instead of timing out. Named counters show what was
//! admitted and rejected.

use std::net::IpAddr;

use crate::error::{Error, Result};
use crate::netns::Netns;

/// The transport protocol a [`Firewall`] filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP: others get a reset.
    Tcp,
    /// UDP: others get ICMP port unreachable.
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// An nftables table `inet harness_fw_<proto><port>` in a namespace, deleted on drop:
///
/// ```text
/// table inet harness_fw_tcp7000 {
///     counter admitted {}
///     counter rejected {}
///     chain input {
///         type filter hook input priority filter; policy accept;
///         tcp dport 7000 ip saddr { 203.0.113.10 } counter name admitted accept
///         tcp dport 7000 counter name rejected reject with tcp reset
///     }
/// }
/// ```
#[derive(Debug)]
pub struct Firewall {
    ns_name: String,
    table: String,
}

impl Firewall {
    /// Admits only `allowed` sources (IPv4 and IPv6) to `proto` port `port` in `ns`; rejects the rest.
    pub fn admit_only(ns: &Netns, proto: Proto, port: u16, allowed: &[IpAddr]) -> Result<Self> {
        let table = format!("harness_fw_{}{port}", proto.name());
        let fw = Self {
            ns_name: ns.name().to_owned(),
            table: table.clone(),
        };
        let p = proto.name();
        nft(ns, &format!("add table inet {table}"))?;
        nft(ns, &format!("add counter inet {table} admitted"))?;
        nft(ns, &format!("add counter inet {table} rejected"))?;
        nft(
            ns,
            &format!(
                "add chain inet {table} input {{ type filter hook input priority filter ; policy accept ; }}"
            ),
        )?;
        let v4: Vec<String> = allowed
            .iter()
            .filter(|a| a.is_ipv4())
            .map(ToString::to_string)
            .collect();
        let v6: Vec<String> = allowed
            .iter()
            .filter(|a| a.is_ipv6())
            .map(ToString::to_string)
            .collect();
        for (family, set) in [("ip", v4), ("ip6", v6)] {
            if !set.is_empty() {
                nft(
                    ns,
                    &format!(
                        "add rule inet {table} input {p} dport {port} {family} saddr {{ {} }} counter name admitted accept",
                        set.join(", ")
                    ),
                )?;
            }
        }
        let reject = match proto {
            Proto::Tcp => "reject with tcp reset",
            Proto::Udp => "reject",
        };
        nft(
            ns,
            &format!("add rule inet {table} input {p} dport {port} counter name rejected {reject}"),
        )?;
        Ok(fw)
    }

    /// Packets admitted so far.
    pub fn admitted(&self) -> Result<u64> {
        self.counter("admitted")
    }

    /// Packets rejected so far.
    pub fn rejected(&self) -> Result<u64> {
        self.counter("rejected")
    }

    /// The ruleset, for messages.
    pub fn ruleset(&self) -> String {
        crate::cmd::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns_name,
                "nft",
                "list",
                "table",
                "inet",
                &self.table,
            ],
        )
        .unwrap_or_else(|e| e.to_string())
    }

    fn counter(&self, name: &str) -> Result<u64> {
        let out = crate::cmd::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns_name,
                "nft",
                "list",
                "counter",
                "inet",
                &self.table,
                name,
            ],
        )?;
        parse_packets(&out)
            .ok_or_else(|| Error::msg(format!("no packet count in `nft list counter`: {out}")))
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        // The namespace may be gone already (then so is the table).
        let _ = crate::cmd::output(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns_name,
                "nft",
                "delete",
                "table",
                "inet",
                &self.table,
            ],
        );
    }
}

fn nft(ns: &Netns, args: &str) -> Result<String> {
    let mut v = vec!["nft"];
    v.extend(crate::cmd::words(args));
    ns.exec_args(&v)
}

/// `packets N` in `nft list counter` output.
fn parse_packets(text: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_of_a_counter() {
        let text = "table inet harness_fw_tcp7000 {\n\tcounter rejected {\n\t\tpackets 3 bytes 180\n\t}\n}\n";
        assert_eq!(parse_packets(text), Some(3));
        assert_eq!(parse_packets("nothing"), None);
    }
}
