//! Probing the gateways: a UDP probe (`crate::probe`: one datagram each way, nothing a slow client can
//! hold up on the gateway) or `GET <path>` on each gateway's pod IP every `interval`, and the per-gateway state
//! machine that turns probe results into [`Health`] (`failures` bad probes in a row take a gateway out,
//! `successes` good ones bring it back; a `503 draining` answer marks it draining at once).
//!
//! One tokio task per gateway sends its results to the agent's loop, which owns the states.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::desired::Health;
use crate::config::node::{HealthSettings, ProbeProtocol};

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// HTTP 200.
    Ready,
    /// HTTP 503 with a body saying `draining`.
    Draining,
    /// HTTP 503 `handed over`: draining, and its peers carry its flows (state sync) — down at once.
    HandedOver,
    /// Anything else: refused, timed out, another status; with what happened.
    Failed(String),
}

/// One gateway's probe history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GatewayState {
    /// The current verdict.
    pub(crate) health: Health,
    /// Bad probes in a row.
    pub(crate) failures: u32,
    /// Good probes in a row.
    pub(crate) successes: u32,
    /// What the last failed probe found.
    pub(crate) last_error: Option<String>,
}

impl GatewayState {
    /// Takes a probe result; returns whether [`GatewayState::health`] changed. The first result decides
    /// at once (a gateway is not held as unknown for several intervals).
    pub(crate) fn record(&mut self, probe: &Probe, settings: &HealthSettings) -> bool {
        let before = self.health;
        match probe {
            Probe::Ready => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                self.last_error = None;
                if self.health == Health::Unknown
                    || self.health == Health::Draining
                    || self.successes >= settings.successes
                {
                    self.health = Health::Healthy;
                }
            }
            Probe::Draining => {
                self.failures = 0;
                self.successes = 0;
                self.health = Health::Draining;
            }
            Probe::HandedOver => {
                self.failures = 0;
                self.successes = 0;
                self.last_error = Some("handed over to the replicas of its set".into());
                self.health = Health::Down;
            }
            Probe::Failed(why) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_error = Some(why.clone());
                if self.health == Health::Unknown || self.failures >= settings.failures {
                    self.health = Health::Down;
                }
            }
        }
        self.health != before
    }
}

/// The probe tasks, one per gateway.
#[derive(Debug)]
pub(crate) struct Prober {
    settings: HealthSettings,
    results: mpsc::UnboundedSender<(Ipv4Addr, Probe)>,
    tasks: BTreeMap<Ipv4Addr, JoinHandle<()>>,
}

impl Prober {
    /// A prober sending `(gateway, result)` to `results`.
    pub(crate) fn new(
        settings: HealthSettings,
        results: mpsc::UnboundedSender<(Ipv4Addr, Probe)>,
    ) -> Prober {
        Prober {
            settings,
            results,
            tasks: BTreeMap::new(),
        }
    }

