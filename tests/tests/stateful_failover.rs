//! State sync between the replicas of one gateway set, on the namespace topology: two userspace gateways in
//! one set (`sync:` with a shared key, ordinals 0 and 1), the pods sending through gateway 1. See
//! `docs/failover.md`.
//!
//! Every test skips without CAP_NET_ADMIN (fails with `EGRESS_REQUIRE_NETNS=1`) and until
//! `target/release/egress-gateway` is built. `cargo test -p tests --release --test stateful_failover`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use forwarder_core::sync::wire::{Header, Hello, PeerState, Record, Writer};
use ipnet::{Ipv4Net, Ipv6Net};
use tests::agent::RouteShape;
use tests::gateway::SYNC_PORT;
use tests::scenario::{self, UdpFlows};
use tests::topology::{RED_SERVER, RED_SERVER6};
use tests::{require_netns, require_node_agent, require_userspace_gateway, traffic};
use tests::{GatewayMode, Inventory, Topology, TopologySpec};

// The node agent's scenarios' setup: the agent on node 1 steering the pods over the two replicas.
#[allow(dead_code)]
#[path = "node_agent/common.rs"]
mod common;
use common::{Env, OrDiag};

/// How long a gateway may take to become ready (start-up on a busy shared machine).
const READY: Duration = Duration::from_secs(30);
/// How long counters may take to show what happened (the sync thread publishes every 100 ms).
const METRICS: Duration = Duration::from_secs(10);
/// Long-lived UDP flows the pod keeps through gateway 1.
const FLOWS: usize = 64;

/// Two gateways in one sync set, both ready; the pods' traffic goes through gateway 1.
fn pair(mode: GatewayMode) -> Topology {
    pair_named(mode, false)
}

/// [`pair`], the peers given by DNS name when `by_name` (`TopologySpec::sync_by_name`).
fn pair_named(mode: GatewayMode, by_name: bool) -> Topology {
    let mut spec = TopologySpec::standard(mode.clone());
    spec.gateways = vec![mode.clone(), mode];
    spec.sync_sets = vec![vec![1, 2]];
    spec.sync_by_name = by_name;
    let mut topo = Topology::build(spec).expect("build the topology");
    for k in 1..=2 {
        topo.gateway_mut(k)
            .wait_ready(READY)
            .unwrap_or_else(|e| panic!("gateway {k} ready: {e}"));
    }
    topo
}

/// Both gateways' sync metrics, for failure messages.
fn sync_metrics(topo: &Topology) -> String {
    let mut out = String::new();
    for k in 1..=2 {
        let text = topo.gateway(k).metrics_text().unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.starts_with("egress_gateway_sync"))
        {
            out.push_str(&format!("gateway {k}: {line}\n"));
        }
    }
    out
}

fn value(topo: &Topology, k: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    let m = topo.gateway(k).metrics().expect("GET /metrics");
    scenario::value(&m, name, labels)
}

/// Flows opened through gateway 1 appear as passive copies on gateway 2 within a few milliseconds of
/// their first packet, each sent once (not per packet); gateway 2, restarted, is not ready until it has
/// them all back from gateway 1 by bulk transfer — idle flows included, which the live stream would never
/// send again.
#[test]
fn flows_reach_the_peer_and_a_restarted_peer_gets_them_back_in_bulk() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = pair(mode);
    let server = SocketAddr::from((RED_SERVER, 7901));
    let _whoami = traffic::udp_whoami_server(&topo.red().ns, server).unwrap();
    let flows = UdpFlows::open(&topo.pod(1, 1).ns, server, FLOWS).unwrap();
    let t = Instant::now();
    let sources = flows.sources(Duration::from_secs(10));
    let gw1 = IpAddr::V4(topo.gateway(1).dmz_egress);
    assert!(
        sources.iter().all(|s| s.is_some_and(|a| a.ip() == gw1)),
        "every flow goes through gateway 1: {sources:?}"
    );
    let n = FLOWS as f64;
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_copies",
        &[("peer", "0")],
        METRICS,
        |v| v >= n,
    )
    .unwrap_or_else(|e| {
        panic!(
            "gateway 2 holds a copy of every flow of gateway 1: {e}\n{}",
            sync_metrics(&topo)
        )
    });
    eprintln!("{FLOWS} flows copied to gateway 2 within {:?}", t.elapsed());
    // A few more rounds of traffic send nothing new: one record per flow, not one per packet.
    for _ in 0..3 {
        flows.sources(Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = value(
        &topo,
        1,
        "egress_gateway_sync_records_total",
        &[("kind", "flow"), ("result", "sent")],
    );
    let bytes = value(
        &topo,
        1,
        "egress_gateway_sync_bytes_total",
        &[("direction", "tx")],
    );
    eprintln!(
        "gateway 1 sent {sent} flow records, {bytes} bytes ({:.1} bytes per flow, heartbeats included)",
        bytes / n
    );
    assert!(
        sent >= n && sent <= n + 8.0,
        "{sent} flow records for {FLOWS} flows"
    );
    assert_eq!(
        value(
            &topo,
            2,
            "egress_gateway_sync_refused_total",
            &[("reason", "bad_mac")]
        ),
        0.0
    );

    // Gateway 2 restarted: a new incarnation, which asks gateway 1 for everything.
    let gw = topo.gateway_mut(2);
    gw.respawn().expect("restart gateway 2");
    let t = Instant::now();
    gw.wait_ready(READY).expect("gateway 2 ready again");
    let ready_after = t.elapsed();
    let copies = value(&topo, 2, "egress_gateway_sync_copies", &[("peer", "0")]);
    eprintln!("gateway 2 ready {ready_after:?} after its restart, with {copies} copies");
    assert!(
        copies >= n,
        "gateway 2 was ready with {copies} of {FLOWS} copies"
    );
    assert!(
        value(
            &topo,
            2,
            "egress_gateway_sync_bulk_total",
            &[("role", "requested")]
        ) >= 1.0
    );
    assert!(
        value(
            &topo,
            1,
            "egress_gateway_sync_bulk_total",
            &[("role", "served")]
        ) >= 1.0
    );
    // The flows still work, through gateway 1, as before.
    let again = flows.sources(Duration::from_secs(10));
    assert!(again.iter().all(|s| s.is_some_and(|a| a.ip() == gw1)));
}

/// Peers given by DNS name, as a StatefulSet's pods name each other under its headless Service: they find
/// each other at start, and again when one restarts at a new address (its name now resolving there) — the
/// restarted replica gets every flow back in bulk and the pair is in sync again.
#[test]
fn peers_given_by_name_find_each_other_again_at_a_new_address() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = pair_named(mode, true);
    let server = SocketAddr::from((RED_SERVER, 7904));
    let _whoami = traffic::udp_whoami_server(&topo.red().ns, server).unwrap();
    let n = 16;
    let flows = UdpFlows::open(&topo.pod(1, 1).ns, server, n).unwrap();
    flows.sources(Duration::from_secs(10));
    let copies_at = |topo: &Topology, what: &str| {
        scenario::wait_metric(
            topo.gateway(2),
            "egress_gateway_sync_copies",
            &[("peer", "0")],
            METRICS,
            |v| v >= n as f64,
        )
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", sync_metrics(topo)));
    };
    copies_at(
        &topo,
        "gateway 2 holds copies of gateway 1's flows, its peer found by name",
    );

    // Gateway 2 comes back at a new address: its sync socket there, its name moved in both namespaces.
    let moved = std::net::Ipv4Addr::new(172, 18, 0, 40);
    let old = topo.gateway(2).ip;
    topo.gateway(2)
        .ns
        .ip(&format!("addr add {moved}/16 dev eth0"))
        .expect("second address of gateway 2");
    let config = topo.gateway(2).config_path().unwrap().to_path_buf();
    let text = std::fs::read_to_string(&config).unwrap();
    // the tunnel's address (the sync socket's); health and metrics stay where the harness asks them
    let listen = format!("tunnel: {{ listen: {old}:");
    assert!(text.contains(&listen), "{listen} in {text}");
    std::fs::write(
        &config,
        text.replacen(&listen, &format!("tunnel: {{ listen: {moved}:"), 1),
    )
    .unwrap();
    for k in 1..=2 {
        let hosts = [
            (tests::gateway::sync_name(1), IpAddr::V4(topo.gateway(1).ip)),
            (tests::gateway::sync_name(2), IpAddr::V4(moved)),
        ];
        topo.gateway(k).ns.set_hosts(&hosts).unwrap();
    }
    let gw = topo.gateway_mut(2);
    gw.respawn().expect("restart gateway 2");
    gw.wait_ready(READY).expect("gateway 2 ready again");
    copies_at(
        &topo,
        "gateway 2, restarted at a new address, got every flow back",
    );
    scenario::wait_metric(
        topo.gateway(1),
        "egress_gateway_sync_peer_phase",
        &[("peer", "1"), ("phase", "in_sync")],
        METRICS,
        |v| v == 1.0,
    )
    .unwrap_or_else(|e| panic!("gateway 1 in sync with gateway 2 at its new address: {e}"));
    for k in 1..=2 {
        let peer = (2 - k).to_string();
        assert_eq!(
            value(
                &topo,
                k,
                "egress_gateway_sync_resolve_failures_total",
                &[("peer", &peer)]
            ),
            0.0,
            "gateway {k} resolved its peer's name every time"
        );
    }
}

