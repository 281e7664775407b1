//! The end-to-end scenarios against the userspace gateway (`egress-gateway run`; listed in docs/harness.md,
//! "End-to-end scenarios against the userspace gateway"), each on its own namespace topology: reachability and
//! SNAT, many connections, internal routing, ICMP (TTL expiry, PMTU, MSS clamp), unsolicited and hostile input
//! (malformed super-packets, a host poisoning the uplink neighbours), port-pool fairness, reload and drain, two
//! nodes at once, IPv6 in the tunnel; the NAT translation log and `egress-gateway flows`; readiness from
//! probes of outside targets.
//! Every test skips without CAP_NET_ADMIN (fails with `EGRESS_REQUIRE_NETNS=1`) and until
//! `target/release/egress-gateway` is built (`cargo build --release -p gateway`).
//!
//! `cargo test -p tests --release --test gateway_e2e` runs them all.

mod common;
mod fairness;
mod flowlog;
mod forwarding;
mod hardening;
mod icmp;
mod ipv6;
mod neighbour;
mod operations;
mod overload;
mod probes;
mod security;
mod steering;
