//! AF_PACKET sockets on an uplink: the gateway sends and receives whole Ethernet frames itself, so the egress
//! addresses never need to exist in the kernel (which would otherwise answer ARP for them or reset flows it
//! does not own).
//!
//! * Receive: `SOCK_RAW`, `ETH_P_ALL`, bound to the interface, with `PACKET_VNET_HDR` (each frame comes with a
//!   virtio-net header saying whether its checksum is still to be completed and whether it is a GSO
//!   super-packet — both happen on veth and with GRO), `PACKET_IGNORE_OUTGOING` (our own transmissions are not
//!   looped back), and a `PACKET_FANOUT_CBPF` group that hands each frame to the worker pinned to the CPU
//!   processing it (`steer.rs`).
//! * Send: a second socket with `PACKET_QDISC_BYPASS` (the frames go straight to the driver) that receives
//!   nothing. Frames are addressed to the interface with a `sockaddr_ll` per message.
//!
//! pnet's datalink channel does one system call per frame and has no virtio-net header support; these
//! sockets use `recvmmsg`/`sendmmsg` (see `mmsg.rs`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use forwarder_core::wire::ethernet::MacAddr;

use super::steer::{self, Steering};

const ETH_P_ALL: u16 = 0x0003;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Size of the virtio-net header (`struct virtio_net_hdr`) in front of every received frame.
pub(crate) const VNET_HDR_LEN: usize = 10;

/// An uplink interface's index and MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interface {
    pub(crate) index: i32,
    pub(crate) mac: MacAddr,
    pub(crate) mtu: u32,
}

impl Interface {
    /// Looks `name` up in this network namespace.
    pub(crate) fn by_name(name: &str) -> io::Result<Interface> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
        // SAFETY: cname is a valid C string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface named {name} in this network namespace"),
            ));
        }
        let read = |file: &str| std::fs::read_to_string(format!("/sys/class/net/{name}/{file}"));
        let mac = parse_mac(read("address")?.trim()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("interface {name} has no Ethernet address"),
            )
        })?;
        let mtu = read("mtu")?.trim().parse().unwrap_or(1500);
        Ok(Interface {
            index: i32::try_from(index).unwrap_or(i32::MAX),
            mac,
            mtu,
        })
    }
}

fn parse_mac(s: &str) -> Option<MacAddr> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked below before it is used.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(protocol.to_be()),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("AF_PACKET socket: {e} (the gateway needs CAP_NET_RAW)"),
        ));
    }
    // SAFETY: `fd` ≥ 0 is the descriptor socket(2) just returned; nothing else owns or closes it, so the
    // `OwnedFd` is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt(level, opt)` with an integer value.
pub(crate) fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    set_opt(fd, level, opt, &value)
}

/// `setsockopt(level, opt)` with `value` (a plain C struct or integer; its size is passed).
pub(crate) fn set_opt<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::other("socket option too large"))?;
    // SAFETY: value is a live T of len bytes; the kernel only reads it (it copies what it keeps).
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The link-layer address of the interface for `protocol` (host order).
pub(crate) fn link_addr(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data.
    let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    a.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
    a.sll_protocol = protocol.to_be();
    a.sll_ifindex = ifindex;
    a.sll_halen = 6;
    a
}

