//! The soak and fault campaign (binary `soak`; `scripts/soak.sh` builds and runs it): hours (or, in CI,
//! minutes) of mixed traffic through two syncing gateway replicas while hostile input arrives and faults
//! are injected on a schedule, with invariants checked throughout and one summary at the end.
//!
//! * Topology: node 1 with pods (1,1)–(1,3), node 2 with pods (2,1)–(2,4), each node with the real node
//!   agent steering every pod's IPv4 and IPv6 traffic over both replicas (a resilient nexthop group);
//!   replicas 1 and 2 run `egress-gateway run` in one sync set, with short conntrack timeouts
//!   ([`TIMEOUTS`]) so that the tables can be seen to empty at the end.
//! * Traffic: [`load`] (sessions, bulk, short and abandoned connections, UDP request/response, fragments,
//!   one-way UDP, ping, IPv6); [`hostile`] (foreign VXLAN, wrong VNI, spoofed inner sources, unsolicited
//!   inbound, garbage, a SYN flood from pod (2,2)).
//! * Faults: [`faults`], one every `SOAK_FAULT_SECONDS` (default 20 s) after a 15 s warm-up.
//! * Invariants: see [`Verdict`] and `docs/soak.md`.
//!
//! `SOAK_SECONDS` (default 120) is how long traffic runs; the tables then get up to
//! [`DRAIN_WAIT`] to empty. Exit status 0 when every invariant held, 1 when one broke, 2 when it cannot
//! run here (no root, no binary), 130 on Ctrl-C.

mod capacity;
mod faults;
mod hostile;
mod load;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use tests::agent::{AgentConfig, NodeAgent, RouteShape};
use tests::scenario;
use tests::{
    demo, Context, GatewayMode, Inventory, Policy, PolicyRule, Process, Result, Topology,
    TopologySpec,
};

/// The gateways' conntrack timeouts in the soak: the shortest the configuration allows for UDP
/// (120 s, RFC 4787 REQ-5), and short TCP ones, so that abandoned connections expire within the run.
const TIMEOUTS: [(&str, &str); 4] = [
    ("udp_timeout", "120s"),
    ("tcp_established_timeout", "60s"),
    ("tcp_transitory_timeout", "30s"),
    ("icmp_timeout", "30s"),
];
/// The pods: (node, pod) pairs. [`load`] runs in the first four, [`hostile`]'s SYN flood in (2,2), the
/// [`capacity`] faults in (2,3) and (2,4).
const PODS: [(usize, usize); 7] = [
    (1, 1),
    (1, 2),
    (1, 3),
    (2, 1),
    (2, 2),
    capacity::FILLERS[0],
    capacity::FILLERS[1],
];
/// After the traffic stops: how long the flow tables, port pools and sync copies may take to empty (the
/// longest timeout and the expiry scan's period, with room).
const DRAIN_WAIT: Duration = Duration::from_secs(180);
/// Warm-up before the first fault, and before RSS samples count as the baseline.
const WARM_UP: Duration = Duration::from_secs(15);
/// How often the processes' memory is sampled.
const RSS_EVERY: Duration = Duration::from_secs(5);
/// RSS bounds: any process's peak, in MiB (gateways preallocate their flow table: 1 M entries by default,
/// the pages touched as flows land on them).
const RSS_LIMIT_MIB: [(&str, u64); 2] = [("gateway", 512), ("agent", 128)];
/// Growth allowed between the first and the second half of a long run (peak over peak), in MiB.
const RSS_SLACK_MIB: u64 = 16;

