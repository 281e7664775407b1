//! State sync between the replicas of one gateway set, on the namespace topology: two userspace gateways in
//! one set (`sync:` with a shared key, ordinals 0 and 1), the pods sending through gateway 1. See
//! `docs/failover.md`.
//!
//! Every test skips without CAP_NET_ADMIN (fails with `EGRESS_REQUIRE_NETNS=1`) and until
//! `target/release/egress-gateway` is built. `cargo test -p tests --release --test stateful_failover`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use forwarder_core::sync::wire::{Header, Hello, PeerState, Record, Writer};
use tests::gateway::SYNC_PORT;
use tests::scenario::{self, UdpFlows};
use tests::topology::RED_SERVER;
use tests::{require_netns, require_userspace_gateway, traffic};
use tests::{GatewayMode, Topology, TopologySpec};

/// How long a gateway may take to become ready (start-up on a busy shared machine).
const READY: Duration = Duration::from_secs(30);
/// How long counters may take to show what happened (the sync thread publishes every 100 ms).
const METRICS: Duration = Duration::from_secs(10);
/// Long-lived UDP flows the pod keeps through gateway 1.
const FLOWS: usize = 64;

/// Two gateways in one sync set, both ready; the pods' traffic goes through gateway 1.
fn pair(mode: GatewayMode) -> Topology {
    let mut spec = TopologySpec::standard(mode.clone());
    spec.gateways = vec![mode.clone(), mode];
    spec.sync_sets = vec![vec![1, 2]];
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
