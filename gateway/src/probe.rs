//! The UDP health probe between the node agents and the gateways: one 16-byte datagram each way, answered
//! from the gateway's readiness, like a BFD echo (RFC 5880 §6.4) with the gateway's state in it.
//!
//! Why not only HTTP: every node agent probes every gateway it may use every 200 ms. Over HTTP each probe is a
//! TCP handshake, a request, a response and a teardown, and the server holds a connection (and, with a
//! blocking server, a thread) per probe in flight; at 5,000 nodes that is 25,000 connections per second per
//! gateway. Over UDP a probe is one datagram in and one out, the responder keeps no state per client, and a
//! slow or stalled client cannot hold up anyone else's answer: there is nothing to wait for.
//!
//! ```text
//!  0      4   5    6      7    8                16
//!  "EGHP" ver kind state  0    nonce (8 bytes, echoed)
//! ```
//!
//! `kind` 0 is a request (state 0), 1 a reply; `state` 0 ready, 1 draining, 2 not ready, 3 handed over
//! (draining, and the replicas of its set carry its flows and addresses). A reply is exactly
//! as long as the request (no amplification), and only well-formed requests are answered.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Length of a request and of a reply.
pub(crate) const LEN: usize = 16;
const MAGIC: [u8; 4] = *b"EGHP";
const VERSION: u8 = 1;
const REQUEST: u8 = 0;
const REPLY: u8 = 1;

/// What a gateway says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Takes new flows (`/readiness` 200).
    Ready,
    /// Draining: keeps its flows, takes no new ones (`/readiness` 503 `draining`).
    Draining,
    /// Starting or otherwise not ready.
    NotReady,
    /// Draining with state sync: the other replicas of its set carry its flows and addresses, so it is to
    /// leave every route at once (`/readiness` 503 `handed over`).
    HandedOver,
}

impl State {
    fn code(self) -> u8 {
        match self {
            State::Ready => 0,
            State::Draining => 1,
            State::NotReady => 2,
            State::HandedOver => 3,
        }
    }

    fn from_code(code: u8) -> Option<State> {
        match code {
            0 => Some(State::Ready),
            1 => Some(State::Draining),
            2 => Some(State::NotReady),
            3 => Some(State::HandedOver),
            _ => None,
        }
    }
}

fn datagram(kind: u8, state: u8, nonce: u64) -> [u8; LEN] {
    let mut d = [0u8; LEN];
    d[..4].copy_from_slice(&MAGIC);
    d[4] = VERSION;
    d[5] = kind;
    d[6] = state;
    d[8..].copy_from_slice(&nonce.to_be_bytes());
    d
}

/// A request carrying `nonce`.
pub(crate) fn request(nonce: u64) -> [u8; LEN] {
    datagram(REQUEST, 0, nonce)
}

/// The nonce of a well-formed request; `None` for anything else.
pub(crate) fn parse_request(buf: &[u8]) -> Option<u64> {
    let d: &[u8; LEN] = buf.try_into().ok()?;
    (d[..4] == MAGIC && d[4] == VERSION && d[5] == REQUEST && d[6] == 0 && d[7] == 0)
        .then(|| nonce_of(d))
}

/// The reply to the request with `nonce`.
pub(crate) fn reply(nonce: u64, state: State) -> [u8; LEN] {
    datagram(REPLY, state.code(), nonce)
}

/// The state in a well-formed reply to the request with `nonce`; `None` for anything else (a late reply
/// to an earlier probe included).
pub(crate) fn parse_reply(buf: &[u8], nonce: u64) -> Option<State> {
    let d: &[u8; LEN] = buf.try_into().ok()?;
    if d[..4] != MAGIC || d[4] != VERSION || d[5] != REPLY || d[7] != 0 || nonce_of(d) != nonce {
        return None;
    }
    State::from_code(d[6])
}

fn nonce_of(d: &[u8; LEN]) -> u64 {
    let mut n = [0u8; 8];
    n.copy_from_slice(&d[8..]);
    u64::from_be_bytes(n)
}

