//! TCP headers (RFC 9293), with MSS option parsing and clamping.
//!
//! TCP has no length field: the view covers the whole segment, so slice the buffer to the IP payload first.
//! [`Packet::check_len`] validates the data offset; after it has succeeded no getter panics, for any bytes.
//! [`Packet::mss`] and [`Packet::clamp_mss`] walk the options with bounds checks and never panic either.

use core::net::{Ipv4Addr, Ipv6Addr};

use super::{checksum, len_u32};
use crate::reason::Reason;

/// Length of a TCP header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol number of TCP.
const PROTOCOL: u8 = 6;

/// TCP flag bits (byte 13 of the header).
pub mod flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field is significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer field is significant.
    pub const URG: u8 = 0x20;
    /// ECN echo.
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced.
    pub const CWR: u8 = 0x80;
}

/// TCP option kinds.
pub mod option {
    /// End of option list.
    pub const EOL: u8 = 0;
    /// No operation (padding).
    pub const NOP: u8 = 1;
    /// Maximum segment size.
    pub const MSS: u8 = 2;
}

mod field {
    use core::ops::Range;
    pub(super) const SRC_PORT: Range<usize> = 0..2;
    pub(super) const DST_PORT: Range<usize> = 2..4;
    pub(super) const SEQ_NUM: Range<usize> = 4..8;
    pub(super) const ACK_NUM: Range<usize> = 8..12;
    pub(super) const DATA_OFF: usize = 12;
    pub(super) const FLAGS: usize = 13;
    pub(super) const WIN_SIZE: Range<usize> = 14..16;
    pub(super) const CHECKSUM: Range<usize> = 16..18;
    pub(super) const URGENT: Range<usize> = 18..20;
}

