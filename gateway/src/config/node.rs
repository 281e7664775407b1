//! The node agent's configuration file (`egress-gateway node --config FILE`): YAML in, a validated
//! [`NodeConfig`] out, or every problem as `file:line: problem`. `docs/node-agent.md` describes every key.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use marked_yaml::Node;

use super::decode::MAX_VNI;
use super::reader::{self, Reader, Value};
use super::{value, ConfigErrors, LogFormat};

pub(super) const ROOT_KEYS: &[&str] = &[
    "node_name",
    "underlay_ip",
    "underlay_device",
    "vxlan",
    "rule_priority",
    "tables",
    "cluster_cidrs",
    "inputs",
    "kubernetes",
    "health",
    "resync",
    "listen",
    "log",
];
pub(super) const VXLAN_KEYS: &[&str] = &["device", "vni", "port", "mtu"];
pub(super) const KUBERNETES_KEYS: &[&str] = &["kubeconfig", "gateway_selector"];
pub(super) const TABLES_KEYS: &[&str] = &["first", "last"];
pub(super) const HEALTH_KEYS: &[&str] = &[
    "protocol",
    "port",
    "path",
    "interval",
    "timeout",
    "failures",
    "successes",
];

/// Tables the kernel reserves (`default`, `main`, `local`) and 0 (unspecified): never used, even inside
/// `tables`.
pub(crate) const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

/// A validated node agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeConfig {
    /// The file it was read from.
    pub(crate) path: PathBuf,
    /// `node_name`: pods whose `spec.nodeName` is this are this node's.
    pub(crate) node_name: String,
    /// `underlay_ip`: the vxlan device's local address.
    pub(crate) underlay_ip: Ipv4Addr,
    /// `underlay_device`: the device holding `underlay_ip` (found by address when absent).
    pub(crate) underlay_device: Option<String>,
    /// `vxlan`: the device the agent creates.
    pub(crate) vxlan: VxlanSettings,
    /// `rule_priority`: priority of the per-pod ip rules.
    pub(crate) rule_priority: u32,
    /// `tables`: the route tables the agent may use, one per opted-in pod.
    pub(crate) tables: RangeInclusive<u32>,
    /// `cluster_cidrs`: destinations never steered to a gateway (pods, services, nodes).
    pub(crate) cluster_cidrs: Vec<IpNet>,
    /// `inputs`: files or directories of Kubernetes YAML (absolute, or relative to the config file); may be
    /// empty when `kubernetes` is set.
    pub(crate) inputs: Vec<PathBuf>,
    /// `kubernetes`: watch the API server for pods, namespaces and policies.
    pub(crate) kubernetes: Option<KubernetesSettings>,
    /// `health`: how gateways are probed.
    pub(crate) health: HealthSettings,
    /// `resync`: how often the kernel is compared with the desired state even when nothing changed.
    pub(crate) resync: Duration,
    /// `listen`: `/readiness`, `/livez` and `/metrics` of the agent, when set.
    pub(crate) listen: Option<SocketAddr>,
    /// `log.format`.
    pub(crate) log_format: LogFormat,
}

/// The `vxlan` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VxlanSettings {
    /// Device name.
    pub(crate) device: String,
    /// VXLAN network identifier.
    pub(crate) vni: u32,
    /// UDP port of the gateways' tunnel.
    pub(crate) port: u16,
    /// Device MTU.
    pub(crate) mtu: u32,
}

/// The `kubernetes` section: where the API server is and which pods are gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KubernetesSettings {
    /// `kubeconfig`: a kubeconfig file (its current context); `None` means `$KUBECONFIG` or
    /// `~/.kube/config` when present, else the pod's service account (in-cluster).
    pub(crate) kubeconfig: Option<PathBuf>,
    /// `gateway_selector`: the Kubernetes label selector that marks gateway pods, watched cluster-wide.
    pub(crate) gateway_selector: String,
}

/// Default `kubernetes.gateway_selector`: the label deploy/gateway's pods carry.
pub(crate) const DEFAULT_GATEWAY_SELECTOR: &str = "egress-gateway/gateway=true";

/// `health.protocol`: how a gateway is asked whether it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeProtocol {
    /// One 16-byte UDP datagram each way (`gateway/src/probe.rs`).
    Udp,
    /// `GET path` over a new TCP connection.
    Http,
}