/// What the responder has done since it started.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Requests answered.
    pub(crate) answered: AtomicU64,
    /// Datagrams that were not a well-formed request (dropped unanswered).
    pub(crate) malformed: AtomicU64,
}

/// Binds UDP `addr` (the health endpoint's address: same port number as its HTTP listener) and answers
/// probes with `state()` on a thread of its own.
pub(crate) fn serve(
    addr: SocketAddr,
    state: Arc<dyn Fn() -> State + Send + Sync>,
    counters: Arc<Counters>,
) -> std::io::Result<SocketAddr> {
    let socket = UdpSocket::bind(addr).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind UDP {addr} for the health probe: {e}"),
        )
    })?;
    let local = socket.local_addr()?;
    std::thread::Builder::new()
        .name("health-udp".into())
        .spawn(move || {
            // One byte more than a request, so that a longer datagram is seen as longer (and dropped).
            let mut buf = [0u8; LEN + 1];
            loop {
                let (n, from) = match socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "health probe socket: receive failed");
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        continue;
                    }
                };
                let Some(nonce) = parse_request(&buf[..n]) else {
                    counters.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                // A reply that cannot be sent (the client's port closed, buffer full) is a lost probe,
                // which the client counts.
                if socket.send_to(&reply(nonce, state()), from).is_ok() {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?;
    Ok(local)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn a_request_gets_a_reply_with_its_nonce_and_the_state() {
        let r = request(0x0102_0304_0506_0708);
        assert_eq!(&r[..8], b"EGHP\x01\x00\x00\x00");
        assert_eq!(parse_request(&r), Some(0x0102_0304_0506_0708));
        for s in [
            State::Ready,
            State::Draining,
            State::NotReady,
            State::HandedOver,
        ] {
            let a = reply(7, s);
            assert_eq!(parse_reply(&a, 7), Some(s));
            assert_eq!(parse_reply(&a, 8), None, "another probe's reply");
            assert_eq!(parse_request(&a), None, "a reply is no request");
        }
        assert_eq!(
            parse_reply(&r, 0x0102_0304_0506_0708),
            None,
            "a request is no reply"
        );
    }

    #[test]
    fn malformed_datagrams_are_not_requests() {
        let good = request(1);
        assert_eq!(parse_request(&good[..15]), None);
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(parse_request(&long), None);
        for i in 0..8 {
            let mut bad = good;
            bad[i] ^= 0x40;
            assert_eq!(parse_request(&bad), None, "byte {i}");
        }
        let mut unknown_state = reply(1, State::Ready);
        unknown_state[6] = 9;
        assert_eq!(parse_reply(&unknown_state, 1), None);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40), nonce: u64) {
            let _ = parse_request(&bytes);
            let _ = parse_reply(&bytes, nonce);
        }
    }

    #[test]
    fn the_responder_answers_requests_and_drops_the_rest() {
        let counters = Arc::new(Counters::default());
        let state: Arc<dyn Fn() -> State + Send + Sync> = Arc::new(|| State::Draining);
        let addr = serve("127.0.0.1:0".parse().unwrap(), state, counters.clone()).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.connect(addr).unwrap();
        client.send(b"GET /readiness HTTP/1.0\r\n\r\n").unwrap();
        client.send(&[0u8; LEN]).unwrap();
        let mut long = request(5).to_vec();
        long.push(0);
        client.send(&long).unwrap();
        client.send(&request(42)).unwrap();
        let mut buf = [0u8; 64];
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(n, LEN, "a reply is as long as the request");
        assert_eq!(parse_reply(&buf[..n], 42), Some(State::Draining));
        // The responder counts after it has sent: wait for the count to land.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while counters.answered.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(counters.answered.load(Ordering::Relaxed), 1);
        assert_eq!(counters.malformed.load(Ordering::Relaxed), 3);
    }
}
