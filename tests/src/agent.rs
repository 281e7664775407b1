//! The node agent (`egress-gateway node --config FILE`) under test: the Kubernetes inventory it reads
//! ([`Inventory`], written as `kubectl get -o yaml` would print it), its configuration ([`AgentConfig`]),
//! and a handle on the running agent ([`NodeAgent`]) — started in a node's namespace, ready when
//! `GET /readiness` answers 200, stopped with SIGTERM on drop — plus readers of what it programmed
//! (ip rules, per-pod tables, next hops).
//!
//! The agent needs a node-agent topology ([`TopologySpec::node_agent`](crate::TopologySpec::node_agent)):
//! bare nodes whose vxlan device, rules and tables it makes itself.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::error::{Context, Error, Result};
use crate::gateway::{http_get, HEALTH_PORT};
use crate::netns::{self, Netns};
use crate::process::Process;
use crate::topology::{
    gateway_ip, node_ip, Pod, Topology, NODE_VXLAN_DEV, POD_CIDR, POD_CIDR6, POD_RULE_PRIORITY,
    TUNNEL_MTU, UNDERLAY, VNI, VXLAN_PORT,
};

/// The annotation that opts a namespace or pod into a policy.
pub const POLICY_ANNOTATION: &str = "egress.projectcalico.org/egressGatewayPolicy";
/// The namespace the harness puts gateway pods in.
pub const GATEWAY_NAMESPACE: &str = "egress";
/// The label key that gives a gateway pod its "code" (`egress-code: red`).
pub const CODE_LABEL: &str = "egress-code";
/// The label (key, value) that marks gateway pods for the agent's Kubernetes watch (its default
/// `kubernetes.gateway_selector`).
pub const GATEWAY_LABEL: (&str, &str) = ("egress-gateway/gateway", "true");
/// The protocol number on every rule and route the agent makes.
pub const AGENT_PROTO: u8 = 242;
/// The agent's `listen:` address inside the node namespace (each node has its own loopback).
pub const AGENT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9101);

/// Gateway `k`'s IPv6 pod address in the inventory: fd00:18::(2+k). It only marks the gateway pod as
/// dual-stack (so it serves IPv6 destinations); the tunnel stays IPv4 and nothing has this address.
pub fn gateway_pod_ip6(k: usize) -> Ipv6Addr {
    let last = u16::try_from(2 + k).unwrap_or_else(|_| panic!("gateway {k} out of range"));
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, last)
}

// ---------------------------------------------------------------------------------------------------
// Inventory
// ---------------------------------------------------------------------------------------------------

/// A `v1` Namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceObj {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Vec<(String, String)>,
    /// `metadata.annotations`.
    pub annotations: Vec<(String, String)>,
}

/// A `v1` Pod (what the agent reads of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodObj {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Vec<(String, String)>,
    /// `metadata.annotations`.
    pub annotations: Vec<(String, String)>,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `status.hostIP`.
    pub host_ip: IpAddr,
    /// `status.podIPs` (the first is also `status.podIP`).
    pub ips: Vec<IpAddr>,
}

/// The `gateway:` of a policy rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRef {
    /// `selector` (Calico selector over the gateway pods' labels).
    pub selector: String,
    /// `namespaceSelector`.
    pub namespace_selector: Option<String>,
    /// `maxNextHops`.
    pub max_next_hops: Option<u32>,
}

impl GatewayRef {
    /// The gateway pods labelled `egress-code: <code>` in the harness's gateway namespace.
    pub fn code(code: &str) -> Self {
        Self {
            selector: format!("{CODE_LABEL} == '{code}'"),
            namespace_selector: Some(format!("projectcalico.org/name == '{GATEWAY_NAMESPACE}'")),
            max_next_hops: None,
        }
    }

    /// The same with `maxNextHops`.
    #[must_use]
    pub fn max_next_hops(mut self, n: u32) -> Self {
        self.max_next_hops = Some(n);
        self
    }
}

/// One rule of an EgressGatewayPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// `description`.
    pub description: Option<String>,
    /// `destination.cidr` (none: 0.0.0.0/0).
    pub destination: Option<IpNet>,
    /// `gateway` (none: normal routing).
    pub gateway: Option<GatewayRef>,
    /// `gatewayPreference` (`None` or `PreferNodeLocal`).
    pub preference: Option<String>,
}

impl PolicyRule {
    /// `dst` through the gateways labelled `egress-code: <code>`.
    pub fn via(dst: impl Into<IpNet>, code: &str) -> Self {
        Self::via_gateways(dst, GatewayRef::code(code))
    }

    /// `dst` through the gateways `gateway` selects.
    pub fn via_gateways(dst: impl Into<IpNet>, gateway: GatewayRef) -> Self {
        Self {
            description: None,
            destination: Some(dst.into()),
            gateway: Some(gateway),
            preference: None,
        }
    }

