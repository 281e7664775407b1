//! Raw packets for the end-to-end scenarios: VXLAN datagrams crafted byte for byte as a node's `vxlan`
//! device (or an intruder) sends them, packet capture on an interface inside a namespace, and ICMP errors
//! read from a socket's error queue (`IP_RECVERR`), as `traceroute` and PMTU discovery see them.
//!
//! * [`vxlan_udp`] builds a VXLAN datagram around an inner Ethernet/IPv4/UDP frame (etherparse computes
//!   the checksums); [`send_udp`] sends any payload from a chosen source address inside a namespace.
//! * [`Capture`] records the frames of one interface (`AF_PACKET`) on a thread inside the namespace,
//!   keeping those a filter accepts, each parsed into a [`Frame`] summary.
//! * [`FrameSender`] sends whole Ethernet frames, as written, on one interface (an intruder's ARP/NDP).
//! * [`ErrorQueueSocket`] is a UDP socket with `IP_RECVERR`/`IPV6_RECVERR` on, a chosen TTL and DF
//!   setting; [`ErrorQueueSocket::recv_error`] returns the next [`IcmpReport`] the kernel queued.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::netns::{Netns, NsThread};

/// IP protocol numbers used here.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::msg(format!("bad MAC {mac}")))?;
    bytes
        .try_into()
        .map_err(|_| Error::msg(format!("bad MAC {mac}")))
}

/// An inner IPv4/UDP packet for [`vxlan_udp`].
#[derive(Debug, Clone)]
pub struct InnerUdp {
    /// Inner Ethernet source (the node's `vxlan` device MAC).
    pub src_mac: [u8; 6],
    /// Inner Ethernet destination (the gateway's tunnel MAC).
    pub dst_mac: [u8; 6],
    /// Inner source (a pod, or a spoofed address).
    pub src: SocketAddr,
    /// Inner destination.
    pub dst: SocketAddr,
    /// IPv4 TTL.
    pub ttl: u8,
    /// UDP payload.
    pub payload: Vec<u8>,
}

/// A VXLAN datagram (RFC 7348: flags `I`, the 24-bit `vni`) carrying `inner` as an Ethernet frame, as a
/// node's `vxlan` device puts it into its UDP socket's payload.
pub fn vxlan_udp(vni: u32, inner: &InnerUdp) -> Result<Vec<u8>> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (inner.src, inner.dst) else {
        crate::bail!("vxlan_udp builds IPv4 inner packets only");
    };
    let builder = etherparse::PacketBuilder::ethernet2(inner.src_mac, inner.dst_mac)
        .ipv4(src.ip().octets(), dst.ip().octets(), inner.ttl)
        .udp(src.port(), dst.port());
    let v = vni.to_be_bytes();
    let mut out = vec![0x08, 0, 0, 0, v[1], v[2], v[3], 0];
    builder
        .write(&mut out, &inner.payload)
        .map_err(|e| Error::msg(format!("build inner frame: {e}")))?;
    Ok(out)
}

/// From `ns`: sends each of `payloads` as one UDP datagram from `from` (an address of `ns`; port 0 = any)
/// to `to`.
pub fn send_udp(ns: &Netns, from: SocketAddr, to: SocketAddr, payloads: &[Vec<u8>]) -> Result<()> {
    let payloads = payloads.to_vec();
    ns.run(Duration::from_secs(10), move || -> Result<()> {
        let sock = UdpSocket::bind(from).with_context(|| format!("bind {from}"))?;
        for p in &payloads {
            sock.send_to(p, to)
                .with_context(|| format!("send {} bytes from {from} to {to}", p.len()))?;
        }
        Ok(())
    })?
    .with_context(|| format!("UDP from {} to {to}", ns.name()))
}

/// The transport part of a captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    /// UDP ports.
    Udp {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// TCP ports, flags and the MSS option.
    Tcp {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
        /// The flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
        flags: u8,
        /// The MSS option, if present.
        mss: Option<u16>,
    },
    /// ICMP or ICMPv6 type and code, and the 4 bytes after the checksum (id/seq, or the MTU of a
    /// fragmentation-needed message in the low 16 bits).
    Icmp {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// Bytes 4..8 of the message.
        rest: u32,
    },
    /// Anything else, or a non-first fragment.
    Other,
}

/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// An IP packet's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpInfo {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// Protocol / next header.
    pub proto: u8,
    /// Don't-fragment bit (IPv4).
    pub df: bool,
    /// Total length of the IP packet as its header says.
    pub total_len: usize,
    /// The transport part.
    pub l4: L4,
}

