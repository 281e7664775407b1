//! Batched datagram I/O: `recvmmsg(2)` / `sendmmsg(2)` over a worker's preallocated buffers.
//!
//! A [`RecvBatch`] owns one slab cut into equal slots; each slot receives one datagram (or frame) at a fixed
//! offset, so the pipeline can grow headers in front of it and build ICMP errors behind it in place. The
//! kernel structures (`mmsghdr`, `iovec`, addresses) are built once; a receive call only resets lengths.
//! [`SendBatch`] collects (address, bytes) pairs that point into those slots and flushes them in one call;
//! a [`Sending`] session ties them to the borrow of the slots (see `docs/unsafe.md`).

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// An address structure the kernel fills in (`recvmmsg`) or reads (`sendmmsg`) as raw bytes.
///
/// # Safety
///
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid value (plain old data: integers and byte
/// arrays, no references, `bool`s or enums), because the kernel writes arbitrary bytes into it.
pub(crate) unsafe trait SockAddr: Copy {}

// SAFETY: `sockaddr_in` is `u16`, `u16`, `in_addr` (`u32`) and `[u8; 8]`: every bit pattern is valid.
unsafe impl SockAddr for libc::sockaddr_in {}
// SAFETY: `sockaddr_ll` is integers and `[u8; 8]`: every bit pattern is valid.
unsafe impl SockAddr for libc::sockaddr_ll {}

/// One slot's layout: `prefix` bytes received into a separate per-slot area (the virtio-net header on
/// packet sockets), then the payload at `headroom` within the slot, at most `max_len` bytes, with the rest of
/// the slot spare room.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotLayout {
    pub(crate) slot: usize,
    pub(crate) headroom: usize,
    pub(crate) max_len: usize,
    pub(crate) prefix: usize,
}

/// What one receive produced for a slot.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Received {
    /// Payload length.
    pub(crate) len: usize,
    /// The payload did not fit (`MSG_TRUNC`).
    pub(crate) truncated: bool,
}

/// Preallocated buffers and kernel structures for `recvmmsg`.
pub(crate) struct RecvBatch<A: SockAddr> {
    layout: SlotLayout,
    slab: Vec<u8>,
    prefix: Vec<u8>,
    iov: Vec<[libc::iovec; 2]>,
    names: Vec<A>,
    hdrs: Vec<libc::mmsghdr>,
    received: Vec<Received>,
}

impl<A: SockAddr> std::fmt::Debug for RecvBatch<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("layout", &self.layout)
            .field("slots", &self.hdrs.len())
            .finish()
    }
}

impl<A: SockAddr> RecvBatch<A> {
    /// `n` slots; `empty_name` is a zeroed address structure of the socket's family.
    pub(crate) fn new(n: usize, layout: SlotLayout, empty_name: A) -> Self {
        assert!(layout.headroom + layout.max_len <= layout.slot);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        RecvBatch {
            layout,
            slab: vec![0; n * layout.slot],
            prefix: vec![0; n * layout.prefix.max(1)],
            iov: vec![[empty; 2]; n],
            names: vec![empty_name; n],
            // SAFETY: mmsghdr is plain old data (integers and raw pointers); all-zero is a valid value (null
            // pointers, zero lengths).
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
            received: vec![Received::default(); n],
        }
    }

