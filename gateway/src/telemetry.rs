//! Metrics (Prometheus, through the `metrics` facade) and logs.
//!
//! Workers keep plain counters and copy them to `Shared::reports` every 100 ms; a scrape turns the latest
//! copies into metric values ([`Telemetry::render`]), so the data path never touches the recorder. The
//! metric names and labels are listed in `docs/metrics.md`; a test keeps the two in sync.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use forwarder_core::Reason;
use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::io::IoDrop;
use crate::worker::Shared;

/// Every metric: name, kind (`counter`/`gauge`), help. `docs/metrics.md` describes each.
pub(crate) const METRICS: &[(&str, &str, &str)] = &[
    (
        "egress_gateway_packets_total",
        "counter",
        "Packets by direction (tunnel_rx, tunnel_tx, uplink_rx, uplink_tx), uplink and worker.",
    ),
    (
        "egress_gateway_bytes_total",
        "counter",
        "IP bytes by direction, uplink and worker.",
    ),
    (
        "egress_gateway_drops_total",
        "counter",
        "Packets dropped, by reason (see docs/drop-reasons.md) and worker.",
    ),
    (
        "egress_gateway_flows_created_total",
        "counter",
        "Flows (NAT mappings) created, by worker.",
    ),
    (
        "egress_gateway_icmp_errors_originated_total",
        "counter",
        "ICMP errors the gateway sent (time exceeded, fragmentation needed, prohibited).",
    ),
    (
        "egress_gateway_icmp_errors_suppressed_total",
        "counter",
        "ICMP errors and TCP resets not sent because of the rate limit.",
    ),
    (
        "egress_gateway_tcp_resets_sent_total",
        "counter",
        "TCP resets sent to pods for segments of connections with no state here (conntrack.reset_unknown_tcp).",
    ),
    (
        "egress_gateway_local_replies_total",
        "counter",
        "ARP and ping answers for the gateway's tunnel address.",
    ),
    (
        "egress_gateway_neighbour_frames_total",
        "counter",
        "ARP and NDP frames from the uplinks handed to the neighbour cache, by worker.",
    ),
    (
        "egress_gateway_packets_unaccounted",
        "gauge",
        "Received packets no outcome (forwarded, dropped, answered, neighbour frame) accounts for, all workers: 0 unless the accounting has a bug.",
    ),
    (
        "egress_gateway_gso_whole_total",
        "counter",
        "TCP super-packets from the tunnel translated whole and sent with segmentation offloaded.",
    ),
    (
        "egress_gateway_gso_segmented_total",
        "counter",
        "TCP super-packets cut into segments in software (from uplinks; from the tunnel when the uplink could not take one whole).",
    ),
    (
        "egress_gateway_checksums_completed_total",
        "counter",
        "Partial (offloaded) checksums completed in software.",
    ),
    (
        "egress_gateway_batches_total",
        "counter",
        "recvmmsg batches processed, by worker.",
    ),
    (
        "egress_gateway_wakeups_total",
        "counter",
        "Worker poll wake-ups, by worker.",
    ),
    (
        "egress_gateway_worker_panics_total",
        "counter",
        "Worker panics caught; the worker was restarted with its flows kept (each one is a bug: see the log).",
    ),
    (
        "egress_gateway_conntrack_entries",
        "gauge",
        "Flow-table entries in use.",
    ),
    (
        "egress_gateway_conntrack_capacity",
        "gauge",
        "Flow-table capacity (conntrack.max_entries).",
    ),
    (
        "egress_gateway_conntrack_refused_total",
        "counter",
        "New flows refused, by reason (full, source_quota, ports_exhausted, no_pool).",
    ),
    (
        "egress_gateway_port_takeovers_total",
        "counter",
        "New TCP connections that took over the port of a finished connection (pool exhausted; see docs/nat.md).",
    ),
    (
        "egress_gateway_ports_in_use",
        "gauge",
        "External ports in use, by egress IP and protocol.",
    ),
    (
        "egress_gateway_ports_capacity",
        "gauge",
        "External ports available per egress IP and protocol.",
    ),
    (
        "egress_gateway_neighbours",
        "gauge",
        "Uplink neighbour cache entries, by state (resolved, incomplete).",
    ),
    (
        "egress_gateway_neighbour_failures_total",
        "counter",
        "Neighbour resolutions that got no answer.",
    ),
    (
        "egress_gateway_neighbour_updates_total",
        "counter",
        "Received ARP/NDP claims and cache needs, by outcome (learnt, confirmed, unsolicited, cache_full, mac_change_*, ...).",
    ),
    (
        "egress_gateway_ready",
        "gauge",
        "1 when /readiness answers 200.",
    ),
    (
        "egress_gateway_draining",
        "gauge",
        "1 while draining after SIGTERM.",
    ),
    (
        "egress_gateway_config_reloads_total",
        "counter",
        "Configuration reloads, by result (applied, refused).",
    ),
    ("egress_gateway_workers", "gauge", "Worker threads."),
    (
        "egress_gateway_flow_log_records_total",
        "counter",
        "NAT translation log records, by result (queued, dropped, written, failed).",
    ),
    (
        "egress_gateway_tunnel_allowed_nodes",
        "gauge",
        "Node addresses admitted as tunnel sources, learnt from the cluster's Nodes (allowed_sources: kubernetes-nodes).",
    ),
    (
        "egress_gateway_health_probes_total",
        "counter",
        "UDP health probes from node agents, by result (answered, malformed).",
    ),
    (
        "egress_gateway_probe_up",
        "gauge",
        "1 while an outside probe target answers (probes section), by kind and target.",
    ),
    (
        "egress_gateway_probe_sent_total",
        "counter",
        "Probes sent to an outside target, by kind and target.",
    ),
    (
        "egress_gateway_probe_answered_total",
        "counter",
        "Probes answered (echo reply, SYN-ACK), by kind and target.",
    ),
    (
        "egress_gateway_probe_refused_total",
        "counter",
        "TCP probes refused (RST: host reachable, port closed), by kind and target.",
    ),
    (
        "egress_gateway_probe_rtt_seconds",
        "gauge",
        "Round-trip time of the last answered probe, by kind and target.",
    ),
    (
        "egress_gateway_sync_datagrams_total",
        "counter",
        "State sync datagrams, by direction (tx: one per peer; rx: every datagram that arrived, refused ones too).",
    ),
    (
        "egress_gateway_sync_bytes_total",
        "counter",
        "State sync UDP payload bytes, by direction.",
    ),
    (
        "egress_gateway_sync_refused_total",
        "counter",
        "State sync datagrams refused before anything in them was applied, by reason (unknown_source, bad_mac, other_set, wrong_sender, and the wire errors).",
    ),
    (
        "egress_gateway_sync_records_total",
        "counter",
        "State sync records, by kind and result: flows and deletes sent (sent), flows installed into copies, deletes applied (removed), records refused (refused), flows queued again for a peer's NACK (resent), flows of this replica a peer handed back and it carries on again (returned), flows handed back that it could not take and deleted at its peers (disowned).",
    ),
    (
        "egress_gateway_sync_events_dropped_total",
        "counter",
        "Flow events state sync could not queue (the refresh scan sends those flows later).",
    ),
    (
        "egress_gateway_sync_bulk_total",
        "counter",
        "Bulk transfers of every flow, by role (requested from peers, served to peers).",
    ),
    (
        "egress_gateway_sync_peer_phase",
        "gauge",
        "1 for the phase each peer is in (unknown, syncing, in_sync, silent), by peer ordinal.",
    ),
    (
        "egress_gateway_sync_copies",
        "gauge",
        "Passive copies of each peer's flows held here, by peer ordinal.",
    ),
    (
        "egress_gateway_sync_takeovers_total",
        "counter",
        "Dead peers whose egress IPs and flows this replica took over.",
    ),
    (
        "egress_gateway_sync_resolve_failures_total",
        "counter",
        "Failed lookups of a peer's DNS name (sync.peers[].address given by name), by peer ordinal.",
    ),
    (
        "egress_gateway_sync_takeovers_refused_total",
        "counter",
        "Takeovers of a silent peer refused because it was still alive: it answered its health probe (health_answered), or its addresses were still answered on an uplink (address_held).",
    ),
    (
        "egress_gateway_sync_serving",
        "gauge",
        "1 while this replica carries a dead peer's egress IPs and flows, by peer ordinal.",
    ),
    (
        "egress_gateway_standby_packets_total",
        "counter",
        "Packets translated with a dead peer's flows (its egress IP and port), by direction (outbound, inbound).",
    ),
    (
        "egress_gateway_sync_missed_total",
        "counter",
        "Sequence numbers of a peer's stream found missing (asked for again), by peer ordinal.",
    ),
];

