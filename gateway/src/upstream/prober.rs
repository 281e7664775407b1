//! The prober thread: sends each target's probe when it is due, reads the answers from its filtered copy
//! of the uplinks' frames, and publishes each target's state to [`Status`].
//!
//! Where a probe leaves is worked out as for a pod's packet to the same destination, from the running
//! data-plane configuration (so a reload that moves a route moves the probes too): the uplink of the
//! longest matching route, that uplink's first egress IP of the target's family as the source, its router
//! (or the target itself when on-link) as the next hop, whose MAC comes from the workers' neighbour cache.
//! A probe whose next hop is not resolved yet is not sent; the prober asks for the MAC as a worker would
//! and tries again shortly.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder_core::flow::UplinkId;
use forwarder_core::route::RouteTable;
use forwarder_core::wire::ethernet::MacAddr;
use forwarder_core::wire::tcp::flags;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token as PollToken};

use super::filter;
use super::frame::{self, Hop, Reply, Segment};
use super::health::{Answer, Kind, TargetHealth, Timing, Token};
use super::tap::Tap;
use super::Status;
use crate::config::ProbesConfig;
use crate::io::packet::{self, TxSocket};
use crate::neighbour;
use crate::worker::Shared;

/// Longest sleep between two looks at the clock (state changes are published at least this often).
const TICK: Duration = Duration::from_millis(50);
/// Room for a received frame: answers are small; anything longer is cut and not read.
const RX_BUF: usize = 2048;
/// Why a probe waits while its next hop is being resolved.
const UNRESOLVED: &str = "its next hop's MAC is not resolved yet";
/// IPv4 and TCP headers, for the MSS a SYN announces (IPv6: 20 more).
const TCP_IP4_HEADERS: u16 = 40;

/// How a target's probes leave right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Path {
    uplink: UplinkId,
    src: IpAddr,
    next_hop: IpAddr,
}

/// One uplink's sockets.
struct Link {
    name: String,
    tap: Tap,
    tx: TxSocket,
    to: libc::sockaddr_ll,
    mac: MacAddr,
    mtu: u16,
}

/// One target.
struct Target {
    kind: Kind,
    addr: SocketAddr,
    /// As in the metrics: an address, or `address:port`.
    label: String,
    health: TargetHealth,
    path: Option<Path>,
    was_up: bool,
    /// Why its probes cannot be sent, logged once until they can.
    blocked: Option<&'static str>,
}

/// The prober thread's state.
pub(super) struct Prober {
    shared: Arc<Shared>,
    status: Arc<Status>,
    timing: Timing,
    ports: RangeInclusive<u16>,
    links: Vec<Link>,
    targets: Vec<Target>,
    /// The data-plane generation the paths were worked out for.
    generation: Option<u64>,
    seq: u16,
    next_port: u16,
    /// The text of the last failing verdict, to log changes.
    failing: Option<String>,
    poll: Poll,
}

impl Prober {
    /// Opens a receive (filtered) and a send socket on every uplink: any of them may carry probes after a
    /// reload moves a route.
    pub(super) fn open(
        config: &ProbesConfig,
        ports: RangeInclusive<u16>,
        shared: Arc<Shared>,
        status: Arc<Status>,
    ) -> std::io::Result<Prober> {
        let ident = *ports.start();
        let program = filter::program(ident, ports.clone());
        let poll = Poll::new()?;
        let mut links = Vec::with_capacity(shared.uplinks.len());
        for (i, u) in shared.uplinks.iter().enumerate() {
            let failed = |e: std::io::Error| {
                std::io::Error::new(
                    e.kind(),
                    format!("probes: uplink {} ({}): {e}", u.name, u.interface),
                )
            };
            let tap = Tap::open(u.link.index, &program).map_err(failed)?;
            let tx = TxSocket::open(u.link.index, 1 << 16).map_err(failed)?;
            poll.registry().register(
                &mut SourceFd(&tap.as_raw_fd()),
                PollToken(i),
                Interest::READABLE,
            )?;
            links.push(Link {
                name: u.name.clone(),
                tap,
                tx,
                to: packet::link_addr(u.link.index, 0),
                mac: u.link.mac,
                mtu: u.mtu,
            });
        }
        let now = Instant::now();
        let targets = status
            .targets()
            .iter()
            .map(|t| Target {
                kind: t.kind,
                addr: t.addr,
                label: t.label.clone(),
                health: TargetHealth::new(now),
                path: None,
                was_up: false,
                blocked: None,
            })
            .collect();
        tracing::info!(
            targets = status.targets().len(),
            interval = ?config.interval,
            timeout = ?config.timeout,
            source_ports = ?ports,
            icmp_identifier = ident,
            "probing outside targets through the uplinks; not ready until each kind has answered"
        );
        Ok(Prober {
            shared,
            status,
            timing: Timing {
                interval: config.interval,
                timeout: config.timeout,
            },
            ports,
            links,
            targets,
            generation: None,
            seq: random_u16(),
            next_port: 0,
            failing: None,
            poll,
        })
    }