fn main() -> ExitCode {
    let usage = "usage: soak (as root; no arguments)\n\nRuns mixed and hostile traffic through two syncing \
                 replicas of the real gateway, steered by the real node agent, while faults are injected \
                 on a schedule, and checks invariants throughout. SOAK_SECONDS (default 120) sets how long \
                 traffic runs, SOAK_FAULT_SECONDS (default 20) the time between faults, SOAK_FAULTS (e.g. \
                 kill,drain) which faults, in that order, repeated (default: all ten). Build first: \
                 cargo build --release -p gateway. Exit status 0 when every invariant held, 1 when one \
                 broke, 2 without root or the gateway binary, 130 on Ctrl-C. See docs/soak.md.";
    let binary = match demo::prepare("soak", usage) {
        ControlFlow::Continue(binary) => binary,
        ControlFlow::Break(status) => return status,
    };
    let seconds = env_secs("SOAK_SECONDS", 120);
    let fault_every = env_secs("SOAK_FAULT_SECONDS", 20);
    let schedule = match faults::Kind::schedule(std::env::var("SOAK_FAULTS").ok().as_deref()) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => {
            eprintln!("soak: SOAK_FAULTS names no fault");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    demo::exit_status("soak", run(&binary, seconds, fault_every, &schedule))
}

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// The running system: agents first, so that they stop before the topology goes.
pub(crate) struct Soak {
    agents: Vec<NodeAgent>,
    /// The inventory as the agents read it now.
    pub(crate) inventory: Inventory,
    /// The inventory as it was at the start (faults put it back).
    pub(crate) original_inventory: Inventory,
    /// The internal server's echo servers for the [`capacity`] faults.
    _capacity: Vec<tests::traffic::Server>,
    /// The namespaces, gateways and servers.
    pub(crate) topo: Topology,
    /// Counters of gateway incarnations that ended (banked before a kill or a drain), per gateway.
    banked: BTreeMap<usize, Counters>,
    /// Processes whose exit is expected (a fault is about to end them).
    expected_exits: Vec<usize>,
    /// Exits nobody asked for.
    unexpected: Vec<String>,
    /// Memory samples per process incarnation.
    rss: BTreeMap<(String, u32), Vec<(Instant, u64)>>,
    /// Scrapes whose packet counters were checked for balance, and what was found in those that did
    /// not balance.
    balance_checks: u64,
    imbalances: Vec<String>,
}

/// Counters summed over a gateway's incarnations.
#[derive(Debug, Default, Clone)]
struct Counters {
    flows: f64,
    bytes: f64,
    drops: BTreeMap<String, f64>,
    takeovers: f64,
}

impl Counters {
    fn of(m: &tests::Metrics) -> Self {
        Self {
            flows: scenario::value(m, "egress_gateway_flows_created_total", &[]),
            bytes: scenario::value(m, "egress_gateway_bytes_total", &[]),
            drops: scenario::drops(m),
            takeovers: scenario::value(m, "egress_gateway_sync_takeovers_total", &[]),
        }
    }

    fn add(&mut self, other: &Self) {
        self.flows += other.flows;
        self.bytes += other.bytes;
        self.takeovers += other.takeovers;
        for (r, v) in &other.drops {
            *self.drops.entry(r.clone()).or_insert(0.0) += v;
        }
    }
}

impl Soak {
    fn start(binary: &std::path::Path) -> Result<Self> {
        let mode = GatewayMode::Userspace {
            binary: binary.to_path_buf(),
        };
        let mut spec = TopologySpec::node_agent(&[3, 4], vec![mode.clone(), mode]);
        spec.max_per_source = Some(capacity::QUOTA);
        spec.ports = Some(capacity::PORTS);
        spec.sync_sets = vec![vec![1, 2]];
        spec.conntrack = TIMEOUTS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut topo = Topology::build(spec).context("build the topology")?;
        for k in 1..=2 {
            topo.gateway_mut(k)
                .wait_ready(Duration::from_secs(60))
                .with_context(|| format!("gateway {k} ready"))?;
        }
        let mut inventory = Inventory::new();
        inventory
            .policy(Policy::new(
                "soak",
                vec![
                    PolicyRule::via(Ipv4Net::default(), "red"),
                    PolicyRule::via(Ipv6Net::default(), "red"),
                ],
            ))
            .namespace_with_policy("app", "soak");
        for (n, m) in PODS {
            inventory.client_pod("app", &format!("pod-{n}-{m}"), topo.pod(n, m));
        }
        for k in 1..=2 {
            inventory.gateway_pod(k, "red", true);
        }
        let path = topo.dir().join("inventory.yaml");
        inventory.write(&path)?;
        let mut agents = Vec::new();
        for n in 1..=2 {
            let config = AgentConfig::for_node(n, vec![path.clone()]);
            let mut agent = NodeAgent::start(&topo, binary, n, config)?;
            agent
                .wait_ready(Duration::from_secs(60))
                .with_context(|| format!("node agent {n} ready"))?;
            agents.push(agent);
        }
        let capacity = capacity::start(&topo)?;
        let soak = Self {
            agents,
            _capacity: capacity,
            original_inventory: inventory.clone(),
            inventory,
            topo,
            banked: BTreeMap::new(),
            expected_exits: Vec::new(),
            unexpected: Vec::new(),
            rss: BTreeMap::new(),
            balance_checks: 0,
            imbalances: Vec::new(),
        };
        soak.wait_steered()?;
        Ok(soak)
    }

    /// Waits until every pod's default route on its node goes over both replicas.
    fn wait_steered(&self) -> Result<()> {
        let both = RouteShape::Via(
            (1..=2)
                .map(|k| IpAddr::V4(self.topo.gateway(k).ip))
                .collect(),
        );
        for (n, m) in PODS {
            let node = &self.topo.node(n).ns;
            let pod = IpAddr::V4(self.topo.pod(n, m).ip);
            scenario::poll(
                Duration::from_secs(20),
                Duration::from_millis(50),
                "the pod's default route over both replicas",
                || {
                    let table =
                        tests::agent::rule_table(node, pod, tests::topology::POD_RULE_PRIORITY)
                            .ok()??;
                    let route =
                        tests::agent::table_route(node, table, Ipv4Net::default().into()).ok()?;
                    (route.as_ref() == Some(&both)).then_some(())
                },
            )
            .with_context(|| format!("pod ({n},{m})"))?;
        }
        Ok(())
    }

    /// Banks gateway `k`'s counters before its incarnation ends.
    pub(crate) fn bank(&mut self, k: usize) {
        if let Ok(m) = self.topo.gateway(k).metrics() {
            self.banked.entry(k).or_default().add(&Counters::of(&m));
        }
    }

    /// Gateway `k`'s exit is about to be caused on purpose.
    pub(crate) fn expect_exit(&mut self, k: usize) {
        self.expected_exits.push(k);
    }

    /// Gateway `k` runs again: any exit from now on is unexpected.
    pub(crate) fn expect_running(&mut self, k: usize) {
        self.expected_exits.retain(|&x| x != k);
    }

    /// Gateway `k`'s process.
    pub(crate) fn gateway_process(&mut self, k: usize) -> Result<&mut Process> {
        self.topo
            .gateway_mut(k)
            .process_mut()
            .ok_or_else(|| tests::Error::msg(format!("gateway {k} has no process")))
    }

    /// Gateway `k`'s configuration file.
    pub(crate) fn config_path(&self, k: usize) -> Result<PathBuf> {
        self.topo
            .gateway(k)
            .config_path()
            .map(std::path::Path::to_path_buf)
            .ok_or_else(|| tests::Error::msg(format!("gateway {k} has no configuration file")))
    }

    /// Node `n`'s agent.
    pub(crate) fn agent_mut(&mut self, n: usize) -> Result<&mut NodeAgent> {
        self.agents
            .get_mut(n - 1)
            .ok_or_else(|| tests::Error::msg(format!("no agent on node {n}")))
    }

    /// Rewrites the inventory both agents read.
    pub(crate) fn set_inventory(&mut self, inventory: Inventory) -> Result<()> {
        self.agents[0].write_inventory(&inventory)?;
        self.inventory = inventory;
        Ok(())
    }

    /// Notes any process that exited without being asked to (and starts it again, so that the run
    /// goes on and shows what else breaks).
    fn watch_processes(&mut self) {
        for k in 1..=2 {
            if self.expected_exits.contains(&k) {
                continue;
            }
            let exited = match self.topo.gateway_mut(k).process_mut() {
                Some(p) => p.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                let tail = self
                    .topo
                    .gateway(k)
                    .process()
                    .map(|p| p.log_tail(20))
                    .unwrap_or_default();
                self.unexpected
                    .push(format!("gateway {k} exited ({status}); log tail:\n{tail}"));
                let gw = self.topo.gateway_mut(k);
                let _ = gw
                    .respawn()
                    .and_then(|()| gw.wait_ready(Duration::from_secs(60)));
            }
        }
        for agent in &mut self.agents {
            if !agent.is_running() {
                self.unexpected.push(format!(
                    "node agent {} exited; log tail:\n{}",
                    agent.node(),
                    agent.log_tail(20)
                ));
                let _ = agent.restart();
            }
        }
    }

    /// Samples every process's resident memory.
    fn sample_rss(&mut self) {
        let mut pids = Vec::new();
        for k in 1..=2 {
            if let Some(p) = self.topo.gateway(k).process() {
                pids.push((format!("gateway {k}"), p.pid()));
            }
        }
        for a in &self.agents {
            if let Some(pid) = a.pid() {
                pids.push((format!("agent {}", a.node()), pid));
            }
        }
        let now = Instant::now();
        for (name, pid) in pids {
            if let Some(kib) = rss_kib(pid) {
                self.rss.entry((name, pid)).or_default().push((now, kib));
            }
        }
    }

    /// Checks that each live gateway's packet counters balance (docs/metrics.md, "Every packet is
    /// accounted for"): recomputed from the published counters, and as the gateway reports it.
    fn check_balance(&mut self) {
        for k in 1..=2 {
            let Ok(m) = self.topo.gateway(k).metrics() else {
                continue;
            };
            self.balance_checks += 1;
            let recomputed = scenario::unaccounted(&m);
            let reported = scenario::value(&m, "egress_gateway_packets_unaccounted", &[]);
            if recomputed != 0.0 || reported != 0.0 {
                self.imbalances.push(format!(
                    "gateway {k}: {recomputed} packets unaccounted for by the counters, {reported} by its \
                     own gauge (received {})",
                    scenario::value(&m, "egress_gateway_packets_total", &[("direction", "tunnel_rx")])
                        + scenario::value(
                            &m,
                            "egress_gateway_packets_total",
                            &[("direction", "uplink_rx")]
                        )
                ));
            }
        }
    }

    /// Every gateway's counters, banked incarnations and the live one summed.
    fn totals(&self) -> Counters {
        let mut out = Counters::default();
        for k in 1..=2 {
            if let Some(b) = self.banked.get(&k) {
                out.add(b);
            }
            if let Ok(m) = self.topo.gateway(k).metrics() {
                out.add(&Counters::of(&m));
            }
        }
        out
    }
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The invariants, each held or broken with what broke it.
#[derive(Default)]
struct Verdict {
    checks: Vec<(String, Option<String>)>,
}

impl Verdict {
    fn check(&mut self, what: &str, broken: Option<String>) {
        self.checks.push((what.to_owned(), broken));
    }

    fn held(&self) -> bool {
        self.checks.iter().all(|(_, b)| b.is_none())
    }
}

fn run(
    binary: &std::path::Path,
    seconds: Duration,
    fault_every: Duration,
    schedule: &[faults::Kind],
) -> Result<bool> {
    let began = Instant::now();
    println!(
        "soak: {} s of traffic, a fault every {} s after {} s, then up to {} s for the tables to empty",
        seconds.as_secs(),
        fault_every.as_secs(),
        WARM_UP.as_secs(),
        DRAIN_WAIT.as_secs()
    );
    let mut soak = Soak::start(binary)?;
    println!("soak: topology up in {:?}", began.elapsed());
    let load = load::Load::start(&soak.topo)?;
    let hostile = hostile::Hostile::start(&soak.topo)?;
    let start = Instant::now();
    let mut records: Vec<faults::Record> = Vec::new();
    let mut next_fault = start + WARM_UP;
    let mut next_rss = start;
    let mut next_progress = start + Duration::from_secs(60);
    while start.elapsed() < seconds && !demo::interrupted() {
        soak.watch_processes();
        let now = Instant::now();
        if now >= next_rss {
            soak.sample_rss();
            next_rss = now + RSS_EVERY;
        }
        if now >= next_progress {
            soak.check_balance();
            progress(start, &load, &records);
            next_progress = now + Duration::from_secs(60);
        }
        // A fault may not start so late that its recovery would run past the end.
        if now >= next_fault && start.elapsed() + Duration::from_secs(10) < seconds {
            let r = faults::inject(&mut soak, schedule, records.len());
            println!(
                "soak: {:>6.1} s  fault {:>3}: {}{} ({:.1} s){}",
                r.began.duration_since(start).as_secs_f64(),
                records.len() + 1,
                r.kind.name(),
                if r.target > 0 {
                    format!(" [{}]", r.target)
                } else {
                    String::new()
                },
                r.ended.duration_since(r.began).as_secs_f64(),
                match (&r.broken, &r.detail) {
                    (Some(b), _) => format!("  BROKEN: {b}"),
                    (None, Some(d)) => format!(": {d}"),
                    (None, None) => String::new(),
                }
            );
            records.push(r);
            soak.check_balance();
            next_fault = Instant::now() + fault_every;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let ran = start.elapsed();
    println!("soak: traffic stopped after {ran:?}; checking");
    let lanes = load.stop()?;
    let hostile = hostile.finish()?;
    soak.watch_processes();
    soak.sample_rss();
    soak.check_balance();
    let totals = soak.totals();

    let mut v = Verdict::default();
    v.check(
        "no process exited unless a fault asked it to",
        (!soak.unexpected.is_empty()).then(|| soak.unexpected.join("\n")),
    );
    v.check("no panic in any log", panics(&soak));
    v.check(
        "every fault did what it must (reloads applied or refused, drains exit 0, replicas ready again)",
        {
            let b: Vec<String> = records
                .iter()
                .filter_map(|r| {
                    r.broken
                        .as_ref()
                        .map(|b| format!("{} [{}]: {b}", r.kind.name(), r.target))
                })
                .collect();
            (!b.is_empty()).then(|| b.join("\n"))
        },
    );
    v.check(
        &format!(
            "the packet counters balance (received = forwarded + dropped + answered + neighbour frames) in \
             each of {} scrapes",
            soak.balance_checks
        ),
        (!soak.imbalances.is_empty()).then(|| soak.imbalances.join("\n")),
    );
    check_lanes(&mut v, &lanes, start);
    check_hostile(&mut v, &hostile, &totals);
    check_rss(&mut v, &soak, ran);
    let baseline = baseline(&soak);
    v.check(
        "flow tables, port pools and sync copies return to empty after the traffic stops",
        baseline.as_ref().err().cloned(),
    );

    let text = summary(
        &soak, ran, &records, &lanes, &hostile, &totals, &v, &baseline,
    );
    println!("{text}");
    if !v.held() {
        // The topology's directory (every process's log and configuration) outlives the run.
        std::env::set_var("EGRESS_KEEP_LOGS", "1");
        println!(
            "soak: logs and configurations kept in {}",
            soak.topo.dir().display()
        );
    }
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        std::fs::write(&path, &text).with_context(|| format!("write {path}"))?;
    }
    Ok(v.held() && !demo::interrupted())
}

/// One line a minute: what the lanes carried so far, and faults injected.
fn progress(start: Instant, load: &load::Load, records: &[faults::Record]) {
    let lanes = load.snapshot();
    let ok: u64 = lanes.iter().map(|l| l.tally.ok).sum();
    let failed: usize = lanes.iter().map(|l| l.tally.failures.len()).sum();
    let bytes: u64 = lanes.iter().map(|l| l.tally.bytes).sum();
    println!(
        "soak: {:>6.0} s  {ok} operations, {:.1} MiB checked, {failed} failures, {} faults",
        start.elapsed().as_secs_f64(),
        bytes as f64 / f64::from(1 << 20),
        records.len()
    );
}

/// "panicked" in any gateway or agent log of the run (every incarnation's log is in the topology's
/// directory).
fn panics(soak: &Soak) -> Option<String> {
    let dir = soak.topo.dir();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
                found.push(format!("{}: {line}", path.display()));
            }
        }
    }
    (!found.is_empty()).then(|| found.join("\n"))
}

