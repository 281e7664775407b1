//! External health probes (the `probes` section): the gateway probes outside targets through its own data
//! path — ICMP echo and TCP connect, from an egress IP, out of the uplink that pod traffic to that target
//! takes — and is not ready (`/readiness` 503, the node agents' UDP probe "not ready", so the nodes stop
//! choosing it) while every target of a kind stays unanswered. Calico Enterprise's egress gateway does the
//! same with its `icmpProbe` and `httpProbe` (`egressGatewayFailureDetection`).
//!
//! Why a prober of its own: the egress IPs live in this process, not in the pod's kernel, so a kernel socket
//! cannot send from them, and the gateway's kernel would not even route the answers back. The prober thread
//! therefore works like a worker, with sockets of its own on each uplink:
//!
//! * it sends whole frames (`frame.rs`) on a packet socket, to the MAC of the next hop the workers use
//!   (the neighbour cache; asking for it when unknown), from the uplink's MAC and its first egress IP of the
//!   target's family;
//! * it receives on a second packet socket per uplink: outside the workers' fanout group, such a socket gets
//!   a copy of every frame, and a classic BPF filter (`filter.rs`) keeps only echo replies with the prober's
//!   identifier and TCP segments to its source ports;
//! * those identifiers and ports lie outside `ports` (`config::probe_ports`), so no NAT mapping can ever
//!   use them and no pod's flow can receive a probe's answer. The workers see each answer too and drop it
//!   as `no_flow`, as they drop anything unsolicited.
//!
//! Which target is up, and when the gateway is ready, is decided in `health.rs`; [`Status`] is what
//! `/readiness`, the UDP probe and `/metrics` read.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::ProbesConfig;
use crate::worker::Shared;

mod filter;
mod frame;
mod health;
mod prober;
mod tap;

pub(crate) use health::Kind;

/// One target as the rest of the gateway sees it: its name and its latest counts.
#[derive(Debug)]
pub(crate) struct TargetStatus {
    pub(crate) kind: Kind,
    /// The `target` label: an address (ICMP) or `address:port` (TCP).
    pub(crate) label: String,
    /// The address probed (port 0 for ICMP).
    pub(crate) addr: SocketAddr,
    pub(crate) up: AtomicBool,
    pub(crate) sent: AtomicU64,
    pub(crate) answered: AtomicU64,
    pub(crate) refused: AtomicU64,
    /// Round-trip time of the last answer in nanoseconds; `u64::MAX` before the first.
    pub(crate) rtt_nanos: AtomicU64,
}

impl TargetStatus {
    /// The last answer's round-trip time in seconds, once there was one.
    pub(crate) fn rtt_seconds(&self) -> Option<f64> {
        let n = self.rtt_nanos.load(Ordering::Relaxed);
        // Nanoseconds to seconds: an RTT is far below 2^52 ns.
        #[allow(clippy::cast_precision_loss)]
        (n != u64::MAX).then(|| n as f64 / 1e9)
    }
}

/// The probes' latest verdicts, written by the prober and read by the health endpoints and metrics.
#[derive(Debug, Default)]
pub(crate) struct Status {
    targets: Vec<TargetStatus>,
}

impl Status {
    /// One entry per configured target (none without a `probes` section: then nothing ever fails).
    pub(crate) fn new(config: Option<&ProbesConfig>) -> Status {
        let Some(c) = config else {
            return Status::default();
        };
        let icmp = c
            .icmp
            .iter()
            .map(|ip| (Kind::Icmp, SocketAddr::new(*ip, 0), ip.to_string()));
        let tcp = c.tcp.iter().map(|a| (Kind::Tcp, *a, a.to_string()));
        Status {
            targets: icmp
                .chain(tcp)
                .map(|(kind, addr, label)| TargetStatus {
                    kind,
                    label,
                    addr,
                    up: AtomicBool::new(false),
                    sent: AtomicU64::new(0),
                    answered: AtomicU64::new(0),
                    refused: AtomicU64::new(0),
                    rtt_nanos: AtomicU64::new(u64::MAX),
                })
                .collect(),
        }
    }

    /// Every target, in configuration order (ICMP first).
    pub(crate) fn targets(&self) -> &[TargetStatus] {
        &self.targets
    }

    /// Why the probes hold readiness off — every target of each failing kind, e.g.
    /// `icmp 198.51.100.1, tcp 198.51.100.1:443` — or `None` while no kind fails.
    pub(crate) fn failing(&self) -> Option<String> {
        let kinds = health::failing_kinds(
            self.targets
                .iter()
                .map(|t| (t.kind, t.up.load(Ordering::Relaxed))),
        );
        if kinds.is_empty() {
            return None;
        }
        let names: Vec<String> = self
            .targets
            .iter()
            .filter(|t| kinds.contains(&t.kind))
            .map(|t| format!("{} {}", t.kind.name(), t.label))
            .collect();
        Some(names.join(", "))
    }
}

/// Opens the prober's sockets on every uplink (an error says which) and starts its thread, which probes
/// `config`'s targets from source ports and an ICMP identifier in `ports` until `shared.stop`.
pub(crate) fn start(
    config: &ProbesConfig,
    ports: RangeInclusive<u16>,
    shared: &Arc<Shared>,
    status: &Arc<Status>,
) -> std::io::Result<()> {
    let p = prober::Prober::open(config, ports, Arc::clone(shared), Arc::clone(status))?;
    std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || p.run())?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn readiness_names_every_target_of_a_failing_kind() {
        let cfg = ProbesConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(3),
            icmp: vec![
                "198.51.100.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
            tcp: vec!["[2001:db8::1]:443".parse().unwrap()],
        };
        let s = Status::new(Some(&cfg));
        let labels: Vec<_> = s.targets().iter().map(|t| t.label.as_str()).collect();
        assert_eq!(labels, ["198.51.100.1", "2001:db8::1", "[2001:db8::1]:443"]);
        assert_eq!(
            s.failing().as_deref(),
            Some("icmp 198.51.100.1, icmp 2001:db8::1, tcp [2001:db8::1]:443"),
            "nothing answered yet"
        );
        s.targets()[1].up.store(true, Ordering::Relaxed);
        assert_eq!(s.failing().as_deref(), Some("tcp [2001:db8::1]:443"));
        s.targets()[2].up.store(true, Ordering::Relaxed);
        assert_eq!(s.failing(), None);
        assert_eq!(
            Status::new(None).failing(),
            None,
            "no probes, never failing"
        );
        assert_eq!(s.targets()[0].rtt_seconds(), None);
        s.targets()[0].rtt_nanos.store(1_500_000, Ordering::Relaxed);
        assert_eq!(s.targets()[0].rtt_seconds(), Some(0.0015));
    }
}
