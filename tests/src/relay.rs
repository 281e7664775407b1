//! A TCP relay between two namespaces: it listens on an address inside one and carries every connection
//! to an address as seen from the other. The API server of [`kube`](crate::kube) listens on one
//! namespace's loopback only; a relay on another node's loopback, on the same port, lets that node's agent
//! use the same kubeconfig (the server's certificate names 127.0.0.1).
//!
//! Bytes are copied as they come (TLS and HTTP/2 pass through untouched), one thread per direction. A
//! connection the far side refuses is closed at once, as the server would. Dropping the relay stops
//! accepting and shuts every relayed connection down.

use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Context, Result};
use crate::netns::{self, Netns};

/// How long the far side has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Listens in one namespace, connects from another; stops on drop.
#[derive(Debug)]
pub struct TcpRelay {
    stop: Arc<AtomicBool>,
    /// One handle on every relayed socket, to shut them down on drop.
    live: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpRelay {
    /// Listens on `listen` inside `from` and relays each connection to `target` inside `to`.
    pub fn start(from: &Netns, listen: SocketAddr, to: &Netns, target: SocketAddr) -> Result<Self> {
        // The socket belongs to the namespace it was made in, whichever thread uses it later.
        let listener = from
            .run(Duration::from_secs(5), move || TcpListener::bind(listen))?
            .with_context(|| format!("listen on {listen} in {}", from.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let to = to.name().to_owned();
        let acceptor = {
            let (stop, live) = (Arc::clone(&stop), Arc::clone(&live));
            std::thread::Builder::new()
                .name(format!("relay {listen}"))
                .spawn(move || accept(&listener, &to, target, &stop, &live))
                .context("spawn the relay's thread")?
        };
        Ok(Self {
            stop,
            live,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        // The copying threads see end-of-file or an error and end.
        if let Ok(live) = self.live.lock() {
            for s in live.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Accepts until `stop` (polling every 50 ms).
fn accept(
    listener: &TcpListener,
    to: &str,
    target: SocketAddr,
    stop: &AtomicBool,
    live: &Mutex<Vec<TcpStream>>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                // The far end is connected from a thread inside its namespace.
                let upstream = netns::spawn_in(to, move || {
                    TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
                })
                .and_then(|t| t.join_timeout(CONNECT_TIMEOUT + Duration::from_secs(1)));
                match upstream {
                    Ok(Ok(server)) => {
                        if let Err(e) = relay(client, server, live) {
                            eprintln!("relay to {target}: {e}");
                        }
                    }
                    // Closing the client's connection tells it what the server would have.
                    Ok(Err(_)) | Err(_) => drop(client),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                eprintln!("relay on {target}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Copies both ways on two threads; each passes the end of its stream on as a half-close.
fn relay(client: TcpStream, server: TcpStream, live: &Mutex<Vec<TcpStream>>) -> Result<()> {
    client.set_nonblocking(false)?;
    if let Ok(mut live) = live.lock() {
        live.push(client.try_clone()?);
        live.push(server.try_clone()?);
    }
    for (mut from, mut to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
        std::thread::Builder::new()
            .name("relay copy".into())
            .spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            })
            .context("spawn a relay thread")?;
    }
    Ok(())
}
