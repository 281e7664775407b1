//! State sync's I/O: one thread with one UDP socket on the tunnel address drives
//! [`forwarder_core::sync::replica::Replica`] — the flow table's events in, the peers' datagrams in, the
//! datagrams it builds out to every peer — and keeps one table of passive copies per peer
//! (`docs/failover.md`).
//!
//! Every datagram that arrives is hostile until proven otherwise. With `sync.key_file`, it must carry a
//! valid HMAC-SHA256 (truncated to 128 bits, RFC 2104 §5) under the set's key; a peer is then whoever holds
//! the key, and its address is learnt from its datagrams (a restarted pod has a new IP). Without a key, only
//! the configured peer addresses are listened to, each for its own ordinal. Either way each flow record is
//! vetted (pod address in `tunnel.pod_cidrs`, node among the allowed tunnel sources, egress IP one of that
//! peer's) before it is installed, and the copies' tables hold only that peer's egress IPs, so a peer can
//! only ever speak for its own. Refused datagrams are counted by reason.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use forwarder_core::conntrack::{self, FlowEventKind, FlowEvents, Table, TcpState};
use forwarder_core::pipeline::{Standby, StandbyPeer};
use forwarder_core::ports::{PortPools, PortRange};
use forwarder_core::sync::inbox::Tables;
use forwarder_core::sync::outbox::OutboxStats;
use forwarder_core::sync::peer::StreamStats;
use forwarder_core::sync::replica::{PeerPhase, Replica, ReplicaStats, Settings};
use forwarder_core::sync::wire::{self, Datagram, DeleteReason, FlowId, PeerState};
use forwarder_core::Instant;
use ipnet::IpNet;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use ring::hmac;

use crate::config::{PeerAddress, SyncConfig};
use crate::worker::Shared;

/// Shortest key accepted: as long as the HMAC-SHA256 output (RFC 2104 §3 recommends at least that).
pub(crate) const MIN_KEY_LEN: usize = 32;
/// Until this long after start, a peer not heard yet may still be about to send its flows: not synced.
const STARTUP_WAIT: Duration = Duration::from_secs(1);
/// After this long, synced whatever the peers did (a peer that never finishes its bulk transfer must not
/// keep this replica out of service).
const SYNC_DEADLINE: Duration = Duration::from_secs(30);
/// Copies' slots swept per pass (every 10 ms), as the own table's sweep.
const EXPIRE_BUDGET: usize = 4096;
const EXPIRE_EVERY: Duration = Duration::from_millis(10);
/// How often the counters are published.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Longest sleep between two looks at the flow events (a new flow waits `flush`, 5 ms, anyway).
const MAX_WAIT: Duration = Duration::from_millis(2);
/// Shortest: everything due was sent before the wait, so a zero wait would only spin.
const MIN_WAIT: Duration = Duration::from_millis(1);
/// Largest datagram accepted (the sender's `datagram` is 1400).
const MAX_DATAGRAM: usize = 2048;
/// How long a draining peer keeps its addresses before the lowest replica takes them over: the node agents
/// take it out of their routes within their 200 ms probe interval (`health.interval`) of its saying so,
/// and a flow it creates until then gets its replies there.
const HAND_OVER_DELAY: Duration = Duration::from_millis(500);
/// Datagrams sent per round at most, a round being at least `MIN_WAIT`: a bulk transfer of 100,000 flows
/// (about 3,600 datagrams, and as many again for the copies handed back) then goes out at up to 64,000
/// datagrams/s instead of in one burst that overflows the receiver's socket buffer (measured with
/// `cargo run --release -p bench --bin takeover`: in one burst, a restarted replica missed 290,000
/// datagrams and asked for 328 bulk transfers before it had them all).
const BURST: usize = 64;
/// Socket buffers of the sync socket (beyond `net.core.rmem_max` with CAP_NET_ADMIN): a whole round of
/// every peer's datagrams, with room to spare.
const SOCKET_BUFFER: usize = 8 << 20;
/// Health probes a silent peer must leave unanswered before it is declared dead, and their spacing.
const FENCE_PROBES: u32 = 3;
const FENCE_GAP: Duration = Duration::from_millis(50);
/// How long heartbeats go on saying that a peer is served after it was given back.
const SERVED_LINGER: Duration = Duration::from_secs(1);
/// A drain by hand-over still under way after this long logs what it waits for (it takes about a second
/// when the peers are in sync: docs/failover.md).
const SLOW_DRAIN: Duration = Duration::from_secs(5);
/// A silent peer that still answers its health probe is probed again this often.
const FENCE_RECHECK: Duration = Duration::from_secs(1);
/// A peer's DNS name is looked up again this often (a restarted pod's name moves to its new IP; with a key,
/// its first datagram says so sooner).
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// ... and this often while the lookup fails.
const RESOLVE_RETRY: Duration = Duration::from_secs(1);

/// Why a datagram was refused before anything in it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Without a key: not from a configured peer address.
    UnknownSource,
    /// With a key: no MAC, or a MAC that does not verify.
    BadMac,
    /// Not a valid datagram, from another set, or from an ordinal that is not that peer's.
    Protocol(&'static str),
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::UnknownSource => "unknown_source",
            Refusal::BadMac => "bad_mac",
            Refusal::Protocol(l) => l,
        }
    }
}

/// One peer, as the metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerView {
    pub(crate) ordinal: u16,
    /// Where its datagrams go; `None` while its DNS name has not resolved and it has not been heard.
    pub(crate) address: Option<SocketAddrV4>,
    /// Failed lookups of its DNS name.
    pub(crate) resolve_failures: u64,
    pub(crate) phase: PeerPhase,
    /// This replica carries its addresses and flows now.
    pub(crate) serving: bool,
    /// Its heartbeats say it is draining (handing its flows over).
    pub(crate) leaving: bool,
    pub(crate) copies: usize,
    pub(crate) stream: StreamStats,
}

