//! Three replicas behind one selector, on the resilient nexthop group the agent programs: when one dies,
//! only the flows it carried move — every flow on a surviving replica keeps its replica (and so its NAT
//! state and egress address) — and when it comes back, no busy flow moves to it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use tests::agent::{self, RouteShape};
use tests::scenario::{poll, UdpFlows};
use tests::topology::RED_SERVER;
use tests::{require_netns, require_node_agent, require_userspace_gateway, traffic};

use crate::common::{Env, OrDiag, READY};

/// Long-lived UDP flows from the pod (distinct source ports).
const FLOWS: usize = 96;
/// The replica that is killed: the first next hop, whose removal under hash-threshold (a multipath
/// route) would shift the other replicas' hash ranges too — so this test fails without resilient groups.
const KILLED: usize = 1;

/// The gateway (1..=3) whose egress IP the server saw `source` from.
fn carrier(env: &Env, source: Option<SocketAddr>) -> Option<usize> {
    let ip = source?.ip();
    (1..=3).find(|&k| IpAddr::V4(env.topo.gateway(k).dmz_egress) == ip)
}

/// Which gateway carries each flow, if every flow answered from a gateway's egress IP within `wait`.
fn carriers(env: &Env, flows: &UdpFlows, wait: Duration) -> Option<Vec<usize>> {
    flows
        .sources(wait)
        .into_iter()
        .map(|s| carrier(env, s))
        .collect()
}

fn count(carriers: &[usize]) -> BTreeMap<usize, usize> {
    let mut n = BTreeMap::new();
    for &k in carriers {
        *n.entry(k).or_default() += 1;
    }
    n
}

