//! Test servers and clients that run inside namespaces: TCP/UDP echo servers that record the source
//! address they saw, a bulk-transfer server verified by hash, and `ping`.
//!
//! Every socket has timeouts; servers poll their stop flag every 100 ms and stop when dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::netns::{Netns, NsThread};

/// How long a client keeps retrying to connect (the first packets also resolve neighbours).
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Read/write timeout of the harness's sockets.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Source addresses a server saw, shared with the test.
pub type Peers = Arc<Mutex<Vec<SocketAddr>>>;

/// A server thread inside a namespace; stops (and is joined) on drop.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    peers: Peers,
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<()>>,
}

impl Server {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Source addresses seen so far (one per TCP connection or per UDP datagram).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The source address of the most recent connection or datagram.
    pub fn last_peer(&self) -> Option<SocketAddr> {
        self.peers().last().copied()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join_timeout(Duration::from_secs(5));
        }
    }
}

/// Starts a server in `ns` bound to `addr`: `bind` makes the socket (inside the namespace), `serve`
/// runs until the stop flag is set.
fn start_server<S, B, F>(ns: &Netns, addr: SocketAddr, bind: B, serve: F) -> Result<Server>
where
    S: Send + 'static,
    B: FnOnce(SocketAddr) -> std::io::Result<S> + Send + 'static,
    F: FnOnce(S, Peers, Arc<AtomicBool>) + Send + 'static,
{
    let peers: Peers = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let (p, s) = (peers.clone(), stop.clone());
    let thread = ns.thread(move || match bind(addr) {
        Ok(sock) => {
            let _ = ready_tx.send(Ok(()));
            serve(sock, p, s);
        }
        Err(e) => {
            let _ = ready_tx.send(Err(Error::msg(format!("bind {addr}: {e}"))));
        }
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| Error::msg(format!("server on {addr} did not start")))??;
    Ok(Server {
        addr,
        peers,
        stop,
        thread: Some(thread),
    })
}

/// A UDP "who am I" server in `ns` on `addr`: answers every datagram with the datagram followed by a space
/// and the sender's address as the server sees it (after SNAT: `<egress IP>:<port>`).
pub fn udp_whoami_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    start_server(ns, addr, UdpSocket::bind, |sock, peers, stop| {
        let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                record(&peers, peer);
                let mut answer = buf[..n].to_vec();
                answer.extend_from_slice(format!(" {peer}").as_bytes());
                let _ = sock.send_to(&answer, peer);
            }
        }
    })
}

/// Waits until `fd` is readable or 100 ms pass; true if readable.
fn readable(fd: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, 100) };
    n > 0
}

fn record(peers: &Peers, addr: SocketAddr) {
    if let Ok(mut p) = peers.lock() {
        p.push(addr);
    }
}

/// A TCP echo server in `ns` on `addr`: each connection is served on its own thread, echoing until EOF or
/// [`IO_TIMEOUT`] without a byte.
pub fn tcp_echo_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    tcp_echo_server_idle(ns, addr, IO_TIMEOUT)
}

/// [`tcp_echo_server`] whose connections end after `idle` without a byte (a long session's server).
pub fn tcp_echo_server_idle(ns: &Netns, addr: SocketAddr, idle: Duration) -> Result<Server> {
    start_server(ns, addr, TcpListener::bind, move |listener, peers, stop| {
        accept_loop(&listener, &peers, &stop, idle, |mut s| {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    })
}

/// Accepts until stopped; each connection (with I/O timeouts of `timeout` set) goes to `handle` on its own
/// thread.
fn accept_loop(
    listener: &TcpListener,
    peers: &Peers,
    stop: &AtomicBool,
    timeout: Duration,
    handle: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener) {
            continue;
        }
        let Ok((s, peer)) = listener.accept() else {
            continue;
        };
        record(peers, peer);
        let _ = s.set_read_timeout(Some(timeout));
        let _ = s.set_write_timeout(Some(timeout));
        let h = handle.clone();
        std::thread::spawn(move || h(s));
    }
}

/// A UDP echo server in `ns` on `addr`: echoes every datagram to its sender.
pub fn udp_echo_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    start_server(ns, addr, UdpSocket::bind, |sock, peers, stop| {
        let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                record(&peers, peer);
                let _ = sock.send_to(&buf[..n], peer);
            }
        }
    })
}

