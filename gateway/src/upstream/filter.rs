//! The classic BPF program on the prober's packet sockets: a second `AF_PACKET` socket on an uplink gets a
//! copy of every frame, so the kernel must drop everything but the probes' answers before they are queued
//! to it. It keeps:
//!
//! * IPv4 ICMP echo replies (type 0) and ICMPv6 echo replies (type 129) with the prober's identifier;
//! * IPv4 and IPv6 TCP segments to one of the prober's source ports;
//!
//! and drops IPv4 fragments after the first (their ports are not in them) and IPv6 packets with extension
//! headers before the transport header (the prober never provokes any). Addresses, MACs and tokens are
//! checked by `frame::parse` and the prober; this only keeps the copies few. The instructions are those of
//! `include/uapi/linux/filter.h` and `bpf_common.h`.

/// One instruction: `(code, jt, jf, k)`, as `struct sock_filter`.
pub(crate) type Instruction = (u16, u8, u8, u32);

const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_H_IND: u16 = 0x48; // BPF_LD | BPF_H | BPF_IND
const LD_B_IND: u16 = 0x50; // BPF_LD | BPF_B | BPF_IND
const LDX_B_MSH: u16 = 0xb1; // BPF_LDX | BPF_B | BPF_MSH: X = 4 * (P[k] & 0xf)
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// Bytes of an accepted frame handed to the socket (all of it: answers are small).
const SNAPLEN: u32 = 0xFFFF;

/// Where a jump goes.
#[derive(Debug, Clone, Copy)]
enum To {
    Next,
    Label(&'static str),
}

/// A program with symbolic jump targets, resolved by [`Asm::finish`].
#[derive(Debug, Default)]
struct Asm {
    code: Vec<(u16, To, To, u32)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.code.len()));
    }

    fn op(&mut self, code: u16, k: u32) {
        self.code.push((code, To::Next, To::Next, k));
    }

    fn jump(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.code.push((code, jt, jf, k));
    }

    /// The instructions; panics when a label is missing or a jump goes backwards or too far (a bug in
    /// [`program`], which the tests run).
    fn finish(self) -> Vec<Instruction> {
        let at = |to: To, i: usize| -> u8 {
            let target = match to {
                To::Next => i + 1,
                To::Label(name) => {
                    self.labels
                        .iter()
                        .find(|(n, _)| *n == name)
                        .unwrap_or_else(|| panic!("no label {name}"))
                        .1
                }
            };
            u8::try_from(target - (i + 1)).unwrap_or_else(|_| panic!("jump too far"))
        };
        self.code
            .iter()
            .enumerate()
            .map(|(i, &(code, jt, jf, k))| (code, at(jt, i), at(jf, i), k))
            .collect()
    }
}

