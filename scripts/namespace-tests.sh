#!/usr/bin/env bash
# Network-namespace tests (tests/: the harness, the kernel gateway path, the userspace gateway once
# `egress-gateway run` exists) and a quick pass of the end-to-end benchmark. Called by scripts/test.sh.
# Needs root (CAP_NET_ADMIN); without it every namespace test prints SKIPPED, unless EGRESS_REQUIRE_NETNS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 && "${EGRESS_REQUIRE_NETNS:-0}" != 1 ]]; then
  echo "SKIPPED: network-namespace tests need root (CAP_NET_ADMIN)"
  exit 0
fi
# As root, a namespace test that cannot run is a failure, not a skip.
export EGRESS_REQUIRE_NETNS=1

# The userspace-mode tests use target/release/egress-gateway (they skip while it has no `run`).
cargo build --release --locked -p gateway
cargo test --release --locked -p tests -- --show-output

# README command 1 in namespaces: the demo's own checks (exit 1 if a server saw a non-egress source, a probe
# failed, or hostile input was not dropped and counted).
cargo run -q --release --locked -p tests --bin demo-netns

# The benchmark's smoke run: a few seconds per measurement. A userspace column that cannot run is shown
# as an error per line; only a failing kernel-mode measurement fails this step.
cargo run --release --locked -p bench --bin e2e -- --quick