/// Connects to `addr` from the calling thread's namespace, retrying until [`CONNECT_DEADLINE`].
pub fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                return Ok(s);
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::msg(format!(
                    "connect to {addr}: {e} (retried for {CONNECT_DEADLINE:?})"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// From `ns`: sends `payload` over TCP to an echo server at `addr` and returns what came back.
pub fn tcp_echo(ns: &Netns, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let payload = payload.to_vec();
    ns.run(CONNECT_DEADLINE + IO_TIMEOUT, move || -> Result<Vec<u8>> {
        let mut s = connect(addr)?;
        s.write_all(&payload).context("send")?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).context("receive echo")?;
        Ok(back)
    })?
    .with_context(|| format!("TCP echo to {addr}"))
}

/// From `ns`: sends `payload` over UDP to an echo server at `addr` (resending every 200 ms until an
/// answer arrives or `CONNECT_DEADLINE` passes) and returns the answer.
pub fn udp_echo(ns: &Netns, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let payload = payload.to_vec();
    ns.run(CONNECT_DEADLINE + IO_TIMEOUT, move || -> Result<Vec<u8>> {
        let any: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let deadline = Instant::now() + CONNECT_DEADLINE;
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            sock.send_to(&payload, addr)?;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == addr => return Ok(buf[..n].to_vec()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::msg(format!(
            "no UDP echo from {addr} within {CONNECT_DEADLINE:?}"
        )))
    })?
    .with_context(|| format!("UDP echo to {addr}"))
}

/// From `ns`: one TCP connection attempt to `addr` (no retry), at most `timeout`: the local address or the
/// socket error (`ConnectionRefused` after a reset, `HostUnreachable`, `TimedOut`…), and how long it took.
pub fn connect_once(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(std::io::Result<SocketAddr>, Duration)> {
    ns.run(timeout + Duration::from_secs(5), move || {
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&addr, timeout).and_then(|s| s.local_addr());
        (r, start.elapsed())
    })
}

/// From `ns`: one UDP datagram to `addr` on a connected socket with `IP_RECVERR` (so that every ICMP error
/// is reported, host and network unreachable too, which a plain UDP socket ignores) and one wait (at most
/// `timeout`) for the answer: the answer or the socket error (`ConnectionRefused`, `HostUnreachable`…), and
/// how long it took.
pub fn udp_once(
    ns: &Netns,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<(std::io::Result<Vec<u8>>, Duration)> {
    let payload = payload.to_vec();
    ns.run(timeout + Duration::from_secs(5), move || {
        let start = Instant::now();
        let r = (|| {
            let any: SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(any)?;
            let (level, name) = if addr.is_ipv4() {
                (libc::IPPROTO_IP, libc::IP_RECVERR)
            } else {
                (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
            };
            let on: libc::c_int = 1;
            // SAFETY: setsockopt reads one c_int from a live stack variable for the given length; the
            // descriptor is open for the call.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    level,
                    name,
                    std::ptr::from_ref(&on).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            sock.connect(addr)?;
            sock.set_read_timeout(Some(timeout))?;
            sock.send(&payload)?;
            let mut buf = [0u8; 65536];
            let n = sock.recv(&mut buf)?;
            Ok(buf[..n].to_vec())
        })();
        (r, start.elapsed())
    })
}

/// `ping -c <count>` from `ns` to `dst` (0.2 s apart, 10 s deadline); succeeds if any reply came back.
pub fn ping(ns: &Netns, dst: std::net::IpAddr, count: u32) -> Result<String> {
    ns.exec(&format!("ping -n -q -c {count} -i 0.2 -w 10 {dst}"))
}

/// From the calling thread's namespace: sends `payload`-byte datagrams to `target` with `sendmmsg`
/// (batches of 64, one socket, one flow) as fast as the kernel takes them, until `deadline`; returns how
/// many the kernel accepted. Full queues (ENOBUFS) and ICMP errors reported on the socket are skipped.
/// Run it on a namespace thread: `ns.thread(move || udp_flood(target, 64, deadline))`.
pub fn udp_flood(target: SocketAddr, payload: usize, deadline: Instant) -> Result<u64> {
    const BATCH: usize = 64;
    const BATCH_U32: libc::c_uint = 64;
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any)?;
    sock.connect(target)?;
    let mut payload = vec![0u8; payload];
    let mut iov = [libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    }];
    // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) value that is filled in below.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for m in &mut msgs {
        m.msg_hdr.msg_iov = iov.as_mut_ptr();
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    let mut iterations = 0u32;
    loop {
        iterations = iterations.wrapping_add(1);
        if iterations.is_multiple_of(64) && Instant::now() >= deadline {
            return Ok(sent);
        }
        // SAFETY: `msgs` holds BATCH initialised headers whose single iovec points at `payload`, all of
        // which outlive the call; the socket is open.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH_U32, 0) };
        if n > 0 {
            sent += u64::from(n.unsigned_abs());
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED | libc::EHOSTUNREACH) => {}
            _ => return Err(e.into()),
        }
    }
}

