//! The node agent's loop: read the inputs, plan ([`desired::plan`]), write the kernel
//! ([`Kernel::apply`]), and do it again whenever something changes — an input file, a gateway's health —
//! and every `resync` even when nothing did (so that drift is repaired).
//!
//! Everything runs on one tokio thread: the probe tasks, the file watch, signals. SIGTERM and SIGINT stop
//! the agent and leave routing as it is (pods keep their gateways while the agent restarts); `--cleanup`
//! removes everything the agent made.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder_core::policy::Inventory;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::cluster::{self, Change, ClusterView, Object, Update, Watch};
use super::desired::{self, Health, Memory, Settings};
use super::health::{detection_bound, GatewayState, Probe, Prober};
use super::kernel::{self, Kernel};
use super::state::{Ownership, VxlanSpec};
use super::{events, maintenance};
use crate::config::node::{NodeConfig, Overrides};
use crate::http::{self, Response};
use crate::inventory::{self, fingerprint, input_files, Fingerprint};

/// Why the agent stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    /// The configuration file is invalid.
    #[error("{0}")]
    Config(crate::config::ConfigErrors),
    /// The inputs are invalid at start (later, the last good ones are kept).
    #[error("the inputs have errors:\n{0}")]
    Inputs(String),
    /// The kernel refused something.
    #[error("{0}")]
    Kernel(#[from] kernel::KernelError),
    /// Anything else at start-up.
    #[error("{0}")]
    Start(String),
}

/// Runs the agent until SIGTERM/SIGINT, or with `cleanup` removes what it made and returns.
pub(crate) fn run(
    config_path: &Path,
    overrides: &Overrides,
    cleanup: bool,
) -> Result<(), AgentError> {
    let config = NodeConfig::load(config_path, overrides).map_err(AgentError::Config)?;
    crate::telemetry::init_logs(config.log_format == crate::config::LogFormat::Json);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AgentError::Start(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let kernel = Kernel::connect()?;
        let owned = ownership(&config);
        if cleanup {
            let report = kernel.cleanup(&owned).await?;
            println!(
                "removed {} objects (rules, routes, the {} device and its neighbours)",
                report.removed, config.vxlan.device
            );
            return Ok(());
        }
        let mut agent = Agent::start(config, kernel, owned)?;
        agent.connect().await?;
        agent.run().await
    })
}

fn ownership(config: &NodeConfig) -> Ownership {
    Ownership {
        device: config.vxlan.device.clone(),
        rule_priority: config.rule_priority,
        tables: config.tables.clone(),
        nexthops: super::state::NEXTHOP_IDS,
    }
}

/// What `/readiness`, `/livez` and `/metrics` read.
#[derive(Debug, Default)]
struct Status {
    ready: AtomicBool,
    heartbeat_ms: AtomicU64,
}

/// The Kubernetes API side of the agent, when `kubernetes` is configured.
struct Cluster {
    view: ClusterView,
    updates: mpsc::UnboundedReceiver<Update>,
    /// The last error logged per watch (each is logged once, until the watch recovers).
    logged: BTreeMap<Watch, String>,
    /// When the agent started waiting for the first complete lists.
    since: Instant,
    /// For the maintenance annotations' patches.
    client: kube::Client,
    /// The maintenance window last patched onto each pod, and when (not patched again until it changes,
    /// or until a resync finds the patch still not applied).
    sent: BTreeMap<desired::PodKey, (Option<maintenance::Window>, Instant)>,
    /// Kubernetes Events on blocked pods and the invalid policies behind them.
    events: events::Publisher,
}

struct Agent {
    config: NodeConfig,
    kernel: Kernel,
    owned: Ownership,
    vxlan: VxlanSpec,
    device_index: Option<u32>,
    /// What the input files hold (the cluster's objects are added at each plan).
    inventory: Inventory,
    cluster: Option<Cluster>,
    fingerprint: Fingerprint,
    memory: Memory,
    gateways: BTreeMap<Ipv4Addr, GatewayState>,
    /// When gateways not probed yet first held up a plan.
    waiting_since: Option<Instant>,
    prober: Prober,
    results: mpsc::UnboundedReceiver<(Ipv4Addr, Probe)>,
    status: Arc<Status>,
    started: Instant,
}

