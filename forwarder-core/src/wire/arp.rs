//! ARP for Ethernet and IPv4 (RFC 826) — the only kind the gateway answers.
//!
//! [`Packet::check_len`] accepts only Ethernet/IPv4 ARP (htype 1, ptype 0x0800, hlen 6, plen 4) of at least
//! [`PACKET_LEN`] bytes; after it has succeeded, no getter panics, for any bytes.

use core::net::Ipv4Addr;

use super::ethernet::{mac, MacAddr};
use crate::reason::Reason;

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// ARP request operation.
pub const OP_REQUEST: u16 = 1;
/// ARP reply operation.
pub const OP_REPLY: u16 = 2;
/// Hardware type Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;

mod field {
    use core::ops::Range;
    pub(super) const HTYPE: Range<usize> = 0..2;
    pub(super) const PTYPE: Range<usize> = 2..4;
    pub(super) const HLEN: usize = 4;
    pub(super) const PLEN: usize = 5;
    pub(super) const OPER: Range<usize> = 6..8;
    pub(super) const SHA: Range<usize> = 8..14;
    pub(super) const SPA: Range<usize> = 14..18;
    pub(super) const THA: Range<usize> = 18..24;
    pub(super) const TPA: Range<usize> = 24..28;
}

/// A view of an Ethernet/IPv4 ARP packet (without the Ethernet header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn ipv4_at(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
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

    /// `ArpMalformed` if shorter than [`PACKET_LEN`] or not Ethernet/IPv4 ARP.
    pub fn check_len(&self) -> Result<(), Reason> {
        let b = self.buffer.as_ref();
        if b.len() < PACKET_LEN
            || self.hardware_type() != HTYPE_ETHERNET
            || self.protocol_type() != super::ethernet::ethertype::IPV4
            || b[field::HLEN] != 6
            || b[field::PLEN] != 4
        {
            return Err(Reason::ArpMalformed);
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

    /// Hardware type (1 = Ethernet).
    pub fn hardware_type(&self) -> u16 {
        self.u16_at(field::HTYPE)
    }

    /// Protocol type (0x0800 = IPv4).
    pub fn protocol_type(&self) -> u16 {
        self.u16_at(field::PTYPE)
    }

    /// Operation ([`OP_REQUEST`] or [`OP_REPLY`]).
    pub fn operation(&self) -> u16 {
        self.u16_at(field::OPER)
    }

    /// Sender hardware address.
    pub fn sender_hw(&self) -> MacAddr {
        mac(&self.buffer.as_ref()[field::SHA])
    }

    /// Sender protocol address.
    pub fn sender_ip(&self) -> Ipv4Addr {
        ipv4_at(&self.buffer.as_ref()[field::SPA])
    }

    /// Target hardware address.
    pub fn target_hw(&self) -> MacAddr {
        mac(&self.buffer.as_ref()[field::THA])
    }

    /// Target protocol address.
    pub fn target_ip(&self) -> Ipv4Addr {
        ipv4_at(&self.buffer.as_ref()[field::TPA])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the fixed Ethernet/IPv4 fields: htype 1, ptype 0x0800, hlen 6, plen 4.
    pub fn set_ethernet_ipv4(&mut self) {
        let b = self.buffer.as_mut();
        b[field::HTYPE].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
        b[field::PTYPE].copy_from_slice(&super::ethernet::ethertype::IPV4.to_be_bytes());
        b[field::HLEN] = 6;
        b[field::PLEN] = 4;
    }

    /// Sets the operation.
    pub fn set_operation(&mut self, op: u16) {
        self.buffer.as_mut()[field::OPER].copy_from_slice(&op.to_be_bytes());
    }

    /// Sets the sender hardware address.
    pub fn set_sender_hw(&mut self, addr: &MacAddr) {
        self.buffer.as_mut()[field::SHA].copy_from_slice(addr);
    }

    /// Sets the sender protocol address.
    pub fn set_sender_ip(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SPA].copy_from_slice(&addr.octets());
    }

    /// Sets the target hardware address.
    pub fn set_target_hw(&mut self, addr: &MacAddr) {
        self.buffer.as_mut()[field::THA].copy_from_slice(addr);
    }

    /// Sets the target protocol address.
    pub fn set_target_ip(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::TPA].copy_from_slice(&addr.octets());
    }
}

