//! The tunnel socket: UDP on the gateway's pod address, port 4790 by default. Every worker opens its own
//! socket on the same address with `SO_REUSEPORT`; a program on the group hands each datagram to the worker
//! pinned to the CPU processing it (`steer.rs`), and the kernel's 4-tuple hash takes those processed
//! elsewhere.
//!
//! What the gateway sends into the tunnel leaves from [`TunnelSenders`]: a few more UDP sockets on the same
//! address, each bound to a port the kernel picks from its ephemeral range, as the kernel's own vxlan device
//! picks its source ports (RFC 7348 §5: the outer source port carries a hash of the inner flow, so that the
//! underlay's ECMP and the nodes' receive-side scaling spread the flows while each flow keeps one path).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};

use std::sync::Arc;

use forwarder_core::wire::vxlan;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::steer::{self, Steering};

use super::mmsg::{SendBatch, Sending};

/// One worker's tunnel socket.
#[derive(Debug)]
pub(crate) struct TunnelSocket {
    socket: Socket,
}

impl TunnelSocket {
    /// Binds `listen` with `SO_REUSEPORT` and large buffers, and steers the group with `steering` (the
    /// socket's index in the group is the order of binding).
    pub(crate) fn open(
        listen: SocketAddrV4,
        buffer: usize,
        steering: &Steering,
    ) -> io::Result<TunnelSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        set_buffers(&socket, buffer);
        socket.bind(&SockAddr::from(listen)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot bind the tunnel socket to {listen}: {e} (is that address configured on an \
                     interface of this network namespace, and is no other program using the port?)"
                ),
            )
        })?;
        steer::attach(
            socket.as_fd(),
            libc::SOL_SOCKET,
            steer::SO_ATTACH_REUSEPORT_CBPF,
            &steering.program(steer::Fallback::KernelHash),
        )?;
        Ok(TunnelSocket { socket })
    }
}

/// The sockets the workers send into the tunnel from, shared by all of them: an inner flow leaves from
/// the same port whichever worker sends it. Sending is all they do: a filter drops whatever arrives at
/// them (nothing should; the nodes send to the listen port).
#[derive(Debug)]
pub(crate) struct TunnelSenders {
    sockets: Vec<Socket>,
    ports: Vec<u16>,
}

impl TunnelSenders {
    /// `count` (at least 1) sockets on the address of `listen`, each on a port the kernel chooses.
    pub(crate) fn open(
        listen: SocketAddrV4,
        count: u16,
        buffer: usize,
    ) -> io::Result<TunnelSenders> {
        let mut sockets = Vec::with_capacity(usize::from(count.max(1)));
        let mut ports = Vec::with_capacity(sockets.capacity());
        let at = SocketAddrV4::new(*listen.ip(), 0);
        for _ in 0..count.max(1) {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
            socket.bind(&SockAddr::from(at)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot bind a tunnel sending socket to {at}: {e} (is that address configured on an \
                         interface of this network namespace?)"
                    ),
                )
            })?;
            // Drop everything that arrives (classic BPF `ret #0`) before it is queued.
            socket.attach_filter(&[socket2::SockFilter::new(0x06, 0, 0, 0)])?;
            set_buffers(&socket, buffer);
            let port = socket
                .local_addr()?
                .as_socket_ipv4()
                .map_or(0, |a| a.port());
            sockets.push(socket);
            ports.push(port);
        }
        Ok(TunnelSenders { sockets, ports })
    }

    /// How many sockets (source ports) there are.
    pub(crate) fn len(&self) -> usize {
        self.sockets.len()
    }

    /// The source ports, in socket order.
    pub(crate) fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The socket for an inner flow hash ([`forwarder_core::wire::vxlan::inner_flow_hash`]): the hash's
    /// share of the sockets, `hash × len / 2³²`.
    pub(crate) fn pick(&self, hash: u32) -> usize {
        let n = u64::try_from(self.sockets.len()).unwrap_or(1);
        usize::try_from((u64::from(hash) * n) >> 32).unwrap_or(0)
    }

    /// Socket `i`.
    pub(crate) fn socket(&self, i: usize) -> BorrowedFd<'_> {
        self.sockets[i.min(self.sockets.len() - 1)].as_fd()
    }
}