/// A captured frame: its Ethernet header, its IP summary if it is IP, whether the interface sent it
/// (rather than received it), and its length on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination.
    pub dst_mac: [u8; 6],
    /// EtherType.
    pub ethertype: u16,
    /// The IP packet, if the frame carries IPv4 or IPv6.
    pub ip: Option<IpInfo>,
    /// Sent by the capturing interface (`PACKET_OUTGOING`), not received.
    pub outgoing: bool,
    /// Frame length.
    pub len: usize,
    /// For VXLAN (UDP to or from port 4790): the inner Ethernet frame, parsed the same way.
    pub inner: Option<Box<Frame>>,
}

impl Frame {
    /// Parses an Ethernet frame (no VLAN tags; IPv6 without extension headers is enough here).
    pub fn parse(data: &[u8], outgoing: bool) -> Option<Self> {
        let mac = |b: &[u8]| -> Option<[u8; 6]> { b.try_into().ok() };
        let dst_mac = mac(data.get(0..6)?)?;
        let src_mac = mac(data.get(6..12)?)?;
        let ethertype = u16::from_be_bytes([*data.get(12)?, *data.get(13)?]);
        let ip = match ethertype {
            ETHERTYPE_IPV4 => parse_ipv4(data.get(14..)?),
            ETHERTYPE_IPV6 => parse_ipv6(data.get(14..)?),
            _ => None,
        };
        Some(Self {
            src_mac,
            dst_mac,
            ethertype,
            ip,
            outgoing,
            len: data.len(),
            inner: vxlan_inner(data).and_then(|d| Frame::parse(d, outgoing).map(Box::new)),
        })
    }

    /// The IP source, if IP.
    pub fn src(&self) -> Option<IpAddr> {
        self.ip.as_ref().map(|i| i.src)
    }

    /// The IP destination, if IP.
    pub fn dst(&self) -> Option<IpAddr> {
        self.ip.as_ref().map(|i| i.dst)
    }
}

/// The inner Ethernet frame of an IPv4 frame carrying VXLAN on port 4790 (no fragments).
fn vxlan_inner(data: &[u8]) -> Option<&[u8]> {
    use crate::topology::VXLAN_PORT as VXLAN;
    if be16(data, 12)? != ETHERTYPE_IPV4 || *data.get(23)? != proto::UDP {
        return None;
    }
    let udp = 14 + usize::from(data.get(14)? & 0x0f) * 4;
    let (sport, dport) = (be16(data, udp)?, be16(data, udp + 2)?);
    (sport == VXLAN || dport == VXLAN).then_some(())?;
    data.get(udp + 8 + 8..)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn parse_ipv4(b: &[u8]) -> Option<IpInfo> {
    let ihl = usize::from(b.first()? & 0x0f) * 4;
    let total_len = usize::from(be16(b, 2)?);
    let frag = be16(b, 6)?;
    let df = frag & 0x4000 != 0;
    let first = frag & 0x1fff == 0;
    let ttl = *b.get(8)?;
    let proto = *b.get(9)?;
    let src = Ipv4Addr::new(*b.get(12)?, *b.get(13)?, *b.get(14)?, *b.get(15)?);
    let dst = Ipv4Addr::new(*b.get(16)?, *b.get(17)?, *b.get(18)?, *b.get(19)?);
    let l4 = if first {
        parse_l4(proto, b.get(ihl..)?)
    } else {
        L4::Other
    };
    Some(IpInfo {
        src: src.into(),
        dst: dst.into(),
        ttl,
        proto,
        df,
        total_len,
        l4,
    })
}

fn parse_ipv6(b: &[u8]) -> Option<IpInfo> {
    let payload_len = usize::from(be16(b, 4)?);
    let proto = *b.get(6)?;
    let ttl = *b.get(7)?;
    let addr = |at: usize| -> Option<Ipv6Addr> {
        let a: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
        Some(a.into())
    };
    Some(IpInfo {
        src: addr(8)?.into(),
        dst: addr(24)?.into(),
        ttl,
        proto,
        df: true,
        total_len: payload_len + 40,
        l4: parse_l4(proto, b.get(40..)?),
    })
}

fn parse_l4(proto: u8, b: &[u8]) -> L4 {
    let parsed = match proto {
        proto::UDP => (|| {
            Some(L4::Udp {
                src: be16(b, 0)?,
                dst: be16(b, 2)?,
            })
        })(),
        proto::TCP => (|| {
            let data_off = usize::from(b.get(12)? >> 4) * 4;
            Some(L4::Tcp {
                src: be16(b, 0)?,
                dst: be16(b, 2)?,
                flags: *b.get(13)?,
                mss: b.get(20..data_off).and_then(tcp_mss),
            })
        })(),
        proto::ICMP | proto::ICMPV6 => (|| {
            Some(L4::Icmp {
                ty: *b.first()?,
                code: *b.get(1)?,
                rest: u32::from_be_bytes(b.get(4..8)?.try_into().ok()?),
            })
        })(),
        _ => None,
    };
    parsed.unwrap_or(L4::Other)
}

/// The MSS option (kind 2) among TCP options.
fn tcp_mss(opts: &[u8]) -> Option<u16> {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*opts.get(i + 1)?);
                if len < 2 {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return be16(opts, i + 2);
                }
                i += len;
            }
        }
    }
    None
}

