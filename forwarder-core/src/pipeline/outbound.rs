//! Tunnel → uplink: a client node's VXLAN datagram becomes a translated frame for an uplink.

use core::net::{IpAddr, Ipv4Addr};

use super::{local, standby, Gateway, OutFrag, Step, Verdict, WorkerState, TUNNEL_ETH, TUNNEL_L3};
use crate::conntrack::{Flow, Guard, InsertError, NewFlow, Refresh, TcpSegment};
use crate::flow::{FlowKey, NodeAddr, Proto};
use crate::nat::frag::FragKey;
use crate::nat::icmp::{self, ErrorKind};
use crate::nat::meta::{parse_l4, PacketMeta, L4};
use crate::nat::reset;
use crate::nat::rewrite::{self, Side};
use crate::wire::{ethernet, tcp, vxlan};
use crate::{Instant, Reason};

const BROADCAST: ethernet::MacAddr = [0xff; 6];

/// True for addresses a gateway never forwards to or from: unspecified, loopback, multicast, broadcast,
/// link-local.
pub(super) fn is_martian(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v) => {
            v.is_unspecified()
                || v.is_loopback()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_link_local()
        }
        IpAddr::V6(v) => {
            v.is_unspecified()
                || v.is_loopback()
                || v.is_multicast()
                || (v.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// A datagram that passed every check and needs its flow looked up.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    meta: PacketMeta,
    l4: L4,
    /// The pod's original tuple.
    pub(super) key: FlowKey,
    tcp_seg: Option<TcpSegment>,
    node: NodeAddr,
    is_error: bool,
    /// IP length of the largest packet this one puts on the wire: its own, or for a super-packet that
    /// leaves with segmentation offloaded, its headers and one segment's payload.
    wire_len: usize,
}

/// One datagram, start to end, with a single flow lookup.
pub(super) fn process(
    gw: &Gateway,
    st: &mut WorkerState,
    from: Ipv4Addr,
    buf: &mut [u8],
    len: usize,
    now: Instant,
) -> Result<Verdict, Reason> {
    match prepare(gw, st, from, buf, len, now)? {
        Step::Done(v) => Ok(v),
        Step::Lookup(p) => lookup_and_complete(gw, st, buf, &p, now),
    }
}

/// The flow lookup of one datagram, then the rest of its way.
fn lookup_and_complete(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    p: &Pending,
    now: Instant,
) -> Result<Verdict, Reason> {
    let guard = gw.table.pin();
    let found = gw.table.lookup_outbound_at(&p.key, now, &guard);
    complete(gw, st, buf, p, found, &guard, now)
}

/// A TCP super-packet (the node's GSO, received whole) translated whole: as [`process`], except that the
/// uplink's MTU is checked against the segments of at most `gso_size` payload bytes it leaves as. A SYN
/// or RST is never segmented (the kernel's TCP never sends one larger than a segment), so it is checked
/// as it is.
pub(super) fn process_whole(
    gw: &Gateway,
    st: &mut WorkerState,
    from: Ipv4Addr,
    buf: &mut [u8],
    len: usize,
    gso_size: u16,
    now: Instant,
) -> Result<Verdict, Reason> {
    match prepare(gw, st, from, buf, len, now)? {
        Step::Done(v) => Ok(v),
        Step::Lookup(mut p) => {
            if let Some(seg) = p.tcp_seg {
                let payload = usize::try_from(seg.payload_len).unwrap_or(usize::MAX);
                if seg.flags & (tcp::flags::SYN | tcp::flags::RST) == 0 && payload <= p.wire_len {
                    p.wire_len = p.wire_len - payload + payload.min(usize::from(gso_size));
                }
            }
            lookup_and_complete(gw, st, buf, &p, now)
        }
    }
}

/// The first check of every tunnel datagram, before any other work is done on it: the sender is an allowed
/// node, and the VXLAN header is valid (I flag, RFC 7348 §5) and carries our VNI.
#[inline(always)]
pub(super) fn admit(gw: &Gateway, from: Ipv4Addr, dgram: &[u8]) -> Result<(), Reason> {
    if !gw.allowed_nodes.contains_v4(from) {
        return Err(Reason::VxlanSourceNotAllowed);
    }
    let vx = vxlan::Packet::new_checked(dgram)?;
    if vx.vni() != gw.config.vni {
        return Err(Reason::VxlanWrongVni);
    }
    Ok(())
}

/// Everything before the flow lookup: the tunnel and sender checks, the gateway's own answers, TTL, later
/// fragments, and the flow key.
#[inline(always)]
pub(super) fn prepare(
    gw: &Gateway,
    st: &mut WorkerState,
    from: Ipv4Addr,
    buf: &mut [u8],
    len: usize,
    now: Instant,
) -> Result<Step<Pending>, Reason> {
    let cfg = &gw.config;
    let dgram = buf.get(..len).ok_or(Reason::NoBufferRoom)?;
    admit(gw, from, dgram)?;
    let eth = ethernet::Frame::new_checked(&dgram[TUNNEL_ETH..])?;
    let (node_mac, dst_mac, ethertype) = (eth.src(), eth.dst(), eth.ethertype());
    if dst_mac != gw.mac && dst_mac != BROADCAST {
        return Err(Reason::NotForUs);
    }
    let v6 = match ethertype {
        ethernet::ethertype::IPV4 => false,
        ethernet::ethertype::IPV6 => true,
        ethernet::ethertype::ARP => {
            let end = local::answer_arp(gw, buf, len)?;
            st.stats.local_replies += 1;
            return Ok(Step::Done(Verdict::Tunnel {
                node: from,
                start: 0,
                end,
            }));
        }
        _ => return Err(Reason::UnsupportedEtherType),
    };
    if dst_mac != gw.mac {
        return Err(Reason::NotForUs);
    }
    let meta = PacketMeta::parse(&buf[..len], TUNNEL_L3, v6)?;
    if !gw.pod_cidrs.contains(meta.src) {
        return Err(Reason::InnerSourceNotAllowed);
    }
    if is_martian(meta.dst) {
        return Err(Reason::MartianAddress);
    }
    let l4 = parse_l4(buf, &meta)?;
    let reply_to_node = |end: usize| Verdict::Tunnel {
        node: from,
        start: 0,
        end,
    };

    // Addressed to the gateway itself: nodes ping it.
    if meta.dst == IpAddr::V4(cfg.tunnel_ip)
        || cfg.tunnel_ip6.is_some_and(|a| meta.dst == IpAddr::V6(a))
    {
        let end = local::answer_echo(gw, buf, &meta, &l4)?;
        st.stats.local_replies += 1;
        return Ok(Step::Done(reply_to_node(end)));
    }

    let is_error = l4.is_icmp_error(meta.v6);
    if meta.ttl <= 1 {
        let kind = ErrorKind::TimeExceeded;
        return originate_to_pod(gw, st, buf, &meta, is_error, kind, Reason::TtlExpired, now)
            .map(|end| Step::Done(reply_to_node(end)));
    }

    // Later fragments follow the first.
    if meta.is_later_fragment() {
        if is_tiny_tcp_fragment(&meta) {
            return Err(Reason::TinyFragment);
        }
        let key = frag_key(&meta);
        let Some(f) = st.frag_out.lookup(&key, now) else {
            return Err(Reason::FragmentNoFlow);
        };
        let mtu = cfg.uplinks.get(usize::from(f.uplink)).map_or(0, |u| u.mtu);
        if meta.ip_len() > usize::from(mtu) {
            return Err(Reason::TooBig);
        }
        rewrite::readdress_and_forward(buf, &meta, &l4, Side::Src, f.egress);
        return Ok(Step::Done(Verdict::Forward {
            uplink: f.uplink,
            next_hop: f.next_hop,
            start: TUNNEL_ETH,
            end: meta.end,
        }));
    }

    let (key, tcp_seg) = match l4 {
        L4::Tcp {
            src_port,
            dst_port,
            seg,
        } => (flow_key(&meta, Proto::Tcp, src_port, dst_port), Some(seg)),
        L4::Udp { src_port, dst_port } => (flow_key(&meta, Proto::Udp, src_port, dst_port), None),
        L4::IcmpQuery {
            ident,
            request: true,
        } => {
            let p = if meta.v6 { Proto::Icmpv6 } else { Proto::Icmp };
            (flow_key(&meta, p, ident, ident), None)
        }
        L4::IcmpQuery { request: false, .. } => return Err(Reason::NoFlow),
        L4::IcmpError { .. } => {
            return translate_error(gw, st, buf, &meta, from, now).map(Step::Done)
        }
        L4::IcmpOther { .. } => return Err(Reason::UnsupportedIcmpType),
        L4::Fragment => return Err(Reason::FragmentNoFlow),
    };

    Ok(Step::Lookup(Pending {
        meta,
        l4,
        key,
        tcp_seg,
        node: NodeAddr {
            ip: from,
            mac: node_mac,
        },
        is_error,
        wire_len: meta.ip_len(),
    }))
}

impl Pending {
    /// True when the packet, if it belongs to an existing flow, may change state a new flow's insert reads:
    /// a TCP SYN (reopening a finished flow takes a quota unit again), FIN or RST (finishing one gives its
    /// unit back and lets its port be taken over).
    pub(super) fn may_change_insert_state(&self) -> bool {
        self.tcp_seg
            .is_some_and(|s| s.flags & (tcp::flags::SYN | tcp::flags::FIN | tcp::flags::RST) != 0)
    }

    /// The served peer's copy this packet is translated through when the gateway's own table has no flow
    /// for it ([`standby::outbound_copy`]).
    #[inline]
    pub(super) fn copy<'g>(
        &self,
        gw: &'g Gateway,
        now: Instant,
        guard: &'g Guard,
    ) -> Option<&'g Flow> {
        standby::outbound_copy(gw.standby.as_deref(), &self.key, self.tcp_seg, now, guard)
    }
}