/// A worker's queue into the tunnel: one `sendmmsg` batch per sending socket, each datagram queued on the
/// socket its inner flow hashes to, so that a flow's datagrams leave in order from one source port.
pub(crate) struct TunnelTx {
    senders: Arc<TunnelSenders>,
    batches: Vec<SendBatch<libc::sockaddr_in>>,
}

impl std::fmt::Debug for TunnelTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelTx")
            .field("sockets", &self.batches.len())
            .finish()
    }
}

impl TunnelTx {
    /// Room for `per_socket` datagrams per socket between flushes.
    pub(crate) fn new(senders: Arc<TunnelSenders>, per_socket: usize) -> TunnelTx {
        let batches = (0..senders.len())
            .map(|_| SendBatch::new(per_socket, empty_sockaddr_in()))
            .collect();
        TunnelTx { senders, batches }
    }

    /// Queues `datagram` (VXLAN header first) for `to` in session `s`, on the socket of its inner flow;
    /// returns how many datagrams a flush this made room with failed to send.
    pub(crate) fn push<'b>(
        &mut self,
        s: &Sending<'b>,
        to: libc::sockaddr_in,
        datagram: &'b [u8],
    ) -> usize {
        let i = self.senders.pick(vxlan::inner_flow_hash(datagram));
        self.push_on(i, s, to, datagram)
    }

    /// Queues `datagrams`, all on the socket of the first one's inner flow (the fragments of one packet).
    pub(crate) fn push_all<'b>(
        &mut self,
        s: &Sending<'b>,
        to: libc::sockaddr_in,
        datagrams: impl Iterator<Item = &'b [u8]>,
    ) -> usize {
        let mut i = None;
        let mut failed = 0;
        for d in datagrams {
            let at = *i.get_or_insert_with(|| self.senders.pick(vxlan::inner_flow_hash(d)));
            failed += self.push_on(at, s, to, d);
        }
        failed
    }

    fn push_on<'b>(
        &mut self,
        i: usize,
        s: &Sending<'b>,
        to: libc::sockaddr_in,
        datagram: &'b [u8],
    ) -> usize {
        let mut failed = 0;
        if self.batches[i].is_full(s) {
            failed = self.flush_socket(s, i);
        }
        let queued = self.batches[i].push(s, to, datagram);
        debug_assert!(queued, "flushed just above when full");
        failed
    }

    fn flush_socket(&mut self, s: &Sending<'_>, i: usize) -> usize {
        if self.batches[i].len(s) == 0 {
            return 0;
        }
        self.batches[i].flush(s, self.senders.socket(i)).failed
    }

    /// Sends everything `s` queued; returns how many datagrams failed.
    pub(crate) fn flush(&mut self, s: &Sending<'_>) -> usize {
        (0..self.batches.len())
            .map(|i| self.flush_socket(s, i))
            .sum()
    }

    /// Sends `parts` (the VXLAN datagrams of one inner flow, all `segment` bytes but the last) to `to`
    /// with UDP GSO, after what that flow's socket has queued; returns how many datagrams failed.
    pub(crate) fn send_segments(
        &mut self,
        s: &Sending<'_>,
        to: &libc::sockaddr_in,
        parts: &[&[u8]],
        segment: u16,
    ) -> usize {
        let Some(first) = parts.first() else { return 0 };
        let i = self.senders.pick(vxlan::inner_flow_hash(first));
        let mut failed = self.flush_socket(s, i);
        let per_send = (65_000 / usize::from(segment.max(1))).clamp(1, 64);
        for group in parts.chunks(per_send) {
            if send_segments(self.senders.socket(i), to, group, segment).is_err() {
                failed += group.len();
            }
        }
        failed
    }
}

