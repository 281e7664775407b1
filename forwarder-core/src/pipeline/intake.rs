//! What a worker does with a received packet before it is translated: the steps between the socket and
//! [`Worker::outbound_batch`] / [`Worker::inbound_batch`], and the translation of a super-packet cut into
//! segments.
//!
//! The I/O layer calls these in this order for every packet, and the fuzz targets
//! (`forwarder-core/fuzz/fuzz_targets/tunnel_path.rs`, `uplink_path.rs`) call the same functions in the same
//! order, so that what the fuzzers prove of them holds for the worker:
//!
//! * tunnel datagram → [`Worker::tunnel_intake`] → either the batch call, or for a TCP super-packet from
//!   the node's GSO [`Worker::outbound_whole`] (translated whole, leaves with segmentation offloaded; where
//!   the uplink cannot take it whole the worker cuts the translated frame with [`offload::segment`]).
//!   [`Worker::outbound_segmented`] (cut first, then translate) is the reference the whole translation is
//!   tested against;
//! * uplink frame → [`Worker::uplink_intake`] → either the batch call, or [`Worker::inbound_segmented`].

use core::net::Ipv4Addr;

use super::{
    outbound, Action, TunnelPacket, UplinkPacket, Verdict, Worker, INBOUND_HEADROOM, TUNNEL_ETH,
    TUNNEL_L3,
};
use crate::flow::UplinkId;
use crate::offload::{self, OffloadError, VnetHdr};
use crate::{Instant, Reason};

/// What to do with a received packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Translate it as it is (in a batch). `checksum_completed`: a partial checksum was filled in first.
    Translate {
        /// A checksum the sender left to offload was completed.
        checksum_completed: bool,
    },
    /// A super-packet: cut it into segments with this header and translate those
    /// ([`Worker::outbound_segmented`], [`Worker::inbound_segmented`]).
    Segment(VnetHdr),
    /// Drop it; counted by the pipeline under the reason.
    Drop(Reason),
    /// Drop it; the I/O layer counts these (its own reasons).
    DropOffload(OffloadError),
}

impl Worker {
    /// The first look at a tunnel datagram `dgram` (VXLAN header + inner frame) from `from`. First of all,
    /// whether the sender is an allowed node and the VNI ours: nothing else is done for anyone else (the
    /// drop is counted as the pipeline counts it). Then whether it is a TCP super-packet larger than
    /// `tunnel_mtu` that must be cut into segments of at most `segment_mtu` (the node's kernel passes GSO
    /// packets through its vxlan device whole, and the UDP socket receives them whole), or a packet whose
    /// inner checksum is still partial.
    pub fn tunnel_intake(
        &mut self,
        from: Ipv4Addr,
        dgram: &mut [u8],
        tunnel_mtu: u16,
        segment_mtu: u16,
    ) -> Intake {
        if let Err(r) = outbound::admit(&self.gateway, from, dgram) {
            let stats = &mut self.state.stats;
            stats.tunnel_rx.add(dgram.len());
            stats.drops[r.index()] += 1;
            return Intake::Drop(r);
        }
        let done = Intake::Translate {
            checksum_completed: false,
        };
        if dgram.len() <= TUNNEL_L3
            || !matches!(
                [dgram[TUNNEL_L3 - 2], dgram[TUNNEL_L3 - 1]],
                [0x08, 0x00] | [0x86, 0xDD]
            )
        {
            return done;
        }
        if dgram.len() - TUNNEL_L3 > usize::from(tunnel_mtu) {
            if let Some(h) = offload::tunnel_gso(&dgram[TUNNEL_ETH..], segment_mtu) {
                return Intake::Segment(h);
            }
        }
        Intake::Translate {
            checksum_completed: offload::complete_partial_inner(&mut dgram[TUNNEL_L3..]),
        }
    }

    /// The first look at a frame received on an uplink with the virtio-net header `vnet` (absent when the
    /// socket gave none): a super-packet to segment, or a partial checksum to complete.
    pub fn uplink_intake(&mut self, vnet: Option<VnetHdr>, frame: &mut [u8]) -> Intake {
        let Some(h) = vnet else {
            return Intake::Translate {
                checksum_completed: false,
            };
        };
        if h.is_gso() {
            return Intake::Segment(h);
        }
        match offload::complete_checksum(frame, &h) {
            Ok(()) => Intake::Translate {
                checksum_completed: h.flags & 1 != 0,
            },
            Err(e) => Intake::DropOffload(e),
        }
    }

