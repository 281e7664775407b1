//! `scripts/demo.sh --kube` (binary `demo-kube`): the seed scenario of `demo-netns` — two client nodes, a red
//! and a blue gateway pod running the real `egress-gateway run`, the outside servers — but the node agents
//! read the cluster from a real kube-apiserver (with etcd, from `scripts/kube-apiserver.sh`) instead of
//! files, and every change is a `kubectl` command, printed as it runs:
//!
//! 1. the API server, the EgressGatewayPolicy CRD, the agents' namespace and RBAC (deploy/), the pods as
//!    objects with their status written as a kubelet would (there is none here), the agents started;
//! 2. `kubectl apply -f deploy/policies/red-blue.yaml`;
//! 3. traffic while no namespace names the policy: every server sees the nodes' addresses;
//! 4. `kubectl annotate namespace app …egressGatewayPolicy=red-blue`: once the agents programmed the pods of
//!    `app`, the servers see the gateways' egress IPs (`other` keeps the node's);
//! 5. `kubectl patch` of the policy: the legacy firewall's network moves to the blue gateway;
//! 6. `kubectl delete pod` of the blue gateway: its routes become `unreachable` (fail closed).
//!
//! Then what each server saw at each step, and a list of checks. Everything is removed at the end (also on
//! failure and Ctrl-C). Exit status as `demo-netns` (see [`tests::demo`]); 2 also without the API server's
//! binaries (`scripts/kube-apiserver.sh build`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::ControlFlow;
use std::path::Path as FsPath;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tests::agent::{self, AgentConfig, NodeAgent, RouteShape};
use tests::demo::{self, interrupted, Path, Proto, Row, Server};
use tests::kube::ApiServer;
use tests::relay::TcpRelay;
use tests::topology::{Topology, BLUE_NET, POD_RULE_PRIORITY, RED_NET};
use tests::{GatewayMode, Inventory, Pod, TempDir, TopologySpec};

/// How long a change in the API may take to reach the nodes' kernels (watch, plan, netlink).
const CONVERGE: Duration = Duration::from_secs(10);
/// How long an agent may take to list everything and probe the gateways.
const READY: Duration = Duration::from_secs(30);

/// The seed's pods: (node, number on the node, namespace/name).
const PODS: [(usize, usize, &str); 3] =
    [(1, 1, "app/web"), (1, 2, "other/batch"), (2, 1, "app/api")];

fn pod_name(pod: &Pod) -> &'static str {
    PODS.iter()
        .find(|(n, m, _)| *n == pod.node && *m == pod.number)
        .map_or("?", |p| p.2)
}

fn opted_in(pod: &Pod) -> bool {
    pod_name(pod).starts_with("app/")
}

/// `arg` as a shell would need it: single-quoted when it holds anything but plain characters.
fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `kubectl` against the demo's API server, as the administrator: each command is printed as `$ kubectl …`
/// before it runs, its output indented after.
struct Kubectl<'a> {
    api: &'a ApiServer,
}

impl Kubectl<'_> {
    fn run(&self, args: &[&str]) -> tests::Result<String> {
        let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        println!("$ kubectl {}", line.join(" "));
        let out = self.api.kubectl(args)?;
        for l in out.lines() {
            println!("    {l}");
        }
        Ok(out)
    }
}

/// The checks and whether each passed.
#[derive(Default)]
struct Checks(Vec<(String, bool)>);

impl Checks {
    fn add(&mut self, what: impl Into<String>, ok: bool) {
        let what = what.into();
        if !ok {
            println!("FAILED: {what}");
        }
        self.0.push((what, ok));
    }

    /// One check for a step's probes; the rows are kept in `steps` for the summary.
    fn step<'s>(
        &mut self,
        steps: &mut Vec<(&'s str, Vec<Row>)>,
        step: &'s str,
        rows: Vec<Row>,
        expect: &str,
    ) {
        self.probes(step, &rows, expect);
        steps.push((step, rows));
    }

