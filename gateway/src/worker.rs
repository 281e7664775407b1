//! One worker thread: its own tunnel socket and packet sockets, run to completion in batches.
//!
//! A round: wait (mio) until a socket is readable or 10 ms pass; then for each readable socket receive one
//! batch with `recvmmsg`, hand it to the pipeline's batch call, and send what it produced with one
//! `sendmmsg` per destination socket. Sockets that returned a full batch are served again before waiting.
//!
//! Tunnel → uplink: a VXLAN datagram from a node → `Worker::outbound_batch` → `Forward` frames get the
//! next hop's MAC from the worker's private neighbour copy and go out of the uplink's packet socket.
//! Uplink → tunnel: a frame from the DMZ or internal VLAN (checksum completed or GSO segmented first, see
//! `io::offload`) → `Worker::inbound_batch` → `ToTunnel` datagrams go back to the node. ARP/NDP frames go
//! to `neighbour`.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use forwarder_core::flow::UplinkId;
use forwarder_core::offload::{self, OffloadError, VnetHdr};
use forwarder_core::pipeline::{
    Action, Gateway, Intake, Stats, TunnelPacket, UplinkPacket, Worker as Pipeline,
    INBOUND_HEADROOM,
};
use forwarder_core::wire::ethernet::{self, MacAddr};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::io::mmsg::{RecvBatch, SendBatch, Sending, SlotLayout};
use crate::io::packet::{self, GsoTxSocket, Interface, RxSocket, TxSocket, VNET_HDR_LEN};
use crate::io::steer::Steering;
use crate::io::tunnel::{self, TunnelSenders, TunnelSocket, TunnelTx};
use crate::io::IoDrop;
use crate::neighbour::{self, LocalNeighbours, Neighbours};

/// Datagrams or frames per system call.
pub(crate) const BATCH: usize = 64;
/// Batches served per socket before the others get a turn.
const ROUNDS_PER_WAKE: usize = 4;
/// Room behind a packet for the ICMP error the pipeline may build in its place.
const ICMP_ROOM: usize = 1536;
/// Largest frame a packet socket hands over (a GSO super-packet).
const MAX_UPLINK_FRAME: usize = 65536 + 14 + 4;
/// Segments of one GSO super-packet a worker can hold.
const MAX_SEGMENTS: usize = 128;
/// Frames a worker keeps while their next hop is being resolved.
const MAX_WAITING: usize = 256;
/// How often a worker publishes its counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// One uplink as the I/O layer sees it.
#[derive(Debug, Clone)]
pub(crate) struct UplinkIo {
    pub(crate) name: String,
    pub(crate) interface: String,
    pub(crate) link: Interface,
    /// Egress addresses, for answering ARP/NDP and as the source of our requests.
    pub(crate) egress: Vec<IpAddr>,
    /// The sync peers' egress addresses on this uplink, with the peer's ordinal: answered for only while
    /// this replica serves that peer (`pipeline::Standby`).
    pub(crate) peer_egress: Vec<(u16, IpAddr)>,
    /// The MTU the pipeline uses for this uplink.
    pub(crate) mtu: u16,
}

impl UplinkIo {
    /// Our address of `ip`'s family, the source of requests for `ip`.
    pub(crate) fn source_for(&self, ip: IpAddr) -> Option<IpAddr> {
        self.egress
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == ip.is_ipv4())
    }
}

/// What a worker publishes for metrics.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) pipeline: Stats,
    pub(crate) io_drops: [u64; IoDrop::COUNT],
    /// TCP super-packets from the tunnel translated whole and sent with their segmentation offloaded.
    pub(crate) gso_whole: u64,
    /// TCP super-packets cut into segments here (from the uplinks; from the tunnel where the uplink could
    /// not take one whole).
    pub(crate) gso_segmented: u64,
    /// Partial checksums completed here.
    pub(crate) checksums_completed: u64,
    /// Wake-ups and batches, for judging batching efficiency.
    pub(crate) wakeups: u64,
    pub(crate) batches: u64,
}

/// State shared by the workers and the control thread.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The current gateway (replaced on reload) and a generation the workers watch.
    pub(crate) gateway: Mutex<Arc<Gateway>>,
    pub(crate) gateway_generation: AtomicU64,
    pub(crate) neighbours: Neighbours,
    pub(crate) uplinks: Vec<UplinkIo>,
    pub(crate) tunnel_listen: SocketAddrV4,
    /// The sockets every worker sends into the tunnel from.
    pub(crate) tunnel_senders: Arc<TunnelSenders>,
    pub(crate) tunnel_mtu: u16,
    pub(crate) reports: Vec<Mutex<Option<Report>>>,
    /// Which CPUs each worker runs on, and so which packets its receive sockets get.
    pub(crate) steering: Steering,
    /// Worker panics caught and restarted (see `supervisor`).
    pub(crate) worker_panics: AtomicU64,
    pub(crate) stop: AtomicBool,
    pub(crate) epoch: Instant,
}

impl Shared {
    /// The pipeline's clock: milliseconds since start.
    pub(crate) fn now(&self) -> forwarder_core::Instant {
        forwarder_core::Instant::from_millis(
            u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
        )
    }

