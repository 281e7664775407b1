//! Whether an outside target answers: the probes of one target and what came of them. Pure: the prober
//! passes the time in, so that every rule is tested without sockets or sleeping.
//!
//! * A probe is sent every `interval` (sooner again when it could not be sent, see [`TargetHealth::not_sent`]).
//! * An answer counts only when it names a probe still in flight: one sent less than `timeout` ago whose
//!   token (echo sequence number and nonce, or TCP source port and initial sequence number) it carries.
//!   Each probe counts once.
//! * A target is **up** while its last successful answer is less than `timeout` old, and **down** from the
//!   start until its first one, and once `timeout` has passed without one. A refusal (TCP RST: the host is
//!   there, the service is not) is a failed probe, not a success: it does not keep a target up.
//! * A kind (ICMP, TCP) fails when it has targets and none of them is up; the gateway is ready only while
//!   no kind fails — Calico Enterprise's rule for its `icmpProbe` and `httpProbe`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most probes of one target in flight; the oldest is forgotten beyond it.
const MAX_IN_FLIGHT: usize = 32;
/// When a probe could not be sent (next hop not resolved yet), how soon it is tried again (at most
/// `interval`).
pub(crate) const RETRY: Duration = Duration::from_millis(100);

/// The kind of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    /// ICMP echo (RFC 792) or ICMPv6 echo (RFC 4443).
    Icmp,
    /// TCP connect: SYN, then SYN-ACK (RFC 9293 §3.5).
    Tcp,
}

impl Kind {
    /// The metric label and the word in `/readiness`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Icmp => "icmp",
            Kind::Tcp => "tcp",
        }
    }
}

/// What identifies one probe on the wire, so that its answer is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// An echo request's sequence number and the nonce in its data.
    Echo { seq: u16, nonce: u64 },
    /// A SYN's source port and initial sequence number.
    Syn { port: u16, isn: u32 },
}

/// What an answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Echo reply, SYN-ACK: the target is reachable and answers.
    Success,
    /// TCP RST: the host is reachable, the port is closed (a failed probe).
    Refused,
}

/// How often to probe, and how long without an answer makes a target down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// One target's probes and what came of them.
#[derive(Debug, Clone)]
pub(crate) struct TargetHealth {
    next: Instant,
    last_success: Option<Instant>,
    in_flight: VecDeque<(Token, Instant)>,
    /// Probes sent.
    pub(crate) sent: u64,
    /// Probes answered with a success.
    pub(crate) answered: u64,
    /// Probes answered with a refusal (TCP RST).
    pub(crate) refused: u64,
    /// Round-trip time of the last successful answer.
    pub(crate) rtt: Option<Duration>,
}

impl TargetHealth {
    /// A target whose first probe is due at `first`.
    pub(crate) fn new(first: Instant) -> TargetHealth {
        TargetHealth {
            next: first,
            last_success: None,
            in_flight: VecDeque::new(),
            sent: 0,
            answered: 0,
            refused: 0,
            rtt: None,
        }
    }

    /// When the next probe is due.
    pub(crate) fn next_due(&self) -> Instant {
        self.next
    }

    /// Whether a probe is due at `now`.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// A probe identified by `token` left at `now`; the next is due one `interval` later.
    pub(crate) fn sent(&mut self, token: Token, now: Instant, timing: Timing) {
        self.forget_old(now, timing);
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back((token, now));
        self.sent += 1;
        self.next = now + timing.interval;
    }

    /// A due probe could not be sent (its next hop is not resolved yet, or the uplink refused it): it is
    /// tried again [`RETRY`] later (or one `interval`, if that is shorter). Nothing else changes: the target
    /// goes down when `timeout` passes without an answer, whatever the reason.
    pub(crate) fn not_sent(&mut self, now: Instant, timing: Timing) {
        self.next = now + timing.interval.min(RETRY);
    }