type Filter = Box<dyn Fn(&Frame) -> bool + Send>;

/// Frames of one interface, recorded on a thread inside its namespace until dropped or stopped.
#[derive(Debug)]
pub struct Capture {
    frames: Arc<Mutex<Vec<Frame>>>,
    stop: Arc<AtomicBool>,
    thread: Option<NsThread<Result<()>>>,
    what: String,
}

/// At most this many frames are kept per capture (the rest are counted as seen but not stored).
const CAPTURE_LIMIT: usize = 100_000;

impl Capture {
    /// Starts capturing on `iface` in `ns`, keeping the frames `filter` accepts. Returns once the socket
    /// is bound: every frame after that is seen.
    pub fn start(
        ns: &Netns,
        iface: &str,
        filter: impl Fn(&Frame) -> bool + Send + 'static,
    ) -> Result<Self> {
        let frames: Arc<Mutex<Vec<Frame>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (f, s, dev) = (frames.clone(), stop.clone(), iface.to_owned());
        let filter: Filter = Box::new(filter);
        let thread = ns.thread(move || -> Result<()> {
            let sock = match PacketSocket::open(&dev) {
                Ok(sock) => {
                    let _ = ready_tx.send(Ok(()));
                    sock
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; 65536 + 64];
            let mut stopped_at: Option<Instant> = None;
            loop {
                // Once stopped, take what is still queued in the socket (for at most a second), then end.
                if stopped_at.is_none() && s.load(Ordering::Relaxed) {
                    stopped_at = Some(Instant::now());
                }
                let stopping = stopped_at.is_some();
                if stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
                    break;
                }
                let Some((len, outgoing)) = sock.recv(&mut buf, if stopping { 0 } else { 100 })?
                else {
                    if stopping {
                        break;
                    }
                    continue;
                };
                let Some(frame) = Frame::parse(&buf[..len], outgoing) else {
                    continue;
                };
                if filter(&frame) {
                    if let Ok(mut v) = f.lock() {
                        if v.len() < CAPTURE_LIMIT {
                            v.push(frame);
                        }
                    }
                }
            }
            Ok(())
        })?;
        let what = format!("capture on {iface} in {}", ns.name());
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| Error::msg(format!("{what} did not start")))??;
        Ok(Self {
            frames,
            stop,
            thread: Some(thread),
            what,
        })
    }

    /// The frames kept so far.
    pub fn frames(&self) -> Vec<Frame> {
        self.frames.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits (polling every 10 ms) until a kept frame satisfies `pred`; returns it, or `None` after
    /// `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self
                .frames
                .lock()
                .ok()
                .and_then(|v| v.iter().find(|f| pred(f)).cloned())
            {
                return Some(f);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the capture (after taking the frames still queued in its socket) and returns every kept
    /// frame. Fails if the capture thread failed.
    pub fn stop(mut self) -> Result<Vec<Frame>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join_timeout(Duration::from_secs(5))
                .with_context(|| self.what.clone())??;
        }
        Ok(self.frames())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join_timeout(Duration::from_secs(5));
        }
    }
}