/// A view of a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer and checks it with [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Reason> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// `TcpTruncated` if shorter than 20 bytes; `TcpBadHeaderLen` if the data offset is below 5 or the header
    /// runs past the buffer.
    pub fn check_len(&self) -> Result<(), Reason> {
        let len = self.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(Reason::TcpTruncated);
        }
        let hl = self.header_len();
        if hl < MIN_HEADER_LEN || hl > len {
            return Err(Reason::TcpBadHeaderLen);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn u16_at(&self, r: core::ops::Range<usize>) -> u16 {
        let b = &self.buffer.as_ref()[r];
        u16::from_be_bytes([b[0], b[1]])
    }

    fn u32_at(&self, r: core::ops::Range<usize>) -> u32 {
        let b = &self.buffer.as_ref()[r];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        self.u16_at(field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        self.u16_at(field::DST_PORT)
    }

    /// Sequence number.
    pub fn seq_number(&self) -> u32 {
        self.u32_at(field::SEQ_NUM)
    }

    /// Acknowledgment number.
    pub fn ack_number(&self) -> u32 {
        self.u32_at(field::ACK_NUM)
    }

    /// Header length in bytes (data offset × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::DATA_OFF] >> 4) * 4
    }

    /// The flags byte (see [`flags`]).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Whether all of `mask` (from [`flags`]) is set.
    pub fn has_flags(&self, mask: u8) -> bool {
        self.flags() & mask == mask
    }

    /// Window size.
    pub fn window_len(&self) -> u16 {
        self.u16_at(field::WIN_SIZE)
    }

    /// Checksum.
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// Urgent pointer.
    pub fn urgent_at(&self) -> u16 {
        self.u16_at(field::URGENT)
    }

    /// The options (bytes 20 .. header length).
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[MIN_HEADER_LEN..self.header_len()]
    }

    /// The payload (after the header, to the end of the buffer).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }

    /// Finds the MSS option: `(offset of its value from the start of the segment, value)`.
    fn find_mss(&self) -> Result<Option<(usize, u16)>, Reason> {
        let opts = self
            .buffer
            .as_ref()
            .get(MIN_HEADER_LEN..self.header_len())
            .unwrap_or(&[]);
        let mut i = 0;
        while let Some(&kind) = opts.get(i) {
            match kind {
                option::EOL => break,
                option::NOP => i += 1,
                _ => {
                    let len = usize::from(*opts.get(i + 1).ok_or(Reason::TcpBadOptions)?);
                    if len < 2 || i + len > opts.len() {
                        return Err(Reason::TcpBadOptions);
                    }
                    if kind == option::MSS {
                        if len != 4 {
                            return Err(Reason::TcpBadOptions);
                        }
                        let v = u16::from_be_bytes([opts[i + 2], opts[i + 3]]);
                        return Ok(Some((MIN_HEADER_LEN + i + 2, v)));
                    }
                    i += len;
                }
            }
        }
        Ok(None)
    }

    /// The MSS option's value, if present. Walks the options: 0 ends the list, 1 is one byte of padding,
    /// anything else is kind/length with length ≥ 2 within the header (MSS must have length 4); otherwise
    /// `TcpBadOptions`.
    pub fn mss(&self) -> Result<Option<u16>, Reason> {
        Ok(self.find_mss()?.map(|(_, v)| v))
    }

    fn sum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> u32 {
        let b = self.buffer.as_ref();
        checksum::sum(
            b,
            checksum::pseudo_header_v4(src, dst, PROTOCOL, len_u32(b.len())),
        )
    }

    fn sum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> u32 {
        let b = self.buffer.as_ref();
        checksum::sum(
            b,
            checksum::pseudo_header_v6(src, dst, PROTOCOL, len_u32(b.len())),
        )
    }

    /// Whether the checksum verifies over IPv4 (the whole buffer is the segment).
    pub fn verify_checksum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        checksum::finish(self.sum_v4(src, dst)) == 0
    }

    /// Whether the checksum verifies over IPv6 (the whole buffer is the segment).
    pub fn verify_checksum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        checksum::finish(self.sum_v6(src, dst)) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_u16(&mut self, r: core::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets the source port.
    pub fn set_src_port(&mut self, value: u16) {
        self.set_u16(field::SRC_PORT, value);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, value: u16) {
        self.set_u16(field::DST_PORT, value);
    }

    /// Sets the sequence number.
    pub fn set_seq_number(&mut self, value: u32) {
        self.buffer.as_mut()[field::SEQ_NUM].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the acknowledgment number.
    pub fn set_ack_number(&mut self, value: u32) {
        self.buffer.as_mut()[field::ACK_NUM].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the header length in bytes (a multiple of 4 between 20 and 60); the low nibble of byte 12
    /// (reserved bits and NS) is kept.
    pub fn set_header_len(&mut self, header_len: usize) {
        debug_assert!(header_len & 3 == 0 && (MIN_HEADER_LEN..=60).contains(&header_len));
        let off = u8::try_from(header_len / 4).unwrap_or(0x0F).min(0x0F);
        let b = &mut self.buffer.as_mut()[field::DATA_OFF];
        *b = (off << 4) | (*b & 0x0F);
    }

    /// Sets the flags byte.
    pub fn set_flags(&mut self, value: u8) {
        self.buffer.as_mut()[field::FLAGS] = value;
    }

    /// Sets the window size.
    pub fn set_window_len(&mut self, value: u16) {
        self.set_u16(field::WIN_SIZE, value);
    }

    /// Sets the checksum.
    pub fn set_checksum(&mut self, value: u16) {
        self.set_u16(field::CHECKSUM, value);
    }

    /// Sets the urgent pointer.
    pub fn set_urgent_at(&mut self, value: u16) {
        self.set_u16(field::URGENT, value);
    }

    /// The options, mutably.
    pub fn options_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        &mut self.buffer.as_mut()[MIN_HEADER_LEN..hl]
    }

    /// The payload, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        &mut self.buffer.as_mut()[hl..]
    }

    /// Computes and writes the checksum over IPv4 (the whole buffer is the segment).
    pub fn fill_checksum_v4(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let c = checksum::finish(self.sum_v4(src, dst));
        self.set_checksum(c);
    }

    /// Computes and writes the checksum over IPv6 (the whole buffer is the segment).
    pub fn fill_checksum_v6(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let c = checksum::finish(self.sum_v6(src, dst));
        self.set_checksum(c);
    }

    /// If an MSS option larger than `max_mss` is present, lowers it to `max_mss`, updates the checksum
    /// incrementally (RFC 1624; the option may sit at an odd offset) and returns `(old, new)`. Returns
    /// `Ok(None)` when there is no MSS option or it is already small enough, and `TcpBadOptions` for
    /// malformed options (nothing is changed then).
    pub fn clamp_mss(&mut self, max_mss: u16) -> Result<Option<(u16, u16)>, Reason> {
        let Some((at, old)) = self.find_mss()? else {
            return Ok(None);
        };
        if old <= max_mss {
            return Ok(None);
        }
        self.set_u16(at..at + 2, max_mss);
        // A 16-bit value at an odd offset contributes its byte-swapped value to the ones-complement sum.
        let c = if at % 2 == 0 {
            checksum::update_u16(self.checksum(), old, max_mss)
        } else {
            checksum::update_u16(self.checksum(), old.swap_bytes(), max_mss.swap_bytes())
        };
        self.set_checksum(c);
        Ok(Some((old, max_mss)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

    // The inner TCP SYN of the kernel fixture vxlan_tcp_syn.hex (10.10.10.1:40001 -> 198.51.100.10:443).
    const SYN: [u8; 40] = [
        0x9c, 0x41, 0x01, 0xbb, 0x13, 0x26, 0xea, 0x53, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfd,
        0x5c, 0x03, 0x21, 0x00, 0x00, 0x02, 0x04, 0x05, 0x82, 0x04, 0x02, 0x08, 0x0a, 0xd5, 0x07,
        0x98, 0xea, 0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x0a,
    ];

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&SYN[..]).unwrap();
        assert_eq!(p.src_port(), 40001);
        assert_eq!(p.dst_port(), 443);
        assert_eq!(p.seq_number(), 0x1326_ea53);
        assert_eq!(p.ack_number(), 0);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.flags(), flags::SYN);
        assert!(p.has_flags(flags::SYN) && !p.has_flags(flags::SYN | flags::ACK));
        assert_eq!(p.window_len(), 64860);
        assert_eq!(p.checksum(), 0x0321);
        assert_eq!(p.urgent_at(), 0);
        assert_eq!(p.options().len(), 20);
        assert!(p.payload().is_empty());
        assert_eq!(p.mss(), Ok(Some(1410)));
        assert!(p.verify_checksum_v4(SRC, DST));
        assert!(!p.verify_checksum_v4(SRC, Ipv4Addr::new(198, 51, 100, 11)));
    }

    #[test]
    fn construct() {
        let mut b = [0u8; 40];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_src_port(40001);
        p.set_dst_port(443);
        p.set_seq_number(0x1326_ea53);
        p.set_ack_number(0);
        p.set_header_len(40);
        p.set_flags(flags::SYN);
        p.set_window_len(64860);
        p.set_urgent_at(0);
        p.options_mut().copy_from_slice(&SYN[20..]);
        p.fill_checksum_v4(SRC, DST);
        assert_eq!(b, SYN);
    }

    #[test]
    fn check_len_errors() {
        assert_eq!(
            Packet::new_checked(&SYN[..19]).unwrap_err(),
            Reason::TcpTruncated
        );
        assert_eq!(
            Packet::new_checked(&SYN[..39]).unwrap_err(),
            Reason::TcpBadHeaderLen
        );
        let mut b = SYN;
        b[12] = 0x40;
        assert_eq!(
            Packet::new_checked(&b[..]).unwrap_err(),
            Reason::TcpBadHeaderLen
        );
    }

    fn with_options(opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 20 + opts.len()];
        b[20..].copy_from_slice(opts);
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_header_len(20 + opts.len());
        p.set_flags(flags::SYN);
        p.fill_checksum_v4(SRC, DST);
        b
    }

    #[test]
    fn options() {
        let mss = |o: &[u8]| Packet::new_checked(&with_options(o)[..]).unwrap().mss();
        assert_eq!(mss(&[]), Ok(None));
        assert_eq!(mss(&[1, 1, 1, 1]), Ok(None));
        assert_eq!(mss(&[0, 2, 4, 5]), Ok(None)); // after EOL nothing counts
        assert_eq!(mss(&[1, 2, 4, 5, 0xb4, 0, 0, 0]), Ok(Some(1460)));
        assert_eq!(mss(&[4, 2, 2, 4, 5, 0xb4, 0, 0]), Ok(Some(1460)));
        assert_eq!(mss(&[1, 1, 1, 8]), Err(Reason::TcpBadOptions)); // no length byte
        assert_eq!(mss(&[8, 1, 0, 0]), Err(Reason::TcpBadOptions)); // length < 2
        assert_eq!(mss(&[8, 10, 0, 0]), Err(Reason::TcpBadOptions)); // past the header
        assert_eq!(mss(&[2, 3, 5, 0]), Err(Reason::TcpBadOptions)); // MSS with length 3
    }

    #[test]
    fn clamp() {
        let mut b = SYN;
        let mut p = Packet::new_checked(&mut b[..]).unwrap();
        assert_eq!(p.clamp_mss(1460), Ok(None));
        assert_eq!(p.clamp_mss(1360), Ok(Some((1410, 1360))));
        assert_eq!(p.mss(), Ok(Some(1360)));
        assert!(p.verify_checksum_v4(SRC, DST));
        // Odd offset: NOP then MSS.
        let mut b = with_options(&[1, 2, 4, 0x23, 0x28, 1, 1, 0]);
        let mut p = Packet::new_checked(&mut b[..]).unwrap();
        assert_eq!(p.clamp_mss(1400), Ok(Some((9000, 1400))));
        assert!(p.verify_checksum_v4(SRC, DST));
        let mut bad = with_options(&[1, 2, 3, 0]);
        assert_eq!(
            Packet::new_checked(&mut bad[..]).unwrap().clamp_mss(1400),
            Err(Reason::TcpBadOptions)
        );
    }

    proptest! {
        #[test]
        fn getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..80), fix in any::<bool>()) {
            if fix && data.len() >= 20 {
                let off = u8::try_from((data.len().min(60) / 4).max(5)).unwrap();
                data[12] = off << 4;
            }
            if let Ok(mut p) = Packet::new_checked(&mut data[..]) {
                let _ = (p.src_port(), p.dst_port(), p.seq_number(), p.ack_number(), p.header_len(), p.flags(),
                    p.window_len(), p.checksum(), p.urgent_at(), p.options().len(), p.payload().len(), p.mss(),
                    p.verify_checksum_v4(SRC, DST), p.verify_checksum_v6(&Ipv6Addr::LOCALHOST, &Ipv6Addr::LOCALHOST));
                let _ = p.clamp_mss(536);
            }
        }

        #[test]
        fn incremental_matches_recompute(
            nops in 0usize..4, mss in any::<u16>(), max in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..50),
            new_src in any::<[u8; 4]>(), new_port in any::<u16>(), v6 in any::<bool>(),
        ) {
            let mut opts = vec![1u8; nops];
            opts.extend_from_slice(&[2, 4]);
            opts.extend_from_slice(&mss.to_be_bytes());
            while opts.len() % 4 != 0 { opts.push(0); }
            let mut b = vec![0u8; 20 + opts.len()];
            b[20..].copy_from_slice(&opts);
            b.extend_from_slice(&payload);
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.set_header_len(20 + opts.len());
            p.set_src_port(1234);
            p.set_flags(flags::SYN);
            let (a6, z6) = (Ipv6Addr::LOCALHOST, Ipv6Addr::from([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]));
            if v6 { p.fill_checksum_v6(&a6, &z6) } else { p.fill_checksum_v4(SRC, DST) }
            let r = p.clamp_mss(max).unwrap();
            prop_assert_eq!(r, if mss > max { Some((mss, max)) } else { None });
            // SNAT on top: source address and port.
            let new_src = Ipv4Addr::from(new_src);
            if !v6 {
                let mut c = checksum::update_bytes(p.checksum(), &SRC.octets(), &new_src.octets());
                c = checksum::update_u16(c, p.src_port(), new_port);
                p.set_src_port(new_port);
                p.set_checksum(c);
                prop_assert!(p.verify_checksum_v4(new_src, DST));
                let got = p.checksum();
                p.fill_checksum_v4(new_src, DST);
                prop_assert_eq!(got, p.checksum());
            } else {
                prop_assert!(p.verify_checksum_v6(&a6, &z6));
                let got = p.checksum();
                p.fill_checksum_v6(&a6, &z6);
                prop_assert_eq!(got, p.checksum());
            }
        }
    }
}
