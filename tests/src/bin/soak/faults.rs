//! The faults the soak injects, one at a time on a fixed schedule, and how each is done and checked.
//!
//! Each fault leaves the system as it found it (a killed replica is restarted and waited for, a link that
//! went down comes back up, an edit is undone), so the next one starts from a healthy set. What a fault
//! itself must hold (a refused reload keeps the old configuration, a drained replica exits 0) is checked
//! here and reported as a broken invariant by the caller.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tests::agent::{self, RouteShape};
use tests::scenario;
use tests::topology::{BLUE_NET, POD_RULE_PRIORITY};
use tests::{PolicyRule, Result};

use crate::Soak;

/// How long a drain by hand-over may take (measured: 1.0–1.3 s).
const HAND_OVER: Duration = Duration::from_secs(10);
/// How long a replica may take to become ready (after a restart it first takes its peer's flows in bulk).
const READY: Duration = Duration::from_secs(60);

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// SIGKILL of a replica, restarted 2 s later.
    Kill,
    /// SIGHUP after an edit the gateway must refuse; the file is then put back.
    ReloadInvalid,
    /// SIGTERM: the replica drains (hands its flows to the other), exits 0, and is restarted.
    Drain,
    /// An EgressGatewayPolicy edit (a rule added, then removed), applied by both node agents.
    PolicyEdit,
    /// The node agent of one node restarted.
    AgentRestart,
    /// A replica's DMZ uplink down for 2 s.
    UplinkFlap,
    /// The DMZ router's MAC address changed.
    RouterMac,
    /// SIGHUP after a valid edit (a route added to the internal uplink), then undone the same way.
    ReloadValid,
    /// One pod opens more flows than its quota ([`capacity`](crate::capacity)).
    PodQuota,
    /// Two pods exhaust the port pool of the internal egress IPs ([`capacity`](crate::capacity)).
    PortPool,
}

impl Kind {
    /// The schedule, repeated: the replicas alternate as targets.
    pub(crate) const SCHEDULE: [Kind; 10] = [
        Kind::Kill,
        Kind::ReloadInvalid,
        Kind::PodQuota,
        Kind::Drain,
        Kind::PolicyEdit,
        Kind::AgentRestart,
        Kind::UplinkFlap,
        Kind::PortPool,
        Kind::RouterMac,
        Kind::ReloadValid,
    ];