    /// Points the kernel structures of slots `..n` at their buffers. Done before every receive, from
    /// pointers taken afresh: `slab_mut` hands out `&mut` to the slab in between, and a pointer taken before
    /// such a borrow may not be used after it (`Vec::as_mut_ptr` documents this).
    fn wire(&mut self, n: usize) {
        let layout = self.layout;
        let skip = usize::from(layout.prefix == 0);
        let slab = self.slab.as_mut_ptr();
        let prefix = self.prefix.as_mut_ptr();
        let iov = self.iov.as_mut_ptr();
        let names = self.names.as_mut_ptr();
        for (i, h) in self.hdrs[..n].iter_mut().enumerate() {
            // SAFETY: i < n <= hdrs.len() == iov.len() == names.len() (all made with `n` entries in `new` and
            // never resized), the slab has n * slot bytes with headroom + max_len <= slot (asserted in `new`)
            // and the prefix area n * max(prefix, 1): every offset below stays inside its allocation.
            unsafe {
                let pair = iov.add(i).cast::<libc::iovec>();
                *pair = libc::iovec {
                    iov_base: prefix.add(i * layout.prefix.max(1)).cast(),
                    iov_len: layout.prefix,
                };
                *pair.add(1) = libc::iovec {
                    iov_base: slab.add(i * layout.slot + layout.headroom).cast(),
                    iov_len: layout.max_len,
                };
                h.msg_hdr.msg_iov = pair.add(skip);
                h.msg_hdr.msg_name = names.add(i).cast();
            }
            h.msg_hdr.msg_iovlen = 2 - skip;
            h.msg_hdr.msg_namelen = socklen_of::<A>();
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
    }

    /// Receives up to `max` datagrams without blocking; returns how many (0 when none is waiting).
    pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let n = max.min(self.hdrs.len());
        self.wire(n);
        // SAFETY: `wire` just pointed hdrs[..n] at iovecs, names and buffers owned by `self`, which the
        // `&mut self` keeps alive and unaliased for the call; each iovec's length fits its buffer and each
        // msg_namelen is the size of `A`, so the kernel writes only inside them. It writes plain bytes, valid
        // for `u8` and for `A` (a `sockaddr_*`: plain old data).
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                u32::try_from(n).unwrap_or(u32::MAX),
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let got = usize::try_from(r).unwrap_or(0).min(n);
        for i in 0..got {
            let h = &self.hdrs[i];
            let total = usize::try_from(h.msg_len).unwrap_or(0);
            self.received[i] = Received {
                len: total.saturating_sub(self.layout.prefix),
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(got)
    }

    /// The layout of every slot.
    pub(crate) fn layout(&self) -> SlotLayout {
        self.layout
    }

    /// What slot `i` received.
    pub(crate) fn received(&self, i: usize) -> Received {
        self.received[i]
    }

    /// The sender's address of slot `i`.
    pub(crate) fn name(&self, i: usize) -> &A {
        &self.names[i]
    }

    /// The prefix bytes slot `i` received (the virtio-net header on packet sockets).
    pub(crate) fn prefix(&self, i: usize) -> &[u8] {
        let p = self.layout.prefix;
        &self.prefix[i * p..(i + 1) * p]
    }

    /// All slots (the payload of slot `i` starts at `i * slot + headroom`).
    pub(crate) fn slab_mut(&mut self) -> &mut [u8] {
        &mut self.slab
    }
}

fn socklen_of<A>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<A>()).unwrap_or(0)
}

/// Datagrams waiting to be sent with one `sendmmsg`: the storage (kernel structures) a worker keeps between
/// batches. The bytes are not copied: each entry points at a frame in the worker's receive buffers.
///
/// Entries are pushed and sent only through a [`Sending`] session, and only the session that pushed an
/// entry can send it. A session `Sending<'b>` accepts frames that live for `'b` and can itself be used only
/// within `'b` (its lifetime is invariant), so safe code cannot send a frame after its buffer is freed or
/// reused: the borrow checker rejects a `flush` past the end of the frames' borrow. A batch holding
/// entries of an ended (or forgotten) session treats them as gone: the next push or flush of another session
/// discards them unsent.
pub(crate) struct SendBatch<A: SockAddr> {
    iov: Vec<libc::iovec>,
    names: Vec<A>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
    /// The session whose entries `..len` are.
    session: u64,
}

impl<A: SockAddr> std::fmt::Debug for SendBatch<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("queued", &self.len)
            .field("session", &self.session)
            .finish()
    }
}

/// A type that mentions `'b` invariantly.
type Invariant<'b> = fn(&'b [u8]) -> &'b [u8];

