//! `egress-gateway node`: the node agent. It turns EgressGatewayPolicies, the pods on this node and the
//! gateways' health into ip rules, per-pod route tables, a vxlan device and its static neighbours, and
//! keeps the kernel holding exactly that (see `docs/node-agent.md`).
//!
//! * [`state`] — the desired kernel state and what the agent owns;
//! * [`kernel`] — reading and writing it through rtnetlink (reconcile by diff).

pub(crate) mod desired;
pub mod kernel;
pub mod state;
