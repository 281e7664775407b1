//! `egress-gateway run`: start-up, the control loop, reload and drain.
//!
//! Start-up: read the configuration, look the uplink interfaces up, build the pipeline's `Gateway` (and with
//! it the flow table and port pools), open the HTTP endpoints, start the workers (each opens its own
//! sockets), ask for the next hops' MACs, and turn readiness on.
//!
//! The control loop (this thread), every 10 ms: sweep expired flows; every 200 ms: neighbour housekeeping;
//! every second: look for a changed configuration file. SIGHUP or a changed file reloads: an invalid file,
//! or one that changes what needs a restart, is refused with the reason and the running configuration
//! stays; otherwise a new `Gateway` over the same flow table replaces the old one in every worker, so
//! established flows go on. SIGTERM (or SIGINT) turns readiness off at once, refuses new flows, keeps
//! forwarding established ones for `drain_seconds`, then stops the workers and exits 0; a second signal
//! exits at once. With `sync` and a peer in sync, SIGTERM hands over instead: readiness says `handed over`
//! (the node agents take the replica out of their routes at once), new flows are still taken, the lowest
//! peer adopts the addresses and carries the flows on, and the process exits once it has (at least
//! `HAND_OVER_GRACE`, at most `drain_seconds`) — docs/failover.md.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use forwarder_core::conntrack::{FlowEvent, FlowEventKind, FlowEvents};
use forwarder_core::pipeline::Gateway;
use ipnet::{IpNet, Ipv4Net};

use crate::config::{self, GatewayConfig, LogFormat};
use crate::flowlog::{live_line, FlowFilter, FlowLog, PodNames, WallClock};
use crate::http::{self, Response};
use crate::io::packet::{Interface, TxSocket};
use crate::io::steer::Steering;
use crate::io::tunnel::TunnelSenders;
use crate::neighbour;
use crate::nodes::{self, NodesUpdate};
use crate::probe;
use crate::supervisor;
use crate::sync;
use crate::telemetry::{self, Readiness, Telemetry};
use crate::upstream;
use crate::worker::{Receivers, Shared, UplinkIo, Worker};

/// Flow-table slots swept per 10 ms tick: the whole default table (2^20) every ~2.5 s.
const EXPIRE_BUDGET: usize = 4096;
const TICK: Duration = Duration::from_millis(10);
const NEIGHBOUR_EVERY: Duration = Duration::from_millis(200);
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// A drain by hand-over lasts at least this long: the node agents probe every 200 ms (`health.interval`, docs/node-agent.md)
/// and take a gateway that answers "handed over" out of their routes at the first answer; packets they
/// sent before still arrive meanwhile, and are forwarded.
const HAND_OVER_GRACE: Duration = Duration::from_secs(1);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    #[error("{0}")]
    Config(config::ConfigErrors),
    #[error("{0}")]
    Setup(String),
}

fn setup(e: impl std::fmt::Display) -> RunError {
    RunError::Setup(e.to_string())
}

