//! Port-pool fairness under connection churn: every pod opens and closes TCP connections toward one server
//! as fast as it can, through a gateway whose DMZ egress IP has only 256 ports, for
//! `EGRESS_FAIRNESS_SECONDS` (default 15) per gateway mode — many more connections than ports. The userspace
//! gateway must serve every pod (none starved) and keep its rate (no collapse once the ports have all been
//! used: finished connections hand their port over, docs/nat.md); the kernel's path (iptables SNAT
//! `--to-source IP:20000-20255`) runs the same load afterwards and both are printed side by side.
//! Also: closed connections do not count against a pod's quota of flows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tests::topology::RED_SERVER;
use tests::{
    require_netns, require_userspace_gateway, traffic, GatewayMode, Topology, TopologySpec,
};

use crate::common;

const PORTS: (u16, u16) = (20_000, 20_255);

/// Successful connections of one pod, per second of the run.
struct PodLoad {
    pod: String,
    per_second: Vec<u64>,
    failed: u64,
}

impl PodLoad {
    fn total(&self) -> u64 {
        self.per_second.iter().sum()
    }
    /// Connections per second over seconds `from..to` of the run.
    fn rate(&self, from: usize, to: usize) -> f64 {
        let n: u64 = self.per_second[from..to].iter().sum();
        n as f64 / (to - from) as f64
    }
}

