// Shared by the fuzz targets: one gateway configuration, the same as the integration tests use.
use std::net::Ipv4Addr;
use std::sync::Arc;

use forwarder_core::conntrack;
use forwarder_core::pipeline::{Config, Gateway, UplinkConfig, Worker};
use forwarder_core::ports::PortRange;

pub fn worker() -> Worker {
    let net = |s: &str| s.parse::<ipnet::IpNet>().expect("valid literal");
    let config = Config {
        vni: 4097,
        tunnel_ip: Ipv4Addr::new(172, 18, 0, 3),
        tunnel_ip6: Some("fd00:18::3".parse().expect("valid literal")),
        allowed_nodes: vec![net("172.18.0.0/16")],
        pod_cidrs: vec![net("10.244.0.0/16"), net("fd00:244::/48")],
        tunnel_mtu: 1450,
        uplinks: vec![UplinkConfig {
            name: "dmz".into(),
            mtu: 1500,
            egress_v4: vec![Ipv4Addr::new(203, 0, 113, 10)],
            egress_v6: vec!["2001:db8:113::10".parse().expect("valid literal")],
            next_hop_v4: Some(Ipv4Addr::new(203, 0, 113, 1)),
            next_hop_v6: None,
        }],
        routes: vec![(net("0.0.0.0/0"), 0), (net("::/0"), 0)],
        ..Config::default()
    };
    let ct = conntrack::Config {
        max_entries: 4096,
        max_per_source: 1024,
        ..Default::default()
    };
    let gw = Gateway::new(config, ct, PortRange::default()).expect("valid config");
    Worker::new(Arc::new(gw), 1)
}

/// Every packet the worker was given ends in exactly one counted outcome (`Stats::unaccounted`).
pub fn assert_accounted(w: &Worker) {
    let s = w.stats();
    assert_eq!(
        s.unaccounted(),
        0,
        "received {} packets; the outcomes account for another number: {s:?}",
        s.received()
    );
}
