//! The state-sync datagram: bytes ↔ fields.
//!
//! One UDP datagram, big endian, never IP-fragmented (the sender fills it up to its configured size):
//!
//! ```text
//! header (40 bytes)
//! section*: type (1) | record length in 4-byte words (1) | record count (2) | count × record
//! MAC (16 bytes, when header flag MAC is set): computed by the caller over everything before it
//! ```
//!
//! Header:
//!
//! | offset | field | size | meaning |
//! |---|---|---|---|
//! | 0 | magic `0x4547` ("EG") | 2 | |
//! | 2 | version | 1 | [`VERSION`]; a datagram of another version is refused whole |
//! | 3 | flags | 1 | bit 0: a MAC trailer follows the payload |
//! | 4 | set id | 4 | names the gateway set: two sets on one network never mix their state |
//! | 8 | sender ordinal | 2 | the replica's ordinal in its set |
//! | 10 | key id | 1 | which shared key made the MAC (key rotation); 0 without MAC |
//! | 11 | reserved | 1 | sent as 0, ignored |
//! | 12 | sender epoch | 8 | random at process start: a restarted sender is a new epoch |
//! | 20 | sequence number | 4 | per sender and epoch, +1 per datagram, compared modulo 2³² |
//! | 24 | acknowledgement | 4 | the highest sequence number received in order from the addressee |
//! | 28 | acknowledged epoch | 4 | the low 32 bits of the addressee's epoch that `ack` refers to |
//! | 32 | sent at | 4 | the sender's monotonic clock in ms (round-trip times; ages in records are relative) |
//! | 36 | payload length | 2 | bytes of sections |
//! | 38 | section count | 2 | |
//!
//! Sections group records of one type, as pfsync does, so a datagram of 1,400 bytes carries 27 IPv4 flow
//! records with 40 + 4 bytes of overhead. A section states its record length, so a receiver skips a type
//! it does not know and reads only the fields it knows of a longer record of a known type: new fields go at
//! the end of a record, new record types get new type numbers, and the version changes only when an old
//! receiver could misread a datagram.
//!
//! Records (type, length in bytes):
//!
//! * 1 [`Hello`] (32): the sender's state, sent on its own as a heartbeat when nothing else was sent.
//! * 2 / 3 [`FlowRecord`] IPv4 (48) / IPv6 (84): a flow as the owner has it now (created, or its TCP state
//!   changed). Identity is the reply key [`FlowId`] (egress IP, external port, remote address and port,
//!   protocol): the owner never has two live flows on one external port toward one remote endpoint.
//! * 6 / 7 delete IPv4 (16) / IPv6 (40): a [`FlowId`] and why the flow ended.
//! * 10 NACK (12): the sender missed the addressee's sequence numbers `from..=to`; it asks again until:
//! * 11 repaired (12): what the sender's datagrams `from..=to` carried is queued again.
//! * 12 / 13 / 14 bulk request / start / end (12): a full resynchronisation of the addressee's (request)
//!   or the sender's (start, end) flows.
//!
//! A datagram goes to every peer alike (only the acknowledgement fields differ), so the records meant for
//! one peer — NACK and bulk — name it by ordinal; the others skip them.
//!
//! Parsing ([`Datagram::new_checked`]) checks every length before any field is read: once it succeeds no
//! getter panics, and each record is decoded on its own ([`Datagram::records`]) so that one bad record
//! (an unknown protocol number, a TCP state out of range) is reported as such. What a record *means* — is
//! this sender allowed to speak for this egress IP, is the pod address one of ours — is the receiver's
//! business, not the codec's.

#![forbid(unsafe_code)]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::Proto;

/// `"EG"`.
pub const MAGIC: u16 = 0x4547;
/// The version this code reads and writes.
pub const VERSION: u8 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Bytes of a section header.
pub const SECTION_HEADER_LEN: usize = 4;
/// Bytes of the MAC trailer (HMAC-SHA256 truncated to 128 bits, RFC 2104 §5).
pub const MAC_LEN: usize = 16;
/// Header flag: a [`MAC_LEN`]-byte MAC follows the payload.
pub const FLAG_MAC: u8 = 0x01;