/// What `/readiness` answers, and the node agents' UDP probe with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// 200: takes new flows.
    Ready,
    /// 503 `starting`: the workers are not running yet, or the cluster's nodes are not known yet.
    Starting,
    /// 503 `syncing`: a peer of the gateway set is still sending its flows (`sync`), so this replica could
    /// not yet carry the connections of a peer that dies, nor has its own back after a restart.
    Syncing,
    /// 503 `draining`: after SIGTERM (wins over everything else).
    Draining,
    /// 503 `handed over`: after SIGTERM with state sync, once the replicas of the set carry this one's flows
    /// and addresses (the node agents take it out of every route at once).
    HandedOver,
    /// 503 `probes failing: ...`: every target of a kind of the `probes` section is down; the text names
    /// them.
    ProbesFailing(String),
}

/// The process's metrics state.
pub(crate) struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub(crate) ready: AtomicBool,
    pub(crate) draining: AtomicBool,
    pub(crate) reloads_applied: AtomicU64,
    pub(crate) reloads_refused: AtomicU64,
    /// The translation log writer's counters (zero without `flow_log`).
    pub(crate) flow_log: Arc<crate::flowlog::FlowLogStats>,
    /// The UDP health probe responder's counters.
    pub(crate) probes: Arc<crate::probe::Counters>,
    /// Node addresses admitted as tunnel sources (`allowed_sources: kubernetes-nodes`).
    pub(crate) allowed_nodes: AtomicU64,
    /// The outside probes' verdicts (no targets without a `probes` section).
    pub(crate) upstream: Arc<crate::upstream::Status>,
    /// State sync's progress and counters (always synced without a `sync` section).
    pub(crate) sync: Arc<crate::sync::SyncStatus>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// A recorder of our own (not the global one, so that tests can make several).
    pub(crate) fn new() -> Telemetry {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let t = Telemetry {
            recorder,
            handle,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            reloads_applied: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            flow_log: Arc::default(),
            probes: Arc::default(),
            allowed_nodes: AtomicU64::new(0),
            upstream: Arc::default(),
            sync: Arc::new(crate::sync::SyncStatus::disabled()),
        };
        metrics::with_local_recorder(&t.recorder, || {
            for (name, kind, help) in METRICS {
                if *kind == "counter" {
                    describe_counter!(*name, Unit::Count, *help);
                } else {
                    describe_gauge!(*name, *help);
                }
            }
        });
        t
    }

    /// This recorder with the outside probes' verdicts in its readiness and metrics.
    pub(crate) fn with_upstream(self, upstream: Arc<crate::upstream::Status>) -> Telemetry {
        Telemetry { upstream, ..self }
    }

    /// This recorder with state sync's progress in its readiness and its counters in the metrics.
    pub(crate) fn with_sync(self, sync: Arc<crate::sync::SyncStatus>) -> Telemetry {
        Telemetry { sync, ..self }
    }

    /// Whether the gateway takes new flows, and if not, why. Draining wins, then starting, then syncing,
    /// then the probes.
    pub(crate) fn readiness(&self) -> Readiness {
        if self.draining.load(Ordering::Relaxed)
            && self.sync.is_handing_over()
            && self.sync.has_taker()
        {
            // While no peer can take over (all the others drain too), it says `draining`: the node agents
            // then keep the routes that use it, as in a drain without sync.
            Readiness::HandedOver
        } else if self.draining.load(Ordering::Relaxed) {
            Readiness::Draining
        } else if !self.ready.load(Ordering::Relaxed) {
            Readiness::Starting
        } else if !self.sync.is_synced() {
            Readiness::Syncing
        } else if let Some(failing) = self.upstream.failing() {
            Readiness::ProbesFailing(failing)
        } else {
            Readiness::Ready
        }
    }

    /// Updates every metric from the workers' latest reports and renders the Prometheus text.
    pub(crate) fn render(&self, shared: &Arc<Shared>) -> String {
        metrics::with_local_recorder(&self.recorder, || self.update(shared));
        self.handle.render()
    }

    fn update(&self, shared: &Arc<Shared>) {
        let gw = shared.gateway();
        let mut unaccounted: i128 = 0;
        for (w, slot) in shared.reports.iter().enumerate() {
            let Some(r) = slot.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
                continue;
            };
            let worker = w.to_string();
            let s = &r.pipeline;
            for (dir, c) in [("tunnel_rx", s.tunnel_rx), ("tunnel_tx", s.tunnel_tx)] {
                let labels = [
                    ("direction", dir.to_string()),
                    ("uplink", String::new()),
                    ("worker", worker.clone()),
                ];
                counter!("egress_gateway_packets_total", &labels).absolute(c.packets);
                counter!("egress_gateway_bytes_total", &labels).absolute(c.bytes);
            }
            for (u, up) in shared.uplinks.iter().enumerate() {
                for (dir, list) in [("uplink_rx", &s.uplink_rx), ("uplink_tx", &s.uplink_tx)] {
                    let c = list.get(u).copied().unwrap_or_default();
                    let labels = [
                        ("direction", dir.to_string()),
                        ("uplink", up.name.clone()),
                        ("worker", worker.clone()),
                    ];
                    counter!("egress_gateway_packets_total", &labels).absolute(c.packets);
                    counter!("egress_gateway_bytes_total", &labels).absolute(c.bytes);
                }
            }
            for reason in Reason::ALL {
                let labels = [
                    ("reason", reason.name().to_string()),
                    ("worker", worker.clone()),
                ];
                counter!("egress_gateway_drops_total", &labels).absolute(s.dropped(*reason));
            }
            for reason in IoDrop::ALL {
                let labels = [
                    ("reason", reason.name().to_string()),
                    ("worker", worker.clone()),
                ];
                counter!("egress_gateway_drops_total", &labels)
                    .absolute(r.io_drops[reason.index()]);
            }
            let wl = [("worker", worker.clone())];
            counter!("egress_gateway_flows_created_total", &wl).absolute(s.flows_created);
            counter!("egress_gateway_icmp_errors_originated_total", &wl)
                .absolute(s.icmp_originated);
            counter!("egress_gateway_icmp_errors_suppressed_total", &wl)
                .absolute(s.icmp_suppressed);
            counter!("egress_gateway_local_replies_total", &wl).absolute(s.local_replies);
            counter!("egress_gateway_neighbour_frames_total", &wl).absolute(s.neighbour);
            unaccounted += s.unaccounted();
            counter!("egress_gateway_tcp_resets_sent_total", &wl).absolute(s.tcp_resets_sent);
            for (dir, n) in [("outbound", s.standby_out), ("inbound", s.standby_in)] {
                let labels = [("direction", dir.to_string()), ("worker", worker.clone())];
                counter!("egress_gateway_standby_packets_total", &labels).absolute(n);
            }
            counter!("egress_gateway_gso_whole_total", &wl).absolute(r.gso_whole);
            counter!("egress_gateway_gso_segmented_total", &wl).absolute(r.gso_segmented);
            counter!("egress_gateway_checksums_completed_total", &wl)
                .absolute(r.checksums_completed);
            counter!("egress_gateway_batches_total", &wl).absolute(r.batches);
            counter!("egress_gateway_wakeups_total", &wl).absolute(r.wakeups);
        }
        // Exact for a whole number of packets: each worker's report is one consistent copy.
        #[allow(clippy::cast_precision_loss)]
        gauge!("egress_gateway_packets_unaccounted").set(unaccounted as f64);
        let table = gw.table();
        gauge!("egress_gateway_conntrack_entries").set(f64_of(table.len()));
        gauge!("egress_gateway_conntrack_capacity").set(f64_of(table.capacity()));
        let refused = table.refused();
        for (reason, v) in [
            ("full", refused.full),
            ("source_quota", refused.source_quota),
            ("ports_exhausted", refused.ports_exhausted),
            ("no_pool", refused.no_pool),
        ] {
            counter!("egress_gateway_conntrack_refused_total", "reason" => reason).absolute(v);
        }
        counter!("egress_gateway_port_takeovers_total").absolute(table.port_takeovers());
        for p in table.pools().usage() {
            let labels = [
                ("egress_ip", p.ip.to_string()),
                ("proto", format!("{:?}", p.proto).to_lowercase()),
            ];
            gauge!("egress_gateway_ports_in_use", &labels).set(f64::from(p.in_use));
            gauge!("egress_gateway_ports_capacity", &labels).set(f64::from(p.capacity));
        }
        let n = shared.neighbours.counts();
        gauge!("egress_gateway_neighbours", "state" => "resolved").set(n.resolved as f64);
        gauge!("egress_gateway_neighbours", "state" => "incomplete").set(n.incomplete as f64);
        counter!("egress_gateway_neighbour_failures_total").absolute(n.failed);
        for o in crate::neighbour::Outcome::ALL {
            counter!("egress_gateway_neighbour_updates_total", "outcome" => o.name())
                .absolute(n.outcomes[o.index()]);
        }
        let ready = self.readiness() == Readiness::Ready;
        gauge!("egress_gateway_ready").set(f64::from(u8::from(ready)));
        gauge!("egress_gateway_draining")
            .set(f64::from(u8::from(self.draining.load(Ordering::Relaxed))));
        counter!("egress_gateway_config_reloads_total", "result" => "applied")
            .absolute(self.reloads_applied.load(Ordering::Relaxed));
        counter!("egress_gateway_config_reloads_total", "result" => "refused")
            .absolute(self.reloads_refused.load(Ordering::Relaxed));
        gauge!("egress_gateway_workers").set(f64_of(shared.reports.len()));
        gauge!("egress_gateway_tunnel_allowed_nodes")
            .set(self.allowed_nodes.load(Ordering::Relaxed) as f64);
        counter!("egress_gateway_health_probes_total", "result" => "answered")
            .absolute(self.probes.answered.load(Ordering::Relaxed));
        counter!("egress_gateway_health_probes_total", "result" => "malformed")
            .absolute(self.probes.malformed.load(Ordering::Relaxed));
        counter!("egress_gateway_worker_panics_total")
            .absolute(shared.worker_panics.load(Ordering::Relaxed));
        for t in self.upstream.targets() {
            let labels = [
                ("kind", t.kind.name().to_string()),
                ("target", t.label.clone()),
            ];
            gauge!("egress_gateway_probe_up", &labels)
                .set(f64::from(u8::from(t.up.load(Ordering::Relaxed))));
            counter!("egress_gateway_probe_sent_total", &labels)
                .absolute(t.sent.load(Ordering::Relaxed));
            counter!("egress_gateway_probe_answered_total", &labels)
                .absolute(t.answered.load(Ordering::Relaxed));
            counter!("egress_gateway_probe_refused_total", &labels)
                .absolute(t.refused.load(Ordering::Relaxed));
            if let Some(rtt) = t.rtt_seconds() {
                gauge!("egress_gateway_probe_rtt_seconds", &labels).set(rtt);
            }
        }
        if let Some(snap) = self.sync.snapshot() {
            update_sync(&snap);
        }
        if let Some(events) = table.events() {
            let w = &self.flow_log;
            for (result, v) in [
                ("queued", events.pushed()),
                ("dropped", events.dropped()),
                ("written", w.written.load(Ordering::Relaxed)),
                ("failed", w.errors.load(Ordering::Relaxed)),
            ] {
                counter!("egress_gateway_flow_log_records_total", "result" => result).absolute(v);
            }
        }
    }
}

