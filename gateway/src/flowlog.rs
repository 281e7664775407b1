//! The NAT translation log: a thread that takes the flow table's start and end records
//! ([`FlowEvents`]) and writes one JSON line per record to stdout or to a file rotated by size.
//!
//! The data path only pushes into a bounded lock-free queue and never waits: when this writer falls behind,
//! the queue fills and further records are dropped and counted (`egress_gateway_flow_log_records_total`
//! `{result="dropped"}`). Writing and rotating happen here, off the data path.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forwarder_core::conntrack::{FlowEvent, FlowEventKind, FlowEvents, TcpState};
use forwarder_core::flow::Proto;
use forwarder_core::Instant;

use crate::config::{FlowLogConfig, FlowLogOutput};

/// Maps the data path's clock (milliseconds since the gateway's epoch) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WallClock {
    /// Wall-clock time at the epoch, in milliseconds since 1970.
    epoch_unix_ms: u64,
}

impl WallClock {
    /// The clock whose epoch (`Instant::ZERO`) is `epoch`, an `std::time::Instant` taken now or earlier.
    pub(crate) fn new(epoch: std::time::Instant) -> WallClock {
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let since_epoch = epoch.elapsed();
        let ms = now_unix.saturating_sub(since_epoch).as_millis();
        WallClock {
            epoch_unix_ms: u64::try_from(ms).unwrap_or(0),
        }
    }

    /// A clock with a fixed epoch (tests).
    #[cfg(test)]
    pub(crate) fn at(epoch_unix_ms: u64) -> WallClock {
        WallClock { epoch_unix_ms }
    }

    /// `at` in RFC 3339 UTC with milliseconds.
    pub(crate) fn format(&self, at: Instant) -> String {
        rfc3339(self.epoch_unix_ms.saturating_add(at.as_millis()))
    }
}

/// `2026-11-26T18:30:01.216Z` for milliseconds since 1970.
fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        unix_ms % 1000
    )
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
        Proto::Icmpv6 => "icmpv6",
    }
}

fn tcp_state_name(s: TcpState) -> &'static str {
    match s {
        TcpState::SynSent => "syn_sent",
        TcpState::SynReceived => "syn_received",
        TcpState::Established => "established",
        TcpState::Closing => "closing",
        TcpState::TimeWait => "time_wait",
        TcpState::Closed => "closed",
    }
}

/// One record as a JSON line (without the newline). `uplinks` names the uplinks by index; `pod_name` is the
/// pod's `namespace/name` when known.
pub(crate) fn json_line(
    e: &FlowEvent,
    clock: &WallClock,
    uplinks: &[String],
    pod_name: Option<&str>,
) -> String {
    render(e, clock, uplinks, pod_name, false)
}

/// A live flow (`egress-gateway flows`): `"event":"live"` and its last packet as `"last"`.
pub(crate) fn live_line(
    e: &FlowEvent,
    clock: &WallClock,
    uplinks: &[String],
    pod_name: Option<&str>,
) -> String {
    render(e, clock, uplinks, pod_name, true)
}

