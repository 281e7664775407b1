//! Any bytes as a state-sync datagram from a peer: the parser must never panic, and what it accepts must
//! survive a round trip — the records it decodes, written again under the same header, parse back to the
//! same records (so the receiver and the sender agree on every field).
#![no_main]
use forwarder_core::sync::wire::{Datagram, Error, Writer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dg) = Datagram::new_checked(data) else {
        return;
    };
    let header = dg.header();
    let records: Vec<_> = dg.records().filter_map(Result::ok).collect();
    let mut buf = vec![0u8; data.len().max(64) + 4 * records.len() + 64];
    let mut w = Writer::new(&mut buf, &header).expect("room for the header");
    for r in &records {
        match w.push(r) {
            Ok(()) => {}
            // a record the parser accepted is one the writer accepts
            Err(e) => assert_eq!(e, Error::Full, "{r:?}"),
        }
    }
    let n = w.finish();
    let again = Datagram::new_checked(&buf[..n]).expect("the writer's output parses");
    assert_eq!(again.header(), header);
    let back: Vec<_> = again.records().map(|r| r.expect("record")).collect();
    assert_eq!(back[..], records[..back.len()]);
});