/// The sync thread's counters as metrics.
fn update_sync(snap: &crate::sync::Snapshot) {
    use forwarder_core::sync::replica::PeerPhase;
    for (dir, datagrams, bytes) in [
        ("tx", snap.tx_datagrams, snap.tx_bytes),
        ("rx", snap.rx_datagrams, snap.rx_bytes),
    ] {
        counter!("egress_gateway_sync_datagrams_total", "direction" => dir).absolute(datagrams);
        counter!("egress_gateway_sync_bytes_total", "direction" => dir).absolute(bytes);
    }
    for &(reason, n) in &snap.refused {
        counter!("egress_gateway_sync_refused_total", "reason" => reason).absolute(n);
    }
    let (r, o) = (&snap.replica, &snap.outbox);
    for (kind, result, n) in [
        ("flow", "sent", o.flows),
        ("delete", "sent", o.deletes),
        ("flow", "resent", o.resent),
        ("flow", "installed", r.installed),
        ("delete", "removed", r.removed),
        ("any", "refused", r.refused),
        ("flow", "returned", r.returned),
        ("flow", "disowned", r.disowned),
    ] {
        counter!("egress_gateway_sync_records_total", "kind" => kind, "result" => result)
            .absolute(n);
    }
    counter!("egress_gateway_sync_events_dropped_total").absolute(snap.events_dropped + o.overflow);
    counter!("egress_gateway_sync_bulk_total", "role" => "requested").absolute(r.bulk_requests);
    counter!("egress_gateway_sync_bulk_total", "role" => "served").absolute(r.bulk_served);
    counter!("egress_gateway_sync_takeovers_total").absolute(snap.takeovers);
    for (reason, n) in ["health_answered", "address_held"]
        .into_iter()
        .zip(snap.refusals)
    {
        counter!("egress_gateway_sync_takeovers_refused_total", "reason" => reason).absolute(n);
    }
    for p in &snap.peers {
        let peer = p.ordinal.to_string();
        for (name, phase) in [
            ("unknown", PeerPhase::Unknown),
            ("syncing", PeerPhase::Syncing),
            ("in_sync", PeerPhase::InSync),
            ("silent", PeerPhase::Silent),
        ] {
            gauge!("egress_gateway_sync_peer_phase", "peer" => peer.clone(), "phase" => name)
                .set(f64::from(u8::from(p.phase == phase)));
        }
        gauge!("egress_gateway_sync_copies", "peer" => peer.clone()).set(f64_of(p.copies));
        gauge!("egress_gateway_sync_serving", "peer" => peer.clone())
            .set(f64::from(u8::from(p.serving)));
        counter!("egress_gateway_sync_resolve_failures_total", "peer" => peer.clone())
            .absolute(p.resolve_failures);
        counter!("egress_gateway_sync_missed_total", "peer" => peer).absolute(p.stream.missed);
    }
}