fn render(
    e: &FlowEvent,
    clock: &WallClock,
    uplinks: &[String],
    pod_name: Option<&str>,
    live: bool,
) -> String {
    let uplink = uplinks
        .get(usize::from(e.uplink))
        .map_or_else(|| e.uplink.to_string(), Clone::clone);
    let mut s = String::with_capacity(320);
    let event = match (live, e.kind) {
        (true, _) => "live",
        (false, FlowEventKind::Start) => "start",
        (false, FlowEventKind::End) => "end",
    };
    s.push_str(&format!(
        "{{\"event\":\"{event}\",\"start\":\"{}\"",
        clock.format(e.created)
    ));
    if live {
        s.push_str(&format!(",\"last\":\"{}\"", clock.format(e.last_seen)));
    } else if e.kind == FlowEventKind::End {
        s.push_str(&format!(",\"end\":\"{}\"", clock.format(e.last_seen)));
    }
    s.push_str(&format!(
        ",\"proto\":\"{}\",\"pod\":\"{}\"",
        proto_name(e.proto),
        endpoint(e.pod.0, e.pod.1)
    ));
    if let Some(name) = pod_name {
        s.push_str(&format!(",\"pod_name\":\"{}\"", json_escape(name)));
    }
    s.push_str(&format!(
        ",\"node\":\"{}\",\"egress\":\"{}\",\"dst\":\"{}\",\"uplink\":\"{}\"",
        e.node,
        endpoint(e.egress.0, e.egress.1),
        endpoint(e.dst.0, e.dst.1),
        json_escape(&uplink),
    ));
    let c = e.counters;
    s.push_str(&format!(
        ",\"packets_out\":{},\"bytes_out\":{},\"packets_in\":{},\"bytes_in\":{}",
        c.packets_out, c.bytes_out, c.packets_in, c.bytes_in
    ));
    if let Some(state) = e.tcp_state {
        s.push_str(&format!(",\"tcp_state\":\"{}\"", tcp_state_name(state)));
    }
    s.push('}');
    s
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Pod addresses → `namespace/name`, from the Pod objects of `flow_log.pod_names` (files or directories of
/// Kubernetes YAML, re-read when they change). Shared by the writer and `GET /flows`.
#[derive(Debug, Default)]
pub(crate) struct PodNames {
    inputs: Vec<PathBuf>,
    state: std::sync::Mutex<(
        crate::inventory::Fingerprint,
        std::collections::HashMap<IpAddr, String>,
    )>,
}

impl PodNames {
    /// Names from `inputs` (none: no names). Reads them now; a problem is logged and leaves no names.
    pub(crate) fn new(inputs: Vec<PathBuf>) -> PodNames {
        let names = PodNames {
            inputs,
            state: std::sync::Mutex::default(),
        };
        names.refresh();
        names
    }

    /// Re-reads the inputs if they changed (cheap otherwise: one `stat` per file).
    pub(crate) fn refresh(&self) {
        if self.inputs.is_empty() {
            return;
        }
        let files = match crate::inventory::input_files(&self.inputs) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "flow log: pod names not read");
                return;
            }
        };
        let fp = crate::inventory::fingerprint(&files);
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.0 == fp {
            return;
        }
        state.0 = fp;
        match crate::inventory::load_files(&files) {
            Ok(inv) => {
                state.1 = inv
                    .pods()
                    .flat_map(|p| {
                        let name = format!("{}/{}", p.namespace, p.name);
                        p.ip.iter().map(move |ip| (*ip, name.clone()))
                    })
                    .collect();
                tracing::info!(pods = state.1.len(), "flow log: pod names read");
            }
            Err(errors) => {
                let first = errors.first().map(ToString::to_string).unwrap_or_default();
                tracing::warn!(error = %first, "flow log: pod names not read; the previous ones stay");
            }
        }
    }

    /// The pod's `namespace/name`, when known.
    pub(crate) fn get(&self, ip: IpAddr) -> Option<String> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.1.get(&ip).cloned()
    }
}

/// Which live flows `GET /flows` lists: all filters must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FlowFilter {
    /// The pod's address.
    pub(crate) pod: Option<IpAddr>,
    /// The egress (external) port.
    pub(crate) egress_port: Option<u16>,
    /// The destination address.
    pub(crate) dst: Option<IpAddr>,
    /// At most this many lines.
    pub(crate) limit: usize,
}

