//! The soak's legitimate traffic: every kind of flow a pod opens through the gateways, run continuously on
//! threads inside the pods' namespaces, each checked byte for byte and its stalls and failures recorded
//! with the time they happened (so that the summary can put them next to the faults injected then).
//!
//! | lane | from | what |
//! |---|---|---|
//! | `session_v4_node1`, `session_v4_node2`, `session_v6` | pods (1,1), (2,1), (1,2) | one TCP connection for the whole run: a numbered 64-byte line every 10 ms, echoed |
//! | `bulk` | pod (1,3) | 16 MiB uploads and downloads in turn, paced, each hash-checked at the far end |
//! | `short_tcp_node1`, `short_tcp_node2` | pods (1,1), (2,1) | connect, 100-byte echo, close, 20 per second; every 10th left without FIN or RST |
//! | `udp_rr_v4`, `udp_rr_v6` | pods (1,2), (2,1) | UDP request/response, 50 per second |
//! | `udp_fragments` | pod (2,1) | 4,000-byte UDP echoes (fragmented both ways), 10 per second |
//! | `udp_oneway` | pod (1,3) | 200 numbered datagrams per second to a sink that checks and counts them |
//! | `udp_pmtu` | pod (1,2) | UDP requests, 10 per second, answered with don't-fragment datagrams: 1,500 bytes while the server does not know the path's MTU (the gateway drops them and answers "fragmentation needed"), what fits the tunnel once it does |
//! | `ping` | pod (1,1) | `ping -i 0.2` to the red server |

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::topology::{RED_SERVER, RED_SERVER6};
use tests::traffic::{self, Fnv64, Pattern};
use tests::{Context, Netns, NsThread, Process, Result, Topology};

/// The interactive sessions' echo server.
const SESSION_PORT: u16 = 7810;
/// The short connections' echo server.
pub(crate) const SHORT_PORT: u16 = 7811;
/// The echo server of the connections abandoned without FIN (the pods drop their own FIN and RST to it).
const ABANDON_PORT: u16 = 7812;
/// The bulk transfer server.
const BULK_PORT: u16 = 7813;
/// The UDP echo server (request/response and fragments).
const UDP_ECHO_PORT: u16 = 7814;
/// The one-way UDP sink.
const ONEWAY_PORT: u16 = 7815;
/// The path-MTU server.
const PMTU_PORT: u16 = 7817;
/// The path-MTU server's answer while it does not know the path's MTU: a 1,500-byte IPv4 packet, don't
/// fragment, which the tunnel (MTU 1,450) cannot carry.
const PMTU_BIG: usize = 1472;
/// Its answer once the gateway's "fragmentation needed" taught its kernel the path's MTU (1,450).
const PMTU_FITS: usize = 1422;

/// How long the sessions' server (and client) wait without a byte before they give up: a minute, as an
/// interactive session's peers would at the least, so that a stall of a few seconds (and the TCP
/// retransmission backoff that follows it) shows as a stall, not as a break.
const SESSION_IDLE: Duration = Duration::from_secs(60);
/// A wait longer than this is recorded as a stall (with when it began).
pub(crate) const STALL: Duration = Duration::from_millis(200);
/// Bytes per bulk transfer.
const BULK_BYTES: u64 = 16 << 20;
/// Pace of the bulk transfers (bytes per second): enough to keep GSO super-packets and the sync of a
/// busy flow in play, not so much that the 2-CPU machine starves the other lanes.
const BULK_RATE: u64 = 12 << 20;

/// What one lane saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    /// Operations completed and checked (exchanges, connections, transfers, datagrams answered).
    pub(crate) ok: u64,
    /// Operations that failed, with when and why.
    pub(crate) failures: Vec<(Instant, String)>,
    /// Operations whose answer never came (UDP: lost; expected during faults, counted, not failures).
    pub(crate) lost: u64,
    /// Payload bytes carried and checked.
    pub(crate) bytes: u64,
    /// Waits of [`STALL`] or more: when the wait began and how long it was.
    pub(crate) stalls: Vec<(Instant, Duration)>,
    /// TCP connections opened (for the sessions: one unless a failure reconnected).
    pub(crate) connections: u64,
}

type Shared = Arc<Mutex<Tally>>;

fn with(t: &Shared, f: impl FnOnce(&mut Tally)) {
    if let Ok(mut g) = t.lock() {
        f(&mut g);
    }
}

