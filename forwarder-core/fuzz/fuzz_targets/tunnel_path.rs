//! The whole tunnel → uplink path of a worker, on datagrams built from a grammar (`grammar.rs`): valid or
//! mutated VXLAN and inner Ethernet headers, then inner IPv4/IPv6 packets with mutated lengths, IHL, data
//! offsets, extension headers, fragment fields and checksums, some larger than the tunnel MTU (TCP
//! super-packets from the node's GSO).
//!
//! Each datagram goes through exactly the calls `gateway/src/worker.rs` makes, in its order:
//! `Worker::tunnel_intake` → in arrival order, `Worker::outbound_batch` for each run of datagrams translated
//! as they are and `Worker::outbound_whole` for each super-packet → `offload::segment` of a super-packet
//! that leaves whole, as the kernel's GSO would cut it.
//!
//! Invariants: nothing panics; nothing from a sender that is not an allowed node, or with another VNI, is
//! forwarded or segmented (the sender is checked before any other work); every emitted frame has room for
//! its headers; a super-packet that leaves whole has a GSO header, and the segments the kernel would cut
//! from it fit the uplink's MTU, carry its payload in order and have valid checksums; every datagram the
//! worker was given is accounted for by its counters (`Stats::unaccounted` is 0).
#![no_main]
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use forwarder_core::offload;
use forwarder_core::pipeline::{Action, Intake, TunnelPacket, Worker};
use forwarder_core::Instant;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
#[path = "grammar.rs"]
mod grammar;

use grammar::{Addrs, Inner, ICMP_ROOM, MAX_SEGMENTS, SEGMENT_MTU, TUNNEL_MTU};

const SLOT: usize = 3072;
const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
const GATEWAY_MAC: [u8; 6] = [0xa2, 0x2a, 172, 18, 0, 3];

#[derive(Debug, Arbitrary)]
struct Datagram {
    from_node: bool,
    /// VXLAN flags (I flag only unless set) and VNI (4097 unless set).
    flags: Option<u8>,
    vni: Option<u32>,
    /// Inner destination MAC: the gateway's unless set.
    dst_mac: Option<[u8; 6]>,
    /// Inner EtherType: from the inner packet's version unless set.
    ethertype: Option<u16>,
    /// The inner source is a pod (10.244.1.5 / fd00:244::5) unless false.
    pod_source: bool,
    inner: Inner,
}

#[derive(Debug, Arbitrary)]
struct Case {
    datagrams: Vec<Datagram>,
    /// Seconds between the datagrams' arrival (flows expire, fragments time out).
    step: u8,
}

