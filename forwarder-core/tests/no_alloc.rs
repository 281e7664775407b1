//! The per-packet path allocates nothing: a counting global allocator watches established flows pass both
//! ways, new flows being created, and drops.
#![allow(clippy::unwrap_used)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use forwarder_core::pipeline::{Action, TunnelPacket};
use forwarder_core::Instant;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

// SAFETY: every call is forwarded unchanged to the system allocator; we only count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let r = f();
    COUNTING.store(false, Ordering::SeqCst);
    (r, ALLOCS.load(Ordering::SeqCst))
}

#[test]
fn established_flows_and_drops_allocate_nothing() {
    let mut w = worker();
    let out_pkt = pod_udp(SERVER, 4000, 53, &[7; 18]);
    let mut buf = vec![0u8; 4096];
    // Warm up: create the flow, learn the external port; lets lazy statics and the epoch collector settle.
    buf[..out_pkt.len()].copy_from_slice(&out_pkt);
    let ext = match w.outbound(NODE, &mut buf, out_pkt.len(), Instant::from_secs(1)) {
        Action::Forward { frame, .. } => l4_ports(&frame[14..]).0,
        other => panic!("{other:?}"),
    };
    let in_pkt = outside_udp(SERVER, DMZ_EGRESS, 53, ext, &[9; 18]);
    let bad = pod_udp(SERVER, 4000, 53, &[7; 18])[..30].to_vec();
    let g = w.gateway().clone();
    let (_, n) = counted(|| {
        let _guard = g.pin();
        for i in 0..10_000u64 {
            let now = Instant::from_millis(2_000 + i);
            buf[..out_pkt.len()].copy_from_slice(&out_pkt);
            assert!(matches!(
                w.outbound(NODE, &mut buf, out_pkt.len(), now),
                Action::Forward { .. }
            ));
            buf[64..64 + in_pkt.len()].copy_from_slice(&in_pkt);
            assert!(matches!(
                w.inbound(0, &mut buf, 64, in_pkt.len(), now),
                Action::ToTunnel { .. }
            ));
            buf[..bad.len()].copy_from_slice(&bad);
            assert!(matches!(
                w.outbound(NODE, &mut buf, bad.len(), now),
                Action::Drop(_)
            ));
        }
    });
    assert_eq!(n, 0, "{n} heap allocations on the established-flow path");

    // The batch calls too.
    let mut bufs: Vec<Vec<u8>> = (0..40).map(|_| vec![0u8; 2048]).collect();
    let (_, n) = counted(|| {
        for round in 0..200u64 {
            let now = Instant::from_millis(30_000 + round);
            for b in bufs.iter_mut() {
                b[..out_pkt.len()].copy_from_slice(&out_pkt);
            }
            let mut it = bufs.iter_mut();
            let mut arr: [TunnelPacket<'_>; 32] = core::array::from_fn(|_| TunnelPacket {
                from: NODE,
                buf: it.next().unwrap().as_mut_slice(),
                len: out_pkt.len(),
            });
            w.outbound_batch(&mut arr, now, |_, a| {
                assert!(matches!(a, Action::Forward { .. }))
            });
        }
    });
    assert_eq!(n, 0, "{n} heap allocations in outbound_batch");
}