mod field {
    use core::ops::Range;
    pub(super) const MAGIC: Range<usize> = 0..2;
    pub(super) const VERSION: usize = 2;
    pub(super) const FLAGS: usize = 3;
    pub(super) const SET_ID: Range<usize> = 4..8;
    pub(super) const ORDINAL: Range<usize> = 8..10;
    pub(super) const KEY_ID: usize = 10;
    pub(super) const EPOCH: Range<usize> = 12..20;
    pub(super) const SEQ: Range<usize> = 20..24;
    pub(super) const ACK: Range<usize> = 24..28;
    pub(super) const ACKED_EPOCH: Range<usize> = 28..32;
    pub(super) const SENT_MS: Range<usize> = 32..36;
    pub(super) const PAYLOAD_LEN: Range<usize> = 36..38;
    pub(super) const SECTIONS: Range<usize> = 38..40;
}

/// Record types (the section's type byte).
pub mod kind {
    /// [`super::Hello`].
    pub const HELLO: u8 = 1;
    /// [`super::FlowRecord`] of an IPv4 flow.
    pub const FLOW4: u8 = 2;
    /// [`super::FlowRecord`] of an IPv6 flow.
    pub const FLOW6: u8 = 3;
    /// [`super::Record::Delete`] of an IPv4 flow.
    pub const DELETE4: u8 = 6;
    /// [`super::Record::Delete`] of an IPv6 flow.
    pub const DELETE6: u8 = 7;
    /// [`super::Record::Nack`].
    pub const NACK: u8 = 10;
    /// [`super::Record::Repaired`].
    pub const REPAIRED: u8 = 11;
    /// [`super::Record::BulkRequest`].
    pub const BULK_REQUEST: u8 = 12;
    /// [`super::Record::BulkStart`].
    pub const BULK_START: u8 = 13;
    /// [`super::Record::BulkEnd`].
    pub const BULK_END: u8 = 14;
}

/// The bytes a record of a known type has at least (this version's length); `None` for a type this version
/// does not know (skipped).
pub const fn record_len(kind: u8) -> Option<usize> {
    match kind {
        kind::HELLO => Some(32),
        kind::FLOW4 => Some(48),
        kind::FLOW6 => Some(84),
        kind::DELETE4 => Some(16),
        kind::DELETE6 => Some(40),
        kind::NACK | kind::REPAIRED => Some(12),
        kind::BULK_REQUEST | kind::BULK_START | kind::BULK_END => Some(12),
        _ => None,
    }
}

/// Why a datagram or one of its records was refused. Each has a stable label for the drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Shorter than the header, or than the header's own lengths say.
    Truncated,
    /// Not a sync datagram (wrong magic).
    Magic,
    /// A version this code does not read.
    Version,
    /// The datagram is longer than header, payload and MAC.
    TrailingBytes,
    /// The sections do not tile the payload (a section runs past it, or the count is wrong).
    Sections,
    /// A section of a known type with records shorter than that type's.
    RecordLength,
    /// A flow record's protocol is not one the gateway translates, or not of the record's family.
    Protocol,
    /// A flow record's TCP state code is out of range.
    TcpState,
    /// A field with a fixed set of values holds another (peer state, delete reason).
    Value,
    /// A record does not fit the buffer being written.
    Full,
}

impl Error {
    /// The label of the drop counter.
    pub const fn label(self) -> &'static str {
        match self {
            Error::Truncated => "truncated",
            Error::Magic => "bad_magic",
            Error::Version => "bad_version",
            Error::TrailingBytes => "trailing_bytes",
            Error::Sections => "bad_sections",
            Error::RecordLength => "bad_record_length",
            Error::Protocol => "bad_protocol",
            Error::TcpState => "bad_tcp_state",
            Error::Value => "bad_value",
            Error::Full => "full",
        }
    }
}