    /// Probes exactly `gateways` from now on: starts tasks for new ones (their first probe at once), stops
    /// the others.
    pub(crate) fn set_targets(&mut self, gateways: impl IntoIterator<Item = Ipv4Addr>) {
        let wanted: std::collections::BTreeSet<Ipv4Addr> = gateways.into_iter().collect();
        self.tasks.retain(|ip, task| {
            let keep = wanted.contains(ip);
            if !keep {
                task.abort();
            }
            keep
        });
        for ip in wanted {
            if self.tasks.contains_key(&ip) {
                continue;
            }
            let settings = self.settings.clone();
            let tx = self.results.clone();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(settings.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Whether the last probe failed: a gateway already failing is probed once per interval.
                let mut failing = false;
                loop {
                    tick.tick().await;
                    let mut result = probe(ip, &settings).await;
                    // The first failure is confirmed at once rather than an interval later: the probes
                    // `failures` asks for go back to back, so a dead gateway is out within one interval
                    // (plus the probes' own time), and one lost datagram still takes it out only if the
                    // retries fail too.
                    let mut failed = 1;
                    while !failing
                        && matches!(result, Probe::Failed(_))
                        && failed < settings.failures
                    {
                        if tx.send((ip, result)).is_err() {
                            return;
                        }
                        tokio::time::sleep(RETRY).await;
                        result = probe(ip, &settings).await;
                        failed += 1;
                    }
                    failing = matches!(result, Probe::Failed(_));
                    if tx.send((ip, result)).is_err() {
                        return;
                    }
                }
            });
            self.tasks.insert(ip, task);
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// One probe, by `settings.protocol`, within `settings.timeout`.
pub(crate) async fn probe(ip: Ipv4Addr, settings: &HealthSettings) -> Probe {
    match settings.protocol {
        ProbeProtocol::Udp => probe_udp(ip, settings).await,
        ProbeProtocol::Http => probe_http(ip, settings).await,
    }
}

/// One UDP probe: a request with a fresh nonce, and its reply (replies to earlier probes are skipped).
async fn probe_udp(ip: Ipv4Addr, settings: &HealthSettings) -> Probe {
    let addr = SocketAddr::from((ip, settings.port));
    let mut nonce = [0u8; 8];
    if let Err(e) = getrandom::fill(&mut nonce) {
        return Probe::Failed(format!("no random nonce: {e}"));
    }
    let nonce = u64::from_ne_bytes(nonce);
    let exchange = async {
        let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
        socket.connect(addr).await?;
        socket.send(&crate::probe::request(nonce)).await?;
        let mut buf = [0u8; crate::probe::LEN + 1];
        loop {
            let n = socket.recv(&mut buf).await?;
            if let Some(state) = crate::probe::parse_reply(&buf[..n], nonce) {
                return Ok::<_, std::io::Error>(state);
            }
        }
    };
    match tokio::time::timeout(settings.timeout, exchange).await {
        Err(_) => Probe::Failed(format!("no UDP answer within {:?}", settings.timeout)),
        // ECONNREFUSED: an ICMP port unreachable came back (nothing listens).
        Ok(Err(e)) => Probe::Failed(e.to_string()),
        Ok(Ok(crate::probe::State::Ready)) => Probe::Ready,
        Ok(Ok(crate::probe::State::Draining)) => Probe::Draining,
        Ok(Ok(crate::probe::State::HandedOver)) => Probe::HandedOver,
        Ok(Ok(crate::probe::State::NotReady)) => Probe::Failed("not ready".into()),
    }
}

/// One probe: `GET path` over HTTP/1.0.
async fn probe_http(ip: Ipv4Addr, settings: &HealthSettings) -> Probe {
    let addr = SocketAddr::from((ip, settings.port));
    match tokio::time::timeout(settings.timeout, exchange(addr, &settings.path)).await {
        Err(_) => Probe::Failed(format!("no answer within {:?}", settings.timeout)),
        Ok(Err(e)) => Probe::Failed(e.to_string()),
        Ok(Ok((200, _))) => Probe::Ready,
        Ok(Ok((503, body))) if body.contains("draining") => Probe::Draining,
        Ok(Ok((503, body))) if body.contains("handed over") => Probe::HandedOver,
        Ok(Ok((status, body))) => Probe::Failed(format!(
            "HTTP {status} {}",
            body.lines().next().unwrap_or("").trim()
        )),
    }
}

/// Sends the request, returns the status and (up to 4 KB of) the body.
async fn exchange(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: egress-gateway-node\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while buf.len() < 4096 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let (status, body) = crate::http::parse_response(&text).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
    })?;
    Ok((status, body.to_string()))
}

/// The pause between the back-to-back probes that confirm a first failure: long enough not to spin on a
/// port that refuses at once, short against any interval.
const RETRY: Duration = Duration::from_millis(10);

