#!/usr/bin/env bash
# README command 1: build the gateway and run the seed scenario (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked -p gateway
exec ./target/release/egress-gateway demo "$@"
