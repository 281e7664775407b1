//! The capacity faults: a pod over its flow quota, and the port pool of one egress IP exhausted, as a
//! leaking client or a scan from a compromised pod causes them.
//!
//! Both aim at the internal network (the internal server, through each replica's internal egress IPs),
//! which no other traffic of the soak uses, so that a pool exhausted there is one egress IP's alone: the
//! DMZ's egress IPs, which carry every lane, must go on working. `pod-quota` goes over IPv6 and
//! `port-pool` over IPv4, so that neither finds the other's ports still held (a reset flow keeps its
//! port for the transitory timeout and the reuse delay, 150 s here). The fillers are pods (2,3) and (2,4),
//! which carry nothing else. They send hand-built SYNs from a raw socket (one per source port, toward a
//! port the internal server drops, so nothing answers them), then an RST for each. The pods' kernels have
//! no socket for them and ignore the gateways' "administratively prohibited" answers to refused ones.
//!
//! What must hold (docs/nat.md, "Per-pod quota" and "TCP port takeover"):
//! * `pod-quota`: both replicas refuse the pod's flows beyond its quota and count them (`source_quota`);
//!   another pod on the same node still connects; once the pod has reset its flows it connects again
//!   at once, although their entries and ports stay for the transitory timeout.
//! * `port-pool`: with two pods at their quotas the internal egress IPs' TCP pools run out and the
//!   refusals are counted (`ports_exhausted`); connections through the DMZ egress IPs go on; once the
//!   fillers have reset their flows, a new connection to the internal server takes over a finished
//!   one's port at once (`port_takeovers_total`), without waiting out the reuse delay.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use etherparse::TcpHeader;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tests::topology::{INTERNAL_SERVER, INTERNAL_SERVER6, RED_SERVER};
use tests::{scenario, traffic, Result, Topology};

use crate::{load, Soak};

/// `conntrack.max_per_source` of the soak's gateways. The SYN flood's pod (300 SYNs/s, each held for the
/// 30 s transitory timeout: about 9,000 flows) stays well under it even when one replica carries them all.
pub(crate) const QUOTA: u32 = 32_768;
/// The soak gateways' external port range: 49,152 ports per egress IP and protocol, so that two fillers at
/// their quotas (2 × 32,768) exceed it on the internal egress IP. Not fewer: the SYN flood alone keeps
/// about 22,500 of each replica's DMZ TCP ports (150 SYNs/s, each port held for the 30 s transitory
/// timeout and the 120 s reuse delay); with 16,384 ports the DMZ ran out in a CI run.
pub(crate) const PORTS: (u16, u16) = (16_384, 65_535);
/// The pods that fill, in the order the faults use them.
pub(crate) const FILLERS: [(usize, usize); 2] = [(2, 3), (2, 4)];
/// The internal server's port that drops everything (nftables), and its echo port.
const DROP_PORT: u16 = 7998;
const ECHO_PORT: u16 = 7816;
/// The fillers' source ports: flow `i` goes from port `FIRST_PORT + i % SOURCE_PORTS` to the dropped port
/// plus `i / SOURCE_PORTS`, so that one pod can open more flows than it has ports.
const FIRST_PORT: u16 = 1024;
const SOURCE_PORTS: u32 = 60_000;
/// SYNs sent per millisecond.
const PER_MS: u32 = 20;
/// How long the counters and connections may take to show each step.
const SETTLE: Duration = Duration::from_secs(10);

/// Sets up the internal server for the faults: the dropped port and the echo servers.
pub(crate) fn start(topo: &Topology) -> Result<Vec<traffic::Server>> {
    let ns = &topo.internal().ns;
    crate::hostile::drop_tcp_ports(
        ns,
        "soakcapacity",
        &format!("{DROP_PORT}-{}", DROP_PORT + 1),
    )?;
    Ok(vec![
        traffic::tcp_echo_server(ns, internal_echo(false))?,
        traffic::tcp_echo_server(ns, internal_echo(true))?,
    ])
}

/// A gateway counter summed over both replicas.
fn sum(soak: &Soak, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let mut total = 0.0;
    for k in 1..=2 {
        total += scenario::value(&soak.topo.gateway(k).metrics()?, name, labels);
    }
    Ok(total)
}

const REFUSED: &str = "egress_gateway_conntrack_refused_total";