/// The `health` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthSettings {
    /// `udp` (default) or `http`.
    pub(crate) protocol: ProbeProtocol,
    /// Port of the gateways' health endpoint.
    pub(crate) port: u16,
    /// Its path.
    pub(crate) path: String,
    /// Time between probes of one gateway.
    pub(crate) interval: Duration,
    /// How long one probe may take.
    pub(crate) timeout: Duration,
    /// Consecutive failed probes that take a gateway out.
    pub(crate) failures: u32,
    /// Consecutive good probes that bring it back.
    pub(crate) successes: u32,
}

impl Default for VxlanSettings {
    fn default() -> Self {
        VxlanSettings {
            device: "egress.calico".into(),
            vni: 4097,
            port: 4790,
            mtu: 1450,
        }
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            protocol: ProbeProtocol::Udp,
            port: 8080,
            path: "/readiness".into(),
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(150),
            failures: 2,
            successes: 1,
        }
    }
}

/// Default `rule_priority` (Felix's).
const DEFAULT_PRIORITY: u32 = 100;
/// Default `tables`.
const DEFAULT_TABLES: RangeInclusive<u32> = 200..=1200;
/// Default `resync`.
const DEFAULT_RESYNC: Duration = Duration::from_secs(10);

impl NodeConfig {
    /// Reads and validates; on failure every problem found, each `file:line: problem`.
    pub(crate) fn load(path: &Path, overrides: &Overrides) -> Result<NodeConfig, ConfigErrors> {
        NodeConfig::parse(&super::read_file(path)?, path, overrides)
    }

    /// Parses from a string, `name` used in messages as the file name and to resolve relative inputs.
    pub(crate) fn parse(
        text: &str,
        name: &Path,
        overrides: &Overrides,
    ) -> Result<NodeConfig, ConfigErrors> {
        let root = reader::parse_yaml(text, name).map_err(|e| ConfigErrors(vec![e]))?;
        let mut config = super::decode_all(name, |r| decode(r, &root, overrides))?;
        let base = name.parent().unwrap_or(Path::new(""));
        for input in &mut config.inputs {
            if input.is_relative() {
                *input = base.join(&*input);
            }
        }
        Ok(NodeConfig {
            path: name.to_owned(),
            ..config
        })
    }
}

/// Values given on the command line (`--node-name`, `--underlay-ip`), which win over the file's: one
/// configuration serves every node of a DaemonSet, each filling these in from the downward API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Overrides {
    /// `--node-name`.
    pub(crate) node_name: Option<String>,
    /// `--underlay-ip`.
    pub(crate) underlay_ip: Option<Ipv4Addr>,
}

