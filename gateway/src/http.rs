//! A minimal HTTP/1.1 server for the health and metrics endpoints: `GET` only, one short response per
//! connection, on its own thread. Kubelet probes and Prometheus scrapes need no more, and the data path
//! needs no async runtime.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) body: String,
}

impl Response {
    pub(crate) fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// Answers a request target (path with its `?query`, if any; see [`split`]).
pub(crate) type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// A request target's path and query (`/flows?pod=10.0.0.1` → `("/flows", "pod=10.0.0.1")`).
pub(crate) fn split(target: &str) -> (&str, &str) {
    target.split_once('?').unwrap_or((target, ""))
}

/// A whole HTTP/1.x response's status and body (for the clients: the agent's probes, `flows`); `None` when
/// it does not start with a status line.
pub(crate) fn parse_response(raw: &str) -> Option<(u16, &str)> {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body))
}

/// The value of `key` in a query (`a=1&b=2`), percent-decoding `%3A`-style escapes.
pub(crate) fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connections served at once at most (a thread each, 64 KiB of stack); more are refused with `503` at once
/// rather than queued behind them.
const MAX_IN_FLIGHT: usize = 512;

/// Binds `addr` (so that a taken port fails at start-up, with the address in the message) and serves
/// `handler`: each connection on a thread of its own, so that a client that connects and then stalls (for
/// up to the 2 s read timeout) holds up no one else — a kubelet probe, a scrape, another node's agent.
pub(crate) fn serve(
    name: &'static str,
    addr: SocketAddr,
    handler: Handler,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} for {name}: {e}"))
    })?;
    let local = listener.local_addr()?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name(format!("http-{name}"))
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                            in_flight.fetch_sub(1, Ordering::AcqRel);
                            refuse(stream);
                            continue;
                        }
                        let (handler, done) = (Arc::clone(&handler), Arc::clone(&in_flight));
                        let spawned = std::thread::Builder::new()
                            .name(format!("http-{name}-conn"))
                            .stack_size(64 * 1024)
                            .spawn(move || {
                                if let Err(e) = answer(stream, &handler) {
                                    tracing::debug!(endpoint = name, error = %e, "http request failed");
                                }
                                done.fetch_sub(1, Ordering::AcqRel);
                            });
                        if let Err(e) = spawned {
                            tracing::warn!(endpoint = name, error = %e, "http: cannot start a thread");
                            in_flight.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(endpoint = name, error = %e, "http accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok(local)
}

/// Answers `503` without reading the request (too many connections in flight).
fn refuse(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let body = "busy: too many connections\n";
    let _ = write!(
        stream,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn answer(stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.by_ref().take(8192).read_line(&mut line)?;
    // Skip the headers.
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.by_ref().take(8192).read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/");
    let resp = if method == "GET" || method == "HEAD" {
        handler(target)
    } else {
        Response::text(405, "only GET\n")
    };
    let reason = match resp.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut w = stream;
    write!(
        w,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason,
        resp.content_type,
        resp.body.len()
    )?;
    if method != "HEAD" {
        w.write_all(resp.body.as_bytes())?;
    }
    w.flush()
}

use std::io::Read;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_status_and_body() {
        let h: Handler = Arc::new(|p| match split(p).0 {
            "/readiness" => Response::text(503, "draining\n"),
            "/livez" => Response::text(200, "ok\n"),
            _ => Response::text(404, "no\n"),
        });
        let addr = serve("test", "127.0.0.1:0".parse().unwrap(), h).unwrap();
        let r = get(addr, "/readiness");
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.ends_with("draining\n"));
        assert!(get(addr, "/livez?verbose=1").starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn a_stalled_client_holds_up_no_one_else() {
        let h: Handler = Arc::new(|_| Response::text(200, "ready\n"));
        let addr = serve("test", "127.0.0.1:0".parse().unwrap(), h).unwrap();
        // Connections that send nothing (or half a request) and wait.
        let stalled: Vec<TcpStream> = (0..10)
            .map(|i| {
                let mut s = TcpStream::connect(addr).unwrap();
                if i % 2 == 1 {
                    s.write_all(b"GET /readi").unwrap();
                }
                s
            })
            .collect();
        let started = std::time::Instant::now();
        for _ in 0..5 {
            assert!(get(addr, "/readiness").starts_with("HTTP/1.1 200"));
        }
        // Before the change every request queued behind each stalled one's 2 s read timeout. Generous for a
        // loaded machine, far below one timeout.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        drop(stalled);
    }

    #[test]
    fn responses_parse_into_status_and_body() {
        assert_eq!(
            parse_response("HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\ndraining\n"),
            Some((503, "draining\n"))
        );
        assert_eq!(parse_response("HTTP/1.0 200 OK\r\n"), Some((200, "")));
        assert_eq!(parse_response("garbage"), None);
    }

    #[test]
    fn queries_are_split_and_decoded() {
        assert_eq!(split("/flows?pod=1&x"), ("/flows", "pod=1&x"));
        assert_eq!(split("/flows"), ("/flows", ""));
        let q = "pod=10.0.0.1&dst=%5B2001%3Adb8%3A%3A1%5D&flag&bad=%zz%4";
        assert_eq!(query_value(q, "pod").as_deref(), Some("10.0.0.1"));
        assert_eq!(query_value(q, "dst").as_deref(), Some("[2001:db8::1]"));
        assert_eq!(query_value(q, "flag").as_deref(), Some(""));
        assert_eq!(query_value(q, "bad").as_deref(), Some("%zz%4"));
        assert_eq!(query_value(q, "none"), None);
    }
}