/// The sync thread's counters, published every 100 ms.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub(crate) replica: ReplicaStats,
    pub(crate) outbox: OutboxStats,
    pub(crate) peers: Vec<PeerView>,
    pub(crate) tx_datagrams: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) tx_errors: u64,
    pub(crate) rx_datagrams: u64,
    pub(crate) rx_bytes: u64,
    /// Refused datagrams by label.
    pub(crate) refused: Vec<(&'static str, u64)>,
    /// Flow events the queue dropped (the refresh scan sends those flows later).
    pub(crate) events_dropped: u64,
    /// Dead peers taken over.
    pub(crate) takeovers: u64,
    /// Takeovers refused because the silent peer still answered its health probe (`[0]`) or for its
    /// addresses on an uplink (`[1]`).
    pub(crate) refusals: [u64; 2],
}

/// What the rest of the gateway sees of sync: whether this replica has its peers' flows, the hand-over of a
/// drain, and the counters.
#[derive(Debug)]
pub(crate) struct SyncStatus {
    enabled: bool,
    synced: AtomicBool,
    /// Counts the times a peer was seen starting or stopping to serve this replica's addresses (it took
    /// this replica for dead): each time, this replica announces its addresses again.
    reclaims: AtomicU64,
    /// Draining by handing its flows and addresses to a peer (set once, at SIGTERM).
    handing_over: AtomicBool,
    /// A peer serves this replica's addresses now, and everything there was to tell the peers went out.
    handed_over: AtomicBool,
    snapshot: Mutex<Snapshot>,
}

impl SyncStatus {
    fn new(enabled: bool, synced: bool, snapshot: Snapshot) -> SyncStatus {
        SyncStatus {
            enabled,
            synced: AtomicBool::new(synced),
            reclaims: AtomicU64::new(0),
            handing_over: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            snapshot: Mutex::new(snapshot),
        }
    }

    /// Without a `sync` section: always synced, nothing to show.
    pub(crate) fn disabled() -> SyncStatus {
        SyncStatus::new(false, true, Snapshot::default())
    }

    fn enabled() -> SyncStatus {
        SyncStatus::new(true, false, Snapshot::default())
    }

    /// A status with `snapshot`, synced (for tests of what is rendered from it).
    #[cfg(test)]
    pub(crate) fn with_snapshot(snapshot: Snapshot) -> SyncStatus {
        SyncStatus::new(true, true, snapshot)
    }

    /// At SIGTERM: starts handing this replica's flows and addresses over to a peer and returns true, when a
    /// peer is in sync with it (it has this replica's flows and is heard); false otherwise (the drain then
    /// refuses new flows and waits out `drain_seconds`, as without sync).
    pub(crate) fn start_hand_over(&self) -> bool {
        let able = self.has_taker();
        if able {
            self.handing_over.store(true, Ordering::Relaxed);
        }
        able
    }

    /// True when a peer could take this replica's flows over: it is in sync with it and not draining
    /// itself (as of the last snapshot, at most 100 ms old).
    pub(crate) fn has_taker(&self) -> bool {
        self.snapshot().is_some_and(|s| {
            s.peers
                .iter()
                .any(|p| p.phase == PeerPhase::InSync && !p.leaving)
        })
    }

    /// True while draining by hand-over.
    pub(crate) fn is_handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Relaxed)
    }

    /// True once a peer serves this replica's addresses and has been told everything: the process may end.
    pub(crate) fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Relaxed)
    }

    /// How many times a peer started or stopped serving this replica's addresses (see `reclaims`).
    pub(crate) fn reclaims(&self) -> u64 {
        self.reclaims.load(Ordering::Relaxed)
    }

    /// True once every peer heard has sent all its flows (or it is not configured).
    pub(crate) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// The counters, `None` without sync.
    pub(crate) fn snapshot(&self) -> Option<Snapshot> {
        self.enabled.then(|| {
            self.snapshot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        })
    }
}

/// Flow events waiting for the sync thread; more are dropped and counted, and the refresh scan sends those
/// flows later.
const EVENTS: usize = 65_536;

/// What state sync needs from the gateway before anything starts: the queue the own table pushes its flow
/// events into, the tables of the peers' copies (the data path's standby), and the key.
pub(crate) struct Setup {
    cfg: SyncConfig,
    /// Given to the own table ([`Gateway::with_event_queues`](forwarder_core::pipeline::Gateway)).
    pub(crate) events: Arc<FlowEvents>,
    /// Given to the gateway ([`Gateway::with_standby`](forwarder_core::pipeline::Gateway::with_standby)).
    pub(crate) standby: Arc<Standby>,
    key: Option<hmac::Key>,
}

/// Reads the key and builds the queue and the tables of copies for `cfg`.
pub(crate) fn prepare(
    cfg: &SyncConfig,
    own: conntrack::Config,
    ports: PortRange,
) -> Result<Setup, String> {
    let key = cfg.key_file.as_deref().map(read_key).transpose()?;
    Ok(Setup {
        cfg: cfg.clone(),
        events: Arc::new(FlowEvents::new(EVENTS)),
        standby: Arc::new(standby(cfg, own, ports)),
        key,
    })
}

