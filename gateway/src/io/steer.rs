//! Which worker receives a packet: the one pinned to the CPU the kernel is processing that packet on.
//!
//! Each worker is pinned to its own CPUs, and both receive paths pick the worker by the CPU that runs the
//! packet's softirq, with a classic BPF program: the tunnel sockets' `SO_REUSEPORT` group
//! (`SO_ATTACH_REUSEPORT_CBPF`, socket(7)) and the uplinks' packet fanout groups (`PACKET_FANOUT_CBPF`,
//! packet(7)). The wake-up that hands a packet to its worker is then local: no inter-processor
//! interrupt, and on a request/response exchange the worker runs as soon as the sender blocks, while a
//! reply that the worker's own send provokes (veth delivers in the sender's softirq) lands on the worker
//! that is already running. Measured on the namespace topology (2 vCPU VM, `bpftrace` on
//! `sched_wakeup`/`sched_switch`, the e2e benchmark's connection test): with flow-hash steering a
//! worker waited 23 µs on average from its wake-up to running, and a third of the replies woke the other
//! worker.
//!
//! With a real NIC the CPU is the one its receive-side scaling chose for the flow, so a flow still stays
//! on one worker (no reordering); over veth it is the sending thread's CPU, which changes only when the
//! scheduler moves that thread. Either way correctness does not depend on it: the flow table is shared and
//! a tuple raced by two workers is inserted once (`forwarder_core::conntrack`).
//!
//! A packet processed on a CPU outside the process's affinity mask (a pod limited by a cpuset while the
//! host's softirqs run elsewhere) falls back to a hash: the kernel's own 4-tuple hash for the tunnel
//! sockets (a program's out-of-range answer means "use the hash", `reuseport_select_sock` in
//! net/core/sock_reuseport.c) and the packet's receive hash for the uplinks.
//!
//! The index a program answers is the socket's position in its group, which is the order the sockets
//! joined: the receive sockets are therefore opened once, in worker order, and kept for the process's
//! lifetime (a restarted worker takes its predecessor's sockets, see `supervisor`).

use std::io;
use std::os::fd::BorrowedFd;

/// The classic BPF instructions used here (`include/uapi/linux/bpf_common.h`, `filter.h`).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const BPF_RET_A: u16 = 0x06 | 0x10; // BPF_RET | BPF_A
const BPF_MOD_K: u16 = 0x04 | 0x90; // BPF_ALU | BPF_MOD | BPF_K
/// Ancillary loads (`SKF_AD_OFF + SKF_AD_CPU`, `+ SKF_AD_RXHASH`), as unsigned instruction operands.
const LOAD_CPU: u32 = (libc::SKF_AD_OFF + 36) as u32;
const LOAD_RXHASH: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_RXHASH) as u32;
/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h) and `PACKET_FANOUT_CBPF`, `PACKET_FANOUT_DATA`
/// (linux/if_packet.h).
pub(crate) const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
pub(crate) const PACKET_FANOUT_CBPF: libc::c_int = 6;
pub(crate) const PACKET_FANOUT_DATA: libc::c_int = 22;

/// What a program answers for a packet processed on a CPU that no worker is pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// An index past the last socket: `SO_REUSEPORT` then uses its own hash.
    KernelHash,
    /// The packet's receive hash modulo the workers (a packet fanout takes any answer modulo its size).
    RxHash,
}

/// The workers' CPUs: worker `i` is pinned to the CPUs at positions `i`, `i + workers`, … of the
/// process's affinity mask, and a packet processed on one of those CPUs goes to worker `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Steering {
    cpus: Vec<usize>,
    workers: usize,
}

impl Steering {
    /// `workers` (at least 1) over the CPUs of the calling thread's affinity mask.
    pub(crate) fn detect(workers: usize) -> io::Result<Steering> {
        Ok(Steering::new(allowed_cpus()?, workers))
    }

    /// `workers` (at least 1) over `cpus` (in increasing order; an empty list pins nothing).
    pub(crate) fn new(cpus: Vec<usize>, workers: usize) -> Steering {
        Steering {
            cpus,
            workers: workers.max(1),
        }
    }

    /// The CPUs worker `id` runs on (empty when there are more workers than CPUs and `id` has none: it
    /// is then left unpinned and receives only what the fallback hash gives it).
    pub(crate) fn cpus_of(&self, id: usize) -> Vec<usize> {
        self.cpus
            .iter()
            .enumerate()
            .filter(|(j, _)| j % self.workers == id)
            .map(|(_, &c)| c)
            .collect()
    }

