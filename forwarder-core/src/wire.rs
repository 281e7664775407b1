//! The wire layer: bytes ↔ fields for every header the gateway reads or writes.
//!
//! Each header is a zero-copy *view* over a caller-owned buffer, in the style of smoltcp's `wire` module:
//! `Packet<T: AsRef<[u8]>>` (`Frame` for Ethernet) with
//!
//! * `new_unchecked(buffer)` — wrap without looking at the bytes;
//! * `new_checked(buffer)` — wrap and run `check_len`, which validates every length field the getters rely on and
//!   returns the [`Reason`](crate::reason::Reason) a malformed packet is dropped for;
//! * getters on `T: AsRef<[u8]>`, setters on `T: AsMut<[u8]>`, `payload()` / `payload_mut()`, `into_inner()`.
//!
//! **Panic freedom.** Once `check_len` has succeeded on a buffer, no getter of that view panics or indexes out
//! of bounds, whatever the bytes are (fuzzers and property tests check this). Getters on a view made with
//! `new_unchecked` over a buffer that would fail `check_len` may panic; setters may panic when the buffer is too
//! short for the field they write (that is a caller bug, not network input).
//!
//! The layer uses no `unsafe` code and never allocates. Checksums ([`checksum`]) come in two flavours: full
//! (RFC 1071) and incremental (RFC 1624), so that NAT can rewrite addresses and ports without touching the
//! payload.
//!
//! Modules: [`ethernet`], [`arp`], [`ipv4`], [`ipv6`] (with the extension-header walker), [`icmpv4`],
//! [`icmpv6`], [`udp`], [`tcp`] (with MSS clamping) and [`vxlan`] (with full IPv4 underlay encapsulation that
//! reproduces the Linux `vxlan` device byte for byte; see the fixtures in `forwarder-core/tests/fixtures`).

pub mod arp;
pub mod checksum;
pub mod ethernet;
mod icmp_common;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod vxlan;

#[cfg(test)]
mod differential;

/// Length of a buffer as the `u32` the checksum pseudo-headers take (saturating; buffers are < 4 GiB).
#[inline]
pub(crate) fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