/// Writes a complete 28-byte Ethernet/IPv4 ARP packet into `out` and returns [`PACKET_LEN`].
///
/// # Panics
/// If `out` is shorter than [`PACKET_LEN`].
pub fn emit(
    op: u16,
    sender_hw: &MacAddr,
    sender_ip: Ipv4Addr,
    target_hw: &MacAddr,
    target_ip: Ipv4Addr,
    out: &mut [u8],
) -> usize {
    let mut p = Packet::new_unchecked(&mut out[..PACKET_LEN]);
    p.set_ethernet_ipv4();
    p.set_operation(op);
    p.set_sender_hw(sender_hw);
    p.set_sender_ip(sender_ip);
    p.set_target_hw(target_hw);
    p.set_target_ip(target_ip);
    PACKET_LEN
}

/// Writes the 28-byte ARP reply (no Ethernet header) answering `request` with `our_mac` as the hardware
/// address of the requested IP, and returns [`PACKET_LEN`]. The caller decides whether the request is for an
/// address it owns.
///
/// # Panics
/// If `out` is shorter than [`PACKET_LEN`].
pub fn emit_reply(request: &Packet<&[u8]>, our_mac: &MacAddr, out: &mut [u8]) -> usize {
    emit(
        OP_REPLY,
        our_mac,
        request.target_ip(),
        &request.sender_hw(),
        request.sender_ip(),
        out,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The inner ARP request of the kernel fixture: who-has 10.10.10.3 tell 10.10.10.1.
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x66, 0x7e, 0x0a, 0x0a, 0x0a, 0x01, 0x0a,
        0x0a, 0x0a, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x0a, 0x0a, 0x03,
    ];

    #[test]
    fn deconstruct() {
        let p = Packet::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.operation(), OP_REQUEST);
        assert_eq!(p.sender_hw(), [0x66, 0x7e, 0x0a, 0x0a, 0x0a, 0x01]);
        assert_eq!(p.sender_ip(), Ipv4Addr::new(10, 10, 10, 1));
        assert_eq!(p.target_hw(), [0; 6]);
        assert_eq!(p.target_ip(), Ipv4Addr::new(10, 10, 10, 3));
    }

    #[test]
    fn construct_and_reply() {
        let mut buf = [0xAAu8; 28];
        emit(
            OP_REQUEST,
            &[0x66, 0x7e, 0x0a, 0x0a, 0x0a, 0x01],
            Ipv4Addr::new(10, 10, 10, 1),
            &[0; 6],
            Ipv4Addr::new(10, 10, 10, 3),
            &mut buf,
        );
        assert_eq!(buf, REQUEST);

        let req = Packet::new_checked(&REQUEST[..]).unwrap();
        let ours = [0xa2, 0x2a, 0x0a, 0x0a, 0x0a, 0x03];
        let mut out = [0u8; 40];
        assert_eq!(emit_reply(&req, &ours, &mut out), 28);
        let r = Packet::new_checked(&out[..28]).unwrap();
        assert_eq!(r.operation(), OP_REPLY);
        assert_eq!(r.sender_hw(), ours);
        assert_eq!(r.sender_ip(), Ipv4Addr::new(10, 10, 10, 3));
        assert_eq!(r.target_hw(), [0x66, 0x7e, 0x0a, 0x0a, 0x0a, 0x01]);
        assert_eq!(r.target_ip(), Ipv4Addr::new(10, 10, 10, 1));
        assert!(out[28..].iter().all(|&b| b == 0));
    }

    #[test]
    fn malformed() {
        assert_eq!(
            Packet::new_checked(&REQUEST[..27]).unwrap_err(),
            Reason::ArpMalformed
        );
        for (i, v) in [(1, 6), (2, 0x86), (4, 8), (5, 16)] {
            let mut b = REQUEST;
            b[i] = v;
            assert_eq!(
                Packet::new_checked(&b[..]).unwrap_err(),
                Reason::ArpMalformed,
                "byte {i}"
            );
        }
        // Trailing Ethernet padding is fine.
        let mut long = [0u8; 46];
        long[..28].copy_from_slice(&REQUEST);
        assert!(Packet::new_checked(&long[..]).is_ok());
    }

    proptest! {
        #[test]
        fn getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..40), fix in any::<bool>()) {
            if fix && data.len() >= 8 { data[..6].copy_from_slice(&REQUEST[..6]); }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.operation(), p.sender_hw(), p.sender_ip(), p.target_hw(), p.target_ip());
                let mut out = [0u8; 28];
                emit_reply(&p, &[1; 6], &mut out);
            }
        }
    }
}