struct State {
    worker: Worker,
    segments: Vec<u8>,
    lens: Vec<usize>,
    now: u64,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

impl Datagram {
    fn build(&self) -> (Vec<u8>, bool) {
        let mut d = Vec::with_capacity(2048);
        d.push(self.flags.unwrap_or(0x08));
        d.extend_from_slice(&[0, 0, 0]);
        let vni = self.vni.unwrap_or(4097);
        d.extend_from_slice(&(vni << 8).to_be_bytes());
        d.extend_from_slice(&self.dst_mac.unwrap_or(GATEWAY_MAC));
        d.extend_from_slice(&[0x02, 0, 172, 18, 0, 2]);
        let et = self
            .ethertype
            .unwrap_or(if self.inner.v6 { 0x86DD } else { 0x0800 });
        d.extend_from_slice(&et.to_be_bytes());
        let a = Addrs {
            src4: if self.pod_source {
                [10, 244, 1, 5]
            } else {
                [10, 9, 9, 9]
            },
            dst4: [198, 51, 100, 10],
            src6: if self.pod_source {
                [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]
            } else {
                [0xfd, 0, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]
            },
            dst6: [
                0x20, 1, 0x0d, 0xb8, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
            ],
            sport: 40000,
            dport: 80,
        };
        self.inner.build(&a, &mut d);
        // What the pipeline admits at all: an allowed node with the I flag and our VNI.
        let admitted = self.from_node && d[0] & 0x08 != 0 && (vni & 0xFF_FFFF) == 4097;
        (d, admitted)
    }
}

fuzz_target!(|case: Case| {
    let mut guard = STATE
        .get_or_init(|| {
            Mutex::new(State {
                worker: common::worker(),
                segments: vec![0; SLOT * MAX_SEGMENTS],
                lens: Vec::with_capacity(MAX_SEGMENTS),
                now: 1,
            })
        })
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let st = &mut *guard;
    st.now += u64::from(case.step);
    let now = Instant::from_secs(st.now);

    // Receive: each datagram in its own slot with room for an ICMP error behind it.
    let built: Vec<(Vec<u8>, bool, bool)> = case
        .datagrams
        .iter()
        .take(16)
        .map(|d| {
            let (bytes, admitted) = d.build();
            (bytes, admitted, d.from_node)
        })
        .collect();
    let mut bufs: Vec<Vec<u8>> = built
        .iter()
        .map(|(b, _, _)| {
            let mut v = b.clone();
            v.resize(b.len() + ICMP_ROOM, 0);
            v
        })
        .collect();
    // `whole[i]`: datagram i is a super-packet with this header; `None` for the others taken on.
    let mut taken: Vec<(usize, Option<offload::VnetHdr>)> = Vec::new();
    for (i, (b, admitted, from_node)) in built.iter().enumerate() {
        let from = if *from_node { NODE } else { STRANGER };
        match st
            .worker
            .tunnel_intake(from, &mut bufs[i][..b.len()], TUNNEL_MTU, SEGMENT_MTU)
        {
            Intake::Translate { .. } => taken.push((i, None)),
            Intake::Segment(h) => {
                assert!(
                    *admitted,
                    "a datagram the pipeline refuses was taken as a super-packet: {h:?}"
                );
                taken.push((i, Some(h)));
            }
            Intake::Drop(_) | Intake::DropOffload(_) => {}
        }
    }

    // In arrival order, as the worker does: runs of ordinary datagrams as one batch call, each
    // super-packet translated whole where it came.
    let mut bufs: Vec<Option<&mut Vec<u8>>> = bufs.iter_mut().map(Some).collect();
    let mut k = 0;
    while k < taken.len() {
        let end = (k..taken.len())
            .find(|&j| taken[j].1.is_some())
            .unwrap_or(taken.len());
        let mut batch: Vec<TunnelPacket<'_>> = Vec::new();
        let mut admitted_of = Vec::new();
        for &(i, _) in &taken[k..end] {
            let Some(buf) = bufs[i].take() else { continue };
            admitted_of.push(built[i].1);
            batch.push(TunnelPacket {
                from: if built[i].2 { NODE } else { STRANGER },
                buf,
                len: built[i].0.len(),
            });
        }
        st.worker.outbound_batch(&mut batch, now, |j, action| {
            check(&action, admitted_of[j]);
        });
        drop(batch);
        if let Some(&(i, Some(h))) = taken.get(end) {
            if let Some(buf) = bufs[i].take() {
                let from = if built[i].2 { NODE } else { STRANGER };
                let (action, vnet) = st.worker.outbound_whole(from, buf, built[i].0.len(), &h, now);
                check(&action, true);
                if let Action::Forward { frame, .. } = action {
                    kernel_segments(frame, &vnet, &mut st.segments, &mut st.lens);
                }
            }
        }
        k = end + 1;
    }
    common::assert_accounted(&st.worker);
});

/// What the kernel does with a super-packet that leaves whole: cut it into segments of `vnet.gso_size`
/// payload bytes with complete checksums. Every segment must fit the uplink's MTU (1500), carry the
/// frame's payload in order, and have valid checksums.
fn kernel_segments(frame: &[u8], vnet: &offload::VnetHdr, segments: &mut [u8], lens: &mut Vec<usize>) {
    assert!(vnet.is_gso(), "a super-packet leaves with a GSO header: {vnet:?}");
    let mut chunks = segments.chunks_mut(SLOT);
    if offload::segment(frame, vnet, |_| chunks.next(), lens, true).is_err() {
        // More segments than the model's buffer holds (a tiny segment size); the kernel has no such limit.
        return;
    }
    let n = lens.len();
    let l4 = usize::from(vnet.csum_start);
    let hdr = l4 + usize::from(frame[l4 + 12] >> 4) * 4;
    let mut carried = 0;
    for (k, (piece, &len)) in segments.chunks(SLOT).zip(lens.iter()).take(n).enumerate() {
        let seg = &piece[..len];
        assert!(len - 14 <= 1500, "segment {k} is {} bytes of IP, over the MTU", len - 14);
        assert_eq!(
            seg[hdr..],
            frame[hdr + carried..hdr + carried + (len - hdr)],
            "segment {k} carries the payload in order"
        );
        carried += len - hdr;
        let mut check = seg.to_vec();
        assert!(!offload::fill_checksums(&mut check) || check == seg, "segment {k}: checksum");
    }
    assert_eq!(hdr + carried, frame.len(), "the segments carry the whole payload");
}

fn check(action: &Action<'_>, admitted: bool) {
    match action {
        Action::Forward { frame, .. } => {
            assert!(
                admitted,
                "forwarded a datagram from outside the allowed nodes"
            );
            assert!(frame.len() >= 14);
        }
        Action::ToTunnel { datagram, .. } => {
            assert!(
                admitted,
                "answered a datagram from outside the allowed nodes"
            );
            assert!(datagram.len() >= 22);
        }
        Action::Neighbour | Action::Drop(_) => {}
    }
}