    /// Probes until the gateway stops.
    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(8);
        let mut buf = [0u8; RX_BUF];
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.receive(&mut buf);
            self.refresh_paths();
            let now = Instant::now();
            for i in 0..self.targets.len() {
                if self.targets[i].health.is_due(now) {
                    self.probe(i, now);
                }
            }
            self.publish(Instant::now());
            let next = self
                .targets
                .iter()
                .map(|t| t.health.next_due())
                .min()
                .unwrap_or(now + TICK);
            let wait = next
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), TICK);
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "probes: poll failed");
                    std::thread::sleep(TICK);
                }
            }
        }
    }

    /// Works the paths out again when the data plane's configuration changed (start, reload).
    fn refresh_paths(&mut self) {
        let generation = self.shared.gateway_generation.load(Ordering::Acquire);
        if self.generation == Some(generation) {
            return;
        }
        self.generation = Some(generation);
        let gw = self.shared.gateway();
        let config = gw.config();
        let mut routes = RouteTable::new();
        for (prefix, uplink) in &config.routes {
            // The data plane refused duplicates already.
            let _ = routes.insert(*prefix, *uplink);
        }
        for t in &mut self.targets {
            let dst = t.addr.ip();
            let path = routes.lookup(dst).and_then(|(_, &uplink)| {
                let u = config.uplinks.get(usize::from(uplink))?;
                let src = match dst {
                    IpAddr::V4(_) => u.egress_v4.first().copied().map(IpAddr::V4),
                    IpAddr::V6(_) => u.egress_v6.first().copied().map(IpAddr::V6),
                }?;
                Some(Path {
                    uplink,
                    src,
                    next_hop: u.next_hop(dst),
                })
            });
            if path != t.path {
                match path {
                    Some(p) => tracing::info!(
                        kind = t.kind.name(),
                        target = %t.label,
                        uplink = %self.links.get(usize::from(p.uplink)).map_or("?", |l| l.name.as_str()),
                        source = %p.src,
                        next_hop = %p.next_hop,
                        "probe path"
                    ),
                    None => tracing::warn!(
                        kind = t.kind.name(),
                        target = %t.label,
                        "no uplink routes this probe target; it stays down"
                    ),
                }
                t.path = path;
            }
        }
    }

    /// Sends target `i`'s probe, or schedules a retry when it cannot leave yet.
    fn probe(&mut self, i: usize, now: Instant) {
        let timing = self.timing;
        let (kind, addr, path) = {
            let t = &self.targets[i];
            (t.kind, t.addr, t.path)
        };
        let Some(path) = path else {
            self.targets[i].health.not_sent(now, timing);
            return;
        };
        let Some((link_mac, mtu)) = self
            .links
            .get(usize::from(path.uplink))
            .map(|l| (l.mac, l.mtu))
        else {
            self.targets[i].health.not_sent(now, timing);
            return;
        };
        let Some(mac) = self.next_hop_mac(path, now) else {
            self.blocked(i, UNRESOLVED);
            self.targets[i].health.not_sent(now, timing);
            return;
        };
        let hop = Hop {
            src_mac: link_mac,
            dst_mac: mac,
        };
        let mut out = [0u8; frame::MAX_FRAME];
        let (token, len) = match kind {
            Kind::Icmp => {
                self.seq = self.seq.wrapping_add(1);
                let (seq, nonce) = (self.seq, random_u64());
                let ident = *self.ports.start();
                let n = frame::echo_request(&hop, path.src, addr.ip(), ident, seq, nonce, &mut out);
                (Token::Echo { seq, nonce }, n)
            }
            Kind::Tcp => {
                let port = self.port();
                #[allow(clippy::cast_possible_truncation)] // any 32 random bits do
                let isn = random_u64() as u32;
                let headers = TCP_IP4_HEADERS + if path.src.is_ipv6() { 20 } else { 0 };
                let seg = Segment {
                    src: SocketAddr::new(path.src, port),
                    dst: addr,
                    seq: isn,
                    ack: 0,
                    flags: flags::SYN,
                    mss: Some(mtu.saturating_sub(headers)),
                };
                (
                    Token::Syn { port, isn },
                    frame::tcp_segment(&hop, &seg, &mut out),
                )
            }
        };
        let Some(len) = len else {
            self.targets[i].health.not_sent(now, timing);
            return;
        };
        let sent = self.links[usize::from(path.uplink)]
            .tx
            .send_one(&self.links[usize::from(path.uplink)].to, &out[..len]);
        if let Err(e) = sent {
            tracing::debug!(target = %self.targets[i].label, error = %e, "probes: send failed");
            self.blocked(i, "the uplink refuses its frames");
            self.targets[i].health.not_sent(now, timing);
            return;
        }
        let t = &mut self.targets[i];
        if t.blocked.take().is_some() {
            tracing::info!(kind = kind.name(), target = %t.label, "probes leave");
        }
        t.health.sent(token, now, timing);
    }

    /// Logs once why target `i`'s probes cannot leave (a next hop being resolved is expected at start, so
    /// not a warning).
    fn blocked(&mut self, i: usize, why: &'static str) {
        let t = &mut self.targets[i];
        if t.blocked != Some(why) {
            if why == UNRESOLVED {
                tracing::info!(kind = t.kind.name(), target = %t.label, "probe waits: {why}");
            } else {
                tracing::warn!(kind = t.kind.name(), target = %t.label, "probe not sent: {why}");
            }
            t.blocked = Some(why);
        }
    }

    /// The MAC of `path`'s next hop; when unknown, asks for it (at most once a second per address, as the
    /// workers do) and returns `None`.
    fn next_hop_mac(&self, path: Path, now: Instant) -> Option<MacAddr> {
        let n = &self.shared.neighbours;
        if let Some(mac) = n.get(path.uplink, path.next_hop) {
            return Some(mac);
        }
        let link = self.links.get(usize::from(path.uplink))?;
        if n.want(path.uplink, path.next_hop, now) {
            let mut req = [0u8; neighbour::MAX_FRAME];
            if let Some(len) = neighbour::request(path.next_hop, path.src, link.mac, None, &mut req)
            {
                let _ = link.tx.send_one(&link.to, &req[..len]);
            }
        }
        None
    }

    /// The next TCP source port, round robin over the probes' ports: a new 4-tuple per probe of a target,
    /// so that the target's state for an earlier attempt (a lost RST) cannot meet a new SYN.
    fn port(&mut self) -> u16 {
        let (lo, hi) = (*self.ports.start(), *self.ports.end());
        let port = lo.saturating_add(self.next_port);
        self.next_port = if port >= hi { 0 } else { self.next_port + 1 };
        port.min(hi)
    }

    /// Reads every queued answer on every uplink.
    fn receive(&mut self, buf: &mut [u8]) {
        for u in 0..self.links.len() {
            loop {
                let n = match self.links[u].tap.recv(buf) {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(uplink = %self.links[u].name, error = %e, "probes: receive failed");
                        break;
                    }
                };
                if let Some(reply) = frame::parse(&buf[..n], self.links[u].mac) {
                    self.answer(reply, Instant::now());
                }
            }
        }
    }

    /// Applies one received answer to the target it belongs to.
    fn answer(&mut self, reply: Reply, now: Instant) {
        let timing = self.timing;
        match reply {
            Reply::Echo {
                from,
                to,
                ident,
                seq,
                nonce: Some(nonce),
            } if ident == *self.ports.start() => {
                if let Some(t) = self.target(Kind::Icmp, SocketAddr::new(from, 0), to) {
                    t.health
                        .answer(Token::Echo { seq, nonce }, Answer::Success, now, timing);
                }
            }
            Reply::Tcp {
                from,
                to,
                flags: f,
                ack,
                ..
            } if self.ports.contains(&to.port()) && f & flags::ACK != 0 => {
                let token = Token::Syn {
                    port: to.port(),
                    isn: ack.wrapping_sub(1),
                };
                let Some(t) = self.target(Kind::Tcp, from, to.ip()) else {
                    return;
                };
                let path = t.path;
                if f & flags::RST != 0 {
                    t.health.answer(token, Answer::Refused, now, timing);
                } else if f & flags::SYN != 0
                    && t.health.answer(token, Answer::Success, now, timing)
                {
                    if let Some(p) = path {
                        self.reset(p, to, from, ack);
                    }
                }
            }
            _ => {}
        }
    }

    /// The target of `kind` at `addr` whose probes leave from `ours`.
    fn target(&mut self, kind: Kind, addr: SocketAddr, ours: IpAddr) -> Option<&mut Target> {
        self.targets
            .iter_mut()
            .find(|t| t.kind == kind && t.addr == addr && t.path.is_some_and(|p| p.src == ours))
    }

    /// Closes a connection a SYN-ACK opened: RST with the sequence number it acknowledged.
    fn reset(&self, path: Path, ours: SocketAddr, theirs: SocketAddr, seq: u32) {
        let (Some(link), Some(mac)) = (
            self.links.get(usize::from(path.uplink)),
            self.shared.neighbours.get(path.uplink, path.next_hop),
        ) else {
            return;
        };
        let hop = Hop {
            src_mac: link.mac,
            dst_mac: mac,
        };
        let seg = Segment {
            src: ours,
            dst: theirs,
            seq,
            ack: 0,
            flags: flags::RST,
            mss: None,
        };
        let mut out = [0u8; frame::MAX_FRAME];
        if let Some(n) = frame::tcp_segment(&hop, &seg, &mut out) {
            let _ = link.tx.send_one(&link.to, &out[..n]);
        }
    }

    /// Publishes every target's state and counts, and logs what changed.
    fn publish(&mut self, now: Instant) {
        for (t, s) in self.targets.iter_mut().zip(self.status.targets()) {
            let up = t.health.is_up(now, self.timing);
            s.up.store(up, Ordering::Relaxed);
            s.sent.store(t.health.sent, Ordering::Relaxed);
            s.answered.store(t.health.answered, Ordering::Relaxed);
            s.refused.store(t.health.refused, Ordering::Relaxed);
            if let Some(rtt) = t.health.rtt {
                let nanos = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX - 1);
                s.rtt_nanos.store(nanos, Ordering::Relaxed);
            }
            if up != t.was_up {
                if up {
                    tracing::info!(kind = t.kind.name(), target = %t.label, "probe target up");
                } else {
                    tracing::warn!(kind = t.kind.name(), target = %t.label, timeout = ?self.timing.timeout,
                        "probe target down: no answer for the timeout");
                }
                t.was_up = up;
            }
        }
        let failing = self.status.failing();
        if failing != self.failing {
            match &failing {
                Some(f) => tracing::warn!("not ready: probes failing: {f}"),
                None => tracing::info!("probes answered: every kind has a target up"),
            }
            self.failing = failing;
        }
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Without the OS's randomness, the clock: weaker tokens, not a failure.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        #[allow(clippy::cast_possible_truncation)] // any 64 bits of the clock do
        return t as u64;
    }
    u64::from_ne_bytes(b)
}

fn random_u16() -> u16 {
    #[allow(clippy::cast_possible_truncation)] // any 16 random bits do
    let v = random_u64() as u16;
    v
}
