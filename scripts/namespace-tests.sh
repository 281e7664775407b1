#!/usr/bin/env bash
# Network-namespace tests (tests/: the harness, the kernel gateway path, the userspace gateway once
# `egress-gateway run` exists), both namespace demos (demo-netns, demo-kube) and a quick pass of the end-to-end
# benchmark. Called by scripts/test.sh.
# Needs root (CAP_NET_ADMIN); without it every namespace test prints SKIPPED (unless EGRESS_REQUIRE_NETNS=1,
# which makes them fail), the rest of this script does not run, and it exits 77 (skipped), not 0.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/skip.sh
source scripts/skip.sh

if [[ $(id -u) -ne 0 && "${EGRESS_REQUIRE_NETNS:-0}" != 1 ]]; then
  cargo test --release --locked -p tests -- --show-output
  skipped "netns" "not root: the namespace tests said SKIPPED (above); demo-netns and e2e --quick did not run"
  exit "$SKIP_STATUS"
fi
# As root, a namespace test that cannot run is a failure, not a skip.
export EGRESS_REQUIRE_NETNS=1

# The userspace-mode tests use target/release/egress-gateway (missing, it fails them here).
cargo build --release --locked -p gateway
cargo test --release --locked -p tests -- --show-output

# README command 1 in namespaces: the demo's own checks (exit 1 if a server saw a non-egress source, a probe
# failed, or hostile input was not dropped and counted).
cargo run -q --release --locked -p tests --bin demo-netns

# kube-apiserver, etcd and kubectl are built (scripts/kube-apiserver.sh build).
kube_binaries_built() {
  local KUBE_BIN KUBECTL
  eval "$(scripts/kube-apiserver.sh env)"
  [[ -x $KUBE_BIN/kube-apiserver && -x $KUBE_BIN/etcd && -x $KUBECTL ]]
}

# The same scenario driven through a real kube-apiserver (`scripts/demo.sh --kube`, ~20 s): the agents follow
# kubectl, and traffic shows it. Needs the API server's binaries (the kube stage of scripts/test.sh builds them).
if kube_binaries_built; then
  cargo run -q --release --locked -p tests --bin demo-kube
elif [[ ${EGRESS_REQUIRE_KUBE:-0} == 1 ]]; then
  echo "demo-kube: kube-apiserver, etcd or kubectl is not built (scripts/kube-apiserver.sh build)" >&2
  exit 1
else
  skipped "netns: demo-kube" "kube-apiserver, etcd or kubectl is not built (scripts/kube-apiserver.sh build needs Go)"
fi

# The benchmark's smoke run: a few seconds per measurement, both modes; any measurement that cannot run
# fails this step (--strict). The numbers themselves are not judged here (shared, noisy machines).
cargo run --release --locked -p bench --bin e2e -- --quick --strict

# The soak and fault campaign's short version (scripts/soak.sh, docs/soak.md): 3 minutes of mixed and hostile
# traffic with a fault every 12 s (each of the ten once), then up to 3 minutes for the tables to empty;
# fails if an invariant broke.
SOAK_SECONDS=${SOAK_SECONDS:-180} SOAK_FAULT_SECONDS=${SOAK_FAULT_SECONDS:-12} scripts/soak.sh