/// The header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// The gateway set.
    pub set_id: u32,
    /// The sender's ordinal.
    pub ordinal: u16,
    /// Whether a MAC trailer follows the payload.
    pub mac: bool,
    /// The key that made the MAC.
    pub key_id: u8,
    /// The sender's epoch.
    pub epoch: u64,
    /// The datagram's sequence number.
    pub seq: u32,
    /// The highest sequence number received in order from the addressee.
    pub ack: u32,
    /// The low 32 bits of the addressee's epoch that `ack` refers to.
    pub acked_epoch: u32,
    /// The sender's monotonic clock, ms.
    pub sent_ms: u32,
}

/// What a replica is doing, as its heartbeat says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Started, not yet asked its peers for their flows.
    Starting,
    /// Receiving its peers' bulk transfers; not ready for traffic.
    Syncing,
    /// Serving.
    Ready,
    /// Handing its flows over before it stops.
    Draining,
}

impl PeerState {
    const fn code(self) -> u8 {
        match self {
            PeerState::Starting => 0,
            PeerState::Syncing => 1,
            PeerState::Ready => 2,
            PeerState::Draining => 3,
        }
    }

    const fn from_code(c: u8) -> Option<PeerState> {
        match c {
            0 => Some(PeerState::Starting),
            1 => Some(PeerState::Syncing),
            2 => Some(PeerState::Ready),
            3 => Some(PeerState::Draining),
            _ => None,
        }
    }
}

/// Heartbeat: the sender's state and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The sender's state.
    pub state: PeerState,
    /// Ordinals whose egress IPs the sender answers for (its own, and those of dead peers it adopted);
    /// bit `i` = ordinal `i`.
    pub served: u64,
    /// Flows in the sender's own table.
    pub flows: u32,
    /// Passive copies the sender holds for its peers.
    pub passive: u32,
    /// The sender's start, wall clock ms since the Unix epoch: orders two epochs of one ordinal.
    pub started_ms: u64,
    /// Feature bits the sender understands (none defined yet).
    pub features: u32,
}

/// The identity of a flow on the wire: its reply key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId {
    /// Protocol.
    pub proto: Proto,
    /// Egress IP the flow is translated to.
    pub egress: IpAddr,
    /// External port (ICMP: identifier).
    pub ext_port: u16,
    /// Remote address.
    pub remote: IpAddr,
    /// Remote port (ICMP: identifier).
    pub remote_port: u16,
}

/// Flow record flags.
pub mod flow_flags {
    /// Sent as part of a bulk transfer.
    pub const BULK: u8 = 0x01;
}

/// A flow as its owner has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRecord {
    /// The reply key.
    pub id: FlowId,
    /// The pod's address (same family as the egress IP).
    pub pod: IpAddr,
    /// The pod's port (ICMP: identifier).
    pub pod_port: u16,
    /// The client node's tunnel endpoint.
    pub node: Ipv4Addr,
    /// The client node's tunnel MAC.
    pub node_mac: [u8; 6],
    /// The ordinal of the replica that owns the flow's egress IP.
    pub owner: u16,
    /// [`flow_flags`].
    pub flags: u8,
    /// The TCP state code of the owner's table (0 for UDP and ICMP).
    pub tcp_state: u8,
    /// The TCP reference sequence number (the pod's ISN + 1, then its last acknowledgement number).
    pub tcp_ref: u32,
    /// The pod's last advertised TCP window, unscaled.
    pub tcp_window: u16,
    /// Milliseconds since the flow was created.
    pub age_ms: u32,
    /// Milliseconds since the flow last saw a packet.
    pub idle_ms: u32,
}

/// Highest TCP state code a record may carry (the table's).
pub const MAX_TCP_STATE: u8 = crate::conntrack::TcpTracking::MAX_STATE;

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// Idle past its timeout.
    Expired,
    /// Its port was taken over by a new connection, or it was replaced by a new flow on the same key.
    Replaced,
    /// Removed by the operator or at shutdown.
    Flushed,
}

