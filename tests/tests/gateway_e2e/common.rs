//! What every scenario shares: building the standard topology with a ready gateway, and message helpers.

use std::time::Duration;

use tests::raw::{Frame, IpInfo, L4};
use tests::topology::VXLAN_PORT;
use tests::{GatewayMode, Metrics, Topology, TopologySpec};

/// How long a gateway may take to become ready (start-up on a busy shared machine).
pub(crate) const READY: Duration = Duration::from_secs(30);
/// How long to wait for counters to show what a test sent (workers publish every 100 ms).
pub(crate) const METRICS: Duration = Duration::from_secs(10);

/// The standard topology with its userspace gateway ready.
pub(crate) fn standard(mode: GatewayMode) -> Topology {
    build(TopologySpec::standard(mode))
}

/// `spec` built, its gateway 1 ready.
pub(crate) fn build(spec: TopologySpec) -> Topology {
    let mut topo = Topology::build(spec).expect("build the topology");
    topo.gateway_mut(1)
        .wait_ready(READY)
        .expect("gateway ready");
    topo
}

/// The gateway's current metrics.
pub(crate) fn metrics(topo: &Topology) -> Metrics {
    topo.gateway(1).metrics().expect("GET /metrics")
}

/// A capture filter: VXLAN that the capturing interface sends towards a node (UDP to port 4790).
pub(crate) fn sent_into_tunnel(f: &Frame) -> bool {
    f.outgoing
        && matches!(
            f.ip,
            Some(IpInfo {
                l4: L4::Udp {
                    dst: VXLAN_PORT,
                    ..
                },
                ..
            })
        )
}
