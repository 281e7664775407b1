//! External processes (iperf3, the gateway binary) started inside a namespace; killed on drop.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// A child process started with `ip netns exec`; stdout and stderr go to a log file. Dropping it sends
/// SIGTERM to its process group, then SIGKILL after two seconds. If the thread is panicking (a failing
/// test), the tail of the log is printed first.
#[derive(Debug)]
pub struct Process {
    child: Child,
    what: String,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Process {
    /// Starts `command` (program, arguments) in namespace `netns`, output appended to `log`.
    pub fn spawn_in_netns(netns: &str, command: &[&str], log: PathBuf) -> Result<Self> {
        let Some(program) = command.first() else {
            crate::bail!("empty command");
        };
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(command)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {program} in {netns}"))?;
        Ok(Self {
            child,
            what: format!("{} (in {netns})", command.join(" ")),
            log,
            exited: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The command line, for messages.
    pub fn describe(&self) -> &str {
        &self.what
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    /// Waits at most `timeout` for it to exit (polling every 10 ms).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "{} did not exit within {timeout:?}; log tail:\n{}",
                    self.what,
                    self.log_tail(20)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its whole output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of its output (reads at most the last 64 KiB of the log).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: i32) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group we created (process_group(0)
            // made the child its leader); it has no memory-safety preconditions.
            unsafe {
                libc::kill(-pgid, signal);
            }
        }
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`; returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.try_wait() {
            return Some(s);
        }
        self.signal(libc::SIGTERM);
        if let Ok(s) = self.wait_timeout(grace) {
            return Some(s);
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} ({}):\n{}\n----",
                self.what,
                self.log.display(),
                self.log_tail(40)
            );
        }
        self.stop(Duration::from_secs(2));
    }
}

/// The last `lines` lines of the file at `path`.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A directory under the system temp dir, removed (with its content) on drop unless `EGRESS_KEEP_LOGS=1`.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/<name>` (emptied first if it exists).
    pub fn new(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("EGRESS_KEEP_LOGS").as_deref() == Ok("1") || std::thread::panicking() {
            eprintln!("harness: logs kept in {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