impl DeleteReason {
    const fn code(self) -> u8 {
        match self {
            DeleteReason::Expired => 0,
            DeleteReason::Replaced => 1,
            DeleteReason::Flushed => 2,
        }
    }

    const fn from_code(c: u8) -> Option<DeleteReason> {
        match c {
            0 => Some(DeleteReason::Expired),
            1 => Some(DeleteReason::Replaced),
            2 => Some(DeleteReason::Flushed),
            _ => None,
        }
    }
}

/// One record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Heartbeat.
    Hello(Hello),
    /// A flow created or changed.
    Flow(FlowRecord),
    /// A flow ended.
    Delete(FlowId, DeleteReason),
    /// The sender missed the addressee's datagrams `from..=to` (inclusive, modulo 2³²).
    Nack {
        /// The addressee's ordinal.
        peer: u16,
        /// First missing sequence number.
        from: u32,
        /// Last missing sequence number.
        to: u32,
    },
    /// Answer to a NACK: what the sender's datagrams `from..=to` carried is queued again (sent as it is now,
    /// under new sequence numbers); the addressee stops asking for them.
    Repaired {
        /// The addressee's ordinal (the one that sent the NACK).
        peer: u16,
        /// First sequence number of the NACK.
        from: u32,
        /// Last sequence number of the NACK.
        to: u32,
    },
    /// The sender asks the addressee for all its flows.
    BulkRequest {
        /// The addressee's ordinal.
        peer: u16,
        /// Chosen by the requester; echoed in start and end.
        id: u32,
    },
    /// A bulk transfer of `count` flows to the requester `peer` begins (flows of the transfer carry
    /// [`flow_flags::BULK`]).
    BulkStart {
        /// The requester's ordinal.
        peer: u16,
        /// The request's id.
        id: u32,
        /// Flows in the sender's table when the transfer started.
        count: u32,
    },
    /// The bulk transfer to `peer` is complete.
    BulkEnd {
        /// The requester's ordinal.
        peer: u16,
        /// The request's id.
        id: u32,
        /// Flow records it carried.
        count: u32,
    },
}

impl Record {
    /// The section type this record is written in.
    pub fn kind(&self) -> u8 {
        match self {
            Record::Hello(_) => kind::HELLO,
            Record::Flow(f) if f.id.egress.is_ipv4() => kind::FLOW4,
            Record::Flow(_) => kind::FLOW6,
            Record::Delete(id, _) if id.egress.is_ipv4() => kind::DELETE4,
            Record::Delete(..) => kind::DELETE6,
            Record::Nack { .. } => kind::NACK,
            Record::Repaired { .. } => kind::REPAIRED,
            Record::BulkRequest { .. } => kind::BULK_REQUEST,
            Record::BulkStart { .. } => kind::BULK_START,
            Record::BulkEnd { .. } => kind::BULK_END,
        }
    }
}