/// A datagram from the underlay built like a peer's — well-formed, claiming ordinal 0 of the set — but
/// without the key: refused whole and counted (`bad_mac`), nothing installed; so are unsigned ones and
/// garbage. The real peer's stream goes on.
#[test]
fn sync_datagrams_without_the_key_are_refused_and_counted() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = pair(mode);
    let target = SocketAddr::from((topo.gateway(2).ip, SYNC_PORT));
    let set_id = "red".bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let datagram = |mac: bool, seq: u32| {
        let mut buf = vec![0u8; 512];
        let header = Header {
            set_id,
            ordinal: 0,
            mac,
            key_id: u8::from(mac),
            epoch: 0x0bad_0bad,
            seq,
            ack: 0,
            acked_epoch: 0,
            sent_ms: 0,
        };
        let mut w = Writer::new(&mut buf, &header).unwrap();
        w.push(&Record::Hello(Hello {
            state: PeerState::Ready,
            served: 1,
            flows: 0,
            passive: 0,
            started_ms: 0,
            features: 0,
        }))
        .unwrap();
        let n = w.finish();
        buf.truncate(n);
        if mac {
            // a MAC that is not the key's
            let at = n - 16;
            buf[at..].copy_from_slice(&[0x5a; 16]);
        }
        buf
    };
    let sends: Vec<Vec<u8>> = vec![
        datagram(true, 1),
        datagram(false, 2),
        b"not a sync datagram at all".to_vec(),
    ];
    topo.underlay()
        .run(Duration::from_secs(5), move || -> std::io::Result<()> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            for d in &sends {
                s.send_to(d, target)?;
            }
            Ok(())
        })
        .unwrap()
        .unwrap();
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_refused_total",
        &[("reason", "bad_mac")],
        METRICS,
        |v| v >= 2.0,
    )
    .expect("the forged and the unsigned datagram are refused as bad_mac");
    let m = topo.gateway(2).metrics().unwrap();
    let refused: f64 = m
        .samples()
        .iter()
        .filter(|s| s.name == "egress_gateway_sync_refused_total")
        .map(|s| s.value)
        .sum();
    assert!(refused >= 3.0, "garbage is refused too: {refused}");
    assert_eq!(
        scenario::value(
            &m,
            "egress_gateway_sync_records_total",
            &[("kind", "flow"), ("result", "installed")]
        ),
        0.0
    );
    // The real peer is still heard and in sync.
    assert_eq!(
        scenario::value(
            &m,
            "egress_gateway_sync_peer_phase",
            &[("peer", "0"), ("phase", "in_sync")]
        ),
        1.0
    );
}

/// The node agent's topology for the failover tests: node 1 with one pod (`app/client`), two userspace
/// replicas labelled red in one sync set, the pod's default route over both (a resilient group).
struct Replicas {
    env: Env,
    /// The pod's table on node 1.
    table: u32,
    /// The pod's route through both replicas.
    both: RouteShape,
}

fn replicas(mode: &GatewayMode, bin: &std::path::Path) -> Replicas {
    replicas_of(mode, bin, 2)
}

/// [`replicas`] with `n` replicas in the set, all in the pod's route (`both` holds them all).
fn replicas_of(mode: &GatewayMode, bin: &std::path::Path, n: usize) -> Replicas {
    let mut spec = TopologySpec::node_agent(&[1], vec![mode.clone(); n]);
    spec.sync_sets = vec![(1..=n).collect()];
    let env = Env::start(spec, bin, |topo| {
        let mut inv = Inventory::new();
        inv.policy(tests::Policy::new(
            "replicas",
            vec![
                tests::PolicyRule::via(Ipv4Net::default(), "red"),
                tests::PolicyRule::via(Ipv6Net::default(), "red"),
            ],
        ))
        .namespace_with_policy("app", "replicas");
        inv.client_pod("app", "client", topo.pod(1, 1));
        for k in 1..=n {
            inv.gateway_pod(k, "red", topo.spec().ipv6);
        }
        inv
    });
    let table = env.table_of(env.topo.pod(1, 1));
    let both = via(&env, 1..=n);
    env.wait_route(table, Ipv4Net::default(), &both, Duration::from_secs(5));
    Replicas { env, table, both }
}

/// The pod's route through replicas `ks`.
fn via(env: &Env, ks: impl IntoIterator<Item = usize>) -> RouteShape {
    RouteShape::Via(
        ks.into_iter()
            .map(|k| IpAddr::V4(env.topo.gateway(k).ip))
            .collect(),
    )
}

