//! End-to-end scenarios of the node agent (`egress-gateway node`) on a node-agent topology
//! ([`TopologySpec::node_agent`](tests::TopologySpec::node_agent)): bare client nodes that the agent
//! programs from Kubernetes YAML, real userspace gateways, node routing with masquerade for unsteered
//! traffic. Each test builds its own topology, starts the agent on node 1 and fails with the agent's and the
//! gateways' log tails and the node's rules and routes.
//!
//! * `routing` — legacy firewall (only the egress IP is admitted), red/blue per destination (IPv4 and IPv6),
//!   single exit (DMZ and internal uplinks of one gateway);
//! * `failover` — ECMP over two replicas, failover time after SIGKILL, the gateway's return; a draining
//!   gateway keeps its pods and gets no new ones;
//! * `resilient` — three replicas on a resilient nexthop group: a dead one moves only its own flows, and
//!   its return moves no busy flow;
//! * `policy` — a missing policy blocks (fail closed) but not cluster traffic; a live policy edit;
//! * `lifecycle` — `--cleanup` removes what the agent made and nothing else;
//! * `kube` — the agent watching a real kube-apiserver: new pod, policy edit, invalid policy, API server
//!   away (also across an agent restart), gateway deleted, RBAC denied (skips without the API server
//!   binaries, `scripts/kube-apiserver.sh build`; fails instead with `EGRESS_REQUIRE_KUBE=1`).
//!
//! They skip without CAP_NET_ADMIN, without `target/release/egress-gateway` or while it has no `node`
//! subcommand (they fail instead with `EGRESS_REQUIRE_NETNS=1`):
//!
//! ```sh
//! cargo build --release -p gateway
//! EGRESS_REQUIRE_NETNS=1 cargo test --release -p tests --test node_agent -- --nocapture --test-threads=1
//! ```

mod common;
mod explain;
mod failover;
mod kube;
mod lifecycle;
mod policy;
mod resilient;
mod routing;
