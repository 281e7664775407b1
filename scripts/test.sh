#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit/property/integration tests, benchmark smoke
# runs, the demo, and a short fuzz run of every fuzz target. Installs what it needs first.
#
#   FUZZ_SECONDS=N   seconds per fuzz target (default 20; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
FUZZ_SECONDS=${FUZZ_SECONDS:-20}

step "install dependencies"
WANT_FUZZ=$([[ $FUZZ_SECONDS -gt 0 ]] && echo 1 || echo 0) ./scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, property, integration; release mode for the property and stress tests)"
# The namespace tests (crate `tests`) run in their own step below, as root with EGRESS_REQUIRE_NETNS=1.
cargo test --workspace --exclude tests --release --locked

step "benchmarks, one quick pass each (criterion test mode: checks they run, measures nothing)"
cargo test -p bench --benches --release --locked

step "the demo (README command 1) passes its own checks"
cargo run -q --release --locked -p gateway -- demo >/dev/null

step "container image: static binary, podman build FROM scratch, --version and check from the exported filesystem"
# The exported tree is also run as the gateway, as the image's user, by tests/tests/image.rs (below).
image_root="$PWD/target/image-root"
scripts/image.sh --export-dir "$image_root"
if [[ -x $image_root/egress-gateway ]]; then
  export EGRESS_IMAGE_ROOT=$image_root EGRESS_REQUIRE_IMAGE=1
fi

step "Kubernetes manifests (deploy/): schemas, egress-gateway check on the ConfigMaps, dashboard metrics"
scripts/validate-manifests.sh

if [[ -x scripts/namespace-tests.sh ]]; then
  step "network-namespace tests"
  scripts/namespace-tests.sh
fi

if [[ $FUZZ_SECONDS -gt 0 ]]; then
  if cargo fuzz --version >/dev/null 2>&1; then
    step "fuzz smoke run: ${FUZZ_SECONDS}s per target"
    # cargo-fuzz needs nightly-only rustc flags (-Z sanitizer); RUSTC_BOOTSTRAP=1 lets the stable toolchain
    # take them, so no nightly toolchain is needed.
    (cd forwarder-core && for t in $(RUSTC_BOOTSTRAP=1 cargo fuzz list); do
      echo "--- fuzz target $t"
      # New inputs go to fuzz/corpus/ (ignored by git); fuzz/seeds/ (the kept corpus, and every input that
      # once crashed a target) is read only.
      mkdir -p "fuzz/corpus/$t"
      log=$(mktemp)
      if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
          -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz target $t failed (crash or build error): see above and forwarder-core/fuzz/artifacts/$t" >&2
        exit 1
      fi
      grep -E '^(INFO: seed corpus|Done [0-9]+ runs|stat::number_of_executed_units)' "$log" || true
      rm -f "$log"
    done)
  else
    echo "SKIPPED: fuzz smoke run (cargo-fuzz could not be installed)"
  fi
fi

step "all checks passed"