    fn probes(&mut self, step: &str, rows: &[Row], expect: &str) {
        let failed = rows.iter().filter(|r| !r.problems.is_empty()).count();
        let what = if failed == 0 {
            format!("{step}: {} probes: {expect}", rows.len())
        } else {
            format!(
                "{step}: {failed} of {} probes FAILED ({expect})",
                rows.len()
            )
        };
        self.0.push((what, failed == 0));
    }

    fn all_passed(&self) -> bool {
        self.0.iter().all(|(_, ok)| *ok)
    }
}

/// What a pod's table should route a destination to, on its node.
struct Want<'a> {
    pod: &'a Pod,
    dst: IpNet,
    route: RouteShape,
}

fn via(topo: &Topology, k: usize) -> RouteShape {
    RouteShape::Via(vec![IpAddr::V4(topo.gateway(k).ip)])
}

/// The route `pod`'s table (by its ip rule) holds for `dst`, if it has a rule and such a route.
fn pod_route(topo: &Topology, pod: &Pod, dst: IpNet) -> Option<RouteShape> {
    let ns = &topo.node(pod.node).ns;
    let table = agent::rule_table(ns, IpAddr::V4(pod.ip), POD_RULE_PRIORITY).ok()??;
    agent::table_route(ns, table, dst).ok()?
}