/// Sends `parts` to `to` as one UDP GSO send (`UDP_SEGMENT`): the kernel cuts the concatenation into
/// datagrams of `segment` bytes (the last may be shorter). Every part but the last must be exactly
/// `segment` bytes, at most 64 parts and 65,000 bytes in all.
fn send_segments(
    fd: BorrowedFd<'_>,
    to: &libc::sockaddr_in,
    parts: &[&[u8]],
    segment: u16,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const UDP_SEGMENT: libc::c_int = 103;
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 64];
    for (v, p) in iov.iter_mut().zip(parts) {
        *v = libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        };
    }
    // Room for one cmsghdr carrying a u16, aligned.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is integers and raw pointers: all-zero is a valid value (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::from_ref(to).cast_mut().cast();
    msg.msg_namelen =
        libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(16);
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = parts.len().min(64);
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
    // SAFETY: msg_control points at `control`: 32 bytes, 8-aligned (u64s) as a cmsghdr needs, and
    // msg_controllen = CMSG_SPACE(2) = 24 ≤ 32, so CMSG_FIRSTHDR returns `control` itself (non-null) and
    // the header plus the u16 written at CMSG_DATA stay inside it (the data is written unaligned).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
    }
    // SAFETY: msg points at `to`, `iov` (its first msg_iovlen ≤ 64 entries set from `parts`, borrowed for
    // the call) and `control`, all alive until sendmsg returns; the kernel only reads them.
    let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Asks for `bytes` of socket buffer, beyond `net.core.{r,w}mem_max` when we may (CAP_NET_ADMIN).
pub(crate) fn set_buffers(socket: &impl std::os::fd::AsRawFd, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: v is a live c_int and its size is passed.
            let r = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const v).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

impl TunnelSocket {
    /// Datagrams the kernel dropped at this socket since it was opened, before the gateway saw them:
    /// `SK_MEMINFO_DROPS` of `SO_MEMINFO` (`sk_drops`), which grows when the receive queue is full, and
    /// for the rare datagram with a bad UDP checksum (udp(7), `include/uapi/linux/sock_diag.h`).
    pub(crate) fn drops(&self) -> io::Result<u32> {
        use std::os::fd::AsRawFd;
        const SK_MEMINFO_DROPS: usize = 8;
        let mut mem = [0u32; 16];
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(&mem)).unwrap_or(64);
        // SAFETY: mem is a live array of len bytes; the kernel writes at most len bytes and sets len.
        let r = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MEMINFO,
                mem.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if usize::try_from(len).unwrap_or(0) < (SK_MEMINFO_DROPS + 1) * 4 {
            return Err(io::Error::other(
                "SO_MEMINFO too short for SK_MEMINFO_DROPS",
            ));
        }
        Ok(mem[SK_MEMINFO_DROPS])
    }
}

impl AsFd for TunnelSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// A zeroed IPv4 socket address for receive batches.
pub(crate) fn empty_sockaddr_in() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is integers and a byte array: all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The IPv4 socket address `ip:port`.
pub(crate) fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    let mut a = empty_sockaddr_in();
    a.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
    a.sin_port = port.to_be();
    a.sin_addr = libc::in_addr {
        s_addr: u32::from(ip).to_be(),
    };
    a
}

/// The address and port of a received `sockaddr_in`.
pub(crate) fn from_sockaddr_in(a: &libc::sockaddr_in) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
        u16::from_be(a.sin_port),
    )
}

#[cfg(test)]
mod tests {
    use super::super::mmsg::{RecvBatch, SlotLayout};
    use super::*;

    /// One socket per group: the steering program answers 0 on CPU 0 and hashes elsewhere.
    fn one() -> Steering {
        Steering::new(vec![0], 1)
    }