/// Runs the gateway until SIGTERM/SIGINT and the drain are over.
pub(crate) fn run(path: &Path, tunnel_ip: Option<Ipv4Addr>) -> Result<(), RunError> {
    let cfg = GatewayConfig::load_with(path, tunnel_ip).map_err(RunError::Config)?;
    telemetry::init_logs(cfg.log_format == LogFormat::Json);

    let mut uplinks = Vec::with_capacity(cfg.uplinks.len());
    for (index, u) in cfg.uplinks.iter().enumerate() {
        let link = Interface::by_name(&u.interface)
            .map_err(|e| setup(format!("{}: uplink {}: {e}", path.display(), u.name)))?;
        if u32::from(u.mtu) > link.mtu {
            tracing::warn!(uplink = %u.name, interface = %u.interface, configured = u.mtu, actual = link.mtu,
                "uplink mtu is larger than the interface's; frames that large will be refused by the kernel");
        }
        uplinks.push(UplinkIo {
            name: u.name.clone(),
            interface: u.interface.clone(),
            link,
            egress: u.egress_ips.clone(),
            peer_egress: cfg
                .sync
                .iter()
                .flat_map(|s| &s.peers)
                .flat_map(|p| p.egress.iter().map(move |&(i, ip)| (p.ordinal, i, ip)))
                .filter(|&(_, i, _)| i == index)
                .map(|(o, _, ip)| (o, ip))
                .collect(),
            mtu: u.mtu,
        });
    }
    let seed = random_u64();
    let events = cfg
        .flow_log
        .as_ref()
        .map(|f| Arc::new(FlowEvents::new(f.queue)));
    let sync_setup = cfg
        .sync
        .as_ref()
        .map(|s| sync::prepare(s, cfg.conntrack, cfg.ports))
        .transpose()
        .map_err(setup)?;
    let gateway = Gateway::with_event_queues(
        cfg.pipeline(Some(seed)),
        cfg.conntrack,
        cfg.ports,
        events.clone(),
        sync_setup.as_ref().map(|s| Arc::clone(&s.events)),
    )
    .map_err(|e| setup(format!("{}: {e}", path.display())))?;
    let gateway = match &sync_setup {
        Some(s) => gateway.with_standby(Arc::clone(&s.standby)),
        None => gateway,
    };
    let own_table = Arc::clone(gateway.table());
    let workers = if cfg.workers == 0 {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    } else {
        cfg.workers
    };
    let tunnel_senders = TunnelSenders::open(cfg.tunnel.listen, cfg.tunnel.source_ports, 8 << 20)
        .map_err(|e| setup(format!("{}: tunnel: {e}", path.display())))?;
    tracing::info!(ports = ?tunnel_senders.ports(), "tunnel datagrams leave from these UDP source ports, one per inner flow by its hash");
    let shared = Arc::new(Shared {
        gateway: Mutex::new(Arc::new(gateway)),
        gateway_generation: AtomicU64::new(0),
        neighbours: neighbour::Neighbours::new(uplinks.len()),
        uplinks,
        tunnel_listen: cfg.tunnel.listen,
        tunnel_senders: Arc::new(tunnel_senders),
        tunnel_mtu: cfg.tunnel.mtu,
        reports: (0..workers).map(|_| Mutex::new(None)).collect(),
        steering: Steering::detect(workers).map_err(setup)?,
        worker_panics: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        epoch: Instant::now(),
    });
    let (sync_status, sync_thread) = match sync_setup {
        Some(s) => {
            let vetting = sync::Vetting {
                pod_cidrs: cfg.tunnel.pod_cidrs.clone(),
                nodes: (!cfg.tunnel.allowed_from_nodes).then(|| cfg.tunnel.allowed_sources.clone()),
            };
            let (status, thread) = sync::start(
                s,
                *cfg.tunnel.listen.ip(),
                cfg.health_listen.port(),
                own_table,
                vetting,
                Arc::clone(&shared),
            )
            .map_err(setup)?;
            (status, Some(thread))
        }
        None => (Arc::new(sync::SyncStatus::disabled()), None),
    };
    let upstream_status = Arc::new(upstream::Status::new(cfg.probes.as_ref()));
    let telemetry = Arc::new(
        Telemetry::new()
            .with_upstream(Arc::clone(&upstream_status))
            .with_sync(sync_status),
    );
    let clock = WallClock::new(shared.epoch);
    let pod_names = Arc::new(PodNames::new(
        cfg.flow_log
            .as_ref()
            .map(|f| f.pod_names.clone())
            .unwrap_or_default(),
    ));
    let flow_log = match (&cfg.flow_log, &events) {
        (Some(f), Some(events)) => Some(
            FlowLog::start(
                f,
                Arc::clone(events),
                clock,
                shared.uplinks.iter().map(|u| u.name.clone()).collect(),
                Arc::clone(&pod_names),
                Arc::clone(&telemetry.flow_log),
            )
            .map_err(|e| setup(format!("flow_log: {e}")))?,
        ),
        _ => None,
    };
    let heartbeat = Arc::new(AtomicU64::new(0));
    start_http(&cfg, &shared, &telemetry, &heartbeat)?;
    start_admin(&cfg, &shared, clock, pod_names)?;

    // Signals only set flags; the control loop acts on them.
    let hup = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    for (sig, flag) in [
        (signal_hook::consts::SIGHUP, &hup),
        (signal_hook::consts::SIGTERM, &term),
        (signal_hook::consts::SIGINT, &term),
    ] {
        signal_hook::flag::register(sig, Arc::clone(flag)).map_err(setup)?;
    }

    // allowed_sources: kubernetes-nodes: the pipeline starts admitting no node; the watch fills it in.
    let nodes = if cfg.tunnel.allowed_from_nodes {
        tracing::info!("tunnel sources: the InternalIPs of the cluster's Nodes (watching; none admitted until listed)");
        Some(nodes::spawn(cfg.kubeconfig.clone()).map_err(setup)?)
    } else {
        None
    };

    let threads = start_workers(&shared, workers)?;
    // The prober asks the workers' neighbour cache for its next hops: after the workers run.
    if let (Some(p), Some(ports)) = (&cfg.probes, config::probe_ports(cfg.ports)) {
        upstream::start(p, ports, &shared, &upstream_status).map_err(|e| {
            shared.stop.store(true, Ordering::Relaxed);
            setup(e)
        })?;
    }
    let control_tx: Vec<TxSocket> = shared
        .uplinks
        .iter()
        .map(|u| TxSocket::open(u.link.index, 1 << 20))
        .collect::<Result<_, _>>()
        .map_err(setup)?;
    let mut control = Control {
        path: path.to_path_buf(),
        tunnel_ip,
        cfg,
        seed,
        shared: Arc::clone(&shared),
        telemetry: Arc::clone(&telemetry),
        control_tx,
        watched: file_stamp(path),
        scratch: [0; neighbour::MAX_FRAME],
        nodes,
        learned: None,
        nodes_error: None,
        announcer: Announcer::default(),
    };
    control.resolve_next_hops();
    // With the Node watch, ready once the nodes are known (poll_nodes).
    if control.nodes.is_none() {
        telemetry.ready.store(true, Ordering::Relaxed);
    }
    tracing::info!(
        config = %path.display(),
        tunnel = %control.cfg.tunnel.listen,
        workers,
        uplinks = ?control.shared.uplinks.iter().map(|u| format!("{}={}", u.name, u.interface)).collect::<Vec<_>>(),
        "forwarding"
    );

    let mut drain_until: Option<Instant> = None;
    let mut drain_started: Option<Instant> = None;
    let mut last_neighbours = Instant::now();
    let mut last_watch = Instant::now();
    loop {
        std::thread::sleep(TICK);
        heartbeat.store(millis_since(shared.epoch), Ordering::Relaxed);
        let now = shared.now();
        shared.gateway().expire(now, EXPIRE_BUDGET);
        if last_neighbours.elapsed() >= NEIGHBOUR_EVERY {
            last_neighbours = Instant::now();
            control.neighbours();
        }
        control.poll_nodes(drain_until.is_some());
        control.announce();
        if hup.swap(false, Ordering::Relaxed) {
            control.reload("SIGHUP");
        }
        if last_watch.elapsed() >= WATCH_EVERY {
            last_watch = Instant::now();
            let stamp = file_stamp(&control.path);
            if stamp != control.watched {
                control.watched = stamp;
                control.reload("the file changed");
            }
        }
        if term.swap(false, Ordering::Relaxed) {
            if drain_until.is_some() {
                tracing::warn!("second signal: stopping without waiting for the drain to end");
                break;
            }
            let drain = control.cfg.drain;
            telemetry.ready.store(false, Ordering::Relaxed);
            // With a peer in sync, hand the flows and addresses over to it: the node agents move this
            // replica's traffic at once and the peer carries its connections on, so new flows are still
            // taken meanwhile (the peer gets them too). Without one, refuse new flows and wait.
            let hand_over = telemetry.sync.start_hand_over();
            telemetry.draining.store(true, Ordering::Relaxed);
            shared.gateway().set_draining(!hand_over);
            drain_started = Some(Instant::now());
            drain_until = Some(Instant::now() + drain);
            if hand_over {
                tracing::info!(
                    seconds = drain.as_secs(),
                    "draining: handing the flows and addresses over to a peer of the set (at most drain_seconds)"
                );
            } else {
                tracing::info!(
                    seconds = drain.as_secs(),
                    "draining: readiness off, new flows refused, established flows forwarded"
                );
            }
        }
        if drain_started.is_some_and(|t| t.elapsed() >= HAND_OVER_GRACE)
            && telemetry.sync.is_handed_over()
        {
            tracing::info!("handed over: a peer carries this replica's flows and addresses");
            break;
        }
        if drain_until.is_some_and(|t| Instant::now() >= t) {
            tracing::info!("drain period over");
            break;
        }
        if sync_thread
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished)
        {
            // It runs until `stop`: ended before, it panicked. Without it this replica would go on
            // unreplicated and could not hand anything over; its peers carry its flows once it exits.
            shared.stop.store(true, Ordering::Relaxed);
            let why = match sync_thread.map(std::thread::JoinHandle::join) {
                Some(Err(p)) => supervisor::panic_message(p.as_ref()),
                _ => "it returned".to_string(),
            };
            return Err(RunError::Setup(format!("the sync thread stopped: {why}")));
        }
        if threads.iter().any(std::thread::JoinHandle::is_finished) {
            shared.stop.store(true, Ordering::Relaxed);
            let mut msg = String::from("a worker stopped");
            for t in threads {
                if let Ok(Err(e)) = t.join() {
                    msg = format!("a worker stopped: {e}");
                }
            }
            return Err(RunError::Setup(msg));
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let gateway = shared.gateway();
    let table = gateway.table();
    let flows = table.len();
    if let (Some(log), Some(events)) = (flow_log, table.events()) {
        // The flows still open end with the gateway: log them (waiting for the writer, not dropping).
        let now = shared.now();
        let guard = table.pin();
        table.for_each(&guard, |f| {
            while events.len() >= events.capacity() {
                std::thread::sleep(Duration::from_millis(1));
            }
            events.push(FlowEvent::of(f, FlowEventKind::End, now));
        });
        drop(guard);
        log.finish();
    }
    tracing::info!(flows_left = flows, "stopped");
    Ok(())
}

/// `GET /flows` on `admin.listen`: the live flows as JSON lines, filtered by the query
/// (`pod`, `egress_port`, `dst`, `limit`); what `egress-gateway flows` prints.
fn start_admin(
    cfg: &GatewayConfig,
    shared: &Arc<Shared>,
    clock: WallClock,
    names: Arc<PodNames>,
) -> Result<(), RunError> {
    let shared = Arc::clone(shared);
    let h: http::Handler = Arc::new(move |target: &str| {
        let (path, query) = http::split(target);
        if path != "/flows" {
            return Response::text(
                404,
                "not found: try /flows?pod=IP&egress_port=N&dst=IP&limit=N\n",
            );
        }
        let filter = match FlowFilter::from_query(query) {
            Ok(f) => f,
            Err(e) => return Response::text(400, format!("{e}\n")),
        };
        let gateway = shared.gateway();
        let table = gateway.table();
        let uplinks: Vec<String> = shared.uplinks.iter().map(|u| u.name.clone()).collect();
        let now = shared.now();
        let mut body = String::new();
        let mut n = 0;
        let guard = table.pin();
        table.for_each(&guard, |f| {
            if n >= filter.limit || f.is_expired(now) {
                return;
            }
            let e = FlowEvent::of(f, FlowEventKind::End, now);
            if filter.matches(&e) {
                let name = names.get(e.pod.0);
                body.push_str(&live_line(&e, &clock, &uplinks, name.as_deref()));
                body.push('\n');
                n += 1;
            }
        });
        Response {
            status: 200,
            content_type: "application/x-ndjson",
            body,
        }
    });
    http::serve("admin", cfg.admin_listen, h).map_err(setup)?;
    Ok(())
}

/// Starts `n` workers; each opens its sockets first and reports, so that a failure stops the start-up
/// with its reason.
fn start_workers(
    shared: &Arc<Shared>,
    n: usize,
) -> Result<Vec<std::thread::JoinHandle<std::io::Result<()>>>, RunError> {
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(n);
    for id in 0..n {
        // Here, one after the other: a socket's index in its group is the order it joined (`io::steer`).
        let receivers = Receivers::open(shared).map_err(|e| {
            shared.stop.store(true, Ordering::Relaxed);
            RunError::Setup(format!("worker {id}: {e}"))
        })?;
        let shared = Arc::clone(shared);
        let tx = tx.clone();
        let seed = random_u64();
        let t = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || {
                let mut restarts = 0u64;
                supervisor::supervise(
                    id,
                    &shared.stop,
                    &shared.worker_panics,
                    || {
                        // A restarted worker draws new random ports from a new seed.
                        restarts += 1;
                        Worker::open(id, Arc::clone(&shared), seed ^ restarts, &receivers)
                    },
                    Worker::run,
                    |r| {
                        let _ = tx.send(r);
                    },
                )
            })
            .map_err(setup)?;
        threads.push(t);
    }
    drop(tx);
    for _ in 0..n {
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.stop.store(true, Ordering::Relaxed);
                return Err(RunError::Setup(e));
            }
            Err(_) => return Err(RunError::Setup("a worker failed to start".into())),
        }
    }
    Ok(threads)
}

