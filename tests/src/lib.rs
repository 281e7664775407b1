//! Network-namespace harness for the egress gateway's end-to-end tests and benchmark.
//!
//! * [`Topology`] builds the standard scenario — client nodes whose pods are attached Calico-style and
//!   whose kernel `vxlan` device (`egress.calico`) is programmed as Felix does it, gateway pods on an
//!   underlay bridge, a DMZ router with outside servers, an internal network — and removes every namespace
//!   (and so every link) when dropped, also while a panic unwinds.
//! * [`GatewayMode`] picks how a gateway pod forwards: the kernel's own path (reference) or the
//!   userspace `egress-gateway run` binary, started with a generated configuration.
//! * [`Netns::run`] / [`Netns::thread`] run Rust code inside a namespace; [`Netns::spawn`] starts a
//!   process there whose guard kills it on drop.
//! * [`traffic`] has echo servers that record the source address they saw, clients, hash-verified bulk
//!   transfers and `ping`.
//! * [`agent`] drives the node agent (`egress-gateway node`) on a node-agent topology
//!   ([`TopologySpec::node_agent`]): the Kubernetes inventory it reads, its configuration, the running
//!   process; [`kube`] runs a real kube-apiserver for it to watch ([`relay`] carries another namespace's
//!   connections to it); [`firewall`] puts an nftables allowlist on an outside server.
//! * [`demo`] holds what the two namespace demos (`demo-netns`, `demo-kube`) share.
//! * [`require_netns!`] skips a test without CAP_NET_ADMIN (fails instead with `EGRESS_REQUIRE_NETNS=1`).
//!
//! Names are unique per topology (`eg<pid>-<n>-<role>`), so tests may run in parallel, also from two
//! processes at once. See `docs/harness.md`.

pub mod agent;
pub mod cmd;
pub mod demo;
mod error;
pub mod firewall;
pub mod gateway;
pub mod kube;
pub mod netns;
pub mod privilege;
pub mod process;
pub mod raw;
pub mod relay;
pub mod scenario;
pub mod topology;
pub mod traffic;

pub use agent::{AgentConfig, Inventory, NodeAgent, Policy, PolicyRule};
pub use error::{Context, Error, Result};
pub use firewall::Firewall;
pub use gateway::{gateway_binary, Gateway, GatewayMode, Metrics};
pub use netns::{Netns, NsThread};
pub use privilege::{require_netns, NetnsAccess};
pub use process::{Process, TempDir};
pub use topology::{Host, Node, NodeSpec, Pod, PodRoute, PodSpec, Topology, TopologySpec};