    #[test]
    fn sockaddr_round_trip() {
        let a = sockaddr_in(Ipv4Addr::new(172, 18, 0, 11), 4790);
        assert_eq!(from_sockaddr_in(&a), (Ipv4Addr::new(172, 18, 0, 11), 4790));
    }

    #[test]
    fn two_workers_share_a_port_and_exchange_a_batch() {
        let a =
            TunnelSocket::open(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 1 << 20, &one()).unwrap();
        let local = a.socket.local_addr().unwrap().as_socket_ipv4().unwrap();
        let b = TunnelSocket::open(local, 1 << 20, &one()).unwrap();
        drop(b);
        let mut tx = SendBatch::new(4, empty_sockaddr_in());
        let msgs: [&[u8]; 3] = [b"one", b"two", b"three"];
        let s = Sending::begin();
        for m in msgs {
            assert!(tx.push(&s, sockaddr_in(*local.ip(), local.port()), m));
        }
        let f = tx.flush(&s, a.as_fd());
        assert_eq!((f.sent, f.failed), (3, 0));
        let layout = SlotLayout {
            slot: 64,
            headroom: 8,
            max_len: 32,
            prefix: 0,
        };
        let mut rx = RecvBatch::new(8, layout, empty_sockaddr_in());
        let mut got = 0;
        for _ in 0..100 {
            got += rx.recv(a.as_fd(), 8).unwrap();
            if got == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 3);
        let r = rx.received(2);
        let slab = rx.slab_mut();
        assert_eq!(&slab[2 * 64 + 8..2 * 64 + 8 + r.len], b"three");
        assert_eq!(from_sockaddr_in(rx.name(0)).0, Ipv4Addr::LOCALHOST);

        // One GSO send arrives as separate datagrams of the segment size.
        let to = sockaddr_in(*local.ip(), local.port());
        let senders = Arc::new(TunnelSenders::open(local, 2, 1 << 20).unwrap());
        let mut tx = TunnelTx::new(Arc::clone(&senders), 4);
        let s = Sending::begin();
        assert_eq!(tx.send_segments(&s, &to, &[b"abcd", b"efgh", b"ij"], 4), 0);
        let mut got = 0;
        for _ in 0..100 {
            got += rx.recv(a.as_fd(), 8).unwrap();
            if got >= 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 3);
        let lens: Vec<usize> = (0..3).map(|i| rx.received(i).len).collect();
        assert_eq!(lens, [4, 4, 2]);
        assert_eq!(&rx.slab_mut()[64 + 8..64 + 12], b"efgh");
        let from: Vec<u16> = (0..3).map(|i| from_sockaddr_in(rx.name(i)).1).collect();
        assert!(senders.ports().contains(&from[0]), "{from:?}");
        assert!(
            from.iter().all(|&p| p == from[0]),
            "one send, one port: {from:?}"
        );
    }

    /// A VXLAN datagram whose inner packet is UDP from 10.244.1.5:`sport` to 198.51.100.10:53.
    fn flow_datagram(sport: u16, payload: u8) -> Vec<u8> {
        let mut d = vec![0u8; 8 + 14 + 20 + 8 + 4];
        d[0] = 0x08;
        d[8 + 12..8 + 14].copy_from_slice(&[0x08, 0x00]);
        let ip = 8 + 14;
        d[ip] = 0x45;
        d[ip + 9] = 17;
        d[ip + 12..ip + 16].copy_from_slice(&[10, 244, 1, 5]);
        d[ip + 16..ip + 20].copy_from_slice(&[198, 51, 100, 10]);
        d[ip + 20..ip + 22].copy_from_slice(&sport.to_be_bytes());
        d[ip + 22..ip + 24].copy_from_slice(&53u16.to_be_bytes());
        d[ip + 28..].fill(payload);
        d
    }