fn start_http(
    cfg: &GatewayConfig,
    shared: &Arc<Shared>,
    telemetry: &Arc<Telemetry>,
    heartbeat: &Arc<AtomicU64>,
) -> Result<(), RunError> {
    let health = {
        let telemetry = Arc::clone(telemetry);
        let shared = Arc::clone(shared);
        let heartbeat = Arc::clone(heartbeat);
        move |target: &str| -> Option<Response> {
            match http::split(target).0 {
                "/readiness" | "/readyz" => Some(match telemetry.readiness() {
                    Readiness::Ready => Response::text(200, "ready\n"),
                    Readiness::Starting => Response::text(503, "starting\n"),
                    Readiness::Syncing => Response::text(503, "syncing\n"),
                    Readiness::Draining => Response::text(503, "draining\n"),
                    Readiness::HandedOver => Response::text(503, "handed over\n"),
                    Readiness::ProbesFailing(why) => {
                        Response::text(503, format!("probes failing: {why}\n"))
                    }
                }),
                "/livez" | "/healthz" => {
                    let stale = millis_since(shared.epoch)
                        .saturating_sub(heartbeat.load(Ordering::Relaxed));
                    Some(if stale < 5000 {
                        Response::text(200, "ok\n")
                    } else {
                        Response::text(503, format!("control loop stalled for {stale} ms\n"))
                    })
                }
                _ => None,
            }
        }
    };
    let metrics = {
        let telemetry = Arc::clone(telemetry);
        let shared = Arc::clone(shared);
        move |target: &str| -> Option<Response> {
            (http::split(target).0 == "/metrics").then(|| Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: telemetry.render(&shared),
            })
        }
    };
    // The node agents' UDP probe, on the health port: the same answer as /readiness.
    let state: Arc<dyn Fn() -> probe::State + Send + Sync> = {
        let telemetry = Arc::clone(telemetry);
        Arc::new(move || match telemetry.readiness() {
            Readiness::Ready => probe::State::Ready,
            Readiness::Draining => probe::State::Draining,
            Readiness::HandedOver => probe::State::HandedOver,
            Readiness::Starting | Readiness::Syncing | Readiness::ProbesFailing(_) => {
                probe::State::NotReady
            }
        })
    };
    probe::serve(cfg.health_listen, state, Arc::clone(&telemetry.probes)).map_err(setup)?;
    let not_found = || Response::text(404, "not found: try /readiness, /livez or /metrics\n");
    if cfg.health_listen == cfg.metrics_listen {
        let h: http::Handler =
            Arc::new(move |p| health(p).or_else(|| metrics(p)).unwrap_or_else(not_found));
        http::serve("health+metrics", cfg.health_listen, h).map_err(setup)?;
    } else {
        let h: http::Handler = Arc::new(move |p| health(p).unwrap_or_else(not_found));
        http::serve("health", cfg.health_listen, h).map_err(setup)?;
        let m: http::Handler = Arc::new(move |p| metrics(p).unwrap_or_else(not_found));
        http::serve("metrics", cfg.metrics_listen, m).map_err(setup)?;
    }
    Ok(())
}

