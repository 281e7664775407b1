//! ICMPv6 (RFC 4443) and the Neighbor Discovery target address (RFC 4861).
//!
//! The view covers the whole ICMPv6 message (slice the buffer to the upper-layer payload first); checksums are
//! computed over all of it plus the IPv6 pseudo-header. [`Packet::check_len`] requires the 8-byte header;
//! after it has succeeded no getter panics, for any bytes ([`Packet::target_addr`] returns `::` when the
//! message is too short to hold one — use [`Packet::checked_target_addr`] to tell).

use core::net::Ipv6Addr;

use super::icmp_common::icmp_common;
use super::{checksum, len_u32};
use crate::reason::Reason;

/// Length of the ICMPv6 header (type, code, checksum and 4 type-specific bytes).
pub const HEADER_LEN: usize = 8;

/// Length of a Neighbor Solicitation / Advertisement without options (header and target address).
pub const NDP_TARGET_LEN: usize = 24;

/// Next-header number of ICMPv6.
const PROTOCOL: u8 = 58;

/// ICMPv6 message types.
pub mod msg_type {
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 1;
    /// Packet too big (MTU in bytes 4..8).
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 4;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Router solicitation.
    pub const ROUTER_SOLICIT: u8 = 133;
    /// Router advertisement.
    pub const ROUTER_ADVERT: u8 = 134;
    /// Neighbor solicitation.
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    /// Neighbor advertisement.
    pub const NEIGHBOR_ADVERT: u8 = 136;
    /// Redirect.
    pub const REDIRECT: u8 = 137;
}

/// ICMPv6 codes.
pub mod code {
    /// Destination unreachable: no route to destination.
    pub const NO_ROUTE: u8 = 0;
    /// Destination unreachable: communication administratively prohibited.
    pub const ADMIN_PROHIBITED: u8 = 1;
    /// Destination unreachable: address unreachable.
    pub const ADDR_UNREACHABLE: u8 = 3;
    /// Destination unreachable: port unreachable.
    pub const PORT_UNREACHABLE: u8 = 4;
    /// Time exceeded: hop limit exceeded in transit.
    pub const HOP_LIMIT_EXCEEDED: u8 = 0;
    /// Time exceeded: fragment reassembly time exceeded.
    pub const FRAG_REASSEMBLY_TIME_EXCEEDED: u8 = 1;
}

/// Whether `msg_type` is an error message (types 0–127, RFC 4443 §2.1).
pub fn is_error(msg_type: u8) -> bool {
    msg_type < 128
}

/// Whether `msg_type` is an echo request or reply (the only ICMPv6 queries the gateway translates; Neighbor
/// Discovery and other informational messages are neither errors nor queries here).
pub fn is_query(msg_type: u8) -> bool {
    matches!(msg_type, msg_type::ECHO_REQUEST | msg_type::ECHO_REPLY)
}

mod field {
    use core::ops::Range;
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: Range<usize> = 2..4;
    pub(super) const REST: Range<usize> = 4..8;
    pub(super) const ECHO_IDENT: Range<usize> = 4..6;
    pub(super) const ECHO_SEQNO: Range<usize> = 6..8;
    pub(super) const TARGET: Range<usize> = 8..24;
}

/// A view of an ICMPv6 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

icmp_common!();

impl<T: AsRef<[u8]>> Packet<T> {
    /// MTU of a packet-too-big message (bytes 4..8); the pointer of a parameter problem.
    pub fn mtu(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::REST];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Target address of a Neighbor Solicitation / Advertisement (bytes 8..24), or `::` if the message is
    /// shorter than [`NDP_TARGET_LEN`].
    pub fn target_addr(&self) -> Ipv6Addr {
        self.checked_target_addr().unwrap_or(Ipv6Addr::UNSPECIFIED)
    }

    /// Target address of a Neighbor Solicitation / Advertisement, or `IcmpTruncated` if the message is
    /// shorter than [`NDP_TARGET_LEN`].
    pub fn checked_target_addr(&self) -> Result<Ipv6Addr, Reason> {
        let b = self
            .buffer
            .as_ref()
            .get(field::TARGET)
            .ok_or(Reason::IcmpTruncated)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        Ok(Ipv6Addr::from(a))
    }