    /// The current gateway.
    pub(crate) fn gateway(&self) -> Arc<Gateway> {
        Arc::clone(&self.gateway.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Publishes a new gateway to the workers.
    pub(crate) fn set_gateway(&self, gw: Arc<Gateway>) {
        *self.gateway.lock().unwrap_or_else(PoisonError::into_inner) = gw;
        self.gateway_generation.fetch_add(1, Ordering::Release);
    }
}

/// A worker's receive sockets: opened once per worker, in worker order (their order in the kernel's
/// groups is what the steering programs answer, see `io::steer`), and kept when the worker restarts.
#[derive(Debug, Clone)]
pub(crate) struct Receivers {
    tunnel: Arc<TunnelSocket>,
    uplinks: Vec<Arc<RxSocket>>,
}

impl Receivers {
    /// The tunnel socket and one packet socket per uplink, each joining its interface's group.
    pub(crate) fn open(shared: &Shared) -> std::io::Result<Receivers> {
        let tunnel = TunnelSocket::open(shared.tunnel_listen, 8 << 20, &shared.steering)?;
        let mut uplinks = Vec::with_capacity(shared.uplinks.len());
        for (i, u) in shared.uplinks.iter().enumerate() {
            // One fanout group per interface, unique to this process.
            let group = u16::try_from((std::process::id() as usize + i) & 0xFFFF).unwrap_or(0);
            let rx =
                RxSocket::open(u.link.index, group, 8 << 20, &shared.steering).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("uplink {} ({}): {e}", u.name, u.interface),
                    )
                })?;
            uplinks.push(Arc::new(rx));
        }
        Ok(Receivers {
            tunnel: Arc::new(tunnel),
            uplinks,
        })
    }
}

/// One uplink's sockets and buffers in a worker.
struct Port {
    rx: Arc<RxSocket>,
    tx: TxSocket,
    /// For super-packets, with a virtio-net header.
    gso_tx: GsoTxSocket,
    rx_batch: RecvBatch<libc::sockaddr_ll>,
    tx_batch: SendBatch<libc::sockaddr_ll>,
    /// `sockaddr_ll` for sending on this interface.
    to: libc::sockaddr_ll,
    mac: MacAddr,
    ready: bool,
}

/// A frame waiting for its next hop's MAC.
struct Waiting {
    uplink: UplinkId,
    next_hop: IpAddr,
    frame: Vec<u8>,
    since: Instant,
}

