//! What ICMPv4 and ICMPv6 views share: the same 8-byte header layout (type, code, checksum, 4 bytes whose
//! meaning depends on the type) and the same accessors. [`icmp_common!`] writes them into each module's
//! `Packet`, which keeps its own field offsets (`mod field` with `TYPE`, `CODE`, `CHECKSUM`, `ECHO_IDENT`,
//! `ECHO_SEQNO`, `REST`) and its own checksum functions (ICMPv6's covers a pseudo-header).

/// Writes the shared constructors and accessors of an ICMP `Packet<T>` view in the invoking module.
macro_rules! icmp_common {
    () => {
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

            /// `IcmpTruncated` if shorter than [`HEADER_LEN`].
            pub fn check_len(&self) -> Result<(), Reason> {
                if self.buffer.as_ref().len() < HEADER_LEN {
                    return Err(Reason::IcmpTruncated);
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

            /// Message type (see [`msg_type`]).
            pub fn msg_type(&self) -> u8 {
                self.buffer.as_ref()[field::TYPE]
            }

            /// Message code.
            pub fn msg_code(&self) -> u8 {
                self.buffer.as_ref()[field::CODE]
            }

            /// Checksum.
            pub fn checksum(&self) -> u16 {
                self.u16_at(field::CHECKSUM)
            }

            /// Echo identifier (bytes 4..6).
            pub fn echo_ident(&self) -> u16 {
                self.u16_at(field::ECHO_IDENT)
            }

            /// Echo sequence number (bytes 6..8).
            pub fn echo_seq_no(&self) -> u16 {
                self.u16_at(field::ECHO_SEQNO)
            }

            /// Bytes 4..8, whatever they mean for this type.
            pub fn rest_of_header(&self) -> [u8; 4] {
                let b = &self.buffer.as_ref()[field::REST];
                [b[0], b[1], b[2], b[3]]
            }

            /// Everything after the 8-byte header (echo data, or the offending packet of an error).
            pub fn data(&self) -> &[u8] {
                &self.buffer.as_ref()[HEADER_LEN..]
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
            fn set_u16(&mut self, r: core::ops::Range<usize>, v: u16) {
                self.buffer.as_mut()[r].copy_from_slice(&v.to_be_bytes());
            }

            /// Sets the message type.
            pub fn set_msg_type(&mut self, value: u8) {
                self.buffer.as_mut()[field::TYPE] = value;
            }

            /// Sets the message code.
            pub fn set_msg_code(&mut self, value: u8) {
                self.buffer.as_mut()[field::CODE] = value;
            }

            /// Sets the checksum.
            pub fn set_checksum(&mut self, value: u16) {
                self.set_u16(field::CHECKSUM, value);
            }

            /// Sets the echo identifier.
            pub fn set_echo_ident(&mut self, value: u16) {
                self.set_u16(field::ECHO_IDENT, value);
            }

            /// Sets the echo sequence number.
            pub fn set_echo_seq_no(&mut self, value: u16) {
                self.set_u16(field::ECHO_SEQNO, value);
            }

            /// Sets bytes 4..8.
            pub fn set_rest_of_header(&mut self, value: [u8; 4]) {
                self.buffer.as_mut()[field::REST].copy_from_slice(&value);
            }

            /// Everything after the header, mutably.
            pub fn data_mut(&mut self) -> &mut [u8] {
                &mut self.buffer.as_mut()[HEADER_LEN..]
            }
        }
    };
}

pub(super) use icmp_common;
