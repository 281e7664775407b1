//! Two replicas behind one selector: flows spread over both (ECMP), and when one dies the agent's health
//! probes take it out of the multipath route — measured from SIGKILL to the first echo answered again —
//! and put it back once it is ready again.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tests::agent::RouteShape;
use tests::scenario::{self, poll, UdpProbe};
use tests::topology::RED_SERVER;
use tests::{require_netns, require_node_agent, require_userspace_gateway, traffic};

use crate::common::{Env, OrDiag, READY};

/// Flows of the spread check (distinct source ports).
const FLOWS: usize = 48;
/// Failover must take less than this (the target is < 1 s).
const FAILOVER_LIMIT: Duration = Duration::from_secs(2);

/// Scenario 4: gateways 1 and 2 both labelled red in one rule. 48 UDP flows from one pod reach the red
/// server from both egress IPs. Then a probe flow (a request every 10 ms) goes through gateway X; X is
/// killed (SIGKILL): the time until the probe is answered again — now from the other gateway's egress IP —
/// is printed as `failover: NNN ms` and must stay under 2 s; the agent's route keeps only the survivor.
/// X restarted and ready is back in the multipath route within 2 s.
#[test]
fn ecmp_spreads_flows_and_fails_over_when_a_gateway_dies() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let mut env = Env::everything_via(
        &mode,
        &bin,
        &["red", "red"],
        "red",
        "replicas",
        &["client"],
        0,
    );
    let pod_ns_name = env.topo.pod(1, 1).ns.name().to_owned();
    let table = env.table_of(env.topo.pod(1, 1));
    let both = RouteShape::Via(vec![
        IpAddr::V4(env.topo.gateway(1).ip),
        IpAddr::V4(env.topo.gateway(2).ip),
    ]);
    env.wait_route(table, Ipv4Net::default(), &both, Duration::from_secs(5));
    let egress = |env: &Env, k: usize| IpAddr::V4(env.topo.gateway(k).dmz_egress);

    // ECMP: many flows, both egress IPs.
    let flows_addr = SocketAddr::from((RED_SERVER, 7100));
    let flows_srv =
        traffic::udp_echo_server(&env.topo.red().ns, flows_addr).or_diag(&env, "flow server");
    scenario::udp_flows(&env.topo.pod(1, 1).ns, flows_addr, FLOWS).or_diag(&env, "UDP flows");
    let seen: BTreeSet<IpAddr> = flows_srv.peers().iter().map(SocketAddr::ip).collect();
    let want: BTreeSet<IpAddr> = [egress(&env, 1), egress(&env, 2)].into();
    assert_eq!(
        seen, want,
        "{FLOWS} flows over a two-gateway multipath route must use both egress IPs"
    );

    // The probe flow and the gateway it uses.
    let probe_addr = SocketAddr::from((RED_SERVER, 7101));
    let probe_srv =
        traffic::udp_echo_server(&env.topo.red().ns, probe_addr).or_diag(&env, "probe server");
    let probe = UdpProbe::start(
        &env.topo.pod(1, 1).ns,
        probe_addr,
        Duration::from_millis(10),
    )
    .or_diag(&env, "probe");
    probe
        .wait_answer_after(Instant::now(), Duration::from_secs(5))
        .or_diag(&env, "the probe flow before the failure");
    let via = probe_srv
        .last_peer()
        .map(|p| p.ip())
        .or_diag(&env, "the probe's source at the server");
    let x = (1..=2)
        .find(|&k| egress(&env, k) == via)
        .unwrap_or_else(|| {
            env.fail(format!(
                "the probe arrived from {via}, no gateway's egress IP"
            ))
        });
    let other = 3 - x;
    eprintln!("probe flow {} goes through gateway {x}", probe.local_addr());

    // Kill X.
    let killed_at = Instant::now();
    match env.topo.gateway_mut(x).process_mut() {
        Some(p) => p.signal(libc::SIGKILL),
        None => env.fail(format!("gateway {x} has no process")),
    }
    let failover = probe
        .wait_answer_after(killed_at, Duration::from_secs(10))
        .or_diag(&env, "the probe after gateway X was killed");
    eprintln!("failover: {} ms", failover.as_millis());
    let now_via = poll(
        Duration::from_secs(1),
        Duration::from_millis(10),
        "",
        || {
            probe_srv
                .last_peer()
                .map(|p| p.ip())
                .filter(|ip| *ip == egress(&env, other))
        },
    );
    if now_via.is_err() {
        env.fail(format!(
            "after the failover the server sees the probe from {:?}, not gateway {other}'s egress IP",
            probe_srv.last_peer()
        ));
    }
    let only_other = RouteShape::Via(vec![IpAddr::V4(env.topo.gateway(other).ip)]);
    env.wait_route(
        table,
        Ipv4Net::default(),
        &only_other,
        Duration::from_secs(2),
    );
    if failover >= FAILOVER_LIMIT {
        env.fail(format!(
            "failover took {} ms, limit {} ms",
            failover.as_millis(),
            FAILOVER_LIMIT.as_millis()
        ));
    }

    // X comes back.
    env.topo
        .gateway_mut(x)
        .respawn()
        .or_diag(&env, "restart gateway X");
    env.topo
        .gateway_mut(x)
        .wait_ready(READY)
        .or_diag(&env, "gateway X ready again");
    let back = env.wait_route(table, Ipv4Net::default(), &both, Duration::from_secs(2));
    eprintln!(
        "gateway {x} back in the multipath route {} ms after it was ready",
        back.as_millis()
    );
    let (sent, answered) = probe.counts();
    eprintln!("probe ({pod_ns_name}): {sent} sent, {answered} answered");
    probe.stop().or_diag(&env, "probe thread");
}