struct Control {
    path: PathBuf,
    /// `--tunnel-ip`, applied to every reload too.
    tunnel_ip: Option<Ipv4Addr>,
    cfg: GatewayConfig,
    seed: u64,
    shared: Arc<Shared>,
    telemetry: Arc<Telemetry>,
    control_tx: Vec<TxSocket>,
    watched: Option<(SystemTime, u64)>,
    scratch: [u8; neighbour::MAX_FRAME],
    /// The Node watch's reports (`allowed_sources: kubernetes-nodes`).
    nodes: Option<std::sync::mpsc::Receiver<NodesUpdate>>,
    /// The node addresses last learnt; `None` before the first complete list.
    learned: Option<BTreeSet<Ipv4Addr>>,
    /// The Node watch's last error, logged once until it recovers.
    nodes_error: Option<String>,
    /// Addresses to announce on the uplinks (sync: peers' addresses adopted, our own after a restart).
    announcer: Announcer,
}

/// When an address is announced after it was taken over: at once, twice more 100 ms apart, and again at
/// 1 s and 3 s (keepalived sends 5 gratuitous ARPs at once and 5 more after 5 s; fewer, sooner, is enough
/// for a Linux router, which replaces its entry on the first — see `neighbour::announce`).
const ANNOUNCE_AT: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// The addresses this replica has claimed on its uplinks and the announcements still due.
#[derive(Debug, Default)]
struct Announcer {
    /// (uplink, address) announced as ours now.
    claimed: BTreeSet<(usize, IpAddr)>,
    /// (when, uplink, address).
    due: Vec<(Instant, usize, IpAddr)>,
    /// The sync status's reclaim count last acted on.
    reclaims: u64,
}