/// A worker thread's state.
pub(crate) struct Worker {
    id: usize,
    shared: Arc<Shared>,
    pipeline: Pipeline,
    gateway_generation: u64,
    tunnel: Arc<TunnelSocket>,
    /// The tunnel socket's kernel drop count when last read (it counts from the socket's opening).
    tunnel_drops_seen: u32,
    tun_rx: RecvBatch<libc::sockaddr_in>,
    tun_tx: TunnelTx,
    tun_ready: bool,
    ports: Vec<Port>,
    segments: Vec<u8>,
    segment_slot: usize,
    /// The smallest MTU of the tunnel and the uplinks: the size tunnel super-packets are cut to.
    min_mtu: u16,
    segment_lens: Vec<usize>,
    neighbours: LocalNeighbours,
    waiting: Vec<Waiting>,
    io_drops: [u64; IoDrop::COUNT],
    gso_whole: u64,
    gso_segmented: u64,
    checksums_completed: u64,
    wakeups: u64,
    batches: u64,
    scratch: [u8; neighbour::MAX_FRAME],
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish()
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl Worker {
    /// Opens the worker's sockets: a tunnel socket on the shared address and, per uplink, a receiving
    /// socket in the uplink's fanout group and a sending socket.
    pub(crate) fn open(
        id: usize,
        shared: Arc<Shared>,
        seed: u64,
        receivers: &Receivers,
    ) -> std::io::Result<Worker> {
        if let Err(e) = shared.steering.pin(id) {
            tracing::warn!(worker = id, error = %e, cpus = ?shared.steering.cpus_of(id),
                "cannot pin the worker to its CPUs: its packets' wake-ups cross CPUs");
        }
        let gateway = shared.gateway();
        let tunnel = Arc::clone(&receivers.tunnel);
        // A node's kernel hands TCP bursts to its vxlan device as 64 KiB GSO super-packets, and the UDP
        // socket receives them whole: room for the largest, translated whole (see `Out::send_whole`).
        let max_dgram = 8 + MAX_UPLINK_FRAME;
        let tun_layout = SlotLayout {
            slot: round_up(max_dgram + ICMP_ROOM, 64),
            headroom: 0,
            max_len: max_dgram,
            prefix: 0,
        };
        let mut ports = Vec::with_capacity(shared.uplinks.len());
        for (u, rx) in shared.uplinks.iter().zip(&receivers.uplinks) {
            let rx = Arc::clone(rx);
            let tx = TxSocket::open(u.link.index, 8 << 20)?;
            let gso_tx = GsoTxSocket::open(u.link.index, 8 << 20)?;
            let layout = SlotLayout {
                slot: round_up(INBOUND_HEADROOM + MAX_UPLINK_FRAME + ICMP_ROOM, 64),
                headroom: INBOUND_HEADROOM,
                max_len: MAX_UPLINK_FRAME,
                prefix: VNET_HDR_LEN,
            };
            ports.push(Port {
                rx,
                tx,
                gso_tx,
                rx_batch: RecvBatch::new(BATCH, layout, packet::link_addr(0, 0)),
                tx_batch: SendBatch::new(BATCH * 2, packet::link_addr(0, 0)),
                to: packet::link_addr(u.link.index, 0),
                mac: u.link.mac,
                ready: true,
            });
        }
        let mtus = shared.uplinks.iter().map(|u| u.mtu);
        let max_mtu = mtus
            .clone()
            .chain([shared.tunnel_mtu])
            .max()
            .unwrap_or(1500);
        let min_mtu = mtus.chain([shared.tunnel_mtu]).min().unwrap_or(1500);
        let segment_slot = round_up(8 + 14 + usize::from(max_mtu).max(1280) + ICMP_ROOM, 64);
        let neighbours = shared.neighbours.local();
        Ok(Worker {
            id,
            pipeline: Pipeline::new(gateway, seed),
            gateway_generation: shared.gateway_generation.load(Ordering::Acquire),
            tunnel,
            tunnel_drops_seen: 0,
            tun_rx: RecvBatch::new(BATCH, tun_layout, tunnel::empty_sockaddr_in()),
            tun_tx: TunnelTx::new(Arc::clone(&shared.tunnel_senders), BATCH * 2),
            tun_ready: true,
            ports,
            segments: vec![0; segment_slot * MAX_SEGMENTS],
            segment_slot,
            min_mtu,
            segment_lens: Vec::with_capacity(MAX_SEGMENTS),
            neighbours,
            waiting: Vec::new(),
            io_drops: [0; IoDrop::COUNT],
            gso_whole: 0,
            gso_segmented: 0,
            checksums_completed: 0,
            wakeups: 0,
            batches: 0,
            scratch: [0; neighbour::MAX_FRAME],
            shared,
        })
    }

    /// Runs until `Shared::stop` is set.
    pub(crate) fn run(mut self) -> std::io::Result<()> {
        let mut poll = Poll::new()?;
        let tun_fd = self.tunnel.as_fd().as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&tun_fd), Token(0), Interest::READABLE)?;
        for (i, p) in self.ports.iter().enumerate() {
            let fd = p.rx.as_fd().as_raw_fd();
            poll.registry()
                .register(&mut SourceFd(&fd), Token(i + 1), Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(16);
        let mut last_publish = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let busy = self.tun_ready || self.ports.iter().any(|p| p.ready);
            let timeout = if busy {
                Duration::ZERO
            } else {
                Duration::from_millis(10)
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            for ev in &events {
                match ev.token() {
                    Token(0) => self.tun_ready = true,
                    Token(i) => {
                        if let Some(p) = self.ports.get_mut(i - 1) {
                            p.ready = true;
                        }
                    }
                }
            }
            self.wakeups += 1;
            self.sync();
            let now = self.shared.now();
            for _ in 0..ROUNDS_PER_WAKE {
                if self.tun_ready {
                    self.tun_ready = self.serve_tunnel(now);
                }
                for u in 0..self.ports.len() {
                    if self.ports[u].ready {
                        let more = self.serve_uplink(u, now);
                        self.ports[u].ready = more;
                    }
                }
                if !self.tun_ready && !self.ports.iter().any(|p| p.ready) {
                    break;
                }
            }
            if !self.waiting.is_empty() {
                self.retry_waiting();
            }
            if last_publish.elapsed() >= PUBLISH_EVERY {
                self.publish();
                last_publish = Instant::now();
            }
        }
        self.publish();
        Ok(())
    }

    /// Picks up a reloaded gateway and newly resolved neighbours.
    fn sync(&mut self) {
        let g = self.shared.gateway_generation.load(Ordering::Acquire);
        if g != self.gateway_generation {
            self.gateway_generation = g;
            self.pipeline.set_gateway(self.shared.gateway());
        }
        self.neighbours.sync(&self.shared.neighbours);
    }

    fn publish(&mut self) {
        self.count_queue_drops();
        let report = Report {
            pipeline: self.pipeline.stats().clone(),
            io_drops: self.io_drops,
            gso_whole: self.gso_whole,
            gso_segmented: self.gso_segmented,
            checksums_completed: self.checksums_completed,
            wakeups: self.wakeups,
            batches: self.batches,
        };
        if let Some(slot) = self.shared.reports.get(self.id) {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
        }
    }

    /// Adds what the kernel dropped at this worker's sockets since the last call (their receive queues
    /// were full): the earliest place load is shed, before any work is done on the packet.
    fn count_queue_drops(&mut self) {
        if let Ok(total) = self.tunnel.drops() {
            let new = total.wrapping_sub(self.tunnel_drops_seen);
            self.tunnel_drops_seen = total;
            self.io_drops[IoDrop::TunnelQueueFull.index()] += u64::from(new);
        }
        for p in &self.ports {
            if let Ok(n) = p.rx.take_drops() {
                self.io_drops[IoDrop::UplinkQueueFull.index()] += u64::from(n);
            }
        }
    }

    /// One batch from the tunnel socket; true when the socket may have more.
    fn serve_tunnel(&mut self, now: forwarder_core::Instant) -> bool {
        let got = match self.tun_rx.recv(self.tunnel.as_fd(), BATCH) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(worker = self.id, error = %e, "tunnel receive failed");
                return false;
            }
        };
        if got == 0 {
            return false;
        }
        self.batches += 1;
        let layout = self.tun_rx.layout();
        let mut from = [Ipv4Addr::UNSPECIFIED; BATCH];
        let mut keep = [false; BATCH];
        let mut gso = [None; BATCH];
        for i in 0..got {
            from[i] = tunnel::from_sockaddr_in(self.tun_rx.name(i)).0;
            let r = self.tun_rx.received(i);
            keep[i] = !r.truncated;
            if r.truncated {
                self.io_drops[IoDrop::Truncated.index()] += 1;
                continue;
            }
            let start = i * layout.slot;
            let dgram = &mut self.tun_rx.slab_mut()[start..start + r.len];
            match self
                .pipeline
                .tunnel_intake(from[i], dgram, self.shared.tunnel_mtu, self.min_mtu)
            {
                Intake::Translate { checksum_completed } => {
                    self.checksums_completed += u64::from(checksum_completed);
                }
                Intake::Segment(h) => {
                    keep[i] = false;
                    gso[i] = Some(h);
                }
                Intake::Drop(_) => keep[i] = false,
                Intake::DropOffload(e) => {
                    keep[i] = false;
                    self.io_drops[offload_drop(e).index()] += 1;
                }
            }
        }
        let Worker {
            pipeline,
            tun_rx,
            tun_tx,
            ports,
            neighbours,
            waiting,
            io_drops,
            shared,
            scratch,
            segments,
            segment_slot,
            segment_lens,
            gso_whole,
            gso_segmented,
            ..
        } = self;
        let segment_buf = &mut SegmentBuf {
            buf: segments,
            slot: *segment_slot,
            lens: segment_lens,
        };
        let lens: [usize; BATCH] =
            std::array::from_fn(|i| if i < got { tun_rx.received(i).len } else { 0 });
        let mut slots = tun_rx.slab_mut().chunks_mut(layout.slot).enumerate();
        let mut n = 0;
        // `whole[k]`: packet `k` of the batch is a TCP super-packet, translated whole.
        let mut whole = [None; BATCH];
        let mut batch: [TunnelPacket<'_>; BATCH] = std::array::from_fn(|_| {
            for (i, buf) in slots.by_ref() {
                if i < got && (keep[i] || gso[i].is_some()) {
                    whole[n] = gso[i];
                    n += 1;
                    return TunnelPacket {
                        from: from[i],
                        buf,
                        len: lens[i],
                    };
                }
            }
            TunnelPacket {
                from: Ipv4Addr::UNSPECIFIED,
                buf: &mut [],
                len: 0,
            }
        });
        let port = shared.tunnel_listen.port();
        let mut out = Out {
            tun_tx,
            ports,
            neighbours,
            waiting,
            io_drops,
            shared,
            port,
            scratch,
            sending: Sending::begin(),
        };
        // In arrival order: each run of ordinary datagrams as one batch call, each super-packet on its
        // own where it came, so that it leaves in order with the rest of its flow.
        let mut k = 0;
        while k < n {
            let end = (k..n).find(|&j| whole[j].is_some()).unwrap_or(n);
            if end > k {
                pipeline.outbound_batch(&mut batch[k..end], now, |_, action| out.act(action));
            }
            if let (Some(h), Some(p)) = (whole.get(end).copied().flatten(), batch.get_mut(end)) {
                let buf = std::mem::take(&mut p.buf);
                let (action, vnet) = pipeline.outbound_whole(p.from, buf, p.len, &h, now);
                match out.send_whole(action, &vnet, segment_buf) {
                    Whole::Sent => *gso_whole += 1,
                    Whole::Segmented => *gso_segmented += 1,
                    Whole::NotForwarded => {}
                }
            }
            k = end + 1;
        }
        out.flush();
        got == BATCH
    }

    /// One batch from uplink `u`'s packet socket; true when it may have more.
    fn serve_uplink(&mut self, u: usize, now: forwarder_core::Instant) -> bool {
        let got = {
            let p = &mut self.ports[u];
            match p.rx_batch.recv(p.rx.as_fd(), BATCH) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(worker = self.id, uplink = u, error = %e, "uplink receive failed");
                    return false;
                }
            }
        };
        if got == 0 {
            return false;
        }
        self.batches += 1;
        let uplink = UplinkId::try_from(u).unwrap_or(UplinkId::MAX);
        let layout = self.ports[u].rx_batch.layout();
        let mut keep = [false; BATCH];
        let mut lens = [0usize; BATCH];
        let mut gso = [None; BATCH];
        for i in 0..got {
            let p = &mut self.ports[u];
            let r = p.rx_batch.received(i);
            lens[i] = r.len;
            if r.truncated {
                self.io_drops[IoDrop::Truncated.index()] += 1;
                continue;
            }
            if p.rx_batch.name(i).sll_pkttype == libc::PACKET_OTHERHOST {
                self.io_drops[IoDrop::OtherHost.index()] += 1;
                continue;
            }
            let vnet = VnetHdr::parse(p.rx_batch.prefix(i));
            let start = i * layout.slot + layout.headroom;
            let frame = &mut p.rx_batch.slab_mut()[start..start + r.len];
            match self.pipeline.uplink_intake(vnet, frame) {
                Intake::Translate { checksum_completed } => {
                    self.checksums_completed += u64::from(checksum_completed);
                    keep[i] = true;
                }
                Intake::Segment(h) => gso[i] = Some(h),
                Intake::Drop(_) => {}
                Intake::DropOffload(e) => self.io_drops[offload_drop(e).index()] += 1,
            }
        }
        {
            let Worker {
                pipeline,
                tun_tx,
                ports,
                neighbours,
                waiting,
                io_drops,
                shared,
                scratch,
                ..
            } = self;
            let (before, rest) = ports.split_at_mut(u);
            let (this, after) = rest.split_at_mut(1);
            let port = &mut this[0];
            let mut slots = port.rx_batch.slab_mut().chunks_mut(layout.slot).enumerate();
            let mut n = 0;
            let mut batch: [UplinkPacket<'_>; BATCH] = std::array::from_fn(|_| {
                for (i, buf) in slots.by_ref() {
                    if i < got && keep[i] {
                        n += 1;
                        return UplinkPacket {
                            buf,
                            start: layout.headroom,
                            len: lens[i],
                        };
                    }
                }
                UplinkPacket {
                    buf: &mut [],
                    start: 0,
                    len: 0,
                }
            });
            let mut out = UplinkOut {
                out: Out {
                    tun_tx,
                    ports: &mut [],
                    neighbours,
                    waiting,
                    io_drops,
                    shared,
                    port: shared.tunnel_listen.port(),
                    scratch,
                    sending: Sending::begin(),
                },
                before,
                after,
                this_tx: &port.tx,
                this_batch: &mut port.tx_batch,
                this_to: port.to,
                this_mac: port.mac,
                uplink,
                neighbour_frames: [false; BATCH],
            };
            pipeline.inbound_batch(uplink, &mut batch[..n], now, |i, action| out.act(i, action));
            out.flush();
            out.neighbours(&batch[..n]);
        }
        for (i, h) in gso.iter().enumerate().take(got) {
            if let Some(h) = h {
                self.segment_and_serve(u, i, h, now);
            }
        }
        got == BATCH
    }

    /// Cuts the GSO super-packet in slot `i` of uplink `u` into segments and serves them as one batch.
    fn segment_and_serve(&mut self, u: usize, i: usize, h: &VnetHdr, now: forwarder_core::Instant) {
        let uplink = UplinkId::try_from(u).unwrap_or(UplinkId::MAX);
        let layout = self.ports[u].rx_batch.layout();
        let len = self.ports[u].rx_batch.received(i).len;
        let start = i * layout.slot + layout.headroom;
        let Worker {
            pipeline,
            tun_tx,
            ports,
            neighbours,
            waiting,
            io_drops,
            shared,
            scratch,
            segments,
            segment_slot,
            segment_lens,
            gso_segmented,
            ..
        } = self;
        let (before, rest) = ports.split_at_mut(u);
        let (this, after) = rest.split_at_mut(1);
        let port = &mut this[0];
        let frame = &port.rx_batch.slab_mut()[start..start + len];
        let mut out = UplinkOut {
            out: Out {
                tun_tx,
                ports: &mut [],
                neighbours,
                waiting,
                io_drops,
                shared,
                port: shared.tunnel_listen.port(),
                scratch,
                sending: Sending::begin(),
            },
            before,
            after,
            this_tx: &port.tx,
            this_batch: &mut port.tx_batch,
            this_to: port.to,
            this_mac: port.mac,
            uplink,
            neighbour_frames: [false; BATCH],
        };
        let mut held = Held::default();
        let r = pipeline.inbound_segmented(
            uplink,
            frame,
            h,
            segments,
            *segment_slot,
            segment_lens,
            now,
            |i, action| match action {
                Action::ToTunnel {
                    node,
                    datagram,
                    segment: None,
                } => {
                    if let Some(d) = held.hold(node, datagram) {
                        out.out.send_to_tunnel(node, d, None);
                    }
                }
                other => out.act(i, other),
            },
        );
        if let Err(e) = r {
            out.out.io_drops[offload_drop(e).index()] += 1;
            return;
        }
        *gso_segmented += 1;
        held.send(&mut out.out);
        out.flush();
    }

    /// Sends frames whose next hop has been resolved meanwhile; drops those that waited too long.
    fn retry_waiting(&mut self) {
        let now = Instant::now();
        let mut kept = Vec::new();
        for w in std::mem::take(&mut self.waiting) {
            let u = usize::from(w.uplink);
            let Some(port) = self.ports.get(u) else {
                continue;
            };
            if let Some(mac) = self.neighbours.get(w.uplink, w.next_hop) {
                let mut frame = w.frame;
                write_macs(&mut frame, mac, port.mac);
                if port.tx.send_one(&port.to, &frame).is_err() {
                    self.io_drops[IoDrop::UplinkSendFailed.index()] += 1;
                }
            } else if self.shared.neighbours.pending(w.uplink, w.next_hop)
                || now.saturating_duration_since(w.since) < neighbour::RETRANS
            {
                kept.push(w);
            } else {
                self.io_drops[IoDrop::NeighbourUnresolved.index()] += 1;
            }
        }
        self.waiting = kept;
    }
}

