//! Overload: more offered than the gateway carries is shed where it costs nothing — by the kernel at the
//! gateway's sockets, before a worker spends any work on the packet — and every such drop is counted, so
//! that what was offered equals what the gateway received plus what it counts as shed.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use tests::raw;
use tests::scenario::{self, drop_count, packets};
use tests::topology::RED_SERVER;
use tests::{require_netns, require_userspace_gateway, traffic, Metrics};

use crate::common::{self, metrics, METRICS};

/// Sends SIGCONT to the gateway's process group when dropped, so that a failing test never leaves it
/// stopped.
struct Resume<'a>(&'a tests::process::Process);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

/// The gateway is stopped (SIGSTOP) while a pod sends 60,000 datagrams through the tunnel (to a server
/// socket that never answers) and the red server 60,000 frames to the egress IP: far more than the
/// sockets' receive queues hold. Once it runs
/// again, each side balances exactly: received by the pipeline + counted as `tunnel_queue_full` /
/// `uplink_queue_full` = sent, and some were shed on each side. Then it forwards as before.
#[test]
fn overload_is_shed_at_the_sockets_and_counted() {
    const EACH: usize = 60_000;
    require_netns!();
    let mode = require_userspace_gateway!();
    let topo = common::standard(mode);
    let gw = topo.gateway(1);
    let echo = SocketAddr::from((RED_SERVER, 7208));
    let _server = traffic::udp_echo_server(&topo.red().ns, echo).unwrap();
    let pod = &topo.pods()[0];
    // The flood's destination: a socket that never reads (nothing comes back, not even ICMP).
    let sink_addr = SocketAddr::from((RED_SERVER, 7209));
    let _sink = topo
        .red()
        .ns
        .run(Duration::from_secs(5), move || UdpSocket::bind(sink_addr))
        .unwrap()
        .unwrap();
    // Warm up: every neighbour on the way is resolved while the gateway answers ARP.
    scenario::udp_exchanges(&pod.ns, echo, 3, "warm-up").unwrap();
    // Workers publish every 100 ms: let the warm-up's counts in before taking the baseline.
    std::thread::sleep(Duration::from_millis(500));
    let before = metrics(&topo);
    let process = gw.process().expect("the userspace gateway's process");
    process.signal(libc::SIGSTOP);
    let resume = Resume(process);
    let small = vec![vec![0x5a_u8; 32]; EACH];
    raw::send_udp(&pod.ns, SocketAddr::from((pod.ip, 0)), sink_addr, &small).unwrap();
    // Unsolicited to the egress IP (no flow): the pipeline drops what it reads, but first it must read it.
    raw::send_udp(
        &topo.red().ns,
        SocketAddr::from((RED_SERVER, 0)),
        SocketAddr::from((gw.dmz_egress, 9)),
        &small,
    )
    .unwrap();
    drop(resume);
    let delta = |m: &Metrics, f: &dyn Fn(&Metrics) -> f64| f(m) - f(&before);
    let tunnel_rx = |m: &Metrics| packets(m, "tunnel_rx", None);
    let tunnel_shed = |m: &Metrics| drop_count(m, "tunnel_queue_full");
    let uplink_rx = |m: &Metrics| packets(m, "uplink_rx", Some("dmz"));
    let uplink_shed = |m: &Metrics| drop_count(m, "uplink_queue_full");
    let want = EACH as f64;
    // On a timeout the assertions below report the last counts.
    let m = scenario::poll(
        METRICS,
        Duration::from_millis(100),
        "received + shed = sent",
        || {
            let m = metrics(&topo);
            let done = delta(&m, &tunnel_rx) + delta(&m, &tunnel_shed) >= want
                && delta(&m, &uplink_rx) + delta(&m, &uplink_shed) >= want;
            done.then_some(m)
        },
    )
    .unwrap_or_else(|_| metrics(&topo));
    let (t_rx, t_shed) = (delta(&m, &tunnel_rx), delta(&m, &tunnel_shed));
    let (u_rx, u_shed) = (delta(&m, &uplink_rx), delta(&m, &uplink_shed));
    eprintln!("tunnel: {t_rx} received, {t_shed} shed; uplink: {u_rx} received, {u_shed} shed (of {EACH} each)");
    assert!(
        t_shed > 0.0 && u_shed > 0.0,
        "nothing was shed: the test did not overload the gateway"
    );
    // A few frames besides ours may arrive meanwhile (ARP, IPv6 neighbour discovery).
    assert!(
        (want..=want + 20.0).contains(&(t_rx + t_shed)),
        "tunnel: received {t_rx} + shed {t_shed} must equal the {EACH} sent"
    );
    assert!(
        (want..=want + 20.0).contains(&(u_rx + u_shed)),
        "uplink: received {u_rx} + shed {u_shed} must equal the {EACH} sent"
    );
    // And it still forwards.
    scenario::udp_exchanges(&pod.ns, echo, 3, "after").unwrap();
}