    /// `dst` by normal routing (no gateway).
    pub fn no_gateway(dst: impl Into<IpNet>) -> Self {
        Self {
            description: None,
            destination: Some(dst.into()),
            gateway: None,
            preference: None,
        }
    }

    /// The same with a description.
    #[must_use]
    pub fn described(mut self, text: &str) -> Self {
        self.description = Some(text.to_owned());
        self
    }
}

/// A `projectcalico.org/v3` EgressGatewayPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// `spec.rules`.
    pub rules: Vec<PolicyRule>,
}

impl Policy {
    /// A policy with these rules.
    pub fn new(name: &str, rules: Vec<PolicyRule>) -> Self {
        Self {
            name: name.to_owned(),
            rules,
        }
    }
}

/// Kubernetes objects for the agent: namespaces, pods (clients and gateways), policies. Written as a
/// multi-document YAML stream ([`to_yaml`](Self::to_yaml)) that `egress-gateway check` accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Namespaces.
    pub namespaces: Vec<NamespaceObj>,
    /// Pods.
    pub pods: Vec<PodObj>,
    /// Policies.
    pub policies: Vec<Policy>,
}

impl Inventory {
    /// An empty inventory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A namespace without labels or annotations (kept once).
    pub fn namespace(&mut self, name: &str) -> &mut Self {
        self.namespace_mut(name);
        self
    }

    /// A namespace annotated with `egressGatewayPolicy: <policy>`.
    pub fn namespace_with_policy(&mut self, name: &str, policy: &str) -> &mut Self {
        self.set_namespace_policy(name, Some(policy));
        self
    }

    /// Sets (or, with `None`, removes) a namespace's policy annotation; creates the namespace if needed.
    pub fn set_namespace_policy(&mut self, name: &str, policy: Option<&str>) -> &mut Self {
        let ns = self.namespace_mut(name);
        ns.annotations.retain(|(k, _)| k != POLICY_ANNOTATION);
        if let Some(p) = policy {
            ns.annotations
                .push((POLICY_ANNOTATION.to_owned(), p.to_owned()));
        }
        self
    }

    fn namespace_mut(&mut self, name: &str) -> &mut NamespaceObj {
        let i = match self.namespaces.iter().position(|n| n.name == name) {
            Some(i) => i,
            None => {
                self.namespaces.push(NamespaceObj {
                    name: name.to_owned(),
                    labels: Vec::new(),
                    annotations: Vec::new(),
                });
                self.namespaces.len() - 1
            }
        };
        &mut self.namespaces[i]
    }

    /// The topology's pod `pod` as `namespace/name`: on node `node<n>` (host IP the node's), its IPv4 and
    /// (dual-stack) IPv6 address. The namespace is added if missing.
    pub fn client_pod(&mut self, namespace: &str, name: &str, pod: &Pod) -> &mut Self {
        let mut ips = vec![IpAddr::V4(pod.ip)];
        ips.extend(pod.ip6.map(IpAddr::V6));
        self.client_pod_at(namespace, name, pod.node, ips)
    }

    /// A client pod `namespace/name` on node `n` with these addresses (labelled `app: <name>`).
    pub fn client_pod_at(
        &mut self,
        namespace: &str,
        name: &str,
        n: usize,
        ips: Vec<IpAddr>,
    ) -> &mut Self {
        self.namespace_mut(namespace);
        self.pods.push(PodObj {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels: vec![("app".to_owned(), name.to_owned())],
            annotations: Vec::new(),
            node_name: node_name(n),
            host_ip: IpAddr::V4(node_ip(n)),
            ips,
        });
        self
    }

    /// Gateway pod `k` (`egress/gw<k>`) labelled `egress-code: <code>` and [`GATEWAY_LABEL`]: pod IP 172.18.0.(2+k) and, if
    /// `dual_stack`, fd00:18::(2+k) (so that it serves IPv6 destinations), on node `gateway-node<k>`.
    pub fn gateway_pod(&mut self, k: usize, code: &str, dual_stack: bool) -> &mut Self {
        self.namespace_mut(GATEWAY_NAMESPACE);
        let ip = gateway_ip(k);
        let mut ips = vec![IpAddr::V4(ip)];
        if dual_stack {
            ips.push(IpAddr::V6(gateway_pod_ip6(k)));
        }
        self.pods.push(PodObj {
            namespace: GATEWAY_NAMESPACE.to_owned(),
            name: format!("gw{k}"),
            labels: vec![
                (CODE_LABEL.to_owned(), code.to_owned()),
                (GATEWAY_LABEL.0.to_owned(), GATEWAY_LABEL.1.to_owned()),
            ],
            annotations: Vec::new(),
            node_name: format!("gateway-node{k}"),
            host_ip: IpAddr::V4(ip),
            ips,
        });
        self
    }

    /// Adds (or replaces, by name) a policy.
    pub fn policy(&mut self, policy: Policy) -> &mut Self {
        self.policies.retain(|p| p.name != policy.name);
        self.policies.push(policy);
        self
    }