    /// An answer carrying `token` arrived at `now`: true when it answers a probe in flight (which then
    /// counts), false when it answers nothing of ours (late, repeated, forged).
    pub(crate) fn answer(
        &mut self,
        token: Token,
        answer: Answer,
        now: Instant,
        timing: Timing,
    ) -> bool {
        self.forget_old(now, timing);
        let Some(i) = self.in_flight.iter().position(|(t, _)| *t == token) else {
            return false;
        };
        let Some((_, sent)) = self.in_flight.remove(i) else {
            return false;
        };
        match answer {
            Answer::Success => {
                self.answered += 1;
                self.last_success = Some(now);
                self.rtt = Some(now.saturating_duration_since(sent));
            }
            Answer::Refused => self.refused += 1,
        }
        true
    }

    /// Whether the target is up at `now`: answered less than `timeout` ago.
    pub(crate) fn is_up(&self, now: Instant, timing: Timing) -> bool {
        self.last_success
            .is_some_and(|t| now.saturating_duration_since(t) < timing.timeout)
    }

    /// Probes sent `timeout` or longer ago are no longer in flight: their answers would come too late.
    fn forget_old(&mut self, now: Instant, timing: Timing) {
        while self
            .in_flight
            .front()
            .is_some_and(|(_, sent)| now.saturating_duration_since(*sent) >= timing.timeout)
        {
            self.in_flight.pop_front();
        }
    }
}

