//! Operations (scenario 6): a reload during a TCP stream keeps it and changes where new flows go; an
//! invalid file is refused and changes nothing; SIGTERM drains (readiness off at once, established
//! streams go on, new flows refused, exit 0 after `drain_seconds`); a connection whose state was lost is
//! reset at the pod's next segment.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tests::scenario::{self, value, ConfigSpec};
use tests::topology::{BLUE_NET, BLUE_SERVER, INTERNAL_NET, RED_SERVER, VNI};
use tests::{require_netns, require_userspace_gateway, traffic, Metrics};

use crate::common::{self, metrics, METRICS, READY};

const MB: u64 = 1024 * 1024;

fn reloads(m: &Metrics, result: &str) -> f64 {
    value(
        m,
        "egress_gateway_config_reloads_total",
        &[("result", result)],
    )
}

/// SIGHUP with a changed route while a paced 60 MB download runs: the reload is applied
/// (`egress_gateway_config_reloads_total{result="applied"}` 1), the stream completes with the right hash,
/// and new flows follow the new route — the blue network (192.0.2.0/24) moves from the DMZ to the internal
/// uplink, where a host answering for 192.0.2.10 sees the internal egress IP — while a UDP flow to blue
/// established before the reload stays on the DMZ uplink with its external port. Then an invalid file
/// (`tunnel.vni` out of range) during a second stream: refused (`result="refused"`), readiness stays 200,
/// the stream completes, new connections work, the previous configuration stays in force.
#[test]
fn reload_keeps_streams_and_refuses_an_invalid_file() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let pod = &topo.pod(1, 1).ns;
    let bulk_addr = SocketAddr::from((RED_SERVER, 7700));
    let _bulk = traffic::bulk_server(&topo.red().ns, bulk_addr).unwrap();
    let echo_addr = SocketAddr::from((RED_SERVER, 7702));
    let _echo = traffic::tcp_echo_server(&topo.red().ns, echo_addr).unwrap();
    // The real blue server behind the DMZ, and a host on the internal network that also owns 192.0.2.10.
    let blue_addr = SocketAddr::from((BLUE_SERVER, 7701));
    let blue_dmz = traffic::udp_echo_server(&topo.blue().ns, blue_addr).unwrap();
    topo.internal()
        .ns
        .ip(&format!("addr add {BLUE_SERVER}/32 dev br0"))
        .unwrap();
    let blue_internal = traffic::udp_echo_server(&topo.internal().ns, blue_addr).unwrap();
    // A UDP flow to blue established before the reload (the socket lives in the pod's namespace).
    let established = pod
        .run(Duration::from_secs(5), || {
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))
        })
        .unwrap()
        .unwrap();
    exchange(&established, blue_addr, b"established, before");
    assert_eq!(
        scenario::peer_ips(&blue_dmz.peers()),
        vec![IpAddr::V4(gw.dmz_egress)]
    );
    assert!(blue_internal.peers().is_empty());

    // A valid reload in the middle of a stream.
    let len = 60 * MB;
    let stream = scenario::paced_download(pod, bulk_addr, len, 7, 10 * MB).unwrap();
    stream
        .wait_progress(4 * MB, Duration::from_secs(30))
        .unwrap();
    let path = gw.config_path().expect("the harness's configuration file");
    let original = std::fs::read_to_string(path).unwrap();
    let moved = scenario::edit_once(
        &original,
        &format!("routes: [{INTERNAL_NET}"),
        &format!("routes: [{INTERNAL_NET}, {BLUE_NET}"),
    )
    .unwrap();
    scenario::write_atomically(path, &moved).unwrap();
    gw.process().unwrap().signal(libc::SIGHUP);
    scenario::wait_metric(
        gw,
        "egress_gateway_config_reloads_total",
        &[("result", "applied")],
        METRICS,
        |v| v >= 1.0,
    )
    .unwrap();
    let at_reload = stream.received();
    assert!(
        at_reload < len,
        "the stream ended before the reload was applied: the test proves nothing (pace it slower)"
    );
    traffic::udp_echo(pod, blue_addr, b"after").unwrap();
    assert_eq!(
        scenario::peer_ips(&blue_internal.peers()),
        vec![IpAddr::V4(gw.internal_egress)],
        "a new flow to the blue network must take the internal uplink after the reload"
    );
    // The established flow keeps its uplink (and its external port).
    let dmz_seen = blue_dmz.peers();
    let internal_seen = blue_internal.peers().len();
    exchange(&established, blue_addr, b"established, after");
    assert_eq!(
        blue_dmz.last_peer(),
        dmz_seen.last().copied(),
        "the flow established before the reload must stay on the DMZ uplink with its port"
    );
    assert!(blue_dmz.peers().len() > dmz_seen.len());
    assert_eq!(blue_internal.peers().len(), internal_seen);
    let t = stream
        .join(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("the stream across the reload (at byte {at_reload}): {e}"));
    eprintln!("stream across the reload: {:?}", t.elapsed);
    let m = metrics(&topo);
    assert_eq!(reloads(&m, "applied"), 1.0);
    assert_eq!(reloads(&m, "refused"), 0.0);

    // An invalid file in the middle of another stream.
    let stream = scenario::paced_download(pod, bulk_addr, 30 * MB, 8, 10 * MB).unwrap();
    stream
        .wait_progress(2 * MB, Duration::from_secs(30))
        .unwrap();
    let invalid = scenario::edit_once(&moved, &format!("vni: {VNI}"), "vni: 16777216").unwrap();
    scenario::write_atomically(path, &invalid).unwrap();
    gw.process().unwrap().signal(libc::SIGHUP);
    // Refused once for the SIGHUP; the file watcher (every second) may refuse the same file once more.
    let m = scenario::wait_metric(
        gw,
        "egress_gateway_config_reloads_total",
        &[("result", "refused")],
        METRICS,
        |v| v >= 1.0,
    )
    .unwrap();
    assert_eq!(reloads(&m, "applied"), 1.0, "the invalid file was applied");
    assert_eq!(scenario::readiness(gw).unwrap(), 200);
    stream
        .join(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("the stream across the refused reload: {e}"));
    assert_eq!(
        traffic::tcp_echo(pod, echo_addr, b"still here").unwrap(),
        b"still here"
    );
    traffic::udp_echo(pod, blue_addr, b"still internal").unwrap();
    assert_eq!(
        blue_internal.last_peer().map(|p| p.ip()),
        Some(IpAddr::V4(gw.internal_egress)),
        "the configuration before the refused reload must stay in force"
    );
    let log = gw.process().unwrap().log_text();
    assert!(
        log.contains("refused"),
        "the log does not say why the reload was refused:\n{log}"
    );
}

