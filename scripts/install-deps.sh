#!/usr/bin/env bash
# Installs what building and testing the egress gateway needs on a fresh Debian-like machine (as root).
# Idempotent: safe to run again. Set SKIP_APT=1 to skip the system packages (no root).
set -euo pipefail

log() { printf '==> %s\n' "$*" >&2; }

if [[ "${SKIP_APT:-0}" != 1 ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    log "not root: skipping apt-get (set SKIP_APT=1 to silence this); system packages must already be present"
  else
    log "apt-get: build tools and networking utilities"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # iproute2 (ip, bridge, ss), iptables/nftables, iperf3, ping and ethtool: the network-namespace tests
    # and the end-to-end benchmark (tests/, bench/src/bin/e2e.rs). openssl and python3-venv: the test API
    # server's certificates and kubectl's venv (scripts/kube-apiserver.sh).
    apt-get install -y -qq --no-install-recommends \
      build-essential pkg-config ca-certificates iproute2 iptables nftables iperf3 procps \
      iputils-ping ethtool openssl python3-venv >/dev/null
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found. Install a Rust toolchain (rustup, stable >= 1.89) and run this again."
  exit 1
fi

# The workspace's rust-version (Cargo.toml); older toolchains fail with confusing errors, so say it plainly.
have=$(rustc --version | awk '{print $2}')
if [[ "$(printf '%s\n%s\n' 1.89.0 "${have%%-*}" | sort -V | head -n1)" != 1.89.0 ]]; then
  log "rustc $have is older than 1.89, the workspace's rust-version: update the toolchain (rustup update stable)"
  exit 1
fi

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy
fi

# cargo-fuzz (for the fuzz smoke run); it runs on the stable toolchain with RUSTC_BOOTSTRAP=1 (scripts/test.sh).
if [[ "${WANT_FUZZ:-0}" == 1 ]] && ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
fi