impl Announcer {
    /// Makes `now_ours` the claimed set: newly claimed addresses get their announcements scheduled, ones
    /// given up lose theirs. Returns how many were newly claimed.
    fn claim(&mut self, now_ours: BTreeSet<(usize, IpAddr)>, now: Instant) -> usize {
        let new: Vec<(usize, IpAddr)> = now_ours.difference(&self.claimed).copied().collect();
        self.due.retain(|(_, u, ip)| now_ours.contains(&(*u, *ip)));
        for &(u, ip) in &new {
            self.due
                .extend(ANNOUNCE_AT.iter().map(|d| (now + *d, u, ip)));
        }
        self.claimed = now_ours;
        new.len()
    }

    /// Announces `addresses` (claimed already) again, on the same schedule as a new claim.
    fn again(&mut self, addresses: impl IntoIterator<Item = (usize, IpAddr)>, now: Instant) {
        for (u, ip) in addresses {
            if self.claimed.contains(&(u, ip)) {
                self.due
                    .extend(ANNOUNCE_AT.iter().map(|d| (now + *d, u, ip)));
            }
        }
    }

    /// The announcements due at `now`, removed from the schedule.
    fn take_due(&mut self, now: Instant) -> Vec<(usize, IpAddr)> {
        let due: Vec<(usize, IpAddr)> = self
            .due
            .iter()
            .filter(|(t, ..)| *t <= now)
            .map(|&(_, u, ip)| (u, ip))
            .collect();
        self.due.retain(|(t, ..)| *t > now);
        due
    }
}