    /// The program that maps the packet's CPU to its worker's socket index.
    pub(crate) fn program(&self, fallback: Fallback) -> Vec<libc::sock_filter> {
        let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
        let n = u32::try_from(self.workers).unwrap_or(u32::MAX);
        let mut p = vec![ins(BPF_LD_W_ABS, 0, 0, LOAD_CPU)];
        for (j, &cpu) in self.cpus.iter().enumerate() {
            let worker = u32::try_from(j % self.workers).unwrap_or(0);
            // Equal: fall through to the `ret`; otherwise skip it.
            p.push(ins(BPF_JEQ_K, 0, 1, u32::try_from(cpu).unwrap_or(u32::MAX)));
            p.push(ins(BPF_RET_K, 0, 0, worker));
        }
        match fallback {
            Fallback::KernelHash => p.push(ins(BPF_RET_K, 0, 0, n)),
            Fallback::RxHash => {
                p.push(ins(BPF_LD_W_ABS, 0, 0, LOAD_RXHASH));
                p.push(ins(BPF_MOD_K, 0, 0, n));
                p.push(ins(BPF_RET_A, 0, 0, 0));
            }
        }
        p
    }

    /// Pins the calling thread to worker `id`'s CPUs (nothing to do when it has none).
    pub(crate) fn pin(&self, id: usize) -> io::Result<()> {
        let cpus = self.cpus_of(id);
        if cpus.is_empty() {
            return Ok(());
        }
        // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for c in cpus {
            if c < 8 * std::mem::size_of::<libc::cpu_set_t>() {
                // SAFETY: CPU_SET checks nothing; c fits the set (checked above).
                unsafe { libc::CPU_SET(c, &mut set) };
            }
        }
        // SAFETY: pid 0 is the calling thread; set is a live cpu_set_t of the size passed.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The CPUs the calling thread may run on, in increasing order.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the kernel writes at most the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..8 * std::mem::size_of::<libc::cpu_set_t>())
        // SAFETY: c is within the set's size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Attaches `prog` with `setsockopt(level, name)` (`SO_ATTACH_REUSEPORT_CBPF`, `PACKET_FANOUT_DATA`).
pub(crate) fn attach(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    prog: &[libc::sock_filter],
) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::other("BPF program too long"))?,
        filter: prog.as_ptr().cast_mut(),
    };
    // fprog points into prog, which outlives the call (the kernel copies the program).
    super::packet::set_opt(fd, level, name, &fprog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the subset of classic BPF these programs use, as the kernel would.
    fn run(p: &[libc::sock_filter], cpu: u32, rxhash: u32) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = p[pc];
            match i.code {
                BPF_LD_W_ABS if i.k == LOAD_CPU => a = cpu,
                BPF_LD_W_ABS if i.k == LOAD_RXHASH => a = rxhash,
                BPF_JEQ_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                BPF_MOD_K => a %= i.k,
                BPF_RET_K => return i.k,
                BPF_RET_A => return a,
                c => panic!("unexpected instruction {c:#x}"),
            }
            pc += 1;
        }
    }

    #[test]
    fn each_cpu_goes_to_the_worker_pinned_there() {
        let s = Steering::new(vec![0, 1, 2, 3], 2);
        assert_eq!(s.cpus_of(0), vec![0, 2]);
        assert_eq!(s.cpus_of(1), vec![1, 3]);
        let p = s.program(Fallback::KernelHash);
        for cpu in 0..4 {
            assert_eq!(run(&p, cpu, 0), cpu % 2);
        }
        // Not ours: past the last socket, so the kernel hashes.
        assert_eq!(run(&p, 7, 0), 2);
        let p = s.program(Fallback::RxHash);
        assert_eq!(run(&p, 7, 5), 1);
        assert_eq!(run(&p, 2, 5), 0);
    }

    #[test]
    fn sparse_masks_and_more_workers_than_cpus() {
        // A cpuset of CPUs 4 and 6: worker 0 on 4, worker 1 on 6.
        let s = Steering::new(vec![4, 6], 2);
        let p = s.program(Fallback::KernelHash);
        assert_eq!((run(&p, 4, 0), run(&p, 6, 0), run(&p, 5, 0)), (0, 1, 2));
        // Three workers on two CPUs: the third is unpinned and gets only the fallback's share.
        let s = Steering::new(vec![0, 1], 3);
        assert!(s.cpus_of(2).is_empty());
        assert_eq!(run(&s.program(Fallback::RxHash), 9, 8), 2);
    }

    #[test]
    fn the_calling_threads_cpus_are_found() {
        let s = Steering::detect(1).expect("sched_getaffinity");
        assert!(!s.cpus_of(0).is_empty());
    }
}