fn decode(r: &mut Reader<'_>, root: &Node, overrides: &Overrides) -> Option<NodeConfig> {
    let root = Value::root(root);
    let top = r.mapping(&root, ROOT_KEYS)?;
    let node_name = match overrides.node_name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => Some(name.to_string()),
        _ => top.require(r, "node_name").and_then(|v| {
            r.parse(&v, |s| {
                if s.trim().is_empty() {
                    Err(
                        "the node's name is empty; use its Kubernetes name (spec.nodeName of its pods), \
                         or give --node-name"
                            .into(),
                    )
                } else {
                    Ok(s.trim().to_string())
                }
            })
        }),
    };
    let underlay_ip = match overrides.underlay_ip {
        Some(ip) => Some(ip),
        None => top.require(r, "underlay_ip").and_then(|v| {
            r.parse(&v, |s| match value::unicast_ip(s)? {
                IpAddr::V4(a) => Ok(a),
                IpAddr::V6(a) => Err(format!(
                    "{a} is IPv6; the tunnel runs over IPv4 (the gateways' pod IPs), give the node's IPv4 address"
                )),
            })
        }),
    };
    let underlay_device = match top.get("underlay_device") {
        None => Some(None),
        Some(v) => r.parse(&v, value::interface_name).map(Some),
    };
    let vxlan = top
        .get("vxlan")
        .map_or(Some(VxlanSettings::default()), |v| vxlan(r, &v));
    let rule_priority = top
        .get("rule_priority")
        .map_or(Some(DEFAULT_PRIORITY), |v| {
            r.integer(
                &v,
                1..=32_765,
                " (0 is the local table's rule, 32766 and 32767 main's and default's)",
            )
        });
    let tables = top
        .get("tables")
        .map_or(Some(DEFAULT_TABLES), |v| tables(r, &v));
    let cluster_cidrs = match top.get("cluster_cidrs") {
        None => Some(Vec::new()),
        Some(v) => r
            .parse_list(&v, value::cidr)
            .map(|l| l.into_iter().map(|(n, _)| n).collect()),
    };
    let kubernetes = match top.get("kubernetes") {
        None => Some(None),
        Some(v) => kubernetes(r, &v).map(Some),
    };
    let inputs = match top.get("inputs") {
        None if top.get("kubernetes").is_some() => Some(Vec::new()),
        None => {
            r.error(
                top.line(),
                "missing `inputs` (files or directories of EgressGatewayPolicies, Namespaces and Pods) and \
                 `kubernetes` (watch the API server): give at least one"
                    .to_string(),
            );
            None
        }
        Some(v) => inputs(r, &v).and_then(|items| {
            if items.is_empty() && top.get("kubernetes").is_none() {
                r.error(
                    v.line(),
                    format!(
                        "{}: the list is empty, so the agent would know no policy or pod; list the files or \
                         directories holding the EgressGatewayPolicies, Namespaces and Pods, or set `kubernetes`",
                        v.path()
                    ),
                );
                return None;
            }
            Some(items)
        }),
    };
    let health = top
        .get("health")
        .map_or(Some(HealthSettings::default()), |v| health(r, &v));
    let resync = top.get("resync").map_or(Some(DEFAULT_RESYNC), |v| {
        duration_in(r, &v, Duration::from_secs(1)..=Duration::from_secs(3600))
    });
    let listen = match top.get("listen") {
        None => Some(None),
        Some(v) => r.parse(&v, value::socket_addr).map(Some),
    };
    let log_format = top
        .get("log")
        .map_or(Some(LogFormat::Text), |v| super::decode::log(r, &v));
    Some(NodeConfig {
        path: PathBuf::new(),
        node_name: node_name?,
        underlay_ip: underlay_ip?,
        underlay_device: underlay_device?,
        vxlan: vxlan?,
        rule_priority: rule_priority?,
        tables: tables?,
        cluster_cidrs: cluster_cidrs?,
        inputs: inputs?,
        kubernetes: kubernetes?,
        health: health?,
        resync: resync?,
        listen: listen?,
        log_format: log_format?,
    })
}

fn inputs(r: &mut Reader<'_>, v: &Value<'_>) -> Option<Vec<PathBuf>> {
    let items = r.parse_list(v, |s| {
        if s.trim().is_empty() {
            Err("an empty path".to_string())
        } else {
            Ok(PathBuf::from(s))
        }
    })?;
    Some(items.into_iter().map(|(p, _)| p).collect())
}

fn kubernetes(r: &mut Reader<'_>, v: &Value<'_>) -> Option<KubernetesSettings> {
    let m = r.mapping(v, KUBERNETES_KEYS)?;
    let kubeconfig = match m.get("kubeconfig") {
        None => Some(None),
        Some(v) => r.parse(&v, value::kubeconfig).map(Some),
    };
    let gateway_selector = m
        .get("gateway_selector")
        .map_or(Some(DEFAULT_GATEWAY_SELECTOR.to_string()), |v| {
            r.parse(&v, label_selector)
        });
    Some(KubernetesSettings {
        kubeconfig: kubeconfig?,
        gateway_selector: gateway_selector?,
    })
}