impl Control {
    /// The data plane's configuration for `cfg`, with the learnt node addresses as the allowed tunnel
    /// sources when they come from the cluster.
    fn pipeline_config(&self, cfg: &GatewayConfig) -> forwarder_core::pipeline::Config {
        let mut p = cfg.pipeline(Some(self.seed));
        if cfg.tunnel.allowed_from_nodes {
            p.allowed_nodes = self
                .learned
                .iter()
                .flatten()
                .map(|ip| IpNet::V4(Ipv4Net::from(*ip)))
                .collect();
        }
        p
    }

    /// The data plane for `cfg` over the running one's flow table and peers' copies (a reload keeps every
    /// flow).
    fn next_gateway(
        &self,
        cfg: &GatewayConfig,
    ) -> Result<Gateway, forwarder_core::pipeline::ConfigError> {
        let old = self.shared.gateway();
        let gw = Gateway::with_table(self.pipeline_config(cfg), Arc::clone(old.table()))?;
        Ok(match old.standby() {
            Some(s) => gw.with_standby(Arc::clone(s)),
            None => gw,
        })
    }

    /// Takes the Node watch's reports: a new set of node addresses replaces the pipeline's allowed
    /// sources (flows kept, as in a reload); the first one makes the gateway ready (unless draining).
    fn poll_nodes(&mut self, draining: bool) {
        let Some(rx) = &self.nodes else {
            return;
        };
        let mut latest = None;
        while let Ok(update) = rx.try_recv() {
            match update {
                NodesUpdate::Snapshot(set) => latest = Some(set),
                NodesUpdate::Failed(e) => {
                    if self.nodes_error.as_ref() != Some(&e) {
                        tracing::error!(
                            "Node watch: {e} (retrying with backoff; the tunnel keeps admitting the nodes it knows)"
                        );
                        self.nodes_error = Some(e);
                    }
                }
            }
        }
        let Some(set) = latest else {
            return;
        };
        if self.nodes_error.take().is_some() {
            tracing::info!("Node watch works again");
        }
        if self.learned.as_ref() == Some(&set) {
            return;
        }
        let (added, removed) = match &self.learned {
            Some(old) => (set.difference(old).count(), old.difference(&set).count()),
            None => (set.len(), 0),
        };
        let first = self.learned.is_none();
        self.learned = Some(set);
        match self.next_gateway(&self.cfg) {
            Ok(gw) => {
                gw.set_draining(self.telemetry.draining.load(Ordering::Relaxed));
                self.shared.set_gateway(Arc::new(gw));
            }
            Err(e) => {
                tracing::error!(error = %e, "the learnt node addresses were refused by the data plane");
                return;
            }
        }
        let count = self.learned.as_ref().map_or(0, BTreeSet::len);
        self.telemetry
            .allowed_nodes
            .store(u64::try_from(count).unwrap_or(u64::MAX), Ordering::Relaxed);
        tracing::info!(
            nodes = count,
            added,
            removed,
            "tunnel sources: the cluster's node addresses"
        );
        if first && !draining {
            self.telemetry.ready.store(true, Ordering::Relaxed);
            tracing::info!("ready: the cluster's nodes are known");
        }
    }