/// The replica whose DMZ egress IP (IPv4 or IPv6) is `ip`.
fn gateway_of(env: &Env, ip: IpAddr) -> usize {
    (1..=env.topo.spec().gateways.len())
        .find(|&k| {
            let gw = env.topo.gateway(k);
            IpAddr::V4(gw.dmz_egress) == ip || gw.dmz_egress6.map(IpAddr::V6) == Some(ip)
        })
        .unwrap_or_else(|| env.fail(format!("{ip} is no replica's egress IP")))
}

/// Waits until the replica other than `x` holds at least `n` copies of `x`'s flows.
fn wait_copies(env: &Env, x: usize, n: usize, what: &str) {
    let n = n as f64;
    scenario::wait_metric(
        env.topo.gateway(3 - x),
        "egress_gateway_sync_copies",
        &[("peer", &(x - 1).to_string())],
        METRICS,
        |v| v >= n,
    )
    .or_diag(env, what);
}

/// SIGKILLs replica `x`; returns when.
fn kill(env: &mut Env, x: usize) -> Instant {
    signal(env, x, libc::SIGKILL)
}

/// Sends `sig` to replica `x`; returns when.
fn signal(env: &mut Env, x: usize, sig: i32) -> Instant {
    let at = Instant::now();
    match env.topo.gateway_mut(x).process_mut() {
        Some(p) => p.signal(sig),
        None => env.fail(format!("gateway {x} has no process")),
    }
    at
}

/// Waits (20 s at most) for replica `x`, sent SIGTERM at `term`, to exit 0; prints and returns how long it
/// took, fails the test otherwise.
fn wait_clean_exit(env: &mut Env, x: usize, term: Instant) -> Duration {
    let exited = env
        .topo
        .gateway_mut(x)
        .process_mut()
        .map(|p| p.wait_timeout(Duration::from_secs(20)));
    let took = term.elapsed();
    eprintln!("gateway {x} exited {took:?} after SIGTERM: {exited:?}");
    if !matches!(exited, Some(Ok(s)) if s.success()) {
        env.fail(format!(
            "gateway {x} did not exit cleanly after SIGTERM: {exited:?}"
        ));
    }
    took
}

/// What the interactive stream saw: exchanges completed, the longest wait for an echo, and how it ended.
#[derive(Debug)]
struct Stream {
    exchanges: u64,
    longest: Duration,
    error: Option<String>,
}

/// An interactive TCP session from the pod: a numbered 64-byte line every 10 ms, each echoed back by the
/// server and checked byte for byte, until `stop`.
fn interactive(
    env: &Env,
    server: SocketAddr,
    stop: Arc<AtomicBool>,
    started: std::sync::mpsc::Sender<()>,
) -> tests::NsThread<Stream> {
    env.topo
        .pod(1, 1)
        .ns
        .thread(move || {
            let mut s = Stream {
                exchanges: 0,
                longest: Duration::ZERO,
                error: None,
            };
            let run = |s: &mut Stream| -> std::io::Result<()> {
                let mut c = traffic::connect(server).map_err(std::io::Error::other)?;
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(Duration::from_secs(20)))?;
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let line = format!("{:063}\n", s.exchanges);
                    c.write_all(line.as_bytes())?;
                    let mut back = [0u8; 64];
                    c.read_exact(&mut back)?;
                    if back != line.as_bytes() {
                        return Err(std::io::Error::other(format!(
                            "exchange {}: echoed {:?}",
                            s.exchanges,
                            String::from_utf8_lossy(&back)
                        )));
                    }
                    s.longest = s.longest.max(last.elapsed());
                    last = Instant::now();
                    if s.exchanges == 0 {
                        let _ = started.send(());
                    }
                    s.exchanges += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            };
            if let Err(e) = run(&mut s) {
                s.error = Some(format!("{} ({:?})", e, e.kind()));
            }
            s
        })
        .expect("start the stream")
}

/// An interactive session running from the pod to its own echo server.
struct Session {
    echo: traffic::Server,
    stop: Arc<AtomicBool>,
    stream: tests::NsThread<Stream>,
    /// Its source at the server (after SNAT).
    via: SocketAddr,
}

/// Starts an echo server on `server` and the [`interactive`] session to it; returns after its first
/// exchange.
fn start_session(env: &Env, server: SocketAddr) -> Session {
    let echo = traffic::tcp_echo_server(&env.topo.red().ns, server).or_diag(env, "echo server");
    let stop = Arc::new(AtomicBool::new(false));
    let (started, wait_started) = std::sync::mpsc::channel();
    let stream = interactive(env, server, Arc::clone(&stop), started);
    wait_started
        .recv_timeout(Duration::from_secs(20))
        .or_diag(env, "the session's first exchange");
    let via = echo
        .last_peer()
        .or_diag(env, "the session's source at the server");
    Session {
        echo,
        stop,
        stream,
        via,
    }
}

/// Stops the interactive session and checks how it went: no error, one connection at the server from its
/// first source, no stall of 3 s or more. Prints the longest stall (`stall: NNN ms`) with `when`.
fn end_session(env: &Env, session: Session, when: &str) {
    let Session {
        echo,
        stop,
        stream,
        via,
    } = session;
    stop.store(true, Ordering::Relaxed);
    let s = stream
        .join_timeout(Duration::from_secs(30))
        .or_diag(env, "the session thread");
    eprintln!(
        "stall: {} ms ({} exchanges; {when})",
        s.longest.as_millis(),
        s.exchanges
    );
    if let Some(e) = &s.error {
        env.fail(format!(
            "the session broke after {} exchanges: {e}",
            s.exchanges
        ));
    }
    assert_eq!(
        echo.peers(),
        vec![via],
        "one connection, one source address and port"
    );
    assert!(
        s.longest < Duration::from_secs(3),
        "the session stalled {:?}",
        s.longest
    );
}