/// One kind of traffic running on its own thread.
pub(crate) struct Lane {
    /// Its name in the summary.
    pub(crate) name: &'static str,
    tally: Shared,
    thread: Option<NsThread<()>>,
}

/// What a lane reports at the end.
#[derive(Debug)]
pub(crate) struct LaneReport {
    /// The lane.
    pub(crate) name: &'static str,
    /// What it saw.
    pub(crate) tally: Tally,
}

/// All the lanes, their servers on the red host, and the ping process.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    lanes: Vec<Lane>,
    ping: Option<Process>,
    oneway: Option<NsThread<OnewaySink>>,
    oneway_sent: Arc<Mutex<u64>>,
    pmtu: Option<NsThread<()>>,
    // Servers last: they stop after the lanes.
    _servers: Vec<traffic::Server>,
}

impl Load {
    /// Starts the servers on the red host, then every lane.
    pub(crate) fn start(topo: &Topology) -> Result<Self> {
        let red = &topo.red().ns;
        let v4 = |port| SocketAddr::from((RED_SERVER, port));
        let v6 = |port| SocketAddr::from((RED_SERVER6, port));
        let servers = vec![
            traffic::tcp_echo_server_idle(red, v4(SESSION_PORT), SESSION_IDLE)?,
            traffic::tcp_echo_server_idle(red, v6(SESSION_PORT), SESSION_IDLE)?,
            traffic::tcp_echo_server(red, v4(SHORT_PORT))?,
            traffic::tcp_echo_server(red, v4(ABANDON_PORT))?,
            traffic::bulk_server(red, v4(BULK_PORT))?,
            traffic::udp_echo_server(red, v4(UDP_ECHO_PORT))?,
            traffic::udp_echo_server(red, v6(UDP_ECHO_PORT))?,
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let oneway_stop = Arc::clone(&stop);
        let oneway = red.thread(move || oneway_sink(v4(ONEWAY_PORT), &oneway_stop))?;
        let pmtu_stop = Arc::clone(&stop);
        let pmtu = red.thread(move || pmtu_server(v4(PMTU_PORT), &pmtu_stop))?;
        for (n, m) in [(1, 1), (1, 2), (1, 3), (2, 1)] {
            abandon_filter(&topo.pod(n, m).ns)?;
        }
        let mut load = Self {
            stop,
            lanes: Vec::new(),
            ping: None,
            oneway: Some(oneway),
            oneway_sent: Arc::default(),
            pmtu: Some(pmtu),
            _servers: servers,
        };
        let (p11, p12, p13, p21) = (
            &topo.pod(1, 1).ns,
            &topo.pod(1, 2).ns,
            &topo.pod(1, 3).ns,
            &topo.pod(2, 1).ns,
        );
        load.lane("session_v4_node1", p11, move |s, t| {
            session(v4(SESSION_PORT), s, t)
        })?;
        load.lane("session_v4_node2", p21, move |s, t| {
            session(v4(SESSION_PORT), s, t)
        })?;
        load.lane("session_v6", p12, move |s, t| {
            session(v6(SESSION_PORT), s, t)
        })?;
        load.lane("bulk", p13, move |s, t| bulk(v4(BULK_PORT), s, t))?;
        load.lane("short_tcp_node1", p11, move |s, t| {
            short_tcp(v4(SHORT_PORT), v4(ABANDON_PORT), s, t)
        })?;
        load.lane("short_tcp_node2", p21, move |s, t| {
            short_tcp(v4(SHORT_PORT), v4(ABANDON_PORT), s, t)
        })?;
        load.lane("udp_rr_v4", p12, move |s, t| {
            udp_rr(v4(UDP_ECHO_PORT), 64, 64, Duration::from_millis(20), s, t)
        })?;
        load.lane("udp_rr_v6", p21, move |s, t| {
            udp_rr(v6(UDP_ECHO_PORT), 64, 64, Duration::from_millis(20), s, t)
        })?;
        load.lane("udp_fragments", p21, move |s, t| {
            udp_rr(
                v4(UDP_ECHO_PORT),
                4000,
                4000,
                Duration::from_millis(100),
                s,
                t,
            )
        })?;
        load.lane("udp_pmtu", p12, move |s, t| {
            udp_rr(
                v4(PMTU_PORT),
                64,
                PMTU_FITS,
                Duration::from_millis(100),
                s,
                t,
            )
        })?;
        let sent = Arc::clone(&load.oneway_sent);
        load.lane("udp_oneway", p13, move |s, _| {
            udp_oneway(v4(ONEWAY_PORT), s, &sent)
        })?;
        load.ping = Some(topo.spawn(p11, &["ping", "-n", "-i", "0.2", &RED_SERVER.to_string()])?);
        Ok(load)
    }

    fn lane(
        &mut self,
        name: &'static str,
        ns: &Netns,
        run: impl FnOnce(&AtomicBool, &Shared) + Send + 'static,
    ) -> Result<()> {
        let tally = Shared::default();
        let (stop, t) = (Arc::clone(&self.stop), Arc::clone(&tally));
        let thread = ns.thread(move || run(&stop, &t))?;
        self.lanes.push(Lane {
            name,
            tally,
            thread: Some(thread),
        });
        Ok(())
    }

    /// What every lane has seen so far (for the progress line).
    pub(crate) fn snapshot(&self) -> Vec<LaneReport> {
        self.lanes
            .iter()
            .map(|l| LaneReport {
                name: l.name,
                tally: l.tally.lock().map(|g| g.clone()).unwrap_or_default(),
            })
            .collect()
    }

    /// Stops every lane (sessions close with FIN), waits for them, and returns their reports, the ping's
    /// and the one-way sink's among them.
    pub(crate) fn stop(mut self) -> Result<Vec<LaneReport>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for mut lane in std::mem::take(&mut self.lanes) {
            if let Some(t) = lane.thread.take() {
                t.join_timeout(Duration::from_secs(60))
                    .with_context(|| format!("stop lane {}", lane.name))?;
            }
            out.push(LaneReport {
                name: lane.name,
                tally: lane.tally.lock().map(|g| g.clone()).unwrap_or_default(),
            });
        }
        if let Some(mut ping) = self.ping.take() {
            ping.signal(libc::SIGINT);
            let _ = ping.wait_timeout(Duration::from_secs(5));
            out.push(LaneReport {
                name: "ping",
                tally: ping_tally(&ping.log_text()),
            });
        }
        // The sink keeps reading for a second after the senders stopped, for the last datagrams in flight.
        std::thread::sleep(Duration::from_secs(1));
        if let Some(t) = self.pmtu.take() {
            t.join_timeout(Duration::from_secs(10))?;
        }
        if let Some(t) = self.oneway.take() {
            let sink = t.join_timeout(Duration::from_secs(10))?;
            let sent = self.oneway_sent.lock().map(|g| *g).unwrap_or(0);
            if let Some(r) = out.iter_mut().find(|r| r.name == "udp_oneway") {
                let t = &mut r.tally;
                t.ok = sink.distinct;
                t.lost = sent.saturating_sub(sink.distinct);
                t.bytes = sink.distinct * ONEWAY_LEN as u64;
                if sink.corrupt > 0 {
                    t.failures.push((
                        Instant::now(),
                        format!("{} datagrams arrived corrupted", sink.corrupt),
                    ));
                }
                if sink.duplicates > 0 {
                    t.failures.push((
                        Instant::now(),
                        format!("{} datagrams arrived twice", sink.duplicates),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// The source ports of the abandoned connections (outside Linux's ephemeral range, 32768–60999), used in
/// turn: a port comes round again after 12,000 abandoned connections (100 minutes at the lanes' rate),
/// long after every side has forgotten its last use.
const ABANDON_SOURCE_PORTS: (u16, u16) = (20_000, 31_999);

/// In a pod: drops the pod's own FIN and RST segments of the abandoned connections (from
/// [`ABANDON_SOURCE_PORTS`] to [`ABANDON_PORT`]), so that such a connection is left as a crashed or
/// partitioned client leaves it: no FIN, no RST, ever. Only those: a later connection from an ephemeral
/// port must still be able to reset a stale connection the server kept (as any client can).
fn abandon_filter(pod: &Netns) -> Result<()> {
    pod.exec_args(&["nft", "add table inet soak"])?;
    pod.exec_args(&[
        "nft",
        "add chain inet soak out { type filter hook output priority 0; }",
    ])?;
    pod.exec_args(&[
        "nft",
        &format!(
            "add rule inet soak out tcp sport {}-{} tcp dport {ABANDON_PORT} tcp flags & (fin | rst) != 0 drop",
            ABANDON_SOURCE_PORTS.0, ABANDON_SOURCE_PORTS.1
        ),
    ])
    .map(drop)
}

/// The interactive session: one connection, a numbered 64-byte line every 10 ms, each echo checked.
/// After a failure it records it and connects again (a session that had to reconnect is a broken one).
fn session(server: SocketAddr, stop: &AtomicBool, tally: &Shared) {
    while !stop.load(Ordering::Relaxed) {
        let mut c = match TcpStream::connect_timeout(&server, Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                with(tally, |t| {
                    t.failures
                        .push((Instant::now(), format!("connect to {server}: {e}")))
                });
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        with(tally, |t| t.connections += 1);
        let _ = c.set_nodelay(true);
        let _ = c.set_read_timeout(Some(SESSION_IDLE));
        let mut n = 0u64;
        let mut last = Instant::now();
        let result = (|| -> std::io::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let line = format!("{n:063}\n");
                c.write_all(line.as_bytes())?;
                let mut back = [0u8; 64];
                c.read_exact(&mut back)?;
                if back != line.as_bytes() {
                    return Err(std::io::Error::other(format!(
                        "exchange {n}: echoed {:?}",
                        String::from_utf8_lossy(&back)
                    )));
                }
                let waited = last.elapsed();
                let at = last;
                with(tally, |t| {
                    t.ok += 1;
                    t.bytes += 64;
                    if waited >= STALL + Duration::from_millis(10) {
                        t.stalls.push((at, waited));
                    }
                });
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
                last = Instant::now();
            }
            Ok(())
        })();
        if let Err(e) = result {
            let waited = last.elapsed();
            with(tally, |t| {
                if waited >= STALL {
                    t.stalls.push((last, waited));
                }
                t.failures.push((
                    Instant::now(),
                    format!("session broke after {n} exchanges: {e} ({:?})", e.kind()),
                ))
            });
        }
    }
}

/// Bulk transfers through the [`traffic::bulk_server`] protocol, uploads and downloads in turn, each
/// paced to [`BULK_RATE`] and checked by hash.
fn bulk(server: SocketAddr, stop: &AtomicBool, tally: &Shared) {
    let mut seed = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let upload = seed % 2 == 1;
        let began = Instant::now();
        match paced_transfer(server, upload, seed, stop, tally) {
            Ok(Some(bytes)) => with(tally, |t| {
                t.ok += 1;
                t.bytes += bytes;
                t.connections += 1;
            }),
            // Stopped mid-transfer: neither a success nor a failure.
            Ok(None) => {}
            Err(e) => with(tally, |t| {
                t.connections += 1;
                t.failures.push((
                    began,
                    format!("{} {seed}: {e}", if upload { "upload" } else { "download" }),
                ))
            }),
        }
        seed += 1;
    }
}

/// One transfer; `None` when stopped before its end.
fn paced_transfer(
    server: SocketAddr,
    upload: bool,
    seed: u64,
    stop: &AtomicBool,
    tally: &Shared,
) -> std::io::Result<Option<u64>> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = [0u8; 17];
    head[0] = if upload { 1 } else { 2 };
    head[1..9].copy_from_slice(&BULK_BYTES.to_be_bytes());
    head[9..17].copy_from_slice(&seed.to_be_bytes());
    s.write_all(&head)?;
    let mut pattern = Pattern::new(seed);
    let mut hash = Fnv64::default();
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut done = 0u64;
    let mut last = Instant::now();
    while done < BULK_BYTES {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let want = usize::try_from((BULK_BYTES - done).min(buf.len() as u64)).unwrap_or(0);
        let n = if upload {
            pattern.fill(&mut buf[..want]);
            s.write_all(&buf[..want])?;
            want
        } else {
            let n = s.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::Error::other(format!(
                    "the server closed at byte {done}"
                )));
            }
            n
        };
        hash.update(&buf[..n]);
        done += n as u64;
        let waited = last.elapsed();
        if waited >= STALL {
            let at = last;
            with(tally, |t| t.stalls.push((at, waited)));
        }
        // Pace: sleep until this many bytes are due.
        let due = Duration::from_secs_f64(done as f64 / BULK_RATE as f64);
        if let Some(ahead) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(ahead);
        }
        last = Instant::now();
    }
    if upload {
        let mut theirs = [0u8; 8];
        s.read_exact(&mut theirs)?;
        if u64::from_be_bytes(theirs) != hash.finish() {
            return Err(std::io::Error::other("the server's hash differs"));
        }
    } else if hash.finish() != Pattern::hash_of(seed, BULK_BYTES) {
        return Err(std::io::Error::other("the downloaded bytes' hash differs"));
    }
    Ok(Some(BULK_BYTES))
}

/// Short connections, 20 per second: connect, a 100-byte echo, close. Every 10th goes to
/// [`ABANDON_PORT`] and is closed there without FIN or RST reaching anyone. A connection that took longer
/// than [`STALL`] (SYN retransmitted) is a stall; one that failed is a failure.
fn short_tcp(server: SocketAddr, abandon: SocketAddr, stop: &AtomicBool, tally: &Shared) {
    let mut n = 0u64;
    let (first, last) = ABANDON_SOURCE_PORTS;
    let mut abandoned = 0u16;
    while !stop.load(Ordering::Relaxed) {
        let abandoning = n % 10 == 9;
        let to = if abandoning { abandon } else { server };
        let began = Instant::now();
        let result = (|| -> std::io::Result<()> {
            let mut c = if abandoning {
                let port = first + abandoned % (last - first + 1);
                abandoned = abandoned.wrapping_add(1);
                connect_from(port, to, Duration::from_secs(20))?
            } else {
                TcpStream::connect_timeout(&to, Duration::from_secs(20))?
            };
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            let msg = [b'a' + (n % 26) as u8; 100];
            c.write_all(&msg)?;
            let mut back = [0u8; 100];
            c.read_exact(&mut back)?;
            if back != msg {
                return Err(std::io::Error::other("echo differs"));
            }
            Ok(())
        })();
        let took = began.elapsed();
        with(tally, |t| {
            t.connections += 1;
            match result {
                Ok(()) => {
                    t.ok += 1;
                    t.bytes += 100;
                }
                Err(e) => t.failures.push((
                    began,
                    format!("connection {n} to {to}: {e} ({:?})", e.kind()),
                )),
            }
            if took >= STALL {
                t.stalls.push((began, took));
            }
        });
        n += 1;
        if let Some(rest) = Duration::from_millis(50).checked_sub(took) {
            std::thread::sleep(rest);
        }
    }
}

/// Connects to `to` from local port `port` (any address), within `timeout`.
fn connect_from(port: u16, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(to);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    let any: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, port).into()
    };
    sock.set_reuse_address(true)?;
    sock.bind(&any.into())?;
    sock.connect_timeout(&to.into(), timeout)?;
    Ok(sock.into())
}

