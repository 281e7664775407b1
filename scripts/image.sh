#!/usr/bin/env bash
# Builds the container image without pulling anything, and checks it from its exported filesystem:
#
#   1. the static binary on the host: cargo build --release -p gateway --target x86_64-unknown-linux-gnu with
#      static glibc (crt-static), debug info stripped into target/image/egress-gateway, file capabilities
#      cap_net_admin,cap_net_raw=p (so that the image's non-root user gets them; see docs/deploy.md);
#   2. `podman build --build-arg BINARY_FROM=host-binary` (the Dockerfile's no-pull path: FROM scratch);
#   3. the image's configuration: user 65532:65532, entrypoint /egress-gateway, OCI labels;
#   4. `podman create` + `podman export` into a directory (no container engine or runtime needed), keeping the
#      file capabilities;
#   5. from that tree: `egress-gateway --version` (chrooted into it: the tree needs nothing else), then
#      `egress-gateway check` on the example configuration and seed inventory as uid/gid 65532 with only
#      CAP_NET_ADMIN + CAP_NET_RAW, from a read-only bind mount of the tree;
#   6. prints the image size.
#
# Usage: scripts/image.sh [--export-dir DIR] [--tag REF] [--system-store]
#   --export-dir DIR  leave the image's exported filesystem in DIR (emptied first) for further tests, e.g. a
#                     gateway run in network namespaces; default: a temporary directory removed at exit
#   --tag REF         image name (default localhost/egress-gateway:<version>)
#   --system-store    build into podman's default storage (to `podman push` it afterwards); default: a private
#                     vfs store in a temporary directory, removed at exit, so that the machine's storage
#                     configuration is neither needed nor changed
#
# Root is needed (podman storage, setpriv to uid 65532); without root the script says SKIPPED and exits 77.
# Installs podman from apt if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }
die() { printf 'image.sh: %s\n' "$*" >&2; exit 1; }

export_dir=""
tag=""
system_store=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --export-dir) export_dir=${2:?--export-dir needs a directory}; shift 2 ;;
    --export-dir=*) export_dir=${1#*=}; shift ;;
    --tag) tag=${2:?--tag needs an image reference}; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --system-store) system_store=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

# shellcheck source=scripts/skip.sh
source "$(dirname "$0")/skip.sh"
if [[ $(id -u) -ne 0 ]]; then
  skipped "image" "build and check need root (podman storage and setpriv to uid 65532)"
  exit "$SKIP_STATUS"
fi

start=$SECONDS
uid=65532
caps=+net_admin,+net_raw   # setpriv capability list

# --- tools ---------------------------------------------------------------------------------------------------------
if ! command -v podman >/dev/null 2>&1; then
  log "apt-get install podman"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends podman >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends podman >/dev/null; }
fi
if ! command -v setcap >/dev/null 2>&1; then
  log "apt-get install libcap2-bin (setcap, getcap)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends libcap2-bin >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends libcap2-bin >/dev/null; }
fi
for tool in setpriv unshare chroot objcopy readelf tar setcap getcap; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (util-linux, coreutils, binutils, tar, libcap2-bin)"
done

work=$(mktemp -d /tmp/egress-image.XXXXXX)
cleanup() {
  local rc=$?
  if [[ -n ${cid:-} ]]; then podman "${store[@]}" rm -f "$cid" >/dev/null 2>&1 || true; fi
  # The private store uses vfs: its layers are plain directories, removed with the rest.
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

store=()
if [[ $system_store -eq 0 ]]; then
  mkdir -p "$work/store/root" "$work/store/run"
  store=(--root "$work/store/root" --runroot "$work/store/run" --storage-driver vfs)
fi

# --- 1. static binary ------------------------------------------------------------------------------------------
version=$(cargo metadata --no-deps --format-version 1 --locked 2>/dev/null \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="gateway"))')
tag=${tag:-localhost/egress-gateway:$version}
target=x86_64-unknown-linux-gnu
log "cargo build --release -p gateway --target $target (static glibc)"
t=$SECONDS
# --target keeps build scripts and proc macros dynamic (crt-static applies to the target only), and keeps this
# build in target/$target/ so that the ordinary target/release/ build is not invalidated.
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release -p gateway --locked --target "$target"
echo "    built in $((SECONDS - t)) s"
bin=target/$target/release/egress-gateway
if readelf -lW "$bin" | grep -q 'Requesting program interpreter'; then
  die "$bin is dynamically linked (crt-static did not apply)"
fi
if readelf -dW "$bin" | grep -q '(NEEDED)'; then
  die "$bin needs shared libraries: $(readelf -dW "$bin" | grep '(NEEDED)' | tr -s ' ' | tr '\n' ' ')"
fi
mkdir -p target/image
objcopy --strip-debug "$bin" target/image/egress-gateway
echo "    $bin: static; stripped of debug info: $(stat -c %s target/image/egress-gateway) bytes"
# File capabilities, permitted only: the image's user 65532 gets them at exec (bounded by the container's
# capability set) and the binary makes them effective itself (gateway/src/caps.rs).
setcap cap_net_admin,cap_net_raw=p target/image/egress-gateway
echo "    file capabilities: $(getcap target/image/egress-gateway)"