/// Two replicas of one set behind the node agent's resilient group, syncing. An interactive TCP session
/// and a UDP flow from the pod go through replica X; X is SIGKILLed mid-stream. The survivor declares X
/// dead (silent on sync, health probe unanswered), announces X's egress IP on the DMZ and translates X's
/// flows with X's address and ports, while the agent moves X's traffic to it: the session goes on with
/// every byte echoed intact, no reset, the server sees the same source address and port throughout (one
/// connection), and the UDP flow keeps its source too. X is then restarted: the survivor hands X's flows
/// back with its bulk transfer and gives X's address up once X is ready, and the session goes on through
/// X, still one connection. The longest stall is printed (`stall: NNN ms`).
#[test]
fn a_tcp_session_survives_the_death_of_its_replica() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let Replicas {
        mut env,
        table,
        both,
    } = replicas(&mode, &bin);

    let server = SocketAddr::from((RED_SERVER, 7910));
    let session = start_session(&env, server);
    let x = gateway_of(&env, session.via.ip());
    let other = 3 - x;
    eprintln!("the session {} goes through gateway {x}", session.via);
    // its copy is on the other replica
    wait_copies(&env, x, 1, "the session's copy on the other replica");
    std::thread::sleep(Duration::from_millis(500));

    let killed = kill(&mut env, x);
    // 3 s of the session after the kill
    std::thread::sleep(Duration::from_secs(3));
    let survivor = env.topo.gateway(other);
    for (name, labels) in [
        ("egress_gateway_sync_takeovers_total", &[][..]),
        (
            "egress_gateway_standby_packets_total",
            &[("direction", "outbound")][..],
        ),
        (
            "egress_gateway_standby_packets_total",
            &[("direction", "inbound")][..],
        ),
    ] {
        scenario::wait_metric(survivor, name, labels, METRICS, |v| v >= 1.0).or_diag(&env, name);
    }

    // X comes back: the survivor hands X's flows back with its bulk transfer and gives X's address up once
    // X is ready; X announces it again and carries the session on; new flows through X work.
    env.topo
        .gateway_mut(x)
        .respawn()
        .or_diag(&env, "restart gateway X");
    env.topo
        .gateway_mut(x)
        .wait_ready(common::READY)
        .or_diag(&env, "gateway X ready again");
    scenario::wait_metric(
        env.topo.gateway(other),
        "egress_gateway_sync_serving",
        &[("peer", &(x - 1).to_string())],
        METRICS,
        |v| v == 0.0,
    )
    .or_diag(&env, "the survivor gives X's address up");
    scenario::wait_metric(
        env.topo.gateway(x),
        "egress_gateway_sync_records_total",
        &[("kind", "flow"), ("result", "returned")],
        METRICS,
        |v| v >= 1.0,
    )
    .or_diag(&env, "X got its flows back");
    // 3 s more of the session, its replies reaching X again (X has its address back)
    std::thread::sleep(Duration::from_secs(3));
    let when = format!("{:?} after the kill, through X's restart", killed.elapsed());
    end_session(&env, session, &when);
    env.wait_route(table, Ipv4Net::default(), &both, Duration::from_secs(5));
    let flows_addr = SocketAddr::from((RED_SERVER, 7911));
    let _whoami =
        traffic::udp_whoami_server(&env.topo.red().ns, flows_addr).or_diag(&env, "flow server");
    let flows = UdpFlows::open(&env.topo.pod(1, 1).ns, flows_addr, 32).or_diag(&env, "flows");
    let sources = flows.sources(Duration::from_secs(10));
    let via_x = sources
        .iter()
        .flatten()
        .filter(|a| a.ip() == IpAddr::V4(env.topo.gateway(x).dmz_egress))
        .count();
    if sources.iter().any(Option::is_none) || via_x == 0 {
        env.fail(format!(
            "after X's return every flow answers, some through X: {sources:?}"
        ));
    }
}

/// Replica X gets SIGTERM while an interactive session runs through it: with a peer in sync it hands its
/// flows and address over instead of draining for `drain_seconds` (30 s here). Its readiness says `handed
/// over`, so the agent takes X out of the route at once; the other replica adopts X's address and carries
/// the session on — one connection, the same source, no reset — and new connections opened meanwhile all
/// work (none lands on a gateway that refuses it). X exits within seconds, having handed over.
#[test]
fn a_draining_replica_hands_its_connections_over() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let Replicas { mut env, table, .. } = replicas(&mode, &bin);

    let server = SocketAddr::from((RED_SERVER, 7912));
    let fresh = SocketAddr::from((RED_SERVER, 7913));
    let _fresh_server =
        traffic::tcp_echo_server(&env.topo.red().ns, fresh).or_diag(&env, "second server");
    let session = start_session(&env, server);
    let x = gateway_of(&env, session.via.ip());
    let other = 3 - x;
    eprintln!("the session {} goes through gateway {x}", session.via);
    wait_copies(&env, x, 1, "the session's copy on the other replica");
    std::thread::sleep(Duration::from_millis(500));

    let term = signal(&mut env, x, libc::SIGTERM);
    // new connections from the pod while X hands over: each must connect at its first attempt's deadline
    let mut refused = Vec::new();
    for i in 0..20 {
        match traffic::connect_once(&env.topo.pod(1, 1).ns, fresh, Duration::from_secs(3)) {
            Ok((Ok(_), took)) if took < Duration::from_secs(1) => {}
            Ok((r, took)) => refused.push(format!("connection {i}: {r:?} after {took:?}")),
            Err(e) => refused.push(format!("connection {i}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = wait_clean_exit(&mut env, x, term);
    let log = env
        .topo
        .gateway(x)
        .process()
        .map(tests::process::Process::log_text)
        .unwrap_or_default();
    if !log.contains("handed over: a peer carries this replica's flows and addresses") {
        env.fail("X's log does not say it handed over".to_string());
    }
    // 2 s more of the session, through the survivor alone
    std::thread::sleep(Duration::from_secs(2));
    let when = format!("X exited after {} ms", took.as_millis());
    end_session(&env, session, &when);
    assert!(
        refused.is_empty(),
        "new connections during the drain: {refused:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "X took {took:?} to hand over (drain_seconds is 30)"
    );
    scenario::wait_metric(
        env.topo.gateway(other),
        "egress_gateway_sync_takeovers_total",
        &[],
        METRICS,
        |v| v >= 1.0,
    )
    .or_diag(&env, "the survivor took X's address over");
    let only_other = RouteShape::Via(vec![IpAddr::V4(env.topo.gateway(other).ip)]);
    env.wait_route(
        table,
        Ipv4Net::default(),
        &only_other,
        Duration::from_secs(5),
    );
}

/// Gateway 1 cut off from the pod network altogether (its `eth0` down: no sync, no health probe) while its
/// uplinks stay on their segments: gateway 2 sees it silent and its health probe unanswered, but its probes
/// of gateway 1's addresses on the uplinks (RFC 5227 §2.1.1, RFC 4862 §5.4.2) are answered, so it takes
/// nothing over — the address keeps one owner. `eth0` back up, they are in sync again, still without a
/// takeover.
#[test]
fn a_replica_cut_off_from_the_pods_but_on_its_uplinks_is_not_taken_over() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = pair(mode);
    let in_sync = |v: f64| v == 1.0;
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_peer_phase",
        &[("peer", "0"), ("phase", "in_sync")],
        METRICS,
        in_sync,
    )
    .unwrap_or_else(|e| panic!("in sync before the cut: {e}"));
    topo.gateway(1)
        .ns
        .ip("link set eth0 down")
        .expect("gateway 1's eth0 down");
    let cut = Instant::now();
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_takeovers_refused_total",
        &[("reason", "address_held")],
        METRICS,
        |v| v >= 1.0,
    )
    .unwrap_or_else(|e| {
        panic!(
            "gateway 2 refused to take gateway 1 over: {e}\n{}",
            sync_metrics(&topo)
        )
    });
    eprintln!("takeover refused {:?} after the cut", cut.elapsed());
    // well past the ~450 ms a dead replica takes
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        value(&topo, 2, "egress_gateway_sync_takeovers_total", &[]),
        0.0,
        "no takeover while gateway 1 holds its addresses\n{}",
        sync_metrics(&topo)
    );
    assert_eq!(
        value(&topo, 2, "egress_gateway_sync_serving", &[("peer", "0")]),
        0.0
    );
    topo.gateway(1)
        .ns
        .ip("link set eth0 up")
        .expect("gateway 1's eth0 up");
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_peer_phase",
        &[("peer", "0"), ("phase", "in_sync")],
        METRICS,
        in_sync,
    )
    .unwrap_or_else(|e| panic!("in sync again: {e}\n{}", sync_metrics(&topo)));
    assert_eq!(
        value(&topo, 2, "egress_gateway_sync_takeovers_total", &[]),
        0.0
    );
}

