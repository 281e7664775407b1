//! Whether this process may build namespaces, and the skip-or-fail rule for tests that need them.

use std::sync::OnceLock;

use crate::cmd;
use crate::netns;

/// Proof that namespaces can be made here (returned by [`require_netns`]).
#[derive(Debug, Clone, Copy)]
pub struct NetnsAccess(());

/// Environment variable: when `1`, a test that cannot make namespaces fails instead of skipping (CI).
pub const REQUIRE_ENV: &str = "EGRESS_REQUIRE_NETNS";

static PROBE: OnceLock<Result<(), String>> = OnceLock::new();

/// Checks once per process that namespaces can be made (CAP_NET_ADMIN and `ip netns add` works), and
/// sweeps namespaces left by dead harness processes. Returns `Some` when the test can go on. Otherwise
/// prints `SKIPPED <test>: needs CAP_NET_ADMIN (run as root)` and returns `None` — or panics with that
/// reason when `EGRESS_REQUIRE_NETNS=1`.
pub fn require_netns(test: &str) -> Option<NetnsAccess> {
    let probe = PROBE.get_or_init(probe);
    match probe {
        Ok(()) => Some(NetnsAccess(())),
        Err(why) => {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!("{test}: needs CAP_NET_ADMIN (run as root): {why} ({REQUIRE_ENV}=1 makes this a failure)");
            }
            skipped(test, &format!("needs CAP_NET_ADMIN (run as root): {why}"));
            None
        }
    }
}

/// Prints `SKIPPED <test>: <why>` (stdout and stderr). libtest captures a passing test's output: see it
/// with `cargo test -- --show-output` (or `--nocapture`).
pub fn skipped(test: &str, why: &str) {
    println!("SKIPPED {test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
}

/// The name of the running test (libtest names each test's thread after it).
pub fn current_test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}

/// Skips (returns from) the calling test unless namespaces can be made; see [`require_netns`].
#[macro_export]
macro_rules! require_netns {
    () => {
        match $crate::require_netns(&$crate::privilege::current_test_name()) {
            Some(access) => access,
            None => return,
        }
    };
}

/// Skips (returns from) the calling test unless the userspace gateway binary with `run` exists; evaluates
/// to the [`GatewayMode::Userspace`](crate::GatewayMode::Userspace) to use. Build it with
/// `cargo build --release -p gateway` (or set `EGRESS_GATEWAY_BIN`).
#[macro_export]
macro_rules! require_userspace_gateway {
    () => {
        match $crate::gateway::userspace_binary_with_run() {
            Ok(binary) => $crate::GatewayMode::Userspace { binary },
            Err(why) => {
                // In CI (EGRESS_REQUIRE_NETNS=1) the binary is built first: a missing one is a failure.
                if std::env::var("EGRESS_REQUIRE_NETNS").as_deref() == Ok("1") {
                    panic!("{}: the userspace gateway is required but unusable: {why}",
                        $crate::privilege::current_test_name());
                }
                println!("SKIPPED {}: {why}", $crate::privilege::current_test_name());
                return;
            }
        }
    };
}

fn probe() -> Result<(), String> {
    if !has_cap_net_admin() {
        return Err("CAP_NET_ADMIN is not in the effective capability set".to_owned());
    }
    netns::sweep_stale();
    let name = format!("{}-probe", netns::unique_prefix());
    cmd::run("ip", &["netns", "add", &name]).map_err(|e| e.to_string())?;
    cmd::run("ip", &["netns", "del", &name]).map_err(|e| e.to_string())?;
    Ok(())
}

/// CAP_NET_ADMIN (bit 12) in CapEff of /proc/self/status.
fn has_cap_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}