/// An `AF_PACKET` socket bound to one interface (every protocol).
#[derive(Debug)]
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(dev: &str) -> Result<Self> {
        let name = std::ffi::CString::new(dev).map_err(|_| Error::msg("bad interface name"))?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            crate::bail!("no interface {dev}: {}", std::io::Error::last_os_error());
        }
        // Protocol 0: nothing is queued until bind names the protocol and the interface, so no frame of
        // another interface slips in.
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(Error::msg(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid and the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        sll.sll_protocol = u16::try_from(libc::ETH_P_ALL).unwrap_or(3).to_be();
        sll.sll_ifindex = i32::try_from(index).unwrap_or(0);
        // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                socklen_of::<libc::sockaddr_ll>(),
            )
        };
        if rc != 0 {
            crate::bail!(
                "bind AF_PACKET to {dev}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { fd })
    }

    /// One frame, or `None` after `wait_ms` without one: (length, sent by this interface).
    fn recv(&self, buf: &mut [u8], wait_ms: i32) -> Result<Option<(usize, bool)>> {
        if !poll_fd(self.fd.as_raw_fd(), libc::POLLIN, wait_ms) {
            return Ok(None);
        }
        // SAFETY: as in `open`.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = socklen_of::<libc::sockaddr_ll>();
        // SAFETY: `buf` and `from` are valid for writes of the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::from_mut(&mut from).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(None),
                _ => Err(e.into()),
            };
        }
        let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
        Ok(Some((usize::try_from(n).unwrap_or(0), outgoing)))
    }
}

/// Sends whole Ethernet frames, exactly as given, on one interface (`AF_PACKET`, `SOCK_RAW`). Open it on a
/// thread inside the interface's namespace.
#[derive(Debug)]
pub struct FrameSender {
    sock: PacketSocket,
}

impl FrameSender {
    /// A sender on `dev` of the calling thread's namespace.
    pub fn open(dev: &str) -> Result<Self> {
        Ok(Self {
            sock: PacketSocket::open(dev)?,
        })
    }

