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

/// Clients that stall at a gateway's health port cannot make the agent fail it: 64 TCP connections to
/// gateway 1's port 8080 that send nothing or half a request, and a flood of malformed UDP datagrams at the
/// same port, held for 4 s while the agent probes every 200 ms (UDP, the default). The pod's route must keep
/// the gateway the whole time, the agent must see no health change, the gateway's own `GET /readiness` must
/// still answer at once, and the gateway must have counted the malformed datagrams and kept answering probes.
#[test]
fn stalled_clients_at_the_health_port_do_not_take_a_gateway_out() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let env = Env::everything_via(&mode, &bin, &["red"], "red", "single", &["client"], 0);
    let table = env.table_of(env.topo.pod(1, 1));
    let gw = env.topo.gateway(1);
    let via_gw = RouteShape::Via(vec![IpAddr::V4(gw.ip)]);
    env.wait_route(table, Ipv4Net::default(), &via_gw, Duration::from_secs(5));
    let transitions = |env: &Env| -> f64 {
        let text = env.agent.metrics_text().or_diag(env, "agent metrics");
        tests::Metrics::parse(&text)
            .get("egress_node_health_transitions_total", &[])
            .unwrap_or(0.0)
    };
    let probes = |env: &Env, result: &str| -> f64 {
        env.topo
            .gateway(1)
            .metrics()
            .or_diag(env, "gateway metrics")
            .get("egress_gateway_health_probes_total", &[("result", result)])
            .unwrap_or(0.0)
    };
    let (transitions_before, answered_before) = (transitions(&env), probes(&env, "answered"));

    let health = SocketAddr::from((gw.ip, tests::gateway::HEALTH_PORT));
    let node = &env.topo.node(1).ns;
    let stalled = node
        .run(Duration::from_secs(10), move || {
            (0..64)
                .map(|i| {
                    let mut s = std::net::TcpStream::connect(health)?;
                    if i % 2 == 1 {
                        std::io::Write::write_all(&mut s, b"GET /readi")?;
                    }
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .or_diag(&env, "the stalling connections")
        .or_diag(&env, "connect to the health port");
    let flood = node
        .thread(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            let until = Instant::now() + Duration::from_secs(4);
            let mut sent = 0u64;
            while Instant::now() < until {
                for len in [1usize, 15, 16, 17, 200] {
                    // 16 bytes of the wrong magic, and every other length: none is a probe request.
                    let _ = s.send_to(&vec![0x5a; len], health);
                    sent += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok::<u64, std::io::Error>(sent)
        })
        .or_diag(&env, "the UDP flood");

    let start = Instant::now();
    let mut slowest_get = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(4) {
        let now = agent_route(&env, table);
        if now.as_ref() != Some(&via_gw) {
            env.fail(format!(
                "after {:?} of stalled clients the pod's route is {now:?}, want {via_gw:?}",
                start.elapsed()
            ));
        }
        let t = Instant::now();
        let answer = env
            .topo
            .gateway(1)
            .http_get(tests::gateway::HEALTH_PORT, "/readiness");
        slowest_get = slowest_get.max(t.elapsed());
        if !matches!(answer, Ok((200, _))) {
            env.fail(format!(
                "GET /readiness beside the stalled clients: {answer:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = flood
        .join_timeout(Duration::from_secs(5))
        .or_diag(&env, "the flood thread")
        .or_diag(&env, "the flood");
    drop(stalled);
    let (transitions_after, answered_after, malformed) = (
        transitions(&env),
        probes(&env, "answered"),
        probes(&env, "malformed"),
    );
    println!(
        "stalled: 64 TCP connections + {sent} malformed datagrams for 4 s: slowest GET /readiness {slowest_get:?}, \
         probes answered {}, malformed counted {malformed}, health transitions {}",
        answered_after - answered_before,
        transitions_after - transitions_before
    );
    if transitions_after != transitions_before {
        env.fail("the agent saw a health change of a gateway that never failed");
    }
    if answered_after - answered_before < 10.0 {
        env.fail("the gateway answered fewer than 10 probes in 4 s (one every 200 ms expected)");
    }
    if malformed < 1.0 {
        env.fail("no malformed datagram was counted");
    }
    if slowest_get > Duration::from_secs(1) {
        env.fail(format!(
            "GET /readiness took {slowest_get:?} beside stalled clients"
        ));
    }
}

fn agent_route(env: &Env, table: u32) -> Option<RouteShape> {
    tests::agent::table_route(
        &env.topo.node(1).ns,
        table,
        ipnet::IpNet::V4(Ipv4Net::default()),
    )
    .unwrap_or(None)
}