    /// Pins the configured routers in the neighbour cache (never refused or evicted) and asks for the MACs
    /// of those not resolved yet, so that the first packets need not wait.
    fn resolve_next_hops(&mut self) {
        let now = Instant::now();
        for u in 0..self.cfg.uplinks.len() {
            let spec = &self.cfg.uplinks[u];
            let hops: Vec<IpAddr> = [
                spec.next_hop.map(IpAddr::V4),
                spec.next_hop_v6.map(IpAddr::V6),
            ]
            .into_iter()
            .flatten()
            .collect();
            let id = u8::try_from(u).unwrap_or(u8::MAX);
            self.shared.neighbours.set_pinned(id, &hops);
            for hop in hops {
                if self.shared.neighbours.get(id, hop).is_none()
                    && self.shared.neighbours.want(id, hop, now)
                {
                    self.send_request(u, hop, None);
                }
            }
        }
    }

    fn send_request(&mut self, u: usize, ip: IpAddr, known: Option<[u8; 6]>) {
        let (Some(up), Some(tx)) = (self.shared.uplinks.get(u), self.control_tx.get(u)) else {
            return;
        };
        let Some(src) = up.source_for(ip) else { return };
        if let Some(n) = neighbour::request(ip, src, up.link.mac, known, &mut self.scratch) {
            let to = crate::io::packet::link_addr(up.link.index, 0);
            if let Err(e) = tx.send_one(&to, &self.scratch[..n]) {
                tracing::warn!(uplink = %up.name, %ip, error = %e, "cannot send a neighbour request");
            }
        }
    }

    /// Claims the addresses this replica answers for beyond the configured ones: with `sync`, its own once
    /// it has its peers' flows (a peer may have adopted them while this replica was away) and the served
    /// peers' while it serves them; sends the announcements due.
    fn announce(&mut self) {
        let now = Instant::now();
        if self.cfg.sync.is_some() {
            let mut ours = BTreeSet::new();
            if self.telemetry.sync.is_synced() && !self.telemetry.sync.is_handing_over() {
                for (i, u) in self.shared.uplinks.iter().enumerate() {
                    ours.extend(u.egress.iter().map(|ip| (i, *ip)));
                }
            }
            if let Some(s) = self.shared.gateway().standby() {
                for (i, u) in self.shared.uplinks.iter().enumerate() {
                    ours.extend(
                        u.peer_egress
                            .iter()
                            .filter(|(o, _)| s.is_serving(*o))
                            .map(|&(_, ip)| (i, ip)),
                    );
                }
            }
            self.announcer.claim(ours, now);
            // A peer took this replica for dead and announced its addresses, or stopped serving them: the
            // neighbours may hold that peer's MAC for them, so tell them again (RFC 5227 §2.4's defence).
            let reclaims = self.telemetry.sync.reclaims();
            if reclaims != self.announcer.reclaims {
                self.announcer.reclaims = reclaims;
                let own: Vec<(usize, IpAddr)> = self
                    .shared
                    .uplinks
                    .iter()
                    .enumerate()
                    .flat_map(|(i, u)| u.egress.iter().map(move |ip| (i, *ip)))
                    .collect();
                self.announcer.again(own, now);
            }
        }
        // Probes of a silent peer's addresses, asked for by state sync before it takes the peer over.
        if let Some(s) = self.shared.gateway().standby() {
            for p in s.peers().iter().filter(|p| p.take_probe()) {
                for (up, tx) in self.shared.uplinks.iter().zip(&self.control_tx) {
                    for &(_, ip) in up.peer_egress.iter().filter(|(o, _)| *o == p.ordinal) {
                        let n = neighbour::probe(ip, up.link.mac, &mut self.scratch);
                        let to = crate::io::packet::link_addr(up.link.index, 0);
                        if let Err(e) = tx.send_one(&to, &self.scratch[..n]) {
                            tracing::warn!(uplink = %up.name, %ip, error = %e, "cannot probe a peer's address");
                        }
                    }
                }
            }
        }
        for (u, ip) in self.announcer.take_due(now) {
            let (Some(up), Some(tx)) = (self.shared.uplinks.get(u), self.control_tx.get(u)) else {
                continue;
            };
            let n = neighbour::announce(ip, up.link.mac, &mut self.scratch);
            let to = crate::io::packet::link_addr(up.link.index, 0);
            if let Err(e) = tx.send_one(&to, &self.scratch[..n]) {
                tracing::warn!(uplink = %up.name, %ip, error = %e, "cannot announce an address");
            }
        }
    }

