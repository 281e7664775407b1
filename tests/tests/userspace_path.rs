//! The standard topology with the userspace gateway (`egress-gateway run`), the same checks as the kernel
//! path. Needs the binary (`cargo build --release -p gateway`, or `EGRESS_GATEWAY_BIN=...`) and
//! CAP_NET_ADMIN; skipped with the reason otherwise (failed with `EGRESS_REQUIRE_NETNS=1`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tests::topology::{INTERNAL_SERVER, RED_SERVER};
use tests::{require_netns, require_userspace_gateway, traffic, Topology};

const READY: Duration = Duration::from_secs(30);

#[test]
fn userspace_gateway_snat_to_dmz_and_internal() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = Topology::standard(mode).unwrap();
    topo.gateway_mut(1).wait_ready(READY).unwrap();
    let gw = topo.gateway(1);
    traffic::ping(&topo.pod(1, 1).ns, IpAddr::V4(RED_SERVER), 3).unwrap();
    let red = SocketAddr::from((RED_SERVER, 7000));
    let internal = SocketAddr::from((INTERNAL_SERVER, 7000));
    let red_tcp = traffic::tcp_echo_server(&topo.red().ns, red).unwrap();
    let red_udp = traffic::udp_echo_server(&topo.red().ns, red).unwrap();
    let int_tcp = traffic::tcp_echo_server(&topo.internal().ns, internal).unwrap();
    for pod in topo.pods() {
        assert_eq!(traffic::tcp_echo(&pod.ns, red, b"tcp").unwrap(), b"tcp");
        assert_eq!(red_tcp.last_peer().unwrap().ip(), IpAddr::V4(gw.dmz_egress));
        assert_eq!(traffic::udp_echo(&pod.ns, red, b"udp").unwrap(), b"udp");
        assert_eq!(red_udp.last_peer().unwrap().ip(), IpAddr::V4(gw.dmz_egress));
        assert_eq!(
            traffic::tcp_echo(&pod.ns, internal, b"int").unwrap(),
            b"int"
        );
        assert_eq!(
            int_tcp.last_peer().unwrap().ip(),
            IpAddr::V4(gw.internal_egress)
        );
    }
    let metrics = gw.metrics().unwrap();
    assert!(!metrics.samples().is_empty(), "no metrics");
}

#[test]
fn userspace_gateway_bulk_transfers_verified_by_hash() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = Topology::standard(mode).unwrap();
    topo.gateway_mut(1).wait_ready(READY).unwrap();
    let addr = SocketAddr::from((RED_SERVER, 7100));
    let _server = traffic::bulk_server(&topo.red().ns, addr).unwrap();
    let pod = &topo.pod(1, 1).ns;
    let len = 50 * 1024 * 1024;
    traffic::bulk_upload(pod, addr, len, 1, Duration::from_secs(120)).unwrap();
    traffic::bulk_download(pod, addr, len, 2, Duration::from_secs(120)).unwrap();
}

/// IPv6 inside the IPv4 tunnel through the userspace gateway: the pods' fd00:244:… addresses reach the DMZ
/// (through its IPv6 router, resolved by NDP) and the internal network (on-link) as the IPv6 egress addresses.
#[test]
fn userspace_gateway_ipv6_inside_the_tunnel() {
    require_netns!();
    let mode = require_userspace_gateway!();
    let mut topo = Topology::standard(mode).unwrap();
    topo.gateway_mut(1).wait_ready(READY).unwrap();
    tests::scenario::assert_ipv6_egress(&topo);
}