#[allow(clippy::cast_precision_loss)] // gauges of counts far below 2^52
fn f64_of(n: usize) -> f64 {
    n as f64
}

/// Starts logging to stderr: `text` (human) or `json` (one object per line), level from `RUST_LOG`
/// (default `info`).
pub(crate) fn init_logs(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        b.json().flatten_event(true).try_init()
    } else {
        b.try_init()
    };
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::io::packet::Interface;
    use crate::worker::{Report, UplinkIo};
    use forwarder_core::pipeline::{Config, Gateway, UplinkConfig};
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    /// Every metric in the list is exported (none is defined and never set).
    #[test]
    fn every_metric_is_exported() {
        let cfg = Config {
            tunnel_ip: "172.18.0.3".parse().unwrap(),
            allowed_nodes: vec!["172.18.0.0/16".parse().unwrap()],
            pod_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            uplinks: vec![UplinkConfig {
                name: "dmz".into(),
                mtu: 1500,
                egress_v4: vec!["203.0.113.10".parse().unwrap()],
                egress_v6: vec![],
                next_hop_v4: None,
                next_hop_v6: None,
            }],
            routes: vec![("0.0.0.0/0".parse().unwrap(), 0)],
            ..Config::default()
        };
        let ct = forwarder_core::conntrack::Config {
            max_entries: 1024,
            ..Default::default()
        };
        let events = Arc::new(forwarder_core::conntrack::FlowEvents::new(16));
        let gw = Arc::new(
            Gateway::with_events(
                cfg,
                ct,
                forwarder_core::ports::PortRange::default(),
                Some(events),
            )
            .unwrap(),
        );
        let pipeline = forwarder_core::pipeline::Worker::new(Arc::clone(&gw), 1)
            .stats()
            .clone();
        let shared = Arc::new(Shared {
            gateway: Mutex::new(gw),
            gateway_generation: AtomicU64::new(0),
            neighbours: crate::neighbour::Neighbours::new(1),
            uplinks: vec![UplinkIo {
                name: "dmz".into(),
                interface: "gwdmz".into(),
                link: Interface {
                    index: 1,
                    mac: [2, 0, 0, 0, 0, 1],
                    mtu: 1500,
                },
                egress: vec!["203.0.113.10".parse().unwrap()],
                peer_egress: Vec::new(),
                mtu: 1500,
            }],
            tunnel_listen: "172.18.0.3:4790".parse().unwrap(),
            tunnel_senders: Arc::new(
                crate::io::tunnel::TunnelSenders::open("127.0.0.1:4790".parse().unwrap(), 1, 4096)
                    .unwrap(),
            ),
            tunnel_mtu: 1450,
            reports: vec![Mutex::new(Some(Report {
                pipeline,
                io_drops: [0; IoDrop::COUNT],
                gso_whole: 0,
                gso_segmented: 0,
                checksums_completed: 0,
                wakeups: 0,
                batches: 0,
            }))],
            steering: crate::io::steer::Steering::new(vec![0], 1),
            worker_panics: AtomicU64::new(0),
            stop: std::sync::atomic::AtomicBool::new(false),
            epoch: std::time::Instant::now(),
        });
        let probes = crate::config::ProbesConfig {
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(3),
            icmp: vec!["198.51.100.1".parse().unwrap()],
            tcp: vec!["198.51.100.1:443".parse().unwrap()],
        };
        let sync = crate::sync::Snapshot {
            peers: vec![crate::sync::PeerView {
                ordinal: 1,
                address: Some("172.18.0.4:4792".parse().unwrap()),
                resolve_failures: 0,
                phase: forwarder_core::sync::replica::PeerPhase::InSync,
                serving: false,
                leaving: false,
                copies: 3,
                stream: Default::default(),
            }],
            refused: vec![("bad_mac", 1)],
            ..Default::default()
        };
        let t = Telemetry::new()
            .with_upstream(Arc::new(crate::upstream::Status::new(Some(&probes))))
            .with_sync(Arc::new(crate::sync::SyncStatus::with_snapshot(sync)));
        t.upstream.targets()[0]
            .rtt_nanos
            .store(1_000_000, Ordering::Relaxed);
        let text = t.render(&shared);
        for (name, _, _) in METRICS {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && !l.starts_with('#')),
                "{name} is never exported"
            );
        }
        assert!(text.contains("egress_gateway_drops_total{reason=\"no_flow\",worker=\"0\"} 0"));
        assert!(text.contains(
            "egress_gateway_drops_total{reason=\"neighbour_unresolved\",worker=\"0\"} 0"
        ));
        assert!(
            text.contains("egress_gateway_probe_up{kind=\"tcp\",target=\"198.51.100.1:443\"} 0")
        );
        assert!(text.contains(
            "egress_gateway_probe_rtt_seconds{kind=\"icmp\",target=\"198.51.100.1\"} 0.001"
        ));
    }

    #[test]
    fn draining_wins_then_starting_then_the_probes() {
        let probes = crate::config::ProbesConfig {
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(3),
            icmp: vec!["198.51.100.1".parse().unwrap()],
            tcp: vec![],
        };
        let t =
            Telemetry::new().with_upstream(Arc::new(crate::upstream::Status::new(Some(&probes))));
        assert_eq!(t.readiness(), Readiness::Starting);
        t.ready.store(true, Ordering::Relaxed);
        assert_eq!(
            t.readiness(),
            Readiness::ProbesFailing("icmp 198.51.100.1".into())
        );
        t.upstream.targets()[0].up.store(true, Ordering::Relaxed);
        assert_eq!(t.readiness(), Readiness::Ready);
        t.upstream.targets()[0].up.store(false, Ordering::Relaxed);
        t.draining.store(true, Ordering::Relaxed);
        assert_eq!(t.readiness(), Readiness::Draining);
        assert_eq!(Telemetry::new().readiness(), Readiness::Starting);
    }

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        for (name, _, _) in METRICS {
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/metrics.md does not describe `{name}`"
            );
        }
    }
}