fn check_lanes(v: &mut Verdict, lanes: &[load::LaneReport], start: Instant) {
    let failures: Vec<String> = lanes
        .iter()
        .flat_map(|l| {
            l.tally.failures.iter().take(5).map(move |(at, f)| {
                format!(
                    "{:>7.1} s  {}: {f}",
                    at.saturating_duration_since(start).as_secs_f64(),
                    l.name
                )
            })
        })
        .collect();
    v.check(
        "every TCP exchange, connection and transfer completed with its bytes intact; no UDP answer or datagram corrupted or duplicated",
        (!failures.is_empty()).then(|| failures.join("\n")),
    );
    let reconnected: Vec<String> = lanes
        .iter()
        .filter(|l| l.name.starts_with("session") && l.tally.connections != 1)
        .map(|l| format!("{}: {} connections", l.name, l.tally.connections))
        .collect();
    v.check(
        "each long session kept its one connection through every fault",
        (!reconnected.is_empty()).then(|| reconnected.join(", ")),
    );
    let idle: Vec<String> = lanes
        .iter()
        .filter(|l| l.tally.ok == 0)
        .map(|l| l.name.to_owned())
        .collect();
    v.check(
        "every lane carried traffic",
        (!idle.is_empty()).then(|| idle.join(", ")),
    );
}