/// A Kubernetes label selector (`key=value`, `key!=value`, `key`, `!key`, `key in (a,b)`, comma-separated):
/// checked for what it may contain; the API server checks the rest when the agent watches with it.
pub(crate) fn label_selector(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(format!(
            "an empty selector would watch every pod of the cluster; use the label the gateway pods carry, e.g. \
             {DEFAULT_GATEWAY_SELECTOR}"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_./=!,() ".contains(*c)))
    {
        return Err(format!(
            "`{s}`: `{c}` cannot appear in a Kubernetes label selector (write e.g. {DEFAULT_GATEWAY_SELECTOR})"
        ));
    }
    Ok(s.to_string())
}

fn vxlan(r: &mut Reader<'_>, v: &Value<'_>) -> Option<VxlanSettings> {
    let m = r.mapping(v, VXLAN_KEYS)?;
    let d = VxlanSettings::default();
    let device = m
        .get("device")
        .map_or(Some(d.device), |v| r.parse(&v, value::interface_name));
    let vni = m.get("vni").map_or(Some(d.vni), |v| {
        r.integer(&v, 0..=MAX_VNI, " (a VNI has 24 bits; Calico uses 4097)")
    });
    let port = m.get("port").map_or(Some(d.port), |v| {
        r.integer(&v, 1..=65_535, " (Calico uses 4790)")
    });
    let mtu = m.get("mtu").map_or(Some(d.mtu), |v| {
        r.integer(&v, 576..=9000, " (underlay MTU − 50)")
    });
    Some(VxlanSettings {
        device: device?,
        vni: vni?,
        port: port?,
        mtu: mtu?,
    })
}

fn tables(r: &mut Reader<'_>, v: &Value<'_>) -> Option<RangeInclusive<u32>> {
    let m = r.mapping(v, TABLES_KEYS)?;
    let first_value = m.require(r, "first")?;
    let first: u32 = r.integer(&first_value, 1..=u64::from(u32::MAX), "")?;
    let last_value = m.require(r, "last")?;
    let last: u32 = r.integer(&last_value, 1..=u64::from(u32::MAX), "")?;
    if first > last {
        r.error(
            last_value.line(),
            format!(
                "{}: {last} is below tables.first ({first}); the range is first..=last",
                last_value.path()
            ),
        );
        return None;
    }
    let usable = u64::from(last - first) + 1
        - RESERVED_TABLES
            .iter()
            .filter(|t| (first..=last).contains(t))
            .count() as u64;
    if usable == 0 {
        r.error(
            m.line(),
            format!(
                "{}: the range {first}..={last} holds only tables the kernel reserves (0, 253 default, 254 main, \
                 255 local); use e.g. 200..=1200 (reserved ones are skipped)",
                v.path()
            ),
        );
        return None;
    }
    Some(first..=last)
}

fn health(r: &mut Reader<'_>, v: &Value<'_>) -> Option<HealthSettings> {
    let m = r.mapping(v, HEALTH_KEYS)?;
    let d = HealthSettings::default();
    let protocol = m.get("protocol").map_or(Some(d.protocol), |v| {
        r.parse(&v, |s| match s {
            "udp" => Ok(ProbeProtocol::Udp),
            "http" => Ok(ProbeProtocol::Http),
            other => Err(format!(
                "`{other}` is not a probe protocol; use udp or http"
            )),
        })
    });
    let port = m
        .get("port")
        .map_or(Some(d.port), |v| r.integer(&v, 1..=65_535, ""));
    let path = m.get("path").map_or(Some(d.path), |v| {
        r.parse(&v, |s| {
            if s.starts_with('/') && !s.contains(char::is_whitespace) {
                Ok(s.to_string())
            } else {
                Err(format!("`{s}` is not an HTTP path; write e.g. /readiness"))
            }
        })
    });
    let interval = m.get("interval").map_or(Some(d.interval), |v| {
        duration_in(r, &v, Duration::from_millis(10)..=Duration::from_secs(60))
    });
    let timeout_value = m.get("timeout");
    let timeout = timeout_value.as_ref().map_or(Some(d.timeout), |v| {
        duration_in(r, v, Duration::from_millis(1)..=Duration::from_secs(60))
    });
    let failures = m
        .get("failures")
        .map_or(Some(d.failures), |v| r.integer(&v, 1..=100, ""));
    let successes = m
        .get("successes")
        .map_or(Some(d.successes), |v| r.integer(&v, 1..=100, ""));
    let (interval, timeout) = (interval?, timeout?);
    // Without an explicit timeout, a long interval gets a proportionate one.
    let timeout = match timeout_value {
        None if interval > d.interval => interval.mul_f32(0.75),
        _ => timeout,
    };
    Some(HealthSettings {
        protocol: protocol?,
        port: port?,
        path: path?,
        interval,
        timeout,
        failures: failures?,
        successes: successes?,
    })
}

fn duration_in(
    r: &mut Reader<'_>,
    v: &Value<'_>,
    range: RangeInclusive<Duration>,
) -> Option<Duration> {
    let d = r.parse(v, value::duration)?;
    if range.contains(&d) {
        Some(d)
    } else {
        r.error(
            v.line(),
            format!(
                "{}: {d:?} is out of range; use {:?} to {:?}",
                v.path(),
                range.start(),
                range.end()
            ),
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, String> {
        NodeConfig::parse(
            text,
            Path::new("/etc/egress/node.yaml"),
            &Overrides::default(),
        )
        .map_err(|e| e.to_string())
    }

    const FULL_EXAMPLE: &str = "node_name: node-a
underlay_ip: 172.18.0.2
vxlan: { device: egress.calico, vni: 4097, port: 4790, mtu: 1450 }
rule_priority: 100
tables: { first: 200, last: 1200 }
inputs: [/etc/egress/policies.yaml, /etc/egress/cluster.yaml]
health: { port: 8080, path: /readiness, interval: 200ms, failures: 2 }
";

    #[test]
    fn the_documented_example_parses() {
        let c = parse(FULL_EXAMPLE).unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.underlay_ip, Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(c.vxlan, VxlanSettings::default());
        assert_eq!(c.tables, 200..=1200);
        assert_eq!(c.health, HealthSettings::default());
        assert_eq!(c.inputs.len(), 2);
        assert_eq!(c.resync, DEFAULT_RESYNC);
        assert_eq!(c.listen, None);
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node.yaml"));
        let c = NodeConfig::load(path, &Overrides::default()).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:9101".parse().unwrap()));
        assert!(c.inputs[0].ends_with("examples/seed-inventory.yaml"));
        assert!(c.inputs[0].exists());
    }

    #[test]
    fn defaults_and_relative_inputs() {
        let c = parse("node_name: n\nunderlay_ip: 10.0.0.1\ninputs: [inv, /abs.yaml]\n").unwrap();
        assert_eq!(c.rule_priority, 100);
        assert_eq!(c.inputs[0], PathBuf::from("/etc/egress/inv"));
        assert_eq!(c.inputs[1], PathBuf::from("/abs.yaml"));
        let c =
            parse("node_name: n\nunderlay_ip: 10.0.0.1\ninputs: [a]\nhealth: { interval: 2s }\n")
                .unwrap();
        assert_eq!(c.health.timeout, Duration::from_millis(1500));
    }

    #[test]
    fn every_problem_with_its_line() {
        let e = parse(
            "node_name: ''\nunderlay_ip: fd00::1\ntables: { first: 253, last: 255 }\n\
             vxlan: { devise: x }\nhealth: { interval: 5ms, path: readiness }\ninputs: []\nrule_priority: 0\n",
        )
        .unwrap_err();
        for want in [
            "node.yaml:1: node_name: the node's name is empty",
            "node.yaml:2: underlay_ip: fd00::1 is IPv6",
            "node.yaml:3: tables: the range 253..=255 holds only tables the kernel reserves",
            "node.yaml:4: unknown key `devise` in vxlan; did you mean `device`?",
            "node.yaml:5: health.interval: 5ms is out of range",
            "node.yaml:5: health.path: `readiness` is not an HTTP path",
            "node.yaml:6: inputs: the list is empty",
            "node.yaml:7: rule_priority: 0 is out of range",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
        let e = parse("node_name: n\nunderlay_ip: 10.0.0.1\n").unwrap_err();
        assert!(e.contains("inputs"), "{e}");
    }

    #[test]
    fn optional_keys() {
        let c = parse(
            "node_name: n\nunderlay_ip: 10.0.0.1\nunderlay_device: eth1\ninputs: [/in]\nresync: 30s\n\
             listen: 127.0.0.1:9101\nlog: { format: json }\ncluster_cidrs: [10.244.0.0/16, \"fd00::/8\"]\n\
             health: { protocol: http, port: 9000, path: /ready, interval: 100ms, timeout: 50ms, failures: 3, successes: 2 }\n",
        )
        .unwrap();
        assert_eq!(c.underlay_device.as_deref(), Some("eth1"));
        assert_eq!(c.resync, Duration::from_secs(30));
        assert_eq!(c.listen, Some("127.0.0.1:9101".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.cluster_cidrs.len(), 2);
        assert_eq!(
            c.health,
            HealthSettings {
                protocol: ProbeProtocol::Http,
                port: 9000,
                path: "/ready".into(),
                interval: Duration::from_millis(100),
                timeout: Duration::from_millis(50),
                failures: 3,
                successes: 2,
            }
        );
        let e = parse("node_name: n\nunderlay_ip: 10.0.0.1\ninputs: [/in]\nresync: 100ms\nlog: { format: xml }\n")
            .unwrap_err();
        assert!(
            e.contains("node.yaml:4: resync: 100ms is out of range"),
            "{e}"
        );
        assert!(
            e.contains("node.yaml:5: log.format: `xml` is not a log format"),
            "{e}"
        );
    }

    #[test]
    fn command_line_values_win_and_may_replace_the_keys() {
        let overrides = Overrides {
            node_name: Some("node-b".into()),
            underlay_ip: Some(Ipv4Addr::new(172, 18, 0, 12)),
        };
        let c = NodeConfig::parse("inputs: [a]\n", Path::new("n.yaml"), &overrides).unwrap();
        assert_eq!(c.node_name, "node-b");
        assert_eq!(c.underlay_ip, Ipv4Addr::new(172, 18, 0, 12));
        let c = NodeConfig::parse(FULL_EXAMPLE, Path::new("n.yaml"), &overrides).unwrap();
        assert_eq!(c.node_name, "node-b");
        let e = NodeConfig::parse("inputs: [a]\n", Path::new("n.yaml"), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing the required key `node_name`"), "{e}");
        assert!(e.contains("missing the required key `underlay_ip`"), "{e}");
    }

    /// docs/node-agent.md documents every key the parser knows.
    #[test]
    fn kubernetes_replaces_or_joins_the_input_files() {
        let base = "node_name: a\nunderlay_ip: 172.18.0.2\n";
        let c = parse(&format!("{base}kubernetes: {{}}\n")).expect("kubernetes alone");
        assert!(c.inputs.is_empty());
        let k = c.kubernetes.expect("the section");
        assert_eq!(k.kubeconfig, None);
        assert_eq!(k.gateway_selector, DEFAULT_GATEWAY_SELECTOR);
        let c = parse(&format!(
            "{base}inputs: [p.yaml]\nkubernetes: {{ kubeconfig: /k/config, gateway_selector: 'role in (gw)' }}\n"
        ))
        .expect("both");
        assert_eq!(c.inputs, vec![PathBuf::from("/etc/egress/p.yaml")]);
        let k = c.kubernetes.expect("the section");
        assert_eq!(k.kubeconfig, Some(PathBuf::from("/k/config")));
        assert_eq!(k.gateway_selector, "role in (gw)");
        let c = parse(&format!("{base}inputs: []\nkubernetes: {{}}\n")).expect("no files");
        assert!(c.inputs.is_empty());
    }

    #[test]
    fn a_source_is_required_and_the_selector_checked() {
        let base = "node_name: a\nunderlay_ip: 172.18.0.2\n";
        let e = parse(base).expect_err("no source");
        assert!(e.contains("`inputs`") && e.contains("`kubernetes`"), "{e}");
        let e = parse(&format!("{base}inputs: []\n")).expect_err("empty inputs");
        assert!(
            e.contains("node.yaml:3:") && e.contains("the list is empty"),
            "{e}"
        );
        let e = parse(&format!("{base}kubernetes: {{ gateway_selector: '' }}\n"))
            .expect_err("empty selector");
        assert!(
            e.contains("node.yaml:3:") && e.contains("every pod of the cluster"),
            "{e}"
        );
        let e = parse(&format!(
            "{base}kubernetes: {{ gateway_selector: \"a == 'b'\" }}\n"
        ))
        .expect_err("a Calico selector");
        assert!(e.contains("`'` cannot appear"), "{e}");
        let e =
            parse(&format!("{base}kubernetes: {{ kubeconfig: '' }}\n")).expect_err("empty path");
        assert!(e.contains("service account"), "{e}");
        let e = parse(&format!("{base}kubernetes: {{ server: x }}\n")).expect_err("unknown key");
        assert!(e.contains("server"), "{e}");
    }

    #[test]
    fn every_key_is_documented() {
        let docs = include_str!("../../../docs/node-agent.md");
        let sections: [(&str, &[&str]); 5] = [
            ("", ROOT_KEYS),
            ("vxlan.", VXLAN_KEYS),
            ("kubernetes.", KUBERNETES_KEYS),
            ("tables.", TABLES_KEYS),
            ("health.", HEALTH_KEYS),
        ];
        for (prefix, keys) in sections {
            for key in keys {
                let name = format!("`{prefix}{key}`");
                assert!(
                    docs.contains(&name),
                    "docs/node-agent.md does not describe {name}"
                );
            }
        }
    }
}
