//! A stand-in (binary `fake-gateway`) for `egress-gateway run --config FILE` that forwards nothing: it reads the health and
//! metrics addresses from the configuration and answers `GET /readiness` (200) and `GET /metrics`. The
//! harness's own tests use it to check the userspace-mode plumbing (configuration file, process in the
//! gateway namespace, readiness polling, metrics, stop on drop) without the real binary.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};

/// The `listen:` address in the line of the configuration that starts with `key:`.
fn listen_addr(config: &str, key: &str) -> Option<SocketAddr> {
    let line = config.lines().find(|l| l.trim_start().starts_with(key))?;
    let rest = &line[line.find("listen:")? + "listen:".len()..];
    rest.trim()
        .trim_end_matches('}')
        .split([',', ' ', '}'])
        .find(|w| !w.is_empty())?
        .parse()
        .ok()
}

fn serve(addr: SocketAddr, path: &'static str, body: &'static str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(&conn);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // Skip the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let (status, text) = if request.split_whitespace().nth(1) == Some(path) {
                ("200 OK", body)
            } else {
                ("404 Not Found", "not found\n")
            };
            let mut w = &conn;
            let _ = write!(
                w,
                "HTTP/1.0 {status}\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
        }
    });
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config_path = match args.as_slice() {
        [_, run, flag, path] if run == "run" && flag == "--config" => path.clone(),
        _ => {
            eprintln!("usage: fake_gateway run --config FILE");
            std::process::exit(2);
        }
    };
    let config = std::fs::read_to_string(&config_path).unwrap_or_else(|e| {
        eprintln!("{config_path}: {e}");
        std::process::exit(1);
    });
    let (Some(health), Some(metrics)) = (
        listen_addr(&config, "health:"),
        listen_addr(&config, "metrics:"),
    ) else {
        eprintln!("{config_path}: no health or metrics listen address");
        std::process::exit(1);
    };
    if let Err(e) = serve(health, "/readiness", "ready\n").and_then(|()| {
        serve(
            metrics,
            "/metrics",
            "# TYPE egress_fake_up gauge\negress_fake_up 1\negress_packets_total{uplink=\"dmz\"} 0\n",
        )
    }) {
        eprintln!("listen: {e}");
        std::process::exit(1);
    }
    println!("fake gateway: health on {health}, metrics on {metrics}, config {config_path}");
    loop {
        std::thread::park();
    }
}