fn bind(fd: BorrowedFd<'_>, addr: &libc::sockaddr_ll) -> io::Result<()> {
    // SAFETY: addr is a live sockaddr_ll and its size is passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(addr).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The receiving socket of one worker on one uplink.
#[derive(Debug)]
pub(crate) struct RxSocket {
    fd: OwnedFd,
}

impl RxSocket {
    /// Opens and binds; `fanout_group` joins the workers' sockets on this interface into one fanout that
    /// `steering` directs. The socket's index in the group is the order of joining.
    pub(crate) fn open(
        ifindex: i32,
        fanout_group: u16,
        rcvbuf: usize,
        steering: &Steering,
    ) -> io::Result<RxSocket> {
        // Protocol 0 at creation, ETH_P_ALL at bind: nothing from other interfaces slips in before the bind.
        let fd = packet_socket(0)?;
        set_int(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        set_int(fd.as_fd(), libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
        let buf = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        if set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, buf).is_err() {
            set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, buf)?;
        }
        bind(fd.as_fd(), &link_addr(ifindex, ETH_P_ALL))?;
        // IPv6 neighbour solicitations go to solicited-node multicast groups; take all multicast so that a
        // NIC's filter does not hide them (veth does not filter).
        let mr = libc::packet_mreq {
            mr_ifindex: ifindex,
            mr_type: u16::try_from(libc::PACKET_MR_ALLMULTI).unwrap_or(2),
            mr_alen: 0,
            mr_address: [0; 8],
        };
        set_opt(
            fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mr,
        )?;
        // The group picks the worker pinned to the CPU processing the frame (see `steer`); defragmented
        // first, so that a datagram's fragments reach one worker whole.
        let mode = steer::PACKET_FANOUT_CBPF
            | libc::c_int::try_from(libc::PACKET_FANOUT_FLAG_DEFRAG).unwrap_or(0);
        let fanout = libc::c_int::from(fanout_group) | (mode << 16);
        set_int(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_FANOUT, fanout)?;
        steer::attach(
            fd.as_fd(),
            libc::SOL_PACKET,
            steer::PACKET_FANOUT_DATA,
            &steering.program(steer::Fallback::RxHash),
        )?;
        Ok(RxSocket { fd })
    }

    /// Frames the kernel dropped at this socket since the last call, because its receive queue was full
    /// (`PACKET_STATISTICS`' `tp_drops`, which the read resets; see packet(7)).
    pub(crate) fn take_drops(&self) -> io::Result<u32> {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len =
            libc::socklen_t::try_from(std::mem::size_of::<libc::tpacket_stats>()).unwrap_or(8);
        // SAFETY: st is a live tpacket_stats and len its size; the kernel writes at most len bytes.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut st).cast(),
                &raw mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.tp_drops)
    }
}

impl AsFd for RxSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The sending socket of one worker on one uplink.
#[derive(Debug)]
pub(crate) struct TxSocket {
    fd: OwnedFd,
}

impl TxSocket {
    /// Opens a socket that sends on `ifindex`, bypassing the qdisc, and receives nothing.
    pub(crate) fn open(ifindex: i32, sndbuf: usize) -> io::Result<TxSocket> {
        let fd = packet_socket(0)?;
        // Best effort: not every kernel or device supports the bypass; the qdisc path works too.
        let _ = set_int(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
        let buf = libc::c_int::try_from(sndbuf).unwrap_or(libc::c_int::MAX);
        if set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, buf).is_err() {
            set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, buf)?;
        }
        bind(fd.as_fd(), &link_addr(ifindex, 0))?;
        Ok(TxSocket { fd })
    }

    /// Sends one frame at once (neighbour traffic, not the data path).
    pub(crate) fn send_one(&self, to: &libc::sockaddr_ll, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame and `to` are live for the call; lengths are passed.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(to).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl AsFd for TxSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A sending socket with `PACKET_VNET_HDR`: each frame goes with a virtio-net header, so a TCP super-packet
/// can be handed to the kernel whole (segmented by the device or the next hop, not here).
#[derive(Debug)]
pub(crate) struct GsoTxSocket {
    fd: OwnedFd,
}

impl GsoTxSocket {
    /// Opens a socket that sends on `ifindex` with virtio-net headers and receives nothing.
    pub(crate) fn open(ifindex: i32, sndbuf: usize) -> io::Result<GsoTxSocket> {
        let fd = packet_socket(0)?;
        set_int(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        let _ = set_int(fd.as_fd(), libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
        let buf = libc::c_int::try_from(sndbuf).unwrap_or(libc::c_int::MAX);
        if set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, buf).is_err() {
            set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, buf)?;
        }
        bind(fd.as_fd(), &link_addr(ifindex, 0))?;
        Ok(GsoTxSocket { fd })
    }

    /// Sends `frame` with the virtio-net header `vnet`.
    pub(crate) fn send(
        &self,
        to: &libc::sockaddr_ll,
        vnet: &[u8; VNET_HDR_LEN],
        frame: &[u8],
    ) -> io::Result<()> {
        let mut iov = [
            libc::iovec {
                iov_base: vnet.as_ptr().cast_mut().cast(),
                iov_len: vnet.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: msghdr is integers and raw pointers: all-zero is a valid value (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = std::ptr::from_ref(to).cast_mut().cast();
        msg.msg_namelen =
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // SAFETY: msg points at `to` and `iov`, whose two entries point at `vnet` and `frame`, all borrowed
        // for the whole call with their lengths given; the kernel only reads them.
        let r = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &raw const msg, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_mac() {
        assert_eq!(
            parse_mac("a2:2a:ac:12:00:03"),
            Some([0xa2, 0x2a, 0xac, 0x12, 0, 3])
        );
        assert_eq!(parse_mac("a2:2a:ac:12:00"), None);
        assert_eq!(parse_mac("a2:2a:ac:12:00:03:04"), None);
        assert_eq!(parse_mac(""), None);
    }
}