    fn sum(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> u32 {
        let b = self.buffer.as_ref();
        checksum::sum(
            b,
            checksum::pseudo_header_v6(src, dst, PROTOCOL, len_u32(b.len())),
        )
    }

    /// Whether the checksum (whole buffer plus the IPv6 pseudo-header) verifies.
    pub fn verify_checksum(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        checksum::finish(self.sum(src, dst)) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the MTU (bytes 4..8).
    pub fn set_mtu(&mut self, value: u32) {
        self.buffer.as_mut()[field::REST].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the NDP target address (bytes 8..24).
    pub fn set_target_addr(&mut self, addr: &Ipv6Addr) {
        self.buffer.as_mut()[field::TARGET].copy_from_slice(&addr.octets());
    }

    /// Computes and writes the checksum (whole buffer plus the IPv6 pseudo-header).
    pub fn fill_checksum(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let c = checksum::finish(self.sum(src, dst));
        self.set_checksum(c);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addrs() -> (Ipv6Addr, Ipv6Addr) {
        (
            "fe80::1".parse().unwrap(),
            "ff02::1:ff00:2".parse().unwrap(),
        )
    }

    // Neighbor solicitation for fe80::2 from fe80::1, no options; checksum computed independently.
    const NS: [u8; 24] = [
        0x87, 0x00, 0x7d, 0xa1, 0, 0, 0, 0, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
    ];

    #[test]
    fn deconstruct_ndp() {
        let (s, d) = addrs();
        let p = Packet::new_checked(&NS[..]).unwrap();
        assert_eq!(p.msg_type(), msg_type::NEIGHBOR_SOLICIT);
        assert_eq!(p.msg_code(), 0);
        assert_eq!(p.target_addr(), "fe80::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.data().len(), 16);
        assert!(p.verify_checksum(&s, &d), "checksum {:04x}", p.checksum());
        assert!(!is_error(p.msg_type()) && !is_query(p.msg_type()));
        let short = Packet::new_checked(&NS[..23]).unwrap();
        assert_eq!(short.target_addr(), Ipv6Addr::UNSPECIFIED);
        assert_eq!(short.checked_target_addr(), Err(Reason::IcmpTruncated));
    }

    #[test]
    fn construct() {
        let (s, d) = addrs();
        let mut b = [0u8; 24];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_msg_type(msg_type::NEIGHBOR_SOLICIT);
        p.set_rest_of_header([0; 4]);
        p.set_target_addr(&"fe80::2".parse().unwrap());
        p.fill_checksum(&s, &d);
        assert_eq!(b, NS);

        let mut b = [0u8; 12];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_msg_type(msg_type::PACKET_TOO_BIG);
        p.set_msg_code(0);
        p.set_mtu(1430);
        p.data_mut().copy_from_slice(&[0x60, 0, 0, 0]);
        p.fill_checksum(&s, &d);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.mtu(), 1430);
        assert!(p.verify_checksum(&s, &d) && is_error(p.msg_type()));

        let mut b = [0u8; 8];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_msg_type(msg_type::ECHO_REQUEST);
        p.set_echo_ident(7);
        p.set_echo_seq_no(9);
        assert_eq!(b, [128, 0, 0, 0, 0, 7, 0, 9]);
        assert!(is_query(b[0]));
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Packet::new_checked(&NS[..7]).unwrap_err(),
            Reason::IcmpTruncated
        );
    }

    proptest! {
        #[test]
        fn getters_never_panic(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let (s, d) = addrs();
                let _ = (p.msg_type(), p.msg_code(), p.checksum(), p.echo_ident(), p.echo_seq_no(), p.mtu(),
                    p.rest_of_header(), p.data().len(), p.target_addr(), p.verify_checksum(&s, &d));
            }
        }

        #[test]
        fn pseudo_header_incremental_matches_recompute(
            data in proptest::collection::vec(any::<u8>(), 8..64),
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new_src in any::<[u8; 16]>(), ident in any::<u16>(),
        ) {
            let (src, dst, new_src) = (Ipv6Addr::from(src), Ipv6Addr::from(dst), Ipv6Addr::from(new_src));
            let mut b = data;
            b[0] = msg_type::ECHO_REQUEST;
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.fill_checksum(&src, &dst);
            // NAT66-style rewrite of the source address (pseudo-header) and the echo identifier.
            let mut c = checksum::update_bytes(p.checksum(), &src.octets(), &new_src.octets());
            c = checksum::update_u16(c, p.echo_ident(), ident);
            p.set_echo_ident(ident);
            p.set_checksum(c);
            prop_assert!(p.verify_checksum(&new_src, &dst));
            p.fill_checksum(&new_src, &dst);
            prop_assert_eq!(c, p.checksum());
        }
    }
}