/// The right to queue frames that live for `'b` in any [`SendBatch`] and to send them. Start one per batch
/// of received packets with [`Sending::begin`], after the frames' buffer is borrowed, and flush every batch
/// pushed to before the borrow ends: what a session leaves unflushed is never sent (see [`SendBatch`]).
#[derive(Debug)]
pub(crate) struct Sending<'b> {
    id: u64,
    /// Invariant in `'b`: a `&Sending<'long>` cannot be used as a `&Sending<'short>` to push short-lived
    /// frames that a later flush through the `'long` session would then send.
    _frames: PhantomData<Invariant<'b>>,
}

impl Sending<'_> {
    /// A new session, distinct from every other one in the process.
    pub(crate) fn begin() -> Self {
        // 0 is the id of no session (a new batch); 2^64 sessions take centuries at any batch rate.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Sending {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            _frames: PhantomData,
        }
    }
}

/// The outcome of a flush.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Flushed {
    pub(crate) sent: usize,
    pub(crate) failed: usize,
    pub(crate) last_error: Option<i32>,
}

impl<A: SockAddr> SendBatch<A> {
    /// Room for `n` datagrams.
    pub(crate) fn new(n: usize, empty_name: A) -> Self {
        SendBatch {
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                n
            ],
            names: vec![empty_name; n],
            // SAFETY: mmsghdr is plain old data (integers and raw pointers); all-zero is a valid value (null
            // pointers, zero lengths).
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
            len: 0,
            session: 0,
        }
    }

    /// Makes the entries `s`'s: entries of another session are discarded.
    fn adopt(&mut self, s: &Sending<'_>) {
        if self.session != s.id {
            self.session = s.id;
            self.len = 0;
        }
    }

    /// True when no room is left for `s`; flush first.
    pub(crate) fn is_full(&self, s: &Sending<'_>) -> bool {
        self.len(s) == self.hdrs.len()
    }

    /// Datagrams `s` has queued here.
    pub(crate) fn len(&self, s: &Sending<'_>) -> usize {
        if self.session == s.id {
            self.len
        } else {
            0
        }
    }

    /// Queues `bytes` for `to` in session `s` (which keeps `bytes` borrowed, unchanged, until it ends).
    /// When the batch is full the datagram is not queued and false is returned (flush first).
    pub(crate) fn push<'b>(&mut self, s: &Sending<'b>, to: A, bytes: &'b [u8]) -> bool {
        self.adopt(s);
        let i = self.len;
        if i == self.hdrs.len() {
            return false;
        }
        self.names[i] = to;
        self.iov[i] = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        self.len += 1;
        true
    }

    /// Sends everything `s` queued here (retrying partial sends, skipping a datagram the kernel refuses) and
    /// empties the batch.
    pub(crate) fn flush(&mut self, s: &Sending<'_>, fd: BorrowedFd<'_>) -> Flushed {
        self.adopt(s);
        let mut out = Flushed::default();
        let n = self.len;
        let iov = self.iov.as_mut_ptr();
        let names = self.names.as_mut_ptr();
        for (i, h) in self.hdrs[..n].iter_mut().enumerate() {
            let h = &mut h.msg_hdr;
            // SAFETY: i < n <= iov.len() (push never queues past the vectors' length, which never changes),
            // so the offset stays inside the allocation.
            h.msg_iov = unsafe { iov.add(i) };
            h.msg_iovlen = 1;
            // SAFETY: as above, names.len() == iov.len().
            h.msg_name = unsafe { names.add(i) }.cast();
            h.msg_namelen = socklen_of::<A>();
        }
        let mut at = 0;
        while at < n {
            // SAFETY: hdrs[at..n] point at iov[..n] and names[..n] (set just above from pointers taken after
            // the last `&mut` use of those vectors) and each iovec at bytes pushed in session `s`, which
            // borrows them for its `'b`; `s` is in use here, so `'b` has not ended: they are alive and
            // unchanged (shared borrows). The kernel only reads them, within the lengths given.
            let r = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs.as_mut_ptr().add(at),
                    u32::try_from(n - at).unwrap_or(u32::MAX),
                    0,
                )
            };
            if r > 0 {
                let r = usize::try_from(r).unwrap_or(0);
                out.sent += r;
                at += r;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The first datagram failed: skip it and go on with the rest.
            out.failed += 1;
            out.last_error = e.raw_os_error();
            at += 1;
        }
        self.len = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tunnel::{empty_sockaddr_in, sockaddr_in};
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket, libc::sockaddr_in) {
        let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let port = rx.local_addr().expect("addr").port();
        (tx, rx, sockaddr_in(Ipv4Addr::LOCALHOST, port))
    }

    fn drain(rx: &UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[test]
    fn a_session_sends_what_it_queued_in_order() {
        let (tx, rx, to) = pair();
        let mut batch = SendBatch::new(2, empty_sockaddr_in());
        let frames = [b"a".to_vec(), b"bb".to_vec(), b"ccc".to_vec()];
        let s = Sending::begin();
        for f in &frames {
            if batch.is_full(&s) {
                assert_eq!(batch.flush(&s, tx.as_fd()).sent, 2);
            }
            assert!(batch.push(&s, to, f));
        }
        assert!(!batch.is_full(&s));
        assert_eq!(batch.len(&s), 1);
        let f = batch.flush(&s, tx.as_fd());
        assert_eq!((f.sent, f.failed), (1, 0));
        assert_eq!(drain(&rx), frames);
    }

    #[test]
    fn a_full_batch_refuses_a_push() {
        let (_tx, _rx, to) = pair();
        let mut batch = SendBatch::new(1, empty_sockaddr_in());
        let s = Sending::begin();
        assert!(batch.push(&s, to, b"one"));
        assert!(batch.is_full(&s));
        assert!(!batch.push(&s, to, b"two"));
        assert_eq!(batch.len(&s), 1);
    }

    /// Entries of a session that ended unflushed are never sent by a later one (their frames may be gone).
    #[test]
    fn entries_of_an_ended_session_are_discarded_unsent() {
        let (tx, rx, to) = pair();
        let mut batch = SendBatch::new(4, empty_sockaddr_in());
        {
            let stale = vec![7u8; 8];
            let s = Sending::begin();
            assert!(batch.push(&s, to, &stale));
            // `s` ends here without a flush, then `stale` is freed.
        }
        let s = Sending::begin();
        assert_eq!(batch.len(&s), 0);
        assert_eq!(batch.flush(&s, tx.as_fd()).sent, 0);
        {
            let other = Sending::begin();
            assert!(batch.push(&other, to, b"not sent"));
        }
        let fresh = b"fresh";
        let s = Sending::begin();
        assert!(batch.push(&s, to, fresh));
        assert_eq!(batch.flush(&s, tx.as_fd()).sent, 1);
        assert_eq!(drain(&rx), [fresh.to_vec()]);
    }

    /// The receive structures are re-pointed before every call, so a receive after `slab_mut` (which
    /// borrows the slab mutably) lands in the slots.
    #[test]
    fn receives_after_the_slab_was_borrowed() {
        let (tx, rx, to) = pair();
        let layout = SlotLayout {
            slot: 32,
            headroom: 4,
            max_len: 16,
            prefix: 0,
        };
        let mut batch = RecvBatch::new(2, layout, empty_sockaddr_in());
        let port = u16::from_be(to.sin_port);
        for round in 0..2u8 {
            tx.send_to(&[round; 5], (Ipv4Addr::LOCALHOST, port))
                .expect("send");
            let mut got = 0;
            for _ in 0..100 {
                got = batch.recv(rx.as_fd(), 2).expect("recv");
                if got > 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(got, 1);
            assert_eq!(batch.received(0).len, 5);
            let slab = batch.slab_mut();
            assert_eq!(&slab[4..9], &[round; 5]);
            slab[4..9].fill(0xEE);
        }
    }
}