    /// Sends one frame (Ethernet header included).
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: `frame` is valid for reads of its length; the socket is bound to the interface.
        let n = unsafe {
            libc::send(
                self.sock.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(Error::msg(format!(
                "send a raw frame: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}

/// poll(2) on one descriptor for `events`; true if any of them (or an error condition) is ready.
fn poll_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack, count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0
}

/// An ICMP error the kernel queued on a socket with `IP_RECVERR` (`struct sock_extended_err`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpReport {
    /// The errno it stands for (`EHOSTUNREACH` for time exceeded, `EMSGSIZE` for too big, …).
    pub errno: u32,
    /// `SO_EE_ORIGIN_*`: 2 = ICMP, 3 = ICMPv6, 1 = local.
    pub origin: u8,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// Extra information: the MTU for fragmentation-needed / packet-too-big.
    pub info: u32,
    /// Who sent the error.
    pub offender: Option<IpAddr>,
}

/// A UDP socket with the kernel's error queue on (`IP_RECVERR`/`IPV6_RECVERR`): ICMP errors about what it
/// sent can be read with [`recv_error`](Self::recv_error). Create it on a namespace thread.
#[derive(Debug)]
pub struct ErrorQueueSocket {
    /// The socket (send and receive with it as usual).
    pub sock: UdpSocket,
    v6: bool,
}

impl ErrorQueueSocket {
    /// Binds `addr` (in the calling thread's namespace) and turns the error queue on.
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let sock = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
        let v6 = addr.is_ipv6();
        let (level, opt) = if v6 {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        } else {
            (libc::IPPROTO_IP, libc::IP_RECVERR)
        };
        setsockopt_int(sock.as_raw_fd(), level, opt, 1).context("IP_RECVERR")?;
        Ok(Self { sock, v6 })
    }

    /// Sets the DF policy: `true` = `IP_PMTUDISC_DO` (DF set, never fragment locally), `false` =
    /// `IP_PMTUDISC_DONT` (DF clear).
    pub fn set_dont_fragment(&self, df: bool) -> Result<()> {
        let value = if df {
            libc::IP_PMTUDISC_DO
        } else {
            libc::IP_PMTUDISC_DONT
        };
        let (level, opt) = if self.v6 {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
        } else {
            (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
        };
        setsockopt_int(self.sock.as_raw_fd(), level, opt, value).context("IP_MTU_DISCOVER")
    }

    /// Sets the TTL (IPv4) or unicast hop limit (IPv6) of what it sends.
    pub fn set_ttl(&self, ttl: u8) -> Result<()> {
        if self.v6 {
            setsockopt_int(
                self.sock.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_UNICAST_HOPS,
                i32::from(ttl),
            )
            .context("IPV6_UNICAST_HOPS")
        } else {
            self.sock.set_ttl(u32::from(ttl)).context("IP_TTL")
        }
    }

    /// The next queued ICMP error, waiting at most `timeout`; `None` if none came.
    pub fn recv_error(&self, timeout: Duration) -> Result<Option<IcmpReport>> {
        let deadline = Instant::now() + timeout;
        let fd = self.sock.as_raw_fd();
        loop {
            if let Some(r) = read_error_queue(fd)? {
                return Ok(Some(r));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // An error queue entry shows as POLLERR, which poll reports whatever the events asked for.
            let ms = i32::try_from(left.as_millis().min(100)).unwrap_or(100);
            poll_fd(fd, 0, ms.max(1));
        }
    }
}

/// Sets the integer socket option `opt` at `level` on `fd`.
pub fn setsockopt_int(fd: RawFd, level: i32, opt: i32, value: i32) -> Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call; the length matches.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            std::ptr::from_ref(&value).cast(),
            socklen_of::<i32>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// One `recvmsg(MSG_ERRQUEUE)`: the extended error in its control message, if any is queued.
fn read_error_queue(fd: RawFd) -> Result<Option<IcmpReport>> {
    let mut data = [0u8; 2048];
    let mut control = [0u64; 64]; // 512 bytes, aligned for cmsghdr
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid and the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at `iov`/`data` and `control`, all valid for writes of the lengths given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => Ok(None),
            _ => Err(e.into()),
        };
    }
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* helpers walk within msg_control/msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg from CMSG_FIRSTHDR/NXTHDR points into `control`.
        let hdr = unsafe { &*cmsg };
        let ip = hdr.cmsg_level == libc::IPPROTO_IP && hdr.cmsg_type == libc::IP_RECVERR;
        let ip6 = hdr.cmsg_level == libc::IPPROTO_IPV6 && hdr.cmsg_type == libc::IPV6_RECVERR;
        if ip || ip6 {
            // SAFETY: for IP_RECVERR/IPV6_RECVERR the data is a sock_extended_err followed by the
            // offender's sockaddr (the kernel guarantees the length); read_unaligned copes with alignment.
            let (ee, offender) = unsafe {
                let p = libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>();
                let ee = std::ptr::read_unaligned(p);
                let off = libc::SO_EE_OFFENDER(p).cast_const();
                (ee, read_sockaddr(off))
            };
            return Ok(Some(IcmpReport {
                errno: ee.ee_errno,
                origin: ee.ee_origin,
                icmp_type: ee.ee_type,
                icmp_code: ee.ee_code,
                info: ee.ee_info,
                offender,
            }));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(None)
}

/// Reads a sockaddr_in / sockaddr_in6 (family `AF_UNSPEC` = none).
///
/// # Safety
/// `p` must point at a readable sockaddr_in6-sized buffer.
unsafe fn read_sockaddr(p: *const libc::sockaddr) -> Option<IpAddr> {
    // SAFETY: the caller guarantees `p` is readable; unaligned reads copy the structures out.
    unsafe {
        let family = i32::from(std::ptr::read_unaligned(p).sa_family);
        match family {
            libc::AF_INET => {
                let sin = std::ptr::read_unaligned(p.cast::<libc::sockaddr_in>());
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => {
                let sin6 = std::ptr::read_unaligned(p.cast::<libc::sockaddr_in6>());
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_datagram_layout_and_parse() {
        let inner = InnerUdp {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [0xa2, 0x2a, 172, 18, 0, 3],
            src: "10.244.1.1:5000".parse().unwrap(),
            dst: "198.51.100.10:7000".parse().unwrap(),
            ttl: 64,
            payload: b"hi".to_vec(),
        };
        let d = vxlan_udp(4097, &inner).unwrap();
        assert_eq!(&d[..8], &[0x08, 0, 0, 0, 0, 0x10, 0x01, 0]);
        let f = Frame::parse(&d[8..], false).unwrap();
        assert_eq!(f.dst_mac, inner.dst_mac);
        let ip = f.ip.unwrap();
        assert_eq!(ip.src, IpAddr::V4(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(ip.ttl, 64);
        assert_eq!(ip.total_len, 20 + 8 + 2);
        assert_eq!(
            ip.l4,
            L4::Udp {
                src: 5000,
                dst: 7000
            }
        );
    }

    #[test]
    fn tcp_mss_option() {
        assert_eq!(tcp_mss(&[2, 4, 0x05, 0x82, 1, 1, 4, 2]), Some(1410));
        assert_eq!(tcp_mss(&[1, 1, 4, 2, 2, 4, 0x05, 0xb4]), Some(1460));
        assert_eq!(tcp_mss(&[4, 2, 0]), None);
        assert_eq!(tcp_mss(&[8, 0]), None);
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("a2:2a:ac:12:00:03").unwrap(),
            [0xa2, 0x2a, 0xac, 0x12, 0, 3]
        );
        assert!(parse_mac("a2:2a").is_err());
    }
}