    #[test]
    fn each_inner_flow_leaves_from_one_source_port_and_flows_spread() {
        let rx_sock =
            TunnelSocket::open(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 1 << 20, &one()).unwrap();
        let local = rx_sock
            .socket
            .local_addr()
            .unwrap()
            .as_socket_ipv4()
            .unwrap();
        let senders = Arc::new(TunnelSenders::open(local, 8, 1 << 20).unwrap());
        let mut ports = senders.ports().to_vec();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 8, "eight distinct source ports");
        assert!(!ports.contains(&local.port()));

        // 16 flows, 3 datagrams each, interleaved, through batches of 4 per socket (so some flush early).
        let datagrams: Vec<Vec<u8>> = (0..3)
            .flat_map(|round| (0..16u16).map(move |f| flow_datagram(40_000 + f, round)))
            .collect();
        let mut tx = TunnelTx::new(Arc::clone(&senders), 4);
        let s = Sending::begin();
        let to = sockaddr_in(*local.ip(), local.port());
        for d in &datagrams {
            assert_eq!(tx.push(&s, to, d), 0);
        }
        assert_eq!(tx.flush(&s), 0);

        let layout = SlotLayout {
            slot: 128,
            headroom: 0,
            max_len: 128,
            prefix: 0,
        };
        let mut rx = RecvBatch::new(64, layout, empty_sockaddr_in());
        let mut port_of: std::collections::HashMap<u16, Vec<(u8, u16)>> = Default::default();
        let mut got = 0;
        for _ in 0..200 {
            let n = rx.recv(rx_sock.as_fd(), 64).unwrap();
            for i in 0..n {
                let len = rx.received(i).len;
                let d = &rx.slab_mut()[i * 128..i * 128 + len];
                let flow = u16::from_be_bytes([d[42], d[43]]);
                let round = d[50];
                let from = from_sockaddr_in(rx.name(i)).1;
                port_of.entry(flow).or_default().push((round, from));
            }
            got += n;
            if got == datagrams.len() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, datagrams.len());
        let mut used = std::collections::HashSet::new();
        for (flow, seen) in &port_of {
            let rounds: Vec<u8> = seen.iter().map(|&(r, _)| r).collect();
            assert_eq!(rounds, [0, 1, 2], "flow {flow}: in order");
            assert!(
                seen.iter().all(|&(_, p)| p == seen[0].1),
                "flow {flow}: one port, {seen:?}"
            );
            assert!(senders.ports().contains(&seen[0].1));
            used.insert(seen[0].1);
        }
        assert!(used.len() >= 4, "16 flows over 8 ports used only {used:?}");

        // Whatever arrives at a sending socket is dropped by its filter, not queued.
        let probe = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        probe
            .send_to(b"x", (Ipv4Addr::LOCALHOST, senders.ports()[0]))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 8];
        // SAFETY: buf is a live buffer of its length; MSG_DONTWAIT makes the call return at once.
        let r = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&senders.socket(0)),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(r, -1, "a datagram was queued at a sending socket");
    }

    #[test]
    fn datagrams_dropped_at_a_full_receive_queue_are_counted() {
        // The smallest receive buffer the kernel allows: a few datagrams fill it.
        let rx = TunnelSocket::open(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 1, &one()).unwrap();
        let to = rx.socket.local_addr().unwrap().as_socket_ipv4().unwrap();
        assert_eq!(rx.drops().unwrap(), 0);
        let tx = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for _ in 0..500 {
            tx.send_to(&[0u8; 200], to).unwrap();
        }
        let mut received = 0u32;
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: buf is live for its length; MSG_DONTWAIT returns at once when the queue is empty.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&rx.socket),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            received += 1;
        }
        let dropped = rx.drops().unwrap();
        assert!(
            received > 0 && dropped > 0,
            "received {received}, dropped {dropped}"
        );
        assert_eq!(
            received + dropped,
            500,
            "every datagram was received or counted as dropped"
        );
    }
}