/// Why a packet that needs a new flow gets none, decided before any state changes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refusal {
    /// Dropped for this reason.
    Drop(Reason),
    /// A TCP segment answered with a reset to the pod (dropped for this reason when none may be sent).
    Reset(Reason),
    /// Answered with an ICMP error to the pod (dropped for `reason` when none may be sent).
    Icmp {
        kind: ErrorKind,
        reason: Reason,
        /// The refused packet is itself an ICMP error (never answered with one).
        is_error: bool,
    },
}

/// Everything after the flow lookup in the gateway's own table (`found`): on a miss, the served peers'
/// copies, then creation of a new flow; state, MTU, MSS, the rewrite.
#[inline(always)]
pub(super) fn complete(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    p: &Pending,
    found: Option<&Flow>,
    guard: &Guard,
    now: Instant,
) -> Result<Verdict, Reason> {
    let Some(flow) = found else {
        if let Some(copy) = p.copy(gw, now, guard) {
            let v = existing(gw, st, buf, p, copy, now);
            if matches!(v, Ok(Verdict::Forward { .. })) {
                st.stats.standby_out += 1;
            }
            return v;
        }
        let new = match plan_new(gw, buf, p) {
            Ok(new) => new,
            Err(r) => return refuse(gw, st, buf, p, r, now),
        };
        let created = gw.table.insert(new, now, &mut st.rng, guard);
        return complete_new(gw, st, buf, p, created, now);
    };
    existing(gw, st, buf, p, flow, now)
}

