//! The `probes` section: which outside targets the gateway probes through its uplinks, how often, and when
//! a target counts as down.
//!
//! Besides the types and ranges, a target is checked against the rest of the file: it must be reached
//! through an uplink (the longest matching prefix of `uplinks[].routes`, the rule pod traffic follows), it
//! may not be one of the gateway's own egress IPs, and `ports` must leave room for the probes' own source
//! ports (see [`super::probe_ports`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use forwarder_core::ports::PortRange;
use ipnet::IpNet;

use super::reader::{Reader, Value};
use super::{probe_ports, value, ProbesConfig, UplinkSpec, PROBE_PORTS};

pub(super) const PROBES_KEYS: &[&str] = &["interval", "timeout", "icmp", "tcp"];

/// Default `probes.interval` (Calico Enterprise's `icmpProbe.intervalSeconds` default).
pub(super) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default `probes.timeout` (Calico Enterprise's `icmpProbe.timeoutSeconds` default).
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest interval: the prober is not a load generator.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval and timeout.
const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most targets over both kinds: each is a set of metric series and a probe per interval.
pub(super) const MAX_TARGETS: usize = 64;

/// Reads `probes`; `uplinks` and `ports` (when they are valid) for the checks that span sections.
pub(super) fn probes(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    uplinks: Option<&[UplinkSpec]>,
    ports: Option<PortRange>,
) -> Option<ProbesConfig> {
    let m = r.mapping(v, PROBES_KEYS)?;
    let interval_value = m.get("interval");
    let interval = interval_value.as_ref().map_or(Some(DEFAULT_INTERVAL), |v| {
        bounded(r, v, MIN_INTERVAL, "at least 100ms")
    });
    let timeout_value = m.get("timeout");
    let timeout = timeout_value.as_ref().map_or(Some(DEFAULT_TIMEOUT), |v| {
        bounded(r, v, Duration::from_millis(1), "positive")
    });
    let mut ok = true;
    if let (Some(interval), Some(timeout)) = (interval, timeout) {
        if timeout <= interval {
            let line = timeout_value
                .as_ref()
                .or(interval_value.as_ref())
                .map_or(m.line(), Value::line);
            r.error(
                line,
                format!(
                    "probes: timeout ({}) must be longer than interval ({}): a target is down when none of its \
                     probes was answered for `timeout`, so it needs room for more than one probe (e.g. \
                     interval 1s, timeout 3s)",
                    human(timeout),
                    human(interval)
                ),
            );
            ok = false;
        }
    }
    let egress: Vec<IpAddr> = uplinks
        .iter()
        .flat_map(|u| u.iter())
        .flat_map(|u| u.egress_ips.iter().copied())
        .collect();
    let mut seen = HashMap::new();
    let mut check = |r: &mut Reader<'_>, path: &str, line: usize, ip: IpAddr, shown: String| {
        if let Some(first) = seen.insert(shown.clone(), line) {
            r.error(
                line,
                format!("{path}: {shown} is listed twice (first on line {first}); remove one"),
            );
            return false;
        }
        if egress.contains(&ip) {
            r.error(
                line,
                format!(
                    "{path}: {ip} is one of the gateway's own egress IPs; probe a host outside, e.g. the \
                     uplink's router or a server behind it"
                ),
            );
            return false;
        }
        if let Some(uplinks) = uplinks {
            if route_of(uplinks, ip).is_none() {
                r.error(
                    line,
                    format!(
                        "{path}: no uplink routes {ip}, so its probes could not leave; add a route that covers \
                         it to an uplink's `routes`, or remove the target"
                    ),
                );
                return false;
            }
        }
        true
    };
    let icmp = match m.get("icmp") {
        None => Some(Vec::new()),
        Some(v) => r.parse_list(&v, target_ip).map(|items| {
            let mut out = Vec::with_capacity(items.len());
            for (i, (ip, line)) in items.into_iter().enumerate() {
                ok &= check(r, &format!("{}[{i}]", v.path()), line, ip, ip.to_string());
                out.push(ip);
            }
            out
        }),
    };
    let tcp = match m.get("tcp") {
        None => Some(Vec::new()),
        Some(v) => r.parse_list(&v, target_addr).map(|items| {
            let mut out = Vec::with_capacity(items.len());
            for (i, (addr, line)) in items.into_iter().enumerate() {
                let path = format!("{}[{i}]", v.path());
                ok &= check(r, &path, line, addr.ip(), format!("tcp {addr}"));
                out.push(addr);
            }
            out
        }),
    };
    let (icmp, tcp) = (icmp?, tcp?);
    let total = icmp.len() + tcp.len();
    if total == 0 {
        r.error(
            m.line(),
            "probes: no targets; list hosts under `icmp` and/or `address:port`s under `tcp`, or remove the \
             section",
        );
        return None;
    }
    if total > MAX_TARGETS {
        r.error(
            m.line(),
            format!("probes: {total} targets; at most {MAX_TARGETS} are supported"),
        );
        return None;
    }
    if let Some(range) = ports {
        if probe_ports(range).is_none() {
            r.error(
                m.line(),
                format!(
                    "probes: `ports` covers every port ({}..={}), so the probes have no source port (and ICMP \
                     identifier) that a NAT mapping could not also take; raise ports.min to at least {} (the \
                     probes then use the {PROBE_PORTS} ports below it)",
                    range.min,
                    range.max,
                    PROBE_PORTS + 1
                ),
            );
            return None;
        }
    }
    if !ok {
        return None;
    }
    Some(ProbesConfig {
        interval: interval?,
        timeout: timeout?,
        icmp,
        tcp,
    })
}

/// The uplink whose route is the longest prefix covering `ip` (the pipeline's rule), and that route.
pub(super) fn route_of(uplinks: &[UplinkSpec], ip: IpAddr) -> Option<(usize, IpNet)> {
    uplinks
        .iter()
        .enumerate()
        .flat_map(|(i, u)| u.routes.iter().map(move |net| (i, *net)))
        .filter(|(_, net)| net.contains(&ip))
        .max_by_key(|(_, net)| net.prefix_len())
}

fn bounded(r: &mut Reader<'_>, v: &Value<'_>, min: Duration, what: &str) -> Option<Duration> {
    let d = r.parse(v, value::duration)?;
    if d < min || d > MAX_DURATION {
        r.error(
            v.line(),
            format!(
                "{}: {} is out of range; use a duration {what} and at most 1h",
                v.path(),
                human(d)
            ),
        );
        return None;
    }
    Some(d)
}

fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A host to probe: a unicast address that is not loopback.
fn target_ip(s: &str) -> Result<IpAddr, String> {
    let ip = value::unicast_ip(s)?;
    if ip.is_loopback() {
        return Err(format!(
            "{ip} is a loopback address; probe a host reached through an uplink"
        ));
    }
    Ok(ip)
}

/// A TCP target: `address:port` (IPv6 in brackets), port not 0.
fn target_addr(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        if s.parse::<IpAddr>().is_ok() {
            format!("`{s}` has no port; write address:port, e.g. {s}:443 (IPv6 in brackets: [2001:db8::1]:443)")
        } else {
            format!("`{s}` is not an address:port; write e.g. 198.51.100.1:443 or [2001:db8::1]:443")
        }
    })?;
    target_ip(&addr.ip().to_string())?;
    if addr.port() == 0 {
        return Err(format!(
            "port 0 cannot be connected to; give the port of a listening service, e.g. {}:443",
            addr.ip()
        ));
    }
    Ok(addr)
}
