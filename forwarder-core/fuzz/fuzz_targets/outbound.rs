//! Any bytes as a VXLAN datagram from an allowed node, twice (the second time a flow may exist): the
//! pipeline must never panic, whatever it emits must lie inside the buffer, and every datagram is counted
//! under one outcome.
#![no_main]
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::OnceLock;

use forwarder_core::pipeline::{Action, Worker};
use forwarder_core::Instant;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

static WORKER: OnceLock<Mutex<Worker>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let mut w = WORKER
        .get_or_init(|| Mutex::new(common::worker()))
        .lock()
        .expect("not poisoned");
    let mut buf = vec![0u8; data.len() + 1600];
    for round in 0..2u64 {
        buf[..data.len()].copy_from_slice(data);
        match w.outbound(
            Ipv4Addr::new(172, 18, 0, 2),
            &mut buf,
            data.len(),
            Instant::from_secs(1 + round),
        ) {
            Action::Forward { frame, .. } => assert!(frame.len() >= 14),
            Action::ToTunnel { datagram, .. } => assert!(datagram.len() >= 22),
            Action::Neighbour | Action::Drop(_) => {}
        }
        common::assert_accounted(&w);
    }
});