/// Waits (polling `ss` every 20 ms) until something in `ns` listens on TCP `port`: for external servers
/// such as `iperf3 -s`, which must not be probed by connecting.
pub fn wait_tcp_listening(ns: &Netns, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let filter = format!("sport = :{port}");
    loop {
        let out = ns.exec_args(&["ss", "-H", "-l", "-t", "-n", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            crate::bail!(
                "nothing listens on TCP port {port} in {} after {timeout:?}",
                ns.name()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// UDP counters of a namespace (from `/proc/net/snmp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams delivered to sockets.
    pub in_datagrams: u64,
    /// Datagrams dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    /// Datagrams sent.
    pub out_datagrams: u64,
}

impl UdpCounters {
    /// Reads the counters of `ns`.
    pub fn read(ns: &Netns) -> Result<Self> {
        let text = ns.exec("cat /proc/net/snmp")?;
        Self::parse(&text)
            .ok_or_else(|| Error::msg(format!("no Udp: lines in /proc/net/snmp of {}", ns.name())))
    }

    /// Parses `/proc/net/snmp`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
        let names: Vec<&str> = lines.next()?.split_whitespace().collect();
        let values: Vec<&str> = lines.next()?.split_whitespace().collect();
        let get = |name: &str| -> Option<u64> {
            let i = names.iter().position(|n| *n == name)?;
            values.get(i)?.parse().ok()
        };
        Some(Self {
            in_datagrams: get("InDatagrams")?,
            rcvbuf_errors: get("RcvbufErrors")?,
            out_datagrams: get("OutDatagrams")?,
        })
    }

    /// Datagrams that reached the UDP layer (delivered or dropped for a full buffer) since `before`.
    pub fn received_since(&self, before: &Self) -> u64 {
        (self.in_datagrams + self.rcvbuf_errors)
            .saturating_sub(before.in_datagrams + before.rcvbuf_errors)
    }

    /// Datagrams sent since `before`.
    pub fn sent_since(&self, before: &Self) -> u64 {
        self.out_datagrams.saturating_sub(before.out_datagrams)
    }
}

/// 64-bit FNV-1a, fed in pieces; the hash of a stream does not depend on how it was cut.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash so far.
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// A deterministic pseudo-random byte stream (xorshift64*) for bulk transfers.
#[derive(Debug, Clone)]
pub struct Pattern(u64);

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Fills `buf` with the next bytes (`buf.len()` a multiple of 8 keeps the stream cut-independent).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// The FNV-1a hash of the first `len` bytes of the stream for `seed`.
    pub fn hash_of(seed: u64, len: u64) -> u64 {
        let mut p = Self::new(seed);
        let mut h = Fnv64::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(64 * 1024)).unwrap_or(64 * 1024);
            p.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            left -= n as u64;
        }
        h.finish()
    }
}

const BULK_UPLOAD: u8 = 1;
const BULK_DOWNLOAD: u8 = 2;

/// A bulk-transfer server in `ns` on `addr`. Protocol: the client sends a 17-byte header (mode, length,
/// seed). Upload: the server reads `length` bytes, answers with their 8-byte hash. Download: the server
/// sends `length` bytes of the pattern for `seed` and closes.
pub fn bulk_server(ns: &Netns, addr: SocketAddr) -> Result<Server> {
    start_server(ns, addr, TcpListener::bind, |listener, peers, stop| {
        accept_loop(&listener, &peers, &stop, IO_TIMEOUT, |s| {
            let _ = serve_bulk(s);
        });
    })
}