/// The filter for echo replies with identifier `ident` and TCP segments to a port in `ports`.
pub(crate) fn program(ident: u16, ports: std::ops::RangeInclusive<u16>) -> Vec<Instruction> {
    use To::{Label as L, Next};
    let (lo, hi) = (u32::from(*ports.start()), u32::from(*ports.end()));
    let ident = u32::from(ident);
    let mut a = Asm::default();
    // Ethernet: type at 12, IP header at 14.
    a.op(LD_H_ABS, 12);
    a.jump(JEQ_K, 0x0800, Next, L("not_v4"));
    a.op(LD_B_ABS, 14 + 9); // IPv4 protocol
    a.jump(JEQ_K, 1, L("v4_icmp"), Next);
    a.jump(JEQ_K, 6, L("v4_tcp"), L("drop"));
    a.label("v4_icmp");
    a.op(LD_H_ABS, 14 + 6); // flags and fragment offset
    a.jump(JSET_K, 0x1FFF, L("drop"), Next);
    a.op(LDX_B_MSH, 14); // X = IPv4 header length
    a.op(LD_B_IND, 14); // ICMP type
    a.jump(JEQ_K, 0, Next, L("drop"));
    a.op(LD_H_IND, 14 + 4); // echo identifier
    a.jump(JEQ_K, ident, L("accept"), L("drop"));
    a.label("v4_tcp");
    a.op(LD_H_ABS, 14 + 6);
    a.jump(JSET_K, 0x1FFF, L("drop"), Next);
    a.op(LDX_B_MSH, 14);
    a.op(LD_H_IND, 14 + 2); // TCP destination port
    a.jump(JGE_K, lo, Next, L("drop"));
    a.jump(JGT_K, hi, L("drop"), L("accept"));
    a.label("not_v4");
    a.jump(JEQ_K, 0x86DD, Next, L("drop"));
    a.op(LD_B_ABS, 14 + 6); // IPv6 next header
    a.jump(JEQ_K, 58, Next, L("v6_tcp"));
    a.op(LD_B_ABS, 14 + 40); // ICMPv6 type
    a.jump(JEQ_K, 129, Next, L("drop"));
    a.op(LD_H_ABS, 14 + 40 + 4);
    a.jump(JEQ_K, ident, L("accept"), L("drop"));
    a.label("v6_tcp");
    a.jump(JEQ_K, 6, Next, L("drop"));
    a.op(LD_H_ABS, 14 + 40 + 2);
    a.jump(JGE_K, lo, Next, L("drop"));
    a.jump(JGT_K, hi, L("drop"), L("accept"));
    a.label("accept");
    a.op(RET_K, SNAPLEN);
    a.label("drop");
    a.op(RET_K, 0);
    a.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::upstream::frame::{self, Hop, Segment};
    use forwarder_core::wire::tcp::flags;
    use std::net::{IpAddr, SocketAddr};

    /// Runs `prog` over `pkt` as the kernel does for the opcodes used here (a load past the end ends the
    /// program with 0).
    fn run(prog: &[Instruction], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let byte = |i: usize| pkt.get(i).map(|b| u32::from(*b));
        let half = |i: usize| Some((byte(i)? << 8) | byte(i + 1)?);
        loop {
            let (code, jt, jf, k) = prog[pc];
            let k_at = usize::try_from(k).unwrap();
            let x_at = usize::try_from(x).unwrap();
            pc += 1;
            let jump = |cond: bool| usize::from(if cond { jt } else { jf });
            match code {
                LD_H_ABS => match half(k_at) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_B_ABS => match byte(k_at) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_H_IND => match half(x_at + k_at) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_B_IND => match byte(x_at + k_at) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LDX_B_MSH => match byte(k_at) {
                    Some(v) => x = 4 * (v & 0xF),
                    None => return 0,
                },
                JEQ_K => pc += jump(a == k),
                JGT_K => pc += jump(a > k),
                JGE_K => pc += jump(a >= k),
                JSET_K => pc += jump(a & k != 0),
                RET_K => return k,
                other => panic!("opcode {other:#x} not expected"),
            }
        }
    }

    const HOP: Hop = Hop {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
    };

    fn echo(src: &str, dst: &str, ident: u16, reply: bool) -> Vec<u8> {
        let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut out = [0u8; frame::MAX_FRAME];
        let n = frame::echo_request(&HOP, s, d, ident, 1, 2, &mut out).unwrap();
        let l4 = if s.is_ipv4() { 34 } else { 54 };
        if reply {
            out[l4] = if s.is_ipv4() { 0 } else { 129 };
        }
        out[..n].to_vec()
    }

    fn segment(src: &str, dst: &str) -> Vec<u8> {
        let seg = Segment {
            src: src.parse::<SocketAddr>().unwrap(),
            dst: dst.parse::<SocketAddr>().unwrap(),
            seq: 1,
            ack: 2,
            flags: flags::SYN | flags::ACK,
            mss: Some(1460),
        };
        let mut out = [0u8; frame::MAX_FRAME];
        let n = frame::tcp_segment(&HOP, &seg, &mut out).unwrap();
        out[..n].to_vec()
    }

    #[test]
    fn keeps_only_the_answers_to_probes() {
        let p = program(1023, 1008..=1023);
        let kept = |f: &[u8]| run(&p, f) != 0;
        // Echo replies with our identifier, both families.
        assert!(kept(&echo("198.51.100.1", "203.0.113.10", 1023, true)));
        assert!(kept(&echo("2001:db8::1", "2001:db8:113::10", 1023, true)));
        // Another identifier (a pod's translated ping), or a request.
        assert!(!kept(&echo("198.51.100.1", "203.0.113.10", 1022, true)));
        assert!(!kept(&echo("2001:db8::1", "2001:db8:113::10", 4000, true)));
        assert!(!kept(&echo("198.51.100.1", "203.0.113.10", 1023, false)));
        assert!(!kept(&echo("2001:db8::1", "2001:db8:113::10", 1023, false)));
        // TCP to our ports only (the edges included), both families.
        for port in [1008, 1015, 1023] {
            assert!(kept(&segment(
                "198.51.100.1:443",
                &format!("203.0.113.10:{port}")
            )));
            assert!(kept(&segment(
                "[2001:db8::1]:443",
                &format!("[2001:db8:113::10]:{port}")
            )));
        }
        for port in [1007, 1024, 50000] {
            assert!(!kept(&segment(
                "198.51.100.1:443",
                &format!("203.0.113.10:{port}")
            )));
            assert!(!kept(&segment(
                "[2001:db8::1]:443",
                &format!("[2001:db8:113::10]:{port}")
            )));
        }
        // ARP, UDP, a later fragment, truncated frames.
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(!kept(&arp));
        let mut udp = segment("198.51.100.1:443", "203.0.113.10:1010");
        udp[23] = 17;
        assert!(!kept(&udp));
        let mut frag = segment("198.51.100.1:443", "203.0.113.10:1010");
        frag[20..22].copy_from_slice(&[0x00, 0x10]);
        assert!(!kept(&frag));
        let whole = segment("198.51.100.1:443", "203.0.113.10:1010");
        for len in 0..37 {
            assert!(!kept(&whole[..len]), "{len} bytes");
        }
        // IPv4 options move the transport header: still read at the right place.
        let mut opts = echo("198.51.100.1", "203.0.113.10", 1023, true);
        opts.splice(34..34, [1u8; 4]); // four NOP options
        opts[14] = 0x46;
        assert!(kept(&opts));
    }
}