    /// Translates the TCP super-packet `buf[..len]` (VXLAN header + inner frame, from `from`, for which
    /// [`Worker::tunnel_intake`] returned `Segment(h)`) whole and in place: one flow lookup and one header
    /// rewrite for up to 64 KiB, the way the kernel's NAT handles a GSO packet. For `Action::Forward` the
    /// returned header sends the frame through a packet socket with `PACKET_VNET_HDR`, which has the kernel
    /// (or the NIC) cut it into segments of `h.gso_size` payload bytes and complete their checksums
    /// ([`offload::prepare_whole`]); the uplink's MTU was checked against those segments. The other actions
    /// are as for [`Worker::outbound`] (the header is then all zero).
    pub fn outbound_whole<'a>(
        &mut self,
        from: Ipv4Addr,
        buf: &'a mut [u8],
        len: usize,
        h: &VnetHdr,
        now: Instant,
    ) -> (Action<'a>, VnetHdr) {
        let gw = &*self.gateway;
        let st = &mut self.state;
        st.stats.tunnel_rx.add(len);
        let mut v = outbound::process_whole(gw, st, from, buf, len, h.gso_size, now);
        let mut vnet = VnetHdr::default();
        if let Ok(Verdict::Forward { start, end, .. }) = v {
            // The intake checked the headers' layout and the translation kept it, so this holds; a
            // frame it does not hold for is dropped rather than sent with a wrong checksum.
            match buf
                .get_mut(start..end)
                .map(|f| offload::prepare_whole(f, h.gso_size))
            {
                Some(Ok(hdr)) => vnet = hdr,
                _ => v = Err(Reason::TcpBadHeaderLen),
            }
        }
        (super::finish(st, buf, v), vnet)
    }

    /// Cuts the TCP super-packet `dgram` (VXLAN header + inner frame, from `from`) into segments described
    /// by `h`, each behind a copy of the VXLAN header in its own `slot`-byte piece of `segments`, and
    /// translates them in batches; `emit(k, action)` is called for segment `k`, with frames that borrow
    /// `segments` (so the caller may hold them until it sends). The L4 checksums are left
    /// as the segmentation found them: the caller completes them ([`offload::fill_checksums`]) or
    /// completes them ([`offload::fill_checksums`]). Returns how many segments there were.
    #[allow(clippy::too_many_arguments)] // the buffers are the caller's
    pub fn outbound_segmented<'s>(
        &mut self,
        from: Ipv4Addr,
        dgram: &[u8],
        h: &VnetHdr,
        segments: &'s mut [u8],
        slot: usize,
        lens: &mut Vec<usize>,
        now: Instant,
        mut emit: impl FnMut(usize, Action<'s>),
    ) -> Result<usize, OffloadError> {
        if dgram.len() < TUNNEL_ETH || slot <= TUNNEL_ETH {
            return Err(OffloadError::MalformedGso);
        }
        let (vx, frame) = dgram.split_at(TUNNEL_ETH);
        {
            let mut chunks = segments.chunks_mut(slot);
            offload::segment(
                frame,
                h,
                |_| {
                    chunks.next().map(|c| {
                        c[..TUNNEL_ETH].copy_from_slice(vx);
                        &mut c[TUNNEL_ETH..]
                    })
                },
                lens,
                false,
            )?;
        }
        for (c, (chunk_lens, chunk_bufs)) in lens
            .chunks(super::BATCH)
            .zip(segments.chunks_mut(slot * super::BATCH))
            .enumerate()
        {
            let mut bufs = chunk_bufs.chunks_mut(slot);
            let mut batch: [TunnelPacket<'s>; super::BATCH] =
                core::array::from_fn(|k| match chunk_lens.get(k) {
                    Some(&len) => TunnelPacket {
                        from,
                        buf: bufs.next().unwrap_or(&mut []),
                        len: TUNNEL_ETH + len,
                    },
                    None => TunnelPacket {
                        from,
                        buf: &mut [],
                        len: 0,
                    },
                });
            self.outbound_batch(&mut batch[..chunk_lens.len()], now, |k, a| {
                emit(c * super::BATCH + k, a);
            });
        }
        Ok(lens.len())
    }

    /// Cuts the GSO super-packet `frame` received on `uplink` into segments described by `h` (with complete
    /// checksums), each at [`INBOUND_HEADROOM`] in its own `slot`-byte piece of `segments`, and translates
    /// them in batches; `emit(k, action)` is called for segment `k`. Returns how many segments there were.
    #[allow(clippy::too_many_arguments)] // the buffers are the caller's
    pub fn inbound_segmented<'s>(
        &mut self,
        uplink: UplinkId,
        frame: &[u8],
        h: &VnetHdr,
        segments: &'s mut [u8],
        slot: usize,
        lens: &mut Vec<usize>,
        now: Instant,
        mut emit: impl FnMut(usize, Action<'s>),
    ) -> Result<usize, OffloadError> {
        if slot <= INBOUND_HEADROOM {
            return Err(OffloadError::MalformedGso);
        }
        {
            let mut chunks = segments.chunks_mut(slot);
            offload::segment(
                frame,
                h,
                |_| chunks.next().map(|c| &mut c[INBOUND_HEADROOM..]),
                lens,
                true,
            )?;
        }
        for (c, (chunk_lens, chunk_bufs)) in lens
            .chunks(super::BATCH)
            .zip(segments.chunks_mut(slot * super::BATCH))
            .enumerate()
        {
            let mut bufs = chunk_bufs.chunks_mut(slot);
            let mut batch: [UplinkPacket<'s>; super::BATCH] =
                core::array::from_fn(|k| match chunk_lens.get(k) {
                    Some(&len) => UplinkPacket {
                        buf: bufs.next().unwrap_or(&mut []),
                        start: INBOUND_HEADROOM,
                        len,
                    },
                    None => UplinkPacket {
                        buf: &mut [],
                        start: 0,
                        len: 0,
                    },
                });
            self.inbound_batch(uplink, &mut batch[..chunk_lens.len()], now, |k, a| {
                emit(c * super::BATCH + k, a);
            });
        }
        Ok(lens.len())
    }
}