/// A packet of a flow that exists (here, or as a served peer's copy): the checks, then [`forward`].
#[inline(always)]
fn existing(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    p: &Pending,
    f: &Flow,
    now: Instant,
) -> Result<Verdict, Reason> {
    // A flow belongs to the node that opened it: another node sending the same pod source is spoofing.
    if f.node().ip != p.node.ip {
        return Err(Reason::FlowNodeMismatch);
    }
    let uplink = gw
        .config
        .uplinks
        .get(usize::from(f.uplink()))
        .ok_or(Reason::NoRoute)?;
    if let Some(r) = check_fits(gw, buf, p, uplink) {
        return refuse(gw, st, buf, p, r, now);
    }
    forward(gw, st, buf, p, f, now)
}

/// The checks of a packet that found no flow, up to its insert, which change no state (they may clamp the
/// MSS of the packet itself): the flow it would create, or why it gets none. The batch path plans the new
/// flows of a batch first and inserts them together.
#[inline(always)]
pub(super) fn plan_new(gw: &Gateway, buf: &mut [u8], p: &Pending) -> Result<NewFlow, Refusal> {
    if let Some(seg) = p.tcp_seg {
        if seg.flags & (tcp::flags::SYN | tcp::flags::ACK | tcp::flags::RST) != tcp::flags::SYN {
            let r = Reason::TcpNoSynForNewFlow;
            return Err(if gw.config.reset_unknown_tcp {
                Refusal::Reset(r)
            } else {
                Refusal::Drop(r)
            });
        }
    }
    if gw.is_draining() {
        return Err(Refusal::Drop(Reason::Draining));
    }
    let no_route = Refusal::Drop(Reason::NoRoute);
    let (_, &uplink) = gw.routes.lookup(p.meta.dst).ok_or(no_route)?;
    let up = gw.config.uplinks.get(usize::from(uplink)).ok_or(no_route)?;
    let egress_ip = up.egress_for(p.meta.src).ok_or(no_route)?;
    // Everything that can refuse the packet is checked before the flow exists.
    if let Some(r) = check_fits(gw, buf, p, up) {
        return Err(r);
    }
    Ok(NewFlow {
        orig: p.key,
        egress_ip,
        node: p.node,
        uplink,
    })
}