/// Draining: two red replicas; pod A's route uses both. Gateway 1 gets SIGTERM and answers 503 `draining`
/// (its `drain_seconds` is 30 s): A's route keeps it (its established flows go on), but pod B, added to the
/// inventory while gateway 1 drains, gets a route through gateway 2 only. When gateway 1 is gone, A's route
/// drops it too.
#[test]
fn a_draining_gateway_keeps_its_pods_but_gets_no_new_ones() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let mut env = Env::everything_via(&mode, &bin, &["red", "red"], "red", "replicas", &["a"], 1);
    let (gw1, gw2) = (
        IpAddr::V4(env.topo.gateway(1).ip),
        IpAddr::V4(env.topo.gateway(2).ip),
    );
    let table_a = env.table_of(env.topo.pod(1, 1));
    let both = RouteShape::Via(vec![gw1, gw2]);
    env.wait_route(table_a, Ipv4Net::default(), &both, Duration::from_secs(5));

    match env.topo.gateway_mut(1).process_mut() {
        Some(p) => p.signal(libc::SIGTERM),
        None => env.fail("gateway 1 has no process"),
    }
    poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        "gateway 1 draining",
        || (scenario::readiness(env.topo.gateway(1)).ok() == Some(503)).then_some(()),
    )
    .or_diag(&env, "readiness");
    // Several probe intervals: the agent has seen `draining`, and kept gateway 1 in A's route.
    std::thread::sleep(Duration::from_millis(800));
    env.wait_route(table_a, Ipv4Net::default(), &both, Duration::from_secs(1));
    // The agent's metrics say so too.
    let m = tests::Metrics::parse(&env.agent.metrics_text().or_diag(&env, "agent /metrics"));
    let health = |gw: IpAddr, state: &str| {
        m.get(
            "egress_node_gateway_health",
            &[("gateway", &gw.to_string()), ("state", state)],
        )
    };
    assert_eq!(health(gw1, "draining"), Some(1.0));
    assert_eq!(health(gw2, "healthy"), Some(1.0));
    assert_eq!(m.get("egress_node_pods", &[]), Some(1.0));
    assert_eq!(m.get("egress_node_problems", &[]), Some(0.0));
    assert!(m.get("egress_node_reconcile_seconds", &[]).is_some());
    assert!(m.get("egress_node_health_transitions_total", &[]) >= Some(3.0));
    assert!(m.get("egress_node_reconciles_total", &[("result", "ok")]) >= Some(1.0));
    assert!(m.get("egress_node_kernel_changes_total", &[("op", "added")]) > Some(0.0));

    let mut inv = env.inventory.clone();
    inv.client_pod("app", "b", env.topo.pod(1, 2));
    env.set_inventory(inv);
    let table_b = env.table_of(env.topo.pod(1, 2));
    env.wait_route(
        table_b,
        Ipv4Net::default(),
        &RouteShape::Via(vec![gw2]),
        Duration::from_secs(3),
    );
    // A still has both while gateway 1 drains.
    env.wait_route(table_a, Ipv4Net::default(), &both, Duration::from_secs(1));

    // Gateway 1 exits (end of its drain, here cut short): A's route drops it.
    if let Some(p) = env.topo.gateway_mut(1).process_mut() {
        p.signal(libc::SIGKILL);
    }
    env.wait_route(
        table_a,
        Ipv4Net::default(),
        &RouteShape::Via(vec![gw2]),
        Duration::from_secs(2),
    );
}
