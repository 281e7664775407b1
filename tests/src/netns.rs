//! Named network namespaces that remove themselves, and running Rust code or processes inside them.
//!
//! Names are `eg<tok><pid>-<n>-<role>`: `<tok>` (three letters from this process's pid namespace) and the
//! pid keep two processes apart — also processes in different containers sharing one kernel and one
//! `/var/run/netns` — and the counter `n` keeps two topologies of one process apart. A namespace is
//! deleted when its [`Netns`] is dropped (also while a panic unwinds); namespaces left by a process of
//! this pid namespace that no longer runs (killed with SIGKILL) are swept the next time a harness starts
//! ([`sweep_stale`]). Only names of that exact shape with this pid namespace's token are ever deleted.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cmd;
use crate::error::{Context, Error, Result};
use crate::process::Process;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh prefix `eg<tok><pid>-<n>` for one topology: unique in this process and among live processes.
pub fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("eg{}{}-{n}", pidns_token(), std::process::id())
}

/// Three letters derived from this process's pid namespace (`/proc/self/ns/pid`), so that equal pids in
/// two containers give different names.
pub fn pidns_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let link = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let inode: u64 = link
            .chars()
            .filter(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        let mut v = inode % (26 * 26 * 26);
        let mut t = String::new();
        for _ in 0..3 {
            t.push(char::from(b'a' + u8::try_from(v % 26).unwrap_or(0)));
            v /= 26;
        }
        t
    })
}

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Where `ip netns exec <ns>` finds files it bind-mounts over `/etc` for the command (`/etc/netns/<ns>/hosts`
/// over `/etc/hosts`; ip-netns(8)).
pub const ETC_DIR: &str = "/etc/netns";

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with its loopback up.
    pub fn new(name: &str) -> Result<Self> {
        cmd::run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>` (arguments split on whitespace); returns stdout.
    pub fn ip(&self, args: &str) -> Result<String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(cmd::words(args));
        cmd::run("ip", &v)
    }

    /// `ip netns exec <ns> <command…>` (split on whitespace); returns stdout, error on non-zero exit.
    pub fn exec(&self, command: &str) -> Result<String> {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend(cmd::words(command));
        cmd::run("ip", &v)
    }

    /// Like [`exec`](Self::exec) with explicit arguments (for arguments that contain spaces).
    pub fn exec_args(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend_from_slice(args);
        cmd::run("ip", &v)
    }

    /// `/etc/hosts` of the commands run with `ip netns exec` in this namespace (its [`ETC_DIR`] file, removed
    /// with the namespace): each `(name, address)` on a line.
    pub fn set_hosts(&self, hosts: &[(String, std::net::IpAddr)]) -> Result<()> {
        let dir = PathBuf::from(ETC_DIR).join(&self.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (name, ip) in hosts {
            text.push_str(&format!("{ip} {name}\n"));
        }
        let path = dir.join("hosts");
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }

    /// Sets a sysctl inside the namespace (`key` with dots, interface names may contain dots: give them
    /// with `/`, as `sysctl` wants: `net.ipv4.conf.egress/calico.rp_filter`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec_args(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// The MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> Result<String> {
        let out = self.ip(&format!("-o link show dev {dev}"))?;
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .map(str::to_owned)
            .ok_or_else(|| Error::msg(format!("{}: no MAC address on {dev}: {out}", self.name)))
    }

    /// Runs `f` on a new thread that has entered this namespace (sockets it opens live here) and waits
    /// at most `timeout` for its result. A panic in `f` becomes an error carrying the panic message.
    pub fn run<T, F>(&self, timeout: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.thread(f)?.join_timeout(timeout)
    }

    /// Starts `f` on a new thread inside this namespace and returns at once.
    pub fn thread<T, F>(&self, f: F) -> Result<NsThread<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        spawn_in(&self.name, f)
    }

    /// Spawns `command` (program and arguments) inside this namespace, output going to `log`; the
    /// returned guard kills it on drop.
    pub fn spawn(&self, command: &[&str], log: PathBuf) -> Result<Process> {
        Process::spawn_in_netns(&self.name, command, log)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd::run("ip", &["netns", "del", &self.name]) {
            eprintln!("harness: cannot delete namespace {}: {e}", self.name);
        }
        remove_etc(&self.name);
    }
}

/// Removes the namespace's [`ETC_DIR`] files, if it has any.
fn remove_etc(name: &str) {
    let dir = PathBuf::from(ETC_DIR).join(name);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("harness: cannot remove {}: {e}", dir.display());
        }
    }
}

/// Starts `f` on a thread that entered the namespace `name` (by its handle in [`NETNS_DIR`]).
pub fn spawn_in<T, F>(name: &str, f: F) -> Result<NsThread<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("{NETNS_DIR}/{name}");
    let file = File::open(&path).with_context(|| format!("open {path}"))?;
    let (entered_tx, entered_rx) = mpsc::channel::<Result<()>>();
    let (result_tx, result_rx) = mpsc::channel::<T>();
    let thread_name = format!("ns {name}");
    let handle = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            // SAFETY: setns only reads the descriptor, which `file` keeps open for the call; it changes the
            // network namespace of this thread only (CLONE_NEWNET is allowed in multi-threaded processes).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                // The receiver waits for this message; if it is gone nobody needs it.
                let _ = entered_tx.send(Err(Error::msg(format!("setns({path}): {err}"))));
                return;
            }
            drop(file);
            let _ = entered_tx.send(Ok(()));
            let value = f();
            // The receiver may have timed out and gone; then the value is not wanted.
            let _ = result_tx.send(value);
        })
        .context("spawn thread")?;
    match entered_rx.recv() {
        Ok(Ok(())) => Ok(NsThread {
            name: name.to_owned(),
            handle: Some(handle),
            result: result_rx,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::msg(format!("thread for namespace {name} died"))),
    }
}

/// A thread running inside a namespace; [`join_timeout`](Self::join_timeout) collects its result.
#[derive(Debug)]
pub struct NsThread<T> {
    name: String,
    handle: Option<JoinHandle<()>>,
    result: mpsc::Receiver<T>,
}

impl<T> NsThread<T> {
    /// Waits at most `timeout` for the thread's result. A panic becomes an error with its message; on
    /// timeout the thread is left running (detached).
    pub fn join_timeout(mut self, timeout: Duration) -> Result<T> {
        match self.result.recv_timeout(timeout) {
            Ok(v) => {
                if let Some(h) = self.handle.take() {
                    let _ = h.join();
                }
                Ok(v)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::msg(format!(
                "thread in namespace {} did not finish within {timeout:?}",
                self.name
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let msg = match self.handle.take().map(JoinHandle::join) {
                    Some(Err(payload)) => panic_message(payload.as_ref()),
                    _ => "exited without a result".to_owned(),
                };
                Err(Error::msg(format!(
                    "thread in namespace {} panicked: {msg}",
                    self.name
                )))
            }
        }
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Names of all namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>> {
    let out = cmd::run("ip", &["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// The (token, pid) in a harness namespace name `eg<tok><pid>-<n>-<role>`, or `None` for any other name.
pub fn harness_owner(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix("eg")?;
    let (owner, rest) = rest.split_once('-')?;
    let (n, role) = rest.split_once('-')?;
    if role.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if owner.len() < 4 || !owner.is_char_boundary(3) {
        return None;
    }
    let (token, pid) = owner.split_at(3);
    if !token.bytes().all(|b| b.is_ascii_lowercase()) || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((token, pid.parse().ok()?))
}

/// Deletes harness namespaces of this pid namespace whose process is gone (left by a killed run), and
/// ones carrying this process's pid that exist before this process made any (a recycled pid). Called once
/// per process by [`require_netns`](crate::require_netns). Never touches names of another shape, of
/// another pid namespace (whose processes this one cannot see), or of live processes.
pub fn sweep_stale() {
    let Ok(names) = list() else { return };
    let me = std::process::id();
    for name in names {
        let Some((token, pid)) = harness_owner(&name) else {
            continue;
        };
        if token != pidns_token() {
            continue;
        }
        let alive = pid != me && std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            eprintln!("harness: removing stale namespace {name} (its process {pid} is gone)");
            let _ = cmd::run("ip", &["netns", "del", &name]);
        }
    }
    // /etc/netns files of such namespaces
    let Ok(dirs) = std::fs::read_dir(ETC_DIR) else {
        return;
    };
    for entry in dirs.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((token, pid)) = harness_owner(&name) else {
            continue;
        };
        if token == pidns_token() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_etc(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_names() {
        assert_eq!(harness_owner("egabc123-4-node1"), Some(("abc", 123)));
        assert_eq!(harness_owner("egabc123-4-ul"), Some(("abc", 123)));
        assert_eq!(harness_owner("egabc123-x-ul"), None);
        assert_eq!(harness_owner("egabc123-4-"), None);
        assert_eq!(harness_owner("eg123-4-ul"), None);
        assert_eq!(harness_owner("egress"), None);
        assert_eq!(harness_owner("other-1-2"), None);
    }

    #[test]
    fn prefixes_are_unique_and_parse() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        let name = format!("{a}-node1");
        let (tok, pid) = harness_owner(&name).unwrap();
        assert_eq!((tok, pid), (pidns_token(), std::process::id()));
    }
}