    /// Its short name (`SOAK_FAULTS` takes a comma-separated list of them).
    pub(crate) fn id(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::ReloadInvalid => "reload-invalid",
            Kind::Drain => "drain",
            Kind::PolicyEdit => "policy-edit",
            Kind::AgentRestart => "agent-restart",
            Kind::UplinkFlap => "uplink-flap",
            Kind::RouterMac => "router-mac",
            Kind::ReloadValid => "reload-valid",
            Kind::PodQuota => "pod-quota",
            Kind::PortPool => "port-pool",
        }
    }

    /// The schedule: [`SCHEDULE`](Self::SCHEDULE), or the faults `list` names (comma-separated ids) in its
    /// order.
    pub(crate) fn schedule(list: Option<&str>) -> Result<Vec<Kind>> {
        let Some(list) = list else {
            return Ok(Self::SCHEDULE.to_vec());
        };
        list.split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(|w| {
                Self::SCHEDULE
                    .into_iter()
                    .find(|k| k.id() == w)
                    .ok_or_else(|| {
                        let ids: Vec<&str> = Self::SCHEDULE.iter().map(|k| k.id()).collect();
                        tests::Error::msg(format!(
                            "SOAK_FAULTS: no fault `{w}`; the faults are {}",
                            ids.join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// Its name in the summary.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Kill => "replica SIGKILL + restart",
            Kind::ReloadInvalid => "invalid config + SIGHUP",
            Kind::Drain => "replica SIGTERM drain + restart",
            Kind::PolicyEdit => "policy edit",
            Kind::AgentRestart => "node agent restart",
            Kind::UplinkFlap => "uplink down 2 s",
            Kind::RouterMac => "DMZ router MAC change",
            Kind::ReloadValid => "valid config edit + SIGHUP",
            Kind::PodQuota => "pod over its flow quota",
            Kind::PortPool => "egress IP's port pool exhausted",
        }
    }
}

/// One fault injected.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// What.
    pub(crate) kind: Kind,
    /// On which replica or node (0: none in particular).
    pub(crate) target: usize,
    /// When it began.
    pub(crate) began: Instant,
    /// When the system was whole again (restarted replica ready, link up, edit undone).
    pub(crate) ended: Instant,
    /// What went wrong that the fault itself must not do (a broken invariant), if anything.
    pub(crate) broken: Option<String>,
    /// What it saw, when it has more to say than that it held.
    pub(crate) detail: Option<String>,
}

/// Injects fault number `n` of `schedule`.
pub(crate) fn inject(soak: &mut Soak, schedule: &[Kind], n: usize) -> Record {
    let kind = schedule[n % schedule.len()];
    // Alternate the replica (and node) between rounds of the schedule.
    let len = schedule.len();
    let target = 1 + if len % 2 == 1 {
        n % 2
    } else {
        (n / len + n) % 2
    };
    let began = Instant::now();
    let done = |r: Result<()>| r.map(|()| None);
    let outcome: Result<Option<String>> = match kind {
        Kind::Kill => done(kill(soak, target)),
        Kind::ReloadInvalid => done(reload_invalid(soak, target)),
        Kind::Drain => done(drain(soak, target)),
        Kind::PolicyEdit => done(policy_edit(soak)),
        Kind::AgentRestart => done(agent_restart(soak, target)),
        Kind::UplinkFlap => done(uplink_flap(soak, target)),
        Kind::RouterMac => done(router_mac(soak, n)),
        Kind::ReloadValid => done(reload_valid(soak, target)),
        Kind::PodQuota => crate::capacity::pod_quota(soak, n).map(Some),
        Kind::PortPool => crate::capacity::port_pool(soak, n).map(Some),
    };
    let (broken, detail) = match outcome {
        Ok(detail) => (None, detail),
        Err(e) => (Some(e.to_string()), None),
    };
    Record {
        kind,
        target: if matches!(
            kind,
            Kind::RouterMac | Kind::PolicyEdit | Kind::PodQuota | Kind::PortPool
        ) {
            0
        } else {
            target
        },
        began,
        ended: Instant::now(),
        broken,
        detail,
    }
}

fn kill(soak: &mut Soak, k: usize) -> Result<()> {
    soak.bank(k);
    soak.expect_exit(k);
    soak.gateway_process(k)?.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(2));
    restart(soak, k)
}

fn drain(soak: &mut Soak, k: usize) -> Result<()> {
    soak.bank(k);
    soak.expect_exit(k);
    let p = soak.gateway_process(k)?;
    let term = Instant::now();
    p.signal(libc::SIGTERM);
    let status = p.wait_timeout(Duration::from_secs(45));
    let took = term.elapsed();
    let outcome = match status {
        // Its peer is in sync (the schedule waits for readiness after every restart): it hands over in
        // about a second (docs/failover.md) rather than waiting out drain_seconds (30 s).
        Ok(s) if s.success() && took > HAND_OVER => Err(tests::Error::msg(format!(
            "gateway {k} exited {took:?} after SIGTERM: it waited out its drain instead of handing over"
        ))),
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(tests::Error::msg(format!(
            "gateway {k} drained but exited {s}"
        ))),
        Err(e) => Err(tests::Error::msg(format!(
            "gateway {k} did not exit after SIGTERM: {e}"
        ))),
    };
    restart(soak, k)?;
    outcome
}

/// Starts replica `k` again and waits until it is ready (its peer's flows back in bulk).
fn restart(soak: &mut Soak, k: usize) -> Result<()> {
    let gw = soak.topo.gateway_mut(k);
    gw.respawn()?;
    gw.wait_ready(READY)?;
    soak.expect_running(k);
    Ok(())
}

/// The internal uplink's routes in the generated configuration, and the edit the valid reload makes.
const ROUTES: (&str, &str) = (
    "routes: [10.50.0.0/16",
    "routes: [10.50.0.0/16, 10.60.0.0/16",
);

fn reload_valid(soak: &mut Soak, k: usize) -> Result<()> {
    let path = soak.config_path(k)?;
    let text = std::fs::read_to_string(&path)?;
    let edited = scenario::edit_once(&text, ROUTES.0, ROUTES.1)?;
    let result = (|| -> Result<()> {
        reload(soak, k, &path, &edited, "applied")?;
        std::thread::sleep(Duration::from_secs(2));
        reload(soak, k, &path, &text, "applied")
    })();
    // Whatever happened, the file ends as it began.
    scenario::write_atomically(&path, &text)?;
    result
}

fn reload_invalid(soak: &mut Soak, k: usize) -> Result<()> {
    let path = soak.config_path(k)?;
    let text = std::fs::read_to_string(&path)?;
    let broken = scenario::edit_once(&text, "workers: ", "workers: many # ")?;
    let result = reload(soak, k, &path, &broken, "refused");
    scenario::write_atomically(&path, &text)?;
    result?;
    // Still forwarding with what it had: ready.
    if scenario::readiness(soak.topo.gateway(k))? != 200 {
        tests::bail!("gateway {k} is not ready after refusing a reload");
    }
    Ok(())
}

/// Writes `text` to gateway `k`'s configuration, sends SIGHUP, and waits until its reload counter
/// `result` (`applied` or `refused`) grows.
fn reload(
    soak: &mut Soak,
    k: usize,
    path: &std::path::Path,
    text: &str,
    result: &str,
) -> Result<()> {
    let labels = [("result", result)];
    let name = "egress_gateway_config_reloads_total";
    let before = scenario::value(&soak.topo.gateway(k).metrics()?, name, &labels);
    scenario::write_atomically(path, text)?;
    soak.gateway_process(k)?.signal(libc::SIGHUP);
    scenario::wait_metric(
        soak.topo.gateway(k),
        name,
        &labels,
        Duration::from_secs(10),
        |v| v > before,
    )
    .map_err(|e| tests::Error::msg(format!("gateway {k}: reload not {result}: {e}")))?;
    Ok(())
}

/// Adds a rule sending the blue network nowhere (no gateway) to the pods' policy, waits until node 1's
/// agent has programmed it for pod (1, 1), then removes it and waits until it is gone.
fn policy_edit(soak: &mut Soak) -> Result<()> {
    let node = &soak.topo.node(1).ns;
    let pod = IpAddr::V4(soak.topo.pod(1, 1).ip);
    let Some(table) = agent::rule_table(node, pod, POD_RULE_PRIORITY)? else {
        tests::bail!("pod (1,1) has no rule at priority {POD_RULE_PRIORITY} on node 1");
    };
    let blue = IpNet::V4(BLUE_NET);
    let before = agent::table_route(node, table, blue)?;
    let mut edited = soak.inventory.clone();
    if let Some(p) = edited.policies.first_mut() {
        p.rules.insert(0, PolicyRule::no_gateway(BLUE_NET));
    }
    soak.set_inventory(edited)?;
    wait_route(soak, table, blue, |r| r != before.as_ref())
        .map_err(|e| tests::Error::msg(format!("the added rule: {e}")))?;
    let original = soak.original_inventory.clone();
    soak.set_inventory(original)?;
    wait_route(soak, table, blue, |r| r == before.as_ref())
        .map_err(|e| tests::Error::msg(format!("the removed rule: {e}")))?;
    Ok(())
}

/// Polls node 1's `table` until the route to `dst` satisfies `ok` (10 s at most); how long it took.
fn wait_route(
    soak: &Soak,
    table: u32,
    dst: IpNet,
    ok: impl Fn(Option<&RouteShape>) -> bool,
) -> Result<Duration> {
    let node = &soak.topo.node(1).ns;
    let start = Instant::now();
    loop {
        let now = agent::table_route(node, table, dst)?;
        if ok(now.as_ref()) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(10) {
            tests::bail!("table {table}, {dst}: still {now:?} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn agent_restart(soak: &mut Soak, n: usize) -> Result<()> {
    let agent = soak.agent_mut(n)?;
    agent.restart()?;
    agent.wait_ready(READY)
}

fn uplink_flap(soak: &mut Soak, k: usize) -> Result<()> {
    let ns = &soak.topo.gateway(k).ns;
    ns.ip("link set gwdmz down")?;
    std::thread::sleep(Duration::from_secs(2));
    ns.ip("link set gwdmz up")?;
    Ok(())
}

/// Gives the DMZ router's interface (the `dmz` bridge) a new MAC address, as a router replaced or failed
/// over to its standby does, without announcing it: the gateways must find it again themselves.
fn router_mac(soak: &mut Soak, n: usize) -> Result<()> {
    let mac = format!("02:d0:00:00:{:02x}:{:02x}", (n >> 8) & 0xff, n & 0xff);
    soak.topo
        .dmz_router()
        .ns
        .ip(&format!("link set dmz address {mac}"))?;
    Ok(())
}
