//! IPv4 headers (RFC 791).
//!
//! [`Packet::check_len`] validates version, IHL and total length against the buffer; after it has succeeded no
//! getter panics, for any bytes. [`Packet::payload`] ends at the total length, so trailing Ethernet padding is
//! excluded. The header checksum is not verified by `check_len`; call [`Packet::verify_checksum`].

use core::net::Ipv4Addr;

use super::checksum;
use crate::reason::Reason;

/// Length of an IPv4 header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// IP protocol numbers the gateway handles.
pub mod protocol {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

mod field {
    use core::ops::Range;
    pub(super) const VER_IHL: usize = 0;
    pub(super) const DSCP_ECN: usize = 1;
    pub(super) const LENGTH: Range<usize> = 2..4;
    pub(super) const IDENT: Range<usize> = 4..6;
    pub(super) const FLG_OFF: Range<usize> = 6..8;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: Range<usize> = 10..12;
    pub(super) const SRC: Range<usize> = 12..16;
    pub(super) const DST: Range<usize> = 16..20;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1FFF;

/// A view of an IPv4 packet.
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

    /// Checks, in order: at least 20 bytes (`Ipv4Truncated`), version 4 (`Ipv4BadVersion`), IHL ≥ 5
    /// (`Ipv4BadHeaderLen`), header within the buffer (`Ipv4Truncated`), header length ≤ total length ≤ buffer
    /// length (`Ipv4BadTotalLen`).
    pub fn check_len(&self) -> Result<(), Reason> {
        let len = self.buffer.as_ref().len();
        if len < MIN_HEADER_LEN {
            return Err(Reason::Ipv4Truncated);
        }
        if self.version() != 4 {
            return Err(Reason::Ipv4BadVersion);
        }
        let hl = self.header_len();
        if hl < MIN_HEADER_LEN {
            return Err(Reason::Ipv4BadHeaderLen);
        }
        if hl > len {
            return Err(Reason::Ipv4Truncated);
        }
        let tl = usize::from(self.total_len());
        if tl < hl || tl > len {
            return Err(Reason::Ipv4BadTotalLen);
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

    /// Version field (4).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0F) * 4
    }

    /// DSCP and ECN (the former TOS byte).
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    /// Total length (header and payload) in bytes.
    pub fn total_len(&self) -> u16 {
        self.u16_at(field::LENGTH)
    }

    /// Identification.
    pub fn ident(&self) -> u16 {
        self.u16_at(field::IDENT)
    }

    /// Don't Fragment flag.
    pub fn dont_frag(&self) -> bool {
        self.u16_at(field::FLG_OFF) & FLAG_DF != 0
    }

    /// More Fragments flag.
    pub fn more_frags(&self) -> bool {
        self.u16_at(field::FLG_OFF) & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field × 8).
    pub fn frag_offset(&self) -> u16 {
        (self.u16_at(field::FLG_OFF) & OFFSET_MASK) << 3
    }

    /// Whether this packet is a fragment (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }

    /// Whether this packet is the first fragment of a fragmented datagram (offset 0 and MF set). An
    /// unfragmented packet is not a first fragment; use [`has_transport_header`](Self::has_transport_header)
    /// to ask whether the payload starts with the transport header.
    pub fn is_first_fragment(&self) -> bool {
        self.more_frags() && self.frag_offset() == 0
    }

    /// Whether the payload starts with the transport header (fragment offset 0).
    pub fn has_transport_header(&self) -> bool {
        self.frag_offset() == 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Protocol of the payload (see [`protocol`]).
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Header checksum.
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// The header (including options).
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }

    /// The options (between byte 20 and the header length).
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[MIN_HEADER_LEN..self.header_len()]
    }

    /// The payload: from the header length to the total length (trailing padding excluded).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..usize::from(self.total_len())]
    }

