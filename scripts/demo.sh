#!/usr/bin/env bash
# README command 1: build the gateway and run the seed scenario (see README.md).
#
#   ./scripts/demo.sh          as root: in network namespaces (tests/src/bin/demo_netns.rs), the real node agent
#                              (`egress-gateway node`) programs two Calico-style client nodes from the seed's
#                              EgressGatewayPolicy, two real gateways (`egress-gateway run`, red and blue) carry the
#                              pods' traffic to outside, internal and on-premises servers: ping, TCP and UDP from
#                              every pod to every server, hostile input, what each server saw, through which gateway
#                              and uplink, the gateways' counters. Not root: the same scenario through the packet
#                              pipeline in-process (`egress-gateway demo`, arguments passed on, e.g. --verbose),
#                              which needs no privileges.
#   ./scripts/demo.sh --kube   root only: the same namespaces, but the node agents watch a real kube-apiserver
#                              (tests/src/bin/demo_kube.rs) and every change is a printed kubectl command: the
#                              policy, a namespace opting in, a policy edit, a gateway pod deleted; what each server
#                              saw after each, and a list of checks. Builds kube-apiserver, etcd and kubectl first if
#                              needed (scripts/kube-apiserver.sh build: needs Go, ~10 minutes once).
#
# Everything the namespace demos build is removed at the end, also on failure and on Ctrl-C. They exit 0 only when
# every check passed. Binaries go to $CARGO_TARGET_DIR (default target/).
set -euo pipefail
cd "$(dirname "$0")/.."

kube=0
if [[ ${1:-} == --kube ]]; then
  kube=1
  shift
  if [[ $(id -u) -ne 0 ]]; then
    echo "==> --kube needs root: its network namespaces need CAP_NET_ADMIN. Run: sudo ./scripts/demo.sh --kube" >&2
    exit 2
  fi
fi

./scripts/install-deps.sh
cargo build --release --locked -p gateway
release=${CARGO_TARGET_DIR:-target}/release
# The namespace demos run this gateway (tests/src/gateway.rs looks in target/ otherwise).
EGRESS_GATEWAY_BIN=${EGRESS_GATEWAY_BIN:-$(cd "$release" && pwd)/egress-gateway}
export EGRESS_GATEWAY_BIN

if [[ $kube == 1 ]]; then
  eval "$(scripts/kube-apiserver.sh env)" # KUBE_BIN
  if [[ ! -x $KUBE_BIN/kube-apiserver || ! -x $KUBE_BIN/etcd || ! -x $KUBE_BIN/kubectl ]]; then
    echo "==> building kube-apiserver, etcd and kubectl from source (scripts/kube-apiserver.sh build): about" >&2
    echo "==> 10 minutes the first time (needs Go); cached in $KUBE_BIN for the next runs" >&2
    scripts/kube-apiserver.sh build
  fi
  cargo build --release --locked -p tests --bin demo-kube
  exec "$release/demo-kube" "$@"
fi

if [[ $(id -u) -eq 0 ]]; then
  cargo build --release --locked -p tests --bin demo-netns
  exec "$release/demo-netns"
fi

cat >&2 <<'EOF'
==> not root: network namespaces need root (CAP_NET_ADMIN), so this runs the in-process demo instead
==> (the same scenario through the gateway's packet pipeline, no sockets). For the real gateway in
==> namespaces run this script as root: sudo ./scripts/demo.sh
EOF
exec "$release/egress-gateway" demo "$@" # e.g. --verbose
