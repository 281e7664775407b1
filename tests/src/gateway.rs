//! Gateway pods in one of two modes: the kernel's own path (the reference Calico Enterprise's gateway
//! uses) or the userspace `egress-gateway run` binary.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::netns::Netns;
use crate::process::Process;
use crate::topology::{
    dmz_egress_ip, dmz_egress_ip6, gateway_ip, internal_egress_ip, internal_egress_ip6, link_local,
    tunnel_mac, Topology, DMZ_NET6, DMZ_ROUTER, DMZ_ROUTER6, INTERNAL_NET, INTERNAL_NET6, POD_CIDR,
    POD_CIDR6, TUNNEL_MTU, UNDERLAY, VNI, VXLAN_PORT,
};

/// The gateway's health port (`GET /readiness`).
pub const HEALTH_PORT: u16 = 8080;
/// The gateway's Prometheus metrics port (`GET /metrics`).
pub const METRICS_PORT: u16 = 9090;
/// Name of the gateway's vxlan device in kernel mode.
pub const GATEWAY_VXLAN_DEV: &str = "vxlan0";

/// How a gateway pod forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayMode {
    /// The kernel path: vxlan device, forwarding, iptables SNAT per uplink, TCPMSS clamp, static return
    /// routes through the tunnel to each node.
    Kernel,
    /// `<binary> run --config <file>` inside the gateway namespace; uplinks carry no kernel address.
    Userspace {
        /// The `egress-gateway` binary.
        binary: PathBuf,
    },
}

impl GatewayMode {
    /// Userspace mode with the binary found by [`gateway_binary`].
    pub fn userspace() -> Result<Self> {
        Ok(Self::Userspace {
            binary: gateway_binary()?,
        })
    }

    /// `kernel` or `userspace`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Userspace { .. } => "userspace",
        }
    }
}

/// The `egress-gateway` binary: `$EGRESS_GATEWAY_BIN`, else `target/release/egress-gateway` in the
/// workspace. An error says how to build it.
pub fn gateway_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EGRESS_GATEWAY_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        crate::bail!("EGRESS_GATEWAY_BIN={} is not a file", p.display());
    }
    let p = workspace_root().join("target/release/egress-gateway");
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::msg(format!(
            "{} not found: build it with `cargo build --release -p gateway` or set EGRESS_GATEWAY_BIN",
            p.display()
        )))
    }
}

