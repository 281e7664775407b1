//! Any bytes as an Ethernet frame on the uplink: the pipeline must never panic, never create state, and
//! count every frame under one outcome.
#![no_main]
use std::sync::Mutex;
use std::sync::OnceLock;

use forwarder_core::pipeline::{Worker, INBOUND_HEADROOM};
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
    let mut buf = vec![0u8; INBOUND_HEADROOM + data.len() + 1600];
    buf[INBOUND_HEADROOM..INBOUND_HEADROOM + data.len()].copy_from_slice(data);
    let before = w.gateway().table().len();
    let _ = w.inbound(
        0,
        &mut buf,
        INBOUND_HEADROOM,
        data.len(),
        Instant::from_secs(1),
    );
    assert_eq!(
        w.gateway().table().len(),
        before,
        "inbound traffic created a flow"
    );
    common::assert_accounted(&w);
});