/// The tables of copies for `cfg`'s peers, none of them served yet. Their timeouts are the own table's
/// plus the refresh period: a copy outlives a lost delete by at most that, and never expires while its
/// owner refreshes it.
fn standby(cfg: &SyncConfig, own: conntrack::Config, ports: PortRange) -> Standby {
    let grace = Settings::new(0, 0, 0, 0).refresh;
    let mut c = own;
    c.timeouts.udp += grace;
    c.timeouts.tcp_established += grace;
    c.timeouts.tcp_transitory += grace;
    c.timeouts.icmp += grace;
    // the owner enforced its quotas; a copy is never refused for them
    c.max_per_source = c.max_entries;
    Standby::new(
        cfg.peers
            .iter()
            .map(|p| {
                let ips: Vec<IpAddr> = p.egress.iter().map(|&(_, ip)| ip).collect();
                let table = Arc::new(Table::new(c, PortPools::new(&ips, ports)));
                StandbyPeer::new(p.ordinal, ips, table)
            })
            .collect(),
    )
}

/// Reads the shared key: at least [`MIN_KEY_LEN`] bytes, used as they are (a trailing newline included: a
/// Secret made with `--from-file` keeps the file's bytes).
fn read_key(path: &Path) -> Result<hmac::Key, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("sync.key_file {}: cannot read it: {e}", path.display()))?;
    if bytes.len() < MIN_KEY_LEN {
        return Err(format!(
            "sync.key_file {}: {} bytes; the key needs at least {MIN_KEY_LEN} random bytes (e.g. `head -c 32 \
             /dev/urandom > key`), the same on every replica of the set",
            path.display(),
            bytes.len()
        ));
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

/// What the thread needs to vet flow records.
#[derive(Debug, Clone)]
pub(crate) struct Vetting {
    pub(crate) pod_cidrs: Vec<IpNet>,
    /// The allowed tunnel sources; `None` when they come from the cluster's Nodes (not known here).
    pub(crate) nodes: Option<Vec<IpNet>>,
}

struct Peer {
    ordinal: u16,
    /// Where its datagrams go (see [`PeerView::address`]).
    address: Option<SocketAddrV4>,
    /// Its DNS name's lookups, when it is given by name.
    dns: Option<Dns>,
    /// (egress IP, uplink index here).
    egress: Vec<(IpAddr, usize)>,
    /// The table of its copies (in `standby`).
    copies: Arc<Table>,
    fence: Fence,
    /// Its heartbeats say it serves this replica's addresses (it took this replica for dead).
    serves_us: bool,
    /// When this replica last stopped serving it: its heartbeats still say so for [`SERVED_LINGER`], so
    /// that the peer hears it whichever of the two heard the other first.
    released: Option<Instant>,
    /// Since when its heartbeats say it drains (hands its flows over).
    leaving_since: Option<Instant>,
    /// Warned that it is silent but holds its addresses on the uplink (once until it is heard again).
    held_warned: bool,
}

/// The lookups of a peer's DNS name. A new answer replaces the peer's address only when it differs from
/// the previous answer (the name moved to the pod's new IP): an address learnt since from the peer's
/// authenticated datagrams is newer than a record that has not changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Dns {
    name: String,
    answer: Option<SocketAddrV4>,
    failures: u64,
    /// The last lookup failed (for logging the change only).
    failing: bool,
}

impl Dns {
    /// Takes one lookup's `result` for the peer whose address is `address`.
    fn take(
        &mut self,
        ordinal: u16,
        address: &mut Option<SocketAddrV4>,
        result: Result<SocketAddrV4, String>,
    ) {
        match result {
            Ok(a) => {
                if self.failing {
                    tracing::info!(peer = ordinal, name = %self.name, address = %a, "sync: peer's name resolves again");
                }
                self.failing = false;
                if self.answer != Some(a) {
                    self.answer = Some(a);
                    if *address != Some(a) {
                        tracing::info!(peer = ordinal, name = %self.name, old = ?address, new = %a, "sync: peer's address from its name");
                        *address = Some(a);
                    }
                }
            }
            Err(e) => {
                self.failures += 1;
                if !self.failing {
                    tracing::warn!(peer = ordinal, name = %self.name, error = %e, "sync: cannot resolve the peer's name; trying again every second");
                }
                self.failing = true;
            }
        }
    }
}

/// One lookup of peer `ordinal`'s name.
struct Resolution {
    ordinal: u16,
    result: Result<SocketAddrV4, String>,
}