/// Gateways 1–3 labelled red in one rule: the pod's default route points at a resilient group of the
/// three (`nhid`, `type resilient buckets 64 idle_timer 120 unbalanced_timer 0`). 96 UDP flows from the pod
/// spread over all three. Gateway 1 is killed: once every flow answers again, each flow that was on
/// gateway 2 or 3 must still be there, and gateway 1's flows are on the survivors; the route still points
/// at the same group (replaced in place). Gateway 1 restarted and ready rejoins that group; for 3 s of
/// rounds over all flows none moves: their buckets are busy, and with `unbalanced_timer 0` a busy bucket is
/// never forced. (The buckets no flow used since gateway 1 died count as idle at once and go back to it:
/// new flows may reach it right away; the test prints how many of 32 new flows did.)
#[test]
fn a_dead_replica_moves_only_its_own_flows_and_its_return_moves_none() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let mut env = Env::everything_via(
        &mode,
        &bin,
        &["red", "red", "red"],
        "red",
        "replicas",
        &["client"],
        0,
    );
    let table = env.table_of(env.topo.pod(1, 1));
    let default = IpNet::V4(Ipv4Net::default());
    let gateways: Vec<IpAddr> = (1..=3)
        .map(|k| IpAddr::V4(env.topo.gateway(k).ip))
        .collect();
    env.wait_route(
        table,
        default,
        &RouteShape::Via(gateways.clone()),
        Duration::from_secs(5),
    );

    // The route is on a resilient group, and the agent says so.
    let nhid = |env: &Env| {
        agent::route_nhid(&env.topo.node(1).ns, table, default).or_diag(env, "ip route")
    };
    let group = nhid(&env).or_diag(
        &env,
        "the route to 0.0.0.0/0 points at no nexthop group (nhid)",
    );
    let shown = env
        .topo
        .node(1)
        .ns
        .ip(&format!("nexthop show id {group}"))
        .or_diag(&env, "ip nexthop show");
    if !shown.contains("type resilient buckets 64 idle_timer 120 unbalanced_timer 0") {
        env.fail(format!(
            "group {group} is not the agent's resilient group: {shown}"
        ));
    }
    let metrics = tests::Metrics::parse(&env.agent.metrics_text().or_diag(&env, "agent /metrics"));
    assert_eq!(
        metrics.get("egress_node_nexthop_mode", &[("mode", "resilient")]),
        Some(1.0)
    );

    let server =
        traffic::udp_whoami_server(&env.topo.red().ns, SocketAddr::from((RED_SERVER, 7102)))
            .or_diag(&env, "who-am-I server");
    let flows = UdpFlows::open(&env.topo.pod(1, 1).ns, server.addr(), FLOWS).or_diag(&env, "flows");
    let before = carriers(&env, &flows, Duration::from_secs(5)).or_diag(
        &env,
        "a flow got no answer, or not from a gateway's egress IP",
    );
    let spread = count(&before);
    eprintln!("{FLOWS} flows over 3 replicas: {spread:?}");
    if spread.len() != 3 {
        env.fail(format!(
            "{FLOWS} flows must use all three gateways: {spread:?}"
        ));
    }

    // Kill one replica; keep the flows busy until every one answers again.
    let killed_at = Instant::now();
    match env.topo.gateway_mut(KILLED).process_mut() {
        Some(p) => p.signal(libc::SIGKILL),
        None => env.fail(format!("gateway {KILLED} has no process")),
    }
    let after = poll(
        Duration::from_secs(10),
        Duration::from_millis(10),
        "every flow answered again",
        || carriers(&env, &flows, Duration::from_millis(200)),
    )
    .or_diag(&env, "the flows after the kill");
    eprintln!(
        "resilient failover: every flow answered again {} ms after SIGKILL",
        killed_at.elapsed().as_millis()
    );
    let (mut moved, mut stayed) = (0, 0);
    for (i, (&was, &now)) in before.iter().zip(&after).enumerate() {
        if was == KILLED {
            moved += 1;
        } else if now == was {
            stayed += 1;
        } else {
            env.fail(format!(
                "flow {i} was on surviving gateway {was} and moved to gateway {now}"
            ));
        }
        if now == KILLED {
            env.fail(format!("flow {i} answered from the killed gateway"));
        }
    }
    eprintln!(
        "resilient groups: gateway {KILLED} killed: its {moved} flows moved; {stayed} of {} flows on the \
         survivors stayed on their replica",
        FLOWS - moved
    );
    let survivors: Vec<IpAddr> = gateways
        .iter()
        .copied()
        .filter(|g| *g != gateways[KILLED - 1])
        .collect();
    env.wait_route(
        table,
        default,
        &RouteShape::Via(survivors),
        Duration::from_secs(2),
    );
    assert_eq!(
        nhid(&env),
        Some(group),
        "the group is replaced in place, the route keeps it"
    );

    // The replica comes back: it rejoins the same group; busy flows stay where they are.
    env.topo
        .gateway_mut(KILLED)
        .respawn()
        .or_diag(&env, "restart the gateway");
    env.topo
        .gateway_mut(KILLED)
        .wait_ready(READY)
        .or_diag(&env, "the gateway ready again");
    let back = env.wait_route(
        table,
        default,
        &RouteShape::Via(gateways),
        Duration::from_secs(3),
    );
    assert_eq!(nhid(&env), Some(group));
    let until = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while Instant::now() < until {
        let now = carriers(&env, &flows, Duration::from_secs(2))
            .or_diag(&env, "a flow got no answer after the gateway came back");
        if let Some(i) = (0..FLOWS).find(|&i| now[i] != after[i]) {
            env.fail(format!(
                "busy flow {i} moved from gateway {} to gateway {} after gateway {KILLED} came back",
                after[i], now[i]
            ));
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let fresh =
        UdpFlows::open(&env.topo.pod(1, 1).ns, server.addr(), 32).or_diag(&env, "new flows");
    let fresh = carriers(&env, &fresh, Duration::from_secs(5)).or_diag(&env, "new flows");
    eprintln!(
        "gateway {KILLED} back in group {group} {} ms after it was ready: {rounds} rounds over 3 s, none of \
         the {FLOWS} busy flows moved; 32 new flows: {:?}",
        back.as_millis(),
        count(&fresh)
    );
}