# --- 2. image ----------------------------------------------------------------------------------------------------
log "podman build $tag (BINARY_FROM=host-binary: FROM scratch, nothing pulled)"
t=$SECONDS
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $revision != unknown ]] && ! git diff --quiet HEAD 2>/dev/null; then revision="$revision-dirty"; fi
podman "${store[@]}" build -q \
  --build-arg BINARY_FROM=host-binary \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$revision" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  -t "$tag" . >/dev/null
echo "    built in $((SECONDS - t)) s"

# --- 3. image configuration --------------------------------------------------------------------------------------
log "image configuration"
cfg=$(podman "${store[@]}" image inspect "$tag" --format \
  '{{.Config.User}}|{{json .Config.Entrypoint}}|{{index .Config.Labels "org.opencontainers.image.version"}}|{{index .Config.Labels "org.opencontainers.image.title"}}')
IFS='|' read -r user entrypoint label_version label_title <<<"$cfg"
echo "    user=$user entrypoint=$entrypoint org.opencontainers.image.title=$label_title version=$label_version"
[[ $user == "$uid:$uid" ]] || die "image user is '$user', expected $uid:$uid"
[[ $entrypoint == '["/egress-gateway"]' ]] || die "image entrypoint is $entrypoint, expected [\"/egress-gateway\"]"
[[ $label_version == "$version" && $label_title == egress-gateway ]] || die "OCI labels missing or wrong"

# --- 4. export ---------------------------------------------------------------------------------------------------
if [[ -n $export_dir ]]; then
  mkdir -p "$export_dir"
  export_dir=$(cd "$export_dir" && pwd)
  [[ $export_dir != / ]] || die "--export-dir / is not allowed"
  find "$export_dir" -mindepth 1 -delete
else
  export_dir=$work/rootfs
  mkdir -p "$export_dir"
fi
log "podman export -> $export_dir"
cid=$(podman "${store[@]}" create "$tag")
podman "${store[@]}" export "$cid" | tar --xattrs --xattrs-include='security.capability' -x -C "$export_dir"
podman "${store[@]}" rm "$cid" >/dev/null
cid=""
chmod 0755 "$export_dir"   # mktemp made it 0700; an image's root is 0755 (uid 65532 must traverse it)
listing=$(cd "$export_dir" && find . -mindepth 1 | sort | tr '\n' ' ')
echo "    files: $listing"
[[ -x $export_dir/egress-gateway ]] || die "the exported tree has no /egress-gateway"
fcaps=$(getcap "$export_dir/egress-gateway")
echo "    $fcaps"
[[ $fcaps == *"cap_net_admin,cap_net_raw=p"* ]] || die "/egress-gateway lost its file capabilities (cap_net_admin,cap_net_raw=p)"

# --- 5. run from the exported tree -------------------------------------------------------------------------------
log "chroot $export_dir /egress-gateway --version"
got=$(chroot "$export_dir" /egress-gateway --version)
echo "    $got"
[[ $got == "egress-gateway $version" ]] || die "--version printed '$got', expected 'egress-gateway $version'"

mkdir -p "$work/etc"
cp gateway/examples/gateway.yaml gateway/examples/seed-inventory.yaml "$work/etc/"
chmod 0755 "$work" "$work/etc"
chmod 0644 "$work/etc/"*.yaml
as_gateway=(setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs
  --inh-caps=-all,$caps --ambient-caps=-all,$caps --bounding-set=-all,$caps)

# What the process really holds, as the kernel reports it: exactly CAP_NET_ADMIN (12) + CAP_NET_RAW (13).
want=$(printf '%016x' $(((1 << 12) | (1 << 13))))
status=$("${as_gateway[@]}" cat /proc/self/status)
for f in Uid Gid CapEff CapPrm CapBnd; do
  echo "    $(grep "^$f:" <<<"$status" | tr -s '\t' ' ')"
done
[[ $(awk '/^Uid:/ {print $2 $3 $4 $5}' <<<"$status") == "$uid$uid$uid$uid" ]] || die "setpriv did not switch to uid $uid"
for f in CapEff CapPrm CapBnd; do
  [[ $(awk -v f="$f:" '$1 == f {print $2}' <<<"$status") == "$want" ]] || die "$f is not exactly NET_ADMIN+NET_RAW"
done

log "egress-gateway check (uid $uid, only CAP_NET_ADMIN + CAP_NET_RAW, binary on a read-only mount)"
# A private mount namespace with the exported tree bind-mounted read-only over itself.
unshare --mount --propagation private -- bash -euo pipefail -c '
  mount --bind "$1" "$1"
  mount -o remount,bind,ro "$1"
  shift
  exec "$@"
' _ "$export_dir" "${as_gateway[@]}" "$export_dir/egress-gateway" check \
  "$work/etc/gateway.yaml" "$work/etc/seed-inventory.yaml" 2>&1 | sed 's/^/    /'

# --- 6. size -----------------------------------------------------------------------------------------------------
size=$(podman "${store[@]}" image inspect "$tag" --format '{{.Size}}')
log "image $tag: $size bytes ($(numfmt --to=iec-i --suffix=B "$size")), binary $(stat -c %s "$export_dir/egress-gateway") bytes"
if [[ $system_store -eq 1 ]]; then
  echo "    in podman's default storage: podman push $tag <registry>/egress-gateway:$version"
fi
echo "    exported filesystem: $export_dir$([[ $export_dir == "$work"/* ]] && echo ' (removed at exit; --export-dir keeps it)')"
log "image checks passed in $((SECONDS - start)) s"
