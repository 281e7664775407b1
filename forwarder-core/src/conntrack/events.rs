//! Flow events for the NAT translation log: a bounded lock-free queue that the table pushes a record to
//! when a flow starts (its insert is published) and when it ends (the sweep removes it). The data path
//! never waits: when the queue is full the record is dropped and counted. A consumer outside the core
//! (the gateway's log writer) pops them.

use core::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;

use super::{Flow, FlowCounters, TcpState};
use crate::flow::{Proto, UplinkId};
use crate::time::Instant;

/// Which moment of a flow's life a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEventKind {
    /// The flow was created (its first packet).
    Start,
    /// The flow was removed (idle past its timeout, or closed and past the transitory timeout).
    End,
}

/// One record of the translation log: who (pod), as whom (egress IP and port), to where, and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEvent {
    /// Start or end.
    pub kind: FlowEventKind,
    /// Protocol.
    pub proto: Proto,
    /// The pod's address and port (ICMP: identifier).
    pub pod: (IpAddr, u16),
    /// The address and port the outside saw (ICMP: identifier).
    pub egress: (IpAddr, u16),
    /// The destination's address and port.
    pub dst: (IpAddr, u16),
    /// The client node's underlay address.
    pub node: IpAddr,
    /// The uplink the flow left on.
    pub uplink: UplinkId,
    /// When the flow was created (64 ms granularity).
    pub created: Instant,
    /// Its last packet (for `End`: when it really ended; 64 ms granularity).
    pub last_seen: Instant,
    /// When the record was made.
    pub at: Instant,
    /// Packets and bytes each way (zero at `Start`, apart from the first packet when counted already).
    pub counters: FlowCounters,
    /// TCP state (TCP only).
    pub tcp_state: Option<TcpState>,
}

impl FlowEvent {
    /// The record of `flow` now.
    pub fn of(flow: &Flow, kind: FlowEventKind, at: Instant) -> FlowEvent {
        let orig = flow.orig();
        let proto = flow.proto();
        FlowEvent {
            kind,
            proto,
            pod: (orig.src, orig.src_port),
            egress: (flow.egress_ip(), flow.external_port()),
            dst: (orig.dst, orig.dst_port),
            node: IpAddr::V4(flow.node().ip),
            uplink: flow.uplink(),
            created: flow.created(),
            last_seen: flow.last_seen(),
            at,
            counters: flow.counters(),
            tcp_state: (proto == Proto::Tcp).then(|| flow.tcp_state()),
        }
    }
}

/// The bounded queue of flow events, shared by the table (producer, every worker) and one consumer.
#[derive(Debug)]
pub struct FlowEvents {
    queue: ArrayQueue<FlowEvent>,
    dropped: AtomicU64,
    pushed: AtomicU64,
}

impl FlowEvents {
    /// A queue holding at most `capacity` records (at least 1).
    pub fn new(capacity: usize) -> FlowEvents {
        FlowEvents {
            queue: ArrayQueue::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
        }
    }

    /// Adds a record, or drops and counts it when the queue is full. Never blocks.
    pub fn push(&self, event: FlowEvent) {
        if self.queue.push(event).is_ok() {
            self.pushed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The oldest record, if any.
    pub fn pop(&self) -> Option<FlowEvent> {
        self.queue.pop()
    }

    /// Records queued so far.
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Most records the queue holds.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when no record waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