impl Agent {
    fn start(config: NodeConfig, kernel: Kernel, owned: Ownership) -> Result<Agent, AgentError> {
        let underlay_device = match &config.underlay_device {
            Some(d) => d.clone(),
            None => device_with_address(IpAddr::V4(config.underlay_ip)).ok_or_else(|| {
                AgentError::Start(format!(
                    "no network device has the address {} (underlay_ip in {}); check the address or set underlay_device",
                    config.underlay_ip,
                    config.path.display()
                ))
            })?,
        };
        let vxlan = VxlanSpec {
            device: config.vxlan.device.clone(),
            vni: config.vxlan.vni,
            port: config.vxlan.port,
            mtu: config.vxlan.mtu,
            local: config.underlay_ip,
            underlay_device,
        };
        let files = input_files(&config.inputs).map_err(AgentError::Inputs)?;
        let inventory = inventory::load_files(&files).map_err(|errors| {
            AgentError::Inputs(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })?;
        let fingerprint = fingerprint(&files);
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        // The agent is its own process: its recorder is the global one.
        let _ = metrics::set_global_recorder(recorder);
        describe_metrics();
        let status = Arc::new(Status::default());
        if let Some(addr) = config.listen {
            let (s, m) = (status.clone(), metrics.clone());
            let started = Instant::now();
            http::serve(
                "node-agent",
                addr,
                Arc::new(move |path: &str| endpoint(path, &s, &m, started)),
            )
            .map_err(|e| AgentError::Start(e.to_string()))?;
        }
        let (tx, results) = mpsc::unbounded_channel();
        let prober = Prober::new(config.health.clone(), tx);
        Ok(Agent {
            config,
            kernel,
            owned,
            vxlan,
            device_index: None,
            inventory,
            cluster: None,
            fingerprint,
            memory: Memory::default(),
            gateways: BTreeMap::new(),
            waiting_since: None,
            prober,
            results,
            status,
            started: Instant::now(),
        })
    }

    /// With `kubernetes` configured: a client and the four watches (nothing is asked of the API server
    /// yet; an unreachable one shows as watch errors, and the agent waits, changing nothing).
    async fn connect(&mut self) -> Result<(), AgentError> {
        let Some(settings) = &self.config.kubernetes else {
            return Ok(());
        };
        let client = cluster::client(settings.kubeconfig.as_deref())
            .await
            .map_err(AgentError::Start)?;
        let (tx, updates) = mpsc::unbounded_channel();
        metrics::gauge!("egress_node_cluster_synced").set(0.0);
        cluster::spawn(&client, &self.config.node_name, settings, &tx);
        tracing::info!(
            node = %self.config.node_name,
            gateway_selector = %settings.gateway_selector,
            "watching the Kubernetes API: this node's pods, gateway pods, namespaces, EgressGatewayPolicies"
        );
        self.cluster = Some(Cluster {
            view: ClusterView::default(),
            updates,
            logged: BTreeMap::new(),
            since: Instant::now(),
            events: events::Publisher::new(client.clone(), &self.config.node_name),
            client,
            sent: BTreeMap::new(),
        });
        Ok(())
    }

    async fn run(mut self) -> Result<(), AgentError> {
        self.device_index = Some(self.kernel.ensure_vxlan(&self.vxlan).await?);
        self.sysctls();
        tracing::info!(
            node = %self.config.node_name,
            device = %self.vxlan.device,
            underlay = %self.vxlan.underlay_device,
            failover_bound_ms = millis(detection_bound(&self.config.health)),
            "node agent started"
        );
        let mut term = signal(SignalKind::terminate()).map_err(start_error)?;
        let mut int = signal(SignalKind::interrupt()).map_err(start_error)?;
        let mut hup = signal(SignalKind::hangup()).map_err(start_error)?;
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        let mut resync = tokio::time::interval(self.config.resync);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.reconcile("start").await;
        loop {
            let wait_until = self
                .waiting_since
                .map(|t| t + self.config.health.timeout + Duration::from_millis(50));
            tokio::select! {
                Some((gw, probe)) = self.results.recv() => {
                    let mut changed = self.record(gw, &probe);
                    // Take every result already queued before planning once.
                    while let Ok((gw, probe)) = self.results.try_recv() {
                        changed |= self.record(gw, &probe);
                    }
                    if changed || self.waiting_since.is_some() {
                        self.reconcile("health").await;
                    }
                }
                _ = watch.tick() => {
                    self.heartbeat();
                    if self.inputs_changed() {
                        self.reload("inputs changed").await;
                    }
                }
                Some(update) = next_update(&mut self.cluster) => {
                    let mut changed = self.cluster_update(update);
                    // Take every update already queued before planning once.
                    while let Some(update) = self.cluster.as_mut().and_then(|c| c.updates.try_recv().ok()) {
                        changed |= self.cluster_update(update);
                    }
                    if changed {
                        self.reconcile("cluster").await;
                    }
                }
                _ = resync.tick() => self.reconcile("resync").await,
                _ = sleep_until(wait_until) => {
                    self.waiting_since = Some(Instant::now() - Duration::from_secs(3600));
                    self.reconcile("probe wait over").await;
                }
                _ = hup.recv() => self.reload("SIGHUP").await,
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!(
            "node agent stopping; routing is left in place (use --cleanup to remove it)"
        );
        Ok(())
    }

    /// `fib_multipath_hash_policy=1` (both families) and `rp_filter=0` on the device. Values already right
    /// are not written; a read-only `/proc/sys` (an unprivileged container) is a warning, not an error: set
    /// them from a privileged init container instead (docs/deploy.md).
    fn sysctls(&self) {
        if let Err(e) = kernel::set_sysctls(&self.vxlan.device) {
            tracing::warn!(
                error = %e,
                "cannot set the multipath hash and rp_filter sysctls; flows may not spread over gateways by \
                 5-tuple and replies may be filtered: set them on the node (see docs/node-agent.md)"
            );
        }
    }

    fn heartbeat(&self) {
        let ms = millis(self.started.elapsed());
        self.status.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// Records a probe result; returns whether the gateway's health changed.
    fn record(&mut self, gw: Ipv4Addr, probe: &Probe) -> bool {
        let state = self.gateways.entry(gw).or_default();
        let before = state.health;
        let changed = state.record(probe, &self.config.health);
        if changed {
            metrics::counter!("egress_node_health_transitions_total").increment(1);
            match (&state.health, probe) {
                (Health::Down, Probe::Failed(why)) => {
                    tracing::warn!(gateway = %gw, was = ?before, error = %why, "gateway down")
                }
                (h, _) => tracing::info!(gateway = %gw, was = ?before, now = ?h, "gateway health"),
            }
        }
        changed
    }

    /// Applies a watch's report to the view and logs what an operator must see: a watch failing (once per
    /// distinct error), recovering, the first complete view, invalid policies. Returns whether the plan's
    /// inputs changed.
    fn cluster_update(&mut self, update: Update) -> bool {
        let Some(c) = self.cluster.as_mut() else {
            return false;
        };
        let watch = update.watch;
        let was_synced = c.view.synced();
        match &update.change {
            Change::Failed(message) => {
                metrics::counter!("egress_node_watch_errors_total", "watch" => watch.name())
                    .increment(1);
                if c.logged.get(&watch) != Some(message) {
                    tracing::error!(
                        watch = watch.name(),
                        "Kubernetes API: {message} (retrying with backoff; what is programmed stays)"
                    );
                    c.logged.insert(watch, message.clone());
                }
            }
            Change::Expired(message) => {
                // Routine (etcd compaction, an API server restart): kube-rs lists again at once.
                metrics::counter!("egress_node_watch_expired_total", "watch" => watch.name())
                    .increment(1);
                tracing::info!(
                    watch = watch.name(),
                    "Kubernetes API: {message}; what is programmed stays until the list is complete"
                );
            }
            _ => {
                if c.logged.remove(&watch).is_some() {
                    tracing::info!(
                        watch = watch.name(),
                        "Kubernetes API: the watch works again"
                    );
                }
            }
        }
        let invalid = |change: &Change| -> Vec<(String, String)> {
            let one = |k: &String, o: &Object| match o {
                Object::Policy(Err(why), _) => Some((k.clone(), why.clone())),
                _ => None,
            };
            match change {
                Change::Listed(all) => all.iter().filter_map(|(k, o)| one(k, o)).collect(),
                Change::Applied(k, o) => one(k, o).into_iter().collect(),
                _ => Vec::new(),
            }
        };
        for (name, why) in invalid(&update.change) {
            tracing::error!(
                policy = %name,
                "EgressGatewayPolicy '{name}' is invalid and not used; pods that name it are blocked until it \
                 is fixed: {why}"
            );
        }
        let changed = c.view.apply(update);
        metrics::gauge!("egress_node_invalid_policies").set(c.view.invalid_policies().len() as f64);
        for (w, n) in c.view.counts() {
            metrics::gauge!("egress_node_cluster_objects", "watch" => w.name()).set(n as f64);
        }
        if !was_synced && c.view.synced() {
            metrics::gauge!("egress_node_cluster_synced").set(1.0);
            let counts: Vec<String> = c
                .view
                .counts()
                .iter()
                .map(|(w, n)| format!("{}={n}", w.name()))
                .collect();
            tracing::info!(
                took_ms = millis(c.since.elapsed()),
                objects = %counts.join(" "),
                "Kubernetes API: every watch has listed; planning from the cluster"
            );
            return true;
        }
        changed && c.view.synced()
    }

    /// Sets or removes the gateway maintenance annotations on this node's client pods (`maintenance`):
    /// one merge patch per pod whose annotations differ from its window, each on a task of its own so
    /// that a slow API server never holds up routing. Needs `patch` on pods.
    fn annotate(&mut self, memory: &Memory) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let windows = maintenance::windows(memory, &c.view.terminating_gateways());
        c.sent.retain(|pod, _| windows.contains_key(pod));
        for (pod, window) in windows {
            let Some(seen) = c.view.node_pod(&pod) else {
                continue;
            };
            let Some(patch) = maintenance::patch(&seen.annotations, window.as_ref()) else {
                continue;
            };
            if c.sent
                .get(&pod)
                .is_some_and(|(w, at)| *w == window && at.elapsed() < self.config.resync)
            {
                continue; // sent; the watch has not shown it yet
            }
            match &window {
                Some(w) => tracing::info!(
                    pod = %format!("{}/{}", pod.0, pod.1),
                    gateway = %w.gateway,
                    until = %w.when.finished,
                    "gateway maintenance: annotating the pod"
                ),
                None => tracing::info!(
                    pod = %format!("{}/{}", pod.0, pod.1),
                    "gateway maintenance over: removing the pod's annotations"
                ),
            }
            c.sent.insert(pod.clone(), (window, Instant::now()));
            let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(c.client.clone(), &pod.0);
            tokio::spawn(async move {
                let params = kube::api::PatchParams::default();
                if let Err(e) = api
                    .patch(&pod.1, &params, &kube::api::Patch::Merge(&patch))
                    .await
                {
                    metrics::counter!("egress_node_annotation_errors_total").increment(1);
                    tracing::warn!(
                        pod = %format!("{}/{}", pod.0, pod.1),
                        error = %e,
                        "cannot patch the gateway maintenance annotations (the agent needs `patch` on pods)"
                    );
                }
            });
        }
    }

    fn inputs_changed(&self) -> bool {
        match input_files(&self.config.inputs) {
            Ok(files) => fingerprint(&files) != self.fingerprint,
            Err(_) => true,
        }
    }

    /// Re-reads the inputs; keeps the last good inventory when they have errors.
    async fn reload(&mut self, why: &str) {
        let loaded = input_files(&self.config.inputs).and_then(|files| {
            let fp = fingerprint(&files);
            inventory::load_files(&files)
                .map(|inv| (inv, fp))
                .map_err(|errors| {
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                })
        });
        match loaded {
            Ok((inventory, fp)) => {
                self.inventory = inventory;
                self.fingerprint = fp;
                metrics::counter!("egress_node_input_reloads_total", "result" => "ok").increment(1);
                tracing::info!(reason = why, "inputs reloaded");
                self.reconcile("inputs").await;
            }
            Err(errors) => {
                // Do not report the same broken state every second.
                if let Ok(files) = input_files(&self.config.inputs) {
                    self.fingerprint = fingerprint(&files);
                }
                metrics::counter!("egress_node_input_reloads_total", "result" => "error")
                    .increment(1);
                tracing::error!(
                    reason = why,
                    "inputs not reloaded, the previous ones stay in use:\n{errors}"
                );
            }
        }
    }

    /// Plans and writes the kernel. With the Kubernetes API configured, nothing is written before every
    /// watch has listed once: a restarted agent (or one whose API server is away) leaves what is
    /// programmed as it is rather than plan from a partial view.
    async fn reconcile(&mut self, why: &str) {
        let merged;
        let inventory = match &self.cluster {
            None => &self.inventory,
            Some(c) if c.view.synced() => {
                merged = c.view.inventory(&self.inventory);
                &merged
            }
            Some(c) => {
                let waiting: Vec<&str> = c.view.unsynced().iter().map(|w| w.name()).collect();
                let errors: Vec<String> = c
                    .view
                    .errors()
                    .iter()
                    .map(|(w, e)| format!("{}: {e}", w.name()))
                    .collect();
                tracing::info!(
                    reason = why,
                    waiting_for = %waiting.join(","),
                    errors = %errors.join("; "),
                    "not planning yet: waiting for the first complete lists from the Kubernetes API"
                );
                self.heartbeat();
                return;
            }
        };
        let settings = Settings {
            node: &self.config.node_name,
            rule_priority: self.config.rule_priority,
            tables: self.config.tables.clone(),
            cluster_cidrs: &self.config.cluster_cidrs,
        };
        let health = |gw: Ipv4Addr| self.gateways.get(&gw).map_or(Health::Unknown, |s| s.health);
        let plan = desired::plan(inventory, &settings, &health, &self.memory);

        self.prober.set_targets(plan.gateways.iter().copied());
        self.gateways.retain(|gw, _| plan.gateways.contains(gw));
        // Gateways never probed yet would plan as down: give their first probe until the timeout.
        let unknown = plan
            .gateways
            .iter()
            .filter(|gw| !self.gateways.contains_key(gw))
            .count();
        if unknown > 0 {
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.config.health.timeout + Duration::from_millis(50) {
                return;
            }
        }
        self.waiting_since = None;

        let index = match self.device_index {
            Some(i) => i,
            None => match self.kernel.ensure_vxlan(&self.vxlan).await {
                Ok(i) => {
                    self.device_index = Some(i);
                    // A recreated device starts with the default rp_filter.
                    self.sysctls();
                    i
                }
                Err(e) => {
                    metrics::counter!("egress_node_reconciles_total", "result" => "error")
                        .increment(1);
                    tracing::error!(error = %e, "cannot set up the vxlan device; retrying at the next resync");
                    return;
                }
            },
        };
        let began = Instant::now();
        match self.kernel.apply(index, &plan.desired, &self.owned).await {
            Ok(report) => {
                metrics::counter!("egress_node_reconciles_total", "result" => "ok").increment(1);
                metrics::counter!("egress_node_kernel_changes_total", "op" => "added")
                    .increment(report.added as u64);
                metrics::counter!("egress_node_kernel_changes_total", "op" => "replaced")
                    .increment(report.replaced as u64);
                metrics::counter!("egress_node_kernel_changes_total", "op" => "removed")
                    .increment(report.removed as u64);
                metrics::gauge!("egress_node_reconcile_seconds").set(began.elapsed().as_secs_f64());
                if !report.is_empty() {
                    tracing::info!(
                        reason = why,
                        pods = plan.pods,
                        added = report.added,
                        replaced = report.replaced,
                        removed = report.removed,
                        took_us = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
                        "kernel updated"
                    );
                }
                if !self.status.ready.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        pods = plan.pods,
                        gateways = plan.gateways.len(),
                        "first reconcile done: ready"
                    );
                }
                for p in &plan.problems {
                    tracing::warn!("{p}");
                }
                self.annotate(&plan.memory);
                if let Some(c) = self.cluster.as_mut() {
                    let reports =
                        events::reports(&plan.misconfigured, &c.view, &self.config.node_name);
                    c.events.publish(reports);
                }
                self.memory = plan.memory;
            }
            Err(e) => {
                metrics::counter!("egress_node_reconciles_total", "result" => "error").increment(1);
                tracing::error!(reason = why, error = %e, "reconcile failed; retrying at the next change or resync");
                // The device may have been deleted under us: look it up again next time.
                self.device_index = None;
            }
        }
        if let Some(mode) = self.kernel.current_mode() {
            for m in [kernel::Mode::Resilient, kernel::Mode::Multipath] {
                metrics::gauge!("egress_node_nexthop_mode", "mode" => m.name()).set(if m == mode {
                    1.0
                } else {
                    0.0
                });
            }
        }
        metrics::gauge!("egress_node_pods").set(plan.pods as f64);
        metrics::gauge!("egress_node_problems").set(plan.problems.len() as f64);
        for (gw, s) in &self.gateways {
            for (state, h) in [
                ("healthy", Health::Healthy),
                ("draining", Health::Draining),
                ("down", Health::Down),
            ] {
                metrics::gauge!("egress_node_gateway_health", "gateway" => gw.to_string(), "state" => state)
                    .set(if s.health == h { 1.0 } else { 0.0 });
            }
        }
        self.heartbeat();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn start_error(e: std::io::Error) -> AgentError {
    AgentError::Start(format!("cannot install signal handlers: {e}"))
}

/// The next watch report, or never without the Kubernetes API.
async fn next_update(cluster: &mut Option<Cluster>) -> Option<Update> {
    match cluster {
        Some(c) => c.updates.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn endpoint(
    target: &str,
    status: &Status,
    metrics: &PrometheusHandle,
    started: Instant,
) -> Response {
    match http::split(target).0 {
        "/readiness" | "/readyz" => {
            if status.ready.load(Ordering::Relaxed) {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "starting\n")
            }
        }
        "/livez" | "/healthz" => {
            let now = millis(started.elapsed());
            let beat = status.heartbeat_ms.load(Ordering::Relaxed);
            if now.saturating_sub(beat) < 30_000 {
                Response::text(200, "ok\n")
            } else {
                Response::text(503, "the agent's loop is stuck\n")
            }
        }
        "/metrics" => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics.render(),
        },
        _ => Response::text(404, "not found: try /readiness, /livez or /metrics\n"),
    }
}

/// The agent's metrics: name, kind, help (documented in docs/node-agent.md).
pub(crate) const METRICS: &[(&str, &str, &str)] = &[
    (
        "egress_node_pods",
        "gauge",
        "Opted-in pods on this node with a route table.",
    ),
    (
        "egress_node_problems",
        "gauge",
        "Problems in the last plan (see the log).",
    ),
    (
        "egress_node_gateway_health",
        "gauge",
        "1 for the state each probed gateway is in.",
    ),
    (
        "egress_node_health_transitions_total",
        "counter",
        "Gateway health changes.",
    ),
    (
        "egress_node_reconciles_total",
        "counter",
        "Reconciles, by result.",
    ),
    (
        "egress_node_kernel_changes_total",
        "counter",
        "Rules, routes, neighbours and FDB entries written, by op.",
    ),
    (
        "egress_node_nexthop_mode",
        "gauge",
        "1 for how routes via gateways are written: resilient (nexthop groups) or multipath.",
    ),
    (
        "egress_node_reconcile_seconds",
        "gauge",
        "Duration of the last reconcile.",
    ),
    (
        "egress_node_input_reloads_total",
        "counter",
        "Input reloads, by result.",
    ),
    (
        "egress_node_cluster_synced",
        "gauge",
        "1 once every Kubernetes API watch has listed (the agent plans only then).",
    ),
    (
        "egress_node_cluster_objects",
        "gauge",
        "Objects each Kubernetes API watch holds, by watch.",
    ),
    (
        "egress_node_watch_errors_total",
        "counter",
        "Kubernetes API watch errors (each retried with backoff), by watch.",
    ),
    (
        "egress_node_watch_expired_total",
        "counter",
        "Kubernetes API watches whose resourceVersion had expired (410 Gone), each followed by a new list, \
         by watch.",
    ),
    (
        "egress_node_annotation_errors_total",
        "counter",
        "Gateway maintenance annotation patches the API server refused or that failed.",
    ),
    (
        "egress_node_events_total",
        "counter",
        "Kubernetes Events published, by reason (EgressBlocked on a pod, InvalidPolicy on a policy).",
    ),
    (
        "egress_node_event_errors_total",
        "counter",
        "Kubernetes Events the API server refused or that failed (each logged).",
    ),
    (
        "egress_node_invalid_policies",
        "gauge",
        "EgressGatewayPolicies from the API that are invalid (not used; pods naming them are blocked).",
    ),
];

fn describe_metrics() {
    for (name, kind, help) in METRICS {
        if *kind == "counter" {
            metrics::describe_counter!(*name, *help);
        } else {
            metrics::describe_gauge!(*name, *help);
        }
    }
}

/// The name of the device holding `addr`.
fn device_with_address(addr: IpAddr) -> Option<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            let ip = match family {
                libc::AF_INET => {
                    // SAFETY: family AF_INET means a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))))
                }
                _ => None,
            };
            if ip == Some(addr) {
                // SAFETY: ifa_name is a NUL-terminated string owned by the list.
                let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
                found = Some(name.to_string_lossy().into_owned());
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!("../../../docs/node-agent.md");
        for (name, _, _) in METRICS {
            assert!(
                docs.contains(&format!("`{name}")),
                "docs/node-agent.md does not describe {name}"
            );
        }
    }

    #[test]
    fn loopback_is_found_by_address() {
        assert_eq!(
            device_with_address(IpAddr::V4(Ipv4Addr::LOCALHOST)).as_deref(),
            Some("lo")
        );
        assert_eq!(device_with_address("192.0.2.254".parse().unwrap()), None);
    }
}
