//! The whole uplink → tunnel path of a worker, on frames built from a grammar (`grammar.rs`) behind a
//! virtio-net header as a packet socket with `PACKET_VNET_HDR` hands them over: the header a real sender
//! would set (checksum offsets, GSO type and size) or a mutated one, and inner IPv4/IPv6 packets with
//! mutated lengths, IHL, data offsets, extension headers and fragment fields. Replies go to live flows (set
//! up once through the tunnel path), so translation and segmentation are reached, not just the parsers.
//!
//! Each frame goes through exactly the calls `gateway/src/worker.rs` makes, in its order:
//! `VnetHdr::parse` → `Worker::uplink_intake` → `Worker::inbound_batch` (frames translated as they are) →
//! `Worker::inbound_segmented` for GSO super-packets.
//!
//! Invariants: nothing panics; segmentation never writes past its buffers or exceeds the segment count;
//! every datagram sent to the tunnel has its VXLAN and Ethernet headers; every frame the worker was given
//! is accounted for by its counters (`Stats::unaccounted` is 0).
#![no_main]
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use forwarder_core::offload::VnetHdr;
use forwarder_core::pipeline::{Action, Intake, UplinkPacket, Worker, INBOUND_HEADROOM};
use forwarder_core::Instant;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
#[path = "grammar.rs"]
mod grammar;

use grammar::{Addrs, Inner, Vnet, ICMP_ROOM, MAX_SEGMENTS};

const SLOT: usize = 3072;
const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);

#[derive(Debug, Arbitrary)]
struct Frame {
    vnet: Vnet,
    /// Which live flow the frame answers (or none: a random port).
    flow: u8,
    port: Option<u16>,
    ethertype: Option<u16>,
    inner: Inner,
}

#[derive(Debug, Arbitrary)]
struct Case {
    frames: Vec<Frame>,
    step: u8,
}

struct State {
    worker: Worker,
    /// External ports of live flows: TCP and UDP, IPv4 and IPv6.
    flows: Vec<(bool, bool, u16)>,
    segments: Vec<u8>,
    lens: Vec<usize>,
    now: u64,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

/// Opens one TCP and one UDP flow per family through the tunnel path; returns their external ports.
fn open_flows(w: &mut Worker) -> Vec<(bool, bool, u16)> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        for tcp in [true, false] {
            let inner = Inner {
                v6,
                kind: if tcp {
                    grammar::L4Kind::Tcp
                } else {
                    grammar::L4Kind::Udp
                },
                ihl: None,
                ip_len: None,
                frag: None,
                ttl: 64,
                ext: Vec::new(),
                data_offset: None,
                tcp_flags: 0x02,
                seq: 1000,
                udp_len: None,
                checksum: None,
                len: grammar::Len::Small(if tcp { 0 } else { 10 }),
                fill: 0,
                cut: None,
                tail: Vec::new(),
            };
            let mut d = vec![0x08, 0, 0, 0, 0, 0x10, 0x01, 0];
            d.extend_from_slice(&[0xa2, 0x2a, 172, 18, 0, 3, 0x02, 0, 172, 18, 0, 2]);
            d.extend_from_slice(if v6 { &[0x86, 0xDD] } else { &[0x08, 0x00] });
            inner.build(&pod_side(), &mut d);
            let len = d.len();
            d.resize(len + ICMP_ROOM, 0);
            if let Action::Forward { frame, .. } =
                w.outbound(NODE, &mut d, len, Instant::from_secs(1))
            {
                let l4 = 14 + if v6 { 40 } else { 20 };
                out.push((v6, tcp, u16::from_be_bytes([frame[l4], frame[l4 + 1]])));
            }
        }
    }
    assert_eq!(out.len(), 4, "the fuzz configuration opens its flows");
    out
}

