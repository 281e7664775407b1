#!/usr/bin/env bash
# The soak and fault campaign (tests/src/bin/soak/, docs/soak.md): mixed and hostile traffic through two syncing
# gateway replicas steered by the real node agent, faults injected on a schedule, invariants checked throughout,
# one summary at the end. Needs root (network namespaces).
#
#   SOAK_SECONDS=N        seconds of traffic (default 120; the figures in README.md come from SOAK_SECONDS=3600)
#   SOAK_FAULT_SECONDS=N  seconds between faults (default 20)
#   SOAK_REPORT=FILE      also write the summary to FILE
#
# After the traffic the run waits up to 3 minutes for the flow tables to empty (the soak's UDP timeout is 120 s),
# so the whole run takes SOAK_SECONDS + about 4 minutes. Exit status: 0 every invariant held, 1 one broke,
# 77 skipped (not root, reported as "SKIPPED: soak: ..."), 130 interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/skip.sh
source scripts/skip.sh

if [[ $(id -u) -ne 0 ]]; then
  if [[ ${EGRESS_REQUIRE_NETNS:-0} == 1 ]]; then
    echo "soak: needs root (CAP_NET_ADMIN) for its network namespaces, and EGRESS_REQUIRE_NETNS=1 is set" >&2
    exit 1
  fi
  skipped "soak" "not root: network namespaces need CAP_NET_ADMIN"
  exit "$SKIP_STATUS"
fi

./scripts/install-deps.sh
cargo build --release --locked -p gateway -p tests --bin egress-gateway --bin soak
release=${CARGO_TARGET_DIR:-target}/release
EGRESS_GATEWAY_BIN=${EGRESS_GATEWAY_BIN:-$(cd "$release" && pwd)/egress-gateway}
export EGRESS_GATEWAY_BIN
exec "$release/soak"