fn offload_drop(e: OffloadError) -> IoDrop {
    match e {
        OffloadError::BadChecksumOffsets => IoDrop::BadChecksumOffsets,
        OffloadError::UnsupportedGso => IoDrop::UnsupportedGso,
        OffloadError::MalformedGso => IoDrop::MalformedGso,
        OffloadError::TooManySegments => IoDrop::TooManySegments,
    }
}

fn write_macs(frame: &mut [u8], dst: MacAddr, src: MacAddr) {
    if frame.len() >= ethernet::HEADER_LEN {
        let mut f = ethernet::Frame::new_unchecked(&mut frame[..ethernet::HEADER_LEN]);
        f.set_dst(&dst);
        f.set_src(&src);
    }
}

/// Where the actions of one batch go; frames live for `'b` (the borrow of the receive or segment buffer).
struct Out<'w, 'b> {
    tun_tx: &'w mut TunnelTx,
    ports: &'w mut [Port],
    neighbours: &'w mut LocalNeighbours,
    waiting: &'w mut Vec<Waiting>,
    io_drops: &'w mut [u64; IoDrop::COUNT],
    shared: &'w Shared,
    port: u16,
    scratch: &'w mut [u8; neighbour::MAX_FRAME],
    /// The session the batches are filled in; everything is flushed before the frames' borrow ends.
    sending: Sending<'b>,
}