/// The rest of a packet whose new flow was inserted (`created`): refused inserts are answered with an ICMP
/// error, a created flow is counted and the packet translated.
#[inline(always)]
pub(super) fn complete_new(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    p: &Pending,
    created: Result<&Flow, InsertError>,
    now: Instant,
) -> Result<Verdict, Reason> {
    match created {
        Ok(f) => {
            st.stats.flows_created += 1;
            forward(gw, st, buf, p, f, now)
        }
        // Refused: tell the pod at once (ICMP administratively prohibited) instead of letting it retry into
        // the same wall.
        Err(e) => {
            let r = Refusal::Icmp {
                kind: ErrorKind::AdminProhibited,
                reason: e.reason(),
                is_error: false,
            };
            refuse(gw, st, buf, p, r, now)
        }
    }
}

/// Carries out a refusal: the drop, or the ICMP error back to the pod through the tunnel.
pub(super) fn refuse(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    p: &Pending,
    r: Refusal,
    now: Instant,
) -> Result<Verdict, Reason> {
    match r {
        Refusal::Drop(reason) => Err(reason),
        Refusal::Reset(reason) => {
            let seg = p.tcp_seg.ok_or(reason)?;
            let end = reset::originate(buf, &p.meta, p.key.src_port, p.key.dst_port, &seg)
                .ok_or(reason)?;
            if !st.allow_answer(now, reason) {
                return Err(reason);
            }
            st.stats.tcp_resets_sent += 1;
            local::turn_around(gw, buf);
            Ok(Verdict::Tunnel {
                node: p.node.ip,
                start: 0,
                end,
            })
        }
        Refusal::Icmp {
            kind,
            reason,
            is_error,
        } => originate_to_pod(gw, st, buf, &p.meta, is_error, kind, reason, now).map(|end| {
            Verdict::Tunnel {
                node: p.node.ip,
                start: 0,
                end,
            }
        }),
    }
}

/// The packet's flow is known: state, the rewrite, and where it goes.
#[inline(always)]
fn forward(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    p: &Pending,
    flow: &Flow,
    now: Instant,
) -> Result<Verdict, Reason> {
    let Pending {
        meta, l4, tcp_seg, ..
    } = *p;
    if flow.on_outbound(tcp_seg, meta.ip_len(), now) == Refresh::Ignored {
        return Err(Reason::TcpOutOfWindow);
    }
    let uplink_id = flow.uplink();
    let Some(uplink) = gw.config.uplinks.get(usize::from(uplink_id)) else {
        return Err(Reason::NoRoute);
    };
    let egress = flow.egress_ip();
    rewrite::translate_and_forward(buf, &meta, &l4, Side::Src, egress, flow.external_port());
    let next_hop = uplink.next_hop(meta.dst);
    if meta.is_first_fragment() {
        st.frag_out.insert(
            frag_key(&meta),
            OutFrag {
                egress,
                uplink: uplink_id,
                next_hop,
            },
            now,
        );
    }
    Ok(Verdict::Forward {
        uplink: uplink_id,
        next_hop,
        start: TUNNEL_ETH,
        end: meta.end,
    })
}

/// The checks that can refuse a packet once its uplink is known, done before any flow state changes: the
/// uplink's MTU (DF: too-big answered to the pod; else refused) and the SYN's MSS option, clamped here to
/// what the tunnel and the uplink carry. `None` when the packet may go on.
#[inline(always)]
fn check_fits(
    gw: &Gateway,
    buf: &mut [u8],
    p: &Pending,
    uplink: &super::UplinkConfig,
) -> Option<Refusal> {
    let meta = &p.meta;
    if p.wire_len > usize::from(uplink.mtu) {
        // IPv4 without DF would need fragmenting here; the tunnel MTU (1450) is below any normal uplink
        // MTU, so such packets do not arise from correctly configured nodes. Refused visibly.
        if !meta.dont_frag {
            return Some(Refusal::Drop(Reason::TooBig));
        }
        return Some(Refusal::Icmp {
            kind: ErrorKind::TooBig { mtu: uplink.mtu },
            reason: Reason::TooBig,
            is_error: p.is_error,
        });
    }
    if p.tcp_seg.is_some_and(|s| s.flags & tcp::flags::SYN != 0) {
        let mtu = gw.config.tunnel_mtu.min(uplink.mtu);
        if let Err(r) = rewrite::clamp_mss(buf, meta, rewrite::mss_for_mtu(mtu, meta.v6)) {
            return Some(Refusal::Drop(r));
        }
    }
    None
}

