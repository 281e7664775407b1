//! A TCP reset for a segment of a connection the gateway has no state for, as a TCP in the CLOSED state
//! answers it (RFC 9293 §3.10.7.1): the pod learns at once that its connection is gone (after the replica
//! that carried it died, or its state was lost) instead of retransmitting into silence until its own
//! timeout — minutes for an established connection (`tcp_retries2`, 15 retransmissions on Linux).
//!
//! * If the segment has ACK: `<SEQ=SEG.ACK><CTL=RST>`.
//! * Else: `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`, where SEG.LEN counts the payload and SYN and FIN.
//! * A segment that is itself a reset is never answered.
//!
//! The reset comes from the segment's destination address and port to its source, so the pod's TCP matches
//! it to the connection; it carries no options and no payload.

use core::net::IpAddr;

use super::icmp::{write_ipv4_header, write_ipv6_header};
use super::meta::PacketMeta;
use crate::conntrack::TcpSegment;
use crate::flow::Proto;
use crate::wire::{ipv4, ipv6, tcp};

/// Bytes of the TCP header written.
const TCP_LEN: usize = 20;

/// Turns the TCP segment `seg` described by `meta`, from port `sport` to port `dport`, into the reset that
/// answers it, in place. Returns the new end of the IP packet in `buf`, or `None` for a reset (never
/// answered) or when the buffer cannot hold it.
pub fn originate(
    buf: &mut [u8],
    meta: &PacketMeta,
    sport: u16,
    dport: u16,
    seg: &TcpSegment,
) -> Option<usize> {
    if seg.flags & TcpSegment::RST != 0 {
        return None;
    }
    let (seq, ack, flags) = if seg.flags & TcpSegment::ACK != 0 {
        (seg.ack, 0, tcp::flags::RST)
    } else {
        let len = seg.payload_len
            + u32::from(seg.flags & TcpSegment::SYN != 0)
            + u32::from(seg.flags & TcpSegment::FIN != 0);
        (
            0,
            seg.seq.wrapping_add(len),
            tcp::flags::RST | tcp::flags::ACK,
        )
    };
    let ip_len = if meta.v6 {
        ipv6::HEADER_LEN
    } else {
        ipv4::MIN_HEADER_LEN
    };
    let total = ip_len + TCP_LEN;
    let end = meta.l3.checked_add(total)?;
    let pkt = buf.get_mut(meta.l3..end)?;
    let t = ip_len..total;
    pkt[t.clone()].fill(0);
    {
        let mut h = tcp::Packet::new_unchecked(&mut pkt[t.clone()]);
        h.set_src_port(dport);
        h.set_dst_port(sport);
        h.set_seq_number(seq);
        h.set_ack_number(ack);
        h.set_header_len(TCP_LEN);
        h.set_flags(flags);
        h.set_window_len(0);
    }
    match (meta.dst, meta.src) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            write_ipv4_header(&mut pkt[..], src, dst, Proto::Tcp.ip_number(), total);
            tcp::Packet::new_unchecked(&mut pkt[t]).fill_checksum_v4(src, dst);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            write_ipv6_header(&mut pkt[..], &src, &dst, Proto::Tcp.ip_number(), total);
            tcp::Packet::new_unchecked(&mut pkt[t]).fill_checksum_v6(&src, &dst);
        }
        _ => return None,
    }
    Some(end)
}