impl<'b> Out<'_, 'b> {
    fn act(&mut self, action: Action<'b>) {
        match action {
            Action::Forward {
                uplink,
                next_hop,
                frame,
            } => {
                let u = usize::from(uplink);
                let Some(port) = self.ports.get_mut(u) else {
                    return;
                };
                forward(
                    uplink,
                    next_hop,
                    frame,
                    &port.tx,
                    &mut port.tx_batch,
                    &self.sending,
                    port.to,
                    port.mac,
                    self.neighbours,
                    self.waiting,
                    self.io_drops,
                    self.shared,
                    self.scratch,
                );
            }
            Action::ToTunnel {
                node,
                datagram,
                segment,
            } => self.send_to_tunnel(node, datagram, segment),
            Action::Neighbour | Action::Drop(_) => {}
        }
    }

    /// Sends a super-packet translated whole ([`Pipeline::outbound_whole`]): on its uplink's GSO socket
    /// with `vnet`, after what this batch queued for that uplink (so that it stays in order). Where that
    /// cannot be (next hop unresolved, or the send refused) it is cut into segments with complete
    /// checksums here, and those are sent or parked one by one.
    fn send_whole(
        &mut self,
        action: Action<'b>,
        vnet: &VnetHdr,
        seg: &mut SegmentBuf<'_>,
    ) -> Whole {
        let Action::Forward {
            uplink,
            next_hop,
            frame,
        } = action
        else {
            self.act(action);
            return Whole::NotForwarded;
        };
        let Some(port) = self.ports.get_mut(usize::from(uplink)) else {
            return Whole::NotForwarded;
        };
        let mac = self.neighbours.get(uplink, next_hop);
        if let Some(mac) = mac {
            write_macs(frame, mac, port.mac);
            flush_port(&port.tx, &mut port.tx_batch, &self.sending, self.io_drops);
            let hdr = vnet.to_bytes(vnet_hdr_len(frame, vnet));
            if port.gso_tx.send(&port.to, &hdr, frame).is_ok() {
                return Whole::Sent;
            }
        }
        let mut chunks = seg.buf.chunks_mut(seg.slot);
        if let Err(e) = offload::segment(frame, vnet, |_| chunks.next(), seg.lens, true) {
            self.io_drops[offload_drop(e).index()] += 1;
            return Whole::NotForwarded;
        }
        for (piece, &len) in seg.buf.chunks_mut(seg.slot).zip(seg.lens.iter()) {
            let f = &mut piece[..len];
            match mac {
                Some(mac) => {
                    write_macs(f, mac, port.mac);
                    if port.tx.send_one(&port.to, f).is_err() {
                        self.io_drops[IoDrop::UplinkSendFailed.index()] += 1;
                    }
                }
                None => park(
                    uplink,
                    next_hop,
                    f,
                    &port.tx,
                    port.to,
                    port.mac,
                    self.waiting,
                    self.io_drops,
                    self.shared,
                    self.scratch,
                ),
            }
        }
        Whole::Segmented
    }

    fn send_to_tunnel(&mut self, node: Ipv4Addr, datagram: &'b [u8], segment: Option<usize>) {
        let to = tunnel::sockaddr_in(node, self.port);
        let failed = match segment {
            None => self.tun_tx.push(&self.sending, to, datagram),
            Some(n) => self
                .tun_tx
                .push_all(&self.sending, to, datagram.chunks(n.max(1))),
        };
        self.count_tunnel_failures(failed);
    }

    fn count_tunnel_failures(&mut self, failed: usize) {
        self.io_drops[IoDrop::TunnelSendFailed.index()] += u64::try_from(failed).unwrap_or(0);
    }

    fn flush(&mut self) {
        let failed = self.tun_tx.flush(&self.sending);
        self.count_tunnel_failures(failed);
        for p in self.ports.iter_mut() {
            flush_port(&p.tx, &mut p.tx_batch, &self.sending, self.io_drops);
        }
    }
}