// ---- byte helpers: callers have checked the lengths -------------------------------------------------------

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn v4(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn v6(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_ip(b: &mut [u8], at: usize, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => b[at..at + 4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b[at..at + 16].copy_from_slice(&a.octets()),
    }
}

/// The protocol number of a flow record, checked against its family.
fn proto_of(n: u8, ipv4: bool) -> Result<Proto, Error> {
    match (Proto::from_ip_number(n), ipv4) {
        (Some(Proto::Icmpv6), true) | (Some(Proto::Icmp), false) | (None, _) => {
            Err(Error::Protocol)
        }
        (Some(p), _) => Ok(p),
    }
}

// ---- the datagram view ----------------------------------------------------------------------------------

/// A checked view of a sync datagram.
#[derive(Debug, Clone)]
pub struct Datagram<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Datagram<T> {
    /// Checks `buf` as a whole datagram: magic, version, lengths, and that the sections tile the payload
    /// exactly with records at least as long as their known types. After this no getter panics.
    pub fn new_checked(buf: T) -> Result<Datagram<T>, Error> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if be16(b, field::MAGIC.start) != MAGIC {
            return Err(Error::Magic);
        }
        if b[field::VERSION] != VERSION {
            return Err(Error::Version);
        }
        let payload = usize::from(be16(b, field::PAYLOAD_LEN.start));
        let mac = if b[field::FLAGS] & FLAG_MAC != 0 {
            MAC_LEN
        } else {
            0
        };
        let total = HEADER_LEN + payload + mac;
        if b.len() < total {
            return Err(Error::Truncated);
        }
        if b.len() > total {
            return Err(Error::TrailingBytes);
        }
        let mut at = HEADER_LEN;
        let end = HEADER_LEN + payload;
        for _ in 0..be16(b, field::SECTIONS.start) {
            if end - at < SECTION_HEADER_LEN {
                return Err(Error::Sections);
            }
            let (kind, words, count) = (b[at], b[at + 1], be16(b, at + 2));
            let rec = usize::from(words) * 4;
            if record_len(kind).is_some_and(|min| rec < min) {
                return Err(Error::RecordLength);
            }
            let len = rec * usize::from(count);
            at += SECTION_HEADER_LEN;
            if end - at < len {
                return Err(Error::Sections);
            }
            at += len;
        }
        if at != end {
            return Err(Error::Sections);
        }
        Ok(Datagram { buf })
    }

    fn b(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// The header's fields.
    pub fn header(&self) -> Header {
        let b = self.b();
        Header {
            set_id: be32(b, field::SET_ID.start),
            ordinal: be16(b, field::ORDINAL.start),
            mac: b[field::FLAGS] & FLAG_MAC != 0,
            key_id: b[field::KEY_ID],
            epoch: be64(b, field::EPOCH.start),
            seq: be32(b, field::SEQ.start),
            ack: be32(b, field::ACK.start),
            acked_epoch: be32(b, field::ACKED_EPOCH.start),
            sent_ms: be32(b, field::SENT_MS.start),
        }
    }

    /// The bytes the MAC covers (header and payload).
    pub fn authenticated(&self) -> &[u8] {
        let b = self.b();
        &b[..HEADER_LEN + usize::from(be16(b, field::PAYLOAD_LEN.start))]
    }

    /// The MAC trailer, when the header says there is one.
    pub fn mac(&self) -> Option<&[u8]> {
        let b = self.b();
        (b[field::FLAGS] & FLAG_MAC != 0).then(|| &b[b.len() - MAC_LEN..])
    }

    /// The sections: (type, record length, records' bytes).
    pub fn sections(&self) -> Sections<'_> {
        let b = self.b();
        Sections {
            b,
            at: HEADER_LEN,
            left: be16(b, field::SECTIONS.start),
        }
    }

    /// Every record of a known type, decoded, in order; records of unknown types are skipped. A record
    /// that does not decode is returned as its error, and the others still are.
    pub fn records(&self) -> impl Iterator<Item = Result<Record, Error>> + '_ {
        self.sections().flat_map(|(kind, rec, bytes)| {
            let n = if record_len(kind).is_some() && rec > 0 {
                bytes.len() / rec
            } else {
                0
            };
            (0..n).map(move |i| decode(kind, &bytes[i * rec..(i + 1) * rec]))
        })
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Datagram<T> {
    /// Sets the acknowledgement fields (they differ per addressee; set them before computing the MAC).
    pub fn set_ack(&mut self, ack: u32, acked_epoch: u32) {
        let b = self.buf.as_mut();
        put32(b, field::ACK.start, ack);
        put32(b, field::ACKED_EPOCH.start, acked_epoch);
    }

    /// The MAC trailer to fill in, when the header says there is one.
    pub fn mac_mut(&mut self) -> Option<&mut [u8]> {
        let b = self.buf.as_mut();
        let n = b.len();
        (b[field::FLAGS] & FLAG_MAC != 0).then(|| &mut b[n - MAC_LEN..])
    }
}

/// Iterator over the sections of a checked datagram.
#[derive(Debug, Clone)]
pub struct Sections<'a> {
    b: &'a [u8],
    at: usize,
    left: u16,
}

impl<'a> Iterator for Sections<'a> {
    type Item = (u8, usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let b = self.b;
        let (kind, rec, count) = (
            b[self.at],
            usize::from(b[self.at + 1]) * 4,
            usize::from(be16(b, self.at + 2)),
        );
        let start = self.at + SECTION_HEADER_LEN;
        self.at = start + rec * count;
        Some((kind, rec, &b[start..self.at]))
    }
}

/// Decodes one record of known type `kind` from `r` (at least [`record_len`] bytes; extra bytes are fields
/// of a later version and are ignored).
fn decode(kind: u8, r: &[u8]) -> Result<Record, Error> {
    match kind {
        kind::HELLO => Ok(Record::Hello(Hello {
            state: PeerState::from_code(r[0]).ok_or(Error::Value)?,
            served: be64(r, 4),
            flows: be32(r, 12),
            passive: be32(r, 16),
            started_ms: be64(r, 20),
            features: be32(r, 28),
        })),
        kind::FLOW4 | kind::FLOW6 => decode_flow(r, kind == kind::FLOW4).map(Record::Flow),
        kind::DELETE4 | kind::DELETE6 => {
            let ipv4 = kind == kind::DELETE4;
            let id = decode_id(r, ipv4)?;
            let reason = DeleteReason::from_code(r[1]).ok_or(Error::Value)?;
            Ok(Record::Delete(id, reason))
        }
        kind::NACK => Ok(Record::Nack {
            from: be32(r, 0),
            to: be32(r, 4),
            peer: be16(r, 8),
        }),
        kind::REPAIRED => Ok(Record::Repaired {
            from: be32(r, 0),
            to: be32(r, 4),
            peer: be16(r, 8),
        }),
        kind::BULK_REQUEST => Ok(Record::BulkRequest {
            id: be32(r, 0),
            peer: be16(r, 4),
        }),
        kind::BULK_START => Ok(Record::BulkStart {
            id: be32(r, 0),
            count: be32(r, 4),
            peer: be16(r, 8),
        }),
        _ => Ok(Record::BulkEnd {
            id: be32(r, 0),
            count: be32(r, 4),
            peer: be16(r, 8),
        }),
    }
}

// Flow identity layout, shared by flow and delete records: proto (1) | kind-specific (3) | egress IP |
// external port (2) | remote port (2) | remote IP. IPv4: 16 bytes, IPv6: 40.
fn decode_id(r: &[u8], ipv4: bool) -> Result<FlowId, Error> {
    let proto = proto_of(r[0], ipv4)?;
    Ok(if ipv4 {
        FlowId {
            proto,
            egress: v4(r, 4).into(),
            ext_port: be16(r, 8),
            remote_port: be16(r, 10),
            remote: v4(r, 12).into(),
        }
    } else {
        FlowId {
            proto,
            egress: v6(r, 4).into(),
            ext_port: be16(r, 20),
            remote_port: be16(r, 22),
            remote: v6(r, 24).into(),
        }
    })
}

fn encode_id(r: &mut [u8], id: &FlowId) {
    r[0] = id.proto.ip_number();
    put_ip(r, 4, id.egress);
    let a = if id.egress.is_ipv4() { 8 } else { 20 };
    put16(r, a, id.ext_port);
    put16(r, a + 2, id.remote_port);
    put_ip(r, a + 4, id.remote);
}

// Flow record after the identity (offsets for IPv4 / IPv6): pod IP (16 / 40) | pod port (20 / 56) |
// TCP window (22 / 58) | node IPv4 (24 / 60) | node MAC (28 / 64) | owner (34 / 70) | TCP reference
// (36 / 72) | age ms (40 / 76) | idle ms (44 / 80). Byte 1 is the TCP state, byte 2 the flags.
const fn flow_tail(ipv4: bool) -> usize {
    if ipv4 {
        16
    } else {
        40
    }
}

fn decode_flow(r: &[u8], ipv4: bool) -> Result<FlowRecord, Error> {
    let id = decode_id(r, ipv4)?;
    let tcp_state = r[1];
    if tcp_state > MAX_TCP_STATE || (tcp_state != 0 && id.proto != Proto::Tcp) {
        return Err(Error::TcpState);
    }
    let t = flow_tail(ipv4);
    let (pod, p) = if ipv4 {
        (IpAddr::from(v4(r, t)), t + 4)
    } else {
        (IpAddr::from(v6(r, t)), t + 16)
    };
    let mut node_mac = [0u8; 6];
    node_mac.copy_from_slice(&r[p + 8..p + 14]);
    Ok(FlowRecord {
        id,
        pod,
        pod_port: be16(r, p),
        tcp_window: be16(r, p + 2),
        node: v4(r, p + 4),
        node_mac,
        owner: be16(r, p + 14),
        flags: r[2],
        tcp_state,
        tcp_ref: be32(r, p + 16),
        age_ms: be32(r, p + 20),
        idle_ms: be32(r, p + 24),
    })
}

/// Writes record `rec` into `r` (exactly [`record_len`] of its kind, zeroed).
fn encode(rec: &Record, r: &mut [u8]) {
    match rec {
        Record::Hello(h) => {
            r[0] = h.state.code();
            put64(r, 4, h.served);
            put32(r, 12, h.flows);
            put32(r, 16, h.passive);
            put64(r, 20, h.started_ms);
            put32(r, 28, h.features);
        }
        Record::Flow(f) => {
            encode_id(r, &f.id);
            r[1] = f.tcp_state;
            r[2] = f.flags;
            let t = flow_tail(f.id.egress.is_ipv4());
            put_ip(r, t, f.pod);
            let p = t + if f.pod.is_ipv4() { 4 } else { 16 };
            put16(r, p, f.pod_port);
            put16(r, p + 2, f.tcp_window);
            r[p + 4..p + 8].copy_from_slice(&f.node.octets());
            r[p + 8..p + 14].copy_from_slice(&f.node_mac);
            put16(r, p + 14, f.owner);
            put32(r, p + 16, f.tcp_ref);
            put32(r, p + 20, f.age_ms);
            put32(r, p + 24, f.idle_ms);
        }
        Record::Delete(id, reason) => {
            encode_id(r, id);
            r[1] = reason.code();
        }
        Record::Nack { peer, from, to } | Record::Repaired { peer, from, to } => {
            put32(r, 0, *from);
            put32(r, 4, *to);
            put16(r, 8, *peer);
        }
        Record::BulkRequest { peer, id } => {
            put32(r, 0, *id);
            put16(r, 4, *peer);
        }
        Record::BulkStart { peer, id, count } | Record::BulkEnd { peer, id, count } => {
            put32(r, 0, *id);
            put32(r, 4, *count);
            put16(r, 8, *peer);
        }
    }
}

/// True when every address of a flow or delete record is of its egress IP's family (the record layout has
/// one family).
fn families_agree(rec: &Record) -> bool {
    match rec {
        Record::Flow(f) => {
            f.id.egress.is_ipv4() == f.id.remote.is_ipv4()
                && f.id.egress.is_ipv4() == f.pod.is_ipv4()
        }
        Record::Delete(id, _) => id.egress.is_ipv4() == id.remote.is_ipv4(),
        _ => true,
    }
}

// ---- building -------------------------------------------------------------------------------------------

/// Builds one datagram in a caller's buffer: records are appended (consecutive records of one type share a
/// section) until the buffer is full; [`finish`](Writer::finish) writes the lengths and returns the
/// datagram's length. No allocation.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    /// End of the payload written so far.
    at: usize,
    /// Start of the open section, its type and its record count.
    open: Option<(usize, u8, u16)>,
    sections: u16,
    mac: bool,
}

