//! State synchronisation between the replicas of one gateway set: what they tell each other so that a
//! surviving replica can carry on the connections of one that died.
//!
//! The model follows the two replication protocols Linux and OpenBSD firewall pairs run:
//! conntrackd's FTFW mode (sequence numbers, cumulative acknowledgements, negative acknowledgements for the
//! gaps, a bulk resynchronisation when a peer joins; conntrack-tools `src/sync-ftfw.c`) and pfsync
//! (sectioned datagrams whose record types a receiver can skip by their length; OpenBSD
//! `sys/net/if_pfsync.h`). A replica sends its flow changes — created, TCP state changed, removed — batched
//! into datagrams, never one per packet, and its peers keep them as passive copies.
//!
//! This module is I/O-free like the rest of the crate: it turns state into bytes and bytes into state.
//!
//! * [`wire`]: the datagram — header, sections, records; parsing of untrusted bytes and building into a
//!   caller's buffer.

pub mod wire;