fn flush_port(
    tx: &TxSocket,
    batch: &mut SendBatch<libc::sockaddr_ll>,
    sending: &Sending<'_>,
    io_drops: &mut [u64; IoDrop::COUNT],
) {
    if batch.len(sending) > 0 {
        let f = batch.flush(sending, tx.as_fd());
        io_drops[IoDrop::UplinkSendFailed.index()] += u64::try_from(f.failed).unwrap_or(0);
    }
}

/// Sends (queues) a translated frame on an uplink, or parks it while its next hop is resolved.
#[allow(clippy::too_many_arguments)] // the pieces of a worker one forward touches
fn forward<'b>(
    uplink: UplinkId,
    next_hop: IpAddr,
    frame: &'b mut [u8],
    tx: &TxSocket,
    batch: &mut SendBatch<libc::sockaddr_ll>,
    sending: &Sending<'b>,
    to: libc::sockaddr_ll,
    our_mac: MacAddr,
    neighbours: &mut LocalNeighbours,
    waiting: &mut Vec<Waiting>,
    io_drops: &mut [u64; IoDrop::COUNT],
    shared: &Shared,
    scratch: &mut [u8; neighbour::MAX_FRAME],
) {
    if let Some(mac) = neighbours.get(uplink, next_hop) {
        write_macs(frame, mac, our_mac);
        if batch.is_full(sending) {
            flush_port(tx, batch, sending, io_drops);
        }
        let queued = batch.push(sending, to, frame);
        debug_assert!(queued, "flushed just above when full");
        return;
    }
    park(
        uplink, next_hop, frame, tx, to, our_mac, waiting, io_drops, shared, scratch,
    );
}