/// UDP request/response of `size` bytes every `period`, each answer checked (sequence number and
/// pattern); an answer not back within 1 s is lost. Gaps between answers of [`STALL`] or more are
/// stalls. Fragmented both ways when `size` exceeds the path MTU.
/// A UDP request of `size` bytes every `period` (its number, then a pattern seeded by it); the answer must
/// be `answer` bytes built the same way ([`numbered`]), within 1 s, or it counts as lost.
fn udp_rr(
    server: SocketAddr,
    size: usize,
    answer: usize,
    period: Duration,
    stop: &AtomicBool,
    tally: &Shared,
) {
    let any: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = match UdpSocket::bind(any) {
        Ok(s) => s,
        Err(e) => {
            with(tally, |t| {
                t.failures.push((Instant::now(), format!("bind: {e}")))
            });
            return;
        }
    };
    let mut buf = vec![0u8; size.max(answer).max(PMTU_BIG) + 64];
    let mut last_answer = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let sent_at = Instant::now();
        let req = numbered(seq, size);
        let want = numbered(seq, answer);
        let _ = sock.send_to(&req, server);
        let mut answered = false;
        let deadline = sent_at + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let _ = sock.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == server => {
                    if n >= 8 && buf[..8] == seq.to_be_bytes() {
                        if buf[..n] != want[..] {
                            with(tally, |t| {
                                t.failures
                                    .push((sent_at, format!("answer {seq} differs ({n} bytes)")))
                            });
                        }
                        answered = true;
                        break;
                    }
                    // a late answer to an earlier request: ignore
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        with(tally, |t| {
            if answered {
                t.ok += 1;
                t.bytes += answer as u64;
                let gap = sent_at.saturating_duration_since(last_answer);
                if gap >= STALL + period {
                    t.stalls.push((last_answer, gap));
                }
            } else {
                t.lost += 1;
            }
        });
        if answered {
            last_answer = Instant::now();
        }
        seq += 1;
        if let Some(rest) = period.checked_sub(sent_at.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// `len` bytes: `seq` (8 bytes, big-endian), then a pattern seeded by it.
fn numbered(seq: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(8)];
    Pattern::new(seq).fill(&mut v);
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v.truncate(len);
    v
}

/// The path-MTU server: answers each request (its first 8 bytes a number) with [`PMTU_BIG`] bytes, don't
/// fragment (`IP_PMTUDISC_DO`), numbered as the request; when its kernel refuses that size for the pod's
/// egress IP (`EMSGSIZE`: it learnt the path's MTU from the gateway's "fragmentation needed"), with
/// [`PMTU_FITS`] bytes.
fn pmtu_server(addr: SocketAddr, stop: &AtomicBool) {
    let Ok(sock) = UdpSocket::bind(addr) else {
        return;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    if tests::raw::setsockopt_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )
    .is_err()
    {
        return;
    }
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n < 8 {
            continue;
        }
        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
        if let Err(e) = sock.send_to(&numbered(seq, PMTU_BIG), from) {
            if e.raw_os_error() == Some(libc::EMSGSIZE) {
                let _ = sock.send_to(&numbered(seq, PMTU_FITS), from);
            }
        }
    }
}

/// Bytes per one-way datagram.
const ONEWAY_LEN: usize = 200;

/// 200 datagrams per second, each its sequence number and a pattern seeded by it.
fn udp_oneway(server: SocketAddr, stop: &AtomicBool, sent: &Mutex<u64>) {
    let Ok(sock) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
        return;
    };
    let mut buf = [0u8; ONEWAY_LEN];
    let mut seq = 0u64;
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        Pattern::new(seq).fill(&mut buf);
        buf[..8].copy_from_slice(&seq.to_be_bytes());
        let _ = sock.send_to(&buf, server);
        seq += 1;
        if let Ok(mut g) = sent.lock() {
            *g = seq;
        }
        let due = start + Duration::from_millis(5 * seq);
        if let Some(ahead) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(ahead);
        }
    }
}