impl FlowFilter {
    /// From a query string (`pod=10.244.1.5&egress_port=40000&dst=192.0.2.10&limit=100`).
    pub(crate) fn from_query(query: &str) -> Result<FlowFilter, String> {
        let get = |k: &str| crate::http::query_value(query, k).filter(|v| !v.is_empty());
        let ip = |k: &str| -> Result<Option<IpAddr>, String> {
            get(k)
                .map(|v| {
                    v.trim_matches(|c| c == '[' || c == ']')
                        .parse()
                        .map_err(|_| format!("{k}: `{v}` is not an IP address"))
                })
                .transpose()
        };
        Ok(FlowFilter {
            pod: ip("pod")?,
            dst: ip("dst")?,
            egress_port: get("egress_port")
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("egress_port: `{v}` is not a port"))
                })
                .transpose()?,
            limit: get("limit")
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("limit: `{v}` is not a number"))
                })
                .transpose()?
                .unwrap_or(10_000),
        })
    }

    /// Whether `e` passes.
    pub(crate) fn matches(&self, e: &FlowEvent) -> bool {
        self.pod.is_none_or(|p| p == e.pod.0)
            && self.dst.is_none_or(|d| d == e.dst.0)
            && self.egress_port.is_none_or(|p| p == e.egress.1)
    }
}

/// Counters of the writer, read by the metrics.
#[derive(Debug, Default)]
pub(crate) struct FlowLogStats {
    /// Lines written.
    pub(crate) written: AtomicU64,
    /// Write errors (the line is lost; the writer reopens the file).
    pub(crate) errors: AtomicU64,
}

/// Where lines go: stdout, or a file rotated at `max_bytes` keeping `max_files` old ones.
struct Sink {
    out: BufWriter<Box<dyn Write + Send>>,
    file: Option<(PathBuf, u64, u32)>,
    size: u64,
}