    /// Whether the header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        let h = self.header();
        // Fast path for the usual option-less header: five 32-bit words, one fold.
        if let Ok(h) = <&[u8; 20]>::try_from(h) {
            let w = |i: usize| u64::from(u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]));
            let mut s = w(0) + w(4) + w(8) + w(12) + w(16);
            while s > 0xFFFF {
                s = (s & 0xFFFF) + (s >> 16);
            }
            return s == 0xFFFF;
        }
        checksum::finish(checksum::sum(h, 0)) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn set_u16(&mut self, r: core::ops::Range<usize>, v: u16) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
    }

    /// Sets version 4 and the header length (in bytes, a multiple of 4 between 20 and 60).
    pub fn set_version_and_header_len(&mut self, header_len: usize) {
        debug_assert!(header_len & 3 == 0 && (MIN_HEADER_LEN..=60).contains(&header_len));
        let ihl = u8::try_from(header_len / 4).unwrap_or(0x0F).min(0x0F);
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ihl;
    }

    /// Sets DSCP and ECN.
    pub fn set_dscp_ecn(&mut self, value: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = value;
    }

    /// Sets the total length.
    pub fn set_total_len(&mut self, value: u16) {
        self.set_u16(field::LENGTH, value);
    }

    /// Sets the identification.
    pub fn set_ident(&mut self, value: u16) {
        self.set_u16(field::IDENT, value);
    }

    /// Sets the flags and the fragment offset (in bytes, a multiple of 8; the reserved bit is cleared).
    pub fn set_flags_and_frag_offset(
        &mut self,
        dont_frag: bool,
        more_frags: bool,
        offset_bytes: u16,
    ) {
        debug_assert_eq!(offset_bytes % 8, 0);
        let mut v = (offset_bytes >> 3) & OFFSET_MASK;
        if dont_frag {
            v |= FLAG_DF;
        }
        if more_frags {
            v |= FLAG_MF;
        }
        self.set_u16(field::FLG_OFF, v);
    }

    /// Sets the time to live.
    pub fn set_ttl(&mut self, value: u8) {
        self.buffer.as_mut()[field::TTL] = value;
    }

    /// Sets the protocol.
    pub fn set_protocol(&mut self, value: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = value;
    }

    /// Sets the header checksum.
    pub fn set_checksum(&mut self, value: u16) {
        self.set_u16(field::CHECKSUM, value);
    }

    /// Sets the source address.
    pub fn set_src(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr.octets());
    }

    /// The options, mutably.
    pub fn options_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        &mut self.buffer.as_mut()[MIN_HEADER_LEN..hl]
    }

    /// The payload (header length .. total length), mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), usize::from(self.total_len()));
        &mut self.buffer.as_mut()[hl..tl]
    }

    /// Computes and writes the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::finish(checksum::sum(self.header(), 0));
        self.set_checksum(c);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Outer IPv4 header of the kernel TCP SYN fixture, then 4 bytes of payload and 2 bytes of padding.
    const PACKET: [u8; 26] = [
        0x45, 0x00, 0x00, 0x18, 0xf7, 0x85, 0x00, 0x00, 0x40, 0x11, 0x00, 0x00, 0xac, 0x12, 0x00,
        0x02, 0xac, 0x12, 0x00, 0x03, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x00,
    ];

    fn with_checksum() -> [u8; 26] {
        let mut b = PACKET;
        Packet::new_unchecked(&mut b[..]).fill_checksum();
        b
    }

    #[test]
    fn deconstruct() {
        let b = with_checksum();
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.dscp_ecn(), 0);
        assert_eq!(p.total_len(), 24);
        assert_eq!(p.ident(), 0xf785);
        assert!(!p.dont_frag() && !p.more_frags() && !p.is_fragment() && !p.is_first_fragment());
        assert_eq!(p.frag_offset(), 0);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), protocol::UDP);
        assert_eq!(p.src(), Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(p.dst(), Ipv4Addr::new(172, 18, 0, 3));
        assert!(p.options().is_empty());
        assert_eq!(p.payload(), &[0xde, 0xad, 0xbe, 0xef]);
        assert!(p.verify_checksum());
        // Checksum computed independently: 45 00 00 18 f7 85 ... -> matches the kernel's style.
        assert_eq!(
            p.checksum(),
            checksum::reference::checksum(
                &{
                    let mut h = PACKET;
                    h[10] = 0;
                    h[11] = 0;
                    h
                }[..20]
            )
        );
    }

    #[test]
    fn construct() {
        let mut b = [0u8; 26];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_version_and_header_len(20);
        p.set_dscp_ecn(0);
        p.set_total_len(24);
        p.set_ident(0xf785);
        p.set_flags_and_frag_offset(false, false, 0);
        p.set_ttl(64);
        p.set_protocol(protocol::UDP);
        p.set_src(Ipv4Addr::new(172, 18, 0, 2));
        p.set_dst(Ipv4Addr::new(172, 18, 0, 3));
        p.payload_mut().copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        p.fill_checksum();
        assert_eq!(b, with_checksum());
    }

    #[test]
    fn fragments_and_options() {
        let mut b = [0u8; 32];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_version_and_header_len(24);
        p.set_total_len(32);
        p.set_flags_and_frag_offset(true, true, 1480);
        assert!(p.dont_frag() && p.more_frags() && p.is_fragment() && !p.is_first_fragment());
        assert_eq!(p.frag_offset(), 1480);
        p.set_flags_and_frag_offset(false, true, 0);
        assert!(p.is_first_fragment() && p.has_transport_header());
        p.set_flags_and_frag_offset(false, false, 65528);
        assert_eq!(p.frag_offset(), 65528);
        assert!(p.is_fragment() && !p.has_transport_header());
        p.options_mut().copy_from_slice(&[1, 1, 1, 0]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.options(), &[1, 1, 1, 0]);
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn check_len_errors() {
        let b = with_checksum();
        assert_eq!(
            Packet::new_checked(&b[..19]).unwrap_err(),
            Reason::Ipv4Truncated
        );
        let mut v6 = b;
        v6[0] = 0x65;
        assert_eq!(
            Packet::new_checked(&v6[..]).unwrap_err(),
            Reason::Ipv4BadVersion
        );
        let mut ihl4 = b;
        ihl4[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&ihl4[..]).unwrap_err(),
            Reason::Ipv4BadHeaderLen
        );
        let mut ihl15 = b;
        ihl15[0] = 0x4F;
        assert_eq!(
            Packet::new_checked(&ihl15[..]).unwrap_err(),
            Reason::Ipv4Truncated
        );
        let mut short_total = b;
        short_total[3] = 19;
        assert_eq!(
            Packet::new_checked(&short_total[..]).unwrap_err(),
            Reason::Ipv4BadTotalLen
        );
        let mut long_total = b;
        long_total[3] = 27;
        assert_eq!(
            Packet::new_checked(&long_total[..]).unwrap_err(),
            Reason::Ipv4BadTotalLen
        );
        assert_eq!(
            Packet::new_checked(&b[..23]).unwrap_err(),
            Reason::Ipv4BadTotalLen
        );
        let mut bad = b;
        bad[11] ^= 1;
        assert!(!Packet::new_checked(&bad[..]).unwrap().verify_checksum());
    }

    proptest! {
        #[test]
        fn getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..100), fix in any::<bool>()) {
            if fix && !data.is_empty() {
                data[0] = 0x40 | (data[0] & 0x0F);
                if data.len() >= 4 {
                    let l = u16::try_from(data.len()).unwrap();
                    data[2..4].copy_from_slice(&l.to_be_bytes());
                }
            }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.header_len(), p.dscp_ecn(), p.total_len(), p.ident(), p.dont_frag(),
                    p.more_frags(), p.frag_offset(), p.ttl(), p.protocol(), p.checksum(), p.src(), p.dst(),
                    p.options().len(), p.payload().len(), p.verify_checksum(), p.is_fragment(),
                    p.is_first_fragment(), p.header().len());
            }
        }

        #[test]
        fn incremental_update_matches_recompute(
            hdr in any::<[u8; 20]>(),
            ttl in any::<u8>(),
            src in any::<[u8; 4]>(),
            dst in any::<[u8; 4]>(),
            ident in any::<u16>(),
        ) {
            let mut b = hdr;
            b[0] = 0x45;
            b[2..4].copy_from_slice(&20u16.to_be_bytes());
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.fill_checksum();
            // TTL shares a word with the protocol.
            let old_word = u16::from_be_bytes([p.ttl(), p.protocol()]);
            let new_word = u16::from_be_bytes([ttl, p.protocol()]);
            let mut c = checksum::update_u16(p.checksum(), old_word, new_word);
            p.set_ttl(ttl);
            c = checksum::update_bytes(c, &p.src().octets(), &src);
            p.set_src(Ipv4Addr::from(src));
            c = checksum::update_bytes(c, &p.dst().octets(), &dst);
            p.set_dst(Ipv4Addr::from(dst));
            c = checksum::update_u16(c, p.ident(), ident);
            p.set_ident(ident);
            p.set_checksum(c);
            prop_assert!(p.verify_checksum());
            let mut full = b;
            Packet::new_unchecked(&mut full[..]).fill_checksum();
            prop_assert_eq!(b, full);
        }
    }
}