/// What the one-way sink counted.
#[derive(Debug, Default)]
struct OnewaySink {
    distinct: u64,
    duplicates: u64,
    corrupt: u64,
}

fn oneway_sink(addr: SocketAddr, stop: &AtomicBool) -> OnewaySink {
    let mut out = OnewaySink::default();
    let Ok(sock) = UdpSocket::bind(addr) else {
        out.corrupt = u64::MAX;
        return out;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let mut seen = BTreeSet::new();
    let mut buf = [0u8; 2048];
    let mut want = [0u8; ONEWAY_LEN];
    let mut quiet_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            // one more second of reading after the stop, for datagrams in flight
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(1500) {
                break;
            }
        }
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n != ONEWAY_LEN {
            out.corrupt += 1;
            continue;
        }
        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
        Pattern::new(seq).fill(&mut want);
        want[..8].copy_from_slice(&seq.to_be_bytes());
        if buf[..n] != want[..] {
            out.corrupt += 1;
        } else if seen.insert(seq) {
            out.distinct += 1;
        } else {
            out.duplicates += 1;
        }
    }
    out
}

/// `ping`'s summary line as a tally: replies received as `ok`, the rest `lost`.
fn ping_tally(log: &str) -> Tally {
    let mut t = Tally::default();
    // "N packets transmitted, M received, ..."
    if let Some(line) = log.lines().find(|l| l.contains("packets transmitted")) {
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        if let [sent, received, ..] = nums[..] {
            t.ok = received;
            t.lost = sent.saturating_sub(received);
        }
    } else {
        t.failures
            .push((Instant::now(), "ping printed no summary".to_owned()));
    }
    t
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn ping_summary_is_read() {
        let t = ping_tally("...\n--- 198.51.100.10 ping statistics ---\n1200 packets transmitted, 1187 received, 1.08333% packet loss, time 239000ms\n");
        assert_eq!((t.ok, t.lost), (1187, 13));
        assert!(t.failures.is_empty());
        assert_eq!(ping_tally("").failures.len(), 1);
    }
}
