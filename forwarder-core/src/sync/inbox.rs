//! Applying a peer's datagram: its flows go into the table that holds that peer's passive copies, its
//! control records go back to the caller.
//!
//! A datagram reaches [`apply`] only after the caller checked its source and MAC. Its header is judged by the
//! peer's [`PeerStream`] first (stale and old-epoch datagrams change nothing). Then each record, on its own:
//!
//! * a flow is installed ([`Table::install`]) when the sender says it owns it (`owner` = the sender's
//!   ordinal) and the caller's `accept` agrees (e.g. the pod address is in the cluster's pod CIDRs, the node
//!   is a node). The copy table's pools hold only the peer's egress IPs, so a flow translated to any other
//!   address is refused by the table itself (`NoPool`): a peer can only ever speak for its own egress IPs —
//!   a forged flow would otherwise open an inbound path to a pod (the warning of OpenBSD's pfsync(4));
//! * a delete removes the copy;
//! * the first datagram of a new incarnation of the peer (a new epoch: it restarted) removes every copy of
//!   the previous one — its flows died with it;
//! * NACK and bulk records addressed to this replica, and heartbeats, are handed back in [`Applied`];
//!   those addressed to another peer of the set are skipped.

use core::net::IpAddr;

use super::peer::{PeerStream, Verdict};
use super::wire::{Datagram, FlowRecord, Hello, Record};
use crate::conntrack::{Guard, Table};
use crate::flow::UplinkId;
use crate::time::Instant;

/// What one datagram did, and what the caller has to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The stream's verdict on the datagram.
    pub verdict: Verdict,
    /// Flow records installed or updated.
    pub installed: u32,
    /// Flows removed by delete records.
    pub removed: u32,
    /// Records refused: not decodable, not the sender's, refused by `accept` or by the table.
    pub refused: u32,
    /// The peer missed these of *our* datagrams: answer with [`Outbox::nack`](super::outbox::Outbox::nack).
    pub nacks: Vec<(u32, u32)>,
    /// The peer queued again what these of *its* datagrams carried: stop asking for them.
    pub repaired: Vec<(u32, u32)>,
    /// The peer asks for a bulk transfer with this id.
    pub bulk_request: Option<u32>,
    /// A bulk transfer to us started: (id, flows announced).
    pub bulk_start: Option<(u32, u32)>,
    /// A bulk transfer to us ended: (id, flows sent).
    pub bulk_end: Option<(u32, u32)>,
    /// The peer's heartbeat.
    pub hello: Option<Hello>,
}

/// Applies datagram `dg` from the peer of ordinal `sender` (already authenticated) to `copies`, the table of
/// that peer's flows, at the replica of ordinal `me`. `uplink` gives the local uplink of an egress IP (refused when `None`); `accept` vets
/// each flow record before it is installed.
#[allow(clippy::too_many_arguments)] // the peer's context, each a separate concern of the caller
pub fn apply<T: AsRef<[u8]>>(
    dg: &Datagram<T>,
    me: u16,
    sender: u16,
    stream: &mut PeerStream,
    copies: &Table,
    uplink: impl Fn(IpAddr) -> Option<UplinkId>,
    accept: impl Fn(&FlowRecord) -> bool,
    now: Instant,
    guard: &Guard,
) -> Applied {
    let verdict = stream.accept(&dg.header(), now);
    let mut out = Applied {
        verdict,
        installed: 0,
        removed: 0,
        refused: 0,
        nacks: Vec::new(),
        repaired: Vec::new(),
        bulk_request: None,
        bulk_start: None,
        bulk_end: None,
        hello: None,
    };
    if matches!(verdict, Verdict::Stale | Verdict::OldEpoch) {
        return out;
    }
    if verdict == Verdict::NewEpoch {
        // A new incarnation of the peer: what its previous one had is gone with it, and a copy of it must
        // not keep a connection alive that no replica can carry on (its pod gets a reset instead).
        out.removed += forget(copies, now, guard);
    }
    for rec in dg.records() {
        match rec {
            Ok(Record::Flow(f)) => {
                let ok = f.owner == sender
                    && accept(&f)
                    && uplink(f.id.egress)
                        .is_some_and(|u| copies.install(&f.to_image(u), now, guard).is_ok());
                if ok {
                    out.installed += 1;
                } else {
                    out.refused += 1;
                }
            }
            Ok(Record::Delete(id, _)) => {
                if copies.remove(&id.reply_key(), now, guard) {
                    out.removed += 1;
                }
            }
            // records for another peer of the set are not ours to answer
            Ok(Record::Nack { peer, from, to }) if peer == me => out.nacks.push((from, to)),
            Ok(Record::Repaired { peer, from, to }) if peer == me => out.repaired.push((from, to)),
            Ok(Record::BulkRequest { peer, id }) if peer == me => out.bulk_request = Some(id),
            Ok(Record::BulkStart { peer, id, count }) if peer == me => {
                out.bulk_start = Some((id, count));
            }
            Ok(Record::BulkEnd { peer, id, count }) if peer == me => {
                out.bulk_end = Some((id, count));
            }
            Ok(Record::Nack { .. } | Record::Repaired { .. } | Record::BulkRequest { .. })
            | Ok(Record::BulkStart { .. } | Record::BulkEnd { .. }) => {}
            Ok(Record::Hello(h)) => out.hello = Some(h),
            Err(_) => out.refused += 1,
        }
    }
    out
}

/// Removes every copy in `copies`; returns how many.
fn forget(copies: &Table, now: Instant, guard: &Guard) -> u32 {
    let mut keys = Vec::new();
    copies.for_each(guard, |f| keys.push(f.reply_key()));
    let mut n = 0;
    for k in &keys {
        if copies.remove(k, now, guard) {
            n += 1;
        }
    }
    n
}