/// The sync link between two live replicas is cut for 2 s (their sync datagrams dropped both ways): each
/// sees the other silent, but its health probe answers, so neither takes the other's address — no two
/// owners on one address — and the flows through both keep their source; the link restored, they are in
/// sync again.
#[test]
fn a_cut_sync_link_takes_nothing_over() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = pair(mode);
    let server = SocketAddr::from((RED_SERVER, 7912));
    let _whoami = traffic::udp_whoami_server(&topo.red().ns, server).unwrap();
    let flows = UdpFlows::open(&topo.pod(1, 1).ns, server, 16).unwrap();
    let before = flows.sources(Duration::from_secs(10));
    assert!(before.iter().all(Option::is_some), "{before:?}");
    let port = SYNC_PORT.to_string();
    let rule = |op: &str| {
        for k in 1..=2 {
            topo.gateway(k)
                .ns
                .exec_args(&[
                    "iptables", "-w", op, "INPUT", "-p", "udp", "--dport", &port, "-j", "DROP",
                ])
                .unwrap();
        }
    };
    rule("-A");
    std::thread::sleep(Duration::from_secs(2));
    for k in 1..=2 {
        let peer = (2 - k).to_string();
        assert_eq!(
            value(
                &topo,
                k,
                "egress_gateway_sync_peer_phase",
                &[("peer", &peer), ("phase", "silent")]
            ),
            1.0,
            "gateway {k} hears nothing from its peer\n{}",
            sync_metrics(&topo)
        );
        assert_eq!(
            value(&topo, k, "egress_gateway_sync_takeovers_total", &[]),
            0.0
        );
        assert_eq!(value(&topo, k, "egress_gateway_sync_serving", &[]), 0.0);
    }
    let during = flows.sources(Duration::from_secs(10));
    assert_eq!(during, before, "the flows keep their source addresses");
    rule("-D");
    for k in 1..=2 {
        let peer = (2 - k).to_string();
        scenario::wait_metric(
            topo.gateway(k),
            "egress_gateway_sync_peer_phase",
            &[("peer", &peer), ("phase", "in_sync")],
            METRICS,
            |v| v == 1.0,
        )
        .unwrap_or_else(|e| panic!("gateway {k} in sync again: {e}"));
        assert_eq!(
            value(&topo, k, "egress_gateway_sync_takeovers_total", &[]),
            0.0
        );
    }
}

/// Concurrent connections of [`many_connections_survive_the_death_of_their_replica`].
const CONNECTIONS: usize = 1000;

/// One exchange on every connection at once: a unique line written to each first, then each echo read
/// back and checked, all within 10 s. The outcome per connection.
fn exchange_all(conns: &mut [std::net::TcpStream], round: &str) -> Vec<Result<(), String>> {
    let lines: Vec<String> = (0..conns.len())
        .map(|i| format!("{round} {i:06}\n"))
        .collect();
    let mut out: Vec<Result<(), String>> = conns
        .iter_mut()
        .zip(&lines)
        .map(|(c, line)| {
            c.write_all(line.as_bytes())
                .map_err(|e| format!("write: {e} ({:?})", e.kind()))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    for ((c, line), r) in conns.iter_mut().zip(&lines).zip(&mut out) {
        if r.is_err() {
            continue;
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        let mut back = vec![0u8; line.len()];
        *r = c
            .set_read_timeout(Some(wait))
            .and_then(|()| c.read_exact(&mut back))
            .map_err(|e| format!("read: {e} ({:?})", e.kind()))
            .and_then(|()| {
                if back == line.as_bytes() {
                    Ok(())
                } else {
                    Err(format!("echoed {:?}", String::from_utf8_lossy(&back)))
                }
            });
    }
    out
}

/// 1,000 TCP connections from the pod to an echo server behind the DMZ, spread over the two syncing replicas
/// by the agent's resilient group (each must carry some). Once the other replica holds copies of all of
/// replica X's connections, X is SIGKILLed; then every connection does one exchange at once (a unique line,
/// echoed back within 10 s): every one of them survives — no reset, the echo intact — and the server sees no
/// new connection. Prints how many were on X and how many of those survived.
#[test]
fn many_connections_survive_the_death_of_their_replica() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let Replicas { mut env, .. } = replicas(&mode, &bin);
    let server = SocketAddr::from((RED_SERVER, 7920));
    let echo = traffic::tcp_echo_server(&env.topo.red().ns, server).or_diag(&env, "echo server");

    // One after another, each with a first exchange: the server accepts connection i before connection i+1
    // is opened, so its i-th peer is connection i's source after SNAT.
    let t = Instant::now();
    let mut conns = open_connections(&env, server, CONNECTIONS);
    let peers = echo.peers();
    if peers.len() != CONNECTIONS {
        env.fail(format!(
            "{} connections at the server for {CONNECTIONS}",
            peers.len()
        ));
    }
    let carrier: Vec<usize> = peers.iter().map(|p| gateway_of(&env, p.ip())).collect();
    let x = carrier[0];
    let on_x: Vec<bool> = carrier.iter().map(|&k| k == x).collect();
    let n_x = on_x.iter().filter(|&&b| b).count();
    eprintln!(
        "{CONNECTIONS} connections open in {:?}: {n_x} through gateway {x}, {} through gateway {}",
        t.elapsed(),
        CONNECTIONS - n_x,
        3 - x
    );
    if n_x < CONNECTIONS / 10 || CONNECTIONS - n_x < CONNECTIONS / 10 {
        env.fail(format!(
            "the resilient group spreads connections over both replicas: {n_x} of {CONNECTIONS} on gateway {x}"
        ));
    }
    wait_copies(
        &env,
        x,
        n_x,
        "copies of every connection of X on the other replica",
    );
    // A round just before the kill: every connection works, and none is idle long enough for the echo
    // server's 10 s read timeout to close it before the round after the kill.
    let before = exchange_all(&mut conns, "before");
    if let Some((i, e)) = before
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
    {
        env.fail(format!("connection {i} before the kill: {e}"));
    }
    std::thread::sleep(Duration::from_millis(500));

    let killed = kill(&mut env, x);
    let after = exchange_all(&mut conns, "after");
    let took = killed.elapsed();
    let failed: Vec<(usize, &String)> = after
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .collect();
    let failed_x = failed.iter().filter(|(i, _)| on_x[*i]).count();
    let survived_x = n_x - failed_x;
    eprintln!(
        "killed gateway {x}: {n_x} connections on it, {survived_x} survived ({:.1} %); {} of {} on gateway {} failed; round after the kill took {took:?}",
        survived_x as f64 * 100.0 / n_x as f64,
        failed.len() - failed_x,
        CONNECTIONS - n_x,
        3 - x
    );
    if !failed.is_empty() {
        let first: Vec<String> = failed
            .iter()
            .take(5)
            .map(|(i, e)| format!("connection {i} (gateway {}): {e}", carrier[*i]))
            .collect();
        env.fail(format!(
            "{} of {CONNECTIONS} connections broke, {failed_x} of them on the killed replica; first: {first:#?}",
            failed.len()
        ));
    }
    let peers_after = echo.peers().len();
    if peers_after != CONNECTIONS {
        env.fail(format!(
            "the server saw {peers_after} connections, not {CONNECTIONS}: the failover opened new ones"
        ));
    }
    scenario::wait_metric(
        env.topo.gateway(3 - x),
        "egress_gateway_sync_takeovers_total",
        &[],
        METRICS,
        |v| v >= 1.0,
    )
    .or_diag(&env, "the survivor took X over");
}

/// ICMP echo requests from each replica's DMZ egress IP counted at the red server (iptables counters in
/// its INPUT chain, installed by [`count_pings`]): `[gateway 1, gateway 2]`.
fn pings_at_server(env: &Env) -> [u64; 2] {
    let text = env
        .topo
        .red()
        .ns
        .exec_args(&["iptables", "-w", "-n", "-v", "-x", "-L", "INPUT"])
        .or_diag(env, "iptables counters at the red server");
    let mut out = [0u64; 2];
    for (k, n) in out.iter_mut().enumerate() {
        let ip = env.topo.gateway(k + 1).dmz_egress.to_string();
        *n = text
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == ip))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
    }
    out
}

