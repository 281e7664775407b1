//! ICMP for IPv4 (RFC 792, RFC 1191 for the next-hop MTU).
//!
//! The view covers the whole ICMP message (slice the buffer to the IP payload first); checksums are computed
//! over all of it. [`Packet::check_len`] requires the 8-byte header; after it has succeeded no getter panics,
//! for any bytes.

use crate::reason::Reason;

use super::checksum;
use super::icmp_common::icmp_common;

/// Length of the ICMP header (type, code, checksum and the 4-byte rest of header).
pub const HEADER_LEN: usize = 8;

/// ICMP message types.
pub mod msg_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Source quench (deprecated, RFC 6633).
    pub const SOURCE_QUENCH: u8 = 4;
    /// Redirect.
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 12;
    /// Timestamp request.
    pub const TIMESTAMP: u8 = 13;
    /// Timestamp reply.
    pub const TIMESTAMP_REPLY: u8 = 14;
}

/// ICMP codes.
pub mod code {
    /// Destination unreachable: network unreachable.
    pub const NET_UNREACHABLE: u8 = 0;
    /// Destination unreachable: host unreachable.
    pub const HOST_UNREACHABLE: u8 = 1;
    /// Destination unreachable: protocol unreachable.
    pub const PROTO_UNREACHABLE: u8 = 2;
    /// Destination unreachable: port unreachable.
    pub const PORT_UNREACHABLE: u8 = 3;
    /// Destination unreachable: fragmentation needed and DF set (next-hop MTU in bytes 6..8).
    pub const FRAG_NEEDED: u8 = 4;
    /// Destination unreachable: source route failed.
    pub const SOURCE_ROUTE_FAILED: u8 = 5;
    /// Destination unreachable: destination network administratively prohibited.
    pub const NET_PROHIBITED: u8 = 9;
    /// Destination unreachable: destination host administratively prohibited.
    pub const HOST_PROHIBITED: u8 = 10;
    /// Destination unreachable: communication administratively prohibited.
    pub const ADMIN_PROHIBITED: u8 = 13;
    /// Time exceeded: TTL exceeded in transit.
    pub const TTL_EXCEEDED_IN_TRANSIT: u8 = 0;
    /// Time exceeded: fragment reassembly time exceeded.
    pub const FRAG_REASSEMBLY_TIME_EXCEEDED: u8 = 1;
}

/// Whether `msg_type` is an error message carrying the offending packet (destination unreachable, source
/// quench, redirect, time exceeded, parameter problem).
pub fn is_error(msg_type: u8) -> bool {
    matches!(msg_type, 3 | 4 | 5 | 11 | 12)
}

/// Whether `msg_type` is a query/reply message identified by an identifier (echo, timestamp, information,
/// address mask).
pub fn is_query(msg_type: u8) -> bool {
    matches!(msg_type, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18)
}

mod field {
    use core::ops::Range;
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: Range<usize> = 2..4;
    pub(super) const REST: Range<usize> = 4..8;
    pub(super) const ECHO_IDENT: Range<usize> = 4..6;
    pub(super) const ECHO_SEQNO: Range<usize> = 6..8;
    pub(super) const MTU: Range<usize> = 6..8;
}

/// A view of an ICMP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

icmp_common!();

impl<T: AsRef<[u8]>> Packet<T> {
    /// Next-hop MTU of a fragmentation-needed message (bytes 6..8, RFC 1191).
    pub fn next_hop_mtu(&self) -> u16 {
        self.u16_at(field::MTU)
    }

    /// Whether the checksum over the whole buffer verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::finish(checksum::sum(self.buffer.as_ref(), 0)) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the next-hop MTU (bytes 6..8; bytes 4..6 are left alone).
    pub fn set_next_hop_mtu(&mut self, value: u16) {
        self.set_u16(field::MTU, value);
    }

    /// Computes and writes the checksum over the whole buffer.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::finish(checksum::sum(self.buffer.as_ref(), 0));
        self.set_checksum(c);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    // An echo request: id 0x1234, seq 1, 4 bytes of data, checksum 0x482d (computed independently).
    const ECHO: [u8; 12] = [
        0x08, 0x00, 0x48, 0x2d, 0x12, 0x34, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef,
    ];

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&ECHO[..]).unwrap();
        assert_eq!(p.msg_type(), msg_type::ECHO_REQUEST);
        assert_eq!(p.msg_code(), 0);
        assert_eq!(p.checksum(), 0x482d);
        assert_eq!(p.echo_ident(), 0x1234);
        assert_eq!(p.echo_seq_no(), 1);
        assert_eq!(p.rest_of_header(), [0x12, 0x34, 0x00, 0x01]);
        assert_eq!(p.data(), &[0xde, 0xad, 0xbe, 0xef]);
        assert!(p.verify_checksum());
        assert!(is_query(p.msg_type()) && !is_error(p.msg_type()));
    }

    #[test]
    fn construct() {
        let mut b = [0u8; 12];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_msg_type(msg_type::ECHO_REQUEST);
        p.set_msg_code(0);
        p.set_echo_ident(0x1234);
        p.set_echo_seq_no(1);
        p.data_mut().copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        p.fill_checksum();
        assert_eq!(b, ECHO);
        // Fragmentation needed with MTU 1450.
        let mut b = [0u8; 8];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_msg_type(msg_type::DEST_UNREACHABLE);
        p.set_msg_code(code::FRAG_NEEDED);
        p.set_rest_of_header([0, 0, 0, 0]);
        p.set_next_hop_mtu(1450);
        p.fill_checksum();
        assert_eq!(&b[..2], &[3, 4]);
        assert_eq!(&b[4..], &[0, 0, 0x05, 0xaa]);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(p.next_hop_mtu(), 1450);
        assert!(p.verify_checksum() && is_error(p.msg_type()));
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Packet::new_checked(&ECHO[..7]).unwrap_err(),
            Reason::IcmpTruncated
        );
        let mut bad = ECHO;
        bad[9] ^= 0x40;
        assert!(!Packet::new_checked(&bad[..]).unwrap().verify_checksum());
    }

    proptest! {
        #[test]
        fn getters_never_panic(data in proptest::collection::vec(any::<u8>(), 0..24)) {
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.msg_type(), p.msg_code(), p.checksum(), p.echo_ident(), p.echo_seq_no(),
                    p.next_hop_mtu(), p.rest_of_header(), p.data().len(), p.verify_checksum());
            }
        }

        #[test]
        fn incremental_ident_matches_recompute(
            data in proptest::collection::vec(any::<u8>(), 8..64), ident in any::<u16>(),
        ) {
            let mut b = data;
            b[0] = msg_type::ECHO_REQUEST;
            let mut p = Packet::new_unchecked(&mut b[..]);
            p.fill_checksum();
            let c = checksum::update_u16(p.checksum(), p.echo_ident(), ident);
            p.set_echo_ident(ident);
            p.set_checksum(c);
            prop_assert!(p.verify_checksum());
            p.fill_checksum();
            prop_assert_eq!(c, p.checksum());
        }
    }
}