fn seconds() -> u64 {
    std::env::var("EGRESS_FAIRNESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
        .max(6)
}

/// Every pod of `topo` churns connections to `addr` for `secs` seconds at once.
fn churn(topo: &Topology, addr: SocketAddr, secs: u64) -> Vec<PodLoad> {
    let loads: Vec<PodLoad> = std::thread::scope(|s| {
        let handles: Vec<_> = topo
            .pods()
            .iter()
            .map(|pod| {
                s.spawn(move || {
                    let slots = usize::try_from(secs).expect("seconds");
                    pod.ns
                        .run(Duration::from_secs(secs + 30), move || {
                            let start = Instant::now();
                            let end = start + Duration::from_secs(secs);
                            let mut per_second = vec![0u64; slots];
                            let mut failed = 0;
                            while Instant::now() < end {
                                let ok = (|| -> std::io::Result<()> {
                                    let mut c =
                                        TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                                    c.set_read_timeout(Some(Duration::from_secs(2)))?;
                                    c.write_all(b"x")?;
                                    let mut b = [0u8; 1];
                                    c.read_exact(&mut b)?;
                                    Ok(())
                                })();
                                let at = usize::try_from(start.elapsed().as_secs()).expect("small");
                                match ok {
                                    Ok(()) if at < slots => per_second[at] += 1,
                                    Ok(()) => {}
                                    Err(_) => failed += 1,
                                }
                            }
                            (per_second, failed)
                        })
                        .expect("run in the pod")
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(topo.pods())
            .map(|(h, pod)| {
                let (per_second, failed) = h.join().expect("pod thread");
                PodLoad {
                    pod: pod.ip.to_string(),
                    per_second,
                    failed,
                }
            })
            .collect()
    });
    loads
}

fn print(mode: &str, loads: &[PodLoad], secs: u64) {
    let third = usize::try_from(secs / 3).expect("small");
    let n = usize::try_from(secs).expect("small");
    for l in loads {
        eprintln!(
            "{mode:>9} pod {:<12} {:>7} connections ({:>6.1}/s; first third {:>6.1}/s, last third {:>6.1}/s), {} failed",
            l.pod,
            l.total(),
            l.rate(0, n),
            l.rate(0, third),
            l.rate(n - third, n),
            l.failed
        );
    }
}

#[test]
fn churning_pods_share_a_small_port_range_without_starvation_or_collapse() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let secs = seconds();
    let mut spec = TopologySpec::standard(mode);
    spec.ports = Some(PORTS);
    let mut topo = common::build(spec);
    for pod in topo.pods() {
        // the pods reuse their own TIME-WAIT ports (timestamps on), so that the pods' ephemeral ports do not
        // run out before the gateway's do
        pod.ns.sysctl("net.ipv4.tcp_tw_reuse", "1").expect("sysctl");
    }
    let addr = SocketAddr::from((RED_SERVER, 7300));
    let _server = traffic::tcp_echo_server(&topo.red().ns, addr).expect("server");
    let ours = churn(&topo, addr, secs);
    let ports = u64::from(PORTS.1 - PORTS.0 + 1);
    // the kernel's path needs iptables (scripts/install-deps.sh); without it only ours is measured
    let have_iptables = std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let kernel = if have_iptables {
        topo.set_gateway_mode(1, GatewayMode::Kernel)
            .expect("kernel mode");
        Some(churn(&topo, addr, secs))
    } else {
        None
    };
    eprintln!(
        "{secs} s per mode, {ports} ports on the egress IP, one server, every pod at full rate:"
    );
    print("userspace", &ours, secs);
    match &kernel {
        Some(k) => print("kernel", k, secs),
        None => {
            eprintln!("   kernel: not measured (no iptables; scripts/install-deps.sh installs it)")
        }
    }
    let total: u64 = ours.iter().map(PodLoad::total).sum();
    assert!(
        total > 4 * ports,
        "only {total} connections for {ports} ports"
    );
    let max = ours.iter().map(PodLoad::total).max().expect("pods");
    for l in &ours {
        assert!(
            l.total() * 4 >= max,
            "pod {} starved: {} against {max}",
            l.pod,
            l.total()
        );
    }
    let third = usize::try_from(secs / 3).expect("small");
    let n = usize::try_from(secs).expect("small");
    let first: f64 = ours.iter().map(|l| l.rate(0, third)).sum();
    let last: f64 = ours.iter().map(|l| l.rate(n - third, n)).sum();
    assert!(
        last * 3.0 >= first,
        "rate collapsed: {first:.0}/s in the first third, {last:.0}/s in the last"
    );
}

/// Only open flows count against a pod's quota (`conntrack.max_per_source`, docs/nat.md), as Linux's
/// `nf_conncount` counts them. With a quota of 32: one pod opens and closes 500 connections toward one server,
/// one after another, and every one is let in, and a UDP request right after is answered (that UDP flow now
/// holds one unit); while the pod holds connections open, exactly 31 are let in and the next one and a new
/// UDP flow are refused; once it has closed them, both get through again.
#[test]
fn closed_connections_do_not_count_against_the_quota() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut spec = TopologySpec::standard(mode);
    spec.max_per_source = Some(32);
    let topo = common::build(spec);
    let tcp = SocketAddr::from((RED_SERVER, 7310));
    let udp = SocketAddr::from((RED_SERVER, 7311));
    let _tcp_server = traffic::tcp_echo_server(&topo.red().ns, tcp).expect("tcp server");
    let _udp_server = traffic::udp_echo_server(&topo.red().ns, udp).expect("udp server");
    let pod = &topo.pod(1, 1).ns;
    let echo = move || -> std::io::Result<TcpStream> {
        let mut c = TcpStream::connect_timeout(&tcp, Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.write_all(b"x")?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        Ok(c)
    };
    let refused: Vec<String> = pod
        .run(Duration::from_secs(120), move || {
            (0..500)
                .filter_map(|i| echo().err().map(|e| format!("{i}: {e}")))
                .collect()
        })
        .expect("run in the pod");
    assert!(
        refused.is_empty(),
        "closed connections counted: {} of 500 refused, the first {:?}",
        refused.len(),
        refused.first()
    );
    assert_eq!(
        traffic::udp_echo(pod, udp, b"after").expect("UDP after 500 closed connections"),
        b"after"
    );
    // the last connections' FINs from the server are through by now
    std::thread::sleep(Duration::from_millis(300));
    let (open, next) = pod
        .run(Duration::from_secs(120), move || {
            let mut open = Vec::new();
            let next = loop {
                match echo() {
                    Ok(c) if open.len() < 40 => open.push(c),
                    other => break other.map(|_| ()),
                }
            };
            (open, next)
        })
        .expect("run in the pod");
    assert_eq!(
        open.len(),
        31,
        "open connections let in (quota 32, one UDP flow)"
    );
    assert!(next.is_err(), "the 33rd flow was let in");
    assert!(
        traffic::udp_echo(pod, udp, b"over").is_err(),
        "a new UDP flow over the quota was let in"
    );
    drop(open);
    std::thread::sleep(Duration::from_millis(300));
    pod.run(Duration::from_secs(30), move || echo().map(|_| ()))
        .expect("run in the pod")
        .expect("a connection once the others are closed");
    assert_eq!(
        traffic::udp_echo(pod, udp, b"again").expect("UDP once the connections are closed"),
        b"again"
    );
}