/// How long after a gateway dies it is taken out, at most: what failover costs. Its next probe starts
/// within an interval; that one and the `failures - 1` back-to-back retries each fail within the timeout.
pub(crate) fn detection_bound(settings: &HealthSettings) -> Duration {
    settings.interval
        + settings.timeout * settings.failures
        + RETRY * settings.failures.saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            failures: 2,
            successes: 2,
            ..HealthSettings::default()
        }
    }

    #[test]
    fn first_result_decides_then_thresholds_apply() {
        let s = settings();
        let mut g = GatewayState::default();
        assert!(g.record(&Probe::Ready, &s));
        assert_eq!(g.health, Health::Healthy);
        // One failure is tolerated, the second takes it out.
        assert!(!g.record(&Probe::Failed("refused".into()), &s));
        assert!(g.record(&Probe::Failed("refused".into()), &s));
        assert_eq!(g.health, Health::Down);
        assert_eq!(g.last_error.as_deref(), Some("refused"));
        // Two good probes bring it back.
        assert!(!g.record(&Probe::Ready, &s));
        assert!(g.record(&Probe::Ready, &s));
        assert_eq!(g.health, Health::Healthy);
        // A good probe between failures resets the count.
        g.record(&Probe::Failed("x".into()), &s);
        g.record(&Probe::Ready, &s);
        assert!(!g.record(&Probe::Failed("x".into()), &s));
        assert_eq!(g.health, Health::Healthy);

        let mut g = GatewayState::default();
        assert!(g.record(&Probe::Failed("timeout".into()), &s));
        assert_eq!(g.health, Health::Down);
    }

    /// A gateway that handed its flows over (state sync) is down at its first such answer, whatever it
    /// was, and back after `successes` good probes (its next incarnation), as after any failure.
    #[test]
    fn handed_over_is_down_at_once() {
        let s = settings();
        for before in [Probe::Ready, Probe::Draining] {
            let mut g = GatewayState::default();
            g.record(&before, &s);
            assert!(g.record(&Probe::HandedOver, &s));
            assert_eq!(g.health, Health::Down);
            assert!(g
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("handed over")));
            for _ in 0..s.successes {
                g.record(&Probe::Ready, &s);
            }
            assert_eq!(g.health, Health::Healthy);
        }
    }

    #[test]
    fn draining_is_immediate_and_ends_with_a_good_probe() {
        let s = settings();
        let mut g = GatewayState::default();
        g.record(&Probe::Ready, &s);
        assert!(g.record(&Probe::Draining, &s));
        assert_eq!(g.health, Health::Draining);
        assert!(g.record(&Probe::Ready, &s));
        assert_eq!(g.health, Health::Healthy);
    }

    /// Probes real sockets on loopback: a 200, a 503 draining, a 503 starting, a closed port, a silent
    /// listener (timeout).
    #[test]
    fn probe_reads_real_answers() {
        use std::io::{Read, Write};
        let serve = |answer: &'static str| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            std::thread::spawn(move || {
                for s in l.incoming().take(1) {
                    let mut s = s.unwrap();
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(answer.as_bytes());
                }
            });
            port
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let at = |port: u16| HealthSettings {
            protocol: ProbeProtocol::Http,
            port,
            timeout: Duration::from_millis(300),
            ..HealthSettings::default()
        };
        let lo = Ipv4Addr::LOCALHOST;
        rt.block_on(async {
            let p = serve("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            assert_eq!(probe(lo, &at(p)).await, Probe::Ready);
            let p = serve("HTTP/1.1 503 Service Unavailable\r\n\r\ndraining\n");
            assert_eq!(probe(lo, &at(p)).await, Probe::Draining);
            let p = serve("HTTP/1.1 503 Service Unavailable\r\n\r\nstarting\n");
            assert_eq!(
                probe(lo, &at(p)).await,
                Probe::Failed("HTTP 503 starting".into())
            );
            // A port nobody listens on: refused at once.
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = closed.local_addr().unwrap().port();
            drop(closed);
            assert!(
                matches!(probe(lo, &at(port)).await, Probe::Failed(e) if e.contains("refused"))
            );
            // A listener that never answers: the timeout.
            let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = silent.local_addr().unwrap().port();
            assert!(
                matches!(probe(lo, &at(port)).await, Probe::Failed(e) if e.contains("no answer"))
            );
            drop(silent);
        });
    }

    /// A first failure is confirmed by back-to-back probes, not an interval later; a gateway that stays
    /// down is then probed once per interval.
    #[test]
    fn a_first_failure_is_confirmed_at_once() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let settings = HealthSettings {
            port,
            interval: Duration::from_secs(3),
            timeout: Duration::from_millis(300),
            failures: 3,
            ..HealthSettings::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut prober = Prober::new(settings, tx);
            prober.set_targets([Ipv4Addr::LOCALHOST]);
            let mut seen = Vec::new();
            let window = tokio::time::sleep(Duration::from_millis(1500));
            tokio::pin!(window);
            loop {
                tokio::select! {
                    r = rx.recv() => seen.push(r.expect("the prober runs")),
                    () = &mut window => break,
                }
            }
            // Within half the interval: the first probe and its two retries, all refused; no more.
            assert_eq!(seen.len(), 3, "{seen:?}");
            assert!(
                seen.iter().all(|(_, p)| matches!(p, Probe::Failed(_))),
                "{seen:?}"
            );
            // The next interval: one probe, no retries for a gateway already down.
            let next = tokio::time::timeout(Duration::from_secs(4), rx.recv()).await;
            assert!(matches!(next, Ok(Some((_, Probe::Failed(_))))), "{next:?}");
            let more = tokio::time::timeout(Duration::from_millis(1000), rx.recv()).await;
            assert!(
                more.is_err(),
                "a down gateway was probed again at once: {more:?}"
            );
        });
    }

    /// The UDP probe against the gateway's responder (`crate::probe::serve`): ready, draining, not ready,
    /// a closed port (refused at once), a socket that never answers (the timeout), and a stream of
    /// well-formed but wrong replies (another probe's nonce) before the right one.
    #[test]
    fn udp_probe_reads_real_answers() {
        use crate::probe::{self, Counters, State};
        use std::sync::atomic::{AtomicU8, Ordering};
        use std::sync::Arc;
        let state = Arc::new(AtomicU8::new(0));
        let read = {
            let state = Arc::clone(&state);
            Arc::new(move || match state.load(Ordering::Relaxed) {
                0 => State::Ready,
                1 => State::Draining,
                _ => State::NotReady,
            })
        };
        let addr = probe::serve(
            "127.0.0.1:0".parse().unwrap(),
            read,
            Arc::new(Counters::default()),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let at = |port: u16| HealthSettings {
            port,
            timeout: Duration::from_millis(300),
            ..HealthSettings::default()
        };
        assert_eq!(at(1).protocol, ProbeProtocol::Udp, "the default");
        let lo = Ipv4Addr::LOCALHOST;
        rt.block_on(async {
            assert_eq!(probe(lo, &at(addr.port())).await, Probe::Ready);
            state.store(1, Ordering::Relaxed);
            assert_eq!(probe(lo, &at(addr.port())).await, Probe::Draining);
            state.store(2, Ordering::Relaxed);
            assert_eq!(
                probe(lo, &at(addr.port())).await,
                Probe::Failed("not ready".into())
            );
            let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = closed.local_addr().unwrap().port();
            drop(closed);
            assert!(
                matches!(probe(lo, &at(port)).await, Probe::Failed(e) if e.contains("refused")),
                "closed port"
            );
            let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = silent.local_addr().unwrap().port();
            assert!(
                matches!(probe(lo, &at(port)).await, Probe::Failed(e) if e.contains("no UDP answer"))
            );
            // A responder that first sends a reply to another probe, then the right one.
            let tricky = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = tricky.local_addr().unwrap().port();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                let (n, from) = tricky.recv_from(&mut buf).unwrap();
                let nonce = probe::parse_request(&buf[..n]).unwrap();
                tricky.send_to(&probe::reply(nonce ^ 1, State::NotReady), from).unwrap();
                tricky.send_to(b"junk", from).unwrap();
                tricky.send_to(&probe::reply(nonce, State::Ready), from).unwrap();
            });
            assert_eq!(probe(lo, &at(port)).await, Probe::Ready);
            drop(silent);
        });
    }
}