/// Installs the counters of [`pings_at_server`].
fn count_pings(env: &Env) {
    for k in 1..=2 {
        let ip = env.topo.gateway(k).dmz_egress.to_string();
        env.topo
            .red()
            .ns
            .exec_args(&[
                "iptables",
                "-w",
                "-A",
                "INPUT",
                "-p",
                "icmp",
                "--icmp-type",
                "echo-request",
                "-s",
                &ip,
                "-j",
                "ACCEPT",
            ])
            .or_diag(env, "iptables counter at the red server");
    }
}

/// What `ping -D` printed: requests sent, and the wall-clock times (Unix seconds) of the replies.
fn parse_ping(log: &str) -> (u64, Vec<f64>) {
    let sent = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let replies = log
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    (sent, replies)
}

/// How long the ping of [`a_udp_flow_and_a_ping_keep_going_through_a_replicas_death`] runs.
const PING_SECONDS: u64 = 6;

/// A UDP request/response flow (every 10 ms) and a ping (every 10 ms) from the pod, through the two syncing
/// replicas; X is the replica carrying the UDP flow (the ping hashes where it hashes: printed). X is
/// SIGKILLed: the UDP flow is answered again within 2 s of the kill (`udp loss window: NNN ms`) and the
/// server sees it from the same source address and port before and after — X's, kept by the survivor —
/// where without sync it would come from the survivor's. The ping gets replies again after the kill; the
/// replies it lost are printed.
#[test]
fn a_udp_flow_and_a_ping_keep_going_through_a_replicas_death() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let Replicas { mut env, .. } = replicas(&mode, &bin);
    let server = SocketAddr::from((RED_SERVER, 7921));
    let whoami =
        traffic::udp_whoami_server(&env.topo.red().ns, server).or_diag(&env, "whoami server");
    let probe =
        scenario::UdpProbe::start(&env.topo.pod(1, 1).ns, server, Duration::from_millis(10))
            .or_diag(&env, "UDP probe");
    probe
        .wait_answer_after(Instant::now(), Duration::from_secs(10))
        .or_diag(&env, "the UDP flow before the kill");
    let via = whoami
        .last_peer()
        .or_diag(&env, "the flow's source at the server");
    let x = gateway_of(&env, via.ip());
    eprintln!(
        "UDP flow {} → {via} goes through gateway {x}",
        probe.local_addr()
    );

    count_pings(&env);
    let log = env.topo.dir().join("ping.log");
    let secs = PING_SECONDS.to_string();
    let red = RED_SERVER.to_string();
    let mut ping = env
        .topo
        .pod(1, 1)
        .ns
        .spawn(&["ping", "-n", "-D", "-i", "0.01", "-w", &secs, &red], log)
        .or_diag(&env, "start ping");
    let at_server = scenario::poll(
        Duration::from_secs(5),
        Duration::from_millis(20),
        "pings at the server",
        || {
            let n = pings_at_server(&env);
            (n[0] + n[1] >= 20).then_some(n)
        },
    )
    .or_diag(&env, "ping before the kill");
    let ping_via = if at_server[0] >= at_server[1] { 1 } else { 2 };
    eprintln!(
        "ping goes through gateway {ping_via} ({} X, the UDP flow's); at the server from [gw1, gw2]: {at_server:?}",
        if ping_via == x { "=" } else { "≠" }
    );
    wait_copies(
        &env,
        x,
        if ping_via == x { 2 } else { 1 },
        "copies of X's flows on the other replica",
    );
    std::thread::sleep(Duration::from_millis(500));

    let peers_before = whoami.peers().len();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let pings_before = pings_at_server(&env);
    let killed = kill(&mut env, x);
    let window = probe
        .wait_answer_after(killed, Duration::from_secs(10))
        .or_diag(&env, "the UDP flow after the kill");
    eprintln!("udp loss window: {} ms", window.as_millis());
    ping.wait_timeout(Duration::from_secs(PING_SECONDS + 5))
        .or_diag(&env, "ping's end");
    let (sent, replies) = parse_ping(&ping.log_text());
    let lost = sent.saturating_sub(replies.len() as u64);
    let after_kill = replies.iter().filter(|&&t| t > wall).count();
    let last_gap = replies
        .last()
        .map_or(f64::INFINITY, |t| wall + PING_SECONDS as f64 - t);
    let pings_after = pings_at_server(&env);
    eprintln!(
        "ping through gateway {ping_via}: {sent} sent, {} replies, {lost} lost, {after_kill} replies after the kill; requests at the server from [gw1, gw2] after the kill: [{}, {}]",
        replies.len(),
        pings_after[0] - pings_before[0],
        pings_after[1] - pings_before[1]
    );
    let (sent_udp, answered_udp) = probe.counts();
    eprintln!("udp probe: {sent_udp} sent, {answered_udp} answered");
    probe.stop().or_diag(&env, "the probe thread");

    let peers = whoami.peers();
    let changed: Vec<&SocketAddr> = peers.iter().filter(|p| **p != via).collect();
    if !changed.is_empty() || peers.len() <= peers_before {
        env.fail(format!(
            "the server sees the flow from {via} before the kill and from {:?} after ({} datagrams after the kill)",
            changed.first(),
            peers.len().saturating_sub(peers_before)
        ));
    }
    if window >= Duration::from_secs(2) {
        env.fail(format!("the UDP flow was cut for {window:?} (limit 2 s)"));
    }
    if after_kill < 50 || last_gap > 2.0 {
        env.fail(format!(
            "ping: {after_kill} replies after the kill, the last one {last_gap:.1} s before its end"
        ));
    }
    if lost > 300 {
        env.fail(format!("ping lost {lost} of {sent} replies"));
    }
}

