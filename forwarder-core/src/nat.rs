//! Network address translation: what happens to a packet's bytes once the pipeline has decided its fate.
//!
//! * [`meta`] — a packet's L3/L4 summary (offsets, addresses, ports, fragment info) taken from a buffer;
//! * [`rewrite`] — SNAT of outbound and DNAT of inbound packets with RFC 1624 incremental checksums,
//!   TTL / hop-limit decrement;
//! * [`icmp`] — ICMP errors: the ones the gateway originates (time exceeded, fragmentation needed / packet
//!   too big, administratively prohibited) and the translation of errors that refer to a translated flow
//!   (RFC 5508), for IPv4 and IPv6;
//! * [`reset`] — the TCP reset that tells a pod its connection has no state here (RFC 9293 §3.10.7.1);
//! * [`frag`] — bounded per-worker memory that lets the later fragments of a datagram follow its first;
//! * [`fragment`] — IPv4 fragmentation, in place, of a packet too big for the next link (DF clear).
//!
//! Nothing here decides *whether* to translate; that is the pipeline's job.

pub mod frag;
pub mod fragment;
pub mod icmp;
pub mod meta;
pub mod reset;
pub mod rewrite;
