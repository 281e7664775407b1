//! Ethernet II frames (no 802.1Q tags: the gateway's links carry none).
//!
//! Once [`Frame::check_len`] has succeeded (`new_checked`), no getter panics, for any bytes.

use crate::reason::Reason;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// Length of an Ethernet II header.
pub const HEADER_LEN: usize = 14;

/// The broadcast MAC address.
pub const BROADCAST: MacAddr = [0xFF; 6];

/// EtherType values the gateway handles.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// IPv6.
    pub const IPV6: u16 = 0x86DD;
}

mod field {
    use core::ops::Range;
    pub(super) const DST: Range<usize> = 0..6;
    pub(super) const SRC: Range<usize> = 6..12;
    pub(super) const ETHERTYPE: Range<usize> = 12..14;
    pub(super) const PAYLOAD: usize = 14;
}

/// A view of an Ethernet II frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it.
    pub const fn new_unchecked(buffer: T) -> Self {
        Frame { buffer }
    }

    /// Wraps a buffer and checks it with [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Reason> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    /// `EthernetTruncated` if shorter than [`HEADER_LEN`].
    pub fn check_len(&self) -> Result<(), Reason> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            return Err(Reason::EthernetTruncated);
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination MAC address.
    pub fn dst(&self) -> MacAddr {
        mac(&self.buffer.as_ref()[field::DST])
    }

    /// Source MAC address.
    pub fn src(&self) -> MacAddr {
        mac(&self.buffer.as_ref()[field::SRC])
    }

    /// EtherType.
    pub fn ethertype(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::ETHERTYPE];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// The bytes after the header (including any trailing padding).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets the destination MAC address.
    pub fn set_dst(&mut self, addr: &MacAddr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(addr);
    }

    /// Sets the source MAC address.
    pub fn set_src(&mut self, addr: &MacAddr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(addr);
    }

    /// Sets the EtherType.
    pub fn set_ethertype(&mut self, value: u16) {
        self.buffer.as_mut()[field::ETHERTYPE].copy_from_slice(&value.to_be_bytes());
    }

    /// The bytes after the header, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// Copies a 6-byte slice into a [`MacAddr`] (the caller guarantees the length).
pub(crate) fn mac(b: &[u8]) -> MacAddr {
    let mut m = [0; 6];
    m.copy_from_slice(b);
    m
}

/// Writes an Ethernet II header into the first [`HEADER_LEN`] bytes of `out` and returns [`HEADER_LEN`].
///
/// # Panics
/// If `out` is shorter than [`HEADER_LEN`].
pub fn emit(dst: &MacAddr, src: &MacAddr, ethertype: u16, out: &mut [u8]) -> usize {
    let mut f = Frame::new_unchecked(&mut out[..HEADER_LEN]);
    f.set_dst(dst);
    f.set_src(src);
    f.set_ethertype(ethertype);
    HEADER_LEN
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FRAME: [u8; 18] = [
        0x02, 0x00, 0xac, 0x12, 0x00, 0x03, 0x02, 0x00, 0xac, 0x12, 0x00, 0x02, 0x08, 0x00, 0xaa,
        0xbb, 0xcc, 0xdd,
    ];

    #[test]
    fn deconstruct() {
        let f = Frame::new_checked(&FRAME[..]).unwrap();
        assert_eq!(f.dst(), [0x02, 0x00, 0xac, 0x12, 0x00, 0x03]);
        assert_eq!(f.src(), [0x02, 0x00, 0xac, 0x12, 0x00, 0x02]);
        assert_eq!(f.ethertype(), ethertype::IPV4);
        assert_eq!(f.payload(), &[0xaa, 0xbb, 0xcc, 0xdd]);
    }

    #[test]
    fn construct() {
        let mut buf = [0u8; 18];
        let mut f = Frame::new_unchecked(&mut buf[..]);
        f.set_dst(&[0x02, 0x00, 0xac, 0x12, 0x00, 0x03]);
        f.set_src(&[0x02, 0x00, 0xac, 0x12, 0x00, 0x02]);
        f.set_ethertype(ethertype::IPV4);
        f.payload_mut().copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(buf, FRAME);
        let mut buf2 = [0u8; 18];
        assert_eq!(
            emit(
                &[0x02, 0x00, 0xac, 0x12, 0x00, 0x03],
                &[0x02, 0x00, 0xac, 0x12, 0x00, 0x02],
                0x0800,
                &mut buf2
            ),
            14
        );
        assert_eq!(buf2[..14], FRAME[..14]);
    }

    #[test]
    fn truncated() {
        assert_eq!(
            Frame::new_checked(&FRAME[..13]).unwrap_err(),
            Reason::EthernetTruncated
        );
        assert_eq!(
            Frame::new_checked(&[][..]).unwrap_err(),
            Reason::EthernetTruncated
        );
        assert!(Frame::new_checked(&FRAME[..14])
            .unwrap()
            .payload()
            .is_empty());
    }

    proptest! {
        #[test]
        fn getters_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(f) = Frame::new_checked(&data[..]) {
                let _ = (f.dst(), f.src(), f.ethertype(), f.payload().len());
            }
        }
    }
}