/// Polls (every 20 ms, at most [`CONVERGE`]) until every route is as wanted; how long that took, or what
/// was still different.
fn wait_routes(topo: &Topology, want: &[Want<'_>]) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let wrong: Vec<String> = want
            .iter()
            .filter_map(|w| {
                let have = pod_route(topo, w.pod, w.dst);
                (have.as_ref() != Some(&w.route)).then(|| {
                    format!(
                        "{} {}: want {:?}, have {have:?}",
                        pod_name(w.pod),
                        w.dst,
                        w.route
                    )
                })
            })
            .collect();
        if wrong.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > CONVERGE || interrupted() {
            return Err(format!("after {CONVERGE:?}: {}", wrong.join("; ")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `want` after a kubectl command, prints how long it took, and adds the check.
fn converge(topo: &Topology, checks: &mut Checks, what: &str, want: &[Want<'_>]) {
    match wait_routes(topo, want) {
        Ok(took) => {
            println!(
                "the agents {what} {:.0} ms after kubectl returned",
                took.as_secs_f64() * 1e3
            );
            checks.add(format!("the agents {what} within {CONVERGE:?}"), true);
        }
        Err(e) => checks.add(format!("the agents {what}: not {e}"), false),
    }
}

/// `ip rule` and app/web's table on node 1, as the agent left them.
fn print_node1(topo: &Topology) -> tests::Result<()> {
    let ns = &topo.node(1).ns;
    let web = topo.pod(1, 1);
    println!("node1 now (ip rule show priority {POD_RULE_PRIORITY}; app/web's table):");
    for line in ns
        .ip(&format!("rule show priority {POD_RULE_PRIORITY}"))?
        .lines()
    {
        println!("    {line}");
    }
    if let Some(t) = agent::rule_table(ns, IpAddr::V4(web.ip), POD_RULE_PRIORITY)? {
        println!("  $ ip route show table {t}");
        for line in ns.ip(&format!("route show table {t}"))?.lines() {
            println!("    {line}");
        }
    }
    Ok(())
}

/// The port of the `server:` in a kubeconfig (`https://127.0.0.1:<port>`).
fn server_port(kubeconfig: &FsPath) -> tests::Result<u16> {
    let text = std::fs::read_to_string(kubeconfig)
        .map_err(|e| tests::Error::msg(format!("read {}: {e}", kubeconfig.display())))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: https://127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| {
            tests::Error::msg(format!("no 127.0.0.1 server in {}", kubeconfig.display()))
        })
}

/// Per server, per step: each source it saw, what that source stands for, and from which pods (or that
/// the pods were refused).
fn print_summary(topo: &Topology, servers: &[Server<'_>], steps: &[(&str, Vec<Row>)]) {
    println!("\nwhat each outside server saw, step by step:");
    for server in servers {
        let mut printed_name = false;
        for (step, rows) in steps {
            // (source, what it stands for) -> pods, in the order first seen.
            let mut seen: Vec<((String, String), BTreeSet<&str>)> = Vec::new();
            for r in rows.iter().filter(|r| r.server == server.name) {
                let what = match r.src {
                    Some(src) => (src.to_string(), demo::describe_source(topo, Some(src))),
                    None => ("nothing".to_owned(), "refused at the node".to_owned()),
                };
                let pod = topo
                    .pods()
                    .iter()
                    .find(|p| p.ip == r.pod_ip)
                    .map_or("?", pod_name);
                match seen.iter_mut().find(|(w, _)| *w == what) {
                    Some((_, pods)) => {
                        pods.insert(pod);
                    }
                    None => seen.push((what, BTreeSet::from([pod]))),
                }
            }
            if !printed_name && !seen.is_empty() {
                println!("  {} {}", server.name, server.host.ip);
                printed_name = true;
            }
            for (i, ((src, what), pods)) in seen.iter().enumerate() {
                let step = if i == 0 { *step } else { "" };
                let pods: Vec<&str> = pods.iter().copied().collect();
                println!(
                    "    {step:<18} {src:<14} {what:<20} from {}",
                    pods.join(", ")
                );
            }
        }
    }
}

/// After Ctrl-C: what was built goes as `run` returns.
fn stopped() -> tests::Result<bool> {
    println!("\ninterrupted: removing the API server, the agents, the gateways and the namespaces");
    Ok(false)
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn run(binary: &FsPath, kubectl: &FsPath) -> tests::Result<bool> {
    let started = Instant::now();
    println!(
        "egress gateway demo driven by Kubernetes: a real kube-apiserver, the node agents (`egress-gateway node`) \
         watching it, two real gateways (`egress-gateway run`); every change is a kubectl command"
    );
    let mode = GatewayMode::Userspace {
        binary: binary.to_path_buf(),
    };
    let mut topo = Topology::build(TopologySpec::node_agent(&[2, 1], vec![mode.clone(), mode]))?;
    for k in 1..=2 {
        topo.gateway_mut(k).wait_ready(READY)?;
    }
    println!(
        "built {} namespaces ({}-*) and started 2 gateways in {:.1} s",
        topo.namespaces().len(),
        topo.prefix(),
        started.elapsed().as_secs_f64()
    );
    demo::print_gateways(&topo);
    println!(
        "pods: n1p1 app/web 10.244.1.1 and n1p2 other/batch 10.244.1.2 on node1 (172.18.0.11); n2p1 app/api \
         10.244.2.1 on node2 (172.18.0.12)"
    );
    let mut checks = Checks::default();

    section("1. the API server, the CRD, the agents' RBAC, the pods");
    let api_dir = topo.dir().join("kube");
    println!(
        "$ scripts/kube-apiserver.sh start {}    # kube-apiserver + etcd on node1's loopback; then the harness runs:",
        api_dir.display()
    );
    println!("$ kubectl apply -f deploy/crds/egressgatewaypolicies.yaml");
    println!(
        "$ kubectl wait --for=condition=Established --timeout=60s crd/egressgatewaypolicies.projectcalico.org"
    );
    let t = Instant::now();
    let api = ApiServer::start(&topo.node(1).ns, &api_dir, kubectl)?;
    println!(
        "    (API server ready and the CRD established in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let k = Kubectl { api: &api };
    k.run(&[
        "apply",
        "-f",
        "deploy/namespace.yaml",
        "-f",
        "deploy/node-agent/rbac.yaml",
    ])?;
    k.run(&["create", "namespace", "app"])?;
    k.run(&["create", "namespace", "other"])?;
    if interrupted() {
        return stopped();
    }
    println!(
        "no kubelet runs here, so the demo plays it: it creates the pods as objects (spec.nodeName, labels, one \
         container) and writes each pod's status (podIP, hostIP, phase Running) through the status \
         subresource, as a kubelet would:"
    );
    let ipv6 = topo.spec().ipv6;
    let mut inv = Inventory::new();
    for (n, m, pod) in PODS {
        let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod));
        inv.client_pod(namespace, name, topo.pod(n, m));
    }
    inv.gateway_pod(1, "red", ipv6).gateway_pod(2, "blue", ipv6);
    println!(
        "$ kubectl apply -f -    # Pods app/web, other/batch (nodeName node1), app/api (node2), egress/gw1 \
         (egress-code: red), egress/gw2 (egress-code: blue)"
    );
    for p in &inv.pods {
        let ip = p.ips.first().map_or(String::new(), ToString::to_string);
        println!(
            "$ kubectl patch pod -n {} {} --subresource=status --type=merge -p \
             '{{\"status\":{{\"phase\":\"Running\",\"hostIP\":\"{}\",\"podIP\":\"{ip}\",\"podIPs\":[…]}}}}'",
            p.namespace, p.name, p.host_ip
        );
    }
    api.apply_pods(&inv.pods)?;
    k.run(&["get", "pods", "-A", "-o", "wide"])?;

    let sa_kubeconfig = topo.dir().join("agent.kubeconfig");
    println!(
        "$ kubectl create token -n egress egress-node-agent --duration=1h    # into {}, the agents' kubeconfig",
        sa_kubeconfig.display()
    );
    let sa_kubeconfig =
        api.service_account_kubeconfig("egress", "egress-node-agent", &sa_kubeconfig)?;
    // The API server listens on node1's loopback only: node2's agent reaches it through a relay on the
    // same port of its own loopback, so one kubeconfig (and the server's certificate) serves both.
    let port = server_port(&api.kubeconfig())?;
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let _relay = TcpRelay::start(&topo.node(2).ns, loopback, &topo.node(1).ns, loopback)?;
    let t = Instant::now();
    let mut agents = Vec::new();
    for n in 1..=2 {
        let mut config = AgentConfig::for_node(n, Vec::new());
        config.kubeconfig = Some(sa_kubeconfig.clone());
        agents.push(NodeAgent::start(&topo, binary, n, config)?);
    }
    for a in &mut agents {
        a.wait_ready(READY)?;
    }
    println!(
        "started the node agents on node1 and node2 (`egress-gateway node`, `kubernetes: {{ kubeconfig: … }}`, no \
         input files; node2's reaches the API server through a relay on its loopback): ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if interrupted() {
        return stopped();
    }

    section("2. the seed's EgressGatewayPolicy");
    k.run(&["apply", "-f", "deploy/policies/red-blue.yaml"])?;
    k.run(&[
        "get",
        "egressgatewaypolicy",
        "red-blue",
        "-o",
        r#"jsonpath={range .spec.rules[*]}{.destination.cidr}{"\t"}{.gateway.selector}{"\t"}{.description}{"\n"}{end}"#,
    ])?;
    println!(
        "(deploy/policies/red-blue.yaml has no rule for the internal network 10.50.0.0/16, which the default \
         demo's policy sends through the red gateway: the internal server is left out here)"
    );
    let servers = demo::start_servers(&topo)?;
    let outside = |server: &str| server != "internal";
    let mut steps: Vec<(&str, Vec<Row>)> = Vec::new();
    if interrupted() {
        return stopped();
    }

    section("3. no namespace names the policy yet: the pods leave with their node's address");
    let no_rules = topo.pods().iter().all(|p| {
        matches!(
            agent::rule_table(&topo.node(p.node).ns, IpAddr::V4(p.ip), POD_RULE_PRIORITY),
            Ok(None)
        )
    });
    checks.add("before the annotation: no pod has an ip rule", no_rules);
    let rows = demo::probe_all(&topo, &servers, &Proto::ALL, |_, s| {
        outside(s).then_some(Path::Node)
    });
    checks.step(
        &mut steps,
        "3 before opt-in",
        rows,
        "every server saw the node's address",
    );
    if interrupted() {
        return stopped();
    }

    section("4. namespace app opts in");
    let annotation = format!("{}=red-blue", agent::POLICY_ANNOTATION);
    k.run(&["annotate", "namespace", "app", &annotation])?;
    let (web, batch, api_pod) = (topo.pod(1, 1), topo.pod(1, 2), topo.pod(2, 1));
    let app_pods = [web, api_pod];
    let want: Vec<Want<'_>> = app_pods
        .iter()
        .flat_map(|&pod| {
            [
                Want {
                    pod,
                    dst: BLUE_NET.into(),
                    route: via(&topo, 1),
                },
                Want {
                    pod,
                    dst: RED_NET.into(),
                    route: via(&topo, 2),
                },
            ]
        })
        .collect();
    converge(
        &topo,
        &mut checks,
        "programmed app/web (node1) and app/api (node2)",
        &want,
    );
    let batch_rule = agent::rule_table(&topo.node(1).ns, IpAddr::V4(batch.ip), POD_RULE_PRIORITY);
    checks.add(
        "other/batch (namespace not opted in) has no ip rule",
        matches!(batch_rule, Ok(None)),
    );
    print_node1(&topo)?;
    let rows = demo::probe_all(&topo, &servers, &Proto::ALL, |pod, s| match s {
        "legacy-fw" if opted_in(pod) => Some(Path::Dmz(1)),
        "partner" if opted_in(pod) => Some(Path::Dmz(2)),
        s if outside(s) => Some(Path::Node),
        _ => None,
    });
    checks.step(
        &mut steps,
        "4 app opted in",
        rows,
        "app's pods through red (legacy-fw) and blue (partner), other/batch and on-prem by the node",
    );
    if interrupted() {
        return stopped();
    }

    section("5. a policy edit: the legacy firewall's network through the blue gateway");
    k.run(&[
        "patch",
        "egressgatewaypolicy",
        "red-blue",
        "--type=json",
        "-p",
        r#"[{"op":"test","path":"/spec/rules/0/destination/cidr","value":"192.0.2.0/24"},{"op":"replace","path":"/spec/rules/0/gateway/selector","value":"egress-code == \"blue\""}]"#,
    ])?;
    let want: Vec<Want<'_>> = app_pods
        .iter()
        .map(|&pod| Want {
            pod,
            dst: BLUE_NET.into(),
            route: via(&topo, 2),
        })
        .collect();
    converge(
        &topo,
        &mut checks,
        "moved 192.0.2.0/24 to the blue gateway",
        &want,
    );
    let rows = demo::probe_all(&topo, &servers, &Proto::ALL, |pod, s| match s {
        "legacy-fw" if opted_in(pod) => Some(Path::Dmz(2)),
        "legacy-fw" => Some(Path::Node),
        _ => None,
    });
    checks.step(
        &mut steps,
        "5 policy edited",
        rows,
        "legacy-fw saw the blue gateway from app's pods",
    );
    if interrupted() {
        return stopped();
    }

    section("6. the blue gateway's pod is deleted");
    k.run(&[
        "delete",
        "pod",
        "-n",
        "egress",
        "gw2",
        "--grace-period=0",
        "--force",
    ])?;
    println!(
        "(no kubelet to wait for: the object is gone at once. The gateway process still runs, but no agent \
         routes to it any more; blue was the only gateway left for both outside networks)"
    );
    let want: Vec<Want<'_>> = app_pods
        .iter()
        .flat_map(|&pod| {
            [
                Want {
                    pod,
                    dst: BLUE_NET.into(),
                    route: RouteShape::Unreachable,
                },
                Want {
                    pod,
                    dst: RED_NET.into(),
                    route: RouteShape::Unreachable,
                },
            ]
        })
        .collect();
    converge(
        &topo,
        &mut checks,
        "made both outside networks unreachable for app's pods (fail closed)",
        &want,
    );
    // One server: the node answers at most 6 ICMP errors in a burst to each pod (then one a second,
    // net.ipv4.icmp_ratelimit), and a refusal is checked by its ICMP error.
    let rows = demo::probe_all(&topo, &servers, &Proto::ALL, |pod, s| match s {
        "partner" if opted_in(pod) => Some(Path::Refused),
        "partner" => Some(Path::Node),
        _ => None,
    });
    checks.step(
        &mut steps,
        "6 gw2 deleted",
        rows,
        "app's pods refused at once, never sent out with the node's address; other/batch unaffected",
    );
    if interrupted() {
        return stopped();
    }

    print_summary(&topo, &servers, &steps);
    println!("\nchecks:");
    for (what, ok) in &checks.0 {
        println!("  {}  {what}", if *ok { "PASS" } else { "FAIL" });
    }
    let ok = checks.all_passed();
    if ok {
        println!("all {} checks passed", checks.0.len());
    } else {
        println!("some checks FAILED; log tails:");
        for a in &agents {
            println!("--- node agent on node{}\n{}", a.node(), a.log_tail(20));
        }
        println!("--- kube-apiserver\n{}", api.log_tail(10));
    }
    drop(servers);
    drop(agents);
    drop(api);
    let names = topo.namespaces().len();
    drop(topo);
    println!(
        "removed the API server, the node agents, the gateways and the {names} namespaces ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    Ok(ok)
}

fn main() -> ExitCode {
    let usage = "usage: demo-kube (as root; no arguments)\n\nThe seed scenario of demo-netns with the node \
                 agents watching a real kube-apiserver (scripts/kube-apiserver.sh build, ~10 minutes once) \
                 instead of reading files: prints every kubectl command that drives the gateways (the \
                 policy, a namespace opting in, a policy edit, a gateway pod deleted), what each server saw \
                 after each, and a list of checks, and removes everything. Exit status 0 when every check \
                 passed, 1 when one failed, 2 without root, the gateway binary or the API server's \
                 binaries, 130 on Ctrl-C.";
    let binary = match demo::prepare("demo-kube", usage) {
        ControlFlow::Continue(binary) => binary,
        ControlFlow::Break(status) => return status,
    };
    let kubectl = match tests::kube::binaries() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("demo-kube: {e} (./scripts/demo.sh --kube builds them)");
            return ExitCode::from(2);
        }
    };
    // The kubectl commands name files of this checkout (deploy/…) as a reader would type them.
    let root = tests::gateway::workspace_root();
    if let Err(e) = std::env::set_current_dir(&root) {
        eprintln!("demo-kube: cd {}: {e}", root.display());
        return ExitCode::from(2);
    }
    // kubectl's discovery cache goes with everything else, not to ~/.kube.
    let cache = match TempDir::new(&format!("demo-kube-{}-kubectl", std::process::id())) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo-kube: {e}");
            return ExitCode::from(2);
        }
    };
    std::env::set_var("KUBECACHEDIR", cache.path());
    let status = demo::exit_status("demo-kube", run(&binary, &kubectl));
    drop(cache);
    status
}

// (Not `mod tests`: that name would hide the harness crate `tests` in this file's paths.)
#[cfg(test)]
mod unit {
    use super::shell_quote;

    #[test]
    fn arguments_are_quoted_as_a_shell_needs() {
        assert_eq!(shell_quote("--type=json"), "--type=json");
        assert_eq!(
            shell_quote("deploy/policies/red-blue.yaml"),
            "deploy/policies/red-blue.yaml"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote(r#"{"op":"x"}"#), r#"'{"op":"x"}'"#);
        assert_eq!(shell_quote("code == 'red'"), r"'code == '\''red'\'''");
    }
}
