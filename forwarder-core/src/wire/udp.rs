//! UDP headers (RFC 768).
//!
//! [`Packet::check_len`] validates the length field against the buffer; after it has succeeded no getter
//! panics, for any bytes. [`Packet::payload`] ends at the length field, so bytes after it are ignored.
//!
//! Checksums: over IPv4 a checksum of 0 means "none" and verifies; over IPv6 it is invalid (RFC 8200 §8.1).
//! A computed checksum of 0 is transmitted as `0xFFFF`.

use core::net::{Ipv4Addr, Ipv6Addr};

use super::{checksum, len_u32};
use crate::reason::Reason;

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;

/// IP protocol number of UDP.
const PROTOCOL: u8 = 17;

mod field {
    use core::ops::Range;
    pub(super) const SRC_PORT: Range<usize> = 0..2;
    pub(super) const DST_PORT: Range<usize> = 2..4;
    pub(super) const LENGTH: Range<usize> = 4..6;
    pub(super) const CHECKSUM: Range<usize> = 6..8;
}

/// A view of a UDP datagram.
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

    /// `UdpTruncated` if shorter than 8 bytes; `UdpBadLength` if the length field is below 8 or larger than
    /// the buffer.
    pub fn check_len(&self) -> Result<(), Reason> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Reason::UdpTruncated);
        }
        let l = usize::from(self.len());
        if l < HEADER_LEN || l > len {
            return Err(Reason::UdpBadLength);
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

    /// Source port.
    pub fn src_port(&self) -> u16 {
        self.u16_at(field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        self.u16_at(field::DST_PORT)
    }

    /// The length field: header and payload, in bytes (same as [`length`](Self::length)).
    #[allow(clippy::len_without_is_empty)] // the UDP length field, never "empty" once checked
    pub fn len(&self) -> u16 {
        self.u16_at(field::LENGTH)
    }

    /// The length field: header and payload, in bytes (same as [`len`](Self::len)).
    pub fn length(&self) -> u16 {
        self.len()
    }

    /// Checksum field (0 = none, IPv4 only).
    pub fn checksum(&self) -> u16 {
        self.u16_at(field::CHECKSUM)
    }

    /// The datagram as covered by the checksum: bytes `0..len` (clamped to the buffer).
    fn datagram(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[..usize::from(self.len()).min(b.len())]
    }

    /// The payload: bytes `8..len`.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..usize::from(self.len())]
    }

    /// Unfolded sum of the datagram (checksum field included) and the IPv4 pseudo-header.
    fn sum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> u32 {
        let d = self.datagram();
        checksum::sum(
            d,
            checksum::pseudo_header_v4(src, dst, PROTOCOL, len_u32(d.len())),
        )
    }

    fn sum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> u32 {
        let d = self.datagram();
        checksum::sum(
            d,
            checksum::pseudo_header_v6(src, dst, PROTOCOL, len_u32(d.len())),
        )
    }

    /// Whether the checksum verifies over IPv4; a zero checksum (none sent) verifies.
    pub fn verify_checksum_v4(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        self.checksum() == 0 || checksum::finish(self.sum_v4(src, dst)) == 0
    }

    /// Whether the checksum verifies over IPv6; a zero checksum is invalid there.
    pub fn verify_checksum_v6(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        self.checksum() != 0 && checksum::finish(self.sum_v6(src, dst)) == 0
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

    /// Sets the length field.
    pub fn set_len(&mut self, value: u16) {
        self.set_u16(field::LENGTH, value);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        self.set_u16(field::CHECKSUM, value);
    }

    /// The payload (`8..len`), mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }

    /// Computes and writes the checksum over IPv4 (a computed 0 is written as `0xFFFF`).
    pub fn fill_checksum_v4(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let c = checksum::finish(self.sum_v4(src, dst));
        self.set_checksum(if c == 0 { 0xFFFF } else { c });
    }

    /// Computes and writes the checksum over IPv6 (a computed 0 is written as `0xFFFF`).
    pub fn fill_checksum_v6(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let c = checksum::finish(self.sum_v6(src, dst));
        self.set_checksum(if c == 0 { 0xFFFF } else { c });
    }
}

/// Writes a UDP header (checksum 0) into the first 8 bytes of `out`.
///
/// # Panics
/// If `out` is shorter than [`HEADER_LEN`].
pub fn emit_header(src_port: u16, dst_port: u16, len: u16, out: &mut [u8]) {
    let mut p = Packet::new_unchecked(&mut out[..HEADER_LEN]);
    p.set_src_port(src_port);
    p.set_dst_port(dst_port);
    p.set_len(len);
    p.set_checksum(0);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The inner UDP datagram of the kernel fixture vxlan_udp.hex: 10.10.10.1:40000 -> 198.51.100.10:5353.
    const SRC: Ipv4Addr = Ipv4Addr::new(10, 10, 10, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

    fn datagram() -> Vec<u8> {
        let payload = b"hello from the kernel vxlan\n";
        let mut b = vec![0u8; 8 + payload.len()];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_src_port(40000);
        p.set_dst_port(5353);
        p.set_len(36);
        p.payload_mut().copy_from_slice(payload);
        p.fill_checksum_v4(SRC, DST);
        b
    }

    #[test]
    fn deconstruct_construct() {
        let b = datagram();
        assert_eq!(&b[..8], &[0x9c, 0x40, 0x14, 0xe9, 0x00, 0x24, b[6], b[7]]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(
            (p.src_port(), p.dst_port(), p.len(), p.length()),
            (40000, 5353, 36, 36)
        );
        assert_eq!(p.payload(), b"hello from the kernel vxlan\n");
        assert!(p.verify_checksum_v4(SRC, DST));
        assert!(!p.verify_checksum_v4(SRC, Ipv4Addr::new(198, 51, 100, 11)));
        let mut h = [0u8; 8];
        emit_header(40000, 5353, 36, &mut h);
        assert_eq!(h[..6], b[..6]);
    }

    #[test]
    fn zero_and_ffff() {
        let mut b = datagram();
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_checksum(0);
        assert!(p.verify_checksum_v4(SRC, DST));
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let z: Ipv6Addr = "2001:db8::2".parse().unwrap();
        assert!(!p.verify_checksum_v6(&a, &z));
        p.fill_checksum_v6(&a, &z);
        assert!(p.verify_checksum_v6(&a, &z));
        // Find a source port that makes the computed checksum 0: it must be sent as 0xFFFF and verify.
        let c = p.checksum();
        let port = p.src_port();
        let target = checksum::update_u16(c, port, 0);
        // A src port equal to the checksum of the rest makes the total 0xFFFF, i.e. a computed checksum of 0.
        let zero_port = target;
        p.set_src_port(zero_port);
        p.fill_checksum_v6(&a, &z);
        assert_eq!(p.checksum(), 0xFFFF);
        assert!(p.verify_checksum_v6(&a, &z));
    }

    #[test]
    fn check_len_errors() {
        let b = datagram();
        assert_eq!(
            Packet::new_checked(&b[..7]).unwrap_err(),
            Reason::UdpTruncated
        );
        assert_eq!(
            Packet::new_checked(&b[..35]).unwrap_err(),
            Reason::UdpBadLength
        );
        let mut short = b.clone();
        short[5] = 7;
        assert_eq!(
            Packet::new_checked(&short[..]).unwrap_err(),
            Reason::UdpBadLength
        );
        let mut trailing = b.clone();
        trailing.push(0);
        assert_eq!(
            Packet::new_checked(&trailing[..]).unwrap().payload().len(),
            28
        );
    }

    proptest! {
        #[test]
        fn getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..40), fix in any::<bool>()) {
            if fix && data.len() >= 8 {
                let l = u16::try_from(data.len()).unwrap();
                data[4..6].copy_from_slice(&l.to_be_bytes());
            }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let a = Ipv6Addr::LOCALHOST;
                let _ = (p.src_port(), p.dst_port(), p.len(), p.checksum(), p.payload().len(),
                    p.verify_checksum_v4(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST), p.verify_checksum_v6(&a, &a));
            }
        }

        #[test]
        fn incremental_nat_matches_recompute(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new_src in any::<[u8; 4]>(),
            sport in any::<u16>(), new_sport in any::<u16>(), zero in any::<bool>(),
        ) {
            let (src, dst, new_src) = (Ipv4Addr::from(src), Ipv4Addr::from(dst), Ipv4Addr::from(new_src));
            let mut b = vec![0u8; 8 + payload.len()];
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.set_src_port(sport);
            p.set_dst_port(53);
            p.set_len(u16::try_from(8 + payload.len()).unwrap());
            p.payload_mut().copy_from_slice(&payload);
            if zero { p.set_checksum(0) } else { p.fill_checksum_v4(src, dst) }
            // SNAT: source address (pseudo-header) and source port.
            let mut c = checksum::udp_update(p.checksum(), &src.octets(), &new_src.octets());
            c = checksum::udp_update(c, &sport.to_be_bytes(), &new_sport.to_be_bytes());
            p.set_src_port(new_sport);
            p.set_checksum(c);
            if zero {
                prop_assert_eq!(p.checksum(), 0);
            } else {
                let got = p.checksum();
                p.fill_checksum_v4(new_src, dst);
                prop_assert_eq!(got, p.checksum());
                prop_assert!(p.verify_checksum_v4(new_src, dst));
            }
        }

        #[test]
        fn incremental_nat_v6_matches_recompute(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new_src in any::<[u8; 16]>(),
        ) {
            let (src, dst, new_src) = (Ipv6Addr::from(src), Ipv6Addr::from(dst), Ipv6Addr::from(new_src));
            let mut b = vec![0u8; 8 + payload.len()];
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.set_len(u16::try_from(8 + payload.len()).unwrap());
            p.payload_mut().copy_from_slice(&payload);
            p.fill_checksum_v6(&src, &dst);
            let c = checksum::udp_update(p.checksum(), &src.octets(), &new_src.octets());
            p.fill_checksum_v6(&new_src, &dst);
            prop_assert_eq!(c, p.checksum());
        }
    }
}
