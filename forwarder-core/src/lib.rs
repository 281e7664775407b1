//! The egress gateway's packet core: wire formats, checksums, NAT, connection tracking, port allocation,
//! routing and the per-packet pipeline.
//!
//! This crate performs no I/O, starts no threads and never reads a clock: time comes in as an
//! [`Instant`] argument, and packets live in buffers owned by the caller. That keeps every
//! behaviour testable without privileges and makes the per-packet path allocation-free.
//!
//! Layers, bottom to top (a module only imports from layers beneath it):
//!
//! | layer | modules | job |
//! |---|---|---|
//! | vocabulary | [`reason`], [`time`], [`flow`] | drop reasons, time, flow keys |
//! | wire | [`wire`] | bytes ↔ fields for Ethernet, ARP, IPv4, IPv6, ICMP, UDP, TCP, VXLAN; checksums |
//! | state | [`route`], [`ports`], [`conntrack`] | longest-prefix routes, external port pools, the lock-free flow table |
//! | translation | [`nat`] | SNAT/DNAT rewrite, ICMP error translation, MSS clamp, TTL, fragments |
//! | offload | [`offload`] | virtio-net headers: partial checksums, GSO validation, segmentation, and preparation of super-packets left whole |
//! | policy | [`policy`] | Calico selectors, EgressGatewayPolicy, (pod, destination) → gateways |
//! | pipeline | [`pipeline`] | `outbound` (tunnel → uplink) and `inbound` (uplink → tunnel), returning an [`Action`](pipeline::Action) |
//! | replication | [`sync`] | the state-sync protocol between the replicas of a gateway set |
#![warn(missing_docs)]

pub mod conntrack;
pub mod flow;
pub mod nat;
pub mod offload;
pub mod pipeline;
pub mod policy;
pub mod ports;
pub mod reason;
pub mod route;
pub mod sync;
pub mod time;
pub mod wire;

pub use reason::Reason;
pub use time::Instant;