fn check_hostile(v: &mut Verdict, hostile: &hostile::HostileReport, totals: &Counters) {
    let delivered: Vec<String> = hostile
        .kinds
        .iter()
        .filter(|k| k.delivered.is_some_and(|d| d > 0))
        .map(|k| format!("{}: {} delivered", k.kind, k.delivered.unwrap_or(0)))
        .collect();
    v.check(
        "no hostile packet reached an outside server or an inside pod",
        (!delivered.is_empty()).then(|| delivered.join(", ")),
    );
    let uncounted: Vec<String> = hostile
        .kinds
        .iter()
        .filter(|k| k.sent > 0 && !k.reasons.is_empty())
        .filter(|k| {
            k.reasons
                .iter()
                .map(|r| totals.drops.get(*r).copied().unwrap_or(0.0))
                .sum::<f64>()
                == 0.0
        })
        .map(|k| format!("{} (looked under {})", k.kind, k.reasons.join(", ")))
        .collect();
    v.check(
        "every kind of hostile input was dropped and counted under its reason",
        (!uncounted.is_empty()).then(|| uncounted.join(", ")),
    );
}

fn check_rss(v: &mut Verdict, soak: &Soak, ran: Duration) {
    let mut broken = Vec::new();
    for ((name, pid), samples) in &soak.rss {
        let limit = RSS_LIMIT_MIB
            .iter()
            .find(|(p, _)| name.starts_with(p))
            .map_or(u64::MAX, |(_, l)| *l);
        let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
        if peak > limit * 1024 {
            broken.push(format!(
                "{name} (pid {pid}): {} MiB > {limit} MiB",
                peak / 1024
            ));
        }
        // Growth: over a long life, the second half's peak may not exceed the first half's by more than
        // the slack.
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            continue;
        };
        let life = last.0.duration_since(first.0);
        if life >= Duration::from_secs(600) && ran >= Duration::from_secs(600) {
            let mid = first.0 + life / 2;
            let half = |late: bool| {
                samples
                    .iter()
                    .filter(|s| (s.0 >= mid) == late)
                    .map(|s| s.1)
                    .max()
                    .unwrap_or(0)
            };
            let (early, late) = (half(false), half(true));
            if late > early + RSS_SLACK_MIB * 1024 {
                broken.push(format!(
                    "{name} (pid {pid}): grew from {} MiB to {} MiB between the halves of its life",
                    early / 1024,
                    late / 1024
                ));
            }
        }
    }
    v.check(
        &format!(
            "memory bounded (peak ≤ {} MiB per gateway, {} MiB per agent; runs of 10 min or more: the second half's peak ≤ the first's + {RSS_SLACK_MIB} MiB)",
            RSS_LIMIT_MIB[0].1, RSS_LIMIT_MIB[1].1
        ),
        (!broken.is_empty()).then(|| broken.join("\n")),
    );
}

