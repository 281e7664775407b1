#!/usr/bin/env bash
# README command 1: build the gateway and run the seed scenario (see README.md).
#
# As root: in network namespaces (tests/src/bin/demo_netns.rs), the real node agent (`egress-gateway node`)
# programs two Calico-style client nodes from the seed's EgressGatewayPolicy, two real gateways
# (`egress-gateway run`, red and blue) carry the pods' traffic to outside, internal and on-premises servers:
# ping, TCP and UDP from every pod to every server, hostile input, what each server saw, through which gateway
# and uplink, the gateways' counters. Everything it builds is removed at the end, also on Ctrl-C.
# Not root: the same scenario through the packet pipeline in-process (`egress-gateway demo`), which needs no
# privileges.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked -p gateway

if [[ $(id -u) -eq 0 ]]; then
  cargo build --release --locked -p tests --bin demo-netns
  exec ./target/release/demo-netns
fi

cat >&2 <<'EOF'
==> not root: network namespaces need root (CAP_NET_ADMIN), so this runs the in-process demo instead
==> (the same scenario through the gateway's packet pipeline, no sockets). For the real gateway in
==> namespaces run this script as root: sudo ./scripts/demo.sh
EOF
exec ./target/release/egress-gateway demo "$@"   # e.g. --verbose
