//! Batched datagram I/O: `recvmmsg(2)` / `sendmmsg(2)` over a worker's preallocated buffers.
//!
//! A [`RecvBatch`] owns one slab cut into equal slots; each slot receives one datagram (or frame) at a fixed
//! offset, so the pipeline can grow headers in front of it and build ICMP errors behind it in place. The
//! kernel structures (`mmsghdr`, `iovec`, addresses) are built once; a receive call only resets lengths.
//! [`SendBatch`] collects (address, bytes) pairs that point into those slots and flushes them in one call.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
pub(crate) struct RecvBatch<A: Copy> {
    layout: SlotLayout,
    slab: Vec<u8>,
    prefix: Vec<u8>,
    iov: Vec<[libc::iovec; 2]>,
    names: Vec<A>,
    hdrs: Vec<libc::mmsghdr>,
    received: Vec<Received>,
}

impl<A: Copy> std::fmt::Debug for RecvBatch<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("layout", &self.layout)
            .field("slots", &self.hdrs.len())
            .finish()
    }
}

impl<A: Copy> RecvBatch<A> {
    /// `n` slots; `empty_name` is a zeroed address structure of the socket's family.
    pub(crate) fn new(n: usize, layout: SlotLayout, empty_name: A) -> Self {
        assert!(layout.headroom + layout.max_len <= layout.slot);
        let mut b = RecvBatch {
            layout,
            slab: vec![0; n * layout.slot],
            prefix: vec![0; n * layout.prefix.max(1)],
            iov: Vec::with_capacity(n),
            names: vec![empty_name; n],
            // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
            received: vec![Received::default(); n],
        };
        let slab = b.slab.as_mut_ptr();
        let prefix = b.prefix.as_mut_ptr();
        for i in 0..n {
            b.iov.push([
                libc::iovec {
                    // SAFETY: i * prefix is within the prefix area.
                    iov_base: unsafe { prefix.add(i * layout.prefix.max(1)) }.cast(),
                    iov_len: layout.prefix,
                },
                libc::iovec {
                    // SAFETY: i * slot + headroom is within the slab (asserted above).
                    iov_base: unsafe { slab.add(i * layout.slot + layout.headroom) }.cast(),
                    iov_len: layout.max_len,
                },
            ]);
        }
        for i in 0..n {
            let h = &mut b.hdrs[i].msg_hdr;
            let skip = usize::from(layout.prefix == 0);
            // SAFETY: pointers into vectors that are never resized after this point.
            h.msg_iov = unsafe { b.iov.as_mut_ptr().add(i).cast::<libc::iovec>().add(skip) };
            h.msg_iovlen = 2 - skip;
            // SAFETY: as above.
            h.msg_name = unsafe { b.names.as_mut_ptr().add(i) }.cast();
        }
        b
    }

    /// Receives up to `max` datagrams without blocking; returns how many (0 when none is waiting).
    pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let n = max.min(self.hdrs.len());
        for h in &mut self.hdrs[..n] {
            h.msg_hdr.msg_namelen = socklen_of::<A>();
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: hdrs[..n] point at live buffers owned by self; the kernel writes within the lengths given.
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
        let got = usize::try_from(r).unwrap_or(0);
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

/// Datagrams waiting to be sent with one `sendmmsg`. The bytes are not copied: each entry points at a
/// buffer the caller keeps alive and unchanged until [`flush`](Self::flush) returns.
pub(crate) struct SendBatch<A: Copy> {
    iov: Vec<libc::iovec>,
    names: Vec<A>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
}

impl<A: Copy> std::fmt::Debug for SendBatch<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("queued", &self.len)
            .finish()
    }
}

/// The outcome of a flush.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Flushed {
    pub(crate) sent: usize,
    pub(crate) failed: usize,
    pub(crate) last_error: Option<i32>,
}

impl<A: Copy> SendBatch<A> {
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
            // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
            len: 0,
        }
    }

    /// True when no room is left; flush first.
    pub(crate) fn is_full(&self) -> bool {
        self.len == self.hdrs.len()
    }

    /// Datagrams queued.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Queues `bytes` for `to`. The caller keeps `bytes` alive and unchanged until the next flush.
    pub(crate) fn push(&mut self, to: A, bytes: &[u8]) {
        debug_assert!(!self.is_full());
        let i = self.len;
        self.names[i] = to;
        self.iov[i] = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        self.len += 1;
    }

    /// Sends everything queued (retrying partial sends, skipping a datagram the kernel refuses) and empties
    /// the batch.
    pub(crate) fn flush(&mut self, fd: BorrowedFd<'_>) -> Flushed {
        let mut out = Flushed::default();
        let n = self.len;
        for i in 0..n {
            let h = &mut self.hdrs[i].msg_hdr;
            // SAFETY: pointers into vectors that are never resized.
            h.msg_iov = unsafe { self.iov.as_mut_ptr().add(i) };
            h.msg_iovlen = 1;
            // SAFETY: as above.
            h.msg_name = unsafe { self.names.as_mut_ptr().add(i) }.cast();
            h.msg_namelen = socklen_of::<A>();
        }
        let mut at = 0;
        while at < n {
            // SAFETY: hdrs[at..n] describe buffers the caller keeps alive until this returns.
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
