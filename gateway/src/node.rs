//! `egress-gateway node`: the node agent. It turns EgressGatewayPolicies, the pods on this node and the
//! gateways' health into ip rules, per-pod route tables, a vxlan device and its static neighbours, and
//! keeps the kernel holding exactly that (see `docs/node-agent.md`).
//!
//! * [`agent`] — the loop: inputs, health, plan, apply, and its HTTP endpoints;
//! * [`cluster`] — the Kubernetes API watches (this node's pods, gateway pods, namespaces, policies);
//! * [`desired`] — the pure planner (inventory + node + health → desired state);
//! * [`health`] — probing the gateways' `/readiness` and the up/down state machine;
//! * [`state`] — the desired kernel state and what the agent owns;
//! * [`maintenance`] — Calico Enterprise's gateway maintenance annotations on client pods;
//! * [`kernel`] — reading and writing it through rtnetlink (reconcile by diff).

pub(crate) mod agent;
pub(crate) mod cluster;
pub(crate) mod desired;
pub(crate) mod events;
pub(crate) mod health;
pub(crate) mod kernel;
pub(crate) mod maintenance;
pub(crate) mod state;
