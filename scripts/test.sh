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
cargo test --workspace --release --locked

step "benchmarks, one quick pass each (criterion test mode: checks they run, measures nothing)"
cargo test -p bench --benches --release --locked

step "the demo (README command 1) passes its own checks"
cargo run -q --release --locked -p gateway -- demo >/dev/null

if [[ -x scripts/namespace-tests.sh ]]; then
  step "network-namespace tests"
  scripts/namespace-tests.sh
fi

if [[ $FUZZ_SECONDS -gt 0 ]]; then
  if cargo fuzz --version >/dev/null 2>&1 && rustup toolchain list | grep -q nightly; then
    step "fuzz smoke run: ${FUZZ_SECONDS}s per target"
    (cd forwarder-core && for t in $(cargo +nightly fuzz list); do
      echo "--- fuzz target $t"
      cargo +nightly fuzz run "$t" "fuzz/seeds/$t" -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 2>&1 \
        | grep -E '^(stat::number_of_executed_units|stat::peak_rss|INFO: seed corpus|==[0-9]+==|SUMMARY|Done)' || true
      # cargo fuzz exits non-zero on a crash; pipefail is off inside the pipeline above, so check artifacts.
      if compgen -G "fuzz/artifacts/$t/crash-*" >/dev/null; then
        echo "fuzz target $t crashed: see forwarder-core/fuzz/artifacts/$t" >&2
        exit 1
      fi
    done)
  else
    echo "SKIPPED: fuzz smoke run (no nightly toolchain or cargo-fuzz could not be installed)"
  fi
fi

step "all checks passed"