impl Sink {
    fn open(output: &FlowLogOutput, max_bytes: u64, max_files: u32) -> io::Result<Sink> {
        match output {
            FlowLogOutput::Stdout => Ok(Sink {
                out: BufWriter::new(Box::new(io::stdout())),
                file: None,
                size: 0,
            }),
            FlowLogOutput::File(path) => {
                let (file, size) = open_append(path)?;
                Ok(Sink {
                    out: BufWriter::with_capacity(1 << 16, Box::new(file)),
                    file: Some((path.clone(), max_bytes, max_files)),
                    size,
                })
            }
        }
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        if let Some((path, max_bytes, max_files)) = &self.file {
            if self.size >= *max_bytes {
                self.out.flush()?;
                rotate(path, *max_files)?;
                let (file, size) = open_append(path)?;
                self.out = BufWriter::with_capacity(1 << 16, Box::new(file));
                self.size = size;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn open_append(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let size = file.metadata().map_or(0, |m| m.len());
    Ok((file, size))
}

/// `path` → `path.1`, `path.1` → `path.2`, …; the oldest beyond `keep` is deleted.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    };
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

/// The running writer.
pub(crate) struct FlowLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlowLog {
    /// Opens the output (so that a bad path fails at start-up) and starts the writer thread.
    pub(crate) fn start(
        config: &FlowLogConfig,
        events: Arc<FlowEvents>,
        clock: WallClock,
        uplinks: Vec<String>,
        names: Arc<PodNames>,
        stats: Arc<FlowLogStats>,
    ) -> io::Result<FlowLog> {
        let mut sink = Sink::open(&config.output, config.max_bytes, config.max_files)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let starts = config.starts;
        let output = config.output.clone();
        let (max_bytes, max_files) = (config.max_bytes, config.max_files);
        let thread = std::thread::Builder::new()
            .name("flow-log".into())
            .spawn(move || {
                let mut last_refresh = std::time::Instant::now();
                loop {
                    let last = stopping.load(Ordering::Acquire);
                    if last_refresh.elapsed() >= Duration::from_secs(2) {
                        names.refresh();
                        last_refresh = std::time::Instant::now();
                    }
                    let mut wrote = false;
                    while let Some(e) = events.pop() {
                        if e.kind == FlowEventKind::Start && !starts {
                            continue;
                        }
                        let name = names.get(e.pod.0);
                        let line = json_line(&e, &clock, &uplinks, name.as_deref());
                        match sink.write_line(&line) {
                            Ok(()) => {
                                stats.written.fetch_add(1, Ordering::Relaxed);
                                wrote = true;
                            }
                            Err(err) => {
                                stats.errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %err, "flow log: write failed; reopening");
                                if let Ok(s) = Sink::open(&output, max_bytes, max_files) {
                                    sink = s;
                                } else {
                                    std::thread::sleep(Duration::from_secs(1));
                                }
                            }
                        }
                    }
                    if wrote || last {
                        let _ = sink.flush();
                    }
                    if last {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })?;
        Ok(FlowLog {
            stop,
            thread: Some(thread),
        })
    }

    /// Writes what is queued, flushes and stops the thread.
    pub(crate) fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forwarder_core::conntrack::FlowCounters;

    fn event(kind: FlowEventKind) -> FlowEvent {
        FlowEvent {
            kind,
            proto: Proto::Tcp,
            pod: ("10.244.1.1".parse().unwrap(), 41012),
            egress: ("203.0.113.10".parse().unwrap(), 51234),
            dst: ("2001:db8::10".parse().unwrap(), 443),
            node: "172.18.0.11".parse().unwrap(),
            uplink: 0,
            created: Instant::from_millis(1_000),
            last_seen: Instant::from_millis(3_816),
            at: Instant::from_millis(300_000),
            counters: FlowCounters {
                packets_out: 12,
                bytes_out: 1840,
                packets_in: 10,
                bytes_in: 15210,
            },
            tcp_state: Some(TcpState::Closed),
        }
    }

    #[test]
    fn filters_from_queries() {
        let f =
            FlowFilter::from_query("pod=10.244.1.1&egress_port=51234&dst=%5B2001%3Adb8%3A%3A10%5D")
                .unwrap();
        assert!(f.matches(&event(FlowEventKind::End)));
        assert_eq!(f.limit, 10_000);
        let f = FlowFilter::from_query("pod=10.244.1.2").unwrap();
        assert!(!f.matches(&event(FlowEventKind::End)));
        let f = FlowFilter::from_query("egress_port=1&limit=5").unwrap();
        assert!(!f.matches(&event(FlowEventKind::End)));
        assert_eq!(f.limit, 5);
        assert!(FlowFilter::from_query("")
            .unwrap()
            .matches(&event(FlowEventKind::Start)));
        assert_eq!(
            FlowFilter::from_query("pod=nope").unwrap_err(),
            "pod: `nope` is not an IP address"
        );
    }

    #[test]
    fn pod_names_come_from_pod_objects_and_follow_changes() {
        let dir = std::env::temp_dir().join(format!("egress-podnames-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pods = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{ name: {name}, namespace: app }}\n\
                 status: {{ podIP: 10.244.1.1, podIPs: [ {{ ip: 10.244.1.1 }}, {{ ip: \"fd00:244:1::1\" }} ] }}\n"
            )
        };
        std::fs::write(dir.join("pods.yaml"), pods("web")).unwrap();
        let names = PodNames::new(vec![dir.clone()]);
        assert_eq!(
            names.get("10.244.1.1".parse().unwrap()).as_deref(),
            Some("app/web")
        );
        assert_eq!(
            names.get("fd00:244:1::1".parse().unwrap()).as_deref(),
            Some("app/web")
        );
        assert_eq!(names.get("10.244.1.2".parse().unwrap()), None);
        // A changed file (another size) is read again; a broken one keeps the previous names.
        std::fs::write(dir.join("pods.yaml"), pods("web-2")).unwrap();
        names.refresh();
        assert_eq!(
            names.get("10.244.1.1".parse().unwrap()).as_deref(),
            Some("app/web-2")
        );
        std::fs::write(dir.join("pods.yaml"), "kind: Pod\nmetadata: [\n").unwrap();
        names.refresh();
        assert_eq!(
            names.get("10.244.1.1".parse().unwrap()).as_deref(),
            Some("app/web-2")
        );
        assert_eq!(PodNames::default().get("10.244.1.1".parse().unwrap()), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dates_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_717_801_216), "2026-11-26T18:30:01.216Z");
    }

    #[test]
    fn a_record_is_one_json_line() {
        let clock = WallClock::at(1_795_717_800_216);
        let line = json_line(&event(FlowEventKind::End), &clock, &["dmz".into()], None);
        assert_eq!(
            line,
            "{\"event\":\"end\",\"start\":\"2026-11-26T18:30:01.216Z\",\"end\":\"2026-11-26T18:30:04.032Z\",\
             \"proto\":\"tcp\",\"pod\":\"10.244.1.1:41012\",\"node\":\"172.18.0.11\",\"egress\":\"203.0.113.10:51234\",\
             \"dst\":\"[2001:db8::10]:443\",\"uplink\":\"dmz\",\"packets_out\":12,\"bytes_out\":1840,\
             \"packets_in\":10,\"bytes_in\":15210,\"tcp_state\":\"closed\"}"
        );
        let start = json_line(&event(FlowEventKind::Start), &clock, &[], Some("app/web"));
        assert!(
            start.contains("\"pod\":\"10.244.1.1:41012\",\"pod_name\":\"app/web\",\"node\""),
            "{start}"
        );
        assert!(start.starts_with("{\"event\":\"start\",\"start\":"));
        assert!(!start.contains("\"end\""));
        assert!(start.contains("\"uplink\":\"0\""));
        assert_eq!(json_escape("a\"b\\c\n"), "a\\\"b\\\\c\\u000a");
        let live = live_line(&event(FlowEventKind::End), &clock, &[], None);
        assert!(live.starts_with("{\"event\":\"live\",\"start\":\"2026-11-26T18:30:01.216Z\",\"last\":\"2026-11-26T18:30:04.032Z\","), "{live}");
    }

    #[test]
    fn the_writer_rotates_and_keeps_max_files() {
        let dir = std::env::temp_dir().join(format!("egress-flowlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let config = FlowLogConfig {
            output: FlowLogOutput::File(path.clone()),
            max_bytes: 4096,
            max_files: 2,
            queue: 1024,
            starts: false,
            pod_names: vec![],
        };
        let events = Arc::new(FlowEvents::new(1024));
        for _ in 0..100 {
            events.push(event(FlowEventKind::Start));
            events.push(event(FlowEventKind::End));
        }
        let stats = Arc::new(FlowLogStats::default());
        let log = FlowLog::start(
            &config,
            Arc::clone(&events),
            WallClock::at(0),
            vec!["dmz".into()],
            Arc::new(PodNames::default()),
            Arc::clone(&stats),
        )
        .unwrap();
        log.finish();
        // 100 end records of ~300 bytes: 30 KB through 4 KB files; the current one and two rotated remain.
        assert_eq!(stats.written.load(Ordering::Relaxed), 100);
        assert!(path.exists());
        assert!(dir.join("flows.jsonl.1").exists());
        assert!(dir.join("flows.jsonl.2").exists());
        assert!(!dir.join("flows.jsonl.3").exists());
        for f in ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"] {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(text.len() as u64 <= 4096 + 400, "{f}: {}", text.len());
            assert!(text
                .lines()
                .all(|l| l.starts_with("{\"event\":\"end\"") && l.ends_with('}')));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_path_fails_at_start() {
        let config = FlowLogConfig {
            output: FlowLogOutput::File("/nonexistent-dir/flows.jsonl".into()),
            max_bytes: 4096,
            max_files: 2,
            queue: 16,
            starts: true,
            pod_names: vec![],
        };
        let e = FlowLog::start(
            &config,
            Arc::new(FlowEvents::new(16)),
            WallClock::at(0),
            vec![],
            Arc::new(PodNames::default()),
            Arc::new(FlowLogStats::default()),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("/nonexistent-dir/flows.jsonl"),
            "{e}"
        );
    }
}
