#!/usr/bin/env bash
# Runs the core's benchmarks and prints a one-line-per-benchmark summary (median time and throughput).
# These are the numbers quoted in README.md. Run on an otherwise idle machine; each criterion benchmark
# takes a few seconds, the conntrack and pipeline ones build a 1 M-flow table first.
#
#   scripts/bench.sh [criterion filter]      e.g. scripts/bench.sh pipeline_established
set -euo pipefail
cd "$(dirname "$0")/.."
filter=${1:-}
out=$(mktemp)
for b in wire pipeline conntrack; do
  cargo bench -q -p bench --bench "$b" -- --warm-up-time 1 --measurement-time 4 $filter 2>/dev/null | tee -a "$out" >/dev/null
done
# "name  time: [low median high]  thrpt: [low median high]" -> "name  median-time  median-throughput"
awk '
  /^[a-zA-Z_0-9]+\/[^ ]+$/ { name=$1; next }
  /^[a-zA-Z_0-9]+\/[^ ]+ +time:/ { name=$1; sub(/^[^ ]+ +/, "") }
  /time:/ && name != "" && !/change/ { t=$4" "$5 }
  /thrpt:/ && name != "" && !/%/ { printf "%-55s %12s %14s\n", name, t, $4" "$5; name="" }
' "$out"
rm -f "$out"
if [[ -z $filter ]]; then
  echo
  echo "conntrack memory per flow (counting allocator and RSS):"
  cargo run -q --release -p bench --bin conntrack-memory 2>/dev/null | tail -n 12
fi