/// Polls until `name{labels}`, summed over both replicas, has grown by `at_least` from `before`; how much
/// it grew.
fn wait_growth(
    soak: &Soak,
    name: &str,
    labels: &[(&str, &str)],
    before: f64,
    at_least: f64,
) -> Result<f64> {
    scenario::poll(SETTLE, Duration::from_millis(100), name, || {
        let grown = sum(soak, name, labels).ok()? - before;
        (grown >= at_least).then_some(grown)
    })
    .map_err(|e| {
        let now = sum(soak, name, labels).unwrap_or(f64::NAN);
        tests::Error::msg(format!(
            "{e}: grew by {} of the {at_least} expected",
            now - before
        ))
    })
}

/// A different initial sequence number each round, as a new connection would have.
fn isn(round: usize, filler: usize) -> u32 {
    let r = u32::try_from(round * 2 + filler).unwrap_or(0);
    0x5000_0000_u32.wrapping_add(r.wrapping_mul(0x0101_0101))
}

/// Filler `f` (an index into [`FILLERS`]) sends `flows` segments to the internal server's dropped port,
/// over IPv6 when `v6`, `flag` set, all with sequence number `seq`.
fn fill(
    soak: &Soak,
    f: usize,
    v6: bool,
    flows: u32,
    seq: u32,
    flag: fn(&mut TcpHeader),
) -> Result<()> {
    let (n, m) = FILLERS[f];
    let pod = soak.topo.pod(n, m);
    let (src, dst) = if v6 {
        let Some(ip6) = pod.ip6 else {
            tests::bail!("pod ({n},{m}) has no IPv6 address");
        };
        (IpAddr::V6(ip6), IpAddr::V6(INTERNAL_SERVER6))
    } else {
        (IpAddr::V4(pod.ip), IpAddr::V4(INTERNAL_SERVER))
    };
    pod.ns
        .thread(move || send_all(src, dst, flows, seq, flag))?
        .join_timeout(Duration::from_secs(60))?
}

/// Pod `(n, m)` opens `count` connections to the echo server `to`, each echoing four bytes
/// ([`traffic::tcp_echo`], which retries a refused or unanswered connect), all within [`SETTLE`]; a
/// failure names the pod and `when`.
fn connect(
    soak: &Soak,
    (n, m): (usize, usize),
    to: SocketAddr,
    count: usize,
    when: &str,
) -> Result<()> {
    let ns = &soak.topo.pod(n, m).ns;
    let fail = |what: String| tests::Error::msg(format!("pod ({n},{m}) {when}: {what}"));
    let start = Instant::now();
    for i in 1..=count {
        let back = traffic::tcp_echo(ns, to, b"ping")
            .map_err(|e| fail(format!("connection {i} of {count}: {e}")))?;
        if back != b"ping" {
            return Err(fail(format!(
                "connection {i} of {count} to {to}: the echo differs"
            )));
        }
    }
    if start.elapsed() > SETTLE {
        return Err(fail(format!(
            "{count} connections to {to} took {:?}, over {SETTLE:?}",
            start.elapsed()
        )));
    }
    Ok(())
}

fn internal_echo(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::from((INTERNAL_SERVER6, ECHO_PORT))
    } else {
        SocketAddr::from((INTERNAL_SERVER, ECHO_PORT))
    }
}

fn red_echo() -> SocketAddr {
    SocketAddr::from((RED_SERVER, load::SHORT_PORT))
}

/// The `pod-quota` fault; what it saw, for the fault's line in the log.
pub(crate) fn pod_quota(soak: &mut Soak, round: usize) -> Result<String> {
    // Its quota on each replica, and 4,096 more.
    let flows = 2 * QUOTA + 4096;
    let before = sum(soak, REFUSED, &[("reason", "source_quota")])?;
    let seq = isn(round, 0);
    fill(soak, 0, true, flows, seq, |h| h.syn = true)?;
    // However the node's multipath hash spread the flows, at least half of what exceeds both quotas is
    // refused (packets lost on the way are not refused).
    let refused = wait_growth(
        soak,
        REFUSED,
        &[("reason", "source_quota")],
        before,
        f64::from(flows - 2 * QUOTA) / 2.0,
    )
    .map_err(|e| tests::Error::msg(format!("the pod over its quota was not refused: {e}")))?;
    connect(
        soak,
        (2, 1),
        red_echo(),
        8,
        "while another pod was over its quota",
    )?;
    let reset = Instant::now();
    fill(soak, 0, true, flows, seq.wrapping_add(1), |h| h.rst = true)?;
    connect(
        soak,
        FILLERS[0],
        internal_echo(true),
        8,
        "after resetting its flows",
    )?;
    Ok(format!(
        "{flows} IPv6 flows from pod {:?}: {refused} refused over its quota of {QUOTA} per replica; pod (2,1) \
         connected meanwhile; the pod connected again {:.1} s after its resets began",
        FILLERS[0],
        reset.elapsed().as_secs_f64()
    ))
}

