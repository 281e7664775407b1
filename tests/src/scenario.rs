//! Building blocks of the end-to-end scenarios (`tests/tests/gateway_e2e/`) and the namespace demo:
//! polling instead of sleeping, metric deltas, a gateway restarted with a configuration of the test's own
//! (drain period, IPv6 uplinks, narrower sources), atomic rewrites of a configuration file for reloads,
//! paced transfers that last long enough to be interrupted, many short connections, extra hosts on the
//! underlay, and interface counters.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::error::{Context, Error, Result};
use crate::gateway::{Gateway, GatewayMode, Metrics, HEALTH_PORT, METRICS_PORT};
use crate::netns::{Netns, NsThread};
use crate::process::Process;
use crate::topology::{
    gateway_eth_mac, Topology, DMZ_ROUTER, DMZ_ROUTER6, INTERNAL_NET, INTERNAL_NET6, POD_CIDR,
    POD_CIDR6, TUNNEL_MTU, UNDERLAY, VNI, VXLAN_PORT,
};
use crate::traffic::{self, Fnv64, Pattern, Transfer};

/// Calls `f` every `every` until it returns `Some`, for at most `timeout`; the error names `what`.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            crate::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// `name{labels}` summed over matching samples, 0 when there is none.
pub fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.get(name, labels).unwrap_or(0.0)
}