fn serve_bulk(mut s: TcpStream) -> std::io::Result<()> {
    let mut head = [0u8; 17];
    s.read_exact(&mut head)?;
    let len = u64::from_be_bytes(head[1..9].try_into().unwrap_or_default());
    let seed = u64::from_be_bytes(head[9..17].try_into().unwrap_or_default());
    let mut buf = vec![0u8; 256 * 1024];
    match head[0] {
        BULK_UPLOAD => {
            let mut h = Fnv64::default();
            let mut left = len;
            while left > 0 {
                let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                let n = s.read(&mut buf[..want])?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                left -= n as u64;
            }
            s.write_all(&h.finish().to_be_bytes())
        }
        BULK_DOWNLOAD => {
            let mut p = Pattern::new(seed);
            let mut left = len;
            while left > 0 {
                let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
                p.fill(&mut buf[..n]);
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(std::net::Shutdown::Write)
        }
        _ => Err(std::io::Error::new(ErrorKind::InvalidData, "bad mode")),
    }
}

/// Outcome of a bulk transfer.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bytes moved.
    pub bytes: u64,
    /// Time from connect to verified end.
    pub elapsed: Duration,
}

impl Transfer {
    /// Throughput in Gbit/s.
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// From `ns`: uploads `len` bytes (pattern `seed`) to a [`bulk_server`] at `addr` and checks the hash
/// the server computed. `timeout` bounds the whole transfer.
pub fn bulk_upload(
    ns: &Netns,
    addr: SocketAddr,
    len: u64,
    seed: u64,
    timeout: Duration,
) -> Result<Transfer> {
    ns.run(timeout, move || -> Result<Transfer> {
        let start = Instant::now();
        let mut s = connect(addr)?;
        let mut head = [0u8; 17];
        head[0] = BULK_UPLOAD;
        head[1..9].copy_from_slice(&len.to_be_bytes());
        head[9..17].copy_from_slice(&seed.to_be_bytes());
        s.write_all(&head)?;
        let mut p = Pattern::new(seed);
        let mut h = Fnv64::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            p.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            s.write_all(&buf[..n])
                .with_context(|| format!("send at byte {}", len - left))?;
            left -= n as u64;
        }
        let mut answer = [0u8; 8];
        s.read_exact(&mut answer)
            .context("read the server's hash")?;
        let theirs = u64::from_be_bytes(answer);
        if theirs != h.finish() {
            crate::bail!(
                "upload of {len} bytes: server hash {theirs:016x} != sent {:016x}",
                h.finish()
            );
        }
        Ok(Transfer {
            bytes: len,
            elapsed: start.elapsed(),
        })
    })?
    .with_context(|| format!("bulk upload to {addr}"))
}

/// From `ns`: downloads `len` bytes (pattern `seed`) from a [`bulk_server`] at `addr` and checks them.
pub fn bulk_download(
    ns: &Netns,
    addr: SocketAddr,
    len: u64,
    seed: u64,
    timeout: Duration,
) -> Result<Transfer> {
    ns.run(timeout, move || -> Result<Transfer> {
        let start = Instant::now();
        let mut s = connect(addr)?;
        let mut head = [0u8; 17];
        head[0] = BULK_DOWNLOAD;
        head[1..9].copy_from_slice(&len.to_be_bytes());
        head[9..17].copy_from_slice(&seed.to_be_bytes());
        s.write_all(&head)?;
        let mut h = Fnv64::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = s
                .read(&mut buf)
                .with_context(|| format!("receive at byte {got}"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            got += n as u64;
        }
        if got != len {
            crate::bail!("download: got {got} bytes, expected {len}");
        }
        let expected = Pattern::hash_of(seed, len);
        if h.finish() != expected {
            crate::bail!(
                "download of {len} bytes: hash {:016x} != expected {expected:016x}",
                h.finish()
            );
        }
        Ok(Transfer {
            bytes: len,
            elapsed: start.elapsed(),
        })
    })?
    .with_context(|| format!("bulk download from {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_udp_counters() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 10 2 3 7 3 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let c = UdpCounters::parse(text).unwrap();
        assert_eq!(
            c,
            UdpCounters {
                in_datagrams: 10,
                rcvbuf_errors: 3,
                out_datagrams: 7
            }
        );
    }

    #[test]
    fn pattern_hash_is_cut_independent() {
        let mut p = Pattern::new(7);
        let mut h = Fnv64::default();
        let mut buf = vec![0u8; 1000 * 8];
        p.fill(&mut buf);
        h.update(&buf[..3]);
        h.update(&buf[3..]);
        assert_eq!(h.finish(), Pattern::hash_of(7, 8000));
    }
}