/// Waits until both gateways' flow tables, port pools and sync copies are empty; how long it took.
fn baseline(soak: &Soak) -> std::result::Result<Duration, String> {
    let start = Instant::now();
    let gauges = [
        "egress_gateway_conntrack_entries",
        "egress_gateway_ports_in_use",
        "egress_gateway_sync_copies",
    ];
    loop {
        let mut left = Vec::new();
        for k in 1..=2 {
            match soak.topo.gateway(k).metrics() {
                Ok(m) => {
                    for g in gauges {
                        let v = scenario::value(&m, g, &[]);
                        if v != 0.0 {
                            left.push(format!("gateway {k}: {g} {v}"));
                        }
                    }
                }
                Err(e) => left.push(format!("gateway {k}: {e}")),
            }
        }
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > DRAIN_WAIT || demo::interrupted() {
            return Err(format!("after {:?}: {}", start.elapsed(), left.join(", ")));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The worst stall a long session saw within a fault's window (from its start to 10 s after its end).
fn worst_stall(lanes: &[load::LaneReport], r: &faults::Record) -> Option<Duration> {
    let from = r
        .began
        .checked_sub(Duration::from_millis(500))
        .unwrap_or(r.began);
    let to = r.ended + Duration::from_secs(10);
    lanes
        .iter()
        .filter(|l| l.name.starts_with("session"))
        .flat_map(|l| l.tally.stalls.iter())
        .filter(|(at, _)| *at >= from && *at <= to)
        .map(|(_, d)| *d)
        .max()
}

#[allow(clippy::too_many_arguments)]
fn summary(
    soak: &Soak,
    ran: Duration,
    records: &[faults::Record],
    lanes: &[load::LaneReport],
    hostile: &hostile::HostileReport,
    totals: &Counters,
    v: &Verdict,
    baseline: &std::result::Result<Duration, String>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n==== soak summary ====");
    let _ = writeln!(
        s,
        "traffic for {:.0} s; flows created {:.0}; bytes through the gateways {:.1} GiB; takeovers {:.0}",
        ran.as_secs_f64(),
        totals.flows,
        totals.bytes / f64::from(1 << 30),
        totals.takeovers
    );
    let _ = writeln!(
        s,
        "\nlanes (ok / lost / failed; checked bytes; connections; stalls ≥ 200 ms, worst):"
    );
    for l in lanes {
        let t = &l.tally;
        let worst = t.stalls.iter().map(|s| s.1).max().unwrap_or_default();
        let _ = writeln!(
            s,
            "  {:<18} {:>9} / {:>6} / {:>3}  {:>10.1} MiB  {:>7} conns  {:>4} stalls, worst {:>6} ms",
            l.name,
            t.ok,
            t.lost,
            t.failures.len(),
            t.bytes as f64 / f64::from(1 << 20),
            t.connections,
            t.stalls.len(),
            worst.as_millis()
        );
    }
    let _ = writeln!(
        s,
        "\nfaults (count; worst stall of a long session within the fault's window):"
    );
    let mut by_kind: BTreeMap<faults::Kind, (usize, Duration)> = BTreeMap::new();
    for r in records {
        let e = by_kind.entry(r.kind).or_default();
        e.0 += 1;
        e.1 = e.1.max(worst_stall(lanes, r).unwrap_or_default());
    }
    for (kind, (n, worst)) in &by_kind {
        let _ = writeln!(
            s,
            "  {:<34} {:>4}  worst stall {:>6} ms",
            kind.name(),
            n,
            worst.as_millis()
        );
        // What the last one of a kind that reports more saw (the capacity faults' counts).
        if let Some(d) = records
            .iter()
            .rev()
            .find(|r| r.kind == *kind)
            .and_then(|r| r.detail.as_ref())
        {
            let _ = writeln!(s, "      last: {d}");
        }
    }
    let _ = writeln!(
        s,
        "\nhostile input (sent; send errors; reached a sink; drops counted under its reasons):"
    );
    for k in &hostile.kinds {
        let counted: f64 = k
            .reasons
            .iter()
            .map(|r| totals.drops.get(*r).copied().unwrap_or(0.0))
            .sum();
        let _ = writeln!(
            s,
            "  {:<22} {:>8}  {:>6}  {:>6}  {}\n      ({})",
            k.kind,
            k.sent,
            k.send_errors,
            k.delivered.map_or("-".to_owned(), |d| d.to_string()),
            if k.reasons.is_empty() {
                "(no drop reason required)".to_owned()
            } else {
                format!("{counted:.0} drops under {}", k.reasons.join("/"))
            },
            k.what
        );
    }
    let _ = writeln!(s, "\ndrops by reason (both gateways, every incarnation):");
    for (r, n) in &totals.drops {
        let _ = writeln!(s, "  {r:<28} {n:.0}");
    }
    let _ = writeln!(s, "\npeak RSS per process:");
    let mut peaks: BTreeMap<&str, u64> = BTreeMap::new();
    for ((name, _), samples) in &soak.rss {
        let p = samples.iter().map(|s| s.1).max().unwrap_or(0);
        let e = peaks.entry(name).or_default();
        *e = (*e).max(p);
    }
    for (name, kib) in peaks {
        let _ = writeln!(s, "  {name:<10} {:.1} MiB", kib as f64 / 1024.0);
    }
    if let Ok(d) = baseline {
        let _ = writeln!(
            s,
            "\ntables empty {:.0} s after the traffic stopped",
            d.as_secs_f64()
        );
    }
    let _ = writeln!(s, "\ninvariants:");
    for (what, broken) in &v.checks {
        match broken {
            None => {
                let _ = writeln!(s, "  held    {what}");
            }
            Some(b) => {
                let _ = writeln!(
                    s,
                    "  BROKEN  {what}\n          {}",
                    b.replace('\n', "\n          ")
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\nsoak: {}",
        if v.held() {
            "every invariant held"
        } else {
            "INVARIANTS BROKEN"
        }
    );
    s
}