/// `egress_gateway_drops_total` summed per reason, only the non-zero ones.
pub fn drops(m: &Metrics) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in m
        .samples()
        .iter()
        .filter(|s| s.name == "egress_gateway_drops_total" && s.value != 0.0)
    {
        if let Some((_, reason)) = s.labels.iter().find(|(k, _)| k == "reason") {
            *out.entry(reason.clone()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// Whether drop `reason` is one the I/O layer counts, outside the pipeline's balance (docs/metrics.md,
/// "Every packet is accounted for").
pub fn is_io_drop(reason: &str) -> bool {
    reason.starts_with("io_")
        || reason.starts_with("neighbour_")
        || reason.ends_with("_send_failed")
        || reason.ends_with("_queue_full")
}

/// Received packets that the published outcomes do not account for, recomputed from the counters as
/// docs/metrics.md states the balance: `tunnel_rx + uplink_rx - (tunnel_tx + uplink_tx -
/// icmp_errors_originated - tcp_resets_sent + pipeline drops + neighbour frames)`. 0 when they balance.
pub fn unaccounted(m: &Metrics) -> f64 {
    let packets = |dir: &str| value(m, "egress_gateway_packets_total", &[("direction", dir)]);
    let pipeline_drops: f64 = drops(m)
        .iter()
        .filter(|(r, _)| !is_io_drop(r))
        .map(|(_, v)| v)
        .sum();
    packets("tunnel_rx") + packets("uplink_rx")
        - (packets("tunnel_tx") + packets("uplink_tx")
            - value(m, "egress_gateway_icmp_errors_originated_total", &[])
            - value(m, "egress_gateway_tcp_resets_sent_total", &[])
            + pipeline_drops
            + value(m, "egress_gateway_neighbour_frames_total", &[]))
}

/// `egress_gateway_drops_total{reason}` summed over workers.
pub fn drop_count(m: &Metrics, reason: &str) -> f64 {
    value(m, "egress_gateway_drops_total", &[("reason", reason)])
}

/// `egress_gateway_packets_total{direction}` (and `uplink` if given) summed over workers.
pub fn packets(m: &Metrics, direction: &str, uplink: Option<&str>) -> f64 {
    match uplink {
        Some(u) => value(
            m,
            "egress_gateway_packets_total",
            &[("direction", direction), ("uplink", u)],
        ),
        None => value(
            m,
            "egress_gateway_packets_total",
            &[("direction", direction)],
        ),
    }
}

/// Polls the gateway's metrics (every 50 ms; workers publish every 100 ms) until `pred` holds for
/// `name{labels}`; returns the metrics that satisfied it. The error shows the last value and the
/// non-zero drops.
pub fn wait_metric(
    gw: &Gateway,
    name: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> Result<Metrics> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = gw.metrics()?;
        let v = value(&m, name, labels);
        if pred(v) {
            return Ok(m);
        }
        if Instant::now() >= deadline {
            crate::bail!(
                "{name}{labels:?} is {v} after {timeout:?}, not what the test waits for; drops: {:?}",
                drops(&m)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gateway's metrics once its packet counters have settled: two reads 250 ms apart (more than the
/// workers' 100 ms publishing period) with the same packet totals, or the last read after `timeout`.
pub fn settled_metrics(gw: &Gateway, timeout: Duration) -> Result<Metrics> {
    let deadline = Instant::now() + timeout;
    let total = |m: &Metrics| value(m, "egress_gateway_packets_total", &[]);
    let mut last = gw.metrics()?;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = gw.metrics()?;
        if total(&now) == total(&last) || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// What a gateway configuration written by a test contains (the harness's contract plus the keys the
/// harness does not set). [`ConfigSpec::yaml`] renders it for a gateway of the topology.
#[derive(Debug, Clone)]
pub struct ConfigSpec {
    /// `tunnel.allowed_sources`.
    pub allowed_sources: Vec<String>,
    /// Dual stack: `fd00:244::/32` in `pod_cidrs`, IPv6 egress IPs and routes on both uplinks, the DMZ
    /// router as `next_hop_v6`, and `tunnel.ipv6_address` ([`TUNNEL_IP6`]).
    pub ipv6: bool,
    /// Extra routes of the internal uplink.
    pub extra_internal_routes: Vec<String>,
    /// `drain_seconds`.
    pub drain_seconds: u32,
    /// `workers`.
    pub workers: usize,
}

/// The gateway's IPv6 address inside the tunnel in configurations written by [`ConfigSpec`] (the source of
/// the ICMPv6 errors it sends to pods).
pub const TUNNEL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, 3);

impl Default for ConfigSpec {
    fn default() -> Self {
        Self {
            allowed_sources: vec![UNDERLAY.to_string()],
            ipv6: false,
            extra_internal_routes: Vec::new(),
            drain_seconds: 30,
            workers: 0,
        }
    }
}

impl ConfigSpec {
    /// The configuration file for gateway `gw`.
    pub fn yaml(&self, gw: &Gateway) -> Result<String> {
        let ip = gw.ip;
        let mut pod_cidrs = vec![POD_CIDR.to_string()];
        let mut dmz_ips = vec![gw.dmz_egress.to_string()];
        let mut int_ips = vec![gw.internal_egress.to_string()];
        let mut dmz_routes = vec!["0.0.0.0/0".to_owned()];
        let mut int_routes = vec![INTERNAL_NET.to_string()];
        int_routes.extend(self.extra_internal_routes.iter().cloned());
        let mut tunnel_extra = String::new();
        let mut dmz_extra = String::new();
        if self.ipv6 {
            let (Some(dmz6), Some(int6)) = (gw.dmz_egress6, gw.internal_egress6) else {
                crate::bail!(
                    "an IPv6 configuration needs a dual-stack topology (TopologySpec::ipv6)"
                );
            };
            pod_cidrs.push(POD_CIDR6.to_string());
            dmz_ips.push(dmz6.to_string());
            int_ips.push(int6.to_string());
            dmz_routes.push("'::/0'".to_owned());
            int_routes.push(INTERNAL_NET6.to_string());
            tunnel_extra = format!(", ipv6_address: '{TUNNEL_IP6}'");
            dmz_extra = format!(", next_hop_v6: '{DMZ_ROUTER6}'");
        }
        let list = |v: &[String]| v.join(", ");
        Ok(format!(
            "tunnel: {{ listen: {ip}:{VXLAN_PORT}, vni: {VNI}, allowed_sources: [{sources}], pod_cidrs: [{pods}], mtu: {TUNNEL_MTU}{tunnel_extra} }}
uplinks:
  - {{ name: dmz, interface: gwdmz, egress_ips: [{dmz_ips}], next_hop: {DMZ_ROUTER}{dmz_extra}, routes: [{dmz_routes}] }}
  - {{ name: internal, interface: gwint, egress_ips: [{int_ips}], routes: [{int_routes}] }}
health: {{ listen: {ip}:{HEALTH_PORT} }}
metrics: {{ listen: {ip}:{METRICS_PORT} }}
workers: {workers}
drain_seconds: {drain}
",
            sources = list(&self.allowed_sources),
            pods = list(&pod_cidrs),
            dmz_ips = list(&dmz_ips),
            dmz_routes = list(&dmz_routes),
            int_ips = list(&int_ips),
            int_routes = list(&int_routes),
            workers = self.workers,
            drain = self.drain_seconds,
        ))
    }
}

/// A userspace gateway started by the test with its own configuration file (see [`restart_gateway`]).
/// Drop it before the topology (declare it after): dropping stops the process (SIGTERM, then SIGKILL
/// after 2 s).
#[derive(Debug)]
pub struct OwnGateway {
    /// The process.
    pub process: Process,
    /// Its configuration file.
    pub config: PathBuf,
}

/// Replaces the harness's process of userspace gateway `k` by one reading `yaml` (written to
/// `<topology dir>/gw<k>-<label>.yaml`), and waits until `/readiness` answers 200.
pub fn restart_gateway(
    topo: &mut Topology,
    k: usize,
    label: &str,
    yaml: &str,
    ready_timeout: Duration,
) -> Result<OwnGateway> {
    let binary = match topo.gateway(k).mode() {
        GatewayMode::Userspace { binary } => binary.clone(),
        GatewayMode::Kernel => crate::bail!("gateway {k} is in kernel mode"),
    };
    topo.gateway_mut(k).stop_process();
    let config = topo.dir().join(format!("gw{k}-{label}.yaml"));
    write_atomically(&config, yaml)?;
    let gw = topo.gateway(k);
    let bin = binary.to_string_lossy().into_owned();
    let cfg = config.to_string_lossy().into_owned();
    let log = topo.dir().join(format!("gw{k}-{label}.log"));
    let mut process = gw
        .ns
        .spawn(&[&bin, "run", "--config", &cfg], log)
        .with_context(|| format!("start {bin}"))?;
    wait_ready(gw, &mut process, ready_timeout)?;
    Ok(OwnGateway { process, config })
}

/// Polls `GET /readiness` of `gw` until 200; fails at once if `process` exits, with its log tail.
pub fn wait_ready(gw: &Gateway, process: &mut Process, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.try_wait()? {
            crate::bail!(
                "gateway exited ({status}) before it was ready; log tail:\n{}",
                process.log_tail(30)
            );
        }
        let last = match gw.http_get(HEALTH_PORT, "/readiness") {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            crate::bail!(
                "gateway not ready after {timeout:?} ({last}); log tail:\n{}",
                process.log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /readiness` of `gw`: the HTTP status.
pub fn readiness(gw: &Gateway) -> Result<u16> {
    Ok(gw.http_get(HEALTH_PORT, "/readiness")?.0)
}

/// Replaces the file at `path` by `text` in one step (a temporary file renamed over it), so that a
/// gateway watching it never reads half a file.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp-rewrite");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// `text` with the one occurrence of `from` replaced by `to`; an error if `from` does not occur exactly
/// once (the configuration format changed under the test).
pub fn edit_once(text: &str, from: &str, to: &str) -> Result<String> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(Error::msg(format!(
            "expected `{from}` once in the configuration, found it {n} times:\n{text}"
        ))),
    }
}

/// The bulk server's download request (see [`traffic::bulk_server`]): mode 2, length, seed.
fn download_header(len: u64, seed: u64) -> [u8; 17] {
    let mut head = [0u8; 17];
    head[0] = 2;
    head[1..9].copy_from_slice(&len.to_be_bytes());
    head[9..17].copy_from_slice(&seed.to_be_bytes());
    head
}

/// A download running on a namespace thread: bytes received so far, and the verified result.
#[derive(Debug)]
pub struct PacedDownload {
    /// Bytes received so far.
    pub progress: Arc<AtomicU64>,
    thread: NsThread<Result<Transfer>>,
}

impl PacedDownload {
    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Waits until at least `bytes` arrived (the stream is flowing).
    pub fn wait_progress(&self, bytes: u64, timeout: Duration) -> Result<()> {
        poll(
            timeout,
            Duration::from_millis(10),
            &format!("{bytes} bytes of the paced download"),
            || (self.received() >= bytes).then_some(()),
        )
        .with_context(|| format!("got {} bytes", self.received()))
    }

    /// Whether it has ended (either way).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the end: the transfer, verified by hash.
    pub fn join(self, timeout: Duration) -> Result<Transfer> {
        self.thread.join_timeout(timeout)?
    }
}

/// From `ns`: downloads `len` bytes (pattern `seed`) from a [`traffic::bulk_server`] at `addr`, reading at
/// most `rate` bytes per second (TCP flow control slows the sender to that), so that the stream lasts
/// about `len / rate` seconds; the bytes are checked against the pattern's hash at the end.
pub fn paced_download(
    ns: &Netns,
    addr: SocketAddr,
    len: u64,
    seed: u64,
    rate: u64,
) -> Result<PacedDownload> {
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let thread = ns.thread(move || -> Result<Transfer> {
        let start = Instant::now();
        let mut s = traffic::connect(addr)?;
        s.write_all(&download_header(len, seed))?;
        let mut h = Fnv64::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            let n = s
                .read(&mut buf)
                .with_context(|| format!("receive at byte {got} of {len}"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got += n as u64;
            p.store(got, Ordering::Relaxed);
            let due = Duration::from_secs_f64(got as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        if got != len {
            crate::bail!("paced download from {addr}: got {got} bytes, expected {len}");
        }
        let expected = Pattern::hash_of(seed, len);
        if h.finish() != expected {
            crate::bail!(
                "paced download of {len} bytes from {addr}: hash {:016x} != expected {expected:016x}",
                h.finish()
            );
        }
        Ok(Transfer {
            bytes: len,
            elapsed: start.elapsed(),
        })
    })?;
    Ok(PacedDownload { progress, thread })
}

/// From `ns`: `n` short TCP connections to an echo server at `addr`, one after another: connect (one
/// attempt, 5 s), 8 bytes each way (checked), close. Returns the local addresses used. Stops at the first
/// failure, saying which.
pub fn short_tcp_connections(ns: &Netns, addr: SocketAddr, n: usize) -> Result<Vec<SocketAddr>> {
    ns.run(
        Duration::from_secs(300),
        move || -> Result<Vec<SocketAddr>> {
            let mut locals = Vec::with_capacity(n);
            for i in 0..n {
                let attempt = || -> Result<SocketAddr> {
                    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .with_context(|| format!("connect to {addr}"))?;
                    s.set_read_timeout(Some(traffic::IO_TIMEOUT))?;
                    s.set_write_timeout(Some(traffic::IO_TIMEOUT))?;
                    let msg = u64::try_from(i).unwrap_or(0).to_be_bytes();
                    s.write_all(&msg)?;
                    let mut back = [0u8; 8];
                    s.read_exact(&mut back)?;
                    if back != msg {
                        crate::bail!("echo {back:?} != sent {msg:?}");
                    }
                    Ok(s.local_addr()?)
                };
                locals.push(attempt().with_context(|| format!("connection {} of {n}", i + 1))?);
            }
            Ok(locals)
        },
    )?
}

/// From `ns`: `n` UDP request/response exchanges with an echo server at `addr` on one socket, each
/// payload unique and checked (a lost datagram is resent after 200 ms; at most 10 s per exchange).
/// Returns the local address.
pub fn udp_exchanges(ns: &Netns, addr: SocketAddr, n: usize, tag: &str) -> Result<SocketAddr> {
    let tag = tag.to_owned();
    ns.run(Duration::from_secs(120), move || -> Result<SocketAddr> {
        let any: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut buf = [0u8; 2048];
        for i in 0..n {
            let msg = format!("{tag} request {i}");
            let deadline = Instant::now() + traffic::CONNECT_DEADLINE;
            'exchange: loop {
                if Instant::now() >= deadline {
                    crate::bail!("no answer to `{msg}` from {addr} within 10 s");
                }
                sock.send_to(msg.as_bytes(), addr)?;
                // Read until the matching answer or the 200 ms timeout (late answers to earlier resends
                // are skipped).
                while let Ok((len, from)) = sock.recv_from(&mut buf) {
                    if from == addr && &buf[..len] == msg.as_bytes() {
                        break 'exchange;
                    }
                }
            }
        }
        Ok(sock.local_addr()?)
    })?
}

/// An extra host on the underlay bridge (namespace `<prefix>-<role>`, removed on drop): `eth0` with
/// `addr`, the underlay reachable on-link, and a static neighbour entry for gateway `k`'s `eth0` (so
/// nothing depends on the gateway's kernel answering ARP from a foreign subnet). Drop it before the
/// topology.
pub fn underlay_host(topo: &Topology, role: &str, addr: Ipv4Net, k: usize) -> Result<Netns> {
    let ns = Netns::new(&format!("{}-{role}", topo.prefix()))?;
    ns.ip(&format!(
        "link add eth0 type veth peer name {role} netns {}",
        topo.underlay().name()
    ))?;
    topo.underlay()
        .ip(&format!("link set {role} master br0 up"))?;
    ns.ip(&format!("addr add {addr} dev eth0"))?;
    ns.ip("link set eth0 up")?;
    ns.ip(&format!("route add {UNDERLAY} dev eth0"))?;
    let gw = topo.gateway(k);
    ns.ip(&format!(
        "neigh replace {} lladdr {} dev eth0 nud permanent",
        gw.ip,
        gateway_eth_mac(k)
    ))?;
    Ok(ns)
}

/// Packet counters of interface `dev` in `ns` (from sysfs as the namespace sees it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
}

impl LinkCounters {
    /// Reads them.
    pub fn read(ns: &Netns, dev: &str) -> Result<Self> {
        let get = |what: &str| -> Result<u64> {
            let path = format!("/sys/class/net/{dev}/statistics/{what}");
            let text = ns.exec_args(&["cat", &path])?;
            text.trim()
                .parse()
                .map_err(|_| Error::msg(format!("{path} in {}: {text:?}", ns.name())))
        };
        Ok(Self {
            rx_packets: get("rx_packets")?,
            tx_packets: get("tx_packets")?,
        })
    }
}

/// The address a peer was seen from, for messages: `ip` of `peers`, all of them.
pub fn peer_ips(peers: &[SocketAddr]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = peers.iter().map(SocketAddr::ip).collect();
    v.sort();
    v.dedup();
    v
}

/// IPv6 inside the IPv4 tunnel through gateway 1, whatever its mode: every pod pings, and reaches by TCP and
/// UDP, the red server and the internal server over IPv6, and each server sees gateway 1's IPv6 egress
/// address of that uplink. Panics (with the pod) on the first failure.
pub fn assert_ipv6_egress(topo: &crate::Topology) {
    use crate::topology::{INTERNAL_SERVER6, RED_SERVER6};
    let gw = topo.gateway(1);
    let (dmz6, int6) = (
        IpAddr::V6(gw.dmz_egress6.expect("a dual-stack topology")),
        IpAddr::V6(gw.internal_egress6.expect("a dual-stack topology")),
    );
    let red = SocketAddr::from((RED_SERVER6, 7000));
    let internal = SocketAddr::from((INTERNAL_SERVER6, 7000));
    let red_tcp = traffic::tcp_echo_server(&topo.red().ns, red).expect("red TCP server");
    let red_udp = traffic::udp_echo_server(&topo.red().ns, red).expect("red UDP server");
    let int_tcp =
        traffic::tcp_echo_server(&topo.internal().ns, internal).expect("internal TCP server");
    for pod in topo.pods() {
        let who = format!("pod {:?}", pod.ip6);
        traffic::ping(&pod.ns, IpAddr::V6(RED_SERVER6), 2).unwrap_or_else(|e| panic!("{who}: {e}"));
        let echo = traffic::tcp_echo(&pod.ns, red, b"v6").unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(echo, b"v6", "{who}");
        assert_eq!(red_tcp.last_peer().map(|p| p.ip()), Some(dmz6), "{who}");
        let echo =
            traffic::udp_echo(&pod.ns, red, b"v6 udp").unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(echo, b"v6 udp", "{who}");
        assert_eq!(red_udp.last_peer().map(|p| p.ip()), Some(dmz6), "{who}");
        let echo = traffic::tcp_echo(&pod.ns, internal, b"v6 int")
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(echo, b"v6 int", "{who}");
        assert_eq!(int_tcp.last_peer().map(|p| p.ip()), Some(int6), "{who}");
    }
}

/// `n` UDP flows from `ns` to an echo server at `addr`: each a new socket (so a new source port) with one
/// checked exchange. Returns the local addresses. With a multipath route, flows hash over its next hops.
pub fn udp_flows(ns: &Netns, addr: SocketAddr, n: usize) -> Result<Vec<SocketAddr>> {
    (0..n)
        .map(|i| udp_exchanges(ns, addr, 1, &format!("flow {i}")))
        .collect()
}

/// What a [`UdpProbe`] records: when each request went out and when each answer came back.
#[derive(Debug, Default)]
struct ProbeLog {
    sent: Vec<Instant>,
    answers: Vec<(u64, Instant)>,
}

/// A UDP probe stream from a pod: one socket (one flow, one source port) sending a request with a sequence
/// number every `period` to an echo server and recording when each answer arrives — for measuring how long a
/// flow is cut off (failover, a policy change). Stops on drop.
#[derive(Debug)]
pub struct UdpProbe {
    log: Arc<std::sync::Mutex<ProbeLog>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<NsThread<Result<()>>>,
    local: SocketAddr,
}

impl UdpProbe {
    /// Starts the stream from `ns` to `addr`.
    pub fn start(ns: &Netns, addr: SocketAddr, period: Duration) -> Result<Self> {
        let log = Arc::new(std::sync::Mutex::new(ProbeLog::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, st) = (log.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let thread = ns.thread(move || -> Result<()> {
            let any: SocketAddr = if addr.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            // Unconnected: ICMP errors while the path is down do not end the stream.
            let sock = match UdpSocket::bind(any).and_then(|s| s.local_addr().map(|a| (s, a))) {
                Ok((s, a)) => {
                    let _ = tx.send(Ok(a));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return Ok(());
                }
            };
            let mut buf = [0u8; 64];
            let mut seq = 0u64;
            let mut next = Instant::now();
            while !st.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now >= next {
                    let _ = sock.send_to(&seq.to_be_bytes(), addr);
                    if let Ok(mut g) = l.lock() {
                        g.sent.push(now);
                    }
                    seq += 1;
                    next += period;
                    continue;
                }
                sock.set_read_timeout(Some((next - now).max(Duration::from_millis(1))))?;
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if from == addr && n >= 8 {
                        let got = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                        if let Ok(mut g) = l.lock() {
                            g.answers.push((got, Instant::now()));
                        }
                    }
                }
            }
            Ok(())
        })?;
        let local = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| Error::msg("the UDP probe did not start"))??;
        Ok(Self {
            log,
            stop,
            thread: Some(thread),
            local,
        })
    }

    /// The probe socket's address (in the pod).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Requests sent and answers received so far.
    pub fn counts(&self) -> (usize, usize) {
        self.log
            .lock()
            .map(|g| (g.sent.len(), g.answers.len()))
            .unwrap_or_default()
    }

    /// When the first answer to a request sent at or after `t` arrived, if one has.
    pub fn first_answer_to_request_after(&self, t: Instant) -> Option<Instant> {
        let g = self.log.lock().ok()?;
        g.answers
            .iter()
            .filter(|(seq, _)| {
                usize::try_from(*seq)
                    .ok()
                    .and_then(|i| g.sent.get(i))
                    .is_some_and(|sent| *sent >= t)
            })
            .map(|(_, at)| *at)
            .min()
    }

    /// Waits (at most `timeout`) for an answer to a request sent at or after `t`; returns the time from `t`
    /// to its arrival.
    pub fn wait_answer_after(&self, t: Instant, timeout: Duration) -> Result<Duration> {
        poll(timeout, Duration::from_millis(5), "a probe answer", || {
            self.first_answer_to_request_after(t)
                .map(|at| at.saturating_duration_since(t))
        })
        .with_context(|| {
            let (sent, answered) = self.counts();
            format!("{sent} probe requests sent, {answered} answered")
        })
    }

    /// Stops the stream; an error if its thread failed.
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join_timeout(Duration::from_secs(5))?,
            None => Ok(()),
        }
    }
}

impl Drop for UdpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join_timeout(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_once_needs_exactly_one_match() {
        assert_eq!(edit_once("a b c", "b", "x").unwrap(), "a x c");
        assert!(edit_once("a b b", "b", "x").is_err());
        assert!(edit_once("a c", "b", "x").is_err());
    }

    #[test]
    fn drops_by_reason() {
        let m = Metrics::parse(
            "egress_gateway_drops_total{reason=\"no_flow\",worker=\"0\"} 2\n\
             egress_gateway_drops_total{reason=\"no_flow\",worker=\"1\"} 3\n\
             egress_gateway_drops_total{reason=\"draining\",worker=\"0\"} 0\n",
        );
        let d = drops(&m);
        assert_eq!(d.len(), 1);
        assert_eq!(d.get("no_flow"), Some(&5.0));
        assert_eq!(drop_count(&m, "draining"), 0.0);
    }
}

/// Long-lived UDP flows from a pod: `n` sockets (so `n` source ports) opened in its namespace and kept open,
/// each asking a [`traffic::udp_whoami_server`] where it sees the flow from — after SNAT, the egress IP of
/// the gateway that carries it. Closed on drop.
#[derive(Debug)]
pub struct UdpFlows {
    sockets: Vec<UdpSocket>,
    server: SocketAddr,
    round: AtomicU64,
}

impl UdpFlows {
    /// Opens the `n` sockets in `ns`.
    pub fn open(ns: &Netns, server: SocketAddr, n: usize) -> Result<Self> {
        let sockets = ns.run(Duration::from_secs(10), move || {
            (0..n)
                .map(|_| {
                    let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })??;
        Ok(Self {
            sockets,
            server,
            round: AtomicU64::new(0),
        })
    }

    /// The number of flows.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// One exchange per flow: the source address the server saw for each flow, `None` for a flow that got
    /// no answer within `wait` (requests are resent every 100 ms).
    pub fn sources(&self, wait: Duration) -> Vec<Option<SocketAddr>> {
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        let requests: Vec<String> = (0..self.sockets.len())
            .map(|i| format!("flow {i} round {round}"))
            .collect();
        let mut seen: Vec<Option<SocketAddr>> = vec![None; self.sockets.len()];
        let deadline = Instant::now() + wait;
        let mut resend = Instant::now();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && seen.iter().any(Option::is_none) {
            if Instant::now() >= resend {
                for (i, sock) in self.sockets.iter().enumerate() {
                    if seen[i].is_none() {
                        let _ = sock.send_to(requests[i].as_bytes(), self.server);
                    }
                }
                resend = Instant::now() + Duration::from_millis(100);
            }
            for (i, sock) in self.sockets.iter().enumerate() {
                while let Ok((len, from)) = sock.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..len]);
                    if from != self.server {
                        continue;
                    }
                    if let Some(peer) = text.strip_prefix(requests[i].as_str()) {
                        seen[i] = peer.trim().parse().ok();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        seen
    }
}