/// Looks up the peers given by DNS name on a thread of its own (`getaddrinfo` blocks, the sync thread must
/// not): each name at once, then every [`RESOLVE_EVERY`], or every [`RESOLVE_RETRY`] while it fails (a
/// StatefulSet pod's name exists only while the pod does). The thread ends with the gateway or when the
/// receiver is gone; it is not joined (a lookup may hang for the resolver's timeout).
fn resolver(
    names: Vec<(u16, String, u16)>,
    shared: Arc<Shared>,
) -> Result<mpsc::Receiver<Resolution>, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("sync-resolve".into())
        .spawn(move || {
            let mut next: Vec<std::time::Instant> = vec![std::time::Instant::now(); names.len()];
            while !shared.stop.load(Ordering::Relaxed) {
                for ((ordinal, host, port), next) in names.iter().zip(&mut next) {
                    let now = std::time::Instant::now();
                    if now < *next {
                        continue;
                    }
                    let result = lookup(host, *port);
                    *next = now
                        + if result.is_ok() {
                            RESOLVE_EVERY
                        } else {
                            RESOLVE_RETRY
                        };
                    if tx
                        .send(Resolution {
                            ordinal: *ordinal,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map_err(|e| format!("sync: cannot start the name lookup thread: {e}"))?;
    Ok(rx)
}

/// The first IPv4 address of `host` (the sync socket is IPv4), with `port`.
fn lookup(host: &str, port: u16) -> Result<SocketAddrV4, String> {
    use std::net::ToSocketAddrs;
    let addrs = (host, port).to_socket_addrs().map_err(|e| e.to_string())?;
    addrs
        .filter_map(|a| match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        })
        .next()
        .ok_or_else(|| "no IPv4 address".to_owned())
}

/// The check that a silent peer is really dead before its addresses are taken over: its health probe (the
/// one the node agents send, `probe.rs`) must go unanswered too, and nobody may answer for its addresses on
/// the uplinks, which are probed at the same time (RFC 5227 §2.1.1, RFC 4862 §5.4.2). A peer cut off only
/// from sync still answers the health probe; one cut off from the pod network altogether (sync and health
/// probe) but still on the uplink segment still answers for its addresses. Either keeps them: two owners of
/// one address would split its replies.
#[derive(Debug, Clone, Copy, Default)]
struct Fence {
    /// Probes sent since it went silent.
    sent: u32,
    last_sent: Option<Instant>,
    nonce: u64,
    /// It answered a probe since it went silent, or its addresses were claimed on an uplink.
    answered: bool,
    /// Its addresses were claimed on an uplink since it went silent.
    held: bool,
    /// Claims of its addresses heard before this fence began (`StandbyPeer::claims`).
    claims: u64,
    /// This round's refusal is counted.
    counted: bool,
}

/// The running sync thread.
pub(crate) struct Sync {
    socket: UdpSocket,
    /// Health probes to silent peers (their UDP health port is `health_port`, as ours).
    probe: UdpSocket,
    health_port: u16,
    ordinal: u16,
    standby: Arc<Standby>,
    takeovers: u64,
    /// See [`Snapshot::refusals`].
    refusals: [u64; 2],
    poll: Poll,
    key: Option<hmac::Key>,
    replica: Replica,
    peers: Vec<Peer>,
    own: Arc<Table>,
    /// This replica's egress IPs, each with its uplink index (for the flows peers hand back).
    own_egress: Vec<(IpAddr, usize)>,
    events: Arc<FlowEvents>,
    vetting: Vetting,
    status: Arc<SyncStatus>,
    snapshot: Snapshot,
    refused: Vec<(&'static str, u64)>,
    /// Lookups of the peers given by DNS name.
    resolutions: Option<mpsc::Receiver<Resolution>>,
    /// When this thread first saw the drain by hand-over.
    handing_over_since: Option<Instant>,
    /// A drain by hand-over that is taking long has been logged with what it waits for.
    slow_drain_logged: bool,
}

/// Whether a replica up for `up`, whose peers stand at `phases`, has its peers' flows (and may turn ready):
/// once every peer heard has sent all its flows or went silent (one not heard yet may still be starting,
/// so it is waited for [`STARTUP_WAIT`]), or [`SYNC_DEADLINE`] after start. Once synced, it stays so
/// (`was`): a peer that restarts later is the one syncing, not this replica, which still has every flow
/// it had. Turning unready then would take both replicas out of the node agents' routes at once, as a
/// soak run showed (a rolling restart within 30 s of the previous one did the same).
fn synced(was: bool, up: Duration, phases: &[PeerPhase]) -> bool {
    was || up >= SYNC_DEADLINE
        || phases.iter().all(|p| match p {
            PeerPhase::InSync | PeerPhase::Silent => true,
            PeerPhase::Unknown => up >= STARTUP_WAIT,
            PeerPhase::Syncing => false,
        })
}

/// Binds the sync socket on `ip`:`sync.port` and starts the thread for `setup`, whose events `own` pushes
/// (the probes of silent peers go to their `health_port`); it stops when `shared.stop` is set.
pub(crate) fn start(
    setup: Setup,
    ip: Ipv4Addr,
    health_port: u16,
    own: Arc<Table>,
    vetting: Vetting,
    shared: Arc<Shared>,
) -> Result<(Arc<SyncStatus>, std::thread::JoinHandle<()>), String> {
    let Setup {
        cfg,
        events,
        standby,
        key,
    } = setup;
    let cfg = &cfg;
    let listen = SocketAddrV4::new(ip, cfg.port);
    let mut socket = UdpSocket::bind(SocketAddr::V4(listen))
        .map_err(|e| format!("sync: cannot bind {listen}: {e}"))?;
    crate::io::tunnel::set_buffers(&socket, SOCKET_BUFFER);
    let mut probe = UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))
        .map_err(|e| format!("sync: cannot bind the health probe socket on {ip}: {e}"))?;
    let poll = Poll::new().map_err(|e| format!("sync: {e}"))?;
    poll.registry()
        .register(&mut socket, Token(0), Interest::READABLE)
        .map_err(|e| format!("sync: {e}"))?;
    poll.registry()
        .register(&mut probe, Token(1), Interest::READABLE)
        .map_err(|e| format!("sync: {e}"))?;
    let started_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut settings = Settings::new(
        cfg.set_id(),
        cfg.ordinal,
        crate::run::random_u64(),
        started_ms,
    );
    settings.mac = key.is_some();
    let ordinals: Vec<u16> = cfg.peers.iter().map(|p| p.ordinal).collect();
    let replica = Replica::new(settings, own.slots(), &ordinals);
    let peers = cfg
        .peers
        .iter()
        .map(|p| {
            let copies = standby
                .peer(p.ordinal)
                .map(|s| Arc::clone(s.table()))
                .ok_or_else(|| format!("sync: peer {} has no table of copies", p.ordinal))?;
            let (address, dns) = match &p.address {
                PeerAddress::Ip(a) => (Some(*a), None),
                PeerAddress::Name { .. } => (
                    None,
                    Some(Dns {
                        name: p.address.to_string(),
                        ..Dns::default()
                    }),
                ),
            };
            Ok(Peer {
                ordinal: p.ordinal,
                address,
                dns,
                egress: p.egress.iter().map(|&(u, ip)| (ip, u)).collect(),
                copies,
                fence: Fence::default(),
                serves_us: false,
                released: None,
                leaving_since: None,
                held_warned: false,
            })
        })
        .collect::<Result<_, String>>()?;
    let status = Arc::new(SyncStatus::enabled());
    let own_egress = shared
        .uplinks
        .iter()
        .enumerate()
        .flat_map(|(i, u)| u.egress.iter().map(move |ip| (*ip, i)))
        .collect();
    let mut s = Sync {
        socket,
        probe,
        health_port,
        ordinal: cfg.ordinal,
        standby,
        takeovers: 0,
        refusals: [0; 2],
        poll,
        key,
        replica,
        peers,
        own,
        own_egress,
        events,
        vetting,
        status: Arc::clone(&status),
        snapshot: Snapshot::default(),
        refused: Vec::new(),
        resolutions: None,
        handing_over_since: None,
        slow_drain_logged: false,
    };
    tracing::info!(
        listen = %listen,
        set = %cfg.set,
        ordinal = cfg.ordinal,
        peers = ?cfg.peers.iter().map(|p| format!("{}={}", p.ordinal, p.address)).collect::<Vec<_>>(),
        authenticated = s.key.is_some(),
        "state sync"
    );
    if s.key.is_none() {
        tracing::warn!("sync.key_file is not set: sync datagrams are told apart by their source address alone; set a key on a network where pods can spoof addresses");
    }
    let names: Vec<(u16, String, u16)> = cfg
        .peers
        .iter()
        .filter_map(|p| match &p.address {
            PeerAddress::Name { host, port } => Some((p.ordinal, host.clone(), *port)),
            PeerAddress::Ip(_) => None,
        })
        .collect();
    if !names.is_empty() {
        s.resolutions = Some(resolver(names, Arc::clone(&shared))?);
    }
    let thread = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || s.run(&shared))
        .map_err(|e| format!("sync: cannot start its thread: {e}"))?;
    Ok((status, thread))
}

impl Sync {
    fn run(mut self, shared: &Shared) {
        let start = shared.now();
        let mut next_expire = start;
        let mut next_publish = start;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut out = vec![0u8; MAX_DATAGRAM];
        let mut events = Events::with_capacity(4);
        while !shared.stop.load(Ordering::Relaxed) {
            let now = shared.now();
            self.take_resolutions();
            self.take_events(now);
            self.receive(&mut buf, now);
            self.watch(&mut buf, now);
            let standby = &self.standby;
            self.replica.set_served(
                self.peers
                    .iter()
                    .filter(|p| {
                        standby.is_serving(p.ordinal)
                            || p.released
                                .is_some_and(|t| now.saturating_since(t) < SERVED_LINGER)
                    })
                    .map(|p| p.ordinal),
            );
            let leaving = self.status.is_handing_over();
            self.replica.set_state(if leaving {
                PeerState::Draining
            } else if self.status.is_synced() {
                PeerState::Ready
            } else {
                PeerState::Syncing
            });
            let guard = self.own.pin();
            self.replica.tick(&self.own, now, &guard);
            for _ in 0..BURST {
                let peers = &self.peers;
                let copies = |o: u16| peers.iter().find(|p| p.ordinal == o).map(|p| &*p.copies);
                let Some(len) = self
                    .replica
                    .poll_transmit(&self.own, copies, now, &guard, &mut out)
                else {
                    break;
                };
                self.send(&mut out[..len]);
            }
            drop(guard);
            if now >= next_expire {
                next_expire = now + EXPIRE_EVERY;
                for p in &self.peers {
                    p.copies.expire(now, EXPIRE_BUDGET);
                }
            }
            if now >= next_publish {
                next_publish = now + PUBLISH_EVERY;
                self.publish(now, now.saturating_since(start));
            }
            let wait = self
                .replica
                .poll_timeout(now)
                .saturating_since(now)
                .clamp(MIN_WAIT, MAX_WAIT);
            // readable or not, the next round reads until the socket would block
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "sync: poll");
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// The lookups of the peers' names that came in.
    fn take_resolutions(&mut self) {
        let Some(rx) = &self.resolutions else {
            return;
        };
        while let Ok(r) = rx.try_recv() {
            if let Some(p) = self.peers.iter_mut().find(|p| p.ordinal == r.ordinal) {
                if let Some(dns) = &mut p.dns {
                    dns.take(p.ordinal, &mut p.address, r.result);
                }
            }
        }
    }

    /// The own table's flow events, to the outbox.
    fn take_events(&mut self, now: Instant) {
        while let Some(e) = self.events.pop() {
            let id = FlowId {
                proto: e.proto,
                egress: e.egress.0,
                ext_port: e.egress.1,
                remote: e.dst.0,
                remote_port: e.dst.1,
            };
            match e.kind {
                FlowEventKind::Start => self.replica.flow_started(id, now),
                FlowEventKind::End => {
                    let finished =
                        matches!(e.tcp_state, Some(TcpState::Closed | TcpState::TimeWait));
                    self.replica.flow_ended(id, DeleteReason::Expired, finished);
                }
            }
        }
    }

    /// Every datagram waiting on the socket.
    fn receive(&mut self, buf: &mut [u8], now: Instant) {
        loop {
            let (n, from) = match self.socket.recv_from(buf) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "sync: receive");
                    return;
                }
            };
            self.snapshot.rx_datagrams += 1;
            self.snapshot.rx_bytes += n as u64;
            if let Err(r) = self.accept(&buf[..n], from, now) {
                let label = r.label();
                match self.refused.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, c)) => *c += 1,
                    None => self.refused.push((label, 1)),
                }
            }
        }
    }

    /// One datagram from `from`: authenticated, attributed to a peer, applied to its copies.
    fn accept(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) -> Result<(), Refusal> {
        let SocketAddr::V4(from) = from else {
            return Err(Refusal::UnknownSource);
        };
        let dg = Datagram::new_checked(bytes).map_err(|e| Refusal::Protocol(e.label()))?;
        let index = if let Some(key) = &self.key {
            let mac = dg.mac().ok_or(Refusal::BadMac)?;
            if !mac_matches(key, dg.authenticated(), mac) {
                return Err(Refusal::BadMac);
            }
            let ordinal = dg.header().ordinal;
            let i = self
                .peers
                .iter()
                .position(|p| p.ordinal == ordinal)
                .ok_or(Refusal::Protocol("wrong_sender"))?;
            if self.peers[i].address != Some(from) {
                tracing::info!(peer = ordinal, old = ?self.peers[i].address, new = %from, "sync: peer moved");
                self.peers[i].address = Some(from);
            }
            i
        } else {
            if dg.mac().is_some() {
                // a keyed peer talking to a replica without the key: a configuration mismatch
                return Err(Refusal::BadMac);
            }
            self.peers
                .iter()
                .position(|p| p.address == Some(from))
                .ok_or(Refusal::UnknownSource)?
        };
        let peer = &self.peers[index];
        let (me, own_egress) = (self.ordinal, &self.own_egress);
        let vetting = &self.vetting;
        // the uplink here of egress IP `ip` of replica `owner`: the sender's for its copies, ours for the
        // flows it hands back
        let uplink = |owner: u16, ip: IpAddr| {
            let egress = if owner == me {
                own_egress
            } else {
                &peer.egress
            };
            egress
                .iter()
                .find(|(e, _)| *e == ip)
                .and_then(|&(_, u)| forwarder_core::flow::UplinkId::try_from(u).ok())
        };
        let accept = |f: &wire::FlowRecord| {
            vetting.pod_cidrs.iter().any(|n| n.contains(&f.pod))
                && vetting
                    .nodes
                    .as_ref()
                    .is_none_or(|ns| ns.iter().any(|n| n.contains(&IpAddr::V4(f.node))))
        };
        let guard = peer.copies.pin();
        let tables = Tables {
            copies: &peer.copies,
            own: &self.own,
        };
        self.replica
            .receive(peer.ordinal, bytes, tables, uplink, accept, now, &guard)
            .map(|_| ())
            .map_err(|e| Refusal::Protocol(e.label()))
    }

    /// Sends the datagram in `buf` to every peer, each with its acknowledgement and MAC.
    fn send(&mut self, buf: &mut [u8]) {
        for p in &self.peers {
            // not resolved nor heard yet: it asks for everything when it starts hearing us
            let Some(address) = p.address else {
                continue;
            };
            self.replica.stamp(p.ordinal, buf);
            if let Some(key) = &self.key {
                let n = buf.len() - wire::MAC_LEN;
                let tag = mac_of(key, &buf[..n]);
                buf[n..].copy_from_slice(&tag);
            }
            match self.socket.send_to(buf, SocketAddr::V4(address)) {
                Ok(n) => {
                    self.snapshot.tx_datagrams += 1;
                    self.snapshot.tx_bytes += n as u64;
                }
                Err(e) => {
                    self.snapshot.tx_errors += 1;
                    tracing::debug!(peer = p.ordinal, error = %e, "sync: send");
                }
            }
        }
    }

    /// Takes over the addresses and flows of a peer that is dead — silent on sync for `dead_after` and
    /// not answering its health probe — or that hands them over as it drains, when this replica is the
    /// lowest ordinal alive and not draining itself; gives them up when the peer is back and ready.
    fn watch(&mut self, buf: &mut [u8], now: Instant) {
        loop {
            let (n, from) = match self.probe.recv_from(buf) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            for p in &mut self.peers {
                if p.address.is_some_and(|a| IpAddr::V4(*a.ip()) == from.ip())
                    && crate::probe::parse_reply(&buf[..n], p.fence.nonce).is_some()
                {
                    p.fence.answered = true;
                }
            }
        }
        let phases = self.phases(now);
        let leaving = self.status.is_handing_over();
        let replica = &self.replica;
        let is_leaving = |o: u16| {
            replica
                .peer_hello(o)
                .is_some_and(|h| h.state == PeerState::Draining)
        };
        // The lowest ordinal among the replicas heard that do not drain (and this one, unless it drains)
        // takes over (split brain: docs/failover.md).
        let lowest = self
            .peers
            .iter()
            .zip(&phases)
            .filter(|(p, ph)| {
                matches!(ph, PeerPhase::InSync | PeerPhase::Syncing) && !is_leaving(p.ordinal)
            })
            .map(|(p, _)| p.ordinal)
            .fold(if leaving { u16::MAX } else { self.ordinal }, u16::min);
        let mut served = false;
        for p in &mut self.peers {
            let serves_us = self.replica.peer_serves(p.ordinal, self.ordinal);
            served |= serves_us;
            if serves_us != p.serves_us && leaving {
                // it serves our addresses because we hand them over: nothing to reclaim
                p.serves_us = serves_us;
            } else if serves_us != p.serves_us {
                p.serves_us = serves_us;
                self.status.reclaims.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    peer = p.ordinal,
                    serving = serves_us,
                    "sync: a peer took this replica for dead and serves its addresses; announcing them again"
                );
            }
        }
        // Draining: done once a peer serves our addresses and has been told everything. A peer that gave
        // them back to us says it serves them for SERVED_LINGER more, so a drain that starts within that
        // time would take the linger for an adoption: only a peer that says so SERVED_LINGER after the
        // drain started has adopted them. (ARP answers stop at once: the lingering peer does not answer
        // ARP, and the neighbours' caches still hold this replica's MAC.)
        let draining_for = if leaving {
            now.saturating_since(*self.handing_over_since.get_or_insert(now))
        } else {
            self.handing_over_since = None;
            Duration::ZERO
        };
        let done = leaving && served && draining_for >= SERVED_LINGER && self.replica.outbox_idle();
        if !leaving {
            self.slow_drain_logged = false;
        } else if !done && draining_for >= SLOW_DRAIN && !self.slow_drain_logged {
            self.slow_drain_logged = true;
            let (backlog, repairs) = self.replica.backlog();
            tracing::warn!(
                seconds = draining_for.as_secs(),
                peer_serves_our_addresses = served,
                queued_flows = backlog.flows,
                queued_deletes = backlog.deletes,
                queued_returns = backlog.returns,
                queued_controls = backlog.controls,
                bulk_under_way = backlog.bulk,
                repairs,
                "sync: the hand-over is not done yet: waiting for a peer to serve our addresses and for nothing to be left to send"
            );
        }
        self.standby.set_handed_over(leaving && served);
        if done && !self.status.is_handed_over() {
            tracing::info!(
                "sync: a peer serves this replica's addresses and has all its flows: handed over"
            );
        }
        self.status.handed_over.store(done, Ordering::Relaxed);
        for (p, phase) in self.peers.iter_mut().zip(phases) {
            let serving = self.standby.is_serving(p.ordinal);
            let hello = self.replica.peer_hello(p.ordinal);
            if hello.is_some_and(|h| h.state == PeerState::Draining)
                && matches!(phase, PeerPhase::InSync | PeerPhase::Syncing)
            {
                // It hands its addresses and flows over as it drains: the lowest of us takes them, once the
                // node agents have moved its traffic away (until then its new flows' replies reach it).
                let since = *p.leaving_since.get_or_insert(now);
                if !serving
                    && lowest == self.ordinal
                    && now.saturating_since(since) >= HAND_OVER_DELAY
                {
                    adopt(&self.standby, p, &mut self.takeovers, "draining");
                }
                continue;
            }
            p.leaving_since = None;
            if phase != PeerPhase::Silent {
                p.fence = Fence::default();
                p.held_warned = false;
                // Back, but its flows come back to it with our bulk transfer: it carries them on once it
                // says it is ready (it announces its addresses then); until then they are still ours.
                let ready = hello.is_some_and(|h| h.state == PeerState::Ready);
                if serving && phase != PeerPhase::Unknown && ready {
                    self.standby.set_serving(p.ordinal, false);
                    p.released = Some(now);
                    tracing::warn!(
                        peer = p.ordinal,
                        "sync: peer is back; its addresses and flows are its own again"
                    );
                }
                continue;
            }
            if serving {
                continue;
            }
            if lowest != self.ordinal {
                // Not ours to take over (a lower replica is alive, and may be serving it: its answers
                // for the peer's addresses would look like the peer's own). Fenced afresh if we become it.
                p.fence = Fence::default();
                continue;
            }
            let standby = self.standby.peer(p.ordinal);
            let f = &mut p.fence;
            let since = f.last_sent.map(|t| now.saturating_since(t));
            if f.answered {
                // alive, only cut off from sync (or from the pods): no takeover; ask again now and then
                if !f.counted {
                    f.counted = true;
                    self.refusals[usize::from(f.held)] += 1;
                }
                if since.is_none_or(|d| d >= FENCE_RECHECK) {
                    *f = Fence::default();
                }
                continue;
            }
            if f.sent >= FENCE_PROBES && since.is_some_and(|d| d >= FENCE_GAP) {
                if standby.is_some_and(|s| s.claims() != f.claims) {
                    f.answered = true;
                    f.held = true;
                    if !p.held_warned {
                        p.held_warned = true;
                        tracing::warn!(
                            peer = p.ordinal,
                            "sync: peer is silent and does not answer its health probe, but its addresses are \
                             still answered on the uplink: not taking them over (two owners would split their \
                             replies)"
                        );
                    }
                    continue;
                }
                adopt(
                    &self.standby,
                    p,
                    &mut self.takeovers,
                    "dead (silent, health probe unanswered, its addresses unanswered)",
                );
                continue;
            }
            if since.is_none_or(|d| d >= FENCE_GAP) {
                if f.sent == 0 {
                    f.nonce = crate::run::random_u64();
                    f.claims = standby.map_or(0, StandbyPeer::claims);
                }
                if let Some(s) = standby {
                    s.want_probe();
                }
                if let Some(a) = p.address {
                    let to = SocketAddr::from((*a.ip(), self.health_port));
                    let _ = self.probe.send_to(&crate::probe::request(f.nonce), to);
                }
                f.sent += 1;
                f.last_sent = Some(now);
            }
        }
    }

    /// Where each peer stands, in `peers` order.
    fn phases(&self, now: Instant) -> Vec<PeerPhase> {
        self.peers
            .iter()
            .map(|p| {
                self.replica
                    .peer_phase(p.ordinal, now)
                    .unwrap_or(PeerPhase::Unknown)
            })
            .collect()
    }

    /// Publishes the counters and decides whether this replica is synced.
    fn publish(&mut self, now: Instant, up: Duration) {
        let phases = self.phases(now);
        let synced = synced(self.status.is_synced(), up, &phases);
        if synced && !self.status.is_synced() {
            tracing::info!(
                after_ms = up.as_millis(),
                peers = ?self.peers.iter().zip(&phases).map(|(p, ph)| format!("{}:{ph:?}", p.ordinal)).collect::<Vec<_>>(),
                "sync: this replica has its peers' flows"
            );
        }
        self.status.synced.store(synced, Ordering::Relaxed);
        self.snapshot.replica = self.replica.stats();
        self.snapshot.outbox = self.replica.outbox_stats();
        self.snapshot.refused.clone_from(&self.refused);
        self.snapshot.events_dropped = self.events.dropped();
        self.snapshot.takeovers = self.takeovers;
        self.snapshot.refusals = self.refusals;
        self.snapshot.peers = self
            .peers
            .iter()
            .zip(phases)
            .map(|(p, phase)| PeerView {
                ordinal: p.ordinal,
                address: p.address,
                resolve_failures: p.dns.as_ref().map_or(0, |d| d.failures),
                phase,
                serving: self.standby.is_serving(p.ordinal),
                leaving: self
                    .replica
                    .peer_hello(p.ordinal)
                    .is_some_and(|h| h.state == PeerState::Draining),
                copies: p.copies.len(),
                stream: self.replica.peer_stats(p.ordinal).unwrap_or_default(),
            })
            .collect();
        *self
            .status
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.snapshot.clone();
    }
}

