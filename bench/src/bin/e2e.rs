//! End-to-end benchmark: the kernel's own gateway path against the userspace gateway, on the same
//! namespace topology (the harness's standard scenario), with the same load, in one run.
//!
//! Usage (as root): `cargo run -p bench --release --bin e2e -- [--quick]
//! [--modes kernel,userspace,userspace-sync]
//! [--seconds N] [--rounds N] [--senders N] [--clients N] [--many-clients N]
//! [--only tcp,tcp4,iperf,flood,conn,conn-many,latency] [--strict]`
//!
//! Modes (default `kernel,userspace`), measured in alternating rounds on gateway 1, the only one pod
//! traffic goes through:
//! * `kernel`: the kernel's own forwarding and SNAT;
//! * `userspace`: the userspace gateway, without state sync;
//! * `userspace-sync`: the userspace gateway in a sync set with a second userspace gateway (gateway 2,
//!   which carries no pod traffic and only receives gateway 1's flows), so that the cost of state sync
//!   shows. With this mode the topology has two gateways; in the other modes gateway 2 is in kernel mode
//!   (no process) and idle. For this mode the benchmark also prints the sync bytes gateway 1 sent per new
//!   flow during the connection-rate measurements and the copies gateway 2 holds afterwards.
//!
//! Per mode it measures, with the gateway pod switched between modes (its namespace rebuilt identically;
//! nodes, pods and servers stay):
//! * TCP bulk throughput, one stream, pod → red server (`iperf3 -J`), and the CPU it took: all cores'
//!   busy time over the transfer (less the background measured just before) per GB delivered; and four
//!   parallel streams (`iperf3 -P 4`);
//! * 64-byte UDP packet rate from one `iperf3 -u -l 64 -b 0` sender, and from `--senders` Rust `sendmmsg`
//!   senders in different pods: offered (UDP datagrams the pods sent) and delivered (datagrams that reached
//!   the server's UDP layer, from `/proc/net/snmp` in each namespace);
//! * CPU time per delivered packet in those runs: all cores' busy time from `/proc/stat` over the run ÷
//!   delivered packets (same method in both modes; includes the senders);
//! * TCP connections per second (`--clients` threads, default 2, and `--many-clients`, default 32: connect,
//!   1 byte each way, close with RST);
//! * UDP 1-byte request/response latency, p50 and p99.
//!
//! The table's ratios are userspace / kernel for rates and kernel / userspace for latency and CPU, so ≥ 1.0
//! always means "userspace at least as good"; likewise userspace-sync against kernel and against plain
//! userspace when those columns are there. A mode that cannot run (binary missing, not ready) shows an
//! error per line instead of numbers. Exit status: non-zero if a kernel-mode measurement failed (with
//! `--strict`: if any failed).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::topology::RED_SERVER;
use tests::traffic::{self, UdpCounters};
use tests::{Error, GatewayMode, Netns, Result, Topology, TopologySpec};

/// One line of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    TcpBulk,
    TcpCpu,
    TcpBulk4,
    IperfOffered,
    IperfDelivered,
    IperfCpu,
    FloodOffered,
    FloodDelivered,
    FloodCpu,
    ConnRate,
    ConnRateMany,
    LatencyP50,
    LatencyP99,
}

impl Metric {
    const ALL: [Metric; 13] = [
        Metric::TcpBulk,
        Metric::TcpCpu,
        Metric::TcpBulk4,
        Metric::IperfOffered,
        Metric::IperfDelivered,
        Metric::IperfCpu,
        Metric::FloodOffered,
        Metric::FloodDelivered,
        Metric::FloodCpu,
        Metric::ConnRate,
        Metric::ConnRateMany,
        Metric::LatencyP50,
        Metric::LatencyP99,
    ];

    fn label(self, o: &Options) -> String {
        match self {
            Metric::TcpBulk => "TCP bulk, 1 stream (Gbit/s)".into(),
            Metric::TcpCpu => "  CPU per GB delivered (core-seconds)".into(),
            Metric::TcpBulk4 => "TCP bulk, 4 streams (Gbit/s)".into(),
            Metric::IperfOffered => "UDP 64 B, 1 iperf3 sender: offered (Mpps)".into(),
            Metric::IperfDelivered => "UDP 64 B, 1 iperf3 sender: delivered (Mpps)".into(),
            Metric::IperfCpu => "  CPU per delivered packet (ns)".into(),
            Metric::FloodOffered => {
                format!("UDP 64 B, {} sendmmsg senders: offered (Mpps)", o.senders)
            }
            Metric::FloodDelivered => {
                format!("UDP 64 B, {} sendmmsg senders: delivered (Mpps)", o.senders)
            }
            Metric::FloodCpu => "  CPU per delivered packet (ns)".into(),
            Metric::ConnRate => format!("TCP connections/s ({} clients)", o.clients),
            Metric::ConnRateMany => format!("TCP connections/s ({} clients)", o.many_clients),
            Metric::LatencyP50 => "UDP 1 B request/response p50 (µs)".into(),
            Metric::LatencyP99 => "UDP 1 B request/response p99 (µs)".into(),
        }
    }

