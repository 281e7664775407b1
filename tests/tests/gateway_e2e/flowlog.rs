//! The NAT translation log and `egress-gateway flows` (docs/running.md, "Who was that?"): what a security team
//! does with a firewall log line — an egress IP and port — is map it back to a pod, live and afterwards.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tests::scenario::{self, ConfigSpec};
use tests::topology::RED_SERVER;
use tests::{require_netns, require_userspace_gateway, traffic};

use crate::common::{self, READY};

/// Lines of `text` that contain every one of `needles`.
fn lines_with<'a>(text: &'a str, needles: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// Two pods talk to the red server (UDP and TCP). While the flows live, `egress-gateway flows` in the
/// gateway's namespace maps the egress port the server saw back to the pod, with counters; filters select
/// by pod and by egress port. After SIGTERM (drain 1 s) the log file holds a start and an end line for
/// each flow, the end lines with both directions' packets and bytes.
#[test]
fn flows_and_the_translation_log_map_egress_ports_back_to_pods() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let binary = match &mode {
        tests::GatewayMode::Userspace { binary } => binary.clone(),
        tests::GatewayMode::Kernel => unreachable!(),
    };
    let mut topo = common::standard(mode);
    let log_path = topo.dir().join("flows.jsonl");
    // Pod names for the records: pod (1, 1) is app/web; pod (2, 1) is in no file (no name).
    let pods = topo.dir().join("pods");
    std::fs::create_dir_all(&pods).unwrap();
    std::fs::write(
        pods.join("pods.yaml"),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{ name: web, namespace: app }}\nspec: {{ nodeName: node1 }}\n\
             status: {{ podIP: {} }}\n",
            topo.pod(1, 1).ip
        ),
    )
    .unwrap();
    let spec = ConfigSpec {
        drain_seconds: 1,
        ..ConfigSpec::default()
    };
    let yaml = format!(
        "{}flow_log: {{ output: {}, max_bytes: 1048576, max_files: 2, pod_names: [{}] }}\n",
        spec.yaml(topo.gateway(1)).unwrap(),
        log_path.display(),
        pods.display()
    );
    let mut own = scenario::restart_gateway(&mut topo, 1, "flowlog", &yaml, READY).unwrap();
    let gw = topo.gateway(1);
    let (p1, p2) = (topo.pod(1, 1), topo.pod(2, 1));
    let udp_addr = SocketAddr::from((RED_SERVER, 7900));
    let tcp_addr = SocketAddr::from((RED_SERVER, 7901));
    let udp = traffic::udp_echo_server(&topo.red().ns, udp_addr).unwrap();
    let tcp = traffic::tcp_echo_server(&topo.red().ns, tcp_addr).unwrap();
    assert_eq!(
        traffic::udp_echo(&p1.ns, udp_addr, b"ping").unwrap(),
        b"ping"
    );
    assert_eq!(
        traffic::tcp_echo(&p2.ns, tcp_addr, b"hello").unwrap(),
        b"hello"
    );
    let udp_peer = udp.last_peer().expect("the UDP server saw the pod");
    let tcp_peer = tcp.last_peer().expect("the TCP server saw the pod");
    assert_eq!(udp_peer.ip(), IpAddr::V4(gw.dmz_egress));

    // Live: the firewall's view (egress IP:port) back to the pod.
    let bin = binary.to_string_lossy().into_owned();
    let flows = |args: &[&str]| -> String {
        let mut cmd = vec![bin.as_str(), "flows", "--json"];
        cmd.extend_from_slice(args);
        gw.ns.exec_args(&cmd).unwrap()
    };
    let all = flows(&[]);
    let egress = udp_peer.to_string();
    let line = lines_with(&all, &[&format!("\"egress\":\"{egress}\"")]);
    assert_eq!(line.len(), 1, "one live flow on {egress}:\n{all}");
    assert!(
        line[0].contains(&format!("\"pod\":\"{}:", p1.ip)),
        "{}",
        line[0]
    );
    assert!(
        line[0].contains(&format!("\"dst\":\"{udp_addr}\"")),
        "{}",
        line[0]
    );
    assert!(
        line[0].contains("\"packets_out\":1,\"bytes_out\":32,"),
        "{}",
        line[0]
    );
    assert!(
        line[0].contains("\"packets_in\":1,\"bytes_in\":32"),
        "{}",
        line[0]
    );
    assert!(line[0].contains("\"proto\":\"udp\""), "{}", line[0]);
    let by_port = flows(&["--egress-port", &tcp_peer.port().to_string()]);
    assert_eq!(
        lines_with(&by_port, &["\"event\":\"live\""]).len(),
        1,
        "{by_port}"
    );
    assert!(
        by_port.contains(&format!("\"pod\":\"{}:", p2.ip)),
        "{by_port}"
    );
    let by_pod = flows(&["--pod", &p2.ip.to_string()]);
    assert!(
        lines_with(&by_pod, &[&p1.ip.to_string()]).is_empty(),
        "{by_pod}"
    );
    // The table form names the pod too.
    let table = gw
        .ns
        .exec_args(&[&bin, "flows", "--egress-port", &udp_peer.port().to_string()])
        .unwrap();
    assert!(table.starts_with("POD"), "{table}");
    assert!(
        table.contains(&p1.ip.to_string()) && table.ends_with("1 flows\n"),
        "{table}"
    );

    // The writer's counters: both start records queued and written, none dropped.
    let m = scenario::wait_metric(
        gw,
        "egress_gateway_flow_log_records_total",
        &[("result", "written")],
        Duration::from_secs(5),
        |v| v >= 2.0,
    )
    .unwrap();
    let records = |result: &str| {
        m.get(
            "egress_gateway_flow_log_records_total",
            &[("result", result)],
        )
        .unwrap_or(-1.0)
    };
    assert_eq!(records("queued"), 2.0);
    assert_eq!(records("dropped"), 0.0);
    assert_eq!(records("failed"), 0.0);

    // Afterwards: the log. SIGTERM ends the remaining flows with the gateway.
    own.process.signal(libc::SIGTERM);
    let status = own.process.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    for (peer, pod) in [(udp_peer, p1.ip), (tcp_peer, p2.ip)] {
        let e = format!("\"egress\":\"{peer}\"");
        let starts = lines_with(&log, &["\"event\":\"start\"", &e]);
        let ends = lines_with(&log, &["\"event\":\"end\"", &e]);
        assert_eq!((starts.len(), ends.len()), (1, 1), "{peer}:\n{log}");
        assert!(
            ends[0].contains(&format!("\"pod\":\"{pod}:")),
            "{}",
            ends[0]
        );
        assert!(ends[0].contains("\"end\":\"20"), "{}", ends[0]);
        assert!(!ends[0].contains("\"packets_in\":0,"), "{}", ends[0]);
    }
    let tcp_end = lines_with(&log, &["\"event\":\"end\"", "\"proto\":\"tcp\""]);
    assert!(tcp_end[0].contains("\"tcp_state\":"), "{}", tcp_end[0]);
    assert!(
        log.lines().all(|l| l.starts_with('{') && l.ends_with('}')),
        "{log}"
    );
}