impl<'a> Writer<'a> {
    /// Starts a datagram with `header` in `buf` (the whole of `buf` may be used, MAC trailer included).
    pub fn new(buf: &'a mut [u8], header: &Header) -> Result<Writer<'a>, Error> {
        let mac = if header.mac { MAC_LEN } else { 0 };
        if buf.len() < HEADER_LEN + mac {
            return Err(Error::Full);
        }
        let b = &mut buf[..HEADER_LEN];
        b.fill(0);
        put16(b, field::MAGIC.start, MAGIC);
        b[field::VERSION] = VERSION;
        b[field::FLAGS] = if header.mac { FLAG_MAC } else { 0 };
        put32(b, field::SET_ID.start, header.set_id);
        put16(b, field::ORDINAL.start, header.ordinal);
        b[field::KEY_ID] = header.key_id;
        put64(b, field::EPOCH.start, header.epoch);
        put32(b, field::SEQ.start, header.seq);
        put32(b, field::ACK.start, header.ack);
        put32(b, field::ACKED_EPOCH.start, header.acked_epoch);
        put32(b, field::SENT_MS.start, header.sent_ms);
        Ok(Writer {
            buf,
            at: HEADER_LEN,
            open: None,
            sections: 0,
            mac: header.mac,
        })
    }

    /// Appends `rec`. `Err(Full)` when it does not fit (the datagram is unchanged: send it and start
    /// another); `Err(Protocol)` for a flow or delete record whose addresses mix families or whose protocol
    /// does not belong to them, `Err(TcpState)` for a TCP state a receiver would refuse.
    pub fn push(&mut self, rec: &Record) -> Result<(), Error> {
        if !families_agree(rec) {
            return Err(Error::Protocol);
        }
        if let Record::Flow(FlowRecord { id, .. }) | Record::Delete(id, _) = rec {
            proto_of(id.proto.ip_number(), id.egress.is_ipv4())?;
        }
        if let Record::Flow(f) = rec {
            if f.tcp_state > MAX_TCP_STATE || (f.tcp_state != 0 && f.id.proto != Proto::Tcp) {
                return Err(Error::TcpState);
            }
        }
        let kind = rec.kind();
        let Some(len) = record_len(kind) else {
            return Err(Error::Value);
        };
        let (section, count) = match self.open {
            Some((start, k, n)) if k == kind && n < u16::MAX => (Some(start), n),
            _ => (None, 0),
        };
        let need = len
            + if section.is_none() {
                SECTION_HEADER_LEN
            } else {
                0
            };
        let room = self.buf.len() - if self.mac { MAC_LEN } else { 0 };
        let payload_after = self.at + need - HEADER_LEN;
        if room - self.at < need
            || payload_after > usize::from(u16::MAX)
            || (section.is_none() && self.sections == u16::MAX)
        {
            return Err(Error::Full);
        }
        let section = section.unwrap_or_else(|| {
            let start = self.at;
            self.buf[start] = kind;
            #[allow(clippy::cast_possible_truncation)] // record lengths are at most 84 bytes
            let words = (len / 4) as u8;
            self.buf[start + 1] = words;
            self.at += SECTION_HEADER_LEN;
            self.sections += 1;
            start
        });
        let r = &mut self.buf[self.at..self.at + len];
        r.fill(0);
        encode(rec, r);
        self.at += len;
        self.open = Some((section, kind, count + 1));
        put16(self.buf, section + 2, count + 1);
        Ok(())
    }

    /// True when no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.sections == 0
    }

    /// Writes the payload length and section count; returns the datagram's length (MAC trailer included,
    /// zeroed: fill it through [`Datagram::mac_mut`]).
    pub fn finish(self) -> usize {
        let payload = self.at - HEADER_LEN;
        #[allow(clippy::cast_possible_truncation)] // push keeps the payload within u16
        put16(self.buf, field::PAYLOAD_LEN.start, payload as u16);
        put16(self.buf, field::SECTIONS.start, self.sections);
        let end = self.at + if self.mac { MAC_LEN } else { 0 };
        self.buf[self.at..end].fill(0);
        end
    }
}

#[cfg(test)]
mod tests;