/// Replica 1 taken for dead while it runs: its sync and health ports dropped both ways, and its answers on
/// the uplink segments lost (ARP and IPv6 frames from it dropped where they enter the DMZ and internal
/// bridges), long enough to be taken for dead — it still forwards the pods' packets. Replica 2 takes its
/// address and carries its flows, which keep their source all along; when the cut heals it gives them back;
/// replica 1, reading in replica 2's heartbeats that it was served, announces its address again, and its
/// flows answer through it.
#[test]
fn a_replica_taken_for_dead_by_mistake_gets_its_address_back() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = pair(mode);
    let server = SocketAddr::from((RED_SERVER, 7913));
    let _whoami = traffic::udp_whoami_server(&topo.red().ns, server).unwrap();
    let flows = UdpFlows::open(&topo.pod(1, 1).ns, server, 16).unwrap();
    let before = flows.sources(Duration::from_secs(10));
    let gw1 = IpAddr::V4(topo.gateway(1).dmz_egress);
    assert!(
        before.iter().all(|s| s.is_some_and(|a| a.ip() == gw1)),
        "{before:?}"
    );
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_copies",
        &[("peer", "0")],
        METRICS,
        |v| v >= 16.0,
    )
    .expect("gateway 2 holds the flows");
    let sync = SYNC_PORT.to_string();
    let health = tests::gateway::HEALTH_PORT.to_string();
    let rules = |op: &str| {
        for (chain, port) in [("INPUT", &sync), ("OUTPUT", &sync), ("INPUT", &health)] {
            topo.gateway(1)
                .ns
                .exec_args(&[
                    "iptables", "-w", op, chain, "-p", "udp", "--dport", port, "-j", "DROP",
                ])
                .unwrap();
        }
    };
    // its answers on the uplinks, which would otherwise keep it from being taken over (the uplink fence)
    let segments = [&topo.dmz_router().ns, &topo.internal().ns];
    let answers = |cut: bool| {
        for ns in segments {
            let cmds: &[&str] = if cut {
                &[
                    "add table netdev cut",
                    "add chain netdev cut in { type filter hook ingress device gw1 priority 0 ; }",
                    "add rule netdev cut in ether type { arp, ip6 } drop",
                ]
            } else {
                &["delete table netdev cut"]
            };
            for c in cmds {
                let mut args = vec!["nft"];
                args.extend(c.split_whitespace());
                ns.exec_args(&args).unwrap();
            }
        }
    };
    rules("-A");
    answers(true);
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_takeovers_total",
        &[],
        METRICS,
        |v| v >= 1.0,
    )
    .unwrap_or_else(|e| {
        panic!(
            "gateway 2 takes gateway 1 for dead: {e}\n{}",
            sync_metrics(&topo)
        )
    });
    let during = flows.sources(Duration::from_secs(10));
    assert_eq!(
        during, before,
        "the flows keep their source while gateway 2 carries them"
    );
    rules("-D");
    answers(false);
    scenario::wait_metric(
        topo.gateway(2),
        "egress_gateway_sync_serving",
        &[("peer", "0")],
        METRICS,
        |v| v == 0.0,
    )
    .expect("gateway 2 gives the address back");
    // past the announcements gateway 2 had scheduled (3 s)
    std::thread::sleep(Duration::from_secs(4));
    let after = flows.sources(Duration::from_secs(10));
    assert_eq!(
        after,
        before,
        "the flows answer through gateway 1 again\n{}",
        sync_metrics(&topo)
    );
    let served = value(
        &topo,
        2,
        "egress_gateway_standby_packets_total",
        &[("direction", "inbound")],
    );
    std::thread::sleep(Duration::from_millis(300));
    flows.sources(Duration::from_secs(5));
    assert_eq!(
        value(
            &topo,
            2,
            "egress_gateway_standby_packets_total",
            &[("direction", "inbound")]
        ),
        served,
        "no reply reaches gateway 2 any more"
    );
}