/// The kinds that fail: those with at least one target and no target up. `targets` gives each target's
/// kind and whether it is up.
pub(crate) fn failing_kinds(targets: impl IntoIterator<Item = (Kind, bool)>) -> Vec<Kind> {
    let mut kinds: Vec<(Kind, bool)> = Vec::new();
    for (kind, up) in targets {
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, any_up)) => *any_up |= up,
            None => kinds.push((kind, up)),
        }
    }
    kinds.sort_unstable();
    kinds
        .into_iter()
        .filter(|(_, any_up)| !any_up)
        .map(|(k, _)| k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
    };

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn echo(seq: u16) -> Token {
        Token::Echo {
            seq,
            nonce: u64::from(seq) * 7919,
        }
    }

    #[test]
    fn down_until_the_first_answer_then_up_until_timeout_passes_without_one() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(t0);
        assert!(h.is_due(t0));
        assert!(!h.is_up(t0, T), "no answer yet");
        h.sent(echo(1), t0, T);
        assert!(!h.is_due(t0 + secs(0.5)));
        assert!(h.is_due(t0 + secs(1.0)));
        assert!(h.answer(echo(1), Answer::Success, t0 + secs(0.02), T));
        assert_eq!(h.rtt, Some(secs(0.02)));
        assert!(h.is_up(t0 + secs(0.02), T));
        // Every later probe unanswered: up until 3 s after the last answer, then down.
        for k in 1..6u16 {
            h.sent(echo(1 + k), t0 + secs(f64::from(k)), T);
        }
        assert!(h.is_up(t0 + secs(3.0), T));
        assert!(!h.is_up(t0 + secs(3.02), T));
        assert_eq!((h.sent, h.answered, h.refused), (6, 1, 0));
        // An answer again: up at once.
        assert!(h.answer(echo(6), Answer::Success, t0 + secs(5.5), T));
        assert!(h.is_up(t0 + secs(5.5), T));
        assert_eq!(h.rtt, Some(secs(0.5)));
    }

    #[test]
    fn an_answer_counts_once_and_only_for_a_probe_in_flight() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(t0);
        h.sent(echo(1), t0, T);
        // Wrong nonce, never-sent sequence number: not ours.
        let forged = Token::Echo { seq: 1, nonce: 1 };
        assert!(!h.answer(forged, Answer::Success, t0 + secs(0.1), T));
        assert!(!h.answer(echo(2), Answer::Success, t0 + secs(0.1), T));
        assert!(!h.is_up(t0 + secs(0.1), T));
        assert!(h.answer(echo(1), Answer::Success, t0 + secs(0.1), T));
        assert!(
            !h.answer(echo(1), Answer::Success, t0 + secs(0.2), T),
            "a duplicate"
        );
        assert_eq!(h.answered, 1);
    }

    #[test]
    fn a_late_answer_does_not_count() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(t0);
        h.sent(echo(1), t0, T);
        assert!(!h.answer(echo(1), Answer::Success, t0 + secs(3.0), T));
        assert!(!h.is_up(t0 + secs(3.0), T));
        assert_eq!(h.answered, 0);
        // An answer slower than the interval but within the timeout counts.
        h.sent(echo(2), t0 + secs(4.0), T);
        h.sent(echo(3), t0 + secs(5.0), T);
        assert!(h.answer(echo(2), Answer::Success, t0 + secs(6.5), T));
        assert_eq!(h.rtt, Some(secs(2.5)));
    }

    #[test]
    fn a_refusal_is_a_failed_probe() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(t0);
        let syn = |port, isn| Token::Syn { port, isn };
        h.sent(syn(1010, 5), t0, T);
        assert!(h.answer(syn(1010, 5), Answer::Success, t0 + secs(0.01), T));
        h.sent(syn(1011, 6), t0 + secs(1.0), T);
        assert!(h.answer(syn(1011, 6), Answer::Refused, t0 + secs(1.01), T));
        assert_eq!((h.answered, h.refused), (1, 1));
        assert!(h.is_up(t0 + secs(2.0), T), "still within the timeout");
        h.sent(syn(1012, 7), t0 + secs(2.0), T);
        assert!(h.answer(syn(1012, 7), Answer::Refused, t0 + secs(2.01), T));
        assert!(!h.is_up(t0 + secs(3.01), T), "refused ever since");
        // A SYN-ACK for another port or ISN is not this probe's.
        h.sent(syn(1013, 8), t0 + secs(3.0), T);
        assert!(!h.answer(syn(1013, 9), Answer::Success, t0 + secs(3.01), T));
        assert!(!h.answer(syn(1014, 8), Answer::Success, t0 + secs(3.01), T));
    }

    #[test]
    fn a_probe_that_could_not_leave_is_retried_soon() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(t0);
        h.not_sent(t0, T);
        assert_eq!(h.next_due(), t0 + RETRY);
        assert_eq!(h.sent, 0);
        let fast = Timing {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(200),
        };
        h.not_sent(t0, fast);
        assert_eq!(h.next_due(), t0 + Duration::from_millis(50));
    }

    #[test]
    fn in_flight_probes_are_bounded() {
        let t0 = Instant::now();
        let mut h = TargetHealth::new(t0);
        let slow = Timing {
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(3600),
        };
        for k in 0..100u16 {
            h.sent(echo(k), t0 + Duration::from_millis(u64::from(k)), slow);
        }
        assert_eq!(h.in_flight.len(), MAX_IN_FLIGHT);
        assert!(!h.answer(echo(0), Answer::Success, t0 + secs(1.0), slow));
        assert!(h.answer(echo(99), Answer::Success, t0 + secs(1.0), slow));
    }

    #[test]
    fn a_kind_fails_when_none_of_its_targets_is_up() {
        use Kind::{Icmp, Tcp};
        assert_eq!(failing_kinds([]), Vec::<Kind>::new());
        assert_eq!(failing_kinds([(Icmp, true), (Icmp, false)]), []);
        assert_eq!(failing_kinds([(Icmp, false), (Icmp, false)]), [Icmp]);
        assert_eq!(failing_kinds([(Tcp, false), (Icmp, true)]), [Tcp]);
        assert_eq!(
            failing_kinds([(Tcp, false), (Icmp, false), (Tcp, false)]),
            [Icmp, Tcp]
        );
        assert_eq!(failing_kinds([(Tcp, false), (Tcp, true), (Icmp, true)]), []);
    }
}