    /// The policy named `name`, to change it.
    pub fn policy_mut(&mut self, name: &str) -> Option<&mut Policy> {
        self.policies.iter_mut().find(|p| p.name == name)
    }

    /// The pod `namespace/name`, to change it.
    pub fn pod_mut(&mut self, namespace: &str, name: &str) -> Option<&mut PodObj> {
        self.pods
            .iter_mut()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The YAML stream: policies, then namespaces, then pods, one document each.
    pub fn to_yaml(&self) -> String {
        let mut docs = Vec::new();
        for p in &self.policies {
            docs.push(policy_yaml(p));
        }
        for n in &self.namespaces {
            docs.push(namespace_yaml(n));
        }
        for p in &self.pods {
            docs.push(pod_yaml(p));
        }
        let mut out = String::from("# written by the test harness (tests/src/agent.rs)\n");
        out.push_str(&docs.join("---\n"));
        out
    }

    /// Writes [`to_yaml`](Self::to_yaml) to `path` in one step (temporary file renamed over it).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::scenario::write_atomically(path, &self.to_yaml())
    }
}

/// The node name the inventory gives node `n`: `node<n>`.
pub fn node_name(n: usize) -> String {
    format!("node{n}")
}

/// A YAML double-quoted string.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn map_yaml(out: &mut String, indent: &str, key: &str, pairs: &[(String, String)]) {
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(out, "{indent}{key}:");
    for (k, v) in pairs {
        let _ = writeln!(out, "{indent}  {}: {}", q(k), q(v));
    }
}

pub(crate) fn namespace_yaml(n: &NamespaceObj) -> String {
    let mut s = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n");
    let _ = writeln!(s, "  name: {}", q(&n.name));
    map_yaml(&mut s, "  ", "labels", &n.labels);
    map_yaml(&mut s, "  ", "annotations", &n.annotations);
    s
}

pub(crate) fn pod_yaml(p: &PodObj) -> String {
    let mut s = String::from("apiVersion: v1\nkind: Pod\nmetadata:\n");
    let _ = writeln!(s, "  name: {}", q(&p.name));
    let _ = writeln!(s, "  namespace: {}", q(&p.namespace));
    map_yaml(&mut s, "  ", "labels", &p.labels);
    map_yaml(&mut s, "  ", "annotations", &p.annotations);
    let _ = writeln!(s, "spec:\n  nodeName: {}", q(&p.node_name));
    let _ = writeln!(s, "status:\n  hostIP: {}", q(&p.host_ip.to_string()));
    if let Some(first) = p.ips.first() {
        let _ = writeln!(s, "  podIP: {}", q(&first.to_string()));
        s.push_str("  podIPs:\n");
        for ip in &p.ips {
            let _ = writeln!(s, "  - ip: {}", q(&ip.to_string()));
        }
    }
    s
}