/// The slow path of [`forward`]: keeps a copy of `frame` until its next hop is resolved, and asks for it.
#[allow(clippy::too_many_arguments)] // as `forward`
fn park(
    uplink: UplinkId,
    next_hop: IpAddr,
    frame: &[u8],
    tx: &TxSocket,
    to: libc::sockaddr_ll,
    our_mac: MacAddr,
    waiting: &mut Vec<Waiting>,
    io_drops: &mut [u64; IoDrop::COUNT],
    shared: &Shared,
    scratch: &mut [u8; neighbour::MAX_FRAME],
) {
    if waiting.len() >= MAX_WAITING {
        waiting.remove(0);
        io_drops[IoDrop::NeighbourQueueFull.index()] += 1;
    }
    let now = Instant::now();
    waiting.push(Waiting {
        uplink,
        next_hop,
        frame: frame.to_vec(),
        since: now,
    });
    if shared.neighbours.want(uplink, next_hop, now) {
        let Some(u) = shared.uplinks.get(usize::from(uplink)) else {
            return;
        };
        if let Some(src) = u.source_for(next_hop) {
            if let Some(n) = neighbour::request(next_hop, src, our_mac, None, scratch) {
                let _ = tx.send_one(&to, &scratch[..n]);
            }
        }
    }
}

/// The worker's buffer for segments cut in software: `buf` in pieces of `slot` bytes, `lens` their lengths.
struct SegmentBuf<'a> {
    buf: &'a mut [u8],
    slot: usize,
    lens: &'a mut Vec<usize>,
}

/// How a super-packet translated whole left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whole {
    /// Whole, with its segmentation left to the kernel (or the NIC).
    Sent,
    /// Cut into segments here: its next hop is not resolved yet (the segments wait for it), or the
    /// uplink refused it whole.
    Segmented,
    /// It did not leave on an uplink (dropped, or answered into the tunnel).
    NotForwarded,
}

/// `virtio_net_hdr.hdr_len` of a TCP super-packet: Ethernet, IP and TCP headers with their options.
fn vnet_hdr_len(frame: &[u8], vnet: &VnetHdr) -> u16 {
    let l4 = usize::from(vnet.csum_start);
    let tcp_len = frame.get(l4 + 12).map_or(20, |b| usize::from(b >> 4) * 4);
    u16::try_from(l4 + tcp_len).unwrap_or(0)
}

/// Where the actions of an uplink's batch go: as [`Out`], with the receiving uplink's own port split off
/// (its receive buffers are borrowed by the batch), and neighbour frames handled.
struct UplinkOut<'w, 'b> {
    out: Out<'w, 'b>,
    before: &'w mut [Port],
    after: &'w mut [Port],
    this_tx: &'w TxSocket,
    this_batch: &'w mut SendBatch<libc::sockaddr_ll>,
    this_to: libc::sockaddr_ll,
    this_mac: MacAddr,
    uplink: UplinkId,
    neighbour_frames: [bool; BATCH],
}