fn pod_side() -> Addrs {
    Addrs {
        src4: [10, 244, 1, 5],
        dst4: [198, 51, 100, 10],
        src6: [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
        dst6: [
            0x20, 1, 0x0d, 0xb8, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ],
        sport: 40000,
        dport: 80,
    }
}

impl Frame {
    /// The frame (Ethernet + inner packet) and its virtio-net header bytes, if any.
    fn build(&self, flows: &[(bool, bool, u16)]) -> (Vec<u8>, Option<[u8; 10]>) {
        let live = flows
            .iter()
            .find(|(v6, tcp, _)| {
                *v6 == self.inner.v6 && *tcp == matches!(self.inner.kind, grammar::L4Kind::Tcp)
            })
            .filter(|_| self.flow % 4 != 0)
            .map(|f| f.2);
        let p = pod_side();
        let a = Addrs {
            src4: p.dst4,
            dst4: [203, 0, 113, 10],
            src6: p.dst6,
            dst6: [
                0x20, 1, 0x0d, 0xb8, 0x01, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
            ],
            sport: 80,
            dport: self.port.or(live).unwrap_or(50000),
        };
        let mut f = Vec::with_capacity(2048);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x10, 0x02, 0, 0, 0, 0, 0x01]);
        let et = self
            .ethertype
            .unwrap_or(if self.inner.v6 { 0x86DD } else { 0x0800 });
        f.extend_from_slice(&et.to_be_bytes());
        self.inner.build(&a, &mut f);
        let l4 = 14
            + if self.inner.v6 {
                40
            } else {
                usize::from(self.inner.ihl.unwrap_or(5) & 0x0F).max(5) * 4
            };
        let field = match self.inner.kind {
            grammar::L4Kind::Tcp => 16,
            grammar::L4Kind::Udp => 6,
            _ => 2,
        };
        (f, self.vnet.bytes(l4, field))
    }
}

fuzz_target!(|case: Case| {
    let mut guard = STATE
        .get_or_init(|| {
            let mut worker = common::worker();
            let flows = open_flows(&mut worker);
            Mutex::new(State {
                worker,
                flows,
                segments: vec![0; SLOT * MAX_SEGMENTS],
                lens: Vec::with_capacity(MAX_SEGMENTS),
                now: 1,
            })
        })
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let st = &mut *guard;
    st.now += u64::from(case.step % 8);
    let now = Instant::from_secs(st.now);

    let built: Vec<(Vec<u8>, Option<[u8; 10]>)> = case
        .frames
        .iter()
        .take(16)
        .map(|f| f.build(&st.flows))
        .collect();
    // The receive slots: headroom for the VXLAN header in front, room for an ICMP error behind.
    let mut bufs: Vec<Vec<u8>> = built
        .iter()
        .map(|(f, _)| {
            let mut v = vec![0u8; INBOUND_HEADROOM];
            v.extend_from_slice(f);
            v.resize(INBOUND_HEADROOM + f.len() + ICMP_ROOM, 0);
            v
        })
        .collect();
    let mut plain = Vec::new();
    let mut gso = Vec::new();
    for (i, (f, prefix)) in built.iter().enumerate() {
        let vnet = prefix.as_ref().and_then(|p| VnetHdr::parse(p));
        let frame = &mut bufs[i][INBOUND_HEADROOM..INBOUND_HEADROOM + f.len()];
        match st.worker.uplink_intake(vnet, frame) {
            Intake::Translate { .. } => plain.push(i),
            Intake::Segment(h) => gso.push((i, h)),
            Intake::Drop(_) | Intake::DropOffload(_) => {}
        }
    }

    let mut batch: Vec<UplinkPacket<'_>> = Vec::new();
    for (i, buf) in bufs.iter_mut().enumerate() {
        if plain.contains(&i) {
            batch.push(UplinkPacket {
                buf,
                start: INBOUND_HEADROOM,
                len: built[i].0.len(),
            });
        }
    }
    st.worker
        .inbound_batch(0, &mut batch, now, |_, action| check(&action));
    drop(batch);

    for (i, h) in gso {
        let frame = &bufs[i][INBOUND_HEADROOM..INBOUND_HEADROOM + built[i].0.len()];
        let r = st.worker.inbound_segmented(
            0,
            frame,
            &h,
            &mut st.segments,
            SLOT,
            &mut st.lens,
            now,
            |_, action| check(&action),
        );
        if let Ok(n) = r {
            assert!(n <= MAX_SEGMENTS && n == st.lens.len());
        }
    }
    common::assert_accounted(&st.worker);
});

fn check(action: &Action<'_>) {
    match action {
        Action::Forward { frame, .. } => assert!(frame.len() >= 14),
        Action::ToTunnel {
            datagram, segment, ..
        } => {
            assert!(datagram.len() >= 22);
            if let Some(s) = segment {
                assert!(*s >= 22);
            }
        }
        Action::Neighbour | Action::Drop(_) => {}
    }
}