/// A TCP fragment at offset 8 could overwrite the TCP header's flags and ports (RFC 1858 §4).
pub(super) fn is_tiny_tcp_fragment(meta: &PacketMeta) -> bool {
    meta.proto == 6 && meta.frag.is_some_and(|f| f.offset == 8)
}

pub(super) fn flow_key(meta: &PacketMeta, proto: Proto, src_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        src: meta.src,
        dst: meta.dst,
        src_port,
        dst_port,
        proto,
    }
}

/// The datagram identity, taken *before* translation (later fragments arrive untranslated). IPv6 identifies
/// a datagram by addresses and identification alone (RFC 8200 §4.5): the next header seen after the
/// fragment header may differ between the first and later fragments.
pub(super) fn frag_key(meta: &PacketMeta) -> FragKey {
    FragKey {
        src: meta.src,
        dst: meta.dst,
        proto: if meta.v6 { 0 } else { meta.proto },
        ident: meta.frag.map_or(0, |f| f.ident),
    }
}

/// An ICMP error from a pod about a packet it received through a flow (e.g. port unreachable): the quoted
/// packet went outside → pod, so the flow is found by its reverse, and the pod's address in the quote and in
/// the outer source become the egress address. The flow may be a served peer's copy.
fn translate_error(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    meta: &PacketMeta,
    from: Ipv4Addr,
    now: Instant,
) -> Result<Verdict, Reason> {
    if !icmp::verify_checksum(buf, meta) {
        return Err(Reason::IcmpBadChecksum);
    }
    let emb = icmp::parse_embedded(buf, meta)?;
    // The error must come from the pod the quoted packet was delivered to, through that pod's node.
    if emb.key.dst != meta.src {
        return Err(Reason::IcmpErrorNotFromPeer);
    }
    let guard = gw.table.pin();
    let key = emb.key.reversed();
    let (flow, copy) = match gw.table.lookup_outbound_at(&key, now, &guard) {
        Some(f) => (f, false),
        None => {
            let standby = gw.standby.as_deref();
            let f = standby::outbound_copy(standby, &key, None, now, &guard);
            (f.ok_or(Reason::IcmpErrorNoFlow)?, true)
        }
    };
    if flow.node().ip != from {
        return Err(Reason::FlowNodeMismatch);
    }
    let uplink_id = flow.uplink();
    let uplink = gw
        .config
        .uplinks
        .get(usize::from(uplink_id))
        .ok_or(Reason::NoRoute)?;
    let egress = flow.egress_ip();
    icmp::translate_error(buf, meta, &emb, Side::Dst, egress, flow.external_port());
    rewrite::decrement_ttl(buf, meta);
    if copy {
        st.stats.standby_out += 1;
    }
    Ok(Verdict::Forward {
        uplink: uplink_id,
        next_hop: uplink.next_hop(meta.dst),
        start: TUNNEL_ETH,
        end: meta.end,
    })
}

/// Replaces the packet with an ICMP error to the pod (from the gateway's tunnel address), turned around in
/// the tunnel frame. Counts `reason` in every case; when no error may or can be sent, the packet is dropped
/// for `reason`.
#[allow(clippy::too_many_arguments)]
fn originate_to_pod(
    gw: &Gateway,
    st: &mut WorkerState,
    buf: &mut [u8],
    meta: &PacketMeta,
    is_error: bool,
    kind: ErrorKind,
    reason: Reason,
    now: Instant,
) -> Result<usize, Reason> {
    let src = if meta.v6 {
        gw.config.tunnel_ip6.map(IpAddr::V6)
    } else {
        Some(IpAddr::V4(gw.config.tunnel_ip))
    };
    let Some(src) = src.filter(|_| icmp::may_originate(meta, is_error)) else {
        return Err(reason);
    };
    // Build first (it can fail for lack of room), then ask the rate limit, which counts what it allows.
    let end = icmp::originate(buf, meta, src, kind).ok_or(reason)?;
    if !st.allow_icmp(now, reason) {
        return Err(reason);
    }
    local::turn_around(gw, buf);
    Ok(end)
}
