//! IPv6 headers (RFC 8200) and the extension-header walker.
//!
//! [`Packet::check_len`] validates the version and the payload length against the buffer; after it has
//! succeeded no getter panics, for any bytes. [`Packet::upper_layer`] walks the extension headers with bounds
//! checks on every step and never panics either.

use core::net::Ipv6Addr;

use crate::reason::Reason;

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

/// Most extension headers [`Packet::upper_layer`] walks before giving up.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// Next-header values of interest.
pub mod next_header {
    /// Hop-by-Hop Options.
    pub const HOP_BY_HOP: u8 = 0;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// Routing header.
    pub const ROUTING: u8 = 43;
    /// Fragment header.
    pub const FRAGMENT: u8 = 44;
    /// Encapsulating Security Payload.
    pub const ESP: u8 = 50;
    /// Authentication Header.
    pub const AH: u8 = 51;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// No Next Header.
    pub const NO_NEXT_HEADER: u8 = 59;
    /// Destination Options.
    pub const DEST_OPTIONS: u8 = 60;
}

mod field {
    use core::ops::Range;
    pub(super) const VER_TC_FLOW: Range<usize> = 0..4;
    pub(super) const LENGTH: Range<usize> = 4..6;
    pub(super) const NXT_HDR: usize = 6;
    pub(super) const HOP_LIMIT: usize = 7;
    pub(super) const SRC: Range<usize> = 8..24;
    pub(super) const DST: Range<usize> = 24..40;
}

/// The fragment header found while walking extension headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentHeader {
    /// Fragment offset in bytes.
    pub offset: u16,
    /// More Fragments flag.
    pub more: bool,
    /// Identification.
    pub ident: u32,
    /// Where the 8-byte fragment header starts, from the start of the IPv6 header.
    pub header_offset: usize,
}

/// Where the upper-layer header starts, as found by [`Packet::upper_layer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperLayer {
    /// Upper-layer protocol (TCP, UDP, ICMPv6, ESP, No Next Header or anything unknown).
    pub protocol: u8,
    /// Offset of the upper-layer header from the start of the IPv6 header.
    pub offset: usize,
    /// The fragment header, if there is one.
    pub fragment: Option<FragmentHeader>,
}

/// A view of an IPv6 packet.
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

    /// `Ipv6Truncated` if shorter than 40 bytes, `Ipv6BadVersion` if the version is not 6,
    /// `Ipv6BadPayloadLen` if 40 + payload length exceeds the buffer (trailing bytes are allowed).
    pub fn check_len(&self) -> Result<(), Reason> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Reason::Ipv6Truncated);
        }
        if self.version() != 6 {
            return Err(Reason::Ipv6BadVersion);
        }
        if HEADER_LEN + usize::from(self.payload_len()) > len {
            return Err(Reason::Ipv6BadPayloadLen);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn word0(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VER_TC_FLOW];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Version field (6).
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[0] >> 4
    }

    /// Traffic class (DSCP and ECN).
    pub fn traffic_class(&self) -> u8 {
        let b = self.buffer.as_ref();
        (b[0] << 4) | (b[1] >> 4)
    }

    /// Flow label (20 bits).
    pub fn flow_label(&self) -> u32 {
        self.word0() & 0x000F_FFFF
    }

    /// Payload length (everything after the fixed header, extension headers included).
    pub fn payload_len(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::LENGTH];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Next header of the fixed header.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::SRC])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        addr(&self.buffer.as_ref()[field::DST])
    }

    /// The payload: bytes 40 .. 40 + payload length (trailing bytes excluded).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..HEADER_LEN + usize::from(self.payload_len())]
    }

    /// Walks the extension headers and returns where the upper-layer header starts.
    ///
    /// Skips Hop-by-Hop (0, only as the first header), Routing (43), Destination Options (60) — lengths in
    /// 8-octet units not counting the first 8 — AH (51, in 4-octet units not counting the first 8) and the
    /// Fragment header (44, 8 bytes). Stops at anything else and returns it as the protocol. For a non-first
    /// fragment (offset ≠ 0) it stops right after the fragment header and returns the fragment's next header.
    ///
    /// Errors: `Ipv6TooManyExtensionHeaders` beyond [`MAX_EXTENSION_HEADERS`]; `Ipv6BadExtensionHeader` when a
    /// header runs past the payload, Hop-by-Hop is not first, or a second fragment header appears.
    pub fn upper_layer(&self) -> Result<UpperLayer, Reason> {
        let b = self.buffer.as_ref();
        let end = (HEADER_LEN + usize::from(self.payload_len())).min(b.len());
        let mut next = self.next_header();
        let mut offset = HEADER_LEN;
        let mut fragment: Option<FragmentHeader> = None;
        let mut count = 0;
        loop {
            let len = match next {
                next_header::HOP_BY_HOP | next_header::ROUTING | next_header::DEST_OPTIONS => {
                    if next == next_header::HOP_BY_HOP && count != 0 {
                        return Err(Reason::Ipv6BadExtensionHeader);
                    }
                    let l = *b.get(offset + 1).ok_or(Reason::Ipv6BadExtensionHeader)?;
                    (usize::from(l) + 1) * 8
                }
                next_header::AH => {
                    let l = *b.get(offset + 1).ok_or(Reason::Ipv6BadExtensionHeader)?;
                    (usize::from(l) + 2) * 4
                }
                next_header::FRAGMENT => 8,
                _ => {
                    return Ok(UpperLayer {
                        protocol: next,
                        offset,
                        fragment,
                    })
                }
            };
            if count == MAX_EXTENSION_HEADERS {
                return Err(Reason::Ipv6TooManyExtensionHeaders);
            }
            count += 1;
            let hdr = b.get(offset..offset + len).filter(|_| offset + len <= end);
            let hdr = hdr.ok_or(Reason::Ipv6BadExtensionHeader)?;
            if next == next_header::FRAGMENT {
                if fragment.is_some() {
                    return Err(Reason::Ipv6BadExtensionHeader);
                }
                let off_flags = u16::from_be_bytes([hdr[2], hdr[3]]);
                let frag = FragmentHeader {
                    offset: off_flags & 0xFFF8,
                    more: off_flags & 1 != 0,
                    ident: u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]),
                    header_offset: offset,
                };
                fragment = Some(frag);
                if frag.offset != 0 {
                    return Ok(UpperLayer {
                        protocol: hdr[0],
                        offset: offset + len,
                        fragment,
                    });
                }
            }
            next = hdr[0];
            offset += len;
        }
    }
}