    fn neighbours(&mut self) {
        for p in self.shared.neighbours.maintain(Instant::now()) {
            self.send_request(usize::from(p.uplink), p.ip, p.known);
        }
        self.resolve_next_hops();
    }

    fn reload(&mut self, why: &str) {
        // This reload reads the file as it is now: the watcher need not read the same version again.
        self.watched = file_stamp(&self.path);
        let refuse = |t: &Telemetry, msg: String| {
            t.reloads_refused.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "configuration reload ({why}) refused; the running configuration stays: {msg}"
            );
        };
        let new = match GatewayConfig::load_with(&self.path, self.tunnel_ip) {
            Ok(c) => c,
            Err(errors) => return refuse(&self.telemetry, format!("\n{errors}")),
        };
        if new == self.cfg {
            tracing::info!("configuration reload ({why}): nothing changed");
            return;
        }
        let restart = config::restart_needed(&self.cfg, &new);
        if !restart.is_empty() {
            return refuse(
                &self.telemetry,
                format!(
                    "changing {} needs a restart of the gateway",
                    restart.join(", ")
                ),
            );
        }
        let gw = match self.next_gateway(&new) {
            Ok(g) => g,
            Err(e) => return refuse(&self.telemetry, e.to_string()),
        };
        gw.set_draining(self.telemetry.draining.load(Ordering::Relaxed));
        self.shared.set_gateway(Arc::new(gw));
        self.cfg = new;
        self.telemetry
            .reloads_applied
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            routes = self.cfg.route_count(),
            "configuration reloaded ({why}); established flows kept"
        );
        self.resolve_next_hops();
    }
}

/// What identifies a version of the file: its modification time and size (ConfigMap updates replace a
/// symlink; `metadata` follows it).
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn millis_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Without the OS's randomness, fall back to the clock: worse port randomness, not a failure.
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        #[allow(clippy::cast_possible_truncation)] // any 64 bits of the clock do
        return t as u64 ^ u64::from(std::process::id());
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_claimed_address_is_announced_on_its_schedule_and_again_on_demand() {
        let t0 = Instant::now();
        let mut a = Announcer::default();
        let mine = (0, ip("203.0.113.10"));
        let adopted = (0, ip("203.0.113.11"));
        assert_eq!(a.claim([mine, adopted].into(), t0), 2);
        let at = |d: u64| t0 + Duration::from_millis(d);
        assert_eq!(a.take_due(at(0)), vec![mine, adopted]);
        assert!(a.take_due(at(50)).is_empty());
        assert_eq!(a.take_due(at(250)).len(), 4, "at 100 and 200 ms");
        // the adopted address given up: its announcements stop; the claim of one already claimed adds none
        assert_eq!(a.claim([mine].into(), at(300)), 0);
        assert_eq!(a.take_due(at(1000)), vec![mine]);
        assert_eq!(a.take_due(at(3000)), vec![mine]);
        assert!(a.take_due(at(10_000)).is_empty());
        // announced again on demand, only what is claimed
        a.again([mine, adopted], at(10_000));
        assert_eq!(a.take_due(at(10_000)), vec![mine]);
        assert_eq!(a.take_due(at(14_000)).len(), 4);
    }
}