/// Takes over the addresses and flows of peer `p`, which is `why`.
fn adopt(standby: &Standby, p: &Peer, takeovers: &mut u64, why: &str) {
    standby.set_serving(p.ordinal, true);
    *takeovers += 1;
    tracing::warn!(
        peer = p.ordinal,
        addresses = ?p.egress.iter().map(|(ip, _)| ip.to_string()).collect::<Vec<_>>(),
        copies = p.copies.len(),
        "sync: peer is {why}; taking over its addresses and flows"
    );
}

/// The MAC of `data`: HMAC-SHA256 truncated to its first [`wire::MAC_LEN`] bytes (RFC 2104 §5).
fn mac_of(key: &hmac::Key, data: &[u8]) -> [u8; wire::MAC_LEN] {
    let mut out = [0u8; wire::MAC_LEN];
    out.copy_from_slice(&hmac::sign(key, data).as_ref()[..wire::MAC_LEN]);
    out
}

/// Whether `mac` is the MAC of `data`, compared in constant time (ring's `hmac::verify` wants the whole
/// 32-byte tag).
fn mac_matches(key: &hmac::Key, data: &[u8], mac: &[u8]) -> bool {
    let expected = mac_of(key, data);
    mac.len() == expected.len()
        && expected
            .iter()
            .zip(mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_synced_once_its_peers_sent_their_flows_and_stays_so_when_one_restarts() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        use PeerPhase::{InSync, Silent, Syncing, Unknown};
        assert!(!synced(false, ms(100), &[Syncing]), "its peer still sends");
        assert!(
            !synced(false, ms(100), &[Unknown]),
            "a peer not heard may be starting"
        );
        assert!(synced(false, s(1), &[Unknown]), "… for a second");
        assert!(synced(false, ms(100), &[InSync, Silent]));
        assert!(synced(false, SYNC_DEADLINE, &[Syncing]), "the deadline");
        // 17 s after start, the peer restarts and syncs from this replica: this one stays ready
        assert!(synced(true, s(17), &[Syncing]));
    }

    #[test]
    fn a_new_dns_answer_moves_the_peer_and_an_unchanged_one_keeps_what_its_datagrams_said() {
        let a = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let mut dns = Dns {
            name: "gw1.example:4792".into(),
            ..Dns::default()
        };
        let mut address = None;
        dns.take(1, &mut address, Err("no such host".into()));
        assert_eq!((address, dns.failures, dns.failing), (None, 1, true));
        dns.take(1, &mut address, Ok(a("10.0.0.1:4792")));
        assert_eq!((address, dns.failing), (Some(a("10.0.0.1:4792")), false));
        // its authenticated datagrams come from a new address: the unchanged record does not undo that
        address = Some(a("10.0.0.9:4792"));
        dns.take(1, &mut address, Ok(a("10.0.0.1:4792")));
        assert_eq!(address, Some(a("10.0.0.9:4792")));
        // a failed lookup keeps the address
        dns.take(1, &mut address, Err("timeout".into()));
        assert_eq!((address, dns.failures), (Some(a("10.0.0.9:4792")), 2));
        // the record moves: the peer does too
        dns.take(1, &mut address, Ok(a("10.0.0.2:4792")));
        assert_eq!(address, Some(a("10.0.0.2:4792")));
    }

    #[test]
    fn a_name_is_looked_up_to_its_ipv4_address() {
        // /etc/hosts (no query leaves the machine)
        assert_eq!(
            lookup("localhost", 4792),
            Ok("127.0.0.1:4792".parse().unwrap())
        );
    }

    #[test]
    fn a_mac_verifies_only_under_its_key_and_over_its_bytes() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        let mac = mac_of(&key, b"datagram");
        assert!(mac_matches(&key, b"datagram", &mac));
        assert!(!mac_matches(&other, b"datagram", &mac));
        assert!(!mac_matches(&key, b"datagrab", &mac));
        assert!(!mac_matches(&key, b"datagram", &mac[..15]));
    }
}