/// The binary for userspace-mode tests, if it exists and has the `run` subcommand (`run --help`
/// succeeds); otherwise why not. Tests skip on `Err` (printing `SKIPPED <test>: <why>`).
pub fn userspace_binary_with_run() -> Result<PathBuf> {
    let bin = gateway_binary()?;
    let path = bin.to_string_lossy().into_owned();
    let out = crate::cmd::output(&path, &["run", "--help"])?;
    if !out.status.success() {
        crate::bail!(
            "{path} has no working `run` subcommand yet (`run --help` exited with {})",
            out.status
        );
    }
    Ok(bin)
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The DNS name of gateway `k`'s sync socket when peers are given by name (`TopologySpec::sync_by_name`).
pub fn sync_name(k: usize) -> String {
    format!("gw{k}.sync.test")
}

/// The `sync` section of gateway `k` in `set`: ordinal k − 1, the others as peers with their egress IPs,
/// each at its address or, `by_name`, at its [`sync_name`].
pub fn sync_yaml(k: usize, set: &[usize], key: &Path, ipv6: bool, by_name: bool) -> String {
    let mut y = format!(
        "sync:\n  set: red\n  ordinal: {}\n  port: {SYNC_PORT}\n  key_file: {}\n  peers:\n",
        k - 1,
        key.display()
    );
    for &j in set.iter().filter(|&&j| j != k) {
        let (mut dmz, mut int) = (
            vec![dmz_egress_ip(j).to_string()],
            vec![internal_egress_ip(j).to_string()],
        );
        if ipv6 {
            dmz.push(dmz_egress_ip6(j).to_string());
            int.push(internal_egress_ip6(j).to_string());
        }
        y.push_str(&format!(
            "    - ordinal: {}\n      address: {}:{SYNC_PORT}\n      uplinks:\n        - {{ name: dmz, egress_ips: [{}] }}\n        - {{ name: internal, egress_ips: [{}] }}\n",
            j - 1,
            if by_name {
                sync_name(j)
            } else {
                gateway_ip(j).to_string()
            },
            dmz.join(", "),
            int.join(", ")
        ));
    }
    y
}

/// The UDP port of the gateways' state sync.
pub const SYNC_PORT: u16 = 4792;

/// A gateway pod namespace: `eth0` on the underlay (its pod IP), uplinks `gwdmz` and `gwint`.
#[derive(Debug)]
pub struct Gateway {
    // The process goes before the namespace.
    process: Option<Process>,
    /// Its namespace.
    pub ns: Netns,
    /// Gateway number (from 1).
    pub number: usize,
    /// Its underlay address (pod IP; the nodes' next hop).
    pub ip: Ipv4Addr,
    /// Its DMZ egress IP.
    pub dmz_egress: Ipv4Addr,
    /// Its internal egress IP.
    pub internal_egress: Ipv4Addr,
    /// Its DMZ egress IPv6 address (dual-stack topology; on `gwdmz` in kernel mode, in the configuration in
    /// userspace mode).
    pub dmz_egress6: Option<Ipv6Addr>,
    /// Its internal egress IPv6 address (as `dmz_egress6`).
    pub internal_egress6: Option<Ipv6Addr>,
    mode: GatewayMode,
    config: Option<PathBuf>,
}

impl Gateway {
    pub(crate) fn new(
        ns: Netns,
        number: usize,
        ip: Ipv4Addr,
        mode: GatewayMode,
        ipv6: bool,
    ) -> Self {
        Self {
            process: None,
            ns,
            number,
            ip,
            dmz_egress: dmz_egress_ip(number),
            internal_egress: internal_egress_ip(number),
            dmz_egress6: ipv6.then(|| dmz_egress_ip6(number)),
            internal_egress6: ipv6.then(|| internal_egress_ip6(number)),
            mode,
            config: None,
        }
    }

    /// The mode it runs in.
    pub fn mode(&self) -> &GatewayMode {
        &self.mode
    }

    /// The userspace gateway's process (userspace mode only).
    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    /// The userspace gateway's process, mutably (to signal or stop it).
    pub fn process_mut(&mut self) -> Option<&mut Process> {
        self.process.as_mut()
    }

    /// Stops the userspace gateway's process, if any (SIGTERM, SIGKILL after 500 ms).
    pub fn stop_process(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_millis(500));
        }
    }

    /// Starts the userspace gateway's process again with the same binary and configuration (after it was
    /// killed or stopped; a running one is stopped first). Its log is `gw<k>-<pid>.log` next to the
    /// configuration. Wait with [`wait_ready`](Self::wait_ready).
    pub fn respawn(&mut self) -> Result<()> {
        let GatewayMode::Userspace { binary } = self.mode.clone() else {
            crate::bail!(
                "gateway {} is in kernel mode: nothing to respawn",
                self.number
            );
        };
        let Some(config) = self.config.clone() else {
            crate::bail!("gateway {} has no configuration file", self.number);
        };
        let old = self.process.take();
        let tag = old.as_ref().map_or(0, Process::pid);
        if let Some(mut p) = old {
            p.stop(Duration::from_millis(500));
        }
        let log = config.with_file_name(format!("gw{}-{tag}.log", self.number));
        let bin = binary.to_string_lossy().into_owned();
        let cfg = config.to_string_lossy().into_owned();
        let process = self
            .ns
            .spawn(&[&bin, "run", "--config", &cfg], log)
            .with_context(|| format!("restart {bin}"))?;
        self.process = Some(process);
        Ok(())
    }

    /// The configuration file written for userspace mode.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    pub(crate) fn configure(&mut self, topo: &Topology) -> Result<()> {
        match self.mode.clone() {
            GatewayMode::Kernel => self.configure_kernel(topo),
            GatewayMode::Userspace { binary } => self.start_userspace(topo, &binary),
        }
    }

    fn configure_kernel(&mut self, topo: &Topology) -> Result<()> {
        let ns = &self.ns;
        let dev = GATEWAY_VXLAN_DEV;
        ns.ip(&format!(
            "link add {dev} address {} type vxlan id {VNI} dstport {VXLAN_PORT} local {} dev eth0 nolearning",
            tunnel_mac(self.ip),
            self.ip
        ))?;
        ns.ip(&format!("link set {dev} mtu {TUNNEL_MTU} up"))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        ns.ip(&format!("addr add {}/24 dev gwdmz", self.dmz_egress))?;
        ns.ip(&format!("addr add {}/16 dev gwint", self.internal_egress))?;
        ns.ip(&format!("route add default via {DMZ_ROUTER} dev gwdmz"))?;
        // The return path: each pod through the tunnel to its node.
        for node in topo.nodes() {
            ns.ip(&format!(
                "neigh add {} lladdr {} dev {dev} nud permanent",
                node.ip, node.vxlan_mac
            ))?;
            crate::cmd::run(
                "bridge",
                &[
                    "-n",
                    ns.name(),
                    "fdb",
                    "append",
                    &node.vxlan_mac,
                    "dev",
                    dev,
                    "dst",
                    &node.ip.to_string(),
                ],
            )?;
        }
        for pod in topo.pods() {
            let node = topo.node(pod.node);
            ns.ip(&format!(
                "route add {}/32 via {} dev {dev} onlink",
                pod.ip, node.ip
            ))?;
        }
        // SNAT per uplink, MSS clamp, and no relaying of anything but pod traffic from the tunnel.
        let mut rules = Vec::new();
        if let Some((lo, hi)) = topo.ports() {
            for p in ["tcp", "udp"] {
                rules.push(format!(
                    "-t nat -A POSTROUTING -s {POD_CIDR} -o gwdmz -p {p} -j SNAT --to-source {}:{lo}-{hi}",
                    self.dmz_egress
                ));
            }
        }
        rules.extend([
            format!(
                "-t nat -A POSTROUTING -s {POD_CIDR} -o gwdmz -j SNAT --to-source {}",
                self.dmz_egress
            ),
            format!(
                "-t nat -A POSTROUTING -s {POD_CIDR} -o gwint -j SNAT --to-source {}",
                self.internal_egress
            ),
            "-t mangle -A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"
                .to_owned(),
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".to_owned(),
            format!("-A FORWARD -i {dev} -s {POD_CIDR} -j ACCEPT"),
            "-P FORWARD DROP".to_owned(),
        ]);
        for r in &rules {
            let mut args = vec!["iptables", "-w"];
            args.extend(crate::cmd::words(r));
            ns.exec_args(&args)?;
        }
        if let (Some(dmz6), Some(int6)) = (self.dmz_egress6, self.internal_egress6) {
            self.configure_kernel_ipv6(topo, dmz6, int6)?;
        }
        Ok(())
    }

    /// The same for IPv6 inside the tunnel: next hops are link-locals derived from the tunnel MACs.
    fn configure_kernel_ipv6(&self, topo: &Topology, dmz6: Ipv6Addr, int6: Ipv6Addr) -> Result<()> {
        let ns = &self.ns;
        let dev = GATEWAY_VXLAN_DEV;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        ns.ip(&format!(
            "-6 addr add {dmz6}/{} dev gwdmz nodad",
            DMZ_NET6.prefix_len()
        ))?;
        ns.ip(&format!(
            "-6 addr add {int6}/{} dev gwint nodad",
            INTERNAL_NET6.prefix_len()
        ))?;
        ns.ip(&format!("-6 route add default via {DMZ_ROUTER6} dev gwdmz"))?;
        for node in topo.nodes() {
            ns.ip(&format!(
                "-6 neigh add {} lladdr {} dev {dev} nud permanent",
                link_local(&node.vxlan_mac)?,
                node.vxlan_mac
            ))?;
        }
        for pod in topo.pods() {
            if let Some(ip6) = pod.ip6 {
                let node = topo.node(pod.node);
                ns.ip(&format!(
                    "-6 route add {ip6}/128 via {} dev {dev}",
                    link_local(&node.vxlan_mac)?
                ))?;
            }
        }
        let rules = [
            format!("-t nat -A POSTROUTING -s {POD_CIDR6} -o gwdmz -j SNAT --to-source {dmz6}"),
            format!("-t nat -A POSTROUTING -s {POD_CIDR6} -o gwint -j SNAT --to-source {int6}"),
            "-t mangle -A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"
                .to_owned(),
            "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".to_owned(),
            format!("-A FORWARD -i {dev} -s {POD_CIDR6} -j ACCEPT"),
            "-P FORWARD DROP".to_owned(),
        ];
        for r in &rules {
            let mut args = vec!["ip6tables", "-w"];
            args.extend(crate::cmd::words(r));
            ns.exec_args(&args)?;
        }
        Ok(())
    }

    fn start_userspace(&mut self, topo: &Topology, binary: &Path) -> Result<()> {
        let config = topo.dir().join(format!("gw{}.yaml", self.number));
        let mut yaml = self.config_yaml(topo.workers());
        if let Some((lo, hi)) = topo.ports() {
            yaml.push_str(&format!("ports: {{ min: {lo}, max: {hi} }}\n"));
        }
        let mut conntrack: Vec<String> = topo
            .max_per_source()
            .map(|n| format!("max_per_source: {n}"))
            .into_iter()
            .collect();
        conntrack.extend(
            topo.spec()
                .conntrack
                .iter()
                .map(|(k, v)| format!("{k}: {v}")),
        );
        if !conntrack.is_empty() {
            yaml.push_str(&format!("conntrack: {{ {} }}\n", conntrack.join(", ")));
        }
        if let Some(set) = topo.sync_set(self.number) {
            let key = topo.dir().join("sync.key");
            if !key.exists() {
                // 32 bytes, the same for the whole set (tests need no secrecy, only a shared key)
                std::fs::write(
                    &key,
                    format!("{:032x}", topo.prefix().len() * 7919 + set.len()),
                )
                .with_context(|| format!("write {}", key.display()))?;
            }
            yaml.push_str(&sync_yaml(
                self.number,
                set,
                &key,
                self.dmz_egress6.is_some(),
                topo.sync_by_name(),
            ));
            if topo.sync_by_name() {
                let hosts: Vec<(String, IpAddr)> = set
                    .iter()
                    .map(|&j| (sync_name(j), IpAddr::V4(gateway_ip(j))))
                    .collect();
                self.ns.set_hosts(&hosts)?;
            }
        }
        std::fs::write(&config, yaml).with_context(|| format!("write {}", config.display()))?;
        let log = topo.dir().join(format!("gw{}.log", self.number));
        let bin = binary.to_string_lossy().into_owned();
        let cfg = config.to_string_lossy().into_owned();
        let process = self
            .ns
            .spawn(&[&bin, "run", "--config", &cfg], log)
            .with_context(|| format!("start {bin}"))?;
        self.process = Some(process);
        self.config = Some(config);
        Ok(())
    }

    /// The userspace gateway's configuration (the contract between harness and binary).
    pub fn config_yaml(&self, workers: usize) -> String {
        let ip = self.ip;
        let (mut pods, mut dmz, mut int) = (
            vec![POD_CIDR.to_string()],
            vec![self.dmz_egress.to_string()],
            vec![self.internal_egress.to_string()],
        );
        let (mut dmz_routes, mut int_routes) =
            (vec!["0.0.0.0/0".to_owned()], vec![INTERNAL_NET.to_string()]);
        let mut next_hop6 = String::new();
        // Dual-stack topologies also give the userspace gateway IPv6 egress addresses and routes.
        if let (Some(d6), Some(i6)) = (self.dmz_egress6, self.internal_egress6) {
            pods.push(POD_CIDR6.to_string());
            dmz.push(d6.to_string());
            int.push(i6.to_string());
            dmz_routes.push("::/0".to_owned());
            int_routes.push(INTERNAL_NET6.to_string());
            next_hop6 = format!(", next_hop_v6: {DMZ_ROUTER6}");
        }
        let (pods, dmz, int) = (pods.join(", "), dmz.join(", "), int.join(", "));
        let (dmz_routes, int_routes) = (dmz_routes.join(", "), int_routes.join(", "));
        format!(
            "tunnel: {{ listen: {ip}:{VXLAN_PORT}, vni: {VNI}, allowed_sources: [{UNDERLAY}], pod_cidrs: [{pods}], mtu: {TUNNEL_MTU} }}
uplinks:
  - {{ name: dmz, interface: gwdmz, egress_ips: [{dmz}], next_hop: {DMZ_ROUTER}{next_hop6}, routes: [{dmz_routes}] }}
  - {{ name: internal, interface: gwint, egress_ips: [{int}], routes: [{int_routes}] }}
health: {{ listen: {ip}:{HEALTH_PORT} }}
metrics: {{ listen: {ip}:{METRICS_PORT} }}
workers: {workers}
drain_seconds: 30
"
        )
    }

    /// Waits until the gateway forwards: immediately in kernel mode; in userspace mode until
    /// `GET /readiness` answers 200 (polled every 50 ms). Fails at once if the process exits, and after
    /// `timeout` with the last answer and the log tail.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        if self.mode == GatewayMode::Kernel {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.process.as_mut() {
                if let Some(status) = p.try_wait()? {
                    return Err(Error::msg(format!(
                        "gateway {} exited ({status}) before it was ready; log tail:\n{}",
                        self.number,
                        p.log_tail(30)
                    )));
                }
            }
            let last = match self.http_get(HEALTH_PORT, "/readiness") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                let tail = self
                    .process
                    .as_ref()
                    .map(|p| p.log_tail(30))
                    .unwrap_or_default();
                return Err(Error::msg(format!(
                    "gateway {} not ready after {timeout:?} (GET http://{}:{HEALTH_PORT}/readiness: {last}); log tail:\n{tail}",
                    self.number, self.ip
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics_text(&self) -> Result<String> {
        match self.http_get(METRICS_PORT, "/metrics")? {
            (200, body) => Ok(body),
            (code, body) => Err(Error::msg(format!("GET /metrics: HTTP {code}: {body}"))),
        }
    }

    /// The current metrics, parsed.
    pub fn metrics(&self) -> Result<Metrics> {
        Ok(Metrics::parse(&self.metrics_text()?))
    }

    /// An HTTP/1.0 GET to the gateway's `port` from inside its namespace: (status, body).
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let addr = SocketAddr::from((self.ip, port));
        let path = path.to_owned();
        self.ns
            .run(Duration::from_secs(5), move || http_get(addr, &path))?
    }
}

/// A minimal HTTP/1.0 GET with 2-second timeouts: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("read {addr}{path}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::msg(format!("bad HTTP answer from {addr}{path}: {head}")))?;
    Ok((status, body.to_owned()))
}