    /// The `--only` name of the measurement that produces this line.
    fn measurement(self) -> &'static str {
        match self {
            Metric::TcpBulk | Metric::TcpCpu => "tcp",
            Metric::TcpBulk4 => "tcp4",
            Metric::IperfOffered | Metric::IperfDelivered | Metric::IperfCpu => "iperf",
            Metric::FloodOffered | Metric::FloodDelivered | Metric::FloodCpu => "flood",
            Metric::ConnRate => "conn",
            Metric::ConnRateMany => "conn-many",
            Metric::LatencyP50 | Metric::LatencyP99 => "latency",
        }
    }

    /// Lower is better (the ratio is then kernel / userspace).
    fn lower_is_better(self) -> bool {
        matches!(
            self,
            Metric::TcpCpu
                | Metric::IperfCpu
                | Metric::FloodCpu
                | Metric::LatencyP50
                | Metric::LatencyP99
        )
    }

    fn format(self, v: f64) -> String {
        match self {
            Metric::TcpBulk | Metric::TcpCpu | Metric::TcpBulk4 => format!("{v:.2}"),
            Metric::IperfOffered
            | Metric::IperfDelivered
            | Metric::FloodOffered
            | Metric::FloodDelivered => format!("{v:.3}"),
            Metric::ConnRate | Metric::ConnRateMany | Metric::IperfCpu | Metric::FloodCpu => {
                format!("{v:.0}")
            }
            Metric::LatencyP50 | Metric::LatencyP99 => format!("{v:.1}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModeArg {
    Kernel,
    Userspace,
    /// Userspace, in a sync set with gateway 2.
    UserspaceSync,
}

impl ModeArg {
    fn label(self) -> &'static str {
        match self {
            ModeArg::Kernel => "kernel",
            ModeArg::Userspace => "userspace",
            ModeArg::UserspaceSync => "userspace-sync",
        }
    }
}

#[derive(Debug)]
struct Options {
    seconds: u64,
    rounds: usize,
    senders: usize,
    clients: usize,
    many_clients: usize,
    modes: Vec<ModeArg>,
    strict: bool,
    wait_idle: u64,
    /// Measurements to run, by short name (all when empty).
    only: Vec<String>,
}

impl Options {
    /// Whether `--only` (or its absence) selects the measurement of `m`.
    fn selected(&self, m: Metric) -> bool {
        self.only.is_empty() || self.only.iter().any(|n| n == m.measurement())
    }
}

const USAGE: &str =
    "usage: e2e [--quick] [--modes kernel,userspace,userspace-sync] [--seconds N] [--rounds N] \
[--senders N] [--clients N] [--many-clients N] [--wait-idle SECONDS] \
[--only tcp,tcp4,iperf,flood,conn,conn-many,latency] [--strict]";

/// The measurements, by the short name `--only` takes.
const MEASUREMENTS: [&str; 7] = [
    "tcp",
    "tcp4",
    "iperf",
    "flood",
    "conn",
    "conn-many",
    "latency",
];

fn parse_args() -> std::result::Result<Options, String> {
    let mut o = Options {
        seconds: 10,
        rounds: 1,
        senders: 2,
        clients: 2,
        many_clients: 32,
        modes: vec![ModeArg::Kernel, ModeArg::Userspace],
        strict: false,
        wait_idle: 0,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    let number = |name: &str, v: Option<String>| -> std::result::Result<u64, String> {
        v.and_then(|s| s.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name} needs a positive number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.seconds = 3,
            "--seconds" => o.seconds = number("--seconds", args.next())?,
            "--rounds" => o.rounds = to_usize(number("--rounds", args.next())?),
            "--senders" => o.senders = to_usize(number("--senders", args.next())?),
            "--clients" => o.clients = to_usize(number("--clients", args.next())?),
            "--many-clients" => {
                o.many_clients = to_usize(number("--many-clients", args.next())?);
            }
            "--strict" => o.strict = true,
            "--only" => {
                let v = args.next().ok_or("--only needs a list")?;
                for name in v.split(',') {
                    if !MEASUREMENTS.contains(&name) {
                        return Err(format!("--only: unknown measurement {name:?}"));
                    }
                    o.only.push(name.to_owned());
                }
            }
            "--wait-idle" => o.wait_idle = number("--wait-idle", args.next())?,
            "--modes" => {
                let v = args.next().ok_or("--modes needs a list")?;
                o.modes = v
                    .split(',')
                    .map(|m| match m.trim() {
                        "kernel" => Ok(ModeArg::Kernel),
                        "userspace" => Ok(ModeArg::Userspace),
                        "userspace-sync" => Ok(ModeArg::UserspaceSync),
                        other => Err(format!(
                            "unknown mode {other:?} (kernel, userspace or userspace-sync)"
                        )),
                    })
                    .collect::<std::result::Result<_, _>>()?;
                if o.modes.is_empty() {
                    return Err("--modes needs at least one mode".into());
                }
            }
            "-h" | "--help" => return Err(String::new()),
            // `cargo bench` passes --bench; ignore it.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

type Values = BTreeMap<Metric, f64>;
/// Per column, per metric: the values of each round, or the errors.
type Column = BTreeMap<Metric, Vec<std::result::Result<f64, String>>>;

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("e2e: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if tests::require_netns("e2e benchmark").is_none() {
        return;
    }
    if let Err(e) = tests::cmd::run("iperf3", &["--version"]) {
        eprintln!("e2e: iperf3 is needed: {e}");
        std::process::exit(1);
    }
    match run(&o) {
        Ok(failed) => std::process::exit(i32::from(failed)),
        Err(e) => {
            eprintln!("e2e: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs every round; prints the table. Returns whether the exit status should be a failure.
fn run(o: &Options) -> Result<bool> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load1: f64 = load
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if load1 > 0.5 {
        eprintln!(
            "e2e: warning: load average {load1:.2} before the run: other work on this machine will \
             skew the rates and the CPU figures"
        );
    }
    let mut spec = TopologySpec::standard(GatewayMode::Kernel);
    if o.modes.contains(&ModeArg::UserspaceSync) {
        // The sync peer. The pods' routes name gateway 1 only: gateway 2 carries no pod traffic. It
        // stays in kernel mode (no process, idle) except for the userspace-sync columns.
        spec.gateways.push(GatewayMode::Kernel);
    }
    spec.workers = std::env::var("XW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut topo = Topology::build(spec)?;
    for pod in topo.pods() {
        // Many short connections: use the whole port range so the client does not wrap quickly.
        pod.ns
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    }
    eprintln!(
        "e2e: topology {} built; {} s per measurement, {} round(s), modes {:?}",
        topo.prefix(),
        o.seconds,
        o.rounds,
        o.modes
    );
    let mut columns: Vec<Column> = vec![Column::new(); o.modes.len()];
    let mut first = true;
    let mut notes = Vec::new();
    for round in 1..=o.rounds {
        for (col, mode_arg) in o.modes.iter().enumerate() {
            eprintln!("e2e: round {round}, {mode_arg:?} mode");
            let values = measure_mode(&mut topo, *mode_arg, first, o, &mut notes);
            first = false;
            record(o, &mut columns[col], values);
        }
    }
    print_table(o, &columns);
    if !notes.is_empty() {
        println!();
        for n in &notes {
            println!("{n}");
        }
    }
    let kernel_failed = o.modes.iter().zip(&columns).any(|(m, c)| {
        *m == ModeArg::Kernel && c.values().flatten().any(std::result::Result::is_err)
    });
    let any_failed = columns
        .iter()
        .any(|c| c.values().flatten().any(std::result::Result::is_err));
    Ok(kernel_failed || (o.strict && any_failed))
}

fn record(o: &Options, column: &mut Column, values: std::result::Result<Values, String>) {
    for m in Metric::ALL.into_iter().filter(|m| o.selected(*m)) {
        let v = match &values {
            Ok(vals) => vals
                .get(&m)
                .copied()
                .ok_or_else(|| "not measured".to_owned()),
            Err(e) => Err(e.clone()),
        };
        column.entry(m).or_default().push(v);
    }
}

/// Puts gateway 1 into `mode` and runs all measurements. An error that stops the whole mode (binary
/// missing, gateway not ready, no path) is returned as `Err`; one failing measurement marks its own lines.
/// In userspace-sync mode, lines about the sync traffic are added to `notes`.
fn measure_mode(
    topo: &mut Topology,
    mode_arg: ModeArg,
    first: bool,
    o: &Options,
    notes: &mut Vec<String>,
) -> std::result::Result<Values, String> {
    let sync = mode_arg == ModeArg::UserspaceSync;
    let mode = match mode_arg {
        ModeArg::Kernel => GatewayMode::Kernel,
        ModeArg::Userspace | ModeArg::UserspaceSync => {
            GatewayMode::userspace().map_err(|e| e.to_string())?
        }
    };
    // Gateway 2 (present when userspace-sync is among the modes) runs the userspace gateway in the sync
    // set only for userspace-sync; otherwise it is in kernel mode: no process, no CPU, no sync traffic.
    if topo.gateways().len() >= 2 {
        topo.set_sync_sets(if sync { vec![vec![1, 2]] } else { Vec::new() });
        let want2 = if sync {
            mode.clone()
        } else {
            GatewayMode::Kernel
        };
        if *topo.gateway(2).mode() != want2 || sync {
            topo.set_gateway_mode(2, want2)
                .map_err(|e| format!("switch gateway 2 (sync peer): {e}"))?;
        }
        if sync {
            topo.gateway_mut(2)
                .wait_ready(Duration::from_secs(30))
                .map_err(|e| format!("gateway 2 (sync peer): {e}"))?;
        }
    }
    // The topology was built in kernel mode; every other column rebuilds the gateway namespace.
    if !(first && mode == GatewayMode::Kernel) {
        topo.set_gateway_mode(1, mode.clone())
            .map_err(|e| format!("switch to {} mode: {e}", mode_arg.label()))?;
    }
    topo.gateway_mut(1)
        .wait_ready(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    check_path(topo)
        .map_err(|e| format!("no path through the {} gateway: {e}", mode_arg.label()))?;

    let mut values = Values::new();
    type Measure = fn(&Topology, &Options) -> Result<Vec<(Metric, f64)>>;
    let measurements: [(&str, Measure); 7] = [
        ("TCP bulk", tcp_bulk),
        ("TCP bulk, 4 streams", tcp_bulk4),
        ("UDP iperf3", udp_iperf),
        ("UDP sendmmsg", udp_flood),
        ("TCP connection rate", tcp_conn_rate),
        ("TCP connection rate, many clients", tcp_conn_rate_many),
        ("latency", rr_latency),
    ];
    for ((name, measure), short) in measurements.into_iter().zip(MEASUREMENTS) {
        if !o.only.is_empty() && !o.only.iter().any(|n| n == short) {
            continue;
        }
        if o.wait_idle > 0 {
            wait_idle(Duration::from_secs(o.wait_idle));
        }
        let conn = sync && (short == "conn" || short == "conn-many");
        let before = if conn { sync_counters(topo).ok() } else { None };
        match measure(topo, o) {
            Ok(v) => values.extend(v),
            Err(e) => eprintln!("e2e: {} mode, {name}: {e}", mode_arg.label()),
        }
        if conn {
            notes.push(sync_note(topo, name, before));
        }
    }
    Ok(values)
}

/// Gateway 1's sync bytes sent and flows created so far, from its `/metrics`.
fn sync_counters(topo: &Topology) -> Result<(f64, f64)> {
    let m = topo.gateway(1).metrics()?;
    let tx = m
        .get("egress_gateway_sync_bytes_total", &[("direction", "tx")])
        .ok_or_else(|| Error::msg("no egress_gateway_sync_bytes_total{direction=\"tx\"}"))?;
    let flows = m
        .get("egress_gateway_flows_created_total", &[])
        .ok_or_else(|| Error::msg("no egress_gateway_flows_created_total"))?;
    Ok((tx, flows))
}

/// A line on the sync traffic of one connection-rate measurement in userspace-sync mode: gateway 1's sync
/// bytes sent per flow created (deltas since `before`), and the copies gateway 2 holds.
fn sync_note(topo: &Topology, name: &str, before: Option<(f64, f64)>) -> String {
    let sent = match (before, sync_counters(topo)) {
        (Some((tx0, f0)), Ok((tx1, f1))) => {
            let (bytes, flows) = (tx1 - tx0, f1 - f0);
            if flows > 0.0 {
                format!(
                    "{:.0} sync bytes sent per new flow ({bytes:.0} B, {flows:.0} flows)",
                    bytes / flows
                )
            } else {
                format!("{bytes:.0} sync bytes sent, no new flows")
            }
        }
        (None, _) => "sync counters not readable before".to_owned(),
        (_, Err(e)) => format!("sync counters: {e}"),
    };
    let copies = match topo.gateway(2).metrics() {
        Ok(m) => match m.get("egress_gateway_sync_copies", &[]) {
            Some(c) => format!("gateway 2 holds {c:.0} sync copies"),
            None => "gateway 2 shows no egress_gateway_sync_copies".to_owned(),
        },
        Err(e) => format!("gateway 2 metrics: {e}"),
    };
    format!("userspace-sync, {name}: {sent}; {copies}")
}

/// One TCP echo from each pod to the red server (resolves neighbours, proves the path).
fn check_path(topo: &Topology) -> Result<()> {
    let addr = SocketAddr::from((RED_SERVER, 7999));
    let server = traffic::tcp_echo_server(&topo.red().ns, addr)?;
    for pod in topo.pods() {
        let back = traffic::tcp_echo(&pod.ns, addr, b"path check")?;
        if back != b"path check" {
            tests::bail!("echo from {} came back wrong", pod.ip);
        }
    }
    drop(server);
    Ok(())
}

/// Starts `iperf3 -s -1` in the red server's namespace on `port` and waits until it listens.
fn iperf3_server(topo: &Topology, port: u16) -> Result<tests::Process> {
    let red = RED_SERVER.to_string();
    let p = port.to_string();
    let server = topo.spawn(
        &topo.red().ns,
        &["iperf3", "-s", "-1", "-B", &red, "-p", &p],
    )?;
    traffic::wait_tcp_listening(&topo.red().ns, port, Duration::from_secs(5))?;
    Ok(server)
}

/// Runs an iperf3 client in `ns` with `args`, returns its JSON report.
fn iperf3_client(
    topo: &Topology,
    ns: &Netns,
    args: &[&str],
    o: &Options,
) -> Result<serde_json::Value> {
    let mut cmd = vec!["iperf3", "-J", "--connect-timeout", "3000"];
    cmd.extend_from_slice(args);
    let mut client = topo.spawn(ns, &cmd)?;
    let status = client.wait_timeout(Duration::from_secs(o.seconds + 20))?;
    let text = client.log_text();
    let json = text
        .find('{')
        .zip(text.rfind('}'))
        .and_then(|(a, b)| serde_json::from_str::<serde_json::Value>(&text[a..=b]).ok())
        .ok_or_else(|| {
            Error::msg(format!(
                "iperf3 ({status}) printed no JSON: {}",
                text.trim()
            ))
        })?;
    if let Some(e) = json.get("error").and_then(|e| e.as_str()) {
        tests::bail!("iperf3: {e}");
    }
    if !status.success() {
        tests::bail!("iperf3 exited with {status}");
    }
    Ok(json)
}

fn json_f64(v: &serde_json::Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn tcp_bulk(topo: &Topology, o: &Options) -> Result<Vec<(Metric, f64)>> {
    let _server = iperf3_server(topo, 5201)?;
    let secs = o.seconds.to_string();
    let red = RED_SERVER.to_string();
    let background = background_busy(Duration::from_secs(1))?;
    let (cpu0, t0) = (cpu_busy_seconds()?, Instant::now());
    let json = iperf3_client(
        topo,
        &topo.pod(1, 1).ns,
        &["-c", &red, "-p", "5201", "-t", &secs],
        o,
    )?;
    let busy = cpu_busy_seconds()? - cpu0 - background * t0.elapsed().as_secs_f64();
    let bps = json_f64(&json, &["end", "sum_received", "bits_per_second"])
        .ok_or_else(|| Error::msg("iperf3 JSON has no end.sum_received.bits_per_second"))?;
    let bytes = json_f64(&json, &["end", "sum_received", "bytes"])
        .ok_or_else(|| Error::msg("iperf3 JSON has no end.sum_received.bytes"))?;
    let mut v = vec![(Metric::TcpBulk, bps / 1e9)];
    if bytes > 0.0 && busy > 0.0 {
        v.push((Metric::TcpCpu, busy / (bytes / 1e9)));
    }
    Ok(v)
}

fn tcp_bulk4(topo: &Topology, o: &Options) -> Result<Vec<(Metric, f64)>> {
    let _server = iperf3_server(topo, 5202)?;
    let secs = o.seconds.to_string();
    let red = RED_SERVER.to_string();
    let json = iperf3_client(
        topo,
        &topo.pod(1, 1).ns,
        &["-c", &red, "-p", "5202", "-t", &secs, "-P", "4"],
        o,
    )?;
    let bps = json_f64(&json, &["end", "sum_received", "bits_per_second"])
        .ok_or_else(|| Error::msg("iperf3 JSON has no end.sum_received.bits_per_second"))?;
    Ok(vec![(Metric::TcpBulk4, bps / 1e9)])
}

/// Busy CPU time of all cores so far (from /proc/stat), in seconds.
fn cpu_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| Error::msg("no cpu line in /proc/stat"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(busy as f64 / hz)
}

/// Busy CPU time per second of wall time (in cores) over `over`, while this benchmark sends nothing:
/// other work on the machine, subtracted from the CPU figures.
fn background_busy(over: Duration) -> Result<f64> {
    let (b0, t0) = (cpu_busy_seconds()?, Instant::now());
    std::thread::sleep(over);
    Ok((cpu_busy_seconds()? - b0) / t0.elapsed().as_secs_f64())
}

/// On a shared machine: waits up to `max` until other work uses less than a quarter of a core.
fn wait_idle(max: Duration) {
    let start = Instant::now();
    loop {
        match background_busy(Duration::from_secs(1)) {
            Ok(busy) if busy < 0.25 => return,
            Ok(busy) if start.elapsed() >= max => {
                eprintln!("e2e: warning: still {busy:.2} cores busy with other work after {max:?}; measuring anyway");
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Counters around a UDP load: datagrams the senders sent, datagrams that reached the server, CPU.
struct UdpWindow<'a> {
    senders: Vec<&'a Netns>,
    server: &'a Netns,
    sent: Vec<UdpCounters>,
    received: UdpCounters,
    cpu: f64,
    background: f64,
    opened: Instant,
}

impl<'a> UdpWindow<'a> {
    fn open(senders: Vec<&'a Netns>, server: &'a Netns, o: &Options) -> Result<Self> {
        let background = background_busy(Duration::from_millis(if o.seconds < 5 {
            500
        } else {
            1000
        }))?;
        let sent = senders
            .iter()
            .map(|ns| UdpCounters::read(ns))
            .collect::<Result<_>>()?;
        let received = UdpCounters::read(server)?;
        Ok(Self {
            senders,
            server,
            sent,
            received,
            cpu: cpu_busy_seconds()?,
            background,
            opened: Instant::now(),
        })
    }

    /// (offered pps, delivered pps, CPU ns per delivered packet) over `seconds`. The CPU figure is the
    /// busy time of all cores during the window minus the background measured just before it.
    fn close(self, seconds: f64) -> Result<(f64, f64, f64)> {
        let busy = cpu_busy_seconds()? - self.cpu;
        let wall = self.opened.elapsed().as_secs_f64();
        let received = UdpCounters::read(self.server)?.received_since(&self.received);
        let mut sent = 0;
        for (ns, before) in self.senders.iter().zip(&self.sent) {
            sent += UdpCounters::read(ns)?.sent_since(before);
        }
        if received == 0 {
            tests::bail!("no datagram reached the server ({sent} sent)");
        }
        let cpu = (busy - self.background * wall).max(0.0);
        eprintln!(
            "e2e:   CPU busy {busy:.2} s over {wall:.2} s; background before the run {:.2} cores, subtracted",
            self.background
        );
        Ok((
            sent as f64 / seconds,
            received as f64 / seconds,
            cpu * 1e9 / received as f64,
        ))
    }
}

fn udp_iperf(topo: &Topology, o: &Options) -> Result<Vec<(Metric, f64)>> {
    let _server = iperf3_server(topo, 5202)?;
    let pod = &topo.pod(1, 1).ns;
    let window = UdpWindow::open(vec![pod], &topo.red().ns, o)?;
    let secs = o.seconds.to_string();
    let red = RED_SERVER.to_string();
    let json = iperf3_client(
        topo,
        pod,
        &[
            "-c", &red, "-p", "5202", "-u", "-l", "64", "-b", "0", "-t", &secs,
        ],
        o,
    )?;
    let seconds = json_f64(&json, &["end", "sum", "seconds"])
        .or_else(|| json_f64(&json, &["end", "sum_sent", "seconds"]))
        .filter(|s| *s > 0.0)
        .unwrap_or(o.seconds as f64);
    let (offered, delivered, cpu) = window.close(seconds)?;
    Ok(vec![
        (Metric::IperfOffered, offered / 1e6),
        (Metric::IperfDelivered, delivered / 1e6),
        (Metric::IperfCpu, cpu),
    ])
}

fn udp_flood(topo: &Topology, o: &Options) -> Result<Vec<(Metric, f64)>> {
    let target = SocketAddr::from((RED_SERVER, 9000));
    let stop = Arc::new(AtomicBool::new(false));
    // The server socket: drained by a thread so that it exists and empties; the count comes from
    // /proc/net/snmp (datagrams that reached the UDP layer, drained or not).
    let s = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = topo.red().ns.thread(move || -> Result<()> {
        let sock = UdpSocket::bind(target)?;
        set_rcvbuf(&sock, 8 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 2048];
        while !s.load(Ordering::Relaxed) {
            let _ = sock.recv(&mut buf);
        }
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| Error::msg("UDP receiver did not start"))?;

    let pods: Vec<&Netns> = (0..o.senders)
        .map(|i| &topo.pods()[i % topo.pods().len()].ns)
        .collect();
    let mut window_ns: Vec<&Netns> = pods.clone();
    window_ns.sort_by_key(|n| n.name().to_owned());
    window_ns.dedup_by_key(|n| n.name().to_owned());
    let window = UdpWindow::open(window_ns, &topo.red().ns, o)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(o.seconds);
    let senders = pods
        .iter()
        .map(|ns| ns.thread(move || traffic::udp_flood(target, 64, deadline)))
        .collect::<Result<Vec<_>>>()?;
    let mut errors = Vec::new();
    for t in senders {
        match t.join_timeout(Duration::from_secs(o.seconds + 10)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) | Err(e) => errors.push(e.to_string()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last packets drain through the path before the counters are read.
    std::thread::sleep(Duration::from_millis(100));
    let result = window.close(elapsed);
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join_timeout(Duration::from_secs(2));
    if !errors.is_empty() {
        tests::bail!("sender failed: {}", errors.join("; "));
    }
    let (offered, delivered, cpu) = result?;
    Ok(vec![
        (Metric::FloodOffered, offered / 1e6),
        (Metric::FloodDelivered, delivered / 1e6),
        (Metric::FloodCpu, cpu),
    ])
}

/// The size of `T` as a socklen_t (socket option values are a few bytes).
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: setsockopt reads one c_int from a valid pointer; the socket is open. SO_RCVBUFFORCE (root)
    // lifts net.core.rmem_max; failure only means a smaller buffer.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&bytes).cast(),
            socklen::<libc::c_int>(),
        );
    }
}

/// Closes with RST (SO_LINGER 0): no TIME_WAIT, so ports are not exhausted by the connection loop.
fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one `linger` from a valid pointer; the socket is open.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            socklen::<libc::linger>(),
        );
    }
}

fn tcp_conn_rate(topo: &Topology, o: &Options) -> Result<Vec<(Metric, f64)>> {
    Ok(vec![(
        Metric::ConnRate,
        conn_rate(topo, o, o.clients, 9100)?,
    )])
}

fn tcp_conn_rate_many(topo: &Topology, o: &Options) -> Result<Vec<(Metric, f64)>> {
    Ok(vec![(
        Metric::ConnRateMany,
        conn_rate(topo, o, o.many_clients, 9101)?,
    )])
}

/// Connections per second from `clients` threads spread over the pods, to the red server on `port`.
fn conn_rate(topo: &Topology, o: &Options, clients: usize, port: u16) -> Result<f64> {
    let addr = SocketAddr::from((RED_SERVER, port));
    let listener = topo.red().ns.run(Duration::from_secs(5), move || {
        let l = TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(l)
    })??;
    let stop = Arc::new(AtomicBool::new(false));
    // Four accepting threads (the listener already lives in the server's namespace), each serving one
    // connection at a time until the client's RST, whatever the number of clients (one thread per client
    // was tried with 32 clients and gave lower rates in both modes, 16,063 and 7,817 per second).
    let mut acceptors = Vec::new();
    for _ in 0..4 {
        let l = listener.try_clone()?;
        let stop = stop.clone();
        acceptors.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {
                            // Wait for the client's RST (or FIN) so the server never holds TIME_WAIT.
                            let _ = s.read(&mut b);
                        }
                    }
                    Err(_) => {
                        let mut pfd = libc::pollfd {
                            fd: l.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd, count 1.
                        unsafe { libc::poll(&mut pfd, 1, 50) };
                    }
                }
            }
        }));
    }
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let drops_before = gateway_drops(topo);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(o.seconds);
    let clients = (0..clients)
        .map(|i| {
            let pod = &topo.pods()[i % topo.pods().len()].ns;
            let (ok, failed) = (ok.clone(), failed.clone());
            pod.thread(move || {
                while Instant::now() < deadline {
                    let r = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                        s.set_read_timeout(Some(Duration::from_secs(1)))?;
                        s.write_all(&[1])?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        set_linger_zero(&s);
                        Ok(())
                    })();
                    match r {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "e2e: connection rate: first failure after {:?}: {e}",
                                    start.elapsed()
                                );
                            }
                        }
                    }
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for c in clients {
        c.join_timeout(Duration::from_secs(o.seconds + 10))?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for a in acceptors {
        let _ = a.join();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    if ok == 0 {
        tests::bail!("no connection completed ({failed} failed)");
    }
    if failed > 0 {
        eprintln!(
            "e2e: connection rate: {failed} of {} connections failed",
            ok + failed
        );
        // What the userspace gateway dropped meanwhile, by reason (nothing in kernel mode).
        let after = gateway_drops(topo);
        for (reason, n) in &after {
            let was = drops_before
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0.0, |d| d.1);
            if *n > was {
                eprintln!("e2e:   gateway dropped {} as {reason}", n - was);
            }
        }
    }
    Ok(ok as f64 / elapsed)
}

/// The userspace gateway's `egress_gateway_drops_total` by reason (empty in kernel mode).
fn gateway_drops(topo: &Topology) -> Vec<(String, f64)> {
    let Ok(m) = topo.gateway(1).metrics() else {
        return Vec::new();
    };
    m.samples()
        .iter()
        .filter(|s| s.name == "egress_gateway_drops_total")
        .map(|s| {
            let reason = s.labels.iter().find(|(k, _)| k == "reason");
            (reason.map_or_else(String::new, |r| r.1.clone()), s.value)
        })
        .collect()
}

fn rr_latency(topo: &Topology, o: &Options) -> Result<Vec<(Metric, f64)>> {
    let addr = SocketAddr::from((RED_SERVER, 9200));
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = topo.red().ns.thread(move || -> Result<()> {
        let sock = UdpSocket::bind(addr)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        while !s.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], peer);
            }
        }
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| Error::msg("UDP echo server did not start"))?;
    let seconds = o.seconds;
    let result = topo.pod(1, 1).ns.run(
        Duration::from_secs(seconds + 10),
        move || -> Result<(Vec<Duration>, u64)> {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.connect(addr)?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut rtts = Vec::new();
            let mut lost = 0u64;
            let mut seq = 0u8;
            let mut buf = [0u8; 64];
            while Instant::now() < deadline {
                seq = seq.wrapping_add(1);
                let t0 = Instant::now();
                sock.send(&[seq])?;
                // Skip late answers to earlier, timed-out requests.
                loop {
                    match sock.recv(&mut buf) {
                        Ok(1) if buf[0] == seq => {
                            rtts.push(t0.elapsed());
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            lost += 1;
                            break;
                        }
                    }
                }
            }
            Ok((rtts, lost))
        },
    );
    stop.store(true, Ordering::Relaxed);
    let _ = server.join_timeout(Duration::from_secs(2));
    let (mut rtts, lost) = result??;
    // The first exchanges warm caches and neighbours.
    let warm = rtts.len().min(100);
    rtts.drain(..warm);
    if rtts.is_empty() {
        tests::bail!("no answers ({lost} requests lost)");
    }
    rtts.sort_unstable();
    let pct = |p: u8| -> f64 {
        // Nearest rank: the smallest value with at least p of the samples at or below it.
        let rank = rtts.len().saturating_mul(usize::from(p)).div_ceil(100);
        rtts[rank.clamp(1, rtts.len()) - 1].as_secs_f64() * 1e6
    };
    Ok(vec![
        (Metric::LatencyP50, pct(50)),
        (Metric::LatencyP99, pct(99)),
    ])
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// The summary of one cell: the median of its rounds, or the first error.
fn cell(
    values: Option<&Vec<std::result::Result<f64, String>>>,
) -> std::result::Result<f64, String> {
    let Some(values) = values else {
        return Err("not measured".into());
    };
    let ok: Vec<f64> = values
        .iter()
        .filter_map(|v| v.as_ref().ok().copied())
        .collect();
    if ok.is_empty() {
        let e = values
            .iter()
            .find_map(|v| v.as_ref().err().cloned())
            .unwrap_or_else(|| "not measured".into());
        return Err(e);
    }
    Ok(median(&ok))
}

fn print_table(o: &Options, columns: &[Column]) {
    let labels: Vec<&str> = o.modes.iter().map(|m| m.label()).collect();
    let width = Metric::ALL
        .iter()
        .map(|m| m.label(o).chars().count())
        .max()
        .unwrap_or(10);
    let widths: Vec<usize> = labels.iter().map(|l| l.len().max(10)).collect();
    let mut header = format!("{:width$}", "metric");
    for (l, w) in labels.iter().zip(&widths) {
        header.push_str(&format!(" | {l:>w$}"));
    }
    // Ratio columns (candidate, baseline): each userspace column against kernel, userspace-sync
    // against plain userspace; with two columns and no such pair, the second against the first.
    let find = |m: ModeArg| o.modes.iter().position(|x| *x == m);
    let mut pairs = Vec::new();
    if let Some(k) = find(ModeArg::Kernel) {
        for m in [ModeArg::Userspace, ModeArg::UserspaceSync] {
            if let Some(c) = find(m) {
                pairs.push((c, k));
            }
        }
    }
    if let (Some(c), Some(u)) = (find(ModeArg::UserspaceSync), find(ModeArg::Userspace)) {
        pairs.push((c, u));
    }
    if pairs.is_empty() && labels.len() == 2 {
        pairs.push((1, 0));
    }
    let short = |m: ModeArg| match m {
        ModeArg::Kernel => "kernel",
        ModeArg::Userspace => "us",
        ModeArg::UserspaceSync => "sync",
    };
    let ratio_names: Vec<String> = if pairs.len() == 1 {
        vec!["ratio".to_owned()]
    } else {
        pairs
            .iter()
            .map(|(c, b)| format!("{}/{}", short(o.modes[*c]), short(o.modes[*b])))
            .collect()
    };
    for n in &ratio_names {
        header.push_str(&format!(" | {n}"));
    }
    println!();
    println!(
        "End-to-end, {} s per measurement, median of {} round(s){}",
        o.seconds,
        o.rounds,
        match pairs.len() {
            0 => String::new(),
            1 => format!(
                "; ratio ≥ 1.0 means {} is at least as good as {}",
                labels[pairs[0].0], labels[pairs[0].1]
            ),
            _ => "; a ratio a/b ≥ 1.0 means a is at least as good as b \
                  (us = userspace, sync = userspace-sync)"
                .to_owned(),
        }
    );
    println!("{header}");
    println!("{}", "-".repeat(header.chars().count()));
    let mut errors = Vec::new();
    for m in Metric::ALL.into_iter().filter(|m| o.selected(*m)) {
        let mut line = format!("{:width$}", m.label(o));
        let cells: Vec<_> = columns.iter().map(|c| cell(c.get(&m))).collect();
        for (col, c) in cells.iter().enumerate() {
            let w = widths[col];
            match c {
                Ok(v) => line.push_str(&format!(" | {:>w$}", m.format(*v))),
                Err(e) => {
                    line.push_str(&format!(" | {:>w$}", "error"));
                    errors.push((
                        format!("{} / {}", labels[col], m.label(o).trim()),
                        e.clone(),
                    ));
                }
            }
        }
        for ((c, b), name) in pairs.iter().zip(&ratio_names) {
            let w = name.len();
            match (&cells[*b], &cells[*c]) {
                (Ok(a), Ok(b)) if *a > 0.0 && *b > 0.0 => {
                    let r = if m.lower_is_better() { a / b } else { b / a };
                    line.push_str(&format!(" | {:>w$}", format!("{r:.2}")));
                }
                _ => line.push_str(&format!(" | {:>w$}", "-")),
            }
        }
        println!("{line}");
    }
    if !errors.is_empty() {
        println!();
        // One error per line; repeated causes (a mode that did not start) are shown once.
        let mut seen = std::collections::BTreeSet::new();
        for (which, why) in errors {
            if seen.insert(why.clone()) {
                println!("error: {which}: {why}");
            } else {
                println!("error: {which}: (same error as above)");
            }
        }
    }
}
