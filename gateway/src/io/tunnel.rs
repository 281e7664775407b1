//! The tunnel socket: UDP on the gateway's pod address, port 4790 by default. Every worker opens its own
//! socket on the same address with `SO_REUSEPORT`; the kernel spreads the nodes' datagrams over them by
//! their 4-tuple (a node's vxlan device picks the outer source port from a hash of the inner flow, so one
//! flow stays on one worker).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// One worker's tunnel socket.
#[derive(Debug)]
pub(crate) struct TunnelSocket {
    socket: Socket,
}

impl TunnelSocket {
    /// Binds `listen` with `SO_REUSEPORT` and large buffers.
    pub(crate) fn open(listen: SocketAddrV4, buffer: usize) -> io::Result<TunnelSocket> {
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
        Ok(TunnelSocket { socket })
    }
}

/// Asks for `bytes` of socket buffer, beyond `net.core.{r,w}mem_max` when we may (CAP_NET_ADMIN).
fn set_buffers(socket: &Socket, bytes: usize) {
    use std::os::fd::AsRawFd;
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
    /// Sends `parts` to `to` as one UDP GSO send (`UDP_SEGMENT`): the kernel cuts the concatenation into
    /// datagrams of `segment` bytes (the last may be shorter). Every part but the last must be exactly
    /// `segment` bytes, at most 64 parts and 65,000 bytes in all.
    pub(crate) fn send_segments(
        &self,
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
        let r = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &raw const msg, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
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
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        let a = sockaddr_in(Ipv4Addr::new(172, 18, 0, 11), 4790);
        assert_eq!(from_sockaddr_in(&a), (Ipv4Addr::new(172, 18, 0, 11), 4790));
    }

    #[test]
    fn two_workers_share_a_port_and_exchange_a_batch() {
        use super::super::mmsg::{RecvBatch, SendBatch, Sending, SlotLayout};
        let a = TunnelSocket::open(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 1 << 20).unwrap();
        let local = a.socket.local_addr().unwrap().as_socket_ipv4().unwrap();
        let b = TunnelSocket::open(local, 1 << 20).unwrap();
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
        a.send_segments(&to, &[b"abcd", b"efgh", b"ij"], 4).unwrap();
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
    }
}