/// The `port-pool` fault; what it saw.
pub(crate) fn port_pool(soak: &mut Soak, round: usize) -> Result<String> {
    let flows = 2 * QUOTA;
    let pool = u32::from(PORTS.1 - PORTS.0) + 1;
    let before = sum(soak, REFUSED, &[("reason", "ports_exhausted")])?;
    let takeovers = sum(soak, "egress_gateway_port_takeovers_total", &[])?;
    for f in 0..FILLERS.len() {
        fill(soak, f, false, flows, isn(round, f), |h| h.syn = true)?;
    }
    // Each replica gets about half of each filler's flows, up to its quota: well over its pool.
    let want = (2.0 * f64::from(flows) - 2.0 * f64::from(pool)) / 4.0;
    let refused = wait_growth(
        soak,
        REFUSED,
        &[("reason", "ports_exhausted")],
        before,
        want,
    )
    .map_err(|e| {
        tests::Error::msg(format!(
            "the internal egress IPs' pools did not run out: {e}"
        ))
    })?;
    // The DMZ egress IPs are other pools.
    connect(
        soak,
        (2, 1),
        red_echo(),
        8,
        "through the DMZ while the internal pools were exhausted",
    )?;
    let reset = Instant::now();
    for f in 0..FILLERS.len() {
        fill(soak, f, false, flows, isn(round, f).wrapping_add(1), |h| {
            h.rst = true
        })?;
    }
    connect(
        soak,
        (2, 1),
        internal_echo(false),
        8,
        "to the internal server after the fillers' resets",
    )?;
    let took = reset.elapsed();
    let taken = sum(soak, "egress_gateway_port_takeovers_total", &[])? - takeovers;
    if taken < 1.0 {
        tests::bail!(
            "no connection took over a finished connection's port, so the pool was not full"
        );
    }
    Ok(format!(
        "{} IPv4 flows from pods {FILLERS:?} to the internal server: {refused} refused with the pools of \
         {pool} ports exhausted; the DMZ carried on; a new internal connection {:.1} s after the resets \
         began ({taken} port takeovers)",
        2 * flows,
        took.as_secs_f64()
    ))
}

/// Flow `i`'s source and destination ports.
fn tuple(i: u32) -> (u16, u16) {
    let sport = u32::from(FIRST_PORT) + i % SOURCE_PORTS;
    let dport = u32::from(DROP_PORT) + i / SOURCE_PORTS;
    (
        u16::try_from(sport).unwrap_or(u16::MAX),
        u16::try_from(dport).unwrap_or(u16::MAX),
    )
}

/// Sends one TCP segment for each of `flows` tuples ([`tuple`]) from `src` to `dst`, `flag` set,
/// sequence number `seq`, [`PER_MS`] per millisecond.
fn send_all(
    src: IpAddr,
    dst: IpAddr,
    flows: u32,
    seq: u32,
    flag: fn(&mut TcpHeader),
) -> Result<()> {
    // An IPPROTO_TCP raw socket: the kernel writes the IP header, we the TCP one. The destination's port
    // stays 0 (an IPv6 raw socket reads it as the protocol).
    let domain = if dst.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::from(libc::SOCK_RAW), Some(Protocol::TCP))?;
    let to = SockAddr::from(SocketAddr::new(dst, 0));
    let start = Instant::now();
    for i in 0..flows {
        let (sport, dport) = tuple(i);
        let mut h = TcpHeader::new(sport, dport, seq, 64_240);
        flag(&mut h);
        h.checksum = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => h.calc_checksum_ipv4_raw(s.octets(), d.octets(), &[]),
            (IpAddr::V6(s), IpAddr::V6(d)) => h.calc_checksum_ipv6_raw(s.octets(), d.octets(), &[]),
            _ => tests::bail!("{src} and {dst} are of different families"),
        }
        .map_err(|e| tests::Error::msg(e.to_string()))?;
        let bytes = h.to_bytes();
        // A full send queue (ENOBUFS) is waited out, so that every flow is offered.
        let mut tries = 0;
        while let Err(e) = sock.send_to(&bytes, &to) {
            tries += 1;
            if tries > 100 {
                return Err(tests::Error::msg(format!(
                    "send a segment from port {sport} to port {dport}: {e}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if i % PER_MS == PER_MS - 1 {
            let due = Duration::from_millis(u64::from(i / PER_MS + 1));
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(())
}