fn addr(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ipv6Addr::from(a)
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the version field (pass 6), keeping traffic class and flow label.
    pub fn set_version(&mut self, version: u8) {
        let b = self.buffer.as_mut();
        b[0] = (version << 4) | (b[0] & 0x0F);
    }

    /// Sets the traffic class.
    pub fn set_traffic_class(&mut self, value: u8) {
        let b = self.buffer.as_mut();
        b[0] = (b[0] & 0xF0) | (value >> 4);
        b[1] = (b[1] & 0x0F) | (value << 4);
    }

    /// Sets the flow label (low 20 bits of `value`).
    pub fn set_flow_label(&mut self, value: u32) {
        let b = self.buffer.as_mut();
        let w = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let w = (w & 0xFFF0_0000) | (value & 0x000F_FFFF);
        b[field::VER_TC_FLOW].copy_from_slice(&w.to_be_bytes());
    }

    /// Sets the payload length.
    pub fn set_payload_len(&mut self, value: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets the next header.
    pub fn set_next_header(&mut self, value: u8) {
        self.buffer.as_mut()[field::NXT_HDR] = value;
    }

    /// Sets the hop limit.
    pub fn set_hop_limit(&mut self, value: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = value;
    }

    /// Sets the source address.
    pub fn set_src(&mut self, addr: &Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    pub fn set_dst(&mut self, addr: &Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr.octets());
    }

    /// The payload (40 .. 40 + payload length), mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = HEADER_LEN + usize::from(self.payload_len());
        &mut self.buffer.as_mut()[HEADER_LEN..end]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        let mut p = Packet::new_unchecked(&mut b[..]);
        p.set_version(6);
        p.set_traffic_class(0xB8);
        p.set_flow_label(0xABCDE);
        p.set_payload_len(u16::try_from(payload.len()).unwrap());
        p.set_next_header(next);
        p.set_hop_limit(64);
        p.set_src(&"2001:db8::1".parse().unwrap());
        p.set_dst(&"2001:db8::2".parse().unwrap());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn deconstruct_literal() {
        let bytes: [u8; 44] = [
            0x6b, 0x8a, 0xbc, 0xde, 0x00, 0x04, 0x11, 0x40, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0x01, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02,
            1, 2, 3, 4,
        ];
        let p = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0xB8);
        assert_eq!(p.flow_label(), 0xABCDE);
        assert_eq!(p.payload_len(), 4);
        assert_eq!(p.next_header(), next_header::UDP);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src(), "2001:db8::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst(), "2001:db8::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        assert_eq!(header(17, &[1, 2, 3, 4]), bytes.to_vec());
        assert_eq!(
            p.upper_layer().unwrap(),
            UpperLayer {
                protocol: 17,
                offset: 40,
                fragment: None
            }
        );
    }

    #[test]
    fn check_len_errors() {
        let b = header(17, &[1, 2, 3, 4]);
        assert_eq!(
            Packet::new_checked(&b[..39]).unwrap_err(),
            Reason::Ipv6Truncated
        );
        let mut v4 = b.clone();
        v4[0] = 0x4b;
        assert_eq!(
            Packet::new_checked(&v4[..]).unwrap_err(),
            Reason::Ipv6BadVersion
        );
        assert_eq!(
            Packet::new_checked(&b[..43]).unwrap_err(),
            Reason::Ipv6BadPayloadLen
        );
        let mut trailing = b.clone();
        trailing.extend_from_slice(&[0; 6]);
        assert_eq!(
            Packet::new_checked(&trailing[..]).unwrap().payload(),
            &[1, 2, 3, 4]
        );
    }

    #[test]
    fn walks_extension_headers() {
        // Hop-by-Hop (8) -> Destination Options (16) -> AH (len 4 -> 24 bytes) -> Routing (8) -> TCP.
        let mut ext = vec![60, 0, 0, 0, 0, 0, 0, 0];
        ext.extend_from_slice(&[51, 1]);
        ext.extend_from_slice(&[0; 14]);
        ext.extend_from_slice(&[43, 4]);
        ext.extend_from_slice(&[0; 22]);
        ext.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 0]);
        ext.extend_from_slice(&[0; 20]);
        let b = header(0, &ext);
        let p = Packet::new_checked(&b[..]).unwrap();
        assert_eq!(
            p.upper_layer().unwrap(),
            UpperLayer {
                protocol: 6,
                offset: 40 + 8 + 16 + 24 + 8,
                fragment: None
            }
        );
    }

    #[test]
    fn fragments() {
        // First fragment: fragment header then UDP.
        let mut ext = vec![17, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef];
        ext.extend_from_slice(&[0; 8]);
        let b = header(44, &ext);
        let ul = Packet::new_checked(&b[..]).unwrap().upper_layer().unwrap();
        let frag = FragmentHeader {
            offset: 0,
            more: true,
            ident: 0xdeadbeef,
            header_offset: 40,
        };
        assert_eq!(
            ul,
            UpperLayer {
                protocol: 17,
                offset: 48,
                fragment: Some(frag)
            }
        );
        // Non-first fragment: stops after the fragment header even if the next header looks like an extension.
        let mut ext = vec![60, 0, 0x05, 0xc8, 0, 0, 0, 7];
        ext.extend_from_slice(&[0xFF; 8]);
        let b = header(44, &ext);
        let ul = Packet::new_checked(&b[..]).unwrap().upper_layer().unwrap();
        let frag = FragmentHeader {
            offset: 1480,
            more: false,
            ident: 7,
            header_offset: 40,
        };
        assert_eq!(
            ul,
            UpperLayer {
                protocol: 60,
                offset: 48,
                fragment: Some(frag)
            }
        );
    }

    #[test]
    fn extension_header_errors() {
        // Runs past the payload.
        let b = header(60, &[6, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap_err(),
            Reason::Ipv6BadExtensionHeader
        );
        // Not even the length byte.
        let b = header(43, &[6]);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap_err(),
            Reason::Ipv6BadExtensionHeader
        );
        // Truncated fragment header.
        let b = header(44, &[6, 0, 0, 0]);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap_err(),
            Reason::Ipv6BadExtensionHeader
        );
        // Bytes beyond payload_len do not count.
        let mut b = header(60, &[6, 0, 0, 0]);
        b.extend_from_slice(&[0; 4]);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap_err(),
            Reason::Ipv6BadExtensionHeader
        );
        // Hop-by-Hop after the first position.
        let b = header(60, &[0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap_err(),
            Reason::Ipv6BadExtensionHeader
        );
        // Two fragment headers.
        let b = header(44, &[44, 0, 0, 1, 0, 0, 0, 1, 6, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap_err(),
            Reason::Ipv6BadExtensionHeader
        );
        // Eight Destination Options headers are fine, nine are too many.
        let mut ext = Vec::new();
        for _ in 0..8 {
            ext.extend_from_slice(&[60, 0, 0, 0, 0, 0, 0, 0]);
        }
        let n = ext.len();
        ext[n - 8] = 59;
        let b = header(60, &ext);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap()
                .protocol,
            59
        );
        ext[n - 8] = 60;
        ext.extend_from_slice(&[59, 0, 0, 0, 0, 0, 0, 0]);
        let b = header(60, &ext);
        assert_eq!(
            Packet::new_checked(&b[..])
                .unwrap()
                .upper_layer()
                .unwrap_err(),
            Reason::Ipv6TooManyExtensionHeaders
        );
    }

    proptest! {
        #[test]
        fn getters_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..160), fix in any::<bool>(),
                               next in prop::sample::select(vec![0u8, 43, 44, 51, 60, 6])) {
            if fix && data.len() >= 40 {
                data[0] = 0x60 | (data[0] & 0x0F);
                let l = u16::try_from(data.len() - 40).unwrap();
                data[4..6].copy_from_slice(&l.to_be_bytes());
                data[6] = next;
            }
            if let Ok(p) = Packet::new_checked(&data[..]) {
                let _ = (p.version(), p.traffic_class(), p.flow_label(), p.payload_len(), p.next_header(),
                    p.hop_limit(), p.src(), p.dst(), p.payload().len());
                if let Ok(ul) = p.upper_layer() {
                    prop_assert!(ul.offset <= 40 + usize::from(p.payload_len()));
                }
            }
        }
    }
}