pub(crate) fn policy_yaml(p: &Policy) -> String {
    let mut s =
        String::from("apiVersion: projectcalico.org/v3\nkind: EgressGatewayPolicy\nmetadata:\n");
    let _ = writeln!(s, "  name: {}", q(&p.name));
    s.push_str("spec:\n  rules:\n");
    if p.rules.is_empty() {
        s = s.replace("  rules:\n", "  rules: []\n");
    }
    for r in &p.rules {
        let mut fields = Vec::new();
        if let Some(d) = &r.description {
            fields.push(format!("description: {}", q(d)));
        }
        if let Some(dst) = &r.destination {
            fields.push(format!("destination:\n      cidr: {}", q(&dst.to_string())));
        }
        if let Some(g) = &r.gateway {
            let mut gw = format!("gateway:\n      selector: {}", q(&g.selector));
            if let Some(ns) = &g.namespace_selector {
                let _ = write!(gw, "\n      namespaceSelector: {}", q(ns));
            }
            if let Some(n) = g.max_next_hops {
                let _ = write!(gw, "\n      maxNextHops: {n}");
            }
            fields.push(gw);
        }
        if let Some(pref) = &r.preference {
            fields.push(format!("gatewayPreference: {}", q(pref)));
        }
        if fields.is_empty() {
            s.push_str("  - {}\n");
        } else {
            for (i, f) in fields.iter().enumerate() {
                let lead = if i == 0 { "  - " } else { "    " };
                let _ = writeln!(s, "{lead}{f}");
            }
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------------

/// The agent's gateway health probe (`health:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthProbe {
    /// Port on each gateway's pod IP.
    pub port: u16,
    /// Path.
    pub path: String,
    /// Time between probes.
    pub interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Failed probes in a row after which a gateway leaves the multipath sets.
    pub failures: u32,
}

/// The agent's configuration (the contract with `egress-gateway node --config FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// `node_name`: pods whose `spec.nodeName` is this are this node's.
    pub node_name: String,
    /// `underlay_ip`: the vxlan's local address.
    pub underlay_ip: Ipv4Addr,
    /// `vxlan.device`.
    pub device: String,
    /// `vxlan.vni`.
    pub vni: u32,
    /// `vxlan.port`.
    pub port: u16,
    /// `vxlan.mtu`.
    pub mtu: u32,
    /// `rule_priority`.
    pub rule_priority: u32,
    /// `tables: { first, last }`.
    pub tables: (u32, u32),
    /// `cluster_cidrs`: never steered to a gateway.
    pub cluster_cidrs: Vec<IpNet>,
    /// `inputs`: inventory files or directories.
    pub inputs: Vec<PathBuf>,
    /// `kubernetes.kubeconfig`: watch this API server (the `kubernetes` section is left out when `None`).
    pub kubeconfig: Option<PathBuf>,
    /// `health`.
    pub health: HealthProbe,
    /// `listen` (readiness and metrics).
    pub listen: Option<SocketAddr>,
}

impl AgentConfig {
    /// The configuration for node `n` of a harness topology reading `inputs`: device `egress.calico`, VNI
    /// 4097, port 4790, MTU 1450, priority 100, tables 200–1200, cluster CIDRs pods + underlay, health
    /// probe on :8080/readiness every 200 ms (timeout 150 ms, 2 failures), listening on 127.0.0.1:9101.
    pub fn for_node(n: usize, inputs: Vec<PathBuf>) -> Self {
        Self {
            node_name: node_name(n),
            underlay_ip: node_ip(n),
            device: NODE_VXLAN_DEV.to_owned(),
            vni: VNI,
            port: VXLAN_PORT,
            mtu: TUNNEL_MTU,
            rule_priority: POD_RULE_PRIORITY,
            tables: (200, 1200),
            cluster_cidrs: vec![POD_CIDR.into(), UNDERLAY.into(), POD_CIDR6.into()],
            inputs,
            health: HealthProbe {
                port: HEALTH_PORT,
                path: "/readiness".to_owned(),
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(150),
                failures: 2,
            },
            listen: Some(AGENT_LISTEN),
            kubeconfig: None,
        }
    }

    /// The YAML file.
    pub fn yaml(&self) -> String {
        let list = |v: Vec<String>| v.join(", ");
        // IPv6 prefixes quoted, as in the agent's documentation.
        let cidrs = list(
            self.cluster_cidrs
                .iter()
                .map(|c| match c {
                    IpNet::V4(_) => c.to_string(),
                    IpNet::V6(_) => q(&c.to_string()),
                })
                .collect(),
        );
        let inputs = list(
            self.inputs
                .iter()
                .map(|p| q(&p.to_string_lossy()))
                .collect(),
        );
        let h = &self.health;
        let inputs_line = if !self.inputs.is_empty() || self.kubeconfig.is_none() {
            format!("inputs: [{inputs}]\n")
        } else {
            String::new()
        };
        let mut s = format!(
            "node_name: {}
underlay_ip: {}
vxlan: {{ device: {}, vni: {}, port: {}, mtu: {} }}
rule_priority: {}
tables: {{ first: {}, last: {} }}
cluster_cidrs: [{cidrs}]
{inputs_line}health: {{ port: {}, path: {}, interval: {}ms, timeout: {}ms, failures: {} }}
",
            q(&self.node_name),
            self.underlay_ip,
            q(&self.device),
            self.vni,
            self.port,
            self.mtu,
            self.rule_priority,
            self.tables.0,
            self.tables.1,
            h.port,
            h.path,
            h.interval.as_millis(),
            h.timeout.as_millis(),
            h.failures,
        );
        if let Some(k) = &self.kubeconfig {
            let _ = writeln!(
                s,
                "kubernetes: {{ kubeconfig: {} }}",
                q(&k.to_string_lossy())
            );
        }
        if let Some(l) = self.listen {
            let _ = writeln!(s, "listen: {l}");
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------------
// The running agent
// ---------------------------------------------------------------------------------------------------

/// The `egress-gateway` binary if it has the `node` subcommand (`node --help` succeeds); otherwise why
/// not. Tests skip on `Err` ([`require_node_agent!`](crate::require_node_agent)).
pub fn node_agent_binary() -> Result<PathBuf> {
    let bin = crate::gateway::gateway_binary()?;
    let path = bin.to_string_lossy().into_owned();
    let out = crate::cmd::output(&path, &["node", "--help"])?;
    if !out.status.success() {
        crate::bail!(
            "{path} has no `node` subcommand yet (`node --help` exited with {})",
            out.status
        );
    }
    Ok(bin)
}

/// Skips (returns from) the calling test unless the `egress-gateway` binary has the `node` subcommand (fails
/// instead with `EGRESS_REQUIRE_NETNS=1`); evaluates to the binary.
#[macro_export]
macro_rules! require_node_agent {
    () => {
        match $crate::agent::node_agent_binary() {
            Ok(binary) => binary,
            Err(why) => {
                if std::env::var("EGRESS_REQUIRE_NETNS").as_deref() == Ok("1") {
                    panic!(
                        "{}: the node agent is required but unusable: {why}",
                        $crate::privilege::current_test_name()
                    );
                }
                println!("SKIPPED {}: {why}", $crate::privilege::current_test_name());
                return;
            }
        }
    };
}

/// `egress-gateway node --config <dir>/agent-node<n>.yaml` running in node n's namespace. Dropping it
/// stops it (SIGTERM, then SIGKILL after 2 s; the log tail is printed if a test is failing). Drop it before
/// the topology (declare it after).
#[derive(Debug)]
pub struct NodeAgent {
    process: Option<Process>,
    binary: PathBuf,
    node: usize,
    ns_name: String,
    config: AgentConfig,
    config_path: PathBuf,
    dir: PathBuf,
    /// Restarts so far: each incarnation logs to a file of its own.
    restarts: usize,
}

impl NodeAgent {
    /// Writes `config` to `<topology dir>/agent-node<n>.yaml` and starts `binary node --config …` in node
    /// `n`'s namespace (log `agent-node<n>.log`; after the k-th restart `agent-node<n>-<k>.log`). Does not wait: see [`wait_ready`](Self::wait_ready).
    pub fn start(topo: &Topology, binary: &Path, n: usize, config: AgentConfig) -> Result<Self> {
        let dir = topo.dir().to_path_buf();
        let config_path = dir.join(format!("agent-node{n}.yaml"));
        std::fs::write(&config_path, config.yaml())
            .with_context(|| format!("write {}", config_path.display()))?;
        let mut agent = Self {
            process: None,
            binary: binary.to_path_buf(),
            node: n,
            ns_name: topo.node(n).ns.name().to_owned(),
            config,
            config_path,
            dir,
            restarts: 0,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = self.binary.to_string_lossy().into_owned();
        let cfg = self.config_path.to_string_lossy().into_owned();
        let log = self.log_path();
        let p = Process::spawn_in_netns(&self.ns_name, &[&bin, "node", "--config", &cfg], log)
            .with_context(|| format!("start the node agent on node {}", self.node))?;
        self.process = Some(p);
        Ok(())
    }

    /// Starts it again after [`stop`](Self::stop) (same configuration; this incarnation logs to a file of its
    /// own, `agent-node<n>-<k>.log`).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.restarts += 1;
        self.spawn()
    }

    /// Polls `GET /readiness` on the `listen` address (from inside the node) every 50 ms until 200. Fails
    /// at once, with the log tail, if the process exits; after `timeout` with the last answer.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.process.as_mut() {
                if let Some(status) = p.try_wait()? {
                    crate::bail!(
                        "the node agent on node {} exited ({status}) before it was ready; log tail:\n{}",
                        self.node,
                        p.log_tail(40)
                    );
                }
            } else {
                crate::bail!("the node agent on node {} is not running", self.node);
            }
            let last = match self.readiness() {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                crate::bail!(
                    "the node agent on node {} is not ready after {timeout:?} (GET /readiness: {last}); log tail:\n{}",
                    self.node,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /readiness` (status, body).
    pub fn readiness(&self) -> Result<(u16, String)> {
        self.get("/readiness")
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics_text(&self) -> Result<String> {
        match self.get("/metrics")? {
            (200, body) => Ok(body),
            (code, body) => Err(Error::msg(format!("GET /metrics: HTTP {code}: {body}"))),
        }
    }

    /// An HTTP GET to the agent's `listen` address from inside its node.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let Some(addr) = self.config.listen else {
            crate::bail!("the agent's configuration has no `listen`");
        };
        let path = path.to_owned();
        netns::spawn_in(&self.ns_name, move || http_get(addr, &path))?
            .join_timeout(Duration::from_secs(5))?
    }

    /// The process id, while it runs (it must not change across a live policy edit).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|p| matches!(p.try_wait(), Ok(None)))
    }

    /// The current incarnation's log.
    fn log_path(&self) -> PathBuf {
        match self.restarts {
            0 => self.dir.join(format!("agent-node{}.log", self.node)),
            k => self.dir.join(format!("agent-node{}-{k}.log", self.node)),
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_else(|| crate::process::tail(&self.log_path(), lines))
    }

    /// Its configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Its configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The node it runs on.
    pub fn node(&self) -> usize {
        self.node
    }

    /// Replaces its first input file with `inventory` (atomic rename: the agent never reads half a file).
    pub fn write_inventory(&self, inventory: &Inventory) -> Result<()> {
        let Some(path) = self.config.inputs.first() else {
            crate::bail!("the agent's configuration has no inputs");
        };
        inventory.write(path)
    }

    /// Stops it with SIGTERM (SIGKILL after 5 s); how it ended. The agent leaves its routing in place.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.process
            .take()
            .and_then(|mut p| p.stop(Duration::from_secs(5)))
    }

    /// Sends `signal` to the running agent.
    pub fn signal(&self, signal: i32) {
        if let Some(p) = &self.process {
            p.signal(signal);
        }
    }

    /// Runs `egress-gateway node --config FILE --cleanup` in the node (at most 30 s): its output, or an
    /// error with the output if it failed.
    pub fn cleanup(&self) -> Result<String> {
        let bin = self.binary.to_string_lossy().into_owned();
        let cfg = self.config_path.to_string_lossy().into_owned();
        let log = self
            .dir
            .join(format!("agent-node{}-cleanup.log", self.node));
        let mut p = Process::spawn_in_netns(
            &self.ns_name,
            &[&bin, "node", "--config", &cfg, "--cleanup"],
            log,
        )?;
        let status = p.wait_timeout(Duration::from_secs(30))?;
        let out = p.log_text();
        if !status.success() {
            crate::bail!(
                "`{} node --config {cfg} --cleanup` exited with {status}:\n{out}",
                bin
            );
        }
        Ok(out)
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            if std::thread::panicking() {
                // Process's own drop prints the tail too, but only of a process it still has; say which
                // agent this is.
                eprintln!("---- node agent on node {}:", self.node);
            }
            p.stop(Duration::from_secs(2));
            drop(p);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Reading what the agent programmed
// ---------------------------------------------------------------------------------------------------

/// The table of the `from <ip> lookup <table> priority <priority>` rule in `ns`, if there is one.
pub fn rule_table(ns: &Netns, ip: IpAddr, priority: u32) -> Result<Option<u32>> {
    let family = if ip.is_ipv4() { "-4" } else { "-6" };
    let out = ns.ip(&format!("{family} rule show"))?;
    Ok(parse_rule_table(&out, ip, priority))
}

fn parse_rule_table(text: &str, ip: IpAddr, priority: u32) -> Option<u32> {
    let prefix = format!("{priority}:");
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        if w.next()? != prefix {
            return None;
        }
        let words: Vec<&str> = w.collect();
        let from = words.iter().position(|x| *x == "from")?;
        let src = words.get(from + 1)?;
        if *src != ip.to_string() && *src != format!("{ip}/32") && *src != format!("{ip}/128") {
            return None;
        }
        let t = words.iter().position(|x| *x == "lookup" || *x == "table")?;
        words.get(t + 1)?.parse().ok()
    })
}

/// What a route in a table does, as `ip route show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteShape {
    /// `throw`.
    Throw,
    /// `unreachable` (or `prohibit` / `blackhole`).
    Unreachable,
    /// Through these next hops (one, or several of a multipath route).
    Via(Vec<IpAddr>),
}

/// The route to `dst` (`default` for 0.0.0.0/0 and ::/0) in `table` of `ns`, if any.
pub fn table_route(ns: &Netns, table: u32, dst: IpNet) -> Result<Option<RouteShape>> {
    let family = if matches!(dst, IpNet::V4(_)) {
        "-4"
    } else {
        "-6"
    };
    let out = ns.ip(&format!("{family} route show table {table}"))?;
    Ok(parse_route(&out, dst))
}

fn parse_route(text: &str, dst: IpNet) -> Option<RouteShape> {
    let want = if dst.prefix_len() == 0 {
        "default".to_owned()
    } else {
        dst.to_string()
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let words: Vec<&str> = lines[i].split_whitespace().collect();
        let (kind, target) = match words.first() {
            Some(&k @ ("throw" | "unreachable" | "prohibit" | "blackhole")) => {
                (Some(k), words.get(1).copied())
            }
            first => (None, first.copied()),
        };
        // A host route prints without its /32 or /128.
        let matches = target.is_some_and(|t| {
            t == want || (dst.prefix_len() == dst.max_prefix_len() && t == dst.addr().to_string())
        });
        if !matches {
            i += 1;
            continue;
        }
        return Some(match kind {
            Some("throw") => RouteShape::Throw,
            Some(_) => RouteShape::Unreachable,
            None => {
                let mut hops = via_addrs(&words);
                // Multipath: the `nexthop` lines that follow (indented).
                let mut j = i + 1;
                while j < lines.len() && lines[j].starts_with(char::is_whitespace) {
                    let w: Vec<&str> = lines[j].split_whitespace().collect();
                    hops.extend(via_addrs(&w));
                    j += 1;
                }
                RouteShape::Via(hops)
            }
        });
    }
    None
}

/// The nexthop group the route to `dst` in `table` of `ns` points at (`nhid N`), if it does.
pub fn route_nhid(ns: &Netns, table: u32, dst: IpNet) -> Result<Option<u32>> {
    let family = if matches!(dst, IpNet::V4(_)) {
        "-4"
    } else {
        "-6"
    };
    let out = ns.ip(&format!("-o {family} route show table {table} {dst}"))?;
    Ok(parse_nhid(&out))
}

fn parse_nhid(text: &str) -> Option<u32> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "nhid")?;
    words.get(at + 1)?.parse().ok()
}

fn via_addrs(words: &[&str]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if *w == "via" {
            // `via inet6 fe80::…` for a v6 next hop of a v4 route; plain `via ADDR` otherwise.
            let mut a = words.get(i + 1).copied();
            if matches!(a, Some("inet" | "inet6")) {
                a = words.get(i + 2).copied();
            }
            if let Some(ip) = a.and_then(|a| a.parse().ok()) {
                out.push(ip);
            }
        }
    }
    out
}

/// Everything the agent may have made on a node, for failure messages: rules, routes with protocol 242,
/// the vxlan device, its neighbours and FDB.
pub fn node_state(ns: &Netns) -> String {
    let mut s = String::new();
    for args in [
        "-4 rule show",
        "-6 rule show",
        "-4 route show table all proto 242",
        "-6 route show table all proto 242",
        "-d link show dev egress.calico",
        "neigh show dev egress.calico",
        "nexthop show",
    ] {
        let out = ns.ip(args).unwrap_or_else(|e| e.to_string());
        let _ = writeln!(s, "$ ip {args}\n{}", out.trim_end());
    }
    let fdb = crate::cmd::run(
        "bridge",
        &["-n", ns.name(), "fdb", "show", "dev", NODE_VXLAN_DEV],
    )
    .unwrap_or_else(|e| e.to_string());
    let _ = writeln!(s, "$ bridge fdb show dev egress.calico\n{}", fdb.trim_end());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{pod_ip, pod_ip6, BLUE_NET, LOCAL_NET, RED_NET, RED_NET6};

    fn pod_ips(n: usize, m: usize) -> Vec<IpAddr> {
        vec![IpAddr::V4(pod_ip(n, m)), IpAddr::V6(pod_ip6(n, m))]
    }

    fn seed() -> Inventory {
        let mut inv = Inventory::new();
        inv.policy(Policy::new(
            "red-blue",
            vec![
                PolicyRule::via(BLUE_NET, "red").described("legacy firewall: red egress IP"),
                PolicyRule::via(RED_NET, "blue"),
                PolicyRule::via(RED_NET6, "blue"),
                PolicyRule::no_gateway(LOCAL_NET).described("local: \"no\" gateway"),
                PolicyRule::via_gateways(
                    IpNet::from(ipnet::Ipv4Net::default()),
                    GatewayRef::code("red").max_next_hops(1),
                ),
            ],
        ))
        .namespace_with_policy("app", "red-blue")
        .namespace("other")
        .client_pod_at("app", "client", 1, pod_ips(1, 1))
        .client_pod_at("other", "plain", 1, pod_ips(1, 2))
        .gateway_pod(1, "red", true)
        .gateway_pod(2, "blue", true);
        inv
    }

    #[test]
    fn inventory_yaml_shape() {
        let yaml = seed().to_yaml();
        for want in [
            "kind: EgressGatewayPolicy",
            "  - description: \"legacy firewall: red egress IP\"\n    destination:\n      cidr: \"192.0.2.0/24\"\n    gateway:\n      selector: \"egress-code == 'red'\"\n      namespaceSelector: \"projectcalico.org/name == 'egress'\"\n",
            "maxNextHops: 1",
            "\"egress.projectcalico.org/egressGatewayPolicy\": \"red-blue\"",
            "  podIP: \"10.244.1.1\"\n  podIPs:\n  - ip: \"10.244.1.1\"\n  - ip: \"fd00:244:1::1\"\n",
            "  - ip: \"fd00:18::3\"",
            "nodeName: \"node1\"",
            "hostIP: \"172.18.0.11\"",
            "\\\"no\\\" gateway",
        ] {
            assert!(yaml.contains(want), "missing {want:?} in\n{yaml}");
        }
    }

    /// Any built `egress-gateway` (release or debug) for the offline checks.
    fn any_binary() -> Option<PathBuf> {
        if let Ok(b) = crate::gateway::gateway_binary() {
            return Some(b);
        }
        let debug = crate::gateway::workspace_root().join("target/debug/egress-gateway");
        debug.is_file().then_some(debug)
    }

    /// `egress-gateway check` accepts what the builder writes (and the agent configuration), and `explain`
    /// reads the inventory as meant.
    #[test]
    fn inventory_passes_egress_gateway_check() {
        let Some(bin) = any_binary() else {
            if std::env::var("EGRESS_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("no egress-gateway binary: cargo build --release -p gateway");
            }
            println!("SKIPPED inventory_passes_egress_gateway_check: no egress-gateway binary");
            return;
        };
        let dir =
            crate::process::TempDir::new(&format!("{}-inventory", netns::unique_prefix())).unwrap();
        let file = dir.path().join("inventory.yaml");
        let mut inv = seed();
        // A namespace naming a policy that does not exist: a warning, not an error.
        inv.namespace_with_policy("locked", "does-not-exist");
        inv.write(&file).unwrap();
        let bin = bin.to_string_lossy().into_owned();
        let path = file.to_string_lossy().into_owned();
        let out = crate::cmd::output(&bin, &["check", &path]).unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "check failed:\n{stdout}{stderr}\n{}",
            inv.to_yaml()
        );
        assert!(
            stdout.contains("ok (1 policies, 4 namespaces, 4 pods)"),
            "{stdout}{stderr}"
        );
        assert!(stderr.contains("does-not-exist"), "{stdout}{stderr}");
        let explain = |dst: &str| {
            let out = crate::cmd::output(
                &bin,
                &[
                    "explain",
                    "--inputs",
                    &path,
                    "--pod",
                    "app/client",
                    "--dst",
                    dst,
                ],
            )
            .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        };
        let red = explain("192.0.2.10");
        assert!(
            red.contains("egress/gw1") && red.contains("172.18.0.3"),
            "{red}"
        );
        let blue = explain("198.51.100.10");
        assert!(
            blue.contains("egress/gw2") && blue.contains("172.18.0.4"),
            "{blue}"
        );
        let blue6 = explain("2001:db8:100::10");
        assert!(blue6.contains("egress/gw2"), "{blue6}");
        // The agent's configuration passes the agent's own (strict) reader too.
        let config = dir.path().join("agent.yaml");
        std::fs::write(&config, AgentConfig::for_node(1, vec![file.clone()]).yaml()).unwrap();
        let out = crate::cmd::output(&bin, &["check", &config.to_string_lossy()]).unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("node agent for node1"),
            "{text}"
        );
        let local = explain("172.16.1.10");
        assert!(
            local.contains("NoGateway") || local.contains("no gateway"),
            "{local}"
        );
    }

    #[test]
    fn agent_config_yaml() {
        let c = AgentConfig::for_node(1, vec![PathBuf::from("/tmp/x/inventory.yaml")]);
        assert_eq!(
            c.yaml(),
            "node_name: \"node1\"
underlay_ip: 172.18.0.11
vxlan: { device: \"egress.calico\", vni: 4097, port: 4790, mtu: 1450 }
rule_priority: 100
tables: { first: 200, last: 1200 }
cluster_cidrs: [10.244.0.0/16, 172.18.0.0/16, \"fd00:244::/32\"]
inputs: [\"/tmp/x/inventory.yaml\"]
health: { port: 8080, path: /readiness, interval: 200ms, timeout: 150ms, failures: 2 }
listen: 127.0.0.1:9101
"
        );
    }

    #[test]
    fn rules_and_routes_parse() {
        let rules = "0:\tfrom all lookup local\n100:\tfrom 10.244.1.1 lookup 200 proto 242\n100:\tfrom 10.244.1.2 lookup 201 proto 242\n32766:\tfrom all lookup main\n";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(parse_rule_table(rules, ip("10.244.1.2"), 100), Some(201));
        assert_eq!(parse_rule_table(rules, ip("10.244.1.3"), 100), None);
        assert_eq!(parse_rule_table(rules, ip("10.244.1.1"), 101), None);
        let routes = "default proto 242 \n\tnexthop via 172.18.0.3 dev egress.calico weight 1 onlink \n\tnexthop via 172.18.0.4 dev egress.calico weight 1 onlink \nthrow 10.244.0.0/16 proto 242 \nunreachable 192.0.2.0/24 proto 242 \n198.51.100.0/24 via 172.18.0.4 dev egress.calico proto 242 onlink \n";
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            parse_route(routes, net("0.0.0.0/0")),
            Some(RouteShape::Via(vec![ip("172.18.0.3"), ip("172.18.0.4")]))
        );
        assert_eq!(
            parse_route(routes, net("10.244.0.0/16")),
            Some(RouteShape::Throw)
        );
        assert_eq!(
            parse_route(routes, net("192.0.2.0/24")),
            Some(RouteShape::Unreachable)
        );
        assert_eq!(
            parse_route(routes, net("198.51.100.0/24")),
            Some(RouteShape::Via(vec![ip("172.18.0.4")]))
        );
        assert_eq!(parse_route(routes, net("203.0.113.0/24")), None);
        // A route on a resilient group: `ip` prints the group's members under it.
        let group = "default nhid 4076994566 proto 242 \n\tnexthop via 172.18.0.3 dev egress.calico weight 1 onlink \n\tnexthop via 172.18.0.4 dev egress.calico weight 1 onlink \n";
        assert_eq!(
            parse_route(group, net("0.0.0.0/0")),
            Some(RouteShape::Via(vec![ip("172.18.0.3"), ip("172.18.0.4")]))
        );
        assert_eq!(parse_nhid(group), Some(4_076_994_566));
        assert_eq!(parse_nhid(routes), None);
    }
}
