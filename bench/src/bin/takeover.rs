//! End-to-end takeover benchmark: how long a surviving replica takes to carry on 100,000 UDP flows of a
//! SIGKILLed replica, and how many of them it carries on.
//!
//! Usage (as root): `cargo run --release -p bench --bin takeover -- [flows] [--rate N] [--resend-rate N]`
//!
//! The node agent's topology of `tests/tests/stateful_failover.rs` (`replicas()`): node 1 with four pods,
//! two userspace replicas labelled red in one sync set (gateway k is ordinal k − 1,
//! `conntrack.max_per_source` raised to 64,512), the pods' route to the red server's network over both
//! (the agent's resilient nexthop group, hashing on the ports). The pods open `2 × flows` UDP flows to
//! the red server (pods × sockets × server ports, paced at `--rate` new flows/s, default 40,000), so that
//! about `flows` go through replica X = gateway 1. The server answers each request with the source address and port
//! it saw (X's egress IP and the flow's external port), which the pod records per flow. Then:
//!
//! * (a) sync convergence: from the last new flow's first packet until gateway 2's
//!   `egress_gateway_sync_copies{peer="0"}` reaches the flows through X (polled every 50 ms; the sync
//!   thread publishes every 100 ms);
//! * X is SIGKILLed; the pods resend a request on each of X's flows not yet answered, over and over at
//!   `--resend-rate` requests/s (default `--rate`; on the 2-vCPU VM twice that overloads the survivor,
//!   which then sheds requests as `tunnel_queue_full`, its own flows' too), until every one is answered or 30 s pass. A reply counts only if the server saw the
//!   same source address and port as before the kill;
//! * (b) from the SIGKILL: the first such reply, and when 50 %, 99 % and 100 % of X's flows had one; a
//!   pass over X's 100,000 flows itself takes `flows / resend-rate` s, which bounds these from below;
//! * (c) the share of X's flows that survived; the survivor's own flows are checked once afterwards;
//! * (d) X restarted: how long until it is ready, which it is only once it has the survivor's flows in
//!   bulk, and how many copies it then holds.
//!
//! It prints one table; it does not judge timings. Exit status 1 if a flow did not survive, a reply came
//! from another source, the copies never reached the flows through X, a flow of the survivor broke, or
//! the restarted X was not ready with the survivor's flows; 2 on bad usage. Without root it says
//! SKIPPED and exits 0.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::agent::{self, AgentConfig, RouteShape};
use tests::topology::{POD_RULE_PRIORITY, RED_NET, RED_SERVER};
use tests::{scenario, GatewayMode, Inventory, NodeAgent, Result, Topology, TopologySpec};

const USAGE: &str = "usage: takeover [flows] [--rate NEW_FLOWS_PER_S] [--resend-rate REQUESTS_PER_S]\n\
    (as root; default: 100000 flows through the killed replica, opened at 40000/s, asked again after\n\
    the kill at the same rate)";

/// Client pods on node 1.
const PODS: usize = 4;
/// UDP sockets per pod; each sends to every server port.
const SOCKETS: usize = 50;
/// First server port.
const BASE_PORT: u16 = 20000;
/// `conntrack.max_per_source`: every port of the default range (1024..=65535).
const MAX_PER_SOURCE: u32 = 64512;
/// Gateways and the agent may take this long to become ready.
const READY: Duration = Duration::from_secs(60);
/// How long after the kill the pods keep asking.
const AFTER_KILL: Duration = Duration::from_secs(30);
/// The killed replica (gateway number); the survivor is the other one.
const X: usize = 1;
const SURVIVOR: usize = 3 - X;

#[derive(Debug)]
struct Options {
    flows: usize,
    rate: u64,
    resend_rate: u64,
}

