//! The prober's receiving socket on an uplink: `AF_PACKET`, `SOCK_RAW`, outside the workers' fanout group,
//! so that it gets its own copy of each frame the filter keeps (`filter.rs`) while the workers get theirs
//! as before. `PACKET_IGNORE_OUTGOING` as on the workers' sockets: the gateway's own frames are not looped
//! back. Non-blocking; the prober polls it.
//!
//! Sending needs nothing new: probes leave through an `io::packet::TxSocket` of the prober's own.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockFilter, Socket, Type};

use super::filter::Instruction;

const ETH_P_ALL: u16 = 0x0003;
/// `PACKET_IGNORE_OUTGOING` (linux/if_packet.h), as `io::packet` uses it.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// A filtered copy of an uplink's incoming frames.
#[derive(Debug)]
pub(crate) struct Tap {
    socket: Socket,
}

impl Tap {
    /// Opens a socket on interface `ifindex` that receives only what `program` accepts.
    pub(crate) fn open(ifindex: i32, program: &[Instruction]) -> io::Result<Tap> {
        // Protocol 0 until the bind: nothing is queued before the filter is in place.
        let socket =
            Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(0))).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("AF_PACKET socket for the probes: {e} (the gateway needs CAP_NET_RAW)"),
                )
            })?;
        let filter: Vec<SockFilter> = program
            .iter()
            .map(|&(code, jt, jf, k)| SockFilter::new(code, jt, jf, k))
            .collect();
        socket.attach_filter(&filter)?;
        crate::io::packet::set_int(socket.as_fd(), libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
        let addr = crate::io::packet::link_addr(ifindex, ETH_P_ALL);
        // SAFETY: `addr` is a live sockaddr_ll and its size is passed; the descriptor is the socket's own.
        let r = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        socket.set_nonblocking(true)?;
        Ok(Tap { socket })
    }

    /// The next frame into `buf` (cut to its length): its length, or `None` when nothing is queued.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.socket).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}
