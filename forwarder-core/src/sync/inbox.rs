//! Applying a peer's datagram: its flows go into the table that holds that peer's passive copies, the flows
//! it hands back go into this replica's own table, its control records go back to the caller.
//!
//! A datagram reaches [`apply`] only after the caller checked its source and MAC. Its header is judged by the
//! peer's [`PeerStream`] first (stale and old-epoch datagrams change nothing). Then each record, on its own:
//!
//! * a flow is installed ([`Table::install`]) when the sender says it owns it (`owner` = the sender's
//!   ordinal) and the caller's `accept` agrees (e.g. the pod address is in the cluster's pod CIDRs, the node
//!   is a node). The copy table's pools hold only the peer's egress IPs, so a flow translated to any other
//!   address is refused by the table itself (`NoPool`): a peer can only ever speak for its own egress IPs —
//!   a forged flow would otherwise open an inbound path to a pod (the warning of OpenBSD's pfsync(4));
//! * a flow of a bulk transfer whose owner is *this* replica is handed back: the sender held a copy of it
//!   while this replica was gone (restarted, or taken for dead), and this replica carries it on again with
//!   its address and port — installed into the own table, whose pools hold only this replica's egress IPs
//!   (the same guard as above). Pfsync's bulk update gives a rebooted firewall its states back the same way.
//!   A flow this replica already has is left as it is (its own state is newer); one it cannot take (the
//!   port went to a new flow meanwhile, the address is no longer its own) is reported in
//!   [`Applied::disowned`], so that the peers drop their copies of it instead of carrying a connection
//!   nobody answers for;
//! * a flow handed back to another replica of the set is skipped (every peer receives every datagram);
//! * a delete removes the copy;
//! * NACK and bulk records addressed to this replica, and heartbeats, are handed back in [`Applied`];
//!   those addressed to another peer of the set are skipped.
//!
//! A peer's new incarnation (a new epoch) does not clear its copies: its previous incarnation's flows are
//! handed back to it by the bulk transfer it asks for, and those it does not take back are deleted by it.

use core::net::IpAddr;

use super::peer::{PeerStream, Verdict};
use super::wire::{flow_flags, Datagram, FlowId, FlowRecord, Hello, Record};
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
    /// Flows of this replica handed back by the sender, installed into the own table.
    pub returned: u32,
    /// Flows of this replica handed back that it cannot take (counted in `refused` too): the peers are to
    /// forget them.
    pub disowned: Vec<FlowId>,
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

/// The tables a peer's flow records go into at this replica.
#[derive(Debug, Clone, Copy)]
pub struct Tables<'a> {
    /// The sender's passive copies.
    pub copies: &'a Table,
    /// This replica's own flows (what the sender hands back).
    pub own: &'a Table,
}

/// Applies datagram `dg` from the peer of ordinal `sender` (already authenticated) at the replica of ordinal
/// `me`: its flows to `tables.copies`, the flows it hands back to `tables.own`. `uplink(owner, ip)` gives the
/// local uplink of egress IP `ip` of replica `owner` (refused when `None`); `accept` vets each flow record
/// before it is installed.
#[allow(clippy::too_many_arguments)] // the peer's context, each a separate concern of the caller
pub fn apply<T: AsRef<[u8]>>(
    dg: &Datagram<T>,
    me: u16,
    sender: u16,
    stream: &mut PeerStream,
    tables: Tables<'_>,
    uplink: impl Fn(u16, IpAddr) -> Option<UplinkId>,
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
        returned: 0,
        disowned: Vec::new(),
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
    for rec in dg.records() {
        match rec {
            Ok(Record::Flow(f)) if f.owner == sender => {
                let ok = accept(&f)
                    && uplink(sender, f.id.egress)
                        .is_some_and(|u| tables.copies.install(&f.to_image(u), now, guard).is_ok());
                if ok {
                    out.installed += 1;
                } else {
                    out.refused += 1;
                }
            }
            Ok(Record::Flow(f)) if f.owner == me && f.flags & flow_flags::BULK != 0 => {
                match take_back(&f, me, tables.own, &uplink, &accept, now, guard) {
                    TakeBack::Installed => out.returned += 1,
                    TakeBack::Held => {}
                    TakeBack::Refused => {
                        out.refused += 1;
                        // unless the id is now a newer flow's of this replica, which the peers must keep
                        if tables
                            .own
                            .lookup_inbound_at(&f.id.reply_key(), now, guard)
                            .is_none()
                        {
                            out.disowned.push(f.id);
                        }
                    }
                }
            }
            // handed back to another replica of the set, or not a flow the sender may send
            Ok(Record::Flow(f)) => {
                if f.owner == sender || f.owner == me {
                    out.refused += 1;
                }
            }
            Ok(Record::Delete(id, _)) => {
                if tables.copies.remove(&id.reply_key(), now, guard) {
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

/// What became of a flow handed back to this replica.
enum TakeBack {
    /// Installed into the own table with its address and port.
    Installed,
    /// The own table has it already (this replica's state of it is the newer).
    Held,
    /// Not taken: refused by `accept`, no uplink for its address here, or its port is another flow's now.
    Refused,
}

/// Installs `f`, a flow of this replica (`me`) that a peer hands back, into `own`.
fn take_back(
    f: &FlowRecord,
    me: u16,
    own: &Table,
    uplink: &impl Fn(u16, IpAddr) -> Option<UplinkId>,
    accept: &impl Fn(&FlowRecord) -> bool,
    now: Instant,
    guard: &Guard,
) -> TakeBack {
    let Some(u) = uplink(me, f.id.egress).filter(|_| accept(f)) else {
        return TakeBack::Refused;
    };
    let image = f.to_image(u);
    // `install` over a flow with the same pod tuple would restore the older state over it
    if let Some(held) = own.lookup_outbound_at(&image.new.orig, now, guard) {
        return if held.external_port() == f.id.ext_port && held.egress_ip() == f.id.egress {
            TakeBack::Held
        } else {
            TakeBack::Refused
        };
    }
    match own.install(&image, now, guard) {
        Ok(_) => TakeBack::Installed,
        Err(_) => TakeBack::Refused,
    }
}