fn parse_args() -> std::result::Result<Options, String> {
    let mut o = Options {
        flows: 100_000,
        rate: 40_000,
        resend_rate: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--rate" | "--resend-rate" => {
                let r = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&r| r > 0)
                    .ok_or(format!("{a} needs a positive number"))?;
                if a == "--rate" {
                    o.rate = r;
                } else {
                    o.resend_rate = r;
                }
            }
            n => {
                o.flows = n
                    .replace('_', "")
                    .parse()
                    .ok()
                    .filter(|&f| f > 0 && f <= 1_000_000)
                    .ok_or(format!("not a flow count in 1..=1000000: {n}"))?;
            }
        }
    }
    if o.resend_rate == 0 {
        o.resend_rate = o.rate;
    }
    Ok(o)
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("takeover: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    // Says `SKIPPED takeover benchmark: needs CAP_NET_ADMIN ...` itself.
    if tests::require_netns("takeover benchmark").is_none() {
        return;
    }
    let bin = match agent::node_agent_binary() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("takeover: {e}");
            std::process::exit(1);
        }
    };
    match run(&o, &bin) {
        Ok(failures) if failures.is_empty() => {}
        Ok(failures) => {
            println!();
            for f in &failures {
                println!("FAILED: {f}");
            }
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("takeover: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------------------

/// The running scenario. Field order is drop order: the agent stops before the topology goes.
struct Env {
    agent: NodeAgent,
    topo: Topology,
}

/// Two replicas of one sync set, both ready, the node agent steering node 1's pods over both.
fn start(bin: &std::path::Path) -> Result<Env> {
    let mode = GatewayMode::Userspace {
        binary: bin.to_path_buf(),
    };
    let mut spec = TopologySpec::node_agent(&[PODS], vec![mode.clone(), mode]);
    spec.sync_sets = vec![vec![1, 2]];
    spec.max_per_source = Some(MAX_PER_SOURCE);
    let mut topo = Topology::build(spec)?;
    for k in 1..=2 {
        topo.gateway_mut(k).wait_ready(READY)?;
    }
    let mut inv = Inventory::new();
    inv.policy(tests::Policy::new(
        "takeover",
        vec![tests::PolicyRule::via(RED_NET, "red")],
    ))
    .namespace_with_policy("app", "takeover");
    for m in 1..=PODS {
        inv.client_pod("app", &format!("client{m}"), topo.pod(1, m));
    }
    for k in 1..=2 {
        inv.gateway_pod(k, "red", topo.spec().ipv6);
    }
    let path = topo.dir().join("inventory.yaml");
    inv.write(&path)?;
    let mut agent = NodeAgent::start(&topo, bin, 1, AgentConfig::for_node(1, vec![path]))?;
    agent.wait_ready(READY)?;
    let env = Env { agent, topo };
    let both = RouteShape::Via(vec![
        IpAddr::V4(env.topo.gateway(1).ip),
        IpAddr::V4(env.topo.gateway(2).ip),
    ]);
    let node = &env.topo.node(1).ns;
    for m in 1..=PODS {
        let pod = env.topo.pod(1, m);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let route = match agent::rule_table(node, IpAddr::V4(pod.ip), POD_RULE_PRIORITY)? {
                Some(t) => agent::table_route(node, t, RED_NET.into())?,
                None => None,
            };
            if route.as_ref() == Some(&both) {
                break;
            }
            if Instant::now() >= deadline {
                tests::bail!(
                    "pod {}: route {route:?}, not through both replicas; agent log:\n{}",
                    pod.ip,
                    env.agent.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    untracked(&env.topo.node(1).ns)?;
    Ok(env)
}

/// Node 1 masquerades its pods' traffic to the outside (Calico's natOutgoing), so its kernel tracks every
/// flow that crosses it: the 2 × `flows` inner flows and the tunnel's outer ones would fill its
/// `nf_conntrack_max` (one limit for every namespace, 262,144 by default, settable only outside them). The
/// flows of this benchmark (to and from the red server's network, and the tunnel's packets) are exempted.
fn untracked(node: &tests::Netns) -> Result<()> {
    let vxlan = tests::topology::VXLAN_PORT;
    for rule in [
        "add table ip takeover_notrack".to_owned(),
        "add chain ip takeover_notrack pre { type filter hook prerouting priority raw ; }"
            .to_owned(),
        "add chain ip takeover_notrack out { type filter hook output priority raw ; }".to_owned(),
        format!("add rule ip takeover_notrack pre ip daddr {RED_NET} notrack"),
        format!("add rule ip takeover_notrack pre ip saddr {RED_NET} notrack"),
        format!("add rule ip takeover_notrack pre udp dport {vxlan} notrack"),
        format!("add rule ip takeover_notrack out udp dport {vxlan} notrack"),
    ] {
        let mut args = vec!["nft"];
        args.extend(rule.split_whitespace());
        node.exec_args(&args)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// epoll over many UDP sockets
// ---------------------------------------------------------------------------------------------------

/// An epoll instance watching sockets for input, each tagged with its index.
struct Epoll(RawFd);

impl Epoll {
    fn new(sockets: &[UdpSocket]) -> Result<Self> {
        // SAFETY: epoll_create1 takes no pointer; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let ep = Self(fd);
        for (i, s) in sockets.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: both descriptors are open; `ev` is a valid epoll_event the kernel only reads.
            if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        Ok(ep)
    }

    /// Waits at most 100 ms; the indexes of the sockets with input.
    fn wait(&self, events: &mut [libc::epoll_event], ready: &mut Vec<usize>) {
        ready.clear();
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `events` is a writable buffer of `max` epoll_events; the descriptor is open.
        let n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), max, 100) };
        for ev in events.iter().take(usize::try_from(n).unwrap_or(0)) {
            let tag = ev.u64;
            ready.push(usize::try_from(tag).unwrap_or(usize::MAX));
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: setsockopt reads one c_int from a valid pointer; the socket is open. SO_RCVBUFFORCE (root)
    // lifts net.core.rmem_max; failure only means a smaller buffer.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&bytes).cast(),
            len,
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// The server: one socket per port, each request answered with the source it came from
// ---------------------------------------------------------------------------------------------------

/// A request is the flow's number (4 bytes, big-endian); the answer is the number, then the IPv4 address
/// and port the server saw it from.
const ANSWER_LEN: usize = 10;

fn serve(sockets: &[UdpSocket], stop: &AtomicBool) -> Result<()> {
    let ep = Epoll::new(sockets)?;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ready = Vec::new();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        ep.wait(&mut events, &mut ready);
        for &i in &ready {
            let Some(s) = sockets.get(i) else { continue };
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                let SocketAddr::V4(from) = from else { continue };
                if len < 4 {
                    continue;
                }
                let mut answer = [0u8; ANSWER_LEN];
                answer[..4].copy_from_slice(&buf[..4]);
                answer[4..8].copy_from_slice(&from.ip().octets());
                answer[8..].copy_from_slice(&from.port().to_be_bytes());
                // A full send buffer loses the answer; the pod asks again.
                let _ = s.send_to(&answer, from);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// The pods' side
// ---------------------------------------------------------------------------------------------------

/// What the pods know of every flow, written by the receiving thread.
struct Flows {
    /// Server ports.
    ports: usize,
    /// Per flow: the source the server saw first, `1 << 48 | ip << 16 | port`, or 0.
    source: Vec<AtomicU64>,
    /// Per flow: nanoseconds from `epoch` to its first answer after the kill with the same source (at
    /// least 1), or 0.
    after: Vec<AtomicU64>,
    /// Answers after the kill from another source than before.
    moved: AtomicU64,
    /// One of them: (flow, source seen).
    moved_example: AtomicU64,
    /// Set at the kill: from then on, answers count in `after`.
    killed: AtomicBool,
    epoch: Instant,
    killed_at_ns: AtomicU64,
    /// Per flow: nanoseconds from the kill to its first request after it (at least 1), or 0.
    asked: Vec<AtomicU64>,
    /// Per flow: requests sent after the kill.
    asks: Vec<AtomicU64>,
}

impl Flows {
    /// Nanoseconds since the kill.
    fn since_kill(&self) -> u64 {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now.saturating_sub(self.killed_at_ns.load(Ordering::Relaxed))
    }

    fn socket_of(&self, flow: usize) -> usize {
        flow / self.ports
    }

    fn port_of(&self, flow: usize) -> u16 {
        let i = u16::try_from(flow % self.ports).unwrap_or(u16::MAX);
        BASE_PORT.saturating_add(i)
    }

    fn source(&self, flow: usize) -> Option<SocketAddr> {
        unpack(self.source[flow].load(Ordering::Relaxed))
    }

    fn record(&self, flow: usize, seen: u64) {
        if self.killed.load(Ordering::Acquire) {
            if self.after[flow].load(Ordering::Relaxed) != 0 {
                return;
            }
            if self.source[flow].load(Ordering::Relaxed) == seen {
                self.after[flow].store(self.since_kill().max(1), Ordering::Relaxed);
            } else {
                self.moved.fetch_add(1, Ordering::Relaxed);
                self.moved_example.store(
                    (flow as u64) << 48 | (seen & 0xffff_ffff_ffff),
                    Ordering::Relaxed,
                );
            }
        } else {
            let _ =
                self.source[flow].compare_exchange(0, seen, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

fn pack(a: std::net::SocketAddrV4) -> u64 {
    1 << 48 | u64::from(u32::from(*a.ip())) << 16 | u64::from(a.port())
}

fn unpack(v: u64) -> Option<SocketAddr> {
    if v == 0 {
        return None;
    }
    let ip = Ipv4Addr::from(u32::try_from(v >> 16 & 0xffff_ffff).unwrap_or(0));
    let port = u16::try_from(v & 0xffff).unwrap_or(0);
    Some(SocketAddr::from((ip, port)))
}

/// Reads the answers on every pod socket until `stop`.
fn receive(sockets: &[UdpSocket], flows: &Flows, stop: &AtomicBool) -> Result<()> {
    let ep = Epoll::new(sockets)?;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ready = Vec::new();
    let mut buf = [0u8; 64];
    let n = flows.source.len();
    while !stop.load(Ordering::Relaxed) {
        ep.wait(&mut events, &mut ready);
        for &i in &ready {
            let Some(s) = sockets.get(i) else { continue };
            while let Ok((len, from)) = s.recv_from(&mut buf) {
                if len != ANSWER_LEN || from.ip() != IpAddr::V4(RED_SERVER) {
                    continue;
                }
                let flow = usize::try_from(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]))
                    .unwrap_or(usize::MAX);
                // The answer must come on the flow's own socket from its own server port.
                if flow >= n || flows.socket_of(flow) != i || from.port() != flows.port_of(flow) {
                    continue;
                }
                let seen = std::net::SocketAddrV4::new(
                    Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]),
                    u16::from_be_bytes([buf[8], buf[9]]),
                );
                flows.record(flow, pack(seen));
            }
        }
    }
    Ok(())
}

/// Sends one request on each flow of `list`, `rate` per second (in bursts of 500).
fn send_pass(sockets: &[UdpSocket], flows: &Flows, list: &[usize], rate: u64) {
    let start = Instant::now();
    for (i, &flow) in list.iter().enumerate() {
        if i % 500 == 0 && i > 0 {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if flows.killed.load(Ordering::Relaxed) {
            flows.asks[flow].fetch_add(1, Ordering::Relaxed);
            if flows.asked[flow].load(Ordering::Relaxed) == 0 {
                flows.asked[flow].store(flows.since_kill().max(1), Ordering::Relaxed);
            }
        }
        let id = u32::try_from(flow).unwrap_or(u32::MAX).to_be_bytes();
        let to = SocketAddr::from((RED_SERVER, flows.port_of(flow)));
        // A full send buffer loses the request; it is asked again in the next pass.
        let _ = sockets[flows.socket_of(flow)].send_to(&id, to);
    }
}

/// The order flows are first opened in: round robin over the pods, then over sockets, then ports, so that
/// every pod and socket opens flows all the time.
fn opening_order(total: usize, ports: usize) -> Vec<usize> {
    let per_pod = SOCKETS * ports;
    let mut order = Vec::with_capacity(total);
    for j in 0..per_pod {
        let (port, sock) = (j / SOCKETS, j % SOCKETS);
        for pod in 0..PODS {
            order.push((pod * SOCKETS + sock) * ports + port);
        }
    }
    order
}

// ---------------------------------------------------------------------------------------------------
// The measurement
// ---------------------------------------------------------------------------------------------------

/// Copies gauge samples of both replicas: (time since `t0`, copies of gateway 1's flows held by gateway 2,
/// copies of gateway 2's flows held by gateway 1).
type Samples = Vec<(Duration, f64, f64)>;

fn copies(topo: &Topology, k: usize) -> f64 {
    let peer = (2 - k).to_string();
    topo.gateway(k).metrics().map_or(f64::NAN, |m| {
        scenario::value(&m, "egress_gateway_sync_copies", &[("peer", &peer)])
    })
}

struct Results {
    rows: Vec<(String, String)>,
    failures: Vec<String>,
}

impl Results {
    fn row(&mut self, what: impl Into<String>, value: impl Into<String>) {
        self.rows.push((what.into(), value.into()));
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn run(o: &Options, bin: &std::path::Path) -> Result<Vec<String>> {
    let ports = (2 * o.flows).div_ceil(PODS * SOCKETS);
    let total = PODS * SOCKETS * ports;
    if usize::from(BASE_PORT) + ports > 65535 {
        tests::bail!("{ports} server ports do not fit above {BASE_PORT}");
    }
    let mut env = start(bin)?;
    eprintln!(
        "takeover: topology {} ready; {total} flows ({PODS} pods × {SOCKETS} sockets × {ports} server ports)",
        env.topo.prefix()
    );
    let mut r = Results {
        rows: Vec::new(),
        failures: Vec::new(),
    };

    // The server.
    let server_sockets = env.topo.red().ns.run(Duration::from_secs(30), move || {
        (0..ports)
            .map(|i| {
                let port = BASE_PORT + u16::try_from(i).unwrap_or(0);
                let s = UdpSocket::bind((RED_SERVER, port))?;
                s.set_nonblocking(true)?;
                set_rcvbuf(&s, 1 << 20);
                Ok(s)
            })
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    // The pods' sockets (a socket stays in the namespace it was opened in; any thread may use it).
    let mut pod_sockets = Vec::with_capacity(PODS * SOCKETS);
    for m in 1..=PODS {
        let socks = env.topo.pod(1, m).ns.run(Duration::from_secs(30), || {
            (0..SOCKETS)
                .map(|_| {
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    s.set_nonblocking(true)?;
                    set_rcvbuf(&s, 8 << 20);
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })??;
        pod_sockets.extend(socks);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let server_sockets = Arc::new(server_sockets);
    let pod_sockets = Arc::new(pod_sockets);
    let flows = Arc::new(Flows {
        ports,
        source: (0..total).map(|_| AtomicU64::new(0)).collect(),
        after: (0..total).map(|_| AtomicU64::new(0)).collect(),
        moved: AtomicU64::new(0),
        moved_example: AtomicU64::new(0),
        killed: AtomicBool::new(false),
        epoch: Instant::now(),
        killed_at_ns: AtomicU64::new(0),
        asked: (0..total).map(|_| AtomicU64::new(0)).collect(),
        asks: (0..total).map(|_| AtomicU64::new(0)).collect(),
    });
    let server = {
        let (s, stop) = (server_sockets.clone(), stop.clone());
        std::thread::spawn(move || serve(&s, &stop))
    };
    let receiver = {
        let (s, f, stop) = (pod_sockets.clone(), flows.clone(), stop.clone());
        std::thread::spawn(move || receive(&s, &f, &stop))
    };
    let result = measure(o, &mut env, &pod_sockets, &flows, ports, &mut r);
    stop.store(true, Ordering::Relaxed);
    for (what, t) in [("server", server), ("receiver", receiver)] {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => r.failures.push(format!("{what}: {e}")),
            Err(_) => r.failures.push(format!("{what} thread panicked")),
        }
    }
    result?;
    print_table(o, &r);
    drop(env);
    Ok(r.failures)
}

fn measure(
    o: &Options,
    env: &mut Env,
    sockets: &[UdpSocket],
    flows: &Flows,
    ports: usize,
    r: &mut Results,
) -> Result<()> {
    let total = flows.source.len();
    let egress = |k: usize| IpAddr::V4(env.topo.gateway(k).dmz_egress);

    // Copies gauges, sampled while the flows are opened.
    let t0 = Instant::now();
    let sampling = AtomicBool::new(true);
    let mut samples: Samples = Vec::new();
    let mut opened_at = Duration::ZERO;
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut v = Samples::new();
            while sampling.load(Ordering::Relaxed) {
                v.push((t0.elapsed(), copies(&env.topo, 2), copies(&env.topo, 1)));
                std::thread::sleep(Duration::from_millis(50));
            }
            v
        });
        // Open every flow, then ask again on those not answered yet (lost on the way while the tables
        // filled), up to three more times.
        let order = opening_order(total, ports);
        send_pass(sockets, flows, &order, o.rate);
        opened_at = t0.elapsed();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_secs(1));
            let missing: Vec<usize> = (0..total).filter(|&f| flows.source(f).is_none()).collect();
            if missing.is_empty() {
                break;
            }
            eprintln!("takeover: {} flows unanswered; asking again", missing.len());
            send_pass(sockets, flows, &missing, o.rate);
        }
        // Until both replicas hold every copy (or 60 s).
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let (on1, on2) = count_on(flows, egress(1), egress(2));
            if copies(&env.topo, 2) >= on1 as f64 && copies(&env.topo, 1) >= on2 as f64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        sampling.store(false, Ordering::Relaxed);
        samples = sampler.join().unwrap_or_default();
    });
    let unanswered = (0..total).filter(|&f| flows.source(f).is_none()).count();
    let (on_x, on_s) = count_on(flows, egress(X), egress(SURVIVOR));
    let stray = total - unanswered - on_x - on_s;
    r.row(
        "flows opened (pods × sockets × server ports)",
        format!(
            "{total} ({PODS} × {SOCKETS} × {ports}) in {:.2} s",
            opened_at.as_secs_f64()
        ),
    );
    r.row(
        "  through X (gateway 1) / survivor (gateway 2)",
        format!("{on_x} / {on_s}"),
    );
    if unanswered > 0 || stray > 0 {
        r.failures.push(format!(
            "{unanswered} flows never answered and {stray} answered from neither egress IP before the kill"
        ));
    }
    let x_flows: Vec<usize> = (0..total)
        .filter(|&f| flows.source(f).map(|s| s.ip()) == Some(egress(X)))
        .collect();
    let s_flows: Vec<usize> = (0..total)
        .filter(|&f| flows.source(f).map(|s| s.ip()) == Some(egress(SURVIVOR)))
        .collect();
    // (a)
    let complete = samples
        .iter()
        .find(|(_, c2, c1)| *c2 >= on_x as f64 && *c1 >= on_s as f64)
        .map(|(t, _, _)| *t);
    let last = samples.last().copied().unwrap_or_default();
    match complete {
        Some(t) => r.row(
            "(a) all copies on both replicas, after the last new flow (100 ms gauge)",
            format!(
                "{} (at {:.2} s from the first)",
                ms(t.saturating_sub(opened_at)),
                t.as_secs_f64()
            ),
        ),
        None => {
            r.row(
                "(a) all copies on both replicas",
                format!(
                    "never: {} of {on_x} on gateway 2, {} of {on_s} on gateway 1",
                    last.1, last.2
                ),
            );
            r.failures
                .push("the replicas never held copies of all each other's flows".into());
        }
    }
    let mut before_drops = Vec::new();
    for k in 1..=2 {
        let m = env.topo.gateway(k).metrics()?;
        before_drops.push(scenario::drops(&m));
        let sent = scenario::value(
            &m,
            "egress_gateway_sync_records_total",
            &[("kind", "flow"), ("result", "sent")],
        );
        r.row(
            format!("    gateway {k} before the kill: flow records sent, drops"),
            format!("{sent}, {}", drop_list(&before_drops[k - 1], None)),
        );
    }

    // The kill.
    std::thread::sleep(Duration::from_millis(300));
    let at = u64::try_from(flows.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    flows.killed_at_ns.store(at, Ordering::Relaxed);
    flows.killed.store(true, Ordering::Release);
    let killed = Instant::now();
    match env.topo.gateway_mut(X).process_mut() {
        Some(p) => p.signal(libc::SIGKILL),
        None => tests::bail!("gateway {X} has no process"),
    }
    let mut passes = 0;
    loop {
        let missing: Vec<usize> = x_flows
            .iter()
            .copied()
            .filter(|&f| flows.after[f].load(Ordering::Relaxed) == 0)
            .collect();
        if missing.is_empty() || killed.elapsed() >= AFTER_KILL {
            break;
        }
        let pass = Instant::now();
        send_pass(sockets, flows, &missing, o.resend_rate);
        passes += 1;
        if let Some(rest) = Duration::from_millis(20).checked_sub(pass.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut times: Vec<u64> = x_flows
        .iter()
        .map(|&f| flows.after[f].load(Ordering::Relaxed))
        .filter(|&t| t != 0)
        .collect();
    times.sort_unstable();
    let survived = times.len();
    let at_share = |permille: usize| -> String {
        let need = (x_flows.len() * permille).div_ceil(1000).max(1);
        times.get(need - 1).map_or("— (not reached)".into(), |&ns| {
            ms(Duration::from_nanos(ns))
        })
    };
    r.row(
        "(b) first reply via the survivor, from the SIGKILL",
        at_share(0),
    );
    r.row("    50 % of X's flows answered", at_share(500));
    r.row("    99 % of X's flows answered", at_share(990));
    r.row("    100 % of X's flows answered", at_share(1000));
    r.row(
        "    passes over the missing flows",
        format!(
            "{passes}; one pass over all of X's takes {}",
            ms(Duration::from_secs_f64(
                x_flows.len() as f64 / o.resend_rate as f64
            ))
        ),
    );
    // The survivor's own latency once it had taken over: the flows first asked after the first answer,
    // from that request to their answer (a lost request shows as a pass or more).
    let first = times.first().copied().unwrap_or(u64::MAX);
    let mut waits: Vec<u64> = x_flows
        .iter()
        .map(|&f| {
            (
                flows.asked[f].load(Ordering::Relaxed),
                flows.after[f].load(Ordering::Relaxed),
            )
        })
        .filter(|&(asked, _)| asked >= first)
        .map(|(asked, answered)| {
            if answered == 0 {
                u64::MAX
            } else {
                answered.saturating_sub(asked)
            }
        })
        .collect();
    waits.sort_unstable();
    let wait_at = |permille: usize| -> String {
        let i = (waits.len() * permille).div_ceil(1000).max(1) - 1;
        match waits.get(i) {
            Some(&u64::MAX) => "never".into(),
            Some(&ns) => format!("{:.1} ms", Duration::from_nanos(ns).as_secs_f64() * 1e3),
            None => "—".into(),
        }
    };
    r.row(
        "    flows first asked after the first answer: request → answer p50 / p99 / max",
        format!(
            "{}: {} / {} / {}",
            waits.len(),
            wait_at(500),
            wait_at(990),
            wait_at(1000)
        ),
    );
    let asks: u64 = x_flows
        .iter()
        .map(|&f| flows.asks[f].load(Ordering::Relaxed))
        .sum();
    r.row(
        "    requests sent on X's flows after the kill",
        format!(
            "{asks} ({:.2} per flow)",
            asks as f64 / x_flows.len().max(1) as f64
        ),
    );
    let moved = flows.moved.load(Ordering::Relaxed);
    r.row(
        "    answers from another source than before",
        moved.to_string(),
    );
    if moved > 0 {
        let ex = flows.moved_example.load(Ordering::Relaxed);
        let flow = usize::try_from(ex >> 48).unwrap_or(0);
        r.failures.push(format!(
            "{moved} answers after the kill came from another source, e.g. flow {flow}: {:?} before, {:?} after",
            flows.source(flow),
            unpack(1 << 48 | (ex & 0xffff_ffff_ffff)),
        ));
    }
    r.row(
        "(c) X's flows that survived (same address and port)",
        format!(
            "{survived} of {} ({:.3} %)",
            x_flows.len(),
            survived as f64 * 100.0 / x_flows.len().max(1) as f64
        ),
    );
    if survived < x_flows.len() {
        r.failures.push(format!(
            "{} of X's {} flows got no answer with their source within {AFTER_KILL:?} of the kill",
            x_flows.len() - survived,
            x_flows.len()
        ));
    }

    let m = env.topo.gateway(SURVIVOR).metrics()?;
    let v = |name: &str, labels: &[(&str, &str)]| scenario::value(&m, name, labels);
    r.row(
        "    survivor: takeovers, standby packets in / out",
        format!(
            "{} , {} / {}",
            v("egress_gateway_sync_takeovers_total", &[]),
            v(
                "egress_gateway_standby_packets_total",
                &[("direction", "inbound")]
            ),
            v(
                "egress_gateway_standby_packets_total",
                &[("direction", "outbound")]
            )
        ),
    );
    let takeover_drops = scenario::drops(&m);
    r.row(
        "    survivor drops meanwhile, by reason",
        drop_list(&takeover_drops, before_drops.get(SURVIVOR - 1)),
    );

    // The survivor's own flows, at the same rate: a reference for its drops.
    let (first_pass, survivor_ok) = survivor_round(sockets, flows, &s_flows, o.resend_rate);
    let m = env.topo.gateway(SURVIVOR).metrics()?;
    r.row(
        "    the survivor's own flows: answered in 1st pass / all",
        format!("{first_pass} / {survivor_ok} of {}", s_flows.len()),
    );
    r.row(
        "    survivor drops meanwhile, by reason",
        drop_list(&scenario::drops(&m), Some(&takeover_drops)),
    );
    if survivor_ok < s_flows.len() {
        r.failures.push(format!(
            "{} of the survivor's {} own flows broke",
            s_flows.len() - survivor_ok,
            s_flows.len()
        ));
    }

    // (d) X restarted.
    let gw = env.topo.gateway_mut(X);
    gw.respawn()?;
    let t = Instant::now();
    match gw.wait_ready(READY) {
        Ok(()) => {
            let took = t.elapsed();
            let want = s_flows.len() as f64;
            let mx = env.topo.gateway(X).metrics()?;
            let held = scenario::value(
                &mx,
                "egress_gateway_sync_copies",
                &[("peer", &(SURVIVOR - 1).to_string())],
            );
            // The gauge is published every 100 ms: wait for it to show every copy.
            let mut all = None;
            while t.elapsed() < took + Duration::from_secs(10) {
                if copies(&env.topo, X) >= want {
                    all = Some(t.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            r.row(
                "(d) X restarted: ready (bulk of the survivor's flows)",
                format!("{} after the restart, {held} copies then", ms(took)),
            );
            let survivor_m = env.topo.gateway(SURVIVOR).metrics()?;
            r.row(
                "    X then: bulk requested, datagrams missed; survivor: bulk served, resent",
                format!(
                    "{}, {}; {}, {}",
                    scenario::value(
                        &mx,
                        "egress_gateway_sync_bulk_total",
                        &[("role", "requested")]
                    ),
                    scenario::value(
                        &mx,
                        "egress_gateway_sync_missed_total",
                        &[("peer", &(SURVIVOR - 1).to_string())]
                    ),
                    scenario::value(
                        &survivor_m,
                        "egress_gateway_sync_bulk_total",
                        &[("role", "served")]
                    ),
                    scenario::value(
                        &survivor_m,
                        "egress_gateway_sync_records_total",
                        &[("kind", "flow"), ("result", "resent")]
                    ),
                ),
            );
            if held < want {
                // The gauge and readiness are published together by the sync thread.
                r.failures.push(format!(
                    "the restarted X was ready with {held} of the survivor's {} flows; its log:\n{}",
                    s_flows.len(),
                    sync_log(&env.topo, X)
                ));
            }
            match all {
                Some(a) => r.row(
                    "    all of the survivor's flows copied on X",
                    format!("{} after the restart", ms(a)),
                ),
                None => {
                    r.row("    all of the survivor's flows copied on X", "never");
                    r.failures.push(format!(
                        "the restarted X never held all of the survivor's {} flows ({} copies 10 s after ready)",
                        s_flows.len(),
                        copies(&env.topo, X)
                    ));
                }
            }
        }
        Err(e) => {
            r.row("(d) X restarted: ready", "never");
            r.failures.push(format!("the restarted X: {e}"));
        }
    }
    Ok(())
}

/// The `sync:` lines of gateway `k`'s log.
fn sync_log(topo: &Topology, k: usize) -> String {
    let tail = topo
        .gateway(k)
        .process()
        .map(|p| p.log_tail(200))
        .unwrap_or_default();
    tail.lines()
        .filter(|l| l.contains("sync:"))
        .map(|l| format!("  {l}\n"))
        .collect()
}

/// The non-zero drop counters `now` (less `before`), by reason; or `none`.
fn drop_list(
    now: &std::collections::BTreeMap<String, f64>,
    before: Option<&std::collections::BTreeMap<String, f64>>,
) -> String {
    let drops: Vec<String> = now
        .iter()
        .map(|(k, n)| (n - before.and_then(|b| b.get(k)).copied().unwrap_or(0.0), k))
        .filter(|(n, _)| *n > 0.0)
        .map(|(n, k)| format!("{k} {n}"))
        .collect();
    if drops.is_empty() {
        "none".to_owned()
    } else {
        drops.join(", ")
    }
}

/// Flows answered, before the kill, from egress IP `a` and from `b`.
fn count_on(flows: &Flows, a: IpAddr, b: IpAddr) -> (usize, usize) {
    let mut n = (0, 0);
    for f in 0..flows.source.len() {
        match flows.source(f).map(|s| s.ip()) {
            Some(ip) if ip == a => n.0 += 1,
            Some(ip) if ip == b => n.1 += 1,
            _ => {}
        }
    }
    n
}

/// One request on each of `list` (asked again twice for those not answered); how many were answered with
/// their source of before, after the first pass and in all. Uses `after`, which these flows have not used
/// yet.
fn survivor_round(
    sockets: &[UdpSocket],
    flows: &Flows,
    list: &[usize],
    rate: u64,
) -> (usize, usize) {
    let answered = || {
        list.iter()
            .filter(|&&f| flows.after[f].load(Ordering::Relaxed) != 0)
            .count()
    };
    let mut first = None;
    for _ in 0..3 {
        let missing: Vec<usize> = list
            .iter()
            .copied()
            .filter(|&f| flows.after[f].load(Ordering::Relaxed) == 0)
            .collect();
        if missing.is_empty() {
            break;
        }
        send_pass(sockets, flows, &missing, rate);
        std::thread::sleep(Duration::from_secs(1));
        first = first.or(Some(answered()));
    }
    let all = answered();
    (first.unwrap_or(all), all)
}

fn print_table(o: &Options, r: &Results) {
    let width = r
        .rows
        .iter()
        .map(|(w, _)| w.chars().count())
        .max()
        .unwrap_or(0);
    println!();
    println!(
        "takeover: 2 replicas in one sync set behind the node agent; {} flows asked for through X, opened at {}/s, asked again after the kill at {}/s",
        o.flows,
        o.rate,
        o.resend_rate
    );
    println!("{:-<1$}", "", width + 40);
    for (what, value) in &r.rows {
        println!("{what:<width$}  {value}");
    }
    println!("{:-<1$}", "", width + 40);
    println!(
        "result: {}",
        if r.failures.is_empty() {
            "every flow of X survived with its source".to_owned()
        } else {
            format!("{} failure(s)", r.failures.len())
        }
    );
}
