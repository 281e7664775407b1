//! The harness's userspace-mode plumbing, checked with a stand-in binary (`src/bin/fake-gateway.rs`):
//! configuration file, process inside the gateway namespace, readiness polling, metrics, clear errors when
//! the binary dies, and cleanup. Needs CAP_NET_ADMIN.

use std::path::PathBuf;
use std::time::Duration;

use tests::{netns, require_netns, GatewayMode, Topology};

/// The stand-in binary, built by cargo for this test (`tests/src/bin/fake-gateway.rs`).
fn fake_gateway() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-gateway"))
}

#[test]
fn userspace_mode_starts_the_binary_in_the_gateway_namespace() {
    require_netns!();
    let mut topo = Topology::standard(GatewayMode::Userspace {
        binary: fake_gateway(),
    })
    .unwrap();
    topo.gateway_mut(1)
        .wait_ready(Duration::from_secs(10))
        .unwrap();
    let gw = topo.gateway(1);
    // The contract's configuration.
    let config = std::fs::read_to_string(gw.config_path().unwrap()).unwrap();
    assert!(
        config.contains("listen: 172.18.0.3:4790, vni: 4097"),
        "{config}"
    );
    assert!(
        config.contains(
            "interface: gwdmz, egress_ips: [203.0.113.10, 2001:db8:113::10], next_hop: 203.0.113.1"
        ),
        "{config}"
    );
    // Metrics over HTTP from inside the namespace.
    let metrics = gw.metrics().unwrap();
    assert_eq!(metrics.get("egress_fake_up", &[]), Some(1.0));
    assert_eq!(
        metrics.get("egress_packets_total", &[("uplink", "dmz")]),
        Some(0.0)
    );
    // Uplinks carry no kernel address in userspace mode; the kernel does not forward.
    let addrs = gw.ns.ip("-4 -o addr show dev gwdmz").unwrap();
    assert!(addrs.trim().is_empty(), "{addrs}");
    assert_eq!(
        gw.ns.exec("sysctl -n net.ipv4.ip_forward").unwrap().trim(),
        "0"
    );
    assert!(gw.process().unwrap().log_text().contains("fake gateway"));
    // Back to kernel mode: the process is stopped, the namespace rebuilt.
    let pid = gw.process().unwrap().pid();
    topo.set_gateway_mode(1, GatewayMode::Kernel).unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
    let names = topo.namespaces();
    drop(topo);
    let listed = netns::list().unwrap();
    assert!(names.iter().all(|n| !listed.contains(n)));
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

#[test]
fn a_gateway_that_exits_gives_a_clear_error() {
    require_netns!();
    let mut topo = Topology::standard(GatewayMode::Userspace {
        binary: PathBuf::from("/bin/false"),
    })
    .unwrap();
    let err = topo
        .gateway_mut(1)
        .wait_ready(Duration::from_secs(10))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exited") && err.contains("before it was ready"),
        "{err}"
    );
}
