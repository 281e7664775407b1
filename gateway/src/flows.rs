//! `egress-gateway flows`: the live flows of a running gateway, read from its admin endpoint
//! (`GET /flows` on `admin.listen`), as a table or as the JSON lines the endpoint sends.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// The filters, as given on the command line.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query {
    pub(crate) pod: Option<IpAddr>,
    pub(crate) egress_port: Option<u16>,
    pub(crate) dst: Option<IpAddr>,
    pub(crate) limit: Option<usize>,
}

impl Query {
    fn target(&self) -> String {
        let mut q = Vec::new();
        if let Some(p) = self.pod {
            q.push(format!("pod={p}"));
        }
        if let Some(p) = self.egress_port {
            q.push(format!("egress_port={p}"));
        }
        if let Some(d) = self.dst {
            q.push(format!("dst={d}"));
        }
        if let Some(l) = self.limit {
            q.push(format!("limit={l}"));
        }
        if q.is_empty() {
            "/flows".into()
        } else {
            format!("/flows?{}", q.join("&"))
        }
    }
}

/// Fetches and prints; exit 1 when the gateway cannot be reached or refuses the query.
pub(crate) fn run(admin: SocketAddr, query: &Query, json: bool) -> ExitCode {
    match fetch(admin, &query.target()) {
        Ok(body) => {
            if json {
                print!("{body}");
            } else {
                print!("{}", table(&body));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("egress-gateway flows: {e}");
            ExitCode::FAILURE
        }
    }
}

fn fetch(addr: SocketAddr, target: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| {
        format!(
            "cannot reach the gateway's admin endpoint at {addr}: {e} (is the gateway running, and is \
             admin.listen {addr}? inside the pod: kubectl exec POD -- egress-gateway flows)"
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    match crate::http::parse_response(&raw) {
        Some((200, body)) => Ok(body.to_string()),
        Some((status, body)) => Err(format!("the gateway answered {status}: {}", body.trim())),
        None => Err(format!("not an HTTP answer from {addr}")),
    }
}

/// The value of `"key":` in one of our JSON lines (strings unquoted; no nesting, no escapes in values).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let Some(at) = line.find(&pat) else {
        return "";
    };
    let rest = &line[at + pat.len()..];
    if let Some(s) = rest.strip_prefix('"') {
        s.split('"').next().unwrap_or("")
    } else {
        rest.split([',', '}']).next().unwrap_or("")
    }
}

/// The lines as an aligned table.
fn table(body: &str) -> String {
    let header = [
        "POD",
        "EGRESS",
        "DESTINATION",
        "PROTO",
        "UPLINK",
        "NODE",
        "SINCE",
        "PKTS OUT/IN",
        "BYTES OUT/IN",
    ];
    let rows: Vec<[String; 9]> = body
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let name = field(l, "pod_name");
            [
                if name.is_empty() {
                    field(l, "pod").into()
                } else {
                    format!("{} {name}", field(l, "pod"))
                },
                field(l, "egress").into(),
                field(l, "dst").into(),
                field(l, "proto").into(),
                field(l, "uplink").into(),
                field(l, "node").into(),
                field(l, "start").into(),
                format!("{}/{}", field(l, "packets_out"), field(l, "packets_in")),
                format!("{}/{}", field(l, "bytes_out"), field(l, "bytes_in")),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied(), &mut out);
    for r in &rows {
        line(&mut r.iter().map(String::as_str), &mut out);
    }
    out.push_str(&format!("{} flows\n", rows.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_tables() {
        let q = Query {
            pod: Some("10.244.1.1".parse().unwrap()),
            egress_port: Some(40000),
            dst: None,
            limit: Some(5),
        };
        assert_eq!(
            q.target(),
            "/flows?pod=10.244.1.1&egress_port=40000&limit=5"
        );
        assert_eq!(Query::default().target(), "/flows");
        let body = "{\"event\":\"live\",\"start\":\"2026-11-26T18:30:01.216Z\",\"last\":\"x\",\"proto\":\"udp\",\"pod\":\"10.244.1.1:5000\",\"node\":\"172.18.0.11\",\"egress\":\"203.0.113.10:40000\",\"dst\":\"198.51.100.10:53\",\"uplink\":\"dmz\",\"packets_out\":3,\"bytes_out\":120,\"packets_in\":2,\"bytes_in\":300}\n";
        let t = table(body);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("POD"), "{t}");
        assert!(
            lines[1].starts_with("10.244.1.1:5000  203.0.113.10:40000  198.51.100.10:53"),
            "{t}"
        );
        assert!(lines[1].ends_with("3/2          120/300"), "{t}");
        assert_eq!(lines[2], "1 flows");
        let named = body.replace("\"node\"", "\"pod_name\":\"app/web\",\"node\"");
        assert!(table(&named)
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("10.244.1.1:5000 app/web  203.0.113.10:40000"));
    }

    #[test]
    fn an_unreachable_gateway_says_where_it_looked() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = fetch(addr, "/flows").unwrap_err();
        assert!(
            e.contains(&addr.to_string()) && e.contains("admin.listen"),
            "{e}"
        );
    }
}