/// Parsed Prometheus text exposition: one sample per line.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<Sample>,
}

/// One sample: name, label pairs, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels in the order given.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Metrics {
    /// Parses the text format (comments and malformed lines are skipped).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Self { samples }
    }

    /// All samples.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The sum of `name` over the samples whose labels include all of `labels`; `None` if none match.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            let all = labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v));
            if all {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name_labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line[open..].find('}')? + open;
            (&line[..=close], &line[close + 1..])
        }
        None => line.split_at(line.find(char::is_whitespace)?),
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match name_labels.split_once('{') {
        Some((n, l)) => (n, parse_labels(l.strip_suffix('}')?)?),
        None => (name_labels, Vec::new()),
    };
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        out.push((k.trim().to_owned(), value));
        rest = after[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_sum() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE egress_packets_total counter\n\
             egress_packets_total{uplink=\"dmz\",worker=\"0\"} 10\n\
             egress_packets_total{uplink=\"dmz\",worker=\"1\"} 5\n\
             egress_packets_total{uplink=\"internal\",worker=\"0\"} 1\n\
             egress_conntrack_entries 3 1700000000\n\
             odd{a=\"x\\\"y,z\"} +Inf\n",
        );
        assert_eq!(m.get("egress_packets_total", &[]), Some(16.0));
        assert_eq!(
            m.get("egress_packets_total", &[("uplink", "dmz")]),
            Some(15.0)
        );
        assert_eq!(m.get("egress_conntrack_entries", &[]), Some(3.0));
        assert_eq!(m.get("odd", &[("a", "x\"y,z")]), Some(f64::INFINITY));
        assert_eq!(m.get("missing", &[]), None);
    }
}