impl<'b> UplinkOut<'_, 'b> {
    fn act(&mut self, i: usize, action: Action<'b>) {
        match action {
            Action::Forward {
                uplink,
                next_hop,
                frame,
            } => {
                let u = usize::from(uplink);
                let here = usize::from(self.uplink);
                let (tx, batch, to, mac) = if u == here {
                    (
                        self.this_tx,
                        &mut *self.this_batch,
                        self.this_to,
                        self.this_mac,
                    )
                } else {
                    let p = if u < here {
                        self.before.get_mut(u)
                    } else {
                        self.after.get_mut(u - here - 1)
                    };
                    let Some(p) = p else { return };
                    (&p.tx, &mut p.tx_batch, p.to, p.mac)
                };
                forward(
                    uplink,
                    next_hop,
                    frame,
                    tx,
                    batch,
                    &self.out.sending,
                    to,
                    mac,
                    self.out.neighbours,
                    self.out.waiting,
                    self.out.io_drops,
                    self.out.shared,
                    self.out.scratch,
                );
            }
            Action::ToTunnel {
                node,
                datagram,
                segment,
            } => self.out.send_to_tunnel(node, datagram, segment),
            Action::Neighbour => {
                if let Some(f) = self.neighbour_frames.get_mut(i) {
                    *f = true;
                }
            }
            Action::Drop(_) => {}
        }
    }

    /// Answers and learns from the ARP/NDP frames of the batch, once the pipeline has released it.
    fn neighbours(&mut self, batch: &[UplinkPacket<'_>]) {
        let Some(u) = self.out.shared.uplinks.get(usize::from(self.uplink)) else {
            return;
        };
        let now = Instant::now();
        // The addresses of peers this replica serves now are answered for too (rare: a slow path).
        let adopted: Vec<IpAddr>;
        let ours = match self.out.shared.gateway().standby() {
            Some(s) if s.is_handed_over() => &[][..],
            Some(s) if s.serving_any() && !u.peer_egress.is_empty() => {
                adopted = u
                    .egress
                    .iter()
                    .copied()
                    .chain(
                        u.peer_egress
                            .iter()
                            .filter(|(o, _)| s.is_serving(*o))
                            .map(|&(_, ip)| ip),
                    )
                    .collect();
                &adopted[..]
            }
            _ => &u.egress[..],
        };
        for (p, _) in batch.iter().zip(self.neighbour_frames).filter(|(_, f)| *f) {
            let Some(frame) = p.buf.get(p.start..p.start + p.len) else {
                continue;
            };
            let heard = neighbour::handle(frame, self.this_mac, ours, self.out.scratch);
            if let Some(claim) = heard.claim {
                // Another host holds a peer's address: the peer, still alive on this segment (state sync
                // takes over no peer whose addresses are claimed while it is silent).
                if claim.mac != self.this_mac && u.peer_egress.iter().any(|(_, ip)| *ip == claim.ip)
                {
                    if let Some(s) = self.out.shared.gateway().standby() {
                        s.heard_claim(claim.ip);
                    }
                }
                self.out.shared.neighbours.heard(self.uplink, claim, now);
            }
            if let Some(n) = heard.reply_len {
                if self
                    .this_tx
                    .send_one(&self.this_to, &self.out.scratch[..n])
                    .is_err()
                {
                    self.out.io_drops[IoDrop::UplinkSendFailed.index()] += 1;
                }
            }
        }
        self.neighbour_frames = [false; BATCH];
    }

    fn flush(&mut self) {
        self.out.flush();
        let s = &self.out.sending;
        flush_port(self.this_tx, self.this_batch, s, self.out.io_drops);
        for p in self.before.iter_mut().chain(self.after.iter_mut()) {
            flush_port(&p.tx, &mut p.tx_batch, s, self.out.io_drops);
        }
    }
}

/// The translated segments of one super-packet, held so that they can leave together: references into the
/// worker's segment buffer and their nodes, in fixed arrays (no allocation per super-packet).
#[derive(Debug)]
struct Held<'b> {
    target: Target,
    frames: [&'b [u8]; MAX_SEGMENTS],
    nodes: [Ipv4Addr; MAX_SEGMENTS],
    len: usize,
}

impl Default for Held<'_> {
    fn default() -> Self {
        Held {
            target: Target::None,
            frames: [&[]; MAX_SEGMENTS],
            nodes: [Ipv4Addr::UNSPECIFIED; MAX_SEGMENTS],
            len: 0,
        }
    }
}

impl<'b> Held<'b> {
    /// Holds `frame` for `node`; gives it back when the arrays are full (the caller sends it at once).
    fn hold(&mut self, node: Ipv4Addr, frame: &'b [u8]) -> Option<&'b [u8]> {
        if self.len == MAX_SEGMENTS {
            return Some(frame);
        }
        self.frames[self.len] = frame;
        self.nodes[self.len] = node;
        self.len += 1;
        self.target = match self.target {
            Target::None => Target::Node(node),
            Target::Node(n) if n == node => Target::Node(n),
            _ => Target::Mixed,
        };
        None
    }

    /// Sends what is held: with UDP GSO when it all goes to one node, else one by one.
    fn send(&self, out: &mut Out<'_, 'b>) {
        let frames = &self.frames[..self.len];
        match self.target {
            Target::None => {}
            Target::Node(node) => send_tunnel_segments(out, node, frames),
            Target::Mixed => {
                for (f, &node) in frames.iter().zip(&self.nodes) {
                    out.send_to_tunnel(node, f, None);
                }
            }
        }
    }
}

/// Where the held results of one super-packet go.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum Target {
    #[default]
    None,
    Node(Ipv4Addr),
    /// Results with different destinations: sent one by one.
    Mixed,
}

/// Sends translated datagrams for one node with UDP GSO where they have one size (all but the last), in
/// sends of at most 64 datagrams and 65,000 bytes; otherwise one by one.
fn send_tunnel_segments<'b>(out: &mut Out<'_, 'b>, node: Ipv4Addr, frames: &[&'b [u8]]) {
    let Some(first) = frames.first() else { return };
    let size = first.len();
    let uniform = frames
        .iter()
        .enumerate()
        .all(|(k, f)| f.len() == size || (k + 1 == frames.len() && f.len() < size));
    if frames.len() < 2 || !uniform || size == 0 {
        for f in frames {
            out.send_to_tunnel(node, f, None);
        }
        return;
    }
    let to = tunnel::sockaddr_in(node, out.port);
    let segment = u16::try_from(size).unwrap_or(u16::MAX);
    let failed = out.tun_tx.send_segments(&out.sending, &to, frames, segment);
    out.count_tunnel_failures(failed);
}
