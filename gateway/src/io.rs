//! The gateway's I/O backends: the tunnel's UDP socket and the uplinks' packet sockets, with batched system
//! calls over preallocated buffers, and the repairs that offloads ask for on receive.
//!
//! Drops that happen here, before or after the pipeline, are counted by [`IoDrop`]; the pipeline counts its
//! own by `forwarder_core::Reason`. Both appear in `egress_gateway_drops_total` and in
//! `docs/drop-reasons.md`.

pub(crate) mod mmsg;
pub(crate) mod packet;
pub(crate) mod steer;
pub(crate) mod tunnel;

macro_rules! io_drops {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// A packet dropped by the I/O layer.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum IoDrop {
            $($(#[doc = $doc])* $variant,)*
        }

        impl IoDrop {
            /// Every reason, in index order.
            pub(crate) const ALL: &'static [IoDrop] = &[$(IoDrop::$variant,)*];
            /// How many reasons there are.
            pub(crate) const COUNT: usize = IoDrop::ALL.len();

            /// The metric label.
            pub(crate) fn name(self) -> &'static str {
                match self {
                    $(IoDrop::$variant => $name,)*
                }
            }

            /// Index into a per-reason counter array.
            pub(crate) fn index(self) -> usize {
                self as usize
            }
        }
    };
}

io_drops! {
    /// A datagram or frame larger than the receive buffer (tunnel MTU, or 64 KiB on an uplink).
    Truncated => "io_truncated",
    /// A frame on an uplink addressed to another host's MAC (the link is shared or promiscuous).
    OtherHost => "io_other_host",
    /// The virtio-net header's checksum offsets point outside the frame.
    BadChecksumOffsets => "io_bad_checksum_offsets",
    /// A GSO super-packet of a kind we do not segment (UFO, tunnels, IPv6 extension headers).
    UnsupportedGso => "io_unsupported_gso",
    /// A GSO super-packet whose headers are inconsistent.
    MalformedGso => "io_malformed_gso",
    /// A GSO super-packet with more segments than a worker can hold.
    TooManySegments => "io_too_many_segments",
    /// The next hop did not answer ARP/NDP in time.
    NeighbourUnresolved => "neighbour_unresolved",
    /// Too many packets were waiting for neighbour resolution; the oldest was dropped.
    NeighbourQueueFull => "neighbour_queue_full",
    /// The kernel refused a frame on an uplink (`sendmmsg` error).
    UplinkSendFailed => "uplink_send_failed",
    /// The kernel refused a datagram to a node (`sendmmsg` error).
    TunnelSendFailed => "tunnel_send_failed",
    /// The kernel dropped a tunnel datagram at the gateway's socket before a worker read it: the receive
    /// queue was full (more offered than the workers carry).
    TunnelQueueFull => "tunnel_queue_full",
    /// The kernel dropped an uplink frame at a worker's packet socket before it was read: the receive
    /// queue was full.
    UplinkQueueFull => "uplink_queue_full",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_indices_dense() {
        for (i, r) in IoDrop::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            for s in &IoDrop::ALL[i + 1..] {
                assert_ne!(r.name(), s.name());
            }
            assert!(
                forwarder_core::Reason::ALL
                    .iter()
                    .all(|c| c.name() != r.name()),
                "{} clashes with a pipeline reason",
                r.name()
            );
        }
    }

    #[test]
    fn every_io_drop_is_documented() {
        let doc = include_str!("../../docs/drop-reasons.md");
        for r in IoDrop::ALL {
            assert!(
                doc.contains(&format!("`{}`", r.name())),
                "docs/drop-reasons.md does not describe `{}`",
                r.name()
            );
        }
    }
}
