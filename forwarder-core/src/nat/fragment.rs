//! IPv4 fragmentation of a translated packet that is too big for the next link and may be fragmented (DF
//! clear), in place (RFC 791 §3.2, RFC 1812 §4.2.2.7).
//!
//! The fragments are laid out back to back in the caller's buffer as complete *units* — each unit is the
//! bytes in front of the IP header (for the tunnel: VXLAN header + inner Ethernet header), copied from the
//! original, then a fresh IPv4 header, then a piece of the payload. Every unit but the last has the same
//! size, so the whole run can be handed to a UDP socket with segmentation offload (`UDP_SEGMENT`) in one
//! call, or sent unit by unit. The L4 checksum, which covers the whole datagram, is untouched: it was
//! right before the split and stays right after reassembly.

use super::meta::PacketMeta;
use crate::wire::ipv4;

/// Splits the IPv4 packet described by `meta` (already translated) into fragments of at most `mtu` bytes.
/// `unit_start` is where the first unit begins (the bytes from there to `meta.l3` are repeated in front of
/// every fragment). Returns `(end, segment)`: the units occupy `buf[unit_start..end]`, each `segment` bytes
/// but the last. `None` when the packet has IP options (their copy rules are not implemented), the MTU
/// cannot carry 8 bytes of data, or `buf` lacks the room for the extra headers.
pub fn split_ipv4(
    buf: &mut [u8],
    unit_start: usize,
    meta: &PacketMeta,
    mtu: u16,
) -> Option<(usize, usize)> {
    let hl = meta.l4 - meta.l3;
    if meta.v6 || hl != ipv4::MIN_HEADER_LEN || unit_start > meta.l3 {
        return None;
    }
    let per = (usize::from(mtu).checked_sub(hl)? / 8) * 8;
    if per < 8 {
        return None;
    }
    let payload = meta.end - meta.l4;
    let count = payload.div_ceil(per);
    let unit_hdr = meta.l4 - unit_start;
    let end = meta.end + (count - 1) * unit_hdr;
    if count < 2 || end > buf.len() {
        return None;
    }
    let (orig_offset, orig_more) = meta
        .frag
        .map_or((0, false), |f| (usize::from(f.offset), f.more));
    // Move pieces right, last first, so that nothing is overwritten before it is moved; then give each its
    // copy of the headers.
    for k in (1..count).rev() {
        let from = meta.l4 + k * per;
        let len = per.min(meta.end - from);
        let to = from + k * unit_hdr;
        buf.copy_within(from..from + len, to);
        buf.copy_within(unit_start..meta.l4, to - unit_hdr);
        let ip = to - hl;
        fix_fragment_header(
            &mut buf[ip..to + len],
            len,
            orig_offset + k * per,
            k + 1 < count || orig_more,
        );
    }
    fix_fragment_header(&mut buf[meta.l3..meta.l4 + per], per, orig_offset, true);
    Some((end, unit_hdr + per))
}

fn fix_fragment_header(ip: &mut [u8], data_len: usize, offset: usize, more: bool) {
    let mut p = ipv4::Packet::new_unchecked(ip);
    p.set_total_len(u16::try_from(ipv4::MIN_HEADER_LEN + data_len).unwrap_or(u16::MAX));
    p.set_flags_and_frag_offset(false, more, u16::try_from(offset).unwrap_or(u16::MAX));
    p.fill_checksum();
}