/// Opens `n` TCP connections from the pod to `server`, one after another, each with a first exchange.
fn open_connections(env: &Env, server: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    env.topo
        .pod(1, 1)
        .ns
        .run(Duration::from_secs(120), move || {
            (0..n)
                .map(|i| -> Result<std::net::TcpStream, String> {
                    let mut c = traffic::connect(server).map_err(|e| e.to_string())?;
                    c.set_nodelay(true).map_err(|e| e.to_string())?;
                    let hello = format!("hello {i:06}\n");
                    let mut back = vec![0u8; hello.len()];
                    c.write_all(hello.as_bytes())
                        .and_then(|()| c.read_exact(&mut back))
                        .map_err(|e| format!("connection {i}: {e}"))?;
                    if back != hello.as_bytes() {
                        return Err(format!("connection {i}: echoed {back:?}"));
                    }
                    Ok(c)
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .or_diag(env, "the connecting thread")
        .or_diag(env, "open the connections")
}

/// One exchange on every connection; fails the test naming the first that broke.
fn every_connection_answers(env: &Env, conns: &mut [std::net::TcpStream], round: &str) {
    let out = exchange_all(conns, round);
    if let Some((i, e)) = out
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
    {
        let broken = out.iter().filter(|r| r.is_err()).count();
        env.fail(format!(
            "{round}: connection {i} broke ({broken} of {} did): {e}",
            out.len()
        ));
    }
}

/// The replica set scaled 2 → 3 → 2 under load. Three replicas are configured in one set; the third is
/// SIGKILLed before any traffic, so two carry 40 connections and an interactive session. Scale up: the
/// third comes back, gets its bulk transfer and joins the pod's route; 60 new connections are opened (some
/// through it, on the buckets it got back). Scale down: SIGTERM to the third, which hands its flows over and
/// exits. Every connection answers in every round throughout, the session is one connection with no stall
/// of 3 s, and the server never sees a new connection (no source changed).
#[test]
fn scaling_the_set_two_three_two_breaks_no_connection() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let Replicas {
        mut env,
        table,
        both: all,
    } = replicas_of(&mode, &bin, 3);
    let server = SocketAddr::from((RED_SERVER, 7930));
    let echo = traffic::tcp_echo_server(&env.topo.red().ns, server).or_diag(&env, "echo server");

    // two replicas
    kill(&mut env, 3);
    env.wait_route(
        table,
        Ipv4Net::default(),
        &via(&env, 1..=2),
        Duration::from_secs(5),
    );
    let session = start_session(&env, SocketAddr::from((RED_SERVER, 7931)));
    let mut conns = open_connections(&env, server, 40);
    every_connection_answers(&env, &mut conns, "two replicas");

    // three: the third returns, syncs and joins the route
    env.topo
        .gateway_mut(3)
        .respawn()
        .or_diag(&env, "restart gateway 3");
    env.topo
        .gateway_mut(3)
        .wait_ready(common::READY)
        .or_diag(&env, "gateway 3 ready");
    env.wait_route(table, Ipv4Net::default(), &all, Duration::from_secs(5));
    for round in 0..3 {
        every_connection_answers(&env, &mut conns, &format!("three replicas, round {round}"));
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut more = open_connections(&env, server, 60);
    let peers = echo.peers();
    let on_third = peers
        .iter()
        .filter(|p| gateway_of(&env, p.ip()) == 3)
        .count();
    eprintln!(
        "100 connections: {on_third} through gateway 3 (the session through gateway {})",
        gateway_of(&env, session.via.ip())
    );
    if on_third == 0 {
        env.fail("no new connection went through the added replica".to_string());
    }
    every_connection_answers(&env, &mut more, "three replicas, new connections");
    std::thread::sleep(Duration::from_millis(500));

    // two again: the third drains by handing its flows over
    let term = signal(&mut env, 3, libc::SIGTERM);
    for round in 0..4 {
        every_connection_answers(&env, &mut conns, &format!("scaling down, round {round}"));
        every_connection_answers(
            &env,
            &mut more,
            &format!("scaling down, new, round {round}"),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    wait_clean_exit(&mut env, 3, term);
    env.wait_route(
        table,
        Ipv4Net::default(),
        &via(&env, 1..=2),
        Duration::from_secs(5),
    );
    for round in 0..2 {
        every_connection_answers(&env, &mut conns, &format!("two again, round {round}"));
        every_connection_answers(&env, &mut more, &format!("two again, new, round {round}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    end_session(&env, session, "scaled 2 → 3 → 2");
    assert_eq!(echo.peers().len(), 100, "no connection was opened again");
}

/// Two of three replicas get SIGTERM together (a node drain taking two gateway nodes at once, `kubectl
/// delete pod` of two). Neither can hand over to the other, which drains too; both hand their flows and
/// addresses over to the third, which carries every connection on with its address and port. Both exit
/// within seconds, the pod's route ends through the third alone, and no connection is broken or opened
/// again.
#[test]
fn two_replicas_terminated_together_hand_over_to_the_third() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let Replicas { mut env, table, .. } = replicas_of(&mode, &bin, 3);
    let server = SocketAddr::from((RED_SERVER, 7935));
    let echo = traffic::tcp_echo_server(&env.topo.red().ns, server).or_diag(&env, "echo server");
    let session = start_session(&env, SocketAddr::from((RED_SERVER, 7936)));
    let mut conns = open_connections(&env, server, 60);
    let through: Vec<usize> = (1..=3)
        .map(|k| {
            echo.peers()
                .iter()
                .filter(|p| gateway_of(&env, p.ip()) == k)
                .count()
        })
        .collect();
    eprintln!(
        "60 connections through gateways 1, 2, 3: {through:?}; the session through gateway {}",
        gateway_of(&env, session.via.ip())
    );
    if through[0] == 0 || through[1] == 0 {
        env.fail(format!("no connection through gateway 1 or 2: {through:?}"));
    }
    every_connection_answers(&env, &mut conns, "three replicas");
    // every copy on the third
    for x in 1..=2 {
        scenario::wait_metric(
            env.topo.gateway(3),
            "egress_gateway_sync_copies",
            &[("peer", &(x - 1).to_string())],
            METRICS,
            |v| v >= through[x - 1] as f64,
        )
        .or_diag(
            &env,
            "the third replica holds copies of the others' connections",
        );
    }
    std::thread::sleep(Duration::from_millis(500));

    let term = Instant::now();
    for x in 1..=2 {
        signal(&mut env, x, libc::SIGTERM);
    }
    for round in 0..6 {
        every_connection_answers(&env, &mut conns, &format!("after SIGTERM, round {round}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    for x in 1..=2 {
        wait_clean_exit(&mut env, x, term);
    }
    env.wait_route(
        table,
        Ipv4Net::default(),
        &via(&env, [3]),
        Duration::from_secs(5),
    );
    for round in 0..2 {
        every_connection_answers(&env, &mut conns, &format!("the third alone, round {round}"));
        std::thread::sleep(Duration::from_millis(500));
    }
    end_session(&env, session, "two of three replicas terminated together");
    assert_eq!(
        value(&env.topo, 3, "egress_gateway_sync_takeovers_total", &[]),
        2.0,
        "the third took both over"
    );
    assert_eq!(echo.peers().len(), 60, "no connection was opened again");
}

/// [`a_tcp_session_survives_the_death_of_its_replica`] over IPv6: the pod's session to the red server's IPv6
/// address goes through replica X (the agent's IPv6 route to the replicas' link-local next hops); X is
/// SIGKILLed, and the survivor announces X's IPv6 egress address with an unsolicited Neighbor Advertisement
/// (RFC 4861 §7.2.6) and answers Neighbor Solicitations for it, carrying the session on with X's address and
/// port: one connection, no reset.
#[test]
fn an_ipv6_tcp_session_survives_the_death_of_its_replica() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let bin = require_node_agent!();
    let Replicas { mut env, .. } = replicas(&mode, &bin);
    let session = start_session(&env, SocketAddr::from((RED_SERVER6, 7916)));
    let x = gateway_of(&env, session.via.ip());
    eprintln!("the IPv6 session {} goes through gateway {x}", session.via);
    wait_copies(&env, x, 1, "the session's copy on the other replica");
    std::thread::sleep(Duration::from_millis(500));
    let killed = kill(&mut env, x);
    std::thread::sleep(Duration::from_secs(3));
    scenario::wait_metric(
        env.topo.gateway(3 - x),
        "egress_gateway_sync_takeovers_total",
        &[],
        METRICS,
        |v| v >= 1.0,
    )
    .or_diag(&env, "the survivor took X over");
    let when = format!("IPv6, {:?} after the kill", killed.elapsed());
    end_session(&env, session, &when);
}