/// Sends `msg` on `sock` to the echo server `to` until the echo comes back (every 200 ms, at most 10 s).
fn exchange(sock: &std::net::UdpSocket, to: SocketAddr, msg: &[u8]) {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("SO_RCVTIMEO");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        sock.send_to(msg, to).expect("send");
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == to && &buf[..n] == msg {
                return;
            }
        }
    }
    panic!(
        "no echo of {:?} from {to} within 10 s",
        String::from_utf8_lossy(msg)
    );
}

/// SIGTERM during a paced download, with `drain_seconds: 8` (a configuration of the test's own):
/// `/readiness` turns 503 at once (`egress_gateway_draining` 1); a new connection from another pod fails
/// and is counted as `draining`; the established stream completes with the right hash while the gateway
/// still runs; the process exits 0 once the drain period is over, not before.
#[test]
fn sigterm_drains_established_flows_and_refuses_new_ones() {
    const DRAIN: Duration = Duration::from_secs(8);
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = common::standard(mode);
    let spec = ConfigSpec {
        drain_seconds: u32::try_from(DRAIN.as_secs()).unwrap(),
        ..ConfigSpec::default()
    };
    let yaml = spec.yaml(topo.gateway(1)).unwrap();
    let mut own = scenario::restart_gateway(&mut topo, 1, "drain", &yaml, READY).unwrap();
    let gw = topo.gateway(1);
    let bulk_addr = SocketAddr::from((RED_SERVER, 7800));
    let echo_addr = SocketAddr::from((RED_SERVER, 7801));
    let _bulk = traffic::bulk_server(&topo.red().ns, bulk_addr).unwrap();
    let echo = traffic::tcp_echo_server(&topo.red().ns, echo_addr).unwrap();
    let late_pod = &topo.pod(2, 1).ns;
    assert_eq!(
        traffic::tcp_echo(late_pod, echo_addr, b"ok").unwrap(),
        b"ok"
    );
    let accepted_before = echo.peers().len();

    let len = 16 * MB;
    let stream = scenario::paced_download(&topo.pod(1, 1).ns, bulk_addr, len, 9, 8 * MB).unwrap();
    stream
        .wait_progress(2 * MB, Duration::from_secs(30))
        .unwrap();
    let sigterm = Instant::now();
    own.process.signal(libc::SIGTERM);
    let at_sigterm = stream.received();
    scenario::poll(
        Duration::from_secs(2),
        Duration::from_millis(10),
        "readiness 503 after SIGTERM",
        || (scenario::readiness(gw).ok() == Some(503)).then_some(()),
    )
    .unwrap();
    let not_ready_after = sigterm.elapsed();
    let m = metrics(&topo);
    assert_eq!(value(&m, "egress_gateway_draining", &[]), 1.0);
    assert_eq!(value(&m, "egress_gateway_ready", &[]), 0.0);

    // A new connection (a new flow) while draining.
    let r = late_pod
        .run(Duration::from_secs(10), move || {
            std::net::TcpStream::connect_timeout(&echo_addr, Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .unwrap();
    assert!(r.is_err(), "a new connection succeeded while draining");
    assert_eq!(echo.peers().len(), accepted_before);
    scenario::wait_metric(
        gw,
        "egress_gateway_drops_total",
        &[("reason", "draining")],
        METRICS,
        |v| v >= 1.0,
    )
    .unwrap();

    let t = stream
        .join(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the established stream during the drain: {e}"));
    let stream_done = sigterm.elapsed();
    assert!(at_sigterm < len, "the stream ended before SIGTERM");
    let still_running = own.process.try_wait().unwrap().is_none();
    assert!(
        still_running,
        "the gateway exited {stream_done:?} after SIGTERM, before the stream ended"
    );
    let status = own
        .process
        .wait_timeout(DRAIN + Duration::from_secs(15))
        .unwrap();
    let exited = sigterm.elapsed();
    eprintln!(
        "readiness 503 after {not_ready_after:?}; stream ({:?}) done {stream_done:?} after SIGTERM; exit after {exited:?}",
        t.elapsed
    );
    assert!(status.success(), "exit status {status} after the drain");
    assert!(
        exited >= DRAIN - Duration::from_millis(500),
        "exited {exited:?} after SIGTERM, before the drain period ({DRAIN:?}) was over"
    );
    let log = own.process.log_text();
    assert!(log.contains("drain"), "{log}");
}

/// A connection whose state the gateway lost — its process restarted, as when a pod's traffic lands on a
/// replica that never saw the connection — is reset at the pod's next segment
/// (`conntrack.reset_unknown_tcp`, RFC 9293 §3.10.7.1): the pod's read fails with ECONNRESET within a
/// second, where before it retransmitted into silence for minutes. `egress_gateway_tcp_resets_sent_total`
/// counts it.
#[test]
fn a_connection_whose_state_was_lost_is_reset_at_once() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = common::standard(mode);
    let echo_addr = SocketAddr::from((RED_SERVER, 7820));
    let _echo = traffic::tcp_echo_server(&topo.red().ns, echo_addr).unwrap();
    let (established, wait_established) = std::sync::mpsc::channel::<()>();
    let (restarted, wait_restart) = std::sync::mpsc::channel::<()>();
    let client = topo
        .pod(1, 1)
        .ns
        .thread(move || -> tests::Result<(Duration, std::io::ErrorKind)> {
            use std::io::{Read, Write};
            let mut s = traffic::connect(echo_addr)?;
            s.write_all(b"one")?;
            let mut b = [0u8; 3];
            s.read_exact(&mut b)?;
            established.send(()).ok();
            wait_restart.recv_timeout(Duration::from_secs(60)).ok();
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let t = Instant::now();
            s.write_all(b"two")?;
            let kind = match s.read(&mut b) {
                Ok(n) => panic!("read {n} bytes after the gateway lost the connection"),
                Err(e) => e.kind(),
            };
            Ok((t.elapsed(), kind))
        })
        .unwrap();
    wait_established
        .recv_timeout(Duration::from_secs(30))
        .expect("the connection is established through gateway 1");
    let gw = topo.gateway_mut(1);
    gw.respawn().expect("restart gateway 1");
    gw.wait_ready(READY).expect("gateway 1 ready again");
    restarted.send(()).unwrap();
    let (took, kind) = client
        .join_timeout(Duration::from_secs(40))
        .expect("the client thread")
        .expect("the client");
    eprintln!("reset after {took:?} ({kind:?})");
    assert_eq!(kind, std::io::ErrorKind::ConnectionReset);
    assert!(took < Duration::from_secs(1), "reset after {took:?}");
    let gw = topo.gateway(1);
    for (name, labels) in [
        ("egress_gateway_tcp_resets_sent_total", &[][..]),
        (
            "egress_gateway_drops_total",
            &[("reason", "tcp_no_syn_for_new_flow")][..],
        ),
    ] {
        scenario::wait_metric(gw, name, labels, METRICS, |v| v >= 1.0)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
